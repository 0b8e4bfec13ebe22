"""A bounded load test of `rayft serve` on loopback, with LLaMA-Factory's `llamafactory-cli api` as the peer.

    .venv/bin/python benchmarks/serve_load.py [--requests 200] [--concurrency 16] [--max-tokens 32]

The server: the tiny Qwen2-style model with two LoRA adapters (random, as after training), greedy answers of at
most --max-tokens tokens, each replica holding {CPU: 1}. The load: --requests chat completions, --concurrency at
a time, from the official `openai` client (async), to the base and the two adapters in turn, each a short
question; then it stops. Each case starts its server as users do (`rayft serve`, its own local Ray instance) and
stops it with SIGINT. Cases: rayft with 1 and 2 replicas, and 1 replica answering one request per generate call
(serve_max_batch_size: 1); LLaMA-Factory 0.9.5's API server (its own virtual
environment, see vs_llamafactory.py) with one adapter, MAX_CONCURRENT=1 (its default) and both cores, sent the
same requests (it answers any model name with its one model).

Printed per case: requests/s, generated tokens/s, p50 and p99 latency, failed requests; then ratios against
LLaMA-Factory, 1 replica and unbatched. Any failed request makes the command exit non-zero.
"""

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, TINY, table, write
from vs_llamafactory import ensure_lf_venv

KEY = "sk-rayft-benchmark-key-0123456789"
QUESTIONS = ["Describe a white crow.", "What is one plus four?", "Name three colours.", "Write a short greeting."]


def random_adapters(folder: Path) -> dict[str, Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    adapters = {}
    for seed, name in enumerate(("first", "second"), start=1):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32)
        get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                         init_lora_weights=False)).save_pretrained(folder / name)
        adapters[name] = folder / name
    return adapters


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start(command: list[str], env: dict, port: int, log: Path) -> subprocess.Popen:
    import httpx

    process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        for path in ("/health", "/v1/models"):  # rayft's health route; LLaMA-Factory has none
            try:
                if httpx.get(f"http://127.0.0.1:{port}{path}", timeout=2,
                             headers={"Authorization": f"Bearer {KEY}"}).status_code == 200:
                    return process
            except httpx.HTTPError:
                pass
        time.sleep(1)
    process.kill()
    raise SystemExit(f"the server did not start; see {log}:\n{log.read_text()[-2000:]}")


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=90)
    except subprocess.TimeoutExpired:
        process.kill()


async def load(port: int, models: list[str], requests: int, concurrency: int, max_tokens: int) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=600)
    gate = asyncio.Semaphore(concurrency)
    latencies, tokens, failures = [], [], []

    async def one(i: int) -> None:
        async with gate:
            began = time.perf_counter()
            try:
                reply = await client.chat.completions.create(
                    model=models[i % len(models)], temperature=0, max_tokens=max_tokens,
                    messages=[{"role": "user", "content": f"{QUESTIONS[i % len(QUESTIONS)]} ({i})"}])
                latencies.append(time.perf_counter() - began)
                tokens.append(reply.usage.completion_tokens)
            except openai.APIError as err:
                failures.append(f"{type(err).__name__}: {err}")

    began = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(requests)))
    wall = time.perf_counter() - began
    await client.close()
    latencies.sort()
    return {"requests/s": len(latencies) / wall, "tokens/s": sum(tokens) / wall,
            "p50 s": statistics.median(latencies) if latencies else None,
            "p99 s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else None,
            "failed": len(failures), "wall s": wall, "first failures": failures[:3]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--lf-venv", default=str(ROOT / ".cache" / "lf-venv"))
    parser.add_argument("--skip-llamafactory", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="serve-load-"))
    adapters = random_adapters(work)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "OMP_", "MKL_", "API_"))}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    rows = []
    for replicas, batch in ((1, None), (2, None), (1, 1)):
        port = free_port()
        recipe = {"model_name_or_path": str(TINY), "template": "qwen", "do_sample": False,
                  "max_new_tokens": args.max_tokens, "serve_port": port, "serve_api_key": KEY,
                  "serve_adapters": {name: str(path) for name, path in adapters.items()},
                  "serve_replicas": replicas, "serve_resources": {"CPU": 1}, "serve_max_batch_size": batch}
        case = f"rayft, {replicas} replica(s)" + (", one answer per call" if batch == 1 else "")
        path = work / f"rayft-{replicas}-{batch}.yaml"
        path.write_text(json.dumps(recipe))
        print(f"{case} ...", flush=True)
        process = start([sys.executable, "-m", "rayft.orchestrator.cli", "serve", str(path)], env, port,
                        work / f"rayft-{replicas}-{batch}.log")
        try:
            result = asyncio.run(load(port, [TINY.name, *adapters], args.requests, args.concurrency,
                                      args.max_tokens))
        finally:
            stop(process)
        rows.append({"case": case, **result})
    if not args.skip_llamafactory:
        lf_cli = ensure_lf_venv(Path(args.lf_venv))
        port = free_port()
        path = work / "llamafactory.yaml"
        path.write_text(json.dumps({"model_name_or_path": str(TINY), "adapter_name_or_path": str(adapters["first"]),
                                    "template": "qwen", "finetuning_type": "lora", "do_sample": False,
                                    "max_new_tokens": args.max_tokens, "infer_backend": "huggingface"}))
        print("llamafactory-cli api ...", flush=True)
        lf_env = {**env, "API_PORT": str(port), "API_HOST": "127.0.0.1", "API_KEY": KEY, "API_VERBOSE": "0",
                  "DISABLE_VERSION_CHECK": "1"}
        process = start([str(lf_cli), "api", str(path)], lf_env, port, work / "llamafactory.log")
        try:
            result = asyncio.run(load(port, ["first"], args.requests, args.concurrency, args.max_tokens))
        finally:
            stop(process)
        rows.append({"case": "LLaMA-Factory 0.9.5 api", **result})
    print(table(rows, ["case", "requests/s", "tokens/s", "p50 s", "p99 s", "failed", "wall s"]))
    one = rows[0]
    print(f"2 replicas / 1 replica, tokens/s: {rows[1]['tokens/s'] / one['tokens/s']:.2f}x")
    print(f"1 replica, batched / one answer per call, tokens/s: {one['tokens/s'] / rows[2]['tokens/s']:.2f}x")
    if not args.skip_llamafactory:
        peer = rows[-1]
        for row in rows[:2]:
            print(f"{row['case']} / LLaMA-Factory, tokens/s: {row['tokens/s'] / peer['tokens/s']:.2f}x; "
                  f"p50: {row['p50 s'] / peer['p50 s']:.2f}x")
    print(f"results: {write('serve_load', {'args': vars(args), 'rows': rows})}")
    failed = sum(row["failed"] for row in rows)
    if failed:
        raise SystemExit(f"{failed} request(s) failed: {[row['first failures'] for row in rows if row['failed']]}")


if __name__ == "__main__":
    main()
