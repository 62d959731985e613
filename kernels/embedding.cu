// Embedding gather (forward), the trainable-row gradient (a deterministic scatter-add: each
// output element sums its rows in row order, no atomics), and set_rows (write trainable rows back
// into the table). An id outside the table writes NaN so the step fails loudly.
#include "common.cuh"

// One block per output row; threads stride over the row in 8-wide chunks when d % 8 == 0.
extern "C" __global__ void __launch_bounds__(256)
embedding_fwd(const int* ids, const bf16* table, bf16* out, int d, int vocab) {
    const long long r = blockIdx.x;
    const int id = ids[r];
    bf16* o = out + r * d;
    if (id < 0 || id >= vocab) {
        for (int c = threadIdx.x; c < d; c += blockDim.x) o[c] = tobf(NAN);
        return;
    }
    const bf16* src = table + (long long)id * d;
    if ((d & 7) == 0) {
        for (int c = threadIdx.x * 8; c < d; c += blockDim.x * 8)
            *reinterpret_cast<uint4*>(o + c) = *reinterpret_cast<const uint4*>(src + c);
    } else {
        for (int c = threadIdx.x; c < d; c += blockDim.x) o[c] = src[c];
    }
}

// grid (k slots, ceil(d / blockDim)); grad_rows[s, c] += sum over rows r with slot(ids[r]) == s
// of dx[r, c], summed in row order.
extern "C" __global__ void __launch_bounds__(256)
embedding_bwd_rows(const bf16* dx, const int* ids, long long n, int d, const int* slot_of_token, int n_tokens,
                   float* grad_rows) {
    const int s = blockIdx.x;
    const int c = blockIdx.y * blockDim.x + threadIdx.x;
    if (c >= d) return;
    float acc = 0.f;
    for (long long r = 0; r < n; r++) {
        const int tok = ids[r];
        const int slot = (tok >= 0 && tok < n_tokens) ? slot_of_token[tok] : -1;
        if (slot == s) acc += bf(dx[r * d + c]);
    }
    grad_rows[(long long)s * d + c] += acc;
}

// table[token_ids[s]] = values[s] for s < k; one block per row s. Source and destination may each
// be f32 or bf16.
template <typename TD, typename TS>
DEVI void set_rows_impl(TD* table, int d, const int* token_ids, const TS* values, int n_rows) {
    const int s = blockIdx.x;
    const int id = token_ids[s];
    if (id < 0 || id >= n_rows) return;
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        float v;
        if constexpr (sizeof(TS) == 4) v = values[(long long)s * d + c];
        else v = bf(values[(long long)s * d + c]);
        if constexpr (sizeof(TD) == 4) table[(long long)id * d + c] = v;
        else table[(long long)id * d + c] = tobf(v);
    }
}

extern "C" __global__ void __launch_bounds__(256)
set_rows_bf16_f32(bf16* table, int d, const int* ids, const float* values, int n_rows) {
    set_rows_impl(table, d, ids, values, n_rows);
}
extern "C" __global__ void __launch_bounds__(256)
set_rows_bf16_bf16(bf16* table, int d, const int* ids, const bf16* values, int n_rows) {
    set_rows_impl(table, d, ids, values, n_rows);
}
extern "C" __global__ void __launch_bounds__(256)
set_rows_f32_f32(float* table, int d, const int* ids, const float* values, int n_rows) {
    set_rows_impl(table, d, ids, values, n_rows);
}
extern "C" __global__ void __launch_bounds__(256)
set_rows_f32_bf16(float* table, int d, const int* ids, const bf16* values, int n_rows) {
    set_rows_impl(table, d, ids, values, n_rows);
}
