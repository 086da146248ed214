"""The backend's configuration, read once from the environment (documented in docs/backend.md)."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from hybridgl import weights

from .outbound import AddressPolicy, ForbiddenTarget, parse_target

DEFAULT_CLIP = "openai/clip-vit-base-patch16"


class SettingsError(ValueError):
    """A bad environment setting: the server refuses to start, naming the variable."""


def _int(name: str, default: int, minimum: int = 0) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise SettingsError(f"{name}={value} must be at least {minimum}")
    return value


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:  # nan and inf pass `<= 0` and fail every request later
        raise SettingsError(f"{name}={raw!r} must be a positive, finite number")
    return value


def _list(name: str) -> tuple[str, ...]:
    return tuple(h.strip().lower() for h in os.environ.get(name, "").split(",") if h.strip())


@dataclass(frozen=True)
class Settings:
    clip_model: str = DEFAULT_CLIP
    sam_model: str = "vit_h"  # vit_h | vit_l | vit_b | package.module:builder | none
    sam_checkpoint: str | None = None
    parser: str = "auto"
    config: str | None = None  # HybridGLConfig overrides: a JSON/TOML file, or inline JSON ("{...}")
    alternatives: int = 1  # predictions per task: the best mask and the next k-1 ranked ones
    device: str | None = None
    # weights and backend files: MODEL_DIR read as the weights read it, so both agree
    model_dir: Path = field(default_factory=weights.model_dir)
    label_studio_url: str | None = None
    label_studio_api_key: str | None = None
    basic_auth_user: str | None = None
    basic_auth_pass: str | None = None
    local_files_root: Path | None = None
    allowed_hosts: tuple[str, ...] = ()  # other http(s) hosts images may come from ("*": any)
    allowed_networks: tuple[str, ...] = ()  # non-public networks those hosts may resolve to (CIDRs)
    webhook_secret: str | None = None  # lets Label Studio's webhook in without basic auth
    cache_images: int = 16  # prepared images kept (LRU keyed by image content)
    cache_mb: int = 4096  # ... and the memory they may hold together
    max_image_bytes: int = 64 * 1024 * 1024
    max_image_pixels: int = 60_000_000
    max_text_chars: int = 2000
    max_tasks: int = 1000  # tasks in one /predict request
    fetch_timeout: float = 30.0
    max_queue: int = 4  # /predict requests waiting for or holding the model; past it 503 (backend/admission.py)
    retry_after: int = 10  # seconds a refused /predict is told to wait (Retry-After)

    @classmethod
    def from_env(cls) -> "Settings":
        env = os.environ.get
        local_root = env("LOCAL_FILES_DOCUMENT_ROOT") or env("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT")
        return cls(
            clip_model=env("HYBRIDGL_CLIP_MODEL") or DEFAULT_CLIP,
            sam_model=env("HYBRIDGL_SAM_MODEL") or "vit_h",
            sam_checkpoint=env("HYBRIDGL_SAM_CHECKPOINT") or None,
            parser=env("HYBRIDGL_PARSER") or "auto",
            config=(env("HYBRIDGL_CONFIG") or "").strip() or None,
            alternatives=_int("HYBRIDGL_ALTERNATIVES", 1, minimum=1),
            device=env("DEVICE") or None,
            model_dir=weights.model_dir(),
            label_studio_url=(env("LABEL_STUDIO_URL") or env("LABEL_STUDIO_HOST") or "").rstrip("/") or None,
            label_studio_api_key=env("LABEL_STUDIO_API_KEY") or env("LABEL_STUDIO_ACCESS_TOKEN") or None,
            basic_auth_user=env("BASIC_AUTH_USER") or None,
            basic_auth_pass=env("BASIC_AUTH_PASS") or None,
            local_files_root=Path(local_root) if local_root else None,
            allowed_hosts=_list("HYBRIDGL_ALLOWED_HOSTS"),
            allowed_networks=_list("HYBRIDGL_ALLOWED_NETWORKS"),
            webhook_secret=env("HYBRIDGL_WEBHOOK_SECRET") or None,
            cache_images=_int("HYBRIDGL_CACHE_IMAGES", 16),
            cache_mb=_int("HYBRIDGL_CACHE_MB", 4096, minimum=1),
            max_image_bytes=_int("HYBRIDGL_MAX_IMAGE_MB", 64, minimum=1) * 1024 * 1024,
            max_image_pixels=_int("HYBRIDGL_MAX_IMAGE_PIXELS", 60_000_000, minimum=1),
            max_text_chars=_int("HYBRIDGL_MAX_TEXT_CHARS", 2000, minimum=1),
            max_tasks=_int("HYBRIDGL_MAX_TASKS", 1000, minimum=1),
            fetch_timeout=_float("HYBRIDGL_FETCH_TIMEOUT", 30.0),
            max_queue=_int("HYBRIDGL_MAX_QUEUE", 4, minimum=1),
            retry_after=_int("HYBRIDGL_RETRY_AFTER", 10, minimum=1),
        )

    def __post_init__(self):
        # a user without a password would lock Label Studio out; a password alone would protect nothing
        if bool(self.basic_auth_user) != bool(self.basic_auth_pass):
            raise SettingsError("BASIC_AUTH_USER and BASIC_AUTH_PASS must be set together (one of them is empty)")
        try:
            AddressPolicy.from_settings(self.allowed_hosts, self.allowed_networks)
        except ValueError as exc:
            raise SettingsError(f"HYBRIDGL_ALLOWED_NETWORKS: {exc}") from None
        if self.label_studio_url:
            try:
                parse_target(self.label_studio_url)
            except ForbiddenTarget as exc:
                raise SettingsError(f"LABEL_STUDIO_URL: {exc}") from None
        if self.config is not None:  # now, not once the weights are found (or downloaded) and loaded
            from hybridgl.config import HybridGLConfig

            values = self.hybridgl_config()  # SettingsError for bad JSON or a missing file
            try:
                HybridGLConfig.load(values)
            except (ValueError, TypeError, OSError) as exc:
                raise SettingsError(f"HYBRIDGL_CONFIG: {exc}") from None

    def replace(self, **changes: Any) -> "Settings":
        return replace(self, **changes)

    def hybridgl_config(self) -> dict | str | None:
        """HYBRIDGL_CONFIG as `HybridGL.from_pretrained(config=...)` takes it: inline JSON -> dict, else a path."""
        if self.config is None:
            return None
        if self.config.lstrip().startswith("{"):
            try:
                values = json.loads(self.config)
            except json.JSONDecodeError as exc:
                raise SettingsError(f"HYBRIDGL_CONFIG is not valid JSON: {exc}") from None
            if isinstance(values, dict) and set(values) == {"hybridgl"}:
                values = values["hybridgl"]
            return values
        if not Path(self.config).expanduser().is_file():
            raise SettingsError(f"HYBRIDGL_CONFIG: no such file {self.config!r} (give a JSON/TOML file or inline JSON)")
        return str(Path(self.config).expanduser())

    def describe(self) -> dict[str, Any]:
        """The settings for logs: secrets masked."""
        out = {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}
        for secret in ("label_studio_api_key", "basic_auth_pass", "webhook_secret"):
            if out[secret]:
                out[secret] = "***"
        # URLs without user info or query (a presigned signature)
        return {k: weights.shown(v) if isinstance(v, str) and "://" in v else v for k, v in out.items()}
