"""`rayft submit`, `status` and `logs`: a recipe run as a Ray job through the cluster's job API.

The recipe is validated here first; the working directory is uploaded without virtual environments,
caches of compiled ops and outputs; inside the job, `rayft train` joins the cluster through RAY_ADDRESS.
"""

import shlex
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ray.job_submission import JobSubmissionClient

from rayft.recipe.logs import logger
from rayft.recipe.problems import ConfigError, Problem

if TYPE_CHECKING:  # the schema pulls in Transformers, which `rayft status` and `rayft logs` do not need
    from rayft.recipe.config import RecipeConfig

# Never uploaded with the working directory: environments, compiled ops, outputs, version control.
UPLOAD_EXCLUDES = [".venv", ".git", ".cache/torch_extensions", "saves", "**/__pycache__", "*.egg-info",
                   ".pytest_cache", "benchmarks/results"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
AGENT_RETRIES = 12


def runtime_env(cfg: "RecipeConfig", working_dir: str) -> dict:
    """The job's runtime_env: the recipe's `ray_runtime_env`, plus the working directory and the excludes."""
    env = dict(cfg.ray.ray_runtime_env or {})
    env.setdefault("working_dir", working_dir)
    env["excludes"] = list(dict.fromkeys([*env.get("excludes", []), *UPLOAD_EXCLUDES]))
    return env


def entrypoint(recipe: str, overrides: list[str], command: str = "train") -> str:
    """The job's command: the same `rayft train` (or `rayft pipeline`) a user would type, through the job's Python."""
    return shlex.join(["python", "-m", "rayft.orchestrator.cli", command, recipe, *overrides])


def output_problems(raw: dict) -> list[str]:
    """A job runs in a temporary copy of the working directory: relative output paths would vanish with it."""
    problems = []
    for key in ("output_dir", "ray_storage_path"):
        value = str(raw.get(key) or ("./saves" if key == "ray_storage_path" else ""))
        if value and "://" not in value and not Path(value).expanduser().is_absolute():
            problems.append(Problem(key, f"{value!r} is relative, so the job would write it inside its temporary copy "
                                         "of the working directory; give an absolute path on storage the cluster "
                                         "shares, or a URI"))
    return problems


def client(address: str) -> JobSubmissionClient:
    """The cluster's job API at `address`; raises ConnectionError when nothing answers there."""
    return JobSubmissionClient(address)


def submit(cfg: "RecipeConfig", recipe: str, overrides: list[str], address: str, working_dir: str = ".",
           wait: bool = True, command: str = "train") -> tuple[str, str]:
    """Submits the job (`rayft <command> recipe overrides`); returns (job id, final status), or (job id, "PENDING")
    without `wait`."""
    jobs = client(address)
    for attempt in range(AGENT_RETRIES + 1):
        try:
            job_id = jobs.submit_job(entrypoint=entrypoint(recipe, overrides, command),
                                     runtime_env=runtime_env(cfg, working_dir),
                                     metadata={"rayft_run_name": cfg.ray.ray_run_name or ""})
            break
        except RuntimeError as err:  # a head that has just started answers before its job agent is ready
            if "No available agent" not in str(err) or attempt == AGENT_RETRIES:
                raise
            logger.info("the cluster's job agent is not ready yet; retrying in 5 s")
            time.sleep(5)
    logger.info(f"submitted job {job_id} to {address}")
    if not wait:
        logger.info(f"follow it with: rayft status {job_id} --address {address}; rayft logs {job_id} --address "
                    f"{address}")
        return job_id, "PENDING"
    return job_id, follow(jobs, job_id)


def follow(jobs, job_id: str, poll_seconds: float = 1.0) -> str:
    """Prints the job's log as it grows until the job ends; returns its final status."""
    shown = 0
    while True:
        status = str(jobs.get_job_status(job_id)).split(".")[-1]
        text = jobs.get_job_logs(job_id)
        if len(text) > shown:
            print(text[shown:].rstrip("\n"), flush=True)  # the job's own output, as it wrote it
            shown = len(text)
        if status in TERMINAL:
            logger.info(f"job {job_id} {status}")
            return status
        time.sleep(poll_seconds)


def require_absolute_outputs(raw: dict) -> None:
    problems = output_problems(raw)
    if problems:
        raise ConfigError(problems)
