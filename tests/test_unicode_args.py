"""Arguments and paths outside ASCII, and output bytes as written.

On Linux these are bytes passed through; on Windows (make test-windows, under Wine) they
check the port: the command line is read as UTF-16 and turned into UTF-8, files are opened
through the wide API, stdout is binary (no "\\n" -> "\\r\\n"), and --dump-logits replaces an
existing file.
"""
import os
import shutil

from common import WORK, checkpoint, converted, phi2

TEXT = "h\u00e9llo w\u00f6rld\n\u4e16\u754c \u2603 \U0001f642 \u00df"  # Latin-1, CJK, BMP symbol, emoji


def unicode_dir():
    d = os.path.join(WORK, "d\u00efr \u4e16\u754c")
    os.makedirs(d, exist_ok=True)
    model = os.path.join(d, "m\u00f6del \u00fc.bin")
    if not os.path.exists(model):
        shutil.copyfile(converted(checkpoint()), model)
    return d, model


def test_non_ascii_prompt_is_the_same_as_from_a_file():
    d, model = unicode_dir()
    prompt_file = os.path.join(d, "pr\u00f6mpt \u2603.txt")
    with open(prompt_file, "wb") as f:
        f.write(TEXT.encode())
    from_file = phi2(model, "--tokenize", "-f", prompt_file).out.strip()
    from_arg = phi2(model, "--tokenize", "-p", TEXT).out.strip()
    assert from_arg == from_file and len(from_file.split(",")) > 10, (from_arg, from_file)


def test_prompt_echo_is_byte_exact():
    """The prompt comes back on stdout byte for byte, "\\n" included (no "\\r\\n")."""
    _, model = unicode_dir()
    out = phi2(model, "-p", TEXT, "-n", "0").stdout
    assert out == TEXT.encode() + b"\n", out


def test_dump_logits_to_a_non_ascii_path_replaces_the_old_file():
    d, model = unicode_dir()
    out = os.path.join(d, "l\u00f6gits \u4e16.f32")
    with open(out, "wb") as f:
        f.write(b"old")
    phi2(model, "--ids", "1,2,3", "--dump-logits", out)
    assert os.path.getsize(out) == 3 * 51200 * 4 and not os.path.exists(out + ".tmp")
    phi2(model, "--ids", "1,2", "--dump-logits", out)  # an existing file of our own: replaced again
    assert os.path.getsize(out) == 2 * 51200 * 4
