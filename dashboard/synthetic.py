"""Synthetic but plausible catalog tables that follow ``SCHEMA_SQL`` exactly, for tests and load-time checks.

The dashboard must work before the producing stages have run at full size, so its tests and its
load-time measurement build a catalog with the real ``build_catalog`` from these tables. Values are
drawn from a seeded generator (same seed, same catalog); formulas are real-looking ionic compositions
so that pymatgen parses them and the element search has something to find.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from agd.config import DesignMapConfig
from agd.tracking.catalog import Load, build_catalog

CATIONS = ["Li", "Na", "K", "Rb", "Cs", "Be", "Mg", "Ca", "Sr", "Ba", "Al", "Ga", "In", "Sc", "Y", "Zn", "B"]
ANIONS = ["O", "F", "Cl", "N", "S", "Br"]
EXPERIMENTS = ["Exp1", "Exp2", "Exp3", "Exp4"]
KAPPAS = [0.0, 1.0, 5.0, 10.0, 50.0, 100.0]
LATENT_DIM = 16  # default; the load-time check uses the autoencoder's 128

# rock-salt cells for the structures table: formula -> (cation, anion, lattice constant in Angstrom)
ROCKSALT = {
    "MgO": ("Mg", "O", 4.21),
    "LiF": ("Li", "F", 4.03),
    "NaCl": ("Na", "Cl", 5.64),
    "CaO": ("Ca", "O", 4.81),
}


def _formulas(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` formulas of the form A{a}B{b}X{x} (counts 1..4; a count of 1 is not written)."""
    a = rng.integers(0, len(CATIONS), n)
    b = (a + rng.integers(1, len(CATIONS), n)) % len(CATIONS)
    x = rng.integers(0, len(ANIONS), n)
    counts = rng.integers(1, 5, (n, 3)).astype(str)
    counts[counts == "1"] = ""
    parts = [
        np.asarray(CATIONS)[a],
        counts[:, 0],
        np.asarray(CATIONS)[b],
        counts[:, 1],
        np.asarray(ANIONS)[x],
        counts[:, 2],
    ]
    out = parts[0]
    for part in parts[1:]:
        out = np.char.add(out, part)
    return out.astype(object)


def _rocksalt_cif(cation: str, anion: str, a: float) -> str:
    """CIF text of a rock-salt cell, written by pymatgen."""
    from pymatgen.core import Lattice, Structure

    structure = Structure.from_spacegroup(
        "Fm-3m", Lattice.cubic(a), [cation, anion], [[0, 0, 0], [0.5, 0.5, 0.5]]
    )
    return structure.to(fmt="cif")


def synthetic_tables(
    *,
    n_candidates: int = 400,
    n_repeats: int = 3,
    n_initial: int = 12,
    n_rounds: int = 4,
    batch: int = 5,
    n_hits: int = 6,
    latent_dim: int = LATENT_DIM,
    seed: int = 0,
) -> dict[str, pd.DataFrame]:
    """Every catalog table as a DataFrame with the schema's columns (provenance columns excluded)."""
    rng = np.random.default_rng(seed)

    n_data = 60
    data_formulas = _formulas(rng, n_data)
    datasets = pd.DataFrame(
        {
            "dataset": "synthetic",
            "row": np.arange(n_data, dtype=np.int64),
            "material_id": [f"mp-{1000 + i}" for i in range(n_data)],
            "formula": data_formulas,
            "reduced_formula": data_formulas,
            "n_elements": 3,
            "n_atoms": rng.integers(3, 12, n_data),
            "band_gap": rng.uniform(0.0, 8.0, n_data).round(3),
            "formation_energy_per_atom": rng.uniform(-3.0, 0.5, n_data).round(3),
            "energy_above_hull": rng.uniform(0.0, 0.3, n_data).round(3),
            "split": rng.choice(["train", "val", "test"], n_data, p=[0.6, 0.2, 0.2]),
            "n_merged": 1,
        }
    )

    cand_formulas = _formulas(rng, n_candidates)
    cand_formulas[: len(ROCKSALT)] = list(ROCKSALT)
    neutral = rng.random(n_candidates) < 0.8
    balanced = rng.random(n_candidates) < 0.9
    candidates = pd.DataFrame(
        {
            "run_id": rng.choice(["gan-a", "gan-b"], n_candidates),
            "formula": cand_formulas,
            "reduced_formula": cand_formulas,
            "n_elements": 3,
            "n_atoms": rng.integers(3, 12, n_candidates),
            "charge_neutral": neutral,
            "electronegativity_balanced": balanced,
            "valid": neutral & balanced,
            "novel": rng.random(n_candidates) < 0.7,
            "source": "gan",
        }
    )
    candidates.loc[: len(ROCKSALT) - 1, "valid"] = True

    # active learning as `agd experiments` names it: <exp>-bo and the random control <exp>-random per
    # experiment (Exp1 has no campaign), and the kappa sweep as experiment 'kappa', campaigns kappa-<k>
    campaigns = [(exp, 2.0, method) for exp in EXPERIMENTS if exp != "Exp1" for method in ("bo", "random")]
    campaigns += [("kappa", kappa, "bo") for kappa in KAPPAS]
    rows = []
    fates = np.array(["registered", "duplicate", "undecodable", "invalid"])
    for experiment, kappa, method in campaigns:
        campaign = f"kappa-{kappa:g}" if experiment == "kappa" else f"{experiment}-{method}"
        lift = 0.0 if method == "random" else 0.02 * (1 + np.log1p(kappa))
        for repeat in range(n_repeats):
            for round_ in range(n_rounds + 1):
                size = n_initial if round_ == 0 else batch
                latent = rng.uniform(-1, 1, (size, latent_dim)).astype(np.float32)
                formulas = _formulas(rng, size)
                if round_ == 0:
                    fate = np.full(size, "initial")
                else:
                    fate = fates[rng.choice(4, size, p=[0.7, 0.1, 0.1, 0.1])]
                labelled = np.isin(fate, ["initial", "registered", "duplicate"])
                label = np.where(labelled, rng.uniform(0, 6.5, size) * (1 + lift * round_), np.nan).round(3)
                for i in range(size):
                    rows.append(
                        {
                            "campaign": campaign,
                            "experiment": experiment,
                            "repeat": repeat,
                            "round": round_,
                            "idx": i,
                            "latent": latent[i].tolist(),
                            "formula": None if fate[i] == "undecodable" else formulas[i],
                            "valid": None if fate[i] == "undecodable" else bool(fate[i] != "invalid"),
                            "fate": fate[i],
                            "label": label[i],
                            "label_std": None
                            if np.isnan(label[i]) or round_ == 0
                            else round(float(rng.uniform(0.1, 0.5)), 3),
                            "acquisition": None if round_ == 0 else round(float(rng.normal(3, 1)), 4),
                            "kappa": kappa,
                            "method": method,
                        }
                    )
    al_samples = pd.DataFrame(rows)

    metric_rows, hit_rows = [], []
    hit_pool = cand_formulas[: max(len(ROCKSALT), n_candidates // 4)]
    for experiment in EXPERIMENTS:
        for training_set in ["BS", "AL", "random"]:
            bonus = {"BS": 0.0, "AL": 0.15, "random": 0.05}[training_set]
            for model in ["roost", "forest"]:
                for window in ["gt6", "2-4"]:
                    for repeat in range(n_repeats):
                        n_oracle = int(rng.integers(80, 120))
                        recovery = float(np.clip(rng.normal(0.55 + bonus, 0.04), 0, 1))
                        n_recovered = int(round(recovery * n_oracle))
                        n_cand = n_recovered + int(rng.integers(10, 60))
                        precision = n_recovered / n_cand
                        r2 = float(rng.normal(0.75 + bonus / 3, 0.02))
                        metric_rows.append(
                            {
                                "experiment": experiment,
                                "repeat": repeat,
                                "model": model,
                                "training_set": training_set,
                                "gap_window": window,
                                "n_train": int(rng.integers(300, 1300)),
                                "r2_holdout": round(r2 + 0.03, 4),
                                "mae_holdout": round(float(rng.uniform(0.3, 0.5)), 4),
                                "rmse_holdout": round(float(rng.uniform(0.5, 0.8)), 4),
                                "r2_test": round(r2, 4),
                                "mae_test": round(float(rng.uniform(0.35, 0.55)), 4),
                                "rmse_test": round(float(rng.uniform(0.55, 0.9)), 4),
                                "n_candidates": n_cand,
                                "n_oracle": n_oracle,
                                "n_recovered": n_recovered,
                                "recovery": n_recovered / n_oracle,
                                "precision": precision,
                                "f1": 2
                                * precision
                                * (n_recovered / n_oracle)
                                / (precision + n_recovered / n_oracle),
                            }
                        )
                        if repeat == 0 and model == "roost":
                            for formula in rng.choice(hit_pool, min(n_hits, len(hit_pool)), replace=False):
                                low, high = (6.0, 9.0) if window == "gt6" else (2.0, 4.0)
                                hit_rows.append(
                                    {
                                        "experiment": experiment,
                                        "repeat": repeat,
                                        "model": model,
                                        "training_set": training_set,
                                        "gap_window": window,
                                        "formula": formula,
                                        "reduced_formula": formula,
                                        "predicted_gap": round(float(rng.uniform(low, high)), 3),
                                        "oracle_gap": round(float(rng.uniform(low - 0.5, high + 0.5)), 3),
                                        "beyond_training": bool(rng.random() < 0.1),
                                    }
                                )
    screening_metrics = pd.DataFrame(metric_rows)
    # the same screeners with their sets' labels kept: the AL sets label some of the oracle's hits
    kept = screening_metrics[["experiment", "repeat", "training_set", "model", "gap_window"]].copy()
    on_candidates = np.where(kept["training_set"] == "AL", 900, 60)
    kept["n_labelled"] = on_candidates + rng.integers(0, 40, len(kept))
    kept["n_labelled_truth"] = np.where(kept["training_set"] == "AL", rng.integers(10, 30, len(kept)), 0)
    kept["n_oracle"] = screening_metrics["n_oracle"]
    kept["n_recovered"] = np.minimum(
        screening_metrics["n_recovered"] + kept["n_labelled_truth"] // 2, kept["n_oracle"]
    )
    kept["n_candidates"] = screening_metrics["n_candidates"] + kept["n_labelled_truth"] // 4
    kept["recovery"] = kept["n_recovered"] / kept["n_oracle"]
    kept["precision"] = kept["n_recovered"] / kept["n_candidates"]
    kept["f1"] = 2 * kept["n_recovered"] / (kept["n_candidates"] + kept["n_oracle"])
    kept["recovery_gain"] = kept["recovery"] - screening_metrics["recovery"]
    kept["precision_gain"] = kept["precision"] - screening_metrics["precision"]
    # after a check of the near-misses: each margin costs labels, and the checked part of the list is right
    check = pd.concat(
        [
            kept[["experiment", "repeat", "training_set", "model", "gap_window"]].assign(
                margin=margin,
                n_checked=kept["n_candidates"] // 2 + int(400 * margin),
                n_oracle=kept["n_oracle"],
                n_recovered=np.minimum(kept["n_recovered"] + int(40 * margin), kept["n_oracle"]),
            )
            for margin in (0.25, 0.5)
        ],
        ignore_index=True,
    )
    check["n_candidates"] = check["n_recovered"] + rng.integers(0, 5, len(check))
    check["recovery"] = check["n_recovered"] / check["n_oracle"]
    check["precision"] = check["n_recovered"] / check["n_candidates"]
    check["f1"] = 2 * check["n_recovered"] / (check["n_candidates"] + check["n_oracle"])
    # within each screener's element domain: a stricter domain leaves out more of the model's calls
    domain = pd.concat(
        [
            screening_metrics[["experiment", "repeat", "training_set", "model", "gap_window"]].assign(
                min_rows=k,
                n_dropped=screening_metrics["n_candidates"] * k // 100,
                n_oracle=screening_metrics["n_oracle"],
                n_recovered=screening_metrics["n_recovered"] - screening_metrics["n_recovered"] * k // 400,
                kept_n_recovered=kept["n_recovered"] - kept["n_recovered"] * k // 400,
            )
            for k in (10, 20)
        ],
        ignore_index=True,
    )
    levels = 2  # the domain's rows are the metrics' rows once per min_rows
    model_calls = np.tile(screening_metrics["n_candidates"].to_numpy(), levels) - domain["n_dropped"]
    domain["n_candidates"] = model_calls.clip(lower=domain["n_recovered"])
    labelled = np.tile(kept["n_labelled_truth"].to_numpy(), levels)
    domain["kept_n_candidates"] = (domain["n_candidates"] + labelled).clip(lower=domain["kept_n_recovered"])
    for prefix in ("", "kept_"):
        n, hits = domain[f"{prefix}n_recovered"], domain[f"{prefix}n_candidates"]
        domain[f"{prefix}recovery"] = n / domain["n_oracle"]
        domain[f"{prefix}precision"] = (n / hits.where(hits > 0)).astype(float)
        domain[f"{prefix}f1"] = 2 * n / (hits + domain["n_oracle"])
    domain = domain[
        ["experiment", "repeat", "training_set", "model", "gap_window", "min_rows", "n_dropped", "n_candidates",
         "n_oracle", "n_recovered", "recovery", "precision", "f1", "kept_n_candidates", "kept_n_recovered",
         "kept_recovery", "kept_precision", "kept_f1"]
    ]  # fmt: skip
    check = check[
        ["experiment", "repeat", "training_set", "model", "gap_window", "margin", "n_checked", "n_candidates",
         "n_oracle", "n_recovered", "recovery", "precision", "f1"]
    ]  # fmt: skip
    screening = pd.DataFrame(hit_rows)
    # the rock-salt formulas are hits in every experiment, so the structure panel always has something to show
    screening.loc[: len(ROCKSALT) - 1, "formula"] = list(ROCKSALT)
    screening.loc[: len(ROCKSALT) - 1, "reduced_formula"] = list(ROCKSALT)

    structures = pd.DataFrame(
        [
            {
                "formula": formula,
                "template_id": f"mp-{2000 + i}",
                "template_formula": template,
                "elmd_distance": round(0.5 + i * 0.25, 3),
                "status": "relaxed",
                "cif": _rocksalt_cif(cation, anion, a),
                "formation_energy_per_atom": round(-3.0 + 0.4 * i, 3),
                "energy_per_atom": round(-6.0 + 0.3 * i, 3),
                "relax_steps": 40 + 5 * i,
                "converged": i != 3,
                "vasp_dir": f"data/vasp/{formula}",
            }
            for i, (formula, (cation, anion, a)) in enumerate(ROCKSALT.items())
            for template in [{"MgO": "CaO", "LiF": "NaF", "NaCl": "KCl", "CaO": "SrO"}[formula]]
        ]
    )
    dft_results = pd.DataFrame(
        {
            "formula": ["MgO", "LiF"],
            "path": ["data/vasp/MgO/static", "data/vasp/LiF/static"],
            "band_gap": [4.45, 8.71],
            "total_energy": [-11.9, -9.8],
            "formation_energy_per_atom": [-3.05, -3.09],
            "converged": [True, True],
            "status": ["ok", "ok"],
            "imported_at": pd.to_datetime(["2026-01-02 10:00", "2026-01-02 10:05"]),
        }
    )
    return {
        "datasets": datasets,
        "candidates": candidates,
        "al_samples": al_samples,
        "screening": screening,
        "screening_metrics": screening_metrics,
        "screening_labels_kept": kept,
        "screening_check": check,
        "screening_domain": domain,
        "structures": structures,
        "dft_results": dft_results,
    }


def write_synthetic_catalog(
    db_path: str | os.PathLike[str],
    parquet_dir: str | os.PathLike[str],
    tables: dict[str, pd.DataFrame] | None = None,
    design_map: DesignMapConfig | None = None,
) -> dict[str, int]:
    """Write the tables as parquet files and load them with ``build_catalog``; returns rows per table.

    ``design_map`` embeds the t-SNE map as the pipeline's catalog stage does (``params.catalog.design_map``).
    """
    tables = tables if tables is not None else synthetic_tables()
    folder = Path(parquet_dir)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, frame in tables.items():
        paths[name] = folder / f"{name}.parquet"
        frame.to_parquet(paths[name], index=False)
    extra = [Load(name, path) for name, path in paths.items() if name != "datasets"]
    return build_catalog(db_path, paths["datasets"], "synthetic", extra=extra, design_map=design_map)
