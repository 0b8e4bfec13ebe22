"""Where a dataset's rows come from: the files (local, or s3:// / gs:// through pyarrow) or hub dataset that a
dataset_info.json entry names, read in batches and converted to examples, bad rows marked with their positions.

The same batch functions run in Ray Data tasks for data at scale and in the driver's process for a few MB
(`here`), where starting tasks would cost more than the reading; a bounded head of each dataset is read on the
driver before Ray starts, so a wrong column mapping or an empty file fails in seconds.
"""

import hashlib
import json
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.csv
import pyarrow.fs
import pyarrow.ipc
import pyarrow.parquet

from rayft.data.converters import CONVERTERS, RowError, text
from rayft.data.errors import DataError
from rayft.data.files import resolve
from rayft.data.media import attach_images
from rayft.data.registry import DatasetAttr, kind
from rayft.data.templates import plugin_of, template_problem
from rayft.recipe.stages import STAGE_SPECS

SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".arrow", ".txt")
# Up to this many bytes of local files the driver reads a dataset itself: a Ray Data task would first have to
# start a worker process (about 2 s), where reading a few MB takes a fraction of that.
READ_HERE_MAX_BYTES = 8 * 2**20
HEAD_BYTES = 2**20  # what the driver reads of a dataset's first file before Ray starts
BATCH_ROWS = 4096


@dataclass(frozen=True)
class Source:
    """One dataset of a recipe, located and checked but not read: its files, or its hub coordinates."""

    attr: DatasetAttr
    as_text: bool  # stage pt reads any dataset's prompt column as text
    filesystem: pyarrow.fs.FileSystem | None = None
    paths: tuple[str, ...] = ()
    suffix: str = ""
    sizes: tuple[int, ...] = ()
    mtimes: tuple[float, ...] = ()
    token: str | None = None
    keep_columns: bool = False  # stage grpo: a row's other columns travel with it, for the reward functions
    media_dir: str | None = None  # where the rows' image paths are found (a dataset with an images column)

    @property
    def local(self) -> bool:
        return isinstance(self.filesystem, pyarrow.fs.LocalFileSystem)

    @property
    def small(self) -> bool:
        """Few enough local bytes that the driver reads them faster than a task would."""
        return self.local and sum(self.sizes) <= READ_HERE_MAX_BYTES

    def identity(self) -> dict:
        """What the rows are, for cache keys: the entry, and each file's path, size and modification time
        (a hub dataset: its name, subset and split)."""
        return {"entry": dict(vars(self.attr)), "as_text": self.as_text, "keep_columns": self.keep_columns,
                "files": [list(f) for f in zip(self.paths, self.sizes, self.mtimes)],
                **({"media_dir": self.media_dir} if self.media_dir else {})}

    def describe(self, file: int, row: int) -> str:
        """A bad row's position: 'train.jsonl line 12', 'part-3.parquet row 7', 'row 12'."""
        if not self.paths:
            return f"row {row}"
        return f"{Path(self.paths[file]).name} {'line' if self.in_lines(file) else 'row'} {row}"

    def in_lines(self, file: int) -> bool:
        """Whether the file holds a row per line (JSON lines, text; a .json file not holding an array)."""
        return self.suffix in (".jsonl", ".txt") or (self.suffix == ".json"
                                                      and not _starts_with_bracket(self.filesystem, self.paths[file]))


def locate(attr: DatasetAttr, dataset_dir: str, as_text: bool, token: str | None = None,
           keep_columns: bool = False, media_dir: str | None = None) -> Source:
    """The files of `attr` (checked: present, one type, none empty), without reading them. With `keep_columns`
    each example keeps its row's other columns (those the converter does not read) under `columns`. A dataset with
    an images column finds its images under `media_dir` (default: dataset_dir), as LLaMA-Factory does."""
    if attr.hf_hub_url:
        if attr.column("images"):
            raise DataError(f"dataset {attr.name!r}: images in a hub dataset are not built yet; save the dataset and "
                            "its images to a folder and point file_name and media_dir at them")
        return Source(attr, as_text, token=token, keep_columns=keep_columns)
    if attr.column("images"):
        media_dir = media_dir or dataset_dir
        if "://" in media_dir:
            raise DataError(f"dataset {attr.name!r}: images are read from a local or shared folder, not {media_dir}; "
                            "set media_dir to one")
    inside = posixpath.normpath(attr.file_name.replace("\\", "/"))
    if inside.startswith(("/", "../")) or inside == ".." or "://" in attr.file_name:
        raise DataError(f"dataset {attr.name!r}: file_name {attr.file_name!r} points outside dataset_dir; a dataset's "
                        "files are read from inside dataset_dir only (move or link them there)")
    fs, root = resolve(dataset_dir)
    path = f"{root.rstrip('/')}/{inside}"
    info = fs.get_file_info(path)
    if info.type == pyarrow.fs.FileType.NotFound:
        raise DataError(f"dataset {attr.name!r}: file {path} does not exist")
    if attr.split != "train":
        raise DataError(f"dataset {attr.name!r}: a local file is one 'train' split; split {attr.split!r} only "
                        "applies to hf_hub_url datasets")
    if info.type == pyarrow.fs.FileType.Directory:
        files = [f for f in fs.get_file_info(pyarrow.fs.FileSelector(path, recursive=False))
                 if f.type == pyarrow.fs.FileType.File and not f.base_name.startswith(".")]
        files.sort(key=lambda f: f.path)
    else:
        files = [info]
    suffixes = {Path(f.path).suffix for f in files}
    if not files or len(suffixes) != 1:
        raise DataError(f"dataset {attr.name!r}: folder {path} must hold files of one type, found {sorted(suffixes)}")
    (suffix,) = suffixes
    if suffix not in SUFFIXES:
        raise DataError(f"dataset {attr.name!r}: {suffix or 'extension-less'} files are not read; use one of "
                        f"{', '.join(SUFFIXES)}")
    for f in files:
        if f.size == 0:
            raise DataError(f"dataset {attr.name!r}: {f.path} is empty")
    return Source(attr, as_text, fs, tuple(f.path for f in files), suffix, tuple(f.size for f in files),
                  tuple(f.mtime.timestamp() if f.mtime else 0.0 for f in files), keep_columns=keep_columns,
                  media_dir=media_dir if attr.column("images") else None)


def check_kind(attr: DatasetAttr, data: str, stage: str) -> None:
    """A stage trains on one kind of data ("text" reads any dataset's prompts as plain text)."""
    if data != "text" and kind(attr) != data:
        raise DataError(f"dataset {attr.name!r} holds {kind(attr)} data, but stage {stage!r} trains on "
                        f"{data} data; choose a {data} dataset or the stage made for this one")


def check_media(attr: DatasetAttr, stage: str, template: str | None) -> None:
    """Media columns a run can train on: images, in stages sft, dpo and kto, under a multimodal template. Videos and
    audios need torchvision / PyAV and torchaudio, which this build does not have."""
    where = f"dataset {attr.name!r}"
    for column, library in (("videos", "torchvision and PyAV"), ("audios", "torchaudio")):
        if attr.columns.get(column):
            raise DataError(f"{where}: {column} are not built (they need {library}; torchvision has no build for the "
                            f"CPU-only torch rayft is tested with); drop the {column} column from dataset_info.json")
    if not attr.columns.get("images"):
        return
    if not STAGE_SPECS[stage].images:
        with_images = ", ".join(name for name, spec in STAGE_SPECS.items() if spec.images)
        raise DataError(f"{where}: images in stage {stage!r} are not built yet (stages {with_images} train with "
                        "images)")
    if plugin_of(template) is None:
        raise DataError(f"{where} has images, and template {template!r} is text-only; use the model family's "
                        "multimodal template (e.g. qwen2_vl)")
    problem = template_problem(template)
    if problem:
        raise DataError(f"template: {problem}")


# --- raw rows -----------------------------------------------------------------------------------------------

def _starts_with_bracket(fs, path: str) -> bool:
    with fs.open_input_stream(path) as stream:
        return stream.read(4096).decode("utf-8", errors="replace").lstrip().startswith("[")


def file_rows(source: Source, file: int, limit: int | None = None) -> Iterator[tuple[int, object]]:
    """(position, raw row) of one file, in order; a line that is not JSON comes as a RowError in its place.

    Lines count from 1, rows of arrays and tables from 0. `limit` stops after that many rows, reading no
    more of the file than they need (a JSON array is then decoded item by item from its first bytes).
    """
    fs, path, suffix = source.filesystem, source.paths[file], source.suffix
    name = source.attr.name
    if source.in_lines(file):
        yield from _lines(fs, path, as_json=suffix != ".txt", limit=limit)
    elif suffix == ".json":
        yield from enumerate(_json_array(fs, path, name, limit))
    else:
        yield from _table_rows(fs, path, suffix, limit)


def _lines(fs, path: str, as_json: bool, limit: int | None) -> Iterator[tuple[int, object]]:
    count = 0
    with fs.open_input_stream(path) as stream:
        buffered = _line_reader(stream)
        for lineno, raw in enumerate(buffered, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:  # one bad line is one bad row, not a failed read
                yield lineno, RowError(f"not UTF-8 text (byte {err.start}: {err.reason})")
                count += 1
                continue
            if not line.strip():
                continue
            if not as_json:
                yield lineno, {"text": line.rstrip("\r\n")}
            else:
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as err:
                    yield lineno, RowError(f"not valid JSON ({err.msg})")
            count += 1
            if limit is not None and count >= limit:
                return


def _line_reader(stream, chunk: int = 2**22) -> Iterator[bytes]:
    pending = b""
    while True:
        data = stream.read(chunk)
        if not data:
            break
        lines = (pending + data).split(b"\n")
        pending = lines.pop()
        yield from lines
    if pending:
        yield pending


def _json_array(fs, path: str, name: str, limit: int | None) -> Iterator[object]:
    """The items of a file holding one JSON array. Whole, unless `limit` asks for the first items only."""
    with fs.open_input_stream(path) as stream:
        if limit is None:
            try:
                rows = json.loads(stream.read().decode("utf-8"))
            except UnicodeDecodeError as err:
                raise DataError(f"dataset {name!r}: {path} is not UTF-8 text (byte {err.start}: {err.reason}); save it "
                                "as UTF-8") from None
            except json.JSONDecodeError as err:
                raise DataError(f"dataset {name!r}: {path} is not valid JSON (line {err.lineno}, "
                                f"column {err.colno}: {err.msg})") from None
            yield from rows
            return
        data = stream.read(HEAD_BYTES).decode("utf-8", errors="ignore")
    decoder, pos, count = json.JSONDecoder(), data.index("[") + 1, 0
    while count < limit:
        while pos < len(data) and data[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(data) or data[pos] == "]":
            return
        try:
            item, pos = decoder.raw_decode(data, pos)
        except json.JSONDecodeError as err:
            if pos + 1 < len(data) and err.pos < len(data) - 1:
                line = data.count("\n", 0, err.pos) + 1
                raise DataError(f"dataset {name!r}: {path} is not valid JSON (line {line}: {err.msg})") from None
            return  # the head ends inside an item
        yield item
        count += 1


def _table_rows(fs, path: str, suffix: str, limit: int | None) -> Iterator[tuple[int, dict]]:
    position = 0
    for batch in _record_batches(fs, path, suffix):
        for row in batch.to_pylist():
            yield position, row
            position += 1
            if limit is not None and position >= limit:
                return


def _record_batches(fs, path: str, suffix: str) -> Iterator[pa.RecordBatch]:
    if suffix == ".parquet":
        yield from pyarrow.parquet.ParquetFile(fs.open_input_file(path)).iter_batches(batch_size=BATCH_ROWS)
    elif suffix == ".csv":
        yield from pyarrow.csv.open_csv(fs.open_input_stream(path))
    else:  # .arrow: what `datasets` saves is the stream format; the file format is read too
        source = fs.open_input_file(path)
        try:
            reader = pyarrow.ipc.open_stream(source)
        except pa.ArrowInvalid:
            source.seek(0)
            reader = pyarrow.ipc.open_file(source)
            yield from (reader.get_batch(i) for i in range(reader.num_record_batches))
            return
        yield from reader


def hub_dataset(source: Source):
    """A hf_hub_url dataset through `datasets.load_dataset` (downloaded once, memory-mapped Arrow)."""
    import datasets  # heavy; only datasets from the hub go through it

    attr = source.attr
    try:
        return datasets.load_dataset(attr.hf_hub_url, name=attr.subset, data_dir=attr.folder, split=attr.split,
                                     token=source.token)
    except Exception as err:  # the datasets library raises many types; the user needs the message either way
        raise DataError(f"dataset {attr.name!r}: could not load {attr.hf_hub_url!r} (subset {attr.subset!r}, "
                        f"split {attr.split!r}): {err}") from None


# --- converted rows -----------------------------------------------------------------------------------------

def converted(source: Source, positioned: list[tuple[int, int, object]]) -> dict:
    """A batch of (file, position, raw row) as example columns: `example` (the internal example as JSON, empty
    when the row is bad), `error` (why it is bad; empty when good), `file` and `row` (where it came from),
    `key` (a hash of the dataset and position that seeded selections draw on) and `tools` (it has tool
    definitions or turns)."""
    converter = text if source.as_text else CONVERTERS[source.attr.formatting]
    mapped = source.attr.mapped_columns() if source.keep_columns else set()
    out = {"example": [], "error": [], "file": [], "row": [], "tools": []}
    for file, row, raw in positioned:
        try:
            if isinstance(raw, RowError):
                raise raw
            example = converter(raw, source.attr)
            if source.media_dir is not None and not source.as_text:
                example = attach_images(example, raw, source.attr.column("images"), source.media_dir)
            if source.keep_columns:
                example["columns"] = {k: v for k, v in raw.items() if k not in mapped}
            encoded = json.dumps(example, ensure_ascii=False, default=str)
            try:
                encoded.encode("utf-8")
            except UnicodeEncodeError as err:  # valid JSON may still hold a lone surrogate ("\ud800")
                bad = err.object[err.start:err.end]
                raise RowError(f"holds {bad!r}, which is not text (a lone surrogate)") from None
            out["example"].append(encoded)
            out["error"].append("")
            out["tools"].append(bool(example.get("tools")) or has_tool_turns(example))
        except RowError as err:
            out["example"].append("")
            out["error"].append(str(err) or "malformed")
            out["tools"].append(False)
        out["file"].append(file)
        out["row"].append(row)
    files, rows = np.asarray(out["file"], dtype=np.uint64), np.asarray(out["row"], dtype=np.uint64)
    out["key"] = row_keys(source.attr.name, files, rows)
    out["file"], out["row"] = files.astype(np.int32), rows.astype(np.int64)
    out["tools"] = np.asarray(out["tools"], dtype=bool)
    return out


def has_tool_turns(example: dict) -> bool:
    return any(m["role"] in ("function", "observation") for m in example.get("messages", ()))


def row_keys(name: str, files: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """A well-mixed 64-bit key per row from the dataset's name and the row's position (splitmix64)."""
    salt = mix64(np.uint64(int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")))
    return mix64((files << np.uint64(40)) ^ rows ^ salt)  # a random salt per name: no two datasets' keys meet


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: consecutive inputs give unrelated outputs, which seeded selections rank."""
    with np.errstate(over="ignore"):
        x = np.asarray(x, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def read_batches(batch: dict, source: Source) -> Iterator[dict]:
    """Ray Data map_batches function over a batch of file indices: the converted rows of those files."""
    for file in batch["file"]:
        pending = []
        for position, raw in file_rows(source, int(file)):
            pending.append((int(file), position, raw))
            if len(pending) == BATCH_ROWS:
                yield converted(source, pending)
                pending = []
        if pending:
            yield converted(source, pending)


def hub_batch(batch: dict, source: Source) -> dict:
    """Ray Data map_batches function over a hub dataset's rows (with their `__row` index)."""
    rows = batch.pop("__row")
    columns = list(batch)
    raws = [dict(zip(columns, values)) for values in zip(*(batch[c] for c in columns))]
    return converted(source, [(0, int(r), _plain(raw)) for r, raw in zip(rows, raws)])


def _plain(value):
    """numpy values of a Ray Data batch as the JSON-like values the converters read."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def head(source: Source, rows: int) -> list[dict]:
    """The first `rows` rows of the dataset's first file converted, read on the driver (bad rows left out):
    the sample every check before Ray works on."""
    return head_and_bad_rows(source, rows)[0]


def head_and_bad_rows(source: Source, rows: int) -> tuple[list[dict], list[str]]:
    """`head`, and where and why each bad row among those first rows is bad ("line 3: not valid JSON (...)")."""
    if not source.paths:
        loaded = hub_dataset(source)
        raws = [(0, i, loaded[i]) for i in range(min(rows, len(loaded)))]
    else:
        raws = [(0, position, raw) for position, raw in file_rows(source, 0, limit=rows)]
    batch = converted(source, raws)
    bad = [f"{source.describe(0, int(row))}: {error}" for row, error in zip(batch["row"], batch["error"]) if error]
    return [json.loads(e) for e in batch["example"] if e], bad
