"""Chat templates: a small closed registry, plus the tokenizer's own Jinja template when `template` is unset.

Both turn an example into (prompt_ids, response_ids) pairs, one per assistant turn, for label masking.
"""

from dataclasses import dataclass

from rayft.data.errors import DataError


@dataclass(frozen=True)
class Template:
    """A chat format written as string pieces; `{content}` is replaced by the message text."""

    name: str
    system: str
    user: str  # ends with the assistant's header, so that the header is part of the prompt
    assistant: str  # the response and its end-of-turn marker, which the model must learn to emit
    default_system: str = ""

    def encode_turns(self, tokenizer, example: dict) -> list[tuple[list[int], list[int]]]:
        system = example.get("system") or self.default_system
        pairs, prefix = [], self.system.format(content=system) if system else ""
        messages = example["messages"]
        for user, assistant in zip(messages[0::2], messages[1::2]):
            prompt = prefix + self.user.format(content=user["content"])
            response = self.assistant.format(content=assistant["content"])
            pairs.append((_ids(tokenizer, prompt), _ids(tokenizer, response)))
            prefix = ""
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


TEMPLATES = {
    "chatml": Template(
        name="chatml",
        system="<|im_start|>system\n{content}<|im_end|>\n",
        user="<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",
        assistant="{content}<|im_end|>\n",
    ),
    "qwen": Template(
        name="qwen",
        system="<|im_start|>system\n{content}<|im_end|>\n",
        user="<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",
        assistant="{content}<|im_end|>\n",
        default_system="You are a helpful assistant.",
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


def _render(tokenizer, chat: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=add_generation_prompt)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)
