"""Tune HybridGL on a team's reviewed tasks and calibrate its score (`python -m hybridgl tune`).

- `space`: the searched parameters (those that need no new image pass) and their values;
- `candidates`: per image and per expression, the intermediates every configuration needs,
  cached on disk;
- `rescore`: the pipeline's choice for a configuration, from those intermediates;
- `search`: k-fold cross-validation over images, bootstrap interval of the gain;
- `fit`: logistic calibration of the score;
- `tune`, `report`: the whole run and its outputs; `cli`: the command line.
See docs/review.md ("Learn from the corrections").
"""
