"""Experiment tracking from rank 0: TensorBoard, MLflow (a local file store unless told) and W&B offline.

Transformers' own integration callbacks do the logging; rayft only points them somewhere and closes them
after the final evaluation, so every metric of a run, eval included, lands in one tracker run.
"""

import os
from pathlib import Path

from transformers.integrations import (
    MLflowCallback,
    TensorBoardCallback,
    WandbCallback,
    get_reporting_integration_callbacks,
)

from rayft.recipe.config import RecipeConfig
from rayft.recipe.derive import report_targets


def prepare_trackers(cfg: RecipeConfig, output_dir: str) -> None:
    """Settings the tracking libraries read when a run starts; called in the worker before the Trainer."""
    targets = report_targets(cfg.args.report_to)
    if "tensorboard" in targets and cfg.args.logging_dir:  # Transformers 5 reads the folder from here only
        os.environ["TENSORBOARD_LOGGING_DIR"] = cfg.args.logging_dir
    if "wandb" in targets:
        # W&B takes its mode and folder from the environment when its run starts. rayft runs it offline:
        # `wandb sync output_dir/wandb/offline-run-*` uploads a run later from a machine that may.
        os.environ["WANDB_MODE"] = "offline"
        os.environ["WANDB_DIR"] = output_dir
        os.environ.setdefault("WANDB_PROJECT", "rayft")
    if "mlflow" in targets:
        import mlflow  # optional tracker, imported only when report_to names it

        uri = cfg.finetuning.mlflow_tracking_uri or mlflow_file_store(output_dir)
        if uri.startswith("file:"):
            # MLflow 3 keeps its file store for those who opt in; it is the store that needs no server
            os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
        mlflow.set_tracking_uri(uri)


def mlflow_file_store(output_dir: str) -> str:
    """The default MLflow tracking URI: a file store in output_dir/mlruns."""
    return (Path(output_dir) / "mlruns").resolve().as_uri()


class MLflowUntilClosed(MLflowCallback):
    """MLflow's callback, but the run stays open after training so that the final evaluation lands in it."""

    def on_train_end(self, args, state, control, **kwargs):
        pass


def adapt_trackers(trainer) -> None:
    """Swaps the Trainer's MLflow callback for one that `close_trackers` ends."""
    if trainer.pop_callback(MLflowCallback) is not None:
        trainer.add_callback(MLflowUntilClosed())


def tracker_callbacks(report_to: list[str]) -> list:
    """The Trainer's tracker callbacks for `report_to`, MLflow's being one that `close_trackers` ends; for
    a training loop of rayft's own (stage ppo) that drives Transformers' callbacks itself."""

    return [MLflowUntilClosed() if cls is MLflowCallback else cls()
            for cls in get_reporting_integration_callbacks(report_to)]


def close_trackers(callbacks: list) -> None:
    """Ends the tracker runs of these callbacks once every metric is logged; their files are complete afterwards."""
    for callback in callbacks:
        if isinstance(callback, MLflowCallback) and callback._initialized and callback._ml_flow.active_run():
            callback._ml_flow.end_run()
        elif isinstance(callback, TensorBoardCallback) and callback.tb_writer is not None:
            callback.tb_writer.close()
            callback.tb_writer = None
        elif isinstance(callback, WandbCallback) and callback._wandb is not None and callback._wandb.run is not None:
            callback._wandb.finish()
