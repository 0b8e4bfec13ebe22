"""The dataset registry: LLaMA-Factory's `dataset_info.json`, read unchanged, and the raw rows it points to."""

import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path

from rayft.data.errors import DataError

DEFAULT_COLUMNS = {
    "alpaca": {"prompt": "instruction", "query": "input", "response": "output", "system": "system",
               "history": "history"},
    "sharegpt": {"messages": "conversations", "system": None, "tools": None},
}
DEFAULT_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}
READABLE_SUFFIXES = (".json", ".jsonl")


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
        raise DataError(f"dataset_dir: no dataset_info.json in {dataset_dir}; point dataset_dir at the folder holding it")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None


def dataset_attrs(names: str, dataset_dir: str | Path) -> list[DatasetAttr]:
    """Looks up a comma list of dataset names; unknown names are reported with the nearest known one."""
    info = load_dataset_info(dataset_dir)
    attrs, problems = [], []
    for name in (n.strip() for n in names.split(",") if n.strip()):
        if name not in info:
            close = difflib.get_close_matches(name, list(info), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f" (known: {', '.join(sorted(info))})"
            problems.append(f"dataset {name!r} is not in {dataset_dir}/dataset_info.json{hint}")
            continue
        entry = dict(info[name])
        known = {f for f in DatasetAttr.__dataclass_fields__ if f != "name"}
        unknown = set(entry) - known - {"ms_hub_url", "om_hub_url", "script_url", "folder", "load_from"}
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
    if attr.file_name is None:
        return [f"{where}: only local files (file_name) are read so far; hub datasets are part of the data engine issue"]
    if attr.formatting not in DEFAULT_COLUMNS:
        return [f"{where}: unknown formatting {attr.formatting!r}; use alpaca or sharegpt"]
    if attr.ranking or "kto_tag" in attr.columns:
        return [f"{where}: formatting {attr.formatting!r}{' with ranking' if attr.ranking else ''} is not built yet "
                "(only supervised alpaca and sharegpt data); it is part of the data engine issue"]
    if any(k in entry for k in ("subset", "num_samples", "ms_hub_url", "om_hub_url", "script_url", "folder")):
        return [f"{where}: subset/num_samples/hub URLs are not built yet; they are part of the data engine issue"]
    return []


def read_rows(attr: DatasetAttr, dataset_dir: str | Path) -> list[dict]:
    """Reads every raw row of a local .json (array) or .jsonl file; malformed JSON names the line."""
    path = Path(dataset_dir) / attr.file_name
    if not path.is_file():
        raise DataError(f"dataset {attr.name!r}: file {path} does not exist")
    if path.suffix not in READABLE_SUFFIXES:
        raise DataError(f"dataset {attr.name!r}: {path.suffix} files are not read yet (only {READABLE_SUFFIXES})")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise DataError(f"dataset {attr.name!r}: {path} is empty")
    if path.suffix == ".jsonl":
        rows = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise DataError(f"dataset {attr.name!r}: {path} line {lineno} is not valid JSON ({err.msg})") from None
    else:
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"dataset {attr.name!r}: {path} is not valid JSON (line {err.lineno}, "
                            f"column {err.colno}: {err.msg})") from None
        if not isinstance(rows, list):
            raise DataError(f"dataset {attr.name!r}: {path} must hold a JSON array of rows")
    return rows
