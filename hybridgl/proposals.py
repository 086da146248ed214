"""Mask proposals (paper 3.1, spec section 1): SAM's automatic mask generator.

SAM proposes class-agnostic masks; HybridGL only has to choose among them. Zero proposals
(a blank or tiny image) is a normal outcome handled downstream, never an exception here.
"""
from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from segment_anything import SamAutomaticMaskGenerator, sam_model_registry
from segment_anything.modeling import Sam
from segment_anything.utils.amg import batched_mask_to_box, box_xyxy_to_xywh

from .config import HybridGLConfig

log = logging.getLogger("hybridgl.proposals")

SAM_MODEL_TYPES = ("vit_h", "vit_l", "vit_b")


@dataclass
class Proposals:
    """masks: bool [N,H,W] in SAM's output order; boxes_xywh: int64 [N,4] (SAM's convention:
    x = min col, y = min row, w = max col - min col, h = max row - min row);
    quality: float32 [N], SAM's predicted IoU (NaN for injected masks)."""

    masks: np.ndarray
    boxes_xywh: np.ndarray
    quality: np.ndarray

    def __len__(self) -> int:
        return int(self.masks.shape[0])

    @classmethod
    def from_masks(cls, masks: np.ndarray | torch.Tensor, height: int, width: int) -> "Proposals":
        """Injected masks (bool [N,H,W]) with boxes computed exactly as SAM computes them."""
        m = torch.as_tensor(np.asarray(masks)).bool()
        if m.ndim == 2:
            m = m[None]
        if m.ndim != 3 or tuple(m.shape[1:]) != (height, width):
            raise ValueError(f"proposals must be bool [N,{height},{width}], got {tuple(m.shape)}")
        if m.shape[0] == 0:
            return cls.empty(height, width)
        boxes = np.stack([box_xyxy_to_xywh(b).numpy() for b in batched_mask_to_box(m)]).astype(np.int64)
        return cls(m.numpy(), boxes, np.full(m.shape[0], np.nan, dtype=np.float32))

    @classmethod
    def empty(cls, height: int, width: int) -> "Proposals":
        return cls(np.zeros((0, height, width), bool), np.zeros((0, 4), np.int64), np.zeros(0, np.float32))


def build_sam(model_type: str, checkpoint: str | Path | None,
              builder: Callable[..., Sam] | None = None, device: torch.device | str = "cpu") -> Sam:
    """A SAM model of `model_type` with the weights of `checkpoint` (a local file), in eval mode.

    model_type: "vit_h" | "vit_l" | "vit_b", or "package.module:function" naming a builder
    (checkpoint=...) -> Sam for architectures outside segment-anything's registry.
    builder: such a function given directly.
    """
    if builder is None and ":" in model_type:
        module, _, attr = model_type.partition(":")
        builder = getattr(importlib.import_module(module), attr)
    if builder is None:
        if model_type not in SAM_MODEL_TYPES:
            raise ValueError(f"unknown SAM model type {model_type!r}; expected one of {SAM_MODEL_TYPES}")
        builder = sam_model_registry[model_type]
    sam = builder(checkpoint=str(checkpoint) if checkpoint is not None else None)
    return sam.to(device).eval()


class MaskProposer:
    """SAM's automatic mask generator with the method's settings, run on an RGB uint8 image."""

    def __init__(self, sam: Sam, config: HybridGLConfig):
        self.sam = sam
        self.generator = SamAutomaticMaskGenerator(
            sam,
            points_per_side=config.points_per_side,
            points_per_batch=config.points_per_batch,
            pred_iou_thresh=config.pred_iou_thresh,
            stability_score_thresh=config.stability_score_thresh,
            box_nms_thresh=config.box_nms_thresh,
            crop_n_layers=config.crop_n_layers,
            crop_n_points_downscale_factor=config.crop_n_points_downscale_factor,
            min_mask_region_area=config.min_mask_region_area,
            output_mode="binary_mask",
        )

    @torch.no_grad()
    def __call__(self, image: np.ndarray) -> Proposals:
        """image: uint8 [H,W,3] RGB -> Proposals (possibly empty)."""
        h, w = image.shape[:2]
        records = self.generator.generate(image)
        if not records:
            log.info("SAM proposed no mask for a %dx%d image", w, h)
            return Proposals.empty(h, w)
        masks = np.stack([r["segmentation"] for r in records]).astype(bool)
        boxes = np.array([r["bbox"] for r in records], dtype=np.int64)
        quality = np.array([r["predicted_iou"] for r in records], dtype=np.float32)
        return Proposals(masks, boxes, quality)
