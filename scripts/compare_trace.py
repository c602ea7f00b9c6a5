#!/usr/bin/env python3
"""Compare two --trace files step by step and find where they first diverge.

usage: compare_trace.py ENGINE_TRACE REFERENCE_TRACE [--tol T]

ENGINE_TRACE comes from `./phi2 MODEL.bin --ids 1,2,3 --trace FILE`, REFERENCE_TRACE from
`scripts/reference.py HF_DIR --ids 1,2,3 --trace FILE` (the float64 oracle), for the same
prompt. A trace is a sequence of records, little-endian:

    u32 name length, name (ASCII), u32 position, u32 n, n float32

one per named intermediate ("step") and prompt position. The steps, in the order the forward
pass computes them:

    embed                                 the token's embedding row
    L{l}.ln                               layer l's LayerNorm output
    L{l}.q  L{l}.k  L{l}.v                query and key (after rotary), value
    L{l}.attn  L{l}.attn_out              attention output, then after the dense projection
    L{l}.mlp_act  L{l}.mlp_out            fc1 + gelu_new, then after fc2
    L{l}.residual                         the residual stream after the block
    final_ln  logits

For each step it prints the largest difference over the positions, relative to the
reference's largest magnitude at that position:

    max over positions p of  max|engine[p] - reference[p]| / max|reference[p]|

and marks the first step (in forward order) where that exceeds --tol. Everything after it
usually differs too: the bug is at (or just before) the first marked step.

Exit status: 0 every step agrees within --tol; 1 a step diverges ("first divergence: STEP at
position P", P the lowest position over the tolerance); 2 bad input (unreadable file, or the
two traces do not hold the same records with the same sizes).
"""
import argparse
import re
import signal
import struct
import sys

import numpy as np

# Measured on the tiny test model (tests/test_trace.py): the float32 engine agrees with the
# float64 reference to 1e-7..2e-6 (relative) at every step, with 6 or 130 positions, so 1e-4
# leaves a wide margin for longer prompts and deeper models and is still far below what a
# real bug does (a LayerNorm epsilon of 1e-2 instead of 1e-5: 5e-3; a rotary bug: 1).
# int8 (q8) model files differ by ~4e-3 already in the embedding and by up to 0.15 at the
# attention outputs (tiny model, 200 positions; its rows of only 2 groups of 64 are the worst
# case for q8): 0.3 for them.
DEFAULT_TOL = 1e-4
Q8_TOL = 0.3

LAYER_STEPS = ["ln", "q", "k", "v", "attn", "attn_out", "mlp_act", "mlp_out", "residual"]


class BadInput(Exception):
    pass


def read_trace(path):
    """{(name, position): float32 array} of a trace file."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise BadInput(f"cannot read {path}: {e.strerror}")
    records = {}
    off = 0
    while off < len(data):
        start = off
        if off + 4 > len(data):
            raise BadInput(f"{path}: truncated record at byte {start}")
        (name_len,) = struct.unpack_from("<I", data, off)
        off += 4
        if name_len == 0 or name_len > 64 or off + name_len + 8 > len(data):
            raise BadInput(f"{path}: bad or truncated record at byte {start}")
        try:
            name = data[off:off + name_len].decode("ascii")
        except UnicodeDecodeError:
            raise BadInput(f"{path}: record at byte {start}: name is not ASCII")
        off += name_len
        pos, n = struct.unpack_from("<II", data, off)
        off += 8
        if off + 4 * n > len(data):
            raise BadInput(f"{path}: record {name} at position {pos} is truncated")
        if (name, pos) in records:
            raise BadInput(f"{path}: {name} at position {pos} appears twice")
        records[(name, pos)] = np.frombuffer(data, dtype="<f4", count=n, offset=off)
        off += 4 * n
    if not records:
        raise BadInput(f"{path}: no records")
    return records


def step_order(names):
    """The step names in forward order: embed, L0.ln .. L{last}.residual, final_ln, logits;
    names this script does not know come last, sorted."""
    layers = sorted({int(m.group(1)) for m in (re.fullmatch(r"L(\d+)\..+", n) for n in names) if m})
    order = ["embed"] + [f"L{l}.{s}" for l in layers for s in LAYER_STEPS] + ["final_ln", "logits"]
    known = [n for n in order if n in names]
    return known + sorted(names - set(known))


def check_same_records(eng, ref, eng_path, ref_path):
    """Raise BadInput listing what one trace has and the other lacks, or sizes that differ."""
    problems = []
    for what, keys in (("missing from", ref.keys() - eng.keys()), ("extra in", eng.keys() - ref.keys())):
        for name, pos in sorted(keys)[:10]:
            problems.append(f"{name} at position {pos}: {what} {eng_path}")
        if len(keys) > 10:
            problems.append(f"... and {len(keys) - 10} more records {what} {eng_path}")
    for key in sorted(eng.keys() & ref.keys()):
        if eng[key].size != ref[key].size:
            problems.append(f"{key[0]} at position {key[1]}: {eng[key].size} values in {eng_path}, "
                            f"{ref[key].size} in {ref_path}")
    if problems:
        raise BadInput("the traces do not hold the same records:\n  " + "\n  ".join(problems[:30]))


def relative_diff(a, b):
    """max|a - b| / max|b| for one record (b: the reference); inf if a is not finite."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    if not np.all(np.isfinite(a)):
        return float("inf")
    scale = np.max(np.abs(b))
    diff = np.max(np.abs(a - b))
    return float(diff / scale) if scale > 0 else float(diff)


def main():
    ap = argparse.ArgumentParser(
        description="Compare an engine --trace with a reference.py --trace, step by step.",
        epilog=f"Tolerances: float32 model files agree with the reference to ~1e-6 at every step "
               f"(default --tol {DEFAULT_TOL:g}); for int8 (q8) model files use --tol {Q8_TOL:g} "
               f"(they differ by ~4e-3 from the embedding on, up to ~0.15 at attention outputs). "
               f"Exit status: 0 agree, 1 a step diverges, 2 bad input.")
    ap.add_argument("engine_trace", help="./phi2 MODEL.bin --ids ... --trace FILE")
    ap.add_argument("reference_trace", help="scripts/reference.py HF_DIR --ids ... --trace FILE")
    ap.add_argument("--tol", type=float, default=DEFAULT_TOL,
                    help=f"largest allowed max|a-b|/max|b| per step (default {DEFAULT_TOL:g}; q8: {Q8_TOL:g})")
    args = ap.parse_args()
    if hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # piped into head: stop quietly
    if not args.tol > 0:
        print("compare_trace.py: error: --tol must be positive", file=sys.stderr)
        return 2

    try:
        eng = read_trace(args.engine_trace)
        ref = read_trace(args.reference_trace)
        check_same_records(eng, ref, args.engine_trace, args.reference_trace)
    except BadInput as e:
        print(f"compare_trace.py: error: {e}", file=sys.stderr)
        return 2

    positions = sorted({pos for _, pos in ref})
    print(f"{len(positions)} positions, tolerance {args.tol:g} (max|engine-ref| / max|ref|)")
    print(f"{'step':<16} {'max rel diff':>12}  worst at")
    first = None  # (step, position)
    for step in step_order({name for name, _ in ref}):
        diffs = {pos: relative_diff(eng[(step, pos)], ref[(step, pos)]) for pos in positions
                 if (step, pos) in ref}
        worst = max(diffs, key=diffs.get)
        mark = ""
        if first is None and diffs[worst] > args.tol:
            first = (step, min(pos for pos, d in diffs.items() if d > args.tol))
            mark = f"   <-- first divergence (from position {first[1]})"
        print(f"{step:<16} {diffs[worst]:>12.2e}  position {worst}{mark}")

    if first:
        print(f"first divergence: {first[0]} at position {first[1]}")
        return 1
    print(f"all steps agree within {args.tol:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
