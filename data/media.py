"""Images in examples, as LLaMA-Factory 0.9.5 handles them: paths found under media_dir, one `<image>` placeholder per
image, and each placeholder expanded into the run of image tokens the vision tower's patches fill.

The token count is computed from an image's size alone (read from its header), with LLaMA-Factory's resize rules
and the image processor's own; tokenising never decodes pixels. The workers' collator decodes and preprocesses each
batch's images (`load_images`), as LLaMA-Factory's collator does.
"""

import io
import json
import math
import os
from dataclasses import dataclass

from rayft.data.converters import RowError
from rayft.data.errors import DataError
from rayft.data.files import read_text

IMAGE_PLACEHOLDER = "<image>"  # LLaMA-Factory's placeholder in a message's text
# Qwen2-VL's processor refuses an aspect ratio above 200; LLaMA-Factory squeezes such an image to 180 first
QWEN_MAX_RATIO, QWEN_SQUEEZED_RATIO, QWEN_MIN_SIDE = 200, 180, 28
QWEN_PLUGINS = ("qwen2_vl", "qwen3_vl")  # Qwen3-VL's plugin encodes images as Qwen2-VL's does (its patch is 16)
# a batch's image inputs that describe its images rather than its sequences (image_sizes: LLaVA-NeXT's, to unpad tiles;
# aspect_ratio_ids and aspect_ratio_mask: Mllama's tiles)
PIXEL_KEYS = ("pixel_values", "image_grid_thw", "image_sizes", "aspect_ratio_ids", "aspect_ratio_mask")
# and those with a row per sequence, beside input_ids (where the image tokens are, and what attends to the images)
SEQUENCE_IMAGE_KEYS = ("mm_token_type_ids", "token_type_ids", "cross_attention_mask")
# plugins whose model takes each row's images as a group (pixel_values per row, not per image), and whose text
# attends to them through a cross-attention mask: Mllama's
ROW_GROUPED_PLUGINS = ("mllama",)


@dataclass(frozen=True)
class ImageGeometry:
    """What the count of an image's tokens depends on: the template's plugin, the recipe's pixel limits
    (image_max_pixels, image_min_pixels, applied first, as LLaMA-Factory does) and the model's image processor.
    Qwen2-VL's and Qwen3-VL's: its patch, its merge of patches into one token and its own pixel limits. LLaVA's
    (`llava`): every image is cropped to one size, so every image is `fixed_tokens` tokens. Gemma 3's likewise, each
    image's tokens between `opening` and `closing` (its begin- and end-of-image tokens and blank lines). LLaVA-NeXT's
    (`llava_next`): an image is tiled in `crop`-sized tiles onto the best of the `pinpoints` resolutions, and becomes a
    base tile's tokens, the tiles' tokens without their padding and a newline token per row (`extra_tokens`: the
    processor's additional tokens net of the CLS feature that its default strategy leaves out). Mllama's (`mllama`):
    every image is one token, which the text after it reads through cross-attention to the image's tiles."""

    max_pixels: int
    min_pixels: int
    patch_size: int
    merge_size: int = 1
    processor_min_pixels: int = 0
    processor_max_pixels: int = 0
    plugin: str = "qwen2_vl"
    fixed_tokens: int | None = None
    opening: str = ""  # what comes before an image's tokens where the template's plugin has no vision start token
    closing: str = ""
    pinpoints: tuple[tuple[int, int], ...] = ()  # LLaVA-NeXT's tile grid resolutions, (height, width)
    crop: tuple[int, int] = (0, 0)  # LLaVA-NeXT's tile, (height, width)
    extra_tokens: int = 0

    @classmethod
    def read(cls, model_path: str, max_pixels: int, min_pixels: int, plugin: str = "qwen2_vl") -> "ImageGeometry":
        """The geometry of the model at `model_path` (its preprocessor_config.json, and for LLaVA its
        processor_config.json) under the recipe's limits."""
        if plugin == "mllama":  # Mllama: an image is its one token; its tiles reach the text by cross-attention
            return cls(max_pixels, min_pixels, patch_size=0, plugin=plugin, fixed_tokens=1)
        if plugin == "gemma3":  # Gemma 3: every image the processor's image_seq_length tokens, between blank lines
            processor, tokenizer = (_json_file(model_path, name) for name in ("processor_config.json",
                                                                              "tokenizer_config.json"))
            return cls(max_pixels, min_pixels, patch_size=0, plugin=plugin, fixed_tokens=processor["image_seq_length"],
                       opening=f"\n\n{tokenizer['boi_token']}", closing=f"{tokenizer['eoi_token']}\n\n")
        if plugin in ("llava", "llava_next"):  # LLaVA's processor: the tower's patch and its extra tokens (CLS)
            processor = _json_file(model_path, "processor_config.json")
            # the image processor's own file, or (as Transformers 5 saves a processor) its section of the processor's
            config = _json_file(model_path, "preprocessor_config.json", required=False) or processor["image_processor"]
            crop = config.get("crop_size") or {"height": config["size"]["shortest_edge"]}
            height, width = crop["height"], crop.get("width", crop["height"])
            patch = processor["patch_size"]
            extra = processor.get("num_additional_image_tokens", 0)
            if processor.get("vision_feature_select_strategy", "default") == "default":
                extra -= 1  # the CLS token's feature is left out
            if plugin == "llava_next":
                return cls(max_pixels, min_pixels, patch_size=patch, plugin=plugin, crop=(height, width),
                           pinpoints=tuple(map(tuple, config["image_grid_pinpoints"])), extra_tokens=extra)
            return cls(max_pixels, min_pixels, patch_size=patch, plugin=plugin,
                       fixed_tokens=(height // patch) * (width // patch) + extra)
        config = _json_file(model_path, "preprocessor_config.json")
        size = config.get("size") or {}
        return cls(max_pixels=max_pixels, min_pixels=min_pixels, patch_size=config["patch_size"],
                   merge_size=config["merge_size"],
                   processor_min_pixels=size.get("shortest_edge", config.get("min_pixels", 56 * 56)),
                   processor_max_pixels=size.get("longest_edge", config.get("max_pixels", 28 * 28 * 1280)))


def _json_file(model_path: str, name: str, required: bool = True) -> dict:
    text = read_text(f"{model_path.rstrip('/')}/{name}")
    if text is None and required:
        raise FileNotFoundError(f"{model_path} holds no {name} (the model's image processor)")
    return json.loads(text) if text is not None else {}


def limit_steps(width: int, height: int, max_pixels: int, min_pixels: int) -> list[tuple[int, int]]:
    """The sizes LLaMA-Factory resizes every image to, in order: scaled down to at most `max_pixels`, then up to at
    least `min_pixels`, each side truncated to whole pixels."""
    steps = []
    if width * height > max_pixels:
        factor = math.sqrt(max_pixels / (width * height))
        width, height = int(width * factor), int(height * factor)
        steps.append((width, height))
    if width * height < min_pixels:
        factor = math.sqrt(min_pixels / (width * height))
        width, height = int(width * factor), int(height * factor)
        steps.append((width, height))
    return steps


def qwen_steps(width: int, height: int) -> list[tuple[int, int]]:
    """The further sizes LLaMA-Factory's Qwen2-VL and Qwen3-VL plugins resize an image to: sides under 28 px raised to
    28, then an aspect ratio above 200 squeezed to 180."""
    steps = []
    if min(width, height) < QWEN_MIN_SIDE:
        width, height = max(width, QWEN_MIN_SIDE), max(height, QWEN_MIN_SIDE)
        steps.append((width, height))
    if width / height > QWEN_MAX_RATIO:
        width = height * QWEN_SQUEEZED_RATIO
        steps.append((width, height))
    if height / width > QWEN_MAX_RATIO:
        height = width * QWEN_SQUEEZED_RATIO
        steps.append((width, height))
    return steps


def resize_steps(width: int, height: int, max_pixels: int, min_pixels: int, plugin: str = "qwen2_vl"
                 ) -> list[tuple[int, int]]:
    """Every size LLaMA-Factory resizes an image to under `plugin`, in order (each a resize of its own, so that the
    pixels match): `limit_steps`, then for the Qwen plugins `qwen_steps`."""
    steps = limit_steps(width, height, max_pixels, min_pixels)
    if plugin in QWEN_PLUGINS:
        steps += qwen_steps(*(steps[-1] if steps else (width, height)))
    return steps


def regularized_size(width: int, height: int, max_pixels: int, min_pixels: int, plugin: str = "qwen2_vl"
                     ) -> tuple[int, int]:
    """An image's size after LLaMA-Factory's resizes (`resize_steps`)."""
    steps = resize_steps(width, height, max_pixels, min_pixels, plugin)
    return steps[-1] if steps else (width, height)


def resized_to_patches(width: int, height: int, geometry: ImageGeometry) -> tuple[int, int]:
    """(height, width) the image processor resizes to: multiples of patch x merge, within its pixel limits, the
    aspect ratio kept as closely as that allows (Qwen2-VL's rule)."""
    factor = geometry.patch_size * geometry.merge_size
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > geometry.processor_max_pixels:
        beta = math.sqrt(height * width / geometry.processor_max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < geometry.processor_min_pixels:
        beta = math.sqrt(geometry.processor_min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def image_token_count(width: int, height: int, geometry: ImageGeometry) -> int:
    """How many image tokens an image of `width` x `height` pixels becomes (`regularized_token_count` of its size
    after LLaMA-Factory's resizes)."""
    if geometry.fixed_tokens is not None:
        return geometry.fixed_tokens
    return regularized_token_count(*regularized_size(width, height, geometry.max_pixels, geometry.min_pixels,
                                                     geometry.plugin), geometry)


def regularized_token_count(width: int, height: int, geometry: ImageGeometry) -> int:
    """How many image tokens an image becomes that LLaMA-Factory's resizes already gave `width` x `height` pixels:
    LLaVA's and Gemma 3's fixed count, LLaVA-NeXT's tiles (`llava_next_token_count`), or for Qwen2-VL its patches,
    merge x merge to a token."""
    if geometry.fixed_tokens is not None:
        return geometry.fixed_tokens
    if geometry.plugin == "llava_next":
        return llava_next_token_count(width, height, geometry)
    h, w = resized_to_patches(width, height, geometry)
    return (h // geometry.patch_size) * (w // geometry.patch_size) // geometry.merge_size ** 2


def best_resolution(width: int, height: int, pinpoints) -> tuple[int, int]:
    """The (height, width) of `pinpoints` that LLaVA-NeXT tiles an image into: the one that keeps most of the image's
    pixels when it is scaled to fit, and of those the one that wastes fewest."""
    best, most_kept, least_wasted = None, 0, math.inf
    for h, w in pinpoints:
        scale = min(w / width, h / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        wasted = h * w - kept
        if kept > most_kept or kept == most_kept and wasted < least_wasted:
            best, most_kept, least_wasted = (h, w), kept, wasted
    return best


def llava_next_token_count(width: int, height: int, geometry: ImageGeometry) -> int:
    """LLaVA-NeXT's tokens for an image of `width` x `height`: the base tile's patches, the grid of tiles' patches
    with the rows or columns that only pad the image's aspect ratio left out, one newline token per row of them,
    and the processor's extra tokens."""
    tile_h, tile_w = geometry.crop
    grid_h, grid_w = best_resolution(width, height, geometry.pinpoints)
    patches_h, patches_w = tile_h // geometry.patch_size, tile_w // geometry.patch_size
    rows, cols = patches_h * (grid_h // tile_h), patches_w * (grid_w // tile_w)
    if width / height > cols / rows:  # wider than the grid: padding rows above and below
        rows -= (rows - int(round(height * cols / width, 7))) // 2 * 2
    else:
        cols -= (cols - int(round(width * rows / height, 7))) // 2 * 2
    return rows * cols + rows + patches_h * patches_w + geometry.extra_tokens


def expand_images(messages: list[dict], sizes: list, geometry: ImageGeometry, tokens: dict) -> list[dict]:
    """`messages` with each `<image>` replaced by the image's tokens: the vision start token (where the plugin has
    one), one image token per token the image becomes, the vision end token (`tokens`: the template's mm_plugin
    tokens)."""
    sizes = iter(sizes)
    opening = tokens.get("vision_bos_token") or geometry.opening
    closing = tokens.get("vision_eos_token") or geometry.closing
    expanded = []
    for message in messages:
        first, *rest = message["content"].split(IMAGE_PLACEHOLDER)  # LLaVA's image token is the placeholder itself
        runs = [tokens["image_token"] * image_token_count(*next(sizes), geometry) for _ in rest]
        content = first + "".join(f"{opening}{run}{closing}{text}" for run, text in zip(runs, rest))
        expanded.append({**message, "content": content})
    return expanded


def attach_images(example: dict, row: dict, column: str, media_dir: str) -> dict:
    """`example` with the row's images: their paths (found under `media_dir`, else as given) and sizes, read from
    each file's header. A row whose `<image>` count differs from its image count, or whose image is missing or
    unreadable, is a bad row."""
    from PIL import Image, UnidentifiedImageError  # Pillow: only a run with images imports it

    images = row.get(column)
    images = [] if images is None else [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise RowError(f"column {column!r} must be a list of image paths")
    texts = [m["content"] for m in example["messages"]] + [example.get(k, "") for k in ("chosen", "rejected")]
    placeholders = sum(text.count(IMAGE_PLACEHOLDER) for text in texts)
    if placeholders != len(images):
        raise RowError(f"{placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but {len(images)} image(s) in column "
                       f"{column!r}; each image needs one placeholder where it goes")
    paths, sizes = [], []
    for image in images:
        inside = os.path.join(media_dir, image)
        path = inside if os.path.isfile(inside) else image
        if not os.path.isfile(path):
            raise RowError(f"image {image!r} not found in media_dir {media_dir} (nor as a path of its own)")
        try:
            with Image.open(path) as opened:
                sizes.append(list(opened.size))
        except (UnidentifiedImageError, OSError) as err:
            raise RowError(f"image {image!r} cannot be read ({' '.join(str(err).split())})") from None
        paths.append(os.path.abspath(path))
    return {**example, "images": paths, "image_sizes": sizes} if images else example


def image_size(source) -> tuple[int, int]:
    """(width, height) of the image at a path or in encoded bytes, from its header."""
    from PIL import Image

    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
        return image.size


def open_image(source):
    """An image from a path or its encoded bytes (an image sent to `rayft serve`), decoded."""
    from PIL import Image

    image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    image.load()  # decoded here; a file is closed
    return image


def load_images(sources: list, max_pixels: int, min_pixels: int, plugin: str = "qwen2_vl") -> list:
    """The images at `sources` (paths, or encoded bytes), decoded, resized and converted to RGB in LLaMA-Factory's
    order (the pixel limits, RGB, then the plugin's own resizes; `resize_steps`): what the image processor
    receives in the workers' collator."""
    loaded = []
    for source in sources:
        image = open_image(source)
        for size in limit_steps(image.width, image.height, max_pixels, min_pixels):
            image = image.resize(size)
        image = image.convert("RGB") if image.mode != "RGB" else image
        for size in qwen_steps(image.width, image.height) if plugin in QWEN_PLUGINS else ():
            image = image.resize(size)
        loaded.append(image)
    return loaded


def image_inputs(image_processor, geometry: ImageGeometry, sources: list, input_ids, image_token_id: int,
                 copies: int = 1, per_row: list[int] | None = None) -> dict:
    """A model's image inputs for a batch whose `input_ids` hold the image tokens of `sources` (each repeated
    `copies` times): `pixel_values`, and for Qwen2-VL `image_grid_thw` and `mm_token_type_ids` (the image tokens, from
    which it places its 3-D rotary positions), for Gemma 3 `token_type_ids` (the same, as its attention reads them),
    for LLaVA-NeXT `image_sizes`, for Mllama its tiles' aspect ratios and `cross_attention_mask` (`per_row`: how many
    of `sources` each row of one copy holds, in order; None: all in the first row).
    Raises when the processor's patches disagree with the token count tokenising made from the images' sizes."""
    import torch

    image_tokens = input_ids == image_token_id
    out = {}
    if geometry.plugin in QWEN_PLUGINS:
        out["mm_token_type_ids"] = image_tokens.int()
    elif geometry.plugin == "gemma3":  # Gemma 3 attends bidirectionally within an image's tokens
        out["token_type_ids"] = image_tokens.long()
    if not sources:
        return out
    images = load_images(sources, geometry.max_pixels, geometry.min_pixels, geometry.plugin)
    grouped = geometry.plugin in ROW_GROUPED_PLUGINS
    if grouped:
        counts = per_row if per_row is not None else [len(images)]
        starts = [sum(counts[:i]) for i in range(len(counts))]
        pixels = image_processor([images[start:start + n] for start, n in zip(starts, counts)], return_tensors="pt")
    else:
        pixels = image_processor(images, return_tensors="pt")
    for key in PIXEL_KEYS:
        if key in pixels:
            out[key] = torch.cat([torch.as_tensor(pixels[key])] * copies)
    if "image_grid_thw" in pixels:
        expected = int((out["image_grid_thw"].prod(-1) // geometry.merge_size ** 2).sum())
    else:
        expected = copies * sum(regularized_token_count(image.width, image.height, geometry) for image in images)
    if expected != int(image_tokens.sum()):
        raise DataError(f"a batch holds {int(image_tokens.sum())} image tokens, and its {len(sources)} image(s) make "
                        f"{expected}: the image processor resizes differently from its saved configuration; re-save "
                        "the model's image processor")
    if grouped:
        out["cross_attention_mask"] = cross_attention_mask(input_ids, image_token_id, out["aspect_ratio_ids"],
                                                           out["aspect_ratio_mask"])
    return out


def cross_attention_mask(input_ids, image_token_id: int, aspect_ratio_ids, aspect_ratio_mask):
    """Mllama's (batch, length, images, tiles) mask for sequences `input_ids` over the images their rows hold
    (`aspect_ratio_ids`: 0 where a row has no image; `aspect_ratio_mask`: each image's tiles): each token reads the
    tiles of the images before it (from the last run of adjacent images on), as Mllama's processor builds it."""
    import torch
    from transformers.models.mllama.processing_mllama import (
        convert_sparse_cross_attention_mask_to_dense,
        get_cross_attention_token_mask,
    )

    tiles = [[int(mask.sum()) for ratio, mask in zip(ratios, masks) if ratio != 0]
             for ratios, masks in zip(aspect_ratio_ids, aspect_ratio_mask)]
    rows = [get_cross_attention_token_mask(ids, image_token_id) for ids in input_ids.tolist()]
    return torch.from_numpy(convert_sparse_cross_attention_mask_to_dense(
        rows, num_tiles=tiles, max_num_tiles=aspect_ratio_mask.shape[-1], length=input_ids.shape[1]))


FAKE_IMAGE_SIZE = (64, 64)  # LLaMA-Factory's fake image: white, 64 x 64


@dataclass(frozen=True)
class FakeImage:
    """What a batch without images carries under a vision-language model, as LLaMA-Factory's collator adds it: a
    white 64x64 image (`png`) and its tokens (`ids`), appended to the first row unattended and unlearned, so that
    every rank runs the vision tower in every step (under ZeRO-3 a rank that skipped it would leave the others
    waiting in its gathers). `pad_id` extends the other rows."""

    png: bytes
    ids: tuple[int, ...]
    pad_id: int


def fake_image(tokenizer, geometry: ImageGeometry, tokens: dict):
    """The `FakeImage` of a batch without images: its PNG and its expanded tokens."""
    from PIL import Image

    encoded = io.BytesIO()
    Image.new("RGB", FAKE_IMAGE_SIZE, (255, 255, 255)).save(encoded, format="PNG")
    (message,) = expand_images([{"role": "user", "content": IMAGE_PLACEHOLDER}], [FAKE_IMAGE_SIZE], geometry, tokens)
    ids = tokenizer.encode(message["content"], add_special_tokens=False)
    return FakeImage(png=encoded.getvalue(), ids=tuple(ids), pad_id=tokenizer.pad_token_id)
