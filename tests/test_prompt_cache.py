"""The prompt cache (--prompt-cache FILE, --prompt-cache-ro; docs/FORMAT.md).

A run whose prompt begins with the tokens a cache file holds takes their keys and values
from it and processes only the rest. The bound: the same generated ids, greedy and
sampled with a seed, and logits of the newly processed positions within REL_BOUND of a run
without the cache (relative to the largest logit). They are not always bit-identical: the
positions come in other batches than without the cache, and a batch's size picks the
kernel (row panels or register tiles, blocked or per-query attention), which sums in
another order. A planted mistake (the cache's keys shifted by one position) must break the
bound. Every damaged, stale or mismatched file gives one warning line and the normal
answer; --prompt-cache-ro never writes; the write is atomic (nothing but the file itself
is left behind).
"""
import json
import os
import re
import struct

import numpy as np

from common import WORK, checkpoint, converted, phi2, read_logits, rel_max_diff

N_REAL = 50295
VOCAB = 51200  # the tiny preset's vocab_size (padded)
REL_BOUND = 1e-5
RNG = np.random.default_rng(5)
PREAMBLE = [int(i) for i in RNG.integers(0, N_REAL, size=80)]
TAIL_A = [int(i) for i in RNG.integers(0, N_REAL, size=9)]
TAIL_B = [int(i) for i in RNG.integers(0, N_REAL, size=5)]
HEADER = 64


def ids(tokens):
    return ",".join(map(str, tokens))


def cache_path(name):
    os.makedirs(WORK, exist_ok=True)
    path = os.path.join(WORK, f"prompt-cache-{name}.bin")
    if os.path.exists(path):
        os.remove(path)
    return path


def complete(model, tokens, *flags, n=12):
    """(generated ids, number of prompt tokens taken from the cache or None, stderr)."""
    p = phi2(model, "--ids", ids(tokens), "-n", n, "--ignore-eos", "--print-ids", *flags)
    m = re.search(r"\((\d+) from the cache\)", p.err)
    return p.out.strip(), int(m.group(1)) if m else None, p.err


def fix_checksums(data):
    """The payload's two sums (u64 words, and (i+1) * word i, mod 2^64) into the header."""
    words = np.frombuffer(bytes(data[HEADER:]), dtype="<u8")
    total = int(words.sum(dtype=np.uint64))
    weighted = int((words * np.arange(1, len(words) + 1, dtype=np.uint64)).sum(dtype=np.uint64))
    struct.pack_into("<QQ", data, 48, total, weighted)


def warnings(err):
    return [ln for ln in err.splitlines() if ln.startswith("phi2: warning:")]


def test_hit_gives_the_same_ids_and_reuses_the_common_prefix():
    """First run: nothing cached (no warning: a missing file is the normal first run), the
    file written. A run with the same prompt reuses all but its last token; one that shares
    only the preamble reuses exactly the preamble; ids equal the runs without a cache,
    greedy and seeded sampling, f32 and q8 models (f16 KV cache for q8)."""
    for dtype in ("f32", "q8"):
        model = converted(checkpoint(), dtype)
        cache = cache_path(f"hit-{dtype}")
        for sampling in (("--temp", 0), ("--temp", 0.8, "-s", 7)):
            if os.path.exists(cache):
                os.remove(cache)
            want_a, none, _ = complete(model, PREAMBLE + TAIL_A, *sampling)
            assert none is None
            got, reused, err = complete(model, PREAMBLE + TAIL_A, *sampling, "--prompt-cache", cache)
            assert (got, reused, warnings(err)) == (want_a, 0, []), err[-800:]
            assert os.path.getsize(cache) > HEADER
            got, reused, err = complete(model, PREAMBLE + TAIL_A, *sampling, "--prompt-cache", cache)
            assert (got, reused) == (want_a, len(PREAMBLE + TAIL_A) - 1), err[-800:]
            want_b, _, _ = complete(model, PREAMBLE + TAIL_B, *sampling)
            got, reused, err = complete(model, PREAMBLE + TAIL_B, *sampling, "--prompt-cache", cache)
            assert (got, reused) == (want_b, len(PREAMBLE)), err[-800:]
            # that run rewrote the cache for its own prompt: A now shares only the preamble
            got, reused, err = complete(model, PREAMBLE + TAIL_A, *sampling, "--prompt-cache", cache)
            assert (got, reused) == (want_a, len(PREAMBLE)), err[-800:]
            assert not [f for f in os.listdir(WORK) if f.startswith(os.path.basename(cache) + ".")]  # no .tmp


def dumped(model, tokens, *flags):
    out = os.path.join(WORK, "prompt-cache-logits.f32")
    phi2(model, "--ids", ids(tokens), "--dump-logits", out, *flags)
    rows = read_logits(out, VOCAB)
    os.remove(out)
    return rows


def test_logits_within_the_bound_and_a_planted_shift_breaks_it():
    """--dump-logits with a cache holds the rows of the positions not in the cache; they
    match the full run's last rows within REL_BOUND. Shifting the cached keys by one
    position (the file's checksums recomputed) breaks the bound."""
    model = converted(checkpoint())
    cache = cache_path("logits")
    full = dumped(model, PREAMBLE + TAIL_A)
    assert dumped(model, PREAMBLE, "--prompt-cache", cache).shape == (len(PREAMBLE), VOCAB)
    rest = dumped(model, PREAMBLE + TAIL_A, "--prompt-cache", cache, "--prompt-cache-ro")
    assert rest.shape == (len(TAIL_A), VOCAB)
    diff = rel_max_diff(rest, full[len(PREAMBLE):])
    print(f"     cache hit, {len(TAIL_A)} new positions: max|diff|/max|ref| = {diff:.2e} (bound {REL_BOUND})")
    assert diff <= REL_BOUND
    # planted: the keys of every head moved one position later (position 0's dropped)
    data = bytearray(open(cache, "rb").read())
    n = struct.unpack_from("<I", data, 20)[0]
    n_layers, hidden = struct.unpack_from("<II", data, 40)
    n_heads = json.load(open(os.path.join(checkpoint(), "config.json")))["num_attention_heads"]
    row = hidden // n_heads * 4  # one position of one head: head_dim floats (f32 model: f32 cache)
    kv0, per_head = HEADER + (n * 4 + 7) // 8 * 8, n * row
    for lh in range(n_layers * n_heads):  # the keys
        start = kv0 + lh * per_head
        data[start + row:start + per_head] = bytes(data[start:start + per_head - row])
    fix_checksums(data)
    with open(cache, "wb") as f:
        f.write(data)
    shifted = dumped(model, PREAMBLE + TAIL_A, "--prompt-cache", cache, "--prompt-cache-ro")
    planted = rel_max_diff(shifted, full[len(PREAMBLE):])
    print(f"     planted one-position shift of the cached keys: {planted:.2e}")
    assert planted > 100 * REL_BOUND


def test_every_bad_cache_falls_back_with_one_warning():
    """Truncated, a flipped payload byte, a flipped magic, an unchecked byte of the header
    (the version), another model file, another --kv-type, another --ctx-size, garbage, a
    directory: each gives exactly one warning line naming the problem, the answer of a run
    without a cache and exit 0; the file is then rewritten for this prompt (a directory
    cannot be: a second warning). --prompt-cache-ro never writes a file."""
    model, q8 = converted(checkpoint()), converted(checkpoint(), "q8")
    prompt = PREAMBLE + TAIL_A
    want, _, _ = complete(model, prompt, "--temp", 0)
    good = cache_path("good")
    complete(model, prompt, "--temp", 0, "--prompt-cache", good)
    good_bytes = open(good, "rb").read()
    q8_cache = cache_path("other-model")
    complete(q8, prompt, "--temp", 0, "--prompt-cache", q8_cache)

    def flipped(off):
        d = bytearray(good_bytes)
        d[off] ^= 0x10
        return bytes(d)

    cases = [("truncated", good_bytes[:-1], (), "truncated"),
             ("one byte longer", good_bytes + b"\0", (), "longer"),
             ("payload byte flipped", flipped(len(good_bytes) - 100), (), "checksum"),
             ("token id flipped", flipped(HEADER + 4), (), "checksum"),
             ("magic flipped", flipped(3), (), "not a prompt cache"),
             ("version flipped", flipped(8), (), "version"),
             ("empty file", b"", (), "not a prompt cache"),
             ("garbage", bytes(range(256)) * 8, (), "not a prompt cache"),
             ("another model", open(q8_cache, "rb").read(), (), "another model"),
             ("another KV type", good_bytes, ("--kv-type", "f16"), "--kv-type"),
             ("another context size", good_bytes, ("-c", "1024"), "--ctx-size")]
    for name, content, flags, problem in cases:
        for ro in (False, True):
            path = cache_path("bad")
            with open(path, "wb") as f:
                f.write(content)
            got, reused, err = complete(model, prompt, "--temp", 0, *flags, "--prompt-cache", path,
                                        *(["--prompt-cache-ro"] if ro else []))
            w = warnings(err)
            assert got == want and reused == 0, f"{name}: {got} vs {want}\n{err[-600:]}"
            assert len(w) == 1 and problem in w[0] and "whole prompt" in w[0], f"{name}: {w}"
            after = open(path, "rb").read()
            if ro:
                assert after == content, f"{name}: --prompt-cache-ro changed the file"
            elif not flags:
                assert after == good_bytes, f"{name}: the cache was not rewritten as the good one"
    # a directory: it can be neither read nor replaced
    d = cache_path("dir")
    os.makedirs(d)
    got, reused, err = complete(model, prompt, "--temp", 0, "--prompt-cache", d)
    w = warnings(err)
    assert got == want and reused == 0 and len(w) == 2 and "cannot write" in w[1], err[-600:]
    assert os.path.isdir(d) and not os.listdir(d)
    os.rmdir(d)
    # read-only and missing: nothing created, no warning
    missing = cache_path("missing")
    got, reused, err = complete(model, prompt, "--temp", 0, "--prompt-cache", missing, "--prompt-cache-ro")
    assert got == want and reused == 0 and not warnings(err) and not os.path.exists(missing), err[-600:]


def test_interactive_prefix_comes_from_the_cache():
    """-i with a prefix: the first session reads the prefix and saves it before the first
    turn; the next takes all of it but its last token from the cache. Both answer the turns
    with the ids of a session without the cache; the turns are never saved (the file is the
    same after the second session, and holds the prefix only)."""
    model = converted(checkpoint(), "q8")
    cache = cache_path("interactive")
    turns = b"Hello there\nAnd once more\n"
    prefix = "A system text that every session begins with, read once and then kept. " * 4
    n_prefix = len(phi2(model, "-p", prefix, "--tokenize").out.strip().split(","))
    session = ("-i", "-p", prefix, "--temp", "0", "--print-ids", "-n", 6)
    want = phi2(model, *session, input=turns).out
    runs = []
    for _ in range(2):
        p = phi2(model, *session, "--prompt-cache", cache, input=turns)
        m = re.search(r"\((\d+) from the cache\)", p.err)
        runs.append((p.out, int(m.group(1)) if m else None, warnings(p.err), open(cache, "rb").read()))
    assert runs[0][:3] == (want, 0, []), runs[0][1:3]
    assert runs[1][:3] == (want, n_prefix - 1, []), runs[1][1:3]
    assert runs[1][3] == runs[0][3] and struct.unpack_from("<I", runs[0][3], 20)[0] == n_prefix


def test_flags_that_do_not_go_together():
    model = converted(checkpoint())
    for flags, msg in ((("--prompt-cache-ro",), "needs --prompt-cache"),
                       (("--prompt-cache", "x", "--tokenize"), "not with"),
                       (("--prompt-cache", "x", "--trace", "t"), "not with")):
        p = phi2(model, "-p", "hi", *flags, check=False)
        lines = [ln for ln in p.err.splitlines() if ln.strip()]
        assert p.returncode == 1 and len(lines) == 1 and msg in lines[0], p.err[-400:]
