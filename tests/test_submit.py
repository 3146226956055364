"""Submitting without a cluster to talk to, or to one that has just started: one clear line,
never a traceback. (tests/test_cluster.py submits to a real two-node cluster.)"""

from __future__ import annotations

import pytest
import yaml

import netloupe.pipeline.submit as submit_module
from netloupe.contract.errors import SpecError
from netloupe.pipeline.cli import main as cli_main
from netloupe.pipeline.submit import JobServer, SubmitError, cluster_address, prepare_job
from tests.helpers import free_port, tabular_spec_data


def test_no_job_server_at_the_address_is_one_line(tmp_path, capsys):
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(tabular_spec_data(tmp_path / "data.parquet", tmp_path / "runs")))
    address = f"http://127.0.0.1:{free_port()}"
    for command in (["submit", str(spec), "--address", address], ["jobs", "list", "--address", address],
                    ["jobs", "logs", "raysubmit_x", "--address", address]):
        assert cli_main(command) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"netloupe: error: cannot reach the Ray job server at {address}: ")
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


class _AgentStartingClient:
    """Ray's client as a just-started cluster answers it: no job agent for the first tries."""

    def __init__(self, refusals: int):
        self.refusals, self.tries = refusals, 0

    def submit_job(self, **job):
        self.tries += 1
        if self.tries <= self.refusals:
            # As Ray's job server answers it: status 500, its traceback as the body.
            raise RuntimeError("Request failed with status code 500: Traceback (most recent call last):\n"
                               '  File "job_head.py", line 420, in submit_job\n    raise ...\n'
                               "ray.exceptions.RayError: No available agent to submit job, please try again later.")
        return "raysubmit_ready"


def _server(client, notes) -> JobServer:
    server = JobServer.__new__(JobServer)
    server.address, server.client, server.notify = "http://127.0.0.1:1", client, notes.append
    return server


def test_a_cluster_that_has_just_started_is_waited_for(monkeypatch):
    monkeypatch.setattr(submit_module, "AGENT_POLL_S", 0.01)
    notes = []
    client = _AgentStartingClient(refusals=3)
    assert _server(client, notes).submit(entrypoint="netloupe run job.yaml") == "raysubmit_ready"
    assert client.tries == 4 and len(notes) == 1 and "waiting for the cluster's job agent" in notes[0]


def test_waiting_for_the_agent_is_bounded_and_says_what_to_check(monkeypatch):
    monkeypatch.setattr(submit_module, "AGENT_POLL_S", 0.01)
    monkeypatch.setattr(submit_module, "AGENT_WAIT_S", 0.05)
    with pytest.raises(SubmitError, match=r"has no job agent after 0.05 s; check that its head node is up"):
        _server(_AgentStartingClient(refusals=10**6), []).submit(entrypoint="netloupe run job.yaml")


def test_other_submission_failures_are_one_line_that_keeps_the_cause():
    class Refusing:
        def __init__(self, text):
            self.text = text

        def submit_job(self, **job):
            raise RuntimeError(self.text)

    with pytest.raises(SubmitError) as error:
        _server(Refusing("Request failed with status code 401: Unauthorized\nmore text"), []).submit(entrypoint="x")
    assert "\n" not in str(error.value) and "401: Unauthorized" in str(error.value)
    assert "RAY_AUTH_MODE=token" in str(error.value)
    server_side = ("Request failed with status code 500: Traceback (most recent call last):\n  File \"x.py\", line 1\n"
                   "ValueError: working_dir is larger than 500 MiB")
    with pytest.raises(SubmitError) as error:
        _server(Refusing(server_side), []).submit(entrypoint="x")
    assert str(error.value) == ("submitting to http://127.0.0.1:1: Request failed with status code 500: "
                                "ValueError: working_dir is larger than 500 MiB")


def test_submit_refuses_a_relative_output_root_and_needs_an_address(tmp_path, monkeypatch):
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(tabular_spec_data("data.parquet", "runs")))
    with pytest.raises(SpecError, match="relative path"):
        prepare_job(spec, [])
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    with pytest.raises(SubmitError, match="--address"):
        cluster_address(None)
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    assert cluster_address(None) == "http://127.0.0.1:8265"
