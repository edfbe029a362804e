"""The ``agd`` command: one sub-command per pipeline stage; argument parsing only."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from agd.config import ConfigError, load_params

log = logging.getLogger("agd")


class UserError(RuntimeError):
    """A failure the user can fix; printed as one line, without a traceback."""


# ---------------------------------------------------------------------------------------------
# data
def _cmd_data_fetch(args: argparse.Namespace) -> int:
    from agd.data.sources import DataSourceError, fetch

    params = load_params(args.params)
    cfg = params.data
    overrides = {k: v for k, v in (("source", args.source), ("path", args.path)) if v is not None}
    if overrides:
        cfg = cfg.model_copy(update=overrides)
    try:
        raw, info = fetch(cfg)
    except DataSourceError as exc:
        raise UserError(str(exc)) from None
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    raw.to_parquet(tmp, index=False)
    tmp.replace(out)
    info_path = out.with_suffix(".source.json")
    info_path.write_text(json.dumps(info, indent=2, default=str))
    print(
        f"fetched {len(raw):,} rows from {info.get('kind')} ({info.get('path') or info.get('reason', '')}) -> {out}"
    )
    return 0


def _cmd_data_prepare(args: argparse.Namespace) -> int:
    import pandas as pd

    from agd.data.prepare import prepare_dataset, write_prepared

    params = load_params(args.params)
    raw_path = Path(args.raw)
    if not raw_path.exists():
        raise UserError(
            f"{raw_path}: no raw table; run `agd data fetch` (or `dvc repro pipelines/dvc.yaml`) first"
        )
    raw = pd.read_parquet(raw_path)
    prepared = prepare_dataset(raw, params.prepare)
    paths = write_prepared(prepared, Path(args.out_dir), Path(args.metrics) if args.metrics else None)
    s = prepared.summary
    print(
        f"{s['rows_in']:,} rows in, {s['rejected']:,} rejected, {s['filtered']:,} filtered, "
        f"{s['duplicates_merged']:,} duplicates merged ({s['dedup_policy']}), {s['rows_out']:,} out "
        f"(train {s['split']['train']:,} / val {s['split']['val']:,} / test {s['split']['test']:,}) -> {paths['dataset']}"
    )
    if s["rejected"]:
        print(f"rejects with row numbers and reasons: {paths['rejects']}")
    if not args.no_mlflow:
        from agd.tracking.mlflow import log_metrics, stage_run

        source_info = raw_path.with_suffix(".source.json")
        provenance = json.loads(source_info.read_text()) if source_info.exists() else {}
        logged = {
            "prepare": params.prepare.model_dump(),
            "source": {k: provenance.get(k) for k in ("kind", "path", "sha256", "rows") if k in provenance},
        }
        with stage_run("data", params.tracking, logged, run_name="prepare") as run:
            import mlflow

            log_metrics({k: v for k, v in s.items() if k not in ("band_gap", "n_elements")})
            log_metrics({"band_gap": {k: v for k, v in s["band_gap"].items() if k != "histogram"}})
            for key in ("summary", "rejects"):
                mlflow.log_artifact(str(paths[key]))
            print(f"MLflow run {run.info.run_id}")
    return 0


# ---------------------------------------------------------------------------------------------
# models
def _write_metrics(path: str | None, metrics: dict) -> None:
    if not path:
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(json.dumps(metrics, indent=2, default=str))
    tmp.replace(target)


def _tracked(stage: str, params, logged: dict, run_name: str, no_mlflow: bool, body) -> dict:
    """Run ``body(on_epoch)`` inside an MLflow run (per-epoch metrics with step=epoch) and log its result."""
    if no_mlflow:
        return body(None)
    from agd.tracking.mlflow import log_metrics, stage_run

    with stage_run(stage, params.tracking, logged, run_name=run_name) as run:
        metrics = body(lambda epoch, values: log_metrics(values, step=epoch))
        log_metrics(metrics)
        print(f"MLflow run {run.info.run_id}")
    return metrics


def _require(path: Path, what: str, command: str) -> None:
    if not path.exists():
        raise UserError(f"{path}: no {what}; run `{command}` (or `dvc repro pipelines/dvc.yaml`) first")


def _cmd_train_oracle(args: argparse.Namespace) -> int:
    from agd.models.oracle import run_oracle_stage

    params = load_params(args.params)
    prepared = Path(args.prepared)
    _require(prepared, "prepared dataset", "agd data prepare")
    logged = {"oracle": params.oracle.model_dump()}
    metrics = _tracked(
        "oracle",
        params,
        logged,
        "train-oracle",
        args.no_mlflow,
        lambda on_epoch: run_oracle_stage(prepared, Path(args.out), params.oracle, on_epoch=on_epoch),
    )
    _write_metrics(args.metrics, metrics)
    print(f"oracle -> {args.out}; metrics -> {args.metrics}")
    return 0


def _cmd_train_autoencoder(args: argparse.Namespace) -> int:
    from agd.models.autoencoder import run_autoencoder_stage

    params = load_params(args.params)
    prepared = Path(args.prepared)
    _require(prepared, "prepared dataset", "agd data prepare")
    logged = {"autoencoder": params.autoencoder.model_dump(), "encoding": params.encoding.model_dump()}
    metrics = _tracked(
        "autoencoder",
        params,
        logged,
        "train-autoencoder",
        args.no_mlflow,
        lambda on_epoch: run_autoencoder_stage(
            prepared, Path(args.out), params.encoding, params.autoencoder, on_epoch=on_epoch
        ),
    )
    _write_metrics(args.metrics, metrics)
    print(f"autoencoder -> {args.out}; metrics -> {args.metrics}")
    return 0


def _cmd_train_gan(args: argparse.Namespace) -> int:
    from agd.models.gan import train_gan_to_dir

    params = load_params(args.params)
    logged = {"gan": params.gan.model_dump(), "validity": params.validity.model_dump()}
    metrics = _tracked(
        "gan",
        params,
        logged,
        "train-gan",
        args.no_mlflow,
        lambda on_epoch: train_gan_to_dir(params.gan, Path(args.out), params.validity, on_epoch=on_epoch),
    )
    _write_metrics(args.metrics, metrics)
    print(f"generator -> {args.out}; metrics -> {args.metrics}")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from agd.models.gan import generate_candidates

    params = load_params(args.params)
    gan_dir = Path(args.gan)
    _require(gan_dir, "trained generator", "agd train gan")
    cfg = params.generate
    if args.n_samples is not None:
        cfg = cfg.model_copy(update={"n_samples": args.n_samples})
    run_id = args.run_id or f"gan-seed{cfg.seed}-n{cfg.n_samples}"
    logged = {"generate": cfg.model_dump(), "validity": params.validity.model_dump(), "run_id": run_id}
    metrics = _tracked(
        "generate",
        params,
        logged,
        "generate",
        args.no_mlflow,
        lambda _on_epoch: generate_candidates(gan_dir, Path(args.out), cfg, params.validity, None, run_id),
    )
    _write_metrics(args.metrics, metrics)
    print(f"candidates -> {args.out}; metrics -> {args.metrics}")
    return 0


# ---------------------------------------------------------------------------------------------
# chemistry utilities
def _cmd_chem_check(args: argparse.Namespace) -> int:
    import pandas as pd

    from agd.chem.validity import ValidityChecker

    params = load_params(args.params)
    formulas = list(args.formulas)
    if args.file:
        formulas += [line.strip() for line in Path(args.file).read_text().splitlines() if line.strip()]
    if not formulas:
        raise UserError("give formulas as arguments or with --file")
    table = ValidityChecker(params.validity).check(formulas)
    with pd.option_context("display.max_rows", None, "display.width", 200):
        print(table.to_string(index=False))
    return 0


# ---------------------------------------------------------------------------------------------
# catalog
def _cmd_catalog(args: argparse.Namespace) -> int:
    from agd.tracking.catalog import CatalogError, CatalogReader, Load, build_catalog

    params = load_params(args.params)
    db = Path(args.db or params.catalog.path)
    dataset = Path(args.dataset)
    _require(dataset, "prepared dataset", "agd data prepare")
    extra = []
    if args.candidates:
        candidates = Path(args.candidates)
        _require(candidates, "candidate table", "agd generate")
        extra.append(Load("candidates", candidates))
    for item in args.load:
        table, sep, path = item.partition("=")
        if not sep or not table or not path:
            raise UserError(
                f"--load {item!r}: expected TABLE=PATH, e.g. al_samples=data/experiments/samples.parquet"
            )
        _require(Path(path), f"{table} table", "dvc repro pipelines/dvc.yaml")
        extra.append(Load(table, Path(path)))
    try:
        build_catalog(db, dataset, dataset_name=args.name, extra=extra)
    except CatalogError as exc:
        raise UserError(str(exc)) from None
    with CatalogReader(db) as reader:
        counts = reader.tables()
    print(f"catalog {db}: " + ", ".join(f"{t} {n:,}" for t, n in counts.items()))
    return 0


# ---------------------------------------------------------------------------------------------
def _stage_outputs(parser: argparse.ArgumentParser, out: str, metrics: str, prepared: bool = True) -> None:
    """The arguments every model stage shares: input table, output folder, metrics file, MLflow switch."""
    if prepared:
        parser.add_argument("--prepared", default="data/prepared/dataset.parquet", help="prepared dataset")
    parser.add_argument("--out", default=out, help="output (model folder or table)")
    parser.add_argument("--metrics", default=metrics, help="DVC metrics file ('' for none)")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log an MLflow run")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``agd`` command."""
    parser = argparse.ArgumentParser(
        prog="agd",
        description="Active generative design of inorganic materials. Pipeline stages run through "
        "`dvc repro pipelines/dvc.yaml`; each stage is also a sub-command here.",
    )
    parser.add_argument(
        "--params", default=None, help="parameter file (default: params.yaml at the project root)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    data = sub.add_parser(
        "data", help="fetch and prepare the band-gap dataset", description="Dataset stages."
    )
    data_sub = data.add_subparsers(dest="data_command", metavar="STEP", required=True)
    fetch = data_sub.add_parser(
        "fetch",
        help="download or read the raw table (params: data)",
        description="Read the raw band-gap table from the source chosen in params.yaml (data.source: auto, mp, "
        "matbench, local) into the standard raw schema. auto: AGD_DATA or data.path if the file exists, else the "
        "Materials Project if MP_API_KEY is set, else matbench_mp_gap.",
    )
    fetch.add_argument("--out", default="data/raw/dataset.parquet", help="raw table (parquet)")
    fetch.add_argument("--source", choices=["auto", "mp", "matbench", "local"], help="override data.source")
    fetch.add_argument("--path", help="override data.path (a local CSV or parquet file)")
    fetch.set_defaults(func=_cmd_data_fetch)
    prep = data_sub.add_parser(
        "prepare",
        help="validate, de-duplicate, filter and split (params: prepare)",
        description="Parse every formula, reject bad rows with reasons (rejects.csv), de-duplicate by reduced "
        "composition, apply the size filters and write a seeded train/val/test split.",
    )
    prep.add_argument("--raw", default="data/raw/dataset.parquet", help="raw table from `agd data fetch`")
    prep.add_argument(
        "--out-dir", default="data/prepared", help="folder for dataset.parquet, rejects.csv, summary.json"
    )
    prep.add_argument(
        "--metrics", default="metrics/data.json", help="copy of the summary for DVC metrics ('' for none)"
    )
    prep.add_argument("--no-mlflow", action="store_true", help="do not log an MLflow run")
    prep.set_defaults(func=_cmd_data_prepare)

    chem = sub.add_parser(
        "chem", help="composition chemistry utilities", description="Composition chemistry."
    )
    chem_sub = chem.add_subparsers(dest="chem_command", metavar="TOOL", required=True)
    check = chem_sub.add_parser(
        "check",
        help="charge neutrality and electronegativity balance of formulas (params: validity)",
        description="Check formulas with smact: charge neutrality and electronegativity balance.",
    )
    check.add_argument("formulas", nargs="*", help="formulas, e.g. NaCl Fe2O3")
    check.add_argument("--file", help="a text file with one formula per line")
    check.set_defaults(func=_cmd_chem_check)

    train = sub.add_parser("train", help="train a model", description="Model training stages.")
    train_sub = train.add_subparsers(dest="model", metavar="MODEL", required=True)
    oracle = train_sub.add_parser(
        "oracle",
        help="Roost ensemble + Magpie random forest band-gap oracle (params: oracle)",
        description="Train the band-gap oracle with the paper's Exp1 protocol (train on 'train', early-stop on "
        "'val', report R2/MAE/RMSE on 'test' and on the paper's 500-row test rows), then refit on all data.",
    )
    _stage_outputs(oracle, "models/oracle", "metrics/oracle.json")
    oracle.set_defaults(func=_cmd_train_oracle)
    ae = train_sub.add_parser(
        "autoencoder",
        help="composition autoencoder to the 128-d latent space (params: autoencoder, encoding)",
        description="Train the conv autoencoder on the one-hot composition matrices of the prepared data; "
        "report exact reconstruction on held-out formulas and save the latent bounds.",
    )
    _stage_outputs(ae, "models/autoencoder", "metrics/autoencoder.json")
    ae.set_defaults(func=_cmd_train_autoencoder)
    gan = train_sub.add_parser(
        "gan",
        help="MATGAN-style WGAN-GP composition generator (params: gan)",
        description="Train the composition WGAN-GP on the formula list in gan.training_data.",
    )
    _stage_outputs(gan, "models/gan", "metrics/gan.json", prepared=False)
    gan.set_defaults(func=_cmd_train_gan)

    generate = sub.add_parser(
        "generate",
        help="sample candidate formulas from the generator (params: generate, validity)",
        description="Sample N formulas from the trained generator in chunks (resumable), apply the size trims, "
        "check charge neutrality and electronegativity balance, de-duplicate and mark novelty.",
    )
    generate.add_argument("--gan", default="models/gan", help="trained generator folder")
    _stage_outputs(generate, "data/generated/candidates.parquet", "metrics/generate.json", prepared=False)
    generate.add_argument("--n-samples", type=int, default=None, help="override generate.n_samples")
    generate.add_argument("--run-id", default=None, help="provenance id stored with every candidate")
    generate.set_defaults(func=_cmd_generate)

    cat = sub.add_parser(
        "catalog",
        help="load stage outputs into the DuckDB catalog (params: catalog)",
        description="Load the pipeline's parquet outputs into the DuckDB catalog (idempotent).",
    )
    cat.add_argument("--db", default=None, help="DuckDB file (default: catalog.path in params.yaml)")
    cat.add_argument("--dataset", default="data/prepared/dataset.parquet", help="prepared dataset parquet")
    cat.add_argument("--name", default="prepared", help="dataset name in the catalog")
    cat.add_argument("--candidates", default=None, help="generated candidates parquet (from `agd generate`)")
    cat.add_argument(
        "--load",
        action="append",
        default=[],
        metavar="TABLE=PATH",
        help="also load a parquet file into a catalog table (repeatable), e.g. al_samples=data/experiments/samples.parquet",
    )
    cat.set_defaults(func=_cmd_catalog)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``agd`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except (UserError, ConfigError) as exc:
        print(f"agd: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
