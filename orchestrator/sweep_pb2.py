"""`sweep.scheduler: pb2`: Ray Tune's PB2 over rayft's segmented trials, in a module of its own because Ray's PB2
imports scikit-learn, which only the sweeps that use it should pay for."""

from ray.tune.schedulers.pb2 import PB2

from rayft.orchestrator.population import Segmented


class SegmentedPB2(Segmented, PB2):
    """Ray Tune's PB2 in segments: an exploit's values are chosen by a Gaussian-process bandit over the population's
    results so far (Parker-Holder et al., 2020), within each key's [low, high] on a linear scale."""
