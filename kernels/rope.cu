// Rotary embedding in place, rotate-half convention, on [n, heads * head_dim] bf16. The table is
// f32 [max_pos, half] cosines followed by [max_pos, half] sines. `sign` = +1 rotates by theta
// (forward), -1 by -theta (the backward: the transpose of a rotation is its inverse).
// A position outside the table writes NaN so the step fails loudly instead of reading past it.
#include "common.cuh"

#define ROPE_THREADS 256

// One thread per (row, head, group of 8 pair indices) when half % 8 == 0, else per pair index.
extern "C" __global__ void __launch_bounds__(ROPE_THREADS)
rope(bf16* x, const int* positions, const float* table, long long n, int heads, int head_dim, int max_pos, float sign) {
    const int half = head_dim / 2;
    const bool vec = (half & 7) == 0;
    const int per_head = vec ? half / 8 : half;
    long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= n * heads * per_head) return;
    const int g = (int)(t % per_head);
    const long long rh = t / per_head;
    const int h = (int)(rh % heads);
    const long long r = rh / heads;
    const int p = positions[r];
    bf16* v = x + r * (long long)heads * head_dim + (long long)h * head_dim;
    if (p < 0 || p >= max_pos) {
        const int i0 = vec ? g * 8 : g, cnt = vec ? 8 : 1;
        for (int i = i0; i < i0 + cnt; i++) {
            v[i] = tobf(NAN);
            v[i + half] = tobf(NAN);
        }
        return;
    }
    const float* cs = table + (long long)p * half;
    const float* sn = table + (long long)max_pos * half + (long long)p * half;
    if (vec) {
        const int i0 = g * 8;
        float a[8], b[8];
        load8(v + i0, a);
        load8(v + i0 + half, b);
        float c[8], s[8];
        *reinterpret_cast<float4*>(c) = *reinterpret_cast<const float4*>(cs + i0);
        *reinterpret_cast<float4*>(c + 4) = *reinterpret_cast<const float4*>(cs + i0 + 4);
        *reinterpret_cast<float4*>(s) = *reinterpret_cast<const float4*>(sn + i0);
        *reinterpret_cast<float4*>(s + 4) = *reinterpret_cast<const float4*>(sn + i0 + 4);
        float o1[8], o2[8];
#pragma unroll
        for (int j = 0; j < 8; j++) {
            const float ss = sign * s[j];
            o1[j] = a[j] * c[j] - b[j] * ss;
            o2[j] = b[j] * c[j] + a[j] * ss;
        }
        store8(v + i0, o1);
        store8(v + i0 + half, o2);
    } else {
        const int i = g;
        const float x1 = bf(v[i]), x2 = bf(v[i + half]);
        const float ss = sign * sn[i];
        v[i] = tobf(x1 * cs[i] - x2 * ss);
        v[i + half] = tobf(x2 * cs[i] + x1 * ss);
    }
}
