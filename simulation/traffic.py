"""Drive simulated users through the gateway with the unchanged ``openai`` client.

Conversations run concurrently, at most ``concurrency`` at a time (vLLM batches them);
inside one conversation each message waits for the reply to the previous one, and the
whole history goes with every request, as a chat client does. The conversation id
travels in the gateway's conversation header, so the dialog log groups the turns and
the simulator's ground truth can be matched to them later.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from simulation.users import SimUser

ProgressFn = Callable[[str, int, int], None]
CONVERSATION_HEADER = "X-Conversation-Id"


@dataclass(frozen=True)
class ChatSettings:
    """How simulated users call the gateway."""

    base_url: str
    """The gateway's OpenAI base URL (``http://host:port/v1``)."""
    api_key: str
    model: str
    """The public alias the users talk to."""
    max_tokens: int
    temperature: float
    concurrency: int
    timeout_s: float = 300.0
    conversation_header: str = CONVERSATION_HEADER
    extra_headers: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")


@dataclass
class TrafficResult:
    """What one traffic session did."""

    alias: str
    conversations: int = 0
    requests: int = 0
    failed: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)
    transcripts: dict[str, list[dict[str, str]]] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "alias": self.alias,
            "conversations": self.conversations,
            "requests": self.requests,
            "failed": self.failed,
            "seconds": round(self.seconds, 1),
            "errors": self.errors[:5],
        }


async def _converse(client: Any, user: SimUser, settings: ChatSettings) -> list[dict[str, str]]:
    messages: list[dict[str, str]] = []
    headers = {**settings.extra_headers, settings.conversation_header: user.conversation_id}
    # OpenAI's end-user id: the gateway logs it, the learner attributes flagged turns to it.
    who = {"user": user.end_user} if user.end_user is not None else {}
    for text in user.messages:
        messages.append({"role": "user", "content": text})
        completion = await client.chat.completions.create(
            model=settings.model,
            messages=messages,
            max_tokens=settings.max_tokens,
            temperature=settings.temperature,
            extra_headers=headers,
            **who,
        )
        messages.append(
            {"role": "assistant", "content": completion.choices[0].message.content or ""}
        )
    return messages


async def run_traffic(
    users: Sequence[SimUser],
    settings: ChatSettings,
    progress: ProgressFn | None = None,
    *,
    http_client: Any = None,
) -> TrafficResult:
    """Every user's conversation through the gateway; failures are counted, not raised.

    ``http_client`` replaces the openai client's own (an ``httpx2.AsyncClient``, which
    the openai package uses; tests pass one with a mock transport).
    """
    from openai import AsyncOpenAI, OpenAIError

    result = TrafficResult(alias=settings.model)
    gate = asyncio.Semaphore(settings.concurrency)
    stage = f"chat {settings.model}"
    started = time.perf_counter()
    done = 0
    if progress:
        progress(stage, 0, len(users))
    async with AsyncOpenAI(
        base_url=settings.base_url,
        api_key=settings.api_key,
        timeout=settings.timeout_s,
        max_retries=2,
        http_client=http_client,
    ) as client:

        async def one(user: SimUser) -> None:
            nonlocal done
            async with gate:
                try:
                    transcript = await _converse(client, user, settings)
                except OpenAIError as error:
                    result.failed += 1
                    result.errors.append(f"{user.conversation_id}: {error}")
                    transcript = []
            result.transcripts[user.conversation_id] = transcript
            result.requests += sum(m["role"] == "assistant" for m in transcript)
            result.conversations += bool(transcript)
            done += 1
            if progress:
                progress(stage, done, len(users))

        await asyncio.gather(*(one(user) for user in users))
    result.seconds = time.perf_counter() - started
    return result


def drive(
    users: Sequence[SimUser], settings: ChatSettings, progress: ProgressFn | None = None
) -> TrafficResult:
    """``run_traffic`` from synchronous code (its own event loop)."""
    return asyncio.run(run_traffic(users, settings, progress))
