"""What a run prints: a line per stage and a steady progress line in a log, a short summary
at the end, and commands spelled as a user types them."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow.parquet as pq
import yaml

from netloupe.pipeline.cli import netloupe_command
from netloupe.pipeline.progress import ProgressLines, count, duration, size
from tests.helpers import tabular_spec_data, tabular_table


def test_durations_and_counts_read_as_a_person_says_them():
    assert [duration(s) for s in (0.4, 42, 185, 3725)] == ["0 s", "42 s", "3 min 05 s", "1 h 02 min"]
    assert [count(1, "layer"), count(3, "layer"), count(12000, "instance"), count(10, "class"), count(4, "batch")] == [
        "1 layer", "3 layers", "12,000 instances", "10 classes", "4 batches"]
    assert [size(812_000), size(81_351_782), size(3_200_000_000)] == ["812 KB", "81.4 MB", "3.20 GB"]


def test_the_explain_pass_reports_at_a_steady_interval_without_waiting_for_a_batch():
    lines, reported = [], threading.Event()

    def write(text):
        lines.append(text)
        if "explained 300 of 1,000 instances (30%)" in text:
            reported.set()

    progress = ProgressLines(write, interval_s=0.01)
    progress.explaining(1000)
    assert "the workers are starting" in progress.line()
    progress.explained(100)
    assert progress.line() == "explained 100 of 1,000 instances (10%)"  # no rate from one batch
    progress.explained(200)
    try:
        assert reported.wait(timeout=30), lines
    finally:
        progress.explaining_done()
    assert "per second, about" in lines[-1] and lines[-1].endswith("left")
    assert "the workers are starting" in ProgressLines(write).line()


def test_a_run_into_a_log_prints_a_few_lines_of_its_own(tmp_path):
    """stdout not a terminal (a job's log, CI): Ray Data's dozen-line reports stay out."""
    pq.write_table(tabular_table(40), tmp_path / "data.parquet")
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(tabular_spec_data(tmp_path / "data.parquet", tmp_path / "runs")))
    done = subprocess.run([sys.executable, "-m", "netloupe.pipeline.cli", "run", str(spec)], capture_output=True,
                          text=True, timeout=300, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for stage in ("validated on 4 rows", "explaining 40 instances with 1 worker", "explained 40 instances in",
                  "building the SQL catalog", "run 't' committed: 40 instances explained in"):
        assert stage in out, out
    everything = out + done.stderr
    assert "logging_progress" not in everything and "Starting execution of Dataset" not in everything
    assert len(out.splitlines()) < 20, out


def test_commands_are_spelled_as_a_user_types_them(tmp_path, monkeypatch):
    """After `make demo` the script is .venv/bin/netloupe (not on PATH); installed, netloupe."""
    script = tmp_path / "venv" / "bin" / "netloupe"
    script.parent.mkdir(parents=True)
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(script), "run", "spec.yaml"])
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert netloupe_command() == "venv/bin/netloupe"
    monkeypatch.setenv("PATH", f"{script.parent}:/usr/bin:/bin")
    assert netloupe_command() == "netloupe"


def test_methods_lists_defaults_and_where_captum_differs(capsys):
    from netloupe.pipeline.cli import main as cli_main

    assert cli_main(["methods"]) == 0
    out = capsys.readouterr().out
    lines = [" ".join(line.split()) for line in out.splitlines()]
    assert "n_steps 32 <- Captum's default: 50" in lines
    assert "method 'gausslegendre'" in lines  # the same as Captum's: no note
    assert "n_samples 8 <- Captum's default: 5" in lines
    assert "sliding_window_shapes all channels x about 1/7 of each side <- Captum requires it" in lines
    assert "nt_samples 8 <- Captum's default: 5" in lines
    tokens = lines[lines.index("on texts (dataset.text_column), one value per token (workers/token_methods.py):") + 1:]
    assert [line.split()[0] for line in tokens] == ["integrated_gradients", "input_x_gradient", "saliency", "occlusion",
                                                      "attention", "attention_rollout"]
    assert "n_steps 32;" in tokens[0]  # as for images


def test_a_run_in_a_terminal_keeps_ray_datas_bars(tmp_path):
    """stdout a terminal (a pseudo-terminal here, with a size): Ray Data draws its bars."""
    import fcntl
    import pty
    import select
    import struct
    import termios

    pq.write_table(tabular_table(40), tmp_path / "data.parquet")
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(tabular_spec_data(tmp_path / "data.parquet", tmp_path / "runs")))
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    run = subprocess.Popen([sys.executable, "-m", "netloupe.pipeline.cli", "run", str(spec)], stdout=follower,
                           stderr=follower, cwd=Path(__file__).parents[1])
    os.close(follower)
    shown = b""
    while True:
        ready, _, _ = select.select([leader], [], [], 1)
        try:
            chunk = os.read(leader, 65536) if ready else b""
        except OSError:  # the terminal closed: the run ended
            break
        shown += chunk
        if not chunk and run.poll() is not None:
            break
    assert run.wait(timeout=300) == 0, shown.decode(errors="replace")[-3000:]
    text = shown.decode(errors="replace")
    assert "- MapBatches(ExplainWorker):" in text and "%|" in text  # the bars
    assert "logging_progress" not in text and "] explaining 40 instances with 1 worker" in text
