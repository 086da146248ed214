import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))  # tests import `tiny_models` as a plain module
sys.path.insert(0, str(TESTS.parent))

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def tiny_clip_pair():
    from tiny_models import tiny_clip

    return tiny_clip()


@pytest.fixture(scope="session")
def tiny_model_nosam(tiny_clip_pair):
    """HybridGL on the tiny CLIP, no SAM (proposals injected), rule parser, CPU."""
    from hybridgl import HybridGL

    return HybridGL(*tiny_clip_pair, sam=None, parser="rules", device="cpu")
