"""Everything a configuration of the searched parameters needs, prepared once and cached on disk.

Per image (one SAM pass, one hybrid-feature pass, one GEM pass): the proposals' masks, boxes,
SAM quality, area share and hybrid features. Per expression (a few text encodings, one
coherence map): the parse, the text features, and for every variant of the guided map A'
(coherence on/off x each position prior the expression can get) the mean of A' inside and
outside every mask. Eq. 8 is linear in b given those two means, so no variant is ever
recomputed for another b; every other searched step (Eq. 3-5, 9) is a few small array
operations (hybridgl/tuning/rescore.py).

On disk: CACHE_DIR/<key>.npz per image and per expression, where the key hashes the weights,
the parser, the image-pass settings of the config and the image's pixels (and the expression),
so a second tune over the same tasks runs no model at all, and any change is a miss.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .. import guidance
from ..coherence import coherence_map
from ..config import HybridGLConfig
from ..parsing import ParsedExpression
from ..pipeline import PreparedView, to_rgb_array, weights_fingerprint
from ..precision import ieee_float32
from ..proposals import Proposals
from ..text import encode_text, text_features
from .space import SEARCHED, TEXT_SEARCHED

log = logging.getLogger("hybridgl.tuning")

# the position priors of guidance.position_prior, by the direction it is called with
PRIORS = ("none", "left", "right", "middle", "up", "down")
# Part of every cache key: raised whenever the computation of a cached quantity changes, even in its
# last bits, so that a cache written by older code is recomputed, not mixed with the pipeline's
# numbers (2: the guidance means as matrix products).
CACHE_FORMAT = "2"


def prior_kind(direction: str, use_position_prior: bool, vertical_prior: bool) -> str:
    """Which prior map the pipeline multiplies A by (guidance.position_prior's cases)."""
    d = direction if use_position_prior else "none"
    if d in ("up", "down") and not vertical_prior:
        return "none"
    return d if d in PRIORS else "none"


@dataclass
class ImageCandidates:
    """masks bool [N,H,W] at the size the model worked at; boxes int64 [N,4] XYWH; quality float32
    [N] (SAM's predicted IoU); area float64 [N] (share of the image); features float32 [N,D]
    (hybrid features, CPU); original_size (H0, W0) when the pipeline downscaled the image."""

    masks: np.ndarray
    boxes: np.ndarray
    quality: np.ndarray
    area: np.ndarray
    features: np.ndarray
    original_size: tuple[int, int] | None = None

    def __len__(self) -> int:
        return int(self.masks.shape[0])

    def output_masks(self):
        """Each mask at the image's original size (as `Segmentation.mask`), one at a time."""
        view = PreparedView(np.zeros((*self.masks.shape[1:], 3), np.uint8), Proposals(self.masks, self.boxes,
                            self.quality), torch.from_numpy(self.features), None, self.original_size)
        return (view.full_size(m) for m in self.masks)


@dataclass
class ExpressionCandidates:
    """One expression on one image: parse, raw text features [D] (neg None without other nouns),
    and means[(use_coherence, prior)] = (mean_in, mean_out), float64 [N] each."""

    expression: str
    parse: ParsedExpression
    sentence: np.ndarray
    noun_phrase: np.ndarray
    neg: np.ndarray | None
    means: dict[tuple[bool, str], tuple[np.ndarray, np.ndarray]]
    logit_scale: float


def _hash(*parts: str) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


def image_pass_config(config: HybridGLConfig) -> HybridGLConfig:
    """The config with every searched (and score-only) value at its default: what the cache depends on."""
    defaults = HybridGLConfig()
    reset = {name: getattr(defaults, name) for name in SEARCHED + TEXT_SEARCHED}
    return config.replace(**reset, score_temperature=defaults.score_temperature,
                          calibration_features=(), calibration_coef=())


class CandidateCache:
    """Prepares images and expressions with `model` (a HybridGL), reusing CACHE_DIR when given."""

    def __init__(self, model, cache_dir: str | Path | None = None):
        self.model = model
        self.config = image_pass_config(model.config).replace(use_coherence=True)
        self.dir = Path(cache_dir) if cache_dir else None
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
        self.model_key = _hash(CACHE_FORMAT, weights_fingerprint(model.clip),
                               weights_fingerprint(getattr(model, "sam", None)), model.parser_name,
                               self.config.fingerprint())
        self.hits = self.misses = 0
        self._tokens: tuple[str, torch.Tensor | None] | None = None

    # -- disk ---------------------------------------------------------------------------------------
    def _load(self, key: str) -> dict | None:
        if self.dir is None or not (self.dir / f"{key}.npz").is_file():
            return None
        try:
            with np.load(self.dir / f"{key}.npz", allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except (OSError, ValueError, KeyError) as exc:
            log.warning("ignoring unreadable cache entry %s (%s)", key, exc)
            return None

    def _save(self, key: str, arrays: dict) -> None:
        if self.dir is None:
            return
        tmp = self.dir / f"{key}.tmp.npz"
        np.savez_compressed(tmp, **arrays)
        os.replace(tmp, self.dir / f"{key}.npz")

    # -- images -------------------------------------------------------------------------------------
    def image(self, image_key: str, load: Callable[[], np.ndarray]) -> tuple[str, ImageCandidates]:
        """The image's candidates; returns (content key, candidates). `load()` -> uint8 [H,W,3]."""
        rgb = to_rgb_array(load())
        key = _hash(self.model_key, "image", hashlib.sha256(rgb.tobytes()).hexdigest(), str(rgb.shape))
        z = self._load(key)
        if z is not None:
            self.hits += 1
            n, h, w = (int(v) for v in z["shape"])
            masks = np.unpackbits(z["masks"], count=n * h * w).reshape(n, h, w).astype(bool)
            self._tokens = (key, torch.from_numpy(z["tokens"]) if z["tokens"].size else None)
            size0 = z.get("original_size", np.zeros(0))
            original = tuple(int(v) for v in size0) if size0.size else None
            return key, ImageCandidates(masks, z["boxes"], z["quality"], z["area"], z["features"], original)
        self.misses += 1
        model = self.model
        if model.proposer is None:
            raise ValueError(f"image {image_key}: the model has no SAM to propose masks")
        with torch.no_grad(), ieee_float32:
            # the pipeline's own image pass (downscaling included); the searched configs are scored
            # on its features, so a fast model's are made exact
            view = model.make_exact(model.prepare(rgb))
            tokens = view.coherence_tokens(model.clip, self.config, model.device).cpu()
        props = view.proposals
        cand = ImageCandidates(props.masks, props.boxes_xywh.astype(np.int64), props.quality.astype(np.float32),
                               props.masks.mean(axis=(1, 2)) if len(props) else np.zeros(0),
                               view.features.float().cpu().numpy(), view.original_size)
        self._save(key, {"shape": np.array(props.masks.shape, dtype=np.int64),
                         "masks": np.packbits(props.masks.ravel()), "boxes": cand.boxes, "quality": cand.quality,
                         "area": cand.area, "features": cand.features, "tokens": tokens.numpy(),
                         "original_size": np.array(view.original_size or (), dtype=np.int64)})
        self._tokens = (key, tokens)
        return key, cand

    # -- expressions --------------------------------------------------------------------------------
    def expression(self, image_key: str, image: ImageCandidates, expression: str) -> ExpressionCandidates:
        """The expression's candidates on the image last returned by `image(...)` (key `image_key`)."""
        key = _hash(image_key, "expression", expression)
        z = self._load(key)
        if z is not None:
            self.hits += 1
            meta = json.loads(str(z["meta"]))
            means = {(bool(c), p): (z[f"in_{int(c)}_{p}"], z[f"out_{int(c)}_{p}"]) for c, p in meta["means"]}
            return ExpressionCandidates(expression, ParsedExpression(**meta["parse"]), z["sentence"],
                                        z["noun_phrase"], z["neg"] if z["neg"].size else None, means,
                                        float(meta["logit_scale"]))
        self.misses += 1
        model, cfg = self.model, self.config
        assert self._tokens is not None and self._tokens[0] == image_key, "expression() before its image()"
        dev = model.device
        parse = model.parse(expression)
        means: dict[tuple[bool, str], tuple[np.ndarray, np.ndarray]] = {}
        with torch.no_grad(), ieee_float32:
            text = text_features(model.clip, model.tokenizer, parse, cfg, dev)
            if len(image):
                size = image.masks.shape[1:]
                gem_text = encode_text(model.clip, model.tokenizer, cfg.gem_prompt.format(parse.noun_phrase), dev)
                A = coherence_map(self._tokens[1].to(dev), gem_text, size, cfg)
                masks = torch.from_numpy(image.masks).to(dev)
                kinds = dict.fromkeys(prior_kind(parse.direction, on, vertical)
                                      for on in (False, True) for vertical in (False, True))
                vertical_cfg = cfg.replace(vertical_prior=True)  # every kind is then its own map
                for coherence in (True, False):
                    base = A if coherence else torch.ones(size, device=dev)
                    for kind in kinds:
                        guided = guidance.guided_map(base, guidance.position_prior(kind, *size, vertical_cfg, dev))
                        m_in, m_out = guidance.inside_outside_means(guided, masks)
                        means[(coherence, kind)] = (m_in.cpu().numpy(), m_out.cpu().numpy())
        neg = text.neg.cpu().numpy() if text.neg is not None else None
        cand = ExpressionCandidates(expression, parse, text.sentence.cpu().numpy(), text.noun_phrase.cpu().numpy(),
                                    neg, means, float(model.logit_scale))
        arrays = {"sentence": cand.sentence, "noun_phrase": cand.noun_phrase,
                  "neg": neg if neg is not None else np.zeros(0, np.float32),
                  "meta": np.array(json.dumps({"parse": parse.to_dict(), "logit_scale": cand.logit_scale,
                                               "means": [[int(c), p] for c, p in means]}))}
        for (c, p), (m_in, m_out) in means.items():
            arrays[f"in_{int(c)}_{p}"], arrays[f"out_{int(c)}_{p}"] = m_in, m_out
        self._save(key, arrays)
        return cand
