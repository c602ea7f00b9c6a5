#!/usr/bin/env python3
"""Fetch the files of a Hugging Face model repository that scripts/convert.py reads.

usage: download.py REPO_ID [--revision main] [--dir DIR] [--retries N] [--quiet]

Fetches config.json, tokenizer.json and model.safetensors.index.json with every shard it
names (or a single model.safetensors) into DIR (default: ./NAME for REPO_ID ORG/NAME), and
prints the folder to convert on stdout. Python standard library only.

- Where from: {HF_ENDPOINT}/{REPO_ID}/resolve/{REVISION}/{FILE} (HF_ENDPOINT defaults to
  https://huggingface.co; set it for a mirror), following the hub's redirect to its file
  store. HF_TOKEN (else the token file of `huggingface-cli login`: HF_TOKEN_PATH, or
  HF_HOME/token) is sent as "Authorization: Bearer", to the endpoint's host only.
- Reuse: an existing Hugging Face cache snapshot (HF_HUB_CACHE, else HF_HOME/hub, else
  ~/.cache/huggingface/hub: models--ORG--NAME/refs/REVISION -> snapshots/COMMIT/) that holds
  every needed file is used as it is, without any request. Files already complete in DIR
  are not fetched again (their size is checked, and their hash unless a record in
  DIR/.download/ says it was checked before).
- Resumable: a file downloads into FILE.part and is renamed when complete; a broken
  connection is retried (--retries, default 5) and a new run continues, with an HTTP
  Range request, from the bytes already there.
- Verified: large (LFS) files against the SHA-256 of the X-Linked-Etag header, small files
  against their git blob SHA-1 (the ETag header), every file against its size. A mismatch
  is an error naming the file, and the file is deleted.
- Progress on stderr: one updating line (bytes, MB/s, ETA) on a terminal, otherwise a line
  about every 10%.

Errors are one line on stderr, "error: ...", exit status 1 (130 for Ctrl-C, which keeps
the .part file for the next run).
"""
import argparse
import errno
import hashlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

DEFAULT_ENDPOINT = "https://huggingface.co"
CHUNK = 1 << 20
TIMEOUT = 60            # seconds without data before a connection counts as broken
MAX_REDIRECTS = 5
USER_AGENT = "phi2.c-download/1"


class DownloadError(Exception):
    """Ends the download with one error line."""


class HubError(DownloadError):
    """An HTTP error status from the hub, as one line."""

    def __init__(self, code, msg):
        super().__init__(msg)
        self.code = code


class Retryable(Exception):
    """A broken transfer: the next attempt continues from the bytes written so far."""


# ---------------------------------------------------------------- settings

def endpoint():
    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or DEFAULT_ENDPOINT


def hf_home():
    return os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")


def hub_cache():
    return os.environ.get("HF_HUB_CACHE") or os.path.join(hf_home(), "hub")


def token():
    """HF_TOKEN, else the file `huggingface-cli login` writes; None when neither is set."""
    t = os.environ.get("HF_TOKEN", "").strip()
    if t:
        return t
    path = os.environ.get("HF_TOKEN_PATH") or os.path.join(hf_home(), "token")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip() or None
    except OSError:
        return None


# ---------------------------------------------------------------- the files conversion needs

def weight_files(index_path):
    """The shard names of a model.safetensors.index.json (plain file names only)."""
    try:
        with open(index_path, encoding="utf-8") as f:
            wm = json.load(f)["weight_map"]
        names = sorted(set(wm.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise DownloadError(f"{index_path}: cannot parse: {type(e).__name__}: {str(e)[:200]}")
    for n in names:
        if not isinstance(n, str) or not n or os.path.basename(n) != n or n in (".", ".."):
            raise DownloadError(f"{index_path}: shard name {n!r} is not a plain file name")
    return names


def complete_folder(d):
    """True when d holds every file conversion needs (sizes are not checked)."""
    if not all(os.path.isfile(os.path.join(d, f)) for f in ("config.json", "tokenizer.json")):
        return False
    index = os.path.join(d, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            return all(os.path.isfile(os.path.join(d, n)) for n in weight_files(index))
        except DownloadError:
            return False
    return os.path.isfile(os.path.join(d, "model.safetensors"))


def cached_snapshot(repo, revision):
    """The Hugging Face cache's snapshot folder of repo@revision if it is complete, else None."""
    base = os.path.join(hub_cache(), "models--" + repo.replace("/", "--"))
    if re.fullmatch(r"[0-9a-f]{40}", revision):
        commit = revision
    else:
        try:
            with open(os.path.join(base, "refs", revision), encoding="utf-8") as f:
                commit = f.read().strip()
        except (OSError, ValueError):
            return None
        if not re.fullmatch(r"[0-9a-f]{40}", commit):
            return None
    snap = os.path.join(base, "snapshots", commit)
    return snap if complete_folder(snap) else None


# ---------------------------------------------------------------- HTTP

class NoRedirect(urllib.request.HTTPRedirectHandler):
    """Redirects are followed by hand, so that the token never leaves the endpoint's host."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


OPENER = urllib.request.build_opener(NoRedirect)


def describe_http_error(e, repo, revision, name):
    code = e.code
    kind = (e.headers.get("X-Error-Code") or "") if e.headers else ""
    where = f"{repo}@{revision}: {name}"
    if code == 401:
        return (f"{where}: 401 Unauthorized: the repository is private or gated, or does not "
                f"exist; set HF_TOKEN to an access token (https://huggingface.co/settings/tokens)"
                + (" (the one given was refused)" if token() else ""))
    if code == 403:
        return (f"{where}: 403 Forbidden: the token has no access to this repository; for a gated "
                f"repository, accept its conditions on its page, with the account of HF_TOKEN")
    if code == 404:
        what = {"RepoNotFound": "repository not found", "RevisionNotFound": f"revision {revision!r} not found",
                "EntryNotFound": "file not found in the repository"}.get(
                    kind, "not found (no such repository, revision or file)")
        return f"{where}: 404 {what}"
    if code == 416:
        return f"{where}: 416 the server refused the byte range"
    return f"{where}: HTTP {code} {e.reason}"


def request(url, headers, method="GET", follow=True):
    """Open url; follow redirects by hand (the Authorization header only to the endpoint's host;
    follow="relative": only redirects within the hub, as for a renamed repository, so that a
    large file's redirect to the file store is returned with its headers).
    Returns (response, final url). HTTP errors are raised as urllib.error.HTTPError."""
    host = urllib.parse.urlsplit(endpoint()).netloc
    for _ in range(MAX_REDIRECTS + 1):
        h = dict(headers)
        if urllib.parse.urlsplit(url).netloc != host:
            h.pop("Authorization", None)
        req = urllib.request.Request(url, headers=h, method=method)
        try:
            resp = OPENER.open(req, timeout=TIMEOUT)
        except urllib.error.HTTPError as e:
            if e.code in (301, 302, 303, 307, 308) and e.headers.get("Location"):
                if not follow or (follow == "relative"
                                  and urllib.parse.urlsplit(e.headers["Location"]).netloc):
                    return e, url
                url = urllib.parse.urljoin(url, e.headers["Location"])
                e.close()
                continue
            raise
        return resp, url
    raise DownloadError(f"{url}: more than {MAX_REDIRECTS} redirects")


def metadata(repo, revision, name, auth):
    """What the hub says of a file before sending it: (size or None, ("sha256"|"sha1", hex) or
    None, the url to fetch it from, commit or None). A HEAD request, without following the
    redirect of a large file (the redirect itself carries X-Linked-Size and X-Linked-Etag)."""
    url = (f"{endpoint()}/{urllib.parse.quote(repo)}/resolve/"
           f"{urllib.parse.quote(revision, safe='')}/{urllib.parse.quote(name)}")
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if auth:
        headers["Authorization"] = f"Bearer {auth}"
    resp, url = request(url, headers, method="HEAD", follow="relative")
    try:
        hd = resp.headers
        size = hd.get("X-Linked-Size") or hd.get("Content-Length")
        size = int(size) if size and size.isdigit() else None
        digest = None
        linked = (hd.get("X-Linked-Etag") or "").strip()
        etag = (hd.get("ETag") or "").strip()
        if linked:
            h = linked.removeprefix("W/").strip('"').lower()
            if re.fullmatch(r"[0-9a-f]{64}", h):
                digest = ("sha256", h)
        elif etag:
            h = etag.removeprefix("W/").strip('"').lower()
            if re.fullmatch(r"[0-9a-f]{64}", h):
                digest = ("sha256", h)
            elif re.fullmatch(r"[0-9a-f]{40}", h):
                digest = ("sha1", h)
        target = url
        if resp.status in (301, 302, 303, 307, 308) and hd.get("Location"):
            target = urllib.parse.urljoin(url, hd["Location"])
        return size, digest, target, hd.get("X-Repo-Commit")
    finally:
        resp.close()


# ---------------------------------------------------------------- progress

def human(n):
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"


class Progress:
    def __init__(self, name, total, start, quiet):
        self.name, self.total, self.start = name, total, start
        self.tty = sys.stderr.isatty() and not quiet
        self.quiet = quiet
        self.t0 = time.monotonic()
        self.last_draw = 0.0
        self.next_step = 1
        self.done = start

    def update(self, done):
        self.done = done
        now = time.monotonic()
        if self.tty:
            if now - self.last_draw >= 0.2:
                self.last_draw = now
                sys.stderr.write("\r" + self.line(now) + "\x1b[K")
                sys.stderr.flush()
        elif not self.quiet and self.total:
            step = done * 10 // self.total      # one line per tenth passed; 100% is the "done" line
            if self.next_step <= step < 10:
                self.next_step = step + 1
                print(self.line(now), file=sys.stderr, flush=True)

    def line(self, now):
        dt = max(now - self.t0, 1e-6)
        rate = (self.done - self.start) / dt
        s = f"  {self.name}: {human(self.done)}"
        if self.total:
            s += f" / {human(self.total)} ({100 * self.done // max(self.total, 1)}%)"
        s += f", {rate / 1e6:.1f} MB/s"
        if self.total and rate > 0:
            eta = int((self.total - self.done) / rate)
            s += f", ETA {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}"
        return s

    def finish(self, note):
        if self.quiet:
            return
        dt = time.monotonic() - self.t0
        rate = (self.done - self.start) / max(dt, 1e-6)
        msg = f"  {self.name}: {human(self.done)} in {dt:.1f}s ({rate / 1e6:.1f} MB/s), {note}"
        sys.stderr.write(("\r" + msg + "\x1b[K\n") if self.tty else msg + "\n")
        sys.stderr.flush()


# ---------------------------------------------------------------- one file

def file_digest(path, kind, prefix_size=None):
    h = hashlib.sha256() if kind == "sha256" else hashlib.sha1()
    if kind == "sha1":
        h.update(b"blob %d\0" % (prefix_size if prefix_size is not None else os.path.getsize(path)))
    with open(path, "rb") as f:
        while True:
            b = f.read(CHUNK)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def record_path(folder, name):
    return os.path.join(folder, ".download", name + ".json")


def recorded_ok(folder, name, size, digest):
    """True when DIR/.download/NAME.json says this very file (size, mtime) was verified."""
    path = os.path.join(folder, name)
    try:
        with open(record_path(folder, name), encoding="utf-8") as f:
            rec = json.load(f)
        st = os.stat(path)
    except (OSError, ValueError):
        return False
    return (rec.get("size") == st.st_size and rec.get("mtime_ns") == st.st_mtime_ns
            and (size is None or st.st_size == size)
            and (digest is None or rec.get("digest") == list(digest)))


def write_record(folder, name, digest):
    st = os.stat(os.path.join(folder, name))
    os.makedirs(os.path.join(folder, ".download"), exist_ok=True)
    with open(record_path(folder, name), "w", encoding="utf-8") as f:
        json.dump({"size": st.st_size, "mtime_ns": st.st_mtime_ns,
                   "digest": list(digest) if digest else None}, f)


def fetch_file(repo, revision, name, folder, auth, retries, quiet, state):
    """Make folder/name complete and verified. Returns True when a hash was checked."""
    try:
        return fetch_file_inner(repo, revision, name, folder, auth, retries, quiet, state)
    except urllib.error.HTTPError as e:
        raise HubError(e.code, describe_http_error(e, repo, revision, name))


def fetch_file_inner(repo, revision, name, folder, auth, retries, quiet, state):
    size, digest, url, commit = metadata(repo, revision, name, auth)
    if commit:
        state["commit"] = commit
    final = os.path.join(folder, name)
    part = final + ".part"

    if os.path.isfile(final):
        have = os.path.getsize(final)
        if (size is None or have == size) and recorded_ok(folder, name, size, digest):
            if not quiet:
                print(f"  {name}: already complete ({human(have)})", file=sys.stderr)
            return digest is not None
        if size is None or have == size:
            if digest is None or file_digest(final, digest[0]) == digest[1]:
                write_record(folder, name, digest)
                if not quiet:
                    print(f"  {name}: already complete ({human(have)})", file=sys.stderr)
                return digest is not None
        os.unlink(final)        # a different or damaged file: fetch it again

    have = os.path.getsize(part) if os.path.isfile(part) else 0
    if size is not None and have > size:
        os.unlink(part)
        have = 0
    need = (size - have) if size is not None else 0
    free = shutil.disk_usage(folder).free
    if need > free:
        raise DownloadError(f"{part}: not enough disk space: {human(need)} to fetch, {human(free)} free")

    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if auth:
        headers["Authorization"] = f"Bearer {auth}"
    attempt = 0
    while True:
        try:
            transfer(url, headers, part, size, name, quiet)
            break
        except Retryable as e:
            attempt += 1
            if attempt > retries:
                got = os.path.getsize(part) if os.path.isfile(part) else 0
                raise DownloadError(f"{name}: {e}; {human(got)} kept in {part}: run again to resume")
            wait = min(2 ** (attempt - 1), 30)
            print(f"  {name}: {e}; retrying in {wait}s ({attempt}/{retries})", file=sys.stderr)
            time.sleep(wait)

    got = os.path.getsize(part)
    if size is not None and got != size:
        os.unlink(part)
        raise DownloadError(f"{name}: size mismatch: got {got} bytes, the hub says {size}; deleted")
    if digest is not None:
        h = file_digest(part, digest[0], got)
        if h != digest[1]:
            os.unlink(part)
            raise DownloadError(f"{name}: checksum mismatch: {digest[0]} {h}, expected {digest[1]}; "
                                f"the file was deleted")
    os.replace(part, final)
    write_record(folder, name, digest)
    return digest is not None


def transfer(url, headers, part, size, name, quiet):
    """Append to part from where it stops; Retryable on a broken connection."""
    have = os.path.getsize(part) if os.path.isfile(part) else 0
    if size is not None and have == size:
        return
    h = dict(headers)
    if have:
        h["Range"] = f"bytes={have}-"
    try:
        resp, _ = request(url, h)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:      # the range starts at or past the end: start over
            os.unlink(part)
            raise Retryable("the server refused to resume (416)")
        if 500 <= e.code < 600:
            raise Retryable(f"HTTP {e.code} {e.reason}")
        raise
    except (urllib.error.URLError, socket.timeout, ConnectionError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", e)
        if isinstance(reason, OSError) and not isinstance(reason, (socket.timeout, ConnectionError)):
            raise       # name resolution, refused connection: no network, reported by main()
        raise Retryable(f"connection failed: {reason}")
    with resp:
        mode = "ab"
        if have and resp.status == 206:
            m = re.match(r"bytes (\d+)-", resp.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != have:
                raise DownloadError(f"{name}: the server resumed at the wrong offset "
                                    f"({resp.headers.get('Content-Range')!r}, asked for {have})")
        elif have:
            mode, have = "wb", 0        # a 200 to a Range request: the whole file, from the start
        if size is None:
            n = resp.headers.get("Content-Length")
            if n and n.isdigit():
                size = have + int(n)
        prog = Progress(name, size, have, quiet)
        done = have
        with open(part, mode) as f:
            try:
                while True:
                    b = resp.read1(CHUNK)     # what has arrived: a stall still saves it
                    if not b:
                        break
                    f.write(b)
                    done += len(b)
                    prog.update(done)
            except (socket.timeout, ConnectionError, http.client.HTTPException) as e:
                f.flush()
                prog.finish("interrupted")
                raise Retryable(f"connection broken after {human(done)} "
                                f"({type(e).__name__})")
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    raise DownloadError(f"{part}: disk full; free some space and run again to resume")
                raise
            except KeyboardInterrupt:
                f.flush()
                if not quiet and prog.tty:
                    sys.stderr.write("\n")
                raise
        if size is not None and done < size:
            prog.finish("interrupted")
            raise Retryable(f"connection closed after {human(done)} of {human(size)}")
        prog.finish("done")


# ---------------------------------------------------------------- the whole repository

def fetch_all(repo, revision, folder, auth, retries, quiet, state):
    """Every file conversion needs; returns (all hashes verified, the file names)."""
    verified = True
    names = ["config.json", "tokenizer.json"]
    for name in names:
        verified &= fetch_file(repo, revision, name, folder, auth, retries, quiet, state)
    try:
        verified &= fetch_file(repo, revision, "model.safetensors.index.json", folder, auth, retries,
                               quiet, state)
        names.append("model.safetensors.index.json")
        shards = weight_files(os.path.join(folder, "model.safetensors.index.json"))
    except HubError as e:
        if e.code != 404:
            raise
        shards = ["model.safetensors"]
    for name in shards:
        verified &= fetch_file(repo, revision, name, folder, auth, retries, quiet, state)
    return verified, names + shards


def offline_ok(folder, repo, revision):
    """True when folder holds a complete download of repo@revision, unchanged since it was made."""
    try:
        with open(os.path.join(folder, ".download", "complete.json"), encoding="utf-8") as f:
            rec = json.load(f)
        return (rec["repo"] == repo and rec["revision"] == revision
                and all(recorded_ok(folder, n, None, None) for n in rec["files"]))
    except (OSError, ValueError, KeyError, TypeError):
        return False


def download(repo, revision, folder, retries=5, quiet=False):
    """Returns (the folder to convert, True when every file's hash was verified)."""
    snap = cached_snapshot(repo, revision)
    if snap:
        if not quiet:
            print(f"download: {repo}@{revision}: using the Hugging Face cache {snap}", file=sys.stderr)
        return snap, False
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise DownloadError(f"{folder}: cannot create the folder: {e.strerror}")
    auth = token()
    state = {}
    if not quiet:
        print(f"download: {repo}@{revision} from {endpoint()} into {folder}", file=sys.stderr)
    try:
        verified, names = fetch_all(repo, revision, folder, auth, retries, quiet, state)
    except urllib.error.URLError as e:
        if isinstance(e, urllib.error.HTTPError) or not offline_ok(folder, repo, revision):
            raise
        print(f"download: warning: cannot reach {endpoint()} ({e.reason}); using the complete "
              f"download already in {folder}", file=sys.stderr)
        return folder, False
    with open(os.path.join(folder, ".download", "complete.json"), "w", encoding="utf-8") as f:
        json.dump({"repo": repo, "revision": revision, "commit": state.get("commit"),
                   "files": names, "verified": verified}, f)
    if not quiet:
        rev = f" (commit {state['commit']})" if state.get("commit") else ""
        print(f"download: {repo}@{revision}{rev}: complete in {folder}"
              + ("" if verified else "; not every file could be checked: the server sent no hash"),
              file=sys.stderr)
    return folder, verified


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("repo", help="ORG/NAME, e.g. microsoft/phi-2")
    ap.add_argument("--revision", default="main", help="branch, tag or commit (default main)")
    ap.add_argument("--dir", help="download folder (default ./NAME)")
    ap.add_argument("--retries", type=int, default=5, help="retries of a broken transfer (default 5)")
    ap.add_argument("--quiet", action="store_true", help="no progress lines")
    args = ap.parse_args()
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", args.repo) or ".." in args.repo:
        print(f"error: {args.repo!r} is not a repository id (ORG/NAME, e.g. microsoft/phi-2)", file=sys.stderr)
        sys.exit(1)
    folder = args.dir or args.repo.split("/")[1]

    def on_term(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)

    try:
        out, verified = download(args.repo, args.revision, folder, args.retries, args.quiet)
        print(out)
        sys.exit(0)
    except DownloadError as e:
        msg = str(e)
    except urllib.error.URLError as e:
        msg = f"cannot reach {endpoint()}: {getattr(e.reason, 'strerror', None) or e.reason} (no network? set HF_ENDPOINT for a mirror)"
    except (socket.timeout, ConnectionError, http.client.HTTPException) as e:
        msg = f"connection to {endpoint()} failed: {type(e).__name__}: {e}"
    except KeyboardInterrupt:
        print("\nerror: interrupted; partial files (*.part) are kept: run again to resume", file=sys.stderr)
        sys.exit(130)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            msg = f"{e.filename or folder}: disk full; free some space and run again to resume"
        else:
            msg = f"{e.filename or folder}: {e.strerror or e}"
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
    main()
