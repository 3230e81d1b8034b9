# Start script of an etcd member, rendered by Cairn from package {{ package.name }}
# {{ package.version }} at install, then at launch with the pods' addresses and ports.
set -eu
{% raw -%}
ME={{ pod.name }}
PEER_URL=http://{{ pod.host }}:{{ ports.peer }}
CLIENT_URL=http://{{ pod.host }}:{{ ports.client }}
# Members with a lower index were deployed first (serial deploy) and are running.
CLUSTER="{% for p in pods if p.index < pod.index and "peer" in p.ports %}{{ p.name }}=http://{{ p.host }}:{{ p.ports.peer }},{% endfor %}$ME=$PEER_URL"
ENDPOINTS="{% for p in pods if p.index < pod.index and "client" in p.ports %}http://{{ p.host }}:{{ p.ports.client }},{% endfor %}"
{%- endraw %}
STATE=new
if [ -n "$ENDPOINTS" ] && [ ! -d data/member ]; then
  # A new member joins the running cluster: added first (once), then started as existing.
  STATE=existing
  # etcd refuses a member add for a few seconds after the previous member joined: retry.
  tries=0
  until /usr/bin/etcdctl --endpoints="$ENDPOINTS" member list | grep -q "$PEER_URL" ||
    /usr/bin/etcdctl --endpoints="$ENDPOINTS" member add "$ME" --peer-urls="$PEER_URL"; do
    tries=$((tries + 1))
    [ "$tries" -lt 60 ] || exit 1
    sleep 1
  done
fi
exec /usr/bin/etcd --name "$ME" --data-dir data \
  --listen-peer-urls "$PEER_URL" --initial-advertise-peer-urls "$PEER_URL" \
  --listen-client-urls "$CLIENT_URL" --advertise-client-urls "$CLIENT_URL" \
  --initial-cluster "$CLUSTER" --initial-cluster-state "$STATE" \
  --initial-cluster-token {{ options.name }}
