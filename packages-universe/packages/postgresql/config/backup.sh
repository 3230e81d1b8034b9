# Backup task of a PostgreSQL pod (the `backup` plan), rendered by Cairn from package
# {{ package.name }} {{ package.version }}: on the primary, a compressed base backup (tar,
# with the WAL it needs) into the pod's `backups` volume as /tmp/pgbackup/<UTC time>; the
# newest {{ options.backups_kept }} are kept. Replicas have nothing to do.
set -eu
{% raw -%}
ME={{ pod.name }}
PRIMARY={{ endpoints.primary }}
HOST={{ pod.host }}
SERVER_PORT={{ pod.ports.postgres }}
{%- endraw %}
B=/tmp/pgbackup
if [ "$ME" != "$PRIMARY" ]; then
  echo "$ME is a replica: backups are taken on the primary, $PRIMARY"
  exit 0
fi
ID=$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$B/.partial-$ID"
/usr/lib/postgresql/15/bin/pg_basebackup -h "$HOST" -p "$SERVER_PORT" -U postgres \
  -D "$B/.partial-$ID" -Ft -z -X fetch -c fast
mv "$B/.partial-$ID" "$B/$ID"
echo "backup $ID of $ME done ($(du -sh "$B/$ID" | cut -f1))"
ls -1d "$B"/2* | sort | head -n -{{ options.backups_kept }} | xargs -r rm -rf
