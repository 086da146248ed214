"""HybridGL: training-free referring image segmentation (SAM proposals + CLIP hybrid global-local
mask features + spatial guidance), CVPR 2025. See README.md and the spec in docs/."""
from .config import HybridGLConfig
from .parsing import ParsedExpression
from .pipeline import HybridGL, PreparedView, Segmentation, load_image

try:  # the parser module is being completed; keep the package importable meanwhile
    from .parsing import parse_expression
except ImportError:  # pragma: no cover
    pass

__all__ = ["HybridGL", "HybridGLConfig", "ParsedExpression", "PreparedView", "Segmentation",
           "load_image", "parse_expression"]
