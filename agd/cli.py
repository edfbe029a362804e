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
    from agd.environment import environment_record

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    # where the figures were made: the same seed gives the same bits on one machine, not across CPUs
    record = {**metrics, "environment": environment_record()}
    tmp.write_text(json.dumps(record, indent=2, default=str))
    tmp.replace(target)


def _tracked(stage: str, params, logged: dict, run_name: str, args: argparse.Namespace, body) -> dict:
    """Run ``body(on_epoch)`` in an MLflow run (per-epoch metrics at step=epoch; none with ``--no-mlflow``),
    log its result and write it to the ``--metrics`` file."""
    if args.no_mlflow:
        metrics = body(None)
    else:
        from agd.tracking.mlflow import log_metrics, stage_run

        with stage_run(stage, params.tracking, logged, run_name=run_name) as run:
            metrics = body(lambda epoch, values: log_metrics(values, step=epoch))
            log_metrics(metrics)
            print(f"MLflow run {run.info.run_id}")
    _write_metrics(args.metrics, metrics)
    return metrics


def _executor(args: argparse.Namespace):
    """The --executor/--address choice as an executor (None: the stage's own local path, no Ray import)."""
    kind, address = getattr(args, "executor", "local"), getattr(args, "address", None)
    if kind == "local" and address is None:
        return None
    from agd.executors import ExecutorError, make_executor

    try:
        return make_executor(kind, address=address)
    except ExecutorError as exc:
        raise UserError(str(exc)) from None


def _add_executor_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--executor", choices=["local", "ray"], default="local",
        help=f"where {what} run: this machine (default) or as Ray tasks",
    )  # fmt: skip
    p.add_argument(
        "--address", default=None,
        help="Ray cluster to join (HOST:PORT from `ray start --head`, or 'auto'); default: RAY_ADDRESS, else a local Ray",
    )  # fmt: skip


def _require(path: Path, what: str, command: str) -> None:
    if not path.exists():
        raise UserError(f"{path}: no {what}; run `{command}` (or `dvc repro pipelines/dvc.yaml`) first")


def _cmd_train_oracle(args: argparse.Namespace) -> int:
    from agd.models.oracle import run_oracle_stage

    params = load_params(args.params)
    prepared = Path(args.prepared)
    _require(prepared, "prepared dataset", "agd data prepare")
    logged = {"oracle": params.oracle.model_dump()}
    _tracked(
        "oracle",
        params,
        logged,
        "train-oracle",
        args,
        lambda on_epoch: run_oracle_stage(prepared, Path(args.out), params.oracle, on_epoch=on_epoch),
    )
    print(f"oracle -> {args.out}; metrics -> {args.metrics}")
    return 0


def _cmd_train_oracle_metals(args: argparse.Namespace) -> int:
    from agd.data.sources import DataSourceError
    from agd.models.metals import run_metals_oracle_stage

    params = load_params(args.params)
    compare = Path(args.compare_oracle) if args.compare_oracle else None
    if compare is not None:
        _require(compare, "trained oracle to compare with", "agd train oracle")
    cfg = params.metals_oracle
    logged = {"metals_oracle": cfg.model_dump(), "prepare": params.prepare.model_dump()}

    def body(on_epoch):
        try:
            return run_metals_oracle_stage(cfg, params.prepare, Path(args.out), compare, on_epoch=on_epoch)
        except (DataSourceError, ValueError) as exc:
            raise UserError(str(exc)) from None

    metrics = _tracked("oracle_metals", params, logged, "train-oracle-metals", args, body)
    for kind, splits in metrics["metals"]["models"].items():
        m = splits["test"]["metals"]
        print(f"{kind}: metals on the test split: F1 {m['metal_f1']}, ROC AUC {m['metal_roc_auc']}")
    print(f"metal-aware oracle -> {args.out}; metrics -> {args.metrics}")
    return 0


def _cmd_train_autoencoder(args: argparse.Namespace) -> int:
    from agd.models.autoencoder import run_autoencoder_stage

    params = load_params(args.params)
    prepared = Path(args.prepared)
    _require(prepared, "prepared dataset", "agd data prepare")
    logged = {"autoencoder": params.autoencoder.model_dump(), "encoding": params.encoding.model_dump()}
    _tracked(
        "autoencoder",
        params,
        logged,
        "train-autoencoder",
        args,
        lambda on_epoch: run_autoencoder_stage(
            prepared, Path(args.out), params.encoding, params.autoencoder, on_epoch=on_epoch
        ),
    )
    print(f"autoencoder -> {args.out}; metrics -> {args.metrics}")
    return 0


def _cmd_train_gan(args: argparse.Namespace) -> int:
    from agd.models.gan import train_gan_to_dir

    params = load_params(args.params)
    logged = {"gan": params.gan.model_dump(), "validity": params.validity.model_dump()}
    _tracked(
        "gan",
        params,
        logged,
        "train-gan",
        args,
        lambda on_epoch: train_gan_to_dir(params.gan, Path(args.out), params.validity, on_epoch=on_epoch),
    )
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
    _tracked(
        "generate",
        params,
        logged,
        "generate",
        args,
        lambda _on_epoch: generate_candidates(gan_dir, Path(args.out), cfg, params.validity, None, run_id),
    )
    print(f"candidates -> {args.out}; metrics -> {args.metrics}")
    return 0


def _cmd_screen(args: argparse.Namespace) -> int:
    import time

    from agd.screening.screen import ScreeningError, run_screening_stage

    params = load_params(args.params)
    training = Path(args.training_sets)
    _require(training, "training-sets table", "agd experiments")
    candidates = Path(args.candidates)
    _require(candidates, "candidate table", "agd generate")
    prepared = Path(args.prepared)
    _require(prepared, "prepared dataset", "agd data prepare")
    oracle = Path(args.oracle)
    _require(oracle, "trained oracle", "agd train oracle")
    out_dir = Path(args.out_dir)
    report = Path(args.report) if args.report else out_dir / "table1.md"
    cfg = params.screening
    inputs = {"training_sets": training, "candidates": candidates, "prepared": prepared, "oracle": oracle}
    logged = {"screening": cfg.model_dump(), "inputs": {k: str(v) for k, v in inputs.items()}}

    def body(on_step):
        start = time.perf_counter()
        executor = _executor(args)
        try:
            # on_step(repeat, values): per-group metrics, step = repeat
            summary = run_screening_stage(
                training, candidates, prepared, oracle, out_dir, cfg, report=report, on_group=on_step,
                executor=executor,
            )  # fmt: skip
        except ScreeningError as exc:
            raise UserError(str(exc)) from None
        finally:
            if executor is not None:
                executor.close()
        if on_step is not None:  # an MLflow run is active
            import mlflow

            mlflow.log_artifact(str(report))
            mlflow.log_metric("seconds", time.perf_counter() - start)
        return summary

    metrics = _tracked("screening", params, logged, "screen", args, body)
    print(
        f"screening -> {out_dir} ({metrics['hits']:,} hits); Table 1 -> {report}; metrics -> {args.metrics}"
    )
    return 0


# ---------------------------------------------------------------------------------------------
# streaming screen of a candidate file with a trained model
def _cmd_screen_candidates(args: argparse.Namespace) -> int:
    from agd.screening.stream import StreamError, load_screening_model, stream_screen

    params = load_params(args.params)
    candidates = Path(args.candidates)
    _require(candidates, "candidate table", "agd generate")
    known = params.screening.windows
    unknown = [name for name in args.window if name not in known]
    if unknown:
        raise UserError(
            f"--window {', '.join(unknown)}: not in screening.windows of the params file ({', '.join(known)})"
        )
    windows = {name: known[name] for name in (args.window or known)}
    if args.chunk_size < 1:
        raise UserError(f"--chunk-size must be positive, got {args.chunk_size}")
    try:
        model = load_screening_model(args.model_dir, args.model, n_jobs=args.jobs)
        result = stream_screen(
            candidates, model, Path(args.out), windows, chunk_size=args.chunk_size,
            valid_only=args.valid_only, novel_only=args.novel_only, formula_column=args.formula_column,
        )  # fmt: skip
    except StreamError as exc:
        raise UserError(str(exc)) from None
    _write_metrics(args.metrics, result.to_dict())
    hits = ", ".join(f"{name} {result.windows[name]}: {n:,}" for name, n in result.counts.items())
    print(
        f"{result.n_selected:,} of {result.n_rows:,} rows screened with {result.model} in "
        f"{result.timings['total']:.1f} s; hits {hits} -> {result.out}"
    )
    if result.n_rejected:
        print(
            f"{result.n_rejected:,} rows could not be screened (row, formula, reason): {result.rejected_path}"
        )
    return 0


# ---------------------------------------------------------------------------------------------
# campaigns
def _run_campaigns(args: argparse.Namespace, write: bool, only, repeats) -> dict:
    from agd.active.campaign import CampaignStateError
    from agd.active.experiments import run_experiments

    params = load_params(args.params)
    if getattr(args, "jobs", None):
        exp = params.experiments.model_copy(update={"jobs": args.jobs})
        params = params.model_copy(update={"experiments": exp})
    prepared, autoencoder, oracle = Path(args.prepared), Path(args.autoencoder), Path(args.oracle)
    _require(prepared, "prepared dataset", "agd data prepare")
    _require(autoencoder, "trained autoencoder", "agd train autoencoder")
    _require(oracle, "trained oracle", "agd train oracle")
    if params.experiments.campaign.search == "candidates":
        _require(
            Path(args.candidates), "candidate table (experiments.campaign.search: candidates)", "agd generate"
        )
    executor = _executor(args)
    try:
        return run_experiments(
            prepared, autoencoder, oracle, Path(args.out), params,
            track=not args.no_mlflow, only=only, repeats=repeats, write=write,
            restart_changed=args.restart_changed, executor=executor, candidates=args.candidates,
        )  # fmt: skip
    except (CampaignStateError, ValueError) as exc:
        raise UserError(str(exc)) from None
    finally:
        if executor is not None:
            executor.close()


def _print_campaigns(summary: dict) -> None:
    for name, item in summary["campaigns"].items():
        get = lambda k, item=item: item[k]["mean"]  # noqa: E731
        print(
            f"{name:>14}: {item['repeats']} repeat(s), valid {get('valid_fraction'):.1%} of suggestions, "
            f"{get('n_new_valid'):.0f} new valid formulas, {get('n_high_gap'):.1f} above {summary['high_gap']:g} eV, "
            f"best {get('best_label'):.2f} eV"
        )


def _cmd_campaign(args: argparse.Namespace) -> int:
    summary = _run_campaigns(args, False, [args.name], args.repeat)
    _print_campaigns(summary)
    print(f"state tables -> {args.out}/campaigns/{args.name}/")
    return 0


def _cmd_experiments(args: argparse.Namespace) -> int:
    summary = _run_campaigns(args, True, args.only or None, None)
    _write_metrics(args.metrics, summary)
    _print_campaigns(summary)
    print(f"samples, training sets, kappa sweep and plots -> {args.out}; metrics -> {args.metrics}")
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
# structures, energies, VASP hand-off
def _cmd_structures(args: argparse.Namespace) -> int:
    from agd.structures.substitute import run_structures_stage

    params = load_params(args.params)
    cfg = params.structures
    overrides = {k: v for k, v in (("gap_window", args.window), ("max_candidates", args.max_candidates)) if v}
    if overrides:
        cfg = cfg.model_copy(update=overrides)
    source = Path(args.formulas or args.hits or cfg.hits)
    if not source.exists():
        hint = "pass --formulas FILE (CSV/parquet/txt)" if not args.formulas else "check the path"
        raise UserError(
            f"{source}: no formula list; run `agd screen` (or `dvc repro pipelines/dvc.yaml`) or {hint}"
        )
    logged = {"structures": cfg.model_dump(), "input": str(source)}
    try:
        metrics = _tracked(
            "structures",
            params,
            logged,
            "structures",
            args,
            lambda _on_epoch: run_structures_stage(source, Path(args.out), Path(args.cif_dir), cfg),
        )
    except ValueError as exc:  # an unreadable formula list or a window the list does not have
        raise UserError(str(exc)) from None
    print(
        f"{metrics['n_ok']:,} of {metrics['n_candidates']:,} candidates have a template structure "
        f"({metrics['status']}) -> {args.out}"
    )
    return 0


def _cmd_energy(args: argparse.Namespace) -> int:
    from agd.structures.energy import run_energy_stage

    params = load_params(args.params)
    structures = Path(args.structures)
    _require(structures, "structures table", "agd structures")
    cfg = params.energy
    if args.steps:
        cfg = cfg.model_copy(update={"steps": args.steps})
    logged = {"energy": cfg.model_dump()}
    metrics = _tracked(
        "energy",
        params,
        logged,
        "energy",
        args,
        lambda _on_epoch: run_energy_stage(
            structures, Path(args.out), cfg, Path(args.work_dir), params.structures.template_sources
        ),
    )
    print(
        f"{metrics['n_relaxed']:,} relaxed ({metrics['n_converged']:,} converged, {metrics['n_resumed']:,} resumed), "
        f"{metrics['n_kept']:,} kept with formation energy < {cfg.formation_energy_max:g} eV/atom -> {args.out}"
    )
    return 0


def _cmd_export_vasp(args: argparse.Namespace) -> int:
    from agd.structures.vasp import run_vasp_stage

    params = load_params(args.params)
    energies = Path(args.energies)
    _require(energies, "energies table", "agd energy")
    cfg = params.vasp
    if args.psp_dir:
        cfg = cfg.model_copy(update={"psp_dir": args.psp_dir})
    logged = {"vasp": cfg.model_dump()}
    try:
        metrics = _tracked(
            "vasp",
            params,
            logged,
            "export-vasp",
            args,
            lambda _on_epoch: run_vasp_stage(energies, Path(args.out), cfg),
        )
    except FileExistsError as exc:
        raise UserError(str(exc)) from None
    print(f"{metrics['n_folders']:,} VASP folders ({metrics['n_failed']} failed) -> {args.out}/manifest.csv")
    return 0


def _cmd_import_dft(args: argparse.Namespace) -> int:
    import pandas as pd

    from agd.structures.vasp import dft_oracle_table, import_dft

    params = load_params(args.params)
    root = Path(args.dir)
    if not root.is_dir():
        raise UserError(f"{root}: no such folder of VASP runs")
    references = None
    if args.references:
        try:
            references = {str(k): float(v) for k, v in json.loads(Path(args.references).read_text()).items()}
        except (OSError, ValueError, AttributeError) as exc:
            raise UserError(f"{args.references}: expected a JSON object element -> eV/atom ({exc})") from None

    def body(_on_epoch) -> dict:
        table = import_dft(root, references)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        table.to_parquet(out, index=False)
        labels = dft_oracle_table(table)
        if args.oracle_out and len(labels):
            from agd.models.oracle import TableOracle

            TableOracle(labels, name="dft").save(args.oracle_out)
        if args.db:
            from agd.tracking.catalog import PROVENANCE_COLUMNS, TABLES, load_table

            known = {c.name for c in TABLES["dft_results"]} - set(PROVENANCE_COLUMNS)
            load_table(
                args.db,
                "dft_results",
                table[[c for c in table.columns if c in known]],
                source_file=str(out),
            )
        with pd.option_context("display.max_rows", 50, "display.width", 200):
            print(
                table[["path", "formula", "status", "band_gap", "total_energy", "message"]].to_string(
                    index=False
                )
            )
        return {
            "n_runs": len(table),
            "status": {str(k): int(v) for k, v in table["status"].value_counts().items()},
            "n_oracle_labels": len(labels),
        }

    metrics = _tracked("dft", params, {"dir": str(root)}, "import-dft", args, body)
    print(f"{metrics['n_runs']:,} runs {metrics['status']} -> {args.out}")
    return 0


# ---------------------------------------------------------------------------------------------
# catalog
def _cmd_catalog(args: argparse.Namespace) -> int:
    from agd.tracking.catalog import TABLES, CatalogError, CatalogReader, Load, build_catalog

    params = load_params(args.params)
    db = Path(args.db or params.catalog.path)
    dataset = Path(args.dataset)
    _require(dataset, "prepared dataset", "agd data prepare")
    extra = []
    if args.candidates:
        candidates = Path(args.candidates)
        _require(candidates, "candidate table", "agd generate")
        extra.append(Load("candidates", candidates))
    optional = [(item, True) for item in args.load_if_present]
    for item, if_present in [*((item, False) for item in args.load), *optional]:
        table, sep, path = item.partition("=")
        if not sep or not table or not path:
            raise UserError(
                f"--load {item!r}: expected TABLE=PATH, e.g. al_samples=data/experiments/samples.parquet"
            )
        if table not in TABLES:
            raise UserError(
                f"--load {item!r}: no catalog table {table!r}; the tables are {', '.join(TABLES)}"
            )
        if if_present and not Path(path).exists():
            continue
        _require(Path(path), f"{table} table", "dvc repro pipelines/dvc.yaml")
        extra.append(Load(table, Path(path)))
    try:
        build_catalog(db, dataset, dataset_name=args.name, extra=extra, design_map=params.catalog.design_map)
    except CatalogError as exc:
        raise UserError(str(exc)) from None
    with CatalogReader(db) as reader:
        counts = reader.tables()
    print(f"catalog {db}: " + ", ".join(f"{t} {n:,}" for t, n in counts.items()))
    return 0


# ---------------------------------------------------------------------------------------------
# team mode
def _cmd_tracking_server(args: argparse.Namespace) -> int:
    from agd.config import find_project_root
    from agd.tracking import server

    backend, artifacts = server.default_paths(find_project_root())
    backend = args.backend_store_uri or backend
    artifacts = args.artifacts_destination or artifacts
    try:
        command = server.server_command(
            args.host, args.port, backend, artifacts, args.workers, args.mlflow_args
        )
    except ValueError as exc:
        raise UserError(str(exc)) from None
    env = server.server_env()
    warning = server.exposure_warning(args.host, args.port)
    if warning:
        print(warning, file=sys.stderr)
    if args.dry_run:
        print(server.describe(command, env))
        return 0
    server.prepare_locations(backend, artifacts)
    print(
        f"MLflow server on http://{args.host}:{args.port} (runs: {backend}; artifacts: {artifacts}); "
        f"clients: export MLFLOW_TRACKING_URI=http://127.0.0.1:{args.port}",
        file=sys.stderr,
    )
    server.exec_server(command, env)


def _cmd_env(args: argparse.Namespace) -> int:
    from agd import environment

    path = Path(args.constraints) if args.constraints else environment.constraints_path()
    installed = environment.installed_versions()
    machine = environment.environment_record()["machine"]
    print(
        f"{'machine':<22} {machine['cpu']} ({machine['vector_isa']}, {machine['cores']} cores), {machine['platform']}"
    )
    kernels = environment.environment_tags()["agd.env.kernels"]
    print(f"{'kernel settings':<22} {kernels}")
    for name in environment.KEY_PACKAGES:
        print(f"{name:<22} {installed.get(name, 'not installed')}")
    if not path.is_file():
        raise UserError(f"{path}: no such constraints file (give one with --constraints)")
    try:
        pins = environment.read_constraints(path)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    found = environment.mismatches(pins, installed)
    if not found:
        print(f"every installed package pinned in {path} is at its pinned version")
        return 0
    print(f"{len(found)} installed package{'s differ' if len(found) > 1 else ' differs'} from {path}:")
    for mismatch in found:
        print(f"  {mismatch}")
    print(f"to match it: pip install -c {path} -e '.[test]' (in a fresh venv)")
    return 1 if args.check else 0


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
    metals = train_sub.add_parser(
        "oracle-metals",
        help="a second oracle trained on data that keeps the metals (params: metals_oracle, prepare)",
        description="Prepare metals_oracle.dataset (metals kept) with the prepare params, train the oracle models "
        "of metals_oracle.oracle with the Exp1 protocol, and report how well they tell metals from non-metals.",
    )
    _stage_outputs(metals, "models/oracle_metals", "metrics/oracle_metals.json", prepared=False)
    metals.add_argument(
        "--compare-oracle",
        default=None,
        help="also judge this oracle folder (e.g. models/oracle) on the test split",
    )
    metals.set_defaults(func=_cmd_train_oracle_metals)
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

    screen = sub.add_parser(
        "screen",
        help="screening models on every training set, judged against the oracle (params: screening)",
        description="For each (experiment, repeat, training set) of the experiments stage and each model in "
        "screening.models (Magpie random forest, Roost): train on a seeded 80%, score on the other 20% and on "
        "the common external test set, screen the generated candidates for the band-gap windows in chunks, and "
        "compare the hits with the oracle's own screening (recovery, precision, F1). Writes Table 1 (mean +- std "
        "over repeats) as a DVC metrics file and a markdown report. Resumable: finished groups are kept.",
    )
    screen.add_argument(
        "--training-sets",
        default="data/experiments/training_sets.parquet",
        help="training sets (agd experiments)",
    )
    screen.add_argument(
        "--candidates", default="data/generated/candidates.parquet", help="candidates (agd generate)"
    )
    screen.add_argument(
        "--prepared", default="data/prepared/dataset.parquet", help="prepared dataset (test split)"
    )
    screen.add_argument("--oracle", default="models/oracle", help="oracle folder (agd train oracle)")
    screen.add_argument(
        "--out-dir", default="data/screening", help="metrics.parquet, hits.parquet, table1.parquet, state/"
    )
    screen.add_argument("--metrics", default="metrics/screening.json", help="DVC metrics file ('' for none)")
    screen.add_argument("--report", default="reports/table1.md", help="markdown Table 1")
    screen.add_argument("--no-mlflow", action="store_true", help="do not log an MLflow run")
    _add_executor_args(screen, "the candidate parts are screened")
    screen.set_defaults(func=_cmd_screen)

    screen_candidates = sub.add_parser(
        "screen-candidates",
        help="screen a candidate parquet file with a trained model, in bounded memory",
        description="Predict the band gap of every formula of a candidate table (e.g. `agd generate` output) "
        "with a trained forest or Roost ensemble, chunk by chunk, and write the rows inside the band-gap windows "
        "(screening.windows) to --out. Rows that cannot be screened go to <out stem>.rejected.csv with their row "
        "number and reason. A killed run resumes; a rerun rewrites the same files. Not a pipeline stage.",
    )
    screen_candidates.add_argument("candidates", help="candidate table (parquet) with a formula column")
    screen_candidates.add_argument(
        "--model-dir", default="models/oracle", help="oracle folder, Roost ensemble folder or forest.joblib"
    )
    screen_candidates.add_argument(
        "--model",
        choices=["primary", "forest", "roost"],
        default="primary",
        help="which deployed model of an oracle folder (primary: the one oracle.json names)",
    )
    screen_candidates.add_argument("--out", required=True, help="hits table (parquet)")
    screen_candidates.add_argument(
        "--window",
        action="append",
        default=[],
        metavar="NAME",
        help="a window of screening.windows (repeatable; default: all of them)",
    )
    screen_candidates.add_argument(
        "--chunk-size", type=int, default=50_000, help="file rows featurised and predicted at a time"
    )
    screen_candidates.add_argument(
        "--valid-only", action="store_true", help="only rows whose 'valid' is true"
    )
    screen_candidates.add_argument(
        "--novel-only", action="store_true", help="only rows whose 'novel' is true"
    )
    screen_candidates.add_argument("--formula-column", default="formula", help="column holding the formulas")
    screen_candidates.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="threads over the forest's trees (default: the forest's n_jobs)",
    )
    screen_candidates.add_argument("--metrics", default=None, help="write the run summary (JSON) here")
    screen_candidates.set_defaults(func=_cmd_screen_candidates)

    structures = sub.add_parser(
        "structures",
        help="template structures for candidate formulas (params: structures)",
        description="For each candidate (screening hits, or --formulas FILE), find the nearest known composition "
        "by ElMD among templates of the same stoichiometric pattern, substitute its elements and write a CIF.",
    )
    structures.add_argument("--hits", default=None, help="screening hits parquet (default: structures.hits)")
    structures.add_argument("--formulas", default=None, help="any formula list instead (CSV/parquet/txt)")
    structures.add_argument("--window", default=None, help="only hits of this band-gap window")
    structures.add_argument(
        "--max-candidates", type=int, default=None, help="override structures.max_candidates"
    )
    structures.add_argument(
        "--cif-dir", default="data/structures/cif", help="folder for one CIF per candidate"
    )
    _stage_outputs(
        structures, "data/structures/structures.parquet", "metrics/structures.json", prepared=False
    )
    structures.set_defaults(func=_cmd_structures)

    energy = sub.add_parser(
        "energy",
        help="CHGNet relaxation and formation energy (params: energy)",
        description="Relax every substituted structure with the pretrained CHGNet, compute formation energies "
        "against elements relaxed the same way, keep those below energy.formation_energy_max. Resumable.",
    )
    energy.add_argument(
        "--structures", default="data/structures/structures.parquet", help="from `agd structures`"
    )
    energy.add_argument(
        "--work-dir",
        default="data/structures/energy_work",
        help="resumable progress and elemental references",
    )
    energy.add_argument("--steps", type=int, default=None, help="override energy.steps")
    _stage_outputs(energy, "data/structures/energies.parquet", "metrics/energy.json", prepared=False)
    energy.set_defaults(func=_cmd_energy)

    export_vasp = sub.add_parser(
        "export-vasp",
        help="VASP input folders for the kept candidates (params: vasp)",
        description="Write relax (MPRelaxSet) and static (MPStaticSet) inputs per kept candidate, POTCAR.spec "
        "unless vasp.psp_dir is set, a manifest (CSV and JSON) and the final structures table.",
    )
    export_vasp.add_argument(
        "--energies", default="data/structures/energies.parquet", help="from `agd energy`"
    )
    export_vasp.add_argument("--psp-dir", default=None, help="POTCAR directory (overrides vasp.psp_dir)")
    _stage_outputs(export_vasp, "data/vasp", "metrics/vasp.json", prepared=False)
    export_vasp.set_defaults(func=_cmd_export_vasp)

    import_dft = sub.add_parser(
        "import-dft",
        help="read finished VASP runs (vasprun.xml) into the dft_results table",
        description="Parse every vasprun.xml under DIR: band gap, total energy, formation energy (with elemental "
        "references), converged flag; broken or missing runs get a status per folder.",
    )
    import_dft.add_argument("dir", help="folder of VASP runs (e.g. the export folder after the runs)")
    import_dft.add_argument(
        "--out", default="data/dft/dft_results.parquet", help="dft_results table (parquet)"
    )
    import_dft.add_argument("--references", default=None, help="JSON element -> DFT energy per atom (eV)")
    import_dft.add_argument("--oracle-out", default=None, help="save the gaps as a DFT table oracle here")
    import_dft.add_argument("--db", default=None, help="also load the rows into this DuckDB catalog")
    import_dft.add_argument("--metrics", default="", help="metrics JSON ('' for none)")
    import_dft.add_argument("--no-mlflow", action="store_true", help="do not log an MLflow run")
    import_dft.set_defaults(func=_cmd_import_dft)

    def campaign_inputs(p: argparse.ArgumentParser) -> None:
        p.add_argument("--prepared", default="data/prepared/dataset.parquet", help="prepared dataset")
        p.add_argument("--autoencoder", default="models/autoencoder", help="trained autoencoder folder")
        p.add_argument("--oracle", default="models/oracle", help="trained oracle folder")
        p.add_argument(
            "--out", default="data/experiments", help="experiments folder (state tables and outputs)"
        )
        p.add_argument(
            "--candidates",
            default="data/generated/candidates.parquet",
            help="candidate table searched when experiments.campaign.search is 'candidates' (else unused)",
        )
        p.add_argument("--jobs", type=int, default=None, help="campaigns at once (override experiments.jobs)")
        _add_executor_args(p, "the campaigns")
        p.add_argument("--no-mlflow", action="store_true", help="do not log MLflow runs")
        p.add_argument(
            "--restart-changed",
            action="store_true",
            help="delete state tables saved under other settings and start those campaigns afresh (default: error)",
        )

    campaign = sub.add_parser(
        "campaign",
        help="run one active-learning campaign of the experiments (params: experiments)",
        description="Run (or resume) one campaign defined by the experiments section, e.g. Exp2-bo, Exp3-random or "
        "kappa-5: Bayesian optimisation in the autoencoder's latent box (or, with experiments.campaign.search: "
        "candidates, over the generated candidates encoded into it), 20 suggestions a round, decode, check "
        "chemistry, label with the oracle, register. The state table is saved after every round; a killed run "
        "continues at the next round.",
    )
    campaign.add_argument("name", help="campaign name, e.g. Exp2-bo, Exp2-random, kappa-5")
    campaign.add_argument(
        "--repeat", type=int, action="append", default=None, help="repeat(s) to run (default: all)"
    )
    campaign_inputs(campaign)
    campaign.set_defaults(func=_cmd_campaign)

    experiments = sub.add_parser(
        "experiments",
        help="the paper's experiments, random control and kappa sweep (params: experiments)",
        description="Run every campaign of the experiments section (Exp2-Exp4 by Bayesian optimisation and by "
        "random latents, repeated with different seeds, and the kappa sweep), resumably; then write "
        "samples.parquet, training_sets.parquet (for `agd screen`), kappa_sweep.csv, campaigns.png and a summary.",
    )
    campaign_inputs(experiments)
    experiments.add_argument(
        "--metrics", default="metrics/experiments.json", help="DVC metrics file ('' for none)"
    )
    experiments.add_argument(
        "--only", action="append", default=[], help="run only this campaign name (repeatable)"
    )
    experiments.set_defaults(func=_cmd_experiments)

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
    cat.add_argument(
        "--load-if-present",
        action="append",
        default=[],
        metavar="TABLE=PATH",
        help="as --load, skipped when the file does not exist (results that arrive outside the pipeline, "
        "e.g. dft_results=data/dft/dft_results.parquet from `agd import-dft`)",
    )
    cat.set_defaults(func=_cmd_catalog)

    ts = sub.add_parser(
        "tracking-server",
        help="run a shared MLflow tracking server (127.0.0.1 by default)",
        description="Start `mlflow server` with a SQLite run store and a served artifact folder under "
        "mlflow-server/ at the project root, bound to 127.0.0.1 (warns for any other address: the server has no "
        "authentication; give colleagues an ssh tunnel). Clients point MLFLOW_TRACKING_URI at it. Arguments "
        "after '--' go to `mlflow server` unchanged.",
    )
    ts.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    ts.add_argument("--port", type=int, default=5000, help="port (default 5000)")
    ts.add_argument(
        "--backend-store-uri",
        default=None,
        help="run store (default sqlite:///<root>/mlflow-server/mlflow.db)",
    )
    ts.add_argument(
        "--artifacts-destination",
        default=None,
        help="where served artifacts go: a folder or s3://... (default <root>/mlflow-server/artifacts)",
    )
    ts.add_argument("--workers", type=int, default=1, help="server worker processes (default 1)")
    ts.add_argument("--dry-run", action="store_true", help="print the mlflow server command and exit")
    ts.add_argument("mlflow_args", nargs="*", help="extra `mlflow server` options, after '--'")
    ts.set_defaults(func=_cmd_tracking_server)

    env = sub.add_parser(
        "env",
        help="compare the installed packages with constraints.txt",
        description="Print the versions of the packages that shape the pipeline's results and list every "
        "installed package that differs from constraints.txt, the environment that reproduces "
        "pipelines/dvc.lock (a newer pyarrow alone makes DVC rerun every stage).",
    )
    env.add_argument(
        "--constraints", default=None, help="pin file (default: constraints.txt at the project root)"
    )
    env.add_argument("--check", action="store_true", help="exit 1 when any installed package differs")
    env.set_defaults(func=_cmd_env)
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
