"""The driver's helper: one process, started when a command begins, that does the driver's work which needs torch and
Transformers (trainers/preflight.py), so that the driver itself never imports them.

It imports the training stack while the driver reads the recipe, locates the data and starts Ray, then answers
calls (pickled functions, arguments and results over a pipe of its own), and stops when the driver's preparation
ends: a run's driver holds no torch while it trains. A process that has already imported Transformers (a test
session, `rayft chat`) runs the same calls in itself instead.

The helper is a plain `python -m rayft.orchestrator.helper` process, not a multiprocessing one, so that a script that
starts runs needs no `if __name__ == "__main__":` guard and nothing of the driver's process (Ray's connection, its
threads) is copied into it. Its stdout and stderr are the driver's; its calls travel on two pipes of their own.
"""

import concurrent.futures
import importlib
import importlib.metadata
import itertools
import os
import pickle
import struct
import subprocess
import sys
import threading

from rayft.recipe.logs import logger
from rayft.recipe.problems import ConfigError, Problem

TRAINING_STACK = ("torch", "transformers", "peft")
_HEADER = struct.Struct("!Q")


def training_stack_installed() -> bool:
    """Whether this environment has the workers' stack (rayft[train]) installed, for a helper process to import."""
    try:
        for name in TRAINING_STACK:
            importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _resolve(fn):
    """A function, or "module:function" for one in a module the driver itself must not import."""
    if isinstance(fn, str):
        module, name = fn.split(":")
        return getattr(importlib.import_module(module), name)
    return fn


def _send(stream, message) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


def _receive(stream):
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None  # the other end closed its pipe
    (size,) = _HEADER.unpack(header)
    return pickle.loads(stream.read(size))


class _Here(concurrent.futures.Executor):
    """Runs each call at once in this process (which has the training stack loaded already)."""

    def submit(self, fn, /, *args, **kwargs):
        future = concurrent.futures.Future()
        try:
            future.set_result(_resolve(fn)(*args, **kwargs))
        except BaseException as err:  # the caller meets it at result(), as with the helper process
            future.set_exception(err)
        return future


class _Process(concurrent.futures.Executor):
    """The helper process and the thread that hands its answers to the waiting futures."""

    def __init__(self, first_call: tuple):
        calls_read, calls_write = os.pipe()
        answers_read, answers_write = os.pipe()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "rayft.orchestrator.helper", str(calls_read), str(answers_write)],
            pass_fds=(calls_read, answers_write), stdin=subprocess.DEVNULL)
        os.close(calls_read)
        os.close(answers_write)
        self._calls = os.fdopen(calls_write, "wb")
        self._answers = os.fdopen(answers_read, "rb")
        self._pending: dict[int, concurrent.futures.Future] = {}
        self._ids, self._lock = itertools.count(), threading.Lock()
        self._reader = threading.Thread(target=self._read, name="rayft-helper-answers", daemon=True)
        self._reader.start()
        self.submit(*first_call)

    def submit(self, fn, /, *args, **kwargs):
        future = concurrent.futures.Future()
        with self._lock:
            call_id = next(self._ids)
            self._pending[call_id] = future
            try:
                _send(self._calls, (call_id, fn, args, kwargs))
            except (BrokenPipeError, OSError):
                self._pending.pop(call_id)
                future.set_exception(_died(self._proc))
        return future

    def _read(self) -> None:
        while (answer := _receive(self._answers)) is not None:
            call_id, ok, value = answer
            with self._lock:
                future = self._pending.pop(call_id)
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)
        with self._lock:  # the process ended: every call still waiting fails
            for future in self._pending.values():
                future.set_exception(_died(self._proc))
            self._pending.clear()

    def shutdown(self, wait=True, *, cancel_futures=False):
        with self._lock:
            self._calls.close()  # the helper ends when its calls pipe closes
        if wait:
            self._proc.wait()
            self._reader.join()


def _died(proc) -> RuntimeError:
    code = proc.poll()
    return RuntimeError(f"the driver's helper process ended (exit status {code}); run again with --verbose")


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
            # the process starts (and imports) now, not at the first call; an import error reaches that call
            self._executor = _Process((_warm, initializer, initargs))

    def submit(self, fn, *args, **kwargs) -> concurrent.futures.Future:
        """Calls `fn(*args, **kwargs)` in the helper (`fn` a function, or "module:function" for one the driver must
        not import); raises ConfigError when this machine lacks the stack."""
        if self._executor is None:
            raise self._refusal("it is not installed")
        return self._executor.submit(fn, *args, **kwargs)

    def call(self, fn, *args, **kwargs):
        """`submit(...).result()`, or the one-line refusal when the helper cannot import the stack."""
        return self.result(self.submit(fn, *args, **kwargs))

    def result(self, future: concurrent.futures.Future):
        """A submitted call's result (its ConfigError or DataError raised as it is)."""
        try:
            return future.result()
        except ImportError as err:
            raise self._refusal(f"importing it failed: {' '.join(str(err).split())}") from None

    def _refusal(self, why: str) -> ConfigError:
        return ConfigError([Problem("rayft[train]", (
            f"{self.needed_for} needs torch, Transformers and PEFT on this machine ({why}); install them with "
            "pip install 'rayft[train]', or send the recipe to a cluster with `rayft submit`"))])

    def close(self) -> None:
        """Ends the helper. The driver does not wait for its process to exit (about a second of torch's clean-up):
        it reads nothing more from it and goes on."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def __enter__(self) -> "Helper":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def driver_helper(needed_for: str) -> Helper:
    """The helper of a command's driver (started now, so that it imports while the driver reads and starts Ray),
    speaking at the driver's log level."""
    return Helper(needed_for, initializer="rayft.trainers.preflight:set_log_level",
                  initargs=(logger.getEffectiveLevel(),))


def serve(calls_fd: int, answers_fd: int) -> None:
    """The helper process: runs each call it reads and writes back (id, ok, result or exception) until the driver
    closes its pipe."""
    from rayft.trainers import without_bitsandbytes

    without_bitsandbytes()  # PEFT would import it (about 2.5 s); the helper never loads weights, quantised or not
    try:
        with os.fdopen(calls_fd, "rb") as calls, os.fdopen(answers_fd, "wb") as answers:
            while (call := _receive(calls)) is not None:
                call_id, fn, args, kwargs = call
                try:
                    answer = (call_id, True, _resolve(fn)(*args, **kwargs))
                except BaseException as err:  # a user's mistake (ConfigError, DataError) or an import error
                    answer = (call_id, False, err)
                try:
                    _send(answers, answer)
                except (pickle.PicklingError, TypeError, AttributeError) as err:  # an unpicklable result or error
                    _send(answers, (call_id, False, RuntimeError(f"{type(err).__name__}: {err}")))
    except BrokenPipeError:
        pass  # the driver stopped at an error of its own before this answer: it reads nothing more


if __name__ == "__main__":
    serve(int(sys.argv[1]), int(sys.argv[2]))
