#!/usr/bin/env python3
"""Compare 4-bit weight formats by what they do to the model's output distribution.

usage: quant_study.py HF_DIR [--positions 200] [--seed 7] [--train HF_DIR2]

Every candidate format is applied to the checkpoint's matrices as quantize-then-dequantize
(the values an engine would multiply with), the float64 reference forward pass
(scripts/reference.py) runs the same random prompt through the original and the quantized
weights, and the table gives bits per weight, mean KL(original || quantized) over every
prompt position and how often the top-1 token agrees.

The non-uniform candidates need a 16-level codebook: it is fitted (Lloyd's algorithm) to the
group-normalized weights of --train (another checkpoint: the codebook must not be fitted to
the weights it is judged on), or taken from convert.py's Q4_LEVELS with --train omitted.

This is how phi2.c's q4 format was chosen (docs/FORMAT.md, "How q4 was chosen").
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import convert  # noqa: E402
import reference  # noqa: E402

GROUP = 32  # weights per scale in every 4-bit candidate


def groups(w):
    rows, cols = w.shape
    return w.reshape(rows, cols // GROUP, GROUP)


def f16(x):
    """Scales are stored as float16."""
    return x.astype(np.float16).astype(np.float64)


def q4_absmax(w):
    """Scale-only, llama.cpp Q4_0's rule: d = (the weight of largest magnitude) / -8,
    q = round(w/d) in [-8, 7]. 4.5 bits/weight."""
    g = groups(w)
    idx = np.abs(g).argmax(axis=-1)
    m = np.take_along_axis(g, idx[..., None], axis=-1)[..., 0]
    d = f16(m / -8.0)
    inv = np.divide(1.0, d, out=np.zeros_like(d), where=d != 0)
    q = np.clip(np.rint(g * inv[..., None]), -8, 7)
    return (q * d[..., None]).reshape(w.shape)


def best_scale(g, levels, tries):
    """Per group, the scale (from tries x absmax/max|level|) whose nearest-level rounding has
    the least squared error; returns the dequantized groups."""
    levels = np.asarray(levels, dtype=np.float64)
    amax = np.abs(g).max(axis=-1)
    best_err = np.full(amax.shape, np.inf)
    best = np.zeros_like(g)
    for t in tries:
        d = f16(amax * t / np.abs(levels).max())
        inv = np.divide(1.0, d, out=np.zeros_like(d), where=d != 0)
        x = g * inv[..., None]
        deq = levels[nearest_level(x, levels)] * d[..., None]
        err = ((deq - g) ** 2).sum(axis=-1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best = np.where(better[..., None], deq, best)
    return best


def nearest_level(x, levels):
    """Index of the level nearest to each x (levels sorted ascending)."""
    mids = (levels[1:] + levels[:-1]) / 2
    return np.searchsorted(mids, x)


TRIES = np.linspace(0.70, 1.10, 41)


def q4_mse(w):
    """Scale-only with levels -8..7, the scale searched to minimise each group's squared
    error. 4.5 bits/weight."""
    return best_scale(groups(w), np.arange(-8, 8), TRIES).reshape(w.shape)


def q4_offset(w):
    """Scale and minimum (llama.cpp Q4_1's rule): d = (max-min)/15, q = round((w-min)/d).
    5 bits/weight."""
    g = groups(w)
    lo, hi = g.min(axis=-1), g.max(axis=-1)
    d, m = f16((hi - lo) / 15.0), f16(lo)
    inv = np.divide(1.0, d, out=np.zeros_like(d), where=d != 0)
    q = np.clip(np.rint((g - m[..., None]) * inv[..., None]), 0, 15)
    return (q * d[..., None] + m[..., None]).reshape(w.shape)


def q4_convert(w):
    """convert.py's q4, the format phi2.c reads (its own codebook, scale rule and layout)."""
    return convert.dequantize_q4(*convert.quantize_q4(w.astype(np.float32))).astype(np.float64)


def make_codebook_quantizer(levels):
    def q4_codebook(w):
        return best_scale(groups(w), levels, TRIES).reshape(w.shape)
    return q4_codebook


def fit_codebook(matrices, iters=30):
    """16 integer levels (in [-63, 63], as convert.py's Q4_LEVELS) fitted by Lloyd's algorithm
    to the weights divided by their group's max |w|, then rounded."""
    x = np.concatenate([(g / np.maximum(np.abs(g).max(axis=-1, keepdims=True), 1e-30)).ravel()
                        for g in map(groups, matrices)])
    levels = np.quantile(x, (np.arange(16) + 0.5) / 16)
    for _ in range(iters):
        idx = nearest_level(x, levels)
        levels = np.array([x[idx == k].mean() if np.any(idx == k) else levels[k] for k in range(16)])
    levels = np.rint(levels * 63).astype(int)
    return sorted(set(levels.tolist()))


def matrices_of(weights):
    embed, layers, _, (head_w, _) = weights
    for ly in layers:
        yield from (ly.wq, ly.wk, ly.wv, ly.wd, ly.w1, ly.w2)


def quantized(weights, quant, head_quant):
    embed, layers, fin, (head_w, head_b) = weights
    out_layers = []
    for ly in layers:
        q = reference.Layer()
        q.__dict__.update(ly.__dict__)
        for name in ("wq", "wk", "wv", "wd", "w1", "w2"):
            setattr(q, name, quant(getattr(ly, name)))
        out_layers.append(q)
    return head_quant(embed), out_layers, fin, (head_quant(head_w), head_b)


def q8(w):
    """convert.py's q8: groups of 64, d = max|w|/127 (float32)."""
    q, d = convert.quantize_q8(w.astype(np.float32))
    rows, cols = w.shape
    return (q.reshape(rows, cols // 64, 64) * d[..., None].astype(np.float64)).reshape(w.shape)


def log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def kl_top1(ref_logits, logits):
    lp, lq = log_softmax(ref_logits), log_softmax(logits)
    kl = (np.exp(lp) * (lp - lq)).sum(axis=-1)
    return float(kl.mean()), float((ref_logits.argmax(-1) == logits.argmax(-1)).mean())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("hf_dir")
    ap.add_argument("--train", metavar="HF_DIR2", help="checkpoint to fit the codebook on")
    ap.add_argument("--positions", type=int, default=200)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--fan-in-init", action="store_true",
                    help="replace the checkpoint's values by plain random init: every matrix "
                         "N(0, 1/fan_in), the embedding N(0, 1), biases 0, LayerNorm weights 1")
    args = ap.parse_args()

    cfg, tensors = reference.load_checkpoint(args.hf_dir)
    if args.fan_in_init:
        tensors = fan_in_init(tensors, args.seed)
    weights = reference.get_weights(cfg, tensors)
    ids = np.random.default_rng(args.seed).integers(0, reference_real_tokens(cfg), args.positions).tolist()
    ref = reference.forward(cfg, weights, ids)

    if args.train:
        tcfg, ttensors = reference.load_checkpoint(args.train)
        levels = fit_codebook(list(matrices_of(reference.get_weights(tcfg, ttensors))))
        print(f"codebook fitted on {args.train}: {levels}")
    else:
        levels = list(convert.Q4_LEVELS)
        print(f"codebook from convert.py: {levels}")

    codebook = make_codebook_quantizer(levels)
    candidates = [  # (name, bits per weight of the layer matrices, layer matrices, embed + lm_head)
        ("q8 (64 per f32 scale)", 8.5, q8, q8),
        ("4-bit scale-only, absmax (Q4_0-like)", 4.5, q4_absmax, q4_absmax),
        ("4-bit scale-only, least-squares scale", 4.5, q4_mse, q4_mse),
        ("4-bit scale + min (Q4_1-like)", 5.0, q4_offset, q4_offset),
        ("4-bit codebook, scale of 41 tried", 4.5, codebook, codebook),
        ("  same, embed + lm_head q8", 4.5, codebook, q8),
        ("convert.py q4 (codebook, 4 scales tried)", 4.5, q4_convert, q8),
        ("  Q4_0-like, embed + lm_head q8", 4.5, q4_absmax, q8),
    ]
    print(f"{cfg['hidden_size']} hidden, {cfg['num_hidden_layers']} layers, {args.positions} positions; "
          f"KL(f32 || quantized), mean over positions")
    print(f"{'format':42} {'bits/w':>6} {'mean KL':>10} {'top-1':>6}")
    for name, bits, quant, head_quant in candidates:
        logits = reference.forward(cfg, quantized(weights, quant, head_quant), ids)
        kl, top1 = kl_top1(ref, logits)
        print(f"{name:42} {bits:6.1f} {kl:10.3e} {top1:6.1%}", flush=True)


def fan_in_init(tensors, seed):
    rng = np.random.default_rng(seed + 1000)
    out = {}
    for name, t in sorted(tensors.items()):
        if t.ndim == 2:
            fan_in = 1 if "embed" in name or "wte" in name else t.shape[1]
            out[name] = rng.standard_normal(t.shape) / np.sqrt(fan_in)
        elif "norm" in name or name.endswith("ln.weight"):
            out[name] = np.ones_like(t) if name.endswith("weight") else np.zeros_like(t)
        else:
            out[name] = np.zeros_like(t)
    return out


def reference_real_tokens(cfg):
    return min(cfg["vocab_size"], 50295)


if __name__ == "__main__":
    main()
