//! NF4 with double quantization, reproducing bitsandbytes 0.50 bit for bit:
//! `quantize_4bit(A, blocksize=64, quant_type="nf4", compress_statistics=True)` as it runs on a
//! CUDA device, and `dequantize_4bit` of its output.
//!
//! What is stored (the layout a `*-bnb-4bit` checkpoint holds and the CUDA kernels read):
//! - `packed`: two 4-bit NF4 indices per byte over the flattened tensor, the element with the
//!   lower index in the HIGH nibble; `ceil(numel / 2)` bytes.
//! - the absmax of each block of 64 elements, itself quantized: `offset` is the mean of all
//!   absmax values, and `absmax - offset` is quantized in blocks of 256 with the signed 8-bit
//!   dynamic code (`code2`), giving one byte per 64-block (`absmax_q`) and one f32 per
//!   256 absmax values (`absmax2`).
//!
//! bitsandbytes is built with `nvcc --use_fast_math`, and that is visible in its results, so this
//! file models what the GPU does rather than what the CUDA source says in exact arithmetic:
//! - `1.0f / absmax` is the hardware reciprocal (SASS `MUFU.RCP`), which is one ulp off the
//!   correctly rounded value for about 13% of mantissas. [`gpu_rcp`] reproduces it from a table
//!   measured on an H100 (see `nf4_rcp_sm90.bin`).
//! - every float multiply, add and compare in the kernels flushes subnormals to zero (`.FTZ`).
//!   Only tensors with subnormal values or absmax notice; we flush where the kernel does.
//!
//! Where each rule was read: `bitsandbytes/functional.py` (quantize_4bit, quantize_blockwise,
//! create_dynamic_map, get_4bit_type, QuantState.as_dict/from_dict), `backends/cuda/ops.py`
//! (output shapes), `csrc/kernels.cu` (kQuantizeBlockwise, dQuantizeNF4, dQuantize,
//! kDequantizeBlockwise), `CMakeLists.txt` (`--use_fast_math`), PyTorch's `linspace` and CUDA
//! `mean` kernels, and the SASS of `libbitsandbytes_cuda130.so` from the 0.50.2 wheel.

use std::path::Path;

use half::bf16;
use rayon::prelude::*;
use safetensors::Dtype;

use crate::error::{Error, Result};

/// Elements per first-level block (bitsandbytes' default for 4-bit).
pub const BLOCKSIZE: usize = 64;
/// absmax values per second-level block (`quantize_blockwise(..., blocksize=256)` in quantize_4bit).
pub const NESTED_BLOCKSIZE: usize = 256;

/// Where a GPU keeps the parts of an NF4 tensor of `numel` elements inside its one buffer, as
/// (offset, bytes): packed nibbles, one 8-bit absmax per 64-block, one f32 per 256 absmax, the
/// 256-entry f32 code (bitsandbytes' layout; the offset is a kernel argument). Each part starts
/// at a 16-byte boundary, which the kernels' vector loads need.
pub fn device_parts(numel: usize) -> [(usize, usize); 4] {
    let blocks = numel.div_ceil(BLOCKSIZE);
    let sizes = [numel.div_ceil(2), blocks, blocks.div_ceil(NESTED_BLOCKSIZE) * 4, 256 * 4];
    let mut offset = 0;
    sizes.map(|bytes| {
        let at = offset;
        offset = (offset + bytes).next_multiple_of(16);
        (at, bytes)
    })
}

/// Bytes of that buffer ([`device_parts`]).
pub fn device_bytes(numel: usize) -> usize {
    let [.., (at, bytes)] = device_parts(numel);
    at + bytes
}

/// bitsandbytes' NF4 table (`get_4bit_type("nf4")`): quantiles of N(0, 1) scaled to [-1, 1],
/// indexed by the 4-bit code. The literals are the f32 values bnb stores, printed as doubles.
#[allow(clippy::excessive_precision)]
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
];

/// The decision thresholds of the CUDA kernel's NF4 tree (`dQuantizeNF4`), ascending: each is the
/// midpoint of two neighbouring codes, rounded by bnb once in double and then to f32, so they are
/// given as the exact f32 bit patterns the compiled kernel compares against (read from its SASS).
/// The kernel walks a balanced tree of strict `>` tests, so its answer equals the number of
/// thresholds that `x` is strictly above; a value equal to a threshold takes the lower code, and
/// NaN takes code 0.
const NF4_THRESHOLDS: [u32; 15] = [
    0xbf59_1cd9, // -0.84809643
    0xbf1c_5270, // -0.61063290
    0xbeeb_8480, // -0.45999527
    0xbead_ea76, // -0.33967942
    0xbe70_3cec, // -0.23460740
    0xbe0d_38bc, // -0.13791174
    0xbd3a_7871, // -0.04552502
    0x3d22_faff, //  0.03979015
    0x3df6_4863, //  0.12025525
    0x3e50_67e0, //  0.20352125
    0x3e95_82d4, //  0.29201376
    0x3ec7_53f9, //  0.38931254
    0x3f00_6d03, //  0.50166339
    0x3f24_8daf, //  0.64278692
    0x3f5c_89d9, //  0.86147839
];

/// One bit per f32 mantissa: set where the H100's `MUFU.RCP` (what `1.0f / x` becomes under
/// `--use_fast_math`) returns the other neighbour of the exact reciprocal than round-to-nearest
/// does. Measured for all 2^23 mantissas (`tests/interop/make_nf4_fixtures.py --rcp-table`), the
/// same on an H100 and an H200; the pattern was the same at every exponent tried (2^-126 to
/// 2^100), and the hardware result was always one of the two floats around the exact value, so a
/// bit is all it takes. With bf16 inputs it never changes a 4-bit code (checked for every pair of
/// bf16 value and absmax); it changes an 8-bit absmax code about once in a million, which the
/// `rcp_flip_*` fixtures pin down.
static RCP_OTHER_NEIGHBOUR: &[u8; 1 << 20] = include_bytes!("nf4_rcp_sm90.bin");

/// Flush a subnormal to a zero of the same sign, as every `.FTZ` instruction does.
#[inline(always)]
fn ftz(x: f32) -> f32 {
    if x.is_subnormal() { 0.0f32.copysign(x) } else { x }
}

/// `FMUL.FTZ`: subnormal inputs and results become zero.
#[inline(always)]
fn fmul_ftz(a: f32, b: f32) -> f32 {
    ftz(ftz(a) * ftz(b))
}

/// The GPU's `rcp.approx.ftz.f32` (SASS `MUFU.RCP`) — the value bnb's kernels scale by.
pub fn gpu_rcp(x: f32) -> f32 {
    let x = ftz(x);
    if x.is_nan() {
        return x;
    }
    if x == 0.0 {
        return f32::INFINITY.copysign(x);
    }
    let a = x.abs();
    let r = 1.0 / a; // correctly rounded; infinity gives 0
    if r < f32::MIN_POSITIVE {
        return 0.0f32.copysign(x);
    }
    let m = (a.to_bits() & 0x7f_ffff) as usize;
    let r = if (RCP_OTHER_NEIGHBOUR[m >> 3] >> (m & 7)) & 1 == 1 {
        // Both operands have 24-bit significands, so the product is exact in f64: it tells on
        // which side of the true reciprocal round-to-nearest landed.
        if f64::from(r) * f64::from(a) < 1.0 { f32::from_bits(r.to_bits() + 1) } else { f32::from_bits(r.to_bits() - 1) }
    } else {
        r
    };
    ftz(r).copysign(x)
}

/// NF4 index of a value already scaled into [-1, 1], as the kernel's threshold tree picks it.
#[inline(always)]
fn nf4_index(x: f32) -> u8 {
    let mut q = 0u8;
    for &t in &NF4_THRESHOLDS {
        q += (x > f32::from_bits(t)) as u8;
    }
    q
}

/// The signed 8-bit dynamic code, `create_dynamic_map(signed=True)`, built in f32 as bnb builds it
/// with torch on the CPU: for exponent step i in 0..7, `2^i + 1` points `linspace(0.1, 1)`, the
/// means of neighbouring points, scaled by `10^(i-6)`, each with its negative; then 0 and 1, sorted.
pub fn dynamic_map_signed() -> [f32; 256] {
    // `10 ** (i - 6)` is a Python float for i < 6, which torch rounds to f32 before multiplying; for
    // i = 6 it is the integer 1.
    const SCALES: [f64; 7] = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0];
    let mut vals: Vec<f32> = Vec::with_capacity(256);
    for (i, &scale) in SCALES.iter().enumerate() {
        let points = linspace_like_torch(0.1, 1.0, (1 << i) + 1);
        for pair in points.windows(2) {
            let mean = (pair[0] + pair[1]) / 2.0;
            let v = scale as f32 * mean;
            vals.push(v);
            vals.push(-v);
        }
    }
    vals.push(0.0);
    vals.push(1.0);
    vals.sort_by(f32::total_cmp);
    let mut code = [0f32; 256];
    code.copy_from_slice(&vals);
    code
}

/// `torch.linspace(start, end, steps, dtype=float32)` on the CPU: the first half counts up from
/// `start`, the second half down from `end`, with `step` in f32. Each point is rounded once
/// (`start + step * i` fused), which is what torch's build produces: the table this gives equals
/// the dynamic map printed from bnb (and the GPU fixtures' `code2`), while rounding the product
/// separately changes 42 of the 256 entries.
fn linspace_like_torch(start: f32, end: f32, steps: usize) -> Vec<f32> {
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps).map(|i| if i < halfway { step.mul_add(i as f32, start) } else { (-step).mul_add((steps - i - 1) as f32, end) }).collect()
}

/// The kernel's 8-bit search (`dQuantize<0>`): a 7-step binary search over the sorted code, then
/// the nearer of the two neighbours by comparing with their midpoint (strictly, so a value on the
/// midpoint stays at the search's pivot).
fn dynamic_index(code: &[f32; 256], x: f32) -> u8 {
    let (mut pivot, mut upper_pivot, mut lower_pivot) = (127usize, 255usize, 0usize);
    let (mut lower, mut upper) = (-1.0f32, 1.0f32);
    let mut val = code[pivot];
    let mut step = 64;
    while step > 0 {
        if x > val {
            lower_pivot = pivot;
            lower = val;
            pivot += step;
        } else {
            upper_pivot = pivot;
            upper = val;
            pivot -= step;
        }
        val = code[pivot];
        step >>= 1;
    }
    if upper_pivot == 255 {
        upper = code[255];
    }
    if lower_pivot == 0 {
        lower = code[0];
    }
    let q = if x > val {
        let mid = fmul_ftz(ftz(upper + val), 0.5);
        if x > mid { upper_pivot } else { pivot }
    } else {
        let mid = fmul_ftz(ftz(lower + val), 0.5);
        if x < mid { lower_pivot } else { pivot }
    };
    q as u8
}

/// The kernel's block absmax: `fmaxf` over `|x|` (flushed) starting from `-FLT_MAX`. In a partial
/// block the zero padding that fills the kernel's tile takes part too, which changes nothing
/// unless every real value is NaN.
fn block_absmax(vals: impl Iterator<Item = f32>, partial: bool) -> f32 {
    let start = if partial { 0.0 } else { -f32::MAX };
    vals.fold(start, |m, v| m.max(ftz(v).abs()))
}

/// `torch.mean` of an f32 CUDA tensor is `sum * (1.0f / n)`, the sum accumulated in f32 by a
/// tree whose shape depends on the launch. We sum in f64 and round once, which is the exactly
/// rounded sum; torch's can differ from it by an ulp or two, and so can the offset. Tests that
/// need bnb's bytes pass bnb's offset to [`Nf4Tensor::quantize_with_offset`].
fn mean_like_torch(xs: &[f32]) -> f32 {
    let sum = xs.iter().map(|&x| f64::from(x)).sum::<f64>() as f32;
    sum * (1.0f32 / xs.len() as f32)
}

/// A tensor in bitsandbytes' NF4 + double-quantization layout.
#[derive(Debug, Clone, PartialEq)]
pub struct Nf4Tensor {
    /// Original shape, e.g. `[out, in]` for a Linear weight.
    pub shape: Vec<usize>,
    /// `ceil(numel / 2)` bytes, the first element of each pair in the high nibble.
    pub packed: Vec<u8>,
    /// One byte per block: index into `code2` of `absmax - offset`, scaled by its `absmax2`.
    pub absmax_q: Vec<u8>,
    /// One f32 per `nested_blocksize` absmax values.
    pub absmax2: Vec<f32>,
    /// Mean of the first-level absmax values, subtracted before their quantization.
    pub offset: f32,
    /// The 8-bit code the absmax values are quantized with (bnb's signed dynamic map).
    pub code2: [f32; 256],
    pub blocksize: usize,
    pub nested_blocksize: usize,
}

impl Nf4Tensor {
    /// Quantize `data` (bf16 values widened to f32; any f32 works and matches bnb's f32 path),
    /// flattened in row-major order, as `quantize_4bit` does on a CUDA device.
    pub fn quantize(data: &[f32], shape: &[usize]) -> Self {
        Self::quantize_impl(data, |x| x, shape, None)
    }

    /// [`Self::quantize`] straight from bf16, without an f32 copy of the whole tensor.
    pub fn quantize_bf16(data: &[bf16], shape: &[usize]) -> Self {
        Self::quantize_impl(data, bf16::to_f32, shape, None)
    }

    /// [`Self::quantize`] with the offset given instead of computed: the offset is a reduction
    /// whose last ulp depends on torch's summation order, so reproducing bnb's bytes exactly
    /// means using the offset bnb computed.
    pub fn quantize_with_offset(data: &[f32], shape: &[usize], offset: Option<f32>) -> Self {
        Self::quantize_impl(data, |x| x, shape, offset)
    }

    fn quantize_impl<T: Copy + Sync>(data: &[T], widen: impl Fn(T) -> f32 + Sync, shape: &[usize], offset: Option<f32>) -> Self {
        let numel: usize = shape.iter().product();
        assert_eq!(data.len(), numel, "Nf4Tensor::quantize: {} values for shape {shape:?}", data.len());
        let blocks = numel.div_ceil(BLOCKSIZE);
        let mut packed = vec![0u8; numel.div_ceil(2)];
        let mut absmax = vec![0f32; blocks];
        data.par_chunks(BLOCKSIZE).zip(packed.par_chunks_mut(BLOCKSIZE / 2)).zip(absmax.par_iter_mut()).for_each(|((block, out), amax)| {
            *amax = quantize_block(block, &widen, out);
        });

        let offset = offset.unwrap_or_else(|| if absmax.is_empty() { 0.0 } else { mean_like_torch(&absmax) });
        // `_absmax - offset` is a plain torch subtraction: IEEE, no flushing.
        let centered: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
        let code2 = dynamic_map_signed();
        let mut absmax_q = vec![0u8; blocks];
        let mut absmax2 = vec![0f32; blocks.div_ceil(NESTED_BLOCKSIZE)];
        centered.par_chunks(NESTED_BLOCKSIZE).zip(absmax_q.par_chunks_mut(NESTED_BLOCKSIZE)).zip(absmax2.par_iter_mut()).for_each(
            |((vals, out), amax2)| {
                *amax2 = block_absmax(vals.iter().copied(), vals.len() < NESTED_BLOCKSIZE);
                let r = gpu_rcp(*amax2);
                for (q, &v) in out.iter_mut().zip(vals) {
                    *q = dynamic_index(&code2, fmul_ftz(v, r));
                }
            },
        );

        Nf4Tensor {
            shape: shape.to_vec(),
            packed,
            absmax_q,
            absmax2,
            offset,
            code2,
            blocksize: BLOCKSIZE,
            nested_blocksize: NESTED_BLOCKSIZE,
        }
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The first-level absmax values as bnb's `dequantize_4bit` reconstructs them:
    /// `code2[q] * absmax2` in the dequant kernel (flushing), then `+ offset` in torch.
    pub fn absmax(&self) -> Vec<f32> {
        self.absmax_range(0, self.absmax_q.len())
    }

    fn absmax_range(&self, first: usize, end: usize) -> Vec<f32> {
        (first..end)
            .map(|i| {
                let scale = self.absmax2[i / self.nested_blocksize];
                fmul_ftz(self.code2[self.absmax_q[i] as usize], scale) + self.offset
            })
            .collect()
    }

    /// Dequantize to f32: `NF4_CODE[nibble] * absmax` per element, what bnb's kernel computes
    /// before it rounds to the output dtype (and what it returns for an f32 quant state).
    pub fn dequantize_f32(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.numel()];
        self.dequantize_range_into(0, &mut out);
        out
    }

    /// Dequantize to bf16 as bnb does for a bf16 weight: the f32 product rounded to nearest-even.
    pub fn dequantize_bf16(&self) -> Vec<bf16> {
        let mut out = vec![bf16::ZERO; self.numel()];
        let chunk = self.blocksize * 1024;
        out.par_chunks_mut(chunk).enumerate().for_each_init(
            || vec![0f32; chunk],
            |tmp, (c, dst)| {
                let tmp = &mut tmp[..dst.len()];
                self.dequantize_range_into(c * chunk, tmp);
                for (d, &v) in dst.iter_mut().zip(tmp.iter()) {
                    *d = bf16::from_f32(v);
                }
            },
        );
        out
    }

    /// Dequantize rows `row_start .. row_start + rows` of the tensor seen as
    /// `[shape[0], numel / shape[0]]` into `out` (f32), so a large matrix can be expanded a slab
    /// at a time.
    pub fn dequantize_rows_into(&self, row_start: usize, rows: usize, out: &mut [f32]) {
        let total_rows = self.shape.first().copied().unwrap_or(1);
        let cols = self.numel().checked_div(total_rows).unwrap_or(0);
        assert!(
            row_start + rows <= total_rows && out.len() == rows * cols,
            "dequantize_rows_into: rows {row_start}..{} of {total_rows} need {} values, got a buffer of {}",
            row_start + rows,
            rows * cols,
            out.len()
        );
        self.dequantize_range_into(row_start * cols, out);
    }

    /// Dequantize the flat elements `start .. start + out.len()` into `out`.
    pub fn dequantize_range_into(&self, start: usize, out: &mut [f32]) {
        let end = start + out.len();
        assert!(end <= self.numel(), "dequantize_range_into: {start}..{end} is past {} elements", self.numel());
        if out.is_empty() {
            return;
        }
        let bs = self.blocksize;
        let first_block = start / bs;
        let absmax = self.absmax_range(first_block, (end - 1) / bs + 1);
        // Parallel over whole blocks: the first piece runs to the next block boundary.
        let head = (bs - start % bs) % bs;
        let (head_out, rest) = out.split_at_mut(head.min(out.len()));
        let one = |e: usize, a: f32| {
            let byte = self.packed[e / 2];
            let nib = if e.is_multiple_of(2) { byte >> 4 } else { byte & 0x0f };
            fmul_ftz(NF4_CODE[nib as usize], a)
        };
        for (k, o) in head_out.iter_mut().enumerate() {
            *o = one(start + k, absmax[0]);
        }
        let rest_start = start + head_out.len();
        let rest_first_block = rest_start / bs;
        rest.par_chunks_mut(bs).enumerate().for_each(|(b, dst)| {
            let a = absmax[rest_first_block + b - first_block];
            let e0 = rest_start + b * bs;
            for (k, o) in dst.iter_mut().enumerate() {
                *o = one(e0 + k, a);
            }
        });
    }

    /// Bytes the tensor takes on the device: packed codes, 8-bit absmax, f32 absmax2, the f32
    /// 8-bit code and the f32 offset.
    pub fn bytes(&self) -> usize {
        self.packed.len() + self.absmax_q.len() + self.absmax2.len() * 4 + self.code2.len() * 4 + 4
    }

    /// Read one Linear4bit weight as `transformers` + bitsandbytes save it (QuantState.as_dict
    /// with `packed=True`): `weight` is the name of the packed tensor (`...q_proj.weight`), next
    /// to which live `weight.absmax` (u8), `weight.quant_map` (f32[16]), `weight.nested_absmax`
    /// (f32), `weight.nested_quant_map` (f32[256]) and `weight.quant_state.bitsandbytes__nf4`
    /// (u8 bytes of a JSON object with quant_type, blocksize, dtype, shape, nested_blocksize,
    /// nested_dtype, nested_offset). `get` returns a tensor by name; `file` is only for messages.
    pub fn from_bnb_parts<'a>(weight: &str, file: Option<&Path>, get: impl Fn(&str) -> Option<RawTensor<'a>>) -> Result<Self> {
        let part = |suffix: &str| -> Result<(String, RawTensor<'a>)> {
            let name = if suffix.is_empty() { weight.to_string() } else { format!("{weight}.{suffix}") };
            match get(&name) {
                Some(t) => Ok((name, t)),
                None => Err(Error::tensor(
                    &name,
                    file,
                    "is missing: a double-quantized bnb-4bit checkpoint stores it next to the packed weight",
                )),
            }
        };

        let (qs_name, qs) = part("quant_state.bitsandbytes__nf4").map_err(|e| {
            let other = format!("{weight}.quant_state.bitsandbytes__fp4");
            if get(&other).is_some() { Error::tensor(other, file, "is FP4-quantized; only NF4 is supported") } else { e }
        })?;
        let state: serde_json::Value = serde_json::from_slice(qs.bytes)
            .map_err(|e| Error::tensor(&qs_name, file, format!("is not the JSON quant state bnb writes: {e}")))?;
        let bad = |msg: String| Error::tensor(&qs_name, file, msg);
        let field = |key: &str| state.get(key).ok_or_else(|| bad(format!("has no `{key}`")));
        let usize_field =
            |key: &str| field(key)?.as_u64().map(|v| v as usize).ok_or_else(|| bad(format!("`{key}` is not a non-negative integer")));

        let quant_type = field("quant_type")?.as_str().unwrap_or("");
        if quant_type != "nf4" {
            return Err(bad(format!("has quant_type {quant_type:?}; only \"nf4\" is supported")));
        }
        if state.get("nested_offset").is_none() {
            return Err(bad(
                "has no nested (double) quantization; only bnb_4bit_use_double_quant=True checkpoints are supported".to_string()
            ));
        }
        let blocksize = usize_field("blocksize")?;
        if ![32, 64, 128, 256, 512, 1024, 2048, 4096].contains(&blocksize) {
            return Err(bad(format!("has blocksize {blocksize}, which bnb does not produce")));
        }
        let nested_blocksize = usize_field("nested_blocksize")?;
        if nested_blocksize == 0 {
            return Err(bad("has nested_blocksize 0".to_string()));
        }
        let nested_dtype = field("nested_dtype")?.as_str().unwrap_or("");
        if nested_dtype != "float32" {
            return Err(bad(format!("has nested_dtype {nested_dtype:?}; expected \"float32\"")));
        }
        // A Python float holding an f32 exactly: the f64 parse is exact, so the cast is too.
        let offset = field("nested_offset")?.as_f64().ok_or_else(|| bad("`nested_offset` is not a number".to_string()))? as f32;
        let shape: Vec<usize> = field("shape")?
            .as_array()
            .and_then(|dims| dims.iter().map(|d| d.as_u64().map(|d| d as usize)).collect())
            .ok_or_else(|| bad("`shape` is not a list of sizes".to_string()))?;
        let numel: usize = shape.iter().product();
        let blocks = numel.div_ceil(blocksize);

        let (packed_name, packed) = part("")?;
        // quant_storage may be a wider dtype (FSDP setups store bf16); the bytes are the same.
        if packed.bytes.len() != numel.div_ceil(2) {
            return Err(Error::tensor(
                packed_name,
                file,
                format!(
                    "holds {} bytes of packed NF4 codes; shape {shape:?} in the quant state needs {}",
                    packed.bytes.len(),
                    numel.div_ceil(2)
                ),
            ));
        }
        let (absmax_name, absmax) = part("absmax")?;
        expect_dtype(&absmax_name, file, &absmax, Dtype::U8)?;
        if absmax.bytes.len() != blocks {
            return Err(Error::tensor(
                absmax_name,
                file,
                format!("has {} values; {numel} elements in blocks of {blocksize} need {blocks}", absmax.bytes.len()),
            ));
        }
        let (map_name, map) = part("quant_map")?;
        let map = f32s(&map_name, file, &map, Some(16))?;
        if map.iter().zip(&NF4_CODE).any(|(a, b)| a.to_bits() != b.to_bits()) {
            return Err(Error::tensor(map_name, file, "is not bitsandbytes' NF4 table"));
        }
        let (nabs_name, nabs) = part("nested_absmax")?;
        let absmax2 = f32s(&nabs_name, file, &nabs, Some(blocks.div_ceil(nested_blocksize)))?;
        let (nmap_name, nmap) = part("nested_quant_map")?;
        let nmap = f32s(&nmap_name, file, &nmap, Some(256))?;
        let mut code2 = [0f32; 256];
        code2.copy_from_slice(&nmap);

        Ok(Nf4Tensor {
            shape,
            packed: packed.bytes.to_vec(),
            absmax_q: absmax.bytes.to_vec(),
            absmax2,
            offset,
            code2,
            blocksize,
            nested_blocksize,
        })
    }

    /// [`Self::from_bnb_parts`] over a model folder's safetensors.
    pub fn from_weight_store(store: &crate::model::weights::WeightStore, weight: &str) -> Result<Self> {
        let file = store.get(weight).map(|e| store.shard_path(e).to_path_buf());
        Self::from_bnb_parts(weight, file.as_deref().or(Some(store.dir.as_path())), |name| {
            let e = store.get(name)?;
            let bytes = store.bytes(name).ok()?;
            Some(RawTensor { dtype: e.dtype, shape: &e.shape, bytes })
        })
    }
}

/// One stored tensor as [`Nf4Tensor::from_bnb_parts`] reads it.
#[derive(Debug, Clone, Copy)]
pub struct RawTensor<'a> {
    pub dtype: Dtype,
    pub shape: &'a [usize],
    pub bytes: &'a [u8],
}

fn expect_dtype(name: &str, file: Option<&Path>, t: &RawTensor<'_>, dtype: Dtype) -> Result<()> {
    if t.dtype != dtype {
        return Err(Error::tensor(name, file, format!("has dtype {:?}, expected {dtype:?}", t.dtype)));
    }
    Ok(())
}

fn f32s(name: &str, file: Option<&Path>, t: &RawTensor<'_>, len: Option<usize>) -> Result<Vec<f32>> {
    expect_dtype(name, file, t, Dtype::F32)?;
    if let Some(bad) = crate::model::weights::non_finite(t.bytes, Dtype::F32) {
        return Err(bad.error(name, file));
    }
    let vals: Vec<f32> = t.bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    if let Some(len) = len
        && vals.len() != len
    {
        return Err(Error::tensor(name, file, format!("has {} values (shape {:?}), expected {len}", vals.len(), t.shape)));
    }
    Ok(vals)
}

/// Quantize one block of up to 64 values into `out` (`ceil(len / 2)` bytes); returns its absmax.
fn quantize_block<T: Copy>(block: &[T], widen: &impl Fn(T) -> f32, out: &mut [u8]) -> f32 {
    let mut vals = [0f32; BLOCKSIZE];
    for (v, &x) in vals.iter_mut().zip(block) {
        *v = widen(x);
    }
    let len = block.len();
    let amax = block_absmax(vals[..len].iter().copied(), len < BLOCKSIZE);
    let r = gpu_rcp(amax);
    // An odd last block pairs its last value with the kernel's zero padding: `0 * r` is code 7,
    // or code 0 when r is infinite (0 * inf is NaN).
    let mut codes = [0u8; BLOCKSIZE];
    for (c, &v) in codes.iter_mut().zip(&vals).take(len + len % 2) {
        *c = nf4_index(fmul_ftz(v, r));
    }
    for (j, o) in out.iter_mut().enumerate() {
        *o = (codes[2 * j] << 4) | codes[2 * j + 1];
    }
    amax
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn normal(rng: &mut ChaCha8Rng) -> f32 {
        // Box-Muller; rand 0.9 has no normal distribution without rand_distr.
        let u1: f64 = rng.random::<f64>().max(1e-300);
        let u2: f64 = rng.random();
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }

    fn bf16_data(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| bf16::from_f32(normal(&mut rng) * scale).to_f32()).collect()
    }

    #[test]
    fn nf4_table_is_bnbs() {
        assert_eq!(NF4_CODE[0], -1.0);
        assert_eq!(NF4_CODE[7], 0.0);
        assert_eq!(NF4_CODE[15], 1.0);
        // Two entries checked by bit pattern so a typo in the literals cannot hide.
        assert_eq!(NF4_CODE[1].to_bits(), (-0.6961928009986877f64 as f32).to_bits());
        assert_eq!(NF4_CODE[14].to_bits(), 0x3f39_13b3, "{:#x}", NF4_CODE[14].to_bits());
        assert!(NF4_CODE.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn thresholds_sit_between_neighbouring_codes() {
        for (k, &t) in NF4_THRESHOLDS.iter().enumerate() {
            let t = f32::from_bits(t) as f64;
            let mid = (NF4_CODE[k] as f64 + NF4_CODE[k + 1] as f64) / 2.0;
            assert!((t - mid).abs() < 1e-7, "threshold {k}: {t} vs midpoint {mid}");
        }
    }

    #[test]
    fn nf4_index_is_nearest_code_and_ties_go_down() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for _ in 0..100_000 {
            let x: f32 = rng.random_range(-1.0..=1.0);
            let q = nf4_index(x) as usize;
            let best = (0..16).min_by(|&a, &b| (NF4_CODE[a] - x).abs().total_cmp(&(NF4_CODE[b] - x).abs())).unwrap();
            if q != best {
                let t = f32::from_bits(NF4_THRESHOLDS[q.min(best)]);
                assert!((x - t).abs() < 1e-6, "x={x}: tree gave {q}, nearest is {best}");
            }
        }
        for (k, &t) in NF4_THRESHOLDS.iter().enumerate() {
            let t = f32::from_bits(t);
            assert_eq!(nf4_index(t), k as u8, "a value on threshold {k} takes the lower code");
            assert_eq!(nf4_index(f32::from_bits(t.to_bits()).next_up()), k as u8 + 1);
        }
        assert_eq!(nf4_index(f32::NAN), 0, "NaN falls through every test of the tree");
        assert_eq!(nf4_index(0.0), 7);
        assert_eq!(nf4_index(-0.0), 7);
    }

    #[test]
    fn dynamic_map_matches_bnb() {
        let code = dynamic_map_signed();
        assert!(code.windows(2).all(|w| w[0] < w[1]), "strictly increasing");
        assert_eq!(code[127], 0.0);
        assert_eq!(code[255], 1.0);
        // Values of bnb's create_dynamic_map() as printed from Python; [18], [137] and [236] are
        // among the entries that differ when linspace rounds its product separately.
        let known: [(usize, f64); 8] = [
            (0, -0.992968738079071),
            (18, -0.7398437261581421),
            (64, -0.09859374910593033),
            (126, -5.500000384017767e-07),
            (128, 5.500000384017767e-07),
            (137, 0.0003812500217463821),
            (236, 0.7398437261581421),
            (254, 0.992968738079071),
        ];
        for (i, v) in known {
            assert_eq!(code[i].to_bits(), (v as f32).to_bits(), "code[{i}] = {}, bnb has {v}", code[i]);
        }
        for i in 0..127 {
            assert_eq!(code[i], -code[254 - i], "symmetric around code[127]");
        }
    }

    #[test]
    fn gpu_rcp_is_a_neighbour_of_the_exact_reciprocal() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut differ = 0;
        for _ in 0..200_000 {
            let x = f32::from_bits(rng.random_range(0x0080_0000u32..0x7e80_0000));
            let r = gpu_rcp(x);
            let exact = 1.0 / x as f64;
            // r is one of the two floats around 1/x: |r - 1/x| < one ulp of r.
            let ulp = (r.next_up() - r) as f64;
            assert!((r as f64 - exact).abs() < ulp, "x={x:e}: rcp {r:e} is not next to {exact:e}");
            differ += (r != 1.0 / x) as usize;
        }
        // About 13% of mantissas round the other way on the GPU.
        assert!((20_000..32_000).contains(&differ), "{differ} of 200000 differ from round-to-nearest");
        let rn_differs = (0..1 << 23).filter(|&m| (RCP_OTHER_NEIGHBOUR[m >> 3] >> (m & 7)) & 1 == 1).count();
        assert_eq!(rn_differs, 1_108_522, "the measured table");
        for e in [-100, -3, 0, 5, 100] {
            let x = 2f32.powi(e);
            assert_eq!(gpu_rcp(x), 2f32.powi(-e), "powers of two are exact");
        }
        assert_eq!(gpu_rcp(0.0), f32::INFINITY);
        assert_eq!(gpu_rcp(1e-40), f32::INFINITY, "subnormal input is flushed to zero");
        assert_eq!(gpu_rcp(2e38), 0.0, "subnormal result is flushed to zero");
        assert_eq!(gpu_rcp(f32::INFINITY), 0.0);
        assert_eq!(gpu_rcp(-4.0), -0.25);
    }

    #[test]
    fn gpu_reciprocal_decides_some_absmax_codes() {
        // Block absmax values 2 ± A, 2 ± x (multiples of 2^-21, mean exactly 2): the centred x is
        // scaled by 1/A, and MUFU.RCP(A) and the correctly rounded 1/A fall on either side of a
        // midpoint of the 8-bit code. The same inputs are the rcp_flip_* bnb fixtures.
        for (a, x, gpu_code, rn_code) in
            [(1.9312448501586914f64, 0.1333765983581543f64, 179u8, 180u8), (1.2911558151245117, 0.3288412094116211, 202, 201)]
        {
            let absmax = [2.0 + a, 2.0 - a, 2.0 + x, 2.0 - x].map(|v| v as f32);
            let mut data = vec![0f32; 256];
            for (b, &m) in absmax.iter().enumerate() {
                data[b * 64 + 5] = m;
            }
            let t = Nf4Tensor::quantize(&data, &[4, 64]);
            assert_eq!((t.offset, t.absmax2[0]), (2.0, a as f32));
            assert_eq!(t.absmax_q[2], gpu_code, "x = {x}");
            let rn = dynamic_index(&t.code2, x as f32 * (1.0 / a as f32));
            assert_eq!(rn, rn_code, "with a correctly rounded reciprocal");
        }
    }

    #[test]
    fn nibbles_are_high_first() {
        // absmax 2: 2 -> code 15, -2 -> code 0, 0 -> code 7, 1 -> 0.5 -> code 12 (0.4407 < 0.5 < 0.5017)
        let data = [2.0, -2.0, 0.0, 1.0];
        let t = Nf4Tensor::quantize(&data, &[4]);
        assert_eq!(t.packed, vec![0xf0, 0x7c]);
    }

    #[test]
    fn sizes_for_partial_blocks() {
        for (n, packed, blocks, blocks2) in [(1, 1, 1, 1), (64, 32, 1, 1), (101, 51, 2, 1), (64 * 256 + 1, 8193, 257, 2)] {
            let data = bf16_data(n, n as u64, 0.02);
            let t = Nf4Tensor::quantize(&data, &[n]);
            assert_eq!((t.packed.len(), t.absmax_q.len(), t.absmax2.len()), (packed, blocks, blocks2), "n={n}");
            assert_eq!(t.bytes(), packed + blocks + blocks2 * 4 + 1024 + 4);
            assert_eq!(t.dequantize_f32().len(), n);
        }
        // An odd count pairs the last value with the kernel's zero padding, which is code 7.
        let data = bf16_data(101, 9, 1.0);
        let t = Nf4Tensor::quantize(&data, &[101]);
        assert_eq!(t.packed[50] & 0x0f, 7);
    }

    #[test]
    fn round_trip_error_is_bounded_by_the_code_gaps() {
        let (rows, cols) = (48, 1000); // 750 blocks: three 256-groups, the last partial
        let data = bf16_data(rows * cols, 11, 0.03);
        let t = Nf4Tensor::quantize(&data, &[rows, cols]);
        let deq = t.dequantize_f32();
        let absmax_deq = t.absmax();
        let half_nf4_gap = NF4_CODE.windows(2).map(|w| w[1] - w[0]).fold(0f32, f32::max) / 2.0;
        let code2 = dynamic_map_signed();
        let half_code2_gap = code2.windows(2).map(|w| w[1] - w[0]).fold(0f32, f32::max) / 2.0;
        for (b, block) in data.chunks(BLOCKSIZE).enumerate() {
            let amax = block.iter().fold(0f32, |m, x| m.max(x.abs()));
            // Second level: absmax is recovered within half a gap of the 8-bit code (scaled).
            let err_a = (absmax_deq[b] - amax).abs();
            assert!(err_a <= half_code2_gap * t.absmax2[b / 256] * 1.0001, "block {b}: absmax {amax} came back {}", absmax_deq[b]);
            // First level: each value is within half the widest NF4 gap of its block scale, plus
            // what the scale itself lost.
            for (k, &x) in block.iter().enumerate() {
                let y = deq[b * BLOCKSIZE + k];
                let bound = half_nf4_gap * amax + err_a + 1e-7;
                assert!((x - y).abs() <= bound, "block {b} elem {k}: {x} -> {y}, bound {bound}");
            }
        }
        // And the quantization is useful, not just bounded: relative RMS error of NF4 on
        // Gaussian data is about 10%.
        let num: f64 = data.iter().zip(&deq).map(|(&x, &y)| ((x - y) as f64).powi(2)).sum();
        let den: f64 = data.iter().map(|&x| (x as f64).powi(2)).sum();
        assert!((num / den).sqrt() < 0.12, "relative RMS error {}", (num / den).sqrt());
    }

    #[test]
    fn zero_blocks_give_no_nan() {
        // Block 1 is all zeros between two ordinary blocks. The kernel scales it by 1/0 = inf,
        // 0 * inf is NaN, and NaN falls to code 0 (-1.0); its absmax comes back as whatever
        // the 8-bit code makes of (0 - offset) + offset, so bnb returns -absmax' there.
        let mut data = bf16_data(192, 5, 0.02);
        data[64..128].fill(0.0);
        let t = Nf4Tensor::quantize(&data, &[3, 64]);
        assert!(t.packed[32..64].iter().all(|&b| b == 0x00), "zero block codes: {:?}", &t.packed[32..64]);
        let deq = t.dequantize_f32();
        assert!(deq.iter().all(|v| v.is_finite()));
        let a1 = t.absmax()[1];
        assert!(deq[64..128].iter().all(|&v| v == -a1));
        // Its centred absmax is the most negative of the group, so it scales to -1 and takes
        // code2[0] = -0.99297: what is left is 0.7% of absmax2.
        assert!(a1 > 0.0 && a1 <= (1.0 + t.code2[0]) * t.absmax2[0] * 1.0001, "zero block's absmax came back as {a1}");

        // An all-zero tensor: offset 0, absmax2 0, code2[0] * 0 = -0, -0 + 0 = +0, and
        // -1 * +0 = -0: bnb's dequant gives negative zeros.
        let t = Nf4Tensor::quantize(&[0.0; 130], &[130]);
        assert_eq!((t.offset, t.absmax2[0]), (0.0, 0.0));
        assert!(t.packed.iter().all(|&b| b == 0));
        assert!(t.dequantize_bf16().iter().all(|v| v.to_bits() == 0x8000));
    }

    #[test]
    fn subnormal_inputs_are_flushed_like_the_kernel() {
        // A block whose only non-zeros are subnormal has absmax 0 on the GPU.
        let data = [1e-40f32, -1e-40, 0.0, 0.0];
        let t = Nf4Tensor::quantize(&data, &[4]);
        assert_eq!(t.packed, vec![0x00, 0x00]);
    }

    #[test]
    fn bf16_and_f32_paths_agree_and_rows_slice() {
        let data = bf16_data(7 * 300, 13, 0.05);
        let as_bf16: Vec<bf16> = data.iter().map(|&x| bf16::from_f32(x)).collect();
        let a = Nf4Tensor::quantize(&data, &[7, 300]);
        let b = Nf4Tensor::quantize_bf16(&as_bf16, &[7, 300]);
        assert_eq!(a, b);
        let full = a.dequantize_f32();
        let mut rows = vec![0f32; 3 * 300];
        a.dequantize_rows_into(2, 3, &mut rows);
        assert_eq!(&full[600..1500], &rows[..]);
        let bf = a.dequantize_bf16();
        assert!(bf.iter().zip(&full).all(|(h, &f)| h.to_bits() == bf16::from_f32(f).to_bits()));
        let mut odd = vec![0f32; 77];
        a.dequantize_range_into(33, &mut odd);
        assert_eq!(&full[33..110], &odd[..]);
    }

    #[test]
    fn offset_is_the_mean() {
        let data = bf16_data(64 * 300, 17, 0.02);
        let t = Nf4Tensor::quantize(&data, &[64 * 300]);
        let amax: Vec<f64> = data.chunks(64).map(|b| b.iter().fold(0f32, |m, x| m.max(x.abs())) as f64).collect();
        let mean = amax.iter().sum::<f64>() / amax.len() as f64;
        assert!(((t.offset as f64) - mean).abs() <= mean * 1e-6, "{} vs {mean}", t.offset);
        let u = Nf4Tensor::quantize_with_offset(&data, &[64 * 300], Some(t.offset));
        assert_eq!(t, u);
    }

    /// Serialize as transformers + bnb do, so the parser is tested without GPU fixtures.
    fn bnb_parts(t: &Nf4Tensor, name: &str) -> Vec<(String, Dtype, Vec<usize>, Vec<u8>)> {
        let f32b = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let json = format!(
            r#"{{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": {:?}, "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": {}}}"#,
            t.shape, t.offset as f64
        );
        vec![
            (name.to_string(), Dtype::U8, vec![t.packed.len(), 1], t.packed.clone()),
            (format!("{name}.absmax"), Dtype::U8, vec![t.absmax_q.len()], t.absmax_q.clone()),
            (format!("{name}.quant_map"), Dtype::F32, vec![16], f32b(&NF4_CODE)),
            (format!("{name}.nested_absmax"), Dtype::F32, vec![t.absmax2.len()], f32b(&t.absmax2)),
            (format!("{name}.nested_quant_map"), Dtype::F32, vec![256], f32b(&t.code2)),
            (format!("{name}.quant_state.bitsandbytes__nf4"), Dtype::U8, vec![json.len()], json.into_bytes()),
        ]
    }

    fn lookup<'a>(parts: &'a [(String, Dtype, Vec<usize>, Vec<u8>)]) -> impl Fn(&str) -> Option<RawTensor<'a>> {
        move |n| parts.iter().find(|p| p.0 == n).map(|p| RawTensor { dtype: p.1, shape: &p.2, bytes: &p.3 })
    }

    #[test]
    fn from_bnb_parts_reads_what_bnb_writes() {
        let data = bf16_data(40 * 70, 19, 0.02);
        let t = Nf4Tensor::quantize(&data, &[40, 70]);
        let name = "model.layers.0.mlp.up_proj.weight";
        let parts = bnb_parts(&t, name);
        let back = Nf4Tensor::from_bnb_parts(name, None, lookup(&parts)).unwrap();
        assert_eq!(back, t);
    }

    #[test]
    fn from_bnb_parts_names_the_missing_or_wrong_tensor() {
        let data = bf16_data(40 * 70, 23, 0.02);
        let t = Nf4Tensor::quantize(&data, &[40, 70]);
        let name = "m.w";
        let file = Path::new("model.safetensors");
        for drop in ["m.w.absmax", "m.w.nested_absmax", "m.w.quant_state.bitsandbytes__nf4", "m.w"] {
            let parts: Vec<_> = bnb_parts(&t, name).into_iter().filter(|p| p.0 != drop).collect();
            let err = Nf4Tensor::from_bnb_parts(name, Some(file), lookup(&parts)).unwrap_err().to_string();
            assert!(err.contains(&format!("`{drop}`")) && err.contains("missing") && err.contains("model.safetensors"), "{err}");
        }
        let mut parts = bnb_parts(&t, name);
        parts[1].3.pop(); // one absmax byte short
        let err = Nf4Tensor::from_bnb_parts(name, None, lookup(&parts)).unwrap_err().to_string();
        assert!(err.contains("`m.w.absmax`") && err.contains("need 44"), "{err}");
        let mut parts = bnb_parts(&t, name);
        parts[5].3 = br#"{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [40, 70]}"#.to_vec();
        let err = Nf4Tensor::from_bnb_parts(name, None, lookup(&parts)).unwrap_err().to_string();
        assert!(err.contains("double_quant"), "{err}");
        let mut parts = bnb_parts(&t, name);
        parts[2].3[0] ^= 1; // quant_map is not NF4
        let err = Nf4Tensor::from_bnb_parts(name, None, lookup(&parts)).unwrap_err().to_string();
        assert!(err.contains("`m.w.quant_map`"), "{err}");
    }
}
