"""A worker's data: its share of each Ray Data split, streamed a batch at a time into the Trainer (and, for an elastic
run, its part of every global batch of one order that any group size agrees on)."""

import ray.train
from torch.utils.data import IterableDataset

from rayft.recipe.config import RecipeConfig
from rayft.recipe.plan import Plan
from rayft.recipe.values import comma_list


def _shard(name: str):
    try:
        return ray.train.get_dataset_shard(name)
    except (KeyError, AssertionError):  # Ray Train's local mode asserts that the dataset exists
        return None


# columns the pipeline adds for its token statistics; the trainers do not need them
COUNT_COLUMNS = ("num_tokens", "num_trained", "truncated")


class ShardStream(IterableDataset):
    """This worker's share of a dataset, read from Ray Data a batch at a time as the Trainer asks for examples:
    the worker never holds more than the shuffle buffer and the block being read.

    Each pass (epoch) reads the share again, shuffled through a buffer of `buffer_size` examples seeded by the
    seed and the epoch (no buffer: in order). `length` (the share's size, when the data is materialised) lets
    the Trainer count epochs; Ray Train splits a dataset into equal shares, so no worker runs out first.
    """

    def __init__(self, shard, buffer_size: int | None, seed: int, length: int | None = None, prefetch: int = 1):
        self.shard, self.buffer_size, self.seed, self.length, self.epoch = shard, buffer_size, seed, length, 0
        self.prefetch = max(1, prefetch)

    def __len__(self) -> int:
        if self.length is None:
            raise TypeError("a streamed dataset has no length")
        return self.length

    def resume_at(self, epoch: int) -> None:
        """The next pass is epoch `epoch` (a run resumed in its middle reads that epoch's order again)."""
        self.epoch = epoch

    def __iter__(self):
        epoch, self.epoch = self.epoch, self.epoch + 1
        shuffle = {} if not self.buffer_size else dict(local_shuffle_buffer_size=self.buffer_size,
                                                       local_shuffle_seed=self.seed + epoch)
        batches = self.shard.iter_batches(batch_size=min(256, self.buffer_size or 256), batch_format="numpy",
                                          prefetch_batches=self.prefetch, **shuffle)
        for batch in batches:
            columns = [k for k in batch if k not in COUNT_COLUMNS]
            for i in range(len(batch[columns[0]])):
                yield {k: plain(batch[k][i]) for k in columns}


class GlobalBatchShare(ShardStream):
    """An elastic run's training data: this worker's share of each global batch of one order that every size of
    the group agrees on.

    Every worker reads the whole dataset in the same seeded order. Optimizer step s trains positions
    [s * global_batch, (s + 1) * global_batch) of the epoch, and rank r of `world` workers takes the r-th of
    `world` equal parts of them. Which examples a step trains therefore does not depend on the group's size, and
    the Trainer's own resume (it skips the batches of the steps already trained) lands on the first untrained
    position after a resize too.
    """

    def __init__(self, shard, buffer_size: int | None, seed: int, rank: int, world: int, global_batch: int,
                 steps_per_epoch: int, prefetch: int = 1):
        share = global_batch // world
        super().__init__(shard, buffer_size, seed, steps_per_epoch * share, prefetch)
        self.rank, self.share, self.global_batch = rank, share, global_batch

    def __iter__(self):
        mine = range(self.rank * self.share, (self.rank + 1) * self.share)
        end = len(self) // self.share * self.global_batch  # the epoch's whole global batches
        for position, example in enumerate(super().__iter__()):
            if position >= end:
                return
            if position % self.global_batch in mine:
                yield example


def plain(value):
    """A numpy value as plain Python (a token array as a list; text columns may already be str)."""
    return value.tolist() if hasattr(value, "tolist") else value


def train_shard(cfg: RecipeConfig, plan: Plan) -> ShardStream:
    """This worker's training data as a stream; materialised data (not streaming) has a known length."""
    buffer = None if cfg.finetuning.disable_shuffling else cfg.data.buffer_size
    seed = cfg.args.data_seed or cfg.args.seed
    if plan.elastic:
        context = ray.train.get_context()
        return GlobalBatchShare(_shard("train"), buffer, seed, context.get_world_rank(), context.get_world_size(),
                                plan.global_batch_size, plan.steps_per_epoch, prefetch=cfg.args.dataloader_num_workers)
    length = None if cfg.data.streaming else plan.examples_per_worker
    # dataloader_num_workers: Ray Data's threads prefetch that many batches (forked DataLoader processes could
    # not read a Ray Data iterator)
    return ShardStream(_shard("train"), buffer, seed, length, prefetch=cfg.args.dataloader_num_workers)


def eval_shards(cfg: RecipeConfig) -> ShardStream | dict[str, ShardStream] | None:
    """This worker's evaluation data, in order: one stream, or one per eval dataset with eval_on_each_dataset."""
    d = cfg.data
    if d.eval_dataset and d.eval_on_each_dataset:
        return {name: ShardStream(_shard(f"eval_{name}"), None, 0) for name in comma_list(d.eval_dataset)}
    shard = _shard("eval")
    return None if shard is None else ShardStream(shard, None, 0)
