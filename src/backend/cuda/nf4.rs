//! NF4 weights as the CUDA kernel reads them: the bitsandbytes layout (packed codes with the
//! first element in the high nibble, one 8-bit absmax per 64-block decoded through `code2`, one
//! f32 `absmax2` per 256 absmax, and the `offset` added back).
//!
//! ADAPTER: this branch still has the placeholder `Nf4Tensor` (`shape, packed, absmax_f`), while
//! the bnb-exact one (`shape, packed, absmax_q, absmax2, offset, code2`) lands from branch `nf4`.
//! [`Nf4Parts::of`] is the only place that knows which one it is: for the placeholder it
//! double-quantizes `absmax_f` itself (bitsandbytes' recipe: offset = mean, blocks of 256, the
//! signed dynamic map); after the merge it becomes four field borrows. Everything else (upload,
//! kernel, tests) works on `Nf4Parts`.

use std::borrow::Cow;

use crate::quant::nf4::{NF4_CODE, Nf4Tensor};

/// Elements per absmax block and absmax values per `absmax2` block.
pub const BLOCK: usize = 64;
pub const NESTED_BLOCK: usize = 256;

/// The arrays the `nf4_dequant` kernel reads.
#[derive(Debug, Clone)]
pub struct Nf4Parts<'a> {
    pub shape: (usize, usize),
    pub packed: Cow<'a, [u8]>,
    pub absmax_q: Cow<'a, [u8]>,
    pub absmax2: Cow<'a, [f32]>,
    pub offset: f32,
    pub code2: Cow<'a, [f32]>,
}

impl<'a> Nf4Parts<'a> {
    pub fn of(t: &'a Nf4Tensor) -> Self {
        let shape = (t.shape[0], t.numel() / t.shape[0].max(1));
        // Placeholder layout: double-quantize the f32 absmax here (see the module doc).
        let absmax = &t.absmax_f;
        let offset = if absmax.is_empty() { 0.0 } else { (absmax.iter().map(|&a| a as f64).sum::<f64>() / absmax.len() as f64) as f32 };
        let code2 = dynamic_map_signed();
        let mut absmax_q = vec![0u8; absmax.len()];
        let mut absmax2 = vec![0f32; absmax.len().div_ceil(NESTED_BLOCK)];
        for (j, (vals, q)) in absmax.chunks(NESTED_BLOCK).zip(absmax_q.chunks_mut(NESTED_BLOCK)).enumerate() {
            let amax = vals.iter().fold(0f32, |m, &a| m.max((a - offset).abs()));
            absmax2[j] = amax;
            for (qi, &a) in q.iter_mut().zip(vals) {
                let x = if amax > 0.0 { (a - offset) / amax } else { 0.0 };
                *qi = nearest(&code2, x);
            }
        }
        Nf4Parts {
            shape,
            packed: Cow::Borrowed(&t.packed),
            absmax_q: Cow::Owned(absmax_q),
            absmax2: Cow::Owned(absmax2),
            offset,
            code2: Cow::Owned(code2.to_vec()),
        }
    }

    pub fn numel(&self) -> usize {
        self.shape.0 * self.shape.1
    }

    /// The absmax of 64-block `b` as the kernel decodes it.
    pub fn absmax(&self, b: usize) -> f32 {
        self.code2[self.absmax_q[b] as usize] * self.absmax2[b / NESTED_BLOCK] + self.offset
    }

    /// What the kernel computes, on the host in f32 (before the bf16 rounding): the reference for
    /// the GPU test and for feeding the CPU backend the very same weights.
    pub fn dequantize_reference(&self) -> Vec<f32> {
        (0..self.numel())
            .map(|e| {
                let byte = self.packed[e / 2];
                let nib = if e % 2 == 0 { byte >> 4 } else { byte & 15 };
                NF4_CODE[nib as usize] * self.absmax(e / BLOCK)
            })
            .collect()
    }
}

fn nearest(code: &[f32; 256], x: f32) -> u8 {
    let mut best = 0usize;
    for (i, &c) in code.iter().enumerate() {
        if (c - x).abs() < (code[best] - x).abs() {
            best = i;
        }
    }
    best as u8
}

/// bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map(signed=True)`): for exponent step
/// i in 0..7, the midpoints of 2^i + 1 points spread evenly over [0.1, 1], scaled by 10^(i-6), with
/// their negatives; then 0 and 1; sorted.
pub fn dynamic_map_signed() -> [f32; 256] {
    let mut v: Vec<f32> = Vec::with_capacity(256);
    for i in 0..7i32 {
        let points = (1usize << i) + 1;
        let lin: Vec<f64> = (0..points).map(|p| 0.1 + 0.9 * p as f64 / (points - 1) as f64).collect();
        let scale = 10f64.powi(i - 6);
        for w in lin.windows(2) {
            let mid = ((w[0] + w[1]) / 2.0 * scale) as f32;
            v.push(mid);
            v.push(-mid);
        }
    }
    v.push(0.0);
    v.push(1.0);
    v.sort_by(f32::total_cmp);
    let mut out = [0f32; 256];
    out.copy_from_slice(&v);
    out
}
