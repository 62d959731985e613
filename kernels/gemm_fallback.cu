// A plain tiled GEMM for the shapes cuBLASLt declines (odd leading dimensions, tiny ranks in
// tests). Row-major like the CPU backend's `matmul`:
//   C[m, n] = alpha * op(A) . op(B) + beta * C (+ bias[n]),
// A is [m, k] (or [k, m] when a_t), B is [k, n] (or [n, k] when b_t), bf16 in, f32 accumulate,
// C bf16 or f32 (c_f32). Correct, not fast: the production shapes go through cuBLASLt.
#include "common.cuh"

#define GF_TILE 16

extern "C" __global__ void __launch_bounds__(GF_TILE * GF_TILE)
gemm_fallback(int m, int n, int k, const bf16* a, int a_t, const bf16* b, int b_t, void* c, int c_f32, float alpha,
              float beta, const bf16* bias) {
    __shared__ float sa[GF_TILE][GF_TILE + 1], sb[GF_TILE][GF_TILE + 1];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int row = blockIdx.y * GF_TILE + ty, col = blockIdx.x * GF_TILE + tx;
    float acc = 0.f;
    for (int k0 = 0; k0 < k; k0 += GF_TILE) {
        const int ka = k0 + tx, kb = k0 + ty;
        const int ar = blockIdx.y * GF_TILE + ty;
        sa[ty][tx] = (ar < m && ka < k) ? bf(a_t ? a[(long long)ka * m + ar] : a[(long long)ar * k + ka]) : 0.f;
        sb[ty][tx] = (col < n && kb < k) ? bf(b_t ? b[(long long)col * k + kb] : b[(long long)kb * n + col]) : 0.f;
        __syncthreads();
#pragma unroll
        for (int j = 0; j < GF_TILE; j++) acc += sa[ty][j] * sb[j][tx];
        __syncthreads();
    }
    if (row >= m || col >= n) return;
    const long long idx = (long long)row * n + col;
    float v = alpha * acc;
    if (c_f32) {
        float* cp = reinterpret_cast<float*>(c);
        if (beta != 0.f) v += beta * cp[idx];
        if (bias) v += bf(bias[col]);
        cp[idx] = v;
    } else {
        bf16* cp = reinterpret_cast<bf16*>(c);
        if (beta != 0.f) v += beta * bf(cp[idx]);
        if (bias) v += bf(bias[col]);
        cp[idx] = tobf(v);
    }
}
