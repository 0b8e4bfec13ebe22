"""Tool formats: how a template family writes tool definitions into the system prompt and tool calls into replies.

The five formats here are the ones LLaMA-Factory 0.9.5's text templates use most (default, qwen, glm4, llama3,
mistral); their wording is reproduced so that tool datasets become the same tokens. Other formats are refused
by name (`TOOL_FORMATS` lists what is built).
"""

import json
import re
from datetime import datetime

from rayft.data.errors import DataError

_DEFAULT_PROMPT = (
    "You have access to the following tools:\n{tool_text}Use the following format if using a tool:\n```\n"
    "Action: tool name (one of [{tool_names}])\nAction Input: the input to the tool, in a JSON format representing "
    'the kwargs (e.g. ```{{"input": "hello world", "num_beams": 5}}```)\n```\n'
)
_QWEN_PROMPT = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with "
    "function signatures within <tools></tools> XML tags:\n<tools>{tool_text}\n</tools>\n\nFor each function "
    "call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n"
    '<tool_call>\n{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)
_GLM4_PROMPT = ("你是一个名为 ChatGLM 的人工智能助手。你是基于智谱 AI 公司训练的语言模型 GLM-4 模型开发的，"
                "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具{tool_text}")
_LLAMA3_PROMPT = (
    "Cutting Knowledge Date: December 2023\nToday Date: {date}\n\nYou have access to the following functions. "
    "To call a function, please respond with JSON for a function call. Respond in the format "
    '{{"name": function name, "parameters": dictionary of argument name and its value}}. Do not use variables.'
    "\n\n{tool_text}"
)


def _unwrap(tool: dict) -> dict:
    return tool.get("function", "") if tool.get("type") == "function" else tool


def _wrap(tool: dict) -> dict:
    return tool if tool.get("type") == "function" else {"type": "function", "function": tool}


def _default_tools(tools: list[dict]) -> str:
    text, names = "", []
    for tool in map(_unwrap, tools):
        params = tool["parameters"]
        lines = ""
        for name, param in params["properties"].items():
            required = ", required" if name in params.get("required", []) else ""
            enum = f", should be one of [{', '.join(param['enum'])}]" if param.get("enum") else ""
            items = f", where each item should be {param['items'].get('type', '')}" if param.get("items") else ""
            lines += f"  - {name} ({param.get('type', '')}{required}): {param.get('description', '')}{enum}{items}\n"
        text += f"> Tool Name: {tool['name']}\nTool Description: {tool.get('description', '')}\nTool Args:\n{lines}\n"
        names.append(tool["name"])
    return _DEFAULT_PROMPT.format(tool_text=text, tool_names=", ".join(names))


def _qwen_tools(tools: list[dict]) -> str:
    return _QWEN_PROMPT.format(tool_text="".join("\n" + json.dumps(_wrap(t), ensure_ascii=False) for t in tools))


def _glm4_tools(tools: list[dict]) -> str:
    text = "".join(f"\n\n## {t['name']}\n\n{json.dumps(t, indent=4, ensure_ascii=False)}\n"
                   "在调用上述函数时，请使用 Json 格式表示调用的参数。" for t in map(_unwrap, tools))
    return _GLM4_PROMPT.format(tool_text=text)


def _llama3_tools(tools: list[dict]) -> str:
    text = "".join(json.dumps(_wrap(t), indent=4, ensure_ascii=False) + "\n\n" for t in tools)
    return _LLAMA3_PROMPT.format(date=datetime.now().strftime("%d %b %Y"), tool_text=text)


def _mistral_tools(tools: list[dict]) -> str:
    return "[AVAILABLE_TOOLS] " + json.dumps([_wrap(t) for t in tools], ensure_ascii=False) + "[/AVAILABLE_TOOLS]"


def _default_calls(calls: list[tuple[str, str]]) -> str:
    return "\n".join(f"Action: {name}\nAction Input: {arguments}" for name, arguments in calls)


def _qwen_calls(calls: list[tuple[str, str]]) -> str:
    return "\n".join("<tool_call>\n" + json.dumps({"name": n, "arguments": json.loads(a)}, ensure_ascii=False)
                     + "\n</tool_call>" for n, a in calls)


def _glm4_calls(calls: list[tuple[str, str]]) -> str:
    if len(calls) > 1:
        raise DataError("tool format glm4 writes one function call per turn; this turn has several")
    return f"{calls[0][0]}\n{calls[0][1]}"


def _llama3_calls(calls: list[tuple[str, str]]) -> str:
    objects = [{"name": n, "parameters": json.loads(a)} for n, a in calls]
    return json.dumps(objects[0] if len(objects) == 1 else objects, ensure_ascii=False)


def _mistral_calls(calls: list[tuple[str, str]]) -> str:
    return json.dumps([{"name": n, "arguments": json.loads(a)} for n, a in calls], ensure_ascii=False)


# name -> (describe the tools for the system prompt, write a reply's tool calls)
TOOL_FORMATS = {
    "default": (_default_tools, _default_calls),
    "qwen": (_qwen_tools, _qwen_calls),
    "glm4": (_glm4_tools, _glm4_calls),
    "llama3": (_llama3_tools, _llama3_calls),
    "mistral": (_mistral_tools, _mistral_calls),
}


def describe_tools(tool_format: str, tools: str) -> str:
    """The system-prompt text for the JSON list of tool definitions `tools` ("" for an empty list)."""
    try:
        parsed = json.loads(tools)
    except json.JSONDecodeError as err:
        raise DataError(f"tools: not valid JSON ({err.msg})") from None
    parsed = parsed if isinstance(parsed, list) else [parsed]
    return TOOL_FORMATS[tool_format][0](parsed) if parsed else ""


def parse_calls(content: str) -> list[tuple[str, str]]:
    """A function turn's JSON (one call or a list of parallel calls) as (name, JSON arguments) pairs."""
    try:
        calls = json.loads(content)
        calls = calls if isinstance(calls, list) else [calls]
        return [(c["name"], json.dumps(c["arguments"], ensure_ascii=False)) for c in calls]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise DataError(f"a function_call turn must be JSON with name and arguments, got {content[:80]!r}") from None


def write_calls(tool_format: str, calls: list[tuple[str, str]]) -> str:
    """The reply text of `calls` in `tool_format`."""
    return TOOL_FORMATS[tool_format][1](calls)


def _json_calls(text: str, arguments_key: str) -> list[tuple[str, str]] | None:
    """Calls written as one JSON object or a list of them, each with "name" and `arguments_key`."""
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError:
        return None
    parsed = parsed if isinstance(parsed, list) else [parsed]
    if not parsed or not all(isinstance(c, dict) and isinstance(c.get("name"), str)
                             and isinstance(c.get(arguments_key), dict) for c in parsed):
        return None
    return [(c["name"], json.dumps(c[arguments_key], ensure_ascii=False)) for c in parsed]


def _read_default(text: str) -> list[tuple[str, str]] | None:
    found = re.findall(r"Action:\s*([^\n]+?)\s*\nAction Input:\s*(.+?)(?=\s*\nAction:|\s*$)", text, re.DOTALL)
    calls = []
    for name, arguments in found:
        arguments = arguments.strip().strip("`").strip()
        try:
            calls.append((name.strip(), json.dumps(json.loads(arguments), ensure_ascii=False)))
        except json.JSONDecodeError:
            return None
    return calls or None


def _read_qwen(text: str) -> list[tuple[str, str]] | None:
    calls = []
    for body in re.findall(r"<tool_call>\s*(.+?)\s*</tool_call>", text, re.DOTALL):
        call = _json_calls(body, "arguments")
        if call is None:
            return None
        calls += call
    return calls or None


def _read_glm4(text: str) -> list[tuple[str, str]] | None:
    name, newline, arguments = text.strip().partition("\n")
    if not newline or not name.strip():
        return None
    try:
        parsed = json.loads(arguments)
    except json.JSONDecodeError:
        return None
    return [(name.strip(), json.dumps(parsed, ensure_ascii=False))] if isinstance(parsed, dict) else None


# name -> read the tool calls of a generated reply (None: the reply is plain text)
CALL_READERS = {
    "default": _read_default,
    "qwen": _read_qwen,
    "glm4": _read_glm4,
    "llama3": lambda text: _json_calls(text.strip(), "parameters"),
    "mistral": lambda text: _json_calls(text.strip().removeprefix("[TOOL_CALLS]").strip(), "arguments"),
}


def read_calls(tool_format: str, text: str) -> list[tuple[str, str]] | None:
    """The (name, JSON arguments) calls a generated reply makes in `tool_format`, as `write_calls` writes them;
    None when the reply is not a tool call."""
    return CALL_READERS[tool_format](text)
