"""Fetch a source checkpoint from the Hugging Face Hub: whole, or streamed shard by shard.

Only what packing needs is fetched (safetensors shards, their index, config,
generation config, tokenizer and chat-template files), pinned to the commit the
revision resolved to when the plan was made, so a rerun never mixes commits.

Resuming: files already complete in the target directory (right size) are
skipped without any request. Inside one call, huggingface_hub itself retries a
dropped connection with an HTTP Range request and keeps what it already wrote,
at the granularity of ``constants.DOWNLOAD_CHUNK_SIZE`` (10 MiB) on the plain
HTTP path. huggingface_hub >= 1.x writes each file to a per-process temporary
file that is deleted on failure, so a *killed* run loses the file in progress
(at most one shard) and a rerun restarts that file from zero.

The endpoint is ``endpoint`` or ``$HF_ENDPOINT`` (read at call time) or the
Hub; the token is ``token`` or whatever huggingface_hub finds (``$HF_TOKEN``,
the saved login).
"""
from __future__ import annotations

import os
import re
import shutil
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, constants, hf_hub_download
from huggingface_hub import errors as hf_errors
from tqdm.auto import tqdm

DEFAULT_REPO = "Qwen/Qwen3.5-397B-A17B"

SMALL_FILES = (
    "model.safetensors.index.json", "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
    "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)


class HubError(RuntimeError):
    """A Hub operation failed; the message names the repo (and the file, when there is one)."""

    def __init__(self, message: str, repo_id: str | None = None, filename: str | None = None):
        super().__init__(message)
        self.repo_id, self.filename = repo_id, filename


@dataclass(frozen=True)
class RepoPlan:
    """What to fetch from one repo at one commit.

    ``files`` is ``[(name, size_in_bytes)]``: the small files first, then the
    shards in natural order. ``commit`` is the sha that ``revision`` resolved to.
    """

    repo_id: str
    revision: str
    commit: str
    files: list[tuple[str, int]]

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)

    @property
    def shards(self) -> list[str]:
        return [n for n, _ in self.files if n.endswith(".safetensors")]

    @property
    def small_files(self) -> list[str]:
        return [n for n, _ in self.files if not n.endswith(".safetensors")]

    def size(self, name: str) -> int:
        return dict(self.files)[name]


def resolve_endpoint(endpoint: str | None = None) -> str:
    """``endpoint``, else ``$HF_ENDPOINT`` as set now, else huggingface_hub's default."""
    return (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def human_bytes(n: float) -> str:
    """``1234567`` -> ``'1.2 MB'`` (decimal units, as the Hub shows sizes)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


def _natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _wanted(name: str) -> bool:
    return "/" not in name and (name.endswith(".safetensors") or name in SMALL_FILES)


def _hub_error(exc: BaseException, repo_id: str, revision: str, filename: str | None,
               endpoint: str) -> HubError:
    """Turn a huggingface_hub / transport exception into a HubError that says what and where."""
    where = f"{filename} of {repo_id}@{revision}" if filename else f"{repo_id}@{revision}"
    if isinstance(exc, hf_errors.GatedRepoError):
        msg = f"{repo_id} is gated: accept its terms on the Hub and set HF_TOKEN (while fetching {where})"
    elif isinstance(exc, hf_errors.RepositoryNotFoundError):
        msg = f"repository {repo_id} not found on {endpoint} (private? set HF_TOKEN)"
    elif isinstance(exc, hf_errors.RevisionNotFoundError):
        msg = f"revision {revision!r} not found in {repo_id} on {endpoint}"
    elif isinstance(exc, hf_errors.RemoteEntryNotFoundError):
        msg = f"{filename} not found in {repo_id}@{revision}"
    elif isinstance(exc, hf_errors.HfHubHTTPError):
        msg = f"Hub error while fetching {where} from {endpoint}: {exc}"
    else:  # connection refused/reset, timeouts, offline mode, truncated transfers
        msg = f"network error while fetching {where} from {endpoint}: {type(exc).__name__}: {exc}"
    return HubError(msg, repo_id, filename)


def plan(repo_id: str = DEFAULT_REPO, revision: str | None = None, *,
         endpoint: str | None = None, token: str | bool | None = None) -> RepoPlan:
    """List what packing needs from ``repo_id`` at ``revision`` (default ``main``), with sizes.

    One ``model_info(files_metadata=True)`` call; the revision is resolved to
    its commit sha. Only top-level files are kept. Raises :class:`HubError`
    when the repo/revision is missing, the network fails, or the repo has no
    ``*.safetensors`` or no ``config.json``.
    """
    revision = revision or "main"
    endpoint = resolve_endpoint(endpoint)
    api = HfApi(endpoint=endpoint, token=token)
    try:
        info = api.model_info(repo_id, revision=revision, files_metadata=True)
    except Exception as exc:  # noqa: BLE001 - every failure becomes a HubError naming the repo
        raise _hub_error(exc, repo_id, revision, None, endpoint) from exc
    sizes = {s.rfilename: (s.lfs.size if s.lfs else s.size) for s in info.siblings or []}
    names = [n for n in sizes if _wanted(n)]
    shards = sorted((n for n in names if n.endswith(".safetensors")), key=_natural_key)
    small = [n for n in SMALL_FILES if n in names]
    if not shards or "config.json" not in small:
        raise HubError(f"{repo_id}@{revision} has no *.safetensors or no config.json", repo_id)
    if info.sha is None or any(sizes[n] is None for n in names):
        raise HubError(f"{endpoint} gave no commit sha or file sizes for {repo_id}@{revision}", repo_id)
    return RepoPlan(repo_id, revision, info.sha, [(n, int(sizes[n])) for n in small + shards])


class _Cancelled(Exception):
    """Raised inside a transfer (from the progress hook) to stop a prefetch."""


def _bar_class(bar: tqdm, cancel: threading.Event | None):
    """A tqdm stand-in for huggingface_hub's per-file bars that feeds one overall bar."""

    class _Forward:
        def __init__(self, *args, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n=1):
            if cancel is not None and cancel.is_set():
                raise _Cancelled()
            bar.update(n)

        def update_transfer(self, n=1):  # xet path: bytes on the wire; we count bytes written instead
            pass

        def __getattr__(self, name):  # close, refresh, set_postfix_str, ...: nothing to do
            return lambda *a, **k: None

    return _Forward


def _fetch(p: RepoPlan, name: str, local_dir: Path, bar: tqdm, endpoint: str,
           token: str | bool | None, cancel: threading.Event | None = None) -> Path:
    """Fetch one file of ``p`` into ``local_dir`` unless it is already there at the right size."""
    dest, size = local_dir / name, p.size(name)
    have = dest.stat().st_size if dest.is_file() else None
    if have == size:  # complete from an earlier run: no request at all (counted in the bar's initial)
        return dest
    start = bar.n
    try:
        hf_hub_download(p.repo_id, name, revision=p.commit, local_dir=local_dir, endpoint=endpoint,
                        token=token, force_download=have is not None, tqdm_class=_bar_class(bar, cancel))
    except _Cancelled:
        raise
    except Exception as exc:  # noqa: BLE001
        bar.update(start - bar.n)  # the partial file is gone: take its bytes back off the bar
        raise _hub_error(exc, p.repo_id, p.revision, name, endpoint) from exc
    got = dest.stat().st_size if dest.is_file() else None
    if got != size:
        raise HubError(f"{name} of {p.repo_id}@{p.commit}: got {got} bytes, the Hub lists {size}",
                       p.repo_id, name)
    return dest


def _check_space(directory: Path, need: int, repo_id: str) -> None:
    free = shutil.disk_usage(directory).free
    if free < need:
        raise HubError(f"{directory} has {human_bytes(free)} free, {repo_id} needs "
                       f"{human_bytes(need)} more", repo_id)


def _complete(local_dir: Path, name: str, size: int) -> bool:
    f = local_dir / name
    return f.is_file() and f.stat().st_size == size


def _start(p: RepoPlan, local_dir: Path, skip: Iterable[str], progress: bool) -> tuple[list[str], int, tqdm]:
    """Print the summary, open the overall bar; returns (names to fetch, bytes missing, bar)."""
    skip = set(skip)
    todo = [n for n, _ in p.files if n not in skip]
    total = sum(p.size(n) for n in todo)
    missing = total - sum(p.size(n) for n in todo if _complete(local_dir, n, p.size(n)))
    if progress:
        print(f"{p.repo_id}@{p.commit[:12]}: {len(todo)} files, {human_bytes(total)} total, "
              f"{human_bytes(missing)} to download -> {local_dir}", flush=True)
    bar = tqdm(total=total, initial=total - missing, unit="B", unit_scale=True, unit_divisor=1000,
               desc="download", disable=not progress, dynamic_ncols=True)
    return todo, missing, bar


def download(repo_id: str = DEFAULT_REPO, revision: str | None = None, local_dir: str | Path | None = None,
             progress: bool = True, *, endpoint: str | None = None, token: str | bool | None = None,
             repo_plan: RepoPlan | None = None) -> Path:
    """Download what packing needs from ``repo_id`` into ``local_dir``; returns ``local_dir``.

    ``local_dir`` defaults to ``./<repo name>``. With ``progress`` it prints the
    total size first, then shows one tqdm bar over all bytes. Files already
    present at the right size are skipped; the rest are fetched one by one with
    ``hf_hub_download(..., local_dir=...)`` at the plan's commit and their
    sizes checked. Pass ``repo_plan`` (from :func:`plan`) to skip re-listing.
    Raises :class:`HubError` (repo/revision/file not found, network, size, disk).
    """
    endpoint = resolve_endpoint(endpoint)
    p = repo_plan or plan(repo_id, revision, endpoint=endpoint, token=token)
    local_dir = Path(local_dir if local_dir is not None else p.repo_id.split("/")[-1])
    local_dir.mkdir(parents=True, exist_ok=True)
    todo, missing, bar = _start(p, local_dir, (), progress)
    with bar:
        _check_space(local_dir, missing, p.repo_id)
        for name in todo:
            _fetch(p, name, local_dir, bar, endpoint, token)
    return local_dir


class _Job(threading.Thread):
    """Run one fetch in the background; ``get()`` joins and returns or re-raises."""

    def __init__(self, fn):
        super().__init__(daemon=True)
        self.fn, self.result, self.error = fn, None, None
        self.start()

    def run(self):
        try:
            self.result = self.fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer's thread
            self.error = exc

    def get(self):
        self.join()
        if self.error is not None:
            raise self.error
        return self.result


def stream_shards(repo_id: str = DEFAULT_REPO, revision: str | None = None,
                  scratch_dir: str | Path = "scratch", progress: bool = True, *,
                  skip: Iterable[str] = (), prefetch: bool = True, endpoint: str | None = None,
                  token: str | bool | None = None, repo_plan: RepoPlan | None = None) -> Iterator[Path]:
    """Stream a checkpoint through ``scratch_dir`` one shard at a time (for streaming quantize).

    Usage::

        p = plan(repo_id, revision)                 # p.commit, p.shards, p.total_bytes
        it = stream_shards(repo_id, revision, "/scratch", repo_plan=p, skip=done_shards)
        meta_dir = next(it)        # config.json, index, tokenizer, chat template are in here (kept)
        for shard in it:           # Path; shard.name is the shard's name in the repo
            quantize(shard)        # the shard is deleted when you ask for the next one

    The first item is ``scratch_dir`` once the small files are there. Then each
    shard not named in ``skip`` is yielded in order. With ``prefetch`` the next
    shard downloads while you work on the current one, so the scratch disk
    holds at most two shards (one without). A shard is deleted only when the
    consumer moves on; if the consumer stops early (``break``, exception,
    ``close()``) the current shard is kept and the prefetch is cancelled, and a
    rerun skips shards already complete in ``scratch_dir``. Errors are
    :class:`HubError`, raised from ``next()``.
    """
    endpoint = resolve_endpoint(endpoint)
    p = repo_plan or plan(repo_id, revision, endpoint=endpoint, token=token)
    scratch = Path(scratch_dir)
    scratch.mkdir(parents=True, exist_ok=True)
    todo, _, bar = _start(p, scratch, skip, progress)
    shards = [n for n in todo if n.endswith(".safetensors")]
    cancel = threading.Event()
    job: _Job | None = None

    def fetch(name: str) -> Path:
        return _fetch(p, name, scratch, bar, endpoint, token, cancel)

    try:
        _check_space(scratch, sum(sorted(map(p.size, shards))[-2:]), p.repo_id)
        for name in todo:
            if not name.endswith(".safetensors"):
                fetch(name)
        yield scratch
        for i, name in enumerate(shards):
            path = (job or _Job(lambda: fetch(name))).get()  # noqa: B023 - run at once, in this iteration
            job = None
            if prefetch and i + 1 < len(shards):
                job = _Job(lambda nxt=shards[i + 1]: fetch(nxt))
            yield path
            path.unlink(missing_ok=True)
    finally:
        cancel.set()
        if job is not None:
            job.join()
        bar.close()
