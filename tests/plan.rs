//! The memory plan is the allocation: the Trainer's arena is carved from the plan's own lists,
//! and the plan the studio previews (its mix resolved from the settings) is that list, for every
//! policy and option.

mod model_support;

use model_support::RandomWeights;

use tunestudio::backend::cpu::CpuBackend;
use tunestudio::config::{CheckpointPolicy, LoraConfig, OptimConfig, Quantization, Target};
use tunestudio::engine::plan::{self, Mix, PlanInput, PlanTarget, SavedAttention};
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

/// An H100's profile (a card of known speed: `auto` weighs predicted steps) with a memory cap,
/// its context at the default and 100 GiB of host RAM.
fn h100_target(cap_gib: Option<f64>) -> PlanTarget {
    let card = tunestudio::backend::card::profile_named("h100-80").unwrap().limits();
    PlanTarget {
        kind: plan::BackendKind::Cuda,
        name: card.name.clone(),
        total_bytes: Some(card.memory_bytes),
        card: Some(card),
        others_bytes: 0,
        cap_bytes: cap_gib.map(|g| (g * (1u64 << 30) as f64) as u64),
        context_bytes: plan::DEFAULT_CUDA_CONTEXT_BYTES,
        host_bytes: Some(100 << 30),
    }
}

#[test]
fn trainer_allocates_exactly_the_planned_buffers() {
    use SavedAttention::{Device, Host, Off};
    // The last fields: layers kept whole under `layer` (what `auto` picks when only some fit), and
    // where the recomputed layers keep attention's output.
    let cases = [
        (CheckpointPolicy::None, 0.0, Target::ALL.to_vec(), 0, false, None, Off),
        (CheckpointPolicy::Layer, 0.1, vec![Target::Q, Target::V], 0, false, None, Off),
        (CheckpointPolicy::Layer, 0.0, vec![Target::Down, Target::Gate], 3, false, None, Off),
        (CheckpointPolicy::None, 0.2, Target::ALL.to_vec(), 2, true, None, Off),
        (CheckpointPolicy::Auto, 0.0, Target::ALL.to_vec(), 0, false, None, Off),
        (CheckpointPolicy::Offload, 0.1, Target::ALL.to_vec(), 1, false, None, Off),
        (CheckpointPolicy::Layer, 0.1, Target::ALL.to_vec(), 0, false, Some(1), Off),
        (CheckpointPolicy::Layer, 0.0, vec![Target::Q, Target::Up, Target::Down], 2, true, Some(2), Off),
        (CheckpointPolicy::Layer, 0.1, Target::ALL.to_vec(), 0, false, Some(1), Host),
        (CheckpointPolicy::Layer, 0.0, vec![Target::O, Target::Down], 0, false, None, Device),
        (CheckpointPolicy::Offload, 0.0, Target::ALL.to_vec(), 1, true, None, Host),
        (CheckpointPolicy::Offload, 0.1, Target::ALL.to_vec(), 0, false, None, Device),
        (CheckpointPolicy::None, 0.0, Target::ALL.to_vec(), 0, false, None, Host),
    ];
    // Qwen3's q/k norms and Gemma 3's output norms add activations and scratch of their own.
    let qwen3 = |tied| ModelSpec { qk_norm: true, head_dim: 6, ..spec(tied) };
    let gemma3 = |tied| ModelSpec { sandwich_norms: true, norm_weight_offset: 1.0, ..qwen3(tied) };
    let families: [&dyn Fn(bool) -> ModelSpec; 3] = [&spec, &qwen3, &gemma3];
    for ((policy, dropout, targets, token_rows, tied, kept, attention), family) in
        cases.into_iter().flat_map(|c| families.map(|f| (c.clone(), f)))
    {
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
            saved_attention: attention,
            cached_weight_layers: 0,
            hold_mlp_weights: false,
        };
        let mut tr =
            Trainer::with_kept_layers(CpuBackend::<f32>::new(), s.clone(), &RandomWeights::new(&s, 2, 0.1), opts, None, kept).unwrap();
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
            samples: None,
        };
        let resolved = plan::plan(&s, &input, &PlanTarget::cpu()).checkpointing;
        assert_eq!(plan::keeps_all(resolved), tr.keeps_all_activations(), "{policy:?}");
        let nothing_recomputed = plan::keeps_all(resolved) || kept == Some(s.num_layers);
        assert_eq!(tr.saved_attention(), if nothing_recomputed { Off } else { attention }, "{policy:?}");
        // The preview of the mix the Trainer runs lists exactly what it allocated, in order.
        let expected = plan::plan_resolved(&s, &input, &PlanTarget::cpu(), tr.mix()).buffers;
        let got = tr.allocations();
        for (i, (e, g)) in expected.iter().zip(got).enumerate() {
            assert_eq!(e, g, "buffer {i} differs ({policy:?}, dropout {dropout})");
        }
        assert_eq!(expected.len(), got.len(), "{policy:?}: planned {} buffers, allocated {}", expected.len(), got.len());
    }
}

/// `auto` on a card: everything kept when it fits; otherwise as many layers kept whole as fit
/// with the headroom to spare (the others recomputed), more of them on a bigger card or a shorter
/// sequence; offload only when recomputing every layer does not fit.
#[test]
fn auto_keeps_as_many_layers_as_the_card_holds() {
    let s = ModelSpec::llama3_8b();
    let input = |seq| PlanInput {
        lora: LoraConfig { r: 32, alpha: 32.0, dropout: 0.0, targets: Target::ALL.to_vec(), rslora: false },
        quantization: Quantization::Nf4,
        batch_size: 1,
        max_seq_len: seq,
        checkpointing: CheckpointPolicy::Auto,
        token_rows: 0,
        mlp_chunk_rows: 0,
        samples: None,
    };
    let card = |gib: u64| PlanTarget::gpu(&format!("{gib} GiB"), gib << 30);
    let kept = |seq, gib| {
        let p = plan::plan(&s, &input(seq), &card(gib));
        assert!(p.fits, "{seq} on {gib} GiB fits");
        let free = card(gib).available_bytes().unwrap();
        if p.checkpointing == CheckpointPolicy::Layer && p.kept_layers > 0 {
            assert!(p.peak_bytes + plan::PARTIAL_KEEP_HEADROOM_BYTES <= free, "{seq} on {gib} GiB leaves the headroom");
            let one_more = plan::plan_resolved(
                &s,
                &input(seq),
                &card(gib),
                Mix { kept_layers: p.kept_layers + 1, cached_weight_layers: 0, ..p.mix() },
            );
            assert!(one_more.peak_bytes + plan::PARTIAL_KEEP_HEADROOM_BYTES > free, "{seq} on {gib} GiB: one more layer would fit");
            let layer = plan::plan_resolved(&s, &input(seq), &card(gib), Mix::of_policy(&s, CheckpointPolicy::Layer));
            assert!(p.peak_bytes > layer.peak_bytes, "kept layers cost memory");
        }
        (p.checkpointing, p.kept_layers)
    };
    assert_eq!(kept(2048, 80), (CheckpointPolicy::None, 32));
    let (policy, at_8k) = kept(8192, 24);
    assert_eq!(policy, CheckpointPolicy::Layer);
    assert!((1..32).contains(&at_8k), "8192 tokens on 24 GiB keeps some layers, not all: {at_8k}");
    let (_, at_4k) = kept(4096, 24);
    assert!(at_4k > at_8k, "shorter rows keep more layers: {at_4k} at 4096 against {at_8k} at 8192");
    let (_, on_40) = kept(8192, 40);
    assert!(on_40 > at_8k, "a bigger card keeps more: {on_40} on 40 GiB against {at_8k} on 24 GiB");
    let long = plan::plan(&s, &input(65536), &card(24));
    assert_eq!((long.checkpointing, long.kept_layers), (CheckpointPolicy::Offload, 0), "64K tokens: the inputs go to the host");
    // The label says what the plan chose.
    let p = plan::plan(&s, &input(8192), &card(24));
    assert!(
        p.checkpointing_label(&s).starts_with(&format!("layer ({at_8k} of 32 layers kept, the rest recomputed")),
        "{}",
        p.checkpointing_label(&s)
    );
}

/// `auto` on a card of known speed (an H100 under issue 12's caps) keeps the recomputed layers'
/// attention output when that is predicted faster and fits with the headroom: in pinned host
/// memory when the card has no room for it, on the device when it has. The plan counts it where
/// it lives, and the prediction drops the recomputed attention forward.
#[test]
fn auto_keeps_attention_output_where_it_fits_and_pays() {
    let s = ModelSpec::llama3_8b();
    let input = |seq| PlanInput {
        lora: LoraConfig { r: 32, alpha: 32.0, dropout: 0.0, targets: Target::ALL.to_vec(), rslora: false },
        quantization: Quantization::Nf4,
        batch_size: 1,
        max_seq_len: seq,
        checkpointing: CheckpointPolicy::Auto,
        token_rows: 0,
        mlp_chunk_rows: 0,
        samples: None,
    };
    let h100 = |cap_gib: f64| h100_target(Some(cap_gib));
    // Unsloth's peak + 0.6 GiB at 16K and 64K, and 24 GiB at 32K.
    for (seq, cap) in [(16384, 11.9), (32768, 24.0), (65536, 24.5)] {
        let t = h100(cap);
        let p = plan::plan(&s, &input(seq), &t);
        assert!(
            p.fits && p.peak_bytes + plan::PARTIAL_KEEP_HEADROOM_BYTES <= t.available_bytes().unwrap(),
            "{seq}: {}",
            p.checkpointing_label(&s)
        );
        assert_ne!(p.attention, SavedAttention::Off, "{seq}: {}", p.checkpointing_label(&s));
        let without = plan::plan_resolved(&s, &input(seq), &t, Mix { attention: SavedAttention::Off, ..p.mix() });
        assert!(p.step.as_ref().unwrap().step_s < without.step.as_ref().unwrap().step_s, "{seq}: keeping attention is faster");
        let recomputed = 32 - p.kept_layers;
        let pair = (seq * 4096 * 2 + seq * 32 * 4) as u64;
        let kept: u64 = p
            .buffers
            .iter()
            .filter(|b| b.name.starts_with("saved_att") || b.name.starts_with("saved_lse"))
            .map(|b| b.bytes(plan::BackendKind::Cuda))
            .sum();
        assert_eq!(kept, recomputed as u64 * pair, "{seq}: one output and log-sum-exp per recomputed layer");
        match p.attention {
            // The stage's output; its small log-sum-exp may fill a chunk's free space.
            SavedAttention::Host => {
                assert!(p.pinned_host_bytes >= kept && p.peak_bytes >= without.peak_bytes + (seq * 4096 * 2) as u64, "{seq}: the stage")
            }
            _ => assert!(p.peak_bytes >= without.peak_bytes + kept, "{seq}"),
        }
        assert!(p.checkpointing_label(&s).contains("attention output kept"), "{}", p.checkpointing_label(&s));
    }
    // Without room on the host for it, the output is not kept there.
    let tight = PlanTarget { host_bytes: Some(1 << 30), ..h100(11.9) };
    assert_ne!(plan::plan(&s, &input(16384), &tight).attention, SavedAttention::Host);
    // Everything kept: nothing is recomputed, nothing to keep.
    assert_eq!(plan::plan(&s, &input(2048), &h100(80.0)).attention, SavedAttention::Off);
}

/// `auto` on a card of known speed dequantizes the weights once for the run where the room
/// allows and the prediction says it pays: all of them on an unconstrained H100 at 2K (keeping
/// everything), none under issue 12's cap at 2K, where there is no room. The plan counts each
/// cached linear as a 16-bit `[out, in]` in the `dequantized_weights` term, the prediction drops
/// their dequantization, and a fixed policy caches nothing. On a card of unknown speed the first
/// policy that fits gets what the room left allows; on the CPU nothing is cached.
#[test]
fn auto_dequantizes_weights_once_where_the_room_allows() {
    let s = ModelSpec::llama3_8b();
    let input = |seq, policy| PlanInput {
        lora: LoraConfig { r: 32, alpha: 32.0, dropout: 0.0, targets: Target::ALL.to_vec(), rslora: false },
        quantization: Quantization::Nf4,
        batch_size: 1,
        max_seq_len: seq,
        checkpointing: policy,
        token_rows: 0,
        mlp_chunk_rows: 0,
        samples: None,
    };
    let h100 = h100_target;
    let per_layer = s.layer_linear_params() * 2;
    let free = plan::plan(&s, &input(2048, CheckpointPolicy::Auto), &h100(None));
    assert_eq!((free.checkpointing, free.kept_layers, free.cached_weight_layers), (CheckpointPolicy::None, 32, 32));
    assert_eq!(free.terms["dequantized_weights"], 32 * per_layer);
    assert!(free.peak_bytes + plan::PARTIAL_KEEP_HEADROOM_BYTES <= h100(None).available_bytes().unwrap());
    let uncached =
        plan::plan_resolved(&s, &input(2048, CheckpointPolicy::Auto), &h100(None), Mix { cached_weight_layers: 0, ..free.mix() });
    assert_eq!(free.peak_bytes, uncached.peak_bytes + 32 * per_layer);
    let (fast, slow) = (free.step.as_ref().unwrap(), uncached.step.as_ref().unwrap());
    assert!(fast.step_s < 0.97 * slow.step_s, "{} vs {}", fast.step_s, slow.step_s);
    assert_eq!(fast.gemm_s, slow.gemm_s);
    assert!(free.checkpointing_label(&s).contains("weights dequantized once"), "{}", free.checkpointing_label(&s));
    // Under issue 12's cap at 2K (Unsloth's peak + 0.6 GiB) there is no room for a copy.
    let capped = plan::plan(&s, &input(2048, CheckpointPolicy::Auto), &h100(Some(7.7)));
    assert!(capped.fits);
    assert_eq!(capped.cached_weight_layers, 0, "{}", capped.checkpointing_label(&s));
    // Whatever 24 GiB gets at 8K keeps the headroom.
    let t24 = h100(Some(24.0));
    let mid = plan::plan(&s, &input(8192, CheckpointPolicy::Auto), &t24);
    assert!(mid.peak_bytes + plan::PARTIAL_KEEP_HEADROOM_BYTES <= t24.available_bytes().unwrap(), "{}", mid.checkpointing_label(&s));
    // A fixed policy is built as set.
    assert_eq!(plan::plan(&s, &input(2048, CheckpointPolicy::None), &h100(None)).cached_weight_layers, 0);
    // A card of unknown speed: the first policy that fits, with what the room left allows.
    let unknown = PlanTarget::gpu("some 40 GiB card", 40 << 30);
    let p = plan::plan(&s, &input(2048, CheckpointPolicy::Auto), &unknown);
    assert_eq!(p.checkpointing, CheckpointPolicy::None);
    assert!((1..=32).contains(&p.cached_weight_layers), "{}", p.checkpointing_label(&s));
    assert!(p.peak_bytes + plan::PARTIAL_KEEP_HEADROOM_BYTES <= unknown.available_bytes().unwrap());
    let one_more = plan::plan_resolved(
        &s,
        &input(2048, CheckpointPolicy::Auto),
        &unknown,
        Mix { cached_weight_layers: p.cached_weight_layers + 1, ..p.mix() },
    );
    assert!(p.cached_weight_layers == 32 || one_more.peak_bytes + plan::PARTIAL_KEEP_HEADROOM_BYTES > unknown.available_bytes().unwrap());
    // The CPU keeps every weight dequantized already.
    let cpu = plan::plan_resolved(
        &s,
        &input(2048, CheckpointPolicy::None),
        &PlanTarget::cpu(),
        Mix { cached_weight_layers: 32, ..Mix::of_policy(&s, CheckpointPolicy::None) },
    );
    assert_eq!((cpu.cached_weight_layers, cpu.terms.get("dequantized_weights")), (0, None));
}

/// The plan's attention scratch is what the backend reserves for the run's largest batch: 160 MiB
/// up to the length where one sequence of one kv-head group needs more, then that (Llama-3-8B at
/// 64K tokens needs 257 MiB, cuDNN's unit), so no length falls back to a slower path.
#[test]
fn cuda_workspace_sizes_the_attention_scratch_for_the_longest_row() {
    use tunestudio::backend::cuda::{ATTN_BWD_SCRATCH_BYTES, attention_bwd_split, attention_scratch_bytes};
    let s = ModelSpec::llama3_8b();
    let lora = LoraConfig { r: 16, alpha: 16.0, dropout: 0.0, targets: Target::ALL.to_vec(), rslora: false };
    let input = |seq| PlanInput {
        lora: lora.clone(),
        quantization: Quantization::Nf4,
        batch_size: 1,
        max_seq_len: seq,
        checkpointing: CheckpointPolicy::Layer,
        token_rows: 0,
        mlp_chunk_rows: 0,
        samples: None,
    };
    let scratch = |seq| {
        let ws = plan::cuda_workspace(&s, &input(seq), false);
        ws.iter().find(|b| b.name == "attention.bwd_scratch").map(|b| b.elems).expect("attention scratch planned")
    };
    assert_eq!(scratch(2048), ATTN_BWD_SCRATCH_BYTES as u64);
    // One (sequence, kv head) unit at 64K, cuDNN's (larger than our kernels' 65536 x (4 x 128 +
    // 2 x 128 + 4) f32): its dQ accumulator, row sums and plan workspace, 65536 x 4 x (2 x 128 + 1)
    // f32 and three 256-byte alignments.
    assert_eq!(scratch(65536), 65536 * 4 * (2 * 128 + 1) * 4 + 768);
    for seq in [2048, 8192, 65536, 131072] {
        let shape = plan::attention_max_shape(&s, 1, seq);
        assert_eq!(attention_scratch_bytes(shape) as u64, scratch(seq));
        assert!(attention_bwd_split(shape, attention_scratch_bytes(shape)).is_some(), "seq {seq}: the backward fits its scratch");
    }
}

/// The backward's launches fit the scratch, cover every sequence and kv head, and the 160 MiB
/// scratch takes Llama-3-8B's attention (32 / 8 heads of 128) at 8192 tokens in two launches of
/// four kv heads (a unit is sized for cuDNN's backward, the larger need there), and at 16384 in
/// four of two.
#[test]
fn attention_backward_split_fits_the_scratch() {
    use tunestudio::backend::AttnShape;
    use tunestudio::backend::cuda::{ATTN_BWD_SCRATCH_BYTES, attention_bwd_split};
    use tunestudio::backend::workspace::attention_unit_bytes as unit;
    let s = AttnShape { batch: 1, seq: 8192, heads: 32, kv_heads: 8, head_dim: 128, ..Default::default() };
    let ours = s.seq * (4 * s.head_dim + 2 * s.head_dim + 4) * 4;
    assert!(unit(s) >= ours && unit(s) >= s.seq * 4 * (2 * s.head_dim + 1) * 4, "the unit covers both backwards");
    for (batch, seq, heads, kv_heads, head_dim) in
        [(1, 8192, 32, 8, 128), (4, 2048, 32, 8, 128), (3, 300, 4, 2, 128), (2, 100, 8, 2, 64), (1, 1, 4, 2, 128), (5, 1000, 24, 8, 64)]
    {
        let s = AttnShape { batch, seq, heads, kv_heads, head_dim, ..Default::default() };
        for limit in [unit(s) - 1, unit(s), 3 * unit(s), 7 * unit(s) + 5, ATTN_BWD_SCRATCH_BYTES] {
            match attention_bwd_split(s, limit) {
                None => assert!(unit(s) > limit, "{s:?} limit {limit}: a unit fits"),
                Some((bc, kvc)) => {
                    assert!((1..=batch).contains(&bc) && (1..=kv_heads).contains(&kvc), "{s:?} limit {limit}: ({bc}, {kvc})");
                    assert!(bc * kvc * unit(s) <= limit, "{s:?} limit {limit}: ({bc}, {kvc}) does not fit");
                }
            }
        }
    }
    let s = AttnShape { batch: 1, seq: 8192, heads: 32, kv_heads: 8, head_dim: 128, ..Default::default() };
    assert_eq!(attention_bwd_split(s, ATTN_BWD_SCRATCH_BYTES), Some((1, 4)));
    let s = AttnShape { seq: 16384, ..s };
    assert_eq!(attention_bwd_split(s, ATTN_BWD_SCRATCH_BYTES), Some((1, 2)));
}

/// Issue 13: with `[samples]` on, the sampler's memory is in the plan as its own term (it was only
/// a log line "outside the plan"): its copy of the model, a KV cache of `count` prompts ×
/// (`max_seq_len` + `max_new_tokens`) positions, its logits; the sampler's `Inference` is
/// allocated from the same list (`plan::infer_buffers`), so the two cannot drift apart.
#[test]
fn samples_during_training_are_in_the_plan() {
    let spec = ModelSpec::llama3_8b();
    let mut cfg = tunestudio::RunConfig::load(std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/demo/run.toml"))).unwrap();
    cfg.memory.checkpointing = CheckpointPolicy::Layer;
    let off = PlanInput::from_config(&cfg);
    assert_eq!(off.samples, None);
    cfg.samples.every = 10;
    cfg.samples.count = 4;
    cfg.samples.max_new_tokens = 48;
    let on = PlanInput::from_config(&cfg);
    let size = on.samples.unwrap();
    assert_eq!((size.slots, size.positions), (4, 256 + 48));
    for target in [PlanTarget::cpu(), PlanTarget::gpu("80 GB", 80 << 30)] {
        let (p_off, p_on) = (plan::plan(&spec, &off, &target), plan::plan(&spec, &on, &target));
        assert_eq!(p_off.terms.get("samples"), None);
        let bufs = plan::sampler_buffers(&spec, &on, target.kind);
        let term = p_on.terms["samples"];
        assert_eq!(term, bufs.iter().map(|b| b.footprint(target.kind)).sum::<u64>());
        // The cache: every prompt's positions, keys and values, every layer.
        let cache: u64 = bufs.iter().filter(|b| b.name.starts_with("cache.")).map(|b| b.elems).sum();
        assert_eq!(cache, (2 * spec.num_layers * 4 * 304 * spec.kv_dim()) as u64);
        let logits = bufs.iter().find(|b| b.name == "ws.logits").unwrap();
        assert_eq!(logits.elems, (4 * spec.vocab_size) as u64);
        // Its own copy of the base weights, as big as the run's.
        let is_weight = |n: &str| n.starts_with("layers.") || ["embed_tokens", "lm_head", "final_norm"].contains(&n);
        let weights: u64 = bufs.iter().filter(|b| is_weight(&b.name)).map(|b| b.footprint(target.kind)).sum();
        assert_eq!(weights, p_off.terms["base_weights"]);
        // Held against the machine with the rest: the peak grows by exactly that.
        assert_eq!(p_on.peak_bytes, p_off.peak_bytes + term);
    }
    // A card the run fits without samples but not with them.
    let p_off = plan::plan(&spec, &off, &PlanTarget::gpu("x", 80 << 30));
    let p_on = plan::plan(&spec, &on, &PlanTarget::gpu("x", 80 << 30));
    let between = PlanTarget::gpu("between", (p_off.peak_bytes + p_on.peak_bytes) / 2);
    assert!(plan::plan(&spec, &off, &between).fits && !plan::plan(&spec, &on, &between).fits);
}

/// `auto` holds the MLP's weights of the recomputed layers (dequantized once per pass into two
/// more buffers of the largest linear) where some layer is recomputed without cached weights and
/// the buffers fit: at issue 12's caps from 8K to 64K on an H100. The plan lists the buffers and
/// predicts a shorter step for it; nothing is held where every layer is kept, for a fixed policy,
/// on the CPU or for 16-bit weights.
#[test]
fn auto_holds_the_mlp_weights_where_layers_are_recomputed() {
    let s = ModelSpec::llama3_8b();
    let input = |seq, quantization, checkpointing| PlanInput {
        lora: LoraConfig { r: 32, alpha: 32.0, dropout: 0.0, targets: Target::ALL.to_vec(), rslora: false },
        quantization,
        batch_size: 1,
        max_seq_len: seq,
        checkpointing,
        token_rows: 0,
        mlp_chunk_rows: 0,
        samples: None,
    };
    let held_buffers = |p: &plan::MemoryPlan| p.buffers.iter().filter(|b| b.name.starts_with("dequant_scratch.")).count();
    for (seq, cap) in [(8192, 9.25), (16384, 11.29), (32768, 15.37), (65536, 23.78), (16384, 24.0)] {
        let t = h100_target(Some(cap));
        let p = plan::plan(&s, &input(seq, Quantization::Nf4, CheckpointPolicy::Auto), &t);
        assert!(p.fits, "{seq} at {cap} GiB");
        assert!(p.hold_mlp_weights, "{seq} at {cap} GiB: {}", p.checkpointing_label(&s));
        assert!(p.checkpointing_label(&s).contains("MLP weights dequantized once per pass"), "{}", p.checkpointing_label(&s));
        assert_eq!(held_buffers(&p), plan::MLP_HELD_WEIGHTS - 1);
        let largest = (s.intermediate_size * s.hidden_size * 2) as u64;
        let without =
            plan::plan_resolved(&s, &input(seq, Quantization::Nf4, CheckpointPolicy::Auto), &t, Mix { hold_mlp_weights: false, ..p.mix() });
        assert_eq!(p.peak_bytes - without.peak_bytes, 2 * largest, "{seq}: two more buffers of the largest linear");
        let (with_s, without_s) = (p.step.as_ref().unwrap().step_s, without.step.as_ref().unwrap().step_s);
        assert!(with_s < without_s, "{seq}: held {with_s} s against {without_s} s");
    }
    // Every layer kept: nothing recomputed, nothing to hold.
    let free = plan::plan(&s, &input(2048, Quantization::Nf4, CheckpointPolicy::Auto), &h100_target(None));
    assert!(free.keeps_all(&s) && !free.hold_mlp_weights && held_buffers(&free) == 0);
    // A fixed policy spends the least memory; the CPU and 16-bit weights dequantize nothing.
    let fixed = plan::plan(&s, &input(16384, Quantization::Nf4, CheckpointPolicy::Offload), &h100_target(Some(24.0)));
    assert!(!fixed.hold_mlp_weights && held_buffers(&fixed) == 0);
    let cpu = plan::plan_resolved(
        &s,
        &input(16384, Quantization::Nf4, CheckpointPolicy::Layer),
        &PlanTarget::cpu(),
        Mix { hold_mlp_weights: true, ..Mix::of_policy(&s, CheckpointPolicy::Layer) },
    );
    assert!(!cpu.hold_mlp_weights);
    let bf16 = plan::plan(&s, &input(16384, Quantization::Bf16, CheckpointPolicy::Auto), &h100_target(Some(40.0)));
    assert!(!bf16.hold_mlp_weights && held_buffers(&bf16) == 0);
}
