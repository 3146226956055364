"""Faults in the middle of a run: a worker process killed, the driver killed, a failed run.

Every one ends with each instance exactly once or with nothing visible, never half a run.
"""

from __future__ import annotations

import os

import pyarrow.parquet as pq

from pipeline.driver import run_job
from storage.reader import RunReader
from tests.conftest import tabular_spec, tabular_table


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
    result = run_job(spec, progress=False)
    assert marker.exists()  # a worker process really died (SIGKILL) during the run
    reader = RunReader(result.layout.root)
    ids = list(range(1000, 1200))
    assert reader.instances()["instance_id"].to_pylist() == ids
    assert reader.activations("fc")["instance_id"].to_pylist() == ids
    assert reader.attributions("integrated_gradients")["instance_id"].to_pylist() == ids
    # No leftover of the lost batch: the run holds exactly the parts the manifest counts.
    parts = list((result.layout.root / "instances").glob("*.parquet"))
    assert len(parts) == result.manifest["counts"]["parts"]


def test_a_killed_driver_is_resumed_computing_only_what_is_missing(ray_local, tmp_path, capsys):
    import signal
    import subprocess
    import sys
    import time

    import yaml

    from pipeline.cli import main as cli_main
    from tests.conftest import tabular_spec_data

    pq.write_table(tabular_table(160), tmp_path / "data.parquet")
    data = tabular_spec_data(tmp_path / "data.parquet", tmp_path / "runs",
                             model={"factory": "tests.tiny_models:slow_linear", "kwargs": {"delay": 0.3}},
                             execution={"batch_size": 16, "num_workers": 1, "threads_per_worker": 1,
                                        "chunk_rows": 64})
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(data))
    # The driver in a session of its own, so that killing its group takes its local Ray too.
    driver = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(spec_path), "--no-progress"],
                              start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staging_root = tmp_path / "runs" / ".staging"
    deadline = time.monotonic() + 240
    try:
        while True:
            # A batch is finished once its instances part is written (the last of its parts).
            finished = list(staging_root.glob("t-*/instances/part-*.parquet"))
            if len(finished) >= 3:
                break
            assert driver.poll() is None, "the run ended before it could be interrupted"
            assert time.monotonic() < deadline, "no batch finished in time"
            time.sleep(0.2)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=60)
    staged = finished[0].parent.parent
    # The killed driver's Ray workers may finish the batch they hold before they notice it
    # is gone: wait until the staging stops changing.
    count, quiet_since = -1, time.monotonic()
    while time.monotonic() - quiet_since < 3:
        now = len(list(staged.glob("instances/part-*.parquet")))
        if now != count:
            count, quiet_since = now, time.monotonic()
        time.sleep(0.3)
    assert not (tmp_path / "runs" / "t").exists()  # nothing visible
    finished = sorted(staged.glob("instances/part-*.parquet"))
    kept = {p.name: p.stat().st_mtime_ns for p in finished}

    assert cli_main(["run", "--resume", str(tmp_path / "runs" / "t"), "--no-progress"]) == 0
    assert "resuming" in capsys.readouterr().out
    run = tmp_path / "runs" / "t"
    reader = RunReader(run)
    ids = list(range(1000, 1160))
    assert reader.instances()["instance_id"].to_pylist() == ids
    assert reader.attributions("saliency")["instance_id"].to_pylist() == ids
    manifest = reader.manifest
    assert manifest["timings"]["resumed_parts"] == len(kept)
    assert 0 < manifest["timings"]["resumed_rows"] < 160
    # The finished batches were kept as they were, not computed again.
    for name, mtime in kept.items():
        assert (run / "instances" / name).stat().st_mtime_ns == mtime
    assert not (run / "job.json").exists()
    assert not staging_root.exists()


def test_resume_without_an_interrupted_run_says_so(tmp_path, capsys):
    from pipeline.cli import main as cli_main

    assert cli_main(["run", "--resume", str(tmp_path / "runs" / "nothing")]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert cli_main(["run", "--resume", "s3://bucket/runs/r"]) == 2
    assert "not resumed: run the job again" in capsys.readouterr().err
