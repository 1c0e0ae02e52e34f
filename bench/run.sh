#!/usr/bin/env bash
# Benchmark: ONE run against one nginx (release build) and one real InfluxDB 1.x, with wrk
# (every beacon has its own sess_id, so every point is its own series, as in real traffic):
#   floor        location with `return 204`: nginx's own floor for a small POST
#   dry-run      the module with `analytics_write off` (parse, validate, encode; no write)
#   batch off    the module writing every beacon on its own (`analytics_batch off`), wait mode
#   batch on     the module with group commit (default `analytics_batch`), wait mode
#   batch on bg  the same in background mode (clients do not wait for the write, so batches
#                are not limited by the number of connections)
# It prints req/s, p50/p99 latency, the ratio to the floor, and for the two writing cases the
# writes sent to InfluxDB (counted by an access log on the write location) and the points that
# landed vs the beacons acknowledged with 204.
# Settings: BENCH_DURATION (s, default 10), BENCH_CONNECTIONS (32), BENCH_THREADS (2),
# BENCH_WORKERS (nginx worker processes, 1).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
duration=${BENCH_DURATION:-10}
connections=${BENCH_CONNECTIONS:-32}
threads=${BENCH_THREADS:-2}
workers=${BENCH_WORKERS:-1}
nginx_port=${BENCH_NGINX_PORT:-18180}
influx_port=${BENCH_INFLUX_PORT:-18186}
influx_rpc_port=${BENCH_INFLUX_RPC_PORT:-18188}

cargo build --release --quiet
# shellcheck source=scripts/lib.sh
. "$root/scripts/lib.sh"
nginx_bin=$(release_nginx)

run=$(mktemp -d)
cleanup() {
    stop_all
    rm -rf "$run"
}
trap cleanup EXIT
mkdir -p "$run/nginx/logs"

start_influxd "$run/influxdb" "$influx_port" "$influx_rpc_port"
for db in warmup batch_off batch_on batch_on_bg; do influx_query "$influx_port" "CREATE DATABASE $db" >/dev/null; done

# One write location per database; each logs its writes (subrequests) to its own file.
write_location() {
    cat <<LOC
        location = /_write/$1 {
            internal;
            proxy_pass http://influxdb/write?db=$1&precision=ns;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_pass_request_headers off;
            proxy_ignore_client_abort on;
            log_subrequest on;
            access_log logs/writes-$1.log writes;
        }
LOC
}
cat > "$run/nginx/nginx.conf" <<CONF
load_module $module;
daemon off;
master_process on;
worker_processes $workers;
error_log logs/error.log warn;
pid logs/nginx.pid;
user root;
events { worker_connections 4096; }
http {
    access_log off;
    log_format writes '\$status';
    client_body_temp_path client_body_temp;
    proxy_temp_path proxy_temp;
    upstream influxdb {
        server 127.0.0.1:$influx_port;
        keepalive 64;
    }
    server {
        listen 127.0.0.1:$nginx_port;
        server_name www.example.com;
        permitted_events socialclick;
        location = /floor { return 204; }
        location = /dry { analytics; analytics_write off; }
        location = /warmup { analytics; analytics_write /_write/warmup; }
        location = /batch_off { analytics; analytics_write /_write/batch_off; analytics_batch off; }
        location = /batch_on { analytics; analytics_write /_write/batch_on; }
        location = /batch_on_bg {
            analytics; analytics_write /_write/batch_on_bg; analytics_write_mode background;
        }
$(write_location warmup)
$(write_location batch_off)
$(write_location batch_on)
$(write_location batch_on_bg)
    }
}
CONF
start_nginx "$nginx_bin" "$run/nginx" "http://127.0.0.1:$nginx_port/floor"

# Every request carries a new sess_id: thread number and a per-thread counter.
cat > "$run/beacon.lua" <<'LUA'
local threads = 0
function setup(thread)
    threads = threads + 1
    thread:set("id", threads)
end
function init(args)
    n = 0
    wrk.headers["Host"] = "www.example.com"
    wrk.headers["Content-Type"] = "text/plain;charset=UTF-8"
end
function request()
    n = n + 1
    local body = '{"domain":"www.example.com","page":"/posts/blog/general/share-buttons.html",'
        .. '"timezone":-60,"platform":"Linux x86_64","sess_id":"' .. id .. '-' .. n .. '",'
        .. '"event":"socialclick","note":"mastodon"}'
    return wrk.format("POST", nil, nil, body)
end
LUA

# wrk's latency figure in ms ("812.00us", "1.23ms", "1.01s").
to_ms() {
    awk -v v="$1" 'BEGIN {
        if (v ~ /us$/) { sub(/us$/, "", v); printf "%.2f", v / 1000 }
        else if (v ~ /ms$/) { sub(/ms$/, "", v); printf "%.2f", v }
        else if (v ~ /s$/) { sub(/s$/, "", v); printf "%.2f", v * 1000 }
        else { print v } }'
}

# Warm up connections, upstream keepalive and InfluxDB (its own database, not counted).
wrk -t"$threads" -c"$connections" -d3s -s "$run/beacon.lua" "http://127.0.0.1:$nginx_port/warmup" >/dev/null
sleep 1

# Resident memory of the nginx worker(s), in KiB.
worker_rss() {
    local total=0 pid
    for pid in $(pgrep -P "$(cat "$run/nginx/logs/nginx.pid")"); do
        total=$(( total + $(awk '/^VmRSS:/ { print $2 }' "/proc/$pid/status") ))
    done
    echo "$total"
}

declare -A rps p50 p99 total non2xx rss
rss_start=$(worker_rss)
cases=(floor dry batch_off batch_on batch_on_bg)
for case in "${cases[@]}"; do
    out=$(wrk -t"$threads" -c"$connections" -d"${duration}s" --latency -s "$run/beacon.lua" \
        "http://127.0.0.1:$nginx_port/$case")
    rps[$case]=$(awk '/^Requests\/sec:/ { print $2 }' <<<"$out")
    p50[$case]=$(to_ms "$(awk '$1 == "50%" { print $2 }' <<<"$out")")
    p99[$case]=$(to_ms "$(awk '$1 == "99%" { print $2 }' <<<"$out")")
    total[$case]=$(awk '/requests in/ { print $1 }' <<<"$out")
    non2xx[$case]=$(awk '/Non-2xx/ { print $NF }' <<<"$out")
    non2xx[$case]=${non2xx[$case]:-0}
    rss[$case]=$(worker_rss)
    sleep 1
done

points() {
    influx_query "$influx_port" 'SELECT count("counter") FROM "pf_analytics_event"' "$1" \
        | sed -n 's/.*"values":\[\[[^,]*,\([0-9]*\)\]\].*/\1/p'
}

echo "wrk -t$threads -c$connections -d${duration}s; nginx: $workers worker(s); $(nproc) cores;" \
    "InfluxDB $(influxd version 2>/dev/null | awk '{print $2}'); a new sess_id per beacon"
printf '%-12s %10s %8s %8s %9s %8s %9s %9s %9s\n' \
    case "req/s" "p50 ms" "p99 ms" "vs floor" writes "204s" landed "RSS KiB"
for case in "${cases[@]}"; do
    ratio=$(awk -v a="${rps[$case]}" -v b="${rps[floor]}" 'BEGIN { printf "%.2f", a / b }')
    acked=$(( ${total[$case]} - ${non2xx[$case]} ))
    writes=- landed=-
    if [ -f "$run/nginx/logs/writes-$case.log" ]; then
        writes=$(wc -l < "$run/nginx/logs/writes-$case.log")
        landed=$(points "$case")
    fi
    printf '%-12s %10s %8s %8s %9s %8s %9s %9s %9s\n' "$case" "${rps[$case]}" "${p50[$case]}" \
        "${p99[$case]}" "$ratio" "$writes" "$acked" "${landed:-0}" "${rss[$case]}"
done
speedup=$(awk -v a="${rps[batch_on]}" -v b="${rps[batch_off]}" 'BEGIN { printf "%.1f", a / b }')
echo "batch on / batch off: ${speedup}x; worker RSS after warm-up ${rss_start} KiB"
echo "(204s: answers wrk received; a request in flight when wrk stops may land without being counted;"
echo " in background mode a 204 is sent before the write, so landed may trail 204s by the last batch)"
