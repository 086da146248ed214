"""Every hyperparameter of HybridGL in one frozen object (spec section 11).

The defaults reproduce the authors' reference code; each one may be overridden from a
JSON or TOML file (`HybridGLConfig.from_file`) or in code (`config.replace(alpha=0.5)`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

COLOUR_KEYS = ("fill_value", "image_mean", "image_std", "clip_mean", "clip_std")  # one value per RGB channel
FUSION_MODES = ("G2L", "L2G", "G2L+L2G", "G+L", "local", "global")
# What a prepared view holds depends on these (its working image, hybrid features and GEM tokens);
# the other keys decide how a view is read (SAM's, when proposals are given, guidance, scoring, speed).
VIEW_KEYS = ("max_image_side", "fusion_mode", "fusion_start_block", "beta", "fusion_weight", "clip_input_size",
             "blur_kernel", "fill_value", "image_mean", "image_std", "gem_blocks", "gem_input_size",
             "gem_iterations", "gem_temperature", "clip_mean", "clip_std")


@dataclass(frozen=True)
class HybridGLConfig:
    # 1. Mask proposals: SamAutomaticMaskGenerator settings.
    points_per_side: int = 8
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.7
    stability_score_thresh: float = 0.7
    box_nms_thresh: float = 0.7
    crop_n_layers: int = 0
    crop_n_points_downscale_factor: int = 1
    min_mask_region_area: int = 800
    # SAM's image encoder compute dtype (speed, not the method): None = float32, or float16 on a
    # GPU in the fast mode; "bfloat16" on a CPU where it is fast (AMX: SAM ~1.4x faster) moves mask
    # borders (and so may change proposals and choices): an explicit choice, never implied by `fast` on CPU.
    sam_dtype: str | None = None
    # Images larger than this (longest side, pixels) are downscaled for the model and the mask is
    # given back at the original size; None: never (see HybridGL.prepare for how this relates to the spec).
    max_image_side: int | None = 1024

    # 2. Hybrid global-local mask features.
    fusion_mode: str = "G2L"
    fusion_start_block: int = 9  # 0-indexed; the paper's "start layer 9"
    beta: float = 2.0  # weight of the token-masked global features in the hybrid input
    fusion_weight: float = 0.5  # "G+L" only: weight of the global feature in the weighted sum
    clip_input_size: int = 224
    blur_kernel: int = 15  # Gaussian blur of the global branch (sigma from the kernel, as OpenCV's 0)
    fill_value: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # ImageNet, as the reference code
    image_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    # CLIP compute dtype: float32 (default, golden-exact), float16, bfloat16; in the fast mode the low
    # precision of its hybrid-feature pass (float32: its own choice, see hybridgl/fast.low_precision)
    dtype: str = "float32"
    # masks per CLIP forward pass (speed and memory; features change in their last bits only,
    # and the fast mode's float32 rows use the same passes); None: 4 on CPU, where cache-sized
    # tensors run fastest, 32 on a GPU
    feature_batch_size: int | None = None

    # 3. Text features.
    sentence_weight: float = 0.5  # t = w * f(sentence) + (1 - w) * f(noun_phrase)
    other_prompt: str = "a photo of "

    # 6. Spatial relation guidance.
    use_relation: bool = True
    k1: int = 3
    k2: int = 6

    # 7. Spatial coherence map (GEM).
    use_coherence: bool = True
    gem_blocks: int = 6  # the last 6 residual blocks get the self-self attention path
    gem_input_size: int = 448
    gem_iterations: int = 1
    gem_temperature: float | None = None  # None: adaptive (mean token norm * head_dim ** -0.5)
    gem_prompt: str = "a photo of a {}."
    clip_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    clip_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

    # 8. Position prior.
    use_position_prior: bool = True
    vertical_prior: bool = False  # the reference code has up/down switched off

    # 9. Spatial guidance score.
    black: float = 1.8  # b; lambda = b / (2 - b) = 9
    black_big: float = 1.95
    black_small: float = 1.5

    # 10. Final fusion.
    alpha: float = 0.6

    # Speed, not the method: the fast mode computes hybrid features in low precision (float16 on a
    # GPU, where SAM's encoder also runs under autocast: see sam_dtype; bfloat16 on a CPU where it
    # measured faster than float32 when the model loaded; none on other CPUs; or `dtype`) and makes float32 the
    # features of any decision within that precision's measured error of a tie (hybridgl/fast.py).
    fast: bool = False
    fast_probes: int = 2  # masks per image computed in both precisions to measure the error
    fast_safety: float = 3.0  # the measured error is multiplied by this
    # after this many images in a row whose first expression needed float32 for nearly every mask,
    # compute float32 at once (trying low precision again every 8th image); 0: never skip
    fast_patience: int = 2

    # The reported confidence: softmax(F / score_temperature) share of the chosen candidate.
    score_temperature: float = 0.1

    # Calibration of that score (fitted by `python -m hybridgl tune`, hybridgl/calibration.py):
    # P(IoU >= 0.5) = sigmoid(coef[0] + sum_k coef[k+1] * feature_k). Empty: the score as above.
    calibration_features: tuple[str, ...] = ()
    calibration_coef: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        self._check_types()
        if self.fusion_mode not in FUSION_MODES:
            raise ValueError(f"fusion_mode must be one of {FUSION_MODES}, got {self.fusion_mode!r}")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {self.dtype!r}")
        if self.sam_dtype not in (None, "float32", "float16", "bfloat16"):
            raise ValueError(f"sam_dtype must be float32, float16, bfloat16 or None, got {self.sam_dtype!r}")
        if not 0 <= self.fusion_start_block <= 11:
            raise ValueError("fusion_start_block must lie in [0, 11]")
        if not 0 <= self.gem_blocks <= 12:
            raise ValueError("gem_blocks must lie in [0, 12] (the last blocks of CLIP's 12)")
        if self.k1 < 1 or self.k2 < 1:
            raise ValueError("k1 and k2 must be at least 1")
        for name in ("points_per_side", "points_per_batch", "crop_n_points_downscale_factor", "clip_input_size",
                     "gem_input_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in ("crop_n_layers", "gem_iterations"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be at least 0")
        if self.blur_kernel < 1 or self.blur_kernel % 2 == 0:
            raise ValueError("blur_kernel must be a positive odd number")
        for name in ("black", "black_big", "black_small"):
            if not 0.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must lie in [0, 2]")
        if self.max_image_side is not None and self.max_image_side < 64:
            raise ValueError("max_image_side must be at least 64 (or None)")
        if self.feature_batch_size is not None and self.feature_batch_size < 1:
            raise ValueError("feature_batch_size must be at least 1 (or None)")
        if self.fast_probes < 1 or self.fast_safety < 1:
            raise ValueError("fast_probes must be at least 1 and fast_safety at least 1")
        if self.fast_patience < 0:
            raise ValueError("fast_patience must be at least 0")
        if self.score_temperature <= 0:
            raise ValueError("score_temperature must be positive")
        for name in ("alpha", "sentence_weight", "fusion_weight"):  # the weights of mixes
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1]")
        for name in COLOUR_KEYS + ("calibration_coef",):
            raw = getattr(self, name)
            try:
                values = None if isinstance(raw, (str, bytes)) else tuple(float(v) for v in raw)
            except (TypeError, ValueError):
                values = None
            # per channel, broadcast against [3,1,1]: another length failed inside torch at the first image
            if name in COLOUR_KEYS and (values is None or len(values) != 3):
                raise ValueError(f"{name} must be 3 numbers (R, G, B), got {raw!r}")
            if values is None:
                raise ValueError(f"{name} must be a list of numbers, got {raw!r}")
            if not all(math.isfinite(v) for v in values):
                raise ValueError(f"{name} must be finite, got {values!r}")
            object.__setattr__(self, name, values)
        try:  # filled with the noun phrase at every expression: a bad template failed only there
            takes_phrase = self.gem_prompt.format("\0") != self.gem_prompt.format("")
        except (IndexError, KeyError, ValueError):
            takes_phrase = False
        if not takes_phrase:
            raise ValueError(f"gem_prompt must hold one {{}} for the noun phrase, got {self.gem_prompt!r}")
        if self.gem_temperature is not None and self.gem_temperature <= 0:
            raise ValueError("gem_temperature must be positive (or None: adaptive)")
        for name in ("image_std", "clip_std"):
            if min(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be positive")
        object.__setattr__(self, "calibration_features", tuple(str(v) for v in self.calibration_features))
        if self.calibration_features or self.calibration_coef:
            from .calibration import check_calibration  # noqa: PLC0415 - the feature names live there

            check_calibration(self.calibration_features, self.calibration_coef)

    def _check_types(self) -> None:
        """Each scalar key holds its annotated type: a switch a bool (the string "False" is truthy), a
        count an integer, a weight a number. numpy numbers become Python ones, a weight a float (the
        fingerprint is JSON: 1 and 1.0 would differ)."""
        for f in dataclasses.fields(self):
            kind = str(f.type).replace(" | None", "")
            if kind not in ("bool", "int", "float", "str"):
                continue  # tuples: converted below
            value = getattr(self, f.name)
            if value is None:
                if not str(f.type).endswith("| None"):
                    raise ValueError(f"{f.name} must be a {kind}, got None")
                continue
            if kind == "bool":
                ok = isinstance(value, bool)
            elif kind == "str":
                ok = isinstance(value, str)
            else:
                ok = not isinstance(value, bool) and isinstance(
                    value, numbers.Integral if kind == "int" else numbers.Real)
            if not ok:
                what = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string"}[kind]
                raise ValueError(f"{f.name} must be {what}, got {value!r}")
            if kind == "float" and not math.isfinite(value):  # NaN passes every range check (`nan <= 0` is False)
                raise ValueError(f"{f.name} must be finite, got {value!r}")
            if kind == "int" and type(value) is not int:
                object.__setattr__(self, f.name, int(value))
            elif kind == "float" and type(value) is not float:  # alpha=1 is alpha=1.0, one fingerprint
                object.__setattr__(self, f.name, float(value))

    def view_settings(self) -> dict[str, Any]:
        """The values of VIEW_KEYS: two configs whose view settings are equal prepare the same view."""
        return {k: getattr(self, k) for k in VIEW_KEYS}

    def replace(self, **changes: Any) -> "HybridGLConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "HybridGLConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown HybridGL config keys: {', '.join(unknown)}")
        return cls(**dict(values))

    @classmethod
    def from_file(cls, path: str | Path) -> "HybridGLConfig":
        """Defaults overridden by the keys of a JSON or TOML file (a [hybridgl] table is accepted)."""
        path = Path(path)
        text = path.read_text(encoding="utf-8")
        toml = path.suffix.lower() == ".toml"
        try:
            if toml:
                import tomllib

                values = tomllib.loads(text)
            else:
                values = json.loads(text)
        except ValueError as exc:  # the decoders' messages name a line, not the file
            raise ValueError(f"{path}: not valid {'TOML' if toml else 'JSON'} ({exc})") from exc
        if isinstance(values, dict) and set(values) == {"hybridgl"}:
            values = values["hybridgl"]
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a table of config keys")
        return cls.from_dict(values)

    @classmethod
    def load(cls, config: "HybridGLConfig | Mapping[str, Any] | str | Path | None") -> "HybridGLConfig":
        if config is None:
            return cls()
        if isinstance(config, HybridGLConfig):
            return config
        if isinstance(config, Mapping):
            return cls.from_dict(config)
        if not isinstance(config, (str, os.PathLike)):
            raise TypeError(f"config must be a HybridGLConfig, a mapping or a file path, got {type(config).__name__}")
        return cls.from_file(config)

    def fingerprint(self) -> str:
        """A short stable hash of every value: the same config gives the same string."""
        import hashlib

        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


DEFAULT_CONFIG = HybridGLConfig()
