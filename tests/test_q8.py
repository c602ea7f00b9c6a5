"""int8 (Q8_0) model files: quality against the float32 file, end to end use, corruption.

Bounds, from measurement on the tiny synthetic model (hidden 128: only two groups of 64 per
row, so quantization noise is relatively large; the full-size model is far closer):
measured mean KL 0.0027, max row KL 0.011, top-1 agreement 0.977, max|diff|/max|logit| 0.012
on the 130-token prompt. The bounds below leave ~3x headroom, and the sabotage test shows
that a wrong scale, a wrong group boundary or an off-by-one embedding row lands far outside.
"""
import os
import struct

import numpy as np

from common import (WORK, checkpoint, converted, engine_logits, phi2, read_logits, rel_max_diff)

VOCAB = 51200
LONG = [int(i) for i in np.random.default_rng(7).integers(0, 50295, size=130)]
MAX_MEAN_KL = 0.01
MIN_TOP1 = 0.90
MAX_REL_DIFF = 0.04


def quality(a, b):
    """(mean KL(softmax(b) || softmax(a)), top-1 agreement, rel max diff); b is the reference."""
    def log_softmax(x):
        x = x.astype(np.float64)
        x = x - x.max(axis=1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=1, keepdims=True))
    la, lb = log_softmax(a), log_softmax(b)
    kl = float((np.exp(lb) * (lb - la)).sum(axis=1).mean())
    top1 = float((a.argmax(axis=1) == b.argmax(axis=1)).mean())
    return kl, top1, rel_max_diff(a, b)


def q8_and_f32_logits(seed, ids, q8_path=None):
    ckpt = checkpoint(seed=seed)
    f32 = read_logits(engine_logits(converted(ckpt, "f32"), ids), VOCAB)
    q8 = read_logits(engine_logits(q8_path or converted(ckpt, "q8"), ids), VOCAB)
    return quality(q8, f32)


def test_q8_close_to_f32():
    for seed in (1, 2):
        kl, top1, rel = q8_and_f32_logits(seed, LONG)
        print(f"     seed {seed}: mean KL {kl:.5f}, top-1 {top1:.3f}, rel max diff {rel:.4f}")
        assert kl <= MAX_MEAN_KL and top1 >= MIN_TOP1 and rel <= MAX_REL_DIFF, (kl, top1, rel)


def test_q8_file_is_about_a_quarter():
    ckpt = checkpoint()
    f32, q8 = os.path.getsize(converted(ckpt, "f32")), os.path.getsize(converted(ckpt, "q8"))
    # int8 + one float scale per 64 weights = 1.0625 bytes per weight instead of 4
    assert 0.25 < q8 / f32 < 0.30, (q8, f32)


def q8_layout(path):
    """Offsets of the q8 file's tensors, walked as docs/FORMAT.md lays them out."""
    with open(path, "rb") as f:
        h = f.read(256)
    V, H, F, L = struct.unpack("<4I", h[16:32])
    gs = struct.unpack("<I", h[48:52])[0]
    w_off = struct.unpack("<Q", h[88:96])[0]
    off, out = w_off, {}

    def take(name, nbytes):
        nonlocal off
        off = (off + 63) // 64 * 64
        out[name] = off
        off += nbytes

    def matrix(name, rows, cols):
        take(name + ".q", rows * cols)
        take(name + ".d", rows * cols // gs * 4)

    matrix("embed", V, H)
    for l in range(L):
        take(f"{l}.ln_w", H * 4); take(f"{l}.ln_b", H * 4)
        matrix(f"{l}.qkv", 3 * H, H); take(f"{l}.qkv_b", 3 * H * 4)
        matrix(f"{l}.dense", H, H); take(f"{l}.dense_b", H * 4)
        matrix(f"{l}.fc1", F, H); take(f"{l}.fc1_b", F * 4)
        matrix(f"{l}.fc2", H, F); take(f"{l}.fc2_b", H * 4)
    return out, dict(V=V, H=H, F=F, gs=gs)


def sabotaged(name, edit):
    """A copy of the tiny q8 file with edit(data, offsets, dims) applied, its weight sums and
    header checksum made to match: a converter's mistake, not a damaged file."""
    from test_cli import fnv1a64
    from test_convert import weight_sums
    src = converted(checkpoint(), "q8")
    data = bytearray(open(src, "rb").read())
    offsets, dims = q8_layout(src)
    edit(data, offsets, dims)
    w_off = struct.unpack("<Q", data[88:96])[0]
    data[120:136] = struct.pack("<QQ", *weight_sums(bytes(data[w_off:])))
    data[248:256] = struct.pack("<Q", fnv1a64(bytes(data[:248])))
    path = os.path.join(WORK, name)
    with open(path, "wb") as f:
        f.write(data)
    return path


def test_bounds_catch_wrong_scale_group_or_row():
    """Each of these mistakes, planted in the file, must fall outside the bounds above."""
    def scale_x2(data, o, d):  # every scale of layer 1's fc1 doubled
        n = d["F"] * d["H"] // d["gs"]
        a = np.frombuffer(bytes(data[o["1.fc1.d"]:o["1.fc1.d"] + 4 * n]), "<f4") * 2
        data[o["1.fc1.d"]:o["1.fc1.d"] + 4 * n] = a.astype("<f4").tobytes()

    def groups_swapped(data, o, d):  # each row of layer 0's qkv uses its neighbour group's scale
        n = 3 * d["H"] * d["H"] // d["gs"]
        a = np.frombuffer(bytes(data[o["0.qkv.d"]:o["0.qkv.d"] + 4 * n]), "<f4").reshape(3 * d["H"], -1)
        data[o["0.qkv.d"]:o["0.qkv.d"] + 4 * n] = np.ascontiguousarray(a[:, ::-1]).astype("<f4").tobytes()

    def embed_row_shift(data, o, d):  # embedding row r holds row r+1 (scales and values)
        H, V, gs = d["H"], d["V"], d["gs"]
        q = bytes(data[o["embed.q"]:o["embed.q"] + V * H])
        data[o["embed.q"]:o["embed.q"] + V * H] = q[H:] + q[:H]
        s = bytes(data[o["embed.d"]:o["embed.d"] + V * H // gs * 4])
        k = H // gs * 4
        data[o["embed.d"]:o["embed.d"] + len(s)] = s[k:] + s[:k]

    for name, edit in (("scale", scale_x2), ("group", groups_swapped), ("row", embed_row_shift)):
        kl, top1, rel = q8_and_f32_logits(1, LONG, sabotaged(f"sabotage-{name}.q8.bin", edit))
        print(f"     planted {name} mistake: mean KL {kl:.4f}, top-1 {top1:.3f}, rel max diff {rel:.3f}")
        assert kl > 3 * MAX_MEAN_KL or top1 < MIN_TOP1 - 0.2, f"{name} mistake not caught: {kl}, {top1}"


def test_q8_generation_end_to_end():
    m = converted(checkpoint(), "q8")
    p = phi2(m, "-p", "def fibonacci(n):\n    ", "-n", "20", "--temp", "0", "--print-ids", "--ignore-eos")
    ids = [int(i) for i in p.out.strip().split(",")]
    assert len(ids) == 20 and all(0 <= i < 50295 for i in ids), p.out
    assert "-n limit" in p.err, p.err
    text = phi2(m, "-p", "Hello", "-n", "8", "-s", "3").stdout
    assert text.startswith(b"Hello")


def test_corrupt_q8_file_is_rejected():
    m = converted(checkpoint(), "q8")
    data = open(m, "rb").read()
    bad = os.path.join(WORK, "trunc.q8.bin")
    with open(bad, "wb") as f:
        f.write(data[:-64])
    p = phi2(bad, "-p", "hi", check=False)
    assert p.returncode == 1 and p.err.startswith("phi2: error:") and len(p.err.strip().splitlines()) == 1, p.err
    # group size 32 with a correct header checksum: refused, not misread
    from test_cli import fnv1a64
    hdr = bytearray(data[:256])
    hdr[48:52] = struct.pack("<I", 32)
    hdr[248:256] = struct.pack("<Q", fnv1a64(bytes(hdr[:248])))
    with open(bad, "wb") as f:
        f.write(bytes(hdr) + data[256:])
    p = phi2(bad, "-p", "hi", check=False)
    assert p.returncode == 1 and "group size" in p.err, p.err
