"""A tiny local stand-in for the Hugging Face Hub, for tests (stdlib only).

It serves local directories as model repos and speaks just enough of the Hub's
HTTP API for huggingface_hub 2.4 (read from its source):

- ``GET /api/models/{repo}`` and ``/api/models/{repo}/revision/{rev}``
  (``HfApi.model_info``; with ``?blobs=True`` siblings carry size/blobId/lfs),
- ``GET /api/models/{repo}/tree/{rev}[/{path}]`` (``HfApi.list_repo_tree``,
  a single page: no ``Link`` header),
- ``HEAD``/``GET /{repo}/resolve/{rev}/{file}`` (``hf_hub_download``): 200 with
  ``X-Repo-Commit``, a quoted ``ETag``, ``Content-Length`` and
  ``Accept-Ranges``; ``Range: bytes=a-[b]`` gives 206 + ``Content-Range``.
  LFS-like files (``*.safetensors``, ``*.bin``...) instead get, like on the
  Hub, a 302 carrying ``X-Linked-Etag``/``X-Linked-Size``/``X-Repo-Commit`` to
  ``http://localhost:{port}/cdn/...`` (another origin, so huggingface_hub stops
  at the 302, drops auth and GETs the "CDN"); ``hub.lfs_redirect = False``
  serves them directly.
  No ``X-Xet-*`` headers and no ``Link: ...xet-auth`` are ever sent, so
  huggingface_hub takes its plain-HTTP path.
- Errors are 404s with the ``X-Error-Code`` huggingface_hub maps to its
  exceptions: ``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``.

Fault injection: ``hub.cut(name, after_bytes, times=1)`` makes the next
``times`` GETs of ``name`` send ``after_bytes`` of the body (while announcing
the full length) and then drop the connection. ``hub.served[name]`` counts the
body bytes actually sent, ``hub.gets[name]`` lists each GET's Range header,
``hub.requests`` logs ``(method, path)`` of every request.

The ``fake_hub`` pytest fixture starts a server on 127.0.0.1:0, points
huggingface_hub at it (env *and* the already-imported ``constants``), turns
off xet, telemetry and offline mode, isolates the HF cache, and stops it after.
"""
from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

LFS_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".gguf")


@dataclass
class FakeRepo:
    """One served repo: a directory, its commit sha and the refs that name it."""

    root: Path
    commit: str
    refs: set[str] = field(default_factory=set)
    _meta: dict[str, dict] = field(default_factory=dict)

    def files(self) -> list[str]:
        return sorted(p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file())

    def meta(self, name: str) -> dict:
        """Size, git blob id and (for LFS-like files) sha256 of one file, cached."""
        if name not in self._meta:
            data = (self.root / name).read_bytes()
            blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
            lfs = hashlib.sha256(data).hexdigest() if name.endswith(LFS_SUFFIXES) else None
            self._meta[name] = {"size": len(data), "blob": blob, "sha256": lfs}
        return self._meta[name]

    def etag(self, name: str) -> str:
        m = self.meta(name)
        return m["sha256"] or m["blob"]


class FakeHub:
    """A threaded HTTP server serving FakeRepos; see the module docstring."""

    def __init__(self) -> None:
        self.repos: dict[str, FakeRepo] = {}
        self.lfs_redirect = True  # LFS-like files answer /resolve with a 302 to a "CDN", as the Hub does
        self.served: Counter[str] = Counter()
        self.gets: dict[str, list[str | None]] = defaultdict(list)
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, in order
        self._cuts: dict[str, list[int]] = {}
        self._lock = threading.Lock()
        self._conns: set = set()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,), daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def add_repo(self, repo_id: str, root: Path, refs: tuple[str, ...] = ("main",)) -> str:
        """Serve directory ``root`` as ``repo_id``; returns its (fake, stable) commit sha."""
        commit = hashlib.sha1(repo_id.encode()).hexdigest()
        self.repos[repo_id] = FakeRepo(Path(root), commit, set(refs) | {commit})
        return commit

    def cut(self, name: str, after_bytes: int, times: int = 1) -> None:
        """Drop the connection after ``after_bytes`` body bytes, for the next ``times`` GETs of ``name``."""
        with self._lock:
            self._cuts[name] = [after_bytes, times]

    def reset_counters(self) -> None:
        with self._lock:
            self.served.clear()
            self.gets.clear()
            self.requests.clear()

    def start(self) -> FakeHub:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and drop open keep-alive connections, so clients see a dead server."""
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(timeout=5)

    def _take_cut(self, name: str) -> int | None:
        with self._lock:
            cut = self._cuts.get(name)
            if not cut or cut[1] <= 0:
                return None
            cut[1] -= 1
            return cut[0]

    def _count(self, name: str, n: int) -> None:
        with self._lock:
            self.served[name] += n


_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


def _make_handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body are separate writes: avoid 40 ms stalls

        def log_message(self, *args) -> None:  # keep test output clean
            pass

        def setup(self) -> None:
            super().setup()
            with hub._lock:
                hub._conns.add(self.connection)

        def finish(self) -> None:
            with hub._lock:
                hub._conns.discard(self.connection)
            super().finish()

        # -- plumbing -----------------------------------------------------
        def _send(self, code: int, body: bytes = b"", headers: dict | None = None) -> None:
            self.send_response(code)
            for k, v in (headers or {}).items():
                self.send_header(k, str(v))
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _error(self, code_name: str, msg: str, extra: dict | None = None) -> None:
            body = json.dumps({"error": msg}).encode()
            headers = {"X-Error-Code": code_name, "X-Error-Message": msg, "Content-Type": "application/json"}
            self._send(404, body, {**headers, **(extra or {})})

        def _repo(self, repo_id: str, rev: str) -> FakeRepo | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error("RepoNotFound", "Repository not found")
                return None
            if rev not in repo.refs:
                self._error("RevisionNotFound", f"Invalid rev id: {rev}")
                return None
            return repo

        # -- routes -------------------------------------------------------
        def do_GET(self) -> None:
            self._route()

        def do_HEAD(self) -> None:
            self._route()

        def _route(self) -> None:
            url = urlsplit(self.path)
            with hub._lock:
                hub.requests.append((self.command, url.path))
            parts = [unquote(p) for p in url.path.split("/")]
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            if parts[1:3] == ["api", "models"] and len(parts) >= 5:
                repo_id, rest = "/".join(parts[3:5]), parts[5:]
                if not rest:
                    return self._info(repo_id, "main", query)
                if rest[0] == "revision" and len(rest) == 2:
                    return self._info(repo_id, rest[1], query)
                if rest[0] == "tree" and len(rest) >= 2:
                    return self._tree(repo_id, rest[1], "/".join(rest[2:]))
            elif len(parts) >= 6 and parts[3] == "resolve":
                return self._resolve("/".join(parts[1:3]), parts[4], "/".join(parts[5:]))
            elif len(parts) >= 6 and parts[1] == "cdn":  # where LFS files redirect to
                repo = hub.repos.get("/".join(parts[2:4]))
                if repo is not None and (repo.root / "/".join(parts[5:])).is_file():
                    return self._body(repo, "/".join(parts[5:]))
            self._send(404, b"not found")

        def _info(self, repo_id: str, rev: str, query: dict) -> None:
            repo = self._repo(repo_id, rev)
            if repo is None:
                return
            blobs = query.get("blobs", "").lower() == "true"
            siblings = []
            for name in repo.files():
                sib: dict = {"rfilename": name}
                if blobs:
                    m = repo.meta(name)
                    sib.update(size=m["size"], blobId=m["blob"])
                    if m["sha256"]:
                        sib["lfs"] = {"size": m["size"], "sha256": m["sha256"], "pointerSize": 134}
                siblings.append(sib)
            info = {"_id": repo.commit[:24], "id": repo_id, "modelId": repo_id, "sha": repo.commit,
                    "private": False, "gated": False, "disabled": False, "siblings": siblings}
            self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"})

        def _tree(self, repo_id: str, rev: str, sub: str) -> None:
            repo = self._repo(repo_id, rev)
            if repo is None:
                return
            entries = []
            for name in repo.files():
                if sub and not name.startswith(sub.rstrip("/") + "/"):
                    continue
                m = repo.meta(name)
                e: dict = {"type": "file", "oid": m["blob"], "size": m["size"], "path": name}
                if m["sha256"]:
                    e["lfs"] = {"oid": m["sha256"], "size": m["size"], "pointerSize": 134}
                entries.append(e)
            self._send(200, json.dumps(entries).encode(), {"Content-Type": "application/json"})

        def _resolve(self, repo_id: str, rev: str, name: str) -> None:
            repo = self._repo(repo_id, rev)
            if repo is None:
                return
            if not (repo.root / name).is_file():
                return self._error("EntryNotFound", f"{name} does not exist", {"X-Repo-Commit": repo.commit})
            if hub.lfs_redirect and repo.meta(name)["sha256"]:
                # Like the Hub: LFS files redirect to a CDN (another origin: localhost vs 127.0.0.1)
                # and the metadata travels in X-Linked-* headers of the 302.
                port = self.server.server_address[1]
                self._send(302, b"", {
                    "Location": f"http://localhost:{port}/cdn/{repo_id}/{repo.commit}/{name}",
                    "X-Repo-Commit": repo.commit, "X-Linked-Etag": f'"{repo.etag(name)}"',
                    "X-Linked-Size": repo.meta(name)["size"], "ETag": f'"{repo.meta(name)["blob"]}"'})
                return
            self._body(repo, name)

        def _body(self, repo: FakeRepo, name: str) -> None:
            size = repo.meta(name)["size"]
            start, end = 0, size - 1
            rng = self.headers.get("Range")
            if self.command == "GET":
                with hub._lock:
                    hub.gets[name].append(rng)
            m = _RANGE.match(rng or "")
            if m:
                start, end = int(m[1]), int(m[2]) if m[2] else size - 1
                end = min(end, size - 1)
            self.send_response(206 if m else 200)
            self.send_header("X-Repo-Commit", repo.commit)
            self.send_header("ETag", f'"{repo.etag(name)}"')
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(end - start + 1))
            if m:
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.end_headers()
            if self.command == "HEAD":
                return
            cut = hub._take_cut(name)
            with open(repo.root / name, "rb") as f:
                f.seek(start)
                todo = end - start + 1 if cut is None else min(cut, end - start + 1)
                while todo > 0:
                    chunk = f.read(min(todo, 64 * 1024))
                    if not chunk:
                        break
                    hub._count(name, len(chunk))  # before the write: the client may check as soon as it has it
                    self.wfile.write(chunk)
                    todo -= len(chunk)
            if cut is not None:
                self.wfile.flush()
                self.close_connection = True  # the server then closes the socket: a truncated body

    return Handler


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """A started FakeHub with huggingface_hub pointed at it (env + constants), xet/telemetry off."""
    from huggingface_hub import constants

    hub = FakeHub().start()
    hf_home = tmp_path / "hf_home"
    env = {"HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HOME": str(hf_home), "HF_HUB_CACHE": str(hf_home / "hub")}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HF_HUB_ENABLE_HF_TRANSFER"):
        monkeypatch.delenv(k, raising=False)
    # huggingface_hub read these at import time: patch the module too.
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    template = hub.url + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    try:
        yield hub
    finally:
        hub.stop()
