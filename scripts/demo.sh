#!/usr/bin/env bash
# Demo: builds the module and nginx, starts InfluxDB and nginx on loopback, sends the sample
# beacons, prints what InfluxDB stored, and serves a demo page with the browser agent
# (agent/demo/index.html). Everything lives in ./demo-run; stop with Ctrl-C (or run with
# DEMO_KEEP=0 to stop right after printing).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

nginx_port=${DEMO_NGINX_PORT:-8080}
influx_port=${DEMO_INFLUX_PORT:-18086}
influx_rpc_port=${DEMO_INFLUX_RPC_PORT:-18088}
run="$root/demo-run"

echo "==> building the module and nginx (release)"
cargo build --release
# shellcheck source=scripts/lib.sh
. "$root/scripts/lib.sh"
nginx_bin=$(release_nginx)
trap stop_all EXIT

rm -rf "$run"
mkdir -p "$run/nginx/logs"

echo "==> starting InfluxDB on 127.0.0.1:$influx_port"
start_influxd "$run/influxdb" "$influx_port" "$influx_rpc_port"
influx_query "$influx_port" "CREATE DATABASE analytics" >/dev/null

echo "==> starting nginx with the module on 127.0.0.1:$nginx_port"
sed -e "s|@MODULE@|$module|" -e "s|@NGINX_PORT@|$nginx_port|" -e "s|@INFLUX_PORT@|$influx_port|" \
    -e "s|@AGENT_DIR@|$root/agent|" \
    "$root/scripts/demo-nginx.conf" > "$run/nginx/nginx.conf"
start_nginx "$nginx_bin" "$run/nginx" "http://127.0.0.1:$nginx_port/"

echo "==> sending the sample beacons"
# Without a User-Agent: the module drops beacons from curl, crawlers and headless browsers as bots
# (analytics_drop_bots), and a missing User-Agent proves nothing either way.
for file in "$root"/tests/fixtures/payloads/*.json; do
    status=$(curl -s -A '' -o "$run/answer" -w '%{http_code}' -H 'Host: www.example.com' \
        -H 'Content-Type: text/plain;charset=UTF-8' --data-binary "@$file" \
        "http://127.0.0.1:$nginx_port/analytics/collect")
    printf '  %-32s -> %s %s\n' "$(basename "$file")" "$status" "$(tr -d '\n' < "$run/answer")"
done

query() {
    influx -host 127.0.0.1 -port "$influx_port" -database analytics -precision rfc3339 \
        -execute "$1"
    echo
}
echo "==> page views stored in InfluxDB (SELECT * FROM pf_analytics)"
query 'SELECT * FROM "pf_analytics"'
echo "==> events stored in InfluxDB (SELECT * FROM pf_analytics_event)"
query 'SELECT * FROM "pf_analytics_event"'
echo "==> events per name (SELECT sum(counter) FROM pf_analytics_event GROUP BY event)"
query 'SELECT sum("counter") FROM "pf_analytics_event" GROUP BY "event"'
echo "==> unique visits (SELECT COUNT(DISTINCT(sess)) FROM pf_analytics)"
query 'SELECT COUNT(DISTINCT("sess")) FROM "pf_analytics"'

echo "==> the demo page and the browser agent"
for path in /demo/ /analytics/agent.js; do
    printf '  GET %-20s -> %s\n' "$path" "$(curl -s -o /dev/null \
        -w '%{http_code} %{content_type}, %{size_download} bytes' "http://127.0.0.1:$nginx_port$path")"
done

echo
cat <<MSG
Demo page:       http://127.0.0.1:$nginx_port/demo/  (open it in a browser, click the buttons)
Its points:      influx -host 127.0.0.1 -port $influx_port -database analytics -precision rfc3339 \\
                   -execute 'SELECT * FROM pf_analytics WHERE page =~ /^\/demo\//; SELECT * FROM pf_analytics_event WHERE page =~ /^\/demo\//'
MSG
echo "Beacon endpoint: http://127.0.0.1:$nginx_port/analytics/collect (Host: www.example.com)"
echo "Try:  curl -A '' -H 'Host: www.example.com' --data-binary '{\"domain\":\"www.example.com\",\"page\":\"/hi\"}' http://127.0.0.1:$nginx_port/analytics/collect"
echo "Logs: $run/nginx/logs/error.log"
if [ "${DEMO_KEEP:-1}" = "1" ] && [ -t 0 ]; then
    echo "Press Ctrl-C to stop nginx and InfluxDB."
    wait
fi
