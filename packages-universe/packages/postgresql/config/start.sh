# Start script of a PostgreSQL pod, rendered by Cairn from package {{ package.name }}
# {{ package.version }} at install, then at every launch with the pods' addresses and the
# `primary` endpoint: the pod it names runs the primary, every other pod a streaming replica
# of it. Cairn moves the endpoint on failover (or `cairn service switchover`) and relaunches
# the new primary first (promoted here), then the others (they follow it here).
set -eu
{%- set bin = "/usr/lib/postgresql/15/bin" %}
BIN={{ bin }}
D=/tmp/pgdata
pg() { /usr/bin/setpriv --reuid=postgres --regid=postgres --init-groups -- "$@"; }
{% raw -%}
ME={{ pod.name }}
PRIMARY={{ endpoints.primary }}
PRIMARY_HOST=
PRIMARY_PORT=
{%- for p in pods if p.name == endpoints.primary and p.host and "postgres" in p.ports %}
PRIMARY_HOST={{ p.host }}
PRIMARY_PORT={{ p.ports.postgres }}
{%- endfor %}
SLOTS="{% for p in pods if p.name != endpoints.primary %}{{ p.name | replace("-", "_") }} {% endfor %}"
STANDBYS='{% for p in pods if p.name != endpoints.primary %}{{ "," if not loop.first }}"{{ p.name }}"{% endfor %}'
{%- endraw %}
SYNCHRONOUS={{ "yes" if options.synchronous else "no" }}
# The sandbox's parents are private to root, so the data volume lives under the sandbox's
# tmp, which the task sees as its private /tmp: the postgres user reaches it there (tasks
# cannot mount anything themselves).
# The rendered postgresql.conf and pg_hba.conf are beside this script.
SANDBOX=$PWD
mkdir -p /tmp/pgsock
chown postgres:postgres /tmp/pgsock "$D"
chmod 700 "$D"
cd "$D"
sql() { pg "$BIN/psql" -X -q -h "$1" -p "$2" -U postgres -d postgres -tAc "$3"; }

# Whether the primary accepts connections as a primary (not in recovery) within $1 seconds.
primary_up() {
  tries=0
  until [ "$(sql "$PRIMARY_HOST" "$PRIMARY_PORT" 'SELECT pg_is_in_recovery()' 2>/dev/null)" = f ]; do
    tries=$((tries + 1))
    [ "$tries" -lt "$1" ] || return 1
    sleep 1
  done
}

# Waits for the primary, or fails the launch (Cairn launches it again after a backoff).
wait_primary() {
  primary_up 120 || {
    echo "the primary $PRIMARY ($PRIMARY_HOST:$PRIMARY_PORT) did not accept connections as a primary within 120 s" >&2
    exit 1
  }
}

if [ "$ME" = "$PRIMARY" ]; then
  ROLE=primary
  if [ -n "${CAIRN_PARAM_FROM:-}" ]; then
    # The `restore` plan (its first task checked the backup is here).
    FROM=$CAIRN_PARAM_FROM
    if [ "$FROM" = latest ]; then
      FROM=$(ls -1 /tmp/pgbackup | grep '^2' | sort | tail -n 1)
    fi
    echo "restoring $ME from backup $FROM" >&2
    find "$D" -mindepth 1 -delete
    tar -xzf "/tmp/pgbackup/$FROM/base.tar.gz" -C "$D"
    chown -R postgres:postgres "$D"
    chmod 700 "$D"
  fi
  if [ ! -s PG_VERSION ]; then
    pg "$BIN/initdb" -D "$D" -U postgres --data-checksums --auth-local=trust --auth-host=reject --encoding=UTF8 --locale=C.UTF-8 >/dev/null
    echo "CREATE DATABASE {{ options.database }};" | pg "$BIN/postgres" --single -D "$D" postgres >/dev/null
  fi
  if [ -f standby.signal ]; then
    # A replica the endpoint now names: it starts as a standby, replays what it received and
    # promotes itself (a new timeline) on finding the trigger file.
    echo "$ME takes over as the primary: promoting it" >&2
    touch cairn.promote
    chown postgres:postgres cairn.promote
  else
    rm -f cairn.promote
  fi
else
  ROLE=replica
  rm -f cairn.promote
  if [ -z "$PRIMARY_HOST" ] || [ -z "$PRIMARY_PORT" ]; then
    echo "the primary $PRIMARY has no address yet" >&2
    exit 1
  fi
  if [ -n "${CAIRN_PARAM_FROM:-}" ]; then
    # The `restore` plan: the primary went back to a backup; this replica starts over from it.
    echo "$ME starts over from the restored primary $PRIMARY" >&2
    find "$D" -mindepth 1 -delete
  fi
  if [ -s PG_VERSION ]; then
    # Data from before: it may be a primary's that the new primary never saw (this pod was
    # the primary), or a replica's that received more than the promoted replica had. Rewind
    # it onto the primary's timeline (a no-op when nothing diverged), or start over from a
    # base backup if that fails. A replica whose primary stays away 30 s starts as it is.
    if [ ! -f standby.signal ]; then
      echo "$ME was a primary: rewinding it onto $PRIMARY" >&2
      wait_primary
    fi
    if primary_up 30; then
      # The promoted server writes its new timeline to its control file at a checkpoint.
      sql "$PRIMARY_HOST" "$PRIMARY_PORT" CHECKPOINT >/dev/null || true
      # (pg_rewind finishes an interrupted recovery in single-user mode, which refuses to
      # run as a standby.)
      rm -f standby.signal
      if ! pg "$BIN/pg_rewind" -D "$D" --source-server="host=$PRIMARY_HOST port=$PRIMARY_PORT user=postgres dbname=postgres" >&2; then
        echo "pg_rewind failed: taking a fresh base backup of $PRIMARY" >&2
        find "$D" -mindepth 1 -delete
      fi
    fi
  fi
  if [ ! -s PG_VERSION ]; then
    wait_primary
    echo "taking a base backup of $PRIMARY for $ME" >&2
    find "$D" -mindepth 1 -delete
    pg "$BIN/pg_basebackup" -h "$PRIMARY_HOST" -p "$PRIMARY_PORT" -U postgres -D "$D" -X stream -c fast
  fi
  touch standby.signal
  chown postgres:postgres standby.signal
fi

cp "$SANDBOX/postgresql.conf" cairn.conf
{
  echo "promote_trigger_file = '$D/cairn.promote'"
  if [ "$SYNCHRONOUS" = yes ] && [ "$ROLE" = primary ] && [ -n "$STANDBYS" ]; then
    # The first connected replica in pod order confirms every commit: the same order in
    # which Cairn picks the replica to promote.
    echo "synchronous_standby_names = 'FIRST 1 ($STANDBYS)'"
  fi
  if [ "$ROLE" = replica ]; then
    echo "primary_conninfo = 'host=$PRIMARY_HOST port=$PRIMARY_PORT user=postgres application_name=$ME'"
    echo "primary_slot_name = '$(echo "$ME" | tr - _)'"
  fi
} >> cairn.conf
cp "$SANDBOX/pg_hba.conf" pg_hba.conf
chown postgres:postgres cairn.conf pg_hba.conf

if [ "$ROLE" = primary ] && [ -n "$SLOTS" ]; then
  # A helper outside the server's process tree (the subshell exits at once, so its child is
  # not the postmaster's): once this server is a primary, a replication slot per replica, so
  # the primary keeps the WAL they have not received.
  (
    (
      until [ "$(sql /tmp/pgsock "$PORT_POSTGRES" 'SELECT pg_is_in_recovery()' 2>/dev/null)" = f ]; do sleep 0.2; done
      for s in $SLOTS; do
        sql /tmp/pgsock "$PORT_POSTGRES" "SELECT pg_create_physical_replication_slot('$s') WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = '$s')" >/dev/null || true
      done
    ) </dev/null >/dev/null 2>&1 &
  )
fi
exec /usr/bin/setpriv --reuid=postgres --regid=postgres --init-groups -- "$BIN/postgres" -D "$D" -c config_file="$D/cairn.conf" -p "$PORT_POSTGRES" -h "$HOST"
