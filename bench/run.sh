#!/usr/bin/env bash
# Benchmark: ONE run against one nginx (release build) and one real InfluxDB 1.x, with wrk
# (every beacon has its own sess_id, stored with the default `analytics_session field`):
#   sink ceiling  no nginx: the same kind of lines (encoded by the module's core, a new sess per
#                 line) written straight to InfluxDB in 1,000-line writes from 4 connections
#                 (examples/sink_ceiling.rs): what InfluxDB itself takes on this machine. Run
#                 first and again last (drift); every row is also shown as a share of it.
#   floor         location with `return 204`: nginx's own floor for a small POST
#   dry-run       the module with `analytics_write off` (parse, validate, encode; no write)
#   batch off     the module writing every beacon on its own (`analytics_batch off`), wait mode
#   batch on      the module with group commit (default `analytics_batch`), wait mode
#   batch on bg   the same in background mode
#   ceiling tag   the sink ceiling with `sess` as a tag (`analytics_session tag`), 90,000 lines
#                 (under InfluxDB's default max-values-per-tag): what the old schema costs
# The write cases run at -c32 and -c256. For each case: beacons (points) per second, p50/p99
# latency, the writes sent to InfluxDB (counted by an access log on each write location), the
# beacons acknowledged with 204, the points that landed, the share of the sink ceiling, and where
# the CPU went (from /proc/<pid>/stat: nginx workers and influxd; the client's own user+system
# time; the whole machine's busy time from /proc/stat), in % of one core over the case, and the
# RSS of the nginx worker(s) and of influxd after the case.
# Settings: BENCH_DURATION (s per wrk case, default 10), BENCH_CONNECTIONS (write cases,
# default "32 256"), BENCH_THREADS (wrk threads, 2), BENCH_WORKERS (nginx workers, 1),
# BENCH_CEILING_LINES (300000).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
duration=${BENCH_DURATION:-10}
read -r -a write_conns <<<"${BENCH_CONNECTIONS:-32 256}"
threads=${BENCH_THREADS:-2}
workers=${BENCH_WORKERS:-1}
ceiling_lines=${BENCH_CEILING_LINES:-300000}
nginx_port=${BENCH_NGINX_PORT:-18180}
influx_port=${BENCH_INFLUX_PORT:-18186}
influx_rpc_port=${BENCH_INFLUX_RPC_PORT:-18188}

cargo build --release --quiet
cargo build --release --quiet --example sink_ceiling
ceiling_bin="$root/target/release/examples/sink_ceiling"
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
influxd_pid=${pids[-1]}

# The wrk cases: name, location, wrk connections. Write cases get one database and one write
# location each, named after the case.
cases=("floor /floor 32" "dry /dry 32")
write_cases=()
for c in "${write_conns[@]}"; do
    for kind in batch_off batch_on batch_on_bg; do
        cases+=("$kind-c$c /$kind-c$c $c")
        write_cases+=("$kind-c$c")
    done
done
for db in warmup ceiling ceiling_end ceiling_tag "${write_cases[@]}"; do
    influx_query "$influx_port" "CREATE DATABASE \"$db\"" >/dev/null
done

# One endpoint and one write location per write case; each write location logs its writes
# (subrequests) to its own file.
write_case_locations() {
    local name=$1 extra
    case $name in
        batch_off-*) extra="analytics_batch off;" ;;
        batch_on_bg-*) extra="analytics_write_mode background;" ;;
        *) extra="" ;;
    esac
    cat <<LOC
        location = /$name { analytics; analytics_write /_write/$name; $extra }
        location = /_write/$name {
            internal;
            proxy_pass http://influxdb/write?db=$name&precision=ns;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_pass_request_headers off;
            proxy_ignore_client_abort on;
            log_subrequest on;
            access_log logs/writes-$name.log writes;
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
        listen 127.0.0.1:$nginx_port backlog=4096;
        server_name www.example.com;
        permitted_events socialclick;
        location = /floor { return 204; }
        location = /dry { analytics; analytics_write off; }
$(write_case_locations warmup)
$(for name in "${write_cases[@]}"; do write_case_locations "$name"; done)
    }
}
CONF
start_nginx "$nginx_bin" "$run/nginx" "http://127.0.0.1:$nginx_port/floor"


nginx_workers() { pgrep -P "$(cat "$run/nginx/logs/nginx.pid")"; }
# CPU time (utime + stime, in clock ticks) of the given pids, from /proc/<pid>/stat.
cpu_ticks() {
    local total=0 pid stat
    for pid in "$@"; do
        stat=$(cat "/proc/$pid/stat")
        # Fields after the ")" that ends the command name: utime is the 12th, stime the 13th.
        read -r -a f <<<"${stat##*) }"
        total=$(( total + f[11] + f[12] ))
    done
    echo "$total"
}
rss_kib() {
    local total=0 pid
    for pid in "$@"; do
        total=$(( total + $(awk '/^VmRSS:/ { print $2 }' "/proc/$pid/status") ))
    done
    echo "$total"
}
# Busy ticks of the whole machine (all CPUs: user, nice, system, irq, softirq, steal).
busy_ticks() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9 }' /proc/stat; }
hz=$(getconf CLK_TCK)
now() { date +%s.%N; }
# % of one core: ticks over wall seconds.
pct_ticks() { awk -v t="$1" -v hz="$hz" -v s="$2" 'BEGIN { printf "%.0f%%", 100 * t / hz / s }'; }
pct_secs() { awk -v c="$1" -v s="$2" 'BEGIN { printf "%.0f%%", 100 * c / s }'; }

declare -A rate p50 p99 acked errors writes landed nginx_cpu influx_cpu client_cpu busy \
    nginx_rss influx_rss
TIMEFORMAT='%3U %3S'

# Measures one wrk case: run_wrk NAME PATH CONNECTIONS
run_wrk() {
    local name=$1 path=$2 conns=$3 out=$run/wrk-$1.out times=$run/wrk-$1.time
    local workers_now t0 t1 n0 n1 i0 i1 b0 b1
    read -r -a workers_now <<<"$(nginx_workers | tr '\n' ' ')"
    n0=$(cpu_ticks "${workers_now[@]}") i0=$(cpu_ticks "$influxd_pid") b0=$(busy_ticks) t0=$(now)
    { time wrk -t"$threads" -c"$conns" -d"${duration}s" --latency -s "$root/bench/beacon.lua" \
        "http://127.0.0.1:$nginx_port$path" >"$out" ; } 2>"$times"
    t1=$(now) n1=$(cpu_ticks "${workers_now[@]}") i1=$(cpu_ticks "$influxd_pid") b1=$(busy_ticks)
    local secs total non2xx
    secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')
    rate[$name]=$(awk '/^Requests\/sec:/ { printf "%.0f", $2 }' "$out")
    p50[$name]=$(to_ms "$(awk '$1 == "50%" { print $2 }' "$out")")
    p99[$name]=$(to_ms "$(awk '$1 == "99%" { print $2 }' "$out")")
    total=$(awk '/requests in/ { print $1 }' "$out")
    non2xx=$(awk '/Non-2xx/ { print $NF }' "$out")
    acked[$name]=$(( total - ${non2xx:-0} ))
    errors[$name]=$(awk '/Socket errors/ { gsub(",", ""); print $4 + $6 + $8 + $10 }' "$out")
    errors[$name]=$(( ${errors[$name]:-0} + ${non2xx:-0} ))
    nginx_cpu[$name]=$(pct_ticks $(( n1 - n0 )) "$secs")
    influx_cpu[$name]=$(pct_ticks $(( i1 - i0 )) "$secs")
    client_cpu[$name]=$(pct_secs "$(awk 'END { print $1 + $2 }' "$times")" "$secs")
    busy[$name]=$(pct_ticks $(( b1 - b0 )) "$secs")
    nginx_rss[$name]=$(rss_kib "${workers_now[@]}")
    influx_rss[$name]=$(rss_kib "$influxd_pid")
}

# Measures the sink ceiling: run_ceiling NAME DATABASE [sink_ceiling options...]. The tool
# measures its own and influxd's CPU over its writes (not over the encoding before them).
run_ceiling() {
    local name=$1 db=$2 out=$run/ceiling-$1.out
    shift 2
    local workers_now t0 t1 n0 n1
    read -r -a workers_now <<<"$(nginx_workers | tr '\n' ' ')"
    n0=$(cpu_ticks "${workers_now[@]}") t0=$(now)
    "$ceiling_bin" "127.0.0.1:$influx_port" "$db" --watch "$influxd_pid" "$@" >"$out"
    t1=$(now) n1=$(cpu_ticks "${workers_now[@]}")
    rate[$name]=$(kv "$out" points_per_s)
    p50[$name]=-
    p99[$name]=-
    writes[$name]=$(kv "$out" writes)
    acked[$name]=$(kv "$out" acked)
    errors[$name]=$(kv "$out" failed)
    landed[$name]=$(points "$db")
    nginx_cpu[$name]=$(pct_ticks $(( n1 - n0 )) "$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')")
    influx_cpu[$name]=$(kv "$out" watched_cpu)
    client_cpu[$name]=$(kv "$out" own_cpu)
    busy[$name]=$(kv "$out" machine_busy)
    nginx_rss[$name]=$(rss_kib "${workers_now[@]}")
    influx_rss[$name]=$(rss_kib "$influxd_pid")
}
# kv FILE KEY: the value of KEY in a line of key=value pairs.
kv() { tr ' ' '\n' <"$1" | sed -n "s/^$2=//p"; }

points() {
    influx_query "$influx_port" 'SELECT count("counter") FROM "pf_analytics_event"' "$1" \
        | sed -n 's/.*"values":\[\[[^,]*,\([0-9]*\)\]\].*/\1/p'
}

# Warm up connections, upstream keepalive and InfluxDB (its own database, not counted).
wrk -t"$threads" -c32 -d3s -s "$root/bench/beacon.lua" "http://127.0.0.1:$nginx_port/warmup" >/dev/null
sleep 1
rss_start=$(rss_kib $(nginx_workers))

order=(ceiling)
run_ceiling ceiling ceiling --lines "$ceiling_lines" --batch 1000 --connections 4
sleep 1
for spec in "${cases[@]}"; do
    read -r name path conns <<<"$spec"
    run_wrk "$name" "$path" "$conns"
    order+=("$name")
    sleep 1
done
run_ceiling ceiling_end ceiling_end --lines "$ceiling_lines" --batch 1000 --connections 4
sleep 1
run_ceiling ceiling_tag ceiling_tag --lines 90000 --batch 1000 --connections 4 --session tag
order+=(ceiling_end ceiling_tag)

sleep 2 # background writes finish
for name in "${write_cases[@]}"; do
    writes[$name]=$(wc -l <"$run/nginx/logs/writes-$name.log")
    landed[$name]=$(points "$name")
done

declare -A label=([ceiling]="sink ceiling" [ceiling_end]="ceiling (end)"
    [ceiling_tag]="ceiling tag" [floor]=floor [dry]=dry-run)
declare -A conns_of=([ceiling]=4 [ceiling_end]=4 [ceiling_tag]=4 [floor]=32 [dry]=32)
for name in "${write_cases[@]}"; do
    kind=${name%-c*}
    label[$name]=${kind//_/ }
    conns_of[$name]=${name##*-c}
done

echo "wrk -t$threads -d${duration}s; nginx: $workers worker(s); $(nproc) cores;" \
    "InfluxDB $(influxd version 2>/dev/null | awk '{print $2}'); a new sess_id per beacon" \
    "(analytics_session field)"
fmt='%-14s %5s %9s %8s %8s %7s %9s %9s %6s %6s %7s %6s %6s %6s %9s %10s\n'
# shellcheck disable=SC2059
printf "$fmt" case conns "points/s" "p50 ms" "p99 ms" writes "204s" landed "%ceil" \
    nginx influxd client sum busy "nginx KiB" "influx MiB"
ceiling=${rate[ceiling]}
missing=()
for name in "${order[@]}"; do
    pct=$(awk -v a="${rate[$name]}" -v b="$ceiling" 'BEGIN { printf "%.0f%%", 100 * a / b }')
    cpu_total=$(awk -v a="${nginx_cpu[$name]}" -v b="${influx_cpu[$name]}" \
        -v c="${client_cpu[$name]}" 'BEGIN { printf "%.0f%%", a + b + c }')
    # shellcheck disable=SC2059
    printf "$fmt" "${label[$name]}" "${conns_of[$name]}" "${rate[$name]}" "${p50[$name]}" \
        "${p99[$name]}" "${writes[$name]:--}" "${acked[$name]}" "${landed[$name]:--}" "$pct" \
        "${nginx_cpu[$name]}" "${influx_cpu[$name]}" "${client_cpu[$name]}" "$cpu_total" \
        "${busy[$name]}" \
        "${nginx_rss[$name]}" "$(( ${influx_rss[$name]} / 1024 ))"
    if [ -n "${landed[$name]:-}" ] && [ "${landed[$name]}" -lt "${acked[$name]}" ]; then
        missing+=("$name")
    fi
done
for name in "${order[@]}"; do
    if [ "${errors[$name]:-0}" -gt 0 ]; then
        echo "note: ${label[$name]} (${conns_of[$name]}): ${errors[$name]} error(s) (non-2xx or socket)"
    fi
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "landed >= acknowledged in every case"
else
    echo "ACKNOWLEDGED BUT NOT LANDED in: ${missing[*]}"
fi
speedup=$(awk -v a="${rate[batch_on-c32]:-0}" -v b="${rate[batch_off-c32]:-1}" \
    'BEGIN { printf "%.1f", a / b }')
echo "batch on / batch off at -c32: ${speedup}x; nginx worker RSS after warm-up ${rss_start} KiB"
echo "(points/s: beacons answered per second, or points written per second for the ceilings;"
echo " 204s: answers wrk received, or lines in acknowledged writes; a request in flight when wrk"
echo " stops may land without being counted, so landed may exceed 204s by up to the connections;"
echo " nginx/influxd/client: CPU in % of one core during the case, sum: of the three; busy: the"
echo " whole machine, out of $(( $(nproc) * 100 ))%, kernel network work and other processes included)"
