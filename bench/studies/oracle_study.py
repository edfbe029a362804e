"""Which change moves the Roost oracle towards the Exp1 target (test R2 >= 0.85, MAE <= 0.40 eV)?

    python -m bench.studies.oracle_study train --variant extra_mp --seeds 0 1
    python -m bench.studies.oracle_study report --out reports/oracle_study.md

Every variant trains Roost members with the pipeline's own code (:func:`agd.models.roost.train_roost`,
one process with one torch thread per member, like the stage's ``workers``) on the pipeline's own
split (``data/prepared/dataset.parquet``, the ``prepare`` stage's output): the ``train`` rows (plus a variant's extra rows), early stopping on ``val``, scored on ``test``. The base
configuration is ``oracle.roost`` of ``params.yaml``; a variant overrides some of its fields and may add
training rows:

* ``wd``, ``wd_strong``: AdamW weight decay 0.05 and 0.2 instead of 1e-6 (the members overfit: train MAE
  about 0.24 eV against 0.45-0.50 on val at their best epoch).
* ``heads3``, ``big_trunk``, ``wide``: more capacity, up to aviary's default Roost size. On this 2-core
  CPU an epoch takes about 51, 32 and 105 s against 7-10 s for the base size, so they suit a GPU.
* ``extra_mp``: MP non-metal compositions that are *not* in the Exp1 file at all (so no test or val
  composition, and no second label for a train composition), from ``mp_gap_by_composition.csv`` and
  Matbench's ``mp_gap`` (median gap over a composition's polymorphs). Both are PBE gaps of the
  Materials Project, like Exp1's.
* ``oqmd_pretrain``: each member is first trained for ``PRETRAIN_EPOCHS`` epochs on OQMD's band gaps
  (``formulas_oqmd_crabnet.csv.gz``, 341,608 compositions, 93% of them metals with gap 0; every
  composition of the Exp1 val and test rows left out), then trained on the Exp1 train rows from those
  weights with ``params.yaml``'s schedule and early stopping. OQMD's gaps are PBE too, but from another
  code and settings: for the 13,564 Exp1 compositions it holds as non-metals they differ from MP's by
  0.39 eV on average, so they teach the elements, not the labels.

Each member's test predictions are saved as ``<work>/<variant>/seed<k>.npz`` (a finished member is
never trained again, so a killed study resumes); ``report`` scores every member and, per variant, the
mean of its members (the ensemble), beside the pipeline's own members from ``metrics/oracle.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from agd.config import load_params
from agd.executors import spawn_pool
from agd.models.oracle import regression_metrics
from bench.studies import emit

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "data"

#: name -> (RoostConfig overrides, extra training data or None, what it tests)
VARIANTS: dict[str, tuple[dict, str | None, str]] = {
    "base": ({}, None, "params.yaml's oracle.roost unchanged"),
    "extra_mp": ({}, "mp", "plus MP non-metal compositions absent from Exp1"),
    "wd": ({"weight_decay": 0.05}, None, "AdamW weight decay 0.05 (params.yaml: 1e-6)"),
    "wd_strong": ({"weight_decay": 0.2}, None, "AdamW weight decay 0.2"),
    "heads3": ({"elem_heads": 3, "cry_heads": 3}, None, "three attention heads in both poolings"),
    "big_trunk": (
        {"trunk_hidden": [1024, 512], "out_hidden": [256, 128, 64]},
        None,
        "aviary's default read-out (trunk 1024-512, output 256-128-64); message layers unchanged",
    ),
    "wide": (
        {
            "elem_heads": 3,
            "cry_heads": 3,
            "hidden": 256,
            "trunk_hidden": [1024, 512],
            "out_hidden": [256, 128, 64],
        },
        None,
        "aviary's default Roost size (3 heads, 256-wide gates, trunk 1024-512)",
    ),
    "cgcnn92": ({"embedding": "cgcnn92"}, None, "CGCNN's 92-feature element embedding (not matscholar200)"),
    "oqmd_pretrain": ({}, "oqmd", "pretrained on OQMD's gaps (metals included), then trained on Exp1"),
}

PRETRAIN_EPOCHS = 6  # epochs on the OQMD rows (a cosine schedule of its own) before the Exp1 training

#: variants that differ from ``base`` only in their element embedding: members whose errors may be less
#: correlated with base's than another base seed's, which the report tests in a mixed ensemble
EMBEDDING_VARIANTS = ("cgcnn92",)  # megnet16: aviary 1.2.1 cannot load it (agd.config.embedding_problem)


def _read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, keep_default_na=False, usecols=["reduced_formula", "band_gap"])


def extra_mp_rows(exp1_formulas: set[str], data: Path = SHARED) -> pd.DataFrame:
    """MP compositions with a gap > 0 that the Exp1 file does not hold; one row (median gap) each."""
    frames = [_read(data / name) for name in ("mp_gap_by_composition.csv", "matbench_mp_gap.csv")]
    rows = pd.concat(frames, ignore_index=True)
    rows = rows[(rows["band_gap"] > 0) & ~rows["reduced_formula"].isin(exp1_formulas)]
    return rows.groupby("reduced_formula", as_index=False)["band_gap"].median()


def _split(prepared: Path) -> pd.DataFrame:
    data = pd.read_parquet(prepared)
    return data[["reduced_formula", "band_gap", "split"]].reset_index(drop=True)


def train(
    variant: str,
    seeds: list[int],
    prepared: Path,
    work: Path,
    workers: int,
    epochs: int | None,
    patience: int | None = None,
    device: str = "cpu",
) -> None:
    overrides, extra, _ = VARIANTS[variant]
    if epochs is not None:
        overrides = {**overrides, "epochs": epochs}
    if patience is not None:
        overrides = {**overrides, "patience": patience or None}
    base = load_params(ROOT / "params.yaml").oracle.roost
    data = _split(prepared)
    train_rows = data[data["split"] == "train"]
    val_rows = data[data["split"] == "val"]
    test_rows = data[data["split"] == "test"]
    formulas, gaps = train_rows["reduced_formula"].tolist(), train_rows["band_gap"].tolist()
    if extra == "mp":
        if not (SHARED / "mp_gap_agd_exp1.csv").is_file():
            raise SystemExit(f"variant {variant} needs the offline data folder {SHARED}, which is absent")
        added = extra_mp_rows(
            set(data["reduced_formula"]) | set(_read(SHARED / "mp_gap_agd_exp1.csv")["reduced_formula"])
        )
        formulas += added["reduced_formula"].tolist()
        gaps += added["band_gap"].tolist()
        print(f"{variant}: {len(added):,} extra MP rows", file=sys.stderr)
    pretrain = None
    if extra == "oqmd":
        held_out = set(val_rows["reduced_formula"]) | set(test_rows["reduced_formula"])
        pretrain = oqmd_rows(held_out, base.embedding)
        print(f"{variant}: {len(pretrain):,} OQMD rows to pretrain on", file=sys.stderr)
        pretrain = (pretrain["reduced_formula"].tolist(), pretrain["band_gap"].tolist(), PRETRAIN_EPOCHS)
    out = work / variant
    out.mkdir(parents=True, exist_ok=True)
    todo = [s for s in seeds if not (out / f"seed{s}.npz").exists()]
    if not todo:
        print(f"{variant}: seeds {seeds} already trained", file=sys.stderr)
        return
    # one member per process, one torch thread each, like the pipeline's `workers`
    # (on a GPU, each process puts its member on the same device)
    update = {**overrides, "ensemble_size": 1, "workers": 1, "num_threads": 1, "device": device}
    cfg = base.model_copy(update=update)
    args = (formulas, gaps, val_rows["reduced_formula"].tolist(), val_rows["band_gap"].tolist(), cfg)
    # the pipeline's pool: a killed study's workers exit with it instead of training on
    with spawn_pool(min(workers, len(todo))) as pool:
        futures = {
            s: pool.submit(_member, *args, s, test_rows["reduced_formula"].tolist(), pretrain) for s in todo
        }
        for seed, future in futures.items():
            pred, info = future.result()
            info = {**info, "n_train": len(formulas), "epochs": cfg.epochs, "device": cfg.device}
            # written whole, then renamed: a killed run leaves no half-written member
            tmp = out / f".seed{seed}.tmp.npz"
            np.savez(tmp, pred=pred, info=json.dumps(info))
            tmp.replace(out / f"seed{seed}.npz")
            brief = {k: v for k, v in info.items() if k != "history"}
            print(f"{variant} seed {seed}: {brief}", file=sys.stderr)


def oqmd_rows(held_out: set[str], embedding: str, data: Path | None = None) -> pd.DataFrame:
    """OQMD's compositions and gaps (metals included), less ``held_out`` and any composition with an
    element the embedding has no vector for (``data``: the offline data folder, by default ``SHARED``)."""
    from agd.models.roost import embedding_elements, encode_formulas

    path = (data or SHARED) / "formulas_oqmd_crabnet.csv.gz"
    if not path.is_file():
        raise SystemExit(f"the OQMD pretraining needs {path}, which is absent")
    rows = pd.read_csv(path, keep_default_na=False, usecols=["reduced_formula", "band_gap"])
    rows = rows[~rows["reduced_formula"].isin(held_out)].reset_index(drop=True)
    ok = encode_formulas(rows["reduced_formula"].tolist(), embedding_elements(embedding)).ok
    return rows[ok].reset_index(drop=True)


def _pretrained(formulas, gaps, epochs: int, cfg, seed: int, exp1_gaps: list[float]):
    """A member trained ``epochs`` epochs on ``formulas``, rescaled to Exp1's gaps and with its
    history cleared, ready for the Exp1 training."""
    from agd.models.roost import train_roost

    cfg_pre = cfg.model_copy(update={"epochs": epochs, "patience": None})
    model = train_roost(formulas, gaps, None, None, cfg_pre, seed=seed, progress=False)
    y = np.asarray(exp1_gaps, dtype=np.float64)
    model.mean, model.std = float(y.mean()), float(y.std())
    model.config, model.history, model.best_epoch = cfg, [], None
    return model


def _member(formulas, gaps, val_f, val_y, cfg, seed: int, test_f: list[str], pretrain=None):
    from agd.models.roost import train_roost

    start = time.perf_counter()
    if pretrain is None:
        model = train_roost(formulas, gaps, val_f, val_y, cfg, seed=seed, progress=False)
        pre_minutes = 0.0
    else:
        # the study reaches into the stage's epoch loop (agd.models.roost._fit) to train on from the
        # pretrained weights with the same schedule and early stopping that train_roost uses
        import torch

        from agd.models.roost import _cosine_lr, _fit, _known_elements

        if cfg.lr_schedule != "cosine":
            raise SystemExit("the pretraining variant follows params.yaml's cosine schedule only")
        torch.set_num_threads(cfg.num_threads)
        pre_f, pre_y, pre_epochs = pretrain
        model = _pretrained(pre_f, pre_y, pre_epochs, cfg, seed, gaps)
        pre_minutes = (time.perf_counter() - start) / 60
        model.elements = model.elements | _known_elements(formulas, cfg)
        y = np.asarray(gaps, dtype=np.float64)
        _fit(
            model, formulas, y, val_f, val_y, cfg.epochs, lambda e: _cosine_lr(e, cfg.epochs, cfg.learning_rate),
            seed, None, False,
        )  # fmt: skip
    labels = model.predict(test_f)
    seconds = [row["seconds"] for row in model.history]
    info = {
        "pretrain_minutes": pre_minutes,
        "best_epoch": model.best_epoch,
        "epochs_run": len(model.history),
        "seconds_per_epoch": float(np.mean(seconds)),
        "minutes": (time.perf_counter() - start) / 60,
        "history": [{k: round(float(v), 5) for k, v in row.items()} for row in model.history],
    }
    return np.asarray(labels.gaps, dtype=float), info


def report(prepared: Path, work: Path) -> str:
    data = _split(prepared)
    test = data[data["split"] == "test"]
    y = test["band_gap"].to_numpy(dtype=float)
    lines = [
        "# Oracle study: Roost variants on the Exp1 split (test rows)",
        "",
        f"{len(test):,} test rows of `{_shown(prepared)}`; target R2 >= 0.85, MAE <= 0.40 eV. "
        "Produced by `python -m bench.studies.oracle_study`. Seconds per epoch are one torch thread per "
        "member and grow when more members than cores train at once.",
        "",
        "| variant | what | seed | train rows | best epoch | s / epoch | R2 | MAE (eV) | RMSE (eV) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    full_epochs = load_params(ROOT / "params.yaml").oracle.roost.epochs
    stage = json.loads((ROOT / "metrics" / "oracle.json").read_text())
    pipeline = stage["models"]["roost"]
    n_members = len(pipeline["members"])
    for i, (_name, row) in enumerate(sorted(pipeline["members"].items())):
        m = row["test"]
        lines.append(
            f"| pipeline (metrics/oracle.json) | params.yaml, {n_members} members side by side | {i} | "
            f"{stage['dataset']['train_rows']:,} | {pipeline['best_epochs'][i]} | "
            f"{pipeline['seconds_per_epoch']:.1f} | {m['r2']:.4f} | {m['mae']:.4f} | {m['rmse']:.4f} |"
        )
    e = pipeline["ensemble"]["test"]
    lines.append(
        f"| pipeline (metrics/oracle.json) | mean of the {n_members} | all | | | | {e['r2']:.4f} | {e['mae']:.4f} | {e['rmse']:.4f} |"
    )
    sizes = [
        "",
        "Ensemble size. A member's squared error is its bias (the error of the mean of infinitely many members) plus "
        "its spread around that mean; the spread, estimated from the members' disagreement (unbiased, k/(k-1)), "
        "shrinks as 1/N in an N-member mean, so the R2 of larger ensembles can be extrapolated:",
        "",
        "| variant | members | mean member R2 | R2 of their mean | R2 at 5 | R2 at 10 | R2 at infinity |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, (_, _, what) in VARIANTS.items():
        files = sorted((work / name).glob("seed*.npz"))
        preds = []
        for path in files:
            saved = np.load(path)
            info = json.loads(str(saved["info"]))
            pred = saved["pred"]
            diverged = diverged_epoch(info.get("history", []))
            if diverged is not None:  # a member whose loss went NaN predicts nothing; kept out of the mean
                lines.append(
                    f"| {name} | {what} | {path.stem[4:]} | {info['n_train']:,} | | | diverged: NaN loss from "
                    f"epoch {diverged} of the Exp1 training | | |"
                )
                continue
            preds.append(pred)
            m = _metrics(y, pred)
            smoke = (
                ""
                if info.get("epochs", full_epochs) == full_epochs
                else f" (smoke run: {info['epochs']} epochs)"
            )
            device = info.get("device", "cpu")
            where = "" if device == "cpu" else f" ({device})"  # seconds on a GPU, not one CPU thread
            lines.append(
                f"| {name} | {what}{smoke} | {path.stem[4:]} | {info['n_train']:,} | {info['best_epoch']} | "
                f"{info['seconds_per_epoch']:.1f}{where} | {m['r2']:.4f} | {m['mae']:.4f} | {m['rmse']:.4f} |"
            )
        if len(preds) > 1:
            m = _metrics(y, np.mean(preds, axis=0))
            lines.append(
                f"| {name} | mean of the {len(preds)} | all | | | | {m['r2']:.4f} | {m['mae']:.4f} | {m['rmse']:.4f} |"
            )
            est = ensemble_extrapolation(y, np.vstack(preds), (5, 10))
            sizes.append(
                f"| {name} | {len(preds)} | {est['member']:.4f} | {est[len(preds)]:.4f} | {est[5]:.4f} | "
                f"{est[10]:.4f} | {est['infinity']:.4f} |"
            )
    return "\n".join(lines + sizes + _mixed_lines(y, work)) + "\n"


def diverged_epoch(history: list[dict]) -> int | None:
    """The first epoch of a member's training history whose loss is not finite (None: none)."""
    for row in history:
        if not np.isfinite(row.get("train_loss", 0.0)):
            return int(row["epoch"])
    return None


def _mixed_lines(y: np.ndarray, work: Path) -> list[str]:
    """Base's N-member mean against N members of which some have another element embedding."""
    base = [np.load(p)["pred"] for p in sorted((work / "base").glob("seed*.npz"))]
    other = {
        f"{name} seed {p.stem[4:]}": np.load(p)["pred"]
        for name in EMBEDDING_VARIANTS
        for p in sorted((work / name).glob("seed*.npz"))
    }
    if not other or len(base) <= len(other):
        return []
    n, k = len(base), len(other)
    same = _metrics(y, np.mean(base, axis=0))
    mixed = _metrics(y, np.mean(base[: n - k] + list(other.values()), axis=0))
    return [
        "",
        f"Mixed embeddings, {n} members each: does a member with another element embedding add more than another seed?",
        "",
        "| ensemble | R2 | MAE (eV) | RMSE (eV) |",
        "|---|---|---|---|",
        f"| base, {n} seeds | {same['r2']:.4f} | {same['mae']:.4f} | {same['rmse']:.4f} |",
        f"| base, first {n - k} seeds + {', '.join(other)} | {mixed['r2']:.4f} | {mixed['mae']:.4f} | "
        f"{mixed['rmse']:.4f} |",
    ]


def ensemble_extrapolation(y: np.ndarray, preds: np.ndarray, sizes: tuple[int, ...]) -> dict:
    """R2 of an N-member mean from k members' predictions (k x rows): bias + spread / N.

    Keys: 'member' (mean member R2), k and each of ``sizes`` (N), 'infinity'. Rows any member
    could not label are left out.
    """
    k = preds.shape[0]
    if k < 2:
        raise ValueError("extrapolating needs at least two members")
    ok = np.isfinite(preds).all(axis=0)
    p, t = preds[:, ok], y[ok]
    total = float(np.mean((t - t.mean()) ** 2))
    member_mse = float(np.mean((p - t) ** 2))
    spread = float(np.mean((p - p.mean(axis=0)) ** 2)) * k / (k - 1)
    bias = member_mse - spread
    out: dict = {"member": float(np.mean([1 - np.mean((row - t) ** 2) / total for row in p]))}
    for n in (k, *sizes):
        out[n] = 1 - (bias + spread / n) / total
    out["infinity"] = 1 - bias / total
    return out


def _shown(path: Path) -> str:
    """``path`` relative to the repository when it lies inside it."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _metrics(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    ok = np.isfinite(pred)
    return regression_metrics(y[ok], pred[ok])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prepared", type=Path, default=ROOT / "data" / "prepared" / "dataset.parquet")
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / ".cache" / "oracle_study")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train the missing members of a variant")
    t.add_argument("--variant", choices=sorted(VARIANTS), required=True)
    t.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    t.add_argument("--workers", type=int, default=2, help="members trained at once (one thread each)")
    t.add_argument(
        "--epochs", type=int, help="override oracle.roost.epochs (a smoke run; not for the report)"
    )
    t.add_argument("--patience", type=int, help="override oracle.roost.patience (0: no early stopping)")
    t.add_argument("--device", default="cpu", help="torch device of the members, e.g. cuda (default cpu)")
    r = sub.add_parser("report", help="score every trained member; markdown to stdout or --out")
    r.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if not args.prepared.is_file():
        parser.error(f"{args.prepared} not found: run `dvc repro pipelines/dvc.yaml:prepare` first")
    if args.command == "train":
        train(
            args.variant, args.seeds, args.prepared, args.work, args.workers, args.epochs, args.patience,
            args.device,
        )  # fmt: skip
        return 0
    text = report(args.prepared, args.work)
    emit(text, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
