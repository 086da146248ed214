"""Mask proposals (paper 3.1, spec section 1): SAM's automatic mask generator.

SAM proposes class-agnostic masks; HybridGL only has to choose among them. Zero proposals
(a blank or tiny image) is a normal outcome handled downstream, never an exception here.
"""
from __future__ import annotations

import importlib
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from segment_anything import sam_model_registry
from segment_anything.modeling import Sam
from segment_anything.utils.amg import (batch_iterator, batched_mask_to_box, box_xyxy_to_xywh,
                                        build_all_layer_point_grids, calculate_stability_score,
                                        generate_crop_boxes, is_box_near_crop_edge, remove_small_regions,
                                        uncrop_boxes_xyxy, uncrop_masks)
from segment_anything.utils.transforms import ResizeLongestSide
from torchvision.ops.boxes import batched_nms, box_area

from .config import HybridGLConfig
from .precision import ieee_float32
from .sam_vit import decode_masks, image_embedding

log = logging.getLogger("hybridgl.proposals")

SAM_MODEL_TYPES = ("vit_h", "vit_l", "vit_b")
# SamAutomaticMaskGenerator's defaults for the settings the method never changes.
STABILITY_SCORE_OFFSET = 1.0
CROP_NMS_THRESH = 0.7
CROP_OVERLAP_RATIO = 512 / 1500


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
        m = bool_masks(masks)
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


def bool_masks(masks: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Given masks (bool, or numbers: nonzero is inside) -> a bool CPU tensor of the same shape."""
    if isinstance(masks, torch.Tensor):
        return masks.detach().cpu().bool()
    array = np.asarray(masks)
    if array.dtype != bool and not np.issubdtype(array.dtype, np.number):
        raise TypeError(f"proposals must be bool masks (or 0/1 numbers), got dtype {array.dtype}")
    return torch.as_tensor(np.ascontiguousarray(array)).bool()  # torch refuses negative strides (np.flip)


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
    try:
        sam = builder(checkpoint=str(checkpoint) if checkpoint is not None else None)
    except (RuntimeError, pickle.UnpicklingError, EOFError) as exc:  # what torch.load raises for a bad file
        if checkpoint is None:
            raise
        hint = (f"check it with `python -m hybridgl.weights check --sam {model_type} --verify`"
                if model_type in SAM_MODEL_TYPES else "compare it with its source (size, SHA-256; --verify)")
        raise ValueError(f"cannot load the SAM checkpoint {checkpoint} as {model_type!r}: a damaged or incomplete "
                           f"file, or another model type? ({exc.__class__.__name__}: {str(exc)[:300]}); {hint}") from exc
    return sam.to(device).eval()


class MaskProposer:
    """SAM's automatic mask generation with the method's settings, run on an RGB uint8 image.

    It returns exactly the masks, boxes and predicted IoUs of segment-anything's
    `SamAutomaticMaskGenerator(output_mode="binary_mask")` in the same order (tested against
    it), without its waste: the predicted-IoU filter runs on the low-resolution logits, so only
    the surviving masks are upsampled to full resolution, and masks stay binary tensors instead
    of going to run-length encoding and back (costly for the speckled masks of weak prompts).
    """

    def __init__(self, sam: Sam, config: HybridGLConfig):
        self.sam = sam
        self.config = config
        self.transform = ResizeLongestSide(sam.image_encoder.img_size)
        self.point_grids = build_all_layer_point_grids(config.points_per_side, config.crop_n_layers,
                                                       config.crop_n_points_downscale_factor)

    @torch.no_grad()
    @ieee_float32
    def __call__(self, image: np.ndarray) -> Proposals:
        """image: uint8 [H,W,3] RGB -> Proposals (possibly empty)."""
        h, w = image.shape[:2]
        cfg = self.config
        crop_boxes, layer_idxs = generate_crop_boxes((h, w), cfg.crop_n_layers, CROP_OVERLAP_RATIO)
        parts = [self._crop(image, box, layer) for box, layer in zip(crop_boxes, layer_idxs)]
        masks = torch.cat([p[0] for p in parts])
        boxes = torch.cat([p[1] for p in parts])
        iou = torch.cat([p[2] for p in parts])
        if len(crop_boxes) > 1:  # duplicates between crops: prefer masks from smaller crops
            per_mask = torch.cat([torch.tensor([b] * len(p[0]), dtype=torch.int64).reshape(-1, 4)
                                  for p, b in zip(parts, crop_boxes)]).to(boxes.device)  # nms: one device
            keep = batched_nms(boxes.float(), 1 / box_area(per_mask), torch.zeros(len(boxes), device=boxes.device),
                               iou_threshold=CROP_NMS_THRESH)
            masks, boxes, iou = masks[keep], boxes[keep], iou[keep]
        masks = masks.cpu()
        if cfg.min_mask_region_area > 0 and len(masks):
            masks, boxes, iou = self._remove_small_regions(masks, iou)
        if not len(masks):
            log.info("SAM proposed no mask for a %dx%d image", w, h)
            return Proposals.empty(h, w)
        xywh = boxes.cpu().clone()
        xywh[:, 2:] -= xywh[:, :2]
        return Proposals(masks.numpy(), xywh.numpy().astype(np.int64), iou.cpu().numpy().astype(np.float32))

    def sam_dtype(self, device: torch.device) -> str:
        """The encoder's compute dtype: config.sam_dtype, else float16 in the fast mode on a GPU, else float32."""
        if self.config.sam_dtype is not None:
            return self.config.sam_dtype
        return "float16" if self.config.fast and device.type == "cuda" else "float32"

    def _embed(self, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        """uint8 [h,w,3] -> SAM image embedding [1,C,64,64] and the resized input size (SamPredictor.set_image)."""
        resized = torch.as_tensor(self.transform.apply_image(image), device=self.sam.device)
        x = self.sam.preprocess(resized.permute(2, 0, 1).contiguous()[None])
        dtype = getattr(torch, self.sam_dtype(x.device))
        # low precision for the encoder only: the mask decoder and its thresholds stay float32
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
            embedding = image_embedding(self.sam, x)
        return embedding.float(), tuple(resized.shape[:2])

    def _crop(self, image: np.ndarray, crop_box: list[int], layer: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The masks of one crop in the image's frame: bool [n,H,W], boxes XYXY [n,4], predicted IoU [n]."""
        x0, y0, x1, y1 = crop_box
        crop = image[y0:y1, x0:x1]
        crop_size = crop.shape[:2]
        # a crop without pixels is tested first: SAM's resize divides by its longest side
        if min(crop_size) == 0 or min(ResizeLongestSide.get_preprocess_shape(
                *crop_size, self.transform.target_length)) == 0:
            log.info("a %dx%d crop is too thin for SAM's input: no masks from it", *crop_size[::-1])
            height, width = image.shape[:2]
            device = self.sam.device
            return (torch.zeros(0, height, width, dtype=torch.bool, device=device),
                    torch.zeros(0, 4, dtype=torch.int64, device=device), torch.zeros(0, device=device))
        embedding, input_size = self._embed(crop)
        points = self.point_grids[layer] * np.array(crop_size)[None, ::-1]
        parts = [self._batch(embedding, input_size, crop_size, batch, crop_box, image.shape[:2])
                 for (batch,) in batch_iterator(self.config.points_per_batch, points)]
        masks, boxes, iou = (torch.cat([p[i] for p in parts]) for i in range(3))
        keep = batched_nms(boxes.float(), iou, torch.zeros(len(boxes), device=boxes.device),
                           iou_threshold=self.config.box_nms_thresh)
        return masks[keep], uncrop_boxes_xyxy(boxes[keep], crop_box), iou[keep]

    def _batch(self, embedding: torch.Tensor, input_size: tuple[int, int], crop_size: tuple[int, ...],
               points: np.ndarray, crop_box: list[int], image_size: tuple[int, ...]
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Masks of a batch of point prompts (3 per point) that pass the quality filters."""
        cfg, sam = self.config, self.sam
        coords = torch.as_tensor(self.transform.apply_coords(points, crop_size), device=sam.device)
        # the predicted-IoU filter needs no mask: only the masks it keeps are computed at all
        low_res, iou = decode_masks(sam, embedding, coords, self._good_enough)
        height, width = image_size
        if not len(iou):
            return (torch.zeros(0, height, width, dtype=torch.bool, device=iou.device),
                    torch.zeros(0, 4, dtype=torch.int64, device=iou.device), iou)
        logits = sam.postprocess_masks(low_res[:, None], input_size, crop_size)[:, 0]
        stability = calculate_stability_score(logits, sam.mask_threshold, STABILITY_SCORE_OFFSET)
        if cfg.stability_score_thresh > 0.0:
            keep = stability >= cfg.stability_score_thresh
            logits, iou = logits[keep], iou[keep]
        masks = logits > sam.mask_threshold
        boxes = batched_mask_to_box(masks)
        keep = ~is_box_near_crop_edge(boxes, crop_box, [0, 0, width, height])
        return uncrop_masks(masks[keep], crop_box, height, width), boxes[keep], iou[keep]

    def _good_enough(self, iou: torch.Tensor) -> torch.Tensor:
        """The predicted-IoU filter: predicted IoU [n] -> bool [n]."""
        if self.config.pred_iou_thresh > 0.0:
            return iou > self.config.pred_iou_thresh
        return torch.ones_like(iou, dtype=torch.bool)

    def _remove_small_regions(self, masks: torch.Tensor, iou: torch.Tensor
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fill small holes, drop small islands, then NMS preferring the masks that did not change."""
        area = self.config.min_mask_region_area
        cleaned, unchanged = [], []
        for mask in masks.numpy():
            mask, holes = remove_small_regions(mask, area, mode="holes")
            mask, islands = remove_small_regions(mask, area, mode="islands")
            cleaned.append(torch.from_numpy(np.ascontiguousarray(mask)))
            unchanged.append(float(not (holes or islands)))
        masks = torch.stack(cleaned)
        boxes = batched_mask_to_box(masks)
        keep = batched_nms(boxes.float(), torch.as_tensor(unchanged), torch.zeros(len(boxes)),
                           iou_threshold=max(self.config.box_nms_thresh, CROP_NMS_THRESH))
        return masks[keep], boxes[keep], iou.cpu()[keep]
