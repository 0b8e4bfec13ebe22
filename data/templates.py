"""Chat templates: a small closed registry, plus the tokenizer's own Jinja template when `template` is unset.

Both turn an example into (prompt_ids, response_ids) pairs, one per assistant turn, for label masking.
"""

import json
from dataclasses import dataclass

from rayft.data.errors import DataError


@dataclass(frozen=True)
class ToolFormat:
    """How a template family writes tool definitions, tool calls and tool results (Qwen's XML-tag style)."""

    tools_prompt: str  # appended to the system prompt; `{tools}` is one JSON tool definition per line
    call: str  # a function turn; `{name}` and `{arguments}` (JSON) are replaced
    result: str  # an observation turn, ending with the assistant's header like `user`

    def describe(self, tools: str) -> str:
        try:
            parsed = json.loads(tools)
        except json.JSONDecodeError as err:
            raise DataError(f"tools: not valid JSON ({err.msg})") from None
        parsed = parsed if isinstance(parsed, list) else [parsed]
        wrapped = [t if t.get("type") == "function" else {"type": "function", "function": t} for t in parsed]
        return self.tools_prompt.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in wrapped))

    def format_call(self, content: str) -> str:
        try:
            call = json.loads(content)
            name, arguments = call["name"], call.get("arguments", {})
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataError(f"a function_call turn must be JSON with name and arguments, got "
                            f"{content[:80]!r}") from None
        if isinstance(arguments, str):  # some datasets store the arguments JSON-encoded once more
            arguments = json.loads(arguments)
        return self.call.format(name=name, arguments=json.dumps(arguments, ensure_ascii=False))


@dataclass(frozen=True)
class Template:
    """A chat format written as string pieces; `{content}` is replaced by the message text.

    Families without a system role (`system=None`) merge the system prompt into the first user message
    with `system_in_user`. `prefix` opens the conversation (a BOS token); `suffix` closes a finished one.
    """

    name: str
    user: str  # ends with the assistant's header, so that the header is part of the prompt
    assistant: str  # the response and its end-of-turn marker, which the model must learn to emit
    system: str | None = None
    system_in_user: str = "{system}\n\n{content}"
    default_system: str = ""
    prefix: str = ""
    suffix: str = ""
    tools: ToolFormat | None = None

    def encode_turns(self, tokenizer, example: dict) -> list[tuple[list[int], list[int]]]:
        system = example.get("system") or self.default_system
        messages = example["messages"]
        if self.tools is None:
            _check_roles(messages, self.name)
        elif example.get("tools"):
            system = (system or self.default_system) + self.tools.describe(example["tools"])
        pairs, opening = [], self.prefix
        if system and self.system is not None:
            opening += self.system.format(content=system)
        for index, (user, assistant) in enumerate(zip(messages[0::2], messages[1::2])):
            content = user["content"]
            if index == 0 and system and self.system is None:
                content = self.system_in_user.format(system=system, content=content)
            ask = self.tools.result if user["role"] == "observation" else self.user
            prompt = (opening if index == 0 else "") + ask.format(content=content)
            if assistant["role"] == "function":
                response = self.assistant.format(content=self.tools.format_call(assistant["content"]))
            else:
                response = self.assistant.format(content=assistant["content"])
            if index == len(messages) // 2 - 1:
                response += self.suffix
            pairs.append((_ids(tokenizer, prompt), _ids(tokenizer, response)))
        return pairs


@dataclass(frozen=True)
class JinjaTemplate:
    """The tokenizer's own chat template: turns are found by rendering growing prefixes of the chat."""

    name: str = "tokenizer"

    def encode_turns(self, tokenizer, example: dict) -> list[tuple[list[int], list[int]]]:
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("template: unset, but the tokenizer has no chat_template; set template (e.g. chatml)")
        chat = ([{"role": "system", "content": example["system"]}] if example.get("system") else [])
        pairs, done = [], ""
        messages = example["messages"]
        _check_roles(messages, "the tokenizer's own")
        if example.get("tools"):
            raise DataError("tool definitions with the tokenizer's own template are not built; set template: qwen")
        for user, assistant in zip(messages[0::2], messages[1::2]):
            chat = chat + [user]
            with_header = _render(tokenizer, chat, add_generation_prompt=True)
            chat = chat + [assistant]
            full = _render(tokenizer, chat, add_generation_prompt=False)
            if not (with_header.startswith(done) and full.startswith(with_header)):
                raise DataError("the tokenizer's chat template does not render turns as prefixes of each other; "
                                "set template to a registered one instead")
            pairs.append((_ids(tokenizer, with_header[len(done):]), _ids(tokenizer, full[len(with_header):])))
            done = full
        return pairs


_CHATML_SYSTEM = "<|im_start|>system\n{content}<|im_end|>\n"
_CHATML_USER = "<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"
_CHATML_ASSISTANT = "{content}<|im_end|>\n"
_QWEN_TOOLS = ToolFormat(
    tools_prompt="\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}}\n</tool_call>",
    call='<tool_call>\n{{"name": "{name}", "arguments": {arguments}}}\n</tool_call>',
    result="<|im_start|>user\n<tool_response>\n{content}\n</tool_response><|im_end|>\n<|im_start|>assistant\n",
)

TEMPLATES = {
    "default": Template(name="default", system="System: {content}\n", user="Human: {content}\nAssistant:",
                        assistant=" {content}\n"),
    "alpaca": Template(
        name="alpaca",
        system="{content}\n\n",
        user="### Instruction:\n{content}\n\n### Response:\n",
        assistant="{content}\n\n",
        default_system="Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.",
    ),
    "chatml": Template(name="chatml", system=_CHATML_SYSTEM, user=_CHATML_USER, assistant=_CHATML_ASSISTANT),
    "qwen": Template(name="qwen", system=_CHATML_SYSTEM, user=_CHATML_USER, assistant=_CHATML_ASSISTANT,
                     default_system="You are a helpful assistant.", tools=_QWEN_TOOLS),
    "llama3": Template(
        name="llama3",
        prefix="<|begin_of_text|>",
        system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
        user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        assistant="{content}<|eot_id|>",
    ),
    "mistral": Template(name="mistral", prefix="<s>", user=" [INST] {content} [/INST]", assistant=" {content}</s>"),
    "gemma": Template(
        name="gemma",
        prefix="<bos>",
        user="<start_of_turn>user\n{content}<end_of_turn>\n<start_of_turn>model\n",
        assistant="{content}<end_of_turn>\n",
    ),
    "phi": Template(
        name="phi",
        system="<|system|>\n{content}<|end|>\n",
        user="<|user|>\n{content}<|end|>\n<|assistant|>\n",
        assistant="{content}<|end|>\n",
        suffix="<|endoftext|>",
    ),
}


def get_template(name: str | None):
    """The registered template `name`, or the tokenizer's own Jinja template when `name` is None."""
    if name is None:
        return JinjaTemplate()
    if name not in TEMPLATES:
        raise DataError(f"template: {name!r} is not registered (known: {', '.join(sorted(TEMPLATES))}); "
                        "or leave it unset to use the tokenizer's own chat template")
    return TEMPLATES[name]


def supports_tools(name: str | None) -> bool:
    """Whether template `name` can format tool definitions, calls and results."""
    return name in TEMPLATES and TEMPLATES[name].tools is not None


def _check_roles(messages: list[dict], name: str) -> None:
    roles = {m["role"] for m in messages}
    if roles - {"user", "assistant"}:
        raise DataError(f"tool-call turns ({sorted(roles - {'user', 'assistant'})}) need a template with tool "
                        f"formatting ({', '.join(n for n in TEMPLATES if supports_tools(n))}), not {name}")


def _render(tokenizer, chat: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=add_generation_prompt)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)
