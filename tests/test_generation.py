"""Generation after training without Ray: ROUGE/BLEU, prompts, generation settings, recipe rules, plots,
the model card, and `rayft chat` driven through its standard input."""

import json
import subprocess
import sys
from dataclasses import replace

import pytest
from conftest import DEMO_RECIPE, ROOT
from test_export import trained_like_adapter

from rayft.data.encode import encode_prompt
from rayft.data.templates import get_template
from rayft.recipe.loading import load_recipe
from rayft.recipe.parse import parse_config
from rayft.recipe.problems import ConfigError
from rayft.recipe.schema import GeneratingArguments
from rayft.trainers.generate import cut_at_stop, generation_kwargs, stop_token_ids
from rayft.trainers.metrics import similarity_scores
from rayft.trainers.outputs import plot_loss, write_model_card

pytestmark = pytest.mark.unit
PREDICT_RECIPE = ROOT / "configs" / "predict_lora.yaml"
CHAT_RECIPE = ROOT / "configs" / "chat_lora.yaml"


def test_scores_match_hand_computed_values_in_english():
    # "the cat" against "the cat sat": ROUGE-1 P=2/2 R=2/3 F=0.8; ROUGE-2 P=1/1 R=1/2 F=2/3; ROUGE-L as ROUGE-1.
    # BLEU-4 over characters: every n-gram of the 7 characters occurs in the 11 of the label, so the score is
    # the brevity penalty exp(1 - 11/7).
    scores = similarity_scores(["the cat"], ["the cat sat"])
    assert scores == pytest.approx({"rouge-1": 80.0, "rouge-2": 200 / 3, "rouge-l": 80.0, "bleu-4": 56.4718}, abs=1e-3)


def test_scores_segment_chinese_into_words():
    # jieba: 我/爱/北京 against 我/爱/北京/天安门. ROUGE-1 F = 2*(1*3/4)/(1+3/4) = 6/7; ROUGE-2: 2 of 2 bigrams,
    # 2 of 3, F=0.8. Characters instead of words would give ROUGE-1 F = 8/11. BLEU-4: exp(1 - 7/4).
    scores = similarity_scores(["我爱北京"], ["我爱北京天安门"])
    expected = {"rouge-1": 600 / 7, "rouge-2": 80.0, "rouge-l": 600 / 7, "bleu-4": 47.2367}
    assert scores == pytest.approx(expected, abs=1e-3)


def test_scores_average_over_examples_and_an_empty_answer_scores_zero():
    scores = similarity_scores(["the cat sat", ""], ["the cat sat", "a dog"])
    assert scores == pytest.approx({"rouge-1": 50.0, "rouge-2": 50.0, "rouge-l": 50.0, "bleu-4": 50.0})
    with pytest.raises(ValueError):
        similarity_scores(["one"], ["one", "two"])


def test_prompt_is_every_earlier_turn_then_the_last_question_and_keeps_its_end():
    prompt = [1, 2, 3, 4, 5, 6]  # every earlier turn, then the last question
    assert encode_prompt(prompt, cutoff_len=100) == ([1, 2, 3, 4, 5, 6], 0)
    assert encode_prompt(prompt, cutoff_len=4) == ([3, 4, 5, 6], 2)


def test_generation_settings(tiny_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    stops = get_template("chatml").stop_ids(tokenizer)  # its stop words: <|im_end|> and <|im_start|>
    assert sorted(tokenizer.convert_ids_to_tokens(stops)) == ["<|im_end|>", "<|im_start|>"]
    cfg = parse_config(load_recipe(ROOT / "configs" / "chat_lora.yaml", []), base_dir=ROOT, for_training=False)
    assert stop_token_ids(tokenizer, cfg) == stops
    greedy = generation_kwargs(GeneratingArguments(do_sample=False, max_new_tokens=16), stops, 0)
    assert greedy["max_new_tokens"] == 16 and "max_length" not in greedy and "temperature" not in greedy
    sampled = generation_kwargs(GeneratingArguments(max_new_tokens=0, max_length=64, top_k=5), stops, 0, num_beams=3)
    assert sampled["max_length"] == 64 and sampled["top_k"] == 5 and sampled["num_beams"] == 3
    assert cut_at_stop([5, 6, stops[-1], 0, 0], stops) == [5, 6, stops[-1]] and cut_at_stop([5, 6], stops) == [5, 6]


def test_infer_dtype_and_use_kv_cache_reach_the_generation_model(tiny_model):
    import torch

    from rayft.trainers.model import load_for_generation

    def loaded(*overrides):
        cfg = parse_config(load_recipe(None, [f"model_name_or_path={tiny_model}", *overrides]), for_training=False)
        return load_for_generation(cfg.model, use_gpu=False)

    default = loaded()
    assert default.dtype == torch.float32 and default.config.use_cache
    quick = loaded("infer_dtype=bfloat16", "use_kv_cache=false")
    assert quick.dtype == torch.bfloat16 and not quick.config.use_cache


def test_a_quantised_base_generates_with_its_adapter_apart_and_a_device_map_spreads_a_4_bit_model(tiny_model,
                                                                                                  tmp_path):
    import torch
    from peft import PeftModel

    from rayft.trainers.model import load_for_generation, quantized_placement

    adapter = trained_like_adapter(tiny_model, tmp_path / "adapter", seed=3)

    def loaded(*overrides):
        cfg = parse_config(load_recipe(None, [f"model_name_or_path={tiny_model}", f"adapter_name_or_path={adapter}",
                                              *overrides]), for_training=False)
        return load_for_generation(cfg.model, use_gpu=False)

    merged, quantised = loaded(), loaded("quantization_bit=8")  # (bitsandbytes' 4-bit CPU kernel fails on 682 rows)
    assert isinstance(quantised, PeftModel) and not isinstance(merged, PeftModel)  # the adapter kept apart
    assert type(quantised.base_model.model.model.layers[0].mlp.up_proj).__name__ == "Linear8bitLt"
    ids = torch.arange(1, 40).unsqueeze(0)
    with torch.no_grad():
        full, eight = merged(ids).logits, quantised(ids).logits
    assert (full - eight).abs().max() < 0.05 * full.abs().max()  # 8-bit rounding, the adapter applied
    answer = quantised.generate(ids[:, :8], max_new_tokens=4, do_sample=False)
    assert answer.shape == (1, 12)
    cfg = parse_config(load_recipe(None, [f"model_name_or_path={tiny_model}", "quantization_bit=4",
                                          "quantization_device_map=auto", "offload_folder=/tmp/rayft-offload"]),
                       for_training=False)
    assert quantized_placement(cfg.model, use_gpu=True) == {"device_map": "auto",
                                                              "offload_folder": "/tmp/rayft-offload"}
    assert quantized_placement(replace(cfg.model, quantization_device_map=None), use_gpu=False) == {
        "device_map": {"": "cpu"}}


def test_quantised_generation_rules():
    assert problems(CHAT_RECIPE, "quantization_bit=4", "quantization_device_map=auto", for_training=False) == []
    assert problems(DEMO_RECIPE, "quantization_bit=4", "quantization_device_map=auto") == [
        "quantization_device_map: places a quantised model for generation (chat, predict, serve); a training worker "
        "keeps its model on its own device, so remove it"]
    found = problems(CHAT_RECIPE, "quantization_bit=8", "quantization_device_map=auto", for_training=False)
    assert found[0].startswith("quantization_device_map and quantization_bit: an automatic device map is for a 4-bit")
    assert problems(CHAT_RECIPE, "offload_folder=/tmp/o", for_training=False)[0].startswith(
        "offload_folder: holds what quantization_device_map: auto does not fit")
    assert problems(CHAT_RECIPE, "quantization_bit=8", "adapter_name_or_path=a,b", for_training=False)[0].startswith(
        "adapter_name_or_path and quantization_bit: a quantised base keeps its adapter apart, so it takes one")
    assert problems(ROOT / "configs" / "serve_lora.yaml", "quantization_bit=8", "adapter_name_or_path=a",
                    for_training=False) == [
        "adapter_name_or_path and serve_adapters: with quantization_bit the base keeps adapter_name_or_path apart; "
        "serve it as one of serve_adapters instead"]


def problems(recipe, *overrides, for_training=True):
    try:
        parse_config(load_recipe(recipe, list(overrides)), base_dir=ROOT, for_training=for_training)
    except ConfigError as err:
        return err.messages
    return []


def test_prediction_recipe_rules():
    assert problems(PREDICT_RECIPE) == []
    assert problems(DEMO_RECIPE, "predict_with_generate=true")[0].startswith(
        "predict_with_generate: generation runs in a recipe of its own after training")
    assert problems(PREDICT_RECIPE, "predict_with_generate=false")[0].startswith("do_predict: rayft predicts by "
                                                                                 "generating")
    found = problems(PREDICT_RECIPE, "dataset=demo_sft", "deepspeed=z2", "stage=dpo", "placement_strategy=SPREAD")
    assert [p.split(":")[0] for p in found] == ["dataset", "stage", "deepspeed", "placement_strategy"], found
    assert problems(PREDICT_RECIPE, "eval_dataset=null")[0].startswith("eval_dataset: required for prediction")
    assert problems(DEMO_RECIPE, "do_train=false")[0].startswith("do_train: false leaves nothing to run")
    # generation settings are read by prediction and chat only; a training recipe may not set them
    assert problems(DEMO_RECIPE, "temperature=0.3", "eval_num_beams=2") == [
        f"{k}: generation settings are read by prediction (do_train: false with do_predict and predict_with_generate) "
        f"and by `rayft chat`, not by training; remove {k}" for k in ("temperature", "eval_num_beams")]
    assert problems(CHAT_RECIPE, for_training=False) == []


def test_trackers_rules():
    assert problems(DEMO_RECIPE, "report_to=[tensorboard,mlflow,wandb]") == []
    assert problems(DEMO_RECIPE, "report_to=none") == []
    assert problems(DEMO_RECIPE, "report_to=[tensorboard,neptune]") == [
        "report_to: 'neptune' is not built in rayft (built: tensorboard, mlflow, wandb, swanlab)"]
    assert problems(DEMO_RECIPE, "mlflow_tracking_uri=http://localhost:5000")[0].startswith(
        "mlflow_tracking_uri: only read with report_to: mlflow")


def test_swanlab_rules_and_its_secrets():
    from rayft.recipe.derive import uses_swanlab

    # report_to: swanlab is use_swanlab (as in LLaMA-Factory); its keys are read only then
    assert uses_swanlab(parse_config(load_recipe(DEMO_RECIPE, ["report_to=swanlab"]), base_dir=ROOT))
    assert problems(DEMO_RECIPE, "use_swanlab=true", "swanlab_mode=offline", "swanlab_run_name=r") == []
    assert problems(DEMO_RECIPE, "swanlab_project=p", "swanlab_mode=offline") == [
        f"{k}: only read with use_swanlab: true; set it or remove {k}" for k in ("swanlab_project", "swanlab_mode")]
    assert problems(DEMO_RECIPE, "use_swanlab=true", "swanlab_mode=local", "swanlab_api_key=sk-1",
                    "swanlab_lark_secret=s") == [
        "swanlab_api_key: only read with swanlab_mode: cloud (local mode logs to a folder without logging in); "
        "remove it or use cloud",
        "swanlab_lark_secret: signs swanlab_lark_webhook_url's messages; set the webhook or remove the secret"]
    assert problems(DEMO_RECIPE, "use_swanlab=true", "swanlab_mode=online")[0].startswith("swanlab_mode: ")
    cfg = parse_config(load_recipe(DEMO_RECIPE, ["use_swanlab=true", "swanlab_api_key=sk-1",
                                                 "swanlab_lark_webhook_url=https://open.feishu.cn/hook/abc",
                                                 "swanlab_lark_secret=s"]), base_dir=ROOT)
    saved = cfg.to_dict(mask_secrets=True)
    assert [saved[k] for k in ("swanlab_api_key", "swanlab_lark_webhook_url", "swanlab_lark_secret")] == ["***"] * 3


def test_plots_cover_every_stage_metric_with_its_eval_series(tmp_path):
    records = [{"step": s, "loss": 1.0 / s, "rewards/accuracies": 0.5, "rewards/margins": 0.1 * s} for s in (1, 2, 3)]
    records.append({"step": 3, "eval_loss": 0.4, "eval_rewards/accuracies": 0.75})
    (tmp_path / "trainer_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    written = plot_loss(str(tmp_path))
    assert [p.name for p in written] == ["training_loss.png", "training_rewards_accuracies.png",
                                         "training_rewards_margins.png"]
    assert all(p.stat().st_size > 5000 for p in written)


def test_model_card_records_the_run_without_secrets(tmp_path):
    cfg = parse_config(load_recipe(DEMO_RECIPE, ["hf_hub_token=hf_card_secret", "eval_dataset=demo_sft_eval",
                                                 f"output_dir={tmp_path}"]), base_dir=ROOT)
    metrics = {"train_loss": 1.25, "eval_loss": 1.5}
    card = write_model_card(str(tmp_path), cfg.to_dict(mask_secrets=True), metrics).read_text()
    assert "base_model: " + cfg.model.model_name_or_path in card and "library_name: peft" in card
    assert "datasets:\n- demo_sft\n- demo_sft_eval" in card and "stage `sft`, method `lora`" in card
    assert "- lora_rank: `8`" in card and "- learning_rate: `0.002`" in card and "- deepspeed: `z2`" in card
    assert "- train_loss: 1.25" in card and "- eval_loss: 1.5" in card
    assert "pref_beta" not in card and "hf_card_secret" not in card


@pytest.mark.integration  # a subprocess
def test_chat_answers_streamed_and_exits_cleanly(tmp_path, tiny_model):
    adapter = trained_like_adapter(tiny_model, tmp_path / "adapter", seed=3)
    session = "What is one plus four?\n/clear\nDescribe a white crow.\n/exit\nnever read\n"
    done = subprocess.run(
        [sys.executable, "-m", "rayft.orchestrator.cli", "chat", str(CHAT_RECIPE), f"model_name_or_path={tiny_model}",
         f"adapter_name_or_path={adapter}", "do_sample=false", "max_new_tokens=12"],
        input=session, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert out.startswith(f"[rayft] chatting with {tiny_model} with {adapter}")
    answers = [line.split("Assistant: ", 1)[1] for line in out.splitlines() if "Assistant: " in line]
    assert len(answers) == 2 and all(answers), out
    assert "[rayft] conversation cleared" in out and out.rstrip().endswith("[rayft] bye")
    assert "never read" not in out


@pytest.mark.integration  # a subprocess
def test_plan_and_sweep_know_a_prediction_recipe(tmp_path):
    from rayft.orchestrator.sweep_spec import check_sweep

    raw = load_recipe(PREDICT_RECIPE, [f"output_dir={tmp_path / 'out'}"])
    raw["sweep"] = {"parameters": {"temperature": {"grid": [0.5, 1.0]}}}
    with pytest.raises(ConfigError, match="a sweep trains every trial; this recipe generates"):
        check_sweep(raw, base_dir=ROOT)
    done = subprocess.run([sys.executable, "-m", "rayft.orchestrator.cli", "plan", str(PREDICT_RECIPE),
                           f"output_dir={tmp_path / 'out'}", "ray_num_workers=64"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    # refused before Ray starts, with the resources named, not a crash in the training planner
    assert done.returncode == 2 and "64 workers need" in done.stderr, done.stderr[-2000:]
