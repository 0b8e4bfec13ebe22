"""Batches examples by padding to the batch's longest sequence (never to cutoff_len)."""

import json

import torch

from rayft.data.encode import IGNORE_INDEX
from rayft.data.errors import DataError
from rayft.data.media import FakeImage, cross_attention_mask, image_inputs


class SupervisedCollator:
    """Pads input_ids with the pad token, labels with `label_pad_id` (IGNORE_INDEX: padding is not learned),
    and builds the attention mask.

    Packed examples carry position_ids; they get no attention mask, so that Transformers derives the
    block-diagonal mask from the position_ids (neat_packing) instead of one causal mask over the row.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None, label_pad_id: int = IGNORE_INDEX):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.label_pad_id = label_pad_id

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(e["input_ids"]) for e in examples)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(examples), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), longest), self.label_pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
        packed = "position_ids" in examples[0]
        # padding continues as a sequence of its own: its labels are ignored and nothing attends to it
        position_ids = torch.arange(longest).repeat(len(examples), 1) if packed else None
        for row, example in enumerate(examples):
            n = len(example["input_ids"])
            input_ids[row, :n] = torch.as_tensor(example["input_ids"])
            labels[row, :n] = torch.as_tensor(example["labels"])
            attention_mask[row, :n] = 1
            if packed:
                position_ids[row, :n] = torch.as_tensor(example["position_ids"])
                position_ids[row, n:] = torch.arange(longest - n)
        if packed:
            return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


class PairwiseCollator:
    """Preference pairs (stages rm and dpo) as one batch: the chosen sequences, then the rejected ones.

    One padded batch lets a single forward pass score both sides.
    """

    def __init__(self, pad_token_id: int):
        self.pad = SupervisedCollator(pad_token_id)

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        rows = [{"input_ids": e[f"{side}_input_ids"], "labels": e[f"{side}_labels"]}
                for side in ("chosen", "rejected") for e in examples]
        return self.pad(rows)


class KTOCollator:
    """KTO examples and their mismatched KL pairs, padded to one length; `kto_tag` marks desirable ones."""

    def __init__(self, pad_token_id: int):
        self.pad = SupervisedCollator(pad_token_id)

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        rows = [{"input_ids": e[f"{prefix}input_ids"], "labels": e[f"{prefix}labels"]}
                for prefix in ("", "kl_") for e in examples]
        batch = self.pad(rows)
        n = len(examples)
        out = {key: value[:n] for key, value in batch.items()}
        out.update({f"kl_{key}": value[n:] for key, value in batch.items()})
        out["kto_tag"] = torch.tensor([bool(e["kto_tag"]) for e in examples])
        return out


class ImageCollator:
    """Batches with their images, as LLaMA-Factory's collator makes them: each batch's images decoded, resized by
    LLaMA-Factory's rules and run through the model's image processor here, in the worker (`pixel_values`, and for
    Qwen2-VL `image_grid_thw` and `mm_token_type_ids`, the image tokens from which it places its 3-D rotary
    positions). `pad` is the stage's collator; with `copies` 2 its rows are each example twice (preference pairs:
    the chosen sequences, then the rejected ones), and the images' pixels are repeated rather than made again.
    A batch without images gets the `fake` image. Tokenising only counted each image's tokens (`geometry`); a count
    that differs from the processor's is an error, not a silent misalignment."""

    def __init__(self, pad, image_processor, image_token_id: int, geometry, copies: int = 1,
                 fake: FakeImage | None = None):
        self.pad, self.image_processor, self.image_token_id = pad, image_processor, image_token_id
        self.geometry, self.copies, self.fake = geometry, copies, fake

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.pad(examples)
        rows = [json.loads(e.get("images") or "[]") for e in examples]
        per_row, sources = [len(row) for row in rows], [path for row in rows for path in row]
        copies = self.copies
        if not sources and self.fake is not None:
            batch, sources, copies = self._with_fake_image(batch), [self.fake.png], 1
            per_row = [1] + [0] * (len(batch["input_ids"]) - 1)  # the first row holds it, of every row
        batch.update(image_inputs(self.image_processor, self.geometry, sources, batch["input_ids"],
                                  self.image_token_id, copies, per_row))
        if "kl_input_ids" in batch:  # KTO's mismatched pairs keep their examples' prompts, so the same pixels
            kl = image_inputs(self.image_processor, self.geometry, [], batch["kl_input_ids"], self.image_token_id)
            found = int((batch["kl_input_ids"] == self.image_token_id).sum())
            if found != int((batch["input_ids"] == self.image_token_id).sum()):
                raise DataError(f"KTO's mismatched pairs hold {found} image tokens, their examples a different count")
            if "aspect_ratio_ids" in batch:  # Mllama: the mismatched rows read the same tiles from their own places
                kl["cross_attention_mask"] = cross_attention_mask(batch["kl_input_ids"], self.image_token_id,
                                                                  batch["aspect_ratio_ids"], batch["aspect_ratio_mask"])
            batch.update({f"kl_{k}": v for k, v in kl.items()})
        return batch

    def _with_fake_image(self, batch: dict) -> dict:
        """Every row one fake image longer: the first row's extension holds its tokens, the others padding; all of
        it unattended (attention 0) and unlearned (IGNORE_INDEX). KTO's mismatched rows the same way."""
        fake = torch.tensor(self.fake.ids)
        out = dict(batch)
        for prefix in ("", "kl_") if "kl_input_ids" in batch else ("",):
            ids = batch[f"{prefix}input_ids"]
            extension = torch.full((len(ids), len(fake)), self.fake.pad_id, dtype=ids.dtype)
            extension[0] = fake
            out[f"{prefix}input_ids"] = torch.cat([ids, extension], dim=1)
            for key, fill in (("attention_mask", 0), ("labels", IGNORE_INDEX)):
                if f"{prefix}{key}" in batch:
                    values = batch[f"{prefix}{key}"]
                    out[f"{prefix}{key}"] = torch.cat([values, torch.full_like(extension, fill)], dim=1)
        return out
