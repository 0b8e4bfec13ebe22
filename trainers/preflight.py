"""What the driver checks and prepares with torch and Transformers, run in its helper process (orchestrator/helper.py):
Transformers' own checks of the training keys, a grpo recipe's reward functions and the model probe on the meta
device. The helper also runs data/pipeline.py's tokenizer work for the driver (the encoding of each dataset's first
rows, a small dataset's tokenisation, the first example's description).

Arguments and results are plain data; a user's mistake is raised as ConfigError or DataError, which reach the driver
as they are and are reported in one line.
"""

from rayft.recipe.config import RecipeConfig
from rayft.recipe.logs import configure, verbosity_of
from rayft.recipe.problems import ConfigError, Problem
from rayft.trainers.probe import probe_model
from rayft.trainers.training_args import transformers_problems
from rayft.trainers.verifiable import reward_function_problems


def set_log_level(level: int) -> None:
    """The helper speaks at the driver's level (and keeps the libraries quiet below --verbose)."""
    configure(verbosity_of(level))


def check_recipe(recipe: dict) -> dict:
    """Transformers' checks of the training keys, the reward functions and the model probe; returns the memory
    planner's shape of the model, or raises ConfigError with every problem found."""
    cfg = RecipeConfig.from_dict(recipe)
    problems = reward_function_problems(cfg) + [Problem(k, m) for k, m in transformers_problems(cfg.training)]
    try:
        shape = probe_model(cfg)
    except ConfigError as err:
        problems += err.problems
    if problems:
        raise ConfigError(problems)
    return shape
