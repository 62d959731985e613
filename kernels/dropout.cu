// Inverted dropout with the counter-based mask of `backend::dropout_uniform`: element i is kept
// when the draw for (key, first + i) is >= p and then scaled by keep = 1 / (1 - p); `first` is the
// element's index in the whole tensor, so a row chunk draws the same mask as the whole. The
// backward draws the same mask again; nothing is stored.
#include "common.cuh"

#define DO_THREADS 256

extern "C" __global__ void __launch_bounds__(DO_THREADS)
dropout_fwd(const bf16* x, bf16* out, long long n, float p, float keep, unsigned long long key, unsigned long long first) {
    long long i0 = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * 8;
    if (i0 + 8 <= n) {
        float a[8];
        load8(x + i0, a);
#pragma unroll
        for (int j = 0; j < 8; j++) a[j] = dropout_uniform(key, first + i0 + j) >= p ? a[j] * keep : 0.f;
        store8(out + i0, a);
    } else {
        for (long long i = i0; i < n; i++) out[i] = tobf(dropout_uniform(key, first + i) >= p ? bf(x[i]) * keep : 0.f);
    }
}

extern "C" __global__ void __launch_bounds__(DO_THREADS)
dropout_bwd(const bf16* dy, bf16* dx, long long n, float p, float keep, unsigned long long key, unsigned long long first, int accumulate) {
    long long i0 = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * 8;
    if (i0 + 8 <= n) {
        float a[8], o[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
        load8(dy + i0, a);
        if (accumulate) load8(dx + i0, o);
#pragma unroll
        for (int j = 0; j < 8; j++) {
            float v = dropout_uniform(key, first + i0 + j) >= p ? a[j] * keep : 0.f;
            o[j] = accumulate ? o[j] + v : v;
        }
        store8(dx + i0, o);
    } else {
        for (long long i = i0; i < n; i++) {
            float v = dropout_uniform(key, first + i) >= p ? bf(dy[i]) * keep : 0.f;
            dx[i] = tobf(accumulate ? bf(dx[i]) + v : v);
        }
    }
}
