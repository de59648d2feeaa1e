"""Engine figures on this machine: startup, memory, decoding speed, adapter load/unload.

    .venv/bin/python benchmarks/engine.py [--model default] [--no-preload] [--port 8190]

Starts vLLM through ``EngineSupervisor`` (the same launch as ``tuneshield engine``),
makes two identity adapters (B = 0) for the model, loads one at runtime, chats with it
(64 generated tokens, EOS ignored so every run decodes the same count), loads a second
name, unloads both, and prints one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from learner.engine import EngineSupervisor, load_engine_config
from learner.vllm_client import VLLMClient
from tuneshield._train import make_identity_adapter

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


async def measure(base_url: str, adapters: list[Path], runs: int) -> dict[str, Any]:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--port", type=int, default=8190)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-preload", action="store_true", help="Skip tcmalloc/libiomp5.")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    config = load_engine_config(port=args.port, preload_libraries=not args.no_preload)
    with tempfile.TemporaryDirectory(prefix="tuneshield-bench-") as scratch:
        folder = Path(scratch)
        adapters = [
            make_identity_adapter(args.model, folder / name).adapter_dir
            for name in ("chat-v0000", "chat-v0001")
        ]
        supervisor = EngineSupervisor(
            config, args.model, log_path=folder / "engine.log", monitor=False
        )
        supervisor.start()
        try:
            assert supervisor.pid is not None
            figures: dict[str, Any] = {
                "build": supervisor.build,
                "preload": supervisor.environment.get("LD_PRELOAD", ""),
                "startup_s": round(supervisor.last_startup_s or 0.0, 1),
                "rss_mib_idle": round(group_rss_mib(supervisor.pid)),
            }
            root = f"http://{config.host}:{config.port}"
            figures.update(asyncio.run(measure(root, adapters, args.runs)))
            figures["rss_mib_after"] = round(group_rss_mib(supervisor.pid))
        finally:
            started = time.perf_counter()
            supervisor.stop()
        figures["stop_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
