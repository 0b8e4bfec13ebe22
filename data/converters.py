"""Converters from a dataset's raw rows to rayft's one internal form: a system prompt and alternating turns.

An example is `{"system": str, "messages": [{"role": "user"|"assistant", "content": str}, ...]}`.
"""

from rayft.data.errors import DataError
from rayft.data.registry import DatasetAttr


class RowError(ValueError):
    """What is wrong with one raw row."""


def alpaca(row: dict, attr: DatasetAttr) -> dict:
    """instruction (+ input) is the prompt, output the response; history adds earlier turns."""
    if not isinstance(row, dict):
        raise RowError(f"a row must be a JSON object, got {type(row).__name__}")
    prompt_col, query_col, response_col = attr.column("prompt"), attr.column("query"), attr.column("response")
    if prompt_col not in row:
        raise RowError(f"missing column {prompt_col!r}")
    if response_col not in row:
        raise RowError(f"missing column {response_col!r}")
    prompt, query, response = row[prompt_col], row.get(query_col) or "", row[response_col]
    for name, value in ((prompt_col, prompt), (query_col, query), (response_col, response)):
        if not isinstance(value, str):
            raise RowError(f"column {name!r} must be a string, got {type(value).__name__}")
    if not response.strip():
        raise RowError(f"empty response in column {response_col!r}")
    messages = []
    for turn in row.get(attr.column("history")) or []:
        if not (isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise RowError("history must be a list of [prompt, response] string pairs")
        messages += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
    content = "\n".join(part for part in (prompt, query) if part)
    if not content.strip():
        raise RowError(f"empty prompt in columns {prompt_col!r}/{query_col!r}")
    messages += [{"role": "user", "content": content}, {"role": "assistant", "content": response}]
    system = row.get(attr.column("system")) or ""
    if not isinstance(system, str):
        raise RowError(f"column {attr.column('system')!r} must be a string")
    return {"system": system, "messages": messages}


CONVERTERS = {"alpaca": alpaca}


def convert_rows(rows: list, attr: DatasetAttr, log=print) -> list[dict]:
    """Converts every row; bad rows are skipped and counted, and a dataset of only bad rows is an error."""
    converter = CONVERTERS[attr.formatting]
    examples, bad = [], []
    for index, row in enumerate(rows):
        try:
            examples.append(converter(row, attr))
        except RowError as err:
            bad.append((index, str(err)))
    if bad:
        shown = "; ".join(f"row {i}: {why}" for i, why in bad[:5])
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        if not examples:
            raise DataError(f"dataset {attr.name!r}: every one of its {len(rows)} rows is malformed: {shown}{more}")
        log(f"[rayft] dataset {attr.name!r}: skipped {len(bad)} of {len(rows)} malformed rows: {shown}{more}")
    return examples
