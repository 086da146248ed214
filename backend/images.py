"""Getting a task's image: from Label Studio (uploads, local files, cloud storage), disk, or allowed hosts.

Every failure is a TaskError for that task. Tokens are sent only to the Label Studio host and
never logged.
"""
from __future__ import annotations

import base64
import io
import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, unquote, urljoin, urlparse

import numpy as np
import requests
from PIL import Image, ImageOps, UnidentifiedImageError

from .labeling import TaskError
from .settings import Settings

log = logging.getLogger("backend.images")

CLOUD_SCHEMES = ("s3", "gs", "azure-blob")
MAX_REDIRECTS = 5


@dataclass(frozen=True)
class LabelStudioConnection:
    """Where Label Studio is and the token to read its files with (from /setup, else the environment)."""

    url: str | None = None
    token: str | None = None

    def __repr__(self) -> str:  # never show the token
        return f"LabelStudioConnection(url={self.url!r}, token={'***' if self.token else None})"


def _mb(n: int) -> str:
    return f"{n / 2**20:g}"


def _is_jwt(token: str) -> bool:
    parts = token.split(".")
    if len(parts) != 3:
        return False
    try:
        header = json.loads(base64.urlsafe_b64decode(parts[0] + "=" * (-len(parts[0]) % 4)))
        return isinstance(header, dict)
    except ValueError:
        return False


class LabelStudioAuth:
    """The Authorization header for Label Studio: legacy tokens as `Token`, personal access tokens
    (JWT refresh tokens) exchanged at /api/token/refresh for short-lived `Bearer` tokens (cached)."""

    def __init__(self, timeout: float = 10.0):
        self.timeout = timeout
        self._lock = threading.Lock()
        self._access: dict[tuple[str, str], tuple[str, float]] = {}

    def forget(self, host: str, token: str) -> None:
        with self._lock:
            self._access.pop((host, token), None)

    def header(self, host: str, token: str | None) -> dict[str, str]:
        if not token:
            return {}
        if not _is_jwt(token):
            return {"Authorization": f"Token {token}"}
        with self._lock:
            cached = self._access.get((host, token))
            if cached and cached[1] > time.time():
                return {"Authorization": f"Bearer {cached[0]}"}
        try:
            r = requests.post(f"{host}/api/token/refresh", json={"refresh": token}, timeout=self.timeout)
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise TaskError("unreachable", f"Label Studio at {host} is unreachable ({exc.__class__.__name__})") from exc
        except requests.RequestException as exc:
            raise TaskError("auth", f"could not refresh the personal access token at {host} "
                                    f"({exc.__class__.__name__})") from exc
        try:
            r.raise_for_status()
            access = r.json()["access"]
        except (requests.RequestException, KeyError, ValueError, TypeError) as exc:
            raise TaskError("auth", f"Label Studio at {host} refused the personal access token "
                                    f"(HTTP {r.status_code} at /api/token/refresh)") from exc
        with self._lock:
            self._access[(host, token)] = (access, time.time() + 240)  # access tokens live ~5 minutes
        return {"Authorization": f"Bearer {access}"}


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Bytes -> EXIF-transposed RGB uint8 [H,W,3]; 16-bit, CMYK, grey, palette and alpha handled."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > max_pixels:
                raise TaskError("bad_image", f"image of {im.width}x{im.height} pixels exceeds "
                                             f"HYBRIDGL_MAX_IMAGE_PIXELS={max_pixels}")
            im.load()
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
                a = np.asarray(im).astype(np.float64)
                top = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
                grey = (a / top * 255).clip(0, 255).astype(np.uint8)
                return np.repeat(grey[..., None], 3, axis=2)
            if im.mode == "F":
                a = np.nan_to_num(np.asarray(im, dtype=np.float64))
                grey = ((a - a.min()) / max(float(np.ptp(a)), 1e-12) * 255).astype(np.uint8)
                return np.repeat(grey[..., None], 3, axis=2)
            if im.mode in ("RGBA", "LA", "P", "PA", "RGBa", "La"):
                im = im.convert("RGBA").convert("RGB")  # alpha dropped: the colours as stored
            elif im.mode != "RGB":
                im = im.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV
            out = np.asarray(im, dtype=np.uint8).copy()
    except TaskError:
        raise
    except Image.DecompressionBombError as exc:
        raise TaskError("bad_image", f"image refused as a decompression bomb: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise TaskError("bad_image", "the file is not an image Pillow can read") from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise TaskError("bad_image", f"the image could not be decoded ({exc})") from exc
    if out.ndim != 3 or out.shape[2] != 3 or 0 in out.shape:
        raise TaskError("bad_image", f"the image decoded to an unusable shape {out.shape}")
    return out


class ImageFetcher:
    """Resolves a task's image reference to bytes, as Label Studio stores it."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.auth = LabelStudioAuth(timeout=min(10.0, settings.fetch_timeout))
        self.default = LabelStudioConnection(settings.label_studio_url, settings.label_studio_api_key)

    # -- HTTP -------------------------------------------------------------------------------------
    def _download(self, url: str, headers: dict, allow_redirects: bool = True) -> requests.Response:
        """A streamed GET; the caller closes it. Network failures become TaskErrors."""
        try:
            return requests.get(url, headers=headers, stream=True, timeout=self.settings.fetch_timeout,
                                allow_redirects=allow_redirects)
        except (requests.ConnectionError, requests.Timeout) as exc:
            host = urlparse(url).netloc
            raise TaskError("unreachable", f"could not reach {host} for the image ({exc.__class__.__name__})") from exc
        except requests.RequestException as exc:
            raise TaskError("fetch", f"could not download the image: {exc.__class__.__name__}") from exc

    def _read(self, r: requests.Response, url: str) -> bytes:
        shown = url.split("?")[0]
        if r.status_code in (401, 403):
            raise TaskError("auth", f"the image download was refused (HTTP {r.status_code}) for {shown}: "
                                    "check the Label Studio token (LABEL_STUDIO_API_KEY or the one /setup sends)")
        if r.status_code == 404:
            raise TaskError("missing_image", f"image not found (HTTP 404) at {shown}")
        if r.status_code >= 300:  # Label Studio 1.23 answers 500 for a missing upload
            raise TaskError("fetch", f"image download failed: HTTP {r.status_code} for {shown}")
        limit = self.settings.max_image_bytes
        declared = r.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise TaskError("bad_image", f"image of {int(declared)} bytes exceeds HYBRIDGL_MAX_IMAGE_MB={_mb(limit)}")
        out = io.BytesIO()
        try:
            for block in r.iter_content(1 << 16):
                out.write(block)
                if out.tell() > limit:
                    raise TaskError("bad_image", f"image larger than HYBRIDGL_MAX_IMAGE_MB={_mb(limit)}")
        except requests.RequestException as exc:
            raise TaskError("fetch", f"the image download broke off ({exc.__class__.__name__})") from exc
        return out.getvalue()

    def _ls_get(self, path_or_url: str, ls: LabelStudioConnection) -> bytes:
        """From Label Studio with its token; redirects (presigned cloud URLs) are followed, and
        requests drops the Authorization header when a redirect leaves the Label Studio host."""
        if not ls.url:
            raise TaskError("no_label_studio", "the image lives in Label Studio but its URL is unknown: "
                                               "set LABEL_STUDIO_URL (or connect the backend from Label Studio)")
        url = path_or_url if "://" in path_or_url else ls.url + path_or_url
        for attempt in (0, 1):
            with self._download(url, self.auth.header(ls.url, ls.token)) as r:
                if r.status_code == 401 and attempt == 0 and ls.token and _is_jwt(ls.token):
                    self.auth.forget(ls.url, ls.token)  # an access token that expired early: refresh once
                    continue
                return self._read(r, url)
        raise AssertionError("unreachable")

    def _foreign_get(self, url: str) -> bytes:
        """From an allow-listed host, without any token; each redirect must stay on allowed hosts."""
        for _ in range(MAX_REDIRECTS + 1):
            self._check_allowed(url)
            with self._download(url, {}, allow_redirects=False) as r:
                if r.is_redirect and r.headers.get("Location"):
                    url = urljoin(url, r.headers["Location"])
                    continue
                return self._read(r, url)
        raise TaskError("fetch", f"too many redirects for {url.split('?')[0]}")

    def _check_allowed(self, url: str) -> None:
        parsed = urlparse(url)
        if parsed.scheme not in ("http", "https"):
            raise TaskError("forbidden", f"image URL scheme {parsed.scheme!r} is not allowed")
        allowed = self.settings.allowed_hosts
        if "*" not in allowed and (parsed.hostname or "").lower() not in allowed:
            raise TaskError("forbidden", f"images from {parsed.hostname} are not allowed "
                                         "(add the host to HYBRIDGL_ALLOWED_HOSTS)")

    # -- references -------------------------------------------------------------------------------
    def _local_file(self, url: str) -> bytes:
        root = self.settings.local_files_root
        rel = unquote(parse_qs(urlparse(url).query).get("d", [""])[0])
        if not rel:
            raise TaskError("missing_image", "a /data/local-files/ URL without ?d=<path>")
        real_root = Path(root).resolve()
        path = (real_root / rel).resolve()
        if not path.is_relative_to(real_root):
            raise TaskError("forbidden", "local file path outside LOCAL_FILES_DOCUMENT_ROOT refused")
        if not path.is_file():
            raise TaskError("missing_image", f"local file not found: {rel}")
        if path.stat().st_size > self.settings.max_image_bytes:
            raise TaskError("bad_image", f"image larger than HYBRIDGL_MAX_IMAGE_MB={_mb(self.settings.max_image_bytes)}")
        return path.read_bytes()

    def fetch(self, url: str, task_id: int | None = None, ls: LabelStudioConnection | None = None) -> bytes:
        """The bytes of a task's image reference; `ls` defaults to the environment's Label Studio."""
        ls = ls or self.default
        if not isinstance(url, str) or not url.strip():
            raise TaskError("missing_image", "the task has no image URL")
        url = url.strip()
        parsed = urlparse(url)
        if url.startswith("/data/local-files/") and self.settings.local_files_root is not None:
            return self._local_file(url)
        if url.startswith("/"):
            return self._ls_get(url, ls)
        if parsed.scheme in CLOUD_SCHEMES:
            if task_id is None:
                raise TaskError("fetch", "a cloud storage URI needs the task id to be presigned")
            encoded = base64.urlsafe_b64encode(url.encode()).decode()
            return self._ls_get(f"/tasks/{task_id}/presign/?fileuri={encoded}", ls)
        if parsed.scheme in ("http", "https"):
            if ls.url and urlparse(ls.url).netloc == parsed.netloc:
                return self._ls_get(url, ls)
            return self._foreign_get(url)
        raise TaskError("fetch", f"unsupported image reference: {url[:80]!r}")

    def load(self, url: str, task_id: int | None = None,
             ls: LabelStudioConnection | None = None) -> tuple[bytes, np.ndarray]:
        data = self.fetch(url, task_id, ls)
        return data, decode_image(data, self.settings.max_image_pixels)
