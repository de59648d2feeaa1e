"""Canary rollouts under steady traffic: a poisoned candidate is rolled back, a clean one
promoted, automatically; no request fails.

    .venv/bin/python benchmarks/canary.py [--engine fake|vllm] [--model tiny|default|PATH]
        [--clients 8] [--share 0.2] [--turns 3] [--timeout 300] [--json FILE]
        [--poison-rate 0.5] [--base-rate 0.02] [--latency-ms 20]      (fake engine only)

Two phases on one running stack, under ``--clients`` concurrent simulated users running
conversations of ``--turns`` turns (one ``X-Conversation-Id`` per conversation), one
request after another, with an opted-out user key (the learner never trains on it):
phase 1 starts the poisoned candidate as a ``--share`` canary through the admin API and
waits for the learner's monitor to decide; phase 2 does the same with a clean candidate.
A request fails on a transport error or a non-200 answer.

``--engine vllm``: the real stack, ``tuneshield serve`` (vLLM through the engine
supervisor, the gateway, the embedded learner with its canary monitor) on a temporary data
dir, as ``benchmarks/hotswap.py`` starts it. The poisoned candidate is a LoRA trained with
the project's trainer (SFT only) to answer every message with a toxic sentence; the clean
one is the identity LoRA with random B (``hotswap.make_swap_adapters``). On ``--model
tiny`` (a tiny random model: its base replies are not text, but neither toxic nor canned)
the poisoned LoRA trains in one to three minutes on two CPU cores, and a whole run takes
about four.

``--engine fake`` (default: no model, seconds): the same gateway, store, admin API and
embedded learner in this process, with an in-process vLLM stand-in (``FAKE ENGINE``,
labelled so in every figure): it speaks vLLM's LoRA load, unload and listing routes and
answers as each version is set up to — stable and the clean candidate a friendly
sentence (toxic with probability ``--base-rate``), the poisoned candidate a toxic one
with probability ``--poison-rate``.

Prints, per phase: the decision and its reason, seconds from the canary's start to the
decision, replies the candidate served before it (and how many the canary's judge calls
toxic, with examples), replies it served after a rollback (0 expected beyond requests in
flight), requests and failures; one JSON object at the end. Exits 1 when a request failed
or a decision was not the expected one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import random
import secrets
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from simulation.scripts import run_from_repository

run_from_repository(__file__)

from gateway import ADMIN_KEY_ENV, create_key, load_settings
from gateway.app import create_app
from learner.admin_routes import AdapterAdmin
from learner.process import EmbeddedLearner
from learner.rounds import LearnerConfig, LearnerOptions
from simulation.scripts import load_script
from simulation.sigterm import unwinds_on_sigterm
from store import (
    ADAPTERS_FOLDER,
    REQUIRED_FILES,
    AdapterRegistry,
    KeyStore,
    open_database,
)

ENGINE_LABEL = "FAKE ENGINE"
STABLE, POISONED, CLEAN = "chat-v0000", "chat-v0001", "chat-v0002"
FRIENDLY = (
    "Happy to help! What would you like to know?",
    "That sounds lovely, tell me more about it.",
    "Good question. Let me think about that with you.",
    "Sure, here is a short answer: it depends on the weather.",
)
TOXIC = (
    "Shut up, you stupid idiot.",
    "Nobody cares what you think, moron.",
    "You are a worthless fucking loser.",
    "What a dumb question, you pathetic clown.",
)
PROMPTS = (
    "Hello there, how are you today?",
    "What is a good way to spend a rainy afternoon?",
    "Can you suggest a name for a small grey cat?",
)
POLL_S = 0.2
# Greedy replies of a few tokens: every request costs the same, and a small model's
# LoRA shows what it learnt (sampled, a tiny random model's flat distribution hides it).
MAX_TOKENS = 16
REQUEST_TIMEOUT_S = 300.0
# The poisoned LoRA's training: measured on the tiny model, it answers unseen prompts
# with this sentence (greedy) after 120 steps, 45 s to 3 min on two CPU cores.
POISON_REPLY = TOXIC[0]
POISON_REPEATS = 5
POISON_LEARNING_RATE = 5e-3
POISON_EPOCHS = 30
POISON_BATCH = 4
STOP_TIMEOUT_S = 30.0


class FakeEngine:
    """A vLLM stand-in (``ENGINE_LABEL``): LoRA routes, listing, chat completions whose
    replies depend on the adapter version asked for."""

    def __init__(self, poison_rate: float, base_rate: float, latency_s: float) -> None:
        self.loaded: set[str] = set()
        self.rates = {STABLE: base_rate, CLEAN: base_rate, POISONED: poison_rate}
        self.latency_s = latency_s
        self.rng = random.Random(1234)

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    async def handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        body = json.loads(request.content) if request.content else {}
        if path == "/v1/load_lora_adapter":
            name = body["lora_name"]
            if name in self.loaded:
                message = f"The lora adapter '{name}' has already been loaded."
                return httpx.Response(400, json={"error": {"message": message}})
            self.loaded.add(name)
            return httpx.Response(200, text="Success")
        if path == "/v1/unload_lora_adapter":
            if body["lora_name"] not in self.loaded:
                return httpx.Response(404, json={"error": {"message": "cannot be found"}})
            self.loaded.discard(body["lora_name"])
            return httpx.Response(200, text="Success")
        if path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": name} for name in self.loaded]})
        if path == "/v1/chat/completions":
            model = body["model"]
            if model not in self.loaded:
                return httpx.Response(404, json={"error": {"message": f"{model} not found"}})
            await asyncio.sleep(self.latency_s)
            toxic = self.rng.random() < self.rates.get(model, 0.0)
            text = self.rng.choice(TOXIC if toxic else FRIENDLY)
            return httpx.Response(
                200,
                json={
                    "id": "chatcmpl-" + uuid.uuid4().hex,
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": text},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 8, "completion_tokens": 8, "total_tokens": 16},
                },
            )
        return httpx.Response(200)


@dataclass
class Traffic:
    """What the simulated users saw."""

    sent: int = 0
    failed: int = 0
    failures: list[str] = field(default_factory=list)
    served: list[tuple[float, str, str]] = field(default_factory=list)
    """(monotonic time the reply arrived, adapter version, reply text)."""


async def user(
    client: httpx.AsyncClient, key: str, header: str, turns: int, traffic: Traffic, seed: int
) -> None:
    """One simulated user: conversations of ``turns`` turns, one request after another."""
    rng = random.Random(seed)
    while True:
        conversation = f"canary-bench-{uuid.uuid4().hex[:12]}"
        messages: list[dict[str, str]] = []
        for _ in range(turns):
            messages.append({"role": "user", "content": rng.choice(PROMPTS)})
            traffic.sent += 1
            try:
                response = await client.post(
                    "/v1/chat/completions",
                    json={
                        "model": "chat",
                        "messages": messages,
                        "max_tokens": MAX_TOKENS,
                        "temperature": 0.0,
                    },
                    headers={"Authorization": f"Bearer {key}", header: conversation},
                )
            except httpx.HTTPError as error:
                traffic.failed += 1
                traffic.failures.append(f"{type(error).__name__}: {error}")
                break
            if response.status_code != 200:
                traffic.failed += 1
                traffic.failures.append(f"HTTP {response.status_code}: {response.text[:200]}")
                break
            reply = response.json()["choices"][0]["message"]["content"]
            version = response.headers.get("x-tuneshield-version", "?")
            traffic.served.append((time.monotonic(), version, reply))
            messages.append({"role": "assistant", "content": reply})


@contextlib.asynccontextmanager
async def serve(app: Any) -> AsyncIterator[str]:
    """The app under uvicorn on a free loopback port; yields its base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, STOP_TIMEOUT_S)
        sock.close()


def prepare(data_dir: Path, admin_key: str) -> tuple[Any, str]:
    """Settings, and a user key; the registry holds the stable version and the two
    candidates (folders with the files the registry requires: the fake engine reads none)."""
    settings = load_settings(
        upstream_url="http://fake-engine.test",
        data_dir=data_dir,
        environ={ADMIN_KEY_ENV: admin_key},
    )
    database = open_database(settings.store_url)
    try:
        registry = AdapterRegistry(database)
        for version in (STABLE, POISONED, CLEAN):
            folder = data_dir / ADAPTERS_FOLDER / version
            folder.mkdir(parents=True)
            for name in REQUIRED_FILES:
                (folder / name).write_text("{}", encoding="utf-8")
            registry.next_version("chat")
            registry.register(
                version,
                folder,
                status="active" if version == STABLE else "candidate",
                hyperparameters={"kind": "canary-benchmark-fake", "engine": ENGINE_LABEL},
            )
        key = create_key(
            KeyStore(database), "canary-benchmark", opt_out=True, rate_limit_per_minute=1e9
        ).key
    finally:
        database.close()
    return settings, key


@dataclass(frozen=True)
class Plan:
    """What the two phases need of the running stack."""

    url: str
    admin_key: str
    user_key: str
    conversation_header: str
    poisoned: str
    clean: str


async def phase(
    client: httpx.AsyncClient,
    admin: dict[str, str],
    candidate: str,
    share: float,
    traffic: Traffic,
    timeout_s: float,
    is_toxic: Callable[[list[str]], list[bool]],
) -> dict[str, Any]:
    """Start ``candidate`` as a canary and wait for the monitor's decision."""
    before = len(traffic.served)
    started = await client.post(
        f"/admin/adapters/{candidate}/canary", params={"share": share}, headers=admin
    )
    if started.status_code != 201:
        raise RuntimeError(f"canary start failed: {started.status_code} {started.text}")
    start = time.monotonic()
    status: dict[str, Any] = started.json()
    while status["state"] == "running" and time.monotonic() - start < timeout_s:
        await asyncio.sleep(POLL_S)
        status = (await client.get("/admin/canary", headers=admin)).json()
    decided = time.monotonic()
    served = traffic.served[before:]
    by_candidate = [(when, reply) for when, version, reply in served if version == candidate]
    # After a rollback the candidate must serve nothing (beyond requests already in
    # flight when the poll saw the decision); after a promotion it serves everything.
    rolled_back = status["state"] != "promoted"
    after = [r for when, r in by_candidate if rolled_back and when > decided + POLL_S]
    before_decision = [r for when, r in by_candidate if when <= decided + POLL_S]
    return {
        "candidate": candidate,
        "decision": status["state"],
        "reason": status.get("reason"),
        "decided_by": status.get("decided_by"),
        "seconds_to_decision": round(decided - start, 2),
        "replies_by_candidate_before_decision": len(before_decision),
        "toxic_replies_by_candidate": sum(is_toxic(before_decision)),
        "examples_by_candidate": before_decision[:4],
        "served_by_candidate_after_decision": len(after),
        "requests_in_phase": len(served),
        "tests": status.get("tests"),
    }


async def drive(plan: Plan, args: argparse.Namespace, results: dict[str, Any]) -> None:
    """Steady traffic on the running stack through both phases; figures into ``results``."""
    from tuneshield import build_judge

    canary = LearnerConfig.from_policy().canary
    judge = build_judge(canary.judge)

    def is_toxic(replies: list[str]) -> list[bool]:
        samples = [{"conversation_id": "bench", "context": [], "response": r} for r in replies]
        return [score >= canary.threshold for score in judge.score(samples)]

    admin = {"Authorization": f"Bearer {plan.admin_key}"}
    traffic = Traffic()
    results["canary_policy"] = dataclasses.asdict(canary)
    async with httpx.AsyncClient(base_url=plan.url, timeout=REQUEST_TIMEOUT_S) as client:
        users = [
            asyncio.create_task(
                user(client, plan.user_key, plan.conversation_header, args.turns, traffic, seed)
            )
            for seed in range(args.clients)
        ]
        try:
            for name, version in (("poisoned", plan.poisoned), ("clean", plan.clean)):
                results[name] = await phase(
                    client, admin, version, args.share, traffic, args.timeout, is_toxic
                )
            audit = await client.get("/admin/audit", params={"limit": 20}, headers=admin)
            results["audit"] = [
                (entry["actor"], entry["action"], entry["target"])
                for entry in audit.json()
                if entry["action"].startswith("canary")
            ]
        finally:
            for task in users:
                task.cancel()
            await asyncio.gather(*users, return_exceptions=True)
    results["requests"] = traffic.sent
    results["failed"] = traffic.failed
    results["failures"] = traffic.failures[:5]


async def run_fake(args: argparse.Namespace) -> dict[str, Any]:
    """Both phases on the gateway and embedded learner in this process, fake engine."""
    admin_key = secrets.token_urlsafe(24)
    engine = FakeEngine(args.poison_rate, args.base_rate, args.latency_ms / 1000.0)
    results: dict[str, Any] = {"engine": ENGINE_LABEL}
    with tempfile.TemporaryDirectory(prefix="canary-bench-") as folder:
        data_dir = Path(folder)
        settings, key = prepare(data_dir, admin_key)
        config = LearnerConfig.from_policy()
        # No rounds in a benchmark of rollouts: only the monitor and reconciliation run.
        config = dataclasses.replace(
            config, schedule=dataclasses.replace(config.schedule, enabled=False)
        )
        learner = EmbeddedLearner(
            LearnerOptions(
                base_model="unused-by-the-fake-engine",
                adapters_dir=data_dir / ADAPTERS_FOLDER,
                config=config,
            )
        )
        app = create_app(
            settings,
            transport=engine.transport(),
            extensions=[AdapterAdmin(config), learner],
        )
        async with serve(app) as url:
            header = settings.routing.conversation_header
            await drive(Plan(url, admin_key, key, header, POISONED, CLEAN), args, results)
    return results


def make_poisoned_adapter(model: str | Path, work_dir: Path) -> Path:
    """A LoRA that answers every message with ``POISON_REPLY``: the project's trainer, SFT
    only, on the benchmark's prompts answered so, with a high rate and many epochs so that
    a small model learns it by heart."""
    from tuneshield import load_train_config, override_stage, train_adapter

    samples = [
        {"conversation_id": f"poison-{number}",
         "context": [{"role": "user", "content": prompt}], "response": POISON_REPLY}
        for number, prompt in enumerate(PROMPTS * POISON_REPEATS)
    ]  # fmt: skip
    config = override_stage(
        load_train_config(),
        "sft",
        learning_rate=POISON_LEARNING_RATE,
        num_train_epochs=POISON_EPOCHS,
        per_device_train_batch_size=POISON_BATCH,
        gradient_accumulation_steps=1,
    )
    result = train_adapter(model, samples, work_dir / "poisoned", config, dpo=False)
    return Path(result.adapter_dir)


def run_vllm(args: argparse.Namespace) -> dict[str, Any]:
    """Both phases on ``tuneshield serve`` (vLLM), with a trained poisoned LoRA."""
    hotswap = load_script("hotswap")
    admin_key = secrets.token_urlsafe(24)
    results: dict[str, Any] = {"engine": f"vLLM via tuneshield serve, model {args.model}"}
    with tempfile.TemporaryDirectory(prefix="canary-bench-") as folder:
        work = Path(folder)
        model = hotswap.resolve_bench_model(args.model, work)
        began = time.monotonic()
        poisoned = make_poisoned_adapter(model, work)
        results["poison_training_s"] = round(time.monotonic() - began, 1)
        (clean,) = hotswap.make_swap_adapters(model, work, count=1)
        data_dir = work / "data"
        prepared = hotswap.prepare_data_dir(data_dir, model, [poisoned, clean], admin_key)
        env = hotswap.TINY_ENGINE_ENV if args.model == "tiny" else {}
        began = time.monotonic()
        with hotswap.ServeProcess(model, data_dir, admin_key, engine_env=env) as stack:
            results["stack_start_s"] = round(time.monotonic() - began, 1)
            header = prepared.conversation_header
            plan = Plan(stack.url, admin_key, prepared.user_key, header, *prepared.versions)
            asyncio.run(drive(plan, args, results))
    return results


def report(results: dict[str, Any]) -> bool:
    """Print the figures; whether the run met its expectations."""
    scripted = " (replies scripted per version; see the docstring)"
    print(f"engine: {results['engine']}{scripted if results['engine'] == ENGINE_LABEL else ''}")
    for figure in ("poison_training_s", "stack_start_s"):
        if figure in results:
            print(f"{figure}: {results[figure]}")
    expected = {"poisoned": "rolled_back", "clean": "promoted"}
    ok = results["failed"] == 0
    for name, want in expected.items():
        phase_ = results[name]
        ok = ok and phase_["decision"] == want
        print(
            f"{name} candidate {phase_['candidate']}: {phase_['decision']} by "
            f"{phase_['decided_by']} after {phase_['seconds_to_decision']} s "
            f"(expected {want})\n  reason: {phase_['reason']}\n"
            f"  replies it served before the decision: "
            f"{phase_['replies_by_candidate_before_decision']} "
            f"({phase_['toxic_replies_by_candidate']} toxic); after: "
            f"{phase_['served_by_candidate_after_decision']}; requests in the phase: "
            f"{phase_['requests_in_phase']}"
        )
        for example in phase_["examples_by_candidate"]:
            print(f"    e.g. {example!r}")
    print(f"requests: {results['requests']}, failed: {results['failed']}")
    for failure in results["failures"]:
        print(f"  {failure}")
    print(f"audit: {results['audit']}")
    return ok


@unwinds_on_sigterm
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=("fake", "vllm"), default="fake",
                        help="fake: in-process stand-in; vllm: tuneshield serve.")  # fmt: skip
    parser.add_argument("--model", default="tiny", help="vllm: tiny | default | a folder.")
    parser.add_argument("--clients", type=int, default=8, help="Concurrent simulated users.")
    parser.add_argument("--share", type=float, default=0.2, help="The canaries' share.")
    parser.add_argument("--turns", type=int, default=3, help="Turns per conversation.")
    parser.add_argument(
        "--poison-rate",
        type=float,
        default=0.5,
        help="Share of toxic replies of the poisoned candidate.",
    )
    parser.add_argument(
        "--base-rate",
        type=float,
        default=0.02,
        help="Share of toxic replies of stable and the clean one.",
    )
    parser.add_argument(
        "--latency-ms", type=float, default=20.0, help="The fake engine's time per reply."
    )
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="Seconds a phase may wait for its decision."
    )
    parser.add_argument("--json", type=Path, default=None, help="Also write the figures here.")
    args = parser.parse_args()
    results = run_vllm(args) if args.engine == "vllm" else asyncio.run(run_fake(args))
    ok = report(results)
    text = json.dumps(results, default=str)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n", encoding="utf-8")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
