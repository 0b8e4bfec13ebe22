"""The dataset registry: LLaMA-Factory's `dataset_info.json`, read unchanged, and the raw rows it points to."""

import difflib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow
import pyarrow.csv
import pyarrow.parquet

from rayft.data.errors import DataError
from rayft.recipe.values import DEFAULT_SEED, comma_list

DEFAULT_COLUMNS = {
    "alpaca": {"prompt": "instruction", "query": "input", "response": "output", "system": "system",
               "history": "history", "chosen": "chosen", "rejected": "rejected"},
    "sharegpt": {"messages": "conversations", "system": None, "tools": None, "chosen": "chosen",
                 "rejected": "rejected"},
}
DEFAULT_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}


@dataclass
class DatasetAttr:
    """One entry of dataset_info.json, with LLaMA-Factory's defaults filled in."""

    name: str
    file_name: str | None = None
    hf_hub_url: str | None = None
    formatting: str = "alpaca"
    ranking: bool = False
    subset: str | None = None
    split: str = "train"
    num_samples: int | None = None
    folder: str | None = None
    columns: dict = field(default_factory=dict)
    tags: dict = field(default_factory=dict)

    def column(self, role: str) -> str | None:
        """The dataset's column name for `role` (prompt, query, response, system, history, messages, tools)."""
        return self.columns.get(role, DEFAULT_COLUMNS[self.formatting].get(role))

    def tag(self, name: str) -> str:
        """A sharegpt tag (role_tag, content_tag, user_tag, ...), LLaMA-Factory's default unless overridden."""
        return self.tags.get(name, DEFAULT_TAGS[name])


def load_dataset_info(dataset_dir: str | Path) -> dict:
    path = Path(dataset_dir) / "dataset_info.json"
    if not path.is_file():
        raise DataError(f"dataset_dir: no dataset_info.json in {dataset_dir}; point dataset_dir at the folder holding "
                        "it")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None


def dataset_attrs(names: str, dataset_dir: str | Path) -> list[DatasetAttr]:
    """Looks up a comma list of dataset names; unknown names are reported with the nearest known one."""
    info = load_dataset_info(dataset_dir)
    attrs, problems = [], []
    for name in comma_list(names):
        if name not in info:
            close = difflib.get_close_matches(name, list(info), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f" (known: {', '.join(sorted(info))})"
            problems.append(f"dataset {name!r} is not in {dataset_dir}/dataset_info.json{hint}")
            continue
        entry = dict(info[name])
        known = {f for f in DatasetAttr.__dataclass_fields__ if f != "name"}
        unknown = set(entry) - known - {"ms_hub_url", "om_hub_url", "script_url", "load_from"}
        if unknown:
            problems.append(f"dataset {name!r}: unknown keys {sorted(unknown)} in dataset_info.json")
            continue
        attr = DatasetAttr(name=name, **{k: v for k, v in entry.items() if k in known})
        problems += _unbuilt(attr, entry)
        attrs.append(attr)
    if problems:
        raise DataError("\n".join(problems))
    return attrs


def _unbuilt(attr: DatasetAttr, entry: dict) -> list[str]:
    where = f"dataset {attr.name!r}"
    if attr.file_name is None and attr.hf_hub_url is None:
        return [f"{where}: needs file_name (a local file or folder) or hf_hub_url; ModelScope, Modelers and script "
                "datasets are not supported"]
    if attr.formatting not in DEFAULT_COLUMNS:
        return [f"{where}: unknown formatting {attr.formatting!r}; use alpaca or sharegpt"]
    return []


def kind(attr: DatasetAttr) -> str:
    """What a dataset holds: 'preference' (ranking), 'kto' (a kto_tag column) or 'supervised'."""
    if attr.ranking:
        return "preference"
    return "kto" if "kto_tag" in attr.columns else "supervised"


def read_rows(attr: DatasetAttr, dataset_dir: str | Path, seed: int = DEFAULT_SEED, token: str | None = None) -> list:
    """Every raw row of the dataset, from a local file or folder or through `datasets.load_dataset`.

    `num_samples` then draws that many rows (without replacement while it can), seeded.
    """
    rows = _hub_rows(attr, token) if attr.hf_hub_url else _local_rows(attr, Path(dataset_dir) / attr.file_name)
    if attr.num_samples is not None:
        rng = random.Random(seed)
        order = list(range(len(rows)))
        rng.shuffle(order)
        extra = [rng.randrange(len(rows)) for _ in range(max(0, attr.num_samples - len(rows)))]
        rows = [rows[i] for i in order[:attr.num_samples] + extra]
    return rows


def _hub_rows(attr: DatasetAttr, token: str | None) -> list:
    import datasets  # heavy; only datasets from the hub go through it

    try:
        loaded = datasets.load_dataset(attr.hf_hub_url, name=attr.subset, data_dir=attr.folder,
                                       split=attr.split, token=token)
    except Exception as err:  # the datasets library raises many types; the user needs the message either way
        raise DataError(f"dataset {attr.name!r}: could not load {attr.hf_hub_url!r} (subset {attr.subset!r}, "
                        f"split {attr.split!r}): {err}") from None
    return list(loaded)


def _local_rows(attr: DatasetAttr, path: Path) -> list:
    if not path.exists():
        raise DataError(f"dataset {attr.name!r}: file {path} does not exist")
    if attr.split != "train":
        raise DataError(f"dataset {attr.name!r}: a local file is one 'train' split; split {attr.split!r} only "
                        "applies to hf_hub_url datasets")
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")) if path.is_dir() else [path]
    suffixes = {p.suffix for p in files}
    if not files or len(suffixes) != 1:
        raise DataError(f"dataset {attr.name!r}: folder {path} must hold files of one type, found {sorted(suffixes)}")
    (suffix,) = suffixes
    if suffix not in READERS:
        raise DataError(f"dataset {attr.name!r}: {suffix or 'extension-less'} files are not read; use one of "
                        f"{', '.join(READERS)}")
    rows = []
    for file in files:
        if file.stat().st_size == 0:
            raise DataError(f"dataset {attr.name!r}: {file} is empty")
        rows += READERS[suffix](file, attr.name)
    return rows


def _read_json(path: Path, name: str) -> list:
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise DataError(f"dataset {name!r}: {path} is empty")
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"dataset {name!r}: {path} is not valid JSON (line {err.lineno}, "
                            f"column {err.colno}: {err.msg})") from None
        return rows
    return _read_jsonl(path, name)  # a .json file of JSON lines, as the datasets library also accepts


def _read_jsonl(path: Path, name: str) -> list:
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(f"dataset {name!r}: {path} line {lineno} is not valid JSON ({err.msg})") from None
    return rows


def _read_csv(path: Path, name: str) -> list:

    return pyarrow.csv.read_csv(path).to_pylist()


def _read_parquet(path: Path, name: str) -> list:

    return pyarrow.parquet.read_table(path).to_pylist()


def _read_arrow(path: Path, name: str) -> list:

    with pyarrow.memory_map(str(path)) as source:
        try:
            return pyarrow.ipc.open_stream(source).read_all().to_pylist()  # what `datasets` saves
        except pyarrow.ArrowInvalid:
            source.seek(0)
            return pyarrow.ipc.open_file(source).read_all().to_pylist()


def _read_text(path: Path, name: str) -> list:
    return [{"text": line} for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


READERS = {".json": _read_json, ".jsonl": _read_jsonl, ".csv": _read_csv, ".parquet": _read_parquet,
           ".arrow": _read_arrow, ".txt": _read_text}
