/*
 * phi2.c -- inference for Microsoft's Phi-2 (2.7B) in one file of plain C.
 *
 * Read it top to bottom; it follows the data:
 *   1. utilities          errors, checked allocation, number parsing
 *   2. the model file     header validation, memory-mapped weights (docs/FORMAT.md)
 *   3. kernels            LayerNorm, matrix products (f32 and int8), GELU, rotary, softmax;
 *                         every fast kernel has a plain scalar twin the tests compare against
 *   4. the forward pass   a batch of positions through all layers, with a KV cache
 *   5. sampling           greedy, temperature, top-k, top-p
 *   6. the command line   prompt in, streamed text out
 *
 * Phi-2 in one paragraph: tokens are embedded (no position embedding); each of the 32
 * layers normalizes the residual stream once and feeds the SAME normalized vector to
 * attention and to the MLP in parallel, adding both results back to the stream. Attention
 * rotates only the first 32 of the 80 dimensions of each head (NeoX-style rotary). The MLP
 * is fc1 -> gelu_new -> fc2. Every linear layer has a bias, including the untied lm_head.
 *
 * Build: make        Test: make test        Usage: ./phi2 -h
 */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#ifdef _OPENMP
#include <omp.h>
#else
#pragma GCC diagnostic ignored "-Wunknown-pragmas"  // without OpenMP the omp pragmas do nothing
#endif
#if !defined(PHI2_SCALAR_ONLY) && (defined(__AVX2__) || defined(__AVX512F__))
#include <immintrin.h>
#endif

#include "tokenizer.h"

/* ------------------------------------------------------------------------------------- */
/* 1. Utilities                                                                           */
/* ------------------------------------------------------------------------------------- */

/* A file being written (e.g. --dump-logits) goes to "<path>.tmp" and is renamed when
 * complete; if we die first, the temporary is removed so nothing half-written remains. */
static char g_partial_file[4096];

/* Print "phi2: error: ..." as one line on stderr and exit with status 1. */
static void die(const char *fmt, ...) {
    va_list ap;
    fflush(stdout);
    fprintf(stderr, "phi2: error: ");
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, "\n");
    if (g_partial_file[0]) unlink(g_partial_file);
    exit(1);
}

/* a * b for sizes, dying instead of silently wrapping around. */
static size_t mul_size(size_t a, size_t b) {
    if (a != 0 && b > SIZE_MAX / a) die("size overflow (%zu x %zu)", a, b);
    return a * b;
}

static void *xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p) die("out of memory allocating %zu bytes", n);
    return p;
}

static void *xcalloc(size_t count, size_t size) {
    void *p = calloc(count ? count : 1, size ? size : 1);
    if (!p) die("out of memory allocating %zu x %zu bytes", count, size);
    return p;
}

/* 64-byte aligned allocation, so SIMD loads of activation rows never split cache lines. */
static void *xmalloc_aligned(size_t n) {
    void *p = NULL;
    if (posix_memalign(&p, 64, n ? n : 64) != 0) die("out of memory allocating %zu bytes", n);
    return p;
}

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Strict number parsing for flags: the whole string must be a number within [lo, hi]. */
static long parse_long(const char *flag, const char *s, long lo, long hi) {
    char *end = NULL;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end != '\0' || v < lo || v > hi)
        die("%s expects an integer in [%ld, %ld], got '%s'", flag, lo, hi, s);
    return v;
}

static double parse_double(const char *flag, const char *s, double lo, double hi) {
    char *end = NULL;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end != '\0' || !(v >= lo && v <= hi))
        die("%s expects a number in [%g, %g], got '%s'", flag, lo, hi, s);
    return v;
}

/* Read a whole file into memory (prompt files are used byte for byte, no stripping). */
static unsigned char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) die("cannot open '%s': %s", path, strerror(errno));
    size_t cap = 1 << 16, n = 0;
    unsigned char *buf = xmalloc(cap);
    for (;;) {
        if (n == cap) {
            cap = mul_size(cap, 2);
            unsigned char *grown = realloc(buf, cap);
            if (!grown) die("out of memory reading '%s'", path);
            buf = grown;
        }
        size_t got = fread(buf + n, 1, cap - n, f);
        n += got;
        if (got == 0) break;
    }
    if (ferror(f)) die("cannot read '%s': %s", path, strerror(errno));
    fclose(f);
    *len = n;
    return buf;
}

/* FNV-1a 64-bit hash: the checksum of the model file's header and tokenizer section. */
static uint64_t fnv1a64(const unsigned char *p, size_t n) {
    uint64_t h = 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 0x100000001b3ULL;
    }
    return h;
}

/* ------------------------------------------------------------------------------------- */
/* 2. The model file: header, config and memory-mapped weights (see docs/FORMAT.md)       */
/* ------------------------------------------------------------------------------------- */

#define MODEL_MAGIC "PHI2CBIN"
#define MODEL_VERSION 1
#define HEADER_SIZE 256
#define TENSOR_ALIGN 64
enum { WEIGHTS_F32 = 0, WEIGHTS_Q8 = 1 };

typedef struct {
    int weight_type;    // WEIGHTS_F32 or WEIGHTS_Q8
    int vocab_size;     // rows of the embedding and lm_head (51200; ids >= 50295 are padding)
    int hidden_dim;     // width of the residual stream (2560)
    int ffn_dim;        // width of the MLP (10240)
    int n_layers;       // transformer blocks (32)
    int n_heads;        // attention heads (32); key/value heads are the same heads
    int head_dim;       // hidden_dim / n_heads (80)
    int rot_dim;        // leading dims of each head that get rotary embeddings (32)
    int max_seq_len;    // positions the model was trained for (2048)
    int group_size;     // q8: weights sharing one scale (64); f32: 0
    float rope_theta;   // rotary base (10000)
    float norm_eps;     // LayerNorm epsilon (1e-5)
    int bos_id, eos_id; // <|endoftext|> (50256) for both
} Config;

/* A weight matrix in PyTorch's Linear layout: y = W x, one row per output feature. */
typedef struct {
    int rows, cols;      // output features, input features
    const float *w;      // [rows, cols] (f32 files)
    const int8_t *q;     // [rows, cols] (q8 files) int8 weights ...
    const float *scale;  // [rows, cols / group_size] ... times one scale per group
} Matrix;

typedef struct {
    const float *ln_weight, *ln_bias;    // [hidden] the one LayerNorm feeding attention and MLP
    Matrix qkv;                          // [3*hidden, hidden] q, k and v projections stacked
    const float *qkv_bias;               // [3*hidden]
    Matrix dense;                        // [hidden, hidden] attention output projection
    const float *dense_bias;             // [hidden]
    Matrix fc1;                          // [ffn, hidden]
    const float *fc1_bias;               // [ffn]
    Matrix fc2;                          // [hidden, ffn]
    const float *fc2_bias;               // [hidden]
} Layer;

typedef struct {
    Config config;
    Matrix embed;                        // [vocab, hidden] token embeddings
    Layer *layers;                       // [n_layers]
    const float *final_ln_weight;        // [hidden]
    const float *final_ln_bias;          // [hidden]
    Matrix lm_head;                      // [vocab, hidden]
    const float *lm_head_bias;           // [vocab]
    Tokenizer tokenizer;
    const unsigned char *map;            // the whole file, memory-mapped read-only
    size_t map_size;
    size_t weight_bytes;                 // bytes of weights streamed per generated token
} Model;

static uint32_t read_u32(const unsigned char *p) {
    uint32_t v;
    memcpy(&v, p, 4);  // the file is little-endian, as is every CPU we build for
    return v;
}
static uint64_t read_u64(const unsigned char *p) {
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}
static float read_f32(const unsigned char *p) {
    float v;
    memcpy(&v, p, 4);
    return v;
}

/* Walks the weights section in file order, handing out 64-byte-aligned tensors and
 * checking each one lies inside the section before any pointer into it is formed. */
typedef struct {
    const unsigned char *base;  // start of the weights section (NULL: only measure)
    size_t size;                // bytes available
    size_t offset;              // next free byte
    const char *path;
} WeightCursor;

static const void *take_bytes(WeightCursor *c, size_t n, const char *what) {
    size_t start = (c->offset + TENSOR_ALIGN - 1) / TENSOR_ALIGN * TENSOR_ALIGN;
    if (start > c->size || n > c->size - start)
        die("'%s' is corrupt: tensor %s lies past the end of the weights section", c->path, what);
    c->offset = start + n;
    return c->base + start;
}

static const float *take_vector(WeightCursor *c, int n, const char *what) {
    return take_bytes(c, mul_size((size_t)n, sizeof(float)), what);
}

static Matrix take_matrix(WeightCursor *c, const Config *cfg, int rows, int cols, const char *what) {
    Matrix m = {.rows = rows, .cols = cols};
    size_t n = mul_size((size_t)rows, (size_t)cols);
    if (cfg->weight_type == WEIGHTS_F32) {
        m.w = take_bytes(c, mul_size(n, sizeof(float)), what);
    } else {
        m.q = take_bytes(c, n, what);
        m.scale = take_bytes(c, mul_size(n / (size_t)cfg->group_size, sizeof(float)), what);
    }
    return m;
}

/* Validate the header field by field: a wrong file must fail here with a clear message,
 * never later with a crash or with garbage text. */
static Config parse_header(const unsigned char *h, size_t file_size, const char *path) {
    if (memcmp(h, MODEL_MAGIC, 8) != 0)
        die("'%s' is not a phi2.c model file (bad magic); convert a checkpoint with scripts/convert.py", path);
    uint32_t version = read_u32(h + 8);
    if (version != MODEL_VERSION)
        die("'%s' has format version %u, this build reads version %d: reconvert it with scripts/convert.py",
            path, version, MODEL_VERSION);
    if (read_u64(h + 248) != fnv1a64(h, 248)) die("'%s' is corrupt: header checksum mismatch", path);
    for (int i = 120; i < 248; i++)
        if (h[i] != 0) die("'%s' is corrupt: reserved header bytes are not zero", path);

    Config c;
    c.weight_type = (int)read_u32(h + 12);
    uint32_t dims[9];  // vocab, hidden, ffn, layers, heads, head_dim, rot_dim, max_seq_len, group_size
    for (int i = 0; i < 9; i++) dims[i] = read_u32(h + 16 + 4 * i);
    c.rope_theta = read_f32(h + 52);
    c.norm_eps = read_f32(h + 56);
    uint32_t bos = read_u32(h + 60), eos = read_u32(h + 64);

    const uint32_t max_dim = 1u << 20;  // generous, and keeps every product far from overflow
    for (int i = 0; i < 8; i++)
        if (dims[i] == 0 || dims[i] > max_dim) die("'%s' is corrupt: implausible model dimension %u", path, dims[i]);
    if (c.weight_type != WEIGHTS_F32 && c.weight_type != WEIGHTS_Q8)
        die("'%s' has unknown weight type %d (expected 0 = f32 or 1 = q8)", path, c.weight_type);
    c.vocab_size = (int)dims[0];
    c.hidden_dim = (int)dims[1];
    c.ffn_dim = (int)dims[2];
    c.n_layers = (int)dims[3];
    c.n_heads = (int)dims[4];
    c.head_dim = (int)dims[5];
    c.rot_dim = (int)dims[6];
    c.max_seq_len = (int)dims[7];
    c.group_size = (int)dims[8];
    if (c.weight_type == WEIGHTS_F32 && c.group_size != 0) die("'%s' is corrupt: f32 file with a group size", path);
    if (c.head_dim * c.n_heads != c.hidden_dim)
        die("'%s' is corrupt: %d heads x %d dims != hidden size %d", path, c.n_heads, c.head_dim, c.hidden_dim);
    if (c.rot_dim % 2 != 0 || c.rot_dim > c.head_dim)
        die("'%s' is corrupt: rotary dims %d must be even and <= head dim %d", path, c.rot_dim, c.head_dim);
    if (c.weight_type == WEIGHTS_Q8 &&
        (c.group_size != 64 || c.hidden_dim % c.group_size != 0 || c.ffn_dim % c.group_size != 0))
        die("'%s' is corrupt: q8 group size %d must be 64 and divide the hidden and MLP sizes", path, c.group_size);
    if (!(c.rope_theta > 0.0f) || !(c.norm_eps > 0.0f) || !isfinite(c.rope_theta) || !isfinite(c.norm_eps))
        die("'%s' is corrupt: bad rope_theta or layer_norm_eps", path);
    if (bos >= dims[0] || eos >= dims[0]) die("'%s' is corrupt: bos/eos id outside the vocabulary", path);
    c.bos_id = (int)bos;
    c.eos_id = (int)eos;

    uint64_t declared_size = read_u64(h + 104);
    if (declared_size != file_size)
        die("'%s' is truncated or corrupt: header says %llu bytes, file has %zu", path,
            (unsigned long long)declared_size, file_size);
    return c;
}

/* Map the file, validate it completely, then point every tensor into the mapping. */
static void load_model(Model *m, const char *path) {
    memset(m, 0, sizeof(*m));
    int fd = open(path, O_RDONLY);
    if (fd < 0) die("cannot open model '%s': %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) die("cannot stat '%s': %s", path, strerror(errno));
    if (!S_ISREG(st.st_mode)) die("'%s' is not a regular file", path);
    size_t size = (size_t)st.st_size;
    if (size < HEADER_SIZE) die("'%s' is too small (%zu bytes) to be a phi2.c model file", path, size);
    void *map = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (map == MAP_FAILED) die("cannot mmap '%s': %s", path, strerror(errno));
    close(fd);  // the mapping keeps the file alive
    m->map = map;
    m->map_size = size;

    Config c = parse_header(m->map, size, path);
    m->config = c;

    // Sections: tokenizer then weights, both inside the file, aligned, not overlapping.
    uint64_t tok_off = read_u64(m->map + 72), tok_size = read_u64(m->map + 80);
    uint64_t w_off = read_u64(m->map + 88), w_size = read_u64(m->map + 96);
    if (tok_off < HEADER_SIZE || tok_off > size || tok_size > size - tok_off)
        die("'%s' is corrupt: tokenizer section out of bounds", path);
    if (w_off % TENSOR_ALIGN != 0 || w_off < tok_off + tok_size || w_off > size || w_size != size - w_off)
        die("'%s' is corrupt: weights section out of bounds", path);
    if (read_u64(m->map + 112) != fnv1a64(m->map + tok_off, tok_size))
        die("'%s' is corrupt: tokenizer checksum mismatch", path);
    char err[256];
    if (tokenizer_load(&m->tokenizer, m->map + tok_off, tok_size, err, sizeof(err)) != 0)
        die("'%s': bad tokenizer section: %s", path, err);

    // Weights, in the order docs/FORMAT.md lists them.
    const int H = c.hidden_dim, F = c.ffn_dim, V = c.vocab_size;
    WeightCursor cur = {.base = m->map + w_off, .size = w_size, .offset = 0, .path = path};
    m->embed = take_matrix(&cur, &c, V, H, "embed");
    m->layers = xcalloc((size_t)c.n_layers, sizeof(Layer));
    for (int l = 0; l < c.n_layers; l++) {
        Layer *L = &m->layers[l];
        L->ln_weight = take_vector(&cur, H, "ln_weight");
        L->ln_bias = take_vector(&cur, H, "ln_bias");
        L->qkv = take_matrix(&cur, &c, 3 * H, H, "qkv_weight");
        L->qkv_bias = take_vector(&cur, 3 * H, "qkv_bias");
        L->dense = take_matrix(&cur, &c, H, H, "dense_weight");
        L->dense_bias = take_vector(&cur, H, "dense_bias");
        L->fc1 = take_matrix(&cur, &c, F, H, "fc1_weight");
        L->fc1_bias = take_vector(&cur, F, "fc1_bias");
        L->fc2 = take_matrix(&cur, &c, H, F, "fc2_weight");
        L->fc2_bias = take_vector(&cur, H, "fc2_bias");
    }
    m->final_ln_weight = take_vector(&cur, H, "final_ln_weight");
    m->final_ln_bias = take_vector(&cur, H, "final_ln_bias");
    m->lm_head = take_matrix(&cur, &c, V, H, "lm_head_weight");
    m->lm_head_bias = take_vector(&cur, V, "lm_head_bias");
    size_t end = (cur.offset + TENSOR_ALIGN - 1) / TENSOR_ALIGN * TENSOR_ALIGN;
    if (end != w_size)
        die("'%s' is corrupt: weights section is %llu bytes, the header's shapes need %zu", path,
            (unsigned long long)w_size, end);
    // Everything but the embedding table (of which one row is read) streams through per token.
    m->weight_bytes = w_size - (size_t)((const unsigned char *)m->layers[0].ln_weight - cur.base);
}

static void free_model(Model *m) {
    tokenizer_free(&m->tokenizer);
    free(m->layers);
    munmap((void *)m->map, m->map_size);
}

/* ------------------------------------------------------------------------------------- */
/* 3. Kernels                                                                             */
/* ------------------------------------------------------------------------------------- */
/* Shapes: activations are row-major [n_tokens, features]; a batch of n_tokens positions
 * goes through each kernel together so every weight is read once per batch, not once per
 * token. The _scalar functions are the reference; tests/test_kernels.c compares the fast
 * versions against them. */

/* LayerNorm over the last dim: (x - mean) / sqrt(var + eps) * weight + bias (biased var).
 * Mean and variance accumulate in double: Phi-2's activations reach the hundreds. */
static void layernorm(float *out, const float *x, const float *weight, const float *bias, int n_tokens, int dim,
                      float eps) {
    for (int t = 0; t < n_tokens; t++) {
        const float *xt = x + (size_t)t * dim;
        float *ot = out + (size_t)t * dim;
        double sum = 0.0, sum_sq = 0.0;
        for (int i = 0; i < dim; i++) sum += xt[i];
        double mean = sum / dim;
        for (int i = 0; i < dim; i++) sum_sq += (xt[i] - mean) * (xt[i] - mean);
        float inv_std = (float)(1.0 / sqrt(sum_sq / dim + eps));
        float meanf = (float)mean;
        for (int i = 0; i < dim; i++) ot[i] = (xt[i] - meanf) * inv_std * weight[i] + bias[i];
    }
}

/* --- float32 matrix product: out[t, r] = sum_c W[r, c] * in[t, c] + bias[r] ------------ */

static void matmul_f32_scalar(float *out, const float *in, const Matrix *W, const float *bias, int n_tokens) {
    const int rows = W->rows, cols = W->cols;
#pragma omp parallel for schedule(static)
    for (int r = 0; r < rows; r++) {
        const float *wr = W->w + (size_t)r * cols;
        for (int t = 0; t < n_tokens; t++) {
            const float *xt = in + (size_t)t * cols;
            float sum = 0.0f;
            for (int c = 0; c < cols; c++) sum += wr[c] * xt[c];
            out[(size_t)t * rows + r] = sum + bias[r];
        }
    }
}

/* --- int8 (Q8_0) matrix product ------------------------------------------------------- */
/* The activation rows are quantized on the fly to int8, one scale per group of 64, so each
 * group's dot product is an exact int32 sum of int8 x int8 products, scaled once by both
 * scales: sum_g d_w[g] * d_x[g] * sum_{i in g} q_w[i] * q_x[i]. */

typedef struct {
    int8_t *q;      // [n_tokens, cols]
    float *scale;   // [n_tokens, cols / group]
} QuantizedRows;

static void quantize_rows_q8(QuantizedRows *out, const float *x, int n_tokens, int cols, int group) {
    const int n_groups = cols / group;
    for (int t = 0; t < n_tokens; t++) {
        for (int g = 0; g < n_groups; g++) {
            const float *xg = x + (size_t)t * cols + (size_t)g * group;
            int8_t *qg = out->q + (size_t)t * cols + (size_t)g * group;
            float amax = 0.0f;
            for (int i = 0; i < group; i++) amax = fmaxf(amax, fabsf(xg[i]));
            float d = amax / 127.0f;
            float inv_d = d > 0.0f ? 1.0f / d : 0.0f;
            for (int i = 0; i < group; i++) qg[i] = (int8_t)lrintf(xg[i] * inv_d);
            out->scale[(size_t)t * n_groups + g] = d;
        }
    }
}

static void matmul_q8_scalar(float *out, const QuantizedRows *in, const Matrix *W, const float *bias, int n_tokens,
                             int group) {
    const int rows = W->rows, cols = W->cols, n_groups = cols / group;
#pragma omp parallel for schedule(static)
    for (int r = 0; r < rows; r++) {
        const int8_t *wq = W->q + (size_t)r * cols;
        const float *wd = W->scale + (size_t)r * n_groups;
        for (int t = 0; t < n_tokens; t++) {
            const int8_t *xq = in->q + (size_t)t * cols;
            const float *xd = in->scale + (size_t)t * n_groups;
            float sum = 0.0f;
            for (int g = 0; g < n_groups; g++) {
                int32_t isum = 0;
                for (int i = g * group; i < (g + 1) * group; i++) isum += (int32_t)wq[i] * (int32_t)xq[i];
                sum += (float)isum * wd[g] * xd[g];
            }
            out[(size_t)t * rows + r] = sum + bias[r];
        }
    }
}

/* One row of a (possibly quantized) matrix as floats: used for the embedding lookup. */
static void matrix_row(float *out, const Matrix *W, int row, int group) {
    if (W->w) {
        memcpy(out, W->w + (size_t)row * W->cols, (size_t)W->cols * sizeof(float));
        return;
    }
    const int8_t *q = W->q + (size_t)row * W->cols;
    const float *d = W->scale + (size_t)row * (W->cols / group);
    for (int c = 0; c < W->cols; c++) out[c] = d[c / group] * (float)q[c];
}

/* gelu_new, the tanh approximation of GELU used by Phi-2. */
static void gelu_new(float *x, size_t n) {
    const float k = 0.7978845608028654f;  // sqrt(2 / pi)
    for (size_t i = 0; i < n; i++) {
        float v = x[i];
        x[i] = 0.5f * v * (1.0f + tanhf(k * (v + 0.044715f * v * v * v)));
    }
}

/* NeoX-style rotary embedding on the first rot_dim dims of one head: dims i and
 * i + rot_dim/2 form a pair rotated by angle pos * theta^(-2i/rot_dim). The cos/sin
 * values for every position come precomputed (rope_cos/rope_sin: [max_seq_len, rot_dim/2]). */
static void rotary(float *head, int rot_dim, const float *cos_row, const float *sin_row) {
    const int half = rot_dim / 2;
    for (int i = 0; i < half; i++) {
        float a = head[i], b = head[i + half];
        head[i] = a * cos_row[i] - b * sin_row[i];
        head[i + half] = b * cos_row[i] + a * sin_row[i];
    }
}

static void softmax(float *x, int n) {
    float max = x[0];
    for (int i = 1; i < n; i++) max = fmaxf(max, x[i]);
    float sum = 0.0f;
    for (int i = 0; i < n; i++) {
        x[i] = expf(x[i] - max);
        sum += x[i];
    }
    for (int i = 0; i < n; i++) x[i] /= sum;
}

/* The matrix product the forward pass calls: dispatches on the weight type. */
static void matmul(float *out, const float *in, const Matrix *W, const float *bias, int n_tokens, const Config *c,
                   QuantizedRows *scratch) {
    if (c->weight_type == WEIGHTS_F32) {
        matmul_f32_scalar(out, in, W, bias, n_tokens);
    } else {
        quantize_rows_q8(scratch, in, n_tokens, W->cols, c->group_size);
        matmul_q8_scalar(out, scratch, W, bias, n_tokens, c->group_size);
    }
}

/* ------------------------------------------------------------------------------------- */
/* 4. The forward pass                                                                    */
/* ------------------------------------------------------------------------------------- */

/* Everything that changes while the model runs. Positions are processed in batches of up
 * to max_batch (all of a prompt's tokens at once, one at a time while generating). */
typedef struct {
    int max_batch;          // positions per forward call
    int ctx;                // positions the KV cache holds (<= max_seq_len)
    int n_threads;          // attention scratch rows
    float *x;               // [max_batch, hidden] residual stream
    float *h;               // [max_batch, hidden] LayerNorm output, input of attention and MLP
    float *qkv;             // [max_batch, 3*hidden] queries, keys, values
    float *att;             // [max_batch, hidden] attention output (heads concatenated)
    float *att_proj;        // [max_batch, hidden] after the dense projection
    float *ffn;             // [max_batch, ffn] MLP hidden activations
    float *mlp_out;         // [max_batch, hidden]
    float *scores;          // [n_threads, ctx] attention weights, one row per thread
    float *logits;          // [max_batch, vocab]
    QuantizedRows xq;       // [max_batch, max(hidden, ffn)] int8 activations (q8 files)
    float *key_cache;       // [n_layers, ctx, hidden] keys, after rotary
    float *value_cache;     // [n_layers, ctx, hidden]
    float *rope_cos;        // [ctx, rot_dim/2]
    float *rope_sin;        // [ctx, rot_dim/2]
} RunState;

static int max_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

static void init_state(RunState *s, const Config *c, int ctx, int max_batch) {
    const size_t H = (size_t)c->hidden_dim, F = (size_t)c->ffn_dim, B = (size_t)max_batch;
    s->max_batch = max_batch;
    s->ctx = ctx;
    s->n_threads = max_threads();
    s->x = xmalloc_aligned(mul_size(B * H, sizeof(float)));
    s->h = xmalloc_aligned(mul_size(B * H, sizeof(float)));
    s->qkv = xmalloc_aligned(mul_size(B * 3 * H, sizeof(float)));
    s->att = xmalloc_aligned(mul_size(B * H, sizeof(float)));
    s->att_proj = xmalloc_aligned(mul_size(B * H, sizeof(float)));
    s->ffn = xmalloc_aligned(mul_size(B * F, sizeof(float)));
    s->mlp_out = xmalloc_aligned(mul_size(B * H, sizeof(float)));
    s->scores = xmalloc_aligned(mul_size(mul_size((size_t)s->n_threads, (size_t)ctx), sizeof(float)));
    s->logits = xmalloc_aligned(mul_size(B, mul_size((size_t)c->vocab_size, sizeof(float))));
    size_t widest = H > F ? H : F;
    s->xq.q = xmalloc_aligned(B * widest);
    s->xq.scale = xmalloc_aligned(mul_size(B * widest, sizeof(float)));  // generous: >= B*widest/group
    size_t cache = mul_size(mul_size((size_t)c->n_layers, (size_t)ctx), H);
    s->key_cache = xmalloc_aligned(mul_size(cache, sizeof(float)));
    s->value_cache = xmalloc_aligned(mul_size(cache, sizeof(float)));

    // Rotary angles depend only on the position: compute them once, in double precision.
    const int half = c->rot_dim / 2;
    s->rope_cos = xmalloc(mul_size(mul_size((size_t)ctx, (size_t)(half ? half : 1)), sizeof(float)));
    s->rope_sin = xmalloc(mul_size(mul_size((size_t)ctx, (size_t)(half ? half : 1)), sizeof(float)));
    for (int p = 0; p < ctx; p++) {
        for (int i = 0; i < half; i++) {
            double inv_freq = pow((double)c->rope_theta, -2.0 * i / c->rot_dim);
            s->rope_cos[(size_t)p * half + i] = (float)cos(p * inv_freq);
            s->rope_sin[(size_t)p * half + i] = (float)sin(p * inv_freq);
        }
    }
}

static void free_state(RunState *s) {
    free(s->x); free(s->h); free(s->qkv); free(s->att); free(s->att_proj); free(s->ffn);
    free(s->mlp_out); free(s->scores); free(s->logits); free(s->xq.q); free(s->xq.scale);
    free(s->key_cache); free(s->value_cache); free(s->rope_cos); free(s->rope_sin);
}

/* Causal self-attention for a batch of positions pos0 .. pos0+n_tokens-1 of one layer.
 * The batch's keys and values are already in the cache, so token t attends to cache
 * positions 0 .. pos0+t. Each (token, head) pair is independent: spread them over threads. */
static void attention(RunState *s, const Config *c, int layer, int pos0, int n_tokens) {
    const int H = c->hidden_dim, hd = c->head_dim, n_heads = c->n_heads;
    const float scale = 1.0f / sqrtf((float)hd);
    const float *keys = s->key_cache + (size_t)layer * s->ctx * H;
    const float *values = s->value_cache + (size_t)layer * s->ctx * H;
#pragma omp parallel for schedule(dynamic, 1)
    for (int th = 0; th < n_tokens * n_heads; th++) {
        const int t = th / n_heads, head = th % n_heads, n_pos = pos0 + t + 1;
#ifdef _OPENMP
        float *score = s->scores + (size_t)omp_get_thread_num() * s->ctx;
#else
        float *score = s->scores;
#endif
        const float *q = s->qkv + (size_t)t * 3 * H + (size_t)head * hd;
        for (int p = 0; p < n_pos; p++) {
            const float *k = keys + (size_t)p * H + (size_t)head * hd;
            float dot = 0.0f;
            for (int i = 0; i < hd; i++) dot += q[i] * k[i];
            score[p] = dot * scale;
        }
        softmax(score, n_pos);
        float *out = s->att + (size_t)t * H + (size_t)head * hd;
        memset(out, 0, (size_t)hd * sizeof(float));
        for (int p = 0; p < n_pos; p++) {
            const float *v = values + (size_t)p * H + (size_t)head * hd;
            const float w = score[p];
            for (int i = 0; i < hd; i++) out[i] += w * v[i];
        }
    }
}

/* Run tokens[0..n_tokens) at positions pos0.. through the model (n_tokens <= max_batch).
 * Fills the KV cache for those positions. Logits: if all_logits, every position's row is
 * written to s->logits; otherwise only the last position's, in row 0 (the lm_head is a
 * large matrix: skipping it for prompt positions nobody looks at saves real time). */
static void forward(const Model *m, RunState *s, const int *tokens, int n_tokens, int pos0, int all_logits) {
    const Config *c = &m->config;
    const int H = c->hidden_dim, F = c->ffn_dim, hd = c->head_dim, half = c->rot_dim / 2;

    for (int t = 0; t < n_tokens; t++) matrix_row(s->x + (size_t)t * H, &m->embed, tokens[t], c->group_size);

    for (int l = 0; l < c->n_layers; l++) {
        const Layer *L = &m->layers[l];
        layernorm(s->h, s->x, L->ln_weight, L->ln_bias, n_tokens, H, c->norm_eps);

        // Attention: project, rotate q and k, cache k and v, attend, project back.
        matmul(s->qkv, s->h, &L->qkv, L->qkv_bias, n_tokens, c, &s->xq);
        for (int t = 0; t < n_tokens; t++) {
            const int pos = pos0 + t;
            float *q = s->qkv + (size_t)t * 3 * H, *k = q + H, *v = q + 2 * H;
            for (int head = 0; head < c->n_heads; head++) {
                rotary(q + (size_t)head * hd, c->rot_dim, s->rope_cos + (size_t)pos * half, s->rope_sin + (size_t)pos * half);
                rotary(k + (size_t)head * hd, c->rot_dim, s->rope_cos + (size_t)pos * half, s->rope_sin + (size_t)pos * half);
            }
            size_t slot = ((size_t)l * s->ctx + (size_t)pos) * H;
            memcpy(s->key_cache + slot, k, (size_t)H * sizeof(float));
            memcpy(s->value_cache + slot, v, (size_t)H * sizeof(float));
        }
        attention(s, c, l, pos0, n_tokens);
        matmul(s->att_proj, s->att, &L->dense, L->dense_bias, n_tokens, c, &s->xq);

        // MLP on the same normalized input h: the block is parallel, not sequential.
        matmul(s->ffn, s->h, &L->fc1, L->fc1_bias, n_tokens, c, &s->xq);
        gelu_new(s->ffn, (size_t)n_tokens * F);
        matmul(s->mlp_out, s->ffn, &L->fc2, L->fc2_bias, n_tokens, c, &s->xq);

        for (size_t i = 0; i < (size_t)n_tokens * H; i++) s->x[i] += s->att_proj[i] + s->mlp_out[i];
    }

    const int first = all_logits ? 0 : n_tokens - 1, n_out = n_tokens - first;
    layernorm(s->h, s->x + (size_t)first * H, m->final_ln_weight, m->final_ln_bias, n_out, H, c->norm_eps);
    matmul(s->logits, s->h, &m->lm_head, m->lm_head_bias, n_out, c, &s->xq);
}

/* ------------------------------------------------------------------------------------- */
/* 5. Sampling                                                                            */
/* ------------------------------------------------------------------------------------- */

typedef struct {
    float temperature;  // 0: greedy
    int top_k;          // keep the k most likely tokens (0: all)
    float top_p;        // then the smallest set whose probability reaches p (1: all)
    uint64_t rng;       // xorshift64* state
} Sampler;

typedef struct {
    float prob;
    int id;
} Candidate;

static uint32_t random_u32(uint64_t *state) {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    return (uint32_t)((*state * 0x2545F4914F6CDD1DULL) >> 32);
}

static float random_f32(uint64_t *state) { return (float)(random_u32(state) >> 8) / 16777216.0f; }  // [0, 1)

static int compare_candidates(const void *a, const void *b) {
    const Candidate *x = a, *y = b;
    if (x->prob != y->prob) return x->prob > y->prob ? -1 : 1;
    return x->id - y->id;
}

static int argmax(const float *x, int n) {
    int best = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    return best;
}

/* Pick the next token from the logits of the first n_valid ids (ids past the tokenizer's
 * vocabulary are padding rows and never sampled). cand is scratch of n_valid entries. */
static int sample(Sampler *sm, const float *logits, int n_valid, Candidate *cand) {
    if (sm->temperature == 0.0f) return argmax(logits, n_valid);
    float max = logits[argmax(logits, n_valid)];
    for (int i = 0; i < n_valid; i++) cand[i] = (Candidate){expf((logits[i] - max) / sm->temperature), i};
    // Sorting 51200 candidates costs ~2 ms, small next to a forward pass; keep it simple.
    qsort(cand, (size_t)n_valid, sizeof(Candidate), compare_candidates);
    int n = (sm->top_k > 0 && sm->top_k < n_valid) ? sm->top_k : n_valid;
    float total = 0.0f;
    for (int i = 0; i < n; i++) total += cand[i].prob;
    float kept = 0.0f;
    int n_kept = 0;
    while (n_kept < n) {
        kept += cand[n_kept++].prob;
        if (kept >= sm->top_p * total) break;
    }
    float r = random_f32(&sm->rng) * kept, acc = 0.0f;
    for (int i = 0; i < n_kept; i++) {
        acc += cand[i].prob;
        if (r < acc) return cand[i].id;
    }
    return cand[n_kept - 1].id;  // rounding left r just past the total
}

/* ------------------------------------------------------------------------------------- */
/* 6. The command line                                                                    */
/* ------------------------------------------------------------------------------------- */

#ifndef PHI2_NO_MAIN

static void usage(FILE *f) {
    fprintf(f,
            "usage: phi2 MODEL.bin [options]\n"
            "\n"
            "Complete a prompt with Phi-2. MODEL.bin comes from scripts/convert.py.\n"
            "\n"
            "prompt (one of):\n"
            "  -p, --prompt TEXT      prompt text\n"
            "  -f, --file FILE        read the prompt from FILE, byte for byte\n"
            "      --ids 1,2,3        the prompt as token ids\n"
            "  (no prompt: generation starts from <|endoftext|>)\n"
            "\n"
            "generation:\n"
            "  -n, --n-predict N      tokens to generate (default 256; -1: until the context is full)\n"
            "      --temp T           temperature (default 0.8; 0 = greedy)\n"
            "      --top-k K          sample from the K most likely tokens (default 40; 0 = all)\n"
            "      --top-p P          nucleus sampling threshold (default 0.95; 1 = off)\n"
            "  -s, --seed N           random seed (default: from the clock)\n"
            "  -c, --ctx-size N       context length (default and maximum: the model's, 2048)\n"
            "  -t, --threads N        threads (default: all available cores)\n"
            "  -b, --batch N          prompt positions processed together (default 64; 1 = one\n"
            "                         at a time through the KV cache, as during generation)\n"
            "      --ignore-eos       keep generating past <|endoftext|> (for benchmarks)\n"
            "      --no-display-prompt  do not echo the prompt before the completion\n"
            "\n"
            "testing and inspection:\n"
            "      --tokenize         print the prompt's token ids (comma-separated) and exit\n"
            "      --print-ids        print generated token ids (comma-separated) instead of text\n"
            "      --dump-logits FILE write the logits of every prompt position (float32 rows of\n"
            "                         vocab_size, little-endian) and exit\n"
            "  -h, --help             this help\n"
            "\n"
            "Text streams to stdout; timings and the reason generation stopped go to stderr.\n");
}

typedef struct {
    const char *model_path;
    const char *prompt;         // -p
    const char *prompt_file;    // -f
    const char *ids;            // --ids
    const char *dump_logits;    // --dump-logits
    long n_predict;
    float temperature, top_p;
    int top_k;
    uint64_t seed;
    int seed_given;
    int ctx;                    // 0: the model's max_seq_len
    int batch;                  // prompt positions per forward pass
    int n_threads;              // 0: all cores
    int tokenize, print_ids, no_display_prompt, ignore_eos;
} Options;

static Options parse_args(int argc, char **argv) {
    Options o = {.n_predict = 256, .temperature = 0.8f, .top_p = 0.95f, .top_k = 40, .batch = 64};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            exit(0);
        }
        // flags without a value
        if (!strcmp(a, "--tokenize")) { o.tokenize = 1; continue; }
        if (!strcmp(a, "--print-ids")) { o.print_ids = 1; continue; }
        if (!strcmp(a, "--no-display-prompt")) { o.no_display_prompt = 1; continue; }
        if (!strcmp(a, "--ignore-eos")) { o.ignore_eos = 1; continue; }
        if (a[0] != '-' || a[1] == '\0') {
            if (o.model_path) die("unexpected argument '%s' (the model path is '%s'); see -h", a, o.model_path);
            o.model_path = a;
            continue;
        }
        // flags with a value
        if (i + 1 >= argc) die("%s needs a value; see -h", a);
        const char *v = argv[++i];
        if (!strcmp(a, "-p") || !strcmp(a, "--prompt")) o.prompt = v;
        else if (!strcmp(a, "-f") || !strcmp(a, "--file")) o.prompt_file = v;
        else if (!strcmp(a, "--ids")) o.ids = v;
        else if (!strcmp(a, "--dump-logits")) o.dump_logits = v;
        else if (!strcmp(a, "-n") || !strcmp(a, "--n-predict")) o.n_predict = parse_long(a, v, -1, INT_MAX);
        else if (!strcmp(a, "--temp")) o.temperature = (float)parse_double(a, v, 0.0, 100.0);
        else if (!strcmp(a, "--top-k")) o.top_k = (int)parse_long(a, v, 0, INT_MAX);
        else if (!strcmp(a, "--top-p")) o.top_p = (float)parse_double(a, v, 0.0, 1.0);
        else if (!strcmp(a, "-s") || !strcmp(a, "--seed")) { o.seed = (uint64_t)parse_long(a, v, 0, LONG_MAX); o.seed_given = 1; }
        else if (!strcmp(a, "-c") || !strcmp(a, "--ctx-size")) o.ctx = (int)parse_long(a, v, 1, INT_MAX);
        else if (!strcmp(a, "-b") || !strcmp(a, "--batch")) o.batch = (int)parse_long(a, v, 1, 4096);
        else if (!strcmp(a, "-t") || !strcmp(a, "--threads")) o.n_threads = (int)parse_long(a, v, 1, 1024);
        else die("unknown option '%s'; see -h", a);
    }
    if (!o.model_path) die("no model file given; usage: phi2 MODEL.bin [-p PROMPT] (see -h)");
    if ((o.prompt != NULL) + (o.prompt_file != NULL) + (o.ids != NULL) > 1)
        die("give the prompt only once: -p, -f or --ids");
    if (o.top_p <= 0.0f) die("--top-p must be greater than 0");
    return o;
}

/* "1,2,3" -> ids, each checked against the vocabulary. */
static int *parse_ids(const char *s, int vocab_size, int *n_out) {
    int cap = 16, n = 0;
    int *ids = xmalloc(sizeof(int) * (size_t)cap);
    const char *p = s;
    for (;;) {
        char *end = NULL;
        errno = 0;
        long v = strtol(p, &end, 10);
        if (end == p || errno || v < 0 || v >= vocab_size)
            die("--ids expects comma-separated token ids in [0, %d), got '%s'", vocab_size, s);
        if (n == cap) {
            cap *= 2;
            int *grown = realloc(ids, sizeof(int) * (size_t)cap);
            if (!grown) die("out of memory");
            ids = grown;
        }
        ids[n++] = (int)v;
        if (*end == '\0') break;
        if (*end != ',') die("--ids expects comma-separated token ids, got '%s'", s);
        p = end + 1;
    }
    *n_out = n;
    return ids;
}

static void print_ids(FILE *f, const int *ids, int n) {
    for (int i = 0; i < n; i++) fprintf(f, i ? ",%d" : "%d", ids[i]);
    fprintf(f, "\n");
}

/* --dump-logits: every prompt position's logits, written to a temporary file then renamed. */
static void dump_logits(const Model *m, RunState *s, const int *tokens, int n_tokens, const char *path) {
    const int V = m->config.vocab_size;
    if (snprintf(g_partial_file, sizeof(g_partial_file), "%s.tmp", path) >= (int)sizeof(g_partial_file))
        die("--dump-logits path is too long");
    FILE *f = fopen(g_partial_file, "wb");
    if (!f) die("cannot create '%s': %s", g_partial_file, strerror(errno));
    for (int start = 0; start < n_tokens; start += s->max_batch) {
        int n = n_tokens - start < s->max_batch ? n_tokens - start : s->max_batch;
        forward(m, s, tokens + start, n, start, 1);
        if (fwrite(s->logits, sizeof(float), (size_t)n * V, f) != (size_t)n * V)
            die("cannot write '%s': %s", g_partial_file, strerror(errno));
    }
    if (fclose(f) != 0) die("cannot write '%s': %s", g_partial_file, strerror(errno));
    if (rename(g_partial_file, path) != 0) die("cannot rename '%s' to '%s': %s", g_partial_file, path, strerror(errno));
    g_partial_file[0] = '\0';
}

/* The prompt as token ids: --ids as given, text (-p / -f) through the tokenizer.
 * *text (may be NULL) keeps the prompt's bytes for echoing. */
static int *read_prompt(const Options *opt, const Model *m, int *n_out, unsigned char **text, size_t *text_len) {
    *text = NULL;
    *text_len = 0;
    if (opt->ids) return parse_ids(opt->ids, m->config.vocab_size, n_out);
    if (opt->prompt_file) *text = read_file(opt->prompt_file, text_len);
    else if (opt->prompt) {
        *text_len = strlen(opt->prompt);
        *text = xmalloc(*text_len + 1);
        memcpy(*text, opt->prompt, *text_len + 1);
    }
    int *ids = NULL;
    size_t n = 0;
    if (*text_len > 0 && tokenizer_encode(&m->tokenizer, *text, *text_len, &ids, &n) != 0)
        die("out of memory tokenizing the prompt");
    if (n > INT_MAX) die("prompt too long");
    *n_out = (int)n;
    return ids;
}

/* Process the prompt, then sample, print and feed back tokens until end of text, the -n
 * limit or a full context. The sequence (prompt + generated) never exceeds ctx, and the
 * last token (whose logits nobody reads) is not fed. Timings go to stderr. */
static void generate(const Model *m, RunState *s, const Options *opt, const int *prompt, int n_prompt,
                     const unsigned char *text, size_t text_len, int ctx, double t_load) {
    const Config *c = &m->config;
    const int n_vocab_real = m->tokenizer.n_tokens < c->vocab_size ? m->tokenizer.n_tokens : c->vocab_size;
    Sampler sampler = {.temperature = opt->temperature, .top_k = opt->top_k, .top_p = opt->top_p,
                       .rng = opt->seed_given ? opt->seed : (uint64_t)time(NULL)};
    sampler.rng = sampler.rng * 0x9E3779B97F4A7C15ULL + 1;  // never zero: xorshift would stick
    Candidate *cand = xmalloc(mul_size((size_t)n_vocab_real, sizeof(Candidate)));
    Utf8Stream stream = {0};
    if (!opt->print_ids && !opt->no_display_prompt && text) utf8_stream_write(&stream, text, text_len, stdout);
    fflush(stdout);

    // Prompt: all positions in batches, logits of the last one only.
    double t0 = now_seconds();
    for (int start = 0; start < n_prompt; start += s->max_batch) {
        int n = n_prompt - start < s->max_batch ? n_prompt - start : s->max_batch;
        forward(m, s, prompt + start, n, start, 0);
    }
    double t_prompt = now_seconds() - t0;

    // Generation: one token per forward pass.
    long n_limit = opt->n_predict < 0 ? LONG_MAX : opt->n_predict;
    int *generated = xmalloc(mul_size((size_t)ctx + 1, sizeof(int)));
    int n_gen = 0, n_decoded = 0, pos = n_prompt;
    const char *stop_reason;
    t0 = now_seconds();
    for (;;) {
        if (n_gen >= n_limit) { stop_reason = "generated the -n limit of tokens"; break; }
        if (pos >= ctx) { stop_reason = "the context is full"; break; }
        if (opt->ignore_eos) s->logits[c->eos_id] = -INFINITY;
        int next = sample(&sampler, s->logits, n_vocab_real, cand);
        if (next == c->eos_id) { stop_reason = "end of text"; break; }
        generated[n_gen++] = next;
        if (!opt->print_ids) {
            size_t len = 0;
            const unsigned char *bytes = tokenizer_token_bytes(&m->tokenizer, next, &len);
            utf8_stream_write(&stream, bytes, len, stdout);
            fflush(stdout);
        }
        if (n_gen < n_limit && pos + 1 < ctx) {
            forward(m, s, &next, 1, pos, 0);
            n_decoded++;
        }
        pos++;
    }
    double t_gen = now_seconds() - t0;
    if (opt->print_ids) print_ids(stdout, generated, n_gen);
    else {
        utf8_stream_flush(&stream, stdout);
        printf("\n");
    }
    fflush(stdout);

    fprintf(stderr, "\nphi2: stopped: %s\n", stop_reason);
    // Decode reads every weight once per token: tok/s x bytes is the memory bandwidth used.
    double gen_tps = t_gen > 0 ? n_decoded / t_gen : 0.0;
    fprintf(stderr, "phi2: load %.2f s | prompt %d tokens, %.2f tok/s | generated %d tokens, %.2f tok/s "
            "(%.1f GB/s of weights) | %d threads\n",
            t_load, n_prompt, t_prompt > 0 ? n_prompt / t_prompt : 0.0, n_gen, gen_tps,
            gen_tps * (double)m->weight_bytes * 1e-9, max_threads());
    free(generated);
    free(cand);
}

int main(int argc, char **argv) {
    Options opt = parse_args(argc, argv);
#ifdef _OPENMP
    if (opt.n_threads > 0) omp_set_num_threads(opt.n_threads);
#else
    if (opt.n_threads > 1) fprintf(stderr, "phi2: built without OpenMP, running on 1 thread\n");
#endif

    double t_load = now_seconds();
    Model model;
    load_model(&model, opt.model_path);
    const Config *c = &model.config;

    int n_prompt = 0;
    unsigned char *text = NULL;
    size_t text_len = 0;
    int *prompt = read_prompt(&opt, &model, &n_prompt, &text, &text_len);
    if (opt.tokenize) {
        print_ids(stdout, prompt, n_prompt);
    } else {
        if (n_prompt == 0) {  // Phi-2 adds no BOS; with nothing to condition on, start from it
            free(prompt);
            prompt = xmalloc(sizeof(int));
            prompt[0] = c->bos_id;
            n_prompt = 1;
        }
        int ctx = opt.ctx ? opt.ctx : c->max_seq_len;
        if (ctx > c->max_seq_len) die("--ctx-size %d exceeds the model's maximum of %d", ctx, c->max_seq_len);
        if (n_prompt > ctx) die("the prompt is %d tokens, longer than the context of %d tokens", n_prompt, ctx);

        // The KV cache only needs the positions we will actually use.
        long needed = opt.dump_logits ? n_prompt : (opt.n_predict < 0 ? ctx : n_prompt + opt.n_predict);
        int cache_len = needed < ctx ? (int)needed : ctx;
        RunState state;
        init_state(&state, c, cache_len, opt.batch);
        t_load = now_seconds() - t_load;

        if (opt.dump_logits) dump_logits(&model, &state, prompt, n_prompt, opt.dump_logits);
        else generate(&model, &state, &opt, prompt, n_prompt, text, text_len, ctx, t_load);
        free_state(&state);
    }
    free(prompt);
    free(text);
    free_model(&model);
    return 0;
}

#endif /* PHI2_NO_MAIN */
