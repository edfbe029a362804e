"""Shared fixtures. Data tests read ../shared/data beside the clone and skip when it is absent."""

from __future__ import annotations

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
