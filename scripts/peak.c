/*
 * peak: an arithmetic-throughput probe, the compute counterpart of membw. Runs long loops of
 * independent multiply-add chains (many accumulators, so latency never limits) on every
 * OpenMP thread, for the instruction sets this build has, and prints multiply-adds per
 * second (G MAC/s) for float32 FMA and for int8 dot products:
 *
 *   cc -O3 -march=native -fopenmp -o build/peak scripts/peak.c   (-O3: the chain loops must be
 *                                                                  unrolled into registers)
 *   build/peak [PASSES (default 5)]   ->   "peak f32 avx512-fma: 265.3 G MAC/s (...)"
 *
 * A prompt token needs the layers' matrix multiply-adds, layers x (4 hidden^2 + 2 hidden x
 * ffn) = 2.52 G for Phi-2, so prompt tok/s x 2.52 / this figure is the share of the
 * machine's arithmetic the prompt uses (scripts/bench.sh computes it from the header).
 * Thread count: OMP_NUM_THREADS, as for phi2 -t. The sums are printed so the compiler
 * cannot drop the work.
 */
#define _POSIX_C_SOURCE 200809L
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#if defined(__aarch64__) && defined(__ARM_NEON)
#include <arm_neon.h>
#endif

enum { CHAINS = 12, STEPS = 1 << 22 };  // 12 accumulators: > FMA latency (4) x pipes (2-3)

/* The 256-bit x86 loops are written in assembly, the 12 accumulators in ymm0..11: with only
 * 16 vector registers gcc 12 kept some of them on the stack or copied them every step, and
 * its figures came out 25-45% low (-march=alderlake, 2 Zen 5 cores: AVX-VNNI 311 instead of
 * 550 G MAC/s; clang's code of the same C gave 550). RUN_CHAINS_ASM loads acc[0..11] into
 * ymm0..11 and the two operands into ymm12, ymm13, runs STEP(r) for each accumulator r,
 * STEPS times, and stores the accumulators back. */
#if defined(__x86_64__) && defined(__GNUC__)
#define FOR_ACC(STEP) STEP(0) STEP(1) STEP(2) STEP(3) STEP(4) STEP(5) STEP(6) STEP(7) STEP(8) STEP(9) STEP(10) STEP(11)
#define LOAD_ACC(r) "vmovdqu " #r "*32(%[acc]), %%ymm" #r "\n"
#define STORE_ACC(r) "vmovdqu %%ymm" #r ", " #r "*32(%[acc])\n"
#define RUN_CHAINS_ASM(STEP, acc, first, second)                                                                   \
    do {                                                                                                     \
        long n_ = STEPS;                                                                                     \
        __asm__ volatile("vmovdqu %[x12], %%ymm12\n vmovdqu %[x13], %%ymm13\n" FOR_ACC(LOAD_ACC) "1:\n"      \
                         FOR_ACC(STEP) "dec %[n]\n jnz 1b\n" FOR_ACC(STORE_ACC)                               \
                         : [n] "+r"(n_)                                                                      \
                         : [acc] "r"(acc), [x12] "m"(first), [x13] "m"(second)                                    \
                         : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9",     \
                           "xmm10", "xmm11", "xmm12", "xmm13", "memory", "cc");                              \
    } while (0)
#define FMA_STEP(r) "vfmadd132ps %%ymm12, %%ymm13, %%ymm" #r "\n"                   /* acc = acc * a + b */
#define MADDUBS_STEP(r) "vpmaddubsw %%ymm12, %%ymm" #r ", %%ymm" #r "\n"            /* acc: bytes x b ... */ \
                        "vpmaddwd %%ymm13, %%ymm" #r ", %%ymm" #r "\n"              /* ... pairs x ones */
#define VNNI256_STEP(r) "%{vex%} vpdpbusd %%ymm13, %%ymm12, %%ymm" #r "\n"            /* acc += a . b */
#endif

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* One thread's work: STEPS steps of CHAINS independent multiply-adds on vectors; returns
 * the multiply-adds done (lanes x steps x chains) and a value depending on every result. */
typedef double (*Kernel)(double *checksum);

#if defined(__AVX512F__)
static double f32_avx512(double *checksum) {
    __m512 acc[CHAINS];
    const __m512 a = _mm512_set1_ps(0.999f), b = _mm512_set1_ps(1e-3f);
    for (int c = 0; c < CHAINS; c++) acc[c] = _mm512_set1_ps((float)c);
    for (long s = 0; s < STEPS; s++)
        for (int c = 0; c < CHAINS; c++) acc[c] = _mm512_fmadd_ps(acc[c], a, b);
    float sum = 0;
    for (int c = 0; c < CHAINS; c++) sum += _mm512_reduce_add_ps(acc[c]);
    *checksum += sum;
    return 16.0 * STEPS * CHAINS;
}
#endif
#if defined(__AVX2__) && defined(__FMA__)
static double f32_avx2(double *checksum) {
    __m256 acc[CHAINS];
    const __m256 a = _mm256_set1_ps(0.999f), b = _mm256_set1_ps(1e-3f);
    for (int c = 0; c < CHAINS; c++) acc[c] = _mm256_set1_ps((float)c);
    RUN_CHAINS_ASM(FMA_STEP, acc, a, b);
    float lanes[8], sum = 0;
    for (int c = 0; c < CHAINS; c++) {
        _mm256_storeu_ps(lanes, acc[c]);
        for (int i = 0; i < 8; i++) sum += lanes[i];
    }
    *checksum += sum;
    return 8.0 * STEPS * CHAINS;
}
/* vpmaddubsw + vpmaddwd, 32 byte products per step. The chain runs through both (the next
 * step multiplies the previous result's bytes), or the compiler would hoist the product of
 * two constants out of the loop. */
static double int8_avx2(double *checksum) {
    __m256i acc[CHAINS];
    const __m256i b = _mm256_set1_epi8(-2), ones = _mm256_set1_epi16(1);
    for (int c = 0; c < CHAINS; c++) acc[c] = _mm256_set1_epi32(c);
    RUN_CHAINS_ASM(MADDUBS_STEP, acc, b, ones);
    int32_t lanes[8];
    long long sum = 0;
    for (int c = 0; c < CHAINS; c++) {
        _mm256_storeu_si256((__m256i *)lanes, acc[c]);
        for (int i = 0; i < 8; i++) sum += lanes[i];
    }
    *checksum += (double)sum;
    return 32.0 * STEPS * CHAINS;
}
#endif
#if defined(__AVXVNNI__)
static double int8_avx_vnni(double *checksum) {  // 256-bit vpdpbusd: 32 byte products per step
    __m256i acc[CHAINS];
    const __m256i a = _mm256_set1_epi8(3), b = _mm256_set1_epi8(-2);
    for (int c = 0; c < CHAINS; c++) acc[c] = _mm256_set1_epi32(c);
    RUN_CHAINS_ASM(VNNI256_STEP, acc, a, b);
    int32_t lanes[8];
    long long sum = 0;
    for (int c = 0; c < CHAINS; c++) {
        _mm256_storeu_si256((__m256i *)lanes, acc[c]);
        for (int i = 0; i < 8; i++) sum += lanes[i];
    }
    *checksum += (double)sum;
    return 32.0 * STEPS * CHAINS;
}
#endif
#if defined(__AVX512VNNI__)
static double int8_avx512_vnni(double *checksum) {  // 512-bit vpdpbusd: 64 byte products per step
    __m512i acc[CHAINS];
    const __m512i a = _mm512_set1_epi8(3), b = _mm512_set1_epi8(-2);
    for (int c = 0; c < CHAINS; c++) acc[c] = _mm512_set1_epi32(c);
    for (long s = 0; s < STEPS; s++)
        for (int c = 0; c < CHAINS; c++) acc[c] = _mm512_dpbusd_epi32(acc[c], a, b);
    long long sum = 0;
    for (int c = 0; c < CHAINS; c++) sum += _mm512_reduce_add_epi32(acc[c]);
    *checksum += (double)sum;
    return 64.0 * STEPS * CHAINS;
}
#endif
#if defined(__aarch64__) && defined(__ARM_NEON)
static double f32_neon(double *checksum) {
    float32x4_t acc[CHAINS];
    const float32x4_t a = vdupq_n_f32(0.999f), b = vdupq_n_f32(1e-3f);
    for (int c = 0; c < CHAINS; c++) acc[c] = vdupq_n_f32((float)c);
    for (long s = 0; s < STEPS; s++)
        for (int c = 0; c < CHAINS; c++) acc[c] = vfmaq_f32(b, acc[c], a);
    float sum = 0;
    for (int c = 0; c < CHAINS; c++) sum += vaddvq_f32(acc[c]);
    *checksum += sum;
    return 4.0 * STEPS * CHAINS;
}
#if defined(__ARM_FEATURE_DOTPROD)
static double int8_sdot(double *checksum) {  // sdot: 16 byte products per step
    int32x4_t acc[CHAINS];
    const int8x16_t a = vdupq_n_s8(3), b = vdupq_n_s8(-2);
    for (int c = 0; c < CHAINS; c++) acc[c] = vdupq_n_s32(c);
    for (long s = 0; s < STEPS; s++)
        for (int c = 0; c < CHAINS; c++) acc[c] = vdotq_s32(acc[c], a, b);
    long long sum = 0;
    for (int c = 0; c < CHAINS; c++) sum += vaddvq_s32(acc[c]);
    *checksum += (double)sum;
    return 16.0 * STEPS * CHAINS;
}
#endif
#endif

static const struct {
    const char *name;
    Kernel run;
} KERNELS[] = {
#if defined(__AVX512F__)
    {"f32 avx512-fma", f32_avx512},
#endif
#if defined(__AVX2__) && defined(__FMA__)
    {"f32 avx2-fma", f32_avx2},
    {"int8 avx2 (vpmaddubsw)", int8_avx2},
#endif
#if defined(__AVXVNNI__)
    {"int8 avx-vnni (256-bit)", int8_avx_vnni},
#endif
#if defined(__AVX512VNNI__)
    {"int8 avx512-vnni", int8_avx512_vnni},
#endif
#if defined(__aarch64__) && defined(__ARM_NEON)
    {"f32 neon-fma", f32_neon},
#if defined(__ARM_FEATURE_DOTPROD)
    {"int8 neon-sdot", int8_sdot},
#endif
#endif
};

int main(int argc, char **argv) {
    const int passes = argc > 1 ? atoi(argv[1]) : 5;
    if (passes < 1 || passes > 100) {
        fprintf(stderr, "usage: peak [PASSES]\n");
        return 2;
    }
    const int n_kernels = (int)(sizeof(KERNELS) / sizeof(*KERNELS));
    if (n_kernels == 0) {
        printf("peak: this build has no vector kernels to probe (build with -march=native)\n");
        return 0;
    }
    int threads = 1;
#ifdef _OPENMP
    threads = omp_get_max_threads();
#endif
    double checksum = 0;
    for (int k = 0; k < n_kernels; k++) {
        double rates[100];
        for (int p = 0; p < passes; p++) {
            double macs = 0, sums = 0;
            const double t0 = now();
#pragma omp parallel reduction(+ : macs, sums)
            macs += KERNELS[k].run(&sums);
            rates[p] = macs / (now() - t0) * 1e-9;
            checksum += sums;
        }
        qsort(rates, (size_t)passes, sizeof(double), cmp_double);
        printf("peak %s: %.1f G MAC/s (median of %d passes, best %.1f, %d threads)\n", KERNELS[k].name,
               rates[passes / 2], passes, rates[passes - 1], threads);
    }
    printf("peak: checksum %g\n", checksum != 0 ? 1.0 : 0.0);
    return 0;
}
