"""Recipe loading, type checks, validation reports, derived values and secret masking (no Ray)."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DEMO_RECIPE, ROOT

from rayft.recipe import schema as A
from rayft.recipe.config import RecipeConfig
from rayft.recipe.loading import load_recipe
from rayft.recipe.parse import parse_config
from rayft.recipe.problems import ConfigError
from rayft.recipe.refused import NOT_BUILT
from rayft.recipe.values import mask

pytestmark = pytest.mark.unit


def parse(*overrides: str, recipe=DEMO_RECIPE) -> RecipeConfig:
    return parse_config(load_recipe(recipe, list(overrides)), base_dir=ROOT)


def problems(*overrides: str, recipe=DEMO_RECIPE) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(*overrides, recipe=recipe)
    return info.value.messages


def test_overrides_win_over_the_yaml():
    cfg = parse("lora_rank=4", "learning_rate=1e-4", "ray_num_workers=1")
    assert cfg.finetuning.lora_rank == 4
    assert cfg.training["learning_rate"] == pytest.approx(1e-4)
    assert cfg.ray.ray_num_workers == 1


def test_unknown_key_suggests_the_nearest_known_key():
    assert problems("lora_rnak=8") == ["lora_rnak: unknown key; did you mean 'lora_rank'?"]


def test_wrong_type_names_key_value_and_expected_type():
    (problem,) = problems("lora_rank=eight")
    assert problem == "lora_rank: 'eight' is a str, expected an integer"
    (problem,) = problems("placement_strategy=BALANCED")
    assert "placement_strategy: 'BALANCED'" in problem and "'STRICT_SPREAD'" in problem
    (problem,) = problems("save_strategy=no")  # YAML's boolean `no`, a common trap on the command line
    assert problem.startswith("save_strategy: False is a bool")
    assert 'quote the word, e.g. save_strategy: "no"' in problem


def test_all_problems_are_reported_together():
    found = problems("lora_rnak=8", "cutoff_len=long", "mixture_of_depths=convert", "lora_dropout=1.5")
    assert len(found) == 3, found  # value checks run only once keys and types are right
    assert any(p.startswith("lora_rnak") for p in found)
    assert any(p.startswith("cutoff_len") for p in found)
    assert any(p.startswith("mixture_of_depths") and "not built" in p for p in found)


def test_value_problems_are_reported_together():
    found = problems("lora_rank=0", "lora_dropout=1.5", "ray_num_workers=0", "deepspeed=z9")
    assert [p.split(":")[0] for p in found] == ["lora_rank", "lora_dropout", "ray_num_workers", "deepspeed"]


def test_malformed_yaml_is_a_clear_error(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("model_name_or_path: x\nlora_rank: [8\n")
    (problem,) = problems(recipe=recipe)
    assert str(recipe) in problem and "not valid YAML" in problem and "line" in problem


def test_a_recipe_must_be_a_mapping(tmp_path):
    recipe = tmp_path / "list.yaml"
    recipe.write_text("- a\n- b\n")
    assert "must be a mapping" in problems(recipe=recipe)[0]


def test_override_without_equals_is_refused():
    assert "not of the form key=value" in problems("lora_rank")[0]


@pytest.mark.parametrize("key,value", [("report_to", "comet_ml"),
                                       ("tool_format", "hermes"), ("mixture_of_depths", "convert"),
                                       ("use_unsloth", "true"), ("video_fps", "1.0"), ("fp8", "true")])
def test_unbuilt_features_are_refused_by_name(key, value):
    (problem,) = problems(f"{key}={value}")
    assert problem.startswith(f"{key}:") and "not built" in problem


def test_streaming_needs_max_steps_and_no_saved_tokens_and_bad_row_shares_are_shares():
    assert problems("streaming=true") == [
        "streaming: a streamed dataset has no length to count epochs by; set max_steps"]
    found = problems("streaming=true", "max_steps=10", "val_size=0.1", "tokenized_path=tok")
    assert len(found) == 1 and "materialises" in found[0]  # a fraction of val_size is fine: rows are counted
    cfg = parse("streaming=true", "max_steps=10", "val_size=20", "buffer_size=64")
    assert cfg.data.streaming and cfg.data.buffer_size == 64
    assert parse("buffer_size=64").data.buffer_size == 64  # every worker shuffles through a buffer
    assert problems("max_bad_row_ratio=1.5") == ["max_bad_row_ratio: must be a share between 0 and 1, got 1.5"]


def test_unbuilt_fields_at_their_default_are_accepted():
    cfg = parse("use_galore=false", "ppo_epochs=4", "packing=null")
    assert cfg.finetuning.use_galore is False


def test_every_not_built_key_is_a_real_field():
    keys = {f.name for cls in A.SECTIONS.values() for f in dataclasses.fields(cls)}
    assert set(NOT_BUILT) <= keys


def attribute_reads(root=ROOT, folders=("recipe", "orchestrator", "trainers", "data", "cluster")) -> set[str]:
    """Every attribute name the code reads (`x.name` in a load, or `getattr(x, "name")`), outside the schema."""
    import ast

    names = set()
    for path in (p for folder in folders for p in (root / folder).glob("*.py") if p.name != "schema.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                names.add(node.attr)
            elif (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "getattr" and len(node.args) > 1
                  and isinstance(node.args[1], ast.Constant)):
                names.add(node.args[1].value)
    return names


def test_every_key_is_read_by_rayft_or_refused_when_set():
    """A key no code reads would be silently ignored: each must be read as an attribute of its section (the
    code's syntax tree, not its text: a name in a string or comment does not count), or refused in NOT_BUILT."""
    read = attribute_reads()
    unread = [f.name for name, cls in A.SECTIONS.items() if name != "training" for f in dataclasses.fields(cls)
              if f.name not in NOT_BUILT and f.name not in read]
    assert unread == []
    # what the text search of old let through: named in strings and secret lists, but never read
    assert {"ms_hub_token", "om_hub_token"} <= set(NOT_BUILT) and "use_cache" in read


def test_the_key_check_sees_through_strings_and_comments(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "a.py").write_text('# lora_rank\nkey = "lora_dropout"\nvalue = cfg.finetuning.lora_alpha\n')
    read = attribute_reads(tmp_path, ("x",))
    assert read >= {"lora_alpha", "finetuning"} and not {"lora_rank", "lora_dropout"} & read


def test_derived_values_are_computed_and_noted():
    cfg = parse("lora_rank=4")
    assert cfg.finetuning.lora_alpha == 8
    assert "lora_alpha = 2 * lora_rank = 8" in cfg.notes
    assert parse("lora_alpha=3").finetuning.lora_alpha == 3
    assert cfg.finetuning.use_ref_model is False


def test_use_ref_model_follows_the_preference_loss():
    from rayft.recipe.derive import resolve

    for stage, loss, expected in (("dpo", "sigmoid", True), ("dpo", "kto_pair", True), ("dpo", "orpo", False),
                                  ("dpo", "simpo", False), ("kto", "sigmoid", True), ("rm", "sigmoid", False)):
        cfg = parse()
        cfg.finetuning.stage, cfg.finetuning.pref_loss = stage, loss
        resolve(cfg, ROOT)
        assert cfg.finetuning.use_ref_model is expected, (stage, loss)


@pytest.mark.parametrize("overrides, names", [
    (("mask_history=true", "train_on_prompt=true"), ("mask_history", "train_on_prompt")),
    (("stage=dpo", "pref_loss=orpo", "ref_model=some/model"), ("ref_model", "pref_loss", "orpo")),
    (("stage=dpo", "pref_loss=simpo", "ref_model_adapters=adapter"), ("ref_model_adapters", "simpo")),
    (("stage=sft", "pref_beta=0.2"), ("pref_beta", "stage", "'sft'")),
    (("stage=dpo", "kto_chosen_weight=2.0"), ("kto_chosen_weight", "stage: kto")),
    (("stage=dpo", "pref_loss=hinge", "dpo_label_smoothing=0.1"), ("dpo_label_smoothing", "pref_loss: sigmoid")),
    (("finetuning_type=freeze", "lora_rank=16"), ("lora_rank", "finetuning_type", "'freeze'")),
    (("finetuning_type=full", "freeze_trainable_layers=4"), ("freeze_trainable_layers", "finetuning_type")),
    (("pissa_convert=true",), ("pissa_convert", "pissa_init")),
    (("pissa_init=true", "pissa_convert=true", "deepspeed=z3"), ("pissa_convert", "deepspeed")),
    (("finetuning_type=full", "adapter_name_or_path=a"), ("adapter_name_or_path", "finetuning_type")),
    (("adapter_name_or_path=a,b", "deepspeed=z3"), ("adapter_name_or_path", "deepspeed")),
    (("compute_accuracy=true",), ("compute_accuracy", "eval_dataset")),
    (("stage=dpo", "compute_accuracy=true", "val_size=0.1"), ("compute_accuracy", "stage: sft")),
    (("finetuning_type=freeze", "freeze_trainable_layers=0"), ("freeze_trainable_layers",)),
])
def test_inconsistent_settings_are_refused_naming_both_keys(overrides, names):
    (problem,) = problems(*overrides)
    assert all(name in problem for name in names), problem


def test_consistent_method_settings_are_accepted():
    parse("stage=dpo", "pref_loss=simpo", "simpo_gamma=1.0", "pref_beta=2.0", "pref_ftx=0.1")
    parse("stage=kto", "kto_rejected_weight=1.5", "ref_model_adapters=a")
    parse("finetuning_type=freeze", "freeze_trainable_layers=-2", "freeze_extra_modules=norm")
    parse("finetuning_type=oft", "oft_block_size=16", "additional_target=lm_head")
    parse("use_dora=true", "pissa_init=true", "pissa_iter=4", "pissa_convert=true", "loraplus_lr_ratio=16")
    parse("stage=sft", "compute_accuracy=true", "val_size=0.1", "eval_strategy=steps")


def test_use_ref_model_cannot_be_set():
    assert problems("use_ref_model=true")[0].startswith("use_ref_model: use_ref_model is derived")


def test_paths_are_made_absolute():
    cfg = parse()
    assert Path(cfg.training["output_dir"]).is_absolute()
    assert cfg.ray.ray_storage_path == str(ROOT / "saves" / "ray")
    assert cfg.data.dataset_dir == str(ROOT / "data" / "demo")
    assert parse("ray_storage_path=s3://bucket/runs").ray.ray_storage_path == "s3://bucket/runs"


def test_resources_per_worker_takes_a_mapping_or_json():
    assert parse('resources_per_worker={"CPU": 2}').ray.resources_per_worker == {"CPU": 2}
    assert parse("resources_per_worker.CPU=3").ray.resources_per_worker == {"CPU": 3}
    (problem,) = problems("resources_per_worker='{CPU: 2'")
    assert problem.startswith("resources_per_worker:") and "not valid JSON" in problem
    assert problems('resources_per_worker={"CPU": -1}')[0].startswith("resources_per_worker: CPU")


def test_deepspeed_takes_a_shorthand_a_mapping_or_a_json_file(tmp_path):
    assert parse("deepspeed=z3_offload").training["deepspeed"] == "z3_offload"
    assert parse("deepspeed.zero_optimization.stage=1").training["deepspeed"]["zero_optimization"] == {"stage": 1}
    path = tmp_path / "ds.json"
    path.write_text('{"zero_optimization": {"stage": 2}}')
    assert parse(f"deepspeed={path}").training["deepspeed"] == {"zero_optimization": {"stage": 2}}
    path.write_text("{oops")
    assert "not valid JSON" in problems(f"deepspeed={path}")[0]


def test_evaluation_needs_an_eval_dataset():
    (problem,) = problems("eval_strategy=steps")
    assert problem.startswith("eval_strategy:") and "eval_dataset" in problem
    assert parse("eval_strategy=steps", "eval_steps=5", "eval_dataset=demo_sft_eval").data.eval_dataset


def test_hugging_face_checks_run_where_transformers_is():
    from rayft.trainers.training_args import transformers_problems

    ((key, message),) = transformers_problems(parse("load_best_model_at_end=true", "save_strategy=steps").training)
    assert key == "training arguments" and "load_best_model_at_end" in message
    assert transformers_problems(parse().training) == []


def test_secrets_are_masked_at_any_depth():
    cfg = parse("hf_hub_token=hf_SECRET", "ray_init_kwargs.runtime_env.env_vars.WANDB_API_KEY=k-SECRET")
    flat = cfg.to_dict()
    assert flat["hf_hub_token"] == "***"
    assert flat["ray_init_kwargs"]["runtime_env"]["env_vars"]["WANDB_API_KEY"] == "***"
    assert "SECRET" not in repr(flat)
    assert cfg.to_dict(mask_secrets=False)["hf_hub_token"] == "hf_SECRET"
    assert mask({"swanlab_api_key": "x", "my_token": "y", "plain": "z"}) == {
        "swanlab_api_key": "***", "my_token": "***", "plain": "z"}


def test_config_round_trips_across_the_worker_boundary():
    cfg = parse("lora_rank=4", "hf_hub_token=t")
    again = RecipeConfig.from_dict(cfg.to_dict(mask_secrets=False))
    assert again.to_dict(mask_secrets=False) == cfg.to_dict(mask_secrets=False)


@pytest.mark.parametrize("recipe", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_loads_and_validates(recipe):
    raw = load_recipe(recipe, [])
    if "stages" in raw:  # a pipeline: every stage's recipe is checked
        from rayft.orchestrator.pipeline import checked_configs, read

        pipeline = read(recipe, [], base_dir=ROOT)
        configs = checked_configs(pipeline, pipeline.stages, base_dir=ROOT)
        assert [c.finetuning.stage for c in configs] == ["pt", "sft", "dpo"]
        cfg = configs[-1]
    elif "sweep" in raw:  # a sweep recipe: its section and every trial's recipe are checked
        from rayft.orchestrator.sweep_spec import check_sweep

        sweep = check_sweep(raw, base_dir=ROOT)
        assert len(sweep.configs) >= 2 or (sweep.spec.draws and sweep.spec.num_samples >= 2)
        cfg = sweep.base
    elif "export_dir" in raw or "output_dir" not in raw:  # export, chat or serve: a model and adapters, no data
        cfg = parse_config(raw, base_dir=ROOT, for_training=False)
        adapters = cfg.model.adapter_name_or_path or cfg.serving.serve_adapters
        assert adapters and (cfg.model.export_dir or cfg.generating.max_new_tokens)
        return
    else:
        cfg = parse_config(raw, base_dir=ROOT)
    assert cfg.model.model_name_or_path and (cfg.data.dataset or cfg.data.eval_dataset)


@pytest.mark.integration  # a subprocess
def test_cli_refuses_a_typo_before_any_ray_work_and_creates_nothing(tmp_path):
    out = tmp_path / "out"
    storage = tmp_path / "storage"
    proc = subprocess.run(
        [sys.executable, "-m", "rayft.orchestrator.cli", "train", str(DEMO_RECIPE), "lora_rnak=8",
         f"output_dir={out}", f"ray_storage_path={storage}"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert proc.returncode == 2
    assert "did you mean 'lora_rank'?" in proc.stderr
    assert "Ray" not in proc.stdout + proc.stderr.replace("rayft", "")
    assert not out.exists() and not storage.exists()
    assert os.listdir(tmp_path) == []


# Where rayft's default differs from LLaMA-Factory 0.9.5's, and why (README, "From LLaMA-Factory").
DEFAULT_DIFFERENCES = {
    "do_train": "a recipe trains unless it says do_train: false",
    "use_cache": "prediction and chat generate with the KV cache; training turns it off either way",
    "gradient_checkpointing": "Transformers 5.23's own default (None) where 5.6 had False",
}


def test_every_llamafactory_key_is_known_with_its_default():
    """recipe/lf_keys.json is written by tools/lf_snapshot.py from an installed LLaMA-Factory 0.9.5."""
    recorded = json.loads((ROOT / "recipe" / "lf_keys.json").read_text())
    assert recorded["llamafactory"] == "0.9.5" and len(recorded["keys"]) > 340
    known = A.key_sections()
    assert [k for k in recorded["keys"] if k not in known] == []
    defaults = {}
    for cls in A.SECTIONS.values():
        for f in dataclasses.fields(cls):
            value = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            value = value.value if hasattr(value, "value") else value
            defaults.setdefault(f.name, list(value) if isinstance(value, tuple) else value)
    differ = {k for k, v in recorded["keys"].items() if defaults[k] != v["default"]}
    assert differ == set(DEFAULT_DIFFERENCES)


def test_resources_per_worker_default_is_rayfts_documented_deviation():
    # LLaMA-Factory says {"GPU": 1}; rayft leaves it unset and the planner sizes workers to the cluster.
    assert A.RayArguments().resources_per_worker is None


def test_val_size_and_eval_dataset_are_exclusive_and_checked():
    assert parse("val_size=0.1", "eval_strategy=steps").data.val_size == 0.1
    assert problems("val_size=0.1", "eval_dataset=demo_sft_eval")[0].startswith("val_size: set either")
    assert problems("val_size=2.5")[0].startswith("val_size: 2.5")


@pytest.mark.integration  # a subprocess
def test_tiny_model_cli_writes_a_model_that_loads_through_from_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    proc = subprocess.run([sys.executable, "-m", "rayft.orchestrator.cli", "tiny-model", str(tmp_path / "m"),
                           "--family", "llama"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert model.config.model_type == "llama"
    assert 1_000_000 < sum(p.numel() for p in model.parameters()) < 10_000_000
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_every_stage_has_a_spec_and_an_entry_and_a_name_that_is_no_stage_is_refused():
    from rayft.recipe.stages import STAGE_SPECS
    from rayft.trainers.stages import ENTRIES

    assert list(STAGE_SPECS) == list(ENTRIES) == ["pt", "sft", "rm", "dpo", "kto", "ppo", "grpo"]
    with pytest.raises(ConfigError) as err:
        parse("stage=orpo")
    assert err.value.messages == ["stage: 'orpo' is not a stage; choose one of pt, sft, rm, dpo, kto, ppo, grpo"]


def test_the_default_seed_is_transformers_own():
    from rayft.recipe.values import DEFAULT_SEED

    assert DEFAULT_SEED == A.default_of(A.TrainingArguments, "seed")


def test_rayft_keys_prints_type_default_and_help_for_every_key():
    from rayft.recipe.schema import describe_keys

    one = describe_keys("lora_rank")
    assert one.splitlines() == ["[finetuning]", "  lora_rank  (int, default 8)", "      Rank of the LoRA matrices."]
    ray = describe_keys("ray")
    assert "ray_num_workers  (" in ray and "[training]" not in ray
    everything = describe_keys()
    ours = [f.name for name, cls in A.SECTIONS.items() if name != "training" for f in dataclasses.fields(cls) if f.init]
    assert all(f"  {key}  (" in everything for key in ours)
    assert all(f.metadata.get("help") for name, cls in A.SECTIONS.items() if name != "training"
               for f in dataclasses.fields(cls))  # every key of ours has its line of help
    assert describe_keys("lora_rnak") is None


def test_the_readme_lists_every_refused_key_with_its_reason():
    from rayft.recipe.refused import NOT_BUILT

    readme = (ROOT / "README.md").read_text()
    by_reason: dict[str, list[str]] = {}
    for key, reason in NOT_BUILT.items():
        by_reason.setdefault(reason, []).append(key)
    for reason, keys in by_reason.items():
        assert f"- {reason}: " + ", ".join(f"`{k}`" for k in keys) in readme, reason


def test_the_key_help_says_not_built_from_the_list_that_refuses_the_key():
    from rayft.recipe.refused import NOT_BUILT

    for name, cls in A.SECTIONS.items():
        for f in dataclasses.fields(cls):
            if not f.init or f.name.startswith("_") or A.key_sections().get(f.name) != name:
                continue
            own = str(f.metadata.get("help", ""))
            assert "not built" not in own, f.name  # said once, by describe_keys, from NOT_BUILT
            shown = A.describe_keys(f.name)
            assert ("Not built (" in shown) == (f.name in NOT_BUILT), f.name
    assert "Not built (mixture of depths" in A.describe_keys("mixture_of_depths")
    assert "Not built" not in A.describe_keys("use_swanlab")
    assert "Not built" not in A.describe_keys("use_galore")
    assert "QLoRA" in A.describe_keys("quantization_bit") and "Not built" not in A.describe_keys("quantization_bit")


def test_qlora_settings_are_checked_before_anything_loads():
    assert parse("quantization_bit=4", "double_quantization=false").model.quantization_bit == 4
    assert problems("quantization_bit=3")[0].startswith("quantization_bit: bitsandbytes loads 4 or 8 bits")
    assert problems("quantization_bit=4", "quantization_method=gptq")[0].startswith(
        "quantization_method: 'gptq' needs its own GPU kernels")
    assert problems("quantization_bit=4", "finetuning_type=full")[0].startswith(
        "quantization_bit and finetuning_type: a quantised base model cannot be trained full")
    assert problems("quantization_type=fp4") == ["quantization_type and quantization_bit: quantization_type is only "
                                                 "read with quantization_bit (4 or 8); set it or remove "
                                                 "quantization_type"]


def test_llamafactory_keys_map_onto_rayfts_settings():
    cfg = parse("warmup_ratio=0.1", "warmup_steps=0", "preprocessing_num_workers=3", "enable_thinking=false",
                "default_system=S", "tool_format=glm4")
    assert cfg.args.warmup_ratio == 0.1 and cfg.data.preprocessing_num_workers == 3
    assert problems("warmup_ratio=0.1", "warmup_steps=5")[0].startswith("warmup_ratio and warmup_steps: set one")
    assert problems("warmup_ratio=1.5", "warmup_steps=0")[0].startswith("warmup_ratio: must be a fraction in [0, 1)")
    assert problems("logging_dir=tb")[0].startswith("logging_dir: is where TensorBoard writes")
    assert problems("early_stopping_steps=3")[0].startswith("early_stopping_steps: counts evaluations")
    assert problems("use_dft_loss=true", "stage=dpo", "dataset=demo_dpo")[0].startswith("use_dft_loss: weighs")
    assert problems("master_addr=10.0.0.1")[0].startswith("master_addr: a torchrun rendezvous")


def test_the_training_keys_are_transformers_own_key_by_key():
    """recipe/training_keys.json, recorded by tools/hf_training_keys.py, is what the installed Transformers'
    Seq2SeqTrainingArguments has (name, type, default, help, in order), and the schema's training section is built
    from it: every key with that type and default (do_train excepted: rayft trains unless told)."""
    import importlib.util

    tool_spec = importlib.util.spec_from_file_location("hf_training_keys", ROOT / "tools" / "hf_training_keys.py")
    tool = importlib.util.module_from_spec(tool_spec)
    tool_spec.loader.exec_module(tool)
    recorded = json.loads(A.TRAINING_KEYS_FILE.read_text())
    assert tool.snapshot() == recorded, "Transformers changed: run .venv/bin/python tools/hf_training_keys.py"
    hints = A.type_hints(A.TrainingArguments)
    for key in recorded["keys"]:
        assert hints[key["name"]] == A.annotation(key["type"]), key["name"]
        expected = True if key["name"] == "do_train" else key["default"]
        assert A.default_of(A.TrainingArguments, key["name"]) == expected, key["name"]
    assert A.rayft_training_defaults() == {"do_train": True}


@pytest.mark.unit
def test_a_resume_names_the_keys_that_change_training_and_only_those():
    from rayft.recipe.resume import recipe_changes

    saved = {"learning_rate": 1e-3, "lora_rank": 8, "cutoff_len": 256, "logging_steps": 5, "output_dir": "a",
             "ray_num_workers": 2, "eval_steps": 8, "hf_hub_token": "***", "max_steps": 12}
    now = {**saved, "learning_rate": 2e-3, "lora_rank": 16, "logging_steps": 1, "output_dir": "b",
           "ray_num_workers": 4, "eval_steps": 4, "max_steps": 12}
    # logging, evaluation, outputs and the cluster may change on a resume; the optimizer, method and data may not
    assert recipe_changes(saved, now) == ["learning_rate: 0.001 -> 0.002", "lora_rank: 8 -> 16"]
    assert recipe_changes(saved, saved) == []


@pytest.mark.unit
def test_the_resume_decision_is_fresh_same_size_or_a_conversion_between_group_sizes():
    from rayft.recipe.resume import ResumeDecision, decide_resume

    assert decide_resume(None, None, 2) == ResumeDecision("fresh")
    assert decide_resume("ckpt", None, 4) == ResumeDecision("same_size", "ckpt")  # DDP, or no ZeRO partitions
    assert decide_resume("ckpt", 2, 2) == ResumeDecision("same_size", "ckpt")
    assert decide_resume("ckpt", 2, 1) == ResumeDecision("convert", "ckpt", saved_world=2, world=1)
