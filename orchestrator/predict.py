"""Generative evaluation and prediction (`do_train: false` with `predict_with_generate`).

Ray Data spreads the prompts over `ray_num_workers` generation actors, each holding the model with its
adapters merged; the driver gathers the answers in the dataset's order, scores them and writes the files.
"""

import json
import math
import time
from collections import Counter
from pathlib import Path

import ray.data

from rayft.cluster.session import cluster_nodes, local_machine, ray_session
from rayft.data.errors import DataError
from rayft.data.pipeline import (
    EncodingSettings,
    check_encoding,
    encode_batch,
    encode_prompt_batch,
    load_datasets,
    on_examples,
)
from rayft.data.tokenizer import TokenizerSpec
from rayft.orchestrator.launch import configure_ray_data, refuse_occupied
from rayft.orchestrator.plan import placement_problems, worker_resources
from rayft.recipe.config import RecipeConfig
from rayft.recipe.logs import logger
from rayft.recipe.problems import ConfigError
from rayft.trainers.generate import Generator
from rayft.trainers.metrics import similarity_scores

PREDICTIONS_FILE = "generated_predictions.jsonl"
ACTOR_START_TIMEOUT_S = 600  # a cluster that cannot start the generation actors in this time fails the run


def prepare_predict(cfg: RecipeConfig) -> list[dict]:
    """Everything checked before Ray: output_dir, the examples of eval_dataset, and (for a local run) the
    actors' resources. Returns the examples."""
    d, t = cfg.data, cfg.args
    refuse_occupied(Path(t.output_dir), t.overwrite_output_dir)
    settings = EncodingSettings.of(cfg)
    settings.chat_template()  # an unknown or multimodal template is refused before any data is read
    datasets = load_datasets(d.eval_dataset, d.dataset_dir, d.max_samples, seed=t.seed, token=cfg.model.hf_hub_token,
                             stage="sft", template=d.template, tool_format=d.tool_format,
                             max_bad_ratio=d.max_bad_row_ratio)
    examples = [example for dataset in datasets for example in dataset]
    if not examples:
        raise DataError(f"eval_dataset {d.eval_dataset!r}: no examples to generate for")
    check_encoding(d.eval_dataset, datasets, TokenizerSpec.of(cfg.model), settings, encode_batch)
    if cfg.ray.ray_address is None:
        _resources(cfg, local_machine(), announce=False)  # refuse an impossible request before Ray starts
    return examples


def plan_predict(cfg: RecipeConfig) -> dict:
    """`rayft plan` for a prediction recipe: the checks, then the generation actors the cluster will hold."""
    examples = prepare_predict(cfg)
    with ray_session(cfg.ray):
        resources = _resources(cfg, cluster_nodes())
    batch_size = cfg.args.per_device_eval_batch_size
    logger.info(f"prediction plan: {len(examples)} examples of {cfg.data.eval_dataset}, {cfg.ray.max_workers} "
        f"generation worker(s) of {resources}, {batch_size} prompts per batch, up to "
        f"{cfg.generating.max_new_tokens} new tokens each")
    return resources


def run_predict(cfg: RecipeConfig) -> dict:
    """Generates an answer for every example of eval_dataset; returns the scores (also written to
    `{predict|eval}_results.json`; with do_predict every answer goes to generated_predictions.jsonl)."""
    t = cfg.args
    output_dir = Path(t.output_dir)
    examples = prepare_predict(cfg)
    prefix = "predict" if t.do_predict else "eval"
    with ray_session(cfg.ray):
        resources = _resources(cfg, cluster_nodes())
        start = time.time()
        rows = generate(cfg, examples, resources)
        runtime = time.time() - start
    scores = similarity_scores([r["predict"] for r in rows], [r["label"] for r in rows])
    metrics = {**{f"{prefix}_{k}": round(v, 4) for k, v in scores.items()}, f"{prefix}_samples": len(rows),
               f"{prefix}_runtime": round(runtime, 3), f"{prefix}_samples_per_second": round(len(rows) / runtime, 3)}
    output_dir.mkdir(parents=True, exist_ok=True)
    if prefix == "predict":
        with (output_dir / PREDICTIONS_FILE).open("w") as f:
            for row in rows:
                f.write(json.dumps({k: row[k] for k in ("prompt", "predict", "label")}, ensure_ascii=False) + "\n")
    (output_dir / f"{prefix}_results.json").write_text(json.dumps(metrics, indent=2))
    (output_dir / "all_results.json").write_text(json.dumps(metrics, indent=2))
    for key, value in metrics.items():
        logger.info(f"  {key:32s} {value}")
    logger.info(f"{prefix} results in {output_dir}")
    return metrics


def generate(cfg: RecipeConfig, examples: list[dict], resources: dict) -> list[dict]:
    """Prompts are encoded by Ray Data tasks and answered by one actor per worker; rows in dataset order."""


    configure_ray_data()
    d, r = cfg.data, cfg.ray
    batch_size = cfg.args.per_device_eval_batch_size
    # as in training's tokenisation, each example travels as one JSON string (data.pipeline.on_examples)
    kept = ("system", "messages", "images", "image_sizes")  # an example's images travel as their paths and sizes
    items = [{"example": json.dumps({"index": i, **{k: e[k] for k in kept if e.get(k)}}, ensure_ascii=False)}
             for i, e in enumerate(examples)]
    prompts = ray.data.from_items(items).map_batches(
        on_examples(encode_prompt_batch), batch_size=d.preprocessing_batch_size, fn_kwargs=dict(
            tokenizer_spec=TokenizerSpec.of(cfg.model), settings=EncodingSettings.of(cfg)))
    # one block per generation batch, so that every actor gets work
    prompts = prompts.repartition(max(r.max_workers, math.ceil(len(examples) / batch_size))).materialize()
    truncated = sum(row["truncated"] > 0 for row in prompts.select_columns(["truncated"]).iter_rows())
    if truncated:
        logger.info(f"{truncated} prompts are longer than cutoff_len={d.cutoff_len}; they keep their last tokens")
    use_gpu = resources.get("GPU", 0) > 0
    logger.info(f"generating for {len(examples)} examples with {r.max_workers} worker(s) of {resources}, "
        f"{batch_size} prompts per batch")
    # Every actor loads its model before the first batch is handed out, and holds one batch at a time: else
    # the first actor ready can take every batch of a small dataset while the others still load.
    ray.data.DataContext.get_current().wait_for_min_actors_s = ACTOR_START_TIMEOUT_S
    answers = prompts.drop_columns(["truncated"]).map_batches(
        Generator, batch_size=batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=r.max_workers, max_tasks_in_flight_per_actor=1),
        fn_constructor_kwargs={"recipe": cfg.to_dict(mask_secrets=False), "use_gpu": use_gpu},
        num_cpus=resources.get("CPU", 0), num_gpus=resources.get("GPU", 0),
        resources={k: v for k, v in resources.items() if k not in ("CPU", "GPU", "memory")} or None,
        memory=resources.get("memory"))
    rows = sorted(answers.take_all(), key=lambda row: row["index"])
    for worker, count in sorted(Counter(str(row["worker"]) for row in rows).items()):
        logger.info(f"worker {worker} (node/pid) answered {count} prompts")
    return [{k: (str(v) if k != "index" else int(v)) for k, v in row.items()} for row in rows]


def _resources(cfg: RecipeConfig, nodes, announce: bool = True) -> dict:
    """One generation actor's resources, refused when the cluster cannot hold ray_num_workers of them."""
    r = cfg.ray
    bundle, why = worker_resources(cfg, nodes)
    whole_node = max((n.resources.get("CPU", 0) for n in nodes), default=0)
    if why and r.max_workers == 1 and "GPU" not in bundle and bundle["CPU"] >= whole_node > 1:
        # Ray Data (2.60) never hands a batch to a pool whose one actor holds every CPU of its node: the run
        # waits for ever (seen with ray_num_workers=1 on a 2-CPU local instance). One CPU stays free.
        bundle = {"CPU": int(whole_node) - 1}
        why = (f"resources_per_worker unset: {bundle['CPU']} CPU(s) for the one generation worker, a node's CPUs "
               "but one (Ray Data stalls an actor that holds every CPU of its node)")
    if why and announce:
        logger.info(f"generation actors: {why}")
    problems = placement_problems(bundle, r.max_workers, "PACK", nodes)
    if problems:
        raise ConfigError(problems)
    return bundle
