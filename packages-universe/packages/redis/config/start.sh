# Start script of a redis pod, rendered by Cairn from package {{ package.name }}
# {{ package.version }}. Normally it only starts redis-server; in a run of the `restore` plan
# (CAIRN_PARAM_FROM) the primary first replaces its data with the backup and a replica drops
# its own (it resynchronises from the primary).
set -eu
{% raw -%}
ME={{ pod.name }}
PRIMARY={{ endpoints.primary }}
{%- endraw %}
if [ -z "${CAIRN_PARAM_FROM:-}" ]; then
  exec /usr/bin/redis-server redis.conf
fi
rm -rf data/appendonlydir data/dump.rdb
if [ "$ME" != "$PRIMARY" ]; then
  echo "$ME starts over from the restored primary $PRIMARY" >&2
  exec /usr/bin/redis-server redis.conf
fi
FROM=$CAIRN_PARAM_FROM
if [ "$FROM" = latest ]; then
  FROM=$(ls -1 backups | grep '^2.*\.rdb$' | sort | tail -n 1 | sed 's/\.rdb$//')
fi
echo "restoring $ME from backup $FROM" >&2
cp "backups/$FROM.rdb" data/dump.rdb
{%- if options.persistence.aof %}
# Loaded from the snapshot with the append-only file off, then switched on: redis writes a
# new append-only file from the restored data (the documented way to turn AOF on).
(
  (
    until /usr/bin/redis-cli -h "$HOST" -p "$PORT_REDIS" ping 2>/dev/null | grep -q PONG; do sleep 0.2; done
    /usr/bin/redis-cli -h "$HOST" -p "$PORT_REDIS" config set appendonly yes >/dev/null || true
  ) </dev/null >/dev/null 2>&1 &
)
exec /usr/bin/redis-server redis.conf --appendonly no
{%- else %}
exec /usr/bin/redis-server redis.conf
{%- endif %}
