// Causal flash attention for training, forward and backward side by side: GQA, packed sequences (a
// query sees keys at or before it with the same segment id), an optional sliding window (a query
// sees only the `window` most recent keys, itself included; 0 = no window) and any softmax scale.
// O(seq) memory: the forward saves only the log-sum-exp per (row, head); the backward recomputes the
// probabilities from it.
//
// Layout: q [batch * seq, heads * HD], k and v [batch * seq, kv_heads * HD], out like q,
// lse [batch * seq, heads] (f32). Row of token t of sequence b is b * seq + t.
//
// Arithmetic: tensor cores through mma.sync m16n8k16 (bf16 operands, f32 accumulation) fed by
// ldmatrix from shared-memory tiles filled with cp.async: the instruction set of compute capability
// 8.0, so the same source serves every card the engine runs on (Ampere, Ada, Hopper, Blackwell).
// Tiles are unpadded, the 16-byte chunks of row r XOR-swizzled by r % 8 within each group of 8
// chunks (`swz`), so every 8-row ldmatrix and fragment store hits 8 distinct bank groups; a tile's
// row is W = HD rounded up to 64 columns wide (the swizzle works on groups of 64 columns), and the
// columns past HD are never read.
//
// The cards differ in the shared memory one block may use (99 KB on compute capability 8.6, 8.9 and
// 12.0; 163 KB on 8.0; 227 KB on 9.0 and 10.0), so tile shapes and pipeline depths are template
// parameters, each instance's shared memory is a formula (`AttFwd::SMEM`, `AttBwd::SMEM`) that
// `backend::cuda::kernels` mirrors, and the backend picks per card the deepest instance that fits
// (`attention_kernels_for`). A kernel launched with less shared memory than its formula traps.
//
//  attn_fwd_*       grid (heads, query tiles, batch), 4 warps: each warp owns 16 * MT query rows,
//                   so each K / V fragment read from shared memory feeds MT m16 tiles; K / V tiles of
//                   64 keys, KS deep (2: the next tile loads during this one's math).
//  attn_bwd_prep_*  D = rowsum(dO * O) once per (row, head) into the backward scratch.
//  attn_bwd_*       grid (heads * HD / DC, key tiles of T = 16 * NW, batch): one block per (query
//                   head, key tile, DC-column slice) walks the query tiles at or after its keys (and
//                   within the window); dK, dV of its slice stay in registers and are added (f32)
//                   into the kv-head accumulators at the end, so the GQA group sums there; dQ = dS K
//                   of each step is added (f32) into a dQ accumulator. Q / dO tiles S deep. A head
//                   dim too wide for its dK and dV in registers (256) is split into DC = 128-column
//                   slices; each slice recomputes the scores (7 tile products instead of 5).
//  attn_acc_to_bf16 accumulators -> bf16 outputs.
// The f32 additions make the backward's last bits depend on block order (as FlashAttention-2's).
// Tiles that need no mask (every key at or before every query, one segment, inside the window) skip
// the per-element tests; tiles of two different single segments, or wholly outside the window, are
// skipped outright.
//
// Fragment layouts (PTX ISA, mma.m16n8k16 bf16), g = lane / 4, t = lane % 4:
//   A 16x16: a0 (row g, cols 2t..2t+1), a1 (row g+8, same), a2 (row g, cols 2t+8..), a3 (row g+8, ..)
//   B 16x8:  b0 (rows 2t..2t+1, col g), b1 (rows 2t+8.., col g)
//   C 16x8:  c0 c1 (row g, cols 2t, 2t+1), c2 c3 (row g+8, same)
//
// kernels/dev/emu compiles this file for the host (TUNESTUDIO_EMU: its emu.h supplies the warp
// collectives and the inline-PTX primitives below) and checks every instance against a
// double-precision reference without a GPU.
#ifndef TUNESTUDIO_EMU
#include "common.cuh"
#include <limits.h>

#define DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]

// The launcher computes the dynamic shared memory from the same formulas; a kernel given less traps
// instead of writing past its allocation.
DEVI void require_smem(size_t need) {
    unsigned int have;
    asm volatile("mov.u32 %0, %%dynamic_smem_size;" : "=r"(have));
    if (have < need) __trap();
}

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

DEVI float quad_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
    return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
DEVI float quad_sum(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    return v + __shfl_xor_sync(0xffffffffu, v, 2);
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
#endif  // TUNESTUDIO_EMU

#define ATT_WARPS 4
#define LOG2E_F 1.4426950408889634f
#define LN2_F 0.6931471805599453f

// Shared-memory row width of a tile of head dim HD: the swizzle permutes groups of 8 chunks of 16
// bytes, so rows are whole groups.
template <int HD>
constexpr int att_width() {
    return (HD + 63) / 64 * 64;
}

// No window: a distance no key reaches.
DEVI int att_window(int window) { return window > 0 ? window : INT_MAX; }

// Element offset of (row, col) in a [rows][W] bf16 tile whose 16-byte chunks are swizzled.
template <int W>
DEVI int swz(int row, int col) {
    const int c = col >> 3;
    return row * W + (((c & ~7) | ((c ^ row) & 7)) << 3) + (col & 7);
}

// Asynchronous copy of ROWS rows of HD columns (rows past `valid` zero-filled) into a swizzled tile
// of width W, by THREADS threads.
template <int W, int HD, int ROWS, int THREADS>
DEVI void tile_async(bf16* dst, const bf16* src, long long row0, int valid, int width) {
    constexpr int PER_ROW = HD / 8;
#pragma unroll
    for (int i = threadIdx.x; i < ROWS * PER_ROW; i += THREADS) {
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
// A run-time column origin must be folded in at construction (`cb`, a multiple of 16 columns), or
// added to the base when it is a multiple of 64 columns (a whole swizzle group: a plain offset).
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
// `width`), staged through 16 rows of a swizzled tile of width W that only this warp uses.
template <int HD, int W>
DEVI void store_rows(const float (*acc)[4], float s_lo, float s_hi, bf16* stage, bf16* dst, long long row0, int valid,
                     int width, int lane) {
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int j = 0; j < HD / 8; j++) {
        *reinterpret_cast<uint32_t*>(stage + swz<W>(g, 8 * j + 2 * t)) = pack2(acc[j][0] * s_lo, acc[j][1] * s_lo);
        *reinterpret_cast<uint32_t*>(stage + swz<W>(g + 8, 8 * j + 2 * t)) = pack2(acc[j][2] * s_hi, acc[j][3] * s_hi);
    }
    __syncwarp();
#pragma unroll
    for (int i = lane; i < 16 * (HD / 8); i += 32) {
        const int r = i / (HD / 8), c = (i % (HD / 8)) * 8;
        if (r < valid)
            *reinterpret_cast<uint4*>(dst + (row0 + r) * width + c) = *reinterpret_cast<const uint4*>(stage + swz<W>(r, c));
    }
    __syncwarp();
}

// Is the value the same in the first `n` (16, 32 or 64) entries of `s`? (whole warp calls)
DEVI bool warp_uniform(const int* s, int n, int lane) {
    const int first = s[0];
    bool same = lane >= n || s[lane] == first;
    if (n > 32) same = same && s[lane + 32] == first;
    return __all_sync(0xffffffffu, same);
}

// ------------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------------

template <int HD, int MT, int KS>
struct AttFwd {
    static constexpr int W = att_width<HD>();
    static constexpr int QT = ATT_WARPS * 16 * MT;  // query rows of a block
    static constexpr int KT = 64;                   // keys per tile
    static constexpr int THREADS = ATT_WARPS * 32;
    // Q [QT][W], K [KS][KT][W], V [KS][KT][W]; segQ [QT], segK [KS][KT].
    static constexpr size_t SMEM = (size_t)(QT * W + 2 * KS * KT * W) * 2 + (QT + KS * KT) * 4;
};

template <int HD, int MT, int KS>
DEVI void attn_fwd_impl(const bf16* q, const bf16* k, const bf16* v, const int* seg, bf16* out, float* lse, int seq,
                        int heads, int kv_heads, float scale, int window) {
    using A = AttFwd<HD, MT, KS>;
    constexpr int W = A::W, QT = A::QT, KT = A::KT, WR = 16 * MT;  // WR: query rows of a warp
    require_smem(A::SMEM);
    DYNAMIC_SMEM(smem);
    bf16* sQ = reinterpret_cast<bf16*>(smem);                 // [QT][W]
    bf16* sK = sQ + QT * W;                                   // [KS][KT][W]
    bf16* sV = sK + KS * KT * W;                              // [KS][KT][W]
    int* sSegQ = reinterpret_cast<int*>(sV + KS * KT * W);    // [QT]
    int* sSegK = sSegQ + QT;                                  // [KS][KT]

    const int h = blockIdx.x, b = blockIdx.z;
    const int qt = gridDim.y - 1 - blockIdx.y;  // the longest rows first
    const int kh = h / (heads / kv_heads);
    const int qw = heads * HD, kw = kv_heads * HD;
    const long long base = (long long)b * seq;
    const int q0 = qt * QT, qrows = min(QT, seq - q0);
    const int win = att_window(window);
    // Key tiles that some row of this block may see: from the first row's window to the last row.
    const int kt_begin = max(0, q0 - (win - 1)) / KT;
    const int kt_end = min((seq + KT - 1) / KT, (q0 + qrows + KT - 1) / KT);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int wr = warp * WR;  // this warp's rows in the tile: wr .. wr + WR - 1
    const float sl2 = scale * LOG2E_F;
    const Lsm<W> la = lsm_a<W>(lane), lb = lsm_b<W>(lane), lbt = lsm_bt<W>(lane);
    const uint32_t uQ = smem_u32(sQ), uK = smem_u32(sK), uV = smem_u32(sV);

    // Keys [n0, n0 + KT) into buffer `buf`.
    auto load_keys = [&](int n0, int buf) {
        const int nrows = min(KT, seq - n0);
        tile_async<W, HD, KT, A::THREADS>(sK + buf * KT * W, k + kh * HD, base + n0, nrows, kw);
        tile_async<W, HD, KT, A::THREADS>(sV + buf * KT * W, v + kh * HD, base + n0, nrows, kw);
        cp_async_commit();
        for (int i = threadIdx.x; i < KT; i += A::THREADS) sSegK[buf * KT + i] = i < nrows ? seg[base + n0 + i] : INT_MIN + 1;
    };

    tile_async<W, HD, QT, A::THREADS>(sQ, q + h * HD, base + q0, qrows, qw);
    for (int i = threadIdx.x; i < QT; i += A::THREADS) sSegQ[i] = i < qrows ? seg[base + q0 + i] : INT_MIN;
    if (kt_begin < kt_end) load_keys(kt_begin * KT, 0);
    else cp_async_commit();
    cp_async_wait_all();
    __syncthreads();

    const bool live = q0 + wr < seq;
    const bool q_uni = warp_uniform(sSegQ + wr, WR, lane);
    const int q_seg = sSegQ[wr];
    int segq[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; mt++) {
        segq[mt][0] = sSegQ[wr + 16 * mt + g];
        segq[mt][1] = sSegQ[wr + 16 * mt + g + 8];
    }

    float o[MT][HD / 8][4];
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int j = 0; j < HD / 8; j++) o[mt][j][0] = o[mt][j][1] = o[mt][j][2] = o[mt][j][3] = 0.f;
    float m[MT][2], l[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; mt++) m[mt][0] = m[mt][1] = -INFINITY, l[mt][0] = l[mt][1] = 0.f;

    for (int kt = kt_begin; kt < kt_end; kt++) {
        const int buf = KS == 2 ? (kt - kt_begin) & 1 : 0;
        const int k0 = kt * KT;
        if (KS == 2 && kt + 1 < kt_end) load_keys(k0 + KT, buf ^ 1);
        const uint32_t tK = uK + buf * KT * W * 2, tV = uV + buf * KT * W * 2;
        const int* segk = sSegK + buf * KT;
        const bool k_uni = warp_uniform(segk, KT, lane);
        const bool one_seg = q_uni && k_uni && q_seg == segk[0];
        // Skip: every key after every row of this warp, every key before the window of its first
        // row, or two different single segments.
        const bool skip = !live || k0 > q0 + wr + WR - 1 || k0 + KT - 1 < q0 + wr - (win - 1) || (q_uni && k_uni && !one_seg);
        if (!skip) {
            // No key after any row, none outside any row's window, one segment: no masks.
            const bool full = one_seg && k0 + KT - 1 <= q0 + wr && q0 + wr + WR - 1 - k0 < win;
            float s[MT][8][4];
#pragma unroll
            for (int mt = 0; mt < MT; mt++)
#pragma unroll
                for (int j = 0; j < 8; j++) s[mt][j][0] = s[mt][j][1] = s[mt][j][2] = s[mt][j][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < HD / 16; kk++) {
                uint32_t qa[MT][4];
#pragma unroll
                for (int mt = 0; mt < MT; mt++) ldsm_x4(qa[mt], la.at(uQ, wr + 16 * mt, kk * 16));
#pragma unroll
                for (int np = 0; np < 4; np++) {
                    uint32_t bb[4];
                    ldsm_x4(bb, lb.at(tK, np * 16, kk * 16));
#pragma unroll
                    for (int mt = 0; mt < MT; mt++) {
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
                        for (int mt = 0; mt < MT; mt++) {
                            const int qi = q0 + wr + 16 * mt + g;
                            if (!(in && key <= qi && qi - key < win && sk == segq[mt][0])) s[mt][j][e] = -INFINITY;
                            if (!(in && key <= qi + 8 && qi + 8 - key < win && sk == segq[mt][1])) s[mt][j][2 + e] = -INFINITY;
                        }
                    }
                }
            }
            // Online softmax in log2 units. Each score is scaled by sl2 in place and rounded, and
            // the row maximum taken over the rounded values, so the maximum's exponent is exactly
            // 0 and every other one at most 0. One fma of the raw score with -mu (as before)
            // leaves mu's rounding error in the exponent: from |mu| ~ 2^31 on (a diverging run's
            // scores) that exceeds ex2's range, every p of a row became 0, l = 0 and the output NaN.
#pragma unroll
            for (int mt = 0; mt < MT; mt++) {
#pragma unroll
                for (int hf = 0; hf < 2; hf++) {
                    float mx = -INFINITY;
#pragma unroll
                    for (int j = 0; j < 8; j++) {
                        s[mt][j][2 * hf] = __fmul_rn(s[mt][j][2 * hf], sl2);
                        s[mt][j][2 * hf + 1] = __fmul_rn(s[mt][j][2 * hf + 1], sl2);
                        mx = fmaxf(mx, fmaxf(s[mt][j][2 * hf], s[mt][j][2 * hf + 1]));
                    }
                    mx = quad_max(mx);
                    const float mn = fmaxf(m[mt][hf], mx);
                    const float mu = mn == -INFINITY ? 0.f : mn;
                    const float alpha = ex2(m[mt][hf] - mu);
                    float ps = 0.f;
#pragma unroll
                    for (int j = 0; j < 8; j++) {
                        s[mt][j][2 * hf] = ex2(__fsub_rn(s[mt][j][2 * hf], mu));
                        s[mt][j][2 * hf + 1] = ex2(__fsub_rn(s[mt][j][2 * hf + 1], mu));
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
                uint32_t pa[MT][4];
#pragma unroll
                for (int mt = 0; mt < MT; mt++) {
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
                    for (int mt = 0; mt < MT; mt++) {
                        mma16816(o[mt][2 * np], pa[mt], bb[0], bb[1]);
                        mma16816(o[mt][2 * np + 1], pa[mt], bb[2], bb[3]);
                    }
                }
            }
        }
        cp_async_wait_all();
        __syncthreads();
        if (KS == 1 && kt + 1 < kt_end) {
            // One buffer: the next tile loads only now that every warp is done with this one.
            load_keys(k0 + KT, 0);
            cp_async_wait_all();
            __syncthreads();
        }
    }
    // The warp's own Q rows are free now: stage the output there. A row that saw no key (only
    // possible for padding rows) gets l = 0 and is not written.
#pragma unroll
    for (int mt = 0; mt < MT; mt++) {
        const float l_lo = quad_sum(l[mt][0]), l_hi = quad_sum(l[mt][1]);
        const int r0 = wr + 16 * mt;
        store_rows<HD, W>(o[mt], 1.f / l_lo, 1.f / l_hi, sQ + r0 * W, out + h * HD, base + q0 + r0, qrows - r0, qw, lane);
        const int qi = q0 + r0 + g;
        if (t == 0) {
            if (qi < seq) lse[(base + qi) * heads + h] = (m[mt][0] + log2f(l_lo)) * LN2_F;
            if (qi + 8 < seq) lse[(base + qi + 8) * heads + h] = (m[mt][1] + log2f(l_hi)) * LN2_F;
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------------

// D[r * nh + h] = sum_c dO[r, h, c] O[r, h, c] for `rows` rows and `nh` heads (row stride `qs`);
// 4 threads per (row, head), each a quarter of the 8-column chunks.
template <int HD>
DEVI void attn_bwd_prep_impl(const bf16* dout, const bf16* o, float* dsum, long long rows, int nh, int qs) {
    constexpr int P = 4, CHUNKS = HD / 8;
    const long long gid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long grp = gid / P;
    const int part = (int)(gid % P);
    float acc = 0.f;
    if (grp < rows * nh) {
        const long long r = grp / nh;
        const int hh = (int)(grp % nh);
        for (int c = part; c < CHUNKS; c += P) {
            float a[8], b[8];
            load8(dout + r * qs + hh * HD + c * 8, a);
            load8(o + r * qs + hh * HD + c * 8, b);
#pragma unroll
            for (int j = 0; j < 8; j++) acc += a[j] * b[j];
        }
    }
    acc += __shfl_xor_sync(0xffffffffu, acc, 1);
    acc += __shfl_xor_sync(0xffffffffu, acc, 2);
    if (grp < rows * nh && part == 0) dsum[grp] = acc;
}

template <int HD, int NW, int S, int DC>
struct AttBwd {
    static constexpr int W = att_width<HD>();
    static constexpr int T = 16 * NW;        // keys of a block, and query rows of each step
    static constexpr int THREADS = 32 * NW;
    static constexpr int DSW = T > 64 ? T : 64;  // row width of the dS^T tile (the swizzle needs 64)
    // K, V [T][W]; Q, dO [S][T][W]; dS^T [T][DSW]; lse, D, segQ [S][T]; segK [T].
    static constexpr size_t SMEM = (size_t)(2 * T * W + 2 * S * T * W + T * DSW) * 2 + (3 * S * T + T) * 4;
};

// Pointers arrive offset to the launch's first sequence and head; strides are of the full tensors
// (qs: q / dO row, ks: k / v row, lse_s: lse row). Accumulators: dq_acc [rows][nh * HD],
// dk_acc and dv_acc [rows][nh / group * HD], dsum [rows][nh], rows = batch of this launch * seq.
template <int HD, int NW, int S, int DC>
DEVI void attn_bwd_impl(const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const float* lse,
                        const float* dsum, const int* seg, float* dq_acc, float* dk_acc, float* dv_acc, int seq, int qs,
                        int ks, int lse_s, int group, float scale, int window) {
    using A = AttBwd<HD, NW, S, DC>;
    constexpr int W = A::W, T = A::T, DSW = A::DSW, TILE = T * W, SPLITS = HD / DC;
    // dQ passes over this block's DC columns: 64 at a time where they divide, else 32.
    constexpr int PW = DC % 64 == 0 ? 64 : 32;
    static_assert(HD % DC == 0 && (DC == HD || DC % 64 == 0), "a column slice starts on a swizzle group");
    static_assert(T % 32 == 0, "queries are taken 32 at a time");
    require_smem(A::SMEM);
    DYNAMIC_SMEM(smem);
    bf16* sK = reinterpret_cast<bf16*>(smem);
    bf16* sV = sK + TILE;
    bf16* sQ = sV + TILE;         // [S]
    bf16* sdO = sQ + S * TILE;    // [S]
    bf16* sdS = sdO + S * TILE;   // [T keys][DSW], T queries used, swizzled
    float* sLse = reinterpret_cast<float*>(sdS + T * DSW);  // [S][T], log2 units
    float* sD = sLse + S * T;                                 // [S][T]
    int* sSegQ = reinterpret_cast<int*>(sD + S * T);         // [S][T]
    int* sSegK = sSegQ + S * T;                               // [T]

    const int hl = blockIdx.x / SPLITS, c_off = (blockIdx.x % SPLITS) * DC;
    const int nh = gridDim.x / SPLITS, kvl = hl / group;
    const int kt = blockIdx.y, b = blockIdx.z;
    const long long base = (long long)b * seq;
    const int k0 = kt * T, krows = min(T, seq - k0);
    const int win = att_window(window);
    // Query tiles that see some key of this tile: from its own to the last inside the window of
    // its last key.
    const int q_tiles = (seq + T - 1) / T;
    const long long last_q = (long long)k0 + krows - 1 + (win - 1);
    const int qt_end = last_q >= seq ? q_tiles : min(q_tiles, (int)(last_q / T) + 1);
    const int total = qt_end - kt;
    const int accq = nh * HD, acck = (nh / group) * HD;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const float sl2 = scale * LOG2E_F;
    const int kj_lo = k0 + warp * 16 + g, kj_hi = kj_lo + 8;
    const Lsm<W> la = lsm_a<W>(lane), lb = lsm_b<W>(lane), lbt = lsm_bt<W>(lane);
    const Lsm<DSW> lds = lsm_b<DSW>(lane, warp * 16);  // dS^T as the A operand of this warp's dQ rows
    const uint32_t uK = smem_u32(sK), uV = smem_u32(sV), uQ = smem_u32(sQ), udO = smem_u32(sdO), udS = smem_u32(sdS);
    // The block's column slice of K, Q and dO: a whole number of swizzle groups, a plain offset.
    const uint32_t cofs = (uint32_t)c_off * 2;

    // Stage query tile number `it` (rows (kt + it) * T ..) into buffer `buf`.
    auto stage = [&](int it, int buf) {
        const int q0 = (kt + it) * T, qrows = min(T, seq - q0);
        tile_async<W, HD, T, A::THREADS>(sQ + buf * TILE, q + hl * HD, base + q0, qrows, qs);
        tile_async<W, HD, T, A::THREADS>(sdO + buf * TILE, dout + hl * HD, base + q0, qrows, qs);
        cp_async_commit();
        if (threadIdx.x < T) {
            const bool ok = (int)threadIdx.x < qrows;
            const long long r = base + q0 + threadIdx.x;
            sSegQ[buf * T + threadIdx.x] = ok ? seg[r] : INT_MIN;
            sLse[buf * T + threadIdx.x] = ok ? lse[r * lse_s + hl] * LOG2E_F : 0.f;
            sD[buf * T + threadIdx.x] = ok ? dsum[r * nh + hl] : 0.f;
        }
    };

    tile_async<W, HD, T, A::THREADS>(sK, k + kvl * HD, base + k0, krows, ks);
    tile_async<W, HD, T, A::THREADS>(sV, v + kvl * HD, base + k0, krows, ks);
    if (threadIdx.x < T) sSegK[threadIdx.x] = (int)threadIdx.x < krows ? seg[base + k0 + threadIdx.x] : INT_MIN + 1;
    stage(0, 0);
    cp_async_wait_all();
    __syncthreads();
    const int segk_lo = sSegK[warp * 16 + g], segk_hi = sSegK[warp * 16 + g + 8];
    const bool k_uni = warp_uniform(sSegK, T, lane);
    const int k_seg = sSegK[0];

    float dka[DC / 8][4], dva[DC / 8][4];
#pragma unroll
    for (int j = 0; j < DC / 8; j++) {
        dka[j][0] = dka[j][1] = dka[j][2] = dka[j][3] = 0.f;
        dva[j][0] = dva[j][1] = dva[j][2] = dva[j][3] = 0.f;
    }

    for (int it = 0; it < total; it++) {
        const int buf = S == 2 ? it & 1 : 0;
        const int q0 = (kt + it) * T, qrows = min(T, seq - q0);
        if (S == 2 && it + 1 < total) stage(it + 1, buf ^ 1);
        const uint32_t tQ = uQ + buf * TILE * 2, tdO = udO + buf * TILE * 2;
        const float* lse2 = sLse + buf * T;
        const float* dd = sD + buf * T;
        const int* segq = sSegQ + buf * T;
        const bool q_uni = warp_uniform(segq, T, lane);
        const bool one_seg = q_uni && k_uni && segq[0] == k_seg;
        // The same decision in every warp (it reads only shared values): the barrier below is safe.
        if (!(q_uni && k_uni && !one_seg)) {
            // Every query after every key, every key inside every query's window, one segment.
            const bool full = one_seg && q0 != k0 && q0 + T - 1 - k0 < win;

#pragma unroll
            for (int half = 0; half < T / 32; half++) {
                const int c0 = half * 32;  // query columns of this half
                float st[4][4], dp[4][4];
#pragma unroll
                for (int j = 0; j < 4; j++) st[j][0] = st[j][1] = st[j][2] = st[j][3] = dp[j][0] = dp[j][1] = dp[j][2] = dp[j][3] = 0.f;
                // S^T = K_w . Q^T and dP^T = V_w . dO^T over this half's 32 queries (every column).
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
                        // p <= 1: at a diverging run's magnitudes the f32 log-sum-exp is off by
                        // more than ex2's range, and an exponent above 0 would make p infinite.
                        float p_lo = ex2(fminf(fmaf(st[j][e], sl2, -l2), 0.f));
                        float p_hi = ex2(fminf(fmaf(st[j][2 + e], sl2, -l2), 0.f));
                        if (!full) {
                            const int qi = q0 + col, sq = segq[col];
                            const bool in = col < qrows;
                            if (!(in && qi >= kj_lo && qi - kj_lo < win && kj_lo < seq && sq == segk_lo)) p_lo = 0.f;
                            if (!(in && qi >= kj_hi && qi - kj_hi < win && kj_hi < seq && sq == segk_hi)) p_hi = 0.f;
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
                    *reinterpret_cast<uint32_t*>(sdS + swz<DSW>(warp * 16 + g, c0 + 8 * j + 2 * t)) = pack2(dp[j][0], dp[j][1]);
                    *reinterpret_cast<uint32_t*>(sdS + swz<DSW>(warp * 16 + g + 8, c0 + 8 * j + 2 * t)) = pack2(dp[j][2], dp[j][3]);
                }
                // dV_w += P^T . dO ; dK_w += dS^T . Q over this block's columns (k = this half's
                // queries, two steps of 16).
#pragma unroll
                for (int kq = 0; kq < 2; kq++) {
                    uint32_t pa[4] = {pack2(st[2 * kq][0], st[2 * kq][1]), pack2(st[2 * kq][2], st[2 * kq][3]),
                                      pack2(st[2 * kq + 1][0], st[2 * kq + 1][1]), pack2(st[2 * kq + 1][2], st[2 * kq + 1][3])};
                    uint32_t da[4] = {pack2(dp[2 * kq][0], dp[2 * kq][1]), pack2(dp[2 * kq][2], dp[2 * kq][3]),
                                      pack2(dp[2 * kq + 1][0], dp[2 * kq + 1][1]), pack2(dp[2 * kq + 1][2], dp[2 * kq + 1][3])};
#pragma unroll
                    for (int np = 0; np < DC / 16; np++) {
                        uint32_t bo[4], bq[4];
                        ldsm_x4_t(bo, lbt.at(tdO + cofs, c0 + kq * 16, np * 16));
                        ldsm_x4_t(bq, lbt.at(tQ + cofs, c0 + kq * 16, np * 16));
                        mma16816(dva[2 * np], pa, bo[0], bo[1]);
                        mma16816(dva[2 * np + 1], pa, bo[2], bo[3]);
                        mma16816(dka[2 * np], da, bq[0], bq[1]);
                        mma16816(dka[2 * np + 1], da, bq[2], bq[3]);
                    }
                }
            }
            __syncthreads();  // dS^T of every warp is in place
            // dQ (this warp's 16 query rows, this block's columns) += dS . K over the T keys.
            const int r_lo = q0 + warp * 16 + g, r_hi = r_lo + 8;
#pragma unroll
            for (int pass = 0; pass < DC / PW; pass++) {
                float acc[PW / 8][4];
#pragma unroll
                for (int j = 0; j < PW / 8; j++) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
#pragma unroll
                for (int kk = 0; kk < T / 16; kk++) {
                    uint32_t a[4];
                    ldsm_x4_t(a, lds.at(udS, kk * 16, 0));
#pragma unroll
                    for (int np = 0; np < PW / 16; np++) {
                        uint32_t bk[4];
                        ldsm_x4_t(bk, lbt.at(uK + cofs, kk * 16, pass * PW + np * 16));
                        mma16816(acc[2 * np], a, bk[0], bk[1]);
                        mma16816(acc[2 * np + 1], a, bk[2], bk[3]);
                    }
                }
#pragma unroll
                for (int j = 0; j < PW / 8; j++) {
                    const int col = hl * HD + c_off + pass * PW + 8 * j + 2 * t;
                    if (r_lo < seq) red_add2(dq_acc + (base + r_lo) * accq + col, acc[j][0], acc[j][1]);
                    if (r_hi < seq) red_add2(dq_acc + (base + r_hi) * accq + col, acc[j][2], acc[j][3]);
                }
            }
        }
        cp_async_wait_all();
        __syncthreads();
        if (S == 1 && it + 1 < total) {
            // One buffer: the next query tile loads only now that every warp is done with this one.
            stage(it + 1, 0);
            cp_async_wait_all();
            __syncthreads();
        }
    }
    // dK, dV of this head's slice into the kv head's accumulators (the group's heads add up there).
#pragma unroll
    for (int j = 0; j < DC / 8; j++) {
        const int col = kvl * HD + c_off + 8 * j + 2 * t;
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
extern "C" __global__ void attn_acc_to_bf16(const float* acc, bf16* dst, long long rows, int width, int dst_stride) {
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

// ------------------------------------------------------------------------------------------------
// Instances. Names and parameters are mirrored by backend::cuda::kernels (`ATTENTION_VARIANTS`),
// which also computes their shared memory; `attention_kernels_for` picks per card.
// ------------------------------------------------------------------------------------------------

#define ATT_FWD(NAME, HD, MT, KS)                                                                                    \
    extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32)                                                     \
        NAME(const bf16* q, const bf16* k, const bf16* v, const int* seg, bf16* out, float* lse, int seq, int heads, \
             int kv_heads, float scale, int window) {                                                                \
        attn_fwd_impl<HD, MT, KS>(q, k, v, seg, out, lse, seq, heads, kv_heads, scale, window);                     \
    }

#define ATT_BWD(NAME, HD, NW, S, DC)                                                                                 \
    extern "C" __global__ void __launch_bounds__(32 * NW, 2)                                                         \
        NAME(const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const float* lse, const float* dsum,    \
             const int* seg, float* dq_acc, float* dk_acc, float* dv_acc, int seq, int qs, int ks, int lse_s,       \
             int group, float scale, int window) {                                                                   \
        attn_bwd_impl<HD, NW, S, DC>(q, k, v, dout, lse, dsum, seg, dq_acc, dk_acc, dv_acc, seq, qs, ks, lse_s,     \
                                     group, scale, window);                                                          \
    }

#define ATT_PREP(HD)                                                                                                 \
    extern "C" __global__ void attn_bwd_prep_##HD(const bf16* dout, const bf16* o, float* dsum, long long rows,      \
                                                  int nh, int qs) {                                                  \
        attn_bwd_prep_impl<HD>(dout, o, dsum, rows, nh, qs);                                                         \
    }

// Forward: two m16 tiles per warp and two K/V buffers where the registers and shared memory allow.
ATT_FWD(attn_fwd_32, 32, 2, 2)
ATT_FWD(attn_fwd_64, 64, 2, 2)
ATT_FWD(attn_fwd_96, 96, 2, 2)
ATT_FWD(attn_fwd_128, 128, 2, 2)
ATT_FWD(attn_fwd_256, 256, 1, 2)
ATT_FWD(attn_fwd_256_ks1, 256, 1, 1)

// Backward: 4 warps (64 keys) with two Q/dO buffers; one buffer where 99 KB is the limit; head dim
// 256 in 128-column slices, and with 2 warps (32 keys) on the 99 KB cards.
ATT_BWD(attn_bwd_32, 32, 4, 2, 32)
ATT_BWD(attn_bwd_64, 64, 4, 2, 64)
ATT_BWD(attn_bwd_96, 96, 4, 2, 96)
ATT_BWD(attn_bwd_96_s1, 96, 4, 1, 96)
ATT_BWD(attn_bwd_128, 128, 4, 2, 128)
ATT_BWD(attn_bwd_128_s1, 128, 4, 1, 128)
ATT_BWD(attn_bwd_256, 256, 4, 2, 128)
ATT_BWD(attn_bwd_256_s1, 256, 4, 1, 128)
ATT_BWD(attn_bwd_256_t32, 256, 2, 1, 128)

ATT_PREP(32)
ATT_PREP(64)
ATT_PREP(96)
ATT_PREP(128)
ATT_PREP(256)
