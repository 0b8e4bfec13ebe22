"""The dataset registry: LLaMA-Factory's `dataset_info.json`, read unchanged (from a folder or a URI)."""

import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path

from rayft.data.errors import DataError
from rayft.data.files import read_text
from rayft.recipe.values import comma_list

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

    def mapped_columns(self) -> set[str]:
        """Every column of a row that the converter reads (the rest are the row's other columns)."""
        roles = set(DEFAULT_COLUMNS[self.formatting]) | set(self.columns)
        return {column for column in (self.column(role) for role in roles) if column}

    def tag(self, name: str) -> str:
        """A sharegpt tag (role_tag, content_tag, user_tag, ...), LLaMA-Factory's default unless overridden."""
        return self.tags.get(name, DEFAULT_TAGS[name])


def load_dataset_info(dataset_dir: str | Path) -> dict:
    location = f"{str(dataset_dir).rstrip('/')}/dataset_info.json"
    text = read_text(location)
    if text is None:
        raise DataError(f"dataset_dir: no dataset_info.json in {dataset_dir}; point dataset_dir at the folder holding "
                        "it")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{location} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None


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
