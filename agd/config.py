"""params.yaml -> typed, validated configuration.

Every section of ``params.yaml`` has a model here. Unknown keys and wrong types are errors that name
the field (``params.yaml: prepare.split.train: Input should be a valid number``), so a typo never
silently falls back to a default.
"""

from __future__ import annotations

import json
import math
import os
import re
import typing
from functools import lru_cache
from importlib.util import find_spec
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """params.yaml is missing, unreadable, or has a bad field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MPSourceConfig(_Section):
    """Materials Project download through mp-api (key from the MP_API_KEY environment variable)."""

    include_structure: bool = False
    chunk_size: int = Field(1000, gt=0)
    num_chunks: int | None = Field(None, gt=0, description="limit the download (None: everything)")
    band_gap_min: float | None = None
    band_gap_max: float | None = None
    include_gnome: bool = Field(False, description="GNoME entries carry r2SCAN gaps, not PBE")


class DataConfig(_Section):
    """Where the raw band-gap table comes from."""

    source: Literal["auto", "mp", "matbench", "local"] = "auto"
    path: str | None = Field(
        None, description="local CSV/parquet; the AGD_DATA environment variable overrides"
    )
    columns: dict[str, str] = Field(
        default_factory=dict, description="extra column mapping: {column in your file: standard name}"
    )
    mp: MPSourceConfig = MPSourceConfig()


class SplitConfig(_Section):
    train: float = Field(0.6, ge=0, le=1)
    val: float = Field(0.2, ge=0, le=1)
    test: float = Field(0.2, ge=0, le=1)

    @model_validator(mode="after")
    def _sums_to_one(self) -> SplitConfig:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-9:
            raise ValueError(f"train + val + test must be 1, got {total:g}")
        return self


class FilterConfig(_Section):
    """Size and chemistry filters (the paper's trims); None switches a filter off."""

    max_atoms_per_element: int | None = Field(None, gt=0)
    max_elements: int | None = Field(None, gt=0)
    max_atoms: int | None = Field(None, gt=0)
    gap_positive_only: bool = False
    exclude_elements: list[str] = Field(default_factory=list)


class PrepareConfig(_Section):
    """Validation, de-duplication, filtering and the split."""

    seed: int = 42
    split: SplitConfig = SplitConfig()
    dedup: Literal["auto", "lowest_formation_energy", "median_gap", "first"] = "auto"
    integer_tolerance: float = Field(1e-4, gt=0, lt=0.5)
    max_multiplier: int = Field(24, ge=1)
    filters: FilterConfig = FilterConfig()
    histogram_bins: list[float] = Field(default_factory=lambda: [0, 0.5, 1, 2, 3, 4, 5, 6, 8, 10, 20])


class EncodingConfig(_Section):
    """The one-hot composition matrix: elements x (max_count + 1)."""

    max_count: int = Field(8, ge=1)
    elements: list[str] | None = Field(None, description="fixed vocabulary; None: the elements of the data")


class ValidityConfig(_Section):
    """Charge neutrality and electronegativity balance (smact)."""

    oxidation_states_set: str = "icsd24"
    use_pauling_test: bool = True
    include_alloys: bool = False
    min_elements: int = Field(
        2,
        ge=1,
        description="fewer distinct elements is invalid: smact passes every pure element (oxidation state 0), "
        "but an element is no new compound (1: smact_validity's verdicts exactly)",
    )


class TrackingConfig(_Section):
    """MLflow; MLFLOW_TRACKING_URI overrides ``uri``; None means sqlite:///mlflow.db at the project root."""

    uri: str | None = None
    experiment_prefix: str = "agd"


class DesignMapConfig(_Section):
    """The design-space map the catalog stage embeds for the dashboard's default view."""

    n_points: int = Field(1000, ge=2, description="at most this many points, half of them round 0")
    perplexity: float = Field(30.0, gt=0)
    seed: int = 0


class CatalogConfig(_Section):
    path: str = "agd.duckdb"
    design_map: DesignMapConfig | None = DesignMapConfig()  # null: no precomputed map


class RoostConfig(_Section):
    """Roost (aviary) training; one model per ensemble member, seeds seed, seed+1, ..."""

    ensemble_size: int = Field(3, ge=1)
    epochs: int = Field(100, ge=1, description="most epochs; also the length of the cosine schedule")
    batch_size: int = Field(128, ge=1)
    learning_rate: float = Field(3e-4, gt=0)
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    weight_decay: float = Field(1e-6, ge=0)
    loss: Literal["robust_l1", "l1"] = Field(
        "robust_l1", description="robust_l1 also predicts an aleatoric std"
    )
    embedding: Literal["matscholar200", "cgcnn92", "megnet16", "onehot112"] = "matscholar200"
    elem_fea_len: int = Field(64, ge=2)
    n_graph: int = Field(3, ge=1)
    elem_heads: int = Field(3, ge=1)
    cry_heads: int = Field(3, ge=1)
    hidden: int = Field(256, ge=1, description="hidden width of the attention gate and message networks")
    trunk_hidden: list[int] = Field(default_factory=lambda: [1024, 512])
    out_hidden: list[int] = Field(default_factory=lambda: [256, 128, 64], min_length=1)
    patience: int | None = Field(20, ge=1, description="early stopping on validation MAE (None: off)")
    num_threads: int | None = Field(None, ge=1, description="torch intra-op threads (None: torch's default)")
    workers: int = Field(1, ge=1, description="ensemble members trained at once, one process each")
    finetune_epochs: int = Field(
        3, ge=1, description="epochs of the all-data fine-tune (oracle refit: finetune)"
    )
    finetune_lr_factor: float = Field(0.1, gt=0, description="fine-tune learning rate / learning_rate")
    device: str = "cpu"

    @field_validator("embedding")
    @classmethod
    def _aviary_can_load(cls, name: str) -> str:
        problem = embedding_problem(name)
        if problem:
            names = typing.get_args(cls.model_fields["embedding"].annotation)
            usable = [other for other in names if not embedding_problem(other)]
            raise ValueError(f"{problem}; choose one of {', '.join(usable)}")
        return name


_SYMBOL = re.compile(r"[A-Z][a-z]?")


@lru_cache(maxsize=8)
def embedding_problem(name: str) -> str | None:
    """Why aviary cannot build a Roost with its element embedding ``name`` (None: it can).

    aviary 1.2.1 ships a ``megnet16.json`` with a ``Null`` entry, which its own loader passes to
    pymatgen's ``Element`` and dies on. Checked from the file, so a fixed aviary is accepted again. A key
    must look like an element symbol (one capital, at most one lower-case letter); pymatgen is not
    imported for this, as every ``load_params`` (the dashboard's first page too) would pay for it, and
    ``tests/models/test_oracle.py`` checks the verdicts against aviary's own loader.
    """
    spec = find_spec("aviary")
    if spec is None or spec.origin is None:
        return None  # no aviary: the Roost model reports that itself when it is used
    path = Path(spec.origin).parent / "embeddings" / "element" / f"{name}.json"
    if not path.is_file():
        return f"the installed aviary has no element embedding {name!r} ({path} is missing)"
    bad = sorted(key for key in json.loads(path.read_text()) if not _SYMBOL.fullmatch(key))
    if bad:
        return (
            f"the installed aviary's {name} embedding has entries that are not elements ({', '.join(bad)}), "
            "and aviary cannot load it"
        )
    return None


class ForestConfig(_Section):
    """Random forest on Magpie features (fast oracle and screener)."""

    n_estimators: int = Field(300, ge=1)
    max_features: float | str | None = 0.3
    min_samples_leaf: int = Field(1, ge=1)
    max_samples: float | None = Field(None, gt=0, le=1, description="bootstrap fraction per tree (None: all)")
    n_jobs: int = -1


class OracleConfig(_Section):
    """The band-gap oracle that stands in for DFT (the paper's Exp1 protocol: seeded 60/20/20 split)."""

    models: list[Literal["roost", "forest"]] = Field(default_factory=lambda: ["roost", "forest"])
    primary: Literal["roost", "forest"] = "roost"
    seed: int = 0
    roost: RoostConfig = RoostConfig()
    forest: ForestConfig = ForestConfig()
    paper_test_column: str = "in_agd_bd_test"
    refit: Literal["finetune", "scratch", "none"] = Field(
        "finetune",
        description="deployed models see all rows: Roost fine-tuned from the hold-out members (finetune) or "
        "retrained for the epochs early stopping chose (scratch); the forest is refit; none: deploy hold-out models",
    )


class MetalsOracleConfig(_Section):
    """A second oracle trained on data that keeps the metals (stage train_oracle_metals).

    The main oracle learns the paper's Exp1 set (positive gaps only) and so gives metals a gap too.
    """

    dataset: str = Field(
        "../shared/data/mp_gap_by_composition.csv",
        description="CSV or parquet with formulas and gaps, metals included",
    )
    columns: dict[str, str] = Field(
        default_factory=dict, description="file column -> standard name, as data.columns"
    )
    metal_gap: float = Field(0.0, ge=0, description="a label (eV) at or below this is a metal")
    metal_cutoff: float = Field(0.25, ge=0, description="a predicted gap (eV) at or below this calls a metal")
    oracle: OracleConfig = OracleConfig()


class AutoencoderConfig(_Section):
    """The paper's composition autoencoder: 2 conv + FC -> latent; FC + 3 conv.

    The paper trains sigmoid cells with binary cross-entropy and Adam at a constant rate
    (``loss: bce, lr_schedule: constant, weight_decay: 0``). The defaults differ because they
    reconstruct held-out Exp1 formulas better in the same CPU time (98.0 % vs 95.3 % exact; BCE starts
    stuck at the all-absent matrix): a softmax over each element's counts, cosine annealing, AdamW.
    """

    latent_dim: int = Field(128, ge=2)
    channels: list[int] = Field(
        default_factory=lambda: [32, 64], min_length=2, max_length=2, description="encoder conv widths"
    )
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(128, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    lr_schedule: Literal["constant", "cosine"] = Field(
        "cosine", description="cosine: anneal the learning rate to 1% of its start over `epochs`"
    )
    loss: Literal["bce", "categorical", "ordinal"] = Field(
        "categorical",
        description=(
            "bce: sigmoid cells (the paper); categorical: softmax per element row; "
            "ordinal: one sigmoid per threshold count >= k"
        ),
    )
    input_code: Literal["one_hot", "thermometer"] = Field(
        "one_hot",
        description="encoder input: the one-hot matrix (the paper) or thermometer rows (count >= k set)",
    )
    nonzero_weight: float = Field(1.0, gt=0, description="loss weight of the set cells of present elements")
    weight_decay: float = Field(0.05, ge=0, description="decoupled weight decay (AdamW)")
    count_weight_power: float = Field(
        0.0,
        ge=0,
        description="present elements weigh (n_1 / n_k) ** power, n_k = training cells with count k",
    )
    latent_noise: float = Field(
        0.0,
        ge=0,
        description="training only: Gaussian latent noise, std as a fraction of each dim's batch std",
    )
    seed: int = 0
    patience: int | None = Field(20, ge=1, description="early stopping on validation loss (None: off)")
    device: str = "cpu"


class GanConfig(_Section):
    """MATGAN-style WGAN-GP on one-hot composition matrices."""

    training_data: str = Field(
        "../shared/data/formulas_icsd_in_mp_synthnn.csv",
        description="formula list (CSV/parquet) or 'prepared'",
    )
    max_count: int = Field(7, ge=1, description="matrix columns: counts 0..max_count (the paper's trim is 7)")
    noise_dim: int = Field(128, ge=1)
    epochs: int = Field(100, ge=1)
    batch_size: int = Field(256, ge=1)
    learning_rate: float = Field(1e-4, gt=0)
    n_critic: int = Field(5, ge=1)
    gp_weight: float = Field(10.0, ge=0)
    betas: tuple[float, float] = Field((0.5, 0.9), description="Adam betas (WGAN-GP defaults)")
    generator_hidden: list[int] = Field(default_factory=lambda: [256, 512], min_length=1)
    critic_hidden: list[int] = Field(default_factory=lambda: [512, 256], min_length=1)
    max_elements: int | None = Field(5, ge=1, description="training formulas with more elements are dropped")
    max_atoms: int | None = Field(20, ge=1, description="training formulas with more atoms are dropped")
    valid_only: bool = Field(
        True, description="train on smact-valid compositions only (novelty still uses all)"
    )
    output: Literal["gumbel", "argmax", "soft"] = Field(
        "gumbel",
        description="what the critic sees of the generator: drawn or most probable one-hot counts, or probabilities",
    )
    quality_samples: int = Field(1000, ge=0, description="samples per epoch for the quality metrics (0: off)")
    sample_temperature: float = Field(
        1.0,
        ge=0,
        description="gumbel count draws from probs ** (1 / T) when sampling (0: most probable count)",
    )
    entropy_weight: float = Field(
        0.0, ge=0, description="generator loss + this x mean entropy of the element rows (0: off)"
    )
    diversity_weight: float = Field(
        0.0,
        ge=0,
        description="generator loss - this x output distance / noise distance of sample pairs (0: off)",
    )
    generator_design: Literal["matrix", "slots"] = Field(
        "matrix",
        description="matrix: one count draw per element row; slots: elements picked one after another "
        "(each pick and its count conditioned on the earlier ones), up to `slots` elements",
    )
    slots: int = Field(5, ge=1, description="most elements a 'slots' generator picks")
    min_slots: int = Field(
        2, ge=1, description="fewest elements a 'slots' generator picks (2: no pure elements)"
    )
    charge_guide: Literal["off", "input", "mask", "valid"] = Field(
        "off",
        description="'slots' only: input: the generator sees which total charges its picks can reach "
        "(the validity check's oxidation states) and learns a bonus for neutralising picks; mask: also "
        "stops only when charge neutral, and its last pick must neutralise where one can; valid: as "
        "mask, counting only neutral states that also pass smact's Pauling electronegativity test",
    )
    relaxation: float = Field(
        0.0,
        ge=0,
        description="'slots' only: straight-through gradient via the Gumbel-softmax at this temperature "
        "(0: via the softmax probabilities)",
    )
    generator_ema: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="keep a running average of the generator weights with this decay per generator "
        "step, and sample and save the average (0: off, the last weights)",
    )
    seed: int = 0
    device: str = "cpu"

    @model_validator(mode="after")
    def _guide_needs_slots(self) -> GanConfig:
        if self.charge_guide != "off" and self.generator_design != "slots":
            raise ValueError("charge_guide works on the slots generator: set generator_design: slots")
        return self


class GenerateConfig(_Section):
    """Sampling from the trained GAN and the paper's trims."""

    n_samples: int = Field(1_180_000, ge=1)
    chunk_size: int = Field(100_000, ge=1)
    max_atoms: int = Field(20, ge=1)
    max_elements: int = Field(5, ge=1)
    max_atoms_per_element: int = Field(7, ge=1)
    seed: int = 0
    metrics_samples: int = Field(
        100_000, ge=0, description="samples used for the decodable/valid/unique/novel report"
    )
    n_jobs: int = Field(1, description="worker processes for the validity checks (<= 0: all cores)")
    merge_memory_mib: int = Field(
        256,
        ge=64,
        description="memory DuckDB may hold while merging the chunk files into one table; beyond it, it spills to disk",
    )


class AcquisitionConfig(_Section):
    """How a campaign picks latents: optimiser, acquisition function and search effort per round."""

    method: Literal["batch", "stock"] = Field(
        "batch", description="batch: BatchOptimizer; stock: BayesianOptimization.suggest() per point"
    )
    function: Literal["ucb", "ei", "straddle"] = Field(
        "ucb",
        description="ucb, ei: bayes_opt's upper confidence bound and expected improvement (seek the largest "
        "gaps); straddle: kappa * std - |mean - level| (seeks the boundary at `level`; batch method only)",
    )
    kappa: float = Field(
        2.576, ge=0, description="UCB (and straddle) exploration weight (bayes_opt's default)"
    )
    level: float = Field(
        6.0, description="eV; the straddle's level: the screening threshold whose boundary it seeks"
    )
    xi: float = Field(0.01, ge=0, description="EI improvement margin")
    seed: int = Field(0, ge=0)
    n_random: int = Field(1024, ge=0, description="uniform candidates in the box per pool")
    n_local: int = Field(1024, ge=0, description="candidates around the best registered points per pool")
    local_centres: int = Field(10, ge=1, description="how many of the best registered points are centres")
    local_radius: tuple[float, float] = Field(
        (0.01, 1.0),
        description="local candidates lie at log-uniform distances in this range of scales from their centre",
    )
    local_scale: float | None = Field(
        None,
        gt=0,
        description="the scale of local_radius: None, the GP length scale; a number, that fraction of the box diagonal "
        "(steadier when the length scale of a small or clustered set is far from the data's spacing)",
    )
    n_refine: int = Field(20, ge=0, description="greedily picked candidates polished by L-BFGS-B (0: none)")
    refine_maxiter: int = Field(30, ge=1, description="L-BFGS-B iterations of the joint polish")
    refine_radius: float = Field(
        1.0, gt=0, description="polish steps of all but the best start stay within this many length scales"
    )
    accept_chunk: int = Field(256, ge=1, description="candidates passed to accept() per call")
    max_extra_pools: int = Field(4, ge=0, description="fresh pools drawn when accept() rejects a whole pool")
    allow_duplicate_points: bool = False
    blas_threads: int | None = Field(
        1,
        ge=1,
        description="BLAS threads during a round (None: leave the process's setting); see the module docstring",
    )

    @model_validator(mode="after")
    def _has_candidates(self) -> AcquisitionConfig:
        if self.n_random + self.n_local == 0:
            raise ValueError("n_random + n_local must be positive")
        if not 0 < self.local_radius[0] <= self.local_radius[1]:
            raise ValueError(f"local_radius must be 0 < low <= high, got {self.local_radius}")
        return self


class SurrogateForestConfig(_Section):
    """The random forest that ranks a library campaign's candidates (``surrogate: forest``)."""

    n_estimators: int = Field(100, ge=2, description="trees; their spread is the std the acquisition reads")
    max_features: float = Field(0.3, gt=0, le=1, description="fraction of the 132 Magpie features per split")
    min_samples_leaf: int = Field(2, ge=1)
    n_jobs: int = Field(1, ge=1, description="threads for fitting and predicting (campaigns run in parallel)")
    shortlist: int | None = Field(
        None,
        ge=1,
        description="members each round ranks: the best this many of the last full ranking (None: every member, "
        "each round)",
    )
    refresh: int = Field(
        200, ge=1, description="with a shortlist: registered points between two full rankings of the library"
    )


class CampaignConfig(_Section):
    """One active-learning campaign: batch size, what may be suggested and what gets registered."""

    batch_size: int = Field(20, ge=1, description="suggestions per round (the paper: 20)")
    accept: list[Literal["decodable", "valid", "new"]] = Field(
        default_factory=lambda: ["valid", "new"],
        description="rules a latent must pass in the acquisition step: decodes to a formula; the formula is "
        "charge neutral and electronegativity balanced; it is not yet known to the campaign ([] = the paper)",
    )
    undecodable: Literal["skip", "penalty"] = Field(
        "skip",
        description="suggestions that decode to no formula: not registered (the paper) or registered at the penalty",
    )
    invalid: Literal["label", "skip", "penalty"] = Field(
        "label",
        description="decoded but chemically invalid: oracle-labelled and registered (the paper), skipped, or penalised",
    )
    penalty: float | None = Field(
        None, description="value registered for penalised points (None: lowest label so far)"
    )
    high_gap: float = Field(
        6.0, description="eV; labels above this count as high-gap hits in the round metrics"
    )
    al_set_valid_only: bool = Field(
        True, description="AL training sets take only chemically valid new formulas"
    )
    max_elements: int | None = Field(
        8,
        ge=1,
        description="decoded formulas with more elements are invalid without a smact search (data max: 8)",
    )
    max_atoms: int | None = Field(None, ge=1, description="... and with more atoms in the decoded formula")
    random_sampler: Literal["local", "box"] = Field(
        "local",
        description="random control: a registered latent plus Gaussian noise (local), or uniform in the box (box; "
        "such latents decode to 20-40 elements, almost never a valid formula)",
    )
    random_scale: float = Field(
        0.05, gt=0, description="local sampler: noise sd as a fraction of the box's span per dimension"
    )
    random_draws: int = Field(
        20000, ge=1, description="random control: most latents drawn per round to fill a batch under `accept`"
    )
    max_per_system: int | None = Field(
        None,
        ge=1,
        description="most new formulas the campaign registers per chemical system (element set): a system "
        "at the cap, counted at the start of each round, is refused in the acquisition step, so the budget "
        "spreads over chemistries (None: no cap; needs `accept` rules)",
    )
    cap_within_round: bool = Field(
        False,
        description="count a round's own picks toward max_per_system too, so no system passes the cap "
        "(false: finds are counted at the start of each round, and one round may put several picks into a "
        "system that was open; needs the `new` accept rule)",
    )
    search: Literal["latent", "candidates"] = Field(
        "latent",
        description="what the optimiser searches: the autoencoder's latent box, decoding each suggestion (latent, "
        "the paper), or the generator's valid candidates encoded into the same space (candidates: every suggestion "
        "is a candidate; the random control draws random candidates; needs the candidate table and the batch "
        "method, and polishing is off)",
    )
    surrogate: Literal["gp", "forest"] = Field(
        "gp",
        description="the model the acquisition reads: a GP on the latents (gp, the paper), or a random forest on "
        "the Magpie features of the formulas that ranks every library member each round, its trees' spread as "
        "the std (forest; needs search: candidates)",
    )
    surrogate_forest: SurrogateForestConfig = SurrogateForestConfig()
    acquisition: AcquisitionConfig = AcquisitionConfig()

    @model_validator(mode="after")
    def _candidates_need_the_batch_method(self) -> CampaignConfig:
        if self.search == "candidates" and self.acquisition.method != "batch":
            raise ValueError("search: candidates needs acquisition.method: batch")
        if self.surrogate == "forest" and self.search != "candidates":
            raise ValueError(
                "surrogate: forest ranks the members of the candidate library: it needs search: candidates"
            )
        return self

    @model_validator(mode="after")
    def _cap_needs_rules(self) -> CampaignConfig:
        if self.max_per_system is not None and not self.accept:
            raise ValueError(
                "max_per_system is enforced in the acquisition step, which `accept: []` (the paper) skips; "
                "give accept rules (e.g. [valid, new]) or set max_per_system: null"
            )
        if self.cap_within_round and self.max_per_system is None:
            raise ValueError("cap_within_round counts picks toward max_per_system, which is null: set a cap")
        if self.cap_within_round and "new" not in self.accept:
            raise ValueError(
                "cap_within_round tells a round's picks apart by their formulas, which the acquisition step "
                "gets with the `new` accept rule only: add it (e.g. accept: [valid, new])"
            )
        return self


class ExperimentSpec(_Section):
    """One of the paper's experiments: the initial samples and the suggestion budget."""

    name: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_.-]*$")
    n_initial: int = Field(ge=1, description="initial samples drawn from the prepared train/val rows")
    budget: int = Field(ge=1, description="suggestions after the initial samples")
    max_initial_gap: float | None = Field(
        None, description="eV; initial samples only below this gap (Exp4: 3)"
    )


def _paper_experiments() -> list[ExperimentSpec]:
    return [
        ExperimentSpec(name="Exp2", n_initial=1000, budget=1000),
        ExperimentSpec(name="Exp3", n_initial=300, budget=1000),
        ExperimentSpec(name="Exp4", n_initial=300, budget=1000, max_initial_gap=3.0),
    ]


class ExperimentsConfig(_Section):
    """The paper's experiments, repeated with different seeds, plus a random control and a kappa sweep."""

    repeats: int = Field(10, ge=1)
    seed: int = Field(0, ge=0, description="repeat r of experiment e uses seeds derived from (seed, e, r)")
    experiments: list[ExperimentSpec] = Field(default_factory=_paper_experiments)
    random_control: bool = Field(
        True, description="a random-latent campaign with the same initial samples and budget"
    )
    kappa_sweep: list[float] = Field(default_factory=lambda: [0.0, 1.0, 5.0, 10.0, 50.0, 100.0])
    kappa_experiment: str = Field("Exp3", description="experiment whose setup the kappa sweep uses")
    kappa_repeats: int = Field(3, ge=0, description="repeats of each kappa value (0: no sweep)")
    jobs: int = Field(1, ge=1, description="campaigns run at once (processes)")
    campaign: CampaignConfig = CampaignConfig()

    @model_validator(mode="after")
    def _names(self) -> ExperimentsConfig:
        names = [e.name for e in self.experiments]
        if len(set(names)) != len(names):
            raise ValueError(f"experiment names repeat: {names}")
        if self.kappa_sweep and self.kappa_repeats and self.kappa_experiment not in names:
            raise ValueError(f"kappa_experiment {self.kappa_experiment!r} is not one of {names}")
        return self


class GapWindowConfig(_Section):
    """A band-gap window in eV; a None bound is open; ``include_*`` says whether the bound itself is inside."""

    low: float | None = None
    high: float | None = None
    include_low: bool = True
    include_high: bool = True

    @model_validator(mode="after")
    def _ordered(self) -> GapWindowConfig:
        if self.low is None and self.high is None:
            raise ValueError("a window needs low, high or both")
        if self.low is not None and self.high is not None and self.low > self.high:
            raise ValueError(f"low ({self.low:g}) is above high ({self.high:g})")
        return self


def _screening_windows() -> dict[str, GapWindowConfig]:
    return {
        "gt6": GapWindowConfig(low=6.0, include_low=False),
        "2-4": GapWindowConfig(low=2.0, high=4.0),
    }


def _screening_roost() -> RoostConfig:
    return RoostConfig(
        ensemble_size=1, epochs=80, batch_size=128, learning_rate=2e-3, loss="l1", elem_fea_len=32, n_graph=2,
        elem_heads=1, cry_heads=1, hidden=64, trunk_hidden=[128], out_hidden=[64, 32], patience=None, num_threads=1,
    )  # fmt: skip


class ModelLimit(_Section):
    """Which groups a screening model trains on: the first ``repeats`` repeats, these ``training_sets`` (None: all)."""

    repeats: int | None = Field(None, ge=1)
    training_sets: list[str] | None = None


class ScreeningConfig(_Section):
    """Screening models (Table 1 of the paper) trained on every experiment's training sets, judged against the oracle."""

    models: list[Literal["forest", "roost"]] = Field(
        default_factory=lambda: ["forest", "roost"], min_length=1
    )
    limits: dict[Literal["forest", "roost"], ModelLimit] = Field(
        default_factory=dict,
        description="restrict a (slow) model to the first N repeats and/or some training sets, e.g. "
        "{roost: {repeats: 3, training_sets: [BS, AL, random]}}",
    )
    seed: int = Field(
        0, ge=0, description="split and model seeds of a group derive from (seed, experiment, repeat, set)"
    )
    holdout_fraction: float = Field(
        0.2, gt=0, lt=1, description="rows of a training set kept out to score the model"
    )
    refit_all: bool = Field(
        False,
        description="screen with a model refit on all rows of the set (scores stay those of the hold-out model)",
    )
    windows: dict[str, GapWindowConfig] = Field(default_factory=_screening_windows)
    hit_windows: list[str] | None = Field(None, description="windows whose hits are written (None: all)")
    check_margins: list[float] = Field(
        default_factory=list,
        description="eV; for each margin, Table 1 again after the oracle (DFT in a real campaign) checks every "
        "candidate a screener puts inside its hit window widened by the margin that the training set does "
        "not label: what the check costs and recovers. Each screener then stores its near-misses too "
        "([]: off; setting it retrains every screener)",
    )
    domain_min_rows: list[int] = Field(
        default_factory=list,
        description="for each k, Table 1 again (the model alone, and with the set's labels kept) without the "
        "model's calls on candidates one of whose elements occurs in fewer than k formulas of the screener's "
        "training set: an applicability domain by element. Read from the stored hits, so setting it "
        "retrains nothing ([]: off)",
    )
    valid_only: bool = Field(
        True, description="screen only charge-neutral, electronegativity-balanced candidates"
    )
    novel_only: bool = Field(
        False, description="screen only candidates absent from the generator's training data"
    )
    max_candidates: int | None = Field(
        None, ge=1, description="screen only the first N candidates (None: all)"
    )
    chunk_size: int = Field(50_000, ge=1, description="candidates featurised and predicted at a time")
    groups_per_pass: int = Field(
        8, ge=1, description="models trained, then screened together in one pass over the candidates"
    )
    train_jobs: int = Field(
        1, ge=1, description="screening models trained at once, one process each (1: in this process)"
    )
    screen_jobs: int = Field(
        1,
        ge=1,
        description="cached candidate parts screened at once, one process each (1: in this process)",
    )
    predict_unknown_elements: bool = Field(
        True,
        description="predict candidates with elements absent from a model's training set (False: no hit)",
    )
    forest: ForestConfig = ForestConfig(n_estimators=100, max_features=0.3, min_samples_leaf=2, n_jobs=1)
    roost: RoostConfig = Field(default_factory=_screening_roost)

    @model_validator(mode="after")
    def _known_windows(self) -> ScreeningConfig:
        for name in self.windows:
            if not name or not all(ch.isalnum() or ch in "-_." for ch in name):
                raise ValueError(f"window name {name!r}: use letters, digits, '-', '_' or '.'")
        unknown = sorted(set(self.hit_windows or ()) - set(self.windows))
        if unknown:
            raise ValueError(f"hit_windows {unknown} are not among the windows {sorted(self.windows)}")
        bad = [m for m in self.check_margins if not (m > 0 and math.isfinite(m))]
        if bad or len(set(self.check_margins)) != len(self.check_margins):
            raise ValueError(f"check_margins {self.check_margins}: give distinct positive numbers of eV")
        if any(k < 1 for k in self.domain_min_rows) or len(set(self.domain_min_rows)) != len(
            self.domain_min_rows
        ):
            raise ValueError(
                f"domain_min_rows {self.domain_min_rows}: give distinct positive numbers of formulas"
            )
        return self


class StructuresConfig(_Section):
    """Template structures for candidate formulas: nearest same-pattern template by ElMD, then substitution."""

    hits: str = Field("data/screening/hits.parquet", description="screening hits (formula list input)")
    gap_window: str | None = Field(None, description="take only hits of this band-gap window (None: all)")
    max_candidates: int | None = Field(
        200, ge=1, description="most unique reduced formulas taken (None: all)"
    )
    template_sources: list[str] = Field(
        default_factory=lambda: [
            "../shared/data/structures_mp40_chemeleon.csv.gz",
            "../shared/data/structures_mp20_diffhedron.csv.gz",
        ],
        description="CSV/parquet files with a CIF column; missing files are skipped with a warning",
    )
    mp_templates: Literal["off", "auto", "on"] = Field(
        "auto", description="add Materials Project templates via mp-api (auto: when MP_API_KEY is set)"
    )
    max_e_above_hull: float | None = Field(
        0.1, ge=0, description="drop templates less stable than this (eV/atom)"
    )
    metric: str = Field("mod_petti", description="ElMD metric")
    max_template_tries: int = Field(3, ge=1, description="next-nearest templates tried when a CIF is corrupt")
    volume_scaling: Literal["atomic_radius", "none"] = "atomic_radius"


class EnergyConfig(_Section):
    """CHGNet relaxation of substituted structures and formation energy against relaxed elements."""

    steps: int = Field(500, ge=1, description="most relaxation steps per structure")
    fmax: float = Field(0.1, gt=0, description="force threshold (eV/A) for convergence")
    relax_cell: bool = True
    optimizer: Literal["FIRE", "BFGS", "LBFGS"] = "FIRE"
    formation_energy_max: float = Field(
        0.0, description="keep candidates below this formation energy (eV/atom)"
    )
    formation_energy_min: float = Field(
        -6.0,
        description="below this (eV/atom) a relaxed energy is unphysical (no known compound is below about -4.5)",
    )
    reference_starts: list[Literal["known", "fcc", "bcc", "hcp", "diamond", "dimer"]] = Field(
        default_factory=lambda: ["known", "fcc", "bcc", "hcp", "diamond", "dimer"],
        description="starting cells relaxed for each elemental reference (known: elemental templates; dimer: gases)",
    )
    num_threads: int | None = Field(1, ge=1, description="torch threads (None: torch's default)")
    device: str = "cpu"


class VaspConfig(_Section):
    """VASP input export with pymatgen's Materials Project input sets."""

    psp_dir: str | None = Field(
        None, description="POTCAR directory (PMG_VASP_PSP_DIR layout); None: write POTCAR.spec only"
    )
    static: bool = Field(True, description="also write a static / band-gap calculation (MPStaticSet)")
    user_incar_settings: dict[str, float | int | str | bool] = Field(default_factory=dict)


class Params(_Section):
    data: DataConfig = DataConfig()
    prepare: PrepareConfig = PrepareConfig()
    encoding: EncodingConfig = EncodingConfig()
    validity: ValidityConfig = ValidityConfig()
    tracking: TrackingConfig = TrackingConfig()
    catalog: CatalogConfig = CatalogConfig()
    oracle: OracleConfig = OracleConfig()
    metals_oracle: MetalsOracleConfig = MetalsOracleConfig()
    autoencoder: AutoencoderConfig = AutoencoderConfig()
    gan: GanConfig = GanConfig()
    generate: GenerateConfig = GenerateConfig()
    experiments: ExperimentsConfig = ExperimentsConfig()
    screening: ScreeningConfig = ScreeningConfig()
    structures: StructuresConfig = StructuresConfig()
    energy: EnergyConfig = EnergyConfig()
    vasp: VaspConfig = VaspConfig()


def find_project_root(start: Path | None = None) -> Path:
    """The nearest folder at or above ``start`` (default: cwd) holding params.yaml, else ``start``."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "params.yaml").is_file():
            return folder
    return here


def _format_error(source: str, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"{source}: {loc}: {err['msg']}")
    return "\n".join(lines)


def params_from_dict(raw: dict | None, source: str = "params") -> Params:
    """Validate a dict (e.g. parsed YAML) into Params; ConfigError names every bad field."""
    try:
        return Params.model_validate(raw or {})
    except ValidationError as exc:
        raise ConfigError(_format_error(source, exc)) from None


def load_params(path: str | os.PathLike | None = None) -> Params:
    """Read params.yaml (default: the project root's); a missing file gives the defaults."""
    file = Path(path) if path is not None else find_project_root() / "params.yaml"
    if not file.exists():
        if path is not None:
            raise ConfigError(f"{file}: no such parameter file")
        return Params()
    try:
        raw = yaml.safe_load(file.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file}: not valid YAML: {exc}") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{file}: expected a mapping of sections, got {type(raw).__name__}")
    return params_from_dict(raw, str(file.name))
