"""Packing: tokenised examples are bundled into sequences of at most cutoff_len tokens.

`packing` lets packed examples attend to each other; `neat_packing` restarts position_ids for every
example, from which Transformers builds a block-diagonal causal mask (no cross-example attention).
"""

import numpy as np

from rayft.data.encode import IGNORE_INDEX


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Groups item indices into bins of total length <= capacity, longest items first."""
    bins: list[list[int]] = []
    space: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for b, free in enumerate(space):
            if lengths[index] <= free:
                bins[b].append(index)
                space[b] -= lengths[index]
                break
        else:
            bins.append([index])
            space.append(capacity - lengths[index])
    return [sorted(b) for b in bins]


def pack_batch(batch: dict, cutoff_len: int, neat: bool) -> dict:
    """Ray Data map_batches function: one batch of encoded examples -> packed sequences.

    The first label of every example is masked: in a packed sequence it would otherwise be predicted
    from the previous example's last token.
    """
    lengths = [len(ids) for ids in batch["input_ids"]]
    packed = {"input_ids": [], "labels": [], "position_ids": [], "num_tokens": [], "num_trained": [],
              "truncated": []}
    for members in first_fit_decreasing(lengths, cutoff_len):
        labels = [np.concatenate([[IGNORE_INDEX], np.asarray(batch["labels"][i])[1:]]) for i in members]
        packed["input_ids"].append(np.concatenate([np.asarray(batch["input_ids"][i]) for i in members]))
        packed["labels"].append(np.concatenate(labels).astype(np.int64))
        total = sum(lengths[i] for i in members)
        positions = np.concatenate([np.arange(lengths[i]) for i in members]) if neat else np.arange(total)
        packed["position_ids"].append(positions.astype(np.int64))
        packed["num_tokens"].append(total)
        packed["num_trained"].append(int(sum((label != IGNORE_INDEX).sum() for label in labels)))
        packed["truncated"].append(int(sum(batch["truncated"][i] for i in members)))
    return {k: v if k in ("input_ids", "labels", "position_ids") else np.asarray(v, dtype=np.int64)
            for k, v in packed.items()}
