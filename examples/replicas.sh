#!/usr/bin/env bash
# Three atlas-serve replicas on this machine sharing one PostgreSQL and one blob directory:
# a PostgreSQL cluster in a directory of its own (Debian's postgresql package, run as the
# current user, or as nobody under root), then replicas a, b and c on ports 8081-8083.
#
#   bash examples/replicas.sh [WORKDIR]      # Ctrl-C stops everything
#
# Any argument after WORKDIR goes to every replica (e.g. --model demo:ci). The binary is
# `atlas-serve` on PATH, or ATLAS_SERVE=path/to/atlas-serve.
set -euo pipefail
work=$(realpath -m "${1:-atlas-replicas}")
shift || true
serve=${ATLAS_SERVE:-atlas-serve}
bin=$(compgen -G '/usr/lib/postgresql/*/bin' | sort -V | tail -1)
[[ -x $bin/initdb ]] || { echo "install PostgreSQL first: apt-get install postgresql" >&2; exit 1; }
port=${ATLAS_PG_PORT:-55432}
url="postgres://postgres@127.0.0.1:$port/atlas"
mkdir -p "$work/pg" "$work/blobs"

as_owner=()
if [[ $(id -u) == 0 ]]; then
    chown nobody "$work/pg"
    as_owner=(runuser -u nobody --)
fi
if [[ ! -f $work/pg/data/PG_VERSION ]]; then
    "${as_owner[@]}" "$bin/initdb" -D "$work/pg/data" -U postgres --auth=trust -E UTF8 >/dev/null
fi
"${as_owner[@]}" "$bin/postgres" -D "$work/pg/data" -p "$port" -k "$work/pg" \
    -c listen_addresses=127.0.0.1 >"$work/pg/log" 2>&1 &
pids=($!)
trap 'kill "${pids[@]}" 2>/dev/null; wait' EXIT INT TERM
until "$bin/pg_isready" -q -h 127.0.0.1 -p "$port"; do sleep 0.2; done
"$bin/psql" -q -h 127.0.0.1 -p "$port" -U postgres -tc "SELECT 1 FROM pg_database WHERE datname = 'atlas'" |
    grep -q 1 || "$bin/psql" -q -h 127.0.0.1 -p "$port" -U postgres -c "CREATE DATABASE atlas"

names=(a b c)
for i in 1 2 3; do
    name=${names[i - 1]}
    "$serve" serve --listen "127.0.0.1:808$i" --replica "$name" --database-url "$url" \
        --blob-dir "$work/blobs" --data-dir "$work/$name" "$@" >"$work/$name.log" 2>&1 &
    pids+=($!)
    echo "replica $name: http://127.0.0.1:808$i (log $work/$name.log)"
done
echo "PostgreSQL: $url (log $work/pg/log); Ctrl-C stops everything"
wait -n "${pids[@]}"
