"""Interactive mode (-i): turns from a pipe and from a real terminal (tmux).

The oracle for the KV cache: with --verbose, each turn says on stderr how many positions the
cache already holds and which token ids it reads after them, so the test knows the whole
conversation as token ids. Each greedy answer (--print-ids) must equal a fresh one-shot run
(--ids) over that conversation: a cache entry at a wrong position, one left stale, a token
read twice or not at all, all change the answer. And the conversation, decoded, must be the
text the format promises (the prefix, "Instruct: TURN\\nOutput:", the answers, newlines).
"""
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time

from common import PHI2, REPO, WORK, checkpoint, converted, phi2, run

TOOL = os.path.join(REPO, "build", "tokenizer_tool")
TURN_LINE = re.compile(r"^phi2: turn (\d+): the cache holds (\d+), reading (\d+): ([\d,]*)$")
ANSWERED = re.compile(r"^phi2: turn (\d+): answered (\d+) tokens, stopped: (.*)$")


def tiny_model():
    return converted(checkpoint())


def decode(model, ids):
    return run([TOOL, model, "decode", ",".join(map(str, ids))]).stdout if ids else b""


def ids_of(line):
    return [int(i) for i in line.split(",")] if line.strip() else []


def session(model, turns, *flags, check=True):
    """Run -i --verbose --print-ids with turns (bytes) on stdin. Returns (process, turns),
    each turn a dict: cached (positions the cache held), read (ids read), conversation (all
    ids before the answer), answer (ids), stopped (why the answer ended)."""
    p = phi2(model, "-i", "--verbose", "--print-ids", "--temp", "0", *flags, input=turns, check=check)
    answers = [ids_of(line) for line in p.out.split("\n")[:-1]]
    conversation, out = [], []
    for line in p.err.splitlines():
        m = TURN_LINE.match(line)
        if m:
            cached, read = int(m.group(2)), ids_of(m.group(4))
            assert len(read) == int(m.group(3)), line
            assert cached <= len(conversation), (line, len(conversation))
            conversation = conversation[:cached] + read
            out.append(dict(cached=cached, read=read, conversation=list(conversation)))
        m = ANSWERED.match(line)
        if m:
            turn = out[int(m.group(1)) - 1]
            turn["answer"] = answers[len(out) - 1]
            turn["stopped"] = m.group(3)
            assert len(turn["answer"]) == int(m.group(2)), (line, turn["answer"])
            conversation += turn["answer"]
    assert len(out) == len(answers), (p.out, p.err)
    return p, out


def one_shot(model, ids, *flags):
    return ids_of(phi2(model, "--ids", ",".join(map(str, ids)), "--temp", "0", "--print-ids", *flags).out)


def prompt_tokens(err):
    return int(re.search(r"\| prompt (\d+) tokens", err).group(1))


def test_pipe_turns_read_only_new_tokens_and_answer_as_a_fresh_run():
    """qa format with a --system prefix, three turns (one continued with a backslash): turn
    1 reads the prefix and itself; each later turn only its own tokens after the cached
    positions (plus the last answer token, which was sampled but never fed back). Every
    answer equals a one-shot run over the whole conversation; the conversation decodes to
    the transcript; stdout holds only the answers, one line each."""
    m = tiny_model()
    flags = ("-n", "6", "--ignore-eos", "--system", "A chat about caches.")
    turns = b"What is a cache?\nAnd a KV cache? \\\nBe brief.\nThanks\n"
    p, got = session(m, turns, *flags)
    assert len(got) == 3, p.err
    assert "phi2: stopped: end of input" in p.err and p.returncode == 0
    assert got[0]["cached"] == 0
    expected = b"A chat about caches.\nInstruct: What is a cache?\nOutput:"
    assert decode(m, got[0]["conversation"]) == expected
    for t, text in ((1, b"And a KV cache? \nBe brief."), (2, b"Thanks")):
        prev = got[t - 1]
        # the cache holds everything but the previous answer's last token, read again now
        assert got[t]["cached"] == len(prev["conversation"]) + len(prev["answer"]) - 1, (t, got[t]["cached"])
        assert got[t]["read"][0] == prev["answer"][-1]
        expected += decode(m, prev["answer"]) + b"\nInstruct: " + text + b"\nOutput:"
        assert decode(m, got[t]["conversation"]) == expected, t
    assert prompt_tokens(p.err) == sum(len(t["read"]) for t in got) < sum(len(t["conversation"]) for t in got)
    for t in got:
        assert len(t["answer"]) == 6 and t["stopped"] == "generated the -n limit of tokens", t
        assert t["answer"] == one_shot(m, t["conversation"], "-n", "6", "--ignore-eos"), t
    # The same session as text: stdout is the answers, each ending in a newline, nothing else.
    text = phi2(m, "-i", "--temp", "0", *flags, input=turns).stdout
    assert text == b"".join(decode(m, t["answer"]) + b"\n" for t in got), text


def test_pipe_stop_string_cuts_the_answer_where_it_begins():
    """An answer ends at a stop string (here a --stop taken from the text, starting inside a
    token): the conversation keeps the text before it, the start of the token it began in
    re-tokenized, then the next turn (chat format). The printed answer is that text."""
    m = tiny_model()
    first = one_shot(m, ids_of(phi2(m, "--tokenize", "-p", "Alice: Hi\nBob:").out), "-n", "12", "--ignore-eos")
    pieces = [decode(m, [i]) for i in first]
    cut = next(k for k in range(3, 12) if len(pieces[k]) >= 2 and b"\0" not in b"".join(pieces[k:]))
    start = sum(len(x) for x in pieces[:cut]) + 1  # one byte into token `cut`
    full = b"".join(pieces)
    stop = full[start:start + 4]
    assert full.find(stop) == start, (full, stop)
    flags = ("--format", "chat", "-n", "12", "--ignore-eos", "--stop", os.fsdecode(stop))
    p, got = session(m, b"Hi\nGo on\n", *flags)
    assert got[0]["stopped"] == "found a stop string" and got[0]["answer"] == first[:cut + 1], got[0]
    conv = got[1]["conversation"]
    assert decode(m, conv) == b"Alice: Hi\nBob:" + full[:start] + b"\nAlice: Go on\nBob:", decode(m, conv)
    assert got[1]["cached"] == len(got[0]["conversation"]) + cut  # the whole tokens before the cut
    assert got[1]["answer"] == one_shot(m, conv, *flags[2:]), got[1]
    text = phi2(m, "-i", "--temp", "0", *flags, input=b"Hi\n").stdout
    assert text == full[:start] + b"\n", (text, full[:start])


def test_pipe_context_overflow_drops_the_oldest_turns():
    """-c 40 with -n 8: when a turn and room for its answer do not fit, the oldest whole turns
    go (the prefix stays, and its cache entries too), one line on stderr says so, and the
    kept turns are read again after the prefix; each answer equals a fresh run over the kept
    conversation. A turn too long for the context even alone is skipped with one line."""
    m = tiny_model()
    flags = ("-c", "40", "-n", "8", "--ignore-eos", "--format", "raw", "--system", "A story:")
    n_prefix = len(ids_of(phi2(m, "--tokenize", "-p", "A story:").out))
    too_long = b" ".join(b"word%d" % i for i in range(40))
    turns = (b"one two three four\nfive six seven\neight nine ten eleven\n" + too_long +
             b"\ntwelve\nthirteen\n a b c d e f g h i j k l m n o\n")
    p, got = session(m, turns, *flags)
    notices = [ln for ln in p.err.splitlines() if ln.startswith("phi2: context full")]
    skipped = [ln for ln in p.err.splitlines() if "skipped" in ln]
    assert len(notices) == 3 and len(skipped) == 1 and len(got) == 6, p.err
    assert notices[0] == "phi2: context full: dropped the oldest turn (12 tokens), re-reading 23", notices[0]
    assert re.match(r"^phi2: context full: dropped the 2 oldest turns \(\d+ tokens\), re-reading \d+$", notices[2])
    assert re.match(r"^phi2: this turn is \d+ tokens, too long for the context of 40 with the prefix: skipped$",
                    skipped[0])
    dropped_turns = 0
    for t in got:
        assert len(t["conversation"]) + 8 <= 40, t
        assert t["conversation"][:n_prefix] == got[0]["conversation"][:n_prefix]
        if t["cached"] == n_prefix and t is not got[0]:  # after a drop: the kept turns are read again
            dropped_turns += 1
        assert t["answer"] == one_shot(m, t["conversation"], "-n", "8", "--ignore-eos"), t
    assert dropped_turns == 3
    # the turns kept after the first drop: turns 2 and 3, exactly as they were
    # (a turn's first token read is the answer before it's last, which belongs to that turn)
    kept = got[1]["read"][1:] + got[1]["answer"] + got[2]["read"][1:] + got[2]["answer"]
    assert len(kept) == 23 and got[3]["read"][:len(kept)] == kept


def test_pipe_odd_input():
    """Bytes that are not UTF-8, NUL bytes, "\\r\\n" line ends, empty lines (skipped), a last
    line without "\\n", and a line longer than the context could ever hold (more bytes than
    -c x the longest token: skipped, with one line)."""
    m = tiny_model()
    flags = ("-c", "64", "-n", "2", "--ignore-eos", "--format", "raw")
    huge = b"x" * (64 * 1024 + 1)
    turns = b"caf\xe9 \xff\xfe\x00zero\r\n\n\r\n" + huge + b"\nlast \xf0\x9f\x98"
    p, got = session(m, turns, *flags)
    assert p.returncode == 0 and len(got) == 2, p.err
    assert decode(m, got[0]["read"]) == b"caf\xe9 \xff\xfe\x00zero"
    assert decode(m, got[1]["read"][1:]) == b"last \xf0\x9f\x98"
    assert "phi2: a turn of more than 65536 bytes cannot fit in the context: skipped" in p.err.splitlines()


def expect_error(*args, contains=None):
    p = phi2(*args, check=False)
    lines = [ln for ln in p.err.splitlines() if ln.strip()]
    assert p.returncode == 1, f"{args}: exit {p.returncode}, stderr: {p.err[-500:]}"
    assert len(lines) == 1 and lines[0].startswith("phi2: error: "), f"{args}: {p.err!r}"
    if contains:
        assert contains in lines[0], (lines[0], contains)


def test_interactive_flag_errors():
    m = tiny_model()
    for extra in (["--ids", "1,2"], ["--perplexity", m], ["--dump-logits", os.path.join(WORK, "x.f32")],
                  ["--trace", os.path.join(WORK, "x.trace")], ["--tokenize"]):
        expect_error(m, "-i", *extra, contains="-i")
    expect_error(m, "-i", "-f", "-", contains="standard input")
    expect_error(m, "-i", "--format", "alpaca", contains="qa, chat or raw")
    expect_error(m, "--format", "qa", "-p", "hi", contains="need -i")
    expect_error(m, "--system", "x", contains="need -i")
    expect_error(m, "--verbose", contains="need -i")
    expect_error(m, "-i", "--system", "x", "-p", "y", contains="only once")
    expect_error(m, "-i", "-c", "4", "--system", "a long prefix for a tiny context", contains="prefix")


def read_until(f, data, what):
    """Read the pipe f (unbuffered) onto data until it holds what."""
    while what not in data:
        chunk = os.read(f.fileno(), 4096)
        assert chunk, f"ended before {what!r}: {data[-500:]!r}"
        data += chunk
    return data


def test_ctrl_c_stops_an_answer_then_at_the_prompt_ends_the_session():
    """SIGINT during an answer (a pipe, -n -1): the answer stops, the session goes on, and the
    next answer is still a fresh run's over the conversation (the interrupted answer's
    tokens are in it and in the cache). SIGINT while waiting for a turn (a blocking read,
    which SA_RESTART would resume) ends the session: status 130, the timings line."""
    m = tiny_model()
    flags = ["--temp", "0", "-c", "256", "-n", "-1", "--ignore-eos"]
    p = subprocess.Popen([PHI2, m, "-i", "--verbose", *flags], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, bufsize=0)
    try:
        p.stdin.write(b"Tell me a long story\n")
        out = read_until(p.stdout, b"", b" ")  # the answer is streaming
        p.send_signal(signal.SIGINT)
        p.stdin.write(b"Go on\n")
        err = read_until(p.stderr, b"", b"turn 2: answered")
        time.sleep(0.3)  # let it block in the read of the next turn
        p.send_signal(signal.SIGINT)
        rest, err_rest = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    out, err = out + rest, (err + err_rest).decode()
    assert p.returncode == 130, (p.returncode, err[-1000:])
    assert "phi2: stopped: interrupted" in err and "phi2: load" in err, err[-500:]
    (n1, why1), (n2, why2) = [(int(m.group(2)), m.group(3)) for m in map(ANSWERED.match, err.splitlines()) if m]
    assert why1 == "interrupted" and 0 < n1 < 250 and why2 == "the context is full", err
    t1, t2 = [m for m in map(TURN_LINE.match, err.splitlines()) if m]
    read1 = ids_of(t1.group(4))
    a1 = one_shot(m, read1, *flags[2:4], "-n", n1, "--ignore-eos")  # greedy: what it had answered
    assert int(t2.group(2)) == len(read1) + n1  # every token of an interrupted answer was fed back
    conv = read1 + a1 + ids_of(t2.group(4))
    text1 = decode(m, a1) + b"\n"
    assert out.startswith(text1), (out[:200], text1)
    assert out[len(text1):] == phi2(m, "--ids", ",".join(map(str, conv)), *flags).stdout


# --- A real terminal: tmux -------------------------------------------------------------

class Tmux:
    """A tmux server of our own (its own socket) running one command in a 200 x 50 pane.
    A shell around it prints "[exit STATUS]" when it ends (tmux's own #{pane_dead_status}
    is sometimes never filled in: its server left the process a zombie); the shell catches
    SIGINT (Ctrl-C goes to the whole foreground process group) and waits on."""

    def __init__(self, command):
        if not shutil.which("tmux"):
            raise AssertionError("tmux is not installed (apt-get install tmux): the terminal test needs it")
        self.dir = tempfile.mkdtemp(prefix="phi2-tmux-")
        self.socket = os.path.join(self.dir, "socket")
        wrapper = ["/bin/sh", "-c", 'trap : INT; "$@"; echo "[exit $?]"; exec sleep 600', "sh", *command]
        self.tmux("-f", "/dev/null", "start-server", ";", "set-option", "-g", "history-limit", "20000", ";",
                  "new-session", "-d", "-x", "200", "-y", "50", *wrapper)

    def exit_status(self, screen):
        """None while the command runs, then its exit status."""
        m = re.search(r"^\[exit (\d+)\]$", screen, re.M)
        return int(m.group(1)) if m else None

    def tmux(self, *args):
        return subprocess.run(["tmux", "-S", self.socket, *args], capture_output=True, check=True, timeout=30).stdout

    def screen(self):
        """The whole pane, scrollback included, trailing blank lines removed."""
        return self.tmux("capture-pane", "-p", "-J", "-S", "-", "-E", "-").decode("utf-8", "replace").rstrip("\n")

    def wait_for(self, what, seconds=90):
        """Poll the pane until what(screen) is true; return the screen."""
        deadline = time.time() + seconds
        while True:
            s = self.screen()
            if what(s):
                return s
            if time.time() > deadline:
                raise AssertionError(f"timed out waiting; the pane ends with:\n{s[-1500:]}")
            time.sleep(0.02)

    def close(self):
        subprocess.run(["tmux", "-S", self.socket, "kill-server"], capture_output=True, timeout=30)
        shutil.rmtree(self.dir, ignore_errors=True)


def at_prompt(n):
    """The pane's last line is the prompt marker "> ", and it is the n-th prompt."""
    def check(s):
        lines = s.split("\n")
        return lines[-1].rstrip() == ">" and sum(ln.rstrip() == ">" or ln.startswith("> ") for ln in lines) >= n
    return check


def test_terminal_session_in_tmux():
    """In a terminal: the "> " marker; the typed turn stays on its own line and the answer
    starts on the next; a context overflow notice (-c 512 -n -1: the first answer fills the
    context); Ctrl-C in the middle of the second answer returns to the prompt; Ctrl-D ends
    the session with status 0 and the timings line."""
    m = tiny_model()
    t = Tmux([os.path.abspath(PHI2), m, "-i", "--temp", "0", "-c", "512", "-n", "-1", "--ignore-eos", "--verbose"])
    try:
        t.wait_for(at_prompt(1))
        t.tmux("send-keys", "-t", "0", "-l", "Hello there")
        t.tmux("send-keys", "-t", "0", "Enter")
        s = t.wait_for(lambda s: "turn 1: answered" in s and at_prompt(2)(s))
        assert "> Hello there\n" in s, s[:500]
        n_read = int(re.search(r"turn 1: the cache holds 0, reading (\d+):", s).group(1))
        assert f"turn 1: answered {512 - n_read} tokens, stopped: the context is full" in s, s[-800:]
        t.tmux("send-keys", "-t", "0", "-l", "Tell me more")
        t.tmux("send-keys", "-t", "0", "Enter")
        t.wait_for(lambda s: "phi2: turn 2: the cache holds" in s)
        t.tmux("send-keys", "-t", "0", "C-c")
        s = t.wait_for(lambda s: "turn 2: answered" in s and at_prompt(3)(s))
        assert "phi2: context full: dropped the oldest turn (512 tokens), re-reading 0" in s, s[-3000:]
        n = int(re.search(r"turn 2: answered (\d+) tokens, stopped: interrupted", s).group(1))
        assert n < 490, n
        assert "^C" in s
        t.tmux("send-keys", "-t", "0", "C-d")
        s = t.wait_for(lambda s: t.exit_status(s) is not None)
        assert t.exit_status(s) == 0 and "phi2: stopped: end of input" in s, s[-1000:]
        assert re.search(r"phi2: load .* \| prompt \d+ tokens, .* \| generated \d+ tokens", s), s[-1000:]
    finally:
        t.close()
