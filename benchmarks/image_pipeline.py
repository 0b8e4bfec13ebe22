"""Images through read, decode and preprocess: rayft against LLaMA-Factory 0.9.5 on the same generated rows, two
processes each (the machine's two CPUs).

    .venv/bin/python benchmarks/image_pipeline.py [--images 20000] [--lf-venv PATH]

Each row is a sharegpt conversation with one `<image>` (a JPEG of 96-640 px a side). The image processor is
Qwen2-VL's own, at its published defaults (patch 14, 2x2 merge, 3,136 to 1,003,520 pixels), image_max_pixels at
LLaMA-Factory's default.
- rayft: tokenising reads each image's header (its size gives its token count; data/media.py) and encodes the row;
  the workers' collator decodes and preprocesses each image once (`ImageCollator`).
- LLaMA-Factory: its supervised processor decodes and preprocesses each image while tokenising (to count its
  tokens), and its collator does it again (`get_mm_inputs`).
Also printed: what one image would weigh in Ray's object store if Ray Data tasks preprocessed the pixels ahead of
the workers, against the path rayft keeps there.
"""

import argparse
import json
import subprocess
from multiprocessing import Pool
from pathlib import Path

from common import ROOT, table, write
from pool_phases import timed_phases

BENCH = ROOT / ".cache" / "bench_images"
MODEL = ROOT / ".cache" / "models" / "tiny-qwen2-vl-bench"
CHUNK, BATCH = 500, 8
PROCESSES = 2


def prepare(count: int) -> list[dict]:
    """The rows (and, once, their images and the model), under .cache/."""
    import numpy as np
    from PIL import Image

    from rayft.trainers.tiny_model import write_tiny_model

    if not (MODEL / "config.json").is_file():
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        write_tiny_model(MODEL, sorted((ROOT / "data" / "demo").glob("demo_*.json")), family="qwen2_vl")
        Qwen2VLImageProcessorPil(patch_size=14, merge_size=2, temporal_patch_size=2).save_pretrained(MODEL)
    (BENCH / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(count):
        path = BENCH / "images" / f"{i}.jpg"
        width, height = (int(v) for v in rng.integers(96, 641, 2))
        if not path.is_file():
            x, y = np.meshgrid(np.arange(width), np.arange(height))
            pixels = np.stack([(x * (i % 7 + 1)) % 256, (y * 3) % 256, ((x + y + i) * 2) % 256], -1)
            Image.fromarray(pixels.astype(np.uint8)).save(path, quality=85)
        rows.append({"messages": [{"role": "user", "content": f"<image>What is in picture {i}?"},
                                  {"role": "assistant", "content": f"Stripes, number {i}."}],
                     "images": [f"images/{i}.jpg"]})
    (BENCH / "rows.json").write_text(json.dumps(rows))
    return rows


def _rayft_tokenise(rows: list[dict]) -> list[dict]:
    from rayft.data.converters import sharegpt
    from rayft.data.media import ImageGeometry, attach_images
    from rayft.data.pipeline import EncodingSettings, columns_of, encode_batch
    from rayft.data.registry import DatasetAttr
    from rayft.data.tokenizer import TokenizerSpec

    attr = DatasetAttr(name="bench", formatting="sharegpt", columns={"messages": "messages", "images": "images"},
                       tags={"role_tag": "role", "content_tag": "content", "user_tag": "user",
                             "assistant_tag": "assistant"})
    examples = [attach_images(sharegpt(row, attr), row, "images", str(BENCH)) for row in rows]
    settings = EncodingSettings("qwen2_vl", 4096, images=ImageGeometry.read(str(MODEL), 768 * 768, 32 * 32))
    out = encode_batch(columns_of(examples), TokenizerSpec(str(MODEL)), settings)
    return [{"input_ids": ids.tolist(), "labels": labels.tolist(), "images": images}
            for ids, labels, images in zip(out["input_ids"], out["labels"], out["images"])]


_COLLATOR = None


def _rayft_collate(batch: list[dict]) -> int:
    """One batch through the workers' collator; returns the pixel bytes it made."""
    global _COLLATOR
    if _COLLATOR is None:
        from transformers import AutoImageProcessor

        from rayft.data.collator import ImageCollator, SupervisedCollator
        from rayft.data.media import ImageGeometry
        from rayft.data.tokenizer import TokenizerSpec, load_tokenizer

        tokenizer = load_tokenizer(TokenizerSpec(str(MODEL)))
        _COLLATOR = ImageCollator(SupervisedCollator(tokenizer.pad_token_id), AutoImageProcessor.from_pretrained(MODEL),
                                  tokenizer.convert_tokens_to_ids("<|image_pad|>"),
                                  ImageGeometry.read(str(MODEL), 768 * 768, 32 * 32))
    pixels = _COLLATOR(batch)["pixel_values"]
    return pixels.numel() * pixels.element_size()


def rayft_side(rows: list[dict]) -> dict:
    with Pool(PROCESSES) as pool:
        encoded, per_batch, tokenised, collated = timed_phases(pool, PROCESSES, rows, CHUNK, BATCH, _rayft_tokenise,
                                                               _rayft_collate)
    pixel_bytes = sum(per_batch)
    path_bytes = sum(len(row["images"]) for row in encoded) / len(encoded)
    return {"tokenise_s": tokenised, "collate_s": collated, "pixel_bytes_per_image": pixel_bytes / len(encoded),
            "path_bytes_per_image": path_bytes}


LF_SCRIPT = r"""
import json, sys
from multiprocessing import Pool
from types import SimpleNamespace
bench, model, chunk, batch, processes, benchmarks = (sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]),
                                                     int(sys.argv[5]), sys.argv[6])
state = {}

def setup():
    if state:
        return state
    from llamafactory.data.converter import get_dataset_converter
    from llamafactory.data.parser import DatasetAttr
    from llamafactory.data.processor import SupervisedDatasetProcessor
    from llamafactory.data.template import get_template_and_fix_tokenizer
    from llamafactory.hparams import DataArguments
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    data_args = DataArguments(template="qwen2_vl", cutoff_len=4096, dataset_dir=bench)
    tokenizer = AutoTokenizer.from_pretrained(model)
    template = get_template_and_fix_tokenizer(tokenizer, data_args)
    processor = SimpleNamespace(image_processor=Qwen2VLImageProcessorPil.from_pretrained(model),
                                image_max_pixels=768 * 768, image_min_pixels=32 * 32)
    attr = DatasetAttr("file", "bench", formatting="sharegpt", images="images", messages="messages", role_tag="role",
                       content_tag="content", user_tag="user", assistant_tag="assistant")
    state.update(converter=get_dataset_converter("sharegpt", attr, data_args), template=template,
                 processor=processor, encode=SupervisedDatasetProcessor(template, tokenizer, processor, data_args))
    return state

def tokenise(rows):
    s = setup()
    aligned = [s["converter"](row) for row in rows]
    out = s["encode"].preprocess_dataset({k: [a[k] for a in aligned] for k in aligned[0]})
    return [(ids, images) for ids, images in zip(out["input_ids"], [a["_images"] for a in aligned])]

def collate(items):
    s = setup()
    images = [i for _, imgs in items for i in imgs]
    mm = s["template"].mm_plugin.get_mm_inputs(images, [], [], [len(imgs) for _, imgs in items], [0] * len(items),
                                               [0] * len(items), [ids for ids, _ in items], s["processor"])
    return int(mm["pixel_values"].numel())

if __name__ == "__main__":
    sys.path.insert(0, benchmarks)
    from pool_phases import timed_phases

    rows = json.load(open(f"{bench}/rows.json"))
    with Pool(processes) as pool:
        _, _, tokenised, collated = timed_phases(pool, processes, rows, chunk, batch, tokenise, collate)
    print(json.dumps({"tokenise_s": tokenised, "collate_s": collated}))
"""


def llamafactory_side(lf_python: str) -> dict:
    script = BENCH / "lf_side.py"
    script.write_text(LF_SCRIPT)
    done = subprocess.run([lf_python, str(script), str(BENCH), str(MODEL), str(CHUNK), str(BATCH), str(PROCESSES),
                           str(Path(__file__).parent)],
                          capture_output=True, text=True, env={"DISABLE_VERSION_CHECK": "1", "PATH": "/usr/bin:/bin"},
                          cwd=BENCH)
    if done.returncode != 0:
        raise SystemExit(f"LLaMA-Factory's side failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--lf-venv", default=str(ROOT / ".cache" / "lf-venv"),
                        help="a virtual environment with llamafactory 0.9.5 (and rayft's Pillow)")
    args = parser.parse_args()
    rows = prepare(args.images)
    mine = rayft_side(rows)
    theirs = llamafactory_side(str(Path(args.lf_venv) / "bin" / "python"))
    n = len(rows)
    lines = []
    for tool, r in (("rayft", mine), ("LLaMA-Factory", theirs)):
        lines.append({"tool": tool, "tokenise img/s": n / r["tokenise_s"], "collate img/s": n / r["collate_s"],
                      "read+decode+preprocess img/s": n / (r["tokenise_s"] + r["collate_s"])})
    ratio = lines[0]["read+decode+preprocess img/s"] / lines[1]["read+decode+preprocess img/s"]
    print(f"{n} images, {PROCESSES} processes each, chunks of {CHUNK} rows, batches of {BATCH}")
    print(table(lines, list(lines[0])))
    print(f"rayft / LLaMA-Factory, read + decode + preprocess: {ratio:.2f}x")
    print(f"in Ray's object store per image: preprocessed pixels {mine['pixel_bytes_per_image'] / 2**20:.2f} MB "
          f"(float32 patches), rayft's path {mine['path_bytes_per_image']:.0f} bytes")
    write("image_pipeline", {"images": n, "rayft": mine, "llamafactory": theirs, "ratio": ratio})


if __name__ == "__main__":
    main()
