# Backup task of a redis pod (the `backup` plan), rendered by Cairn from package
# {{ package.name }} {{ package.version }}: on the primary, an RDB snapshot (`redis-cli
# --rdb`) into the pod's `backups` volume as backups/<UTC time>.rdb; the newest
# {{ options.backups_kept }} are kept. Replicas have nothing to do.
set -eu
{% raw -%}
ME={{ pod.name }}
PRIMARY={{ endpoints.primary }}
HOST={{ pod.host }}
SERVER_PORT={{ pod.ports.redis }}
{%- endraw %}
if [ "$ME" != "$PRIMARY" ]; then
  echo "$ME is a replica: backups are taken on the primary, $PRIMARY"
  exit 0
fi
ID=$(date -u +%Y%m%dT%H%M%SZ)
/usr/bin/redis-cli -h "$HOST" -p "$SERVER_PORT" --rdb "backups/.partial-$ID.rdb" >&2
mv "backups/.partial-$ID.rdb" "backups/$ID.rdb"
echo "backup $ID of $ME done ($(du -h "backups/$ID.rdb" | cut -f1))"
ls -1 backups | grep '^2.*\.rdb$' | sort | head -n -{{ options.backups_kept }} | sed 's|^|backups/|' | xargs -r rm -f
