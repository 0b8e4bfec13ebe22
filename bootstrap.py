"""Sets up everything rayft needs on a machine with only Python, then runs the demo or the test suite.

    python3 bootstrap.py demo   # local 2-worker LoRA SFT run on the project's demo data
    python3 bootstrap.py test   # the linter (ruff), then the whole test suite

Set-up is idempotent: the virtual environment (.venv), the pinned install, the tiny local model and
DeepSpeed's CPU op are each made once and reused while their inputs are unchanged.
"""

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PYTHON = VENV / "bin" / "python"
TINY_MODEL = ROOT / ".cache" / "models" / "tiny-qwen2"
# Pinned so that pip takes the CPU build of torch and every install resolves to the tested versions.
TORCH = "torch==2.13.0"
PYTEST_NO_TESTS = 5
# DeepSpeed's JIT-compiled CPU op is cached per checkout, so two checkouts never rebuild each other's copy.
# (It must be in the environment before Python starts: torch reads it when the op is loaded.)
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))


def run(*args, quiet: bool = False, **kwargs) -> None:
    """Runs a set-up step, showing its command unless it is a check that usually has nothing to do."""
    if not quiet:
        print("+", " ".join(str(a) for a in args), flush=True)
    subprocess.run([str(a) for a in args], check=True, cwd=ROOT, **kwargs)


def ensure_venv() -> None:
    if not PYTHON.exists():
        venv.EnvBuilder(with_pip=True).create(VENV)


def ensure_installed() -> None:
    inputs = b"".join((ROOT / name).read_bytes() for name in ("pyproject.toml", "constraints.txt"))
    stamp = VENV / ".rayft-install"
    digest = hashlib.sha256(inputs).hexdigest()
    if stamp.exists() and stamp.read_text() == digest:
        return
    pip = [PYTHON, "-m", "pip", "install", "--disable-pip-version-check", "-q", "-c", "constraints.txt"]
    run(*pip, TORCH)  # first and alone, so nothing else can pull a CUDA build of torch
    run(*pip, "-e", ".[test]")
    stamp.write_text(digest)


def ensure_tiny_model() -> None:
    if not (TINY_MODEL / "model.safetensors").exists():
        run(VENV / "bin" / "rayft", "tiny-model", TINY_MODEL)


def ensure_deepspeed_ops() -> None:
    # a quiet check once the op is built (it is kept per checkout); the first build takes about a minute
    built = any(Path(os.environ["TORCH_EXTENSIONS_DIR"]).glob("**/*.so"))
    if not built:
        print("+ building DeepSpeed's CPU shared-memory op once (about a minute)", flush=True)
    run(PYTHON, "-c", "from rayft.trainers.deepspeed_ops import prebuild_cpu_ops; prebuild_cpu_ops()", quiet=True)


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in ("demo", "test"):
        print(__doc__, file=sys.stderr)
        return 2
    ensure_venv()
    ensure_installed()
    ensure_tiny_model()
    ensure_deepspeed_ops()
    if argv[0] == "demo":
        return subprocess.run([VENV / "bin" / "rayft", "train", "configs/demo_sft_lora.yaml"], cwd=ROOT).returncode
    lint = subprocess.run([PYTHON, "-m", "ruff", "check", "."], cwd=ROOT).returncode
    if lint:
        print("bootstrap: ruff found problems (above); the suite does not pass with them", file=sys.stderr)
        return lint
    code = subprocess.run([PYTHON, "-m", "pytest", "tests"], cwd=ROOT).returncode
    if code == PYTEST_NO_TESTS:
        print("bootstrap: pytest collected no tests; that is a failure, not a pass", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
