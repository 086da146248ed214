"""Where the weights come from: the one place that downloads, caches and checks them.

    python -m hybridgl.weights download [--sam vit_h] [--clip openai/clip-vit-base-patch16] [--stanza]
                                        [--model-dir DIR]
    python -m hybridgl.weights check    [--sam vit_h] [--clip ...] [--stanza] [--verify]   (or --check)

Layout under the models root (MODEL_DIR, default ~/.cache/hybridgl; /data/models in the image):

    sam/sam_vit_h_4b8939.pth            official SAM checkpoints (SHA-256 checked, resumable download)
    clip/openai--clip-vit-base-patch16/ a Hugging Face snapshot: config, safetensors, tokenizer
    stanza/                             stanza's English models (tokenize, mwt, pos, lemma, depparse)

Every function that takes `cache_dir` reads it as such a root (so one `cache_dir` serves SAM and
CLIP alike, and `download --model-dir DIR` fills exactly what `cache_dir=DIR` reads).

Nothing is fetched per request: models are resolved once when loaded. With HF_HUB_OFFLINE=1 or
HYBRIDGL_OFFLINE=1 nothing is fetched at all, and a missing file is a FileNotFoundError naming the
command that fetches it. Sources can be redirected for mirrors: HYBRIDGL_SAM_BASE_URL (SAM),
HF_ENDPOINT (Hugging Face's own variable, CLIP), STANZA_RESOURCES_URL / STANZA_MODEL_URL (stanza's
own variables; HYBRIDGL_STANZA_URL is accepted for the resources URL too). HYBRIDGL_SAM_SHA256
replaces the expected SHA-256 of the SAM file (a mirror serving another file; tests).
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, NamedTuple
from urllib.parse import urlparse

log = logging.getLogger("hybridgl.weights")

SAM_BASE_URL = "https://dl.fbaipublicfiles.com/segment_anything/"


class SamCheckpoint(NamedTuple):
    filename: str
    url: str
    sha256: str | None
    size: int | None  # bytes


# SHA-256 and sizes of Meta's official files, as recorded independently by several projects that
# verify them (e.g. micro-sam's model registry); the URLs are those of the segment-anything README.
SAM_CHECKPOINTS: dict[str, SamCheckpoint] = {
    "vit_h": SamCheckpoint("sam_vit_h_4b8939.pth", SAM_BASE_URL + "sam_vit_h_4b8939.pth",
                           "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e", 2_564_550_879),
    "vit_l": SamCheckpoint("sam_vit_l_0b3195.pth", SAM_BASE_URL + "sam_vit_l_0b3195.pth",
                           "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622", 1_249_524_607),
    "vit_b": SamCheckpoint("sam_vit_b_01ec64.pth", SAM_BASE_URL + "sam_vit_b_01ec64.pth",
                           "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912", 375_042_383),
}
DEFAULT_SAM = "vit_h"
DEFAULT_CLIP = "openai/clip-vit-base-patch16"
STANZA_LANG = "en"
STANZA_PROCESSORS = "tokenize,pos,lemma,depparse"  # stanza adds mwt for English by itself
CLIP_FILES = ["*.json", "*.txt", "*.safetensors"]  # config, tokenizer (vocab.json, merges.txt), weights
CLIP_FALLBACK_WEIGHTS = ["pytorch_model.bin"]  # only for a repository without safetensors
_TRUE = {"1", "true", "yes", "on"}


class ChecksumError(ValueError):
    """A downloaded file is not the expected one (it has been deleted)."""


# -- where things live ------------------------------------------------------------------------------

def model_dir() -> Path:
    """The models root: env MODEL_DIR, else ~/.cache/hybridgl."""
    env = os.environ.get("MODEL_DIR", "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hybridgl"


def _root(cache_dir: str | Path | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir else model_dir()


def shown(url: str) -> str:
    """A URL for messages and logs: without user info, query string (a presigned URL's signature) or fragment."""
    parts = urlparse(str(url))
    if not parts.scheme or not parts.netloc:
        return str(url)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{host}{':' + str(parts.port) if parts.port else ''}{parts.path}"


def is_offline() -> bool:
    """True when env HF_HUB_OFFLINE or HYBRIDGL_OFFLINE is truthy (1, true, yes, on)."""
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "HYBRIDGL_OFFLINE"))


def sam_dir(cache_dir: str | Path | None = None) -> Path:
    return _root(cache_dir) / "sam"


def clip_local_dir(name: str, cache_dir: str | Path | None = None) -> Path:
    """Where `download_clip(name)` puts a Hugging Face id: <root>/clip/<org>--<name>."""
    return _root(cache_dir) / "clip" / name.strip("/").replace("/", "--")


def stanza_dir(cache_dir: str | Path | None = None) -> Path:
    """stanza's resources: <cache_dir>/stanza when given, else env STANZA_RESOURCES_DIR, else MODEL_DIR/stanza."""
    if cache_dir:
        return _root(cache_dir) / "stanza"
    env = os.environ.get("STANZA_RESOURCES_DIR", "").strip()
    return Path(env).expanduser() if env else model_dir() / "stanza"


def _offline_error(what: str, where: Path | str, command: str) -> FileNotFoundError:
    return FileNotFoundError(f"{what} is not at {where} and downloads are off (offline mode: HF_HUB_OFFLINE / "
                             f"HYBRIDGL_OFFLINE); fetch it on a connected machine with `{command}` and copy the "
                             f"models directory (MODEL_DIR) here")


# -- downloading one file ---------------------------------------------------------------------------

def sha256_of(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


LOCK_FILE = ".hybridgl-download.lock"  # only where a directory cannot be flocked (NFS)
_IN_PROCESS = threading.Lock()  # a POSIX lock does not exclude the threads of the process that holds it


@contextlib.contextmanager
def _dir_lock(directory: Path) -> Iterator[None]:
    """An exclusive lock between processes on `directory` (a backend and a batch job sharing MODEL_DIR
    must not write one .part together); flock on the directory itself, so no lock file is left.
    NFS refuses flock on a directory (ENOLCK; it emulates flock with POSIX locks, which need an open
    file): there a POSIX lock on LOCK_FILE, which the server arbitrates between nodes."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        try:
            _wait_for(fcntl.flock, fd, directory)
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EBADF, errno.EINVAL, errno.EOPNOTSUPP):
                raise
        else:  # (outside the handler: the download's own errors are not caught there)
            yield
            return
        with _IN_PROCESS:
            lock = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                _wait_for(fcntl.lockf, lock, directory)
                yield
            finally:
                os.close(lock)  # releases the lock
    finally:
        os.close(fd)  # releases the lock


def _wait_for(lock, fd: int, directory: Path) -> None:
    """lock(fd, exclusive), saying so when another process holds it."""
    import fcntl

    try:
        lock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):  # lockf says EACCES or EAGAIN, flock EWOULDBLOCK
        log.info("another process is downloading into %s: waiting for it", directory)
        lock(fd, fcntl.LOCK_EX)


class _Retryable(Exception):
    """A failure worth resuming after."""


def _content_range_total(value: str | None) -> int | None:
    """'bytes 0-99/1234' or 'bytes */1234' -> 1234."""
    if value and "/" in value:
        total = value.rsplit("/", 1)[1].strip()
        return int(total) if total.isdigit() else None
    return None


def download(url: str, target: str | Path, *, sha256: str | None = None, size: int | None = None,
             progress: bool = True, timeout: float = 60.0, retries: int = 5) -> Path:
    """Fetch `url` to `target`, robustly.

    Bytes go to `target.part`; after a cut (or in a later process) the download resumes from where
    it stopped with an HTTP Range request (a server that ignores the range makes it start over).
    Then the size and the SHA-256 are checked (a mismatch deletes the file and raises
    ChecksumError) and the file is renamed into place atomically. Connection problems and 5xx
    answers are retried `retries` times; 4xx answers are not.
    """
    import requests

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    with _dir_lock(target.parent):
        if target.is_file():  # another process finished it while we waited
            return target
        attempt = 0
        while True:
            before = part.stat().st_size if part.exists() else 0
            try:
                _fetch_into(url, part, size=size, progress=progress, timeout=timeout, name=target.name)
                break
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
                    _Retryable) as exc:
                progressed = part.exists() and part.stat().st_size > before
                attempt = 1 if progressed else attempt + 1  # `retries` failures in a row without progress
                if attempt > retries:
                    raise ConnectionError(f"downloading {shown(url)} failed after {retries} retries: {exc}; run the "
                                          f"same command again to resume from {part}") from exc
                delay = min(30.0, 2.0 ** (attempt - 1))
                log.warning("download of %s interrupted (%s); resuming in %.0f s (retry %d/%d)",
                            target.name, exc.__class__.__name__, delay, attempt, retries)
                time.sleep(delay)
        got = part.stat().st_size
        if size is not None and got != size:
            part.unlink()
            raise ChecksumError(f"{shown(url)}: got {got} bytes, expected {size}; the file was removed")
        if sha256:
            actual = sha256_of(part)
            if actual.lower() != sha256.lower():
                part.unlink()
                raise ChecksumError(f"checksum mismatch for {shown(url)}: expected sha256 {sha256}, got {actual}; "
                                    f"the file was removed (a wrong mirror, or set HYBRIDGL_SAM_SHA256)")
        os.replace(part, target)
    log.info("downloaded %s -> %s (%d bytes)", shown(url), target, target.stat().st_size)
    return target


def _fetch_into(url: str, part: Path, *, size: int | None, progress: bool, timeout: float, name: str) -> None:
    """One HTTP request that appends the rest of `url` to `part` (a fresh start when needed)."""
    import requests
    from tqdm import tqdm

    done = part.stat().st_size if part.exists() else 0
    if size is not None and done > size:  # not the file we expect: start over
        part.unlink()
        done = 0
    if size is not None and done == size:
        return
    headers = {"Accept-Encoding": "identity"}  # sizes are those of the file itself
    if done:
        headers["Range"] = f"bytes={done}-"
    with requests.get(url, headers=headers, stream=True, timeout=timeout) as r:
        if r.status_code == 416 and done:  # nothing left after `done`: complete, or a stale .part
            total = _content_range_total(r.headers.get("Content-Range"))
            if total == done:
                return
            part.unlink()
            raise _Retryable(f"the server refused to resume at byte {done} (file of {total} bytes); starting over")
        if r.status_code >= 500:
            raise _Retryable(f"HTTP {r.status_code} from {shown(url)}")
        if r.status_code >= 400:
            raise OSError(f"cannot download {shown(url)}: HTTP {r.status_code} {r.reason}")
        if done and r.status_code == 206:
            start = (r.headers.get("Content-Range") or "").replace("bytes", "").strip().split("-")[0]
            if start != str(done):
                part.unlink()
                raise _Retryable(f"the server resumed at {start!r}, not at byte {done}; starting over")
        elif done:  # 200: the server ignored the range
            log.info("%s: the server does not resume downloads; starting over", name)
            done = 0
        length = r.headers.get("Content-Length")
        total = done + int(length) if length and length.isdigit() else None
        if size is not None and total is not None and total != size:  # a wrong file: don't fetch it
            part.unlink(missing_ok=True)
            raise ChecksumError(f"{shown(url)} has {total} bytes, expected {size}: not the expected file; nothing kept")
        total = total or size
        with open(part, "ab" if done else "wb") as f, \
                tqdm(total=total, initial=done, unit="B", unit_scale=True, unit_divisor=1024, desc=name,
                     disable=not progress, mininterval=0.5 if sys.stderr.isatty() else 15.0) as bar:
            for block in r.iter_content(chunk_size=1 << 16):  # small blocks: a cut keeps almost everything
                f.write(block)
                bar.update(len(block))
            f.flush()
            os.fsync(f.fileno())
    got = part.stat().st_size
    if size is not None and got < size:  # the server closed early without saying so: resume
        raise _Retryable(f"the connection ended after {got} of {size} bytes")


# -- SAM --------------------------------------------------------------------------------------------

def _official_by_filename(filename: str) -> SamCheckpoint | None:
    return next((c for c in SAM_CHECKPOINTS.values() if c.filename == filename), None)


def _sam_source(model_type: str, checkpoint: str | Path | None, cache_dir, sha256: str | None):
    """(url, target path, expected sha256, expected size) of a SAM checkpoint to fetch."""
    override = sha256 or os.environ.get("HYBRIDGL_SAM_SHA256", "").strip() or None
    if checkpoint is None:
        if model_type not in SAM_CHECKPOINTS:
            raise ValueError(f"no official checkpoint for SAM model type {model_type!r} (known: "
                             f"{', '.join(SAM_CHECKPOINTS)}); pass a checkpoint path or URL")
        known = SAM_CHECKPOINTS[model_type]
        base = os.environ.get("HYBRIDGL_SAM_BASE_URL", "").strip()
        url = base.rstrip("/") + "/" + known.filename if base else known.url
    else:
        url = str(checkpoint)
        filename = Path(urlparse(url).path).name
        if not filename:
            raise ValueError(f"cannot name a file after the URL {shown(url)!r}")
        # a file of one's own: named after its URL too (without the query: a presigned signature
        # changes), so that another URL with the same file name is not mistaken for it
        tag = hashlib.sha256(shown(url).encode()).hexdigest()[:8]
        known = _official_by_filename(filename) or SamCheckpoint(
            f"{Path(filename).stem}-{tag}{Path(filename).suffix}", url, None, None)
        if known.sha256 is None and not override:
            log.warning("no SHA-256 known for %s: it is downloaded unchecked", shown(url))
    if override:  # another file than the official one: its size is unknown too
        return url, sam_dir(cache_dir) / known.filename, override, None
    return url, sam_dir(cache_dir) / known.filename, known.sha256, known.size


def resolve_sam_checkpoint(model_type: str, checkpoint: str | Path | None = None, *, cache_dir=None,
                           offline: bool | None = None, progress: bool = True,
                           sha256: str | None = None) -> Path:
    """A local SAM checkpoint file for `model_type` ("vit_h", "vit_l", "vit_b").

    checkpoint None: the official file of that type (base URL overridable by env
    HYBRIDGL_SAM_BASE_URL), cached as <cache_dir or MODEL_DIR>/sam/<filename>; an existing local
    path: used as is; an http(s) URL: downloaded into that cache. `sha256` (or env
    HYBRIDGL_SAM_SHA256) replaces the expected checksum. Offline, nothing touches the network and a
    missing file is a FileNotFoundError naming the download command.
    """
    offline = is_offline() if offline is None else offline
    text = str(checkpoint) if checkpoint is not None else None
    if text is not None and not text.startswith(("http://", "https://")):
        if "://" in text:
            raise ValueError(f"unsupported checkpoint URL {text!r}: only http(s) URLs and local paths")
        path = Path(text).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"SAM checkpoint not found: {path}")
        return path
    url, target, expected_sha, expected_size = _sam_source(model_type, checkpoint, cache_dir, sha256)
    if target.is_file():
        if expected_size is None or target.stat().st_size == expected_size:
            return target
        if offline:
            raise FileNotFoundError(f"SAM checkpoint {target} has {target.stat().st_size} bytes, not "
                                    f"{expected_size}: a damaged copy; replace it (offline mode is on)")
        log.warning("%s has %d bytes, not %d: downloading it again", target, target.stat().st_size, expected_size)
        target.unlink()
    if offline:
        command = f"python -m hybridgl.weights download --sam {model_type}" + (f" --sam-url {text}" if text else "")
        raise _offline_error(f"SAM checkpoint {target.name}", target, command)
    log.info("fetching SAM %s from %s", model_type, shown(url))
    return download(url, target, sha256=expected_sha, size=expected_size, progress=progress)


# -- CLIP -------------------------------------------------------------------------------------------

def _clip_dir_missing(path: Path) -> list[str]:
    """What a CLIP directory lacks: config, weights, tokenizer (without vocab.json and merges.txt, or
    tokenizer.json, transformers builds an empty tokenizer without an error)."""
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not (any(path.glob("*.safetensors")) or (path / "pytorch_model.bin").is_file()):
        missing.append("weights (*.safetensors or pytorch_model.bin)")
    if not ((path / "vocab.json").is_file() and (path / "merges.txt").is_file()
            or (path / "tokenizer.json").is_file()):
        missing.append("tokenizer (vocab.json and merges.txt, or tokenizer.json)")
    return missing


def _is_complete_clip_dir(path: Path) -> bool:
    return not _clip_dir_missing(path)


def _looks_like_path(name: str) -> bool:
    """A directory meant, not a Hugging Face id (those are "name" or "org/name")."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def _hf_cache_dir() -> Path:
    """Hugging Face's hub cache as the environment says now (HF_HUB_CACHE, HF_HOME)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "huggingface" / "hub"


def _hf_cached_snapshot(name: str) -> Path | None:
    """The Hugging Face cache's snapshot of `name`, if one is there (never touches the network)."""
    try:
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(name, local_files_only=True, cache_dir=_hf_cache_dir()))
    except Exception:  # not cached, an invalid id, huggingface_hub missing: all "not there"
        return None
    return path if _is_complete_clip_dir(path) else None


def resolve_clip(name_or_path: str, *, cache_dir=None, offline: bool | None = None) -> str:
    """A local directory holding CLIP's weights, config and tokenizer.

    An existing directory is returned as is (a FileNotFoundError if it lacks the config, the weights
    or the tokenizer files). A Hugging Face id resolves to, in order: the copy that
    `download` put under <cache_dir or MODEL_DIR>/clip/, a complete snapshot in the Hugging Face
    cache (HF_HOME), else (online) a fresh download into <cache_dir or MODEL_DIR>/clip/ from
    HF_ENDPOINT. Offline, a missing model is a FileNotFoundError naming the download command.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        missing = _clip_dir_missing(path)
        if missing:
            raise FileNotFoundError(f"CLIP directory {path} is incomplete: it has no {', '.join(missing)}")
        return str(path)
    if _looks_like_path(name_or_path):
        raise FileNotFoundError(f"CLIP directory not found: {path}")
    local = clip_local_dir(name_or_path, cache_dir)
    if _is_complete_clip_dir(local):
        return str(local)
    cached = _hf_cached_snapshot(name_or_path)
    if cached is not None:
        return str(cached)
    if is_offline() if offline is None else offline:
        raise _offline_error(f"CLIP {name_or_path!r}", local,
                             f"python -m hybridgl.weights download --clip {name_or_path}")
    return str(download_clip(name_or_path, cache_dir=cache_dir))


def download_clip(name: str = DEFAULT_CLIP, cache_dir=None) -> Path:
    """A snapshot of the Hugging Face repository `name` in <cache_dir or MODEL_DIR>/clip/<org>--<name>:
    config, tokenizer files and the safetensors weights (pytorch_model.bin only when the repository
    has no safetensors). Files already there are kept. The endpoint is HF_ENDPOINT's."""
    if Path(name).expanduser().is_dir():
        return Path(name).expanduser()
    target = clip_local_dir(name, cache_dir)
    if _is_complete_clip_dir(target):
        return target
    if is_offline():
        raise _offline_error(f"CLIP {name!r}", target, f"python -m hybridgl.weights download --clip {name}")
    from huggingface_hub import snapshot_download

    # read now, not at import; without a trailing slash, as huggingface_hub reads it (no //api/... URLs)
    endpoint = os.environ.get("HF_ENDPOINT", "").strip().rstrip("/") or None
    log.info("fetching CLIP %s into %s", name, target)
    snapshot_download(name, local_dir=str(target), allow_patterns=CLIP_FILES, endpoint=endpoint)
    if not any(target.glob("*.safetensors")):
        log.info("%s has no safetensors weights: fetching %s", name, ", ".join(CLIP_FALLBACK_WEIGHTS))
        snapshot_download(name, local_dir=str(target), allow_patterns=CLIP_FALLBACK_WEIGHTS, endpoint=endpoint)
    if not _is_complete_clip_dir(target):
        raise FileNotFoundError(f"the Hugging Face repository {name!r} has no config.json and weights")
    return target


# -- stanza -----------------------------------------------------------------------------------------

def _stanza_files(resources: dict) -> list[str]:
    """The model files (en/<processor>/<package>.pt) that `stanza.download(processors=STANZA_PROCESSORS)`
    fetches and the pipeline loads, as stanza resolves them from resources.json: each processor's
    default package (plus mwt, which stanza adds when the default package has one), then the models
    those depend on (pretrained word vectors, character language models)."""
    lang = resources[STANZA_LANG]
    default = lang["packages"]["default"]
    processors = STANZA_PROCESSORS.split(",") + (["mwt"] if "mwt" in default else [])
    models = [(p, default[p]) for p in processors]
    models += [(d["model"], d["package"]) for p, package in models for d in lang[p][package].get("dependencies", [])]
    return sorted({f"{STANZA_LANG}/{p}/{package}.pt" for p, package in models})


def _stanza_missing(directory: Path) -> list[str]:
    """What an install lacks: resources.json, or a model file it lists as needed (a dependency's
    folder may never have been created). Only regular files count: stanza downloads each file into a
    temporary directory beside it, which a killed download leaves behind; any such directory (also in
    pretrain/ or a charlm's) makes the install incomplete."""
    try:
        files = _stanza_files(json.loads((directory / "resources.json").read_text(encoding="utf-8")))
    except FileNotFoundError:
        return ["resources.json"]
    except (OSError, ValueError, LookupError, TypeError, AttributeError):  # cut short, or another language's
        return ["resources.json (unreadable, or without English)"]
    missing = [f for f in files if not (directory / f).is_file()]
    lang = directory / STANZA_LANG
    if lang.is_dir():
        missing += [f"{e.relative_to(directory).as_posix()} (left by a killed download)"
                    for d in sorted(lang.iterdir()) if d.is_dir() for e in sorted(d.iterdir()) if e.is_dir()]
    return missing


def _stanza_complete(directory: Path) -> bool:
    return not _stanza_missing(directory)


def download_stanza(dir: str | Path | None = None) -> Path:  # noqa: A002 - the documented name
    """stanza's English models (tokenize, mwt, pos, lemma, depparse) into `dir` (default stanza_dir()).
    The source: env STANZA_RESOURCES_URL (or HYBRIDGL_STANZA_URL) for resources.json and
    STANZA_MODEL_URL for the model files, stanza's defaults otherwise."""
    directory = Path(dir).expanduser() if dir else stanza_dir()
    if _stanza_complete(directory):
        return directory
    if is_offline():
        raise _offline_error("stanza's English models", directory, "python -m hybridgl.weights download --stanza")
    import stanza

    kwargs = {}
    resources_url = os.environ.get("HYBRIDGL_STANZA_URL") or os.environ.get("STANZA_RESOURCES_URL")
    if resources_url:
        kwargs["resources_url"] = resources_url
    if os.environ.get("STANZA_MODEL_URL"):
        kwargs["model_url"] = os.environ["STANZA_MODEL_URL"]
    log.info("fetching stanza's English models into %s", directory)
    stanza.download(STANZA_LANG, model_dir=str(directory), processors=STANZA_PROCESSORS, **kwargs)
    return directory


# -- what is there ----------------------------------------------------------------------------------

def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def check(sam: str | None = DEFAULT_SAM, clip: str | None = DEFAULT_CLIP, stanza: bool = True, *,
          cache_dir=None, sam_checkpoint: str | Path | None = None, verify: bool = False) -> list[dict]:
    """What is present and what is missing; never touches the network.

    One row per requested item: {"kind" (sam, clip, stanza), "what", "path", "present", "bytes",
    "expected_bytes", "note"}.
    A SAM file of the wrong size is not present; `verify` also checks its SHA-256 (slow: 2.4 GB).
    """
    rows = []
    if sam:
        text = str(sam_checkpoint) if sam_checkpoint is not None else None
        if text is not None and not text.startswith(("http://", "https://")):
            path, expected_sha, expected_size = Path(text).expanduser(), None, None
        else:
            _, path, expected_sha, expected_size = _sam_source(sam, sam_checkpoint, cache_dir, None)
        row = {"kind": "sam", "what": f"SAM {sam}", "path": str(path), "present": path.is_file(), "bytes": _size(path),
               "expected_bytes": expected_size, "note": ""}
        part = path.with_name(path.name + ".part")
        if row["present"] and expected_size is not None and row["bytes"] != expected_size:
            row.update(present=False, note=f"wrong size (expected {expected_size} bytes)")
        elif row["present"] and verify and expected_sha:
            ok = sha256_of(path) == expected_sha.lower()  # as download() compares
            row.update(present=ok, note="sha256 ok" if ok else "sha256 MISMATCH")
        elif not row["present"] and part.is_file():
            row["note"] = f"partial download: {part.stat().st_size} bytes in {part.name}"
        rows.append(row)
    if clip:
        try:
            path = Path(resolve_clip(clip, cache_dir=cache_dir, offline=True))
            present = True
        except FileNotFoundError:
            path = Path(clip).expanduser() if _looks_like_path(clip) else clip_local_dir(clip, cache_dir)
            present = False
        rows.append({"kind": "clip", "what": f"CLIP {clip}", "path": str(path), "present": present,
                     "bytes": _size(path) if present else 0, "expected_bytes": None, "note": ""})
    if stanza:
        path = stanza_dir(cache_dir)
        missing = _stanza_missing(path)
        rows.append({"kind": "stanza", "what": "stanza en", "path": str(path), "present": not missing,
                     "bytes": _size(path) if path.is_dir() else 0, "expected_bytes": None,
                     "note": "" if not missing or not path.is_dir() else "incomplete: missing " + ", ".join(missing)})
    return rows


def format_rows(rows: list[dict]) -> str:
    """The check table: what, state, size, path (and a note)."""
    if not rows:
        return "nothing requested"
    width = max(len(r["what"]) for r in rows)
    lines = []
    for r in rows:
        state = "present" if r["present"] else "MISSING"
        size = f"{r['bytes'] / 1e6:9.1f} MB" if r["bytes"] else f"{'-':>12}"
        note = f"  ({r['note']})" if r["note"] else ""
        lines.append(f"{r['what']:<{width}}  {state:<7}  {size}  {r['path']}{note}")
    return "\n".join(lines)


# -- command line -----------------------------------------------------------------------------------

def _none(value: str | None) -> str | None:
    return None if value is None or value.strip().lower() in ("", "none", "no", "off") else value


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m hybridgl.weights",
        description="Download or check HybridGL's weights (SAM, CLIP, stanza) under MODEL_DIR.",
        epilog="Exit status: 0 all requested weights present, 1 something missing or a download failed, "
               "2 bad usage. Offline (HF_HUB_OFFLINE/HYBRIDGL_OFFLINE), `download` only checks.")
    ap.add_argument("action", nargs="?", choices=["download", "check"], default="check")
    ap.add_argument("--check", action="store_true", help="same as the check action")
    ap.add_argument("--sam", default=DEFAULT_SAM, help="SAM type: vit_h, vit_l, vit_b, or none (default: %(default)s)")
    ap.add_argument("--sam-url", help="fetch the SAM checkpoint from this http(s) URL instead of the official one")
    ap.add_argument("--clip", default=DEFAULT_CLIP, help="CLIP Hugging Face id or directory, or none "
                                                         "(default: %(default)s)")
    ap.add_argument("--stanza", action="store_true", help="also stanza's English models")
    ap.add_argument("--model-dir", help="models root (default: env MODEL_DIR, else ~/.cache/hybridgl)")
    ap.add_argument("--verify", action="store_true", help="check: also verify the SAM file's SHA-256 (slow)")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sam, clip, root = _none(args.sam), _none(args.clip), args.model_dir
    if args.sam_url and not sam:
        ap.error("--sam-url needs --sam TYPE")
    if sam and not args.sam_url and sam not in SAM_CHECKPOINTS:
        ap.error(f"unknown SAM type {sam!r}: expected one of {', '.join(SAM_CHECKPOINTS)} or none (or give --sam-url)")

    def table() -> list[dict]:
        return check(sam, clip, args.stanza, cache_dir=root, sam_checkpoint=args.sam_url, verify=args.verify)

    if args.action == "download" and not args.check:
        missing = [r for r in table() if not r["present"]]
        if missing and is_offline():
            print(format_rows(missing), file=sys.stderr)
            print("error: offline mode (HF_HUB_OFFLINE / HYBRIDGL_OFFLINE) is on, so nothing can be downloaded; "
                  "run this command on a connected machine and copy its MODEL_DIR here", file=sys.stderr)
            return 1
        try:
            for row in missing:
                if row["kind"] == "sam":
                    if row["note"] == "sha256 MISMATCH":  # a corrupted copy (--verify): fetch it again
                        Path(row["path"]).unlink()
                    resolve_sam_checkpoint(sam, args.sam_url, cache_dir=root, offline=False,
                                           progress=not args.quiet)
                elif row["kind"] == "clip":
                    download_clip(clip, cache_dir=root)
                else:
                    download_stanza(stanza_dir(root))
        except Exception as exc:  # one line for the user, not a traceback
            log.debug("download failed", exc_info=True)
            print(f"error: {exc}", file=sys.stderr)
            return 1
    rows = table()
    print(format_rows(rows))
    return 0 if all(r["present"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
