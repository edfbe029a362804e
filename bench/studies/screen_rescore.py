"""What the screen stage's rescoring saves, on the pipeline's own state: a changed test set, not a retrain.

    python -m bench.studies.screen_rescore --models forest --out reports/screen_rescore.md

Adds ``--add`` compositions of the prepared 'test' split to one training set (``--experiment``,
``--repeat``, ``--set``; labelled with their prepared gaps). The common test set then loses them, so
every stored screener's test figures change, while only that set's model changes. The study runs the
screen stage's code twice on these inputs, in folders of its own (``--work``):

- ``rescored``: starting from a copy of the pipeline's ``data/screening/state`` (the oracle's cached
  labels and the stored groups of ``--models``): the changed set trains again, the others are rescored
  from their stored test-split predictions;
- ``fresh``: from the oracle's cached labels only, every screener trained again.

It reports the wall time of each, which groups trained (a group's stored training time is rewritten only
when it trains), and whether the two runs' tables are equal. Needs ``dvc repro pipelines/dvc.yaml:screen``
first; the stored groups must carry their predictions (stored since 2026-12-06).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import pandas as pd

from agd.config import load_params
from agd.screening import screen as S
from bench.studies import emit

ROOT = Path(__file__).resolve().parents[2]


def changed_training_sets(
    training: pd.DataFrame, prepared: pd.DataFrame, experiment: str, repeat: int, tset: str, n: int
) -> tuple[pd.DataFrame, list[str]]:
    """``training`` with the first ``n`` test-split compositions that no training set holds (in key order)
    appended to one set, and those compositions."""
    chosen = (
        (training["experiment"] == experiment)
        & (training["repeat"] == repeat)
        & (training["training_set"] == tset)
    )
    if not chosen.any():
        raise SystemExit(f"training_sets.parquet has no set {experiment} repeat {repeat} {tset}")
    held = set(S.read_training_sets(training)[0]["key"])
    pool = S.test_pool(prepared, held)
    new = pool.loc[pool["in_test"]].head(n)
    if len(new) < n:
        raise SystemExit(f"only {len(new)} test-split compositions are in no training set")
    template = training.loc[chosen].iloc[[0]]
    extra = pd.concat([template] * n, ignore_index=True).assign(
        reduced_formula=new["reduced_formula"].to_numpy(), band_gap=new["band_gap"].to_numpy()
    )
    if "origin" in extra:
        extra["origin"] = "study"
    return pd.concat([training, extra], ignore_index=True), new["key"].tolist()


def train_seconds(folder: Path) -> dict[str, float]:
    """Each stored group's training time: what a rescore leaves as it was."""
    return {
        path.stem: json.loads(path.read_text())["info"]["train_seconds"]
        for path in sorted(folder.glob("*.json"))
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="project whose params and outputs to use")
    parser.add_argument("--work", type=Path, default=ROOT / "bench/.cache/screen_rescore")
    parser.add_argument("--models", nargs="+", default=None, help="screener kinds (default: params')")
    parser.add_argument("--experiment", default="Exp2")
    parser.add_argument("--repeat", type=int, default=0)
    parser.add_argument("--set", dest="tset", default="AL")
    parser.add_argument("--add", type=int, default=5, help="test-split compositions added to the set")
    parser.add_argument("--out", type=Path, default=None, help="markdown report")
    args = parser.parse_args(argv)

    root = args.root.resolve()
    cfg = load_params(root / "params.yaml").screening
    if args.models:
        cfg = cfg.model_copy(update={"models": args.models})
    state = root / "data/screening/state"
    if not (state / "groups").is_dir():
        raise SystemExit(f"{state}: no screen state; run `dvc repro pipelines/dvc.yaml:screen` first")
    training = pd.read_parquet(root / "data/experiments/training_sets.parquet")
    prepared = pd.read_parquet(root / "data/prepared/dataset.parquet")
    changed, added = changed_training_sets(
        training, prepared, args.experiment, args.repeat, args.tset, args.add
    )
    if args.work.exists():
        shutil.rmtree(args.work)
    args.work.mkdir(parents=True)
    sets = args.work / "training_sets.parquet"
    changed.to_parquet(sets)

    runs = {}
    for name in ("rescored", "fresh"):
        out = args.work / name
        shutil.copytree(state / "oracle", out / "state" / "oracle")
        if name == "rescored":
            (out / "state" / "groups").mkdir()
            for model in cfg.models:
                for path in (state / "groups").glob(f"*__{model}.*"):
                    shutil.copy2(path, out / "state" / "groups" / path.name)
        before = train_seconds(out / "state" / "groups")
        start = time.perf_counter()
        summary = S.run_screening_stage(
            sets,
            root / "data/generated/candidates.parquet",
            prepared,
            root / "models/oracle",
            out,
            cfg,
            progress=False,
        )
        seconds = time.perf_counter() - start
        after = train_seconds(out / "state" / "groups")
        trained = sorted(g for g in after if before.get(g) != after[g])
        runs[name] = {"seconds": seconds, "groups": len(after), "trained": trained, "summary": summary}
        print(f"{name}: {seconds:.0f} s, {len(trained)} of {len(after)} groups trained", flush=True)

    tables = {}
    for table in ("metrics.parquet", "hits.parquet", "table1.parquet"):
        a = pd.read_parquet(args.work / "rescored" / table)
        b = pd.read_parquet(args.work / "fresh" / table)
        tables[table] = a.equals(b)
    r2 = pd.read_parquet(args.work / "rescored/metrics.parquet")["r2_test"]
    r2_fresh = pd.read_parquet(args.work / "fresh/metrics.parquet")["r2_test"]
    lines = [
        "# Screen stage: rescoring stored screeners on a changed test set",
        "",
        f"- inputs: the pipeline's training sets, with {args.add} compositions of the prepared 'test' split "
        f"added to {args.experiment} repeat {args.repeat} {args.tset} ({', '.join(added)}); the common test "
        f"set drops them ({runs['fresh']['summary']['test_set']['rows']:,} rows left)",
        f"- screeners: {', '.join(cfg.models)}, {runs['fresh']['groups']} groups; the pipeline's screening "
        "settings (`params.yaml`)",
        "",
        "| run | seconds | groups trained | groups rescored |",
        "|---|---|---|---|",
    ]
    for name, run in runs.items():
        rescored = run["groups"] - len(run["trained"]) if name == "rescored" else 0
        lines.append(f"| {name} | {run['seconds']:.0f} | {len(run['trained'])} | {rescored} |")
    lines += [
        "",
        f"- trained in the rescored run: {', '.join(runs['rescored']['trained']) or 'none'}",
        "- the two runs' tables are equal: "
        + ", ".join(f"{table} {'yes' if same else 'NO'}" for table, same in tables.items()),
        f"- largest difference of R2 on the test set between the runs: {(r2 - r2_fresh).abs().max():.3g}",
    ]
    text = "\n".join(lines) + "\n"
    emit(text, args.out)
    return 0 if all(tables.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
