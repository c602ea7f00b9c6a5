"""The command line: generation behaviour and every error path.

Every error must be one line on stderr starting with "phi2: error:", exit status 1 (not a
signal, not a sanitizer report), and leave no partial output file behind.
"""
import os
import shutil
import signal
import struct
import subprocess
import time

from common import PHI2, REPO, WORK, checkpoint, converted, phi2, run

SHORT = "1212,318,281,1672,2643,290,428,318,257,1332"


def fnv1a64(data):
    h = 0xcbf29ce484222325
    for b in data:
        h = ((h ^ b) * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
    return h


def tiny_model():
    return converted(checkpoint())


def patched_copy(name, patch, fix_checksum=True):
    """A copy of the tiny model with patch(bytearray_of_header_and_rest) applied."""
    data = bytearray(open(tiny_model(), "rb").read())
    patch(data)
    if fix_checksum:
        data[248:256] = struct.pack("<Q", fnv1a64(bytes(data[:248])))
    path = os.path.join(WORK, name)
    with open(path, "wb") as f:
        f.write(data)
    return path


def expect_error(*args, contains=None):
    p = phi2(*args, check=False)
    lines = [ln for ln in p.err.splitlines() if ln.strip()]
    assert p.returncode == 1, f"{args}: exit {p.returncode}, stderr: {p.err[-500:]}"
    assert len(lines) == 1 and lines[0].startswith("phi2: error: "), f"{args}: stderr not one error line: {p.err!r}"
    if contains:
        assert contains in lines[0], f"{args}: {lines[0]!r} lacks {contains!r}"
    return lines[0]


def test_help_lists_every_flag():
    out = phi2("-h").out
    for flag in ("--prompt", "--file", "--ids", "--n-predict", "--temp", "--top-k", "--top-p", "--seed",
                 "--ctx-size", "--threads", "--batch", "--kv-type", "--no-mmap", "--mmap", "--verify", "--ignore-eos", "--tokenize",
                 "--print-ids", "--dump-logits", "--stop", "--help", "--min-p", "--repeat-penalty", "--repeat-last-n",
                 "--presence-penalty", "--frequency-penalty", "--perplexity", "--save-logprobs", "--kl-base",
                 "--interactive", "--format", "--system", "--verbose"):
        assert flag in out, flag


def test_bad_flags():
    m = tiny_model()
    expect_error()
    expect_error(m, "-n", "abc", contains="-n")
    expect_error(m, "-n", "-2")
    expect_error(m, "--temp", "-1")
    expect_error(m, "--temp", "nan")
    expect_error(m, "--top-p", "0")
    expect_error(m, "--top-p", "1.5")
    expect_error(m, "--top-k", "-1")
    expect_error(m, "-t", "0")
    expect_error(m, "-c", "0")
    expect_error(m, "-c", "4096", "--ids", "1", contains="maximum")
    expect_error(m, "--bogus", contains="--bogus")
    expect_error(m, "-p")
    expect_error(m, "-p", "a", "--ids", "1")
    expect_error(m, m)
    expect_error(m, "--ids", "1,,2")
    expect_error(m, "--ids", "51200", contains="51200")
    expect_error(m, "--ids", "-1")
    expect_error(m, "--ids", "")
    expect_error(m, "-f", os.path.join(WORK, "no-such-prompt.txt"), contains="no-such-prompt.txt")
    expect_error(m, "--min-p", "1.5", contains="--min-p")
    expect_error(m, "--min-p", "-0.1")
    expect_error(m, "--repeat-penalty", "0", contains="--repeat-penalty")
    expect_error(m, "--repeat-last-n", "-2", contains="--repeat-last-n")
    expect_error(m, "--presence-penalty", "x")
    expect_error(m, "--frequency-penalty", "inf")


def test_bad_model_files():
    expect_error(os.path.join(WORK, "missing.bin"), "-p", "hi", contains="missing.bin")
    expect_error(WORK, "-p", "hi", contains="regular file")
    data = open(tiny_model(), "rb").read()
    for n, name in ((0, "empty.bin"), (100, "short.bin"), (len(data) // 2, "half.bin"), (len(data) - 1, "minus1.bin")):
        path = os.path.join(WORK, name)
        with open(path, "wb") as f:
            f.write(data[:n])
        expect_error(path, "-p", "hi")
        expect_error(path, "-p", "hi", "--no-mmap")
        expect_error(path, "-p", "hi", "--mmap")
    expect_error(patched_copy("magic.bin", lambda d: d.__setitem__(slice(0, 8), b"GGUFxxxx")), "-p", "hi",
                 contains="magic")
    for v in (1, 3):  # version 1 (no weights checksums) and an unknown future version
        expect_error(patched_copy(f"version{v}.bin", lambda d: d.__setitem__(slice(8, 12), struct.pack("<I", v))),
                     "-p", "hi", contains="reconvert")
    expect_error(patched_copy("hdrsum.bin", lambda d: d.__setitem__(20, d[20] ^ 1), fix_checksum=False),
                 "-p", "hi", contains="checksum")
    expect_error(patched_copy("toksum.bin", lambda d: d.__setitem__(300, d[300] ^ 0x55)), "-p", "hi",
                 contains="checksum")
    # Valid checksum, but shapes that do not fit the weights section.
    expect_error(patched_copy("layers.bin", lambda d: d.__setitem__(slice(28, 32), struct.pack("<I", 5))),
                 "-p", "hi", contains="corrupt")
    expect_error(patched_copy("heads.bin", lambda d: d.__setitem__(slice(32, 36), struct.pack("<I", 3))),
                 "-p", "hi", contains="heads")
    expect_error(patched_copy("wtype.bin", lambda d: d.__setitem__(slice(12, 16), struct.pack("<I", 7))),
                 "-p", "hi", contains="weight type")
    expect_error(patched_copy("huge.bin", lambda d: d.__setitem__(slice(16, 20), struct.pack("<I", 0xFFFFFFFF))),
                 "-p", "hi", contains="corrupt")


def test_prompt_longer_than_context():
    m = tiny_model()
    expect_error(m, "-c", "5", "--ids", SHORT, contains="longer than the context")
    expect_error(m, "-c", "3", "-p", "This is a long prompt for a tiny context", contains="longer than the context")


def test_dump_logits_leaves_nothing_half_written():
    """A dump that fails leaves no file behind: not at the start (its folder is missing), and
    not at the end, when the complete temporary cannot be renamed over the target (here a
    folder): the temporary is removed. A dump that succeeds leaves exactly the target."""
    m = tiny_model()
    target = os.path.join(WORK, "no-such-dir", "logits.f32")
    expect_error(m, "--ids", SHORT, "--dump-logits", target, contains="no-such-dir")
    folder = os.path.join(WORK, "dump-onto-a-folder")
    os.makedirs(os.path.join(folder, "inside"))
    expect_error(m, "--ids", SHORT, "--dump-logits", folder, contains="cannot rename")
    assert not os.path.exists(folder + ".tmp"), "the temporary of a failed dump was left behind"
    assert os.listdir(folder) == ["inside"], os.listdir(folder)
    out = os.path.join(WORK, "dump-ok.f32")
    phi2(m, "--ids", SHORT, "--dump-logits", out)
    assert os.path.getsize(out) == 10 * 51200 * 4
    assert not os.path.exists(out + ".tmp")


def generated_ids(p):
    """The ids a --print-ids run printed (an empty line: none)."""
    line = p.out.strip()
    return [int(i) for i in line.split(",")] if line else []


def test_stops_at_context_and_at_n():
    """With --ignore-eos generation ends exactly at the context (-c 9 after a 4-token prompt:
    5 tokens) or at -n (7 tokens), and says which; -n 0 generates nothing."""
    m = tiny_model()
    p = phi2(m, "--ids", "1,2,3,4", "-c", "9", "-n", "100", "--temp", "0", "--ignore-eos", "--print-ids")
    assert len(generated_ids(p)) == 5, p.out
    assert "stopped: the context is full" in p.err, p.err
    p = phi2(m, "--ids", "1,2,3,4", "-c", "9", "-n", "-1", "--ignore-eos", "-s", "3", "--print-ids")
    assert len(generated_ids(p)) == 5 and "stopped: the context is full" in p.err, (p.out, p.err)
    p = phi2(m, "--ids", "1,2,3,4", "-n", "7", "--temp", "0", "--ignore-eos", "--print-ids")
    assert len(generated_ids(p)) == 7, p.out
    assert "stopped: generated the -n limit of tokens" in p.err, p.err
    # the -n limit and a full context at the same token: both are true, and exactly 5 come out
    p = phi2(m, "--ids", "1,2,3,4", "-c", "9", "-n", "5", "--temp", "0", "--ignore-eos", "--print-ids")
    assert len(generated_ids(p)) == 5, p.out
    p = phi2(m, "--ids", "1,2,3,4", "-n", "0", "--print-ids")
    assert generated_ids(p) == [] and "stopped: generated the -n limit of tokens" in p.err, (p.out, p.err)


def test_sampling_is_seeded_and_varies():
    m = tiny_model()
    run = lambda seed, *f: phi2(m, "--ids", SHORT, "-n", "24", "-s", seed, "--print-ids", *f).out
    assert run(5) == run(5)
    assert len({run(s) for s in (1, 2, 3, 4)}) > 1, "different seeds should give different samples"
    # top-k 1 is greedy whatever the temperature
    assert run(1, "--top-k", "1", "--temp", "1.5") == run(9, "--temp", "0")


def test_text_output_is_prompt_then_decoded_tokens():
    """The streamed text equals the prompt followed by the generated tokens' bytes."""
    m = tiny_model()
    ids = phi2(m, "-p", "Hello world", "-n", "16", "--temp", "0", "--print-ids").out.strip()
    text = phi2(m, "-p", "Hello world", "-n", "16", "--temp", "0").stdout
    assert text.startswith(b"Hello world")
    decoded = run([os.path.join(REPO, "build", "tokenizer_tool"), m, "decode", ids]).stdout
    assert text == b"Hello world" + decoded + b"\n", (text, decoded)


def test_empty_prompt_starts_from_endoftext():
    """No prompt, -p '' and an empty -f file all mean the prompt <|endoftext|> (id 50256):
    the same logits (--dump-logits) and the same generated ids, greedy and sampled."""
    m = tiny_model()
    empty_file = os.path.join(WORK, "empty-prompt.txt")
    open(empty_file, "wb").close()
    empties = ([], ["-p", ""], ["-f", empty_file])
    eot = os.path.join(WORK, "eot.f32")
    phi2(m, "--ids", "50256", "--dump-logits", eot)
    for i, prompt in enumerate(empties):
        out = os.path.join(WORK, f"empty-{i}.f32")
        phi2(m, *prompt, "--dump-logits", out)
        assert open(out, "rb").read() == open(eot, "rb").read(), f"{prompt}: logits differ from --ids 50256"
    for flags in (["--temp", "0"], ["-s", "4", "--top-k", "0", "--top-p", "1"]):
        want = generated_ids(phi2(m, "--ids", "50256", "-n", "12", "--ignore-eos", "--print-ids", *flags))
        assert len(want) == 12
        for prompt in empties:
            got = generated_ids(phi2(m, *prompt, "-n", "12", "--ignore-eos", "--print-ids", *flags))
            assert got == want, (prompt, flags, got, want)


def test_tokenize_flag():
    m = tiny_model()
    assert phi2(m, "--tokenize", "-p", "   Hello").out.strip() == "50285,15496"
    path = os.path.join(WORK, "prompt.txt")
    with open(path, "wb") as f:
        f.write(b"This is\n\n")
    assert phi2(m, "--tokenize", "-f", path).out.strip().startswith("1212,318")
    assert phi2(m, "--tokenize", "-f", path).out.strip() == phi2(m, "--tokenize", "-p", "This is\n\n").out.strip()


def test_interrupted_dump_leaves_nothing():
    """SIGINT/SIGTERM while --dump-logits is writing: the temporary file is removed."""
    m = tiny_model()
    ids = ",".join(str(1000 + i) for i in range(1500))
    for sig in (signal.SIGINT, signal.SIGTERM):
        out = os.path.join(WORK, f"interrupted-{sig}.f32")
        p = subprocess.Popen([PHI2, m, "--ids", ids, "--batch", "1", "--dump-logits", out],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while not os.path.exists(out + ".tmp") and time.time() < deadline and p.poll() is None:
            time.sleep(0.01)
        assert p.poll() is None, "finished before it could be interrupted: make the prompt longer"
        time.sleep(0.2)
        p.send_signal(sig)
        p.wait(timeout=60)
        assert p.returncode == -sig, p.returncode
        assert not os.path.exists(out + ".tmp") and not os.path.exists(out)


def test_stop_string():
    """--stop ends generation at the first occurrence of the text, which is not printed,
    also when it spans several tokens."""
    m = tiny_model()
    tool = os.path.join(REPO, "build", "tokenizer_tool")
    ids = phi2(m, "-p", "Hello world", "-n", "24", "--temp", "0", "--ignore-eos", "--print-ids").out.strip().split(",")
    pieces = [run([tool, m, "decode", i]).stdout for i in ids]
    text = b"".join(pieces)
    # a stop string from the end of token 5 to the start of token 8 (spans tokens 6 and 7)
    start = sum(len(p) for p in pieces[:5]) - 1
    end = sum(len(p) for p in pieces[:8]) + 1
    stop = text[start:end]
    first = text.find(stop)
    assert b"\0" not in stop and len(stop) >= 3
    p = phi2(m, "-p", "Hello world", "-n", "24", "--temp", "0", "--ignore-eos", "--stop", os.fsdecode(stop))
    assert p.stdout == b"Hello world" + text[:first] + b"\n", (p.stdout, text, stop)
    assert "stop string" in p.err
    q = phi2(m, "-p", "Hello world", "-n", "24", "--temp", "0", "--ignore-eos", "--print-ids", "--stop",
             os.fsdecode(stop)).out.strip().split(",")
    assert q == ids[:len(q)] and len(b"".join(pieces[:len(q)])) >= first + len(stop) > len(b"".join(pieces[:len(q) - 1]))
    expect_error(m, "--stop", "", "-p", "hi")


def test_several_stop_strings():
    """--stop is repeatable: the first of the strings to appear in the text ends it."""
    m = tiny_model()
    text = phi2(m, "-p", "Hello world", "-n", "24", "--temp", "0", "--ignore-eos", "--no-display-prompt").stdout[:-1]
    early, late = text[6:9], text[14:18]
    assert early not in text[:6] and late not in text[:14] and b"\0" not in early + late, text
    for stops in ((late, early), (early, late), (early, b"never appears", late)):
        flags = [x for s in stops for x in ("--stop", os.fsdecode(s))]
        p = phi2(m, "-p", "Hello world", "-n", "24", "--temp", "0", "--ignore-eos", "--no-display-prompt", *flags)
        assert p.stdout == text[:text.find(early)] + b"\n", (stops, p.stdout, text)
    flags = [x for i in range(17) for x in ("--stop", f"s{i}")]
    expect_error(m, "-p", "hi", *flags, contains="at most 16")


def test_prompt_from_stdin():
    """-f - reads the prompt from standard input, byte for byte, as -f FILE would."""
    m = tiny_model()
    prompt = "Instruct: caches?\nOutput:\n"
    want = phi2(m, "-p", prompt, "--tokenize").out
    assert phi2(m, "-f", "-", "--tokenize", input=prompt.encode()).out == want
    want = phi2(m, "-p", prompt, "-n", "6", "--temp", "0").stdout
    assert phi2(m, "-f", "-", "-n", "6", "--temp", "0", input=prompt.encode()).stdout == want
