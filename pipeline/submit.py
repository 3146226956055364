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
from collections.abc import Iterator
from pathlib import Path

from netloupe.contract.errors import NetloupeError, SpecError
from netloupe.contract.spec import load_spec, parse_overrides

WORKING_DIR_EXCLUDES = [".venv", "venv", ".git", "runs", "__pycache__", "*.egg-info", "test-artifacts"]
"""What is never uploaded with a spec's directory (Ray caps a working directory at 500 MB)."""
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


def job_client(address: str | None):
    from ray.job_submission import JobSubmissionClient

    found = cluster_address(address)
    try:
        return JobSubmissionClient(found)
    except Exception as error:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, ...
        hint = ("; with token authentication on, set RAY_AUTH_MODE=token and the cluster's token "
                "(~/.ray/auth_token, RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH)") if "401" in str(error) or \
            "nauthorized" in str(error) else ""
        raise SubmitError(f"cannot reach the Ray job server at {found}: {error}{hint}") from None


def _shared_root(root: str) -> None:
    """A run submitted to a cluster must land where the submitter can find it."""
    if "://" in root or Path(root).is_absolute():
        return
    raise SpecError(f"output.root is {root!r}, a relative path: on the cluster it would resolve inside the "
                    "job's temporary working directory and the run would be lost. Give a path every node "
                    "shares, e.g. --set output.root=/mnt/shared/runs")


def submit(spec_path: str | os.PathLike, address: str | None, overrides: list[str],
           submission_id: str | None = None) -> str:
    """Submit the spec as a Ray job; return its submission id."""
    spec_path = Path(spec_path).resolve()
    spec = load_spec(spec_path, parse_overrides(overrides))  # a bad spec fails here, not on the cluster
    _shared_root(spec.output.root)
    # No --no-progress: a job's log is not a terminal, so the run writes a line every interval.
    command = ["netloupe", "run", spec_path.name]
    for pair in [*overrides, "execution.ray_address=auto"]:
        command += ["--set", pair]
    client = job_client(address)
    return client.submit_job(
        entrypoint=shlex.join(command), submission_id=submission_id,
        runtime_env={"working_dir": str(spec_path.parent), "excludes": WORKING_DIR_EXCLUDES},
        metadata={"netloupe_spec": spec_path.name, "netloupe_run": spec.output.run_name},
    )


def follow_logs(client, submission_id: str, poll_seconds: float = 1.0) -> Iterator[str]:
    """The job's log text as it grows, until the job ends."""
    shown = 0
    while True:
        status = str(client.get_job_status(submission_id).value)
        logs = client.get_job_logs(submission_id)
        if len(logs) > shown:
            yield logs[shown:]
            shown = len(logs)
        if status in TERMINAL:
            return
        time.sleep(poll_seconds)


def job_rows(client) -> list[dict]:
    """Every job the cluster knows, newest first, as plain rows for a table."""
    rows = []
    for job in client.list_jobs():
        rows.append({"submission_id": job.submission_id, "status": str(job.status.value),
                     "entrypoint": job.entrypoint, "start_time": job.start_time, "message": job.message or ""})
    return sorted(rows, key=lambda row: row["start_time"] or 0, reverse=True)
