"""How fast healing replies decode on the engine, by how they are sent.

    .venv/bin/python benchmarks/healing_throughput.py [--samples 32] [--candidates 4]
        [--arms waves32,all128,n4] [--engines policy,KEY=VALUE[+KEY=VALUE]] [--model default]

The replies a round's healing asks for: ``--samples`` flagged samples of an injection
attack (hostile contexts, ``benchmarks/healing.py``'s) and their answers (policies/
healing.yaml ``answer_hostile_turns``), ``--candidates`` each, the healer's prompt and
the round's reply cap, on one vLLM started here with the identity adapter loaded, as a
round's worker heals. Each arm sends the same replies:

- ``wavesN``: N requests at a time, each wave waiting for its slowest reply (a call per
  draw and per batch, as healing did before every reply was sent at once);
- ``allN``: every reply in one call, N in flight (policies/learner.yaml
  ``inference.concurrency``);
- ``nK``: one request per sample asking for K choices (vLLM's ``n``), 128 in flight;
- ``baseN``: as ``allN``, to the engine's base model without an adapter (what LoRA costs).

``--engines``: the arms run again on each engine, one after the other, each started with
policies/engine.yaml's settings (``policy``) or some of them changed (``KEY=VALUE``,
joined by ``+``; e.g. ``cpu_nucleus_sampling=false`` for vLLM's own top-p).

Prints per engine and arm the seconds, replies, completion tokens, tokens per second and
their ratio to the first engine's first arm (measured in the same run).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from simulation.scripts import load_script, run_from_repository

run_from_repository(__file__)

import httpx
import yaml

from engine import load_engine_config
from simulation.sigterm import unwinds_on_sigterm
from tuneshield import HealConfig, PolicyError, read_policy, resolve_model
from tuneshield._heal import answer_sample, healer_prompt

healing = load_script("healing")

# Requests in flight for the arm that asks for K choices per request.
CHOICES_IN_FLIGHT = 128


def send(
    url: str, bodies: list[dict[str, Any]], in_flight: int, model: str = healing.IDENTITY
) -> tuple[int, int]:
    """Completion tokens and replies of ``bodies`` from ``model``, ``in_flight`` at a time."""
    with httpx.Client(base_url=url, timeout=600) as client:

        def one(body: dict[str, Any]) -> tuple[int, int]:
            answer = client.post("/v1/chat/completions", json={"model": model, **body})
            answer.raise_for_status()
            result = answer.json()
            return result["usage"]["completion_tokens"], len(result["choices"])

        with ThreadPoolExecutor(in_flight) as pool:
            counts = list(pool.map(one, bodies))
    return sum(t for t, _ in counts), sum(c for _, c in counts)


def engine_settings(engine: str) -> dict[str, Any]:
    """An ``--engines`` entry's changed settings (``policy``: none), values read as YAML and
    checked as policies/engine.yaml's are; a bad one exits naming it, before an engine
    starts."""
    settings: dict[str, Any] = {}
    if engine == "policy":
        return settings
    for setting in engine.split("+"):
        key, separator, value = setting.partition("=")
        if not separator or not key:
            raise SystemExit(f"--engines: {setting!r} is not KEY=VALUE")
        settings[key] = yaml.safe_load(value)
    try:
        load_engine_config(**settings)
    except PolicyError as error:
        raise SystemExit(f"--engines: {error}") from None
    return settings


def run_arm(
    arm: str, url: str, every: list[dict[str, Any]], prompts: list[Any],
    body: Callable[..., dict[str, Any]], served: str,
) -> tuple[int, int]:  # fmt: skip
    """Completion tokens and replies of one arm (the module's docstring)."""
    if arm.startswith("waves"):
        size, tokens, replies = int(arm.removeprefix("waves")), 0, 0
        for start in range(0, len(every), size):
            wave = send(url, every[start : start + size], size)
            tokens, replies = tokens + wave[0], replies + wave[1]
        return tokens, replies
    if arm.startswith("all"):
        return send(url, every, int(arm.removeprefix("all")))
    if arm.startswith("base"):
        return send(url, every, int(arm.removeprefix("base")), served)
    if arm.startswith("n"):
        choices = int(arm.removeprefix("n"))
        bodies = [body(p, i, choices) for i, p in enumerate(prompts)]
        return send(url, bodies, CHOICES_IN_FLIGHT)
    raise SystemExit(f"--arms: unknown arm {arm!r}")


@unwinds_on_sigterm
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--arms", default="waves32,all128,n4")
    parser.add_argument("--engines", default="policy")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    config = HealConfig.from_policy()
    cap = read_policy("learner")["round"]["heal_max_new_tokens"]
    flagged = healing.flagged_samples(args.samples, "injection", 0.4, 0)
    targets = [*flagged, *(answer_sample(row) for row in flagged)]
    prompts = [healer_prompt(row["context"], config) for row in targets]

    def body(prompt: Any, seed: int, choices: int = 1) -> dict[str, Any]:
        return {"messages": prompt, "max_tokens": cap, "temperature": config.temperature,
                "top_p": config.top_p, "seed": seed, "n": choices}  # fmt: skip

    every = [body(p, draw * len(prompts) + i)
             for draw in range(args.candidates) for i, p in enumerate(prompts)]  # fmt: skip
    model = resolve_model(args.model)
    served = load_engine_config().served_model_name  # the base model, for the base arms
    engines = [(engine, engine_settings(engine)) for engine in args.engines.split(",")]
    results: dict[str, Any] = {}
    runs: Counter[str] = Counter()  # an engine named twice (alternated) keeps both runs
    for engine, settings in engines:
        with healing.engine_serving_identity(model, healing.IDENTITY, settings) as url:
            send(url, every[:8], 8)  # warm-up: the first requests compile and allocate
            for arm in args.arms.split(","):
                started = time.perf_counter()
                tokens, replies = run_arm(arm, url, every, prompts, body, served)
                seconds = time.perf_counter() - started
                label = arm if engine == "policy" else f"{engine}/{arm}"
                runs[label] += 1
                name = f"{label} ({runs[label]})" if runs[label] > 1 else label
                results[name] = {
                    "seconds": round(seconds, 1),
                    "replies": replies,
                    "tokens": tokens,
                    "tokens_per_s": round(tokens / seconds, 1),
                }
                first = next(iter(results.values()))["tokens_per_s"]
                results[name]["ratio_to_first"] = round(tokens / seconds / first, 2)
                print(name, results[name], flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
