// The generation kernels of kernels/generate.cu run on the host (emu.h) against double-precision
// references, on shapes that reach every branch: GEMV row counts 1..8, each warps-per-row split,
// ragged `in` and `out`, LoRA on and off, f32 output; the cached attention with GQA groups,
// windows, several sequences at different positions, one split and many, and a bad position.
// Built and run by kernels/dev/emu/generate.sh (no GPU needed). Exit status 1 on any failure.
#include "emu.h"
#define TUNESTUDIO_EMU 1
using std::isnan;
#define __fmul_rn(a, b) ((a) * (b))
#define __expf expf
#include "generate.cu"
#include <random>
#include <string>

static int failures = 0;
static std::mt19937 rng(1234);
static float unif(float lo, float hi) { return std::uniform_real_distribution<float>(lo, hi)(rng); }
static float rbf(float x) { return __bfloat162float(__float2bfloat16_rn(x)); }
static std::vector<bf16> bfv(const std::vector<float>& v) {
    std::vector<bf16> r(v.size());
    for (size_t i = 0; i < v.size(); i++) r[i] = __float2bfloat16_rn(v[i]);
    return r;
}
static std::vector<float> randv(size_t n, float s) {
    std::vector<float> v(n);
    for (auto& x : v) x = rbf(unif(-s, s));
    return v;
}
template <class T> static void reg(const std::vector<T>& v) { g_bufs.push_back({reinterpret_cast<const unsigned char*>(v.data()), v.size() * sizeof(T)}); }

static void check(const std::string& what, const std::vector<float>& got, const std::vector<double>& want, double bound) {
    double num = 0, den = 0;
    for (size_t i = 0; i < got.size(); i++) {
        if (!std::isfinite(got[i])) {
            printf("FAIL %-60s element %zu is %f (want %f)\n", what.c_str(), i, got[i], want[i]);
            failures++;
            return;
        }
        num += (got[i] - want[i]) * (got[i] - want[i]);
        den += want[i] * want[i];
    }
    const double e = den == 0 ? sqrt(num) : sqrt(num / den);
    printf("%s %-60s rel_err %9.3e bound %7.1e\n", e <= bound ? "ok  " : "FAIL", what.c_str(), e, bound);
    if (e > bound) failures++;
}

static int smem_gemv(bool nf4) { return (nf4 ? 16 : 0) * 4 + GEMV_WARPS * GEMV_MAX_ROWS * 4; }

// One GEMV case: dense or NF4, n rows, [out, in], optional bias and LoRA, warps per row.
static void gemv_case(bool nf4, int n, int out, int in, bool bias_on, int rank, int wpr, bool y_f32) {
    const auto x = randv((size_t)n * in, 1.f);
    std::vector<float> wdeq((size_t)out * in);
    std::vector<unsigned char> packed((size_t)out * in / 2), absmax_q, absq;
    std::vector<float> absmax2, code2(256);
    std::vector<float> wdense;
    float offset = 0.f;
    if (nf4) {
        const size_t blocks = ((size_t)out * in + 63) / 64;
        absmax_q.resize(blocks);
        absmax2.resize((blocks + 255) / 256);
        for (auto& b : packed) b = (unsigned char)(rng() & 255);
        for (auto& b : absmax_q) b = (unsigned char)(rng() & 255);
        for (auto& a : absmax2) a = unif(0.001f, 0.01f);
        for (auto& c : code2) c = unif(-1.f, 1.f);
        offset = unif(0.01f, 0.05f);
        for (size_t e = 0; e < wdeq.size(); e++) {
            const size_t blk = e / 64;
            const float a = code2[absmax_q[blk]] * absmax2[blk / 256] + offset;
            const unsigned char byte = packed[e / 2];
            const int nib = (e & 1) ? (byte & 15) : (byte >> 4);
            wdeq[e] = GEN_NF4_CODE[nib] * a;
        }
    } else {
        wdense = randv((size_t)out * in, 0.1f);
        wdeq = wdense;
    }
    const auto bias = randv(out, 0.5f);
    const auto lb = randv((size_t)out * std::max(rank, 1), 0.2f);
    const auto xa = randv((size_t)n * std::max(rank, 1), 1.f);
    std::vector<float> rs(n);
    for (int r = 0; r < n; r++) rs[r] = (r % 2 == 0) ? 0.5f : 0.f;  // fine-tuned and base rows alternate
    std::vector<double> want((size_t)n * out);
    for (int r = 0; r < n; r++)
        for (int o = 0; o < out; o++) {
            double s = 0;
            for (int i = 0; i < in; i++) s += (double)x[(size_t)r * in + i] * wdeq[(size_t)o * in + i];
            if (bias_on) s += bias[o];
            for (int j = 0; j < rank; j++) s += (double)rs[r] * xa[(size_t)r * rank + j] * lb[(size_t)o * rank + j];
            want[(size_t)r * out + o] = y_f32 ? s : rbf((float)s);
        }
    auto xb = bfv(x), bb = bfv(bias), lbb = bfv(lb), xab = bfv(xa), wb = bfv(wdense);
    std::vector<bf16> y((size_t)n * out);
    std::vector<float> yf((size_t)n * out);
    g_bufs.clear();
    reg(xb), reg(bb), reg(lbb), reg(xab), reg(wb), reg(packed), reg(absmax_q), reg(absmax2), reg(code2), reg(rs), reg(y), reg(yf);
    const unsigned blocks = (unsigned)((out + GEMV_WARPS / wpr - 1) / (GEMV_WARPS / wpr));
    launch(U3{blocks, 1, 1}, GEMV_THREADS, smem_gemv(nf4), [&] {
        const bf16* bp = bias_on ? bb.data() : nullptr;
        const bf16* lp = rank > 0 ? lbb.data() : nullptr;
        if (nf4)
            gemv_nf4(xb.data(), n, packed.data(), absmax_q.data(), absmax2.data(), code2.data(), offset, out, in, bp, lp, xab.data(),
                     rs.data(), rank, y.data(), wpr);
        else
            gemv_bf16(xb.data(), n, wb.data(), out, in, bp, lp, xab.data(), rs.data(), rank, y_f32 ? (void*)yf.data() : (void*)y.data(),
                      y_f32, wpr);
    });
    std::vector<float> got((size_t)n * out);
    for (size_t i = 0; i < got.size(); i++) got[i] = y_f32 ? yf[i] : __bfloat162float(y[i]);
    char name[160];
    snprintf(name, sizeof name, "gemv_%s n=%d %dx%d bias=%d rank=%d wpr=%d%s", nf4 ? "nf4" : "bf16", n, out, in, bias_on, rank, wpr,
             y_f32 ? " f32" : "");
    // bf16 output: half an ulp of bf16 (2^-9) relative; f32: summation order only.
    check(name, got, want, y_f32 ? 1e-5 : 4e-3);
}

struct Row { int slot, pos; };

static void attn_case(int heads, int kv_heads, int hd, int capacity, int slot_count, int window, const std::vector<Row>& rows, int split_len,
                      bool expect_bad = false) {
    const int n = (int)rows.size(), kvw = kv_heads * hd, group = heads / kv_heads;
    const auto q = randv((size_t)n * heads * hd, 1.f);
    const auto kc = randv((size_t)slot_count * capacity * kvw, 1.f);
    const auto vc = randv((size_t)slot_count * capacity * kvw, 1.f);
    const float scale = 1.f / sqrtf((float)hd);
    std::vector<double> want((size_t)n * heads * hd, 0);
    for (int r = 0; r < n; r++) {
        const int p = rows[r].pos, s = rows[r].slot;
        if (p < 0 || p >= capacity || s < 0 || s >= slot_count) continue;
        const int lo = (window > 0 && p + 1 > window) ? p + 1 - window : 0;
        for (int h = 0; h < heads; h++) {
            const int kh = h / group;
            std::vector<double> sc;
            double m = -1e300;
            for (int j = lo; j <= p; j++) {
                double d = 0;
                for (int t = 0; t < hd; t++)
                    d += (double)rbf(q[((size_t)r * heads + h) * hd + t]) * kc[((size_t)s * capacity + j) * kvw + kh * hd + t];
                sc.push_back(d * scale);
                m = std::max(m, d * scale);
            }
            double l = 0;
            for (auto& v : sc) l += (v = exp(v - m));
            for (int t = 0; t < hd; t++) {
                double o = 0;
                for (int j = lo; j <= p; j++) o += sc[j - lo] * vc[((size_t)s * capacity + j) * kvw + kh * hd + t];
                want[((size_t)r * heads + h) * hd + t] = o / l;
            }
        }
    }
    int max_len = 0;
    for (auto& r : rows) max_len = std::max(max_len, std::min(r.pos + 1, window > 0 ? window : r.pos + 1));
    const int splits = std::max(1, (max_len + split_len - 1) / split_len);
    auto qb = bfv(q), kb = bfv(kc), vb = bfv(vc);
    std::vector<int> slots(n), pos(n);
    for (int r = 0; r < n; r++) slots[r] = rows[r].slot, pos[r] = rows[r].pos;
    std::vector<float> part((size_t)n * heads * splits * (hd + 2));
    std::vector<bf16> out((size_t)n * heads * hd);
    g_bufs.clear();
    reg(qb), reg(kb), reg(vb), reg(slots), reg(pos), reg(part), reg(out);
    const int smem = (group * hd + group * ATTC_THREADS + 3 * group) * 4;
    launch(U3{(unsigned)kv_heads, (unsigned)n, (unsigned)splits}, ATTC_THREADS, smem, [&] {
        attn_cached_part(qb.data(), kb.data(), vb.data(), slots.data(), pos.data(), heads, kv_heads, hd, capacity, slot_count, scale, window,
                         split_len, part.data(), out.data());
    });
    if (splits > 1)
        launch(U3{(unsigned)heads, (unsigned)n, 1}, hd, 0, [&] { attn_cached_combine(part.data(), heads, hd, splits, out.data()); });
    std::vector<float> got(out.size());
    for (size_t i = 0; i < got.size(); i++) got[i] = __bfloat162float(out[i]);
    char name[160];
    snprintf(name, sizeof name, "attn_cached h=%d kv=%d hd=%d cap=%d rows=%d window=%d splits=%d", heads, kv_heads, hd, capacity, n, window,
             splits);
    if (expect_bad) {
        // Row 0 is the bad one: all NaN; the rest checked.
        bool nan_ok = true;
        for (int i = 0; i < heads * hd; i++) nan_ok = nan_ok && std::isnan(got[i]);
        printf("%s %-60s bad row reported as NaN\n", nan_ok ? "ok  " : "FAIL", name);
        if (!nan_ok) failures++;
        got.erase(got.begin(), got.begin() + heads * hd);
        want.erase(want.begin(), want.begin() + heads * hd);
    }
    check(name, got, want, 8e-3);
}

static void kv_store_case() {
    const int n = 5, kv = 2, hd = 16, width = kv * hd, capacity = 7, slot_count = 3;
    const auto src = randv((size_t)n * width, 1.f);
    auto sb = bfv(src);
    std::vector<bf16> cache((size_t)slot_count * capacity * width, __float2bfloat16_rn(-9.f));
    std::vector<int> slots = {0, 2, 2, 1, 5}, pos = {0, 6, 3, 2, 1};  // the last row's slot is out of range
    g_bufs.clear();
    reg(sb), reg(cache), reg(slots), reg(pos);
    const long long threads = (long long)n * width / 8;
    launch(U3{(unsigned)((threads + 255) / 256), 1, 1}, 256, 0,
           [&] { kv_store(sb.data(), n, width, slots.data(), pos.data(), capacity, slot_count, cache.data()); });
    std::vector<float> got(cache.size());
    std::vector<double> want(cache.size(), -9.0);
    for (size_t i = 0; i < got.size(); i++) got[i] = __bfloat162float(cache[i]);
    for (int r = 0; r < n - 1; r++)
        for (int c = 0; c < width; c++) want[((size_t)slots[r] * capacity + pos[r]) * width + c] = rbf(src[(size_t)r * width + c]);
    check("kv_store (an out-of-range slot writes nothing)", got, want, 0);
}

static void scale_rows_case() {
    const int n = 3, w = 20;
    const auto x = randv(n * w, 1.f);
    auto xb = bfv(x);
    std::vector<float> rs = {0.25f, 0.f, 2.f};
    g_bufs.clear();
    reg(xb), reg(rs);
    launch(U3{1, 1, 1}, 256, 0, [&] { scale_rows_bf16(xb.data(), rs.data(), n, w); });
    std::vector<float> got(n * w);
    std::vector<double> want(n * w);
    for (int i = 0; i < n * w; i++) got[i] = __bfloat162float(xb[i]), want[i] = rbf(x[i] * rs[i / w]);
    check("scale_rows_bf16", got, want, 0);
}

int main() {
    for (bool nf4 : {false, true})
        for (int n : {1, 3, 8})
            for (int wpr : {1, 2, 8}) gemv_case(nf4, n, 37, nf4 ? 1088 : 1048, n != 3, n == 8 ? 0 : 16, wpr, false);
    gemv_case(false, 2, 29, 64, false, 0, 1, true);   // logits: f32 out
    gemv_case(false, 4, 16, 200, false, 0, 8, false);  // LoRA A: few outputs, all warps on each
    gemv_case(true, 1, 9, 32, true, 8, 4, false);       // one chunk shorter than a warp's stride
    kv_store_case();
    scale_rows_case();
    attn_case(4, 2, 32, 40, 2, 0, {{0, 0}, {1, 5}, {0, 39}}, 256);                   // one split
    attn_case(4, 2, 32, 40, 2, 0, {{0, 0}, {1, 5}, {0, 39}}, 8);                     // many splits, some empty
    attn_case(8, 1, 64, 300, 1, 0, {{0, 299}}, 64);                                  // group 8, several tiles per split
    attn_case(7, 1, 128, 200, 2, 0, {{1, 150}, {0, 3}}, 1000);                       // group 7, hd 128, tiles of 128
    attn_case(4, 4, 64, 50, 3, 10, {{2, 49}, {0, 9}, {1, 10}}, 4);                   // sliding window
    attn_case(2, 1, 32, 16, 2, 0, {{0, 16}, {1, 4}}, 4, true);                       // a position past the cache
    attn_case(2, 1, 256, 64, 1, 0, {{0, 63}}, 16);                                   // head_dim 256
    printf("%s\n", failures ? "FAILED" : "all generation kernels agree with the references");
    return failures ? 1 : 0;
}
