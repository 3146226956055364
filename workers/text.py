"""Text as a model's input: a column of strings tokenized in the workers with the model's own
(fast) tokenizer, padded per batch, and the tokens part each batch stores beside its instances.

An instance's tokens are its own whatever batch it is in: padding goes to the batch's longest
text, the attention mask hides it, and nothing at a padded position is stored (the token
methods and the masked token pooling of :mod:`netloupe.workers.capture` see the mask).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from netloupe.contract.errors import DatasetError, ModelError
from netloupe.storage import schema as S


@dataclass(frozen=True)
class TokenBatch:
    """A batch of tokenized texts, padded to its longest."""

    input_ids: torch.Tensor
    """``(n, tokens)`` token ids, padded with the tokenizer's pad id."""
    attention_mask: torch.Tensor
    """``(n, tokens)``: 1 at an instance's own tokens, 0 at padding."""
    lengths: np.ndarray
    """Each instance's own tokens (special tokens included)."""
    truncated: np.ndarray
    """Whether the text had more tokens than ``max_length`` (the rest is not seen)."""
    spans: np.ndarray
    """``(n, tokens, 2)``: each token's characters in its text, ``[start, end)`` (``(0, 0)``
    for special tokens and padding)."""

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device) -> TokenBatch:
        return TokenBatch(self.input_ids.to(device), self.attention_mask.to(device), self.lengths,
                          self.truncated, self.spans)

    def take(self, index: np.ndarray) -> TokenBatch:
        """The rows ``index``, in that order, cut to their longest."""
        width = int(self.lengths[index].max()) if len(index) else 0
        chosen = torch.as_tensor(index, device=self.input_ids.device)
        return TokenBatch(self.input_ids[chosen, :width], self.attention_mask[chosen, :width], self.lengths[index],
                          self.truncated[index], self.spans[index, :width])

    def padded_to(self, width: int) -> TokenBatch:
        """The batch padded (with padding masked out) to ``width`` positions."""
        extra = width - self.input_ids.shape[1]
        if extra <= 0:
            return self
        pad = torch.nn.functional.pad
        return TokenBatch(pad(self.input_ids, (0, extra), value=0), pad(self.attention_mask, (0, extra), value=0),
                          self.lengths, self.truncated, np.pad(self.spans, ((0, 0), (0, extra), (0, 0))))

    def own(self, values: torch.Tensor | np.ndarray, kind: pa.DataType = pa.float32()) -> pa.ListArray:
        """``(n, tokens, ...)`` values per position as a list per instance of its own tokens only
        (padding is never stored)."""
        if isinstance(values, torch.Tensor):
            values = values.detach().cpu().numpy()
        own = self.attention_mask.cpu().numpy().astype(bool)  # right padding: own tokens come first
        offsets = np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values[own], kind))


def length_chunks(lengths: np.ndarray, rows_per_text: int, budget: int) -> list[slice]:
    """Consecutive runs of the ascending ``lengths`` whose texts × ``rows_per_text`` × their
    longest (each chunk is padded to its own longest) fit ``budget`` token positions; a text
    longer than the budget goes alone."""
    chunks, start = [], 0
    while start < len(lengths):
        stop = start + 1
        while stop < len(lengths) and (stop + 1 - start) * rows_per_text * lengths[stop] <= budget:
            stop += 1
        chunks.append(slice(start, stop))
        start = stop
    return chunks


def load_tokenizer(directory: str):
    """The fast tokenizer saved in ``directory`` (``save_pretrained``), from local files only."""
    path = Path(directory).expanduser()
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise ModelError(f"{path} holds no tokenizer (tokenizer.json); save the model's tokenizer there with "
                         "tokenizer.save_pretrained(DIR), or give text.tokenizer: DIR")
    import transformers

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as error:  # noqa: BLE001 - any failure to load is the same user problem
        first_line = (str(error).strip().splitlines() or [""])[0]
        raise ModelError(f"cannot load the tokenizer in {path}: {type(error).__name__}: {first_line[:300]}") from None
    if not tokenizer.is_fast:
        raise ModelError(f"the tokenizer in {path} is a slow (Python) tokenizer; netloupe needs a fast one (it "
                         "gives each token's characters): save it with tokenizer.json (PreTrainedTokenizerFast)")
    if tokenizer.pad_token_id is None:
        raise ModelError(f"the tokenizer in {path} has no pad token, so texts cannot be batched; set one "
                         "(tokenizer.pad_token = ...) and save it again")
    return tokenizer


class TextEncoder:
    """Turns a batch's text column into a :class:`TokenBatch`."""

    def __init__(self, column: str, tokenizer, max_length: int, id_column: str):
        self.column, self.tokenizer, self.max_length, self.id_column = column, tokenizer, max_length, id_column
        self.vocabulary = np.array(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))), dtype=object)
        """Token id → token string."""
        # [UNK] stands for a word of the text: replaced in a baseline like any other word.
        self.special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids) - {None, tokenizer.unk_token_id}),
                                        dtype=torch.long)
        # Own tokens first in every row (TokenBatch.own relies on it); a classifier reads its
        # tokens by the attention mask, so a tokenizer saved to pad on the left loses nothing.
        tokenizer.padding_side = "right"

    def __call__(self, table: pa.Table) -> TokenBatch:
        column = table[self.column]
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            raise DatasetError(f"text column {self.column!r} has type {column.type}; expected strings")
        if column.null_count:
            raise DatasetError(f"text column {self.column!r} has {column.null_count} null rows in this batch; "
                               "every instance needs a text (drop or fill those rows)")
        texts = column.to_pylist()
        encoded = self.tokenizer(texts, truncation=True, max_length=self.max_length, padding="longest",
                                 return_offsets_mapping=True, return_tensors="pt")
        mask = encoded["attention_mask"]
        lengths = mask.sum(dim=1).numpy().astype(np.int64)
        if (lengths == 0).any():
            empty = [row for row, length in zip(table[self.id_column].to_pylist(), lengths) if length == 0]
            raise DatasetError(f"{len(empty)} texts of this batch have no tokens (ids {empty[:5]}): the tokenizer "
                               "adds no special tokens and the text is empty; drop them or give each some text")
        # The whole texts' token counts (once more, untruncated): exact, whatever the tokenizer
        # drops or normalises, where comparing characters would not be.
        whole = self.tokenizer(texts, truncation=False, return_length=True, return_attention_mask=False,
                               verbose=False)["length"]
        spans = encoded["offset_mapping"].numpy().astype(np.int32)
        return TokenBatch(encoded["input_ids"], mask, lengths, np.asarray(whole) > self.max_length, spans)

    def special_tokens(self) -> list[str]:
        """The tokenizer's tokens that are not words ([UNK] stands for one)."""
        return sorted(t for t in self.tokenizer.all_special_tokens if t != self.tokenizer.unk_token)

    def baseline_id(self, token: str) -> int:
        """The id of the baseline token ``token`` (``pad``, ``mask``, ``unk``), which the tokenizer must have."""
        found = getattr(self.tokenizer, f"{token}_token_id")
        if found is None:
            has = [name for name in ("pad", "mask", "unk") if getattr(self.tokenizer, f"{name}_token_id") is not None]
            raise ModelError(f"text.baseline_token is {token!r} but the tokenizer has no {token} token; use one of {has}")
        return found

    def baseline_ids(self, batch: TokenBatch, token: str) -> torch.Tensor:
        """The batch with each of its own words' tokens replaced by the pad, mask or unk token
        (``token``); special tokens ([CLS], [SEP], padding) are kept, [UNK] is replaced: the
        reference of integrated gradients and occlusion."""
        replacement = self.baseline_id(token)
        ids = batch.input_ids
        kept = torch.isin(ids, self.special_ids.to(ids.device)) | (batch.attention_mask == 0)
        return torch.where(kept, ids, torch.full_like(ids, replacement))

    def tokens_table(self, instance_ids: pa.Array, batch: TokenBatch, id_type: str) -> pa.Table:
        """The batch's part of the tokens table: each instance's own tokens, ids and spans (by
        array, not per token in Python: a million texts are tens of millions of tokens)."""
        ids = batch.input_ids.cpu().numpy()
        return S.table_from_columns(S.tokens_schema(id_type), {
            "instance_id": instance_ids,
            "length": pa.array(batch.lengths.astype(np.int32)),
            "truncated": pa.array(batch.truncated),
            "token_ids": batch.own(ids, pa.int32()),
            "tokens": batch.own(self.vocabulary[ids], pa.string()),
            "token_start": batch.own(batch.spans[..., 0], pa.int32()),
            "token_end": batch.own(batch.spans[..., 1], pa.int32()),
        })
