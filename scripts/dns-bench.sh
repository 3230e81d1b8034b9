#!/bin/sh
# DNS queries/s: Cairn's built-in DNS (an agent of `cairn dev`) vs dnsmasq serving the same
# records, side by side, with dnsperf (Debian: dnsperf, dnsmasq-base). Needs root (the
# workload's native tasks). Usage: scripts/dns-bench.sh [path/to/cairn] [seconds]
set -eu
CAIRN=${1:-target/release/cairn}
SECS=${2:-10}
DIR=$(mktemp -d /var/tmp/cairn-dns-bench-XXXXXX)
TOKEN=bench-token-0123456789
API=127.0.0.1:15050
cleanup() {
    [ -n "${DEV:-}" ] && kill "$DEV" 2>/dev/null && wait "$DEV" 2>/dev/null
    [ -n "${MASQ:-}" ] && kill "$MASQ" 2>/dev/null
    rm -rf "$DIR"
}
trap cleanup EXIT

"$CAIRN" dev --data-dir "$DIR/dev" --listen $API --agent-listen 127.0.0.1:15051 \
    --dns-listen 127.0.0.1:15053 --dns-upstream none --token $TOKEN >"$DIR/dev.log" 2>&1 &
DEV=$!
until curl -sf -H "authorization: Bearer $TOKEN" http://$API/api/v1/agents | grep -q active; do
    sleep 0.2
done
curl -sf -H "authorization: Bearer $TOKEN" -H 'content-type: application/json' \
    http://$API/api/v1/workloads -d '{"id": "web", "instances": 3,
      "runtime": {"native": {"cmd": "/bin/sleep", "args": ["600"]}},
      "resources": {"cpus": 0.01, "mem": 8}, "ports": [{"name": "http", "number": 0}]}' >/dev/null
until [ "$(dig @127.0.0.1 -p 15053 +short _http._tcp.web.cairn SRV | wc -l)" = 3 ]; do
    sleep 0.2
done

# The same records for dnsmasq, read from Cairn's answers.
SRV=$(dig @127.0.0.1 -p 15053 +short _http._tcp.web.cairn SRV)
TARGET=$(echo "$SRV" | head -1 | awk '{print $4}' | sed 's/\.$//')
set -- --host-record=web.cairn,127.0.0.1 --host-record=leader.cairn,127.0.0.1 \
    --host-record=agents.cairn,127.0.0.1 --host-record="$TARGET,127.0.0.1"
for port in $(echo "$SRV" | awk '{print $3}'); do
    set -- "$@" --srv-host="_http._tcp.web.cairn,$TARGET,$port,0,1"
done
dnsmasq --keep-in-foreground --port 15054 --listen-address 127.0.0.1 --bind-interfaces \
    --no-resolv --no-hosts --local=/cairn/ --local-ttl=1 --user=root "$@" &
MASQ=$!
sleep 0.5

cat >"$DIR/queries" <<EOF
web.cairn A
_http._tcp.web.cairn SRV
leader.cairn A
agents.cairn A
nope.cairn A
EOF
for target in cairn:15053 dnsmasq:15054; do
    echo "== ${target%%:*}"
    dnsperf -s 127.0.0.1 -p "${target##*:}" -d "$DIR/queries" -l "$SECS" -c 4 -T 1 -q 500 |
        grep -E 'Queries (sent|completed|lost)|Response codes|Queries per second|Average Latency|Latency StdDev'
done
