"""The active-learning loop: suggest -> decode -> check -> label -> register, one round at a time.

The roles are split as in CAMD: the optimiser (:mod:`agd.active.acquisition`) proposes latents,
:class:`LatentChemistry` decodes them and judges their chemistry, the :class:`~agd.models.oracle.Oracle`
labels them, and :class:`Campaign` runs the cycle. A campaign's whole state is one table with a row per
suggestion (``STATE_COLUMNS``), round 0 holding the initial samples; it is rewritten atomically after
every round. Resuming means reading the table, re-registering its points in order, and continuing at the
next round: every random choice of a round is seeded from ``(seed, round)`` or from the number of
registered points, so a resumed campaign ends with the same table as an uninterrupted one.

A table is resumed only if it was made by what runs now. Its fingerprint covers the campaign's
settings and initial samples (and the candidate library); its context stamp covers the validity rules
and the autoencoder; and the oracle is asked again for the label of every formula the table holds a
label for (:meth:`Campaign.load_state`). So a retrained oracle, other validity rules or another
autoencoder start the campaign afresh (``restart_changed``, what the DVC stage uses) or stop it with an
error, instead of reusing labels the current models would not give. A table written before the stamp
existed is checked by what it holds (its rows decoded, judged and labelled again) and stamped.

Every suggestion gets a fate:

* ``initial``      round 0: a training sample with its data label;
* ``registered``   decoded to a formula new to the campaign, labelled by the oracle and registered;
* ``duplicate``    decoded to a formula the campaign already holds; labelled and registered (the GP
  learns that the region maps to a known formula), but not a new training row;
* ``undecodable``  the decoder's most probable counts are all zero; registered at the penalty or not
  at all (``CampaignConfig.undecodable``);
* ``invalid``      a formula that fails charge neutrality or electronegativity balance, when
  ``CampaignConfig.invalid`` is ``skip`` or ``penalty`` (with ``label``, the paper's treatment, it is
  labelled and registered, and its fate is ``registered``/``duplicate`` with ``valid`` False);
* ``unlabelled``   the oracle returned no label (its status is kept in ``reason``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from agd.active.acquisition import (
    AcceptFn,
    BatchClaims,
    CandidateSource,
    LatentOptimizer,
    NoAcceptableCandidateError,
    Quota,
    make_optimizer,
)
from agd.chem.systems import chemical_system, system_counts, system_spread
from agd.chem.validity import ValidityChecker
from agd.config import CampaignConfig
from agd.models.autoencoder import TrainedAutoencoder
from agd.models.oracle import Oracle

log = logging.getLogger(__name__)

INITIAL, REGISTERED, DUPLICATE = "initial", "registered", "duplicate"
UNDECODABLE, INVALID, UNLABELLED = "undecodable", "invalid", "unlabelled"
FATES = (INITIAL, REGISTERED, DUPLICATE, UNDECODABLE, INVALID, UNLABELLED)

#: The campaign state table, one row per suggestion (round 0: the initial samples).
STATE_COLUMNS = (
    "campaign", "experiment", "repeat", "round", "idx", "method", "kappa", "budget",
    "latent", "formula", "reduced_formula", "decodable", "valid", "reason", "fate",
    "label", "label_std", "registered_value", "acquisition", "gp_mean", "gp_std",
    "gp_fit_s", "acquisition_s", "round_s",
)  # fmt: skip

_SCHEMA = pa.schema(
    [
        ("campaign", pa.string()),
        ("experiment", pa.string()),
        ("repeat", pa.int32()),
        ("round", pa.int32()),
        ("idx", pa.int32()),
        ("method", pa.string()),
        ("kappa", pa.float64()),
        ("budget", pa.int32()),  # suggestions the campaign may make after round 0
        ("latent", pa.list_(pa.float64())),  # float64: a resumed GP must see exactly the same points
        ("formula", pa.string()),
        ("reduced_formula", pa.string()),
        ("decodable", pa.bool_()),
        ("valid", pa.bool_()),
        ("reason", pa.string()),
        ("fate", pa.string()),
        ("label", pa.float64()),
        ("label_std", pa.float64()),
        ("registered_value", pa.float64()),  # what the optimiser saw; NaN when not registered
        ("acquisition", pa.float64()),
        ("gp_mean", pa.float64()),
        ("gp_std", pa.float64()),
        ("gp_fit_s", pa.float64()),
        ("acquisition_s", pa.float64()),
        ("round_s", pa.float64()),
    ]
)
_FINGERPRINT_KEY = b"agd.campaign.fingerprint"
_CONTEXT_KEY = b"agd.campaign.context"

#: the largest difference (eV) between a table's label and the oracle's label of the same formula that
#: still counts as the same oracle: one model's labels differ by about 1e-5 eV between batches (float32)
LABEL_TOLERANCE = 1e-3


class CampaignStateError(RuntimeError):
    """A state table that cannot be resumed (other settings, or damaged); the message says what to do."""


#: campaign settings added after state tables were first written, and the value that turns each off
LATE_SETTINGS = {"max_per_system": None, "cap_within_round": False, "search": "latent", "surrogate": "gp"}


def late_settings_off(cfg: CampaignConfig) -> set[str]:
    """The late settings (:data:`LATE_SETTINGS`) that ``cfg`` leaves off. Hashes of the settings (a table's
    fingerprint, the MLflow parent run's key) leave these out, so tables and runs from before a setting
    existed stay valid while it is off."""
    return {name for name, off in LATE_SETTINGS.items() if getattr(cfg, name) == off}


def late_exclusions(cfg: CampaignConfig, keep: Collection[str] = ()) -> dict:
    """``model_dump``'s ``exclude`` for hashing ``cfg``: the late settings left off (but those in ``keep``),
    and the acquisition's ``level``, added later and read by the straddle only."""
    exclude: dict = {name: True for name in late_settings_off(cfg) - set(keep)}
    if cfg.surrogate == "gp":  # the forest's settings mean nothing to a GP campaign
        exclude["surrogate_forest"] = True
    elif cfg.surrogate_forest.shortlist is None:  # added later; refresh means nothing without a shortlist
        exclude["surrogate_forest"] = {"shortlist", "refresh"}
    if cfg.acquisition.function != "straddle":
        exclude["acquisition"] = {"level"}
    return exclude


@dataclass(frozen=True)
class CampaignSpec:
    """Who a campaign is: its names, method, budget, exploration weight and seed."""

    campaign: str  # e.g. 'Exp2-bo'
    experiment: str  # e.g. 'Exp2'
    repeat: int
    method: Literal["bo", "random"]
    budget: int  # suggestions after the initial samples
    kappa: float
    seed: int
    #: the acquisition function when it is not the configured one: the kappa sweep measures UCB's kappa
    #: whatever the campaigns use (None: the configured one, and left out of the fingerprint)
    function: Literal["ucb", "ei", "straddle"] | None = None

    def fingerprint(self, cfg: CampaignConfig, initial: pd.DataFrame, library: str | None = None) -> str:
        """Hash of everything that decides the table: spec, settings, initial samples (and candidate library)."""
        spec = asdict(self)
        if spec["function"] is None:  # tables written before the field existed stay valid
            del spec["function"]
        payload = {
            "spec": spec,
            "config": cfg.model_dump(mode="json", exclude=late_exclusions(cfg)),
            "initial": pd.util.hash_pandas_object(initial[["reduced_formula", "band_gap"]], index=False)
            .to_numpy()
            .tolist(),
        }
        if library is not None:
            payload["library"] = library
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _system_group(formula: str | None) -> frozenset[str] | None:
    """A formula key's group for the per-system quota: its chemical system; None (no limit) if it has none."""
    return chemical_system(formula) or None


class LatentChemistry:
    """Decodes latents into formulas and judges them: decodable, valid (smact), known to the campaign.

    Formulas with more than ``max_elements`` elements or ``max_atoms`` atoms are invalid without asking
    smact: a latent far from the data decodes into 20-40 elements, whose oxidation-state search would
    cost seconds each and never pass.
    """

    def __init__(
        self,
        autoencoder: TrainedAutoencoder,
        checker: ValidityChecker,
        max_elements: int | None = 8,
        max_atoms: int | None = None,
    ) -> None:
        self.autoencoder = autoencoder
        self.checker = checker
        self.max_elements = max_elements
        self.max_atoms = max_atoms

    #: the candidate library searched instead of the latent box (``agd.active.library``); None here
    library = None

    def source(self) -> CandidateSource | None:
        """The optimiser's pool when it is not the latent box (a library chemistry's members)."""
        return None

    def assess(self, latents: np.ndarray) -> pd.DataFrame:
        """One row per latent: formula (None if undecodable), reduced_formula, decodable, valid, reason."""
        decoded = self.autoencoder.decode_latents(latents)
        n = len(decoded.formulas)
        too_big = np.zeros(n, dtype=bool)
        reasons: list[str | None] = list(decoded.reasons)
        n_elements = (decoded.counts > 0).sum(axis=1)
        n_atoms = decoded.counts.sum(axis=1)
        for i in range(n):
            if self.max_elements is not None and n_elements[i] > self.max_elements:
                too_big[i], reasons[i] = True, f"{n_elements[i]} elements (more than {self.max_elements})"
            elif self.max_atoms is not None and n_atoms[i] > self.max_atoms:
                too_big[i], reasons[i] = True, f"{n_atoms[i]} atoms (more than {self.max_atoms})"
        ask = decoded.ok & ~too_big
        checked = self.checker.check([f for f, a in zip(decoded.formulas, ask, strict=True) if a])
        valid = np.zeros(n, dtype=bool)
        keys = np.full(n, None, dtype=object)
        rows = np.flatnonzero(ask)
        valid[rows] = checked["valid"].to_numpy(dtype=bool)
        keys[rows] = checked["reduced_formula"].to_numpy(dtype=object)
        for j, i in enumerate(rows):
            reasons[i] = checked["reason"].iat[j]
        big = np.flatnonzero(too_big)
        if len(big):  # still a formula: give it its key so duplicates are seen
            from agd.chem.formula import formula_key

            for i in big:
                keys[i] = formula_key(decoded.formulas[i])
        return pd.DataFrame(
            {
                "formula": decoded.formulas,
                "reduced_formula": keys,
                "decodable": decoded.ok,
                "valid": valid,
                "reason": reasons,
            }
        )

    def acceptor(
        self, rules: Sequence[str], known: set[str], closed: Collection[frozenset[str]] = ()
    ) -> AcceptFn | None:
        """``accept(latents) -> (mask, formulas)`` enforcing ``rules`` (decodable, valid, new); None for no rules.

        With ``new`` the formulas also serve as keys, so one batch never holds a formula twice. A formula
        of a chemical system in ``closed`` (element sets) is refused whatever the rules.
        """
        if not rules:
            return None
        rules = set(rules)
        closed = frozenset(closed)

        def accept(latents: np.ndarray) -> np.ndarray | tuple[np.ndarray, list]:
            table = self.assess(latents)
            ok = table["decodable"].to_numpy(dtype=bool)
            if "valid" in rules:
                ok &= table["valid"].to_numpy(dtype=bool)
            if closed:
                ok &= ~np.array(
                    [chemical_system(key) in closed for key in table["reduced_formula"]], dtype=bool
                )
            if "new" not in rules:
                return ok
            ok &= ~table["reduced_formula"].isin(known).to_numpy()
            return ok, table["reduced_formula"].tolist()

        return accept


RoundHook = Callable[[int, pd.DataFrame], None]


class Campaign:
    """One campaign (one repeat of one experiment and method), resumable from its state table."""

    def __init__(
        self,
        spec: CampaignSpec,
        cfg: CampaignConfig,
        chemistry: LatentChemistry,
        oracle: Oracle,
        initial: pd.DataFrame,
        state_path: str | os.PathLike,
        restart_changed: bool = False,
    ) -> None:
        missing = {"reduced_formula", "band_gap"} - set(initial.columns)
        if missing:
            raise ValueError(f"initial samples lack column(s) {sorted(missing)}")
        if initial.empty:
            raise ValueError("a campaign needs at least one initial sample")
        self.spec = spec
        self.cfg = cfg.model_copy(
            update={
                "acquisition": cfg.acquisition.model_copy(
                    update={"kappa": spec.kappa, "seed": spec.seed}
                    | ({"function": spec.function} if spec.function is not None else {})
                )
            }
        )
        self.chemistry = chemistry
        self.oracle = oracle
        self.initial = initial.reset_index(drop=True)
        self.state_path = Path(state_path)
        self.restart_changed = restart_changed
        self._context: dict[str, str] | None = None  # the context stamp, hashed once
        library = chemistry.library
        if (library is not None) != (cfg.search == "candidates"):
            raise ValueError(
                "search: candidates needs the candidate library (agd experiments --candidates FILE), and a "
                "library needs search: candidates"
            )
        self.fingerprint = spec.fingerprint(self.cfg, self.initial, library.digest if library else None)
        self.bounds = chemistry.autoencoder.bounds.as_array()

    # -- state -------------------------------------------------------------------------------------
    @property
    def max_rounds(self) -> int:
        """Most rounds after round 0: twice what the budget needs, for rounds that fall short of a batch."""
        return 2 * math.ceil(self.spec.budget / self.cfg.batch_size)

    def load_state(self, verify: bool = True) -> pd.DataFrame | None:
        """The saved table, or None when there is none.

        A table saved under other settings, or made by other models (:meth:`changed_models`; skipped
        with ``verify=False``, for a table this process has just written), raises CampaignStateError,
        or is deleted when the campaign was made with ``restart_changed`` (what the DVC stage wants:
        changed params or models, fresh campaigns). A table from before the context stamp that passes
        the check is stamped.
        """
        if not self.state_path.exists():
            return None
        try:
            table = pq.read_table(self.state_path)
        except (pa.ArrowInvalid, OSError) as exc:
            raise CampaignStateError(
                f"{self.state_path}: unreadable campaign state ({exc}); delete it to start this campaign afresh"
            ) from None
        meta = table.schema.metadata or {}
        saved = meta.get(_FINGERPRINT_KEY, b"").decode()
        problem = None
        if saved != self.fingerprint:
            problem = (
                "the saved campaign was run with other settings or initial samples "
                f"(fingerprint {saved or 'missing'} vs {self.fingerprint})"
            )
        frame = table.to_pandas()
        stamp = json.loads(meta[_CONTEXT_KEY]) if _CONTEXT_KEY in meta else None
        if problem is None and verify:
            problem = self.changed_models(frame, stamp)
        if problem is not None and self.restart_changed:
            log.warning("%s: %s; starting afresh", self.state_path, problem)
            self.state_path.unlink()
            return None
        if problem is not None:
            raise CampaignStateError(f"{self.state_path}: {problem}; delete it (or its folder) to rerun")
        if stamp is None and verify:
            frame = self._save(frame)  # checked by what it holds: stamped, rows unchanged
        return frame

    def context(self) -> dict[str, str]:
        """The stamp of what decides a table beside its fingerprint: hashes of the validity rules and
        of the autoencoder (its decoder turns latents into formulas)."""
        if self._context is None:
            from agd.active.library import autoencoder_digest

            rules = self.chemistry.checker.config.model_dump_json()
            self._context = {
                "validity": hashlib.sha256(rules.encode()).hexdigest()[:16],
                "autoencoder": autoencoder_digest(self.chemistry.autoencoder),
            }
        return self._context

    def changed_models(self, table: pd.DataFrame, stamp: dict[str, str] | None) -> str | None:
        """Why ``table`` was not made by this campaign's models, or None if it was.

        The stamp's validity rules and autoencoder must be this campaign's (a table without a stamp must
        decode and judge as it says, row for row), and the oracle must give every label the table holds
        to within :data:`LABEL_TOLERANCE` (and no label where it holds none)."""
        later = table[table["round"] > 0]
        if stamp is not None:
            current = self.context()
            for name, what in (("validity", "validity rules"), ("autoencoder", "autoencoder")):
                if stamp.get(name) != current[name]:
                    return f"the {what} changed since the table was written"
        elif len(later):
            judged = self.chemistry.assess(np.stack(later["latent"].to_numpy()))
            for column in ("formula", "reduced_formula", "decodable", "valid"):
                was = later[column].to_numpy(dtype=object)
                now = judged[column].to_numpy(dtype=object)
                differs = [i for i in range(len(was)) if not _same_value(was[i], now[i])]
                if differs:
                    i = differs[0]
                    return (
                        f"{len(differs)} of its {len(later)} suggestions now get another {column} (round "
                        f"{later['round'].iat[i]}: {was[i]!r} in the table, {now[i]!r} now): the autoencoder "
                        "or the validity rules changed since the table was written"
                    )
        asked = later[
            self._asks_oracle(later["decodable"].to_numpy(dtype=bool), later["valid"].to_numpy(dtype=bool))
        ]
        if not len(asked):
            return None
        was = asked["label"].to_numpy(dtype=float)
        now = np.asarray(self.oracle.label(asked["formula"].astype(str).tolist()).gaps, dtype=float)
        gap = np.abs(now - was)
        differs = np.flatnonzero(~((np.isnan(was) & np.isnan(now)) | (gap <= LABEL_TOLERANCE)))
        if not len(differs):
            return None
        i = differs[np.argmax(np.nan_to_num(gap[differs], nan=np.inf))]
        return (
            f"the oracle labels {len(differs)} of the table's {len(asked)} labelled formulas differently (largest: "
            f"{asked['formula'].iat[i]} in round {asked['round'].iat[i]}, {was[i]:.4f} eV in the table, "
            f"{now[i]:.4f} eV now): the oracle changed since the table was written"
        )

    def _save(self, table: pd.DataFrame) -> pd.DataFrame:
        """Write the table atomically; returns it as it reads back (the table's column types)."""
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        arrow = pa.Table.from_pandas(table[list(STATE_COLUMNS)], schema=_SCHEMA, preserve_index=False)
        arrow = arrow.replace_schema_metadata(
            {_FINGERPRINT_KEY: self.fingerprint.encode(), _CONTEXT_KEY: json.dumps(self.context()).encode()}
        )
        tmp = self.state_path.with_name(f".{self.state_path.name}.tmp-{os.getpid()}")
        pq.write_table(arrow, tmp)
        os.replace(tmp, self.state_path)
        return arrow.to_pandas()

    def _rows(self, round_: int, latents: np.ndarray, **columns) -> pd.DataFrame:
        n = len(latents)
        base = {
            "campaign": self.spec.campaign,
            "experiment": self.spec.experiment,
            "repeat": self.spec.repeat,
            "round": round_,
            "idx": np.arange(n),
            "method": self.spec.method,
            "kappa": self.spec.kappa,
            "budget": self.spec.budget,
            "latent": list(np.asarray(latents, dtype=np.float64)),
        }
        frame = pd.DataFrame(base)
        for name in STATE_COLUMNS:
            if name not in frame.columns:
                frame[name] = columns.get(name, np.nan)
        return frame[list(STATE_COLUMNS)]

    def _initial_rows(self) -> pd.DataFrame:
        formulas = self.initial["reduced_formula"].astype(str).tolist()
        latents = self.chemistry.autoencoder.encode_formulas(formulas)
        fits = np.isfinite(latents).all(axis=1)
        if not fits.any():
            raise ValueError("none of the initial samples fits the autoencoder's vocabulary")
        if not fits.all():
            log.warning("%d initial samples do not fit the autoencoder and are left out", int((~fits).sum()))
        labels = self.initial["band_gap"].to_numpy(dtype=float)[fits]
        checked = self.chemistry.checker.check([f for f, ok in zip(formulas, fits, strict=True) if ok])
        return self._rows(
            0,
            latents[fits],
            formula=checked["formula"].to_numpy(),
            reduced_formula=checked["reduced_formula"].to_numpy(),
            decodable=True,
            valid=checked["valid"].to_numpy(dtype=bool),
            reason=checked["reason"].to_numpy(),
            fate=INITIAL,
            label=labels,
            registered_value=labels,
        )

    # -- the loop ----------------------------------------------------------------------------------
    def run(self, on_round: RoundHook | None = None, progress: bool = True) -> pd.DataFrame:
        """Run (or continue) the campaign to its budget; returns the state table.

        ``on_round(round, table)`` is called after each round's table is saved (round 0 included),
        and once for the last saved round when nothing is left to run, so a tracker can catch up.
        """
        table = self.load_state()
        if table is None:
            table = self._save(self._initial_rows())
            if on_round is not None:
                on_round(0, table)
        done = int(table["round"].max())
        self.bounds = covering_box(
            self.chemistry.autoencoder.bounds.as_array(),
            np.stack(table.loc[table["fate"] == INITIAL, "latent"].to_numpy()),
        )
        if self.chemistry.library is not None:  # members can lie outside the training latents' box
            self.bounds = covering_box(self.bounds, self.chemistry.library.box().T)
        registered = table[np.isfinite(table["registered_value"].to_numpy(dtype=float))]
        optimizer = self._optimizer(registered)
        known = set(table.loc[table["fate"].isin([INITIAL, REGISTERED]), "reduced_formula"].dropna())
        used = int((table["round"] > 0).sum())
        if (used >= self.spec.budget or done >= self.max_rounds) and on_round is not None:
            on_round(done, table)
        bar = _progress(self.spec.budget - used, f"{self.spec.campaign} r{self.spec.repeat}", progress)
        round_ = done
        # A round that finds fewer acceptable latents than asked for leaves budget for later rounds;
        # an empty round writes no rows and, being seeded like any other, comes out empty again on resume.
        while used < self.spec.budget and round_ < self.max_rounds:
            round_ += 1
            n = min(self.cfg.batch_size, self.spec.budget - used)
            rows = self._round(round_, n, optimizer, known, table)
            if len(rows):
                table = self._save(pd.concat([table, rows], ignore_index=True))
                used += len(rows)
                if on_round is not None:
                    on_round(round_, table)
            if bar is not None:
                bar.update(len(rows))
                bar.set_postfix(round=round_, best=f"{table['label'].max():.2f}")
        if bar is not None:
            bar.close()
        return table

    def _optimizer(self, registered: pd.DataFrame) -> LatentOptimizer:
        """The optimiser with the registered rows of the table: a latent GP, or the library's forest (a
        random control only registers its draws, which the GP's bookkeeping does at no cost)."""
        x = np.stack(registered["latent"].to_numpy())
        y = registered["registered_value"].to_numpy(dtype=float)
        if self.cfg.surrogate == "forest" and self.spec.method == "bo":
            from agd.active.surrogate import ForestOptimizer

            formulas = registered["reduced_formula"].astype(object).to_numpy()
            return ForestOptimizer(
                self.bounds, self.chemistry.library, self.cfg.surrogate_forest, self.cfg.acquisition, x, y,
                [str(f) for f in formulas], n_initial=int((registered["fate"] == INITIAL).sum()),
            )  # fmt: skip
        return make_optimizer(self.bounds, self.cfg.acquisition, x, y, source=self.chemistry.source())

    def _round(
        self, round_: int, n: int, optimizer: LatentOptimizer, known: set[str], table: pd.DataFrame
    ) -> pd.DataFrame:
        start = time.perf_counter()
        counts = self._system_counts(table)
        cap = self.cfg.max_per_system
        closed = {system for system, count in counts.items() if cap is not None and count >= cap}
        accept = self.chemistry.acceptor(self.cfg.accept, known, closed)
        quota = (
            Quota(_system_group, {system: max(cap - count, 0) for system, count in counts.items()}, cap)
            if self.cfg.cap_within_round
            else None
        )
        timing = {"gp_fit_s": 0.0, "acquisition_s": 0.0}
        if self.spec.method == "bo":
            try:
                suggestions = optimizer.suggest(n, accept, quota)
                x, acq = suggestions.x, suggestions.acquisition
                mean, std = suggestions.mean, suggestions.std
                timing = {
                    "gp_fit_s": suggestions.report.gp_fit_s,
                    "acquisition_s": suggestions.report.acquisition_s + suggestions.report.accept_s,
                }
            except NoAcceptableCandidateError as exc:
                log.warning("%s r%d round %d: %s", self.spec.campaign, self.spec.repeat, round_, exc)
                x = exc.found
                acq = mean = std = np.full(len(x), np.nan)
        else:
            t0 = time.perf_counter()
            x = self._random_latents(round_, n, accept, table, quota)
            acq = mean = std = np.full(len(x), np.nan)
            timing["acquisition_s"] = time.perf_counter() - t0
        rows = self._judge(round_, x, known, table)
        rows["acquisition"], rows["gp_mean"], rows["gp_std"] = acq, mean, std
        keep = np.isfinite(rows["registered_value"].to_numpy(dtype=float))
        if keep.any():
            optimizer.register(np.asarray(x)[keep], rows["registered_value"].to_numpy(dtype=float)[keep])
        rows["gp_fit_s"], rows["acquisition_s"] = timing["gp_fit_s"], timing["acquisition_s"]
        rows["round_s"] = time.perf_counter() - start
        return rows

    def _asks_oracle(self, decodable: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """Which suggestions the oracle labels: decoded ones that are valid, or all of them under
        ``invalid: label`` (the paper's treatment)."""
        return decodable & (valid | (self.cfg.invalid == "label"))

    def _system_counts(self, table: pd.DataFrame) -> Counter[frozenset[str]]:
        """The campaign's registered finds per chemical system (empty when ``max_per_system`` is off)."""
        if self.cfg.max_per_system is None:
            return Counter()
        return system_counts(
            table.loc[(table["round"] > 0) & (table["fate"] == REGISTERED), "reduced_formula"]
        )

    def _random_latents(
        self, round_: int, n: int, accept: AcceptFn | None, table: pd.DataFrame, quota: Quota | None = None
    ) -> np.ndarray:
        """The control: random latents (seeded by round), kept only if ``accept`` passes them.

        ``local``: a uniformly chosen registered latent plus Gaussian noise of ``random_scale`` times the
        box's span; ``box``: uniform in the box. A campaign that searches a candidate library draws
        random members instead, whatever the sampler.
        """
        rng = np.random.default_rng([self.spec.seed, round_])
        lo, hi = self.bounds.T
        registered = table[np.isfinite(table["registered_value"].to_numpy(dtype=float))]
        centres = np.stack(registered["latent"].to_numpy())

        library = self.chemistry.library

        def draw(m: int) -> np.ndarray:
            if library is not None:
                return library.latents[library.random(rng, m)].astype(np.float64)
            if self.cfg.random_sampler == "box":
                return rng.uniform(lo, hi, size=(m, len(lo)))
            x = centres[rng.integers(0, len(centres), m)] + rng.standard_normal((m, len(lo))) * (
                self.cfg.random_scale * (hi - lo)
            )
            return np.clip(x, lo, hi)

        if accept is None:
            return draw(n)
        found: list[np.ndarray] = []
        claims = BatchClaims(quota)
        drawn, chunk = 0, self.cfg.acquisition.accept_chunk
        while len(found) < n and drawn < self.cfg.random_draws:
            x = draw(chunk)
            drawn += chunk
            answer = accept(x)
            ok, keys = answer if isinstance(answer, tuple) else (answer, [None] * len(x))
            for row, good, key in zip(x, ok, keys, strict=True):
                if good and len(found) < n and claims.claim(key):
                    found.append(row)
        if len(found) < n:
            log.warning(
                "%s r%d round %d: %d of %d random latents accepted in %d draws",
                self.spec.campaign, self.spec.repeat, round_, len(found), n, drawn,
            )  # fmt: skip
        return np.asarray(found).reshape(-1, len(lo))

    def _judge(self, round_: int, x: np.ndarray, known: set[str], table: pd.DataFrame) -> pd.DataFrame:
        """Decode, check, label and decide the fate and registered value of every suggestion."""
        cfg = self.cfg
        judged = (
            self.chemistry.assess(x)
            if len(x)
            else pd.DataFrame(columns=["formula", "reduced_formula", "decodable", "valid", "reason"])
        )
        decodable = judged["decodable"].to_numpy(dtype=bool)
        valid = judged["valid"].to_numpy(dtype=bool)
        to_label = self._asks_oracle(decodable, valid)
        label = np.full(len(x), np.nan)
        label_std = np.full(len(x), np.nan)
        reason = judged["reason"].astype(object).to_numpy().copy()
        if to_label.any():
            idx = np.flatnonzero(to_label)
            labels = self.oracle.label([judged["formula"].iat[i] for i in idx])
            label[idx] = labels.gaps
            if labels.std is not None:
                label_std[idx] = labels.std
            for j, i in enumerate(idx):
                if labels.status[j] != "ok":
                    reason[i] = labels.status[j]
        labelled = np.isfinite(label)
        penalty = cfg.penalty if cfg.penalty is not None else float(np.nanmin(table["registered_value"]))
        fate = np.empty(len(x), dtype=object)
        value = np.full(len(x), np.nan)
        for i in range(len(x)):
            key = judged["reduced_formula"].iat[i]
            if not decodable[i]:
                fate[i] = UNDECODABLE
                if cfg.undecodable == "penalty":
                    value[i] = penalty
            elif not valid[i] and cfg.invalid != "label":
                fate[i] = INVALID
                if cfg.invalid == "penalty":
                    value[i] = penalty
            elif not labelled[i]:
                fate[i] = UNLABELLED
            else:
                fate[i] = DUPLICATE if key in known else REGISTERED
                value[i] = label[i]
                known.add(key)
        return self._rows(
            round_,
            x,
            formula=judged["formula"].to_numpy(dtype=object),
            reduced_formula=judged["reduced_formula"].to_numpy(dtype=object),
            decodable=decodable,
            valid=valid,
            reason=reason,
            fate=fate,
            label=label,
            label_std=label_std,
            registered_value=value,
        )


def _same_value(a, b) -> bool:
    """Equal, or both missing (None / NaN)."""
    if pd.isna(a) and pd.isna(b):
        return True
    return bool(a == b)


def covering_box(bounds: np.ndarray, points: np.ndarray) -> np.ndarray:
    """The autoencoder's box widened, per dimension, just enough to hold ``points``.

    The box is the extent of the autoencoder's training latents, but a campaign's initial samples
    come from the whole dataset (validation and test rows too), so some lie a little outside it.
    The optimiser must search a box that holds every point it has registered.
    """
    box = np.array(bounds, dtype=float, copy=True)
    if len(points):
        box[:, 0] = np.minimum(box[:, 0], points.min(axis=0))
        box[:, 1] = np.maximum(box[:, 1], points.max(axis=0))
        widened = int((box != bounds).any(axis=1).sum())
        if widened:
            log.debug(
                "search box widened in %d of %d dimensions to hold the initial samples", widened, len(box)
            )
    return box


def _progress(total: int, desc: str, enabled: bool):
    if not enabled or total == 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="suggestion", leave=False)


# -- what a round achieved -------------------------------------------------------------------------


def round_metrics(table: pd.DataFrame, round_: int, high_gap: float) -> dict[str, float]:
    """Metrics of one round (from the table alone, so a resumed tracker logs exactly what it missed)."""
    rows = table[table["round"] == round_]
    upto = table[table["round"] <= round_]
    labels = upto["label"].to_numpy(dtype=float)
    new = upto[upto["fate"] == REGISTERED]
    new_valid = new[new["valid"].astype(bool)]
    metrics = {
        "best_label": float(np.nanmax(labels)) if np.isfinite(labels).any() else math.nan,
        "n_registered_total": float(np.isfinite(upto["registered_value"].to_numpy(dtype=float)).sum()),
        "n_new_valid_total": float(len(new_valid)),
        "n_high_gap_total": float((new_valid["label"] > high_gap).sum()),
    }
    if round_ == 0:
        metrics["n_initial"] = float(len(rows))
        metrics["initial_high_gap"] = float((rows["label"] > high_gap).sum())
        return metrics
    fresh = rows[(rows["fate"] == REGISTERED) & rows["valid"].astype(bool)]
    n = max(len(rows), 1)
    metrics.update(
        {
            "n_suggested": float(len(rows)),
            "n_new_valid": float(len(fresh)),
            "n_high_gap": float((fresh["label"] > high_gap).sum()),
            "decodable_fraction": float(rows["decodable"].astype(bool).sum() / n),
            "valid_fraction": float(rows["valid"].astype(bool).sum() / n),
            "round_best_label": float(np.nanmax(rows["label"])) if rows["label"].notna().any() else math.nan,
            "gp_fit_s": float(rows["gp_fit_s"].iat[0]) if len(rows) else math.nan,
            "acquisition_s": float(rows["acquisition_s"].iat[0]) if len(rows) else math.nan,
            "round_s": float(rows["round_s"].iat[0]) if len(rows) else math.nan,
        }
    )
    return metrics


def campaign_summary(table: pd.DataFrame, high_gap: float) -> dict[str, float]:
    """Totals of one finished campaign: valid-decode fraction, new formulas, high-gap hits and the chemical
    systems they span, best label."""
    suggested = table[table["round"] > 0]
    n = max(len(suggested), 1)
    budget = int(table["budget"].iat[0])
    new_valid = suggested[(suggested["fate"] == REGISTERED) & suggested["valid"].astype(bool)]
    high = new_valid["label"] > high_gap
    spread = system_spread(new_valid["reduced_formula"], high)
    return {
        "n_initial": float((table["round"] == 0).sum()),
        "n_suggested": float(len(suggested)),
        "budget_used": float(len(suggested) / budget),  # below 1 when rounds found too few acceptable latents
        "decodable_fraction": float(suggested["decodable"].astype(bool).sum() / n),
        "valid_fraction": float(suggested["valid"].astype(bool).sum() / n),
        "valid_of_budget": float(suggested["valid"].astype(bool).sum() / budget),
        "n_new_valid": float(len(new_valid)),
        "n_high_gap": float(high.sum()),
        # how far the finds spread over chemistries (element sets): what max_per_system acts on
        "n_systems": float(spread["systems"]),
        "n_high_gap_systems": float(spread["high_gap_systems"]),
        "most_in_one_system": float(spread["most_in_one_system"]),
        "best_label": float(np.nanmax(table["label"])),
        "best_new_label": float(new_valid["label"].max()) if len(new_valid) else math.nan,
        "seconds": float(suggested.groupby("round")["round_s"].first().sum()) if len(suggested) else 0.0,
    }
