"""TracIn (Pruthi et al. 2020), its last-layer form, in matrix form: the influence of training
examples on explained instances, a training shard at a time.

TracIn scores a training example z for an instance z' by the sum over checkpoints of the
learning rate times the dot product of their loss gradients. Over the last linear layer's
weights the gradient of a cross-entropy loss is the outer product of J (the loss's gradient
with respect to the layer's output: softmax minus one-hot) and a (the layer's input), so the
dot product factors: (J·J')(a·a') (Captum's ``TracInCPFast``, the paper's appendix F). For a
block of instances against a block of training examples that is two small matrix products
and an element-wise one, summed over checkpoints: no per-pair loop.

In a run (:mod:`netloupe.pipeline.influence` drives it), one task per checkpoint computes
the explained instances' factors (:func:`instance_factors_task`); then each of several tasks
scores a shard of the training set against every instance and keeps, per instance, its ``k``
largest and ``k`` smallest scores (:func:`training_shard_task`, :class:`TopInfluences`,
mergeable: the driver merges the shards' exactly).
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import torch
from torch import nn

from netloupe.contract.errors import DatasetError
from netloupe.contract.spec import ModelSpec
from netloupe.storage.schema import quoted_identifier
from netloupe.workers.inputs import InputDecoder, ResolvedDataset
from netloupe.workers.model_loading import load_model

READ_ROWS = 4096
"""Rows decoded and passed through the model at a time."""
SCORE_BLOCK_BYTES = 64 * 2**20
"""The score block of instances x training rows in memory at once."""


@dataclass(frozen=True)
class LastLayerGradients:
    """Per example, the two factors of its last-layer loss gradient at one checkpoint."""

    jacobians: torch.Tensor | np.ndarray
    """``(n, classes)``: the per-example cross-entropy's gradient with respect to the last
    layer's output, ``softmax(output) - onehot(target)``."""
    inputs: torch.Tensor | np.ndarray
    """``(n, features)``: the last layer's input."""


def last_layer_gradients(model: nn.Module, final_layer: nn.Module, x: torch.Tensor,
                         targets: torch.Tensor | None) -> LastLayerGradients:
    """The factors of ``x``'s loss gradients on ``final_layer`` (a linear layer whose output
    is the model's, as Captum's ``TracInCPFast`` requires), of the loss at ``targets`` (None:
    at the class the model predicts)."""
    captured = {}

    def keep_input(_module, args, _output):
        captured["input"] = args[0].detach()

    handle = final_layer.register_forward_hook(keep_input)
    try:
        with torch.no_grad():
            output = model(x)
    finally:
        handle.remove()
    if targets is None:
        targets = output.argmax(dim=1)
    jacobians = torch.softmax(output.double(), dim=1)
    jacobians[torch.arange(len(targets)), targets.to(jacobians.device)] -= 1.0
    return LastLayerGradients(jacobians.cpu(), captured["input"].reshape(len(x), -1).double().cpu())


def tracin_scores(instances: list[LastLayerGradients], training: list[LastLayerGradients],
                  learning_rates: list[float]):
    """``(n_instances, n_training)``: Σ over checkpoints of lr · (J J'ᵀ) ∘ (A A'ᵀ), the
    factors of each checkpoint in the same order in both lists (tensors or numpy arrays,
    the result alike)."""
    scores = None
    for test, train, rate in zip(instances, training, learning_rates, strict=True):
        term = rate * (test.jacobians @ train.jacobians.T) * (test.inputs @ train.inputs.T)
        scores = term if scores is None else scores + term
    return scores


class TopInfluences:
    """Per instance, the ``k`` training examples of largest score (proponents) and of
    smallest (opponents) among those seen, in the total order of (score, training id): ties
    rank the larger id higher. Mergeable: shards scored apart merge to exactly what one
    pass over all of them keeps."""

    def __init__(self, instances: int, k: int):
        self.k = k
        self.scores = np.empty((instances, 0))
        self.ids = np.empty((instances, 0), dtype=np.int64)

    @classmethod
    def stacked(cls, blocks: list[TopInfluences], k: int) -> TopInfluences:
        """The blocks' instances one after another (each block kept its own rows)."""
        top = cls(0, k)
        top.scores = np.concatenate([b.scores for b in blocks]) if blocks else top.scores
        top.ids = np.concatenate([b.ids for b in blocks]) if blocks else top.ids
        return top

    def add(self, scores: np.ndarray, training_ids: np.ndarray) -> None:
        """Take a block ``(instances, m)`` of scores of the training examples ``training_ids``."""
        ids = np.broadcast_to(np.asarray(training_ids, dtype=np.int64), scores.shape)
        scores, ids = _both_ends(scores, ids, self.k)  # a block's own ends first: the concatenation stays small
        self._keep(np.concatenate([self.scores, scores], axis=1), np.concatenate([self.ids, ids], axis=1))

    def merge(self, other: TopInfluences) -> None:
        self._keep(np.concatenate([self.scores, other.scores], axis=1), np.concatenate([self.ids, other.ids], axis=1))

    def _keep(self, scores: np.ndarray, ids: np.ndarray) -> None:
        self.scores, self.ids = _both_ends(scores, ids, self.k)

    def proponents(self) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, ids)`` per instance, largest first (at most ``k``)."""
        order = np.lexsort((self.ids, self.scores), axis=1)[:, ::-1][:, :self.k]
        return np.take_along_axis(self.scores, order, axis=1), np.take_along_axis(self.ids, order, axis=1)

    def opponents(self) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, ids)`` per instance, smallest first (at most ``k``)."""
        order = np.lexsort((self.ids, self.scores), axis=1)[:, :self.k]
        return np.take_along_axis(self.scores, order, axis=1), np.take_along_axis(self.ids, order, axis=1)


def _both_ends(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the ``k`` first and ``k`` last entries in the order of (score, id), unordered;
    every entry when a row has at most ``2k``."""
    width = scores.shape[1]
    if width <= 2 * k:
        return scores, ids
    # A partition by score alone picks the right entries unless the value at either boundary
    # occurs more than once in a row (only the id then decides): those rows are sorted whole.
    part = np.argpartition(scores, (k - 1, width - k), axis=1)
    chosen = np.concatenate([part[:, :k], part[:, width - k:]], axis=1)
    low = np.take_along_axis(scores, part[:, k - 1:k], axis=1)
    high = np.take_along_axis(scores, part[:, width - k:width - k + 1], axis=1)
    tied = ((scores == low).sum(axis=1) > 1) | ((scores == high).sum(axis=1) > 1)
    if tied.any():
        rows = np.flatnonzero(tied)
        order = np.lexsort((ids[rows], scores[rows]), axis=1)
        chosen[rows] = np.concatenate([order[:, :k], order[:, width - k:]], axis=1)
    return np.take_along_axis(scores, chosen, axis=1), np.take_along_axis(ids, chosen, axis=1)


@dataclass(frozen=True)
class TrainingRows:
    """Which rows of a dataset a task reads: all (the explained instances), or one shard of
    the training rows a predicate chose (by a hash of the id, so shards are disjoint)."""

    dataset: ResolvedDataset
    where: str | None = None
    shard: int = 0
    shards: int = 1

    def batches(self, columns: list[str], threads: int):
        """Arrow record batches of ``columns``, :data:`READ_ROWS` at a time, in file order."""
        files = pads.dataset(self.dataset.path, format="parquet").files
        quoted = ", ".join(quoted_identifier(c) for c in columns)
        conditions = [f"({self.where})"] if self.where else []
        if self.shards > 1:
            conditions.append(f"hash({quoted_identifier(self.dataset.id_column)}) % {self.shards} = {self.shard}")
        query = f"SELECT {quoted} FROM read_parquet(?)"
        query += f" WHERE {' AND '.join(conditions)}" if conditions else ""
        query += f" LIMIT {self.dataset.limit}" if self.dataset.limit is not None else ""
        con = duckdb.connect(config={"threads": max(1, threads), "preserve_insertion_order": True})
        try:
            yield from con.sql(query, params=[files]).to_arrow_reader(READ_ROWS)
        finally:
            con.close()


def _device() -> torch.device:
    from netloupe.workers.explain import pick_device

    return pick_device()


def _factors_of(model: nn.Module, layer: nn.Module, decoder: InputDecoder, batch: pa.RecordBatch,
                targets: np.ndarray | None, device: torch.device) -> LastLayerGradients:
    x = torch.from_numpy(decoder(pa.Table.from_batches([batch]))).to(device)
    return last_layer_gradients(model, layer, x, None if targets is None else torch.from_numpy(targets))


def _labels(batch: pa.RecordBatch, column: str, what: str) -> np.ndarray:
    labels = batch.column(column)
    if labels.null_count:
        raise DatasetError(f"{what} has {labels.null_count} rows without a label in {column!r}; TracIn needs "
                           "each one's label (choose labelled rows with influence.where, or influence.target: "
                           "predicted for the explained instances)")
    return labels.to_numpy(zero_copy_only=False).astype(np.int64)


def instance_factors_task(model_data: dict, layer: str, rows: TrainingRows, by_label: bool,
                          threads: int) -> tuple[pa.Array, LastLayerGradients]:
    """The explained instances' ids, in read order, and their factors at one checkpoint
    (``model_data``: its :class:`ModelSpec`; as numpy arrays), of the loss at each one's label
    or else at its predicted class. Two results: the driver fetches the ids only, the factors
    stay in the object store for the shard tasks."""
    torch.set_num_threads(threads)
    device = _device()
    model = load_model(ModelSpec.model_validate(model_data)).to(device)
    final = model.get_submodule(layer)
    dataset = rows.dataset
    decoder = InputDecoder(dataset.input_column, dataset.feature_columns, dataset.preprocess)
    columns = [dataset.id_column, *dataset.input_columns] + ([dataset.label_column] if by_label else [])
    ids, jacobians, inputs = [], [], []
    for batch in rows.batches(columns, threads):
        targets = _labels(batch, dataset.label_column, "the explained dataset") if by_label else None
        factors = _factors_of(model, final, decoder, batch, targets, device)
        ids.append(batch.column(dataset.id_column))
        jacobians.append(factors.jacobians.numpy())
        inputs.append(factors.inputs.numpy())
    return pa.concat_arrays(ids), LastLayerGradients(np.concatenate(jacobians), np.concatenate(inputs))


def training_shard_task(models_data: list[dict], layer: str, learning_rates: list[float], rows: TrainingRows, k: int,
                        batch_size: int, threads: int, *instances: LastLayerGradients) -> TopInfluences:
    """Score one shard of the training set against every instance, summed over the
    checkpoints (``models_data`` and ``instances``, each checkpoint's instance factors, in the
    same order), ``batch_size`` training rows at a time; return each instance's top ``k`` of
    both ends among the shard."""
    torch.set_num_threads(threads)
    device = _device()
    models = [load_model(ModelSpec.model_validate(data)).to(device) for data in models_data]
    finals = [model.get_submodule(layer) for model in models]
    dataset = rows.dataset
    decoder = InputDecoder(dataset.input_column, dataset.feature_columns, dataset.preprocess)
    columns = [dataset.id_column, *dataset.input_columns, dataset.label_column]
    n = len(instances[0].jacobians)
    block = max(1, SCORE_BLOCK_BYTES // 8 // batch_size)
    tops = [TopInfluences(min(block, n - start), k) for start in range(0, n, block)]
    for batch in _rebatched(rows.batches(columns, threads), batch_size):
        targets = _labels(batch, dataset.label_column, "the training set")
        train_ids = batch.column(dataset.id_column).to_numpy(zero_copy_only=False).astype(np.int64)
        training = []
        for model, final in zip(models, finals):
            factors = _factors_of(model, final, decoder, batch, targets, device)
            training.append(LastLayerGradients(factors.jacobians.numpy(), factors.inputs.numpy()))
        for number, top in enumerate(tops):
            rows_of = slice(number * block, number * block + len(top.scores))
            tested = [LastLayerGradients(t.jacobians[rows_of], t.inputs[rows_of]) for t in instances]
            top.add(tracin_scores(tested, training, learning_rates), train_ids)
    return TopInfluences.stacked(tops, k)


def _rebatched(batches, rows: int):
    """Record batches regrouped into batches of ``rows`` (the last one shorter)."""
    pending, count = [], 0
    for batch in batches:
        pending.append(batch)
        count += batch.num_rows
        while count >= rows:
            table = pa.Table.from_batches(pending).combine_chunks()
            yield table.slice(0, rows).to_batches(max_chunksize=rows)[0]
            rest = table.slice(rows)
            pending, count = rest.to_batches(), rest.num_rows
    if count:
        yield pa.Table.from_batches(pending).combine_chunks().to_batches()[0]
