// The optimizer kernels (kernels/adamw.cu, kernels/reduce.cu) on the host (emu.h): multi-tensor
// launches whose lists reach every branch: tensors shorter than a block's chunk, exactly a chunk,
// ragged, empty; f32 and bf16 sums; compute copies on and off; blocks past several tensors.
// AdamW against the same f32 arithmetic written plainly; the sum of squares against a
// double-precision sum. Built and run by kernels/dev/emu/optimizer.sh (no GPU needed). Exit
// status 1 on any failure.
#include "emu.h"
#define TUNESTUDIO_EMU 1
using std::min;
// reduce.cu's block scratch is a static __shared__ array: one per block. emu.h runs a block's
// threads as fibers and blocks one after another, so a function-static array is exactly that.
#undef __shared__
#define __shared__ static
#include "adamw.cu"
#include "reduce.cu"
#include <random>
#include <string>

static int failures = 0;
static std::mt19937 rng(4321);
static float unif(float lo, float hi) { return std::uniform_real_distribution<float>(lo, hi)(rng); }
template <class T> static void reg(const std::vector<T>& v) { g_bufs.push_back({reinterpret_cast<const unsigned char*>(v.data()), v.size() * sizeof(T)}); }

static void verdict(const std::string& what, bool ok, const std::string& detail) {
    printf("%s %-64s %s\n", ok ? "ok  " : "FAIL", what.c_str(), detail.c_str());
    if (!ok) failures++;
}

// One adamw_multi launch over tensors of the given sizes, three steps, against plain f32 code.
static void adamw_case(const std::vector<long long>& sizes) {
    const int count = (int)sizes.size();
    std::vector<std::vector<float>> p(count), g(count), m(count), v(count), pw, mw, vw;
    std::vector<std::vector<bf16>> c(count);
    for (int t = 0; t < count; t++) {
        const size_t n = (size_t)sizes[t];
        for (auto* x : {&p[t], &g[t], &m[t], &v[t]}) x->resize(n);
        for (auto& x : p[t]) x = unif(-1.f, 1.f);
        c[t].assign(n, __float2bfloat16_rn(7.f));
        for (auto* x : {&p[t], &g[t], &m[t], &v[t]}) reg(*x);
        reg(c[t]);
    }
    pw = p, mw = m, vw = v;
    for (int step = 1; step <= 3; step++) {
        const float lr = 1e-3f * step, beta1 = 0.9f, beta2 = 0.999f, eps = 1e-8f, wd = 0.01f, gs = 0.5f;
        const float bc1 = 1.f - powf(beta1, (float)step), bc2_sqrt = sqrtf(1.f - powf(beta2, (float)step));
        const float step_size = lr / bc1, decay = 1.f - lr * wd;
        AdamwList list{};
        int blocks = 0;
        for (int t = 0; t < count; t++) {
            for (auto& x : g[t]) x = unif(-0.01f, 0.01f);
            list.param[t] = p[t].data();
            list.grad[t] = g[t].data();
            list.m[t] = m[t].data();
            list.v[t] = v[t].data();
            list.compute[t] = t % 3 == 1 ? nullptr : c[t].data();
            list.n[t] = sizes[t];
            list.first_block[t] = blocks;
            blocks += (int)((sizes[t] + ADAMW_CHUNK - 1) / ADAMW_CHUNK);
        }
        list.first_block[count] = blocks;
        list.count = count;
        if (blocks > 0)
            launch(U3{(unsigned)blocks, 1, 1}, ADAMW_THREADS, 0,
                   [&] { adamw_multi(list, decay, beta1, beta2, eps, gs, step_size, bc2_sqrt); });
        for (int t = 0; t < count; t++)
            for (size_t i = 0; i < (size_t)sizes[t]; i++) {
                const float gi = g[t][i] * gs;
                float pi = pw[t][i] * decay;
                mw[t][i] = beta1 * mw[t][i] + (1.f - beta1) * gi;
                vw[t][i] = beta2 * vw[t][i] + (1.f - beta2) * gi * gi;
                pw[t][i] = pi - step_size * mw[t][i] / (sqrtf(vw[t][i]) / bc2_sqrt + eps);
            }
    }
    size_t wrong = 0, copies_wrong = 0, total = 0;
    for (int t = 0; t < count; t++)
        for (size_t i = 0; i < (size_t)sizes[t]; i++, total++) {
            // Same operations in the same order: only the compiler's contractions may differ.
            const auto near = [](float a, float b) { return fabsf(a - b) <= 1e-6f * fmaxf(1.f, fabsf(b)); };
            if (!near(p[t][i], pw[t][i]) || !near(m[t][i], mw[t][i]) || !near(v[t][i], vw[t][i])) wrong++;
            const float want_copy = t % 3 == 1 ? 7.f : __bfloat162float(__float2bfloat16_rn(p[t][i]));
            if (__bfloat162float(c[t][i]) != want_copy) copies_wrong++;
        }
    g_bufs.clear();
    std::string sz;
    for (auto s : sizes) sz += (sz.empty() ? "" : ",") + std::to_string(s);
    if (sizes.size() > 6) sz = std::to_string(sizes.size()) + " tensors";
    verdict("adamw_multi sizes " + sz, wrong == 0 && copies_wrong == 0,
            std::to_string(wrong) + " of " + std::to_string(total) + " states off, " + std::to_string(copies_wrong) + " copies off");
}

// One sumsq_partial_multi launch and its sum_partials over pieces (size, bf16?).
static void sumsq_case(const std::vector<std::pair<long long, bool>>& pieces) {
    const int count = (int)pieces.size();
    std::vector<std::vector<float>> f(count);
    std::vector<std::vector<bf16>> b(count);
    SumsqList list{};
    int blocks = 0;
    double want = 0;
    for (int t = 0; t < count; t++) {
        const auto [n, is_bf16] = pieces[t];
        if (is_bf16) {
            b[t].resize((size_t)n);
            for (auto& x : b[t]) {
                x = __float2bfloat16_rn(unif(-1.f, 1.f));
                want += (double)__bfloat162float(x) * __bfloat162float(x);
            }
            reg(b[t]);
            list.ptr[t] = b[t].data();
        } else {
            f[t].resize((size_t)n);
            for (auto& x : f[t]) {
                x = unif(-1.f, 1.f);
                want += (double)x * x;
            }
            reg(f[t]);
            list.ptr[t] = f[t].data();
        }
        list.n[t] = n;
        list.is_bf16[t] = is_bf16;
        list.first_block[t] = blocks;
        blocks += (int)((n + SUMSQ_CHUNK - 1) / SUMSQ_CHUNK);
    }
    list.first_block[count] = blocks;
    list.count = count;
    std::vector<double> partial((size_t)std::max(blocks, 1), std::nan("")), out(2, std::nan(""));
    reg(partial);
    reg(out);
    launch(U3{(unsigned)blocks, 1, 1}, RED_THREADS, 0, [&] { sumsq_partial_multi(list, partial.data()); });
    launch(U3{1, 1, 1}, RED_THREADS, 0, [&] { sum_partials(partial.data(), blocks, out.data() + 1); });
    g_bufs.clear();
    const double e = want == 0 ? fabs(out[1]) : fabs(out[1] - want) / want;
    std::string sz;
    for (auto [n, is_bf16] : pieces) sz += (sz.empty() ? "" : ",") + std::to_string(n) + (is_bf16 ? "b" : "");
    if (pieces.size() > 6) sz = std::to_string(pieces.size()) + " pieces, every 4th bf16";
    char detail[64];
    snprintf(detail, sizeof detail, "rel_err %9.3e bound 1e-12", e);
    verdict("sumsq_partial_multi pieces " + sz, std::isfinite(out[1]) && e <= 1e-12, detail);
}

int main() {
    adamw_case({1});
    adamw_case({ADAMW_CHUNK});
    adamw_case({ADAMW_CHUNK + 1, 0, 3, 2 * ADAMW_CHUNK - 1, 5000});
    std::vector<long long> many;
    for (int t = 0; t < ADAMW_LIST; t++) many.push_back(1 + 97 * t);
    adamw_case(many);
    sumsq_case({{3, false}});
    sumsq_case({{SUMSQ_CHUNK, false}});
    sumsq_case({{SUMSQ_CHUNK + 5, false}, {0, false}, {1000, true}, {2 * SUMSQ_CHUNK, true}, {7, false}});
    std::vector<std::pair<long long, bool>> pieces;
    for (int t = 0; t < SUMSQ_LIST; t++) pieces.push_back({1 + 131 * t, t % 4 == 0});
    sumsq_case(pieces);
    printf("%d failure(s)\n", failures);
    return failures ? 1 : 0;
}
