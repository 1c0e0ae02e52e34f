#!/usr/bin/env bash
# Demo: builds the module and nginx, starts InfluxDB and nginx on loopback, seeds 14 days of
# SYNTHETIC traffic for demo.example.com (examples/synthetic.rs: generated page views and
# events, written straight to InfluxDB; demo data, not real visits), sends the sample beacons,
# prints what InfluxDB stored, and serves the dashboard (behind auth_basic with a demo login
# made here, and allow 127.0.0.1) and a demo page with the browser agent
# (agent/demo/index.html). Everything lives in ./demo-run; stop with Ctrl-C (or run with
# DEMO_KEEP=0 to stop right after printing).
# Settings: DEMO_NGINX_PORT (8080), DEMO_INFLUX_PORT (18086), DEMO_INFLUX_RPC_PORT (18088),
# DEMO_PAGEVIEWS (synthetic page views, 20000), DEMO_DAYS (14), DEMO_SEED (1),
# DEMO_PASSWORD (the dashboard's password for the user "demo"; random by default).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

nginx_port=${DEMO_NGINX_PORT:-8080}
influx_port=${DEMO_INFLUX_PORT:-18086}
influx_rpc_port=${DEMO_INFLUX_RPC_PORT:-18088}
run="$root/demo-run"
demo_domain=demo.example.com
demo_pageviews=${DEMO_PAGEVIEWS:-20000}
demo_days=${DEMO_DAYS:-14}
demo_user=demo
demo_password=${DEMO_PASSWORD:-$(openssl rand -hex 6)}

echo "==> building the module and nginx (release)"
cargo build --release
cargo build --release --example synthetic
# shellcheck source=scripts/lib.sh
. "$root/scripts/lib.sh"
nginx_bin=$(release_nginx)
trap stop_all EXIT
# A signal to this script alone (not only Ctrl-C to the whole process group) stops them too.
trap 'exit 130' INT TERM

rm -rf "$run"
mkdir -p "$run/nginx/logs"

echo "==> starting InfluxDB on 127.0.0.1:$influx_port"
start_influxd "$run/influxdb" "$influx_port" "$influx_rpc_port"
influx_query "$influx_port" "CREATE DATABASE analytics" >/dev/null

echo "==> seeding $demo_domain with $demo_days days of SYNTHETIC demo traffic (generated, not real visits)"
"$root/target/release/examples/synthetic" "127.0.0.1:$influx_port" analytics \
    --domain "$demo_domain" --pageviews "$demo_pageviews" --days "$demo_days" \
    --seed "${DEMO_SEED:-1}" | sed 's/^/  /'

# The dashboard's login: user "demo", password hashed with Apache's MD5 (apr1), which nginx's
# auth_basic reads.
printf '%s:%s\n' "$demo_user" "$(openssl passwd -apr1 "$demo_password")" > "$run/nginx/htpasswd"

echo "==> starting nginx with the module on 127.0.0.1:$nginx_port"
sed -e "s|@MODULE@|$module|" -e "s|@NGINX_PORT@|$nginx_port|" -e "s|@INFLUX_PORT@|$influx_port|" \
    -e "s|@AGENT_DIR@|$root/agent|" -e "s|@HTPASSWD@|$run/nginx/htpasswd|" \
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
sample="WHERE \"domain\" = 'www.example.com'"
echo "==> the sample's page views stored in InfluxDB (SELECT * FROM pf_analytics $sample)"
query "SELECT * FROM \"pf_analytics\" $sample"
echo "==> the sample's events stored in InfluxDB (SELECT * FROM pf_analytics_event $sample)"
query "SELECT * FROM \"pf_analytics_event\" $sample"
echo "==> events per site and name (SELECT sum(counter) FROM pf_analytics_event GROUP BY domain, event)"
query 'SELECT sum("counter") FROM "pf_analytics_event" GROUP BY "domain", "event"'
echo "==> page views and visits per site (SELECT count(counter), COUNT(DISTINCT(sess)) FROM pf_analytics GROUP BY domain)"
query 'SELECT count("counter") AS "pageviews", COUNT(DISTINCT("sess")) AS "visits" FROM "pf_analytics" GROUP BY "domain"'

echo "==> the demo page and the browser agent"
for path in /demo/ /analytics/agent.js; do
    printf '  GET %-20s -> %s\n' "$path" "$(curl -s -o /dev/null \
        -w '%{http_code} %{content_type}, %{size_download} bytes' "http://127.0.0.1:$nginx_port$path")"
done

echo "==> the dashboard and the report API (auth_basic, allow 127.0.0.1)"
printf '  GET %-20s -> %s\n' "/analytics/ (no login)" "$(curl -s -o /dev/null -w '%{http_code}' \
    "http://127.0.0.1:$nginx_port/analytics/")"
printf '  GET %-20s -> %s\n' "/analytics/" "$(curl -s -o /dev/null -u "$demo_user:$demo_password" \
    -w '%{http_code} %{content_type}, %{size_download} bytes' "http://127.0.0.1:$nginx_port/analytics/")"
summary="/analytics/report?report=summary&domain=$demo_domain&period=7d"
printf '  GET %s\n    -> %s\n' "$summary" "$(curl -s -u "$demo_user:$demo_password" \
    -w ' (%{http_code})' "http://127.0.0.1:$nginx_port$summary")"

echo
cat <<MSG
Dashboard:       http://127.0.0.1:$nginx_port/analytics/#domain=$demo_domain&period=7d
  login:         user $demo_user, password $demo_password
  DEMO DATA:     $demo_domain holds $demo_days days of SYNTHETIC traffic made up by
                 examples/synthetic.rs, not real visits; www.example.com holds the sample beacons
                 and 127.0.0.1 what the demo page below sends.
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
