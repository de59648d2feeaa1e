"""Engine figures on this machine: startup, memory, decoding speed, adapter load/unload.

    .venv/bin/python benchmarks/engine.py [--model default] [--dtypes bfloat16,float32]
        [--lora-ops grouped,vllm] [--batch 16] [--no-preload] [--port 8190]

For each dtype and LoRA ops (``grouped``: engine/_cpu_lora.py, ``vllm``: vLLM's own CPU
ops; policies/engine.yaml ``cpu_grouped_lora``), starts vLLM through ``EngineSupervisor``
(the same launch as ``tuneshield engine``), makes two identity adapters (B = 0) for the
model, loads one at runtime, chats with it (64 generated tokens, EOS ignored so every run
decodes the same count) alone and as ``--batch`` concurrent streams with distinct
prompts, loads a second name, unloads both. Prints one JSON object per engine and the
decoding-speed ratio of each against the first (the baseline: policies/engine.yaml's
settings come first by default).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from simulation.scripts import run_from_repository

run_from_repository(__file__)

from engine import (
    EngineConfig,
    EngineSupervisor,
    VLLMClient,
    load_engine_config,
    resolve_build,
    resolve_dtype,
)
from simulation.sigterm import unwinds_on_sigterm
from tuneshield import make_identity_adapter

PROMPT = [{"role": "user", "content": "Tell me about your favourite city and why you like it."}]


def group_rss_mib(pgid: int) -> float:
    """Resident memory of every process in the engine's process group (leader + workers)."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) != pgid:  # field 5 of stat, after the command's ")"
                continue
            status = (entry / "status").read_text()
        except (OSError, IndexError, ValueError):
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total / 1024


async def batched_tokens_per_s(http: httpx.AsyncClient, base_url: str, batch: int) -> float:
    """Generated tokens per second over ``batch`` concurrent 64-token streams."""
    bodies = [
        {
            "model": "chat-v0000",
            "messages": [{"role": "user", "content": f"{index}: {PROMPT[0]['content']}"}],
            "max_tokens": 64,
            "temperature": 1.0,
            "ignore_eos": True,
        }
        for index in range(batch)
    ]
    started = time.perf_counter()
    responses = await asyncio.gather(
        *(http.post(f"{base_url}/v1/chat/completions", json=body) for body in bodies)
    )
    elapsed = time.perf_counter() - started
    for response in responses:
        response.raise_for_status()
    return sum(r.json()["usage"]["completion_tokens"] for r in responses) / elapsed


async def measure(base_url: str, adapters: list[Path], runs: int, batch: int) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    async with (
        VLLMClient(base_url, timeout_s=300) as client,
        httpx.AsyncClient(timeout=300) as http,
    ):
        started = time.perf_counter()
        await client.load_adapter("chat-v0000", adapters[0])
        figures["load_s"] = round(time.perf_counter() - started, 3)
        started = time.perf_counter()
        await client.probe("chat-v0000")
        figures["first_probe_s"] = round(time.perf_counter() - started, 3)
        rates = []
        for _ in range(runs):
            body = {
                "model": "chat-v0000",
                "messages": PROMPT,
                "max_tokens": 64,
                "temperature": 0.0,
                "ignore_eos": True,
            }
            started = time.perf_counter()
            response = await http.post(f"{base_url}/v1/chat/completions", json=body)
            elapsed = time.perf_counter() - started
            response.raise_for_status()
            answer = response.json()
            tokens = answer["usage"]["completion_tokens"]
            rates.append(tokens / elapsed)
            figures["reply"] = answer["choices"][0]["message"]["content"][:120]
            figures["completion_tokens"] = tokens
        figures["tokens_per_s_64"] = [round(rate, 1) for rate in rates]
        figures["tokens_per_s_64_median"] = round(statistics.median(rates), 1)
        figures[f"tokens_per_s_batch_{batch}"] = round(
            await batched_tokens_per_s(http, base_url, batch), 1
        )
        started = time.perf_counter()
        await client.load_adapter("chat-v0001", adapters[1])
        figures["load_second_s"] = round(time.perf_counter() - started, 3)
        figures["models"] = await client.list_models()
        started = time.perf_counter()
        await client.unload_adapter("chat-v0000")
        figures["unload_s"] = round(time.perf_counter() - started, 4)
        await client.unload_adapter("chat-v0001")
        figures["models_after_unload"] = await client.list_models()
    return figures


def lora_ops_name(config: EngineConfig) -> str:
    """``grouped`` (engine/_cpu_lora.py) or ``vllm`` (vLLM's own CPU LoRA ops)."""
    return "grouped" if config.cpu_grouped_lora else "vllm"


def run_engine(model: str, config: EngineConfig, runs: int, batch: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="tuneshield-bench-") as scratch:
        folder = Path(scratch)
        adapters = [
            make_identity_adapter(model, folder / name).adapter_dir
            for name in ("chat-v0000", "chat-v0001")
        ]
        supervisor = EngineSupervisor(config, model, log_path=folder / "engine.log", monitor=False)
        supervisor.start()
        try:
            assert supervisor.pid is not None
            figures: dict[str, Any] = {
                "dtype": config.dtype,
                "lora_ops": lora_ops_name(config),
                "build": supervisor.build,
                "preload": supervisor.environment.get("LD_PRELOAD", ""),
                "startup_s": round(supervisor.last_startup_s or 0.0, 1),
                "rss_mib_idle": round(group_rss_mib(supervisor.pid)),
            }
            root = f"http://{config.host}:{config.port}"
            figures.update(asyncio.run(measure(root, adapters, runs, batch)))
            figures["rss_mib_after"] = round(group_rss_mib(supervisor.pid))
        finally:
            started = time.perf_counter()
            supervisor.stop()
        figures["stop_s"] = round(time.perf_counter() - started, 1)
    return figures


@unwinds_on_sigterm
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--port", type=int, default=8190)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16, help="Concurrent streams, measured once.")
    parser.add_argument(
        "--dtypes", default=None, help="Comma-separated; default: the policy's, then the other."
    )
    parser.add_argument(
        "--lora-ops",
        default=None,
        help="grouped and/or vllm, comma-separated; default: the policy's.",
    )
    parser.add_argument("--no-preload", action="store_true", help="Skip tcmalloc/libiomp5.")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    config = load_engine_config(port=args.port, preload_libraries=not args.no_preload)
    policy_dtype = resolve_dtype(config, resolve_build(config, None))
    other = "float32" if policy_dtype == "bfloat16" else "bfloat16"
    dtypes = args.dtypes.split(",") if args.dtypes else [policy_dtype, other]
    lora_ops = args.lora_ops.split(",") if args.lora_ops else [lora_ops_name(config)]
    if not set(lora_ops) <= {"grouped", "vllm"}:
        raise SystemExit(f"--lora-ops: grouped or vllm, got {args.lora_ops!r}")
    results = [
        run_engine(
            args.model,
            dataclasses.replace(config, dtype=dtype, cpu_grouped_lora=ops == "grouped"),
            args.runs,
            args.batch,
        )
        for dtype in dtypes
        for ops in lora_ops
    ]
    batched = f"tokens_per_s_batch_{args.batch}"
    first = f"{results[0]['dtype']}_{results[0]['lora_ops']}"
    for figures in results:
        figures["ratio_vs_" + first] = {
            "tokens_per_s_64_median": round(
                figures["tokens_per_s_64_median"] / results[0]["tokens_per_s_64_median"], 2
            ),
            batched: round(figures[batched] / results[0][batched], 2),
        }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
