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
#
# Everything above runs twice in the same run, on the same data: first over the raw points only
# (no rollups: the exact path), then after nginx-conf/influxdb/rollups.influxql was installed
# with the `influx` client as the README says and its daily CQs were backfilled over the data
# (the reports of a range longer than two days then read the daily rollups). The table shows
# both and the ratio raw/rollups; then the numbers of both paths over the same whole days (what
# the rollups change: visits summed over days, the median of daily medians) and the time the
# CQs took to run while the benchmark ran.
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
# Stops InfluxDB and starts it again on the same data and ports (its log is kept, for the
# continuous queries' run times).
restart_influxd() {
    kill "$influxd_pid"
    wait "$influxd_pid" 2>/dev/null || true
    cat "$run/influxdb/influxd.log" >> "$run/influxd-all.log"
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

load=$(cut -d' ' -f1-3 /proc/loadavg)
reports=(summary timeseries pages referrers platforms timezones events realtime domains)
declare -A first median_ms direct count_of view_first view_median
: > "$run/per-statement.tsv"

# measure_pass LABEL [rollups]: every report, then whole dashboard views; results keyed LABEL:NAME.
measure_pass() {
    local label=$1 mode=${2:-} name times start_line url n statements k seen statement straight r
    local s_nginx s_direct direct_sum views i
    echo "==> [$label] each report, period=30d: first call after a restart of InfluxDB, then $repeats more"
    for name in "${reports[@]}"; do
        restart_influxd
        first[$label:$name]=$(get "$(report_url "$name")")
        start_line=$(lines_of)
        times=()
        for _ in $(seq 1 "$repeats"); do times+=("$(get "$(report_url "$name")")"); done
        median_ms[$label:$name]=$(median "${times[@]}")
        # The statements' times of the repeated calls: one call's worth each, in order.
        tail -n +"$(( start_line + 1 ))" "$statements_log" > "$run/statements-$label-$name.log"
        url=$(report_url "$name")
        mapfile -t statements < <("$root/target/release/examples/report_statements" "${url#*\?}" ${mode:+"$mode"})
        n=${#statements[@]}
        count_of[$label:$name]=$n
        if [ $(( n * repeats )) -ne "$(wc -l <"$run/statements-$label-$name.log")" ]; then
            echo "$name: expected $n statements per call in $statements_log" >&2
            exit 1
        fi
        # Per statement: the median time InfluxDB took as seen by nginx, and straight from curl.
        direct_sum=0
        for k in $(seq 1 "$n"); do
            mapfile -t seen < <(awk -v n="$n" -v k="$k" '(NR - k) % n == 0 { print $1 * 1000 }' \
                "$run/statements-$label-$name.log")
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
            direct_sum=$(( direct_sum + s_direct ))
            printf '%s\t%s\t%s\t%s\n' "$label:$name" "$s_nginx" "$s_direct" "$statement" \
                >> "$run/per-statement.tsv"
        done
        direct[$label:$name]=$direct_sum
        printf '  %-10s first %6s ms, repeated %6s ms\n' "$name" "${first[$label:$name]}" \
            "${median_ms[$label:$name]}"
    done

    echo "==> [$label] whole dashboard views (10 requests, at most 6 at a time)"
    restart_influxd
    view_first[$label]=$(dashboard_view "$label-first")
    views=()
    for i in $(seq 1 "$repeats"); do views+=("$(dashboard_view "$label-$i")"); done
    view_median[$label]=$(median "${views[@]}")
    echo "  first ${view_first[$label]} ms, repeated ${views[*]} ms"

    # The same whole days on both paths (no widening): what the rollups change.
    get "$api?report=summary&domain=$domain&$whole_days" "$run/$label-summary.json" >/dev/null
    get "$api?report=pages&domain=$domain&$whole_days&limit=1000" "$run/$label-pages.json" >/dev/null
}
today_s=$(( $(date -u +%s) / 86400 * 86400 ))
whole_days="from=$(date -u -d "@$(( today_s - 30 * 86400 ))" +%FT%TZ)&to=$(date -u -d "@$today_s" +%FT%TZ)"

measure_pass raw

echo "==> installing nginx-conf/influxdb/rollups.influxql and backfilling its daily rollups"
influx -host 127.0.0.1 -port "$influx_port" < "$root/nginx-conf/influxdb/rollups.influxql" >/dev/null
backfill_range="time >= $(( (today_s - 31 * 86400) * 1000000000 )) AND time < $(( (today_s + 86400) * 1000000000 ))"
t0=$(now_ms)
# Each daily CQ's statement and the notes' copy (between BEGIN and END) once, with the data's
# time range.
awk '/^CREATE CONTINUOUS QUERY "cq_[a-z_]*(_1d|_event_note)"/ { on = 1; next }
     on && /^BEGIN/ { body = ""; inside = 1; next }
     on && /^END;/ { print body; on = 0; inside = 0; next }
     inside { sub(/^ +/, " "); body = body $0 }' "$root/nginx-conf/influxdb/rollups.influxql" \
    | sed "s/ WHERE / WHERE $backfill_range AND /; t; s/ GROUP BY time(/ WHERE $backfill_range GROUP BY time(/" \
    > "$run/backfill.influxql"
while IFS= read -r statement; do
    influx_query "$influx_port" "$statement" analytics >/dev/null
done < "$run/backfill.influxql"
backfill_ms=$(( $(now_ms) - t0 ))
echo "  $(wc -l < "$run/backfill.influxql") rollups over $days days in $backfill_ms ms"

measure_pass rollups rollups

echo
echo "Report latency, period=30d, $pageviews page views over $days days (one domain);" \
    "nginx $("$nginx_bin" -v 2>&1 | sed 's/.*nginx\///'), 1 worker; InfluxDB" \
    "$(influxd version 2>/dev/null | awk '{print $2}')," \
    "shard duration ${shard_duration:-7d (default)}; $(nproc) cores, load average before: $load"
fmt='%-20s %8s %10s %11s %9s %11s %11s %6s %9s\n'
# shellcheck disable=SC2059
printf "$fmt" report "raw 1st" "raw again" "statements" "roll 1st" "roll again" "statements" \
    "ratio" "nginx/db"
for name in "${reports[@]}"; do
    ratio=$(awk -v a="${median_ms[raw:$name]}" -v b="${median_ms[rollups:$name]}" \
        'BEGIN { if (b > 0) printf "%.0f", a / b; else print "-" }')
    overhead=$(awk -v a="${median_ms[rollups:$name]}" -v b="${direct[rollups:$name]}" \
        'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }')
    # shellcheck disable=SC2059
    printf "$fmt" "$name" "${first[raw:$name]}" "${median_ms[raw:$name]}" "${count_of[raw:$name]}" \
        "${first[rollups:$name]}" "${median_ms[rollups:$name]}" "${count_of[rollups:$name]}" \
        "$ratio" "$overhead"
done
ratio=$(awk -v a="${view_median[raw]}" -v b="${view_median[rollups]}" \
    'BEGIN { if (b > 0) printf "%.0f", a / b; else print "-" }')
# shellcheck disable=SC2059
printf "$fmt" "dashboard view (10)" "${view_first[raw]}" "${view_median[raw]}" - \
    "${view_first[rollups]}" "${view_median[rollups]}" - "$ratio" -
verdict=missed
[ "${view_median[rollups]}" -le "$target_ms" ] && [ "${view_first[rollups]}" -le "$target_ms" ] \
    && verdict=met
echo "target: a whole 30-day dashboard view in <= $target_ms ms (with the rollups): $verdict"
echo "(ms; again: median of $repeats; statements: InfluxQL statements per report (with rollups:"
echo " the probe included); ratio: raw again / rollups again; nginx/db: report time with rollups"
echo " through nginx / its statements sent straight to InfluxDB with curl)"
echo "backfill of the daily rollups and the notes' copy over $days days: $backfill_ms ms"

echo
echo "The same whole days ($whole_days) on both paths:"
python3 - "$run" <<'PY'
import json, sys
run = sys.argv[1]
raw, roll = (json.load(open(f"{run}/{l}-summary.json")) for l in ("raw", "rollups"))
for key in ("pageviews", "visits", "events", "load_time_ms_median"):
    a, b = raw[key], roll[key]
    diff = "" if not a else f"{(b - a) / a * 100:+.3f} %"
    print(f"  summary {key:<20} raw {a:>12} rollups {b:>12} {diff}")
rp, rr = (json.load(open(f"{run}/{l}-pages.json"))["rows"] for l in ("raw", "rollups"))
exact = {r["key"]: r for r in rp}
worst = max(((r["visits"] - exact[r["key"]]["visits"]) / exact[r["key"]]["visits"], r["key"])
            for r in rr if r["key"] in exact and exact[r["key"]]["visits"])
same_pv = all(exact.get(r["key"], {}).get("pageviews") == r["pageviews"] for r in rr)
tv_raw = sum(r["visits"] for r in rp)
tv_roll = sum(r["visits"] for r in rr)
print(f"  pages: {len(rp)} rows raw, {len(rr)} rollups; page views per page equal: {same_pv};"
      f" visits summed over pages raw {tv_raw}, rollups {tv_roll}"
      f" ({(tv_roll - tv_raw) / tv_raw * 100:+.3f} %); largest per page {worst[0] * 100:+.2f} % ({worst[1]})")
PY

echo
echo "Continuous queries run by InfluxDB during the rollup pass (each recomputes today so far):"
cat "$run/influxd-all.log" "$run/influxdb/influxd.log" \
    | sed -n 's/.*msg="Finished continuous query".* name=\([a-z_0-9]*\) .* duration=\([0-9.]*\)\(m*s\).*/\1 \2 \3/p' \
    | awk '{ ms = ($3 == "s") ? $2 * 1000 : $2; n[$1]++; sum[$1] += ms; if (ms > max[$1]) max[$1] = ms }
           END { for (q in n) printf "  %-28s %3d runs, mean %6.0f ms, max %6.0f ms\n", q, n[q], sum[q] / n[q], max[q] }' \
    | sort
echo
for label in raw rollups; do
    echo "Slowest statements, $label (median ms through nginx, straight to InfluxDB):"
    grep "^$label:" "$run/per-statement.tsv" | sort -t$'\t' -k2,2nr | head -n 10 \
        | sed "s/\"domain\" = '$domain' AND //; s/time >= [0-9]* AND time < [0-9]*/<range>/" \
        | awk -F'\t' '{ printf "  %-18s %6s %6s  %s\n", $1, $2, $3, $4 }'
done
echo
echo "Slowest requests of the last dashboard view with the rollups (ms):"
{
    sed -n 's/^200 \([0-9.]*\) .*report=\([a-z]*\).*/\2 \1/p' "$run/view-rollups-$repeats/parallel.txt" \
        | awk '{ printf "%s %.0f\n", $1, $2 * 1000 }'
    for f in domains timeseries previous; do echo "$f $(cat "$run/view-rollups-$repeats/$f.ms")"; done
} | sort -k2,2nr | awk '{ printf "  %-12s %6s\n", $1, $2 }'
