"""The `rayft` command: train (or predict), pipeline, sweep, plan, export, chat, serve, data, tokenize, submit (as a Ray
job), status, logs, keys and tiny-model. Every error a user can cause ends the command with one message per problem and
exit status 2."""

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from rayft.data.errors import DataError
from rayft.recipe.loading import load_recipe
from rayft.recipe.logs import DEFAULT, QUIET, VERBOSE, configure, logger
from rayft.recipe.problems import ConfigError, Problem
from rayft.trainers import without_bitsandbytes

if TYPE_CHECKING:
    from rayft.recipe.config import RecipeConfig

USAGE_ERROR = 2

# The commands that read a recipe, with their help text. Each command imports the modules it needs when it runs
# (below): keys, plan, submit, status, logs, train, sweep and tokenize never import torch or Transformers (the
# driver's helper process does, for plan, train, sweep and tokenize); chat, export, data and serve load them.
RECIPE_COMMANDS = {
    "train": "run a distributed fine-tuning job (or generation, with do_train: false and predict_with_generate)",
    "sweep": "search the recipe's sweep section with Ray Tune, each trial a training run",
    "pipeline": "train a pipeline file's stages one after another (pt -> sft -> dpo); a rerun goes on where it stopped",
    "plan": "validate a recipe (or every stage of a pipeline) and its data on the cluster and print the plan",
    "export": "merge adapter_name_or_path into the base model and save it to export_dir",
    "chat": "talk to the model plus adapter_name_or_path in the terminal",
    "data": "write the first encoded examples of every dataset as JSON Lines, as the workers will get them",
    "tokenize": "read, convert and tokenise the datasets on the cluster into their cache, for later runs to reuse",
    "serve": "serve the model and its adapters behind an OpenAI-compatible API on Ray Serve",
}

# LLaMA-Factory's `llamafactory-cli api` reads these environment variables; `rayft serve` takes them as the default
# of the key beside each when the recipe leaves it out, so that launch scripts written for it keep working.
API_ENVIRONMENT = {"API_HOST": "serve_host", "API_PORT": "serve_port", "API_KEY": "serve_api_key",
                   "API_MODEL_NAME": "served_model_name", "API_VERBOSE": "serve_verbose",
                   "MAX_CONCURRENT": "serve_max_concurrent"}


# Commands whose own process never loads a model (workers, generation actors and serving replicas are processes of
# their own). Their process is told there is no bitsandbytes before anything imports PEFT, which would import it
# and torch.compile's machinery with it: about 2.5 s of every such command on a 2-core machine.
NO_MODEL_IN_PROCESS = {"train", "pipeline", "sweep", "plan", "data", "tokenize", "submit", "serve"}


def main(argv: list[str] | None = None) -> int:
    """The command line; `argv` None is the `rayft` command's own process (the console script)."""
    args = parser().parse_args(argv)
    if argv is None and args.command in NO_MODEL_IN_PROCESS:
        without_bitsandbytes()
    configure(VERBOSE if args.verbose else QUIET if args.quiet else DEFAULT)
    if args.command == "tiny-model":
        return _tiny_model(args)
    if args.command == "keys":
        return _keys(args)
    if args.command in ("status", "logs"):
        return _job(args)
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, DataError) as err:
        print(f"rayft: {_one_report(err)}", file=sys.stderr)
        return USAGE_ERROR


def parser() -> argparse.ArgumentParser:
    """The command line, with --verbose / --quiet on every command."""
    root = argparse.ArgumentParser(prog="rayft", description=__doc__, parents=[loudness_flags(False)])
    # after the command too; its parser must not put back a default over `rayft -v train ...`
    common = loudness_flags(argparse.SUPPRESS)
    sub = root.add_subparsers(dest="command", required=True)
    for name, help_text in RECIPE_COMMANDS.items():
        p = sub.add_parser(name, help=help_text, parents=[common])
        p.add_argument("recipe", help="YAML recipe", **({"nargs": "?"} if name == "sweep" else {}))
        p.add_argument("overrides", nargs="*", help="key=value overrides, applied last")
        if name == "sweep":
            p.add_argument("--status", metavar="OUTPUT_DIR",
                           help="print the table of the sweep in OUTPUT_DIR (running, interrupted or ended) and return")
        if name == "serve":
            mode = p.add_mutually_exclusive_group()
            mode.add_argument("--detach", action="store_true",
                              help="leave the application running on the cluster at ray_address and return")
            mode.add_argument("--stop", action="store_true",
                              help="remove the application serve_name from the cluster at ray_address")
        if name == "data":
            p.add_argument("--examples", type=int, default=10, help="examples of each dataset (default 10)")
            p.add_argument("--out", default="encoded_examples.jsonl", help="the JSON Lines file to write")
    submit = sub.add_parser("submit", help="validate a recipe here, then run it as a job on a Ray cluster",
                            parents=[common])
    submit.add_argument("recipe", help="YAML recipe, relative to the working directory")
    submit.add_argument("overrides", nargs="*", help="key=value overrides, applied last")
    submit.add_argument("--address", required=True, help="the cluster's job API, e.g. http://HEAD:8265")
    submit.add_argument("--working-dir", default=".", help="uploaded as the job's working directory")
    submit.add_argument("--no-wait", action="store_true", help="return after submitting, without following")
    for name, help_text in (("status", "print a job's status"), ("logs", "print a job's logs")):
        p = sub.add_parser(name, help=help_text, parents=[common])
        p.add_argument("job_id")
        p.add_argument("--address", required=True, help="the cluster's job API, e.g. http://HEAD:8265")
        if name == "logs":
            p.add_argument("--follow", action="store_true", help="keep printing until the job ends")
    keys = sub.add_parser("keys", help="list the recipe keys with type, default and help", parents=[common])
    keys.add_argument("which", nargs="?", help="a section (model, data, finetuning, generating, ray, serving, "
                                               "training) or a key; all keys when left out")
    expand = sub.add_parser("expand", help="LLaMA Pro: insert identity-initialised blocks into a model and save it",
                            parents=[common])
    expand.add_argument("model_dir", help="the model folder to expand")
    expand.add_argument("out_dir", help="a new folder for the expanded model and its tokenizer")
    expand.add_argument("--num-expand", type=int, required=True,
                        help="blocks to insert, one after every num_layers / num_expand (must divide num_layers)")
    tiny = sub.add_parser("tiny-model", help="write a tiny random causal LM and tokenizer for dry runs",
                          parents=[common])
    tiny.add_argument("out_dir")
    tiny.add_argument("--family", choices=("qwen2", "llama", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava",
                                           "llava_next", "gemma3", "mllama"),
                      default="qwen2", help="qwen2_vl, qwen2_5_vl (template qwen2_vl), qwen3_vl (template qwen3_vl), "
                                            "llava (template llava), llava_next (template llava_next), gemma3 "
                                            "(template gemma3) and mllama (template mllama): a vision-language "
                                            "model with its image processor")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--layers", type=int, default=4, help="transformer blocks (default 4)")
    return root


def loudness_flags(default) -> argparse.ArgumentParser:
    """--verbose / --quiet, as a parent parser (a fresh one for each parser: parents share their actions)."""
    flags = argparse.ArgumentParser(add_help=False)
    loudness = flags.add_mutually_exclusive_group()
    loudness.add_argument("-v", "--verbose", action="store_true", default=default,
                          help="show everything, libraries' output included")
    loudness.add_argument("-q", "--quiet", action="store_true", default=default, help="show only warnings and errors")
    return flags


def _config(args, for_training: bool = True) -> "RecipeConfig":
    """The command's recipe with its overrides, checked against the schema."""
    from rayft.recipe.parse import parse_config

    return parse_config(load_recipe(args.recipe, args.overrides), for_training=for_training)


# The driver's helper process (orchestrator/helper.py) is started before the driver's own heavier modules (Ray Data,
# Ray Train) are imported: the two import side by side, about 2 s of every such command here.


def _train(args) -> int:
    from rayft.orchestrator.helper import driver_helper
    from rayft.recipe.derive import is_prediction

    cfg = _config(args)
    if is_prediction(cfg):
        from rayft.orchestrator.predict import run_predict

        run_predict(cfg)
        return 0
    started = time.time()
    with driver_helper("rayft train") as helper:
        from rayft.orchestrator.launch import run_train

        result = run_train(cfg, helper)
    _summarise(cfg, result, started)
    return 0


def _pipeline(args) -> int:
    from rayft.orchestrator.pipeline import run_pipeline

    run_pipeline(args.recipe, args.overrides)
    return 0


def _plan(args) -> int:
    from rayft.orchestrator.helper import driver_helper
    from rayft.recipe.derive import is_prediction
    from rayft.recipe.pipeline import is_pipeline

    if is_pipeline(load_recipe(args.recipe, [])):
        from rayft.orchestrator.pipeline import run_plan_pipeline

        run_plan_pipeline(args.recipe, args.overrides)
        return 0
    cfg = _config(args)
    if is_prediction(cfg):
        from rayft.orchestrator.predict import plan_predict

        plan_predict(cfg)
        return 0
    with driver_helper("rayft plan") as helper:
        from rayft.orchestrator.launch import run_plan

        run_plan(cfg, helper)
    return 0


def _tokenize(args) -> int:
    from rayft.orchestrator.helper import driver_helper

    cfg = _config(args)
    with driver_helper("rayft tokenize") as helper:
        from rayft.orchestrator.launch import run_tokenize

        kept = run_tokenize(cfg, helper)
    for split, where in kept.items():
        logger.info(f"{split}: tokenised data kept in {where}")
    return 0


def _sweep(args) -> int:
    if args.status is not None:
        if args.recipe is not None:
            raise ConfigError([Problem("--status", "give either a recipe to run or --status OUTPUT_DIR, not both")])
        return _sweep_status(Path(args.status))
    if args.recipe is None:
        raise ConfigError([Problem("recipe", "give the sweep's recipe, or --status OUTPUT_DIR to see a sweep")])
    from rayft.orchestrator.helper import driver_helper

    raw = load_recipe(args.recipe, args.overrides)
    with driver_helper("rayft sweep") as helper:
        from rayft.orchestrator.sweep import run_sweep

        run_sweep(raw, helper=helper)
    return 0


def _sweep_status(output_dir: Path) -> int:
    """`rayft sweep --status OUTPUT_DIR`: the sweep's table from its output_dir (no Ray, no recipe)."""
    from rayft.orchestrator.sweep_results import TRIALS_FILE, format_table, progress_rows

    if not (output_dir / TRIALS_FILE).is_file():
        raise ConfigError([Problem("--status", f"{output_dir} holds no sweep (no {TRIALS_FILE}); give the output_dir "
                                               "of a sweep's recipe")])
    record, rows, ended = progress_rows(output_dir)
    done = sum(r.get("status") == "TERMINATED" or r.get("state") == "completed" for r in rows)
    state = "ended" if ended else "not ended (running, or interrupted: rerun its command to resume it)"
    print(f"sweep {record['run_name']!r} in {output_dir}: {state}; {len(rows)} trials, {done} finished"
          + (f"; metric {record['metric']} ({record['mode']})" if "metric" in record else ""))
    print(format_table(rows))
    return 0


def _export(args) -> int:
    from rayft.orchestrator.export import run_export

    run_export(_config(args, for_training=False))
    return 0


def _data(args) -> int:
    from rayft.orchestrator.inspect_data import write_examples

    if args.examples < 1:
        raise ConfigError([Problem("--examples", f"must be at least 1, got {args.examples}")])
    write_examples(_config(args, for_training=False), args.examples, Path(args.out))
    return 0


def _chat(args) -> int:
    from rayft.orchestrator.chat import run_chat

    run_chat(_config(args, for_training=False))
    return 0


def _serve(args) -> int:
    from rayft.orchestrator.serving import run_serve, stop_serve
    from rayft.recipe.parse import parse_config

    raw = load_recipe(args.recipe, args.overrides)
    cfg = parse_config(api_environment(raw, os.environ), for_training=False)
    # read once: a local Ray instance started below would hand it to every process (the replicas get its digest)
    os.environ.pop("API_KEY", None)
    if os.environ.get("FASTAPI_ROOT_PATH"):
        logger.info("FASTAPI_ROOT_PATH is set: in LLaMA-Factory it only moves the /docs page, which rayft does not "
                    f"serve; the API answers at {cfg.serving.serve_route_prefix.rstrip('/')}/v1 (serve_route_prefix)")
    if args.stop:
        stop_serve(cfg)
    else:
        run_serve(cfg, detach=args.detach)
    return 0


def api_environment(raw: dict, environ) -> dict:
    """The recipe with LLaMA-Factory's API_* and MAX_CONCURRENT variables filling the serving keys it leaves out
    (API_PORT and MAX_CONCURRENT as numbers, API_VERBOSE true for 1 / true / yes / on)."""
    filled = dict(raw)
    for variable, key in API_ENVIRONMENT.items():
        if key not in raw and environ.get(variable):
            value = environ[variable]
            if key == "serve_verbose":
                filled[key] = value.lower() in ("1", "true", "yes", "on")
            elif key in ("serve_port", "serve_max_concurrent"):
                filled[key] = int(value) if value.strip().isdigit() else value
            else:
                filled[key] = value
    return filled


def _submit(args) -> int:
    from rayft.orchestrator import submit
    from rayft.recipe.parse import parse_config
    from rayft.recipe.pipeline import is_pipeline

    command = "train"
    if is_pipeline(load_recipe(Path(args.working_dir) / args.recipe, [])):  # one job runs every stage
        from rayft.orchestrator.pipeline import checked_configs, read

        pipeline = read(Path(args.working_dir) / args.recipe, args.overrides, base_dir=args.working_dir)
        submit.require_absolute_outputs({**pipeline.stages[0].keys, "output_dir": str(pipeline.output_dir)})
        cfg, command = checked_configs(pipeline, pipeline.stages, args.working_dir)[0], "pipeline"
    else:
        raw = load_recipe(Path(args.working_dir) / args.recipe, args.overrides)
        submit.require_absolute_outputs(raw)
        cfg = parse_config(raw, base_dir=args.working_dir)
    try:
        _, status = submit.submit(cfg, args.recipe, args.overrides, args.address, args.working_dir,
                                  wait=not args.no_wait, command=command)
    except ConnectionError as err:
        raise ConfigError([Problem("--address", f"cannot reach the job API at {args.address} ({err})")]) from None
    return 0 if status in ("SUCCEEDED", "PENDING") else 1


def _expand(args) -> int:
    from rayft.trainers.llama_pro import expand_blocks

    out = expand_blocks(args.model_dir, args.out_dir, args.num_expand)
    logger.info(f"expanded model written to {out}; fine-tune its new blocks with: model_name_or_path: {out}, "
                f"finetuning_type: freeze (or lora), freeze_trainable_layers: {args.num_expand}, use_llama_pro: true")
    return 0


COMMANDS = {"train": _train, "pipeline": _pipeline, "plan": _plan, "sweep": _sweep, "export": _export, "chat": _chat,
            "submit": _submit, "data": _data, "tokenize": _tokenize, "serve": _serve, "expand": _expand}


def _one_report(err: Exception) -> str:
    """One problem on one line; several as a header and one line each."""
    problems = getattr(err, "messages", None)
    if problems and len(problems) == 1:
        return problems[0]
    return str(err)


def _summarise(cfg: "RecipeConfig", result, started: float) -> None:
    output_dir = Path(cfg.args.output_dir)
    results_file = output_dir / "all_results.json"
    metrics = json.loads(results_file.read_text()) if results_file.is_file() else {}
    shown = ", ".join(f"{key} {metrics[key]:.4f}" for key in ("train_loss", "eval_loss", "train_runtime",
                                                               "train_samples_per_second") if key in metrics)
    logger.info(f"training finished: {shown}")
    if "resizes" in metrics:
        logger.info(f"elastic: {metrics['resizes']} resize(s), group sizes {metrics['world_sizes']}, ended with "
                    f"{metrics['world_size']} worker(s); each resize is a trainer_log.jsonl record with "
                    "previous_world_size")
    entries = sorted(output_dir.iterdir())
    written = [p for p in entries if p.stat().st_mtime >= started - 1]  # an earlier run's, with overwrite_output_dir
    files = ", ".join(f"{p.name}{'/' if p.is_dir() else ''}" for p in written)
    left = f" ({len(entries) - len(written)} entries from before left there)" if len(written) < len(entries) else ""
    logger.info(f"outputs in {output_dir}: {files}{left}")
    if result.path:  # none for a run in the driver's own process (Ray Train's local mode)
        logger.info(f"Ray results in {result.path}")


def _keys(args) -> int:
    from rayft.recipe.schema import describe_keys

    text = describe_keys(args.which)
    if text is None:
        print(f"rayft: keys: {args.which!r} is neither a section nor a recipe key; run `rayft keys` for all of them",
              file=sys.stderr)
        return USAGE_ERROR
    print(text)
    if args.which in ("template", "tool_format"):
        from rayft.data.templates import template_names
        from rayft.data.tools import TOOL_FORMATS

        names = template_names() if args.which == "template" else list(TOOL_FORMATS)
        print(f"  values: {', '.join(names)}")
    return 0


def _job(args) -> int:
    from rayft.orchestrator import submit

    try:
        jobs = submit.client(args.address)
    except ConnectionError as err:
        print(f"rayft: {args.command}: cannot reach the job API at {args.address} ({err}); check --address",
              file=sys.stderr)
        return USAGE_ERROR
    if args.command == "status":
        status = str(jobs.get_job_status(args.job_id)).split(".")[-1]
        print(status)
        return 1 if status in ("FAILED", "STOPPED") else 0
    if args.follow:
        return 0 if submit.follow(jobs, args.job_id) == "SUCCEEDED" else 1
    print(jobs.get_job_logs(args.job_id), end="")
    return 0


def _tiny_model(args) -> int:
    import rayft.data  # the demo data's folder; like the commands above, imported only by the command that runs
    from rayft.trainers.tiny_model import write_tiny_model

    demo = Path(rayft.data.__file__).parent / "demo"
    out = write_tiny_model(args.out_dir, sorted(demo.glob("demo_*.json")), family=args.family, seed=args.seed,
                           num_layers=args.layers)
    logger.info(f"tiny {args.family} model and tokenizer written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
