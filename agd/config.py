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


class DataConfig(_Section):
    """Where the raw band-gap table comes from."""

    source: Literal["auto", "mp", "matbench", "local"] = "auto"
    path: str | None = Field(None, description="local CSV/parquet; the AGD_DATA environment variable overrides")
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


class Params(_Section):
    data: DataConfig = DataConfig()
    prepare: PrepareConfig = PrepareConfig()
    encoding: EncodingConfig = EncodingConfig()
    validity: ValidityConfig = ValidityConfig()
    tracking: TrackingConfig = TrackingConfig()
    catalog: CatalogConfig = CatalogConfig()


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
