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
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from zoo_support import replication_rows, zoo_parser  # noqa: E402

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
        rows.append({"design": prepared.design.name, "variant": variant, "replication": rep,
                     "headline_error": headline.estimate - truth, "headline_se": headline.std_error,
                     "headline_covered": headline.ci_low <= truth <= headline.ci_high,
                     "error": r.estimate - truth, "se": r.std_error, "covered": r.ci_low <= truth <= r.ci_high,
                     # the chip-scale check of this headline: the chip alone against it (paired)
                     "chip_scale_z": compare(CHIP_ONLY, r, headline).z})
    return rows


def main(argv=None) -> int:
    parser = zoo_parser(__doc__, replications=30)
    parser.add_argument("--variants", default="ctx64,ctx32")
    parser.add_argument("--rows", default=None, help="also write the per-replication rows to this CSV")
    args = parser.parse_args(argv)
    frame = pd.DataFrame(replication_rows(args, one, args.variants.split(",")))
    if args.rows:
        frame.to_csv(args.rows, index=False)
    rmse = lambda s: float(np.sqrt((s ** 2).mean()))  # noqa: E731
    table = frame.groupby(["design", "variant"], sort=False).agg(
        headline_rmse=("headline_error", rmse), headline_se=("headline_se", "mean"),
        headline_coverage=("headline_covered", "mean"), headline_bias=("headline_error", "mean"),
        bias=("error", "mean"), sd=("error", "std"), se=("se", "mean"),
        coverage=("covered", "mean"), rmse=("error", rmse),
        chip_scale_warns=("chip_scale_z", lambda z: float((z.abs() > CHIP_SCALE_THRESHOLD).mean())))
    table["headline_bias_over_se"] = table["headline_bias"] / table["headline_se"]
    table["bias_over_se"] = table["bias"] / table["se"]
    pd.set_option("display.width", 250)
    print(table.round(3).to_string())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
