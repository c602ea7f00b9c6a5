#!/usr/bin/env python3
"""Reference Phi-2 forward pass: float64 numpy, straight from a Hugging Face checkpoint folder.

usage: reference.py HF_DIR --ids 1,2,3 [--dump-logits FILE | --trace FILE] [--greedy N]

The oracle the C engine is tested against, so it is written to be obviously correct rather
than fast: it follows transformers' PhiForCausalLM (modeling_phi.py) step by step, runs the
whole sequence at once (no KV cache) and shares no code with convert.py.

  --dump-logits FILE  write the logits of every prompt position as little-endian float32
                      rows of vocab_size
  --trace FILE        write every named intermediate of every prompt position (embed,
                      L{l}.ln/q/k/v/attn/attn_out/mlp_act/mlp_out/residual, final_ln,
                      logits) as records of: u32 name length, name, u32 position, u32 n,
                      n little-endian float32; the same records as ./phi2 --trace, for
                      scripts/compare_trace.py
  --greedy N          then append N greedily chosen tokens (argmax; the whole sequence is
                      recomputed for each) and print them comma-separated on one line
Without any of them it prints the argmax of the last position.
Reads config.json, model.safetensors.index.json (or model.safetensors) and the shards;
tensor names of current transformers or of the original "phi-msft" remote code; F16, BF16
or F32 tensors.
"""
import argparse
import json
import math
import os
import struct
import sys

import numpy as np


# ---------------------------------------------------------------- safetensors

def read_safetensors(path):
    """{name: float64 array} of every tensor in one .safetensors file."""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        raw = data[base + begin: base + end]
        dtype = info["dtype"]
        if dtype == "F32":
            a = np.frombuffer(raw, dtype="<f4")
        elif dtype == "F16":
            a = np.frombuffer(raw, dtype="<f2")
        elif dtype == "BF16":
            # bfloat16 = the upper 16 bits of a float32
            a = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            raise SystemExit(f"error: {path}: tensor {name}: unsupported dtype {dtype}")
        out[name] = a.astype(np.float64).reshape(info["shape"])
    return out


def load_checkpoint(hf_dir):
    with open(os.path.join(hf_dir, "config.json")) as f:
        cfg = json.load(f)
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    tensors = {}
    for fn in files:
        tensors.update(read_safetensors(os.path.join(hf_dir, fn)))
    return cfg, tensors


# ---------------------------------------------------------------- weights

class Layer:
    pass


def get_weights(cfg, t):
    """Collect the weights under transformers' names, whichever naming the checkpoint uses."""
    L = cfg["num_hidden_layers"]
    H = cfg["hidden_size"]
    msft = "transformer.embd.wte.weight" in t
    layers = []
    for i in range(L):
        ly = Layer()
        if msft:
            p = f"transformer.h.{i}."
            ly.ln_w, ly.ln_b = t[p + "ln.weight"], t[p + "ln.bias"]
            wqkv, bqkv = t[p + "mixer.Wqkv.weight"], t[p + "mixer.Wqkv.bias"]
            ly.wq, ly.wk, ly.wv = wqkv[:H], wqkv[H:2 * H], wqkv[2 * H:]
            ly.bq, ly.bk, ly.bv = bqkv[:H], bqkv[H:2 * H], bqkv[2 * H:]
            ly.wd, ly.bd = t[p + "mixer.out_proj.weight"], t[p + "mixer.out_proj.bias"]
        else:
            p = f"model.layers.{i}."
            ly.ln_w, ly.ln_b = t[p + "input_layernorm.weight"], t[p + "input_layernorm.bias"]
            a = p + "self_attn."
            ly.wq, ly.bq = t[a + "q_proj.weight"], t[a + "q_proj.bias"]
            ly.wk, ly.bk = t[a + "k_proj.weight"], t[a + "k_proj.bias"]
            ly.wv, ly.bv = t[a + "v_proj.weight"], t[a + "v_proj.bias"]
            ly.wd, ly.bd = t[a + "dense.weight"], t[a + "dense.bias"]
        ly.w1, ly.b1 = t[p + "mlp.fc1.weight"], t[p + "mlp.fc1.bias"]
        ly.w2, ly.b2 = t[p + "mlp.fc2.weight"], t[p + "mlp.fc2.bias"]
        layers.append(ly)
    if msft:
        embed = t["transformer.embd.wte.weight"]
        fin_w, fin_b = t["lm_head.ln.weight"], t["lm_head.ln.bias"]
        head_w, head_b = t["lm_head.linear.weight"], t["lm_head.linear.bias"]
    else:
        embed = t["model.embed_tokens.weight"]
        fin_w, fin_b = t["model.final_layernorm.weight"], t["model.final_layernorm.bias"]
        head_w, head_b = t["lm_head.weight"], t["lm_head.bias"]
    return embed, layers, (fin_w, fin_b), (head_w, head_b)


# ---------------------------------------------------------------- math

def layer_norm(x, w, b, eps):
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)      # biased variance
    return (x - mean) / np.sqrt(var + eps) * w + b


def gelu_new(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def rotate_half(x):
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary(x, rot_dim, theta):
    """x: [heads, T, head_dim]. NeoX-style rotary on the first rot_dim dims of each head."""
    T = x.shape[1]
    inv_freq = 1.0 / theta ** (np.arange(0, rot_dim, 2, dtype=np.float64) / rot_dim)
    angles = np.outer(np.arange(T, dtype=np.float64), inv_freq)      # [T, rot_dim/2]
    emb = np.concatenate([angles, angles], axis=-1)                    # [T, rot_dim]
    cos, sin = np.cos(emb), np.sin(emb)
    x_rot, x_pass = x[..., :rot_dim], x[..., rot_dim:]
    x_rot = x_rot * cos + rotate_half(x_rot) * sin
    return np.concatenate([x_rot, x_pass], axis=-1)


def forward(cfg, weights, ids, all_positions=True, capture=None):
    """Logits [T, vocab] (or [1, vocab] for the last position only).

    capture(name, rows): if given, called with every named intermediate, rows = [T, n]
    (row t = position t; final_ln and logits: the last position only if not all_positions);
    what --trace writes. It changes nothing in the computation."""
    if capture is None:
        capture = lambda name, rows: None  # noqa: E731
    embed, layers, (fin_w, fin_b), (head_w, head_b) = weights
    H = cfg["hidden_size"]
    n_heads = cfg["num_attention_heads"]
    head_dim = H // n_heads
    rot_dim = int(cfg["partial_rotary_factor"] * head_dim)
    theta = cfg.get("rope_theta", 10000.0)
    eps = cfg["layer_norm_eps"]
    T = len(ids)

    x = embed[np.asarray(ids)]                                          # [T, H]
    capture("embed", x)
    causal = np.triu(np.full((T, T), -np.inf), k=1)                      # mask j > i
    for l, ly in enumerate(layers):
        h = layer_norm(x, ly.ln_w, ly.ln_b, eps)
        capture(f"L{l}.ln", h)
        q = h @ ly.wq.T + ly.bq
        k = h @ ly.wk.T + ly.bk
        v = h @ ly.wv.T + ly.bv
        # [T, H] -> [heads, T, head_dim]
        q, k, v = (a.reshape(T, n_heads, head_dim).transpose(1, 0, 2) for a in (q, k, v))
        q = apply_rotary(q, rot_dim, theta)
        k = apply_rotary(k, rot_dim, theta)
        # [heads, T, head_dim] -> [T, H] (heads concatenated), as traced
        capture(f"L{l}.q", q.transpose(1, 0, 2).reshape(T, H))
        capture(f"L{l}.k", k.transpose(1, 0, 2).reshape(T, H))
        capture(f"L{l}.v", v.transpose(1, 0, 2).reshape(T, H))
        scores = q @ k.transpose(0, 2, 1) / math.sqrt(head_dim) + causal   # [heads, T, T]
        scores = scores - scores.max(axis=-1, keepdims=True)
        p = np.exp(scores)
        p = p / p.sum(axis=-1, keepdims=True)
        att = (p @ v).transpose(1, 0, 2).reshape(T, H)
        capture(f"L{l}.attn", att)
        attn_out = att @ ly.wd.T + ly.bd
        capture(f"L{l}.attn_out", attn_out)
        act = gelu_new(h @ ly.w1.T + ly.b1)
        capture(f"L{l}.mlp_act", act)
        mlp_out = act @ ly.w2.T + ly.b2
        capture(f"L{l}.mlp_out", mlp_out)
        x = x + attn_out + mlp_out                                       # parallel block
        capture(f"L{l}.residual", x)
    if not all_positions:
        x = x[-1:]
    x = layer_norm(x, fin_w, fin_b, eps)
    capture("final_ln", x)
    logits = x @ head_w.T + head_b
    capture("logits", logits)
    return logits


def write_trace(path, records):
    """records: [(name, [T, n] array)] -> the --trace file, one record per row (position)."""
    with open(path, "wb") as f:
        for name, rows in records:
            for pos, row in enumerate(rows):
                f.write(struct.pack("<I", len(name)) + name.encode("ascii"))
                f.write(struct.pack("<II", pos, row.size))
                f.write(row.astype("<f4").tobytes())


def main():
    ap = argparse.ArgumentParser(description="float64 numpy reference forward pass of Phi-2")
    ap.add_argument("hf_dir")
    ap.add_argument("--ids", required=True, help="comma-separated token ids")
    ap.add_argument("--dump-logits", metavar="FILE")
    ap.add_argument("--trace", metavar="FILE")
    ap.add_argument("--greedy", type=int, default=0, metavar="N")
    args = ap.parse_args()
    if args.dump_logits and args.trace:
        raise SystemExit("error: give only one of --dump-logits and --trace")

    ids = [int(s) for s in args.ids.split(",") if s.strip() != ""]
    if not ids:
        raise SystemExit("error: --ids is empty")
    cfg, tensors = load_checkpoint(args.hf_dir)
    weights = get_weights(cfg, tensors)
    V = cfg["vocab_size"]
    for i in ids:
        if not 0 <= i < V:
            raise SystemExit(f"error: token id {i} out of range [0, {V})")

    if args.trace:
        records = []
        forward(cfg, weights, ids, capture=lambda name, rows: records.append((name, rows.copy())))
        write_trace(args.trace, records)
    elif args.dump_logits or args.greedy == 0:
        logits = forward(cfg, weights, ids)
        if args.dump_logits:
            logits.astype("<f4").tofile(args.dump_logits)
        if args.greedy == 0 and not args.dump_logits:
            print(int(np.argmax(logits[-1])))
    if args.greedy > 0:
        seq = list(ids)
        new = []
        for _ in range(args.greedy):
            nxt = int(np.argmax(forward(cfg, weights, seq, all_positions=False)[-1]))
            seq.append(nxt)
            new.append(nxt)
        print(",".join(map(str, new)))


if __name__ == "__main__":
    main()
