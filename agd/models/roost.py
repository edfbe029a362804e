"""Roost (Goodall & Lee 2020) band-gap models on aviary, with our own training loop and batching.

The network is aviary's :class:`aviary.roost.model.Roost` unchanged (its ``state_dict`` is what we
save), with an element embedding that ships inside the aviary package (``matscholar200`` by
default). Two things are ours, both for CPU speed:

* **Batching.** aviary's ``CompositionData`` builds one pymatgen ``Composition`` and a handful of
  tensors per formula, then ``collate_batch`` concatenates them in Python. Here a whole set of
  formulas is parsed once (:func:`agd.chem.formula.parse_formula`, cached) into flat arrays
  (:class:`EncodedFormulas`), and a batch's graph (node weights, element numbers, self/neighbour pair
  indices, node -> crystal index) is cut out of them with a few numpy operations. The graph is the
  same as aviary's: every ordered pair of elements of a formula, self pairs included.
* **Message passing.** Each message layer's gate and message networks start with a linear layer on
  ``[h_self, h_neighbour]``; that product is split into ``W_self h_self + W_nbr h_nbr`` and computed
  once per *node*, then gathered per *pair* (:func:`_message_layer`). Same parameters, same function
  (checked against aviary's own forward in the tests), about a pair-per-node factor fewer FLOPs in
  the dominant matrix products.

Training: target standardisation with the training mean/std, AdamW, cosine learning-rate decay over
``epochs``, early stopping on validation MAE (eV) with the best epoch's weights restored, and an
``on_epoch(epoch, metrics)`` callback (MLflow hook). ``loss="robust_l1"`` is aviary's Lorentzian
robust L1, which also yields a per-formula aleatoric spread; ``"l1"`` is plain MAE. An ensemble is
``ensemble_size`` models with seeds ``seed .. seed + k - 1``; its prediction is the member mean and
its uncertainty the member standard deviation (population, ``ddof=0``).

Inference streams: formulas are parsed and run chunk by chunk (``chunk_size`` formulas), each chunk
in batches of ``batch_size``; a chunk's arrays are all that is held besides the outputs.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from aviary.losses import robust_l1_loss
from aviary.roost.model import Roost
from torch import Tensor
from tqdm.auto import tqdm

from agd.chem.formula import FormulaError, parse_formula
from agd.config import RoostConfig
from agd.models.oracle import OracleLabels

log = logging.getLogger(__name__)

EpochCallback = Callable[[int, dict[str, float]], None]

#: Element embeddings that ship inside aviary (``aviary/embeddings/element/<name>.json``).
EMBEDDINGS = ("matscholar200", "cgcnn92", "megnet16", "onehot112")
#: Formulas per forward pass when predicting. On the 2-core reference CPU, 256 labelled 2.4x as many
#: formulas per second as 4,096 on one thread (``python -m bench oracle``, 20,000 formulas).
_PREDICT_BATCH = 256
_PREDICT_CHUNK = 100_000
_TARGET = "band_gap"


# -- formulas -> flat graph arrays -----------------------------------------------------------------


@lru_cache(maxsize=8)
def embedding_elements(name: str) -> frozenset[str]:
    """The element symbols an aviary embedding has a vector for."""
    import aviary

    path = Path(aviary.__file__).parent / "embeddings" / "element" / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"unknown element embedding {name!r}; aviary ships {', '.join(EMBEDDINGS)}")
    return frozenset(json.loads(path.read_text()))


@lru_cache(maxsize=1)
def _atomic_numbers() -> dict[str, int]:
    from pymatgen.core import Element

    return {el.symbol: el.Z for el in Element}


@dataclass(frozen=True)
class EncodedFormulas:
    """Parsed formulas as flat arrays: formula ``i`` owns nodes ``offsets[i]:offsets[i + 1]``.

    ``z`` is each node's atomic number, ``weights`` its element fraction; a formula that failed has
    no nodes and a reason in ``status`` ('ok' otherwise).
    """

    z: np.ndarray
    weights: np.ndarray
    offsets: np.ndarray
    status: list[str]

    def __len__(self) -> int:
        return len(self.status)

    @property
    def ok(self) -> np.ndarray:
        """Boolean mask of the formulas that can be predicted."""
        return np.diff(self.offsets) > 0


def encode_formulas(formulas: Sequence[str], known: frozenset[str] | set[str]) -> EncodedFormulas:
    """Parse formulas into flat arrays; unparsable ones and ones with elements not in ``known`` fail."""
    numbers = _atomic_numbers()
    z: list[int] = []
    weights: list[float] = []
    offsets = np.zeros(len(formulas) + 1, dtype=np.int64)
    status: list[str] = []
    for i, text in enumerate(formulas):
        try:
            counts = parse_formula(text)
        except FormulaError as exc:
            status.append(f"unparsable: {exc}")
            offsets[i + 1] = len(z)
            continue
        unknown = [el for el in counts if el not in known]
        if unknown:
            status.append(f"element {unknown[0]} unknown to the model")
        else:
            total = sum(counts.values())
            z.extend(numbers[el] for el in counts)
            weights.extend(c / total for c in counts.values())
            status.append("ok")
        offsets[i + 1] = len(z)
    return EncodedFormulas(
        np.asarray(z, dtype=np.int64), np.asarray(weights, dtype=np.float32), offsets, status
    )


def graph_batch(
    enc: EncodedFormulas, rows: np.ndarray, device: torch.device | str | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Roost inputs for formulas ``rows`` (all with nodes): weights, z, self/neighbour pairs, crystal index.

    Equal to aviary's ``collate_batch`` over ``CompositionData`` items, built without a Python loop
    (on the CPU, then moved to ``device``, the model's, when given).
    """
    sizes = enc.offsets[rows + 1] - enc.offsets[rows]
    first = np.cumsum(sizes) - sizes  # first node of each formula within the batch
    n_nodes = int(sizes.sum())
    nodes = np.repeat(enc.offsets[rows] - first, sizes) + np.arange(n_nodes)
    crystal = np.repeat(np.arange(len(rows)), sizes)
    pairs = sizes * sizes
    pair_first = np.repeat(np.cumsum(pairs) - pairs, pairs)
    local = np.arange(int(pairs.sum())) - pair_first  # pair k of a formula with n nodes: (k // n, k % n)
    n = np.repeat(sizes, pairs)
    base = np.repeat(first, pairs)
    batch = (
        torch.from_numpy(enc.weights[nodes]).unsqueeze(1),
        torch.from_numpy(enc.z[nodes]),
        torch.from_numpy(base + local // n),
        torch.from_numpy(base + local % n),
        torch.from_numpy(crystal),
    )
    if device is None or torch.device(device).type == "cpu":
        return batch
    return tuple(t.to(device, non_blocking=True) for t in batch)  # type: ignore[return-value]


def _device_of(net: torch.nn.Module) -> torch.device:
    return next(net.parameters()).device


# -- the forward pass -------------------------------------------------------------------------------


def _index_sum(src: Tensor, index: Tensor, size: int) -> Tensor:
    return src.new_zeros((size, src.shape[1])).index_add_(0, index, src)


def _rest_of_network(net: torch.nn.Module, first_pre_activation: Tensor) -> Tensor:
    """Finish an aviary SimpleNetwork whose first linear layer's output is already computed."""
    x = net.acts[0](net.bns[0](first_pre_activation))
    for fc, bn, act in zip(net.fcs[1:], net.bns[1:], net.acts[1:], strict=True):
        x = act(bn(fc(x)))
    return net.fc_out(x)


def _message_layer(
    layer: torch.nn.Module, weights: Tensor, fea: Tensor, self_idx: Tensor, nbr_idx: Tensor
) -> Tensor:
    """aviary's ``MessageLayer.forward`` with the first linear layers computed per node, not per pair."""
    width = fea.shape[1]
    firsts = [lin for head in layer.pooling for lin in (head.gate_nn.fcs[0], head.message_nn.fcs[0])]
    w = torch.cat([lin.weight for lin in firsts])
    b = torch.cat([lin.bias for lin in firsts])
    hidden = (fea @ w[:, :width].T)[self_idx] + (fea @ w[:, width:].T)[nbr_idx] + b
    parts = hidden.split([lin.out_features for lin in firsts], dim=1)
    nbr_weights = weights[nbr_idx]
    n_nodes = fea.shape[0]
    heads = []
    for h, head in enumerate(layer.pooling):
        gate = _rest_of_network(head.gate_nn, parts[2 * h])
        message = _rest_of_network(head.message_nn, parts[2 * h + 1])
        with torch.no_grad():  # softmax shift for stability; the result does not depend on it
            shift = gate.new_full((n_nodes, 1), -math.inf).scatter_reduce_(
                0, self_idx.unsqueeze(1), gate, reduce="amax", include_self=True
            )
        gate = nbr_weights**head.pow * (gate - shift[self_idx]).exp()
        gate = gate / (_index_sum(gate, self_idx, n_nodes)[self_idx] + 1e-10)
        heads.append(_index_sum(gate * message, self_idx, n_nodes))
    return torch.stack(heads).mean(dim=0) + fea


def roost_forward(model: Roost, batch: Sequence[Tensor]) -> Tensor:
    """Model output (crystals x n_outputs) for one batch; the same function as ``model(*batch)[0]``."""
    weights, z, self_idx, nbr_idx, crystal = batch
    net = model.material_nn
    fea = torch.cat([net.embedding(model.elem_embedding(z)), weights], dim=1)
    for layer in net.graphs:
        fea = _message_layer(layer, weights, fea, self_idx, nbr_idx)
    pooled = torch.stack([head(fea, index=crystal, weights=weights) for head in net.cry_pool]).mean(dim=0)
    return model.output_nns[0](torch.relu(model.trunk_nn(pooled)))


# -- one model --------------------------------------------------------------------------------------


def build_roost(cfg: RoostConfig, robust: bool) -> Roost:
    """An untrained aviary Roost for one regression target, sized by ``cfg``."""
    hidden = (cfg.hidden,)
    return Roost(
        robust=robust,
        n_targets=[1],
        task_dict={_TARGET: "regression"},
        elem_embedding=cfg.embedding,
        elem_fea_len=cfg.elem_fea_len,
        n_graph=cfg.n_graph,
        elem_heads=cfg.elem_heads,
        elem_gate=hidden,
        elem_msg=hidden,
        cry_heads=cfg.cry_heads,
        cry_gate=hidden,
        cry_msg=hidden,
        trunk_hidden=tuple(cfg.trunk_hidden),
        out_hidden=tuple(cfg.out_hidden),
        device=cfg.device,
    )


@dataclass
class RoostModel:
    """A trained Roost: the aviary network, the target scaling and the elements it was trained on."""

    net: Roost
    config: RoostConfig
    mean: float
    std: float
    elements: frozenset[str]
    seed: int
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int | None = None

    @property
    def robust(self) -> bool:
        """Whether the model was trained with the robust L1 loss (and predicts an aleatoric std)."""
        return self.config.loss == "robust_l1"

    def predict_encoded(
        self, enc: EncodedFormulas, batch_size: int = _PREDICT_BATCH
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Gaps (eV) and, for robust models, aleatoric std (eV); NaN where a formula failed."""
        mean, aleatoric = _predict_members([self], enc, batch_size)
        return mean[:, 0], (aleatoric[:, 0] if aleatoric is not None else None)

    def predict(self, formulas: Sequence[str], batch_size: int = _PREDICT_BATCH) -> OracleLabels:
        """Band gaps for formulas; ``std`` is the aleatoric spread of a robust model (else None)."""
        return RoostEnsemble([self]).predict(formulas, batch_size=batch_size, spread="aleatoric")

    def to_checkpoint(self, timings: bool = True) -> dict:
        """Everything needed to rebuild the model, as plain containers and tensors (``weights_only`` safe).

        ``timings=False`` leaves the seconds out of the epoch history, as :meth:`save` does: a file then
        depends only on what was trained, so a retrain that gives the same weights gives the same bytes
        (and DVC sees no change downstream)."""
        history = self.history if timings else [_untimed(row) for row in self.history]
        return {
            "format": "agd.roost/1",
            "state_dict": self.net.state_dict(),
            "config": self.config.model_dump(),
            "mean": self.mean,
            "std": self.std,
            "elements": sorted(self.elements),
            "seed": self.seed,
            "history": history,
            "best_epoch": self.best_epoch,
        }

    @classmethod
    def from_checkpoint(cls, data: dict, device: str = "cpu") -> RoostModel:
        """Rebuild a model from :meth:`to_checkpoint` output."""
        cfg = RoostConfig.model_validate({**data["config"], "device": device})
        net = build_roost(cfg, robust=cfg.loss == "robust_l1")
        net.load_state_dict(data["state_dict"])
        net.eval()
        return cls(
            net, cfg, float(data["mean"]), float(data["std"]), frozenset(data["elements"]), int(data["seed"]),
            list(data["history"]), data["best_epoch"],
        )  # fmt: skip

    def save(self, path: str | os.PathLike) -> Path:
        """Write the checkpoint to ``path`` (a ``.pt`` file) atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(self.to_checkpoint(timings=False), tmp)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "cpu") -> RoostModel:
        """Read a model written by :meth:`save`."""
        return cls.from_checkpoint(torch.load(path, map_location=device, weights_only=True), device)


def _untimed(row: dict[str, float]) -> dict[str, float]:
    """An epoch's history row without its wall-clock seconds."""
    return {k: v for k, v in row.items() if k != "seconds"}


def _loss(out: Tensor, target: Tensor, robust: bool) -> Tensor:
    if robust:
        return robust_l1_loss(out[:, 0], out[:, 1], target)
    return (out[:, 0] - target).abs().mean()


def _cosine_lr(epoch: int, total: int, base: float, floor: float = 0.01) -> float:
    """Learning rate of epoch ``epoch`` (0-based) under cosine decay from ``base`` to ``floor * base``."""
    if total <= 1:
        return base
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * epoch / (total - 1))))


@dataclass
class _ThreadLimit:
    """Set torch's intra-op threads for a block and restore them after."""

    threads: int | None
    _before: int = 0

    def __enter__(self) -> None:
        self._before = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)

    def __exit__(self, *exc) -> None:
        torch.set_num_threads(self._before)


def train_roost(
    train_formulas: Sequence[str],
    train_gaps: Sequence[float],
    val_formulas: Sequence[str] | None,
    val_gaps: Sequence[float] | None,
    cfg: RoostConfig,
    seed: int = 0,
    epochs: int | None = None,
    on_epoch: EpochCallback | None = None,
    progress: bool = True,
) -> RoostModel:
    """Train one Roost; with validation data, stop early on val MAE and keep the best epoch's weights.

    ``epochs`` (default ``cfg.epochs``) caps the epochs run; the learning-rate schedule always spans
    ``cfg.epochs``, so a refit for the best epoch count sees the same learning rates as the original.
    """
    y = np.asarray(train_gaps, dtype=np.float64)
    known = _known_elements(train_formulas, cfg)
    mean, std = float(y.mean()), float(y.std()) or 1.0
    with _ThreadLimit(cfg.num_threads):
        torch.manual_seed(seed)
        model = RoostModel(build_roost(cfg, cfg.loss == "robust_l1"), cfg, mean, std, known, seed)

        def lr_at(epoch: int) -> float:
            if cfg.lr_schedule == "cosine":
                return _cosine_lr(epoch, cfg.epochs, cfg.learning_rate)
            return cfg.learning_rate

        n_epochs = epochs if epochs is not None else cfg.epochs
        _fit(model, train_formulas, y, val_formulas, val_gaps, n_epochs, lr_at, seed, on_epoch, progress)
    return model


def finetune_roost(
    model: RoostModel,
    formulas: Sequence[str],
    gaps: Sequence[float],
    epochs: int | None = None,
    lr_factor: float | None = None,
    on_epoch: EpochCallback | None = None,
    progress: bool = True,
) -> RoostModel:
    """A copy of ``model`` trained further on ``formulas`` (e.g. all rows) without validation.

    The learning rate decays (cosine) from ``lr_factor * learning_rate`` over ``epochs`` (defaults:
    the config's ``finetune_lr_factor`` and ``finetune_epochs``); target scaling is kept, and elements
    new in ``formulas`` join the known ones (their embeddings start from aviary's vectors).
    """
    cfg = model.config
    epochs = cfg.finetune_epochs if epochs is None else epochs
    base = cfg.learning_rate * (cfg.finetune_lr_factor if lr_factor is None else lr_factor)
    with _ThreadLimit(cfg.num_threads):
        tuned = copy.deepcopy(model)
        tuned.elements = model.elements | _known_elements(formulas, cfg)
        tuned.history = []
        torch.manual_seed(model.seed)
        _fit(
            tuned, formulas, np.asarray(gaps, dtype=np.float64), None, None, epochs,
            lambda e: _cosine_lr(e, epochs, base), model.seed, on_epoch, progress,
        )  # fmt: skip
    return tuned


def _known_elements(formulas: Sequence[str], cfg: RoostConfig) -> frozenset[str]:
    present = frozenset(el for f in formulas for el in _elements_of(f))
    return present & embedding_elements(cfg.embedding)


def _fit(
    model: RoostModel,
    formulas: Sequence[str],
    y: np.ndarray,
    val_formulas: Sequence[str] | None,
    val_gaps: Sequence[float] | None,
    n_epochs: int,
    lr_at: Callable[[int], float],
    seed: int,
    on_epoch: EpochCallback | None,
    progress: bool,
) -> None:
    """The epoch loop shared by training and fine-tuning; updates ``model`` in place."""
    cfg, net = model.config, model.net
    enc = encode_formulas(formulas, model.elements)
    if not enc.ok.all():
        bad = [f"{f!r} ({s})" for f, s in zip(formulas, enc.status, strict=True) if s != "ok"][:3]
        raise ValueError(f"training formulas must all be valid; e.g. {', '.join(bad)}")
    has_val = val_formulas is not None and len(val_formulas) > 0
    if has_val:
        val_enc = encode_formulas(val_formulas, model.elements)
        val_y = np.asarray(val_gaps, dtype=np.float64)
        val_rows = np.flatnonzero(val_enc.ok)
    device = _device_of(net)  # cfg.device: the model was built there
    target = torch.from_numpy(((y - model.mean) / model.std).astype(np.float32)).to(device)
    optimiser = torch.optim.AdamW(net.parameters(), lr=lr_at(0), weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(seed)
    best_mae, best_state, best_epoch, stale = math.inf, None, None, 0
    for epoch in range(n_epochs):
        start = time.perf_counter()
        lr = lr_at(epoch)
        for group in optimiser.param_groups:
            group["lr"] = lr
        net.train()
        order = rng.permutation(len(y))
        loss_sum, abs_sum = 0.0, 0.0
        batches = range(0, len(order), cfg.batch_size)
        desc = f"roost seed {model.seed} epoch {epoch + 1}/{n_epochs}"
        for first in tqdm(batches, desc=desc, leave=False, disable=not progress):
            rows = order[first : first + cfg.batch_size]
            out = roost_forward(net, graph_batch(enc, rows, device))
            batch_target = target[torch.from_numpy(rows).to(device)]
            loss = _loss(out, batch_target, model.robust)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            loss_sum += float(loss.detach()) * len(rows)
            abs_sum += float((out[:, 0].detach() - batch_target).abs().sum()) * model.std
        metrics = {"train_loss": loss_sum / len(y), "train_mae": abs_sum / len(y), "lr": lr}
        if has_val:
            pred, _ = model.predict_encoded(val_enc)
            metrics["val_mae"] = float(np.mean(np.abs(pred[val_rows] - val_y[val_rows])))
        metrics["seconds"] = time.perf_counter() - start
        model.history.append({"epoch": epoch + 1, **metrics})
        if on_epoch is not None:
            on_epoch(epoch + 1, metrics)
        log.info(
            "roost seed %d epoch %d: %s", model.seed, epoch + 1, {k: round(v, 4) for k, v in metrics.items()}
        )
        if not has_val:
            continue
        if metrics["val_mae"] < best_mae:
            best_mae, best_epoch, stale = metrics["val_mae"], epoch + 1, 0
            best_state = copy.deepcopy(net.state_dict())
        else:
            stale += 1
            if cfg.patience is not None and stale >= cfg.patience:
                break
    if best_state is not None:
        net.load_state_dict(best_state)
    model.best_epoch = best_epoch if best_state is not None else n_epochs
    net.eval()


def _elements_of(text: str) -> Iterable[str]:
    try:
        return parse_formula(text).keys()
    except FormulaError:
        return ()


# -- ensembles and streaming inference ---------------------------------------------------------------


def _predict_members(
    members: Sequence[RoostModel], enc: EncodedFormulas, batch_size: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """(formulas x members) gaps and aleatoric stds in eV (NaN where a formula failed)."""
    n = len(enc)
    mean = np.full((n, len(members)), np.nan)
    robust = all(m.robust for m in members)
    aleatoric = np.full((n, len(members)), np.nan) if robust else None
    rows = np.flatnonzero(enc.ok)
    threads = members[0].config.num_threads if members else None
    with torch.inference_mode(), _ThreadLimit(threads):
        for first in range(0, len(rows), batch_size):
            chunk = rows[first : first + batch_size]
            batches: dict[torch.device, tuple[Tensor, ...]] = {}  # one copy per device the members are on
            for j, member in enumerate(members):
                member.net.eval()
                device = _device_of(member.net)
                if device not in batches:
                    batches[device] = graph_batch(enc, chunk, device)
                out = roost_forward(member.net, batches[device]).double().cpu().numpy()
                mean[chunk, j] = out[:, 0] * member.std + member.mean
                if aleatoric is not None:
                    aleatoric[chunk, j] = np.exp(out[:, 1]) * member.std
    return mean, aleatoric


@dataclass
class RoostEnsemble:
    """``ensemble_size`` Roost models; prediction = member mean, uncertainty = member std."""

    members: list[RoostModel]

    @property
    def elements(self) -> frozenset[str]:
        """Elements every member knows."""
        return frozenset.intersection(*(m.elements for m in self.members))

    def predict_members(
        self, formulas: Sequence[str], batch_size: int = _PREDICT_BATCH
    ) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
        """Per-member gaps (formulas x members), aleatoric stds (or None) and per-formula status."""
        enc = encode_formulas(formulas, self.elements)
        mean, aleatoric = _predict_members(self.members, enc, batch_size)
        return mean, aleatoric, enc.status

    def predict(
        self, formulas: Sequence[str], batch_size: int = _PREDICT_BATCH, spread: str = "ensemble"
    ) -> OracleLabels:
        """Mean gap over members; ``std`` is the member spread (``spread='aleatoric'``: mean aleatoric std)."""
        mean, aleatoric, status = self.predict_members(formulas, batch_size)
        return _labels(mean, aleatoric, status, spread)

    def predict_chunks(
        self,
        formulas: Iterable[str],
        chunk_size: int = _PREDICT_CHUNK,
        batch_size: int = _PREDICT_BATCH,
        spread: str = "ensemble",
    ) -> Iterator[OracleLabels]:
        """Stream labels for an iterable of formulas, ``chunk_size`` at a time (bounded memory)."""
        iterator = iter(formulas)
        while chunk := list(islice(iterator, chunk_size)):
            yield self.predict(chunk, batch_size, spread)

    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``member_<i>.pt`` per member and ``ensemble.json`` into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        names = []
        for i, member in enumerate(self.members):
            names.append(member.save(folder / f"member_{i}.pt").name)
        meta = {"kind": "roost", "members": names, "seeds": [m.seed for m in self.members]}
        (folder / "ensemble.json").write_text(json.dumps(meta, indent=2))
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike, device: str = "cpu") -> RoostEnsemble:
        """Read an ensemble written by :meth:`save`."""
        folder = Path(folder)
        meta = json.loads((folder / "ensemble.json").read_text())
        return cls([RoostModel.load(folder / name, device) for name in meta["members"]])


def _labels(mean: np.ndarray, aleatoric: np.ndarray | None, status: list[str], spread: str) -> OracleLabels:
    gaps = mean.mean(axis=1)
    if spread == "aleatoric":
        std = aleatoric.mean(axis=1) if aleatoric is not None else None
    elif spread == "ensemble":
        std = mean.std(axis=1) if mean.shape[1] > 1 else None
    else:
        raise ValueError(f"spread must be 'ensemble' or 'aleatoric', got {spread!r}")
    return OracleLabels(gaps, std, list(status))


def train_ensemble(
    train_formulas: Sequence[str],
    train_gaps: Sequence[float],
    val_formulas: Sequence[str] | None,
    val_gaps: Sequence[float] | None,
    cfg: RoostConfig,
    seed: int = 0,
    epochs: Sequence[int] | int | None = None,
    on_epoch: Callable[[int, int, dict[str, float]], None] | None = None,
    progress: bool = True,
) -> RoostEnsemble:
    """Train ``cfg.ensemble_size`` models with seeds seed..seed+k-1 (``epochs`` per member or for all).

    ``on_epoch(member, epoch, metrics)`` is called after every epoch of every member. With
    ``cfg.workers > 1`` the members train in that many processes (one torch thread each unless
    ``cfg.num_threads`` says otherwise) and a member's epochs are reported when it finishes; the
    models are the same as when trained one after the other.
    """
    data = (list(train_formulas), list(train_gaps), _as_list(val_formulas), _as_list(val_gaps))
    jobs = []
    for i in range(cfg.ensemble_size):
        n_epochs = epochs[i] if isinstance(epochs, Sequence) else epochs
        jobs.append(("train", (*data, cfg, seed + i, n_epochs)))
    return RoostEnsemble(_run_jobs(jobs, cfg, on_epoch, progress))


def finetune_ensemble(
    ensemble: RoostEnsemble,
    formulas: Sequence[str],
    gaps: Sequence[float],
    on_epoch: Callable[[int, int, dict[str, float]], None] | None = None,
    progress: bool = True,
) -> RoostEnsemble:
    """Every member fine-tuned on ``formulas`` (:func:`finetune_roost`), in parallel like training."""
    data = (list(formulas), list(gaps))
    jobs = [("finetune", (_to_bytes(m.to_checkpoint()), *data)) for m in ensemble.members]
    return RoostEnsemble(_run_jobs(jobs, ensemble.members[0].config, on_epoch, progress))


def _run_jobs(
    jobs: list[tuple[str, tuple]],
    cfg: RoostConfig,
    on_epoch: Callable[[int, int, dict[str, float]], None] | None,
    progress: bool,
) -> list[RoostModel]:
    """Run member jobs one after the other, or in ``cfg.workers`` processes (epochs reported at the end)."""
    if cfg.workers <= 1 or len(jobs) <= 1:
        members = []
        for i, (kind, args) in enumerate(jobs):
            callback = None if on_epoch is None else (lambda e, m, i=i: on_epoch(i, e, m))
            members.append(_member_job(kind, args, callback, progress))
        return members

    from agd.executors import spawn_pool

    threads = cfg.num_threads or 1
    with spawn_pool(min(cfg.workers, len(jobs))) as pool:
        futures = [pool.submit(_member_job_bytes, kind, args, threads) for kind, args in jobs]
        members = []
        for i, future in enumerate(futures):
            member = RoostModel.from_checkpoint(_from_bytes(future.result()), cfg.device)
            member.config = cfg
            if on_epoch is not None:
                for row in member.history:
                    on_epoch(i, int(row["epoch"]), {k: v for k, v in row.items() if k != "epoch"})
            members.append(member)
    return members


def _member_job(kind: str, args: tuple, on_epoch: EpochCallback | None, progress: bool) -> RoostModel:
    if kind == "train":
        return train_roost(*args, on_epoch=on_epoch, progress=progress)
    checkpoint, formulas, gaps = args
    data = _from_bytes(checkpoint)
    model = RoostModel.from_checkpoint(data, data["config"]["device"])  # fine-tuned where it was trained
    return finetune_roost(model, formulas, gaps, on_epoch=on_epoch, progress=progress)


def _member_job_bytes(kind: str, args: tuple, threads: int) -> bytes:
    """One member's job in a worker process; the model comes back as checkpoint bytes.

    Each epoch is also written to stderr as one line, so a long parallel run shows progress.
    """
    if kind == "train":
        cfg = args[4].model_copy(update={"num_threads": threads, "workers": 1})
        args = (*args[:4], cfg, *args[5:])
    torch.set_num_threads(threads)
    start = time.perf_counter()

    def report(epoch: int, metrics: dict[str, float]) -> None:
        shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
        print(f"[roost {kind} pid {os.getpid()}] epoch {epoch} {shown} ({time.perf_counter() - start:.0f} s)",
              file=sys.stderr, flush=True)  # fmt: skip

    return _to_bytes(_member_job(kind, args, report, False).to_checkpoint())


def _to_bytes(checkpoint: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    return buffer.getvalue()


def _from_bytes(data: bytes) -> dict:
    # tensors come back on the CPU; from_checkpoint puts them on the model's device
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _as_list(values: Sequence | None) -> list | None:
    return None if values is None else list(values)
