"""LLaMA-Factory's own recipes, written with the keys its examples use, run unchanged but for the model path,
`dataset_dir` and `output_dir` (a recipe for Llama 3 takes the tiny Qwen2's template with it; plus rayft's storage
folder and, to keep the suite short, max_steps).

configs/llamafactory/examples/ mirrors LLaMA-Factory's examples/ folder, so a relative `deepspeed:` path reads
as it does there. Every recipe is planned here (on the driver, no Ray: its datasets read and a sample encoded);
the LoRA SFT and QLoRA ones also train. benchmarks/lf_recipes.py trains all of them.
"""

from pathlib import Path

import pytest
from conftest import ROOT, SHARED_DATA

from rayft.cluster.session import local_machine
from rayft.orchestrator.launch import example_rows, prepare, run_train
from rayft.orchestrator.plan import make_plan
from rayft.orchestrator.predict import prepare_predict
from rayft.recipe.loading import load_recipe
from rayft.recipe.parse import parse_config
from rayft.recipe.values import read_log

pytestmark = [pytest.mark.unit,
              pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data/llamafactory is not present")]
LF_ROOT = ROOT / "configs" / "llamafactory"
RECIPES = sorted(p.relative_to(LF_ROOT).as_posix() for p in (LF_ROOT / "examples").rglob("*.yaml"))


def lf_config(recipe: str, tiny_model: Path, tmp_path: Path, *extra: str):
    if "use_llama_pro: true" in (LF_ROOT / recipe).read_text():  # its expand.sh's model: 8 blocks added to 8
        tiny_model = llama_pro_model(tmp_path)
    overrides = [f"model_name_or_path={tiny_model}", f"dataset_dir={SHARED_DATA}", f"output_dir={tmp_path / 'out'}",
                 f"ray_storage_path={tmp_path / 'ray'}", *extra]
    if "predict" in recipe:  # the adapter its sft recipe would have written
        overrides.append(f"adapter_name_or_path={tmp_path / 'adapter'}")
    if "template: llama3" in (LF_ROOT / recipe).read_text():  # the template of the model's family: the tiny Qwen2
        overrides.append("template=qwen")
    return parse_config(load_recipe(LF_ROOT / recipe, overrides), base_dir=LF_ROOT)


def llama_pro_model(tmp_path: Path) -> Path:
    """The LLaMA Pro recipe's model as LLaMA-Factory's expand.sh makes it (`--num_expand 8`), from a tiny model of 8
    blocks: 16 blocks, of which `freeze_trainable_layers: 8` trains the 8 new ones."""
    import rayft.data
    from rayft.trainers.llama_pro import expand_blocks
    from rayft.trainers.tiny_model import write_tiny_model

    demo = sorted((Path(rayft.data.__file__).parent / "demo").glob("demo_*.json"))
    base = write_tiny_model(tmp_path / "tiny-8", demo, num_layers=8)
    return expand_blocks(base, tmp_path / "tiny-8-pro", num_expand=8)


def test_the_recipes_are_llamafactorys_examples():
    assert len(RECIPES) == 21 and "examples/train_qlora/qwen3_lora_sft_bnb_4bit.yaml" in RECIPES
    assert {"examples/extras/eaft/qwen25_05b_eaft_full.yaml", "examples/extras/dft/qwen2_full_sft.yaml"} <= set(RECIPES)
    text = (LF_ROOT / "examples/train_lora/qwen3_lora_sft.yaml").read_text()
    for key in ("warmup_ratio", "preprocessing_num_workers", "dataloader_num_workers", "bf16: true",
                "ddp_timeout", "save_only_model", "resume_from_checkpoint: null", "template: qwen3_nothink"):
        assert key in text, key
    assert "deepspeed: examples/deepspeed/ds_z3_config.json" in (LF_ROOT / RECIPES[RECIPES.index(
        "examples/train_full/qwen3_full_sft.yaml")]).read_text()


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_llamafactory_recipe_plans_on_this_cpu(recipe, tiny_model, tmp_path, rayft_log):
    cfg = lf_config(recipe, tiny_model, tmp_path)
    if "predict" in recipe:  # do_predict without do_train: generation only, as in LLaMA-Factory
        assert not cfg.args.do_train and len(prepare_predict(cfg)) == 50 + 50
        return
    prepared = prepare(cfg)
    examples = example_rows(prepared)["train"].count()  # a few MB: read here, without Ray
    plan = make_plan(cfg, local_machine(), examples, shape=prepared.shape)
    assert not plan.use_gpu and plan.total_steps > 0
    text = (LF_ROOT / recipe).read_text()
    if "bf16: true" in text:
        assert any("is for GPUs; these CPU workers train in fp32" in n or "pure_bf16 keeps bf16" in n
                   for n in plan.notes)
    if "\ndeepspeed: examples/deepspeed/ds_z3" in text:
        assert plan.zero_stage == 3
    if "use_llama_pro: true" in text:  # the 8 new blocks of 16, the originals frozen
        assert prepared.shape.num_layers == 16 and prepared.shape.trainable_params * 2 < prepared.shape.total_params


@pytest.mark.slow
@pytest.mark.parametrize("recipe, extra", [
    # with one of bitsandbytes' optimizers, which its workers must import though the base is not quantised
    ("examples/train_lora/qwen3_lora_sft.yaml", ("optim=adamw_bnb_8bit",)),
    # QLoRA with DDP on two workers: each holds the base in 4 bits (bitsandbytes NF4 runs on this CPU); two
    # micro-batches a step instead of eight keep it short. (ZeRO-3 from LLaMA-Factory's ds_z3_config.json trains in
    # test_stages.py's full-DPO run.)
    ("examples/train_qlora/qwen3_lora_sft_bnb_4bit.yaml", ("ray_num_workers=2", "gradient_accumulation_steps=2")),
], ids=["lora-sft", "qlora-2-workers"])
def test_llamafactory_recipes_train_unchanged(recipe, extra, tiny_model, tmp_path, ray_local, rayft_log):
    cfg = lf_config(recipe, tiny_model, tmp_path, "max_steps=2", "logging_steps=1", *extra)
    run_train(cfg)
    out = tmp_path / "out"
    losses = [r["loss"] for r in read_log(out) if "loss" in r]
    assert len(losses) == 2 and all(0 < loss < 20 for loss in losses)
    weights = "model.safetensors" if "full" in recipe else "adapter_model.safetensors"
    assert (out / weights).is_file() and (out / "training_loss.png").is_file()
    if "qlora" in recipe:
        assert any("base model in 4 bits" in line for line in rayft_log)
