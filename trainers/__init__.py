"""What runs inside a Ray Train worker (and the stages' shared parts).

A worker of a run that does not quantise starts with WORKER_WITHOUT_BITSANDBYTES set (launch puts it in the
workers' runtime_env, the one way to reach a process before its first import): PEFT imports bitsandbytes
whenever it is installed, which costs about 2.5 s of every worker's start-up on a 2-core machine (most of it
torch.compile's machinery), and such a worker never calls it. The module is then marked absent for this
process only, so PEFT and Transformers see no bitsandbytes.
"""

import os
import sys

WORKER_WITHOUT_BITSANDBYTES = "RAYFT_WORKER_WITHOUT_BITSANDBYTES"


def without_bitsandbytes() -> None:
    """Marks bitsandbytes absent in this process, unless it is already imported: `import bitsandbytes` then
    raises ImportError, so PEFT and Transformers see none. Also the `rayft` command's own process when it
    never loads a model (orchestrator/cli.py)."""
    if "bitsandbytes" not in sys.modules:
        sys.modules["bitsandbytes"] = None


if os.environ.get(WORKER_WITHOUT_BITSANDBYTES) == "1":
    without_bitsandbytes()
