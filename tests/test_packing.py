"""Packing: density, label masking at example boundaries, and neat_packing's loss equivalence."""

import numpy as np
import pytest
import torch
from conftest import ROOT

from rayft.data.collator import SupervisedCollator
from rayft.data.encode import IGNORE_INDEX
from rayft.data.packing import first_fit_decreasing, pack_batch
from rayft.data.pipeline import EncodingSettings, encode_batch, load_examples
from rayft.data.tokenizer import TokenizerSpec

pytestmark = pytest.mark.unit


def encoded(tiny_model, count, cutoff_len=256):
    examples = load_examples("demo_sft", str(ROOT / "data" / "demo"), count)
    return encode_batch({"system": [e["system"] for e in examples], "messages": [e["messages"] for e in examples]},
                        TokenizerSpec(str(tiny_model)), EncodingSettings("chatml", cutoff_len))


def test_first_fit_decreasing_respects_capacity_and_keeps_every_item():
    lengths = [7, 3, 5, 2, 9, 1, 4]
    bins = first_fit_decreasing(lengths, capacity=10)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    assert len(bins) == 4  # 31 tokens need at least 4 bins of 10


def test_pack_batch_masks_the_first_label_of_every_example(tiny_model):
    batch = encoded(tiny_model, 12)
    packed = pack_batch(batch, cutoff_len=128, neat=True)
    assert sum(packed["num_tokens"]) == sum(len(ids) for ids in batch["input_ids"])
    assert all(len(ids) <= 128 for ids in packed["input_ids"])
    assert len(packed["input_ids"]) < 12
    for positions, labels in zip(packed["position_ids"], packed["labels"]):
        starts = np.flatnonzero(positions == 0)
        assert (labels[starts] == IGNORE_INDEX).all()
    plain = pack_batch(batch, cutoff_len=128, neat=False)
    assert all((p == np.arange(len(p))).all() for p in plain["position_ids"])


def test_packing_raises_the_share_of_real_tokens_per_batch(tiny_model):
    batch = encoded(tiny_model, 64)
    rows = [{"input_ids": i, "labels": lab} for i, lab in zip(batch["input_ids"], batch["labels"])]
    packed = pack_batch(batch, cutoff_len=256, neat=True)
    packed_rows = [{"input_ids": i, "labels": lab, "position_ids": p}
                   for i, lab, p in zip(packed["input_ids"], packed["labels"], packed["position_ids"])]
    collate = SupervisedCollator(pad_token_id=0)

    def real_share(examples, size):
        batches = [collate(examples[i:i + size]) for i in range(0, len(examples), size)]
        real = sum(sum(len(e["input_ids"]) for e in examples[i:i + size]) for i in range(0, len(examples), size))
        return real / sum(b["input_ids"].numel() for b in batches)

    assert real_share(packed_rows, 2) > real_share(rows, 8) + 0.05


def test_neat_packing_loss_equals_the_token_weighted_mean_of_separate_losses(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False  # as in training: with a KV cache Transformers ignores packed position_ids
    model.eval()
    batch = encoded(tiny_model, 5)
    packed = pack_batch(batch, cutoff_len=1024, neat=True)
    assert len(packed["input_ids"]) == 1
    collate = SupervisedCollator(pad_token_id=0)
    with torch.no_grad():
        packed_batch = collate([{"input_ids": packed["input_ids"][0], "labels": packed["labels"][0],
                                 "position_ids": packed["position_ids"][0]}])
        packed_loss = model(**packed_batch).loss.item()
        total, count = 0.0, 0
        for ids, labels in zip(batch["input_ids"], batch["labels"]):
            single = collate([{"input_ids": ids, "labels": labels}])
            trained = int((single["labels"][:, 1:] != IGNORE_INDEX).sum())
            total += model(**single).loss.item() * trained
            count += trained
    assert packed_loss == pytest.approx(total / count, rel=1e-4)

    # Without neat packing, examples attend to each other and the loss differs.
    plain = pack_batch(batch, cutoff_len=1024, neat=False)
    with torch.no_grad():
        plain_loss = model(**collate([{"input_ids": plain["input_ids"][0], "labels": plain["labels"][0],
                                       "position_ids": plain["position_ids"][0]}])).loss.item()
    assert abs(plain_loss - total / count) > 1e-3
