//! The one table of kernels: which `kernels/*.cu` file holds each symbol, and the PTX embedded
//! for it. `kernels/build.sh` writes `<file>.sm90.ptx` (Hopper) and `<file>.sm80.ptx` (a
//! compute_80 build the driver JIT-compiles for any Ampere, Ada or Hopper card); each starts with
//! a line `// source-sha256 <hex> ...` that `tests/ptx_fresh.rs` checks against the sources.
//! Which attention instance a card runs is decided here too ([`attention_kernels_for`]).

use crate::backend::card::CardLimits;

/// A kernel source file and its two PTX builds.
pub struct KernelFile {
    /// Stem of `kernels/<name>.cu`.
    pub name: &'static str,
    pub sm90: &'static str,
    pub sm80: &'static str,
}

macro_rules! kernel_table {
    ($($file:ident { $($variant:ident = $symbol:literal),* $(,)? })*) => {
        /// Every kernel the backend launches.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[allow(clippy::enum_variant_names)]
        pub enum Kernel {
            $($($variant,)*)*
        }

        impl Kernel {
            pub const ALL: &'static [Kernel] = &[$($(Kernel::$variant,)*)*];

            /// The `extern "C"` symbol in the PTX.
            pub fn symbol(self) -> &'static str {
                match self {
                    $($(Kernel::$variant => $symbol,)*)*
                }
            }

            /// Index into [`FILES`] of the file that defines the kernel.
            pub fn file(self) -> usize {
                let files: &[&[Kernel]] = &[$(&[$(Kernel::$variant),*]),*];
                files.iter().position(|f| f.contains(&self)).expect("every kernel is in a file")
            }
        }

        /// Every kernel file, in table order.
        pub const FILES: &[KernelFile] = &[$(
            KernelFile {
                name: stringify!($file),
                sm90: include_str!(concat!("../../../kernels/", stringify!($file), ".sm90.ptx")),
                sm80: include_str!(concat!("../../../kernels/", stringify!($file), ".sm80.ptx")),
            },
        )*];
    };
}

kernel_table! {
    elementwise {
        AddBf16 = "add_bf16",
        AddF32 = "add_f32",
        CastF32Bf16 = "cast_f32_bf16",
        CastBf16F32 = "cast_bf16_f32",
        FillBf16 = "fill_bf16",
        FillF32 = "fill_f32",
        ScaleBf16 = "scale_bf16",
        ScaleF32 = "scale_f32",
    }
    swiglu {
        SwigluFwd = "swiglu_fwd",
        SwigluBwd = "swiglu_bwd",
    }
    geglu {
        GegluFwd = "geglu_fwd",
        GegluBwd = "geglu_bwd",
    }
    dropout {
        DropoutFwd = "dropout_fwd",
        DropoutBwd = "dropout_bwd",
    }
    rmsnorm {
        RmsnormFwd = "rmsnorm_fwd",
        RmsnormBwd = "rmsnorm_bwd",
    }
    rope {
        Rope = "rope",
    }
    embedding {
        EmbeddingFwd = "embedding_fwd",
        EmbeddingBwdRows = "embedding_bwd_rows",
        SetRowsBf16F32 = "set_rows_bf16_f32",
        SetRowsBf16Bf16 = "set_rows_bf16_bf16",
        SetRowsF32F32 = "set_rows_f32_f32",
        SetRowsF32Bf16 = "set_rows_f32_bf16",
    }
    adamw {
        AdamwMulti = "adamw_multi",
    }
    reduce {
        SumsqPartialMulti = "sumsq_partial_multi",
        SumPartials = "sum_partials",
    }
    nf4 {
        Nf4Dequant = "nf4_dequant",
    }
    cross_entropy {
        CeSoftmaxGrad = "ce_softmax_grad",
        CeChunkSum = "ce_chunk_sum",
        CeHeadRows = "ce_head_rows",
    }
    gemm_fallback {
        GemmFallback = "gemm_fallback",
    }
    generate {
        GemvNf4 = "gemv_nf4",
        GemvBf16 = "gemv_bf16",
        KvStore = "kv_store",
        AttnCachedPart = "attn_cached_part",
        AttnCachedCombine = "attn_cached_combine",
        ScaleRowsBf16 = "scale_rows_bf16",
    }
    attention {
        AttnFwd32 = "attn_fwd_32",
        AttnFwd64 = "attn_fwd_64",
        AttnFwd96 = "attn_fwd_96",
        AttnFwd128 = "attn_fwd_128",
        AttnFwd256 = "attn_fwd_256",
        AttnFwd256Ks1 = "attn_fwd_256_ks1",
        AttnBwd32 = "attn_bwd_32",
        AttnBwd64 = "attn_bwd_64",
        AttnBwd96 = "attn_bwd_96",
        AttnBwd96S1 = "attn_bwd_96_s1",
        AttnBwd128 = "attn_bwd_128",
        AttnBwd128S1 = "attn_bwd_128_s1",
        AttnBwd256 = "attn_bwd_256",
        AttnBwd256S1 = "attn_bwd_256_s1",
        AttnBwd256T32 = "attn_bwd_256_t32",
        AttnBwdPrep32 = "attn_bwd_prep_32",
        AttnBwdPrep64 = "attn_bwd_prep_64",
        AttnBwdPrep96 = "attn_bwd_prep_96",
        AttnBwdPrep128 = "attn_bwd_prep_128",
        AttnBwdPrep256 = "attn_bwd_prep_256",
        AttnAccToBf16 = "attn_acc_to_bf16",
    }
}

/// Head dims the attention kernels are instantiated for.
pub const ATTN_HEAD_DIMS: [usize; 5] = [32, 64, 96, 128, 256];

/// Keys per tile of the attention forward (`AttFwd::KT` in `kernels/attention.cu`).
const ATTN_FWD_KEYS: usize = 64;
/// Warps of an attention forward block (`ATT_WARPS`).
const ATTN_WARPS: usize = 4;

/// Shared-memory row width of an attention tile: the head dim rounded up to 64 columns
/// (`att_width` in `kernels/attention.cu`: the swizzle permutes groups of 64 columns).
fn attn_tile_width(head_dim: usize) -> usize {
    head_dim.div_ceil(64) * 64
}

/// An instance of the attention forward: `AttFwd<HD, MT, KS>` of `kernels/attention.cu`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnFwdVariant {
    pub kernel: Kernel,
    pub head_dim: usize,
    /// m16 tiles per warp (query rows per warp / 16).
    pub m_tiles: usize,
    /// K/V tile buffers (2: the next tile loads during this one's math).
    pub key_stages: usize,
}

impl AttnFwdVariant {
    /// Query rows of a block.
    pub const fn rows(&self) -> usize {
        ATTN_WARPS * 16 * self.m_tiles
    }
    pub const fn threads(&self) -> u32 {
        (ATTN_WARPS * 32) as u32
    }
    /// Dynamic shared memory: `AttFwd::SMEM`.
    pub fn smem_bytes(&self) -> u32 {
        let (w, rows, kt) = (attn_tile_width(self.head_dim), self.rows(), ATTN_FWD_KEYS);
        ((rows * w + 2 * self.key_stages * kt * w) * 2 + (rows + self.key_stages * kt) * 4) as u32
    }
}

/// An instance of the attention backward: `AttBwd<HD, NW, S, DC>` of `kernels/attention.cu`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnBwdVariant {
    pub kernel: Kernel,
    pub head_dim: usize,
    /// Warps of a block; keys per block = 16 per warp.
    pub warps: usize,
    /// Q/dO tile buffers.
    pub stages: usize,
    /// Columns of dQ, dK and dV one block accumulates (the head dim, or a slice of it).
    pub cols: usize,
}

impl AttnBwdVariant {
    /// Keys of a block (and query rows of each of its steps).
    pub const fn keys(&self) -> usize {
        16 * self.warps
    }
    pub const fn threads(&self) -> u32 {
        (32 * self.warps) as u32
    }
    /// Blocks per (head, key tile): column slices of the head dim.
    pub const fn splits(&self) -> usize {
        self.head_dim / self.cols
    }
    /// Dynamic shared memory: `AttBwd::SMEM`.
    pub fn smem_bytes(&self) -> u32 {
        let (w, t, s) = (attn_tile_width(self.head_dim), self.keys(), self.stages);
        let ds_width = t.max(64);
        ((2 * t * w + 2 * s * t * w + t * ds_width) * 2 + (3 * s * t + t) * 4) as u32
    }
}

const fn fwd(kernel: Kernel, head_dim: usize, m_tiles: usize, key_stages: usize) -> AttnFwdVariant {
    AttnFwdVariant { kernel, head_dim, m_tiles, key_stages }
}
const fn bwd(kernel: Kernel, head_dim: usize, warps: usize, stages: usize, cols: usize) -> AttnBwdVariant {
    AttnBwdVariant { kernel, head_dim, warps, stages, cols }
}

/// Every attention forward instance, fastest first within a head dim: a card runs the first of
/// its head dim that fits its shared memory.
pub const ATTN_FWD_VARIANTS: &[AttnFwdVariant] = &[
    fwd(Kernel::AttnFwd32, 32, 2, 2),
    fwd(Kernel::AttnFwd64, 64, 2, 2),
    fwd(Kernel::AttnFwd96, 96, 2, 2),
    fwd(Kernel::AttnFwd128, 128, 2, 2),
    fwd(Kernel::AttnFwd256, 256, 1, 2),
    fwd(Kernel::AttnFwd256Ks1, 256, 1, 1),
];

/// Every attention backward instance, fastest first within a head dim.
pub const ATTN_BWD_VARIANTS: &[AttnBwdVariant] = &[
    bwd(Kernel::AttnBwd32, 32, 4, 2, 32),
    bwd(Kernel::AttnBwd64, 64, 4, 2, 64),
    bwd(Kernel::AttnBwd96, 96, 4, 2, 96),
    bwd(Kernel::AttnBwd96S1, 96, 4, 1, 96),
    bwd(Kernel::AttnBwd128, 128, 4, 2, 128),
    bwd(Kernel::AttnBwd128S1, 128, 4, 1, 128),
    bwd(Kernel::AttnBwd256, 256, 4, 2, 128),
    bwd(Kernel::AttnBwd256S1, 256, 4, 1, 128),
    bwd(Kernel::AttnBwd256T32, 256, 2, 1, 128),
];

/// The kernel computing D = rowsum(dO∘O) for a head dim.
fn attn_prep_kernel(head_dim: usize) -> Option<Kernel> {
    Some(match head_dim {
        32 => Kernel::AttnBwdPrep32,
        64 => Kernel::AttnBwdPrep64,
        96 => Kernel::AttnBwdPrep96,
        128 => Kernel::AttnBwdPrep128,
        256 => Kernel::AttnBwdPrep256,
        _ => return None,
    })
}

/// The attention kernels one card runs for one head dim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnKernels {
    pub fwd: AttnFwdVariant,
    pub bwd: AttnBwdVariant,
    pub prep: Kernel,
}

/// What the CUDA backend runs for attention at `head_dim` on `card`: the fastest forward and
/// backward instances whose shared memory fits the card's per-block limit. Registers always fit
/// (every instance caps itself at 255 registers per thread and at most 128 threads a block, within
/// the 64 K registers of every SM since compute capability 8.0). The backend creates its kernels
/// through this function and a CPU test runs it for every card profile, so "fits" is checked
/// by the same code on every machine. `Err` says which head dim, which limit and what to do (the
/// caller names the card).
pub fn attention_kernels_for(card: &CardLimits, head_dim: usize) -> Result<AttnKernels, String> {
    let supported = || ATTN_HEAD_DIMS.map(|d| d.to_string()).join(", ");
    let prep = attn_prep_kernel(head_dim)
        .ok_or_else(|| format!("head_dim {head_dim} is not one the attention kernels cover ({}): this model cannot run on the CUDA engine; train it on the CPU", supported()))?;
    let limit = card.smem_per_block_optin;
    let too_big = |what: &str, least: u32| {
        format!(
            "the attention {what} for head_dim {head_dim} needs at least {least} bytes of shared memory per block and the card allows {limit}; train on the CPU or on a card with more shared memory per block"
        )
    };
    let fwds = ATTN_FWD_VARIANTS.iter().filter(|v| v.head_dim == head_dim);
    let fwd = fwds.clone().find(|v| v.smem_bytes() <= limit).copied();
    let fwd = fwd.ok_or_else(|| too_big("forward", fwds.map(|v| v.smem_bytes()).min().unwrap_or(0)))?;
    let bwds = ATTN_BWD_VARIANTS.iter().filter(|v| v.head_dim == head_dim);
    let bwd = bwds.clone().find(|v| v.smem_bytes() <= limit).copied();
    let bwd = bwd.ok_or_else(|| too_big("backward", bwds.map(|v| v.smem_bytes()).min().unwrap_or(0)))?;
    Ok(AttnKernels { fwd, bwd, prep })
}

/// The hash line at the top of a PTX file: `// source-sha256 <hex> ...`.
pub fn ptx_source_hash(ptx: &str) -> Option<&str> {
    ptx.lines().next()?.strip_prefix("// source-sha256 ")?.split_whitespace().next()
}

/// SHA-256 of `data` as lowercase hex, for the PTX freshness check.
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_of_a_known_input() {
        assert_eq!(sha256_hex(b"abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }

    #[test]
    fn shared_memory_follows_the_kernel_formulas() {
        // Values from the formulas' comments in kernels/attention.cu, worked by hand.
        let f = |k| ATTN_FWD_VARIANTS.iter().find(|v| v.kernel == k).unwrap().smem_bytes();
        let b = |k| ATTN_BWD_VARIANTS.iter().find(|v| v.kernel == k).unwrap().smem_bytes();
        assert_eq!(f(Kernel::AttnFwd128), (128 * 128 + 4 * 64 * 128) * 2 + (128 + 128) * 4);
        assert_eq!(f(Kernel::AttnFwd96), f(Kernel::AttnFwd128), "head dim 96 uses 128-wide tiles");
        assert_eq!(f(Kernel::AttnFwd256Ks1), (64 * 256 + 2 * 64 * 256) * 2 + (64 + 64) * 4);
        assert_eq!(b(Kernel::AttnBwd128), (6 * 64 * 128 + 64 * 64) * 2 + 7 * 64 * 4);
        assert_eq!(b(Kernel::AttnBwd128S1), (4 * 64 * 128 + 64 * 64) * 2 + 4 * 64 * 4);
        assert_eq!(b(Kernel::AttnBwd256T32), (4 * 32 * 256 + 32 * 64) * 2 + 4 * 32 * 4);
    }

    #[test]
    fn the_deepest_instance_that_fits_is_chosen() {
        use crate::backend::card::profile_named;
        let pick = |card: &str, hd| attention_kernels_for(&profile_named(card).unwrap().limits(), hd).unwrap();
        assert_eq!(pick("h100-80", 128).bwd.kernel, Kernel::AttnBwd128);
        assert_eq!(pick("rtx4090", 128).bwd.kernel, Kernel::AttnBwd128S1);
        assert_eq!(pick("rtx4090", 128).fwd.kernel, Kernel::AttnFwd128);
        assert_eq!(pick("h100-80", 256).bwd.kernel, Kernel::AttnBwd256);
        assert_eq!(pick("a100-40", 256).bwd.kernel, Kernel::AttnBwd256S1);
        assert_eq!(pick("a100-40", 256).fwd.kernel, Kernel::AttnFwd256);
        assert_eq!(pick("l4", 256).bwd.kernel, Kernel::AttnBwd256T32);
        assert_eq!(pick("l4", 256).fwd.kernel, Kernel::AttnFwd256Ks1);
        let e = attention_kernels_for(&profile_named("l4").unwrap().limits(), 80).unwrap_err();
        assert!(e.contains("head_dim 80") && e.contains("32, 64, 96, 128, 256"), "{e}");
        let mut tiny = profile_named("l4").unwrap().limits();
        tiny.smem_per_block_optin = 48 * 1024;
        let e = attention_kernels_for(&tiny, 128).unwrap_err();
        assert!(
            e.contains("49152") && e.contains("head_dim 128") && e.contains("attention forward") && e.contains("at least 99328"),
            "{e}"
        );
    }

    #[test]
    fn every_kernel_is_in_its_ptx() {
        for &k in Kernel::ALL {
            let f = &FILES[k.file()];
            let entry = format!(".entry {}(", k.symbol());
            assert!(f.sm90.contains(&entry) && f.sm80.contains(&entry), "{} missing from {}.*.ptx", k.symbol(), f.name);
        }
    }
}
