/* tokenizer.c -- Phi-2's tokenizer (GPT-2 byte-level BPE + added tokens). See tokenizer.h.
 *
 * The model file stores every token as the raw bytes it stands for and every merge as an
 * id triple, so this file never needs GPT-2's byte-to-unicode table: BPE runs directly on
 * byte tokens, and that is equivalent because the table is a bijection.
 */
#include "tokenizer.h"

#include <limits.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "unicode_tables.h"

#define EMPTY_KEY UINT64_MAX  /* no real key: ids are < 2^31, so left_id is never 0xFFFFFFFF */

/* ------------------------------------------------------------------------------------------
 * Loading */

static int fail(char *err, size_t err_len, const char *fmt, ...) {
    if (err && err_len) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, err_len, fmt, ap);
        va_end(ap);
    }
    return -1;
}

/* Reads a little-endian u32 at *pos if it fits in size; the section may be unaligned. */
static int read_u32(const unsigned char *p, size_t size, size_t *pos, uint32_t *v) {
    if (size - *pos < 4) return -1;   /* *pos <= size always holds */
    *v = (uint32_t)p[*pos] | (uint32_t)p[*pos + 1] << 8 | (uint32_t)p[*pos + 2] << 16 |
         (uint32_t)p[*pos + 3] << 24;
    *pos += 4;
    return 0;
}

/* malloc(n * size), or NULL if that overflows or memory is short. */
static void *alloc_array(size_t n, size_t size) {
    if (size != 0 && n > SIZE_MAX / size) return NULL;
    size_t bytes = n * size;
    return malloc(bytes ? bytes : 1);   /* malloc(0) may return NULL */
}

static uint64_t merge_key(uint32_t left, uint32_t right) { return (uint64_t)left << 32 | right; }

/* A cheap, well-mixing hash of the 64-bit pair key (the splitmix64 finalizer), keyed with a
 * per-load seed: a file crafted so that many merges share one slot would otherwise turn
 * every lookup into a long probe (the seed changes where pairs land, never what is found). */
static size_t hash_key(uint64_t k, uint64_t seed) {
    k ^= seed;
    k ^= k >> 30; k *= 0xbf58476d1ce4e5b9ULL;
    k ^= k >> 27; k *= 0x94d049bb133111ebULL;
    k ^= k >> 31;
    return (size_t)k;
}

static const TokMerge *merge_find(const Tokenizer *t, uint32_t left, uint32_t right) {
    uint64_t key = merge_key(left, right);
    for (size_t i = hash_key(key, t->hash_seed) & t->merge_mask;; i = (i + 1) & t->merge_mask) {
        if (t->merges[i].key == key) return &t->merges[i];
        if (t->merges[i].key == EMPTY_KEY) return NULL;
    }
}

/* Inserts a new pair; returns -1 if the pair is already there (a duplicate merge: GPT-2's
 * merges have none, and the format forbids them rather than pick which rank wins). */
static int merge_insert(Tokenizer *t, uint32_t left, uint32_t right, uint32_t rank, uint32_t merged) {
    uint64_t key = merge_key(left, right);
    size_t i = hash_key(key, t->hash_seed) & t->merge_mask;
    while (t->merges[i].key != EMPTY_KEY && t->merges[i].key != key) i = (i + 1) & t->merge_mask;
    if (t->merges[i].key == key) return -1;
    t->merges[i].key = key;
    t->merges[i].rank = rank;
    t->merges[i].merged = merged;
    return 0;
}

/* Adds an added token to the byte trie. The trie has room for every node (sized at load).
 * If two added tokens have the same bytes, the lower id keeps the match. */
static void trie_insert(Tokenizer *t, const unsigned char *s, size_t n, int id) {
    int node = 0;
    for (size_t i = 0; i < n; i++) {
        int c = t->trie[node].first_child;
        while (c >= 0 && t->trie[c].byte != s[i]) c = t->trie[c].next_sibling;
        if (c < 0) {
            c = t->n_trie++;
            t->trie[c].first_child = -1;
            t->trie[c].token_id = -1;
            t->trie[c].byte = s[i];
            t->trie[c].next_sibling = t->trie[node].first_child;
            t->trie[node].first_child = c;
        }
        node = c;
    }
    if (t->trie[node].token_id < 0) t->trie[node].token_id = id;
    t->added_first[s[0]] = 1;
}

int tokenizer_load(Tokenizer *t, const unsigned char *section, size_t size, char *err, size_t err_len) {
    memset(t, 0, sizeof(*t));
    if (err && err_len) err[0] = '\0';
    if (!section) return fail(err, err_len, "tokenizer: no section");
    size_t pos = 0;
    uint32_t n_tokens, n_merges;
    if (read_u32(section, size, &pos, &n_tokens) || read_u32(section, size, &pos, &n_merges))
        return fail(err, err_len, "tokenizer: section of %zu bytes is too short for its counts", size);
    /* Each token needs at least 5 bytes (kind + length) and each merge 12: this bounds the
     * counts by the section size before anything is allocated from them. */
    if (n_tokens < 256 || n_tokens > (uint32_t)INT_MAX - 1 || n_tokens > (size - pos) / 5)
        return fail(err, err_len, "tokenizer: bad token count %u for a section of %zu bytes", n_tokens, size);
    if (n_merges > (uint32_t)INT_MAX || n_merges > (size - pos) / 12)
        return fail(err, err_len, "tokenizer: bad merge count %u for a section of %zu bytes", n_merges, size);

    /* Pass 1: check the token records and count their bytes. */
    size_t total_bytes = 0, added_bytes = 0;
    int n_added = 0;
    size_t p = pos;
    for (uint32_t i = 0; i < n_tokens; i++) {
        uint32_t len;
        if (p >= size) return fail(err, err_len, "tokenizer: section ends inside token %u", i);
        unsigned char kind = section[p++];
        if (read_u32(section, size, &p, &len) || len > size - p)
            return fail(err, err_len, "tokenizer: section ends inside token %u", i);
        if (kind > TOKEN_ADDED) return fail(err, err_len, "tokenizer: token %u has unknown kind %u", i, kind);
        if (kind == TOKEN_UNUSED && len != 0)
            return fail(err, err_len, "tokenizer: unused token %u has %u bytes", i, len);
        if (kind != TOKEN_UNUSED && len == 0) return fail(err, err_len, "tokenizer: token %u is empty", i);
        if (len > TOKENIZER_MAX_TOKEN_BYTES)
            return fail(err, err_len, "tokenizer: token %u is %u bytes long (the limit is %d)", i, len,
                        TOKENIZER_MAX_TOKEN_BYTES);
        p += len;
        total_bytes += len;   /* <= size: no overflow */
        if (kind == TOKEN_ADDED) {
            added_bytes += len;
            if (++n_added > TOKENIZER_MAX_ADDED)
                return fail(err, err_len, "tokenizer: more than %d added tokens", TOKENIZER_MAX_ADDED);
        }
    }
    if (size - p != (size_t)n_merges * 12)
        return fail(err, err_len, "tokenizer: %zu bytes left for %u merges (need %zu)", size - p,
                    n_merges, (size_t)n_merges * 12);

    if ((uint64_t)total_bytes > UINT32_MAX) return fail(err, err_len, "tokenizer: token bytes exceed 4 GiB");

    /* Allocate. The counts are bounded by the section size, but check every product anyway. */
    t->n_tokens = (int)n_tokens;
    t->n_merges = (int)n_merges;
    size_t cap = 16;
    while (cap < (size_t)n_merges * 2) cap *= 2;   /* load factor <= 1/2 */
    t->kind = alloc_array(n_tokens, 1);
    t->tok_offset = alloc_array((size_t)n_tokens + 1, sizeof(uint32_t));
    t->bytes = alloc_array(total_bytes ? total_bytes : 1, 1);
    t->merges = alloc_array(cap, sizeof(TokMerge));
    t->trie = alloc_array(added_bytes + 1, sizeof(TokTrieNode));
    if (!t->kind || !t->tok_offset || !t->bytes || !t->merges || !t->trie) {
        tokenizer_free(t);
        return fail(err, err_len, "tokenizer: out of memory");
    }
    t->merge_mask = cap - 1;
    for (size_t i = 0; i < cap; i++) t->merges[i].key = EMPTY_KEY;
    t->n_trie = 1;
    t->trie[0] = (TokTrieNode){ .first_child = -1, .next_sibling = -1, .token_id = -1, .byte = 0 };
    for (int b = 0; b < 256; b++) t->byte_id[b] = -1;

    /* Pass 2: copy the tokens (already validated). */
    size_t off = 0;
    p = pos;
    for (uint32_t i = 0; i < n_tokens; i++) {
        uint32_t len = 0;   /* validated in pass 1: the reads below cannot fail */
        unsigned char kind = section[p++];
        read_u32(section, size, &p, &len);
        t->kind[i] = kind;
        t->tok_offset[i] = (uint32_t)off;
        memcpy(t->bytes + off, section + p, len);
        /* The single-byte BPE tokens are where BPE starts from. */
        if (kind == TOKEN_BPE && len == 1 && t->byte_id[section[p]] < 0) t->byte_id[section[p]] = (int)i;
        if (kind == TOKEN_ADDED) trie_insert(t, section + p, len, (int)i);
        off += len;
        p += len;
    }
    t->tok_offset[n_tokens] = (uint32_t)off;
    for (int b = 0; b < 256; b++)
        if (t->byte_id[b] < 0) {
            tokenizer_free(t);
            return fail(err, err_len, "tokenizer: no single-byte token for byte 0x%02x", b);
        }

    /* Merges: ids in range, used, and merged bytes == left bytes + right bytes (this is
     * what makes decode(encode(x)) == x hold no matter what the file says). Each token may be
     * the result of at most one merge (as in any BPE training), so the byte comparisons add
     * up to at most the size of the section: loading stays linear in it. */
    unsigned char *produced = calloc(n_tokens, 1);
    if (!produced) {
        tokenizer_free(t);
        return fail(err, err_len, "tokenizer: out of memory");
    }
    /* The seed: addresses (randomized by the OS) and the clock, nothing an attacker picks. */
    t->hash_seed = hash_key((uint64_t)(uintptr_t)t->merges ^ (uint64_t)(uintptr_t)&n_added, (uint64_t)time(NULL));
    for (uint32_t r = 0; r < n_merges; r++) {
        uint32_t ids[3] = {0, 0, 0};
        for (int k = 0; k < 3; k++) read_u32(section, size, &p, &ids[k]);
        for (int k = 0; k < 3; k++)
            if (ids[k] >= n_tokens || t->kind[ids[k]] == TOKEN_UNUSED) {
                free(produced);
                tokenizer_free(t);
                return fail(err, err_len, "tokenizer: merge %u refers to bad id %u", r, ids[k]);
            }
        if (produced[ids[2]]) {
            free(produced);
            tokenizer_free(t);
            return fail(err, err_len, "tokenizer: merge %u: token %u is already the result of another merge", r, ids[2]);
        }
        produced[ids[2]] = 1;
        size_t ll, rl, ml;
        const unsigned char *lb = tokenizer_token_bytes(t, (int)ids[0], &ll);
        const unsigned char *rb = tokenizer_token_bytes(t, (int)ids[1], &rl);
        const unsigned char *mb = tokenizer_token_bytes(t, (int)ids[2], &ml);
        if (ml != ll + rl || memcmp(mb, lb, ll) != 0 || memcmp(mb + ll, rb, rl) != 0) {
            free(produced);
            tokenizer_free(t);
            return fail(err, err_len, "tokenizer: merge %u: token %u is not %u + %u", r, ids[2], ids[0], ids[1]);
        }
        if (merge_insert(t, ids[0], ids[1], r, ids[2]) != 0) {
            free(produced);
            tokenizer_free(t);
            return fail(err, err_len, "tokenizer: merge %u: the pair %u %u is merged twice", r, ids[0], ids[1]);
        }
    }
    free(produced);
    return 0;
}

void tokenizer_free(Tokenizer *t) {
    free(t->kind);
    free(t->tok_offset);
    free(t->bytes);
    free(t->merges);
    free(t->trie);
    memset(t, 0, sizeof(*t));
}

const unsigned char *tokenizer_token_bytes(const Tokenizer *t, int id, size_t *len) {
    if (id < 0 || id >= t->n_tokens) {
        *len = 0;
        return (const unsigned char *)"";
    }
    *len = t->tok_offset[id + 1] - t->tok_offset[id];
    return t->bytes + t->tok_offset[id];
}

/* ------------------------------------------------------------------------------------------
 * Character classes of the pre-tokenizer regex */

enum { CLS_OTHER = 0, CLS_LETTER = 1, CLS_NUMBER = 2, CLS_SPACE = 3 };

static int in_ranges(const uint32_t (*r)[2], size_t n, uint32_t cp) {
    size_t lo = 0, hi = n;   /* binary search for the range containing cp */
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (cp < r[mid][0]) hi = mid;
        else if (cp > r[mid][1]) lo = mid + 1;
        else return 1;
    }
    return 0;
}

#define N_RANGES(a) (sizeof(a) / sizeof(a[0]))

static int class_of(uint32_t cp) {
    if (cp < 0x80) {   /* ASCII fast path */
        if ((cp >= 'a' && cp <= 'z') || (cp >= 'A' && cp <= 'Z')) return CLS_LETTER;
        if (cp >= '0' && cp <= '9') return CLS_NUMBER;
        if (cp == ' ' || (cp >= 0x09 && cp <= 0x0D)) return CLS_SPACE;
        return CLS_OTHER;
    }
    if (in_ranges(unicode_letter, N_RANGES(unicode_letter), cp)) return CLS_LETTER;
    if (in_ranges(unicode_number, N_RANGES(unicode_number), cp)) return CLS_NUMBER;
    if (in_ranges(unicode_space, N_RANGES(unicode_space), cp)) return CLS_SPACE;
    return CLS_OTHER;
}

/* Length of the well-formed UTF-8 sequence starting a lead byte b (2..4), 0 if b cannot
 * start one (continuation bytes, C0, C1, F5..FF). */
static int utf8_lead_len(unsigned char b) {
    if (b >= 0xC2 && b <= 0xDF) return 2;
    if (b >= 0xE0 && b <= 0xEF) return 3;
    if (b >= 0xF0 && b <= 0xF4) return 4;
    return 0;
}

/* Whether b may follow lead byte `lead` as its first continuation byte: this excludes
 * overlong forms (E0 80..9F, F0 80..8F), surrogates (ED A0..BF) and code points above
 * U+10FFFF (F4 90..BF), as the Unicode standard's table of well-formed sequences does. */
static int utf8_second_ok(unsigned char lead, unsigned char b) {
    switch (lead) {
    case 0xE0: return b >= 0xA0 && b <= 0xBF;
    case 0xED: return b >= 0x80 && b <= 0x9F;
    case 0xF0: return b >= 0x90 && b <= 0xBF;
    case 0xF4: return b >= 0x80 && b <= 0x8F;
    default:   return b >= 0x80 && b <= 0xBF;
    }
}

/* Decodes the character at s[0] (n >= 1 bytes available) and returns its class and length.
 * A byte that does not start a complete well-formed sequence is a one-byte character of
 * class OTHER: like U+FFFD, which is what a lossy UTF-8 decoder would put there. */
static int next_char(const unsigned char *s, size_t n, int *len) {
    unsigned char b = s[0];
    *len = 1;
    if (b < 0x80) return class_of(b);
    int need = utf8_lead_len(b);
    if (need == 0 || (size_t)need > n || !utf8_second_ok(b, s[1])) return CLS_OTHER;
    uint32_t cp = b & (0x7F >> need);
    for (int k = 1; k < need; k++) {
        if ((s[k] & 0xC0) != 0x80) return CLS_OTHER;
        cp = cp << 6 | (s[k] & 0x3F);
    }
    *len = need;
    return class_of(cp);
}

/* End of the run of characters of class cls starting at s[i]; *last gets the start of the
 * run's last character. */
static size_t run_end(const unsigned char *s, size_t n, size_t i, int cls, size_t *last) {
    *last = i;
    while (i < n) {
        int len;
        if (next_char(s + i, n - i, &len) != cls) break;
        *last = i;
        i += (size_t)len;
    }
    return i;
}

/* The GPT-2 pre-tokenizer: returns the end of the match that starts at s[i] (i < n) of
 *   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
 * The alternatives are tried in order and the first that matches wins (backtracking
 * semantics, as in Oniguruma used by Hugging Face and in JavaScript). Every character is
 * letter, number, space or other, so some alternative always matches. */
static size_t pretoken_end(const unsigned char *s, size_t n, size_t i) {
    size_t last;
    /* Contractions: lowercase ASCII only, exactly as written in the regex. */
    if (s[i] == '\'' && i + 1 < n) {
        unsigned char c = s[i + 1];
        if (c == 's' || c == 't' || c == 'm' || c == 'd') return i + 2;
        if (i + 2 < n && ((c == 'r' && s[i + 2] == 'e') || (c == 'v' && s[i + 2] == 'e') ||
                          (c == 'l' && s[i + 2] == 'l')))
            return i + 3;
    }
    /* ` ?X+` for X = letter, number, other: the classes are disjoint, so the class of the
     * character after an optional space picks the alternative. */
    int len;
    if (s[i] == ' ' && i + 1 < n) {
        int cls = next_char(s + i + 1, n - i - 1, &len);
        if (cls != CLS_SPACE) return run_end(s, n, i + 1, cls, &last);
    }
    int cls = next_char(s + i, n - i, &len);
    if (cls != CLS_SPACE) return run_end(s, n, i, cls, &last);
    /* Whitespace. `\s+(?!\S)`: the whole run if it reaches the end of the text; otherwise
     * (a non-space follows) backtrack by one character, leaving the last space to start
     * the next pre-token (" b"), which needs a run of at least two characters. Failing
     * that, `\s+` takes the single space character. */
    size_t end = run_end(s, n, i, CLS_SPACE, &last);
    if (end == n) return end;
    return last > i ? last : end;
}

/* ------------------------------------------------------------------------------------------
 * BPE */

typedef struct {
    uint32_t rank;
    int left, right;          /* symbol positions of the pair */
    int left_tok, right_tok;  /* their tokens when pushed: a changed token means stale */
    int merged;               /* the token the pair becomes */
} HeapItem;

/* Scratch space for BPE of one pre-token, grown to the longest pre-token seen. */
typedef struct {
    size_t cap;       /* symbols */
    int *tok;         /* token of the symbol starting at each byte position, -1 if merged away */
    int *next, *prev; /* doubly linked list of live symbols */
    HeapItem *heap;   /* min-heap on (rank, left): room for 3*cap pushes */
    size_t n_heap;
} BpeWork;

static int work_reserve(BpeWork *w, size_t n) {
    if (n <= w->cap) return 0;
    if (n > (size_t)INT_MAX / 3 || n > SIZE_MAX / (3 * sizeof(HeapItem))) return -1;
    int *tok = realloc(w->tok, n * sizeof(int));
    if (tok) w->tok = tok;
    int *next = realloc(w->next, n * sizeof(int));
    if (next) w->next = next;
    int *prev = realloc(w->prev, n * sizeof(int));
    if (prev) w->prev = prev;
    HeapItem *heap = realloc(w->heap, 3 * n * sizeof(HeapItem));
    if (heap) w->heap = heap;
    if (!tok || !next || !prev || !heap) return -1;
    w->cap = n;
    return 0;
}

static void work_free(BpeWork *w) {
    free(w->tok);
    free(w->next);
    free(w->prev);
    free(w->heap);
}

static int heap_less(const HeapItem *a, const HeapItem *b) {
    /* Lowest rank first; among equal ranks the leftmost pair, like HF and GPT-2. */
    return a->rank < b->rank || (a->rank == b->rank && a->left < b->left);
}

static void heap_push(BpeWork *w, HeapItem it) {
    size_t i = w->n_heap++;
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (!heap_less(&it, &w->heap[parent])) break;
        w->heap[i] = w->heap[parent];
        i = parent;
    }
    w->heap[i] = it;
}

static HeapItem heap_pop(BpeWork *w) {
    HeapItem top = w->heap[0], it = w->heap[--w->n_heap];
    size_t i = 0, n = w->n_heap;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= n) break;
        if (c + 1 < n && heap_less(&w->heap[c + 1], &w->heap[c])) c++;
        if (!heap_less(&w->heap[c], &it)) break;
        w->heap[i] = w->heap[c];
        i = c;
    }
    if (n > 0) w->heap[i] = it;
    return top;
}

/* Pushes the pair (a, next of a) if the vocabulary has a merge for it. */
static void push_pair(const Tokenizer *t, BpeWork *w, int a) {
    int b = w->next[a];
    if (b < 0) return;
    const TokMerge *m = merge_find(t, (uint32_t)w->tok[a], (uint32_t)w->tok[b]);
    if (m) heap_push(w, (HeapItem){ m->rank, a, b, w->tok[a], w->tok[b], (int)m->merged });
}

/* BPE of one pre-token s[0..n): start from byte tokens, repeatedly apply the best-ranked
 * merge among adjacent pairs. A heap with lazy deletion keeps this O(n log n), so even a
 * single 100 KB "word" is fast. Appends the ids to out. */
static void bpe(const Tokenizer *t, BpeWork *w, const unsigned char *s, size_t n, int *out, size_t *n_out) {
    if (n == 1) {   /* the common case of a one-byte pre-token */
        out[(*n_out)++] = t->byte_id[s[0]];
        return;
    }
    int ni = (int)n;
    for (int i = 0; i < ni; i++) {
        w->tok[i] = t->byte_id[s[i]];
        w->next[i] = i + 1 < ni ? i + 1 : -1;
        w->prev[i] = i - 1;
    }
    w->n_heap = 0;
    for (int i = 0; i + 1 < ni; i++) push_pair(t, w, i);
    while (w->n_heap > 0) {
        HeapItem it = heap_pop(w);
        int a = it.left, b = it.right;
        /* Stale if either symbol was merged into something else since the push. */
        if (w->tok[a] != it.left_tok || w->next[a] != b || w->tok[b] != it.right_tok) continue;
        w->tok[a] = it.merged;
        w->tok[b] = -1;
        w->next[a] = w->next[b];
        if (w->next[b] >= 0) w->prev[w->next[b]] = a;
        if (w->prev[a] >= 0) push_pair(t, w, w->prev[a]);
        push_pair(t, w, a);
    }
    for (int i = 0; i >= 0; i = w->next[i]) out[(*n_out)++] = w->tok[i];
}

/* ------------------------------------------------------------------------------------------
 * Encoding */

/* Length of the longest added token that s[0..n) starts with (0 if none), its id in *id. */
static size_t match_added(const Tokenizer *t, const unsigned char *s, size_t n, int *id) {
    size_t best = 0;
    int node = 0;
    for (size_t i = 0; i < n; i++) {
        int c = t->trie[node].first_child;
        while (c >= 0 && t->trie[c].byte != s[i]) c = t->trie[c].next_sibling;
        if (c < 0) break;
        node = c;
        if (t->trie[node].token_id >= 0) {
            best = i + 1;
            *id = t->trie[node].token_id;
        }
    }
    return best;
}

/* Pre-tokenizes and BPE-encodes a piece of text that holds no added token. */
static int encode_piece(const Tokenizer *t, BpeWork *w, const unsigned char *s, size_t n, int *out, size_t *n_out) {
    for (size_t i = 0; i < n;) {
        size_t end = pretoken_end(s, n, i);
        if (work_reserve(w, end - i)) return -1;
        bpe(t, w, s + i, end - i, out, n_out);
        i = end;
    }
    return 0;
}

int tokenizer_encode(const Tokenizer *t, const unsigned char *text, size_t len, int **ids, size_t *n_ids) {
    *ids = NULL;
    *n_ids = 0;
    /* Every token covers at least one byte, so len ids always suffice. */
    int *out = alloc_array(len ? len : 1, sizeof(int));
    if (!out) return -1;
    BpeWork w = {0};
    size_t n_out = 0, start = 0, i = 0;
    /* Added tokens are cut out first, leftmost-longest: scan left to right and at each
     * position take the longest added token starting there. */
    while (i < len) {
        int id;
        size_t m = t->added_first[text[i]] ? match_added(t, text + i, len - i, &id) : 0;
        if (m == 0) {
            i++;
            continue;
        }
        if (encode_piece(t, &w, text + start, i - start, out, &n_out)) goto oom;
        out[n_out++] = id;
        i += m;
        start = i;
    }
    if (encode_piece(t, &w, text + start, len - start, out, &n_out)) goto oom;
    work_free(&w);
    int *shrunk = realloc(out, (n_out ? n_out : 1) * sizeof(int));
    *ids = shrunk ? shrunk : out;
    *n_ids = n_out;
    return 0;
oom:
    work_free(&w);
    free(out);
    return -1;
}

/* ------------------------------------------------------------------------------------------
 * Streaming UTF-8 output */

void utf8_stream_write(Utf8Stream *s, const unsigned char *bytes, size_t n, FILE *out) {
    unsigned char buf[256];   /* batch the output into few fwrite calls */
    size_t nb = 0;
    for (size_t i = 0; i < n;) {
        if (nb + 4 > sizeof(buf)) {
            fwrite(buf, 1, nb, out);
            nb = 0;
        }
        unsigned char b = bytes[i];
        if (s->n_pending > 0) {
            int ok = (b & 0xC0) == 0x80 && (s->n_pending > 1 || utf8_second_ok(s->pending[0], b));
            if (!ok) {
                /* The held-back bytes can never become a character: write them as they
                 * are and look at b again as a fresh start. */
                memcpy(buf + nb, s->pending, (size_t)s->n_pending);
                nb += (size_t)s->n_pending;
                s->n_pending = 0;
                continue;
            }
            s->pending[s->n_pending++] = b;
            i++;
            if (s->n_pending == s->need) {   /* complete character */
                memcpy(buf + nb, s->pending, (size_t)s->n_pending);
                nb += (size_t)s->n_pending;
                s->n_pending = 0;
            }
            continue;
        }
        int need = b < 0x80 ? 1 : utf8_lead_len(b);
        if (need <= 1) {
            buf[nb++] = b;   /* ASCII, or a byte that cannot start a character */
        } else {
            s->pending[0] = b;
            s->n_pending = 1;
            s->need = need;
        }
        i++;
    }
    if (nb) fwrite(buf, 1, nb, out);
}

void utf8_stream_flush(Utf8Stream *s, FILE *out) {
    if (s->n_pending > 0) fwrite(s->pending, 1, (size_t)s->n_pending, out);
    s->n_pending = 0;
    fflush(out);
}
