//! The model on the host: its architecture (`arch`), its weights (`weights`), its tokenizer and
//! chat template (`tokenizer`), and the untrained-token detector (`untrained`).

pub mod arch;
pub mod chat_template;
pub mod tokenizer;
pub mod untrained;
pub mod weights;

pub use arch::ModelSpec;
pub use weights::WeightStore;
