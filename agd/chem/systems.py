"""Chemical systems (element sets) of formulas: what a campaign's per-system cap counts.

Kept apart from :mod:`agd.active.campaign` so that readers of the catalog (the dashboard) can count
systems without loading the campaign's models.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from agd.chem.formula import FormulaError, parse_formula


def chemical_system(formula: str | None) -> frozenset[str]:
    """The element set of a formula; empty for none or one that does not parse."""
    if not formula:
        return frozenset()
    try:
        return frozenset(parse_formula(formula))
    except FormulaError:
        return frozenset()


def system_counts(formulas: Iterable[str | None]) -> Counter[frozenset[str]]:
    """How many of ``formulas`` fall in each chemical system (formulas without one left out)."""
    counts = Counter(chemical_system(formula) for formula in formulas)
    counts.pop(frozenset(), None)
    return counts
