"""The influence stage: TracIn's proponents and opponents of every explained instance
(``spec.influence``; the math in :mod:`netloupe.workers.influence`).

    plan_influence   at validation, on the driver: the last layer, the training set and its
                     rows checked before Ray starts
    run_influence    one Ray task per checkpoint computes the explained instances' factors;
                     tasks over shards of the training set score them against every instance,
                     each keeping per instance its top k of both ends; the driver merges the
                     shards' lists as they finish (exactly) into the ``influence`` table

A run is one checkpoint (its own model); a run group sums over its members' checkpoints
(:mod:`netloupe.pipeline.run_group`).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import torch
from torch import nn

from netloupe.contract.errors import DatasetError, RunError, SpecError
from netloupe.contract.spec import InfluenceSpec, JobSpec, ModelSpec
from netloupe.pipeline.datasets import resolve_dataset
from netloupe.pipeline.progress import RunProgress, count, duration
from netloupe.pipeline.ray_cluster import default_threads
from netloupe.storage import schema as S
from netloupe.storage.catalog import driver_connection
from netloupe.storage.manifest import InfluenceInfo
from netloupe.workers.influence import (
    TopInfluences,
    TrainingRows,
    instance_factors_task,
    last_layer_gradients,
    training_shard_task,
)
from netloupe.workers.inputs import InputDecoder, ResolvedDataset

SHARDS_PER_WORKER = 4
"""Training shards per worker: enough for one slow node not to hold up the stage."""


@dataclass(frozen=True)
class InfluencePlan:
    """What validation established for the influence stage."""

    settings: InfluenceSpec
    training: ResolvedDataset
    """The training set as the tasks read it (the explained set's preprocessing, no limit)."""
    training_rows: int
    """Rows ``settings.where`` chose."""


def plan_influence(spec: JobSpec, model: nn.Module, dataset: ResolvedDataset, head: pa.Table,
                   checkpoints: int = 1) -> InfluencePlan | None:
    """Check ``spec.influence`` against the model (on the explained set's ``head`` rows), the
    training set and, of the loss at the label, the explained set's labels; ``checkpoints``:
    how many the influence sums over (a run: one). None when the spec asks for no influence.
    Everything the stage could fail on is checked here, before any instance is explained."""
    settings = spec.influence
    if settings is None:
        return None
    settings.rate_of(checkpoints)
    if spec.model.output != "logits":
        raise SpecError(f"influence needs a model that outputs logits (TracIn's gradients are of the cross-entropy "
                        f"of its last linear layer's output); model.output is {spec.model.output!r}")
    final = _final_layer(model, settings.layer)
    decoder = InputDecoder(dataset.input_column, dataset.feature_columns, dataset.preprocess)
    classes = _check_final(model, final, settings.layer, torch.from_numpy(decoder(head)))
    memory = spec.execution.driver_sql_memory_mib
    if settings.target == "label":
        if dataset.label_column is None:
            raise SpecError("influence.target 'label' takes each instance's loss at its label, but the dataset has "
                            "no label_column; give one, or use target: predicted")
        _labelled_rows(dataset, None, dataset.limit, classes, memory, "explained instances")
    training = _training_dataset(spec, dataset)
    rows = _labelled_rows(training, settings.where, None, classes, memory, "training rows")
    _check_training_inputs(model, final, training, settings.where)
    return InfluencePlan(settings, training, rows)


def _check_training_inputs(model: nn.Module, final: nn.Module, training: ResolvedDataset, where: str | None) -> None:
    """The model takes a few training rows, and their labels index its classes."""
    rows = TrainingRows(training, where).batches([*training.input_columns, training.label_column], 1)
    first = next(iter(rows)).slice(0, 4)
    decoder = InputDecoder(training.input_column, training.feature_columns, training.preprocess)
    labels = first.column(training.label_column).to_numpy(zero_copy_only=False).astype(np.int64)
    try:
        last_layer_gradients(model, final, torch.from_numpy(decoder(pa.Table.from_batches([first]))),
                             torch.from_numpy(labels))
    except (RuntimeError, ValueError, IndexError) as error:
        raise DatasetError(f"influence.training: the model cannot take the training rows' inputs and labels "
                           f"({str(error).splitlines()[0]}); they must be inputs and class indices as the "
                           "explained dataset's") from None


def _final_layer(model: nn.Module, path: str) -> nn.Linear:
    try:
        layer = model.get_submodule(path)
    except AttributeError:
        linear = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
        raise SpecError(f"influence.layer names {path!r}, which the model has no module of; its linear layers: "
                        f"{linear or 'none'}") from None
    if not isinstance(layer, nn.Linear):
        raise SpecError(f"influence.layer {path!r} is a {type(layer).__name__}; TracIn's last-layer form needs the "
                        "final nn.Linear, whose output is the model's logits")
    return layer


def _check_final(model: nn.Module, final: nn.Module, path: str, x: torch.Tensor) -> int:
    """``final``'s output must be the model's: its weights' gradient then factors. Returns
    the classes it scores."""
    seen = {}
    handle = final.register_forward_hook(lambda _m, _i, output: seen.setdefault("output", output.detach()))
    try:
        with torch.no_grad():
            output = model(x)
    finally:
        handle.remove()
    if "output" not in seen or seen["output"].shape != output.shape or not torch.equal(seen["output"], output):
        raise SpecError(f"influence.layer {path!r} is not the model's last layer: its output is not the model's "
                        "(TracIn's last-layer form needs the linear layer that computes the logits)")
    return int(output.shape[1])


def _training_dataset(spec: JobSpec, dataset: ResolvedDataset) -> ResolvedDataset:
    settings = spec.influence
    if settings.training is None:
        training = dataset
    else:
        if settings.training.limit is not None:
            raise SpecError("influence.training.limit: choose training rows with influence.where "
                            "(e.g. instance_id < 1000) instead")
        try:
            training = resolve_dataset(spec.model_copy(update={"dataset": settings.training}))
        except DatasetError as error:
            raise DatasetError(f"influence.training: {error}") from None
    if training.label_column is None:
        raise DatasetError("influence.training needs labels (label_column): TracIn compares the gradients of "
                           "each training example's loss at its label")
    if training.id_type != "int64":
        raise DatasetError(f"influence.training's ids ({training.id_column!r}) are {training.id_type}; the influence "
                           "table keys training examples by integer ids: give an integer id column")
    # The explained set's preprocessing: the model takes both alike.
    return replace(training, preprocess=dataset.preprocess, limit=None, background=None,
                   num_rows=pads.dataset(training.path, format="parquet").count_rows())


def _labelled_rows(dataset: ResolvedDataset, where: str | None, limit: int | None, classes: int, memory_mib: int,
                   what: str) -> int:
    """Rows ``where`` chooses (the first ``limit``), every one labelled with a class index of
    the model's ``classes`` (a label of -1 would index the last class, silently)."""
    files = pads.dataset(dataset.path, format="parquet").files
    label = S.quoted_identifier(dataset.label_column)
    chosen = f"SELECT {label} AS label FROM read_parquet(?)" + (f" WHERE ({where})" if where else "") + (
        f" LIMIT {int(limit)}" if limit is not None else "")
    with tempfile.TemporaryDirectory(prefix="netloupe-influence-") as spill, \
            driver_connection(memory_mib, Path(spill)) as con:
        try:
            rows, labelled, low, high = con.execute(
                f"SELECT count(*), count(label), min(label), max(label) FROM ({chosen})", [files]).fetchone()
        except Exception as error:  # DuckDB's parser and binder errors have no common base
            raise SpecError(f"influence.where {where!r} does not work on the training set "
                            f"({str(error).splitlines()[0]}); write a DuckDB predicate over its columns") from None
    if rows == 0:
        raise DatasetError(f"influence.where {where!r} chooses no training rows of {dataset.path}")
    if labelled != rows:
        fix = ("choose labelled rows with influence.where" if where is not None or what.startswith("training")
               else "or use influence.target: predicted")
        raise DatasetError(f"{rows - labelled:,} of the {rows:,} {what} have no label; TracIn needs each one's "
                           f"label ({fix})")
    if low < 0 or high >= classes:
        raise DatasetError(f"the {what}' labels run from {low} to {high}, but the model scores {classes} classes "
                           f"(0..{classes - 1}); labels must be class indices")
    return int(rows)


def run_influence(spec: JobSpec, plan: InfluencePlan, checkpoints: list[ModelSpec], explained: ResolvedDataset,
                  progress: RunProgress, expected_ids: int | None = None) -> tuple[pa.Table, InfluenceInfo]:
    """The ``influence`` table of ``explained`` summed over ``checkpoints`` (one model spec
    each), and how it was computed; ``expected_ids``: the digest of the ids the run explained
    (:func:`netloupe.storage.schema.id_digest`), which the instances read here must have."""
    import ray

    started = time.perf_counter()
    settings, execution = plan.settings, spec.execution
    rates = settings.rate_of(len(checkpoints))
    models = [model.model_dump(mode="json") for model in checkpoints]
    threads = default_threads(spec)
    options = dict(num_cpus=max(1.0, execution.cpus_per_worker), num_gpus=execution.gpus_per_worker)
    progress.stage(f"scoring {count(plan.training_rows, 'training example')} against "
                   f"{count(explained.num_rows, 'instance')} (TracIn, {count(len(models), 'checkpoint')})")
    explained_rows = TrainingRows(replace(explained, background=None))
    by_label = settings.target == "label"
    # Each checkpoint's factors stay in the object store (the shard tasks read them there); the ids come here.
    refs = [ray.remote(instance_factors_task).options(num_returns=2, **options).remote(
        model, settings.layer, explained_rows, by_label, threads) for model in models]
    read = _gather(ray, [ids_ref for ids_ref, _ in refs])
    ids = read[0]
    if len(ids) != explained.num_rows or any(not other.equals(ids) for other in read[1:]) or (
            expected_ids is not None and S.id_digest(ids, explained.id_type) != expected_ids):
        raise RunError(f"the influence stage read {len(ids):,} explained instances, expected the run's "
                       f"{explained.num_rows:,} in the same order for every checkpoint; nothing was committed")
    factors = [factors_ref for _, factors_ref in refs]
    shards = max(1, min(execution.num_workers * SHARDS_PER_WORKER, -(-plan.training_rows // settings.batch_size)))
    task = ray.remote(training_shard_task).options(**options)
    pending = [task.remote(models, settings.layer, rates, TrainingRows(plan.training, settings.where, i, shards),
                           settings.k, settings.batch_size, threads, *factors) for i in range(shards)]
    merged = TopInfluences(len(ids), settings.k)
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            merged.merge(ray.get(done[0]))
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    seconds = time.perf_counter() - started
    progress.stage(f"influence computed in {duration(seconds)}")
    training = plan.training
    info = InfluenceInfo(
        training_path=str(Path(training.path).resolve()), training_id_column=training.id_column,
        training_input_columns=training.input_columns, training_label_column=training.label_column,
        where=settings.where, training_rows=plan.training_rows, layer=settings.layer, k=settings.k,
        checkpoints=[model.weights or model.factory or model.torchscript or model.huggingface or "" for model in checkpoints],
        learning_rates=rates, target=settings.target, seconds=seconds)
    return influence_table(ids, merged, explained.id_type), info


def _gather(ray, refs: list) -> list:
    try:
        return ray.get(refs)
    except BaseException:
        for ref in refs:
            ray.cancel(ref, force=True)
        raise


def influence_table(instance_ids: pa.Array, top: TopInfluences, id_type: str) -> pa.Table:
    """The ``influence`` table (:func:`netloupe.storage.schema.influence_schema`) of ``top``,
    whose rows are the instances ``instance_ids`` in order."""
    pieces = []
    for sign, (scores, ids) in zip(S.INFLUENCE_SIGNS, (top.proponents(), top.opponents())):
        n, width = scores.shape
        pieces.append(pa.table({
            "instance_id": pc.take(instance_ids, pa.array(np.repeat(np.arange(n), width))),
            "train_id": pa.array(ids.reshape(-1), pa.int64()),
            "score": pa.array(scores.reshape(-1), pa.float64()),
            "rank": pa.array(np.tile(np.arange(1, width + 1, dtype=np.int32), n)),
            "sign": pa.DictionaryArray.from_arrays(np.zeros(n * width, np.int8), [sign]).cast(pa.string()),
        }).cast(S.influence_schema(id_type)))
    return pa.concat_tables(pieces)
