"""Effect estimation: cross-fitted ATE/ATT estimators, their diagnostics, and fold helpers."""

from eocausal.estimate.ate import ESTIMANDS, ESTIMATORS, EffectResult, estimate_effect, estimate_effects
from eocausal.estimate.diagnostics import balance_ok, effective_sample_size, overlap_ok
from eocausal.estimate.folds import make_folds, spatial_blocks
from eocausal.estimate.nuisance import LEARNERS

__all__ = [
    "ESTIMANDS",
    "ESTIMATORS",
    "LEARNERS",
    "EffectResult",
    "balance_ok",
    "effective_sample_size",
    "estimate_effect",
    "estimate_effects",
    "make_folds",
    "overlap_ok",
    "spatial_blocks",
]
