"""The KV cache in float16 (--kv-type f16): the conversion checked end to end through --trace,
closeness of the logits to the float32 cache, the defaults per file type, the flag's errors.

The logits barely move: on the tiny f32 model (130 positions) f16 keys and values give mean
KL 3.5e-7, top-1 agreement 1.0, max|diff|/max|logit| 1.6e-4 against the f32 cache, four
orders of magnitude below what int8 weights do (test_q8: KL ~3e-3). Such a loose check
would also pass a sloppy conversion (truncating instead of rounding moves the logits little
more), so the conversion is checked where it acts: --trace records q, k and v (after
rotary) and each layer's attention output, and numpy recomputes that attention in float64
from q and from k and v rounded by numpy's own float16 (IEEE, to nearest even). The engine
agrees with it to 6e-7 (float32 arithmetic), while the same recomputation without the
rounding is 1e-3 away, and an engine with a truncating conversion planted 2.4e-3, with a
bf16-precision one 1.4e-2 (tiny model, 48 positions).

q8 files: their activations are quantized to int8 on the way into every matrix product, so
any small change of attention output (f16 or not) flips some roundings there; q8 with an f16
cache vs q8 with an f32 cache therefore differs by KL ~1.3e-3, as much as the flips make,
and is as close to the f32 file's logits as q8 with an f32 cache is (checked below).
"""
import json
import os

import numpy as np

import test_trace
from common import checkpoint, converted, engine_logits, phi2, read_logits
from test_q8 import LONG, VOCAB, quality

compare_trace = test_trace.compare_trace

# f32 file, f16 cache vs f32 cache (measured: KL 3.5e-7, top-1 1.0, rel 1.6e-4; seeds 1, 2)
MAX_MEAN_KL = 2e-6
MIN_TOP1 = 0.99
MAX_REL_DIFF = 8e-4
# attention output against numpy's float16 recomputation (measured 6e-7; misses >= 1e-3)
ATTN_TOL = 5e-6
TRACE_IDS = LONG[:48]


def attention_from_trace(path, cfg, round_kv):
    """{layer: [positions, hidden] attention output} recomputed in float64 from the trace's
    q, k and v, with k and v first passed through round_kv; and the engine's own."""
    rec = compare_trace.read_trace(path)
    H, n_heads, L = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_hidden_layers"]
    hd, P = H // n_heads, len(TRACE_IDS)
    mask = np.triu(np.full((P, P), -np.inf), k=1)
    out = {}
    for l in range(L):
        q, k, v, eng = (np.stack([rec[(f"L{l}.{step}", p)] for p in range(P)]).astype(np.float64)
                        for step in ("q", "k", "v", "attn"))
        k, v = round_kv(k), round_kv(v)
        att = np.empty((P, H))
        for h in range(n_heads):
            s = slice(h * hd, (h + 1) * hd)
            scores = q[:, s] @ k[:, s].T / np.sqrt(hd) + mask
            w = np.exp(scores - scores.max(axis=1, keepdims=True))
            att[:, s] = (w / w.sum(axis=1, keepdims=True)) @ v[:, s]
        out[l] = (att, eng)
    return out


def attention_error(path, cfg, round_kv):
    """max over layers and positions of max|engine - recomputed| / max|recomputed|."""
    worst = 0.0
    for att, eng in attention_from_trace(path, cfg, round_kv).values():
        rel = np.abs(eng - att).max(axis=1) / np.abs(att).max(axis=1)
        worst = max(worst, float(rel.max()))
    return worst


def as_f16(x):
    return x.astype(np.float32).astype(np.float16).astype(np.float64)


def as_f32(x):
    return x


def trace_of(model, name, *flags, binary=None):
    saved = test_trace.IDS
    test_trace.IDS = TRACE_IDS  # engine_trace writes the prompt test_trace.IDS
    try:
        return test_trace.engine_trace(model, name, *flags, binary=binary)
    finally:
        test_trace.IDS = saved


# Conversions that must not pass, planted in the engine's f16_from_f32 (and the cache made
# to use it rather than the F16C / NEON kernels, which are checked against it bit for bit by
# test_kernels): truncating the 13 dropped mantissa bits, or keeping only bf16's 7 bits.
STORE_SCALAR = ("if (s->kv_type == KV_F16) f32_to_f16_row((uint16_t *)cache + slot, x, n);",
                "if (s->kv_type == KV_F16) f32_to_f16_row_scalar((uint16_t *)cache + slot, x, n);", 1)
ROUNDING = "return sign | (uint16_t)((r + 0xfff + (r >> 13 & 1)) >> 13);"
PLANTED = [
    ("kv_truncate", "return sign | (uint16_t)(r >> 13);"),
    ("kv_bf16_precision", "return sign | (uint16_t)((r + 0xffff + (r >> 16 & 1)) >> 16 << 3);"),
]


def test_f16_conversion_through_trace():
    ckpt = checkpoint()
    cfg = json.load(open(os.path.join(ckpt, "config.json")))
    model = converted(ckpt)
    f16 = trace_of(model, "kv-f16", "--kv-type", "f16")
    f32 = trace_of(model, "kv-f32")
    e16, e16_unrounded = attention_error(f16, cfg, as_f16), attention_error(f16, cfg, as_f32)
    e32, e32_rounded = attention_error(f32, cfg, as_f32), attention_error(f32, cfg, as_f16)
    print(f"     f16 cache: {e16:.2g} from numpy's float16 attention ({e16_unrounded:.2g} from unrounded); "
          f"f32 cache: {e32:.2g} from unrounded ({e32_rounded:.2g} from float16)")
    assert e16 <= ATTN_TOL and e32 <= ATTN_TOL, (e16, e32)
    # the check sees the rounding at all: an f32 cache passing as f16 (or the reverse) fails
    assert e16_unrounded > 10 * ATTN_TOL and e32_rounded > 10 * ATTN_TOL, (e16_unrounded, e32_rounded)
    for name, rounding in PLANTED:
        binary = test_trace.build_broken_engine(name, ROUNDING, rounding, 1, more=[STORE_SCALAR])
        err = attention_error(trace_of(model, name, "--kv-type", "f16", binary=binary), cfg, as_f16)
        print(f"     planted {name}: {err:.2g} from numpy's float16 attention")
        assert err > 10 * ATTN_TOL, f"planted {name} not caught: {err}"


def test_f16_cache_logits_close_to_f32():
    for seed in (1, 2):
        model = converted(checkpoint(seed=seed))
        ref = read_logits(engine_logits(model, LONG), VOCAB)
        kl, top1, rel = quality(read_logits(engine_logits(model, LONG, "--kv-type", "f16"), VOCAB), ref)
        print(f"     seed {seed}: f16 cache vs f32: mean KL {kl:.2g}, top-1 {top1:.3f}, rel max diff {rel:.2g}")
        assert kl <= MAX_MEAN_KL and top1 >= MIN_TOP1 and rel <= MAX_REL_DIFF, (kl, top1, rel)


def test_q8_with_f16_cache_as_close_to_f32_file():
    ckpt = checkpoint()
    ref = read_logits(engine_logits(converted(ckpt), LONG), VOCAB)
    q8 = converted(ckpt, "q8")
    kl16, top16, _ = quality(read_logits(engine_logits(q8, LONG), VOCAB), ref)  # default: f16
    kl32, top32, _ = quality(read_logits(engine_logits(q8, LONG, "--kv-type", "f32"), VOCAB), ref)
    print(f"     q8 against the f32 file: f16 cache KL {kl16:.5f} top-1 {top16:.3f}, "
          f"f32 cache KL {kl32:.5f} top-1 {top32:.3f}")
    assert kl16 <= 1.2 * kl32 and top16 >= top32 - 0.03, (kl16, kl32, top16, top32)


def kv_line(model, *flags):
    """The timings line's KV cache part, e.g. 'KV cache f16, 2.0 MB'. The cache holds the
    positions the run can reach: 999 of the prompt + 1 (-n) = 1000."""
    ids = ",".join(str(1000 + i * 7919 % 40000) for i in range(999))
    p = phi2(model, "--ids", ids, "-n", "1", "--temp", "0", "--print-ids", *flags)
    parts = [x for x in p.err.strip().splitlines()[-1].split(" | ") if x.startswith("KV cache ")]
    assert len(parts) == 1, p.err
    return parts[0]


def test_defaults_and_memory():
    ckpt = checkpoint()
    cfg = json.load(open(os.path.join(ckpt, "config.json")))
    f32, q8 = converted(ckpt), converted(ckpt, "q8")
    n = 2 * cfg["num_hidden_layers"] * 1000 * cfg["hidden_size"]  # keys and values of 1000 positions
    assert kv_line(f32) == f"KV cache f32, {n * 4 / 1e6:.1f} MB"
    assert kv_line(q8) == f"KV cache f16, {n * 2 / 1e6:.1f} MB"
    assert kv_line(f32, "--kv-type", "f16") == f"KV cache f16, {n * 2 / 1e6:.1f} MB"
    assert kv_line(q8, "--kv-type", "f32") == f"KV cache f32, {n * 4 / 1e6:.1f} MB"
    # the default for f32 files is the exact cache: the same logits as --kv-type f32, bit for bit
    ids = LONG[:20]
    with open(engine_logits(f32, ids), "rb") as a, open(engine_logits(f32, ids, "--kv-type", "f32"), "rb") as b:
        assert a.read() == b.read()
    with open(engine_logits(q8, ids), "rb") as a, open(engine_logits(q8, ids, "--kv-type", "f16"), "rb") as b:
        assert a.read() == b.read()


def test_bad_kv_type():
    from test_cli import expect_error, tiny_model
    for bad in ("bad", "F16", "f8", "bf16", ""):
        line = expect_error(tiny_model(), "--kv-type", bad, "--ids", "1")
        assert "--kv-type" in line and "f32 or f16" in line, line
    expect_error(tiny_model(), "--kv-type")
