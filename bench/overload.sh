#!/usr/bin/env bash
# Overload benchmark: one nginx worker (release build) with the module in `wait` mode and default
# batching, writing to a real InfluxDB 1.x, under `wrk` with 2,000 connections for 25 s; 5 s in,
# InfluxDB is frozen with SIGSTOP for 10 s (then SIGCONT), so beacons pile up in the worker and
# writes time out (`proxy_read_timeout 5s`, as in nginx-conf/nginx.conf) and answer 502.
# Every beacon has its own sess_id (a new series, as in real traffic).
#
# Each round gets a fresh InfluxDB (its own temp dir and free loopback ports) and a fresh nginx.
# Per round it prints the beacons answered 204 and 502 and the other statuses (499: the client
# left first), counted from an access log with $status on the beacon location; the points that
# landed in InfluxDB; the worker's CPU time (utime+stime from /proc/<pid>/stat) in µs per
# answered (204 or 502) beacon, measured from the start of the load until the worker is idle
# again, and the part of it spent while InfluxDB was frozen (from SIGSTOP to SIGCONT: no write
# can finish then, so this is the cost of holding, parking and timing out beacons); and the
# worker's peak RSS (VmHWM).
#
# With BASELINE_MODULE=/path/to/libngx_http_analytics_module.so (built from an older commit
# against the same vendored nginx) the baseline and the current module run alternately in the
# same run and the script prints the ratios current/baseline, so before and after come from one
# run on one machine state.
#
# Settings: BASELINE_MODULE, OVERLOAD_ROUNDS (rounds per module, 2), OVERLOAD_CONNECTIONS (2000),
# OVERLOAD_THREADS (wrk threads, 2), OVERLOAD_DURATION (s, 25), OVERLOAD_FREEZE_AT (s after the
# load starts, 5), OVERLOAD_FREEZE (s, 10), OVERLOAD_READ_TIMEOUT (proxy_read_timeout, 5s),
# OVERLOAD_BATCH (parameters of `analytics_batch` on the beacon location, e.g. "lines=50";
# unset: the default batching), OVERLOAD_KEEP=1 keeps the temp dir (configs, logs, wrk output).
#
# With the default batching a worker holds up to 4 writes in flight plus the open batch, 1,000
# lines each, before a beacon has to wait for room: 2,000 connections never wait. Smaller
# batches (OVERLOAD_BATCH="lines=50") make most connections wait for room during the freeze
# and under the full load, which exercises the wait queue.
# About 40 s per round.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
rounds=${OVERLOAD_ROUNDS:-2}
connections=${OVERLOAD_CONNECTIONS:-2000}
threads=${OVERLOAD_THREADS:-2}
duration=${OVERLOAD_DURATION:-25}
freeze_at=${OVERLOAD_FREEZE_AT:-5}
freeze=${OVERLOAD_FREEZE:-10}
read_timeout=${OVERLOAD_READ_TIMEOUT:-5s}
batch=${OVERLOAD_BATCH:-}
baseline=${BASELINE_MODULE:-}

for n in "$rounds" "$connections" "$threads" "$duration" "$freeze_at" "$freeze"; do
    [[ $n =~ ^[0-9]+$ ]] || { echo "overload.sh: not a number: $n" >&2; exit 2; }
done
if ! [[ $batch =~ ^[a-z0-9=\ ]*$ ]]; then
    echo "overload.sh: OVERLOAD_BATCH: not analytics_batch parameters: $batch" >&2
    exit 2
fi
if (( freeze_at + freeze >= duration )); then
    echo "overload.sh: the freeze must end before the load does" >&2
    exit 2
fi
if [ -n "$baseline" ] && [ ! -f "$baseline" ]; then
    echo "overload.sh: BASELINE_MODULE not found: $baseline" >&2
    exit 2
fi
for tool in wrk influxd curl ss; do
    command -v "$tool" >/dev/null || { echo "overload.sh: $tool is missing" >&2; exit 2; }
done

# wrk and nginx each need a descriptor per connection (nginx also one per upstream connection).
nofile=$(( connections * 2 + 1024 ))
ulimit -n "$nofile" 2>/dev/null || {
    echo "overload.sh: cannot raise the open-file limit to $nofile (hard limit $(ulimit -Hn))" >&2
    exit 2
}

cargo build --release --quiet
# shellcheck source=scripts/lib.sh
. "$root/scripts/lib.sh"
nginx_bin=$(release_nginx)
# shellcheck disable=SC2154 # module: set by lib.sh
current=$module

run=$(mktemp -d)
frozen=
cleanup() {
    # A stopped InfluxDB would not act on SIGTERM until continued.
    if [ -n "$frozen" ]; then kill -CONT "$frozen" 2>/dev/null || true; fi
    stop_all
    if [ "${OVERLOAD_KEEP:-0}" = 1 ]; then echo "kept: $run" >&2; else rm -rf "$run"; fi
}
trap cleanup EXIT

# A loopback TCP port nobody listens on (and not one of the arguments).
free_port() {
    local port
    while :; do
        port=$(( 20000 + RANDOM % 20000 ))
        [[ " $* " == *" $port "* ]] && continue
        ss -Htln "sport = :$port" | grep -q . || { echo "$port"; return; }
    done
}

# CPU time (utime + stime) of a process in µs.
cpu_us() {
    local stat fields
    stat=$(< "/proc/$1/stat")
    # Fields after the command name, which is in parentheses and may hold spaces.
    read -ra fields <<<"${stat##*) }"
    echo $(( (fields[11] + fields[12]) * 1000000 / $(getconf CLK_TCK) ))
}

points() {
    influx_query "$1" 'SELECT count("counter") FROM "pf_analytics_event"' overload \
        | sed -n 's/.*"values":\[\[[^,]*,\([0-9]*\)\]\].*/\1/p'
}

write_location() {
    cat <<LOC
        location = $1 {
            internal;
            proxy_pass http://influxdb/write?db=$2&precision=ns;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_pass_request_headers off;
            proxy_set_header Content-Type "text/plain; charset=utf-8";
            proxy_ignore_client_abort on;
            proxy_connect_timeout 2s;
            proxy_read_timeout $read_timeout;
        }
LOC
}

# Results per round, indexed by "label:round".
declare -A ok bad other landed cpu fcpu rss
labels=()
rows=()

# run_round LABEL MODULE ROUND
run_round() {
    local label=$1 mod=$2 round=$3 dir="$run/$1-$3"
    local influx_port rpc_port nginx_port influx_pid nginx_pid worker wrk_pid n prev
    local cpu0 cpu1 cpu_f0 cpu_f1
    influx_port=$(free_port)
    rpc_port=$(free_port "$influx_port")
    nginx_port=$(free_port "$influx_port" "$rpc_port")
    mkdir -p "$dir/nginx/logs"

    start_influxd "$dir/influxdb" "$influx_port" "$rpc_port"
    influx_pid=${pids[-1]}
    for db in warmup overload; do
        influx_query "$influx_port" "CREATE DATABASE $db" >/dev/null
    done

    cat > "$dir/nginx/nginx.conf" <<CONF
load_module $mod;
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile $nofile;
error_log logs/error.log warn;
pid logs/nginx.pid;
user root;
events { worker_connections $(( connections + 1024 )); }
http {
    access_log off;
    log_format status '\$status';
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
        location = /warmup { analytics; analytics_write /_write/warmup; }
        location = /beacon {
            analytics;
            analytics_write_mode wait;
            ${batch:+analytics_batch $batch;}
            access_log logs/beacons.log status buffer=64k flush=1s;
        }
$(write_location /_write/warmup warmup)
$(write_location /_analytics/write overload)
    }
}
CONF
    start_nginx "$nginx_bin" "$dir/nginx" "http://127.0.0.1:$nginx_port/ping"
    nginx_pid=${pids[-1]}
    worker=$(pgrep -P "$nginx_pid")
    [[ $worker =~ ^[0-9]+$ ]] || { echo "overload.sh: expected one nginx worker" >&2; return 1; }

    # Warm up connections and upstream keepalive (own database and sink, not counted).
    wrk -t"$threads" -c32 -d2s -s "$root/bench/beacon.lua" "http://127.0.0.1:$nginx_port/warmup" \
        >/dev/null
    sleep 1

    cpu0=$(cpu_us "$worker")
    wrk -t"$threads" -c"$connections" -d"${duration}s" --timeout 60s -s "$root/bench/beacon.lua" \
        "http://127.0.0.1:$nginx_port/beacon" > "$dir/wrk.txt" &
    wrk_pid=$!
    sleep "$freeze_at"
    frozen=$influx_pid
    kill -STOP "$influx_pid"
    cpu_f0=$(cpu_us "$worker")
    sleep "$freeze"
    cpu_f1=$(cpu_us "$worker")
    kill -CONT "$influx_pid"
    frozen=
    wait "$wrk_pid"

    # Until the worker is idle again: the point count stays the same for 2 s (at most 20 s).
    prev=-1
    for _ in $(seq 1 20); do
        sleep 1
        n=$(points "$influx_port")
        n=${n:-0}
        [ "$n" = "$prev" ] && break
        prev=$n
    done
    cpu1=$(cpu_us "$worker")
    rss["$label:$round"]=$(awk '/^VmHWM:/ { print $2 }' "/proc/$worker/status")
    if [ "$(pgrep -P "$nginx_pid")" != "$worker" ]; then
        echo "overload.sh: the nginx worker was replaced during $label round $round" >&2
    fi
    landed["$label:$round"]=$n
    cpu["$label:$round"]=$(( cpu1 - cpu0 ))
    fcpu["$label:$round"]=$(( cpu_f1 - cpu_f0 ))

    # Fast shutdown flushes the access log buffer.
    kill "$nginx_pid" "$influx_pid"
    wait "$nginx_pid" "$influx_pid" 2>/dev/null || true
    pids=()
    ok["$label:$round"]=$(awk '$1 == 204' "$dir/nginx/logs/beacons.log" | wc -l)
    bad["$label:$round"]=$(awk '$1 == 502' "$dir/nginx/logs/beacons.log" | wc -l)
    other["$label:$round"]=$(awk '$1 != 204 && $1 != 502 { c[$1]++ }
        END { for (s in c) { printf "%s%s:%d", sep, s, c[s]; sep = "," }
              if (!length(c)) print "-" }' \
        "$dir/nginx/logs/beacons.log")
    if grep -q 'Socket errors' "$dir/wrk.txt"; then
        echo "($label round $round) wrk: $(grep 'Socket errors' "$dir/wrk.txt" | sed 's/^ *//')"
    fi
    if grep -Eq '\[(alert|emerg|crit)\]|exited on signal' "$dir/nginx/logs/error.log"; then
        echo "($label round $round) nginx error log:" \
            "$(grep -Ec '\[(alert|emerg|crit)\]|exited on signal' "$dir/nginx/logs/error.log")" \
            "alert/crit/emerg lines, e.g.:"
        grep -E '\[(alert|emerg|crit)\]|exited on signal' "$dir/nginx/logs/error.log" | head -n 2
    fi
    rows+=("$label:$round")
}

if [ -n "$baseline" ]; then
    labels=(baseline current)
else
    labels=(current)
fi
for round in $(seq 1 "$rounds"); do
    for label in "${labels[@]}"; do
        if [ "$label" = baseline ]; then mod=$baseline; else mod=$current; fi
        echo "round $round: $label ..." >&2
        run_round "$label" "$mod" "$round"
    done
done

echo
echo "wrk -t$threads -c$connections -d${duration}s; InfluxDB frozen (SIGSTOP) from ${freeze_at} s" \
    "for ${freeze} s; proxy_read_timeout $read_timeout; 1 nginx worker; $(nproc) cores;" \
    "InfluxDB $(influxd version 2>/dev/null | awk '{print $2}'); wait mode," \
    "$(if [ -n "$batch" ]; then echo "analytics_batch $batch"; else echo default batching; fi)"
[ -n "$baseline" ] && echo "baseline: $baseline"
echo "current:  $current"
row() { printf '%-9s %5s %8s %6s %8s %-12s %7s %10s %9s %8s\n' "$@"; }
row module round 204s 502s landed other "CPU ms" "us/beacon" "frozen ms" "RSS KiB"
for key in "${rows[@]}"; do
    answered=$(( ${ok[$key]} + ${bad[$key]} ))
    per=$(awk -v c="${cpu[$key]}" -v a="$answered" \
        'BEGIN { if (a) printf "%.1f", c / a; else print "-" }')
    row "${key%%:*}" "${key##*:}" "${ok[$key]}" "${bad[$key]}" "${landed[$key]}" \
        "${other[$key]}" $(( ${cpu[$key]} / 1000 )) "$per" $(( ${fcpu[$key]} / 1000 )) \
        "${rss[$key]}"
done

# Totals per module over its rounds: counts summed, CPU per beacon = total CPU / total answered,
# RSS the largest peak.
declare -A t_ok t_bad t_landed t_cpu t_fcpu t_rss t_per
for label in "${labels[@]}"; do
    t_ok[$label]=0 t_bad[$label]=0 t_landed[$label]=0 t_cpu[$label]=0 t_fcpu[$label]=0
    t_rss[$label]=0
    for round in $(seq 1 "$rounds"); do
        key="$label:$round"
        t_ok[$label]=$(( ${t_ok[$label]} + ${ok[$key]} ))
        t_bad[$label]=$(( ${t_bad[$label]} + ${bad[$key]} ))
        t_landed[$label]=$(( ${t_landed[$label]} + ${landed[$key]} ))
        t_cpu[$label]=$(( ${t_cpu[$label]} + ${cpu[$key]} ))
        t_fcpu[$label]=$(( ${t_fcpu[$label]} + ${fcpu[$key]} ))
        if (( ${rss[$key]} > ${t_rss[$label]} )); then t_rss[$label]=${rss[$key]}; fi
    done
    t_per[$label]=$(awk -v c="${t_cpu[$label]}" -v a="$(( ${t_ok[$label]} + ${t_bad[$label]} ))" \
        'BEGIN { if (a) printf "%.1f", c / a; else print 0 }')
    row "$label" all "${t_ok[$label]}" "${t_bad[$label]}" "${t_landed[$label]}" "" \
        $(( ${t_cpu[$label]} / 1000 )) "${t_per[$label]}" $(( ${t_fcpu[$label]} / 1000 )) \
        "${t_rss[$label]}"
done

if [ -n "$baseline" ]; then
    ratio() {
        awk -v a="$1" -v b="$2" 'BEGIN { if (b) printf "%.2f", a / b; else print "-" }'
    }
    row ratio c/b "$(ratio "${t_ok[current]}" "${t_ok[baseline]}")" \
        "$(ratio "${t_bad[current]}" "${t_bad[baseline]}")" \
        "$(ratio "${t_landed[current]}" "${t_landed[baseline]}")" "" \
        "$(ratio "${t_cpu[current]}" "${t_cpu[baseline]}")" \
        "$(ratio "${t_per[current]}" "${t_per[baseline]}")" \
        "$(ratio "${t_fcpu[current]}" "${t_fcpu[baseline]}")" \
        "$(ratio "${t_rss[current]}" "${t_rss[baseline]}")"
fi
echo "(204s, 502s, other: statuses in the beacon location's access log (499: the client left"
echo " first); landed: points in InfluxDB once the worker is idle (a write that timed out may"
echo " still be stored when InfluxDB resumes, so landed can exceed 204s); CPU: worker utime+stime"
echo " from the start of the load until idle; us/beacon: CPU per beacon answered 204 or 502;"
echo " frozen ms: worker CPU while InfluxDB was stopped; RSS: worker peak RSS (VmHWM))"
