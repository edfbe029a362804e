"""Validity checks: agd's ValidityChecker (batched, cached) against plain ``smact_validity`` per formula.

The formulas are real generator output: ``data/generated/candidates.parquet`` (the GAN's unique
candidates; each has ``n_sampled``, how often the generator drew it), or, without it, the formulas of
../shared/data/mp_gap_by_composition.csv. Two kinds of sample per size:

* distinct: n different formulas, so every one is new work for both sides (our worst case);
* as generated: n draws with replacement weighted by ``n_sampled``, the repeats a generator produces.

smact runs ``smact_validity(formula, use_pauling_test, include_alloys, oxidation_states_set)`` from
params.yaml's ``validity`` section in a plain loop, one call per row, as a script without a cache would;
the ``min_elements`` rule (pure elements are no compounds) is applied to its verdicts outside the timing.
Ours is one ``ValidityChecker.check`` call with one process: "cold" on a new checker, "warm" on a
checker that has seen the sample once. Every row's verdicts are compared.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from pymatgen.core import Composition

from agd.chem.validity import ValidityChecker
from agd.config import ValidityConfig, load_params
from bench import (
    REPO_ROOT,
    SHARED_DATA,
    BenchOptions,
    Section,
    Skipped,
    Target,
    Timing,
    format_exponent,
    growth_exponent,
    markdown_table,
    measure,
)

DEFAULT_SIZES = [1_000, 10_000, 100_000]
QUICK_SIZES = [100, 300, 1_000]
CANDIDATES = REPO_ROOT / "data" / "generated" / "candidates.parquet"
FALLBACK = SHARED_DATA / "mp_gap_by_composition.csv"
SEED = 0


def load_formulas() -> tuple[np.ndarray, np.ndarray, str]:
    """Distinct formulas, their sampling weights and a description of where they came from."""
    if CANDIDATES.is_file():
        table = pd.read_parquet(CANDIDATES, columns=["formula", "n_sampled"])
        weights = table["n_sampled"].to_numpy(dtype=float)
        source = f"`{CANDIDATES.relative_to(REPO_ROOT)}` ({len(table):,} unique GAN formulas)"
        return table["formula"].to_numpy(dtype=object), weights / weights.sum(), source
    if FALLBACK.is_file():
        table = pd.read_csv(FALLBACK, keep_default_na=False)  # the formula "NaN" is sodium nitride
        formulas = np.array(list(dict.fromkeys(table["formula"])), dtype=object)
        source = (
            f"`{FALLBACK.name}` ({len(formulas):,} Materials Project formulas; no generated candidates here)"
        )
        return formulas, np.full(len(formulas), 1 / len(formulas)), source
    raise Skipped(f"validity benchmark: neither {CANDIDATES} nor {FALLBACK} exists")


def smact_verdicts(formulas: np.ndarray, config: ValidityConfig) -> np.ndarray:
    """Plain smact_validity per formula under the checker's settings; an exception counts as invalid."""
    from smact.screening import smact_validity

    out = np.zeros(len(formulas), dtype=bool)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pymatgen warns on some compositions
        for i, formula in enumerate(formulas):
            try:
                out[i] = smact_validity(
                    formula,
                    use_pauling_test=config.use_pauling_test,
                    include_alloys=config.include_alloys,
                    oxidation_states_set=config.oxidation_states_set,
                )
            except (KeyError, ValueError):  # an element smact has no data for
                out[i] = False
    return out


def _draw(formulas: np.ndarray, weights: np.ndarray, n: int, kind: str, seed: int) -> np.ndarray:
    """n formulas: distinct (without replacement) or as generated (weighted, with replacement)."""
    rng = np.random.default_rng(seed)
    if kind == "distinct":
        return formulas[rng.choice(len(formulas), min(n, len(formulas)), replace=False)]
    return formulas[rng.choice(len(formulas), n, replace=True, p=weights)]


def run(options: BenchOptions) -> Section:
    """Time smact and the checker (cold and warm) on distinct and as-generated samples of each size."""
    sizes = options.sizes or (QUICK_SIZES if options.quick else DEFAULT_SIZES)
    repeats = options.repeats
    config = load_params(REPO_ROOT / "params.yaml").validity
    formulas, weights, source = load_formulas()
    smact_verdicts(np.array(["NaCl", "Fe2O3"], dtype=object), config)  # smact loads its tables lazily

    rows: list[list[str]] = []
    disagreements = compared = 0
    examples: list[str] = []
    growth: dict[str, dict[str, list[float]]] = {}
    speedups: dict[str, list[float]] = {"cold": [], "warm": []}
    for kind in ("distinct", "as generated"):
        for n in sizes:
            sample = _draw(formulas, weights, n, kind, SEED + n)
            smact_time, cold, warm, verdicts = _time_sample(sample, config, repeats)
            differ = np.flatnonzero(verdicts["smact"] != verdicts["ours"])
            disagreements += len(differ)
            compared += len(sample)
            examples += [f"{sample[i]} (smact {verdicts['smact'][i]})" for i in differ[:3]]
            per = {"smact": smact_time, "ours, cold": cold, "ours, warm": warm}
            for path, timing in per.items():
                growth.setdefault(kind, {}).setdefault(path, []).append(timing.cpu)
            speedups["cold"].append(smact_time.cpu / cold.cpu)
            speedups["warm"].append(smact_time.cpu / warm.cpu)
            n_rows = len(sample)
            rows.append(
                [
                    kind,
                    f"{n_rows:,}",
                    f"{len(set(sample.tolist())):,}",
                    f"{verdicts['smact'].mean():.3f}",
                    *_cells(smact_time, n_rows),
                    *_cells(cold, n_rows),
                    f"{smact_time.cpu / cold.cpu:.0f}x",
                    *_cells(warm, n_rows),
                    f"{smact_time.cpu / warm.cpu:.0f}x",
                    f"{len(differ):,}",
                ]
            )
    header = [
        "sample",
        "n",
        "distinct",
        "valid share",
        "smact wall s",
        "smact CPU s",
        "smact µs / formula",
        "ours cold wall s",
        "CPU s",
        "µs / formula",
        "speed-up",
        "ours warm wall s",
        "CPU s",
        "µs / formula",
        "speed-up",
        "disagreements",
    ]
    growth_rows = [
        [kind, *(format_exponent(growth_exponent(list(sizes), costs)) for costs in paths.values())]
        for kind, paths in growth.items()
    ]
    growth_table = markdown_table(["sample", "smact", "ours, cold", "ours, warm"], growth_rows)
    agreement = (
        f"The two agree on all {compared:,} rows compared."
        if disagreements == 0
        else f"They disagree on {disagreements:,} of {compared:,} rows, e.g. {'; '.join(examples[:5])}."
    )
    body = f"""
Formulas from {source}; settings from params.yaml `validity` (oxidation states
`{config.oxidation_states_set}`, Pauling test {config.use_pauling_test}, alloys {config.include_alloys}).
Medians of {repeats} runs; speed-ups are smact CPU time over ours. "Distinct" samples hold n different
formulas, so each costs both sides a full evaluation; "as generated" samples are drawn with replacement
in proportion to how often the generator produced each formula. smact: `smact_validity` called once per
row. Ours: one `ValidityChecker(config).check(sample)` call in one process, cold on a new checker,
warm on one that has checked the sample before (the per-row cost is then a lookup).
{agreement}

{markdown_table(header, rows)}

How CPU time grows with n (log-log slope over n = {", ".join(f"{n:,}" for n in sizes)}; 1 is linear):

{growth_table}
"""
    targets = [
        Target(
            "validity: same verdicts as `smact_validity`",
            "0 disagreements",
            f"{disagreements:,} of {compared:,} rows",
            disagreements == 0,
        ),
        Target(
            "validity: CPU speed-up over per-formula `smact_validity`",
            "(none set)",
            ", ".join(f"{k} cache {min(v):.0f}x to {max(v):.0f}x" for k, v in speedups.items()),
            None,
        ),
    ]
    return Section(
        "validity", "Validity checks (`agd.chem.validity`)", body, ["smact", "pymatgen", "pandas"], targets
    )


def _time_sample(
    sample: np.ndarray, config: ValidityConfig, repeats: int
) -> tuple[Timing, Timing, Timing, dict[str, np.ndarray]]:
    """Timings of smact, our cold and our warm checker on one sample, and both sides' verdicts."""
    verdicts: dict[str, np.ndarray] = {}
    holder: dict[str, ValidityChecker] = {}

    def fresh() -> None:
        holder["checker"] = ValidityChecker(config)

    def reference() -> None:
        verdicts["smact"] = smact_verdicts(sample, config)

    def ours() -> None:
        verdicts["ours"] = holder["checker"].check(sample)["valid"].to_numpy()

    smact_time = measure(reference, repeats)
    # agd's min_elements rule on smact's verdicts, outside the timing (smact passes every pure element)
    n_elements = np.array([len(Composition(f).elements) for f in sample])
    verdicts["smact"] = verdicts["smact"] & (n_elements >= config.min_elements)
    cold = measure(ours, repeats, setup=fresh)
    warm = measure(ours, repeats)  # the last cold run's checker has seen the sample
    return smact_time, cold, warm, verdicts


def _cells(timing: Timing, n: int) -> list[str]:
    """Wall s, CPU s and CPU µs per formula."""
    return [f"{timing.wall:.4f}", f"{timing.cpu:.4f}", f"{timing.cpu / n * 1e6:.1f}"]
