"""Screenshots of the operator console: every page at 1280 and 390 px, into docs/console/.

    .venv/bin/python docs/console-screenshots.py

Runs the gateway with the console on a fake engine and the seeded store of the console
tests (tests/console/console_stack.py), sends it some chat traffic (a slow moment, a few
engine failures, a guard that scores replies) so the charts have something to show,
signs in with Playwright driving Debian's Chromium (``deploy/install.sh --dev``), and
photographs each page. Nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import math
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests" / "console"), str(ROOT / "tests" / "learner")]

from console_stack import (  # noqa: E402
    ADMIN_KEY,
    console_app,
    console_settings,
    fake_engine,
    seed_store,
    serving_in_thread,
)
from playwright.sync_api import Page, sync_playwright  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
WIDTHS = (1280, 390)
HEIGHT = 900
TRAFFIC_S = 40.0
# Requests per second of the made-up traffic: a wave between these two.
LOW_RPS, HIGH_RPS = 4.0, 14.0
WAVE_S = 20.0
# Engine latency of the fake: a base and a slow tail every SLOW_EVERY-th request.
BASE_DELAY_S, SLOW_DELAY_S, SLOW_EVERY = 0.02, 0.25, 9
FAILING_FROM_S, FAILING_TO_S = 24.0, 27.0
# Chart readings this often (the policy's 5 s would need minutes of traffic to fill).
SAMPLE_PERIOD_S = 1.0
# Every SPIKE_EVERY-th scored text looks toxic to the guard.
SPIKE_EVERY = 23


class WavyJudge:
    """A guard judge whose scores drift (the screenshot needs a moving line)."""

    name = "screenshot"
    threshold = 0.8

    def __init__(self) -> None:
        self._count = itertools.count()

    def score(self, samples: Sequence[object]) -> list[float]:
        tick = next(self._count)
        spike = tick % SPIKE_EVERY == 0
        return [min(1.0, 0.12 + 0.1 * math.sin(tick / 7.0) + (0.8 if spike else 0.0))] * len(
            samples
        )


class SlowEngine(httpx.AsyncBaseTransport):
    """The fake engine behind a delay, and failing for a moment of the traffic."""

    def __init__(self, inner: httpx.AsyncBaseTransport, started: float) -> None:
        self._inner = inner
        self._started = started
        self._count = itertools.count()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/chat/completions"):
            number = next(self._count)
            await asyncio.sleep(SLOW_DELAY_S if number % SLOW_EVERY == 0 else BASE_DELAY_S)
            elapsed = time.monotonic() - self._started
            if FAILING_FROM_S <= elapsed <= FAILING_TO_S:
                return httpx.Response(500, json={"error": {"message": "engine failed"}})
        return await self._inner.handle_async_request(request)


def send_traffic(url: str, key: str, seconds: float) -> None:
    """Chat requests at a rate that rises and falls (errors included), for ``seconds``."""
    body = {"model": "chat", "messages": [{"role": "user", "content": "hello"}]}
    headers = {"Authorization": f"Bearer {key}"}
    started = time.monotonic()
    with httpx.Client(base_url=url, headers=headers, timeout=10) as client:
        while (elapsed := time.monotonic() - started) < seconds:
            rate = LOW_RPS + (HIGH_RPS - LOW_RPS) * (0.5 + 0.5 * math.sin(elapsed / WAVE_S * 6.28))
            client.post("/v1/chat/completions", json=body)
            time.sleep(1.0 / rate)


def shoot(page: Page, url: str, name: str, out: Path) -> None:
    for width in WIDTHS:
        page.set_viewport_size({"width": width, "height": HEIGHT})
        page.goto(url)
        page.wait_for_load_state("networkidle")
        page.screenshot(path=str(out / f"{name}-{width}.png"), full_page=True)
        print(f"wrote {out / f'{name}-{width}.png'}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "console")
    parser.add_argument("--traffic-s", type=float, default=TRAFFIC_S)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        settings = console_settings(Path(scratch) / "data")
        settings = dataclasses.replace(
            settings,
            guard=dataclasses.replace(settings.guard, enabled=True),
            console=dataclasses.replace(settings.console, sample_period_s=SAMPLE_PERIOD_S),
        )
        user_key = seed_store(settings, Path(scratch) / "folders")
        engine = fake_engine()
        transport = SlowEngine(engine.transport(), time.monotonic())
        app = console_app(settings, engine, transport=transport, judge=WavyJudge())
        with serving_in_thread(app) as url:
            traffic = threading.Thread(target=send_traffic, args=(url, user_key, args.traffic_s))
            traffic.start()
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=CHROMIUM)
                page = browser.new_page()
                shoot(page, f"{url}/console/sign-in", "sign-in", args.out)
                page.fill("#key", ADMIN_KEY)
                page.click("button[type=submit]")
                traffic.join()
                shoot(page, f"{url}/console/", "overview", args.out)
                shoot(page, f"{url}/console/adapters", "adapters", args.out)
                shoot(page, f"{url}/console/canary", "canary", args.out)
                shoot(page, f"{url}/console/adapters/chat-v0001/promote", "promote", args.out)
                page.goto(f"{url}/console/adapters/chat-v0001/promote")
                page.click("form.buttons button[type=submit]")
                shoot(page, f"{url}/console/aliases/chat/rollback", "rollback", args.out)
                shoot(page, f"{url}/console/rounds", "rounds", args.out)
                shoot(page, f"{url}/console/keys", "keys", args.out)
                shoot(page, f"{url}/console/quarantine", "quarantine", args.out)
                shoot(page, f"{url}/console/audit", "audit", args.out)
                browser.close()


if __name__ == "__main__":
    main()
