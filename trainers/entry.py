"""What the driver hands Ray Train, importable without torch: the workers' entry function, which imports the
training stack inside the worker, and the torch process group's backend config, whose torch half Ray Train's
controller and workers import when they use it. The driver thereby starts a run without loading torch.
"""

import importlib
from dataclasses import dataclass

from ray.train.backend import Backend, BackendConfig
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


class _TorchProcessGroup(Backend):
    """Ray Train's torch backend (it sets up and tears down the process group), imported on first use. Ray Train
    builds one on the driver too, for its accelerator callback, which only reads share_cuda_visible_devices: built
    from Ray's class directly, that instance alone loaded torch into the driver (about 190 MB)."""

    share_cuda_visible_devices = True

    @property
    def _torch(self) -> Backend:
        if "_inner" not in self.__dict__:
            from ray.train.torch.config import _TorchBackend

            self._inner = _TorchBackend()
        return self._inner

    def on_start(self, worker_group, backend_config):
        return self._torch.on_start(worker_group, backend_config)

    def on_shutdown(self, worker_group, backend_config):
        return self._torch.on_shutdown(worker_group, backend_config)

    def on_training_start(self, worker_group, backend_config):
        return self._torch.on_training_start(worker_group, backend_config)


@dataclass
class TorchBackend(BackendConfig):
    """Ray Train's TorchConfig (the process group: backend, init method, timeout) with its torch-importing parts
    resolved where they run (the controller and the workers), not on the driver that builds the trainer."""

    backend: str | None = None
    init_method: str = "env"
    timeout_s: int = 1800

    @property
    def backend_cls(self):
        return _TorchProcessGroup

    @property
    def train_func_context(self):
        return _DeviceContext

    @property
    def framework(self):
        return TrainingFramework.TORCH

    def to_dict(self) -> dict:
        return {"backend": self.backend, "init_method": self.init_method, "timeout_s": self.timeout_s}
