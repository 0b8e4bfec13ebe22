"""DeepSpeed's CPU shared-memory op: built once (by the driver's helper process) before CPU workers start.

Importable without torch: the driver only looks whether the op is built.
"""

import os
from pathlib import Path

from rayft.recipe.logs import logger, quiet_import


def prebuild_cpu_ops() -> None:
    """Compiles DeepSpeed's shared-memory collective op once, before CPU workers start.

    Without a GPU, DeepSpeed JIT-compiles this op on first use; two workers compiling it at once crash,
    so the driver builds it into the shared torch extensions cache first (about a minute, then cached).
    """
    import torch  # in the helper process that builds it

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
    return any(extensions_root().glob(f"**/{name}/{name}.so"))


def extensions_root() -> Path:
    """Where torch builds its extensions: TORCH_EXTENSIONS_DIR, else torch's default, the user's cache folder
    (torch.utils.cpp_extension.get_default_build_root on Linux), found without importing torch."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(cache, "torch_extensions").resolve()
