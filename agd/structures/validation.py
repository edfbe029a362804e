"""Validation of the template path against known answers (leave-one-composition-out).

``python -m agd.structures.validation --n 150`` samples compositions that are themselves in the
structure files, removes every template of that composition, and runs the template path on them. It
reports how often the substituted structure (and the CHGNet-relaxed one) matches a known polymorph of
the composition (pymatgen ``StructureMatcher``, default tolerances) and the CHGNet formation-energy
error against the file's value where it has one (MP-20 rows carry it; Chemeleon rows are joined by
material id to ``mp_gap_all_polymorphs_2019.csv``). The true structure is relaxed the same way, which
separates CHGNet's own error from the template's. Results are appended per formula to a JSON-lines
file, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Composition, Structure
from tqdm.auto import tqdm

from agd.chem.formula import formula_key
from agd.config import EnergyConfig, StructuresConfig
from agd.structures.energy import OK, ChgnetRelaxer, ElementalReferences, known_elemental_structures
from agd.structures.substitute import structure_for
from agd.structures.templates import TemplateLibrary, read_template_table

log = logging.getLogger(__name__)

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def reference_table(shared: Path) -> pd.DataFrame:
    """Both structure files as one template table, with MP formation energies where known."""
    tables = [
        read_template_table(shared / "structures_mp20_diffhedron.csv.gz"),
        read_template_table(shared / "structures_mp40_chemeleon.csv.gz"),
    ]
    table = pd.concat(tables, ignore_index=True)
    polymorphs = shared / "mp_gap_all_polymorphs_2019.csv"
    if polymorphs.is_file():
        mp = pd.read_csv(
            polymorphs,
            keep_default_na=False,
            na_values=[""],
            usecols=["material_id", "formation_energy_per_atom"],
        )
        fe = mp.dropna().drop_duplicates("material_id").set_index("material_id")["formation_energy_per_atom"]
        missing = table["formation_energy_per_atom"].isna()
        table.loc[missing, "formation_energy_per_atom"] = table.loc[missing, "template_id"].map(fe)
    table["key"] = [formula_key(f) for f in table["reduced_formula"]]
    return table


def _parse(cif: str) -> Structure:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        structure = Structure.from_str(cif, fmt="cif")
    structure.remove_oxidation_states()
    return structure


def validate_formula(
    key: str,
    table: pd.DataFrame,
    library: TemplateLibrary,
    cfg: StructuresConfig,
    relaxer: ChgnetRelaxer,
    refs: ElementalReferences | None,
    matcher: StructureMatcher,
    relax: bool = True,
) -> dict:
    """Run the template path for one known composition with its own templates left out; one result row."""
    start = time.perf_counter()
    known = table[table["key"] == key]
    truths = [_parse(cif) for cif in known["cif"]]
    fe_known = known["formation_energy_per_atom"].dropna()
    row: dict = {
        "formula": key,
        "n_polymorphs": len(truths),
        "fe_mp": float(fe_known.iloc[0]) if len(fe_known) else None,
    }
    # the most stable known polymorph with an energy is the reference for the energy comparison
    if len(fe_known):
        ref_index = known["formation_energy_per_atom"].idxmin()
    else:
        ref_index = known.index[0]
    truth_ref = truths[list(known.index).index(ref_index)]
    result, structure = structure_for(key, library.exclude([key]), cfg)
    row.update(
        status=result["status"],
        template_id=result.get("template_id"),
        template_formula=result.get("template_formula"),
        elmd_distance=result.get("elmd_distance"),
    )
    if structure is None:
        row["seconds"] = time.perf_counter() - start
        return row
    row["match_substituted"] = any(matcher.fit(structure, t) for t in truths)
    if not relax:
        row["seconds"] = time.perf_counter() - start
        return row
    relaxed = relaxer.relax(structure)
    row["relax_status"] = relaxed.status
    if relaxed.status == OK:
        row.update(
            match_relaxed=any(matcher.fit(relaxed.structure, t) for t in truths),
            relax_steps=relaxed.steps,
            converged=relaxed.converged,
            fe_template=refs.formation_energy(structure.composition, relaxed.energy_per_atom),
        )
    true_relaxed = relaxer.relax(truth_ref)
    if true_relaxed.status == OK:
        row["fe_true_structure"] = refs.formation_energy(truth_ref.composition, true_relaxed.energy_per_atom)
    row["seconds"] = time.perf_counter() - start
    return row


def summarise(rows: pd.DataFrame) -> dict:
    """Recovery rates and formation-energy errors of a validation run."""
    n = len(rows)
    with_template = rows[rows["status"] == "ok"]

    def mae(a: str, b: str) -> dict:
        if a not in rows or b not in rows:
            return {"n": 0, "mae": None, "median_abs_error": None, "mean_signed_error": None}
        both = rows[[a, b]].apply(pd.to_numeric, errors="coerce").dropna()
        err = (both[a] - both[b]).abs()
        return {
            "n": len(both),
            "mae": float(err.mean()) if len(err) else None,
            "median_abs_error": float(err.median()) if len(err) else None,
            "mean_signed_error": float((both[a] - both[b]).mean()) if len(err) else None,
        }

    def rate(column: str, frame: pd.DataFrame) -> float | None:
        if column not in frame or not len(frame):
            return None
        return float(frame[column].eq(True).mean())

    by_distance = {}
    distance = pd.to_numeric(with_template.get("elmd_distance"), errors="coerce")
    for label, low, high in (("<0.5", 0, 0.5), ("0.5-2", 0.5, 2), (">=2", 2, np.inf)):
        group = with_template[(distance >= low) & (distance < high)] if len(with_template) else with_template
        by_distance[label] = {"n": len(group), "recovered": rate("match_substituted", group)}
    return {
        "n_formulas": n,
        "status": {str(k): int(v) for k, v in rows["status"].value_counts().items()},
        "template_found": len(with_template) / n if n else None,
        "recovered_substituted_of_all": float(with_template["match_substituted"].eq(True).sum()) / n
        if n
        else None,
        "recovered_substituted_of_found": rate("match_substituted", with_template),
        "recovered_relaxed_of_found": rate("match_relaxed", with_template),
        "recovered_by_elmd_distance": by_distance,
        "formation_energy_template_vs_mp": mae("fe_template", "fe_mp"),
        "formation_energy_true_structure_vs_mp": mae("fe_true_structure", "fe_mp"),
        "formation_energy_template_vs_true_structure": mae("fe_template", "fe_true_structure"),
        "converged_fraction": rate("converged", with_template),
        "seconds_mean": float(rows["seconds"].mean()) if n else None,
    }


def main(argv: list[str] | None = None) -> None:
    """Command line: sample N known compositions, validate, print and write the summary."""
    parser = argparse.ArgumentParser(
        prog="python -m agd.structures.validation", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--n", type=int, default=150, help="compositions to validate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=300, help="CHGNet step limit")
    parser.add_argument("--fmax", type=float, default=0.1)
    parser.add_argument("--shared", default=str(SHARED), help="folder with the structure files")
    parser.add_argument("--out", default="data/validation/structures", help="results folder (resumable)")
    parser.add_argument("--no-energy", action="store_true", help="structure recovery only, no CHGNet")
    parser.add_argument(
        "--summary-only", action="store_true", help="summarise the formulas finished so far; relax nothing"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = reference_table(Path(args.shared))
    cfg = StructuresConfig(template_sources=[])
    # the same stability cut as the stage; every known polymorph still counts as a right answer
    library = TemplateLibrary(
        table.drop(columns=["key"]), metric=cfg.metric, max_e_above_hull=cfg.max_e_above_hull
    )
    pool = sorted({k for k in table["key"] if len(Composition(k)) >= 2})
    rng = np.random.default_rng(args.seed)
    # random order, so a run stopped early is still a random sample
    chosen = rng.choice(pool, size=min(args.n, len(pool)), replace=False).tolist()

    energy_cfg = EnergyConfig(steps=args.steps, fmax=args.fmax, num_threads=1)
    relaxer = ChgnetRelaxer(energy_cfg)
    refs = None
    if not args.no_energy:
        refs = ElementalReferences(
            relaxer, out / "elemental_references.json", known_elemental_structures(table)
        )
    matcher = StructureMatcher()
    progress = out / "results.jsonl"
    settings = [args.steps, args.fmax] if not args.no_energy else ["no-energy"]
    done = {}
    if progress.is_file():
        for line in progress.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("settings") == settings:
                done[record["formula"]] = record
    with progress.open("a") as sink:
        for key in tqdm(chosen, desc="validation", unit="formula"):
            if key in done or args.summary_only:
                continue
            try:
                record = validate_formula(
                    key, table, library, cfg, relaxer, refs, matcher, relax=not args.no_energy
                )
            except Exception as exc:  # report and continue: one odd structure must not end the run
                record = {"formula": key, "status": f"error: {type(exc).__name__}: {exc}"}
            record["settings"] = settings
            sink.write(json.dumps(record, default=float) + "\n")
            sink.flush()
            done[key] = record
    rows = pd.DataFrame([done[k] for k in chosen if k in done])
    rows.to_csv(out / "results.csv", index=False)
    summary = summarise(rows)
    summary.update(seed=args.seed, steps=args.steps, fmax=args.fmax, pool=len(pool))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
