# Sourced by .ci/run: a throwaway PostgreSQL cluster on loopback for the multi-worker tests.
# start_test_postgres exports TUNER_TEST_POSTGRES_URL and stops the cluster when the shell exits.
PG_BIN="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"

start_test_postgres() {
  if [ -z "$PG_BIN" ]; then
    apt-get update -qq
    apt-get install -y -qq postgresql >/dev/null
    PG_BIN="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)"
  fi
  local port="${TUNER_TEST_POSTGRES_PORT:-55432}"
  PG_DATA="$(mktemp -d /tmp/tuner-pg.XXXXXX)"
  local run_as=()
  if [ "$(id -u)" = 0 ]; then  # initdb refuses to run as root
    chown postgres: "$PG_DATA"
    run_as=(runuser -u postgres --)
  fi
  # Trust auth, loopback only: a disposable test server, never reachable from outside this machine.
  "${run_as[@]}" "$PG_BIN/initdb" -D "$PG_DATA" -U tuner --auth=trust -E UTF8 >/dev/null
  "${run_as[@]}" "$PG_BIN/pg_ctl" -D "$PG_DATA" -w -l "$PG_DATA/server.log" \
    -o "-c listen_addresses=127.0.0.1 -p $port -k $PG_DATA -c max_connections=200" start >/dev/null
  trap 'stop_test_postgres' EXIT
  "${run_as[@]}" "$PG_BIN/createdb" -h 127.0.0.1 -p "$port" -U tuner tuner_test
  export TUNER_TEST_POSTGRES_URL="postgresql://tuner@127.0.0.1:$port/tuner_test"
}

stop_test_postgres() {
  local run_as=()
  [ "$(id -u)" = 0 ] && run_as=(runuser -u postgres --)
  "${run_as[@]}" "$PG_BIN/pg_ctl" -D "$PG_DATA" -m fast stop >/dev/null 2>&1 || true
  rm -rf "$PG_DATA"
}
