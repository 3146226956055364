"""Faults in the middle of a run: a worker process killed, the driver killed, a failed run.

Every one ends with each instance exactly once or with nothing visible, never half a run.
"""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from safetensors.torch import save_file

from netloupe.pipeline.driver import run_job
from netloupe.storage.catalog import open_catalog, run_query
from netloupe.storage.reader import RunReader
from netloupe.workers.model_identity import model_fingerprint
from tests.helpers import tabular_spec, tabular_table
from tests.tiny_models import Linear3, linear

pytestmark = pytest.mark.faults


def test_a_worker_killed_mid_run_still_gives_every_instance_exactly_once(ray_local, tmp_path):
    pq.write_table(tabular_table(200), tmp_path / "data.parquet")
    marker = tmp_path / "crashed"
    spec = tabular_spec(
        tmp_path / "data.parquet", tmp_path / "runs",
        model={"factory": "tests.tiny_models:crashing_linear",
               "kwargs": {"marker": str(marker), "driver_pid": os.getpid(), "crash_on_call": 3}},
        attributions=[{"method": "integrated_gradients", "params": {"n_steps": 4}}],
        execution={"batch_size": 16, "num_workers": 2, "threads_per_worker": 1},
    )
    result = run_job(spec)
    assert marker.exists()  # a worker process really died (SIGKILL) during the run
    reader = RunReader(result.layout.root)
    ids = list(range(1000, 1200))
    assert reader.instances()["instance_id"].to_pylist() == ids
    assert reader.activations("fc")["instance_id"].to_pylist() == ids
    assert reader.attributions("integrated_gradients")["instance_id"].to_pylist() == ids
    # No leftover of the lost batch: the run holds exactly the parts the manifest counts.
    parts = list((result.layout.root / "instances").glob("*.parquet"))
    assert len(parts) == result.manifest.counts.parts


def test_a_killed_driver_is_resumed_computing_only_what_is_missing(ray_local, tmp_path, capsys, stop_afterwards):
    from netloupe.pipeline.cli import main as cli_main
    from tests.helpers import kill_driver_mid_run, processes_of, slow_run_spec, wait_until

    spec_path = slow_run_spec(tmp_path / "data.parquet", tmp_path / "runs", tmp_path)
    staging_root = tmp_path / "runs" / ".staging"
    # A batch is finished once its instances part is written (the last of its parts).
    killed = kill_driver_mid_run(spec_path, lambda: len(list(staging_root.glob("t-*/instances/part-*.parquet"))))
    stop_afterwards.append(killed)
    assert not (tmp_path / "runs" / "t").exists()  # nothing visible
    kept = {p.name: p.stat().st_mtime_ns for p in staging_root.glob("t-*/instances/part-*.parquet")}
    # As if the killed attempt had reached the part pass: a segment of its that the resumed
    # attempt must not keep (its parts would count twice). Named so that no segment of the
    # resumed attempt can overwrite it.
    [staged] = staging_root.glob("t-*")
    stale = staged / "wide" / "fc" / "part-zzzzzzzz.parquet"
    stale.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"instance_id": pa.array([1000, 1001, 1002], pa.int64())}), stale)

    # Resumed at once: any of the killed driver's Ray workers still finishing a batch must not
    # stop the run (test_a_staging_taken_over_by_resume_refuses_late_writes shows their writes fail).
    assert cli_main(["run", "--resume", str(tmp_path / "runs" / "t"), "--no-progress"]) == 0
    assert "resuming" in capsys.readouterr().out
    run = tmp_path / "runs" / "t"
    reader = RunReader(run)
    ids = list(range(1000, 1160))
    assert reader.instances()["instance_id"].to_pylist() == ids
    assert reader.attributions("saliency")["instance_id"].to_pylist() == ids
    manifest = reader.manifest
    # At least the batches seen finished were kept (one more may have finished before the
    # resume took the staging over), and not all of them.
    assert len(kept) <= manifest.timings["resumed_parts"] < 10
    assert 0 < manifest.timings["resumed_rows"] < 160
    # The kept batches' statistics were added up with the new ones as they arrived (the
    # catalog added none itself), each once: every instance counts once per neuron.
    assert "statistics_merge_seconds" in manifest.timings and "statistics" not in manifest.timings["catalog"]
    sizes = run_query(open_catalog(run), "SELECT sum(size) AS n FROM neuron_cells WHERE neuron = 0 GROUP BY layer")
    assert sizes["n"].to_pylist() == [160] * len(manifest.model.layer_neurons)
    wide = run_query(open_catalog(run), "SELECT count(*) AS n, count(DISTINCT instance_id) AS d FROM activations_fc")
    assert wide.to_pylist() == [{"n": 160, "d": 160}]
    # The finished batches were kept as they were, not computed again.
    for name, mtime in kept.items():
        assert (run / "instances" / name).stat().st_mtime_ns == mtime
    # The kept batches' sizes count: the run's bytes are all its explained parts' (tables,
    # statistics, wide and index rows).
    explained = [p for d in ("instances", "activations", "attributions", "stats", "wide", "index")
                 for p in (run / d).rglob("part-*")]
    assert manifest.counts.bytes == sum(p.stat().st_size for p in explained)
    assert not (run / "job.json").exists()
    # Once every process of the killed driver's Ray is gone, none of their late writes landed.
    wait_until(lambda: not processes_of(killed), 60, "the killed driver's Ray processes to end")
    assert not staging_root.exists()


def test_a_resumed_run_that_fails_keeps_its_staging_for_another_resume(ray_local, tmp_path, capsys):
    import shutil

    import pyarrow as pa

    from netloupe.contract.spec import spec_to_dict
    from netloupe.pipeline.cli import main as cli_main
    from netloupe.storage.layout import JOB_FILE, RunStaging, staged_job

    # A batch of instances the dataset does not have (ids 5000..), as a wrong kept part.
    stray = tabular_table(8)
    stray = stray.set_column(stray.schema.get_field_index("row_id"), "row_id", pa.array(range(5000, 5008)))
    pq.write_table(stray, tmp_path / "stray.parquet")
    other = run_job(tabular_spec(tmp_path / "stray.parquet", tmp_path / "other"))
    pq.write_table(tabular_table(20), tmp_path / "data.parquet")
    staging = RunStaging.open(tmp_path / "runs", "t")
    staging.create(staged_job(spec_to_dict(tabular_spec(tmp_path / "data.parquet", tmp_path / "runs")),
                              model_fingerprint(linear()).to_json()))
    staging.layout.instances_dir.mkdir()
    [wrong] = (other.layout.root / "instances").glob("part-*.parquet")
    shutil.copy(wrong, staging.layout.instances_dir / wrong.name)

    assert cli_main(["run", "--resume", str(tmp_path / "runs" / "t"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "batches hold 28 instances, expected 20" in err and "stays staged" in err
    assert not (tmp_path / "runs" / "t").exists()
    [kept] = (tmp_path / "runs" / ".staging").glob("t-*")
    assert (kept / JOB_FILE).is_file() and (kept / "instances" / wrong.name).is_file()

    # With the wrong part gone, resuming again finishes the run.
    (kept / "instances" / wrong.name).unlink()
    assert cli_main(["run", "--resume", str(tmp_path / "runs" / "t"), "--no-progress"]) == 0
    assert RunReader(tmp_path / "runs" / "t").instances()["instance_id"].to_pylist() == list(range(1000, 1020))


def test_a_staging_taken_over_by_resume_refuses_late_writes(tmp_path):
    import pyarrow as pa

    from netloupe.contract.errors import RunError
    from netloupe.storage.layout import RunStaging, staged_job, worker_layout, write_part

    spec_data = {"output": {"root": str(tmp_path / "runs"), "run_name": "t"}}
    interrupted = RunStaging.open(tmp_path / "runs", "t")
    interrupted.create(staged_job(spec_data, {"digest": "blake2b-128:00", "tensors": {}}))
    late, filesystem = worker_layout(interrupted.worker_root)
    write_part(late.instances_dir, "k1", pa.table({"instance_id": [1]}), filesystem, late.root)

    resumed, staged_spec = RunStaging.resume(tmp_path / "runs" / "t")
    assert staged_spec == spec_data and resumed.staged_fingerprint["digest"] == "blake2b-128:00"
    assert resumed.layout.root != interrupted.layout.root
    assert (resumed.layout.instances_dir / "part-k1.parquet").exists()
    # A worker of the killed driver, writing where it was told to, is refused and makes nothing.
    with pytest.raises(RunError, match="is gone"):
        write_part(late.activations_dir("fc"), "k2", pa.table({"instance_id": [2]}), filesystem, late.root)
    assert not interrupted.layout.root.exists()
    # The resumed run's own workers write, making the directories they need.
    current, _ = worker_layout(resumed.worker_root)
    write_part(current.activations_dir("fc"), "k2", pa.table({"instance_id": [2]}), filesystem, current.root)
    assert (resumed.layout.activations_dir("fc") / "part-k2.parquet").exists()


def test_resume_without_an_interrupted_run_says_so(tmp_path, capsys):
    from netloupe.pipeline.cli import main as cli_main

    assert cli_main(["run", "--resume", str(tmp_path / "runs" / "nothing")]) == 2
    assert "nothing to resume" in capsys.readouterr().err


def test_stagings_of_runs_whose_names_share_a_prefix_are_not_confused(tmp_path, capsys):
    from netloupe.pipeline.cli import main as cli_main
    from netloupe.storage.layout import RunStaging, staged_job

    other = RunStaging.open(tmp_path / "runs", "t-2")
    other.create(staged_job({"output": {"root": str(tmp_path / "runs"), "run_name": "t-2"}},
                            {"digest": "blake2b-128:00", "tensors": {}}))
    assert cli_main(["run", "--resume", str(tmp_path / "runs" / "t")]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert other.layout.root.is_dir()  # t-2's staging was not taken
    # A staging whose spec names another run is refused, not committed under the wrong name.
    stray = tmp_path / "runs" / ".staging" / "t-0123456789ab"
    other.layout.root.rename(stray)
    assert cli_main(["run", "--resume", str(tmp_path / "runs" / "t")]) == 2
    assert "is for run 't-2'" in capsys.readouterr().err
    assert stray.is_dir()  # refused before it was taken over: still where it was


def test_ctrl_c_keeps_the_staging_and_resume_finishes_it(ray_local, tmp_path, monkeypatch):
    import netloupe.pipeline.driver as driver
    from netloupe.contract.spec import parse_spec
    from netloupe.storage.layout import JOB_FILE, RunStaging

    pq.write_table(tabular_table(40), tmp_path / "data.parquet")
    spec = tabular_spec(tmp_path / "data.parquet", tmp_path / "runs")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(driver, "build_catalog", interrupted)  # Ctrl-C after every batch is done
    with pytest.raises(KeyboardInterrupt):
        run_job(spec)
    [staged] = (tmp_path / "runs" / ".staging").glob("t-*")
    assert (staged / JOB_FILE).is_file() and len(list(staged.glob("instances/part-*.parquet"))) == 3
    assert not (tmp_path / "runs" / "t").exists()

    monkeypatch.undo()
    staging, spec_data = RunStaging.resume(tmp_path / "runs" / "t")
    result = run_job(parse_spec(spec_data), resume=staging)
    assert result.manifest.timings["resumed_rows"] == 40  # nothing computed again
    assert RunReader(result.layout.root).instances()["instance_id"].to_pylist() == list(range(1000, 1040))
    # The same model before and after the interruption, recognisably.
    fingerprint = model_fingerprint(linear())
    assert staging.staged_fingerprint == fingerprint.to_json()
    assert result.manifest.model_identity.fingerprint == fingerprint.digest
    assert result.manifest.model_identity.tensor_fingerprints == fingerprint.tensors


def test_resume_refuses_a_model_that_changed_since_the_interruption(ray_local, tmp_path, monkeypatch, capsys):
    """Kept batches came from the interrupted run's model; new ones from another model would
    mix two models in one run."""
    import netloupe.pipeline.driver as driver
    from netloupe.pipeline.cli import main as cli_main

    pq.write_table(tabular_table(40), tmp_path / "data.parquet")
    weights = tmp_path / "w.safetensors"
    save_file(Linear3().state_dict(), str(weights))
    spec = tabular_spec(tmp_path / "data.parquet", tmp_path / "runs", model={"factory": "tests.tiny_models:linear",
                                                                            "weights": str(weights)})

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(driver, "build_catalog", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_job(spec)
    monkeypatch.undo()
    save_file({k: v * 2 for k, v in Linear3().state_dict().items()}, str(weights))  # retrained meanwhile

    assert cli_main(["run", "--resume", str(tmp_path / "runs" / "t"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "finished batches were explained by another model: 2 of its parameters and buffers differ" in err
    assert "(fc.bias, fc.weight)" in err and "changed since" in err
    assert len(list((tmp_path / "runs" / ".staging").glob("t-*/instances/part-*.parquet"))) == 3  # kept
    save_file(Linear3().state_dict(), str(weights))  # the model restored, the resume goes on
    assert cli_main(["run", "--resume", str(tmp_path / "runs" / "t"), "--no-progress"]) == 0
    assert RunReader(tmp_path / "runs" / "t").instances().num_rows == 40
