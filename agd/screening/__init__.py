"""Screening: models trained on each experiment's training sets screen the generated candidates (Table 1)."""

from agd.screening.metrics import aggregate_table1, recovery_metrics, table1_markdown, window_mask
from agd.screening.screen import ScreeningError, run_screening_stage

__all__ = [
    "ScreeningError",
    "aggregate_table1",
    "recovery_metrics",
    "run_screening_stage",
    "table1_markdown",
    "window_mask",
]
