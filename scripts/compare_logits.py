#!/usr/bin/env python3
"""Compare two --dump-logits files (little-endian float32 rows of vocab_size).

usage: compare_logits.py A.f32 B.f32 --vocab V [--json]

B is the reference (e.g. scripts/reference.py), A the candidate (e.g. ./phi2). Prints
  max |A-B|, max|A-B| / max|B|, mean over rows of KL(softmax(B) || softmax(A)),
  top-1 agreement (fraction of rows whose argmax agrees).
"""
import argparse
import json
import sys

import numpy as np


def load(path, vocab):
    try:
        a = np.fromfile(path, dtype="<f4")
    except OSError as e:
        raise SystemExit(f"error: {path}: {e.strerror}")
    if a.size == 0 or a.size % vocab:
        raise SystemExit(f"error: {path}: {a.size} floats is not a positive multiple of vocab {vocab}")
    return a.reshape(-1, vocab).astype(np.float64)


def log_softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def compare(a, b):
    diff = np.abs(a - b)
    lb, la = log_softmax(b), log_softmax(a)
    kl = (np.exp(lb) * (lb - la)).sum(axis=-1)
    return {
        "rows": int(a.shape[0]),
        "max_abs_diff": float(diff.max()),
        "rel_max_diff": float(diff.max() / max(np.abs(b).max(), 1e-30)),
        "mean_kl": float(kl.mean()),
        "max_kl": float(kl.max()),
        "top1_agreement": float((a.argmax(axis=-1) == b.argmax(axis=-1)).mean()),
    }


def main():
    ap = argparse.ArgumentParser(description="compare two logits dumps (B = reference)")
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--vocab", type=int, required=True)
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = ap.parse_args()
    if args.vocab <= 0:
        raise SystemExit("error: --vocab must be positive")
    a, b = load(args.a, args.vocab), load(args.b, args.vocab)
    if a.shape != b.shape:
        raise SystemExit(f"error: {args.a} has {a.shape[0]} rows, {args.b} has {b.shape[0]}")
    r = compare(a, b)
    if args.json:
        print(json.dumps(r))
    else:
        print(f"rows              {r['rows']}")
        print(f"max |A-B|         {r['max_abs_diff']:.6g}")
        print(f"max|A-B| / max|B| {r['rel_max_diff']:.6g}")
        print(f"mean KL(B||A)     {r['mean_kl']:.6g}   (max {r['max_kl']:.6g})")
        print(f"top-1 agreement   {r['top1_agreement']:.4f}")


if __name__ == "__main__":
    sys.exit(main())
