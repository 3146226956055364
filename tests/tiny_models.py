"""Hand-weighted models whose activations and attributions can be worked out on paper.

They are ordinary model factories (``model.factory: tests.tiny_models:linear``); Ray
workers import them because a local Ray puts the driver's working directory (the
repository root under pytest) on their path.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

#: Weights of :func:`linear`: logit_c = W[c] · x + B[c].
LINEAR_W = [[1.0, 2.0, -1.0], [0.5, -1.0, 3.0]]
LINEAR_B = [0.1, -0.2]

#: The two 2×2 filters of :func:`tiny_cnn` (a vertical-edge and an averaging filter).
CNN_FILTERS = [[[1.0, -1.0], [1.0, -1.0]], [[0.25, 0.25], [0.25, 0.25]]]
CNN_FILTER_BIAS = [0.0, -0.1]
CNN_HEAD_W = [[2.0, -1.0], [-1.0, 1.5]]
CNN_HEAD_B = [0.0, 0.05]


def fixed_linear(weights: list[list[float]], bias: list[float]) -> nn.Linear:
    """An ``nn.Linear`` holding exactly ``weights`` (outputs × inputs) and ``bias``."""
    layer = nn.Linear(len(weights[0]), len(weights))
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weights))
        layer.bias.copy_(torch.tensor(bias))
    return layer


class Linear3(nn.Module):
    """Three features → two logits through one ``fc`` layer."""

    def __init__(self):
        super().__init__()
        self.fc = fixed_linear(LINEAR_W, LINEAR_B)

    def forward(self, x):
        return self.fc(x)


def linear() -> nn.Module:
    return Linear3()


class TinyCNN(nn.Module):
    """1×4×4 image → conv (2 filters, 2×2) → ReLU → mean over space → linear head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 2)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.head = nn.Linear(2, 2)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor(CNN_FILTERS).reshape(2, 1, 2, 2))
            self.conv.bias.copy_(torch.tensor(CNN_FILTER_BIAS))
            self.head.weight.copy_(torch.tensor(CNN_HEAD_W))
            self.head.bias.copy_(torch.tensor(CNN_HEAD_B))

    def forward(self, x):
        return self.head(self.flatten(self.pool(self.relu(self.conv(x)))))


def tiny_cnn() -> nn.Module:
    return TinyCNN()


class ReusedReLU(nn.Module):
    """One ReLU module called twice per forward, as torchvision's ResNet blocks do."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(3, 4)
        self.fc2 = nn.Linear(4, 2)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.fc2(self.relu(self.fc1(x))))


def reused_relu() -> nn.Module:
    torch.manual_seed(0)
    return ReusedReLU()


def raising_factory() -> nn.Module:
    raise ValueError("checkpoint server unreachable")


def not_a_module():
    return {"weights": [1, 2, 3]}


class SeededMLP(nn.Module):
    """``features`` → ``fc1`` (``hidden``) → ``relu`` → ``head`` (``classes``), weights drawn
    from a fixed ``seed`` (by default eight features, 6 hidden, 3 classes)."""

    def __init__(self, features: int = 8, hidden: int = 6, classes: int = 3, seed: int = 7):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.fc1 = nn.Linear(features, hidden)
        self.relu = nn.ReLU()
        self.head = nn.Linear(hidden, classes)
        with torch.no_grad():
            for layer in (self.fc1, self.head):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator))
                layer.bias.copy_(torch.randn(layer.bias.shape, generator=generator) * 0.1)

    def forward(self, x):
        return self.head(self.relu(self.fc1(x)))


def seeded_mlp() -> nn.Module:
    return SeededMLP()


class WideMLP(nn.Module):
    """256 features → ``fc1`` (64) → ``relu`` → ``head`` (4 classes), weights from a fixed seed
    (the streaming test: rows heavy enough that holding them all on the driver would show)."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(11)
        self.fc1 = nn.Linear(256, 64)
        self.relu = nn.ReLU()
        self.head = nn.Linear(64, 4)
        with torch.no_grad():
            for layer in (self.fc1, self.head):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) / layer.in_features ** 0.5)
                layer.bias.zero_()

    def forward(self, x):
        return self.head(self.relu(self.fc1(x)))


def wide_mlp() -> nn.Module:
    return WideMLP()


#: The pixels :func:`region_cnn` looks at: rows 0-1, columns 0-1 of its 1×4×4 input.
REGION = (slice(0, 2), slice(0, 2))


class RegionCNN(nn.Module):
    """A 1×4×4 image model that sees only :data:`REGION`: the input is multiplied by a fixed
    mask (a buffer, not a weight), then a 2×2 conv, ReLU, pooling and a linear head."""

    def __init__(self):
        super().__init__()
        mask = torch.zeros(1, 1, 4, 4)
        mask[(0, 0) + REGION] = 1.0
        self.register_buffer("mask", mask)
        self.conv = nn.Conv2d(1, 2, 2)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.head = nn.Linear(2, 2)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([[[1.0, 0.5], [0.25, 2.0]], [[-1.0, 1.0], [0.5, 0.5]]]).reshape(2, 1, 2, 2))
            self.conv.bias.copy_(torch.tensor([0.1, 0.2]))
            self.head.weight.copy_(torch.tensor([[3.0, -1.0], [-2.0, 2.5]]))
            self.head.bias.copy_(torch.tensor([0.0, 0.1]))

    def forward(self, x):
        return self.head(self.flatten(self.pool(self.relu(self.conv(x * self.mask)))))


def region_cnn() -> nn.Module:
    return RegionCNN()


#: Weight of :func:`ramp_linear`'s class 0 on feature j: a smooth ramp a random
#: re-initialisation cannot reproduce.
def ramp_weights() -> torch.Tensor:
    return torch.stack([torch.linspace(-1.0, 1.0, 64), torch.linspace(1.0, -1.0, 64)])


class RampLinear(nn.Module):
    """64 features → 2 logits with ramp weights: saliency maps are the ramps themselves."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 2)
        with torch.no_grad():
            self.fc.weight.copy_(ramp_weights())
            self.fc.bias.zero_()

    def forward(self, x):
        return self.fc(x)


def ramp_linear() -> nn.Module:
    return RampLinear()


class SqrtLinear(Linear3):
    """:func:`linear` plus ``sqrt(|x0|)`` on every logit: its gradient is infinite at x0 = 0."""

    def forward(self, x):
        return self.fc(x) + torch.sqrt(x[:, :1].abs())


def sqrt_linear() -> nn.Module:
    return SqrtLinear()


class CrashingLinear(Linear3):
    """:func:`linear` whose process dies (SIGKILL, as the OOM killer does) on its
    ``crash_on_call``-th forward pass, once per ``marker`` file, in any process but the
    driver's (``driver_pid``): a worker lost in the middle of a run."""

    def __init__(self, marker: str, driver_pid: int, crash_on_call: int):
        super().__init__()
        self.marker, self.driver_pid, self.crash_on_call = marker, driver_pid, crash_on_call
        self.calls = 0

    def forward(self, x):
        import os
        import signal
        from pathlib import Path

        self.calls += 1
        if os.getpid() != self.driver_pid and self.calls >= self.crash_on_call:
            try:
                Path(self.marker).touch(exist_ok=False)  # one crash per marker, over all workers
            except FileExistsError:
                pass
            else:
                os.kill(os.getpid(), signal.SIGKILL)
        return super().forward(x)


def crashing_linear(marker: str, driver_pid: int, crash_on_call: int = 3) -> nn.Module:
    return CrashingLinear(marker, driver_pid, crash_on_call)


class SlowLinear(Linear3):
    """:func:`linear`, ``delay`` seconds per forward pass: a run long enough to interrupt."""

    def __init__(self, delay: float):
        super().__init__()
        self.delay = delay

    def forward(self, x):
        import time

        time.sleep(self.delay)
        return super().forward(x)


def slow_linear(delay: float = 0.2) -> nn.Module:
    return SlowLinear(delay)


class LinearSoftmax(Linear3):
    """:class:`Linear3` ending in a softmax, as exported and Keras-style models do."""

    def forward(self, x):
        return torch.softmax(self.fc(x), dim=1)


def linear_softmax() -> nn.Module:
    return LinearSoftmax()


class LinearLogSoftmax(Linear3):
    """:class:`Linear3` ending in a log-softmax (an ``NLLLoss``-trained model)."""

    def forward(self, x):
        return torch.log_softmax(self.fc(x), dim=1)


def linear_log_softmax() -> nn.Module:
    return LinearLogSoftmax()


def seeded_captum_softmax(seed: int = 0) -> nn.Module:
    """Captum's own test model ``SoftmaxModel(3, 8, 2)`` (random initialisation, softmax
    output), built under a fixed seed so that every process builds the same one."""
    from captum.testing.helpers.classification_models import SoftmaxModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SoftmaxModel(3, 8, 2)


#: :func:`token_bag`'s embedding of token id t: TOKEN_EMBEDDING_SCALE * (t, -t % 3) (id 0, [PAD], is (0, 0)).
TOKEN_EMBEDDING_SCALE = 0.1
TOKEN_HEAD_W = [[1.0, -2.0], [-0.5, 1.0]]


class TokenBag(nn.Module):
    """Token ids → the mean of their 2-d embeddings over the text's own tokens → two logits:
    a factory model that reads texts (``forward(input_ids, attention_mask)``)."""

    def __init__(self, vocab_size: int = 32):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, 2)
        self.head = nn.Linear(2, 2, bias=False)
        ids = torch.arange(vocab_size, dtype=torch.float32)
        with torch.no_grad():
            self.embed.weight.copy_(TOKEN_EMBEDDING_SCALE * torch.stack([ids, -ids % 3], dim=1))
            self.head.weight.copy_(torch.tensor(TOKEN_HEAD_W))

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def forward(self, input_ids, attention_mask):
        weights = attention_mask.unsqueeze(-1).float()
        pooled = (self.embed(input_ids) * weights).sum(dim=1) / weights.sum(dim=1)
        return self.head(pooled)


def token_bag() -> nn.Module:
    return TokenBag()


#: :func:`grouped_linear`'s weights over x0, x1 and the three one-hot colour columns: x1 is
#: ignored (its weights are zero), so every faithful method gives it nothing.
GROUPED_W = [[1.5, 0.0, 0.5, -1.0, 2.0], [-0.5, 0.0, 1.0, 0.25, -2.0]]
GROUPED_B = [0.2, -0.1]


def grouped_linear() -> nn.Module:
    """Five columns (x0, x1, colour one-hot) → two logits through one ``fc`` layer."""
    return nn.Sequential(OrderedDict(fc=fixed_linear(GROUPED_W, GROUPED_B)))


def grouped_mlp() -> nn.Module:
    """Five columns (x0, x1, colour one-hot) → 8 hidden → 2 classes, seeded."""
    return SeededMLP(features=5, hidden=8, classes=2, seed=5)


class FlattenLinear(nn.Module):
    """Five columns through ``nn.Flatten`` (a module Captum's LRP has no rule for) and a linear layer."""

    def __init__(self):
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc = fixed_linear(GROUPED_W, GROUPED_B)

    def forward(self, x):
        return self.fc(self.flatten(x))


def flatten_linear() -> nn.Module:
    return FlattenLinear()
