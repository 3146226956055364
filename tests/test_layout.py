"""The run layout: atomic commit, replacement with --force, nothing left after abort."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from netloupe.contract.errors import RunError
from netloupe.contract.names import check_run_name
from netloupe.storage import schema as S
from netloupe.storage.layout import RunExistsError, RunLayout, RunStaging, part_key, write_part
from netloupe.storage.manifest import Counts, DatasetInfo, ModelFacts, ModelIdentity, RunManifest, Tables


def _table(n=3):
    return S.table_from_columns(S.activations_schema(2), {
        "instance_id": pa.array(np.arange(n, dtype=np.int64)),
        "activation": S.fixed_vectors(np.ones((n, 2), np.float32), 2),
    })


def _manifest(run_name: str = "r", instances: int = 3) -> RunManifest:
    """The least a manifest holds."""
    return RunManifest(
        run_name=run_name, created_unix=0.0, dataset=DatasetInfo(id_type="int64"), counts=Counts(instances=instances),
        class_names=["a", "b"], tables=Tables(),
        model=ModelFacts(num_classes=2, input_shape=(2,), layer_neurons={}, layer_output_shapes={},
                         attribution_shapes={}, attribution_raw_shapes={}, per_instance_bytes=0),
        model_identity=ModelIdentity(fingerprint=None, output="logits"),
    )


def test_commit_makes_the_run_appear_whole(tmp_path):
    staging = RunStaging.open(tmp_path, "r")
    layout = staging.create()
    write_part(layout.instances_dir, "k1", _table())
    assert not (tmp_path / "r").exists()
    final = staging.commit(_manifest())
    assert final.read_manifest() == _manifest()
    assert (final.instances_dir / "part-k1.parquet").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


def test_existing_run_refused_then_replaced_with_force(tmp_path):
    first = RunStaging.open(tmp_path, "r")
    first.create()
    first.commit(_manifest(instances=1))
    with pytest.raises(RunExistsError, match="--force"):
        RunStaging.open(tmp_path, "r")
    assert issubclass(RunExistsError, RunError)
    second = RunStaging.open(tmp_path, "r", force=True)
    second.create()
    second.commit(_manifest(instances=2))
    assert RunLayout(tmp_path / "r").read_manifest().counts.instances == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


def test_abort_leaves_nothing_and_keeps_committed_runs(tmp_path):
    keep = RunStaging.open(tmp_path, "keep")
    keep.create()
    keep.commit(_manifest("keep"))
    failed = RunStaging.open(tmp_path, "failed")
    layout = failed.create()
    write_part(layout.instances_dir, "k", _table())
    failed.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep"]


def test_a_manifest_of_another_version_is_refused_with_what_to_do(tmp_path):
    run = tmp_path / "old"
    run.mkdir()
    data = json.loads(_manifest().to_json())
    for changes, expected in [
        ({"netloupe_manifest": 1, "versions": {"netloupe": "0.0.9"}},
         r"made by netloupe 0.0.9 \(manifest format 1\); this netloupe reads format 3\. Run its spec again"),
        ({"schema_version": 0}, r"tables of schema version 0 .* this netloupe reads version"),
        ({"counts": {"instances": "many"}}, r"manifest of the run at .* is damaged: counts.instances"),
    ]:
        (run / "manifest.json").write_text(json.dumps({**data, **changes}))
        with pytest.raises(RunError, match=expected):
            RunLayout(run).read_manifest()
    (run / "manifest.json").write_text("{not json")
    with pytest.raises(RunError, match="is not JSON"):
        RunLayout(run).read_manifest()


def test_unlisted_parts_are_removed_before_commit(tmp_path):
    staging = RunStaging.open(tmp_path, "r")
    layout = staging.create()
    write_part(layout.instances_dir, "good", _table())
    write_part(layout.instances_dir, "orphan", _table())
    (layout.instances_dir / ".tmp-half-written.parquet").write_bytes(b"PAR1")
    removed = staging.remove_unlisted_parts([layout.instances_dir], {"good"})
    assert sorted(p.name for p in removed) == [".tmp-half-written.parquet", "part-orphan.parquet"]
    assert [p.name for p in layout.instances_dir.iterdir()] == ["part-good.parquet"]


def test_part_key_is_stable_and_order_sensitive():
    assert part_key([1, 2, 3]) == part_key([1, 2, 3])
    assert part_key([1, 2, 3]) != part_key([3, 2, 1])
    assert part_key(["12", "3"]) != part_key(["1", "23"])


@pytest.mark.parametrize("name", ["", "../x", "a/b", ".hidden", "x" * 200])
def test_bad_run_names(name):
    with pytest.raises(ValueError, match="run name"):
        check_run_name(name)


def test_schema_rejects_wrong_vector_length():
    with pytest.raises((pa.ArrowInvalid, pa.ArrowTypeError, ValueError)):
        S.table_from_columns(S.activations_schema(3), {
            "instance_id": pa.array([1], pa.int64()),
            "activation": S.fixed_vectors(np.ones((1, 2), np.float32), 2),
        })


def test_empty_batch_still_has_the_schema(tmp_path):
    table = S.table_from_columns(S.attributions_schema(4), {
        "instance_id": pa.array([], pa.int64()), "target_rank": pa.array([], pa.int16()),
        "target": pa.array([], pa.int64()), "attribution": S.fixed_vectors(np.zeros((0, 4), np.float32), 4),
        **{c: pa.array([], pa.float32()) for c in S.ATTRIBUTION_SUMMARY_COLUMNS},
        "convergence_delta": pa.array([], pa.float64()), "finite": pa.array([], pa.bool_()),
    })
    write_part(tmp_path, "empty", table)
    import pyarrow.parquet as pq
    assert pq.read_schema(tmp_path / "part-empty.parquet") == S.attributions_schema(4)


def test_every_field_of_the_run_contract_is_documented():
    """The manifest and the worker's report are the run's contract: each field says what it is."""
    from netloupe.storage import manifest as contract

    records = [obj for obj in vars(contract).values()
               if isinstance(obj, type) and issubclass(obj, contract.Record) and obj is not contract.Record]
    assert len(records) >= 10
    undocumented = [f"{r.__name__}.{name}" for r in records for name, field in r.model_fields.items()
                    if not (field.description or "").strip()]
    assert undocumented == []


def test_a_run_layout_takes_its_root_as_text_too(tmp_path):
    staging = RunStaging.open(tmp_path, "r")
    staging.create()
    staging.commit(_manifest())
    assert RunLayout(str(tmp_path / "r")).read_manifest().run_name == "r"
