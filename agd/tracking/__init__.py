"""Run tracking and the DuckDB catalog over the pipeline's outputs."""
