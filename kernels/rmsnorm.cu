// RMSNorm forward and backward, one block per row. The forward saves only the inverse RMS (f32);
// the backward recomputes everything else from x.
//
// Large inputs: a diverging run's residual stream can reach |x| ~ 1e19 and beyond, where x^2
// overflows f32. The sum of squares then became inf, s = 1/sqrt(inf) = 0, and every output and
// gradient through the norm was an exact zero: a dead run that looked finite (the CPU reference
// sums in f64 for the same reason). The forward keeps its f32 sum, which is exact enough and free,
// and only when that sum is not finite redoes the row scaled by its largest |x| (a uniform branch:
// every thread sees the same block sum). The backward never forms s^3 or sum(dy*w*x), which leave
// f32's range for large x, but works on the normalized x*s, which is O(1) by construction. Rows whose width is a multiple of 8 use 16-byte
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
    float s = 1.f / sqrtf(ss / (float)d + eps);
    if (!isfinite(ss)) {
        // mean(x^2) = m^2 * mean((x/m)^2) with m = max|x|; s = 1/(m * sqrt(mean((x/m)^2) + eps/m^2)),
        // in f64 so that m^2 cannot overflow.
        float m = 0.f;
        for (int c = threadIdx.x; c < d; c += blockDim.x) m = fmaxf(m, fabsf(bf(xr[c])));
        m = block_max(m, scratch);
        const float rm = 1.f / m;
        float t = 0.f;
        for (int c = threadIdx.x; c < d; c += blockDim.x) {
            const float a = bf(xr[c]) * rm;
            t += a * a;
        }
        t = block_sum(t, scratch);
        const double md = (double)m;
        s = (float)(1.0 / (md * sqrt((double)t / (double)d + (double)eps / (md * md))));
    }
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

// dx (+)= s * w' * dy - (s^3 * sum(dy * w' * x) / d) * x, w' = w_off + w, computed with the
// normalized xh = x * s as dx = s * w' * dy - (s * sum(dy * w' * xh) / d) * xh, whose every term
// stays in range however large x is.
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
            for (int j = 0; j < 8; j++) dot += g[j] * (w_off + ww[j]) * (a[j] * s);
        }
    } else {
        for (int c = threadIdx.x; c < d; c += blockDim.x) dot += bf(gr[c]) * (w_off + bf(w[c])) * (bf(xr[c]) * s);
    }
    dot = block_sum(dot, scratch);
    const float k = s * dot / (float)d;
    if (VEC) {
        for (int c = threadIdx.x * 8; c < d; c += blockDim.x * 8) {
            float a[8], g[8], ww[8], o[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
            load8(xr + c, a);
            load8(gr + c, g);
            load8(w + c, ww);
            if (accumulate) load8(dr + c, o);
#pragma unroll
            for (int j = 0; j < 8; j++) {
                float v = s * (w_off + ww[j]) * g[j] - k * (a[j] * s);
                o[j] = accumulate ? o[j] + v : v;
            }
            store8(dr + c, o);
        }
    } else {
        for (int c = threadIdx.x; c < d; c += blockDim.x) {
            float v = s * (w_off + bf(w[c])) * bf(gr[c]) - k * (bf(xr[c]) * s);
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
