#!/usr/bin/env bash
# A throwaway PostgreSQL cluster for tests and benchmarks (Debian's packages).
#   pg-cluster.sh start DIR [PORT]   initdb (once) and start; prints the URL
#   pg-cluster.sh stop DIR           fast shutdown (connections are cut)
#   pg-cluster.sh url DIR            the URL of a cluster started before
# Listens on 127.0.0.1 only, trust auth, fsync on. As root, the server runs as
# the `postgres` user (initdb refuses root).
set -euo pipefail
cmd="${1:?start|stop|url}"; dir="${2:?DIR}"
bindir="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)"
[ -x "$bindir/pg_ctl" ] || { echo "pg-cluster: PostgreSQL server binaries not found (apt-get install postgresql)" >&2; exit 1; }
as_pg() {
  if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
case "$cmd" in
  start)
    mkdir -p "$dir"
    [ "$(id -u)" -eq 0 ] && chown postgres: "$dir"
    if [ ! -f "$dir/data/PG_VERSION" ]; then
      as_pg "$bindir/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 --locale=C >"$dir/initdb.log" 2>&1 \
        || { cat "$dir/initdb.log" >&2; exit 1; }
    fi
    port="${3:-$(cat "$dir/port" 2>/dev/null || free_port)}"
    echo "$port" > "$dir/port"
    as_pg "$bindir/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 30 \
      -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c max_connections=200 -c fsync=on" start >/dev/null \
      || { tail -20 "$dir/server.log" >&2; exit 1; }
    echo "postgres://postgres@127.0.0.1:$port/postgres"
    ;;
  stop)
    [ -f "$dir/data/postmaster.pid" ] && as_pg "$bindir/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null
    true
    ;;
  url)
    echo "postgres://postgres@127.0.0.1:$(cat "$dir/port")/postgres"
    ;;
  *) echo "pg-cluster: unknown command $cmd" >&2; exit 2 ;;
esac
