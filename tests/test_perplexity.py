"""--perplexity, --save-logprobs and --kl-base against scripts/reference.py.

The engine cuts the text's tokens into windows of -c tokens (a partial last window is left
out), runs each window from position 0 and scores the tokens of its second half, positions
c/2 + 1 .. c-1, each by the log-softmax of the logits at the position before it. The test
does the same with the float64 reference's logits of each window and must get the same
perplexity (and standard error); the same comparison must fail for a planted mistake
(scoring the whole window, or the first half). The --save-logprobs file is checked row by row
against the reference, and --kl-base's numbers against the same numbers computed here from
two such files (f32 as the base, q8 as the run).
"""
import os
import re

import numpy as np

from common import REPO, WORK, checkpoint, converted, phi2, read_logits, reference_logits
from test_cli import expect_error

CTX = 48
BATCH = 12  # batches that straddle the half-window boundary
VOCAB = 51200


def text_file():
    """Enough of the README for 3 windows and a partial fourth (187 tokens)."""
    path = os.path.join(WORK, "ppl-text.txt")
    with open(os.path.join(REPO, "README.md"), "rb") as f:
        readme = f.read()
    with open(path, "wb") as f:
        f.write(readme[:600])
    return path


def tokens(model, path):
    return [int(i) for i in phi2(model, "-f", path, "--tokenize").out.strip().split(",")]


def log_softmax(logits):
    x = logits.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def reference_scores(ckpt, ids, ctx, scored=lambda ctx: range(ctx // 2 + 1, ctx)):
    """(targets, log-prob rows) of the reference over the engine's windows. scored: which
    positions of a window are scored (a planted mistake passes another range)."""
    targets, rows = [], []
    for w in range(len(ids) // ctx):
        window = ids[w * ctx:(w + 1) * ctx]
        lp = log_softmax(read_logits(reference_logits(ckpt, window), VOCAB))
        for pos in scored(ctx):
            targets.append(window[pos])
            rows.append(lp[pos - 1])
    return np.array(targets), np.array(rows)


def perplexity_of(targets, rows):
    nll = -rows[np.arange(len(targets)), targets]
    ppl = float(np.exp(nll.mean()))
    return ppl, ppl * float(nll.std(ddof=1) / np.sqrt(len(nll)))


def parse_ppl(out):
    m = re.search(r"perplexity: ([0-9.]+) \+/- ([0-9.]+) \((\d+) tokens scored", out)
    assert m, out
    return float(m.group(1)), float(m.group(2)), int(m.group(3))


def test_perplexity_matches_reference():
    """The engine's perplexity and its standard error equal the reference's over the same
    windows (second halves scored); scoring whole windows or first halves would not."""
    ckpt = checkpoint()
    model = converted(ckpt)
    path = text_file()
    ids = tokens(model, path)
    assert 3 * CTX <= len(ids) < 4 * CTX, len(ids)
    p = phi2(model, "--perplexity", path, "-c", CTX, "-b", BATCH, "-t", 1)
    ppl, se, n = parse_ppl(p.out)
    progress = [ln for ln in p.err.splitlines() if "perplexity: window" in ln]
    assert len(progress) == 3 and "window 3/3" in progress[-1], p.err
    want_ppl, want_se = perplexity_of(*reference_scores(ckpt, ids, CTX))
    print(f"     engine {ppl:.6g} +/- {se:.6g}, reference {want_ppl:.6g} +/- {want_se:.6g} over {n} tokens")
    assert n == 3 * (CTX - 1 - CTX // 2)
    assert abs(ppl / want_ppl - 1) < 1e-4 and abs(se / want_se - 1) < 1e-3, (ppl, se, want_ppl, want_se)
    # planted mistakes: the same check against wrongly scored windows fails
    for wrong in (lambda c: range(1, c), lambda c: range(1, c // 2 + 1), lambda c: range(c // 2, c - 1)):
        bad_ppl, _ = perplexity_of(*reference_scores(ckpt, ids, CTX, wrong))
        assert abs(ppl / bad_ppl - 1) > 1e-3, "the check cannot tell which positions are scored"
    # the batch size does not change the result (beyond float rounding)
    ppl1, _, _ = parse_ppl(phi2(model, "--perplexity", path, "-c", CTX, "-b", 1, "-t", 1).out)
    assert abs(ppl1 / ppl - 1) < 1e-5, (ppl1, ppl)


def read_logprobs(path):
    """A --save-logprobs file: (vocab, ctx, targets, rows)."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == b"PHI2LPR1", data[:8]
    vocab, ctx, n_rows, zero = np.frombuffer(data[8:24], dtype="<u4")
    assert zero == 0
    rec = np.frombuffer(data[24:], dtype=np.dtype([("target", "<u4"), ("row", "<f4", (vocab,))]))
    assert len(rec) == n_rows, (len(rec), n_rows)
    return int(vocab), int(ctx), rec["target"].astype(np.int64), rec["row"].astype(np.float64)


def test_save_logprobs_and_kl_base():
    """--save-logprobs writes the reference's log-probabilities of every scored token; --kl-base
    of a q8 run against the f32 file prints the mean KL, the top-1 agreement and the perplexity
    ratio computed here from the two files; against itself, 0, 100% and 1."""
    ckpt = checkpoint()
    f32, q8 = converted(ckpt), converted(ckpt, "q8")
    path = text_file()
    base, run = os.path.join(WORK, "ppl-f32.lp"), os.path.join(WORK, "ppl-q8.lp")
    phi2(f32, "--perplexity", path, "-c", CTX, "--save-logprobs", base)
    vocab, ctx, targets, rows = read_logprobs(base)
    want_targets, want_rows = reference_scores(ckpt, tokens(f32, path), CTX)
    assert (vocab, ctx) == (VOCAB, CTX) and np.array_equal(targets, want_targets)
    assert np.max(np.abs(rows - want_rows)) < 1e-3, np.max(np.abs(rows - want_rows))

    out = phi2(q8, "--perplexity", path, "-c", CTX, "--save-logprobs", run, "--kl-base", base).out
    m = re.search(r"kl-divergence: (\S+) \+/- (\S+) \| top-1 agreement: ([0-9.]+)% \| "
                  r"perplexity ratio \(this / base\): ([0-9.]+)", out)
    assert m, out
    kl, _, top1, ratio = (float(g) for g in m.groups())
    _, _, _, q8_rows = read_logprobs(run)
    want_kl = float(np.mean(np.sum(np.exp(rows) * (rows - q8_rows), axis=1)))
    want_top1 = 100 * float(np.mean(rows.argmax(axis=1) == q8_rows.argmax(axis=1)))
    idx = np.arange(len(targets))
    want_ratio = float(np.exp(np.mean(-q8_rows[idx, targets]) - np.mean(-rows[idx, targets])))
    print(f"     q8 vs f32: KL {kl:.4g} (here {want_kl:.4g}), top-1 {top1:.2f}%, ratio {ratio:.6f}")
    assert kl > 0 and abs(kl / want_kl - 1) < 1e-3, (kl, want_kl)
    assert abs(top1 - want_top1) < 1e-3 and abs(ratio / want_ratio - 1) < 1e-5, (top1, want_top1, ratio, want_ratio)

    same = phi2(f32, "--perplexity", path, "-c", CTX, "--kl-base", base).out
    assert "top-1 agreement: 100.0000%" in same and "(this / base): 1.000000" in same, same
    assert abs(float(re.search(r"kl-divergence: (\S+)", same).group(1))) < 1e-6, same


def test_perplexity_errors():
    """Bad inputs: one clear error line and exit 1, and no --save-logprobs file left behind."""
    ckpt = checkpoint()
    model = converted(ckpt)
    path = text_file()
    empty = os.path.join(WORK, "ppl-empty.txt")
    open(empty, "wb").close()
    expect_error(model, "--perplexity", empty, "-c", CTX, contains="empty")
    expect_error(model, "--perplexity", path, "-c", 200, contains="shorter than one window")
    expect_error(model, "--perplexity", path, "-c", 2, contains="at least 3")
    expect_error(model, "--perplexity", path, "-c", 5000, contains="exceeds")
    expect_error(model, "--perplexity", os.path.join(WORK, "no-such.txt"), contains="cannot open")
    expect_error(model, "--perplexity", path, "-c", CTX, "--kl-base", os.path.join(WORK, "no-such.lp"),
                 contains="cannot open --kl-base")
    expect_error(model, "--perplexity", path, "-p", "hi", contains="--perplexity")
    expect_error(model, "--save-logprobs", os.path.join(WORK, "x.lp"), "-p", "hi", contains="need --perplexity")
    expect_error(model, "--kl-base", os.path.join(WORK, "x.lp"), "-p", "hi", contains="need --perplexity")

    base = os.path.join(WORK, "ppl-base.lp")
    phi2(model, "--perplexity", path, "-c", CTX, "--save-logprobs", base)
    expect_error(model, "--perplexity", path, "-c", 32, "--kl-base", base, contains="-c 48")  # other windows
    other = os.path.join(WORK, "ppl-other.txt")  # other tokens (the same number of windows or not)
    with open(path, "rb") as f:
        text = f.read()
    with open(other, "wb") as f:
        f.write(text.replace(b"e", b"a"))
    expect_error(model, "--perplexity", other, "-c", CTX, "--kl-base", base, contains="different text")
    not_lp = os.path.join(WORK, "ppl-not-lp.bin")
    with open(not_lp, "wb") as f:
        f.write(b"x" * 100)
    expect_error(model, "--perplexity", path, "-c", CTX, "--kl-base", not_lp, contains="not a --save-logprobs")
    with open(base, "rb") as f:
        data = f.read()
    truncated = os.path.join(WORK, "ppl-truncated.lp")
    with open(truncated, "wb") as f:
        f.write(data[:len(data) - 100])
    # found when the run gets there: after the progress lines of the windows before, one error line
    out = os.path.join(WORK, "ppl-out.lp")
    p = phi2(model, "--perplexity", path, "-c", CTX, "--save-logprobs", out, "--kl-base", truncated, check=False)
    lines = [ln for ln in p.err.splitlines() if "perplexity: window" not in ln]
    assert p.returncode == 1 and len(lines) == 1 and "ends early" in lines[0], (p.returncode, p.err)
    assert not os.path.exists(out) and not os.path.exists(out + ".tmp")
