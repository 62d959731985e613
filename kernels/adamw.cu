// AdamW on fp32 masters, torch.optim.AdamW semantics (decoupled decay, bias correction folded
// into step_size and bc2_sqrt, which the host computes in f32 exactly as the CPU backend does).
// Optimizer states too (grad_scale does the clipping).
#include "common.cuh"

extern "C" __global__ void __launch_bounds__(256)
adamw(float* param, const float* grad, float* m, float* v, long long n, float decay, float beta1, float beta2,
      float eps, float grad_scale, float step_size, float bc2_sqrt) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float g = grad[i] * grad_scale;
    float p = param[i] * decay;
    const float mi = beta1 * m[i] + (1.f - beta1) * g;
    const float vi = beta2 * v[i] + (1.f - beta2) * g * g;
    m[i] = mi;
    v[i] = vi;
    const float denom = sqrtf(vi) / bc2_sqrt + eps;
    param[i] = p - step_size * mi / denom;
}
