"""Every benchmark, one after the other on an otherwise idle machine; each prints its table and writes
benchmarks/results/<name>.json.

    .venv/bin/python benchmarks/run_all.py
"""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = ("throughput.py", "startup.py", "packing.py", "zero_memory.py", "data_pipeline.py")


def main() -> int:
    failed = []
    for name in BENCHMARKS:
        print(f"\n===== {name} =====", flush=True)
        if subprocess.run([sys.executable, str(HERE / name)], cwd=HERE).returncode != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
