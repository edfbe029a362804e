"""Shared fixtures. Data tests read ../shared/data beside the clone and skip when it is absent."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The offline data folder ../shared/data; skip the test when it is not there."""
    if not (SHARED_DATA / "mp_gap_by_composition.csv").is_file():
        pytest.skip(f"offline data folder {SHARED_DATA} is absent (it sits beside the clone in CI)")
    return SHARED_DATA


def read_shared_csv(path: Path, **kwargs) -> pd.DataFrame:
    """Read a shared CSV keeping the formula 'NaN' (sodium nitride) as text."""
    return pd.read_csv(path, keep_default_na=False, **kwargs)


#: rows of the paper's Exp1 set behind the campaign fixture's models
CAMPAIGN_ROWS = 3000


@dataclass(frozen=True)
class CampaignModels:
    """Paths of the tiny real models the campaign tests run on."""

    prepared: Path
    autoencoder: Path
    oracle: Path


@pytest.fixture(scope="session")
def campaign_models(shared_data, tmp_path_factory) -> CampaignModels:
    """Prepared Exp1 rows, a small autoencoder (latent 16) and a 30-tree forest oracle, saved as the stages do.

    Session-wide, here rather than in tests/active: the Ray and team-mode tests use the same models, and a
    fixture imported into another module is built once more there.
    """
    import numpy as np
    import torch

    from agd.config import AutoencoderConfig, EncodingConfig, ForestConfig, PrepareConfig
    from agd.data.prepare import prepare_dataset, write_prepared
    from agd.models.autoencoder import run_autoencoder_stage
    from agd.models.forest import train_forest

    root = tmp_path_factory.mktemp("campaign_models")
    df = read_shared_csv(shared_data / "mp_gap_agd_exp1.csv", nrows=CAMPAIGN_ROWS)
    raw = pd.DataFrame(
        {"row": np.arange(1, len(df) + 1), "formula": df["composition"], "band_gap": df["band_gap"]}
    )
    prepared = write_prepared(prepare_dataset(raw, PrepareConfig(seed=0)), root / "prepared")["dataset"]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = AutoencoderConfig(  # params.yaml's loss and input code
            latent_dim=16, channels=[16, 32], epochs=25, batch_size=64, learning_rate=1e-2,
            lr_schedule="constant", loss="ordinal", input_code="thermometer", nonzero_weight=10,
            weight_decay=0.0, patience=None,
        )  # fmt: skip
        run_autoencoder_stage(prepared, root / "autoencoder", EncodingConfig(max_count=20), cfg)
    finally:
        torch.set_num_threads(before)
    table = pd.read_parquet(prepared)
    forest = train_forest(
        table["reduced_formula"].tolist(),
        table["band_gap"].to_numpy(),
        ForestConfig(n_estimators=30, n_jobs=1),
    )
    forest.save(root / "oracle" / "forest.joblib")
    return CampaignModels(Path(prepared), root / "autoencoder", root / "oracle")
