"""Studies behind the settings of ``params.yaml``: each writes a markdown report under ``reports/``."""

from pathlib import Path


def emit(text: str, out: str | Path | None = None) -> None:
    """Print a study's report and, when ``out`` is given, write it there too."""
    print(text)
    if out:
        Path(out).write_text(text)
