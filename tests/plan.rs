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
    // Qwen3's q/k norms and Gemma 3's output norms add activations and scratch of their own.
    let qwen3 = |tied| ModelSpec { qk_norm: true, head_dim: 6, ..spec(tied) };
    let gemma3 = |tied| ModelSpec { sandwich_norms: true, norm_weight_offset: 1.0, ..qwen3(tied) };
    let families: [&dyn Fn(bool) -> ModelSpec; 3] = [&spec, &qwen3, &gemma3];
    for ((policy, dropout, targets, token_rows, tied), family) in cases.into_iter().flat_map(|c| families.map(|f| (c.clone(), f))) {
        let s = family(tied);
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
            tr.set_token_rows(&TokenRows { ids, embed: vec![0.5; token_rows * d], head: (!tied).then(|| vec![0.25; token_rows * d]) })
                .unwrap();
        }
        let input = PlanInput {
            lora,
            quantization: Quantization::Nf4,
            batch_size: 2,
            max_seq_len: 12,
            checkpointing: policy,
            token_rows,
            mlp_chunk_rows: 7,
        };
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

/// The CUDA workspace of the plan follows the attention version the backend is created with:
/// version 3 adds exactly the backend's attention backward scratch, versions 1 and 2 add nothing.
#[test]
fn cuda_workspace_follows_the_attention_version() {
    use tunestudio::backend::cuda::kernels::AttnVersion;
    use tunestudio::backend::cuda::{ATTN_BWD_SCRATCH_BYTES, attention_scratch_bytes};
    use tunestudio::engine::plan::BackendKind;
    let s = ModelSpec::llama3_8b();
    let lora = LoraConfig { r: 16, alpha: 16.0, dropout: 0.0, targets: Target::ALL.to_vec(), rslora: false };
    let input = PlanInput {
        lora,
        quantization: Quantization::Nf4,
        batch_size: 1,
        max_seq_len: 2048,
        checkpointing: CheckpointPolicy::Layer,
        token_rows: 0,
        mlp_chunk_rows: 0,
    };
    let ws = |v| plan::cuda_workspace(&s, &input, v);
    let bytes = |v| ws(v).iter().map(|b| b.bytes(BackendKind::Cuda)).sum::<u64>();
    let has = |v| ws(v).iter().any(|b| b.name == "attention.bwd_scratch");
    assert_eq!(attention_scratch_bytes(AttnVersion::V3), ATTN_BWD_SCRATCH_BYTES);
    assert_eq!(bytes(AttnVersion::V3) - bytes(AttnVersion::V2), ATTN_BWD_SCRATCH_BYTES as u64);
    assert_eq!(bytes(AttnVersion::V1), bytes(AttnVersion::V2));
    assert!(has(AttnVersion::V3) && !has(AttnVersion::V2) && !has(AttnVersion::V1));
    let peak = |v| plan::plan(&s, &input, &PlanTarget { attention: v, ..PlanTarget::gpu("H100", 80 << 30) }).peak_bytes;
    assert_eq!(peak(AttnVersion::V3) - peak(AttnVersion::V2), ATTN_BWD_SCRATCH_BYTES as u64);
    // Names of the environment variable's values.
    assert_eq!(AttnVersion::parse("v2"), Some(AttnVersion::V2));
    assert_eq!(AttnVersion::parse(" V3 "), Some(AttnVersion::V3));
    assert_eq!(AttnVersion::parse("v1"), Some(AttnVersion::V1));
    assert_eq!(AttnVersion::parse("2"), None);
}

/// Version 3's backward launches fit the scratch, cover every sequence and kv head, and the
/// 128 MiB scratch takes Llama-3-8B's attention (32 / 8 heads of 128) at 8192 tokens in two.
#[test]
fn attention3_backward_split_fits_the_scratch() {
    use tunestudio::backend::AttnShape;
    use tunestudio::backend::cuda::{ATTN_BWD_SCRATCH_BYTES, attention3_bwd_split};
    let unit = |s: AttnShape| {
        let g = s.heads / s.kv_heads;
        s.seq * (g * s.head_dim + 2 * s.head_dim + g) * 4
    };
    for (batch, seq, heads, kv_heads, head_dim) in
        [(1, 8192, 32, 8, 128), (4, 2048, 32, 8, 128), (3, 300, 4, 2, 128), (2, 100, 8, 2, 64), (1, 1, 4, 2, 128), (5, 1000, 24, 8, 64)]
    {
        let s = AttnShape { batch, seq, heads, kv_heads, head_dim, ..Default::default() };
        for limit in [unit(s) - 1, unit(s), 3 * unit(s), 7 * unit(s) + 5, ATTN_BWD_SCRATCH_BYTES] {
            match attention3_bwd_split(s, limit) {
                None => assert!(unit(s) > limit.min(ATTN_BWD_SCRATCH_BYTES), "{s:?} limit {limit}: a unit fits"),
                Some((bc, kvc)) => {
                    assert!((1..=batch).contains(&bc) && (1..=kv_heads).contains(&kvc), "{s:?} limit {limit}: ({bc}, {kvc})");
                    assert!(bc * kvc * unit(s) <= limit, "{s:?} limit {limit}: ({bc}, {kvc}) does not fit");
                }
            }
        }
    }
    let s = AttnShape { batch: 1, seq: 8192, heads: 32, kv_heads: 8, head_dim: 128, ..Default::default() };
    let (bc, kvc) = attention3_bwd_split(s, ATTN_BWD_SCRATCH_BYTES).unwrap();
    assert_eq!(s.batch.div_ceil(bc) * s.kv_heads.div_ceil(kvc), 2);
}
