"""Registry, alpaca conversion, malformed data, templates and supervised encoding (no Ray)."""

import json
from types import SimpleNamespace

import pytest
from conftest import DEMO_RECIPE, ROOT, SHARED_DATA

from rayft.data.collator import SupervisedCollator
from rayft.data.encode import IGNORE_INDEX, encode_supervised, split_budget
from rayft.data.errors import DataError
from rayft.data.examples import Rows, _table, checked
from rayft.data.pipeline import EncodingSettings, encode_batch, load_examples
from rayft.data.registry import DatasetAttr, dataset_attrs
from rayft.data.source import Source, converted, file_rows, locate
from rayft.data.templates import JinjaTemplate, get_template
from rayft.data.tokenizer import TokenizerSpec
from rayft.recipe.loading import load_recipe
from rayft.recipe.parse import parse_config
from rayft.recipe.problems import ConfigError
from rayft.trainers.sft import supervised_collator

pytestmark = pytest.mark.unit

DEMO_DIR = ROOT / "data" / "demo"


def convert_rows(rows, attr, max_bad_ratio=1.0):
    """The examples of raw rows, checked as a read dataset is (bad rows skipped and logged)."""
    source = Source(attr, as_text=False)
    batch = converted(source, [(0, i, row) for i, row in enumerate(rows)])
    return checked(source, Rows(table=_table([batch])), max_bad_ratio, "qwen", None).examples()


def write_dataset(tmp_path, name, content, file_name=None, entry=None):
    file_name = file_name or f"{name}.json"
    (tmp_path / file_name).write_text(content if isinstance(content, str) else json.dumps(content))
    info = {name: {"file_name": file_name, **(entry or {})}}
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    return tmp_path


def test_alpaca_rows_become_messages():
    attr = DatasetAttr(name="d")
    (example,) = convert_rows([{"instruction": "Add.", "input": "1 2", "output": "3", "system": "S",
                                "history": [["hi", "hello"]]}], attr)
    assert example == {"system": "S", "messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "Add.\n1 2"}, {"role": "assistant", "content": "3"}]}


def test_custom_columns_from_dataset_info():
    attr = DatasetAttr(name="d", columns={"prompt": "q", "response": "a"})
    (example,) = convert_rows([{"q": "Why?", "a": "Because."}], attr)
    assert example["messages"][-1]["content"] == "Because."


def test_malformed_rows_are_skipped_and_counted(rayft_log):
    logged = rayft_log
    rows = [{"instruction": "ok", "output": "fine"}, {"instruction": "no output"},
            {"instruction": "empty", "output": "  "}, ["not", "an", "object"]]
    examples = convert_rows(rows, DatasetAttr(name="demo"))
    assert len(examples) == 1
    (line,) = logged
    assert "skipped 3 of 4" in line
    assert "row 1: missing column 'output'" in line and "row 2: empty response" in line and "row 3:" in line


def test_a_dataset_of_only_bad_rows_is_an_error():
    with pytest.raises(DataError, match="every one of its 2 rows is malformed"):
        convert_rows([{"instruction": "x"}, {"output": "y"}], DatasetAttr(name="demo"))


def test_invalid_json_names_the_line(tmp_path):
    write_dataset(tmp_path, "broken", '[\n {"instruction": "a", "output": "b"},\n {"instruction": }\n]')
    with pytest.raises(DataError, match=r"'broken'.*line 3"):
        load_examples("broken", str(tmp_path), None)


def test_invalid_jsonl_names_the_line(tmp_path):
    write_dataset(tmp_path, "lines", '{"instruction": "a", "output": "b"}\n{oops\n', file_name="lines.jsonl")
    with pytest.raises(DataError, match=r"1 of 2 rows \(50.00%\) are malformed.*lines.jsonl line 2: not valid JSON"):
        load_examples("lines", str(tmp_path), None)


def test_an_empty_file_is_an_error(tmp_path):
    write_dataset(tmp_path, "empty", "")
    with pytest.raises(DataError, match="is empty"):
        load_examples("empty", str(tmp_path), None)


def test_unknown_dataset_suggests_the_nearest(tmp_path):
    with pytest.raises(DataError, match="did you mean 'demo_sft'"):
        dataset_attrs("demo_sfft", DEMO_DIR)


def test_a_dataset_of_the_wrong_kind_for_the_stage_is_refused(tmp_path):
    write_dataset(tmp_path, "pairs", [], entry={"formatting": "sharegpt", "ranking": True})
    with pytest.raises(DataError, match="holds preference data, but stage 'sft' trains on supervised data"):
        load_examples("pairs", str(tmp_path), None)
    with pytest.raises(DataError, match="holds supervised data, but stage 'dpo'"):
        load_examples("demo_sft", str(DEMO_DIR), None, data="preference", stage="dpo")


def test_max_samples_and_comma_lists():
    examples = load_examples("demo_sft, demo_sft_eval", str(DEMO_DIR), max_samples=3)
    assert len(examples) == 6


def test_demo_datasets_load_without_skips(rayft_log):
    logged = rayft_log
    assert len(load_examples("demo_sft", str(DEMO_DIR), None)) == 256
    assert logged == []


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data/llamafactory is not present")
def test_llamafactory_alpaca_demo_reads_unchanged():
    source = locate(dataset_attrs("alpaca_en_demo", SHARED_DATA)[0], str(SHARED_DATA), as_text=False)
    examples = load_examples("alpaca_en_demo", str(SHARED_DATA), None, max_bad_ratio=0)
    assert len(list(file_rows(source, 0))) == len(examples) == 999


def test_split_budget_keeps_some_of_both():
    assert split_budget(10, 4, 100) == (10, 4)
    assert split_budget(100, 10, 50) == (40, 10)  # short response kept whole
    assert split_budget(10, 100, 50) == (10, 40)  # short prompt kept whole
    assert split_budget(60, 40, 50) == (30, 20)  # both long: shared in proportion


def test_encode_masks_prompts_and_truncates():
    pairs = [([1, 2, 3], [4, 5]), ([6, 7], [8, 9, 10])]
    full = encode_supervised(pairs, cutoff_len=100, train_on_prompt=False)
    assert full["input_ids"] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert full["labels"] == [IGNORE_INDEX] * 3 + [4, 5] + [IGNORE_INDEX] * 2 + [8, 9, 10]
    assert full["truncated"] == 0
    on_prompt = encode_supervised(pairs, cutoff_len=100, train_on_prompt=True)
    assert on_prompt["labels"] == on_prompt["input_ids"]
    cut = encode_supervised(pairs, cutoff_len=7, train_on_prompt=False)
    assert cut["input_ids"] == [1, 2, 3, 4, 5, 6, 8]
    assert cut["labels"] == [IGNORE_INDEX] * 3 + [4, 5, IGNORE_INDEX, 8]
    assert cut["truncated"] == 3


def test_collator_pads_to_the_longest_in_the_batch():
    batch = SupervisedCollator(pad_token_id=0)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                                                {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    learned = SupervisedCollator(pad_token_id=0, label_pad_id=0)([{"input_ids": [5, 6], "labels": [5, 6]},
                                                                  {"input_ids": [8], "labels": [8]}])
    assert learned["labels"].tolist() == [[5, 6], [8, 0]]  # ignore_pad_token_for_loss: false learns padding


def test_ignore_pad_token_for_loss_reaches_the_collator_of_pt_and_sft_only():
    tokenizer = SimpleNamespace(pad_token_id=3)
    learn_padding = parse_config(load_recipe(DEMO_RECIPE, ["ignore_pad_token_for_loss=false"]), base_dir=ROOT)
    assert supervised_collator(learn_padding, tokenizer).label_pad_id == 3
    assert supervised_collator(parse_config(load_recipe(DEMO_RECIPE, []), base_dir=ROOT),
                               tokenizer).label_pad_id == IGNORE_INDEX
    with pytest.raises(ConfigError, match="ignore_pad_token_for_loss: false makes stages pt and sft"):
        parse_config(load_recipe(ROOT / "configs" / "demo_dpo_lora.yaml", ["ignore_pad_token_for_loss=false"]),
                     base_dir=ROOT)


CHATS = [
    {"system": "", "messages": [{"role": "user", "content": "What is one plus two?"},
                                {"role": "assistant", "content": "One plus two is three."}]},
    {"system": "You are a careful calculator.", "messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"},
        {"role": "user", "content": "Reverse: cat dog"}, {"role": "assistant", "content": "dog cat"}]},
]


@pytest.mark.parametrize("example", CHATS, ids=["single-turn", "multi-turn-with-system"])
def test_chatml_matches_the_tokenizers_jinja_template(tiny_model, example):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    chat = ([{"role": "system", "content": example["system"]}] if example["system"] else []) + example["messages"]
    reference = tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"]
    for template in (get_template("chatml"), JinjaTemplate()):
        pairs = template.encode_turns(tokenizer, example)
        assert [i for source, target in pairs for i in source + target] == list(reference)
        assert len(pairs) == len(example["messages"]) // 2


def test_unknown_template_is_refused():
    with pytest.raises(DataError, match="'vicuna9' is not a LLaMA-Factory 0.9.5 template"):
        get_template("vicuna9")
    with pytest.raises(DataError, match="'intern_vl' encodes media with LLaMA-Factory's 'intern_vl' plugin, which "
                                        "rayft has not built yet; the built multimodal templates are dots_ocr, gemma3, "
                                        "granite3_vision, keye_vl, llava, llava_next, llava_next_llama3, .*, mimo_vl, "
                                        "mllama, qwen2_vl, qwen3_5, .*, qwen3_vl, qwen3_vl_nothink, yi_vl$"):
        get_template("intern_vl")


def test_encode_batch_labels_only_the_response(tiny_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    out = encode_batch({"system": [CHATS[0]["system"]], "messages": [CHATS[0]["messages"]]},
                       TokenizerSpec(str(tiny_model)), EncodingSettings("chatml", 256))
    labels = [int(i) for i in out["labels"][0] if i != IGNORE_INDEX]
    assert tokenizer.decode(labels) == "One plus two is three.<|im_end|>\n"
    assert out["num_trained"][0] == len(labels) and out["num_tokens"][0] == len(out["input_ids"][0])


def test_sharegpt_rows_become_messages():
    attr = DatasetAttr(name="chat", formatting="sharegpt")
    (example,) = convert_rows([{"conversations": [
        {"from": "system", "value": "Be brief."}, {"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"},
        {"from": "human", "value": "bye"}, {"from": "gpt", "value": "goodbye"}]}], attr)
    assert example == {"system": "Be brief.", "messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"}, {"role": "assistant", "content": "goodbye"}]}


def test_sharegpt_with_openai_style_tags_and_system_column():
    attr = DatasetAttr(name="chat", formatting="sharegpt", columns={"messages": "messages", "system": "sys"},
                       tags={"role_tag": "role", "content_tag": "content", "user_tag": "user",
                             "assistant_tag": "assistant"})
    (example,) = convert_rows([{"sys": "S", "messages": [{"role": "user", "content": "q"},
                                                         {"role": "assistant", "content": "a"}]}], attr)
    assert example["system"] == "S" and example["messages"][1] == {"role": "assistant", "content": "a"}


def test_sharegpt_bad_role_order_is_reported_with_its_row(rayft_log):
    logged = rayft_log
    attr = DatasetAttr(name="chat", formatting="sharegpt")
    good = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    swapped = {"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]}
    odd = {"conversations": [{"from": "human", "value": "q"}]}
    examples = convert_rows([good, swapped, odd], attr)
    assert len(examples) == 1
    assert "row 1: message 0 has role 'gpt'" in logged[0] and "row 2: 1 messages" in logged[0]


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data/llamafactory is not present")
def test_tool_call_data_needs_a_template_with_tool_formatting(tiny_model):
    with pytest.raises(DataError, match="'seed_oss' writes tools in the 'seed_oss' format, which is not built"):
        load_examples("glaive_toolcall_en_demo", str(SHARED_DATA), None, template="seed_oss")
    assert load_examples("glaive_toolcall_en_demo", str(SHARED_DATA), 4, template="seed_oss", tool_format="qwen")
    examples = load_examples("glaive_toolcall_en_demo", str(SHARED_DATA), None, template="qwen")
    assert len(examples) > 200 and any(m["role"] == "function" for e in examples for m in e["messages"])
    batch = examples[:16]
    out = encode_batch({"system": [e["system"] for e in batch], "messages": [e["messages"] for e in batch]},
                       TokenizerSpec(str(tiny_model)), EncodingSettings("qwen", 1024))
    assert all(n > 0 for n in out["num_trained"])


@pytest.fixture(scope="module")
def family_tokenizers():
    from reference_templates import FAMILIES

    from rayft.trainers.tiny_model import build_tokenizer, corpus_from

    texts = corpus_from(sorted(DEMO_DIR.glob("demo_*.json")))
    return {name: build_tokenizer(texts, **spec) for name, spec in FAMILIES.items()}


# LLaMA-Factory's mistral ("[INST] q[/INST]") and phi (no closing <|endoftext|>) templates differ from those
# families' own Jinja templates; LLaMA-Factory's encodings are rayft's contract (tests/test_lf_parity.py)
@pytest.mark.parametrize("family", ["qwen", "llama3", "gemma"])
@pytest.mark.parametrize("example", CHATS, ids=["single-turn", "multi-turn-with-system"])
def test_registered_templates_match_their_familys_jinja_template(family_tokenizers, family, example):
    tokenizer = family_tokenizers[family]
    chat = ([{"role": "system", "content": example["system"]}] if example["system"] else []) + example["messages"]
    reference = tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"]
    pairs = get_template(family).encode_turns(tokenizer, example)
    assert [i for source, target in pairs for i in source + target] == list(reference)
    last_response = tokenizer.decode(pairs[-1][1])
    assert last_response.startswith((example["messages"][-1]["content"], " " + example["messages"][-1]["content"]))


# LLaMA-Factory's default and alpaca end every response with the EOS token (here <|im_end|>), so that a model
# fine-tuned with them learns to stop
@pytest.mark.parametrize("name,expected", [
    ("default", "System: S<|im_end|>\nHuman: q<|im_end|>\nAssistant:a<|im_end|>\n"),
    ("alpaca", "S### Instruction:\nq\n\n### Response:\na<|im_end|>\n\n"),
])
def test_templates_without_a_reference_jinja_render_as_documented(tiny_model, name, expected):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    pairs = get_template(name).encode_turns(tokenizer, {"system": "S", "messages": [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    assert tokenizer.decode([i for s, t in pairs for i in s + t]) == expected
    assert tokenizer.decode(pairs[0][1]).strip() == "a<|im_end|>"


def _named(prefix, count):
    return [{"system": "", "messages": [{"role": "user", "content": f"{prefix}{i}"}]} for i in range(count)]


def _rows(prefix, count):
    examples = _named(prefix, count)
    batch = converted(Source(DatasetAttr(name=prefix, formatting="sharegpt", columns={"messages": "m"}), False),
                      [(0, i, {"m": [{"from": "human", "value": e["messages"][0]["content"]},
                                     {"from": "gpt", "value": "ok"}]}) for i, e in enumerate(examples)])
    return Rows(table=_table([{"example": batch["example"], "key": batch["key"]}]))


def _names(rows):
    return [e["messages"][0]["content"] for e in rows.examples()]


def test_concat_keeps_order():
    from rayft.data.examples import mixed

    assert _names(mixed([_rows("a", 2), _rows("b", 1)], "concat", [0.5, 0.5], 0)[0]) == ["a0", "a1", "b0"]


def test_interleave_under_stops_at_the_first_exhausted_dataset():
    from rayft.data.examples import mixed
    from rayft.data.mixing import mix_counts

    counts = mix_counts([10, 100], "interleave_under", [0.5, 0.5], seed=0)
    assert counts[0] == 10 and 0 < counts[1] < 100 and counts == mix_counts([10, 100], "interleave_under",
                                                                             [0.5, 0.5], seed=0)
    names = _names(mixed([_rows("a", 10), _rows("b", 100)], "interleave_under", [0.5, 0.5], seed=0)[0])
    assert names == [f"a{i}" for i in range(10)] + [f"b{i}" for i in range(counts[1])]
    assert mix_counts([1000, 1000], "interleave_under", [0.9, 0.1], seed=0)[1] < 250  # the probabilities hold


def test_interleave_over_uses_every_dataset_whole_and_repeats_the_small_one():
    from rayft.data.examples import mixed

    rows, counts = mixed([_rows("a", 5), _rows("b", 50)], "interleave_over", [0.5, 0.5], seed=0)
    names = _names(rows)
    assert counts[1] == 50 and counts[0] > 5 and len(names) == sum(counts)  # the small one oversampled
    assert set(names) == {f"a{i}" for i in range(5)} | {f"b{i}" for i in range(50)}
    keys = rows.table.column("key").to_pylist()
    assert len(set(keys)) == len(keys)  # repeats get keys of their own, so later draws stay exact


def test_interleave_probs_are_checked():
    from rayft.data.mixing import parse_probs

    assert parse_probs(None, 4) == [0.25] * 4
    assert parse_probs("0.2,0.8", 2) == [0.2, 0.8]
    for bad, message in (("0.5", "1 probabilities for 2"), ("0.6,0.6", "sum to 1"), ("a,b", "comma list")):
        with pytest.raises(DataError, match=message):
            parse_probs(bad, 2)


def test_val_size_holds_out_a_seeded_fraction_or_count():
    from rayft.data.examples import split_off

    rows = _rows("x", 100)
    train, held = split_off(rows, 0.1, seed=3)
    assert held.count() == 10 and train.count() == 90
    assert set(_names(train)).isdisjoint(_names(held))
    assert _names(split_off(rows, 0.1, seed=3)[1]) == _names(held) != _names(split_off(rows, 0.1, seed=4)[1])
    assert split_off(rows, 25, seed=3)[1].count() == 25
    with pytest.raises(DataError, match="val_size"):
        split_off(rows, 100, seed=3)


def test_mask_history_learns_the_last_turn_and_keeps_it_under_truncation():
    pairs = [([1, 2, 3], [4, 5]), ([6, 7], [8, 9, 10])]
    full = encode_supervised(pairs, cutoff_len=100, train_on_prompt=False, mask_history=True)
    assert full["input_ids"] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert full["labels"] == [IGNORE_INDEX] * 7 + [8, 9, 10]
    cut = encode_supervised(pairs, cutoff_len=6, train_on_prompt=False, mask_history=True)
    assert cut["input_ids"] == [1, 6, 7, 8, 9, 10] and cut["labels"] == [IGNORE_INDEX] * 3 + [8, 9, 10]
    assert cut["truncated"] == 4


ROWS = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(6)]


def _write(path, suffix, rows):
    import pyarrow
    import pyarrow.csv
    import pyarrow.parquet

    table = pyarrow.Table.from_pylist(rows)
    if suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    elif suffix == ".csv":
        pyarrow.csv.write_csv(table, path)
    elif suffix == ".parquet":
        pyarrow.parquet.write_table(table, path)
    elif suffix == ".arrow":
        with pyarrow.ipc.new_stream(str(path), table.schema) as writer:
            writer.write_table(table)


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".parquet", ".arrow"])
def test_every_file_type_reads_the_same_rows(tmp_path, suffix):
    _write(tmp_path / f"d{suffix}", suffix, ROWS)
    (tmp_path / "dataset_info.json").write_text(json.dumps({"d": {"file_name": f"d{suffix}"}}))
    examples = load_examples("d", str(tmp_path), None)
    assert [e["messages"][1]["content"] for e in examples] == [f"a{i}" for i in range(6)]


def test_a_folder_of_files_and_json_lines_in_a_json_file(tmp_path):
    (tmp_path / "parts").mkdir()
    (tmp_path / "parts" / "0.json").write_text("\n".join(json.dumps(r) for r in ROWS[:3]))
    (tmp_path / "parts" / "1.json").write_text(json.dumps(ROWS[3:]))
    (tmp_path / "dataset_info.json").write_text(json.dumps({"d": {"file_name": "parts"}}))
    assert len(load_examples("d", str(tmp_path), None)) == 6
    (tmp_path / "parts" / "2.csv").write_text("instruction,output\nq,a\n")
    with pytest.raises(DataError, match="files of one type"):
        load_examples("d", str(tmp_path), None)


def test_text_files_give_a_text_column(tmp_path):
    (tmp_path / "t.txt").write_text("first line\n\nsecond line\n")
    source = locate(DatasetAttr(name="t", file_name="t.txt"), str(tmp_path), as_text=True)
    assert list(file_rows(source, 0)) == [(1, {"text": "first line"}), (3, {"text": "second line"})]


def test_num_samples_draws_a_seeded_sample(tmp_path):
    _write(tmp_path / "d.json", ".json", ROWS)
    info = {"fewer": {"file_name": "d.json", "num_samples": 4}, "more": {"file_name": "d.json", "num_samples": 9}}
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))

    def answers(name, seed):
        return [e["messages"][1]["content"] for e in load_examples(name, str(tmp_path), None, seed=seed)]

    fewer = answers("fewer", 1)
    assert len(fewer) == 4 and len(set(fewer)) == 4 and fewer == answers("fewer", 1)
    assert len({tuple(answers("fewer", seed)) for seed in range(5)}) > 1  # the seed chooses
    more = answers("more", 1)
    assert len(more) == 9 and set(more) == {f"a{i}" for i in range(6)}


def test_hf_hub_url_goes_through_datasets_load_dataset(tmp_path):
    (tmp_path / "hub" / "data").mkdir(parents=True)
    _write(tmp_path / "hub" / "data" / "train.jsonl", ".jsonl", ROWS)
    info = {"d": {"hf_hub_url": str(tmp_path / "hub"), "split": "train"}}
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    assert len(load_examples("d", str(tmp_path), None)) == 6
    info["d"]["split"] = "validation"
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    with pytest.raises(DataError, match="could not load"):
        load_examples("d", str(tmp_path), None)


def test_a_missing_file_is_named(tmp_path):
    (tmp_path / "dataset_info.json").write_text(json.dumps({"d": {"file_name": "gone.json"}}))
    with pytest.raises(DataError, match="gone.json does not exist"):
        load_examples("d", str(tmp_path), None)


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data/llamafactory is not present")
@pytest.mark.parametrize("name", ["identity", "alpaca_en_demo", "alpaca_zh_demo"])
def test_llamafactory_supervised_datasets_encode_unchanged(tiny_model, name):
    examples = load_examples(name, str(SHARED_DATA), None)
    assert len(examples) > 50
    batch = examples[:16]
    out = encode_batch({"system": [e["system"] for e in batch], "messages": [e["messages"] for e in batch]},
                       TokenizerSpec(str(tiny_model)), EncodingSettings("qwen", 512))
    assert all(n > 0 for n in out["num_trained"]) and all(n <= 512 for n in out["num_tokens"])


def test_pretraining_text_is_concatenated_into_blocks_or_truncated(tiny_model):
    from transformers import AutoTokenizer

    from rayft.data.pipeline import encode_text_batch

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    texts = ["one two three four five six", "seven eight", "nine"]
    documents = [tokenizer.encode(t) + [tokenizer.eos_token_id] for t in texts]
    flat = [t for d in documents for t in d]
    blocks = encode_text_batch({"text": texts}, TokenizerSpec(str(tiny_model)),
                               EncodingSettings(None, 5, packing=True, stage="pt"))
    assert [b.tolist() for b in blocks["input_ids"]] == [flat[i:i + 5] for i in range(0, len(flat), 5)]
    assert all((i == lab).all() for i, lab in zip(blocks["input_ids"], blocks["labels"]))
    assert blocks["truncated"].sum() == 0
    cut = encode_text_batch({"text": texts}, TokenizerSpec(str(tiny_model)), EncodingSettings(None, 5, stage="pt"))
    assert [c.tolist() for c in cut["input_ids"]] == [d[:5] for d in documents]
    assert cut["truncated"].tolist() == [len(d) - len(d[:5]) for d in documents]


def test_pretraining_rows_need_their_text_column(tmp_path, rayft_log):
    write_dataset(tmp_path, "pt", '{"text": "a story"}\n{"body": "no text"}\n{"text": ""}\n', file_name="pt.jsonl",
                  entry={"columns": {"prompt": "text"}})
    logged = rayft_log
    assert load_examples("pt", str(tmp_path), None, data="text", max_bad_ratio=1.0) == [{"text": "a story"}]
    assert "pt.jsonl line 2: missing column 'text'" in logged[0]
    assert "pt.jsonl line 3: column 'text' must be non-empty" in logged[0]
    with pytest.raises(DataError, match=r"2 of 3 rows .* more than max_bad_row_ratio=0.5"):
        load_examples("pt", str(tmp_path), None, data="text", max_bad_ratio=0.5)


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data/llamafactory is not present")
def test_llamafactory_c4_demo_reads_as_pretraining_text():
    examples = load_examples("c4_demo", str(SHARED_DATA), None, data="text")
    assert len(examples) == 300 and all(len(e["text"]) > 20 for e in examples)


def test_pairwise_encoding_shares_one_truncated_prompt():
    from rayft.data.encode import encode_pairwise

    out = encode_pairwise([1, 2, 3, 4, 5], chosen=[6, 7, 8], rejected=[9], cutoff_len=100)
    assert out["chosen_input_ids"] == [1, 2, 3, 4, 5, 6, 7, 8] and out["rejected_input_ids"] == [1, 2, 3, 4, 5, 9]
    assert out["chosen_labels"] == [IGNORE_INDEX] * 5 + [6, 7, 8]
    assert out["rejected_labels"] == [IGNORE_INDEX] * 5 + [9]
    cut = encode_pairwise([1, 2, 3, 4, 5, 6], chosen=[7, 8, 9, 10], rejected=[11, 12], cutoff_len=6)
    # budget 6 shared 4:2 in proportion to prompt 6 and the longer response 4
    assert cut["chosen_input_ids"] == [1, 2, 3, 4, 7, 8] and cut["rejected_input_ids"] == [1, 2, 3, 4, 11, 12]
    assert cut["chosen_labels"] == [IGNORE_INDEX] * 4 + [7, 8]
    assert cut["truncated"] == 2 + 2


PREFERENCE = [{"conversations": [{"from": "human", "value": "What is two plus two?"}],
               "chosen": {"from": "gpt", "value": "Four."}, "rejected": {"from": "gpt", "value": "Five."}}]


def test_sharegpt_preference_rows_and_their_encoding(tmp_path, tiny_model, rayft_log):
    from transformers import AutoTokenizer

    from rayft.data.pipeline import encode_pairwise_batch

    write_dataset(tmp_path, "prefs", PREFERENCE + [{"conversations": PREFERENCE[0]["conversations"],
                                                    "chosen": {"from": "human", "value": "x"},
                                                    "rejected": {"from": "gpt", "value": "y"}}],
                  entry={"formatting": "sharegpt", "ranking": True})
    logged = rayft_log
    (example,) = load_examples("prefs", str(tmp_path), None, data="preference", max_bad_ratio=1.0)
    assert example["chosen"] == "Four." and example["rejected"] == "Five." and len(example["messages"]) == 1
    assert "row 1: message chosen has role 'human'" in logged[0]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    out = encode_pairwise_batch({k: [example[k]] for k in ("system", "messages", "chosen", "rejected")},
                                TokenizerSpec(str(tiny_model)), EncodingSettings("chatml", 256))
    chosen = [int(t) for t in out["chosen_labels"][0] if t != IGNORE_INDEX]
    assert tokenizer.decode(chosen) == "Four.<|im_end|>\n"
    assert tokenizer.decode(out["rejected_input_ids"][0]) == (
        "<|im_start|>user\nWhat is two plus two?<|im_end|>\n<|im_start|>assistant\nFive.<|im_end|>\n")


def test_alpaca_preference_rows():
    attr = DatasetAttr(name="p", ranking=True)
    (example,) = convert_rows([{"instruction": "Pick.", "chosen": "good", "rejected": "bad"}], attr)
    assert example == {"system": "", "messages": [{"role": "user", "content": "Pick."}], "chosen": "good",
                       "rejected": "bad"}


def test_kto_rows_and_mismatched_kl_pairs(tiny_model, rayft_log):
    from transformers import AutoTokenizer

    from rayft.data.pipeline import encode_kto_batch

    attr = DatasetAttr(name="k", formatting="sharegpt", columns={"messages": "messages", "kto_tag": "label"},
                       tags={"role_tag": "role", "content_tag": "content", "user_tag": "user",
                             "assistant_tag": "assistant"})
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}],
             "label": i % 2 == 0} for i in range(3)] + [{"messages": [{"role": "user", "content": "q"},
                                                                   {"role": "assistant", "content": "a"}],
                                                      "label": "yes"}]
    logged = rayft_log
    examples = convert_rows(rows, attr)
    assert [e["kto_tag"] for e in examples] == [True, False, True] and "must be true or false" in logged[0]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    out = encode_kto_batch({k: [e[k] for e in examples] for k in ("system", "messages", "kto_tag")},
                           TokenizerSpec(str(tiny_model)), EncodingSettings("chatml", 256))
    learned = [tokenizer.decode([int(t) for t in labels if t != IGNORE_INDEX]) for labels in out["labels"]]
    kl = [tokenizer.decode([int(t) for t in labels if t != IGNORE_INDEX]) for labels in out["kl_labels"]]
    assert learned == [f"a{i}<|im_end|>\n" for i in range(3)]
    assert kl == [f"a{i}<|im_end|>\n" for i in (2, 0, 1)]  # prompt i with response i-1
    assert "q1" in tokenizer.decode(out["kl_input_ids"][1]) and out["kto_tag"].tolist() == [True, False, True]


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data/llamafactory is not present")
def test_llamafactory_preference_and_kto_demos_load_for_their_stages(tiny_model):
    from rayft.data.pipeline import encode_kto_batch, encode_pairwise_batch

    prefs = load_examples("dpo_en_demo", str(SHARED_DATA), None, data="preference")
    kto = load_examples("kto_en_demo", str(SHARED_DATA), None, data="kto")
    assert len(prefs) > 100 and len(kto) > 100 and {e["kto_tag"] for e in kto} == {True, False}
    pairs = encode_pairwise_batch({k: [e[k] for e in prefs[:8]] for k in ("system", "messages", "chosen", "rejected")},
                                  TokenizerSpec(str(tiny_model)), EncodingSettings("qwen", 512))
    assert all(len(c) <= 512 for c in pairs["chosen_input_ids"])
    tagged = encode_kto_batch({k: [e[k] for e in kto[:8]] for k in ("system", "messages", "kto_tag")},
                              TokenizerSpec(str(tiny_model)), EncodingSettings("qwen", 512))
    assert len(tagged["kl_input_ids"]) == 8


TOOLS = [{"name": "add", "description": "Add two numbers", "parameters": {
    "type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}, "required": ["a", "b"]}}]
TOOL_CHAT = {"system": "", "tools": json.dumps(TOOLS), "messages": [
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "function", "content": json.dumps({"name": "add", "arguments": {"a": 2, "b": 3}})},
    {"role": "observation", "content": json.dumps({"result": 5})},
    {"role": "assistant", "content": "2 + 3 is 5."}]}


def test_qwen_tool_formatting_matches_qwens_jinja_template(family_tokenizers):
    from reference_templates import QWEN_TOOLS

    tokenizer = family_tokenizers["qwen"]
    call = json.loads(TOOL_CHAT["messages"][1]["content"])
    hf_chat = [TOOL_CHAT["messages"][0],
               {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": call}]},
               {"role": "tool", "content": TOOL_CHAT["messages"][2]["content"]},
               TOOL_CHAT["messages"][3]]
    reference = tokenizer.apply_chat_template(hf_chat, tools=[{"type": "function", "function": t} for t in TOOLS],
                                              chat_template=QWEN_TOOLS, tokenize=True, return_dict=True)["input_ids"]
    pairs = get_template("qwen").encode_turns(tokenizer, TOOL_CHAT)
    assert [i for s, t in pairs for i in s + t] == list(reference)
    assert tokenizer.decode(pairs[0][1]) == (
        '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call><|im_end|>\n')
    assert "<tool_response>" in tokenizer.decode(pairs[1][0])


def test_templates_without_tool_formatting_refuse_tool_turns(tiny_model):
    from transformers import AutoTokenizer

    with pytest.raises(DataError, match="'minimax1' format, which is not built"):
        get_template("minimax1").encode_turns(AutoTokenizer.from_pretrained(tiny_model), TOOL_CHAT)


@pytest.mark.parametrize("recipe, extra", [
    ("demo_sft_lora.yaml", ("eval_dataset=demo_sft_eval", "template=qwen3")),
    ("demo_dpo_lora.yaml", ()),
    ("demo_kto_lora.yaml", ()),
])
def test_rayft_data_writes_what_the_workers_receive(recipe, extra, tiny_model, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    from rayft.orchestrator import cli
    from rayft.recipe.logs import logger

    monkeypatch.chdir(ROOT)
    out = tmp_path / "seen.jsonl"
    handlers, level = list(logger.handlers), logger.level
    try:
        code = cli.main(["data", str(ROOT / "configs" / recipe), f"model_name_or_path={tiny_model}", *extra,
                         "--examples", "3", "--out", str(out)])
    finally:
        logger.handlers[:], logger.level = handlers, level
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    splits = {"train": 3, "eval": 3} if "eval_dataset=demo_sft_eval" in extra else {"train": 3}
    assert {s: sum(r["split"] == s for r in rows) for s in splits} == splits and len(rows) == sum(splits.values())
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    for row in rows:
        side = "chosen_" if "chosen_input_ids" in row else ""
        ids, labels = row[f"{side}input_ids"], row[f"{side}labels"]
        assert row[f"{side}text"] == tokenizer.decode(ids)
        assert row[f"{side}trained_text"] == tokenizer.decode([t for t, label in zip(ids, labels) if label != -100])
        assert row[f"{side}trained_text"].endswith("<|im_end|>\n")  # a chat response ends with its turn marker
    if recipe.startswith("demo_sft"):
        assert rows[0]["trained_text"].startswith("<think>\n\n</think>\n\n")  # qwen3: an empty thought is learned
    if recipe.startswith("demo_kto"):
        assert {"kto_tag", "kl_input_ids", "kl_labels"} <= set(rows[0])


def test_the_recipe_checks_know_the_tool_formats_data_builds():
    from rayft.data.tools import TOOL_FORMATS
    from rayft.recipe.values import TOOL_FORMAT_NAMES

    assert tuple(TOOL_FORMATS) == TOOL_FORMAT_NAMES  # recipe/ imports nothing of data/, so the names are kept twice


def test_a_line_that_is_not_utf8_or_holds_a_lone_surrogate_is_one_bad_row(tmp_path, rayft_log):
    good = json.dumps({"instruction": "q", "output": "a"})
    lines = [good.encode(), b'{"instruction": "caf\xe9", "output": "a"}', b'{"instruction": "\\ud800", "output": "a"}',
             good.encode()]
    (tmp_path / "mixed.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (tmp_path / "dataset_info.json").write_text(json.dumps({"mixed": {"file_name": "mixed.jsonl"}}))
    assert len(load_examples("mixed", str(tmp_path), None, max_bad_ratio=0.5)) == 2
    logged = "\n".join(rayft_log)
    assert "mixed.jsonl line 2: not UTF-8 text (byte 20: invalid continuation byte)" in logged
    assert "mixed.jsonl line 3: holds '\\ud800', which is not text (a lone surrogate)" in logged
    with pytest.raises(DataError, match=r"2 of 4 rows .* more than max_bad_row_ratio=0.25"):
        load_examples("mixed", str(tmp_path), None, max_bad_ratio=0.25)


def test_a_file_name_outside_dataset_dir_is_refused(tmp_path):
    (tmp_path / "private.txt").write_text("secret\n")
    (tmp_path / "data").mkdir()
    for outside in ("../private.txt", str(tmp_path / "private.txt"), "sub/../../private.txt"):
        (tmp_path / "data" / "dataset_info.json").write_text(json.dumps({"x": {"file_name": outside}}))
        with pytest.raises(DataError, match="points outside dataset_dir"):
            load_examples("x", str(tmp_path / "data"), None)


def test_rayft_data_says_which_rows_it_left_out(tiny_model, tmp_path, monkeypatch, rayft_log):
    from rayft.orchestrator import cli

    rows = [json.dumps({"instruction": f"q{i}", "output": "a"}) for i in range(4)]
    rows.insert(2, '{"instruction": "no output"')  # cut short: not JSON
    (tmp_path / "mixed.jsonl").write_text("\n".join(rows) + "\n")
    (tmp_path / "dataset_info.json").write_text(json.dumps({"mixed": {"file_name": "mixed.jsonl"}}))
    monkeypatch.chdir(ROOT)
    code = cli.main(["data", str(DEMO_RECIPE), f"model_name_or_path={tiny_model}", "dataset=mixed",
                     f"dataset_dir={tmp_path}", "eval_dataset=null", "--examples", "5", "--out",
                     str(tmp_path / "seen.jsonl")])
    assert code == 0
    assert len((tmp_path / "seen.jsonl").read_text().splitlines()) == 4
    assert any(line.startswith("dataset 'mixed': 1 of its first 5 rows are malformed and left out (mixed.jsonl line 3")
               for line in rayft_log), rayft_log


def test_a_rerun_into_an_output_dir_it_may_overwrite_says_what_was_there(tiny_model, tmp_path, rayft_log):
    from rayft.orchestrator.helper import Helper
    from rayft.orchestrator.launch import start_checks

    out = tmp_path / "out"
    (out / "checkpoint-8").mkdir(parents=True)
    (out / "trainer_log.jsonl").write_text("{}\n")
    cfg = parse_config(load_recipe(DEMO_RECIPE, [f"model_name_or_path={tiny_model}", f"output_dir={out}",
                                                 f"ray_storage_path={tmp_path / 'ray'}", "overwrite_output_dir=true"]),
                       base_dir=ROOT)
    with Helper("the test", here=True) as helper:
        start_checks(cfg, helper).finish()
    assert any(line.startswith(f"output_dir {out} holds 2 entries from before (checkpoint-8/, trainer_log.jsonl)")
               for line in rayft_log), rayft_log
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-8", "trainer_log.jsonl"]  # nothing touched
