#!/usr/bin/env bash
# The test suite against the oldest dependency versions requirements.txt allows (tests/requirements-floors.txt), in a
# scratch venv: what makes each floor a tested one (docs/publishing.md#dependency-floors). The host tests run in
# ComfyUI's own Python, so they are left out here. About 6 minutes on 2 cores, plus the install.
# Usage: bash benchmarks/floors.sh [venv folder, default /tmp/asd-floors]
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-/tmp/asd-floors}
python3.11 -m venv "$venv"
"$venv/bin/pip" install -q -r tests/requirements-floors.txt
"$venv/bin/pip" check
"$venv/bin/pip" freeze | grep -i -E "^(torch|diffusers|transformers|peft|accelerate|safetensors|numpy|pillow|tqdm|nerfacc|trimesh|scikit-image|websocket-client)=="
HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/ \
  --ignore=tests/test_host.py --ignore=tests/test_host_mesh.py --ignore=tests/test_reliability_host.py
