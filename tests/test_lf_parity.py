"""Token parity with LLaMA-Factory 0.9.5: rayft encodes the golden rows as LLaMA-Factory did, for every text template.

tests/golden/ was written by tools/lf_golden.py from an installed LLaMA-Factory: the rows, their dataset_info
entries, one tokenizer holding every family's special tokens, and LLaMA-Factory's input_ids and labels of the
supervised, pairwise and feedback (KTO) processors at several cutoff lengths. No Ray.
"""

import gzip
import json
from pathlib import Path

import pytest

from rayft.data.errors import DataError
from rayft.data.pipeline import (
    EncodingSettings,
    columns_of,
    encode_batch,
    encode_kto_batch,
    encode_pairwise_batch,
    load_datasets,
)
from rayft.data.templates import supports_tools, template_names
from rayft.data.tokenizer import TokenizerSpec

pytestmark = pytest.mark.unit

GOLDEN = Path(__file__).parent / "golden"
ENCODERS = {"sft": (encode_batch, "supervised", ("input_ids", "labels")),
            "rm": (encode_pairwise_batch, "preference",
                   ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")),
            "kto": (encode_kto_batch, "kto", ("input_ids", "labels", "kl_input_ids", "kl_labels"))}
# (template, dataset) pairs where rayft deliberately encodes differently; none today
DELIBERATE = {}


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    with gzip.open(GOLDEN / "lf_encodings.json.gz", "rt", encoding="utf-8") as f:
        data = json.load(f)
    folder = tmp_path_factory.mktemp("golden_data")
    (folder / "dataset_info.json").write_text(json.dumps({n: d["attr"] for n, d in data["datasets"].items()}))
    for d in data["datasets"].values():
        (folder / d["attr"]["file_name"]).write_text(json.dumps(d["rows"], ensure_ascii=False))
    data["folder"] = str(folder)
    return data


def test_every_text_template_of_llamafactory_is_registered(golden):
    assert sorted(golden["cases"]) == template_names()
    assert len(template_names()) >= 70


@pytest.mark.parametrize("template", template_names())
def test_encodings_match_llamafactory_token_for_token(golden, template):
    spec = TokenizerSpec(str(GOLDEN / "tokenizer"))
    compared = 0
    for dataset, by_cutoff in golden["cases"][template].items():
        stage = golden["stages"][dataset]
        encoder, data, keys = ENCODERS[stage]
        if dataset == "glaive_toolcall_en_demo" and not supports_tools(template):  # a tool format rayft lacks
            with pytest.raises(DataError, match="format, which is not built"):
                load_datasets(dataset, golden["folder"], None, data=data, stage=stage, template=template)
            continue
        examples = load_datasets(dataset, golden["folder"], None, data=data, stage=stage, template=template)[0]
        for cutoff, expected in by_cutoff.items():
            assert "error" not in expected, expected
            out = encoder(columns_of(examples), spec, EncodingSettings(template, int(cutoff), stage=stage))
            for key in keys:
                got = [list(map(int, ids)) for ids in out[key]]
                assert got == expected[key], f"{template} {dataset} cutoff {cutoff}: {key} differs"
                compared += len(got)
            if stage == "kto":
                assert list(map(bool, out["kto_tag"])) == expected["kto_tags"]
    assert compared >= 20
