/*
 * fuzz_model.c -- libFuzzer harness: a model file (docs/FORMAT.md) loaded from any bytes.
 *
 *   make fuzz                          all harnesses, FUZZ_SECONDS each (tests/fuzz/run.sh)
 *   build/fuzz/fuzz_model CRASH_FILE   replay one input (die() messages are shown)
 *
 * Each input goes through parse_model() (phi2.c, included below) three times:
 *   1. as it is: the header and tokenizer checksums must reject almost every mutation
 *      outside the weights, cleanly (the weights sums are checked only after a copy or
 *      with --verify, not by parse_model: a mutated weight section loads and must run);
 *   2. with its version set to MODEL_VERSION and its checksums recomputed (header,
 *      tokenizer section, and from version 2 on the weights sums), wherever the header's
 *      section bounds allow: otherwise the fuzzer
 *      would never get past the checksums to the shapes, the section layout and the
 *      tokenizer parser behind them;
 *   3. rebuilt: its header and tokenizer section followed by zero weights of exactly the
 *      size its shapes need, all offsets and checksums fixed (see try_rebuilt).
 * A file that loads must also hold up: every tensor lies inside the weights section, every
 * id below vocab_size has bytes (or none), the tokenizer encodes bytes of the input into
 * ids below n_tokens <= vocab_size that decode back to those bytes, and (weights up to
 * 128 KB) a forward pass over those ids and the sampler run to a valid id.
 *
 * die() in phi2.c calls phi2_fuzz_on_error() under PHI2_FUZZ; it jumps back here, where what
 * parse_model may have allocated is freed. Its one-line messages go to stderr: run.sh passes
 * -close_fd_mask=2, which hides them but keeps libFuzzer's and the sanitizers' reports.
 * Seeds: tests/fuzz/corpus/model/ (make_seeds.py).
 */
#define PHI2_NO_MAIN
#define PHI2_FUZZ
#pragma GCC diagnostic ignored "-Wunused-function"  // the engine's parts this harness does not use
#include "../../phi2.c"

#include <setjmp.h>

static jmp_buf g_on_error;
static Model g_model;  // global, so its contents survive the longjmp

void phi2_fuzz_on_error(void) { longjmp(g_on_error, 1); }

#include "finding.h"

/* Aborts (a finding) if [p, p + n) is not inside the weights section. */
static void check_inside(const void *p, size_t n, const unsigned char *lo, const unsigned char *hi, const char *what) {
    const unsigned char *b = p;
    if (!b || b < lo || b > hi || n > (size_t)(hi - b)) {
        finding("fuzz_model: tensor %s lies outside the weights section", what);
    }
}

static void check_matrix(const Matrix *w, const Config *c, const unsigned char *lo, const unsigned char *hi,
                         const char *what) {
    size_t n = (size_t)w->rows * (size_t)w->cols;
    if (c->weight_type == WEIGHTS_F32) {
        check_inside(w->w, n * sizeof(float), lo, hi, what);
    } else {
        check_inside(w->q, n, lo, hi, what);
        check_inside(w->scale, n / (size_t)c->group_size * sizeof(float), lo, hi, what);
    }
}

/* A loaded model must also run: a forward pass over up to 3 of the ids (in batches of 2,
 * through the KV cache) and the sampler, greedy and with top-k/top-p, on whatever the
 * (mutated) weights give, NaN and infinities included: no crash, no hang, a valid id. */
static void run_model(const Model *m, const int *ids, size_t n_ids) {
    const Config *c = &m->config;
    int ctx = c->max_seq_len < 4 ? c->max_seq_len : 4;
    int tokens[3] = {c->bos_id, 0, 0}, n = 1;
    if (n_ids > 0) {
        n = n_ids < 3 ? (int)n_ids : 3;
        memcpy(tokens, ids, (size_t)n * sizeof(int));
    }
    if (n > ctx) n = ctx;
    RunState s;
    memset(&s, 0, sizeof(s));
    init_state(&s, c, ctx, 2, default_kv_type(c), 0, 1);
    for (int pos = 0; pos < n; pos += 2) forward(m, &s, tokens + pos, n - pos < 2 ? n - pos : 2, pos, 0);
    int n_valid = m->tokenizer.n_tokens < c->vocab_size ? m->tokenizer.n_tokens : c->vocab_size;
    Candidate *cand = malloc((size_t)n_valid * sizeof(Candidate));
    Sampler samplers[3] = {{.temperature = 0.0f, .top_k = 40, .top_p = 0.95f, .rng = 1},
                           {.temperature = 0.8f, .top_k = 3, .top_p = 0.5f, .rng = 12345},
                           {.temperature = 100.0f, .top_k = 0, .top_p = 1.0f, .rng = 99}};
    for (int i = 0; i < 3; i++) {
        int id = sample(&samplers[i], s.logits, n_valid, cand);
        if (id < 0 || id >= n_valid) finding("fuzz_model: sampler %d returned id %d of %d", i, id, n_valid);
    }
    free(cand);
    free_state(&s);
}

/* What a loaded model promises to the rest of the engine. */
static void check_loaded(const Model *m, const unsigned char *data, size_t size) {
    const Config *c = &m->config;
    const Tokenizer *t = &m->tokenizer;
    const unsigned char *lo = data + read_u64(data + 88), *hi = data + size;
    const int H = c->hidden_dim, F = c->ffn_dim, V = c->vocab_size;
    if (t->n_tokens > V || c->bos_id >= V || c->eos_id >= V || H != c->n_heads * c->head_dim) {
        finding("fuzz_model: loaded a model whose config is inconsistent");
    }
    check_matrix(&m->embed, c, lo, hi, "embed");
    for (int l = 0; l < c->n_layers; l++) {
        const Layer *L = &m->layers[l];
        check_inside(L->ln_weight, H * sizeof(float), lo, hi, "ln_weight");
        check_inside(L->ln_bias, H * sizeof(float), lo, hi, "ln_bias");
        check_matrix(&L->qkv, c, lo, hi, "qkv");
        check_inside(L->qkv_bias, 3 * (size_t)H * sizeof(float), lo, hi, "qkv_bias");
        check_matrix(&L->dense, c, lo, hi, "dense");
        check_inside(L->dense_bias, H * sizeof(float), lo, hi, "dense_bias");
        check_matrix(&L->fc1, c, lo, hi, "fc1");
        check_inside(L->fc1_bias, F * sizeof(float), lo, hi, "fc1_bias");
        check_matrix(&L->fc2, c, lo, hi, "fc2");
        check_inside(L->fc2_bias, H * sizeof(float), lo, hi, "fc2_bias");
    }
    check_inside(m->final_ln_weight, H * sizeof(float), lo, hi, "final_ln_weight");
    check_inside(m->final_ln_bias, H * sizeof(float), lo, hi, "final_ln_bias");
    check_matrix(&m->lm_head, c, lo, hi, "lm_head");
    check_inside(m->lm_head_bias, V * sizeof(float), lo, hi, "lm_head_bias");

    // Every id the engine may look up, padding included (ASan checks the reads).
    volatile unsigned char sink = 0;
    for (int id = -1; id <= V; id++) {
        size_t len;
        const unsigned char *b = tokenizer_token_bytes(t, id, &len);
        for (size_t i = 0; i < len; i++) sink ^= b[i];
    }
    (void)sink;

    // Encode a few bytes of the input (its end: past the header and usually mutated).
    size_t n = size < 48 ? size : 48;
    const unsigned char *text = data + size - n;
    int *ids = NULL;
    size_t n_ids = 0;
    if (tokenizer_encode(t, text, n, &ids, &n_ids) != 0) {
        finding("fuzz_model: tokenizer_encode failed on %zu bytes", n);
    }
    size_t pos = 0;
    for (size_t i = 0; i < n_ids; i++) {
        size_t len;
        if (ids[i] < 0 || ids[i] >= t->n_tokens || ids[i] >= V || t->kind[ids[i]] == TOKEN_UNUSED) {
            finding("fuzz_model: encode produced id %d (n_tokens %d, vocab %d)", ids[i], t->n_tokens, V);
        }
        const unsigned char *b = tokenizer_token_bytes(t, ids[i], &len);
        if (len == 0 || len > n - pos || memcmp(b, text + pos, len) != 0) {
            finding("fuzz_model: decode(encode(x)) != x at byte %zu", pos);
        }
        pos += len;
    }
    if (pos != n) {
        finding("fuzz_model: decode(encode(x)) has %zu of %zu bytes", pos, n);
    }
    if ((size_t)(hi - lo) <= (128u << 10)) run_model(m, ids, n_ids);  // small: keep the fuzzer fast
    free(ids);
}

/* One parse_model() call; returns whether the model loaded. */
static int try_load(const unsigned char *data, size_t size) {
    memset(&g_model, 0, sizeof(g_model));
    if (setjmp(g_on_error)) {
        tokenizer_free(&g_model.tokenizer);
        free(g_model.layers);
        return 0;
    }
    parse_model(&g_model, data, size, "fuzz");
    check_loaded(&g_model, data, size);
    tokenizer_free(&g_model.tokenizer);  // not free_model(): the bytes belong to libFuzzer
    free(g_model.layers);
    return 1;
}

/* The harness's own checksum code (docs/FORMAT.md), independent of the engine's. */
static uint64_t fnv(const unsigned char *p, size_t n) {
    uint64_t h = 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 0x100000001b3ULL;
    return h;
}

static void put_u64(unsigned char *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i));
}

/* Rewrites the checksum fields of a copy of the input to match its contents, as far as its
 * header's section fields point inside it, and sets the version this build reads (so seeds
 * of an older version still reach the checks behind it). */
static void fix_checksums(unsigned char *d, size_t size) {
    uint32_t version = MODEL_VERSION;
    memcpy(d + 8, &version, 4);
    uint64_t tok_off = read_u64(d + 72), tok_size = read_u64(d + 80);
    if (tok_off <= size && tok_size <= size - tok_off) put_u64(d + 112, fnv(d + tok_off, tok_size));
#if MODEL_VERSION >= 2
    uint64_t w_off = read_u64(d + 88);
    if (w_off <= size) {
        uint64_t s1 = 0, s2 = 0;
        for (uint64_t i = 0; i < (size - w_off) / 8; i++) {
            uint64_t word = read_u64(d + w_off + 8 * i);
            s1 += word;
            s2 += (i + 1) * word;
        }
        put_u64(d + 120, s1);
        put_u64(d + 128, s2);
    }
#endif
    put_u64(d + 248, fnv(d, 248));
}

static uint64_t pad64(uint64_t n) { return (n + 63) / 64 * 64; }

/* Bytes of the weights section that header h's shapes call for (docs/FORMAT.md), or
 * UINT64_MAX for shapes too large to build here. */
static uint64_t weights_layout(const unsigned char *h) {
    uint64_t q8 = read_u32(h + 12) == 1, V = read_u32(h + 16), H = read_u32(h + 20), F = read_u32(h + 24),
             L = read_u32(h + 28);
    if (V > (1u << 20) || H > (1u << 20) || F > (1u << 20) || L > (1u << 20)) return UINT64_MAX;
#define MAT(r, c) (q8 ? pad64((r) * (c)) + pad64((r) * (c) / 64 * 4) : pad64((r) * (c) * 4))
#define VEC(n) pad64((n) * 4)
    uint64_t layer = 2 * VEC(H) + MAT(3 * H, H) + VEC(3 * H) + MAT(H, H) + VEC(H) + MAT(F, H) + VEC(F) +
                     MAT(H, F) + VEC(H);
    return MAT(V, H) + L * layer + 2 * VEC(H) + MAT(V, H) + VEC(V);
#undef MAT
#undef VEC
}

/* Pass 3: the input's header and tokenizer section, followed by a zero weights section of
 * exactly the size the header's shapes call for (when that is at most 1 MB), with every
 * offset, size and checksum made to match. Mutating a dimension or a token then reaches
 * the checks that compare shapes and tokenizer with each other, which passes 1 and 2 only
 * reach if the fuzzer also resizes the weights to the byte. */
static void try_rebuilt(const unsigned char *data, size_t size) {
    if (size < HEADER_SIZE) return;
    uint64_t tok_size = read_u64(data + 80);
    if (tok_size > size - HEADER_SIZE) tok_size = size - HEADER_SIZE;
    uint64_t w_size = weights_layout(data);
    if (w_size > (1u << 20)) w_size = 0;  // the engine must reject it without the weights
    uint64_t w_off = pad64(HEADER_SIZE + tok_size), total = w_off + w_size;
    unsigned char *file = calloc(total, 1);
    if (!file) return;
    memcpy(file, data, HEADER_SIZE + tok_size);
    put_u64(file + 72, HEADER_SIZE);
    put_u64(file + 80, tok_size);
    put_u64(file + 88, w_off);
    put_u64(file + 96, w_size);
    put_u64(file + 104, total);
    fix_checksums(file, total);
    try_load(file, total);
    free(file);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    try_load(data, size);  // pass 1: as it is
    if (size >= HEADER_SIZE) {  // pass 2: checksums fixed
        unsigned char *copy = malloc(size);
        if (!copy) return 0;
        memcpy(copy, data, size);
        fix_checksums(copy, size);
        try_load(copy, size);
        free(copy);
    }
    try_rebuilt(data, size);
    return 0;
}
