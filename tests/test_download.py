"""scripts/download.py and scripts/run.sh against a local imitation of the Hugging Face hub.

The hub (http.server on 127.0.0.1, an ephemeral port, one per test) answers
/{org}/{name}/resolve/{rev}/{file} as huggingface.co does: small files directly with a git
blob SHA-1 ETag, safetensors files with a 302 to a second server (the "file store", another
port) and X-Linked-Etag (SHA-256) / X-Linked-Size headers; 404 with X-Error-Code; 401
without a token when the repository is private. The store honours Range requests. Both log
every request (method, path, headers, bytes of body sent), so the tests can say what was
fetched, from where, with which headers. It serves a tiny synthetic two-shard checkpoint.
"""
import hashlib
import http.server
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.parse

from common import PHI2, PY, REPO, SCRIPTS, WORK, checkpoint, converted, phi2, run, same_for_every_build

REPO_ID = "synth/tiny"
OLD_REPO_ID = "synth/old-name"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
NEEDED = ["config.json", "tokenizer.json", "model.safetensors.index.json",
          "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
SHARD1 = "model-00001-of-00002.safetensors"
SHARD2 = "model-00002-of-00002.safetensors"
TOKEN = "hf_test_token_123"
MAX_REQUESTS = 400          # a runaway client ends the servers instead of looping forever
MAX_SECONDS = 120


def git_sha1(data):
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass        # a client that hangs up mid-transfer (as some tests make it) is no news


class Hub:
    """The hub and its file store; `with Hub(folder) as hub:` serves folder as REPO_ID@main."""

    def __init__(self, folder, repo=REPO_ID, private=False, cut=None, stall=None, wrong_sha=(), ignore_range=False):
        self.files = {}
        for name in os.listdir(folder):
            with open(os.path.join(folder, name), "rb") as f:
                self.files[name] = f.read()
        self.repo = repo
        self.private = private
        self.cut = dict(cut or {})          # name -> N: the next GET sends N bytes and hangs up
        self.stall = dict(stall or {})      # name -> N: the next GET sends N bytes and waits
        self.wrong_sha = set(wrong_sha)     # names whose advertised hash is wrong
        self.ignore_range = ignore_range    # answer 200 (the whole file) to a Range request
        self.log = []                       # dicts: server, method, path, headers, sent
        self.lock = threading.Lock()
        self.servers = []
        self.release = threading.Event()    # ends a stall

    # -- lifecycle
    def __enter__(self):
        for role in ("hub", "store"):
            srv = QuietServer(("127.0.0.1", 0), self._handler(role))
            srv.daemon_threads = True
            threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
            self.servers.append(srv)
        self.endpoint = f"http://127.0.0.1:{self.servers[0].server_address[1]}"
        self.store = f"http://127.0.0.1:{self.servers[1].server_address[1]}"
        self.watchdog = threading.Timer(MAX_SECONDS, self.close)
        self.watchdog.daemon = True
        self.watchdog.start()
        return self

    def close(self):
        self.release.set()
        for srv in self.servers:
            srv.shutdown()
            srv.server_close()
        self.servers = []

    def __exit__(self, *exc):
        self.watchdog.cancel()
        self.close()

    def requests(self, server=None, method=None):
        with self.lock:
            return [r for r in self.log if (server is None or r["server"] == server)
                    and (method is None or r["method"] == method)]

    # -- the two servers
    def _handler(self, role):
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_HEAD(self):
                self.handle_any(head=True)

            def do_GET(self):
                self.handle_any(head=False)

            def handle_any(self, head):
                rec = {"server": role, "method": self.command, "path": self.path,
                       "headers": {k.lower(): v for k, v in self.headers.items()}, "sent": 0, "from": 0}
                with hub.lock:
                    hub.log.append(rec)
                    too_many = len(hub.log) > MAX_REQUESTS
                if too_many:
                    self.send_error(503, "too many requests")
                    return
                if role == "hub":
                    self.resolve(rec, head)
                else:
                    self.serve_file(rec, head)

            def error(self, code, kind):
                self.send_response(code)
                self.send_header("X-Error-Code", kind)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def resolve(self, rec, head):
                path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
                parts = path.lstrip("/").split("/")
                if len(parts) < 5 or parts[2] != "resolve":
                    return self.error(404, "RepoNotFound")
                repo, rev, name = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
                if hub.private and rec["headers"].get("authorization") != f"Bearer {TOKEN}":
                    return self.error(401, "RepoNotFound")
                if repo == OLD_REPO_ID:       # a renamed repository: a relative redirect
                    self.send_response(307)
                    self.send_header("Location", "/" + hub.repo + self.path[len(OLD_REPO_ID) + 1:])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if repo != hub.repo:
                    return self.error(404, "RepoNotFound")
                if rev not in ("main", COMMIT):
                    return self.error(404, "RevisionNotFound")
                if name not in hub.files:
                    return self.error(404, "EntryNotFound")
                data = hub.files[name]
                if name.endswith(".safetensors"):
                    sha = hashlib.sha256(data).hexdigest()
                    if name in hub.wrong_sha:
                        sha = hashlib.sha256(b"something else").hexdigest()
                    self.send_response(302)
                    self.send_header("Location", f"{hub.store}/files/{hashlib.sha256(data).hexdigest()}"
                                                 f"?name={urllib.parse.quote(name)}")
                    self.send_header("X-Linked-Etag", f'"{sha}"')
                    self.send_header("X-Linked-Size", str(len(data)))
                    self.send_header("ETag", f'"{sha}"')
                    self.send_header("X-Repo-Commit", COMMIT)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                etag = git_sha1(data) if name not in hub.wrong_sha else git_sha1(b"x")
                self.send_response(200)
                self.send_header("ETag", f'"{etag}"')
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if not head:
                    self.wfile.write(data)
                    rec["sent"] = len(data)

            def serve_file(self, rec, head):
                q = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
                name = q.get("name", [""])[0]
                if name not in hub.files:
                    return self.error(404, "EntryNotFound")
                data = hub.files[name]
                start = 0
                rng = self.headers.get("Range")
                if rng and not hub.ignore_range:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                if head:
                    return
                rec["from"] = start
                body = data[start:]
                with hub.lock:
                    cut = hub.cut.pop(name, None) if not head else None
                    stall = hub.stall.pop(name, None) if not head else None
                if cut is not None or stall is not None:
                    n = cut if cut is not None else stall
                    self.wfile.write(body[:n])
                    self.wfile.flush()
                    rec["sent"] = n
                    if stall is not None:
                        hub.release.wait(30)
                    self.close_connection = True
                    return
                self.wfile.write(body)
                rec["sent"] = len(body)

        return Handler


# ---------------------------------------------------------------- helpers

def tmpdir(tag):
    os.makedirs(WORK, exist_ok=True)
    return tempfile.mkdtemp(prefix=f"dl-{tag}-", dir=WORK)


def env_for(hub, home, token=None):
    """An environment that sees only the test hub and an empty Hugging Face home."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env["HF_ENDPOINT"] = hub.endpoint if hub else "http://127.0.0.1:9"
    env["HF_HOME"] = os.path.join(home, "hf-home")
    if token:
        env["HF_TOKEN"] = token
    return env


def download(env, *args, timeout=60):
    p = subprocess.run([PY, os.path.join(SCRIPTS, "download.py"), *args], capture_output=True,
                       timeout=timeout, env=env)
    p.out, p.err = p.stdout.decode(), p.stderr.decode()
    return p


def assert_one_error(p, *words):
    lines = [l for l in p.err.splitlines() if l.strip()]
    errs = [l for l in lines if l.startswith("error: ")]
    assert p.returncode == 1, f"exit {p.returncode}, expected 1\n{p.err}"
    assert len(errs) == 1 and lines[-1] == errs[0], f"expected one final 'error:' line:\n{p.err}"
    assert "Traceback" not in p.err, p.err
    for w in words:
        assert w in errs[0], f"{w!r} not in {errs[0]!r}"
    return errs[0]


def same_files(ckpt, folder, names=NEEDED):
    for n in names:
        with open(os.path.join(ckpt, n), "rb") as a, open(os.path.join(folder, n), "rb") as b:
            assert a.read() == b.read(), f"{n} differs from the served file"


def ckpt2():
    return checkpoint(shards=2)


# ---------------------------------------------------------------- tests

def test_download_convert_run():
    """Every needed file (and no other) fetched, large ones from the store without the token;
    the converted model answers exactly as the locally converted one; a second run fetches
    nothing again."""
    ckpt = ckpt2()
    work = tmpdir("full")
    dest = os.path.join(work, "dl")
    with Hub(ckpt) as hub:
        p = download(env_for(hub, work, TOKEN), REPO_ID, "--dir", dest)
        assert p.returncode == 0, p.err
        assert p.out.strip() == dest, p.out
        same_files(ckpt, dest)
        assert sorted(os.listdir(dest)) == sorted(NEEDED + [".download"]), os.listdir(dest)
        gets = hub.requests("hub", "GET")
        fetched = sorted(r["path"].rsplit("/", 1)[1] for r in gets)
        assert fetched == sorted(["config.json", "tokenizer.json", "model.safetensors.index.json"]), fetched
        store = hub.requests("store", "GET")
        assert sorted(urllib.parse.unquote(r["path"].split("name=")[1]) for r in store) == [SHARD1, SHARD2]
        for r in hub.requests("hub"):
            assert r["headers"].get("authorization") == f"Bearer {TOKEN}", r
        for r in store:
            assert "authorization" not in r["headers"], f"the token went to the file store: {r}"
        assert "commit " + COMMIT in p.err, p.err
        # progress: stderr is not a terminal, so plain lines, no carriage returns
        assert "\r" not in p.err and f"{SHARD1}:" in p.err and "MB/s" in p.err, p.err
        lines = p.err.splitlines()
        assert len([l for l in lines if l.startswith("  config.json:")]) == 1, p.err     # just "done"
        shard = [l for l in lines if l.startswith(f"  {SHARD1}:")]
        assert 2 <= len(shard) <= 10 and len(set(shard)) == len(shard), p.err

        # a second run: only HEAD requests, nothing downloaded again
        n = len(hub.log)
        p = download(env_for(hub, work, TOKEN), REPO_ID, "--dir", dest)
        assert p.returncode == 0, p.err
        again = hub.log[n:]
        assert again and all(r["method"] == "HEAD" for r in again), again
        assert "already complete" in p.err, p.err

        # a damaged file (same size, no record of a check) is fetched again
        path = os.path.join(dest, SHARD2)
        with open(path, "r+b") as f:
            f.seek(1000)
            f.write(b"\xff\xfe")
        os.unlink(os.path.join(dest, ".download", SHARD2 + ".json"))
        n = len(hub.log)
        p = download(env_for(hub, work, TOKEN), REPO_ID, "--dir", dest)
        assert p.returncode == 0, p.err
        assert [r["method"] for r in hub.log[n:] if r["server"] == "store"] == ["GET"], hub.log[n:]
        same_files(ckpt, dest)

    # no network, but a complete earlier download in the folder: used, with a warning
    p = download(env_for(None, work), REPO_ID, "--dir", dest)
    assert p.returncode == 0 and p.out.strip() == dest, p.err
    assert "warning: cannot reach" in p.err, p.err

    model = os.path.join(work, "model.f32.bin")
    run([PY, os.path.join(SCRIPTS, "convert.py"), dest, model, "--dtype", "f32"])
    prompt = "Instruct: hello\nOutput:"
    got = phi2(model, "-p", prompt, "--temp", "0", "-n", "4").out
    want = phi2(converted(ckpt, "f32"), "-p", prompt, "--temp", "0", "-n", "4").out
    assert got == want and got, (got, want)
    shutil.rmtree(work)


@same_for_every_build
def test_download_renamed_repo_and_tty_progress():
    """A renamed repository (the hub answers with a relative redirect to the new name) still
    yields the large files' hashes; on a terminal, progress is one line redrawn with \r."""
    import pty
    ckpt = ckpt2()
    work = tmpdir("tty")
    dest = os.path.join(work, "dl")
    with Hub(ckpt) as hub:
        master, slave = pty.openpty()
        proc = subprocess.Popen([PY, os.path.join(SCRIPTS, "download.py"), OLD_REPO_ID, "--dir", dest],
                                env=env_for(hub, work), stdout=subprocess.PIPE, stderr=slave)
        os.close(slave)
        chunks = []
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                b = os.read(master, 65536)
            except OSError:         # EIO: the other end is closed
                break
            if not b:
                break
            chunks.append(b)
        os.close(master)
        out, _ = proc.communicate(timeout=30)
        err = b"".join(chunks).decode("utf-8", "replace")
        assert proc.returncode == 0, err
        assert out.decode().strip() == dest
        same_files(ckpt, dest)
        assert f"\r  {SHARD1}: " in err and "MB/s" in err, err
        assert "\x1b[K" in err, err
        heads = [r for r in hub.requests("hub", "HEAD") if SHARD1 in r["path"]]
        assert [r["path"].split("/")[2] for r in heads] == ["old-name", "tiny"], heads
    shutil.rmtree(work)


@same_for_every_build
def test_download_resume_after_cut():
    """A transfer cut after N bytes: with no retries the run fails, keeping N bytes in .part;
    the next run asks for bytes=N- and the store sends only the rest."""
    ckpt = ckpt2()
    work = tmpdir("resume")
    dest = os.path.join(work, "dl")
    size = os.path.getsize(os.path.join(ckpt, SHARD1))
    cut = size // 2 + 12345
    with Hub(ckpt, cut={SHARD1: cut}) as hub:
        env = env_for(hub, work)
        p = download(env, REPO_ID, "--dir", dest, "--retries", "0")
        assert_one_error(p, SHARD1, "run again to resume")
        part = os.path.join(dest, SHARD1 + ".part")
        assert os.path.getsize(part) == cut, (os.path.getsize(part), cut)
        assert not os.path.exists(os.path.join(dest, SHARD1))
        n = len(hub.log)
        p = download(env, REPO_ID, "--dir", dest)
        assert p.returncode == 0, p.err
        gets = [r for r in hub.log[n:] if r["server"] == "store" and SHARD1 in urllib.parse.unquote(r["path"])]
        assert len(gets) == 1, gets
        assert gets[0]["headers"].get("range") == f"bytes={cut}-", gets[0]
        assert gets[0]["from"] == cut and gets[0]["sent"] == size - cut, gets[0]
        same_files(ckpt, dest)
        assert not os.path.exists(part)

    # within one run: the retry continues where the cut was
    dest = os.path.join(work, "dl2")
    with Hub(ckpt, cut={SHARD2: 1000}) as hub:
        p = download(env_for(hub, work), REPO_ID, "--dir", dest, "--retries", "2")
        assert p.returncode == 0, p.err
        assert "retrying" in p.err, p.err
        gets = [r for r in hub.requests("store", "GET") if SHARD2 in urllib.parse.unquote(r["path"])]
        assert [r["headers"].get("range") for r in gets] == [None, "bytes=1000-"], gets
        same_files(ckpt, dest)

    # a server that ignores Range (200 to a Range request): the file starts over, still correct
    dest = os.path.join(work, "dl3")
    with Hub(ckpt, cut={SHARD1: 5000}, ignore_range=True) as hub:
        p = download(env_for(hub, work), REPO_ID, "--dir", dest, "--retries", "1")
        assert p.returncode == 0, p.err
        same_files(ckpt, dest)
    shutil.rmtree(work)


@same_for_every_build
def test_download_interrupt_keeps_part():
    """Ctrl-C during a transfer: exit 130, the .part file is kept, and the next run resumes."""
    ckpt = ckpt2()
    work = tmpdir("sigint")
    dest = os.path.join(work, "dl")
    with Hub(ckpt, stall={SHARD1: 40000}) as hub:
        env = env_for(hub, work)
        # Ctrl-C's default action in the child even where this test runs with SIGINT ignored
        # (a background job of a script: Python then installs no handler of its own)
        proc = subprocess.Popen([PY, os.path.join(SCRIPTS, "download.py"), REPO_ID, "--dir", dest],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        part = os.path.join(dest, SHARD1 + ".part")
        deadline = time.time() + 20
        while time.time() < deadline and not (os.path.isfile(part) and os.path.getsize(part) >= 40000):
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
        err = err.decode()
        assert proc.returncode == 130, (proc.returncode, err)
        assert "interrupted" in err and "Traceback" not in err, err
        assert os.path.getsize(part) == 40000, os.path.getsize(part)
        hub.release.set()
        p = download(env, REPO_ID, "--dir", dest)
        assert p.returncode == 0, p.err
        gets = [r for r in hub.requests("store", "GET") if SHARD1 in urllib.parse.unquote(r["path"])]
        assert gets[-1]["headers"].get("range") == "bytes=40000-", gets[-1]
        same_files(ckpt, dest)
    shutil.rmtree(work)


@same_for_every_build
def test_download_checksum_mismatch():
    """A wrong SHA-256 (large file) or git SHA-1 (small file): one error line naming the
    file, and nothing of it left in the folder."""
    ckpt = ckpt2()
    work = tmpdir("sha")
    for name in (SHARD2, "tokenizer.json"):
        dest = os.path.join(work, name)
        with Hub(ckpt, wrong_sha={name}) as hub:
            p = download(env_for(hub, work), REPO_ID, "--dir", dest)
        assert_one_error(p, name, "checksum mismatch")
        assert not os.path.exists(os.path.join(dest, name)), os.listdir(dest)
        assert not os.path.exists(os.path.join(dest, name + ".part")), os.listdir(dest)
    shutil.rmtree(work)


@same_for_every_build
def test_download_not_found_and_no_network():
    ckpt = ckpt2()
    work = tmpdir("404")
    with Hub(ckpt) as hub:
        env = env_for(hub, work)
        e = assert_one_error(download(env, "nobody/nothing", "--dir", os.path.join(work, "a")), "404",
                             "repository not found", "nobody/nothing")
        e = assert_one_error(download(env, REPO_ID, "--revision", "v9", "--dir", os.path.join(work, "b")),
                             "404", "revision 'v9' not found")
        del hub.files["config.json"]
        e = assert_one_error(download(env, REPO_ID, "--dir", os.path.join(work, "c")), "404", "config.json")
    # nothing listens on port 9 of 127.0.0.1 (discard is not run here): no network
    e = assert_one_error(download(env_for(None, work), REPO_ID, "--dir", os.path.join(work, "d")),
                         "cannot reach")
    assert "127.0.0.1:9" in e, e
    shutil.rmtree(work)


@same_for_every_build
def test_download_token():
    """A private repository: 401 without a token (the error names HF_TOKEN), success with it."""
    ckpt = ckpt2()
    work = tmpdir("token")
    with Hub(ckpt, private=True) as hub:
        assert_one_error(download(env_for(hub, work), REPO_ID, "--dir", os.path.join(work, "a")),
                         "401", "HF_TOKEN")
        assert_one_error(download(env_for(hub, work, "hf_wrong"), REPO_ID, "--dir", os.path.join(work, "b")),
                         "401", "HF_TOKEN")
        p = download(env_for(hub, work, TOKEN), REPO_ID, "--dir", os.path.join(work, "c"))
        assert p.returncode == 0, p.err
        same_files(ckpt, os.path.join(work, "c"))
        # the token file of `huggingface-cli login` (HF_HOME/token) works as well
        env = env_for(hub, work)
        os.makedirs(env["HF_HOME"], exist_ok=True)
        with open(os.path.join(env["HF_HOME"], "token"), "w") as f:
            f.write(TOKEN + "\n")
        p = download(env, REPO_ID, "--dir", os.path.join(work, "d"))
        assert p.returncode == 0, p.err
    shutil.rmtree(work)


def make_hf_cache(ckpt, root):
    """The Hugging Face cache layout: blobs named by hash, snapshot files linking to them."""
    base = os.path.join(root, "models--" + REPO_ID.replace("/", "--"))
    snap = os.path.join(base, "snapshots", COMMIT)
    os.makedirs(os.path.join(base, "blobs"))
    os.makedirs(os.path.join(base, "refs"))
    os.makedirs(snap)
    with open(os.path.join(base, "refs", "main"), "w") as f:
        f.write(COMMIT)
    for n in NEEDED:
        with open(os.path.join(ckpt, n), "rb") as f:
            data = f.read()
        blob = os.path.join(base, "blobs", hashlib.sha256(data).hexdigest())
        with open(blob, "wb") as f:
            f.write(data)
        os.symlink(os.path.relpath(blob, snap), os.path.join(snap, n))
    return snap


@same_for_every_build
def test_download_uses_hf_cache():
    """A complete snapshot in HF_HUB_CACHE (or HF_HOME/hub) is used with no request at all; an
    incomplete one is not."""
    ckpt = ckpt2()
    work = tmpdir("cache")
    cache = os.path.join(work, "cache")
    snap = make_hf_cache(ckpt, cache)
    with Hub(ckpt) as hub:
        env = env_for(hub, work)
        env["HF_HUB_CACHE"] = cache
        p = download(env, REPO_ID, "--dir", os.path.join(work, "dl"))
        assert p.returncode == 0, p.err
        assert p.out.strip() == snap, (p.out, snap)
        assert hub.log == [], hub.log
        assert not os.path.exists(os.path.join(work, "dl"))
        # by commit hash as the revision, and through HF_HOME/hub
        env = env_for(hub, work)
        shutil.move(cache, os.path.join(env["HF_HOME"], "hub"))
        p = download(env, REPO_ID, "--revision", COMMIT, "--dir", os.path.join(work, "dl"))
        assert p.returncode == 0 and hub.log == [], (p.err, hub.log)
        # a snapshot with a shard missing is not enough: the files are fetched
        os.unlink(os.path.join(env["HF_HOME"], "hub", os.path.relpath(snap, cache), SHARD2))
        p = download(env, REPO_ID, "--dir", os.path.join(work, "dl"))
        assert p.returncode == 0, p.err
        assert p.out.strip() == os.path.join(work, "dl") and hub.requests("store"), p.out
    shutil.rmtree(work)


def test_run_sh_one_command():
    """scripts/run.sh from nothing to an answer: says what it downloads and where, fetches,
    converts, runs; the second time it only runs."""
    ckpt = ckpt2()
    work = tmpdir("runsh")
    model = os.path.join(work, "m.q8.bin")
    dest = os.path.join(work, "ckpt")
    with Hub(ckpt) as hub:
        env = env_for(hub, work)
        env["PHI2_BIN"] = os.path.abspath(PHI2)
        env["PHI2_MODEL"] = model
        cmd = ["bash", os.path.join(REPO, "scripts", "run.sh"), "--repo", REPO_ID, "--dir", dest,
               "-p", "Alice: hi\nBob:", "--temp", "0", "-n", "4"]
        p = subprocess.run(cmd, capture_output=True, timeout=120, env=env)
        err = p.stderr.decode()
        assert p.returncode == 0, err
        assert f"downloading {REPO_ID} into {dest}, then converting to {model}" in err, err
        assert err.index("downloading") < err.index("download: "), err
        assert os.path.isfile(model)
        want = phi2(converted(ckpt, "q8"), "-p", "Alice: hi\nBob:", "--temp", "0", "-n", "4").out
        assert p.stdout.decode() == want, (p.stdout, want)
        n = len(hub.log)
        p = subprocess.run(cmd, capture_output=True, timeout=60, env=env)
        assert p.returncode == 0 and p.stdout.decode() == want, p.stderr.decode()
        assert len(hub.log) == n and "downloading" not in p.stderr.decode()
    shutil.rmtree(work)


def test_run_sh_selfcheck_for_phi2():
    """For microsoft/phi-2, run.sh says the download size up front and runs selfcheck.py after
    converting; the synthetic weights served under that name fail it, which is reported
    without deleting the model, and the prompt still runs."""
    ckpt = ckpt2()
    work = tmpdir("runsh-phi2")
    model = os.path.join(work, "m.f32.bin")
    dest = os.path.join(work, "phi-2")
    with Hub(ckpt, repo="microsoft/phi-2") as hub:
        env = env_for(hub, work)
        env["PHI2_BIN"] = os.path.abspath(PHI2)
        cmd = ["bash", os.path.join(REPO, "scripts", "run.sh"), "--dtype", "f32", "--model", model,
               "--dir", dest, "--temp", "0", "-n", "3"]
        p = subprocess.run(cmd, capture_output=True, timeout=120, env=env)
        err = p.stderr.decode()
        assert p.returncode == 0, err
        assert f"downloading microsoft/phi-2 (5.6 GB) into {dest}, then converting to {model} (11.1 GB)" in err, err
        assert "max |diff| vs published logits" in err and "selfcheck FAILED" in err, err
        assert os.path.isfile(model)
        assert p.stdout.decode().startswith("Instruct: Write a haiku about caches.\nOutput:"), p.stdout
    shutil.rmtree(work)


@same_for_every_build
def test_download_disk_full():
    """A full disk: found up front (free space below what is left to fetch), or while writing
    (ENOSPC): one error line naming the .part file, which is kept for a later resume."""
    import builtins
    import contextlib
    import errno
    import importlib.util
    import io
    import sys
    spec = importlib.util.spec_from_file_location("download_under_test", os.path.join(SCRIPTS, "download.py"))
    dl = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dl)
    ckpt = ckpt2()
    work = tmpdir("full-disk")

    def call(dest, patch):
        err = io.StringIO()
        saved = dict(os.environ), sys.argv
        try:
            os.environ.clear()
            os.environ.update(env_for(hub, work))
            sys.argv = ["download.py", REPO_ID, "--dir", dest, "--retries", "0"]
            with patch, contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                try:
                    dl.main()
                except SystemExit as e:
                    code = e.code
        finally:
            os.environ.clear()
            os.environ.update(saved[0])
            sys.argv = saved[1]
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        p = subprocess.CompletedProcess([], code)
        p.err = err.getvalue()
        return p

    class Usage:
        free = 2_000_000

    class FullFile(io.FileIO):
        """Writes to a .part file fail with ENOSPC once 20,000 bytes are in it."""
        def write(self, b):
            room = 20000 - self.tell()
            if len(b) > room:
                super().write(bytes(b[:room]))
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write(b)

    real_open = builtins.open

    def fake_open(path, mode="r", *a, **k):
        if str(path).endswith(SHARD1 + ".part") and "b" in mode and ("a" in mode or "w" in mode):
            return FullFile(path, mode.replace("b", ""))
        return real_open(path, mode, *a, **k)

    import unittest.mock as mock
    with Hub(ckpt) as hub:
        p = call(os.path.join(work, "a"), mock.patch.object(dl.shutil, "disk_usage", lambda d: Usage()))
        assert_one_error(p, "not enough disk space", SHARD1 + ".part", "2.00 MB free")
        p = call(os.path.join(work, "b"), mock.patch.object(builtins, "open", fake_open))
        assert_one_error(p, "disk full", SHARD1 + ".part", "run again to resume")
        part = os.path.join(work, "b", SHARD1 + ".part")
        assert os.path.isfile(part) and os.path.getsize(part) == 20000, part
        # with space again, the next run completes from there
        p = download(env_for(hub, work), REPO_ID, "--dir", os.path.join(work, "b"))
        assert p.returncode == 0, p.err
        same_files(ckpt, os.path.join(work, "b"))
    shutil.rmtree(work)
