"""The spec (HYBRIDGL.md) where the golden cases do not reach: non-default configuration values,
edge cases and the deliberate fixes. Expected numbers are computed here with numpy from the
spec's formulas, not by the functions under test."""
from __future__ import annotations

import numpy as np
import pytest

from hybridgl import HybridGLConfig


# -- spec 11: every number is a configuration value; a value the method cannot run with is refused

@pytest.mark.parametrize("bad", [
    {"points_per_side": 0}, {"points_per_batch": 0}, {"crop_n_layers": -1},
    {"crop_n_points_downscale_factor": 0}, {"gem_input_size": 0}, {"clip_input_size": 0},
    {"gem_iterations": -1},
])
def test_counts_and_sizes_the_method_cannot_run_with_are_refused(bad):
    """points_per_side 0 / points_per_batch 0 crashed in SAM's grid with ZeroDivisionError, crop_n_layers -1
    with an IndexError, and a negative gem_iterations silently ran none; the config now says which key."""
    (key,) = bad
    with pytest.raises(ValueError, match=key):
        HybridGLConfig(**bad)


@pytest.mark.parametrize("key, value", [
    ("use_relation", "False"), ("use_coherence", "no"), ("use_position_prior", 0), ("vertical_prior", "true"),
    ("k1", 2.5), ("k2", "6"), ("k1", True), ("alpha", "0.5"), ("black", None), ("points_per_side", 8.0),
    ("fusion_mode", 3),
])
def test_values_of_the_wrong_type_are_refused(key, value):
    """A switch given as a string (`--set use_relation=False` reaches the config as the string "False",
    which is truthy) left the guidance on without a word; k1=2.5 failed later inside torch.topk."""
    with pytest.raises(ValueError, match=key):
        HybridGLConfig(**{key: value})


def test_numbers_of_other_numeric_types_are_accepted_as_plain_python_numbers():
    """numpy integers and floats (a tuning grid) and ints for float keys (TOML `alpha = 1`) stay valid,
    and the stored values serialise (the fingerprint is JSON)."""
    cfg = HybridGLConfig(k1=np.int64(2), alpha=1, black=np.float32(1.5), gem_temperature=2)
    assert cfg.k1 == 2 and type(cfg.k1) is int
    assert cfg.alpha == 1.0 and type(cfg.black) is float and cfg.black == 1.5
    assert cfg.fingerprint() == HybridGLConfig(k1=2, alpha=1, black=1.5, gem_temperature=2).fingerprint()
    assert HybridGLConfig().fingerprint() == HybridGLConfig(**HybridGLConfig().to_dict()).fingerprint()
