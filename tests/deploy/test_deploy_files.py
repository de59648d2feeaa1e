"""The deployment files in deploy/: checked by the validators of their formats, and kept
in line with the CLI, the engine policy and the topology the end-to-end test starts.

The validators come from package registries through ``deploy/install.sh --dev``:
Debian's ``docker-compose`` (``config`` needs no Docker daemon) and PyPI's
``kubernetes-validate`` (the Kubernetes schemas ship in its wheel). A missing validator
fails these tests, never skips them.
"""

from __future__ import annotations

import ast
import functools
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
SYSTEMD = DEPLOY / "systemd"
COMPOSE = DEPLOY / "docker-compose.yml"
COMPOSE_GPU = DEPLOY / "docker-compose.gpu.yml"
ENV_EXAMPLE = DEPLOY / ".env.example"
E2E_TOPOLOGY = ROOT / "tests" / "e2e" / "test_roles_e2e.py"
LAUNCH_SCRIPT = DEPLOY / "gpu" / "launch-vllm.sh"
INSTALL_STEP = "`bash deploy/install.sh --dev` (its block 'deployment validators')"
ROLES = ("engine", "gateway", "learner")
# The one flag a deployment adds to the e2e test's commands: the e2e test keeps every
# role on loopback, a container has to listen on its own address.
DEPLOYMENT_ONLY_FLAGS = frozenset({"--host"})
# The Kubernetes versions the manifests must fit: an older one still in service, the
# newest the validator knows.
K8S_VERSIONS = ("1.30.0", "1.37.0")
# Files the README and the comments tell operators to create from the *.example ones.
CREATED_BY_OPERATORS = frozenset({"deploy/.env", "deploy/k8s/secrets.env"})

Command = tuple[str, list[str]]


# --- validators ------------------------------------------------------------------------


def _compose_executable() -> list[str]:
    found = shutil.which("docker-compose")
    if found:
        return [found]
    docker = shutil.which("docker")
    if (
        docker
        and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0
    ):
        return [docker, "compose"]
    pytest.fail(
        f"no docker-compose (nor `docker compose`) on PATH: install it with {INSTALL_STEP}, "
        "which installs Debian's docker-compose package"
    )


def _kubernetes_validate() -> str:
    found = Path(sys.executable).parent / "kubernetes-validate"
    if found.is_file():
        return str(found)
    on_path = shutil.which("kubernetes-validate")
    if on_path:
        return on_path
    pytest.fail(
        f"no kubernetes-validate beside {sys.executable} nor on PATH: install it with "
        f"{INSTALL_STEP}, which pip-installs kubernetes-validate into .venv"
    )


def _clean_environment() -> dict[str, str]:
    """Only what the tools need: a variable set in the shell (a POSTGRES_PASSWORD, a
    DOCKER_HOST) would otherwise win over the example .env file or reach a daemon."""
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")
    return {name: os.environ[name] for name in keep if name in os.environ}


@functools.cache
def compose_config(*files: Path, env_file: Path = ENV_EXAMPLE) -> dict[str, Any]:
    """``docker-compose config`` of ``files`` (the resolved model), failing on any error;
    run once per set of files (the tests only read the result)."""
    arguments = ["--env-file", str(env_file)]
    for path in files:
        arguments += ["-f", str(path)]
    result = subprocess.run(
        [*_compose_executable(), *arguments, "config"],
        cwd=DEPLOY,
        env=_clean_environment(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    names = " + ".join(path.name for path in files)
    assert result.returncode == 0, f"docker-compose config on {names} failed:\n{result.stderr}"
    config = yaml.safe_load(result.stdout)
    assert isinstance(config, dict), result.stdout
    return config


def k8s_manifests() -> list[Path]:
    """The manifests `kubectl apply -k deploy/k8s` applies (kustomization.yaml aside)."""
    return sorted(path for path in K8S.glob("*.yaml") if path.name != "kustomization.yaml")


def k8s_documents() -> Iterator[dict[str, Any]]:
    for path in k8s_manifests():
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                yield document


def run_kubernetes_validate(paths: list[Path], version: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_kubernetes_validate(), "--strict", "--quiet", "-k", version, *map(str, paths)],
        env=_clean_environment(),
        capture_output=True,
        text=True,
        timeout=120,
    )


# --- commands --------------------------------------------------------------------------


def _role(argv: list[str]) -> Command | None:
    """``(subcommand, arguments)`` of a ``tuneshield engine|gateway|learner`` argv."""
    if len(argv) < 2 or Path(argv[0]).name != "tuneshield" or argv[1] not in ROLES:
        return None
    return argv[1], argv[2:]


def flags(arguments: list[str]) -> list[str]:
    """The option names in ``arguments`` (``--name value`` or ``--name=value``)."""
    return [token.split("=", 1)[0] for token in arguments if token.startswith("--")]


def option_values(arguments: list[str], name: str) -> list[str]:
    values = []
    for index, token in enumerate(arguments):
        if token == name:
            values.append(arguments[index + 1])
        elif token.startswith(f"{name}="):
            values.append(token.split("=", 1)[1])
    return values


def compose_commands(config: dict[str, Any]) -> dict[str, Command]:
    """Service name → the role command it runs (services that run one)."""
    commands = {}
    for name, service in config["services"].items():
        command = service.get("command")
        if command is None:
            continue
        argv = shlex.split(command) if isinstance(command, str) else list(command)
        role = _role(argv)
        if role is not None:
            commands[name] = role
    return commands


def _containers(document: dict[str, Any]) -> list[dict[str, Any]]:
    if document.get("kind") not in ("Deployment", "StatefulSet"):
        return []
    spec = document["spec"]["template"]["spec"]
    return list(spec.get("containers", [])) + list(spec.get("initContainers", []))


def k8s_commands() -> dict[str, Command]:
    """Workload name → the role command its container runs."""
    commands = {}
    for document in k8s_documents():
        for container in _containers(document):
            role = _role([*container.get("command", []), *container.get("args", [])])
            if role is not None:
                commands[document["metadata"]["name"]] = role
    return commands


def systemd_commands() -> dict[str, Command]:
    """Unit file name → the role command of its ExecStart."""
    commands = {}
    for unit in sorted(SYSTEMD.glob("*.service")):
        text = unit.read_text().replace("\\\n", " ")
        for line in text.splitlines():
            if line.startswith("ExecStart="):
                role = _role(shlex.split(line.removeprefix("ExecStart=")))
                if role is not None:
                    commands[unit.name] = role
    return commands


def e2e_flags() -> dict[str, set[str]]:
    """Role → the option names tests/e2e/test_roles_e2e.py starts it with, read from its
    literal argument lists (``["gateway", "--upstream", url, ...]``)."""
    tree = ast.parse(E2E_TOPOLOGY.read_text())
    found: dict[str, set[str]] = {}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.List) and node.elts):
            continue
        first = node.elts[0]
        if not (isinstance(first, ast.Constant) and first.value in ROLES):
            continue
        names = found.setdefault(first.value, set())
        for element in node.elts[1:]:
            for inner in ast.walk(element):
                if (
                    isinstance(inner, ast.Constant)
                    and isinstance(inner.value, str)
                    and inner.value.startswith("--")
                ):
                    names.add(inner.value.split("=", 1)[0])
    return found


def cli_options() -> dict[str, dict[str, bool]]:
    """Role → {option name: whether it may be repeated}, from the real CLI."""
    import typer

    from learner.cli import app

    root = typer.main.get_command(app)
    options: dict[str, dict[str, bool]] = {}
    for role in ROLES:
        command = root.commands[role]  # type: ignore[attr-defined]
        options[role] = {
            name: bool(getattr(parameter, "multiple", False))
            for parameter in command.params
            for name in [*parameter.opts, *parameter.secondary_opts]
            if name.startswith("--")
        }
    return options


def all_deployment_commands() -> dict[str, Command]:
    commands = {
        f"compose {name}": command
        for name, command in compose_commands(compose_config(COMPOSE)).items()
    }
    commands |= {f"k8s {name}": command for name, command in k8s_commands().items()}
    commands |= {f"systemd {name}": command for name, command in systemd_commands().items()}
    return commands


# --- docker compose --------------------------------------------------------------------


def test_compose_file_passes_docker_compose_config() -> None:
    """`docker-compose config` accepts the compose file with the example .env file."""
    config = compose_config(COMPOSE)
    assert set(config["services"]) == {
        "postgres",
        "models",
        "engine1",
        "engine2",
        "learner",
        "gateway1",
        "gateway2",
        "proxy",
    }


def test_gpu_override_passes_docker_compose_config() -> None:
    """The GPU override merges onto the compose file: CUDA image and a GPU per engine."""
    config = compose_config(COMPOSE, COMPOSE_GPU)
    services = config["services"]
    for name in ("engine1", "engine2", "learner"):
        assert services[name]["build"]["dockerfile"] == "deploy/Dockerfile.cuda"
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"]
    gpus = [
        services[name]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"][0]
        for name in ("engine1", "engine2", "learner")
    ]
    assert len(set(gpus)) == 3, f"engines and learner must not share a GPU: {gpus}"


def test_compose_runs_the_topology_on_postgres() -> None:
    """Two engines, two gateways naming both, one learner naming both, all on PostgreSQL."""
    config = compose_config(COMPOSE)
    services = config["services"]
    commands = compose_commands(config)
    assert {name: role for name, (role, _) in commands.items()} == {
        "engine1": "engine",
        "engine2": "engine",
        "gateway1": "gateway",
        "gateway2": "gateway",
        "learner": "learner",
    }
    engines = {"http://engine1:8000", "http://engine2:8000"}
    for name in ("gateway1", "gateway2"):
        assert set(option_values(commands[name][1], "--upstream")) == engines
    assert set(option_values(commands["learner"][1], "--engine-url")) == engines
    for name in ("gateway1", "gateway2", "learner"):
        url = services[name]["environment"]["TUNESHIELD_DATABASE_URL"]
        assert url.startswith("postgresql://") and "@postgres:5432/" in url, url
    assert services["gateway1"]["environment"]["TUNESHIELD_ADMIN_KEY"]
    text = COMPOSE.read_text() + COMPOSE_GPU.read_text()
    assert "duckdb" not in text.lower()


def test_compose_keeps_engines_and_store_internal() -> None:
    """Only the proxy publishes a port; engines and PostgreSQL sit on internal networks
    that only the gateways and the learner join (vLLM's key does not guard every path)."""
    config = compose_config(COMPOSE)
    services = config["services"]
    published = sorted(name for name, service in services.items() if service.get("ports"))
    assert published == ["proxy"]
    networks = config["networks"]
    for network in ("engines", "store", "edge"):
        assert networks[network].get("internal") is True, network
    members = {
        network: sorted(
            name for name, service in services.items() if network in (service.get("networks") or {})
        )
        for network in ("engines", "store", "edge")
    }
    assert members["engines"] == ["engine1", "engine2", "gateway1", "gateway2", "learner"]
    assert members["store"] == ["gateway1", "gateway2", "learner", "postgres"]
    assert members["edge"] == ["gateway1", "gateway2", "proxy"]


def _mounts(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """Container path → (volume, read-only) of a service's named volumes."""
    mounts = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target, *mode = volume.split(":")
            mounts[target] = (source, bool(mode) and "ro" in mode[0].split(","))
        else:
            mounts[volume["target"]] = (volume["source"], bool(volume.get("read_only")))
    return mounts


def test_compose_volumes() -> None:
    """Each gateway has a data dir (its dialog journal) of its own; learner, engines and
    gateways see the adapters at one path, the engines read-only; health checks and
    start-up conditions are set."""
    services = compose_config(COMPOSE)["services"]
    data = {
        name: _mounts(services[name])["/data"][0]
        for name in services
        if "/data" in _mounts(services[name])
    }
    assert len(set(data.values())) == len(data), f"a data dir is shared: {data}"
    assert set(data) == {"engine1", "engine2", "learner", "gateway1", "gateway2"}
    for name in ("engine1", "engine2", "learner", "gateway1", "gateway2"):
        volume, read_only = _mounts(services[name])["/data/adapters"]
        assert volume == "adapters"
        assert read_only == name.startswith("engine"), name
    for name in ("learner", "gateway1", "gateway2"):
        assert _mounts(services[name])["/data/rounds"][0] == "rounds"
    for name, service in services.items():
        if name != "models":
            assert "healthcheck" in service or name == "learner", f"{name} has no healthcheck"
    depends = services["gateway1"]["depends_on"]
    assert depends["postgres"]["condition"] == "service_healthy"
    assert services["engine1"]["depends_on"]["models"]["condition"] == (
        "service_completed_successfully"
    )


# --- Kubernetes ------------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_k8s_manifests_pass_kubernetes_validate(version: str) -> None:
    """kubernetes-validate --strict accepts every manifest (offline schemas)."""
    result = run_kubernetes_validate(k8s_manifests(), version)
    assert result.returncode == 0, f"kubernetes-validate {version}:\n{result.stdout}{result.stderr}"


def test_validators_reject_broken_files(tmp_path: Path) -> None:
    """Both validators really check: a misspelt key fails each of them."""
    broken = tmp_path / "broken.yaml"
    broken.write_text(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\n"
        "spec:\n  replica: 1\n  selector: {matchLabels: {a: b}}\n"
        "  template:\n    metadata: {labels: {a: b}}\n"
        "    spec: {containers: [{name: x, image: x}]}\n"
    )
    assert run_kubernetes_validate([broken], K8S_VERSIONS[-1]).returncode != 0
    compose = tmp_path / "compose.yml"
    compose.write_text("services:\n  x:\n    image: x\n    helthcheck: {test: [CMD, 'true']}\n")
    result = subprocess.run(
        [*_compose_executable(), "-f", str(compose), "config", "-q"],
        cwd=tmp_path,
        env=_clean_environment(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0, result.stdout


def test_kustomization_applies_every_manifest_and_the_secret() -> None:
    """kustomization.yaml lists every manifest, and its secret file's example holds every
    key the manifests read from the Secret."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(path.name for path in k8s_manifests())
    (generator,) = kustomization["secretGenerator"]
    assert generator["envs"] == ["secrets.env"]
    example = (K8S / "secrets.env.example").read_text()
    keys = {line.split("=", 1)[0] for line in example.splitlines() if re.match(r"^[A-Z_]+=", line)}
    referenced = set()
    for document in k8s_documents():
        for container in _containers(document):
            for variable in container.get("env", []):
                reference = variable.get("valueFrom", {}).get("secretKeyRef")
                if reference:
                    assert reference["name"] == generator["name"]
                    referenced.add(reference["key"])
    assert referenced == keys


def _by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in k8s_documents() if doc["kind"] == kind}


def test_k8s_topology() -> None:
    """Gateways: a StatefulSet (a journal volume each) with an HPA; engines: one GPU each,
    addressed one by one; learner: one replica, Recreate; PostgreSQL: its own volume."""
    statefulsets, deployments = _by_kind("StatefulSet"), _by_kind("Deployment")
    gateway = statefulsets["tuneshield-gateway"]
    assert gateway["spec"]["replicas"] == 2
    assert [claim["metadata"]["name"] for claim in gateway["spec"]["volumeClaimTemplates"]] == [
        "journal"
    ]
    (hpa,) = _by_kind("HorizontalPodAutoscaler").values()
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "name": "tuneshield-gateway",
    }
    engine = statefulsets["tuneshield-engine"]
    (container,) = engine["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    engine_service = _by_kind("Service")[engine["spec"]["serviceName"]]
    assert engine_service["spec"]["clusterIP"] == "None"
    engines = {
        f"http://tuneshield-engine-{index}.tuneshield-engine:8000"
        for index in range(engine["spec"]["replicas"])
    }
    commands = k8s_commands()
    assert set(option_values(commands["tuneshield-gateway"][1], "--upstream")) == engines
    assert set(option_values(commands["tuneshield-learner"][1], "--engine-url")) == engines
    learner = deployments["tuneshield-learner"]
    assert learner["spec"]["replicas"] == 1
    assert learner["spec"]["strategy"] == {"type": "Recreate"}
    claims = _by_kind("PersistentVolumeClaim")
    assert claims["tuneshield-shared"]["spec"]["accessModes"] == ["ReadWriteMany"]
    postgres = statefulsets["tuneshield-postgres"]
    (template,) = postgres["spec"]["volumeClaimTemplates"]
    assert template["spec"]["accessModes"] == ["ReadWriteOnce"]
    text = "".join(path.read_text() for path in K8S.iterdir()).lower()
    assert "duckdb" not in text and ":gpu" not in text


def test_k8s_shared_volume_paths() -> None:
    """The shared volume holds only folders (adapters, rounds, imports), mounted at the
    same path in every pod; the engines mount the adapters read-only."""
    for document in k8s_documents():
        for container in _containers(document):
            for mount in container.get("volumeMounts", []):
                if mount["name"] != "shared":
                    continue
                assert mount["subPath"] in ("adapters", "rounds", "imports")
                assert mount["mountPath"] == f"/data/{mount['subPath']}"
                if document["metadata"]["name"] == "tuneshield-engine":
                    assert mount.get("readOnly") is True


def test_network_policy_lets_only_gateways_and_learner_reach_engines() -> None:
    """The engines' and PostgreSQL's ingress comes from gateway and learner pods only."""
    policies = _by_kind("NetworkPolicy")
    protected = {}
    for policy in policies.values():
        component = policy["spec"]["podSelector"]["matchLabels"]["component"]
        (rule,) = policy["spec"]["ingress"]
        (source,) = rule["from"]
        expressions = {
            item["key"]: set(item["values"]) for item in source["podSelector"]["matchExpressions"]
        }
        assert expressions == {"app": {"tuneshield"}, "component": {"gateway", "learner"}}
        protected[component] = [port["port"] for port in rule["ports"]]
    assert protected == {"engine": [8000], "postgres": [5432]}


# --- the commands ----------------------------------------------------------------------


def test_deployments_start_the_commands_of_the_e2e_topology() -> None:
    """Compose, Kubernetes and systemd start each role with the subcommand and options the
    end-to-end topology test starts it with (values aside; plus --host to listen)."""
    expected = e2e_flags()
    missing = [role for role in ROLES if role not in expected]
    assert not missing, (
        f"{E2E_TOPOLOGY.relative_to(ROOT)} no longer starts {missing} with a literal argument "
        "list such as ['gateway', '--upstream', url, ...]: update e2e_flags() here"
    )
    commands = all_deployment_commands()
    assert {role for role, _ in commands.values()} == set(ROLES)
    for where, (role, arguments) in commands.items():
        names = set(flags(arguments)) - DEPLOYMENT_ONLY_FLAGS
        assert names == expected[role], (
            f"{where}: `tuneshield {role}` with {sorted(names)}, the e2e test with "
            f"{sorted(expected[role])}"
        )


def test_deployment_commands_use_real_options() -> None:
    """Every option the deployments pass exists on that command, and only options that
    take several values are given several times."""
    options = cli_options()
    for where, (role, arguments) in all_deployment_commands().items():
        for name, count in Counter(flags(arguments)).items():
            assert name in options[role], f"{where}: `tuneshield {role}` has no option {name}"
            assert count == 1 or options[role][name], (
                f"{where}: {name} given {count} times, but `tuneshield {role}` keeps one"
            )


def _script_options(text: str) -> dict[str, str]:
    """Option → default value in launch-vllm.sh's `vllm serve` line."""
    defaults = dict(re.findall(r"^(\w+)=\$\{\w+:-([^}]*)\}", text, flags=re.MULTILINE))
    line = text[text.index("exec vllm serve") :].replace("\\\n", " ")
    tokens = shlex.split(line.split("\n", 1)[0])

    def value(token: str) -> str:
        inline = re.fullmatch(r"\$\{\w+:-([^}]*)\}", token)
        if inline:
            return inline[1]
        return defaults.get(token.removeprefix("$"), token)

    found = {}
    for index, token in enumerate(tokens):
        if token.startswith("--"):
            following = tokens[index + 1] if index + 1 < len(tokens) else "--"
            found[token] = "" if following.startswith("--") else value(following)
    return found


def test_launch_script_defaults_follow_the_engine_policy() -> None:
    """deploy/gpu/launch-vllm.sh launches vLLM as `tuneshield engine` does on a GPU with
    policies/engine.yaml (dtype auto → bfloat16, max_lora_rank 16, ...)."""
    from engine._supervisor import engine_command, load_engine_config

    config = load_engine_config(environ={})
    argv = engine_command(config, "MODEL", build="cuda", python="/nonexistent/python")
    assert argv[:3] == ["vllm", "serve", "MODEL"]
    expected = {}
    for index, token in enumerate(argv[3:], start=3):
        if token.startswith("--"):
            following = argv[index + 1] if index + 1 < len(argv) else "--"
            expected[token] = "" if following.startswith("--") else following
    script = _script_options(LAUNCH_SCRIPT.read_text())
    for name, value in expected.items():
        assert script.get(name) == value, (
            f"launch-vllm.sh {name}: {script.get(name)!r}, policy {value!r}"
        )


def test_docs_state_the_policy_launch_values() -> None:
    """deploy/README.md quotes the engine policy's LoRA rank and context length."""
    from engine._supervisor import load_engine_config

    config = load_engine_config(environ={})
    text = (DEPLOY / "README.md").read_text()
    for flag, value in (
        ("--max-lora-rank", config.max_lora_rank),
        ("--max-model-len", config.max_model_len),
        ("--max-loras", config.max_loras),
    ):
        quoted = re.findall(rf"{flag}[ =](\d+)", text)
        assert quoted and set(quoted) == {str(value)}, f"README {flag}: {quoted}, policy {value}"


# --- references ------------------------------------------------------------------------

PATH_REFERENCE = re.compile(
    r"(?<![\w./-])((?:deploy|policies|docs|tests|engine|gateway|learner|store|tuneshield)"
    r"/[\w./-]*\w\.(?:py|yaml|yml|md|sh|service|conf|env|example|cuda|txt))\b"
)


def _deploy_texts() -> Iterator[tuple[Path, str]]:
    for path in sorted(DEPLOY.rglob("*")):
        if path.is_file() and path.name not in (".env", "secrets.env"):
            yield path, path.read_text()


def _own_deploy_texts() -> Iterator[tuple[Path, str]]:
    """The deployment files: deploy/ less its top-level scripts (install.sh, whose other
    blocks belong to other parts, and the other parts' helper scripts)."""
    for path, text in _deploy_texts():
        if not (path.parent == DEPLOY and path.suffix == ".sh"):
            yield path, text


def test_deploy_files_name_only_files_that_exist() -> None:
    """Every repository path the deploy files name exists (or is one an operator creates
    from its example), and none cites a DESIGN.md, which the repository does not hold."""
    for path, text in _own_deploy_texts():
        assert "DESIGN.md" not in text, f"{path.relative_to(ROOT)} cites DESIGN.md"
        for reference in PATH_REFERENCE.findall(text):
            if reference in CREATED_BY_OPERATORS:
                continue
            assert (ROOT / reference).exists(), f"{path.relative_to(ROOT)} names {reference}"
        if path.suffix == ".md":
            for link in re.findall(r"\]\(([^)#\s]+)", text):
                if "://" not in link:
                    assert (path.parent / link).exists(), f"{path.relative_to(ROOT)} links {link}"
    # The root file serves builders that ignore the per-Dockerfile ones: the same patterns.
    patterns = []
    for ignore_file in (DEPLOY / "Dockerfile.dockerignore", DEPLOY / "Dockerfile.cuda.dockerignore",
                        ROOT / ".dockerignore"):  # fmt: skip
        lines = ignore_file.read_text().splitlines()
        patterns.append({line for line in lines if line and not line.startswith("#")})
    assert {"deploy/.env", "deploy/k8s/secrets.env", ".venv/"} <= patterns[0]
    assert patterns[0] == patterns[1] == patterns[2]


def test_images_referenced_are_built_here() -> None:
    """The TuneShield image tags the deployments use are the tags the Dockerfiles build."""
    built = {
        "tuneshield-gateway:cpu": DEPLOY / "Dockerfile",
        "tuneshield-gateway:cuda": DEPLOY / "Dockerfile.cuda",
    }
    for tag, dockerfile in built.items():
        assert f"-t {tag} ." in dockerfile.read_text(), f"{dockerfile.name} does not build {tag}"
    used = set()
    for _, text in _own_deploy_texts():
        used |= set(re.findall(r"tuneshield-gateway:\w+", text))
    assert used <= set(built), f"tags no Dockerfile builds: {sorted(used - set(built))}"
