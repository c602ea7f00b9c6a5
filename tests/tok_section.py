"""Test helper: write a raw tokenizer section (docs/FORMAT.md) from a tokenizer.json dict.

This is an independent, test-only writer so the tokenizer tests do not depend on
scripts/convert.py; test_tokenizer.py also checks that convert.py's section behaves the same.
"""
import os
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "scripts"))


def unicode_to_bytes():
    """Inverse of GPT-2's bytes_to_unicode: the printable stand-in character -> raw byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def section_bytes(tj):
    """The tokenizer section for tokenizer.json dict tj (merges as "a b" or ["a", "b"])."""
    u2b = unicode_to_bytes()
    vocab = tj["model"]["vocab"]
    added = {a["id"]: a["content"].encode("utf-8") for a in tj["added_tokens"]}
    n_tokens = max(max(vocab.values()), max(added) if added else -1) + 1
    tokens = [(0, b"")] * n_tokens
    for s, i in vocab.items():
        tokens[i] = (1, bytes(u2b[c] for c in s))
    for i, b in added.items():
        tokens[i] = (2, b)
    by_str = vocab
    merges = []
    for m in tj["model"]["merges"]:
        left, right = m.split(" ") if isinstance(m, str) else m
        merges.append((by_str[left], by_str[right], by_str[left + right]))
    out = [struct.pack("<II", n_tokens, len(merges))]
    for kind, b in tokens:
        out.append(struct.pack("<BI", kind, len(b)) + b)
    out.append(b"".join(struct.pack("<III", *m) for m in merges))
    return b"".join(out)


def phi2_section(merges_style="string"):
    import phi2_tokenizer_json
    return section_bytes(phi2_tokenizer_json.build(merges_style=merges_style))
