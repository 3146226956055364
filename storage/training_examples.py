"""An instance's most influential training examples, with the examples themselves: the
``influence`` table's rows joined to the training set's rows where the manifest (or a run
group's record) says the training set is (:class:`netloupe.storage.manifest.InfluenceInfo`).

The training set is not part of the run (it may be large, and is the user's); it is read by
id when asked, so an analyst sees what the model learnt from beside the scores.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.dataset as pads

from netloupe.contract.errors import RunError
from netloupe.storage.manifest import InfluenceInfo
from netloupe.storage.schema import quoted_identifier


def influential_examples(influence_path: Path, info: InfluenceInfo, instance_id) -> pa.Table:
    """``instance_id``'s proponents then opponents, strongest first: ``sign, rank, train_id,
    score, train_label`` and the training example's input columns (None where the training
    set is no longer where it was)."""
    return influential_examples_of(influence_path, info, [instance_id]).drop_columns(["instance_id"])


def influential_examples_of(influence_path: Path, info: InfluenceInfo, instance_ids: list) -> pa.Table:
    """:func:`influential_examples` of several instances at once (``instance_id`` first, in
    the order given): the training set is read once for all of them (a report's mistakes)."""
    con = duckdb.connect()
    try:
        rows = con.sql("SELECT i.instance_id, sign, rank, train_id, score FROM read_parquet(?) i "
                       "JOIN (SELECT unnest(?) AS instance_id, generate_subscripts(?, 1) AS position) USING (instance_id) "
                       "ORDER BY position, sign DESC, rank",
                       params=[str(influence_path), instance_ids, instance_ids]).to_arrow_table()
        examples = training_rows(con, info, sorted(set(rows["train_id"].to_pylist())))
    finally:
        con.close()
    if examples is None:
        return rows
    by_id = {train_id: i for i, train_id in enumerate(examples["train_id"].to_pylist())}
    positions = pa.array([by_id.get(train_id) for train_id in rows["train_id"].to_pylist()], pa.int64())
    for name in examples.column_names[1:]:
        rows = rows.append_column(name, examples[name].take(positions))
    return rows


def training_rows(con: duckdb.DuckDBPyConnection, info: InfluenceInfo, train_ids: list[int]) -> pa.Table | None:
    """``train_id, train_label`` and the input columns of the training examples ``train_ids``;
    None when the training set is gone from ``info.training_path``."""
    if not Path(info.training_path).exists():
        return None
    try:
        files = pads.dataset(info.training_path, format="parquet").files
    except (pa.ArrowInvalid, OSError) as error:
        raise RunError(f"the training set at {info.training_path} cannot be read ({error})") from None
    inputs = ", ".join(quoted_identifier(c) for c in info.training_input_columns)
    train_id, label = quoted_identifier(info.training_id_column), quoted_identifier(info.training_label_column)
    return con.sql(f"SELECT {train_id} AS train_id, {label} AS train_label, {inputs} FROM read_parquet(?) "
                   f"WHERE {train_id} IN (SELECT unnest(?))", params=[files, train_ids]).to_arrow_table()
