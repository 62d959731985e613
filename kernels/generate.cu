// Generation: what answering needs beyond the training step's kernels.
//  - gemv_nf4 / gemv_bf16: y[n, out] = x[n, in] · Wᵀ for a few rows (decode is memory-bound: the
//    weight is read once, NF4 decoded in registers, never written to a bf16 scratch), with the
//    bias and the LoRA up-projection fused in: y[r] += row_scale[r] · xa[r] · Bᵀ (row_scale is the
//    adapter's scale on fine-tuned rows and 0 on base rows). gemv_bf16 also gives xa = x · Aᵀ and
//    the f32 logits.
//  - kv_store: new keys/values into the cache rows of (slot, position).
//  - attn_cached_part / attn_cached_combine: attention of query rows over their sequence's
//    cached keys, split over key ranges (flash-decoding) so a batch-1 decode still fills the card.
//  - scale_rows_bf16: the per-row adapter switch for the GEMM path (prefill).
// Every kernel reads positions and slots from device memory, never from launch arguments.
// Compiled for the host emulator (kernels/dev/emu/generate_main.cpp) with TUNESTUDIO_EMU defined.
#include "common.cuh"

// The emulator's emu.h declares dynamic shared memory its own way.
#ifndef TUNESTUDIO_EMU
#define DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

// Rows one GEMV launch serves (the decode batch); more rows go through the GEMM path.
#define GEMV_MAX_ROWS 8
#define GEMV_THREADS 256
#define GEMV_WARPS 8
// Keys per tile of the cached attention (one per thread).
#define ATTC_THREADS 128
// Query heads per kv head times head_dim that one block's registers hold (16 per thread).
#define ATTC_MAX_GROUP_DIM 2048

__device__ const float GEN_NF4_CODE[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f,
    -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f, 0.16093020141124725f,
    0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

// The warps of a block split into groups of `wpr` (1, 2, 4 or 8) warps per output row: few
// output rows (LoRA's A, the k/v projections of a small model) still spread over the card.
// Each warp sums its share, then the group's partial sums meet in shared memory. Adds the LoRA
// term (once per row, by the group's first warp) and the bias; writes bf16, or f32 when y_f32.
DEVI void gemv_finish(float* acc, int n, int o, int out, int sub, int wpr, float* part, const bf16* bias, const bf16* lora_b,
                      const bf16* xa, const float* row_scale, int rank, void* y, int y_f32) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const bool live = o < out;
    if (live && lora_b != nullptr && sub == 0) {
        for (int j = lane; j < rank; j += 32) {
            const float bj = bf(lora_b[(long long)o * rank + j]);
#pragma unroll
            for (int r = 0; r < GEMV_MAX_ROWS; r++)
                if (r < n) acc[r] += row_scale[r] * bf(xa[(long long)r * rank + j]) * bj;
        }
    }
#pragma unroll
    for (int r = 0; r < GEMV_MAX_ROWS; r++) acc[r] = warp_sum(acc[r]);
    if (lane == 0) {
#pragma unroll
        for (int r = 0; r < GEMV_MAX_ROWS; r++) part[warp * GEMV_MAX_ROWS + r] = acc[r];
    }
    __syncthreads();
    if (!live || sub != 0 || lane >= n) return;
    const int r = lane;
    float s = 0.f;
    for (int w = warp; w < warp + wpr; w++) s += part[w * GEMV_MAX_ROWS + r];
    if (bias != nullptr) s += bf(bias[o]);
    if (y_f32)
        reinterpret_cast<float*>(y)[(long long)r * out + o] = s;
    else
        reinterpret_cast<bf16*>(y)[(long long)r * out + o] = tobf(s);
}

// NF4 weight [out, in] in the bitsandbytes layout (see nf4.cu); `in` a multiple of 32, so each
// lane's 32 codes (16 bytes) lie in one 64-element quantization block. Dynamic shared memory:
// (16 + GEMV_WARPS * GEMV_MAX_ROWS) floats.
extern "C" __global__ void __launch_bounds__(GEMV_THREADS)
gemv_nf4(const bf16* x, int n, const unsigned char* packed, const unsigned char* absmax_q, const float* absmax2, const float* code2,
         float offset, int out, int in, const bf16* bias, const bf16* lora_b, const bf16* xa, const float* row_scale, int rank, bf16* y,
         int wpr) {
    DYNAMIC_SMEM(smem);
    float* sm = reinterpret_cast<float*>(smem);
    float* code = sm;
    float* part = sm + 16;
    if (threadIdx.x < 16) code[threadIdx.x] = GEN_NF4_CODE[threadIdx.x];
    __syncthreads();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int o = blockIdx.x * (GEMV_WARPS / wpr) + warp / wpr, sub = warp % wpr;
    float acc[GEMV_MAX_ROWS];
#pragma unroll
    for (int r = 0; r < GEMV_MAX_ROWS; r++) acc[r] = 0.f;
    if (o < out) {
        const long long row0 = (long long)o * in;
        for (int c = sub; c * 1024 < in; c += wpr) {
            const int i0 = c * 1024 + lane * 32;
            if (i0 >= in) continue;
            const long long e0 = row0 + i0;
            const long long blk = e0 >> 6;
            const float a = __fmul_rn(code2[absmax_q[blk]], absmax2[blk >> 8]) + offset;
            const uint4 q = *reinterpret_cast<const uint4*>(packed + (e0 >> 1));
            const unsigned int words[4] = {q.x, q.y, q.z, q.w};
            float sr[GEMV_MAX_ROWS];
#pragma unroll
            for (int r = 0; r < GEMV_MAX_ROWS; r++) sr[r] = 0.f;
#pragma unroll
            for (int k = 0; k < 4; k++) {
                float w[8];
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    // Byte j of the word (little-endian: the earlier byte in memory is lower).
                    const unsigned int byte = (words[k] >> (8 * j)) & 0xffu;
                    w[2 * j] = code[byte >> 4];
                    w[2 * j + 1] = code[byte & 15];
                }
#pragma unroll
                for (int r = 0; r < GEMV_MAX_ROWS; r++) {
                    if (r < n) {
                        float xv[8];
                        load8(x + (long long)r * in + i0 + 8 * k, xv);
#pragma unroll
                        for (int t = 0; t < 8; t++) sr[r] += xv[t] * w[t];
                    }
                }
            }
#pragma unroll
            for (int r = 0; r < GEMV_MAX_ROWS; r++) acc[r] += sr[r] * a;
        }
    }
    gemv_finish(acc, n, o, out, sub, wpr, part, bias, lora_b, xa, row_scale, rank, y, 0);
}

// bf16 weight [out, in], `in` a multiple of 8. Dynamic shared memory: GEMV_WARPS * GEMV_MAX_ROWS
// floats. With y_f32 the output is f32 (the logits).
extern "C" __global__ void __launch_bounds__(GEMV_THREADS)
gemv_bf16(const bf16* x, int n, const bf16* wt, int out, int in, const bf16* bias, const bf16* lora_b, const bf16* xa,
          const float* row_scale, int rank, void* y, int y_f32, int wpr) {
    DYNAMIC_SMEM(smem);
    float* part = reinterpret_cast<float*>(smem);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int o = blockIdx.x * (GEMV_WARPS / wpr) + warp / wpr, sub = warp % wpr;
    float acc[GEMV_MAX_ROWS];
#pragma unroll
    for (int r = 0; r < GEMV_MAX_ROWS; r++) acc[r] = 0.f;
    if (o < out) {
        const bf16* wr = wt + (long long)o * in;
        for (int c = sub; c * 256 < in; c += wpr) {
            const int i0 = c * 256 + lane * 8;
            if (i0 >= in) continue;
            float w[8];
            load8(wr + i0, w);
#pragma unroll
            for (int r = 0; r < GEMV_MAX_ROWS; r++) {
                if (r >= n) break;
                float xv[8];
                load8(x + (long long)r * in + i0, xv);
#pragma unroll
                for (int t = 0; t < 8; t++) acc[r] += xv[t] * w[t];
            }
        }
    }
    gemv_finish(acc, n, o, out, sub, wpr, part, bias, lora_b, xa, row_scale, rank, y, y_f32);
}

// One thread per 8 elements of the n × width rows; `width` a multiple of 8. A row whose slot or
// position is outside the cache is not written (the attention then reports it as NaN).
extern "C" __global__ void __launch_bounds__(256)
kv_store(const bf16* src, long long n, int width, const int* slots, const int* positions, int capacity, int slot_count, bf16* cache) {
    const long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const int per_row = width / 8;
    if (t >= n * per_row) return;
    const long long r = t / per_row;
    const int c = (int)(t % per_row) * 8;
    const int s = slots[r], p = positions[r];
    if (s < 0 || s >= slot_count || p < 0 || p >= capacity) return;
    const long long dst = ((long long)s * capacity + p) * width + c;
    *reinterpret_cast<uint4*>(cache + dst) = *reinterpret_cast<const uint4*>(src + r * width + c);
}

// The keys query row r sees: [lo, hi] (inclusive), or an empty range when its slot or position is
// outside the cache (then `bad`).
DEVI void attc_range(int pos, int slot, int capacity, int slot_count, int window, int& lo, int& hi, bool& bad) {
    bad = slot < 0 || slot >= slot_count || pos < 0 || pos >= capacity;
    hi = bad ? -1 : pos;
    lo = (window > 0 && pos + 1 > window) ? pos + 1 - window : 0;
}

// Grid (kv_heads, n, splits), ATTC_THREADS threads. Block (kh, r, s) runs the `group` query heads
// of kv head kh for row r over split s of its key range (split_len keys), ATTC_THREADS keys a tile:
// scores (one key per thread), the online softmax of each head (one thread per head), then
// o = o·α + Σ p·v with each thread owning (head, dim) pairs. With one split the result is
// normalized into `out`; otherwise (o, m, l) go to `part` [n][heads][splits][hd + 2] for
// attn_cached_combine. Dynamic shared memory: group·hd + group·ATTC_THREADS + 3·group floats.
extern "C" __global__ void __launch_bounds__(ATTC_THREADS)
attn_cached_part(const bf16* q, const bf16* kc, const bf16* vc, const int* slots, const int* positions, int heads, int kv_heads,
                 int hd, int capacity, int slot_count, float scale, int window, int split_len, float* part, bf16* out) {
    DYNAMIC_SMEM(smem);
    float* sm = reinterpret_cast<float*>(smem);
    const int kh = blockIdx.x, r = blockIdx.y, s = blockIdx.z, splits = gridDim.z;
    const int group = heads / kv_heads, gd = group * hd, kvw = kv_heads * hd;
    float* qs = sm;                              // [group][hd], scaled
    float* sc = qs + gd;                         // [group][ATTC_THREADS] scores, then weights
    float* mrun = sc + group * ATTC_THREADS;     // running max per head
    float* lrun = mrun + group;                  // running sum per head
    float* alpha = lrun + group;                 // rescale of the accumulators this tile
    const int pos = positions[r], slot = slots[r];
    int lo, hi;
    bool bad;
    attc_range(pos, slot, capacity, slot_count, window, lo, hi, bad);
    const int j0 = lo + s * split_len, j1 = min(hi + 1, lo + (s + 1) * split_len);
    const bf16* qr = q + (long long)r * heads * hd + (long long)kh * group * hd;
    for (int i = threadIdx.x; i < gd; i += ATTC_THREADS) qs[i] = bf(qr[i]) * scale;
    if (threadIdx.x < group) {
        mrun[threadIdx.x] = -INFINITY;
        lrun[threadIdx.x] = 0.f;
    }
    float o[ATTC_MAX_GROUP_DIM / ATTC_THREADS];
#pragma unroll
    for (int k = 0; k < ATTC_MAX_GROUP_DIM / ATTC_THREADS; k++) o[k] = 0.f;
    __syncthreads();
    const long long base = (long long)(bad ? 0 : slot) * capacity;
    for (int t0 = j0; t0 < j1; t0 += ATTC_THREADS) {
        const int j = t0 + threadIdx.x;
        if (j < j1) {
            const bf16* kr = kc + (base + j) * kvw + (long long)kh * hd;
            for (int g = 0; g < group; g++) sc[g * ATTC_THREADS + threadIdx.x] = 0.f;
            for (int d = 0; d < hd; d += 8) {
                float kv8[8];
                load8(kr + d, kv8);
                for (int g = 0; g < group; g++) {
                    float acc = 0.f;
#pragma unroll
                    for (int e = 0; e < 8; e++) acc += qs[g * hd + d + e] * kv8[e];
                    sc[g * ATTC_THREADS + threadIdx.x] += acc;
                }
            }
        } else {
            for (int g = 0; g < group; g++) sc[g * ATTC_THREADS + threadIdx.x] = -INFINITY;
        }
        __syncthreads();
        const int count = min(ATTC_THREADS, j1 - t0);
        if (threadIdx.x < group) {
            const int g = threadIdx.x;
            float* sg = sc + g * ATTC_THREADS;
            float m = mrun[g];
            for (int t = 0; t < count; t++) m = fmaxf(m, sg[t]);
            float l = 0.f;
            for (int t = 0; t < count; t++) {
                sg[t] = __expf(sg[t] - m);
                l += sg[t];
            }
            const float a = __expf(mrun[g] - m);
            alpha[g] = a;
            lrun[g] = lrun[g] * a + l;
            mrun[g] = m;
        }
        __syncthreads();
#pragma unroll
        for (int k = 0; k < ATTC_MAX_GROUP_DIM / ATTC_THREADS; k++) {
            const int i = threadIdx.x + k * ATTC_THREADS;
            if (i >= gd) break;
            const int g = i / hd, d = i % hd;
            const float* pg = sc + g * ATTC_THREADS;
            const bf16* vcol = vc + (base + t0) * kvw + (long long)kh * hd + d;
            float acc = o[k] * alpha[g];
            for (int t = 0; t < count; t++) acc += pg[t] * bf(vcol[(long long)t * kvw]);
            o[k] = acc;
        }
        __syncthreads();
    }
#pragma unroll
    for (int k = 0; k < ATTC_MAX_GROUP_DIM / ATTC_THREADS; k++) {
        const int i = threadIdx.x + k * ATTC_THREADS;
        if (i >= gd) break;
        const int g = i / hd, d = i % hd, h = kh * group + g;
        if (splits == 1) {
            const float v = bad ? NAN : o[k] / lrun[g];
            out[(long long)r * heads * hd + (long long)h * hd + d] = tobf(v);
        } else {
            float* pr = part + (((long long)r * heads + h) * splits + s) * (hd + 2);
            pr[d] = bad ? NAN : o[k];
            if (d == 0) {
                pr[hd] = mrun[g];
                pr[hd + 1] = lrun[g];
            }
        }
    }
}

// Grid (heads, n), hd threads: the splits of one (row, head) merged by their maxima.
extern "C" __global__ void __launch_bounds__(256)
attn_cached_combine(const float* part, int heads, int hd, int splits, bf16* out) {
    const int h = blockIdx.x, r = blockIdx.y, d = threadIdx.x;
    if (d >= hd) return;
    const float* pr = part + ((long long)r * heads + h) * splits * (hd + 2);
    float m = -INFINITY;
    for (int s = 0; s < splits; s++)
        if (pr[s * (hd + 2) + hd + 1] > 0.f) m = fmaxf(m, pr[s * (hd + 2) + hd]);
    float acc = 0.f, l = 0.f;
    for (int s = 0; s < splits; s++) {
        const float* ps = pr + s * (hd + 2);
        if (!(ps[hd + 1] > 0.f) && !isnan(ps[d])) continue;
        const float a = __expf(ps[hd] - m);
        acc += a * ps[d];
        l += a * ps[hd + 1];
    }
    out[(long long)r * heads * hd + (long long)h * hd + d] = tobf(acc / l);
}

// x[r, :] *= row_scale[r] on n rows of `width` (the LoRA branch's switch on the GEMM path).
extern "C" __global__ void __launch_bounds__(256) scale_rows_bf16(bf16* x, const float* row_scale, long long n, int width) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n * width) return;
    x[i] = tobf(bf(x[i]) * row_scale[i / width]);
}
