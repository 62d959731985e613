// Causal flash attention, forward and backward, with GQA and packed sequences (a query sees keys
// at or before it with the same segment id). O(seq) memory: the forward saves only the
// log-sum-exp per (row, head); the backward recomputes the probabilities from it.
//
// Layout: q [batch * seq, heads * HD], k and v [batch * seq, kv_heads * HD], out like q,
// lse [batch * seq, heads] (f32). Row of token t of sequence b is b * seq + t.
//
// Version 1, correct and simple: tensor cores through WMMA (bf16 16x16x16, f32 accumulate),
// tiles of 64 queries x 64 keys, 4 warps per block, each warp owning 16 rows of the tile.
// Scores go through shared memory for the softmax; no cp.async pipelining yet.
//   attn_fwd_HD      grid (query tiles, heads, batch)
//   attn_bwd_dkdv_HD grid (key tiles, kv_heads, batch): dK, dV of a key tile, summed over the
//                    GQA group and every query tile at or after it; no atomics.
//   attn_bwd_dq_HD   grid (query tiles, heads, batch): dQ of a query tile.
// The backward recomputes D = rowsum(dO * O) where it needs it, so it needs no scratch buffer
// and is deterministic.
#include "common.cuh"
#include <mma.h>
#include <limits.h>
using namespace nvcuda;

#define ATT_TILE 64
#define ATT_WARPS 4
#define ATT_THREADS 128
#define LOG2E_F 1.4426950408889634f
#define LN2_F 0.6931471805599453f

typedef wmma::fragment<wmma::accumulator, 16, 16, 16, float> FragC;
typedef wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> FragA;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> FragBr;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> FragBc;

template <int HD>
struct Att {
    static constexpr int LDT = HD + 8;                     // bf16 tile row stride (elements)
    static constexpr int TILE = ATT_TILE * LDT;            // bf16 elements per tile
    static constexpr int LDS = 68;                         // f32 per-warp score scratch stride
    static constexpr int LDO = HD + 4;                     // f32 per-warp output scratch stride
    static constexpr int LDP = ATT_TILE + 8;               // bf16 per-warp P / dS stride
    static constexpr int FWD_SCR = 16 * (LDO > LDS ? LDO : LDS);  // f32 per warp, forward
    static constexpr size_t FWD_SMEM =
        3 * TILE * 2 + ATT_WARPS * FWD_SCR * 4 + ATT_WARPS * 16 * LDP * 2 + 2 * ATT_TILE * 4;
    static constexpr size_t DKDV_SMEM =
        4 * TILE * 2 + ATT_WARPS * 16 * LDS * 4 + 2 * ATT_WARPS * 16 * LDP * 2 + 4 * ATT_TILE * 4;
    static constexpr size_t DQ_SMEM =
        4 * TILE * 2 + ATT_WARPS * 16 * LDS * 4 + ATT_WARPS * 16 * LDP * 2 + 4 * ATT_TILE * 4;
};

// Rows [row0, row0 + valid) of a [*, width] matrix, columns [col, col + HD), into a padded smem
// tile; rows past `valid` are zero.
template <int HD>
DEVI void load_tile(bf16* dst, const bf16* src, long long row0, int valid, int width, int col) {
    constexpr int PER_ROW = HD / 8;
    for (int i = threadIdx.x; i < ATT_TILE * PER_ROW; i += ATT_THREADS) {
        const int r = i / PER_ROW, c = (i % PER_ROW) * 8;
        uint4 v = make_uint4(0u, 0u, 0u, 0u);
        if (r < valid) v = *reinterpret_cast<const uint4*>(src + (row0 + r) * width + col + c);
        *reinterpret_cast<uint4*>(dst + r * Att<HD>::LDT + c) = v;
    }
}

// out[16 x 64] (f32, stride ldo) = A[16 x HD] . B^T where B is 64 rows of HD (both smem tiles).
template <int HD>
DEVI void mm_abt(float* out, int ldo, const bf16* a, const bf16* b) {
#pragma unroll
    for (int c = 0; c < 4; c++) {
        FragC acc;
        wmma::fill_fragment(acc, 0.f);
#pragma unroll
        for (int kk = 0; kk < HD / 16; kk++) {
            FragA fa;
            FragBc fb;
            wmma::load_matrix_sync(fa, a + kk * 16, Att<HD>::LDT);
            wmma::load_matrix_sync(fb, b + c * 16 * Att<HD>::LDT + kk * 16, Att<HD>::LDT);
            wmma::mma_sync(acc, fa, fb, acc);
        }
        wmma::store_matrix_sync(out + c * 16, acc, ldo, wmma::mem_row_major);
    }
}

// D[i] = sum_c dO[i, c] * O[i, c] for the 64 rows of a query tile (dO from smem, O from global).
template <int HD>
DEVI void row_dot_do_o(float* sD, const bf16* sdO, const bf16* o, long long row0, int valid, int width, int col) {
    const int row = threadIdx.x >> 1, part = threadIdx.x & 1;
    float acc = 0.f;
    if (row < valid) {
#pragma unroll
        for (int c = part * (HD / 2); c < (part + 1) * (HD / 2); c += 8) {
            float a[8], b[8];
            load8(sdO + row * Att<HD>::LDT + c, a);
            load8(o + (row0 + row) * width + col + c, b);
#pragma unroll
            for (int j = 0; j < 8; j++) acc += a[j] * b[j];
        }
    }
    acc += __shfl_xor_sync(0xffffffffu, acc, 1);
    if (part == 0) sD[row] = acc;
}

// The launcher computes the dynamic shared memory from the same formulas (backend/cuda/mod.rs,
// `attn_smem_bytes`); a kernel given less traps instead of writing past its allocation.
DEVI void require_smem(size_t need) {
    unsigned int have;
    asm volatile("mov.u32 %0, %%dynamic_smem_size;" : "=r"(have));
    if (have < need) __trap();
}

template <int HD>
DEVI void attn_fwd_impl(const bf16* q, const bf16* k, const bf16* v, const int* seg, bf16* out, float* lse, int seq,
                        int heads, int kv_heads, float scale) {
    using A = Att<HD>;
    require_smem(A::FWD_SMEM);
    extern __shared__ __align__(128) unsigned char smem[];
    bf16* sQ = reinterpret_cast<bf16*>(smem);
    bf16* sK = sQ + A::TILE;
    bf16* sV = sK + A::TILE;
    float* sScr = reinterpret_cast<float*>(sV + A::TILE);
    bf16* sP = reinterpret_cast<bf16*>(sScr + ATT_WARPS * A::FWD_SCR);
    int* sSegQ = reinterpret_cast<int*>(sP + ATT_WARPS * 16 * A::LDP);
    int* sSegK = sSegQ + ATT_TILE;

    const int qt = gridDim.x - 1 - blockIdx.x;  // the longest rows first
    const int h = blockIdx.y, b = blockIdx.z;
    const int kh = h / (heads / kv_heads);
    const int qw = heads * HD, kw = kv_heads * HD;
    const long long base = (long long)b * seq;
    const int q0 = qt * ATT_TILE, qrows = min(ATT_TILE, seq - q0);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int r = lane & 15, half = lane >> 4;
    const int qi = q0 + warp * 16 + r;
    const float sl2 = scale * LOG2E_F;
    float* scr = sScr + warp * A::FWD_SCR;
    bf16* pw = sP + warp * 16 * A::LDP;

    load_tile<HD>(sQ, q, base + q0, qrows, qw, h * HD);
    if (threadIdx.x < ATT_TILE) sSegQ[threadIdx.x] = threadIdx.x < qrows ? seg[base + q0 + threadIdx.x] : INT_MIN;

    float o[HD / 2];
#pragma unroll
    for (int j = 0; j < HD / 2; j++) o[j] = 0.f;
    float m = -INFINITY, l = 0.f;  // running max (log2 units) and sum for this lane's row

    for (int kt = 0; kt <= qt; kt++) {
        const int k0 = kt * ATT_TILE, krows = min(ATT_TILE, seq - k0);
        __syncthreads();
        load_tile<HD>(sK, k, base + k0, krows, kw, kh * HD);
        load_tile<HD>(sV, v, base + k0, krows, kw, kh * HD);
        if (threadIdx.x < ATT_TILE) sSegK[threadIdx.x] = threadIdx.x < krows ? seg[base + k0 + threadIdx.x] : INT_MIN + 1;
        __syncthreads();

        mm_abt<HD>(scr, A::LDS, sQ + warp * 16 * A::LDT, sK);
        __syncwarp();
        const int segq = sSegQ[warp * 16 + r];
        float sv[32];
        float mx = -INFINITY;
#pragma unroll
        for (int j = 0; j < 32; j++) {
            const int col = half * 32 + j;
            const bool ok = (k0 + col <= qi) && (col < krows) && (sSegK[col] == segq);
            sv[j] = ok ? scr[r * A::LDS + col] * sl2 : -INFINITY;
            mx = fmaxf(mx, sv[j]);
        }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 16));
        const float mnew = fmaxf(m, mx);
        const float mu = mnew == -INFINITY ? 0.f : mnew;
        const float alpha = exp2f(m - mu);
        float ps = 0.f;
#pragma unroll
        for (int j = 0; j < 32; j++) {
            const float p = exp2f(sv[j] - mu);
            ps += p;
            pw[r * A::LDP + half * 32 + j] = tobf(p);
        }
        ps += __shfl_xor_sync(0xffffffffu, ps, 16);
        l = l * alpha + ps;
        m = mnew;
#pragma unroll
        for (int j = 0; j < HD / 2; j++) o[j] *= alpha;
        __syncwarp();

        // P (16 x 64) . V (64 x HD) into the scratch, then added to this lane's share of O.
#pragma unroll
        for (int c = 0; c < HD / 16; c++) {
            FragC acc;
            wmma::fill_fragment(acc, 0.f);
#pragma unroll
            for (int kk = 0; kk < 4; kk++) {
                FragA fa;
                FragBr fb;
                wmma::load_matrix_sync(fa, pw + kk * 16, A::LDP);
                wmma::load_matrix_sync(fb, sV + kk * 16 * A::LDT + c * 16, A::LDT);
                wmma::mma_sync(acc, fa, fb, acc);
            }
            wmma::store_matrix_sync(scr + c * 16, acc, A::LDO, wmma::mem_row_major);
        }
        __syncwarp();
#pragma unroll
        for (int j = 0; j < HD / 2; j += 4) {
            const float4 t = *reinterpret_cast<const float4*>(scr + r * A::LDO + half * (HD / 2) + j);
            o[j] += t.x;
            o[j + 1] += t.y;
            o[j + 2] += t.z;
            o[j + 3] += t.w;
        }
    }
    if (qi < seq) {
        const float inv = 1.f / l;
#pragma unroll
        for (int j = 0; j < HD / 2; j++) o[j] *= inv;
        bf16* orow = out + (base + qi) * qw + h * HD + half * (HD / 2);
#pragma unroll
        for (int j = 0; j < HD / 2; j += 8) store8(orow + j, o + j);
        if (half == 0) lse[(base + qi) * heads + h] = (m + log2f(l)) * LN2_F;
    }
}

template <int HD>
DEVI void attn_bwd_dkdv_impl(const bf16* q, const bf16* k, const bf16* v, const bf16* o, const bf16* dout,
                             const float* lse, const int* seg, bf16* dk, bf16* dv, int seq, int heads, int kv_heads,
                             float scale) {
    using A = Att<HD>;
    require_smem(A::DKDV_SMEM);
    extern __shared__ __align__(128) unsigned char smem[];
    bf16* sK = reinterpret_cast<bf16*>(smem);
    bf16* sV = sK + A::TILE;
    bf16* sQ = sV + A::TILE;
    bf16* sdO = sQ + A::TILE;
    float* sScr = reinterpret_cast<float*>(sdO + A::TILE);
    bf16* sPt = reinterpret_cast<bf16*>(sScr + ATT_WARPS * 16 * A::LDS);
    bf16* sdSt = sPt + ATT_WARPS * 16 * A::LDP;
    float* sLse = reinterpret_cast<float*>(sdSt + ATT_WARPS * 16 * A::LDP);
    float* sD = sLse + ATT_TILE;
    int* sSegQ = reinterpret_cast<int*>(sD + ATT_TILE);
    int* sSegK = sSegQ + ATT_TILE;

    const int kt = blockIdx.x;
    const int kvh = blockIdx.y, b = blockIdx.z;
    const int group = heads / kv_heads;
    const int qw = heads * HD, kw = kv_heads * HD;
    const long long base = (long long)b * seq;
    const int k0 = kt * ATT_TILE, krows = min(ATT_TILE, seq - k0);
    const int nqt = (seq + ATT_TILE - 1) / ATT_TILE;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int kr = lane & 15, half = lane >> 4;
    const int kj = k0 + warp * 16 + kr;
    const float sl2 = scale * LOG2E_F;
    float* scr = sScr + warp * 16 * A::LDS;
    bf16* pw = sPt + warp * 16 * A::LDP;
    bf16* dsw = sdSt + warp * 16 * A::LDP;

    load_tile<HD>(sK, k, base + k0, krows, kw, kvh * HD);
    load_tile<HD>(sV, v, base + k0, krows, kw, kvh * HD);
    if (threadIdx.x < ATT_TILE) sSegK[threadIdx.x] = threadIdx.x < krows ? seg[base + k0 + threadIdx.x] : INT_MIN + 1;

    FragC dk_acc[HD / 16], dv_acc[HD / 16];
#pragma unroll
    for (int c = 0; c < HD / 16; c++) {
        wmma::fill_fragment(dk_acc[c], 0.f);
        wmma::fill_fragment(dv_acc[c], 0.f);
    }

    for (int g = 0; g < group; g++) {
        const int h = kvh * group + g;
        for (int qt = kt; qt < nqt; qt++) {
            const int q0 = qt * ATT_TILE, qrows = min(ATT_TILE, seq - q0);
            __syncthreads();
            load_tile<HD>(sQ, q, base + q0, qrows, qw, h * HD);
            load_tile<HD>(sdO, dout, base + q0, qrows, qw, h * HD);
            if (threadIdx.x < ATT_TILE) {
                const bool ok = threadIdx.x < qrows;
                sSegQ[threadIdx.x] = ok ? seg[base + q0 + threadIdx.x] : INT_MIN;
                sLse[threadIdx.x] = ok ? lse[(base + q0 + threadIdx.x) * heads + h] * LOG2E_F : 0.f;
            }
            __syncthreads();
            row_dot_do_o<HD>(sD, sdO, o, base + q0, qrows, qw, h * HD);
            __syncthreads();

            // S^T (16 keys x 64 queries) = K_w . Q^T, then P^T.
            mm_abt<HD>(scr, A::LDS, sK + warp * 16 * A::LDT, sQ);
            __syncwarp();
            const int segk = sSegK[warp * 16 + kr];
            float p[32];
#pragma unroll
            for (int j = 0; j < 32; j++) {
                const int col = half * 32 + j;
                const bool ok = (q0 + col >= kj) && (col < qrows) && (kj < seq) && (sSegQ[col] == segk);
                p[j] = ok ? exp2f(scr[kr * A::LDS + col] * sl2 - sLse[col]) : 0.f;
                pw[kr * A::LDP + col] = tobf(p[j]);
            }
            __syncwarp();
            // dP^T = V_w . dO^T, then dS^T = P^T * (dP^T - D) * scale.
            mm_abt<HD>(scr, A::LDS, sV + warp * 16 * A::LDT, sdO);
            __syncwarp();
#pragma unroll
            for (int j = 0; j < 32; j++) {
                const int col = half * 32 + j;
                dsw[kr * A::LDP + col] = tobf(p[j] * (scr[kr * A::LDS + col] - sD[col]) * scale);
            }
            __syncwarp();
            // dV_w += P^T . dO ; dK_w += dS^T . Q
#pragma unroll
            for (int c = 0; c < HD / 16; c++) {
#pragma unroll
                for (int kk = 0; kk < 4; kk++) {
                    FragA fa;
                    FragBr fb;
                    wmma::load_matrix_sync(fa, pw + kk * 16, A::LDP);
                    wmma::load_matrix_sync(fb, sdO + kk * 16 * A::LDT + c * 16, A::LDT);
                    wmma::mma_sync(dv_acc[c], fa, fb, dv_acc[c]);
                    wmma::load_matrix_sync(fa, dsw + kk * 16, A::LDP);
                    wmma::load_matrix_sync(fb, sQ + kk * 16 * A::LDT + c * 16, A::LDT);
                    wmma::mma_sync(dk_acc[c], fa, fb, dk_acc[c]);
                }
            }
        }
    }
    // Epilogue: stage each warp's 16 x HD results through the (now free) Q / dO tiles.
    __syncthreads();
    float* stage = reinterpret_cast<float*>(sQ) + warp * 16 * A::LDO;
    const long long out_off = (base + kj) * kw + kvh * HD + half * (HD / 2);
#pragma unroll
    for (int c = 0; c < HD / 16; c++) wmma::store_matrix_sync(stage + c * 16, dk_acc[c], A::LDO, wmma::mem_row_major);
    __syncwarp();
    if (kj < seq) {
#pragma unroll
        for (int j = 0; j < HD / 2; j += 8) store8(dk + out_off + j, stage + kr * A::LDO + half * (HD / 2) + j);
    }
    __syncwarp();
#pragma unroll
    for (int c = 0; c < HD / 16; c++) wmma::store_matrix_sync(stage + c * 16, dv_acc[c], A::LDO, wmma::mem_row_major);
    __syncwarp();
    if (kj < seq) {
#pragma unroll
        for (int j = 0; j < HD / 2; j += 8) store8(dv + out_off + j, stage + kr * A::LDO + half * (HD / 2) + j);
    }
}

template <int HD>
DEVI void attn_bwd_dq_impl(const bf16* q, const bf16* k, const bf16* v, const bf16* o, const bf16* dout,
                           const float* lse, const int* seg, bf16* dq, int seq, int heads, int kv_heads, float scale) {
    using A = Att<HD>;
    require_smem(A::DQ_SMEM);
    extern __shared__ __align__(128) unsigned char smem[];
    bf16* sQ = reinterpret_cast<bf16*>(smem);
    bf16* sdO = sQ + A::TILE;
    bf16* sK = sdO + A::TILE;
    bf16* sV = sK + A::TILE;
    float* sScr = reinterpret_cast<float*>(sV + A::TILE);
    bf16* sdS = reinterpret_cast<bf16*>(sScr + ATT_WARPS * 16 * A::LDS);
    float* sLse = reinterpret_cast<float*>(sdS + ATT_WARPS * 16 * A::LDP);
    float* sD = sLse + ATT_TILE;
    int* sSegQ = reinterpret_cast<int*>(sD + ATT_TILE);
    int* sSegK = sSegQ + ATT_TILE;

    const int qt = gridDim.x - 1 - blockIdx.x;
    const int h = blockIdx.y, b = blockIdx.z;
    const int kh = h / (heads / kv_heads);
    const int qw = heads * HD, kw = kv_heads * HD;
    const long long base = (long long)b * seq;
    const int q0 = qt * ATT_TILE, qrows = min(ATT_TILE, seq - q0);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int r = lane & 15, half = lane >> 4;
    const int qi = q0 + warp * 16 + r;
    const float sl2 = scale * LOG2E_F;
    float* scr = sScr + warp * 16 * A::LDS;
    bf16* dsw = sdS + warp * 16 * A::LDP;

    load_tile<HD>(sQ, q, base + q0, qrows, qw, h * HD);
    load_tile<HD>(sdO, dout, base + q0, qrows, qw, h * HD);
    if (threadIdx.x < ATT_TILE) {
        const bool ok = threadIdx.x < qrows;
        sSegQ[threadIdx.x] = ok ? seg[base + q0 + threadIdx.x] : INT_MIN;
        sLse[threadIdx.x] = ok ? lse[(base + q0 + threadIdx.x) * heads + h] * LOG2E_F : 0.f;
    }
    __syncthreads();
    row_dot_do_o<HD>(sD, sdO, o, base + q0, qrows, qw, h * HD);
    __syncthreads();
    const int segq = sSegQ[warp * 16 + r];
    const float lse_r = sLse[warp * 16 + r];
    const float d_r = sD[warp * 16 + r];

    FragC dq_acc[HD / 16];
#pragma unroll
    for (int c = 0; c < HD / 16; c++) wmma::fill_fragment(dq_acc[c], 0.f);

    for (int kt = 0; kt <= qt; kt++) {
        const int k0 = kt * ATT_TILE, krows = min(ATT_TILE, seq - k0);
        __syncthreads();
        load_tile<HD>(sK, k, base + k0, krows, kw, kh * HD);
        load_tile<HD>(sV, v, base + k0, krows, kw, kh * HD);
        if (threadIdx.x < ATT_TILE) sSegK[threadIdx.x] = threadIdx.x < krows ? seg[base + k0 + threadIdx.x] : INT_MIN + 1;
        __syncthreads();

        mm_abt<HD>(scr, A::LDS, sQ + warp * 16 * A::LDT, sK);
        __syncwarp();
        float p[32];
#pragma unroll
        for (int j = 0; j < 32; j++) {
            const int col = half * 32 + j;
            const bool ok = (k0 + col <= qi) && (col < krows) && (qi < seq) && (sSegK[col] == segq);
            p[j] = ok ? exp2f(scr[r * A::LDS + col] * sl2 - lse_r) : 0.f;
        }
        __syncwarp();
        mm_abt<HD>(scr, A::LDS, sdO + warp * 16 * A::LDT, sV);
        __syncwarp();
#pragma unroll
        for (int j = 0; j < 32; j++) {
            const int col = half * 32 + j;
            dsw[r * A::LDP + col] = tobf(p[j] * (scr[r * A::LDS + col] - d_r) * scale);
        }
        __syncwarp();
#pragma unroll
        for (int c = 0; c < HD / 16; c++) {
#pragma unroll
            for (int kk = 0; kk < 4; kk++) {
                FragA fa;
                FragBr fb;
                wmma::load_matrix_sync(fa, dsw + kk * 16, A::LDP);
                wmma::load_matrix_sync(fb, sK + kk * 16 * A::LDT + c * 16, A::LDT);
                wmma::mma_sync(dq_acc[c], fa, fb, dq_acc[c]);
            }
        }
    }
    __syncthreads();
    float* stage = reinterpret_cast<float*>(sK) + warp * 16 * A::LDO;
#pragma unroll
    for (int c = 0; c < HD / 16; c++) wmma::store_matrix_sync(stage + c * 16, dq_acc[c], A::LDO, wmma::mem_row_major);
    __syncwarp();
    if (qi < seq) {
        bf16* dst = dq + (base + qi) * qw + h * HD + half * (HD / 2);
#pragma unroll
        for (int j = 0; j < HD / 2; j += 8) store8(dst + j, stage + r * A::LDO + half * (HD / 2) + j);
    }
}

#define ATT_INSTANCES(HD)                                                                                            \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS)                                                        \
        attn_fwd_##HD(const bf16* q, const bf16* k, const bf16* v, const int* seg, bf16* out, float* lse, int seq,  \
                      int heads, int kv_heads, float scale) {                                                        \
        attn_fwd_impl<HD>(q, k, v, seg, out, lse, seq, heads, kv_heads, scale);                                      \
    }                                                                                                                \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS)                                                        \
        attn_bwd_dkdv_##HD(const bf16* q, const bf16* k, const bf16* v, const bf16* o, const bf16* dout,            \
                           const float* lse, const int* seg, bf16* dk, bf16* dv, int seq, int heads, int kv_heads,   \
                           float scale) {                                                                            \
        attn_bwd_dkdv_impl<HD>(q, k, v, o, dout, lse, seg, dk, dv, seq, heads, kv_heads, scale);                    \
    }                                                                                                                \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS)                                                        \
        attn_bwd_dq_##HD(const bf16* q, const bf16* k, const bf16* v, const bf16* o, const bf16* dout,              \
                         const float* lse, const int* seg, bf16* dq, int seq, int heads, int kv_heads, float scale) { \
        attn_bwd_dq_impl<HD>(q, k, v, o, dout, lse, seg, dq, seq, heads, kv_heads, scale);                          \
    }

ATT_INSTANCES(32)
ATT_INSTANCES(64)
ATT_INSTANCES(96)
ATT_INSTANCES(128)
