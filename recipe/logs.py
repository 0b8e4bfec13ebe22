"""The `rayft` logger, on the driver and in the workers, and the console's verbosity.

By default the console shows rayft's own summary lines and keeps the libraries' repeated warnings, deprecation
notices and progress bars out of it; `--verbose` shows everything, `--quiet` only warnings and errors.
"""

import contextlib
import logging
import sys
import warnings

logger = logging.getLogger("rayft")

QUIET, DEFAULT, VERBOSE = -1, 0, 1
LEVELS = {QUIET: logging.WARNING, DEFAULT: logging.INFO, VERBOSE: logging.DEBUG}
# Loggers of the libraries a run uses, kept to their errors unless --verbose.
LIBRARY_LOGGERS = ("DeepSpeed", "deepspeed", "datasets", "torch.distributed", "ray.data", "ray.train", "ray.tune",
                   "filelock", "urllib3", "matplotlib", "absl", "jieba")


class _Console(logging.Handler):
    """Writes `[rayft] message` lines to the process's real stdout.

    Ray Train wraps `sys.stdout` in its workers; the real one reaches the driver's console exactly once.
    """

    def emit(self, record: logging.LogRecord) -> None:
        try:
            prefix = "[rayft] " if record.levelno < logging.WARNING else f"[rayft] {record.levelname.lower()}: "
            sys.__stdout__.write(prefix + record.getMessage() + "\n")
            sys.__stdout__.flush()
        except Exception:  # a closed stream at interpreter exit must not raise from logging
            self.handleError(record)


def configure(verbosity: int = DEFAULT) -> None:
    """Sets the rayft logger's console level and, below --verbose, quiets the libraries. Idempotent."""
    for handler in [h for h in logger.handlers if isinstance(h, _Console)]:
        logger.removeHandler(handler)
    logger.addHandler(_Console())
    logger.setLevel(LEVELS[max(QUIET, min(VERBOSE, verbosity))])
    logger.propagate = False
    if verbosity < VERBOSE:
        quiet_libraries()


def quiet_libraries() -> None:
    """Keeps deprecation and future warnings, library info logs and weight-loading progress bars off the console."""
    for category in (FutureWarning, DeprecationWarning, PendingDeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    warnings.filterwarnings("ignore", message=".*use_cache=True.*")
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    transformers = sys.modules.get("transformers")  # never imported for this: the driver and the client run without it
    if transformers is not None:
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()


@contextlib.contextmanager
def quiet_import():
    """Below --verbose, silences the log lines a library emits while it is imported (DeepSpeed announces its
    accelerator at import), then quiets its loggers, whose levels it sets itself."""
    if logger.isEnabledFor(logging.DEBUG):
        yield
        return
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)
        quiet_libraries()


def requiet() -> None:
    """Quiets the libraries again after one was imported: some (DeepSpeed, Ray Data) set their own levels then."""
    if not logger.isEnabledFor(logging.DEBUG):
        quiet_libraries()


class Relay(logging.Handler):
    """Sends a worker's log records to a callable (rank 0 posts them to the driver, which shows them)."""

    def __init__(self, send):
        super().__init__()
        self.send = send

    def emit(self, record: logging.LogRecord) -> None:
        self.send({"message": record.getMessage(), "level": record.levelno})


def relay_to(send) -> None:
    """Routes this process's rayft log to `send` instead of its console."""
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    logger.addHandler(Relay(send))


def verbosity_of(level: int) -> int:
    """The verbosity whose console level is `level` (for handing the driver's choice to the workers)."""
    return next((v for v, lvl in LEVELS.items() if lvl == level), DEFAULT)
