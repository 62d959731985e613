//! The memory plan is the allocation: the Trainer allocates exactly the buffers
//! `plan::engine_buffers` lists (names, sizes, dtypes, order), for every policy and option.

use tunestudio::backend::cpu::CpuBackend;
use tunestudio::config::{CheckpointPolicy, LoraConfig, OptimConfig, Quantization, Target};
use tunestudio::engine::model::RandomWeights;
use tunestudio::engine::plan::{self, PlanInput, PlanTarget};
use tunestudio::engine::{EngineOptions, TokenRows, Trainer};
use tunestudio::model::ModelSpec;

fn spec(tied: bool) -> ModelSpec {
    ModelSpec {
        vocab_size: 50,
        hidden_size: 16,
        intermediate_size: 24,
        num_layers: 3,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 4,
        tie_word_embeddings: tied,
        ..ModelSpec::llama3_8b()
    }
}

#[test]
fn trainer_allocates_exactly_the_planned_buffers() {
    let cases = [
        (CheckpointPolicy::None, 0.0, Target::ALL.to_vec(), 0, false),
        (CheckpointPolicy::Layer, 0.1, vec![Target::Q, Target::V], 0, false),
        (CheckpointPolicy::Layer, 0.0, vec![Target::Down, Target::Gate], 3, false),
        (CheckpointPolicy::None, 0.2, Target::ALL.to_vec(), 2, true),
        (CheckpointPolicy::Auto, 0.0, Target::ALL.to_vec(), 0, false),
        (CheckpointPolicy::Offload, 0.1, Target::ALL.to_vec(), 1, false),
    ];
    for (policy, dropout, targets, token_rows, tied) in cases {
        let s = spec(tied);
        let lora = LoraConfig { r: 5, alpha: 8.0, dropout, targets, rslora: false };
        let opts = EngineOptions {
            lora: lora.clone(),
            optim: OptimConfig::default(),
            quantization: Quantization::Nf4,
            batch_size: 2,
            max_seq_len: 12,
            checkpointing: policy,
            seed: 1,
            mlp_chunk_rows: 7,
        };
        let mut tr = Trainer::new(CpuBackend::<f32>::new(), s.clone(), &RandomWeights::new(&s, 2, 0.1), opts, None).unwrap();
        if token_rows > 0 {
            let d = s.hidden_size;
            let ids: Vec<u32> = (0..token_rows as u32).map(|i| 40 + i).collect();
            tr.set_token_rows(&TokenRows { ids, embed: vec![0.5; token_rows * d], head: (!tied).then(|| vec![0.25; token_rows * d]) }).unwrap();
        }
        let input = PlanInput { lora, quantization: Quantization::Nf4, batch_size: 2, max_seq_len: 12, checkpointing: policy, token_rows, mlp_chunk_rows: 7 };
        let resolved = plan::plan(&s, &input, &PlanTarget::cpu()).checkpointing;
        assert_eq!(plan::keeps_all(resolved), tr.keeps_all_activations(), "{policy:?}");
        let expected = plan::engine_buffers(&s, &input, resolved);
        let got = tr.allocations();
        for (i, (e, g)) in expected.iter().zip(got).enumerate() {
            assert_eq!(e, g, "buffer {i} differs ({policy:?}, dropout {dropout})");
        }
        assert_eq!(expected.len(), got.len(), "{policy:?}: planned {} buffers, allocated {}", expected.len(), got.len());
    }
}
