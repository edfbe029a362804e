"""How much of the Exp1 band gaps can a composition model explain at best? Polymorph spread as label noise.

    python -m bench.studies.label_noise

A composition-only oracle sees one label per composition, but a composition can have several MP polymorphs
with different gaps. If the Exp1 label were any one of them, the best possible prediction is their mean and
the irreducible squared error is their variance. This study takes every polymorph of the 2019 MP snapshot
(``mp_gap_all_polymorphs_2019.csv``) and Matbench's ``mp_gap`` (a 2018 snapshot), and reports, over the
Exp1 compositions, the mean within-composition variance, the R^2 ceiling it implies (1 - that / the
variance of the Exp1 gaps), and how far the Exp1 label sits from the polymorphs' median.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[2]


def _read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, keep_default_na=False, usecols=["reduced_formula", "band_gap"])


def ceiling(exp1: pd.DataFrame, polymorphs: pd.DataFrame, non_metals_only: bool = False) -> dict[str, float]:
    """R^2 ceiling and spreads of ``exp1``'s gaps given the polymorphs' gaps of each composition."""
    if non_metals_only:
        polymorphs = polymorphs[polymorphs["band_gap"] > 0]
    groups = polymorphs.groupby("reduced_formula")["band_gap"]
    stats = pd.DataFrame({"n": groups.size(), "var": groups.var(ddof=0), "median": groups.median()})
    joined = exp1.join(stats, on="reduced_formula", how="left")
    within = joined["var"].fillna(0.0)  # compositions with one polymorph (or none) add no spread
    total = float(exp1["band_gap"].var(ddof=0))
    found = joined["median"].notna()
    off = (joined.loc[found, "band_gap"] - joined.loc[found, "median"]).abs()
    return {
        "found": float(found.mean()),
        "several_polymorphs": float((joined["n"] > 1).mean()),
        "mean_within_std": float(np.sqrt(within).mean()),
        "r2_ceiling": 1.0 - float(within.mean()) / total,
        "label_vs_median_mae": float(off.mean()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    args = parser.parse_args(argv)
    data = Path(args.data)
    exp1 = _read(data / "mp_gap_agd_exp1.csv")
    print(f"{len(exp1):,} Exp1 compositions, gap variance {exp1['band_gap'].var(ddof=0):.3f} eV^2\n")
    print(
        "| polymorphs from | non-metals only | Exp1 found | several polymorphs | mean within std (eV) "
        "| R2 ceiling | Exp1 label vs median, MAE (eV) |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in ("mp_gap_all_polymorphs_2019.csv", "matbench_mp_gap.csv"):
        for non_metals in (False, True):
            r = ceiling(exp1, _read(data / name), non_metals)
            print(
                f"| {name} | {'yes' if non_metals else 'no'} | {100 * r['found']:.1f}% "
                f"| {100 * r['several_polymorphs']:.1f}% | {r['mean_within_std']:.3f} | {r['r2_ceiling']:.3f} "
                f"| {r['label_vs_median_mae']:.3f} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
