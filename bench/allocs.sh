#!/usr/bin/env bash
# Heap allocations per request in the nginx worker: calls of glibc's malloc, free and
# posix_memalign (nginx's pools), counted with uprobes (`perf probe`, from Debian's linux-perf;
# needs root), for `return 204` and the module's dry path (`analytics_write off`) with
# `analytics_drop_bots` off and on, with a browser's and a crawler's user agent, and with
# 4,096 different browser user agents in turn. The request is bench/hotpath.sh's (a browser's
# headers, a 150-byte event beacon). The probes are removed again on exit.
# Settings: ALLOCS_DURATION (s per case, default 3), ALLOCS_PORT (18191).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
duration=${ALLOCS_DURATION:-3}
port=${ALLOCS_PORT:-18191}
libc=$(ldconfig -p | awk '/libc\.so\.6 .*x86-64/ { print $NF; exit }')

cargo build --release --quiet
# shellcheck source=scripts/lib.sh
. "$root/scripts/lib.sh"
nginx_bin=$(release_nginx)

run=$(mktemp -d)
probes=()
cleanup() {
    stop_all
    for probe in "${probes[@]}"; do perf probe -q -d "probe_libc:$probe" || true; done
    rm -rf "$run"
}
trap cleanup EXIT
for probe in malloc free posix_memalign; do
    perf probe -q -x "$libc" -a "$probe"
    probes+=("$probe")
done
mkdir -p "$run/nginx/logs"

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

# The request of bench/hotpath.sh.
sed -n '/^cat > "\$run\/beacon.lua"/,/^LUA/p' bench/hotpath.sh | sed '1d;$d' > "$run/beacon.lua"
head -n 4096 tests/fixtures/isbot/browsers-sample.txt > "$run/agents.txt"
browser="Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36"
bot="Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"

printf '%-18s %8s %8s %15s %10s\n' case malloc free posix_memalign requests
for case in "floor|floor|$browser|" "dry|dry|$browser|" "dry+bots|dry_bots|$browser|" \
    "dry bot-ua|dry|$bot|" "dry+bots bot-ua|dry_bots|$bot|" \
    "dry many-ua|dry|$browser|$run/agents.txt" "dry+bots many-ua|dry_bots|$browser|$run/agents.txt"; do
    IFS='|' read -r name location agent agents <<<"$case"
    export HOTPATH_UA=$agent HOTPATH_UA_FILE=$agents
    wrk -t1 -c32 -d1s -s "$run/beacon.lua" "http://127.0.0.1:$port/$location" >/dev/null
    perf stat -x, -o "$run/stat" -p "$worker" \
        -e probe_libc:malloc,probe_libc:free,probe_libc:posix_memalign -- \
        wrk -t1 -c32 -d"${duration}s" -s "$run/beacon.lua" "http://127.0.0.1:$port/$location" \
        > "$run/wrk"
    requests=$(awk '/requests in/ { print $1 }' "$run/wrk")
    awk -F, -v n="$requests" -v name="$name" '/probe_libc/ { split($3, e, ":"); v[e[2]] = $1 }
        END { printf "%-18s %8.2f %8.2f %15.2f %10d\n", name, v["malloc"] / n, v["free"] / n,
            v["posix_memalign"] / n, n }' "$run/stat"
done
echo "(calls per request; nginx itself makes the floor's)"
