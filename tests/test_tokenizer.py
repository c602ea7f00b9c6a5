"""Tokenizer tests through build/tokenizer_tool (make build/tokenizer_tool).

Expected ids come from tests/tokenizer_vectors.json, made by scripts/gen_tokenizer_vectors.mjs
with transformers.js (an independent implementation) on the same tokenizer.json. The
tokenizer section is written by tests/tok_section.py (independent of scripts/convert.py);
test_converted_model_section checks that convert.py's section behaves the same.
TOKENIZER_TOOL selects the tool binary (default build/tokenizer_tool).
"""
import json
import os
import random
import shutil
import struct
import subprocess
import time

from common import REPO, TESTS, WORK, checkpoint, converted, persist, run

SAME_FOR_EVERY_BUILD = True  # build/tokenizer_tool, the same in every build's run (run.py --engine-only)
import tok_section

TOOL = os.environ.get("TOKENIZER_TOOL", os.path.join(REPO, "build", "tokenizer_tool"))
VECTORS = os.path.join(TESTS, "tokenizer_vectors.json")
TOKDIR = persist(os.path.join(WORK, "tokenizer"))

_section_cache = {}


def section_path(merges_style="string"):
    """A raw Phi-2 tokenizer section file, written once per test run."""
    path = os.path.join(TOKDIR, f"phi2-{merges_style}.sec")
    if path not in _section_cache:
        os.makedirs(TOKDIR, exist_ok=True)
        data = tok_section.phi2_section(merges_style)
        with open(path, "wb") as f:
            f.write(data)
        _section_cache[path] = data
    return path


def tool(*args, check=True):
    return run([TOOL, "--section", section_path(), *map(str, args)], check=check)


def tmpfile(name, data):
    os.makedirs(TOKDIR, exist_ok=True)
    path = os.path.join(TOKDIR, name)
    with open(path, "wb") as f:
        f.write(data)
    return path


def parse_ids(line):
    line = line.strip()
    return [int(x) for x in line.split(",")] if line else []


def encode_many(texts, tool_path=None):
    """ids for each bytes object (one tool run; the tool also checks each round trip)."""
    path = tmpfile("batch.hex", b"".join(t.hex().encode() + b"\n" for t in texts))
    p = run([tool_path or TOOL, "--section", section_path(), "encode-hex", path])
    lines = p.stdout.decode().split("\n")
    assert len(lines) == len(texts) + 1, "one output line per input line"
    return [parse_ids(ln) for ln in lines[:-1]]


def encode(text):
    return encode_many([text.encode() if isinstance(text, str) else text])[0]


def case_bytes(c):
    return c["text"].encode("utf-8") if "text" in c else bytes.fromhex(c["hex"])


def load_vectors():
    with open(VECTORS, encoding="utf-8") as f:
        return json.load(f)


def test_known_answers():
    # Published ids of Hugging Face's Phi-2 tokenizer (PHI2_SPEC.md and the issue).
    assert encode("   Hello") == [50285, 15496]
    assert encode("  ") == [50286]
    assert encode("\t\t") == [50294]
    assert encode("This is")[0] == 1212
    assert encode(" " * 40) == [50257, 50288 - 9]   # leftmost-longest: 31 + 9 spaces
    assert encode("a<|endoftext|>b") == [64, 50256, 65]
    assert encode("") == []


def test_vectors_cover_the_required_categories():
    v = load_vectors()
    cats = {c["category"] for c in v["cases"]}
    need = {"known", "prose", "python", "space-runs", "tab-runs", "whitespace", "contractions",
            "digits", "punctuation", "cjk", "emoji", "combining", "arabic", "rtl", "endoftext",
            "invalid-utf8"}
    assert need <= cats, f"missing categories: {need - cats}"
    assert len(v["cases"]) >= 300
    names = [c["name"] for c in v["cases"]]
    assert len(names) == len(set(names)), "case names must be unique"


def test_vectors_match_transformers_js():
    v = load_vectors()
    cases = v["cases"]
    got = encode_many([case_bytes(c) for c in cases])
    bad = [(c["name"], g, c["ids"]) for c, g in zip(cases, got) if g != c["ids"]]
    assert not bad, f"{len(bad)} of {len(cases)} cases differ, first: {bad[:3]}"


def test_vectors_round_trip():
    # encode-hex already checks decode(encode(x)) == x in C; check it here too, through the
    # decode command, for every vector (including the invalid UTF-8 ones).
    cases = load_vectors()["cases"]
    ids = encode_many([case_bytes(c) for c in cases])
    joined = [i for row in ids for i in row]
    p = tool("decode", ",".join(map(str, joined)))
    assert p.stdout == b"".join(case_bytes(c) for c in cases)


def test_round_trip_random_bytes():
    rng = random.Random(1234)
    texts = []
    for k in range(300):
        n = rng.randrange(0, 300)
        if k % 3 == 0:    # any byte, NUL included
            texts.append(bytes(rng.randrange(256) for _ in range(n)))
        elif k % 3 == 1:  # NUL-free "binary garbage"
            texts.append(bytes(rng.randrange(1, 256) for _ in range(n)))
        else:             # whitespace-heavy with stray high bytes
            texts.append(bytes(rng.choice(b"  \t\t\n\r ab'\x80\xc3\xa9\xe2\xff") for _ in range(n)))
    encode_many(texts)   # the tool fails on any round-trip mismatch
    p = tool("fuzz", 20000, 7)
    assert p.out.strip() == "ok 20000"


def test_round_trip_file_with_every_byte():
    data = bytes(range(256)) * 4 + b"<|endoftext|>" + bytes(range(255, -1, -1))
    p = tool("roundtrip", tmpfile("allbytes.bin", data))
    assert p.out.startswith(f"ok {len(data)} ")


def test_decode_is_lossless_and_ignores_bad_ids():
    # No clean_up_tokenization_spaces: " ." stays " .", "<|endoftext|>" is printed as text.
    text = "Hello , world . I 'm here ! <|endoftext|> end\n"
    ids = encode(text)
    assert tool("decode", ",".join(map(str, ids))).stdout == text.encode()
    # Unused and out-of-range ids decode to nothing.
    assert tool("decode", "-1,50295,51199,1000000,15496").stdout == b"Hello"


def stream(ids):
    """Per-token chunks (bytes) written by the Utf8Stream, and the final flush chunk."""
    lines = tool("stream", ",".join(map(str, ids))).out.strip().split("\n")
    chunks = [b"" if ln == "-" else bytes.fromhex(ln) for ln in lines[:-1]]
    assert lines[-1].startswith("flush ")
    last = lines[-1][len("flush "):]
    return chunks, b"" if last == "-" else bytes.fromhex(last)


def test_stream_holds_back_a_split_character():
    # "😀" is 4 bytes that GPT-2 splits over tokens: the character must come out exactly
    # once, whole, with the token that completes it.
    ids = encode("😀")
    assert len(ids) >= 2, "the test needs a character split across tokens"
    chunks, tail = stream(ids)
    assert chunks[:-1] == [b""] * (len(ids) - 1)
    assert chunks[-1] == "😀".encode() and tail == b""


def test_stream_outputs_only_whole_characters():
    text = "日本語のテキスト 😀👍🏽 naïve café مرحبا 👨‍👩‍👧 ok\n"
    ids = encode(text)
    chunks, tail = stream(ids)
    assert b"".join(chunks) + tail == text.encode()
    assert tail == b""
    for c in chunks:
        c.decode("utf-8")   # every chunk is whole characters
    assert sum(1 for i in range(len(ids)) if chunks[i] == b"") > 0


def incomplete_tail(b):
    """Length of the trailing bytes of b that a UTF-8 stream must hold back: a suffix that
    starts with a lead byte and that some continuation bytes would complete into one valid
    character (Python's strict decoder is the judge). A lead byte always starts a new
    sequence, so only the suffix from the last byte >= 0xC0 needs checking."""
    for k in range(1, min(3, len(b)) + 1):
        tail = b[-k:]
        if tail[0] < 0xC0:
            continue
        for total in range(k + 1, 5):
            for c in range(0x80, 0xC0):
                try:
                    if len((tail + bytes([c]) + b"\x80" * (total - k - 1)).decode("utf-8")) == 1:
                        return k
                except UnicodeDecodeError:
                    pass
        return 0
    return 0


def expected_stream(ids):
    """What a Utf8Stream should have written after each token and at the flush."""
    token_bytes = tool("decode-each", ",".join(map(str, ids))).out.split("\n")[:-1]
    so_far, written, chunks = b"", 0, []
    for h in token_bytes:
        so_far += bytes.fromhex(h) if h != "-" else b""
        upto = len(so_far) - incomplete_tail(so_far)
        chunks.append(so_far[written:upto])
        written = upto
    return chunks, so_far[written:]


def test_stream_invalid_and_truncated_bytes_are_lossless():
    # Invalid bytes pass at once; a truncated character at the end comes out at the flush;
    # an interrupted sequence is written as is once the next byte shows it cannot complete.
    for data in [b"a\xff b\xe4\xb8 c\xf0\x9f\x98", b"\xed\xa0\x80 \xe0\x80 \xc3\xa9\xc3",
                 "😀👍🏽 中文 e\u0301".encode() + b"\xe2\x82", bytes(range(0x80, 0x100))]:
        ids = encode(data)
        chunks, tail = stream(ids)
        assert b"".join(chunks) + tail == data
        assert (chunks, tail) == expected_stream(ids), data
    assert stream(encode(b"x\xf0\x9f\x98"))[1] == b"\xf0\x9f\x98"   # flushed at the end


def test_long_inputs_round_trip():
    """100 KB of mixed text, one 100 KB word (the longest BPE merge chain) and 100 KB of
    whitespace encode and decode back exactly. Speed is shown by scripts/bench.sh, not
    asserted here; the subprocess timeout only guards against a hang."""
    parts = [case_bytes(c) for c in load_vectors()["cases"] if c["category"] != "invalid-utf8"]
    text = b""
    while len(text) < 100_000:
        text += b"\n".join(parts)
    for name, data in [("mixed", text[:100_000]), ("word", b"a" * 100_000), ("ws", b" \n\t \t\n" * 16_667)]:
        p = run([TOOL, "--section", section_path(), "roundtrip", tmpfile(f"long-{name}.txt", data)], timeout=120)
        assert p.out.startswith(f"ok {len(data)} "), p.out


def corruptions(sec):
    """(name, bytes) variants of a valid section that must be rejected."""
    n_tokens, n_merges = struct.unpack_from("<II", sec, 0)
    merges_at = len(sec) - 12 * n_merges
    out = [("empty", b""), ("3 bytes", sec[:3]), ("counts only", sec[:8])]
    for cut in (9, 13, 100, 5000, merges_at - 1, merges_at + 5, len(sec) - 1):
        out.append((f"truncated at {cut}", sec[:cut]))
    out.append(("trailing byte", sec + b"\0"))
    out.append(("huge token count", struct.pack("<II", 0xFFFFFFFF, n_merges) + sec[8:]))
    out.append(("too few tokens", struct.pack("<II", 10, n_merges) + sec[8:]))
    out.append(("huge merge count", struct.pack("<II", n_tokens, 0xFFFFFFFF) + sec[8:]))
    out.append(("merge count + 1", struct.pack("<II", n_tokens, n_merges + 1) + sec[8:]))
    b = bytearray(sec)
    b[8] = 7   # token 0's kind
    out.append(("unknown kind", bytes(b)))
    b = bytearray(sec)
    b[8] = 0   # token 0 ("!") unused but with bytes
    out.append(("unused with bytes", bytes(b)))
    b = bytearray(sec)
    struct.pack_into("<I", b, 9, 0xFFFFFF00)   # token 0's length
    out.append(("token length past the end", bytes(b)))
    b = bytearray(sec)
    struct.pack_into("<I", b, merges_at, n_tokens)   # merge 0's left id
    out.append(("merge id out of range", bytes(b)))
    b = bytearray(sec)
    struct.pack_into("<I", b, merges_at + 8, 0)   # merge 0 produces "!"
    out.append(("merge bytes mismatch", bytes(b)))
    b = bytearray(sec)
    struct.pack_into("<I", b, len(sec) - 4, 0xFFFFFFFF)
    out.append(("last merge id -1", bytes(b)))
    # A vocabulary without a single-byte token for "!" (id 0): replace it with "!!".
    b = bytearray(sec[:8]) + struct.pack("<BI", 1, 2) + b"!!" + sec[8 + 5 + 1:]
    out.append(("missing byte token", bytes(b)))
    rng = random.Random(5)
    for k in range(40):   # random byte flips in the structure
        b = bytearray(sec)
        for _ in range(rng.randrange(1, 4)):
            i = rng.randrange(len(b)) if k % 2 else rng.randrange(min(len(b), 4000))
            b[i] ^= 1 << rng.randrange(8)
        out.append((f"flip {k}", bytes(b)))
    return out


def check_corrupt_sections(tool_path):
    sec = open(section_path(), "rb").read()
    rejected = 0
    for name, data in corruptions(sec):
        path = tmpfile("corrupt.sec", data)
        p = run([tool_path, "--section", path, "encode", tmpfile("c.txt", b"Hi there  \t\tx")], check=False)
        assert p.returncode in (0, 1), f"{name}: crashed (exit {p.returncode}) {p.err[-500:]}"
        if p.returncode == 1:
            assert "tokenizer:" in p.err and p.err.count("\n") == 1, f"{name}: {p.err!r}"
            rejected += 1
        elif not name.startswith("flip"):
            raise AssertionError(f"{name}: corrupt section was accepted")
        # A flip inside token bytes can leave a valid (different) tokenizer: fine.
    assert rejected >= 25


def test_corrupt_sections_are_rejected():
    check_corrupt_sections(TOOL)


def asan_tool():
    """build/tokenizer_tool-asan, built here; fails (with what to install) if it cannot be."""
    out = os.path.join(REPO, "build", "tokenizer_tool-asan")
    srcs = [os.path.join(TESTS, "tokenizer_tool.c"), os.path.join(REPO, "tokenizer.c")]
    deps = srcs + [os.path.join(REPO, f) for f in ("tokenizer.h", "unicode_tables.h")]
    if os.path.isfile(out) and os.path.getmtime(out) >= max(os.path.getmtime(d) for d in deps):
        return out
    cc = os.environ.get("CC", "cc")
    assert shutil.which(cc), f"no C compiler '{cc}' to build the sanitizer tokenizer tool: install gcc (or set CC)"
    p = subprocess.run([cc, "-std=c11", "-Wall", "-Wextra", "-Wshadow", "-Wno-unused-parameter", "-O1",
                        "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
                        "-fno-omit-frame-pointer", "-o", out, *srcs, "-lm"], capture_output=True)
    assert p.returncode == 0, (f"{cc} cannot build with -fsanitize=address,undefined: install the sanitizer "
                               f"runtimes (Debian: libasan and libubsan, which come with gcc)\n"
                               f"{p.stderr.decode(errors='replace')[-1500:]}")
    return out


def test_sanitizers_corrupt_sections_and_fuzz():
    """Under ASan+UBSan the tokenizer rejects corrupt sections, survives random input and
    still encodes the reference vectors. Fails if the sanitizer build cannot be made."""
    path = asan_tool()
    os.environ.setdefault("ASAN_OPTIONS", "detect_leaks=1")
    check_corrupt_sections(path)
    p = run([path, "--section", section_path(), "fuzz", "3000", "11"])
    assert p.out.strip() == "ok 3000"
    cases = load_vectors()["cases"]
    assert encode_many([case_bytes(c) for c in cases], tool_path=path) == [c["ids"] for c in cases]


def test_pair_merges_give_the_same_section():
    # tokenizer.json has merges as "a b" (old) or ["a", "b"] (new): same section.
    section_path("pair")
    assert _section_cache[section_path("pair")] == _section_cache[section_path("string")]


def test_converted_model_section():
    """The section convert.py writes loads, and encodes like the test writer's section."""
    assert os.path.isfile(os.path.join(REPO, "scripts", "convert.py")), "scripts/convert.py is missing"
    cases = load_vectors()["cases"]
    texts = [case_bytes(c) for c in cases]
    expected = [c["ids"] for c in cases]
    for merges in ("string", "pair"):
        model = converted(checkpoint(extra=("--merges", merges)))
        p = run([TOOL, model, "load"])
        assert p.out.split()[:2] == ["ok", "50295"], p.out
        path = tmpfile("batch.hex", b"".join(t.hex().encode() + b"\n" for t in texts))
        out = run([TOOL, model, "encode-hex", path]).out.split("\n")[:-1]
        assert [parse_ids(x) for x in out] == expected, f"merges={merges}"
