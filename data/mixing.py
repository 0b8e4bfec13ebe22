"""How many rows each dataset gives to a mix, and how many a validation split holds out: pure, seeded counts.

Which rows those are is decided by ranking each row's key (`data/source.row_keys`) salted with the seed, so
that no step needs the rows themselves in one place.
"""

import numpy as np

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


def mix_counts(lengths: list[int], strategy: str, probs: list[float], seed: int) -> list[int]:
    """How many examples each dataset contributes: all of them (concat), or as many as drawing a dataset per
    example with `probs` gives.

    interleave_under stops when a drawn dataset has run out (undersampling the larger ones); interleave_over
    goes on, restarting exhausted datasets, until every dataset with a non-zero probability has been used whole
    (oversampling). A count above a dataset's length repeats it.
    """
    if strategy == "concat" or len(lengths) == 1:
        return list(lengths)
    rng = np.random.default_rng(seed)
    counts = np.zeros(len(lengths), dtype=np.int64)
    limits = np.asarray(lengths, dtype=np.int64)
    needed = np.asarray(probs) > 0
    while True:
        draws = rng.choice(len(lengths), size=65536, p=np.asarray(probs) / sum(probs))
        running = counts + np.cumsum(np.eye(len(lengths), dtype=np.int64)[draws], axis=0)  # counts after each draw
        if strategy == "interleave_under":
            over = np.nonzero(running[np.arange(len(draws)), draws] > limits[draws])[0]
            if len(over):
                return (running[over[0]] - np.eye(len(lengths), dtype=np.int64)[draws[over[0]]]).tolist()
        else:
            done = np.nonzero((running[:, needed] >= limits[needed]).all(axis=1))[0]
            if len(done):
                return running[done[0]].tolist()
        counts = running[-1]


def validation_count(total: int, val_size: float) -> int:
    """The examples `val_size` holds out of `total` (a fraction below 1, or a count); refused when it leaves
    none for either side."""
    count = int(val_size) if val_size >= 1 else round(total * val_size)
    if not 0 < count < total:
        raise DataError(f"val_size: {val_size} leaves {total - count} of {total} examples for training; choose a "
                        "fraction in (0, 1) or a smaller count")
    return count
