"""The data pipeline: registry rows are read and checked on the driver, then tokenised as Ray Data tasks.

`load_examples` runs before any cluster resources are reserved, so a bad row fails the run early;
`tokenize` returns a materialised Ray Dataset that TorchTrainer splits into one shard per worker.
"""

import functools
from pathlib import Path

import numpy as np

from rayft.data import cache
from rayft.data.converters import convert_rows
from rayft.data.encode import IGNORE_INDEX, encode_supervised
from rayft.data.errors import DataError
from rayft.data.packing import pack_batch
from rayft.data.registry import dataset_attrs, read_rows
from rayft.data.templates import get_template


def load_examples(names: str, dataset_dir: str, max_samples: int | None, log=print, **read_kwargs) -> list[dict]:
    """Reads and converts the comma list of datasets `names` into internal examples, concatenated in order."""
    return [e for dataset in load_datasets(names, dataset_dir, max_samples, log, **read_kwargs) for e in dataset]


def load_datasets(names: str, dataset_dir: str, max_samples: int | None, log=print, seed: int = 42,
                  token: str | None = None, stage: str = "sft") -> list[list[dict]]:
    """Reads and converts each dataset of the comma list `names`; one list of examples per dataset."""
    datasets = []
    for attr in dataset_attrs(names, dataset_dir):
        rows = read_rows(attr, dataset_dir, seed=seed, token=token)
        if max_samples is not None:
            rows = rows[:max_samples]
        converted = convert_rows(rows, attr, log=log, stage=stage)
        with_tools = sum(1 for e in converted if e.get("tools") or _has_tool_turns(e))
        if with_tools:
            raise DataError(f"dataset {attr.name!r}: {with_tools} rows have tool definitions or tool-call turns; "
                            "tool-call formatting is not built yet (data engine issue)")
        datasets.append(converted)
    return datasets


def _has_tool_turns(example: dict) -> bool:
    return any(m["role"] in ("function", "observation") for m in example.get("messages", ()))


# Bump when encoding changes what it produces for the same inputs, so that old caches are not reused.
ENCODING_VERSION = 1


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str):
    """The tokenizer at `path`, loaded once per process (Ray Data workers reuse it across batches)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def encode_batch(batch: dict, tokenizer_path: str, template: str | None, cutoff_len: int,
                 train_on_prompt: bool, mask_history: bool = False) -> dict:
    """Ray Data map_batches function: one batch of internal examples -> input_ids, labels, truncated."""
    tokenizer = load_tokenizer(tokenizer_path)
    chat_template = get_template(template)
    encoded = [
        encode_supervised(chat_template.encode_turns(tokenizer, {"system": system, "messages": list(messages)}),
                          cutoff_len, train_on_prompt, mask_history)
        for system, messages in zip(batch["system"], batch["messages"])
    ]
    return {
        "input_ids": [np.asarray(e["input_ids"], dtype=np.int64) for e in encoded],
        "labels": [np.asarray(e["labels"], dtype=np.int64) for e in encoded],
        "num_tokens": np.asarray([len(e["input_ids"]) for e in encoded], dtype=np.int64),
        "num_trained": np.asarray([sum(label != IGNORE_INDEX for label in e["labels"]) for e in encoded],
                                  dtype=np.int64),
        "truncated": np.asarray([e["truncated"] for e in encoded], dtype=np.int64),
    }


def encode_text_batch(batch: dict, tokenizer_path: str, cutoff_len: int, concatenate: bool) -> dict:
    """Ray Data map_batches function for pre-training: each text + EOS, every token learned.

    With `concatenate`, the batch's documents are joined and cut into cutoff_len blocks, so nothing is
    lost to truncation; otherwise each document is truncated to cutoff_len.
    """
    tokenizer = load_tokenizer(tokenizer_path)
    documents = [tokenizer.encode(t, add_special_tokens=False) + [tokenizer.eos_token_id] for t in batch["text"]]
    if concatenate:
        flat = [token for document in documents for token in document]
        pieces = [flat[i:i + cutoff_len] for i in range(0, len(flat), cutoff_len)]
        truncated = [0] * len(pieces)
    else:
        pieces = [document[:cutoff_len] for document in documents]
        truncated = [len(document) - len(piece) for document, piece in zip(documents, pieces)]
    return {
        "input_ids": [np.asarray(p, dtype=np.int64) for p in pieces],
        "labels": [np.asarray(p, dtype=np.int64) for p in pieces],
        "num_tokens": np.asarray([len(p) for p in pieces], dtype=np.int64),
        "num_trained": np.asarray([len(p) for p in pieces], dtype=np.int64),
        "truncated": np.asarray(truncated, dtype=np.int64),
    }


def tokenize(examples: list[dict], tokenizer_path: str, template: str | None, cutoff_len: int,
             train_on_prompt: bool, batch_size: int, packing: bool = False, neat_packing: bool = False,
             mask_history: bool = False, stage: str = "sft"):
    """Tokenises (and packs) `examples` with Ray Data tasks over the cluster; returns a materialised Dataset.

    Packing bundles the examples of each preprocessing batch into sequences of at most cutoff_len tokens.

    Materialising before training matters: the workers then read blocks from the object store and need
    no CPU of their own for preprocessing, so a cluster whose CPUs all go to workers cannot deadlock.
    """
    import ray.data

    dataset = ray.data.from_items(examples, override_num_blocks=max(1, min(len(examples) // batch_size + 1, 64)))
    if stage == "pt":
        # plain packing of text is concatenation; neat packing keeps documents apart, packed below
        dataset = dataset.map_batches(encode_text_batch, batch_size=batch_size, fn_kwargs=dict(
            tokenizer_path=tokenizer_path, cutoff_len=cutoff_len, concatenate=packing and not neat_packing))
        packing = neat_packing
    else:
        dataset = dataset.map_batches(encode_batch, batch_size=batch_size, fn_kwargs=dict(
            tokenizer_path=tokenizer_path, template=template, cutoff_len=cutoff_len,
            train_on_prompt=train_on_prompt, mask_history=mask_history))
    if packing:
        dataset = dataset.map_batches(pack_batch, batch_size=batch_size,
                                      fn_kwargs=dict(cutoff_len=cutoff_len, neat=neat_packing))
    return dataset.materialize()


def tokenize_cached(examples: list[dict], tokenizer_path: str, template: str | None, cutoff_len: int,
                    train_on_prompt: bool, batch_size: int, packing: bool, neat_packing: bool,
                    cache_dir: Path | None, strict: bool, overwrite: bool, mask_history: bool = False,
                    stage: str = "sft"):
    """`tokenize`, reusing a Parquet cache made from the same inputs; returns (dataset, reused).

    With `strict` (a tokenized_path the user named), `cache_dir` is the cache itself and one made from
    other inputs is an error; otherwise `cache_dir` holds one automatic cache per key.
    """
    settings = dict(template=template, cutoff_len=cutoff_len, train_on_prompt=train_on_prompt,
                    packing=packing, neat_packing=neat_packing, mask_history=mask_history, stage=stage,
                    encoding_version=ENCODING_VERSION)
    key = cache.cache_key(examples, tokenizer_path, settings)
    if cache_dir is not None and not strict:
        cache_dir = cache_dir / key
    if cache_dir is not None and not overwrite:
        cached = cache.load(cache_dir, key, strict=strict)
        if cached is not None:
            return cached, True
    dataset = tokenize(examples, tokenizer_path, template, cutoff_len, train_on_prompt, batch_size,
                       packing=packing, neat_packing=neat_packing, mask_history=mask_history, stage=stage)
    if cache_dir is not None:
        cache.save(dataset, cache_dir, key, settings)
    return dataset, False


def token_stats(dataset) -> dict:
    """Examples, tokens, trained tokens and tokens dropped by truncation of a tokenised dataset.

    Streams only the three small count columns to the driver; a Ray Data aggregation would start a
    shuffle stage costing seconds even on tiny data.
    """
    totals = {"examples": 0, "tokens": 0, "trained_tokens": 0, "truncated_tokens": 0}
    columns = {"num_tokens": "tokens", "num_trained": "trained_tokens", "truncated": "truncated_tokens"}
    for batch in dataset.select_columns(list(columns)).iter_batches(batch_format="numpy", batch_size=65536):
        totals["examples"] += len(batch["num_tokens"])
        for column, key in columns.items():
            totals[key] += int(batch[column].sum())
    return totals


def describe_example(row: dict, tokenizer) -> str:
    """One decoded example with its label mask, printed before training."""
    ids = [int(i) for i in row["input_ids"]]
    labels = [int(i) for i in row["labels"]]
    trained = [i for i, label in zip(ids, labels) if label != IGNORE_INDEX]
    return "\n".join([
        f"input_ids:\n{ids}",
        f"inputs:\n{tokenizer.decode(ids, skip_special_tokens=False)}",
        f"label_ids:\n{labels}",
        f"labels (trained tokens only):\n{tokenizer.decode(trained, skip_special_tokens=False)}",
    ])
