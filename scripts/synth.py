#!/usr/bin/env python3
"""Write a synthetic Phi-2 checkpoint in the Hugging Face hub layout of microsoft/phi-2.

usage: synth.py OUT_DIR --preset tiny|full [--seed N] [--dtype F16|BF16|F32]
                [--naming hf|msft] [--shards N] [--merges string|pair] [--set key=value ...]
                [--quiet]

Writes config.json, model-0000i-of-0000N.safetensors + model.safetensors.index.json,
tokenizer.json (real GPT-2 vocabulary and merges plus Phi-2's added tokens), vocab.json,
merges.txt, added_tokens.json, special_tokens_map.json and tokenizer_config.json.

Weights are random but shaped so the model behaves "like a model": attention is peaked
rather than uniform, logits are spread out (top-1 margin well above float32 noise) and greedy
decoding wanders instead of repeating one token. Every tensor is drawn from its own
generator, numpy.random.default_rng([seed, crc32(hf_name)]), in float32, so the same seed
gives the same values whatever the dtype (before rounding), naming or number of shards.
Tensors are generated and written one at a time, in row chunks, so the full-size preset
(~5.6 GB in F16) never needs more than a few hundred MB of memory.

--set key=value overrides config.json keys (value parsed as JSON, else taken as a string),
before any weights are generated: e.g. --set partial_rotary_factor=0.5 --set
num_attention_heads=8, or --set qk_layernorm=true for a config the converter must refuse.
"""
import argparse
import json
import math
import os
import shutil
import struct
import sys
import time
import zlib

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import phi2_tokenizer_json  # noqa: E402

PRESETS = {
    "tiny": dict(vocab_size=51200, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=4, partial_rotary_factor=0.4,
                 max_position_embeddings=2048),
    "full": dict(vocab_size=51200, hidden_size=2560, intermediate_size=10240, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, partial_rotary_factor=0.4,
                 max_position_embeddings=2048),
}

N_REAL_TOKENS = 50295   # ids >= this are padding rows of embed / lm_head

# Weight scales (std of the normal distributions), relative to 1/sqrt(fan_in) for matrices.
# Tuned with scripts/reference.py on the tiny preset (see the report in the commit log):
SCALES = {
    "embed": 1.0,          # residual stream starts at unit scale
    "ln_w_noise": 0.1,     # LayerNorm weight = 1 + N(0, .)
    "ln_b": 0.1,
    "qk": 1.6,             # q, k entries ~1.6 -> scores q.k/sqrt(d) with std ~2.5: peaked attention
    "qk_b": 0.2,
    "v": 1.0,
    "v_b": 0.1,
    "dense": 0.6,          # attention adds ~0.6 per layer to the residual stream
    "dense_b": 0.05,
    "fc1": 1.5,            # gelu_new inputs of a few units: strongly non-linear
    "fc1_b": 0.5,
    "fc2": 0.6,
    "fc2_b": 0.05,         # plus -fc2 @ E[gelu(fc1 h + b1)]: see mlp_mean_correction
    "lm_head": 4.0,        # logits std ~4: top-1 margin usually >> float32 noise
    "lm_head_b": 1.0,      # exact (noise-free) part of the logit spread
    "pad_bias": -20.0,     # lm_head bias of padding ids: they never win (decodable output)
}


def default_config(preset):
    c = {
        "_name_or_path": "microsoft/phi-2",
        "architectures": ["PhiForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 50256,
        "embd_pdrop": 0.0,
        "eos_token_id": 50256,
        "hidden_act": "gelu_new",
        "hidden_size": None,
        "initializer_range": 0.02,
        "intermediate_size": None,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": None,
        "model_type": "phi",
        "num_attention_heads": None,
        "num_hidden_layers": None,
        "num_key_value_heads": None,
        "partial_rotary_factor": None,
        "qk_layernorm": False,
        "resid_pdrop": 0.1,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "transformers_version": "4.37.0",
        "use_cache": True,
        "vocab_size": None,
    }
    c.update(PRESETS[preset])
    return c


# ---------------------------------------------------------------- tensor plan

def plan(cfg, naming):
    """List of (file_name, shape, parts). parts: list of (hf_name, kind) generated and
    concatenated along dim 0 (only msft's fused Wqkv has 3 parts)."""
    V, H, F, L = (cfg["vocab_size"], cfg["hidden_size"], cfg["intermediate_size"],
                  cfg["num_hidden_layers"])
    out = []

    def add(name, shape, *parts):
        out.append((name, tuple(shape), list(parts)))

    msft = naming == "msft"
    add("transformer.embd.wte.weight" if msft else "model.embed_tokens.weight", (V, H),
        ("model.embed_tokens.weight", "embed"))
    for i in range(L):
        hp = f"model.layers.{i}."
        mp = f"transformer.h.{i}."
        if msft:
            add(mp + "ln.weight", (H,), (hp + "input_layernorm.weight", "ln_w"))
            add(mp + "ln.bias", (H,), (hp + "input_layernorm.bias", "ln_b"))
            add(mp + "mixer.Wqkv.weight", (3 * H, H), (hp + "self_attn.q_proj.weight", "qk"),
                (hp + "self_attn.k_proj.weight", "qk"), (hp + "self_attn.v_proj.weight", "v"))
            add(mp + "mixer.Wqkv.bias", (3 * H,), (hp + "self_attn.q_proj.bias", "qk_b"),
                (hp + "self_attn.k_proj.bias", "qk_b"), (hp + "self_attn.v_proj.bias", "v_b"))
            add(mp + "mixer.out_proj.weight", (H, H), (hp + "self_attn.dense.weight", "dense"))
            add(mp + "mixer.out_proj.bias", (H,), (hp + "self_attn.dense.bias", "dense_b"))
            add(mp + "mixer.rotary_emb.inv_freq", (None,), (None, "inv_freq"))
            add(mp + "mlp.fc1.weight", (F, H), (hp + "mlp.fc1.weight", "fc1"))
            add(mp + "mlp.fc1.bias", (F,), (hp + "mlp.fc1.bias", "fc1_b"))
            add(mp + "mlp.fc2.weight", (H, F), (hp + "mlp.fc2.weight", "fc2"))
            add(mp + "mlp.fc2.bias", (H,), (hp + "mlp.fc2.bias", "fc2_b"))
        else:
            add(hp + "input_layernorm.weight", (H,), (hp + "input_layernorm.weight", "ln_w"))
            add(hp + "input_layernorm.bias", (H,), (hp + "input_layernorm.bias", "ln_b"))
            for p in "qkv":
                add(hp + f"self_attn.{p}_proj.weight", (H, H),
                    (hp + f"self_attn.{p}_proj.weight", "v" if p == "v" else "qk"))
                add(hp + f"self_attn.{p}_proj.bias", (H,),
                    (hp + f"self_attn.{p}_proj.bias", "v_b" if p == "v" else "qk_b"))
            add(hp + "self_attn.dense.weight", (H, H), (hp + "self_attn.dense.weight", "dense"))
            add(hp + "self_attn.dense.bias", (H,), (hp + "self_attn.dense.bias", "dense_b"))
            add(hp + "mlp.fc1.weight", (F, H), (hp + "mlp.fc1.weight", "fc1"))
            add(hp + "mlp.fc1.bias", (F,), (hp + "mlp.fc1.bias", "fc1_b"))
            add(hp + "mlp.fc2.weight", (H, F), (hp + "mlp.fc2.weight", "fc2"))
            add(hp + "mlp.fc2.bias", (H,), (hp + "mlp.fc2.bias", "fc2_b"))
    add("lm_head.ln.weight" if msft else "model.final_layernorm.weight", (H,),
        ("model.final_layernorm.weight", "ln_w"))
    add("lm_head.ln.bias" if msft else "model.final_layernorm.bias", (H,),
        ("model.final_layernorm.bias", "ln_b"))
    add("lm_head.linear.weight" if msft else "lm_head.weight", (V, H), ("lm_head.weight", "lm_head"))
    add("lm_head.linear.bias" if msft else "lm_head.bias", (V,), ("lm_head.bias", "lm_head_b"))
    return out


def rot_half_dims(cfg):
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    return max(1, int(cfg["partial_rotary_factor"] * head_dim) // 2)


def fix_shapes(tensors, cfg):
    """Resolve the inv_freq shape (rot_dim/2), which depends on the config."""
    n = rot_half_dims(cfg)
    return [(name, (n,) if shape == (None,) else shape, parts) for name, shape, parts in tensors]


# ---------------------------------------------------------------- generation

def whole(cfg, seed, hf_name, kind, shape):
    return np.concatenate(list(part_chunks(cfg, seed, hf_name, kind, shape, 1 << 30)))


def gelu_new(z):
    return 0.5 * z * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z ** 3)))


def mlp_mean_correction(cfg, seed, prefix):
    """-fc2 @ E[gelu(fc1 h + b1)] for the layer at prefix ("model.layers.N.").

    gelu's output has a large positive mean, so without this every layer's MLP adds a
    context-independent vector to the residual stream. Over 32 layers that common component
    makes a few tokens win everywhere (greedy decoding of the full preset fell into 2-cycles);
    with it, each MLP's output is (approximately) zero-mean over inputs.
    h = LayerNorm output = n * ln_w + ln_b with n ~ unit-variance noise, so each
    pre-activation is taken as normal with mean b1 + fc1 @ ln_b and variance
    fc1^2 @ ln_w^2; E[gelu] by Gauss-Hermite quadrature."""
    H, F = cfg["hidden_size"], cfg["intermediate_size"]
    ln_w = whole(cfg, seed, prefix + "input_layernorm.weight", "ln_w", (H,)).astype(np.float64)
    ln_b = whole(cfg, seed, prefix + "input_layernorm.bias", "ln_b", (H,)).astype(np.float64)
    w1 = whole(cfg, seed, prefix + "mlp.fc1.weight", "fc1", (F, H))
    b1 = whole(cfg, seed, prefix + "mlp.fc1.bias", "fc1_b", (F,)).astype(np.float64)
    mean = w1 @ ln_b + b1
    std = np.sqrt(np.square(w1) @ np.square(ln_w))
    del w1
    x, wts = np.polynomial.hermite_e.hermegauss(40)         # weight exp(-x^2/2)
    mu = gelu_new(mean[:, None] + std[:, None] * x[None, :]) @ wts / math.sqrt(2.0 * math.pi)
    w2 = whole(cfg, seed, prefix + "mlp.fc2.weight", "fc2", (H, F))
    return -(w2 @ mu.astype(np.float32))


def part_chunks(cfg, seed, hf_name, kind, shape, chunk_rows):
    """Yield float32 row chunks of one logical (HF) tensor."""
    H, F = cfg["hidden_size"], cfg["intermediate_size"]
    if kind == "inv_freq":
        n = shape[0]
        rot = 2 * n
        yield (cfg["rope_theta"] ** (-np.arange(0, rot, 2, dtype=np.float64) / rot)).astype(np.float32)
        return
    rng = np.random.default_rng([seed, zlib.crc32(hf_name.encode())])
    rows = shape[0]
    fan_in = {"embed": 1, "qk": H, "v": H, "dense": H, "fc1": H, "fc2": F, "lm_head": H}
    corr = None
    if kind == "fc2_b":     # (numpy's normal stream does not depend on how it is chunked)
        corr = mlp_mean_correction(cfg, seed, hf_name[:-len("mlp.fc2.bias")]).astype(np.float32)
    for r0 in range(0, rows, chunk_rows):
        n = min(chunk_rows, rows - r0)
        sub = (n,) + tuple(shape[1:])
        a = rng.standard_normal(sub, dtype=np.float32)
        if kind == "ln_w":
            a *= np.float32(SCALES["ln_w_noise"])
            a += np.float32(1.0)
        elif kind in fan_in:
            a *= np.float32(SCALES[kind] / math.sqrt(fan_in[kind]))
        else:                                   # biases
            a *= np.float32(SCALES[kind])
            if kind == "fc2_b":
                a += corr[r0:r0 + n]
            if kind == "lm_head_b" and r0 + n > N_REAL_TOKENS:
                lo = max(N_REAL_TOKENS - r0, 0)
                a[lo:] = np.float32(SCALES["pad_bias"])
        yield a


def tensor_chunks(cfg, seed, shape, parts, chunk_rows):
    rows_each = shape[0] // len(parts)
    for hf_name, kind in parts:
        pshape = (rows_each,) + tuple(shape[1:])
        yield from part_chunks(cfg, seed, hf_name, kind, pshape, chunk_rows)


def encode(a, dtype):
    if dtype == "F32":
        return a.astype("<f4").tobytes()
    if dtype == "F16":
        return a.astype("<f2").tobytes()
    # BF16: upper 16 bits of the float32 pattern, round to nearest even (no NaNs here)
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    r = (u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)
    return r.astype("<u2").tobytes()


DTYPE_SIZE = {"F32": 4, "F16": 2, "BF16": 2}
TORCH_DTYPE = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def split_shards(tensors, dtype, n_shards):
    """Split the tensor list (in order) into n_shards groups of roughly equal bytes."""
    sizes = [int(np.prod(s)) * DTYPE_SIZE[dtype] for _, s, _ in tensors]
    total = sum(sizes)
    n_shards = max(1, min(n_shards, len(tensors)))
    groups = [[] for _ in range(n_shards)]
    acc = 0
    for i, (t, sz) in enumerate(zip(tensors, sizes)):
        g = min(n_shards - 1, int(acc * n_shards // total)) if total else 0
        # keep at least one tensor for each remaining shard
        g = max(g, n_shards - (len(tensors) - i))
        groups[g].append(t)
        acc += sz
    return [g for g in groups if g], total


def write_shard(path, tensors, cfg, seed, dtype, chunk_rows, log):
    header = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, shape, _ in tensors:
        nbytes = int(np.prod(shape)) * DTYPE_SIZE[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + nbytes]}
        off += nbytes
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for name, shape, parts in tensors:
            t0 = time.time()
            for chunk in tensor_chunks(cfg, seed, shape, parts, chunk_rows):
                f.write(encode(chunk, dtype))
            if log:
                print(f"  {name} {list(shape)} {dtype} {time.time() - t0:.2f}s", file=sys.stderr)
    return off


def write_tokenizer_files(out, merges_style):
    gpt2 = phi2_tokenizer_json.find_gpt2_dir()
    phi2_tokenizer_json.write(os.path.join(out, "tokenizer.json"), gpt2, merges_style)
    shutil.copyfile(os.path.join(gpt2, "encoder.json"), os.path.join(out, "vocab.json"))
    shutil.copyfile(os.path.join(gpt2, "vocab.bpe"), os.path.join(out, "merges.txt"))
    added = {t["content"]: t["id"] for t in phi2_tokenizer_json.added_tokens() if t["id"] != 50256}
    with open(os.path.join(out, "added_tokens.json"), "w", encoding="utf-8") as f:
        json.dump(added, f, indent=2, ensure_ascii=False)
    eot = "<|endoftext|>"
    with open(os.path.join(out, "special_tokens_map.json"), "w") as f:
        json.dump({"bos_token": eot, "eos_token": eot, "unk_token": eot}, f, indent=2)
    tc = {"add_prefix_space": False, "bos_token": eot, "clean_up_tokenization_spaces": True,
          "eos_token": eot, "model_max_length": 2048, "tokenizer_class": "CodeGenTokenizer",
          "unk_token": eot,
          "added_tokens_decoder": {str(t["id"]): {k: t[k] for k in t if k != "id"}
                                   for t in phi2_tokenizer_json.added_tokens()}}
    with open(os.path.join(out, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(tc, f, indent=2, ensure_ascii=False)


def parse_set(items):
    out = {}
    for it in items:
        if "=" not in it:
            raise SystemExit(f"error: --set expects key=value, got {it!r}")
        k, v = it.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--preset", choices=sorted(PRESETS), required=True)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--dtype", choices=["F16", "BF16", "F32"], default="F16")
    ap.add_argument("--naming", choices=["hf", "msft"], default="hf")
    ap.add_argument("--shards", type=int, default=None,
                    help="number of safetensors shards (default: 2 for full, like microsoft/phi-2; 1 for tiny)")
    ap.add_argument("--merges", choices=["string", "pair"], default="string")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--quiet", action="store_true", help="no per-tensor progress")
    args = ap.parse_args()

    t_start = time.time()
    cfg = default_config(args.preset)
    cfg["torch_dtype"] = TORCH_DTYPE[args.dtype]
    cfg.update(parse_set(args.set))
    H, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    if H % nh:
        raise SystemExit(f"error: hidden_size {H} is not a multiple of num_attention_heads {nh}")

    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")

    tensors = fix_shapes(plan(cfg, args.naming), cfg)
    n_shards = args.shards if args.shards is not None else (2 if args.preset == "full" else 1)
    if n_shards < 1:
        raise SystemExit("error: --shards must be at least 1")
    groups, total = split_shards(tensors, args.dtype, n_shards)
    n = len(groups)
    log = args.preset == "full" and not args.quiet
    weight_map = {}
    chunk_rows = max(1, (1 << 22) // max(1, cfg["hidden_size"], cfg["intermediate_size"]))
    for i, g in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        write_shard(os.path.join(args.out_dir, fname), g, cfg, args.seed, args.dtype, chunk_rows, log)
        for name, _, _ in g:
            weight_map[name] = fname
    with open(os.path.join(args.out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        f.write("\n")
    write_tokenizer_files(args.out_dir, args.merges)
    print(f"synth: wrote {args.out_dir} ({args.preset}, {args.dtype}, {args.naming}, {n} shard(s), "
          f"{total} bytes of weights) in {time.time() - t_start:.1f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
