"""The driver's helper: one process, started when a command begins, that does the driver's work which needs torch and
Transformers (trainers/preflight.py), so that the driver itself never imports them.

It imports the training stack while the driver reads the recipe, locates the data and starts Ray, then answers
calls (pickled arguments and results), and stops when the driver's preparation ends: a run's driver holds no torch
while it trains. A process that has already imported Transformers (a test session, `rayft chat`) runs the same
calls in itself instead.
"""

import concurrent.futures
import importlib
import importlib.metadata
import multiprocessing
import sys

from rayft.recipe.problems import ConfigError, Problem

TRAINING_STACK = ("torch", "transformers", "peft")


def training_stack_installed() -> bool:
    """Whether this environment has the workers' stack (rayft[train]) installed, for a helper process to import."""
    try:
        for name in TRAINING_STACK:
            importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


class _Here(concurrent.futures.Executor):
    """Runs each call at once in this process (which has the training stack loaded already)."""

    def submit(self, fn, /, *args, **kwargs):
        future = concurrent.futures.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as err:  # the caller meets it at result(), as with the helper process
            future.set_exception(err)
        return future


def _resolve(fn):
    """A function, or "module:function" for one in a module the driver itself must not import."""
    if isinstance(fn, str):
        module, name = fn.split(":")
        return getattr(importlib.import_module(module), name)
    return fn


def _run(fn, args, kwargs):
    return _resolve(fn)(*args, **kwargs)


def _start() -> None:
    from rayft.trainers import without_bitsandbytes

    without_bitsandbytes()  # PEFT would import it (about 2.5 s); the helper never loads weights, quantised or not


def _warm(initializer, initargs) -> None:
    from rayft.trainers import preflight  # noqa: F401  (torch, Transformers and PEFT, imported once, up front)

    if initializer is not None:
        _resolve(initializer)(*initargs)


class Helper:
    """The helper process (or this process), used as a context manager; `submit` returns a Future."""

    def __init__(self, needed_for: str, initializer=None, initargs: tuple = (), here: bool = False):
        """`needed_for` names the command in the refusal when this machine lacks the stack; `initializer(*initargs)`
        runs first in the helper process. `here` (tests, and callers that load models themselves) runs every call in
        this process."""
        self.needed_for = needed_for
        self._executor: concurrent.futures.Executor | None = None
        if here or sys.modules.get("transformers") is not None:
            self._executor = _Here()
        elif training_stack_installed():
            # spawn: a fresh interpreter (a fork would copy the driver's Ray connection and threads)
            self._executor = concurrent.futures.ProcessPoolExecutor(
                max_workers=1, mp_context=multiprocessing.get_context("spawn"), initializer=_start)
            # the process starts (and imports) now, not at the first call; an import error reaches that call
            self._executor.submit(_warm, initializer, initargs)

    def submit(self, fn, *args, **kwargs) -> concurrent.futures.Future:
        """Calls `fn(*args, **kwargs)` in the helper (`fn` a function, or "module:function" for one the driver must
        not import); raises ConfigError when this machine lacks the stack."""
        if self._executor is None:
            raise self._refusal("it is not installed")
        return self._executor.submit(_run, fn, args, kwargs)

    def call(self, fn, *args, **kwargs):
        """`submit(...).result()`, or the one-line refusal when the helper cannot import the stack."""
        return self.result(self.submit(fn, *args, **kwargs))

    def result(self, future: concurrent.futures.Future):
        """A submitted call's result (its ConfigError or DataError raised as it is)."""
        try:
            return future.result()
        except ImportError as err:
            raise self._refusal(f"importing it failed: {' '.join(str(err).split())}") from None
        except concurrent.futures.process.BrokenProcessPool:
            raise RuntimeError("the driver's helper process died (out of memory?); run again with --verbose") from None

    def _refusal(self, why: str) -> ConfigError:
        return ConfigError([Problem("rayft[train]", (
            f"{self.needed_for} needs torch, Transformers and PEFT on this machine ({why}); install them with "
            "pip install 'rayft[train]', or send the recipe to a cluster with `rayft submit`"))])

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def __enter__(self) -> "Helper":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
