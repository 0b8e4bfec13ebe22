"""Checks the golden multimodal encodings against LLaMA-Factory's own processor loading.

tools/lf_mm_golden.py hands LLaMA-Factory's encoding code the model's PIL image processor, because LLaMA-Factory
loads its processor with `AutoProcessor`, which needs torchvision. In an environment that has torchvision (the CUDA
wheels of torch and torchvision run on a CPU), this tool lets LLaMA-Factory load the processor itself
(`llamafactory.model.load_tokenizer`), encodes the same rows with its supervised processor, and compares the
input_ids and labels with tests/golden/<template>/lf_mm_encodings.json, for every template and setting of the limits:

    DISABLE_VERSION_CHECK=1 /path/to/lf-vision/bin/python tools/lf_mm_processor_check.py qwen2_vl=DIR llava=DIR ...

Each DIR is the tiny model `rayft tiny-model --family TEMPLATE DIR` wrote (its tokenizer is the golden one).
Prints one line per template and setting; exits 1 if any row differs.
"""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

from lf_mm_golden import ENTRY, GOLDEN, _processed  # noqa: E402  (the golden tool's own rows and converter)


def check(template_name: str, model_dir: str) -> bool:
    from llamafactory.data.processor import SupervisedDatasetProcessor
    from llamafactory.data.template import get_template_and_fix_tokenizer
    from llamafactory.hparams import DataArguments, ModelArguments
    from llamafactory.model import load_tokenizer

    out = GOLDEN / template_name
    if (Path(model_dir) / "tokenizer.json").read_text() != (out / "tokenizer.json").read_text():
        raise SystemExit(f"{model_dir}'s tokenizer is not the golden one of {template_name}")
    same = True
    for case in json.loads((out / "lf_mm_encodings.json").read_text())["cases"]:
        model_args = ModelArguments(model_name_or_path=model_dir, image_max_pixels=case["image_max_pixels"],
                                    image_min_pixels=case["image_min_pixels"])
        loaded = load_tokenizer(model_args)
        tokenizer, processor = loaded["tokenizer"], loaded["processor"]
        data_args = DataArguments(template=template_name, cutoff_len=case["cutoff_len"], dataset_dir=str(out))
        template = get_template_and_fix_tokenizer(tokenizer, data_args)
        _, encoded = _processed(out, "shapes", ENTRY, SupervisedDatasetProcessor,
                                (template, tokenizer, processor, data_args))
        differ = [i for i, row in enumerate(case["rows"])
                  if list(encoded["input_ids"][i]) != row["input_ids"] or list(encoded["labels"][i]) != row["labels"]]
        print(f"{template_name} (image_max_pixels={case['image_max_pixels']}, image_min_pixels="
              f"{case['image_min_pixels']}): {type(processor).__name__} with {type(processor.image_processor).__name__}"
              f", {len(case['rows']) - len(differ)}/{len(case['rows'])} rows equal" + (f", differ: {differ}" if differ
                                                                                     else ""))
        same = same and not differ
    return same


if __name__ == "__main__":
    results = [check(*argument.split("=", 1)) for argument in sys.argv[1:]]
    sys.exit(0 if results and all(results) else 1)
