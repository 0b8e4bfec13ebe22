"""The data pipeline's ends: locating datasets and sampling them on the driver before Ray starts, and
tokenising (and packing) examples as Ray Data tasks into the Dataset that TorchTrainer splits among workers.

Reading, converting and mixing in between live in `data/source.py` and `data/examples.py`.
"""

import contextlib
import dataclasses
import json
import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from rayft.data import cache
from rayft.data.encode import IGNORE_INDEX, encode_pairwise, encode_prompt, encode_response, encode_supervised
from rayft.data.errors import DataError
from rayft.data.examples import Rows, checked, draw, read, refuse_tools
from rayft.data.media import ImageGeometry, expand_images, image_token_count
from rayft.data.packing import pack_batch
from rayft.data.registry import dataset_attrs
from rayft.data.source import Source, check_kind, check_media, has_tool_turns, head, locate
from rayft.data.templates import get_template, plugin_of
from rayft.data.tokenizer import TokenizerSpec, encode_text, load_tokenizer
from rayft.recipe.stages import STAGE_SPECS
from rayft.recipe.values import DEFAULT_SEED, comma_list


def locate_datasets(names: str, dataset_dir: str, data: str = "supervised", stage: str = "sft",
                    token: str | None = None, template: str | None = None, media_dir: str | None = None
                    ) -> list[Source]:
    """The datasets of the comma list `names`, each checked for its kind and its media and located (files listed,
    nothing read).

    `data` is the kind of data the `stage` trains on ("text" reads any dataset's prompts as plain text); images are
    found under `media_dir` (default: dataset_dir) and need a multimodal `template`.
    """
    sources = []
    for attr in dataset_attrs(names, dataset_dir):
        check_kind(attr, data, stage)
        check_media(attr, stage, template)
        sources.append(locate(attr, dataset_dir, as_text=data == "text", token=token,
                              keep_columns=STAGE_SPECS[stage].keeps_columns, media_dir=media_dir))
    return sources


def read_dataset(source: Source, max_samples: int | None, seed: int = DEFAULT_SEED, max_bad_ratio: float = 0.01,
                 template: str | None = None, tool_format: str | None = None, here: bool | None = None,
                 node_id: str | None = None) -> Rows:
    """One dataset's good examples: read and converted (here when small, else in Ray Data tasks), bad rows
    checked, `num_samples` drawn (dataset_info.json) and the first `max_samples` kept."""
    rows = read(source, here=source.small if here is None else here, node_id=node_id)
    rows = checked(source, rows, max_bad_ratio, template, tool_format)
    if source.attr.num_samples is not None:
        rows = draw(rows, source.attr.num_samples, seed, f"n:{source.attr.name}")
    if max_samples is not None and rows.count() > max_samples:
        rows = rows.first(max_samples)
    return rows


def load_datasets(names: str, dataset_dir: str, max_samples: int | None, seed: int = DEFAULT_SEED,
                  token: str | None = None, data: str = "supervised", template: str | None = None,
                  stage: str = "sft", tool_format: str | None = None, max_bad_ratio: float = 0.01,
                  media_dir: str | None = None) -> list[list[dict]]:
    """Every example of each dataset of `names`, read in this process: for the small data the driver works on
    itself (prediction's eval sets, `rayft data`)."""
    return [read_dataset(source, max_samples, seed, max_bad_ratio, template, tool_format, here=True).examples()
            for source in locate_datasets(names, dataset_dir, data, stage, token, template, media_dir)]


def load_examples(names: str, dataset_dir: str, max_samples: int | None, **read_kwargs) -> list[dict]:
    """`load_datasets`, concatenated in order."""
    return [e for dataset in load_datasets(names, dataset_dir, max_samples, **read_kwargs) for e in dataset]


def sample_examples(sources: list[Source], rows: int | None = None) -> list[list[dict]]:
    """The first rows of each dataset's first file, converted on the driver: what the checks before Ray see."""
    return [head(source, rows or SAMPLE_ROWS) for source in sources]


# Bump when encoding changes what it produces for the same inputs, so that old caches are not reused.
ENCODING_VERSION = 2


def encode_batch(batch: dict, tokenizer_spec: TokenizerSpec, settings: "EncodingSettings") -> dict:
    """Ray Data map_batches function of supervised data: one batch of examples -> input_ids, labels, truncated."""
    tokenizer = load_tokenizer(tokenizer_spec)
    chat_template = settings.chat_template()
    eos = chat_template.eos_id(tokenizer) if chat_template.efficient_eos else None
    discard = settings.mask_history and not settings.preserve_thinking
    examples = [with_image_tokens(example, settings, chat_template) for example in _examples(batch, images=True)]
    encoded = [
        encode_supervised(chat_template.encode_turns(tokenizer, example, discard_history_thoughts=discard),
                          settings.cutoff_len, settings.train_on_prompt, settings.mask_history, efficient_eos=eos)
        for example in examples
    ]
    out = {
        "input_ids": [np.asarray(e["input_ids"], dtype=np.int64) for e in encoded],
        "labels": [np.asarray(e["labels"], dtype=np.int64) for e in encoded],
        "num_tokens": np.asarray([len(e["input_ids"]) for e in encoded], dtype=np.int64),
        "num_trained": np.asarray([sum(label != IGNORE_INDEX for label in e["labels"]) for e in encoded],
                                  dtype=np.int64),
        "truncated": np.asarray([e["truncated"] for e in encoded], dtype=np.int64),
    }
    return with_image_paths(out, examples, settings, chat_template, tokenizer, ("input_ids",))


def with_image_paths(out: dict, examples: list[dict], settings: "EncodingSettings", chat_template, tokenizer,
                     sequences: tuple[str, ...]) -> dict:
    """`out` with the examples' image paths (column `images`, JSON) under a multimodal template: they travel to the
    workers' collator, which decodes the pixels. A cutoff_len that cut into an image's tokens is refused."""
    if settings.images is None:
        return out
    out["images"] = np.asarray([json.dumps(e.get("images") or []) for e in examples], dtype=object)
    image_id = tokenizer.convert_tokens_to_ids(chat_template.media_tokens["image_token"])
    for key in sequences:
        cut = [i for i, (e, ids) in enumerate(zip(examples, out[key]))
               if e.get("images") and _image_tokens(e, settings) > int((np.asarray(ids) == image_id).sum())]
        if cut:
            raise DataError(f"cutoff_len={settings.cutoff_len} cuts into an image's tokens ({len(cut)} example(s) of "
                            "this batch); raise cutoff_len or lower image_max_pixels")
    return out


def with_image_tokens(example: dict, settings: "EncodingSettings", chat_template) -> dict:
    """`example` with each `<image>` expanded into the image's tokens (data/media.py); an example without images
    as it is. Images under a text template are refused."""
    if not example.get("images"):
        return example
    if settings.images is None:
        raise DataError(f"the examples have images, and template {settings.template!r} is text-only; use the model "
                        "family's multimodal template (e.g. qwen2_vl)")
    return {**example, "messages": expand_images(example["messages"], example["image_sizes"], settings.images,
                                                 chat_template.media_tokens)}


def _image_tokens(example: dict, settings: "EncodingSettings") -> int:
    return sum(image_token_count(w, h, settings.images) for w, h in example["image_sizes"])


def encode_prompt_batch(batch: dict, tokenizer_spec: TokenizerSpec, settings: "EncodingSettings") -> dict:
    """Ray Data map_batches function for generation: each example's prompt ids (everything before its last
    response), that response as the label text, and how many prompt tokens cutoff_len cut."""
    tokenizer = load_tokenizer(tokenizer_spec)
    chat_template = settings.chat_template()
    examples = [with_image_tokens(example, settings, chat_template) for example in _examples(batch, images=True)]
    prompts = [encode_prompt(chat_template.encode_oneturn(tokenizer, example)[0], settings.cutoff_len)
               for example in examples]
    out = {
        "index": batch["index"],
        "prompt_ids": [np.asarray(ids, dtype=np.int64) for ids, _ in prompts],
        "label": np.asarray([messages[-1]["content"] for messages in batch["messages"]], dtype=object),
        "truncated": np.asarray([cut for _, cut in prompts], dtype=np.int64),
    }
    return with_image_paths(out, examples, settings, chat_template, tokenizer, ("prompt_ids",))


def encode_query_batch(batch: dict, tokenizer_spec: TokenizerSpec, settings: "EncodingSettings") -> dict:
    """Ray Data map_batches function for stage ppo: the prompt each example asks (everything before its last
    response, whose text PPO does not read); the policy writes the responses in its rollouts."""
    tokenizer = load_tokenizer(tokenizer_spec)
    chat_template = settings.chat_template()
    prompts = [encode_prompt(chat_template.encode_oneturn(tokenizer, example)[0], settings.cutoff_len)
               for example in _examples(batch)]
    return {
        "input_ids": [np.asarray(ids, dtype=np.int64) for ids, _ in prompts],
        "num_tokens": np.asarray([len(ids) for ids, _ in prompts], dtype=np.int64),
        "num_trained": np.zeros(len(prompts), dtype=np.int64),
        "truncated": np.asarray([cut for _, cut in prompts], dtype=np.int64),
    }


def encode_grpo_batch(batch: dict, tokenizer_spec: TokenizerSpec, settings: "EncodingSettings") -> dict:
    """Ray Data map_batches function for stage grpo: each example's prompt ids (as for ppo), its last response as
    the `answer` that the rewards compare the completions with, and its row's other columns (JSON) for them."""
    encoded = encode_query_batch(batch, tokenizer_spec, settings)
    encoded["answer"] = np.asarray([messages[-1]["content"] for messages in batch["messages"]], dtype=object)
    others = batch.get("columns") or [None] * len(encoded["answer"])
    encoded["columns"] = np.asarray([json.dumps(c or {}, ensure_ascii=False) for c in others], dtype=object)
    return encoded


def encode_pairwise_batch(batch: dict, tokenizer_spec: TokenizerSpec, settings: "EncodingSettings") -> dict:
    """Ray Data map_batches function for preference data (stages rm and dpo): chosen and rejected sequences."""
    tokenizer = load_tokenizer(tokenizer_spec)
    chat_template = settings.chat_template()
    eos = chat_template.eos_id(tokenizer) if chat_template.efficient_eos else None
    encoded = []
    examples = [with_image_tokens(example, settings, chat_template) for example in _examples(batch, images=True)]
    for example in examples:
        ids = {}
        for name in ("chosen", "rejected"):
            chat = list(example["messages"]) + [{"role": "assistant", "content": example[name]}]
            ids[name] = chat_template.encode_oneturn(tokenizer, {**example, "messages": chat})
        prompt = ids["chosen"][0]
        encoded.append(encode_pairwise(prompt, ids["chosen"][1], ids["rejected"][1], settings.cutoff_len, eos))
    out = {key: [np.asarray(e[key], dtype=np.int64) for e in encoded]
           for key in ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")}
    out["num_tokens"] = np.asarray([len(e["chosen_input_ids"]) + len(e["rejected_input_ids"]) for e in encoded])
    out["num_trained"] = np.asarray([sum(t != IGNORE_INDEX for t in e["chosen_labels"] + e["rejected_labels"])
                                     for e in encoded])
    out["truncated"] = np.asarray([e["truncated"] for e in encoded], dtype=np.int64)
    return with_image_paths(out, examples, settings, chat_template, tokenizer, ("chosen_input_ids",))


def encode_kto_batch(batch: dict, tokenizer_spec: TokenizerSpec, settings: "EncodingSettings") -> dict:
    """Ray Data map_batches function for KTO: each example, its tag, and a mismatched pair for the KL term.

    The KL example pairs example i's prompt with the response of example i-1 of the same batch (itself
    when the batch has one example), as KTO's reference-point estimate needs unrelated completions.
    """
    tokenizer = load_tokenizer(tokenizer_spec)
    chat_template = settings.chat_template()
    eos = chat_template.eos_id(tokenizer) if chat_template.efficient_eos else None
    examples = [with_image_tokens(example, settings, chat_template) for example in _examples(batch, images=True)]
    out = {k: [] for k in ("input_ids", "labels", "kl_input_ids", "kl_labels")}
    truncated = []
    for i, example in enumerate(examples):
        messages = list(example["messages"])
        mismatched = messages[:-1] + [dict(examples[i - 1]["messages"][-1])]
        for prefix, chat in (("", messages), ("kl_", mismatched)):
            prompt, response = chat_template.encode_oneturn(tokenizer, {**example, "messages": chat})
            encoded = encode_response(prompt, response, settings.cutoff_len, eos)
            out[f"{prefix}input_ids"].append(np.asarray(encoded["input_ids"], dtype=np.int64))
            out[f"{prefix}labels"].append(np.asarray(encoded["labels"], dtype=np.int64))
            if not prefix:
                truncated.append(encoded["truncated"])
    out["kto_tag"] = np.asarray(batch["kto_tag"], dtype=bool)
    out["num_tokens"] = np.asarray([len(ids) for ids in out["input_ids"]], dtype=np.int64)
    out["num_trained"] = np.asarray([int((labels != IGNORE_INDEX).sum()) for labels in out["labels"]], dtype=np.int64)
    out["truncated"] = np.asarray(truncated, dtype=np.int64)
    # a mismatched pair keeps its example's prompt, so its images
    return with_image_paths(out, examples, settings, chat_template, tokenizer, ("input_ids", "kl_input_ids"))


def encode_text_batch(batch: dict, tokenizer_spec: TokenizerSpec, settings: "EncodingSettings") -> dict:
    """Ray Data map_batches function for pre-training: each text + EOS, every token learned.

    With packing (but not neat packing, which keeps documents apart) the batch's documents are joined and cut
    into cutoff_len blocks, so nothing is lost to truncation; otherwise each document is truncated to cutoff_len.
    """
    cutoff_len, concatenate = settings.cutoff_len, settings.packing and not settings.neat_packing
    tokenizer = load_tokenizer(tokenizer_spec)
    documents = [encode_text(tokenizer, t) + [tokenizer.eos_token_id] for t in batch["text"]]
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


@dataclass(frozen=True)
class EncodingSettings:
    """Every setting that changes what tokenisation produces from the same examples and tokenizer.

    The whole of it keys the tokenisation cache, so a setting added here can never let a stale cache be reused.
    """

    template: str | None
    cutoff_len: int
    train_on_prompt: bool = False
    mask_history: bool = False
    packing: bool = False
    neat_packing: bool = False
    stage: str = "sft"
    enable_thinking: bool | None = True
    preserve_thinking: bool = False
    default_system: str | None = None
    tool_format: str | None = None
    images: ImageGeometry | None = None  # a multimodal template's: how many tokens an image becomes

    @classmethod
    def of(cls, cfg) -> "EncodingSettings":
        """The settings of a recipe (a RecipeConfig)."""
        d = cfg.data
        return cls(template=d.template, cutoff_len=d.cutoff_len, train_on_prompt=d.train_on_prompt,
                   mask_history=d.mask_history, packing=d.packing, neat_packing=d.neat_packing,
                   stage=cfg.finetuning.stage, enable_thinking=d.enable_thinking,
                   preserve_thinking=d.preserve_thinking, default_system=d.default_system, tool_format=d.tool_format,
                   images=image_geometry(cfg))

    def chat_template(self):
        """The template with this recipe's thinking, default system prompt and tool format."""
        return get_template(self.template, enable_thinking=self.enable_thinking, default_system=self.default_system,
                            tool_format=self.tool_format, preserve_thinking=self.preserve_thinking)

    @property
    def packs_after_encoding(self) -> bool:
        """Whether encoded sequences are packed: pt's encoder already concatenates text unless neat packing
        keeps its documents apart."""
        return self.neat_packing if STAGE_SPECS[self.stage].encoder == "text" else self.packing


def image_geometry(cfg) -> ImageGeometry | None:
    """The image geometry of a recipe whose template encodes images (None for a text template)."""
    if plugin_of(cfg.data.template) is None:
        return None
    if cfg.data.packing or cfg.data.neat_packing:
        raise DataError("packing: packing under a multimodal template is not built yet; set packing: false (and "
                        "neat_packing: false)")
    m = cfg.model
    try:
        return ImageGeometry.read(m.model_name_or_path, m.image_max_pixels, m.image_min_pixels,
                                  plugin_of(cfg.data.template))
    except (FileNotFoundError, KeyError, ValueError) as err:
        raise DataError(f"template: {cfg.data.template!r} is a multimodal template, and the model has no image "
                        f"processor to count its images' tokens with ({' '.join(str(err).split())}); use a "
                        "vision-language model of its family, or the family's text template") from None


# Up to this many examples the driver tokenises in its own process: that takes a fraction of a second, where
# starting Ray Data's task workers (each importing Transformers and loading the tokenizer) costs about 3 s
# (benchmarks/startup.py measures both).
DRIVER_TOKENIZE_MAX = 2000


def _examples(batch: dict, images: bool = False) -> list[dict]:
    """The rows of a batch of example columns, as the dicts templates encode (system, messages, tools, ...). Rows
    with images are refused unless the encoder takes `images` (so far supervised training's alone)."""
    keys = list(batch)
    examples = [dict(zip(keys, values)) for values in zip(*(batch[k] for k in keys))]
    if not images and any(example.get("images") for example in examples):
        raise DataError("images are built in stages sft, dpo and kto, prediction, chat and serving; the other "
                        "stages with images are not built yet")
    return examples


def columns_of(examples: list[dict]) -> dict:
    """The examples as one batch of columns (every key any example has; None where one lacks it)."""
    keys = dict.fromkeys(key for example in examples for key in example)
    return {key: [example.get(key) for example in examples] for key in keys}


def on_examples(encode):
    """`encode` (a batch function over example columns) for batches of JSON-encoded examples."""

    def run(batch: dict, **kwargs) -> dict:
        return encode(columns_of([json.loads(text) for text in batch["example"]]), **kwargs)

    run.__name__ = run.__qualname__ = encode.__name__  # Ray Data names its operator after the function
    return run


def tokenize(rows: Rows, tokenizer_spec: TokenizerSpec, settings: EncodingSettings, encoder, batch_size: int,
             stream_tasks: int | None = None, driver_max: int = DRIVER_TOKENIZE_MAX, tasks: int | None = None,
             here=None):
    """Tokenises (and packs) the examples of `rows` with the stage's `encoder` in Ray Data tasks over the cluster;
    returns a materialised Dataset, or with `stream_tasks` (streaming) a lazy one that is tokenised as the workers
    read it.

    Packing bundles the examples of each preprocessing batch into sequences of at most cutoff_len tokens.

    Materialising before training matters: the workers then read blocks from the object store and need
    no CPU of their own for preprocessing, so a cluster whose CPUs all go to workers cannot deadlock.
    A stream is tokenised while the workers train, and Ray Train gives Ray Data only the CPUs its workers
    do not hold, which may be none: streaming tasks reserve no CPU and at most `stream_tasks` run at once
    (one per worker), so they share the machine with the training the way in-process tokenising would.
    `tasks` (preprocessing_num_workers) caps how many tokenising tasks run at once.

    A small dataset held by the driver (at most `driver_max` examples) is tokenised by `here` instead, a function
    like `encode_tables` (the driver passes its helper process's), without starting Ray Data's task workers.
    """
    import ray

    s = settings
    count = rows.count()
    if stream_tasks is None and rows.here and count <= driver_max and here is not None:
        import ray.data

        tables = here(list(rows.batches(["example"], batch_size=batch_size)), tokenizer_spec, settings, encoder)
        # from_blocks reads each table's metadata here; from_arrow would start a task for it (a new worker
        # process on a fresh instance, about a second of a small run's start)
        return ray.data.from_blocks(tables)
    options = {"concurrency": tasks} if tasks else {}
    if stream_tasks is not None:
        options = {"num_cpus": 0, "concurrency": min(stream_tasks, tasks or stream_tasks)}
    # A few blocks per CPU keep every CPU busy without paying each task's fixed cost hundreds of times
    # (measured in benchmarks/data_pipeline.py); a large file read by one task arrives as few blocks.
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    wanted = max(1, min(count // batch_size + 1, 2 * cpus))
    dataset = rows.to_dataset(blocks=wanted)
    # a stream's tasks must reserve no CPU (the workers may hold them all): no other task (a repartition, a
    # projection) may come before them, and the encoders read the example column alone
    if stream_tasks is None and dataset.num_blocks() < wanted:
        dataset = dataset.repartition(wanted)
    dataset = dataset.map_batches(on_examples(encoder), batch_size=batch_size, **options,
                                  fn_kwargs=dict(tokenizer_spec=tokenizer_spec, settings=s))
    if s.packs_after_encoding:
        dataset = dataset.map_batches(pack_batch, batch_size=batch_size, **options,
                                      fn_kwargs=dict(cutoff_len=s.cutoff_len, neat=s.neat_packing))
    if stream_tasks is not None:
        return dataset
    with user_errors_as_data_errors():  # a task's error on a row the driver's sample did not reach
        return dataset.materialize()


SAMPLE_ROWS = 8


def check_encoding(names: str, datasets: list[list[dict]], tokenizer_spec: TokenizerSpec, settings: EncodingSettings,
                   encoder, rows: int = SAMPLE_ROWS) -> None:
    """Encodes the first `rows` examples of each dataset on the driver, as the workers will: an unknown template,
    a missing special token or an unencodable row fails here, naming the dataset and row, before Ray starts."""
    template = settings.chat_template()
    if STAGE_SPECS[settings.stage].data != "text":  # text is encoded without the template
        template.check_tokenizer(load_tokenizer(tokenizer_spec))
    for name, examples in zip(comma_list(names), datasets):
        refuse_tools(name, sum(1 for e in examples if e.get("tools") or has_tool_turns(e)), settings.template,
                     settings.tool_format)
        for row, example in enumerate(examples[:rows]):
            last = example["messages"][-1] if example.get("messages") else {}
            empty = [k for k in ("chosen", "rejected") if k in example and not str(example[k]).strip()]
            if settings.stage == "sft" and last.get("role") == "assistant" and not str(last["content"]).strip():
                empty.append("response")
            if empty:
                raise DataError(f"dataset {name!r} row {row}: the {' and '.join(empty)} is empty; a model learns "
                                "nothing from it (fix or drop the row)")
            try:
                encoder(columns_of([example]), tokenizer_spec=tokenizer_spec, settings=settings)
            except DataError as err:
                raise DataError(f"dataset {name!r} row {row}: {err}") from None


@contextlib.contextmanager
def user_errors_as_data_errors():
    """Re-raises an error of Ray Data's tasks or Ray Train's workers that a DataError (bad input) caused as that
    DataError's one line; any other error passes through as it is."""
    try:
        yield
    except DataError:
        raise
    except Exception as err:
        cause = _user_error(err)
        if cause is None:
            raise
        raise DataError(str(cause)) from None


def _user_error(err: BaseException) -> DataError | None:
    """The DataError a Ray Data or Ray Train task raised on bad input, found in the chain of causes, or None."""
    seen, pending, first = set(), [err], err
    while pending:
        err = pending.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(err, DataError):
            return err
        # Ray Train's errors hold the workers' own exceptions by rank; a task's error holds its cause
        pending += [err.__cause__, err.__context__, getattr(err, "cause", None),
                    *getattr(err, "worker_failures", {}).values()]
    # Ray Data passes a task's exception on as the text of its traceback only
    found = re.search(rf"{re.escape(DataError.__module__)}\.DataError: (.+)", str(first))
    return DataError(found[1].strip()) if found else None


def encode_tables(batches: list[dict], tokenizer_spec: TokenizerSpec, settings: EncodingSettings, encoder
                  ) -> list[pa.Table]:
    """Batches of JSON-encoded examples tokenised (and packed) in this process, batch by batch as Ray Data's tasks
    would: one Arrow table each."""
    tables = []
    for batch in batches:
        batch = on_examples(encoder)(batch, tokenizer_spec=tokenizer_spec, settings=settings)
        if settings.packs_after_encoding:
            batch = pack_batch(batch, cutoff_len=settings.cutoff_len, neat=settings.neat_packing)
        tables.append(pa.table({key: _arrow(column) for key, column in batch.items()}))
    return tables


def _arrow(column) -> pa.Array:
    """A column of an encoded batch as Arrow: token sequences become lists of int64, text stays text."""
    if isinstance(column, np.ndarray) and column.ndim == 1 and column.dtype != object:
        return pa.array(column)
    if all(isinstance(value, str) for value in column):
        return pa.array(list(column), type=pa.string())
    return pa.array([np.asarray(value).tolist() for value in column], type=pa.list_(pa.int64()))


def tokenize_cached(rows_of, identity: dict, tokenizer_spec: TokenizerSpec, settings: EncodingSettings, encoder,
                    batch_size: int, cache_dir: str | None, strict: bool, overwrite: bool,
                    driver_max: int = DRIVER_TOKENIZE_MAX, tasks: int | None = None, here=None):
    """`tokenize` of the rows `rows_of()` gives, reusing a Parquet cache made from the same inputs; returns
    (dataset, reused). A reused cache is read without reading, converting or mixing the datasets again.

    `identity` says what the rows are made from (the datasets' files, sizes and times, and every setting that
    selects rows). With `strict` (a tokenized_path the user named), `cache_dir` is the cache itself and one made
    from other inputs is an error; otherwise `cache_dir` holds one automatic cache per key.
    """
    if cache_dir is None:
        return tokenize(rows_of(), tokenizer_spec, settings, encoder, batch_size, driver_max=driver_max,
                        tasks=tasks, here=here), False
    recorded = {**dataclasses.asdict(settings), "encoding_version": ENCODING_VERSION}
    key = cache.cache_key(identity, tokenizer_spec, recorded)
    if not strict:
        cache_dir = f"{cache_dir.rstrip('/')}/{key}"
    if not overwrite:
        cached = cache.load(cache_dir, key, strict=strict)
        if cached is not None:
            return cached, True
    dataset = tokenize(rows_of(), tokenizer_spec, settings, encoder, batch_size, driver_max=driver_max, tasks=tasks,
                       here=here)
    cache.save(dataset, cache_dir, key, recorded)
    return dataset, False


# the stages' encoders by the name their spec gives (recipe/stages.py)
ENCODERS = {"text": encode_text_batch, "supervised": encode_batch, "pairwise": encode_pairwise_batch,
            "kto": encode_kto_batch, "query": encode_query_batch, "grpo": encode_grpo_batch}


def stage_encoder(stage: str):
    """The Ray Data batch function that tokenises stage `stage`'s examples."""
    return ENCODERS[STAGE_SPECS[stage].encoder]


def token_stats(dataset) -> dict:
    """Examples, tokens, trained tokens and tokens dropped by truncation of a tokenised dataset.

    Streams only the three small count columns to the driver; a Ray Data aggregation would start a
    shuffle stage costing seconds even on tiny data. A small materialised dataset (one the driver tokenised)
    is read whole: selecting its columns would start a task, and its blocks are already in this node's store.
    """
    from ray.data.dataset import MaterializedDataset

    totals = {"examples": 0, "tokens": 0, "trained_tokens": 0, "truncated_tokens": 0}
    columns = {"num_tokens": "tokens", "num_trained": "trained_tokens", "truncated": "truncated_tokens"}
    small = isinstance(dataset, MaterializedDataset) and dataset.count() <= DRIVER_TOKENIZE_MAX
    for batch in (dataset if small else dataset.select_columns(list(columns))).iter_batches(
            batch_format="numpy", batch_size=65536):
        totals["examples"] += len(batch["num_tokens"])
        for column, key in columns.items():
            totals[key] += int(batch[column].sum())
    return totals


def first_row(dataset) -> dict:
    """A dataset's first row, read without a task (`take(1)` starts one to cut the first block)."""
    return next(iter(dataset.iter_rows()))


def describe_with(row: dict, tokenizer_spec: TokenizerSpec) -> str:
    """`describe_example` with the tokenizer of `tokenizer_spec` (what the driver's helper process runs)."""
    return describe_example(row, load_tokenizer(tokenizer_spec))


def shortened_runs(text: str, at_least: int = 8) -> str:
    """`text` with each run of one special token repeated `at_least` times or more written once, with its count
    (an image's hundreds of <|image_pad|> tokens as `<|image_pad|>*256`)."""
    return re.sub(r"(<\|[^|<>]+\|>)\1{%d,}" % (at_least - 1),
                  lambda run: f"{run[1]}*{len(run[0]) // len(run[1])}", text)


def describe_example(row: dict, tokenizer) -> str:
    """One decoded example with its label mask, printed before training (both sides of a preference pair)."""
    if "chosen_input_ids" in row:
        return "\n".join(f"[{side}]\n" + describe_example(
            {"input_ids": row[f"{side}_input_ids"], "labels": row[f"{side}_labels"]}, tokenizer)
            for side in ("chosen", "rejected"))
    if "kto_tag" in row:
        tag = "desirable" if row["kto_tag"] else "undesirable"
        shown = describe_example({"input_ids": row["input_ids"], "labels": row["labels"]}, tokenizer)
        return f"kto_tag: {tag}\n" + shown
    ids = [int(i) for i in row["input_ids"]]
    if "labels" not in row:  # a ppo or grpo prompt: the policy writes the response
        answer = f"\nanswer (what the rewards compare with):\n{row['answer']}" if "answer" in row else ""
        answer += f"\nother columns: {row['columns']}" if row.get("columns", "{}") != "{}" else ""
        return f"prompt_ids:\n{ids}\nprompt:\n{tokenizer.decode(ids, skip_special_tokens=False)}{answer}"
    labels = [int(i) for i in row["labels"]]
    trained = [i for i, label in zip(ids, labels) if label != IGNORE_INDEX]
    images = f"\nimages:\n{json.loads(row['images'])}" if row.get("images", "[]") != "[]" else ""
    return "\n".join([
        f"input_ids:\n{ids}",
        f"inputs:\n{shortened_runs(tokenizer.decode(ids, skip_special_tokens=False))}{images}",
        f"label_ids:\n{labels}",
        f"labels (trained tokens only):\n{tokenizer.decode(trained, skip_special_tokens=False)}",
    ])
