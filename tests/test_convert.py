"""scripts/convert.py (the model file of docs/FORMAT.md, parsed independently here),
scripts/synth.py variants and scripts/reference.py sanity. Does not use ./phi2.
"""
import concurrent.futures
import json
import math
import os
import shutil
import signal
import struct
import subprocess
import sys

import numpy as np

from common import PY, SCRIPTS, WORK, checkpoint, converted, read_logits, reference_logits, run, script

SAME_FOR_EVERY_BUILD = True  # convert.py and reference.py only: no engine (run.py --engine-only)

sys.path.insert(0, SCRIPTS)
import reference  # noqa: E402  (the float64 oracle's safetensors reader; independent of convert.py)

VOCAB = 51200
HEADER_FMT = "<8sIIIIIIIIIIIffIIIQQQQQQQQ"   # bytes 0..135 of the header, FORMAT.md order
HEADER_FIELDS = ["magic", "version", "weight_type", "vocab_size", "hidden_dim", "ffn_dim", "n_layers",
                 "n_heads", "head_dim", "rot_dim", "max_seq_len", "group_size", "rope_theta", "norm_eps",
                 "bos_id", "eos_id", "reserved", "tokenizer_offset", "tokenizer_size", "weights_offset",
                 "weights_size", "file_size", "tokenizer_checksum", "weights_sum", "weights_sum2"]


# ---------------------------------------------------------------- independent model-file reader

def fnv1a64(data):
    h = 0xcbf29ce484222325
    for b in data:
        h = ((h ^ b) * 0x100000001b3) % (1 << 64)
    return h


def weight_sums_py(data):
    """weights_sum and weights_sum2 of FORMAT.md, word by word in plain Python (the
    definition; slow, for small inputs)."""
    s = s2 = 0
    for i in range(len(data) // 8):
        w = int.from_bytes(data[8 * i:8 * i + 8], "little")
        s += w
        s2 += (i + 1) * w
    return s % (1 << 64), s2 % (1 << 64)


def weight_sums(data):
    """The same, fast, computed differently from convert.py: the plain sum from the words'
    32-bit halves summed exactly, the weighted one as the sum of the suffix sums
    (sum_i (i+1) w_i = sum_j sum_{i>=j} w_i), in wrapping uint64."""
    w = np.frombuffer(data, dtype="<u8")
    lo, hi = (w & np.uint64(0xFFFFFFFF)), (w >> np.uint64(32))
    assert len(w) < 1 << 31          # so the halves' sums cannot wrap
    s = (int(lo.sum(dtype=np.uint64)) + (int(hi.sum(dtype=np.uint64)) << 32)) % (1 << 64)
    s2 = int(np.cumsum(w[::-1], dtype=np.uint64).sum(dtype=np.uint64))
    return s, s2


def read_header(buf):
    h = dict(zip(HEADER_FIELDS, struct.unpack_from(HEADER_FMT, buf, 0)))
    h["header_checksum"] = struct.unpack_from("<Q", buf, 248)[0]
    return h


def read_tokenizer(buf, off, size):
    end = off + size
    n_tokens, n_merges = struct.unpack_from("<II", buf, off)
    p = off + 8
    tokens = []
    for _ in range(n_tokens):
        kind, n = struct.unpack_from("<BI", buf, p)
        p += 5
        tokens.append((kind, bytes(buf[p:p + n])))
        p += n
    merges = np.frombuffer(buf, dtype="<u4", count=3 * n_merges, offset=p).reshape(n_merges, 3)
    p += 12 * n_merges
    assert p == end, f"tokenizer section: parsed {p - off} bytes, header says {size}"
    return tokens, merges


def read_model(path):
    """(header dict, tokens, merges, {tensor label: array or (q, d)}) of a model file."""
    with open(path, "rb") as f:
        buf = f.read()
    h = read_header(buf)
    tokens, merges = read_tokenizer(buf, h["tokenizer_offset"], h["tokenizer_size"])
    V, H, F, L = h["vocab_size"], h["hidden_dim"], h["ffn_dim"], h["n_layers"]
    q8 = h["weight_type"] == 1
    G = h["group_size"]
    pos = h["weights_offset"]
    tensors = {}

    def take(nbytes):
        nonlocal pos
        assert pos % 64 == 0
        start = pos
        pos = (pos + nbytes + 63) // 64 * 64
        assert start + nbytes <= len(buf), "tensor past the end of the file"
        return start

    def vec(label, n):
        tensors[label] = np.frombuffer(buf, dtype="<f4", count=n, offset=take(4 * n))

    def mat(label, r, c):
        if q8:
            q = np.frombuffer(buf, dtype=np.int8, count=r * c, offset=take(r * c)).reshape(r, c)
            d = np.frombuffer(buf, dtype="<f4", count=r * c // G, offset=take(4 * r * c // G)).reshape(r, c // G)
            tensors[label] = (q, d)
        else:
            tensors[label] = np.frombuffer(buf, dtype="<f4", count=r * c, offset=take(4 * r * c)).reshape(r, c)

    mat("embed", V, H)
    for i in range(L):
        vec(f"{i}.ln_weight", H)
        vec(f"{i}.ln_bias", H)
        mat(f"{i}.qkv_weight", 3 * H, H)
        vec(f"{i}.qkv_bias", 3 * H)
        mat(f"{i}.dense_weight", H, H)
        vec(f"{i}.dense_bias", H)
        mat(f"{i}.fc1_weight", F, H)
        vec(f"{i}.fc1_bias", F)
        mat(f"{i}.fc2_weight", H, F)
        vec(f"{i}.fc2_bias", H)
    vec("final_ln_weight", H)
    vec("final_ln_bias", H)
    mat("lm_head_weight", V, H)
    vec("lm_head_bias", V)
    h["_layout_end"] = pos
    return h, tokens, merges, tensors


def hf_tensors(ckpt):
    """{name: float64 array} of every tensor of a checkpoint, via reference.py's reader."""
    return reference.load_checkpoint(ckpt)[1]


def dequant(qd):
    q, d = qd
    G = q.shape[1] // d.shape[1]
    return q.astype(np.float32) * np.repeat(d, G, axis=1)


# ---------------------------------------------------------------- the file itself

def test_header_layout_and_checksums():
    ckpt = checkpoint()
    out = converted(ckpt)
    with open(os.path.join(ckpt, "config.json")) as f:
        cfg = json.load(f)
    size = os.path.getsize(out)
    h, tokens, merges, _ = read_model(out)
    with open(out, "rb") as f:
        buf = f.read()
    assert h["magic"] == b"PHI2CBIN" and h["version"] == 2 and h["weight_type"] == 0
    assert h["vocab_size"] == cfg["vocab_size"] == VOCAB
    assert h["hidden_dim"] == cfg["hidden_size"] == 128
    assert h["ffn_dim"] == cfg["intermediate_size"] and h["n_layers"] == cfg["num_hidden_layers"]
    assert h["n_heads"] == cfg["num_attention_heads"] and h["head_dim"] == 128 // cfg["num_attention_heads"]
    assert h["rot_dim"] == int(cfg["partial_rotary_factor"] * h["head_dim"]) == 12
    assert h["max_seq_len"] == cfg["max_position_embeddings"] == 2048
    assert h["group_size"] == 0
    assert h["rope_theta"] == 10000.0 and h["norm_eps"] == np.float32(1e-5)
    assert h["bos_id"] == h["eos_id"] == 50256 and h["reserved"] == 0
    assert h["tokenizer_offset"] == 256
    assert h["weights_offset"] % 64 == 0
    assert h["tokenizer_offset"] + h["tokenizer_size"] <= h["weights_offset"] < h["tokenizer_offset"] + h["tokenizer_size"] + 64
    assert h["file_size"] == size == h["weights_offset"] + h["weights_size"]
    assert h["_layout_end"] == size, (h["_layout_end"], size)
    assert buf[136:248] == bytes(112), "reserved header bytes must be zero"
    assert (h["weights_sum"], h["weights_sum2"]) == weight_sums(buf[h["weights_offset"]:])
    assert h["header_checksum"] == fnv1a64(buf[:248])
    tok = buf[h["tokenizer_offset"]:h["tokenizer_offset"] + h["tokenizer_size"]]
    assert h["tokenizer_checksum"] == fnv1a64(tok)
    # padding between the sections is zero
    assert buf[256 + h["tokenizer_size"]:h["weights_offset"]] == bytes(h["weights_offset"] - 256 - h["tokenizer_size"])
    # expected total: every tensor padded to 64 bytes
    H, F, L = 128, 512, 4
    vec = lambda n: (4 * n + 63) // 64 * 64  # noqa: E731
    per_layer = 2 * vec(H) + vec(3 * H * H) + vec(3 * H) + vec(H * H) + vec(H) + vec(F * H) + vec(F) + vec(H * F) + vec(H)
    assert h["weights_size"] == 2 * vec(VOCAB * H) + L * per_layer + 2 * vec(H) + vec(VOCAB)


def test_weight_sums_definition_and_planted_mistakes():
    """The test's own fast sums agree with the plain definition; the header's sums match the
    weights of an f32 and a q8 file; one flipped byte anywhere changes weights_sum, and two
    swapped words (same plain sum) change weights_sum2."""
    rng = np.random.default_rng(5)
    for n in (1, 2, 3, 1000):
        data = rng.integers(0, 256, 8 * n, dtype=np.uint8).tobytes()
        assert weight_sums(data) == weight_sums_py(data)
    data = b"\xff" * 8 * 3             # wraps: 3 * (2^64 - 1) and 6 * (2^64 - 1) mod 2^64
    assert weight_sums(data) == weight_sums_py(data) == ((1 << 64) - 3, (1 << 64) - 6)
    assert weight_sums_py(struct.pack("<QQ", 5, 7)) == (12, 5 + 2 * 7)

    # odd sizes: q, k and v rows of 99 x 99 floats (39204 bytes) and a bias of 51201 floats
    # end inside a u64 word, so the converter carries bytes from one write to the next
    odd = checkpoint(extra=("--set", "hidden_size=99", "--set", "num_attention_heads=3",
                            "--set", "num_key_value_heads=3", "--set", "partial_rotary_factor=0.5",
                            "--set", "intermediate_size=397", "--set", "vocab_size=51201"))
    for ckpt, dtype in ((odd, "f32"), (checkpoint(), "f32"), (checkpoint(), "q8")):
        buf = bytearray(open(converted(ckpt, dtype), "rb").read())
        h = read_header(buf)
        w_off, w_size = h["weights_offset"], h["weights_size"]
        want = (h["weights_sum"], h["weights_sum2"])
        assert weight_sums(buf[w_off:]) == want, dtype
        assert want[0] != 0 and want[1] != 0
        for pos in (w_off, w_off + 12345, w_off + w_size // 2 + 3, len(buf) - 1):
            for bit in (0, 7):
                buf[pos] ^= 1 << bit
                # (weights_sum2 alone would miss bit 63 of a word at an odd index: 2 * 2^63)
                assert weight_sums(buf[w_off:])[0] != want[0], f"{dtype}: flip at {pos} not detected"
                buf[pos] ^= 1 << bit
        # swap two different words: the plain sum cannot see it, the weighted one does
        a, b = w_off + 64 * 10, w_off + w_size - 64 * 7
        assert buf[a:a + 8] != buf[b:b + 8]
        buf[a:a + 8], buf[b:b + 8] = buf[b:b + 8], buf[a:a + 8]
        got = weight_sums(buf[w_off:])
        assert got[0] == want[0] and got[1] != want[1], f"{dtype}: swap not detected"


def test_tokenizer_section_round_trip():
    h, tokens, merges, _ = read_model(converted(checkpoint()))
    assert len(tokens) == 50295 and len(merges) == 50000
    assert tokens[15496] == (1, b"Hello")
    assert tokens[50285] == (2, b"   ")
    assert tokens[50256] == (2, b"<|endoftext|>")
    assert tokens[50257] == (2, b" " * 31) and tokens[50294] == (2, b"\t\t")
    assert tokens[220] == (1, b" ") and tokens[83] == (1, b"t")
    assert all(k == 1 for k, _ in tokens[:50256]) and all(k == 2 for k, _ in tokens[50256:])
    singles = {b for k, b in tokens if len(b) == 1}
    assert singles == {bytes([i]) for i in range(256)}, "every byte must be a token"
    assert tokens[188] == (1, b"\x00")          # 'Ā' in GPT-2's byte-to-unicode map
    assert tokens[256] == (1, b" t")
    assert tuple(merges[0]) == (220, 83, 256)   # "Ġ t" -> "Ġt"
    for left, right, merged in merges[:2000]:
        assert tokens[left][1] + tokens[right][1] == tokens[merged][1]
    with open(os.path.join(checkpoint(), "tokenizer.json"), encoding="utf-8") as f:
        vocab = json.load(f)["model"]["vocab"]
    assert vocab["Ġt"] == 256 and len(vocab) == 50257


def test_merges_pair_style_gives_identical_file():
    a = converted(checkpoint())
    pair = checkpoint(extra=("--merges", "pair"))
    b = converted(pair)
    with open(os.path.join(pair, "tokenizer.json"), encoding="utf-8") as f:
        assert isinstance(json.load(f)["model"]["merges"][0], list)
    assert open(a, "rb").read() == open(b, "rb").read()


def test_weights_match_checkpoint():
    ckpt = checkpoint(dtype="F32")
    _, _, _, w = read_model(converted(ckpt))
    t = hf_tensors(ckpt)
    f32 = lambda a: a.astype(np.float32)  # noqa: E731
    assert np.array_equal(w["embed"], f32(t["model.embed_tokens.weight"]))
    for i in range(4):
        p = f"model.layers.{i}."
        qkv = np.concatenate([t[p + f"self_attn.{x}_proj.weight"] for x in "qkv"])
        assert np.array_equal(w[f"{i}.qkv_weight"], f32(qkv))
        assert np.array_equal(w[f"{i}.qkv_bias"], f32(np.concatenate([t[p + f"self_attn.{x}_proj.bias"] for x in "qkv"])))
        assert np.array_equal(w[f"{i}.ln_weight"], f32(t[p + "input_layernorm.weight"]))
        assert np.array_equal(w[f"{i}.ln_bias"], f32(t[p + "input_layernorm.bias"]))
        assert np.array_equal(w[f"{i}.dense_weight"], f32(t[p + "self_attn.dense.weight"]))
        assert np.array_equal(w[f"{i}.dense_bias"], f32(t[p + "self_attn.dense.bias"]))
        assert np.array_equal(w[f"{i}.fc1_weight"], f32(t[p + "mlp.fc1.weight"]))
        assert np.array_equal(w[f"{i}.fc1_bias"], f32(t[p + "mlp.fc1.bias"]))
        assert np.array_equal(w[f"{i}.fc2_weight"], f32(t[p + "mlp.fc2.weight"]))
        assert np.array_equal(w[f"{i}.fc2_bias"], f32(t[p + "mlp.fc2.bias"]))
    assert np.array_equal(w["final_ln_weight"], f32(t["model.final_layernorm.weight"]))
    assert np.array_equal(w["final_ln_bias"], f32(t["model.final_layernorm.bias"]))
    assert np.array_equal(w["lm_head_weight"], f32(t["lm_head.weight"]))
    assert np.array_equal(w["lm_head_bias"], f32(t["lm_head.bias"]))


def test_naming_shards_dtypes_consistent():
    """msft names (+ ignored inv_freq) and 3 shards give the very same file; F16 / BF16 are
    exactly the float16 / bfloat16 roundings of the F32 checkpoint's weights."""
    base = converted(checkpoint(dtype="F32"))
    data = open(base, "rb").read()
    for kw in (dict(naming="msft"), dict(shards=3), dict(naming="msft", shards=3)):
        ckpt = checkpoint(dtype="F32", **kw)
        if kw.get("naming") == "msft":
            assert "transformer.h.0.mixer.rotary_emb.inv_freq" in hf_tensors(ckpt)
        assert open(converted(ckpt), "rb").read() == data, f"{kw}: file differs"
    _, _, _, w32 = read_model(base)
    for dtype in ("F16", "BF16"):
        h, _, _, w = read_model(converted(checkpoint(dtype=dtype)))
        for label, a in w32.items():
            if dtype == "F16":
                want = a.astype(np.float16).astype(np.float32)
            else:
                u = a.view(np.uint32).astype(np.uint64)
                want = (((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16).astype(np.uint32).view(np.float32)
            assert np.array_equal(w[label], want), f"{dtype}: {label}"


def test_single_model_safetensors_without_index():
    src = checkpoint(dtype="F32")
    d = os.path.join(WORK, "single-file-ckpt")
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    for fn in os.listdir(src):
        if fn == "model.safetensors.index.json":
            continue
        dst = "model.safetensors" if fn.endswith(".safetensors") else fn
        os.link(os.path.join(src, fn), os.path.join(d, dst))
    out = os.path.join(d, "out.bin")
    script("convert.py", d, out)
    assert open(out, "rb").read() == open(converted(src), "rb").read()


def test_q8_quantization():
    ckpt = checkpoint()
    h, _, _, wq = read_model(converted(ckpt, "q8"))
    _, _, _, w = read_model(converted(ckpt))
    assert h["weight_type"] == 1 and h["group_size"] == 64
    assert h["file_size"] == os.path.getsize(converted(ckpt, "q8")) == h["_layout_end"]
    for label, a in w.items():
        if a.ndim == 1:
            assert np.array_equal(wq[label], a), f"{label}: vectors stay f32"
            continue
        q, d = wq[label]
        g = a.reshape(a.shape[0], -1, 64)
        amax = np.abs(g).max(axis=-1)
        assert np.array_equal(d, (amax / np.float32(127)).astype(np.float32)), f"{label}: scales"
        assert np.abs(q).max() <= 127
        err = np.abs(dequant(wq[label]) - a).reshape(g.shape)
        assert np.all(err <= d[..., None] * (0.5 + 1e-5)), f"{label}: |w - d*q| > d/2"
    # exact re-quantization of one group, by the FORMAT.md formula
    a = w["3.fc2_weight"][17, 128:192]
    d = np.float32(np.abs(a).max() / np.float32(127))
    want = np.clip(np.rint(a / d), -127, 127).astype(np.int8)
    q, dd = wq["3.fc2_weight"]
    assert dd[17, 2] == d and np.array_equal(q[17, 128:192], want)
    assert 127 in np.abs(q[17, 128:192])


def test_q8_zero_group():
    """A group of zeros: d = 0 and q = 0 (no division by zero)."""
    src = checkpoint(dtype="F32")
    d = broken_copy("zero-group", src)
    edit_shard(d, lambda hdr, data: zero_bytes(hdr, data, "model.layers.0.mlp.fc1.weight", 0, 64 * 4))
    out = os.path.join(d, "out.bin")
    script("convert.py", d, out, "--dtype", "q8")
    _, _, _, w = read_model(out)
    q, dd = w["0.fc1_weight"]
    assert dd[0, 0] == 0 and not q[0, :64].any() and dd[0, 1] > 0


def test_phi15_ratios_and_q8_needs_multiple_of_64():
    extra = ("--set", "hidden_size=96", "--set", "partial_rotary_factor=0.5", "--set", "intermediate_size=384")
    ckpt = checkpoint(extra=extra)
    h, _, _, _ = read_model(converted(ckpt))
    assert (h["hidden_dim"], h["head_dim"], h["rot_dim"], h["ffn_dim"]) == (96, 24, 12, 384)
    expect_error(ckpt, "hidden_size", "--dtype", "q8")


# ---------------------------------------------------------------- error paths

def broken_copy(name, src=None):
    """A fresh copy of a checkpoint folder (files hard-linked: replace, never modify in place)."""
    src = src or checkpoint()
    d = os.path.join(WORK, "broken", name)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    for fn in os.listdir(src):
        os.link(os.path.join(src, fn), os.path.join(d, fn))
    return d


def replace_file(path, data):
    os.unlink(path)
    with open(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)


def edit_json(path, fn):
    with open(path, encoding="utf-8") as f:
        obj = json.load(f)
    fn(obj)
    replace_file(path, json.dumps(obj))


def shard_path(d):
    return os.path.join(d, "model-00001-of-00001.safetensors")


def edit_shard(d, fn):
    """Rewrite the single shard with fn(header dict, data bytearray) applied."""
    path = shard_path(d)
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    hdr = json.loads(raw[8:8 + n])
    data = bytearray(raw[8 + n:])
    fn(hdr, data)
    hb = json.dumps(hdr).encode()
    hb += b" " * (-len(hb) % 8)
    replace_file(path, struct.pack("<Q", len(hb)) + hb + bytes(data))


def zero_bytes(hdr, data, name, start, n):
    b = hdr[name]["data_offsets"][0] + start
    data[b:b + n] = bytes(n)


def expect_error(ckpt, what, *flags):
    """convert.py fails: exit 1, one stderr line 'error: ...' mentioning `what` (the last;
    any before it are the progress lines of tensors already written), and the output folder
    stays empty (no output, no temporary)."""
    out_dir = os.path.join(WORK, "err-out", os.path.basename(ckpt))     # one per case
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    p = run([PY, os.path.join(SCRIPTS, "convert.py"), ckpt, os.path.join(out_dir, "m.bin"), *flags], check=False)
    lines = p.err.strip().splitlines()
    assert p.returncode == 1, f"exit {p.returncode}: {p.err[-500:]}"
    assert lines and lines[-1].startswith("error: "), f"stderr: {p.err[-800:]!r}"
    assert all(ln.startswith(("convert: ", "  ")) for ln in lines[:-1]), f"stderr: {p.err[-800:]!r}"
    assert "Traceback" not in p.err
    assert what in lines[-1], f"{what!r} not in {lines[-1]!r}"
    assert os.listdir(out_dir) == [], f"left behind: {os.listdir(out_dir)}"
    return lines[-1]


def expect_errors(cases):
    """expect_error(*case) for each case, two at a time (each is mostly Python start-up)."""
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda case: expect_error(*case), cases))


def test_error_missing_folder_and_config():
    expect_error(os.path.join(WORK, "no-such-ckpt"), "no-such-ckpt")
    d = broken_copy("no-config")
    os.unlink(os.path.join(d, "config.json"))
    expect_error(d, "config.json")
    d = broken_copy("bad-config")
    replace_file(os.path.join(d, "config.json"), "{ not json")
    expect_error(d, "config.json")


def test_error_shards():
    d = broken_copy("missing-shard", checkpoint(shards=3))
    os.unlink(os.path.join(d, "model-00002-of-00003.safetensors"))
    expect_error(d, "model-00002-of-00003.safetensors")
    d = broken_copy("truncated-shard")
    raw = open(shard_path(d), "rb").read()
    replace_file(shard_path(d), raw[:-100])
    expect_error(d, "truncated")
    d = broken_copy("tiny-shard")
    replace_file(shard_path(d), b"\x10\x00")
    expect_error(d, "model-00001-of-00001.safetensors")
    d = broken_copy("bad-header-json")
    replace_file(shard_path(d), struct.pack("<Q", 16) + b"{not json}      " + raw[-64:])
    expect_error(d, "malformed safetensors header")
    d = broken_copy("bad-header-len")
    replace_file(shard_path(d), struct.pack("<Q", 1 << 40) + raw[8:])
    expect_error(d, "malformed safetensors header")
    d = broken_copy("bad-offsets")
    edit_shard(d, lambda hdr, data: hdr["model.layers.0.mlp.fc1.bias"].update(data_offsets=[0, 10]))
    expect_error(d, "model.layers.0.mlp.fc1.bias")
    d = broken_copy("not-in-shard")
    edit_json(os.path.join(d, "model.safetensors.index.json"),
              lambda ix: ix["weight_map"].update({"model.extra.weight": "model-00001-of-00001.safetensors"}))
    expect_error(d, "model.extra.weight")
    d = broken_copy("no-weights")
    os.unlink(os.path.join(d, "model.safetensors.index.json"))
    expect_error(d, "model.safetensors")


def remove_tensor(hdr, data, name):
    """Drop a tensor and its bytes from a shard, moving the later tensors down."""
    a, b = hdr.pop(name)["data_offsets"]
    del data[a:b]
    for k, v in hdr.items():
        if k != "__metadata__" and v["data_offsets"][0] >= b:
            v["data_offsets"] = [v["data_offsets"][0] - (b - a), v["data_offsets"][1] - (b - a)]


def test_error_tensors():
    def drop(name):
        def fn(ckpt_dir):
            edit_shard(ckpt_dir, lambda hdr, data: remove_tensor(hdr, data, name))
            edit_json(os.path.join(ckpt_dir, "model.safetensors.index.json"), lambda ix: ix["weight_map"].pop(name))
        return fn
    d = broken_copy("missing-tensor")
    drop("model.layers.2.mlp.fc2.bias")(d)
    expect_error(d, "model.layers.2.mlp.fc2.bias")
    d = broken_copy("missing-tensor-msft", checkpoint(naming="msft"))
    drop("transformer.h.1.mixer.Wqkv.weight")(d)
    expect_error(d, "transformer.h.1.mixer.Wqkv.weight")
    d = broken_copy("wrong-shape")
    edit_shard(d, lambda hdr, data: hdr["model.layers.1.mlp.fc1.weight"].update(shape=[128, 512]))
    msg = expect_error(d, "model.layers.1.mlp.fc1.weight")
    assert "shape" in msg
    d = broken_copy("bad-dtype")
    edit_shard(d, lambda hdr, data: hdr["model.layers.3.self_attn.k_proj.weight"].update(dtype="I16"))
    msg = expect_error(d, "model.layers.3.self_attn.k_proj.weight")
    assert "I16" in msg
    d = broken_copy("no-lm-head-tied")
    drop("lm_head.weight")(d)
    edit_json(os.path.join(d, "config.json"), lambda c: c.update(tie_word_embeddings=True))
    expect_error(d, "tie_word_embeddings")


def test_error_unsupported_configs():
    for key, value, what in (("qk_layernorm", True, "qk_layernorm"),
                             ("num_key_value_heads", 2, "num_key_value_heads"),
                             ("hidden_act", "gelu", "hidden_act"),
                             ("model_type", "llama", "model_type"),
                             ("partial_rotary_factor", 0.3, "partial_rotary_factor"),   # 9 dims: odd
                             ("partial_rotary_factor", 1.5, "partial_rotary_factor"),   # > head_dim
                             ("vocab_size", None, "vocab_size"),
                             ("hidden_size", "128", "hidden_size")):
        d = broken_copy(f"cfg-{key}")
        edit_json(os.path.join(d, "config.json"),
                  lambda c: c.pop(key) if value is None else c.update({key: value}))
        expect_error(d, what)
    # a config synth.py itself writes that way (weights shaped as usual)
    expect_error(checkpoint(extra=("--set", "qk_layernorm=true")), "qk_layernorm")


def test_error_tokenizer():
    d = broken_copy("no-tokenizer")
    os.unlink(os.path.join(d, "tokenizer.json"))
    expect_error(d, "tokenizer.json")
    d = broken_copy("bad-tokenizer")
    replace_file(os.path.join(d, "tokenizer.json"), '{"model": 3}')
    expect_error(d, "tokenizer.json")
    d = broken_copy("tok-lstrip")
    edit_json(os.path.join(d, "tokenizer.json"), lambda t: t["added_tokens"][3].update(lstrip=True))
    expect_error(d, "lstrip")
    d = broken_copy("tok-merge")
    edit_json(os.path.join(d, "tokenizer.json"), lambda t: t["model"]["merges"].__setitem__(5, "Ġ zzzqqq"))
    expect_error(d, "merge 5")
    d = broken_copy("tok-char")
    edit_json(os.path.join(d, "tokenizer.json"), lambda t: t["model"]["vocab"].update({"a b": 50300}))
    expect_error(d, "'a b'")
    # 50295 token ids do not fit a 50280-row embedding
    expect_error(checkpoint(extra=("--set", "vocab_size=50280")), "vocab_size")


def test_error_config_values():
    """Each config.json value out of range: one line naming the key, before any weights are
    read. The limits are the engine's (FORMAT.md); a value at a limit still converts."""
    cases = (("hidden_size", 130, "num_attention_heads"),          # 130 / 4 heads
             ("hidden_size", 0, "hidden_size"),
             ("intermediate_size", -512, "intermediate_size"),
             ("num_hidden_layers", 2.5, "num_hidden_layers"),
             ("num_attention_heads", True, "num_attention_heads"),
             ("max_position_embeddings", "2048", "max_position_embeddings"),
             ("vocab_size", (1 << 20) + 1, "vocab_size"),
             ("hidden_size", (1 << 16) + 4, "hidden_size"),
             ("intermediate_size", (1 << 18) + 1, "intermediate_size"),
             ("num_hidden_layers", 1025, "num_hidden_layers"),
             ("num_attention_heads", 1025, "num_attention_heads"),
             ("max_position_embeddings", (1 << 20) + 1, "max_position_embeddings"),
             ("partial_rotary_factor", -0.5, "partial_rotary_factor"),
             ("partial_rotary_factor", 0, "partial_rotary_factor"),
             ("partial_rotary_factor", 0.01, "partial_rotary_factor"),  # 0 dims of 32
             ("partial_rotary_factor", float("nan"), "partial_rotary_factor"),
             ("partial_rotary_factor", "half", "partial_rotary_factor"),
             ("rope_theta", 0, "rope_theta"),
             ("rope_theta", -10000.0, "rope_theta"),
             ("rope_theta", float("inf"), "rope_theta"),
             ("rope_theta", 1e39, "rope_theta"),                  # no float32 holds it
             ("layer_norm_eps", 1e-50, "layer_norm_eps"),         # rounds to float32 0
             ("layer_norm_eps", 0.0, "layer_norm_eps"),
             ("eos_token_id", 51200, "eos_token_id"),
             ("bos_token_id", -1, "bos_token_id"))
    runs = []
    for i, (key, value, what) in enumerate(cases):
        d = broken_copy(f"cfgval-{i}")
        edit_json(os.path.join(d, "config.json"), lambda c: c.update({key: value}))
        runs.append((d, what))
    expect_errors(runs)
    # head_dim = hidden_size / heads above 2^12 (the config alone decides: weights unread)
    d = broken_copy("cfgval-head-dim")
    edit_json(os.path.join(d, "config.json"), lambda c: c.update(hidden_size=8192, num_attention_heads=1, num_key_value_heads=1))
    expect_error(d, "hidden_size / num_attention_heads")
    # exactly at the limit is fine (max_seq_len does not change any tensor)
    d = broken_copy("cfgval-at-limit")
    edit_json(os.path.join(d, "config.json"), lambda c: c.update(max_position_embeddings=1 << 20))
    out = os.path.join(d, "out.bin")
    script("convert.py", d, out)
    assert read_header(open(out, "rb").read(256))["max_seq_len"] == 1 << 20


def test_error_safetensors_lying_header_length():
    raw = open(shard_path(checkpoint()), "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    for i, length in enumerate((len(raw) - 7, 1 << 63, (1 << 64) - 1)):   # longer than the file
        d = broken_copy(f"hdrlen-long-{i}")
        replace_file(shard_path(d), struct.pack("<Q", length) + raw[8:])
        expect_error(d, f"length {length} exceeds the file")
    # shorter than the JSON, and longer (the JSON followed by tensor bytes)
    for i, length in enumerate((n - 9, n // 2, 1, 0, n + 8)):
        d = broken_copy(f"hdrlen-wrong-{i}")
        replace_file(shard_path(d), struct.pack("<Q", length) + raw[8:])
        expect_error(d, "malformed safetensors header")
    # shorter but still whole JSON (8 padding spaces left out): every tensor would be read 8
    # bytes early, which leaves 8 bytes at the end that belong to no tensor
    hdr = raw[8:8 + n].rstrip(b" ")
    d = broken_copy("hdrlen-short-valid")
    replace_file(shard_path(d), struct.pack("<Q", len(hdr)) + hdr + b" " * 8 + raw[8 + n:])
    expect_error(d, "belong to no tensor")
    # a header longer than the safetensors limit (100 MB), in a sparse file that is larger still
    d = broken_copy("hdrlen-huge")
    replace_file(shard_path(d), struct.pack("<Q", 200 << 20) + b"{")
    os.truncate(shard_path(d), 300 << 20)
    expect_error(d, "above")
    # a deeply nested header is malformed, not a RecursionError traceback
    d = broken_copy("hdr-nested")
    deep = b"[" * 100000 + b"]" * 100000
    replace_file(shard_path(d), struct.pack("<Q", len(deep)) + deep)
    expect_error(d, "malformed safetensors header")


def test_error_safetensors_offsets():
    names = ("model.layers.0.input_layernorm.bias", "model.layers.2.input_layernorm.bias")
    # past the end of the file
    d = broken_copy("offsets-past-end")

    def past_end(hdr, data):
        a, b = hdr[names[0]]["data_offsets"]
        hdr[names[0]]["data_offsets"] = [len(data), len(data) + b - a]
    edit_shard(d, past_end)
    expect_error(d, names[0])
    # two tensors sharing bytes (the later one pointed at the earlier one's data)
    d = broken_copy("offsets-overlap")

    def overlap(hdr, data):
        first, second = sorted(names, key=lambda nm: hdr[nm]["data_offsets"][0])
        hdr[second]["data_offsets"] = list(hdr[first]["data_offsets"])
    edit_shard(d, overlap)
    msg = expect_error(d, "overlaps")
    assert any(nm in msg for nm in names), msg
    # partly overlapping: a tensor starting 4 bytes inside the one before it
    d = broken_copy("offsets-overlap-partly")

    def partly(hdr, data):
        a, b = hdr[names[1]]["data_offsets"]
        hdr[names[1]]["data_offsets"] = [a - 4, b - 4]
    edit_shard(d, partly)
    expect_error(d, "overlaps")
    # offsets that do not match dtype x shape (F16 [128] is 256 bytes)
    for i, fix in enumerate((lambda a, b: [a, b + 2], lambda a, b: [a, a + 128], lambda a, b: [b, a])):
        d = broken_copy(f"offsets-size-{i}")
        edit_shard(d, lambda hdr, data: hdr[names[0]].update(data_offsets=fix(*hdr[names[0]]["data_offsets"])))
        expect_error(d, names[0])
    # a shape whose size is absurd (2^80 elements)
    d = broken_copy("offsets-huge-shape")
    edit_shard(d, lambda hdr, data: hdr[names[0]].update(shape=[1 << 40, 1 << 40]))
    expect_error(d, names[0])


def test_error_index_and_shards():
    # the index names a shard that is not there (also: a shard in another folder)
    d = broken_copy("index-missing-shard")
    edit_json(os.path.join(d, "model.safetensors.index.json"),
              lambda ix: ix["weight_map"].update({"lm_head.bias": "model-00009-of-00009.safetensors"}))
    expect_error(d, "model-00009-of-00009.safetensors")
    for i, fn in enumerate(("../model-00001-of-00001.safetensors", "/etc/passwd", "")):
        d = broken_copy(f"index-outside-{i}")
        edit_json(os.path.join(d, "model.safetensors.index.json"),
                  lambda ix: ix["weight_map"].update({"lm_head.bias": fn}))
        expect_error(d, "shard name")
    d = broken_copy("index-not-object")
    replace_file(os.path.join(d, "model.safetensors.index.json"), '{"weight_map": ["a"]}')
    expect_error(d, "model.safetensors.index.json")
    # one tensor in two shards: which copy would win is not for the converter to guess
    src = checkpoint(shards=3)
    d = broken_copy("tensor-in-two-shards", src)
    ix = json.load(open(os.path.join(d, "model.safetensors.index.json")))
    name = "model.layers.0.mlp.fc1.bias"
    other = next(fn for fn in sorted(set(ix["weight_map"].values())) if fn != ix["weight_map"][name])
    path = os.path.join(d, other)
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    hdr = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    hdr[name] = {"dtype": "F16", "shape": [512], "data_offsets": [len(data), len(data) + 1024]}
    hb = json.dumps(hdr).encode()
    replace_file(path, struct.pack("<Q", len(hb)) + hb + data + bytes(1024))
    expect_error(d, f"{name} is also in")


def plant(hdr, data, name, index, bits):
    """Overwrite element `index` (flat) of a tensor with the raw bits of its dtype."""
    info = hdr[name]
    size = {"F16": 2, "BF16": 2, "F32": 4}[info["dtype"]]
    b = info["data_offsets"][0] + size * index
    data[b:b + size] = bits.to_bytes(size, "little")


def test_error_non_finite_weights():
    """NaN, +Inf or -Inf in a matrix or a vector, for each source dtype, f32 and q8 output:
    one line naming the tensor and the element, nothing left behind."""
    cases = (("F16", "model.layers.1.mlp.fc2.weight", 5 * 512 + 7, 0x7E00, "nan", [5, 7], "f32"),
             ("F16", "model.layers.3.self_attn.q_proj.bias", 100, 0xFC00, "-inf", [100], "q8"),
             ("BF16", "model.embed_tokens.weight", 50000 * 128 + 1, 0x7F80, "inf", [50000, 1], "f32"),
             ("BF16", "lm_head.weight", 3, 0x7FC1, "nan", [0, 3], "q8"),
             ("F32", "model.final_layernorm.weight", 127, 0x7FC00000, "nan", [127], "f32"),
             ("F32", "model.layers.0.self_attn.k_proj.weight", 128 * 128 - 1, 0xFF800000, "-inf", [127, 127], "q8"))
    runs = []
    for i, (dtype, name, index, bits, shown, where, out_dtype) in enumerate(cases):
        d = broken_copy(f"nonfinite-{i}", checkpoint(dtype=dtype))
        edit_shard(d, lambda hdr, data: plant(hdr, data, name, index, bits))
        runs.append((d, name, "--dtype", out_dtype))
    for msg, (_, _, _, _, shown, where, _) in zip(expect_errors(runs), cases):
        assert "non-finite" in msg and f"({shown})" in msg and str(where) in msg, msg
    # the largest finite values are fine: F16 65504, float32's maximum, copied exactly; two
    # float32 maxima in one tensor overflow any sum of it, which must not count as non-finite
    for dtype, bits, want in (("F16", 0x7BFF, 65504.0), ("F32", 0xFF7FFFFF, -3.4028235e38)):
        d = broken_copy(f"finite-extremes-{dtype}", checkpoint(dtype=dtype))

        def extremes(hdr, data):
            plant(hdr, data, "model.layers.0.mlp.fc1.weight", 9, bits)
            plant(hdr, data, "model.layers.0.mlp.fc1.weight", 10, bits)
        edit_shard(d, extremes)
        out = os.path.join(d, "out.bin")
        script("convert.py", d, out)
        _, _, _, w = read_model(out)
        assert w["0.fc1_weight"][0, 9] == w["0.fc1_weight"][0, 10] == np.float32(want)


def test_error_weights_too_large_for_quantized_types():
    """A finite weight beyond what its quantized type holds is refused: one line naming the
    tensor and the element, exit 1, nothing left behind. q4: 61 x 65504 (a level times the
    largest float16 scale); q8 (every matrix of q8, embed and lm_head of q4): 2^60, where the
    engine's int8 group products could overflow. Before, q8 wrote such weights (the engine
    then met NaN logits) and q4 refused them without naming the tensor. f32 copies any finite
    weight (test_error_non_finite_weights). Up to the limits, conversion is clean: no numpy
    warnings on stderr, finite scales."""
    import test_q4   # its independent q4 file reader

    def f32_bits(v):
        return int(np.array(v, dtype="<f4").view("<u4"))

    q4_max = np.float32(61 * 65504)
    above = np.nextafter(q4_max, np.float32(np.inf))
    cases = (("model.layers.2.mlp.fc1.weight", 3 * 128 + 9, 1e38, [3, 9], "q4"),
             ("model.layers.0.self_attn.dense.weight", 5, above, [0, 5], "q4"),
             ("model.embed_tokens.weight", 700, -3.4e38, [5, 60], "q4"),
             ("lm_head.weight", 7 * 128 + 1, 2.0 ** 61, [7, 1], "q8"),
             ("model.layers.1.mlp.fc2.weight", 2 * 512 + 511, -1e30, [2, 511], "q8"))
    runs = []
    for i, (name, index, value, where, out_dtype) in enumerate(cases):
        d = broken_copy(f"too-large-{i}", checkpoint(dtype="F32"))
        edit_shard(d, lambda hdr, data: plant(hdr, data, name, index, f32_bits(value)))
        runs.append((d, name, "--dtype", out_dtype))
    for msg, (name, _, value, where, out_dtype) in zip(expect_errors(runs), cases):
        fmt = "q8" if out_dtype == "q8" or "layers" not in name else "q4"
        assert f"too large for {fmt} ({float(np.float32(value)):g}) at {where}" in msg, msg

    # the limits themselves are fine: 61 x 65504 in a group whose least-squares scale
    # candidate is beyond float16 (it must lose, quietly), 2^60 in a q8 matrix, and a group of
    # tiny weights (a subnormal q8 scale)
    d = broken_copy("too-large-ok", checkpoint(dtype="F32"))

    def limits(hdr, data):
        name = "model.layers.0.mlp.fc1.weight"
        plant(hdr, data, name, 0, f32_bits(q4_max))
        for c in range(1, 32):
            plant(hdr, data, name, c, f32_bits(5.49 * q4_max / 61))
        plant(hdr, data, "lm_head.weight", 3, f32_bits(2.0 ** 60))
        for c in range(64):
            plant(hdr, data, "model.embed_tokens.weight", 128 + c, f32_bits(1e-40))
    edit_shard(d, limits)
    for out_dtype in ("q4", "q8"):
        out = os.path.join(d, f"out-{out_dtype}.bin")
        p = run([PY, os.path.join(SCRIPTS, "convert.py"), d, out, "--dtype", out_dtype])
        assert all(ln.startswith(("convert: ", "  ")) for ln in p.err.splitlines()), p.err[-800:]
        data = open(out, "rb").read()
        offs, _, _ = test_q4.layout(data[:256], struct.unpack("<Q", data[88:96])[0])
        for key, entry in offs.items():
            if key.endswith(".d"):
                assert np.isfinite(test_q4.read_array(data, entry)).all(), key
        scale = float(test_q4.read_array(data, offs["0.fc1.d"])[0])
        assert (0 < scale <= 65504 if out_dtype == "q4" else scale == float(q4_max / np.float32(127))), scale


def model_added_tokens():
    with open(os.path.join(checkpoint(), "tokenizer.json"), encoding="utf-8") as f:
        return json.load(f)["added_tokens"]


def test_error_tokenizer_rules():
    """What the engine would refuse in the tokenizer section, refused here with one line."""
    def tok_error(name, fn, what):
        d = broken_copy(name)
        edit_json(os.path.join(d, "tokenizer.json"), fn)
        return expect_error(d, what)

    # a token of 1025 bytes (vocabulary or added); 1024 is fine
    tok_error("tok-long-vocab", lambda t: t["model"]["vocab"].update({"a" * 1025: 50300}), "1025 bytes")
    tok_error("tok-long-added", lambda t: t["added_tokens"].append(
        {"id": 50300, "content": "é" * 513, "special": False}), "1026 bytes")
    d = broken_copy("tok-long-ok")
    edit_json(os.path.join(d, "tokenizer.json"), lambda t: t["model"]["vocab"].update({"a" * 1024: 50300}))
    out = os.path.join(d, "out.bin")
    script("convert.py", d, out)
    h, tokens, _, _ = read_model(out)
    assert tokens[50300] == (1, b"a" * 1024) and len(tokens) == 50301
    # more than 1024 added tokens (the engine's limit); 939 (all that fit in vocab_size) are fine
    def added(n):
        return lambda t: t["added_tokens"].extend(
            {"id": 50295 + i, "content": f"<x{i}>", "special": False} for i in range(n - 39))
    assert sum(1 for t in model_added_tokens()) == 39
    tok_error("tok-many-added", added(1025), "1025 added tokens")
    d = broken_copy("tok-added-ok")
    edit_json(os.path.join(d, "tokenizer.json"), added(939))
    script("convert.py", d, os.path.join(d, "out.bin"))
    # the same pair merged twice
    tok_error("tok-dup-pair", lambda t: t["model"]["merges"].append(t["model"]["merges"][7]), "repeats merge 7")
    # one token made by two merges: another split of a merged token, both halves in the vocab
    with open(os.path.join(checkpoint(), "tokenizer.json"), encoding="utf-8") as f:
        model = json.load(f)["model"]
    vocab = model["vocab"]
    for rank, m in enumerate(model["merges"]):
        a, b = m.split(" ")
        t = a + b
        alt = [(t[:k], t[k:]) for k in range(1, len(t)) if k != len(a) and t[:k] in vocab and t[k:] in vocab]
        if alt:
            break
    tok_error("tok-two-merges", lambda tj: tj["model"]["merges"].append(" ".join(alt[0])),
              f"as merge {rank} already does")
    # an added token taking over an id that a merge makes: the merge no longer joins bytes
    tok_error("tok-merge-join", lambda t: t["added_tokens"].append(
        {"id": 256, "content": "QQ", "special": False}), "merge 0")
    # a single byte without its token (BPE could not start from it)
    tok_error("tok-no-byte", lambda t: t["added_tokens"].append(
        {"id": 64, "content": "zz", "special": False}), "0x61")


def test_interrupt_leaves_nothing_behind():
    """Ctrl-C (SIGINT) or SIGTERM in the middle of writing: exit non-zero, one error line,
    no output, no temporary file."""
    ckpt = checkpoint(extra=("--set", "num_hidden_layers=200", "--set", "hidden_size=64",
                             "--set", "intermediate_size=256"))
    out_dir = os.path.join(WORK, "int-out")

    def default_sigint():       # a test run in the background may inherit SIGINT ignored
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    for sig in (signal.SIGINT, signal.SIGTERM):
        shutil.rmtree(out_dir, ignore_errors=True)
        os.makedirs(out_dir)
        p = subprocess.Popen([PY, os.path.join(SCRIPTS, "convert.py"), ckpt, os.path.join(out_dir, "m.bin")],
                             stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, preexec_fn=default_sigint)
        # ~2,000 progress lines (~200 KB) cannot all fit the pipe: it is still writing when signalled
        for line in p.stderr:
            if b"layers.3." in line:
                break
        assert len(os.listdir(out_dir)) == 1, "the temporary should exist while writing"
        p.send_signal(sig)
        err = p.communicate(timeout=120)[1].decode()
        assert p.returncode != 0, f"{sig}: exit {p.returncode}"
        assert err.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in err, err[-500:]
        assert os.listdir(out_dir) == [], os.listdir(out_dir)


# ---------------------------------------------------------------- reference.py sanity

SHORT = [1212, 318, 281, 1672, 2643, 290, 428, 318, 257, 1332]


def test_reference_dump_shape_and_causality():
    ckpt = checkpoint()
    a = read_logits(reference_logits(ckpt, SHORT), VOCAB)
    assert a.shape == (len(SHORT), VOCAB) and np.all(np.isfinite(a))
    changed = SHORT[:6] + [50256, 7, 99, 15496]
    b = read_logits(reference_logits(ckpt, changed), VOCAB)
    assert np.allclose(a[:6], b[:6], rtol=0, atol=1e-5 * np.abs(a).max()), "position p must not see p+1.."
    assert not np.allclose(a[6:], b[6:])
    # the context matters (attention is not trivial): same last token, different prefix
    c = read_logits(reference_logits(ckpt, [99, 88, 77, 1332]), VOCAB)
    assert np.abs(c[-1] - a[-1]).max() > 0.1
    # logits are spread, not all near-equal
    assert a.std(axis=1).min() > 1.0


def test_reference_argmax_and_greedy():
    ckpt = checkpoint()
    a = read_logits(reference_logits(ckpt, SHORT), VOCAB)
    last = script("reference.py", ckpt, "--ids", ",".join(map(str, SHORT))).out.strip()
    assert int(last) == int(np.argmax(a[-1]))
    g = script("reference.py", ckpt, "--ids", ",".join(map(str, SHORT)), "--greedy", "12").out.strip()
    toks = [int(x) for x in g.split(",")]
    assert len(toks) == 12 and toks[0] == int(last)
    assert len(set(toks)) > 3, f"greedy output repeats: {toks}"
    assert all(t < 50295 for t in toks), "padding ids never win"
    # one more greedy token = argmax after appending the first
    b = read_logits(reference_logits(ckpt, SHORT + toks[:1]), VOCAB)
    assert int(np.argmax(b[-1])) == toks[1]


def test_reference_single_token_by_hand():
    """One token: attention is just v (rotation at position 0 is the identity), so the
    logits follow from embed, LayerNorm, gelu_new and the linear layers alone."""
    ckpt = checkpoint(seed=4)
    t = hf_tensors(ckpt)

    def ln(x, w, b):
        m = x.mean()
        return (x - m) / math.sqrt(((x - m) ** 2).mean() + 1e-5) * w + b

    def gelu(x):
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))

    x = t["model.embed_tokens.weight"][15496].copy()
    for i in range(4):
        p = f"model.layers.{i}."
        hh = ln(x, t[p + "input_layernorm.weight"], t[p + "input_layernorm.bias"])
        v = t[p + "self_attn.v_proj.weight"] @ hh + t[p + "self_attn.v_proj.bias"]
        a = t[p + "self_attn.dense.weight"] @ v + t[p + "self_attn.dense.bias"]
        m = t[p + "mlp.fc2.weight"] @ gelu(t[p + "mlp.fc1.weight"] @ hh + t[p + "mlp.fc1.bias"]) + t[p + "mlp.fc2.bias"]
        x = x + a + m
    x = ln(x, t["model.final_layernorm.weight"], t["model.final_layernorm.bias"])
    want = t["lm_head.weight"] @ x + t["lm_head.bias"]
    got = read_logits(reference_logits(ckpt, [15496]), VOCAB)[0]
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_compare_logits_script():
    ckpt = checkpoint()
    ref = reference_logits(ckpt, SHORT)
    a = read_logits(ref, VOCAB).copy()
    a[3, 5] += 0.5
    other = os.path.join(WORK, "cmp-a.f32")
    a.astype("<f4").tofile(other)
    r = json.loads(script("compare_logits.py", other, ref, "--vocab", VOCAB, "--json").out)
    assert r["rows"] == len(SHORT) and abs(r["max_abs_diff"] - 0.5) < 1e-5
    assert r["top1_agreement"] == 1.0 and r["mean_kl"] >= 0
    same = json.loads(script("compare_logits.py", ref, ref, "--vocab", VOCAB, "--json").out)
    assert same["max_abs_diff"] == 0 and abs(same["mean_kl"]) < 1e-12
