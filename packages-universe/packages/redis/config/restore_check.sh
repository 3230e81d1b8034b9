# First task of the `restore` plan on each redis pod, rendered by Cairn from package
# {{ package.name }} {{ package.version }}: on the primary, the backup asked for
# (CAIRN_PARAM_FROM: an id, or `latest`) must be in its `backups` volume, or the plan stops
# here, before any server is touched.
set -eu
{% raw -%}
ME={{ pod.name }}
PRIMARY={{ endpoints.primary }}
{%- endraw %}
[ "$ME" = "$PRIMARY" ] || exit 0
FROM=${CAIRN_PARAM_FROM:?"start the restore plan with a backup: cairn service restore NAME --from ID"}
if [ "$FROM" = latest ]; then
  FROM=$(ls -1 backups | grep '^2.*\.rdb$' | sort | tail -n 1 | sed 's/\.rdb$//' || true)
fi
if [ -z "$FROM" ] || [ ! -s "backups/$FROM.rdb" ]; then
  echo "no backup ${CAIRN_PARAM_FROM} on $ME; its backups: $(ls -1 backups | grep '^2.*\.rdb$' | tr '\n' ' ')" >&2
  exit 1
fi
echo "backup $FROM found on $ME"
