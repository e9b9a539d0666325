#!/usr/bin/env bash
# checkov in its own virtualenv (.venv-checkov/): its pins conflict with the project's.
# Usage: scripts/checkov.sh [checkov args]; with no args it scans the chart and k8s/
# with the repository's .checkov.yaml (each skip there has its reason).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-checkov
CHECKOV_VERSION="${KD_CHECKOV_VERSION:-3.2.*}"
if ! "$VENV/bin/checkov" --version >/dev/null 2>&1; then
  python -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "checkov==$CHECKOV_VERSION"
fi
export PATH="$PWD/.tools/bin:$PATH"  # checkov renders the chart with helm
if [ "$#" -eq 0 ]; then
  set -- --config-file .checkov.yaml
fi
exec "$VENV/bin/checkov" "$@"
