#!/usr/bin/env bash
# Hot-path benchmark: user CPU of the nginx worker per request, read from /proc/<pid>/stat,
# for the module's dry path (`analytics_write off`: read the body, parse, validate, encode, no
# write) against nginx's own floor (`return 204`), with the same request (a browser's headers and
# a 150-byte event beacon) in every case. One nginx with one worker pinned to CPU 0, wrk pinned
# to CPU 1 when there are two CPUs. Cases, run in alternating rounds (so a busy machine hits all
# of them alike) and reported as medians:
#   floor           `return 204`
#   dry             dry path, `analytics_drop_bots off`, browser user agent
#   dry+bots        dry path, `analytics_drop_bots on`, browser user agent (the common case)
#   dry bot-ua      dry path, `analytics_drop_bots off`, crawler user agent (fully validated)
#   dry+bots bot-ua dry path, `analytics_drop_bots on`, crawler user agent (dropped as a bot)
#   dry many-ua     dry path, `analytics_drop_bots off`, 4,096 different browser user agents in
#                   turn (from tests/fixtures/isbot/browsers-sample.txt)
#   dry+bots many-ua  the same with `analytics_drop_bots on`: bot detection when the worker's
#                   cache of recent verdicts (256 user agents) misses
#   dry random-ua   dry path, `analytics_drop_bots off`, a new random 150-character user agent
#                   per request (what a client can make bot detection cost)
#   dry+bots random-ua  the same with `analytics_drop_bots on`
#   dry nozone      dry path as `dry`, in a second nginx with `analytics_metrics_zone off`
#                   (every other case counts into the metrics zone): the cost of the metrics
# Where `perf stat` works (Debian's linux-perf, root), it also counts the worker's user-space
# instructions per request, which a busy machine disturbs far less than CPU time.
# Settings: HOTPATH_ROUNDS (default 5), HOTPATH_DURATION (s per case and round, 4),
# HOTPATH_CONNECTIONS (32), HOTPATH_PORT (18190).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
rounds=${HOTPATH_ROUNDS:-5}
duration=${HOTPATH_DURATION:-4}
connections=${HOTPATH_CONNECTIONS:-32}
port=${HOTPATH_PORT:-18190}

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
mkdir -p "$run/nginx/logs" "$run/nginx2/logs"

pin_worker="" pin_wrk=()
if [ "$(nproc)" -ge 2 ] && command -v taskset >/dev/null; then
    pin_worker="worker_cpu_affinity 01;"
    pin_wrk=(taskset -c 1)
fi

cat > "$run/nginx/nginx.conf" <<CONF
load_module $module;
daemon off;
master_process on;
worker_processes 1;
$pin_worker
error_log logs/error.log warn;
pid logs/nginx.pid;
user root;
events { worker_connections 1024; }
http {
    access_log off;
    client_body_temp_path client_body_temp;
    server {
        listen 127.0.0.1:$port;
        server_name www.example.com;
        permitted_events socialclick;
        location = /floor { return 204; }
        location = /dry { analytics; analytics_write off; analytics_drop_bots off; }
        location = /dry_bots { analytics; analytics_write off; analytics_drop_bots on; }
    }
}
CONF
start_nginx "$nginx_bin" "$run/nginx" "http://127.0.0.1:$port/floor"
worker=$(pgrep -P "$(cat "$run/nginx/logs/nginx.pid")" | head -n 1)

# The same server without a metrics zone, on the next port.
port2=$((port + 1))
sed -e "s/127.0.0.1:$port;/127.0.0.1:$port2;/" -e "s/^http {/http {\n    analytics_metrics_zone off;/" \
    "$run/nginx/nginx.conf" > "$run/nginx2/nginx.conf"
start_nginx "$nginx_bin" "$run/nginx2" "http://127.0.0.1:$port2/floor"
worker2=$(pgrep -P "$(cat "$run/nginx2/logs/nginx.pid")" | head -n 1)

# The same request in every case: a browser's headers (user agent from $HOTPATH_UA) and a
# 150-byte event beacon.
cat > "$run/beacon.lua" <<'LUA'
wrk.method = "POST"
wrk.body = '{"domain":"www.example.com","page":"/posts/share.html","timezone":-60,'
    .. '"platform":"Linux x86_64","sess_id":"07ab-8022","event":"socialclick","note":""}'
wrk.headers["Host"] = "www.example.com"
wrk.headers["User-Agent"] = os.getenv("HOTPATH_UA")
wrk.headers["Content-Type"] = "text/plain;charset=UTF-8"
wrk.headers["Accept"] = "*/*"
wrk.headers["Accept-Language"] = "en-GB,en;q=0.9"
wrk.headers["Accept-Encoding"] = "gzip, deflate, br, zstd"
wrk.headers["Origin"] = "https://www.example.com"
wrk.headers["Referer"] = "https://www.example.com/posts/share.html"
wrk.headers["Sec-Fetch-Mode"] = "no-cors"
-- With HOTPATH_UA_FILE, every request takes the next user agent of that file; with
-- HOTPATH_UA_FILE=random, a new random one of 150 printable characters.
local file = os.getenv("HOTPATH_UA_FILE")
if file and file ~= "" then
    local agents, i = {}, 0
    if file ~= "random" then
        for line in io.lines(file) do agents[#agents + 1] = line end
    end
    local function random_agent()
        local chars = {}
        for j = 1, 150 do chars[j] = string.char(math.random(33, 126)) end
        return table.concat(chars)
    end
    function request()
        i = i % math.max(#agents, 1) + 1
        local headers = {}
        for k, v in pairs(wrk.headers) do headers[k] = v end
        headers["User-Agent"] = agents[i] or random_agent()
        return wrk.format(nil, nil, headers)
    end
end
LUA
head -n 4096 tests/fixtures/isbot/browsers-sample.txt > "$run/agents.txt"
browser_ua="Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36"
bot_ua="Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"

cases=(floor dry dry+bots "dry bot-ua" "dry+bots bot-ua" "dry many-ua" "dry+bots many-ua"
    "dry random-ua" "dry+bots random-ua" "dry nozone")
declare -A location=([floor]=floor [dry]=dry [dry+bots]=dry_bots ["dry bot-ua"]=dry
    ["dry+bots bot-ua"]=dry_bots ["dry many-ua"]=dry ["dry+bots many-ua"]=dry_bots
    ["dry random-ua"]=dry ["dry+bots random-ua"]=dry_bots ["dry nozone"]=dry)
declare -A agent=([floor]=$browser_ua [dry]=$browser_ua [dry+bots]=$browser_ua
    ["dry bot-ua"]=$bot_ua ["dry+bots bot-ua"]=$bot_ua ["dry many-ua"]=$browser_ua
    ["dry+bots many-ua"]=$browser_ua ["dry random-ua"]=$browser_ua
    ["dry+bots random-ua"]=$browser_ua ["dry nozone"]=$browser_ua)

# user and system CPU ticks of the worker (fields 14 and 15 of /proc/<pid>/stat; the fields are
# counted after the ")" that closes the command name).
cpu_ticks() {
    sed 's/^.*) //' "/proc/$1/stat" | awk '{ print $12, $13 }'
}
hz=$(getconf CLK_TCK)
count_instructions=""
# (Virtual machines often have no instruction counter: perf then says "<not supported>".)
if perf stat -x, -e instructions:u -o "$run/perf.txt" true >/dev/null 2>&1 &&
    grep -q '^[0-9]' "$run/perf.txt"; then
    count_instructions=yes
fi

# run_case NAME SECONDS: prints "user_us_per_request sys_us_per_request requests_per_s
# user_instructions_per_request" (the last is "-" without perf).
run_case() {
    local name=$1 seconds=$2 before after out requests instructions=- pid=$worker target=$port
    if [[ $name == *nozone ]]; then
        pid=$worker2 target=$port2
    fi
    before=$(cpu_ticks "$pid")
    local agents="" perf=()
    [[ $name == *many-ua ]] && agents="$run/agents.txt"
    [[ $name == *random-ua ]] && agents=random
    if [ -n "$count_instructions" ]; then
        perf=(perf stat -x, -e instructions:u -p "$pid" -o "$run/perf.txt" --)
    fi
    out=$(HOTPATH_UA=${agent[$name]} HOTPATH_UA_FILE=$agents "${perf[@]}" "${pin_wrk[@]}" \
        wrk -t1 -c"$connections" -d"${seconds}s" -s "$run/beacon.lua" \
        "http://127.0.0.1:$target/${location[$name]}")
    after=$(cpu_ticks "$pid")
    requests=$(awk '/requests in/ { print $1 }' <<<"$out")
    if [ -n "$count_instructions" ]; then
        instructions=$(awk -F, -v n="$requests" '/instructions/ { printf "%.0f", $1 / n }' \
            "$run/perf.txt")
    fi
    if grep -q 'Non-2xx' <<<"$out"; then
        echo "case $name: unexpected answers:" >&2
        echo "$out" >&2
        return 1
    fi
    awk -v b="$before" -v a="$after" -v n="$requests" -v hz="$hz" -v s="$seconds" 'BEGIN {
        split(b, x, " "); split(a, y, " ")
        printf "%.3f %.3f %.0f", (y[1] - x[1]) * 1e6 / hz / n, (y[2] - x[2]) * 1e6 / hz / n, n / s
    }'
    echo " $instructions"
}

# median of the numbers among the words on stdin ("-" when there are none).
median() {
    tr ' ' '\n' | grep '^[0-9.]*[0-9]$' | sort -g | awk '{ v[NR] = $1 } END {
        if (NR == 0) print "-"; else if (NR % 2) print v[(NR + 1) / 2];
        else printf "%.3f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }' || true
}

for name in "${cases[@]}"; do run_case "$name" 1 >/dev/null; done
declare -A user sys rps instr
for round in $(seq 1 "$rounds"); do
    for name in "${cases[@]}"; do
        read -r u s r i < <(run_case "$name" "$duration")
        user[$name]+="$u "
        sys[$name]+="$s "
        rps[$name]+="$r "
        instr[$name]+="$i "
    done
    echo "round $round/$rounds done" >&2
done

echo "worker user CPU per request, median of $rounds rounds of ${duration}s (wrk -t1" \
    "-c$connections); 1 nginx worker; $(nproc) CPUs; load average $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-20s %9s %9s %11s %9s %11s %11s   %s\n' case "user µs" "sys µs" "over floor" "req/s" \
    "user instr" "over floor" "user µs per round"
declare -A med imed
for name in "${cases[@]}"; do
    med[$name]=$(median <<<"${user[$name]}")
    imed[$name]=$(median <<<"${instr[$name]}")
done
for name in "${cases[@]}"; do
    s=$(median <<<"${sys[$name]}")
    r=$(median <<<"${rps[$name]}" | awk '{ printf "%.0f", $1 }')
    over=$(awk -v a="${med[$name]}" -v b="${med[floor]}" 'BEGIN { printf "%+.2f", a - b }')
    iover=$(awk -v a="${imed[$name]}" -v b="${imed[floor]}" \
        'BEGIN { if (a == "-") print "-"; else printf "%+d", a - b }')
    printf '%-20s %9s %9s %11s %9s %11s %11s   %s\n' "$name" "${med[$name]}" "$s" "$over" "$r" \
        "${imed[$name]}" "$iover" "${user[$name]}"
done
# summary NAME_OF_FIGURE CASE BASE_CASE TARGET: one line in µs (and instructions with perf).
summary() {
    awk -v what="$1" -v a="${med[$2]}" -v b="${med[$3]}" -v ia="${imed[$2]}" -v ib="${imed[$3]}" \
        -v target="${4:-}" 'BEGIN {
        printf "%-52s %5.2f µs", what ":", a - b
        if (ia != "-") printf "  %6d instructions", ia - ib
        if (target != "") printf "  (target <= %s µs)", target
        printf "\n" }'
}
summary "dry path over the floor (drop_bots off, browser)" dry floor 1.0
summary "dry path over the floor (drop_bots on, browser)" dry+bots floor 1.0
summary "bot detection (drop_bots on - off, browser)" dry+bots dry 0.3
summary "bot detection, 4,096 browsers in turn (cache miss)" "dry+bots many-ua" "dry many-ua"
summary "bot detection, random user agents" "dry+bots random-ua" "dry random-ua"
summary "metrics zone (dry - dry without a zone)" dry "dry nozone"
