"""`rayft serve`: the trained model behind an OpenAI-compatible API, as a Ray Serve application.

Each replica holds the base model (with adapter_name_or_path merged, as `rayft chat` does) and every adapter of
serve_adapters by name; a request's `model` picks one. Ray Serve routes requests across replicas and scales them.
The driver checks everything it can (adapters, template, port, resources) before Ray starts.
"""

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import logging
import signal
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from peft import PeftModel
from ray import serve
from transformers import AsyncTextIteratorStreamer, StoppingCriteria, StoppingCriteriaList

from rayft.data.errors import DataError
from rayft.data.media import IMAGE_PLACEHOLDER, expand_images, image_size
from rayft.data.pipeline import EncodingSettings
from rayft.data.tools import read_calls
from rayft.orchestrator.openai_api import (
    Answer,
    ApiError,
    GenerationRequest,
    Limits,
    Sampling,
    StopTrimmer,
    ThoughtStream,
    chat_chunk,
    chat_request,
    chat_response,
    completion_chunk,
    completion_request,
    completion_response,
    first_stop,
    new_id,
    parse_body,
    sse,
    usage,
)
from rayft.recipe.config import RecipeConfig
from rayft.recipe.derive import replica_range
from rayft.recipe.logs import logger
from rayft.recipe.problems import ConfigError, Problem
from rayft.trainers.generate import cut_at_stop, generation_kwargs, left_padded, stop_token_ids
from rayft.trainers.model import ImageModel, find_adapter, load_for_serving, load_tokenizer, local_adapter

DEPLOYMENT = "ModelServer"
DEFAULT_BATCH = 8  # serve_max_batch_size when unset (at most serve_max_concurrent)


@dataclass(frozen=True)
class ServeSpec:
    """What crosses to the replicas: the recipe, the adapters by name, the base model's name, the limits, and the
    API key's SHA-256 (the key itself never leaves the driver)."""

    recipe: dict
    adapters: dict
    base_name: str
    limits: Limits
    key_digest: str | None
    verbose: bool
    max_batch_size: int = 1

    @property
    def names(self) -> list[str]:
        return [self.base_name, *self.adapters]


def serve_spec(cfg: RecipeConfig) -> ServeSpec:
    """The replicas' settings from a recipe; every problem with the adapters is reported at once."""
    s = cfg.serving
    adapters = dict(s.serve_adapters or {})
    base_name = s.served_model_name or Path(cfg.model.model_name_or_path.rstrip("/")).name
    problems = [Problem("serve_adapters", f"{name!r} is also the base model's name; rename the adapter or set "
                                          "served_model_name") for name in adapters if name == base_name]
    for name, where in adapters.items():
        try:
            found = find_adapter(str(where))
        except (DataError, OSError) as err:
            problems.append(Problem("serve_adapters", f"{name!r}: {where} cannot be read ({err})"))
            continue
        if found is None:
            problems.append(Problem("serve_adapters", f"{name!r}: {where} holds no adapter_config.json (nor does its "
                                                      "checkpoint/ folder); name a trained output_dir or checkpoint"))
    if problems:
        raise ConfigError(problems)
    g = cfg.generating
    limits = Limits(max_tokens=s.serve_max_tokens or (g.max_new_tokens if g.max_new_tokens > 0 else g.max_length),
                    max_prompt_tokens=s.serve_max_prompt_tokens or cfg.data.cutoff_len,
                    max_body_bytes=s.serve_max_body_bytes)
    digest = hashlib.sha256(s.serve_api_key.encode()).hexdigest() if s.serve_api_key else None
    return ServeSpec(recipe=cfg.to_dict(mask_secrets=False) | {"serve_api_key": None}, adapters=adapters,
                     base_name=base_name, limits=limits, key_digest=digest, verbose=s.serve_verbose,
                     max_batch_size=s.serve_max_batch_size or min(DEFAULT_BATCH, s.serve_max_concurrent))


def replica_options(cfg: RecipeConfig) -> dict:
    """Ray Serve's options for the model deployment: replicas (or an autoscaling range), each replica's resources,
    and how many requests one replica holds."""
    s = cfg.serving
    resources = dict(replica_resources(cfg))
    actor = {"num_cpus": resources.pop("CPU", 0), "num_gpus": resources.pop("GPU", 0)}
    if "memory" in resources:
        actor["memory"] = resources.pop("memory")
    if resources:
        actor["resources"] = resources
    low, high = replica_range(s.serve_replicas)
    options = {"name": DEPLOYMENT, "ray_actor_options": actor, "max_ongoing_requests": s.serve_max_concurrent}
    if low == high:
        return options | {"num_replicas": low}
    return options | {"autoscaling_config": {"min_replicas": low, "max_replicas": high, "initial_replicas": max(low, 1),
                                             "target_ongoing_requests": max(1, s.serve_max_concurrent // 2)}}


def replica_resources(cfg: RecipeConfig) -> dict:
    if cfg.serving.serve_resources is None:
        return {"GPU": 1} if torch.cuda.is_available() else {"CPU": 1}
    return dict(cfg.serving.serve_resources)


# -- the model side of a replica ---------------------------------------------------------------------------------
class _Cancelled(StoppingCriteria):
    """Ends generation when the client has gone or the answer has met a stop string."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class Engine:
    """The model, its adapters and the template. One generate call runs at a time (the adapter is switched per call,
    and CPU threads are better spent on one call than shared by several); a call may answer several requests."""

    def __init__(self, spec: ServeSpec):
        cfg = RecipeConfig.from_dict(spec.recipe)
        self.cfg, self.spec = cfg, spec
        self.use_gpu = torch.cuda.is_available()
        self.tokenizer = load_tokenizer(cfg.model)
        self.downloads = tempfile.mkdtemp(prefix="rayft-adapters-")
        folders = {name: local_adapter(str(where), self.downloads) for name, where in spec.adapters.items()}
        self.model = load_for_serving(cfg.model, folders, self.use_gpu)
        self.template = EncodingSettings.of(cfg).chat_template()
        self.images = ImageModel.of(cfg, self.tokenizer)  # a multimodal template's: parts encoded as in training
        self.stops = stop_token_ids(self.tokenizer, cfg)
        self.defaults = Sampling.defaults(cfg.generating, spec.limits)
        self.lock = threading.Lock()

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        if request.prompt is not None:
            ids = self.tokenizer(request.prompt)["input_ids"]
            field = "prompt"
        else:
            if request.tools and not self.template.writes_tools:
                raise ApiError(400, f"tools: the template {self.template.name!r} writes no tool calls", "tools")
            messages = self._with_images(request) if request.images else list(request.messages)
            example = {"messages": [*messages, {"role": "assistant", "content": ""}],
                       "system": request.system, "tools": request.tools}
            try:
                ids = self.template.encode_oneturn(self.tokenizer, example)[0]
            except DataError as err:
                raise ApiError(400, f"messages: {err}", "messages") from None
            field = "messages"
        if len(ids) > self.spec.limits.max_prompt_tokens:
            raise ApiError(400, f"{field}: the prompt is {len(ids)} tokens; this server takes at most "
                                f"{self.spec.limits.max_prompt_tokens}", field)
        return ids

    def _with_images(self, request: GenerationRequest) -> list[dict]:
        """The request's turns with each image part's `<image>` expanded into its image tokens, as in training."""
        if self.images is None:
            raise ApiError(400, f"messages: image parts need a vision-language model served under its multimodal "
                                f"template; this server's template {self.template.name!r} is text-only", "messages")
        if request.sampling.n > 1:
            raise ApiError(400, "n: several answers to a request with images are not built; send n: 1", "n")
        media = self.cfg.data.media_dir
        for source in request.images:
            if isinstance(source, str) and (media is None or not Path(source).resolve().is_relative_to(
                    Path(media).resolve())):
                raise ApiError(400, "messages: file: URLs are read only under the server's media_dir"
                                    + ("" if media else ", which is not set") + "; send a data: URL", "messages")
        placeholders = sum(turn["content"].count(IMAGE_PLACEHOLDER) for turn in request.messages)
        if placeholders != len(request.images):
            raise ApiError(400, f"messages: the text holds {placeholders - len(request.images)} {IMAGE_PLACEHOLDER} "
                                "besides the image parts'; remove it", "messages")
        try:
            sizes = [image_size(source) for source in request.images]
        except (OSError, ValueError) as err:
            raise ApiError(400, f"messages: an image cannot be read ({' '.join(str(err).split())})",
                           "messages") from None
        return expand_images(list(request.messages), sizes, self.images.geometry, self.template.media_tokens)

    def generate_batch(self, jobs: list[tuple[GenerationRequest, list[int]]]) -> list[list[Answer]]:
        """Answers of several requests (blocking). Requests for the same model with the same settings (one answer
        each, no seed) share one generate call, their prompts padded on the left; the others run alone."""
        answers: list = [None] * len(jobs)
        groups: dict = {}
        for index, (request, _) in enumerate(jobs):
            alone = request.sampling.n > 1 or request.sampling.seed is not None or bool(request.images)
            groups.setdefault(("alone", index) if alone else (request.model, request.sampling), []).append(index)
        for members in groups.values():
            outputs = self.generate(jobs[members[0]][0], [jobs[i][1] for i in members])
            if len(members) == 1:
                answers[members[0]] = outputs  # the n answers of one request
            else:
                for index, output in zip(members, outputs):
                    answers[index] = [output]
        return answers

    def generate(self, request: GenerationRequest, prompts: list[list[int]], streamer=None,
                 cancel: threading.Event | None = None) -> list[Answer]:
        """The answers to `prompts` (one request's prompt, or several requests' with `request`'s model and
        settings): `request.sampling.n` answers for one prompt, one per prompt for several (blocking)."""
        sampling = request.sampling
        settings = dataclasses.replace(self.cfg.generating, do_sample=sampling.do_sample,
                                       temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                                       repetition_penalty=sampling.repetition_penalty,
                                       max_new_tokens=sampling.max_new_tokens)
        kwargs = generation_kwargs(settings, self.stops, self.tokenizer.pad_token_id)
        kwargs["num_return_sequences"] = sampling.n
        if sampling.stop:
            kwargs.update(stop_strings=list(sampling.stop), tokenizer=self.tokenizer)
        if cancel is not None:
            kwargs["stopping_criteria"] = StoppingCriteriaList([_Cancelled(cancel)])
        input_ids, attention_mask = left_padded(prompts, self.tokenizer.pad_token_id,
                                                "cuda" if self.use_gpu else "cpu")
        if self.images is not None:  # a vision-language model: the request's pixels, or none
            kwargs.update(self.images.inputs(list(request.images), input_ids))
        with self.lock, self._adapter(request.model), torch.no_grad():
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            output = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, streamer=streamer,
                                         **kwargs)
        return [self._answer(request, row.tolist()) for row in output[:, input_ids.shape[1]:]]

    @contextlib.contextmanager
    def _adapter(self, name: str):
        if not isinstance(self.model, PeftModel):  # no adapters: the base is all there is
            yield
        elif name == self.spec.base_name:
            with self.model.disable_adapter():
                yield
        else:
            self.model.set_adapter(name)
            yield

    def _answer(self, request: GenerationRequest, generated: list[int]) -> Answer:
        ids = cut_at_stop(generated, self.stops)
        stopped = len(ids) < len(generated) or (ids and ids[-1] in self.stops)
        pad = self.tokenizer.pad_token_id
        while ids and ids[-1] == pad and pad not in self.stops:  # a shorter answer among n, padded
            ids.pop()
        text = self.tokenizer.decode(ids, skip_special_tokens=self.cfg.generating.skip_special_tokens)
        cut = first_stop(text, request.sampling.stop)
        text = text if cut is None else text[:cut]
        finish = "stop" if stopped or cut is not None or len(ids) < request.sampling.max_new_tokens else "length"
        answer = Answer(text=text, finish_reason=finish, completion_tokens=len(ids))
        if request.prompt is None:
            self._read_reply(request, answer)
        return answer

    def _read_reply(self, request: GenerationRequest, answer: Answer) -> None:
        """A chat answer's thought (reasoning templates) and tool calls (when the request offered tools)."""
        if self.template.reasoning:
            split = ThoughtStream(*self.template.thought_words)
            parts = split.feed(answer.text) + split.flush()
            reasoning = "".join(t for f, t in parts if f == "reasoning_content")
            answer.text = "".join(t for f, t in parts if f == "content")
            answer.reasoning = reasoning if split.saw_thought else None
        if request.tools:
            calls = read_calls(self.template.function_tools, answer.text)
            if calls:
                answer.tool_calls = calls if request.parallel_tool_calls else calls[:1]
                answer.text, answer.finish_reason = "", "tool_calls"


# -- the HTTP side ----------------------------------------------------------------------------------------------
api = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)


def _error(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


@serve.ingress(api)
class ModelServer:
    """One replica: the API routes over an `Engine`."""

    def __init__(self, spec: ServeSpec):
        rayft_logger = logging.getLogger("rayft")
        rayft_logger.setLevel(logging.INFO)
        if not rayft_logger.handlers:  # a replica's own process: its stderr is the replica's log (and, with
            handler = logging.StreamHandler()  # serve_verbose, the console of rayft serve)
            handler.setFormatter(logging.Formatter("[rayft] %(message)s"))
            rayft_logger.addHandler(handler)
        self.spec = spec
        self.engine = Engine(spec)
        self._batched.set_max_batch_size(spec.max_batch_size)

    @api.get("/health")
    async def health(self):
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models(self, request: Request):
        try:
            self._authorise(request)
        except ApiError as err:
            return _error(err)
        return {"object": "list", "data": [self._card(name) for name in self.spec.names]}

    @api.get("/v1/models/{name:path}")
    async def model(self, name: str, request: Request):
        try:
            self._authorise(request)
            self._served(name)
        except ApiError as err:
            return _error(err)
        return self._card(name)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._answer(request, chat_request, chat_response, self._stream_chat)

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._answer(request, completion_request, completion_response, self._stream_completion)

    async def _answer(self, http: Request, parse, respond, stream):
        try:
            self._authorise(http)
            declared = http.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > self.spec.limits.max_body_bytes:
                raise ApiError(413, f"the request body is {declared} bytes; this server takes at most "
                                    f"{self.spec.limits.max_body_bytes}")
            request = parse(parse_body(await http.body(), self.spec.limits), self.engine.defaults, self.spec.limits)
            self._served(request.model)
            ids = self.engine.prompt_ids(request)
        except ApiError as err:
            return _error(err)
        except Exception as err:  # a body the checks above let through and the template or tokenizer cannot take
            logger.warning(f"{http.url.path}: a request that could not be read: {err!r}")
            return _error(ApiError(400, f"the request could not be read ({type(err).__name__}: {err})"))
        if self.spec.verbose:
            logger.info(f"{http.url.path}: model {request.model}, {len(ids)} prompt tokens, "
                        f"{request.sampling.max_new_tokens} most new, stream {request.stream}")
        if request.stream:
            return StreamingResponse(stream(request, ids), media_type="text/event-stream")
        try:
            answers = await self._batched((request, ids))
        except Exception as err:  # a fault of the server's (memory, device), in OpenAI's error shape
            logger.error(f"generation failed: {err!r}")
            return _error(ApiError(500, "generation failed on the server; see the replica's log"))
        return respond(request, answers, len(ids))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _batched(self, jobs: list[tuple[GenerationRequest, list[int]]]) -> list[list[Answer]]:
        """Requests that arrive while a generate call runs wait here and are answered together by the next one."""
        return await asyncio.to_thread(self.engine.generate_batch, jobs)

    async def _pieces(self, request: GenerationRequest, ids: list[int], outcome: dict):
        """The answer's text as it is generated, up to a stop string; `outcome` gets the Answer at the end."""
        tokenizer = self.engine.tokenizer
        streamer = AsyncTextIteratorStreamer(tokenizer, skip_prompt=True,
                                             skip_special_tokens=self.engine.cfg.generating.skip_special_tokens)
        cancel = threading.Event()

        def work():
            try:
                outcome["answer"] = self.engine.generate(request, [ids], streamer, cancel)[0]
            except Exception as err:  # reported to the client as an error event below
                outcome["error"] = err
                streamer.end()

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        trimmer = StopTrimmer(request.sampling.stop)
        try:
            async for piece in streamer:
                text = trimmer.feed(piece)
                if trimmer.stopped:
                    cancel.set()
                if text:
                    yield text
            tail = trimmer.flush()
            if tail:
                yield tail
        finally:
            cancel.set()  # the client went away, or the answer met a stop string
            await asyncio.to_thread(thread.join)

    async def _stream_chat(self, request: GenerationRequest, ids: list[int]):
        chunk_id, outcome = new_id("chatcmpl"), {}
        yield sse(chat_chunk(chunk_id, request.model, {"role": "assistant", "content": ""}))
        split = ThoughtStream(*self.engine.template.thought_words) if self.engine.template.reasoning else None
        async for text in self._pieces(request, ids, outcome):
            for field, part in split.feed(text) if split else [("content", text)]:
                yield sse(chat_chunk(chunk_id, request.model, {field: part}))
        for field, part in split.flush() if split else []:
            yield sse(chat_chunk(chunk_id, request.model, {field: part}))
        async for event in self._finish(outcome, lambda finish, use: chat_chunk(
                chunk_id, request.model, {}, finish, use), len(ids), request.include_usage):
            yield event

    async def _stream_completion(self, request: GenerationRequest, ids: list[int]):
        chunk_id, outcome = new_id("cmpl"), {}
        async for text in self._pieces(request, ids, outcome):
            yield sse(completion_chunk(chunk_id, request.model, text))
        async for event in self._finish(outcome, lambda finish, use: completion_chunk(
                chunk_id, request.model, "", finish, use), len(ids), request.include_usage):
            yield event

    async def _finish(self, outcome: dict, chunk, prompt_tokens: int, include_usage: bool):
        if "error" in outcome:
            logger.error(f"generation failed: {outcome['error']!r}")
            yield sse(ApiError(500, "generation failed on the server; see the replica's log").body())
            return
        answer = outcome["answer"]
        yield sse(chunk(answer.finish_reason, None))
        if include_usage:
            yield sse(chunk(None, usage(prompt_tokens, answer.completion_tokens)))
        yield sse("[DONE]")

    def _authorise(self, request: Request) -> None:
        if self.spec.key_digest is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise ApiError(401, "this server needs an API key: send the header Authorization: Bearer <key>")
        digest = hashlib.sha256(given.strip().encode()).hexdigest()
        if not hmac.compare_digest(digest, self.spec.key_digest):
            raise ApiError(401, "the API key is not valid")

    def _served(self, name: str) -> None:
        if name not in self.spec.names:
            raise ApiError(404, f"model {name!r} is not served here; served: {', '.join(self.spec.names)}", "model")

    def _card(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": 0, "owned_by": "rayft",
                "root": self.spec.base_name, "parent": None if name == self.spec.base_name else self.spec.base_name}


# -- the driver -------------------------------------------------------------------------------------------------
def run_serve(cfg: RecipeConfig, detach: bool = False) -> None:
    """Checks the recipe, starts (or connects to) Ray, deploys the application and, unless `detach`, serves until
    Ctrl-C (or SIGTERM) and then removes it."""
    from rayft.cluster.session import local_machine, ray_session

    s = cfg.serving
    if detach and cfg.ray.ray_address is None:
        raise ConfigError([Problem("--detach", "leaves the application on a cluster; a local Ray instance ends with "
                                               "this command. Set ray_address, or leave out --detach")])
    spec = serve_spec(cfg)
    _check_template(cfg)
    options = replica_options(cfg)
    if cfg.ray.ray_address is None:
        _check_port(s.serve_host, s.serve_port)
        _check_fits(options, replica_range(s.serve_replicas)[0], local_machine()[0].resources)
    ray_args = cfg.ray
    if s.serve_verbose:  # the replicas' request lines reach this console
        ray_args = dataclasses.replace(ray_args, ray_init_kwargs={"log_to_driver": True,
                                                                  **(ray_args.ray_init_kwargs or {})})
    logging.getLogger("ray.serve").setLevel(logging.INFO if logger.isEnabledFor(logging.DEBUG) else logging.WARNING)
    with ray_session(ray_args):
        serve.start(http_options={"host": s.serve_host, "port": s.serve_port})
        logger.info(f"starting {options.get('num_replicas') or s.serve_replicas} replica(s) of {', '.join(spec.names)}"
                    f", each with {replica_resources(cfg)}, holding up to {s.serve_max_concurrent} requests and "
                    f"answering up to {spec.max_batch_size} together; answers of at most {spec.limits.max_tokens} "
                    f"tokens to prompts of at most {spec.limits.max_prompt_tokens}")
        started = time.perf_counter()
        try:
            serve.run(serve.deployment(ModelServer, **options).bind(spec), name=s.serve_name,
                      route_prefix=s.serve_route_prefix)
        except RuntimeError as err:
            raise ConfigError([Problem("rayft serve", f"the replicas did not start: {_last_line(err)}")]) from None
        except KeyboardInterrupt:  # Ctrl-C before Ray Serve reported the replicas ready (they may already answer)
            logger.info("stopping (interrupted while the replicas started)")
            if cfg.ray.ray_address is not None:
                serve.delete(s.serve_name)
            return
        where = f"http://{_url_host(s.serve_host)}:{s.serve_port}{s.serve_route_prefix.rstrip('/')}/v1"
        logger.info(f"serving {', '.join(spec.names)} at {where} (ready in {time.perf_counter() - started:.0f} s)")
        if detach:
            logger.info(f"left running on the cluster; stop it with `rayft serve RECIPE --stop` (application "
                        f"{s.serve_name!r})")
            return
        logger.info("Ctrl-C stops it")
        _wait_for_interrupt()
        logger.info("stopping")
        # a local Ray instance goes with the session, the application in it; its processes may already have had
        # the terminal's signal, so no call waits on them. A cluster's application is removed.
        if cfg.ray.ray_address is not None:
            serve.delete(s.serve_name)


def stop_serve(cfg: RecipeConfig) -> None:
    """Removes the application `serve_name` from the cluster at ray_address."""
    from rayft.cluster.session import ray_session

    if cfg.ray.ray_address is None:
        raise ConfigError([Problem("--stop", "removes an application from a cluster; set ray_address")])
    with ray_session(cfg.ray):
        if cfg.serving.serve_name not in serve.status().applications:
            raise ConfigError([Problem("serve_name", f"no application {cfg.serving.serve_name!r} runs on the "
                                                     f"cluster at {cfg.ray.ray_address}")])
        serve.delete(cfg.serving.serve_name)
        logger.info(f"application {cfg.serving.serve_name!r} stopped")


def _check_template(cfg: RecipeConfig) -> None:
    """The tokenizer loads and the template can encode a conversation with it, before any replica starts."""
    tokenizer = load_tokenizer(cfg.model)
    template = EncodingSettings.of(cfg).chat_template()
    template.check_tokenizer(tokenizer)
    template.encode_oneturn(tokenizer, {"messages": [{"role": "user", "content": "hi"},
                                                     {"role": "assistant", "content": ""}]})


def _check_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            raise ConfigError([Problem("serve_port", f"cannot listen on {host}:{port} ({err.strerror}); choose a "
                                                     "free port or stop what holds it")]) from None


def _check_fits(options: dict, replicas: int, machine: dict) -> None:
    actor = options["ray_actor_options"]
    need = {"CPU": actor["num_cpus"] * replicas, "GPU": actor["num_gpus"] * replicas}
    short = [f"{need[k]:g} {k}" for k in need if need[k] > machine.get(k, 0)]
    if short:
        has = f"{machine.get('CPU', 0):g} CPU and {machine.get('GPU', 0):g} GPU"
        raise ConfigError([Problem("serve_replicas and serve_resources",
                                   f"{replicas} replica(s) need {', '.join(short)}; this machine has {has}")])


def _wait_for_interrupt() -> None:
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)


def _url_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::") else (f"[{host}]" if ":" in host else host)


def _last_line(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else repr(err)
