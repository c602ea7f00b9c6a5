/* tokenizer.h -- Phi-2's tokenizer: GPT-2 byte-level BPE plus added tokens.
 *
 * Encoding, exactly as Hugging Face's tokenizer for microsoft/phi-2 does it:
 *   1. Added tokens (`<|endoftext|>`, runs of 2..31 spaces, runs of 2..9 tabs) are cut out of
 *      the raw text first, leftmost-longest.
 *   2. Every piece of text between them is split by the GPT-2 pre-tokenizer regex
 *      's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
 *      (hand-written matcher, Unicode classes from unicode_tables.h).
 *   3. Every pre-token is turned into byte tokens and merged by BPE, lowest merge rank first.
 * Input is arbitrary bytes: invalid UTF-8 is allowed, each invalid byte counting as one
 * character that is neither letter, number nor space. Decoding is concatenating the bytes of
 * the tokens, so decode(encode(x)) == x for every x.
 *
 * The tokenizer is read from the tokenizer section of the model file (docs/FORMAT.md).
 */
#ifndef PHI2_TOKENIZER_H
#define PHI2_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

/* Limits the loader enforces (docs/FORMAT.md): they keep loading and encoding linear in the
 * size of the input, whatever a hostile file holds. GPT-2's longest token is 128 bytes and
 * Phi-2 has 39 added tokens. */
#define TOKENIZER_MAX_TOKEN_BYTES 1024
#define TOKENIZER_MAX_ADDED 1024

/* Kinds of ids in the tokenizer section. */
enum { TOKEN_UNUSED = 0, TOKEN_BPE = 1, TOKEN_ADDED = 2 };

typedef struct {
    uint64_t key;     /* (left_id << 32) | right_id; EMPTY_KEY marks a free slot */
    uint32_t rank;    /* merge priority: lower merges first */
    uint32_t merged;  /* id of the token left+right becomes */
} TokMerge;

typedef struct {
    int first_child;  /* node index, -1 if none */
    int next_sibling; /* node index, -1 if none */
    int token_id;     /* added token ending at this node, -1 if none */
    unsigned char byte;
} TokTrieNode;

typedef struct Tokenizer {
    int n_tokens;              /* ids 0 .. n_tokens-1 */
    int n_merges;
    unsigned char *kind;       /* [n_tokens] TOKEN_UNUSED / TOKEN_BPE / TOKEN_ADDED */
    uint32_t *tok_offset;      /* [n_tokens + 1] token i's bytes are bytes[tok_offset[i] ..] */
    unsigned char *bytes;      /* all token bytes, copied out of the section */
    int byte_id[256];          /* id of the single-byte BPE token for every byte value */
    TokMerge *merges;          /* open-addressing hash map (left, right) -> (rank, merged) */
    size_t merge_mask;         /* capacity - 1 (capacity is a power of two) */
    uint64_t hash_seed;        /* mixed into the pair hash; chosen at load */
    TokTrieNode *trie;         /* byte trie of the added tokens; node 0 is the root */
    int n_trie;
    unsigned char added_first[256]; /* 1 if some added token starts with this byte */
} Tokenizer;

/* Parses a tokenizer section (docs/FORMAT.md) of `size` bytes. `section` may be unaligned
 * and need not outlive the tokenizer (everything needed is copied). Everything is checked:
 * counts against size, kinds, ids in range, token lengths and the number of added tokens
 * against the limits above, that every merge's bytes are the concatenation of its parts,
 * that no pair is merged twice and no token is made by two merges, and that all 256 single
 * bytes have a BPE token (so any input encodes). Time and memory are linear in size.
 * Returns 0, or -1 with a one-line reason in err (err may be NULL). On failure nothing needs
 * to be freed. */
int tokenizer_load(Tokenizer *t, const unsigned char *section, size_t size, char *err, size_t err_len);

void tokenizer_free(Tokenizer *t);

/* Encodes len bytes of text (any bytes; no BOS is added). On success *ids is a malloc'd
 * array of *n_ids ids (free() it; may be non-NULL with *n_ids == 0) and 0 is returned.
 * Returns -1 (and *ids = NULL, *n_ids = 0) only when out of memory (or for a single
 * pre-token longer than INT_MAX/3 bytes, too long to index). The tokenizer is not
 * modified, so several threads may encode with one tokenizer at once. */
int tokenizer_encode(const Tokenizer *t, const unsigned char *text, size_t len, int **ids, size_t *n_ids);

/* The bytes of token id (not NUL-terminated). Unused and out-of-range ids have length 0. */
const unsigned char *tokenizer_token_bytes(const Tokenizer *t, int id, size_t *len);

/* Streaming output of decoded bytes that only ever prints whole UTF-8 characters: a
 * trailing, so far valid but incomplete sequence is held back until the bytes that complete
 * it arrive; bytes that cannot be part of valid UTF-8 are written at once. Every byte is
 * written exactly once, in order. Zero-initialize (Utf8Stream s = {0};), write the bytes of
 * each token as it is generated, and flush at the end to write a held-back remainder. */
typedef struct {
    unsigned char pending[4];
    int n_pending;  /* bytes held back */
    int need;       /* total length of the held-back sequence */
} Utf8Stream;

void utf8_stream_write(Utf8Stream *s, const unsigned char *bytes, size_t n, FILE *out);
void utf8_stream_flush(Utf8Stream *s, FILE *out);

#endif
