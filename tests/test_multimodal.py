"""Images in supervised fine-tuning: token counts from an image's size, LLaMA-Factory 0.9.5's encodings of the same
rows (tests/golden/qwen2_vl, written by tools/lf_mm_golden.py), bad rows and refusals, and a 2-worker LoRA run of the
tiny Qwen2-VL whose batches carry the images' pixels."""

import base64
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import DEMO_RECIPE, ROOT, captured_log, train_recipe

from rayft.data.errors import DataError
from rayft.data.media import ImageGeometry, image_token_count, load_images
from rayft.recipe.loading import load_recipe
from rayft.recipe.parse import parse_config

GOLDEN = ROOT / "tests" / "golden" / "qwen2_vl"
LIMITS = (768 * 768, 32 * 32)  # image_max_pixels and image_min_pixels at LLaMA-Factory's defaults


def image_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil.from_pretrained(GOLDEN)


def write_image(path: Path, width: int, height: int, seed: int = 0) -> Path:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.mark.unit
@pytest.mark.parametrize("limits", [(768 * 768, 32 * 32), (64 * 64, 32 * 32), (768 * 768, 150 * 150)])
def test_an_images_token_count_from_its_size_equals_the_image_processors(tmp_path, limits):
    """Tokenising counts from the header; the workers' processor makes the patches. Both agree on awkward sizes."""
    processor, geometry = image_processor(), ImageGeometry.read(str(GOLDEN), *limits)
    sizes = [(1, 1), (10, 10), (27, 500), (640, 480), (33, 1000), (5000, 20), (20, 5000), (129, 77), (28, 28),
             (2000, 3000), (56, 30), (13, 2900)]
    for i, (width, height) in enumerate(sizes):
        (image,) = load_images([str(write_image(tmp_path / f"{i}.png", width, height, i))], *limits)
        grid = processor([image], return_tensors="pt")["image_grid_thw"]
        assert int(grid.prod()) // 4 == image_token_count(width, height, geometry), (width, height)


@pytest.mark.unit
def test_llava_next_token_counts_equal_its_processors_over_awkward_sizes():
    """LLaVA-NeXT's count (base tile, unpadded tiles, a newline per row) equals Transformers' own processor's method,
    which LLaMA-Factory's plugin calls, under the CLS feature the default strategy drops."""
    from transformers import AutoImageProcessor, AutoTokenizer, LlavaNextProcessor

    from rayft.data.media import regularized_size

    folder = ROOT / "tests" / "golden" / "llava_next"
    geometry = ImageGeometry.read(str(folder), *LIMITS, plugin="llava_next")
    processor = LlavaNextProcessor(image_processor=AutoImageProcessor.from_pretrained(folder),
                                   tokenizer=AutoTokenizer.from_pretrained(folder), patch_size=14,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1)
    for width in (1, 13, 28, 55, 56, 57, 111, 112, 113, 300, 640, 3000):
        for height in (1, 12, 29, 56, 99, 112, 200, 901):
            w, h = regularized_size(width, height, *LIMITS, plugin="llava_next")
            assert image_token_count(width, height, geometry) == processor._get_number_of_features(h, w, 56, 56) - 1


GOLDEN_CASES = [(template, i) for template in ("qwen2_vl", "qwen3_vl", "llava", "llava_next", "gemma3", "mllama")
                for i in range(3)]
GRIDDED = ("qwen2_vl", "qwen3_vl")  # images of their own sizes, in patches; the others are resized to one size


@pytest.mark.unit
@pytest.mark.parametrize("template, case", GOLDEN_CASES, ids=[f"{t}-{i}" for t, i in GOLDEN_CASES])
def test_rows_with_images_become_llamafactorys_tokens_and_pixels(template, case):
    """Qwen2-VL's and Qwen3-VL's images become runs whose length their size decides; LLaVA's and Gemma 3's are all
    resized to one size (Gemma 3's between its begin- and end-of-image tokens); LLaVA-NeXT's are tiled, their count
    decided by their size and the best tile grid."""
    import dataclasses

    import torch
    from transformers import AutoImageProcessor

    from rayft.data.collator import ImageCollator, KTOCollator, PairwiseCollator, SupervisedCollator
    from rayft.data.pipeline import (
        EncodingSettings,
        columns_of,
        encode_batch,
        encode_kto_batch,
        encode_pairwise_batch,
        load_datasets,
    )
    from rayft.data.templates import get_template
    from rayft.data.tokenizer import TokenizerSpec, load_tokenizer

    folder = ROOT / "tests" / "golden" / template
    golden = json.loads((folder / "lf_mm_encodings.json").read_text())["cases"][case]
    limits = golden["image_max_pixels"], golden["image_min_pixels"]
    (examples,) = load_datasets("shapes", str(folder), None, template=template)
    spec, processor = TokenizerSpec(path=str(folder)), AutoImageProcessor.from_pretrained(folder)
    settings = EncodingSettings(template=template, cutoff_len=golden["cutoff_len"],
                                images=ImageGeometry.read(str(folder), *limits, plugin=template))
    encoded = encode_batch(columns_of(examples), spec, settings)
    tokenizer = load_tokenizer(spec)
    image_id = tokenizer.convert_tokens_to_ids(get_template(template).media_tokens["image_token"])
    collate = ImageCollator(SupervisedCollator(tokenizer.pad_token_id), processor, image_id, settings.images)
    for i, expected in enumerate(golden["rows"]):
        assert encoded["input_ids"][i].tolist() == expected["input_ids"], i
        assert encoded["labels"][i].tolist() == expected["labels"], i
        row = {"input_ids": encoded["input_ids"][i].tolist(), "labels": encoded["labels"][i].tolist(),
               "images": encoded["images"][i]}
        batch = collate([row])
        grid = batch["image_grid_thw"].tolist() if "image_grid_thw" in batch else []
        assert grid == expected["image_grid_thw"], i
        if template in GRIDDED:
            assert batch["mm_token_type_ids"].sum() == sum(t * h * w // 4 for t, h, w in grid)
            start, sums = 0, []
            for t, h, w in grid:
                sums.append(float(batch["pixel_values"][start:start + t * h * w].double().sum()))
                start += t * h * w
        elif template == "mllama":  # one row of images, each its tiles; the text reads them by cross-attention
            sums = [float(image.double().sum()) for image in batch["pixel_values"][0]] if row["images"] != "[]" else []
            assert batch.get("cross_attention_mask", torch.zeros(1, 0))[0].tolist() == expected.get(
                "cross_attention_mask", []), i
        else:  # one 3 x 56 x 56 tensor per image (LLaVA-NeXT: a base tile and its tiles, padded), and no grid
            sums = [float(image.double().sum()) for image in batch.get("pixel_values", [])]
            assert "mm_token_type_ids" not in batch
            if template == "gemma3":  # its attention reads the image tokens as token_type_ids
                assert batch["token_type_ids"].sum() == (batch["input_ids"] == image_id).sum() == 4 * len(sums)
        assert sums == pytest.approx(expected["pixel_sums"], rel=1e-5, abs=1e-3), i
    # the same rows as preference pairs (stage dpo): both sides over the one expanded prompt
    (pairs,) = load_datasets("shape_pairs", str(folder), None, template=template, stage="dpo", data="preference")
    encoded = encode_pairwise_batch(columns_of(pairs), spec, dataclasses.replace(settings, stage="dpo"))
    for i, expected in enumerate(golden["pairs"]):
        assert {k: encoded[k][i].tolist() for k in expected} == expected, i
    collate = ImageCollator(PairwiseCollator(tokenizer.pad_token_id), processor, image_id, settings.images, copies=2)
    batch = collate([{k: encoded[k][i] for k in (*golden["pairs"][0], "images")} for i in range(len(pairs))])
    images = sum(len(e.get("images") or []) for e in examples)
    if template == "mllama":  # a row of images for each sequence, chosen then rejected
        assert len(batch["pixel_values"]) == len(batch["cross_attention_mask"]) == 2 * len(pairs)
        assert int(batch["aspect_ratio_ids"].ne(0).sum()) == 2 * images
    else:
        assert len(batch["image_grid_thw"] if template in GRIDDED else batch["pixel_values"]) == 2 * images
    # and as KTO's tagged examples (stage kto): each with its mismatched pair, which keeps the example's prompt
    (tagged,) = load_datasets("shape_feedback", str(folder), None, template=template, stage="kto", data="kto")
    encoded = encode_kto_batch(columns_of(tagged), spec, dataclasses.replace(settings, stage="kto"))
    for i, expected in enumerate(golden["feedback"]):
        assert {k: encoded[k][i].tolist() for k in expected if k != "kto_tag"} == {
            k: v for k, v in expected.items() if k != "kto_tag"}, i
        assert bool(encoded["kto_tag"][i]) == expected["kto_tag"]
    collate = ImageCollator(KTOCollator(tokenizer.pad_token_id), processor, image_id, settings.images)
    batch = collate([{k: encoded[k][i] for k in ("input_ids", "labels", "kl_input_ids", "kl_labels", "kto_tag",
                                                  "images")} for i in range(len(tagged))])
    types = {"gemma3": "token_type_ids", "mllama": "cross_attention_mask"}.get(
        template, "mm_token_type_ids" if template in GRIDDED else None)
    if types:
        assert batch[f"kl_{types}"].sum() == batch[types].sum() > 0


def tiny_model_of(folder: Path, family: str) -> Path:
    """A tiny vision-language model of `family` (its tokenizer trained on the demo data) written to `folder`."""
    from rayft.trainers.tiny_model import write_tiny_model

    return write_tiny_model(folder, sorted((ROOT / "data" / "demo").glob("demo_*.json")), family=family)


def tower_learned(out: Path, tower: str) -> bool:
    """Whether the adapter saved in `out` holds LoRA weights in the vision tower (modules named with `tower`), and
    any of them moved: lora_B starts at zero, so only pixels that reached the tower can move it."""
    from safetensors.torch import load_file

    weights = {k: v for k, v in load_file(out / "adapter_model.safetensors").items() if tower in k}
    return bool(weights) and any(float(v.abs().max()) > 0 for k, v in weights.items() if "lora_B" in k)


def base_losses(model_dir: Path, folder: Path, template: str, micro_batches: list[list[int]]) -> tuple[float, float]:
    """The loss of the model at `model_dir` on the rows of `folder`'s shapes dataset in `micro_batches` (row indices),
    encoded and collated as a run does (cutoff 1024, the default pixel limits): averaged per micro-batch, and over
    all their answer tokens."""
    import torch
    from transformers import AutoImageProcessor, AutoModelForImageTextToText

    from rayft.data.collator import ImageCollator, SupervisedCollator
    from rayft.data.pipeline import EncodingSettings, columns_of, encode_batch, load_datasets
    from rayft.data.templates import get_template
    from rayft.data.tokenizer import TokenizerSpec, load_tokenizer

    (examples,) = load_datasets("shapes", str(folder), None, template=template)
    spec = TokenizerSpec(path=str(model_dir))
    settings = EncodingSettings(template=template, cutoff_len=1024,
                                images=ImageGeometry.read(str(model_dir), *LIMITS, plugin=template))
    encoded = encode_batch(columns_of(examples), spec, settings)
    tokenizer = load_tokenizer(spec)
    collate = ImageCollator(SupervisedCollator(tokenizer.pad_token_id), AutoImageProcessor.from_pretrained(model_dir),
                            tokenizer.convert_tokens_to_ids(get_template(template).media_tokens["image_token"]),
                            settings.images)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    means, sums, tokens = [], 0.0, 0
    with torch.no_grad():
        for rows in micro_batches:
            batch = collate([{"input_ids": encoded["input_ids"][i].tolist(), "labels": encoded["labels"][i].tolist(),
                              "images": encoded["images"][i]} for i in rows])
            loss = float(model(**batch).loss)
            count = int((batch["labels"][:, 1:] != -100).sum())
            means.append(loss)
            sums, tokens = sums + loss * count, tokens + count
    return sum(means) / len(means), sums / tokens


def image_dataset(tmp_path: Path, rows: list[dict]) -> Path:
    """A dataset folder holding `rows` (sharegpt, mllm_demo's columns) and the golden images under images/."""
    folder = tmp_path / "data"
    shutil.copytree(GOLDEN / "images", folder / "images")
    (folder / "dataset_info.json").write_text((GOLDEN / "dataset_info.json").read_text())
    (folder / "rows.json").write_text(json.dumps(rows))
    return folder


@pytest.mark.unit
def test_bad_image_rows_are_counted_with_their_position_and_the_run_is_refused_above_the_threshold(tmp_path):
    from rayft.data.pipeline import load_datasets

    good = json.loads((GOLDEN / "rows.json").read_text())
    (tmp_path / "unreadable.png").write_text("not an image")
    bad = [{**good[0], "images": good[0]["images"][:1]},  # two placeholders, one image
           {**good[3], "images": ["images/missing.png"]},
           {**good[3], "images": [str(tmp_path / "unreadable.png")]}]
    folder = image_dataset(tmp_path, good * 40 + bad)
    (examples,) = load_datasets("shapes", str(folder), None, template="qwen2_vl", max_bad_ratio=0.05)
    assert len(examples) == 160 and all(Path(p).is_file() for e in examples for p in e.get("images", []))
    with pytest.raises(DataError) as refused:
        load_datasets("shapes", str(folder), None, template="qwen2_vl", max_bad_ratio=0.01)
    text = str(refused.value)
    assert "3 of 163 rows" in text and "rows.json row 160: 2 <image> placeholder(s) but 1 image(s)" in text, text
    assert "row 161: image 'images/missing.png' not found in media_dir" in text
    assert "row 162: image " in text and "cannot be read" in text
    # media_dir: the paths are found under it rather than under dataset_dir
    media = tmp_path / "media"
    shutil.move(folder / "images", media / "images")
    (examples,) = load_datasets("shapes", str(folder), 4, template="qwen2_vl", media_dir=str(media),
                                max_bad_ratio=0.05)
    assert examples[0]["images"][0] == str(media / "images" / "square.png")


@pytest.mark.unit
def test_images_need_a_multimodal_template_a_vision_model_and_stage_sft(tmp_path):
    from rayft.data.pipeline import load_datasets
    from rayft.recipe.loading import load_recipe
    from rayft.recipe.parse import parse_config
    from rayft.recipe.problems import ConfigError
    from rayft.trainers.probe import vision_problems

    folder = image_dataset(tmp_path, json.loads((GOLDEN / "rows.json").read_text()))
    with pytest.raises(DataError, match="'shapes' has images, and template 'qwen' is text-only; use the model "):
        load_datasets("shapes", str(folder), None, template="qwen")
    with pytest.raises(DataError, match="images in stage 'ppo' are not built yet"):
        load_datasets("shapes", str(folder), None, template="qwen2_vl", stage="ppo")
    with pytest.raises(DataError, match="'intern_vl' encodes media with LLaMA-Factory's 'intern_vl' plugin, which "):
        load_datasets("shapes", str(folder), None, template="intern_vl")

    def recipe(*overrides):
        return parse_config(load_recipe(DEMO_RECIPE, [f"output_dir={tmp_path / 'out'}", *overrides]), base_dir=ROOT)

    text_only = type("Config", (), {"model_type": "qwen2"})()
    vision = type("Config", (), {"model_type": "qwen2_vl", "vision_config": {}})()
    other = type("Config", (), {"model_type": "internvl", "vision_config": {}})()
    assert vision_problems(recipe("template=qwen2_vl"), vision) == []
    (problem,) = vision_problems(recipe("template=qwen2_vl"), text_only)
    assert problem.key == "template" and "qwen2 is a text-only model" in problem.message
    (problem,) = vision_problems(recipe("template=qwen"), other)
    assert problem.key == "model_name_or_path" and "internvl is a vision-language model of a family" in problem.message
    (problem,) = vision_problems(recipe("template=llava"), vision)  # a built plugin, another family's
    assert problem.key == "template" and "for LLaMA-Factory's 'llava' models, not qwen2_vl" in problem.message
    # packing with images: refused by name before any worker starts
    from rayft.data.pipeline import image_geometry

    with pytest.raises(DataError, match="packing: packing under a multimodal template is not built yet"):
        image_geometry(recipe("template=qwen2_vl", "packing=true"))
    with pytest.raises(ConfigError, match="train_mm_proj_only: LLaMA-Factory 0.9.5 removed it"):
        recipe("train_mm_proj_only=true")
    with pytest.raises(ConfigError, match="video_fps: video input"):
        recipe("video_fps=1.0")
    # workers open the images by path: a cluster of several nodes needs them where every node sees them
    from rayft.data.pipeline import locate_datasets
    from rayft.orchestrator.launch import check_cluster
    from rayft.recipe.plan import Node

    sources = locate_datasets("shapes", str(folder), template="qwen2_vl")
    nodes = [Node(f"node{i}", "10.0.0.1", {"CPU": 2.0}) for i in range(2)]
    on_a_cluster = recipe("template=qwen2_vl", "ray_num_workers=2", "deepspeed=null", "ray_storage_path=/shared/ray")
    with pytest.raises(ConfigError, match=f"media_dir: the workers open each example's images by path on their own "
                                          f"nodes \\({folder}"):
        check_cluster(on_a_cluster, nodes, sources)
    check_cluster(on_a_cluster, nodes[:1], sources)  # one node: its own disk is every worker's
    check_cluster(recipe("template=qwen2_vl", "ray_num_workers=2", "deepspeed=null", "ray_storage_path=/shared/ray",
                         "data_shared_file_system=true"), nodes, sources)


@pytest.mark.slow
def test_qwen2_vl_sft_and_dpo_gemma3_kto_and_llava_sft_train_on_their_images_and_export_with_the_processor(
        tmp_path, ray_local):
    """Two-worker LoRA SFT and DPO of the tiny Qwen2-VL, a one-worker reward model of it (stage rm), and a one-worker
    LoRA KTO of a tiny Gemma 3, with LoRA on the
    vision tower too (freeze_vision_tower: false): its adapters can only move if the batches' pixels reached the
    tower; the projector stays out of LoRA, as LLaMA-Factory leaves it out. Then full SFT of a tiny LLaVA on one
    worker, its projector trained, LoRA SFT of a tiny LLaVA-NeXT and LoRA KTO of a tiny Mllama."""
    import torch
    from safetensors.torch import load_file

    from rayft.orchestrator.export import run_export
    from rayft.recipe.loading import load_recipe
    from rayft.recipe.parse import parse_config

    model = tiny_model_of(tmp_path / "tiny-vl", "qwen2_vl")
    folder = image_dataset(tmp_path, json.loads((GOLDEN / "rows.json").read_text()) * 8)
    with captured_log() as lines:
        out, losses = train_recipe(DEMO_RECIPE, tmp_path, model, "template=qwen2_vl", "dataset=shapes",
                                   f"dataset_dir={folder}", "eval_dataset=null", "deepspeed=null", "max_steps=4",
                                   "logging_steps=1", "per_device_train_batch_size=2", "freeze_vision_tower=false",
                                   "image_max_pixels=4096")
    text = "\n".join(lines)
    assert "<|vision_start|><|image_pad|>*" in text and "images:\n['" in text  # the first example, runs shortened
    assert [r["step"] for r in losses] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in losses)
    weights = load_file(out / "adapter_model.safetensors")
    tower = {k: v for k, v in weights.items() if ".visual.blocks." in k}
    assert tower and not any(".merger." in k or "patch_embed" in k for k in weights)
    assert tower_learned(out, ".visual.blocks.")
    assert json.loads((out / "preprocessor_config.json").read_text())["merge_size"] == 2

    def export_recipe(adapter: Path, export_dir: str, *overrides):
        return parse_config(load_recipe(DEMO_RECIPE, [
            f"model_name_or_path={model}", f"adapter_name_or_path={adapter}", f"export_dir={tmp_path / export_dir}",
            f"output_dir={tmp_path / 'x'}", "template=qwen2_vl", *overrides]), base_dir=ROOT)

    cfg = export_recipe(out, "merged")
    # DPO on the same images as preference pairs (LoRA: the reference is the policy with its adapter off), under
    # ZeRO-3, one pair per step in a fixed order where every third pair has no image: whichever way the two workers
    # split the pairs, some step has images on one rank only. That rank's fake image keeps the tower's gathers in
    # step; without it the run would hang.
    pairs = json.loads((GOLDEN / "pairs.json").read_text())
    (folder / "pairs.json").write_text(json.dumps([pairs[i % 3] for i in range(32)]))  # pairs[2] has no image
    dpo_out, dpo_losses = train_recipe(ROOT / "configs" / "demo_dpo_lora.yaml", tmp_path / "dpo", model,
                                       "template=qwen2_vl", "dataset=shape_pairs", f"dataset_dir={folder}",
                                       "cutoff_len=1024", "deepspeed=z3", "max_steps=3", "logging_steps=1",
                                       "per_device_train_batch_size=1", "freeze_vision_tower=false",
                                       "image_max_pixels=4096", "disable_shuffling=true")
    assert dpo_losses[0]["loss"] == pytest.approx(np.log(2), abs=1e-3)  # the policy starts as its reference
    assert [r["step"] for r in dpo_losses] == [1, 2, 3]
    assert "rewards/accuracies" in dpo_losses[-1]
    assert tower_learned(dpo_out, ".visual.blocks.")

    # a reward model of the same Qwen2-VL on the pairs (stage rm): one worker, in-process; its score head
    # (LLaMA-Factory's value head, read at each sequence's last attended token) and the tower's adapters learn
    rm_out, rm_losses = train_recipe(ROOT / "configs" / "demo_rm_lora.yaml", tmp_path / "rm", model,
                                     "template=qwen2_vl", "dataset=shape_pairs", f"dataset_dir={folder}",
                                     "cutoff_len=1024", "deepspeed=null", "ray_num_workers=1", "max_steps=2",
                                     "logging_steps=1", "per_device_train_batch_size=4", "freeze_vision_tower=false",
                                     "image_max_pixels=4096", "eval_dataset=null")
    assert [r["step"] for r in rm_losses] == [1, 2] and "accuracy" in rm_losses[-1]
    head = load_file(rm_out / "value_head.safetensors")["v_head.summary.weight"]
    assert head.shape == (1, 256) and float(head.abs().sum()) > 0
    assert tower_learned(rm_out, ".visual.blocks.")
    # exported as for text: the adapters (the tower's among them) merged into the model, the head beside it
    rm_merged = run_export(export_recipe(rm_out, "rm_merged", "stage=rm", "dataset=shape_pairs",
                                         f"dataset_dir={folder}"))
    assert torch.equal(load_file(rm_merged / "value_head.safetensors")["v_head.summary.weight"], head)
    merged_weights, base_weights = load_file(rm_merged / "model.safetensors"), load_file(model / "model.safetensors")
    assert merged_weights.keys() == base_weights.keys()  # the checkpoint's own layout: no score, no LoRA
    moved = {k for k in base_weights if not torch.equal(merged_weights[k], base_weights[k])}
    assert any(k.startswith("visual.blocks.") for k in moved) and any(".layers." in k for k in moved)

    # KTO of a tiny Gemma 3 on the same images as tagged examples: one worker, in-process; the tower's adapters move
    (folder / "feedback.json").write_text((GOLDEN / "feedback.json").read_text())
    gemma = tiny_model_of(tmp_path / "tiny-gemma3", "gemma3")
    kto_out, kto_losses = train_recipe(ROOT / "configs" / "demo_kto_lora.yaml", tmp_path / "kto", gemma,
                                       "template=gemma3", "dataset=shape_feedback", f"dataset_dir={folder}",
                                       "cutoff_len=1024", "deepspeed=null", "ray_num_workers=1", "max_steps=2",
                                       "logging_steps=1", "per_device_train_batch_size=4",
                                       "freeze_vision_tower=false", "image_max_pixels=4096")
    assert [r["step"] for r in kto_losses] == [1, 2] and all(np.isfinite(r["loss"]) for r in kto_losses)
    assert tower_learned(kto_out, ".vision_tower.")
    # and of a tiny Mllama, whose text reads each image's tiles through cross-attention: the mismatched pairs too
    mllama = tiny_model_of(tmp_path / "tiny-mllama", "mllama")
    mllama_out, mllama_losses = train_recipe(ROOT / "configs" / "demo_kto_lora.yaml", tmp_path / "mllama", mllama,
                                             "template=mllama", "dataset=shape_feedback", f"dataset_dir={folder}",
                                             "cutoff_len=1024", "deepspeed=null", "ray_num_workers=1", "max_steps=2",
                                             "logging_steps=1", "per_device_train_batch_size=4",
                                             "freeze_vision_tower=false")
    assert [r["step"] for r in mllama_losses] == [1, 2] and all(np.isfinite(r["loss"]) for r in mllama_losses)
    assert tower_learned(mllama_out, ".vision_model.")

    # LLaVA: every image 16 tokens; one worker (in-process), full training of the language model and projector
    llava = tiny_model_of(tmp_path / "tiny-llava", "llava")
    llava_out, llava_losses = train_recipe(DEMO_RECIPE, tmp_path / "llava", llava, "template=llava",
                                           "dataset=shapes", f"dataset_dir={folder}", "eval_dataset=null",
                                           "deepspeed=null", "ray_num_workers=1", "finetuning_type=full",
                                           "freeze_multi_modal_projector=false", "max_steps=3", "logging_steps=1",
                                           "per_device_train_batch_size=4", "learning_rate=1e-3")
    assert [r["step"] for r in llava_losses] == [1, 2, 3] and llava_losses[-1]["loss"] < llava_losses[0]["loss"]
    trained = load_file(llava_out / "model.safetensors")
    before = load_file(llava / "model.safetensors")
    moved = {k for k in trained if not torch.equal(trained[k], before[k])}
    assert any("multi_modal_projector" in k for k in moved) and not any("vision_tower" in k for k in moved)

    # LLaVA-NeXT: each image tiled on its best grid (a base tile, its tiles unpadded, a newline token a row); LoRA on
    # one worker with the tower's adapters, which move only if the tiles' pixels and image_sizes reached the model
    llava_next = tiny_model_of(tmp_path / "tiny-llava-next", "llava_next")
    next_out, next_losses = train_recipe(DEMO_RECIPE, tmp_path / "llava_next", llava_next, "template=llava_next",
                                         "dataset=shapes", f"dataset_dir={folder}", "eval_dataset=null",
                                         "deepspeed=null", "ray_num_workers=1", "freeze_vision_tower=false",
                                         "max_steps=2", "logging_steps=1", "per_device_train_batch_size=2",
                                         "gradient_accumulation_steps=2", "disable_shuffling=true", "cutoff_len=1024")
    assert [r["step"] for r in next_losses] == [1, 2] and all(np.isfinite(r["loss"]) for r in next_losses)
    # LoRA starts as the identity, so the first step's loss is the base model's on the first four rows, in two
    # micro-batches: averaged per micro-batch, as LLaMA-Factory averages a vision-language model's loss, not over
    # the four rows' tokens (the rows have 17, 22, 5 and 15 answer tokens, so the two differ)
    per_micro_batch, over_tokens = base_losses(llava_next, folder, "llava_next", [[0, 1], [2, 3]])
    assert next_losses[0]["loss"] == pytest.approx(per_micro_batch, rel=1e-5)
    assert abs(per_micro_batch - over_tokens) > 1e-3
    assert tower_learned(next_out, ".vision_tower.")

    from transformers import AutoModelForImageTextToText

    from rayft.trainers.probe import model_shape

    counted = model_shape(cfg)  # the memory planner's count holds the vision tower (and the adapter)
    base = AutoModelForImageTextToText.from_pretrained(model).num_parameters()
    assert counted["total_params"] - counted["trainable_params"] == base
    merged = run_export(cfg)
    assert (merged / "preprocessor_config.json").is_file()
    assert "AutoModelForImageTextToText.from_pretrained" in (merged / "README.md").read_text()


@pytest.mark.unit
def test_a_vision_language_reward_model_scores_each_sequence_at_its_last_attended_token():
    """Stage rm's score of a vision-language model: the same sequence scores the same right-padded, left-padded, and
    with a fake image's tokens unattended after it; LoRA under `all` leaves the score head to be trained whole."""
    import torch
    from transformers import AutoTokenizer

    from rayft.recipe.schema import FinetuningArguments
    from rayft.trainers.model import lora_target_modules, reward_model_class
    from rayft.trainers.tiny_model import build_qwen2_vl

    config = build_qwen2_vl(AutoTokenizer.from_pretrained(GOLDEN), num_layers=1).config
    torch.manual_seed(0)
    model = reward_model_class(config).from_config(config).eval()
    ids, pad = [5, 9, 14, 20, 33], 0
    rows = torch.tensor([ids + [pad, pad], [pad, pad] + ids, ids + [7, 7], [pad, pad, pad] + ids[:4]])
    mask = torch.tensor([[1] * 5 + [0, 0], [0, 0] + [1] * 5, [1] * 5 + [0, 0], [0, 0, 0] + [1] * 4])
    with torch.no_grad():
        scores = model(input_ids=rows, attention_mask=mask).logits.squeeze(-1)
    assert scores[0] == pytest.approx(float(scores[1]), abs=1e-5) and scores[0] == pytest.approx(float(scores[2]),
                                                                                                  abs=1e-5)
    assert abs(float(scores[3] - scores[0])) > 1e-6  # a shorter sequence is read at its own last token
    targets = lora_target_modules(model, FinetuningArguments(freeze_vision_tower=False))
    assert targets and "score" not in targets and not any(t.endswith("lm_head") for t in targets)


@pytest.mark.unit
def test_the_freeze_keys_choose_the_trainable_parts_as_llamafactory_does():
    from transformers import AutoTokenizer

    from rayft.recipe.schema import FinetuningArguments
    from rayft.trainers.model import apply_freeze, apply_full, lora_target_modules
    from rayft.trainers.tiny_model import build_qwen2_vl

    model = build_qwen2_vl(AutoTokenizer.from_pretrained(GOLDEN))

    def args(**kw):
        return FinetuningArguments(**{"lora_target": "all", **kw})

    def parts(names):
        return {("tower" if ".visual.blocks." in n else "projector" if ".merger." in n else "patches"
                 if "patch_embed" in n else "language" if "language_model" in n or n.startswith("lm_head") else n)
                for n in names}

    default = lora_target_modules(model, args())
    assert parts(default) == {"language"} and len(default) == 4 * 7  # 7 linear layers per block, 4 blocks
    with_tower = lora_target_modules(model, args(freeze_vision_tower=False))
    assert parts(with_tower) == {"language", "tower"}  # never the projector nor the patch embedding (a Conv3d)
    assert parts(lora_target_modules(model, args(lora_target="q_proj,qkv", freeze_vision_tower=False))) == {
        "language", "tower"}
    assert parts(lora_target_modules(model, args(freeze_language_model=True, freeze_vision_tower=False))) == {"tower"}

    def trained(prepare, **kw):
        prepare(model, args(**kw))
        return parts(n for n, p in model.named_parameters() if p.requires_grad)

    assert trained(apply_full) == {"language"}
    assert trained(apply_full, freeze_multi_modal_projector=False) == {"language", "projector"}
    assert trained(apply_full, freeze_vision_tower=False, freeze_language_model=True) == {"tower", "patches"}
    assert trained(apply_freeze, freeze_trainable_layers=1) == {"language"}
    assert trained(apply_freeze, freeze_trainable_layers=1, freeze_multi_modal_projector=False) == {
        "language", "projector"}


@pytest.mark.unit
def test_openai_image_parts_become_placeholders_and_only_local_sources_are_read():
    from rayft.orchestrator.openai_api import ApiError, Limits, Sampling, chat_request
    from rayft.recipe.schema import GeneratingArguments

    limits = Limits(max_tokens=16, max_prompt_tokens=512, max_body_bytes=1 << 20)
    defaults = Sampling.defaults(GeneratingArguments(do_sample=False, max_new_tokens=8), limits)
    png = (GOLDEN / "images" / "square.png").read_bytes()

    def ask(*parts, role="user"):
        body = {"model": "m", "messages": [{"role": role, "content": list(parts)}]}
        if role != "user":
            body["messages"].append({"role": "user", "content": "go on"})
        return chat_request(body, defaults, limits)

    def data_url(raw: bytes) -> dict:
        return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(raw).decode()}}

    request = ask({"type": "text", "text": "What is "}, data_url(png), {"type": "text", "text": " and"},
                  {"type": "image_url", "image_url": {"url": "file:///data/a%20b.png", "detail": "auto"}})
    assert request.messages[0]["content"] == "What is <image> and<image>"
    assert request.images == (png, "/data/a b.png")
    for parts, says in [
        ([{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}], "downloads nothing"),
        ([{"type": "image_url", "image_url": {"url": "data:image/png;base64,***"}}], "not valid base64"),
        ([{"type": "image_url", "image_url": {"url": "file:///a.png", "detail": "high"}}], "detail 'high'"),
        ([{"type": "input_audio", "input_audio": {}}], "['input_audio'] are not built"),
    ]:
        with pytest.raises(ApiError, match=re.escape(says)):
            ask(*parts)
    with pytest.raises(ApiError, match=re.escape("parts of type ['image_url'] are not built here")):
        ask(data_url(png), role="system")


@pytest.mark.unit
def test_the_serving_engine_answers_with_images_as_training_encodes_them(tmp_path):
    """The replica's engine in this process: an image part is expanded as in training and its pixels reach
    generate; a file: URL outside media_dir, a stray <image> and several answers are refused with a 400."""
    from rayft.orchestrator.openai_api import ApiError, chat_request
    from rayft.orchestrator.serving import Engine, serve_spec

    model = tiny_model_of(tmp_path / "vl", "qwen2_vl")
    cfg = parse_config(load_recipe(ROOT / "configs" / "serve_lora.yaml", [
        f"model_name_or_path={model}", "template=qwen2_vl", "serve_adapters=null", f"media_dir={GOLDEN}",
        "do_sample=false"]), base_dir=ROOT, for_training=False)
    engine = Engine(serve_spec(cfg))
    png = base64.b64encode((GOLDEN / "images" / "wide.png").read_bytes()).decode()

    def request(url, text="What is it?", **extra):
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]
        return chat_request({"model": engine.spec.base_name, "messages": [{"role": "user", "content": content}],
                             "max_tokens": 4, **extra}, engine.defaults, engine.spec.limits)

    for url in ("data:image/png;base64," + png, f"file://{GOLDEN}/images/wide.png"):
        ask = request(url)
        ids = engine.prompt_ids(ask)
        text = engine.tokenizer.decode(ids)
        assert text.count("<|image_pad|>") == image_token_count(640, 200, ImageGeometry.read(str(model), *LIMITS))
        (answer,) = engine.generate(ask, [ids])
        assert answer.completion_tokens > 0
    for ask, says in [(request(f"file://{tmp_path}/elsewhere.png"), "only under the server's media_dir"),
                      (request("data:image/png;base64," + png, text="and <image>"), "holds 1 <image> besides"),
                      (request("data:image/png;base64," + png, n=2), "several answers to a request with images")]:
        with pytest.raises(ApiError, match=says):
            engine.prompt_ids(ask)


@pytest.mark.integration
def test_rayft_serve_answers_an_openai_image_url_request(tmp_path):
    """`rayft serve` of the tiny Qwen2-VL, asked through the official `openai` client with a data: URL image; its
    prompt is counted with the image's tokens, as training encodes it."""
    import openai
    from conftest import free_port
    from test_serve import KEY, running_server

    model = tiny_model_of(tmp_path / "vl", "qwen2_vl")
    port = free_port()
    recipe = load_recipe(ROOT / "configs" / "serve_lora.yaml", [
        f"model_name_or_path={model}", "template=qwen2_vl", f"serve_port={port}", "do_sample=false",
        "max_new_tokens=6", "serve_adapters=null"])
    png = base64.b64encode((GOLDEN / "images" / "wide.png").read_bytes()).decode()
    text_only = [{"role": "user", "content": "What is it?"}]
    with running_server(tmp_path, recipe, port) as (_, _, base):
        client = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=120)
        plain = client.chat.completions.create(model="vl", messages=text_only)
        reply = client.chat.completions.create(model="vl", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}},
            {"type": "text", "text": "What is it?"}]}])
        with pytest.raises(openai.BadRequestError, match="downloads nothing"):
            client.chat.completions.create(model="vl", messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}])
    image_tokens = image_token_count(640, 200, ImageGeometry.read(str(model), *LIMITS))
    assert reply.usage.prompt_tokens == plain.usage.prompt_tokens + image_tokens + 2  # with vision start and end
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens > 0


@pytest.fixture(scope="module")
def tiny_vl(tmp_path_factory) -> Path:
    return tiny_model_of(tmp_path_factory.mktemp("vl") / "tiny-qwen2-vl", "qwen2_vl")


@pytest.mark.unit
def test_chat_attaches_an_image_to_the_next_message_and_generates_with_its_pixels(tiny_vl):
    import io

    import torch
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    from rayft.data.media import expand_images, image_inputs
    from rayft.data.pipeline import EncodingSettings
    from rayft.orchestrator.chat import run_chat

    image = GOLDEN / "images" / "wide.png"
    cfg = parse_config(load_recipe(ROOT / "configs" / "chat_lora.yaml", [
        f"model_name_or_path={tiny_vl}", "adapter_name_or_path=null", "template=qwen2_vl", "do_sample=false",
        "max_new_tokens=6"]), base_dir=ROOT, for_training=False)
    out = io.StringIO()
    run_chat(cfg, stdin=io.StringIO(f"/image {GOLDEN}/images/missing.png\n/image {image}\nWhat is it?\n/exit\n"),
             out=out)
    said = out.getvalue()
    geometry = ImageGeometry.read(str(tiny_vl), *LIMITS)
    assert "cannot read" in said and f"(640x200, {image_token_count(640, 200, geometry)} image tokens)" in said
    answer = said.split("Assistant: ", 1)[1].split("\n", 1)[0]
    # the same prompt and pixels, generated here: the chat's answer is that one
    tokenizer, model = AutoTokenizer.from_pretrained(tiny_vl), AutoModelForImageTextToText.from_pretrained(tiny_vl)
    template = EncodingSettings.of(cfg).chat_template()
    messages = expand_images([{"role": "user", "content": "<image>What is it?"}, {"role": "assistant", "content": ""}],
                             [(640, 200)], geometry, template.media_tokens)
    ids = torch.tensor([template.encode_oneturn(tokenizer, {"messages": messages})[0]])
    pixels = image_inputs(AutoImageProcessor.from_pretrained(tiny_vl), geometry, [str(image)], ids,
                          tokenizer.convert_tokens_to_ids("<|image_pad|>"))
    with torch.no_grad():
        expected = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                  do_sample=False, **pixels)
    assert answer.strip() == tokenizer.decode(expected[0, ids.shape[1]:], skip_special_tokens=True).strip()


@pytest.mark.integration
def test_predict_generates_for_rows_with_images(tmp_path, tiny_vl, ray_local):
    from rayft.orchestrator.predict import run_predict

    cfg = parse_config(load_recipe(ROOT / "configs" / "predict_lora.yaml", [
        f"model_name_or_path={tiny_vl}", "adapter_name_or_path=null", "template=qwen2_vl", "eval_dataset=shapes",
        f"dataset_dir={GOLDEN}", f"output_dir={tmp_path / 'out'}", "max_new_tokens=4", "ray_num_workers=1",
        "per_device_eval_batch_size=2"]), base_dir=ROOT, for_training=False)
    metrics = run_predict(cfg)
    rows = [json.loads(line) for line in (tmp_path / "out" / "generated_predictions.jsonl").read_text().splitlines()]
    assert metrics["predict_samples"] == len(rows) == 4
    expanded = [row["prompt"].count("<|image_pad|>") for row in rows]
    geometry = ImageGeometry.read(str(tiny_vl), *LIMITS)
    assert expanded[2] == 0 and expanded[3] == image_token_count(640, 200, geometry)  # none, then wide.png's


@pytest.mark.unit
def test_a_batch_without_images_gets_llamafactorys_fake_image_which_changes_no_loss(tiny_vl):
    """Under a vision-language model a batch without images carries a white 64x64 image in unattended, unlearned
    tokens after its first row (KTO's mismatched rows too), as LLaMA-Factory's collator adds it: the tower runs on
    every rank (ZeRO-3 needs it), and the loss is the one without it."""
    import torch
    from transformers import AutoImageProcessor, AutoModelForImageTextToText

    from rayft.data.collator import ImageCollator, KTOCollator, SupervisedCollator
    from rayft.data.media import fake_image
    from rayft.data.templates import get_template
    from rayft.data.tokenizer import TokenizerSpec, load_tokenizer

    tokenizer = load_tokenizer(TokenizerSpec(str(tiny_vl)))
    geometry, tokens = ImageGeometry.read(str(tiny_vl), *LIMITS), get_template("qwen2_vl").media_tokens
    fake = fake_image(tokenizer, geometry, tokens)
    image_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    processor = AutoImageProcessor.from_pretrained(tiny_vl)
    rows = [{"input_ids": tokenizer.encode(text), "labels": tokenizer.encode(text), "images": "[]"}
            for text in ("what is three plus three", "six")]
    plain = SupervisedCollator(tokenizer.pad_token_id)(rows)
    batch = ImageCollator(SupervisedCollator(tokenizer.pad_token_id), processor, image_id, geometry,
                          fake=fake)(rows)
    width = plain["input_ids"].shape[1]
    assert batch["input_ids"].shape[1] == width + len(fake.ids) and batch["input_ids"][0, width:].tolist() == list(
        fake.ids)
    assert batch["attention_mask"][:, width:].sum() == 0 and (batch["labels"][:, width:] == -100).all()
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4]] and batch["mm_token_type_ids"].sum() == 4
    model = AutoModelForImageTextToText.from_pretrained(tiny_vl)
    with torch.no_grad():
        alone = model(**plain, mm_token_type_ids=torch.zeros_like(plain["input_ids"])).loss
        with_fake = model(**batch).loss
    assert float(with_fake) == pytest.approx(float(alone), abs=1e-5)
    kto = [{**row, "kl_input_ids": row["input_ids"], "kl_labels": row["labels"], "kto_tag": True} for row in rows]
    batch = ImageCollator(KTOCollator(tokenizer.pad_token_id), processor, image_id, geometry, fake=fake)(kto)
    assert batch["kl_input_ids"].shape == batch["input_ids"].shape and batch["kl_mm_token_type_ids"].sum() == 4
