#!/usr/bin/env bash
# Benchmark: in ONE run, measures with wrk against one nginx (1 worker, release build):
#   floor      location with `return 204` (nginx's own floor for a small POST)
#   dry-run    the module with `analytics_write off` (parse, validate, encode; no write)
#   influxdb   the module writing every beacon to a real InfluxDB (wait mode)
# and prints req/s, p50/p99 latency and the ratio to the floor; for the InfluxDB case also the
# beacons acknowledged with 204 and the points that landed.
# Settings: BENCH_DURATION (s, default 10), BENCH_CONNECTIONS (default 32), BENCH_THREADS (2).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
duration=${BENCH_DURATION:-10}
connections=${BENCH_CONNECTIONS:-32}
threads=${BENCH_THREADS:-2}
nginx_port=${BENCH_NGINX_PORT:-18180}
influx_port=${BENCH_INFLUX_PORT:-18186}
influx_rpc_port=${BENCH_INFLUX_RPC_PORT:-18188}

cargo build --release --quiet
module="$root/target/release/libngx_http_analytics_module.so"
nginx_bin=$(ls -t "$root"/target/release/build/nginx-sys-*/out/objs/nginx | head -n 1)

run=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$run"
}
trap cleanup EXIT
mkdir -p "$run/influxdb" "$run/nginx/logs"

cat > "$run/influxdb/influxdb.conf" <<CONF
reporting-disabled = true
bind-address = "127.0.0.1:$influx_rpc_port"
[meta]
  dir = "$run/influxdb/meta"
[data]
  dir = "$run/influxdb/data"
  wal-dir = "$run/influxdb/wal"
  query-log-enabled = false
[http]
  bind-address = "127.0.0.1:$influx_port"
  log-enabled = false
[monitor]
  store-enabled = false
CONF
influxd -config "$run/influxdb/influxdb.conf" > "$run/influxdb/influxd.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do
    curl -fs "http://127.0.0.1:$influx_port/ping" >/dev/null && break
    sleep 0.2
done
curl -fsS -XPOST "http://127.0.0.1:$influx_port/query" --data-urlencode "q=CREATE DATABASE bench" >/dev/null

cat > "$run/nginx/nginx.conf" <<CONF
load_module $module;
daemon off;
master_process on;
worker_processes 1;
error_log logs/error.log warn;
pid logs/nginx.pid;
user root;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path client_body_temp;
    proxy_temp_path proxy_temp;
    upstream influxdb {
        server 127.0.0.1:$influx_port;
        keepalive 32;
    }
    server {
        listen 127.0.0.1:$nginx_port;
        server_name www.example.com;
        permitted_events socialclick;
        location = /floor { return 204; }
        location = /dry { analytics; analytics_write off; }
        location = /collect { analytics; }
        location = /_analytics/write {
            internal;
            proxy_pass http://influxdb/write?db=bench&precision=ns;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_pass_request_headers off;
            proxy_ignore_client_abort on;
        }
    }
}
CONF
"$nginx_bin" -p "$run/nginx/" -c "$run/nginx/nginx.conf" &
pids+=($!)
for _ in $(seq 1 100); do
    curl -s -o /dev/null "http://127.0.0.1:$nginx_port/floor" && break
    sleep 0.1
done

cat > "$run/beacon.lua" <<'LUA'
wrk.method = "POST"
wrk.headers["Host"] = "www.example.com"
wrk.headers["Content-Type"] = "text/plain;charset=UTF-8"
wrk.body = '{"domain":"www.example.com","page":"/posts/blog/general/share-buttons.html",'
    .. '"timezone":-60,"platform":"Linux x86_64","sess_id":"07ab-8022",'
    .. '"event":"socialclick","note":"mastodon"}'
LUA

# wrk's latency figure in ms ("812.00us", "1.23ms", "1.01s").
to_ms() {
    awk -v v="$1" 'BEGIN {
        if (v ~ /us$/) { sub(/us$/, "", v); printf "%.3f", v / 1000 }
        else if (v ~ /ms$/) { sub(/ms$/, "", v); printf "%.3f", v }
        else if (v ~ /s$/) { sub(/s$/, "", v); printf "%.3f", v * 1000 }
        else { print v } }'
}

declare -A rps p50 p99 total non2xx
for case in floor dry collect; do
    # Warm up (connections, upstream keepalive), then measure.
    wrk -t"$threads" -c"$connections" -d2s -s "$run/beacon.lua" "http://127.0.0.1:$nginx_port/$case" >/dev/null
    if [ "$case" = collect ]; then
        curl -fsS -XPOST "http://127.0.0.1:$influx_port/query" \
            --data-urlencode "q=DROP SERIES FROM pf_analytics_event" --data-urlencode "db=bench" >/dev/null
    fi
    out=$(wrk -t"$threads" -c"$connections" -d"${duration}s" --latency -s "$run/beacon.lua" \
        "http://127.0.0.1:$nginx_port/$case")
    rps[$case]=$(awk '/^Requests\/sec:/ { print $2 }' <<<"$out")
    p50[$case]=$(to_ms "$(awk '$1 == "50%" { print $2 }' <<<"$out")")
    p99[$case]=$(to_ms "$(awk '$1 == "99%" { print $2 }' <<<"$out")")
    total[$case]=$(awk '/requests in/ { print $1 }' <<<"$out")
    non2xx[$case]=$(awk '/Non-2xx/ { print $NF }' <<<"$out")
    non2xx[$case]=${non2xx[$case]:-0}
done

landed=$(curl -fsS -G "http://127.0.0.1:$influx_port/query" --data-urlencode "db=bench" \
    --data-urlencode 'q=SELECT count("counter") FROM "pf_analytics_event"' \
    | sed -n 's/.*"values":\[\[[^,]*,\([0-9]*\)\]\].*/\1/p')

echo "wrk -t$threads -c$connections -d${duration}s, one nginx worker, $(nproc) cores"
printf '%-10s %12s %10s %10s %10s\n' case "req/s" "p50 ms" "p99 ms" "vs floor"
for case in floor dry collect; do
    ratio=$(awk -v a="${rps[$case]}" -v b="${rps[floor]}" 'BEGIN { printf "%.2f", a / b }')
    printf '%-10s %12s %10s %10s %10s\n' "$case" "${rps[$case]}" "${p50[$case]}" "${p99[$case]}" "$ratio"
done
acked=$(( ${total[collect]} - ${non2xx[collect]} ))
echo "influxdb case: ${total[collect]} answered, $acked acknowledged with 204, ${landed:-0} points landed"
echo "(the 2 s warm-up before each case is not counted; its points were dropped before measuring)"
