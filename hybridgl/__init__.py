"""HybridGL: training-free referring image segmentation (SAM proposals + CLIP hybrid global-local
mask features + spatial guidance), CVPR 2025. See README.md.

The heavy exports (torch, transformers) load on first use, so `python -m hybridgl.weights` and
the parser start quickly.
"""
from .config import HybridGLConfig
from .parsing import ParsedExpression, parse_expression

__all__ = ["HybridGL", "HybridGLConfig", "ParsedExpression", "PreparedView", "Segmentation",
           "load_image", "parse_expression"]


def __getattr__(name: str):
    if name in ("HybridGL", "PreparedView", "Segmentation", "load_image"):
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'hybridgl' has no attribute {name!r}")
