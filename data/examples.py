"""A run's examples: every dataset read and converted where it lives, its bad rows counted (and the run
refused above max_bad_row_ratio), then sampled, mixed and split by seeded keys, with counts alone on the driver.

`Rows` is one step's result: a pyarrow Table in the driver's process for a few MB of local data, or a
materialised Ray Dataset in the object store; each step runs its batch function in the same place.
"""

import hashlib
import json
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pyarrow as pa

from rayft.data.errors import DataError
from rayft.data.mixing import mix_counts, validation_count
from rayft.data.source import BATCH_ROWS, Source, converted, hub_batch, hub_dataset, mix64, read_batches, row_keys
from rayft.data.templates import supports_tools, tool_refusal
from rayft.recipe.logs import logger

SHOWN_BAD_ROWS = 5


@dataclass(frozen=True)
class Rows:
    """Rows with an `example` (JSON) and a `key` column, held here (`table`) or in the object store."""

    table: pa.Table | None = None
    dataset: object = None  # a materialised ray.data.Dataset

    @classmethod
    def of(cls, examples: list[dict], name: str = "examples") -> "Rows":
        """Examples already in hand (tests, benchmarks), held here, keyed by their position."""
        positions = np.arange(len(examples), dtype=np.uint64)
        return cls(table=pa.table({"example": [json.dumps(e, ensure_ascii=False) for e in examples],
                                   "key": row_keys(name, np.zeros_like(positions), positions)}))

    @property
    def here(self) -> bool:
        return self.table is not None

    def count(self) -> int:
        return self.table.num_rows if self.here else self.dataset.count()

    def batches(self, columns: list[str], batch_size: int = 65536):
        """The columns, batch by batch, as numpy arrays (the driver never holds more than one batch)."""
        if self.here:
            for batch in self.table.select(columns).to_batches(max_chunksize=batch_size):
                yield {c: batch.column(c).to_numpy(zero_copy_only=False) for c in columns}
        else:
            yield from self.dataset.select_columns(columns).iter_batches(batch_format="numpy", batch_size=batch_size)

    def apply(self, fn: Callable, **kwargs) -> "Rows":
        """`fn` (a batch of numpy columns -> a batch of columns) over every batch, in the place the rows are."""
        if self.here:
            return Rows(table=_table([fn(batch, **kwargs) for batch in self.batches(self.table.column_names)]))
        return Rows(dataset=self.dataset.map_batches(fn, batch_format="numpy", fn_kwargs=kwargs).materialize())

    def first(self, count: int) -> "Rows":
        if self.here:
            return Rows(table=self.table.slice(0, count))
        return Rows(dataset=self.dataset.limit(count).materialize())

    def to_dataset(self, blocks: int = 1):
        """The rows as a materialised Ray Dataset (a table held here goes to the object store as `blocks` blocks)."""
        import ray.data

        if not self.here:
            return self.dataset
        size = -(-self.table.num_rows // blocks) or 1
        return ray.data.from_arrow([self.table.slice(start, size) for start in range(0, self.table.num_rows, size)]
                                   or [self.table])

    def examples(self) -> list[dict]:
        """Every example as a dict, for the small datasets the driver itself works on (prediction, inspection)."""
        return [json.loads(e) for batch in self.batches(["example"]) for e in batch["example"]]


def _table(batches: list[dict]) -> pa.Table:
    tables = [pa.table({k: _arrow(v) for k, v in b.items()}) for b in batches if len(next(iter(b.values())))]
    if not tables:
        return pa.table({"example": pa.array([], pa.string()), "key": pa.array([], pa.uint64())})
    return pa.concat_tables(tables)


def _arrow(column) -> pa.Array:
    if isinstance(column, np.ndarray) and column.dtype != object:
        return pa.array(column)
    return pa.array(list(column))


def union(parts: list[Rows]) -> Rows:
    if len(parts) == 1:
        return parts[0]
    if all(p.here for p in parts):
        return Rows(table=pa.concat_tables([p.table for p in parts]))
    first, *rest = [p.to_dataset() for p in parts]
    return Rows(dataset=first.union(*rest).materialize())


# --- reading and checking -----------------------------------------------------------------------------------

def read(source: Source, here: bool, node_id: str | None = None) -> Rows:
    """Every row of `source` converted: here for a few MB of local files, else one Ray Data task per file
    (preferably on `node_id` when the files may be on that node's disk only)."""
    if here and not source.paths:
        loaded = hub_dataset(source)
        batches = [range(start, min(start + BATCH_ROWS, len(loaded))) for start in range(0, len(loaded), BATCH_ROWS)]
        return Rows(table=_table([converted(source, [(0, i, loaded[i]) for i in batch]) for batch in batches]))
    if here:
        return Rows(table=_table(list(read_batches({"file": range(len(source.paths))}, source))))
    import ray.data

    options = {}
    if node_id is not None:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # soft: a head node without CPUs (the usual cluster set-up) would otherwise never run the reads
        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id, soft=True)
    if not source.paths:
        loaded = hub_dataset(source)
        loaded = loaded.add_column("__row", list(range(len(loaded))))
        dataset = ray.data.from_huggingface(loaded).map_batches(hub_batch, batch_format="numpy",
                                                                fn_kwargs=dict(source=source))
    else:
        files = ray.data.from_items([{"file": i} for i in range(len(source.paths))],
                                    override_num_blocks=len(source.paths))
        dataset = files.map_batches(read_batches, batch_size=1, batch_format="numpy", fn_kwargs=dict(source=source),
                                    **options)
    return Rows(dataset=dataset.materialize())


def checked(source: Source, rows: Rows, max_bad_ratio: float, template: str | None,
            tool_format: str | None) -> Rows:
    """The good rows of a dataset (example and key). Bad rows are skipped and reported with their first
    positions; more than `max_bad_ratio` of them, or nothing left, refuses the run. Rows with tools are
    refused unless the template formats tools."""
    name = source.attr.name
    if rows.count() == 0:  # a file of blank lines, or none: not even a bad row to report
        where = source.attr.file_name or source.attr.hf_hub_url
        raise DataError(f"dataset {name!r} has no rows; check its source ({where})")
    total = bad = with_tools = 0
    shown = []
    for batch in rows.batches(["error", "file", "row", "tools"]):
        total += len(batch["error"])
        with_tools += int(batch["tools"].sum())
        for i in np.flatnonzero(batch["error"] != ""):
            bad += 1
            if len(shown) < SHOWN_BAD_ROWS:
                shown.append(f"{source.describe(int(batch['file'][i]), int(batch['row'][i]))}: {batch['error'][i]}")
    if bad:
        listed = "; ".join(shown) + (f" (and {bad - len(shown)} more)" if bad > len(shown) else "")
        if bad == total:
            raise DataError(f"dataset {name!r}: every one of its {total} rows is malformed: {listed}")
        if bad > max_bad_ratio * total:
            raise DataError(f"dataset {name!r}: {bad} of {total} rows ({bad / total:.2%}) are malformed, more than "
                            f"max_bad_row_ratio={max_bad_ratio}: {listed}; fix them, or raise max_bad_row_ratio to "
                            "skip them")
        logger.info(f"dataset {name!r}: skipped {bad} of {total} malformed rows: {listed}")
    refuse_tools(name, with_tools, template, tool_format)
    return rows.apply(_good_rows)


def refuse_tools(name: str, with_tools: int, template: str | None, tool_format: str | None) -> None:
    """Rows with tool definitions or tool-call turns need a template (or tool_format) that formats tools."""
    if with_tools and not supports_tools(template, tool_format):
        raise DataError(f"dataset {name!r}: {with_tools} rows have tool definitions or tool-call turns; "
                        + tool_refusal(template))


def _good_rows(batch: dict) -> dict:
    good = batch["error"] == ""
    return {"example": batch["example"][good], "key": batch["key"][good]}


# --- seeded selection ---------------------------------------------------------------------------------------

def _salt(seed: int, purpose: str) -> np.uint64:
    digest = hashlib.blake2b(f"{seed}:{purpose}".encode(), digest_size=8).digest()
    return np.uint64(int.from_bytes(digest, "little"))


def _ranks(keys: np.ndarray, salt: np.uint64) -> np.ndarray:
    return mix64(np.asarray(keys, dtype=np.uint64) ^ salt)


def kth_rank(rows: Rows, salt: np.uint64, k: int) -> int:
    """The k-th smallest salted key of `rows` (1-based), found in two passes over the key column with a
    histogram, so the driver holds 65,536 counters and one bucket of keys, never the column."""
    shift = np.uint64(48)
    histogram = np.zeros(65536, dtype=np.int64)
    for batch in rows.batches(["key"]):
        histogram += np.bincount((_ranks(batch["key"], salt) >> shift).astype(np.int64), minlength=65536)
    bucket = int(np.searchsorted(np.cumsum(histogram), k))
    below = int(histogram[:bucket].sum())
    inside = np.concatenate([r[(r >> shift) == bucket] for r in
                             (_ranks(b["key"], salt) for b in rows.batches(["key"]))])
    return int(np.partition(inside, k - below - 1)[k - below - 1])


def _keep(batch: dict, salt: int, threshold: int, below: bool) -> dict:
    chosen = (_ranks(batch["key"], np.uint64(salt)) <= np.uint64(threshold)) == below
    return {column: values[chosen] for column, values in batch.items()}


def _rekeyed(batch: dict, cycle: int) -> dict:
    return {**batch, "key": mix64(batch["key"] ^ _salt(cycle, "repeat"))}


def _copy(rows: Rows, cycle: int) -> Rows:
    """Copy number `cycle` of `rows`: the rows themselves first, then with keys of their own, so that a later
    seeded draw over repeated rows still picks exactly as many as it asks for."""
    return rows if cycle == 0 else rows.apply(_rekeyed, cycle=cycle)


def draw(rows: Rows, count: int, seed: int, purpose: str) -> Rows:
    """`count` rows drawn by seeded keys: a subset without repeats while it can, whole copies beyond that."""
    total = rows.count()
    copies, rest = divmod(count, total)
    parts = [_copy(rows, cycle) for cycle in range(copies)]
    if rest:
        salt = _salt(seed, purpose)
        parts.append(rows.apply(_keep, salt=int(salt), threshold=kth_rank(rows, salt, rest), below=True))
    return union(parts)


def split_off(rows: Rows, val_size: float, seed: int) -> tuple[Rows, Rows]:
    """(training rows, held-out rows): `val_size` of them (a fraction, or a count) chosen by seeded keys."""
    held = validation_count(rows.count(), val_size)
    salt = _salt(seed, "val_size")
    threshold = kth_rank(rows, salt, held)
    return (rows.apply(_keep, salt=int(salt), threshold=threshold, below=False),
            rows.apply(_keep, salt=int(salt), threshold=threshold, below=True))


def mixed(parts: list[Rows], strategy: str, probs: list[float], seed: int) -> tuple[Rows, list[int]]:
    """The datasets mixed by `strategy` (concatenated in order, or interleaved by the counts sampling gives:
    each dataset's first rows, repeated whole when oversampled); and those counts."""
    counts = mix_counts([p.count() for p in parts], strategy, probs, seed)
    taken = []
    for part, count in zip(parts, counts):
        whole, rest = divmod(count, part.count())
        taken += [_copy(part, cycle) for cycle in range(whole)]
        if rest:
            taken.append(_copy(part, whole).first(rest))
    return union(taken), counts


def shuffled(rows: Rows, seed: int) -> Rows:
    """The rows in a seeded random order (one global shuffle; workers then shuffle through their buffers)."""
    if rows.here:
        order = np.argsort(_ranks(rows.table.column("key").to_numpy(), _salt(seed, "shuffle")))
        return Rows(table=rows.table.take(order))
    return Rows(dataset=rows.dataset.random_shuffle(seed=seed).materialize())
