"""DeepSpeed checkpoints resumed at another world size, without Ray; used by test_elastic.

    python tests/zero_resize.py OUT_DIR

For ZeRO stages 0-3, a small MLP with torch's AdamW trains 6 steps of one global batch of 8 each: steps 1-2 on
2 processes (checkpoint), 3-4 on 1 process resumed from it (checkpoint), 5-6 on 2 processes resumed from that.
Where the saved world size differs, the checkpoint goes through rayft's own `universal_view` (DeepSpeed's
universal checkpoint), as a Ray Train worker's resume does. The reference runs the 6 steps on 2 processes at once,
saving the chain's first checkpoint after step 2.
Prints one JSON line: {stage: {"chained": [6 losses], "reference": [6 losses]}}.
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

STAGES = (0, 1, 2, 3)
GLOBAL_BATCH = 8


def batches(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    x = torch.randn(GLOBAL_BATCH, 8, generator=generator)
    return x, torch.sin(x[:, :4] * 3)


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))


def phase(rank: int, world: int, port: int, out: str, jobs: list[tuple], results: dict) -> None:
    """Runs `jobs` of (name, first step, steps, checkpoint to load or None, step after which to save checkpoint
    "a" or None) for every stage on `world` processes."""
    import deepspeed

    from rayft.trainers.resume import universal_view, zero_world_size

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    deepspeed.init_distributed(dist_backend="gloo")
    torch.set_num_threads(1)
    share = GLOBAL_BATCH // world
    losses = {}
    for (save, first_step, steps, load, save_at), stage in ((job, stage) for job in jobs for stage in STAGES):
        config = {"train_batch_size": GLOBAL_BATCH, "train_micro_batch_size_per_gpu": share,
                  "gradient_accumulation_steps": 1, "zero_allow_untested_optimizer": True,
                  "zero_optimization": {"stage": stage}}
        source = Path(out) / f"z{stage}" / load if load else None
        if source is not None and zero_world_size(str(source)) not in (None, world):
            view = Path(out) / f"z{stage}" / f"{load}-universal-{world}"
            if rank == 0:
                universal_view(source, view)
            dist.barrier()
            source, config["checkpoint"] = view, {"load_universal": True}
        net = model()
        engine, *_ = deepspeed.initialize(model=net, optimizer=torch.optim.AdamW(net.parameters(), lr=0.05),
                                          config=config)
        if source is not None:
            engine.load_checkpoint(str(source))
        stage_losses = []
        for step in range(first_step, first_step + steps):
            x, y = batches(step)
            x, y = x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]
            loss = torch.nn.functional.mse_loss(engine(x), y)
            engine.backward(loss)
            engine.step()
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            stage_losses.append(mean.item() / world)
            if step + 1 == save_at:  # a checkpoint in the middle of the run, which goes on
                engine.save_checkpoint(str(Path(out) / f"z{stage}" / "a"))
        engine.save_checkpoint(str(Path(out) / f"z{stage}" / save))
        losses[f"{save}{stage}"] = stage_losses
    if rank == 0:
        results.update(losses)
    dist.destroy_process_group()


def run(world: int, port: int, out: str, jobs: list[tuple]) -> dict:
    with mp.Manager() as manager:
        results = manager.dict()
        # forked, so each process starts with torch and DeepSpeed already imported by this one (about 4 s each)
        mp.start_processes(phase, args=(world, port, out, jobs, results), nprocs=world, start_method="fork")
        return dict(results)


def main(out: str) -> None:
    import deepspeed  # noqa: F401  (imported once, before the processes are forked)

    from rayft.trainers import common  # noqa: F401
    # the reference's first two steps are the chain's: it saves checkpoint "a" after them and trains on
    losses = run(2, 29611, out, [("reference", 0, 6, None, 2)])
    losses.update(run(1, 29612, out, [("b", 2, 2, "a", None)]))
    losses.update(run(2, 29613, out, [("c", 4, 2, "b", None)]))
    print(json.dumps({stage: {"chained": losses[f"reference{stage}"][:2] + losses[f"b{stage}"] + losses[f"c{stage}"],
                              "reference": losses[f"reference{stage}"]} for stage in STAGES}))


if __name__ == "__main__":
    main(sys.argv[1])
