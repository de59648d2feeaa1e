"""Which engine a round samples on (policies/learner.yaml ``inference``), and what a
killed worker leaves loaded there. The worker's side runs on vLLM in
tests/e2e/test_learning_round_e2e.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from learner_fakes import FakeVLLM

from engine import VLLMClient, VLLMError
from learner.engine_inference import (
    InferenceConfig,
    choose_engine,
    release_round_adapters,
    round_prefix,
)
from tuneshield import PolicyError, build_config

IDENTITY = Path("/adapters/chat-v0000")


def engines(*fakes: FakeVLLM) -> list[VLLMClient]:
    return [
        VLLMClient(f"http://engine{index}:8000", client=fake.client())
        for index, fake in enumerate(fakes, start=1)
    ]


async def test_the_first_engine_that_answers_is_chosen() -> None:
    down, up = FakeVLLM(), FakeVLLM()
    down.down = True
    chosen = await choose_engine(
        engines(down, up), InferenceConfig(), run_id="run_1", base_adapter=IDENTITY
    )
    assert chosen is not None
    assert chosen.url == "http://engine2:8000" and chosen.base_adapter == str(IDENTITY)
    assert chosen.prefix == "round-run_1-" and chosen.concurrency == 64


async def test_auto_falls_back_to_the_worker_and_engine_mode_fails() -> None:
    down = FakeVLLM()
    down.down = True
    clients = engines(down)
    auto = await choose_engine(clients, InferenceConfig(), run_id="r", base_adapter=IDENTITY)
    assert auto is None
    with pytest.raises(VLLMError, match="does not answer"):
        await choose_engine(
            clients, InferenceConfig(mode="engine"), run_id="r", base_adapter=IDENTITY
        )
    # Without the identity adapter there is nothing to heal with on an engine.
    with pytest.raises(VLLMError, match="no identity adapter"):
        await choose_engine(
            engines(FakeVLLM()), InferenceConfig(mode="engine"), run_id="r", base_adapter=None
        )


async def test_in_process_never_asks_an_engine() -> None:
    fake = FakeVLLM()
    config = InferenceConfig(mode="in_process")
    assert await choose_engine(engines(fake), config, run_id="r", base_adapter=IDENTITY) is None
    assert fake.calls == []


async def test_release_unloads_only_the_rounds_names_on_every_engine() -> None:
    first, second = FakeVLLM(), FakeVLLM()
    prefix = round_prefix("run_7")
    first.loaded = {"chat-v0003": "/a", f"{prefix}candidate": "/r", "round-run_8-base": "/b"}
    second.loaded = {f"{prefix}base": "/i", "chat-v0003": "/a"}
    unloaded = await release_round_adapters(engines(first, second), prefix)
    assert sorted(unloaded) == [f"{prefix}base", f"{prefix}candidate"]
    assert set(first.loaded) == {"chat-v0003", "round-run_8-base"}
    assert set(second.loaded) == {"chat-v0003"}


def test_policy_values_are_checked() -> None:
    with pytest.raises(PolicyError, match="mode"):
        build_config(InferenceConfig, {"mode": "gpu"}, "policies/learner.yaml [inference]")
    with pytest.raises(PolicyError, match="concurrency"):
        build_config(InferenceConfig, {"concurrency": 0}, "policies/learner.yaml [inference]")
