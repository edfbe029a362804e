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


def system_spread(formulas: Iterable[str | None], high: Iterable[bool]) -> dict[str, int]:
    """How a set of finds spreads over chemical systems, each formula parsed once: the finds, their systems,
    the finds flagged in ``high`` (e.g. above a band gap), their systems, and the most finds in one system.
    A formula without a system counts as a find but in no system."""
    per_find = [chemical_system(formula) for formula in formulas]
    flags = [bool(flag) for flag in high]
    if len(flags) != len(per_find):
        raise ValueError(f"{len(per_find)} formulas but {len(flags)} high-gap flags")
    counts = Counter(system for system in per_find if system)
    return {
        "finds": len(per_find),
        "systems": len(counts),
        "high_gap": sum(flags),
        "high_gap_systems": len(
            {system for system, flag in zip(per_find, flags, strict=True) if system and flag}
        ),
        "most_in_one_system": max(counts.values(), default=0),
    }
