/* tokenizer_tool.c -- test driver for tokenizer.c (built as build/tokenizer_tool).
 *
 * usage: tokenizer_tool MODEL.bin COMMAND [ARG]     tokenizer from a model file's section
 *        tokenizer_tool --section FILE COMMAND [ARG] tokenizer from a raw section file
 * commands:
 *   load               load and validate only; prints "ok N_TOKENS N_MERGES"
 *   encode FILE        prints the ids of FILE's bytes, comma-separated ("-" = stdin)
 *   decode IDS         writes the bytes of comma-separated ids
 *   decode-each IDS    prints the hex of each id's bytes, one line per id ("-" if none)
 *   roundtrip FILE     checks decode(encode(FILE)) == FILE; prints "ok N_BYTES N_IDS"
 *   encode-hex FILE    batch mode: every line of FILE is one text in hex; prints one line
 *                      of comma-separated ids per line, after checking it round-trips
 *   stream IDS         feeds each token's bytes to a Utf8Stream; prints one line per token
 *                      with the hex of what it wrote ("-" if nothing), then "flush HEX"
 *   fuzz N SEED        round-trips N pseudo-random byte strings; prints "ok N"
 *   bench FILE [REPS]  prints the best encode time of REPS runs in milliseconds
 * Exit status 0 on success, 1 on any failure (with a message on stderr).
 */
#define _POSIX_C_SOURCE 199309L   /* clock_gettime */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../tokenizer.h"

static void die(const char *msg, const char *arg) {
    fprintf(stderr, "tokenizer_tool: %s%s%s\n", msg, arg ? ": " : "", arg ? arg : "");
    exit(1);
}

/* Reads a whole file ("-" = stdin). */
static unsigned char *read_all(const char *path, size_t *len) {
    FILE *f = strcmp(path, "-") == 0 ? stdin : fopen(path, "rb");
    if (!f) die("cannot open", path);
    size_t cap = 1 << 16, n = 0;
    unsigned char *buf = malloc(cap);
    if (!buf) die("out of memory", NULL);
    size_t got;
    while ((got = fread(buf + n, 1, cap - n, f)) > 0) {
        n += got;
        if (n == cap) {
            if (cap > SIZE_MAX / 2) die("file too large", path);
            unsigned char *bigger = realloc(buf, cap * 2);
            if (!bigger) die("out of memory", NULL);
            buf = bigger;
            cap *= 2;
        }
    }
    if (ferror(f)) die("read error", path);
    if (f != stdin) fclose(f);
    *len = n;
    return buf;
}

static uint64_t rd64(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = v << 8 | p[i];
    return v;
}

static uint64_t fnv1a(const unsigned char *p, size_t n) {
    uint64_t h = 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 0x100000001b3ULL;
    }
    return h;
}

/* The tokenizer section of a model file (docs/FORMAT.md): checks magic, version, bounds and
 * both checksums, and reads only the header and the section. */
static unsigned char *read_model_section(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) die("cannot open", path);
    unsigned char h[256];
    if (fread(h, 1, 256, f) != 256) die("file shorter than the 256-byte header", path);
    if (memcmp(h, "PHI2CBIN", 8) != 0) die("bad magic", path);
    if (h[8] != 2 || h[9] || h[10] || h[11]) die("unsupported version (expected 2)", path);
    if (fnv1a(h, 248) != rd64(h + 248)) die("header checksum mismatch", path);
    uint64_t off = rd64(h + 72), size = rd64(h + 80), file_size = rd64(h + 104);
    if (fseek(f, 0, SEEK_END) != 0) die("cannot seek", path);
    long actual = ftell(f);
    if (actual < 0 || (uint64_t)actual != file_size) die("file size differs from the header", path);
    if (off < 256 || off > file_size || size > file_size - off || size > SIZE_MAX)
        die("tokenizer section out of bounds", path);
    unsigned char *sec = malloc(size ? (size_t)size : 1);
    if (!sec) die("out of memory", NULL);
    if (fseek(f, (long)off, SEEK_SET) != 0 || fread(sec, 1, (size_t)size, f) != size)
        die("cannot read the tokenizer section", path);
    fclose(f);
    if (fnv1a(sec, (size_t)size) != rd64(h + 112)) die("tokenizer checksum mismatch", path);
    *len = (size_t)size;
    return sec;
}

/* Parses "1,2,3" (empty string = no ids). */
static int *parse_ids(const char *s, size_t *n) {
    size_t cap = strlen(s) / 2 + 1, k = 0;
    int *ids = malloc(cap * sizeof(int));
    if (!ids) die("out of memory", NULL);
    while (*s) {
        char *end;
        long v = strtol(s, &end, 10);
        if (end == s || v < -1000000000L || v > 1000000000L) die("bad id list", s);
        ids[k++] = (int)v;
        s = *end == ',' ? end + 1 : end;
        if (*end && *end != ',') die("bad id list", end);
    }
    *n = k;
    return ids;
}

static void encode_or_die(const Tokenizer *t, const unsigned char *text, size_t len, int **ids, size_t *n) {
    if (tokenizer_encode(t, text, len, ids, n) != 0) die("encode: out of memory", NULL);
}

static int hexval(int c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* decode(ids) == text? */
static int roundtrip_ok(const Tokenizer *t, const unsigned char *text, size_t len, const int *ids, size_t n) {
    size_t pos = 0;
    for (size_t i = 0; i < n; i++) {
        size_t tl;
        const unsigned char *tb = tokenizer_token_bytes(t, ids[i], &tl);
        if (tl == 0 || tl > len - pos || memcmp(tb, text + pos, tl) != 0) return 0;
        pos += tl;
    }
    return pos == len;
}

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

/* xorshift64*: a small deterministic generator for the fuzz command. */
static uint64_t rng_state;
static uint32_t rng(void) {
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return (uint32_t)((rng_state * 0x2545F4914F6CDD1DULL) >> 32);
}

/* Random text biased towards what stresses the tokenizer: spaces, tabs, newlines, letters,
 * apostrophes, partial and complete multi-byte sequences, `<|endoftext|>`, any byte. */
static size_t random_text(unsigned char *buf, size_t cap) {
    static const char *pieces[] = { " ", "  ", "\t", "\n", "'", "'s", "'ll", "a", "Z", "7",
                                    "\xc3\xa9", "\xe4\xb8\xad", "\xf0\x9f\x98\x80", "\xe2\x80",
                                    "\xf0\x9f", "\xc3", "\x80", "\xff", "<|endoftext|>",
                                    "<|endof", "!!", "\r\n", "\xc2\xa0", "\xe3\x80\x80" };
    size_t n = 0, target = rng() % cap;
    while (n < target) {
        if (rng() % 3 == 0) {
            buf[n++] = (unsigned char)rng();
        } else {
            const char *p = pieces[rng() % (sizeof(pieces) / sizeof(pieces[0]))];
            size_t pl = strlen(p);
            if (pl > cap - n) break;
            memcpy(buf + n, p, pl);
            n += pl;
        }
    }
    return n;
}

int main(int argc, char **argv) {
    if (argc < 3) die("usage: tokenizer_tool (MODEL.bin | --section FILE) COMMAND [ARG...]", NULL);
    int a = 1;
    size_t sec_len;
    unsigned char *sec;
    if (strcmp(argv[a], "--section") == 0) {
        if (argc < 4) die("usage: tokenizer_tool --section FILE COMMAND [ARG...]", NULL);
        sec = read_all(argv[a + 1], &sec_len);
        a += 2;
    } else {
        sec = read_model_section(argv[a], &sec_len);
        a += 1;
    }
    Tokenizer t;
    char err[256];
    if (tokenizer_load(&t, sec, sec_len, err, sizeof(err)) != 0) die(err, NULL);
    free(sec);   /* the tokenizer keeps copies of what it needs */
    const char *cmd = argv[a];
    const char *arg = a + 1 < argc ? argv[a + 1] : NULL;

    if (strcmp(cmd, "load") == 0) {
        printf("ok %d %d\n", t.n_tokens, t.n_merges);
    } else if (strcmp(cmd, "encode") == 0 || strcmp(cmd, "roundtrip") == 0) {
        if (!arg) die("missing FILE", NULL);
        size_t len, n;
        int *ids;
        unsigned char *text = read_all(arg, &len);
        encode_or_die(&t, text, len, &ids, &n);
        if (strcmp(cmd, "encode") == 0) {
            for (size_t i = 0; i < n; i++) printf(i ? ",%d" : "%d", ids[i]);
            printf("\n");
        } else {
            if (!roundtrip_ok(&t, text, len, ids, n)) die("round trip mismatch", arg);
            printf("ok %zu %zu\n", len, n);
        }
        free(ids);
        free(text);
    } else if (strcmp(cmd, "encode-hex") == 0) {
        if (!arg) die("missing FILE", NULL);
        size_t len;
        unsigned char *in = read_all(arg, &len);
        unsigned char *text = malloc(len / 2 + 1);
        if (!text) die("out of memory", NULL);
        for (size_t i = 0; i < len;) {   /* one line = one case */
            size_t n = 0, n_ids;
            for (; i < len && in[i] != '\n'; i += 2) {
                int hi = hexval(in[i]), lo = i + 1 < len ? hexval(in[i + 1]) : -1;
                if (hi < 0 || lo < 0) die("bad hex line", arg);
                text[n++] = (unsigned char)(hi << 4 | lo);
            }
            i++;   /* the newline */
            int *ids;
            encode_or_die(&t, text, n, &ids, &n_ids);
            if (!roundtrip_ok(&t, text, n, ids, n_ids)) die("round trip mismatch", arg);
            for (size_t k = 0; k < n_ids; k++) printf(k ? ",%d" : "%d", ids[k]);
            printf("\n");
            free(ids);
        }
        free(text);
        free(in);
    } else if (strcmp(cmd, "decode") == 0 || strcmp(cmd, "decode-each") == 0 || strcmp(cmd, "stream") == 0) {
        size_t n;
        int *ids = parse_ids(arg ? arg : "", &n);
        if (strcmp(cmd, "decode-each") == 0) {
            for (size_t i = 0; i < n; i++) {
                size_t tl;
                const unsigned char *tb = tokenizer_token_bytes(&t, ids[i], &tl);
                if (tl == 0) printf("-");
                for (size_t k = 0; k < tl; k++) printf("%02x", tb[k]);
                printf("\n");
            }
        } else if (strcmp(cmd, "decode") == 0) {
            for (size_t i = 0; i < n; i++) {
                size_t tl;
                const unsigned char *tb = tokenizer_token_bytes(&t, ids[i], &tl);
                fwrite(tb, 1, tl, stdout);
            }
        } else {
            /* Write through the stream into a temporary file and report, per token, the
             * bytes that came out, so the test sees exactly when each character appeared. */
            FILE *tmp = tmpfile();
            if (!tmp) die("tmpfile failed", NULL);
            Utf8Stream s = {0};
            long seen = 0;
            for (size_t i = 0; i <= n; i++) {
                if (i < n) {
                    size_t tl;
                    const unsigned char *tb = tokenizer_token_bytes(&t, ids[i], &tl);
                    utf8_stream_write(&s, tb, tl, tmp);
                    fflush(tmp);
                } else {
                    utf8_stream_flush(&s, tmp);
                    printf("flush ");
                }
                long end = ftell(tmp);
                if (end == seen) printf("-");
                fseek(tmp, seen, SEEK_SET);
                for (long k = seen; k < end; k++) printf("%02x", (unsigned)fgetc(tmp));
                fseek(tmp, end, SEEK_SET);
                seen = end;
                printf("\n");
            }
            fclose(tmp);
        }
        free(ids);
    } else if (strcmp(cmd, "fuzz") == 0) {
        long count = arg ? atol(arg) : 1000;
        rng_state = (a + 2 < argc ? strtoull(argv[a + 2], NULL, 10) : 1) * 2654435761ULL + 1;
        enum { CAP = 512 };
        unsigned char buf[CAP];
        for (long k = 0; k < count; k++) {
            size_t len = random_text(buf, CAP), n;
            int *ids;
            encode_or_die(&t, buf, len, &ids, &n);
            if (!roundtrip_ok(&t, buf, len, ids, n)) {
                fprintf(stderr, "tokenizer_tool: fuzz case %ld (%zu bytes) does not round-trip\n", k, len);
                return 1;
            }
            free(ids);
        }
        printf("ok %ld\n", count);
    } else if (strcmp(cmd, "bench") == 0) {
        if (!arg) die("missing FILE", NULL);
        int reps = a + 2 < argc ? atoi(argv[a + 2]) : 5;
        size_t len, n = 0;
        unsigned char *text = read_all(arg, &len);
        double best = 1e30;
        for (int r = 0; r < (reps > 0 ? reps : 1); r++) {
            int *ids;
            double t0 = now_ms();
            encode_or_die(&t, text, len, &ids, &n);
            double dt = now_ms() - t0;
            if (dt < best) best = dt;
            free(ids);
        }
        printf("%.3f ms to encode %zu bytes into %zu tokens\n", best, len, n);
        free(text);
    } else {
        die("unknown command", cmd);
    }
    tokenizer_free(&t);
    return 0;
}
