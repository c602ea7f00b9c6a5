/*
 * Kernel tests: every fast kernel compiled into this build against its scalar twin.
 *
 *   build/test_kernels            run the checks; last line "test_kernels: N checks, N failed"
 *   build/test_kernels --pool     only the thread pool's (Appendix G), for make test-tsan
 *   build/test_kernels --bench    time the kernels on Phi-2's full-size shapes (or
 *                                 BENCH_SHAPE), and decode attention with an f32 and an f16
 *                                 KV cache (BENCH_DEPTH), batches of 64 tokens (BENCH_TOKENS)
 *
 * Quantization must be bit-identical to the scalar version. The int8 products have exact
 * int32 group sums, so they may differ from the scalar kernel only by float summation order
 * (the AMX kernel not at all). f32 products are checked against a double-precision sum with
 * a tolerance relative to sum |w x|. Matrices and activations are placed flush against an
 * unreadable page, so a kernel reading one byte past the end crashes (ASan does not see
 * reads made by SIMD intrinsics; the guard page does), and sizes are chosen to be awkward:
 * rows and tokens that are not multiples of any tile, columns with tails.
 */
#define PHI2_NO_MAIN
#pragma GCC diagnostic ignored "-Wunused-function"  // the engine's parts this test does not use
#include "../phi2.c"

#include <float.h>
#include <sys/mman.h>
#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#endif

static int g_checks, g_failed;

static void check(int ok, const char *fmt, ...) {
    g_checks++;
    if (ok) return;
    g_failed++;
    va_list ap;
    va_start(ap, fmt);
    printf("FAIL ");
    vprintf(fmt, ap);
    printf("\n");
    va_end(ap);
}

/* ---- memory flush against a guard page -------------------------------------------------- */

typedef struct {
    void *map;
    size_t map_size;
} Guarded;

#define MAX_GUARDED 64
static Guarded g_guarded[MAX_GUARDED];
static int g_n_guarded;

/* n bytes ending exactly where an unreadable page begins. */
static void *guarded_alloc(size_t n) {
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    const size_t data_pages = (n + page - 1) / page;
    const size_t size = (data_pages + 1) * page;
    int fd = open("/dev/zero", O_RDWR);  // (MAP_ANONYMOUS is not POSIX)
    if (fd < 0) die("cannot open /dev/zero");
    unsigned char *map = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    close(fd);
    if (map == MAP_FAILED) die("mmap failed");
    if (mprotect(map + data_pages * page, page, PROT_NONE) != 0) die("mprotect failed");
    if (g_n_guarded == MAX_GUARDED) die("too many guarded buffers");
    g_guarded[g_n_guarded++] = (Guarded){map, size};
    return map + data_pages * page - n;
}

static void guarded_free_all(void) {
    for (int i = 0; i < g_n_guarded; i++) munmap(g_guarded[i].map, g_guarded[i].map_size);
    g_n_guarded = 0;
}

/* ---- random data --------------------------------------------------------------------------- */

static uint64_t g_rng = 0x1234567887654321ULL;

static float frand(void) { return (float)(random_u32(&g_rng) >> 8) / 16777216.0f * 2.0f - 1.0f; }  // [-1, 1)

/* Activation-like values: mostly small, a few large outliers (as in Phi-2), some groups zero. */
static void fill_activations(float *x, size_t n, int with_zero_runs) {
    for (size_t i = 0; i < n; i++) {
        float v = frand();
        uint32_t u = random_u32(&g_rng);
        if (u % 97 == 0) v *= 300.0f;
        x[i] = v;
    }
    if (with_zero_runs && n >= 128)
        for (size_t i = 64; i < 128; i++) x[i] = 0.0f;  // a whole all-zero group: scale 0
}

/* q8 weights: random int8 including the extreme -128 (not produced by convert.py, but any
 * file might hold it and every kernel must then still compute the exact products). */
static void fill_q8_weights(int8_t *q, float *d, int rows, int cols, int group) {
    for (size_t i = 0; i < (size_t)rows * cols; i++) {
        uint32_t u = random_u32(&g_rng);
        q[i] = (int8_t)(u % 11 == 0 ? (u & 0x100 ? 127 : -128) : (int)(u % 255) - 127);
    }
    for (size_t i = 0; i < (size_t)rows * (cols / group); i++) d[i] = 0.01f * (1.0f + frand());
}

/* ---- quantization ---------------------------------------------------------------------------- */

typedef void (*QuantFn)(QuantizedRows *, const float *, int, int);

static void test_quantize_one(const char *name, QuantFn fn, int n_tokens, int cols) {
    const int group = Q8_GROUP;
    const size_t n = (size_t)n_tokens * cols, n_scales = n / group;
    float *x = guarded_alloc(n * sizeof(float));
    fill_activations(x, n, 1);
    // exact halfway cases: with a group max of 127 the scale is 1 and x * inv_d = x, so
    // k + 0.5 must round to even in both versions
    if (n >= 3 * (size_t)group) {
        x[2 * group] = 127.0f;
        for (int i = 1; i < group && i < 20; i++) x[2 * group + i] = (float)(i - 10) + 0.5f;
    }
    // groups of tiny values: max 1e-37 (1/d would overflow: all zeros, scale 0), with a zero
    // in it; max 1e-29 (above Q8_MIN_GROUP_MAX: quantized as usual)
    const int tiny_group = n >= 5 * (size_t)group ? 3 : -1;
    if (tiny_group > 0) {
        for (int i = 0; i < 2 * group; i++) x[3 * group + i] = (i < group ? 1e-37f : 1e-29f) * (float)(i % 7 - 3) / 4;
        x[3 * group] = 1e-37f, x[3 * group + 1] = 0.0f, x[4 * group] = -1e-29f;
    }
    QuantizedRows ref = {guarded_alloc(n), guarded_alloc(n_scales * sizeof(float)), NULL};
    QuantizedRows got = {guarded_alloc(n), guarded_alloc(n_scales * sizeof(float)), NULL};
    memset(got.q, 0x55, n);
    quantize_rows_q8_scalar(&ref, x, n_tokens, cols);
    fn(&got, x, n_tokens, cols);
    size_t bad_q = 0, bad_d = 0;
    for (size_t i = 0; i < n; i++) bad_q += ref.q[i] != got.q[i] || got.q[i] == -128;
    for (size_t i = 0; i < n_scales; i++) bad_d += memcmp(&ref.scale[i], &got.scale[i], sizeof(float)) != 0;
    check(bad_q == 0 && bad_d == 0, "%s tokens=%d cols=%d: %zu int8 and %zu scales differ (or int8 -128)", name,
          n_tokens, cols, bad_q, bad_d);
    if (tiny_group > 0) {
        size_t nonzero = 0;
        for (int i = 0; i < group; i++) nonzero += got.q[3 * group + i] != 0;
        check(got.scale[3] == 0.0f && nonzero == 0, "%s: a group of max 1e-37 gave scale %g and %zu nonzero int8",
              name, (double)got.scale[3], nonzero);
        check(got.scale[4] == 1e-29f / 127.0f && got.q[4 * group] == -127, "%s: a group of max 1e-29 gave scale %g, %d",
              name, (double)got.scale[4], got.q[4 * group]);
    }
    guarded_free_all();
}

static void test_quantize(void) {
    static const int tokens[] = {1, 2, 3, 17, 65};
    static const int colss[] = {64, 128, 192, 2560};
    int before = g_failed;
    for (size_t a = 0; a < sizeof(tokens) / sizeof(*tokens); a++)
        for (size_t b = 0; b < sizeof(colss) / sizeof(*colss); b++) {
            test_quantize_one("quantize_rows_q8", quantize_rows_q8, tokens[a], colss[b]);
#if PHI2_AVX512 || PHI2_AVX2 || PHI2_NEON
            test_quantize_one("quantize_rows_q8_vec", quantize_rows_q8_vec, tokens[a], colss[b]);
#endif
        }
    printf("%s quantization: bit-identical to the scalar version\n", g_failed == before ? "ok  " : "FAIL");
}

/* ---- f32 matmul ------------------------------------------------------------------------------ */

typedef void (*F32Fn)(float *, const float *, const Matrix *, const float *, int);

static double g_f32_worst;

static void test_f32_one(const char *name, F32Fn fn, int rows, int cols, int n_tokens) {
    float *w = guarded_alloc((size_t)rows * cols * sizeof(float));
    float *x = guarded_alloc((size_t)n_tokens * cols * sizeof(float));
    float *bias = guarded_alloc((size_t)rows * sizeof(float));
    float *out = guarded_alloc((size_t)n_tokens * rows * sizeof(float));
    for (size_t i = 0; i < (size_t)rows * cols; i++) w[i] = 0.05f * frand();
    fill_activations(x, (size_t)n_tokens * cols, 0);
    for (int i = 0; i < rows; i++) bias[i] = frand();
    for (size_t i = 0; i < (size_t)n_tokens * rows; i++) out[i] = NAN;  // every entry must be written
    Matrix W = {.rows = rows, .cols = cols, .w = w};
    fn(out, x, &W, bias, n_tokens);
    int bad = 0;
    double worst = 0.0;
    for (int t = 0; t < n_tokens && bad < 3; t++)
        for (int r = 0; r < rows; r++) {
            double exact = bias[r], mag = fabs(bias[r]);
            for (int c = 0; c < cols; c++) {
                double p = (double)w[(size_t)r * cols + c] * x[(size_t)t * cols + c];
                exact += p;
                mag += fabs(p);
            }
            double err = fabs(out[(size_t)t * rows + r] - exact) / (mag + 1e-30);
            if (!(err <= 1e-5)) {  // also catches NaN
                if (bad++ < 3)
                    check(0, "%s rows=%d cols=%d tokens=%d: out[%d][%d] = %.9g, exact %.9g (rel err %.2g)", name, rows,
                          cols, n_tokens, t, r, out[(size_t)t * rows + r], exact, err);
            }
            if (err > worst) worst = err;
        }
    if (!bad) check(1, "");
    if (worst > g_f32_worst) g_f32_worst = worst;
    guarded_free_all();
}

#if PHI2_AVX512 || PHI2_AVX2
static KernelScratch g_f32_panel_kern;  // matmul_f32_panels' scratch
#endif
#if PHI2_AVX512 || PHI2_AVX2
static void matmul_f32_panels_checked(float *out, const float *in, const Matrix *W, const float *bias, int n) {
    matmul_f32_panels(out, in, W, bias, n, &g_f32_panel_kern);
}
#endif

static void test_f32(void) {
    static const int rowss[] = {1, 3, 4, 5, 7, 17, 33, 130};
    static const int colss[] = {1, 7, 16, 17, 100, 2560, 4133};
    static const int tokens[] = {1, 2, 3, 5, 6, 7, 17, 64, 65};
    static const struct {
        const char *name;
        F32Fn fn;
    } kernels[] = {
        {"matmul_f32_scalar", matmul_f32_scalar},
#if PHI2_AVX512 || PHI2_AVX2 || PHI2_NEON
        {"matmul_f32_tiles", matmul_f32_tiles},
#endif
#if PHI2_AVX512 || PHI2_AVX2
        {"matmul_f32_panels", matmul_f32_panels_checked},
#endif
    };
    for (size_t k = 0; k < sizeof(kernels) / sizeof(*kernels); k++) {
        int before = g_failed;
        g_f32_worst = 0.0;
        for (size_t a = 0; a < sizeof(rowss) / sizeof(*rowss); a++)
            for (size_t b = 0; b < sizeof(colss) / sizeof(*colss); b++)
                for (size_t c = 0; c < sizeof(tokens) / sizeof(*tokens); c++) {
                    if ((size_t)rowss[a] * colss[b] * tokens[c] > 4000000) continue;  // keep it quick
                    test_f32_one(kernels[k].name, kernels[k].fn, rowss[a], colss[b], tokens[c]);
                }
        printf("%s %s: worst error %.2g of sum |w x|\n", g_failed == before ? "ok  " : "FAIL", kernels[k].name,
               g_f32_worst);
    }
}

/* ---- q8 matmul ------------------------------------------------------------------------------- */

typedef void (*Q8Fn)(float *, const QuantizedRows *, const Matrix *, const float *, int);

static double g_q8_worst;
static long g_q8_exact, g_q8_total;
#if PHI2_AMX
static int g_amx_checked;        // matmul_q8_amx was compared with the scalar kernel
static KernelScratch g_amx_kern; // its packing buffer and the OS's answer about AMX
#endif

static void test_q8_one(const char *name, Q8Fn fn, int rows, int cols, int n_tokens) {
    const int group = 64, n_groups = cols / group;
    int8_t *wq = guarded_alloc((size_t)rows * cols);
    float *wd = guarded_alloc((size_t)rows * n_groups * sizeof(float));
    float *x = guarded_alloc((size_t)n_tokens * cols * sizeof(float));
    float *bias = guarded_alloc((size_t)rows * sizeof(float));
    float *ref = guarded_alloc((size_t)n_tokens * rows * sizeof(float));
    float *out = guarded_alloc((size_t)n_tokens * rows * sizeof(float));
    fill_q8_weights(wq, wd, rows, cols, group);
    fill_activations(x, (size_t)n_tokens * cols, 1);
    for (int i = 0; i < rows; i++) bias[i] = frand();
    QuantizedRows xq = {guarded_alloc((size_t)n_tokens * cols), guarded_alloc((size_t)n_tokens * n_groups * sizeof(float)),
                        NULL};
    quantize_rows_q8_scalar(&xq, x, n_tokens, cols);
    Matrix W = {.rows = rows, .cols = cols, .type = WEIGHTS_Q8, .q = wq, .scale = wd};
    for (size_t i = 0; i < (size_t)n_tokens * rows; i++) out[i] = NAN;
    matmul_q8_scalar(ref, &xq, &W, bias, n_tokens);
    fn(out, &xq, &W, bias, n_tokens);
    // The group sums are exact integers, so the only freedom is the order of the float sum
    // of n_groups scaled terms: allow a few ulps of sum |term|.
    int bad = 0;
    double worst = 0.0;
    for (int t = 0; t < n_tokens; t++)
        for (int r = 0; r < rows; r++) {
            double mag = fabs(bias[r]);  // sum of |every product|, scales included
            for (int g = 0; g < n_groups; g++) {
                int32_t asum = 0;
                for (int i = g * group; i < (g + 1) * group; i++)
                    asum += abs((int32_t)wq[(size_t)r * cols + i] * xq.q[(size_t)t * cols + i]);
                mag += (double)asum * wd[(size_t)r * n_groups + g] * xq.scale[(size_t)t * n_groups + g];
            }
            const float a = ref[(size_t)t * rows + r], b = out[(size_t)t * rows + r];
            double err = fabs((double)a - b) / (mag + 1e-30);
            g_q8_total++;
            g_q8_exact += memcmp(&a, &b, sizeof a) == 0;
            if (!(err <= 1e-6)) {
                if (bad++ < 3)
                    check(0, "%s rows=%d cols=%d tokens=%d: out[%d][%d] = %.9g, scalar %.9g (rel err %.2g)", name, rows,
                          cols, n_tokens, t, r, b, a, err);
            }
            if (err > worst) worst = err;
        }
    if (!bad) check(1, "");
    if (worst > g_q8_worst) g_q8_worst = worst;
    guarded_free_all();
}

#if PHI2_PANELS
static KernelScratch g_panel_kern;  // matmul_int8_panels' scratch
static void matmul_q8_panels(float *out, const QuantizedRows *in, const Matrix *W, const float *bias, int n) {
    matmul_int8_panels(out, in, W, bias, n, &g_panel_kern);
}
#endif

#if PHI2_AMX
static void matmul_q8_amx_checked(float *out, const QuantizedRows *in, const Matrix *W, const float *bias, int n) {
    matmul_q8_amx(out, in, W, bias, n, &g_amx_kern);
}
#endif

static void test_q8(void) {
    static const int rowss[] = {1, 3, 5, 16, 17, 33, 130};
    static const int colss[] = {64, 128, 320, 2560};
    static const int tokens[] = {1, 2, 3, 4, 5, 16, 17, 33, 64, 65};
    static const struct {
        const char *name;
        Q8Fn fn;
        int exact;  // must equal the scalar kernel bit for bit
    } kernels[] = {
        {"matmul_q8_scalar", matmul_q8_scalar, 1},
#if PHI2_Q8_SIMD
        {"matmul_q8_simd", matmul_q8_simd, 0},
#endif
#if PHI2_PANELS
        {"matmul_q8_panels", matmul_q8_panels, 0},
#endif
#if PHI2_AMX
        {"matmul_q8_amx", matmul_q8_amx_checked, 1},
#endif
    };
    for (size_t k = 0; k < sizeof(kernels) / sizeof(*kernels); k++) {
#if PHI2_AMX
        if (kernels[k].fn == matmul_q8_amx_checked && !amx_available(&g_amx_kern)) continue;
#endif
        int before = g_failed;
        g_q8_worst = 0.0;
        g_q8_exact = g_q8_total = 0;
        for (size_t a = 0; a < sizeof(rowss) / sizeof(*rowss); a++)
            for (size_t b = 0; b < sizeof(colss) / sizeof(*colss); b++)
                for (size_t c = 0; c < sizeof(tokens) / sizeof(*tokens); c++) {
                    if ((size_t)rowss[a] * colss[b] * tokens[c] > 4000000) continue;
                    test_q8_one(kernels[k].name, kernels[k].fn, rowss[a], colss[b], tokens[c]);
                }
#if PHI2_AMX
        if (kernels[k].fn == matmul_q8_amx_checked) g_amx_checked = 1;
#endif
        if (kernels[k].exact)
            check(g_q8_exact == g_q8_total, "%s: %ld of %ld outputs differ from the scalar kernel", kernels[k].name,
                  g_q8_total - g_q8_exact, g_q8_total);
        printf("%s %s: worst error %.2g of sum |q_w q_x d_w d_x|, %ld of %ld outputs bit-identical to scalar\n",
               g_failed == before ? "ok  " : "FAIL", kernels[k].name, g_q8_worst, g_q8_exact, g_q8_total);
    }
}

/* ---- q4 matmul ------------------------------------------------------------------------------- */

static double g_q4_worst;

/* One q4 product against the definition: sum_c Q4_LEVELS[code] d_w[c/32] * q_x[c] d_x[c/64],
 * from the codes read back in the documented layout, in double; the scalar kernel and the
 * fast ones must all be within a few ulps of sum |term| of it, where a term's magnitude
 * counts |level| + 128: the x86 kernels multiply level + 64 and subtract 64 * sum q_x
 * (q4_activation_offsets), so their float sums carry that much more. */
static void test_q4_one(const char *name, Q8Fn fn, int rows, int cols, int n_tokens) {
    const int n_groups = cols / Q4_GROUP, n_blocks = cols / Q4_BLOCK;
    uint8_t *codes = guarded_alloc((size_t)rows * cols / 2);
    uint16_t *wd = guarded_alloc((size_t)rows * n_groups * sizeof(uint16_t));
    float *x = guarded_alloc((size_t)n_tokens * cols * sizeof(float));
    float *bias = guarded_alloc((size_t)rows * sizeof(float));
    float *out = guarded_alloc((size_t)n_tokens * rows * sizeof(float));
    int8_t *level = guarded_alloc((size_t)rows * cols);  // the weights' levels, unpacked here independently
    for (size_t i = 0; i < (size_t)rows * cols / 2; i++) codes[i] = (uint8_t)random_u32(&g_rng);
    for (size_t i = 0; i < (size_t)rows * n_groups; i++)  // positive halves from 2^-14 to ~2^-2, a few zero
        wd[i] = random_u32(&g_rng) % 23 == 0 ? 0 : (uint16_t)(0x0400 + random_u32(&g_rng) % 0x3000);
    for (int r = 0; r < rows; r++)
        for (int b = 0; b < n_blocks; b++)
            for (int i = 0; i < 32; i++) {
                const uint8_t byte = codes[(size_t)r * cols / 2 + (size_t)b * 32 + i];
                level[(size_t)r * cols + (size_t)b * 64 + i] = Q4_LEVELS[byte & 15];
                level[(size_t)r * cols + (size_t)b * 64 + 32 + i] = Q4_LEVELS[byte >> 4];
            }
    fill_activations(x, (size_t)n_tokens * cols, 1);
    for (int i = 0; i < rows; i++) bias[i] = frand();
    QuantizedRows xq = {guarded_alloc((size_t)n_tokens * cols), guarded_alloc((size_t)n_tokens * n_blocks * sizeof(float)),
                        guarded_alloc((size_t)n_tokens * n_groups * sizeof(float))};
    quantize_rows_q8_scalar(&xq, x, n_tokens, cols);
    Matrix W = {.rows = rows, .cols = cols, .type = WEIGHTS_Q4, .codes = codes, .scale16 = wd};
    for (size_t i = 0; i < (size_t)n_tokens * rows; i++) out[i] = NAN;
    fn(out, &xq, &W, bias, n_tokens);
    int bad = 0;
    double worst = 0.0;
    for (int t = 0; t < n_tokens; t++)
        for (int r = 0; r < rows; r++) {
            double want = bias[r], mag = fabs(bias[r]);
            for (int c = 0; c < cols; c++) {
                const double scales = (double)f32_from_f16(wd[(size_t)r * n_groups + c / 32]) *
                                      xq.q[(size_t)t * cols + c] * xq.scale[(size_t)t * n_blocks + c / 64];
                want += level[(size_t)r * cols + c] * scales;
                mag += (abs(level[(size_t)r * cols + c]) + 128) * fabs(scales);
            }
            const double err = fabs(want - out[(size_t)t * rows + r]) / (mag + 1e-30);
            if (!(err <= 1e-6) && bad++ < 3)
                check(0, "%s rows=%d cols=%d tokens=%d: out[%d][%d] = %.9g, want %.9g (rel err %.2g)", name, rows, cols,
                      n_tokens, t, r, out[(size_t)t * rows + r], want, err);
            if (err > worst) worst = err;
        }
    if (!bad) check(1, "");
    if (worst > g_q4_worst) g_q4_worst = worst;
    guarded_free_all();
}

#if PHI2_PANELS
static void matmul_int8_panels_q4(float *out, const QuantizedRows *in, const Matrix *W, const float *bias, int n) {
    matmul_int8_panels(out, in, W, bias, n, &g_panel_kern);
}
#endif

static void test_q4(void) {
    static const int rowss[] = {1, 3, 5, 16, 17, 33, 130};
    static const int colss[] = {64, 128, 320, 2560};
    static const int tokens[] = {1, 2, 3, 4, 5, 16, 17, 33, 64, 65};
    static const struct {
        const char *name;
        Q8Fn fn;
    } kernels[] = {
        {"matmul_q4_scalar", matmul_q4_scalar},
#if PHI2_Q8_SIMD
        {"matmul_q4_simd", matmul_q4_simd},
#endif
#if PHI2_PANELS
        {"matmul_q4_panels", matmul_int8_panels_q4},
#endif
    };
    for (size_t k = 0; k < sizeof(kernels) / sizeof(*kernels); k++) {
        int before = g_failed;
        g_q4_worst = 0.0;
        for (size_t a = 0; a < sizeof(rowss) / sizeof(*rowss); a++)
            for (size_t b = 0; b < sizeof(colss) / sizeof(*colss); b++)
                for (size_t c = 0; c < sizeof(tokens) / sizeof(*tokens); c++) {
                    if ((size_t)rowss[a] * colss[b] * tokens[c] > 4000000) continue;
                    test_q4_one(kernels[k].name, kernels[k].fn, rowss[a], colss[b], tokens[c]);
                }
        printf("%s %s: worst error %.2g of sum (|level| + 128) |d_w q_x d_x| against the definition\n",
               g_failed == before ? "ok  " : "FAIL", kernels[k].name, g_q4_worst);
    }
}

/* ---- AMX coverage --------------------------------------------------------------------- */

/* Does the CPU have AMX-TILE and AMX-INT8 (CPUID leaf 7, subleaf 0: EDX bits 24 and 25)? */
static int cpu_has_amx_int8(void) {
#if defined(__x86_64__) && defined(__GNUC__)
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    return (d >> 24 & 1) && (d >> 25 & 1);
#else
    return 0;
#endif
}

/* The AMX kernel cannot be tested on a CPU without AMX: say so plainly. On a CPU with AMX a
 * -march=native build must have the kernel and the OS must grant the tile state, or the
 * kernel the engine would use for batches went untested: that is a failure. */
static void check_amx_coverage(void) {
#ifdef PHI2_SCALAR_ONLY
    printf("not covered: matmul_q8_amx (a build without SIMD kernels)\n");
#else
    if (!cpu_has_amx_int8()) {
        printf("not covered: matmul_q8_amx (this CPU has no AMX-INT8; every other kernel of this build was checked)\n");
        return;
    }
#if !PHI2_AMX
    check(0, "this CPU has AMX-INT8 but the build has no AMX kernel: the compiler did not enable AMX for "
             "-march=native (install gcc >= 11 or clang >= 12)");
#else
    check(amx_available(&g_amx_kern), "this CPU has AMX-INT8 but Linux refused the AMX tile state (arch_prctl "
                           "ARCH_REQ_XCOMP_PERM needs Linux >= 5.16): matmul_q8_amx went untested");
    check(g_amx_checked, "this CPU has AMX-INT8 but matmul_q8_amx was not run");
#endif
#endif
}

/* ---- the dispatcher the forward pass uses ---------------------------------------------- */

static void test_dispatch(void) {
    int before = g_failed;
    static const int tokens[] = {1, 3, 4, 16, 64};
    for (size_t k = 0; k < sizeof(tokens) / sizeof(*tokens); k++) {
        const int rows = 96, cols = 192, n = tokens[k], n_groups = cols / 64;
        int8_t *wq = guarded_alloc((size_t)rows * cols);
        float *wd = guarded_alloc((size_t)rows * n_groups * sizeof(float));
        float *x = guarded_alloc((size_t)n * cols * sizeof(float));
        float *bias = guarded_alloc((size_t)rows * sizeof(float));
        float *ref = guarded_alloc((size_t)n * rows * sizeof(float));
        float *out = guarded_alloc((size_t)n * rows * sizeof(float));
        fill_q8_weights(wq, wd, rows, cols, 64);
        fill_activations(x, (size_t)n * cols, 1);
        for (int i = 0; i < rows; i++) bias[i] = frand();
        QuantizedRows xq = {guarded_alloc((size_t)n * cols), guarded_alloc((size_t)n * n_groups * sizeof(float)),
                            guarded_alloc((size_t)n * (cols / 32) * sizeof(float))};
        Matrix W = {.rows = rows, .cols = cols, .type = WEIGHTS_Q8, .q = wq, .scale = wd};
        KernelScratch kern = {.xq = xq};
        quantize_rows_q8_scalar(&xq, x, n, cols);
        matmul_q8_scalar(ref, &xq, &W, bias, n);
        matmul(out, x, &W, bias, n, &kern);
        // errors relative to the largest output (no fmax: gcc 12 for aarch64 crashes vectorizing
        // an fmax reduction at -O3)
        double worst = 0.0, scale = 1.0;
        for (size_t i = 0; i < (size_t)n * rows; i++) scale = fabs(ref[i]) > scale ? fabs(ref[i]) : scale;
        for (size_t i = 0; i < (size_t)n * rows; i++) {
            double e = fabs((double)ref[i] - out[i]) / scale;
            if (!(e <= worst)) worst = e;
        }
        check(worst <= 1e-5, "matmul (q8 dispatch) tokens=%d: error %.2g against the scalar kernel", n, worst);
        // q4
        uint8_t *codes = guarded_alloc((size_t)rows * cols / 2);
        uint16_t *wd16 = guarded_alloc((size_t)rows * (cols / 32) * sizeof(uint16_t));
        for (size_t i = 0; i < (size_t)rows * cols / 2; i++) codes[i] = (uint8_t)random_u32(&g_rng);
        for (size_t i = 0; i < (size_t)rows * (cols / 32); i++) wd16[i] = (uint16_t)(0x1c00 + random_u32(&g_rng) % 0x800);
        Matrix W4 = {.rows = rows, .cols = cols, .type = WEIGHTS_Q4, .codes = codes, .scale16 = wd16};
        quantize_rows_q8_scalar(&xq, x, n, cols);
        matmul_q4_scalar(ref, &xq, &W4, bias, n);
        matmul(out, x, &W4, bias, n, &kern);
        worst = 0.0, scale = 1.0;
        for (size_t i = 0; i < (size_t)n * rows; i++) scale = fabs(ref[i]) > scale ? fabs(ref[i]) : scale;
        for (size_t i = 0; i < (size_t)n * rows; i++) {
            double e = fabs((double)ref[i] - out[i]) / scale;
            if (!(e <= worst)) worst = e;
        }
        check(worst <= 1e-5, "matmul (q4 dispatch) tokens=%d: error %.2g against the scalar kernel", n, worst);
        // f32
        float *wf = guarded_alloc((size_t)rows * cols * sizeof(float));
        for (size_t i = 0; i < (size_t)rows * cols; i++) wf[i] = frand();
        Matrix Wf = {.rows = rows, .cols = cols, .type = WEIGHTS_F32, .w = wf};
        matmul_f32_scalar(ref, x, &Wf, bias, n);
        matmul(out, x, &Wf, bias, n, &kern);
        worst = 0.0, scale = 1.0;
        for (size_t i = 0; i < (size_t)n * rows; i++) scale = fabs(ref[i]) > scale ? fabs(ref[i]) : scale;
        for (size_t i = 0; i < (size_t)n * rows; i++) {
            double e = fabs((double)ref[i] - out[i]) / scale;
            if (!(e <= worst)) worst = e;
        }
        check(worst <= 1e-4, "matmul (f32 dispatch) tokens=%d: error %.2g against the scalar kernel", n, worst);
        free(kern.amx_pack);
        free_aligned(kern.panel);
        guarded_free_all();
    }
    printf("%s matmul dispatch (f32, q8 and q4, 1..64 tokens)\n", g_failed == before ? "ok  " : "FAIL");
}

/* ---- gelu_new and dot_f32 ------------------------------------------------------------ */

typedef void (*GeluFn)(float *, size_t);

static void test_gelu_one(const char *name, GeluFn fn) {
    static const size_t sizes[] = {1, 7, 16, 17, 100, 10240 * 3 + 5};
    double worst = 0.0;
    int before = g_failed;
    for (size_t k = 0; k < sizeof(sizes) / sizeof(*sizes); k++) {
        const size_t n = sizes[k];
        float *ref = guarded_alloc(n * sizeof(float)), *got = guarded_alloc(n * sizeof(float));
        for (size_t i = 0; i < n; i++) ref[i] = frand() * (i % 5 == 0 ? 40.0f : 6.0f);
        if (n > 10) ref[3] = 0.0f, ref[4] = -0.0f, ref[5] = 1e-30f, ref[6] = -200.0f, ref[7] = 200.0f, ref[8] = -9.0f;
        memcpy(got, ref, n * sizeof(float));
        gelu_new_scalar(ref, n);
        fn(got, 0);  // n = 0 must not touch anything
        fn(got, n);
        for (size_t i = 0; i < n; i++) {
            double err = fabs((double)got[i] - ref[i]) / (1.0 + fabs(ref[i]));
            if (!(err <= 2e-6)) {
                check(0, "%s n=%zu: gelu[%zu] = %.9g, scalar %.9g", name, n, i, got[i], ref[i]);
                break;
            }
            if (err > worst) worst = err;
        }
        check(1, "");
        guarded_free_all();
    }
    printf("%s %s: worst error %.2g of 1 + |gelu|\n", g_failed == before ? "ok  " : "FAIL", name, worst);
}

static void test_gelu_dot(void) {
    test_gelu_one("gelu_new", gelu_new);
    test_gelu_one("gelu_new_poly", gelu_new_poly);
    static const struct {
        const char *name;
        float (*fn)(const float *, const float *, int);
    } dots[] = {
        {"dot_f32", dot_f32},
    };
    for (size_t d = 0; d < sizeof(dots) / sizeof(*dots); d++) {
        int before = g_failed;
        static const int sizes[] = {1, 3, 4, 5, 8, 12, 16, 31, 80, 257};
        for (size_t k = 0; k < sizeof(sizes) / sizeof(*sizes); k++) {
            const int n = sizes[k];
            float *a = guarded_alloc((size_t)n * sizeof(float)), *b = guarded_alloc((size_t)n * sizeof(float));
            double exact = 0.0, mag = 0.0;
            for (int i = 0; i < n; i++) {
                a[i] = frand() * 10.0f, b[i] = frand() * 10.0f;
                exact += (double)a[i] * b[i];
                mag += fabs((double)a[i] * b[i]);
            }
            float got = dots[d].fn(a, b, n);
            check(fabs(got - exact) <= 1e-6 * mag, "%s n=%d: %.9g, exact %.9g", dots[d].name, n, got, exact);
            guarded_free_all();
        }
        printf("%s %s\n", g_failed == before ? "ok  " : "FAIL", dots[d].name);
    }
}

/* ---- softmax ------------------------------------------------------------------------ */

/* softmax (exp_poly, vectorized) against softmax_scalar (expf): scores spread like
 * attention's (up to +-60 apart, so some weights underflow to 0), one score far above the
 * rest, all equal, and lengths around the vector widths. Each weight within 5e-6 of its own
 * size: exp_poly is within 2 ulp of expf, and the sum of 1,901 terms in another order moves
 * every weight by up to ~1e-6 (aarch64); a wrong exponential or normalization moves them
 * by far more. */
static void test_softmax(void) {
    static const int sizes[] = {1, 2, 7, 16, 17, 33, 80, 1901};
    double worst = 0.0;
    const int before = g_failed;
    for (size_t k = 0; k < sizeof(sizes) / sizeof(*sizes); k++)
        for (int pattern = 0; pattern < 3; pattern++) {
            const int n = sizes[k];
            float *ref = guarded_alloc((size_t)n * sizeof(float)), *got = guarded_alloc((size_t)n * sizeof(float));
            for (int i = 0; i < n; i++) ref[i] = pattern == 2 ? 1.5f : frand() * 30.0f;
            if (pattern == 1) ref[n / 2] = 90.0f;
            memcpy(got, ref, (size_t)n * sizeof(float));
            softmax_scalar(ref, n);
            softmax_poly(got, n);
            double sum = 0.0;
            int wrong = 0, first_wrong = -1;
            for (int i = 0; i < n; i++) {
                const double rel = fabs((double)got[i] - ref[i]) / (ref[i] + 1e-30);  // the weights are in [0, 1]
                sum += got[i];
                if (!(rel <= 5e-6) && !(fabs((double)got[i] - ref[i]) <= 1e-12)) {
                    if (!wrong) first_wrong = i;
                    wrong++;
                } else if (ref[i] > 1e-12 && rel > worst) {
                    worst = rel;
                }
            }
            check(wrong == 0, "softmax n=%d pattern %d: %d weights differ from the scalar twin's by more than 5e-6 of "
                  "themselves, first [%d] = %.9g, scalar %.9g", n, pattern, wrong, first_wrong,
                  wrong ? got[first_wrong] : 0.0f, wrong ? ref[first_wrong] : 0.0f);
            check(fabs(sum - 1.0) <= 1e-5, "softmax n=%d pattern %d: the weights sum to %.9g", n, pattern, sum);
            guarded_free_all();
        }
    printf("%s softmax: softmax_scalar to %.2g of each weight (at most 5e-6)\n", g_failed == before ? "ok  " : "FAIL",
           worst);
}

/* ---- float16: the f16 KV cache ---------------------------------------------------------- */

/* What an f16 bit pattern means, written independently of f32_from_f16: a finite value as a
 * double from the formula of the standard (ldexp), else inf or NaN. */
static double f16_value(uint16_t h) {
    const int sign = h >> 15, e = (h >> 10) & 0x1f, m = h & 0x3ff;
    double v;
    if (e == 0x1f) v = m ? NAN : INFINITY;
    else if (e == 0) v = ldexp((double)m, -24);
    else v = ldexp((double)(1024 + m), e - 25);
    return sign ? -v : v;
}

/* The f16 nearest to x by search instead of bit manipulation: the finite non-negative f16
 * patterns 0 .. 0x7bff are increasing in value, so find the two that bracket |x| and take
 * the nearer, on a tie the even pattern. As IEEE rounds as if the exponent went on, 0x7c00
 * stands for 65536 there, and rounding to it gives infinity. */
static uint16_t f16_nearest_by_search(float x) {
    const uint16_t sign = signbit(x) ? 0x8000 : 0;
    if (isnan(x)) return sign | 0x7e00;  // some NaN: the caller checks only NaN-ness and sign
    const double a = fabs((double)x);
    if (a >= 65536.0) return sign | 0x7c00;
    int lo = 0, hi = 0x7c00;  // value(lo) <= a < value(hi), with value(0x7c00) = 65536
    while (hi - lo > 1) {
        const int mid = (lo + hi) / 2;
        if (f16_value((uint16_t)mid) <= a) lo = mid;
        else hi = mid;
    }
    const double below = a - f16_value((uint16_t)lo), above = (hi == 0x7c00 ? 65536.0 : f16_value((uint16_t)hi)) - a;
    const int pick = below < above ? lo : above < below ? hi : (lo % 2 == 0 ? lo : hi);
    return sign | (uint16_t)pick;
}

/* The conversion inputs: every f16 value, every midpoint between neighbours and the floats
 * next to it, the edges (2^-25, 65504, 65520, infinities, NaNs, float subnormals) and random
 * floats, both near the f16 range and over all of float's. Returns how many (<= cap). */
static int f16_test_inputs(float *x, int cap) {
    int n = 0;
    for (uint32_t h = 0; h < 0x10000 && n < cap; h++) x[n++] = (float)f16_value((uint16_t)h);
    for (uint32_t h = 0; h < 0x7bff && n + 6 <= cap; h++) {  // midpoints: exact in float (12 bits)
        const float mid = (float)((f16_value((uint16_t)h) + f16_value((uint16_t)(h + 1))) / 2);
        const float up = nextafterf(mid, INFINITY), down = nextafterf(mid, 0.0f);
        x[n++] = mid, x[n++] = up, x[n++] = down, x[n++] = -mid, x[n++] = -up, x[n++] = -down;
    }
    const float edges[] = {0.0f, -0.0f, 0x1p-25f, nextafterf(0x1p-25f, 1.0f), nextafterf(0x1p-25f, 0.0f), 0x1p-24f,
                           0x1.8p-24f, 0x1.8p-25f, 0x1p-14f, nextafterf(0x1p-14f, 0.0f), 0x1.ffcp-15f, 65504.0f,
                           65519.99f, 65520.0f, 65535.0f, 65536.0f, 1e10f, FLT_MAX, INFINITY, -INFINITY, NAN, -NAN,
                           FLT_MIN, 1e-40f, -1e-45f, 1.0f, -1.0f, 0.1f, 1.0009765625f, 1.00048828125f,
                           1.00146484375f, 2049.0f, 2051.0f, 4097.0f};
    for (size_t i = 0; i < sizeof(edges) / sizeof(*edges) && n < cap; i++) x[n++] = edges[i];
    const uint32_t nan_bits[] = {0x7f800001u, 0xff800001u, 0x7fc00000u, 0x7fbfffffu, 0x7fffe000u, 0xffc01234u};
    for (size_t i = 0; i < sizeof(nan_bits) / sizeof(*nan_bits) && n < cap; i++) memcpy(&x[n++], &nan_bits[i], 4);
    while (n < cap) {  // random bit patterns, half of them with exponents near f16's range
        uint32_t u = random_u32(&g_rng);
        if (n % 2) u = (u & 0x807fffffu) | (uint32_t)(95 + random_u32(&g_rng) % 50) << 23;
        memcpy(&x[n++], &u, 4);
    }
    return n;
}

typedef void (*F16RowFn)(uint16_t *, const float *, int);
typedef void (*F32RowFn)(float *, const uint16_t *, int);
typedef float (*F16DotFn)(const float *, const uint16_t *, int);
typedef void (*F16AxpyFn)(float *, float, const uint16_t *, int);

static void test_f16(void) {
    // f16 -> f32: all 65536 patterns against the formula.
    int before = g_failed, bad = 0;
    for (uint32_t h = 0; h < 0x10000; h++) {
        const float got = f32_from_f16((uint16_t)h);
        const double want = f16_value((uint16_t)h);
        const int ok = isnan(want) ? isnan(got) && !!signbit(got) == !!(h & 0x8000)
                                   : (double)got == want && !!signbit(got) == !!signbit(want);
        if (!ok && bad++ < 3) check(0, "f32_from_f16(0x%04x) = %.9g, want %.9g", h, got, want);
    }
    check(bad == 0, "f32_from_f16: %d of 65536 wrong", bad);

    // f32 -> f16: the bit-twiddling scalar version against the search, on every input.
    enum { N_INPUTS = 600000 };
    float *x = xmalloc(N_INPUTS * sizeof(float));
    const int n = f16_test_inputs(x, N_INPUTS);
    bad = 0;
    for (int i = 0; i < n; i++) {
        const uint16_t got = f16_from_f32(x[i]), want = f16_nearest_by_search(x[i]);
        const int ok = isnan(x[i]) ? (got & 0x7c00) == 0x7c00 && (got & 0x3ff) && (got & 0x8000) == (want & 0x8000)
                                   : got == want;
        if (!ok && bad++ < 3) check(0, "f16_from_f32(%a) = 0x%04x, want 0x%04x", x[i], got, want);
    }
    check(bad == 0, "f16_from_f32: %d of %d inputs wrong", bad, n);
    // every f16 survives the round trip (NaNs as NaNs)
    bad = 0;
    for (uint32_t h = 0; h < 0x10000; h++) {
        const uint16_t back = f16_from_f32(f32_from_f16((uint16_t)h));
        if (((h & 0x7c00) == 0x7c00 && (h & 0x3ff)) ? !((back & 0x7c00) == 0x7c00 && (back & 0x3ff)) : back != h)
            bad++;
    }
    check(bad == 0, "f16 -> f32 -> f16: %d of 65536 patterns changed", bad);
    printf("%s f16 conversion: f32_from_f16 on all 65536 patterns, f16_from_f32 on %d inputs (ties, subnormals, "
           "overflow, NaN) against a search\n", g_failed == before ? "ok  " : "FAIL", n);

    // The row conversions: bit-identical to f16_from_f32, NaN payloads included, any length.
    static const struct {
        const char *name;
        F16RowFn fn;
    } rows[] = {
        {"f32_to_f16_row", f32_to_f16_row},
#if PHI2_F16_VEC
        {"f32_to_f16_row_vec", f32_to_f16_row_vec},
#endif
    };
    static const int lengths[] = {1, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 33, 80, 257, 4096};
    for (size_t k = 0; k < sizeof(rows) / sizeof(*rows); k++) {
        before = g_failed, bad = 0;
        for (int start = 0, r = 0; start < n; r++) {  // all inputs, in rows of every length
            const int len = lengths[r % (sizeof(lengths) / sizeof(*lengths))];
            const int m = n - start < len ? n - start : len;
            float *in = guarded_alloc((size_t)m * sizeof(float));
            uint16_t *out = guarded_alloc((size_t)m * sizeof(uint16_t));
            memcpy(in, x + start, (size_t)m * sizeof(float));
            rows[k].fn(out, in, m);
            for (int i = 0; i < m; i++)
                if (out[i] != f16_from_f32(in[i]) && bad++ < 3)
                    check(0, "%s: %a -> 0x%04x, scalar 0x%04x", rows[k].name, in[i], out[i], f16_from_f32(in[i]));
            guarded_free_all();
            start += m;
        }
        check(bad == 0, "%s: %d values differ from f16_from_f32", rows[k].name, bad);
        printf("%s %s: bit-identical to f16_from_f32\n", g_failed == before ? "ok  " : "FAIL", rows[k].name);
    }
    free(x);

    // Back to floats: every f16 pattern, in rows of every length, exactly as f32_from_f16.
    static const struct {
        const char *name;
        F32RowFn fn;
    } widen[] = {
        {"f16_to_f32_row", f16_to_f32_row},
#if PHI2_F16_VEC
        {"f16_to_f32_row_vec", f16_to_f32_row_vec},
#endif
    };
    for (size_t k = 0; k < sizeof(widen) / sizeof(*widen); k++) {
        before = g_failed, bad = 0;
        for (int start = 0, r = 0; start < 0x10000; r++) {
            const int len = lengths[r % (sizeof(lengths) / sizeof(*lengths))];
            const int m = 0x10000 - start < len ? 0x10000 - start : len;
            uint16_t *in = guarded_alloc((size_t)m * sizeof(uint16_t));
            float *out = guarded_alloc((size_t)m * sizeof(float));
            for (int i = 0; i < m; i++) in[i] = (uint16_t)(start + i);
            widen[k].fn(out, in, m);
            for (int i = 0; i < m; i++) {
                const float want = f32_from_f16(in[i]);
                if (memcmp(&out[i], &want, sizeof(float)) != 0 && !(isnan(out[i]) && isnan(want)) && bad++ < 3)
                    check(0, "%s: 0x%04x -> %a, scalar %a", widen[k].name, in[i], out[i], want);
            }
            guarded_free_all();
            start += m;
        }
        check(bad == 0, "%s: %d of 65536 patterns differ from f32_from_f16", widen[k].name, bad);
        printf("%s %s: all 65536 patterns as f32_from_f16\n", g_failed == before ? "ok  " : "FAIL", widen[k].name);
    }

    // Attention with f16 keys and values: dot and axpy against a double-precision sum.
    static const struct {
        const char *name;
        F16DotFn dot;
        F16AxpyFn axpy;
    } kernels[] = {
        {"dot_f32_f16_scalar / axpy_f16_scalar", dot_f32_f16_scalar, axpy_f16_scalar},
        {"dot_f32_f16 / axpy_f16", dot_f32_f16, axpy_f16},
#if PHI2_F16_VEC
        {"dot_f32_f16_vec / axpy_f16_vec", dot_f32_f16_vec, axpy_f16_vec},
#endif
    };
    for (size_t k = 0; k < sizeof(kernels) / sizeof(*kernels); k++) {
        before = g_failed;
        for (size_t li = 0; li < sizeof(lengths) / sizeof(*lengths); li++)
            for (int rep = 0; rep < 4; rep++) {
                const int len = lengths[li];
                float *a = guarded_alloc((size_t)len * sizeof(float)), *out = guarded_alloc((size_t)len * sizeof(float));
                uint16_t *b = guarded_alloc((size_t)len * sizeof(uint16_t));
                for (int i = 0; i < len; i++) {
                    a[i] = frand() * 10.0f, out[i] = frand() * 3.0f;
                    b[i] = f16_from_f32(frand() * (i % 7 == 0 ? 1e-5f : 8.0f));  // subnormals too
                }
                double exact = 0.0, mag = 0.0;
                for (int i = 0; i < len; i++) {
                    exact += (double)a[i] * f16_value(b[i]);
                    mag += fabs((double)a[i] * f16_value(b[i]));
                }
                const float got = kernels[k].dot(a, b, len);
                check(fabs(got - exact) <= 1e-6 * mag + 1e-30, "%s n=%d: dot %.9g, exact %.9g", kernels[k].name, len,
                      got, exact);
                const float w = frand();
                double *want = xmalloc((size_t)len * sizeof(double));
                for (int i = 0; i < len; i++) want[i] = out[i] + (double)w * f16_value(b[i]);
                double *tol = xmalloc((size_t)len * sizeof(double));
                for (int i = 0; i < len; i++) tol[i] = 2e-7 * (fabs(out[i]) + fabs((double)w * f16_value(b[i])));
                kernels[k].axpy(out, w, b, len);
                int wrong = 0;
                for (int i = 0; i < len; i++) wrong += !(fabs(out[i] - want[i]) <= tol[i]);
                check(wrong == 0, "%s n=%d: %d of the axpy outputs off", kernels[k].name, len, wrong);
                free(want);
                free(tol);
                guarded_free_all();
            }
        printf("%s %s: against double-precision sums, %zu lengths\n", g_failed == before ? "ok  " : "FAIL",
               kernels[k].name, sizeof(lengths) / sizeof(*lengths));
    }

    // A head's scores and weighted sum over n_pos f16 rows (head_dim 80, Phi-2's, takes the
    // vector head kernels; 64 the per-row loop), against double precision.
    static const int head_dims[] = {80, 64}, positions[] = {1, 7, 8, 9, 16, 17, 100, 1901};
    before = g_failed;
    for (size_t hi = 0; hi < sizeof(head_dims) / sizeof(*head_dims); hi++)
        for (size_t pi = 0; pi < sizeof(positions) / sizeof(*positions); pi++)
            for (int twin = 0; twin < 2; twin++) {
                const int hd = head_dims[hi], n_pos = positions[pi];
                float *q = guarded_alloc((size_t)hd * sizeof(float)), *out = guarded_alloc((size_t)hd * sizeof(float));
                float *score = guarded_alloc((size_t)n_pos * sizeof(float));
                float *weight = guarded_alloc((size_t)n_pos * sizeof(float));
                uint16_t *cache_rows = guarded_alloc((size_t)n_pos * hd * sizeof(uint16_t));
                for (int i = 0; i < hd; i++) q[i] = frand() * 4.0f, out[i] = NAN;  // out: overwritten
                for (int i = 0; i < n_pos * hd; i++) cache_rows[i] = f16_from_f32(frand() * (i % 7 == 0 ? 1e-5f : 8.0f));
                for (int p = 0; p < n_pos; p++) weight[p] = frand() * 0.5f + 0.5f;
                const float scale = 0.111803f;
                if (twin) scores_f16_scalar(score, q, cache_rows, n_pos, hd, scale), weighted_sum_f16_scalar(out, weight, cache_rows, n_pos, hd);
                else scores_f16(score, q, cache_rows, n_pos, hd, scale), weighted_sum_f16(out, weight, cache_rows, n_pos, hd);
                int wrong = 0;
                for (int p = 0; p < n_pos; p++) {
                    double exact = 0.0, mag = 0.0;
                    for (int i = 0; i < hd; i++) {
                        exact += (double)q[i] * f16_value(cache_rows[(size_t)p * hd + i]);
                        mag += fabs((double)q[i] * f16_value(cache_rows[(size_t)p * hd + i]));
                    }
                    wrong += !(fabs(score[p] - exact * scale) <= 1e-6 * mag * scale + 1e-30);
                }
                for (int i = 0; i < hd; i++) {
                    double exact = 0.0, mag = 0.0;
                    for (int p = 0; p < n_pos; p++) {
                        exact += (double)weight[p] * f16_value(cache_rows[(size_t)p * hd + i]);
                        mag += fabs((double)weight[p] * f16_value(cache_rows[(size_t)p * hd + i]));
                    }
                    wrong += !(fabs(out[i] - exact) <= 2e-6 * mag + 1e-30);
                }
                check(wrong == 0, "%s head_dim %d, %d positions: %d of the scores and outputs off",
                      twin ? "scores_f16_scalar / weighted_sum_f16_scalar" : "scores_f16 / weighted_sum_f16", hd, n_pos,
                      wrong);
                guarded_free_all();
            }
    printf("%s scores_f16 / weighted_sum_f16 and their scalar twins: against double precision, head_dim 80 and 64\n",
           g_failed == before ? "ok  " : "FAIL");
}

/* ---- attention over a batch: attention_blocked against attention() ------------------ */

/* A cached key or value row as floats. */
static void cached_row(float *out, const RunState *s, const void *cache, size_t slot, int n) {
    if (s->kv_type == KV_F16) f16_to_f32_row_scalar(out, (const uint16_t *)cache + slot, n);
    else memcpy(out, (const float *)cache + slot, (size_t)n * sizeof(float));
}

/* attention() in double precision from the same cached numbers: out[n_tokens][hidden]. */
static void attention_exact(double *out, const RunState *s, const Config *c, int layer, const float *qkv, int pos0,
                            int n_tokens) {
    const int H = c->hidden_dim, hd = c->head_dim;
    double *score = xmalloc((size_t)(pos0 + n_tokens) * sizeof(double));
    float *row = xmalloc((size_t)hd * sizeof(float));
    for (int t = 0; t < n_tokens; t++)
        for (int h = 0; h < c->n_heads; h++) {
            const float *q = qkv + (size_t)t * 3 * H + (size_t)h * hd;
            double max = -INFINITY, sum = 0.0;
            for (int p = 0; p <= pos0 + t; p++) {
                cached_row(row, s, s->key_cache, kv_offset(s, c, layer, h, p), hd);
                double dot = 0.0;
                for (int i = 0; i < hd; i++) dot += (double)q[i] * row[i];
                score[p] = dot / sqrt((double)hd);
                if (score[p] > max) max = score[p];
            }
            for (int p = 0; p <= pos0 + t; p++) sum += score[p] = exp(score[p] - max);
            double *o = out + (size_t)t * H + (size_t)h * hd;
            for (int i = 0; i < hd; i++) o[i] = 0.0;
            for (int p = 0; p <= pos0 + t; p++) {
                cached_row(row, s, s->value_cache, kv_offset(s, c, layer, h, p), hd);
                for (int i = 0; i < hd; i++) o[i] += score[p] / sum * row[i];
            }
        }
    free(score), free(row);
}

typedef struct {
    double blocked, attention;  // the largest difference from the float64 attention of each
    double between;             // and between the two
} AttentionErrors;

/* One case: n_heads heads of head_dim, positions 0 .. pos0-1 already cached and a batch of
 * n_tokens after them, in layer 1 of 2. Keys grow with the position, so later key tiles
 * hold larger scores and the online softmax must rescale what it has summed so far; the
 * queries are scaled up so the softmax is peaked. attention_blocked must match attention()
 * to float rounding, and give bit for bit the same rows when the batch comes in pieces. */
static void test_attention_one(int kv_type, int head_dim, int n_heads, int pos0, int n_tokens, AttentionErrors *worst) {
    const Config c = {.vocab_size = 16, .hidden_dim = n_heads * head_dim, .ffn_dim = 64, .n_layers = 2,
                      .n_heads = n_heads, .head_dim = head_dim, .rot_dim = 2, .max_seq_len = pos0 + n_tokens,
                      .rope_theta = 10000.0f, .norm_eps = 1e-5f};
    const int H = c.hidden_dim, n_pos = pos0 + n_tokens;
    const float value_max = 3.0f;  // values in [-3, 3): so is every output, a weighted average of them
    RunState s;
    init_state(&s, &c, n_pos, n_tokens, kv_type, 0, max_threads());
    float *row = xmalloc((size_t)head_dim * sizeof(float));
    for (int l = 0; l < c.n_layers; l++)
        for (int h = 0; h < n_heads; h++)
            for (int p = 0; p < n_pos; p++) {
                const float growth = 1.0f + (float)p / 24.0f;
                for (int i = 0; i < head_dim; i++) row[i] = frand() * growth;
                kv_store(&s, s.key_cache, kv_offset(&s, &c, l, h, p), row, head_dim);
                for (int i = 0; i < head_dim; i++) row[i] = frand() * value_max;
                kv_store(&s, s.value_cache, kv_offset(&s, &c, l, h, p), row, head_dim);
            }
    const size_t qkv_floats = (size_t)n_tokens * 3 * H, att_floats = (size_t)n_tokens * H;
    for (size_t i = 0; i < qkv_floats; i++) s.qkv[i] = frand() * 3.0f;
    float *qkv = xmalloc(qkv_floats * sizeof(float)), *want = xmalloc(att_floats * sizeof(float));
    float *got = xmalloc(att_floats * sizeof(float));
    double *exact = xmalloc(att_floats * sizeof(double));
    memcpy(qkv, s.qkv, qkv_floats * sizeof(float));
    attention_exact(exact, &s, &c, 1, qkv, pos0, n_tokens);

    attention_scalar(&s, &c, 1, pos0, n_tokens);
    memcpy(want, s.att, att_floats * sizeof(float));
    for (size_t i = 0; i < att_floats; i++) s.att[i] = NAN;
    attention_blocked(&s, &c, 1, pos0, n_tokens);
    memcpy(got, s.att, att_floats * sizeof(float));
    // Both differ from the float64 values by float rounding, mostly of the scores' sums
    // (scores reach +-40 here, and attention_blocked sums a score's 80 products in one
    // chain): up to 2.7e-5 apart on some builds; 2e-5 of the values' range is twice that,
    // and a mistake in the softmax or the mask moves outputs by 0.1 to 3.
    const double tolerance = 2e-5 * value_max;
    int wrong = 0;
    double worst_diff = 0.0;
    for (size_t i = 0; i < att_floats; i++) {
        const double diff = fabs((double)got[i] - (double)want[i]);
        wrong += !(diff <= tolerance);
        if (!(diff <= worst_diff)) worst_diff = diff;  // (NaN too)
        if (!(diff <= worst->between)) worst->between = diff;
        if (fabs(got[i] - exact[i]) > worst->blocked) worst->blocked = fabs(got[i] - exact[i]);
        if (fabs(want[i] - exact[i]) > worst->attention) worst->attention = fabs(want[i] - exact[i]);
    }
    check(wrong == 0, "attention_blocked kv %s, head_dim %d, positions %d..%d: %d of %zu outputs differ from "
          "attention() by more than %.1g (worst %.3g)", kv_type_name(kv_type), head_dim, pos0, n_pos - 1, wrong,
          att_floats, tolerance, worst_diff);

    // The same batch in pieces of 1, 5, 17, 64, ... positions (each piece's queries at the
    // front of qkv, as forward() has them): the same bits.
    static const int pieces[] = {1, 5, 17, 64, 2};
    int differ = 0;
    for (int t0 = 0, k = 0; t0 < n_tokens; k++) {
        const int n = n_tokens - t0 < pieces[k % 5] ? n_tokens - t0 : pieces[k % 5];
        memcpy(s.qkv, qkv + (size_t)t0 * 3 * H, (size_t)n * 3 * H * sizeof(float));
        attention_blocked(&s, &c, 1, pos0 + t0, n);
        differ += memcmp(s.att, got + (size_t)t0 * H, (size_t)n * H * sizeof(float)) != 0;
        t0 += n;
    }
    check(differ == 0, "attention_blocked kv %s, head_dim %d, positions %d..%d: %d pieces of the batch differ from "
          "the whole batch", kv_type_name(kv_type), head_dim, pos0, n_pos - 1, differ);
    free(row), free(qkv), free(want), free(got), free(exact);
    free_state(&s);
}

static void test_attention(void) {
    // (first position, batch size): first batches, one ending inside a key tile; batches
    // after cached positions that start and end mid-tile, span query blocks, end exactly
    // on a tile; two positions; one.
    static const int cases[][2] = {{0, 9}, {0, 70}, {61, 9}, {64, 64}, {100, 37}, {190, 131}, {5, 2}, {130, 1}};
    static const int head_dims[] = {80, 37};
    for (int kv_type = KV_F32; kv_type <= KV_F16; kv_type++) {
        const int before = g_failed;
        AttentionErrors worst = {0.0, 0.0, 0.0};
        for (size_t h = 0; h < sizeof(head_dims) / sizeof(*head_dims); h++)
            for (size_t k = 0; k < sizeof(cases) / sizeof(*cases); k++)
                test_attention_one(kv_type, head_dims[h], 3, cases[k][0], cases[k][1], &worst);
        printf("%s attention_blocked (kv %s): attention() to float rounding (%.2g apart, at most 6e-05; from "
               "float64 %.2g, attention() %.2g), the same bits in pieces\n", g_failed == before ? "ok  " : "FAIL",
               kv_type_name(kv_type), worst.between, worst.blocked, worst.attention);
    }
}

/* ---- top-k selection (the sampler's heap) ------------------------------------------- */

/* 1 if cand[0..k) holds exactly the k first candidates of the full sort `sorted` (same
 * probabilities and ids, in any order). Sorts cand[0..k) in place to compare. */
static int same_top_k(Candidate *cand, const Candidate *sorted, int k) {
    qsort(cand, (size_t)k, sizeof(Candidate), compare_candidates);
    for (int i = 0; i < k; i++)
        if (cand[i].id != sorted[i].id || memcmp(&cand[i].prob, &sorted[i].prob, sizeof(float)) != 0) return 0;
    return 1;
}

/* ---- the thread pool of a generated token (Appendix C) ------------------------------- */

/* A pool_run job for the tests: chunk c of out_len values holds base + input (input[i] = i,
 * or NULL: i itself), and counts its runs in g_pool_runs[c]. With stall set, the first chunk
 * thread 1 takes stops until every other chunk is done, and 20 ms more, before it writes:
 * pool_run must wait for it. The caller's first chunk waits until thread 1 has stalled, so a
 * stalled chunk is there to wait for. */
typedef struct {
    float base;
    int chunk_len, stall;
    size_t out_len;
    const float *input;
} PoolTestJob;

enum { POOL_MAX_CHUNKS = 5000 };
static _Atomic int g_pool_runs[POOL_MAX_CHUNKS], g_pool_stalled, g_pool_late_done;

static void sleep_ms(int ms) {
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static int pool_chunks_done(int n_chunks) {
    int done = 0;
    for (int c = 0; c < n_chunks; c++) done += atomic_load(&g_pool_runs[c]) > 0;
    return done;
}

static void pool_test_chunk(const void *args, int chunk, float *buffer, int thread) {
    const PoolTestJob *job = args;
    const size_t first = (size_t)chunk * job->chunk_len;
    const size_t len = job->out_len - first < (size_t)job->chunk_len ? job->out_len - first : (size_t)job->chunk_len;
    const int n_chunks = (int)((job->out_len + job->chunk_len - 1) / job->chunk_len);
    const int stalls = job->stall && thread == 1 && !atomic_exchange(&g_pool_stalled, 1);
    if (stalls) {
        for (int i = 0; i < 10000 && pool_chunks_done(n_chunks) < n_chunks - 1; i++) sleep_ms(1);  // 10 s at most
        sleep_ms(20);  // time for a pool_run that does not wait to return
    }
    if (job->stall && thread == 0)
        for (int i = 0; i < 10000 && !atomic_load(&g_pool_stalled); i++) sleep_ms(1);
    for (size_t i = 0; i < len; i++) buffer[i] = job->base + (job->input ? job->input[first + i] : (float)(first + i));
    atomic_fetch_add(&g_pool_runs[chunk], 1);
    if (stalls) atomic_store(&g_pool_late_done, 1);
}

/* Whether out[0 .. n) holds base + its indices. */
static int pool_output_ok(const float *out, size_t n, float base) {
    for (size_t i = 0; i < n; i++)
        if (out[i] != base + (float)i) return 0;
    return 1;
}

/* Whether each of the n_chunks chunks ran exactly once, and the one after none (and resets
 * the counts). */
static int pool_each_chunk_once(int n_chunks) {
    int ok = 1;
    for (int c = 0; c <= n_chunks && c < POOL_MAX_CHUNKS; c++) ok &= atomic_exchange(&g_pool_runs[c], 0) == (c < n_chunks);
    return ok;
}

static void test_pool(void) {
    const int before = g_failed;
    enum { MAX_LEN = 5000 };
    float *out = xmalloc(MAX_LEN * sizeof(float)), *other = xmalloc(MAX_LEN * sizeof(float));
    float *input = xmalloc(MAX_LEN * sizeof(float));
    // Every chunk lands once, whatever the threads, chunk counts and a short last chunk.
    for (int n_threads = 1; n_threads <= 4; n_threads++) {
        ThreadPool *pool = pool_create(n_threads, MAX_LEN);
        static const int lens[] = {1, 3, 16, 80, 999, 5000};
        for (size_t li = 0; li < sizeof(lens) / sizeof(lens[0]); li++)
            for (int chunk_len = 1; chunk_len <= lens[li]; chunk_len = chunk_len * 3 + 1) {
                const int n_chunks = (lens[li] + chunk_len - 1) / chunk_len;
                const PoolTestJob job = {(float)(li * 7 + chunk_len), chunk_len, 0, (size_t)lens[li], NULL};
                for (int i = 0; i < MAX_LEN; i++) out[i] = -1.0f;
                pool_run(pool, pool_test_chunk, &job, n_chunks, chunk_len, out, (size_t)lens[li]);
                check(pool_output_ok(out, (size_t)lens[li], job.base) && out[lens[li] < MAX_LEN ? lens[li] : 0] ==
                      (lens[li] < MAX_LEN ? -1.0f : job.base) && pool_each_chunk_once(n_chunks),
                      "pool_run: %d threads, %d values in chunks of %d", n_threads, lens[li], chunk_len);
            }
        // Many short jobs in a row, each reading an input that the caller rewrites as soon as
        // pool_run returns (as the engine does its activations): threads that wake up late,
        // or arrive as a job closes, must neither miss a chunk nor read a later job's input.
        int wrong = 0;
        for (int rep = 0; rep < 2000; rep++) {
            for (int i = 0; i < 64; i++) input[i] = (float)(i + rep);
            const PoolTestJob job = {0.0f, 4, 0, 64, input};
            pool_run(pool, pool_test_chunk, &job, 16, 4, out, 64);
            wrong += !pool_output_ok(out, 64, (float)rep) || !pool_each_chunk_once(16);
        }
        check(wrong == 0, "pool_run: %d threads, %d of 2000 short jobs in a row wrong", n_threads, wrong);
        pool_destroy(pool);
    }
    check(pool_threads(NULL) == 1, "pool_threads(NULL) is 1");
    // A stalled thread: pool_run waits for its chunk, and returns with every chunk computed
    // once; no thread writes into the output after pool_run has returned.
    ThreadPool *pool = pool_create(2, MAX_LEN);
    const PoolTestJob stalled = {0.5f, 100, 1, 4000, NULL};
    for (int i = 0; i < MAX_LEN; i++) out[i] = -1.0f;
    pool_run(pool, pool_test_chunk, &stalled, 40, 100, out, 4000);
    check(atomic_load(&g_pool_stalled) && atomic_load(&g_pool_late_done),
          "pool_run returned while thread 1 was stalled holding a chunk (stalled %d, its chunk done %d)",
          atomic_load(&g_pool_stalled), atomic_load(&g_pool_late_done));
    check(pool_output_ok(out, 4000, 0.5f) && pool_each_chunk_once(40),
          "pool_run with a stalled thread: every chunk once, in the output");
    for (int i = 0; i < MAX_LEN; i++) out[i] = -2.0f;  // the caller reuses the output at once
    const PoolTestJob next = {2.0f, 7, 0, 3000, NULL};  // the stalled thread rejoins for the next job
    for (int rep = 0; rep < 50; rep++) {
        pool_run(pool, pool_test_chunk, &next, 429, 7, other, 3000);
        check(pool_output_ok(other, 3000, 2.0f) && pool_each_chunk_once(429), "pool_run after a stall, run %d", rep);
    }
    pool_destroy(pool);  // joins the threads: nothing can write after this
    int untouched = 1;
    for (int i = 0; i < MAX_LEN; i++) untouched &= out[i] == -2.0f;
    check(untouched, "no thread wrote into the output after pool_run returned");
    free(out);
    free(other);
    free(input);
    printf("%s thread pool: every chunk once, for 1-4 threads and 2000 short jobs in a row; a stalled thread "
           "delays pool_run, which returns with its chunk done\n", g_failed == before ? "ok  " : "FAIL");
}

/* select_top_k against a full qsort with compare_candidates on arrays with many ties
 * (probabilities from a few distinct values, zeros included), so the k-th place is
 * usually contested and only the id decides it. */
static void test_top_k(void) {
    static const int sizes[] = {1, 2, 3, 4, 7, 41, 100, 1000, 51200};
    static const int n_levels[] = {1, 2, 5, 64};  // distinct probability values
    int before = g_failed, cases = 0;
    for (size_t a = 0; a < sizeof(sizes) / sizeof(*sizes); a++)
        for (size_t b = 0; b < sizeof(n_levels) / sizeof(*n_levels); b++) {
            const int n = sizes[a];
            Candidate *orig = guarded_alloc((size_t)n * sizeof(Candidate));
            Candidate *sorted = guarded_alloc((size_t)n * sizeof(Candidate));
            Candidate *cand = guarded_alloc((size_t)n * sizeof(Candidate));
            for (int i = 0; i < n; i++) orig[i].id = i;
            for (int i = n - 1; i > 0; i--) {  // ids in random order
                int j = (int)(random_u32(&g_rng) % (uint32_t)(i + 1));
                int t = orig[i].id;
                orig[i].id = orig[j].id, orig[j].id = t;
            }
            for (int i = 0; i < n; i++) orig[i].prob = (float)(random_u32(&g_rng) % (uint32_t)n_levels[b]) / 8.0f;
            memcpy(sorted, orig, (size_t)n * sizeof(Candidate));
            qsort(sorted, (size_t)n, sizeof(Candidate), compare_candidates);
            const int ks[] = {1, 2, 3, 40, n - 1, n};
            for (size_t c = 0; c < sizeof(ks) / sizeof(*ks); c++) {
                const int k = ks[c];
                if (k < 1 || k > n) continue;
                memcpy(cand, orig, (size_t)n * sizeof(Candidate));
                select_top_k(cand, n, k);
                check(same_top_k(cand, sorted, k), "select_top_k n=%d k=%d levels=%d: not the first k of the full sort",
                      n, k, n_levels[b]);
                cases++;
            }
            // The comparison itself notices a wrong answer: one kept candidate replaced by
            // the next one of the full sort (a different id, maybe an equal probability).
            if (n >= 2) {
                const int k = n >= 3 ? 2 : 1;
                memcpy(cand, sorted, (size_t)n * sizeof(Candidate));
                cand[k - 1] = sorted[k];
                check(!same_top_k(cand, sorted, k), "same_top_k accepted a planted wrong selection (n=%d)", n);
            }
            guarded_free_all();
        }
    printf("%s select_top_k: equals the full sort's first k on %d cases with ties\n",
           g_failed == before ? "ok  " : "FAIL", cases);
}

/* ---- micro-benchmark on full-size shapes ---------------------------------------------- */

/* Process CPU time instead of wall time (BENCH_CPU_TIME=1): with one thread, a kernel's own
 * speed even while other programs share the cores. */
static double bench_clock(void) {
    static int cpu = -1;
    if (cpu < 0) cpu = getenv("BENCH_CPU_TIME") != NULL;
    if (!cpu) return now_seconds();
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static double time_median(void (*run)(void *), void *arg, int reps) {
    double t[32];
    run(arg);  // warm up (page faults, caches)
    for (int i = 0; i < reps; i++) {
        double t0 = bench_clock();
        run(arg);
        t[i] = bench_clock() - t0;
    }
    for (int i = 0; i < reps; i++)
        for (int j = i + 1; j < reps; j++)
            if (t[j] < t[i]) { double s = t[i]; t[i] = t[j]; t[j] = s; }
    return t[reps / 2];
}

typedef struct {
    const char *kernel;
    Matrix W;
    const float *x, *bias;
    float *out;
    QuantizedRows *xq;
    int n;
} BenchArgs;

static void bench_run(void *p) {
    BenchArgs *a = p;
    if (!strcmp(a->kernel, "f32_scalar")) matmul_f32_scalar(a->out, a->x, &a->W, a->bias, a->n);
#if PHI2_AVX512 || PHI2_AVX2 || PHI2_NEON
    else if (!strcmp(a->kernel, "f32_tiles")) matmul_f32_tiles(a->out, a->x, &a->W, a->bias, a->n);
#endif
#if PHI2_AVX512 || PHI2_AVX2
    else if (!strcmp(a->kernel, "f32_panels")) matmul_f32_panels(a->out, a->x, &a->W, a->bias, a->n, &g_f32_panel_kern);
#endif
    else if (!strcmp(a->kernel, "q8_scalar")) matmul_q8_scalar(a->out, a->xq, &a->W, a->bias, a->n);
#if PHI2_Q8_SIMD
    else if (!strcmp(a->kernel, "q8_simd")) matmul_q8_simd(a->out, a->xq, &a->W, a->bias, a->n);
    else if (!strcmp(a->kernel, "q4_simd")) matmul_q4_simd(a->out, a->xq, &a->W, a->bias, a->n);
#if PHI2_PANELS
    else if (!strcmp(a->kernel, "q8_panels") || !strcmp(a->kernel, "q4_panels"))
        matmul_int8_panels(a->out, a->xq, &a->W, a->bias, a->n, &g_panel_kern);
#endif
#endif
    else if (!strcmp(a->kernel, "q4_scalar")) matmul_q4_scalar(a->out, a->xq, &a->W, a->bias, a->n);
#if PHI2_AMX
    else if (!strcmp(a->kernel, "q8_amx")) matmul_q8_amx(a->out, a->xq, &a->W, a->bias, a->n, &g_amx_kern);
#endif
    else if (!strcmp(a->kernel, "quantize")) quantize_rows_q8(a->xq, a->x, a->n, a->W.cols);
}

/* attention() of one decode step deep in the context, on Phi-2's shapes (32 heads of 80),
 * all 32 layers, with the KV cache in f32 or f16 (kv_type): what one generated token costs
 * in attention at that depth, and the cache bytes it reads per second. */
typedef struct {
    RunState s;
    Config c;
    int depth, batch, blocked;
} AttnBench;

static void bench_attn_run(void *p) {
    AttnBench *a = p;
    const int pos0 = a->depth + 1 - a->batch;
    for (int l = 0; l < a->c.n_layers; l++) {
        if (a->blocked) attention_blocked(&a->s, &a->c, l, pos0, a->batch);
        else attention_scalar(&a->s, &a->c, l, pos0, a->batch);
    }
}

/* batch 1: a decode step at position depth; batch N: a prompt batch of N positions ending
 * there, through attention() and attention_blocked(). */
static void bench_attention(int kv_type, int batch) {
    const char *env = getenv("BENCH_DEPTH");
    AttnBench a = {.c = {.vocab_size = 16, .hidden_dim = 2560, .ffn_dim = 64, .n_layers = 32, .n_heads = 32,
                         .head_dim = 80, .rot_dim = 32, .rope_theta = 10000.0f, .norm_eps = 1e-5f},
                   .depth = env ? atoi(env) : 1900, .batch = batch};
    if (a.depth < batch || a.depth > 1 << 16) die("BENCH_DEPTH must be in [%d, 65536]", batch);
    init_state(&a.s, &a.c, a.depth + 1, batch, kv_type, 0, max_threads());
    for (int i = 0; i < batch * 3 * a.c.hidden_dim; i++) a.s.qkv[i] = frand();
    float *row = xmalloc((size_t)a.c.head_dim * sizeof(float));
    for (int l = 0; l < a.c.n_layers; l++)
        for (int h = 0; h < a.c.n_heads; h++)
            for (int p = 0; p <= a.depth; p++) {
                for (int i = 0; i < a.c.head_dim; i++) row[i] = frand();
                kv_store(&a.s, a.s.key_cache, kv_offset(&a.s, &a.c, l, h, p), row, a.c.head_dim);
                kv_store(&a.s, a.s.value_cache, kv_offset(&a.s, &a.c, l, h, p), row, a.c.head_dim);
            }
    if (batch == 1) {
        const double t = time_median(bench_attn_run, &a, 5);
        printf("attn_%s   depth %d, 32 layers x 32 heads: %8.3f ms per token  %6.1f GB/s of KV cache\n",
               kv_type_name(kv_type), a.depth, t * 1e3, (double)a.s.kv_bytes / t * 1e-9);
    } else {
        double macs = 0;  // scores and weighted sums: 2 x head_dim per head, layer and visible key
        for (int t = 0; t < batch; t++) macs += 2.0 * 80 * 32 * 32 * (a.depth + 1 - batch + t + 1);
        for (a.blocked = 0; a.blocked < 2; a.blocked++) {
            const double t = time_median(bench_attn_run, &a, 5);
            printf("attn_batch_%s %-9s %d positions ending at %d, 32 layers: %8.3f ms per position  %6.1f GMAC/s\n",
                   kv_type_name(kv_type), a.blocked ? "blocked" : "attention", batch, a.depth, t * 1e3 / batch,
                   macs / t * 1e-9);
        }
    }
    free(row);
    free_state(&a.s);
}

static void bench(int argc, char **argv) {
    // --bench [KERNEL ...]: default all kernels of this build on qkv, fc1, fc2 shapes, and
    // decode attention with an f32 and an f16 cache (attn_f32, attn_f16; BENCH_DEPTH=1900).
    // (The first shape's weights fit in L2 as q4 or q8: the kernels' speed without DRAM.)
    // Batches of 1 and 64 tokens, or 1 and BENCH_TOKENS.
    static const char *all[] = {"attn_f32", "attn_f16", "attn_batch_f32", "attn_batch_f16", "f32_tiles", "f32_panels", "q8_simd", "q8_panels", "q8_amx",
                                "q4_simd", "q4_panels", "quantize"};
    // BENCH_SHAPE=ROWSxCOLS: that one shape instead, e.g. 51200x2560 (the lm_head's), larger
    // than any L3: the kernels' speed from DRAM.
    int shapes[][2] = {{256, 2560}, {7680, 2560}, {10240, 2560}, {2560, 10240}};
    size_t n_shapes = sizeof(shapes) / sizeof(*shapes);
    const char *env_shape = getenv("BENCH_SHAPE");
    if (env_shape) {
        char rest;
        if (sscanf(env_shape, "%dx%d%c", &shapes[0][0], &shapes[0][1], &rest) != 2 || shapes[0][0] < 1 ||
            shapes[0][0] > 1 << 17 || shapes[0][1] < 64 || shapes[0][1] > 1 << 16 || shapes[0][1] % 64 != 0)
            die("BENCH_SHAPE must be ROWSxCOLS, at most 131072 x 65536, COLS a multiple of 64 (e.g. 51200x2560)");
        n_shapes = 1;
    }
    const char *env_tokens = getenv("BENCH_TOKENS");
    const int nb = env_tokens && atoi(env_tokens) > 0 ? atoi(env_tokens) : 64, tokens[] = {1, nb};
    const char **kernels = argc > 0 ? (const char **)argv : all;
    const int n_kernels = argc > 0 ? argc : (int)(sizeof(all) / sizeof(*all));
    for (int k = 0; k < n_kernels; k++)
        if (!strncmp(kernels[k], "attn_", 5)) {
            const char *batch = getenv("BENCH_BATCH");
            bench_attention(strstr(kernels[k], "f16") ? KV_F16 : KV_F32,
                            strstr(kernels[k], "batch") ? (batch ? atoi(batch) : 64) : 1);
        }
    for (size_t s = 0; s < n_shapes; s++) {
        const int rows = shapes[s][0], cols = shapes[s][1];
        float *w = xmalloc_aligned((size_t)rows * cols * sizeof(float));
        int8_t *wq = xmalloc_aligned((size_t)rows * cols);
        float *wd = xmalloc_aligned((size_t)rows * cols / 64 * sizeof(float));
        uint8_t *codes = xmalloc_aligned((size_t)rows * cols / 2);
        uint16_t *wd16 = xmalloc_aligned((size_t)rows * cols / 32 * sizeof(uint16_t));
        float *x = xmalloc_aligned((size_t)nb * cols * sizeof(float));
        float *bias = xmalloc_aligned((size_t)rows * sizeof(float));
        float *out = xmalloc_aligned((size_t)nb * rows * sizeof(float));
        QuantizedRows xq = {xmalloc_aligned((size_t)nb * cols), xmalloc_aligned((size_t)nb * cols / 64 * sizeof(float)),
                            xmalloc_aligned((size_t)nb * cols / 32 * sizeof(float))};
        for (size_t i = 0; i < (size_t)rows * cols; i++) w[i] = frand();
        fill_q8_weights(wq, wd, rows, cols, 64);
        for (size_t i = 0; i < (size_t)rows * cols / 2; i++) codes[i] = (uint8_t)random_u32(&g_rng);
        for (size_t i = 0; i < (size_t)rows * cols / 32; i++) wd16[i] = (uint16_t)(0x1c00 + random_u32(&g_rng) % 0x800);
        fill_activations(x, (size_t)nb * cols, 0);
        for (int i = 0; i < rows; i++) bias[i] = frand();
        quantize_rows_q8(&xq, x, nb, cols);
        for (int k = 0; k < n_kernels; k++)
            for (size_t ti = 0; ti < sizeof(tokens) / sizeof(*tokens); ti++) {
                if (!strncmp(kernels[k], "attn_", 5)) continue;  // (above)
                const int is_q8 = !strncmp(kernels[k], "q8", 2), is_q4 = !strncmp(kernels[k], "q4", 2);
                BenchArgs a = {kernels[k], {.rows = rows, .cols = cols}, x, bias, out, &xq, tokens[ti]};
                if (is_q8) a.W.type = WEIGHTS_Q8, a.W.q = wq, a.W.scale = wd;
                else if (is_q4) a.W.type = WEIGHTS_Q4, a.W.codes = codes, a.W.scale16 = wd16;
                else a.W.w = w;
                if (!strcmp(kernels[k], "quantize")) a.W.w = NULL;
#if !(PHI2_AVX512 || PHI2_AVX2 || PHI2_NEON)
                if (!strcmp(kernels[k], "f32_tiles")) continue;
#endif
#if !(PHI2_AVX512 || PHI2_AVX2)
                if (!strcmp(kernels[k], "f32_panels")) continue;
#endif
#if !PHI2_Q8_SIMD
                if (!strcmp(kernels[k], "q8_simd") || !strcmp(kernels[k], "q4_simd")) continue;
#endif
#if !PHI2_PANELS
                if (strstr(kernels[k], "_panels")) continue;
#endif
#if PHI2_AMX
                if (!strcmp(kernels[k], "q8_amx") && !amx_available(&g_amx_kern)) continue;
#else
                if (!strcmp(kernels[k], "q8_amx")) continue;
#endif
                double t = time_median(bench_run, &a, tokens[ti] == 1 ? 9 : 5);
                double bytes = is_q8 ? (double)rows * cols * (1 + 4.0 / 64)
                               : is_q4 ? (double)rows * cols * (0.5 + 2.0 / 32) : (double)rows * cols * 4;
                double gmac = (double)rows * cols * tokens[ti] / t * 1e-9;
                printf("%-15s %5dx%-5d tokens %3d: %8.3f ms  %6.1f GB/s of weights  %7.1f GMAC/s\n", kernels[k], rows,
                       cols, tokens[ti], t * 1e3, bytes / t * 1e-9, gmac);
            }
        free_aligned(w); free_aligned(wq); free_aligned(wd); free_aligned(codes); free_aligned(wd16); free_aligned(x);
        free_aligned(bias); free_aligned(out); free_aligned(xq.q); free_aligned(xq.scale); free_aligned(xq.q4_offset);
    }
}

int main(int argc, char **argv) {
    if (argc > 1 && !strcmp(argv[1], "--pool")) {  // the pool's checks alone (make test-tsan)
        test_pool();
        printf("test_kernels: %d checks, %d failed\n", g_checks, g_failed);
        return g_failed ? 1 : 0;
    }
    if (argc > 1 && !strcmp(argv[1], "--bench")) {
        bench(argc - 2, argv + 2);
        return 0;
    }
    printf("test_kernels: built with%s%s%s%s%s%s%s%s, %d threads\n",
#if PHI2_AVX512
           " avx512-vnni",
#else
           "",
#endif
#if PHI2_AMX
           " amx",
#else
           "",
#endif
#if PHI2_AVX2
           " avx2",
#else
           "",
#endif
#if PHI2_AVX2 && defined(__AVXVNNI__)
           " avx-vnni",
#else
           "",
#endif
#if PHI2_NEON
           " aarch64 neon",
#else
           "",
#endif
#if PHI2_NEON_DOTPROD
           " dotprod",
#else
           "",
#endif
#if PHI2_NEON_I8MM
           " i8mm",
#else
           "",
#endif
#if !PHI2_AVX512 && !PHI2_AVX2 && !PHI2_NEON
           " scalar kernels only",
#else
           "",
#endif
           max_threads());
    test_quantize();
    test_f32();
    test_q8();
    test_q4();
    check_amx_coverage();
    test_dispatch();
    test_gelu_dot();
    test_softmax();
    test_f16();
    test_attention();
    test_top_k();
    test_pool();
#ifdef _OPENMP
    // Uneven thread splits: 3 threads over row tiles that do not divide evenly.
    omp_set_num_threads(3);
    int before = g_failed;
    test_f32();
    test_q8();
    test_q4();
    printf("%s the same with 3 threads\n", g_failed == before ? "ok  " : "FAIL");
#endif
    printf("test_kernels: %d checks, %d failed\n", g_checks, g_failed);
    return g_failed ? 1 : 0;
}
