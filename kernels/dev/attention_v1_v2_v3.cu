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


// =====================================================================================================
// Version 2 (head_dim 64 and 128): mma.sync m16n8k16 with ldmatrix, scores and probabilities kept in
// registers (the f32 C fragment of Q.K^T, packed to bf16 pairs, is exactly the A fragment of P.V),
// K/V (or Q/dO) tiles double-buffered with cp.async so the next tile loads during this one's math.
// Same tiling and the same three kernels as version 1; the launcher picks v2 where it exists.
// Fragment layouts (PTX ISA, mma.m16n8k16 bf16), g = lane / 4, t = lane % 4:
//   A 16x16: a0 (row g, cols 2t..2t+1), a1 (row g+8, same), a2 (row g, cols 2t+8..), a3 (row g+8, ..)
//   B 16x8:  b0 (rows 2t..2t+1, col g), b1 (rows 2t+8.., col g)
//   C 16x8:  c0 c1 (row g, cols 2t, 2t+1), c2 c3 (row g+8, same)
// =====================================================================================================

template <int HD>
struct Att2 {
    static constexpr int LDT = HD + 8;  // padded row: 8 ldmatrix rows land in distinct banks
    static constexpr int TILE = ATT_TILE * LDT;
    static constexpr size_t FWD_SMEM = 5 * TILE * 2 + 3 * ATT_TILE * 4;   // Q, K[2], V[2]; segQ, segK[2]
    static constexpr size_t DKDV_SMEM = 6 * TILE * 2 + 6 * ATT_TILE * 4;  // K, V, Q[2], dO[2]; lse[2], D, segQ[2], segK
    static constexpr size_t DQ_SMEM = 6 * TILE * 2 + 5 * ATT_TILE * 4;    // Q, dO, K[2], V[2]; lse, D, segQ, segK[2]
};

DEVI uint32_t smem_u32(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }

DEVI void ldsm_x4(uint32_t* r, uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

DEVI void ldsm_x4_t(uint32_t* r, uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

DEVI void mma16816(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

DEVI uint32_t pack2(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}

DEVI void cp_async16(uint32_t dst, const void* src, bool full) {
    const int bytes = full ? 16 : 0;  // 0: zero-fill the destination, read nothing
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes));
}
DEVI void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
DEVI void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::); }

// Asynchronous copy of a 64 x HD tile (rows past `valid` zero-filled) into a padded smem tile.
template <int HD>
DEVI void tile_async(bf16* dst, const bf16* src, long long row0, int valid, int width, int col) {
    constexpr int PER_ROW = HD / 8;
#pragma unroll
    for (int i = threadIdx.x; i < ATT_TILE * PER_ROW; i += ATT_THREADS) {
        const int r = i / PER_ROW, c = (i % PER_ROW) * 8;
        const bool ok = r < valid;
        const bf16* g = src + (row0 + (ok ? r : 0)) * width + col + c;
        cp_async16(smem_u32(dst + r * Att2<HD>::LDT + c), g, ok);
    }
}

// Address for an A fragment (16 x 16 at row r0, col c0) or a trans-B pair: row r0 + lane % 16,
// col c0 + (lane / 16) * 8 for A; see each call for B.
template <int HD>
DEVI uint32_t a_addr(const bf16* tile, int r0, int c0, int lane) {
    return smem_u32(tile + (r0 + (lane & 15)) * Att2<HD>::LDT + c0 + (lane >> 4) * 8);
}
// B fragments of two n-tiles (rows n0..n0+15 of an [n][k] store), k range c0..c0+15: regs 0,1 are
// (b0, b1) of n-tile n0, regs 2,3 of n-tile n0 + 8.
template <int HD>
DEVI uint32_t b_addr(const bf16* tile, int n0, int c0, int lane) {
    return smem_u32(tile + (n0 + (lane & 7) + (lane >> 4) * 8) * Att2<HD>::LDT + c0 + ((lane >> 3) & 1) * 8);
}
// B fragments (trans) of two n-tiles (cols n0..n0+15 of a [k][n] store), k range k0..k0+15.
template <int HD>
DEVI uint32_t bt_addr(const bf16* tile, int k0, int n0, int lane) {
    return smem_u32(tile + (k0 + (lane & 7) + ((lane >> 3) & 1) * 8) * Att2<HD>::LDT + n0 + (lane >> 4) * 8);
}

DEVI float quad_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
    return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
DEVI float quad_sum(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// Write a warp's 16 x HD f32 C fragments (HD / 8 n-tiles), times the row scales, as bf16 rows of
// `dst` (global, row stride `width`), staged through the warp's own 16 rows of a smem tile.
template <int HD>
DEVI void store_rows(float (*acc)[4], float s_lo, float s_hi, bf16* stage, bf16* dst, long long row0, int valid,
                     int width, int lane) {
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int j = 0; j < HD / 8; j++) {
        *reinterpret_cast<uint32_t*>(stage + g * Att2<HD>::LDT + 8 * j + 2 * t) = pack2(acc[j][0] * s_lo, acc[j][1] * s_lo);
        *reinterpret_cast<uint32_t*>(stage + (g + 8) * Att2<HD>::LDT + 8 * j + 2 * t) = pack2(acc[j][2] * s_hi, acc[j][3] * s_hi);
    }
    __syncwarp();
#pragma unroll
    for (int i = lane; i < 16 * (HD / 8); i += 32) {
        const int r = i / (HD / 8), c = (i % (HD / 8)) * 8;
        if (r < valid)
            *reinterpret_cast<uint4*>(dst + (row0 + r) * width + c) =
                *reinterpret_cast<const uint4*>(stage + r * Att2<HD>::LDT + c);
    }
}

template <int HD>
DEVI void attn2_fwd_impl(const bf16* q, const bf16* k, const bf16* v, const int* seg, bf16* out, float* lse, int seq,
                         int heads, int kv_heads, float scale) {
    using A = Att2<HD>;
    require_smem(A::FWD_SMEM);
    extern __shared__ __align__(128) unsigned char smem[];
    bf16* sQ = reinterpret_cast<bf16*>(smem);
    bf16* sK = sQ + A::TILE;       // [2] tiles
    bf16* sV = sK + 2 * A::TILE;   // [2] tiles
    int* sSegQ = reinterpret_cast<int*>(sV + 2 * A::TILE);
    int* sSegK = sSegQ + ATT_TILE;  // [2][64]

    const int qt = gridDim.x - 1 - blockIdx.x;
    const int h = blockIdx.y, b = blockIdx.z;
    const int kh = h / (heads / kv_heads);
    const int qw = heads * HD, kw = kv_heads * HD;
    const long long base = (long long)b * seq;
    const int q0 = qt * ATT_TILE, qrows = min(ATT_TILE, seq - q0);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const float sl2 = scale * LOG2E_F;

    tile_async<HD>(sQ, q, base + q0, qrows, qw, h * HD);
    tile_async<HD>(sK, k, base, min(ATT_TILE, seq), kw, kh * HD);
    tile_async<HD>(sV, v, base, min(ATT_TILE, seq), kw, kh * HD);
    cp_async_commit();
    if (threadIdx.x < ATT_TILE) {
        sSegQ[threadIdx.x] = threadIdx.x < qrows ? seg[base + q0 + threadIdx.x] : INT_MIN;
        sSegK[threadIdx.x] = threadIdx.x < seq ? seg[base + threadIdx.x] : INT_MIN + 1;
    }
    cp_async_wait_all();
    __syncthreads();

    uint32_t qf[HD / 16][4];
#pragma unroll
    for (int kk = 0; kk < HD / 16; kk++) ldsm_x4(qf[kk], a_addr<HD>(sQ, warp * 16, kk * 16, lane));
    const int qi_lo = q0 + warp * 16 + g, qi_hi = qi_lo + 8;
    const int segq_lo = sSegQ[warp * 16 + g], segq_hi = sSegQ[warp * 16 + g + 8];

    float o[HD / 8][4];
#pragma unroll
    for (int j = 0; j < HD / 8; j++) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
    float m_lo = -INFINITY, m_hi = -INFINITY, l_lo = 0.f, l_hi = 0.f;

    for (int kt = 0; kt <= qt; kt++) {
        const int buf = kt & 1;
        const int k0 = kt * ATT_TILE;
        if (kt < qt) {
            const int n0 = k0 + ATT_TILE, nrows = min(ATT_TILE, seq - n0);
            tile_async<HD>(sK + (buf ^ 1) * A::TILE, k, base + n0, nrows, kw, kh * HD);
            tile_async<HD>(sV + (buf ^ 1) * A::TILE, v, base + n0, nrows, kw, kh * HD);
            cp_async_commit();
            if (threadIdx.x < ATT_TILE)
                sSegK[(buf ^ 1) * ATT_TILE + threadIdx.x] = threadIdx.x < nrows ? seg[base + n0 + threadIdx.x] : INT_MIN + 1;
        }
        const bf16* tK = sK + buf * A::TILE;
        const bf16* tV = sV + buf * A::TILE;
        const int* segk = sSegK + buf * ATT_TILE;

        float s[8][4];
#pragma unroll
        for (int j = 0; j < 8; j++) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < HD / 16; kk++) {
#pragma unroll
            for (int np = 0; np < 4; np++) {
                uint32_t bb[4];
                ldsm_x4(bb, b_addr<HD>(tK, np * 16, kk * 16, lane));
                mma16816(s[2 * np], qf[kk], bb[0], bb[1]);
                mma16816(s[2 * np + 1], qf[kk], bb[2], bb[3]);
            }
        }
        // Mask (causal, same segment, inside the sequence) and scale into log2 units.
        float mx_lo = -INFINITY, mx_hi = -INFINITY;
#pragma unroll
        for (int j = 0; j < 8; j++) {
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const int col = 8 * j + 2 * t + e, key = k0 + col;
                const bool in = key < seq;
                const int sk = segk[col];
                s[j][e] = (in && key <= qi_lo && sk == segq_lo) ? s[j][e] * sl2 : -INFINITY;
                s[j][2 + e] = (in && key <= qi_hi && sk == segq_hi) ? s[j][2 + e] * sl2 : -INFINITY;
                mx_lo = fmaxf(mx_lo, s[j][e]);
                mx_hi = fmaxf(mx_hi, s[j][2 + e]);
            }
        }
        mx_lo = quad_max(mx_lo);
        mx_hi = quad_max(mx_hi);
        const float mn_lo = fmaxf(m_lo, mx_lo), mn_hi = fmaxf(m_hi, mx_hi);
        const float mu_lo = mn_lo == -INFINITY ? 0.f : mn_lo, mu_hi = mn_hi == -INFINITY ? 0.f : mn_hi;
        const float al_lo = exp2f(m_lo - mu_lo), al_hi = exp2f(m_hi - mu_hi);
        m_lo = mn_lo;
        m_hi = mn_hi;
        float ps_lo = 0.f, ps_hi = 0.f;
#pragma unroll
        for (int j = 0; j < 8; j++) {
            s[j][0] = exp2f(s[j][0] - mu_lo);
            s[j][1] = exp2f(s[j][1] - mu_lo);
            s[j][2] = exp2f(s[j][2] - mu_hi);
            s[j][3] = exp2f(s[j][3] - mu_hi);
            ps_lo += s[j][0] + s[j][1];
            ps_hi += s[j][2] + s[j][3];
        }
        l_lo = l_lo * al_lo + ps_lo;
        l_hi = l_hi * al_hi + ps_hi;
#pragma unroll
        for (int j = 0; j < HD / 8; j++) {
            o[j][0] *= al_lo;
            o[j][1] *= al_lo;
            o[j][2] *= al_hi;
            o[j][3] *= al_hi;
        }
        // O += P . V, P straight from the score registers.
#pragma unroll
        for (int ks = 0; ks < 4; ks++) {
            uint32_t pa[4] = {pack2(s[2 * ks][0], s[2 * ks][1]), pack2(s[2 * ks][2], s[2 * ks][3]),
                              pack2(s[2 * ks + 1][0], s[2 * ks + 1][1]), pack2(s[2 * ks + 1][2], s[2 * ks + 1][3])};
#pragma unroll
            for (int np = 0; np < HD / 16; np++) {
                uint32_t bb[4];
                ldsm_x4_t(bb, bt_addr<HD>(tV, ks * 16, np * 16, lane));
                mma16816(o[2 * np], pa, bb[0], bb[1]);
                mma16816(o[2 * np + 1], pa, bb[2], bb[3]);
            }
        }
        cp_async_wait_all();
        __syncthreads();
    }
    l_lo = quad_sum(l_lo);
    l_hi = quad_sum(l_hi);
    // The warp's own Q rows are free now (its fragments are in registers): stage the output there.
    store_rows<HD>(o, 1.f / l_lo, 1.f / l_hi, sQ + warp * 16 * A::LDT, out + h * HD, base + q0 + warp * 16,
                   qrows - warp * 16, qw, lane);
    if (t == 0) {
        if (qi_lo < seq) lse[(base + qi_lo) * heads + h] = (m_lo + log2f(l_lo)) * LN2_F;
        if (qi_hi < seq) lse[(base + qi_hi) * heads + h] = (m_hi + log2f(l_hi)) * LN2_F;
    }
}

// D[i] = sum_c dO[i, c] O[i, c] for the rows of a tile, dO from smem, O from global.
template <int HD>
DEVI void row_dot2(float* sD, const bf16* sdO, const bf16* o, long long row0, int valid, int width) {
    const int row = threadIdx.x >> 1, part = threadIdx.x & 1;
    float acc = 0.f;
    if (row < valid) {
#pragma unroll
        for (int c = part * (HD / 2); c < (part + 1) * (HD / 2); c += 8) {
            float a[8], bb[8];
            load8(sdO + row * Att2<HD>::LDT + c, a);
            load8(o + (row0 + row) * width + c, bb);
#pragma unroll
            for (int j = 0; j < 8; j++) acc += a[j] * bb[j];
        }
    }
    acc += __shfl_xor_sync(0xffffffffu, acc, 1);
    if (part == 0) sD[row] = acc;
}

template <int HD>
DEVI void attn2_bwd_dkdv_impl(const bf16* q, const bf16* k, const bf16* v, const bf16* o, const bf16* dout,
                              const float* lse, const int* seg, bf16* dk, bf16* dv, int seq, int heads, int kv_heads,
                              float scale) {
    using A = Att2<HD>;
    require_smem(A::DKDV_SMEM);
    extern __shared__ __align__(128) unsigned char smem[];
    bf16* sK = reinterpret_cast<bf16*>(smem);
    bf16* sV = sK + A::TILE;
    bf16* sQ = sV + A::TILE;        // [2]
    bf16* sdO = sQ + 2 * A::TILE;   // [2]
    float* sLse = reinterpret_cast<float*>(sdO + 2 * A::TILE);  // [2][64], log2 units
    float* sD = sLse + 2 * ATT_TILE;                              // [64]
    int* sSegQ = reinterpret_cast<int*>(sD + ATT_TILE);          // [2][64]
    int* sSegK = sSegQ + 2 * ATT_TILE;                            // [64]

    const int kt = blockIdx.x;
    const int kvh = blockIdx.y, b = blockIdx.z;
    const int group = heads / kv_heads;
    const int qw = heads * HD, kw = kv_heads * HD;
    const long long base = (long long)b * seq;
    const int k0 = kt * ATT_TILE, krows = min(ATT_TILE, seq - k0);
    const int nqt = (seq + ATT_TILE - 1) / ATT_TILE;
    const int per_head = nqt - kt, total = group * per_head;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const float sl2 = scale * LOG2E_F;
    const int kj_lo = k0 + warp * 16 + g, kj_hi = kj_lo + 8;

    // Stage (head, query tile) number `it` into buffer `buf`.
    auto stage = [&](int it, int buf) {
        const int h = kvh * group + it / per_head, q0 = (kt + it % per_head) * ATT_TILE, qrows = min(ATT_TILE, seq - q0);
        tile_async<HD>(sQ + buf * A::TILE, q, base + q0, qrows, qw, h * HD);
        tile_async<HD>(sdO + buf * A::TILE, dout, base + q0, qrows, qw, h * HD);
        cp_async_commit();
        if (threadIdx.x < ATT_TILE) {
            const bool ok = threadIdx.x < qrows;
            sSegQ[buf * ATT_TILE + threadIdx.x] = ok ? seg[base + q0 + threadIdx.x] : INT_MIN;
            sLse[buf * ATT_TILE + threadIdx.x] = ok ? lse[(base + q0 + threadIdx.x) * heads + h] * LOG2E_F : 0.f;
        }
    };

    tile_async<HD>(sK, k, base + k0, krows, kw, kvh * HD);
    tile_async<HD>(sV, v, base + k0, krows, kw, kvh * HD);
    if (threadIdx.x < ATT_TILE) sSegK[threadIdx.x] = threadIdx.x < krows ? seg[base + k0 + threadIdx.x] : INT_MIN + 1;
    stage(0, 0);
    cp_async_wait_all();
    __syncthreads();
    const int segk_lo = sSegK[warp * 16 + g], segk_hi = sSegK[warp * 16 + g + 8];

    float dka[HD / 8][4], dva[HD / 8][4];
#pragma unroll
    for (int j = 0; j < HD / 8; j++) {
        dka[j][0] = dka[j][1] = dka[j][2] = dka[j][3] = 0.f;
        dva[j][0] = dva[j][1] = dva[j][2] = dva[j][3] = 0.f;
    }

    for (int it = 0; it < total; it++) {
        const int buf = it & 1;
        const int h = kvh * group + it / per_head, q0 = (kt + it % per_head) * ATT_TILE, qrows = min(ATT_TILE, seq - q0);
        if (it + 1 < total) stage(it + 1, buf ^ 1);
        const bf16* tQ = sQ + buf * A::TILE;
        const bf16* tdO = sdO + buf * A::TILE;
        const float* lse2 = sLse + buf * ATT_TILE;
        const int* segq = sSegQ + buf * ATT_TILE;
        row_dot2<HD>(sD, tdO, o + h * HD, base + q0, qrows, qw);
        __syncthreads();

#pragma unroll
        for (int half = 0; half < 2; half++) {
            const int c0 = half * 32;  // query columns of this half
            float st[4][4], dp[4][4];
#pragma unroll
            for (int j = 0; j < 4; j++) st[j][0] = st[j][1] = st[j][2] = st[j][3] = dp[j][0] = dp[j][1] = dp[j][2] = dp[j][3] = 0.f;
            // S^T = K_w . Q^T and dP^T = V_w . dO^T over this half's 32 queries.
#pragma unroll
            for (int kk = 0; kk < HD / 16; kk++) {
                uint32_t ka[4], va[4];
                ldsm_x4(ka, a_addr<HD>(sK, warp * 16, kk * 16, lane));
                ldsm_x4(va, a_addr<HD>(sV, warp * 16, kk * 16, lane));
#pragma unroll
                for (int np = 0; np < 2; np++) {
                    uint32_t bq[4], bo[4];
                    ldsm_x4(bq, b_addr<HD>(tQ, c0 + np * 16, kk * 16, lane));
                    ldsm_x4(bo, b_addr<HD>(tdO, c0 + np * 16, kk * 16, lane));
                    mma16816(st[2 * np], ka, bq[0], bq[1]);
                    mma16816(st[2 * np + 1], ka, bq[2], bq[3]);
                    mma16816(dp[2 * np], va, bo[0], bo[1]);
                    mma16816(dp[2 * np + 1], va, bo[2], bo[3]);
                }
            }
            // P^T and dS^T = P^T (dP^T - D) scale, in place.
#pragma unroll
            for (int j = 0; j < 4; j++) {
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    const int col = c0 + 8 * j + 2 * t + e, qi = q0 + col;
                    const bool in = col < qrows;
                    const int sq = segq[col];
                    const float l2 = lse2[col], dd = sD[col];
                    const float p_lo = (in && qi >= kj_lo && kj_lo < seq && sq == segk_lo) ? exp2f(st[j][e] * sl2 - l2) : 0.f;
                    const float p_hi = (in && qi >= kj_hi && kj_hi < seq && sq == segk_hi) ? exp2f(st[j][2 + e] * sl2 - l2) : 0.f;
                    st[j][e] = p_lo;
                    st[j][2 + e] = p_hi;
                    dp[j][e] = p_lo * (dp[j][e] - dd) * scale;
                    dp[j][2 + e] = p_hi * (dp[j][2 + e] - dd) * scale;
                }
            }
            // dV_w += P^T . dO ; dK_w += dS^T . Q (k = this half's queries, two steps of 16).
#pragma unroll
            for (int ks = 0; ks < 2; ks++) {
                uint32_t pa[4] = {pack2(st[2 * ks][0], st[2 * ks][1]), pack2(st[2 * ks][2], st[2 * ks][3]),
                                  pack2(st[2 * ks + 1][0], st[2 * ks + 1][1]), pack2(st[2 * ks + 1][2], st[2 * ks + 1][3])};
                uint32_t da[4] = {pack2(dp[2 * ks][0], dp[2 * ks][1]), pack2(dp[2 * ks][2], dp[2 * ks][3]),
                                  pack2(dp[2 * ks + 1][0], dp[2 * ks + 1][1]), pack2(dp[2 * ks + 1][2], dp[2 * ks + 1][3])};
#pragma unroll
                for (int np = 0; np < HD / 16; np++) {
                    uint32_t bo[4], bq[4];
                    ldsm_x4_t(bo, bt_addr<HD>(tdO, c0 + ks * 16, np * 16, lane));
                    ldsm_x4_t(bq, bt_addr<HD>(tQ, c0 + ks * 16, np * 16, lane));
                    mma16816(dva[2 * np], pa, bo[0], bo[1]);
                    mma16816(dva[2 * np + 1], pa, bo[2], bo[3]);
                    mma16816(dka[2 * np], da, bq[0], bq[1]);
                    mma16816(dka[2 * np + 1], da, bq[2], bq[3]);
                }
            }
        }
        cp_async_wait_all();
        __syncthreads();
    }
    // Each warp's own K / V rows are read by that warp only: stage the results there.
    store_rows<HD>(dka, 1.f, 1.f, sK + warp * 16 * A::LDT, dk + kvh * HD, base + k0 + warp * 16, krows - warp * 16, kw, lane);
    store_rows<HD>(dva, 1.f, 1.f, sV + warp * 16 * A::LDT, dv + kvh * HD, base + k0 + warp * 16, krows - warp * 16, kw, lane);
}

template <int HD>
DEVI void attn2_bwd_dq_impl(const bf16* q, const bf16* k, const bf16* v, const bf16* o, const bf16* dout,
                            const float* lse, const int* seg, bf16* dq, int seq, int heads, int kv_heads, float scale) {
    using A = Att2<HD>;
    require_smem(A::DQ_SMEM);
    extern __shared__ __align__(128) unsigned char smem[];
    bf16* sQ = reinterpret_cast<bf16*>(smem);
    bf16* sdO = sQ + A::TILE;
    bf16* sK = sdO + A::TILE;       // [2]
    bf16* sV = sK + 2 * A::TILE;    // [2]
    float* sLse = reinterpret_cast<float*>(sV + 2 * A::TILE);
    float* sD = sLse + ATT_TILE;
    int* sSegQ = reinterpret_cast<int*>(sD + ATT_TILE);
    int* sSegK = sSegQ + ATT_TILE;  // [2][64]

    const int qt = gridDim.x - 1 - blockIdx.x;
    const int h = blockIdx.y, b = blockIdx.z;
    const int kh = h / (heads / kv_heads);
    const int qw = heads * HD, kw = kv_heads * HD;
    const long long base = (long long)b * seq;
    const int q0 = qt * ATT_TILE, qrows = min(ATT_TILE, seq - q0);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const float sl2 = scale * LOG2E_F;

    tile_async<HD>(sQ, q, base + q0, qrows, qw, h * HD);
    tile_async<HD>(sdO, dout, base + q0, qrows, qw, h * HD);
    tile_async<HD>(sK, k, base, min(ATT_TILE, seq), kw, kh * HD);
    tile_async<HD>(sV, v, base, min(ATT_TILE, seq), kw, kh * HD);
    cp_async_commit();
    if (threadIdx.x < ATT_TILE) {
        const bool ok = threadIdx.x < qrows;
        sSegQ[threadIdx.x] = ok ? seg[base + q0 + threadIdx.x] : INT_MIN;
        sLse[threadIdx.x] = ok ? lse[(base + q0 + threadIdx.x) * heads + h] * LOG2E_F : 0.f;
        sSegK[threadIdx.x] = threadIdx.x < seq ? seg[base + threadIdx.x] : INT_MIN + 1;
    }
    cp_async_wait_all();
    __syncthreads();
    row_dot2<HD>(sD, sdO, o + h * HD, base + q0, qrows, qw);
    __syncthreads();

    uint32_t qf[HD / 16][4], of[HD / 16][4];
#pragma unroll
    for (int kk = 0; kk < HD / 16; kk++) {
        ldsm_x4(qf[kk], a_addr<HD>(sQ, warp * 16, kk * 16, lane));
        ldsm_x4(of[kk], a_addr<HD>(sdO, warp * 16, kk * 16, lane));
    }
    const int r_lo = warp * 16 + g, r_hi = r_lo + 8;
    const int qi_lo = q0 + r_lo, qi_hi = q0 + r_hi;
    const int segq_lo = sSegQ[r_lo], segq_hi = sSegQ[r_hi];
    const float l2_lo = sLse[r_lo], l2_hi = sLse[r_hi], d_lo = sD[r_lo], d_hi = sD[r_hi];

    float dqa[HD / 8][4];
#pragma unroll
    for (int j = 0; j < HD / 8; j++) dqa[j][0] = dqa[j][1] = dqa[j][2] = dqa[j][3] = 0.f;

    for (int kt = 0; kt <= qt; kt++) {
        const int buf = kt & 1;
        const int k0 = kt * ATT_TILE;
        if (kt < qt) {
            const int n0 = k0 + ATT_TILE, nrows = min(ATT_TILE, seq - n0);
            tile_async<HD>(sK + (buf ^ 1) * A::TILE, k, base + n0, nrows, kw, kh * HD);
            tile_async<HD>(sV + (buf ^ 1) * A::TILE, v, base + n0, nrows, kw, kh * HD);
            cp_async_commit();
            if (threadIdx.x < ATT_TILE)
                sSegK[(buf ^ 1) * ATT_TILE + threadIdx.x] = threadIdx.x < nrows ? seg[base + n0 + threadIdx.x] : INT_MIN + 1;
        }
        const bf16* tK = sK + buf * A::TILE;
        const bf16* tV = sV + buf * A::TILE;
        const int* segk = sSegK + buf * ATT_TILE;
#pragma unroll
        for (int half = 0; half < 2; half++) {
            const int c0 = half * 32;  // key columns of this half
            float sc[4][4], dp[4][4];
#pragma unroll
            for (int j = 0; j < 4; j++) sc[j][0] = sc[j][1] = sc[j][2] = sc[j][3] = dp[j][0] = dp[j][1] = dp[j][2] = dp[j][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < HD / 16; kk++) {
#pragma unroll
                for (int np = 0; np < 2; np++) {
                    uint32_t bk[4], bv[4];
                    ldsm_x4(bk, b_addr<HD>(tK, c0 + np * 16, kk * 16, lane));
                    ldsm_x4(bv, b_addr<HD>(tV, c0 + np * 16, kk * 16, lane));
                    mma16816(sc[2 * np], qf[kk], bk[0], bk[1]);
                    mma16816(sc[2 * np + 1], qf[kk], bk[2], bk[3]);
                    mma16816(dp[2 * np], of[kk], bv[0], bv[1]);
                    mma16816(dp[2 * np + 1], of[kk], bv[2], bv[3]);
                }
            }
#pragma unroll
            for (int j = 0; j < 4; j++) {
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    const int col = c0 + 8 * j + 2 * t + e, key = k0 + col;
                    const bool in = key < seq;
                    const int sk = segk[col];
                    const float p_lo = (in && key <= qi_lo && qi_lo < seq && sk == segq_lo) ? exp2f(sc[j][e] * sl2 - l2_lo) : 0.f;
                    const float p_hi = (in && key <= qi_hi && qi_hi < seq && sk == segq_hi) ? exp2f(sc[j][2 + e] * sl2 - l2_hi) : 0.f;
                    dp[j][e] = p_lo * (dp[j][e] - d_lo) * scale;
                    dp[j][2 + e] = p_hi * (dp[j][2 + e] - d_hi) * scale;
                }
            }
            // dQ_w += dS . K (k = this half's keys, two steps of 16).
#pragma unroll
            for (int ks = 0; ks < 2; ks++) {
                uint32_t da[4] = {pack2(dp[2 * ks][0], dp[2 * ks][1]), pack2(dp[2 * ks][2], dp[2 * ks][3]),
                                  pack2(dp[2 * ks + 1][0], dp[2 * ks + 1][1]), pack2(dp[2 * ks + 1][2], dp[2 * ks + 1][3])};
#pragma unroll
                for (int np = 0; np < HD / 16; np++) {
                    uint32_t bk[4];
                    ldsm_x4_t(bk, bt_addr<HD>(tK, c0 + ks * 16, np * 16, lane));
                    mma16816(dqa[2 * np], da, bk[0], bk[1]);
                    mma16816(dqa[2 * np + 1], da, bk[2], bk[3]);
                }
            }
        }
        cp_async_wait_all();
        __syncthreads();
    }
    store_rows<HD>(dqa, 1.f, 1.f, sQ + warp * 16 * A::LDT, dq + h * HD, base + q0 + warp * 16, qrows - warp * 16, qw, lane);
}

#define ATT2_INSTANCES(HD)                                                                                           \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS)                                                        \
        attn2_fwd_##HD(const bf16* q, const bf16* k, const bf16* v, const int* seg, bf16* out, float* lse, int seq, \
                       int heads, int kv_heads, float scale) {                                                       \
        attn2_fwd_impl<HD>(q, k, v, seg, out, lse, seq, heads, kv_heads, scale);                                     \
    }                                                                                                                \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS)                                                        \
        attn2_bwd_dkdv_##HD(const bf16* q, const bf16* k, const bf16* v, const bf16* o, const bf16* dout,           \
                            const float* lse, const int* seg, bf16* dk, bf16* dv, int seq, int heads, int kv_heads,  \
                            float scale) {                                                                           \
        attn2_bwd_dkdv_impl<HD>(q, k, v, o, dout, lse, seg, dk, dv, seq, heads, kv_heads, scale);                   \
    }                                                                                                                \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS)                                                        \
        attn2_bwd_dq_##HD(const bf16* q, const bf16* k, const bf16* v, const bf16* o, const bf16* dout,             \
                          const float* lse, const int* seg, bf16* dq, int seq, int heads, int kv_heads, float scale) { \
        attn2_bwd_dq_impl<HD>(q, k, v, o, dout, lse, seg, dq, seq, heads, kv_heads, scale);                         \
    }

ATT2_INSTANCES(64)
ATT2_INSTANCES(128)

// =====================================================================================================
// Version 3 (head_dim 64 and 128). Same mma.sync / ldmatrix arithmetic as version 2, reorganised:
//  - Tiles in shared memory are unpadded with the 16-byte chunks of row r XOR-swizzled by r % 8
//    (`swz`), so every 8-row ldmatrix and every fragment store hits 8 distinct bank groups; this
//    saves the padding and lets two backward blocks share an SM.
//  - Grids put the heads on x so blocks start heaviest first over the whole launch (the causal
//    work of a query tile grows with its index, that of a key tile shrinks).
//  - Tiles that need no mask (strictly below the diagonal, one segment on both sides) skip the
//    per-element tests; tiles of two different segments are skipped outright.
//  attn3_fwd_HD       grid (heads, query tiles of 128, batch): 4 warps x 32 query rows, so each
//                     K / V fragment read from shared memory feeds two m16 tiles.
//  attn3_bwd_prep_HD  D = rowsum(dO * O) once per (row, head) into the backward scratch.
//  attn3_bwd_HD       grid (heads, key tiles of 64, batch): one block per (query head, key tile)
//                     walks the query tiles at or after it; dK, dV of the tile stay in registers
//                     and are added (f32) into the kv-head accumulators at the end, the GQA group
//                     summing there; dQ = dS . K of each step is added (f32) into a dQ accumulator.
//  attn3_acc_to_bf16  accumulators -> bf16 outputs.
// The f32 additions make the backward's last bits depend on block order (as FlashAttention-2's).
// =====================================================================================================

// Element offset of (row, col) in a [rows][W] bf16 tile whose 16-byte chunks are swizzled.
template <int W>
DEVI int swz(int row, int col) {
    const int c = col >> 3;
    return row * W + (((c & ~7) | ((c ^ row) & 7)) << 3) + (col & 7);
}

DEVI float ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// p[0] += a, p[1] += b in device memory (p 8-byte aligned); one vector reduction on sm_90.
DEVI void red_add2(float* p, float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("red.global.add.v2.f32 [%0], {%1, %2};" ::"l"(p), "f"(a), "f"(b) : "memory");
#else
    atomicAdd(p, a);
    atomicAdd(p + 1, b);
#endif
}

// Asynchronous copy of ROWS x W rows (rows past `valid` zero-filled) into a swizzled tile.
template <int W, int ROWS>
DEVI void tile_async3(bf16* dst, const bf16* src, long long row0, int valid, int width) {
    constexpr int PER_ROW = W / 8;
#pragma unroll
    for (int i = threadIdx.x; i < ROWS * PER_ROW; i += ATT_THREADS) {
        const int r = i / PER_ROW, c = (i % PER_ROW) * 8;
        const bool ok = r < valid;
        cp_async16(smem_u32(dst + swz<W>(r, c)), src + (row0 + (ok ? r : 0)) * width + c, ok);
    }
}

// ldmatrix lane addresses in a swizzled tile of W columns (row and column origins multiples of
// 16). A lane reads the 16 bytes at (row, chunk C + h) with its row's low bits r7 = row % 8 and
// h in {0, 1}; for C even the swizzled chunk is (C & ~7) + ((C & 7) ^ h ^ r7), so the byte offset
// is (lane_off XOR (C & 7) * 16) + (C & ~7) * 16 + row origin, lane_off = row * 2W + (h ^ r7) * 16.
// The four XORed lane offsets are computed once; each load then adds constants only.
// A run-time column origin must be folded in at construction (`cb`, a multiple of 16 columns).
template <int W>
struct Lsm {
    uint32_t off[4];
    DEVI Lsm(int row, int h, int cb = 0) {
        const int c = (cb >> 3) + h;
        const uint32_t o = (uint32_t)(row * W * 2 + (((c & ~7) | ((c ^ row) & 7)) << 4));
#pragma unroll
        for (int i = 0; i < 4; i++) off[i] = o ^ (uint32_t)(i << 5);
    }
    // Address in the tile at `base` (shared window) of the fragment at row origin r0, column c0.
    DEVI uint32_t at(uint32_t base, int r0, int c0) const {
        const int c = c0 >> 3;
        return base + off[(c & 7) >> 1] + (uint32_t)(r0 * W * 2 + ((c & ~7) << 4));
    }
};
// A fragment (16 x 16) of a row-major [m][k] store: rows lane % 16, chunk h = lane / 16.
template <int W>
DEVI Lsm<W> lsm_a(int lane) { return Lsm<W>(lane & 15, lane >> 4); }
// B fragments of n-tiles n0 and n0 + 8 (k from c0) of an [n][k] store (regs 0,1 | 2,3); with the
// .trans load the same addresses give the A fragment (m from c0) of a [k][m] store.
template <int W>
DEVI Lsm<W> lsm_b(int lane, int cb = 0) { return Lsm<W>((lane & 7) + (lane >> 4) * 8, (lane >> 3) & 1, cb); }
// Trans B fragments of n-tiles n0 and n0 + 8 (k from r0) of a [k][n] store.
template <int W>
DEVI Lsm<W> lsm_bt(int lane) { return Lsm<W>((lane & 7) + ((lane >> 3) & 1) * 8, lane >> 4); }

// Write a warp's 16 x HD f32 C fragments times the row scales as bf16 rows of `dst` (row stride
// `width`), staged through 16 rows of a swizzled tile that only this warp uses.
template <int HD>
DEVI void store_rows3(const float (*acc)[4], float s_lo, float s_hi, bf16* stage, bf16* dst, long long row0, int valid,
                      int width, int lane) {
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int j = 0; j < HD / 8; j++) {
        *reinterpret_cast<uint32_t*>(stage + swz<HD>(g, 8 * j + 2 * t)) = pack2(acc[j][0] * s_lo, acc[j][1] * s_lo);
        *reinterpret_cast<uint32_t*>(stage + swz<HD>(g + 8, 8 * j + 2 * t)) = pack2(acc[j][2] * s_hi, acc[j][3] * s_hi);
    }
    __syncwarp();
#pragma unroll
    for (int i = lane; i < 16 * (HD / 8); i += 32) {
        const int r = i / (HD / 8), c = (i % (HD / 8)) * 8;
        if (r < valid)
            *reinterpret_cast<uint4*>(dst + (row0 + r) * width + c) = *reinterpret_cast<const uint4*>(stage + swz<HD>(r, c));
    }
    __syncwarp();
}

// Is `v` the same in the first `n` (32 or 64) entries of `s`? (whole warp calls; `first` = s[0])
DEVI bool warp_uniform(const int* s, int n, int lane) {
    const int first = s[0];
    bool same = s[lane] == first;
    if (n > 32) same = same && s[lane + 32] == first;
    return __all_sync(0xffffffffu, same);
}

template <int HD>
struct Att3 {
    static constexpr int QT = 128;  // query rows of a forward block
    static constexpr int KT = 64;   // keys per tile (forward); keys of a backward block
    // Forward: Q [128][HD], K [2][64][HD], V [2][64][HD]; segQ [128], segK [2][64].
    static constexpr size_t FWD_SMEM = (size_t)(QT * HD + 4 * KT * HD) * 2 + (QT + 2 * KT) * 4;
    // Backward: K, V, Q [2], dO [2] (64 x HD each), dS^T [64][64]; lse [2], D [2], segQ [2], segK.
    static constexpr size_t BWD_SMEM = (size_t)(6 * KT * HD + KT * KT) * 2 + 7 * KT * 4;
};

template <int HD>
DEVI void attn3_fwd_impl(const bf16* q, const bf16* k, const bf16* v, const int* seg, bf16* out, float* lse, int seq,
                         int heads, int kv_heads, float scale) {
    using A = Att3<HD>;
    require_smem(A::FWD_SMEM);
    extern __shared__ __align__(128) unsigned char smem[];
    bf16* sQ = reinterpret_cast<bf16*>(smem);  // [128][HD]
    bf16* sK = sQ + A::QT * HD;                  // [2][64][HD]
    bf16* sV = sK + 2 * A::KT * HD;              // [2][64][HD]
    int* sSegQ = reinterpret_cast<int*>(sV + 2 * A::KT * HD);  // [128]
    int* sSegK = sSegQ + A::QT;                                  // [2][64]

    const int h = blockIdx.x, b = blockIdx.z;
    const int qt = gridDim.y - 1 - blockIdx.y;  // the longest rows first
    const int kh = h / (heads / kv_heads);
    const int qw = heads * HD, kw = kv_heads * HD;
    const long long base = (long long)b * seq;
    const int q0 = qt * A::QT, qrows = min(A::QT, seq - q0);
    const int nkt = min((seq + A::KT - 1) / A::KT, 2 * qt + 2);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int wr = warp * 32;  // this warp's rows in the tile: wr .. wr + 31 (two m16 tiles)
    const float sl2 = scale * LOG2E_F;
    const Lsm<HD> la = lsm_a<HD>(lane), lb = lsm_b<HD>(lane), lbt = lsm_bt<HD>(lane);
    const uint32_t uQ = smem_u32(sQ), uK = smem_u32(sK), uV = smem_u32(sV);

    tile_async3<HD, A::QT>(sQ, q + h * HD, base + q0, qrows, qw);
    tile_async3<HD, A::KT>(sK, k + kh * HD, base, min(A::KT, seq), kw);
    tile_async3<HD, A::KT>(sV, v + kh * HD, base, min(A::KT, seq), kw);
    cp_async_commit();
    sSegQ[threadIdx.x] = (int)threadIdx.x < qrows ? seg[base + q0 + threadIdx.x] : INT_MIN;
    if (threadIdx.x < A::KT) sSegK[threadIdx.x] = (int)threadIdx.x < seq ? seg[base + threadIdx.x] : INT_MIN + 1;
    cp_async_wait_all();
    __syncthreads();

    const bool live = q0 + wr < seq;
    const bool q_uni = warp_uniform(sSegQ + wr, 32, lane);
    const int q_seg = sSegQ[wr];
    int segq[2][2];
#pragma unroll
    for (int mt = 0; mt < 2; mt++) {
        segq[mt][0] = sSegQ[wr + 16 * mt + g];
        segq[mt][1] = sSegQ[wr + 16 * mt + g + 8];
    }

    float o[2][HD / 8][4];
#pragma unroll
    for (int mt = 0; mt < 2; mt++)
#pragma unroll
        for (int j = 0; j < HD / 8; j++) o[mt][j][0] = o[mt][j][1] = o[mt][j][2] = o[mt][j][3] = 0.f;
    float m[2][2] = {{-INFINITY, -INFINITY}, {-INFINITY, -INFINITY}}, l[2][2] = {{0.f, 0.f}, {0.f, 0.f}};

    for (int kt = 0; kt < nkt; kt++) {
        const int buf = kt & 1;
        const int k0 = kt * A::KT;
        if (kt + 1 < nkt) {
            const int n0 = k0 + A::KT, nrows = min(A::KT, seq - n0);
            tile_async3<HD, A::KT>(sK + (buf ^ 1) * A::KT * HD, k + kh * HD, base + n0, nrows, kw);
            tile_async3<HD, A::KT>(sV + (buf ^ 1) * A::KT * HD, v + kh * HD, base + n0, nrows, kw);
            cp_async_commit();
            if (threadIdx.x < A::KT)
                sSegK[(buf ^ 1) * A::KT + threadIdx.x] = (int)threadIdx.x < nrows ? seg[base + n0 + threadIdx.x] : INT_MIN + 1;
        }
        const uint32_t tK = uK + buf * A::KT * HD * 2, tV = uV + buf * A::KT * HD * 2;
        const int* segk = sSegK + buf * A::KT;
        const bool k_uni = warp_uniform(segk, A::KT, lane);
        const bool one_seg = q_uni && k_uni && q_seg == segk[0];
        // Skip: every key after every row of this warp, or two different single segments.
        const bool skip = !live || k0 > q0 + wr + 31 || (q_uni && k_uni && !one_seg);
        if (!skip) {
            const bool full = one_seg && k0 + A::KT - 1 <= q0 + wr;  // no key after any row
            float s[2][8][4];
#pragma unroll
            for (int mt = 0; mt < 2; mt++)
#pragma unroll
                for (int j = 0; j < 8; j++) s[mt][j][0] = s[mt][j][1] = s[mt][j][2] = s[mt][j][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < HD / 16; kk++) {
                uint32_t qa[2][4];
                ldsm_x4(qa[0], la.at(uQ, wr, kk * 16));
                ldsm_x4(qa[1], la.at(uQ, wr + 16, kk * 16));
#pragma unroll
                for (int np = 0; np < 4; np++) {
                    uint32_t bb[4];
                    ldsm_x4(bb, lb.at(tK, np * 16, kk * 16));
#pragma unroll
                    for (int mt = 0; mt < 2; mt++) {
                        mma16816(s[mt][2 * np], qa[mt], bb[0], bb[1]);
                        mma16816(s[mt][2 * np + 1], qa[mt], bb[2], bb[3]);
                    }
                }
            }
            if (!full) {
#pragma unroll
                for (int j = 0; j < 8; j++) {
#pragma unroll
                    for (int e = 0; e < 2; e++) {
                        const int col = 8 * j + 2 * t + e, key = k0 + col;
                        const int sk = segk[col];
                        const bool in = key < seq;
#pragma unroll
                        for (int mt = 0; mt < 2; mt++) {
                            const int qi = q0 + wr + 16 * mt + g;
                            if (!(in && key <= qi && sk == segq[mt][0])) s[mt][j][e] = -INFINITY;
                            if (!(in && key <= qi + 8 && sk == segq[mt][1])) s[mt][j][2 + e] = -INFINITY;
                        }
                    }
                }
            }
            // Online softmax in log2 units: scores scale by sl2 > 0, so the raw maximum serves.
#pragma unroll
            for (int mt = 0; mt < 2; mt++) {
#pragma unroll
                for (int hf = 0; hf < 2; hf++) {
                    float mx = -INFINITY;
#pragma unroll
                    for (int j = 0; j < 8; j++) mx = fmaxf(mx, fmaxf(s[mt][j][2 * hf], s[mt][j][2 * hf + 1]));
                    mx = quad_max(mx) * sl2;
                    const float mn = fmaxf(m[mt][hf], mx);
                    const float mu = mn == -INFINITY ? 0.f : mn;
                    const float alpha = ex2(m[mt][hf] - mu);
                    float ps = 0.f;
#pragma unroll
                    for (int j = 0; j < 8; j++) {
                        s[mt][j][2 * hf] = ex2(fmaf(s[mt][j][2 * hf], sl2, -mu));
                        s[mt][j][2 * hf + 1] = ex2(fmaf(s[mt][j][2 * hf + 1], sl2, -mu));
                        ps += s[mt][j][2 * hf] + s[mt][j][2 * hf + 1];
                    }
                    l[mt][hf] = l[mt][hf] * alpha + ps;
                    m[mt][hf] = mn;
#pragma unroll
                    for (int j = 0; j < HD / 8; j++) {
                        o[mt][j][2 * hf] *= alpha;
                        o[mt][j][2 * hf + 1] *= alpha;
                    }
                }
            }
            // O += P . V, P straight from the score registers.
#pragma unroll
            for (int ks = 0; ks < 4; ks++) {
                uint32_t pa[2][4];
#pragma unroll
                for (int mt = 0; mt < 2; mt++) {
                    pa[mt][0] = pack2(s[mt][2 * ks][0], s[mt][2 * ks][1]);
                    pa[mt][1] = pack2(s[mt][2 * ks][2], s[mt][2 * ks][3]);
                    pa[mt][2] = pack2(s[mt][2 * ks + 1][0], s[mt][2 * ks + 1][1]);
                    pa[mt][3] = pack2(s[mt][2 * ks + 1][2], s[mt][2 * ks + 1][3]);
                }
#pragma unroll
                for (int np = 0; np < HD / 16; np++) {
                    uint32_t bb[4];
                    ldsm_x4_t(bb, lbt.at(tV, ks * 16, np * 16));
#pragma unroll
                    for (int mt = 0; mt < 2; mt++) {
                        mma16816(o[mt][2 * np], pa[mt], bb[0], bb[1]);
                        mma16816(o[mt][2 * np + 1], pa[mt], bb[2], bb[3]);
                    }
                }
            }
        }
        cp_async_wait_all();
        __syncthreads();
    }
    // The warp's own Q rows are free now: stage the output there.
#pragma unroll
    for (int mt = 0; mt < 2; mt++) {
        const float l_lo = quad_sum(l[mt][0]), l_hi = quad_sum(l[mt][1]);
        const int r0 = wr + 16 * mt;
        store_rows3<HD>(o[mt], 1.f / l_lo, 1.f / l_hi, sQ + r0 * HD, out + h * HD, base + q0 + r0, qrows - r0, qw, lane);
        const int qi = q0 + r0 + g;
        if (t == 0) {
            if (qi < seq) lse[(base + qi) * heads + h] = (m[mt][0] + log2f(l_lo)) * LN2_F;
            if (qi + 8 < seq) lse[(base + qi + 8) * heads + h] = (m[mt][1] + log2f(l_hi)) * LN2_F;
        }
    }
}

// D[r * nh + h] = sum_c dO[r, h, c] O[r, h, c] for `rows` rows and `nh` heads (row stride `qs`);
// HD / 8 threads per (row, head), each 8 columns.
template <int HD>
DEVI void attn3_bwd_prep_impl(const bf16* dout, const bf16* o, float* dsum, long long rows, int nh, int qs) {
    constexpr int L = HD / 8;
    const long long gid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long grp = gid / L;
    const int part = (int)(gid % L);
    float acc = 0.f;
    if (grp < rows * nh) {
        const long long r = grp / nh;
        const int hh = (int)(grp % nh);
        float a[8], c[8];
        load8(dout + r * qs + hh * HD + part * 8, a);
        load8(o + r * qs + hh * HD + part * 8, c);
#pragma unroll
        for (int j = 0; j < 8; j++) acc += a[j] * c[j];
    }
#pragma unroll
    for (int off = L / 2; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (grp < rows * nh && part == 0) dsum[grp] = acc;
}

// Pointers arrive offset to the launch's first sequence and head; strides are of the full tensors
// (qs: q / dO row, ks: k / v row, lse_s: lse row). Accumulators: dq_acc [rows][nh * HD],
// dk_acc and dv_acc [rows][nh / group * HD], dsum [rows][nh], rows = batch of this launch * seq.
template <int HD>
DEVI void attn3_bwd_impl(const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const float* lse,
                         const float* dsum, const int* seg, float* dq_acc, float* dk_acc, float* dv_acc, int seq, int qs,
                         int ks, int lse_s, int group, float scale) {
    using A = Att3<HD>;
    constexpr int T = A::KT;        // 64
    constexpr int TILE = T * HD;    // bf16 elements of a tile
    require_smem(A::BWD_SMEM);
    extern __shared__ __align__(128) unsigned char smem[];
    bf16* sK = reinterpret_cast<bf16*>(smem);
    bf16* sV = sK + TILE;
    bf16* sQ = sV + TILE;         // [2]
    bf16* sdO = sQ + 2 * TILE;    // [2]
    bf16* sdS = sdO + 2 * TILE;   // [64 keys][64 queries], swizzled
    float* sLse = reinterpret_cast<float*>(sdS + T * T);  // [2][64], log2 units
    float* sD = sLse + 2 * T;                               // [2][64]
    int* sSegQ = reinterpret_cast<int*>(sD + 2 * T);       // [2][64]
    int* sSegK = sSegQ + 2 * T;                             // [64]

    const int hl = blockIdx.x, nh = gridDim.x, kvl = hl / group;
    const int kt = blockIdx.y, b = blockIdx.z;  // the longest key tiles first
    const long long base = (long long)b * seq;
    const int k0 = kt * T, krows = min(T, seq - k0);
    const int total = (seq + T - 1) / T - kt;
    const int accq = nh * HD, acck = (nh / group) * HD;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const float sl2 = scale * LOG2E_F;
    const int kj_lo = k0 + warp * 16 + g, kj_hi = kj_lo + 8;
    const Lsm<HD> la = lsm_a<HD>(lane), lb = lsm_b<HD>(lane), lbt = lsm_bt<HD>(lane);
    const Lsm<T> lds = lsm_b<T>(lane, warp * 16);  // dS^T as the A operand of this warp's dQ rows
    const uint32_t uK = smem_u32(sK), uV = smem_u32(sV), uQ = smem_u32(sQ), udO = smem_u32(sdO), udS = smem_u32(sdS);

    // Stage query tile number `it` (rows (kt + it) * 64 ..) into buffer `buf`.
    auto stage = [&](int it, int buf) {
        const int q0 = (kt + it) * T, qrows = min(T, seq - q0);
        tile_async3<HD, T>(sQ + buf * TILE, q + hl * HD, base + q0, qrows, qs);
        tile_async3<HD, T>(sdO + buf * TILE, dout + hl * HD, base + q0, qrows, qs);
        cp_async_commit();
        if (threadIdx.x < T) {
            const bool ok = (int)threadIdx.x < qrows;
            const long long r = base + q0 + threadIdx.x;
            sSegQ[buf * T + threadIdx.x] = ok ? seg[r] : INT_MIN;
            sLse[buf * T + threadIdx.x] = ok ? lse[r * lse_s + hl] * LOG2E_F : 0.f;
            sD[buf * T + threadIdx.x] = ok ? dsum[r * nh + hl] : 0.f;
        }
    };

    tile_async3<HD, T>(sK, k + kvl * HD, base + k0, krows, ks);
    tile_async3<HD, T>(sV, v + kvl * HD, base + k0, krows, ks);
    if (threadIdx.x < T) sSegK[threadIdx.x] = (int)threadIdx.x < krows ? seg[base + k0 + threadIdx.x] : INT_MIN + 1;
    stage(0, 0);
    cp_async_wait_all();
    __syncthreads();
    const int segk_lo = sSegK[warp * 16 + g], segk_hi = sSegK[warp * 16 + g + 8];
    const bool k_uni = warp_uniform(sSegK, T, lane);
    const int k_seg = sSegK[0];

    float dka[HD / 8][4], dva[HD / 8][4];
#pragma unroll
    for (int j = 0; j < HD / 8; j++) {
        dka[j][0] = dka[j][1] = dka[j][2] = dka[j][3] = 0.f;
        dva[j][0] = dva[j][1] = dva[j][2] = dva[j][3] = 0.f;
    }

    for (int it = 0; it < total; it++) {
        const int buf = it & 1;
        const int q0 = (kt + it) * T, qrows = min(T, seq - q0);
        if (it + 1 < total) stage(it + 1, buf ^ 1);
        const uint32_t tQ = uQ + buf * TILE * 2, tdO = udO + buf * TILE * 2;
        const float* lse2 = sLse + buf * T;
        const float* dd = sD + buf * T;
        const int* segq = sSegQ + buf * T;
        const bool q_uni = warp_uniform(segq, T, lane);
        const bool one_seg = q_uni && k_uni && segq[0] == k_seg;
        // The same decision in every warp (it reads only shared values): the barrier below is safe.
        if (!(q_uni && k_uni && !one_seg)) {
            const bool full = one_seg && q0 != k0;  // every query after every key, one segment

#pragma unroll
            for (int half = 0; half < 2; half++) {
                const int c0 = half * 32;  // query columns of this half
                float st[4][4], dp[4][4];
#pragma unroll
                for (int j = 0; j < 4; j++) st[j][0] = st[j][1] = st[j][2] = st[j][3] = dp[j][0] = dp[j][1] = dp[j][2] = dp[j][3] = 0.f;
                // S^T = K_w . Q^T and dP^T = V_w . dO^T over this half's 32 queries.
#pragma unroll
                for (int kk = 0; kk < HD / 16; kk++) {
                    uint32_t ka[4], va[4];
                    ldsm_x4(ka, la.at(uK, warp * 16, kk * 16));
                    ldsm_x4(va, la.at(uV, warp * 16, kk * 16));
#pragma unroll
                    for (int np = 0; np < 2; np++) {
                        uint32_t bq[4], bo[4];
                        ldsm_x4(bq, lb.at(tQ, c0 + np * 16, kk * 16));
                        ldsm_x4(bo, lb.at(tdO, c0 + np * 16, kk * 16));
                        mma16816(st[2 * np], ka, bq[0], bq[1]);
                        mma16816(st[2 * np + 1], ka, bq[2], bq[3]);
                        mma16816(dp[2 * np], va, bo[0], bo[1]);
                        mma16816(dp[2 * np + 1], va, bo[2], bo[3]);
                    }
                }
                // P^T and dS^T = P^T (dP^T - D) scale, in place.
#pragma unroll
                for (int j = 0; j < 4; j++) {
#pragma unroll
                    for (int e = 0; e < 2; e++) {
                        const int col = c0 + 8 * j + 2 * t + e;
                        const float l2 = lse2[col], d = dd[col];
                        float p_lo = ex2(fmaf(st[j][e], sl2, -l2));
                        float p_hi = ex2(fmaf(st[j][2 + e], sl2, -l2));
                        if (!full) {
                            const int qi = q0 + col, sq = segq[col];
                            const bool in = col < qrows;
                            if (!(in && qi >= kj_lo && kj_lo < seq && sq == segk_lo)) p_lo = 0.f;
                            if (!(in && qi >= kj_hi && kj_hi < seq && sq == segk_hi)) p_hi = 0.f;
                        }
                        st[j][e] = p_lo;
                        st[j][2 + e] = p_hi;
                        dp[j][e] = p_lo * (dp[j][e] - d) * scale;
                        dp[j][2 + e] = p_hi * (dp[j][2 + e] - d) * scale;
                    }
                }
                // dS^T to shared memory (rows = this warp's keys) for the dQ product below.
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    *reinterpret_cast<uint32_t*>(sdS + swz<T>(warp * 16 + g, c0 + 8 * j + 2 * t)) = pack2(dp[j][0], dp[j][1]);
                    *reinterpret_cast<uint32_t*>(sdS + swz<T>(warp * 16 + g + 8, c0 + 8 * j + 2 * t)) = pack2(dp[j][2], dp[j][3]);
                }
                // dV_w += P^T . dO ; dK_w += dS^T . Q (k = this half's queries, two steps of 16).
#pragma unroll
                for (int kq = 0; kq < 2; kq++) {
                    uint32_t pa[4] = {pack2(st[2 * kq][0], st[2 * kq][1]), pack2(st[2 * kq][2], st[2 * kq][3]),
                                      pack2(st[2 * kq + 1][0], st[2 * kq + 1][1]), pack2(st[2 * kq + 1][2], st[2 * kq + 1][3])};
                    uint32_t da[4] = {pack2(dp[2 * kq][0], dp[2 * kq][1]), pack2(dp[2 * kq][2], dp[2 * kq][3]),
                                      pack2(dp[2 * kq + 1][0], dp[2 * kq + 1][1]), pack2(dp[2 * kq + 1][2], dp[2 * kq + 1][3])};
#pragma unroll
                    for (int np = 0; np < HD / 16; np++) {
                        uint32_t bo[4], bq[4];
                        ldsm_x4_t(bo, lbt.at(tdO, c0 + kq * 16, np * 16));
                        ldsm_x4_t(bq, lbt.at(tQ, c0 + kq * 16, np * 16));
                        mma16816(dva[2 * np], pa, bo[0], bo[1]);
                        mma16816(dva[2 * np + 1], pa, bo[2], bo[3]);
                        mma16816(dka[2 * np], da, bq[0], bq[1]);
                        mma16816(dka[2 * np + 1], da, bq[2], bq[3]);
                    }
                }
            }
            __syncthreads();  // dS^T of every warp is in place
            // dQ (this warp's 16 query rows) += dS . K over the 64 keys, 64 columns at a time.
            const int r_lo = q0 + warp * 16 + g, r_hi = r_lo + 8;
#pragma unroll
            for (int pass = 0; pass < HD / 64; pass++) {
                float acc[8][4];
#pragma unroll
                for (int j = 0; j < 8; j++) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
#pragma unroll
                for (int kk = 0; kk < T / 16; kk++) {
                    uint32_t a[4];
                    ldsm_x4_t(a, lds.at(udS, kk * 16, 0));
#pragma unroll
                    for (int np = 0; np < 4; np++) {
                        uint32_t bk[4];
                        ldsm_x4_t(bk, lbt.at(uK, kk * 16, pass * 64 + np * 16));
                        mma16816(acc[2 * np], a, bk[0], bk[1]);
                        mma16816(acc[2 * np + 1], a, bk[2], bk[3]);
                    }
                }
#pragma unroll
                for (int j = 0; j < 8; j++) {
                    const int col = hl * HD + pass * 64 + 8 * j + 2 * t;
                    if (r_lo < seq) red_add2(dq_acc + (base + r_lo) * accq + col, acc[j][0], acc[j][1]);
                    if (r_hi < seq) red_add2(dq_acc + (base + r_hi) * accq + col, acc[j][2], acc[j][3]);
                }
            }
        }
        cp_async_wait_all();
        __syncthreads();
    }
    // dK, dV of this head into the kv head's accumulators (the group's heads add up there).
#pragma unroll
    for (int j = 0; j < HD / 8; j++) {
        const int col = kvl * HD + 8 * j + 2 * t;
        if (kj_lo < seq) {
            red_add2(dk_acc + (base + kj_lo) * acck + col, dka[j][0], dka[j][1]);
            red_add2(dv_acc + (base + kj_lo) * acck + col, dva[j][0], dva[j][1]);
        }
        if (kj_hi < seq) {
            red_add2(dk_acc + (base + kj_hi) * acck + col, dka[j][2], dka[j][3]);
            red_add2(dv_acc + (base + kj_hi) * acck + col, dva[j][2], dva[j][3]);
        }
    }
}

// dst[r * dst_stride + c] = acc[r * width + c] as bf16, 8 columns per thread (width % 8 == 0).
extern "C" __global__ void attn3_acc_to_bf16(const float* acc, bf16* dst, long long rows, int width, int dst_stride) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const int per_row = width / 8;
    if (i >= rows * per_row) return;
    const long long r = i / per_row;
    const int c = (int)(i % per_row) * 8;
    const float4 a = *reinterpret_cast<const float4*>(acc + r * width + c);
    const float4 b = *reinterpret_cast<const float4*>(acc + r * width + c + 4);
    const float f[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
    store8(dst + r * dst_stride + c, f);
}

#define ATT3_INSTANCES(HD)                                                                                           \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS)                                                        \
        attn3_fwd_##HD(const bf16* q, const bf16* k, const bf16* v, const int* seg, bf16* out, float* lse, int seq, \
                       int heads, int kv_heads, float scale) {                                                       \
        attn3_fwd_impl<HD>(q, k, v, seg, out, lse, seq, heads, kv_heads, scale);                                     \
    }                                                                                                                \
    extern "C" __global__ void attn3_bwd_prep_##HD(const bf16* dout, const bf16* o, float* dsum, long long rows,     \
                                                   int nh, int qs) {                                                 \
        attn3_bwd_prep_impl<HD>(dout, o, dsum, rows, nh, qs);                                                        \
    }                                                                                                                \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS, 2)                                                     \
        attn3_bwd_##HD(const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const float* lse,             \
                       const float* dsum, const int* seg, float* dq_acc, float* dk_acc, float* dv_acc, int seq,     \
                       int qs, int ks, int lse_s, int group, float scale) {                                          \
        attn3_bwd_impl<HD>(q, k, v, dout, lse, dsum, seg, dq_acc, dk_acc, dv_acc, seq, qs, ks, lse_s, group, scale); \
    }

ATT3_INSTANCES(64)
ATT3_INSTANCES(128)

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
