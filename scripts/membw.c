/*
 * membw: a STREAM-style read-bandwidth probe. Sums a buffer far larger than the last-level
 * cache with all OpenMP threads (each reads its own contiguous part, as the engine's
 * kernels do) and prints the median of several passes.
 *
 *   cc -O2 -march=native -fopenmp -o build/membw scripts/membw.c
 *   build/membw [MB (default 300)] [PASSES (default 7)]   ->   "membw: 21.3 GB/s read (...)"
 *
 * The buffer is written once first (so its pages exist). The sum is printed so the
 * compiler cannot drop the reads. Thread count: OMP_NUM_THREADS, as for phi2 -t.
 */
#define _POSIX_C_SOURCE 200809L
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#ifdef _OPENMP
#include <omp.h>
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

int main(int argc, char **argv) {
    const size_t mb = argc > 1 ? (size_t)atol(argv[1]) : 300;
    int passes = argc > 2 ? atoi(argv[2]) : 7;
    if (mb == 0 || passes < 1 || passes > 100) {
        fprintf(stderr, "usage: membw [MB] [PASSES]\n");
        return 2;
    }
    const size_t n = mb * 1000 * 1000 / sizeof(uint64_t);
    uint64_t *buf = NULL;
    if (posix_memalign((void **)&buf, 4096, n * sizeof(uint64_t)) != 0) {
        fprintf(stderr, "membw: out of memory\n");
        return 1;
    }
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) buf[i] = i;  // first touch by the thread that reads it

    double *gbs = malloc(sizeof(double) * (size_t)passes);
    uint64_t total = 0;
    for (int p = 0; p < passes; p++) {
        uint64_t sum = 0;
        double t0 = now();
        // 4 independent accumulators per thread: the adds never limit the loads
#pragma omp parallel reduction(+ : sum)
        {
            uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp for schedule(static) nowait
            for (size_t i = 0; i < n / 4 * 4; i += 4) {
                s0 += buf[i];
                s1 += buf[i + 1];
                s2 += buf[i + 2];
                s3 += buf[i + 3];
            }
            sum += s0 + s1 + s2 + s3;
        }
        double t = now() - t0;
        gbs[p] = (double)(n / 4 * 4) * sizeof(uint64_t) / t * 1e-9;
        total += sum;
    }
    qsort(gbs, (size_t)passes, sizeof(double), cmp_double);
    int threads = 1;
#ifdef _OPENMP
    threads = omp_get_max_threads();
#endif
    printf("membw: %.1f GB/s read (median of %d passes over %zu MB, best %.1f, %d threads, checksum %llu)\n",
           gbs[passes / 2], passes, mb, gbs[passes - 1], threads, (unsigned long long)(total & 0xffff));
    free(gbs);
    free(buf);
    return 0;
}
