"""What the tests share besides fixtures: small Parquet datasets, spec builders, waiting for a
condition, free ports, and stopping only the processes a test started.

Tests stop only what they started: a process picked by what it is called could be a user's
own run on the same machine. A test that starts Ray processes gives them a directory of its own,
made fresh for it (``--temp-dir`` / ``RAY_TMPDIR``), and stops exactly the processes that name
that directory, and theirs.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq

from netloupe.contract.spec import JobSpec, parse_spec


def tabular_table(n: int = 50, seed: int = 0) -> pa.Table:
    """Three numeric features, an integer id, a label and a categorical metadata column."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3)).astype(np.float32)
    return pa.table({
        "row_id": pa.array(np.arange(1000, 1000 + n, dtype=np.int64)),
        "x0": x[:, 0], "x1": x[:, 1], "x2": x[:, 2],
        "label": pa.array(rng.integers(0, 2, n).astype(np.int64)),
        "group": pa.array(np.where(np.arange(n) % 3 == 0, "a", "b").astype(object)),
    })


def image_table(n: int = 40, seed: int = 0) -> pa.Table:
    """1×4×4 float images in a list column, string ids, labels."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 1, size=(n, 16)).astype(np.float32)
    return pa.table({
        "key": pa.array([f"img-{i:03d}" for i in range(n)]),
        "pixels": pa.FixedSizeListArray.from_arrays(pa.array(images.reshape(-1)), 16),
        "label": pa.array(rng.integers(0, 2, n).astype(np.int64)),
    })


def tabular_spec_data(data_path, out_root, **changes) -> dict:
    """A spec for :func:`tests.tiny_models.linear` over :func:`tabular_table`; ``changes``
    set keys by ``section__key`` (``execution__num_workers=2``)."""
    data = {
        "model": {"factory": "tests.tiny_models:linear"},
        "dataset": {"source": str(data_path), "feature_columns": ["x0", "x1", "x2"],
                    "id_column": "row_id", "metadata_columns": ["group"]},
        "layers": [{"name": "fc"}],
        "attributions": [{"method": "saliency"}],
        "execution": {"batch_size": 16, "num_workers": 1},
        "output": {"root": str(out_root), "run_name": "t"},
    }
    for dotted, value in changes.items():
        node = data
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return data


def tabular_spec(data_path, out_root, **changes) -> JobSpec:
    return parse_spec(tabular_spec_data(data_path, out_root, **changes))


TEXTS = [
    "the movie was great", "a boring film", "not very good acting and bad plot", "fun",
    "The FILM is awful, the acting is bad and the plot is boring and not fun at all",
    "great great great", "an unknown word", "good", "the plot was not awful", "acting",
    "bad movie", "very very fun film and a great plot",
]
"""Texts of :func:`tiny_bert_checkpoint`'s vocabulary (and words it lacks: [UNK])."""


TINY_BERT_WORDS = "the a movie film was is great good bad awful boring fun and not very plot acting".split()
"""The words of :func:`tiny_bert_checkpoint`'s vocabulary (beside its special tokens)."""


def text_table() -> pa.Table:
    """:data:`TEXTS` with string ids ``t00``.. and alternating labels."""
    return pa.table({"key": [f"t{i:02d}" for i in range(len(TEXTS))], "text": TEXTS,
                     "label": pa.array([i % 2 for i in range(len(TEXTS))], pa.int64())})


def tiny_bert_checkpoint(directory: Path) -> Path:
    """A two-layer BERT sentiment classifier and its WordPiece tokenizer (17 words), saved
    together in ``directory`` as ``save_pretrained`` writes them (weights large enough that
    attributions are not ~0)."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + TINY_BERT_WORDS)}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                           special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]",
                                                     cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32, num_labels=2,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, initializer_range=0.5)
    transformers.BertForSequenceClassification(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def wait_until(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.1):
    """Poll ``condition`` until it returns something true, and return that; fail the test
    with ``what`` (and the last value) if ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout:g} s for {what}; last seen: {value!r}")
        time.sleep(interval)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def private_ray_dir() -> Path:
    """A directory for one test's Ray processes (short: Ray's socket paths must fit 107 bytes)."""
    return Path(tempfile.mkdtemp(prefix="nl-ray-", dir="/tmp"))


def processes_of(marker: str | os.PathLike) -> list[psutil.Process]:
    """Every process whose command line names ``marker`` (a test's private directory)."""
    marker, found = str(marker), []
    # Not this process nor those that started it (a shell's command line may name the marker too).
    own = {os.getpid()} | {p.pid for p in psutil.Process().parents()}
    for process in psutil.process_iter(["cmdline"]):
        if process.pid not in own and any(marker in part for part in (process.info["cmdline"] or [])):
            found.append(process)
    return found


def stop_processes_of(marker: str | os.PathLike, timeout: float = 10) -> None:
    """Stop the processes that name ``marker``, and theirs: SIGTERM, then SIGKILL what is
    left after ``timeout``. Nothing else on the machine is touched.

    Ten seconds, not more: a Ray head's GCS server and autoscaler monitor outlive a SIGTERM by
    over a minute (measured: they were still up after 55 s while the raylet left in 12),
    which cost the cluster tests a minute of teardown; Ray's own shutdown grace is 16 s."""
    processes = processes_of(marker)
    for process in list(processes):
        try:
            processes += process.children(recursive=True)
        except psutil.NoSuchProcess:
            pass
    for process in processes:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=timeout)


def slow_run_spec(data_path, out_root, tmp_path) -> Path:
    """A spec file for a run of 160 rows in 10 batches slow enough (0.3 s each) to kill mid-way."""
    import yaml

    pq.write_table(tabular_table(160), data_path)
    data = tabular_spec_data(data_path, out_root,
                             model={"factory": "tests.tiny_models:slow_linear", "kwargs": {"delay": 0.3}},
                             execution={"batch_size": 16, "num_workers": 1, "threads_per_worker": 1,
                                        "chunk_rows": 64})
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(data))
    return spec_path


def kill_driver_mid_run(spec_path, finished_batches: Callable[[], int], at_least: int = 3,
                        timeout: float = 240) -> Path:
    """Run ``netloupe run spec_path`` in a process and SIGKILL it, with its local Ray, once
    ``finished_batches()`` counts ``at_least`` batches. Returns the driver's private Ray
    directory: its Ray workers can outlive it by a batch; :func:`processes_of` finds them."""
    ray_dir = private_ray_dir()
    # The driver in a session of its own, so that killing its group takes its local Ray too.
    driver = subprocess.Popen([sys.executable, "-m", "netloupe.pipeline.cli", "run", str(spec_path), "--no-progress"],
                              start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, "RAY_TMPDIR": str(ray_dir)})
    try:
        def enough() -> bool:
            assert driver.poll() is None, "the run ended before it could be interrupted"
            return finished_batches() >= at_least

        wait_until(enough, timeout, f"{at_least} finished batches", interval=0.2)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=60)
    return ray_dir
