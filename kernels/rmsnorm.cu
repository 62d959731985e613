// RMSNorm forward and backward, one block per row. The forward saves only the inverse RMS (f32);
// the backward recomputes everything else from x. Rows whose width is a multiple of 8 use 16-byte
// accesses (VEC); others fall back to scalars. The weight applied is `w_off + w`, added in f32:
// 0 for Llama/Qwen, 1 for Gemma, whose norm weights are stored around 0. Per-head q/k norms are
// the same kernels over rows of head_dim.
#include "common.cuh"

// out = (w_off + w) * (x * s), s = 1 / sqrt(mean(x^2) + eps)
template <bool VEC>
DEVI void rmsnorm_fwd_impl(const bf16* x, const bf16* w, float w_off, bf16* out, float* inv_rms, int d, float eps) {
    __shared__ float scratch[32];
    const long long row = blockIdx.x;
    const bf16* xr = x + row * d;
    bf16* orow = out + row * d;
    float ss = 0.f;
    if (VEC) {
        for (int c = threadIdx.x * 8; c < d; c += blockDim.x * 8) {
            float a[8];
            load8(xr + c, a);
#pragma unroll
            for (int j = 0; j < 8; j++) ss += a[j] * a[j];
        }
    } else {
        for (int c = threadIdx.x; c < d; c += blockDim.x) {
            float a = bf(xr[c]);
            ss += a * a;
        }
    }
    ss = block_sum(ss, scratch);
    const float s = 1.f / sqrtf(ss / (float)d + eps);
    if (threadIdx.x == 0) inv_rms[row] = s;
    if (VEC) {
        for (int c = threadIdx.x * 8; c < d; c += blockDim.x * 8) {
            float a[8], g[8];
            load8(xr + c, a);
            load8(w + c, g);
#pragma unroll
            for (int j = 0; j < 8; j++) a[j] = (w_off + g[j]) * (a[j] * s);
            store8(orow + c, a);
        }
    } else {
        for (int c = threadIdx.x; c < d; c += blockDim.x) orow[c] = tobf((w_off + bf(w[c])) * (bf(xr[c]) * s));
    }
}

// dx (+)= s * w' * dy - (s^3 * sum(dy * w' * x) / d) * x, w' = w_off + w
template <bool VEC>
DEVI void rmsnorm_bwd_impl(const bf16* dy, const bf16* x, const bf16* w, float w_off, const float* inv_rms, bf16* dx,
                           int d, int accumulate) {
    __shared__ float scratch[32];
    const long long row = blockIdx.x;
    const bf16* xr = x + row * d;
    const bf16* gr = dy + row * d;
    bf16* dr = dx + row * d;
    const float s = inv_rms[row];
    float dot = 0.f;
    if (VEC) {
        for (int c = threadIdx.x * 8; c < d; c += blockDim.x * 8) {
            float a[8], g[8], ww[8];
            load8(xr + c, a);
            load8(gr + c, g);
            load8(w + c, ww);
#pragma unroll
            for (int j = 0; j < 8; j++) dot += g[j] * (w_off + ww[j]) * a[j];
        }
    } else {
        for (int c = threadIdx.x; c < d; c += blockDim.x) dot += bf(gr[c]) * (w_off + bf(w[c])) * bf(xr[c]);
    }
    dot = block_sum(dot, scratch);
    const float k = s * s * s * dot / (float)d;
    if (VEC) {
        for (int c = threadIdx.x * 8; c < d; c += blockDim.x * 8) {
            float a[8], g[8], ww[8], o[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
            load8(xr + c, a);
            load8(gr + c, g);
            load8(w + c, ww);
            if (accumulate) load8(dr + c, o);
#pragma unroll
            for (int j = 0; j < 8; j++) {
                float v = s * (w_off + ww[j]) * g[j] - k * a[j];
                o[j] = accumulate ? o[j] + v : v;
            }
            store8(dr + c, o);
        }
    } else {
        for (int c = threadIdx.x; c < d; c += blockDim.x) {
            float v = s * (w_off + bf(w[c])) * bf(gr[c]) - k * bf(xr[c]);
            dr[c] = tobf(accumulate ? bf(dr[c]) + v : v);
        }
    }
}

extern "C" __global__ void __launch_bounds__(1024)
rmsnorm_fwd(const bf16* x, const bf16* w, float w_off, bf16* out, float* inv_rms, int d, float eps) {
    if ((d & 7) == 0) rmsnorm_fwd_impl<true>(x, w, w_off, out, inv_rms, d, eps);
    else rmsnorm_fwd_impl<false>(x, w, w_off, out, inv_rms, d, eps);
}

extern "C" __global__ void __launch_bounds__(1024)
rmsnorm_bwd(const bf16* dy, const bf16* x, const bf16* w, float w_off, const float* inv_rms, bf16* dx, int d,
            int accumulate) {
    if ((d & 7) == 0) rmsnorm_bwd_impl<true>(dy, x, w, w_off, inv_rms, dx, d, accumulate);
    else rmsnorm_bwd_impl<false>(dy, x, w, w_off, inv_rms, dx, d, accumulate);
}
