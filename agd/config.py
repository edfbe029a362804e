"""params.yaml -> typed, validated configuration.

Every section of ``params.yaml`` has a model here. Unknown keys and wrong types are errors that name
the field (``params.yaml: prepare.split.train: Input should be a valid number``), so a typo never
silently falls back to a default.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


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


class TrackingConfig(_Section):
    """MLflow; MLFLOW_TRACKING_URI overrides ``uri``; None means sqlite:///mlflow.db at the project root."""

    uri: str | None = None
    experiment_prefix: str = "agd"


class CatalogConfig(_Section):
    path: str = "agd.duckdb"


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
    metals_dataset: str | None = Field(
        None,
        description="a second dataset including metals (e.g. mp_gap_by_composition.csv) for a metal-aware oracle",
    )


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
    loss: Literal["bce", "categorical"] = Field(
        "categorical", description="bce: sigmoid cells (the paper); categorical: softmax per element row"
    )
    nonzero_weight: float = Field(1.0, gt=0, description="loss weight of the set cells of present elements")
    weight_decay: float = Field(0.05, ge=0, description="decoupled weight decay (AdamW)")
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
    seed: int = 0
    device: str = "cpu"


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


class AcquisitionConfig(_Section):
    """How a campaign picks latents: optimiser, acquisition function and search effort per round."""

    method: Literal["batch", "stock"] = Field(
        "batch", description="batch: BatchOptimizer; stock: BayesianOptimization.suggest() per point"
    )
    function: Literal["ucb", "ei"] = "ucb"
    kappa: float = Field(2.576, ge=0, description="UCB exploration weight (bayes_opt's default)")
    xi: float = Field(0.01, ge=0, description="EI improvement margin")
    seed: int = Field(0, ge=0)
    n_random: int = Field(1024, ge=0, description="uniform candidates in the box per pool")
    n_local: int = Field(1024, ge=0, description="candidates around the best registered points per pool")
    local_centres: int = Field(10, ge=1, description="how many of the best registered points are centres")
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
        return self


class Params(_Section):
    data: DataConfig = DataConfig()
    prepare: PrepareConfig = PrepareConfig()
    encoding: EncodingConfig = EncodingConfig()
    validity: ValidityConfig = ValidityConfig()
    tracking: TrackingConfig = TrackingConfig()
    catalog: CatalogConfig = CatalogConfig()
    oracle: OracleConfig = OracleConfig()
    autoencoder: AutoencoderConfig = AutoencoderConfig()
    gan: GanConfig = GanConfig()
    generate: GenerateConfig = GenerateConfig()


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
