"""TracIn at scale (issue 18): netloupe's influence stage against Captum's ``TracInCPFast``
called directly on the same model, training set and instances.

    .venv/bin/python benchmarks/bench_influence.py [--train 50000] [--explained 10000]
        [--small-train 5000] [--small-explained 1000] [--repeats 3] [--workers 2]

The model is the zoo's MNIST CNN (its last linear layer ``fc2``: 128 inputs, 10 classes); the
training set is ``mnist-variants`` at ``--train`` rows, the explained instances its first
``--explained``. Both sides compute each instance's 10 proponents and 10 opponents of the
loss at its predicted class (Captum: one ``influence`` call for each end).

1. The ratio, interleaved (this VM drifts): at the small size, ``--repeats`` rounds of
   netloupe's stage (``run_influence``: Ray tasks, factors, scoring, merge) then Captum.
2. End to end at the large size: ``netloupe run`` of a spec with nothing but predictions and
   influence (validation, Ray start, explain pass, influence stage, catalog, commit), then
   Captum on the same data once; their top-1 proponents compared.

Not a test: prints lines for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from captum.influence import TracInCPFast
from torch import nn
from torch.utils.data import TensorDataset

from netloupe.contract.spec import parse_spec
from netloupe.pipeline.driver import run_job, validate
from netloupe.pipeline.influence import run_influence
from netloupe.pipeline.progress import RunProgress
from netloupe.pipeline.ray_cluster import ensure_ray
from netloupe.pipeline.zoo import trained_mnist_cnn
from netloupe.workers.inputs import InputDecoder

K = 10


def spec(train: int, explained: int, workers: int, root: Path, name: str):
    return parse_spec({
        "model": {"factory": "netloupe.pipeline.zoo:trained_mnist_cnn"},
        "dataset": {"source": "mnist-variants", "rows": train, "limit": explained},
        "influence": {"layer": "fc2", "k": K, "batch_size": 2048},
        "execution": {"batch_size": 2048, "num_workers": workers},
        "output": {"root": str(root), "run_name": name},
    })


def tensors(path: str, rows: int, preprocess) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    table = pq.read_table(path).slice(0, rows)
    decoder = InputDecoder("image", None, preprocess)
    return (torch.from_numpy(decoder(table)), torch.tensor(table["label"].to_numpy()),
            table["instance_id"].to_numpy())


def captum_top(model: nn.Module, train_x, train_y, test_x) -> tuple[float, np.ndarray]:
    """Seconds for both ends' top-k, and the proponents' training indices."""
    started = time.perf_counter()
    tracin = TracInCPFast(model, model.fc2, TensorDataset(train_x, train_y), ["current"],
                          checkpoints_load_func=lambda _model, _path: 1.0,
                          loss_fn=nn.CrossEntropyLoss(reduction="sum"), batch_size=2048)
    with torch.no_grad():
        predicted = model(test_x).argmax(1)
    proponents, _ = tracin.influence((test_x, predicted), k=K, proponents=True)
    tracin.influence((test_x, predicted), k=K, proponents=False)
    return time.perf_counter() - started, proponents.numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=50000)
    parser.add_argument("--explained", type=int, default=10000)
    parser.add_argument("--small-train", type=int, default=5000)
    parser.add_argument("--small-explained", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = trained_mnist_cnn().eval()
    with tempfile.TemporaryDirectory(prefix="bench-influence-") as tmp:
        root = Path(tmp)
        small = spec(args.small_train, args.small_explained, args.workers, root, "small")
        checked = validate(small)
        ensure_ray(small.execution.ray_address)
        train_x, train_y, _ = tensors(checked.influence.training.path, args.small_train, checked.dataset.preprocess)
        test_x = train_x[:args.small_explained]
        ours, theirs = [], []
        for _ in range(args.repeats):
            started = time.perf_counter()
            run_influence(small, checked.influence, [small.model], checked.dataset, RunProgress())
            ours.append(time.perf_counter() - started)
            theirs.append(captum_top(model, train_x, train_y, test_x)[0])
        print(f"small: {args.small_train:,} training x {args.small_explained:,} explained, k={K} both ends, "
              f"{args.workers} workers")
        print(f"  netloupe stage  {' '.join(f'{s:.2f}' for s in ours)} s (median {statistics.median(ours):.2f})")
        print(f"  captum          {' '.join(f'{s:.2f}' for s in theirs)} s (median {statistics.median(theirs):.2f})")
        print(f"  ratio captum / netloupe per round: "
              f"{' '.join(f'{t / o:.1f}x' for o, t in zip(ours, theirs))}")

        large = spec(args.train, args.explained, args.workers, root, "large")
        started = time.perf_counter()
        result = run_job(large)
        total = time.perf_counter() - started
        info = result.manifest.influence
        print(f"large: {args.train:,} training x {args.explained:,} explained, end to end {total:.1f} s "
              f"(influence stage {info.seconds:.1f} s)")
        train_x, train_y, train_ids = tensors(info.training_path, args.train, checked.dataset.preprocess)
        seconds, proponents = captum_top(model, train_x, train_y, train_x[:args.explained])
        print(f"  captum TracInCPFast on the same data: {seconds:.1f} s "
              f"({seconds / info.seconds:.1f}x the stage)")
        stored = pq.read_table(result.layout.influence_path).to_pandas()
        top = stored[(stored["sign"] == "proponent") & (stored["rank"] == 1)].set_index("instance_id")["train_id"]
        same = np.mean(top.loc[train_ids[:args.explained]].to_numpy() == train_ids[proponents[:, 0]])
        print(f"  top-1 proponent equal to Captum's for {same:.1%} of the instances")


if __name__ == "__main__":
    main()
