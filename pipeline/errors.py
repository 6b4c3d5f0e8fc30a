"""Errors a user sees. Configuration errors are raised before any work starts."""

import signal
import threading
from typing import Any


class ConfigError(ValueError):
    """A bad option or input specification; the message names the field."""


# Config fields whose flag is not the field's name with dashes.
FIELD_FLAGS = {
    "keeps": "--keep",
    "fusions": "--fuse",
    "fusion": "--fuse",
    "full": "--no-full",
    "first_order": "--no-first-order",
    "image_keys": "--image-key",
    "text_keys": "--text-key",
}


def field_flag(name: str) -> str:
    """The command-line flag of config field ``name`` (messages name fields; a user typed
    flags)."""
    return FIELD_FLAGS.get(name, "--" + name.replace("_", "-"))


class StageFailed(RuntimeError):
    """A stage cannot go on, and its message says why and what to do: the command prints
    it alone (a traceback would bury it under Ray's own)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, `timeout`, Kubernetes, Slurm, `ray job stop`): stop as an
    interrupt does, since every stage writes atomically and resumes."""


# Set by the handler: Ray turns an exception raised while its call waits (ray.get,
# ray.wait, Ray Train's fit) into a plain KeyboardInterrupt, so the type is lost (review).
TERMINATED = threading.Event()


def raise_terminated(signum: int, frame: object) -> None:
    """The SIGTERM handler of the `diffin` command (see :class:`Terminated`)."""
    TERMINATED.set()
    raise Terminated()


def handle_sigterm() -> Any:
    """Install :func:`raise_terminated` (main thread only); returns the handler it replaced."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, raise_terminated)


# What the config checks accept as a count and as a number: JSON and argparse give bools
# where a flag was meant, and bool is an int subclass, so they are refused explicitly.
def is_int(value: object) -> bool:
    """An integer, not a bool (nor a float with an integer value)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """An int or a float, not a bool (finite or not: check that separately)."""
    return isinstance(value, int | float) and not isinstance(value, bool)
