"""A handmade run whose report's numbers are known: the report tests' data (and, at a million
instances, ``benchmarks/bench_report.py``'s).

``rows`` instances of 3 classes with ids from 1000. The first 60% are from site ``north``,
where the model is right on every one; the rest from ``south``, where it predicts the next
class on every one: accuracy 0.6 and the worst subgroup ``site=south``. ``batch``
alternates ``x``, ``y`` across both. Confidences differ per instance (a hash of the row),
so the most confident mistake is one instance. Layer ``fc`` fires neuron ``2 * label`` (3.0
above the rest), so each class has one neuron of its own. The inputs are ``side`` x
``side`` images written as a Parquet dataset the run points at, as a job's run records
where it read its instances, so the maps are drawn over them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from netloupe.storage import schema as S
from netloupe.storage.handmade import write_handmade_run
from netloupe.storage.layout import RunLayout

CLASSES, NEURONS, FIRST_ID = 3, 6, 1000
NORTH_SHARE = 0.6


def report_arrays(rows: int) -> dict[str, np.ndarray]:
    """Every value of the run, by name (the tests compute their answers from these)."""
    row = np.arange(rows)
    north = row < int(NORTH_SHARE * rows)
    label = row % CLASSES
    prediction = np.where(north, label, (label + 1) % CLASSES)
    confidence = 0.4 + 0.5 * ((row * 7919) % rows) / rows
    probabilities = np.repeat(((1 - confidence) / (CLASSES - 1))[:, None], CLASSES, axis=1)
    probabilities[row, prediction] = confidence
    return {"ids": FIRST_ID + row, "north": north, "label": label, "prediction": prediction,
            "probabilities": probabilities.astype(np.float32), "batch": np.where(row % 2 == 0, "x", "y")}


def make_report_run(root: Path, rows: int = 300, side: int = 4, name: str = "report",
                    rows_per_part: int = 65536) -> Path:
    """Write the dataset and the run under ``root``; return the run's directory."""
    values = report_arrays(rows)
    rng = np.random.default_rng(5)
    instances = pa.table({
        "instance_id": pa.array(values["ids"], pa.int64()), "label": pa.array(values["label"], pa.int64()),
        "prediction": pa.array(values["prediction"], pa.int64()),
        "probabilities": S.fixed_vectors(values["probabilities"], CLASSES),
        "site": pa.array(np.where(values["north"], "north", "south").astype(object)),
        "batch": pa.array(values["batch"].astype(object)),
    })
    activations = rng.uniform(0, 0.5, (rows, NEURONS)).astype(np.float32)
    activations[np.arange(rows), 2 * values["label"]] += 3.0
    images = rng.uniform(0, 1, (rows, 1, side, side)).astype(np.float32)
    maps = rng.normal(size=(rows, side, side)).astype(np.float32)
    # Each class in a cloud of its own, so the scatter shows three colours apart.
    centres = np.array([[0.0, 0.0], [6.0, 1.0], [3.0, 5.0]])
    coordinates = (centres[values["label"]] + rng.normal(size=(rows, 2))).astype(np.float32)
    dataset = root / f"{name}-images.parquet"
    pq.write_table(pa.table({"id": pa.array(values["ids"], pa.int64()),
                             "pixels": pa.FixedSizeListArray.from_arrays(pa.array(images.reshape(-1)), side * side)}),
                   dataset, row_group_size=rows_per_part)
    del images
    layout = write_handmade_run(root / "runs", name, instances, {"fc": activations}, {"saliency": maps},
                                rows_per_part=rows_per_part, projections={"fc": coordinates})
    point_at_dataset(layout, dataset, "id", "pixels", [1, side, side])
    return layout.root


def point_at_dataset(layout: RunLayout, path: Path, id_column: str, input_column: str, shape: list[int]) -> None:
    """Record in a committed run's manifest where its inputs are, as a job's run does (a
    handmade run was given none): the catalog then opens them as the ``inputs`` view."""
    manifest = layout.read_manifest()
    manifest = manifest.model_copy(update={
        "dataset": manifest.dataset.model_copy(update={"path": str(path), "id_column": id_column,
                                                       "input_column": input_column}),
        "preprocess": manifest.preprocess.model_copy(update={"shape": shape}),
        "model": manifest.model.model_copy(update={"input_shape": tuple(shape)}),
    })
    layout.manifest_path.write_text(manifest.to_json())


def add_influence(layout: RunLayout, training_path: Path, rows: list[tuple]) -> None:
    """Give a committed run an ``influence`` table of ``rows`` (instance id, train id, score,
    rank, sign) over a training set at ``training_path`` (``id``, ``pixels``, ``label``
    columns), and record it in the manifest, as an influence stage does."""
    from netloupe.storage.manifest import InfluenceInfo

    table = pa.table({name: [row[i] for row in rows] for i, name in enumerate(
        ("instance_id", "train_id", "score", "rank", "sign"))}).cast(S.influence_schema())
    layout.influence_path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, layout.influence_path)
    manifest = layout.read_manifest()
    info = InfluenceInfo(training_path=str(training_path), training_id_column="id", training_input_columns=["pixels"],
                         training_label_column="label", training_rows=pq.read_metadata(training_path).num_rows,
                         layer="fc", k=3, checkpoints=["handmade"], learning_rates=[1.0], target="predicted",
                         seconds=0.0)
    layout.manifest_path.write_text(manifest.model_copy(update={"influence": info}).to_json())
