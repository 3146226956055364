"""Token attributions per text: netloupe's batched text path against Captum one text at a time,
and against the bound of the same passes done bare.

Three ways to compute integrated gradients on the word embeddings of the same texts (the
zoo's rt-bert on the first ``--texts`` rotten-tomatoes snippets, ``--steps`` steps):

* **ours**: :class:`netloupe.workers.explain.BatchExplainer` on one batch of all the texts
  (tokenized, padded to the batch's longest, LayerIntegratedGradients in chunks, per-token
  values kept, the tokens table built): what a worker does per batch, without Ray or writes;
* **captum, one at a time**: Captum's LayerIntegratedGradients called per text, unpadded, as
  its tutorials and peer tools do;
* **bound**: the same batched LayerIntegratedGradients call alone, on pre-tokenized input.

Rounds alternate the three (this VM drifts); the median of the per-round ratios is printed.
Also prints the padding share of the batch (tokens computed on padding / all tokens).

    .venv/bin/python benchmarks/bench_text.py --texts 512 --steps 32 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import pyarrow.parquet as pq
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=512)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from captum.attr import LayerIntegratedGradients

    from netloupe.contract.spec import parse_spec
    from netloupe.pipeline.builtin_datasets import builtin
    from netloupe.pipeline.datasets import resolve_dataset
    from netloupe.pipeline.zoo import rt_bert_checkpoint
    from netloupe.workers.explain import BatchExplainer
    from netloupe.workers.model_loading import load_model

    checkpoint = rt_bert_checkpoint()
    spec = parse_spec({
        "model": {"huggingface": str(checkpoint)},
        "dataset": {"source": "rotten-tomatoes", "limit": args.texts},
        "text": {"max_length": 64},
        "attributions": [{"method": "integrated_gradients", "params": {"n_steps": args.steps}}],
        "target": {"kind": "predicted"},
        "output": {"run_name": "bench"},
    })
    dataset = resolve_dataset(spec)
    table = pq.read_table(builtin("rotten-tomatoes").path()).slice(0, args.texts)
    model = load_model(spec.model).eval()
    explainer = BatchExplainer(spec, dataset, model, torch.device("cpu"))
    explainer.explain(table.slice(0, 8))  # binds the method and sizes its chunks

    batch = explainer.text(table)
    targets = explainer.forward(batch)[0].argmax(dim=1)
    baseline = explainer.text.baseline_ids(batch, "pad")
    embeddings = model.get_input_embeddings()

    def forward(ids, mask):
        return model(ids, mask)

    tokenizer = explainer.text.tokenizer
    alone = [tokenizer(text, truncation=True, max_length=64, return_tensors="pt")
             for text in table["text"].to_pylist()]
    special = explainer.text.special_ids

    def ours():
        explainer.explain(table)

    def one_at_a_time():
        lig = LayerIntegratedGradients(forward, embeddings)
        for encoded, target in zip(alone, targets.tolist()):
            ids, mask = encoded["input_ids"], encoded["attention_mask"]
            base = torch.where(torch.isin(ids, special), ids, torch.full_like(ids, tokenizer.pad_token_id))
            lig.attribute(ids, baselines=base, additional_forward_args=(mask,), target=target, n_steps=args.steps)

    def bound():
        LayerIntegratedGradients(forward, embeddings).attribute(
            batch.input_ids, baselines=baseline, additional_forward_args=(batch.attention_mask,), target=targets,
            n_steps=args.steps, internal_batch_size=explainer.chunk_rows)

    ratios_captum, ratios_bound, seconds = [], [], {"ours": [], "captum": [], "bound": []}
    for _ in range(args.rounds):
        times = {}
        for name, run in (("ours", ours), ("captum", one_at_a_time), ("bound", bound)):
            started = time.perf_counter()
            run()
            times[name] = time.perf_counter() - started
            seconds[name].append(times[name])
        ratios_captum.append(times["captum"] / times["ours"])
        ratios_bound.append(times["bound"] / times["ours"])
    padding = 1 - float(batch.attention_mask.float().mean())
    print(f"{args.texts} texts, {args.steps} steps, chunk_rows {explainer.chunk_rows}, padding {padding:.0%} of tokens")
    for name, values in seconds.items():
        print(f"  {name:7s} median {statistics.median(values):.2f} s ({args.texts / statistics.median(values):.1f} texts/s)")
    print(f"ours vs Captum one text at a time: {statistics.median(ratios_captum):.1f}x faster")
    print(f"ours vs the bare batched call (bound): {statistics.median(ratios_bound):.2f}x")


if __name__ == "__main__":
    main()
