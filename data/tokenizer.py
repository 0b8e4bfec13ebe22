"""The one tokenizer loader: Ray Data's tokenisation tasks, the workers, export, chat and prediction all call it,
so every model key (revision, token, cache_dir, trust_remote_code, use_fast_tokenizer) reaches every one of them."""

import functools
from dataclasses import dataclass

from rayft.recipe.values import comma_list


@dataclass(frozen=True)
class TokenizerSpec:
    """Where a tokenizer comes from: plain, hashable data that travels to Ray Data's tasks."""

    path: str
    revision: str = "main"
    cache_dir: str | None = None
    token: str | None = None
    trust_remote_code: bool = False
    use_fast: bool = True
    added_tokens: tuple[str, ...] = ()  # add_tokens: plain tokens added to the vocabulary, in order
    added_special_tokens: tuple[str, ...] = ()  # add_special_tokens (or new_special_tokens_config's tokens)
    split_special_tokens: bool = False

    @classmethod
    def of(cls, model_args) -> "TokenizerSpec":
        """The tokenizer of a recipe's model keys (`ModelArguments`)."""
        m = model_args
        special = list(m.new_special_tokens_config) if isinstance(m.new_special_tokens_config, dict) else (
            comma_list(m.add_special_tokens))
        return cls(path=m.model_name_or_path, revision=m.model_revision, cache_dir=m.cache_dir, token=m.hf_hub_token,
                   trust_remote_code=m.trust_remote_code, use_fast=m.use_fast_tokenizer,
                   added_tokens=tuple(comma_list(m.add_tokens)), added_special_tokens=tuple(special),
                   split_special_tokens=m.split_special_tokens)

    def identity(self) -> dict:
        """What names this tokenizer in a cache key: everything but the secret token."""
        return {"path": self.path, "revision": self.revision, "use_fast": self.use_fast,
                **({"added": [list(self.added_tokens), list(self.added_special_tokens)]}
                   if self.added_tokens or self.added_special_tokens else {}),
                **({"split_special_tokens": True} if self.split_special_tokens else {})}



@functools.lru_cache(maxsize=4)
def load_tokenizer(spec: TokenizerSpec):
    """The tokenizer of `spec`, loaded once per process (Ray Data's task workers reuse it across batches); a
    tokenizer without a pad token pads with its EOS token."""
    from transformers import AutoTokenizer  # heavy; Ray Data tasks that only read or pack never load it

    tokenizer = AutoTokenizer.from_pretrained(spec.path, revision=spec.revision, cache_dir=spec.cache_dir,
                                              token=spec.token, trust_remote_code=spec.trust_remote_code,
                                              use_fast=spec.use_fast,
                                              **({"split_special_tokens": True} if spec.split_special_tokens else {}))
    if spec.added_tokens:  # as LLaMA-Factory: plain tokens first, then special ones; known ones are no-ops
        tokenizer.add_tokens(list(spec.added_tokens), special_tokens=False)
    if spec.added_special_tokens:
        tokenizer.add_tokens(list(spec.added_special_tokens), special_tokens=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def encode_text(tokenizer, text: str) -> list[int]:
    """`tokenizer.encode(text, add_special_tokens=False)`, the same ids, through a fast tokenizer's Rust backend
    directly where Transformers' wrapper adds nothing to it (no truncation, padding or special-token splitting
    configured, `_encode_plus` not overridden): the wrapper's per-call work is about half the cost of encoding a
    short text, and templates encode every message slot by slot."""
    if _plain_backend(tokenizer):
        return tokenizer._tokenizer.encode(text, add_special_tokens=False).ids
    return tokenizer.encode(text, add_special_tokens=False)


def _plain_backend(tokenizer) -> bool:
    backend = getattr(tokenizer, "_tokenizer", None)
    return (backend is not None and _plain_class(type(tokenizer)) and backend.truncation is None
            and backend.padding is None and not backend.encode_special_tokens
            and not getattr(tokenizer, "split_special_tokens", False))


@functools.cache
def _plain_class(cls: type) -> bool:
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    return issubclass(cls, TokenizersBackend) and cls._encode_plus is TokenizersBackend._encode_plus
