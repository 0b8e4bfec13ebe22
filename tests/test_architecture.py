"""The layout holds: imports point down (recipe <- data, cluster <- trainers <- orchestrator), without cycles, and
every error a user can cause on `rayft plan` is one line with exit status 2, before Ray starts."""

import ast
import json
from pathlib import Path

import pytest
from conftest import DEMO_RECIPE, ROOT

from rayft.orchestrator import cli
from rayft.recipe.logs import logger

pytestmark = pytest.mark.unit

LAYERS = {"recipe": 0, "data": 1, "cluster": 1, "trainers": 2, "orchestrator": 3}


def import_graph() -> dict[str, set[str]]:
    """rayft module -> the rayft modules it imports (at any depth of its code)."""
    modules = {f"rayft.{package}.{path.stem}" for package in LAYERS for path in (ROOT / package).glob("*.py")}
    graph = {}
    for package in LAYERS:
        for path in (ROOT / package).glob("*.py"):
            found = set()
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("rayft"):
                    found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
                elif isinstance(node, ast.Import):
                    found |= {a.name for a in node.names}
            name = f"rayft.{package}.{path.stem}"
            graph[name] = (found & modules) - {name}
    return graph


def test_imports_point_down_and_never_up_or_sideways():
    wrong = [(module, target) for module, targets in import_graph().items() for target in targets
             if LAYERS[target.split(".")[1]] > LAYERS[module.split(".")[1]]
             or {module.split(".")[1], target.split(".")[1]} == {"data", "cluster"}]
    assert wrong == []


def test_there_is_no_import_cycle():
    graph, done, cycles = import_graph(), set(), []

    def visit(module, path):
        for target in graph[module]:
            if target in path:
                cycles.append(path[path.index(target):] + [target])
            elif target not in done:
                visit(target, path + [target])
        done.add(module)

    for module in graph:
        if module not in done:
            visit(module, [module])
    assert cycles == []


CASES = ("missing recipe", "a folder as recipe", "not UTF-8", "not YAML", "not a mapping", "override without =",
         "unknown key", "wrong type", "unknown dataset", "broken dataset file", "model folder without a model",
         "wrong LoRA module", "too many workers", "missing DeepSpeed file", "occupied output_dir",
         "unknown template", "multimodal template", "template without the tokenizer's tokens",
         "tool data on a template without its tool format", "QLoRA under ZeRO-3",
         "Transformers' own check of the training keys", "a key given twice", "a NaN learning rate",
         "an infinite learning rate", "a LoRA rank of 1e11", "a batch of 1e12", "zero epochs",
         "a storage path that is a file", "a run name that is a path", "a run name from the environment",
         "an override that is not UTF-8", "a YAML alias bomb")


def bad_inputs(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    """Name -> (the arguments of `rayft plan`, what the one line must say)."""
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "latin1.yaml").write_bytes("stage: sft\ntemplate: caf\xe9\n".encode("latin-1"))
    (tmp_path / "broken.yaml").write_text("stage: sft\n  lora_rank: [8\n")
    (tmp_path / "list.yaml").write_text("- stage\n- sft\n")
    (tmp_path / "data").mkdir(exist_ok=True)
    (tmp_path / "data" / "dataset_info.json").write_text(json.dumps({
        "broken": {"file_name": "broken.json"},
        "tools": {"file_name": "tools.json", "formatting": "sharegpt",
                  "columns": {"messages": "conversations", "tools": "tools"}}}))
    call = json.dumps({"name": "add", "arguments": {"a": 2}})
    (tmp_path / "data" / "tools.json").write_text(json.dumps([{"tools": "[]", "conversations": [
        {"from": "human", "value": "2+3?"}, {"from": "function_call", "value": call},
        {"from": "observation", "value": "5"}, {"from": "gpt", "value": "5"}]}] * 4))
    (tmp_path / "data" / "broken.json").write_text("[{\"instruction\": \"q\", \"output\": ")
    (tmp_path / "twice.yaml").write_text(DEMO_RECIPE.read_text() + "\nlora_rank: 16\n")
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{b}: &{b} [*{a}, *{a}, *{a}, *{a}, *{a}, *{a}, *{a}, *{a}, *{a}, *{a}]\n" for a, b in zip("abcde", "bcdef"))
    (tmp_path / "bomb.yaml").write_text(bomb + "stage: sft\n")
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "occupied").mkdir(exist_ok=True)
    (tmp_path / "occupied" / "model.safetensors").write_bytes(b"precious")
    demo, out = str(DEMO_RECIPE), f"output_dir={tmp_path / 'out'}"
    return {
        "missing recipe": ([str(tmp_path / "nope.yaml")], "does not exist"),
        "a folder as recipe": ([str(tmp_path)], "does not exist"),
        "not UTF-8": ([str(tmp_path / "latin1.yaml")], "is not UTF-8 text"),
        "not YAML": ([str(tmp_path / "broken.yaml")], "is not valid YAML"),
        "not a mapping": ([str(tmp_path / "list.yaml")], "must be a mapping"),
        "override without =": ([demo, "lora_rank"], "is not of the form key=value"),
        "unknown key": ([demo, "lora_rnak=8", out], "did you mean 'lora_rank'"),
        "wrong type": ([demo, "lora_rank=eight", out], "expected an integer"),
        "unknown dataset": ([demo, "dataset=demo_sfft", out], "demo_sft"),
        "broken dataset file": ([demo, f"dataset_dir={tmp_path / 'data'}", "dataset=broken", out], "broken.json"),
        "model folder without a model": ([demo, f"model_name_or_path={tmp_path}", out], "model_name_or_path"),
        "wrong LoRA module": ([demo, "lora_target=q_proj,qkv", out], "lora_target: qkv not found"),
        "too many workers": ([demo, "ray_num_workers=64", "placement_strategy=STRICT_PACK", out], "STRICT_PACK"),
        "missing DeepSpeed file": ([demo, "deepspeed=ds_nope.json", out], "neither a shorthand"),
        "occupied output_dir": ([demo, f"output_dir={tmp_path / 'occupied'}", "overwrite_output_dir=false"],
                                "exists and is not empty"),
        "unknown template": ([demo, "template=qwen9", out], "'qwen9' is not a LLaMA-Factory 0.9.5 template"),
        "multimodal template": ([demo, "template=qwen2_vl", out], "'qwen2_vl' is a multimodal template"),
        "template without the tokenizer's tokens": ([demo, "template=llama3", out],
                                                    "writes ['<|eot_id|>', '<|eom_id|>'] as single tokens"),
        "tool data on a template without its tool format": (
            [demo, f"dataset_dir={tmp_path / 'data'}", "dataset=tools", "template=seed_oss", out],
            "dataset 'tools': 4 rows have tool definitions"),
        "QLoRA under ZeRO-3": ([demo, "quantization_bit=4", "deepspeed=z3", out], "ZeRO-3 partitions weights"),
        "Transformers' own check of the training keys": (
            [demo, "load_best_model_at_end=true", "save_strategy=steps", out], "training arguments: "),
        "a key given twice": ([str(tmp_path / "twice.yaml"), out], "lora_rank: given twice in one mapping"),
        "a NaN learning rate": ([demo, "learning_rate=.nan", out], "learning_rate: nan is not a finite number"),
        "an infinite learning rate": ([demo, "learning_rate=.inf", out], "learning_rate: inf is not a finite number"),
        "a LoRA rank of 1e11": ([demo, "lora_rank=100000000000", out], "lora_rank: 100000000000 is beyond"),
        "a batch of 1e12": ([demo, "per_device_train_batch_size=1000000000000", out],
                            "per_device_train_batch_size: 1000000000000 is beyond"),
        "zero epochs": ([demo, "num_train_epochs=0", out], "num_train_epochs: 0 trains nothing"),
        "a storage path that is a file": ([demo, f"ray_storage_path={tmp_path / 'a-file'}", out],
                                          "ray_storage_path: " + str(tmp_path / "a-file") + " is a file"),
        "a run name that is a path": ([demo, "ray_run_name=/tmp/elsewhere", out], "ray_run_name: '/tmp/elsewhere' is "
                                                                                  "not a plain name"),
        "a run name from the environment": ([demo, "ray_run_name=${oc.env:HOME}", out], "is not a plain name"),
        "an override that is not UTF-8": ([demo, "template=caf\udce9", out], "holds bytes that are not UTF-8 text"),
        "a YAML alias bomb": ([str(tmp_path / "bomb.yaml"), out], "its aliases expand to more than 100,000 values"),
    }


@pytest.mark.parametrize("case", CASES)
def test_every_bad_input_is_one_line_with_exit_status_2(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # as `rayft` is run: relative paths of the shipped recipe are read from here
    inputs = bad_inputs(tmp_path)
    assert set(inputs) == set(CASES)
    args, expected = inputs[case]
    handlers, level = list(logger.handlers), logger.level
    try:
        code = cli.main(["plan", *args])
    finally:  # main() configures the console logger; give the session's logger back
        logger.handlers[:], logger.level = handlers, level
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("rayft: ") and expected in err, err
    assert "Traceback" not in err
    assert [p.name for p in (tmp_path / "occupied").iterdir()] == ["model.safetensors"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, verbose, quiet", [
    (["-v", "keys"], True, False), (["keys", "--verbose"], True, False), (["keys"], False, False),
    (["-q", "plan", "r.yaml"], False, True), (["plan", "r.yaml", "k=v", "--quiet"], False, True),
])
def test_verbose_and_quiet_are_read_before_and_after_the_command(argv, verbose, quiet):
    args = cli.parser().parse_args(argv)
    assert (args.verbose, args.quiet) == (verbose, quiet)
