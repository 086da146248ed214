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
from urllib.parse import parse_qs, unquote, urlparse

import numpy as np
import requests
from PIL import Image, ImageOps, UnidentifiedImageError

from .labeling import TaskError
from .settings import Settings

log = logging.getLogger("backend.images")

CLOUD_SCHEMES = ("s3", "gs", "azure-blob")


def _is_jwt(token: str) -> bool:
    parts = token.split(".")
    if len(parts) != 3:
        return False
    try:
        json.loads(base64.urlsafe_b64decode(parts[0] + "=" * (-len(parts[0]) % 4)))
        return True
    except ValueError:
        return False


class LabelStudioAuth:
    """The Authorization header for Label Studio: legacy tokens as `Token`, personal access tokens
    (JWT refresh tokens) exchanged at /api/token/refresh for short-lived `Bearer` tokens."""

    def __init__(self, timeout: float = 10.0):
        self.timeout = timeout
        self._lock = threading.Lock()
        self._access: dict[tuple[str, str], tuple[str, float]] = {}

    def header(self, host: str, token: str) -> dict[str, str]:
        if not _is_jwt(token):
            return {"Authorization": f"Token {token}"}
        with self._lock:
            cached = self._access.get((host, token))
            if cached and cached[1] > time.time():
                return {"Authorization": f"Bearer {cached[0]}"}
        try:
            r = requests.post(f"{host}/api/token/refresh", json={"refresh": token}, timeout=self.timeout)
            r.raise_for_status()
            access = r.json()["access"]
        except (requests.RequestException, KeyError, ValueError) as exc:
            raise TaskError("auth", f"could not refresh the personal access token at {host} "
                                    f"({exc.__class__.__name__})") from exc
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
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                a = np.asarray(im).astype(np.float64)
                top = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
                grey = (a / top * 255).clip(0, 255).astype(np.uint8)
                return np.repeat(grey[..., None], 3, axis=2)
            if im.mode == "F":
                a = np.asarray(im)
                grey = ((a - a.min()) / max(float(np.ptp(a)), 1e-12) * 255).astype(np.uint8)
                return np.repeat(grey[..., None], 3, axis=2)
            if im.mode in ("RGBA", "LA", "P", "PA"):
                im = im.convert("RGBA").convert("RGB")
            elif im.mode != "RGB":
                im = im.convert("RGB")
            return np.asarray(im, dtype=np.uint8).copy()
    except TaskError:
        raise
    except Image.DecompressionBombError as exc:
        raise TaskError("bad_image", f"image refused as a decompression bomb: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise TaskError("bad_image", "the file is not an image Pillow can read") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise TaskError("bad_image", f"the image could not be decoded ({exc})") from exc


class ImageFetcher:
    """Resolves a task's image reference to bytes, as Label Studio stores it."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.auth = LabelStudioAuth()
        self._lock = threading.Lock()
        self.host = settings.label_studio_url
        self.token = settings.label_studio_api_key

    def set_label_studio(self, hostname: str | None, access_token: str | None) -> None:
        """What /setup sends takes precedence over the environment."""
        with self._lock:
            if hostname:
                self.host = hostname.rstrip("/")
            if access_token:
                self.token = access_token

    def _ls(self) -> tuple[str, str | None]:
        with self._lock:
            host, token = self.host, self.token
        if not host:
            raise TaskError("no_label_studio", "the image lives in Label Studio but its URL is unknown: "
                                               "set LABEL_STUDIO_URL (or connect the backend from Label Studio)")
        return host, token

    def _get(self, url: str, headers: dict | None = None) -> bytes:
        limit = self.settings.max_image_bytes
        try:
            with requests.get(url, headers=headers or {}, stream=True, timeout=self.settings.fetch_timeout) as r:
                if r.status_code in (401, 403):
                    raise TaskError("auth", f"Label Studio refused the image download ({r.status_code}): "
                                            "check LABEL_STUDIO_API_KEY / the project's token")
                if r.status_code == 404:
                    raise TaskError("missing_image", f"image not found ({url.split('?')[0]})")
                if r.status_code >= 400:  # Label Studio 1.23 answers 500 for a missing upload
                    raise TaskError("fetch", f"image download failed: HTTP {r.status_code} for {url.split('?')[0]}")
                out = io.BytesIO()
                for block in r.iter_content(1 << 16):
                    out.write(block)
                    if out.tell() > limit:
                        raise TaskError("bad_image", f"image larger than HYBRIDGL_MAX_IMAGE_MB="
                                                     f"{limit // (1024 * 1024)}")
                return out.getvalue()
        except TaskError:
            raise
        except requests.RequestException as exc:
            raise TaskError("fetch", f"could not download the image: {exc.__class__.__name__}") from exc

    def _ls_get(self, path: str) -> bytes:
        host, token = self._ls()
        headers = self.auth.header(host, token) if token else {}
        return self._get(host + path, headers)

    def fetch(self, url: str, task_id: int | None = None) -> bytes:
        if not isinstance(url, str) or not url.strip():
            raise TaskError("missing_image", "the task has no image URL")
        url = url.strip()
        parsed = urlparse(url)
        if url.startswith("/data/local-files/"):
            root = self.settings.local_files_root
            if root is None:
                return self._ls_get(url)
            rel = unquote(parse_qs(parsed.query).get("d", [""])[0])
            path = (root / rel).resolve()
            if not path.is_relative_to(root.resolve()):
                raise TaskError("forbidden", "local file path outside LOCAL_FILES_DOCUMENT_ROOT refused")
            if not path.is_file():
                raise TaskError("missing_image", f"local file not found: {rel}")
            return path.read_bytes()
        if url.startswith("/"):
            return self._ls_get(url)
        if parsed.scheme in CLOUD_SCHEMES:
            if task_id is None:
                raise TaskError("fetch", "a cloud storage URI needs the task id to be presigned")
            encoded = base64.urlsafe_b64encode(url.encode()).decode()
            return self._ls_get(f"/tasks/{task_id}/presign/?fileuri={encoded}")
        if parsed.scheme in ("http", "https"):
            host, token = self.host, self.token
            if host and urlparse(host).netloc == parsed.netloc:
                return self._get(url, self.auth.header(host, token) if token else {})
            allowed = self.settings.allowed_hosts
            if "*" in allowed or (parsed.hostname or "").lower() in allowed:
                return self._get(url)
            raise TaskError("forbidden", f"images from {parsed.hostname} are not allowed "
                                         "(add the host to HYBRIDGL_ALLOWED_HOSTS)")
        raise TaskError("fetch", f"unsupported image reference: {url[:80]}")

    def load(self, url: str, task_id: int | None = None) -> tuple[bytes, np.ndarray]:
        data = self.fetch(url, task_id)
        return data, decode_image(data, self.settings.max_image_pixels)

