"""Which parameters `tune` searches, over which values, and why the others are left alone.

Searched by re-scoring cached candidates (no new image pass, no new text encoding):
- sentence_weight: t = w f(sentence) + (1 - w) f(noun phrase); both features are cached, the mix
  is a weighted sum, then Eq. 3 is one [N,D] product;
- k1, k2, use_relation: the candidate sets and Eq. 4-5 work on the cached p, q and boxes;
- use_coherence, use_position_prior, vertical_prior: A' takes a handful of forms per expression
  (coherence map or ones, times each prior its direction can get); the inside/outside means of
  every form are cached;
- black, black_big, black_small: Eq. 8 is linear in b given those means;
- alpha: Eq. 9 on P and G.

Not searched: everything that changes an image pass (SAM settings, fusion_mode,
fusion_start_block, beta, blur, CLIP and GEM input sizes, GEM depth, temperature and
iterations) or a text encoding (other_prompt, gem_prompt): each would cost the whole
preparation again per configuration. score_temperature changes no choice, only the score,
which the calibration fit replaces anyway.
"""
from __future__ import annotations

import itertools
import random
from typing import Any

from ..config import HybridGLConfig

GRID: dict[str, tuple] = {
    "alpha": tuple(round(0.1 * i, 1) for i in range(11)),
    "black": (1.0, 1.2, 1.4, 1.5, 1.6, 1.7, 1.8, 1.9, 1.95),
    "black_big": (1.8, 1.9, 1.95, 2.0),
    "black_small": (1.0, 1.25, 1.5, 1.75),
    "sentence_weight": (0.0, 0.25, 0.5, 0.75, 1.0),
    "k1": (1, 2, 3, 4, 5),
    "k2": (3, 6, 10),
    "use_relation": (True, False),
    "use_coherence": (True, False),
    "use_position_prior": (True, False),
    "vertical_prior": (False, True),
}
TEXT_SEARCHED = ("sentence_weight",)
SEARCHED = tuple(name for name in GRID if name not in TEXT_SEARCHED)

Overrides = dict[str, Any]


def grid_size() -> int:
    size = 1
    for values in GRID.values():
        size *= len(values)
    return size


def configurations(base: HybridGLConfig, n: int = 300, seed: int = 0) -> list[Overrides]:
    """Candidate configurations as overrides of `base`: first `{}` (base itself), then every
    one-parameter change (the sweeps behind the gain-per-parameter plot), then random points of
    the grid up to `n` in all (the whole grid when it is smaller than `n`)."""
    out: list[Overrides] = [{}]
    seen = {()}

    def add(changes: Overrides) -> None:
        changes = {k: v for k, v in changes.items() if getattr(base, k) != v}
        key = tuple(sorted(changes.items()))
        if key not in seen:
            seen.add(key)
            out.append(changes)

    for name, values in GRID.items():
        for value in values:
            add({name: value})
    names = list(GRID)
    if grid_size() <= n:
        for combo in itertools.product(*(GRID[k] for k in names)):
            add(dict(zip(names, combo)))
        return out
    rng = random.Random(seed)
    attempts = 0
    while len(out) < n and attempts < 50 * n:
        attempts += 1
        add({k: rng.choice(GRID[k]) for k in names})
    return out
