"""DeepSpeed's CPU shared-memory op: built once on the driver before CPU workers start."""

import torch

from rayft.recipe.logs import logger, quiet_import


def prebuild_cpu_ops() -> None:
    """Compiles DeepSpeed's shared-memory collective op once, before CPU workers start.

    Without a GPU, DeepSpeed JIT-compiles this op on first use; two workers compiling it at once crash,
    so the driver builds it into the shared torch extensions cache first (about a minute, then cached).
    """

    if torch.cuda.is_available():
        return
    with quiet_import():
        from deepspeed.accelerator import get_accelerator  # heavy; only CPU runs with DeepSpeed need the op

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not builder.is_compatible(verbose=False):
        return
    logger.info("preparing DeepSpeed's CPU shared-memory op (compiled once, then cached)")
    builder.load(verbose=False)
