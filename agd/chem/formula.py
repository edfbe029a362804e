"""Parse and normalise chemical formulas.

A formula string becomes a mapping element -> integer count. Fractional formulas are scaled to
integers when a small multiplier makes every amount integral within a tolerance; otherwise they are
rejected. The composition key used for joins and duplicate checks (``reduced_formula``) follows the
convention of the shared datasets: pymatgen's ``Composition.reduced_composition.formula`` with the
spaces removed and counts of 1 left out (``K4Mn4O8 -> KMnO2``).
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache, reduce

from pymatgen.core import Composition, Element

#: Counts of 1 are dropped from keys: "Na1Cl1" -> "NaCl" (but "Cl10" keeps its digits).
_COUNT_ONE = re.compile(r"(?<=[A-Za-z])1(?![0-9.])")
#: An element symbol followed by an explicit zero amount ("Fe0O", "Fe0.0O"); pymatgen drops these silently.
_ZERO_AMOUNT = re.compile(r"[A-Z][a-z]?(?:0+(?:\.0*)?|\.0+)(?![0-9.])")
#: A plain formula without brackets, charges or separators: the fast path.
_PLAIN = re.compile(r"^(?:[A-Z][a-z]?\d*)+$")
_TOKEN = re.compile(r"([A-Z][a-z]?)(\d*)")


class FormulaError(ValueError):
    """A formula that cannot be turned into an integer composition; the message is the reason.

    ``code`` is a short category for counting rejects: empty, not_text, unknown_element, zero_amount,
    unparsable, non_positive, fractional.
    """

    def __init__(self, message: str, code: str = "unparsable") -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class FormulaRules:
    """How strict parsing is: tolerance and largest multiplier for fractional amounts."""

    integer_tolerance: float = 1e-4
    max_multiplier: int = 24


DEFAULT_RULES = FormulaRules()


def _integral_counts(amounts: Mapping[str, float], rules: FormulaRules) -> dict[str, int]:
    """Scale fractional amounts by the smallest multiplier that makes them integral, or raise."""
    values = list(amounts.values())
    for multiplier in range(1, rules.max_multiplier + 1):
        scaled = [v * multiplier for v in values]
        if all(abs(s - round(s)) <= rules.integer_tolerance for s in scaled):
            counts = {el: int(round(v * multiplier)) for el, v in amounts.items()}
            if any(c <= 0 for c in counts.values()):
                break
            return counts
    shown = ", ".join(f"{el}{v:g}" for el, v in amounts.items())
    raise FormulaError(
        f"fractional composition {shown} cannot be made integral "
        f"(multiplier <= {rules.max_multiplier}, tolerance {rules.integer_tolerance:g})",
        "fractional",
    )


# bounded: a full cache of distinct formulas costs ~0.5 KiB each
@lru_cache(maxsize=262_144)
def _parse_cached(text: str, rules: FormulaRules) -> tuple[tuple[str, int], ...]:
    counts = _parse_uncached(text, rules)
    return tuple(counts.items())


def _parse_uncached(text: str, rules: FormulaRules) -> dict[str, int]:
    stripped = text.strip()
    if not stripped:
        raise FormulaError("empty formula", "empty")
    if _PLAIN.match(stripped):
        # Fast path: plain formulas with integer counts need no pymatgen round trip.
        counts: dict[str, int] = {}
        for symbol, digits in _TOKEN.findall(stripped):
            counts[symbol] = counts.get(symbol, 0) + (int(digits) if digits else 1)
        unknown = [s for s in counts if not Element.is_valid_symbol(s)]
        if unknown:
            raise FormulaError(f"unknown element {unknown[0]!r}", "unknown_element")
        zero = [s for s, c in counts.items() if c == 0]
        if zero:
            raise FormulaError(f"zero amount for element {zero[0]}", "zero_amount")
        return _canonical_symbols(counts)
    zero = _ZERO_AMOUNT.search(stripped)
    if zero:
        raise FormulaError(f"zero amount in {zero.group(0)!r}", "zero_amount")
    try:
        comp = Composition(stripped)
    except Exception as exc:  # pymatgen raises ValueError, KeyError, etc. for garbage
        raise FormulaError(f"unparsable formula: {exc}") from None
    amounts: dict[str, float] = {}
    for species, amount in comp.items():
        if not isinstance(species, Element):
            raise FormulaError(f"unknown element {str(species).rstrip('0+-')!r}", "unknown_element")
        if not math.isfinite(amount) or amount <= 0:
            raise FormulaError(f"non-positive amount for {species.symbol}", "non_positive")
        amounts[species.symbol] = amounts.get(species.symbol, 0.0) + float(amount)
    if not amounts:
        raise FormulaError("formula has no elements", "empty")
    return _integral_counts(amounts, rules)


def _canonical_symbols(counts: dict[str, int]) -> dict[str, int]:
    # D and T are isotopes that pymatgen maps to H; do the same so keys agree with the slow path.
    if "D" in counts or "T" in counts:
        merged: dict[str, int] = {}
        for symbol, count in counts.items():
            key = "H" if symbol in ("D", "T") else symbol
            merged[key] = merged.get(key, 0) + count
        return merged
    return counts


def parse_formula(text: str, rules: FormulaRules = DEFAULT_RULES) -> dict[str, int]:
    """Parse one formula into element -> positive integer count; raise FormulaError with the reason."""
    if text is None or (isinstance(text, float) and math.isnan(text)):
        raise FormulaError("missing formula", "empty")
    if not isinstance(text, str):
        raise FormulaError(f"formula is not text: {text!r}", "not_text")
    return dict(_parse_cached(text, rules))


def reduce_counts(counts: Mapping[str, int]) -> dict[str, int]:
    """Divide integer counts by their greatest common divisor."""
    divisor = reduce(math.gcd, counts.values())
    return {el: c // divisor for el, c in counts.items()}


@lru_cache(maxsize=262_144)
def _key_cached(items: tuple[tuple[str, int], ...]) -> str:
    with warnings.catch_warnings():
        # pymatgen warns about missing electronegativities (noble gases) while ordering elements
        warnings.simplefilter("ignore", UserWarning)
        formula = Composition(dict(items)).reduced_composition.formula
    return _COUNT_ONE.sub("", formula.replace(" ", ""))


def reduced_formula(counts: Mapping[str, int]) -> str:
    """The composition key: pymatgen's reduced formula, no spaces, no counts of 1."""
    return _key_cached(tuple(sorted(counts.items())))


def formula_key(text: str, rules: FormulaRules = DEFAULT_RULES) -> str:
    """Parse a formula and return its composition key; raise FormulaError on bad input."""
    return reduced_formula(parse_formula(text, rules))


def parse_many(
    formulas: Iterable[object], rules: FormulaRules = DEFAULT_RULES
) -> tuple[list[dict[str, int] | None], list[str | None]]:
    """Parse many formulas; bad ones give ``None`` and a reason instead of raising."""
    parsed: list[dict[str, int] | None] = []
    reasons: list[str | None] = []
    for text in formulas:
        try:
            parsed.append(parse_formula(text, rules))  # type: ignore[arg-type]
            reasons.append(None)
        except FormulaError as exc:
            parsed.append(None)
            reasons.append(str(exc))
    return parsed, reasons


def counts_to_formula(counts: Mapping[str, int]) -> str:
    """Write counts as a compact formula in the given element order (``{'Na': 1, 'Cl': 1} -> 'NaCl'``)."""
    return "".join(f"{el}{c if c != 1 else ''}" for el, c in counts.items())
