"""The demo models: small networks trained once on the built-in sets and cached.

``trained_mnist_cnn`` and ``trained_breast_cancer_mlp`` are ordinary model factories
(``model.factory: netloupe.pipeline.zoo:trained_mnist_cnn``): the first call trains with a fixed
seed and caches the weights as safetensors; later calls, in any process, load them.

``CHECKPOINTS`` are Hugging Face checkpoints instead (``netloupe zoo NAME --out DIR`` writes one,
for ``model.huggingface: DIR``): trained once the same way and cached as ``save_pretrained``
writes them, so a demo takes exactly the path a user's own checkpoint takes; and
``mnist-cnn-epochs``, a training run's weights files per epoch (``model.checkpoints``).
"""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from netloupe.contract.errors import RunError
from netloupe.pipeline.builtin_datasets import builtin
from netloupe.storage.location import cache_root

ZOO_VERSION = 1
"""Bumped when an architecture or its training changes, so stale caches are not reused."""


class MnistCNN(nn.Module):
    """Two conv blocks and two dense layers; every ReLU is its own module (DeepLift needs it)."""

    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(2 * width * 7 * 7, 128)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        return self.fc2(self.relu3(self.fc1(self.flatten(x))))


class TabularMLP(nn.Module):
    """A two-hidden-layer MLP for feature vectors."""

    def __init__(self, num_features: int = 30, num_classes: int = 2, hidden: int = 64):
        super().__init__()
        self.fc1 = nn.Linear(num_features, hidden)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(hidden, hidden // 2)
        self.relu2 = nn.ReLU()
        self.out = nn.Linear(hidden // 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.relu2(self.fc2(self.relu1(self.fc1(x)))))


def _train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    inputs, labels = torch.tensor(x), torch.tensor(y)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    # The first call may come from inside a caller's no_grad block; training needs grads.
    with torch.enable_grad():
        _train_epochs(model, optimizer, inputs, labels, generator, epochs)
    return model.eval()


def _train_epochs(model, optimizer, inputs, labels, generator, epochs: int) -> None:
    for _ in range(epochs):
        order = torch.randperm(len(inputs), generator=generator)
        for start in range(0, len(order), 64):
            idx = order[start : start + 64]
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(inputs[idx]), labels[idx]).backward()
            optimizer.step()


def _cached(name: str, build, train) -> nn.Module:
    """Load ``name``'s cached weights into ``build()``, training them first if absent.

    A file lock makes concurrent first calls (driver and workers) train only once.
    """
    from safetensors.torch import load_file, save_file

    path = cache_root() / "models" / f"{name}-v{ZOO_VERSION}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    model = build()
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            train(model)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
            os.replace(tmp, path)
    model.load_state_dict(load_file(str(path)))
    return model.eval()


def _dataset_arrays(name: str, split: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A built-in set's model inputs and labels (only its ``split`` rows, when given)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from netloupe.contract.spec import PreprocessSpec
    from netloupe.workers.inputs import InputDecoder

    defaults = builtin(name).defaults()
    table = pq.read_table(builtin(name).path())
    if split is not None:
        table = table.filter(pc.equal(table["split"], split))
    decoder = InputDecoder(
        defaults.get("input_column"),
        tuple(defaults["feature_columns"]) if "feature_columns" in defaults else None,
        PreprocessSpec.model_validate(defaults["preprocess"]),
    )
    return decoder(table).astype(np.float32), table["label"].to_numpy()


def trained_mnist_cnn() -> MnistCNN:
    """:class:`MnistCNN` trained for 3 epochs on ``mnist-5k`` (about 20 s on 2 cores)."""
    def train(model):
        x, y = _dataset_arrays("mnist-5k")
        _train(model, x, y, epochs=3, seed=0)
    return _cached("mnist_cnn", MnistCNN, train)


def trained_breast_cancer_mlp() -> TabularMLP:
    """:class:`TabularMLP` trained on the standardized ``breast-cancer`` features."""
    def train(model):
        x, y = _dataset_arrays("breast-cancer")
        _train(model, x, y, epochs=30, seed=0)
    return _cached("breast_cancer_mlp", TabularMLP, train)


def _tabular_width(name: str) -> int:
    return len(builtin(name).defaults()["feature_columns"])


def trained_adult_mlp() -> TabularMLP:
    """:class:`TabularMLP` trained on the ``adult`` train split (adult.data: 32,561 people;
    numbers standardised, categoricals one-hot), 5 epochs (about 10 s on 2 cores)."""
    def train(model):
        x, y = _dataset_arrays("adult", split="train")
        _train(model, x, y, epochs=5, seed=0)
    return _cached("adult_mlp", lambda: TabularMLP(_tabular_width("adult")), train)


def trained_compas_mlp() -> TabularMLP:
    """:class:`TabularMLP` trained on every ``compas`` row (6,172 people), 20 epochs."""
    def train(model):
        x, y = _dataset_arrays("compas")
        _train(model, x, y, epochs=20, seed=0)
    return _cached("compas_mlp", lambda: TabularMLP(_tabular_width("compas")), train)


def trained_census_mlp() -> TabularMLP:
    """:class:`TabularMLP` trained on the ``census`` train split (199,523 people), 2 epochs."""
    def train(model):
        x, y = _dataset_arrays("census", split="train")
        _train(model, x, y, epochs=2, seed=0)
    return _cached("census_mlp", lambda: TabularMLP(_tabular_width("census")), train)



MNIST_VIT = dict(image_size=28, patch_size=7, num_channels=1, hidden_size=64, num_hidden_layers=2,
                 num_attention_heads=4, intermediate_size=128, num_labels=10,
                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
"""A vision transformer small enough to train in seconds: [CLS] and 16 patches of 7×7 pixels."""


def mnist_vit_checkpoint() -> Path:
    """A ViT (:data:`MNIST_VIT`) trained for 12 epochs on ``mnist-5k`` (about 10 s on 2 cores;
    ~0.9 accuracy on digits it did not see), cached as a Hugging Face checkpoint directory."""
    try:
        import transformers
    except ImportError:
        raise RunError("the mnist-vit checkpoint needs the transformers package: "
                       "pip install 'netloupe[transformers]'") from None

    from netloupe.workers.huggingface import HuggingFaceClassifier

    transformers.utils.logging.disable_progress_bar()  # no bar for a one-shard save
    directory = cache_root() / "models" / f"mnist_vit-v{ZOO_VERSION}"
    directory.parent.mkdir(parents=True, exist_ok=True)
    with open(directory.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not directory.exists():
            torch.manual_seed(0)
            model = transformers.ViTForImageClassification(transformers.ViTConfig(**MNIST_VIT))
            x, y = _dataset_arrays("mnist-5k")
            _train(HuggingFaceClassifier(model, "pixel_values"), x, y, epochs=12, seed=0)
            tmp = directory.with_name(f"{directory.name}.{os.getpid()}.tmp")
            model.save_pretrained(tmp)
            os.replace(tmp, directory)
    return directory


RT_BERT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
               max_position_embeddings=64, num_labels=2)
"""A BERT small enough to train in half a minute on the 10k training snippets of rotten-tomatoes."""
RT_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def rt_bert_checkpoint() -> Path:
    """A two-layer BERT sentiment classifier (:data:`RT_BERT`) with its own WordPiece vocabulary
    (8,000 pieces learnt from the training snippets), trained for 2 epochs on the ``train``
    split of ``rotten-tomatoes`` (~30 s on 2 cores; ~0.77 accuracy on the ``test`` split), cached
    as a Hugging Face checkpoint directory with its tokenizer."""
    try:
        import transformers
    except ImportError:
        raise RunError("the rt-bert checkpoint needs the transformers package: "
                       "pip install 'netloupe[transformers]'") from None
    import pyarrow.parquet as pq

    transformers.utils.logging.disable_progress_bar()
    directory = cache_root() / "models" / f"rt_bert-v{ZOO_VERSION}"
    directory.parent.mkdir(parents=True, exist_ok=True)
    with open(directory.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not directory.exists():
            table = pq.read_table(builtin("rotten-tomatoes").path())
            train = [i for i, split in enumerate(table["split"].to_pylist()) if split == "train"]
            texts = [table["text"][i].as_py() for i in train]
            tokenizer = _wordpiece_tokenizer(texts)
            torch.manual_seed(0)
            model = transformers.BertForSequenceClassification(
                transformers.BertConfig(vocab_size=len(tokenizer), **RT_BERT))
            encoded = tokenizer(texts, truncation=True, max_length=RT_BERT["max_position_embeddings"],
                                padding="longest", return_tensors="pt")
            labels = torch.tensor(table["label"].to_numpy()[train])
            _train_text(model, encoded["input_ids"], encoded["attention_mask"], labels, epochs=2, seed=0)
            tmp = directory.with_name(f"{directory.name}.{os.getpid()}.tmp")
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            os.replace(tmp, directory)
    return directory


def _wordpiece_tokenizer(texts: list[str]):
    """A BERT-style (lower-cased WordPiece) fast tokenizer whose vocabulary is learnt from ``texts``."""
    import transformers
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=8000, min_frequency=2,
                                                                 special_tokens=RT_SPECIAL_TOKENS))
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[(t, backend.token_to_id(t)) for t in ("[CLS]", "[SEP]")])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]",
                                                cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


def _train_text(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, epochs: int,
                seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    model.train()
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(len(ids), generator=generator)
            for start in range(0, len(order), 32):
                chosen = order[start:start + 32]
                width = int(mask[chosen].sum(dim=1).max())  # the batch's own longest: less padding
                optimizer.zero_grad()
                logits = model(input_ids=ids[chosen, :width], attention_mask=mask[chosen, :width]).logits
                nn.functional.cross_entropy(logits, labels[chosen]).backward()
                optimizer.step()
    model.eval()


MNIST_CNN_EPOCHS = 5
"""Epochs of :func:`mnist_cnn_epochs`, each one a checkpoint (and epoch 0, the initial weights)."""


def mnist_cnn_epochs() -> Path:
    """:class:`MnistCNN` trained on ``mnist-5k`` with :func:`trained_mnist_cnn`'s optimiser and
    batches (seed 0; its own initialisation), its weights saved before training and after every epoch (``epoch-0.safetensors`` ..
    ``epoch-5.safetensors``): the checkpoints of ``examples/mnist-epochs.yaml``, cached
    (about 40 s on 2 cores, once)."""
    from safetensors.torch import save_file

    directory = cache_root() / "models" / f"mnist_cnn_epochs-v{ZOO_VERSION}"
    directory.parent.mkdir(parents=True, exist_ok=True)
    with open(directory.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not directory.exists():
            tmp = directory.with_name(f"{directory.name}.{os.getpid()}.tmp")
            tmp.mkdir()
            x, y = _dataset_arrays("mnist-5k")
            torch.manual_seed(0)
            model = MnistCNN()
            generator = torch.Generator().manual_seed(0)
            optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
            inputs, labels = torch.tensor(x), torch.tensor(y)
            for epoch in range(MNIST_CNN_EPOCHS + 1):
                if epoch:
                    model.train()
                    with torch.enable_grad():
                        _train_epochs(model, optimizer, inputs, labels, generator, 1)
                save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                          str(tmp / f"epoch-{epoch}.safetensors"))
            os.replace(tmp, directory)
    return directory


CHECKPOINTS = {"mnist-vit": mnist_vit_checkpoint, "rt-bert": rt_bert_checkpoint, "mnist-cnn-epochs": mnist_cnn_epochs}
"""The demo checkpoints ``netloupe zoo`` writes, by name (``mnist-cnn-epochs``: a directory of
one weights file per epoch, for ``model.checkpoints``)."""


def write_checkpoint(name: str, out: str | os.PathLike) -> Path:
    """Copy the demo checkpoint ``name`` (trained first if not cached) to the new directory ``out``."""
    if name not in CHECKPOINTS:
        from netloupe.contract.errors import did_you_mean

        raise KeyError(f"no demo checkpoint {name!r}; {did_you_mean(name, list(CHECKPOINTS))}")
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; give a directory that does not")
    shutil.copytree(CHECKPOINTS[name](), out)
    return out
