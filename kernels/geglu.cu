// GeGLU (Gemma's MLP): out = gelu_tanh(g) * u, and its backward, with GELU's tanh approximation
// (transformers' gelu_pytorch_tanh):
//   gelu(x) = 0.5 x (1 + t),  t = tanh(k (x + c x^3)),  k = sqrt(2/pi), c = 0.044715
//   gelu'(x) = 0.5 (1 + t) + 0.5 x (1 - t^2) k (1 + 3 c x^2)
// Laid out as swiglu.cu: each thread owns 8 consecutive elements (16-byte accesses); a ragged
// tail falls back to scalars. tanhf, not the tanh.approx instruction, keeps the CPU reference's
// values to f32 rounding.
#include "common.cuh"

#define GG_THREADS 256
#define GELU_K 0.7978845608028654f
#define GELU_C 0.044715f

DEVI float gelu_t(float x) { return tanhf(GELU_K * (x + GELU_C * x * x * x)); }

DEVI float gelu_value(float x, float t) { return 0.5f * x * (1.f + t); }

DEVI float gelu_slope(float x, float t) {
    return 0.5f * (1.f + t) + 0.5f * x * (1.f - t * t) * GELU_K * (1.f + 3.f * GELU_C * x * x);
}

extern "C" __global__ void __launch_bounds__(GG_THREADS)
geglu_fwd(const bf16* g, const bf16* u, bf16* out, long long n) {
    long long i0 = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * 8;
    if (i0 + 8 <= n) {
        float a[8], b[8], o[8];
        load8(g + i0, a);
        load8(u + i0, b);
#pragma unroll
        for (int j = 0; j < 8; j++) o[j] = gelu_value(a[j], gelu_t(a[j])) * b[j];
        store8(out + i0, o);
    } else {
        for (long long i = i0; i < n; i++) {
            float x = bf(g[i]);
            out[i] = tobf(gelu_value(x, gelu_t(x)) * bf(u[i]));
        }
    }
}

// dg = dout * u * gelu'(g),  du = dout * gelu(g)
extern "C" __global__ void __launch_bounds__(GG_THREADS)
geglu_bwd(const bf16* dout, const bf16* g, const bf16* u, bf16* dg, bf16* du, long long n) {
    long long i0 = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * 8;
    if (i0 + 8 <= n) {
        float d[8], a[8], b[8], og[8], ou[8];
        load8(dout + i0, d);
        load8(g + i0, a);
        load8(u + i0, b);
#pragma unroll
        for (int j = 0; j < 8; j++) {
            float t = gelu_t(a[j]);
            ou[j] = d[j] * gelu_value(a[j], t);
            og[j] = d[j] * b[j] * gelu_slope(a[j], t);
        }
        store8(dg + i0, og);
        store8(du + i0, ou);
    } else {
        for (long long i = i0; i < n; i++) {
            float x = bf(g[i]), t = gelu_t(x), dd = bf(dout[i]);
            du[i] = tobf(dd * gelu_value(x, t));
            dg[i] = tobf(dd * bf(u[i]) * gelu_slope(x, t));
        }
    }
}
