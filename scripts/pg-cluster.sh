#!/usr/bin/env bash
# A throwaway PostgreSQL cluster for tests and benchmarks (Debian's packages).
#   pg-cluster.sh start DIR [PORT]   initdb (once) and start; prints the URL
#   pg-cluster.sh stop DIR           fast shutdown (connections are cut)
#   pg-cluster.sh url DIR            the URL of a cluster started before
#   pg-cluster.sh start-tls DIR      as start, TLS only: a throwaway CA
#                                    (DIR/tls/ca.pem, and an unrelated one,
#                                    DIR/tls/other-ca.pem) signs a certificate
#                                    for 127.0.0.1 (no host name); connections
#                                    without TLS are rejected
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
tls_files() {
  t="$dir/tls"; mkdir -p "$t"
  [ -f "$t/server.pem" ] && return 0
  ca() {
    openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=$1" -keyout "$t/$2.key" -out "$t/$2.pem" \
      -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
  }
  ca "retune test CA" ca && ca "an unrelated CA" other-ca
  openssl req -newkey rsa:2048 -nodes -subj "/CN=127.0.0.1" -keyout "$t/server.key" -out "$t/server.csr" 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' > "$t/ext"
  openssl x509 -req -in "$t/server.csr" -CA "$t/ca.pem" -CAkey "$t/ca.key" -CAcreateserial -days 2 \
    -extfile "$t/ext" -out "$t/server.pem" 2>/dev/null
  chmod 600 "$t/server.key"
  [ "$(id -u)" -eq 0 ] && chown -R postgres: "$t"
  true
}
case "$cmd" in
  start|start-tls)
    tls=""
    if [ "$cmd" = start-tls ]; then
      command -v openssl >/dev/null || { echo "pg-cluster: openssl not found (apt-get install openssl)" >&2; exit 1; }
      tls="-c ssl=on -c ssl_cert_file=$dir/tls/server.pem -c ssl_key_file=$dir/tls/server.key"
    fi
    mkdir -p "$dir"
    [ "$(id -u)" -eq 0 ] && chown postgres: "$dir"
    [ -n "$tls" ] && tls_files
    if [ ! -f "$dir/data/PG_VERSION" ]; then
      as_pg "$bindir/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 --locale=C >"$dir/initdb.log" 2>&1 \
        || { cat "$dir/initdb.log" >&2; exit 1; }
      if [ -n "$tls" ]; then
        printf 'local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostnossl all all 127.0.0.1/32 reject\n' \
          | as_pg tee "$dir/data/pg_hba.conf" >/dev/null
      fi
    fi
    port="${3:-$(cat "$dir/port" 2>/dev/null || free_port)}"
    echo "$port" > "$dir/port"
    as_pg "$bindir/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 30 \
      -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c max_connections=200 -c fsync=on $tls" start >/dev/null \
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
