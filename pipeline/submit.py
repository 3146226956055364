"""Running a job spec on a Ray cluster as a Ray job (Ray's Job Submission API, over HTTP).

``netloupe submit SPEC --address http://HOST:8265`` uploads the spec's directory as the
job's working directory and runs ``netloupe run SPEC`` there, connected to the cluster
(``execution.ray_address=auto``). The address and the token are found as Ray's own
``ray job`` commands find them: ``--address``, else ``RAY_API_SERVER_ADDRESS`` or
``RAY_ADDRESS``; the token (with ``RAY_AUTH_MODE=token``) from ``RAY_AUTH_TOKEN``,
``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``, read by Ray's client itself.
"""

from __future__ import annotations

import os
import shlex
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from netloupe.contract.errors import NetloupeError, SpecError
from netloupe.contract.spec import load_spec, parse_overrides

WORKING_DIR_EXCLUDES = [".venv", "venv", ".git", "runs", "__pycache__", "*.egg-info", "test-artifacts"]
"""What is never uploaded with a spec's directory (Ray caps a working directory at 500 MB)."""
AGENT_POLL_S = 2.0
"""Seconds between two tries while the job agent is not up."""
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
"""Job states that do not change any more."""


class SubmitError(NetloupeError):
    """A job that cannot be submitted or followed (no cluster, unknown id, a failed job)."""


def cluster_address(address: str | None) -> str:
    """The job server's address, as ``ray job`` reads it."""
    found = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not found:
        raise SubmitError("no cluster address: pass --address http://HOST:8265 (the head node's dashboard port) "
                          "or set RAY_ADDRESS, as for `ray job submit`")
    return found


def _shared_root(root: str) -> None:
    """A run submitted to a cluster must land where the submitter can find it."""
    if "://" in root or Path(root).is_absolute():
        return
    raise SpecError(f"output.root is {root!r}, a relative path: on the cluster it would resolve inside the "
                    "job's temporary working directory and the run would be lost. Give a path every node "
                    "shares, e.g. --set output.root=/mnt/shared/runs")


AGENT_WAIT_S = 180
"""How long a submission waits for the job agent of a cluster that has just started."""


def _one_line(error: BaseException) -> str:
    """The error in one line. Ray's job server answers a failure with the server's traceback
    as the body ("Request failed with status code 500: Traceback ..."): then the status and the
    traceback's last line, which says what went wrong."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if len(lines) > 1 and any(line.startswith("Traceback") or line.endswith("Traceback (most recent call last):")
                              for line in lines):
        status = lines[0].split("Traceback")[0].rstrip(": ")
        return f"{status}: {lines[-1]}" if status else lines[-1]
    return lines[0]


@contextmanager
def _one_line_errors(what: str):
    """Ray's client fails with RuntimeError (HTTP errors), ConnectionError and the like, and
    multi-line texts: each becomes one SubmitError line saying what was being done."""
    try:
        yield
    except SubmitError:
        raise
    except Exception as error:  # noqa: BLE001 - whatever the client raises, the user gets one line
        text = _one_line(error)
        hint = ("; with token authentication on, set RAY_AUTH_MODE=token and the cluster's token "
                "(~/.ray/auth_token, RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH)"
                if "401" in text or "nauthorized" in text else "")
        raise SubmitError(f"{what}: {text}{hint}") from None


class JobServer:
    """A cluster's Ray job server (Job Submission API over HTTP); every failure of it is one
    :class:`SubmitError` line, never a traceback."""

    def __init__(self, address: str | None, notify: Callable[[str], None] | None = None):
        from ray.job_submission import JobSubmissionClient

        self.address = cluster_address(address)
        self.notify = notify or (lambda _text: None)
        """Told what the client is waiting for (the CLI prints it)."""
        with _one_line_errors(f"cannot reach the Ray job server at {self.address}"):
            self.client = JobSubmissionClient(self.address)

    def submit(self, **job) -> str:
        """Submit a job; a cluster that has just started has no job agent yet for a while
        ("No available agent"): wait for it, up to :data:`AGENT_WAIT_S`."""
        deadline = time.monotonic() + AGENT_WAIT_S
        told = False
        while True:
            try:
                with _one_line_errors(f"submitting to {self.address}"):
                    return self.client.submit_job(**job)
            except SubmitError as error:
                if "No available agent" not in str(error):
                    raise
                if time.monotonic() > deadline:
                    raise SubmitError(f"the cluster at {self.address} has no job agent after {AGENT_WAIT_S} s; "
                                      "check that its head node is up (`ray status`)") from None
                if not told:
                    self.notify(f"waiting for the cluster's job agent (a cluster that has just started needs "
                                f"a moment; up to {AGENT_WAIT_S} s)")
                    told = True
            time.sleep(AGENT_POLL_S)  # polls a remote service until it is ready

    def info(self, submission_id: str):
        with _one_line_errors(f"job {submission_id!r}"):
            return self.client.get_job_info(submission_id)

    def logs(self, submission_id: str) -> str:
        with _one_line_errors(f"job {submission_id!r}"):
            return self.client.get_job_logs(submission_id)

    def stop(self, submission_id: str) -> bool:
        with _one_line_errors(f"job {submission_id!r}"):
            return self.client.stop_job(submission_id)

    def follow(self, submission_id: str, poll_seconds: float = 1.0) -> Iterator[str]:
        """The job's log text as it grows, until the job ends."""
        shown = 0
        while True:
            status = str(self.info(submission_id).status.value)
            logs = self.logs(submission_id)
            if len(logs) > shown:
                yield logs[shown:]
                shown = len(logs)
            if status in TERMINAL:
                return
            time.sleep(poll_seconds)

    def jobs(self) -> list[dict]:
        """Every job the cluster knows, newest first, as plain rows for a table."""
        with _one_line_errors(f"listing the jobs of {self.address}"):
            listed = self.client.list_jobs()
        rows = [{"submission_id": job.submission_id, "status": str(job.status.value), "entrypoint": job.entrypoint,
                 "start_time": job.start_time, "message": job.message or ""} for job in listed]
        return sorted(rows, key=lambda row: row["start_time"] or 0, reverse=True)


def prepare_job(spec_path: str | os.PathLike, overrides: list[str], submission_id: str | None = None) -> dict:
    """The job that runs the spec on a cluster (the arguments of :meth:`JobServer.submit`); a
    bad spec, or one the cluster could not run, fails here, before anything is sent."""
    spec_path = Path(spec_path).resolve()
    spec = load_spec(spec_path, parse_overrides(overrides))
    _shared_root(spec.output.root)
    # No --no-progress: a job's log is not a terminal, so the run writes a line every interval.
    command = ["netloupe", "run", spec_path.name]
    for pair in [*overrides, "execution.ray_address=auto"]:
        command += ["--set", pair]
    return {
        "entrypoint": shlex.join(command), "submission_id": submission_id,
        "runtime_env": {"working_dir": str(spec_path.parent), "excludes": WORKING_DIR_EXCLUDES},
        "metadata": {"netloupe_spec": spec_path.name, "netloupe_run": spec.output.run_name},
    }
