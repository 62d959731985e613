//! `tunestudio bench` and `bench-generate`: their flags, and their results as text or JSON.

use crate::bench::{self, BenchMode};
use crate::config::CheckpointPolicy;
use crate::error::Result;

use super::parse_size;

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// llama3-8b, llama3.2-3b, llama3.2-1b, qwen3-8b or gemma3-4b.
    #[arg(long, default_value = "llama3-8b")]
    pub shape: String,
    #[arg(long, default_value_t = 2048)]
    pub seq: usize,
    /// Timed steps (after the warm-up).
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// speed: the fastest policy that fits; memory: offload, least device memory.
    #[arg(long, value_enum, default_value_t = BenchMode::Speed)]
    pub mode: BenchMode,
    #[arg(long, default_value_t = 32)]
    pub rank: usize,
    /// Force a checkpointing policy (auto: the fastest that fits the card or --gpu-mem, keeping as
    /// many layers' activations as fit).
    #[arg(long, value_enum)]
    pub checkpointing: Option<CheckpointPolicy>,
    /// After the timed steps, time every kernel and GEMM of one more step.
    #[arg(long)]
    pub profile: bool,
    /// Decide as this card would: its shared-memory limits, its PTX and its memory (rtx4090,
    /// l4, a100-40, ...; `TUNESTUDIO_CARD` does the same).
    #[arg(long)]
    pub card: Option<String>,
    /// A hard cap on the device memory this run may use, context included (e.g. 24GiB).
    #[arg(long, value_parser = parse_size)]
    pub gpu_mem: Option<u64>,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: &BenchArgs) -> Result<()> {
    let card = super::card_profile(a.card.clone())?;
    let args = bench::BenchArgs {
        shape: a.shape.clone(),
        seq: a.seq,
        steps: a.steps,
        warmup: a.warmup,
        mode: a.mode,
        rank: a.rank,
        checkpointing: a.checkpointing,
        profile: a.profile,
        card,
        gpu_mem_bytes: a.gpu_mem,
    };
    let r = crate::bench::run(&args, &|m| eprintln!("{m}"))?;
    if a.json {
        println!("{}", serde_json::to_string(&r).expect("json"));
        return Ok(());
    }
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    match &r.card_profile {
        Some(p) => println!("card          {} (profile {p}, {:.1} GiB), attention {}", r.card, r.card_memory_gib, r.attention),
        None => println!("card          {}, attention {}", r.card, r.attention),
    }
    println!(
        "run           {} seq {} r {} {:?} (checkpointing {:?}, {} of the layers' activations kept, attention output kept: {:?}, {} layers' weights dequantized once{})",
        r.shape,
        r.seq,
        r.rank,
        r.mode,
        r.checkpointing,
        r.kept_layers,
        r.saved_attention,
        r.cached_weight_layers,
        if r.hold_mlp_weights { ", MLP weights once per pass" } else { "" }
    );
    println!("step          median {:.1} ms over {} steps → {:.0} tokens/s", r.median_step_ms, r.steps, r.tokens_per_s);
    println!(
        "memory        driver peak {:.2} GiB, arena peak {:.2} GiB (+ context {:.2} GiB); plan {:.2} GiB",
        gib(r.peak_driver_bytes),
        gib(r.peak_arena_bytes),
        gib(r.context_bytes),
        gib(r.plan_peak_bytes)
    );
    println!(
        "MFU           {:.1}% ({:.1} TFLOP per step against the measured {:.0} TFLOP/s GEMM rate)",
        100.0 * r.mfu,
        r.model_tflop_per_step,
        r.gemm_tflops
    );
    println!("first step    {:.1} s after start (set-up {:.1} s)", r.first_step_s, r.setup_s);
    Ok(())
}

#[derive(Debug, Clone, clap::Args)]
pub struct BenchGenerateArgs {
    /// llama3-8b, llama3.2-3b or llama3.2-1b.
    #[arg(long, default_value = "llama3-8b")]
    pub shape: String,
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    #[arg(long, default_value_t = 512)]
    pub prompt_tokens: usize,
    #[arg(long, default_value_t = 128)]
    pub new_tokens: usize,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

pub fn run_generate(a: &BenchGenerateArgs) -> Result<()> {
    use crate::generate::bench::{DecodeBenchArgs, run};
    let args = DecodeBenchArgs { shape: a.shape.clone(), rank: a.rank, prompt_tokens: a.prompt_tokens, new_tokens: a.new_tokens };
    let r = run(&args, &|m| eprintln!("{m}"))?;
    if a.json {
        println!("{}", serde_json::to_string(&r).expect("json"));
    } else {
        println!(
            "{} {} NF4 + LoRA r {}: prefill {} tokens {:.0} tokens/s; decode {:.1} tokens/s ({:.2} ms per token)",
            r.card, r.shape, r.rank, r.prompt_tokens, r.prefill_tokens_per_s, r.decode_tokens_per_s, r.decode_ms_per_token
        );
    }
    Ok(())
}
