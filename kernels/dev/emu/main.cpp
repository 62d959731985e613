// Every instance of kernels/attention.cu run on the host (emu.h) against a double-precision
// reference with the GPU tests' bounds: each forward variant, and each backward variant with its
// launches split as backend::cuda::attention_bwd splits them under several scratch limits, on cases
// covering head dims 32, 64, 96, 128 and 256, GQA, packed and interleaved segments, partial tiles,
// sliding windows and a non-default softmax scale. Built and run by build.sh.
// Usage: emu [MODE [CASE [SEED]]]: MODE late|early (cp.async lands at wait / at issue), with -rand
// for a random schedule (SEED); CASE a letter of the cases below, or all.
#include "emu.h"
#include "common.cuh"
#define TUNESTUDIO_EMU 1
#include "attention.cu"
#include <random>
#include <string>

static float rbf(float x) { return __bfloat162float(__float2bfloat16_rn(x)); }

struct Shape {
    int batch, seq, heads, kv, hd;
    int window = 0;      // 0: none
    double scale = 0.0;  // 0: 1 / sqrt(hd)
    double sc() const { return scale > 0 ? scale : 1.0 / sqrt((double)hd); }
    bool sees(int qi, int kj) const { return kj <= qi && (window <= 0 || qi - kj < window); }
};

static void reg(const void* p, size_t n) { g_bufs.push_back({static_cast<const unsigned char*>(p), n}); }

static std::vector<bf16> to_bf(const std::vector<float>& v) {
    std::vector<bf16> r(v.size());
    for (size_t i = 0; i < v.size(); i++) r[i] = __float2bfloat16_rn(v[i]);
    return r;
}
static std::vector<float> from_bf(const std::vector<bf16>& v) {
    std::vector<float> r(v.size());
    for (size_t i = 0; i < v.size(); i++) r[i] = __bfloat162float(v[i]);
    return r;
}

static int failures = 0;
static void check(const std::string& what, const std::vector<float>& got, const std::vector<double>& want, double bound) {
    double num = 0, den = 0;
    for (size_t i = 0; i < got.size(); i++) {
        if (!std::isfinite(got[i])) {
            printf("FAIL %-70s element %zu is %f (want %f)\n", what.c_str(), i, got[i], want[i]);
            failures++;
            return;
        }
        num += (got[i] - want[i]) * (got[i] - want[i]);
        den += want[i] * want[i];
    }
    const double e = den == 0 ? sqrt(num) : sqrt(num / den);
    printf("%s %-70s rel_err %9.3e bound %7.1e\n", e <= bound ? "ok  " : "FAIL", what.c_str(), e, bound);
    if (e > bound) failures++;
}

// At a diverging run's magnitudes the backward's reference (P from the forward's f32 log-sum-exp)
// is itself out of f32's reach; what must hold there is that every gradient stays finite.
static void check_finite(const std::string& what, const std::vector<float>& got) {
    for (size_t i = 0; i < got.size(); i++)
        if (!std::isfinite(got[i])) {
            printf("FAIL %-70s element %zu is %f\n", what.c_str(), i, got[i]);
            failures++;
            return;
        }
    printf("ok   %-70s finite\n", what.c_str());
}

// Reference (double), the CPU backend's algorithm.
static void ref_fwd(const Shape& s, const std::vector<float>& q, const std::vector<float>& k, const std::vector<float>& v,
                    const std::vector<int>& seg, std::vector<double>& out, std::vector<double>& lse) {
    const int qw = s.heads * s.hd, kw = s.kv * s.hd, group = s.heads / s.kv;
    const double scale = s.sc();
    out.assign((size_t)s.batch * s.seq * qw, 0);
    lse.assign((size_t)s.batch * s.seq * s.heads, 0);
    std::vector<double> sc(s.seq);
    for (int b = 0; b < s.batch; b++)
        for (int h = 0; h < s.heads; h++) {
            const int kh = h / group;
            for (int i = 0; i < s.seq; i++) {
                const size_t r = (size_t)b * s.seq + i;
                double m = -INFINITY;
                for (int j = 0; j <= i; j++) {
                    if (seg[b * s.seq + j] != seg[r] || !s.sees(i, j)) { sc[j] = -INFINITY; continue; }
                    double a = 0;
                    for (int c = 0; c < s.hd; c++) a += (double)q[r * qw + h * s.hd + c] * k[((size_t)b * s.seq + j) * kw + kh * s.hd + c];
                    sc[j] = a * scale;
                    m = std::max(m, sc[j]);
                }
                double sum = 0;
                for (int j = 0; j <= i; j++) {
                    if (sc[j] == -INFINITY) continue;
                    const double p = exp(sc[j] - m);
                    sum += p;
                    for (int c = 0; c < s.hd; c++) out[r * qw + h * s.hd + c] += p * v[((size_t)b * s.seq + j) * kw + kh * s.hd + c];
                }
                for (int c = 0; c < s.hd; c++) out[r * qw + h * s.hd + c] /= sum;
                lse[r * s.heads + h] = m + log(sum);
            }
        }
}

static void ref_bwd(const Shape& s, const std::vector<float>& dout, const std::vector<float>& q, const std::vector<float>& k,
                    const std::vector<float>& v, const std::vector<double>& out, const std::vector<double>& lse,
                    const std::vector<int>& seg, std::vector<double>& dq, std::vector<double>& dk, std::vector<double>& dv) {
    const int qw = s.heads * s.hd, kw = s.kv * s.hd, group = s.heads / s.kv;
    const double scale = s.sc();
    dq.assign((size_t)s.batch * s.seq * qw, 0);
    dk.assign((size_t)s.batch * s.seq * kw, 0);
    dv.assign((size_t)s.batch * s.seq * kw, 0);
    for (int b = 0; b < s.batch; b++)
        for (int h = 0; h < s.heads; h++) {
            const int kh = h / group;
            for (int i = 0; i < s.seq; i++) {
                const size_t r = (size_t)b * s.seq + i;
                double di = 0;
                for (int c = 0; c < s.hd; c++) di += (double)dout[r * qw + h * s.hd + c] * out[r * qw + h * s.hd + c];
                for (int j = 0; j <= i; j++) {
                    const size_t rj = (size_t)b * s.seq + j;
                    if (seg[rj] != seg[r] || !s.sees(i, j)) continue;
                    double a = 0, dp = 0;
                    for (int c = 0; c < s.hd; c++) {
                        a += (double)q[r * qw + h * s.hd + c] * k[rj * kw + kh * s.hd + c];
                        dp += (double)dout[r * qw + h * s.hd + c] * v[rj * kw + kh * s.hd + c];
                    }
                    const double p = exp(a * scale - lse[r * s.heads + h]);
                    const double ds = p * (dp - di) * scale;
                    for (int c = 0; c < s.hd; c++) {
                        dq[r * qw + h * s.hd + c] += ds * k[rj * kw + kh * s.hd + c];
                        dk[rj * kw + kh * s.hd + c] += ds * q[r * qw + h * s.hd + c];
                        dv[rj * kw + kh * s.hd + c] += p * dout[r * qw + h * s.hd + c];
                    }
                }
            }
        }
}

// Mirror of backend::cuda::attention_bwd_split.
static bool split_for(const Shape& s, size_t scratch_bytes, int& bc, int& kvc) {
    const size_t group = s.heads / s.kv;
    const size_t per_unit = (size_t)s.seq * (group * s.hd + 2 * s.hd + group);
    const size_t units = scratch_bytes / 4 / std::max<size_t>(per_unit, 1);
    if (units == 0) return false;
    auto dc = [](size_t a, size_t b) { return (a + b - 1) / b; };
    const size_t kv = s.kv, batch = s.batch;
    kvc = (int)dc(kv, dc(kv, std::min(units, kv)));
    const size_t per_launch = std::clamp<size_t>(units / kvc, 1, batch);
    bc = (int)dc(batch, dc(batch, per_launch));
    return true;
}

typedef void (*FwdFn)(const bf16*, const bf16*, const bf16*, const int*, bf16*, float*, int, int, int, float, int);
typedef void (*BwdFn)(const bf16*, const bf16*, const bf16*, const bf16*, const float*, const float*, const int*, float*,
                      float*, float*, int, int, int, int, int, float, int);
typedef void (*PrepFn)(const bf16*, const bf16*, float*, long long, int, int);
struct Fwd { const char* name; FwdFn fn; int rows; size_t smem; };
struct Bwd { const char* name; BwdFn fn; int keys, threads, splits; size_t smem; };

#define FWD(NAME, HD, MT, KS) Fwd{#NAME, NAME, AttFwd<HD, MT, KS>::QT, AttFwd<HD, MT, KS>::SMEM}
#define BWD(NAME, HD, NW, S, DC) Bwd{#NAME, NAME, AttBwd<HD, NW, S, DC>::T, AttBwd<HD, NW, S, DC>::THREADS, HD / DC, AttBwd<HD, NW, S, DC>::SMEM}

// The instances of attention.cu, as backend::cuda::kernels lists them.
static void variants(int hd, std::vector<Fwd>& f, std::vector<Bwd>& b, PrepFn& prep) {
    switch (hd) {
        case 32: f = {FWD(attn_fwd_32, 32, 2, 2)}; b = {BWD(attn_bwd_32, 32, 4, 2, 32)}; prep = attn_bwd_prep_32; break;
        case 64: f = {FWD(attn_fwd_64, 64, 2, 2)}; b = {BWD(attn_bwd_64, 64, 4, 2, 64)}; prep = attn_bwd_prep_64; break;
        case 96:
            f = {FWD(attn_fwd_96, 96, 2, 2)};
            b = {BWD(attn_bwd_96, 96, 4, 2, 96), BWD(attn_bwd_96_s1, 96, 4, 1, 96)};
            prep = attn_bwd_prep_96;
            break;
        case 128:
            f = {FWD(attn_fwd_128, 128, 2, 2)};
            b = {BWD(attn_bwd_128, 128, 4, 2, 128), BWD(attn_bwd_128_s1, 128, 4, 1, 128)};
            prep = attn_bwd_prep_128;
            break;
        case 256:
            f = {FWD(attn_fwd_256, 256, 1, 2), FWD(attn_fwd_256_ks1, 256, 1, 1)};
            b = {BWD(attn_bwd_256, 256, 4, 2, 128), BWD(attn_bwd_256_s1, 256, 4, 1, 128), BWD(attn_bwd_256_t32, 256, 2, 1, 128)};
            prep = attn_bwd_prep_256;
            break;
        default: emu_fail("no instance for this head dim");
    }
}

// `amp` scales q and k: 1 gives scores of a few units, as in training; a diverging run's q and k
// reach 1e5 and more, scores 1e11, where a softmax exponent formed with one rounding too many
// overflows (ex2 of the rounding error of the scaled maximum).
static void run_case(const char* name, Shape s, const std::vector<int>& seg, std::vector<size_t> limits, std::mt19937& rng,
                     float amp = 1.f) {
    const int HD = s.hd;
    const int n = s.batch * s.seq, qs = s.heads * HD, ks = s.kv * HD, group = s.heads / s.kv;
    const size_t qn = (size_t)n * qs, kn = (size_t)n * ks;
    std::uniform_real_distribution<float> u2(-2.f, 2.f), u1(-1.f, 1.f);
    std::vector<float> q(qn), k(kn), v(kn), dout(qn);
    for (auto& x : q) x = rbf(amp * u2(rng));
    for (auto& x : k) x = rbf(amp * u2(rng));
    for (auto& x : v) x = rbf(u1(rng));
    for (auto& x : dout) x = rbf(u1(rng));
    std::vector<double> rout, rlse;
    ref_fwd(s, q, k, v, seg, rout, rlse);

    std::vector<bf16> gq = to_bf(q), gk = to_bf(k), gv = to_bf(v), gdo = to_bf(dout);
    std::vector<int> gseg = seg;
    const float scale = (float)s.sc();
    std::vector<Fwd> fwds;
    std::vector<Bwd> bwds;
    PrepFn prep = nullptr;
    variants(HD, fwds, bwds, prep);
    char tag[200];
    snprintf(tag, sizeof tag, "%s b=%d s=%d h=%d kv=%d hd=%d win=%d", name, s.batch, s.seq, s.heads, s.kv, HD, s.window);

    for (const Fwd& f : fwds) {
        std::vector<bf16> gout(qn, __float2bfloat16_rn(NAN));
        std::vector<float> glse((size_t)n * s.heads, NAN);
        g_bufs.clear();
        reg(gq.data(), gq.size() * 2); reg(gk.data(), gk.size() * 2); reg(gv.data(), gv.size() * 2); reg(gdo.data(), gdo.size() * 2);
        reg(gseg.data(), gseg.size() * 4); reg(gout.data(), gout.size() * 2); reg(glse.data(), glse.size() * 4);
        launch(U3{(unsigned)s.heads, (unsigned)((s.seq + f.rows - 1) / f.rows), (unsigned)s.batch}, 128, f.smem, [&] {
            f.fn(gq.data(), gk.data(), gv.data(), gseg.data(), gout.data(), glse.data(), s.seq, s.heads, s.kv, scale, s.window);
        });
        check(std::string(f.name) + " out [" + tag + "]", from_bf(gout), rout, 8e-3);
        check(std::string(f.name) + " lse [" + tag + "]", glse, rlse, 1e-5);
        if (&f != &fwds.front()) continue;
        // Each backward differentiates this forward's outputs (as the GPU test does).
        std::vector<double> eo(qn), el(glse.begin(), glse.end()), edq, edk, edv;
        for (size_t i = 0; i < qn; i++) eo[i] = __bfloat162float(gout[i]);
        ref_bwd(s, dout, q, k, v, eo, el, seg, edq, edk, edv);
        for (const Bwd& bw : bwds)
            for (size_t limit : limits) {
                int bc, kvc;
                if (!split_for(s, limit, bc, kvc)) { printf("skip limit %zu: does not fit\n", limit); continue; }
                std::vector<bf16> dq(qn, __float2bfloat16_rn(NAN)), dk(kn, __float2bfloat16_rn(NAN)), dv(kn, __float2bfloat16_rn(NAN));
                std::vector<float> scratch(limit / 4 + 1, NAN);
                reg(dq.data(), dq.size() * 2); reg(dk.data(), dk.size() * 2); reg(dv.data(), dv.size() * 2);
                reg(scratch.data(), scratch.size() * 4);
                const int key_tiles = (s.seq + bw.keys - 1) / bw.keys;
                for (int b0 = 0; b0 < s.batch; b0 += bc) {
                    const int bn = std::min(bc, s.batch - b0);
                    const long long rows = (long long)bn * s.seq;
                    for (int kv0 = 0; kv0 < s.kv; kv0 += kvc) {
                        const int kvn = std::min(kvc, s.kv - kv0);
                        const int nh = kvn * group, h0 = kv0 * group;
                        const size_t dq_len = rows * nh * HD, dk_len = rows * kvn * HD;
                        EMU_CHECK((dq_len + 2 * dk_len + rows * nh) * 4 <= limit, "split exceeds the scratch");
                        float* dq_acc = scratch.data();
                        float* dk_acc = dq_acc + dq_len;
                        float* dv_acc = dk_acc + dk_len;
                        float* dsum = dv_acc + dk_len;
                        std::fill(dq_acc, dq_acc + dq_len + 2 * dk_len, 0.f);
                        const size_t qoff = (size_t)b0 * s.seq * qs + h0 * HD, koff = (size_t)b0 * s.seq * ks + kv0 * HD,
                                     loff = (size_t)b0 * s.seq * s.heads + h0;
                        const int* segp = gseg.data() + (size_t)b0 * s.seq;
                        const long long threads = rows * nh * 4;
                        launch(U3{(unsigned)((threads + 255) / 256), 1, 1}, 256, 0,
                               [&] { prep(gdo.data() + qoff, gout.data() + qoff, dsum, rows, nh, qs); });
                        launch(U3{(unsigned)(nh * bw.splits), (unsigned)key_tiles, (unsigned)bn}, bw.threads, bw.smem, [&] {
                            bw.fn(gq.data() + qoff, gk.data() + koff, gv.data() + koff, gdo.data() + qoff, glse.data() + loff, dsum, segp,
                                  dq_acc, dk_acc, dv_acc, s.seq, qs, ks, s.heads, group, scale, s.window);
                        });
                        struct { float* acc; bf16* dst; int width, stride; } outs[3] = {
                            {dq_acc, dq.data() + qoff, nh * HD, qs}, {dk_acc, dk.data() + koff, kvn * HD, ks}, {dv_acc, dv.data() + koff, kvn * HD, ks}};
                        for (auto& o : outs) {
                            const long long th = rows * o.width / 8;
                            launch(U3{(unsigned)((th + 255) / 256), 1, 1}, 256, 0, [&] { attn_acc_to_bf16(o.acc, o.dst, rows, o.width, o.stride); });
                        }
                    }
                }
                char t2[300];
                snprintf(t2, sizeof t2, "%s [%s split (%d seq, %d kv)]", bw.name, tag, bc, kvc);
                if (amp == 1.f) {
                    check(std::string(t2) + " dq", from_bf(dq), edq, 2e-2);
                    check(std::string(t2) + " dk", from_bf(dk), edk, 2e-2);
                    check(std::string(t2) + " dv", from_bf(dv), edv, 1e-2);
                } else {
                    check_finite(std::string(t2) + " dq", from_bf(dq));
                    check_finite(std::string(t2) + " dk", from_bf(dk));
                    check_finite(std::string(t2) + " dv", from_bf(dv));
                }
                for (int i = 0; i < 4; i++) g_bufs.pop_back();
            }
    }
    fflush(stdout);
}

static size_t unit_bytes(Shape s) { const size_t g = s.heads / s.kv; return (size_t)s.seq * (g * s.hd + 2 * s.hd + g) * 4; }

// Lsm::at against swz for every lane and fragment origin the kernels use.
template <int W>
static void check_lsm() {
    for (int lane = 0; lane < 32; lane++) {
        struct P { Lsm<W> l; int row, col; } pats[3] = {
            {lsm_a<W>(lane), lane & 15, (lane >> 4) * 8},
            {lsm_b<W>(lane), (lane & 7) + (lane >> 4) * 8, ((lane >> 3) & 1) * 8},
            {lsm_bt<W>(lane), (lane & 7) + ((lane >> 3) & 1) * 8, (lane >> 4) * 8}};
        for (auto& p : pats)
            for (int r0 = 0; r0 < 128; r0 += 16)
                for (int c0 = 0; c0 < W; c0 += 16) {
                    const uint32_t got = p.l.at(0, r0, c0), want = 2 * swz<W>(r0 + p.row, c0 + p.col);
                    if (got != want) { printf("FAIL Lsm<%d> lane %d r0 %d c0 %d: %u != %u\n", W, lane, r0, c0, got, want); failures++; return; }
                }
        if (W == 64)
            for (int cb = 0; cb < 64; cb += 16) {
                Lsm<W> l = lsm_b<W>(lane, cb);
                for (int r0 = 0; r0 < 64; r0 += 16) {
                    const uint32_t got = l.at(0, r0, 0), want = 2 * swz<W>(r0 + (lane & 7) + (lane >> 4) * 8, cb + ((lane >> 3) & 1) * 8);
                    if (got != want) { printf("FAIL Lsm<64> cb %d lane %d r0 %d: %u != %u\n", cb, lane, r0, got, want); failures++; return; }
                }
            }
    }
    printf("ok   Lsm<%d> addresses match swz\n", W);
}

static std::vector<int> segments(int seq, std::initializer_list<int> ends) {
    std::vector<int> seg;
    for (int t = 0; t < seq; t++) {
        int id = 0;
        for (int e : ends) id += t >= e;
        seg.push_back(id);
    }
    return seg;
}
static std::vector<int> concat(std::vector<std::vector<int>> rows) {
    std::vector<int> out;
    for (auto& r : rows) out.insert(out.end(), r.begin(), r.end());
    return out;
}

int main(int argc, char** argv) {
    const std::string mode = argc > 1 ? argv[1] : "late";
    g_cp_early = mode.find("early") != std::string::npos;
    g_random_schedule = mode.find("rand") != std::string::npos;
    if (argc > 3) g_sched_rng.seed(atoi(argv[3]));
    const std::string only = argc > 2 && std::string(argv[2]) != "all" ? argv[2] : "";
    printf("cp.async %s, schedule %s\n", g_cp_early ? "lands at issue" : "lands at wait", g_random_schedule ? "random" : "round-robin");
    check_lsm<64>();
    check_lsm<128>();
    check_lsm<256>();
    std::mt19937 rng(7);
    auto want = [&](const char* n) { return only.empty() || only == n; };
    if (want("a")) {  // GQA 4, two packed rows, seq not a tile multiple
        Shape s{2, 100, 8, 2, 64};
        run_case("a", s, concat({segments(100, {40}), segments(100, {77})}), {64u << 20, unit_bytes(s), 3 * unit_bytes(s)}, rng);
    }
    if (want("b")) {  // MHA, hd 128, three key tiles, one segment: the unmasked paths
        Shape s{1, 130, 2, 2, 128};
        run_case("b", s, std::vector<int>(130, 0), {64u << 20, unit_bytes(s)}, rng);
    }
    if (want("c")) {  // hd 128, GQA 2, packed on tile multiples + a single-segment row, 3 seqs
        Shape s{3, 300, 4, 2, 128};
        run_case("c", s, concat({segments(300, {128, 192}), std::vector<int>(300, 3), segments(300, {70, 260})}), {64u << 20, 2 * unit_bytes(s)}, rng);
    }
    if (want("d")) {  // tiny: one partial tile
        Shape s{2, 17, 2, 1, 64};
        run_case("d", s, std::vector<int>(34, 1), {64u << 20}, rng);
    }
    if (want("e")) {  // interleaved segments: no tile is uniform
        Shape s{1, 150, 2, 1, 64};
        std::vector<int> seg;
        for (int t = 0; t < 150; t++) seg.push_back((t / 3) % 2);
        run_case("e", s, seg, {64u << 20}, rng);
    }
    if (want("f")) {  // hd 64, one segment, 2 query tiles of 128: full forward tiles for warps 2-3
        Shape s{1, 256, 1, 1, 64};
        run_case("f", s, std::vector<int>(256, 0), {64u << 20}, rng);
    }
    if (want("g")) {  // one row
        Shape s{1, 1, 4, 2, 128};
        run_case("g", s, std::vector<int>(1, 0), {64u << 20, unit_bytes(s)}, rng);
    }
    if (want("i")) {  // hd 32 (the demo model's), GQA 2, packed
        Shape s{2, 200, 4, 2, 32};
        run_case("i", s, concat({segments(200, {33, 150}), std::vector<int>(200, 0)}), {64u << 20, unit_bytes(s)}, rng);
    }
    if (want("j")) {  // hd 96: tiles wider than the head (W = 128), GQA 3, packed
        Shape s{1, 150, 3, 1, 96};
        run_case("j", s, segments(150, {64, 100}), {64u << 20}, rng);
    }
    if (want("k")) {  // hd 256 (Gemma 3): column slices of the backward, one segment and packed
        Shape s{2, 140, 2, 1, 256};
        run_case("k", s, concat({std::vector<int>(140, 0), segments(140, {50})}), {64u << 20, unit_bytes(s)}, rng);
    }
    if (want("l")) {  // sliding window crossing tiles, packed, with Gemma 3's scale (query_pre_attn_scalar 256)
        Shape s{1, 300, 4, 2, 128, 70, 1.0 / 16.0};
        run_case("l", s, segments(300, {200}), {64u << 20}, rng);
    }
    if (want("m")) {  // window on a tile boundary, one segment: whole tiles skipped and unmasked
        Shape s{1, 320, 2, 1, 64, 64};
        run_case("m", s, std::vector<int>(320, 0), {64u << 20}, rng);
    }
    if (want("n")) {  // hd 256 with a window shorter than a tile
        Shape s{1, 200, 2, 2, 256, 40, 1.0 / 16.0};
        run_case("n", s, std::vector<int>(200, 0), {64u << 20}, rng);
    }
    if (want("o")) {  // scores of 1e11 (a diverging run): the softmax stays finite and right
        Shape s{1, 200, 4, 2, 128};
        run_case("o", s, segments(200, {150}), {64u << 20}, rng, 1e5f);
    }
    if (want("p")) {  // the same at hd 64 and 256, GQA, packed
        Shape s{2, 140, 4, 2, 64};
        run_case("p", s, concat({segments(140, {60}), std::vector<int>(140, 0)}), {64u << 20}, rng, 1e5f);
        Shape t{1, 140, 2, 1, 256};
        run_case("p", t, std::vector<int>(140, 0), {64u << 20}, rng, 1e5f);
    }
    if (want("h")) {  // packed head_dim-128 case: boundaries on and off the tiles, a padding tail (slow)
        Shape s{2, 1000, 2, 1, 128};
        run_case("h", s, concat({segments(1000, {300, 640}), segments(1000, {128, 192, 900})}), {64u << 20, unit_bytes(s)}, rng);
    }
    printf("%s: %d failure(s)\n", failures ? "FAILED" : "PASSED", failures);
    return failures ? 1 : 0;
}
