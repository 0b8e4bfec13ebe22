"""Where a worker resumes: the checkpoint Ray Train restores (or a pbt segment starts from), and, when the group's size
differs from the one that wrote its ZeRO state, a node-local view of it converted to DeepSpeed's universal form. The
decision is recipe/resume.py's `decide_resume`; this module carries it out."""

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import ray.train
import torch

from rayft.cluster.storage import checkpoint_at
from rayft.recipe.logs import logger
from rayft.recipe.plan import Plan
from rayft.recipe.resume import decide_resume


def resume_point(plan: Plan) -> tuple[dict | None, str | None]:
    """The DeepSpeed config and the checkpoint this worker resumes from (None on a fresh run), as
    recipe/resume.py's `decide_resume` decides from the checkpoint found and the group's size.

    A ZeRO checkpoint partitions the optimizer by rank; written by another number of workers (an elastic run
    resized, or ray_num_workers changed between runs), it is first converted to DeepSpeed's universal form, per
    parameter and independent of the world size, which DeepSpeed then loads with `checkpoint.load_universal`.
    """
    checkpoint = restored_checkpoint(plan)
    saved = zero_world_size(checkpoint) if checkpoint is not None and plan.deepspeed is not None else None
    decision = decide_resume(checkpoint, saved, ray.train.get_context().get_world_size())
    if decision.kind != "convert":
        return plan.deepspeed, decision.checkpoint
    universal = universal_checkpoint(checkpoint, decision.saved_world, decision.world)
    return {**plan.deepspeed, "checkpoint": {"load_universal": True}}, universal


def zero_world_size(checkpoint: str) -> int | None:
    """How many ranks wrote a DeepSpeed checkpoint's partitioned optimizer state (None: not partitioned)."""
    tag_file = Path(checkpoint) / "latest"
    if not tag_file.is_file():
        return None
    ranks = {p.name.split("zero_pp_rank_")[1].split("_")[0]
             for p in (Path(checkpoint) / tag_file.read_text().strip()).glob("*zero_pp_rank_*_optim_states.pt")}
    return len(ranks) or None


def universal_checkpoint(checkpoint: str, saved: int, world: int) -> str:
    """A node-local view of `checkpoint` whose DeepSpeed state is the universal form (made once per node, by
    its local rank 0); every rank waits for it."""
    context = ray.train.get_context()
    # One folder per group start and node, made by the node's first rank: the nodes of a test cluster share one
    # disk (and one IP, so Ray's local ranks do not tell them apart), and a group that is being replaced may still
    # be removing its own view of the same checkpoint. Rank 0 names the start for all.
    node = ray.get_runtime_context().get_node_id()
    mine = (node, uuid.uuid4().hex[:8])
    every = [mine]
    if torch.distributed.is_initialized():
        every = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(every, mine)
    attempt = every[0][1]
    view = UNIVERSAL_VIEWS / f"{hashlib.sha1(checkpoint.encode()).hexdigest()[:16]}-{node[:12]}-{attempt}"
    if [n for n, _ in every].index(node) == context.get_world_rank():
        if context.get_world_rank() == 0:
            logger.info(f"the checkpoint's ZeRO state is partitioned for {saved} worker(s), the group has {world}: "
                        "converting it to DeepSpeed's universal checkpoint")
        universal_view(Path(checkpoint), view)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return str(view)


# node-local: a view holds a converted copy of the optimizer state, removed when the run's training ends
UNIVERSAL_VIEWS = Path(tempfile.gettempdir()) / "rayft-universal"


def universal_view(source: Path, view: Path) -> None:
    """Makes `view`: the files of checkpoint folder `source` (linked, not copied) with its DeepSpeed state converted
    by DeepSpeed's ds_to_universal into `view/universal`, which `view/latest` names. `source` is not changed."""
    tag = (source / "latest").read_text().strip()
    shutil.rmtree(view, ignore_errors=True)
    view.mkdir(parents=True)
    for entry in source.iterdir():
        if entry.name != "latest":
            (view / entry.name).symlink_to(entry.resolve())
    done = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
                           "--input_folder", str(source / tag), "--output_folder", str(view / "universal"),
                           "--num_extract_workers", "1", "--num_merge_workers", "1", "--inject_missing_state"],
                          capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"DeepSpeed could not convert {source / tag} to a universal checkpoint:\n"
                           + done.stdout[-2000:] + done.stderr[-2000:])
    (view / "latest").write_text("universal")  # last: a view without it is incomplete and made again


def restored_checkpoint(plan: Plan) -> str | None:
    """The Trainer checkpoint to resume from when Ray Train restarts this run: after a worker failure, or
    when a run with the same ray_run_name and storage is started again; else the checkpoint a pbt segment starts
    from (plan.start_from). None on a fresh run."""

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and plan.start_from is not None:
        checkpoint = checkpoint_at(plan.start_from["uri"], plan.start_from["filesystem"])
    if checkpoint is None:
        return None
    import pyarrow.fs

    # on remote storage (s3://, gs://) the path is the file system's own, without its scheme: download it
    on_disk = isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem)
    local = checkpoint.path if on_disk else checkpoint.to_directory()
    # RayTrainReportCallback stores the Trainer's checkpoint folder under `checkpoint/`
    path = Path(local) / "checkpoint"
    logger.info(f"resuming from the checkpoint reported to Ray Train: {checkpoint.path}")
    return str(path)


def resumed_epoch(checkpoint: str) -> int:
    """The epoch a Trainer checkpoint was saved in, from its trainer_state.json (0 when it has none)."""
    state = Path(checkpoint) / "trainer_state.json"
    return int(json.loads(state.read_text()).get("epoch") or 0) if state.is_file() else 0
