"""Oracle inference: band-gap labels per second from the deployed Roost ensemble and the Magpie forest.

The Roost ensemble is what ``load_oracle('models/oracle')`` opens (skipped with a message when it is
absent); the forest is the one saved beside it (``others.forest`` in ``oracle.json``). The formulas
are the valid generated candidates (``data/generated/candidates.parquet``), which is what the screen
stage labels, or the shared Materials Project formulas without them. Roost runs with torch limited to
1 and to 2 intra-op threads (the members' ``num_threads``); the forest's trees predict one at a time
in scikit-learn, where torch threads play no part.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

from agd.chem import formula as formula_module
from agd.models.forest import ForestModel
from agd.models.oracle import ModelOracle, OracleLabels, load_oracle
from agd.models.roost import RoostEnsemble
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

DEFAULT_SIZES = [1_000, 5_000, 20_000]
QUICK_SIZES = [100, 300, 1_000]
THREADS = (1, 2)
#: another Roost batch, timed beside the default one (one thread): the default before 2026-12, which
#: ran 2.4x slower on this CPU than the present default of 256
OTHER_BATCH = 4096
ORACLE_DIR = REPO_ROOT / "models" / "oracle"
CANDIDATES = REPO_ROOT / "data" / "generated" / "candidates.parquet"
FALLBACK = SHARED_DATA / "mp_gap_by_composition.csv"
SEED = 0


def load_formulas(n: int) -> tuple[list[str], str]:
    """n formulas to label (drawn without replacement, seeded) and where they came from."""
    if CANDIDATES.is_file():
        table = pd.read_parquet(CANDIDATES, columns=["formula", "valid"])
        pool = table.loc[table["valid"], "formula"].to_numpy(dtype=object)
        source = f"valid generated candidates (`{CANDIDATES.relative_to(REPO_ROOT)}`, {len(pool):,})"
    elif FALLBACK.is_file():
        pool = np.array(
            list(dict.fromkeys(pd.read_csv(FALLBACK, keep_default_na=False)["formula"])), dtype=object
        )
        source = (
            f"Materials Project formulas (`{FALLBACK.name}`, {len(pool):,}; no generated candidates here)"
        )
    else:
        raise Skipped(f"oracle benchmark: neither {CANDIDATES} nor {FALLBACK} exists")
    rng = np.random.default_rng(SEED)
    return pool[rng.choice(len(pool), min(n, len(pool)), replace=False)].tolist(), source


def _clear_parse_cache() -> None:
    """Empty parse_formula's cache so that every run parses its formulas (private hook; no-op if renamed)."""
    getattr(getattr(formula_module, "_parse_cached", None), "cache_clear", lambda: None)()


def with_threads(ensemble: RoostEnsemble, threads: int) -> RoostEnsemble:
    """The same members with torch limited to ``threads`` intra-op threads while they predict."""
    return RoostEnsemble(
        [
            dataclasses.replace(member, config=member.config.model_copy(update={"num_threads": threads}))
            for member in ensemble.members
        ]
    )


def _time_labels(
    label: Callable[[Sequence[str]], OracleLabels], formulas: list[str], repeats: int
) -> tuple[Timing, float]:
    """Median timing of labelling ``formulas`` and the share that got a finite label."""
    out: list[OracleLabels] = []
    timing = measure(lambda: out.append(label(formulas)), repeats, setup=_clear_parse_cache)
    return timing, float(np.isfinite(out[-1].gaps).mean())


def run(options: BenchOptions) -> Section:
    """Formulas per second at each size: Roost ensemble at 1 and 2 torch threads, and the forest."""
    if not (ORACLE_DIR / "oracle.json").is_file() and not (ORACLE_DIR / "ensemble.json").is_file():
        raise Skipped(f"oracle benchmark: no trained oracle in {ORACLE_DIR} (run `agd train oracle` first)")
    sizes = options.sizes or (QUICK_SIZES if options.quick else DEFAULT_SIZES)
    repeats = options.repeats
    oracle = load_oracle(ORACLE_DIR)
    if not isinstance(oracle, ModelOracle) or not isinstance(oracle.model, RoostEnsemble):
        raise Skipped(f"oracle benchmark: {ORACLE_DIR} holds {oracle!r}, not a Roost ensemble")
    meta = (
        json.loads((ORACLE_DIR / "oracle.json").read_text()) if (ORACLE_DIR / "oracle.json").is_file() else {}
    )
    forest_path = meta.get("others", {}).get("forest")
    forest = ForestModel.load(ORACLE_DIR / forest_path) if forest_path else None
    formulas, source = load_formulas(max(sizes))

    default_batch = inspect.signature(RoostEnsemble.predict).parameters["batch_size"].default
    members = len(oracle.model.members)
    roost_name = f"Roost ensemble ({members} members, batch {default_batch})"
    models: list[tuple[str, str, Callable[[Sequence[str]], OracleLabels]]] = []
    for threads in THREADS:
        models.append((roost_name, str(threads), with_threads(oracle.model, threads).predict))
    small = with_threads(oracle.model, 1)
    models.append(
        (
            f"Roost ensemble ({members} members, batch {OTHER_BATCH})",
            "1",
            lambda formulas: small.predict(formulas, batch_size=OTHER_BATCH),
        )
    )
    if forest is not None:
        trees = len(forest.forest.estimators_)
        models.append((f"random forest ({trees} trees, Magpie)", "n/a", forest.predict))
    for _, _, label in models:
        label(formulas[:50])  # first call pays for lazy set-up (tables, torch kernels)

    rows, growth, rates = [], {}, {}
    for name, threads, label in models:
        costs = []
        for n in sizes:
            timing, labelled = _time_labels(label, formulas[:n], repeats)
            costs.append(timing.cpu)
            rates[(name, threads, n)] = n / timing.wall
            rows.append(
                [
                    name,
                    threads,
                    f"{n:,}",
                    f"{timing.wall:.4f}",
                    f"{timing.cpu:.3f}",
                    f"{n / timing.wall:,.0f}",
                    f"{timing.wall / n * 1e6:.0f}",
                    f"{labelled:.3f}",
                ]
            )
        growth[(name, threads)] = growth_exponent(list(sizes), costs)
    header = [
        "model",
        "torch threads",
        "formulas",
        "wall s",
        "CPU s",
        "formulas / s (wall)",
        "µs / formula",
        "labelled",
    ]
    growth_rows = [[name, threads, format_exponent(value)] for (name, threads), value in growth.items()]
    largest = max(sizes)
    scaling = rates[(roost_name, "2", largest)] / rates[(roost_name, "1", largest)]
    other_ratio = rates[(models[2][0], "1", largest)] / rates[(roost_name, "1", largest)]
    body = f"""
The deployed oracle (`load_oracle("models/oracle")`: {oracle.name}) and the forest saved beside it,
labelling {source}, drawn without replacement (seed {SEED}); each size is the first n of one draw.
Medians of {repeats} runs of `predict` (formula parsing, encoding and the networks or trees: everything
a caller pays; the formula parser's cache is emptied before each run). "Labelled" is the share with a
finite gap (the others hold an element the model never saw). Formulas per second use wall time; with
2 threads CPU time exceeds wall time when the second thread helps. On this machine 2 threads give {scaling:.2f}x the 1-thread rate at {largest:,} formulas
(the load average above says how busy the 2 cores were). The Roost rows with batch {OTHER_BATCH:,} use
the same networks with `predict(formulas, batch_size={OTHER_BATCH})` instead of the default
{default_batch:,}: {other_ratio:.2f}x the default's rate at {largest:,} formulas, one thread each.

{markdown_table(header, rows)}

How time grows with the number of formulas (log-log slope of CPU time; 1 is linear):

{markdown_table(["model", "torch threads", "growth exponent"], growth_rows)}
"""
    targets = [
        Target(
            "oracle: Roost ensemble formulas per second",
            "(none set)",
            f"{rates[(roost_name, '1', largest)]:,.0f} / s (1 thread), "
            f"{rates[(roost_name, '2', largest)]:,.0f} / s (2 threads) at {largest:,}",
            None,
        )
    ]
    return Section(
        "oracle",
        "Oracle inference (`agd.models.oracle`)",
        body,
        ["torch", "aviary-models", "scikit-learn"],
        targets,
    )
