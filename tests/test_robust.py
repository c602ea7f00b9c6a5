"""Reliability regressions: each test here failed on the engine before the fix it guards.

Hostile model files (a tokenizer larger than the vocabulary, overflowing shapes, quadratic
merge sections, non-finite weights), a full disk, a closed pipe and Ctrl-C. Every error is
one line starting "phi2: error:" with exit status 1; see also test_corrupt.py (the matrix of
damaged files) and tests/fuzz/ (libFuzzer harnesses).
"""
import os
import re
import signal
import struct
import subprocess
import time

import numpy as np

from common import PHI2, REPO, WORK, checkpoint, converted, phi2, run
from test_cli import expect_error, fnv1a64
from test_convert import weight_sums  # FORMAT.md's weights checksums, checked there
import tok_section

TOOL = os.path.join(REPO, "build", "tokenizer_tool")
HEADER_SIZE = 256


def tiny_model(dtype="f32"):
    return converted(checkpoint(), dtype)


def align64(n):
    return (n + 63) // 64 * 64


def rewrite_model(name, src=None, tokenizer=None, weights=None, header=None):
    """A consistent model file (every offset and checksum recomputed) from src with its
    tokenizer section and/or weights replaced, and header fields patched (header: a function
    of the 256-byte bytearray, applied before the header checksum is recomputed)."""
    data = open(src or tiny_model(), "rb").read()
    tok_off, tok_size, w_off, w_size = struct.unpack_from("<QQQQ", data, 72)
    tok = data[tok_off:tok_off + tok_size] if tokenizer is None else tokenizer
    wts = data[w_off:w_off + w_size] if weights is None else bytes(weights)
    new_w_off = align64(HEADER_SIZE + len(tok))
    h = bytearray(data[:HEADER_SIZE])
    struct.pack_into("<QQQQQQ", h, 72, HEADER_SIZE, len(tok), new_w_off, len(wts), new_w_off + len(wts),
                     fnv1a64(tok))
    struct.pack_into("<QQ", h, 120, *weight_sums(wts))
    if header:
        header(h)
    struct.pack_into("<Q", h, 248, fnv1a64(bytes(h[:248])))
    path = os.path.join(WORK, name)
    with open(path, "wb") as f:
        f.write(h + tok + b"\0" * (new_w_off - HEADER_SIZE - len(tok)) + wts)
    return path


def section(tokens, merges):
    """A raw tokenizer section: tokens = [(kind, bytes)], merges = [(left, right, merged)]."""
    out = [struct.pack("<II", len(tokens), len(merges))]
    out += [struct.pack("<BI", k, len(b)) + b for k, b in tokens]
    out += [struct.pack("<III", *m) for m in merges]
    return b"".join(out)


def byte_tokens():
    return [(1, bytes([b])) for b in range(256)]


# ------------------------------------------------------------------ hostile model files

def test_tokenizer_larger_than_vocabulary_is_rejected():
    """An added token whose id is past vocab_size would index past the embedding table
    (it used to segfault in matrix_row, or silently read another tensor)."""
    import phi2_tokenizer_json
    tj = phi2_tokenizer_json.build()
    for bad_id in (51200, 60000):
        tj2 = dict(tj, added_tokens=tj["added_tokens"] + [{"id": bad_id, "content": "ZZ"}])
        m = rewrite_model(f"tok-past-vocab-{bad_id}.bin", tokenizer=tok_section.section_bytes(tj2))
        line = expect_error(m, "-p", "ZZ", contains="vocab_size")
        assert "more than vocab_size 51200" in line, line
        expect_error(m, "--tokenize", "-p", "ZZ", contains="vocab_size")
    # the same section with the token inside the vocabulary loads and encodes ZZ to its id
    tj3 = dict(tj, added_tokens=tj["added_tokens"] + [{"id": 51199, "content": "ZZ"}])
    m = rewrite_model("tok-in-vocab.bin", tokenizer=tok_section.section_bytes(tj3))
    assert phi2(m, "--tokenize", "-p", "ZZ").out.strip() == "51199"
    assert phi2(m, "-p", "ZZ", "-n", "2", "--temp", "0").returncode == 0


def test_shape_products_cannot_wrap():
    """head_dim x n_heads was an int product: 65536 x 65537 wrapped to 65536 == hidden."""
    def shapes(head_dim, n_heads, hidden):
        def patch(h):
            struct.pack_into("<I", h, 20, hidden)
            struct.pack_into("<II", h, 32, n_heads, head_dim)
        return patch
    m = rewrite_model("wrap.bin", header=shapes(65536, 65537, 65536))
    expect_error(m, "-p", "hi", contains="outside")
    # within every limit but inconsistent
    m = rewrite_model("heads-mismatch.bin", header=shapes(64, 3, 128))
    expect_error(m, "-p", "hi", contains="heads")
    for offset, field, value in ((16, "vocab_size", 1 << 20 | 1), (20, "hidden_dim", 1 << 16 | 1),
                                 (24, "ffn_dim", 1 << 18 | 1), (28, "n_layers", 1025), (44, "max_seq_len", (1 << 20) + 1)):
        m = rewrite_model(f"limit-{field}.bin", header=lambda h: struct.pack_into("<I", h, offset, value))
        expect_error(m, "-p", "hi", contains=field)


def test_reserved_header_field_68_is_checked():
    m = rewrite_model("reserved68.bin", header=lambda h: struct.pack_into("<I", h, 68, 1))
    expect_error(m, "-p", "hi", contains="reserved")
    m = rewrite_model("reserved200.bin", header=lambda h: h.__setitem__(200, 7))
    expect_error(m, "-p", "hi", contains="reserved")


def test_merge_section_rules():
    """Duplicate pairs and tokens made by two merges are rejected by name (they made the old
    validation quadratic: every merge compared the bytes of the same long token)."""
    toks = byte_tokens() + [(1, b"ab"), (1, b"abc"), (1, b"bc"), (1, b"ab")]
    ab, abc, bc, ab2 = 256, 257, 258, 259
    a, b, c = ord("a"), ord("b"), ord("c")
    ok = section(toks, [(a, b, ab), (b, c, bc), (ab, c, abc)])
    path = os.path.join(WORK, "merges-ok.sec")
    open(path, "wb").write(ok)
    assert run([TOOL, "--section", path, "load"]).out.strip() == "ok 260 3"
    cases = {
        "merged twice": [(a, b, ab), (a, b, ab2)],
        "already the result": [(a, b, ab), (ab, c, abc), (a, bc, abc)],
        "is not": [(a, c, ab)],
    }
    for expected, merges in cases.items():
        path = os.path.join(WORK, "merges-bad.sec")
        open(path, "wb").write(section(toks, merges))
        p = run([TOOL, "--section", path, "load"], check=False)
        assert p.returncode == 1 and expected in p.err, (expected, p.err)
    # limits: a token longer than 1024 bytes, more than 1024 added tokens
    for expected, extra in (("bytes long", [(1, b"x" * 1025)]),
                            ("added tokens", [(2, b"<%d>" % i) for i in range(1025)])):
        path = os.path.join(WORK, "limits-bad.sec")
        open(path, "wb").write(section(byte_tokens() + extra, []))
        p = run([TOOL, "--section", path, "load"], check=False)
        assert p.returncode == 1 and expected in p.err, (expected, p.err)


def test_hostile_merge_section_loads_in_linear_time():
    """The old loader took 0.34 / 1.55 / 6.1 s for 1 / 2 / 4 MB of merges all producing one
    long token (quadratic: ~100 s at 16 MB). A 16 MB hostile section must now be rejected at
    once, and a valid section of long tokens chained by merges must load: both well inside
    a hang guard that the old code would blow."""
    long = b"a" * (4 << 20)
    toks = byte_tokens() + [(1, long), (1, long[:-1])]
    n = (8 << 20) // 12
    merges = [(257, ord("a"), 256)] * n  # one pair again and again, each checking 4 MB of bytes
    path = os.path.join(WORK, "hostile.sec")
    open(path, "wb").write(section(toks, merges))
    t0 = time.time()
    p = run([TOOL, "--section", path, "load"], check=False, timeout=30)
    assert p.returncode == 1 and "bytes long" in p.err, p.err
    assert time.time() - t0 < 10, "hang guard"
    # valid: a chain of 1024-byte-limited tokens, each made once: 'a'*k = 'a'*(k-1) + 'a'
    toks = byte_tokens() + [(1, b"a" * k) for k in range(2, 1025)]
    merges = [(256 + k - 3 if k > 2 else ord("a"), ord("a"), 256 + k - 2) for k in range(2, 1025)]
    path = os.path.join(WORK, "chain.sec")
    open(path, "wb").write(section(toks, merges))
    assert run([TOOL, "--section", path, "load"], timeout=30).out.strip() == f"ok {len(toks)} {len(merges)}"
    text = os.path.join(WORK, "chain.txt")
    open(text, "wb").write(b"a" * 5000)
    assert run([TOOL, "--section", path, "roundtrip", text], timeout=30).out.startswith("ok 5000")


def test_nonfinite_logits_are_an_error():
    """Weights that overflow (here: an infinite lm_head bias, or a huge final LayerNorm
    weight) must stop with a clear error, never sample from NaN."""
    src = tiny_model()
    data = open(src, "rb").read()
    w_off, w_size = struct.unpack_from("<QQ", data, 88)
    w = np.frombuffer(data[w_off:w_off + w_size], dtype="<f4").copy()
    # the lm_head bias is the last vocab_size floats of the section (no padding: 51200*4 % 64 == 0)
    bias_at = w.size - 51200
    for name, at, value in (("inf-bias.bin", bias_at + 7, np.inf), ("nan-bias.bin", bias_at + 50000, np.nan)):
        w2 = w.copy()
        w2[at] = value
        m = rewrite_model(name, weights=w2.tobytes())
        line = expect_error(m, "--ids", "1,2,3", "-n", "4", contains="logits are not finite at position 2")
        assert "id" in line
        expect_error(m, "--ids", "1,2,3", "--dump-logits", os.path.join(WORK, "nf.f32"),
                     contains="not finite at position 0")
        assert not os.path.exists(os.path.join(WORK, "nf.f32"))


# ------------------------------------------------------------------ output and signals

def test_write_error_on_stdout_is_an_error():
    m = tiny_model()
    with open("/dev/full", "wb") as full:
        for args in (("-p", "hi", "-n", "4"), ("--tokenize", "-p", "hi"), ("-p", "hi", "-n", "4", "--print-ids"),
                     ("-h",)):
            p = subprocess.run([PHI2, m, *args] if args != ("-h",) else [PHI2, "-h"], stdout=full,
                               stderr=subprocess.PIPE, timeout=60)
            err = p.stderr.decode()
            lines = [ln for ln in err.splitlines() if ln.startswith("phi2: error:")]
            assert p.returncode == 1 and len(lines) == 1 and "No space left" in lines[0], (args, p.returncode, err)


def _run_into_closed_pipe(ignore_sigpipe, *flags, n_read=10):
    m = tiny_model()
    pre = (lambda: signal.signal(signal.SIGPIPE, signal.SIG_IGN)) if ignore_sigpipe else None
    p = subprocess.Popen([PHI2, m, "-p", "Hello", "-n", "-1", "--ignore-eos", "--temp", "0", *flags],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=pre)
    got = p.stdout.read(n_read)
    p.stdout.close()
    err = p.stderr.read().decode()
    p.wait(timeout=60)
    return p.returncode, got, err


def test_closed_pipe_ends_generation_with_status_0():
    """`phi2 ... | head -c 10`: generation stops at the next token, exit status 0 and the
    timings line, whether SIGPIPE was inherited as default or ignored (which used to keep
    generating until -n; here -n is unlimited, so it would have run to the full context)."""
    for ignore in (False, True):
        rc, got, err = _run_into_closed_pipe(ignore)
        assert got.startswith(b"Hello") and rc == 0, (ignore, rc, err)
        assert "stopped: the output was closed" in err and "phi2: load" in err, err
        generated = int(err.split("generated ")[1].split(" ")[0])
        assert generated < 100, f"kept generating after the pipe closed: {generated}"


def test_closed_pipe_ends_print_ids_at_once():
    """`phi2 ... --print-ids | head -c 1`: the ids stream as they are sampled, so a reader
    that went away ends the run at the next token, as with text (status 0, the timings line).
    They used to be printed only after generation: here (-n -1) the whole context of 2047
    tokens was generated before the closed pipe was noticed."""
    for ignore in (False, True):
        rc, got, err = _run_into_closed_pipe(ignore, "--print-ids", n_read=1)
        assert got.isdigit() and rc == 0, (ignore, rc, got, err)
        assert "stopped: the output was closed" in err and "phi2: load" in err, err
        generated = int(err.split("generated ")[1].split(" ")[0])
        assert generated < 100, f"kept generating after the pipe closed: {generated}"
    # the same in interactive mode, where each answer's ids end with a newline
    m = tiny_model()
    p = subprocess.Popen([PHI2, m, "-i", "--print-ids", "-n", "2000", "--ignore-eos", "--temp", "0"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdin.write(b"hello\n")
    p.stdin.close()
    got = p.stdout.read(1)
    p.stdout.close()
    err = p.stderr.read().decode()
    p.wait(timeout=60)
    assert got.isdigit() and p.returncode == 0, (p.returncode, got, err)
    assert "stopped: the output was closed" in err, err
    generated = int(err.split("generated ")[1].split(" ")[0])
    assert generated < 100, f"kept generating after the pipe closed: {generated}"
    # a whole run streams the same line as before: the ids, comma-separated, one newline
    p = phi2(m, "-p", "Hello", "-n", "6", "--ignore-eos", "--temp", "0", "--print-ids")
    assert re.fullmatch(r"\d+(,\d+){5}\n", p.out), p.out
    assert phi2(m, "-p", "Hello", "-n", "0", "--print-ids").out == "\n"


def test_ctrl_c_prints_text_and_timings_and_exits_130():
    m = tiny_model()
    p = subprocess.Popen([PHI2, m, "-p", "Hello", "-n", "-1", "--ignore-eos", "--temp", "0"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
    first = b""
    while len(first) < 40:  # generation is under way (unbuffered: communicate() sees the rest)
        chunk = p.stdout.read(40)
        assert chunk, "no output"
        first += chunk
    p.send_signal(signal.SIGINT)
    rest, err = p.communicate(timeout=60)
    out = first + rest
    err = err.decode()
    assert p.returncode == 130, (p.returncode, err)
    assert out.startswith(b"Hello") and out.endswith(b"\n"), out[-50:]
    assert "stopped: interrupted" in err and "phi2: load" in err, err
    # the text is exactly the prompt + the generated tokens it reports
    n = int(err.split("generated ")[1].split(" ")[0])
    assert 0 < n < 2047, n
    ids = phi2(m, "-p", "Hello", "-n", n, "--ignore-eos", "--temp", "0", "--print-ids").out.strip()
    decoded = run([TOOL, m, "decode", ids]).stdout
    assert out == b"Hello" + decoded + b"\n", (n, out[-80:], decoded[-80:])


def test_endless_prompt_file_is_an_error():
    """-f /dev/zero used to read until memory ran out: a prompt file longer than the context
    could hold (ctx x 1024 bytes, the longest token) is refused while reading."""
    m = tiny_model()
    expect_error(m, "-f", "/dev/zero", "-n", "1", contains="more than the context can hold")
    expect_error(m, "-f", "/", "-n", "1", contains="cannot read")


def test_version_names_the_kernels():
    """-v names the model format and the kernels compiled in; the timings line of a run says
    the same, so benchmark figures from different machines say what ran."""
    line = phi2("-v").out.strip()
    assert re.match(r"phi2 \(model format 2(, test build)?\): ", line) and ", int8 " in line, line
    kernels = line.split(": ", 1)[1]
    arch = kernels.split(" ")[0]
    assert arch in ("x86-64", "arm64", "cpu"), kernels
    p = phi2(tiny_model("q8"), "--ids", "1,2", "-n", "2")
    timings = [ln for ln in p.err.splitlines() if ln.startswith("phi2: load")][0]
    assert timings.endswith(" | " + kernels), (timings, kernels)
    p = phi2(tiny_model(), "--ids", "1,2", "-n", "2")  # f32: no int8 kernel in the description
    timings = [ln for ln in p.err.splitlines() if ln.startswith("phi2: load")][0]
    assert timings.endswith(" | " + kernels.split(", int8")[0]), (timings, kernels)
