"""Converters from a dataset's raw rows to rayft's one internal form: a system prompt and alternating turns.

An example is `{"system": str, "messages": [{"role": ..., "content": str}, ...]}`; roles alternate
(user or observation, then assistant or function) and `tools` holds tool definitions when a row has them.
Preference rows (`ranking`) end on a prompt and add `chosen` and `rejected` responses; KTO rows add a
boolean `kto_tag`; pre-training rows are `{"text": str}`.
"""

import json

from rayft.data.registry import DatasetAttr


class RowError(ValueError):
    """What is wrong with one raw row."""


def alpaca(row: dict, attr: DatasetAttr) -> dict:
    """instruction (+ input) is the prompt, output the response; history adds earlier turns."""
    _require_object(row)
    prompt_col, query_col = attr.column("prompt"), attr.column("query")
    if prompt_col not in row:
        raise RowError(f"missing column {prompt_col!r}")
    prompt, query = _string(row, prompt_col, empty_ok=True), _string(row, query_col, empty_ok=True, missing_ok=True)
    messages = []
    for turn in row.get(attr.column("history")) or []:
        if not (isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise RowError("history must be a list of [prompt, response] string pairs")
        messages += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
    content = "\n".join(part for part in (prompt, query) if part)
    if not content.strip():
        raise RowError(f"empty prompt in columns {prompt_col!r}/{query_col!r}")
    messages.append({"role": "user", "content": content})
    system = _string(row, attr.column("system"), empty_ok=True, missing_ok=True)
    if attr.ranking:
        return {"system": system, "messages": messages, "chosen": _string(row, attr.column("chosen")),
                "rejected": _string(row, attr.column("rejected"))}
    messages.append({"role": "assistant", "content": _string(row, attr.column("response"))})
    return _with_kto_tag({"system": system, "messages": messages}, row, attr)


def sharegpt(row: dict, attr: DatasetAttr) -> dict:
    """A list of role-tagged messages: user/observation turns alternate with assistant/function turns."""
    _require_object(row)
    column = attr.column("messages")
    if column not in row:
        raise RowError(f"missing column {column!r}")
    turns = row[column]
    if not isinstance(turns, list) or not turns:
        raise RowError(f"column {column!r} must be a non-empty list of messages")
    role_tag, content_tag = attr.tag("role_tag"), attr.tag("content_tag")
    asks = {attr.tag("user_tag"): "user", attr.tag("observation_tag"): "observation"}
    answers = {attr.tag("assistant_tag"): "assistant", attr.tag("function_tag"): "function"}
    system_column = attr.column("system")
    system = (row.get(system_column) or "") if system_column else ""
    if isinstance(turns[0], dict) and turns[0].get(role_tag) == attr.tag("system_tag"):
        system, turns = turns[0].get(content_tag, ""), turns[1:]
    if len(turns) % 2 != (1 if attr.ranking else 0):
        expected = "end on a prompt (the responses are in chosen/rejected)" if attr.ranking else \
            "come in prompt/response pairs"
        raise RowError(f"{len(turns)} messages after the system prompt; turns must {expected}")

    def message(turn, index, allowed):
        if not isinstance(turn, dict) or role_tag not in turn or content_tag not in turn:
            raise RowError(f"message {index} must be an object with {role_tag!r} and {content_tag!r}")
        if turn[role_tag] not in allowed:
            raise RowError(f"message {index} has role {turn[role_tag]!r}; expected one of {sorted(allowed)} "
                           "(prompts and responses must alternate)")
        if not isinstance(turn[content_tag], str) or not turn[content_tag].strip():
            raise RowError(f"message {index} is empty")
        return {"role": allowed[turn[role_tag]], "content": turn[content_tag]}

    messages = [message(turn, i, asks if i % 2 == 0 else answers) for i, turn in enumerate(turns)]
    example = {"system": system if isinstance(system, str) else "", "messages": messages}
    tools_column = attr.column("tools")
    tools = row.get(tools_column) if tools_column else None
    if tools:
        example["tools"] = tools if isinstance(tools, str) else json.dumps(tools, ensure_ascii=False)
    if attr.ranking:
        for key in ("chosen", "rejected"):
            name = attr.column(key)
            if name not in row:
                raise RowError(f"missing column {name!r}")
            example[key] = message(row[name], key, answers)["content"]
        return example
    return _with_kto_tag(example, row, attr)


def text(row: dict, attr: DatasetAttr) -> dict:
    """Pre-training text: the dataset's prompt column (`columns: {prompt: text}` in dataset_info.json)."""
    _require_object(row)
    column = attr.column("prompt") if attr.formatting == "alpaca" else None
    if column is None:
        raise RowError("pre-training reads alpaca-formatted rows; set columns: {prompt: <text column>}")
    if column not in row:
        raise RowError(f"missing column {column!r}")
    if not isinstance(row[column], str) or not row[column].strip():
        raise RowError(f"column {column!r} must be non-empty text")
    return {"text": row[column]}


CONVERTERS = {"alpaca": alpaca, "sharegpt": sharegpt}


def _require_object(row) -> None:
    if not isinstance(row, dict):
        raise RowError(f"a row must be a JSON object, got {type(row).__name__}")


def _string(row: dict, column: str | None, empty_ok: bool = False, missing_ok: bool = False) -> str:
    if column is None or column not in row or row[column] is None:
        if missing_ok:
            return ""
        raise RowError(f"missing column {column!r}")
    value = row[column]
    if not isinstance(value, str):
        raise RowError(f"column {column!r} must be a string, got {type(value).__name__}")
    if not empty_ok and not value.strip():
        raise RowError(f"empty response in column {column!r}")
    return value


def _with_kto_tag(example: dict, row: dict, attr: DatasetAttr) -> dict:
    column = attr.columns.get("kto_tag")
    if column is None:
        return example
    if not isinstance(row.get(column), bool):
        raise RowError(f"column {column!r} must be true or false (the KTO desirability tag)")
    example["kto_tag"] = row[column]
    return example
