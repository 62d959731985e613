//! The one table of kernels: which `kernels/*.cu` file holds each symbol, and the PTX embedded
//! for it. `kernels/build.sh` writes `<file>.sm90.ptx` (Hopper) and `<file>.sm80.ptx` (a
//! compute_80 build the driver JIT-compiles for any Ampere, Ada or Hopper card); each starts with
//! a line `// source-sha256 <hex> ...` that `tests/ptx_fresh.rs` checks against the sources.

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
    }
    swiglu {
        SwigluFwd = "swiglu_fwd",
        SwigluBwd = "swiglu_bwd",
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
        Adamw = "adamw",
    }
    reduce {
        SumsqPartialF32 = "sumsq_partial_f32",
        SumsqPartialBf16 = "sumsq_partial_bf16",
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
        AttnBwdDkdv32 = "attn_bwd_dkdv_32",
        AttnBwdDq32 = "attn_bwd_dq_32",
        AttnFwd64 = "attn_fwd_64",
        AttnBwdDkdv64 = "attn_bwd_dkdv_64",
        AttnBwdDq64 = "attn_bwd_dq_64",
        AttnFwd96 = "attn_fwd_96",
        AttnBwdDkdv96 = "attn_bwd_dkdv_96",
        AttnBwdDq96 = "attn_bwd_dq_96",
        AttnFwd128 = "attn_fwd_128",
        AttnBwdDkdv128 = "attn_bwd_dkdv_128",
        AttnBwdDq128 = "attn_bwd_dq_128",
        Attn2Fwd64 = "attn2_fwd_64",
        Attn2BwdDkdv64 = "attn2_bwd_dkdv_64",
        Attn2BwdDq64 = "attn2_bwd_dq_64",
        Attn2Fwd128 = "attn2_fwd_128",
        Attn2BwdDkdv128 = "attn2_bwd_dkdv_128",
        Attn2BwdDq128 = "attn2_bwd_dq_128",
        Attn3Fwd64 = "attn3_fwd_64",
        Attn3BwdPrep64 = "attn3_bwd_prep_64",
        Attn3Bwd64 = "attn3_bwd_64",
        Attn3Fwd128 = "attn3_fwd_128",
        Attn3BwdPrep128 = "attn3_bwd_prep_128",
        Attn3Bwd128 = "attn3_bwd_128",
        Attn3AccToBf16 = "attn3_acc_to_bf16",
    }
}

/// Which attention kernels run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AttnVersion {
    /// Version 1: WMMA, scores through shared memory (every head_dim in 32, 64, 96, 128).
    V1,
    /// Version 2: mma.sync + ldmatrix, scores in registers, cp.async double buffering (64, 128).
    V2,
    /// Version 3 (64, 128): swizzled tiles, 32 query rows per warp in the forward, one fused
    /// backward kernel per (query head, key tile) with f32 accumulation of dQ, dK, dV in the
    /// backend's attention scratch. Where it does not apply the backend falls back to V2, then V1.
    V3,
}

/// The environment variable that picks the attention kernels a CUDA backend prefers (read once,
/// when the backend is created): `v1`, `v2` or `v3` (the default). `TUNESTUDIO_ATTN` is its old
/// name and is read when this one is unset.
pub const ATTENTION_ENV: &str = "TUNESTUDIO_ATTENTION";

impl AttnVersion {
    /// `v1`, `v2`, `v3` (any case, surrounding blanks ignored).
    pub fn parse(s: &str) -> Option<AttnVersion> {
        match s.trim().to_ascii_lowercase().as_str() {
            "v1" => Some(AttnVersion::V1),
            "v2" => Some(AttnVersion::V2),
            "v3" => Some(AttnVersion::V3),
            _ => None,
        }
    }

    /// The version [`ATTENTION_ENV`] selects (version 3 when unset or empty), or the offending
    /// value when it names no version.
    pub fn from_env() -> std::result::Result<AttnVersion, String> {
        let var = std::env::var(ATTENTION_ENV).or_else(|_| std::env::var("TUNESTUDIO_ATTN"));
        match var {
            Ok(v) if !v.trim().is_empty() => AttnVersion::parse(&v).ok_or(v),
            _ => Ok(AttnVersion::V3),
        }
    }
}

/// The attention kernels for one head dimension: (forward, backward dK/dV, backward dQ). V3 gets
/// version 2's here: its fallback where a sequence's backward does not fit the attention scratch.
pub fn attention_kernels(head_dim: usize, version: AttnVersion) -> Option<(Kernel, Kernel, Kernel)> {
    use Kernel::*;
    Some(match (version, head_dim) {
        (AttnVersion::V1, 32) => (AttnFwd32, AttnBwdDkdv32, AttnBwdDq32),
        (AttnVersion::V1, 64) => (AttnFwd64, AttnBwdDkdv64, AttnBwdDq64),
        (AttnVersion::V1, 96) => (AttnFwd96, AttnBwdDkdv96, AttnBwdDq96),
        (AttnVersion::V1, 128) => (AttnFwd128, AttnBwdDkdv128, AttnBwdDq128),
        (AttnVersion::V2 | AttnVersion::V3, 64) => (Attn2Fwd64, Attn2BwdDkdv64, Attn2BwdDq64),
        (AttnVersion::V2 | AttnVersion::V3, 128) => (Attn2Fwd128, Attn2BwdDkdv128, Attn2BwdDq128),
        _ => return None,
    })
}

/// Version 3's kernels for one head dimension: (forward, backward preparation, backward).
pub fn attention3_kernels(head_dim: usize) -> Option<(Kernel, Kernel, Kernel)> {
    use Kernel::*;
    match head_dim {
        64 => Some((Attn3Fwd64, Attn3BwdPrep64, Attn3Bwd64)),
        128 => Some((Attn3Fwd128, Attn3BwdPrep128, Attn3Bwd128)),
        _ => None,
    }
}

/// Query rows of a version-3 forward block; keys of a version-3 backward block.
pub const ATTN3_FWD_ROWS: usize = 128;
pub const ATTN3_BWD_KEYS: usize = 64;

/// Dynamic shared memory of version 3's forward and backward, from the formulas of `struct
/// Att3<HD>` in `kernels/attention.cu` (the kernels trap if given less).
pub fn attention3_smem_bytes(head_dim: usize) -> [u32; 2] {
    let (qt, kt) = (ATTN3_FWD_ROWS, ATTN3_BWD_KEYS);
    let fwd = (qt * head_dim + 4 * kt * head_dim) * 2 + (qt + 2 * kt) * 4;
    let bwd = (6 * kt * head_dim + kt * kt) * 2 + 7 * kt * 4;
    [fwd as u32, bwd as u32]
}

/// Dynamic shared memory of the attention kernels (forward, dK/dV, dQ), from the same formulas as
/// `struct Att<HD>` / `struct Att2<HD>` in `kernels/attention.cu` (the kernels trap if given less).
pub fn attention_smem_bytes(head_dim: usize, version: AttnVersion) -> [u32; 3] {
    let (rows, warps) = (64, 4);
    let ldt = head_dim + 8;
    let tile = rows * ldt;
    let sizes = match version {
        AttnVersion::V1 => {
            let (lds, ldo, ldp) = (68, head_dim + 4, rows + 8);
            let fwd_scr = 16 * ldo.max(lds);
            [
                3 * tile * 2 + warps * fwd_scr * 4 + warps * 16 * ldp * 2 + 2 * rows * 4,
                4 * tile * 2 + warps * 16 * lds * 4 + 2 * warps * 16 * ldp * 2 + 4 * rows * 4,
                4 * tile * 2 + warps * 16 * lds * 4 + warps * 16 * ldp * 2 + 4 * rows * 4,
            ]
        }
        AttnVersion::V2 | AttnVersion::V3 => [5 * tile * 2 + 3 * rows * 4, 6 * tile * 2 + 6 * rows * 4, 6 * tile * 2 + 5 * rows * 4],
    };
    sizes.map(|b| b as u32)
}

/// The hash line at the top of a PTX file: `// source-sha256 <hex> ...`.
pub fn ptx_source_hash(ptx: &str) -> Option<&str> {
    ptx.lines().next()?.strip_prefix("// source-sha256 ")?.split_whitespace().next()
}

/// SHA-256 of `data` as lowercase hex (FIPS 180-4), for the PTX freshness check.
pub fn sha256_hex(data: &[u8]) -> String {
    const K: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be,
        0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa,
        0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85,
        0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3,
        0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f,
        0x682e6ff3, 0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
    ];
    let mut h: [u32; 8] = [0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19];
    let mut msg = data.to_vec();
    let bit_len = (data.len() as u64).wrapping_mul(8);
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&bit_len.to_be_bytes());
    for block in msg.chunks_exact(64) {
        let mut w = [0u32; 64];
        for (i, word) in block.chunks_exact(4).enumerate() {
            w[i] = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
        }
        for i in 16..64 {
            let s0 = w[i - 15].rotate_right(7) ^ w[i - 15].rotate_right(18) ^ (w[i - 15] >> 3);
            let s1 = w[i - 2].rotate_right(17) ^ w[i - 2].rotate_right(19) ^ (w[i - 2] >> 10);
            w[i] = w[i - 16].wrapping_add(s0).wrapping_add(w[i - 7]).wrapping_add(s1);
        }
        let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut hh] = h;
        for i in 0..64 {
            let s1 = e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25);
            let ch = (e & f) ^ (!e & g);
            let t1 = hh.wrapping_add(s1).wrapping_add(ch).wrapping_add(K[i]).wrapping_add(w[i]);
            let s0 = a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22);
            let maj = (a & b) ^ (a & c) ^ (b & c);
            let t2 = s0.wrapping_add(maj);
            hh = g;
            g = f;
            f = e;
            e = d.wrapping_add(t1);
            d = c;
            c = b;
            b = a;
            a = t1.wrapping_add(t2);
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e, f, g, hh]) {
            *x = x.wrapping_add(y);
        }
    }
    h.iter().map(|x| format!("{x:08x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_known_answers() {
        assert_eq!(sha256_hex(b""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        assert_eq!(sha256_hex(b"abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        let long = b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
        assert_eq!(sha256_hex(long), "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
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
