/* Fused CPU kernels for soft attention and beam search (capattn/models/native.py builds and loads this file).
 *
 * PyTorch computes e = w . tanh(keys + q) as three passes over a (B, K, L, A) tensor: the sum,
 * the tanh, and a matmul with w, and its backward as five more. Here each (location, hypothesis)
 * pair is one pass over A values held in registers, and the backward of a training step rebuilds
 * tanh and adds its gradients in that same pass. Written by hand because no library fuses an
 * additive-attention energy on a CPU (oneDNN and MKL fuse only matmul epilogues).
 *
 * All tensors are contiguous float32, batch-first, row-major. Threads: OpenMP over images (rows),
 * in the OpenMP runtime torch already loaded (libgomp.so.1), so torch.set_num_threads applies.
 * Built without -ffast-math: NaN and infinity propagate as in PyTorch.
 */
#include <math.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#if defined(__AVX512F__) || defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif
/* AVX2 with FMA, and no AVX-512 (most laptops: Intel's since 2013, AMD's before Zen 4): 8-lane
 * versions of the AVX-512 code below. Built for it, the tanh, the energy and its backward, and the
 * small matmuls are written out in 8 lanes instead of left to the compiler (plain C: a division per
 * tanh, and no matmul kernels at all). */
#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
#define CAPATTN_AVX2 1
#else
#define CAPATTN_AVX2 0
#endif
/* The 8-lane matmul kernels: in AVX2 builds, and in AVX-512 ones for x W^T at few rows (below). */
#if defined(__AVX2__) && defined(__FMA__)
#define CAPATTN_LANES8 1
#else
#define CAPATTN_LANES8 0
#endif

/* tanh(x) = x P(x^2) / Q(x^2), x clamped to [-10, 10] (beyond, tanh is 1 in float32). P (degree
 * 6 in x^2) and Q (degree 3) minimise the relative error over [0, 10]: 2e-8 in exact arithmetic;
 * as evaluated here in float32, at most 6 ULP from float64 tanh and under 1 on average; |tanh| may
 * exceed 1 by two ULP, 2.4e-7 (benchmarks/fit_tanh.py fits the coefficients and measures all of this).
 * glibc's vector tanhf (libmvec), within 1 ULP like PyTorch's own tanh, took 9.5 ms for the 50 M
 * values of a beam-5 step over 100 images, against 6.3 ms here. */
#define TANH_CLAMP 10.0f
#define TANH_P0 9.9999998026370074e-01f
#define TANH_P1 1.3039257748905730e-01f
#define TANH_P2 3.0541910996313044e-03f
#define TANH_P3 1.0641663563728013e-05f
#define TANH_P4 -1.8205303290269374e-08f
#define TANH_P5 4.3452249415297060e-11f
#define TANH_P6 -6.2132716897558251e-14f
#define TANH_Q1 4.6372573798135797e-01f
#define TANH_Q2 2.4296357630525251e-02f
#define TANH_Q3 2.4741078008341463e-04f

/* The comparisons are false for NaN, so NaN goes through both clamps and comes out NaN. */
static inline float tanh1(float x) {
    x = x < -TANH_CLAMP ? -TANH_CLAMP : (x > TANH_CLAMP ? TANH_CLAMP : x);
    float u = x * x;
    float p = ((((((TANH_P6 * u + TANH_P5) * u + TANH_P4) * u + TANH_P3) * u + TANH_P2) * u + TANH_P1) * u + TANH_P0);
    float q = ((TANH_Q3 * u + TANH_Q2) * u + TANH_Q1) * u + 1.0f;
    return x * p / q;
}

#if defined(__AVX512F__)
/* tanh1 on 16 lanes, the division by Q replaced by an approximate reciprocal (14 bits) and one
 * Newton step (about 23 bits): the division was most of the kernel's time (7.5 against 5.6 ms).
 * max/min return their second operand when either is NaN, so NaN x stays NaN. */
static inline __m512 tanh16(__m512 x) {
    const __m512 clamp = _mm512_set1_ps(TANH_CLAMP), one = _mm512_set1_ps(1.0f);
    x = _mm512_min_ps(clamp, _mm512_max_ps(_mm512_sub_ps(_mm512_setzero_ps(), clamp), x));
    __m512 u = _mm512_mul_ps(x, x);
    __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(TANH_P6), u, _mm512_set1_ps(TANH_P5));
    p = _mm512_fmadd_ps(p, u, _mm512_set1_ps(TANH_P4));
    p = _mm512_fmadd_ps(p, u, _mm512_set1_ps(TANH_P3));
    p = _mm512_fmadd_ps(p, u, _mm512_set1_ps(TANH_P2));
    p = _mm512_fmadd_ps(p, u, _mm512_set1_ps(TANH_P1));
    p = _mm512_fmadd_ps(p, u, _mm512_set1_ps(TANH_P0));
    __m512 q = _mm512_fmadd_ps(_mm512_set1_ps(TANH_Q3), u, _mm512_set1_ps(TANH_Q2));
    q = _mm512_fmadd_ps(q, u, _mm512_set1_ps(TANH_Q1));
    q = _mm512_fmadd_ps(q, u, one);
    __m512 r = _mm512_rcp14_ps(q);
    r = _mm512_mul_ps(r, _mm512_fnmadd_ps(q, r, _mm512_set1_ps(2.0f)));
    return _mm512_mul_ps(_mm512_mul_ps(x, p), r);
}
#endif

#if CAPATTN_AVX2
/* tanh16 on 8 lanes: the reciprocal of Q from an approximate one (12 bits) and one Newton step. */
static inline __m256 tanh8(__m256 x) {
    const __m256 clamp = _mm256_set1_ps(TANH_CLAMP), one = _mm256_set1_ps(1.0f);
    x = _mm256_min_ps(clamp, _mm256_max_ps(_mm256_sub_ps(_mm256_setzero_ps(), clamp), x));
    __m256 u = _mm256_mul_ps(x, x);
    __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(TANH_P6), u, _mm256_set1_ps(TANH_P5));
    p = _mm256_fmadd_ps(p, u, _mm256_set1_ps(TANH_P4));
    p = _mm256_fmadd_ps(p, u, _mm256_set1_ps(TANH_P3));
    p = _mm256_fmadd_ps(p, u, _mm256_set1_ps(TANH_P2));
    p = _mm256_fmadd_ps(p, u, _mm256_set1_ps(TANH_P1));
    p = _mm256_fmadd_ps(p, u, _mm256_set1_ps(TANH_P0));
    __m256 q = _mm256_fmadd_ps(_mm256_set1_ps(TANH_Q3), u, _mm256_set1_ps(TANH_Q2));
    q = _mm256_fmadd_ps(q, u, _mm256_set1_ps(TANH_Q1));
    q = _mm256_fmadd_ps(q, u, one);
    __m256 r = _mm256_rcp_ps(q);
    r = _mm256_mul_ps(r, _mm256_fnmadd_ps(q, r, _mm256_set1_ps(2.0f)));
    return _mm256_mul_ps(_mm256_mul_ps(x, p), r);
}
#endif

#if CAPATTN_LANES8
static inline float sum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif

/* y[i] = tanh(x[i]) as the kernels compute it; for the tests of its accuracy. */
void capattn_tanh(const float *x, float *y, long n) {
    long i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, tanh16(_mm512_loadu_ps(x + i)));
#elif CAPATTN_AVX2
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, tanh8(_mm256_loadu_ps(x + i)));
#endif
    for (; i < n; i++) y[i] = tanh1(x[i]);
}

/* sum_a w[a] tanh(k[a] + q[a]) */
static inline float energy1(const float *k, const float *q, const float *w, long A) {
    float s = 0.f;
    long a = 0;
#if defined(__AVX512F__)
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
    for (; a + 32 <= A; a += 32) {
        __m512 t0 = tanh16(_mm512_add_ps(_mm512_loadu_ps(k + a), _mm512_loadu_ps(q + a)));
        __m512 t1 = tanh16(_mm512_add_ps(_mm512_loadu_ps(k + a + 16), _mm512_loadu_ps(q + a + 16)));
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + a), t0, s0);
        s1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + a + 16), t1, s1);
    }
    for (; a + 16 <= A; a += 16)
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + a), tanh16(_mm512_add_ps(_mm512_loadu_ps(k + a), _mm512_loadu_ps(q + a))), s0);
    s = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
#elif CAPATTN_AVX2
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    for (; a + 16 <= A; a += 16) {
        __m256 t0 = tanh8(_mm256_add_ps(_mm256_loadu_ps(k + a), _mm256_loadu_ps(q + a)));
        __m256 t1 = tanh8(_mm256_add_ps(_mm256_loadu_ps(k + a + 8), _mm256_loadu_ps(q + a + 8)));
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + a), t0, s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + a + 8), t1, s1);
    }
    for (; a + 8 <= A; a += 8) {
        const __m256 t = tanh8(_mm256_add_ps(_mm256_loadu_ps(k + a), _mm256_loadu_ps(q + a)));
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + a), t, s0);
    }
    s = sum8(_mm256_add_ps(s0, s1));
#endif
#pragma omp simd reduction(+ : s)
    for (long i = a; i < A; i++) s += w[i] * tanh1(k[i] + q[i]);
    return s;
}

/* Rows of image b: b*K … (b+1)*K−1, or starts[b] … starts[b+1]−1 where starts is given (beam search
 * with its ended beams left out: a varying number of hypotheses per image, rows image-major). */
#define FIRST_ROW(b) (starts ? starts[b] : (b) * K)
#define LAST_ROW(b) (starts ? starts[(b) + 1] : ((b) + 1) * K)

/* energy[r, l] = sum_a w[a] tanh(keys[b, l, a] + q[r, a]) + bias for the rows r of each image b.
 * keys (B, L, A), q (N, A), w (A), energy (N, L), N = B*K or starts[B]. Each key row is read once
 * for all the queries of its image. */
void capattn_energy(const float *keys, const float *q, const float *w, float bias, float *energy,
                    long B, long K, long L, long A, const long *starts) {
#pragma omp parallel for schedule(static)
    for (long b = 0; b < B; b++) {
        const long r0 = FIRST_ROW(b), r1 = LAST_ROW(b);
        for (long l = 0; l < L; l++) {
            const float *kr = keys + (b * L + l) * A;
            /* The next key row, fetched while this one is worked on: the keys (40 MB for 100 images)
             * come from memory at every word, and the hardware prefetcher alone left the kernel
             * waiting for them (measured with the keys out of cache: 8.7 ms without, 6.8 ms with;
             * 7.2 ms with the keys in cache). Prefetching past the last row never faults. */
            for (long a = 0; a < A; a += 16) __builtin_prefetch(kr + A + a);
            for (long r = r0; r < r1; r++) {
                energy[r * L + l] = energy1(kr, q + r * A, w, A) + bias;
            }
        }
    }
}

/* For one key row k and its query q, with g = d (1 - s^2) w and s = tanh(k + q):
 * acc += g, dq += g, dw += d s. */
static inline void energy_grad1(const float *k, const float *q, const float *w, float d, float *acc, float *dq,
                                float *dw, long A) {
    long a = 0;
#if defined(__AVX512F__)
    const __m512 dv = _mm512_set1_ps(d), one = _mm512_set1_ps(1.0f);
    for (; a + 16 <= A; a += 16) {
        __m512 s = tanh16(_mm512_add_ps(_mm512_loadu_ps(k + a), _mm512_loadu_ps(q + a)));
        __m512 g = _mm512_mul_ps(_mm512_mul_ps(dv, _mm512_fnmadd_ps(s, s, one)), _mm512_loadu_ps(w + a));
        _mm512_storeu_ps(dw + a, _mm512_fmadd_ps(dv, s, _mm512_loadu_ps(dw + a)));
        _mm512_storeu_ps(acc + a, _mm512_add_ps(_mm512_loadu_ps(acc + a), g));
        _mm512_storeu_ps(dq + a, _mm512_add_ps(_mm512_loadu_ps(dq + a), g));
    }
#elif CAPATTN_AVX2
    const __m256 dv = _mm256_set1_ps(d), one = _mm256_set1_ps(1.0f);
    for (; a + 8 <= A; a += 8) {
        __m256 s = tanh8(_mm256_add_ps(_mm256_loadu_ps(k + a), _mm256_loadu_ps(q + a)));
        __m256 g = _mm256_mul_ps(_mm256_mul_ps(dv, _mm256_fnmadd_ps(s, s, one)), _mm256_loadu_ps(w + a));
        _mm256_storeu_ps(dw + a, _mm256_fmadd_ps(dv, s, _mm256_loadu_ps(dw + a)));
        _mm256_storeu_ps(acc + a, _mm256_add_ps(_mm256_loadu_ps(acc + a), g));
        _mm256_storeu_ps(dq + a, _mm256_add_ps(_mm256_loadu_ps(dq + a), g));
    }
#endif
#pragma omp simd
    for (long i = a; i < A; i++) {
        float s = tanh1(k[i] + q[i]);
        float g = d * (1.f - s * s) * w[i];
        dw[i] += d * s;
        acc[i] += g;
        dq[i] += g;
    }
}

/* Backward of capattn_energy with K = 1, for rows b < B of a time step:
 *   g[b, l, a] = d_energy[b, l] (1 - s^2) w[a], s = tanh(keys[b, l, a] + q[b, a])
 *   acc[b, l, :] += g[b, l, :]          (the keys' gradient, summed over the time steps in place)
 *   d_q[b, :]     = sum_l g[b, l, :]
 *   d_w[:]        = sum_{b, l} d_energy[b, l] s[b, l, :]
 * d_w is summed per thread and then over threads in thread order, so results do not depend on
 * which thread finishes first (static schedule: the same rows go to the same thread every time). */
int capattn_energy_backward(const float *keys, const float *q, const float *w, const float *d_energy, float *acc,
                            float *d_q, float *d_w, long B, long L, long A) {
    int threads = omp_get_max_threads();
    float *partial = calloc((size_t)threads * (size_t)A, sizeof(float));
    if (partial == NULL) return 1;
#pragma omp parallel
    {
        float *dw = partial + (size_t)omp_get_thread_num() * (size_t)A;
#pragma omp for schedule(static)
        for (long b = 0; b < B; b++) {
            const float *qr = q + b * A;
            float *dq = d_q + b * A;
            memset(dq, 0, sizeof(float) * (size_t)A);
            for (long l = 0; l < L; l++) {
                const float *kr = keys + (b * L + l) * A;
                float *ar = acc + (b * L + l) * A;
                energy_grad1(kr, qr, w, d_energy[b * L + l], ar, dq, dw, A);
            }
        }
    }
    memset(d_w, 0, sizeof(float) * (size_t)A);
    for (int t = 0; t < threads; t++)
        for (long a = 0; a < A; a++) d_w[a] += partial[(size_t)t * (size_t)A + a];
    free(partial);
    return 0;
}

/* ---- The context: context[r, :] = sum_l alpha[r, l] grid[b, l, :] -------------------------------
 *
 * For the rows r of each image b (FIRST_ROW/LAST_ROW): grid (B, L, D), alpha (N, L), context (N, D).
 * Each image's grid is streamed once for all its hypotheses, four rows at a time: each pass over a
 * context row adds four grid rows, so the context rows (in cache) are read and written a quarter as
 * often as one row at a time (100 images x 196 x 2048, K = 5: 7.3 ms against 12.1 ms; K = 1: 3.8 ms
 * against 5.9 ms).
 *
 * The grid may also be read in float16, where that is exact. A decoding step reads each image's
 * whole grid for its context, 160 MB per word for 100 images at 196 x 2048, at the speed of memory;
 * capattn's feature cache stores grids in float16, and reading those (EncoderOutput.cached_grid)
 * instead of their float32 copies halves what the context reads (K = 1: 2.6-3.0 ms against 5.1).
 * Each element is converted in a register (F16C) and goes through the same operations in the same
 * order as the float32 grid's, written out below (a0 g0, then + a1 g1, + a2 g2, + a3 g3 as fused
 * multiply-adds, then added to the context), so the two give the same bits. Built with AVX2 and
 * F16C (every CPU with AVX2 has F16C) or AVX-512; elsewhere capattn_half_available() is 0 and the
 * float32 grid's sums are plain C. */
#if CAPATTN_LANES8 && defined(__F16C__)
#define CAPATTN_HALF 1
#else
#define CAPATTN_HALF 0
#endif

int capattn_half_available(void) { return CAPATTN_HALF; }

/* Element d of a grid row as float32: from a float32 row, or from a float16 one (half). */
static inline __attribute__((always_inline)) float grid_load1(const void *g, long d, int half) {
#if CAPATTN_HALF
    if (half) return _cvtsh_ss(((const unsigned short *)g)[d]);
#endif
    (void)half;
    return ((const float *)g)[d];
}

#if defined(__AVX512F__)
static inline __attribute__((always_inline)) __m512 grid_load16(const void *g, long d, int half) {
    if (half) return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const unsigned short *)g + d)));
    return _mm512_loadu_ps((const float *)g + d);
}
#endif

#if CAPATTN_LANES8
static inline __attribute__((always_inline)) __m256 grid_load8(const void *g, long d, int half) {
#if CAPATTN_HALF
    if (half) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const unsigned short *)g + d)));
#endif
    return _mm256_loadu_ps((const float *)g + d);
}
#endif

/* ck (D) += a0 g0 + a1 g1 + a2 g2 + a3 g3, four grid rows (float32, or float16 with half). */
static inline __attribute__((always_inline)) void context_add4(float *ck, const void *g0, const void *g1,
                                                               const void *g2, const void *g3, float a0, float a1,
                                                               float a2, float a3, long D, int half) {
    long d = 0;
#if defined(__AVX512F__)
    const __m512 v0 = _mm512_set1_ps(a0), v1 = _mm512_set1_ps(a1), v2 = _mm512_set1_ps(a2), v3 = _mm512_set1_ps(a3);
    for (; d + 16 <= D; d += 16) {
        __m512 t = _mm512_mul_ps(v0, grid_load16(g0, d, half));
        t = _mm512_fmadd_ps(v1, grid_load16(g1, d, half), t);
        t = _mm512_fmadd_ps(v2, grid_load16(g2, d, half), t);
        t = _mm512_fmadd_ps(v3, grid_load16(g3, d, half), t);
        _mm512_storeu_ps(ck + d, _mm512_add_ps(_mm512_loadu_ps(ck + d), t));
    }
#endif
#if CAPATTN_LANES8
    const __m256 u0 = _mm256_set1_ps(a0), u1 = _mm256_set1_ps(a1), u2 = _mm256_set1_ps(a2), u3 = _mm256_set1_ps(a3);
    for (; d + 8 <= D; d += 8) {
        __m256 t = _mm256_mul_ps(u0, grid_load8(g0, d, half));
        t = _mm256_fmadd_ps(u1, grid_load8(g1, d, half), t);
        t = _mm256_fmadd_ps(u2, grid_load8(g2, d, half), t);
        t = _mm256_fmadd_ps(u3, grid_load8(g3, d, half), t);
        _mm256_storeu_ps(ck + d, _mm256_add_ps(_mm256_loadu_ps(ck + d), t));
    }
    for (; d < D; d++) { /* the vectors' operations, one lane at a time */
        float t = a0 * grid_load1(g0, d, half);
        t = fmaf(a1, grid_load1(g1, d, half), t);
        t = fmaf(a2, grid_load1(g2, d, half), t);
        ck[d] += fmaf(a3, grid_load1(g3, d, half), t);
    }
#else
#pragma omp simd
    for (d = 0; d < D; d++)
        ck[d] += a0 * grid_load1(g0, d, half) + a1 * grid_load1(g1, d, half) + a2 * grid_load1(g2, d, half) +
                 a3 * grid_load1(g3, d, half);
#endif
}

/* ck (D) += a g, one grid row. */
static inline __attribute__((always_inline)) void context_add1(float *ck, const void *g, float a, long D, int half) {
    long d = 0;
#if defined(__AVX512F__)
    const __m512 v = _mm512_set1_ps(a);
    for (; d + 16 <= D; d += 16)
        _mm512_storeu_ps(ck + d, _mm512_fmadd_ps(v, grid_load16(g, d, half), _mm512_loadu_ps(ck + d)));
#endif
#if CAPATTN_LANES8
    const __m256 u = _mm256_set1_ps(a);
    for (; d + 8 <= D; d += 8)
        _mm256_storeu_ps(ck + d, _mm256_fmadd_ps(u, grid_load8(g, d, half), _mm256_loadu_ps(ck + d)));
    for (; d < D; d++) ck[d] = fmaf(a, grid_load1(g, d, half), ck[d]);
#else
#pragma omp simd
    for (d = 0; d < D; d++) ck[d] += a * grid_load1(g, d, half);
#endif
}

/* The context of one image's n rows from its grid rows g (L x D; float32, or float16 with half). */
static inline __attribute__((always_inline)) void context_image(const void *g, const float *al, float *c, long n,
                                                                long L, long D, int half) {
    const size_t row = half ? sizeof(unsigned short) : sizeof(float);
#define GRID_ROW(l) ((const char *)g + (size_t)(l) * (size_t)D * row)
    memset(c, 0, sizeof(float) * (size_t)(n * D));
    long l = 0;
    for (; l + 4 <= L; l += 4)
        for (long k = 0; k < n; k++) {
            const float *a = al + k * L + l;
            context_add4(c + k * D, GRID_ROW(l), GRID_ROW(l + 1), GRID_ROW(l + 2), GRID_ROW(l + 3), a[0], a[1], a[2],
                         a[3], D, half);
        }
    for (; l < L; l++)
        for (long k = 0; k < n; k++) context_add1(c + k * D, GRID_ROW(l), al[k * L + l], D, half);
#undef GRID_ROW
}

void capattn_context(const float *grid, const float *alpha, float *context, long B, long K, long L, long D,
                     const long *starts) {
#pragma omp parallel for schedule(static)
    for (long b = 0; b < B; b++) {
        const long r0 = FIRST_ROW(b);
        context_image(grid + b * L * D, alpha + r0 * L, context + r0 * D, LAST_ROW(b) - r0, L, D, 0);
    }
}

/* capattn_context of a float16 grid (an exact copy from capattn_to_half_exact): the same sums, to
 * the bit. Returns 0, or -1 where not built (capattn_half_available() is 0). */
int capattn_context_half(const unsigned short *grid, const float *alpha, float *context, long B, long K, long L,
                         long D, const long *starts) {
#if CAPATTN_HALF
#pragma omp parallel for schedule(static)
    for (long b = 0; b < B; b++) {
        const long r0 = FIRST_ROW(b);
        context_image(grid + b * L * D, alpha + r0 * L, context + r0 * D, LAST_ROW(b) - r0, L, D, 1);
    }
    return 0;
#else
    (void)grid, (void)alpha, (void)context, (void)B, (void)K, (void)L, (void)D, (void)starts;
    return -1;
#endif
}

/* The k largest values of each row of x (R, V) and their column indices, largest first, for beam
 * search's top-k over (B*K, V) log-probabilities (k <= V). Ties keep the lower index first; NaN
 * ranks above every number, as in torch.topk. One pass per row: a block of 16 values is looked at
 * only when one of them beats the current k-th best, which after the first few blocks is rare, so
 * the pass runs at the speed of reading the row (torch.topk copied each row and partially sorted
 * it: 3.1 ms for 500 x 10,000 at k = 5, against 0.7 ms here). */
static inline int ranks_above(float v, float u) { return v > u || (v != v && u == u); }

void capattn_topk(const float *x, float *values, long *indices, long R, long V, long k) {
#pragma omp parallel for schedule(static)
    for (long r = 0; r < R; r++) {
        const float *row = x + r * V;
        float *val = values + r * k;
        long *idx = indices + r * k;
        long n = 0; /* entries of val/idx filled so far, best first */
        for (long j = 0; j < V; j += 16) {
            long m = V - j < 16 ? V - j : 16;
            if (n == k) {
                float worst = val[k - 1];
                int any = 0;
#pragma omp simd reduction(| : any)
                for (long i = 0; i < m; i++) any |= !(row[j + i] <= worst); /* greater, or NaN */
                if (!any) continue;
            }
            for (long i = 0; i < m; i++) {
                float v = row[j + i];
                if (n == k && !ranks_above(v, val[k - 1])) continue;
                long p = n < k ? n : k - 1; /* insert v after every entry it does not rank above */
                while (p > 0 && ranks_above(v, val[p - 1])) {
                    val[p] = val[p - 1];
                    idx[p] = idx[p - 1];
                    p--;
                }
                val[p] = v;
                idx[p] = j + i;
                if (n < k) n++;
            }
        }
    }
}

/* A grid row (float32, or float16 with half) times v, D long: the same operations in the same order
 * for both (see the context above). */
static inline __attribute__((always_inline)) float grid_dot(const void *g, const float *v, long D, int half) {
    long d = 0;
    float s = 0.f;
#if defined(__AVX512F__)
    __m512 acc = _mm512_setzero_ps();
    for (; d + 16 <= D; d += 16) acc = _mm512_fmadd_ps(grid_load16(g, d, half), _mm512_loadu_ps(v + d), acc);
    s = _mm512_reduce_add_ps(acc);
#endif
#if CAPATTN_LANES8
    __m256 acc8 = _mm256_setzero_ps();
    for (; d + 8 <= D; d += 8) acc8 = _mm256_fmadd_ps(grid_load8(g, d, half), _mm256_loadu_ps(v + d), acc8);
    s += sum8(acc8);
    for (; d < D; d++) s = fmaf(grid_load1(g, d, half), v[d], s);
#else
#pragma omp simd reduction(+ : s)
    for (d = 0; d < D; d++) s += grid_load1(g, d, half) * v[d];
#endif
    return s;
}

/* out[b, l] = sum_d grid[b, l, d] v[b, d]: each image's grid times its own vector, (B, L, D) and
 * (B, D) -> (B, L), for the attention weights' gradient in training. One call per time step, its
 * rows shared out over the threads (torch.mv per image ran each 1.6 MB product on its own). */
void capattn_grid_times(const float *grid, const float *v, float *out, long B, long L, long D) {
#pragma omp parallel for schedule(static)
    for (long r = 0; r < B * L; r++) out[r] = grid_dot(grid + r * D, v + (r / L) * D, D, 0);
}

/* capattn_grid_times of a float16 grid: the same sums, to the bit. Returns 0, or -1 where not built
 * (capattn_half_available() is 0). */
int capattn_grid_times_half(const unsigned short *grid, const float *v, float *out, long B, long L, long D) {
#if CAPATTN_HALF
#pragma omp parallel for schedule(static)
    for (long r = 0; r < B * L; r++) out[r] = grid_dot(grid + r * D, v + (r / L) * D, D, 1);
    return 0;
#else
    (void)grid, (void)v, (void)out, (void)B, (void)L, (void)D;
    return -1;
#endif
}

/* ---- Per-word matrix products: the teacher-forced loop's few rows, decoding's output layer --------
 *
 * Each word of Show, Attend and Tell's training loop multiplies b rows (the captions still running,
 * at most the batch's) by the same weights: forward, gates += z W_z^T (b x 2048 by 2048 x 2048 at
 * the paper's sizes) and [q; beta; W_hh h] = b_r + h W_r^T; backward, their transposes. A decoding
 * step multiplies its 100-500 hypotheses by W_r and by the output layer (10,000 x 512), where the
 * forward kernel also beats MKL (native.takes says where they are used). MKL is slow at so few rows:
 * on the 2-core AMD EPYC (Zen 4), b = 32 x 2048 x 2048 took 2.3-2.6 ms (100-115 GFLOP/s, against
 * 180 for large matrices) and b = 4 1.3-1.7 ms, where reading the 16 MB weight once takes 0.7 ms.
 * These are the usual register-blocked kernels (a tile of accumulators, one operand broadcast, the
 * other loaded as vectors: x W^T's packed, A B's read where it lies), written for this case only:
 * 1.4 and 1.8 ms at b = 32, 0.7-1.1 ms at b = 4 (benchmarks/RESULTS.md). They also take a
 * training batch's output layer over all its positions (forward x W^T, and A B for x's gradient).
 * AVX-512, or AVX2 with FMA (the 8-lane versions below): elsewhere capattn_small_matmul_available()
 * is 0 and the loop keeps torch's matmul.
 * Each output is summed in a fixed order by one thread: the result does not depend on the number of
 * threads. The rows of all operands may be strided (lda, ldb, ...); within a row, elements are
 * contiguous. mode 0: C = P, 1: C += P, 2: C = bias + P (bias (N,)). */
int capattn_small_matmul_available(void) {
#if defined(__AVX512F__) || CAPATTN_AVX2
    return 1;
#else
    return 0;
#endif
}

#if defined(__AVX512F__)
#define NN_ROWS 6     /* rows of A per tile */
#define NN_VECS 4     /* vectors of 16 columns of B per tile: a 64-column panel */
#define NN_COLS (16 * NN_VECS)
#define NN_DEPTH 128  /* rows of B per block: a panel's block is 32 KB, read by every tile of A's rows */

static inline __mmask16 columns_left(long left) {
    return left >= 16 ? (__mmask16)0xFFFF : (left <= 0 ? (__mmask16)0 : (__mmask16)((1u << left) - 1));
}

/* C[:rows, :64] (+)= A[:rows, :kn] . B[:kn, :64], B's rows ldb apart; the first block of B's rows
 * starts from 0, C or bias (mode), the later ones add to C. */
static inline __attribute__((always_inline)) void nn_tile(const float *A, long lda, const float *B, long ldb,
                                                          float *C, long ldc, const float *bias, int mode, int rows,
                                                          long kn, const __mmask16 *mask) {
    __m512 acc[NN_ROWS][NN_VECS];
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < NN_VECS; j++) {
            if (mode == 1) acc[i][j] = _mm512_maskz_loadu_ps(mask[j], C + i * ldc + 16 * j);
            else if (mode == 2) acc[i][j] = _mm512_maskz_loadu_ps(mask[j], bias + 16 * j);
            else acc[i][j] = _mm512_setzero_ps();
        }
    for (long k = 0; k < kn; k++) {
        __m512 bv[NN_VECS];
        for (int j = 0; j < NN_VECS; j++) bv[j] = _mm512_maskz_loadu_ps(mask[j], B + k * ldb + 16 * j);
        for (int i = 0; i < rows; i++) {
            __m512 a = _mm512_set1_ps(A[i * lda + k]);
            for (int j = 0; j < NN_VECS; j++) acc[i][j] = _mm512_fmadd_ps(a, bv[j], acc[i][j]);
        }
    }
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < NN_VECS; j++) _mm512_mask_storeu_ps(C + i * ldc + 16 * j, mask[j], acc[i][j]);
}
#endif

#if CAPATTN_LANES8
/* The same two kernels on 8 lanes and 16 registers: A B in tiles of 6 rows by 16 columns (12
 * accumulators, as BLIS's Haswell kernel); x W^T in tiles of 12 rows of W by 8 rows of x, or 6 by 16. */
#define NN8_ROWS 6
#define NN8_COLS 16
#define NN8_DEPTH 128 /* rows of B per block: a panel's block is 8 KB */

static inline __m256i lanes_left(long left) {
    const long n = left < 0 ? 0 : (left > 8 ? 8 : left);
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

/* 8 floats at p: all of them where `full`, else the lanes of `mask` (the others 0, never read). */
static inline __attribute__((always_inline)) __m256 load8(const float *p, int full, __m256i mask) {
    return full ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, mask);
}

static inline __attribute__((always_inline)) void store8(float *p, __m256 v, int full, __m256i mask) {
    if (full) _mm256_storeu_ps(p, v);
    else _mm256_maskstore_ps(p, mask, v);
}

#if CAPATTN_AVX2 /* (AVX-512 builds keep their 16-lane A B at every row count) */
/* nn_tile on 16 columns: C[:rows, :16] (+)= A[:rows, :kn] . B[:kn, :16]; `full`: all 16 columns exist. */
static inline __attribute__((always_inline)) void nn_tile8(const float *A, long lda, const float *B, long ldb,
                                                           float *C, long ldc, const float *bias, int mode, int rows,
                                                           long kn, int full, const __m256i *mask) {
    __m256 acc[NN8_ROWS][2];
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < 2; j++) {
            if (mode == 1) acc[i][j] = load8(C + i * ldc + 8 * j, full, mask[j]);
            else if (mode == 2) acc[i][j] = load8(bias + 8 * j, full, mask[j]);
            else acc[i][j] = _mm256_setzero_ps();
        }
    for (long k = 0; k < kn; k++) {
        const __m256 b0 = load8(B + k * ldb, full, mask[0]), b1 = load8(B + k * ldb + 8, full, mask[1]);
        for (int i = 0; i < rows; i++) {
            const __m256 a = _mm256_broadcast_ss(A + i * lda + k);
            acc[i][0] = _mm256_fmadd_ps(a, b0, acc[i][0]);
            acc[i][1] = _mm256_fmadd_ps(a, b1, acc[i][1]);
        }
    }
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < 2; j++) store8(C + i * ldc + 8 * j, acc[i][j], full, mask[j]);
}

static void matmul_nn8(const float *A, long lda, const float *B, long ldb, float *C, long ldc, const float *bias,
                       long M, long N, long K, int mode) {
    const long panels = (N + NN8_COLS - 1) / NN8_COLS;
#pragma omp parallel
    {
        const int t = omp_get_thread_num(), threads = omp_get_num_threads();
        const long p0 = panels * t / threads, p1 = panels * (t + 1) / threads;
        for (long k0 = 0; k0 < K; k0 += NN8_DEPTH) {
            const long kn = K - k0 < NN8_DEPTH ? K - k0 : NN8_DEPTH;
            const int first = k0 == 0 ? mode : 1; /* later blocks add to C */
            for (long p = p0; p < p1; p++) {
                const long n0 = p * NN8_COLS;
                const __m256i mask[2] = {lanes_left(N - n0), lanes_left(N - n0 - 8)};
                const float *b = B + k0 * ldb + n0, *bias_p = bias ? bias + n0 : NULL;
                for (long r0 = 0; r0 < M; r0 += NN8_ROWS) {
                    const float *a = A + r0 * lda + k0;
                    float *c = C + r0 * ldc + n0;
                    const int rows = M - r0 < NN8_ROWS ? (int)(M - r0) : NN8_ROWS;
/* constant row counts and `full`: unrolled tiles, plain loads where the panel is whole */
#define NN8_TILE(R, F) nn_tile8(a, lda, b, ldb, c, ldc, bias_p, first, R, kn, F, mask)
#define NN8_ROWS_OF(F)                                                                                                 \
    switch (rows) {                                                                                                    \
    case 6: NN8_TILE(6, F); break;                                                                                     \
    case 5: NN8_TILE(5, F); break;                                                                                     \
    case 4: NN8_TILE(4, F); break;                                                                                     \
    case 3: NN8_TILE(3, F); break;                                                                                     \
    case 2: NN8_TILE(2, F); break;                                                                                     \
    default: NN8_TILE(1, F); break;                                                                                    \
    }
                    if (n0 + NN8_COLS <= N) {
                        NN8_ROWS_OF(1)
                    } else {
                        NN8_ROWS_OF(0)
                    }
#undef NN8_ROWS_OF
#undef NN8_TILE
                }
            }
        }
    }
}

#endif

/* nt_tile on 8 lanes: R rows of W (at most 12) against NB vectors (8 rows of x each) of the packed x^T. */
static inline __attribute__((always_inline)) void nt_tile8(const float *W, long ldw, const float *packed, int NB,
                                                           int R, long K, float *C, long ldc, const float *bias,
                                                           int mode, long n0, long M) {
    __m256 acc[12][2];
    for (int i = 0; i < R; i++)
        for (int j = 0; j < NB; j++) acc[i][j] = _mm256_setzero_ps();
    for (long k = 0; k < K; k++) {
        __m256 xv[2];
        for (int j = 0; j < NB; j++) xv[j] = _mm256_load_ps(packed + (k * NB + j) * 8);
        for (int i = 0; i < R; i++) {
            const __m256 w = _mm256_broadcast_ss(W + i * ldw + k);
            for (int j = 0; j < NB; j++) acc[i][j] = _mm256_fmadd_ps(w, xv[j], acc[i][j]);
        }
    }
    float out[12][16] __attribute__((aligned(32)));
    for (int i = 0; i < R; i++)
        for (int j = 0; j < NB; j++) _mm256_store_ps(out[i] + 8 * j, acc[i][j]);
    for (long r = 0; r < M; r++) {
        float *c = C + r * ldc + n0;
        for (int i = 0; i < R; i++) c[i] = (mode == 1 ? c[i] : (mode == 2 ? bias[n0 + i] : 0.0f)) + out[i][r];
    }
}

/* r[j] <- column j of the 8 x 8 matrix whose rows are r[0..7]. */
static inline __attribute__((always_inline)) void transpose8(__m256 r[8]) {
    __m256 t[8], u[8];
    for (int i = 0; i < 4; i++) {
        t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 2; i++) {
        u[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
        u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
        u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
        u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
    }
    for (int j = 0; j < 4; j++) {
        r[j] = _mm256_permute2f128_ps(u[j], u[4 + j], 0x20);
        r[4 + j] = _mm256_permute2f128_ps(u[j], u[4 + j], 0x31);
    }
}

/* dst[k * bw + r] = X[r, k] for k in k0 .. k0+kn-1 (kn <= 8) and r < m, 0 for m <= r < bw. */
static inline void nt_pack8(const float *X, long ldx, long m, long k0, long kn, long bw, float *dst) {
    const __m256i cols = lanes_left(kn);
    for (long g = 0; g < bw; g += 8) {
        __m256 r[8];
        for (int i = 0; i < 8; i++)
            r[i] = g + i < m ? load8(X + (g + i) * ldx + k0, kn == 8, cols) : _mm256_setzero_ps();
        transpose8(r);
        for (long j = 0; j < kn; j++) _mm256_store_ps(dst + (k0 + j) * bw + g, r[j]);
    }
}

/* nt_part on 8 lanes: x in blocks of 16 rows (the last of at most 8 rows, 8 wide), each packed as
 * K x 16 floats; tiles of 12 rows of W, multiplied by every block while in cache (a block of 16
 * rows as two tiles of 6: 12 accumulators each). */
static void nt_part8(const float *X, long ldx, const float *W, long ldw, float *C, long ldc, const float *bias, long M,
                     long N, long K, int mode, float *packed) {
    const long blocks = (M + 15) / 16, tiles = (N + 11) / 12;
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (long k0 = 0; k0 < K; k0 += 8)
            for (long b = 0; b < blocks; b++) {
                const long m = M - 16 * b < 16 ? M - 16 * b : 16;
                nt_pack8(X + 16 * b * ldx, ldx, m, k0, K - k0 < 8 ? K - k0 : 8, m <= 8 ? 8 : 16, packed + b * K * 16);
            }
#pragma omp for schedule(static)
        for (long t = 0; t < tiles; t++) {
            const long n0 = t * 12, rows = N - n0 < 12 ? N - n0 : 12;
            const float *w = W + n0 * ldw;
            for (long b = 0; b < blocks; b++) {
                const long m = M - 16 * b < 16 ? M - 16 * b : 16;
                const float *xb = packed + b * K * 16;
                float *c = C + 16 * b * ldc;
                if (rows == 12 && m <= 8) nt_tile8(w, ldw, xb, 1, 12, K, c, ldc, bias, mode, n0, m);
                else if (rows == 12) {
                    nt_tile8(w, ldw, xb, 2, 6, K, c, ldc, bias, mode, n0, m);
                    nt_tile8(w + 6 * ldw, ldw, xb, 2, 6, K, c, ldc, bias, mode, n0 + 6, m);
                } else /* the last, partial tile: one row of W at a time */
                    for (long i = 0; i < rows; i++) {
                        if (m <= 8) nt_tile8(w + i * ldw, ldw, xb, 1, 1, K, c, ldc, bias, mode, n0 + i, m);
                        else nt_tile8(w + i * ldw, ldw, xb, 2, 1, K, c, ldc, bias, mode, n0 + i, m);
                    }
            }
        }
    }
}
#endif

/* C (M, N) (+)= A (M, K) . B (K, N), for the loop's backward (B: W_z or W_r, rows of K). Each
 * thread takes a run of 64-column panels of B; block by block of 128 rows of B, it multiplies every
 * tile of 6 rows of A by each of its panels, reading B where it lies: the block of a panel (32 KB)
 * is read from memory by the first tile and from cache by the others. It used to copy each block
 * into a packed buffer first; without that copy a training step at the paper's sizes took 12 ms
 * less (432 against 445 ms, the same gradients bit for bit), and W_r's product at 4-32 rows
 * 1.0-2.2x less time (RESULTS.md, eighteenth session). Returns 0, -1 where not built (neither AVX-512 nor AVX2). */
int capattn_matmul_nn(const float *A, long lda, const float *B, long ldb, float *C, long ldc, const float *bias,
                      long M, long N, long K, int mode) {
#if defined(__AVX512F__)
    const long panels = (N + NN_COLS - 1) / NN_COLS;
#pragma omp parallel
    {
        const int t = omp_get_thread_num(), threads = omp_get_num_threads();
        const long p0 = panels * t / threads, p1 = panels * (t + 1) / threads;
        for (long k0 = 0; k0 < K; k0 += NN_DEPTH) {
            const long kn = K - k0 < NN_DEPTH ? K - k0 : NN_DEPTH;
            const int first = k0 == 0 ? mode : 1; /* later blocks add to C */
            for (long p = p0; p < p1; p++) {
                const long n0 = p * NN_COLS;
                __mmask16 mask[NN_VECS];
                for (int j = 0; j < NN_VECS; j++) mask[j] = columns_left(N - n0 - 16 * j);
                const float *b = B + k0 * ldb + n0, *bias_p = bias ? bias + n0 : NULL;
                for (long r0 = 0; r0 < M; r0 += NN_ROWS) {
                    const float *a = A + r0 * lda + k0;
                    float *c = C + r0 * ldc + n0;
                    switch (M - r0 < NN_ROWS ? M - r0 : NN_ROWS) { /* constant row counts: unrolled tiles */
                    case 6: nn_tile(a, lda, b, ldb, c, ldc, bias_p, first, 6, kn, mask); break;
                    case 5: nn_tile(a, lda, b, ldb, c, ldc, bias_p, first, 5, kn, mask); break;
                    case 4: nn_tile(a, lda, b, ldb, c, ldc, bias_p, first, 4, kn, mask); break;
                    case 3: nn_tile(a, lda, b, ldb, c, ldc, bias_p, first, 3, kn, mask); break;
                    case 2: nn_tile(a, lda, b, ldb, c, ldc, bias_p, first, 2, kn, mask); break;
                    default: nn_tile(a, lda, b, ldb, c, ldc, bias_p, first, 1, kn, mask); break;
                    }
                }
            }
        }
    }
    return 0;
#elif CAPATTN_AVX2
    matmul_nn8(A, lda, B, ldb, C, ldc, bias, M, N, K, mode);
    return 0;
#else
    (void)A, (void)lda, (void)B, (void)ldb, (void)C, (void)ldc, (void)bias, (void)M, (void)N, (void)K, (void)mode;
    return -1;
#endif
}

#if defined(__AVX512F__)
/* C[:M, n0:n0+R] (+)= (W[:R] . X^T)^T over all of K: R rows of W broadcast against NB vectors of the
 * packed X^T (16*NB rows of X, zero-padded), R*NB accumulators; then written out transposed. */
static inline __attribute__((always_inline)) void nt_tile(const float *W, long ldw, const float *packed, int NB,
                                                          int R, long K, float *C, long ldc, const float *bias,
                                                          int mode, long n0, long M) {
    __m512 acc[12][4];
    for (int i = 0; i < R; i++)
        for (int j = 0; j < NB; j++) acc[i][j] = _mm512_setzero_ps();
    for (long k = 0; k < K; k++) {
        __m512 xv[4];
        for (int j = 0; j < NB; j++) xv[j] = _mm512_load_ps(packed + (k * NB + j) * 16);
        for (int i = 0; i < R; i++) {
            __m512 w = _mm512_set1_ps(W[i * ldw + k]);
            for (int j = 0; j < NB; j++) acc[i][j] = _mm512_fmadd_ps(w, xv[j], acc[i][j]);
        }
    }
    float out[12][64] __attribute__((aligned(64)));
    for (int i = 0; i < R; i++)
        for (int j = 0; j < NB; j++) _mm512_store_ps(out[i] + 16 * j, acc[i][j]);
    for (long r = 0; r < M; r++) {
        float *c = C + r * ldc + n0;
        for (int i = 0; i < R; i++) c[i] = (mode == 1 ? c[i] : (mode == 2 ? bias[n0 + i] : 0.0f)) + out[i][r];
    }
}
#endif

#if defined(__AVX512F__)
/* r[j] <- column j of the 16 x 16 matrix whose rows are r[0..15] (lane i: row i). */
static inline __attribute__((always_inline)) void transpose16(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) {
        const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
        const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
        r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
        r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
        r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
        r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
    }
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 4; j++) {
            t[8 * i + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + 4 + j], 0x88);
            t[8 * i + 4 + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + 4 + j], 0xdd);
        }
    for (int j = 0; j < 8; j++) {
        r[j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0x88);
        r[8 + j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0xdd);
    }
}

/* dst[k * bw + r] = X[r, k] for k in k0 .. k0+kn-1 (kn <= 16) and r < m, 0 for m <= r < bw: 16 x 16
 * blocks transposed in registers. With the scalar copy it replaces, products where X has 2,048
 * columns and W only 512 rows ran below MKL (L_z at 100-500 rows 0.85x its speed; the keys'
 * projection of 100 images level); with this, 0.9-1.3x and 1.1-1.4x. */
static inline void nt_pack16(const float *X, long ldx, long m, long k0, long kn, long bw, float *dst) {
    const __mmask16 cols = columns_left(kn);
    for (long g = 0; g < bw; g += 16) {
        __m512 r[16];
        for (int i = 0; i < 16; i++)
            r[i] = g + i < m ? _mm512_maskz_loadu_ps(cols, X + (g + i) * ldx + k0) : _mm512_setzero_ps();
        transpose16(r);
        for (long j = 0; j < kn; j++) _mm512_store_ps(dst + (k0 + j) * bw + g, r[j]);
    }
}

/* C[:M] (+)= X[:M] . W^T for one part of X's rows, with `packed` room for them (see below). */
static void nt_part(const float *X, long ldx, const float *W, long ldw, float *C, long ldc, const float *bias, long M,
                    long N, long K, int mode, float *packed) {
    const int NB = M <= 16 ? 1 : (M <= 32 || M > 64 ? 2 : 4), R = NB == 4 ? 6 : 12;
    const long width = 16 * NB, block = M > 64 ? 32 : M, blocks = (M + block - 1) / block;
    const long tiles = (N + R - 1) / R;
/* a block's width: 16 rows of X for a last block of at most 16 (the 4 rows left of 100 took as long
 * as 32 before: the output layer at 100 rows, 10,000 x 512, ran at 148 GFLOP/s, 165 with this) */
#define NT_NB(m) (NB == 2 && (m) <= 16 ? 1 : NB)
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (long k0 = 0; k0 < K; k0 += 16)
            for (long b = 0; b < blocks; b++) {
                const long r0 = b * block, m = M - r0 < block ? M - r0 : block;
                nt_pack16(X + r0 * ldx, ldx, m, k0, K - k0 < 16 ? K - k0 : 16, 16 * NT_NB(m), packed + b * K * width);
            }
#pragma omp for schedule(static)
        for (long t = 0; t < tiles; t++) {
            const long n0 = t * R, rows = N - n0 < R ? N - n0 : R;
            const float *w = W + n0 * ldw;
            for (long b = 0; b < blocks; b++) {
                const long r0 = b * block, m = M - r0 < block ? M - r0 : block;
                const int nb = NT_NB(m);
                const float *xb = packed + b * K * width;
                float *c = C + r0 * ldc;
                if (rows == R && nb == 1) nt_tile(w, ldw, xb, 1, 12, K, c, ldc, bias, mode, n0, m);
                else if (rows == R && nb == 2) nt_tile(w, ldw, xb, 2, 12, K, c, ldc, bias, mode, n0, m);
                else if (rows == R) nt_tile(w, ldw, xb, 4, 6, K, c, ldc, bias, mode, n0, m);
                else /* the last, partial tile: one row of W at a time */
                    for (long i = 0; i < rows; i++) {
                        if (nb == 1) nt_tile(w + i * ldw, ldw, xb, 1, 1, K, c, ldc, bias, mode, n0 + i, m);
                        else if (nb == 2) nt_tile(w + i * ldw, ldw, xb, 2, 1, K, c, ldc, bias, mode, n0 + i, m);
                        else nt_tile(w + i * ldw, ldw, xb, 4, 1, K, c, ldc, bias, mode, n0 + i, m);
                    }
            }
        }
    }
#undef NT_NB
}
#endif

#define NT_PART_FLOATS (1L << 20) /* 4 MB of packed X */

/* How many rows of X go through in one part (see capattn_matmul_nt), parts rounded to `block` rows. */
static inline long nt_part_rows(long M, long K, long block) {
    const long part = K > 1024 ? 64 : NT_PART_FLOATS / K / block * block;
    return M <= 64 ? M : (part < 64 ? 64 : (part > M ? M : part));
}

#if CAPATTN_LANES8
/* x W^T in the 8-lane kernels: parts as in capattn_matmul_nt, each packed in blocks of 16 rows. */
static int matmul_nt8(const float *X, long ldx, const float *W, long ldw, float *C, long ldc, const float *bias,
                      long M, long N, long K, int mode) {
    const long part = nt_part_rows(M, K, 16);
    float *packed = aligned_alloc(64, sizeof(float) * (size_t)(K * ((part + 15) / 16 * 16)));
    if (!packed) return 1;
    for (long r0 = 0; r0 < M; r0 += part) {
        const long m = M - r0 < part ? M - r0 : part;
        nt_part8(X + r0 * ldx, ldx, W, ldw, C + r0 * ldc, ldc, bias, m, N, K, mode, packed);
    }
    free(packed);
    return 0;
}
#endif

/* Up to this many rows of x, AVX-512 builds too take the 8-lane kernel: on the AMD EPYC (Zen 4, which
 * runs a 16-lane FMA as two 8-lane halves) its tiles of 12 rows of W by 8 rows of x, or 6 by 16, wasted
 * fewer lanes (RESULTS.md, nineteenth session). */
#define NT8_MAX_ROWS 16

/* C (M, N) (+)= X (M, K) . W^T, W (N, K), for the loop's forward (W: W_z or W_r, one row per output
 * column) and decoding's step. Computed as C^T = W X^T so that the weight is the broadcast operand,
 * read once row by row, and the rows of X are the packed one (K x 16, 32 or 64, shared by the
 * threads): tiles of 12 rows of W by 16 or 32 rows of X (6 by 64 for 33-64 rows). Past 64 rows, X
 * is packed in blocks of 32 rows (the last of at most 16 rows, 16 wide) and each tile of W is
 * multiplied by every block while it is in cache. X goes through in parts, W read once per part:
 * of 64 rows (one block) where X has more than 1,024 columns, so that its packing (512 KB) stays in
 * L2 (with all of X packed at once, W_z ran at 104-130 GFLOP/s past 64 rows, level with MKL; so, at
 * 145-202); else of up to 4 MB of packed X (19,600 rows of 512, all packed at once, ran at 97-114
 * GFLOP/s; in parts of 2,048 rows, at 164-203). That is the AVX-512 code past NT8_MAX_ROWS rows;
 * below, and in AVX2 builds, the 8-lane one (matmul_nt8). Returns 0, 1 where memory ran out, -1
 * where not built (neither AVX-512 nor AVX2). */
int capattn_matmul_nt(const float *X, long ldx, const float *W, long ldw, float *C, long ldc, const float *bias,
                      long M, long N, long K, int mode) {
#if defined(__AVX512F__)
#if CAPATTN_LANES8
    if (M <= NT8_MAX_ROWS) return matmul_nt8(X, ldx, W, ldw, C, ldc, bias, M, N, K, mode);
#endif
    const long part = nt_part_rows(M, K, 32);
    const long room = part > 64 ? (part + 31) / 32 * 32 : (part <= 16 ? 16 : (part <= 32 ? 32 : 64));
    float *packed = aligned_alloc(64, sizeof(float) * (size_t)(K * room));
    if (!packed) return 1;
    for (long r0 = 0; r0 < M; r0 += part) {
        const long m = M - r0 < part ? M - r0 : part;
        nt_part(X + r0 * ldx, ldx, W, ldw, C + r0 * ldc, ldc, bias, m, N, K, mode, packed);
    }
    free(packed);
    return 0;
#elif CAPATTN_AVX2
    return matmul_nt8(X, ldx, W, ldw, C, ldc, bias, M, N, K, mode);
#else
    (void)X, (void)ldx, (void)W, (void)ldw, (void)C, (void)ldc, (void)bias, (void)M, (void)N, (void)K, (void)mode;
    return -1;
#endif
}
