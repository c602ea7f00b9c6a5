"""Determinism and long runs.

Greedy generation must not depend on how the work is split: threads, prompt batch size, or
whether the weights are mapped or read into memory. And a run that fills the whole
2048-position context (prompt batches, then generation up to the last position) must end
cleanly with exactly the tokens that fit; under `make test-sanitize` this is the long run
AddressSanitizer and UBSan watch.
"""
import re
import time

import numpy as np

from common import checkpoint, converted, phi2

N_REAL = 50295  # tokens in the tokenizer: no generated id may reach this
EOS = 50256
MAX_SEQ_LEN = 2048  # the tiny preset's max_position_embeddings
# 100 tokens: by default one batch; with -b 64 one full batch and a partial one (36: the
# int8 kernels' row panels), with -b 7 fourteen and a tail (below PANEL_MIN_TOKENS: the
# register tiles).
PROMPT = ",".join(str(i) for i in np.random.default_rng(21).integers(0, N_REAL, size=100))
# Work splits to compare, against the defaults (-b 128 or 256, one thread per fast core,
# weights read into memory when they fit, as these small models do).
SPLITS = [("-t", 1), ("-t", 2), ("-t", 3), ("-b", 1), ("-b", 7), ("-b", 64), ("--no-mmap",), ("--mmap",),
          ("-t", 3, "-b", 7, "--no-mmap")]


def greedy_ids(model, *flags):
    p = phi2(model, "--ids", PROMPT, "-n", 24, "--temp", 0, "--ignore-eos", "--print-ids", *flags)
    return p.out.strip()


def check_greedy_is_deterministic(model):
    base = greedy_ids(model)
    ids = [int(i) for i in base.split(",")]
    assert len(ids) == 24 and len(set(ids)) > 4, f"degenerate or short continuation: {base}"
    for flags in SPLITS:
        got = greedy_ids(model, *flags)
        assert got == base, f"{' '.join(map(str, flags))}: {got}\n  defaults: {base}"


def test_greedy_same_for_any_threads_batch_and_mmap_f32():
    """24 greedy tokens after a 100-token prompt are identical with -t 1/2/3, -b 1/7/64 and
    the default, --no-mmap and a mix of them (float32 model)."""
    check_greedy_is_deterministic(converted(checkpoint()))


def test_greedy_same_for_any_threads_batch_and_mmap_q8():
    """The same for the int8 model, whose batches take other kernels (and AMX where the
    CPU has it) than single tokens."""
    check_greedy_is_deterministic(converted(checkpoint(), "q8"))


def test_soak_fills_the_whole_context():
    """A 300-token prompt in batches of 64 (four full, one partial), then sampling with
    --ignore-eos and -n -1 until the context is full: exactly 2048 - 300 tokens, all real
    token ids, the stop reason 'the context is full', exit 0 (and, under the sanitizer
    build, no report). One thread: fastest under ASan on a shared machine."""
    model = converted(checkpoint())
    n_prompt = 300
    prompt = ",".join(str(i) for i in np.random.default_rng(11).integers(0, N_REAL, size=n_prompt))
    t0 = time.time()
    p = phi2(model, "--ids", prompt, "-b", 64, "-n", -1, "--ignore-eos", "-s", 3, "-t", 1, "--print-ids")
    print(f"     {time.time() - t0:.1f} s for {MAX_SEQ_LEN} positions")
    ids = [int(i) for i in p.out.strip().split(",")]
    assert len(ids) == MAX_SEQ_LEN - n_prompt, f"{len(ids)} tokens generated, expected {MAX_SEQ_LEN - n_prompt}"
    assert all(0 <= i < N_REAL and i != EOS for i in ids), sorted(set(i for i in ids if i >= N_REAL or i == EOS))
    assert len(set(ids)) > 100, f"only {len(set(ids))} distinct ids: sampling got stuck"
    assert "stopped: the context is full" in p.err, p.err[-500:]
    m = re.search(r"prompt (\d+) tokens.*generated (\d+) tokens", p.err)
    assert m and (int(m.group(1)), int(m.group(2))) == (n_prompt, MAX_SEQ_LEN - n_prompt), p.err[-500:]
