"""4-bit (q4) model files: the engine computes exactly what the file says, the format's
quality against float32, the converter's rounding rule, and planted mistakes.

Two separate questions, two references:
- Is the engine right? Its q4 logits are compared with the float64 reference forward pass
  (scripts/reference.py) run on the weights *as the file stores them*, decoded here from
  docs/FORMAT.md (codes, levels, float16 scales; embed and lm_head q8). The only difference
  left is the engine's int8 rounding of the activations, as for q8 files: measured mean KL
  0.0016 (top-1 0.97) on the tiny model, bound 0.01. A wrong nibble order, scale, group or
  level table lands at 0.3 or more (test_bounds_catch_planted_mistakes).
- Is the format good? q4 against the float32 file. The synthetic models have deliberately
  sharp logits (std ~4), so 4-bit noise shows up large: measured mean KL 0.18-0.21, top-1
  0.64-0.70 (q8: 0.0035, 0.94); bounds 0.35 and 0.5. scripts/quant_study.py compares the
  candidate formats on a checkpoint with Phi-2's head geometry.
"""
import os
import struct
import sys

import numpy as np

from common import SCRIPTS, WORK, checkpoint, converted, engine_logits, phi2, read_logits
from test_q8 import LONG, VOCAB, quality

sys.path.insert(0, SCRIPTS)
import reference  # noqa: E402

LEVELS = np.array([-61, -47, -36, -28, -20, -14, -8, -3, 3, 8, 14, 20, 28, 36, 47, 61], dtype=np.float64)
MAX_KL_VS_FILE = 0.01      # engine vs the float64 reference on the file's own weights
MAX_KL_VS_F32 = 0.35       # q4 file vs float32 file (format quality, sharp synthetic logits)
MIN_TOP1_VS_F32 = 0.5
PHI2_DIMS = dict(V=51200, H=2560, F=10240, L=32)


# ---------------------------------------------------------------- the file, decoded independently

def layout(h, w_off):
    """{tensor name: (offset, nbytes, encoding)} walked as docs/FORMAT.md lays the weights out."""
    wtype, V, H, F, L = struct.unpack("<5I", h[12:32])
    off, out = w_off, {}

    def take(name, nbytes, enc):
        nonlocal off
        off = (off + 63) // 64 * 64
        out[name] = (off, nbytes, enc)
        off += nbytes

    def matrix(name, rows, cols, table=False):
        t = wtype if not (table and wtype == 2) else 1
        if t == 0:
            take(name, rows * cols * 4, "f32")
        elif t == 1:
            take(name + ".q", rows * cols, "i8")
            take(name + ".d", rows * cols // 64 * 4, "f32")
        else:
            take(name + ".codes", rows * cols // 2, "u8")
            take(name + ".d", rows * cols // 32 * 2, "f16")

    matrix("embed", V, H, table=True)
    for i in range(L):
        take(f"{i}.ln_w", H * 4, "f32"); take(f"{i}.ln_b", H * 4, "f32")
        matrix(f"{i}.qkv", 3 * H, H); take(f"{i}.qkv_b", 3 * H * 4, "f32")
        matrix(f"{i}.dense", H, H); take(f"{i}.dense_b", H * 4, "f32")
        matrix(f"{i}.fc1", F, H); take(f"{i}.fc1_b", F * 4, "f32")
        matrix(f"{i}.fc2", H, F); take(f"{i}.fc2_b", H * 4, "f32")
    take("final_ln_w", H * 4, "f32"); take("final_ln_b", H * 4, "f32")
    matrix("lm_head", V, H, table=True)
    take("lm_head_b", V * 4, "f32")
    return out, (off + 63) // 64 * 64, dict(V=V, H=H, F=F, L=L, wtype=wtype)


def file_size_for(wtype, V, H, F, L, tokenizer_end=256):
    """The size of a model file with these dimensions (weights section from tokenizer_end)."""
    h = struct.pack("<8sII4I", b"PHI2CBIN", 2, wtype, V, H, F, L)
    w_off = (tokenizer_end + 63) // 64 * 64
    return layout(h, w_off)[1]


def read_array(data, entry, count=None):
    off, nbytes, enc = entry
    dt = {"f32": "<f4", "i8": "i1", "u8": "u1", "f16": "<f2"}[enc]
    return np.frombuffer(data, dtype=dt, count=nbytes // np.dtype(dt).itemsize, offset=off)


def decode_q4(codes, scales, rows, cols):
    """Weights of a q4 matrix: byte i of each 32-byte block holds weight i (low nibble) and
    weight 32 + i (high nibble) of its block of 64; weight = LEVELS[code] * scale[c // 32]."""
    b = codes.reshape(rows, cols // 64, 32)
    idx = np.concatenate([b & 15, b >> 4], axis=2).reshape(rows, cols)
    return LEVELS[idx] * np.repeat(scales.astype(np.float64).reshape(rows, cols // 32), 32, axis=1)


def file_weights(path):
    """(config, weights for reference.forward): every tensor as the file stores it, in float64."""
    data = open(path, "rb").read()
    w_off = struct.unpack("<Q", data[88:96])[0]
    offs, end, d = layout(data[:256], w_off)
    assert end == len(data), (end, len(data))
    V, H, F, L = d["V"], d["H"], d["F"], d["L"]

    def vec(name):
        return read_array(data, offs[name]).astype(np.float64)

    def mat(name, rows, cols):
        if name in offs:
            return read_array(data, offs[name]).astype(np.float64).reshape(rows, cols)
        if name + ".q" in offs:
            q = read_array(data, offs[name + ".q"]).astype(np.float64).reshape(rows, cols // 64, 64)
            s = read_array(data, offs[name + ".d"]).astype(np.float64).reshape(rows, cols // 64, 1)
            return (q * s).reshape(rows, cols)
        return decode_q4(read_array(data, offs[name + ".codes"]), read_array(data, offs[name + ".d"]), rows, cols)

    layers = []
    for i in range(L):
        ly = reference.Layer()
        ly.ln_w, ly.ln_b = vec(f"{i}.ln_w"), vec(f"{i}.ln_b")
        qkv, bqkv = mat(f"{i}.qkv", 3 * H, H), vec(f"{i}.qkv_b")
        ly.wq, ly.wk, ly.wv = qkv[:H], qkv[H:2 * H], qkv[2 * H:]
        ly.bq, ly.bk, ly.bv = bqkv[:H], bqkv[H:2 * H], bqkv[2 * H:]
        ly.wd, ly.bd = mat(f"{i}.dense", H, H), vec(f"{i}.dense_b")
        ly.w1, ly.b1 = mat(f"{i}.fc1", F, H), vec(f"{i}.fc1_b")
        ly.w2, ly.b2 = mat(f"{i}.fc2", H, F), vec(f"{i}.fc2_b")
        layers.append(ly)
    n_heads, head_dim, rot_dim, max_seq = struct.unpack("<4I", data[32:48])
    rope_theta, eps = struct.unpack("<2f", data[52:60])
    cfg = {"hidden_size": H, "num_attention_heads": n_heads, "partial_rotary_factor": rot_dim / head_dim,
           "rope_theta": rope_theta, "layer_norm_eps": eps}
    weights = (mat("embed", V, H), layers, (vec("final_ln_w"), vec("final_ln_b")),
               (mat("lm_head", V, H), vec("lm_head_b")))
    return cfg, weights


def file_reference_logits(path, ids):
    cfg, weights = file_weights(path)
    return reference.forward(cfg, weights, ids)


# ---------------------------------------------------------------- tests

def test_engine_computes_what_the_q4_file_says():
    for seed in (1, 2):
        path = converted(checkpoint(seed=seed), "q4")
        eng = read_logits(engine_logits(path, LONG), VOCAB)
        kl, top1, rel = quality(eng, file_reference_logits(path, LONG))
        print(f"     seed {seed}: engine vs float64 on the file's weights: mean KL {kl:.5f}, top-1 {top1:.3f}, "
              f"rel max diff {rel:.4f}")
        assert kl <= MAX_KL_VS_FILE and top1 >= 0.9, (kl, top1, rel)


def test_q4_quality_against_f32():
    for seed in (1, 2):
        ckpt = checkpoint(seed=seed)
        f32 = read_logits(engine_logits(converted(ckpt, "f32"), LONG), VOCAB)
        q4 = read_logits(engine_logits(converted(ckpt, "q4"), LONG), VOCAB)
        kl, top1, rel = quality(q4, f32)
        print(f"     seed {seed}: q4 vs f32: mean KL {kl:.4f}, top-1 {top1:.3f}, rel max diff {rel:.3f}")
        assert kl <= MAX_KL_VS_F32 and top1 >= MIN_TOP1_VS_F32, (kl, top1, rel)


def test_converter_rounding_rule():
    """Every code is the level nearest to w / scale (a different computation from convert.py:
    distances to all 16 levels), and no group's squared error exceeds that of the plain
    max|w| / 61 scale, which is one of the converter's candidates."""
    ckpt = checkpoint(dtype="F32")
    path = converted(ckpt, "q4")
    data = open(path, "rb").read()
    offs, _, d = layout(data[:256], struct.unpack("<Q", data[88:96])[0])
    cfg, t = reference.load_checkpoint(ckpt)
    H, F = d["H"], d["F"]
    for name, src, rows, cols in (("0.fc1", "model.layers.0.mlp.fc1.weight", F, H),
                                  ("3.fc2", "model.layers.3.mlp.fc2.weight", H, F)):
        w = t[src]
        codes, scales = read_array(data, offs[name + ".codes"]), read_array(data, offs[name + ".d"])
        deq = decode_q4(codes, scales, rows, cols)
        s = np.repeat(scales.astype(np.float64).reshape(rows, cols // 32), 32, axis=1)
        x = np.divide(w, s, out=np.zeros_like(w), where=s > 0)
        dist = np.abs(x[..., None] - LEVELS)                               # [rows, cols, 16]
        nearest = LEVELS[dist.argmin(axis=-1)]
        chosen = np.divide(deq, s, out=np.full_like(w, 5.0), where=s > 0)
        # the chosen level is at least as near as the nearest (float32 rounding of w / scale aside)
        gap = np.abs(x - chosen) - np.abs(x - nearest)
        assert gap.max() <= 1e-3, f"{name}: a code is not the nearest level ({gap.max()})"
        err = ((deq - w) ** 2).reshape(rows, -1, 32).sum(axis=-1)
        amax = np.abs(w).reshape(rows, -1, 32).max(axis=-1)
        plain = (amax / 61).astype(np.float16).astype(np.float64)[..., None]
        xg = (w.reshape(rows, -1, 32) / np.where(plain > 0, plain, 1))
        plain_deq = LEVELS[np.abs(xg[..., None] - LEVELS).argmin(axis=-1)] * plain
        plain_err = ((plain_deq - w.reshape(rows, -1, 32)) ** 2).sum(axis=-1)
        assert np.all(err <= plain_err * (1 + 1e-5) + 1e-30), f"{name}: a scale worse than max|w|/61"
        assert err.sum() < 0.95 * plain_err.sum(), f"{name}: the scale search gains nothing"


def test_q4_file_sizes():
    """The tiny file's size is what the layout says; the full-size Phi-2 q4 file is at most
    1.75 GB (the target), about 0.6 of the q8 one."""
    path = converted(checkpoint(), "q4")
    data = open(path, "rb").read(256)
    assert os.path.getsize(path) == layout(data, struct.unpack("<Q", data[88:96])[0])[1]
    tok = 256 + 1_000_000  # Phi-2's tokenizer section is under 1 MB
    q4 = file_size_for(2, **PHI2_DIMS, tokenizer_end=tok)
    q8 = file_size_for(1, **PHI2_DIMS, tokenizer_end=tok)
    print(f"     Phi-2 sizes: q4 {q4 / 1e9:.3f} GB, q8 {q8 / 1e9:.3f} GB")
    assert q4 <= 1.75e9 and 0.55 < q4 / q8 < 0.65, (q4, q8)


def sabotaged(name, edit):
    """A copy of the tiny q4 file with edit(data, offsets, dims) applied and its sums and
    header checksum made to match: a converter's (or kernel's) mistake, not a damaged file."""
    from test_cli import fnv1a64
    from test_convert import weight_sums
    src = converted(checkpoint(), "q4")
    data = bytearray(open(src, "rb").read())
    w_off = struct.unpack("<Q", data[88:96])[0]
    offs, _, d = layout(bytes(data[:256]), w_off)
    edit(data, offs, d)
    data[120:136] = struct.pack("<QQ", *weight_sums(bytes(data[w_off:])))
    data[248:256] = struct.pack("<Q", fnv1a64(bytes(data[:248])))
    path = os.path.join(WORK, name)
    with open(path, "wb") as f:
        f.write(data)
    return path, src


def test_bounds_catch_planted_mistakes():
    """Each mistake, planted in the file the engine reads, must fall outside the engine-vs-file
    bound when compared with the reference on the *correct* file's weights."""
    def region(data, entry):
        off, n, _ = entry
        return off, off + n

    def nibbles_swapped(data, o, d):   # layer 1's fc1: low and high nibbles exchanged
        a, b = region(data, o["1.fc1.codes"])
        x = np.frombuffer(bytes(data[a:b]), np.uint8)
        data[a:b] = ((x >> 4) | (x << 4)).astype(np.uint8).tobytes()

    def scales_doubled(data, o, d):    # layer 2's qkv: every scale x2
        a, b = region(data, o["2.qkv.d"])
        data[a:b] = (np.frombuffer(bytes(data[a:b]), "<f2") * 2).astype("<f2").tobytes()

    def groups_swapped(data, o, d):    # layer 0's fc2: the two groups of each block trade scales
        a, b = region(data, o["0.fc2.d"])
        s = np.frombuffer(bytes(data[a:b]), "<f2").reshape(-1, 2)
        data[a:b] = np.ascontiguousarray(s[:, ::-1]).tobytes()

    def levels_off_by_one(data, o, d):  # every q4 matrix: each code one level up (a shifted table)
        up = np.minimum(np.arange(16) + 1, 15).astype(np.uint8)
        for name in o:
            if name.endswith(".codes"):
                a, b = region(data, o[name])
                x = np.frombuffer(bytes(data[a:b]), np.uint8)
                data[a:b] = (up[x & 15] | (up[x >> 4] << 4)).astype(np.uint8).tobytes()

    for name, edit in (("nibbles", nibbles_swapped), ("scale", scales_doubled), ("group", groups_swapped),
                       ("levels", levels_off_by_one)):
        path, good = sabotaged(f"sabotage-{name}.q4.bin", edit)
        eng = read_logits(engine_logits(path, LONG), VOCAB)
        kl, top1, rel = quality(eng, file_reference_logits(good, LONG))
        print(f"     planted {name} mistake: mean KL {kl:.4f}, top-1 {top1:.3f} against the correct file")
        assert kl > 5 * MAX_KL_VS_FILE, f"{name} mistake not caught: {kl}, {top1}"


def test_q4_generation_end_to_end_and_header_rules():
    m = converted(checkpoint(), "q4")
    p = phi2(m, "-p", "def fibonacci(n):\n    ", "-n", "20", "--temp", "0", "--print-ids", "--ignore-eos")
    ids = [int(i) for i in p.out.strip().split(",")]
    assert len(ids) == 20 and all(0 <= i < 50295 for i in ids), p.out
    assert "q4" in p.err.strip().splitlines()[-1], p.err   # the timings line names the kernels
    from test_cli import fnv1a64
    data = open(m, "rb").read()
    bad = os.path.join(WORK, "bad.q4.bin")
    for field, value, message in ((48, 64, "group size"), (12, 3, "unknown weight type")):
        hdr = bytearray(data[:256])
        hdr[field:field + 4] = struct.pack("<I", value)
        hdr[248:256] = struct.pack("<Q", fnv1a64(bytes(hdr[:248])))
        with open(bad, "wb") as f:
            f.write(bytes(hdr) + data[256:])
        p = phi2(bad, "-p", "hi", check=False)
        assert p.returncode == 1 and message in p.err and len(p.err.strip().splitlines()) == 1, p.err
