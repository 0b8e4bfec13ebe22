"""The OpenAI-compatible protocol of `rayft serve`: requests checked field by field into plain settings, and the
response, chunk and error bodies. No model and no Ray here, so every rule is tested on its own.

A field the server cannot honour is refused with a 400 that names it; it is never silently ignored.
"""

import base64
import binascii
import json
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field, replace

from rayft.data.media import IMAGE_PLACEHOLDER  # where an image part stands in a turn's text
from rayft.recipe.schema import GeneratingArguments

MAX_CHOICES = 8  # n: answers per request
MAX_STOPS = 4  # stop: strings per request, as OpenAI allows


class ApiError(Exception):
    """A request the server refuses: its HTTP status and OpenAI's error body."""

    KINDS = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             413: "invalid_request_error", 500: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.KINDS.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": None}}


@dataclass(frozen=True)
class Limits:
    """The server's bounds: tokens generated per answer, prompt tokens, request body bytes."""

    max_tokens: int
    max_prompt_tokens: int
    max_body_bytes: int


@dataclass(frozen=True)
class Sampling:
    """How one request generates: the recipe's generation keys, with what the request sets on top."""

    do_sample: bool
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    max_new_tokens: int
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: int | None = None

    @classmethod
    def defaults(cls, g: GeneratingArguments, limits: Limits) -> "Sampling":
        wanted = g.max_new_tokens if g.max_new_tokens > 0 else limits.max_tokens
        return cls(do_sample=g.do_sample, temperature=g.temperature, top_p=g.top_p, top_k=g.top_k,
                   repetition_penalty=g.repetition_penalty, max_new_tokens=min(wanted, limits.max_tokens))


@dataclass(frozen=True)
class GenerationRequest:
    """A checked request. Chat requests carry LLaMA-Factory-style messages (user / assistant / observation /
    function), a system prompt and tools (a JSON list); completion requests carry the raw prompt text."""

    model: str
    sampling: Sampling
    stream: bool = False
    include_usage: bool = False
    messages: tuple = ()
    system: str | None = None
    tools: str | None = None
    parallel_tool_calls: bool = True
    prompt: str | None = None
    images: tuple = ()  # the chat's image parts in order: encoded bytes (data: URLs) or paths (file: URLs)


# fields of a request that take no part in generation and are accepted as they are
_METADATA = {"user", "metadata"}
_SAMPLING_FIELDS = {"temperature", "top_p", "top_k", "repetition_penalty", "max_tokens", "n", "stop", "seed",
                    "frequency_penalty", "presence_penalty", "logprobs", "logit_bias"}
_CHAT_FIELDS = {"model", "messages", "stream", "stream_options", "tools", "tool_choice", "parallel_tool_calls",
                "max_completion_tokens", "response_format", "top_logprobs", *_SAMPLING_FIELDS, *_METADATA}
_COMPLETION_FIELDS = {"model", "prompt", "stream", "stream_options", "echo", "suffix", "best_of",
                      *_SAMPLING_FIELDS, *_METADATA}


def parse_body(body: bytes, limits: Limits) -> dict:
    """The JSON object of a request body: 413 over the size limit, 400 when it is not a JSON object."""
    if len(body) > limits.max_body_bytes:
        raise ApiError(413, f"the request body is {len(body)} bytes; this server takes at most "
                            f"{limits.max_body_bytes}")
    try:
        parsed = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ApiError(400, f"the request body is not valid JSON ({getattr(err, 'msg', err)})") from None
    except RecursionError:
        raise ApiError(400, f"the request body nests deeper than {MAX_DEPTH} levels") from None
    if not isinstance(parsed, dict):
        raise ApiError(400, "the request body must be a JSON object")
    _check_text(parsed)
    return parsed


MAX_DEPTH = 32  # a request's deepest real nesting is a tool's JSON schema: a few levels


def _check_text(body: dict) -> None:
    """400 for nesting beyond MAX_DEPTH or a string that is not text (a lone surrogate such as "\\ud800", which
    JSON allows and no tokenizer encodes); walks without recursion."""
    pending = [(body, 1)]
    while pending:
        value, depth = pending.pop()
        if depth > MAX_DEPTH:
            raise ApiError(400, f"the request body nests deeper than {MAX_DEPTH} levels")
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        for key, item in items:
            for text in (key, item):
                if isinstance(text, str):
                    try:
                        text.encode("utf-8")
                    except UnicodeEncodeError as err:
                        raise ApiError(400, f"the request body holds {text[err.start]!r}, which is not text "
                                            "(a lone surrogate)") from None
            if isinstance(item, (dict, list)):
                pending.append((item, depth + 1))


def chat_request(body: dict, defaults: Sampling, limits: Limits) -> GenerationRequest:
    """A /v1/chat/completions body checked against what the server honours."""
    _refuse_unknown(body, _CHAT_FIELDS)
    _refuse_if(body, "top_logprobs", lambda v: v is not None, "log probabilities are not built in rayft serve")
    if body.get("response_format") not in (None, {"type": "text"}):
        raise ApiError(400, "response_format: only {\"type\": \"text\"} is built (no JSON mode or schema)",
                       "response_format")
    if "max_completion_tokens" in body and "max_tokens" in body and \
            body["max_completion_tokens"] != body["max_tokens"]:
        raise ApiError(400, "max_tokens and max_completion_tokens differ; send one of them", "max_tokens")
    if "max_completion_tokens" in body:
        body = {**body, "max_tokens": body["max_completion_tokens"]}
    sampling = _sampling(body, defaults, limits)
    messages, system, images = _messages(body.get("messages"))
    tools = _tools(body)
    stream, include_usage = _stream(body)
    if stream and tools:
        raise ApiError(400, "stream: streaming an answer that may call tools is not built; send stream: false",
                       "stream")
    if stream and sampling.n > 1:
        raise ApiError(400, "n: streaming several answers is not built; send n: 1 or stream: false", "n")
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise ApiError(400, "parallel_tool_calls: must be true or false", "parallel_tool_calls")
    return GenerationRequest(model=_model(body), sampling=sampling, stream=stream, include_usage=include_usage,
                             messages=tuple(messages), system=system, tools=tools, parallel_tool_calls=parallel,
                             images=tuple(images))


def completion_request(body: dict, defaults: Sampling, limits: Limits) -> GenerationRequest:
    """A /v1/completions body: one prompt string, generated on without a chat template."""
    _refuse_unknown(body, _COMPLETION_FIELDS)
    _refuse_if(body, "echo", lambda v: v not in (None, False), "echoing the prompt is not built")
    _refuse_if(body, "suffix", lambda v: v not in (None, ""), "suffixes (fill in the middle) are not built")
    _refuse_if(body, "best_of", lambda v: v not in (None, 1), "best_of is not built; use n")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise ApiError(400, "prompt: must be one non-empty string (lists of prompts and token ids are not built)",
                       "prompt")
    sampling = _sampling(body, defaults, limits)
    stream, include_usage = _stream(body)
    if stream and sampling.n > 1:
        raise ApiError(400, "n: streaming several answers is not built; send n: 1 or stream: false", "n")
    return GenerationRequest(model=_model(body), sampling=sampling, stream=stream, include_usage=include_usage,
                             prompt=prompt)


# -- responses ------------------------------------------------------------------------------------------------
@dataclass
class Answer:
    """One generated answer: its text, how it ended, and (chat only) its reasoning and tool calls."""

    text: str
    finish_reason: str  # stop | length | tool_calls
    completion_tokens: int
    reasoning: str | None = None
    tool_calls: list = field(default_factory=list)  # (name, JSON arguments)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_response(request: GenerationRequest, answers: list[Answer], prompt_tokens: int) -> dict:
    choices = []
    for index, answer in enumerate(answers):
        message = {"role": "assistant", "content": answer.text}
        if answer.reasoning is not None:
            message["reasoning_content"] = answer.reasoning
        if answer.tool_calls:
            message["content"] = answer.text or None
            message["tool_calls"] = [{"id": new_id("call"), "type": "function",
                                      "function": {"name": name, "arguments": arguments}}
                                     for name, arguments in answer.tool_calls]
        choices.append({"index": index, "message": message, "finish_reason": answer.finish_reason,
                        "logprobs": None})
    return {"id": new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()),
            "model": request.model, "choices": choices,
            "usage": usage(prompt_tokens, sum(a.completion_tokens for a in answers))}


def completion_response(request: GenerationRequest, answers: list[Answer], prompt_tokens: int) -> dict:
    choices = [{"index": i, "text": a.text, "finish_reason": a.finish_reason, "logprobs": None}
               for i, a in enumerate(answers)]
    return {"id": new_id("cmpl"), "object": "text_completion", "created": int(time.time()), "model": request.model,
            "choices": choices, "usage": usage(prompt_tokens, sum(a.completion_tokens for a in answers))}


def chat_chunk(chunk_id: str, model: str, delta: dict, finish_reason: str | None = None,
               usage_: dict | None = None) -> dict:
    return _chunk(chunk_id, model, "chat.completion.chunk", {"delta": delta}, finish_reason, usage_)


def completion_chunk(chunk_id: str, model: str, text: str, finish_reason: str | None = None,
                     usage_: dict | None = None) -> dict:
    return _chunk(chunk_id, model, "text_completion", {"text": text}, finish_reason, usage_)


def _chunk(chunk_id: str, model: str, kind: str, part: dict, finish_reason: str | None, usage_: dict | None) -> dict:
    """One streamed event: a piece of the one answer, or (last, with usage_) the usage and no choice."""
    chunk = {"id": chunk_id, "object": kind, "created": int(time.time()), "model": model, "choices": []}
    if usage_ is None:
        chunk["choices"] = [{"index": 0, **part, "finish_reason": finish_reason, "logprobs": None}]
    else:
        chunk["usage"] = usage_
    return chunk


def sse(data: dict | str) -> str:
    """One server-sent event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


class StopTrimmer:
    """Streams text up to the first stop string, holding back a tail that could still become one."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops, self.pending, self.stopped = stops, "", False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.pending += piece
        cut = first_stop(self.pending, self.stops)
        if cut is not None:
            self.stopped = True
            out, self.pending = self.pending[:cut], ""
            return out
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        out, self.pending = self.pending[:len(self.pending) - hold], self.pending[len(self.pending) - hold:]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out


class ThoughtStream:
    """Splits a reasoning template's answer, as it streams, into its thought (`reasoning_content`) and the reply
    (`content`) at the template's thought tags. An answer that does not open with the tag is all reply."""

    def __init__(self, open_tag: str, close_tag: str):
        self.open, self.close = open_tag.strip(), close_tag.strip()
        self.state, self.buffer, self.saw_thought = "start", "", False

    def feed(self, piece: str) -> list[tuple[str, str]]:
        self.buffer += piece
        parts = []
        if self.state == "start":
            head = self.buffer.lstrip()
            if len(head) < len(self.open) and self.open.startswith(head):
                return []  # not yet known whether a thought opens
            if head.startswith(self.open):
                self.state, self.saw_thought, self.buffer = "thought", True, head[len(self.open):]
            else:
                self.state = "content"
        if self.state == "thought":
            end = self.buffer.find(self.close)
            if end < 0:
                hold = max((k for k in range(1, len(self.close)) if self.buffer.endswith(self.close[:k])), default=0)
                parts.append(("reasoning_content", self.buffer[:len(self.buffer) - hold]))
                self.buffer = self.buffer[len(self.buffer) - hold:]
            else:
                parts.append(("reasoning_content", self.buffer[:end].strip("\n")))
                self.state, self.buffer = "content", self.buffer[end + len(self.close):].lstrip("\n")
        if self.state == "content":
            parts.append(("content", self.buffer))
            self.buffer = ""
        return [(name, text) for name, text in parts if text]

    def flush(self) -> list[tuple[str, str]]:
        name = "reasoning_content" if self.state == "thought" else "content"
        text, self.buffer = self.buffer, ""
        return [(name, text)] if text else []


def first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """Where the first of `stops` begins in `text` (None: nowhere)."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


# -- checks -------------------------------------------------------------------------------------------------
def _refuse_unknown(body: dict, known: set[str]) -> None:
    unknown = sorted(k for k in body if k not in known)
    if unknown:
        raise ApiError(400, f"{', '.join(unknown)}: not a field rayft serve honours; remove "
                            f"{'it' if len(unknown) == 1 else 'them'}", unknown[0])


def _refuse_if(body: dict, key: str, refused, why: str) -> None:
    if key in body and refused(body[key]):
        raise ApiError(400, f"{key}: {why}", key)


def _model(body: dict) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model: required; GET /v1/models lists the served names", "model")
    return model


def _number(body: dict, key: str, low: float, high: float, integer: bool = False):
    value = body[key]
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise ApiError(400, f"{key}: must be {kind} from {low} to {high}, got {value!r}", key)
    return value


def _sampling(body: dict, defaults: Sampling, limits: Limits) -> Sampling:
    for key in ("frequency_penalty", "presence_penalty"):
        _refuse_if(body, key, lambda v: v not in (None, 0, 0.0), "not built (Transformers has no additive "
                                                                 "penalties); use repetition_penalty")
    _refuse_if(body, "logprobs", lambda v: v not in (None, False, 0), "log probabilities are not built in rayft serve")
    _refuse_if(body, "logit_bias", lambda v: v not in (None, {}), "logit biases are not built in rayft serve")
    changes: dict = {}
    if body.get("temperature") is not None:
        temperature = _number(body, "temperature", 0, 2)
        changes.update(do_sample=temperature > 0, **({"temperature": float(temperature)} if temperature > 0 else {}))
    if body.get("top_p") is not None:
        changes["top_p"] = float(_number(body, "top_p", 0, 1))
        if changes["top_p"] == 0:
            raise ApiError(400, "top_p: must be above 0", "top_p")
    if body.get("top_k") is not None:
        changes["top_k"] = _number(body, "top_k", 0, 1_000_000, integer=True)
    if body.get("repetition_penalty") is not None:
        changes["repetition_penalty"] = float(_number(body, "repetition_penalty", 0.01, 10))
    if body.get("max_tokens") is not None:
        wanted = _number(body, "max_tokens", 1, 1 << 31, integer=True)
        if wanted > limits.max_tokens:
            raise ApiError(400, f"max_tokens: {wanted} is more than this server generates per answer "
                                f"({limits.max_tokens}); ask for at most that", "max_tokens")
        changes["max_new_tokens"] = wanted
    if body.get("n") is not None:
        changes["n"] = _number(body, "n", 1, MAX_CHOICES, integer=True)
    if body.get("seed") is not None:
        changes["seed"] = _number(body, "seed", -(1 << 63), (1 << 63) - 1, integer=True)
    stop = body.get("stop")
    if stop is not None:
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or len(stop) > MAX_STOPS or not all(isinstance(s, str) and s for s in stop):
            raise ApiError(400, f"stop: must be a string or a list of up to {MAX_STOPS} non-empty strings", "stop")
        changes["stop"] = tuple(stop)
    return replace(defaults, **changes)


def _stream(body: dict) -> tuple[bool, bool]:
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "stream: must be true or false", "stream")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not stream:
        raise ApiError(400, "stream_options: only read with stream: true", "stream_options")
    if not isinstance(options, dict) or set(options) - {"include_usage"} or \
            not isinstance(options.get("include_usage", False), bool):
        raise ApiError(400, "stream_options: only {\"include_usage\": true|false} is built", "stream_options")
    return stream, options.get("include_usage", False)


_ROLES = {"user": "user", "tool": "observation", "function": "observation", "assistant": "assistant"}
_MESSAGE_FIELDS = {"role", "content", "tool_calls", "tool_call_id", "name", "reasoning_content", "refusal"}


def _text(content, where: str, images: list | None = None) -> str:
    """A message's text: a string, or a list of text parts and, where `images` collects them (user turns), image
    parts, each standing in the text as `<image>`. Other parts are refused."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        allowed = {"text", "image_url"} if images is not None else {"text"}
        kinds = {p.get("type") for p in content} - allowed
        if kinds:
            raise ApiError(400, f"{where}: parts of type {sorted(map(str, kinds))} are not built here (rayft serve "
                                f"takes {' and '.join(sorted(allowed))} parts)", "messages")
        pieces = []
        for part in content:
            if part["type"] == "image_url":
                images.append(_image_source(part.get("image_url"), where))
                pieces.append(IMAGE_PLACEHOLDER)
            elif isinstance(part.get("text"), str):
                pieces.append(part["text"])
            else:
                raise ApiError(400, f"{where}: every text part needs a string `text`", "messages")
        return "".join(pieces)
    raise ApiError(400, f"{where}: content must be a string or a list of text parts", "messages")


def _image_source(image_url, where: str):
    """An image part's image: the bytes of a data: URL, or the path of a file: URL (the engine reads it only under
    media_dir). rayft serve downloads nothing."""
    if not isinstance(image_url, dict) or not isinstance(image_url.get("url"), str):
        raise ApiError(400, f"{where}: an image_url part needs image_url: {{\"url\": ...}}", "messages")
    if image_url.get("detail", "auto") != "auto":
        raise ApiError(400, f"{where}: image_url detail {image_url['detail']!r} is not honoured (images are sized by "
                            "the model's processor and image_max_pixels); leave it auto", "messages")
    url = image_url["url"]
    if url.startswith("data:"):
        header, _, data = url.partition(",")
        if not header.endswith(";base64") or not data:
            raise ApiError(400, f"{where}: a data: URL must be base64 (data:image/png;base64,...)", "messages")
        try:
            return base64.b64decode(data, validate=True)
        except binascii.Error:
            raise ApiError(400, f"{where}: the data: URL is not valid base64", "messages") from None
    if url.startswith("file://"):
        return urllib.parse.unquote(urllib.parse.urlparse(url).path)
    raise ApiError(400, f"{where}: image URLs are read from data: and file: URLs only (rayft serve downloads "
                        "nothing)", "messages")


def _messages(raw) -> tuple[list[dict], str | None, list]:
    """OpenAI messages as the templates' roles: a leading system (or developer) message becomes the system prompt,
    an assistant's tool calls a function turn, consecutive tool results one observation turn; and the user turns'
    images in order, each an `<image>` in its turn's text."""
    if not isinstance(raw, list) or not raw:
        raise ApiError(400, "messages: required, a non-empty list", "messages")
    system, turns, images = None, [], []
    for index, message in enumerate(raw):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise ApiError(400, f"{where}: must be an object with role and content", "messages")
        unknown = sorted(set(message) - _MESSAGE_FIELDS)
        if unknown:
            raise ApiError(400, f"{where}: {', '.join(unknown)} not honoured by rayft serve; remove them", "messages")
        role = message.get("role")
        if role in ("system", "developer"):
            if turns or system is not None:
                raise ApiError(400, f"{where}: a {role} message must come first, and only once", "messages")
            system = _text(message.get("content"), where)
            continue
        if role not in _ROLES:
            raise ApiError(400, f"{where}: role {role!r} is not one of system, developer, user, assistant, tool",
                           "messages")
        if role == "assistant" and message.get("tool_calls"):
            turns.append({"role": "function", "content": _calls_json(message["tool_calls"], where)})
            continue
        content = message.get("content")
        text = "" if content is None and role == "assistant" else _text(content, where,
                                                                          images if role == "user" else None)
        kind = _ROLES[role]
        if kind == "observation" and turns and turns[-1]["role"] == "observation":
            turns[-1]["content"] += "\n" + text  # the results of parallel calls, one turn as in the training data
            continue
        turns.append({"role": kind, "content": text})
    for index, turn in enumerate(turns):
        asks = turn["role"] in ("user", "observation")
        if asks != (index % 2 == 0):
            raise ApiError(400, "messages: after the system message, turns must alternate user (or tool) and "
                                "assistant, beginning and ending with user (or tool)", "messages")
    if not turns or len(turns) % 2 == 0:
        raise ApiError(400, "messages: the last message must be the user's (or a tool's result)", "messages")
    return turns, system, images


def _calls_json(calls, where: str) -> str:
    if not isinstance(calls, list):
        raise ApiError(400, f"{where}: tool_calls must be a list", "messages")
    parsed = []
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ApiError(400, f"{where}: each tool call needs function.name and function.arguments", "messages")
        try:
            arguments = json.loads(function.get("arguments") or "{}")
        except (json.JSONDecodeError, TypeError):
            raise ApiError(400, f"{where}: the arguments of {function['name']!r} are not a JSON string",
                           "messages") from None
        parsed.append({"name": function["name"], "arguments": arguments})
    return json.dumps(parsed, ensure_ascii=False)


def _tools(body: dict) -> str | None:
    tools, choice = body.get("tools"), body.get("tool_choice")
    if choice not in (None, "auto", "none"):
        raise ApiError(400, "tool_choice: only \"auto\" and \"none\" are built (the model decides whether to call)",
                       "tool_choice")
    if tools is None or tools == [] or choice == "none":
        return None
    if not isinstance(tools, list) or not all(
            isinstance(t, dict) and t.get("type") == "function" and isinstance(t.get("function"), dict)
            and isinstance(t["function"].get("name"), str) for t in tools):
        raise ApiError(400, "tools: must be a list of {\"type\": \"function\", \"function\": {\"name\", "
                            "\"description\", \"parameters\"}}", "tools")
    functions = [dict(t["function"]) for t in tools]
    for function in functions:
        function.setdefault("parameters", {"type": "object", "properties": {}})
    return json.dumps(functions, ensure_ascii=False)
