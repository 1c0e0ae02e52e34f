#!/usr/bin/env bash
# Report benchmark: how long the report API and a whole dashboard view take on a large site.
#
# Writes BENCH_PAGEVIEWS (1,000,000) synthetic page views and their events over the last
# BENCH_DAYS (30) days for one domain straight to a fresh InfluxDB 1.x (examples/synthetic.rs:
# encoded by the module's own core, in a temp dir on free loopback ports), then starts nginx
# (release build, one worker) with a report location and measures, for period=30d:
#
#   each report   summary, timeseries, pages, referrers, platforms, timezones, events, realtime,
#                 domains: the first call after InfluxDB was restarted (nothing of the data in
#                 its memory but what it loads at start), then the median of BENCH_REPEATS (3)
#                 further calls;
#   dashboard     one view of dashboard/dashboard.html, as the browser makes it: `domains`
#                 first, then `realtime`, `summary`, `timeseries` and the five tables at once, and
#                 the previous period's `timeseries` (from=/to= computed from the first series,
#                 as the page does) as soon as the first one has arrived; at most 6 requests at a
#                 time (Chromium's connections per host over HTTP/1.1). Wall time from the first
#                 request to the last answer; first after a restart of InfluxDB, then the median
#                 of BENCH_REPEATS views.
#
# Where the time goes: the query location logs InfluxDB's answer time for every statement the
# module sends ($upstream_response_time; the statements of one report run one after the other),
# and the same statements (made by the module's core: examples/report_statements.rs) are then
# sent straight to InfluxDB with curl, no nginx, as the baseline of the same run. The script prints, per
# report, the report's time through nginx, the sum of its statements' times seen by nginx, the
# same statements straight to InfluxDB, and the ratio nginx/direct; and each statement's time.
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
root=$(pwd)
pageviews=${BENCH_PAGEVIEWS:-1000000}
days=${BENCH_DAYS:-30}
repeats=${BENCH_REPEATS:-3}
seed=${BENCH_SEED:-1}
domain=bench.example.com
target_ms=1000

cargo build --release --quiet
cargo build --release --quiet --example synthetic --example report_statements
# shellcheck source=scripts/lib.sh
. "$root/scripts/lib.sh"
nginx_bin=$(release_nginx)

run=$(mktemp -d)
cleanup() {
    stop_all
    if [ -n "${BENCH_KEEP_DIR:-}" ]; then echo "kept $run"; else rm -rf "$run"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
mkdir -p "$run/nginx/logs"

influx_port=$(free_port)
influx_rpc_port=$(free_port "$influx_port")
nginx_port=$(free_port "$influx_port" "$influx_rpc_port")

start_influxd "$run/influxdb" "$influx_port" "$influx_rpc_port"
influxd_pid=${pids[-1]}
# BENCH_SHARD_DURATION (e.g. 52w) creates the database with longer shards than InfluxDB's
# default (7 days for a policy that keeps data forever): a 30-day query then reads fewer shards.
shard_duration=${BENCH_SHARD_DURATION:-}
influx_query "$influx_port" "CREATE DATABASE analytics${shard_duration:+ WITH DURATION INF \
SHARD DURATION $shard_duration NAME autogen}" >/dev/null

# CPU ticks (utime + stime) of a process, from /proc/<pid>/stat.
cpu_ticks() {
    local f
    read -r -a f <<<"$(sed 's/.*) //' "/proc/$1/stat")"
    echo $(( f[11] + f[12] ))
}
# Waits (up to 3 minutes) until influxd used under 5 % of a core over 2 s: compactions after
# the bulk write are done.
wait_idle() {
    local a b hz
    hz=$(getconf CLK_TCK)
    for _ in $(seq 1 90); do
        a=$(cpu_ticks "$influxd_pid")
        sleep 2
        b=$(cpu_ticks "$influxd_pid")
        [ $(( (b - a) * 100 )) -lt $(( hz * 2 * 5 )) ] && return 0
    done
}
# Stops InfluxDB and starts it again on the same data and ports.
restart_influxd() {
    kill "$influxd_pid"
    wait "$influxd_pid" 2>/dev/null || true
    start_influxd "$run/influxdb" "$influx_port" "$influx_rpc_port"
    influxd_pid=${pids[-1]}
    wait_idle
}

echo "==> writing $pageviews synthetic page views over $days days for $domain"
t0=$(date +%s%N)
"$root/target/release/examples/synthetic" "127.0.0.1:$influx_port" analytics --domain "$domain" \
    --pageviews "$pageviews" --days "$days" --seed "$seed" --batch 5000 --connections 2 \
    | sed 's/^/  /'
t1=$(date +%s%N)
echo "  $(( (t1 - t0) / 1000000 )) ms; waiting for InfluxDB's compactions to finish"
wait_idle

cat > "$run/nginx/nginx.conf" <<CONF
load_module $module;
daemon off;
master_process on;
worker_processes 1;
error_log logs/error.log warn;
pid logs/nginx.pid;
user root;
events { worker_connections 1024; }
http {
    access_log off;
    client_body_temp_path client_body_temp;
    proxy_temp_path proxy_temp;
    # Not \$request_body: subrequests share their parent's variable cache, so it would show
    # the first statement's body on every line.
    log_format statement '\$upstream_response_time';
    upstream influxdb {
        server 127.0.0.1:$influx_port;
        keepalive 16;
    }
    server {
        listen 127.0.0.1:$nginx_port;
        server_name bench;
        location = /analytics/report { analytics_report; }
        location = /_analytics/query {
            internal;
            proxy_pass http://influxdb/query?db=analytics;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_pass_request_headers off;
            proxy_set_header Content-Type application/x-www-form-urlencoded;
            proxy_read_timeout 120s;
            log_subrequest on;
            access_log logs/statements.log statement;
        }
    }
}
CONF
start_nginx "$nginx_bin" "$run/nginx" "http://127.0.0.1:$nginx_port/analytics/report?report=domains"
statements_log=$run/nginx/logs/statements.log
api="http://127.0.0.1:$nginx_port/analytics/report"

# get URL [OUT]: one GET; prints its time in ms; fails unless the answer is 200.
get() {
    local out=${2:-/dev/null} result
    result=$(curl -s -o "$out" -w '%{http_code} %{time_total}' "$1")
    [ "${result%% *}" = 200 ] || { echo "GET $1 answered ${result%% *}" >&2; return 1; }
    awk -v s="${result#* }" 'BEGIN { printf "%.0f", s * 1000 }'
}
# median of the numbers given.
median() { printf '%s\n' "$@" | sort -n | awk '{ v[NR] = $1 } END { m = int((NR + 1) / 2); print (NR % 2) ? v[m] : int((v[m] + v[m + 1]) / 2 + 0.5) }'; }
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
lines_of() { wc -l <"$statements_log"; }

report_url() {
    if [ "$1" = domains ]; then echo "$api?report=domains"
    else echo "$api?report=$1&domain=$domain&period=30d"; fi
}

load=$(cut -d' ' -f1-3 /proc/loadavg)
reports=(summary timeseries pages referrers platforms timezones events realtime domains)
declare -A first median_ms via_nginx direct count_of
echo "==> each report, period=30d: first call after a restart of InfluxDB, then $repeats more"
for name in "${reports[@]}"; do
    restart_influxd
    first[$name]=$(get "$(report_url "$name")")
    start_line=$(lines_of)
    times=()
    for _ in $(seq 1 "$repeats"); do times+=("$(get "$(report_url "$name")")"); done
    median_ms[$name]=$(median "${times[@]}")
    # The statements' times of the repeated calls: one call's worth each, in order.
    tail -n +"$(( start_line + 1 ))" "$statements_log" > "$run/statements-$name.log"
    url=$(report_url "$name")
    mapfile -t statements < <("$root/target/release/examples/report_statements" "${url#*\?}")
    n=${#statements[@]}
    count_of[$name]=$n
    if [ $(( n * repeats )) -ne "$(wc -l <"$run/statements-$name.log")" ]; then
        echo "$name: expected $n statements per call in $statements_log" >&2
        exit 1
    fi
    # Per statement: the median time InfluxDB took as seen by nginx, and straight from curl.
    nginx_sum=0 direct_sum=0
    for k in $(seq 1 "$n"); do
        mapfile -t seen < <(awk -v n="$n" -v k="$k" '(NR - k) % n == 0 { print $1 * 1000 }' \
            "$run/statements-$name.log")
        statement=${statements[k - 1]}
        straight=()
        for _ in $(seq 1 "$repeats"); do
            r=$(curl -s -o /dev/null -w '%{http_code} %{time_total}' \
                --data-urlencode "q=$statement" --data-urlencode epoch=ms \
                "http://127.0.0.1:$influx_port/query?db=analytics")
            [ "${r%% *}" = 200 ] || { echo "statement answered ${r%% *}: $statement" >&2; exit 1; }
            straight+=("$(awk -v s="${r#* }" 'BEGIN { printf "%.0f", s * 1000 }')")
        done
        s_nginx=$(median "${seen[@]%.*}")
        s_direct=$(median "${straight[@]}")
        nginx_sum=$(( nginx_sum + s_nginx ))
        direct_sum=$(( direct_sum + s_direct ))
        printf '%s\t%s\t%s\t%s\n' "$name" "$s_nginx" "$s_direct" "$statement" >> "$run/per-statement.tsv"
    done
    via_nginx[$name]=$nginx_sum
    direct[$name]=$direct_sum
    printf '  %-10s first %6s ms, repeated %6s ms\n' "$name" "${first[$name]}" "${median_ms[$name]}"
done

# One dashboard view; prints its wall time in ms. Per-request times go to $run/view-$1.txt.
dashboard_view() {
    local out=$run/view-$1 t0 ts from to
    mkdir -p "$out"
    t0=$(now_ms)
    get "$(report_url domains)" "$out/domains.json" > "$out/domains.ms"
    {
        get "$(report_url timeseries)" "$out/timeseries.json" > "$out/timeseries.ms"
        # As previousRange() in dashboard.html: the series' first point to the end of its last
        # interval, moved back by its own length.
        from=$(grep -o '"time":"[^"]*"' "$out/timeseries.json" | head -n 1 | cut -d'"' -f4)
        to=$(grep -o '"time":"[^"]*"' "$out/timeseries.json" | tail -n 1 | cut -d'"' -f4)
        from=$(date -u -d "$from" +%s) to=$(( $(date -u -d "$to" +%s) + 86400 ))
        ts="$api?report=timeseries&domain=$domain"
        ts="$ts&from=$(date -u -d "@$(( 2 * from - to ))" +%FT%TZ)&to=$(date -u -d "@$from" +%FT%TZ)"
        get "$ts" > "$out/previous.ms"
    } &
    local chain=$!
    local args=()
    for name in realtime summary pages referrers platforms timezones events; do
        args+=(-o /dev/null "$(report_url "$name")")
    done
    curl -s --parallel --parallel-max 5 -w '%{http_code} %{time_total} %{url}\n' "${args[@]}" \
        > "$out/parallel.txt" 2>"$out/curl.err"
    wait "$chain"
    echo $(( $(now_ms) - t0 ))
    if grep -qv '^200 ' "$out/parallel.txt"; then
        echo "a report of the dashboard view failed:" >&2
        cat "$out/parallel.txt" >&2
        return 1
    fi
}

echo "==> whole dashboard views (10 requests, at most 6 at a time)"
restart_influxd
view_first=$(dashboard_view first)
views=()
for i in $(seq 1 "$repeats"); do views+=("$(dashboard_view "$i")"); done
view_median=$(median "${views[@]}")
echo "  first $view_first ms, repeated ${views[*]} ms"

echo
echo "Report latency, period=30d, $pageviews page views over $days days (one domain);" \
    "nginx $("$nginx_bin" -v 2>&1 | sed 's/.*nginx\///'), 1 worker; InfluxDB" \
    "$(influxd version 2>/dev/null | awk '{print $2}')," \
    "shard duration ${shard_duration:-7d (default)}; $(nproc) cores, load average before: $load"
fmt='%-22s %9s %9s %11s %10s %8s %6s\n'
# shellcheck disable=SC2059
printf "$fmt" report "first ms" "again ms" statements "nginx->db" "direct" ratio
for name in "${reports[@]}"; do
    ratio=$(awk -v a="${median_ms[$name]}" -v b="${direct[$name]}" \
        'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }')
    # shellcheck disable=SC2059
    printf "$fmt" "$name" "${first[$name]}" "${median_ms[$name]}" "${count_of[$name]}" \
        "${via_nginx[$name]}" "${direct[$name]}" "$ratio"
done
# shellcheck disable=SC2059
printf "$fmt" "dashboard view (10)" "$view_first" "$view_median" - - - -
verdict=missed
[ "$view_median" -le "$target_ms" ] && [ "$view_first" -le "$target_ms" ] && verdict=met
echo "target: a whole 30-day dashboard view in <= $target_ms ms: $verdict"
echo "(again: median of $repeats; statements: InfluxQL statements per report; nginx->db: their"
echo " summed InfluxDB answer times as nginx saw them; direct: the same statements sent straight"
echo " to InfluxDB with curl; ratio: report time through nginx / direct)"
echo
echo "Slowest statements (median ms through nginx, straight to InfluxDB):"
sort -t$'\t' -k2,2nr "$run/per-statement.tsv" | head -n 12 \
    | sed "s/\"domain\" = '$domain' AND //; s/time >= [0-9]* AND time < [0-9]*/<range>/" \
    | awk -F'\t' '{ printf "  %-10s %6s %6s  %s\n", $1, $2, $3, $4 }'
echo
echo "Slowest requests of the last dashboard view (ms):"
{
    sed -n 's/^200 \([0-9.]*\) .*report=\([a-z]*\).*/\2 \1/p' "$run/view-$repeats/parallel.txt" \
        | awk '{ printf "%s %.0f\n", $1, $2 * 1000 }'
    for f in domains timeseries previous; do echo "$f $(cat "$run/view-$repeats/$f.ms")"; done
} | sort -k2,2nr | awk '{ printf "  %-12s %6s\n", $1, $2 }'
