// The fused part of lm_head + cross-entropy, run per chunk of rows after cuBLASLt has written the
// chunk's logits (f32, [rows, vocab]). One block per row:
//   pass 1: online max / sum of exp over the row (each thread its strided share, then merged);
//   pass 2: dlogits = grad_scale * (softmax - onehot(target)) as bf16 for the dh GEMM, and, when
//           trainable head rows need them, the same values in f32 over the logits in place.
// Rows with target < 0 get zero gradient and no loss; a target >= vocab gives a NaN loss.
// Per-row losses and valid flags go to small buffers that ce_chunk_sum adds in a fixed order.
#include "common.cuh"

#define CE_THREADS 512

DEVI void merge_ms(float& m, float& s, float m2, float s2) {
    const float mm = fmaxf(m, m2);
    if (mm == -INFINITY) return;
    s = s * expf(m - mm) + s2 * expf(m2 - mm);
    m = mm;
}

extern "C" __global__ void __launch_bounds__(CE_THREADS)
ce_softmax_grad(float* logits, const int* targets, int vocab, float grad_scale, bf16* dlogits, float* row_loss,
                int* row_valid, int write_f32) {
    __shared__ float sm[CE_THREADS / 32], ss[CE_THREADS / 32];
    const long long r = blockIdx.x;
    float* x = logits + r * vocab;
    bf16* g = dlogits + r * vocab;
    const int t = targets[r];
    const bool vec = (vocab & 7) == 0;
    if (t < 0) {
        if (vec) {
            const float z[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
            for (int c = threadIdx.x * 8; c < vocab; c += blockDim.x * 8) store8(g + c, z);
        } else {
            for (int c = threadIdx.x; c < vocab; c += blockDim.x) g[c] = tobf(0.f);
        }
        if (write_f32)
            for (int c = threadIdx.x; c < vocab; c += blockDim.x) x[c] = 0.f;
        if (threadIdx.x == 0) {
            row_loss[r] = 0.f;
            row_valid[r] = 0;
        }
        return;
    }
    float m = -INFINITY, s = 0.f;
    if (vec) {
        for (int c = threadIdx.x * 8; c < vocab; c += blockDim.x * 8) {
            const float4 a = *reinterpret_cast<const float4*>(x + c);
            const float4 b = *reinterpret_cast<const float4*>(x + c + 4);
            const float v[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
            float lm = v[0];
#pragma unroll
            for (int j = 1; j < 8; j++) lm = fmaxf(lm, v[j]);
            float ls = 0.f;
#pragma unroll
            for (int j = 0; j < 8; j++) ls += expf(v[j] - lm);
            merge_ms(m, s, lm, ls);
        }
    } else {
        for (int c = threadIdx.x; c < vocab; c += blockDim.x) merge_ms(m, s, x[c], 1.f);
    }
    // Merge across the warp, then across warps.
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float m2 = __shfl_xor_sync(0xffffffffu, m, o);
        const float s2 = __shfl_xor_sync(0xffffffffu, s, o);
        merge_ms(m, s, m2, s2);
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) {
        sm[warp] = m;
        ss[warp] = s;
    }
    __syncthreads();
    m = -INFINITY;
    s = 0.f;
    for (int w = 0; w < (int)(blockDim.x >> 5); w++) merge_ms(m, s, sm[w], ss[w]);
    const float lse = m + logf(s);
    if (threadIdx.x == 0) {
        row_loss[r] = t < vocab ? lse - x[t] : NAN;
        row_valid[r] = 1;
    }
    __syncthreads();  // x[t] is read above before pass 2 may overwrite it
    if (vec) {
        for (int c = threadIdx.x * 8; c < vocab; c += blockDim.x * 8) {
            float4 a = *reinterpret_cast<const float4*>(x + c);
            float4 b = *reinterpret_cast<const float4*>(x + c + 4);
            float v[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
            for (int j = 0; j < 8; j++) {
                v[j] = expf(v[j] - lse) * grad_scale;
                if (c + j == t) v[j] -= grad_scale;
            }
            store8(g + c, v);
            if (write_f32) {
                *reinterpret_cast<float4*>(x + c) = make_float4(v[0], v[1], v[2], v[3]);
                *reinterpret_cast<float4*>(x + c + 4) = make_float4(v[4], v[5], v[6], v[7]);
            }
        }
    } else {
        for (int c = threadIdx.x; c < vocab; c += blockDim.x) {
            float v = expf(x[c] - lse) * grad_scale;
            if (c == t) v -= grad_scale;
            g[c] = tobf(v);
            if (write_f32) x[c] = v;
        }
    }
}

// One block: sum[0] += the chunk's row losses (f64, fixed order), count[0] += valid rows.
extern "C" __global__ void __launch_bounds__(256)
ce_chunk_sum(const float* row_loss, const int* row_valid, int rows, double* sum, long long* count) {
    __shared__ double sd[8];
    __shared__ int sc[8];
    double acc = 0.0;
    int cnt = 0;
    for (int i = threadIdx.x; i < rows; i += blockDim.x) {
        acc += (double)row_loss[i];
        cnt += row_valid[i];
    }
    acc = warp_sum_d(acc);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) cnt += __shfl_xor_sync(0xffffffffu, cnt, o);
    if ((threadIdx.x & 31) == 0) {
        sd[threadIdx.x >> 5] = acc;
        sc[threadIdx.x >> 5] = cnt;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        double t = 0.0;
        long long c = 0;
        for (int w = 0; w < (int)(blockDim.x >> 5); w++) {
            t += sd[w];
            c += sc[w];
        }
        sum[0] += t;
        count[0] += c;
    }
}

// Gradient of trainable head rows from one chunk: grad[s, c] += sum_r dl[r, ids[s]] * h[r, c],
// rows summed in order. grid (k, ceil(d / blockDim)).
extern "C" __global__ void __launch_bounds__(256)
ce_head_rows(const float* dl, const bf16* h, const int* token_ids, int rows, int vocab, int d, float* grad) {
    const int s = blockIdx.x;
    const int c = blockIdx.y * blockDim.x + threadIdx.x;
    if (c >= d) return;
    const int id = token_ids[s];
    if (id < 0 || id >= vocab) return;
    float acc = 0.f;
    for (int r = 0; r < rows; r++) acc += dl[(long long)r * vocab + id] * bf(h[(long long)r * d + c]);
    grad[(long long)s * d + c] += acc;
}
