"""The `rayft` command: train (or predict), sweep, plan, export, chat, submit (as a Ray job), status, logs and
tiny-model."""

import argparse
import json
import sys
from pathlib import Path

from rayft.data.errors import DataError
from rayft.orchestrator.config import ConfigError, is_prediction, load_recipe, parse_config

USAGE_ERROR = 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rayft", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("train", "run a distributed fine-tuning job (or generation, with do_train: false "
                                      "and predict_with_generate)"),
                            ("sweep", "search the recipe's sweep section with Ray Tune, each trial a training run"),
                            ("plan", "validate a recipe and its data on the cluster and print the plan"),
                            ("export", "merge adapter_name_or_path into the base model and save it to export_dir"),
                            ("chat", "talk to the model plus adapter_name_or_path in the terminal")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("recipe", help="YAML recipe")
        p.add_argument("overrides", nargs="*", help="key=value overrides, applied last")
    submit = sub.add_parser("submit", help="validate a recipe here, then run it as a job on a Ray cluster")
    submit.add_argument("recipe", help="YAML recipe, relative to the working directory")
    submit.add_argument("overrides", nargs="*", help="key=value overrides, applied last")
    submit.add_argument("--address", required=True, help="the cluster's job API, e.g. http://HEAD:8265")
    submit.add_argument("--working-dir", default=".", help="uploaded as the job's working directory")
    submit.add_argument("--no-wait", action="store_true", help="return after submitting, without following")
    for name, help_text in (("status", "print a job's status"), ("logs", "print a job's logs")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("job_id")
        p.add_argument("--address", required=True, help="the cluster's job API, e.g. http://HEAD:8265")
        if name == "logs":
            p.add_argument("--follow", action="store_true", help="keep printing until the job ends")
    tiny = sub.add_parser("tiny-model", help="write a tiny random causal LM and tokenizer for dry runs")
    tiny.add_argument("out_dir")
    tiny.add_argument("--family", choices=("qwen2", "llama"), default="qwen2")
    tiny.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.command == "tiny-model":
        return _tiny_model(args)
    if args.command in ("status", "logs"):
        return _job(args)
    try:
        if args.command == "submit":
            return _submit(args)
        if args.command == "export":
            from rayft.orchestrator.export import run_export

            run_export(parse_config(load_recipe(args.recipe, args.overrides), for_training=False))
            return 0
        if args.command == "chat":
            from rayft.orchestrator.chat import run_chat

            run_chat(parse_config(load_recipe(args.recipe, args.overrides), for_training=False))
            return 0
        if args.command == "sweep":
            from rayft.orchestrator.sweep import run_sweep

            run_sweep(load_recipe(args.recipe, args.overrides))
            return 0
        cfg = parse_config(load_recipe(args.recipe, args.overrides))
        if args.command == "plan":
            if is_prediction(cfg.training):
                from rayft.orchestrator.predict import plan_predict

                plan_predict(cfg)
                return 0
            from rayft.orchestrator.launch import run_plan

            run_plan(cfg)
            return 0
        if is_prediction(cfg.training):
            from rayft.orchestrator.predict import run_predict

            run_predict(cfg)
            return 0
        from rayft.orchestrator.launch import run_train

        result = run_train(cfg)
    except (ConfigError, DataError) as err:
        print(f"rayft: {err}", file=sys.stderr)
        return USAGE_ERROR
    _summarise(cfg, result)
    return 0


def _summarise(cfg, result) -> None:
    output_dir = Path(cfg.training["output_dir"])
    results_file = output_dir / "all_results.json"
    metrics = json.loads(results_file.read_text()) if results_file.is_file() else {}
    print("\n[rayft] training finished")
    for key in ("train_loss", "eval_loss", "train_runtime", "train_samples_per_second"):
        if key in metrics:
            print(f"  {key:26s} {metrics[key]:.4f}")
    print(f"  outputs                    {output_dir}")
    for path in sorted(output_dir.iterdir()):
        print(f"    {path.name}{'/' if path.is_dir() else ''}")
    print(f"  Ray results                {result.path}")


def _submit(args) -> int:
    from rayft.orchestrator import submit

    raw = load_recipe(Path(args.working_dir) / args.recipe, args.overrides)
    submit.require_absolute_outputs(raw)
    cfg = parse_config(raw, base_dir=args.working_dir)
    _, status = submit.submit(cfg, args.recipe, args.overrides, args.address, args.working_dir, wait=not args.no_wait)
    return 0 if status in ("SUCCEEDED", "PENDING") else 1


def _job(args) -> int:
    from rayft.orchestrator import submit

    jobs = submit.client(args.address)
    if args.command == "status":
        status = str(jobs.get_job_status(args.job_id)).split(".")[-1]
        print(status)
        return 1 if status in ("FAILED", "STOPPED") else 0
    if args.follow:
        return 0 if submit.follow(jobs, args.job_id) == "SUCCEEDED" else 1
    print(jobs.get_job_logs(args.job_id), end="")
    return 0


def _tiny_model(args) -> int:
    import rayft.data
    from rayft.trainers.tiny_model import write_tiny_model

    demo = Path(rayft.data.__file__).parent / "demo"
    out = write_tiny_model(args.out_dir, sorted(demo.glob("demo_*.json")), family=args.family, seed=args.seed)
    print(f"[rayft] tiny {args.family} model and tokenizer written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
