"""Multi-scale headline: the chip's image components beside those of a context chip twice as wide at
half the resolution (the chip-scale check's context, ``PreparedDesign.context_components``), in
the headline's tabular+image AIPW, on the zoo's draws and folds, against the headline.

    .venv/bin/python benchmarks/zoo_context.py --replications 30 --variants ctx64,ctx32

Variants (``--variants``): ``ctxK`` adds the K leading context components to the headline's
features (tabular + 64 chip components). Prints per design and variant the bias, sd, mean SE,
bias/SE, coverage and RMSE, the headline's on the same draws first, and the rate at which the
chip-scale check of the variant (the chip alone against it, ``fragility.context_check``) warns.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from zoo_support import variant_main, variant_row  # noqa: E402

from eocausal import zoo  # noqa: E402
from eocausal.estimate.ate import estimate_effects  # noqa: E402
from eocausal.estimate.fragility import CHIP_ONLY, CHIP_SCALE_THRESHOLD, compare  # noqa: E402

FOLDS = 5


def one(prepared: zoo.PreparedDesign, rep: int, variants: list[str]) -> list[dict]:
    draw = zoo.replication_draw(prepared, rep)
    y, d, tab = draw["y"], draw["d"], draw["tabular"]
    truth = float(np.mean(draw["tau"]))
    base = np.hstack([tab, prepared.components["default"][:, :zoo.DEFAULT_COMPONENTS]])
    headline = estimate_effects(y, d, base, estimators=("aipw",), folds=FOLDS, seed=rep)["aipw"]
    rows = []
    for variant in variants:
        k = int(variant.removeprefix("ctx"))
        X = np.hstack([base, prepared.context_components[:, :k]])
        r = estimate_effects(y, d, X, estimators=("aipw",), folds=FOLDS, seed=rep)["aipw"]
        # the chip-scale check of this headline: the chip alone against it (paired)
        rows.append(variant_row(prepared, variant, rep, truth, headline, r,
                                chip_scale_z=compare(CHIP_ONLY, r, headline).z))
    return rows


def main(argv=None) -> int:
    return variant_main(__doc__, one, "ctx64,ctx32", argv,
                       chip_scale_warns=("chip_scale_z", lambda z: float((z.abs() > CHIP_SCALE_THRESHOLD).mean())))


if __name__ == "__main__":
    raise SystemExit(main())
