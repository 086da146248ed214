"""The backend's configuration, read once from the environment (documented in the README)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    return int(raw) if raw else default


def _list(name: str) -> tuple[str, ...]:
    return tuple(h.strip().lower() for h in os.environ.get(name, "").split(",") if h.strip())


@dataclass(frozen=True)
class Settings:
    clip_model: str = "openai/clip-vit-base-patch16"
    sam_model: str = "vit_h"
    sam_checkpoint: str | None = None
    parser: str = "auto"
    config: str | None = None  # JSON/TOML of HybridGLConfig overrides
    alternatives: int = 1  # predictions per task: the best mask and the next k-1 ranked ones
    device: str | None = None
    model_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "hybridgl")
    label_studio_url: str | None = None
    label_studio_api_key: str | None = None
    basic_auth_user: str | None = None
    basic_auth_pass: str | None = None
    local_files_root: Path | None = None
    allowed_hosts: tuple[str, ...] = ()  # other http(s) hosts images may come from ("*": any)
    cache_images: int = 16  # prepared images kept (LRU keyed by image content)
    max_image_bytes: int = 64 * 1024 * 1024
    max_image_pixels: int = 60_000_000
    max_text_chars: int = 2000
    fetch_timeout: float = 30.0

    @classmethod
    def from_env(cls) -> "Settings":
        env = os.environ.get
        return cls(
            clip_model=env("HYBRIDGL_CLIP_MODEL") or cls.clip_model,
            sam_model=env("HYBRIDGL_SAM_MODEL") or cls.sam_model,
            sam_checkpoint=env("HYBRIDGL_SAM_CHECKPOINT") or None,
            parser=env("HYBRIDGL_PARSER") or cls.parser,
            config=env("HYBRIDGL_CONFIG") or None,
            alternatives=max(1, _int("HYBRIDGL_ALTERNATIVES", 1)),
            device=env("DEVICE") or None,
            model_dir=Path(env("MODEL_DIR")) if env("MODEL_DIR") else Path.home() / ".cache" / "hybridgl",
            label_studio_url=(env("LABEL_STUDIO_URL") or env("LABEL_STUDIO_HOST") or "").rstrip("/") or None,
            label_studio_api_key=env("LABEL_STUDIO_API_KEY") or env("LABEL_STUDIO_ACCESS_TOKEN") or None,
            basic_auth_user=env("BASIC_AUTH_USER") or None,
            basic_auth_pass=env("BASIC_AUTH_PASS") or None,
            local_files_root=Path(env("LOCAL_FILES_DOCUMENT_ROOT") or env("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT"))
            if (env("LOCAL_FILES_DOCUMENT_ROOT") or env("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT")) else None,
            allowed_hosts=_list("HYBRIDGL_ALLOWED_HOSTS"),
            cache_images=max(0, _int("HYBRIDGL_CACHE_IMAGES", 16)),
            max_image_bytes=_int("HYBRIDGL_MAX_IMAGE_MB", 64) * 1024 * 1024,
            max_image_pixels=_int("HYBRIDGL_MAX_IMAGE_PIXELS", 60_000_000),
            max_text_chars=_int("HYBRIDGL_MAX_TEXT_CHARS", 2000),
        )
