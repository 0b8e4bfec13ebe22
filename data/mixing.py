"""Mixing several datasets into one list of examples, and holding out a validation split.

Pure functions over the examples read on the driver; every random choice is seeded.
"""

import random

from rayft.data.errors import DataError

MIX_STRATEGIES = ("concat", "interleave_under", "interleave_over")


def parse_probs(interleave_probs: str | None, count: int) -> list[float]:
    """The comma list of sampling probabilities, one per dataset (uniform when unset); must sum to 1."""
    if interleave_probs is None:
        return [1.0 / count] * count
    try:
        probs = [float(p) for p in interleave_probs.split(",")]
    except ValueError:
        raise DataError(f"interleave_probs: {interleave_probs!r} must be a comma list of numbers") from None
    if len(probs) != count:
        raise DataError(f"interleave_probs: {len(probs)} probabilities for {count} datasets; give one per dataset")
    if any(p < 0 for p in probs) or abs(sum(probs) - 1.0) > 1e-6:
        raise DataError(f"interleave_probs: {interleave_probs!r} must be non-negative and sum to 1")
    return probs


def mix(datasets: list[list[dict]], strategy: str, probs: list[float], seed: int) -> list[dict]:
    """Concatenates, or interleaves by sampling a source per example with `probs`.

    interleave_under stops when any dataset runs out (undersampling the larger ones); interleave_over
    goes on, restarting exhausted datasets, until every dataset has been used whole (oversampling).
    """
    if strategy == "concat" or len(datasets) == 1:
        return [example for dataset in datasets for example in dataset]
    rng = random.Random(seed)
    positions = [0] * len(datasets)
    used_whole = [False] * len(datasets)
    mixed = []
    while True:
        source = rng.choices(range(len(datasets)), weights=probs)[0]
        if positions[source] == len(datasets[source]):
            if strategy == "interleave_under":
                return mixed
            positions[source] = 0
        mixed.append(datasets[source][positions[source]])
        positions[source] += 1
        if positions[source] == len(datasets[source]):
            used_whole[source] = True
            if strategy == "interleave_over" and all(used_whole[i] or probs[i] == 0 for i in range(len(datasets))):
                return mixed


def split_validation(examples: list[dict], val_size: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Holds out `val_size` of the examples (a fraction below 1, or a count) with a seeded shuffle."""
    count = int(val_size) if val_size >= 1 else round(len(examples) * val_size)
    if not 0 < count < len(examples):
        raise DataError(f"val_size: {val_size} leaves {len(examples) - count} of {len(examples)} examples for "
                        "training; choose a fraction in (0, 1) or a smaller count")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held_out = set(order[:count])
    return ([e for i, e in enumerate(examples) if i not in held_out],
            [e for i, e in enumerate(examples) if i in held_out])
