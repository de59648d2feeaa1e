"""One log format for every role: ``tuneshield serve``, ``gateway``, ``learner``, ``engine``
and the learning round's worker.

Each role calls ``configure_logging(level)`` once, first thing; the roles that run uvicorn
also hand ``log_config(level)`` to uvicorn, which applies it (``dictConfig``) instead of
installing formatters of its own. Every record (uvicorn's, Litestar's, APScheduler's,
httpx's, ours) then reaches one handler on stderr through the root logger, in one format.
The gateway app configures no logging of its own.

Libraries that report routine work at INFO (a line per scheduler tick, per HTTP request)
are held at WARNING here, so that an INFO line means something happened. Progress bars
are for a terminal: where stderr is a file or a pipe (a round's log, a service's journal)
the libraries' bars are switched off.

It imports the standard library only.
"""

from __future__ import annotations

import enum
import logging.config
import os
import sys
from typing import Any

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
# APScheduler logs "Added job", "Running job", "Job executed successfully" on every tick;
# httpx and httpcore a line per request (the learner polls its engines every few seconds).
ROUTINE_LOGGERS = ("apscheduler", "httpx", "httpcore")
# These install handlers of their own when left alone (uvicorn's default configuration,
# Litestar's): here they hand their records to the root handler instead.
SELF_HANDLING_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi", "litestar")
# Read when the libraries are imported: huggingface_hub's and transformers' bars (model
# loading), datasets' map/filter bars (TRL's tokenizing), and any other tqdm bar.
PROGRESS_BAR_SWITCHES = (
    "HF_HUB_DISABLE_PROGRESS_BARS",
    "HF_DATASETS_DISABLE_PROGRESS_BARS",
    "TQDM_DISABLE",
)


class UvicornName(logging.Filter):
    """Shows uvicorn's "uvicorn.error" records, its start and stop among them, as "uvicorn"."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "uvicorn.error":
            record.name = "uvicorn"
        return True


class LogLevel(enum.StrEnum):
    """The levels a role's ``--log-level`` accepts."""

    critical = "critical"
    error = "error"
    warning = "warning"
    info = "info"
    debug = "debug"


def log_config(level: LogLevel | str = LogLevel.info) -> dict[str, Any]:
    """The ``logging.config.dictConfig`` configuration of every role, for ``level``.

    Pass it to uvicorn as ``log_config`` (a fresh dict each call: uvicorn may edit it).
    """
    name = LogLevel(level.lower()).value.upper()
    # Routine loggers stay at WARNING unless the role asks for less (error, critical).
    routine = logging.getLevelName(max(logging.WARNING, logging.getLevelNamesMapping()[name]))
    return {
        "version": 1,
        # Loggers created before this runs (module-level ones) keep working.
        "disable_existing_loggers": False,
        "formatters": {"default": {"format": LOG_FORMAT, "datefmt": DATE_FORMAT}},
        "filters": {"uvicorn_name": {"()": UvicornName}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "default",
                "filters": ["uvicorn_name"],
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"level": name, "handlers": ["stderr"]},
        "loggers": {
            **{
                logger: {"level": name, "handlers": [], "propagate": True}
                for logger in SELF_HANDLING_LOGGERS
            },
            **{
                logger: {"level": routine, "handlers": [], "propagate": True}
                for logger in ROUTINE_LOGGERS
            },
        },
    }


def hide_progress_bars() -> None:
    """Switch the libraries' progress bars off in this process (and those it starts).

    Takes effect for libraries imported afterwards. An operator's own setting of a switch
    (``=0`` to see bars anyway) is kept.
    """
    for switch in PROGRESS_BAR_SWITCHES:
        os.environ.setdefault(switch, "1")


def configure_logging(level: LogLevel | str = LogLevel.info) -> None:
    """Apply ``log_config(level)`` to this process, and ``hide_progress_bars`` unless
    stderr is a terminal. Call it first thing, before torch or transformers are imported."""
    if not sys.stderr.isatty():
        hide_progress_bars()
    logging.config.dictConfig(log_config(level))
