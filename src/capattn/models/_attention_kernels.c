/* Fused CPU kernels for soft attention (capattn/models/native.py builds and loads this file).
 *
 * PyTorch computes e = w . tanh(keys + q) as three passes over a (B, K, L, A) tensor: the sum,
 * the tanh, and a matmul with w, and its backward as five more. Here each (location, hypothesis)
 * pair is one pass over A values held in registers, and the backward of a training step rebuilds
 * tanh and adds its gradients in that same pass. Written by hand because no library fuses an
 * additive-attention energy on a CPU (oneDNN and MKL fuse only matmul epilogues).
 *
 * All tensors are contiguous float32, batch-first, row-major. Threads: OpenMP over images, in
 * the OpenMP runtime torch already loaded (libgomp.so.1), so torch.set_num_threads applies.
 * tanhf is vectorised through glibc's libmvec (declared SIMD below, without -ffast-math, so
 * NaN and infinity propagate as in PyTorch).
 */
#include <math.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

__attribute__((simd("notinbranch"))) float tanhf(float);

/* energy[b, k, l] = sum_a w[a] tanh(keys[b, l, a] + q[b, k, a]) + bias
 * keys (B, L, A), q (B, K, A), w (A), energy (B, K, L). Each key row is read once for its K queries. */
void capattn_energy(const float *keys, const float *q, const float *w, float bias, float *energy,
                    long B, long K, long L, long A) {
#pragma omp parallel for schedule(static)
    for (long b = 0; b < B; b++) {
        for (long l = 0; l < L; l++) {
            const float *kr = keys + (b * L + l) * A;
            for (long k = 0; k < K; k++) {
                const float *qr = q + (b * K + k) * A;
                float s = 0.f;
#pragma omp simd reduction(+ : s)
                for (long a = 0; a < A; a++) s += w[a] * tanhf(kr[a] + qr[a]);
                energy[(b * K + k) * L + l] = s + bias;
            }
        }
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
                float d = d_energy[b * L + l];
#pragma omp simd
                for (long a = 0; a < A; a++) {
                    float s = tanhf(kr[a] + qr[a]);
                    float g = d * (1.f - s * s) * w[a];
                    dw[a] += d * s;
                    ar[a] += g;
                    dq[a] += g;
                }
            }
        }
    }
    memset(d_w, 0, sizeof(float) * (size_t)A);
    for (int t = 0; t < threads; t++)
        for (long a = 0; a < A; a++) d_w[a] += partial[(size_t)t * (size_t)A + a];
    free(partial);
    return 0;
}

/* context[b, k, :] = sum_l alpha[b, k, l] grid[b, l, :]
 * grid (B, L, D), alpha (B, K, L), context (B, K, D). Each grid row is read once for its K
 * hypotheses, while their K context rows stay in cache. */
void capattn_context(const float *grid, const float *alpha, float *context, long B, long K, long L, long D) {
#pragma omp parallel for schedule(static)
    for (long b = 0; b < B; b++) {
        float *c = context + b * K * D;
        memset(c, 0, sizeof(float) * (size_t)(K * D));
        for (long l = 0; l < L; l++) {
            const float *g = grid + (b * L + l) * D;
            for (long k = 0; k < K; k++) {
                float a = alpha[(b * K + k) * L + l];
                float *ck = c + k * D;
#pragma omp simd
                for (long d = 0; d < D; d++) ck[d] += a * g[d];
            }
        }
    }
}
