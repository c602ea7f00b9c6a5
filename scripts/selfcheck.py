#!/usr/bin/env python3
"""One-command check of a model file converted from the REAL microsoft/phi-2 weights.

    scripts/selfcheck.py phi2.f32.bin [--phi2 ./phi2]

Runs the engine on the input ids of transformers' Phi-2 integration test and compares the
logits of positions 0 and 1, vocabulary entries 0..29, with the published fp32 values
(../shared/PHI2_SPEC.md). A float32 file should agree to about 1e-3; an int8 (q8) file is
approximate and is judged by a looser bound. Synthetic models will (correctly) fail.
"""
import argparse
import os
import struct
import subprocess
import sys
import tempfile

import numpy as np

IDS = [1212, 318, 281, 1672, 2643, 290, 428, 318, 257, 1332]
EXPECTED = np.array([
    [6.4830, 6.1644, 3.4055, 2.2848, 5.4654, 2.8360, 5.5975, 5.5391, 7.3101, 4.2498, 2.5913, 10.3885, 6.4359,
     8.7982, 5.6534, 0.5150, 2.7498, 3.1930, 2.4334, 1.7781, 1.5613, 1.3067, 0.8291, 0.5633, 0.6522, 9.8191,
     5.5771, 2.7987, 4.2845, 3.7030],
    [6.0642, 7.8242, 3.4634, 1.9259, 4.3169, 2.0913, 6.0446, 3.6804, 6.6736, 4.0727, 2.1791, 11.4139, 5.6795,
     7.5652, 6.2039, 2.7174, 4.3266, 3.6930, 2.8058, 2.6721, 2.3047, 2.0848, 2.0972, 2.0441, 1.3160, 9.2085,
     4.5557, 3.0296, 2.6045, 2.4059],
])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--phi2", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "phi2"))
    args = ap.parse_args()
    with open(args.model, "rb") as f:
        header = f.read(20)
    if len(header) < 20 or header[:8] != b"PHI2CBIN":
        sys.exit(f"error: {args.model} is not a phi2.c model file")
    weight_type, vocab = struct.unpack("<II", header[12:20])
    tol = 1e-3 if weight_type == 0 else 0.25
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "logits.f32")
        p = subprocess.run([args.phi2, args.model, "--ids", ",".join(map(str, IDS)), "--dump-logits", out])
        if p.returncode != 0:
            sys.exit("error: the engine failed")
        logits = np.fromfile(out, dtype="<f4").reshape(len(IDS), vocab)
    got = logits[:2, :30]
    diff = float(np.max(np.abs(got - EXPECTED)))
    print(f"max |diff| vs published logits (positions 0-1, ids 0-29): {diff:.5f} (bound {tol})")
    print("PASS" if diff <= tol else "FAIL")
    sys.exit(0 if diff <= tol else 1)


if __name__ == "__main__":
    main()
