"""Charge neutrality and electronegativity balance (smact), batched and cached.

The chemistry is smact's: oxidation states and Pauling electronegativities come from ``smact.Element``,
charge balance from ``smact.neutral_ratios`` and the electronegativity rule from
``smact.screening.pauling_test``. The loop over oxidation-state combinations follows
``smact.screening.smact_validity`` (same stoichiometry threshold, same fast paths for single elements
and, when asked, all-metal alloys), with one difference: it records both checks in one pass, so a
composition is reported as "charge neutral but electronegativity not balanced" rather than just
"invalid". ``valid`` equals ``smact_validity(formula, use_pauling_test=..., include_alloys=...,
oxidation_states_set=...)`` for compositions of at least ``min_elements`` distinct elements (default 2:
smact passes every pure element, and a generator that proposes Mg has found no new compound); the
tests pin that on real formulas.

Work is done once per unique input string and once per composition: ``Fe2O3`` and ``Fe4O6`` share
one evaluation, cached by reduced formula inside the checker (picklable, and savable to parquet).
Generated sets are mostly duplicates, so the per-row cost is a hash lookup and a numpy ``take``.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from importlib.metadata import version
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import smact
from smact.data_loader import lookup_element_oxidation_states_custom
from smact.screening import pauling_test

from agd.chem.formula import FormulaError, counts_to_formula, parse_formula, reduce_counts, reduced_formula
from agd.config import ConfigError, ValidityConfig

#: smact's named oxidation-state sets -> the ``smact.Element`` attribute holding them
#: (the same names ``smact.screening.smact_validity`` accepts; a path to a smact-format file also works).
OXIDATION_STATE_SETS: dict[str, str] = {
    "icsd24": "oxidation_states_icsd24",
    "icsd16": "oxidation_states_icsd16",
    "smact14": "oxidation_states_smact14",
    "pymatgen_sp": "oxidation_states_sp",
    "wiki": "oxidation_states_wiki",
}

COLUMNS = ["formula", "reduced_formula", "charge_neutral", "electronegativity_balanced", "valid", "reason"]

#: Below this many new compositions a process pool costs more to start than it saves.
_MIN_PARALLEL = 4000
#: Items per task sent to a worker: small enough to balance the load, large enough to amortise pickling.
_BATCH = 2000
#: The memo of seen inputs is cleared beyond this many entries (about 100 bytes each).
_MAX_INPUTS = 2_000_000
_CACHE_META_KEY = b"agd_validity"
#: Above this many oxidation-state combinations the zero-charge search walks depth-first instead of
#: building the whole product as one numpy array (8 bytes per combination).
_MAX_DENSE_COMBINATIONS = 2_000_000
#: Charge-neutral combinations tried against the Pauling test before a composition is given up on.
_MAX_NEUTRAL_COMBINATIONS = 200_000
_METALS = frozenset(smact.metals)
_SYMBOL = re.compile(r"^[A-Z][a-z]?$")


class ElementData(NamedTuple):
    """What the checks need from smact about one element."""

    oxidation_states: tuple[int, ...] | None  # None: no states in the chosen set
    electronegativity: float | None  # Pauling; None for He, Ne, Ar, Rn, ...
    known: bool  # False: smact has no data (Z > 103)


class Evaluation(NamedTuple):
    """The two checks for one composition; ``missing`` names data smact lacks (else None)."""

    charge_neutral: bool
    electronegativity_balanced: bool
    missing: str | None


def evaluate_composition(
    counts: Sequence[tuple[str, int]], elements: Mapping[str, ElementData], set_name: str
) -> Evaluation:
    """Run smact's charge-neutrality and Pauling tests on one composition ((symbol, count) pairs)."""
    if len(counts) == 1:
        # smact_validity: a single element is always valid (its oxidation state is 0)
        return Evaluation(True, True, None)
    divisor = math.gcd(*(count for _, count in counts))
    if divisor > 1:  # smact_validity reduces first; neutral_ratios only reports ratios with gcd 1
        counts = [(symbol, count // divisor) for symbol, count in counts]
    data = [elements[symbol] for symbol, _ in counts]
    for (symbol, _), el in zip(counts, data, strict=True):
        if not el.known:
            return Evaluation(False, False, f"element {symbol} has no data in smact")
        if not el.oxidation_states:
            return Evaluation(False, False, f"element {symbol} has no oxidation states in set {set_name}")
    stoichs = [(count,) for _, count in counts]
    threshold = max(count for _, count in counts)
    enegs = [el.electronegativity for el in data]
    neutral = False
    candidates = _charge_balanced_candidates([el.oxidation_states for el in data], [c for _, c in counts])
    for examined, states in enumerate(candidates):
        if examined >= _MAX_NEUTRAL_COMBINATIONS:
            # only compositions with very many elements get here; smact itself would run for hours
            return Evaluation(
                True,
                False,
                f"stopped after {_MAX_NEUTRAL_COMBINATIONS:,} charge-neutral oxidation-state combinations",
            )
        if not smact.neutral_ratios(states, stoichs=stoichs, threshold=threshold):
            continue
        neutral = True
        try:
            balanced = pauling_test(states, enegs)
        except TypeError:  # as smact_validity: an uncomparable electronegativity does not fail the test
            balanced = True
        if balanced:
            return Evaluation(True, True, None)
    if neutral:
        no_eneg = [
            symbol for (symbol, _), el in zip(counts, data, strict=True) if el.electronegativity is None
        ]
        if no_eneg:
            return Evaluation(True, False, f"element {no_eneg[0]} has no Pauling electronegativity")
    return Evaluation(neutral, False, None)


def _charge_balanced_candidates(
    states: list[tuple[int, ...]], counts: list[int]
) -> Iterator[tuple[int, ...]]:
    """The oxidation-state combinations whose total charge is zero, in ``itertools.product`` order.

    A pre-filter only: smact still decides on every combination returned. With one stoichiometry per
    site, ``neutral_ratios`` can only succeed where sum(state * count) == 0, so the other combinations
    (typically >95%) need not go through it one Python call at a time. Small searches use one numpy
    outer sum; large ones (many elements: the product can exceed memory) walk the product depth-first,
    pruned by the charges the remaining elements can still reach, so memory stays small.
    """
    n_combos = 1
    for options in states:
        n_combos *= len(options)
    if n_combos <= 8:
        yield from itertools.product(*states)
        return
    if n_combos > _MAX_DENSE_COMBINATIONS:
        yield from _neutral_depth_first(states, counts)
        return
    total = np.zeros((), dtype=np.int64)
    for options, count in zip(states, counts, strict=True):
        total = np.add.outer(total, np.asarray(options, dtype=np.int64) * count)
    hits = np.flatnonzero(total == 0)  # C order == itertools.product order
    for row in np.stack(np.unravel_index(hits, total.shape), axis=1).tolist():
        # lazily: the caller stops at the first combination that also passes the Pauling test
        yield tuple(options[i] for options, i in zip(states, row, strict=True))


def _neutral_depth_first(states: list[tuple[int, ...]], counts: list[int]) -> Iterator[tuple[int, ...]]:
    """Zero-charge combinations in product order without materialising the product."""
    charges = [[state * count for state in options] for options, count in zip(states, counts, strict=True)]
    # reachable[i]: every total charge elements i.. can contribute
    reachable: list[set[int]] = [set() for _ in range(len(states) + 1)]
    reachable[-1] = {0}
    for i in range(len(states) - 1, -1, -1):
        reachable[i] = {c + rest for c in charges[i] for rest in reachable[i + 1]}
    chosen: list[int] = []

    def walk(i: int, partial: int) -> Iterator[tuple[int, ...]]:
        if i == len(states):
            yield tuple(chosen)
            return
        for state, charge in zip(states[i], charges[i], strict=True):
            if -(partial + charge) in reachable[i + 1]:
                chosen.append(state)
                yield from walk(i + 1, partial + charge)
                chosen.pop()

    yield from walk(0, 0)


#: (reduced formula or None, reason or None, reduced counts as (symbol, count) pairs or None)
_Prepared = tuple[str | None, str | None, tuple[tuple[str, int], ...] | None]


def _prepare_texts(texts: Sequence[object]) -> list[_Prepared]:
    """Parse unique inputs into composition keys (the first unit of work sent to a worker)."""
    out: list[_Prepared] = []
    for text in texts:
        try:
            counts = reduce_counts(parse_formula(text))  # type: ignore[arg-type]
        except FormulaError as exc:
            out.append((None, f"unparsable: {exc}", None))
            continue
        out.append((reduced_formula(counts), None, tuple(counts.items())))
    return out


def _prepare_items(items: Sequence[tuple[tuple[object, object], ...] | None]) -> list[_Prepared]:
    """As ``_prepare_texts`` for compositions given as sorted (symbol, count) pairs."""
    out: list[_Prepared] = []
    for item in items:
        try:
            counts = reduce_counts(_counts_from_item(item))
        except FormulaError as exc:
            out.append((None, f"unparsable: {exc}", None))
            continue
        out.append((reduced_formula(counts), None, tuple(counts.items())))
    return out


def _map_batches(pool: ProcessPoolExecutor | None, func, items: Sequence, *args) -> list:
    """``func(items, *args)``, split into batches across the workers when there is a pool."""
    if pool is None or not items:
        return func(items, *args)
    batches = [items[i : i + _BATCH] for i in range(0, len(items), _BATCH)]
    parts = pool.map(func, batches, *(itertools.repeat(arg) for arg in args))
    return [result for part in parts for result in part]


def _evaluate_batch(
    keys: Sequence[tuple[tuple[str, int], ...]], elements: Mapping[str, ElementData], set_name: str
) -> list[Evaluation]:
    """Evaluate many compositions (the unit of work sent to a worker process)."""
    return [evaluate_composition(key, elements, set_name) for key in keys]


class ValidityChecker:
    """smact validity of formulas, batched, de-duplicated and cached by reduced formula.

    ``n_jobs > 1`` (or ``-1`` for every core) parses and evaluates new compositions in a process pool
    when a call brings at least a few thousand of them; cached ones never leave this process.
    """

    def __init__(self, config: ValidityConfig | None = None, n_jobs: int = 1) -> None:
        self.config = config if config is not None else ValidityConfig()
        self.n_jobs = max(1, n_jobs if n_jobs > 0 else (os.cpu_count() or 1))
        self._set_name = self.config.oxidation_states_set
        self._set_file: str | None = None
        if self._set_name not in OXIDATION_STATE_SETS:
            if not Path(self._set_name).is_file():
                raise ConfigError(
                    f"validity.oxidation_states_set: unknown set {self._set_name!r}; choose one of "
                    f"{', '.join(OXIDATION_STATE_SETS)} or the path of a smact oxidation-states file"
                )
            self._set_file = self._set_name
        elif not hasattr(smact.Element("O"), OXIDATION_STATE_SETS[self._set_name]):
            raise ConfigError(
                f"validity.oxidation_states_set: set {self._set_name!r} is not in smact "
                f"{version('smact')}; choose another or upgrade smact"
            )
        if self._set_name == "wiki":
            warnings.warn(
                "oxidation_states_set 'wiki' comes from Wikipedia; smact advises inspecting it before use",
                UserWarning,
                stacklevel=2,
            )
        self._elements: dict[str, ElementData] = {}
        #: reduced formula -> (charge_neutral, electronegativity_balanced, valid, reason)
        self._cache: dict[str, tuple[bool, bool, bool, str | None]] = {}
        #: input already seen (text, or sorted count pairs) -> (reduced formula or None, parse error or None);
        #: every key here is in the cache, so a repeated input costs one dict lookup
        self._inputs: dict[object, tuple[str | None, str | None]] = {}

    # -- public API ---------------------------------------------------------------------------------

    def check(self, formulas: Iterable[object]) -> pd.DataFrame:
        """One row per input formula: key, both checks, overall validity and the reason when invalid."""
        values = _as_object_array(formulas)
        codes, uniques = _factorize(values)
        result = self._assemble(values, codes, uniques, _prepare_texts, "unparsable: no formula")
        if isinstance(formulas, pd.Series):
            result.index = formulas.index  # rows line up with the caller's table
        return result

    def check_counts(self, compositions: Iterable[Mapping[str, int] | None]) -> pd.DataFrame:
        """As ``check`` for already-parsed compositions (element -> positive integer count, or None)."""
        seen: dict[tuple[tuple[str, int], ...] | None, int] = {}
        codes_list: list[int] = []
        formulas: list[str | None] = []
        for comp in compositions:
            try:
                item = tuple(sorted(comp.items())) if comp is not None else None
                code = seen.setdefault(item, len(seen))
            except (AttributeError, TypeError):  # not a mapping, or unhashable/uncomparable entries
                item, code = None, seen.setdefault(None, len(seen))
                comp = None
            codes_list.append(code)
            formulas.append(counts_to_formula(comp) if comp else None)
        values = np.empty(len(formulas), dtype=object)
        values[:] = formulas
        codes = np.asarray(codes_list, dtype=np.intp)
        return self._assemble(values, codes, list(seen), _prepare_items, "unparsable: no composition")

    def is_valid(self, formula: str) -> bool:
        """True when the formula parses and passes the configured smact checks."""
        return bool(self.check([formula])["valid"].iat[0])

    def cache_table(self) -> pd.DataFrame:
        """The cache as a table: one row per composition evaluated so far."""
        rows = [(key, *value) for key, value in self._cache.items()]
        return pd.DataFrame(rows, columns=COLUMNS[1:]).astype(
            {"charge_neutral": bool, "electronegativity_balanced": bool, "valid": bool}
        )

    def save_cache(self, path: str | os.PathLike) -> None:
        """Write the cache to parquet, tagged with the config and smact version it was made with."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pandas(self.cache_table(), preserve_index=False)
        meta = dict(table.schema.metadata or {})
        meta[_CACHE_META_KEY] = json.dumps(self._cache_tag()).encode()
        pq.write_table(table.replace_schema_metadata(meta), path)

    def load_cache(self, path: str | os.PathLike) -> int:
        """Add a cache saved by ``save_cache``; refuse one made with another config or smact version."""
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        raw = (table.schema.metadata or {}).get(_CACHE_META_KEY)
        tag = json.loads(raw) if raw else None
        if tag != self._cache_tag():
            raise ValueError(
                f"{path}: validity cache was made with {tag}, this checker is {self._cache_tag()}"
            )
        frame = table.to_pandas()
        reasons = frame["reason"].astype(object).where(frame["reason"].notna(), None)
        for key, cn, eb, ok, why in zip(
            frame["reduced_formula"],
            frame["charge_neutral"],
            frame["electronegativity_balanced"],
            frame["valid"],
            reasons,
            strict=True,
        ):
            self._cache[key] = (bool(cn), bool(eb), bool(ok), why)
        return len(frame)

    def __len__(self) -> int:
        """Number of cached compositions."""
        return len(self._cache)

    # -- internals ----------------------------------------------------------------------------------

    def _cache_tag(self) -> dict[str, object]:
        return {"config": self.config.model_dump(), "smact": version("smact")}

    def _assemble(
        self,
        values: np.ndarray,
        codes: np.ndarray,
        uniques: list,
        prepare: Callable[[Sequence], list[_Prepared]],
        missing: str,
    ) -> pd.DataFrame:
        """Key and evaluate the unique inputs not seen before, then map results onto rows with numpy."""
        if len(self._inputs) > _MAX_INPUTS:
            self._inputs.clear()  # bounded memory; the composition cache itself is kept
        new = [u for u in uniques if u not in self._inputs]
        if new:
            with self._pool(len(new)) as pool:
                prepared = _map_batches(pool, prepare, new)
                self._evaluate_new(prepared, pool)
            self._inputs.update(zip(new, ((key, reason) for key, reason, _ in prepared), strict=True))
        n_unique = len(uniques)
        cn = np.zeros(n_unique + 1, dtype=bool)  # the extra last slot serves code -1 (missing input)
        eb = np.zeros(n_unique + 1, dtype=bool)
        ok = np.zeros(n_unique + 1, dtype=bool)
        why = np.empty(n_unique + 1, dtype=object)
        key_arr = np.empty(n_unique + 1, dtype=object)
        for i, value in enumerate(uniques):
            key, reason = self._inputs[value]
            if key is None:
                why[i] = reason
                continue
            key_arr[i] = key
            cn[i], eb[i], ok[i], why[i] = self._cache[key]
        why[n_unique] = missing
        idx = np.where(codes < 0, n_unique, codes)
        return pd.DataFrame(
            {
                "formula": values,
                "reduced_formula": key_arr.take(idx),
                "charge_neutral": cn.take(idx),
                "electronegativity_balanced": eb.take(idx),
                "valid": ok.take(idx),
                "reason": why.take(idx),
            },
            columns=COLUMNS,
        )

    def _evaluate_new(self, prepared: list[_Prepared], pool: ProcessPoolExecutor | None) -> None:
        """Run smact once for every composition not yet in the cache."""
        todo: dict[str, tuple[tuple[str, int], ...]] = {}
        for key, _, item in prepared:
            if key is not None and key not in self._cache and key not in todo:
                todo[key] = item  # type: ignore[assignment]
        if not todo:
            return
        items = list(todo.values())
        for symbol in {symbol for item in items for symbol, _ in item}:
            self._element(symbol)
        results = _map_batches(
            pool if len(items) >= _MIN_PARALLEL else None,
            _evaluate_batch,
            items,
            self._elements,
            self._set_name,
        )
        for (key, item), result in zip(todo.items(), results, strict=True):
            self._cache[key] = self._verdict(result, item)

    def _pool(self, n_items: int) -> AbstractContextManager[ProcessPoolExecutor | None]:
        """A process pool when asked for and worth starting, else a stand-in that yields None."""
        if self.n_jobs <= 1 or n_items < _MIN_PARALLEL:
            return nullcontext(None)
        # fork: workers start in milliseconds and inherit smact's loaded tables
        method = "fork" if "fork" in get_all_start_methods() else None
        return ProcessPoolExecutor(self.n_jobs, mp_context=get_context(method))

    def _verdict(
        self, result: Evaluation, item: tuple[tuple[str, int], ...]
    ) -> tuple[bool, bool, bool, str | None]:
        """Combine the two checks under the config into (cn, eb, valid, reason)."""
        cn, eb, missing = result
        if len(item) < self.config.min_elements:
            what = "a single element" if len(item) == 1 else f"{len(item)} elements"
            return cn, eb, False, f"{what}, fewer than validity.min_elements ({self.config.min_elements})"
        valid = cn and (eb or not self.config.use_pauling_test)
        # smact_validity(include_alloys=True): all-metal compositions pass whatever the checks say
        alloy = self.config.include_alloys and all(symbol in _METALS for symbol, _ in item)
        if valid or alloy:
            return cn, eb, True, None
        if not cn:
            reason = missing or "not charge neutral"
        else:
            reason = "charge neutral but electronegativity not balanced"
            if missing:
                reason += f" ({missing})"
        return cn, eb, False, reason

    def element(self, symbol: str) -> ElementData:
        """smact's data for one element as the checks use it (this checker's oxidation-state set)."""
        return self._element(symbol)

    def _element(self, symbol: str) -> ElementData:
        data = self._elements.get(symbol)
        if data is None:
            try:
                el = smact.Element(symbol)
            except KeyError:  # smact covers Z <= 103 only
                data = ElementData(None, None, known=False)
            else:
                if self._set_file is not None:
                    states = lookup_element_oxidation_states_custom(symbol, self._set_file)
                else:
                    states = getattr(el, OXIDATION_STATE_SETS[self._set_name])
                data = ElementData(tuple(states) if states else None, el.pauling_eneg, known=True)
            self._elements[symbol] = data
        return data


def _as_object_array(formulas: Iterable[object]) -> np.ndarray:
    """Input formulas as a 1-d object array (no copy for Series/arrays that already are one)."""
    if isinstance(formulas, pd.Series | pd.Index):
        return formulas.to_numpy(dtype=object)
    if isinstance(formulas, np.ndarray) and formulas.ndim == 1:
        return formulas.astype(object, copy=False)
    items = list(formulas) if not isinstance(formulas, list) else formulas
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out


def _factorize(values: np.ndarray) -> tuple[np.ndarray, list[object]]:
    """Codes into the unique values; missing values (None, NaN) get code -1."""
    try:
        codes, uniques = pd.factorize(values, use_na_sentinel=True)
        return codes, list(uniques)
    except TypeError:  # an unhashable entry (a list, a dict): fall back to a keyed loop
        seen: dict[object, int] = {}
        codes_list = []
        for value in values:
            if value is None or (isinstance(value, float) and value != value):
                codes_list.append(-1)
                continue
            key = value if isinstance(value, str) else ("\0nonstr", repr(value))
            codes_list.append(seen.setdefault(key, len(seen)))
        uniques = [k if isinstance(k, str) else _NotText(k[1]) for k in seen]
        return np.asarray(codes_list, dtype=np.intp), uniques


class _NotText:
    """Stands in for an unhashable input so that parse_formula reports it as not text."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


def _counts_from_item(item: tuple[tuple[object, object], ...] | None) -> dict[str, int]:
    """Validate a parsed composition (sorted items) into clean counts; FormulaError says why not."""
    if not item:
        raise FormulaError("no composition")
    for symbol, count in item:
        if not isinstance(symbol, str) or not _SYMBOL.match(symbol):
            raise FormulaError(f"{symbol!r} is not an element symbol")
        if isinstance(count, bool) or not isinstance(count, int | np.integer):
            raise FormulaError(f"count {count!r} for {symbol} is not an integer")
        if count <= 0:
            raise FormulaError(f"non-positive count {count} for {symbol}")
    # the formula parser checks the symbols and maps D/T to H, exactly as for text input
    return parse_formula(counts_to_formula(dict(item)))  # type: ignore[arg-type]


def check_formulas(
    formulas: Iterable[object], config: ValidityConfig | None = None, n_jobs: int = 1
) -> pd.DataFrame:
    """``ValidityChecker(config, n_jobs).check(formulas)`` for one-off use."""
    return ValidityChecker(config, n_jobs=n_jobs).check(formulas)


def check_counts(
    compositions: Iterable[Mapping[str, int] | None], config: ValidityConfig | None = None, n_jobs: int = 1
) -> pd.DataFrame:
    """``ValidityChecker(config, n_jobs).check_counts(compositions)`` for one-off use."""
    return ValidityChecker(config, n_jobs=n_jobs).check_counts(compositions)


def is_valid(formula: str, config: ValidityConfig | None = None) -> bool:
    """True when one formula passes the smact checks (use a ValidityChecker for many)."""
    return ValidityChecker(config).is_valid(formula)
