"""rayft's client commands run where torch and Transformers cannot be imported: keys, plan, submit, status, logs,
data --help and --help. `plan` hands the checks that need them to the driver's helper process; with no training
stack at all it refuses in one line."""

import subprocess
import sys

import pytest
from conftest import DEMO_RECIPE, ROOT, WITHOUT_TORCH, free_port

pytestmark = pytest.mark.integration

def client(*args, env=None, timeout=120) -> subprocess.CompletedProcess:
    """`rayft ARGS` in a process that cannot import torch or Transformers."""
    return subprocess.run([sys.executable, "-c", WITHOUT_TORCH, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.parametrize("args, shows", [
    (["--help"], "submit"), (["data", "--help"], "--examples"), (["keys", "lora_rank"], "Rank of the LoRA"),
    (["keys", "lr_scheduler_type"], "one of 'linear', 'cosine'"), (["keys", "ray"], "ray_num_workers"),
])
def test_help_and_keys_need_neither_torch_nor_transformers(args, shows):
    done = client(*args)
    assert done.returncode == 0, done.stderr
    assert shows in done.stdout


def test_plan_checks_in_the_helper_and_status_logs_submit_answer_without_torch(tiny_model, tmp_path):
    out = f"output_dir={tmp_path / 'out'}"
    done = client("plan", str(DEMO_RECIPE), f"model_name_or_path={tiny_model}", out)
    assert done.returncode == 0, done.stderr
    assert "memory per worker" in done.stdout and "optimizer steps    16 per epoch" in done.stdout
    # the helper's checks reach the report, one line each: a module the model lacks, Transformers' own check
    done = client("plan", str(DEMO_RECIPE), f"model_name_or_path={tiny_model}", out, "lora_target=q_proj,qkv",
                  "load_best_model_at_end=true", "save_strategy=steps")
    assert done.returncode == 2 and done.stderr.startswith("rayft: invalid recipe:"), done.stderr
    problems = done.stderr.splitlines()[1:]
    assert len(problems) == 2 and "Traceback" not in done.stderr, done.stderr
    assert any(p.startswith("  - lora_target: qkv not found in Qwen2ForCausalLM") for p in problems)
    assert any(p.startswith("  - training arguments: ") for p in problems)
    # a pipeline's stages are checked the same way; a driver that stops at its own check while the helper still
    # imports leaves one line, not the helper's broken pipe
    done = client("plan", "configs/pipeline_demo.yaml", f"model_name_or_path={tiny_model}", out,
                  "pt.dataset=no_such_dataset")
    assert done.returncode == 2 and done.stderr.startswith("rayft: stage pt: dataset 'no_such_dataset' is not in "), (
        done.stderr)
    assert len(done.stderr.splitlines()) == 1, done.stderr
    nowhere = f"http://127.0.0.1:{free_port()}"
    for args in (["status", "raysubmit_x", "--address", nowhere], ["logs", "raysubmit_x", "--address", nowhere],
                 ["submit", "configs/demo_sft_lora.yaml", f"output_dir={tmp_path / 'job'}",
                  f"ray_storage_path={tmp_path / 'ray'}", "--address", nowhere, "--no-wait"]):
        done = client(*args)
        assert done.returncode == 2 and "cannot reach the job API" in done.stderr, done.stderr
        assert len(done.stderr.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_without_the_training_stack_plan_refuses_in_one_line(tmp_path, tiny_model):
    """Every process of this environment (the helper too) is denied torch and Transformers, as where only the client
    is installed: the plan names rayft[train]."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import sys\nsys.modules['torch'] = sys.modules['transformers'] = None\n")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site), "HOME": str(tmp_path)}
    done = client("plan", str(DEMO_RECIPE), f"model_name_or_path={tiny_model}", f"output_dir={tmp_path / 'out'}",
                  env=env)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("rayft: rayft[train]: rayft plan needs torch, Transformers and PEFT on this "
                                  "machine") and len(done.stderr.splitlines()) == 1, done.stderr
