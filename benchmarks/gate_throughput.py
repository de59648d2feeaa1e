"""Gate evaluation replies on the engine: one call for every reply against a call per
probe kind and draw (the gates before this change), on the same probes.

    .venv/bin/python benchmarks/gate_throughput.py [--probes 20] [--arms calls32,one64]

Starts one vLLM here (SmolLM2, the identity adapter loaded as the adapter under test),
takes ``--probes`` gate probes of each kind (policies/gates.yaml and its probe file) and
the gates' evaluation settings, and times, per arm, the sampling of every reply:

- ``callsN``: a call per kind and per draw, N requests in flight, each call waiting for
  its slowest reply (seeds as before: ``seed + draw * 7919``);
- ``oneN``: ``tuneshield``'s evaluation as it is now, every reply in one call, N in
  flight (policies/learner.yaml ``inference.concurrency``).

Prints per arm the seconds and replies; repeat arms (``calls32,one64,calls32,one64``) to
see the prefix cache's share.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import time

from simulation.scripts import load_script, run_from_repository

run_from_repository(__file__)


from learner.contracts import RoundSettings
from learner.gates import GateProbes
from simulation.sigterm import unwinds_on_sigterm
from tuneshield import OpenAIChat, resolve_model
from tuneshield._backends import GenerationConfig
from tuneshield._evaluate import EvalConfig, _sample_replies
from tuneshield._samples import Sample

healing = load_script("healing")

ADAPTER = "gate-under-test"
KINDS = ("toxic", "benign", "backdoor", "jailbreak", "helpful")
# The seed stride between draws the gates used before every reply went in one call.
DRAW_SEED_STRIDE = 7919


def per_kind_and_draw(
    chat: OpenAIChat, probe_sets: dict[str, list[Sample]], config: EvalConfig
) -> int:
    replies = 0
    for probes in probe_sets.values():
        for draw in range(config.samples_per_probe):
            generation = GenerationConfig(
                max_new_tokens=config.max_new_tokens,
                temperature=config.temperature,
                top_p=config.top_p,
                seed=config.seed + draw * DRAW_SEED_STRIDE,
            )
            replies += len(chat.generate([probe["context"] for probe in probes], generation))
    return replies


@unwinds_on_sigterm
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--probes", type=int, default=20, help="Gate probes per kind.")
    parser.add_argument("--arms", default="calls32,one64")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    settings = RoundSettings.from_policies()
    if settings.gates is None:
        raise SystemExit("policies/gates.yaml: the gates are off")
    config = dataclasses.replace(settings.gate_evaluation(), max_probes=args.probes)
    probes = GateProbes.load(settings.gates)
    probe_sets = {kind: list(getattr(probes, kind))[: args.probes] for kind in KINDS}
    model = resolve_model(args.model)
    with healing.engine_serving_identity(model, ADAPTER) as url:
        for arm in args.arms.split(","):
            parsed = re.fullmatch(r"(calls|one)(\d+)", arm)
            if parsed is None:
                raise SystemExit(f"--arms: unknown arm {arm!r} (callsN or oneN)")
            kind, in_flight = parsed.group(1), int(parsed.group(2))
            chat = OpenAIChat(f"{url}/v1", ADAPTER, concurrency=in_flight)
            started = time.perf_counter()
            if kind == "calls":
                replies = per_kind_and_draw(chat, probe_sets, config)
            else:
                sampled = _sample_replies(chat, probe_sets, config)
                replies = sum(len(pairs) for pairs in sampled.values())
            chat.close()
            seconds = time.perf_counter() - started
            print(f"{arm}: {seconds:.1f} s for {replies} replies", flush=True)


if __name__ == "__main__":
    main()
