/*
 * phi2.c -- inference for Microsoft's Phi-2 (2.7B) in one file of plain C.
 *
 * Read it top to bottom; it follows the data, and whoever stops at the end of main() has
 * read the whole model:
 *   1. utilities          errors, checked allocation, number parsing
 *   2. the model file     header validation, the weights in place (docs/FORMAT.md)
 *   3. kernels            LayerNorm, matrix products (f32, int8, 4-bit), GELU, rotary, softmax,
 *                         in plain scalar C: the definitions, and what `make portable` runs
 *   4. the forward pass   a batch of positions through all layers, with a KV cache
 *   5. sampling           greedy, temperature, top-k, top-p, min-p, penalties
 *   6. the command line   prompt in, streamed text out; the prompt cache; a conversation
 *                         (-i); perplexity
 * Appendices, for speed and portability only:
 *   A. work sharing       which kernels this build has; how threads split a product's rows
 *   B. vector kernels     float32 and the f16 KV cache over this build's vector (AVX-512,
 *                         AVX2, NEON); x86 int8 (AVX-512 VNNI, AVX2, AMX)
 *   C. Arm kernels        int8 with NEON, dotprod (SDOT) and i8mm (SMMLA)
 *   D. batch attention    section 4's attention blocked over queries and keys, with an
 *                         online softmax (flash-attention style), for prompts
 *   E. dispatch           the one place that picks each operation's kernel and threads
 *   F. platform           files, memory mapping, huge pages, signals, the AMX permission;
 *                         POSIX and Windows (MinGW-w64)
 *   G. threads            the pool that runs a generated token's steps
 * tests/test_kernels.c checks every kernel of Appendices B-D against its definition.
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
#define _DEFAULT_SOURCE  // MAP_POPULATE, MADV_HUGEPAGE
#ifdef _WIN32
#define __USE_MINGW_ANSI_STDIO 1  // MinGW: C99 printf (%zu, %lld), not the old msvcrt one
#endif
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#ifdef _WIN32  // Appendix F has the Windows versions of the platform functions
#include <io.h>
#else
#include <sys/mman.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#else
#pragma GCC diagnostic ignored "-Wunknown-pragmas"  // without OpenMP the omp pragmas do nothing
#endif
#if !defined(PHI2_SCALAR_ONLY) && (defined(__AVX2__) || defined(__AVX512F__))
#include <immintrin.h>
#endif

#include "tokenizer.h"

/* Model files are little-endian and used in place, without conversion. */
#if defined(__BYTE_ORDER__) && defined(__ORDER_BIG_ENDIAN__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
#error "phi2.c needs a little-endian CPU: it uses the (little-endian) model file in place"
#endif

#define ALWAYS_INLINE inline __attribute__((always_inline))
#define MAYBE_UNUSED __attribute__((unused))  // scalar twins and helpers some builds do not call

/* ------------------------------------------------------------------------------------- */
/* 1. Utilities                                                                           */
/* ------------------------------------------------------------------------------------- */

/* What POSIX and Windows do differently, as a few functions defined in Appendix F. */
static void setup_process(int *argc, char ***argv);  // ignore SIGPIPE; Windows: UTF-8 argv, binary stdout, UTF-8 console
static FILE *fopen_path(const char *path, const char *mode);  // paths are UTF-8 (on Windows too)
static int remove_path(const char *path);
static void catch_termination_signals(void (*handler)(int));  // Ctrl-C, kill, hangup
static double now_seconds(void);        // monotonic clock
static void *xmalloc_aligned(size_t n); // 64-byte aligned, released with free_aligned (not free)
static void free_aligned(void *p);
static void *xmalloc_prefaulted(size_t n);  // zeroed, its pages in place already; released with free_prefaulted
static void free_prefaulted(void *p, size_t n);
static FILE *create_partial_file(const char *path);  // "wb", removable while still open
static int replace_file(const char *from, const char *to);  // rename over an existing file: 0, or -1 and errno
static int reader_gone(int err);        // whether a failed write (errno err) met a closed pipe
static int is_terminal(FILE *f);        // a terminal (Windows: a console), not a file or pipe
static void catch_interrupts(void (*handler)(int));  // Ctrl-C calls handler each time and ends a blocking
                                        // read of stdin (EINTR); SIG_DFL: back to the default
static void use_sleeping_thread_wait(char **argv);  // idle OpenMP threads sleep, not spin (may restart the program)
MAYBE_UNUSED static int count_fast_cores(const char **which);  // the default thread count; *which: "performance cores", ...

/* A file being written (e.g. --dump-logits) goes to "<path>.tmp" and is renamed when
 * complete; if we die first, the temporary is removed so nothing half-written remains. */
static char g_partial_file[4096];
static void die(const char *fmt, ...);
#ifdef PHI2_FUZZ
/* Fuzz harnesses (tests/fuzz/) include this file and define this: every error, which
 * would exit(1), jumps back to the harness instead, so one process runs millions of inputs. */
void phi2_fuzz_on_error(void) __attribute__((noreturn));
#endif

/* Ctrl-C or a kill while that file is being written: remove it, then die of the signal as
 * usual (unlink, signal and raise are async-signal-safe). */
static void remove_partial_file_and_reraise(int sig) {
    if (g_partial_file[0]) remove_path(g_partial_file);
    signal(sig, SIG_DFL);
    raise(sig);
}

static void begin_partial_file(const char *path) {
    if (snprintf(g_partial_file, sizeof(g_partial_file), "%s.tmp", path) >= (int)sizeof(g_partial_file)) {
        g_partial_file[0] = '\0';
        die("output path '%s' is too long", path);
    }
    catch_termination_signals(remove_partial_file_and_reraise);
}

/* One line on stderr, "phi2: <kind>: <message>", after what stdout holds so far. */
static void report(const char *kind, const char *fmt, va_list ap) {
    fflush(stdout);
    fprintf(stderr, "phi2: %s: ", kind);
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
}

/* A warning: the run goes on. */
static void warn(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    report("warning", fmt, ap);
    va_end(ap);
}

/* An error: the line, then exit with status 1 (removing a half-written output file). */
static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    report("error", fmt, ap);
    va_end(ap);
    if (g_partial_file[0]) remove_path(g_partial_file);
#ifdef PHI2_FUZZ
    phi2_fuzz_on_error();  // a fuzz harness returns to the fuzzer instead of exiting
#endif
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

/* Strict number parsing for flags: the whole string must be a number within [lo, hi].
 * long long, not long: long is 32 bits on Windows. */
static long long parse_long(const char *flag, const char *s, long long lo, long long hi) {
    char *end = NULL;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno || end == s || *end != '\0' || v < lo || v > hi)
        die("%s expects an integer in [%lld, %lld], got '%s'", flag, lo, hi, s);
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

/* Read a whole file of at most max_len bytes into memory (prompt files are used byte for
 * byte, no stripping). A longer file (or an endless one: -f /dev/zero) is an error. */
static unsigned char *read_file(const char *path, size_t max_len, size_t *len) {
    const int from_stdin = strcmp(path, "-") == 0;  // -f -: the prompt from standard input
    if (from_stdin) path = "standard input";
    FILE *f = from_stdin ? stdin : fopen_path(path, "rb");
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
        if (n > max_len) die("'%s' is longer than %zu bytes, more than the context can hold", path, max_len);
    }
    if (ferror(f)) die("cannot read '%s': %s", path, strerror(errno));
    if (!from_stdin) fclose(f);
    *len = n;
    return buf;
}

/* Ctrl-C during a run stops it cleanly: the handler only sets this flag (async-signal-safe)
 * and puts back the default action, so a second Ctrl-C kills at once; the prompt and
 * generation loops look at it between forward passes. */
static volatile sig_atomic_t g_interrupted = 0;

static void on_interrupt(int sig) {
    g_interrupted = 1;
    signal(sig, SIG_DFL);
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
#define MODEL_VERSION 2
#define HEADER_SIZE 256
#define TENSOR_ALIGN 64
#define Q8_GROUP 64  // q8 matrices: consecutive weights of a row sharing one float32 scale
#define Q4_GROUP 32  // q4 matrices: consecutive weights of a row sharing one float16 scale
#define Q4_BLOCK 64  // q4 matrices: weights whose 4-bit codes share 32 bytes (two groups)
enum { WEIGHTS_F32 = 0, WEIGHTS_Q8 = 1, WEIGHTS_Q4 = 2 };

/* The 16 values a 4-bit code stands for, in units of its group's scale: non-uniform (denser
 * near zero, where most weights are), fitted to weights by scripts/quant_study.py. Kernels
 * turn codes into these int8 values with one table lookup, then multiply as int8. They stay
 * within +-63 so that a level + 64 is a byte below 128 (the x86 kernels, Appendix B). */
static const int8_t Q4_LEVELS[16] = {-61, -47, -36, -28, -20, -14, -8, -3, 3, 8, 14, 20, 28, 36, 47, 61};

typedef struct {
    int weight_type;    // WEIGHTS_F32, WEIGHTS_Q8 or WEIGHTS_Q4 (of the layers' matrices)
    int vocab_size;     // rows of the embedding and lm_head (51200; ids >= 50295 are padding)
    int hidden_dim;     // width of the residual stream (2560)
    int ffn_dim;        // width of the MLP (10240)
    int n_layers;       // transformer blocks (32)
    int n_heads;        // attention heads (32); key/value heads are the same heads
    int head_dim;       // hidden_dim / n_heads (80)
    int rot_dim;        // leading dims of each head that get rotary embeddings (32)
    int max_seq_len;    // positions the model was trained for (2048)
    int group_size;     // q8: weights sharing one scale (64); q4: 32; f32: 0
    float rope_theta;   // rotary base (10000)
    float norm_eps;     // LayerNorm epsilon (1e-5)
    int bos_id, eos_id; // <|endoftext|> (50256) for both
} Config;

/* A weight matrix in PyTorch's Linear layout: y = W x, one row per output feature. In q4
 * files the layers' matrices are q4 and embed / lm_head are q8 (docs/FORMAT.md). */
typedef struct {
    int rows, cols;            // output features, input features
    int type;                  // WEIGHTS_F32, WEIGHTS_Q8 or WEIGHTS_Q4: which pointers are set
    const float *w;            // f32: [rows, cols]
    const int8_t *q;           // q8: [rows, cols] int8 weights ...
    const float *scale;        // q8: [rows, cols / Q8_GROUP] ... times one scale per group
    const uint8_t *codes;      // q4: [rows, cols / 2] 4-bit codes, two per byte (see q4_code) ...
    const uint16_t *scale16;   // q4: [rows, cols / Q4_GROUP] ... levels times a float16 scale per group
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
    const unsigned char *map;            // the whole file, read-only
    size_t map_size;
    int mapped;                          // map is an mmap (else a malloc'd copy in huge pages)
    const char *load_why;                // which of the two, and why ("mapped, a short run", ...)
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

static Matrix take_matrix(WeightCursor *c, int type, int rows, int cols, const char *what) {
    Matrix m = {.rows = rows, .cols = cols, .type = type};
    size_t n = mul_size((size_t)rows, (size_t)cols);
    if (type == WEIGHTS_F32) {
        m.w = take_bytes(c, mul_size(n, sizeof(float)), what);
    } else if (type == WEIGHTS_Q8) {
        m.q = take_bytes(c, n, what);
        m.scale = take_bytes(c, mul_size(n / Q8_GROUP, sizeof(float)), what);
    } else {
        m.codes = take_bytes(c, n / 2, what);
        m.scale16 = take_bytes(c, mul_size(n / Q4_GROUP, sizeof(uint16_t)), what);
    }
    return m;
}

/* Upper limits on the header's dimensions: far above Phi-2's (and any model this engine
 * could run), low enough that every product of them fits comfortably in 64 bits. */
static const struct { const char *name; uint32_t max; } DIM_LIMITS[8] = {
    {"vocab_size", 1u << 20}, {"hidden_dim", 1u << 16}, {"ffn_dim", 1u << 18}, {"n_layers", 1u << 10},
    {"n_heads", 1u << 10},    {"head_dim", 1u << 12},   {"rot_dim", 1u << 12}, {"max_seq_len", 1u << 20},
};

/* Validate the header field by field: a wrong file must fail here with a clear message,
 * never later with a crash or with garbage text. */
static Config parse_header(const unsigned char *h, size_t file_size, const char *path) {
    const uint16_t one = 1;  // for compilers the #error above cannot see through
    if (*(const unsigned char *)&one != 1) die("this CPU is big-endian: phi2.c reads little-endian model files in place");
    if (memcmp(h, MODEL_MAGIC, 8) != 0)
        die("'%s' is not a phi2.c model file (bad magic); convert a checkpoint with scripts/convert.py", path);
    uint32_t version = read_u32(h + 8);
    if (version != MODEL_VERSION)
        die("'%s' has format version %u, this build reads version %d: reconvert it with scripts/convert.py",
            path, version, MODEL_VERSION);
    if (read_u64(h + 248) != fnv1a64(h, 248)) die("'%s' is corrupt: header checksum mismatch", path);
    if (read_u32(h + 68) != 0) die("'%s' is corrupt: reserved header field at byte 68 is not zero", path);
    for (int i = 136; i < 248; i++)
        if (h[i] != 0) die("'%s' is corrupt: reserved header bytes are not zero", path);

    Config c;
    uint32_t weight_type = read_u32(h + 12);
    uint32_t dims[9];  // vocab, hidden, ffn, layers, heads, head_dim, rot_dim, max_seq_len, group_size
    for (int i = 0; i < 9; i++) dims[i] = read_u32(h + 16 + 4 * i);
    c.rope_theta = read_f32(h + 52);
    c.norm_eps = read_f32(h + 56);
    uint32_t bos = read_u32(h + 60), eos = read_u32(h + 64);

    if (weight_type != WEIGHTS_F32 && weight_type != WEIGHTS_Q8 && weight_type != WEIGHTS_Q4)
        die("'%s' has unknown weight type %u (expected 0 = f32, 1 = q8 or 2 = q4)", path, weight_type);
    for (int i = 0; i < 8; i++)
        if (dims[i] == 0 || dims[i] > DIM_LIMITS[i].max)
            die("'%s' is corrupt: %s %u is outside [1, %u]", path, DIM_LIMITS[i].name, dims[i], DIM_LIMITS[i].max);
    c.weight_type = (int)weight_type;
    c.vocab_size = (int)dims[0];
    c.hidden_dim = (int)dims[1];
    c.ffn_dim = (int)dims[2];
    c.n_layers = (int)dims[3];
    c.n_heads = (int)dims[4];
    c.head_dim = (int)dims[5];
    c.rot_dim = (int)dims[6];
    c.max_seq_len = (int)dims[7];
    if (weight_type == WEIGHTS_F32 && dims[8] != 0) die("'%s' is corrupt: f32 file with a group size", path);
    if (weight_type == WEIGHTS_Q8 && (dims[8] != Q8_GROUP || dims[1] % Q8_GROUP != 0 || dims[2] % Q8_GROUP != 0))
        die("'%s' is corrupt: q8 group size %u must be %d and divide the hidden and MLP sizes", path, dims[8], Q8_GROUP);
    if (weight_type == WEIGHTS_Q4 && (dims[8] != Q4_GROUP || dims[1] % Q4_BLOCK != 0 || dims[2] % Q4_BLOCK != 0))
        die("'%s' is corrupt: q4 group size %u must be %d, and %d divide the hidden and MLP sizes", path, dims[8],
            Q4_GROUP, Q4_BLOCK);
    c.group_size = (int)dims[8];
    if ((uint64_t)dims[5] * dims[4] != dims[1])
        die("'%s' is corrupt: %u heads x %u dims != hidden size %u", path, dims[4], dims[5], dims[1]);
    if (dims[6] % 2 != 0 || dims[6] > dims[5])
        die("'%s' is corrupt: rotary dims %u must be even and <= head dim %u", path, dims[6], dims[5]);
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

/* Getting the file's bytes into memory is platform code (Appendix F): a copy in huge pages
 * (the default where it fits in memory, or --no-mmap), or a read-only memory map of the
 * file (--mmap, and the fallback). */
static int open_model_file(const char *path, uint64_t *size);  // a descriptor, or dies: missing, not a regular file
static const unsigned char *map_file(int fd, size_t size, const char *path);  // released with unmap_file
static void unmap_file(const unsigned char *map, size_t size);
static const unsigned char *read_into_huge_pages(int fd, size_t size, const char *path);  // free_aligned
static unsigned long long memory_available(void);  // bytes the system can give us now (0: unknown)

/* While read_into_huge_pages reads a large model (seconds): how far it is, on one line of
 * stderr, where stderr is a terminal (is_terminal); erased when done == size. */
static void show_read_progress(size_t done, size_t size, int is_terminal) {
    if (!is_terminal || size < ((size_t)256 << 20)) return;
    if (done < size) fprintf(stderr, "\rphi2: reading the model into memory: %3d%%", (int)(100.0 * (double)done / (double)size));
    else fprintf(stderr, "\r%60s\r", "");
    fflush(stderr);
}

/* Map the file, or copy it into memory? Decode streams every weight once per token, and
 * from huge pages it runs faster than from the mapped file (fewer TLB misses), but the copy
 * reads the whole file before the first token: seconds, more when the kernel must first
 * free and compact memory for the huge pages. A map starts at once. So by default a run
 * that will generate COPY_MIN_TOKENS tokens or more, or has no such end (-i, --perplexity,
 * -n -1), copies the file, and a shorter one maps it (docs/PERFORMANCE.md, "Loading": the
 * crossover). The copy is made only if it fits comfortably: with a quarter of the model and
 * 1 GB to spare, for the KV cache, buffers and everything else running; otherwise the map,
 * which the OS can page in and out as it needs. */
enum { COPY_MIN_TOKENS = 512 };

static int copy_fits_in_memory(size_t file_size) {
    const unsigned long long available = memory_available(), margin = (unsigned long long)file_size / 4 + (1ull << 30);
    return available > margin && (unsigned long long)file_size <= available - margin;
}

/* The weights section's two checksums (docs/FORMAT.md): the plain sum of its little-endian
 * u64 words, which changes with any flipped bit, and the sum of (i+1) * word_i, which also
 * changes when words trade places; both mod 2^64. They are checked where that costs next to
 * nothing, after a copy into memory, and on request (--verify): from a fresh map, reading
 * every weight costs more than the first token. A download is checked against its SHA-256
 * already; a damaged weight section gives wrong numbers, never a crash (non-finite logits
 * stop the run with an error). */
static void weights_checksums(const unsigned char *p, size_t n_words, uint64_t *sum, uint64_t *weighted) {
    uint64_t s = 0, w = 0;
#pragma omp parallel for schedule(dynamic, 1 << 15) reduction(+ : s, w)  // 256 KB chunks: a busy core takes fewer
    for (size_t i = 0; i < n_words; i++) {
        uint64_t word;
        memcpy(&word, p + 8 * i, 8);  // little-endian, like the rest of the file
        s += word;
        w += (uint64_t)(i + 1) * word;
    }
    *sum = s;
    *weighted = w;
}

/* Validate a whole model file held in memory (data[0..size), which must outlive the Model),
 * then point every tensor into it. The fuzz harness calls this directly on its bytes. */
static void parse_model(Model *m, const unsigned char *data, size_t size, const char *path) {
    if (size < HEADER_SIZE) die("'%s' is too small (%zu bytes) to be a phi2.c model file", path, size);
    Config c = parse_header(data, size, path);
    m->config = c;

    // Sections: the tokenizer right after the header, then the weights at the next 64-byte
    // boundary (zero padding between), together filling the file exactly.
    uint64_t tok_off = read_u64(data + 72), tok_size = read_u64(data + 80);
    uint64_t w_off = read_u64(data + 88), w_size = read_u64(data + 96);
    if (tok_off != HEADER_SIZE || tok_size > size - tok_off)
        die("'%s' is corrupt: tokenizer section out of bounds", path);
    uint64_t tok_end = tok_off + tok_size, padded_end = (tok_end + TENSOR_ALIGN - 1) / TENSOR_ALIGN * TENSOR_ALIGN;
    if (w_off != padded_end || w_off > size || w_size != size - w_off)
        die("'%s' is corrupt: weights section out of bounds", path);
    for (uint64_t i = tok_end; i < w_off; i++)
        if (data[i] != 0) die("'%s' is corrupt: padding after the tokenizer section is not zero", path);
    if (read_u64(data + 112) != fnv1a64(data + tok_off, tok_size))
        die("'%s' is corrupt: tokenizer checksum mismatch", path);
    char err[256];
    if (tokenizer_load(&m->tokenizer, data + tok_off, tok_size, err, sizeof(err)) != 0)
        die("'%s': bad tokenizer section: %s", path, err);
    // Every id the tokenizer can produce must have an embedding row (ids from n_tokens up
    // to vocab_size are padding rows that the tokenizer never produces).
    if (m->tokenizer.n_tokens > c.vocab_size)
        die("'%s' is corrupt: the tokenizer has %d tokens, more than vocab_size %d", path, m->tokenizer.n_tokens,
            c.vocab_size);

    // Weights, in the order docs/FORMAT.md lists them.
    const int H = c.hidden_dim, F = c.ffn_dim, V = c.vocab_size;
    WeightCursor cur = {.base = data + w_off, .size = w_size, .offset = 0, .path = path};
    const int table_type = c.weight_type == WEIGHTS_F32 ? WEIGHTS_F32 : WEIGHTS_Q8;  // embed, lm_head
    m->embed = take_matrix(&cur, table_type, V, H, "embed");
    m->layers = xcalloc((size_t)c.n_layers, sizeof(Layer));
    for (int l = 0; l < c.n_layers; l++) {
        Layer *L = &m->layers[l];
        L->ln_weight = take_vector(&cur, H, "ln_weight");
        L->ln_bias = take_vector(&cur, H, "ln_bias");
        L->qkv = take_matrix(&cur, c.weight_type, 3 * H, H, "qkv_weight");
        L->qkv_bias = take_vector(&cur, 3 * H, "qkv_bias");
        L->dense = take_matrix(&cur, c.weight_type, H, H, "dense_weight");
        L->dense_bias = take_vector(&cur, H, "dense_bias");
        L->fc1 = take_matrix(&cur, c.weight_type, F, H, "fc1_weight");
        L->fc1_bias = take_vector(&cur, F, "fc1_bias");
        L->fc2 = take_matrix(&cur, c.weight_type, H, F, "fc2_weight");
        L->fc2_bias = take_vector(&cur, H, "fc2_bias");
    }
    m->final_ln_weight = take_vector(&cur, H, "final_ln_weight");
    m->final_ln_bias = take_vector(&cur, H, "final_ln_bias");
    m->lm_head = take_matrix(&cur, table_type, V, H, "lm_head_weight");
    m->lm_head_bias = take_vector(&cur, V, "lm_head_bias");
    size_t end = (cur.offset + TENSOR_ALIGN - 1) / TENSOR_ALIGN * TENSOR_ALIGN;
    if (end != w_size)
        die("'%s' is corrupt: weights section is %llu bytes, the header's shapes need %zu", path,
            (unsigned long long)w_size, end);
    // Everything but the embedding table (of which one row is read) streams through per token.
    m->weight_bytes = w_size - (size_t)((const unsigned char *)m->layers[0].ln_weight - cur.base);
}

/* The weights checksums of a parsed model file against its header's; dies on a mismatch. */
static void verify_weights(const unsigned char *data, const char *path) {
    uint64_t sum, weighted;
    weights_checksums(data + read_u64(data + 88), read_u64(data + 96) / 8, &sum, &weighted);
    if (sum != read_u64(data + 120) || weighted != read_u64(data + 128))
        die("'%s' is corrupt: weights checksum mismatch (a damaged or incomplete copy?)", path);
}

/* Open the file, read it into memory or map it (use_mmap: 1 map, 0 copy, -1 the default
 * for a run that is long or not: copy_fits_in_memory), then validate it: its structure
 * always, its weights checksums after a copy or with verify. */
static void load_model(Model *m, const char *path, int use_mmap, int long_run, int verify) {
    memset(m, 0, sizeof(*m));
    uint64_t file_size = 0;
    int fd = open_model_file(path, &file_size);
    if (file_size < HEADER_SIZE) die("'%s' is too small (%llu bytes) to be a phi2.c model file", path, (unsigned long long)file_size);
    if (file_size > SIZE_MAX) die("'%s' is too large to map on this system", path);
    size_t size = (size_t)file_size;
    m->load_why = use_mmap > 0 ? "mapped, --mmap" : use_mmap == 0 ? "in memory, --no-mmap" : NULL;
    if (use_mmap < 0) {
        const int fits = copy_fits_in_memory(size);
        use_mmap = !long_run || !fits;
        m->load_why = !long_run ? "mapped, a short run" : fits ? "in memory, a long run" : "mapped, too little free memory to copy";
    }
    m->map = use_mmap ? map_file(fd, size, path) : read_into_huge_pages(fd, size, path);
    m->mapped = use_mmap;
    m->map_size = size;
    close(fd);  // a mapping keeps the file alive
    parse_model(m, m->map, size, path);
    if (verify || !m->mapped) verify_weights(m->map, path);
}

static void free_model(Model *m) {
    tokenizer_free(&m->tokenizer);
    free(m->layers);
    if (m->mapped) unmap_file(m->map, m->map_size);
    else free_aligned((void *)m->map);
}

/* ------------------------------------------------------------------------------------- */
/* 3. Kernels                                                                             */
/* ------------------------------------------------------------------------------------- */
/* Shapes: activations are row-major [n_tokens, features]; a batch of n_tokens positions
 * goes through each kernel together so every weight is read once per batch, not once per
 * token. The plain loops here are the definitions, and what a portable build (make
 * portable) runs. The forward pass reaches them through the few operations declared at the
 * end of this section (matmul, gelu_new, softmax, attention, ...), defined in Appendix E:
 * the one place that picks, for the CPU the program is built for, a faster kernel from
 * Appendices B-D and shares the work among threads. tests/test_kernels.c checks every
 * faster kernel against its definition here. */

/* LayerNorm over the last dim: (x - mean) / sqrt(var + eps) * weight + bias (biased var).
 * Mean and variance accumulate in double: Phi-2's activations reach the hundreds. */
static void layernorm(float *out, const float *x, const float *weight, const float *bias, int n_tokens, int dim,
                      float eps) {
#pragma omp parallel for if (n_tokens > 1)  // a batch's rows over the threads (the sums are serial)
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

/* The scalar products share a batch's rows among OpenMP's threads, SCALAR_ROWS_PER_CHUNK
 * at a time as each thread finishes its last: small chunks, so a slow core holds up little. */
enum { SCALAR_ROWS_PER_CHUNK = 16 };

/* --- float32 matrix product: out[t, r] = sum_c W[r, c] * in[t, c] + bias[r] ------------ */

/* Dot product of two float vectors: a matrix row by an activation row, a query by a key.
 * 16 independent partial sums: the compiler may keep them in SIMD lanes on any target (one
 * running sum would force it to add strictly in order, one at a time). */
static float dot_f32(const float *a, const float *b, int n) {
    float part[16] = {0};
    int i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; j++) part[j] += a[i + j] * b[i + j];
    float sum = 0.0f;
    for (int j = 0; j < 16; j++) sum += part[j];
    for (; i < n; i++) sum += a[i] * b[i];
    return sum;
}

MAYBE_UNUSED static void matmul_f32_scalar(float *out, const float *in, const Matrix *W, const float *bias, int n_tokens) {
    const int rows = W->rows, cols = W->cols;
#pragma omp parallel for schedule(dynamic, SCALAR_ROWS_PER_CHUNK) if (n_tokens > 1)
    for (int r = 0; r < rows; r++)
        for (int t = 0; t < n_tokens; t++)
            out[(size_t)t * rows + r] = dot_f32(W->w + (size_t)r * cols, in + (size_t)t * cols, cols) + bias[r];
}

/* --- int8 (Q8_0) matrix product ------------------------------------------------------- */
/* The activation rows are quantized on the fly to int8, one scale per group of 64, so each
 * group's dot product is an exact int32 sum of int8 x int8 products, scaled once by both
 * scales: sum_g d_w[g] * d_x[g] * sum_{i in g} q_w[i] * q_x[i]. */

typedef struct {
    int8_t *q;          // [n_tokens, cols]
    float *scale;       // [n_tokens, cols / Q8_GROUP]
    float *q4_offset;   // [n_tokens, cols / Q4_GROUP] the x86 q4 kernels' correction (Appendix B)
} QuantizedRows;

/* One group's scale d = max|x| / 127, and 1/d to quantize by. A group whose max|x| is below
 * Q8_MIN_GROUP_MAX, far under any real activation, quantizes to zeros with d = 0, as an
 * all-zero group does: below 3.7e-37, 1/d would overflow to infinity and the int8 values
 * would be whatever each kernel makes of x * infinity. */
static const float Q8_MIN_GROUP_MAX = 1e-30f;

static float q8_group_scale(float amax, float *inv_d) {
    if (!(amax >= Q8_MIN_GROUP_MAX)) {
        *inv_d = 0.0f;
        return 0.0f;
    }
    const float d = amax / 127.0f;
    *inv_d = 1.0f / d;
    return d;
}

MAYBE_UNUSED static void quantize_rows_q8_scalar(QuantizedRows *out, const float *x, int n_tokens, int cols) {
    const int n_groups = cols / Q8_GROUP, group = Q8_GROUP;
    for (int t = 0; t < n_tokens; t++) {
        for (int g = 0; g < n_groups; g++) {
            const float *xg = x + (size_t)t * cols + (size_t)g * group;
            int8_t *qg = out->q + (size_t)t * cols + (size_t)g * group;
            float amax = 0.0f;
            for (int i = 0; i < group; i++) amax = fmaxf(amax, fabsf(xg[i]));
            float inv_d;
            const float d = q8_group_scale(amax, &inv_d);
            for (int i = 0; i < group; i++) qg[i] = (int8_t)lrintf(xg[i] * inv_d);
            out->scale[(size_t)t * n_groups + g] = d;
        }
    }
}

MAYBE_UNUSED static void matmul_q8_scalar(float *out, const QuantizedRows *in, const Matrix *W, const float *bias,
                                          int n_tokens) {
    const int rows = W->rows, cols = W->cols, n_groups = cols / Q8_GROUP, group = Q8_GROUP;
#pragma omp parallel for schedule(dynamic, SCALAR_ROWS_PER_CHUNK) if (n_tokens > 1)
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

/* --- float16: q4 scales and the half-size KV cache (--kv-type f16) --------------------
 * IEEE binary16, stored as uint16_t: 1 sign bit, 5 exponent bits (bias 15), 10 mantissa
 * bits. Normal numbers are 2^(e-15) x 1.m (2^-14 .. 65504), subnormals 2^-24 x m, exponent
 * 31 is infinity (m = 0) or NaN. A float32 has 8 exponent bits (bias 127) and 23 mantissa
 * bits, so every f16 is exactly a float and going back only drops 13 mantissa bits. */

static float f32_from_f16(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
    uint32_t bits;
    if (exponent == 0x1f) {
        bits = sign | 0x7f800000 | mantissa << 13;  // infinity, or NaN with its payload
    } else if (exponent != 0) {
        bits = sign | (exponent + 127 - 15) << 23 | mantissa << 13;  // normal: rebias the exponent
    } else {
        const float v = (float)mantissa * 0x1p-24f;  // zero or subnormal: m x 2^-24, exact in float
        return sign ? -v : v;
    }
    float f;
    memcpy(&f, &bits, sizeof(f));
    return f;
}

/* The nearest f16, ties to the even mantissa (the IEEE default, and what F16C and Arm's
 * FCVT do): beyond 65520 (halfway from 65504 to 65536) infinity; below 2^-14 a subnormal
 * multiple of 2^-24, down to 0 at 2^-25 (a tie, to even); NaN stays a (quiet) NaN. */
static uint16_t f16_from_f32(float f) {
    uint32_t x;
    memcpy(&x, &f, sizeof(x));
    const uint16_t sign = (uint16_t)(x >> 16 & 0x8000);
    const uint32_t a = x & 0x7fffffff;                        // |f|
    if (a > 0x7f800000) return sign | 0x7e00 | (uint16_t)(a >> 13 & 0x3ff);  // NaN: quiet, top payload bits
    if (a >= 0x477ff000) return sign | 0x7c00;                // >= 65520: infinity
    if (a >= 0x38800000) {                                    // >= 2^-14: a normal f16
        // Rebias the exponent (127 -> 15), then round the 13 dropped bits: add just under
        // half, plus the kept lowest bit (so an exact half rounds up only from an odd one).
        // A carry out of the mantissa correctly bumps the exponent.
        const uint32_t r = a - ((uint32_t)(127 - 15) << 23);
        return sign | (uint16_t)((r + 0xfff + (r >> 13 & 1)) >> 13);
    }
    if (a <= 0x33000000) return sign;                         // <= 2^-25: rounds to (signed) zero
    // Subnormal: |f| = m x 2^(e - 150) with the implicit bit in m, which is m >> (126 - e)
    // units of 2^-24; round what the shift drops, ties to even. Rounding up to 0x400 gives
    // the smallest normal, which is also the right encoding.
    const uint32_t e = a >> 23, m = (a & 0x7fffff) | 0x800000, shift = 126 - e;  // shift 14 .. 24
    const uint32_t q = m >> shift, rest = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    return sign | (uint16_t)(q + (rest > half || (rest == half && (q & 1))));
}

/* --- 4-bit (q4) matrix product ------------------------------------------------------- */
/* A q4 weight is Q4_LEVELS[code] times its group's float16 scale (groups of 32 along the
 * row). In each block of 64 weights of a row, byte i of the block's 32 bytes holds the code
 * of weight i in its low nibble and of weight 32 + i in its high nibble, so one mask and one
 * shift split a vector of bytes into two vectors of consecutive weights. The activations are
 * quantized exactly as for q8 (one scale per 64 values = per block), so each group's sum is
 * again an exact int32 sum of int8 products:
 *   sum over blocks b: d_x[b] * (d_w[2b] * isum(group 2b) + d_w[2b+1] * isum(group 2b+1)). */
_Static_assert(Q4_BLOCK == Q8_GROUP && Q4_BLOCK == 2 * Q4_GROUP, "a q4 block is one activation group, two weight groups");

/* The code (0..15) of weight c of a q4 row. */
static int q4_code(const uint8_t *row_codes, int c) {
    const uint8_t byte = row_codes[c / Q4_BLOCK * (Q4_BLOCK / 2) + c % (Q4_BLOCK / 2)];
    return c % Q4_BLOCK < Q4_BLOCK / 2 ? byte & 15 : byte >> 4;
}

MAYBE_UNUSED static void matmul_q4_scalar(float *out, const QuantizedRows *in, const Matrix *W, const float *bias,
                                          int n_tokens) {
    const int rows = W->rows, cols = W->cols, n_blocks = cols / Q4_BLOCK;
#pragma omp parallel for schedule(dynamic, SCALAR_ROWS_PER_CHUNK) if (n_tokens > 1)
    for (int r = 0; r < rows; r++) {
        const uint8_t *codes = W->codes + (size_t)r * (cols / 2);
        const uint16_t *wd = W->scale16 + (size_t)r * (cols / Q4_GROUP);
        for (int t = 0; t < n_tokens; t++) {
            float sum = 0.0f;
            for (int b = 0; b < n_blocks; b++) {  // a block: one activation scale, two weight groups
                const int8_t *xq = in->q + (size_t)t * cols + (size_t)b * Q4_BLOCK;
                int32_t isum[2] = {0, 0};  // the two groups' exact sums
                for (int i = 0; i < Q4_BLOCK; i++)
                    isum[i / Q4_GROUP] += (int32_t)Q4_LEVELS[q4_code(codes, b * Q4_BLOCK + i)] * (int32_t)xq[i];
                sum += in->scale[(size_t)t * n_blocks + b] *
                       (f32_from_f16(wd[2 * b]) * (float)isum[0] + f32_from_f16(wd[2 * b + 1]) * (float)isum[1]);
            }
            out[(size_t)t * rows + r] = sum + bias[r];
        }
    }
}

/* One row of a matrix as floats: the embedding lookup. The embedding is float32 or q8 in
 * every file type (q4 files keep it q8), so those are the two kinds of row. */
static void matrix_row(float *out, const Matrix *W, int row) {
    const size_t cols = (size_t)W->cols;
    if (W->type == WEIGHTS_F32) {
        memcpy(out, W->w + (size_t)row * cols, cols * sizeof(float));
    } else if (W->type == WEIGHTS_Q8) {
        const int8_t *q = W->q + (size_t)row * cols;
        const float *d = W->scale + (size_t)row * (cols / Q8_GROUP);
        for (size_t c = 0; c < cols; c++) out[c] = d[c / Q8_GROUP] * (float)q[c];
    }
}

/* gelu_new, the tanh approximation of GELU used by Phi-2. */
MAYBE_UNUSED static void gelu_new_scalar(float *x, size_t n) {
    const float k = 0.7978845608028654f;  // sqrt(2 / pi)
    for (size_t i = 0; i < n; i++) {
        float v = x[i];
        x[i] = 0.5f * v * (1.0f + tanhf(k * (v + 0.044715f * v * v * v)));
    }
}

/* --- float16 rows: the half-size KV cache (--kv-type f16) --------------------------- */

/* A row of floats to f16 (a head's key or value on its way into the cache). */
MAYBE_UNUSED static void f32_to_f16_row_scalar(uint16_t *out, const float *x, int n) {
    for (int i = 0; i < n; i++) out[i] = f16_from_f32(x[i]);
}

/* A row of f16 back to floats (exact): a tile of keys or values for attention over a batch. */
MAYBE_UNUSED static void f16_to_f32_row_scalar(float *out, const uint16_t *x, int n) {
    for (int i = 0; i < n; i++) out[i] = f32_from_f16(x[i]);
}

/* Attention score against an f16 key: sum a[i] * b[i], b widened to float. */
MAYBE_UNUSED static float dot_f32_f16_scalar(const float *a, const uint16_t *b, int n) {
    float sum = 0.0f;
    for (int i = 0; i < n; i++) sum += a[i] * f32_from_f16(b[i]);
    return sum;
}

/* One term of attention's weighted sum of f16 values: out[i] += w * v[i]. */
MAYBE_UNUSED static void axpy_f16_scalar(float *out, float w, const uint16_t *v, int n) {
    for (int i = 0; i < n; i++) out[i] += w * f32_from_f16(v[i]);
}

/* A head's scores against the f16 keys of positions 0 .. n_pos-1 (rows of hd numbers):
 * score[p] = scale * q . key[p]. */
MAYBE_UNUSED static void scores_f16_scalar(float *score, const float *q, const uint16_t *keys, int n_pos, int hd,
                                           float scale) {
    for (int p = 0; p < n_pos; p++) score[p] = dot_f32_f16_scalar(q, keys + (size_t)p * hd, hd) * scale;
}

/* A head's output: out[hd] = sum over p of weight[p] * value[p], values f16 rows of hd. */
MAYBE_UNUSED static void weighted_sum_f16_scalar(float *out, const float *weight, const uint16_t *values, int n_pos,
                                                 int hd) {
    memset(out, 0, (size_t)hd * sizeof(float));
    for (int p = 0; p < n_pos; p++) axpy_f16_scalar(out, weight[p], values + (size_t)p * hd, hd);
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

/* x <- exp(x - max x) / sum: the attention weights from the scores. */
MAYBE_UNUSED static void softmax_scalar(float *x, int n) {
    float max = x[0];
    for (int i = 1; i < n; i++) max = fmaxf(max, x[i]);
    float sum = 0.0f;
    for (int i = 0; i < n; i++) {
        x[i] = expf(x[i] - max);
        sum += x[i];
    }
    for (int i = 0; i < n; i++) x[i] /= sum;
}

/* --- The operations the forward pass calls ------------------------------------------
 * Defined in Appendix E. Each computes a definition above (attention: section 4's), with
 * the fastest kernel this build has: the same results, exactly for the quantizer, to float
 * rounding for the rest. A portable build runs the definitions themselves. */
typedef struct KernelScratch KernelScratch;  // the kernels' scratch and threads (Appendix A)
static KernelScratch *kernel_scratch_create(const Config *c, int max_batch, int n_threads);
static void kernel_scratch_free(KernelScratch *k);
/* out[n_tokens, W.rows] = in[n_tokens, W.cols] W^T + bias, for every weight type (int8 and
 * 4-bit weights after quantizing the activations to int8, one scale per 64 values). */
static void matmul(float *out, const float *in, const Matrix *W, const float *bias, int n_tokens, KernelScratch *k);
static void gelu_new(float *x, size_t n);
static void softmax(float *x, int n);
static void f32_to_f16_row(uint16_t *out, const float *x, int n);  // bit-identical to the definition
static void f16_to_f32_row(float *out, const uint16_t *x, int n);  // exact
static void scores_f16(float *score, const float *q, const uint16_t *keys, int n_pos, int hd, float scale);
static void weighted_sum_f16(float *out, const float *weight, const uint16_t *values, int n_pos, int hd);
/* The kernels this build has, and for int8 the ones it will use here (AMX needs the OS's
 * permission), e.g. "x86-64 avx512, int8 vnni+amx" or "scalar": printed by -v and in the
 * timings line, so figures from different machines say what ran. k may be NULL (-v). */
static void kernel_description(char *out, size_t size, KernelScratch *k, int weight_type);

/* ------------------------------------------------------------------------------------- */
/* 4. The forward pass                                                                    */
/* ------------------------------------------------------------------------------------- */

/* The KV cache's element type (--kv-type): float32, exact, or IEEE float16, half the memory
 * and half the bytes attention reads per token (at a long context nearly as many as the
 * weights). f16 keeps 11 significant bits: the logits move by far less than int8 weights
 * move them (tests/test_kv.py), so it is the default for quantized files, and f32 for
 * float32 files, which stay exact. */
enum { KV_F32 = 0, KV_F16 = 1 };

static int default_kv_type(const Config *c) { return c->weight_type == WEIGHTS_F32 ? KV_F32 : KV_F16; }

/* Prompt positions per forward call (-b). A larger batch reuses each weight read more
 * times, and the kernels build their row panels once per batch (Appendix B); each position
 * of a batch costs about 145 KB of buffers (docs/PERFORMANCE.md has the measurements). */
enum { DEFAULT_BATCH = 256 };

static const char *kv_type_name(int kv_type) { return kv_type == KV_F16 ? "f16" : "f32"; }

/* Everything that changes while the model runs. Positions are processed in batches of up
 * to max_batch (all of a prompt's tokens at once, one at a time while generating). */
typedef struct {
    int max_batch;          // positions per forward call
    int ctx;                // positions the KV cache holds (<= max_seq_len)
    int n_threads;          // threads: the pool's (Appendix G), OpenMP's; attention scratch rows
    float *x;               // [max_batch, hidden] residual stream
    float *h;               // [max_batch, hidden] LayerNorm output, input of attention and MLP
    float *qkv;             // [max_batch, 3*hidden] queries, keys, values
    float *att;             // [max_batch, hidden] attention output (heads concatenated)
    float *att_proj;        // [max_batch, hidden] after the dense projection
    float *ffn;             // [max_batch, ffn] MLP hidden activations
    float *mlp_out;         // [max_batch, hidden]
    float *scores;          // [n_threads, ctx] attention weights, one row per thread
    float *attn_scratch;    // [n_threads, attn_scratch_floats] attention_blocked's tiles, per thread
    size_t attn_scratch_floats;
    float *logits;          // [logits_rows, vocab]
    int logits_rows;        // max_batch where every position's logits are wanted (perplexity,
                            // --dump-logits, --trace), else 1: a prompt needs only its last
    KernelScratch *kern;    // the kernels' scratch (int8 activations, panels) and thread pool
    int kv_type;            // KV_F32 or KV_F16: the element type of the two caches
    size_t kv_bytes;        // bytes of the two caches together
    void *key_cache;        // [n_layers, n_heads, ctx, head_dim] keys, after rotary: float or f16 (uint16_t)
    void *value_cache;      // [n_layers, n_heads, ctx, head_dim] values: float or f16 (uint16_t)
    float *rope_cos;        // [ctx, rot_dim/2]
    float *rope_sin;        // [ctx, rot_dim/2]
    FILE *trace;            // --trace: forward() writes its intermediates here (NULL: off)
    const char *trace_path; // for error messages
} RunState;

static size_t attn_scratch_floats(const Config *c);  // attention_blocked's scratch per thread (Appendix D)
/* Causal self-attention of a batch, one layer: attention_scalar below, or its faster forms
 * (Appendix E). */
static void attention(RunState *s, const Config *c, int layer, int pos0, int n_tokens);

static int max_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

/* The calling thread's number in an OpenMP team (0 .. threads - 1; 0 without OpenMP). */
static int team_thread(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

static void init_state(RunState *s, const Config *c, int ctx, int max_batch, int kv_type, int all_logits,
                       int n_threads) {
    const size_t H = (size_t)c->hidden_dim, F = (size_t)c->ffn_dim, B = (size_t)max_batch;
    memset(s, 0, sizeof(*s));
    s->max_batch = max_batch;
    s->ctx = ctx;
    s->n_threads = n_threads > max_threads() ? n_threads : max_threads();  // (OpenMP's at least)
    s->kern = kernel_scratch_create(c, max_batch, s->n_threads);
    s->x = xmalloc_aligned(mul_size(B * H, sizeof(float)));
    s->h = xmalloc_aligned(mul_size(B * H, sizeof(float)));
    s->qkv = xmalloc_aligned(mul_size(B * 3 * H, sizeof(float)));
    s->att = xmalloc_aligned(mul_size(B * H, sizeof(float)));
    s->att_proj = xmalloc_aligned(mul_size(B * H, sizeof(float)));
    s->ffn = xmalloc_aligned(mul_size(B * F, sizeof(float)));
    s->mlp_out = xmalloc_aligned(mul_size(B * H, sizeof(float)));
    s->scores = xmalloc_aligned(mul_size(mul_size((size_t)s->n_threads, (size_t)ctx), sizeof(float)));
    s->attn_scratch_floats = attn_scratch_floats(c);
    s->attn_scratch = xmalloc_aligned(mul_size(mul_size((size_t)s->n_threads, s->attn_scratch_floats), sizeof(float)));
    s->logits_rows = all_logits ? max_batch : 1;
    s->logits = xmalloc_aligned(mul_size((size_t)s->logits_rows, mul_size((size_t)c->vocab_size, sizeof(float))));
    s->kv_type = kv_type;
    const size_t elem_size = kv_type == KV_F16 ? sizeof(uint16_t) : sizeof(float);
    const size_t cache_bytes = mul_size(mul_size(mul_size((size_t)c->n_layers, (size_t)ctx), H), elem_size);
    s->kv_bytes = mul_size(2, cache_bytes);
    s->key_cache = xmalloc_prefaulted(s->kv_bytes);  // (written soon: a prompt's positions at once)
    s->value_cache = (unsigned char *)s->key_cache + cache_bytes;

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
    kernel_scratch_free(s->kern);  // first: it ends the threads
    free_aligned(s->x); free_aligned(s->h); free_aligned(s->qkv); free_aligned(s->att); free_aligned(s->att_proj);
    free_aligned(s->ffn); free_aligned(s->mlp_out); free_aligned(s->scores); free_aligned(s->logits);
    free_aligned(s->attn_scratch);
    free_prefaulted(s->key_cache, s->kv_bytes);
    free(s->rope_cos); free(s->rope_sin);
}

/* Where the cached key (or value) of one head at one position starts. The cache is
 * head-major: a head's keys for all positions are contiguous, so attention streams them
 * in order instead of hopping a whole hidden row (10 KB) from one position to the next. */
static size_t kv_offset(const RunState *s, const Config *c, int layer, int head, int pos) {
    return (((size_t)layer * c->n_heads + (size_t)head) * (size_t)s->ctx + (size_t)pos) * (size_t)c->head_dim;
}

/* Put n floats (one head's key or value) into a cache at element offset slot, as its type. */
static void kv_store(const RunState *s, void *cache, size_t slot, const float *x, int n) {
    if (s->kv_type == KV_F16) f32_to_f16_row((uint16_t *)cache + slot, x, n);
    else memcpy((float *)cache + slot, x, (size_t)n * sizeof(float));
}

/* One head of the position at pos, one layer: out[head_dim] = the values at cache positions
 * 0 .. pos, weighted by softmax(q . key / sqrt(head_dim)). score: [pos + 1] scratch. */
static void attend(const RunState *s, const Config *c, int layer, int head, int pos, const float *q, float *out,
                   float *score) {
    const int hd = c->head_dim, n_pos = pos + 1;
    const float scale = 1.0f / sqrtf((float)hd);
    const size_t head0 = kv_offset(s, c, layer, head, 0);
    if (s->kv_type == KV_F32) {
        const float *keys = (const float *)s->key_cache + head0;
        const float *values = (const float *)s->value_cache + head0;
        for (int p = 0; p < n_pos; p++) score[p] = dot_f32(q, keys + (size_t)p * hd, hd) * scale;
        softmax(score, n_pos);
        memset(out, 0, (size_t)hd * sizeof(float));
        for (int p = 0; p < n_pos; p++) {
            const float *v = values + (size_t)p * hd;
            const float w = score[p];
            for (int i = 0; i < hd; i++) out[i] += w * v[i];
        }
    } else {  // the same with f16 keys and values, widened to float as they are read
        const uint16_t *keys = (const uint16_t *)s->key_cache + head0;
        const uint16_t *values = (const uint16_t *)s->value_cache + head0;
        scores_f16(score, q, keys, n_pos, hd, scale);  // the loops above, as one kernel each
        softmax(score, n_pos);
        weighted_sum_f16(out, score, values, n_pos, hd);
    }
}

/* Causal self-attention for a batch of positions pos0 .. pos0+n_tokens-1 of one layer.
 * The batch's keys and values are already in the cache, so token t attends to cache
 * positions 0 .. pos0+t. Each (token, head) pair is independent: spread them over threads.
 * This is the definition; a prompt's batches go faster blocked (Appendix D), reading each
 * key and value once per block of queries instead of once per query. */
static void attention_scalar(RunState *s, const Config *c, int layer, int pos0, int n_tokens) {
    const int H = c->hidden_dim, hd = c->head_dim, n_heads = c->n_heads;
#pragma omp parallel for schedule(dynamic, 1)
    for (int th = 0; th < n_tokens * n_heads; th++) {
        const int t = th / n_heads, head = th % n_heads;
        float *score = s->scores + (size_t)team_thread() * s->ctx;
        attend(s, c, layer, head, pos0 + t, s->qkv + (size_t)t * 3 * H + (size_t)head * hd,
               s->att + (size_t)t * H + (size_t)head * hd, score);
    }
}

/* --trace: append rows [0, n_tokens) of an intermediate (row t belongs to position pos0 + t;
 * n floats each, rows `stride` floats apart) as records of
 *   u32 name length, the name ("embed", "L3.q", "logits", ...), u32 position, u32 n, n f32
 * which scripts/compare_trace.py compares with scripts/reference.py --trace, step by step.
 * layer < 0: a name without a layer. Nothing happens unless --trace is on. */
static void trace(const RunState *s, const char *name, int layer, const float *rows, size_t stride, int n, int pos0,
                  int n_tokens) {
    if (!s->trace) return;
    char full[64];
    int len = layer < 0 ? snprintf(full, sizeof(full), "%s", name) : snprintf(full, sizeof(full), "L%d.%s", layer, name);
    for (int t = 0; t < n_tokens; t++) {
        const uint32_t head[2] = {(uint32_t)pos0 + (uint32_t)t, (uint32_t)n};
        const uint32_t name_len = (uint32_t)len;
        if (fwrite(&name_len, 4, 1, s->trace) != 1 || fwrite(full, 1, (size_t)len, s->trace) != (size_t)len ||
            fwrite(head, 4, 2, s->trace) != 2 || fwrite(rows + (size_t)t * stride, sizeof(float), (size_t)n, s->trace) != (size_t)n)
            die("cannot write '%s': %s", s->trace_path, strerror(errno));
    }
}

/* Run tokens[0..n_tokens) at positions pos0.. through the model (n_tokens <= max_batch).
 * Fills the KV cache for those positions. Logits: if all_logits, every position's row is
 * written to s->logits; otherwise only the last position's, in row 0 (the lm_head is a
 * large matrix: skipping it for prompt positions nobody looks at saves real time). */
static void forward(const Model *m, RunState *s, const int *tokens, int n_tokens, int pos0, int all_logits) {
    const Config *c = &m->config;
    const int H = c->hidden_dim, F = c->ffn_dim, hd = c->head_dim, half = c->rot_dim / 2;

    for (int t = 0; t < n_tokens; t++) {
        if (tokens[t] < 0 || tokens[t] >= c->vocab_size)  // callers check; this keeps it a rule
            die("token id %d at position %d is outside the vocabulary of %d", tokens[t], pos0 + t, c->vocab_size);
        matrix_row(s->x + (size_t)t * H, &m->embed, tokens[t]);
    }
    trace(s, "embed", -1, s->x, H, H, pos0, n_tokens);

    for (int l = 0; l < c->n_layers; l++) {
        const Layer *L = &m->layers[l];
        layernorm(s->h, s->x, L->ln_weight, L->ln_bias, n_tokens, H, c->norm_eps);
        trace(s, "ln", l, s->h, H, H, pos0, n_tokens);

        // Attention: project, rotate q and k, cache k and v, attend, project back.
        matmul(s->qkv, s->h, &L->qkv, L->qkv_bias, n_tokens, s->kern);
#pragma omp parallel for if (n_tokens > 1)
        for (int t = 0; t < n_tokens; t++) {
            const int pos = pos0 + t;
            float *q = s->qkv + (size_t)t * 3 * H, *k = q + H, *v = q + 2 * H;
            for (int head = 0; head < c->n_heads; head++) {
                rotary(q + (size_t)head * hd, c->rot_dim, s->rope_cos + (size_t)pos * half, s->rope_sin + (size_t)pos * half);
                rotary(k + (size_t)head * hd, c->rot_dim, s->rope_cos + (size_t)pos * half, s->rope_sin + (size_t)pos * half);
                size_t slot = kv_offset(s, c, l, head, pos);
                kv_store(s, s->key_cache, slot, k + (size_t)head * hd, hd);
                kv_store(s, s->value_cache, slot, v + (size_t)head * hd, hd);
            }
        }
        trace(s, "q", l, s->qkv, 3 * (size_t)H, H, pos0, n_tokens);  // q and k after rotary
        trace(s, "k", l, s->qkv + H, 3 * (size_t)H, H, pos0, n_tokens);
        trace(s, "v", l, s->qkv + 2 * H, 3 * (size_t)H, H, pos0, n_tokens);
        attention(s, c, l, pos0, n_tokens);
        trace(s, "attn", l, s->att, H, H, pos0, n_tokens);
        matmul(s->att_proj, s->att, &L->dense, L->dense_bias, n_tokens, s->kern);
        trace(s, "attn_out", l, s->att_proj, H, H, pos0, n_tokens);

        // MLP on the same normalized input h: the block is parallel, not sequential.
        matmul(s->ffn, s->h, &L->fc1, L->fc1_bias, n_tokens, s->kern);
        gelu_new(s->ffn, (size_t)n_tokens * F);
        trace(s, "mlp_act", l, s->ffn, F, F, pos0, n_tokens);
        matmul(s->mlp_out, s->ffn, &L->fc2, L->fc2_bias, n_tokens, s->kern);
        trace(s, "mlp_out", l, s->mlp_out, H, H, pos0, n_tokens);

        for (size_t i = 0; i < (size_t)n_tokens * H; i++) s->x[i] += s->att_proj[i] + s->mlp_out[i];
        trace(s, "residual", l, s->x, H, H, pos0, n_tokens);
    }

    const int first = all_logits ? 0 : n_tokens - 1, n_out = n_tokens - first;
    if (n_out > s->logits_rows) die("internal error: %d rows of logits asked of a state made for %d", n_out, s->logits_rows);
    layernorm(s->h, s->x + (size_t)first * H, m->final_ln_weight, m->final_ln_bias, n_out, H, c->norm_eps);
    trace(s, "final_ln", -1, s->h, H, H, pos0 + first, n_out);
    matmul(s->logits, s->h, &m->lm_head, m->lm_head_bias, n_out, s->kern);
    trace(s, "logits", -1, s->logits, c->vocab_size, c->vocab_size, pos0 + first, n_out);
}

/* Non-finite logits mean the weights or activations overflowed: say so, never sample noise. */
static void check_logits_finite(const float *logits, int n, int position) {
    for (int i = 0; i < n; i++)
        if (!isfinite(logits[i])) die("logits are not finite at position %d (id %d is %g)", position, i, logits[i]);
}

/* Run a prompt through the model at positions pos0, pos0+1, ... (0 for a whole prompt; an
 * interactive turn continues after the positions already in the cache), in batches of up to
 * max_batch positions, filling the KV cache. With logits_out, every position's logits are
 * written there (--dump-logits, to out_path); otherwise only the last position's are kept, in
 * s->logits. Stops between batches after Ctrl-C; returns the number of positions processed. */
static int prefill(const Model *m, RunState *s, const int *tokens, int n_tokens, int pos0, FILE *logits_out,
                   const char *out_path) {
    const int V = m->config.vocab_size;
    int done = 0;
    while (done < n_tokens && !g_interrupted) {
        const int n = n_tokens - done < s->max_batch ? n_tokens - done : s->max_batch;
        const int all_logits = logits_out != NULL || s->trace != NULL;
        forward(m, s, tokens + done, n, pos0 + done, all_logits);
        const int n_rows = all_logits ? n : 1;
        for (int t = 0; t < n_rows; t++)
            check_logits_finite(s->logits + (size_t)t * V, V, pos0 + (all_logits ? done + t : done + n - 1));
        if (logits_out && fwrite(s->logits, sizeof(float), (size_t)n * V, logits_out) != (size_t)n * V)
            die("cannot write '%s': %s", out_path, strerror(errno));
        done += n;
    }
    return done;
}

/* ------------------------------------------------------------------------------------- */
/* 5. Sampling                                                                            */
/* ------------------------------------------------------------------------------------- */

typedef struct {
    float temperature;  // 0: greedy
    int top_k;          // keep the k most likely tokens (0: all)
    float top_p;        // then the smallest set whose probability reaches p (1: all)
    uint64_t rng;       // xorshift64* state
    float min_p;        // then drop tokens less likely than min_p times the most likely (0: off)
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

/* Heap of candidates with the worst (last in compare_candidates order) at the root. */
static void sift_down_worst(Candidate *h, int size, int j) {
    for (;;) {
        int worst = j, l = 2 * j + 1, r = l + 1;
        if (l < size && compare_candidates(&h[l], &h[worst]) > 0) worst = l;
        if (r < size && compare_candidates(&h[r], &h[worst]) > 0) worst = r;
        if (worst == j) return;
        Candidate tmp = h[j];
        h[j] = h[worst];
        h[worst] = tmp;
        j = worst;
    }
}

/* Move the k best of cand[0..n) into cand[0..k), unordered, in O(n log k): sorting all
 * 51,200 candidates every token cost a few % of generation time. */
static void select_top_k(Candidate *cand, int n, int k) {
    for (int j = k / 2 - 1; j >= 0; j--) sift_down_worst(cand, k, j);
    for (int i = k; i < n; i++)
        if (compare_candidates(&cand[i], &cand[0]) < 0) {  // better than the worst kept
            cand[0] = cand[i];
            sift_down_worst(cand, k, 0);
        }
}

/* min-p: of the candidates cand[0..n) (best first), how many have a probability of at least
 * min_p times the best one's (always at least the best one). The probabilities are the
 * tempered ones sample() works with, so min-p sees the temperature, as top-k and top-p do. */
static int min_p_count(const Candidate *cand, int n, float min_p) {
    if (min_p <= 0.0f || n == 0) return n;
    const float threshold = min_p * cand[0].prob;
    int kept = 1;
    while (kept < n && cand[kept].prob >= threshold) kept++;
    return kept;
}

/* Repetition penalties, applied to the logits before sampling (greedy included), over the
 * last last_n tokens of prompt + generated text (-1: all of them; 0: none), as llama.cpp does.
 * Each distinct token of that window with count c (ids past n_valid are ignored):
 *   repeat (CTRL, llama.cpp): logit > 0 is divided by it, otherwise multiplied (1: off);
 *   presence, frequency (OpenAI): logit -= presence + c * frequency (0: off). */
typedef struct {
    float repeat;
    int last_n;
    float presence;
    float frequency;
} Penalties;

static int penalties_active(const Penalties *pen) {
    return pen->last_n != 0 && (pen->repeat != 1.0f || pen->presence != 0.0f || pen->frequency != 0.0f);
}

/* counts: n_valid zeros of scratch, left as zeros. */
static void apply_penalties(const Penalties *pen, float *logits, int n_valid, const int *history, int n_history,
                            int *counts) {
    if (!penalties_active(pen)) return;
    const int n_window = pen->last_n < 0 || pen->last_n > n_history ? n_history : pen->last_n;
    const int *window = history + (n_history - n_window);
    for (int i = 0; i < n_window; i++)
        if (window[i] >= 0 && window[i] < n_valid) counts[window[i]]++;
    for (int i = 0; i < n_window; i++) {
        const int id = window[i];
        if (id < 0 || id >= n_valid || counts[id] == 0) continue;  // outside, or done already
        float *logit = &logits[id];
        if (*logit > 0.0f) *logit /= pen->repeat;
        else *logit *= pen->repeat;
        *logit -= pen->presence + (float)counts[id] * pen->frequency;
        counts[id] = 0;
    }
}

/* Pick the next token from the logits of the first n_valid ids (ids past the tokenizer's
 * vocabulary are padding rows and never sampled). cand is scratch of n_valid entries. */
static int sample(Sampler *sm, const float *logits, int n_valid, Candidate *cand) {
    if (sm->temperature == 0.0f) return argmax(logits, n_valid);
    float max = logits[argmax(logits, n_valid)];
    for (int i = 0; i < n_valid; i++) cand[i] = (Candidate){expf((logits[i] - max) / sm->temperature), i};
    int n = (sm->top_k > 0 && sm->top_k < n_valid) ? sm->top_k : n_valid;
    if (n < n_valid) select_top_k(cand, n_valid, n);
    qsort(cand, (size_t)n, sizeof(Candidate), compare_candidates);
    float total = 0.0f;
    for (int i = 0; i < n; i++) total += cand[i].prob;
    float kept = 0.0f;
    int n_kept = 0;
    while (n_kept < n) {
        kept += cand[n_kept++].prob;
        if (kept >= sm->top_p * total) break;
    }
    int n_min_p = min_p_count(cand, n_kept, sm->min_p);
    if (n_min_p < n_kept) {  // the kept mass again, summed in the same order
        n_kept = n_min_p;
        kept = 0.0f;
        for (int i = 0; i < n_kept; i++) kept += cand[i].prob;
    }
    float r = random_f32(&sm->rng) * kept, acc = 0.0f;
    for (int i = 0; i < n_kept; i++) {
        acc += cand[i].prob;
        if (r < acc) return cand[i].id;
    }
    return cand[n_kept - 1].id;  // rounding left r just past the total
}

/* --- Scoring (--perplexity) ----------------------------------------------------------- */

/* out[i] = log softmax(logits)[i] over all n ids, in double precision (the normalizer is the
 * model's whole output row, padding ids included, as a PyTorch cross-entropy would take it). */
static void log_softmax(double *out, const float *logits, int n) {
    double max = logits[argmax(logits, n)], sum = 0.0;
    for (int i = 0; i < n; i++) sum += exp((double)logits[i] - max);
    const double log_total = max + log(sum);
    for (int i = 0; i < n; i++) out[i] = (double)logits[i] - log_total;
}

/* A running mean and the standard error of that mean (sample variance / n). */
typedef struct {
    double sum, sum_sq;
    long long n;
} MeanEstimate;

static void mean_add(MeanEstimate *e, double x) {
    e->sum += x;
    e->sum_sq += x * x;
    e->n++;
}

static double mean_of(const MeanEstimate *e) { return e->n ? e->sum / (double)e->n : 0.0; }

static double stderr_of(const MeanEstimate *e) {
    if (e->n < 2) return 0.0;
    const double mean = mean_of(e), var = (e->sum_sq / (double)e->n - mean * mean) * (double)e->n / (double)(e->n - 1);
    return var > 0.0 ? sqrt(var / (double)e->n) : 0.0;
}

/* ------------------------------------------------------------------------------------- */
/* 6. The command line                                                                    */
/* ------------------------------------------------------------------------------------- */

#ifndef PHI2_NO_MAIN

/* Standard output behaves like a good Unix tool's: a write error (a full disk, /dev/full)
 * is an error exit; a reader that went away (a closed pipe, e.g. `| head`) just ends the
 * output, and the run ends with status 0. SIGPIPE is ignored (see main) so a closed pipe
 * shows up here as EPIPE instead of killing the process before the timings are printed.
 * Returns 1 while the output is wanted, 0 once the reader is gone. */
static int flush_stdout(void) {
    errno = 0;
    if (fflush(stdout) == 0 && !ferror(stdout)) return 1;
    if (reader_gone(errno)) {
        clearerr(stdout);  // not an error: later flushes (e.g. main's last) fail quietly the same way
        return 0;
    }
    die("cannot write to standard output: %s", errno ? strerror(errno) : "write error");
    return 0;
}

static void usage(FILE *f) {
    const int written = fprintf(f,
            "usage: phi2 MODEL.bin [options]\n"
            "\n"
            "Complete a prompt with Phi-2, or talk with it (-i). MODEL.bin comes from scripts/convert.py.\n"
            "\n"
            "prompt (one of):\n"
            "  -p, --prompt TEXT      prompt text\n"
            "  -f, --file FILE        read the prompt from FILE, byte for byte (-: standard input)\n"
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
            "  -t, --threads N        threads (default: one per performance core, not counting\n"
            "                         SMT siblings; OMP_NUM_THREADS if set, in OpenMP builds)\n"
            "      --mmap             map the model file: instant start, pages shared with\n"
            "                         other runs through the OS file cache (default for\n"
            "                         -n below 512)\n"
            "      --no-mmap          read the model into memory (huge pages): slower to\n"
            "                         start, faster generation (default for -n 512 or more,\n"
            "                         -n -1, -i and --perplexity, where it fits in memory)\n"
            "      --verify           check the weights checksums before running (a mapped\n"
            "                         file is otherwise checked only for its structure)\n"
            "      --prompt-cache F   keep the prompt's keys and values in file F: a later run\n"
            "                         whose prompt begins with the same tokens processes only\n"
            "                         the rest (the cache is rewritten for each new prompt;\n"
            "                         with -i, the prefix that -p or -f gives)\n"
            "      --prompt-cache-ro  use the --prompt-cache file, but never write it\n"
            "  -b, --batch N          prompt positions processed together (default 256; 1 = one\n"
            "                         at a time through the KV cache, as during generation)\n"
            "      --kv-type T        KV cache numbers: f32 or f16 (half the memory and reads);\n"
            "                         default f32 for float32 model files, f16 for quantized ones\n"
            "      --stop TEXT        stop when the generated text contains TEXT (not printed);\n"
            "                         e.g. --stop 'Instruct:' for the QA format; repeatable\n"
            "                         (up to 16): the first one to appear ends the text\n"
            "      --ignore-eos       keep generating past <|endoftext|> (for benchmarks)\n"
            "      --no-display-prompt  do not echo the prompt before the completion\n"
            "      --min-p P          drop tokens below P x the best one's probability (default 0:\n"
            "                         off: plain temperature, top-k and top-p; llama.cpp's is 0.05)\n"
            "      --repeat-penalty F recent tokens' logits: > 0 divided by F, < 0 times F (default\n"
            "                         1 = off)\n"
            "      --repeat-last-n N  penalties look at the last N tokens (default 64; -1 all; 0 off)\n"
            "      --presence-penalty F, --frequency-penalty F  subtract F (x count) from recent\n"
            "                         tokens' logits (defaults 0)\n"
            "  Order: penalties -> temperature -> top-k -> top-p -> min-p -> draw (or argmax).\n"
            "\n"
            "interactive:\n"
            "  -i, --interactive      a conversation: a turn per line of stdin (a line ending in\n"
            "                         '\\' goes on), each answer streamed, up to -n tokens; earlier\n"
            "                         turns stay in the KV cache, the oldest are dropped when\n"
            "                         the context is full. Ctrl-C stops an answer; at the prompt\n"
            "                         Ctrl-C (status 130) or end of input (Ctrl-D) ends it\n"
            "      --format F         qa (default): 'Instruct: TURN\\nOutput:', chat: 'Alice: TURN\\nBob:',\n"
            "                         raw: the text as typed; the next turn's marker ends an answer\n"
            "      --system TEXT      a prefix kept for the whole session (or -p TEXT, -f FILE)\n"
            "      --verbose          per turn on stderr: positions reused, token ids read\n"
            "\n"
            "perplexity:\n"
            "      --perplexity FILE  score FILE in windows of -c tokens, each on its second half (so\n"
            "                         every scored token has half a window of context); prints\n"
            "                         'perplexity: PPL +/- SE' (SE = ppl x stderr of the mean NLL)\n"
            "      --save-logprobs FILE  write each scored token's log-probability row (docs/FORMAT.md)\n"
            "      --kl-base FILE     compare with another run's --save-logprobs file: mean KL,\n"
            "                         top-1 agreement, perplexity ratio\n"
            "\n"
            "testing and inspection:\n"
            "      --tokenize         print the prompt's token ids (comma-separated) and exit\n"
            "      --print-ids        print generated token ids (comma-separated) instead of text\n"
            "      --dump-logits FILE write the logits of every prompt position (float32 rows of\n"
            "                         vocab_size, little-endian) and exit\n"
            "      --trace FILE       write every named intermediate (embedding, each layer's\n"
            "                         LayerNorm, q/k/v, attention, MLP, residual; logits) of\n"
            "                         every prompt position and exit; compare it with\n"
            "                         scripts/reference.py --trace (scripts/compare_trace.py)\n"
            "  -v, --version          the model format and the kernels of this build\n"
            "  -h, --help             this help\n"
            "\n"
            "Text streams to stdout; timings and the reason generation stopped go to stderr.\n"
            "Exit status: 0 done (also when stdout's reader went away), 1 error, 130 Ctrl-C.\n");
    // The help is longer than stdio's buffer, so a write error can happen here rather than
    // in the final flush: report it now, while errno still says why (as flush_stdout would).
    if (written < 0 && f == stdout) {
        if (reader_gone(errno)) {
            clearerr(stdout);
            return;
        }
        die("cannot write to standard output: %s", strerror(errno));
    }
}

#define MAX_STOP_STRINGS 16

/* Interactive mode (-i, --format): Phi-2's formats from its model card. A turn is the user's
 * text between before and after; an answer ends where the model starts the next turn (marker,
 * an automatic stop string). raw: the text as typed, nothing added, no marker. */
typedef struct {
    const char *name, *before, *after, *marker;
} TurnFormat;

static const TurnFormat TURN_FORMATS[] = {
    {"qa", "Instruct: ", "\nOutput:", "\nInstruct:"},
    {"chat", "Alice: ", "\nBob:", "\nAlice:"},
    {"raw", "", "", NULL},
};
#define N_TURN_FORMATS ((int)(sizeof(TURN_FORMATS) / sizeof(TURN_FORMATS[0])))

typedef struct {
    const char *model_path;
    const char *prompt;         // -p
    const char *prompt_file;    // -f
    const char *ids;            // --ids
    const char *dump_logits;    // --dump-logits
    const char *trace;          // --trace
    const char *stops[MAX_STOP_STRINGS];  // --stop, repeatable
    int n_stops;
    long long n_predict;
    float temperature, top_p;
    int top_k;
    uint64_t seed;
    int seed_given;
    int ctx;                    // 0: the model's max_seq_len
    int batch;                  // prompt positions per forward pass
    int n_threads;              // -t; then main sets the default (count_fast_cores)
    const char *threads_why;    // set by main: why this many threads ("-t", "performance cores", ...)
    int use_mmap;               // 1: --mmap, 0: --no-mmap, -1: by the run's length (load_model)
    int verify;                 // --verify: check the weights checksums even when mapped
    const char *prompt_cache;   // --prompt-cache FILE (NULL: none)
    int prompt_cache_ro;        // --prompt-cache-ro: read the cache, never write it
    double t_start;             // set by main: when the program started (time to first token)
    int kv_type;                // KV_F32, KV_F16, or -1: the model's default (default_kv_type)
    int tokenize, print_ids, no_display_prompt, ignore_eos, help, version;
    float min_p;                // --min-p (0: off)
    Penalties penalties;        // --repeat-penalty, --repeat-last-n, --presence-penalty, --frequency-penalty
    const char *perplexity;     // --perplexity FILE
    const char *save_logprobs;  // --save-logprobs FILE
    const char *kl_base;        // --kl-base FILE
    int interactive;            // -i
    int format;                 // --format: an index into TURN_FORMATS (default 0, qa)
    const char *format_name;    // --format as given (NULL: not given)
    const char *system;         // --system TEXT: the prefix of an interactive session (as -p)
    int verbose;                // --verbose: -i says per turn what it reads and reuses
} Options;

static Options parse_args(int argc, char **argv) {
    Options o = {.use_mmap = -1, .n_predict = 256, .temperature = 0.8f, .top_p = 0.95f, .top_k = 40, .batch = DEFAULT_BATCH,
                 .kv_type = -1, .penalties = {.repeat = 1.0f, .last_n = 64}};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            o.help = 1;  // main prints the usage: parsing itself never exits successfully
            return o;
        }
        if (!strcmp(a, "-v") || !strcmp(a, "--version")) {
            o.version = 1;
            return o;
        }
        // flags without a value
        if (!strcmp(a, "--tokenize")) { o.tokenize = 1; continue; }
        if (!strcmp(a, "--print-ids")) { o.print_ids = 1; continue; }
        if (!strcmp(a, "--no-display-prompt")) { o.no_display_prompt = 1; continue; }
        if (!strcmp(a, "--ignore-eos")) { o.ignore_eos = 1; continue; }
        if (!strcmp(a, "--no-mmap")) { o.use_mmap = 0; continue; }
        if (!strcmp(a, "--mmap")) { o.use_mmap = 1; continue; }
        if (!strcmp(a, "--verify")) { o.verify = 1; continue; }
        if (!strcmp(a, "--prompt-cache-ro")) { o.prompt_cache_ro = 1; continue; }
        if (!strcmp(a, "-i") || !strcmp(a, "--interactive")) { o.interactive = 1; continue; }
        if (!strcmp(a, "--verbose")) { o.verbose = 1; continue; }
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
        else if (!strcmp(a, "--prompt-cache")) o.prompt_cache = v;
        else if (!strcmp(a, "--trace")) o.trace = v;
        else if (!strcmp(a, "--stop")) {
            if (o.n_stops == MAX_STOP_STRINGS) die("at most %d --stop strings", MAX_STOP_STRINGS);
            o.stops[o.n_stops++] = v;
        }
        else if (!strcmp(a, "-n") || !strcmp(a, "--n-predict")) o.n_predict = parse_long(a, v, -1, INT_MAX);
        else if (!strcmp(a, "--temp")) o.temperature = (float)parse_double(a, v, 0.0, 100.0);
        else if (!strcmp(a, "--top-k")) o.top_k = (int)parse_long(a, v, 0, INT_MAX);
        else if (!strcmp(a, "--top-p")) o.top_p = (float)parse_double(a, v, 0.0, 1.0);
        else if (!strcmp(a, "-s") || !strcmp(a, "--seed")) { o.seed = (uint64_t)parse_long(a, v, 0, LLONG_MAX); o.seed_given = 1; }
        else if (!strcmp(a, "-c") || !strcmp(a, "--ctx-size")) o.ctx = (int)parse_long(a, v, 1, INT_MAX);
        else if (!strcmp(a, "-b") || !strcmp(a, "--batch")) o.batch = (int)parse_long(a, v, 1, 4096);
        else if (!strcmp(a, "-t") || !strcmp(a, "--threads")) o.n_threads = (int)parse_long(a, v, 1, 1024);
        else if (!strcmp(a, "--kv-type")) {
            if (!strcmp(v, "f32")) o.kv_type = KV_F32;
            else if (!strcmp(v, "f16")) o.kv_type = KV_F16;
            else die("--kv-type must be f32 or f16, got '%s'", v);
        }
        else if (!strcmp(a, "--min-p")) o.min_p = (float)parse_double(a, v, 0.0, 1.0);
        else if (!strcmp(a, "--repeat-penalty")) o.penalties.repeat = (float)parse_double(a, v, 0.01, 100.0);
        else if (!strcmp(a, "--repeat-last-n")) o.penalties.last_n = (int)parse_long(a, v, -1, INT_MAX);
        else if (!strcmp(a, "--presence-penalty")) o.penalties.presence = (float)parse_double(a, v, -100.0, 100.0);
        else if (!strcmp(a, "--frequency-penalty")) o.penalties.frequency = (float)parse_double(a, v, -100.0, 100.0);
        else if (!strcmp(a, "--perplexity")) o.perplexity = v;
        else if (!strcmp(a, "--save-logprobs")) o.save_logprobs = v;
        else if (!strcmp(a, "--kl-base")) o.kl_base = v;
        else if (!strcmp(a, "--system")) o.system = v;
        else if (!strcmp(a, "--format")) {
            o.format_name = v;
            for (o.format = 0; o.format < N_TURN_FORMATS && strcmp(v, TURN_FORMATS[o.format].name); o.format++) {}
            if (o.format == N_TURN_FORMATS) die("--format must be qa, chat or raw, got '%s'", v);
        }
        else die("unknown option '%s'; see -h", a);
    }
    if (!o.model_path) die("no model file given; usage: phi2 MODEL.bin [-p PROMPT] (see -h)");
    if ((o.prompt != NULL) + (o.prompt_file != NULL) + (o.ids != NULL) + (o.system != NULL) > 1)
        die("give the prompt only once: -p, -f, --ids or --system");
    if ((o.format_name || o.system || o.verbose) && !o.interactive) die("--format, --system and --verbose need -i");
    if (o.interactive) {
        if (o.ids || o.perplexity || o.dump_logits || o.trace || o.tokenize)
            die("-i is a conversation in text: give no --ids, --perplexity, --dump-logits, --trace or --tokenize with it");
        if (o.prompt_file && !strcmp(o.prompt_file, "-"))
            die("-i reads its turns from standard input: the prefix cannot come from there too (-f -)");
        if (o.system) o.prompt = o.system;  // the prefix, read as -p's text
    }
    if (o.top_p <= 0.0f) die("--top-p must be greater than 0");
    for (int i = 0; i < o.n_stops; i++)
        if (o.stops[i][0] == '\0') die("--stop needs a non-empty string");
    if (o.perplexity && (o.prompt || o.prompt_file || o.ids || o.dump_logits || o.trace || o.tokenize))
        die("--perplexity reads its own text: give no prompt, --dump-logits, --trace or --tokenize with it");
    if ((o.save_logprobs || o.kl_base) && !o.perplexity) die("--save-logprobs and --kl-base need --perplexity");
    if (o.dump_logits && o.trace) die("give only one of --dump-logits and --trace");
    if (o.prompt_cache_ro && !o.prompt_cache) die("--prompt-cache-ro needs --prompt-cache FILE");
    if (o.prompt_cache && (o.perplexity || o.trace || o.tokenize))
        die("--prompt-cache is for a prompt (a completion, -i's prefix, --dump-logits): not with --perplexity, --trace or --tokenize");
    return o;
}

/* "1,2,3" -> ids, each checked against the vocabulary. */
static int *parse_ids(const char *s, int vocab_size, int *n_out) {
    // Two passes over the string: check every id first (nothing is allocated yet, so an
    // error leaks nothing), then store them.
    int n = 0;
    int *ids = NULL;
    for (int pass = 0; pass < 2; pass++) {
        const char *p = s;
        for (int i = 0;; i++) {
            char *end = NULL;
            errno = 0;
            long v = strtol(p, &end, 10);
            if (end == p || errno || v < 0 || v >= vocab_size)
                die("--ids expects comma-separated token ids in [0, %d), got '%s'", vocab_size, s);
            if (*end != '\0' && *end != ',') die("--ids expects comma-separated token ids, got '%s'", s);
            if (pass == 0) n++;
            else ids[i] = (int)v;
            if (*end == '\0') break;
            p = end + 1;
        }
        if (pass == 0) ids = xmalloc(mul_size((size_t)n, sizeof(int)));
    }
    *n_out = n;
    return ids;
}

/* --- The prompt cache (--prompt-cache FILE) ---------------------------------------------
 * A prompt's keys and values, saved after it is processed, so that a later run whose
 * prompt begins with the same tokens (a long preamble, a code file, few-shot examples)
 * processes only the rest. The file (docs/FORMAT.md), little-endian:
 *   0   8 bytes "PHI2PCA1"      24  u64 the model file's header checksum (its bytes 248..255)
 *   8   u32 version (1)         32  u64 the model file's size
 *   12  u32 KV type             40  u32 n_layers, u32 hidden_dim
 *   16  u32 context size (-c)   48  u64 sum, u64 weighted sum of the payload's u64 words
 *   20  u32 n_tokens                (as the model file's weights checksums)
 *   64  the payload: n_tokens u32 ids, zeros up to a multiple of 8 bytes; then for each layer
 *       and head the keys of positions 0 .. n_tokens-1 (head_dim numbers each, as the KV
 *       type), then the values in the same order; zeros up to a multiple of 8 bytes.
 * A file that is missing, of another model, KV type or context size, or damaged gives one
 * warning line and a normal run: the cache can only save time, never change the answer. */
enum { PROMPT_CACHE_HEADER = 64, PROMPT_CACHE_VERSION = 1 };

static size_t pad8(size_t n) { return (n + 7) / 8 * 8; }

/* Bytes of one of the two caches' positions 0 .. n-1, all layers and heads. */
static size_t prompt_cache_kv_bytes(const RunState *s, const Config *c, int n) {
    const size_t elem = s->kv_type == KV_F16 ? 2 : 4;
    return mul_size(mul_size((size_t)c->n_layers * (size_t)c->n_heads, (size_t)n), (size_t)c->head_dim * elem);
}

/* Bytes of a cache file's payload for n positions: the ids, then the keys and values. */
static size_t prompt_cache_payload_bytes(const RunState *s, const Config *c, int n) {
    return pad8(pad8((size_t)n * 4) + mul_size(2, prompt_cache_kv_bytes(s, c, n)));
}

/* Where one layer's and head's cached keys (kv 0) or values (kv 1) start, in bytes. */
static unsigned char *kv_head_bytes(const RunState *s, const Config *c, int kv, size_t layer_head) {
    const size_t elem = s->kv_type == KV_F16 ? 2 : 4;
    return (unsigned char *)(kv ? s->value_cache : s->key_cache) +
           kv_offset(s, c, (int)(layer_head / (size_t)c->n_heads), (int)(layer_head % (size_t)c->n_heads), 0) * elem;
}

static void put_u32(unsigned char *p, uint32_t v) { for (int i = 0; i < 4; i++) p[i] = (unsigned char)(v >> (8 * i)); }
static void put_u64(unsigned char *p, uint64_t v) { for (int i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i)); }

/* The payload's checksums, over a stream of 8-byte words read or written a chunk at a time:
 * the chunk's weighted sum counts its words from 1, so it gains words_before * its sum. */
typedef struct {
    uint64_t sum, weighted, words;
} StreamSums;

static void stream_sums_add(StreamSums *ss, const unsigned char *p, size_t n_bytes) {  // n_bytes: a multiple of 8
    uint64_t sum, weighted;
    weights_checksums(p, n_bytes / 8, &sum, &weighted);
    ss->weighted += weighted + ss->words * sum;
    ss->sum += sum;
    ss->words += n_bytes / 8;
}

/* Bytes [at, at + len) of a cache file's keys and values (the payload after the ids), to or
 * from the KV cache: a load (to_kv) keeps the positions below `positions` and skips the
 * rest; a save (positions = n) gathers them all, and zeros for the final padding. */
static void prompt_cache_chunk(const RunState *s, const Config *c, int n, int positions, unsigned char *chunk,
                               size_t at, size_t len, int to_kv) {
    const size_t heads = (size_t)c->n_layers * c->n_heads, per_head = prompt_cache_kv_bytes(s, c, n) / heads;
    const size_t used = per_head / (size_t)n * (size_t)positions;
    while (len > 0) {
        const size_t block = at / per_head, within = at % per_head;
        const size_t take = per_head - within < len ? per_head - within : len;
        if (block >= 2 * heads) {
            if (!to_kv) memset(chunk, 0, take);
        } else if (within < used) {
            const size_t part = used - within < take ? used - within : take;
            unsigned char *kv = kv_head_bytes(s, c, (int)(block / heads), block % heads) + within;
            memcpy(to_kv ? kv : chunk, to_kv ? chunk : kv, part);
        }
        chunk += take, at += take, len -= take;
    }
}

/* Bytes read or written at a time (a multiple of 8). Test builds take chunks smaller than a
 * head's positions, so that the tiny test models cross every kind of boundary. */
#ifdef PHI2_TEST_HOOKS
enum { PROMPT_CACHE_CHUNK = 200 };
#else
enum { PROMPT_CACHE_CHUNK = 4 << 20 };
#endif

/* Loads what the cache at path holds of this prompt into the KV cache: returns how many
 * of the prompt's first positions it filled (0: none). At least the prompt's last token is
 * left to process, as its logits are needed. The file is read once, in chunks that are
 * checksummed and copied straight into place: a damaged file has then written positions
 * that the prompt's processing writes again, as it does when nothing was cached. */
static int prompt_cache_load(const char *path, const Model *m, RunState *s, int ctx, const int *prompt, int n_prompt) {
    const Config *c = &m->config;
    FILE *f = fopen_path(path, "rb");
    if (!f) {
        if (errno != ENOENT) warn("cannot read the prompt cache '%s': %s; the whole prompt is processed", path, strerror(errno));
        return 0;
    }
    unsigned char h[PROMPT_CACHE_HEADER];
    const char *problem = NULL;
    int reused = 0;
    struct stat st;
    if (fread(h, 1, sizeof(h), f) != sizeof(h) || memcmp(h, "PHI2PCA1", 8) != 0) {
        problem = "not a prompt cache, or truncated";
    } else if (read_u32(h + 8) != PROMPT_CACHE_VERSION) {
        problem = "another version";
    } else if (read_u64(h + 24) != read_u64(m->map + 248) || read_u64(h + 32) != m->map_size ||
               read_u32(h + 40) != (uint32_t)c->n_layers || read_u32(h + 44) != (uint32_t)c->hidden_dim) {
        problem = "made with another model file";
    } else if (read_u32(h + 12) != (uint32_t)s->kv_type || read_u32(h + 16) != (uint32_t)ctx) {
        problem = "made with another --kv-type or --ctx-size";
    } else if (read_u32(h + 20) == 0 || read_u32(h + 20) > (uint32_t)ctx) {
        problem = "damaged (token count)";
    } else {
        const int n = (int)read_u32(h + 20);
        const size_t ids = pad8((size_t)n * 4), size = prompt_cache_payload_bytes(s, c, n);
        unsigned char *chunk = xmalloc(PROMPT_CACHE_CHUNK > ids ? PROMPT_CACHE_CHUNK : ids);
        StreamSums ss = {0, 0, 0};
        if (fstat(fileno(f), &st) != 0 || (uint64_t)st.st_size != PROMPT_CACHE_HEADER + (uint64_t)size ||
            fread(chunk, 1, ids, f) != ids) {
            problem = "truncated, or longer than it says";
        } else {
            stream_sums_add(&ss, chunk, ids);
            while (reused < n && reused < n_prompt - 1 && read_u32(chunk + 4 * (size_t)reused) == (uint32_t)prompt[reused])
                reused++;  // reused < n_prompt <= the positions the KV cache holds
            for (size_t at = 0; at < size - ids && !problem; at += PROMPT_CACHE_CHUNK) {
                const size_t len = size - ids - at < PROMPT_CACHE_CHUNK ? size - ids - at : PROMPT_CACHE_CHUNK;
                if (fread(chunk, 1, len, f) != len) {
                    problem = "truncated, or longer than it says";
                } else {
                    stream_sums_add(&ss, chunk, len);
                    prompt_cache_chunk(s, c, n, reused, chunk, at, len, 1);
                }
            }
            if (!problem && (ss.sum != read_u64(h + 48) || ss.weighted != read_u64(h + 56)))
                problem = "damaged (checksum mismatch)";
        }
        free(chunk);
    }
    fclose(f);
    if (problem) warn("ignoring the prompt cache '%s': %s; the whole prompt is processed", path, problem);
    return problem ? 0 : reused;
}

/* Saves the KV cache's positions 0 .. n-1 (tokens[0..n)) to path, through a temporary file
 * renamed when complete, a chunk at a time; the header, with the checksums, goes in last.
 * A failure (a full disk) is a warning: the answer does not need it. */
static void prompt_cache_save(const char *path, const Model *m, const RunState *s, int ctx, const int *tokens, int n) {
    const Config *c = &m->config;
    const size_t ids = pad8((size_t)n * 4), size = prompt_cache_payload_bytes(s, c, n);
    unsigned char *chunk = xcalloc(PROMPT_CACHE_CHUNK > ids ? PROMPT_CACHE_CHUNK : ids, 1);
    unsigned char h[PROMPT_CACHE_HEADER] = {0};
    StreamSums ss = {0, 0, 0};
    begin_partial_file(path);
    FILE *f = create_partial_file(g_partial_file);
    int err = f ? 0 : errno;
    for (int i = 0; i < n; i++) put_u32(chunk + 4 * (size_t)i, (uint32_t)tokens[i]);
    stream_sums_add(&ss, chunk, ids);
    if (!err && (fwrite(h, 1, sizeof(h), f) != sizeof(h) || fwrite(chunk, 1, ids, f) != ids)) err = errno ? errno : EIO;
    for (size_t at = 0; at < size - ids && !err; at += PROMPT_CACHE_CHUNK) {
        const size_t len = size - ids - at < PROMPT_CACHE_CHUNK ? size - ids - at : PROMPT_CACHE_CHUNK;
        prompt_cache_chunk(s, c, n, n, chunk, at, len, 0);
        stream_sums_add(&ss, chunk, len);
        if (fwrite(chunk, 1, len, f) != len) err = errno ? errno : EIO;
    }
    memcpy(h, "PHI2PCA1", 8);
    put_u32(h + 8, PROMPT_CACHE_VERSION), put_u32(h + 12, (uint32_t)s->kv_type), put_u32(h + 16, (uint32_t)ctx);
    put_u32(h + 20, (uint32_t)n), put_u64(h + 24, read_u64(m->map + 248)), put_u64(h + 32, m->map_size);
    put_u32(h + 40, (uint32_t)c->n_layers), put_u32(h + 44, (uint32_t)c->hidden_dim);
    put_u64(h + 48, ss.sum), put_u64(h + 56, ss.weighted);
    if (!err && (fseek(f, 0, SEEK_SET) != 0 || fwrite(h, 1, sizeof(h), f) != sizeof(h))) err = errno ? errno : EIO;
    if (f && fclose(f) != 0 && !err) err = errno;
    if (!err && replace_file(g_partial_file, path) != 0) err = errno;
    if (err) {
        warn("cannot write the prompt cache '%s': %s", path, strerror(err));
        remove_path(g_partial_file);
    }
    g_partial_file[0] = '\0';
    free(chunk);
}

static void print_ids(FILE *f, const int *ids, int n) {
    for (int i = 0; i < n; i++) fprintf(f, i ? ",%d" : "%d", ids[i]);
    fprintf(f, "\n");
}

/* --dump-logits (every prompt position's logits) or --trace (every named intermediate of
 * every prompt position), written to a temporary file that is renamed when complete. */
static void dump_prompt(const Model *m, RunState *s, const Options *opt, const int *tokens, int n_tokens,
                        const char *path, int trace, int ctx) {
    // With --prompt-cache the positions it holds are not computed again: the file then has
    // the logits of the others only.
    const int reused = opt->prompt_cache ? prompt_cache_load(opt->prompt_cache, m, s, ctx, tokens, n_tokens) : 0;
    begin_partial_file(path);
    FILE *f = create_partial_file(g_partial_file);
    if (!f) die("cannot create '%s': %s", g_partial_file, strerror(errno));
    if (trace) {
        s->trace = f;
        s->trace_path = g_partial_file;
        prefill(m, s, tokens, n_tokens, 0, NULL, NULL);
        s->trace = NULL;
    } else {
        prefill(m, s, tokens + reused, n_tokens - reused, reused, f, g_partial_file);
    }
    if (fclose(f) != 0) die("cannot write '%s': %s", g_partial_file, strerror(errno));
    if (replace_file(g_partial_file, path) != 0) die("cannot rename '%s' to '%s': %s", g_partial_file, path, strerror(errno));
    g_partial_file[0] = '\0';
    if (opt->prompt_cache && !opt->prompt_cache_ro && reused < n_tokens - 1)
        prompt_cache_save(opt->prompt_cache, m, s, ctx, tokens, n_tokens);
}

/* --save-logprobs / --kl-base files: a header of 24 bytes,
 *   8 bytes "PHI2LPR1", u32 vocab_size, u32 ctx (-c), u32 number of rows, u32 0,
 * then one row per scored token, in text order: u32 the token's id, then vocab_size f32 log-
 * probabilities (the model's log-softmax at the position before it). All little-endian. */
static const char LOGPROBS_MAGIC[8] = {'P', 'H', 'I', '2', 'L', 'P', 'R', '1'};

static void write_or_die(const void *p, size_t size, size_t n, FILE *f, const char *path) {
    if (fwrite(p, size, n, f) != n) die("cannot write '%s': %s", path, strerror(errno));
}

static void read_or_die(void *p, size_t size, size_t n, FILE *f, const char *path) {
    if (fread(p, size, n, f) != n) {
        if (ferror(f)) die("cannot read '%s': %s", path, strerror(errno));
        die("'%s' ends early: it is not a complete --save-logprobs file", path);
    }
}

/* Open a --kl-base file and check that it was written over the same windows (vocabulary,
 * -c and number of scored tokens; the tokens themselves are compared row by row). */
static FILE *open_kl_base(const char *path, int vocab_size, int ctx, uint32_t n_rows) {
    FILE *f = fopen_path(path, "rb");
    if (!f) die("cannot open --kl-base file '%s': %s", path, strerror(errno));
    unsigned char header[24];
    read_or_die(header, 1, sizeof(header), f, path);
    if (memcmp(header, LOGPROBS_MAGIC, 8) != 0) die("'%s' is not a --save-logprobs file", path);
    const uint32_t base_vocab = read_u32(header + 8), base_ctx = read_u32(header + 12), base_rows = read_u32(header + 16);
    if (base_vocab != (uint32_t)vocab_size)
        die("'%s' has a vocabulary of %u, this model %d: a different model family", path, base_vocab, vocab_size);
    if (base_ctx != (uint32_t)ctx) die("'%s' was written with -c %u, this run has -c %d", path, base_ctx, ctx);
    if (base_rows != n_rows)
        die("'%s' scored %u tokens, this run %u: a different text", path, base_rows, n_rows);
    return f;
}

/* --perplexity: the text cut into windows of ctx tokens (a last partial window is left out);
 * each window is run from position 0 in batches, and the tokens of its second half (from
 * position ctx/2 + 1 on) are scored by the logits of the position before them. */
static void perplexity(const Model *m, const Options *opt, int ctx) {
    const int V = m->config.vocab_size;
    size_t text_len = 0;
    unsigned char *text = read_file(opt->perplexity, (size_t)1 << 30, &text_len);
    if (text_len == 0) {
        free(text);  // (the error paths free what they hold: the sanitizer build checks for leaks)
        die("'%s' is empty: --perplexity needs a text", opt->perplexity);
    }
    int *ids = NULL;
    size_t n_ids = 0;
    if (tokenizer_encode(&m->tokenizer, text, text_len, &ids, &n_ids) != 0) die("out of memory tokenizing '%s'", opt->perplexity);
    free(text);
    const int first_scored = ctx / 2 + 1;  // the positions of the scored tokens: first_scored .. ctx-1
    const size_t n_windows = n_ids / (size_t)ctx;
    const size_t n_rows = n_windows * (size_t)(ctx - first_scored);  // <= n_ids: no overflow
    if (ctx - first_scored < 1 || n_windows == 0 || n_rows > UINT32_MAX) {
        free(ids);
        if (ctx - first_scored < 1) die("--perplexity needs a context (-c) of at least 3 tokens");
        if (n_windows == 0)
            die("'%s' is %zu tokens, shorter than one window of -c %d tokens", opt->perplexity, n_ids, ctx);
        die("'%s' is too long for --perplexity", opt->perplexity);
    }

    FILE *base = opt->kl_base ? open_kl_base(opt->kl_base, V, ctx, (uint32_t)n_rows) : NULL;
    FILE *save = NULL;
    if (opt->save_logprobs) {
        begin_partial_file(opt->save_logprobs);
        save = create_partial_file(g_partial_file);
        if (!save) die("cannot create '%s': %s", g_partial_file, strerror(errno));
        unsigned char header[24] = {0};
        const uint32_t fields[3] = {(uint32_t)V, (uint32_t)ctx, (uint32_t)n_rows};
        memcpy(header, LOGPROBS_MAGIC, 8);
        memcpy(header + 8, fields, sizeof(fields));
        write_or_die(header, 1, sizeof(header), save, g_partial_file);
    }

    RunState s;
    init_state(&s, &m->config, ctx, opt->batch, opt->kv_type >= 0 ? opt->kv_type : default_kv_type(&m->config), 1,
               opt->n_threads);
    double *logprobs = xmalloc(mul_size((size_t)V, sizeof(double)));
    float *row_f32 = xmalloc(mul_size((size_t)V, sizeof(float)));
    MeanEstimate nll = {0}, base_nll = {0}, kl = {0};
    long long top1_same = 0;
    const double t0 = now_seconds();
    for (size_t w = 0; w < n_windows; w++) {
        const int *tokens = ids + w * (size_t)ctx;
        for (int done = 0; done < ctx;) {
            const int n = ctx - done < s.max_batch ? ctx - done : s.max_batch;
            const int scores_any = done + n > first_scored - 1;  // holds a position whose logits score a token
            forward(m, &s, tokens + done, n, done, scores_any);
            for (int t = 0; scores_any && t < n; t++) {
                const int pos = done + t;  // its logits predict the token at pos + 1
                if (pos + 1 < first_scored || pos + 1 >= ctx) continue;
                const float *row = s.logits + (size_t)t * V;
                check_logits_finite(row, V, pos);
                log_softmax(logprobs, row, V);
                const uint32_t target = (uint32_t)tokens[pos + 1];
                mean_add(&nll, -logprobs[target]);
                if (save) {
                    for (int i = 0; i < V; i++) row_f32[i] = (float)logprobs[i];
                    write_or_die(&target, sizeof(target), 1, save, g_partial_file);
                    write_or_die(row_f32, sizeof(float), (size_t)V, save, g_partial_file);
                }
                if (base) {
                    uint32_t base_target = 0;
                    read_or_die(&base_target, sizeof(base_target), 1, base, opt->kl_base);
                    read_or_die(row_f32, sizeof(float), (size_t)V, base, opt->kl_base);
                    if (base_target != target)
                        die("'%s' scored token %u where this run has %u (window %zu): a different text",
                            opt->kl_base, base_target, target, w + 1);
                    double divergence = 0.0;  // KL(base || this) = sum p_base (log p_base - log p_this)
                    int best_base = 0, best_this = 0;
                    for (int i = 0; i < V; i++) {
                        if (row_f32[i] > -INFINITY) divergence += exp((double)row_f32[i]) * ((double)row_f32[i] - logprobs[i]);
                        if (row_f32[i] > row_f32[best_base]) best_base = i;
                        if (logprobs[i] > logprobs[best_this]) best_this = i;
                    }
                    mean_add(&kl, divergence);
                    mean_add(&base_nll, -(double)row_f32[target]);
                    top1_same += best_base == best_this;
                }
            }
            done += n;
        }
        fprintf(stderr, "phi2: perplexity: window %zu/%zu: %.4f so far (%.1f s)\n", w + 1, n_windows,
                exp(mean_of(&nll)), now_seconds() - t0);
    }
    const double ppl = exp(mean_of(&nll));
    printf("perplexity: %.6f +/- %.6f (%lld tokens scored: the second halves of %zu windows of %d)\n", ppl,
           ppl * stderr_of(&nll), nll.n, n_windows, ctx);
    if (base) {
        if (fgetc(base) != EOF) die("'%s' is longer than its header says", opt->kl_base);
        fclose(base);
        printf("kl-divergence: %.6g +/- %.6g | top-1 agreement: %.4f%% | perplexity ratio (this / base): %.6f\n",
               mean_of(&kl), stderr_of(&kl), 100.0 * (double)top1_same / (double)kl.n,
               exp(mean_of(&nll) - mean_of(&base_nll)));
    }
    if (save) {
        if (fclose(save) != 0) die("cannot write '%s': %s", g_partial_file, strerror(errno));
        if (replace_file(g_partial_file, opt->save_logprobs) != 0)
            die("cannot rename '%s' to '%s': %s", g_partial_file, opt->save_logprobs, strerror(errno));
        g_partial_file[0] = '\0';
    }
    free(logprobs);
    free(row_f32);
    free(ids);
    free_state(&s);
}

/* The prompt as token ids: --ids as given, text (-p / -f) through the tokenizer.
 * *text (may be NULL) keeps the prompt's bytes for echoing. */
static int *read_prompt(const Options *opt, const Model *m, int *n_out, unsigned char **text, size_t *text_len) {
    *text = NULL;
    *text_len = 0;
    if (opt->ids) return parse_ids(opt->ids, m->config.vocab_size, n_out);
    if (opt->prompt_file) {
        // Every token covers at most TOKENIZER_MAX_TOKEN_BYTES, so a longer text cannot fit
        // in the context (--tokenize, which needs no context, may read up to 1 GiB).
        size_t ctx = (size_t)(opt->ctx ? opt->ctx : m->config.max_seq_len);
        size_t max_len = opt->tokenize ? (size_t)1 << 30 : mul_size(ctx, TOKENIZER_MAX_TOKEN_BYTES);
        *text = read_file(opt->prompt_file, max_len, text_len);
    }
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

/* Generated text on its way to stdout (whole UTF-8 characters only, see Utf8Stream). With
 * stop strings (--stop), bytes that might be the beginning of one are held back until the next
 * tokens show whether they are; when one appears, only the text before it is printed.
 * With --print-ids the ids go out instead, each as it is sampled ("12,34,...", a newline at
 * the end): streamed like the text, so a closed pipe ends the run at the next token too. */
typedef struct {
    const char *const *stops;  // the stop strings (--stop, repeatable): the first to appear ends it
    int n_stops;
    int print;              // 0: only watch for the stop string (--print-ids)
    int ids;                // 1: print each token's id (--print-ids)
    long long n_ids;        // ids printed so far (the first has no comma before it)
    unsigned char *held;    // generated bytes not printed yet
    size_t n_held, cap;
    size_t n_passed;        // bytes let through so far (printed unless print is 0): after a stop
                            // string, where in the generated text it began
    Utf8Stream utf8;
} TextOut;

static void text_out_emit(TextOut *o, size_t n) {
    if (n == 0) return;  // (held may still be NULL)
    o->n_passed += n;
    if (o->print) utf8_stream_write(&o->utf8, o->held, n, stdout);
    memmove(o->held, o->held + n, o->n_held - n);
    o->n_held -= n;
}

/* Add one token's bytes; print what is safe. Returns 1 if the stop string is now complete. */
static int text_out_push(TextOut *o, const unsigned char *bytes, size_t n) {
    if (n == 0) return 0;
    if (o->n_held + n > o->cap) {
        o->cap = (o->n_held + n) * 2;
        unsigned char *grown = realloc(o->held, o->cap);
        if (!grown) die("out of memory");
        o->held = grown;
    }
    memcpy(o->held + o->n_held, bytes, n);
    o->n_held += n;
    for (size_t i = 0; i < o->n_held && o->n_stops > 0; i++)  // the earliest complete stop string
        for (int s = 0; s < o->n_stops; s++) {
            const size_t stop_len = strlen(o->stops[s]);
            if (i + stop_len <= o->n_held && memcmp(o->held + i, o->stops[s], stop_len) == 0) {
                text_out_emit(o, i);
                o->n_held = 0;
                return 1;
            }
        }
    size_t keep = 0;  // held bytes that might still become a stop string
    for (int s = 0; s < o->n_stops; s++) {
        const size_t stop_len = strlen(o->stops[s]);
        size_t k = o->n_held < stop_len - 1 ? o->n_held : stop_len - 1;
        while (k > keep && memcmp(o->held + o->n_held - k, o->stops[s], k) != 0) k--;
        if (k > keep) keep = k;
    }
    text_out_emit(o, o->n_held - keep);
    return 0;
}

/* --print-ids: one more generated token's id, after a comma unless it is the first. */
static void text_out_id(TextOut *o, int id) {
    if (!o->ids) return;
    printf(o->n_ids++ ? ",%d" : "%d", id);
}

/* The end of the output: what is held back, and the last newline (text or ids). */
static void text_out_finish(TextOut *o) {
    text_out_emit(o, o->n_held);
    if (o->print) {
        utf8_stream_flush(&o->utf8, stdout);
        printf("\n");
    }
    if (o->ids) printf("\n");
    free(o->held);
}

/* --- Generation: the pieces a one-shot run and interactive mode (-i) share --------------- */

/* The sampler with its scratch, and the totals of a run for its timings line. A one-shot
 * run gives one answer; interactive mode one per turn, all from the same Generator. */
typedef struct {
    const Model *m;
    RunState *s;
    const Options *opt;
    int n_vocab_real;       // ids that may be sampled: the tokenizer's (past them: padding rows)
    Sampler sampler;
    Candidate *cand;        // [n_vocab_real] scratch of sample()
    int *penalty_counts;    // [n_vocab_real] zeros, scratch of apply_penalties()
    int n_prefilled;        // prompt positions processed (all turns, re-read ones included)
    int n_from_cache;       // prompt positions the --prompt-cache file held (not processed)
    double t_first_token;   // seconds from the program's start to the first generated token (0: none yet)
    int n_generated;        // tokens sampled
    int n_decoded;          // of those, the ones fed back through the model
    double t_prefill, t_generate;  // seconds spent on each
} Generator;

static void generator_init(Generator *g, const Model *m, RunState *s, const Options *opt) {
    const Config *c = &m->config;
    memset(g, 0, sizeof(*g));
    g->m = m;
    g->s = s;
    g->opt = opt;
    g->n_vocab_real = m->tokenizer.n_tokens < c->vocab_size ? m->tokenizer.n_tokens : c->vocab_size;
    g->sampler = (Sampler){.temperature = opt->temperature, .top_k = opt->top_k, .top_p = opt->top_p,
                           .rng = opt->seed_given ? opt->seed : (uint64_t)time(NULL), .min_p = opt->min_p};
    g->sampler.rng = g->sampler.rng * 0x9E3779B97F4A7C15ULL + 1;  // never zero: xorshift would stick
    g->cand = xmalloc(mul_size((size_t)g->n_vocab_real, sizeof(Candidate)));
    g->penalty_counts = xcalloc((size_t)g->n_vocab_real, sizeof(int));
}

static void generator_free(Generator *g) {
    free(g->cand);
    free(g->penalty_counts);
}

/* tokens[0..n) into the KV cache at positions pos0.. (the last one's logits in s->logits).
 * Returns how many were processed: fewer after Ctrl-C. */
static int generator_prefill(Generator *g, const int *tokens, int n, int pos0) {
    const double t0 = now_seconds();
    const int done = prefill(g->m, g->s, tokens, n, pos0, NULL, NULL);
    g->t_prefill += now_seconds() - t0;
    g->n_prefilled += done;
    return done;
}

/* Sample, print (through out) and feed back tokens after tokens[0..*n_tokens), which are all
 * in the KV cache with the last one's logits in s->logits; each new token is appended to
 * tokens (room for ctx) and *n_tokens grows. Stops at end of text (not appended), n_limit
 * tokens, a full context (ctx positions), a stop string, Ctrl-C or a closed output
 * (*reader_alive becomes 0). The last token (whose logits nobody reads) is not fed back:
 * tokens[0 .. *n_tokens - 1) or all of them are then in the cache, as g->n_decoded tells.
 * The repetition penalties look back on all of tokens. Returns why it stopped. */
static const char *generate_tokens(Generator *g, int *tokens, int *n_tokens, int ctx, long long n_limit,
                                   TextOut *out, int *reader_alive) {
    const Model *m = g->m;
    const Config *c = &m->config;
    RunState *s = g->s;
    const char *stop_reason = NULL;
    int n_gen = 0, pos = *n_tokens;
    const double t0 = now_seconds();
    while (!stop_reason) {
        if (g_interrupted) { stop_reason = "interrupted"; break; }
        if (!*reader_alive) { stop_reason = "the output was closed"; break; }
        if (n_gen >= n_limit) { stop_reason = "generated the -n limit of tokens"; break; }
        if (pos >= ctx) { stop_reason = "the context is full"; break; }
        apply_penalties(&g->opt->penalties, s->logits, g->n_vocab_real, tokens, pos, g->penalty_counts);
        if (g->opt->ignore_eos) s->logits[c->eos_id] = -INFINITY;
        int next = sample(&g->sampler, s->logits, g->n_vocab_real, g->cand);
        if (next == c->eos_id) { stop_reason = "end of text"; break; }
        tokens[pos] = next;
        n_gen++;
        size_t len = 0;
        const unsigned char *bytes = tokenizer_token_bytes(&m->tokenizer, next, &len);
        if (text_out_push(out, bytes, len)) stop_reason = "found a stop string";
        text_out_id(out, next);  // (the token with the stop string in it too, as it is in tokens)
        if (out->print || out->ids) *reader_alive = flush_stdout();
        if (g->t_first_token == 0.0) g->t_first_token = now_seconds() - g->opt->t_start;
        if (!stop_reason && n_gen < n_limit && pos + 1 < ctx) {
            forward(m, s, &next, 1, pos, 0);
            check_logits_finite(s->logits, c->vocab_size, pos);
            g->n_decoded++;
        }
        pos++;
    }
    *n_tokens = pos;
    g->n_generated += n_gen;
    g->t_generate += now_seconds() - t0;
    return stop_reason;
}

/* What the timings line adds to the reason for the thread count: a build without OpenMP
 * runs prompt batches on one thread (generation still uses them all). */
static const char *prompts_on_one_thread(int n_threads) {
#ifdef _OPENMP
    (void)n_threads;
    return "";
#else
    return n_threads > 1 ? "; prompts on 1: built without OpenMP" : "";
#endif
}

/* Why generation stopped, and the timings line, on stderr. */
static void print_timings(Generator *g, const char *stop_reason, double t_load) {
    const Model *m = g->m;
    fprintf(stderr, "\nphi2: stopped: %s\n", stop_reason);
    // Decode reads every weight once per token: tokens per second times bytes is the bandwidth used.
    double gen_tps = g->t_generate > 0 ? g->n_decoded / g->t_generate : 0.0;
    char kernels[96];
    kernel_description(kernels, sizeof(kernels), g->s->kern, m->config.weight_type);
    char from_cache[48] = "";
    if (g->opt->prompt_cache) snprintf(from_cache, sizeof(from_cache), " (%d from the cache)", g->n_from_cache);
    fprintf(stderr, "phi2: load %.2f s (%s) | first token at %.2f s | prompt %d tokens, %.2f tok/s%s | generated %d "
            "tokens, %.2f tok/s (%.1f GB/s of weights) | %d thread%s (%s%s) | KV cache %s, %.1f MB | %s\n",
            t_load, m->load_why, g->t_first_token, g->n_prefilled,
            g->t_prefill > 0 ? g->n_prefilled / g->t_prefill : 0.0, from_cache, g->n_generated, gen_tps,
            gen_tps * (double)m->weight_bytes * 1e-9, g->s->n_threads, g->s->n_threads == 1 ? "" : "s",
            g->opt->threads_why, prompts_on_one_thread(g->s->n_threads), kv_type_name(g->s->kv_type),
            (double)g->s->kv_bytes * 1e-6, kernels);
}

/* A one-shot run: process the prompt, then sample, print and feed back tokens until end of
 * text, the -n limit, a full context, a stop string, Ctrl-C or a closed output. The sequence
 * (prompt + generated) never exceeds ctx. Timings go to stderr. Returns the exit status: 0,
 * or 130 after Ctrl-C. */
static int generate(const Model *m, RunState *s, const Options *opt, const int *prompt, int n_prompt,
                    const unsigned char *text, size_t text_len, int ctx, double t_load) {
    Generator g;
    generator_init(&g, m, s, opt);
    // The prompt, then each generated token (what the repetition penalties look back on).
    int *tokens = xmalloc(mul_size((size_t)ctx + 1, sizeof(int)));
    memcpy(tokens, prompt, mul_size((size_t)n_prompt, sizeof(int)));
    TextOut out = {.stops = opt->stops, .n_stops = opt->n_stops, .print = !opt->print_ids, .ids = opt->print_ids};
    if (out.print && !opt->no_display_prompt && text) utf8_stream_write(&out.utf8, text, text_len, stdout);
    int reader_alive = flush_stdout();
    g_interrupted = 0;
    signal(SIGINT, on_interrupt);  // Ctrl-C: stop, print what we have and the timings, exit 130

    // The prompt: all positions in batches (but those the prompt cache holds), logits of the
    // last one only; then one token per forward pass.
    if (opt->prompt_cache) g.n_from_cache = prompt_cache_load(opt->prompt_cache, m, s, ctx, tokens, n_prompt);
    const int n_new = n_prompt - g.n_from_cache;
    if (reader_alive && generator_prefill(&g, tokens + g.n_from_cache, n_new, g.n_from_cache) == n_new &&
        opt->prompt_cache && !opt->prompt_cache_ro && n_new > 1) {
        prompt_cache_save(opt->prompt_cache, m, s, ctx, tokens, n_prompt);
        signal(SIGINT, on_interrupt);  // (saving set it to remove the temporary file)
    }
    int n_tokens = n_prompt;
    const char *stop_reason = generate_tokens(&g, tokens, &n_tokens, ctx, opt->n_predict < 0 ? LLONG_MAX : opt->n_predict,
                                              &out, &reader_alive);
    if (reader_alive) {
        text_out_finish(&out);  // the last newline (the ids were printed as they came)
        flush_stdout();
    } else {
        free(out.held);  // nobody reads the rest
    }
    signal(SIGINT, SIG_DFL);
    print_timings(&g, stop_reason, t_load);
    free(tokens);
    generator_free(&g);
    return g_interrupted ? 130 : 0;
}

/* --- Interactive mode (-i) --------------------------------------------------------------- */

/* The conversation as token ids, at the positions where the KV cache holds them: the prefix
 * (--system, -p or -f; kept for the whole session), then the turns, each the user's wrapped
 * text followed by the model's answer. */
typedef struct {
    int *tokens;       // [capacity]
    int n_tokens;
    int n_cached;      // tokens[0..n_cached) are in the KV cache; the rest are read with the next turn
    int n_prefix;      // tokens[0..n_prefix): the prefix, never dropped
    int *turn_start;   // [capacity] where each turn still in the conversation begins, oldest first
    int n_turns;
} Conversation;

/* Ctrl-C in interactive mode: stop the answer, or at the prompt end the session; every time
 * (the handler stays), not only the first, as on_interrupt does for a one-shot run. */
static void on_interactive_interrupt(int sig) {
    (void)sig;
    g_interrupted = 1;
}

enum { TURN_READ, TURN_END_OF_INPUT, TURN_INTERRUPTED, TURN_TOO_LONG };

/* One turn from standard input into *buf (grown as needed; *len bytes, any bytes, NUL
 * included): a line without its "\n" or "\r\n"; a line ending in '\' goes on with the next
 * one (the '\' becomes a "\n"). A turn longer than max_len bytes is read to its end and
 * refused (TURN_TOO_LONG). Ctrl-C (a read that ends with EINTR) gives TURN_INTERRUPTED. */
static int read_turn(unsigned char **buf, size_t *cap, size_t *len, size_t max_len) {
    size_t n = 0;
    int got_any = 0, too_long = 0;
    int prev = 0, prev2 = 0;  // the two bytes before this one on its line (0: none)
    if (g_interrupted) return TURN_INTERRUPTED;  // Ctrl-C just after an answer counts as at the prompt
    for (;;) {
        const int ch = getc(stdin);
        if (ch == EOF) {
            if (g_interrupted) {
                clearerr(stdin);
                return TURN_INTERRUPTED;
            }
            if (ferror(stdin)) {
                if (errno != EINTR) die("cannot read standard input: %s", strerror(errno));
                clearerr(stdin);  // another signal: read on
                continue;
            }
            if (!got_any) return TURN_END_OF_INPUT;
            break;  // a last line without "\n"
        }
        got_any = 1;
        if (ch == '\n') {
            const int cr = prev == '\r', continued = (cr ? prev2 : prev) == '\\';
            if (!too_long) n -= (size_t)cr + (size_t)continued;  // (both were stored)
            if (!continued) break;
            prev = prev2 = 0;
        }
        if (n == max_len) too_long = 1;
        if (too_long) {  // read on to the end of the turn, keeping nothing
            prev2 = prev, prev = ch;
            continue;
        }
        if (n == *cap) {
            *cap = *cap ? mul_size(*cap, 2) : 256;
            unsigned char *grown = realloc(*buf, *cap);
            if (!grown) die("out of memory reading a turn");
            *buf = grown;
        }
        (*buf)[n++] = (unsigned char)ch;  // a continued line's '\n' too
        if (ch != '\n') prev2 = prev, prev = ch;
    }
    *len = n;
    return too_long ? TURN_TOO_LONG : TURN_READ;
}

/* Make room for a turn of n_new tokens with room for its answer (needed = both together): if
 * they do not fit in the context after the conversation, drop the oldest whole turns (never
 * the prefix) until they do, or until none is left. The turns kept move to earlier
 * positions, so their keys and values are computed again with the new turn (the prefix's
 * stay where they are). Says so in one line on stderr. */
static void drop_oldest_turns(Conversation *conv, int needed, int ctx) {
    if (conv->n_tokens + needed <= ctx || conv->n_turns == 0) return;
    int n_drop = 1;  // turns dropped: the fewest that make room
    while (n_drop < conv->n_turns && conv->n_prefix + (conv->n_tokens - conv->turn_start[n_drop]) + needed > ctx)
        n_drop++;
    const int cut = n_drop < conv->n_turns ? conv->turn_start[n_drop] : conv->n_tokens;
    const int n_dropped = cut - conv->n_prefix;
    memmove(conv->tokens + conv->n_prefix, conv->tokens + cut, (size_t)(conv->n_tokens - cut) * sizeof(int));
    conv->n_tokens -= n_dropped;
    for (int t = n_drop; t < conv->n_turns; t++) conv->turn_start[t - n_drop] = conv->turn_start[t] - n_dropped;
    conv->n_turns -= n_drop;
    if (conv->n_cached > conv->n_prefix) conv->n_cached = conv->n_prefix;
    char turns[32] = "oldest turn";
    if (n_drop > 1) snprintf(turns, sizeof(turns), "%d oldest turns", n_drop);
    fprintf(stderr, "phi2: context full: dropped the %s (%d tokens), re-reading %d\n", turns, n_dropped,
            conv->n_tokens - conv->n_prefix);
}

/* Append text's tokens to the conversation (not yet in the KV cache). */
static void append_text(Conversation *conv, const Model *m, const unsigned char *text, size_t len) {
    int *ids = NULL;
    size_t n = 0;
    if (len > 0 && tokenizer_encode(&m->tokenizer, text, len, &ids, &n) != 0) die("out of memory tokenizing a turn");
    if (n > 0) memcpy(conv->tokens + conv->n_tokens, ids, n * sizeof(int));  // (the caller made sure it fits)
    conv->n_tokens += (int)n;
    free(ids);
}

/* Interactive mode: read a turn (a line of standard input), wrap it in the format, read its
 * new tokens into the KV cache after the conversation so far, stream the answer, repeat until
 * the end of input or Ctrl-C at the prompt. In a terminal a prompt marker "> " shows where to
 * type; with a pipe, stdout gets only the answers, each ending in a newline. The prefix
 * (prefix[0..n_prefix)) stays for the whole session; when the context would overflow, the
 * oldest turns are dropped (drop_oldest_turns). Returns the exit status: 0, or 130 after
 * Ctrl-C at the prompt. */
static int interactive(const Model *m, RunState *s, const Options *opt, const int *prefix, int n_prefix, int ctx,
                       double t_load) {
    const TurnFormat *format = &TURN_FORMATS[opt->format];
    const int at_terminal = is_terminal(stdin);
    // An answer stops at --stop's strings and at the marker of the format's next turn.
    const char *stops[MAX_STOP_STRINGS + 1];
    int n_stops = 0;
    for (int i = 0; i < opt->n_stops; i++) stops[n_stops++] = opt->stops[i];
    if (format->marker) stops[n_stops++] = format->marker;
    // Room kept for an answer: -n tokens, at most half the context (-n -1: half), so that a
    // large -n still leaves room for the conversation. An answer may go on past it while the
    // context lasts; the next turn then makes room again.
    const int answer_room = opt->n_predict < 0 || opt->n_predict > ctx / 2 ? ctx / 2 : (int)opt->n_predict;
    const long long n_limit = opt->n_predict < 0 ? LLONG_MAX : opt->n_predict;
    // A turn of more bytes cannot fit in the context (a token is at most this many bytes).
    const size_t max_turn_bytes = mul_size((size_t)ctx, TOKENIZER_MAX_TOKEN_BYTES);

    Generator g;
    generator_init(&g, m, s, opt);
    // ctx tokens, and the tokens of the part of a cut answer's last token before the stop
    // string, re-read with the next turn (at most one per byte of that token).
    const size_t capacity = (size_t)ctx + TOKENIZER_MAX_TOKEN_BYTES + 1;
    Conversation conv = {.tokens = xmalloc(mul_size(capacity, sizeof(int))),
                         .turn_start = xmalloc(mul_size(capacity, sizeof(int))),
                         .n_tokens = n_prefix, .n_prefix = n_prefix};
    if (n_prefix > 0) memcpy(conv.tokens, prefix, (size_t)n_prefix * sizeof(int));  // (no prefix: NULL)
    unsigned char *line = NULL, *text = NULL;
    size_t line_cap = 0, line_len = 0, text_cap = 0;
    const char *stop_reason = NULL;
    int status = 0, reader_alive = 1, turn_number = 0;
    catch_interrupts(on_interactive_interrupt);

    g_interrupted = 0;
    // --prompt-cache: the prefix (-p, -f) from the file if it holds it, else read now and
    // saved, before the first turn; the turns themselves are never saved.
    if (opt->prompt_cache && n_prefix > 0) {
        g.n_from_cache = prompt_cache_load(opt->prompt_cache, m, s, ctx, prefix, n_prefix);
        const int from = g.n_from_cache;
        conv.n_cached = from + generator_prefill(&g, prefix + from, n_prefix - from, from);
        if (conv.n_cached == n_prefix && !opt->prompt_cache_ro && n_prefix - from > 1)
            prompt_cache_save(opt->prompt_cache, m, s, ctx, prefix, n_prefix);
        g_interrupted = 0;  // (Ctrl-C while reading it: the first turn reads the rest)
    }
    while (!stop_reason) {
        if (at_terminal) fputs("> ", stdout);
        if (!flush_stdout()) { stop_reason = "the output was closed"; break; }
        const int got = read_turn(&line, &line_cap, &line_len, max_turn_bytes);
        if (got == TURN_END_OF_INPUT) { stop_reason = "end of input"; break; }
        if (got == TURN_INTERRUPTED) { stop_reason = "interrupted"; status = 130; break; }
        if (got == TURN_TOO_LONG) {
            fprintf(stderr, "phi2: a turn of more than %zu bytes cannot fit in the context: skipped\n", max_turn_bytes);
            continue;
        }
        if (line_len == 0) continue;  // an empty line: nothing to answer

        // The turn's text: before + line + after; in qa and chat a "\n" goes before it when
        // it does not begin the conversation (a token of its own: the GPT-2 pre-tokenizer
        // never joins a newline to the letter after it, so this tokenizes as the whole would).
        const size_t n_before = strlen(format->before), n_after = strlen(format->after);
        const size_t text_len = n_before + line_len + n_after;
        if (text_len > text_cap) {
            free(text);
            text_cap = text_len;
            text = xmalloc(text_cap);
        }
        memcpy(text, format->before, n_before);
        memcpy(text + n_before, line, line_len);
        memcpy(text + n_before + line_len, format->after, n_after);
        int *ids = NULL;
        size_t n_ids = 0;
        if (tokenizer_encode(&m->tokenizer, text, text_len, &ids, &n_ids) != 0) die("out of memory tokenizing a turn");
        const int n_sep = format->marker ? 1 : 0;  // "\n" is one token
        if ((size_t)n_prefix + (size_t)n_sep + n_ids >= (size_t)ctx) {  // not even one answer token would fit
            fprintf(stderr, "phi2: this turn is %zu tokens, too long for the context of %d%s: skipped\n", n_ids, ctx,
                    n_prefix ? " with the prefix" : "");
            free(ids);
            continue;
        }
        drop_oldest_turns(&conv, n_sep + (int)n_ids + answer_room, ctx);
        const int turn_start = conv.n_tokens;
        conv.turn_start[conv.n_turns++] = turn_start;
        if (n_sep && conv.n_tokens > 0) append_text(&conv, m, (const unsigned char *)"\n", 1);
        memcpy(conv.tokens + conv.n_tokens, ids, n_ids * sizeof(int));
        conv.n_tokens += (int)n_ids;
        free(ids);

        // Read what the KV cache lacks: the new turn, and before it whatever is not cached yet
        // (the last answer's last token, the turns kept after dropping some).
        turn_number++;
        const int from = conv.n_cached;
        if (opt->verbose) {
            fprintf(stderr, "phi2: turn %d: the cache holds %d, reading %d: ", turn_number, from,
                    conv.n_tokens - from);
            print_ids(stderr, conv.tokens + from, conv.n_tokens - from);
        }
        conv.n_cached = from + generator_prefill(&g, conv.tokens + from, conv.n_tokens - from, from);
        if (conv.n_cached < conv.n_tokens) {  // Ctrl-C while reading it: forget the turn
            conv.n_tokens = turn_start;
            conv.n_turns--;
            if (conv.n_cached > conv.n_tokens) conv.n_cached = conv.n_tokens;
            fputs("\n", stdout);
            g_interrupted = 0;  // back to the prompt
            continue;
        }

        // The answer, streamed.
        TextOut out = {.stops = stops, .n_stops = n_stops, .print = !opt->print_ids, .ids = opt->print_ids};
        const int answer_start = conv.n_tokens, decoded_before = g.n_decoded;
        const char *why = generate_tokens(&g, conv.tokens, &conv.n_tokens, ctx, n_limit, &out, &reader_alive);
        conv.n_cached = answer_start + (g.n_decoded - decoded_before);
        if (!strcmp(why, "interrupted")) g_interrupted = 0;  // Ctrl-C ended the answer: back to the prompt
        if (!reader_alive) {
            free(out.held);
            stop_reason = "the output was closed";
            break;
        }
        text_out_finish(&out);  // ends the answer (text or ids, streamed as they came) with a newline
        reader_alive = flush_stdout();
        if (opt->verbose)
            fprintf(stderr, "phi2: turn %d: answered %d tokens, stopped: %s\n", turn_number,
                    conv.n_tokens - answer_start, why);
        if (!strcmp(why, "found a stop string")) {
            // The conversation keeps the answer up to where the stop string began: the whole
            // tokens before it, then the start of the token it began in, as tokens of its own.
            size_t kept_bytes = 0, len = 0;
            int end = answer_start;
            while (end < conv.n_tokens) {
                tokenizer_token_bytes(&m->tokenizer, conv.tokens[end], &len);
                if (kept_bytes + len > out.n_passed) break;
                kept_bytes += len;
                end++;
            }
            const unsigned char *cut_token = tokenizer_token_bytes(&m->tokenizer, conv.tokens[end], &len);
            conv.n_tokens = end;
            if (conv.n_cached > end) conv.n_cached = end;
            append_text(&conv, m, cut_token, out.n_passed - kept_bytes);
        }
    }

    catch_interrupts(SIG_DFL);
    print_timings(&g, stop_reason, t_load);
    free(line);
    free(text);
    free(conv.tokens);
    free(conv.turn_start);
    generator_free(&g);
    return status;
}

int main(int argc, char **argv) {
    use_sleeping_thread_wait(argv);  // before OpenMP starts any thread
    setup_process(&argc, &argv);  // e.g. SIGPIPE ignored: a closed stdout becomes EPIPE, handled in flush_stdout
    const double t_start = now_seconds();
    Options opt = parse_args(argc, argv);
    opt.t_start = t_start;
    if (opt.help) {
        usage(stdout);
        flush_stdout();
        return 0;
    }
    if (opt.version) {  // which kernels this build has, and which int8 one it uses here
        char kernels[96];
        kernel_description(kernels, sizeof(kernels), NULL, WEIGHTS_Q8);
#ifdef PHI2_TEST_HOOKS
        const char *test_build = ", test build";  // tests/test_threads.py looks for it
#else
        const char *test_build = "";
#endif
        printf("phi2 (model format %d%s): %s\n", MODEL_VERSION, test_build, kernels);
        flush_stdout();
        return 0;
    }
    int status = 0;
    // Threads: -t, else OMP_NUM_THREADS, else one per fast core. Decode is bound by memory
    // bandwidth, which a few cores saturate: a second thread on a core's SMT sibling or an
    // efficiency core adds little bandwidth and makes a slow thread for the others to wait on.
    // The pool (Appendix G) runs generated tokens on them; OpenMP runs prompt batches, on one
    // thread in a build without it.
    if (opt.n_threads > 0) {
        opt.threads_why = "-t";
#ifdef _OPENMP
    } else if (getenv("OMP_NUM_THREADS")) {
        opt.n_threads = omp_get_max_threads();
        opt.threads_why = "OMP_NUM_THREADS";
#endif
    } else {
        opt.n_threads = count_fast_cores(&opt.threads_why);
    }
#ifdef _OPENMP
    omp_set_num_threads(opt.n_threads);
#endif

    double t_load = now_seconds();
    Model model;
    const int long_run = opt.interactive || opt.perplexity || opt.n_predict < 0 || opt.n_predict >= COPY_MIN_TOKENS;
    load_model(&model, opt.model_path, opt.use_mmap, long_run, opt.verify);
    const Config *c = &model.config;

    if (opt.perplexity) {
        int ctx = opt.ctx ? opt.ctx : c->max_seq_len;
        if (ctx > c->max_seq_len) die("--ctx-size %d exceeds the model's maximum of %d", ctx, c->max_seq_len);
        perplexity(&model, &opt, ctx);
        free_model(&model);
        flush_stdout();
        return 0;
    }
    int n_prompt = 0;
    unsigned char *text = NULL;
    size_t text_len = 0;
    int *prompt = read_prompt(&opt, &model, &n_prompt, &text, &text_len);
    if (opt.interactive) {  // the prompt, if any, is the prefix of the conversation
        int ctx = opt.ctx ? opt.ctx : c->max_seq_len;
        if (ctx > c->max_seq_len) die("--ctx-size %d exceeds the model's maximum of %d", ctx, c->max_seq_len);
        if (n_prompt >= ctx) die("the prefix is %d tokens, leaving no room in the context of %d tokens", n_prompt, ctx);
        RunState state;
        init_state(&state, c, ctx, opt.batch, opt.kv_type >= 0 ? opt.kv_type : default_kv_type(c), 0, opt.n_threads);
        t_load = now_seconds() - t_load;
        status = interactive(&model, &state, &opt, prompt, n_prompt, ctx, t_load);
        free_state(&state);
    } else if (opt.tokenize) {
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
        long long needed = opt.dump_logits || opt.trace ? n_prompt : (opt.n_predict < 0 ? ctx : n_prompt + opt.n_predict);
        int cache_len = needed < ctx ? (int)needed : ctx;
        RunState state;
        init_state(&state, c, cache_len, opt.batch, opt.kv_type >= 0 ? opt.kv_type : default_kv_type(c),
                   opt.dump_logits || opt.trace, opt.n_threads);
        t_load = now_seconds() - t_load;

        if (opt.dump_logits) dump_prompt(&model, &state, &opt, prompt, n_prompt, opt.dump_logits, 0, ctx);
        else if (opt.trace) dump_prompt(&model, &state, &opt, prompt, n_prompt, opt.trace, 1, ctx);
        else status = generate(&model, &state, &opt, prompt, n_prompt, text, text_len, ctx, t_load);
        free_state(&state);
    }
    free(prompt);
    free(text);
    free_model(&model);
    flush_stdout();
    return status;
}

#endif /* PHI2_NO_MAIN */

/* ------------------------------------------------------------------------------------- */
/* Appendix A. What this build has, and how threads share a kernel's work                 */
/* ------------------------------------------------------------------------------------- */
/* Everything from here on is a faster way to compute a definition of sections 3 and 4;
 * nothing here changes what the model computes. Which kernels exist is decided at compile
 * time from the target (make: -march=native):
 *   PHI2_AVX512  AVX-512 F/BW/VL with VNNI (Cascade Lake, Ice Lake, Zen 4 and later): every
 *                kernel in 512-bit vectors, int8 products with vpdpbusd. A CPU with AVX-512
 *                but no VNNI (Skylake-SP/X) builds as AVX2.
 *   PHI2_AVX2    AVX2 + FMA + F16C (laptops): every kernel in 256-bit vectors, int8 products
 *                with maddubs, or with 256-bit VNNI where the target has AVX-VNNI
 *   PHI2_AMX     AMX-INT8 (Sapphire Rapids and later, Linux): int8 matmul for batches, used
 *                only if the OS grants the tile state at run time (amx_available)
 *   PHI2_NEON    Arm NEON (every aarch64 CPU): f32 matmul, quantization, the f16 KV cache;
 *                int8 matmul, with SDOT (PHI2_NEON_DOTPROD) and SMMLA (PHI2_NEON_I8MM) where
 *                the target has them (Appendix C)
 * -DPHI2_SCALAR_ONLY (make portable) leaves only the definitions. */
#if !defined(PHI2_SCALAR_ONLY) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512VNNI__)
#define PHI2_AVX512 1
#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__linux__)
#define PHI2_AMX 1
#endif
#endif
#if !defined(PHI2_SCALAR_ONLY) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define PHI2_AVX2 1
#endif
#if PHI2_AVX512 || PHI2_AVX2
#define PHI2_PANELS 1  // prompt batches through row panels (matmul_int8_panels)
#endif
#if !defined(PHI2_SCALAR_ONLY) && defined(__aarch64__) && defined(__ARM_NEON)
#define PHI2_NEON 1
#include <arm_neon.h>
#if defined(__ARM_FEATURE_DOTPROD)
#define PHI2_NEON_DOTPROD 1
#if defined(__ARM_FEATURE_MATMUL_INT8)
#define PHI2_NEON_I8MM 1  // (its kernel uses SDOT for decode, hence inside dotprod)
#endif
#elif defined(__ARM_FEATURE_MATMUL_INT8)
#warning "i8mm without dotprod (clang 14 does not imply it from -march=armv8.6-a: add +dotprod): plain NEON int8"
#endif
#endif

/* --- Work sharing ----------------------------------------------------------------------
 * The rows of a matrix product go in chunks of contiguous rows, which threads claim one at
 * a time as they finish the last (dynamic scheduling). An equal static split makes every
 * thread wait for the slowest: on a laptop that is an efficiency core, or a core another
 * program is using. With chunks, a slow thread simply ends up taking fewer. A row's result
 * does not depend on which thread computes it (chunks start at multiples of every kernel's
 * tile height), so the output is the same for any thread count (tests/test_determinism.py).
 * A prompt's batch shares its chunks among OpenMP's threads (claim_chunk); a generated
 * token's among the pool's (pool_run, Appendix G), which wakes in microseconds. */
enum {
    CHUNKS_PER_THREAD = 8,        // more: a thread that falls behind leaves less to wait on
    CHUNK_MIN_BYTES = 64 << 10,   // fewer: each chunk a long stream the prefetcher can follow
};

/* Tiles (of bytes_per_tile weights each) per chunk, for n_threads threads. */
static int tiles_per_chunk(int n_tiles, size_t bytes_per_tile, int n_threads) {
    int tiles = n_tiles / (n_threads * CHUNKS_PER_THREAD);
    const size_t min_tiles = (CHUNK_MIN_BYTES + bytes_per_tile - 1) / (bytes_per_tile ? bytes_per_tile : 1);
    if ((size_t)tiles < min_tiles) tiles = min_tiles < (size_t)n_tiles ? (int)min_tiles : n_tiles;
    return tiles > 0 ? tiles : 1;
}

/* The next unclaimed chunk (numbers past the last mean: none left). Each call takes one. */
MAYBE_UNUSED static int claim_chunk(int *next_chunk) {
    int chunk;
#pragma omp atomic capture
    chunk = (*next_chunk)++;
    return chunk;
}

/* Bytes of one row of W's weights (not counting the scales). */
static size_t matrix_row_bytes(const Matrix *W) {
    const size_t cols = (size_t)W->cols;
    return W->type == WEIGHTS_F32 ? cols * sizeof(float) : W->type == WEIGHTS_Q8 ? cols : cols / 2;
}

/* The rows r0 .. r1 of W, as a matrix of their own. */
static Matrix matrix_rows(const Matrix *W, int r0, int r1) {
    Matrix v = *W;
    v.rows = r1 - r0;
    const size_t r = (size_t)r0, cols = (size_t)W->cols;
    if (W->w) v.w = W->w + r * cols;
    if (W->q) v.q = W->q + r * cols, v.scale = W->scale + r * (cols / Q8_GROUP);
    if (W->codes) v.codes = W->codes + r * (cols / 2), v.scale16 = W->scale16 + r * (cols / Q4_GROUP);
    return v;
}

/* One product of a batch by a register-tiled kernel (Appendices B and C): the arguments of
 * its loop nest, which computes rows r0 .. r1 of it (a TiledRows function). */
typedef struct TiledProduct TiledProduct;
typedef void (*TiledRows)(const TiledProduct *p, int r0, int r1);
struct TiledProduct {
    float *out;                   // [n_tokens, W->rows]
    const float *in;              // [n_tokens, W->cols] f32 activations (f32 kernels)
    const QuantizedRows *xq;      // the same quantized (int8 kernels)
    const Matrix *W;
    const float *bias;
    int n_tokens;
    const void *tile;             // the tile kernel (int8: an Int8Tile; f32: its one tile, NULL)
    int RT, TT;                   // its full tile: RT rows x TT tokens
};

/* All the rows of a product: one token's at once (its threads split the rows already:
 * pool_run), a batch's in chunks of whole tiles that OpenMP's threads claim as they go. */
MAYBE_UNUSED static void tiled_product(const TiledProduct *p, TiledRows rows_of) {
    const int n_rows = p->W->rows, RT = p->RT;
    if (p->n_tokens == 1) {
        rows_of(p, 0, n_rows);
        return;
    }
    const int n_tiles = (n_rows + RT - 1) / RT;
    const int chunk_rows = RT * tiles_per_chunk(n_tiles, RT * matrix_row_bytes(p->W), max_threads());
    const int n_chunks = (n_rows + chunk_rows - 1) / chunk_rows;
    int next_chunk = 0;
#pragma omp parallel
    for (int chunk; (chunk = claim_chunk(&next_chunk)) < n_chunks;) {
        const int r0 = chunk * chunk_rows;
        rows_of(p, r0, n_rows - r0 < chunk_rows ? n_rows : r0 + chunk_rows);
    }
}

/* --- Register tiles ---------------------------------------------------------------------
 * A kernel's register tile (R weight rows x T tokens of accumulators) stays in registers
 * only if the compiler knows R and T, so each tile kernel is an ALWAYS_INLINE function of
 * them, and its loop nest reaches it through one switch over the shapes it asks for:
 * TILE_SWITCH(name, R, T, cases), with the cases listed by TOKENS_UP_TO_n(rows), each of
 * which expands TILE(rows, t), a call the caller defines, for t = 1 .. n. */
MAYBE_UNUSED static void bad_tile(const char *kernel, int R, int T) {
    die("internal error: %s has no tile of %d rows x %d tokens", kernel, R, T);
}
#define TILE_CASE(r, t) case (r) * 64 + (t): TILE(r, t); return;
#define TOKENS_UP_TO_2(r) TILE_CASE(r, 1) TILE_CASE(r, 2)
#define TOKENS_UP_TO_4(r) TOKENS_UP_TO_2(r) TILE_CASE(r, 3) TILE_CASE(r, 4)
#define TOKENS_UP_TO_6(r) TOKENS_UP_TO_4(r) TILE_CASE(r, 5) TILE_CASE(r, 6)
#define TOKENS_UP_TO_12(r) TOKENS_UP_TO_6(r) TILE_CASE(r, 7) TILE_CASE(r, 8) TILE_CASE(r, 9) TILE_CASE(r, 10) \
    TILE_CASE(r, 11) TILE_CASE(r, 12)
#define TOKENS_UP_TO_24(r) TOKENS_UP_TO_12(r) TILE_CASE(r, 13) TILE_CASE(r, 14) TILE_CASE(r, 15) TILE_CASE(r, 16) \
    TILE_CASE(r, 17) TILE_CASE(r, 18) TILE_CASE(r, 19) TILE_CASE(r, 20) TILE_CASE(r, 21) TILE_CASE(r, 22)         \
    TILE_CASE(r, 23) TILE_CASE(r, 24)
#define TILE_SWITCH(name, R, T, cases) \
    do {                               \
        switch ((R) * 64 + (T)) {      \
            cases                      \
        }                              \
        bad_tile(name, R, T);          \
    } while (0)

/* The pool of a generated token's threads (Appendix G). pool_run splits a step into
 * n_chunks chunks that the threads claim as they go; chunk c writes out[c * chunk_len ..],
 * at most out_len values in all: run(args, chunk, buffer, thread) computes one chunk into
 * buffer, and may use scratch row `thread` (0 .. threads - 1). When pool_run returns, no
 * thread is still at work: the caller may overwrite what args points to at once. */
typedef struct ThreadPool ThreadPool;
typedef void (*ChunkFunction)(const void *args, int chunk, float *buffer, int thread);
static ThreadPool *pool_create(int n_threads, size_t max_chunk_len);  // n_threads - 1 new threads
static void pool_destroy(ThreadPool *pool);
static void pool_run(ThreadPool *pool, ChunkFunction run, const void *args, int n_chunks,
                     int chunk_len, float *out, size_t out_len);
static int pool_threads(const ThreadPool *pool);  // 1 for NULL

/* The kernels' scratch, owned by RunState (kernel_scratch_create, Appendix E). */
struct KernelScratch {
    QuantizedRows xq;          // [max_batch, max(hidden, ffn)] the activations quantized (q8 and q4 files)
    unsigned char *amx_pack;   // AMX only: a batch repacked into tiles, grown as needed
    size_t amx_pack_size;
    unsigned char *panel;      // x86 prompt batches: activations and one row panel per thread, grown as needed
    size_t panel_size;
    int amx_state;             // AMX only: 0 = not asked yet, 1 = granted by the OS, -1 = refused
    ThreadPool *pool;          // one token's threads (pool_run); NULL: the calling thread alone
};

/* A scratch buffer of at least need bytes (64-byte aligned): grown as needed, kept for the
 * next product. */
MAYBE_UNUSED static unsigned char *scratch_at_least(unsigned char **buffer, size_t *size, size_t need) {
    if (need > *size) {
        free_aligned(*buffer);
        *buffer = xmalloc_aligned(need);
        *size = need;
    }
    return *buffer;
}

/* ------------------------------------------------------------------------------------- */
/* Appendix B. Vector kernels: float32 and f16 (AVX-512, AVX2, NEON); x86 int8            */
/* ------------------------------------------------------------------------------------- */
/* Each kernel here computes a section 3 definition for the instruction sets of Appendix A;
 * tests/test_kernels.c checks it against that definition. The float32 and f16 kernels are
 * written once over this build's float vector (VecF: AVX-512, AVX2 or NEON, and a few
 * operations on it); so are the x86 int8 kernels, over the same vectors as int8 (Int8Vec),
 * with the few operations where the families differ (VNNI's vpdpbusd against AVX2's
 * vpmaddubsw, the q4 decode) given per family. AMX tiles are a kernel of their own. */

/* Fast f32 kernels. The product is a set of dot products along the columns, where both a
 * weight row and an activation row are contiguous. Register tile: R weight rows x T tokens
 * of vector accumulators; each step loads R weight vectors and T activation vectors for
 * R*T FMAs, so a weight vector, once loaded, serves T tokens (the prompt is compute-bound
 * only if weights are reused from registers, not re-read). Lanes are summed once per tile.
 * Cache blocking: columns go in blocks of at most F32_COL_BLOCK so the batch's activation slab
 * (n_tokens x KC floats, <= 512 KB) stays in L2 while a thread walks its rows, and a tile's
 * R weight rows (R x KC floats) stay in L1 while every token block reuses them. With one or
 * two tokens (decode) there is no column blocking: a plain streaming matvec over R rows.
 * Threads: they claim chunks of contiguous row tiles (each streams its part of W). */
enum { F32_COL_BLOCK = 2048 };

/* Columns per block: at most F32_COL_BLOCK, equal blocks, a multiple of 16 (but no blocking for
 * decode, where nothing is reused and one pass over each row streams best). */
MAYBE_UNUSED static int f32_col_block(int cols, int n_tokens) {
    if (n_tokens <= 2) return cols;
    int n_blocks = (cols + F32_COL_BLOCK - 1) / F32_COL_BLOCK;
    return ((cols + n_blocks - 1) / n_blocks + 15) / 16 * 16;
}

/* Store one finished dot product: first column block writes, later ones add; the last one
 * adds the bias (bias != NULL), so one block gives sum + bias, as in the scalar kernel. */
MAYBE_UNUSED static ALWAYS_INLINE void f32_store(float *o, float s, int first, const float *bias) {
    float v = first ? s : *o + s;
    *o = bias ? v + *bias : v;
}

/* This build's vectors and what the kernels do with them: VecF of floats, the widest the
 * build has, and on x86 Int8Vec, the same bits as int32 lanes of 4 int8 each (the int8
 * kernels, below). x86's two widths name most operations alike but for the prefix:
 * VEC(add_ps) is _mm512_add_ps or _mm256_add_ps, and those operations are written once,
 * after the two. The f32 tile: F32_TILE_ROWS x F32_TILE_TOKENS accumulators, as many as the
 * registers hold beside the tile's weight vectors and one activation vector. */
#if PHI2_AVX512
typedef __m512 VecF;
typedef __m512i Int8Vec;
#define VEC(op) _mm512_##op
enum { VEC_FLOATS = 16, F32_TILE_ROWS = 4, F32_TILE_TOKENS = 6 };  // 24 + 4 + 1 of 32 zmm
#define F32_TILE_SHAPES TOKENS_UP_TO_6(F32_TILE_ROWS) TOKENS_UP_TO_6(1)
static ALWAYS_INLINE float vecf_sum(VecF v) { return _mm512_reduce_add_ps(v); }
static ALWAYS_INLINE VecF vecf_max_abs(VecF m, VecF v) { return _mm512_max_ps(m, _mm512_abs_ps(v)); }
static ALWAYS_INLINE float vecf_max_lanes(VecF v) { return _mm512_reduce_max_ps(v); }
static ALWAYS_INLINE void vecf_store_int8(int8_t *q, VecF v) {  // rounded to nearest even, saturated
    _mm_storeu_si128((__m128i *)q, _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(v)));
}
static ALWAYS_INLINE __mmask16 first_lanes(int n) { return (__mmask16)(n >= 16 ? 0xFFFFu : (1u << n) - 1); }
/* The first n lanes (all for n >= 16), touching no memory past them; a masked load costs
 * more than a plain one. */
static ALWAYS_INLINE VecF vecf_load_first(const float *p, int n) {
    return n >= 16 ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(first_lanes(n), p);
}
static ALWAYS_INLINE void vecf_store_first(float *p, VecF v, int n) { _mm512_mask_storeu_ps(p, first_lanes(n), v); }
static ALWAYS_INLINE VecF vecf_load_f16_first(const uint16_t *p, int n) {
    return _mm512_cvtph_ps(n >= 16 ? _mm256_loadu_si256((const __m256i *)p) : _mm256_maskz_loadu_epi16(first_lanes(n), p));
}
static ALWAYS_INLINE void vecf_store_f16(uint16_t *p, VecF v) {
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}
/* The 128-bit lanes of a transpose (below): lane j of v[c] is lane c / 4 of u[4j + c % 4]. */
static ALWAYS_INLINE void gather_128bit_lanes(Int8Vec v[16], const Int8Vec u[16]) {
    for (int b = 0; b < 4; b++) {
        const __m512i a0 = _mm512_shuffle_i32x4(u[b], u[4 + b], 0x44), a1 = _mm512_shuffle_i32x4(u[b], u[4 + b], 0xEE);
        const __m512i a2 = _mm512_shuffle_i32x4(u[8 + b], u[12 + b], 0x44), a3 = _mm512_shuffle_i32x4(u[8 + b], u[12 + b], 0xEE);
        v[b] = _mm512_shuffle_i32x4(a0, a2, 0x88);
        v[4 + b] = _mm512_shuffle_i32x4(a0, a2, 0xDD);
        v[8 + b] = _mm512_shuffle_i32x4(a1, a3, 0x88);
        v[12 + b] = _mm512_shuffle_i32x4(a1, a3, 0xDD);
    }
}
#elif PHI2_AVX2
typedef __m256 VecF;
typedef __m256i Int8Vec;
#define VEC(op) _mm256_##op
enum { VEC_FLOATS = 8, F32_TILE_ROWS = 4, F32_TILE_TOKENS = 2 };  // 8 + 4 + 1 of 16 ymm
#define F32_TILE_SHAPES TOKENS_UP_TO_2(F32_TILE_ROWS) TOKENS_UP_TO_2(1)
static ALWAYS_INLINE float vecf_sum(VecF v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
static ALWAYS_INLINE VecF vecf_max_abs(VecF m, VecF v) {
    return _mm256_max_ps(m, _mm256_and_ps(v, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff))));
}
static ALWAYS_INLINE float vecf_max_lanes(VecF v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}
static ALWAYS_INLINE void vecf_store_int8(int8_t *q, VecF v) {  // rounded to nearest even, saturated
    const __m256i q32 = _mm256_cvtps_epi32(v);
    const __m128i q16 = _mm_packs_epi32(_mm256_castsi256_si128(q32), _mm256_extracti128_si256(q32, 1));
    _mm_storel_epi64((__m128i *)q, _mm_packs_epi16(q16, q16));
}
static ALWAYS_INLINE __m256i first_lanes(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
static ALWAYS_INLINE VecF vecf_load_first(const float *p, int n) {
    return n >= 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, first_lanes(n));
}
static ALWAYS_INLINE void vecf_store_first(float *p, VecF v, int n) {
    if (n >= 8) _mm256_storeu_ps(p, v);
    else _mm256_maskstore_ps(p, first_lanes(n), v);
}
static ALWAYS_INLINE VecF vecf_load_f16_first(const uint16_t *p, int n) {  // F16C has no masked load
    uint16_t tail[8] = {0};
    if (n < 8) memcpy(tail, p, (size_t)n * sizeof(uint16_t));
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(n < 8 ? tail : p)));
}
static ALWAYS_INLINE void vecf_store_f16(uint16_t *p, VecF v) {
    _mm_storeu_si128((__m128i *)p, _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}
static ALWAYS_INLINE void gather_128bit_lanes(Int8Vec v[8], const Int8Vec u[8]) {
    for (int b = 0; b < 4; b++) {  // lane 0 of u[b] and u[4 + b]: element b; lane 1: element 4 + b
        v[b] = _mm256_permute2x128_si256(u[b], u[4 + b], 0x20);
        v[4 + b] = _mm256_permute2x128_si256(u[b], u[4 + b], 0x31);
    }
}
#elif PHI2_NEON
typedef float32x4_t VecF;
enum { VEC_FLOATS = 4, F32_TILE_ROWS = 4, F32_TILE_TOKENS = 4 };  // 16 + 4 + 1 of 32 q registers
#define F32_TILE_SHAPES TOKENS_UP_TO_4(F32_TILE_ROWS) TOKENS_UP_TO_4(1)
static ALWAYS_INLINE VecF vecf_zero(void) { return vdupq_n_f32(0.0f); }
static ALWAYS_INLINE VecF vecf_set(float f) { return vdupq_n_f32(f); }
static ALWAYS_INLINE VecF vecf_load(const float *p) { return vld1q_f32(p); }
static ALWAYS_INLINE void vecf_store(float *p, VecF v) { vst1q_f32(p, v); }
static ALWAYS_INLINE VecF vecf_fma(VecF a, VecF b, VecF acc) { return vfmaq_f32(acc, a, b); }
static ALWAYS_INLINE VecF vecf_mul(VecF a, VecF b) { return vmulq_f32(a, b); }
static ALWAYS_INLINE float vecf_sum(VecF v) { return vaddvq_f32(v); }
static ALWAYS_INLINE VecF vecf_sums(const VecF v[4]) {  // lane j: the sum of v[j]'s lanes
    return vpaddq_f32(vpaddq_f32(v[0], v[1]), vpaddq_f32(v[2], v[3]));
}
static ALWAYS_INLINE VecF vecf_max_abs(VecF m, VecF v) { return vmaxq_f32(m, vabsq_f32(v)); }
static ALWAYS_INLINE float vecf_max_lanes(VecF v) { return vmaxvq_f32(v); }
static ALWAYS_INLINE void vecf_store_int8(int8_t *q, VecF v) {  // rounded to nearest even, saturated
    const int16x4_t q16 = vqmovn_s32(vcvtnq_s32_f32(v));
    const int8x8_t q8 = vqmovn_s16(vcombine_s16(q16, q16));
    vst1_lane_s32((int32_t *)(void *)q, vreinterpret_s32_s8(q8), 0);
}
static ALWAYS_INLINE VecF vecf_load_f16(const uint16_t *p) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p))); }
static ALWAYS_INLINE void vecf_store_f16(uint16_t *p, VecF v) { vst1_u16(p, vreinterpret_u16_f16(vcvt_f16_f32(v))); }
#endif
#if PHI2_AVX512 || PHI2_AVX2
static ALWAYS_INLINE VecF vecf_zero(void) { return VEC(setzero_ps)(); }
static ALWAYS_INLINE VecF vecf_set(float f) { return VEC(set1_ps)(f); }
static ALWAYS_INLINE VecF vecf_load(const float *p) { return VEC(loadu_ps)(p); }
static ALWAYS_INLINE void vecf_store(float *p, VecF v) { VEC(storeu_ps)(p, v); }
static ALWAYS_INLINE VecF vecf_load_aligned(const float *p) { return VEC(load_ps)(p); }
static ALWAYS_INLINE void vecf_store_aligned(float *p, VecF v) { VEC(store_ps)(p, v); }
static ALWAYS_INLINE VecF vecf_load_f16(const uint16_t *p) { return vecf_load_f16_first(p, VEC_FLOATS); }
static ALWAYS_INLINE VecF vecf_fma(VecF a, VecF b, VecF acc) { return VEC(fmadd_ps)(a, b, acc); }
static ALWAYS_INLINE VecF vecf_fnma(VecF a, VecF b, VecF acc) { return VEC(fnmadd_ps)(a, b, acc); }  // acc - a b
static ALWAYS_INLINE VecF vecf_mul(VecF a, VecF b) { return VEC(mul_ps)(a, b); }
static ALWAYS_INLINE VecF vecf_add(VecF a, VecF b) { return VEC(add_ps)(a, b); }
static ALWAYS_INLINE VecF vecf_from_int32(Int8Vec v) { return VEC(cvtepi32_ps)(v); }
static ALWAYS_INLINE Int8Vec iv_zero(void) { return VEC(set1_epi32)(0); }
static ALWAYS_INLINE Int8Vec iv_set4(int32_t four) { return VEC(set1_epi32)(four); }
static ALWAYS_INLINE Int8Vec iv_load(const void *p) { return *(const Int8Vec *)p; }  // aligned
static ALWAYS_INLINE void iv_store(void *p, Int8Vec v) { *(Int8Vec *)p = v; }       // aligned
static ALWAYS_INLINE Int8Vec iv_loadu(const void *p) {
    Int8Vec v;
    memcpy(&v, p, sizeof(v));
    return v;
}
static ALWAYS_INLINE Int8Vec iv_xor(Int8Vec a, Int8Vec b) { return a ^ b; }
static ALWAYS_INLINE Int8Vec iv_sub(Int8Vec a, Int8Vec b) { return VEC(sub_epi32)(a, b); }
static ALWAYS_INLINE Int8Vec iv_times(Int8Vec v, int32_t k) { return VEC(mullo_epi32)(v, VEC(set1_epi32)(k)); }
static ALWAYS_INLINE Int8Vec iv_abs8(Int8Vec w) { return VEC(abs_epi8)(w); }

/* v[i] holds VEC_FLOATS int32 of row i; afterwards v[c] holds element c of every row (lane
 * i: row i). Unpacks transpose each 128-bit lane's 4 x 4 blocks, then whole lanes move. */
static ALWAYS_INLINE void iv_transpose(Int8Vec v[VEC_FLOATS]) {
    Int8Vec t[VEC_FLOATS], u[VEC_FLOATS];
    for (int i = 0; i < VEC_FLOATS; i += 2) {  // in each 128-bit lane j: rows i, i+1 of elements 4j .. 4j+3
        t[i] = VEC(unpacklo_epi32)(v[i], v[i + 1]);
        t[i + 1] = VEC(unpackhi_epi32)(v[i], v[i + 1]);
    }
    for (int q = 0; q < VEC_FLOATS; q += 4) {  // u[q + b], lane j: rows q .. q+3 of element 4j + b
        u[q] = VEC(unpacklo_epi64)(t[q], t[q + 2]);
        u[q + 1] = VEC(unpackhi_epi64)(t[q], t[q + 2]);
        u[q + 2] = VEC(unpacklo_epi64)(t[q + 1], t[q + 3]);
        u[q + 3] = VEC(unpackhi_epi64)(t[q + 1], t[q + 3]);
    }
    gather_128bit_lanes(v, u);
}
static ALWAYS_INLINE void vecf_transpose(VecF v[VEC_FLOATS]) {
    Int8Vec u[VEC_FLOATS];
    for (int i = 0; i < VEC_FLOATS; i++) u[i] = (Int8Vec)v[i];
    iv_transpose(u);
    for (int i = 0; i < VEC_FLOATS; i++) v[i] = (VecF)u[i];
}
#endif

#if PHI2_AVX512 || PHI2_AVX2 || PHI2_NEON
static ALWAYS_INLINE void f32_tile(float *out, int out_stride, const float *w, const float *x, int cols, int kc, int R,
                                   int T, int first, const float *bias) {
    VecF acc[F32_TILE_ROWS][F32_TILE_TOKENS];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) acc[r][t] = vecf_zero();
    int c = 0;
    for (; c + VEC_FLOATS <= kc; c += VEC_FLOATS) {
        VecF wv[F32_TILE_ROWS];
        for (int r = 0; r < R; r++) wv[r] = vecf_load(w + (size_t)r * cols + c);
        for (int t = 0; t < T; t++) {
            const VecF xv = vecf_load(x + (size_t)t * cols + c);
            for (int r = 0; r < R; r++) acc[r][t] = vecf_fma(wv[r], xv, acc[r][t]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) {
            float s = vecf_sum(acc[r][t]);
            for (int cc = c; cc < kc; cc++) s += w[(size_t)r * cols + cc] * x[(size_t)t * cols + cc];  // tail
            f32_store(out + (size_t)t * out_stride + r, s, first, bias ? bias + r : NULL);
        }
}

static void f32_tile_any(float *out, int out_stride, const float *w, const float *x, int cols, int kc, int R, int T,
                         int first, const float *bias) {
#define TILE(r, t) f32_tile(out, out_stride, w, x, cols, kc, r, t, first, bias)
    TILE_SWITCH("f32_tile", R, T, F32_TILE_SHAPES);
#undef TILE
}

/* Rows r0 .. r1 of the product, blocked into tiles of F32_TILE_ROWS x F32_TILE_TOKENS. */
static void f32_blocked_rows(const TiledProduct *p, int r0, int r1) {
    float *out = p->out;
    const float *in = p->in, *bias = p->bias;
    const Matrix *W = p->W;
    const int n_tokens = p->n_tokens, RT = F32_TILE_ROWS, TT = F32_TILE_TOKENS;
    const int rows = W->rows, cols = W->cols, kc = f32_col_block(cols, n_tokens);
    for (int c0 = 0; c0 < cols; c0 += kc) {
        const int k = cols - c0 < kc ? cols - c0 : kc;
        const float *last_bias = c0 + k >= cols ? bias : NULL;
        for (int r = r0; r < r1;) {
            const int R = r1 - r >= RT ? RT : 1;  // the few leftover rows go one at a time
            for (int t = 0; t < n_tokens; t += TT) {
                const int T = n_tokens - t < TT ? n_tokens - t : TT;
                f32_tile_any(out + (size_t)t * rows + r, rows, W->w + (size_t)r * cols + c0, in + (size_t)t * cols + c0,
                             cols, k, R, T, c0 == 0, last_bias ? last_bias + r : NULL);
            }
            r += R;
        }
    }
}

/* Decode and batches too small for panels (below). */
MAYBE_UNUSED static void matmul_f32_tiles(float *out, const float *in, const Matrix *W, const float *bias, int n_tokens) {
    const TiledProduct p = {out, in, NULL, W, bias, n_tokens, NULL, F32_TILE_ROWS, F32_TILE_TOKENS};
    tiled_product(&p, f32_blocked_rows);
}
#endif

/* quantize_rows_q8_scalar over VecF: the same arithmetic in the same order (max of |x| is
 * order-free, then one scalar division, one multiply and a round-to-nearest-even
 * conversion per element), so the int8 values and scales are bit-identical to it. */
#if PHI2_AVX512 || PHI2_AVX2 || PHI2_NEON
_Static_assert(Q8_GROUP % VEC_FLOATS == 0, "a group is whole vectors");
MAYBE_UNUSED static void quantize_rows_q8_vec(QuantizedRows *out, const float *x, int n_tokens, int cols) {
    const int n_groups = cols / Q8_GROUP;
    for (int t = 0; t < n_tokens; t++)
        for (int g = 0; g < n_groups; g++) {
            const float *xg = x + (size_t)t * cols + (size_t)g * Q8_GROUP;
            int8_t *qg = out->q + (size_t)t * cols + (size_t)g * Q8_GROUP;
            VecF vmax = vecf_zero();
            for (int i = 0; i < Q8_GROUP; i += VEC_FLOATS) vmax = vecf_max_abs(vmax, vecf_load(xg + i));
            float inv_d;
            out->scale[(size_t)t * n_groups + g] = q8_group_scale(vecf_max_lanes(vmax), &inv_d);
            const VecF vinv = vecf_set(inv_d);
            for (int i = 0; i < Q8_GROUP; i += VEC_FLOATS) vecf_store_int8(qg + i, vecf_mul(vecf_load(xg + i), vinv));
        }
}
#endif

/* --- f32 prompt batches: the weights in row panels ---------------------------------------
 * The tiles above reload R weight vectors and T activation vectors for every R x T FMAs and
 * end with a horizontal sum per (row, token). A panel (as for int8 below: "Prompt batches:
 * the weights in row panels") turns the product around: a thread copies 16 rows (8 on AVX2)
 * of a column block transposed, so that panel vector k holds weight k of each of those rows
 * (lane i: row i), and a tile multiplies it by one token's activation k broadcast to every
 * lane, for T tokens at a time: per k one panel load, T broadcasts (AVX-512: folded into
 * the FMA, {1to16}) and T FMAs into T accumulators of 16 rows, and each token's 16 results
 * are one vector store. The activations are copied once per product into the same order,
 * per tile of T tokens [cols][T], so a tile's broadcasts read one contiguous stream (with
 * the tokens' own rows, T streams plus T base addresses for 16 general registers).
 * Columns go in blocks of F32_PANEL_COL_BLOCK (a panel block: 16 x 512 floats = 32 KB,
 * in L1 while every tile of the batch reuses it), and each weight is transposed once; while
 * the tiles run they prefetch the next panel block's rows (PanelPrefetch, below).
 * Panels win from F32_PANEL_MIN_TOKENS tokens on; decode keeps the tiles. */

#if PHI2_AVX512 || PHI2_AVX2
/* Building a panel reads its rows from memory, with nothing else to do meanwhile: while the
 * tiles of one panel run, they prefetch the next panel's rows into L2, a few cache lines per
 * group (line q of the next panel is row q / lines_per_row). (Also the f32 panels' next
 * block, a few lines every F32_PANEL_PREFETCH_STEPS columns.) */
typedef struct {
    const char *base;      // the next panel's first row (NULL: none; never past the matrix)
    size_t stride;         // bytes from one row to the next
    int lines_per_row;     // cache lines of one row
    int next, end;         // lines prefetched so far, and in all
    int per_group;         // lines per group of a tile
} PanelPrefetch;

static ALWAYS_INLINE void panel_prefetch(PanelPrefetch *pf) {
    for (int i = 0; i < pf->per_group && pf->next < pf->end; i++, pf->next++)
        _mm_prefetch(pf->base + (size_t)(pf->next / pf->lines_per_row) * pf->stride + (size_t)(pf->next % pf->lines_per_row) * 64,
                     _MM_HINT_T1);
}

enum {
    F32_PANEL_COL_BLOCK = 512,     // columns of a panel block: 16 rows of them (32 KB) stay in L1
    F32_PANEL_MIN_TOKENS = 8,      // below this many tokens the tiles (no transposing) are faster
    F32_PANEL_PREFETCH_STEPS = 8,  // the tiles prefetch some lines every this many columns
};

#endif

/* A panel is VEC_FLOATS rows; F32_PANEL_TOKENS accumulators fill the registers beside the
 * panel vector (and AVX2's broadcast). */
#if PHI2_AVX512
enum { F32_PANEL_TOKENS = 24 };  // + the panel vector of 32 zmm
#define F32_PANEL_SHAPES TOKENS_UP_TO_24(1)
#elif PHI2_AVX2
enum { F32_PANEL_TOKENS = 12 };  // + the panel vector + a broadcast of 16 ymm
#define F32_PANEL_SHAPES TOKENS_UP_TO_12(1)
#endif
/* Lane j: the sum of v[j]'s lanes (the f16 KV cache's scores; v is overwritten). AVX-512
 * transposes and adds; AVX2's hadd does it in fewer instructions. */
#if PHI2_AVX512
static ALWAYS_INLINE VecF vecf_sums(VecF v[16]) {
    vecf_transpose(v);
    for (int step = 1; step < 16; step *= 2)
        for (int i = 0; i + step < 16; i += 2 * step) v[i] = vecf_add(v[i], v[i + step]);
    return v[0];
}
#elif PHI2_AVX2
static ALWAYS_INLINE VecF vecf_sums(VecF v[8]) {
    // per 128-bit half: the sums of v[0 .. 3] and of v[4 .. 7], then the halves added
    const __m256 s0123 = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
    const __m256 s4567 = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
    return _mm256_add_ps(_mm256_blend_ps(s0123, s4567, 0xF0), _mm256_permute2f128_ps(s0123, s4567, 0x21));
}
#endif

#if PHI2_AVX512 || PHI2_AVX2
/* Panel block of n_rows <= VEC_FLOATS rows from w (row stride cols), kc columns: vector c at
 * panel + VEC_FLOATS c (rows past n_rows, and a last partial vector's missing columns, are
 * zeros). */
static void f32_panel_build(float *panel, const float *w, int cols, int kc, int n_rows) {
    VecF v[VEC_FLOATS];
    for (int c = 0; c < kc; c += VEC_FLOATS) {
        for (int i = 0; i < VEC_FLOATS; i++) v[i] = i < n_rows ? vecf_load_first(w + (size_t)i * cols + c, kc - c) : vecf_zero();
        vecf_transpose(v);
        for (int j = 0; j < VEC_FLOATS; j++) vecf_store_aligned(panel + (size_t)(c + j) * VEC_FLOATS, v[j]);
    }
}

/* out[t][0 .. n_rows - 1] (+)= panel x token t's kc activations (x: [kc][T]), + bias if given.
 * Without the unroll pragmas gcc 12 swaps the loops and keeps the accumulators in memory;
 * with the store loop rolled, it stores every accumulator at every step. */
static ALWAYS_INLINE void f32_panel_tile(float *out, int out_stride, const float *panel, const float *x, int kc, int T,
                                         int n_rows, int first, const float *bias, PanelPrefetch *pf) {
    VecF acc[F32_PANEL_TOKENS];
#pragma GCC unroll 24
    for (int t = 0; t < T; t++) acc[t] = vecf_zero();
    for (int c0 = 0; c0 < kc; c0 += F32_PANEL_PREFETCH_STEPS) {
        const int c1 = kc - c0 < F32_PANEL_PREFETCH_STEPS ? kc : c0 + F32_PANEL_PREFETCH_STEPS;
        for (int c = c0; c < c1; c++) {
            const VecF wv = vecf_load_aligned(panel + (size_t)c * VEC_FLOATS);
#pragma GCC unroll 24
            for (int t = 0; t < T; t++) acc[t] = vecf_fma(wv, vecf_set(x[(size_t)c * T + t]), acc[t]);
        }
        panel_prefetch(pf);
    }
    const VecF b = bias ? vecf_load_first(bias, n_rows) : vecf_zero();
#pragma GCC unroll 24
    for (int t = 0; t < T; t++) {
        VecF v = first ? acc[t] : vecf_add(vecf_load_first(out + (size_t)t * out_stride, n_rows), acc[t]);
        if (bias) v = vecf_add(v, b);
        vecf_store_first(out + (size_t)t * out_stride, v, n_rows);
    }
}

static void f32_panel_tile_any(float *out, int out_stride, const float *panel, const float *x, int kc, int T,
                               int n_rows, int first, const float *bias, PanelPrefetch *pf) {
#define TILE(r, t) f32_panel_tile(out, out_stride, panel, x, kc, t, n_rows, first, bias, pf)
    TILE_SWITCH("f32_panel_tile", 1, T, F32_PANEL_SHAPES);
#undef TILE
}

/* The whole product for a batch, panels of PR rows, tiles of up to PT tokens. Scratch
 * (KernelScratch.panel): the activations in tile order, then one panel block per thread. */
MAYBE_UNUSED static void matmul_f32_panels(float *out, const float *in, const Matrix *W, const float *bias,
                                           int n_tokens, KernelScratch *k) {
    const int PR = VEC_FLOATS, PT = F32_PANEL_TOKENS;
    const int rows = W->rows, cols = W->cols, n_threads = max_threads();
    const int n_blocks = (cols + F32_PANEL_COL_BLOCK - 1) / F32_PANEL_COL_BLOCK;
    const int kc = ((cols + n_blocks - 1) / n_blocks + 15) / 16 * 16, n_tiles = (n_tokens + PT - 1) / PT;
    const size_t x_bytes = (mul_size(mul_size((size_t)n_tokens, (size_t)cols), sizeof(float)) + 63) / 64 * 64;
    const size_t one_panel = (size_t)PR * kc * sizeof(float), need = x_bytes + mul_size((size_t)n_threads, one_panel);
    scratch_at_least(&k->panel, &k->panel_size, need);
    // Tile j: tokens j * PT onwards (full tiles, the last one shorter: clang 14 keeps a tile's
    // accumulators in registers only when it is full), at xt + t_j * cols as [cols][T_j].
    float *xt = (float *)k->panel;
    const int c_step = 256;
#pragma omp parallel for schedule(static)
    for (int c0 = 0; c0 < cols; c0 += c_step) {
        const int c1 = cols - c0 < c_step ? cols : c0 + c_step;
        for (int j = 0; j < n_tiles; j++) {
            const int t0 = j * PT, T = n_tokens - t0 < PT ? n_tokens - t0 : PT;
            float *dst = xt + (size_t)t0 * cols;
            for (int t = 0; t < T; t++)
                for (int c = c0; c < c1; c++) dst[(size_t)c * T + t] = in[(size_t)(t0 + t) * cols + c];
        }
    }
    const int n_panels = (rows + PR - 1) / PR, chunk_panels = tiles_per_chunk(n_panels, PR * matrix_row_bytes(W), max_threads());
    const int n_chunks = (n_panels + chunk_panels - 1) / chunk_panels;
    int next_chunk = 0;
#pragma omp parallel
    {
        const int thread = team_thread();
        float *panel = (float *)(k->panel + x_bytes + (size_t)thread * one_panel);
        for (int chunk; (chunk = claim_chunk(&next_chunk)) < n_chunks;) {
            const int p0 = chunk * chunk_panels, p1 = p0 + chunk_panels < n_panels ? p0 + chunk_panels : n_panels;
            for (int c0 = 0; c0 < cols; c0 += kc) {
                const int kk = cols - c0 < kc ? cols - c0 : kc;
                const float *last_bias = c0 + kk >= cols ? bias : NULL;
                for (int pi = p0; pi < p1; pi++) {
                    const int r0 = pi * PR, n_rows = rows - r0 < PR ? rows - r0 : PR;
                    f32_panel_build(panel, W->w + (size_t)r0 * cols + c0, cols, kk, n_rows);
                    // the next panel block this thread builds: the next panel's, else the chunk's first at the next block
                    const int next_r0 = pi + 1 < p1 ? r0 + PR : p0 * PR, next_c0 = pi + 1 < p1 ? c0 : c0 + kc;
                    const int next_rows = next_c0 >= cols ? 0 : rows - next_r0 < PR ? rows - next_r0 : PR;
                    const int next_kk = cols - next_c0 < kc ? cols - next_c0 : kc;
                    const int lines_per_row = (int)(((size_t)next_kk * sizeof(float) + 63) / 64);
                    const int steps = n_tiles * ((kk + F32_PANEL_PREFETCH_STEPS - 1) / F32_PANEL_PREFETCH_STEPS);
                    PanelPrefetch pf = {next_rows ? (const char *)(W->w + (size_t)next_r0 * cols + next_c0) : NULL,
                                        (size_t)cols * sizeof(float),
                                        lines_per_row, 0, next_rows * lines_per_row,
                                        (next_rows * lines_per_row + steps - 1) / steps};
                    for (int j = 0; j < n_tiles; j++) {
                        const int t0 = j * PT, T = n_tokens - t0 < PT ? n_tokens - t0 : PT;
                        f32_panel_tile_any(out + (size_t)t0 * rows + r0, rows, panel, xt + (size_t)t0 * cols + (size_t)c0 * T,
                                           kk, T, n_rows, c0 == 0, last_bias ? last_bias + r0 : NULL, &pf);
                    }
                }
            }
        }
    }
}
#endif

/* Fast int8 kernels. They need group == 64 (the file format's only group size): one group is
 * one 512-bit vector (or two 256-bit ones). The per-group int32 sums are exact as in the
 * scalar kernel; only the float accumulation of the scaled groups runs in another order
 * (per lane, summed at the end), except in the AMX kernel, which matches it exactly. */

/* q4 decode (one token) reads a row at a time and spreads its blocks over this many float
 * accumulators: with one, each block waits for the previous block's FMA latency, slower
 * than memory delivers the weights. */
enum { Q4_DECODE_CHAINS = 4 };

/* Decode prefetches this far ahead along each weight row (a 64-byte line per q8 group, per
 * two q4 blocks): the hardware prefetcher alone leaves the cores waiting on memory. */
enum { INT8_PREFETCH_BYTES = 4096 };

#if PHI2_AVX512
/* The two x86 int8 families. AVX-512 VNNI: 512-bit vectors, vpdpbusd (unsigned by signed
 * bytes, 4 products into each int32 lane). Register tiles of 4 rows x 4 tokens: a weight
 * vector loaded once serves 4 tokens. */
enum { Q8_TILE_ROWS = 4, Q8_TILE_TOKENS = 4, Q4_TILE_ROWS = 4, Q4_TILE_TOKENS = 4 };
#define Q8_TILE_SHAPES TOKENS_UP_TO_4(Q8_TILE_ROWS) TOKENS_UP_TO_4(1)
#define Q4_TILE_SHAPES TOKENS_UP_TO_4(Q4_TILE_ROWS) TOKENS_UP_TO_4(1)

/* Q4_LEVELS + offset in each 128-bit lane (a table for vpshufb). */
static ALWAYS_INLINE __m512i q4_levels_vnni(int offset) {
    return _mm512_add_epi8(_mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)Q4_LEVELS)), _mm512_set1_epi8((char)offset));
}

/* The 32 bytes of codes of one block as its 64 weights in order, looked up in levels. */
static ALWAYS_INLINE __m512i q4_decode_vnni(const uint8_t *codes, __m512i levels) {
    const __m256i bytes = _mm256_loadu_si256((const __m256i *)codes);
    const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(bytes), _mm256_srli_epi16(bytes, 4), 1);
    return _mm512_shuffle_epi8(levels, _mm512_and_si512(both, _mm512_set1_epi8(15)));
}

#elif PHI2_AVX2
/* AVX2: 256-bit vectors, vpmaddubsw + vpmaddwd (dot_u8s8_avx2), or vpdpbusd where the target
 * has AVX-VNNI. Register tiles of 2 rows x 2 tokens for q8 (16 ymm registers). */
enum { Q8_TILE_ROWS = 2, Q8_TILE_TOKENS = 2 };
#define Q8_TILE_SHAPES TOKENS_UP_TO_2(Q8_TILE_ROWS) TOKENS_UP_TO_2(1)

/* acc plus the sums of 4 adjacent products u[i] * s[i] (u unsigned, s signed bytes) per
 * int32 lane: one vpdpbusd with AVX-VNNI (Intel laptops since 12th gen, AMD Zen 5), else
 * vpmaddubsw + vpmaddwd, exact when no pair of products exceeds 32767 in magnitude (the
 * callers' operands are chosen so). */
static ALWAYS_INLINE __m256i dot_u8s8_avx2(__m256i acc, __m256i u, __m256i s) {
#if defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(acc, u, s);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}

/* q4: the 32 bytes of codes of one block (64 weights) as two vectors of bytes: weights 0..31
 * from the low nibbles, 32..63 from the high nibbles, each code looked up by vpshufb in
 * levels (a 16-byte table, in both 128-bit halves: Q4_LEVELS, or Q4_LEVELS + 64). */
static ALWAYS_INLINE void q4_decode_avx2(const uint8_t *codes, __m256i levels, __m256i *w_lo, __m256i *w_hi) {
    const __m256i bytes = _mm256_loadu_si256((const __m256i *)codes), nibble = _mm256_set1_epi8(15);
    *w_lo = _mm256_shuffle_epi8(levels, _mm256_and_si256(bytes, nibble));
    *w_hi = _mm256_shuffle_epi8(levels, _mm256_and_si256(_mm256_srli_epi16(bytes, 4), nibble));
}

static ALWAYS_INLINE __m256i q4_levels_avx2(void) {
    return _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)Q4_LEVELS));
}

enum { Q4_TILE_ROWS = 1, Q4_TILE_TOKENS = 4 };  // 1 row x 4 tokens: a row's decoded block serves 4 tokens
#define Q4_TILE_SHAPES TOKENS_UP_TO_4(Q4_TILE_ROWS)
#endif

#if PHI2_AVX512 || PHI2_AVX2
/* What the int8 kernels (the q8 tiles and the row panels of prompt batches, below) need of
 * the two families besides the vectors above: 16 int32 lanes of 4 int8 each with AVX-512,
 * 8 with AVX2 (and AVX-VNNI). In a panel a lane is a row. Plain AVX2 has only vpmaddubsw +
 * vpmaddwd (dot_u8s8_avx2), whose int16 pairs saturate past 32767: fine for q4 (levels
 * within +-61: 2 * 255 * 61 < 32767), not for q8 weights up to +-127 times q_x + 128. There
 * q8 takes the signed activations and moves the weight's sign onto them (|w| once per
 * weight vector, shared by the tokens, times sign(q_x, w): each pair at most 2 * 128 * 127),
 * with no correction: Q8_SIGNED_X.
 * Tokens per tile: as many int32 sums and float accumulators as fill the registers beside
 * the weight vector (AVX2: also its |w|, the broadcast and vpmaddwd's ones). */
#if PHI2_AVX512
enum { PANEL_TOKENS = 12, Q8_SIGNED_X = 0 };
#define PANEL_TILE_SHAPES TOKENS_UP_TO_12(1)
/* acc + the products of the 4 unsigned bytes of x by the 4 signed bytes of w in each lane;
 * signed_x (plain AVX2 q8 only, never here): x signed, taken as |w| (w_abs) * sign(x, w). */
static ALWAYS_INLINE Int8Vec iv_dot(Int8Vec acc, Int8Vec x, Int8Vec w, Int8Vec w_abs, int signed_x) {
    (void)w_abs, (void)signed_x;
    return _mm512_dpbusd_epi32(acc, x, w);
}
/* q4 (above q4_tile): a block's 64 weights as one vector, in order; its first group's sums
 * in lanes 0..7, its second's in 8..15. */
enum { Q4_SCALE_BLOCKS = 8 };
static ALWAYS_INLINE Int8Vec iv_q4_levels(int offset) { return q4_levels_vnni(offset); }
static ALWAYS_INLINE void iv_q4_decode(Int8Vec w[1], const uint8_t *codes, Int8Vec levels) { w[0] = q4_decode_vnni(codes, levels); }
static ALWAYS_INLINE Int8Vec iv_q4_block_sums(const Int8Vec w[1], const Int8Vec x[1]) {
    return _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[0], x[0]);
}
static ALWAYS_INLINE VecF vecf_block_scales(const double *pairs, int i) {
    return _mm512_permutexvar_ps(_mm512_add_epi32(_mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0),
                                                  _mm512_set1_epi32(2 * i)), _mm512_castpd_ps(_mm512_load_pd(pairs)));
}
static ALWAYS_INLINE VecF vecf_spread_blocks(const float *p, int nb) {  // lane j: p[j / 2], for j < 2 * nb
    const __m512 v = nb >= 8 ? _mm512_castps256_ps512(_mm256_loadu_ps(p)) : _mm512_maskz_loadu_ps(first_lanes(nb), p);
    return _mm512_permutexvar_ps(_mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0), v);
}
#else
#if defined(__AVXVNNI__)
enum { PANEL_TOKENS = 6, Q8_SIGNED_X = 0 };
#else
enum { PANEL_TOKENS = 6, Q8_SIGNED_X = 1 };
#endif
#define PANEL_TILE_SHAPES TOKENS_UP_TO_6(1)
static ALWAYS_INLINE Int8Vec iv_dot(Int8Vec acc, Int8Vec x, Int8Vec w, Int8Vec w_abs, int signed_x) {
    return signed_x ? dot_u8s8_avx2(acc, w_abs, _mm256_sign_epi8(x, w)) : dot_u8s8_avx2(acc, x, w);
}
/* q4 (above q4_tile): a block's 64 weights as two vectors, weights 0..31 (its first group)
 * and 32..63; an unpack and an add leave the first group's sums in the even lanes and the
 * second's in the odd ones. */
enum { Q4_SCALE_BLOCKS = 4 };
static ALWAYS_INLINE Int8Vec iv_q4_levels(int offset) { return _mm256_add_epi8(q4_levels_avx2(), _mm256_set1_epi8((char)offset)); }
static ALWAYS_INLINE void iv_q4_decode(Int8Vec w[2], const uint8_t *codes, Int8Vec levels) {
    q4_decode_avx2(codes, levels, &w[0], &w[1]);
}
static ALWAYS_INLINE Int8Vec iv_q4_block_sums(const Int8Vec w[2], const Int8Vec x[2]) {
    const __m256i lo = dot_u8s8_avx2(_mm256_setzero_si256(), w[0], x[0]), hi = dot_u8s8_avx2(_mm256_setzero_si256(), w[1], x[1]);
    return _mm256_add_epi32(_mm256_unpacklo_epi32(lo, hi), _mm256_unpackhi_epi32(lo, hi));
}
static ALWAYS_INLINE VecF vecf_block_scales(const double *pairs, int i) {  // a load, where a permute would compete with vpshufb
    return _mm256_castpd_ps(_mm256_broadcast_sd(pairs + i));
}
static ALWAYS_INLINE VecF vecf_spread_blocks(const float *p, int nb) {  // lane j: p[j / 2], for j < 2 * nb
    float tail[4] = {0};
    if (nb < 4) memcpy(tail, p, (size_t)nb * sizeof(float));
    return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(nb < 4 ? tail : p)), _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3));
}
#endif
/* Each block's pair of q4 scales, stored as one double so that one element moves both. */
static ALWAYS_INLINE void vecf_store_pairs(double *pairs, VecF v) { VEC(store_pd)(pairs, VEC(castps_pd)(v)); }
enum { PANEL_ROWS = VEC_FLOATS, PANEL_MIN_TOKENS = 8 };  // a panel: a row per lane; fewer tokens take the tiles
enum { INT8_BLOCK_PARTS = 64 / (4 * PANEL_ROWS) };  // vectors per row and 64 weights: 1 or 2

/* v[j][i], j < INT8_BLOCK_PARTS: the weights 64 * b .. 64 * b + 63 of row `row` of W, in
 * order (q4: its signed levels). */
static ALWAYS_INLINE void iv_load_block(Int8Vec v[INT8_BLOCK_PARTS][PANEL_ROWS], int i, const Matrix *W, int row, int b) {
    Int8Vec parts[INT8_BLOCK_PARTS];
    if (W->type == WEIGHTS_Q4) {
        iv_q4_decode(parts, W->codes + (size_t)row * (W->cols / 2) + (size_t)b * (Q4_BLOCK / 2), iv_q4_levels(0));
    } else {
        for (int j = 0; j < INT8_BLOCK_PARTS; j++)
            parts[j] = iv_loadu(W->q + (size_t)row * W->cols + (size_t)b * 64 + (size_t)j * (64 / INT8_BLOCK_PARTS));
    }
    for (int j = 0; j < INT8_BLOCK_PARTS; j++) v[j][i] = parts[j];
}

/* q8, a tile of R rows by T tokens (at most Q8_TILE_ROWS x Q8_TILE_TOKENS), with the
 * build's vpdpbusd or its AVX2 stand-in (iv_dot): each group's 64 weights are
 * INT8_BLOCK_PARTS vectors, loaded once for the tile's tokens. The int32 lanes of a group
 * hold exact partial sums of q_w * q_x, scaled by d_w * d_x and accumulated in float per
 * lane; the lanes are summed at the end. Unsigned activations (q_x ^ 0x80, as q_x + 128)
 * start each row's sum at -128 * the group's sum of weights, one more vpdpbusd per weight
 * vector that the tokens share; with Q8_SIGNED_X (plain AVX2) the sign goes onto q_x
 * instead, against |w| computed once per weight vector. */
static ALWAYS_INLINE void q8_tile(float *out, int out_stride, const int8_t *w, const float *wd, const int8_t *x,
                                  const float *xd, int cols, int n_groups, int R, int T, const float *bias) {
    enum { PARTS = INT8_BLOCK_PARTS, PART_BYTES = 64 / INT8_BLOCK_PARTS };
    VecF acc[Q8_TILE_ROWS][Q8_TILE_TOKENS];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) acc[r][t] = vecf_set(0.0f);
    const Int8Vec offset = iv_set4((int32_t)0x80808080u), zero = iv_zero();
    for (int g = 0; g < n_groups; g++) {
        Int8Vec wv[Q8_TILE_ROWS][PARTS], w_abs[Q8_TILE_ROWS][PARTS], start[Q8_TILE_ROWS];
        for (int r = 0; r < R; r++) {
            const int8_t *row = w + (size_t)r * cols + (size_t)g * 64;
            _mm_prefetch((const char *)(row + INT8_PREFETCH_BYTES), _MM_HINT_T0);
            start[r] = zero;
            for (int p = 0; p < PARTS; p++) {
                wv[r][p] = iv_loadu(row + p * PART_BYTES);
                w_abs[r][p] = Q8_SIGNED_X ? iv_abs8(wv[r][p]) : wv[r][p];
                if (!Q8_SIGNED_X) start[r] = iv_sub(start[r], iv_dot(zero, offset, wv[r][p], wv[r][p], 0));
            }
        }
        for (int t = 0; t < T; t++) {
            Int8Vec xv[PARTS];
            for (int p = 0; p < PARTS; p++) {
                xv[p] = iv_loadu(x + (size_t)t * cols + (size_t)g * 64 + p * PART_BYTES);
                if (!Q8_SIGNED_X) xv[p] = iv_xor(xv[p], offset);
            }
            const float xs = xd[(size_t)t * n_groups + g];
            for (int r = 0; r < R; r++) {
                Int8Vec dot = start[r];
                for (int p = 0; p < PARTS; p++) dot = iv_dot(dot, xv[p], wv[r][p], w_abs[r][p], Q8_SIGNED_X);
                acc[r][t] = vecf_fma(vecf_from_int32(dot), vecf_set(wd[(size_t)r * n_groups + g] * xs), acc[r][t]);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) out[(size_t)t * out_stride + r] = vecf_sum(acc[r][t]) + bias[r];
}
#endif

#if PHI2_AVX512 || PHI2_AVX2
/* q4: a block's 64 weights decoded to unsigned bytes level + 64 (iv_q4_decode: its 32 code
 * bytes and the same shifted right by 4, masked to nibbles, looked up by vpshufb), which
 * vpdpbusd multiplies by the signed activations directly: a pair of products is at most
 * 2 * 125 * 127 < 32767, so plain AVX2's vpmaddubsw does not saturate either. The
 * 64 * (the group's sum of q_x) this adds is taken off once per Q4_SCALE_BLOCKS blocks,
 * scaled (q4_activation_offsets). A block's two group sums land in the lanes that
 * iv_q4_block_sums gives them, and one vcvtph2ps makes floats of the float16 scales of
 * Q4_SCALE_BLOCKS blocks (two groups each: one VecF) of a row, from which
 * vecf_block_scales spreads a block's pair over the same lanes. */
static ALWAYS_INLINE void q4_tile(float *out, int out_stride, const uint8_t *w, const uint16_t *wd,
                                  const int8_t *x, const float *xd, const float *xo, int cols, int n_blocks,
                                  int R, int T, const float *bias) {
    enum { PARTS = INT8_BLOCK_PARTS, PART_BYTES = 64 / INT8_BLOCK_PARTS };
    VecF acc[Q4_TILE_ROWS][Q4_TILE_TOKENS];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) acc[r][t] = vecf_set(0.0f);
    const Int8Vec levels = iv_q4_levels(64);
    const size_t row_bytes = (size_t)cols / 2, n_groups = (size_t)cols / Q4_GROUP;
    for (int b0 = 0; b0 < n_blocks; b0 += Q4_SCALE_BLOCKS) {
        const int nb = n_blocks - b0 < Q4_SCALE_BLOCKS ? n_blocks - b0 : Q4_SCALE_BLOCKS;
        _Alignas(64) double d[Q4_TILE_ROWS][Q4_SCALE_BLOCKS];  // each row's blocks' pairs of group scales
        for (int r = 0; r < R; r++) {
            const VecF dv = vecf_load_f16_first(wd + (size_t)r * n_groups + 2 * (size_t)b0, 2 * nb);
            vecf_store_pairs(d[r], dv);
            for (int t = 0; t < T; t++)
                acc[r][t] = vecf_fnma(dv, vecf_load_first(xo + (size_t)t * n_groups + 2 * (size_t)b0, 2 * nb), acc[r][t]);
        }
        for (int i = 0; i < nb; i++) {
            const size_t b = (size_t)b0 + (size_t)i;
            Int8Vec wv[Q4_TILE_ROWS][PARTS];
            VecF ws[Q4_TILE_ROWS];
            for (int r = 0; r < R; r++) {
                const uint8_t *codes = w + (size_t)r * row_bytes + b * (Q4_BLOCK / 2);
                if (i % 2 == 0) _mm_prefetch((const char *)(codes + INT8_PREFETCH_BYTES), _MM_HINT_T0);
                iv_q4_decode(wv[r], codes, levels);
                ws[r] = vecf_block_scales(d[r], i);
            }
            for (int t = 0; t < T; t++) {
                Int8Vec xv[PARTS];
                for (int p = 0; p < PARTS; p++) xv[p] = iv_loadu(x + (size_t)t * cols + b * Q4_BLOCK + p * PART_BYTES);
                const VecF xs = vecf_set(xd[(size_t)t * n_blocks + b]);
                for (int r = 0; r < R; r++)
                    acc[r][t] = vecf_fma(vecf_from_int32(iv_q4_block_sums(wv[r], xv)), vecf_mul(ws[r], xs), acc[r][t]);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) out[(size_t)t * out_stride + r] = vecf_sum(acc[r][t]) + bias[r];
}

/* Decode: one row, one token. The same arithmetic as q4_tile, but its blocks go to
 * Q4_DECODE_CHAINS accumulators in turn, and the activation scales of Q4_SCALE_BLOCKS
 * blocks are folded into the weight scales once, not per block. */
static void q4_row(float *out, const uint8_t *w, const uint16_t *wd, const int8_t *x, const float *xd,
                   const float *xo, int n_blocks, const float *bias) {
    enum { PARTS = INT8_BLOCK_PARTS, PART_BYTES = 64 / INT8_BLOCK_PARTS };
    VecF acc[Q4_DECODE_CHAINS];
    for (int i = 0; i < Q4_DECODE_CHAINS; i++) acc[i] = vecf_set(0.0f);
    const Int8Vec levels = iv_q4_levels(64);
    for (int b0 = 0; b0 < n_blocks; b0 += Q4_SCALE_BLOCKS) {
        const int nb = n_blocks - b0 < Q4_SCALE_BLOCKS ? n_blocks - b0 : Q4_SCALE_BLOCKS;
        const VecF d = vecf_load_f16_first(wd + 2 * (size_t)b0, 2 * nb);
        acc[0] = vecf_fnma(d, vecf_load_first(xo + 2 * (size_t)b0, 2 * nb), acc[0]);
        // each group's weight scale times its block's activation scale
        _Alignas(64) double scales[Q4_SCALE_BLOCKS];
        vecf_store_pairs(scales, vecf_mul(d, vecf_spread_blocks(xd + b0, nb)));
#pragma GCC unroll 8
        for (int i = 0; i < Q4_SCALE_BLOCKS; i++) {
            if (i >= nb) break;
            const size_t b = (size_t)b0 + (size_t)i;
            const uint8_t *codes = w + b * (Q4_BLOCK / 2);
            if (i % 2 == 0) _mm_prefetch((const char *)(codes + INT8_PREFETCH_BYTES), _MM_HINT_T0);
            Int8Vec wv[PARTS], xv[PARTS];
            iv_q4_decode(wv, codes, levels);
            for (int p = 0; p < PARTS; p++) xv[p] = iv_loadu(x + b * Q4_BLOCK + p * PART_BYTES);
            acc[i % Q4_DECODE_CHAINS] = vecf_fma(vecf_from_int32(iv_q4_block_sums(wv, xv)), vecf_block_scales(scales, i),
                                                    acc[i % Q4_DECODE_CHAINS]);
        }
    }
    *out = vecf_sum(vecf_add(vecf_add(acc[0], acc[1]), vecf_add(acc[2], acc[3]))) + *bias;
}

#endif

#if PHI2_NEON
enum { Q8_TILE_ROWS = 4, Q8_TILE_TOKENS = 2, Q4_TILE_ROWS = 4, Q4_TILE_TOKENS = 2 };  // Arm's tiles (Appendix C)
#define Q8_TILE_SHAPES TOKENS_UP_TO_2(Q8_TILE_ROWS) TOKENS_UP_TO_2(1)
#define Q4_TILE_SHAPES TOKENS_UP_TO_2(Q4_TILE_ROWS) TOKENS_UP_TO_2(1)
#endif

#if PHI2_AVX512 || PHI2_AVX2 || PHI2_NEON
/* This build's int8 kernels, x86's above or Arm's in Appendix C: a tile multiplies R rows
 * (q8: int8 weights and float scales; q4: codes and float16 scales) by T tokens of int8
 * activations; q4_row is q4 decode, one row and one token. */
static ALWAYS_INLINE void q8_tile(float *out, int out_stride, const int8_t *w, const float *wd, const int8_t *x,
                                  const float *xd, int cols, int n_groups, int R, int T, const float *bias);
static ALWAYS_INLINE void q4_tile(float *out, int out_stride, const uint8_t *w, const uint16_t *wd,
                                  const int8_t *x, const float *xd, const float *xo, int cols, int n_blocks,
                                  int R, int T, const float *bias);
static void q4_row(float *out, const uint8_t *w, const uint16_t *wd, const int8_t *x, const float *xd,
                   const float *xo, int n_blocks, const float *bias);

/* The tile shapes matmul_int8_tiled asks for (the build's most rows or 1, 1 .. most tokens),
 * each a specialization the compiler unrolls. */
static void q8_tile_any(float *out, int out_stride, const void *w, const void *wd, const int8_t *x, const float *xd,
                        const float *xo, int cols, int n_groups, int R, int T, const float *bias) {
    (void)xo;  // only the q4 kernels use it
#define TILE(r, t) q8_tile(out, out_stride, w, wd, x, xd, cols, n_groups, r, t, bias)
    TILE_SWITCH("q8_tile", R, T, Q8_TILE_SHAPES);
#undef TILE
}

static void q4_tile_any(float *out, int out_stride, const void *w, const void *wd, const int8_t *x, const float *xd,
                        const float *xo, int cols, int n_blocks, int R, int T, const float *bias) {
    if (R == 1 && T == 1) {
        q4_row(out, w, wd, x, xd, xo, n_blocks, bias);
        return;
    }
#define TILE(r, t) q4_tile(out, out_stride, w, wd, x, xd, xo, cols, n_blocks, r, t, bias)
    TILE_SWITCH("q4_tile", R, T, Q4_TILE_SHAPES);
#undef TILE
}
#endif

#if PHI2_AVX512 || PHI2_AVX2 || PHI2_NEON
#define PHI2_Q8_SIMD 1
/* A tile kernel: R rows from w / wd (q8: int8 weights and float scales; q4: codes and
 * float16 scales) times T tokens of int8 activations. */
typedef void (*Int8Tile)(float *out, int out_stride, const void *w, const void *wd, const int8_t *x, const float *xd,
                         const float *xo, int cols, int n_groups, int R, int T, const float *bias);

/* The loop nest shared by the VNNI, AVX2 and NEON int8 kernels (tile: RT rows x TT tokens). Each
 * thread claims chunks of contiguous rows (tiles_per_chunk) and reads each weight row once (the tile loops
 * over all tokens with the rows in cache): a batch's activations are small (n_tokens x cols
 * bytes) and stay in L2. Decode (one token) goes one row at a time, so the matrix streams
 * strictly in address order (interleaving RT rows pays off only when the loaded weights are
 * reused across tokens). */
static void int8_tiled_rows(const TiledProduct *p, int r0, int r1) {
    float *out = p->out;
    const QuantizedRows *in = p->xq;
    const Matrix *W = p->W;
    const float *bias = p->bias;
    const Int8Tile tile = (Int8Tile)p->tile;
    const int n_tokens = p->n_tokens, RT = p->RT, TT = p->TT;
    const int rows = W->rows, cols = W->cols, n_groups = cols / Q8_GROUP;
    const int tile_rows = n_tokens == 1 ? 1 : RT;
    for (int r = r0; r < r1;) {
        const int R = r1 - r >= tile_rows ? tile_rows : 1;
        for (int t = 0; t < n_tokens; t += TT) {
            const int T = n_tokens - t < TT ? n_tokens - t : TT;
            const void *w = W->type == WEIGHTS_Q4 ? (const void *)(W->codes + (size_t)r * (cols / 2))
                                                  : (const void *)(W->q + (size_t)r * cols);
            const void *wd = W->type == WEIGHTS_Q4 ? (const void *)(W->scale16 + (size_t)r * (cols / Q4_GROUP))
                                                   : (const void *)(W->scale + (size_t)r * n_groups);
            const float *xo = W->type == WEIGHTS_Q4 ? in->q4_offset + (size_t)t * (cols / Q4_GROUP) : NULL;
            tile(out + (size_t)t * rows + r, rows, w, wd, in->q + (size_t)t * cols, in->scale + (size_t)t * n_groups,
                 xo, cols, n_groups, R, T, bias + r);
        }
        r += R;
    }
}

static void matmul_int8_tiled(float *out, const QuantizedRows *in, const Matrix *W, const float *bias, int n_tokens,
                              Int8Tile tile, int RT, int TT) {
    const TiledProduct p = {out, NULL, in, W, bias, n_tokens, (const void *)tile, RT, TT};
    tiled_product(&p, int8_tiled_rows);
}

#endif

#if PHI2_PANELS
/* --- Prompt batches: the weights in row panels ------------------------------------------
 * In the tiles above, every vpdpbusd (64 products) is followed by a conversion, a multiply
 * and an FMA to scale its group: a batch spends more time scaling than multiplying. A panel
 * lays PANEL_ROWS rows side by side, 4 weights at a time: weight k of panel row i is at
 * w[(k / 4) * 4 * PANEL_ROWS + 4 * i + k % 4], so one vector holds 4 consecutive weights of
 * each of its rows (AVX-512: 16 rows, AVX2: 8). vpdpbusd of such a vector with 4 activation
 * bytes of one token (broadcast to every lane) adds 4 products to each row's int32 sum, lane
 * i for row i. A whole group (16 steps for q8, 8 for q4) accumulates in int32 before one
 * conversion and one FMA scale it for all the panel's rows, and a token's results are one
 * vector store.
 * A thread builds the panel of the rows it works on, once per matrix product; it reads the
 * rows once and serves every token of the batch. q8 rows are transposed in 4-byte units
 * (16 x 16 or 8 x 8 at a time, in registers), q4 codes become their int8 levels on the
 * way. With the weights the panel keeps each group's scales as floats and -128 * (the
 * group's sum of weights): vpdpbusd multiplies unsigned by signed bytes, so the activations go in as
 * q_x + 128 (q_x ^ 0x80, once per product) and each group's sum starts at that correction.
 * The group sums are exact, as in the scalar kernel; only the float rounding differs.
 * Float32 batches use panels too (matmul_f32_panels, above: whole floats, no groups). */

typedef struct {
    int8_t *w;       // [cols / 4][PANEL_ROWS][4] the rows' weights (q4: their levels), 4 at a time
    float *scale;    // [n_wgroups][PANEL_ROWS] each weight group's scale (q8: 64 weights, q4: 32)
    int32_t *corr;   // [n_wgroups][PANEL_ROWS] -128 * each group's sum of weights (unused with Q8_SIGNED_X)
} Panel;

/* Bytes of one thread's panel for rows of cols weights. */
static size_t panel_bytes(int cols, int wgroup) {
    return (size_t)PANEL_ROWS * cols + (size_t)(cols / wgroup) * PANEL_ROWS * (sizeof(float) + sizeof(int32_t));
}

/* The panel of rows r0 .. r0 + n_rows - 1 of W (n_rows <= PANEL_ROWS; missing rows are
 * zeros). Each 64 weights of a row are INT8_BLOCK_PARTS vectors (q4: a block, whose first
 * and second 32 weights are one group each), and part j of the PANEL_ROWS rows, transposed,
 * is the panel's next PANEL_ROWS vectors. A row's last scales (fewer than PANEL_ROWS groups)
 * go through a small copy: nothing may be read past the row. */
static void panel_build(const Panel *p, const Matrix *W, int r0, int n_rows) {
    const int cols = W->cols, q4 = W->type == WEIGHTS_Q4, n_wg = cols / (q4 ? Q4_GROUP : Q8_GROUP);
    const int need_corr = q4 || !Q8_SIGNED_X;
    const Int8Vec ones = iv_set4(0x01010101);
    Int8Vec v[INT8_BLOCK_PARTS][PANEL_ROWS];
    for (int b = 0; b < cols / 64; b++) {  // 64 weights of each row: 16 vectors of the panel
#pragma GCC unroll 16
        for (int i = 0; i < PANEL_ROWS; i++) {  // v[j][i]: part j of row i
            if (i < n_rows) iv_load_block(v, i, W, r0 + i, b);
            else for (int j = 0; j < INT8_BLOCK_PARTS; j++) v[j][i] = iv_zero();
        }
        Int8Vec sum = iv_zero(), sum_hi = iv_zero();  // per row: its group's sum of weights (q4: two groups)
        for (int j = 0; j < INT8_BLOCK_PARTS; j++) {
            iv_transpose(v[j]);
            for (int c = 0; c < PANEL_ROWS; c++) {
                const int k = j * PANEL_ROWS + c;  // vector k of the block's 16: weights 4k .. 4k+3
                iv_store(p->w + ((size_t)b * 16 + k) * 4 * PANEL_ROWS, v[j][c]);
                if (q4 && k >= 8) sum_hi = iv_dot(sum_hi, ones, v[j][c], v[j][c], 0);
                else if (need_corr) sum = iv_dot(sum, ones, v[j][c], v[j][c], 0);
            }
        }
        if (q4) iv_store(p->corr + (size_t)(2 * b + 1) * PANEL_ROWS, iv_times(sum_hi, -128));
        if (need_corr) iv_store(p->corr + (size_t)(q4 ? 2 * b : b) * PANEL_ROWS, iv_times(sum, -128));
    }
    for (int g0 = 0; g0 < n_wg; g0 += PANEL_ROWS) {  // the scales, PANEL_ROWS groups x rows at a time, transposed
        const int ng = n_wg - g0 < PANEL_ROWS ? n_wg - g0 : PANEL_ROWS;
        for (int i = 0; i < PANEL_ROWS; i++) {
            const size_t at = (size_t)(r0 + i) * n_wg + g0;
            float tail[PANEL_ROWS] = {0};
            uint16_t tail16[PANEL_ROWS] = {0};
            if (i < n_rows && ng < PANEL_ROWS && q4) memcpy(tail16, W->scale16 + at, (size_t)ng * sizeof(uint16_t));
            if (i < n_rows && ng < PANEL_ROWS && !q4) memcpy(tail, W->scale + at, (size_t)ng * sizeof(float));
            const int whole = i < n_rows && ng == PANEL_ROWS;
            v[0][i] = q4 ? (Int8Vec)vecf_load_f16_first(whole ? W->scale16 + at : tail16, PANEL_ROWS)
                         : (Int8Vec)vecf_load(whole ? W->scale + at : tail);
        }
        iv_transpose(v[0]);
        for (int c = 0; c < ng; c++) iv_store(p->scale + (size_t)(g0 + c) * PANEL_ROWS, v[0][c]);
    }
}

/* Panel rows x T tokens (T <= PANEL_TOKENS): out[t][i] = sum over groups of the exact group
 * sum times both scales, + bias[i], for the panel's n_rows rows. x: the tokens' q_x + 128,
 * or with signed_x (plain AVX2 q8) q_x itself.
 * The empty asm keeps each token's int32 sum in its register from step to step: without
 * it gcc reassociates AVX2's unrolled chain of vpaddd (integer adds, unlike vpdpbusd),
 * keeps every step's products on the stack and adds them up at the end. */
static ALWAYS_INLINE void panel_tile(float *out, int out_stride, const Panel *p, const uint8_t *x, const float *xd,
                                     int cols, int wgroup, int signed_x, int T, int n_rows, const float *bias,
                                     PanelPrefetch *pf) {
    const int steps = wgroup / 4, n_wg = cols / wgroup, n_xg = cols / Q8_GROUP;
    VecF acc[PANEL_TOKENS];
    for (int t = 0; t < T; t++) acc[t] = vecf_set(0.0f);
    for (int g = 0; g < n_wg; g++) {
        Int8Vec isum[PANEL_TOKENS];
        const Int8Vec start = signed_x ? iv_zero() : iv_load(p->corr + (size_t)g * PANEL_ROWS);
        for (int t = 0; t < T; t++) isum[t] = start;
        const int8_t *wg = p->w + (size_t)g * steps * 4 * PANEL_ROWS;
        const uint8_t *xg = x + (size_t)g * wgroup;
#pragma GCC unroll 16
        for (int s = 0; s < steps; s++) {
            const Int8Vec wv = iv_load(wg + (size_t)s * 4 * PANEL_ROWS), w_abs = signed_x ? iv_abs8(wv) : wv;
            for (int t = 0; t < T; t++) {
                int32_t four;
                memcpy(&four, xg + (size_t)t * cols + 4 * s, 4);
                isum[t] = iv_dot(isum[t], iv_set4(four), wv, w_abs, signed_x);
                __asm__("" : "+v"(isum[t]));
            }
        }
        panel_prefetch(pf);
        const VecF ws = vecf_load_aligned(p->scale + (size_t)g * PANEL_ROWS);
        const size_t xs_at = (size_t)g * wgroup / Q8_GROUP;
        for (int t = 0; t < T; t++) acc[t] = vecf_fma(vecf_from_int32(isum[t]), vecf_mul(ws, vecf_set(xd[(size_t)t * n_xg + xs_at])), acc[t]);
    }
    const VecF b = vecf_load_first(bias, n_rows);
    for (int t = 0; t < T; t++) vecf_store_first(out + (size_t)t * out_stride, vecf_add(acc[t], b), n_rows);
}

/* The specializations (1 .. PANEL_TOKENS tokens, q8 or q4 groups) the compiler unrolls. */
static void panel_tile_any(float *out, int out_stride, const Panel *p, const uint8_t *x, const float *xd, int cols,
                           int wgroup, int T, int n_rows, const float *bias, PanelPrefetch *pf) {
#define TILE(r, t)                                                                                     \
    (wgroup == Q8_GROUP ? panel_tile(out, out_stride, p, x, xd, cols, Q8_GROUP, Q8_SIGNED_X, t, n_rows, bias, pf) \
                        : panel_tile(out, out_stride, p, x, xd, cols, Q4_GROUP, 0, t, n_rows, bias, pf))
    TILE_SWITCH("panel_tile", 1, T, PANEL_TILE_SHAPES);
#undef TILE
}

/* The whole product for a batch: each thread claims chunks of panels (16 rows; 8 on AVX2),
 * builds each panel once and runs every token of the batch through it, PANEL_TOKENS at a
 * time. Scratch (KernelScratch.panel, grown as needed): the activations as q_x + 128 (plain
 * AVX2 q8 takes q_x as it is: Q8_SIGNED_X), then one panel per thread. */
static void matmul_int8_panels(float *out, const QuantizedRows *in, const Matrix *W, const float *bias, int n_tokens,
                               KernelScratch *k) {
    const int rows = W->rows, cols = W->cols, q4 = W->type == WEIGHTS_Q4;
    const int wgroup = q4 ? Q4_GROUP : Q8_GROUP, n_wg = cols / wgroup, n_threads = max_threads();
    const size_t x_bytes = (mul_size((size_t)n_tokens, (size_t)cols) + 63) / 64 * 64, one_panel = panel_bytes(cols, wgroup);
    const size_t need = x_bytes + mul_size((size_t)n_threads, one_panel);
    scratch_at_least(&k->panel, &k->panel_size, need);
    const uint8_t *x = (const uint8_t *)in->q;
    if (q4 || !Q8_SIGNED_X) {
        uint8_t *xu = k->panel;
#pragma omp parallel for if (n_tokens > 1)
        for (int t = 0; t < n_tokens; t++)
            for (size_t i = (size_t)t * cols; i < (size_t)(t + 1) * cols; i++) xu[i] = (uint8_t)in->q[i] ^ 0x80;
        x = xu;
    }
    const size_t row_bytes = matrix_row_bytes(W);
    const int n_panels = (rows + PANEL_ROWS - 1) / PANEL_ROWS, chunk_panels = tiles_per_chunk(n_panels, PANEL_ROWS * row_bytes, max_threads());
    const int n_chunks = (n_panels + chunk_panels - 1) / chunk_panels;
    int next_chunk = 0;
#pragma omp parallel
    {
        const int thread = team_thread();
        unsigned char *mine = k->panel + x_bytes + (size_t)thread * one_panel;
        const Panel p = {(int8_t *)mine, (float *)(mine + (size_t)PANEL_ROWS * cols),
                         (int32_t *)(mine + (size_t)PANEL_ROWS * cols + (size_t)n_wg * PANEL_ROWS * sizeof(float))};
        for (int chunk; (chunk = claim_chunk(&next_chunk)) < n_chunks;) {
            const int p1 = (chunk + 1) * chunk_panels < n_panels ? (chunk + 1) * chunk_panels : n_panels;
            for (int pi = chunk * chunk_panels; pi < p1; pi++) {
                const int r0 = pi * PANEL_ROWS, n_rows = rows - r0 < PANEL_ROWS ? rows - r0 : PANEL_ROWS;
                panel_build(&p, W, r0, n_rows);
                const int next_rows = pi + 1 < p1 ? (rows - r0 - PANEL_ROWS < PANEL_ROWS ? rows - r0 - PANEL_ROWS : PANEL_ROWS) : 0;
                const int lines_per_row = (int)((row_bytes + 63) / 64), n_tiles = (n_tokens + PANEL_TOKENS - 1) / PANEL_TOKENS;
                int tiles_left = n_tiles;
                const char *rows_start = q4 ? (const char *)W->codes : (const char *)W->q;
                PanelPrefetch pf = {next_rows ? rows_start + (size_t)(r0 + PANEL_ROWS) * row_bytes : NULL,
                                    row_bytes, lines_per_row, 0, next_rows * lines_per_row,
                                    (next_rows * lines_per_row + n_tiles * n_wg - 1) / (n_tiles * n_wg)};
                for (int t = 0, T; t < n_tokens; t += T, tiles_left--) {
                    T = (n_tokens - t + tiles_left - 1) / tiles_left;  // even tiles (of 12: 64 = 4 x 11 + 2 x 10, not 5 x 12 + 4)
                    panel_tile_any(out + (size_t)t * rows + r0, rows, &p, x + (size_t)t * cols,
                                   in->scale + (size_t)t * (cols / Q8_GROUP), cols, wgroup, T, n_rows, bias + r0, &pf);
                }
            }
        }
    }
}
#endif

#if PHI2_AVX512 || PHI2_AVX2
/* matmul_q8_simd: the VNNI kernel on AVX512-VNNI builds, the maddubs one on AVX2 builds
 * (Arm: Appendix C). */
static void matmul_q8_simd(float *out, const QuantizedRows *in, const Matrix *W, const float *bias, int n_tokens) {
    matmul_int8_tiled(out, in, W, bias, n_tokens, q8_tile_any, Q8_TILE_ROWS, Q8_TILE_TOKENS);
}

/* The x86 q4 kernels multiply unsigned bytes level + 64 by the activations, which adds
 * 64 * (the sum of each group's q_x) to every group's sum. These are those amounts, scaled
 * by the activations' scale (the weights' scale comes in the kernel): computed once per
 * token, shared by every row. */
static void q4_activation_offsets(const QuantizedRows *in, int n_tokens, int cols) {
    const int n_groups = cols / Q4_GROUP;
    for (int t = 0; t < n_tokens; t++)
        for (int g = 0; g < n_groups; g++) {
            const int8_t *xg = in->q + (size_t)t * cols + (size_t)g * Q4_GROUP;
            int32_t sum = 0;
            for (int i = 0; i < Q4_GROUP; i++) sum += xg[i];
            in->q4_offset[(size_t)t * n_groups + g] = 64.0f * in->scale[(size_t)t * (cols / Q4_BLOCK) + g / 2] * (float)sum;
        }
}

/* matmul_q4_simd: the same for 4-bit weights. */
static void matmul_q4_simd(float *out, const QuantizedRows *in, const Matrix *W, const float *bias, int n_tokens) {
    q4_activation_offsets(in, n_tokens, W->cols);
    matmul_int8_tiled(out, in, W, bias, n_tokens, q4_tile_any, Q4_TILE_ROWS, Q4_TILE_TOKENS);
}
#endif

#if PHI2_AMX
/* AMX-INT8 for batches: one tdpbssd multiplies a 16 x 64 tile of signed weights (16 rows,
 * one group; loaded straight from the file layout with a row stride of cols) by a 64 x 16
 * tile of signed activations (16 tokens) into 16 x 16 exact int32 group sums. Per group the
 * sums are scaled like the scalar kernel (sum += isum * d_w * d_x, same operations, same
 * order), so results equal it bit for bit. The activation tile must be in the VNNI layout
 * (B[k/4][4*t + k%4]), so the batch is repacked once per call into a small buffer
 * (padded to whole 16-token blocks with zeros), with the scales transposed beside it.
 * Leftover rows (rows % 16) make a last, shorter tile. Linux hands out the AMX register
 * state only on request (arch_prctl); if that fails we never use AMX. */
enum { AMX_MIN_TOKENS = 4 };  // below this the VNNI kernel is as fast (decode is memory-bound)

/* Whether this process may use AMX: asked of the OS once per KernelScratch (Appendix F). */
static int request_amx_permission(void);  // Appendix F

static int amx_available(KernelScratch *k) {
    if (k->amx_state == 0) k->amx_state = request_amx_permission() ? 1 : -1;
    return k->amx_state > 0;
}

typedef struct {
    uint8_t palette_id, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((aligned(64))) AmxTileConfig;

/* Tiles: tmm0, tmm3 = C (n_rows x 16 int32), tmm1 = A (n_rows weight rows x 64 bytes),
 * tmm2, tmm4 = B (16 x 64 bytes: 64 activation bytes of each of 16 tokens). */
static void amx_configure(int n_rows) {
    AmxTileConfig cfg = {.palette_id = 1};
    cfg.rows[0] = (uint8_t)n_rows, cfg.colsb[0] = 64;
    cfg.rows[1] = (uint8_t)n_rows, cfg.colsb[1] = 64;
    cfg.rows[2] = 16, cfg.colsb[2] = 64;
    cfg.rows[3] = (uint8_t)n_rows, cfg.colsb[3] = 64;  // tmm3, tmm4: a second C and B, so two
    cfg.rows[4] = 16, cfg.colsb[4] = 64;               // products are in flight at once
    _tile_loadconfig(&cfg);
}

/* acc[i][t] += (float)sums[i][t] * wd[i * n_groups] * xs[t]: the scalar kernel's
 * sum += (float)isum * d_w * d_x, same operations in the same order (no FMA). */
static ALWAYS_INLINE void amx_scale_add(float acc[16][16], int32_t sums[16][16], const float *wd, int n_groups,
                                        const float *xs_packed, int n_rows) {
    const __m512 xs = _mm512_load_ps(xs_packed);
    for (int i = 0; i < n_rows; i++) {
        __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_load_si512(sums[i])), _mm512_set1_ps(wd[(size_t)i * n_groups]));
        _mm512_store_ps(acc[i], _mm512_add_ps(_mm512_load_ps(acc[i]), _mm512_mul_ps(v, xs)));
    }
}

/* Rows [r, r + n_rows) (n_rows <= 16, as configured) for all tokens. Token blocks go in
 * chunks of AMX_TB_CHUNK so each weight tile, once loaded, serves up to 64 tokens; the
 * float accumulators of the chunk live in L1 (acc). The 16 weight rows are 16 separate
 * streams, which the hardware prefetcher follows poorly: prefetch AMX_PF groups ahead. */
enum { AMX_TB_CHUNK = 4, AMX_PF = 4 };
static ALWAYS_INLINE void amx_rows(float *out, const Matrix *W, const float *bias, const int8_t *packed,
                                   const float *xs_packed, int n_tokens, int r, int n_rows) {
    const int rows = W->rows, cols = W->cols, n_groups = cols / 64, n_tb = (n_tokens + 15) / 16;
    const int8_t *wq = W->q + (size_t)r * cols;
    const float *wd = W->scale + (size_t)r * n_groups;
    int32_t sums[2][16][16] __attribute__((aligned(64)));
    float acc[AMX_TB_CHUNK][16][16] __attribute__((aligned(64)));
    for (int tb0 = 0; tb0 < n_tb; tb0 += AMX_TB_CHUNK) {
        const int n_chunk = n_tb - tb0 < AMX_TB_CHUNK ? n_tb - tb0 : AMX_TB_CHUNK;
        memset(acc, 0, sizeof(acc));
        for (int g = 0; g < n_groups; g++) {
            if (g + AMX_PF < n_groups)
                for (int i = 0; i < n_rows; i++)
                    _mm_prefetch((const char *)(wq + (size_t)i * cols + (size_t)(g + AMX_PF) * 64), _MM_HINT_T0);
            _tile_loadd(1, wq + (size_t)g * 64, cols);
            // token blocks in pairs: the second product runs while the first is scaled
            for (int c = 0; c < n_chunk; c += 2) {
                const size_t tile = (size_t)(tb0 + c) * n_groups + g;
                _tile_loadd(2, packed + tile * 1024, 64);
                _tile_zero(0);
                _tile_dpbssd(0, 1, 2);
                if (c + 1 < n_chunk) {
                    _tile_loadd(4, packed + (tile + n_groups) * 1024, 64);
                    _tile_zero(3);
                    _tile_dpbssd(3, 1, 4);
                }
                _tile_stored(0, sums[0], 64);
                amx_scale_add(acc[c], sums[0], wd + g, n_groups, xs_packed + tile * 16, n_rows);
                if (c + 1 < n_chunk) {
                    _tile_stored(3, sums[1], 64);
                    amx_scale_add(acc[c + 1], sums[1], wd + g, n_groups, xs_packed + (tile + n_groups) * 16, n_rows);
                }
            }
        }
        for (int c = 0; c < n_chunk; c++) {
            const int t0 = (tb0 + c) * 16, T = n_tokens - t0 < 16 ? n_tokens - t0 : 16;
            for (int t = 0; t < T; t++)
                for (int i = 0; i < n_rows; i++) out[(size_t)(t0 + t) * rows + r + i] = acc[c][i][t] + bias[r + i];
        }
    }
}

static void matmul_q8_amx(float *out, const QuantizedRows *in, const Matrix *W, const float *bias, int n_tokens,
                          KernelScratch *k) {
    const int rows = W->rows, cols = W->cols, n_groups = cols / 64, n_tb = (n_tokens + 15) / 16;
    const size_t tiles = (size_t)n_tb * n_groups;
    size_t need = tiles * 1024 + tiles * 16 * sizeof(float);
    scratch_at_least(&k->amx_pack, &k->amx_pack_size, need);
    int8_t *packed = (int8_t *)k->amx_pack;                    // [n_tb][n_groups][16 k4][16 t][4]
    float *xs_packed = (float *)(k->amx_pack + tiles * 1024);  // [n_tb][n_groups][16 t]
    for (int tb = 0; tb < n_tb; tb++)
        for (int g = 0; g < n_groups; g++) {
            int8_t *b = packed + ((size_t)tb * n_groups + g) * 1024;
            float *xs = xs_packed + ((size_t)tb * n_groups + g) * 16;
            for (int t = 0; t < 16; t++) {
                const int tt = tb * 16 + t;
                const int8_t *xg = in->q + (size_t)tt * cols + (size_t)g * 64;
                for (int k4 = 0; k4 < 16; k4++) {
                    if (tt < n_tokens) memcpy(b + k4 * 64 + t * 4, xg + k4 * 4, 4);
                    else memset(b + k4 * 64 + t * 4, 0, 4);
                }
                xs[t] = tt < n_tokens ? in->scale[(size_t)tt * n_groups + g] : 0.0f;
            }
        }

    const int n_rb = rows / 16, rest = rows % 16;
    const int chunk_blocks = tiles_per_chunk(n_rb, (size_t)16 * cols, max_threads()), n_chunks = (n_rb + chunk_blocks - 1) / chunk_blocks;
    int next_chunk = 0;
#pragma omp parallel
    {
        amx_configure(16);
        for (int chunk; (chunk = claim_chunk(&next_chunk)) < n_chunks;)
            for (int rb = chunk * chunk_blocks; rb < (chunk + 1) * chunk_blocks && rb < n_rb; rb++)
                amx_rows(out, W, bias, packed, xs_packed, n_tokens, rb * 16, 16);
        if (rest) {
#pragma omp single nowait
            {
                amx_configure(rest);  // a last tile of fewer rows
                amx_rows(out, W, bias, packed, xs_packed, n_tokens, n_rb * 16, rest);
            }
        }
        _tile_release();
    }
}
#endif


/* --- The f16 KV cache ------------------------------------------------------------------
 * Its conversions, dot and axpy, and a head's scores and weighted sum, over VecF with
 * vecf_load_f16 and vecf_store_f16. F16C (x86) and NEON convert exactly: widening is exact,
 * and narrowing rounds to nearest even, bit for bit as f16_from_f32 does, NaN included
 * (x86's immediate 0 whatever MXCSR says; NEON's FCVTN under the default FPCR). Tails go
 * through the scalar twins; head_dim 80 has none. */
#if PHI2_AVX512 || PHI2_AVX2 || PHI2_NEON
#define PHI2_F16_VEC 1
MAYBE_UNUSED static void f32_to_f16_row_vec(uint16_t *out, const float *x, int n) {
    int i = 0;
    for (; i + VEC_FLOATS <= n; i += VEC_FLOATS) vecf_store_f16(out + i, vecf_load(x + i));
    f32_to_f16_row_scalar(out + i, x + i, n - i);
}

MAYBE_UNUSED static void f16_to_f32_row_vec(float *out, const uint16_t *x, int n) {
    int i = 0;
    for (; i + VEC_FLOATS <= n; i += VEC_FLOATS) vecf_store(out + i, vecf_load_f16(x + i));
    f16_to_f32_row_scalar(out + i, x + i, n - i);
}

/* Two accumulators: a head's 80 values are 5 to 20 FMAs, which one chain would serialize. */
MAYBE_UNUSED static float dot_f32_f16_vec(const float *a, const uint16_t *b, int n) {
    VecF acc0 = vecf_set(0.0f), acc1 = vecf_set(0.0f);
    int i = 0;
    for (; i + 2 * VEC_FLOATS <= n; i += 2 * VEC_FLOATS) {
        acc0 = vecf_fma(vecf_load(a + i), vecf_load_f16(b + i), acc0);
        acc1 = vecf_fma(vecf_load(a + i + VEC_FLOATS), vecf_load_f16(b + i + VEC_FLOATS), acc1);
    }
    if (i + VEC_FLOATS <= n) {
        acc0 = vecf_fma(vecf_load(a + i), vecf_load_f16(b + i), acc0);
        i += VEC_FLOATS;
    }
    return vecf_sum(acc0) + vecf_sum(acc1) + dot_f32_f16_scalar(a + i, b + i, n - i);
}

MAYBE_UNUSED static void axpy_f16_vec(float *out, float w, const uint16_t *v, int n) {
    const VecF wv = vecf_set(w);
    int i = 0;
    for (; i + VEC_FLOATS <= n; i += VEC_FLOATS) vecf_store(out + i, vecf_fma(wv, vecf_load_f16(v + i), vecf_load(out + i)));
    axpy_f16_scalar(out + i, w, v + i, n - i);
}

/* A generated token's attention deep in the context, a head at a time, for Phi-2's head of
 * 80 numbers (HEAD_VECTORS vectors). Scores: VEC_FLOATS keys at a time, each with its own
 * accumulator, reduced together (vecf_sums) instead of one horizontal sum per key.
 * Weighted sum: the head's 80 outputs stay in registers across all positions instead of
 * being loaded and stored once per position. */
enum { HEAD_VECTORS = 80 / VEC_FLOATS };  // head_dim 80: the head kernels' one shape (others: per row)
enum { KV_PREFETCH_BYTES = 2048 };  // both prefetch this far ahead in the head's keys or values

MAYBE_UNUSED static void scores_f16_vec(float *score, const float *q, const uint16_t *keys, int n_pos, float scale) {
    const int hd = VEC_FLOATS * HEAD_VECTORS;
    int p = 0;
    for (; p + VEC_FLOATS <= n_pos; p += VEC_FLOATS) {
        VecF acc[VEC_FLOATS];
        for (int j = 0; j < VEC_FLOATS; j++) acc[j] = vecf_set(0.0f);
        const char *block = (const char *)(keys + (size_t)p * hd);
        for (int line = 0; line < VEC_FLOATS * hd * 2; line += 64) __builtin_prefetch(block + KV_PREFETCH_BYTES + line);
        for (int i = 0; i < HEAD_VECTORS; i++) {
            const VecF qi = vecf_load(q + VEC_FLOATS * i);
            for (int j = 0; j < VEC_FLOATS; j++)
                acc[j] = vecf_fma(qi, vecf_load_f16(keys + (size_t)(p + j) * hd + VEC_FLOATS * i), acc[j]);
        }
        vecf_store(score + p, vecf_mul(vecf_sums(acc), vecf_set(scale)));
    }
    for (; p < n_pos; p++) score[p] = dot_f32_f16_vec(q, keys + (size_t)p * hd, hd) * scale;
}

MAYBE_UNUSED static void weighted_sum_f16_vec(float *out, const float *weight, const uint16_t *values, int n_pos) {
    const int hd = VEC_FLOATS * HEAD_VECTORS;
    VecF acc[HEAD_VECTORS];
    for (int i = 0; i < HEAD_VECTORS; i++) acc[i] = vecf_set(0.0f);
    for (int p = 0; p < n_pos; p++) {
        const VecF w = vecf_set(weight[p]);
        if (p % 2 == 0) {  // two positions' values: 320 bytes, 5 lines
            const char *pair = (const char *)(values + (size_t)p * hd);
            for (int line = 0; line < 2 * hd * 2; line += 64) __builtin_prefetch(pair + KV_PREFETCH_BYTES + line);
        }
        for (int i = 0; i < HEAD_VECTORS; i++) acc[i] = vecf_fma(w, vecf_load_f16(values + (size_t)p * hd + VEC_FLOATS * i), acc[i]);
    }
    for (int i = 0; i < HEAD_VECTORS; i++) vecf_store(out + VEC_FLOATS * i, acc[i]);
}
#endif

/* ------------------------------------------------------------------------------------- */
/* Appendix C. Arm kernels: int8 with NEON, dotprod and i8mm                             */
/* ------------------------------------------------------------------------------------- */
/* The section 3 kernels for 64-bit Arm (Apple M-series, Snapdragon X, Graviton, Raspberry
 * Pi), chosen at compile time from the target (make: -mcpu=native or -march=...). The
 * float32 products are Appendix B's, over NEON vectors; the int8 ones share its loop nest
 * (matmul_int8_tiled):
 *   PHI2_NEON          any aarch64 (NEON is part of Armv8-A): int8 matmul with widening
 *                      multiplies (vmull_s8 + vpadalq_s16)
 *   PHI2_NEON_DOTPROD  Armv8.2 dotprod (all Apple M, Snapdragon X, Graviton2+): int8 matmul
 *                      with SDOT, four int8 products summed into each int32 lane
 *   PHI2_NEON_I8MM     Armv8.6 i8mm (Apple M2+, Graviton3+): int8 matmul for batches with
 *                      SMMLA, a 2x8 by 8x2 int8 product into a 2x2 int32 block
 * Fallback chain: i8mm -> dotprod -> plain NEON -> the scalar kernels. As on x86, each
 * kernel is checked against its scalar twin by tests/test_kernels.c (make test-arm runs it
 * under qemu-aarch64 for every level). */
#if PHI2_NEON

/* int8 kernels (group == 64: four 16-byte vectors). Each group's int32 sum is exact, as in
 * the scalar kernel; it is then scaled by d_w * d_x and accumulated in float lanes, summed
 * at the end (the only difference from the scalar kernel: the order of the float sum).
 * Register tile: 4 rows x 2 tokens (8 int32 group sums + 8 float accumulators; the shapes
 * are with the trampolines in Appendix B). The tiles
 * go through matmul_int8_tiled (Appendix B): decode streams one row at a time. A build has
 * one family: SDOT where the target has dotprod, else widening multiplies (the Armv8.0
 * builds test those). */

/* acc plus the int32 sums of 4 adjacent products w[i] * x[i] per lane (16 products): one
 * SDOT, or with plain NEON a widening multiply to int16 (a pair of products is at most
 * 2 * 128 * 127 < 32767: exact) and a pairwise add into int32 (other lanes, same total). */
static ALWAYS_INLINE int32x4_t dot16(int32x4_t acc, int8x16_t w, int8x16_t x) {
#if PHI2_NEON_DOTPROD
    return vdotq_s32(acc, w, x);
#else
    return vpadalq_s16(acc, vmlal_high_s8(vmull_s8(vget_low_s8(w), vget_low_s8(x)), w, x));
#endif
}

static ALWAYS_INLINE void q8_tile(float *out, int out_stride, const int8_t *w, const float *wd, const int8_t *x,
                                       const float *xd, int cols, int n_groups, int R, int T, const float *bias) {
    float32x4_t acc[Q8_TILE_ROWS][Q8_TILE_TOKENS];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) acc[r][t] = vdupq_n_f32(0.0f);
    for (int g = 0; g < n_groups; g++) {
        int32x4_t isum[Q8_TILE_ROWS][Q8_TILE_TOKENS];
        for (int r = 0; r < R; r++)
            for (int t = 0; t < T; t++) isum[r][t] = vdupq_n_s32(0);
        for (int k = 0; k < 64; k += 16) {
            int8x16_t wv[Q8_TILE_ROWS], xv[Q8_TILE_TOKENS];
            for (int r = 0; r < R; r++) wv[r] = vld1q_s8(w + (size_t)r * cols + (size_t)g * 64 + k);
            for (int t = 0; t < T; t++) xv[t] = vld1q_s8(x + (size_t)t * cols + (size_t)g * 64 + k);
            for (int r = 0; r < R; r++)
                for (int t = 0; t < T; t++) isum[r][t] = dot16(isum[r][t], wv[r], xv[t]);
        }
        for (int r = 0; r < R; r++)
            for (int t = 0; t < T; t++)
                acc[r][t] = vfmaq_f32(acc[r][t], vcvtq_f32_s32(isum[r][t]),
                                      vdupq_n_f32(wd[(size_t)r * n_groups + g] * xd[(size_t)t * n_groups + g]));
    }
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) out[(size_t)t * out_stride + r] = vaddvq_f32(acc[r][t]) + bias[r];
}

/* q4: the 32 bytes of codes of one block as four vectors of 16 int8 weights (0..15, 16..31
 * from the low nibbles, 32..47, 48..63 from the high ones), looked up in Q4_LEVELS by tbl. */
static ALWAYS_INLINE void q4_decode_neon(const uint8_t *codes, int8x16_t levels, int8x16_t w[4]) {
    const uint8x16_t b0 = vld1q_u8(codes), b1 = vld1q_u8(codes + 16), nibble = vdupq_n_u8(15);
    w[0] = vqtbl1q_s8(levels, vandq_u8(b0, nibble));
    w[1] = vqtbl1q_s8(levels, vandq_u8(b1, nibble));
    w[2] = vqtbl1q_s8(levels, vshrq_n_u8(b0, 4));
    w[3] = vqtbl1q_s8(levels, vshrq_n_u8(b1, 4));
}

/* f32_from_f16 in one instruction (FCVT): AArch64 converts half to single in hardware. */
static ALWAYS_INLINE float f32_from_f16_fcvt(uint16_t bits) {
    __fp16 h;
    memcpy(&h, &bits, sizeof(h));
    return (float)h;
}

/* The q4 tile: each block's two groups get their own int32 sums and scales. The weights are
 * signed levels, so no offset correction is needed (xo: the x86 kernels'). */
static ALWAYS_INLINE void q4_tile(float *out, int out_stride, const uint8_t *w, const uint16_t *wd,
                                  const int8_t *x, const float *xd, const float *xo, int cols, int n_blocks,
                                  int R, int T, const float *bias) {
    (void)xo;
    float32x4_t acc[Q4_TILE_ROWS][Q4_TILE_TOKENS];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) acc[r][t] = vdupq_n_f32(0.0f);
    const int8x16_t levels = vld1q_s8(Q4_LEVELS);
    const size_t row_bytes = (size_t)cols / 2, row_scales = (size_t)cols / Q4_GROUP;
    for (int b = 0; b < n_blocks; b++) {
        int8x16_t wv[Q4_TILE_ROWS][4];
        float d0[Q4_TILE_ROWS], d1[Q4_TILE_ROWS];
        for (int r = 0; r < R; r++) {
            q4_decode_neon(w + (size_t)r * row_bytes + (size_t)b * (Q4_BLOCK / 2), levels, wv[r]);
            d0[r] = f32_from_f16_fcvt(wd[(size_t)r * row_scales + 2 * (size_t)b]);
            d1[r] = f32_from_f16_fcvt(wd[(size_t)r * row_scales + 2 * (size_t)b + 1]);
        }
        for (int t = 0; t < T; t++) {
            const int8_t *xb = x + (size_t)t * cols + (size_t)b * Q4_BLOCK;
            const int8x16_t x0 = vld1q_s8(xb), x1 = vld1q_s8(xb + 16), x2 = vld1q_s8(xb + 32), x3 = vld1q_s8(xb + 48);
            const float xs = xd[(size_t)t * n_blocks + b];
            for (int r = 0; r < R; r++) {
                const int32x4_t s0 = dot16(dot16(vdupq_n_s32(0), wv[r][0], x0), wv[r][1], x1);
                const int32x4_t s1 = dot16(dot16(vdupq_n_s32(0), wv[r][2], x2), wv[r][3], x3);
                acc[r][t] = vfmaq_f32(acc[r][t], vcvtq_f32_s32(s0), vdupq_n_f32(d0[r] * xs));
                acc[r][t] = vfmaq_f32(acc[r][t], vcvtq_f32_s32(s1), vdupq_n_f32(d1[r] * xs));
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) out[(size_t)t * out_stride + r] = vaddvq_f32(acc[r][t]) + bias[r];
}

/* Decode: the tile's one-row, one-token shape. */
static void q4_row(float *out, const uint8_t *w, const uint16_t *wd, const int8_t *x, const float *xd,
                   const float *xo, int n_blocks, const float *bias) {
    q4_tile(out, 1, w, wd, x, xd, xo, n_blocks * Q4_BLOCK, n_blocks, 1, 1, bias);
}

static void matmul_q4_simd(float *out, const QuantizedRows *in, const Matrix *W, const float *bias, int n_tokens) {
    matmul_int8_tiled(out, in, W, bias, n_tokens, q4_tile_any, Q4_TILE_ROWS, Q4_TILE_TOKENS);
}

#if PHI2_NEON_I8MM
/* SMMLA (Armv8.6 i8mm) for batches: vmmlaq_s32(acc, a, b) adds to the 2x2 int32 block acc
 * (lanes: [r0 t0, r0 t1, r1 t0, r1 t1]) the product of a = 8 bytes of row r0 then 8 bytes of
 * row r1 by b = 8 bytes of token t0 then 8 bytes of token t1. Two rows' (or tokens') 16-byte
 * vectors become two such operands by interleaving their 64-bit halves (zip1/zip2). One
 * SMMLA does 32 multiply-adds, twice an SDOT. Tile: 4 rows x 4 tokens = 2 x 2 blocks of 2x2.
 * A tile of 1 row or 1 token (leftovers, decode) goes to SDOT, which wastes nothing there. */
enum { Q8_R_I8MM = 4, Q8_T_I8MM = 4 };

static ALWAYS_INLINE void q8_tile_smmla(float *out, int out_stride, const int8_t *w, const float *wd,
                                        const int8_t *x, const float *xd, int cols, int n_groups, int R, int T,
                                        const float *bias) {
    // R, T even here: each pair of rows (tokens) is one operand of SMMLA
    float32x4_t acc[Q8_R_I8MM / 2][Q8_T_I8MM / 2];
    for (int i = 0; i < R / 2; i++)
        for (int j = 0; j < T / 2; j++) acc[i][j] = vdupq_n_f32(0.0f);
    for (int g = 0; g < n_groups; g++) {
        int32x4_t isum[Q8_R_I8MM / 2][Q8_T_I8MM / 2];
        for (int i = 0; i < R / 2; i++)
            for (int j = 0; j < T / 2; j++) isum[i][j] = vdupq_n_s32(0);
        for (int k = 0; k < 64; k += 16) {
            int8x16_t a_lo[Q8_R_I8MM / 2], a_hi[Q8_R_I8MM / 2], b_lo[Q8_T_I8MM / 2], b_hi[Q8_T_I8MM / 2];
            for (int i = 0; i < R / 2; i++) {
                const int64x2_t w0 = vreinterpretq_s64_s8(vld1q_s8(w + (size_t)(2 * i) * cols + (size_t)g * 64 + k));
                const int64x2_t w1 = vreinterpretq_s64_s8(vld1q_s8(w + (size_t)(2 * i + 1) * cols + (size_t)g * 64 + k));
                a_lo[i] = vreinterpretq_s8_s64(vzip1q_s64(w0, w1));
                a_hi[i] = vreinterpretq_s8_s64(vzip2q_s64(w0, w1));
            }
            for (int j = 0; j < T / 2; j++) {
                const int64x2_t x0 = vreinterpretq_s64_s8(vld1q_s8(x + (size_t)(2 * j) * cols + (size_t)g * 64 + k));
                const int64x2_t x1 = vreinterpretq_s64_s8(vld1q_s8(x + (size_t)(2 * j + 1) * cols + (size_t)g * 64 + k));
                b_lo[j] = vreinterpretq_s8_s64(vzip1q_s64(x0, x1));
                b_hi[j] = vreinterpretq_s8_s64(vzip2q_s64(x0, x1));
            }
            for (int i = 0; i < R / 2; i++)
                for (int j = 0; j < T / 2; j++)
                    isum[i][j] = vmmlaq_s32(vmmlaq_s32(isum[i][j], a_lo[i], b_lo[j]), a_hi[i], b_hi[j]);
        }
        for (int i = 0; i < R / 2; i++) {
            const float w0 = wd[(size_t)(2 * i) * n_groups + g], w1 = wd[(size_t)(2 * i + 1) * n_groups + g];
            const float32x4_t ws = {w0, w0, w1, w1};
            for (int j = 0; j < T / 2; j++) {
                const float x0 = xd[(size_t)(2 * j) * n_groups + g], x1 = xd[(size_t)(2 * j + 1) * n_groups + g];
                const float32x4_t xs = {x0, x1, x0, x1};
                acc[i][j] = vfmaq_f32(acc[i][j], vcvtq_f32_s32(isum[i][j]), vmulq_f32(ws, xs));
            }
        }
    }
    for (int i = 0; i < R / 2; i++)
        for (int j = 0; j < T / 2; j++) {
            float v[4];
            vst1q_f32(v, acc[i][j]);
            for (int l = 0; l < 4; l++) {
                const int r = 2 * i + (l >> 1), t = 2 * j + (l & 1);
                out[(size_t)t * out_stride + r] = v[l] + bias[r];
            }
        }
}

/* The tile shapes matmul_int8_tiled asks for (4 or 1 rows, 1 .. 4 tokens): even ones with
 * SMMLA, an odd last token through SDOT, single rows through SDOT. */
static void q8_tile_i8mm_any(float *out, int out_stride, const void *w, const void *wd, const int8_t *x,
                             const float *xd, const float *xo, int cols, int n_groups, int R, int T, const float *bias) {
    _Static_assert(Q8_R_I8MM == 4 && Q8_T_I8MM == 4, "q8_tile_i8mm_any lists the tiles of 4 rows x 4 tokens");
    if (R == 4 && T >= 2) {
        if (T >= 4) q8_tile_smmla(out, out_stride, w, wd, x, xd, cols, n_groups, 4, 4, bias);
        else q8_tile_smmla(out, out_stride, w, wd, x, xd, cols, n_groups, 4, 2, bias);
        const int done = T & ~1;
        if (T > done)  // an odd last token
            q8_tile(out + (size_t)done * out_stride, out_stride, w, wd, x + (size_t)done * cols,
                         xd + (size_t)done * n_groups, cols, n_groups, 4, 1, bias);
        return;
    }
    if (R != 1 && R != 4) bad_tile("q8_tile_i8mm", R, T);
    for (int t = 0; t < T; t += 2) {  // one row (or 4 rows, 1 token): SDOT
        const int n = T - t < 2 ? T - t : 2;
        q8_tile_any(out + (size_t)t * out_stride, out_stride, w, wd, x + (size_t)t * cols,
                         xd + (size_t)t * n_groups, xo, cols, n_groups, R, n, bias);
    }
}

#endif

/* matmul_q8_simd: SMMLA for batches where the build has i8mm; else, and for decode (one
 * token, memory-bound: nothing to gain), the SDOT or plain NEON tiles. */
static void matmul_q8_simd(float *out, const QuantizedRows *in, const Matrix *W, const float *bias, int n_tokens) {
#if PHI2_NEON_I8MM
    if (n_tokens > 1) {
        matmul_int8_tiled(out, in, W, bias, n_tokens, q8_tile_i8mm_any, Q8_R_I8MM, Q8_T_I8MM);
        return;
    }
#endif
    matmul_int8_tiled(out, in, W, bias, n_tokens, q8_tile_any, Q8_TILE_ROWS, Q8_TILE_TOKENS);
}

#endif /* PHI2_NEON */

/* ------------------------------------------------------------------------------------- */
/* Appendix D. Attention for a prompt batch: blocked, with an online softmax               */
/* ------------------------------------------------------------------------------------- */
/* attention_scalar (section 4) is the definition: for each query, a score against every
 * cached key, a softmax, a weighted sum of the values, one query and one key at a time. For
 * a prompt batch that re-reads all of a head's keys and values once per query, 80 numbers
 * at a time (widening f16 each time), and calls expf once per score: far more time than its
 * share of the multiply-adds. attention_blocked computes the same thing the way flash
 * attention does:
 *   - the batch's queries go in blocks of ATTN_QUERY_BLOCK consecutive positions of one
 *     head, and the keys and values in tiles of ATTN_KEY_TILE positions, so each tile is
 *     read from memory (and widened from f16) once per block, not once per query;
 *   - the scores of a tile are a small matrix product, keys x queries, and so is the
 *     weighted sum of its values; both go through one register-tiled loop (attn_product);
 *   - the softmax is online: each query keeps the running maximum of its scores and the
 *     running sum of exp(score - maximum), and when a tile raises the maximum, the sum and
 *     the partial output are scaled down by exp(old maximum - new maximum) before the
 *     tile's terms are added, so no query needs all its scores at once;
 *   - causality is a mask: key position k counts for the query at position p if k <= p.
 * A block is transposed: a row per dimension (or key), the block's queries across the
 * vector lanes, so the softmax bookkeeping is vectorized across queries too, and each
 * query's arithmetic is the same sequence of operations whatever block and lane it lands
 * in: attention_blocked gives the same bits for a position whatever batch it comes in
 * (tiles start at multiples of the tile length; masked terms add exact zeros).
 * Plain C that compilers vectorize (the exp is a polynomial, not a libm call); it differs
 * from attention_scalar by float rounding only (tests/test_kernels.c compares them). Decode
 * (one query) and batches under ATTN_BLOCKED_MIN_BATCH keep attention_scalar: a few queries
 * in 16 or 32 lanes would waste most of the work. */
enum {
    ATTN_QUERY_BLOCK = 64,  // queries per block: fewer read each key tile more often
    ATTN_KEY_TILE = 64,     // key positions per tile: the tile and its scores stay in L1
};
/* The register tile of the products: rows x columns of accumulators, as many as the vector
 * registers hold with room for a row of B and a broadcast (fewer leave FMA latency exposed). */
#if PHI2_AVX512
enum { ATTN_TILE_ROWS = 8, ATTN_TILE_COLS = 32 };  // 16 of the 32 zmm registers
#else
enum { ATTN_TILE_ROWS = 6, ATTN_TILE_COLS = 16 };  // AVX2: 12 of the 16 ymm registers; NEON: 24 of 32
#endif
_Static_assert(ATTN_QUERY_BLOCK % ATTN_TILE_COLS == 0, "a query block is whole rows of vector lanes");

/* exp(x), from Cephes' expf polynomial (the one exp_avx2 uses, within 2 ulp), in plain C that
 * compilers vectorize in a loop, unlike a call to expf. x is first clamped to [-87, 87] on its
 * bit pattern (negative floats: the larger the pattern, the larger the magnitude), with
 * integer comparisons: gcc does not vectorize a float comparison followed by arithmetic
 * unless told that float comparisons cannot trap. So exp(-inf) is exp(-87), 1.6e-38. */
static ALWAYS_INLINE float exp_poly(float x) {
    uint32_t bits;
    memcpy(&bits, &x, sizeof(bits));
    bits = bits > 0xc2ae0000u ? 0xc2ae0000u : bits;                          // below -87.0f
    bits = (int32_t)bits > (int32_t)0x42ae0000 ? 0x42ae0000u : bits;         // above 87.0f
    memcpy(&x, &bits, sizeof(x));
    const float round = 12582912.0f;  // 1.5 x 2^23: adding it leaves an integer in the low mantissa bits
    const float t = x * 1.44269504088896341f + round, n = t - round;  // n = x / ln 2 to the nearest integer
    float r = x - n * 0.693359375f;                                   // x - n ln 2, in two parts
    r = r - n * -2.12194440e-4f;
    float y = 1.9875691500e-4f;
    y = y * r + 1.3981999507e-3f;
    y = y * r + 8.3334519073e-3f;
    y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f;
    y = y * r + 5.0000001201e-1f;
    y = y * (r * r) + (r + 1.0f);
    uint32_t t_bits;
    memcpy(&t_bits, &t, sizeof(t_bits));
    const uint32_t two_n_bits = (t_bits - 0x4b400000u + 127u) << 23;  // 2^n: n + 127 in the exponent field
    float two_n;
    memcpy(&two_n, &two_n_bits, sizeof(two_n));
    return y * two_n;
}

/* softmax_scalar with exp_poly for expf, in loops that compilers vectorize: decode's
 * attention computes an exponential per cached position per head (2 million per token at
 * depth 1,900 in Phi-2), and a libm call each is a large share of its time. */
MAYBE_UNUSED static void softmax_poly(float *x, int n) {  // (a portable build runs softmax_scalar)
    float max = x[0];
    for (int i = 1; i < n; i++) max = fmaxf(max, x[i]);
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int i = 0; i < n; i++) {
        x[i] = exp_poly(x[i] - max);
        sum += x[i];
    }
    const float inv_sum = 1.0f / sum;
    for (int i = 0; i < n; i++) x[i] *= inv_sum;
}

/* gelu_new as 0.5 v (1 + tanh(u)) = v / (1 + exp(-2u)), with exp_poly for the libm tanhf
 * of the definition (a call per value, a large share of a prompt's time otherwise). It
 * agrees with gelu_new_scalar within a few float ulps (tests/test_kernels.c). */
MAYBE_UNUSED static void gelu_new_poly(float *x, size_t n) {  // (a portable build runs gelu_new_scalar)
    const float minus_2k = -2.0f * 0.7978845608028654f;  // -2 sqrt(2 / pi)
#pragma omp simd
    for (size_t i = 0; i < n; i++) {
        const float v = x[i];
        x[i] = v / (1.0f + exp_poly(minus_2k * (v + 0.044715f * v * v * v)));
    }
}

/* One register tile of C = C diag(c_scale) + A B: rows (a constant, <= ATTN_TILE_ROWS) rows of
 * C, ATTN_TILE_COLS columns; c_scale NULL: C = A B. A's element (m, k) is A[m * a_row + k *
 * a_col], B's rows are b_stride apart. The accumulators stay in registers through the k loop;
 * each row of B, loaded once, serves every row of the tile. (The pragma asks for the column
 * loop to be vectorized as written: gcc would otherwise unroll it first, then vectorize it
 * badly.) */
static ALWAYS_INLINE void attn_tile(float *C, int c_stride, const float *c_scale, const float *A, int a_row, int a_col,
                                    const float *B, int b_stride, int K, int rows) {
    float acc[ATTN_TILE_ROWS][ATTN_TILE_COLS];
    for (int m = 0; m < rows; m++)
        for (int n = 0; n < ATTN_TILE_COLS; n++) acc[m][n] = c_scale ? C[(size_t)m * c_stride + n] * c_scale[n] : 0.0f;
    for (int k = 0; k < K; k++) {
        const float *b = B + (size_t)k * b_stride;
        for (int m = 0; m < rows; m++) {
            const float a = A[(size_t)m * a_row + (size_t)k * a_col];
#pragma omp simd
            for (int n = 0; n < ATTN_TILE_COLS; n++) acc[m][n] += a * b[n];
        }
    }
    for (int m = 0; m < rows; m++)
        for (int n = 0; n < ATTN_TILE_COLS; n++) C[(size_t)m * c_stride + n] = acc[m][n];
}

/* C[M x N] = C diag(c_scale) + A[M x K] B[K x N] (c_scale NULL: C = A B), N a multiple of
 * ATTN_TILE_COLS, A strided as in attn_tile. Every element of C is its own chain of
 * multiply-adds over k in order, whichever tile computes it. */
static void attn_product(float *C, int c_stride, const float *c_scale, const float *A, int a_row, int a_col,
                         const float *B, int b_stride, int M, int K, int N) {
    for (int n0 = 0; n0 < N; n0 += ATTN_TILE_COLS) {
        const float *scale = c_scale ? c_scale + n0 : NULL;
        int m = 0;
        for (; m + ATTN_TILE_ROWS <= M; m += ATTN_TILE_ROWS)
            attn_tile(C + (size_t)m * c_stride + n0, c_stride, scale, A + (size_t)m * a_row, a_row, a_col, B + n0,
                      b_stride, K, ATTN_TILE_ROWS);
        for (; m < M; m++)
            attn_tile(C + (size_t)m * c_stride + n0, c_stride, scale, A + (size_t)m * a_row, a_row, a_col, B + n0,
                      b_stride, K, 1);
    }
}

/* Floats of scratch one thread needs for attention_blocked (RunState.attn_scratch). */
static size_t attn_scratch_floats(const Config *c) {
    const size_t hd = (size_t)c->head_dim, QB = ATTN_QUERY_BLOCK, KT = ATTN_KEY_TILE;
    return mul_size(hd, 2 * QB + 2 * KT) + KT * QB + 3 * QB;
}

/* One head, queries t0 .. t0+n_q-1 of the batch (n_q <= ATTN_QUERY_BLOCK), into s->att.
 * The blocks are transposed: a row per dimension (or key), a column per query. */
static void attention_block(RunState *s, const Config *c, int layer, int head, int pos0, int t0, int n_q,
                            float *scratch) {
    const int H = c->hidden_dim, hd = c->head_dim, QB = ATTN_QUERY_BLOCK, KT = ATTN_KEY_TILE;
    const int n_cols = (n_q + ATTN_TILE_COLS - 1) / ATTN_TILE_COLS * ATTN_TILE_COLS;  // queries, padded
    const int first = pos0 + t0, n_keys = first + n_q;  // query i is at position first + i
    const size_t elem_size = s->kv_type == KV_F16 ? sizeof(uint16_t) : sizeof(float);
    float *q = scratch;                      // [hd][QB] the queries, scaled by 1/sqrt(hd)
    float *out = q + (size_t)hd * QB;        // [hd][QB] the weighted sums of values so far
    float *keys = out + (size_t)hd * QB;     // [KT][hd] a tile of keys as floats
    float *values = keys + (size_t)KT * hd;  // [KT][hd] and of values
    float *p = values + (size_t)KT * hd;     // [KT][QB] a tile's scores, then exp(score - max)
    float *run_max = p + (size_t)KT * QB, *run_sum = run_max + QB, *rescale = run_sum + QB;  // [QB] each

    const float scale = 1.0f / sqrtf((float)hd);
    for (int d = 0; d < hd; d++)
        for (int i = 0; i < n_cols; i++)
            q[(size_t)d * QB + i] = i < n_q ? s->qkv[(size_t)(t0 + i) * 3 * H + (size_t)head * hd + d] * scale : 0.0f;
    memset(out, 0, (size_t)hd * QB * sizeof(float));
    for (int i = 0; i < n_cols; i++) run_max[i] = -INFINITY, run_sum[i] = 0.0f;

    // A head's positions are contiguous rows of hd numbers in each cache.
    const unsigned char *key_rows = (const unsigned char *)s->key_cache + kv_offset(s, c, layer, head, 0) * elem_size;
    const unsigned char *value_rows = (const unsigned char *)s->value_cache + kv_offset(s, c, layer, head, 0) * elem_size;
    const size_t row_bytes = (size_t)hd * elem_size;
    for (int k0 = 0; k0 < n_keys; k0 += KT) {
        const int n_tile = n_keys - k0 < KT ? n_keys - k0 : KT;
        if (s->kv_type == KV_F16) {
            f16_to_f32_row(keys, (const uint16_t *)(key_rows + k0 * row_bytes), n_tile * hd);
            f16_to_f32_row(values, (const uint16_t *)(value_rows + k0 * row_bytes), n_tile * hd);
        } else {
            memcpy(keys, key_rows + k0 * row_bytes, n_tile * row_bytes);
            memcpy(values, value_rows + k0 * row_bytes, n_tile * row_bytes);
        }
        // Ask for the next tile now: the memory reads overlap this tile's arithmetic.
        const int n_next = n_keys - k0 - n_tile < KT ? n_keys - k0 - n_tile : KT;
        for (size_t b = 0; b < (size_t)n_next * row_bytes; b += 64) {
            __builtin_prefetch(key_rows + (k0 + KT) * row_bytes + b);
            __builtin_prefetch(value_rows + (k0 + KT) * row_bytes + b);
        }

        // Scores: p[j][i] = key j . query i.
        attn_product(p, QB, NULL, keys, hd, 1, q, QB, n_tile, hd, n_cols);
        // Online softmax. Key k0 + j counts for query i if k0 + j <= first + i; a tile before
        // the block's first position counts whole for every query.
        const int diagonal = first - k0, whole = n_tile - 1 <= diagonal;
        for (int i = 0; i < n_cols; i++) rescale[i] = -INFINITY;  // the tile's maximum, for now
        for (int j = 0; j < n_tile; j++)
            for (int i = 0; i < n_cols; i++) {
                const float v = whole || j - i <= diagonal ? p[(size_t)j * QB + i] : -INFINITY;
                rescale[i] = v > rescale[i] ? v : rescale[i];
            }
        for (int i = 0; i < n_cols; i++) {
            const float new_max = rescale[i] > run_max[i] ? rescale[i] : run_max[i];
            rescale[i] = exp_poly(run_max[i] - new_max);  // 1 if the maximum stays
            run_max[i] = new_max;
            run_sum[i] *= rescale[i];
        }
        for (int j = 0; j < n_tile; j++)
            for (int i = 0; i < n_cols; i++) {
                float *pj = p + (size_t)j * QB;
                const float e = exp_poly(pj[i] - run_max[i]);  // (computed either way: a select vectorizes)
                pj[i] = whole || j - i <= diagonal ? e : 0.0f;
                run_sum[i] += pj[i];
            }
        // out[d][i] = out[d][i] * rescale[i] + sum_j value j [d] * p[j][i]
        attn_product(out, QB, rescale, values, 1, hd, p, QB, hd, n_tile, n_cols);
    }
    for (int i = 0; i < n_q; i++) {
        float *o = s->att + (size_t)(t0 + i) * H + (size_t)head * hd;
        for (int d = 0; d < hd; d++) o[d] = out[(size_t)d * QB + i] / run_sum[i];
    }
}

/* attention_scalar for a batch, in blocks: threads take (query block, head) pairs, the blocks
 * of the latest positions (the most keys) first. */
MAYBE_UNUSED static void attention_blocked(RunState *s, const Config *c, int layer, int pos0, int n_tokens) {
    const int n_blocks = (n_tokens + ATTN_QUERY_BLOCK - 1) / ATTN_QUERY_BLOCK, n_heads = c->n_heads;
#pragma omp parallel for schedule(dynamic, 1)
    for (int w = 0; w < n_blocks * n_heads; w++) {
        const int block = n_blocks - 1 - w / n_heads, head = w % n_heads, t0 = block * ATTN_QUERY_BLOCK;
        float *scratch = s->attn_scratch + (size_t)team_thread() * s->attn_scratch_floats;
        attention_block(s, c, layer, head, pos0, t0, n_tokens - t0 < ATTN_QUERY_BLOCK ? n_tokens - t0 : ATTN_QUERY_BLOCK,
                        scratch);
    }
}

/* ------------------------------------------------------------------------------------- */
/* Appendix E. Dispatch: the kernel for each operation, and its threads                   */
/* ------------------------------------------------------------------------------------- */
/* The operations declared at the end of section 3, defined once: which kernel runs is
 * decided here and nowhere else, by the build's instruction sets (Appendix A), and so is
 * how the work is shared among threads. */
#if PHI2_F16_VEC
static void f32_to_f16_row(uint16_t *out, const float *x, int n) { f32_to_f16_row_vec(out, x, n); }
static void f16_to_f32_row(float *out, const uint16_t *x, int n) { f16_to_f32_row_vec(out, x, n); }
static float dot_f32_f16(const float *a, const uint16_t *b, int n) { return dot_f32_f16_vec(a, b, n); }
static void axpy_f16(float *out, float w, const uint16_t *v, int n) { axpy_f16_vec(out, w, v, n); }
#else
static void f32_to_f16_row(uint16_t *out, const float *x, int n) { f32_to_f16_row_scalar(out, x, n); }
static void f16_to_f32_row(float *out, const uint16_t *x, int n) { f16_to_f32_row_scalar(out, x, n); }
static float dot_f32_f16(const float *a, const uint16_t *b, int n) { return dot_f32_f16_scalar(a, b, n); }
static void axpy_f16(float *out, float w, const uint16_t *v, int n) { axpy_f16_scalar(out, w, v, n); }
#endif

/* softmax and gelu_new with a polynomial exp that vectorizes (Appendix D), or the
 * definitions' libm calls. */
static void softmax(float *x, int n) {
#ifdef PHI2_SCALAR_ONLY
    softmax_scalar(x, n);
#else
    softmax_poly(x, n);
#endif
}

static void gelu_new_span(float *x, size_t n) {
#ifdef PHI2_SCALAR_ONLY
    gelu_new_scalar(x, n);
#else
    gelu_new_poly(x, n);
#endif
}

/* gelu_new over n values, split over the threads for a prompt's batch. */
static void gelu_new(float *x, size_t n) {
    const size_t chunk = 4096;  // values per task: a few microseconds of work
#pragma omp parallel for schedule(dynamic) if (n >= 4 * chunk)
    for (size_t i = 0; i < n; i += chunk) gelu_new_span(x + i, n - i < chunk ? n - i : chunk);
}

/* A head's scores and weighted sum over an f16 cache: the vector kernels for Phi-2's head
 * size; other sizes, and portable builds, the definitions' loops over dot and axpy. */
static void scores_f16(float *score, const float *q, const uint16_t *keys, int n_pos, int hd, float scale) {
#if PHI2_F16_VEC
    if (hd == VEC_FLOATS * HEAD_VECTORS) {
        scores_f16_vec(score, q, keys, n_pos, scale);
        return;
    }
#endif
    for (int p = 0; p < n_pos; p++) score[p] = dot_f32_f16(q, keys + (size_t)p * hd, hd) * scale;
}

static void weighted_sum_f16(float *out, const float *weight, const uint16_t *values, int n_pos, int hd) {
#if PHI2_F16_VEC
    if (hd == VEC_FLOATS * HEAD_VECTORS) {
        weighted_sum_f16_vec(out, weight, values, n_pos);
        return;
    }
#endif
    memset(out, 0, (size_t)hd * sizeof(float));
    for (int p = 0; p < n_pos; p++) axpy_f16(out, weight[p], values + (size_t)p * hd, hd);
}

/* Activation rows to int8: tokens are independent, so a batch's are split over the threads. */
static void quantize_rows_q8(QuantizedRows *out, const float *x, int n_tokens, int cols) {
#pragma omp parallel for if (n_tokens > 1)
    for (int t = 0; t < n_tokens; t++) {
        QuantizedRows row = {out->q + (size_t)t * cols, out->scale + (size_t)t * (cols / Q8_GROUP), NULL};
#if PHI2_AVX512 || PHI2_AVX2 || PHI2_NEON
        quantize_rows_q8_vec(&row, x + (size_t)t * cols, 1, cols);
#else
        quantize_rows_q8_scalar(&row, x + (size_t)t * cols, 1, cols);
#endif
    }
}

/* The product of a batch (or of one token's rows r0 .. r1, given as a matrix of their own)
 * by the fastest kernel for W's type and the batch's size. The kernels of a batch share
 * their rows among OpenMP's threads themselves. */
static void product(float *out, const float *in, const QuantizedRows *xq, const Matrix *W, const float *bias,
                    int n_tokens, KernelScratch *k) {
    (void)k;  // (builds without panels or AMX)
    if (W->type == WEIGHTS_F32) {
#if PHI2_AVX512 || PHI2_AVX2
        if (n_tokens >= F32_PANEL_MIN_TOKENS) matmul_f32_panels(out, in, W, bias, n_tokens, k);
        else matmul_f32_tiles(out, in, W, bias, n_tokens);
#elif PHI2_NEON
        matmul_f32_tiles(out, in, W, bias, n_tokens);
#else
        matmul_f32_scalar(out, in, W, bias, n_tokens);
#endif
        return;
    }
#if PHI2_AMX
    if (W->type == WEIGHTS_Q8 && n_tokens >= AMX_MIN_TOKENS && amx_available(k)) {
        matmul_q8_amx(out, xq, W, bias, n_tokens, k);
        return;
    }
#endif
#if PHI2_PANELS
    if (n_tokens >= PANEL_MIN_TOKENS) {
        matmul_int8_panels(out, xq, W, bias, n_tokens, k);
        return;
    }
#endif
#if PHI2_Q8_SIMD
    if (W->type == WEIGHTS_Q8) matmul_q8_simd(out, xq, W, bias, n_tokens);
    else matmul_q4_simd(out, xq, W, bias, n_tokens);
#else
    if (W->type == WEIGHTS_Q8) matmul_q8_scalar(out, xq, W, bias, n_tokens);
    else matmul_q4_scalar(out, xq, W, bias, n_tokens);
#endif
}

/* One token's product, a chunk of rows at a time (a pool_run job). */
typedef struct {
    const float *in;       // [cols] the token's activations (f32 files)
    const Matrix *W;
    const float *bias;
    KernelScratch *k;      // k->xq: the activations quantized (q8 and q4 files)
    int rows_per_chunk;
} RowsJob;

static void product_rows(const void *args, int chunk, float *buffer, int thread) {
    (void)thread;
    const RowsJob *job = args;
    const int r0 = chunk * job->rows_per_chunk, end = r0 + job->rows_per_chunk;
    const Matrix rows = matrix_rows(job->W, r0, end < job->W->rows ? end : job->W->rows);
    product(buffer, job->in, &job->k->xq, &rows, job->bias + r0, 1, job->k);
}

/* Rows per chunk for one token: tiles_per_chunk with tiles of 16 rows (every kernel's tile
 * height divides 16). */
static int rows_per_chunk(const Matrix *W, int n_threads) {
    const int rows = 16 * tiles_per_chunk((W->rows + 15) / 16, 16 * matrix_row_bytes(W), n_threads);
    return rows < W->rows ? rows : W->rows;
}

static void matmul(float *out, const float *in, const Matrix *W, const float *bias, int n_tokens, KernelScratch *k) {
    if (W->type != WEIGHTS_F32) quantize_rows_q8(&k->xq, in, n_tokens, W->cols);
    if (n_tokens > 1 || pool_threads(k->pool) == 1) {
        product(out, in, &k->xq, W, bias, n_tokens, k);
        return;
    }
    const RowsJob job = {in, W, bias, k, rows_per_chunk(W, pool_threads(k->pool))};
    pool_run(k->pool, product_rows, &job, (W->rows + job.rows_per_chunk - 1) / job.rows_per_chunk,
             job.rows_per_chunk, out, (size_t)W->rows);
}

/* One token's attention, a head at a time (a pool_run job: chunk = head). */
typedef struct {
    const RunState *s;
    const Config *c;
    int layer, pos;
} HeadsJob;

static void attend_head(const void *args, int head, float *buffer, int thread) {
    const HeadsJob *job = args;
    const RunState *s = job->s;
    attend(s, job->c, job->layer, head, job->pos, s->qkv + (size_t)head * job->c->head_dim, buffer,
           s->scores + (size_t)thread * s->ctx);
}

/* A generated token's heads go to the pool; a prompt's batch is blocked (Appendix D) once
 * it has ATTN_BLOCKED_MIN_BATCH positions, below which the blocks would be mostly empty
 * vector lanes. */
enum { ATTN_BLOCKED_MIN_BATCH = 6 };

static void attention(RunState *s, const Config *c, int layer, int pos0, int n_tokens) {
    if (n_tokens == 1 && pool_threads(s->kern->pool) > 1) {
        const HeadsJob job = {s, c, layer, pos0};
        pool_run(s->kern->pool, attend_head, &job, c->n_heads, c->head_dim, s->att, (size_t)c->hidden_dim);
        return;
    }
#ifndef PHI2_SCALAR_ONLY
    if (n_tokens >= ATTN_BLOCKED_MIN_BATCH) {
        attention_blocked(s, c, layer, pos0, n_tokens);
        return;
    }
#endif
    attention_scalar(s, c, layer, pos0, n_tokens);
}

static KernelScratch *kernel_scratch_create(const Config *c, int max_batch, int n_threads) {
    const size_t H = (size_t)c->hidden_dim, F = (size_t)c->ffn_dim, B = (size_t)max_batch;
    KernelScratch *k = xcalloc(1, sizeof(*k));
    const size_t widest_out = (size_t)c->vocab_size > 3 * H ? (size_t)c->vocab_size : 3 * H;  // pool_run's largest job
    k->pool = pool_create(n_threads, widest_out > F ? widest_out : F);
    const size_t widest_in = H > F ? H : F;
    k->xq.q = xmalloc_aligned(mul_size(B, widest_in));
    k->xq.scale = xmalloc_aligned(mul_size(B * (widest_in / Q8_GROUP + 1), sizeof(float)));
    k->xq.q4_offset = xmalloc_aligned(mul_size(B * (widest_in / Q4_GROUP + 1), sizeof(float)));
    return k;
}

static void kernel_scratch_free(KernelScratch *k) {
    if (!k) return;
    pool_destroy(k->pool);  // (joins the pool's threads)
    free_aligned(k->xq.q); free_aligned(k->xq.scale); free_aligned(k->xq.q4_offset);
    free_aligned(k->amx_pack); free_aligned(k->panel);
    free(k);
}

static void kernel_description(char *out, size_t size, KernelScratch *k, int weight_type) {
#if defined(__x86_64__) || defined(_M_X64)
#define PHI2_ARCH "x86-64"
#elif defined(__aarch64__) || defined(_M_ARM64)
#define PHI2_ARCH "arm64"
#else
#define PHI2_ARCH "cpu"
#endif
#if PHI2_AVX512
    const char *f32 = PHI2_ARCH " avx512";
#elif PHI2_AVX2
    const char *f32 = PHI2_ARCH " avx2+fma";
#elif PHI2_NEON
    const char *f32 = PHI2_ARCH " neon";
#else
    const char *f32 = PHI2_ARCH " scalar";
#endif
    KernelScratch probe = {0};  // -v: no model loaded, so no scratch yet
    if (!k) k = &probe;
    (void)k;
    if (weight_type == WEIGHTS_F32) {
        snprintf(out, size, "%s", f32);
        return;
    }
#if PHI2_AMX
    const char *int8 = amx_available(k) ? "vnni+amx" : "vnni";
#elif PHI2_AVX512
    const char *int8 = "vnni";
#elif PHI2_AVX2 && defined(__AVXVNNI__)
    const char *int8 = "avx-vnni";
#elif PHI2_AVX2
    const char *int8 = "avx2";
#elif PHI2_NEON_I8MM
    const char *int8 = "dotprod+i8mm";
#elif PHI2_NEON_DOTPROD
    const char *int8 = "dotprod";
#elif PHI2_NEON
    const char *int8 = "neon";
#else
    const char *int8 = "scalar";
#endif
    snprintf(out, size, "%s, %s %s", f32, weight_type == WEIGHTS_Q4 ? "q4" : "int8", int8);
#undef PHI2_ARCH
}

/* ------------------------------------------------------------------------------------- */
/* Appendix F. Platform: files, memory, signals, clock; AMX permission                   */
/* ------------------------------------------------------------------------------------- */
/* Everything the operating system does differently, behind the functions declared in
 * sections 1 and 2: POSIX (Linux, macOS) first, then Windows (MinGW-w64). */
#ifndef _WIN32

static void setup_process(int *argc, char ***argv) {
    (void)argc, (void)argv;    // POSIX passes arguments as UTF-8 already (Windows converts them)
    signal(SIGPIPE, SIG_IGN);  // a closed stdout becomes EPIPE (flush_stdout) instead of a kill
}

static FILE *fopen_path(const char *path, const char *mode) { return fopen(path, mode); }

/* Between two parallel loops OpenMP's idle threads spin by default before they sleep
 * (GCC's libgomp for about 3 ms, LLVM's libomp for 200 ms), and on a core that another
 * program is using a spinning thread burns its time slices waiting: the scheduler then lets
 * it run late, and the parallel loop waits for it. OpenMP runs the prompt's batches (a
 * generated token's steps run on the pool of Appendix G, whose threads spin for
 * POOL_SPIN_SECONDS, then sleep). A short spin keeps an idle machine's speed and a busy
 * core's (docs/PERFORMANCE.md). So GCC builds (libgomp) spin briefly, then sleep; LLVM's
 * libomp counts in milliseconds: it sleeps at once
 * (OMP_WAIT_POLICY=passive). The runtimes read these from the environment: libomp when
 * first used, libgomp when the program starts, so with libgomp (GCC on Linux) we start the
 * program again with it set (same process, same arguments). A policy the user set wins
 * (OMP_WAIT_POLICY, or GOMP_SPINCOUNT / KMP_BLOCKTIME, the runtimes' own spin settings). */
static void use_sleeping_thread_wait(char **argv) {
#ifdef _OPENMP
    if (getenv("OMP_WAIT_POLICY") || getenv("GOMP_SPINCOUNT") || getenv("KMP_BLOCKTIME")) return;
#if defined(__clang__)
    if (setenv("OMP_WAIT_POLICY", "passive", 1) != 0) return;
#else
    if (setenv("GOMP_SPINCOUNT", "1000", 1) != 0) return;
#endif
#if defined(__linux__) && !defined(__clang__)
    execv("/proc/self/exe", argv);  // returns only if it failed (e.g. no /proc): then threads spin
#endif
#endif
    (void)argv;
}

static int remove_path(const char *path) { return unlink(path); }

static void catch_termination_signals(void (*handler)(int)) {
    signal(SIGINT, handler);
    signal(SIGTERM, handler);
    signal(SIGHUP, handler);
}

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* 64-byte aligned allocation, so SIMD loads of activation rows never split cache lines. */
static void *xmalloc_aligned(size_t n) {
    void *p = NULL;
    if (posix_memalign(&p, 64, n ? n : 64) != 0) die("out of memory allocating %zu bytes", n);
    return p;
}

static void free_aligned(void *p) { free(p); }

/* The KV cache: in huge pages where the kernel has them (2 MB: one page fault, one TLB entry
 * and, on a virtual machine, one shadow mapping where 4 KB pages need 512), put in place
 * now rather than as a prompt's keys and values (or a --prompt-cache file) first land there.
 * MADV_POPULATE_WRITE (Linux 5.14) does that after the hint, a huge page at a time on every
 * thread (a virtual machine's host backs fresh memory on the thread that touches it);
 * MAP_POPULATE would do it before the hint, in 4 KB pages. Older kernels fault the pages
 * in as they are written. */
static void *xmalloc_prefaulted(size_t n) {
#if defined(__linux__)
    void *p = mmap(NULL, n ? n : 1, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) die("out of memory allocating %zu bytes", n);
#ifdef MADV_HUGEPAGE
    madvise(p, n ? n : 1, MADV_HUGEPAGE);  // hints: without them it still works
#endif
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23  // (older headers)
#endif
    const size_t huge = (size_t)2 << 20, n_huge = (n + huge - 1) / huge;
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n_huge; i++) madvise((char *)p + i * huge, n - i * huge < huge ? n - i * huge : huge, MADV_POPULATE_WRITE);
    return p;
#else
    return xcalloc(1, n ? n : 1);  // (64-byte aligned by glibc and macOS for large blocks)
#endif
}

static void free_prefaulted(void *p, size_t n) {
#if defined(__linux__)
    if (p) munmap(p, n ? n : 1);
#else
    (void)n;
    free(p);
#endif
}

static FILE *create_partial_file(const char *path) { return fopen(path, "wb"); }

static int replace_file(const char *from, const char *to) { return rename(from, to); }

static int reader_gone(int err) { return err == EPIPE; }

static int is_terminal(FILE *f) { return isatty(fileno(f)); }

/* sigaction without SA_RESTART: signal() would restart an interrupted read of stdin (glibc,
 * BSD), so Ctrl-C at the prompt of -i would not return until a line was typed. */
static void catch_interrupts(void (*handler)(int)) {
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = handler;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
}

/* The default thread count: one thread per performance core, one per physical core (SMT
 * siblings share a core's caches and memory bandwidth; decode gains little from them), on
 * the CPUs this process may run on. Linux says which cores are which in /sys:
 *   - Intel hybrid parts list their performance cores in /sys/devices/cpu_core/cpus;
 *   - elsewhere (Arm big.LITTLE) the cores' highest clocks tell the kinds apart
 *     (cpufreq/cpuinfo_max_freq; below 80% of the fastest: an efficiency core, while a few
 *     percent apart are equal cores that boost differently);
 *   - topology/thread_siblings_list names the logical CPUs of one physical core.
 * The CPUs allowed come from /proc/self/status (the affinity mask: taskset, cgroups).
 * Test builds can read a fake /sys tree of another machine instead (test_root), whose CPUs
 * are then those of its devices/system/cpu/online (the running process's mask does not
 * apply to it). Whatever cannot be read counts as "no information": all allowed CPUs. */
/* Test builds only: a directory that stands in for / when reading /sys and /proc/meminfo
 * (PHI2_SYSFS_ROOT), so tests can show the program another machine; NULL: the real ones. */
MAYBE_UNUSED static const char *test_root(void) {
#ifdef PHI2_TEST_HOOKS
    return getenv("PHI2_SYSFS_ROOT");
#else
    return NULL;
#endif
}

#if defined(__linux__)
enum { MAX_CPUS = 4096 };

/* Parse a kernel CPU list ("0-3,8,10-11\n") into set[] (CPUs >= MAX_CPUS are ignored);
 * returns how many CPUs it names, or -1 if it is not one. */
static int parse_cpu_list(const char *text, unsigned char *set) {
    int count = 0;
    memset(set, 0, MAX_CPUS);
    for (const char *p = text; *p && *p != '\n';) {
        char *end;
        long lo = strtol(p, &end, 10), hi = lo;
        if (end == p || lo < 0) return -1;
        if (*end == '-') {
            p = end + 1;
            hi = strtol(p, &end, 10);
            if (end == p || hi < lo) return -1;
        }
        for (long c = lo; c <= hi && c < MAX_CPUS; c++) count += !set[c], set[c] = 1;
        p = *end == ',' ? end + 1 : end;
        if (*end != ',' && *end != '\n' && *end != '\0') return -1;
    }
    return count;
}

/* The first line of root + path (at most size - 1 bytes), or 0 if it cannot be read. */
static int read_line(const char *root, const char *path, char *line, int size) {
    char full[PATH_MAX];
    if (snprintf(full, sizeof(full), "%s%s", root, path) >= (int)sizeof(full)) return 0;
    FILE *f = fopen(full, "r");
    if (!f) return 0;
    const int ok = fgets(line, size, f) != NULL;
    fclose(f);
    return ok;
}

static int read_cpu_list(const char *root, const char *path, unsigned char *set) {
    enum { LINE_MAX_BYTES = 1 << 16 };  // a list of thousands of CPUs can be long
    char *line = xmalloc(LINE_MAX_BYTES);
    const int n = read_line(root, path, line, LINE_MAX_BYTES) ? parse_cpu_list(line, set) : -1;
    free(line);
    return n;
}

static long long cpu_max_freq(const char *root, int cpu) {
    char path[128], line[64];
    snprintf(path, sizeof(path), "/sys/devices/system/cpu/cpu%d/cpufreq/cpuinfo_max_freq", cpu);
    return read_line(root, path, line, sizeof(line)) ? atoll(line) : 0;
}

MAYBE_UNUSED static int count_fast_cores(const char **which) {
    const char *root = test_root();
    unsigned char *cpus = xcalloc(3, MAX_CPUS), *listed = cpus + MAX_CPUS, *siblings = cpus + 2 * MAX_CPUS;
    int n = -1;
    if (root) {
        n = read_cpu_list(root, "/sys/devices/system/cpu/online", cpus);
    } else {
        root = "";
        FILE *f = fopen("/proc/self/status", "r");
        char line[4096];
        while (f && fgets(line, sizeof(line), f))
            if (!strncmp(line, "Cpus_allowed_list:", 18)) n = parse_cpu_list(line + 18 + strspn(line + 18, " \t"), cpus);
        if (f) fclose(f);
    }
    if (n <= 0) {  // no /proc: every online CPU
        long online = sysconf(_SC_NPROCESSORS_ONLN);
        free(cpus);
        *which = "all cores";
        return online > 0 && online < INT_MAX ? (int)online : 1;
    }
    *which = "all cores";
    int n_fast = 0;
    if (read_cpu_list(root, "/sys/devices/cpu_core/cpus", listed) > 0) {  // Intel hybrid
        for (int c = 0; c < MAX_CPUS; c++) n_fast += cpus[c] && listed[c];
        if (n_fast > 0 && n_fast < n) {
            for (int c = 0; c < MAX_CPUS; c++) cpus[c] &= listed[c];
            *which = "performance cores";
        }
    } else {
        long long top = 0;
        for (int c = 0; c < MAX_CPUS; c++)
            if (cpus[c]) {
                long long f = cpu_max_freq(root, c);
                if (f > top) top = f;
            }
        for (int c = 0; c < MAX_CPUS; c++) {  // a CPU without a clock to read counts as fast
            const long long f = cpus[c] ? cpu_max_freq(root, c) : 0;
            listed[c] = cpus[c] && (f == 0 || f * 5 >= top * 4);
        }
        for (int c = 0; c < MAX_CPUS; c++) n_fast += listed[c];
        if (n_fast > 0 && n_fast < n) {
            memcpy(cpus, listed, MAX_CPUS);
            *which = "performance cores";
        }
    }
    // One CPU per physical core: the lowest-numbered of its allowed siblings.
    int n_cores = 0, smt = 0;
    for (int c = 0; c < MAX_CPUS; c++) {
        if (!cpus[c]) continue;
        n_cores++;
        char path[128];
        snprintf(path, sizeof(path), "/sys/devices/system/cpu/cpu%d/topology/thread_siblings_list", c);
        if (read_cpu_list(root, path, siblings) <= 0) continue;
        for (int s = c + 1; s < MAX_CPUS; s++)
            if (siblings[s] && cpus[s]) cpus[s] = 0, smt = 1;
    }
    if (smt && !strcmp(*which, "all cores")) *which = "physical cores";
    free(cpus);
    return n_cores;
}
#elif defined(__APPLE__)
#include <sys/sysctl.h>
/* macOS: hw.perflevel0 is the fastest kind of core (Apple M: the performance cores;
 * Intel Macs have one level); hw.physicalcpu leaves out Hyper-Threading siblings. */
MAYBE_UNUSED static int count_fast_cores(const char **which) {
    int n = 0;
    size_t len = sizeof(n);
    int levels = 0;
    size_t levels_len = sizeof(levels);
    if (sysctlbyname("hw.nperflevels", &levels, &levels_len, NULL, 0) == 0 && levels > 1 &&
        sysctlbyname("hw.perflevel0.physicalcpu", &n, &len, NULL, 0) == 0 && n > 0) {
        *which = "performance cores";
        return n;
    }
    len = sizeof(n);
    if (sysctlbyname("hw.physicalcpu", &n, &len, NULL, 0) == 0 && n > 0) {
        *which = "physical cores";
        return n;
    }
    long online = sysconf(_SC_NPROCESSORS_ONLN);
    *which = "all cores";
    return online > 0 && online < INT_MAX ? (int)online : 1;
}
#else
MAYBE_UNUSED static int count_fast_cores(const char **which) {
    long online = sysconf(_SC_NPROCESSORS_ONLN);
    *which = "all cores";
    return online > 0 && online < INT_MAX ? (int)online : 1;
}
#endif

static int open_model_file(const char *path, uint64_t *size) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) die("cannot open model '%s': %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) die("cannot stat '%s': %s", path, strerror(errno));
    if (!S_ISREG(st.st_mode)) die("'%s' is not a regular file", path);
    *size = (uint64_t)st.st_size;
    return fd;
}

/* The whole file in memory, read-only. By default it is memory-mapped: the pages are the
 * OS's file cache, shared between runs, and MAP_POPULATE faults them all in now rather than
 * one 4 KB page at a time during the first forward pass. */
static const unsigned char *map_file(int fd, size_t size, const char *path) {
    int flags = MAP_PRIVATE;
#ifdef MAP_POPULATE
    flags |= MAP_POPULATE;
#endif
    void *map = mmap(NULL, size, PROT_READ, flags, fd, 0);
    if (map == MAP_FAILED) die("cannot mmap '%s': %s", path, strerror(errno));
    return map;
}

static void unmap_file(const unsigned char *map, size_t size) { munmap((void *)map, size); }

/* --no-mmap: read the file into anonymous memory, asking for 2 MB huge pages. Streaming
 * gigabytes of weights through 4 KB pages costs a TLB miss every 4 KB per stream; huge
 * pages make decoding faster, at the price of a slower start. */
static const unsigned char *read_into_huge_pages(int fd, size_t size, const char *path) {
    const size_t huge = (size_t)2 << 20;
    size_t capacity = (size + huge - 1) / huge * huge;
    void *buf = NULL;
    if (posix_memalign(&buf, huge, capacity) != 0) die("out of memory reading '%s' (%zu bytes)", path, size);
#ifdef MADV_HUGEPAGE
    madvise(buf, capacity, MADV_HUGEPAGE);  // only a hint: without huge pages it still works
#endif
    const int is_terminal = isatty(STDERR_FILENO);
    for (size_t done = 0; done < size;) {
        ssize_t got = read(fd, (unsigned char *)buf + done, size - done > ((size_t)64 << 20) ? (size_t)64 << 20 : size - done);
        if (got < 0 && errno == EINTR) continue;
        if (got <= 0) die("cannot read '%s': %s", path, got < 0 ? strerror(errno) : "file shrank while reading");
        done += (size_t)got;
        show_read_progress(done, size, is_terminal);
    }
    return buf;
}

/* Linux: MemAvailable in /proc/meminfo (free memory plus the file cache the kernel can drop,
 * which includes a cached copy of the model file itself). macOS has no such figure (it
 * compresses memory and keeps files cached): half of the installed memory. Tests give a
 * fake /proc/meminfo (test_root). */
static unsigned long long memory_available(void) {
#if defined(__linux__)
    const char *root = test_root();
    char path[PATH_MAX], line[256];
    if (snprintf(path, sizeof(path), "%s/proc/meminfo", root ? root : "") >= (int)sizeof(path)) return 0;
    FILE *f = fopen(path, "r");
    unsigned long long kb = 0;
    while (f && fgets(line, sizeof(line), f))
        if (sscanf(line, "MemAvailable: %llu kB", &kb) == 1) break;
    if (f) fclose(f);
    return kb * 1024;
#elif defined(__APPLE__)
    uint64_t installed = 0;
    size_t len = sizeof(installed);
    return sysctlbyname("hw.memsize", &installed, &len, NULL, 0) == 0 ? installed / 2 : 0;
#else
    return 0;  // unknown: map the file
#endif
}

#else  /* _WIN32 */
/* Windows, built with MinGW-w64 (make windows). Included here, not at the top, so that its
 * macros stay out of the engine. */
#define WIN32_LEAN_AND_MEAN
#include <windows.h>
#include <shellapi.h>  // CommandLineToArgvW

static int g_console_cp_set = 0;
static UINT g_console_cp;
static void restore_console_cp(void) { SetConsoleOutputCP(g_console_cp); }

/* Paths and arguments are UTF-8 inside phi2 as on Linux; Windows' own calls take UTF-16
 * ("wide") strings, the C runtime's narrow ones the ANSI code page, which cannot hold most
 * of Unicode. Paths longer than this are refused (ENAMETOOLONG). */
#define WIN_PATH_MAX 4096
static const wchar_t *wide_path(const char *path, wchar_t *buf) {
    if (MultiByteToWideChar(CP_UTF8, 0, path, -1, buf, WIN_PATH_MAX) > 0) return buf;
    errno = ENAMETOOLONG;
    return NULL;
}

static char *utf8_from_wide(const wchar_t *w) {
    int n = WideCharToMultiByte(CP_UTF8, 0, w, -1, NULL, 0, NULL, NULL);
    char *s = xmalloc(n > 0 ? (size_t)n : 1);
    if (n <= 0 || !WideCharToMultiByte(CP_UTF8, 0, w, -1, s, n, NULL, NULL)) s[0] = '\0';
    return s;
}

/* Idle OpenMP threads spin only briefly, then sleep (see the POSIX version). MinGW links
 * libgomp into phi2.exe, which reads GOMP_SPINCOUNT in a constructor before main: this one
 * runs first (constructors with a priority run before those without). */
__attribute__((constructor(101))) static void set_sleeping_thread_wait(void) {
    if (!getenv("OMP_WAIT_POLICY") && !getenv("GOMP_SPINCOUNT") && !getenv("KMP_BLOCKTIME"))
        _putenv("GOMP_SPINCOUNT=1000");  // a short spin, then sleep; on failure, threads spin longer
}

static void use_sleeping_thread_wait(char **argv) { (void)argv; }  // done before main, above

/* The default thread count (see the POSIX version): Windows describes each physical core
 * once (RelationProcessorCore, whatever its SMT siblings) with an efficiency class, higher
 * for faster cores (all 0 on CPUs of one kind): count the cores of the highest class that
 * this process may run on (its affinity mask; processor group 0, where it starts). */
MAYBE_UNUSED static int count_fast_cores(const char **which) {
    DWORD size = 0;
    DWORD_PTR process_mask = 0, system_mask = 0;
    *which = "all cores";
    if (GetLogicalProcessorInformationEx(RelationProcessorCore, NULL, &size) || GetLastError() != ERROR_INSUFFICIENT_BUFFER ||
        !GetProcessAffinityMask(GetCurrentProcess(), &process_mask, &system_mask)) {
        DWORD n = GetActiveProcessorCount(ALL_PROCESSOR_GROUPS);
        return n > 0 ? (int)n : 1;
    }
    unsigned char *info = xmalloc(size);
    if (!GetLogicalProcessorInformationEx(RelationProcessorCore, (SYSTEM_LOGICAL_PROCESSOR_INFORMATION_EX *)info, &size)) {
        free(info);
        DWORD n = GetActiveProcessorCount(ALL_PROCESSOR_GROUPS);
        return n > 0 ? (int)n : 1;
    }
    int top_class = -1, n_top = 0, n_cores = 0, smt = 0, n_logical = 0;
    for (int pass = 0; pass < 2; pass++) {  // first the highest class, then the cores of that class
        for (DWORD off = 0; off < size;) {
            const SYSTEM_LOGICAL_PROCESSOR_INFORMATION_EX *e = (const SYSTEM_LOGICAL_PROCESSOR_INFORMATION_EX *)(info + off);
            off += e->Size ? e->Size : size;  // (a zero size would never end)
            if (e->Relationship != RelationProcessorCore || e->Processor.GroupMask[0].Group != 0) continue;
            const KAFFINITY allowed = e->Processor.GroupMask[0].Mask & process_mask;
            if (!allowed) continue;
            const int cls = ((const BYTE *)&e->Processor)[1];  // EfficiencyClass, after Flags (older MinGW headers: Reserved[0])
            if (pass == 0) {
                if (cls > top_class) top_class = cls;
                n_cores++;
                smt |= (allowed & (allowed - 1)) != 0;  // two logical processors of this core
                for (KAFFINITY m = allowed; m; m &= m - 1) n_logical++;
            } else {
                n_top += cls == top_class;
            }
        }
    }
    free(info);
    if (n_top <= 0) return n_logical > 0 ? n_logical : 1;
    if (n_top < n_cores) *which = "performance cores";
    else if (smt) *which = "physical cores";
    return n_top;
}

static FILE *fopen_path(const char *path, const char *mode) {
    wchar_t wpath[WIN_PATH_MAX], wmode[8];
    if (!wide_path(path, wpath) || !MultiByteToWideChar(CP_UTF8, 0, mode, -1, wmode, 8)) return NULL;
    return _wfopen(wpath, wmode);
}

static int remove_path(const char *path) {
    wchar_t wpath[WIN_PATH_MAX];
    return wide_path(path, wpath) ? _wunlink(wpath) : -1;
}

/* The arguments as UTF-8, from the UTF-16 command line (main's argv is in the ANSI code
 * page: a prompt in Chinese or with emoji would arrive as question marks). Standard output
 * in binary mode: text mode would turn every "\n" of the generated text (and of
 * --print-ids) into "\r\n". On a console, generated text is UTF-8: tell the console so
 * (and put its code page back at exit). */
static void setup_process(int *argc, char ***argv) {
    int n = 0;
    wchar_t **wargv = CommandLineToArgvW(GetCommandLineW(), &n);
    if (wargv && n > 0) {
        char **args = xcalloc((size_t)n + 1, sizeof(char *));
        for (int i = 0; i < n; i++) args[i] = utf8_from_wide(wargv[i]);  // kept for the whole run
        LocalFree(wargv);
        *argc = n;
        *argv = args;
    }
    _setmode(_fileno(stdout), _O_BINARY);
    _setmode(_fileno(stdin), _O_BINARY);   // -f -: the prompt from stdin, byte for byte
    if (GetFileType(GetStdHandle(STD_OUTPUT_HANDLE)) == FILE_TYPE_CHAR && !g_console_cp_set) {
        g_console_cp = GetConsoleOutputCP();
        g_console_cp_set = 1;
        if (SetConsoleOutputCP(CP_UTF8)) atexit(restore_console_cp);
    }
}

/* The C runtime turns Ctrl-C into SIGINT and Ctrl-Break into SIGBREAK (on a thread of
 * their own); there is no SIGHUP or SIGPIPE. */
static void catch_termination_signals(void (*handler)(int)) {
    signal(SIGINT, handler);
    signal(SIGTERM, handler);
    signal(SIGBREAK, handler);
}

static double now_seconds(void) {
    static LARGE_INTEGER freq;
    LARGE_INTEGER t;
    if (!freq.QuadPart) QueryPerformanceFrequency(&freq);
    QueryPerformanceCounter(&t);
    return (double)t.QuadPart / (double)freq.QuadPart;
}

static void *xmalloc_aligned(size_t n) {
    void *p = _aligned_malloc(n ? n : 64, 64);
    if (!p) die("out of memory allocating %zu bytes", n);
    return p;
}

static void free_aligned(void *p) { _aligned_free(p); }

/* The KV cache (Windows commits zeroed pages as they are first touched). */
static void *xmalloc_prefaulted(size_t n) {
    void *p = xmalloc_aligned(n);
    memset(p, 0, n);
    return p;
}

static void free_prefaulted(void *p, size_t n) {
    (void)n;
    free_aligned(p);
}

/* Windows cannot delete a file that is open unless it was opened with FILE_SHARE_DELETE:
 * so open the temporary that way, for die() and the Ctrl-C handler to be able to remove it
 * (it disappears when the process exits and its handle closes). */
static FILE *create_partial_file(const char *path) {
    wchar_t wpath[WIN_PATH_MAX];
    if (!wide_path(path, wpath)) return NULL;
    HANDLE h = CreateFileW(wpath, GENERIC_WRITE, FILE_SHARE_READ | FILE_SHARE_DELETE, NULL, CREATE_ALWAYS,
                           FILE_ATTRIBUTE_NORMAL, NULL);
    if (h == INVALID_HANDLE_VALUE) {
        DWORD e = GetLastError();
        errno = e == ERROR_PATH_NOT_FOUND || e == ERROR_FILE_NOT_FOUND ? ENOENT : e == ERROR_ACCESS_DENIED ? EACCES : EIO;
        return NULL;
    }
    int fd = _open_osfhandle((intptr_t)h, _O_WRONLY | _O_BINARY);
    if (fd < 0) {
        CloseHandle(h);
        return NULL;
    }
    FILE *f = _fdopen(fd, "wb");
    if (!f) _close(fd);
    return f;
}

/* The C runtime reports a write into a pipe whose reader has gone as EINVAL, not EPIPE;
 * the Windows error says what happened (ERROR_NO_DATA on Windows, ERROR_PIPE_NOT_CONNECTED
 * under Wine). */
static int reader_gone(int err) {
    DWORD e = GetLastError();
    return err == EPIPE || e == ERROR_NO_DATA || e == ERROR_BROKEN_PIPE || e == ERROR_PIPE_NOT_CONNECTED;
}

static int is_terminal(FILE *f) { return _isatty(_fileno(f)); }

/* The C runtime's signal() puts SIGINT back to the default before it calls a handler, so a
 * second Ctrl-C would kill: a console control handler instead, called (on a thread of its
 * own) for every Ctrl-C and Ctrl-Break. A console read that Ctrl-C cuts short returns no
 * bytes: -i sees the end of input, or the interrupt if the handler has run by then. */
static void (*g_interrupt_handler)(int);
static BOOL WINAPI on_console_control(DWORD event) {
    if (event != CTRL_C_EVENT && event != CTRL_BREAK_EVENT) return FALSE;
    g_interrupt_handler(SIGINT);
    return TRUE;
}

static void catch_interrupts(void (*handler)(int)) {
    const int catching = handler != SIG_DFL;
    g_interrupt_handler = handler;
    SetConsoleCtrlHandler(on_console_control, catching ? TRUE : FALSE);
}

/* rename() on Windows fails when the target exists; MoveFileEx replaces it. */
static int replace_file(const char *from, const char *to) {
    wchar_t wfrom[WIN_PATH_MAX], wto[WIN_PATH_MAX];
    if (!wide_path(from, wfrom) || !wide_path(to, wto)) return -1;
    if (MoveFileExW(wfrom, wto, MOVEFILE_REPLACE_EXISTING | MOVEFILE_WRITE_THROUGH)) return 0;
    DWORD e = GetLastError();
    errno = e == ERROR_PATH_NOT_FOUND || e == ERROR_FILE_NOT_FOUND ? ENOENT : e == ERROR_ACCESS_DENIED ? EACCES : EIO;
    return -1;
}

/* 64-bit sizes throughout: the q8 model file is 3 GB, more than a 32-bit st_size holds. */
static int open_model_file(const char *path, uint64_t *size) {
    wchar_t wpath[WIN_PATH_MAX];
    struct _stat64 st;
    if (!wide_path(path, wpath) || _wstat64(wpath, &st) != 0) die("cannot open model '%s': %s", path, strerror(errno));
    if ((st.st_mode & _S_IFMT) != _S_IFREG) die("'%s' is not a regular file", path);  // before open: a folder cannot be opened
    int fd = _wopen(wpath, _O_RDONLY | _O_BINARY);
    if (fd < 0) die("cannot open model '%s': %s", path, strerror(errno));
    if (_fstat64(fd, &st) != 0) die("cannot stat '%s': %s", path, strerror(errno));
    *size = (uint64_t)st.st_size;
    return fd;
}

static const unsigned char *map_file(int fd, size_t size, const char *path) {
    HANDLE mapping = CreateFileMappingW((HANDLE)_get_osfhandle(fd), NULL, PAGE_READONLY, 0, 0, NULL);
    if (!mapping) die("cannot map '%s' (Windows error %lu)", path, (unsigned long)GetLastError());
    void *map = MapViewOfFile(mapping, FILE_MAP_READ, 0, 0, size);
    DWORD e = GetLastError();
    CloseHandle(mapping);  // the view keeps the mapping (and the file) alive
    if (!map) die("cannot map '%s' (Windows error %lu)", path, (unsigned long)e);
    return map;
}

static void unmap_file(const unsigned char *map, size_t size) {
    (void)size;  // a view is unmapped whole
    UnmapViewOfFile(map);
}

/* --no-mmap: a copy in 64-byte aligned memory (large pages need a privilege users lack).
 * _read takes at most UINT_MAX bytes at a time. */
static const unsigned char *read_into_huge_pages(int fd, size_t size, const char *path) {
    unsigned char *buf = _aligned_malloc(size ? size : 64, 4096);
    if (!buf) die("out of memory reading '%s' (%zu bytes)", path, size);
    const int is_terminal = _isatty(_fileno(stderr));
    for (size_t done = 0; done < size;) {
        int got = _read(fd, buf + done, (unsigned)(size - done > ((size_t)64 << 20) ? (size_t)64 << 20 : size - done));
        if (got <= 0) die("cannot read '%s': %s", path, got < 0 ? strerror(errno) : "file shrank while reading");
        done += (size_t)got;
        show_read_progress(done, size, is_terminal);
    }
    return buf;
}

/* Physical memory not in use now (GlobalMemoryStatusEx's ullAvailPhys). */
static unsigned long long memory_available(void) {
    MEMORYSTATUSEX status = {.dwLength = sizeof(status)};
    return GlobalMemoryStatusEx(&status) ? status.ullAvailPhys : 0;
}

#endif /* _WIN32 */

#if PHI2_AMX
/* Linux gives a process the AMX tile registers only after it asks (they enlarge the state
 * saved on every context switch). */
#include <sys/syscall.h>
long syscall(long number, ...);  // <unistd.h> declares it only outside strict POSIX mode
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
static int request_amx_permission(void) {
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}
#endif

/* ------------------------------------------------------------------------------------- */
/* Appendix G. The thread pool of a generated token                                        */
/* ------------------------------------------------------------------------------------- */
/* pool_run (its interface: Appendix A) in C11 atomics and POSIX threads (MinGW's
 * winpthreads on Windows). The calling thread is thread 0 and works too; the pool's own
 * threads are 1 .. n_threads - 1. No plain memory is read by one thread while another may
 * be writing it: what orders them is an atomic, as C11 requires (make test-tsan checks it
 * with ThreadSanitizer).
 *
 * Publishing. pool_run writes `job` with plain stores while no pool thread can be reading
 * it, then opens the job by storing an even `sequence`; a thread that loads that value sees
 * the whole job (the store is a release, the load an acquire).
 * Entering and closing. A thread that sees an open job first adds itself to `active`, then
 * loads `sequence` again, and works only if the same job is still open. Once every chunk is
 * claimed, pool_run closes the job (an odd `sequence`), then waits until `active` is 0.
 * Each side stores, then loads what the other stores, all sequentially consistent; in the
 * single order of such operations one of the two stores comes first, so at least one load
 * sees the other side: the thread sees the job closed and leaves without reading it, or
 * pool_run sees the thread and waits for it. So a thread reads the job, its arguments and
 * the activations they point to only while pool_run runs, and when pool_run returns no
 * thread is inside: the caller may overwrite its activations, and the next pool_run the
 * job, at once. (Arguments are read in place, not copied, for the same reason.)
 * Working. The threads claim chunks from an atomic counter and compute each straight into
 * its part of the output: chunks are disjoint, and each is computed once, by a thread that
 * `active` counts until it has finished; its release decrement, which pool_run's wait
 * reads, makes the chunk's values visible to the caller. A thread stalled while holding a
 * chunk (descheduled, or on a slow core) delays the step by the rest of that chunk; one
 * stalled anywhere else delays nothing, since the others claim the chunks it would have.
 * Waiting. Between jobs a thread spins for POOL_SPIN_SECONDS (a token's next step comes
 * within microseconds), then sleeps on a condition variable: asleep it uses none of the
 * time its core's other programs could use, and Linux runs a thread that slept soon after
 * it is woken. pool_run wakes the sleepers when `n_sleeping` says there are any: its store
 * of `sequence` and a sleeper's increment of n_sleeping pair up as above, so no wake-up is
 * lost. Waiting for the others to leave a job, pool_run spins as long, then yields its core
 * at each look, in case a thread still inside is waiting to run on it. */
#include <sched.h>  // sched_yield
static const double POOL_SPIN_SECONDS = 20e-6;  // a step's gap (a LayerNorm, a quantization); a longer spin
                                                // takes time slices from a busy core's other programs, and
                                                // the scheduler then runs this thread late

typedef struct {
    ChunkFunction run;
    const void *args;  // the caller's: they outlive every read, since pool_run waits for the threads
    int n_chunks, chunk_len;
    float *out;
} PoolJob;

typedef struct {
    struct ThreadPool *pool;
    int thread;
} PoolThread;

struct ThreadPool {  // the three groups of shared words on cache lines of their own
    int n_threads;                      // the calling thread and n_threads - 1 of the pool's own
    size_t max_len;                     // the most values a job writes
    pthread_t *threads;                 // [n_threads - 1]
    PoolThread *starts;                 // [n_threads - 1] each thread's number
    pthread_mutex_t mutex;              // with `wake`: threads asleep between jobs
    pthread_cond_t wake;
    _Atomic int n_sleeping;
    _Atomic int stopping;
    _Alignas(64) _Atomic uint64_t sequence;  // even: `job` is open; odd: closed (between jobs)
    PoolJob job;                        // written only while closed and no thread is inside
    _Alignas(64) _Atomic int next_chunk;  // the next chunk of the job nobody has claimed
    _Alignas(64) _Atomic int active;    // pool threads inside the job
};

static int pool_threads(const ThreadPool *pool) { return pool ? pool->n_threads : 1; }

/* A hint to the CPU that this is a spin loop (it saves power and lets an SMT sibling run). */
static void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* Claim chunks of the open job and compute each into its place in the output, until none is
 * left. (The counter only grows during a job: pool_run resets it while no thread is inside.) */
static void pool_work(ThreadPool *pool, int thread) {
    const PoolJob *job = &pool->job;
    for (int c; (c = atomic_fetch_add_explicit(&pool->next_chunk, 1, memory_order_relaxed)) < job->n_chunks;)
        job->run(job->args, c, job->out + (size_t)c * (size_t)job->chunk_len, thread);
}

/* Wait for an open job other than `seen`: spin a little, then sleep. Its sequence, or 0:
 * stopping. (Relaxed loads: the caller looks again, sequentially consistent, before it reads
 * the job.) */
static uint64_t pool_wait(ThreadPool *pool, uint64_t seen) {
    const double start = now_seconds();
    for (;;) {
        if (atomic_load_explicit(&pool->stopping, memory_order_relaxed)) return 0;
        const uint64_t seq = atomic_load_explicit(&pool->sequence, memory_order_relaxed);
        if (seq != seen && seq % 2 == 0) return seq;
        if (now_seconds() - start > POOL_SPIN_SECONDS) break;
        cpu_relax();
    }
    pthread_mutex_lock(&pool->mutex);
    atomic_fetch_add(&pool->n_sleeping, 1);  // then the look at `sequence`: see "Waiting" above
    uint64_t seq = 0;
    while (!atomic_load(&pool->stopping) && ((seq = atomic_load(&pool->sequence)) == seen || seq % 2))
        pthread_cond_wait(&pool->wake, &pool->mutex);
    atomic_fetch_sub(&pool->n_sleeping, 1);
    pthread_mutex_unlock(&pool->mutex);
    return atomic_load(&pool->stopping) ? 0 : seq;
}

static void *pool_thread_main(void *arg) {
    const PoolThread *me = arg;
    ThreadPool *pool = me->pool;
    for (uint64_t seen = 0, seq; (seq = pool_wait(pool, seen)) != 0; seen = seq) {
        atomic_fetch_add(&pool->active, 1);  // in, then the second look: see "Entering" above
        if (atomic_load(&pool->sequence) == seq) pool_work(pool, me->thread);
        atomic_fetch_sub_explicit(&pool->active, 1, memory_order_release);  // out: the chunks are written
    }
    return NULL;
}

static ThreadPool *pool_create(int n_threads, size_t max_len) {
    ThreadPool *pool = xmalloc_aligned(sizeof(*pool));
    memset(pool, 0, sizeof(*pool));
    pool->n_threads = n_threads > 1 ? n_threads : 1;
    pool->max_len = max_len;
    atomic_init(&pool->sequence, 1);  // closed
    atomic_init(&pool->next_chunk, 0);
    atomic_init(&pool->active, 0);
    atomic_init(&pool->n_sleeping, 0);
    atomic_init(&pool->stopping, 0);
    if (pool->n_threads == 1) return pool;  // pool_run runs everything on the caller
    if (pthread_mutex_init(&pool->mutex, NULL) != 0 || pthread_cond_init(&pool->wake, NULL) != 0)
        die("cannot create the threads' lock");
    pool->threads = xmalloc(mul_size((size_t)pool->n_threads - 1, sizeof(pthread_t)));
    pool->starts = xmalloc(mul_size((size_t)pool->n_threads - 1, sizeof(PoolThread)));
#ifndef _WIN32  // signals (Ctrl-C) go to the main thread: the new threads start with them blocked
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
#endif
    for (int i = 0; i < pool->n_threads - 1; i++) {
        pool->starts[i] = (PoolThread){pool, i + 1};
        const int err = pthread_create(&pool->threads[i], NULL, pool_thread_main, &pool->starts[i]);
        if (err != 0) die("cannot start thread %d of %d: %s (try fewer with -t)", i + 2, pool->n_threads, strerror(err));
    }
#ifndef _WIN32
    pthread_sigmask(SIG_SETMASK, &old, NULL);
#endif
    return pool;
}

static void pool_destroy(ThreadPool *pool) {
    if (!pool) return;
    if (pool->n_threads > 1) {
        pthread_mutex_lock(&pool->mutex);
        atomic_store(&pool->stopping, 1);
        pthread_cond_broadcast(&pool->wake);
        pthread_mutex_unlock(&pool->mutex);
        for (int i = 0; i < pool->n_threads - 1; i++) pthread_join(pool->threads[i], NULL);
        pthread_mutex_destroy(&pool->mutex);
        pthread_cond_destroy(&pool->wake);
    }
    free(pool->threads);
    free(pool->starts);
    free_aligned(pool);
}

static void pool_run(ThreadPool *pool, ChunkFunction run, const void *args, int n_chunks,
                     int chunk_len, float *out, size_t out_len) {
    if (n_chunks < 0 || chunk_len < 1 || (size_t)n_chunks > out_len)
        die("internal error: pool_run(%d chunks of %d, %zu values)", n_chunks, chunk_len, out_len);
    if (pool_threads(pool) == 1 || n_chunks == 1) {  // no other thread
        for (int c = 0; c < n_chunks; c++) run(args, c, out + (size_t)c * chunk_len, 0);
        return;
    }
    if (out_len > pool->max_len)
        die("internal error: pool_run writes %zu values, the pool was made for %zu", out_len, pool->max_len);
    pool->job = (PoolJob){run, args, n_chunks, chunk_len, out};
    atomic_store_explicit(&pool->next_chunk, 0, memory_order_relaxed);  // published by the release below
    const uint64_t seq = atomic_load_explicit(&pool->sequence, memory_order_relaxed) + 1;
    atomic_store(&pool->sequence, seq);  // open (then the look at n_sleeping: see "Waiting" above)
    if (atomic_load(&pool->n_sleeping) > 0) {
        pthread_mutex_lock(&pool->mutex);
        pthread_cond_broadcast(&pool->wake);
        pthread_mutex_unlock(&pool->mutex);
    }
    pool_work(pool, 0);
    atomic_store(&pool->sequence, seq + 1);  // closed (then the look at `active`: see "Entering" above)
    if (atomic_load(&pool->active) == 0) return;
    const double start = now_seconds();
    while (atomic_load(&pool->active) > 0) {
        if (now_seconds() - start > POOL_SPIN_SECONDS) sched_yield();
        else cpu_relax();
    }
}
