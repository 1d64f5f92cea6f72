// Fused selective-scan kernels for the CPU (lambdaskip.scan.fused).
//
// Why a compiled kernel: the scan's state has n (= 16) entries per input element, and every state
// entry needs its own decay exp(Δ_t A_s). Eager PyTorch writes every decay, every input term and
// every state to memory and reads them back (several passes over an array n times larger than
// the input), which is 50-100x slower than reading the inputs once. Here each (batch, channel)
// lane walks through time once, forms exp(Δ_t A_s) and Δ_t x_t B_t[s] in registers, and keeps the
// n-vector state in registers: inputs are read once and outputs written once.
//
// Built by lambdaskip/scan/fused.py with the system C++ compiler (-O3 -march=native -fopenmp) at
// first use and called through ctypes with raw pointers; the Python side validates shapes, makes
// every tensor contiguous and passes the number of threads.
//
// Layouts (all contiguous, row-major):
//   Mamba-1 / S6 forward: x, dt, y: (b, c, L);  A: (c, n);  B, C: (b, n, L);  D: (c);  h0, hlast: (b, c, n).
//   Mamba-1 / S6 backward: as the forward, but Bt, Ct: (b, L, n) -- B and C transposed so that one
//                 time step's n numbers are adjacent; dx, ddt: (b, c, L). float: the forward's tile
//                 states ckpt (b, nb, ceil(L / kTile), n, W), nb = ceil(c / W); partial sums dBg, dCg
//                 (b, groups, L, n), dAb (b, c, n), dDb (b, c). double: per-thread sums dBt, dCt
//                 (threads, b, L, n), dA (threads, c, n).
//   Mamba-2 / SSD forward: x, y: (bh, L, p);  ld: (bh, L);  B, C: (bh, L, n);  h0, hlast: (bh, n, p);
//                 ckpt (bh, ceil(L / kTile), n, p) or null. Backward: the same shapes for the gradients.
//
// Floating point: float inputs use float arithmetic with the exponential below (relative error
// about 1.0e-7 in float evaluation); double inputs use std::exp. The float forward adds D x first and
// then the state terms in order s = 0, 1, ...; the float backward sums over channels in a fixed
// order (16 lanes of a block, then blocks in order), the double backward's sums are vectorised
// (#pragma omp simd reduction). Either way the order differs from the reference loop's: identical up
// to rounding.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int kMaxN = 256;   // largest state size n for the runtime-n variant
constexpr int64_t kChunk = 64;  // double backward: states are recomputed from a checkpoint every kChunk steps

// 2^f on [-0.5, 0.5] by a degree-6 polynomial: coefficients fitted for this project (relative
// error minimised by reweighted least squares on 20,001 points; max relative error 1.55e-8 in exact
// arithmetic, about 1.0e-7 when evaluated in float, i.e. at the level of float rounding).
constexpr float kP0 = 1.0f, kP1 = 0.6931471824645996f, kP2 = 0.24022646248340607f, kP3 = 0.05550328642129898f,
                kP4 = 0.009618489071726799f, kP5 = 0.0013399929739534855f, kP6 = 0.0001534579205326736f;

// A vector of W floats (GCC/Clang vector extensions: compiled to AVX-512, AVX2, NEON or plain scalar
// code, whatever the target has) and the matching vector of int32.
constexpr int W = 16;
typedef float VF __attribute__((vector_size(W * sizeof(float))));
typedef int32_t VI __attribute__((vector_size(W * sizeof(int32_t))));

// 2^w for w <= 0, W lanes at once: w = k + f with k an integer and |f| <= 1/2, 2^f by the polynomial,
// 2^k written directly into the exponent bits. Inputs below -126 are clamped to -126 (result
// about 1.2e-38, near the smallest normal float, instead of something smaller): an absolute error
// below 1.2e-38, and 2^k stays a valid exponent field (k >= -126). No branches, no library calls.
// Why k is the *nearest* integer and not floor(w) (which AVX-512DQ's VREDUCEPS + VSCALEFPS would
// give in two instructions instead of four): for a decay near 1 (w slightly below 0) the scan needs
// 1 - 2^w accurate relative to |w|. With k = 0 the polynomial is evaluated at f = w, where
// p(f) = 1 + ln2 f + ... keeps that accuracy; with k = -1 it would be evaluated at f = 1 + w, which
// rounds w away (tried: the float32 L = 16384 near-1 test then fails, 3.7e-4 > 1e-4).
#if defined(__AVX512F__)
inline VF exp2_nonpos_v(VF w) {  // the same with AVX-512's rounding and scaling instructions
    const __m512 v = _mm512_max_ps((__m512)w, _mm512_set1_ps(-126.0f));
    const __m512 k = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(v, k);
    __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(kP6), f, _mm512_set1_ps(kP5));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kP4));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kP3));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kP2));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kP1));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kP0));
    return (VF)_mm512_scalef_ps(p, k);  // p * 2^k
}
#else
inline VF exp2_nonpos_v(VF w) {
    w = w < -126.0f ? VF{} - 126.0f : w;
    const VI k = __builtin_convertvector(w - 0.5f, VI);  // truncation of a number <= 0.5: nearest integer
    const VF f = w - __builtin_convertvector(k, VF);
    const VF p = kP0 + f * (kP1 + f * (kP2 + f * (kP3 + f * (kP4 + f * (kP5 + f * kP6)))));
    const VI bits = (k + 127) << 23;
    return p * (VF)bits;  // a cast between vector types of equal size reinterprets the bits
}
#endif

// exp(v) for v <= 0 (every exponent in the scan is <= 0: Δ >= 0 and A <= 0), scalar float
// version (the backward pass uses it): the same method as exp2_nonpos_v above.
inline float exp_nonpos(float v) {
    float w = v * 1.44269504088896341f;  // log2(e)
    w = w < -126.0f ? -126.0f : w;
    const int32_t k = static_cast<int32_t>(w - 0.5f);  // nearest integer (w <= 0, so truncation rounds up)
    const float f = w - static_cast<float>(k);         // in [-0.5, 0.5]
    const float p = kP0 + f * (kP1 + f * (kP2 + f * (kP3 + f * (kP4 + f * (kP5 + f * kP6)))));
    const int32_t bits = (k + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

inline double exp_nonpos(double v) { return std::exp(v); }

// ---------------------------------------------------------------- Mamba-1 / S6, forward
// float: vectorised over W channels of one batch element (a "block"), so the n-vector state is
// n vectors h[s] and y_t = sum_s C_t[s] h[s] needs no horizontal sum. x and dt are read in tiles
// of kTile steps and transposed into small buffers that stay in the L1 cache (a strided read per
// step would be slow, and a transposed copy of the whole input costs as much as the scan).
constexpr int64_t kTile = 64;

// Tile transposes between the (channel, time) layout of x, dt, y and the time-major buffers of
// W-channel vectors. tile_in: buf[t][j] = rows[j][t] for t < tt, j < cw (rows j >= cw read as 0).
// tile_out: rows[j][t] = buf[t][j] for j < cw. With AVX-512, full 16 x 16 blocks are transposed in
// registers (64 shuffles instead of 512 scalar moves); the rest goes element by element.
#if defined(__AVX512F__)
inline void transpose16(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 8; ++i) {  // pairs of rows, interleaved within 128-bit lanes
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int g = 0; g < 4; ++g) {  // r[4g + m], 128-bit lane l: column 4l + m of rows 4g .. 4g + 3
        r[4 * g] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], 0x44);
        r[4 * g + 1] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], 0xEE);
        r[4 * g + 2] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0x44);
        r[4 * g + 3] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0xEE);
    }
    for (int m = 0; m < 4; ++m) {  // gather the 128-bit lanes: output row 4l + m
        const __m512 w0 = _mm512_shuffle_f32x4(r[m], r[4 + m], 0x88);
        const __m512 w1 = _mm512_shuffle_f32x4(r[m], r[4 + m], 0xDD);
        const __m512 w2 = _mm512_shuffle_f32x4(r[8 + m], r[12 + m], 0x88);
        const __m512 w3 = _mm512_shuffle_f32x4(r[8 + m], r[12 + m], 0xDD);
        t[m] = _mm512_shuffle_f32x4(w0, w2, 0x88);
        t[4 + m] = _mm512_shuffle_f32x4(w1, w3, 0x88);
        t[8 + m] = _mm512_shuffle_f32x4(w0, w2, 0xDD);
        t[12 + m] = _mm512_shuffle_f32x4(w1, w3, 0xDD);
    }
    for (int i = 0; i < 16; ++i) r[i] = t[i];
}
#endif

inline void tile_in(const float* __restrict src, int64_t stride, int cw, int64_t tt, VF* __restrict buf) {
    int64_t t = 0;
#if defined(__AVX512F__)
    for (; t + 16 <= tt; t += 16) {
        __m512 r[16];
        for (int j = 0; j < 16; ++j) r[j] = j < cw ? _mm512_loadu_ps(src + j * stride + t) : _mm512_setzero_ps();
        transpose16(r);
        for (int i = 0; i < 16; ++i) buf[t + i] = (VF)r[i];
    }
#endif
    for (; t < tt; ++t)
        for (int j = 0; j < W; ++j) buf[t][j] = j < cw ? src[j * stride + t] : 0.0f;
}

inline void tile_out(const VF* __restrict buf, int cw, int64_t tt, float* __restrict dst, int64_t stride) {
    int64_t t = 0;
#if defined(__AVX512F__)
    for (; t + 16 <= tt; t += 16) {
        __m512 r[16];
        for (int i = 0; i < 16; ++i) r[i] = (__m512)buf[t + i];
        transpose16(r);
        for (int j = 0; j < cw; ++j) _mm512_storeu_ps(dst + j * stride + t, r[j]);
    }
#endif
    for (; t < tt; ++t)
        for (int j = 0; j < cw; ++j) dst[j * stride + t] = buf[t][j];
}

template <int NF>
void s6_forward_block_f32(const float* __restrict x, const float* __restrict dt, const float* __restrict A,
                          const float* __restrict B, const float* __restrict C, const float* __restrict D,
                          const float* __restrict h0, float* __restrict y, float* __restrict hlast,
                          VF* __restrict ckpt, int64_t c, int64_t L, int n_runtime, int64_t bi, int64_t c0) {
    const int n = NF > 0 ? NF : n_runtime;
    const int cw = c - c0 < W ? static_cast<int>(c - c0) : W;  // channels in this block (the rest: padding)
    VF a[NF > 0 ? NF : kMaxN], h[NF > 0 ? NF : kMaxN];
    VF Dv = {};
    for (int j = 0; j < cw; ++j) Dv[j] = D ? D[c0 + j] : 0.0f;
    for (int s = 0; s < n; ++s) {
        for (int j = 0; j < W; ++j) {  // padding lanes j >= cw: a = 0, h = 0, and dt = x = 0 below
            a[s][j] = j < cw ? A[(c0 + j) * n + s] * 1.44269504088896341f : 0.0f;  // in log2 units
            h[s][j] = (h0 && j < cw) ? h0[(bi * c + c0 + j) * n + s] : 0.0f;
        }
    }
    alignas(64) VF dl[kTile], xl[kTile], yl[kTile];
    const float* __restrict Bb = B + bi * n * L;
    const float* __restrict Cb = C + bi * n * L;
    const int64_t row0 = (bi * c + c0) * L;  // first lane's time series in x, dt and y
    for (int64_t t0 = 0; t0 < L; t0 += kTile) {
        const int64_t tt = L - t0 < kTile ? L - t0 : kTile;
        if (ckpt)  // for the backward pass: the state entering every tile
            for (int s = 0; s < n; ++s) ckpt[(t0 / kTile) * n + s] = h[s];
        tile_in(dt + row0 + t0, L, cw, tt, dl);
        tile_in(x + row0 + t0, L, cw, tt, xl);
        for (int64_t t = 0; t < tt; ++t) {
            const VF d = dl[t], u = d * xl[t];
            const float* __restrict bt = Bb + t0 + t;  // B[s] at this step is bt[s * L]
            const float* __restrict ct = Cb + t0 + t;
            VF acc = Dv * xl[t];  // the skip term D x
            for (int s = 0; s < n; ++s) {
                h[s] = exp2_nonpos_v(d * a[s]) * h[s] + u * bt[s * L];
                acc += ct[s * L] * h[s];
            }
            yl[t] = acc;
        }
        tile_out(yl, cw, tt, y + row0 + t0, L);
    }
    for (int j = 0; j < cw; ++j)
        for (int s = 0; s < n; ++s) hlast[(bi * c + c0 + j) * n + s] = h[s][j];
}

// ---------------------------------------------------------------- Mamba-1 / S6, backward (float)
// Vectorised over W channels of one batch element, like the forward. Reverse-time recurrence for
// g_t = dLoss/dh_t:  g_t = exp(dt_{t+1} A) g_{t+1} + gy_t C_t (+ the final state's gradient at t = L-1).
// The states h_{t-1} the gradients need are recomputed tile by tile (kTile steps) from the states
// entering each tile, which the forward pass saved (ckpt) -- never by dividing by a decay, which
// could be 0.
//
// dB_t[s] and dC_t[s] are sums over all channels. A lane is one batch element and a group of
// consecutive channel blocks; it walks the tiles from last to first and, within a tile, runs its blocks
// one after the other, adding their channel sums into a small tile buffer that is written out once.
// The output is one (L, n) row per group, (b, groups, L, n); the caller picks groups = 1 unless there
// are fewer batch elements than threads. No atomics: for a given number of groups the result is the
// same bit for bit on any number of threads.

// out[s] += sum_j v[s][j] for s < n (a horizontal sum of each of n vectors). With AVX-512, 16 vectors
// at a time are transposed in registers and added up, giving 16 sums in one vector.
inline void add_lane_sums(const VF* __restrict v, int n, float* __restrict out) {
    int s = 0;
#if defined(__AVX512F__)
    for (; s + 16 <= n; s += 16) {
        __m512 r[16];
        for (int i = 0; i < 16; ++i) r[i] = (__m512)v[s + i];
        transpose16(r);  // r[j] lane i = v[s + i][j]
        __m512 acc = _mm512_loadu_ps(out + s);
        for (int j = 0; j < 16; ++j) acc = _mm512_add_ps(acc, r[j]);
        _mm512_storeu_ps(out + s, acc);
    }
#endif
    for (; s < n; ++s) {
        float acc = 0.0f;
        for (int j = 0; j < W; ++j) acc += v[s][j];
        out[s] += acc;
    }
}

// What one block of W channels carries from tile to tile in the backward pass.
struct S6BlockGrad {
    VF* a;     // (n) A in log2 units (padding lanes 0)
    VF* g;     // (n) dLoss/dh entering the current tile from the right
    VF* dA;    // (n) running sum of dLoss/dA
    VF D, dD;  // skip weight, running sum of dLoss/dD
    const VF* ck;  // (K, n) states entering each tile
    int64_t row0;  // first channel's offset in x, dt, gy, dx, ddt
    int cw;        // real channels in the block
};

// One tile [t0, t0 + tt) of one block: recompute its states, then run the adjoint backwards through
// it, writing dx and ddt and adding the block's channel sums of dB, dC into tB, tC (tt, n).
template <int NF>
void s6_backward_tile_f32(const float* __restrict x, const float* __restrict dt, const float* __restrict gy,
                          const float* __restrict Bb, const float* __restrict Cb, S6BlockGrad& st,
                          float* __restrict dx, float* __restrict ddt, int64_t L, int64_t k, int64_t t0,
                          int64_t tt, int n_runtime, VF* __restrict hbuf, float* __restrict tB,
                          float* __restrict tC) {
    const int n = NF > 0 ? NF : n_runtime;
    VF vB[NF > 0 ? NF : kMaxN], vC[NF > 0 ? NF : kMaxN];
    alignas(64) VF dl[kTile], xl[kTile], gl[kTile], dxl[kTile], ddl[kTile];
    const VF* __restrict a = st.a;
    VF* __restrict g = st.g;
    VF* __restrict dAv = st.dA;
    tile_in(dt + st.row0 + t0, L, st.cw, tt, dl);
    tile_in(x + st.row0 + t0, L, st.cw, tt, xl);
    if (gy) tile_in(gy + st.row0 + t0, L, st.cw, tt, gl);
    else for (int64_t t = 0; t < tt; ++t) gl[t] = VF{};
    const VF* __restrict entering = st.ck + k * n;
    const VF* __restrict prev = entering;
    for (int64_t t = 0; t < tt; ++t) {  // recompute the tile's states, and keep the decays too
        const VF d = dl[t], u = d * xl[t];
        const float* __restrict bt = Bb + (t0 + t) * n;
        VF* __restrict cur = hbuf + t * n;
        VF* __restrict dec = hbuf + (kTile + t) * n;
        for (int s = 0; s < n; ++s) {
            dec[s] = exp2_nonpos_v(d * a[s]);
            cur[s] = dec[s] * prev[s] + u * bt[s];
        }
        prev = cur;
    }
    VF dDv = st.dD;
    for (int64_t t = tt - 1; t >= 0; --t) {
        const VF d = dl[t], xv = xl[t], u = d * xv, gyt = gl[t];
        const float* __restrict bt = Bb + (t0 + t) * n;
        const float* __restrict ct = Cb + (t0 + t) * n;
        const VF* __restrict hcur = hbuf + t * n;
        const VF* __restrict hprev = t > 0 ? hcur - n : entering;
        const VF* __restrict dec = hbuf + (kTile + t) * n;
        VF du = {}, sdd = {};
        for (int s = 0; s < n; ++s) {
            const VF gs = g[s] + gyt * ct[s];  // dLoss/dh_t[s]
            const VF as = dec[s];
            const VF dd = gs * hprev[s] * as;  // dLoss/d(Δ_t A_s): the decay's exponent enters only here
            vC[s] = gyt * hcur[s];
            vB[s] = u * gs;
            du += bt[s] * gs;
            sdd += dd * a[s];
            dAv[s] += dd * d;
            g[s] = as * gs;  // carried to step t - 1
        }
        add_lane_sums(vB, n, tB + t * n);
        add_lane_sums(vC, n, tC + t * n);
        dxl[t] = d * du + st.D * gyt;
        ddl[t] = xv * du + sdd * 0.69314718055994531f;  // a is in log2 units: back to natural ones
        dDv += gyt * xv;
    }
    st.dD = dDv;
    tile_out(dxl, st.cw, tt, dx + st.row0 + t0, L);
    tile_out(ddl, st.cw, tt, ddt + st.row0 + t0, L);
}

// One lane: batch element bi, channel blocks [blk0, blk0 + nblk). scratch: (3 nblk + 2 kTile) n vectors;
// tB, tC: (kTile n) floats.
template <int NF>
void s6_backward_lane_f32(const float* __restrict x, const float* __restrict dt, const float* __restrict A,
                          const float* __restrict Bt, const float* __restrict Ct,
                          const float* __restrict D, const float* __restrict gy, const float* __restrict ghlast,
                          const VF* __restrict ckpt_in, float* __restrict dx, float* __restrict ddt,
                          float* __restrict dh0, float* __restrict dAb, float* __restrict dBrow,
                          float* __restrict dCrow, float* __restrict dDb, int64_t c, int64_t L, int n_runtime,
                          int64_t bi, int64_t blk0, int64_t nblk, VF* __restrict scratch, float* __restrict tB,
                          float* __restrict tC) {
    const int n = NF > 0 ? NF : n_runtime;
    const int64_t nb = (c + W - 1) / W, K = (L + kTile - 1) / kTile;
    const float* __restrict Bb = Bt + bi * L * n;  // (L, n): step t's n numbers at Bb + t n
    const float* __restrict Cb = Ct + bi * L * n;
    VF* hbuf = scratch + 3 * nblk * n;
    std::vector<S6BlockGrad> blocks(static_cast<size_t>(nblk));
    for (int64_t j = 0; j < nblk; ++j) {
        S6BlockGrad& st = blocks[j];
        const int64_t c0 = (blk0 + j) * W;
        st.cw = c - c0 < W ? static_cast<int>(c - c0) : W;
        st.row0 = (bi * c + c0) * L;
        st.a = scratch + (3 * j) * n;
        st.g = scratch + (3 * j + 1) * n;
        st.dA = scratch + (3 * j + 2) * n;
        st.D = VF{};
        st.dD = VF{};
        for (int l = 0; l < st.cw; ++l) st.D[l] = D ? D[c0 + l] : 0.0f;
        for (int s = 0; s < n; ++s) {
            for (int l = 0; l < W; ++l) {  // padding lanes l >= cw: a = 0, g = 0, and dt = x = gy = 0
                st.a[s][l] = l < st.cw ? A[(c0 + l) * n + s] * 1.44269504088896341f : 0.0f;
                st.g[s][l] = (ghlast && l < st.cw) ? ghlast[(bi * c + c0 + l) * n + s] : 0.0f;
            }
            st.dA[s] = VF{};
        }
        st.ck = ckpt_in + (bi * nb + blk0 + j) * K * n;
    }
    for (int64_t k = K - 1; k >= 0; --k) {
        const int64_t t0 = k * kTile, tt = L - t0 < kTile ? L - t0 : kTile;
        std::memset(tB, 0, sizeof(float) * tt * n);
        std::memset(tC, 0, sizeof(float) * tt * n);
        for (int64_t j = 0; j < nblk; ++j)
            s6_backward_tile_f32<NF>(x, dt, gy, Bb, Cb, blocks[j], dx, ddt, L, k, t0, tt, n, hbuf, tB, tC);
        std::memcpy(dBrow + t0 * n, tB, sizeof(float) * tt * n);
        std::memcpy(dCrow + t0 * n, tC, sizeof(float) * tt * n);
    }
    for (int64_t j = 0; j < nblk; ++j) {
        const S6BlockGrad& st = blocks[j];
        const int64_t c0 = (blk0 + j) * W;
        for (int l = 0; l < st.cw; ++l) {
            for (int s = 0; s < n; ++s) {
                dh0[(bi * c + c0 + l) * n + s] = st.g[s][l];
                dAb[(bi * c + c0 + l) * n + s] = st.dA[s][l];
            }
            if (dDb) dDb[bi * c + c0 + l] = st.dD[l];
        }
    }
}

// double: one lane (batch b, channel c) at a time, exp from the C library (this path is for
// exactness checks, not speed): h[s] = exp(dt_t A[s]) h[s] + dt_t x_t B_t[s]; y_t = sum_s C_t[s] h[s].
void s6_forward_lane_f64(const double* __restrict x, const double* __restrict dt, const double* __restrict A,
                         const double* __restrict B, const double* __restrict C, double Dc,
                         const double* __restrict h0, double* __restrict y, double* __restrict hlast, int64_t L,
                         int n) {
    double h[kMaxN];
    for (int s = 0; s < n; ++s) h[s] = h0 ? h0[s] : 0.0;
    for (int64_t t = 0; t < L; ++t) {
        const double d = dt[t];
        const double u = d * x[t];
        double acc = 0.0;
        for (int s = 0; s < n; ++s) {
            h[s] = std::exp(d * A[s]) * h[s] + u * B[s * L + t];
            acc += C[s * L + t] * h[s];
        }
        y[t] = acc + Dc * x[t];
    }
    for (int s = 0; s < n; ++s) hlast[s] = h[s];
}

// ---------------------------------------------------------------- Mamba-1 / S6, backward (double)
// Reverse-time recurrence for g_t = dLoss/dh_t:  g_t = exp(dt_{t+1} A) g_{t+1} + gy_t C_t (+ the
// final state's gradient at t = L-1). The states h_{t-1} the gradients need are recomputed
// chunk by chunk from checkpoints saved every kChunk steps (never by dividing by a decay, which
// could be 0). Per lane it writes dx, ddt and dh0; dA, dB and dC are sums over lanes, so they are
// accumulated into buffers owned by the calling thread (dA: (c, n), dBt/dCt: (b, L, n)).
template <typename T, int NF>
void s6_backward_lane(const T* __restrict x, const T* __restrict dt, const T* __restrict A,
                      const T* __restrict Bt, const T* __restrict Ct, const T* __restrict h0,
                      const T* __restrict gy, const T* __restrict ghlast,
                      T* __restrict dx, T* __restrict ddt, T* __restrict dh0, T* __restrict dA,
                      T* __restrict dBt, T* __restrict dCt, int64_t L, int n_runtime,
                      T* __restrict ckpt, T* __restrict hbuf) {
    const int n = NF > 0 ? NF : n_runtime;
    T h[NF > 0 ? NF : kMaxN];
    T a[NF > 0 ? NF : kMaxN];
    T g[NF > 0 ? NF : kMaxN];
    T dA_lane[NF > 0 ? NF : kMaxN];
    for (int s = 0; s < n; ++s) {
        h[s] = h0 ? h0[s] : T(0);
        a[s] = A[s];
        g[s] = ghlast ? ghlast[s] : T(0);
        dA_lane[s] = 0;
    }
    const int64_t K = (L + kChunk - 1) / kChunk;
    for (int64_t k = 0; k < K; ++k) {  // forward: keep the state entering every chunk
        std::memcpy(ckpt + k * n, h, sizeof(T) * n);
        const int64_t stop = (k + 1) * kChunk < L ? (k + 1) * kChunk : L;
        for (int64_t t = k * kChunk; t < stop; ++t) {
            const T d = dt[t];
            const T u = d * x[t];
            const T* __restrict b = Bt + t * n;
#pragma omp simd
            for (int s = 0; s < n; ++s) h[s] = exp_nonpos(d * a[s]) * h[s] + u * b[s];
        }
    }
    for (int64_t k = K - 1; k >= 0; --k) {
        const int64_t start = k * kChunk;
        const int64_t stop = start + kChunk < L ? start + kChunk : L;
        const T* prev = ckpt + k * n;
        for (int64_t t = start; t < stop; ++t) {  // recompute this chunk's states
            const T d = dt[t];
            const T u = d * x[t];
            const T* __restrict b = Bt + t * n;
            T* __restrict cur = hbuf + (t - start) * n;
#pragma omp simd
            for (int s = 0; s < n; ++s) cur[s] = exp_nonpos(d * a[s]) * prev[s] + u * b[s];
            prev = cur;
        }
        for (int64_t t = stop - 1; t >= start; --t) {
            const T d = dt[t];
            const T xv = x[t];
            const T u = d * xv;
            const T gyt = gy ? gy[t] : T(0);
            const T* __restrict b = Bt + t * n;
            const T* __restrict c = Ct + t * n;
            const T* __restrict hcur = hbuf + (t - start) * n;
            const T* __restrict hprev = t > start ? hcur - n : ckpt + k * n;
            T* __restrict db = dBt + t * n;
            T* __restrict dc = dCt + t * n;
            T du = 0, sdd = 0;
#pragma omp simd reduction(+ : du, sdd)
            for (int s = 0; s < n; ++s) {
                const T gs = g[s] + gyt * c[s];  // dLoss/dh_t[s]
                const T as = exp_nonpos(d * a[s]);
                const T dd = gs * hprev[s] * as;  // dLoss/d(Δ_t A_s): the decay's log enters only here
                dc[s] += gyt * hcur[s];
                db[s] += u * gs;
                du += b[s] * gs;
                sdd += dd * a[s];
                dA_lane[s] += dd * d;
                g[s] = as * gs;  // carried to step t - 1
            }
            dx[t] = d * du;
            ddt[t] = xv * du + sdd;
        }
    }
    for (int s = 0; s < n; ++s) {
        dh0[s] = g[s];
        dA[s] += dA_lane[s];
    }
}

// ---------------------------------------------------------------- Mamba-2 / SSD, forward
// One lane (batch b, head h): S[s][q] = a_t S[s][q] + B_t[s] x_t[q];  y_t[q] = sum_s C_t[s] S[s][q].
// Vectorised over the head dimension q (contiguous); the n x p state stays in cache. ckpt: null, or
// room for the state entering every tile of kTile steps, (ceil(L / kTile), n, p), for the backward.
template <typename T>
void ssd_forward_lane(const T* __restrict x, const T* __restrict ld, const T* __restrict B,
                      const T* __restrict C, const T* __restrict h0, T* __restrict y, T* __restrict hlast,
                      T* __restrict ckpt, int64_t L, int n, int p, T* __restrict S) {
    const int64_t np = int64_t(n) * p;
    for (int64_t j = 0; j < np; ++j) S[j] = h0 ? h0[j] : T(0);
    for (int64_t t = 0; t < L; ++t) {
        if (ckpt && t % kTile == 0) std::memcpy(ckpt + (t / kTile) * np, S, sizeof(T) * np);
        const T at = exp_nonpos(ld[t]);
        const T* __restrict xt = x + t * p;
        T* __restrict yt = y + t * p;
        for (int q = 0; q < p; ++q) yt[q] = 0;
        for (int s = 0; s < n; ++s) {
            const T bs = B[t * n + s], cs = C[t * n + s];
            T* __restrict Ss = S + int64_t(s) * p;
#pragma omp simd
            for (int q = 0; q < p; ++q) {
                const T v = at * Ss[q] + bs * xt[q];
                Ss[q] = v;
                yt[q] += cs * v;
            }
        }
    }
    for (int64_t j = 0; j < np; ++j) hlast[j] = S[j];
}

// ---------------------------------------------------------------- Mamba-2 / SSD, backward
// One lane (batch b, head h), reverse time. G_t = dLoss/dS_t = a_{t+1} G_{t+1} + C_t gy_tᵀ (+ the final
// state's gradient at t = L-1), and
//   dx_t = G_tᵀ B_t,   dB_t = G_t x_t,   dC_t = S_t gy_t,   d log a_t = a_t <G_t, S_{t-1}>,   dS_{-1} = a_0 G_0.
// States are recomputed tile by tile (kTile steps, into Sbuf: (kTile, n, p)) from the states entering
// each tile that the forward saved (ckpt), never by dividing by a decay. Every output belongs to
// this lane alone (B and C are per head), so lanes need no reduction across threads.
template <typename T>
void ssd_backward_lane(const T* __restrict x, const T* __restrict ld, const T* __restrict B,
                       const T* __restrict C, const T* __restrict ckpt, const T* __restrict gy,
                       const T* __restrict ghlast, T* __restrict dx, T* __restrict dld, T* __restrict dB,
                       T* __restrict dC, T* __restrict dh0, int64_t L, int n, int p, T* __restrict G,
                       T* __restrict Sbuf) {
    const int64_t np = int64_t(n) * p;
    for (int64_t j = 0; j < np; ++j) G[j] = ghlast[j];
    const int64_t K = (L + kTile - 1) / kTile;
    for (int64_t k = K - 1; k >= 0; --k) {
        const int64_t t0 = k * kTile, tt = L - t0 < kTile ? L - t0 : kTile;
        const T* __restrict entering = ckpt + k * np;
        const T* prev = entering;
        for (int64_t t = t0; t < t0 + tt; ++t) {  // recompute the tile's states
            const T at = exp_nonpos(ld[t]);
            const T* __restrict xt = x + t * p;
            T* __restrict cur = Sbuf + (t - t0) * np;
            for (int s = 0; s < n; ++s) {
                const T bs = B[t * n + s];
                const T* __restrict Ps = prev + int64_t(s) * p;
                T* __restrict Ss = cur + int64_t(s) * p;
#pragma omp simd
                for (int q = 0; q < p; ++q) Ss[q] = at * Ps[q] + bs * xt[q];
            }
            prev = cur;
        }
        for (int64_t t = t0 + tt - 1; t >= t0; --t) {
            const T at = exp_nonpos(ld[t]);
            const T* __restrict xt = x + t * p;
            const T* __restrict gyt = gy + t * p;
            const T* __restrict cur = Sbuf + (t - t0) * np;
            const T* __restrict prv = t > t0 ? cur - np : entering;
            T* __restrict dxt = dx + t * p;
            for (int q = 0; q < p; ++q) dxt[q] = 0;
            T dla = 0;
            for (int s = 0; s < n; ++s) {
                const T bs = B[t * n + s], cs = C[t * n + s];
                T* __restrict Gs = G + int64_t(s) * p;
                const T* __restrict Ss = cur + int64_t(s) * p;
                const T* __restrict Ps = prv + int64_t(s) * p;
                T sc = 0, sb = 0, sa = 0;
#pragma omp simd reduction(+ : sc, sb, sa)
                for (int q = 0; q < p; ++q) {
                    const T g = Gs[q] + cs * gyt[q];  // dLoss/dS_t[s][q]
                    sc += Ss[q] * gyt[q];
                    sb += g * xt[q];
                    sa += g * Ps[q];
                    dxt[q] += bs * g;
                    Gs[q] = at * g;  // carried to step t - 1
                }
                dC[t * n + s] = sc;
                dB[t * n + s] = sb;
                dla += sa;
            }
            dld[t] = at * dla;
        }
    }
    for (int64_t j = 0; j < np; ++j) dh0[j] = G[j];
}

// n is dispatched to a compile-time constant for the common state sizes.
#define LS_DISPATCH_N(n, CALL)                 \
    switch (n) {                               \
        case 1: { constexpr int NF = 1; CALL; break; }   \
        case 2: { constexpr int NF = 2; CALL; break; }   \
        case 4: { constexpr int NF = 4; CALL; break; }   \
        case 8: { constexpr int NF = 8; CALL; break; }   \
        case 16: { constexpr int NF = 16; CALL; break; } \
        case 32: { constexpr int NF = 32; CALL; break; } \
        case 64: { constexpr int NF = 64; CALL; break; } \
        default: { constexpr int NF = 0; CALL; break; }  \
    }

}  // namespace

// Lanes are independent, so they are shared out over threads with OpenMP. Loaded into a PyTorch
// process, this library binds to the OpenMP runtime PyTorch already loaded (same soname), so the
// scan runs on PyTorch's own worker threads instead of competing with them. Built without OpenMP,
// the pragmas are ignored and everything runs on the calling thread.
#ifdef _OPENMP
#include <omp.h>
inline int thread_id() { return omp_get_thread_num(); }
#else
inline int thread_id() { return 0; }
#endif

extern "C" {

int ls_max_state() { return kMaxN; }
int ls_vector_width() { return W; }
int ls_has_openmp() {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

// Every entry returns 0 on success and 1 if the state size n is outside [1, kMaxN] (or, for the float
// backward, groups < 1 or no checkpoints).

// Forward, float. Lanes are blocks of W channels of one batch element: lane i = (i / nb, i % nb),
// nb = ceil(c / W). y (b, c, L) receives the scan plus D x (D may be null); hlast (b, c, n).
// ckpt: null, or room for the states entering every tile of kTile steps, (b, nb, ceil(L / kTile), n, W)
// floats, for ls_s6_backward_f32.
int ls_s6_forward_f32(const float* x, const float* dt, const float* A, const float* B, const float* C,
                      const float* D, const float* h0, float* y, float* hlast, float* ckpt, int64_t b, int64_t c,
                      int64_t L, int64_t n, int64_t threads) {
    if (n < 1 || n > kMaxN) return 1;
    const int ni = static_cast<int>(n);
    const int64_t nb = (c + W - 1) / W, K = (L + kTile - 1) / kTile;
#pragma omp parallel for schedule(static) num_threads(static_cast<int>(threads))
    for (int64_t i = 0; i < b * nb; ++i) {
        const int64_t bi = i / nb, c0 = (i % nb) * W;
        VF* ck = ckpt ? reinterpret_cast<VF*>(ckpt) + i * K * n : nullptr;
        if (ni == 16) s6_forward_block_f32<16>(x, dt, A, B, C, D, h0, y, hlast, ck, c, L, ni, bi, c0);
        else s6_forward_block_f32<0>(x, dt, A, B, C, D, h0, y, hlast, ck, c, L, ni, bi, c0);
    }
    return 0;
}

// Backward, float (see s6_backward_lane_f32). ckpt: the tile states saved by ls_s6_forward_f32. dBg, dCg (b, groups, L, n): each group's sums over its channels (the caller sums over
// groups); dAb (b, c, n) and dDb (b, c) each lane's sums over time (the caller sums over the batch;
// dDb may be null, D too). dx, ddt (b, c, L); dh0 (b, c, n).
int ls_s6_backward_f32(const float* x, const float* dt, const float* A, const float* Bt, const float* Ct,
                       const float* D, const float* gy, const float* ghlast, const float* ckpt,
                       float* dx, float* ddt, float* dh0, float* dAb, float* dBg, float* dCg, float* dDb, int64_t b,
                       int64_t c, int64_t L, int64_t n, int64_t groups, int64_t threads) {
    if (n < 1 || n > kMaxN || groups < 1 || !ckpt) return 1;
    const int ni = static_cast<int>(n);
    const int64_t nb = (c + W - 1) / W;
    const int64_t per_group = (nb + groups - 1) / groups;
#pragma omp parallel num_threads(static_cast<int>(threads))
    {
        std::vector<VF> scratch(static_cast<size_t>((3 * per_group + 2 * kTile) * n));
        std::vector<float> tB(static_cast<size_t>(kTile * n)), tC(static_cast<size_t>(kTile * n));
#pragma omp for schedule(static)
        for (int64_t i = 0; i < b * groups; ++i) {
            const int64_t bi = i / groups, grp = i % groups;
            const int64_t blk0 = grp * per_group;
            const int64_t nblk = blk0 >= nb ? 0 : (nb - blk0 < per_group ? nb - blk0 : per_group);
            float* dBrow = dBg + i * L * n;
            float* dCrow = dCg + i * L * n;
            if (nblk == 0) {  // more groups than blocks: this group's rows are zero
                std::memset(dBrow, 0, sizeof(float) * L * n);
                std::memset(dCrow, 0, sizeof(float) * L * n);
                continue;
            }
            const VF* saved = reinterpret_cast<const VF*>(ckpt);
            if (ni == 16)
                s6_backward_lane_f32<16>(x, dt, A, Bt, Ct, D, gy, ghlast, saved, dx, ddt, dh0, dAb, dBrow, dCrow,
                                         dDb, c, L, ni, bi, blk0, nblk, scratch.data(), tB.data(), tC.data());
            else
                s6_backward_lane_f32<0>(x, dt, A, Bt, Ct, D, gy, ghlast, saved, dx, ddt, dh0, dAb, dBrow, dCrow,
                                        dDb, c, L, ni, bi, blk0, nblk, scratch.data(), tB.data(), tC.data());
        }
    }
    return 0;
}

// Forward, double: one lane per (batch, channel) pair.
int ls_s6_forward_f64(const double* x, const double* dt, const double* A, const double* B, const double* C,
                      const double* D, const double* h0, double* y, double* hlast, int64_t b, int64_t c,
                      int64_t L, int64_t n, int64_t threads) {
    if (n < 1 || n > kMaxN) return 1;
#pragma omp parallel for schedule(static) num_threads(static_cast<int>(threads))
    for (int64_t i = 0; i < b * c; ++i) {
        const int64_t bi = i / c, ci = i % c;
        s6_forward_lane_f64(x + i * L, dt + i * L, A + ci * n, B + bi * n * L, C + bi * n * L,
                            D ? D[ci] : 0.0, h0 ? h0 + i * n : nullptr, y + i * L, hlast + i * n, L,
                            static_cast<int>(n));
    }
    return 0;
}

}  // extern "C"

namespace {

// Backward, double: one lane per (batch, channel) pair. dA (threads, c, n) and dBt, dCt (threads, b, L, n)
// hold one accumulator per thread (zeroed by the caller, summed over threads afterwards).
template <typename T>
int s6_backward(const T* x, const T* dt, const T* A, const T* Bt, const T* Ct, const T* h0, const T* gy,
                const T* ghlast, T* dx, T* ddt, T* dh0, T* dA, T* dBt, T* dCt, int64_t b, int64_t c, int64_t L,
                int64_t n, int64_t threads) {
    if (n < 1 || n > kMaxN) return 1;
    const int ni = static_cast<int>(n);
    const int64_t K = (L + kChunk - 1) / kChunk;
#pragma omp parallel num_threads(static_cast<int>(threads))
    {
        const int64_t me = thread_id();
        std::vector<T> ckpt(static_cast<size_t>(K * n)), hbuf(static_cast<size_t>(kChunk * n));
        T* dA_me = dA + me * c * n;
        T* dBt_me = dBt + me * b * L * n;
        T* dCt_me = dCt + me * b * L * n;
#pragma omp for schedule(static)
        for (int64_t i = 0; i < b * c; ++i) {
            const int64_t bi = i / c, ci = i % c;
            LS_DISPATCH_N(ni, (s6_backward_lane<T, NF>(
                x + i * L, dt + i * L, A + ci * n, Bt + bi * L * n, Ct + bi * L * n, h0 ? h0 + i * n : nullptr,
                gy ? gy + i * L : nullptr, ghlast ? ghlast + i * n : nullptr, dx + i * L, ddt + i * L,
                dh0 + i * n, dA_me + ci * n, dBt_me + bi * L * n, dCt_me + bi * L * n, L, ni, ckpt.data(),
                hbuf.data())));
        }
    }
    return 0;
}

// SSD forward and backward: one lane per (batch, head) pair.
template <typename T>
int ssd_forward(const T* x, const T* ld, const T* B, const T* C, const T* h0, T* y, T* hlast, T* ckpt,
                int64_t lanes, int64_t L, int64_t n, int64_t p, int64_t threads) {
    const int64_t K = (L + kTile - 1) / kTile;
#pragma omp parallel num_threads(static_cast<int>(threads))
    {
        std::vector<T> S(static_cast<size_t>(n * p));
#pragma omp for schedule(static)
        for (int64_t i = 0; i < lanes; ++i)
            ssd_forward_lane<T>(x + i * L * p, ld + i * L, B + i * L * n, C + i * L * n,
                                h0 ? h0 + i * n * p : nullptr, y + i * L * p, hlast + i * n * p,
                                ckpt ? ckpt + i * K * n * p : nullptr, L, static_cast<int>(n),
                                static_cast<int>(p), S.data());
    }
    return 0;
}

// gy (lanes, L, p) and ghlast (lanes, n, p) must be given (zeros for an unused output); ckpt as
// saved by ssd_forward. Writes dx (lanes, L, p), dld (lanes, L), dB, dC (lanes, L, n), dh0 (lanes, n, p).
template <typename T>
int ssd_backward(const T* x, const T* ld, const T* B, const T* C, const T* ckpt, const T* gy, const T* ghlast,
                 T* dx, T* dld, T* dB, T* dC, T* dh0, int64_t lanes, int64_t L, int64_t n, int64_t p,
                 int64_t threads) {
    if (!ckpt || !gy || !ghlast) return 1;
    const int64_t K = (L + kTile - 1) / kTile;
#pragma omp parallel num_threads(static_cast<int>(threads))
    {
        std::vector<T> G(static_cast<size_t>(n * p)), Sbuf(static_cast<size_t>(kTile * n * p));
#pragma omp for schedule(static)
        for (int64_t i = 0; i < lanes; ++i)
            ssd_backward_lane<T>(x + i * L * p, ld + i * L, B + i * L * n, C + i * L * n, ckpt + i * K * n * p,
                                 gy + i * L * p, ghlast + i * n * p, dx + i * L * p, dld + i * L, dB + i * L * n,
                                 dC + i * L * n, dh0 + i * n * p, L, static_cast<int>(n), static_cast<int>(p),
                                 G.data(), Sbuf.data());
    }
    return 0;
}

}  // namespace

extern "C" {

// Backward, double (for exactness checks; the float backward above is the fast one).
int ls_s6_backward_f64(const double* x, const double* dt, const double* A, const double* Bt, const double* Ct,
                       const double* h0, const double* gy, const double* ghlast, double* dx, double* ddt,
                       double* dh0, double* dA, double* dBt, double* dCt, int64_t b, int64_t c, int64_t L, int64_t n,
                       int64_t threads) {
    return s6_backward<double>(x, dt, A, Bt, Ct, h0, gy, ghlast, dx, ddt, dh0, dA, dBt, dCt, b, c, L, n, threads);
}

#define LS_SSD_ENTRY(SUFFIX, T)                                                                                 \
    int ls_ssd_forward_##SUFFIX(const T* x, const T* ld, const T* B, const T* C, const T* h0, T* y, T* hlast,   \
                                T* ckpt, int64_t lanes, int64_t L, int64_t n, int64_t p, int64_t threads) {     \
        return ssd_forward<T>(x, ld, B, C, h0, y, hlast, ckpt, lanes, L, n, p, threads);                        \
    }                                                                                                           \
    int ls_ssd_backward_##SUFFIX(const T* x, const T* ld, const T* B, const T* C, const T* ckpt, const T* gy,   \
                                 const T* ghlast, T* dx, T* dld, T* dB, T* dC, T* dh0, int64_t lanes, int64_t L, \
                                 int64_t n, int64_t p, int64_t threads) {                                       \
        return ssd_backward<T>(x, ld, B, C, ckpt, gy, ghlast, dx, dld, dB, dC, dh0, lanes, L, n, p, threads);   \
    }

LS_SSD_ENTRY(f32, float)
LS_SSD_ENTRY(f64, double)

}  // extern "C"
