"""Where the weights come from: the one place that downloads, caches and checks them.

    python -m hybridgl.weights download [--sam vit_h] [--clip openai/clip-vit-base-patch16] [--stanza]
    python -m hybridgl.weights check    [--sam vit_h] [--clip ...] [--stanza]

Everything lands under MODEL_DIR (default ~/.cache/hybridgl): `sam/` (checkpoints, SHA-256
checked, resumable), `clip/<id>` (a Hugging Face snapshot), `stanza/` (English models). At run
time nothing is fetched per request; with HF_HUB_OFFLINE=1 (or HYBRIDGL_OFFLINE=1) nothing is
fetched at all. Sources are overridable for mirrors: HYBRIDGL_SAM_BASE_URL, HF_ENDPOINT,
HYBRIDGL_STANZA_URL.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

log = logging.getLogger("hybridgl.weights")

SAM_BASE_URL = "https://dl.fbaipublicfiles.com/segment_anything/"


@dataclass(frozen=True)
class Checkpoint:
    filename: str
    sha256: str


SAM_CHECKPOINTS = {
    "vit_h": Checkpoint("sam_vit_h_4b8939.pth", "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e"),
    "vit_l": Checkpoint("sam_vit_l_0b3195.pth", "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622"),
    "vit_b": Checkpoint("sam_vit_b_01ec64.pth", "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912"),
}
DEFAULT_CLIP = "openai/clip-vit-base-patch16"
STANZA_PROCESSORS = "tokenize,pos,lemma,depparse"
_TRUE = {"1", "true", "yes", "on"}


def model_dir() -> Path:
    return Path(os.environ["MODEL_DIR"]) if os.environ.get("MODEL_DIR") else Path.home() / ".cache" / "hybridgl"


def is_offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "HYBRIDGL_OFFLINE"))


def stanza_dir() -> Path:
    from .parsing import stanza_resources_dir

    return stanza_resources_dir()


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def download(url: str, target: Path, sha256: str | None = None, progress: bool = True, timeout: float = 60) -> Path:
    """Fetch url to target: into target.part, resumed with an HTTP Range request after a cut,
    SHA-256 checked (a mismatch deletes the file), then renamed into place."""
    import requests
    from tqdm import tqdm

    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    done = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={done}-"} if done else {}
    with requests.get(url, headers=headers, stream=True, timeout=timeout) as r:
        if r.status_code == 416:  # the .part is already complete
            pass
        else:
            r.raise_for_status()
            if done and r.status_code != 206:  # the server ignored the range: start over
                done = 0
            total = int(r.headers.get("Content-Length", 0)) + done
            with open(part, "ab" if done else "wb") as f, tqdm(total=total or None, initial=done, unit="B",
                                                                unit_scale=True, desc=target.name,
                                                                disable=not progress) as bar:
                for block in r.iter_content(chunk_size=1 << 16):  # small reads: a cut keeps most bytes
                    f.write(block)
                    bar.update(len(block))
    if sha256:
        actual = sha256_of(part)
        if actual != sha256:
            part.unlink()
            raise ValueError(f"checksum mismatch for {url}: expected sha256 {sha256}, got {actual}; file removed")
    part.replace(target)
    log.info("downloaded %s -> %s", url, target)
    return target


def resolve_sam_checkpoint(model_type: str, checkpoint: str | Path | None = None, *, cache_dir=None,
                           offline: bool | None = None, progress: bool = True, sha256: str | None = None) -> Path:
    """A local SAM checkpoint file for `model_type`.

    checkpoint None: the official file (base URL from HYBRIDGL_SAM_BASE_URL), cached in
    cache_dir or MODEL_DIR/sam; an existing path: itself; an http(s) URL: downloaded into the
    cache. Offline, a missing file is a FileNotFoundError naming the download command.
    """
    offline = is_offline() if offline is None else offline
    if checkpoint is not None and "://" not in str(checkpoint):
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"SAM checkpoint not found: {path}")
        return path
    cache = Path(cache_dir) if cache_dir else model_dir() / "sam"
    if checkpoint is None:
        if model_type not in SAM_CHECKPOINTS:
            raise ValueError(f"no official checkpoint for SAM model type {model_type!r}; pass sam_checkpoint")
        known = SAM_CHECKPOINTS[model_type]
        base = os.environ.get("HYBRIDGL_SAM_BASE_URL", SAM_BASE_URL)
        url = base.rstrip("/") + "/" + known.filename
        sha256 = sha256 or os.environ.get("HYBRIDGL_SAM_SHA256") or known.sha256
        target = cache / known.filename
    else:
        url = str(checkpoint)
        target = cache / Path(urlparse(url).path).name
    if target.is_file():
        return target
    if offline:
        raise FileNotFoundError(f"SAM checkpoint {target} is missing and downloads are off (offline mode); "
                                f"fetch it first with `python -m hybridgl.weights download --sam {model_type}`")
    return download(url, target, sha256=sha256, progress=progress)


def clip_local_dir(name: str, cache_dir=None) -> Path:
    return (Path(cache_dir) if cache_dir else model_dir() / "clip") / name.replace("/", "--")


def resolve_clip(name_or_path: str, *, cache_dir=None, offline: bool | None = None) -> str:
    """A local directory holding the CLIP model and tokenizer for a Hugging Face id or a directory."""
    if Path(name_or_path).expanduser().is_dir():
        return str(Path(name_or_path).expanduser())
    local = clip_local_dir(name_or_path, cache_dir)
    if (local / "config.json").is_file():
        return str(local)
    offline = is_offline() if offline is None else offline
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name_or_path, local_files_only=offline)
    except Exception as exc:
        if offline:
            raise FileNotFoundError(f"CLIP {name_or_path!r} is not in the cache and downloads are off (offline "
                                    f"mode); fetch it first with `python -m hybridgl.weights download --clip "
                                    f"{name_or_path}`") from exc
        raise


def download_clip(name: str = DEFAULT_CLIP, cache_dir=None) -> Path:
    from huggingface_hub import snapshot_download

    target = clip_local_dir(name, cache_dir)
    snapshot_download(name, local_dir=str(target),
                      allow_patterns=["*.json", "*.txt", "*.safetensors"], ignore_patterns=["*onnx*", "*.msgpack"])
    return target


def download_stanza(directory: Path | None = None) -> Path:
    import stanza

    directory = Path(directory) if directory else stanza_dir()
    kwargs = {"resources_url": os.environ["HYBRIDGL_STANZA_URL"]} if os.environ.get("HYBRIDGL_STANZA_URL") else {}
    stanza.download("en", model_dir=str(directory), processors=STANZA_PROCESSORS, **kwargs)
    return directory


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def check(sam: str | None = "vit_h", clip: str | None = DEFAULT_CLIP, stanza: bool = True) -> list[dict]:
    """What is present and what is missing: rows of {"what", "path", "present", "bytes"}."""
    rows = []
    if sam:
        path = model_dir() / "sam" / SAM_CHECKPOINTS[sam].filename
        rows.append({"what": f"SAM {sam}", "path": str(path), "present": path.is_file(), "bytes": _size(path)})
    if clip:
        path = Path(clip) if Path(clip).is_dir() else clip_local_dir(clip)
        rows.append({"what": f"CLIP {clip}", "path": str(path), "present": (path / "config.json").is_file(),
                     "bytes": _size(path)})
    if stanza:
        path = stanza_dir() / "en"
        rows.append({"what": "stanza English", "path": str(path), "present": (path / "depparse").is_dir(),
                     "bytes": _size(path)})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hybridgl.weights", description=__doc__.split("\n\n")[0])
    ap.add_argument("action", nargs="?", choices=["download", "check"], default="check")
    ap.add_argument("--check", action="store_true", help="same as the check action")
    ap.add_argument("--sam", default="vit_h", help="SAM type to fetch (vit_h, vit_l, vit_b; 'none' to skip)")
    ap.add_argument("--clip", default=DEFAULT_CLIP, help="CLIP Hugging Face id ('none' to skip)")
    ap.add_argument("--stanza", action="store_true", help="also stanza's English models")
    ap.add_argument("--model-dir", help="where weights live (default: MODEL_DIR or ~/.cache/hybridgl)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.model_dir:
        os.environ["MODEL_DIR"] = args.model_dir
    sam = None if args.sam.lower() == "none" else args.sam
    clip = None if args.clip.lower() == "none" else args.clip
    if args.action == "download" and not args.check:
        if is_offline():
            print("error: offline mode (HF_HUB_OFFLINE/HYBRIDGL_OFFLINE) is on: nothing can be downloaded",
                  file=sys.stderr)
            return 2
        try:
            if sam:
                print(resolve_sam_checkpoint(sam))
            if clip:
                print(download_clip(clip))
            if args.stanza:
                print(download_stanza())
        except Exception as exc:  # one line for the user, not a traceback
            print(f"error: {exc}", file=sys.stderr)
            return 1
    rows = check(sam, clip, args.stanza)
    width = max(len(r["what"]) for r in rows) if rows else 0
    for r in rows:
        state = f"present  {r['bytes'] / 1e6:10.1f} MB" if r["present"] else "MISSING"
        print(f"{r['what']:<{width}}  {state}  {r['path']}")
    return 0 if all(r["present"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
