"""schemathesis against the gateway's own OpenAPI schema, on a real loopback server.

The schemathesis pytest plugin does not load under pytest 9, so this runs its CLI (dev
extra) against uvicorn serving the gateway in front of the fake engine.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import sys
from pathlib import Path

import pytest
from gateway_fakes import ADMIN_KEY, FakeEngine, serving

from gateway.settings import GatewaySettings

SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")
# Every check schemathesis has: no 5xx, responses (status, headers, content type, body)
# as documented, invalid input refused, valid input accepted, auth enforced, Allow
# headers right, deleted resources gone.
CHECKS = "all"
MAX_TIME_S = 45


@pytest.mark.slow
@pytest.mark.skipif(not SCHEMATHESIS.exists(), reason="schemathesis (dev extra) not installed")
async def test_schemathesis_finds_nothing(
    settings: GatewaySettings, engine: FakeEngine, tmp_path: Path
) -> None:
    """Fuzzing, coverage and stateful phases find no 5xx and no schema violation."""
    # The fuzzer sends hundreds of requests a second with one key, many of them with no or
    # a wrong key on purpose, all from one address: no rate limit here.
    limits = dataclasses.replace(
        settings.limits,
        rate_limit_per_minute=1e9,
        rate_limit_burst=1_000_000_000,
        admin_rate_limit_per_minute=1e9,
        admin_rate_limit_burst=1_000_000_000,
        auth_failures_per_window=1_000_000_000,
    )
    async with serving(dataclasses.replace(settings, limits=limits), engine) as url:
        process = await asyncio.create_subprocess_exec(
            str(SCHEMATHESIS),
            "run",
            f"{url}/schema/openapi.json",
            "--header",
            f"Authorization: Bearer {ADMIN_KEY}",
            "--checks",
            CHECKS,
            "--max-time",
            str(MAX_TIME_S),
            "--seed",
            "0",
            "--workers",
            "1",
            "--no-color",
            "--generation-database",
            "none",
            cwd=tmp_path,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await asyncio.wait_for(process.communicate(), timeout=MAX_TIME_S + 60)
    report = output.decode(errors="replace")
    assert process.returncode == 0, report[-8000:]
    tested = re.search(r"Tested: (\d+)", report)
    assert tested is not None and int(tested.group(1)) >= 9, report[-2000:]
