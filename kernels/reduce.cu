// Sum of squares, deterministic: pass 1 runs a grid whose size depends only on the sizes, each
// block summing a fixed set of elements in f64 into partial[block]; pass 2 is one block adding
// the partials in a fixed order. Same input, same bits, whatever the scheduling.
#include "common.cuh"

#define RED_THREADS 256

// Multi-tensor: one launch covers up to SUMSQ_LIST tensors (or pieces of tensors), whose
// pointers travel in the kernel's parameter space, so the step's gradient norm is a few launches
// and one wait instead of a launch pair and a wait per tensor. Block b sums SUMSQ_CHUNK elements
// of piece t, where first_block[t] <= b < first_block[t + 1], into partial[b]; the pieces and
// their blocks depend only on the tensors' sizes, so the sum does too.
#define SUMSQ_LIST 96
#define SUMSQ_CHUNK (RED_THREADS * 32)

// Mirrored by `SumsqList` in src/backend/cuda/mod.rs (repr(C), same order and sizes).
struct SumsqList {
    const void* ptr[SUMSQ_LIST];
    long long n[SUMSQ_LIST];
    int first_block[SUMSQ_LIST + 1];
    int is_bf16[SUMSQ_LIST];
    int count;
};

extern "C" __global__ void __launch_bounds__(RED_THREADS) sumsq_partial_multi(const SumsqList list, double* partial) {
    __shared__ double scratch[RED_THREADS / 32];
    int t = 0;
    while (t + 1 < list.count && (int)blockIdx.x >= list.first_block[t + 1]) t++;
    const long long base = (long long)(blockIdx.x - list.first_block[t]) * SUMSQ_CHUNK;
    const long long end = min(list.n[t], base + SUMSQ_CHUNK);
    double acc = 0.0;
    if (list.is_bf16[t]) {
        const bf16* x = (const bf16*)list.ptr[t];
        for (long long i = base + threadIdx.x; i < end; i += RED_THREADS) {
            const double v = (double)bf(x[i]);
            acc += v * v;
        }
    } else {
        const float* x = (const float*)list.ptr[t];
        for (long long i = base + threadIdx.x; i < end; i += RED_THREADS) {
            const double v = (double)x[i];
            acc += v * v;
        }
    }
    acc = warp_sum_d(acc);
    if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
        double s = 0.0;
        for (int w = 0; w < RED_THREADS / 32; w++) s += scratch[w];
        partial[blockIdx.x] = s;
    }
}

// One block: out[0] = sum of partial[0..count] in a fixed order (`out` may point into an array of
// results, one per launch of pass 1).
extern "C" __global__ void __launch_bounds__(RED_THREADS) sum_partials(const double* partial, int count, double* out) {
    __shared__ double scratch[RED_THREADS / 32];
    double acc = 0.0;
    for (int i = threadIdx.x; i < count; i += blockDim.x) acc += partial[i];
    acc = warp_sum_d(acc);
    if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
        double t = 0.0;
        for (int w = 0; w < RED_THREADS / 32; w++) t += scratch[w];
        out[0] = t;
    }
}
