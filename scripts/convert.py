#!/usr/bin/env python3
"""Convert a Hugging Face Phi-2 checkpoint folder into a phi2.c model file (docs/FORMAT.md).

usage: convert.py HF_DIR OUT.bin [--dtype f32|q8|q4]

Reads config.json, model.safetensors.index.json (or a single model.safetensors), every
shard it names, and tokenizer.json. Accepts F16, BF16 and F32 tensors, current transformers
names (model.layers.N.self_attn.q_proj...) and the original remote-code "phi-msft" names
(transformer.h.N.mixer.Wqkv...); rotary_emb tensors are ignored.

Streams tensor by tensor (shards are memory-mapped, large matrices go in row chunks), so
memory stays a few hundred MB above the largest tensor. The output is written to a
temporary file next to OUT.bin and renamed at the end: an error or Ctrl-C never leaves a
half-written file. Errors are one line on stderr, "error: ...", with exit status 1.

Refused with such an error: a config.json value out of range (docs/FORMAT.md lists the
engine's limits), a safetensors shard whose header does not describe its data exactly
(lengths, offsets, overlaps, dtypes, shapes), a NaN or Inf in any weight, a weight too
large for the quantized type it goes into (q4: 61 x 65504, q8: 2^60 in magnitude; see
Q4_MAX_ABS_WEIGHT), and a tokenizer.json the engine would refuse (over-long tokens,
repeated merges, ...).

--dtype q8: Q8_0, groups of 64 along the input dimension, d = max|w|/127 (float32),
q = round(w/d) in [-127, 127] (0 where d = 0), for every matrix (embed, qkv, dense, fc1,
fc2, lm_head); biases and LayerNorm parameters stay float32.

--dtype q4: the layer matrices (qkv, dense, fc1, fc2) in 4 bits per weight plus one float16
scale per group of 32 (4.5 bits per weight): each weight is the scale times one of 16 fixed
levels (Q4_LEVELS, a codebook fitted to group-normalized weights; scripts/quant_study.py),
and each group's scale is the one, of four candidates, with the least squared error (see
quantize_q4). embed and lm_head stay q8, as in --dtype q8: the lm_head is the model's most
sensitive matrix, and the embedding is only read one row per token.
"""
import argparse
import json
import math
import os
import signal
import struct
import sys
import tempfile
import time

import numpy as np

MAGIC = b"PHI2CBIN"
VERSION = 2
HEADER_SIZE = 256
ALIGN = 64
GROUP = 64                  # q8: weights per float32 scale
Q4_GROUP = 32               # q4: weights per float16 scale
Q4_BLOCK = 64               # q4: weights per 32 bytes of codes (two groups; docs/FORMAT.md)
WEIGHT_F32, WEIGHT_Q8, WEIGHT_Q4 = 0, 1, 2
# The 16 levels of a q4 weight, in units of its group's scale: Lloyd's algorithm on the
# weights of a random-init checkpoint divided by their group's max |w|, times 63, rounded
# (a level plus 64 is then an unsigned byte below 128, which the x86 kernels multiply with).
Q4_LEVELS = np.array([-61, -47, -36, -28, -20, -14, -8, -3, 3, 8, 14, 20, 28, 36, 47, 61], dtype=np.float32)
Q4_MIDPOINTS = (Q4_LEVELS[1:] + Q4_LEVELS[:-1]) / 2
# The levels are integers, so every midpoint between two is a multiple of 1/2: the nearest
# level to x (ties: the lower one) depends only on ceil(2x), and this table maps
# ceil(2x) + Q4_HALF_STEPS (clipped to the table) to it.
Q4_HALF_STEPS = 2 * 128
Q4_NEAREST = np.searchsorted(Q4_MIDPOINTS, np.arange(-Q4_HALF_STEPS, Q4_HALF_STEPS + 1) / 2).astype(np.uint8)
F16_MAX = 65504.0          # the largest finite float16
# The largest weight magnitude a quantized matrix may hold; a larger one is refused, naming
# the tensor and the element, rather than written as an infinite scale or as a file whose
# arithmetic overflows in the engine:
# - q4 (the layer matrices of --dtype q4): a weight is a level (at most 61) times its group's
#   float16 scale (at most 65504), so 61 x 65504 is the most it can hold; up to there the
#   scale max|w| / 61 is a finite float16 (the other candidates beyond it never win).
# - q8 (every matrix of --dtype q8; embed and lm_head of q4): the float32 scale max|w| / 127
#   holds any float32, but the engine computes a group of 64 as (weight scale x activation
#   scale) x the int32 sum of its int8 products (at most 64 x 127 x 127), i.e. up to
#   64 x max|w| x max|x|, and multiplies the scales first even where the sum is 0. 2^60 keeps
#   that finite for weights and activations alike up to 2^60 (64 x 2^120 = 2^126 < 2^128).
# - f32: no limit. The weights are copied exactly and the engine does the float32 arithmetic
#   the model itself does; an overflow there is the model's, and the engine stops at it with
#   "logits are not finite".
Q4_MAX_ABS_WEIGHT = float(Q4_LEVELS[-1]) * F16_MAX
Q8_MAX_ABS_WEIGHT = 2.0 ** 60
CHUNK_BYTES = 64 << 20      # float32 bytes per row chunk while streaming a matrix
MAX_TOKEN_BYTES = 1024      # the longest token the engine accepts
MAX_ADDED_TOKENS = 1024     # the most added tokens the engine accepts (Phi-2 has 39)

# Upper limits on the header's dimensions, as the engine checks them (docs/FORMAT.md).
DIM_LIMITS = {"vocab_size": 1 << 20, "hidden_dim": 1 << 16, "ffn_dim": 1 << 18, "n_layers": 1 << 10,
              "n_heads": 1 << 10, "head_dim": 1 << 12, "rot_dim": 1 << 12, "max_seq_len": 1 << 20}


def log(line):
    """One line on stderr in a single write: a Ctrl-C between a line and its newline would
    glue the final error line to a progress line."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


class ConvertError(Exception):
    """A problem with the input (or output) that ends the conversion with one error line."""


def fnv1a64(data):
    h = 0xcbf29ce484222325
    for b in data:
        h ^= b
        h = (h * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
    return h


# ---------------------------------------------------------------- config

def read_json(path):
    """A JSON file, or a ConvertError naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConvertError(f"{path}: cannot parse: {e}")


def load_config(hf_dir):
    if not os.path.isdir(hf_dir):
        raise ConvertError(f"{hf_dir}: no such checkpoint folder")
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise ConvertError(f"{path}: missing (not a Hugging Face checkpoint folder?)")
    cfg = read_json(path)
    if not isinstance(cfg, dict):
        raise ConvertError(f"{path}: not a JSON object")
    return cfg, path


def model_params(cfg, path, weight_type):
    """Validate config.json; return the header dimensions."""
    def get(key, kind, default=None):
        if key not in cfg or cfg[key] is None:
            if default is None:
                raise ConvertError(f"{path}: missing key {key}")
            return default
        v = cfg[key]
        if kind is int and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
            raise ConvertError(f"{path}: {key} must be a positive integer, got {v!r}")
        if kind is float and (not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v)):
            raise ConvertError(f"{path}: {key} must be a finite number, got {v!r}")
        return v

    def positive_f32(key, default):
        # stored as float32: it must still be a positive finite number after rounding
        v = get(key, float, default)
        with np.errstate(over="ignore", under="ignore"):
            f = np.float32(v)
        if not (np.isfinite(f) and f > 0):
            raise ConvertError(f"{path}: {key} {v!r} must be positive and fit a float32")
        return float(f)

    if cfg.get("model_type") != "phi":
        raise ConvertError(f"{path}: unsupported model_type {cfg.get('model_type')!r} (expected 'phi')")
    if cfg.get("qk_layernorm", False):
        raise ConvertError(f"{path}: unsupported config: qk_layernorm is true")
    act = cfg.get("hidden_act", "gelu_new")
    if act != "gelu_new":
        raise ConvertError(f"{path}: unsupported config: hidden_act {act!r} (only gelu_new)")
    p = {
        "vocab_size": get("vocab_size", int),
        "hidden_dim": get("hidden_size", int),
        "ffn_dim": get("intermediate_size", int),
        "n_layers": get("num_hidden_layers", int),
        "n_heads": get("num_attention_heads", int),
        "max_seq_len": get("max_position_embeddings", int, 2048),
        "rope_theta": positive_f32("rope_theta", 10000.0),
        "norm_eps": positive_f32("layer_norm_eps", 1e-5),
    }
    keys = {"vocab_size": "vocab_size", "hidden_dim": "hidden_size", "ffn_dim": "intermediate_size",
            "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
            "max_seq_len": "max_position_embeddings"}
    for dim, key in keys.items():
        if p[dim] > DIM_LIMITS[dim]:
            raise ConvertError(f"{path}: {key} {p[dim]} is above the engine's limit {DIM_LIMITS[dim]}")
    kv = cfg.get("num_key_value_heads")
    if kv is not None and kv != p["n_heads"]:
        raise ConvertError(f"{path}: unsupported config: num_key_value_heads {kv} != "
                           f"num_attention_heads {p['n_heads']}")
    if p["hidden_dim"] % p["n_heads"]:
        raise ConvertError(f"{path}: hidden_size {p['hidden_dim']} is not a multiple of "
                           f"num_attention_heads {p['n_heads']}")
    p["head_dim"] = p["hidden_dim"] // p["n_heads"]
    if p["head_dim"] > DIM_LIMITS["head_dim"]:
        raise ConvertError(f"{path}: hidden_size / num_attention_heads = {p['head_dim']} is above the "
                           f"engine's limit {DIM_LIMITS['head_dim']}")
    prf = float(get("partial_rotary_factor", float, 0.5))
    if not 0 < prf <= 1:
        raise ConvertError(f"{path}: partial_rotary_factor {prf} is outside (0, 1]")
    rot = int(prf * p["head_dim"])      # as transformers computes it
    if rot % 2 or rot < 2:
        raise ConvertError(f"{path}: partial_rotary_factor {prf} gives {rot} rotary dims per head of "
                           f"{p['head_dim']}: must be even and at least 2")
    p["rot_dim"] = rot
    for key in ("bos_token_id", "eos_token_id"):
        v = cfg.get(key, 50256)
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < p["vocab_size"]:
            raise ConvertError(f"{path}: {key} {v!r} is not an id below vocab_size {p['vocab_size']}")
    p["bos_id"] = cfg.get("bos_token_id", 50256)
    p["eos_id"] = cfg.get("eos_token_id", 50256)
    if weight_type in (WEIGHT_Q8, WEIGHT_Q4):
        name = "q8" if weight_type == WEIGHT_Q8 else "q4"
        for key, dim in (("hidden_size", p["hidden_dim"]), ("intermediate_size", p["ffn_dim"])):
            if dim % GROUP:
                raise ConvertError(f"{path}: {key} {dim} is not a multiple of {GROUP}: {name} impossible "
                                   f"(use --dtype f32)")
    p["tie_word_embeddings"] = bool(cfg.get("tie_word_embeddings", False))
    return p


# ---------------------------------------------------------------- safetensors

DTYPES = {"F32": ("<f4", 4), "F16": ("<f2", 2), "BF16": ("<u2", 2)}
KNOWN_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
               "U8": 1, "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


class Tensor:
    def __init__(self, name, path, dtype, shape, offset, nbytes):
        self.name, self.path, self.dtype, self.shape = name, path, dtype, shape
        self.offset, self.nbytes = offset, nbytes      # file offset and length of the data

    def rows(self, r0, r1):
        """float32 copy of rows r0..r1-1 (a 1-D tensor is one "row" per element)."""
        if self.dtype not in DTYPES:
            raise ConvertError(f"{self.path}: tensor {self.name}: unsupported dtype {self.dtype} "
                               f"(F16, BF16 or F32)")
        np_dtype, size = DTYPES[self.dtype]
        row = int(np.prod(self.shape[1:], dtype=np.int64))
        mm = np.memmap(self.path, dtype=np_dtype, mode="r", offset=self.offset + r0 * row * size,
                       shape=((r1 - r0) * row,))
        if self.dtype == "BF16":
            a = (mm.astype(np.uint32) << np.uint32(16)).view(np.float32)
        else:
            a = mm.astype(np.float32)
        del mm
        # A NaN or Inf weight would only show up later as garbage (or NaN) logits: refuse it
        # here, one chunk at a time. Any NaN or Inf makes the sum NaN or Inf, and a sum is
        # twice as fast as np.isfinite; only a non-finite sum (possibly an overflow of huge
        # finite values) needs the element-wise look.
        if not np.isfinite(a.sum(dtype=np.float32)) and not np.isfinite(a).all():
            i = int(np.argmin(np.isfinite(a)))
            where = np.unravel_index(r0 * row + i, self.shape) if self.shape else ()
            raise ConvertError(f"{self.path}: tensor {self.name} holds a non-finite value ({a[i]}) at "
                               f"{list(map(int, where))}")
        return a.reshape((r1 - r0,) + tuple(self.shape[1:]))


MAX_SAFETENSORS_HEADER = 100 << 20     # the limit the safetensors library itself enforces


def read_safetensors_header(path):
    """{name: Tensor} of one shard, with every offset checked against the file size."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ConvertError(f"{path}: truncated safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise ConvertError(f"{path}: malformed safetensors header: length {n} exceeds the "
                                   f"file ({size} bytes; truncated?)")
            if n > MAX_SAFETENSORS_HEADER:
                raise ConvertError(f"{path}: malformed safetensors header: length {n} is above "
                                   f"{MAX_SAFETENSORS_HEADER} bytes")
            raw = f.read(n)
    except OSError as e:
        raise ConvertError(f"{path}: cannot read: {e.strerror}")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ConvertError(f"{path}: malformed safetensors header: {type(e).__name__}: {str(e)[:200]}")
    if not isinstance(header, dict):
        raise ConvertError(f"{path}: malformed safetensors header: not a JSON object")
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        bad = f"{path}: malformed safetensors header entry for {name}"
        if not isinstance(info, dict):
            raise ConvertError(bad)
        dtype, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if (not isinstance(dtype, str) or not isinstance(shape, list)
                or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
                or not isinstance(offs, list) or len(offs) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
                or not 0 <= offs[0] <= offs[1]):
            raise ConvertError(bad)
        if dtype in KNOWN_SIZES and offs[1] - offs[0] != math.prod(shape) * KNOWN_SIZES[dtype]:
            raise ConvertError(f"{bad}: data_offsets {offs} do not match shape {shape} {dtype}")
        if base + offs[1] > size:
            raise ConvertError(f"{path}: truncated: tensor {name} ends at byte {base + offs[1]}, "
                               f"the file has {size}")
        out[name] = Tensor(name, path, dtype, tuple(shape), base + offs[0], offs[1] - offs[0])
    # As in the safetensors specification, the tensors tile the data area exactly: no two
    # share a byte (a crafted file could alias weights) and none is missing (a header
    # length that is too short shifts every tensor, which leaves bytes over at the end).
    end = 0
    for t in sorted(out.values(), key=lambda t: (t.offset, t.nbytes)):
        if t.offset < base + end:
            raise ConvertError(f"{path}: malformed safetensors header: tensor {t.name} overlaps "
                               f"the tensor before it")
        if t.offset > base + end:
            raise ConvertError(f"{path}: malformed safetensors header: {t.offset - base - end} bytes "
                               f"before tensor {t.name} belong to no tensor")
        end += t.nbytes
    if base + end != size:
        raise ConvertError(f"{path}: malformed safetensors header: the last {size - base - end} bytes "
                           f"of the file belong to no tensor")
    return out


def load_tensors(hf_dir):
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    single = os.path.join(hf_dir, "model.safetensors")
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                wm = json.load(f)["weight_map"]
            if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
                raise ValueError("weight_map is not an object of file names")
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, RecursionError) as e:
            raise ConvertError(f"{index}: cannot parse: {type(e).__name__}: {str(e)[:200]}")
        files = sorted(set(wm.values()))
        for fn in files:
            # a shard is a file of the checkpoint folder, never a path to elsewhere
            if not fn or os.path.basename(fn) != fn or fn in (".", ".."):
                raise ConvertError(f"{index}: shard name {fn!r} is not a file name in the folder")
    elif os.path.isfile(single):
        wm, files = None, ["model.safetensors"]
    else:
        raise ConvertError(f"{hf_dir}: no model.safetensors.index.json or model.safetensors")
    tensors = {}
    for fn in files:
        path = os.path.join(hf_dir, fn)
        if not os.path.isfile(path):
            raise ConvertError(f"{path}: missing shard (listed in {os.path.basename(index)})")
        for name, t in read_safetensors_header(path).items():
            if name in tensors:
                raise ConvertError(f"{path}: tensor {name} is also in {os.path.basename(tensors[name].path)}")
            tensors[name] = t
    if wm is not None:
        for name, fn in wm.items():
            t = tensors.get(name)
            if t is None or os.path.basename(t.path) != fn:
                raise ConvertError(f"{os.path.join(hf_dir, fn)}: tensor {name} listed in the index "
                                   f"is not in this shard")
    return tensors


# ---------------------------------------------------------------- weights plan

def weight_plan(p, tensors):
    """[(file name, kind, [source Tensors stacked by rows], expected shape)] in file order.
    kind: "vector", "matrix" (a layer's matrix) or "table" (embed and lm_head: one row per
    token id; they stay q8 in q4 files)."""
    H, F, V, L = p["hidden_dim"], p["ffn_dim"], p["vocab_size"], p["n_layers"]
    msft = "transformer.embd.wte.weight" in tensors and "model.embed_tokens.weight" not in tensors

    def need(name, shape):
        t = tensors.get(name)
        if t is None:
            raise ConvertError(f"missing tensor {name}")
        if t.shape != tuple(shape):
            raise ConvertError(f"{t.path}: tensor {name} has shape {list(t.shape)}, expected {list(shape)}")
        if t.dtype not in DTYPES:
            raise ConvertError(f"{t.path}: tensor {name}: unsupported dtype {t.dtype} (F16, BF16 or F32)")
        return t

    plan = []

    def matrix(label, names, rows, cols, kind="matrix"):
        srcs = [need(n, (rows // len(names), cols)) for n in names]
        plan.append((label, kind, srcs, (rows, cols)))

    def vector(label, names, n):
        srcs = [need(nm, (n // len(names),)) for nm in names]
        plan.append((label, "vector", srcs, (n,)))

    head_w = "lm_head.linear.weight" if msft else "lm_head.weight"
    if head_w not in tensors and p["tie_word_embeddings"]:
        raise ConvertError(f"unsupported config: tie_word_embeddings is true and there is no {head_w}")

    matrix("embed", ["transformer.embd.wte.weight" if msft else "model.embed_tokens.weight"], V, H, "table")
    for i in range(L):
        if msft:
            m = f"transformer.h.{i}."
            vector(f"layers.{i}.ln_weight", [m + "ln.weight"], H)
            vector(f"layers.{i}.ln_bias", [m + "ln.bias"], H)
            matrix(f"layers.{i}.qkv_weight", [m + "mixer.Wqkv.weight"], 3 * H, H)
            vector(f"layers.{i}.qkv_bias", [m + "mixer.Wqkv.bias"], 3 * H)
            matrix(f"layers.{i}.dense_weight", [m + "mixer.out_proj.weight"], H, H)
            vector(f"layers.{i}.dense_bias", [m + "mixer.out_proj.bias"], H)
        else:
            m = f"model.layers.{i}."
            a = m + "self_attn."
            vector(f"layers.{i}.ln_weight", [m + "input_layernorm.weight"], H)
            vector(f"layers.{i}.ln_bias", [m + "input_layernorm.bias"], H)
            matrix(f"layers.{i}.qkv_weight", [a + "q_proj.weight", a + "k_proj.weight",
                                              a + "v_proj.weight"], 3 * H, H)
            vector(f"layers.{i}.qkv_bias", [a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"], 3 * H)
            matrix(f"layers.{i}.dense_weight", [a + "dense.weight"], H, H)
            vector(f"layers.{i}.dense_bias", [a + "dense.bias"], H)
        matrix(f"layers.{i}.fc1_weight", [m + "mlp.fc1.weight"], F, H)
        vector(f"layers.{i}.fc1_bias", [m + "mlp.fc1.bias"], F)
        matrix(f"layers.{i}.fc2_weight", [m + "mlp.fc2.weight"], H, F)
        vector(f"layers.{i}.fc2_bias", [m + "mlp.fc2.bias"], H)
    vector("final_ln_weight", ["lm_head.ln.weight" if msft else "model.final_layernorm.weight"], H)
    vector("final_ln_bias", ["lm_head.ln.bias" if msft else "model.final_layernorm.bias"], H)
    matrix("lm_head_weight", [head_w], V, H, "table")
    vector("lm_head_bias", ["lm_head.linear.bias" if msft else "lm_head.bias"], V)
    return plan


# ---------------------------------------------------------------- tokenizer section

def bytes_to_unicode():
    """GPT-2's map from the 256 byte values to printable unicode characters."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1))
          + list(range(ord("\xae"), ord("\xff") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


UNICODE_TO_BYTE = {c: b for b, c in bytes_to_unicode().items()}


def token_bytes(tok):
    """Raw bytes of a byte-level BPE vocabulary string, or None if it is not one."""
    try:
        return bytes(UNICODE_TO_BYTE[ch] for ch in tok)
    except KeyError:
        return None


def build_tokenizer_section(hf_dir, vocab_size):
    path = os.path.join(hf_dir, "tokenizer.json")
    if not os.path.isfile(path):
        raise ConvertError(f"{path}: missing")
    tj = read_json(path)
    model = tj.get("model") if isinstance(tj, dict) else None
    if not isinstance(model, dict) or not isinstance(model.get("vocab"), dict) \
            or not isinstance(model.get("merges"), list):
        raise ConvertError(f"{path}: no BPE model with vocab and merges")
    if model.get("type", "BPE") != "BPE":
        raise ConvertError(f"{path}: unsupported tokenizer model type {model.get('type')!r} (BPE only)")
    vocab = model["vocab"]
    added = tj.get("added_tokens") or []
    if not isinstance(added, list):
        raise ConvertError(f"{path}: added_tokens is not a list")

    entries = {}    # id -> (kind, bytes)
    for tok, i in vocab.items():
        if not isinstance(i, int) or isinstance(i, bool) or i < 0:
            raise ConvertError(f"{path}: vocab token {tok!r} has a bad id {i!r}")
        if i in entries:
            raise ConvertError(f"{path}: vocab id {i} is used twice")
        b = token_bytes(tok)
        if b is None or not b:
            raise ConvertError(f"{path}: vocab token {tok!r} (id {i}) is not a GPT-2 byte-level token")
        entries[i] = (1, b)
    for t in added:
        if not isinstance(t, dict) or not isinstance(t.get("content"), str) or not t["content"] \
                or not isinstance(t.get("id"), int) or isinstance(t.get("id"), bool) or t["id"] < 0:
            raise ConvertError(f"{path}: malformed added token {t!r}")
        for flag in ("lstrip", "rstrip", "single_word"):
            if t.get(flag):
                raise ConvertError(f"{path}: added token {t['content']!r} (id {t['id']}) has {flag} "
                                   f"true: unsupported")
        entries[t["id"]] = (2, t["content"].encode("utf-8"))
    if not entries:
        raise ConvertError(f"{path}: empty vocabulary")
    n_added = sum(1 for kind, b in entries.values() if kind == 2)
    if n_added > MAX_ADDED_TOKENS:
        raise ConvertError(f"{path}: {n_added} added tokens, more than {MAX_ADDED_TOKENS}")
    n_tokens = max(entries) + 1
    if n_tokens > vocab_size:
        raise ConvertError(f"{path}: {n_tokens} token ids exceed the model's vocab_size {vocab_size}")
    for i, (kind, b) in entries.items():
        if len(b) > MAX_TOKEN_BYTES:
            raise ConvertError(f"{path}: token {i} is {len(b)} bytes long, more than {MAX_TOKEN_BYTES}")
    singles = {b for kind, b in entries.values() if kind == 1 and len(b) == 1}
    if len(singles) != 256:
        missing = min(set(range(256)) - {b[0] for b in singles})
        raise ConvertError(f"{path}: no vocabulary token for the single byte 0x{missing:02x} (BPE starts from them)")

    merges = []
    pair_rank, made_by = {}, {}     # (left, right) -> rank; merged id -> rank
    for rank, m in enumerate(model["merges"]):
        if isinstance(m, str):
            parts = m.split(" ")
        elif isinstance(m, list):
            parts = m
        else:
            parts = None
        if not parts or len(parts) != 2 or not all(isinstance(s, str) and s for s in parts):
            raise ConvertError(f"{path}: merge {rank} is malformed: {m!r}")
        a, b = parts
        ids = [vocab.get(s) for s in (a, b, a + b)]
        for s, i in zip((a, b, a + b), ids):
            if i is None:
                raise ConvertError(f"{path}: merge {rank} ({a!r} {b!r}): {s!r} is not in the vocab")
        # The engine refuses a pair merged twice or a token made by two merges (either makes
        # the result depend on which one wins), and needs the merged token's bytes to be the
        # two parts' (an added token may have taken over a vocabulary id).
        pair = (ids[0], ids[1])
        if pair in pair_rank:
            raise ConvertError(f"{path}: merge {rank} ({a!r} {b!r}) repeats merge {pair_rank[pair]}")
        if ids[2] in made_by:
            raise ConvertError(f"{path}: merge {rank} ({a!r} {b!r}) makes token {ids[2]}, as merge "
                               f"{made_by[ids[2]]} already does")
        pair_rank[pair], made_by[ids[2]] = rank, rank
        if entries[ids[2]][1] != entries[ids[0]][1] + entries[ids[1]][1]:
            raise ConvertError(f"{path}: merge {rank} ({a!r} {b!r}): token {ids[2]} is not the two "
                               f"parts joined (an added token with a vocabulary id?)")
        merges.append(ids)

    out = bytearray(struct.pack("<II", n_tokens, len(merges)))
    for i in range(n_tokens):
        kind, b = entries.get(i, (0, b""))
        out += struct.pack("<BI", kind, len(b))
        out += b
    out += np.asarray(merges, dtype="<u4").tobytes()
    return bytes(out), n_tokens, len(merges)


# ---------------------------------------------------------------- writing

class WeightSums:
    """weights_sum and weights_sum2 of docs/FORMAT.md, over the bytes as they are written:
    the section read as little-endian u64 words w_0, w_1, ..., sum(w_i) and sum((i+1) * w_i),
    both mod 2^64. A write that ends inside a word leaves its bytes for the next one."""

    def __init__(self):
        self.n_words = 0
        self.sum = 0
        self.sum2 = 0
        self.tail = b""
        self.ramp = np.arange(1, 1, dtype=np.uint64)    # 1, 2, 3, ...: grown as needed

    def add(self, mv):
        if self.tail:
            take = 8 - len(self.tail)
            self.tail += bytes(mv[:take])
            mv = mv[take:]
            if len(self.tail) < 8:
                return
            self._words(np.frombuffer(self.tail, dtype="<u8"))
            self.tail = b""
        whole = len(mv) // 8 * 8
        if whole:
            self._words(np.frombuffer(mv[:whole], dtype="<u8"))
        self.tail = bytes(mv[whole:])

    def _words(self, w):
        # Words k+0 .. k+n-1 add sum((k+1+j) * w_j) = k * sum(w_j) + sum((j+1) * w_j).
        # numpy's uint64 sum and dot wrap mod 2^64, which is the definition; totals are
        # kept as Python ints, reduced mod 2^64.
        n = len(w)
        if len(self.ramp) < n:
            self.ramp = np.arange(1, n + 1, dtype=np.uint64)
        s = int(w.sum(dtype=np.uint64))
        s2 = int(np.dot(w, self.ramp[:n]))
        self.sum2 = (self.sum2 + self.n_words * s + s2) % (1 << 64)
        self.sum = (self.sum + s) % (1 << 64)
        self.n_words += n


class Writer:
    def __init__(self, f):
        self.f = f
        self.pos = f.tell()
        self.sums = None        # a WeightSums once the weights section begins

    def start_sums(self):
        self.sums = WeightSums()

    def align(self):
        pad = -self.pos % ALIGN
        if pad:
            self.write(bytes(pad))

    def write(self, data):
        mv = memoryview(data).cast("B")
        self.f.write(mv)
        self.pos += len(mv)
        if self.sums is not None:
            self.sums.add(mv)


def quantize_q8(w):
    """w: float32 [rows, cols] -> (int8 [rows, cols], float32 [rows, cols/64])."""
    rows, cols = w.shape
    g = w.reshape(rows, cols // GROUP, GROUP)
    d = (np.abs(g).max(axis=-1) / np.float32(127)).astype(np.float32)
    q = np.zeros(g.shape, dtype=np.float32)
    np.divide(g, d[..., None], out=q, where=d[..., None] > 0)
    q = np.clip(np.rint(q), -127, 127).astype(np.int8)
    return q.reshape(rows, cols), d


def quantize_q4(w):
    """w: float32 [rows, cols] -> (codes uint8 [rows, cols/2], scales float16 [rows, cols/32]).

    Weight c of a row is Q4_LEVELS[code] * scale[c // 32]; the codes of each block of 64
    weights fill 32 bytes, byte i holding weight i in its low nibble and weight 32 + i in its
    high nibble. Each weight gets the level nearest to w / scale (ties: the lower level).
    Each group's scale is, of four candidates, the one with the least squared error
    sum (level * scale - w)^2 (the first on ties), all in float16: m / 61 and 0.9 m / 61
    (m = max |w| of the group), each also improved once by least squares for the levels it
    chose: sum(w * level) / sum(level^2) (a candidate beyond float16's range never wins).
    Every |w| must be at most Q4_MAX_ABS_WEIGHT (write_tensor checks it, naming the tensor)."""
    rows, cols = w.shape
    g = np.asarray(w, dtype=np.float32).reshape(rows, cols // Q4_GROUP, Q4_GROUP)
    amax = np.abs(g).max(axis=-1)
    if amax.size and float(amax.max()) > Q4_MAX_ABS_WEIGHT:  # (a caller that skipped the check)
        raise ConvertError(f"a weight of magnitude {float(amax.max()):.7g} is too large for q4 "
                           f"(at most {Q4_MAX_ABS_WEIGHT:.7g})")
    best_err = np.full(amax.shape, np.inf, dtype=np.float32)
    best_scale = np.zeros(amax.shape, dtype=np.float16)
    best_codes = np.zeros(g.shape, dtype=np.uint8)

    def consider(scale16):
        d = scale16.astype(np.float32)
        inv = np.zeros_like(d)
        np.divide(np.float32(1), d, out=inv, where=d > 0)
        half_steps = np.ceil(g * (2 * inv[..., None]))
        np.clip(half_steps, -Q4_HALF_STEPS, Q4_HALF_STEPS, out=half_steps)
        codes = Q4_NEAREST[half_steps.astype(np.int32) + Q4_HALF_STEPS]
        levels = Q4_LEVELS[codes]
        err = np.square(levels * d[..., None] - g).sum(axis=-1)
        better = err < best_err
        best_err[better] = err[better]
        best_scale[better] = scale16[better]
        best_codes[better] = codes[better]
        return levels

    for share in (np.float32(0.9), np.float32(1.0)):
        levels = consider((amax * share / Q4_LEVELS[-1]).astype(np.float16))
        num, den = (g * levels).sum(axis=-1), np.square(levels).sum(axis=-1)
        with np.errstate(over="ignore"):  # an infinite candidate is expected near the limit, and loses
            consider(np.maximum(num / den, 0).astype(np.float16))
    blocks = best_codes.reshape(rows, cols // Q4_BLOCK, 2, Q4_BLOCK // 2)
    packed = blocks[:, :, 0, :] | (blocks[:, :, 1, :] << 4)
    return packed.reshape(rows, cols // 2), best_scale


def dequantize_q4(codes, scales):
    """The inverse of quantize_q4's layout: float32 [rows, cols]."""
    rows, half = codes.shape
    blocks = codes.reshape(rows, half // (Q4_BLOCK // 2), Q4_BLOCK // 2)
    idx = np.stack([blocks & 15, blocks >> 4], axis=2).reshape(rows, half * 2)
    d = np.repeat(scales.astype(np.float32), Q4_GROUP, axis=1)
    return Q4_LEVELS[idx] * d


def check_magnitude(t, w, r0, limit, fmt, hint):
    """Refuse rows r0.. of tensor t (float32 w) if a weight is beyond limit in magnitude."""
    if max(float(w.max()), -float(w.min())) <= limit:
        return
    i = int(np.argmax(np.abs(w) > limit))
    where = [r0 + i // w.shape[1], i % w.shape[1]]
    raise ConvertError(f"{t.path}: tensor {t.name} holds a weight too large for {fmt} ({float(w.flat[i]):g}) "
                       f"at {where}: at most {limit:.7g} in magnitude ({hint})")


def write_tensor(wr, kind, srcs, shape, weight_type):
    if kind == "vector":
        wr.align()
        for t in srcs:
            wr.write(np.ascontiguousarray(t.rows(0, t.shape[0]), dtype="<f4"))
        return
    cols = shape[1]
    chunk = max(1, CHUNK_BYTES // (4 * cols))
    wr.align()
    scales = []
    for t in srcs:
        for r0 in range(0, t.shape[0], chunk):
            w = t.rows(r0, min(t.shape[0], r0 + chunk))
            if weight_type == WEIGHT_F32:
                wr.write(np.ascontiguousarray(w, dtype="<f4"))
            elif weight_type == WEIGHT_Q8 or kind == "table":
                check_magnitude(t, w, r0, Q8_MAX_ABS_WEIGHT, "q8", "the engine's int8 products would overflow; "
                                "use --dtype f32")
                q, d = quantize_q8(w)
                wr.write(q)
                scales.append(np.ascontiguousarray(d, dtype="<f4"))
            else:
                check_magnitude(t, w, r0, Q4_MAX_ABS_WEIGHT, "q4", "its float16 scale would overflow; "
                                "use --dtype q8 or f32")
                q, d = quantize_q4(w)
                wr.write(q)
                scales.append(np.ascontiguousarray(d, dtype="<f2"))
            del w
    if scales:
        wr.align()
        for d in scales:
            wr.write(d)


def pack_header(p, weight_type, tok_size, tok_checksum, w_off, w_size, w_sum, w_sum2):
    h = struct.pack("<8sIIIIIIIIIIIffIIIQQQQQQQQ", MAGIC, VERSION, weight_type,
                    p["vocab_size"], p["hidden_dim"], p["ffn_dim"], p["n_layers"], p["n_heads"],
                    p["head_dim"], p["rot_dim"], p["max_seq_len"],
                    {WEIGHT_F32: 0, WEIGHT_Q8: GROUP, WEIGHT_Q4: Q4_GROUP}[weight_type],
                    p["rope_theta"], p["norm_eps"], p["bos_id"], p["eos_id"], 0,
                    HEADER_SIZE, tok_size, w_off, w_size, w_off + w_size, tok_checksum, w_sum, w_sum2)
    h += b"\0" * (248 - len(h))
    return h + struct.pack("<Q", fnv1a64(h))


def convert(hf_dir, out_path, weight_type, tmp_holder):
    t_start = time.time()
    cfg, cfg_path = load_config(hf_dir)
    p = model_params(cfg, cfg_path, weight_type)
    tensors = load_tensors(hf_dir)
    plan = weight_plan(p, tensors)
    tok, n_tokens, n_merges = build_tokenizer_section(hf_dir, p["vocab_size"])
    log(f"convert: {hf_dir}: {p['n_layers']} layers, hidden {p['hidden_dim']}, ffn {p['ffn_dim']}, "
          f"{p['n_heads']} heads, rot_dim {p['rot_dim']}, vocab {p['vocab_size']}; tokenizer "
          f"{n_tokens} tokens, {n_merges} merges")

    out_dir = os.path.dirname(os.path.abspath(out_path))
    try:
        fd, tmp = tempfile.mkstemp(dir=out_dir, prefix="." + os.path.basename(out_path) + ".",
                                   suffix=".tmp")
    except OSError as e:
        raise ConvertError(f"{out_path}: cannot create the output: {e.strerror}")
    tmp_holder.append(tmp)
    with os.fdopen(fd, "wb") as f:
        wr = Writer(f)
        wr.write(b"\0" * HEADER_SIZE)          # the header goes in last
        wr.write(tok)
        wr.align()
        w_off = wr.pos
        wr.start_sums()
        for label, kind, srcs, shape in plan:
            t0 = time.time()
            write_tensor(wr, kind, srcs, shape, weight_type)
            names = ",".join(t.name for t in srcs)
            dt = "/".join(sorted({t.dtype for t in srcs}))
            out_t = ("f32" if kind == "vector" or weight_type == WEIGHT_F32 else
                     "q4" if kind == "matrix" and weight_type == WEIGHT_Q4 else "q8_0")
            log(f"  {label} {list(shape)} {names} {dt} -> {out_t} {time.time() - t0:.2f}s")
        wr.align()                              # the section ends on a 64-byte boundary
        w_size = wr.pos - w_off
        assert not wr.sums.tail and wr.sums.n_words * 8 == w_size
        f.seek(0)
        f.write(pack_header(p, weight_type, len(tok), fnv1a64(tok), w_off, w_size,
                            wr.sums.sum, wr.sums.sum2))
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, out_path)
    tmp_holder.remove(tmp)
    log(f"convert: wrote {out_path} ({w_off + w_size} bytes) in {time.time() - t_start:.1f}s")


def main():
    ap = argparse.ArgumentParser(description="Convert a Hugging Face Phi-2 checkpoint to a phi2.c model file")
    ap.add_argument("hf_dir")
    ap.add_argument("out")
    ap.add_argument("--dtype", choices=["f32", "q8", "q4"], default="f32")
    args = ap.parse_args()

    def on_term(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)

    tmp_holder = []
    status = 0
    try:
        convert(args.hf_dir, args.out, {"f32": WEIGHT_F32, "q8": WEIGHT_Q8, "q4": WEIGHT_Q4}[args.dtype], tmp_holder)
    except ConvertError as e:
        log(f"error: {e}")
        status = 1
    except KeyboardInterrupt:
        log("error: interrupted")
        status = 130
    except OSError as e:
        log(f"error: {e.filename or args.out}: {e.strerror or e}")
        status = 1
    except Exception as e:  # noqa: BLE001 -- one line, never a traceback
        log(f"error: {type(e).__name__}: {e}")
        status = 1
    finally:
        for tmp in tmp_holder:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    sys.exit(status)


if __name__ == "__main__":
    main()
