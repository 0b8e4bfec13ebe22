"""`rayft serve`: the protocol's rules without a model, then one real server (the CLI, its own local Ray, Ray Serve)
with the demo model and two adapters, talked to with the official `openai` client and raw HTTP."""

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, free_port
from test_export import trained_like_adapter

from rayft.orchestrator.openai_api import (
    ApiError,
    Limits,
    Sampling,
    StopTrimmer,
    ThoughtStream,
    chat_request,
    completion_request,
    parse_body,
)
from rayft.recipe.loading import load_recipe
from rayft.recipe.parse import parse_config
from rayft.recipe.problems import ConfigError
from rayft.recipe.schema import GeneratingArguments

SERVE_RECIPE = ROOT / "configs" / "serve_lora.yaml"
KEY = "sk-rayft-serve-test-key-0123456789"
LIMITS = Limits(max_tokens=64, max_prompt_tokens=48, max_body_bytes=4096)
DEFAULTS = Sampling.defaults(GeneratingArguments(do_sample=False, max_new_tokens=16), LIMITS)


def refused(parse, body: dict, status: int = 400) -> str:
    with pytest.raises(ApiError) as caught:
        parse(body, DEFAULTS, LIMITS)
    assert caught.value.status == status
    return caught.value.message


@pytest.mark.unit
def test_chat_requests_become_template_turns_and_unhonoured_fields_are_refused():
    request = chat_request({"model": "m", "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "weather in "}, {"type": "text", "text": "Paris?"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "c2", "content": "22 C"}],
        "tools": [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}],
        "temperature": 0, "max_tokens": 8, "stop": "\n\n"}, DEFAULTS, LIMITS)
    assert request.system == "be brief"
    call = '[{"name": "weather", "arguments": {"city": "Paris"}}]'
    assert request.messages == ({"role": "user", "content": "weather in Paris?"}, {"role": "function", "content": call},
                                {"role": "observation", "content": "sunny\n22 C"})
    assert json.loads(request.tools)[0]["name"] == "weather"
    assert request.sampling.do_sample is False and request.sampling.max_new_tokens == 8
    assert request.sampling.stop == ("\n\n",)
    # sampling settings the request leaves out are the recipe's; temperature > 0 samples
    sampled = chat_request({"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.5},
                           DEFAULTS, LIMITS)
    assert sampled.sampling.do_sample and sampled.sampling.temperature == 0.5 and sampled.sampling.max_new_tokens == 16

    hi = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert refused(chat_request, {**hi, "logprobs": True}).startswith("logprobs: log probabilities are not built")
    assert refused(chat_request, {**hi, "frequency_penalty": 0.5}).startswith("frequency_penalty: not built")
    assert refused(chat_request, {**hi, "functions": []}) == "functions: not a field rayft serve honours; remove it"
    assert "more than this server generates per answer (64)" in refused(chat_request, {**hi, "max_tokens": 65})
    assert refused(chat_request, {**hi, "tool_choice": "required"}).startswith("tool_choice: only")
    assert refused(chat_request, {**hi, "n": 2, "stream": True}).startswith("n: streaming several answers")
    assert refused(chat_request, {"messages": hi["messages"]}).startswith("model: required")
    assert "must alternate" in refused(chat_request, {"model": "m", "messages": [
        {"role": "user", "content": "a"}, {"role": "user", "content": "b"}]})
    assert "parts of type ['input_audio'] are not built" in refused(chat_request, {"model": "m", "messages": [
        {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "x"}}]}]})
    assert refused(completion_request, {"model": "m", "prompt": "x", "echo": True}).startswith("echo:")
    assert refused(completion_request, {"model": "m", "prompt": [1, 2]}).startswith("prompt: must be one")
    with pytest.raises(ApiError, match="not valid JSON") as bad:
        parse_body(b"{", LIMITS)
    assert bad.value.status == 400
    with pytest.raises(ApiError, match="takes at most 4096") as big:
        parse_body(b" " * 5000, LIMITS)
    assert big.value.status == 413


@pytest.mark.unit
def test_streamed_text_stops_at_stop_strings_and_splits_thoughts_across_pieces():
    trimmer = StopTrimmer(("END",))
    out = [trimmer.feed(p) for p in ("one E", "N", "D two")]
    assert out == ["one ", "", ""] and trimmer.stopped and trimmer.flush() == ""
    thought = ThoughtStream("<think>\n", "\n</think>\n\n")
    parts = [p for piece in ("<thi", "nk>\nweigh", " it</th", "ink>\n\nIt is 4.") for p in thought.feed(piece)]
    parts += thought.flush()
    assert "".join(t for f, t in parts if f == "reasoning_content") == "\nweigh it"
    assert "".join(t for f, t in parts if f == "content") == "It is 4." and thought.saw_thought
    plain = ThoughtStream("<think>\n", "\n</think>\n\n")
    assert plain.feed("Hello") + plain.flush() == [("content", "Hello")] and not plain.saw_thought


@pytest.mark.unit
def test_serving_keys_their_rules_and_llamafactorys_environment_variables(tiny_model):
    from rayft.orchestrator.cli import api_environment
    from rayft.orchestrator.serving import replica_options

    def serve_config(*overrides, environ=None):
        raw = load_recipe(SERVE_RECIPE, [f"model_name_or_path={tiny_model}", *overrides])
        return parse_config(api_environment(raw, environ or {}), base_dir=ROOT, for_training=False)

    with pytest.raises(ConfigError, match="serve_api_key: required when serve_host is '0.0.0.0'"):
        serve_config("serve_host=0.0.0.0")
    cfg = serve_config(environ={"API_HOST": "0.0.0.0", "API_PORT": "8011", "API_KEY": KEY, "API_VERBOSE": "1",
                                "API_MODEL_NAME": "gpt-3.5-turbo", "MAX_CONCURRENT": "3"})
    s = cfg.serving
    assert (s.serve_host, s.serve_port, s.serve_api_key, s.served_model_name, s.serve_verbose,
            s.serve_max_concurrent) == ("0.0.0.0", 8011, KEY, "gpt-3.5-turbo", True, 3)
    assert serve_config("serve_port=9000", environ={"API_PORT": "8011"}).serving.serve_port == 9000  # recipe wins
    assert KEY not in json.dumps(cfg.changed_keys())
    options = replica_options(serve_config("serve_replicas=1-3", "serve_resources={CPU: 2}"))
    assert options["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 3, "initial_replicas": 1,
                                             "target_ongoing_requests": 4}
    assert options["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 0} and options["max_ongoing_requests"] == 8
    with pytest.raises(ConfigError, match="serve_replicas: '3-1' is neither"):
        serve_config("serve_replicas=3-1")
    with pytest.raises(ConfigError, match="serve_route_prefix: 'math/' must start with / and not end with one"):
        serve_config("serve_route_prefix=math/")
    with pytest.raises(ConfigError, match="serve_max_batch_size: 16 is more than the 8 requests a replica holds"):
        serve_config("serve_max_batch_size=16")
    from rayft.orchestrator.serving import run_serve, serve_spec

    with pytest.raises(ConfigError, match="--detach: leaves the application on a cluster"):
        run_serve(serve_config(), detach=True)  # refused before Ray: a local instance ends with the command

    derived = serve_spec(serve_config("serve_adapters=null", environ={"MAX_CONCURRENT": "3"}))
    assert derived.max_batch_size == 3 and derived.names == [Path(tiny_model).name]
    with pytest.raises(ConfigError, match="'demo-sft': .* holds no adapter_config.json"):
        serve_spec(serve_config("serve_adapters.demo-sft=/nonexistent/adapter"))
    with pytest.raises(ConfigError, match="serving settings are read by `rayft serve`, not by training"):
        parse_config(load_recipe(ROOT / "configs" / "demo_sft_lora.yaml", ["serve_port=9000"]), base_dir=ROOT)


@pytest.mark.unit
def test_a_reply_with_tool_calls_or_a_thought_is_read_back_in_the_templates_format(tiny_model, tmp_path):
    """The replica's reading of an answer, on the real Engine (no generation): tool calls in the qwen format become
    OpenAI tool_calls, and a reasoning template's thought becomes reasoning_content."""
    from rayft.orchestrator.serving import Engine, serve_spec

    def engine(template):
        cfg = parse_config(load_recipe(SERVE_RECIPE, [f"model_name_or_path={tiny_model}", f"template={template}",
                                                      "serve_adapters=null"]), base_dir=ROOT, for_training=False)
        return Engine(serve_spec(cfg))

    qwen = engine("qwen")
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    request = chat_request({"model": qwen.spec.base_name, "messages": [{"role": "user", "content": "1+2?"}],
                            "tools": tools}, qwen.defaults, qwen.spec.limits)
    assert "# Tools" in qwen.tokenizer.decode(qwen.prompt_ids(request))
    reply = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call><|im_end|>'
    answer = qwen._answer(request, qwen.tokenizer(reply)["input_ids"])
    assert answer.finish_reason == "tool_calls" and answer.tool_calls == [("add", '{"a": 1, "b": 2}')]
    # waiting requests with the same model and settings share one generate call and get what each alone would
    asks = [chat_request({"model": qwen.spec.base_name, "messages": [{"role": "user", "content": text}],
                          "max_tokens": 6, **extra}, qwen.defaults, qwen.spec.limits)
            for text, extra in (("hi", {"temperature": 0}), ("a longer question here", {"temperature": 0}),
                                ("hi", {"n": 2, "temperature": 0.9}))]
    jobs = [(ask, qwen.prompt_ids(ask)) for ask in asks]
    together = qwen.generate_batch(jobs)
    assert [len(a) for a in together] == [1, 1, 2]
    alone = [qwen.generate(ask, [ids])[0].text for ask, ids in jobs[:2]]
    assert [a[0].text for a in together[:2]] == alone
    thinker = engine("qwen3")
    plain = chat_request({"model": thinker.spec.base_name, "messages": [{"role": "user", "content": "2+2?"}]},
                         thinker.defaults, thinker.spec.limits)
    answer = thinker._answer(plain, thinker.tokenizer("<think>\nadd them\n</think>\n\nIt is 4.<|im_end|>")["input_ids"])
    assert (answer.reasoning, answer.text, answer.finish_reason) == ("add them", "It is 4.", "stop")


# -- one real server ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    """`rayft serve` started as users start it, with its own local Ray: the tiny model and two adapters, one an
    output folder and one a Ray checkpoint's layout (`checkpoint/` inside), under a route prefix. Stopped with
    SIGINT, as by Ctrl-C."""
    tmp = tmp_path_factory.mktemp("serve")
    first = trained_like_adapter(tiny_model, tmp / "first", seed=11)
    second = trained_like_adapter(tiny_model, tmp / "ray_checkpoint" / "checkpoint", seed=12).parent
    port = free_port()
    recipe = load_recipe(SERVE_RECIPE, [f"model_name_or_path={tiny_model}", f"serve_port={port}", "do_sample=false",
                                        "max_new_tokens=12", "serve_max_prompt_tokens=64", "serve_max_body_bytes=8192",
                                        "serve_route_prefix=/tiny", "serve_verbose=true"])
    recipe["serve_adapters"] = {"first": str(first), "second": str(second)}  # in place of the demo's adapter
    with running_server(tmp, recipe, port, "/tiny") as (process, log, base):
        yield {"base": base, "adapters": {"first": first, "second": second / "checkpoint"}, "model": tiny_model,
               "process": process, "log": log}


@contextlib.contextmanager
def running_server(tmp: Path, recipe: dict, port: int, prefix: str = ""):
    """`rayft serve RECIPE` in its own process with its own local Ray, until it answers /health; yields (process,
    log file, base URL) and stops it with SIGINT, as by Ctrl-C, checking that it ends cleanly."""
    import httpx

    (tmp / "serve.yaml").write_text(json.dumps(recipe))
    log = open(tmp / "serve.log", "w+")
    process = subprocess.Popen(
        [sys.executable, "-m", "rayft.orchestrator.cli", "serve", str(tmp / "serve.yaml")],
        stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, "API_KEY": KEY})
    base = f"http://127.0.0.1:{port}{prefix}"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(1)
    else:
        process.kill()
        log.seek(0)
        pytest.fail(f"rayft serve did not become ready:\n{log.read()[-3000:]}")
    try:
        yield process, log, base
    finally:  # stopped whatever the test found
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
    log.seek(0)
    said = log.read()
    log.close()
    assert process.returncode == 0 and "[rayft] stopping" in said, said[-2000:]  # Ctrl-C ends it cleanly


def client(server, key=KEY):
    import openai

    return openai.OpenAI(base_url=server["base"] + "/v1", api_key=key, max_retries=0, timeout=60)


def chat_answer(tiny_model, adapter) -> str:
    """What `rayft chat` answers to "hello" with this adapter (None: the base), greedily."""
    from rayft.orchestrator.chat import run_chat

    overrides = [f"model_name_or_path={tiny_model}", "do_sample=false", "max_new_tokens=12"]
    overrides += [f"adapter_name_or_path={adapter}"] if adapter else ["adapter_name_or_path=null"]
    cfg = parse_config(load_recipe(ROOT / "configs" / "chat_lora.yaml", overrides), base_dir=ROOT,
                       for_training=False)
    out = io.StringIO()
    run_chat(cfg, stdin=io.StringIO("hello\n"), out=out)
    return out.getvalue().split("Assistant: ", 1)[1].split("\nUser: ", 1)[0].strip()


@pytest.mark.integration
def test_each_served_model_answers_as_rayft_chat_does(server):
    api = client(server)
    base = Path(server["model"]).name
    assert [m.id for m in api.models.list().data] == [base, "first", "second"]
    answers = {}
    for name, adapter in [(base, None), *server["adapters"].items()]:
        reply = api.chat.completions.create(model=name, messages=[{"role": "user", "content": "hello"}],
                                            temperature=0)
        answers[name] = reply.choices[0].message.content.strip()
        assert reply.usage.completion_tokens <= 12 and reply.choices[0].finish_reason in ("stop", "length")
        assert answers[name] == chat_answer(server["model"], adapter), name
    assert len(set(answers.values())) == 3, answers  # each adapter changes the answer


@pytest.mark.integration
def test_streaming_and_completions(server):
    api = client(server)
    messages = [{"role": "user", "content": "Describe a white crow."}]
    whole = api.chat.completions.create(model="first", messages=messages, temperature=0)
    chunks = list(api.chat.completions.create(model="first", messages=messages, temperature=0, stream=True,
                                              stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    text = api.completions.create(model="second", prompt="The crow is", max_tokens=6, temperature=0)
    streamed = api.completions.create(model="second", prompt="The crow is", max_tokens=6, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == text.choices[0].text
    assert text.usage.completion_tokens <= 6


@pytest.mark.integration
def test_refusals_keys_names_bodies_and_lengths(server):
    import httpx
    import openai

    with pytest.raises(openai.AuthenticationError, match="not valid"):
        client(server, key="sk-wrong-key").models.list()
    missing = httpx.get(server["base"] + "/v1/models")
    assert missing.status_code == 401 and "Authorization: Bearer" in missing.json()["error"]["message"]
    assert httpx.get(server["base"] + "/health").json() == {"status": "ok"}  # for load balancers, no key
    api = client(server)
    with pytest.raises(openai.NotFoundError, match="'third' is not served here; served: .*first, second"):
        api.chat.completions.create(model="third", messages=[{"role": "user", "content": "hi"}])
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    url = server["base"] + "/v1/chat/completions"
    malformed = httpx.post(url, content=b'{"model": "first", "messages": [', headers=headers)
    assert malformed.status_code == 400 and "not valid JSON" in malformed.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="the prompt is .* tokens; this server takes at most 64"):
        api.chat.completions.create(model="first", messages=[{"role": "user", "content": "crow " * 80}])
    huge = httpx.post(url, content=json.dumps({"model": "first", "messages": [
        {"role": "user", "content": "x" * 9000}]}), headers=headers)
    assert huge.status_code == 413
    with pytest.raises(openai.BadRequestError, match="max_tokens: 500 is more than this server generates"):
        api.chat.completions.create(model="first", messages=[{"role": "user", "content": "hi"}], max_tokens=500)
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        api.chat.completions.create(model="first", messages=[{"role": "user", "content": "hi"}], logprobs=True)
    with pytest.raises(openai.BadRequestError, match="image parts need a vision-language model .* 'chatml' is text"):
        api.chat.completions.create(model="first", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}])
    for body in (b'{"model": "first", "messages": [{"role": "user", "content": "\\ud800"}]}',
                 b'{"model": "first", "messages": ' + b"[" * 3000 + b"]" * 3000 + b"}"):
        refused = httpx.post(url, content=body, headers=headers)  # a lone surrogate; nesting beyond the parser's
        assert refused.status_code == 400, refused.text
        assert re.search("not text|nests deeper than 32", refused.json()["error"]["message"]), refused.text
    api.chat.completions.create(model="first", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    deadline = time.monotonic() + 30  # serve_verbose: the replica's request line reaches the command's console
    while True:
        server["log"].flush()
        server["log"].seek(0)
        said = server["log"].read()
        if "v1/chat/completions: model first" in said or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert "v1/chat/completions: model first" in said
    assert KEY not in said
    # API_KEY is read by the command and taken out of its environment before Ray starts: no process sees it
    import psutil

    processes = psutil.Process(server["process"].pid).children(recursive=True)
    assert len(processes) > 3  # Ray's gcs, raylet, the controller, the proxy and the replicas
    for process in processes:
        with contextlib.suppress(psutil.Error):
            assert KEY not in process.environ().values(), process.cmdline()[:2]
    # Ray 2.60 binds the instance's ports beyond loopback; its token authentication keeps out a process without the
    # token (here: another home directory, no RAY_AUTH_TOKEN), as it would a process on another machine
    (gcs,) = [p for p in processes if p.name() == "gcs_server"]
    flags = dict(arg.lstrip("-").split("=", 1) for arg in gcs.cmdline() if arg.startswith("--") and "=" in arg)
    (port,) = {c.laddr.port for c in gcs.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN}
    address = f"{flags['node-ip-address']}:{port}"
    stranger = subprocess.run([sys.executable, "-c", f"import ray; ray.init(address={address!r})"], text=True,
                              capture_output=True, timeout=60, env={"PATH": os.environ["PATH"], "HOME": str(
                                  Path(server["log"].name).parent / "stranger")})
    assert stranger.returncode != 0 and "Authentication token is missing or incorrect" in stranger.stderr, \
        stranger.stderr[-2000:]
