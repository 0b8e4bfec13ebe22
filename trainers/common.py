"""Pieces every stage's entry function shares: the worker's data shard, the Trainer, and the finish line."""

import torch
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler
from transformers import Seq2SeqTrainer

from rayft.orchestrator.args import TrainingArguments, comma_list
from rayft.orchestrator.config import RecipeConfig
from rayft.trainers import outputs


def shard_rows(name: str) -> list[dict] | None:
    """This worker's shard of dataset `name` from Ray Data, as a list of plain examples (None if absent)."""
    import ray.train

    try:
        shard = ray.train.get_dataset_shard(name)
    except KeyError:
        return None
    if shard is None:
        return None
    columns = ("input_ids", "labels", "position_ids")
    return [{k: row[k].tolist() for k in columns if k in row} for row in shard.iter_rows()]


def eval_shards(cfg: RecipeConfig) -> list[dict] | dict[str, list[dict]] | None:
    """This worker's evaluation data: one shard, or one per eval dataset with eval_on_each_dataset."""
    d = cfg.data
    if d.eval_dataset and d.eval_on_each_dataset:
        return {name: shard_rows(f"eval_{name}") for name in comma_list(d.eval_dataset)}
    return shard_rows("eval")


def training_arguments(cfg: RecipeConfig, plan: dict) -> TrainingArguments:
    """The real TrainingArguments, built inside the worker with the planned device and DeepSpeed config."""
    if plan["deepspeed"] is not None:
        import deepspeed

        # Ray already made the torch process group; DeepSpeed must adopt it before ZeRO-3 builds the
        # model partitioned, or its batch-size check sees a world of one.
        deepspeed.init_distributed(dist_backend=plan["backend"])
    kwargs = dict(cfg.training)
    kwargs.update(deepspeed=plan["deepspeed"], use_cpu=not plan["use_gpu"], remove_unused_columns=False)
    kwargs.setdefault("disable_tqdm", True)  # rayft prints its own progress line per logging step
    return TrainingArguments(**kwargs)


class ShardTrainer(Seq2SeqTrainer):
    """A Trainer over the worker's own Ray Data shard.

    The shard is already this worker's share of the data, so its loader must not be split again across
    processes (which the default accelerate-prepared loader would do).
    """

    def __init__(self, *args, shuffle: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.shuffle = shuffle

    def get_train_dataloader(self) -> DataLoader:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.args.data_seed or self.args.seed)
            sampler = RandomSampler(self.train_dataset, generator=generator)  # reshuffles every epoch
        else:
            sampler = SequentialSampler(self.train_dataset)
        return self._loader(self.train_dataset, self.args.per_device_train_batch_size, sampler)

    def get_eval_dataloader(self, eval_dataset=None) -> DataLoader:
        dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        if isinstance(dataset, str):  # Trainer names one of several eval datasets
            dataset = self.eval_dataset[dataset]
        return self._loader(dataset, self.args.per_device_eval_batch_size, SequentialSampler(dataset))

    def _loader(self, dataset, batch_size: int, sampler) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=self.data_collator,
            drop_last=self.args.dataloader_drop_last,
            num_workers=self.args.dataloader_num_workers,
        )


def finish(trainer, cfg: RecipeConfig, plan: dict, train_result, tokenizer) -> dict:
    """Saves model, tokenizer, metrics, plots, config and model card; returns the final metrics."""
    output_dir = trainer.args.output_dir
    trainer.save_model()  # every rank calls it: under ZeRO-3 the weights are gathered first
    metrics = dict(train_result.metrics)
    if trainer.eval_dataset is not None:
        metrics.update(trainer.evaluate(metric_key_prefix="eval"))
    trainer.save_metrics("train", train_result.metrics)
    if any(k.startswith("eval_") for k in metrics):
        trainer.save_metrics("eval", {k: v for k, v in metrics.items() if k.startswith("eval_")})
    trainer.save_state()
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(output_dir)
        masked = cfg.to_dict(mask_secrets=True)
        outputs.save_config(output_dir, masked, plan)
        if cfg.finetuning.plot_loss:
            outputs.plot_loss(output_dir)
        outputs.write_model_card(output_dir, masked, metrics)
    return metrics
