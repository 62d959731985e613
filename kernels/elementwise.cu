// Elementwise helpers the trait needs between the fused ops: residual add, casts between the
// f32 masters and their bf16 compute copies, fill, scale (Gemma's embedding). Each thread owns 8 consecutive elements (one
// 16-byte access for bf16, two for f32); the last thread of a ragged tail falls back to scalars.
#include "common.cuh"

#define EW_THREADS 256

extern "C" __global__ void __launch_bounds__(EW_THREADS) add_bf16(bf16* x, const bf16* y, long long n) {
    long long i0 = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * 8;
    if (i0 + 8 <= n) {
        float a[8], b[8];
        load8(x + i0, a);
        load8(y + i0, b);
#pragma unroll
        for (int j = 0; j < 8; j++) a[j] += b[j];
        store8(x + i0, a);
    } else {
        for (long long i = i0; i < n; i++) x[i] = tobf(bf(x[i]) + bf(y[i]));
    }
}

extern "C" __global__ void __launch_bounds__(EW_THREADS) add_f32(float* x, const float* y, long long n) {
    long long i0 = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * 8;
    for (long long i = i0; i < i0 + 8 && i < n; i++) x[i] += y[i];
}

extern "C" __global__ void __launch_bounds__(EW_THREADS) cast_f32_bf16(const float* src, bf16* dst, long long n) {
    long long i0 = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * 8;
    if (i0 + 8 <= n) {
        float4 a = *reinterpret_cast<const float4*>(src + i0);
        float4 b = *reinterpret_cast<const float4*>(src + i0 + 4);
        float f[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
        store8(dst + i0, f);
    } else {
        for (long long i = i0; i < n; i++) dst[i] = tobf(src[i]);
    }
}

extern "C" __global__ void __launch_bounds__(EW_THREADS) cast_bf16_f32(const bf16* src, float* dst, long long n) {
    long long i0 = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * 8;
    if (i0 + 8 <= n) {
        float f[8];
        load8(src + i0, f);
        *reinterpret_cast<float4*>(dst + i0) = make_float4(f[0], f[1], f[2], f[3]);
        *reinterpret_cast<float4*>(dst + i0 + 4) = make_float4(f[4], f[5], f[6], f[7]);
    } else {
        for (long long i = i0; i < n; i++) dst[i] = bf(src[i]);
    }
}

extern "C" __global__ void __launch_bounds__(EW_THREADS) fill_bf16(bf16* x, long long n, float v) {
    long long i0 = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * 8;
    bf16 b = tobf(v);
    for (long long i = i0; i < i0 + 8 && i < n; i++) x[i] = b;
}

extern "C" __global__ void __launch_bounds__(EW_THREADS) fill_f32(float* x, long long n, float v) {
    long long i0 = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * 8;
    for (long long i = i0; i < i0 + 8 && i < n; i++) x[i] = v;
}

extern "C" __global__ void __launch_bounds__(EW_THREADS) scale_bf16(bf16* x, long long n, float alpha) {
    long long i0 = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * 8;
    if (i0 + 8 <= n) {
        float a[8];
        load8(x + i0, a);
#pragma unroll
        for (int j = 0; j < 8; j++) a[j] *= alpha;
        store8(x + i0, a);
    } else {
        for (long long i = i0; i < n; i++) x[i] = tobf(bf(x[i]) * alpha);
    }
}

extern "C" __global__ void __launch_bounds__(EW_THREADS) scale_f32(float* x, long long n, float alpha) {
    long long i0 = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * 8;
    for (long long i = i0; i < i0 + 8 && i < n; i++) x[i] *= alpha;
}
