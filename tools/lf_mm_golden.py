"""Writes golden multimodal encodings: LLaMA-Factory 0.9.5 encodes rows with images under its multimodal templates.

Run it with the Python of a virtual environment that has llamafactory installed (never rayft's .venv), on the tiny
models that `rayft tiny-model --family F DIR` wrote, one TEMPLATE=DIR argument for each template to write (qwen2_vl,
llava, llava_next, qwen3_vl, gemma3, mllama; each the family of the same name):
    DISABLE_VERSION_CHECK=1 /path/to/lf-venv/bin/python tools/lf_mm_golden.py qwen2_vl=DIR llava_next=DIR ...
It draws a few images of awkward sizes (a side under 28 px, an aspect ratio above 200, more pixels than the
limits), writes them, the tiny model's tokenizer and image processor and the rows to tests/golden/<template>/,
and writes there lf_mm_encodings.json: for each setting of image_max_pixels and
image_min_pixels, each row's input_ids and labels from LLaMA-Factory's supervised processor, its images' grid and
pixel sums from LLaMA-Factory's plugin, and the same rows as preference pairs through its pairwise processor.

LLaMA-Factory loads its processor with AutoProcessor, which needs torchvision; the CPU-only torch has none, so the
tool hands LLaMA-Factory's processor code the tiny model's own PIL image processor (the one rayft's workers use),
inside LLaVA-NeXT's own processor class for llava_next (LLaMA-Factory asks it for each image's token count).
The peer environment's Pillow must be rayft's (13.0.0): Pillow 11's resize differs from 13's by up to 4 levels.
"""

import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden"
# per template: the processor settings LLaMA-Factory reads from the processor beside the image processor
LLAVA = {"patch_size": 14, "num_additional_image_tokens": 1, "vision_feature_select_strategy": "default"}
TEMPLATES = {"qwen2_vl": {}, "qwen3_vl": {}, "llava": LLAVA, "llava_next": LLAVA}
# (name, width, height): a small square, a side under 28 px, an aspect ratio above 200, a large photo-like image
IMAGES = [("square.png", 100, 100), ("thin.png", 20, 300), ("strip.png", 3000, 12), ("large.png", 1100, 900),
          ("wide.png", 640, 200)]
ROWS = [
    {"messages": [{"role": "user", "content": "<image>What shape is this?"},
                  {"role": "assistant", "content": "A square."},
                  {"role": "user", "content": "And this one?<image>"},
                  {"role": "assistant", "content": "A thin line."}],
     "images": ["square.png", "thin.png"]},
    {"messages": [{"role": "user", "content": "Compare <image> with <image>."},
                  {"role": "assistant", "content": "The first is long, the second is large."}],
     "images": ["strip.png", "large.png"]},
    {"messages": [{"role": "user", "content": "What is three plus three?"},
                  {"role": "assistant", "content": "Six."}],
     "images": []},
    {"messages": [{"role": "user", "content": "<image>Describe it."},
                  {"role": "assistant", "content": "A wide picture."}],
     "images": ["wide.png"]},
]
ENTRY = {"file_name": "rows.json", "formatting": "sharegpt", "columns": {"messages": "messages", "images": "images"},
         "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}
# the same rows as preference pairs: the last answer chosen over a refusal
PAIRS = {**ENTRY, "file_name": "pairs.json", "ranking": True,
         "columns": {**ENTRY["columns"], "chosen": "chosen", "rejected": "rejected"}}
REFUSAL = {"role": "assistant", "content": "I cannot see it."}
# and as KTO's tagged examples (stage kto), every other one undesirable
FEEDBACK = {**ENTRY, "file_name": "feedback.json", "columns": {**ENTRY["columns"], "kto_tag": "kto_tag"}}
SETTINGS = [(768 * 768, 32 * 32), (64 * 64, 32 * 32), (768 * 768, 150 * 150)]
CUTOFF = 1024


def draw_images(out: Path) -> None:
    from PIL import Image

    for name, width, height in IMAGES:  # smooth gradients: small files, and resizing moves every pixel
        image = Image.new("RGB", (width, height))
        image.putdata([((x * 7) % 256, (y * 5) % 256, ((x + y) * 3) % 256) for y in range(height)
                       for x in range(width)])
        image.save(out / "images" / name)


def main(model_dir: str, template_name: str) -> None:
    from llamafactory.data.processor import (
        FeedbackDatasetProcessor,
        PairwiseDatasetProcessor,
        SupervisedDatasetProcessor,
    )
    from llamafactory.data.template import get_template_and_fix_tokenizer
    from llamafactory.hparams import DataArguments
    from transformers import AutoTokenizer, LlavaNextProcessor, MllamaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    out = GOLDEN / template_name
    images_cls = {"qwen2_vl": Qwen2VLImageProcessorPil, "qwen3_vl": Qwen2VLImageProcessorPil,
                  "llava": CLIPImageProcessorPil, "llava_next": LlavaNextImageProcessorPil,
                  "gemma3": Gemma3ImageProcessorPil, "mllama": MllamaImageProcessorPil}[template_name]
    (out / "images").mkdir(parents=True, exist_ok=True)
    files = ["tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"]
    for name in files + (["processor_config.json"] if template_name in ("llava", "llava_next", "gemma3", "mllama")
                         else []):
        shutil.copy2(Path(model_dir) / name, out / name)
    draw_images(out)
    (out / "dataset_info.json").write_text(json.dumps({"shapes": ENTRY, "shape_pairs": PAIRS,
                                                      "shape_feedback": FEEDBACK}, indent=1))
    rows = [{**r, "images": [f"images/{i}" for i in r["images"]]} for r in ROWS]
    (out / "rows.json").write_text(json.dumps(rows, indent=1))
    (out / "pairs.json").write_text(json.dumps([{**r, "messages": r["messages"][:-1], "chosen": r["messages"][-1],
                                                 "rejected": REFUSAL} for r in rows], indent=1))
    (out / "feedback.json").write_text(json.dumps([{**r, "kto_tag": i % 2 == 0} for i, r in enumerate(rows)],
                                                  indent=1))
    cases = []
    for max_pixels, min_pixels in SETTINGS:
        data_args = DataArguments(template=template_name, cutoff_len=CUTOFF, dataset_dir=str(out))
        tokenizer = AutoTokenizer.from_pretrained(out)
        template = get_template_and_fix_tokenizer(tokenizer, data_args)
        images = images_cls.from_pretrained(out)  # Qwen3-VL's plugin asks for a video processor it does not use here
        limits = dict(image_max_pixels=max_pixels, image_min_pixels=min_pixels)
        if template_name in ("llava_next", "mllama"):  # their plugins call the processor's own methods
            processor = LlavaNextProcessor(image_processor=images, tokenizer=tokenizer, **LLAVA) \
                if template_name == "llava_next" else MllamaProcessor(image_processor=images, tokenizer=tokenizer)
            for key, value in limits.items():
                setattr(processor, key, value)
        else:
            processor = SimpleNamespace(image_processor=images, video_processor=images, **limits,
                                        **TEMPLATES.get(template_name, {}),
                                        **(_gemma3(tokenizer, out) if template_name == "gemma3" else {}))
        encoding = (template, tokenizer, processor, data_args)
        columns, encoded = _processed(out, "shapes", ENTRY, SupervisedDatasetProcessor, encoding)
        rows = []
        for ids, labels, images in zip(encoded["input_ids"], encoded["labels"], columns["_images"]):
            if template_name == "mllama":  # its images grouped by row, and the text's cross-attention mask to them
                mm = template.mm_plugin.get_mm_inputs(images, [], [], [len(images)], [0], [0], [list(ids)],
                                                      processor) if images else {}
            else:
                mm = template.mm_plugin._get_mm_inputs(images or [], [], [], processor) if images else {}
            rows.append({"input_ids": list(map(int, ids)), "labels": list(map(int, labels)),
                         "image_grid_thw": mm["image_grid_thw"].tolist() if "image_grid_thw" in mm else [],
                         "pixel_sums": [float(s) for s in _per_image_sums(mm)] if mm else [],
                         **({"cross_attention_mask": mm["cross_attention_mask"][0].tolist()}
                            if "cross_attention_mask" in mm else {})})
        _, pairs = _processed(out, "shape_pairs", PAIRS, PairwiseDatasetProcessor, encoding)
        _, feedback = _processed(out, "shape_feedback", FEEDBACK, FeedbackDatasetProcessor, encoding)
        keys = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")
        kto_keys = ("input_ids", "labels", "kl_input_ids", "kl_labels")
        cases.append({"image_max_pixels": max_pixels, "image_min_pixels": min_pixels, "cutoff_len": CUTOFF,
                      "rows": rows, "pairs": [{k: list(map(int, pairs[k][i])) for k in keys}
                                              for i in range(len(pairs["chosen_input_ids"]))],
                      "feedback": [{**{k: list(map(int, feedback[k][i])) for k in kto_keys},
                                    "kto_tag": bool(feedback["kto_tags"][i])}
                                   for i in range(len(feedback["input_ids"]))]})
    from llamafactory import __version__

    (out / "lf_mm_encodings.json").write_text(json.dumps({"llamafactory": __version__, "cases": cases}) + "\n")


def _processed(out: Path, dataset: str, entry: dict, processor_cls, encoding: tuple) -> tuple[dict, dict]:
    """The dataset's rows converted by LLaMA-Factory (as columns), and run through its `processor_cls` with
    `encoding` (template, tokenizer, processor, data arguments)."""
    from llamafactory.data.converter import get_dataset_converter
    from llamafactory.data.parser import get_dataset_list

    data_args = encoding[-1]
    attr = get_dataset_list([dataset], str(out))[0]
    converter = get_dataset_converter(attr.formatting, attr, data_args)
    aligned = [converter(row) for row in json.loads((out / entry["file_name"]).read_text())]
    columns = {k: [a[k] for a in aligned] for k in aligned[0]}
    return columns, processor_cls(*encoding).preprocess_dataset(columns)


def _gemma3(tokenizer, out: Path) -> dict:
    """What Gemma 3's processor tells LLaMA-Factory's plugin: its image tokens' sequence, as Gemma3Processor builds
    it from the tokenizer's named tokens and image_seq_length."""
    count = json.loads((out / "processor_config.json").read_text())["image_seq_length"]
    sequence = f"\n\n{tokenizer.boi_token}{tokenizer.image_token * count}{tokenizer.eoi_token}\n\n"
    return {"boi_token": tokenizer.boi_token, "full_image_sequence": sequence,
            "image_token_id": tokenizer.convert_tokens_to_ids(tokenizer.image_token), "image_seq_length": count}


def _per_image_sums(mm: dict) -> list[float]:
    """Each image's pixel_values summed: its rows of patches in order (Qwen2-VL), or its own tensor (LLaVA, and
    LLaVA-NeXT's tiles with their zero padding; Mllama's, in its row's group)."""
    if mm["pixel_values"].dim() == 6:  # Mllama: (rows, images, tiles, channels, height, width), one row here
        return [float(image.double().sum()) for image in mm["pixel_values"][0]]
    if "image_grid_thw" not in mm:
        return [float(image.double().sum()) for image in mm["pixel_values"]]
    sums, start = [], 0
    for t, h, w in mm["image_grid_thw"].tolist():
        count = t * h * w
        sums.append(float(mm["pixel_values"][start:start + count].double().sum()))
        start += count
    return sums


if __name__ == "__main__":
    for argument in sys.argv[1:]:
        template, _, model = argument.partition("=")
        if template not in ("qwen2_vl", "llava", "llava_next", "qwen3_vl", "gemma3", "mllama") or not model:
            sys.exit(f"{argument!r}: give TEMPLATE=DIR, TEMPLATE one of qwen2_vl, llava, llava_next, qwen3_vl, gemma3, "
                     "mllama")
        main(model, template)
