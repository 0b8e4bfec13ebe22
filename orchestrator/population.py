"""Population Based Training over rayft's segmented trials (run_pbt_trial in sweep.py): the scheduler side, shared
by pbt and pb2, and the records each trial keeps of where it restarts."""

import json
import math
from pathlib import Path

from ray.tune.schedulers import PopulationBasedTraining, TrialScheduler

from rayft.orchestrator.sweep_spec import describe
from rayft.recipe.logs import logger
from rayft.recipe.problems import Problem

# In a pbt trial's output_dir: where its last segment ended (its trial, step and Ray Train checkpoint), and the
# donor's such record with the trial's new values when pbt exploited another trial for it. The trial starts from
# whichever is later (an exploit at the step it reached wins). Tune's own checkpoints hold the same pointers, but a
# trial exploited while its own report is being saved can be restarted with neither (Ray 2.60), so rayft keeps
# its own record.
SEGMENT_FILE = "pbt_segment.json"
EXPLOIT_FILE = "pbt_exploit.json"


class Segmented:
    """Population Based Training (pbt, pb2) for trials that report at the ends of their segments (run_pbt_trial).

    A trial's last report is not a point to exploit at: nothing is left to train from the donor's checkpoint. And
    Tune's experiment state is saved as soon as an exploit is decided (otherwise every 10 s or more), so that a
    driver that dies right after it resumes with the exploit rather than without it.
    """

    def __init__(self, trials_dir: Path, **kwargs):
        super().__init__(**kwargs)
        self.trials_dir = trials_dir

    def on_trial_result(self, tune_controller, trial, result):
        if result.get("step", 0) >= result.get("total_steps", math.inf):
            return TrialScheduler.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)

    def _exploit(self, tune_controller, trial, trial_to_clone):
        donor = self.trials_dir / str(trial_to_clone) / SEGMENT_FILE
        if not donor.is_file():  # its segment's checkpoint is not written (a save that failed): no exploit
            logger.info(Problem("pbt", f"{trial_to_clone} has no checkpoint to continue {trial} from; no exploit"))
            return
        super()._exploit(tune_controller, trial, trial_to_clone)
        values = {k: trial.config[k] for k in self._hyperparam_mutations}
        record = {**json.loads(donor.read_text()), "config": values}
        (self.trials_dir / str(trial) / EXPLOIT_FILE).write_text(json.dumps(record))
        logger.info(Problem("pbt", f"{trial} continues from {trial_to_clone} at step {record['step']}: "
                                   f"{describe(values)}"))
        tune_controller.checkpoint(force=True)


class SegmentedPBT(Segmented, PopulationBasedTraining):
    """Ray Tune's PBT in segments: an exploit multiplies the donor's values by 0.8 or 1.2, or draws them afresh."""
