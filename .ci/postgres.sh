#!/usr/bin/env bash
# Install (if missing) and start Debian's PostgreSQL, create the role `kdflow`
# (password `kdflow`, may create databases), and print the base URI on the last line:
#   postgresql://kdflow:kdflow@127.0.0.1:PORT
# Idempotent: re-running finds the package, the cluster, the running server and the role.
# Works as root (runs the server as the `postgres` user) or as a user with sudo.
set -euo pipefail
PORT="${KD_PG_PORT:-5432}"

as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else sudo -u postgres "$@"; fi
}
as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq postgresql >/dev/null
fi
VER="$(ls /usr/lib/postgresql | sort -V | tail -1)"
if ! pg_lsclusters -h | awk '{print $1" "$2}' | grep -qx "$VER main"; then
  as_root pg_createcluster --port "$PORT" "$VER" main >/dev/null
fi
CLUSTER_PORT="$(pg_lsclusters -h | awk -v v="$VER" '$1==v && $2=="main" {print $3}')"
if ! pg_lsclusters -h | awk -v v="$VER" '$1==v && $2=="main" {print $4}' | grep -q online; then
  as_root pg_ctlcluster "$VER" main start
fi
for _ in $(seq 1 60); do
  pg_isready -q -h 127.0.0.1 -p "$CLUSTER_PORT" && break
  sleep 0.5
done
pg_isready -h 127.0.0.1 -p "$CLUSTER_PORT" >/dev/null
if ! as_pg psql -p "$CLUSTER_PORT" -tAc "SELECT 1 FROM pg_roles WHERE rolname='kdflow'" | grep -q 1; then
  as_pg psql -p "$CLUSTER_PORT" -qc "CREATE ROLE kdflow LOGIN CREATEDB PASSWORD 'kdflow'"
fi
python -c "import psycopg2" 2>/dev/null || python -m pip install -q "psycopg2-binary>=2.9"
echo "postgresql://kdflow:kdflow@127.0.0.1:${CLUSTER_PORT}"
