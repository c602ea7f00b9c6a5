"""A corrupt-file matrix: damaged or crafted copies of the tiny model (f32 and q8).

Every case runs `phi2 FILE -p hi -n 2` (the default maps the file for so short a run; a
subset also runs with --no-mmap, which copies it) and must end with exit status 1, exactly
one non-empty stderr line starting "phi2: error: ", nothing on stdout, no sanitizer report,
within RUN_TIMEOUT seconds. The exceptions: the BENIGN header mutations listed below, which
with the header checksum recomputed describe a different but valid model, and must run
(exit 0, finite logits); and flipped weight bytes, which only the weights checksums see:
with --verify (and after a copy, --no-mmap) they must fail on it, and mapped without
--verify the run must end cleanly either way (exit 0, or the one-line error of non-finite
logits).

Groups (one test function each, so a failure names its group; every failing case of a group
is listed, not only the first):
  header fields  every field of docs/FORMAT.md set to 0, 1, all-ones, the type's max signed
                 value, true+1 and true-1 (f32 fields also as numbers), once with the header
                 checksum left stale (must fail on it) and once with it recomputed (must fail
                 validation, unless benign)
  offsets        every section offset and size moved by +-1 and +-64 (checksum recomputed),
                 and sections moved consistently (the layout itself is fixed)
  truncation     at every section and tensor boundary, at ~30 other offsets, one byte appended
  flips          seeded random byte flips in the header, tokenizer, weights and padding

Cases do not write a new 57 MB file each: every worker patches its own copy in place and
restores it afterwards (checked against the original at the end of each group).
"""
import concurrent.futures
import math
import os
import queue
import random
import shutil
import struct
import subprocess
import threading
import time

import numpy as np

from common import PHI2, WORK, checkpoint, converted
from test_cli import fnv1a64

RUN_TIMEOUT = 20          # seconds per engine run (a timeout is a failure: a hang)
WORKERS = 2               # engine runs in parallel
NO_MMAP_EVERY = 4         # header-field and flip cases: every 4th also runs with --no-mmap
HEADER_SIZE = 256
ALIGN = 64
U64 = (1 << 64) - 1

# (name, byte offset, struct code) for every header field of docs/FORMAT.md (version 2).
FIELDS = [
    ("magic", 0, "Q"), ("version", 8, "I"), ("weight_type", 12, "I"), ("vocab_size", 16, "I"),
    ("hidden_dim", 20, "I"), ("ffn_dim", 24, "I"), ("n_layers", 28, "I"), ("n_heads", 32, "I"),
    ("head_dim", 36, "I"), ("rot_dim", 40, "I"), ("max_seq_len", 44, "I"), ("group_size", 48, "I"),
    ("rope_theta", 52, "f"), ("norm_eps", 56, "f"), ("bos_id", 60, "I"), ("eos_id", 64, "I"),
    ("reserved68", 68, "I"), ("tokenizer_offset", 72, "Q"), ("tokenizer_size", 80, "Q"),
    ("weights_offset", 88, "Q"), ("weights_size", 96, "Q"), ("file_size", 104, "Q"),
    ("tokenizer_checksum", 112, "Q"), ("weights_sum", 120, "Q"), ("weights_sum2", 128, "Q"),
] + [(f"reserved{o}", o, "Q") for o in range(136, 248, 8)] + [("header_checksum", 248, "Q")]

# Header mutations that, with the checksum recomputed, describe a different but valid model:
# the run must succeed (exit 0, finite logits). Every other mutation must be an error.
# Keyed by (field, value label of field_values()); they apply to f32 and q8 alike.
_THETA = "another positive finite rotary base: theta^(-2i/rot_dim) stays finite for rot_dim 12"
_EPS = "another positive finite LayerNorm epsilon (a huge one only flattens the activations)"
_CTX = "another context length, more than the 3 positions the run fills ('hi' + 2 generated tokens)"
BENIGN = {
    ("rope_theta", "bits 1"): _THETA + " (denormal 1.4e-45: frequencies up to ~1e37)",
    ("rope_theta", "bits true+1"): _THETA,
    ("rope_theta", "bits true-1"): _THETA,
    ("rope_theta", "1.0"): _THETA + " (1.0: every frequency 1)",
    ("rope_theta", "FLT_MAX"): _THETA,
    ("rope_theta", "true+1.0"): _THETA,
    ("rope_theta", "true-1.0"): _THETA,
    ("norm_eps", "bits 1"): _EPS,
    ("norm_eps", "bits true+1"): _EPS,
    ("norm_eps", "bits true-1"): _EPS,
    ("norm_eps", "1.0"): _EPS,
    ("norm_eps", "FLT_MAX"): _EPS,
    ("norm_eps", "true+1.0"): _EPS,
    ("max_seq_len", "true+1"): _CTX,
    ("max_seq_len", "true-1"): _CTX,
    ("max_seq_len", "1"): "a valid 1-position model: the prompt fills it, 'context is full' after 0 tokens",
}
for _f in ("bos_id", "eos_id"):
    for _v in ("0", "1", "true+1", "true-1"):
        BENIGN[(_f, _v)] = "another id inside the vocabulary (0, 1, 50255, 50257 < vocab_size 51200)"


# --------------------------------------------------------------------------------------
# The model files and their layout

_lock = threading.Lock()
_bases = {}


def base(dtype):
    """(path, bytes, {field: value}) of the tiny model in dtype."""
    with _lock:
        if dtype not in _bases:
            path = converted(checkpoint(), dtype)
            data = open(path, "rb").read()
            hdr = {name: struct.unpack_from("<" + code, data, off)[0] for name, off, code in FIELDS}
            _bases[dtype] = (data, hdr)
        data, hdr = _bases[dtype]
        return converted(checkpoint(), dtype), data, hdr   # converted(): made again if pruned


def tensor_starts(hdr):
    """[(name, absolute file offset)] of every tensor, computed from the header as
    docs/FORMAT.md describes (each tensor 64-byte aligned in the weights section)."""
    V, H, F, L = hdr["vocab_size"], hdr["hidden_dim"], hdr["ffn_dim"], hdr["n_layers"]
    wtype = hdr["weight_type"]   # 0 f32, 1 q8, 2 q4 (its embed and lm_head: q8)
    out, pos = [], 0

    def take(name, nbytes):
        nonlocal pos
        pos = (pos + ALIGN - 1) // ALIGN * ALIGN
        out.append((name, hdr["weights_offset"] + pos))
        pos += nbytes

    def matrix(name, rows, cols, table=False):
        t = 1 if table and wtype == 2 else wtype
        if t == 1:
            take(name + ".q", rows * cols)
            take(name + ".scale", rows * cols // 64 * 4)
        elif t == 2:
            take(name + ".codes", rows * cols // 2)
            take(name + ".scale", rows * cols // 32 * 2)
        else:
            take(name, rows * cols * 4)

    matrix("embed", V, H, table=True)
    for i in range(L):
        take(f"layer{i}.ln_weight", 4 * H)
        take(f"layer{i}.ln_bias", 4 * H)
        matrix(f"layer{i}.qkv_weight", 3 * H, H)
        take(f"layer{i}.qkv_bias", 4 * 3 * H)
        matrix(f"layer{i}.dense_weight", H, H)
        take(f"layer{i}.dense_bias", 4 * H)
        matrix(f"layer{i}.fc1_weight", F, H)
        take(f"layer{i}.fc1_bias", 4 * F)
        matrix(f"layer{i}.fc2_weight", H, F)
        take(f"layer{i}.fc2_bias", 4 * H)
    take("final_ln_weight", 4 * H)
    take("final_ln_bias", 4 * H)
    matrix("lm_head_weight", V, H, table=True)
    take("lm_head_bias", 4 * V)
    end = (pos + ALIGN - 1) // ALIGN * ALIGN
    assert end == hdr["weights_size"], f"layout {end} != weights_size {hdr['weights_size']}"
    return out


def header_checksum(data):
    return struct.pack("<Q", fnv1a64(bytes(data[:248])))


# --------------------------------------------------------------------------------------
# Cases and running them

class Case:
    """One corrupt file: base(dtype) with patches [(offset, bytes)] applied, then cut to
    `length` bytes or with `append` added (or, for the few cases that move sections, the whole
    content from build(data))."""

    def __init__(self, dtype, desc, patches=(), length=None, append=b"", build=None, benign=None,
                 contains=None, avoid=None, no_mmap=False, weights_flip=False):
        self.dtype, self.desc, self.patches = dtype, desc, list(patches)
        self.length, self.append, self.build = length, append, build
        self.benign = benign            # reason the file is valid (must run), or None (must fail)
        self.contains = contains        # the error line must contain one of these strings
        self.avoid = avoid              # ... and must not contain this one
        self.no_mmap = no_mmap          # also run with --no-mmap (the default maps so short a run)
        self.weights_flip = weights_flip  # damaged weights: an error with --verify, a clean end without

    def runs(self):
        return len(self.flag_sets())

    def flag_sets(self):
        """The flags of each run: [] (the default), then --verify for damaged weights, then
        --no-mmap where asked."""
        return [[]] + ([["--verify"]] if self.weights_flip else []) + ([["--no-mmap"]] if self.no_mmap else [])


def header_patch(data, off, raw, fix):
    """Patches that write raw at off, plus the recomputed header checksum if fix."""
    patches = [(off, raw)]
    if fix:
        h = bytearray(data[:HEADER_SIZE])
        h[off:off + len(raw)] = raw
        patches.append((248, header_checksum(h)))
    return patches


# Cases run WORKERS at a time on a machine that may be busy: OpenMP threads that spin while
# waiting make a 15 ms run take a second when cores are oversubscribed. Sleeping instead
# changes no result.
ENV = dict(os.environ, OMP_WAIT_POLICY="passive")


def run_engine(path, extra):
    t0 = time.time()
    try:
        p = subprocess.run([PHI2, path, "-p", "hi", "-n", "2", *extra], capture_output=True,
                           timeout=RUN_TIMEOUT, env=ENV)
    except subprocess.TimeoutExpired:
        return None, time.time() - t0
    return p, time.time() - t0


def check_error(p, case):
    """'' if p is the required one-line error, else what is wrong."""
    err = p.stderr.decode("utf-8", "replace")
    lines = [ln for ln in err.splitlines() if ln.strip()]
    if "Sanitizer" in err or "runtime error:" in err:
        return f"sanitizer report: {err.strip()[-600:]!r}"
    if p.returncode != 1:
        return f"exit {p.returncode} (want 1), stderr {err.strip()[-300:]!r}"
    if len(lines) != 1 or not lines[0].startswith("phi2: error: "):
        return f"stderr is not one 'phi2: error: ' line: {err.strip()[-400:]!r}"
    if p.stdout:
        return f"error after writing to stdout: {p.stdout[:100]!r}"
    if case.contains and not any(s in lines[0] for s in case.contains):
        return f"error does not mention {' or '.join(map(repr, case.contains))}: {lines[0]!r}"
    if case.avoid and case.avoid in lines[0]:
        return f"error should not be about {case.avoid!r}: {lines[0]!r}"
    return ""


def check_clean_end(p):
    """'' if p ended cleanly, as a mapped run over damaged weights must: exit 0, or exit 1
    with the one-line error of non-finite logits."""
    err = p.stderr.decode("utf-8", "replace")
    if "Sanitizer" in err or "runtime error:" in err:
        return f"sanitizer report: {err.strip()[-600:]!r}"
    if p.returncode == 0:
        return ""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    if p.returncode == 1 and len(lines) == 1 and lines[0].startswith("phi2: error: logits are not finite"):
        return ""
    return f"exit {p.returncode}, stderr {err.strip()[-400:]!r}"


def check_benign(p, path, case, extra, logits_path):
    """'' if the (valid) file ran and gives finite logits, else what is wrong."""
    err = p.stderr.decode("utf-8", "replace")
    if "Sanitizer" in err or "runtime error:" in err:
        return f"sanitizer report: {err.strip()[-600:]!r}"
    if p.returncode != 0 or "error" in err or not p.stdout.startswith(b"hi"):
        return f"valid file ({case.benign}) did not run: exit {p.returncode}, stderr {err.strip()[-300:]!r}"
    try:
        q = subprocess.run([PHI2, path, "-p", "hi", "--dump-logits", logits_path, *extra], capture_output=True,
                           timeout=RUN_TIMEOUT, env=ENV)
    except subprocess.TimeoutExpired:
        return "--dump-logits timed out"
    if q.returncode != 0:
        return f"--dump-logits: exit {q.returncode}, {q.stderr.decode('utf-8', 'replace').strip()[-300:]!r}"
    logits = np.fromfile(logits_path, dtype="<f4")
    os.remove(logits_path)
    if logits.size == 0 or not np.isfinite(logits).all():
        return f"valid file ({case.benign}) gives non-finite logits ({logits.size} values)"
    return ""


def run_case(case, copies, stats):
    """Run one case on a worker's private copy of the model, restoring it afterwards."""
    path0, data, _ = base(case.dtype)
    path = copies[case.dtype].get()
    scratch = None
    try:
        if case.build is not None:
            scratch = path + ".built"
            with open(scratch, "wb") as f:
                f.write(case.build(data))
            target = scratch
        else:
            target = path
            with open(path, "r+b") as f:
                for off, raw in case.patches:
                    f.seek(off)
                    f.write(raw)
                if case.length is not None:
                    f.truncate(case.length)
                if case.append:
                    f.seek(len(data))
                    f.write(case.append)
        problems = []
        for extra in case.flag_sets():
            p, secs = run_engine(target, extra)
            with _lock:
                stats["runs"] += 1
                stats["max_s"] = max(stats["max_s"], secs)
            label = case.desc + (f" [{' '.join(extra)}]" if extra else "")
            if p is None:
                problems.append(f"{label}: no answer within {RUN_TIMEOUT} s (hang)")
                continue
            if case.benign:
                why = check_benign(p, target, case, extra, path + ".logits")
            elif case.weights_flip and not extra:
                why = check_clean_end(p)
            else:
                why = check_error(p, case)
            if why:
                problems.append(f"{label}: {why}")
        return problems
    finally:
        if scratch:
            os.remove(scratch)
        else:
            with open(path, "r+b") as f:
                for off, raw in case.patches:
                    f.seek(off)
                    f.write(data[off:off + len(raw)])
                if case.length is not None and case.length < len(data):
                    f.seek(case.length)
                    f.write(data[case.length:])
                f.truncate(len(data))
        copies[case.dtype].put(path)


_total = {"cases": 0, "runs": 0}


def run_matrix(group, cases):
    """Run every case (WORKERS at a time); fail listing every case that went wrong."""
    assert cases, group
    dtypes = sorted({c.dtype for c in cases})
    copies = {}
    for dt in dtypes:
        path0, data, _ = base(dt)
        # The unmodified file must run, or every "error" below would be meaningless.
        p, _ = run_engine(path0, [])
        assert p is not None and p.returncode == 0 and p.stdout.startswith(b"hi"), \
            f"the unmodified {dt} model does not run: {p and p.stderr.decode('utf-8', 'replace')[-500:]}"
        copies[dt] = queue.Queue()
        for w in range(WORKERS):
            cp = os.path.join(WORK, f"corrupt-{group.replace(' ', '_')}-{dt}-{w}.bin")
            shutil.copyfile(path0, cp)
            copies[dt].put(cp)
    stats = {"runs": 0, "max_s": 0.0}
    t0 = time.time()
    with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
        results = list(pool.map(lambda c: run_case(c, copies, stats), cases))
    failures = [msg for r in results for msg in r]
    # Every copy must be back to the original bytes (else later cases tested something else).
    for dt in dtypes:
        data = base(dt)[1]
        while not copies[dt].empty():
            cp = copies[dt].get()
            with open(cp, "rb") as f:
                assert f.read() == data, f"{cp} was not restored"
            os.remove(cp)
    _total["cases"] += len(cases)
    _total["runs"] += stats["runs"]
    n_benign = sum(1 for c in cases if c.benign)
    print(f"  corrupt matrix, {group}: {len(cases)} cases ({n_benign} benign), {stats['runs']} runs, "
          f"{time.time() - t0:.1f} s, slowest run {stats['max_s']:.2f} s; so far {_total['cases']} cases, "
          f"{_total['runs']} runs", flush=True)
    assert not failures, (f"{len(failures)} of {stats['runs']} {group} runs failed:\n  "
                          + "\n  ".join(failures))


# --------------------------------------------------------------------------------------
# The groups

def field_values(code, true):
    """[(label, raw bytes)] for a header field of struct code with value true."""
    bits = {"I": 32, "Q": 64, "f": 32}[code]
    mask = (1 << bits) - 1
    fmt = "<I" if code == "f" else "<" + code
    tbits = struct.unpack(fmt, struct.pack("<" + code, true))[0]
    out = [("0", 0), ("1", 1), ("all-ones", mask), ("max-signed", mask >> 1),
           ("true+1", (tbits + 1) & mask), ("true-1", (tbits - 1) & mask)]
    out = [(f"bits {lab}" if code == "f" else lab, struct.pack(fmt, v)) for lab, v in out]
    if code == "f":
        fmax = struct.unpack("<f", struct.pack("<I", 0x7F7FFFFF))[0]
        for lab, v in (("1.0", 1.0), ("-1.0", -1.0), ("FLT_MAX", fmax), ("true+1.0", true + 1.0),
                       ("true-1.0", true - 1.0), ("inf", math.inf), ("-inf", -math.inf), ("nan", math.nan)):
            out.append((lab, struct.pack("<f", v)))
    seen, unique = set(), []
    for lab, raw in out:
        if raw not in seen:
            seen.add(raw)
            unique.append((lab, raw))
    return unique


def test_header_fields():
    cases, used = [], set()
    for dtype in ("f32", "q8", "q4"):
        _, data, hdr = base(dtype)
        for name, off, code in FIELDS:
            for label, raw in field_values(code, hdr[name]):
                if raw == data[off:off + len(raw)]:
                    continue  # no change (e.g. a reserved zero field set to 0)
                value = struct.unpack("<" + code, raw)[0]
                modes = (False,) if name == "header_checksum" else (False, True)
                for fix in modes:
                    desc = f"{dtype} {name}={label} ({value!r}), header checksum {'recomputed' if fix else 'stale'}"
                    benign, contains, avoid = None, None, None
                    if fix:
                        benign = BENIGN.get((name, label))
                        used.add((name, label))
                        avoid = "header checksum"  # it must fail validation, not the checksum we fixed
                    else:
                        # magic and version are checked before the checksum (a clearer message
                        # for a file that is not ours / from another version)
                        contains = ("checksum", "magic") if name == "magic" else \
                            ("checksum", "version") if name == "version" else ("checksum",)
                    # a wrong weights sum with a valid header: only the weights check sees it
                    weights_sum = fix and name in ("weights_sum", "weights_sum2")
                    if weights_sum:
                        contains, avoid = ("weights checksum",), None
                    cases.append(Case(dtype, desc, header_patch(data, off, raw, fix), benign=benign,
                                      contains=contains, avoid=avoid, no_mmap=len(cases) % NO_MMAP_EVERY == 0,
                                      weights_flip=weights_sum))
    assert set(BENIGN) <= used, f"BENIGN lists cases the matrix no longer makes: {set(BENIGN) - used}"
    run_matrix("header fields", cases)


def test_section_offsets():
    cases = []
    for dtype in ("f32", "q8", "q4"):
        _, data, hdr = base(dtype)
        for name in ("tokenizer_offset", "tokenizer_size", "weights_offset", "weights_size", "file_size"):
            off = dict((n, o) for n, o, _ in FIELDS)[name]
            for delta in (+1, -1, +64, -64):
                raw = struct.pack("<Q", (hdr[name] + delta) & U64)
                cases.append(Case(dtype, f"{dtype} {name} {delta:+d} (checksum recomputed)",
                                  header_patch(data, off, raw, True), no_mmap=True))

        # Sections moved consistently: the bytes are all there, but the layout is fixed
        # (tokenizer at 256, weights at the next 64-byte boundary after it).
        def moved_weights(d, hdr=hdr):
            w = hdr["weights_offset"]
            h = bytearray(d[:HEADER_SIZE])
            struct.pack_into("<Q", h, 88, w + 64)
            struct.pack_into("<Q", h, 104, hdr["file_size"] + 64)
            h[248:256] = header_checksum(h)
            return bytes(h) + d[HEADER_SIZE:w] + bytes(64) + d[w:]

        def moved_tokenizer(d, hdr=hdr):
            h = bytearray(d[:HEADER_SIZE])
            struct.pack_into("<Q", h, 72, HEADER_SIZE + 64)
            struct.pack_into("<Q", h, 88, hdr["weights_offset"] + 64)
            struct.pack_into("<Q", h, 104, hdr["file_size"] + 64)
            h[248:256] = header_checksum(h)
            return bytes(h) + bytes(64) + d[HEADER_SIZE:]

        cases.append(Case(dtype, f"{dtype} weights section moved 64 bytes later (zeros inserted, offsets updated)",
                          build=moved_weights, no_mmap=True))
        cases.append(Case(dtype, f"{dtype} tokenizer and weights moved 64 bytes later (offsets updated)",
                          build=moved_tokenizer, no_mmap=True))
    run_matrix("section offsets", cases)


def test_truncation():
    cases = []
    rng = random.Random(8)
    for dtype in ("f32", "q8", "q4"):
        _, data, hdr = base(dtype)
        n = len(data)
        tok_end = hdr["tokenizer_offset"] + hdr["tokenizer_size"]
        cuts = {0: "empty", 8: "after magic", HEADER_SIZE - 1: "inside the header",
                HEADER_SIZE: "end of header = start of tokenizer", tok_end - 1: "inside the last tokenizer byte",
                tok_end: "end of tokenizer", hdr["weights_offset"]: "start of weights", n - 1: "last byte"}
        for name, start in tensor_starts(hdr):
            cuts.setdefault(start, f"start of {name}")
        spread = [n * k // 16 for k in range(1, 16)] + [rng.randrange(1, n) for _ in range(15)]
        for cut in spread:
            cuts.setdefault(cut, "spread")
        for cut in sorted(cuts):
            cases.append(Case(dtype, f"{dtype} truncated to {cut} bytes ({cuts[cut]})", length=cut, no_mmap=True))
        cases.append(Case(dtype, f"{dtype} one zero byte appended", append=b"\0", no_mmap=True))
        cases.append(Case(dtype, f"{dtype} 64 zero bytes appended", append=bytes(64), no_mmap=True))
    run_matrix("truncation", cases)


def test_byte_flips():
    cases = []
    rng = random.Random(1234)
    for dtype in ("f32", "q8", "q4"):
        _, data, hdr = base(dtype)
        tok_off, tok_end = hdr["tokenizer_offset"], hdr["tokenizer_offset"] + hdr["tokenizer_size"]
        w_off = hdr["weights_offset"]
        if w_off == tok_end:
            print(f"  note: the {dtype} tiny model has no padding between tokenizer and weights", flush=True)
        regions = [("header (checksum stale)", 0, HEADER_SIZE, 20), ("tokenizer", tok_off, tok_end, 20),
                   ("weights", w_off, len(data), 20), ("padding after tokenizer", tok_end, w_off, 4)]
        for region, lo, hi, count in regions:
            for off in sorted(rng.sample(range(lo, hi), min(count, hi - lo))):  # padding: maybe none
                x = rng.randrange(1, 256)
                contains = None if region.startswith("padding") else ("checksum",)
                if region.startswith("header") and off < 12:
                    contains = ("magic", "version", "checksum")
                cases.append(Case(dtype, f"{dtype} {region} byte {off} ^= {x:#04x}",
                                  [(off, bytes([data[off] ^ x]))], contains=contains,
                                  no_mmap=len(cases) % NO_MMAP_EVERY == 0, weights_flip=region == "weights"))
    run_matrix("flips", cases)
