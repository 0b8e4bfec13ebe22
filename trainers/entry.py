"""What the driver hands Ray Train, importable without torch: the workers' entry function, which imports the
training stack inside the worker, and the torch process group's backend config, whose torch half Ray Train's
controller and workers import when they use it. The driver thereby starts a run without loading torch.
"""

import importlib
from dataclasses import dataclass

from ray.train.backend import BackendConfig
from ray.train.v2._internal.util import TrainingFramework

from rayft.trainers.startup import STARTUP, mark


def train_loop_per_worker(loop_config: dict) -> None:
    """Entry point handed to the trainer: runs trainers/worker.py's loop in the worker, timing its imports."""
    STARTUP.clear()
    mark("entry")
    libraries = ["torch", "transformers", "peft"] + (["deepspeed"] if loop_config["plan"].get("deepspeed") else [])
    for name in libraries:  # imported here, one by one, only to time them: the worker's modules import them anyway
        importlib.import_module(name)
        mark(name)
    from rayft.trainers.worker import run_worker  # torch, Transformers and PEFT: in the worker only

    mark("rayft")
    run_worker(loop_config)


class _DeviceContext:
    """Ray's torch context around the training function (it selects the worker's CUDA device), entered in the
    worker, where importing torch is free."""

    def __enter__(self):
        from ray.train.torch.config import TorchConfigContextManager

        self._inner = TorchConfigContextManager()
        return self._inner.__enter__()

    def __exit__(self, *exc):
        return self._inner.__exit__(*exc)


@dataclass
class TorchBackend(BackendConfig):
    """Ray Train's TorchConfig (the process group: backend, init method, timeout) with its torch-importing parts
    resolved where they run (the controller and the workers), not on the driver that builds the trainer."""

    backend: str | None = None
    init_method: str = "env"
    timeout_s: int = 1800

    @property
    def backend_cls(self):
        from ray.train.torch.config import _TorchBackend

        return _TorchBackend

    @property
    def train_func_context(self):
        return _DeviceContext

    @property
    def framework(self):
        return TrainingFramework.TORCH

    def to_dict(self) -> dict:
        return {"backend": self.backend, "init_method": self.init_method, "timeout_s": self.timeout_s}
