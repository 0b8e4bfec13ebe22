"""`rayft export`: adapters merged into the base model give a plain Hugging Face model with the same logits."""

import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from rayft.orchestrator.export import run_export
from rayft.recipe.loading import load_recipe
from rayft.recipe.parse import parse_config
from rayft.recipe.problems import ConfigError

pytestmark = pytest.mark.unit
EXPORT_RECIPE = ROOT / "configs" / "export_lora.yaml"


def trained_like_adapter(tiny_model, out_dir, seed: int, target: str = "q_proj,v_proj"):
    """A LoRA adapter whose B matrices are not zero, as after training (PEFT starts them at zero)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=target.split(","),
                                                  init_lora_weights=False))
    peft_model.save_pretrained(out_dir)
    return out_dir


def logits(model):
    model.eval()
    with torch.no_grad():
        return model(torch.arange(1, 40).unsqueeze(0)).logits


def test_merged_export_gives_the_logits_of_base_plus_adapters(tmp_path, tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    first = trained_like_adapter(tiny_model, tmp_path / "a1", seed=1)
    second = trained_like_adapter(tiny_model, tmp_path / "a2", seed=2, target="o_proj,down_proj")
    export_dir = tmp_path / "merged"
    cfg = parse_config(load_recipe(EXPORT_RECIPE, [
        f"model_name_or_path={tiny_model}", f"adapter_name_or_path={first},{second}",
        f"export_dir={export_dir}"]), base_dir=ROOT, for_training=False)
    run_export(cfg)

    expected = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    expected = PeftModel.from_pretrained(expected, first).merge_and_unload()
    expected = PeftModel.from_pretrained(expected, second)  # the last one applied as an adapter, unmerged
    merged = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    assert (logits(merged) - logits(expected)).abs().max() < 1e-4
    assert (logits(merged) - logits(base)).abs().max() > 1e-2  # the adapters changed something
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert (export_dir / "model.safetensors").is_file() and not (export_dir / "adapter_config.json").exists()
    assert AutoTokenizer.from_pretrained(export_dir)("hello").input_ids == AutoTokenizer.from_pretrained(
        tiny_model)("hello").input_ids
    assert "2 adapter(s) merged" in (export_dir / "README.md").read_text()


def test_export_refuses_an_occupied_folder_and_bad_settings_before_loading(tmp_path, tiny_model):
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "keep.txt").write_text("precious")
    cfg = parse_config(load_recipe(EXPORT_RECIPE, [
        f"model_name_or_path={tiny_model}", f"adapter_name_or_path={tmp_path / 'nothing'}",
        f"export_dir={tmp_path / 'merged'}", "export_size=0", "export_legacy_format=true"]),
        base_dir=ROOT, for_training=False)
    with pytest.raises(ConfigError) as err:
        run_export(cfg)
    found = err.value.messages
    assert len(found) == 4 and "not empty" in found[0] and "safetensors only" in found[1]
    assert "export_size" in found[2] and "holds no adapter_config.json" in found[3]
    assert (tmp_path / "merged" / "keep.txt").read_text() == "precious"


@pytest.mark.integration  # a subprocess
def test_the_cli_exports_and_never_writes_over_an_export(tmp_path, tiny_model):
    adapter = trained_like_adapter(tiny_model, tmp_path / "a", seed=3)
    out = tmp_path / "merged"
    command = [sys.executable, "-m", "rayft.orchestrator.cli", "export", str(EXPORT_RECIPE),
               f"model_name_or_path={tiny_model}", f"adapter_name_or_path={adapter}", f"export_dir={out}"]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert "exported a plain Hugging Face model" in proc.stdout
    written = (out / "model.safetensors").stat().st_mtime_ns
    again = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert again.returncode == 2 and "exists and is not empty" in again.stderr
    assert (out / "model.safetensors").stat().st_mtime_ns == written
