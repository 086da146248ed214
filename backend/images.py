"""Getting a task's image: from Label Studio (uploads, local files, cloud storage), disk, or allowed hosts.

Every failure is a TaskError for that task. Tokens are sent only to the Label Studio origin they
belong to and never logged; every other URL, and every redirect hop, is checked by `outbound`.
"""
from __future__ import annotations

import base64
import io
import json
import logging
import posixpath
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urljoin, urlparse

import numpy as np
import requests
import urllib3
from PIL import Image, UnidentifiedImageError

from hybridgl.pipeline import to_rgb_array

from .labeling import TaskError
from .outbound import AddressPolicy, ForbiddenTarget, Target, guarded_session, label_studio_policy, parse_target
from .settings import Settings

log = logging.getLogger("backend.images")

CLOUD_SCHEMES = ("s3", "gs", "azure-blob")
MAX_REDIRECTS = 5


@dataclass(frozen=True)
class LabelStudioConnection:
    """Where Label Studio is and the token to read its files with (from /setup, else the environment)."""

    url: str | None = None
    token: str | None = None

    @property
    def origin(self) -> tuple[str, str, int] | None:
        """(scheme, host, port) as the connection sees it; None without a (valid) URL."""
        try:
            return parse_target(self.url).origin if self.url else None
        except ForbiddenTarget:
            return None

    def __repr__(self) -> str:  # never show the token
        return f"LabelStudioConnection(url={self.url!r}, token={'***' if self.token else None})"


def _mb(n: int) -> str:
    return f"{n / 2**20:g}"


_HEADER_TOKEN = re.compile(r"[\x21-\x7e]+")  # Label Studio's tokens: hex (legacy) or base64url (JWT)


def header_safe(token: str) -> bool:
    """Whether an HTTP header can carry the token as it is: visible ASCII, no whitespace or control
    characters (a newline would be refused by `requests`, a non-Latin-1 character fail to encode)."""
    return bool(_HEADER_TOKEN.fullmatch(token))


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

    def __init__(self, timeout: float = 10.0, session: requests.Session | None = None):
        self.timeout = timeout
        self.session = session or requests.Session()  # the fetcher's: Label Studio's address policy
        self._lock = threading.Lock()
        self._access: dict[tuple[str, str], tuple[str, float]] = {}

    def forget(self, host: str, token: str) -> None:
        with self._lock:
            self._access.pop((host, token), None)

    def header(self, host: str, token: str | None) -> dict[str, str]:
        if not token:
            return {}
        if not header_safe(token):  # the token's problem, not the task's: nothing is recorded for it
            raise TaskError("auth", "the Label Studio token holds whitespace, control or non-ASCII characters "
                                    "that no HTTP header can carry: check LABEL_STUDIO_API_KEY or the one /setup sends")
        if not _is_jwt(token):
            return {"Authorization": f"Token {token}"}
        with self._lock:
            cached = self._access.get((host, token))
            if cached and cached[1] > time.time():
                return {"Authorization": f"Bearer {cached[0]}"}
        try:
            r = self.session.post(f"{host}/api/token/refresh", json={"refresh": token}, timeout=self.timeout,
                                  allow_redirects=False)  # the refresh token goes to Label Studio only
        except ForbiddenTarget as exc:
            raise TaskError("forbidden", str(exc)) from None
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
            out = to_rgb_array(im)  # the library's rule: EXIF, 16-bit and float grey, alpha
    except TaskError:
        raise
    except Image.DecompressionBombError as exc:
        raise TaskError("bad_image", f"image refused as a decompression bomb: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise TaskError("bad_image", "the file is not an image Pillow can read") from exc
    except (OSError, ValueError, SyntaxError, EOFError, NotImplementedError) as exc:  # NotImplementedError: a
        # format variant Pillow's plugin does not handle (a DDS pixel format), the file's problem too
        raise TaskError("bad_image", f"the image could not be decoded ({exc})") from exc
    if out.ndim != 3 or out.shape[2] != 3 or 0 in out.shape:
        raise TaskError("bad_image", f"the image decoded to an unusable shape {out.shape}")
    return out


TEMPORARY_STATUSES = (429, 502, 503, 504)  # too many requests, a proxy whose host is down or restarting


class ImageFetcher:
    """Resolves a task's image reference to bytes, as Label Studio stores it."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.default = LabelStudioConnection(settings.label_studio_url, settings.label_studio_api_key)
        self.policy = AddressPolicy.from_settings(settings.allowed_hosts, settings.allowed_networks)
        self.checked = guarded_session(self.policy)  # every connection not to Label Studio goes through it
        # Label Studio's origin: any address but the link-local metadata services
        self.ls_session = guarded_session(label_studio_policy(self.policy), trust_env=True)
        self.auth = LabelStudioAuth(timeout=min(10.0, settings.fetch_timeout), session=self.ls_session)

    # -- HTTP -------------------------------------------------------------------------------------
    def _download(self, session, target: Target, headers: dict) -> requests.Response:
        """One streamed GET, redirects not followed; the caller closes it. Failures become TaskErrors."""
        try:
            return session.get(target.url, headers=headers, stream=True, timeout=self.settings.fetch_timeout,
                               allow_redirects=False)
        except ForbiddenTarget as exc:  # the connection's own address check
            raise TaskError("forbidden", str(exc)) from None
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise TaskError("unreachable", f"could not reach {target.host} for the image "
                                           f"({exc.__class__.__name__})") from exc
        except requests.RequestException as exc:
            raise TaskError("fetch", f"could not download the image: {exc.__class__.__name__}") from exc

    def _read(self, r: requests.Response, target: Target) -> bytes:
        shown = target.shown()
        if r.status_code in (401, 403):
            raise TaskError("auth", f"the image download was refused (HTTP {r.status_code}) for {shown}: "
                                    "check the Label Studio token (LABEL_STUDIO_API_KEY or the one /setup sends)")
        if r.status_code == 404:
            raise TaskError("missing_image", f"image not found (HTTP 404) at {shown}")
        if r.status_code in TEMPORARY_STATUSES:  # not the task's failure: nothing stored, tried again later
            raise TaskError("unreachable", f"the image host is temporarily unavailable (HTTP {r.status_code}) "
                                           f"for {shown}")
        if r.status_code >= 300:  # Label Studio 1.23 answers 500 for a missing upload
            raise TaskError("fetch", f"image download failed: HTTP {r.status_code} for {shown}")
        limit = self.settings.max_image_bytes
        declared = r.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise TaskError("bad_image", f"image of {int(declared)} bytes exceeds HYBRIDGL_MAX_IMAGE_MB={_mb(limit)}")
        out = io.BytesIO()
        timeout = self.settings.fetch_timeout
        deadline = time.monotonic() + timeout  # the socket timeout bounds one read, this the whole body
        blocks = iter(lambda: r.raw.read1(1 << 16, decode_content=True), b"")  # what has arrived, not a full block
        try:
            for block in blocks:
                out.write(block)
                if out.tell() > limit:
                    raise TaskError("bad_image", f"image larger than HYBRIDGL_MAX_IMAGE_MB={_mb(limit)}")
                if time.monotonic() > deadline:
                    raise TaskError("fetch", f"the image download from {target.host} took longer than "
                                             f"HYBRIDGL_FETCH_TIMEOUT={timeout:g} s")
        except (requests.RequestException, urllib3.exceptions.HTTPError) as exc:  # a connection lost mid-body
            raise TaskError("unreachable", f"the image download broke off ({exc.__class__.__name__})") from exc
        return out.getvalue()

    def _get(self, url: str, ls: LabelStudioConnection | None) -> bytes:
        """GET an image, following up to MAX_REDIRECTS redirects by hand so that every hop is checked.

        With `ls` (a Label Studio reference): hops on Label Studio's origin carry its token and are
        trusted; hops elsewhere (presigned cloud URLs) carry no token and their addresses are checked.
        Without `ls` (another host): every hop must be on an allowed host, at a checked address, and
        no token is ever sent."""
        origin = ls.origin if ls is not None else None
        refreshed = False
        for _ in range(MAX_REDIRECTS + 1):
            try:
                target = parse_target(url)
                on_ls = origin is not None and target.origin == origin
                if ls is None:
                    self.policy.check_host(target)
            except ForbiddenTarget as exc:
                raise TaskError("forbidden", str(exc)) from None
            headers = self.auth.header(ls.url, ls.token) if on_ls else {}
            with self._download(self.ls_session if on_ls else self.checked, target, headers) as r:
                if r.is_redirect and r.headers.get("Location"):
                    url = urljoin(target.url, r.headers["Location"])
                    continue
                if r.status_code == 401 and on_ls and not refreshed and ls.token and _is_jwt(ls.token):
                    self.auth.forget(ls.url, ls.token)  # an access token that expired early: refresh once
                    refreshed = True
                    continue
                return self._read(r, target)
        raise TaskError("fetch", f"too many redirects for {url.split('?')[0]}")

    def _ls_get(self, path_or_url: str, ls: LabelStudioConnection) -> bytes:
        """From Label Studio with its token (see `_get` for where the token may go)."""
        if not ls.url or ls.origin is None:
            raise TaskError("no_label_studio", "the image lives in Label Studio but its URL is unknown: "
                                               "set LABEL_STUDIO_URL (or connect the backend from Label Studio)")
        return self._get(ls.url + path_or_url if path_or_url.startswith("/") else path_or_url, ls)

    # -- references -------------------------------------------------------------------------------
    def _local_file(self, url: str) -> bytes:
        root = self.settings.local_files_root
        # as Label Studio's /data/local-files/ view reads it: request.GET["d"] (decoded once, the last
        # value) with a leading "/" dropped (always relative to the root)
        values = parse_qs(urlparse(url).query, keep_blank_values=True).get("d")
        rel = posixpath.normpath(values[-1]).lstrip("/") if values and values[-1] else ""
        if not rel or rel == ".":
            raise TaskError("missing_image", "a /data/local-files/ URL without ?d=<path>")
        if "\x00" in rel:  # the OS cannot name such a file; Path would raise ValueError
            raise TaskError("forbidden", "local file path refused: it contains a NUL byte")
        try:
            real_root = Path(root).resolve()
            path = (real_root / rel).resolve()
            if not path.is_relative_to(real_root):
                raise TaskError("forbidden", "local file path outside LOCAL_FILES_DOCUMENT_ROOT refused")
            if not path.is_file():
                raise TaskError("missing_image", f"local file not found: {rel[:200]}")
            if path.stat().st_size > self.settings.max_image_bytes:
                raise TaskError("bad_image", f"image larger than HYBRIDGL_MAX_IMAGE_MB={_mb(self.settings.max_image_bytes)}")
            return path.read_bytes()
        except (OSError, RuntimeError) as exc:  # a name too long, a file it may not read; RuntimeError: a
            # loop of symbolic links (Path.resolve before Python 3.13)
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "a loop of symbolic links" \
                if isinstance(exc, RuntimeError) else str(exc)
            raise TaskError("missing_image", f"local file {rel[:200]!r} cannot be read ({reason})") from None

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
        if parsed.scheme in ("http", "https") or "://" in url:
            try:
                target = parse_target(url)
            except ForbiddenTarget as exc:
                raise TaskError("forbidden", str(exc)) from None
            if ls.origin is not None and target.origin == ls.origin:
                return self._ls_get(url, ls)
            return self._get(url, None)
        raise TaskError("fetch", f"unsupported image reference: {url[:80]!r}")

    def load(self, url: str, task_id: int | None = None,
             ls: LabelStudioConnection | None = None) -> tuple[bytes, np.ndarray]:
        data = self.fetch(url, task_id, ls)
        return data, decode_image(data, self.settings.max_image_pixels)
