"""Experiment tracking from rank 0: TensorBoard, MLflow (a local file store unless told), W&B offline and SwanLab.

Transformers' own integration callbacks do the logging (SwanLab's through its own Transformers callback, as
LLaMA-Factory does); rayft only points them somewhere and closes them after the final evaluation, so every
metric of a run, eval included, lands in one tracker run.
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
from rayft.recipe.derive import report_targets, uses_swanlab


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


def without_swanlab(report_to):
    """`report_to` for Transformers: SwanLab is rayft's own callback (`swanlab_callbacks`), never Transformers'."""
    targets = report_targets(report_to)
    if "swanlab" not in targets:
        return report_to
    return [name for name in targets if name != "swanlab"] or "none"


def swanlab_callbacks(cfg: RecipeConfig, output_dir: str, process_index: int, run_name: str) -> list:
    """SwanLab's callback on rank 0 when the recipe tracks with SwanLab (none elsewhere). Cloud mode logs in with
    swanlab_api_key without saving it; local and offline modes write to swanlab_logdir (default output_dir/swanlog).
    The run's config is the recipe with its secrets masked."""
    f = cfg.finetuning
    if not uses_swanlab(cfg) or process_index != 0:
        return []
    import swanlab  # optional tracker, imported only when the recipe asks for it
    from swanlab.integration.transformers import SwanLabCallback

    if f.swanlab_api_key and f.swanlab_mode == "cloud":
        swanlab.login(api_key=f.swanlab_api_key, save=False)
    if f.swanlab_lark_webhook_url:
        from swanlab.plugin.notification import LarkCallback

        swanlab.register_callbacks([LarkCallback(webhook_url=f.swanlab_lark_webhook_url, secret=f.swanlab_lark_secret)])
    callback = SwanLabCallback(project=f.swanlab_project, workspace=f.swanlab_workspace,
                               experiment_name=f.swanlab_run_name or run_name, mode=f.swanlab_mode,
                               log_dir=f.swanlab_logdir or str(Path(output_dir) / "swanlog"), tags=["rayft"],
                               log_config=False)  # Transformers' arguments: the recipe below says it all
    callback.update_config({"recipe": cfg.to_dict(mask_secrets=True)})
    return [callback]


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
        elif type(callback).__name__ == "SwanLabCallback" and callback._get_active_run() is not None:
            import swanlab  # (imported only where it tracks)

            swanlab.finish()
