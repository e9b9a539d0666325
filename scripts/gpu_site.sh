#!/usr/bin/env bash
# Build the Python 3.12 site folder that `scripts/gpu_checks.sh` needs on a lent GPU
# machine (docs/cluster.md "On a GPU"): that machine's image has Python 3.12 with CUDA
# torch, numpy, pandas, pyarrow and scikit-learn, but not Ray, MLflow and the packages
# below, and it cannot reach a package registry. Each is downloaded here as a cp312
# manylinux wheel at the version installed on this machine (the set CI tests), unpacked
# into one folder, trimmed (Ray's Java jars, MLflow's web UI, dashboard source maps)
# and packed as xz, to fit the 64 MiB a device call may carry (about 57 MB).
# Usage, from the repository root:
#   bash scripts/gpu_site.sh [.gpu/site312.tar.xz]
# then, on the device machine (carry [".gpu"]):
#   python3 -c "import tarfile; tarfile.open('.gpu/site312.tar.xz').extractall('/tmp/site')"
#   PYTHONPATH=/tmp/site:$PWD bash scripts/gpu_checks.sh "$OUT"
set -euo pipefail
out="${1:-.gpu/site312.tar.xz}"
names="aiohttp_cors alembic annotated_types blinker boto3 botocore cachetools cffi colorful
colorlog cryptography databricks_sdk fastapi flask flask_cors gitdb gitpython google_api_core
google_auth googleapis_common_protos graphene graphql_core graphql_relay grpcio_reflection
httptools importlib_metadata itsdangerous jmespath jsonschema jsonschema_specifications mako
mlflow mlflow_skinny mlflow_tracing mmh3 opencensus opencensus_context opentelemetry_api
opentelemetry_exporter_prometheus opentelemetry_proto opentelemetry_sdk
opentelemetry_semantic_conventions optuna platformdirs prettytable proto_plus protobuf pyasn1
pyasn1_modules pycparser pydantic pydantic_core python_dotenv ray referencing rpds_py
s3transfer skops smart_open smmap sqlalchemy sqlparse starlette tensorboardx
typing_inspection uvicorn watchfiles wcwidth websockets"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
pins="$(python3 - $names <<'EOF'
import importlib.metadata as m
import sys

for name in sys.argv[1:]:
    try:
        print(f"{name}=={m.version(name)}")
    except m.PackageNotFoundError:
        sys.exit(f"gpu_site.sh: {name} is not installed here; install kdflow first "
                 "(pip install -e '.[test]')")
EOF
)"
# shellcheck disable=SC2086  # one argument per pin
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux_2_28_x86_64 --platform any -d "$work/wheels" $pins \
  2> >(grep -v "Location .* is ignored" >&2)  # this machine's pip config lists local indexes
mkdir -p "$work/site"
for w in "$work"/wheels/*.whl; do python3 -m zipfile -e "$w" "$work/site"; done
rm -rf "$work/site/ray/jars" "$work/site/mlflow/server/js"
find "$work/site/ray/dashboard" -name '*.map' -delete
mkdir -p "$(dirname "$out")"
tar -C "$work/site" -cf - . | xz -9 -T0 > "$out"
echo "gpu_site.sh: $(du -h "$out" | cut -f1) $out"
