// Sum of squares, deterministic: pass 1 runs a grid whose size depends only on n, each block
// summing a fixed strided set of elements in f64 into partial[block]; pass 2 is one block adding
// the partials in a fixed order. Same input, same bits, whatever the scheduling.
#include "common.cuh"

#define RED_THREADS 256

template <typename T>
DEVI void sumsq_partial_impl(const T* x, long long n, double* partial) {
    __shared__ double scratch[RED_THREADS / 32];
    double acc = 0.0;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        double v;
        if constexpr (sizeof(T) == 4) v = (double)x[i];
        else v = (double)bf(x[i]);
        acc += v * v;
    }
    acc = warp_sum_d(acc);
    if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
        double t = 0.0;
        for (int w = 0; w < RED_THREADS / 32; w++) t += scratch[w];
        partial[blockIdx.x] = t;
    }
}

extern "C" __global__ void __launch_bounds__(RED_THREADS) sumsq_partial_f32(const float* x, long long n, double* partial) {
    sumsq_partial_impl(x, n, partial);
}
extern "C" __global__ void __launch_bounds__(RED_THREADS) sumsq_partial_bf16(const bf16* x, long long n, double* partial) {
    sumsq_partial_impl(x, n, partial);
}

// One block: out[0] = sum of partial[0..count] in a fixed order.
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
