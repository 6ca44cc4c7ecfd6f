"""How often the specification check warns on each zoo design, and whether it warns where the
headline misses: the check without a nonlinear specification (image only, twice the components),
with the products of the leading components in every nuisance (session 9's check, effects-6), and
with the products in one pooled outcome model beside the headline's propensity (the product's
check now, ``eocausal.estimate.fragility.products_comparison``). Same draws, folds and learners as
the zoo's headline (``eocausal.zoo.run_replication``); embeddings from the zoo's cache (prepared on
first use).

    .venv/bin/python benchmarks/zoo_fragility.py --replications 100 --jobs 2

writes ``benchmarks/results/zoo/fragility.md`` (and ``fragility.csv``, one row per design x
replication: the comparisons' z values) and prints the table. ``--products-only`` fits only the
headline and the products comparison and takes the other comparisons' z values (and the earlier
products comparison's, ``z_products_earlier``, described by ``--earlier``) from the CSV, whose
draws and folds are the same;
``--table-only`` rewrites the table from the CSV under the current thresholds. Columns: the
headline's bias/SE and coverage (tabular+image AIPW, 64 components), the warning rate of each
version of the check, the median |z| of the products comparison, and the rate among the
replications whose 95 % interval misses the truth.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from zoo_support import zoo_parser  # noqa: E402

from eocausal import zoo  # noqa: E402
from eocausal.estimate import fragility  # noqa: E402
from eocausal.estimate.ate import estimate_effects  # noqa: E402

FOLDS = 5
PRODUCTS = fragility.PRODUCTS


def one(prepared: zoo.PreparedDesign, rep: int, products_only: bool = False) -> dict:
    draw = zoo.replication_draw(prepared, rep)
    y, d, tab = draw["y"], draw["d"], draw["tabular"]
    truth = float(np.mean(draw["tau"]))
    k = zoo.DEFAULT_COMPONENTS
    comps = prepared.components["default"]
    headline = estimate_effects(y, d, np.hstack([tab, comps[:, :k]]), estimators=("aipw",), folds=FOLDS,
                                seed=rep)["aipw"]
    started = time.perf_counter()
    row = {"design": prepared.design.name, "replication": rep, "truth": truth, "estimate": headline.estimate,
           "std_error": headline.std_error, "covered": bool(headline.ci_low <= truth <= headline.ci_high)}
    if products_only:
        comparison = fragility.products_comparison(y, d, tab, comps[:, :k], folds=FOLDS, seed=rep, headline=headline)
        return row | {"z_products": comparison.z, "products_seconds": time.perf_counter() - started}
    check = fragility.specification_check(y, d, tab, comps, k, folds=FOLDS, seed=rep, headline=headline)
    seconds = time.perf_counter() - started
    z = {c.name: c.z for c in check.comparisons}
    linear = [abs(v) for name, v in z.items() if not name.startswith(PRODUCTS)]
    products = next(v for name, v in z.items() if name.startswith(PRODUCTS))
    return row | {"z_linear": max(linear), "z_products": products, "seconds": seconds}


def warnings(frame: pd.DataFrame) -> pd.DataFrame:
    """The check's warning without products (the two generic comparisons), with the earlier
    products comparison (where the CSV has it) and now (the product's products comparison, at its
    own threshold), from the stored z values: the rule of FragilityCheck.warning."""
    before = frame["z_linear"] > fragility.THRESHOLD
    products = frame["z_products"].abs() > fragility.PRODUCTS_THRESHOLD
    earlier = (before | (frame["z_products_earlier"].abs() > fragility.PRODUCTS_THRESHOLD)
               if "z_products_earlier" in frame else pd.Series(np.nan, index=frame.index))
    return frame.assign(warn_before=before, warn_earlier=earlier, warn_now=before | products)


def table(frame: pd.DataFrame, prepared: dict[str, zoo.PreparedDesign]) -> str:
    """One row per design; the "earlier products comparison" and "products s" columns only where the
    CSV has them (a ``--products-only`` run on an earlier full run's CSV)."""
    frame = warnings(frame)
    earlier = "z_products_earlier" in frame
    header = (["design", "in chip", "confounder R²", "bias/SE", "coverage", "warns without products"]
              + (["warns with the earlier products comparison"] if earlier else [])
              + ["warns now", "median \\|z\\| products", "warns now when missed (n)", "check s"]
              + (["products s"] if earlier else []))
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if h in ("design", "in chip", "warns now when missed (n)") else "---:"
                            for h in header) + "|"]
    for name, g in frame.groupby("design", sort=False):
        err = g["estimate"] - g["truth"]
        missed = g[~g["covered"]]
        when_missed = f"{missed['warn_now'].mean():.2f} ({len(missed)})" if len(missed) else "– (0)"
        within = "yes" if prepared[name].settings["within_chip"] else "no"
        cells = ([name, within, f"{prepared[name].r2['default']:.3f}", f"{err.mean() / g['std_error'].mean():+.2f}",
                  f"{g['covered'].mean():.2f}",
                  f"{g['warn_before'].mean():.2f}"]
                 + ([f"{g['warn_earlier'].mean():.2f}"] if earlier else [])
                 + [f"{g['warn_now'].mean():.2f}", f"{g['z_products'].abs().median():.2f}", when_missed,
                    f"{g['seconds'].mean():.1f}"]
                 + ([f"{g['products_seconds'].mean():.2f}"] if earlier else []))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _with_earlier_comparisons(frame: pd.DataFrame, earlier: pd.DataFrame) -> pd.DataFrame:
    """The new products z values beside the earlier run's other comparisons (same draws and folds:
    the headline estimates must agree), the earlier products z kept as ``z_products_earlier``."""
    earlier = earlier.drop(columns="z_products_earlier", errors="ignore").rename(
        columns={"z_products": "z_products_earlier"})
    kept = earlier.drop(columns=["z_products", "products_seconds", "warn_before", "warn_now"], errors="ignore")
    merged = frame[["design", "replication", "z_products", "products_seconds", "estimate"]].merge(
        kept, on=["design", "replication"], suffixes=("_new", ""), validate="one_to_one")
    drift = (merged["estimate_new"] - merged["estimate"]).abs().max()
    if not drift < 1e-6:
        raise SystemExit(f"the headline differs from fragility.csv's by up to {drift:.2g}: not the same draws")
    return merged.drop(columns="estimate_new")


def main(argv=None) -> int:
    parser = zoo_parser(__doc__)
    parser.add_argument("--earlier", default="the products comparison of the run whose CSV this extends",
                        help="with --products-only: what the CSV's products comparison was (for the table)")
    parser.add_argument("--products-only", action="store_true",
                        help="fit only the products comparison; the other z values from fragility.csv")
    parser.add_argument("--table-only", action="store_true",
                        help="rewrite fragility.md from fragility.csv (e.g. after a threshold changed)")
    args = parser.parse_args(argv)
    from joblib import Parallel, delayed

    out = Path(args.out)
    names = args.designs.split(",")
    designs = {name: zoo.design_by_name(name) for name in names}
    if args.table_only:
        frame = pd.read_csv(out / "fragility.csv")
        names = list(dict.fromkeys(frame["design"]))
        designs = {name: zoo.design_by_name(name) for name in names}
        args.replications = int(frame.groupby("design").size().min())
    else:
        rows = []
        for name in names:
            p = zoo.prepare(designs[name], Path(args.cache), Path(args.landsat))
            started = time.perf_counter()
            rows += Parallel(n_jobs=args.jobs)(delayed(one)(p, rep, args.products_only)
                                               for rep in range(args.replications))
            print(f"{name}: {args.replications} replications in {time.perf_counter() - started:.0f} s", flush=True)
            frame = pd.DataFrame(rows)
            if args.products_only:
                frame = _with_earlier_comparisons(frame, pd.read_csv(out / "fragility.csv"))
            frame.to_csv(out / ("fragility.partial.csv" if args.products_only else "fragility.csv"), index=False)
        if args.products_only:
            (out / "fragility.partial.csv").replace(out / "fragility.csv")
    prepared = {name: zoo.prepare(designs[name], Path(args.cache), Path(args.landsat)) for name in names}
    text = table(frame, prepared)
    command = (f"python benchmarks/zoo_fragility.py --replications {args.replications} --jobs {args.jobs}"
               + ("" if args.designs == parser.get_default("designs") else f" --designs {args.designs}")
               + (f' --products-only --earlier "{args.earlier}"' if "z_products_earlier" in frame else ""))
    note = (" (the products comparison; the others from the full run's CSV)" if "z_products_earlier" in frame else "")
    earlier_note = (f"*Warns with the earlier products comparison*: {args.earlier}, beyond "
            f"{fragility.PRODUCTS_THRESHOLD:g} SE, instead of the\nproduct's. *products s*: the products comparison "
            "alone.\n" if "z_products_earlier" in frame else "")
    (out / "fragility.md").write_text(
        "# The specification check on the zoo\n\n"
        f"`{command}`{note}\n\n"
        "Headline: tabular+image AIPW, 64 components, the zoo's draws and folds and the product's default\n"
        "learners. *Warns without products*: image only or twice the components beyond "
        f"{fragility.THRESHOLD:g} SE; *warns now*:\nalso the squares and products of the "
        f"{fragility.NONLINEAR_LEADING} leading components in the headline's outcome models (fitted as its own),\n"
        f"beside its propensity (`fragility.products_comparison`) beyond {fragility.PRODUCTS_THRESHOLD:g} SE "
        "(the product's check). *check s*: the\nwhole check (three comparisons) per replication.\n"
        f"{earlier_note}\n"
        f"{text}\n", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
