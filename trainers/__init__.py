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

if os.environ.get(WORKER_WITHOUT_BITSANDBYTES) == "1" and "bitsandbytes" not in sys.modules:
    sys.modules["bitsandbytes"] = None  # `import bitsandbytes` raises ImportError in this process
