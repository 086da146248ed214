"""The 8 public golden cases (tests/fixtures/golden, GOLDEN.md): loading and tolerances.

Plain Python (no pytest), so that bench/golden_check.py runs them on a machine without pytest.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from hybridgl import ParsedExpression

from tiny_models import GOLDEN_DIR

CASES = sorted(p.name for p in GOLDEN_DIR.iterdir() if p.is_dir())
TOLERANCES = {
    "hybrid_features": 1e-4, "text_sentence": 1e-4, "text_noun_phrase": 1e-4, "text_mixed": 1e-4,
    "text_neg": 1e-4, "S": 1e-3, "S_neg": 1e-3, "p": 1e-5, "q": 1e-5, "R": 1e-5, "P": 1e-5,
    "gem_A": 1e-4, "gem_Aprime": 1e-4, "G": 1e-4, "F": 1e-4,
}
EXACT = ("topk_I", "J_used", "k1", "k2", "pred_g2l", "pred_final")


def load_case(name: str):
    """(arrays of case.npz, the PIL image, the injected ParsedExpression) of a golden case."""
    data = np.load(GOLDEN_DIR / name / "case.npz")
    image = Image.open(GOLDEN_DIR / name / "image.png")
    parse = ParsedExpression(str(data["sentence"]), str(data["noun_phrase"]),
                             tuple(str(o) for o in data["other_nouns"]), str(data["relation"]),
                             str(data["direction"]))
    return data, image, parse
