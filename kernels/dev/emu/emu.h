// Host emulation of the few CUDA features kernels/attention.cu uses. A block's threads are
// fibers (ucontext) on one OS thread, switched only when one waits at a barrier; the scheduler
// picks the next fiber round-robin or at random (seeded), so warps interleave differently from run
// to run. Warp collectives (shfl, all, ldmatrix, mma.sync) exchange through per-warp slots between
// two warp barriers and check that all 32 lanes called the same op; cp.async lands at
// cp.async.wait_group (or at issue: g_cp_early); shared memory is a heap buffer of exactly the
// launch's dynamic size, poisoned with 0xff (ASan sees overruns, NaN shows unwritten reads).
#pragma once
#include <cuda_bf16.h>
#include <algorithm>
#include <atomic>
#include <random>
#include <ucontext.h>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

#undef __device__
#define __device__
#undef __forceinline__
#define __forceinline__ inline
#undef __global__
#define __global__
#undef __launch_bounds__
#define __launch_bounds__(...)
#undef __shared__
#define __shared__

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define EMU_ASAN 1
#endif

struct U3 { unsigned x = 0, y = 0, z = 0; };
inline U3 threadIdx, blockIdx;
inline U3 gridDim, blockDim;

[[noreturn]] inline void emu_fail(const char* what) {
    fprintf(stderr, "EMU FAILURE: %s (block %u,%u,%u thread %u)\n", what, blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x);
    abort();
}
#define EMU_CHECK(c, msg) do { if (!(c)) emu_fail(msg); } while (0)

enum Op : int { OP_SHFL = 1, OP_ALL, OP_SYNCWARP, OP_LDSM, OP_LDSM_T, OP_MMA };

struct Pending { uint32_t dst; const void* src; bool full; };
struct Fiber {
    ucontext_t ctx;
    std::vector<char> stack;
    bool done = false;
    bool blocked = false;  // waiting at a barrier that has not released
    unsigned tid;
    std::vector<Pending> pending;
};
inline ucontext_t g_main;
inline Fiber* g_cur;
inline long g_progress;
inline void emu_yield() {
#ifdef EMU_ASAN
    void* fake = nullptr;
    __sanitizer_start_switch_fiber(&fake, nullptr, 0);
#endif
    swapcontext(&g_cur->ctx, &g_main);
#ifdef EMU_ASAN
    __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
}
struct Bar {
    int expected, arrived = 0;
    std::vector<Fiber*> waiters;
    explicit Bar(int n) : expected(n) {}
    void arrive_and_wait() {
        g_progress++;
        if (++arrived == expected) {
            arrived = 0;
            for (Fiber* f : waiters) f->blocked = false;
            waiters.clear();
            return;
        }
        g_cur->blocked = true;
        waiters.push_back(g_cur);
        while (g_cur->blocked) emu_yield();
    }
};

struct Warp {
    Bar bar{32};
    int tag[32];
    uint64_t u[32];
    uint32_t f[32][6];
};
struct Block {
    Bar bar;
    Warp w[32];
    unsigned char* smem;
    size_t smem_bytes;
    std::vector<long> syncs;
    explicit Block(int n) : bar(n), syncs(n, 0) {}
};
inline Block* g_block;
inline int t_lane, t_warp;
inline bool g_cp_early = false;
inline bool g_random_schedule = false;
inline std::mt19937 g_sched_rng(1);

inline unsigned char* emu_smem() { return g_block->smem; }

// Post this lane's op tag, wait for the warp, check every lane posted the same op.
inline Warp& warp_enter(Op op) {
    Warp& w = g_block->w[t_warp];
    w.tag[t_lane] = op;
    w.bar.arrive_and_wait();
    for (int i = 0; i < 32; i++) EMU_CHECK(w.tag[i] == op, "warp lanes diverged at a collective");
    return w;
}
inline void warp_leave(Warp& w) { w.bar.arrive_and_wait(); }

template <class T>
T __shfl_xor_sync(unsigned mask, T v, int o) {
    static_assert(sizeof(T) <= 8);
    EMU_CHECK(mask == 0xffffffffu, "partial shfl mask");
    Warp& w = g_block->w[t_warp];
    uint64_t bits = 0;
    memcpy(&bits, &v, sizeof(T));
    w.u[t_lane] = bits;
    warp_enter(OP_SHFL);
    uint64_t got = w.u[t_lane ^ o];
    warp_leave(w);
    T r;
    memcpy(&r, &got, sizeof(T));
    return r;
}
inline bool __all_sync(unsigned mask, bool p) {
    EMU_CHECK(mask == 0xffffffffu, "partial all mask");
    Warp& w = g_block->w[t_warp];
    w.u[t_lane] = p;
    warp_enter(OP_ALL);
    bool all = true;
    for (int i = 0; i < 32; i++) all = all && w.u[i];
    warp_leave(w);
    return all;
}
inline void __syncwarp() {
    Warp& w = warp_enter(OP_SYNCWARP);
    warp_leave(w);
}
inline void __syncthreads() {
    g_block->syncs[threadIdx.x]++;
    g_block->bar.arrive_and_wait();
}
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
[[noreturn]] inline void __trap() { emu_fail("__trap"); }

// ---- replacements of the inline-PTX helpers of attention.cu ----
// The dynamic shared memory of the emulated block (attention.cu declares it through this macro).
#define DYNAMIC_SMEM(name) unsigned char* name = emu_smem()

inline void require_smem(size_t need) { EMU_CHECK(g_block->smem_bytes >= need, "dynamic shared memory too small"); }

inline uint32_t smem_u32(const void* p) {
    const unsigned char* c = static_cast<const unsigned char*>(p);
    EMU_CHECK(c >= g_block->smem && c <= g_block->smem + g_block->smem_bytes, "smem_u32 of a non-shared pointer");
    return (uint32_t)(c - g_block->smem);
}

inline void smem_range(uint32_t addr, size_t n, size_t align) {
    EMU_CHECK(addr % align == 0, "misaligned shared access");
    EMU_CHECK(addr + n <= g_block->smem_bytes, "shared access out of bounds");
}

inline void ldsm_impl(uint32_t* r, uint32_t addr, bool trans) {
    smem_range(addr, 16, 16);
    Warp& w = g_block->w[t_warp];
    w.u[t_lane] = addr;
    warp_enter(trans ? OP_LDSM_T : OP_LDSM);
    const unsigned char* s = g_block->smem;
    const int g = t_lane >> 2, t = t_lane & 3;
    for (int i = 0; i < 4; i++) {
        if (!trans) {
            memcpy(&r[i], s + w.u[8 * i + g] + 4 * t, 4);
        } else {
            uint16_t lo, hi;
            memcpy(&lo, s + w.u[8 * i + 2 * t] + 2 * g, 2);
            memcpy(&hi, s + w.u[8 * i + 2 * t + 1] + 2 * g, 2);
            r[i] = (uint32_t)lo | ((uint32_t)hi << 16);
        }
    }
    warp_leave(w);
}
inline void ldsm_x4(uint32_t* r, uint32_t addr) { ldsm_impl(r, addr, false); }
inline void ldsm_x4_t(uint32_t* r, uint32_t addr) { ldsm_impl(r, addr, true); }

inline float bf_lo(uint32_t v) { uint32_t b = v << 16; float f; memcpy(&f, &b, 4); return f; }
inline float bf_hi(uint32_t v) { uint32_t b = v & 0xffff0000u; float f; memcpy(&f, &b, 4); return f; }

// mma.m16n8k16 row.col f32 += bf16 x bf16 (fragment layouts of the PTX ISA).
inline void mma16816(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
    Warp& w = g_block->w[t_warp];
    for (int i = 0; i < 4; i++) w.f[t_lane][i] = a[i];
    w.f[t_lane][4] = b0;
    w.f[t_lane][5] = b1;
    warp_enter(OP_MMA);
    float A[16][16], B[16][8];
    for (int L = 0; L < 32; L++) {
        const int g = L >> 2, t = L & 3;
        const uint32_t* f = w.f[L];
        A[g][2 * t] = bf_lo(f[0]); A[g][2 * t + 1] = bf_hi(f[0]);
        A[g + 8][2 * t] = bf_lo(f[1]); A[g + 8][2 * t + 1] = bf_hi(f[1]);
        A[g][2 * t + 8] = bf_lo(f[2]); A[g][2 * t + 9] = bf_hi(f[2]);
        A[g + 8][2 * t + 8] = bf_lo(f[3]); A[g + 8][2 * t + 9] = bf_hi(f[3]);
        B[2 * t][g] = bf_lo(f[4]); B[2 * t + 1][g] = bf_hi(f[4]);
        B[2 * t + 8][g] = bf_lo(f[5]); B[2 * t + 9][g] = bf_hi(f[5]);
    }
    const int g = t_lane >> 2, t = t_lane & 3;
    const int rows[4] = {g, g, g + 8, g + 8}, cols[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
    for (int i = 0; i < 4; i++) {
        double s = 0;
        for (int k = 0; k < 16; k++) s += (double)A[rows[i]][k] * (double)B[k][cols[i]];
        c[i] = (float)((double)c[i] + s);
    }
    warp_leave(w);
}

typedef __nv_bfloat16 bf16_t;
inline uint32_t pack2(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    uint32_t r;
    memcpy(&r, &v, 4);
    return r;
}

// Global buffers registered for bounds checks of cp.async sources and reductions.
struct GBuf { const unsigned char* p; size_t n; };
inline std::vector<GBuf> g_bufs;
inline void global_range(const void* p, size_t n) {
    const unsigned char* c = static_cast<const unsigned char*>(p);
    for (auto& b : g_bufs)
        if (c >= b.p && c + n <= b.p + b.n) return;
    emu_fail("global access outside every buffer");
}

inline void cp_do(const Pending& q) {
    if (q.full) memcpy(g_block->smem + q.dst, q.src, 16);
    else memset(g_block->smem + q.dst, 0, 16);
}
inline void cp_async16(uint32_t dst, const void* src, bool full) {
    smem_range(dst, 16, 16);
    EMU_CHECK(((uintptr_t)src & 15) == 0, "misaligned cp.async source");
    if (full) global_range(src, 16);
    Pending q{dst, src, full};
    if (g_cp_early) cp_do(q);
    else g_cur->pending.push_back(q);
}
inline void cp_async_commit() {}
inline void cp_async_wait_all() {
    for (auto& q : g_cur->pending) cp_do(q);
    g_cur->pending.clear();
}

inline float quad_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
    return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
inline float quad_sum(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    return v + __shfl_xor_sync(0xffffffffu, v, 2);
}
inline float ex2(float x) { return exp2f(x); }
// Round-to-nearest product and difference, never contracted into an fma (ISO C++ mode).
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline void red_add2(float* p, float a, float b) {
    EMU_CHECK(((uintptr_t)p & 7) == 0, "misaligned red.v2");
    global_range(p, 8);
    std::atomic_ref<float>(p[0]).fetch_add(a);
    std::atomic_ref<float>(p[1]).fetch_add(b);
}

// Run `body` for every block of `grid` with `threads` threads and `smem` bytes of shared memory.
inline const std::function<void()>* g_body;
inline void fiber_main() {
#ifdef EMU_ASAN
    __sanitizer_finish_switch_fiber(nullptr, nullptr, nullptr);
#endif
    (*g_body)();
    EMU_CHECK(g_cur->pending.empty(), "cp.async never waited for");
    g_cur->done = true;
    g_progress++;
#ifdef EMU_ASAN
    __sanitizer_start_switch_fiber(nullptr, nullptr, 0);
#endif
    setcontext(&g_main);
}

inline void launch(U3 grid, unsigned threads, size_t smem, const std::function<void()>& body) {
    gridDim = grid;
    blockDim = U3{threads, 1, 1};
    g_body = &body;
    constexpr size_t STACK = 512 << 10;
    std::vector<Fiber> fib(threads);
    for (auto& f : fib) f.stack.resize(STACK);
    for (unsigned z = 0; z < grid.z; z++)
        for (unsigned y = 0; y < grid.y; y++)
            for (unsigned x = 0; x < grid.x; x++) {
                Block blk((int)threads);
                unsigned char* s = static_cast<unsigned char*>(aligned_alloc(128, smem ? (smem + 127) / 128 * 128 : 128));
                memset(s, 0xff, smem);  // bf16 0xffff is NaN: reads of unwritten shared memory show
                blk.smem = s;
                blk.smem_bytes = smem;
                g_block = &blk;
                blockIdx = U3{x, y, z};
                for (unsigned t = 0; t < threads; t++) {
                    Fiber& f = fib[t];
                    f.done = false;
                    f.blocked = false;
                    f.tid = t;
                    f.pending.clear();
                    getcontext(&f.ctx);
                    f.ctx.uc_stack.ss_sp = f.stack.data();
                    f.ctx.uc_stack.ss_size = STACK;
                    f.ctx.uc_link = nullptr;
                    makecontext(&f.ctx, fiber_main, 0);
                }
                unsigned live = threads, next = 0;
                while (live > 0) {
                    // The next runnable fiber: round-robin, or from a random start.
                    const unsigned from = g_random_schedule ? (unsigned)(g_sched_rng() % threads) : next;
                    unsigned t = threads;
                    for (unsigned i = 0; i < threads; i++) {
                        const unsigned c = (from + i) % threads;
                        if (!fib[c].done && !fib[c].blocked) {
                            t = c;
                            break;
                        }
                    }
                    EMU_CHECK(t < threads, "deadlock: every live thread waits at a barrier the others never reach");
                    next = (t + 1) % threads;
                    Fiber& f = fib[t];
                    g_cur = &f;
                    threadIdx = U3{t, 0, 0};
                    t_lane = t & 31;
                    t_warp = t >> 5;
#ifdef EMU_ASAN
                    void* fake = nullptr;
                    __sanitizer_start_switch_fiber(&fake, f.stack.data(), STACK);
#endif
                    swapcontext(&g_main, &f.ctx);
#ifdef EMU_ASAN
                    __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
                    if (f.done) live--;
                }
                for (unsigned t = 1; t < threads; t++) EMU_CHECK(blk.syncs[t] == blk.syncs[0], "threads ran different numbers of __syncthreads");
                free(s);
                g_block = nullptr;
            }
}
