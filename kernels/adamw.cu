// AdamW on fp32 masters, torch.optim.AdamW semantics (decoupled decay, bias correction folded
// into step_size and bc2_sqrt, which the host computes in f32 exactly as the CPU backend does).
// Optimizer states too (grad_scale does the clipping).
//
// Multi-tensor: one launch updates up to ADAMW_LIST tensors, whose pointers travel in the kernel's
// parameter space, so a step of hundreds of small LoRA tensors is a handful of launches instead of
// two per tensor (update, then the bf16 cast). Block b of the launch works on tensor t where
// first_block[t] <= b < first_block[t + 1], ADAMW_CHUNK elements of it.
#include "common.cuh"

#define ADAMW_LIST 48
#define ADAMW_THREADS 256
#define ADAMW_CHUNK (ADAMW_THREADS * 4)

// Mirrored by `AdamwList` in src/backend/cuda/mod.rs (repr(C), same order and sizes).
struct AdamwList {
    float* param[ADAMW_LIST];
    const float* grad[ADAMW_LIST];
    float* m[ADAMW_LIST];
    float* v[ADAMW_LIST];
    // The bf16 compute copy refreshed from the updated master, or null where there is none.
    bf16* compute[ADAMW_LIST];
    long long n[ADAMW_LIST];
    int first_block[ADAMW_LIST + 1];
    int count;
};

extern "C" __global__ void __launch_bounds__(ADAMW_THREADS)
adamw_multi(const AdamwList list, float decay, float beta1, float beta2, float eps, float grad_scale, float step_size,
            float bc2_sqrt) {
    int t = 0;
    while (t + 1 < list.count && (int)blockIdx.x >= list.first_block[t + 1]) t++;
    const long long n = list.n[t];
    const long long base = (long long)(blockIdx.x - list.first_block[t]) * ADAMW_CHUNK;
    float* param = list.param[t];
    const float* grad = list.grad[t];
    float* m = list.m[t];
    float* v = list.v[t];
    bf16* compute = list.compute[t];
#pragma unroll
    for (int k = 0; k < ADAMW_CHUNK / ADAMW_THREADS; k++) {
        const long long i = base + k * ADAMW_THREADS + threadIdx.x;
        if (i >= n) break;
        const float g = grad[i] * grad_scale;
        float p = param[i] * decay;
        const float mi = beta1 * m[i] + (1.f - beta1) * g;
        const float vi = beta2 * v[i] + (1.f - beta2) * g * g;
        m[i] = mi;
        v[i] = vi;
        const float denom = sqrtf(vi) / bc2_sqrt + eps;
        p = p - step_size * mi / denom;
        param[i] = p;
        if (compute) compute[i] = tobf(p);
    }
}
