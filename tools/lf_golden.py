"""Writes golden encodings: LLaMA-Factory 0.9.5 encodes demo rows with every template, rayft's tests compare.

Run it with the Python of a virtual environment that has llamafactory installed (never rayft's .venv):
    DISABLE_VERSION_CHECK=1 /path/to/lf-venv/bin/python tools/lf_golden.py ../shared/data/llamafactory
It reads a few rows of LLaMA-Factory's demo datasets (plus one multi-turn row with thoughts), builds one
byte-level BPE tokenizer holding every template family's special tokens, and writes tests/golden/: the
tokenizer, and lf_encodings.json.gz with the rows, their dataset_info entries, and per template, dataset and
cutoff_len the input_ids and labels of LLaMA-Factory's supervised, pairwise and feedback processors.
"""

import gzip
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "golden"
CUTOFFS = (1024, 40)
ROWS = {"alpaca_en_demo": 2, "alpaca_zh_demo": 1, "glaive_toolcall_en_demo": 2, "dpo_en_demo": 2, "kto_en_demo": 3}
THOUGHTS = {
    "file_name": "thoughts.json", "formatting": "sharegpt",
    "rows": [{"conversations": [
        {"from": "human", "value": "What is 2+3?"},
        {"from": "gpt", "value": "<think>\nAdd them.\n</think>\n\n5"},
        {"from": "human", "value": "And times 4?"},
        {"from": "gpt", "value": "That is 20."}], "system": "Answer briefly."}],
}
STAGE_OF = {"alpaca_en_demo": "sft", "alpaca_zh_demo": "sft", "glaive_toolcall_en_demo": "sft", "thoughts": "sft",
            "dpo_en_demo": "rm", "kto_en_demo": "kto"}


def build_tokenizer(texts: list[str], specials: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    base = ["<unk>", "<s>", "</s>", "<pad>"]
    trainer = trainers.BpeTrainer(vocab_size=6000, special_tokens=base + specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", additional_special_tokens=specials)
    fast.save_pretrained(OUT / "tokenizer")


def special_tokens(templates: dict) -> list[str]:
    found = []
    for t in templates.values():
        formatters = (t.format_prefix, t.format_system, t.format_user, t.format_assistant, t.format_observation,
                      t.format_function)
        for formatter in formatters:
            for slot in formatter.slots:
                if isinstance(slot, dict):
                    found.append(slot["token"])
                elif isinstance(slot, str):
                    found += re.findall(r"<\|[^|<>]+\|>|<｜[^｜<>]+｜>|<(?:start|end)_of_turn>", slot)
        found += list(t.stop_words)
    return sorted(set(found) - {"<unk>", "<s>", "</s>", "<pad>"})


def main(dataset_dir: str) -> None:
    from llamafactory.data.converter import get_dataset_converter
    from llamafactory.data.parser import get_dataset_list
    from llamafactory.data.processor import (
        FeedbackDatasetProcessor,
        PairwiseDatasetProcessor,
        SupervisedDatasetProcessor,
    )
    from llamafactory.data.template import TEMPLATES, get_template_and_fix_tokenizer
    from llamafactory.hparams import DataArguments
    from transformers import AutoTokenizer

    info = json.loads((Path(dataset_dir) / "dataset_info.json").read_text())
    datasets = {}
    for name, count in ROWS.items():
        path = Path(dataset_dir) / info[name]["file_name"]
        rows = json.loads(path.read_text())[:count]
        datasets[name] = {"attr": info[name], "rows": rows}
    datasets["thoughts"] = {"attr": {k: v for k, v in THOUGHTS.items() if k != "rows"}, "rows": THOUGHTS["rows"]}

    texts = [json.dumps(d["rows"], ensure_ascii=False) for d in datasets.values()]
    texts += [json.dumps([f.slots for f in (t.format_user, t.format_assistant, t.format_system)], default=str,
                         ensure_ascii=False) for t in TEMPLATES.values()]
    build_tokenizer(texts * 3, special_tokens(TEMPLATES))

    tmp = OUT / "_inputs"
    tmp.mkdir(exist_ok=True)
    (tmp / "dataset_info.json").write_text(json.dumps({n: d["attr"] for n, d in datasets.items()}))
    for d in datasets.values():
        (tmp / d["attr"]["file_name"]).write_text(json.dumps(d["rows"], ensure_ascii=False))

    processors = {"sft": SupervisedDatasetProcessor, "rm": PairwiseDatasetProcessor, "kto": FeedbackDatasetProcessor}
    cases = {}
    for template_name in sorted(TEMPLATES):
        if TEMPLATES[template_name].mm_plugin.__class__.__name__ != "BasePlugin":
            continue
        for dataset_name, stage in STAGE_OF.items():
            for cutoff in CUTOFFS:
                data_args = DataArguments(template=template_name, cutoff_len=cutoff, dataset_dir=str(tmp))
                tokenizer = AutoTokenizer.from_pretrained(OUT / "tokenizer")
                template = get_template_and_fix_tokenizer(tokenizer, data_args)
                if dataset_name == "glaive_toolcall_en_demo" and template.format_tools.tool_format == "llama3":
                    continue  # llama3's tool prompt holds today's date
                attr = get_dataset_list([dataset_name], str(tmp))[0]
                converter = get_dataset_converter(attr.formatting, attr, data_args)
                try:
                    aligned = [converter(row) for row in datasets[dataset_name]["rows"]]
                    columns = {k: [a[k] for a in aligned] for k in aligned[0]}
                    out = processors[stage](template, tokenizer, None, data_args).preprocess_dataset(columns)
                except Exception as err:  # a template LLaMA-Factory itself cannot apply to these rows
                    cases.setdefault(template_name, {}).setdefault(dataset_name, {})[str(cutoff)] = {
                        "error": f"{type(err).__name__}: {err}"[:200]}
                    continue
                keys = [k for k in out if k.endswith("input_ids") or k.endswith("labels") or k == "kto_tags"]
                cases.setdefault(template_name, {}).setdefault(dataset_name, {})[str(cutoff)] = {
                    k: [list(map(int, v)) if isinstance(v, list) else bool(v) for v in out[k]] for k in keys}
    for path in tmp.iterdir():
        path.unlink()
    tmp.rmdir()
    from llamafactory import __version__
    golden = {"llamafactory": __version__, "cutoffs": CUTOFFS, "stages": STAGE_OF, "datasets": datasets,
              "cases": cases}
    with gzip.open(OUT / "lf_encodings.json.gz", "wt", encoding="utf-8") as f:
        json.dump(golden, f, ensure_ascii=False)


if __name__ == "__main__":
    main(sys.argv[1])
