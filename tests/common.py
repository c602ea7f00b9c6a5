"""Shared helpers for the test suite: paths, running commands, cached synthetic models.

Synthetic checkpoints and converted model files are written under build/testdata/ (wiped by
`make test` before each run) and cached by their parameters within a run.

Disk: a CI machine may have little free space, so the suite keeps its footprint small.
After every test, tests/run.py calls prune_work(): everything a test left in WORK is deleted
except the few most recently used cached checkpoints and model files (MAX_CACHED) and the
small files a module registered with persist(). A run that passes removes WORK entirely.
"""
import hashlib
import itertools
import os
import shutil
import subprocess
import sys

import numpy as np

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
SCRIPTS = os.path.join(REPO, "scripts")
PY = sys.executable
PHI2 = os.environ.get("PHI2_BIN", os.path.join(REPO, "phi2"))
WORK = os.environ.get("PHI2_TEST_WORK", os.path.join(REPO, "build", "testdata"))

MAX_CACHED = 6              # cached checkpoints / model files kept between tests (~60 MB each)
_cache_use = {}             # cached path -> when it was last asked for
_use_clock = itertools.count()
_persistent = set()         # small per-module files kept for the whole run


def _cached(path):
    _cache_use[path] = next(_use_clock)
    return path


def persist(path):
    """Keep path (a small file or folder in WORK) until the run ends; returns path."""
    _persistent.add(os.path.abspath(path))
    return path


def prune_work():
    """Delete what the last test left in WORK, keeping the MAX_CACHED most recently used
    cached checkpoints and model files and every persist()ed path."""
    if not os.path.isdir(WORK):
        return
    recent = sorted(_cache_use, key=_cache_use.get)[-MAX_CACHED:]
    for path in list(_cache_use):
        if path not in recent:
            del _cache_use[path]
    keep = {os.path.abspath(p) for p in recent} | _persistent
    for name in os.listdir(WORK):
        path = os.path.abspath(os.path.join(WORK, name))
        if path in keep:
            continue
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.remove(path)
            except FileNotFoundError:
                pass


def remove_work():
    """Remove WORK and forget every cached path (the end of a run that passed)."""
    shutil.rmtree(WORK, ignore_errors=True)
    _cache_use.clear()
    _persistent.clear()


class Skip(Exception):
    """Raised by a test that cannot run on this host (say why): tests/run.py reports it as
    skipped, counted apart from the passed ones and named in its summary line."""


def same_for_every_build(test):
    """Marks a test whose outcome cannot depend on the build under test (PHI2_BIN,
    KERNEL_TEST_BIN): it runs only Python scripts, or binaries that every build's run shares
    (build/tokenizer_tool, or an engine it compiles itself with the Makefile's command).
    `make test` runs it; the runs of the other builds (sanitizers, clang, portable) pass
    tests/run.py --engine-only, which leaves it out and says how many it left. A module whose
    every test is such a test says so with SAME_FOR_EVERY_BUILD = True."""
    test.same_for_every_build = True
    return test


# make test-windows: phi2.exe through Wine (build/wine/phi2, with WINEDEBUG=-all).
UNDER_WINE = os.path.basename(os.path.dirname(PHI2)) == "wine"


def run(cmd, check=True, timeout=600, input=None):
    """Run cmd (list); return CompletedProcess with text stdout/stderr. check: require exit 0.
    Under Wine, a run of phi2 that ends with status 1 and nothing on stderr is Wine's failure,
    not phi2's (every error of phi2 is a line on stderr): seen about once in some hundreds of
    runs, it is run once more, and a line says so."""
    p = subprocess.run(cmd, capture_output=True, timeout=timeout, input=input)
    if UNDER_WINE and cmd[0] == PHI2 and p.returncode == 1 and not p.stderr:
        print(f"     Wine: exit 1 and no message from {' '.join(map(str, cmd))[:160]}; run once more")
        p = subprocess.run(cmd, capture_output=True, timeout=timeout, input=input)
    p.out = p.stdout.decode("utf-8", "replace")
    p.err = p.stderr.decode("utf-8", "replace")
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} -> exit {p.returncode}\n{p.err[-2000:]}")
    return p


def script(name, *args, check=True):
    return run([PY, os.path.join(SCRIPTS, name), *map(str, args)], check=check)


def phi2(*args, check=True, input=None):
    return run([PHI2, *map(str, args)], check=check, input=input)


def _key(*parts):
    return hashlib.sha1(repr(parts).encode()).hexdigest()[:10]


def checkpoint(preset="tiny", seed=1, dtype="F16", naming="hf", shards=1, extra=()):
    """A synthetic HF-layout checkpoint folder (made once per test run)."""
    d = os.path.join(WORK, f"ckpt-{preset}-{_key(preset, seed, dtype, naming, shards, tuple(extra))}")
    if not os.path.isdir(d):
        os.makedirs(WORK, exist_ok=True)
        script("synth.py", d + ".tmp", "--preset", preset, "--seed", seed, "--dtype", dtype,
               "--naming", naming, "--shards", shards, *extra)
        os.rename(d + ".tmp", d)
    return _cached(d)


def converted(ckpt, dtype="f32"):
    """The model file convert.py makes from ckpt (made once per test run)."""
    out = os.path.join(WORK, f"{os.path.basename(ckpt)}.{dtype}.bin")
    if not os.path.isfile(out):
        script("convert.py", ckpt, out, "--dtype", dtype)
    return _cached(out)


def read_logits(path, vocab_size):
    """A --dump-logits file: little-endian float32 rows of vocab_size."""
    a = np.fromfile(path, dtype="<f4")
    assert a.size % vocab_size == 0, f"{path}: {a.size} floats is not a multiple of {vocab_size}"
    return a.reshape(-1, vocab_size)


def reference_logits(ckpt, ids):
    """Logits of scripts/reference.py (float64 numpy, reads the HF folder) for ids."""
    out = os.path.join(WORK, f"ref-{_key(ckpt, tuple(ids))}.f32")
    script("reference.py", ckpt, "--ids", ",".join(map(str, ids)), "--dump-logits", out)
    return out


def engine_logits(model, ids, *flags):
    """Logits of ./phi2 --dump-logits for ids."""
    out = os.path.join(WORK, f"eng-{_key(model, tuple(ids), flags)}.f32")
    phi2(model, "--ids", ",".join(map(str, ids)), "--dump-logits", out, *flags)
    return out


def rel_max_diff(a, b):
    """max |a-b| / max |b| (b is the reference)."""
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
