"""Evaluation harness: RefCOCO / RefCOCO+ / RefCOCOg / PhraseCut and Label Studio exports.

`python -m hybridgl evaluate ...` (see docs/evaluation.md). Submodules:

- `datasets`: readers for the refer-API layout and PhraseCut (ground truth at full resolution);
- `masks`: COCO RLE helpers (pycocotools);
- `metrics`: oIoU / mIoU / precision@IoU, accumulated per expression;
- `calibration`: AUROC of the score, threshold for a target precision, PNG plots (Pillow);
- `runner`: the resumable evaluation loop, re-scoring of a predictions.jsonl;
- `label_studio`: metrics on a Label Studio JSON export (our predictions vs the annotators' masks);
- `cli`: `add_arguments(parser)` and `main(args)` for the `evaluate` subcommand.

Nothing heavy is imported here: torch, pycocotools and label-studio-sdk load only when used.
"""
from .metrics import IoUAccumulator, PAPER_RESULTS, mask_iou, summarize

__all__ = ["IoUAccumulator", "PAPER_RESULTS", "mask_iou", "summarize"]
