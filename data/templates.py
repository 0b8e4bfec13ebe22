"""Chat templates: LLaMA-Factory 0.9.5's registry, read from `template_specs.json`, encoded as it encodes them.

A template is a set of slot lists (strings with `{{content}}`, named tokens, the tokenizer's bos/eos) per role.
Each message becomes its own token ids, slot by slot, so the same examples become the same tokens as in
LLaMA-Factory. `tools/lf_snapshot.py` regenerates the spec file from an installed LLaMA-Factory.
With `template` unset, the tokenizer's own Jinja chat template is used (`JinjaTemplate`).
"""

import dataclasses
import difflib
import json
import re
import weakref
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from rayft.data.errors import DataError
from rayft.data.tokenizer import encode_text
from rayft.data.tools import TOOL_FORMATS, describe_tools, parse_calls, write_calls

SPEC_FILE = Path(__file__).with_name("template_specs.json")
# LLaMA-Factory's multimodal plugins whose encoding rayft builds (data/media.py)
BUILT_PLUGINS = ("qwen2_vl", "qwen3_vl", "llava", "llava_next", "gemma3", "mllama")


@dataclass(frozen=True)
class Template:
    """One registered template. `kind` is plain, llama2 (the system prompt goes inside the first user turn),
    reasoning (responses carry a thought, empty when the data has none) or reasoning_close_only (an empty
    thought is only the closing tag)."""

    name: str
    kind: str
    prefix: tuple
    system: tuple
    user: tuple
    assistant: tuple
    observation: tuple
    function: tuple
    function_tools: str
    tools: str
    default_system: str
    stop_words: tuple
    thought_words: tuple
    tool_call_words: tuple
    efficient_eos: bool
    replace_eos: bool
    enable_thinking: bool | None
    multimodal: bool
    mm_plugin: tuple = ()  # LLaMA-Factory's multimodal plugin: (name, value) pairs of its name and tokens
    preserve_thinking: bool = False

    @property
    def media_tokens(self) -> dict:
        """The multimodal plugin's name (`plugin`) and the tokens it writes (image_token, vision_bos_token, ...)."""
        return dict(self.mm_plugin)

    @property
    def reasoning(self) -> bool:
        return self.kind.startswith("reasoning")

    @property
    def writes_tools(self) -> bool:
        """Whether its tool definitions and tool calls are in a tool format rayft builds."""
        return self.tools in TOOL_FORMATS and self.function_tools in TOOL_FORMATS

    # -- tokens -------------------------------------------------------------------------------------------
    def eos_id(self, tokenizer) -> int:
        """The end-of-sequence id this template trains: its first stop word where it replaces the EOS token."""
        return _token_id(tokenizer, self.stop_words[0]) if self.replace_eos else tokenizer.eos_token_id

    def stop_ids(self, tokenizer) -> list[int]:
        """Ids that end a generated reply: the EOS token and every stop word."""
        ids = {tokenizer.eos_token_id, self.eos_id(tokenizer), *(_token_id(tokenizer, w) for w in self.stop_words)}
        return sorted(i for i in ids if i is not None)

    def check_tokenizer(self, tokenizer) -> None:
        """Refuses a tokenizer that lacks a token this template writes as one token (its stop words and named
        tokens), which LLaMA-Factory would add to the vocabulary and so need `resize_vocab`."""
        named = [s["token"] for slots in (self.prefix, self.system, self.user, self.assistant, self.observation,
                                          self.function) for s in slots if isinstance(s, dict) and "token" in s]
        missing = [t for t in dict.fromkeys([*self.stop_words, *named]) if _token_id(tokenizer, t) is None]
        if missing:
            raise DataError(f"template: {self.name!r} writes {missing} as single tokens, which the tokenizer does not "
                            "have; use the template of the model's family")
        if self.eos_id(tokenizer) is None:
            raise DataError(f"template: {self.name!r} needs an EOS token, which the tokenizer lacks; set one in "
                            "its tokenizer_config.json")

    def thought_ids(self, tokenizer) -> list[int]:
        return encode_text(tokenizer, self.empty_thought())

    def empty_thought(self) -> str:
        open_tag, close_tag = self.thought_words
        return close_tag if self.kind == "reasoning_close_only" else open_tag + close_tag

    # -- encoding -----------------------------------------------------------------------------------------
    def encode_messages(self, tokenizer, messages: list[dict], system: str | None, tools: str | None
                        ) -> list[list[int]]:
        """Token ids of each message; the first also carries the prefix and the system prompt (with tools)."""
        system = system or self.default_system
        tool_text = describe_tools(self.tools, tools) if tools else ""
        encoded = []
        for index, message in enumerate(messages):
            slots, system_text, head = [], "", []
            if index == 0:
                opening = list(self.prefix)
                if system or tools:
                    if self.kind == "llama2":
                        system_text = _fill(self.system, system + tool_text)[0]
                    else:
                        opening += _fill(self.system, system + tool_text)
                head = self._opening_ids(tokenizer, opening)
            role, content = message["role"], message["content"]
            if role == "user":
                slots += _fill(self.user, system_text + content)
            elif role == "assistant":
                slots += _fill(self.assistant, content)
            elif role == "observation":
                slots += _fill(self.observation, content)
            elif role == "function":
                slots += _fill(self.function, self._calls_text(content))
            else:
                raise DataError(f"a message has role {role!r}; roles are user, assistant, observation, function")
            encoded.append(head + self._ids(tokenizer, slots))
        return encoded

    def _opening_ids(self, tokenizer, slots: list) -> list[int]:
        """`_ids` of a conversation's prefix and system prompt, remembered per tokenizer: most datasets give every
        row the same system prompt (or the template's default), and encoding it is a good part of a short row."""
        key = json.dumps(slots)
        known = _OPENINGS.setdefault(tokenizer, {})
        if key not in known:
            if len(known) >= 256:
                known.clear()
            known[key] = self._ids(tokenizer, slots)
        return list(known[key])

    def encode_turns(self, tokenizer, example: dict, discard_history_thoughts: bool = False
                     ) -> list[tuple[list[int], list[int]]]:
        """(prompt ids, response ids) of every turn of `example` ({system, messages, tools})."""
        messages = [dict(m) for m in example["messages"]]
        self._check_roles(messages, example.get("tools"))
        if self.reasoning and self.enable_thinking is False:
            for m in messages[1::2]:
                m["content"] = self._without_thought(m["content"])
        if self.reasoning and discard_history_thoughts:
            for m in messages[1:-2:2]:
                m["content"] = self._without_thought(m["content"])
        encoded = self.encode_messages(tokenizer, messages, example.get("system"), example.get("tools"))
        if self.reasoning:
            turns = [len(messages) - 2] if discard_history_thoughts else range(0, len(messages), 2)
            for i in turns:
                if not self._has_thought(messages[i + 1]["content"]):
                    if self.enable_thinking:  # an empty thought the model learns to write
                        encoded[i + 1] = self.thought_ids(tokenizer) + encoded[i + 1]
                    else:  # an empty thought given in the prompt
                        encoded[i] = encoded[i] + self.thought_ids(tokenizer)
        return list(zip(encoded[0::2], encoded[1::2]))

    def encode_oneturn(self, tokenizer, example: dict) -> tuple[list[int], list[int]]:
        """Every message before the last as one prompt, and the last (the response) on its own."""
        messages = [dict(m) for m in example["messages"]]
        self._check_roles(messages, example.get("tools"))
        if self.reasoning:
            if not self.preserve_thinking:
                for m in messages[1:-2:2]:
                    m["content"] = self._without_thought(m["content"])
            if self.enable_thinking is False:
                messages[-1]["content"] = self._without_thought(messages[-1]["content"])
        encoded = self.encode_messages(tokenizer, messages, example.get("system"), example.get("tools"))
        prompt, response = [t for ids in encoded[:-1] for t in ids], encoded[-1]
        if self.reasoning and not self._has_thought(messages[-1]["content"]):
            if self.enable_thinking:
                response = self.thought_ids(tokenizer) + response
            else:
                prompt = prompt + self.thought_ids(tokenizer)
        return prompt, response

    # -- helpers ------------------------------------------------------------------------------------------
    def _ids(self, tokenizer, slots: list) -> list[int]:
        ids = []
        for slot in slots:
            if isinstance(slot, str):
                ids += encode_text(tokenizer, slot) if slot else []
            elif "token" in slot:
                ids.append(_token_id(tokenizer, slot["token"]))
            elif slot["special"] == "bos_token":
                ids += [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
            elif slot["special"] == "eos_token":
                ids.append(self.eos_id(tokenizer))
            # any other name writes nothing, as in LLaMA-Factory (phi_small declares an <|endoftext|> prefix so)
        return ids

    def _calls_text(self, content: str) -> str:
        """A function turn's text: its calls in the template's tool format, after any thought or free text."""
        open_call, close_call = map(re.escape, self.tool_call_words)
        wrapped = re.search(f"{open_call}(.*?){close_call}", content, re.DOTALL)
        if wrapped:
            return content.replace(wrapped.group(0), "") + write_calls(self.function_tools, parse_calls(wrapped[1]))
        open_tag, close_tag = map(re.escape, self.thought_words)
        thought = re.search(f"{open_tag}(.*?){close_tag}", content, re.DOTALL)
        if thought:
            calls = write_calls(self.function_tools, parse_calls(content.replace(thought.group(0), "")))
            return thought.group(0) + calls
        return write_calls(self.function_tools, parse_calls(content))

    def _has_thought(self, content: str) -> bool:
        return self.thought_words[0].strip() in content or self.thought_words[1].strip() in content

    def _without_thought(self, content: str) -> str:
        open_tag, close_tag = map(re.escape, self.thought_words)
        return re.sub(f"{open_tag}(.*?){close_tag}", "", content, flags=re.DOTALL).lstrip("\n")

    def _check_roles(self, messages: list[dict], tools: str | None) -> None:
        uses_tools = tools or any(m["role"] in ("function", "observation") for m in messages)
        if uses_tools and not self.writes_tools:
            raise DataError(tool_refusal(self.name))


_OPENINGS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # tokenizer -> opening slots -> ids


def _fill(slots: tuple, content: str) -> list:
    return [s.replace("{{content}}", content, 1) if isinstance(s, str) else s for s in slots]


def _token_id(tokenizer, token: str) -> int | None:
    """The id of `token` when the vocabulary has it as one token, else None."""
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or (token_id == tokenizer.unk_token_id and token != tokenizer.unk_token):
        return None
    return token_id


@dataclass(frozen=True)
class JinjaTemplate:
    """The tokenizer's own chat template: turns are found by rendering growing prefixes of the chat."""

    name: str = "tokenizer"
    efficient_eos: bool = False
    reasoning: bool = False

    def eos_id(self, tokenizer) -> int:
        return tokenizer.eos_token_id

    def stop_ids(self, tokenizer) -> list[int]:
        return [tokenizer.eos_token_id]

    def check_tokenizer(self, tokenizer) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("template: unset, but the tokenizer has no chat_template; set template (e.g. chatml)")

    def encode_turns(self, tokenizer, example: dict, discard_history_thoughts: bool = False
                     ) -> list[tuple[list[int], list[int]]]:
        self.check_tokenizer(tokenizer)
        chat = ([{"role": "system", "content": example["system"]}] if example.get("system") else [])
        pairs, done = [], ""
        messages = example["messages"]
        if example.get("tools") or {m["role"] for m in messages} - {"user", "assistant"}:
            raise DataError("tool definitions and tool-call turns need a registered template with tool formatting "
                            f"({', '.join(tool_templates()[:6])}, ...), not the tokenizer's own")
        for user, assistant in zip(messages[0::2], messages[1::2]):
            chat = chat + [user]
            with_header = _render(tokenizer, chat, add_generation_prompt=True)
            chat = chat + [assistant]
            full = _render(tokenizer, chat, add_generation_prompt=False)
            if not (with_header.startswith(done) and full.startswith(with_header)):
                raise DataError("the tokenizer's chat template does not render turns as prefixes of each other; "
                                "set template to a registered one instead")
            prompt, response = with_header[len(done):], full[len(with_header):]
            pairs.append((_plain_ids(tokenizer, prompt), _plain_ids(tokenizer, response)))
            done = full
        return pairs

    def encode_oneturn(self, tokenizer, example: dict) -> tuple[list[int], list[int]]:
        pairs = self.encode_turns(tokenizer, example)
        return [t for source, target in pairs[:-1] for t in source + target] + pairs[-1][0], pairs[-1][1]


@cache
def _specs() -> dict:
    return json.loads(SPEC_FILE.read_text())["templates"]


@cache
def _registered(name: str) -> Template:
    spec = _specs()[name]
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()}
    fields["mm_plugin"] = tuple(sorted((spec["mm_plugin"] or {}).items()))
    return Template(name=name, **fields)


def template_names(multimodal: bool = False) -> list[str]:
    """Registered template names: text templates, or the multimodal ones."""
    return sorted(n for n, s in _specs().items() if s["multimodal"] == multimodal)


def get_template(name: str | None, enable_thinking: bool | None = True, default_system: str | None = None,
                 tool_format: str | None = None, preserve_thinking: bool = False):
    """Template `name` with the recipe's options, or the tokenizer's own Jinja template when `name` is None."""
    if name is None:
        return JinjaTemplate()
    problem = template_problem(name, tool_format)
    if problem:
        raise DataError(f"template: {problem}")
    template = _registered(name)
    changes = {}
    if template.reasoning:
        changes.update(enable_thinking=enable_thinking, preserve_thinking=preserve_thinking)
    if default_system is not None:
        changes["default_system"] = default_system
    if tool_format is not None:
        eos = () if template.efficient_eos else ({"special": "eos_token"},)
        changes.update(function=("{{content}}", *eos), function_tools=tool_format, tools=tool_format)
    return dataclasses.replace(template, **changes) if changes else template


def template_problem(name: str | None, tool_format: str | None = None) -> str | None:
    """Why `name` (and `tool_format`) cannot be used, or None."""
    if tool_format is not None and tool_format not in TOOL_FORMATS:
        return f"tool format {tool_format!r} is not built; built tool formats: {', '.join(TOOL_FORMATS)}"
    if name is None:
        return None
    if name not in _specs():
        close = difflib.get_close_matches(name, template_names(), n=3, cutoff=0.6)
        hint = f" (similar: {', '.join(close)})" if close else ""
        return (f"{name!r} is not a LLaMA-Factory 0.9.5 template{hint}; `rayft keys template` lists them, or "
                "leave it unset to use the tokenizer's own chat template")
    plugin = (_specs()[name]["mm_plugin"] or {}).get("plugin")
    if plugin is not None and plugin not in BUILT_PLUGINS:
        built = ", ".join(n for n in template_names(multimodal=True) if plugin_of(n) in BUILT_PLUGINS)
        return (f"{name!r} encodes media with LLaMA-Factory's {plugin!r} plugin, which rayft has not built yet; the "
                f"built multimodal templates are {built}")
    return None


def plugin_of(name: str | None) -> str | None:
    """The multimodal plugin of template `name` (None for a text template or the tokenizer's own)."""
    if not name or name not in _specs():
        return None
    return (_specs()[name]["mm_plugin"] or {}).get("plugin")


def supports_tools(name: str | None, tool_format: str | None = None) -> bool:
    """Whether template `name` (with `tool_format` instead of its own) writes tools in a built tool format."""
    if not name or name not in _specs():
        return False
    return tool_format in TOOL_FORMATS if tool_format is not None else _registered(name).writes_tools


def tool_templates() -> list[str]:
    return [n for n in template_names() if supports_tools(n)]


def tool_refusal(name: str | None) -> str:
    if name is None:
        return "tool-call data needs a registered template (template: qwen, ...), not the tokenizer's own"
    spec = _specs()[name]
    return (f"template {name!r} writes tools in the {spec['tools']!r} format, which is not built (built: "
            f"{', '.join(TOOL_FORMATS)}); set tool_format to one of those or use another template")


def _render(tokenizer, chat: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=add_generation_prompt)


def _plain_ids(tokenizer, text: str) -> list[int]:
    return encode_text(tokenizer, text)
