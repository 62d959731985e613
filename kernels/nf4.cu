// NF4 -> bf16 dequantization of a weight stored in the bitsandbytes layout: two 4-bit codes per
// byte (the element with the lower index in the HIGH nibble), blocks of 64 elements, each with an
// 8-bit quantized absmax decoded here (double quantization fused in):
//     absmax[b] = code2[absmax_q[b]] * absmax2[b / 256] + offset
//     w[i]      = NF4[code(i)] * absmax[i / 64], rounded to bf16 (nearest even)
// Built with -ftz=true, like bitsandbytes' kernels, so subnormal products flush as they do there.
#include "common.cuh"

#define NF4_THREADS 256

__device__ __constant__ float NF4_CODE[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f,
    -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f, 0.16093020141124725f,
    0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

// One thread per 16 elements (8 packed bytes in, two 16-byte stores out); a ragged tail goes
// element by element.
extern "C" __global__ void __launch_bounds__(NF4_THREADS)
nf4_dequant(const unsigned char* packed, const unsigned char* absmax_q, const float* absmax2, const float* code2,
            float offset, bf16* out, long long numel) {
    __shared__ float code[16];
    if (threadIdx.x < 16) code[threadIdx.x] = NF4_CODE[threadIdx.x];
    __syncthreads();
    const long long e0 = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * 16;
    if (e0 >= numel) return;
    if (e0 + 16 <= numel) {
        const long long blk = e0 >> 6;
        const float a = __fmul_rn(code2[absmax_q[blk]], absmax2[blk >> 8]) + offset;
        const uint2 q = *reinterpret_cast<const uint2*>(packed + (e0 >> 1));
        const unsigned char* b = reinterpret_cast<const unsigned char*>(&q);
        float f[16];
#pragma unroll
        for (int j = 0; j < 8; j++) {
            f[2 * j] = __fmul_rn(code[b[j] >> 4], a);
            f[2 * j + 1] = __fmul_rn(code[b[j] & 15], a);
        }
        store8(out + e0, f);
        store8(out + e0 + 8, f + 8);
    } else {
        for (long long e = e0; e < numel; e++) {
            const long long blk = e >> 6;
            const float a = __fmul_rn(code2[absmax_q[blk]], absmax2[blk >> 8]) + offset;
            const unsigned char byte = packed[e >> 1];
            const int nib = (e & 1) ? (byte & 15) : (byte >> 4);
            out[e] = tobf(__fmul_rn(code[nib], a));
        }
    }
}
