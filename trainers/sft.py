"""Causal language modelling stages, run inside every Ray Train worker: `sft` and `pt`.

Both train next-token prediction on this worker's shard; what differs is prepared on the driver
(chat-templated conversations with the prompt masked, or packed plain text with every token learned).
"""

from transformers import PrinterCallback, set_seed

from rayft.data.collator import SupervisedCollator
from rayft.orchestrator.config import RecipeConfig
from rayft.trainers.callbacks import LogCallback, say
from rayft.trainers.common import ShardTrainer, eval_shards, finish, shard_rows, training_arguments
from rayft.trainers.model import load_tokenizer, prepare_model, trainable_summary


def run_sft(cfg: RecipeConfig, plan: dict) -> dict:
    """Supervised fine-tuning on templated conversations; returns the final metrics."""
    return fit_causal_lm(cfg, plan)


def run_pt(cfg: RecipeConfig, plan: dict) -> dict:
    """(Continued) pre-training on plain text, packed by default; returns the final metrics."""
    return fit_causal_lm(cfg, plan)


def fit_causal_lm(cfg: RecipeConfig, plan: dict) -> dict:
    """Trains the model on this worker's shard with the Transformers Trainer; returns the final metrics."""
    from ray.train.huggingface.transformers import RayTrainReportCallback

    args = training_arguments(cfg, plan)
    set_seed(args.seed)
    tokenizer = load_tokenizer(cfg.model)
    model = prepare_model(cfg, plan["use_gpu"])
    if args.process_index == 0:
        say(f"[rayft] {trainable_summary(model)}")

    trainer = ShardTrainer(
        model=model,
        args=args,
        train_dataset=shard_rows("train"),
        eval_dataset=eval_shards(cfg),
        data_collator=SupervisedCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=[LogCallback(args.output_dir), RayTrainReportCallback()],
        shuffle=not cfg.finetuning.disable_shuffling,
    )
    trainer.remove_callback(PrinterCallback)  # LogCallback prints one line per logging step instead
    train_result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    return finish(trainer, cfg, plan, train_result, tokenizer)
