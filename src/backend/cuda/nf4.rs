//! NF4 weights as the CUDA kernel reads them: the bitsandbytes layout (packed codes with the
//! first element in the high nibble, one 8-bit absmax per 64-block decoded through `code2`, one
//! f32 `absmax2` per 256 absmax, and the `offset` added back).
//!
//! [`Nf4Parts::of`] borrows the fields of the bitsandbytes-exact `Nf4Tensor`; the upload, kernel
//! and tests work on `Nf4Parts`.

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
        Nf4Parts {
            shape,
            packed: Cow::Borrowed(&t.packed),
            absmax_q: Cow::Borrowed(&t.absmax_q),
            absmax2: Cow::Borrowed(&t.absmax2),
            offset: t.offset,
            code2: Cow::Borrowed(&t.code2[..]),
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
