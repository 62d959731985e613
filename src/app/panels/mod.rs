//! One module per page of the window, plus the preflight and confirmation dialogs. Each draws `app::state` and
//! pushes `app::msg::Action`s; none imports another (a page made of two panels, Hyperparameters
//! with the memory budget, is composed by the app).

pub mod budget;
pub mod chat;
pub mod confirm;
pub mod dataset;
pub mod export;
pub mod hyper;
pub mod model;
pub mod monitor;
pub mod preflight;
pub mod runs;
