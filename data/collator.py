"""Batches examples by padding to the batch's longest sequence (never to cutoff_len)."""

import torch

from rayft.data.encode import IGNORE_INDEX


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
