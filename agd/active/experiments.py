"""The paper's experiments as data: which campaigns to run, their initial samples, and what they yield.

* Exp1: the oracle trained on all data; here it contributes the training set ``ALL`` (the prepared
  train + val rows) that the screening stage compares against.
* Exp2, Exp3, Exp4 (params ``experiments.experiments``): ``n_initial`` samples drawn from the prepared
  train + val rows (Exp4: only below ``max_initial_gap``), then ``budget`` suggestions by Bayesian
  optimisation (campaign ``<name>-bo``) and, as the control the paper lacked, by uniform random latents
  under the same acceptance rules (``<name>-random``). Each is repeated ``repeats`` times with seeds
  derived from ``(seed, name, repeat)``; the bo and random campaigns of a repeat share initial samples.
* The kappa sweep: the setup of ``kappa_experiment`` run with each UCB kappa (campaign ``kappa-<k>``).

Outputs (``run_experiments``): one resumable state table per campaign and repeat
(``campaigns/<campaign>/repeat-NN.parquet``), all of them in ``samples.parquet`` (the catalog's
``al_samples``), the screening stage's ``training_sets.parquet``, a summary (DVC metrics), the kappa
sweep as a CSV, and plots.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from agd.active.campaign import (
    INITIAL,
    REGISTERED,
    Campaign,
    CampaignSpec,
    LatentChemistry,
    campaign_summary,
    late_exclusions,
    round_metrics,
)
from agd.active.library import file_md5
from agd.config import ExperimentsConfig, ExperimentSpec, Params
from agd.executors import Executor, is_local, spawn_pool

log = logging.getLogger(__name__)

TRAINING_SET_COLUMNS = ("experiment", "repeat", "training_set", "reduced_formula", "band_gap", "origin")


@dataclass(frozen=True)
class PlannedCampaign:
    """A campaign to run and the experiment repeat whose initial samples it starts from."""

    spec: CampaignSpec
    setup: ExperimentSpec

    @property
    def state_name(self) -> str:
        """Path of its state table below the experiments folder."""
        return f"campaigns/{self.spec.campaign}/repeat-{self.spec.repeat:02d}.parquet"


def derived_seed(seed: int, name: str, repeat: int) -> int:
    """A 32-bit seed for (experiment name, repeat), stable across Python runs and platforms."""
    state = np.random.SeedSequence([seed, zlib.crc32(name.encode()), repeat]).generate_state(1)
    return int(state[0])


def plan_campaigns(
    cfg: ExperimentsConfig, only: Sequence[str] | None = None, repeats: Sequence[int] | None = None
) -> list[PlannedCampaign]:
    """Every campaign the configuration asks for, in a fixed order (``only``/``repeats``: which to keep)."""
    kappa = cfg.campaign.acquisition.kappa
    planned: list[PlannedCampaign] = []
    for exp in cfg.experiments:
        for repeat in range(cfg.repeats):
            seed = derived_seed(cfg.seed, exp.name, repeat)
            planned.append(
                PlannedCampaign(
                    CampaignSpec(f"{exp.name}-bo", exp.name, repeat, "bo", exp.budget, kappa, seed), exp
                )
            )
            if cfg.random_control:
                planned.append(
                    PlannedCampaign(
                        CampaignSpec(
                            f"{exp.name}-random", exp.name, repeat, "random", exp.budget, kappa, seed
                        ),
                        exp,
                    )
                )
    if cfg.kappa_repeats and cfg.kappa_sweep:
        base = next(e for e in cfg.experiments if e.name == cfg.kappa_experiment)
        # the sweep is the paper's: UCB's kappa, whichever function the campaigns themselves use
        sweep_function = None if cfg.campaign.acquisition.function == "ucb" else "ucb"
        for value in cfg.kappa_sweep:
            for repeat in range(cfg.kappa_repeats):
                seed = derived_seed(cfg.seed, base.name, repeat)
                planned.append(
                    PlannedCampaign(
                        CampaignSpec(
                            f"kappa-{value:g}",
                            "kappa",
                            repeat,
                            "bo",
                            base.budget,
                            value,
                            seed,
                            sweep_function,
                        ),
                        base,
                    )
                )
    if only:
        unknown = set(only) - {p.spec.campaign for p in planned}
        if unknown:
            names = sorted({p.spec.campaign for p in planned})
            raise ValueError(f"unknown campaign(s) {sorted(unknown)}; the configuration has {names}")
        planned = [p for p in planned if p.spec.campaign in only]
    if repeats is not None:
        planned = [p for p in planned if p.spec.repeat in set(repeats)]
    if not planned:
        raise ValueError("no campaign matches the selection")
    return planned


def draw_initial(prepared: pd.DataFrame, setup: ExperimentSpec, seed: int) -> pd.DataFrame:
    """``setup.n_initial`` rows of the train/val splits (below ``max_initial_gap`` if set), seeded, order-free."""
    pool = prepared[prepared["split"].isin(["train", "val"])]
    if setup.max_initial_gap is not None:
        pool = pool[pool["band_gap"] < setup.max_initial_gap]
    pool = pool.sort_values("reduced_formula", kind="stable")  # the draw must not depend on row order
    if len(pool) < setup.n_initial:
        raise ValueError(
            f"{setup.name}: {setup.n_initial} initial samples asked for, but only {len(pool)} train/val rows qualify"
        )
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(pool), size=setup.n_initial, replace=False)
    return pool.iloc[np.sort(rows)][["reduced_formula", "band_gap"]].reset_index(drop=True)


@dataclass
class _Models:
    chemistry: LatentChemistry
    oracle: object


def _load_models(
    autoencoder_dir: Path,
    oracle_dir: Path,
    params: Params,
    candidates: Path | None = None,
    library_cache: Path | None = None,
    progress: bool = False,
) -> _Models:
    """The chemistry (a library chemistry with ``search: candidates``) and the oracle of the campaigns."""
    from agd.chem.validity import ValidityChecker
    from agd.models.autoencoder import load_autoencoder
    from agd.models.oracle import load_oracle

    cfg = params.experiments.campaign
    autoencoder, checker = load_autoencoder(autoencoder_dir), ValidityChecker(params.validity)
    if cfg.search == "candidates":
        from agd.active.library import LibraryChemistry, load_library

        if candidates is None:
            raise ValueError(
                "experiments.campaign.search is 'candidates': give the candidate table "
                "(agd experiments --candidates data/generated/candidates.parquet)"
            )
        library = load_library(candidates, autoencoder, cache_dir=library_cache, progress=progress)
        chemistry: LatentChemistry = LibraryChemistry(
            autoencoder, checker, library, cfg.max_elements, cfg.max_atoms
        )
    else:
        chemistry = LatentChemistry(autoencoder, checker, cfg.max_elements, cfg.max_atoms)
    return _Models(chemistry, load_oracle(oracle_dir))


# A worker process loads the models once and keeps them for every campaign it runs.
_WORKER: dict[str, object] = {}


def _worker_init(
    autoencoder_dir: str,
    oracle_dir: str,
    params: dict,
    candidates: str | None = None,
    library_cache: str | None = None,
) -> None:
    import torch

    torch.set_num_threads(1)
    from agd.config import params_from_dict

    _WORKER["models"] = _load_models(
        Path(autoencoder_dir),
        Path(oracle_dir),
        params_from_dict(params),
        Path(candidates) if candidates else None,
        Path(library_cache) if library_cache else None,
    )
    _WORKER["params"] = params_from_dict(params)


def _worker_run(planned: PlannedCampaign, initial: pd.DataFrame, state_path: str) -> str:
    models: _Models = _WORKER["models"]  # type: ignore[assignment]
    params: Params = _WORKER["params"]  # type: ignore[assignment]
    campaign = Campaign(
        planned.spec, params.experiments.campaign, models.chemistry, models.oracle, initial, state_path
    )
    campaign.run(progress=False)
    return state_path


def _ray_campaign(job: tuple[PlannedCampaign, pd.DataFrame, str, bytes | None], init_args: tuple) -> bytes:
    """One campaign as a Ray task: load the models once per worker process, run, return the state file's bytes.

    ``job`` carries the driver's saved state (or None): a worker that does not see the driver's
    folder (no shared filesystem) starts from it instead of from nothing.
    """
    key = json.dumps(init_args, sort_keys=True, default=str)
    if _WORKER.get("init") != key:  # a Ray worker process is reused across tasks
        _worker_init(*init_args)
        _WORKER["init"] = key
    planned, initial, state_path, saved = job
    path = Path(state_path)
    if saved is not None and (not path.is_file() or path.read_bytes() != saved):
        _write_bytes(path, saved)
    _worker_run(planned, initial, state_path)
    return path.read_bytes()


def _write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def settings_key(cfg: ExperimentsConfig) -> str:
    """The key of a campaign's MLflow parent run: a hash of the experiments settings. A campaign setting
    added later leaves it unchanged while off, so a resumed campaign finds its runs (max_per_system, None
    or not, was part of it from the start)."""
    late = late_exclusions(cfg.campaign, keep={"max_per_system"})
    return hashlib.sha256(cfg.model_dump_json(exclude={"campaign": late}).encode()).hexdigest()[:12]


#: per-round metrics compared with a run's logged ones to tell whether the run is its state table's
_CHECKED_METRICS = ("best_label", "round_best_label", "n_high_gap_total")


class _Tracking:
    """Keeps each repeat's MLflow run in step with its state table (rounds logged once, in order)."""

    def __init__(self, params: Params, cfg: ExperimentsConfig, tags: dict[str, str]) -> None:
        from agd.tracking.mlflow import CampaignTracker

        self.tracker = CampaignTracker(params.tracking, "campaigns", tags=tags)
        self.settings = settings_key(cfg)
        self.params = {"experiments": cfg.model_dump(mode="json"), "validity": params.validity.model_dump()}
        self.high_gap = cfg.campaign.high_gap
        self._runs: dict[tuple[str, int], tuple[str, set[int]]] = {}

    def _tags(self, spec: CampaignSpec) -> dict[str, str]:
        tags = {"experiment": spec.experiment, "kappa": f"{spec.kappa:g}", "method": spec.method}
        return tags | ({"function": spec.function} if spec.function is not None else {})

    def parent(self, spec: CampaignSpec) -> str:
        return self.tracker.parent(spec.campaign, self.settings, self._tags(spec), self.params)

    def sync(self, campaign: Campaign, table: pd.DataFrame) -> None:
        spec = campaign.spec
        key = (spec.campaign, spec.repeat)
        if key not in self._runs:
            # the run belongs to this state table: another folder with the same settings gets its own
            tags = self._tags(spec) | {"agd.state": str(campaign.state_path.resolve())}
            run_id = self.tracker.repeat(
                self.parent(spec), spec.campaign, spec.repeat, campaign.fingerprint, tags
            )
            logged = {name: self.tracker.logged_values(run_id, name) for name in _CHECKED_METRICS}
            stale = self._stale_round(logged, table)
            if stale is not None:  # the run logged a table started afresh since (other models)
                log.warning("%s r%d: MLflow run %s logged another table; retired, a new run starts",
                            spec.campaign, spec.repeat, run_id)  # fmt: skip
                self.tracker.supersede(run_id, f"its round {stale} is not the state table's")
                run_id = self.tracker.repeat(
                    self.parent(spec), spec.campaign, spec.repeat, campaign.fingerprint, tags
                )
                logged = {}
            self._runs[key] = (run_id, set(logged.get("best_label", {})))
        run_id, logged = self._runs[key]
        for round_ in sorted(set(table["round"].astype(int)) - logged):
            self.tracker.log_step(run_id, round_metrics(table, round_, self.high_gap), round_)
            logged.add(round_)

    def _stale_round(self, logged: dict[str, dict[int, float]], table: pd.DataFrame) -> int | None:
        """The first round whose logged metrics the table does not give (None: the run is the table's)."""
        rounds = set(table["round"].astype(int))
        for round_ in sorted({step for steps in logged.values() for step in steps}):
            if round_ not in rounds:
                return round_
            now = round_metrics(table, round_, self.high_gap)
            if any(round_ in steps and steps[round_] != now.get(name) for name, steps in logged.items()):
                return round_
        return None

    def finish_repeat(self, spec: CampaignSpec, table: pd.DataFrame) -> None:
        run_id, _ = self._runs[(spec.campaign, spec.repeat)]
        summary = campaign_summary(table, self.high_gap)
        self.tracker.finish(run_id, {f"summary.{k}": v for k, v in summary.items()})

    def finish_parent(self, spec: CampaignSpec, summaries: list[dict[str, float]]) -> None:
        frame = pd.DataFrame(summaries)
        totals = {f"mean.{k}": float(v) for k, v in frame.mean().items()}
        totals |= {f"std.{k}": float(v) for k, v in frame.std(ddof=1).fillna(0.0).items()}
        self.tracker.finish(self.parent(spec), totals)


def run_experiments(
    prepared_path: str | os.PathLike,
    autoencoder_dir: str | os.PathLike,
    oracle_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    params: Params,
    *,
    track: bool = True,
    only: Sequence[str] | None = None,
    repeats: Sequence[int] | None = None,
    write: bool = True,
    restart_changed: bool = False,
    progress: bool = True,
    executor: Executor | None = None,
    candidates: str | os.PathLike | None = None,
) -> dict:
    """Run (or resume) the planned campaigns; with ``write``, also samples, training sets, summary and plots.

    Without ``write`` (one campaign from ``agd campaign``) only the state tables are written and the
    per-campaign summary is returned. ``executor``: None or local runs ``experiments.jobs`` campaigns
    at once in processes; a Ray executor runs each campaign (setup x repeat, kappa values included)
    as one Ray task instead, with the same seeds, so the state tables are the same. ``candidates``:
    the candidate table that ``search: candidates`` searches (ignored with ``search: latent``); its
    encoded library is cached in ``out/library``.
    """
    cfg = params.experiments
    out = Path(out_dir)
    prepared_path = Path(prepared_path)
    prepared = pd.read_parquet(prepared_path, columns=["reduced_formula", "band_gap", "split"])
    planned = plan_campaigns(cfg, only, repeats)
    initials: dict[tuple[str, int], pd.DataFrame] = {}
    for p in planned:  # a repeat's bo, random and kappa campaigns share one draw (same seed)
        key = (p.setup.name, p.spec.repeat)
        if key not in initials:
            initials[key] = draw_initial(prepared, p.setup, p.spec.seed)
    if cfg.campaign.search != "candidates":
        candidates = None
    cache = out / "library"
    models = _load_models(
        Path(autoencoder_dir),
        Path(oracle_dir),
        params,
        Path(candidates) if candidates is not None else None,
        cache,
        progress,
    )
    library_args = (str(Path(candidates).resolve()), str(cache.resolve())) if candidates is not None else ()
    tags = {"dataset_version": file_md5(prepared_path), "model": getattr(models.oracle, "name", "oracle")}
    if models.chemistry.library is not None:  # which candidates, encoded by which autoencoder
        tags["candidate_library"] = models.chemistry.library.digest
    tracking = _Tracking(params, cfg, tags) if track else None

    campaigns = [
        Campaign(
            p.spec,
            cfg.campaign,
            models.chemistry,
            models.oracle,
            initials[(p.setup.name, p.spec.repeat)],
            out / p.state_name,
            restart_changed,
        )
        for p in planned
    ]
    tables: dict[tuple[str, int], pd.DataFrame] = {}

    def finished(campaign: Campaign, table: pd.DataFrame) -> None:
        tables[(campaign.spec.campaign, campaign.spec.repeat)] = table
        if tracking is not None:
            tracking.sync(campaign, table)
            tracking.finish_repeat(campaign.spec, table)

    if not is_local(executor):
        _run_on(
            executor,
            planned,
            campaigns,
            initials,
            (autoencoder_dir, oracle_dir, params, library_args),
            finished,
            progress,
        )
    elif cfg.jobs == 1:
        bar = _bar(len(campaigns), progress)
        for campaign in campaigns:
            hook = (lambda _r, t, c=campaign: tracking.sync(c, t)) if tracking else None
            finished(campaign, campaign.run(on_round=hook, progress=progress))
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
    else:
        for campaign in campaigns:
            campaign.load_state()  # a table from other settings is an error before any work starts
        init_args = (str(autoencoder_dir), str(oracle_dir), params.model_dump(mode="json"), *library_args)
        with spawn_pool(cfg.jobs, initializer=_worker_init, initargs=init_args) as pool:
            futures = {
                pool.submit(_worker_run, p, initials[(p.setup.name, p.spec.repeat)], str(c.state_path)): c
                for p, c in zip(planned, campaigns, strict=True)
            }
            bar = _bar(len(futures), progress)
            for future in as_completed(futures):
                campaign = futures[future]
                future.result()
                finished(campaign, campaign.load_state(verify=False))
                if bar is not None:
                    bar.update(1)
            if bar is not None:
                bar.close()

    ordered = [tables[(p.spec.campaign, p.spec.repeat)] for p in planned]
    if tracking is not None:
        for name in dict.fromkeys(p.spec.campaign for p in planned):
            specs = [p.spec for p in planned if p.spec.campaign == name]
            summaries = [
                campaign_summary(tables[(s.campaign, s.repeat)], cfg.campaign.high_gap) for s in specs
            ]
            tracking.finish_parent(specs[0], summaries)
    if not write:
        return summarise(ordered, cfg)
    return write_outputs(ordered, prepared, cfg, out)


def _run_on(
    executor: Executor,
    planned: Sequence[PlannedCampaign],
    campaigns: Sequence[Campaign],
    initials: dict[tuple[str, int], pd.DataFrame],
    models: tuple[str | os.PathLike, str | os.PathLike, Params, tuple[str, ...]],
    finished: Callable[[Campaign, pd.DataFrame], None],
    progress: bool,
) -> None:
    """Each campaign as one task of ``executor``; the driver keeps every state file and all MLflow logging.

    Tasks write their state after every round at the driver's path (on a shared filesystem a killed
    run resumes at the next round, as locally) and return the finished file, which the driver writes
    where it differs, so the driver's folder ends up complete even when the workers do not share it.
    """
    autoencoder_dir, oracle_dir, params, library_args = models
    for campaign in campaigns:
        campaign.load_state()  # a table from other settings is an error before any work starts
    # absolute paths: a Ray worker's working directory is not the driver's
    init_args = (
        str(Path(autoencoder_dir).resolve()),
        str(Path(oracle_dir).resolve()),
        params.model_dump(mode="json"),
        *library_args,
    )
    jobs = []
    for p, c in zip(planned, campaigns, strict=True):
        path = c.state_path.resolve()
        saved = path.read_bytes() if path.is_file() else None
        jobs.append((p, initials[(p.setup.name, p.spec.repeat)], str(path), saved))

    def landed(i: int, data: bytes) -> None:
        campaign = campaigns[i]
        path = campaign.state_path
        if not path.is_file() or path.read_bytes() != data:
            _write_bytes(path, data)
        finished(campaign, campaign.load_state(verify=False))

    executor.map(_ray_campaign, jobs, init_args, on_result=landed, progress=progress, desc="campaigns")


def _bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="campaigns", unit="campaign")


# -- outputs --------------------------------------------------------------------------------------


def training_sets(
    tables: Sequence[pd.DataFrame], prepared: pd.DataFrame, cfg: ExperimentsConfig
) -> pd.DataFrame:
    """ALL (Exp1), and per experiment repeat: BS (initial), AL (BS + bo finds), random (BS + random finds)."""
    frames = []
    known = prepared[prepared["split"].isin(["train", "val"])]
    frames.append(
        pd.DataFrame(
            {"experiment": "Exp1", "repeat": 0, "training_set": "ALL", "reduced_formula": known["reduced_formula"].to_numpy(),
             "band_gap": known["band_gap"].to_numpy(dtype=float), "origin": "data"}
        )
    )  # fmt: skip
    for table in tables:
        first = table.iloc[0]
        if first["experiment"] == "kappa":
            continue
        initial = table[table["fate"] == INITIAL]
        found = table[table["fate"] == REGISTERED]
        if cfg.campaign.al_set_valid_only:
            found = found[found["valid"].astype(bool)]
        base = {"experiment": first["experiment"], "repeat": int(first["repeat"])}
        if first["method"] == "bo":
            frames.append(_set_rows(initial, "BS", "data", base))
        name = "AL" if first["method"] == "bo" else "random"
        frames.append(_set_rows(initial, name, "data", base))
        frames.append(_set_rows(found, name, "oracle", base))
    out = pd.concat(frames, ignore_index=True)[list(TRAINING_SET_COLUMNS)]
    out["repeat"] = out["repeat"].astype("int32")
    return out


def _set_rows(rows: pd.DataFrame, name: str, origin: str, base: dict) -> pd.DataFrame:
    return pd.DataFrame(
        {**base, "training_set": name, "reduced_formula": rows["reduced_formula"].to_numpy(),
         "band_gap": rows["label"].to_numpy(dtype=float), "origin": origin}
    )  # fmt: skip


def kappa_curve(tables: Sequence[pd.DataFrame], high_gap: float) -> pd.DataFrame:
    """Kappa sweep: cumulative new valid formulas above ``high_gap`` per round (mean and std over repeats)."""
    rows = []
    for table in tables:
        if table["experiment"].iat[0] != "kappa":
            continue
        hits = table[
            (table["fate"] == REGISTERED) & table["valid"].astype(bool) & (table["label"] > high_gap)
        ]
        per_round = (
            hits.groupby("round").size().reindex(range(1, int(table["round"].max()) + 1), fill_value=0)
        )
        for round_, total in per_round.cumsum().items():
            rows.append({"kappa": float(table["kappa"].iat[0]), "repeat": int(table["repeat"].iat[0]), "round": round_, "high_gap_found": int(total)})  # fmt: skip
    if not rows:
        return pd.DataFrame(columns=["kappa", "round", "mean", "std", "repeats"])
    frame = pd.DataFrame(rows)
    curve = frame.groupby(["kappa", "round"])["high_gap_found"].agg(["mean", "std", "count"]).reset_index()
    return curve.rename(columns={"count": "repeats"}).fillna({"std": 0.0})


def summarise(tables: Sequence[pd.DataFrame], cfg: ExperimentsConfig) -> dict:
    """Per campaign: mean and std over repeats of each campaign total (the stage's DVC metrics)."""
    by_name: dict[str, list[dict[str, float]]] = {}
    for table in tables:
        by_name.setdefault(table["campaign"].iat[0], []).append(
            campaign_summary(table, cfg.campaign.high_gap)
        )
    summary: dict = {"high_gap": cfg.campaign.high_gap, "accept": list(cfg.campaign.accept), "campaigns": {}}
    for name, items in by_name.items():
        frame = pd.DataFrame(items)
        summary["campaigns"][name] = {
            "repeats": len(items),
            **{k: {"mean": _num(frame[k].mean()), "std": _num(frame[k].std(ddof=1)) if len(items) > 1 else 0.0} for k in frame.columns},
        }  # fmt: skip
    suggested = (
        pd.concat([t[t["round"] > 0] for t in tables], ignore_index=True) if tables else pd.DataFrame()
    )
    if len(suggested):
        summary["all_suggestions"] = {
            "n": int(len(suggested)),
            "valid_fraction": float(suggested["valid"].astype(bool).mean()),
            "decodable_fraction": float(suggested["decodable"].astype(bool).mean()),
        }
    return summary


def _num(value: float) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def write_outputs(
    tables: Sequence[pd.DataFrame], prepared: pd.DataFrame, cfg: ExperimentsConfig, out: Path
) -> dict:
    """samples.parquet, training_sets.parquet, kappa_sweep.csv, summary.json and plots in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    samples = pd.concat(tables, ignore_index=True)
    samples["latent"] = [np.asarray(v, dtype=np.float32) for v in samples["latent"]]
    _atomic_parquet(samples, out / "samples.parquet")
    _atomic_parquet(training_sets(tables, prepared, cfg), out / "training_sets.parquet")
    curve = kappa_curve(tables, cfg.campaign.high_gap)
    curve.to_csv(out / "kappa_sweep.csv", index=False)
    summary = summarise(tables, cfg)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_campaigns(tables, curve, cfg.campaign.high_gap, out / "campaigns.png")
    return summary


def _atomic_parquet(frame: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    frame.to_parquet(tmp, index=False)
    os.replace(tmp, path)


def plot_campaigns(tables: Sequence[pd.DataFrame], curve: pd.DataFrame, high_gap: float, path: Path) -> None:
    """Best label so far per round (bo vs random, mean over repeats) and the kappa sweep (the paper's Fig. 5)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    traces: dict[str, list[pd.Series]] = {}
    for table in tables:
        if table["experiment"].iat[0] == "kappa":
            continue
        best = table.groupby("round")["label"].max().cummax()
        traces.setdefault(table["campaign"].iat[0], []).append(best)
    for name, series in sorted(traces.items()):
        frame = pd.concat(series, axis=1)
        mean = frame.mean(axis=1)
        left.plot(
            mean.index,
            mean.to_numpy(),
            label=f"{name} (n={frame.shape[1]})",
            ls="--" if name.endswith("random") else "-",
        )
    left.set(xlabel="round", ylabel="best band gap so far (eV)", title="Best label found")
    if traces:
        left.legend(fontsize=8)
    for kappa, part in curve.groupby("kappa"):
        right.plot(part["round"], part["mean"], label=f"kappa={kappa:g}")
        right.fill_between(part["round"], part["mean"] - part["std"], part["mean"] + part["std"], alpha=0.15)
    right.set(xlabel="round", ylabel=f"new valid formulas > {high_gap:g} eV", title="Kappa sweep")
    if len(curve):
        right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
