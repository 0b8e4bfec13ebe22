"""DeepSpeed's CPU shared-memory op: built once on the driver before CPU workers start."""

import os
from pathlib import Path

import torch
from torch.utils.cpp_extension import get_default_build_root

from rayft.recipe.logs import logger, quiet_import


def prebuild_cpu_ops() -> None:
    """Compiles DeepSpeed's shared-memory collective op once, before CPU workers start.

    Without a GPU, DeepSpeed JIT-compiles this op on first use; two workers compiling it at once crash,
    so the driver builds it into the shared torch extensions cache first (about a minute, then cached).
    """

    if torch.cuda.is_available() or shm_op_is_built():
        return
    with quiet_import():
        from deepspeed.accelerator import get_accelerator  # heavy; only CPU runs with DeepSpeed need the op

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not builder.is_compatible(verbose=False):
        return
    logger.info("preparing DeepSpeed's CPU shared-memory op (compiled once, then cached)")
    builder.load(verbose=False)


def shm_op_is_built(name: str = "deepspeed_shm_comm") -> bool:
    """Whether torch's extension cache already holds the op (then DeepSpeed, about 2 s to import, is not needed
    on the driver: the workers load the op from that cache)."""
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())  # where torch builds it
    return any(root.glob(f"**/{name}/{name}.so"))
