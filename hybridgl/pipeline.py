"""HybridGL end to end: `prepare` does the image-only work once, `segment` answers one expression.

Many expressions on one image (the rule in referring datasets) cost one SAM pass, one hybrid
feature pass and one GEM pass; each expression then costs a few text encodings and the
mask-level scoring.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import nn

from . import calibration, clip_vit, guidance, scoring
from .coherence import coherence_map, gem_tokens
from .fast import BFLOAT16_GAIN, FastHistory, LowPrecision, bfloat16_speedup, contested, low_precision, prepare_features
from .config import HybridGLConfig
from .hybrid_features import hybrid_features
from .parsing import ParsedExpression
from .precision import ieee_float32
from .proposals import MaskProposer, Proposals, bool_masks, build_sam
from .text import TextCache, encode_text, text_features

log = logging.getLogger("hybridgl")

VERSION = "1.0"


def to_rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """A PIL image (EXIF orientation applied, any mode) or an array -> uint8 [H,W,3] RGB."""
    if isinstance(image, Image.Image):
        image = ImageOps.exif_transpose(image)
        # 16-bit and float grayscale: Pillow's convert would clip at 255 (the backend's decode_image
        # uses this function, so a file gives the same pixels there and here)
        if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
            a = np.asarray(image).astype(np.float64)
            top = 65535.0 if image.mode.startswith("I;16") or a.max() > 255 else 255.0
            gray = (a / top * 255).clip(0, 255).astype(np.uint8)
            return np.repeat(gray[..., None], 3, axis=2)
        if image.mode == "F":
            a = np.asarray(image, dtype=np.float64)
            finite = a[np.isfinite(a)]
            lo, hi = (finite.min(), finite.max()) if finite.size else (0.0, 0.0)
            # +-inf at the ends of the finite range: as the largest float it left every other pixel 0
            a = np.nan_to_num(a, nan=0.0, posinf=hi, neginf=lo)
            gray = ((a - a.min()) / max(float(np.ptp(a)), 1e-12) * 255).astype(np.uint8)
            return np.repeat(gray[..., None], 3, axis=2)
        if image.mode in ("RGBA", "LA", "P", "PA", "RGBa", "La"):
            image = image.convert("RGBA").convert("RGB")  # alpha dropped: the colours as stored
        elif image.mode != "RGB":
            image = image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV
        return np.asarray(image, dtype=np.uint8).copy()
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(f"image arrays must be uint8, got {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ValueError(f"image arrays must be HxWx3 (RGB), got shape {array.shape}")
    return np.ascontiguousarray(array[..., :3])


def load_image(path: str | Path) -> np.ndarray:
    """Read an image file as EXIF-transposed RGB uint8 [H,W,3]."""
    with Image.open(path) as im:
        im.load()
        return to_rgb_array(im)


def downscale_masks(masks: np.ndarray, height: int, width: int) -> np.ndarray:
    """bool [N,H,W] -> bool [N,height,width] by nearest neighbour; a mask thinner than the sampling
    step, which nearest neighbour would erase, instead keeps every cell that one of its pixels falls in."""
    rows = (np.arange(height) * masks.shape[1]) // height
    cols = (np.arange(width) * masks.shape[2]) // width
    small = masks[:, rows[:, None], cols[None, :]]
    for i in np.flatnonzero(~small.any(axis=(1, 2)) & masks.any(axis=(1, 2))):
        ys, xs = np.nonzero(masks[i])
        small[i, ys * height // masks.shape[1], xs * width // masks.shape[2]] = True
    return small


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def weights_fingerprint(module: nn.Module | None) -> str:
    """A hash of every parameter's name, shape, sum and sum of squares: changes when any weight does."""
    if module is None:
        return "none"
    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in module.state_dict().items():
            t64 = t.detach().double()
            h.update(f"{name}{tuple(t.shape)}{t64.sum().item():.10e}{(t64 * t64).sum().item():.10e}".encode())
    return h.hexdigest()[:16]


@dataclass
class PreparedView:
    """The image-only work for one image.

    image: uint8 [H,W,3], the image the model saw; proposals: masks bool [N,H,W] and boxes
    int64 [N,4] at that size; features: hybrid features float32 [N,D] (on the model's device);
    tokens: GEM token features [g,g,D] (unit norm) or None when coherence is off;
    original_size: (H0, W0) of the given image when it was downscaled (config.max_image_side), else None;
    low_precision: None when the features are exact, else (fast mode) which rows are still low
    precision and the bounds on their error (`hybridgl.fast.LowPrecision`); `segment` makes rows
    exact where a decision needs it, under `refining` (views are shared between requests);
    settings: the preparing config's `view_settings()` (None: unknown, a view built by hand).
    """

    image: np.ndarray
    proposals: Proposals
    features: torch.Tensor
    tokens: torch.Tensor | None
    original_size: tuple[int, int] | None = None
    low_precision: LowPrecision | None = None
    settings: dict[str, Any] | None = None
    _device_masks: torch.Tensor | None = field(default=None, repr=False)
    refining: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def __getstate__(self) -> dict:
        """Views travel between processes (Ray), a lock does not; nor do device tensors: the receiver
        may have no GPU of that index (torch's unpickling would fail), and its model moves them."""
        state = {k: v for k, v in self.__dict__.items() if k != "refining"}
        state["features"] = self.features.cpu()
        state["tokens"] = self.tokens.cpu() if self.tokens is not None else None
        state["_device_masks"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, refining=threading.Lock())

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) the model worked at."""
        return int(self.image.shape[0]), int(self.image.shape[1])

    @property
    def output_size(self) -> tuple[int, int]:
        """(H0, W0) of the image as given: the size of Segmentation.mask."""
        return self.original_size or self.size

    def full_size(self, mask: np.ndarray) -> np.ndarray:
        """bool [H,W] at the model's size -> bool [H0,W0] (nearest neighbour; a copy)."""
        if self.original_size is None:
            return mask.copy()
        (h, w), (h0, w0) = self.size, self.original_size
        rows = np.minimum((np.arange(h0) * h) // h0, h - 1)  # source row of each output row
        cols = np.minimum((np.arange(w0) * w) // w0, w - 1)
        return mask[rows[:, None], cols[None, :]]

    @property
    def masks(self) -> np.ndarray:
        return self.proposals.masks

    @property
    def boxes_xywh(self) -> np.ndarray:
        return self.proposals.boxes_xywh

    def __len__(self) -> int:
        return len(self.proposals)

    def subset(self, indices: list[int] | np.ndarray) -> "PreparedView":
        """The same view restricted to some proposals (no recomputation); indices into this view."""
        idx = np.asarray(indices, dtype=np.int64)
        props = Proposals(self.proposals.masks[idx], self.proposals.boxes_xywh[idx], self.proposals.quality[idx])
        with self.refining:  # fast mode: rows and their low-precision flags copied in one state
            features = self.features[torch.from_numpy(idx).to(self.features.device)]
            low = self.low_precision.subset(idx, self.masks) if self.low_precision is not None else None
        return PreparedView(self.image, props, features, self.tokens, self.original_size, low, self.settings)

    def coherence_tokens(self, clip: nn.Module, config: HybridGLConfig,
                         device: torch.device | str) -> torch.Tensor:
        """GEM token features [g,g,D]: the view's own, else computed now (prepared with coherence off)."""
        return self.tokens if self.tokens is not None else gem_tokens(clip, self.image, config, device)

    def device_masks(self, device: torch.device) -> torch.Tensor:
        """The masks as a bool tensor on `device`, kept for the next expression (on the last device asked)."""
        device = torch.device(device)
        kept = self._device_masks
        moved = kept is None or kept.device.type != device.type or \
            (device.index is not None and kept.device.index != device.index)  # "cuda" is "cuda:0"
        if moved:
            self._device_masks = kept = torch.from_numpy(self.proposals.masks).to(device)
        return kept


@dataclass
class Segmentation:
    """The answer for one expression on one image.

    mask: bool [H0,W0] (the image's size as given) or None when there is no proposal; index: the chosen
      proposal (view.masks[index] is that mask at the model's size, view.size).
    score: confidence in [0, 1], the chosen candidate's share of softmax(F / score_temperature)
      over the k1 candidates (F = the fused final scores of Eq. 9). It is low (towards 1/k1)
      when the top candidates are nearly tied, i.e. the choice was uncertain, and 0 without proposals.
      With a calibration in the config (`hybridgl tune`), the candidates' scores are instead the
      fitted probability that the mask is right (hybridgl/calibration.py); explain["score_raw"]
      keeps the shares.
    hybrid_index: argmax of the semantic score alone (the "hybrid features only" prediction).
    ranking: [{"index", "score", "semantic", "final"}] best first: the candidates by F, then the
      remaining proposals by semantic probability p (with score 0: they were never candidates).
    explain: intermediate arrays under the golden cases' names.
    reason: why there is no mask, else None.
    """

    mask: np.ndarray | None
    score: float
    index: int | None
    hybrid_index: int | None
    ranking: list[dict[str, Any]]
    parse: ParsedExpression
    explain: dict[str, np.ndarray]
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"score": self.score, "index": self.index, "hybrid_index": self.hybrid_index,
                "ranking": self.ranking, "parse": self.parse.to_dict(), "reason": self.reason}


class HybridGL:
    """The HybridGL referring segmenter. Models are loaded once and passed in.

    clip: a transformers `CLIPModel` (fp32 weights) and its tokenizer; sam: a segment-anything
    `Sam` or None (then `prepare` needs proposals); parser: a name ("stanza", "rules", "auto")
    or a parser object from `hybridgl.parsing`.
    """

    def __init__(self, clip: nn.Module, tokenizer, sam: nn.Module | None = None,
                 parser: str | Callable[[str], ParsedExpression] = "auto",
                 config: HybridGLConfig | dict | str | Path | None = None,
                 device: torch.device | str | None = None):
        self.config = HybridGLConfig.load(config)
        self.device = torch.device(device) if device is not None else default_device()
        self.clip = clip.to(self.device).eval()
        patch = clip_vit.patch_size(self.clip)
        for key in ("clip_input_size", "gem_input_size"):  # the config cannot know the CLIP's patch size
            if getattr(self.config, key) < patch:
                raise ValueError(f"{key}={getattr(self.config, key)} is smaller than this CLIP's {patch}-pixel patches")
        self.tokenizer = tokenizer
        self.sam = sam.to(self.device).eval() if sam is not None else None
        self.proposer = MaskProposer(self.sam, self.config) if self.sam is not None else None
        if isinstance(parser, str):
            from .parsing import make_parser

            parser = make_parser(parser)
        self.parser = parser
        self.logit_scale = float(self.clip.logit_scale.detach().exp())
        self.fast_history = FastHistory(self.config.fast_patience)
        self.view_settings = self.config.view_settings()  # the config is frozen: once, not per expression
        self.text_cache = TextCache()  # texts recur across expressions (noun phrases, GEM prompts)
        self._version: str | None = None
        self.fast_dtype = self._check_precision()
        log.info("HybridGL ready on %s (parser: %s, SAM: %s)", self.device, self.parser_name,
                 "yes" if self.sam is not None else "no, proposals must be given")

    def _check_precision(self) -> str | None:
        """The fast mode's low precision (`fast.low_precision`; None: float32 at once), measuring
        bfloat16 against float32 on a CPU where that decides it, and saying where a low precision
        asked for costs time instead of saving it."""
        asked = {"CLIP's hybrid features": self.config.dtype,
                 "SAM's image encoder": self.proposer.sam_dtype(self.device) if self.proposer else "float32"}
        if self.device.type != "cpu" or not (self.config.fast or "bfloat16" in asked.values()):
            return low_precision(self.config, self.device) if self.config.fast else None
        speedup = bfloat16_speedup()
        measured = f"bfloat16 measured {speedup:.2f}x float32's speed on this CPU"
        dtype = low_precision(self.config, self.device, speedup) if self.config.fast else None
        if self.config.fast and dtype is None:
            log.info("fast mode: %s, so hybrid features are computed in float32 (the exact mode's cost); "
                     "dtype=\"bfloat16\" forces it", measured)
        elif self.config.fast:
            log.info("fast mode: hybrid features in %s (%s)", dtype, measured)
        if speedup < BFLOAT16_GAIN:
            for what, dtype_asked in asked.items():
                if dtype_asked == "bfloat16":
                    log.warning("%s in bfloat16: %s", what, measured)
        return dtype

    @classmethod
    def from_pretrained(cls, clip: Any = "openai/clip-vit-base-patch16", sam: Any = "vit_h",
                        sam_checkpoint: str | Path | None = None, parser: Any = "stanza",
                        device: torch.device | str | None = None,
                        config: HybridGLConfig | dict | str | Path | None = None, *,
                        cache_dir: str | Path | None = None, offline: bool | None = None) -> "HybridGL":
        """Load the models by name, path or object.

        clip: a Hugging Face id or local directory (model and tokenizer), or a (CLIPModel,
        tokenizer) pair. sam: "vit_h" / "vit_l" / "vit_b" (with `sam_checkpoint` a local path or
        URL; None downloads the official checkpoint once into the cache, SHA-256 checked),
        "package.module:builder" for another SAM architecture (with a checkpoint), an
        already-built `Sam`, or None. offline (default: env HF_HUB_OFFLINE / HYBRIDGL_OFFLINE)
        never touches the network.
        """
        from transformers import CLIPModel, CLIPTokenizer

        from . import weights

        device = torch.device(device) if device is not None else default_device()
        if isinstance(clip, (tuple, list)):
            clip_model, tokenizer = clip
        else:
            path = weights.resolve_clip(str(clip), cache_dir=cache_dir, offline=offline)
            clip_model = CLIPModel.from_pretrained(path, dtype=torch.float32)
            tokenizer = CLIPTokenizer.from_pretrained(path)
        if isinstance(sam, str):
            if sam_checkpoint is not None and Path(sam_checkpoint).is_file():
                checkpoint = Path(sam_checkpoint)
            else:
                checkpoint = weights.resolve_sam_checkpoint(sam, sam_checkpoint, cache_dir=cache_dir,
                                                            offline=offline)
            sam = build_sam(sam, checkpoint, device=device)
        return cls(clip_model, tokenizer, sam=sam, parser=parser, config=config, device=device)

    # -- identity -------------------------------------------------------------------------------
    @property
    def parser_name(self) -> str:
        return getattr(self.parser, "name", type(self.parser).__name__)

    @property
    def model_version(self) -> str:
        """Stable for the same weights, parser and config; different when any of them changes."""
        if self._version is None:
            parts = [VERSION, weights_fingerprint(self.clip), weights_fingerprint(self.sam), self.parser_name,
                     self.config.fingerprint()]
            sam_dtype = self.proposer.sam_dtype(self.device) if self.proposer is not None else "float32"
            if sam_dtype != "float32":  # the fast mode's float16 SAM on a GPU proposes other masks than on CPU
                parts.append(f"sam_dtype={sam_dtype}")
            blob = "|".join(parts)
            self._version = f"hybridgl-{VERSION}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"
        return self._version

    # -- the method -----------------------------------------------------------------------------
    def parse(self, expression: str) -> ParsedExpression:
        if not isinstance(expression, str):
            raise TypeError(f"expression must be a str, got {type(expression).__name__}")
        if not expression.strip():
            raise ValueError("empty expression")
        return self.parser(expression)

    def working_image(self, image: Image.Image | np.ndarray) -> np.ndarray:
        """The RGB image the model works on: downscaled (area averaging, aspect kept) to
        `config.max_image_side` on its longest side where it is larger, else as given."""
        return self._bounded(to_rgb_array(image))

    def _bounded(self, rgb: np.ndarray) -> np.ndarray:
        """`working_image` of an image already uint8 [H,W,3] RGB."""
        limit = self.config.max_image_side
        if limit is None or max(rgb.shape[:2]) <= limit:
            return rgb
        scale = limit / max(rgb.shape[:2])
        size = (max(1, round(rgb.shape[1] * scale)), max(1, round(rgb.shape[0] * scale)))
        return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BOX))

    @torch.no_grad()
    @ieee_float32
    def prepare(self, image: Image.Image | np.ndarray,
                proposals: np.ndarray | torch.Tensor | Proposals | None = None) -> PreparedView:
        """All the image-only work: proposals, hybrid features, GEM token features.

        An image whose longest side exceeds `config.max_image_side` is first downscaled to it (area
        averaging, aspect kept; given proposals are downscaled by nearest neighbour), which bounds the
        time and memory of every step. The spec runs on the image as given; the method itself sees
        no more than this anyway (SAM's encoder takes 1024 pixels on the longest side, CLIP's crops
        224, GEM 448), so only the resolution at which masks, boxes and the coherence map are
        compared changes, and `min_mask_region_area` then counts pixels of the downscaled image.
        `segment` gives the mask back at the original size (`PreparedView.full_size`). Given proposals
        are at the size of the image as given, or already at the downscaled size (`working_image`:
        what SAM itself would have been given, e.g. cached proposals).
        """
        original = to_rgb_array(image)
        rgb = self._bounded(original)
        original_size = None if rgb.shape == original.shape else (int(original.shape[0]), int(original.shape[1]))
        if proposals is not None:
            given = proposals.masks if isinstance(proposals, Proposals) else proposals
            shape = tuple(given.shape) if hasattr(given, "shape") else np.shape(given)
            if len(shape) not in (2, 3) or tuple(shape[-2:]) not in (original.shape[:2], rgb.shape[:2]):
                raise ValueError(f"proposals must be bool [N,{original.shape[0]},{original.shape[1]}]"
                                 + (f" or [N,{rgb.shape[0]},{rgb.shape[1]}]" if original_size else "")
                                 + f", got {shape}")
            if original_size is not None and tuple(shape[-2:]) == original_size:  # downscaled like the image
                quality = proposals.quality if isinstance(proposals, Proposals) else None
                masks = bool_masks(given).numpy()
                proposals = downscale_masks(masks[None] if masks.ndim == 2 else masks, *rgb.shape[:2])
                if quality is not None:  # SAM's predicted IoU (a calibration feature) stays the mask's
                    proposals = dataclasses.replace(Proposals.from_masks(proposals, *rgb.shape[:2]), quality=quality)
        h, w = rgb.shape[:2]
        if proposals is None:
            if self.proposer is None:
                raise ValueError("this HybridGL has no SAM: pass proposals to prepare()")
            props = self.proposer(rgb)
        elif isinstance(proposals, Proposals):
            props = proposals
        else:
            props = Proposals.from_masks(proposals, h, w)
        low = None
        if self.config.fast:
            features, low = prepare_features(self.clip, rgb, props.masks, self.config, self.device, self.fast_history,
                                             self.fast_dtype)
        else:
            features = hybrid_features(self.clip, rgb, props.masks, self.config, self.device)
        tokens = gem_tokens(self.clip, rgb, self.config, self.device) if self.config.use_coherence else None
        return PreparedView(rgb, props, features, tokens, original_size, low, self.view_settings)

    @torch.no_grad()
    @ieee_float32
    def segment(self, view: PreparedView | Image.Image | np.ndarray, expression: str | None = None,
                parse: ParsedExpression | None = None) -> Segmentation:
        """Choose the proposal that `expression` refers to (or use `parse` as given)."""
        if not isinstance(view, PreparedView):
            view = self.prepare(view)
        if view.settings is not None and view.settings != (ours := self.view_settings):
            differ = ", ".join(sorted(k for k in ours if view.settings.get(k) != ours[k]))
            raise ValueError(f"this view was prepared with other image settings ({differ}) than this model's: "
                             "prepare the image with this model")
        if parse is None:
            parse = self.parse(expression if expression is not None else "")
        elif not isinstance(parse, ParsedExpression):
            raise TypeError(f"parse must be a ParsedExpression, got {type(parse).__name__}")
        if view.low_precision is None:
            return self._segment(view, parse)
        with view.refining:
            first = view.low_precision
            seg = self._segment(view, parse)
            for attempt in range(3):
                lp = view.low_precision
                if lp is None or seg.index is None:
                    break
                disputed = contested(seg.explain, lp.score_bounds(self.logit_scale), self.config)
                if not len(disputed):
                    break
                # near ties for low-precision features: the masks involved become exact (kept for
                # later expressions); if that is not enough, the third time every mask does
                todo = disputed[lp.low[disputed]]
                self._refine(view, todo if len(todo) and attempt < 2 else np.flatnonzero(lp.low))
                seg = self._segment(view, parse)
            if first is not None and not first.decided:
                first.decided = True
                self.fast_history.record(1.0 - float(first.low.mean()))
        return seg

    def make_exact(self, view: PreparedView) -> PreparedView:
        """Every feature of a fast-mode view float32, the exact mode's numbers (an exact view as is).

        For uses that score a view under other configs than the model's (hybridgl.tuning): the fast
        mode's low-precision rows are bounded only for the choices of its own config."""
        with view.refining:
            if view.low_precision is not None:
                self._refine(view, np.flatnonzero(view.low_precision.low))
        return view

    def _refine(self, view: PreparedView, rows: np.ndarray) -> None:
        """Float32 features for `rows` of a fast-mode view, as the exact mode computes them: in its
        passes (`feature_batch_size` masks), so the other low rows of those passes become exact too."""
        lp = view.low_precision
        done, features = lp.exact_rows(self.clip, view.image, view.masks, rows, self.config, self.device)
        keep = lp.low[done]  # rows already exact keep theirs (the same numbers)
        done = done[keep]
        device = view.features.device
        view.features[torch.from_numpy(done).to(device)] = features[torch.from_numpy(keep).to(features.device)].to(device)
        lp.low[done] = False
        log.debug("fast mode: %d of %d masks' features made exact", len(done), len(lp.low))
        if not lp.low.any():
            view.low_precision = None

    def _segment(self, view: PreparedView, parse: ParsedExpression) -> Segmentation:
        cfg, dev = self.config, self.device
        n = len(view)
        text = text_features(self.clip, self.tokenizer, parse, cfg, dev, self.text_cache)
        explain: dict[str, np.ndarray] = {
            # a copy: on CPU .numpy() shares the view's tensor, whose rows the fast mode makes exact
            # in place for later expressions (an answer already given must not change)
            "hybrid_features": view.features.cpu().numpy().copy(),
            "text_sentence": text.sentence.cpu().numpy(),
            "text_noun_phrase": text.noun_phrase.cpu().numpy(),
            "text_mixed": text.mixed.cpu().numpy(),
            "text_neg": (text.neg if text.neg is not None else torch.zeros_like(text.mixed)).cpu().numpy(),
        }
        if n == 0:
            return Segmentation(None, 0.0, None, None, [], parse, explain, reason="no mask proposals")

        features = view.features.to(dev)  # a view from another process or device (a no-op otherwise)
        S = scoring.semantic_score(features, text.mixed, self.logit_scale)
        p = S.softmax(dim=0)
        explain.update(S=S.cpu().numpy(), p=p.cpu().numpy())
        q = None
        if text.neg is not None:  # without other nouns S_neg and q do not exist (the reference's NaN)
            S_neg = scoring.semantic_score(features, text.neg, self.logit_scale)
            q = S_neg.softmax(dim=0)
            explain.update(S_neg=S_neg.cpu().numpy(), q=q.cpu().numpy())

        # Relation guidance over the top-k1 candidates (k clamped per image, not per run).
        p_np = p.double().cpu().numpy()
        I = scoring.top_k(p, cfg.k1)
        J = scoring.top_k(q, cfg.k2) if q is not None else I
        partner = q.double().cpu().numpy() if q is not None else p_np
        relation = parse.relation if cfg.use_relation else "none"
        R = guidance.relation_guidance(view.boxes_xywh, p_np, I, J, partner, relation)
        P = torch.from_numpy(R).softmax(dim=0).numpy().astype(np.float32)

        # Coherence map, position prior and the guidance score of every mask.
        size = view.size
        if cfg.use_coherence:  # this model's switch, whichever model prepared the view
            gem_text = encode_text(self.clip, self.tokenizer, cfg.gem_prompt.format(parse.noun_phrase), dev,
                                   self.text_cache)
            A = coherence_map(view.coherence_tokens(self.clip, cfg, dev).to(dev), gem_text, size, cfg)
        else:
            A = torch.ones(size, device=dev)
        direction = parse.direction if cfg.use_position_prior else "none"
        A_prime = guidance.guided_map(A, guidance.position_prior(direction, *size, cfg, dev))
        black = guidance.black_level(relation, cfg)
        G = guidance.guidance_score(A_prime, view.device_masks(dev), black).cpu().numpy()

        F_ = scoring.final_score(P, G[I], cfg.alpha)
        order = np.argsort(-F_, kind="stable")
        chosen = int(I[order[0]])
        shares = scoring.confidence(F_, cfg.score_temperature)
        explain["score_raw"] = shares
        if cfg.calibration_coef:  # P(IoU >= 0.5) fitted on a team's reviewed tasks (`hybridgl tune`)
            shares = calibration.probability(calibration.candidate_features(
                F_, shares, p_np[I], view.proposals.quality[I], view.masks[I].mean(axis=(1, 2)), relation,
                direction), cfg.calibration_features, cfg.calibration_coef)
        hybrid_index = int(torch.argmax(S))
        ranking = [{"index": int(I[o]), "score": float(shares[o]), "semantic": float(p_np[I[o]]),
                    "final": float(F_[o])} for o in order]
        candidates = set(I.tolist())
        ranking += [{"index": int(i), "score": 0.0, "semantic": float(p_np[i]), "final": None}
                    for i in np.argsort(-p_np, kind="stable") if i not in candidates]
        explain.update(
            k1=np.int64(len(I)), k2=np.int64(min(cfg.k2, n)), topk_I=I, J_used=J, R=R, P=P,
            black=np.float64(black), gem_A=A.cpu().numpy(), gem_Aprime=A_prime.cpu().numpy(),
            G=G, F=F_, pred_g2l=np.int64(hybrid_index), pred_final=np.int64(chosen),
        )
        return Segmentation(view.full_size(view.masks[chosen]), float(shares[order[0]]), chosen, hybrid_index,
                            ranking, parse, explain)
