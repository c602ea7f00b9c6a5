/*
 * fuzz_utf8_stream.c -- libFuzzer harness: the streaming UTF-8 writer of tokenizer.h
 * (utf8_stream_write / utf8_stream_flush), which the engine prints generated text through.
 *
 *   make fuzz                                    all harnesses (tests/fuzz/run.sh)
 *   build/fuzz/fuzz_utf8_stream CRASH_FILE       replay one input
 *
 * Input: a sequence of records [control byte][payload]. The payload is (control & 0x3f)
 * bytes (fewer at the end of the input), written with one utf8_stream_write() call; if
 * control & 0x80, utf8_stream_flush() follows. A final flush ends every input. Output
 * goes to a memory stream (open_memstream).
 *
 * What tokenizer.h promises, checked after every call against an independent UTF-8 scanner
 * written here (RFC 3629: no overlongs, no surrogates, nothing above U+10FFFF):
 *   - every byte is written exactly once, in order: the output so far is a prefix of the
 *     input so far, and after a flush it is all of it;
 *   - the bytes held back are exactly the trailing valid-but-incomplete sequence of the
 *     input since the last flush, if there is one: whole characters and bytes that cannot
 *     be part of valid UTF-8 are written at once, and a write never ends in the middle of
 *     a character that the next bytes could still complete.
 * Seeds: tests/fuzz/corpus/utf8_stream/ (make_seeds.py).
 */
#define _POSIX_C_SOURCE 200809L  // open_memstream
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../tokenizer.h"

/* Bytes a UTF-8 sequence starting with lead byte b has (0: b cannot start one). */
static int seq_len(unsigned char b) {
    if (b < 0x80) return 1;
    if (b >= 0xC2 && b <= 0xDF) return 2;
    if (b >= 0xE0 && b <= 0xEF) return 3;
    if (b >= 0xF0 && b <= 0xF4) return 4;
    return 0;
}

/* Whether c may follow lead byte b as the second byte of a sequence. */
static int second_ok(unsigned char b, unsigned char c) {
    if (b == 0xE0) return c >= 0xA0 && c <= 0xBF;  // no overlong 3-byte forms
    if (b == 0xED) return c >= 0x80 && c <= 0x9F;  // no surrogates
    if (b == 0xF0) return c >= 0x90 && c <= 0xBF;  // no overlong 4-byte forms
    if (b == 0xF4) return c >= 0x80 && c <= 0x8F;  // nothing above U+10FFFF
    return c >= 0x80 && c <= 0xBF;
}

/* Length of the valid but incomplete UTF-8 sequence that p[0..n) ends with (0 if none),
 * scanning from p[0] as a decoder would: a whole character, or one invalid byte, at a time. */
static size_t incomplete_tail(const unsigned char *p, size_t n) {
    size_t i = 0;
    while (i < n) {
        int len = seq_len(p[i]);
        if (len == 0) { i++; continue; }
        size_t k = 1;  // bytes of the sequence present and valid so far
        while (k < (size_t)len && i + k < n &&
               (k == 1 ? second_ok(p[i], p[i + 1]) : (p[i + k] & 0xC0) == 0x80))
            k++;
        if (k == (size_t)len) i += k;      // a whole character
        else if (i + k == n) return k;     // valid so far, cut off by the end
        else i++;                          // invalid: the lead byte alone
    }
    return 0;
}

static void fail(const char *what, size_t in_len, size_t out_len) {
    /* stdout, flushed: run.sh hides stderr (-close_fd_mask=2) */
    printf("fuzz_utf8_stream: %s (input so far %zu bytes, output %zu bytes)\n", what, in_len, out_len);
    fflush(stdout);
    abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char *out = NULL;
    size_t out_len = 0;
    FILE *f = open_memstream(&out, &out_len);
    if (!f) return 0;
    unsigned char *in = malloc(size ? size : 1);  // the payload bytes written so far
    size_t in_len = 0, segment = 0;               // segment: where the input since the last flush starts
    Utf8Stream s = {0};
    size_t pos = 0;
    for (;;) {
        int last = pos >= size;
        size_t n = 0;
        int flush = 1;
        if (!last) {
            unsigned char control = data[pos++];
            n = control & 0x3F;
            if (n > size - pos) n = size - pos;
            flush = (control & 0x80) != 0;
            memcpy(in + in_len, data + pos, n);
            utf8_stream_write(&s, data + pos, n, f);
            pos += n;
            in_len += n;
        }
        if (flush) {
            utf8_stream_flush(&s, f);
            segment = in_len;
        }
        fflush(f);  // updates out_len
        size_t held = in_len - segment ? incomplete_tail(in + segment, in_len - segment) : 0;
        if (out_len > in_len || memcmp(out, in, out_len) != 0) fail("output is not the input", in_len, out_len);
        if (out_len != in_len - held) fail("holds back the wrong bytes", in_len, out_len);
        if (last) break;
    }
    fclose(f);
    free(out);
    free(in);
    return 0;
}
