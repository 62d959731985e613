//! PLACEHOLDER until the bitsandbytes-exact implementation lands (branch `nf4`): same API,
//! nearest-code quantization without double quantization of the statistics.

pub const NF4_CODE: [f32; 16] = [
    -1.0, -0.696_192_8, -0.525_073_05, -0.394_917_5, -0.284_441_38, -0.184_773_43, -0.091_050_036, 0.0,
    0.079_580_3, 0.160_930_2, 0.246_112_3, 0.337_915_24, 0.440_709_83, 0.562_617, 0.722_956_84, 1.0,
];

#[derive(Debug, Clone)]
pub struct Nf4Tensor {
    pub shape: Vec<usize>,
    pub packed: Vec<u8>,
    pub absmax_f: Vec<f32>,
}

impl Nf4Tensor {
    pub fn quantize(data: &[f32], shape: &[usize]) -> Self {
        let absmax_f: Vec<f32> = data.chunks(64).map(|b| b.iter().fold(0f32, |a, x| a.max(x.abs()))).collect();
        let mut packed = vec![0u8; data.len().div_ceil(2)];
        for (i, &x) in data.iter().enumerate() {
            let a = absmax_f[i / 64];
            let v = if a > 0.0 { x / a } else { 0.0 };
            let q = (0..16).min_by(|&p, &r| (NF4_CODE[p] - v).abs().total_cmp(&(NF4_CODE[r] - v).abs())).unwrap() as u8;
            packed[i / 2] |= if i % 2 == 0 { q << 4 } else { q };
        }
        Nf4Tensor { shape: shape.to_vec(), packed, absmax_f }
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn dequantize_f32(&self) -> Vec<f32> {
        (0..self.numel())
            .map(|i| {
                let b = self.packed[i / 2];
                let q = if i % 2 == 0 { b >> 4 } else { b & 15 };
                NF4_CODE[q as usize] * self.absmax_f[i / 64]
            })
            .collect()
    }
}
