"""A worker's start-up clock: when each part of its start-up ended (imports by library, the model, the first step).
Rank 0 logs the phases once its first step is done (trainers/common.py), so a run shows where its fixed cost goes."""

import time

STARTUP: list[tuple[str, float]] = []


def mark(phase: str) -> None:
    """Records that `phase` of this worker's start-up has ended now."""
    STARTUP.append((phase, time.time()))


def startup_phases() -> str:
    """The phases recorded so far, in seconds each: "torch 0.9 s, transformers 1.2 s, ..."."""
    return ", ".join(f"{name} {end - start:.1f} s" for (_, start), (name, end) in zip(STARTUP, STARTUP[1:]))
