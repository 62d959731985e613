// SwiGLU: out = silu(g) * u, and its backward. Each thread owns 8 consecutive elements (16-byte
// accesses); a ragged tail falls back to scalars.
#include "common.cuh"

#define SW_THREADS 256

DEVI float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }

extern "C" __global__ void __launch_bounds__(SW_THREADS)
swiglu_fwd(const bf16* g, const bf16* u, bf16* out, long long n) {
    long long i0 = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * 8;
    if (i0 + 8 <= n) {
        float a[8], b[8], o[8];
        load8(g + i0, a);
        load8(u + i0, b);
#pragma unroll
        for (int j = 0; j < 8; j++) o[j] = a[j] * sigmoid(a[j]) * b[j];
        store8(out + i0, o);
    } else {
        for (long long i = i0; i < n; i++) {
            float x = bf(g[i]);
            out[i] = tobf(x * sigmoid(x) * bf(u[i]));
        }
    }
}

// dg = dout * u * sig * (1 + x (1 - sig)),  du = dout * silu(x)
extern "C" __global__ void __launch_bounds__(SW_THREADS)
swiglu_bwd(const bf16* dout, const bf16* g, const bf16* u, bf16* dg, bf16* du, long long n) {
    long long i0 = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * 8;
    if (i0 + 8 <= n) {
        float d[8], a[8], b[8], og[8], ou[8];
        load8(dout + i0, d);
        load8(g + i0, a);
        load8(u + i0, b);
#pragma unroll
        for (int j = 0; j < 8; j++) {
            float s = sigmoid(a[j]);
            ou[j] = d[j] * a[j] * s;
            og[j] = d[j] * b[j] * s * (1.f + a[j] * (1.f - s));
        }
        store8(dg + i0, og);
        store8(du + i0, ou);
    } else {
        for (long long i = i0; i < n; i++) {
            float x = bf(g[i]), s = sigmoid(x), dd = bf(dout[i]);
            du[i] = tobf(dd * x * s);
            dg[i] = tobf(dd * bf(u[i]) * s * (1.f + x * (1.f - s)));
        }
    }
}
