#!/usr/bin/env bash
# Spool benchmark (issue 10), ONE run against one nginx (release build) and one real InfluxDB 1.x,
# with wrk (every beacon has its own sess_id), everything on loopback:
#   normal  InfluxDB up: beacons/s and p50/p99 in `wait` and `background` mode (the write path)
#   spool   InfluxDB down (influxd killed): the same (every line goes to the disk spool; `wait`
#           answers 204 once its line is fdatasync'ed)
#   drain   InfluxDB down, a third location (background mode) filled with SPOOL_DRAIN_LINES
#           (1,000,000) spooled lines as fast as wrk sends them; then influxd started again
#           (same data, same port) with no beacon arriving: the time until the spool files are
#           empty, and until every spooled line is a point in InfluxDB
# Each location has its own write location (its own sink) and its own spool directory
# (`analytics_spool ... retry=1s`, so a drain starts at most 1 s after InfluxDB is back). The
# spool rows are also shown as ratios against the normal rows measured in the same run. After
# the spool rows InfluxDB comes back and the test checks that every beacon answered 204 landed.
# Settings: SPOOL_DURATION (s per wrk case, 10), SPOOL_CONNECTIONS (32), SPOOL_THREADS (wrk
# threads, 2), SPOOL_WORKERS (nginx workers, 1), SPOOL_DRAIN_LINES (1000000), SPOOL_KEEP=1 keeps
# the temp dir (configs, logs, spool files).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
duration=${SPOOL_DURATION:-10}
conns=${SPOOL_CONNECTIONS:-32}
threads=${SPOOL_THREADS:-2}
workers=${SPOOL_WORKERS:-1}
drain_lines=${SPOOL_DRAIN_LINES:-1000000}
# Bounds: filling the drain spool, and each wait for a drain.
fill_limit=600
drain_limit=900

for n in "$duration" "$conns" "$threads" "$workers" "$drain_lines"; do
    if ! [[ $n =~ ^[0-9]+$ ]] || (( n == 0 )); then
        echo "spool.sh: not a positive number: $n" >&2
        exit 2
    fi
done
for tool in wrk influxd curl; do
    command -v "$tool" >/dev/null || { echo "spool.sh: $tool is missing" >&2; exit 2; }
done

cargo build --release --quiet
# shellcheck source=scripts/lib.sh
. "$root/scripts/lib.sh"
nginx_bin=$(release_nginx)

run=$(mktemp -d)
cleanup() {
    stop_all
    if [ "${SPOOL_KEEP:-0}" = 1 ]; then echo "kept: $run" >&2; else rm -rf "$run"; fi
}
trap cleanup EXIT
mkdir -p "$run/nginx/logs"

influx_port=$(free_port)
rpc_port=$(free_port "$influx_port")
nginx_port=$(free_port "$influx_port" "$rpc_port")

influxd_pid=
influx_up() {
    start_influxd "$run/influxdb" "$influx_port" "$rpc_port"
    influxd_pid=${pids[-1]}
}
influx_down() {
    kill -9 "$influxd_pid"
    wait "$influxd_pid" 2>/dev/null || true
    influxd_pid=
}

influx_up
for db in warmup bench drain; do
    influx_query "$influx_port" "CREATE DATABASE \"$db\"" >/dev/null
done

# endpoint NAME MODE DATABASE [SPOOL_EXTRA]: /NAME in MODE, writing through /_write/NAME to
# DATABASE, spooling to spool-NAME.
endpoint() {
    cat <<LOC
        location = /$1 {
            analytics;
            analytics_write /_write/$1;
            analytics_write_mode $2;
            analytics_spool spool-$1 retry=1s ${4:-};
        }
        location = /_write/$1 {
            internal;
            proxy_pass http://influxdb/write?db=$3&precision=ns;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_pass_request_headers off;
            proxy_ignore_client_abort on;
            proxy_connect_timeout 2s;
            proxy_read_timeout 5s;
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
    client_body_temp_path client_body_temp;
    proxy_temp_path proxy_temp;
    upstream influxdb {
        server 127.0.0.1:$influx_port;
        keepalive 64;
    }
    server {
        listen 127.0.0.1:$nginx_port backlog=4096;
        server_name www.example.com;
        permitted_events socialclick;
        location = /ping { return 204; }
$(endpoint warmup wait warmup)
$(endpoint wait wait bench)
$(endpoint bg background bench)
$(endpoint fill background drain max_size=2g)
    }
}
CONF
start_nginx "$nginx_bin" "$run/nginx" "http://127.0.0.1:$nginx_port/ping"
nginx_pid=${pids[-1]}

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
points() {
    influx_query "$influx_port" 'SELECT count("counter") FROM "pf_analytics_event"' "$1" \
        | sed -n 's/.*"values":\[\[[^,]*,\([0-9]*\)\]\].*/\1/p'
}
# Lines (entries) and bytes in the spool files of directory NAME.
spool_lines() { cat "$run/nginx/spool-$1"/*.spool 2>/dev/null | wc -l; }
spool_bytes() { cat "$run/nginx/spool-$1"/*.spool 2>/dev/null | wc -c; }

declare -A rate p50 p99 acked errors
# run_wrk KEY LOCATION
run_wrk() {
    local key=$1 out=$run/wrk-$1.out total non2xx
    wrk -t"$threads" -c"$conns" -d"${duration}s" --latency -s "$root/bench/beacon.lua" \
        "http://127.0.0.1:$nginx_port/$2" >"$out"
    rate[$key]=$(awk '/^Requests\/sec:/ { printf "%.0f", $2 }' "$out")
    p50[$key]=$(to_ms "$(awk '$1 == "50%" { print $2 }' "$out")")
    p99[$key]=$(to_ms "$(awk '$1 == "99%" { print $2 }' "$out")")
    total=$(awk '/requests in/ { print $1 }' "$out")
    non2xx=$(awk '/Non-2xx/ { print $NF }' "$out")
    acked[$key]=$(( total - ${non2xx:-0} ))
    errors[$key]=$(awk '/Socket errors/ { gsub(",", ""); print $4 + $6 + $8 + $10 }' "$out")
    errors[$key]=$(( ${errors[$key]:-0} + ${non2xx:-0} ))
}

# wait_drained NAME...: until the spool files of every NAME hold no byte (bounded).
wait_drained() {
    local name left
    for _ in $(seq 1 $(( drain_limit * 10 ))); do
        left=0
        for name in "$@"; do left=$(( left + $(spool_bytes "$name") )); done
        [ "$left" = 0 ] && return 0
        sleep 0.1
    done
    echo "spool.sh: the spool of $* did not drain within ${drain_limit}s" >&2
    return 1
}

# Warm up connections, upstream keepalive and InfluxDB (own database, not counted).
wrk -t"$threads" -c"$conns" -d2s -s "$root/bench/beacon.lua" "http://127.0.0.1:$nginx_port/warmup" \
    >/dev/null
sleep 1

echo "normal path (InfluxDB up) ..." >&2
run_wrk normal-wait wait
sleep 1
run_wrk normal-bg bg
sleep 2

echo "spool path (InfluxDB down) ..." >&2
influx_down
run_wrk spool-wait wait
sleep 1
run_wrk spool-bg bg
sleep 2
spooled_wb=$(( $(spool_lines wait) + $(spool_lines bg) ))

echo "InfluxDB back: draining $spooled_wb lines of the spool path ..." >&2
influx_up
t0=$(now)
wait_drained wait bg
drain_wb=$(elapsed "$t0")
sleep 2
acked_bench=$(( ${acked[normal-wait]} + ${acked[normal-bg]} + ${acked[spool-wait]} \
    + ${acked[spool-bg]} ))
landed_bench=$(points bench)

echo "filling the drain spool with $drain_lines lines (InfluxDB down) ..." >&2
influx_down
t0=$(now)
# wrk runs until the spool holds the lines (checked every 0.5 s), then is interrupted (it
# prints its figures on SIGINT); bounded by fill_limit.
wrk -t"$threads" -c"$conns" -d"${fill_limit}s" -s "$root/bench/beacon.lua" \
    "http://127.0.0.1:$nginx_port/fill" >"$run/wrk-fill.out" &
wrk_pid=$!
while kill -0 "$wrk_pid" 2>/dev/null && (( $(spool_lines fill) < drain_lines )); do
    sleep 0.5
done
kill -INT "$wrk_pid" 2>/dev/null || true
wait "$wrk_pid" || true
# Background beacons are answered before their line is in the file: until the count settles.
prev=-1
for _ in $(seq 1 50); do
    n=$(spool_lines fill)
    [ "$n" = "$prev" ] && break
    prev=$n
    sleep 0.2
done
fill_time=$(elapsed "$t0")
spooled=$(spool_lines fill)
spool_size=$(spool_bytes fill)
fill_acked=$(awk '/requests in/ { print $1 }' "$run/wrk-fill.out")

echo "InfluxDB back: draining $spooled lines ..." >&2
influx_up
t0=$(now)
wait_drained fill
drain_empty=$(elapsed "$t0")
landed=0
for _ in $(seq 1 $(( drain_limit ))); do
    landed=$(points drain)
    landed=${landed:-0}
    (( landed >= spooled )) && break
    sleep 1
done
drain_landed=$(elapsed "$t0")

kill "$nginx_pid" 2>/dev/null || true

echo
echo "wrk -t$threads -c$conns -d${duration}s; nginx: $workers worker(s); $(nproc) cores;" \
    "InfluxDB $(influxd version 2>/dev/null | awk '{print $2}'); a new sess_id per beacon;" \
    "InfluxDB down = influxd killed (connection refused)"
fmt='%-22s %10s %8s %8s %9s %9s %7s\n'
# shellcheck disable=SC2059
printf "$fmt" case "beacons/s" "p50 ms" "p99 ms" "x normal" "p99 x" errors
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'; }
for mode in wait bg; do
    for path in normal spool; do
        key=$path-$mode
        label="$path ($( [ "$mode" = wait ] && echo wait || echo background ))"
        # shellcheck disable=SC2059
        printf "$fmt" "$label" "${rate[$key]}" "${p50[$key]}" "${p99[$key]}" \
            "$(ratio "${rate[$key]}" "${rate[normal-$mode]}")" \
            "$(ratio "${p99[$key]}" "${p99[normal-$mode]}")" "${errors[$key]}"
    done
done
echo "spool path: $spooled_wb lines spooled, drained in ${drain_wb} s once InfluxDB was back;" \
    "beacons answered 204 in all four cases: $acked_bench, points stored: ${landed_bench:-0}"
if (( ${landed_bench:-0} < acked_bench )); then
    echo "ANSWERED 204 BUT NOT STORED: $(( acked_bench - ${landed_bench:-0} ))"
fi
fill_rate=$(awk -v n="$spooled" -v s="$fill_time" 'BEGIN { if (s > 0) printf "%.0f", n / s }')
drain_rate=$(awk -v n="$spooled" -v s="$drain_landed" 'BEGIN { if (s > 0) printf "%.0f", n / s }')
echo "drain: $spooled lines ($(( spool_size / 1048576 )) MiB) spooled in ${fill_time} s" \
    "(${fill_rate} lines/s, $fill_acked beacons answered); InfluxDB back: spool files empty" \
    "after ${drain_empty} s, $landed of $spooled points stored after ${drain_landed} s" \
    "(${drain_rate} lines/s)"
if (( landed < spooled )); then
    echo "SPOOLED BUT NOT STORED: $(( spooled - landed ))"
fi
if grep -Eq '\[(alert|emerg|crit)\]|exited on signal' "$run/nginx/logs/error.log"; then
    echo "nginx error log: $(grep -Ec '\[(alert|emerg|crit)\]|exited on signal' \
        "$run/nginx/logs/error.log") alert/crit/emerg lines, e.g.:"
    grep -E '\[(alert|emerg|crit)\]|exited on signal' "$run/nginx/logs/error.log" | head -n 2
fi
echo "(x normal: beacons/s against the normal path of the same mode in this run; p99 x: the"
echo " same for p99; errors: non-2xx answers and socket errors; the drain time counts from"
echo " InfluxDB answering /ping, replays start on the next retry tick, at most 1 s later)"
