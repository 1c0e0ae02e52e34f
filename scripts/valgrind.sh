#!/usr/bin/env bash
# Runs nginx with the analytics module under valgrind (memcheck) for a short mixed load with
# faults, then reports invalid reads/writes, other memory errors and definite leaks, and which of
# them are attributable to the module.
#
# Repeat it with:
#
#   scripts/valgrind.sh            # builds (cargo build, debug) and runs; exit 0 = clean
#   KEEP=1 scripts/valgrind.sh     # keep the run directory (nginx.conf, logs, valgrind.log)
#
# Needs: valgrind, curl, python3 (a ~30-line fake InfluxDB, answering 204 and 500 in turn, is
# started with python3's http.server; python3 is on the dev image, on a fresh Debian install it
# with `apt-get install python3`), and the debug build (nginx from nginx-sys's vendored source,
# target/debug/build/nginx-sys-*/out/objs/nginx, plus target/debug/libngx_http_analytics_module.so).
#
# nginx runs with `master_process off; daemon off;` as valgrind's only client process, listens on
# 127.0.0.1 only, and is stopped with SIGQUIT (graceful: the cycle pool is destroyed, the module
# unloaded, then valgrind's leak check runs; --keep-debuginfo keeps the module's symbols).
# The load: valid events and page views (the sink alternates 204/500, so writes fail half the
# time), background mode, the disk spool (spooled lines replayed by the retry timer, a dead
# sink's replays failing), a sink that is down, a slow sink (longer than proxy_read_timeout),
# invalid bodies of every kind, too-large bodies, chunked bodies, a body spilled to a temp file,
# a client that disconnects mid-body, a stalled client (client_body_timeout), GET (405), CORS
# preflights, a bot user agent, the embedded agent (analytics_agent) and its 304, reports whose
# statements are answered with 2,000 series each (about 200 KB), refused report requests, the
# metrics in both formats and the dashboard page.
#
# Exit status: 0 clean; 1 memory errors or per-request definite leaks attributable to the module
# (a stack through libngx_http_analytics_module); 3 setup failure. Reported for information but
# not failing: nginx's own blocks lost at exit in single-process mode (ngx_set_environment,
# ngx_event_process_init), and blocks the module allocates once into a OnceLock static, which
# valgrind calls "definitely lost" only because nginx dlcloses the module before exiting.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

for tool in valgrind curl python3; do
    command -v "$tool" >/dev/null || { echo "$tool is missing" >&2; exit 3; }
done

echo "==> cargo build (debug: nginx and the module)"
cargo build --quiet
module="$root/target/debug/libngx_http_analytics_module.so"
nginx_bin=$(ls -t "$root"/target/debug/build/nginx-sys-*/out/objs/nginx 2>/dev/null | head -n 1)
[ -x "${nginx_bin:-}" ] || { echo "nginx binary not found under target/debug/build" >&2; exit 3; }
[ -f "$module" ] || { echo "$module not found" >&2; exit 3; }

run=$(mktemp -d /tmp/ngx-analytics-valgrind.XXXXXX)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [ -n "${KEEP:-}" ]; then echo "kept $run"; else rm -rf "$run"; fi
}
trap cleanup EXIT
mkdir -p "$run/logs" "$run/client_body_temp" "$run/proxy_temp"

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
port=$(free_port)
sink_port=$(free_port)
slow_port=$(free_port)
dead_port=$(free_port)

# Fake InfluxDB: answers 204 and 500 in turn on $sink_port, and after 1.5 s on $slow_port.
cat >"$run/sink.py" <<'PY'
import http.server, socketserver, sys, threading, time

class Sink(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    count = 0
    lock = threading.Lock()
    delay = 0.0

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if self.path.startswith("/query"):
            # A report statement: a JSON answer of 2,000 series (about 200 KB, so the module's
            # capture of it grows several times).
            series = ",".join(
                '{"name":"pf_analytics","tags":{"page":"/p/%d"},'
                '"columns":["time","pageviews","visits"],"values":[[0,%d,%d]]}' % (i, i + 1, i)
                for i in range(2000))
            body = ('{"results":[{"statement_id":0,"series":[%s]}]}' % series).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        with Sink.lock:
            Sink.count += 1
            n = Sink.count
        time.sleep(self.delay)
        if n % 2:
            self.send_response(204)
            self.end_headers()
        else:
            body = b'{"error":"injected failure"}'
            self.send_response(500)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    def log_message(self, *args):
        pass

class Slow(Sink):
    delay = 1.5

class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request, client_address):
        pass  # nginx gave up on the slow sink first (proxy_read_timeout): a broken pipe

servers = [Server(("127.0.0.1", int(sys.argv[1])), Sink),
           Server(("127.0.0.1", int(sys.argv[2])), Slow)]
for s in servers[1:]:
    threading.Thread(target=s.serve_forever, daemon=True).start()
servers[0].serve_forever()
PY
python3 "$run/sink.py" "$sink_port" "$slow_port" &
pids+=($!)

write_location() { # name upstream
    cat <<EOF
        location = $1 {
            internal;
            proxy_pass http://$2/write?db=analytics&precision=ns;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_pass_request_headers off;
            proxy_ignore_client_abort on;
            proxy_connect_timeout 1s;
            proxy_read_timeout 1s;
        }
EOF
}

cat >"$run/nginx.conf" <<EOF
load_module $module;
daemon off;
master_process off;
error_log $run/logs/error.log info;
pid $run/logs/nginx.pid;
events { worker_connections 256; }
http {
    client_body_temp_path $run/client_body_temp;
    proxy_temp_path $run/proxy_temp;
    log_format analytics '\$status \$analytics_status \$analytics_event "\$analytics_reason"';
    access_log $run/logs/access.log analytics;
    upstream sink { server 127.0.0.1:$sink_port; keepalive 4; }
    upstream slow { server 127.0.0.1:$slow_port; }
    upstream dead { server 127.0.0.1:$dead_port; }
    server {
        listen 127.0.0.1:$port;
        server_name www.example.com;
        analytics_domains www.example.com;
        permitted_events socialclick searchtermintercepted;
        analytics_cors_origins https://blog.example.org;
        location = /collect { analytics; analytics_max_body_size 1k; client_body_timeout 2s; }
        location = /collect-bg { analytics; analytics_write_mode background; }
        location = /collect-unbatched { analytics; analytics_batch off; }
        location = /collect-file {
            analytics;
            client_body_buffer_size 64;
            client_body_in_file_only on;
        }
        location = /collect-dead { analytics; analytics_write /_analytics/write-dead; }
        location = /collect-slow { analytics; analytics_write /_analytics/write-slow; }
        location = /collect-off { analytics; analytics_write off; }
        location = /collect-spool { analytics; analytics_spool $run/spool retry=300ms; }
        location = /collect-spool-bg {
            analytics;
            analytics_write_mode background;
            analytics_spool $run/spool retry=300ms;
        }
        location = /collect-spool-dead {
            analytics;
            analytics_write /_analytics/write-dead;
            analytics_spool $run/spool retry=300ms;
        }
        location = /agent.js { analytics_agent; }
        location = /report { analytics_report; }
        location = /metrics { analytics_metrics; }
        location = /dash/ { analytics_dashboard /report; }
        location = /_analytics/query {
            internal;
            proxy_pass http://sink/query?db=analytics;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_pass_request_headers off;
            proxy_set_header Content-Type application/x-www-form-urlencoded;
        }
$(write_location /_analytics/write sink)
$(write_location /_analytics/write-slow slow)
$(write_location /_analytics/write-dead dead)
    }
}
EOF

echo "==> starting nginx under valgrind on 127.0.0.1:$port"
valgrind --tool=memcheck --error-exitcode=99 --leak-check=full \
    --errors-for-leak-kinds=definite --show-leak-kinds=definite --keep-debuginfo=yes \
    --num-callers=40 --trace-children=no --log-file="$run/valgrind.log" \
    "$nginx_bin" -p "$run/" -c "$run/nginx.conf" -e "$run/logs/error.log" \
    >"$run/logs/stdout.log" 2>&1 &
vg_pid=$!
pids+=("$vg_pid")

for _ in $(seq 1 300); do
    curl -s -o /dev/null "http://127.0.0.1:$port/agent.js" && break
    sleep 0.2
done

browser='Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0'
codes=()
send() { # path body [extra curl args...]
    local path=$1 body=$2
    shift 2
    local code
    code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 30 -A "$browser" -H 'Host: www.example.com' \
        -H 'Content-Type: text/plain;charset=UTF-8' --data-binary "$body" "$@" \
        "http://127.0.0.1:$port$path" || echo "000")
    codes+=("$path:$code")
}
event='{"domain":"www.example.com","page":"/posts/a.html?utm=x","timezone":-60,"platform":"Linux x86_64","sess_id":"07ab","event":"socialClick","note":"say \"hi\"\n\\"}'
view='{"domain":"www.example.com","page":"/p","referrer":"https://news.example.org/x?y","load_time":812.5,"pages_viewed":3,"sess_id":"s\\"}'

echo "==> sending the load"
for i in $(seq 1 12); do send /collect "$event"; send /collect "$view"; done
for i in $(seq 1 6); do send /collect-bg "$event"; send /collect-unbatched "$view"; done
for i in $(seq 1 4); do send /collect-file "$event"; send /collect-off "$view"; done
for i in 1 2; do send /collect-dead "$event"; send /collect-slow "$event"; done
# The disk spool: half the sink's answers are 500s (spooled, then replayed by the retry timer
# through a request of the module's own), and a dead sink whose replays keep failing.
for i in $(seq 1 6); do
    send /collect-spool "$event"; send /collect-spool-bg "$view"; send /collect-spool-dead "$view"
done
sleep 4
for bad in 'not json' '{"domain":"www.example.com"' '[1,2]' 'null' \
    '{"domain":"www.example.com","page":"/","page":"/b"}' \
    '{"domain":"www.example.com","page":"/","timezone":"x"}' \
    '{"domain":"www.example.com","page":"/","value":NaN,"event":"socialclick"}' \
    '{"domain":"www.example.com","page":"/","event":"signup"}' \
    '{"domain":"evil.example.net","page":"/"}' \
    "{\"domain\":\"www.example.com\",\"page\":\"/$(printf 'a%.0s' $(seq 1 1100))\"}" \
    "$(printf '[%.0s' $(seq 1 2000))" ''; do
    send /collect "$bad"
done
printf '{"domain":"www.example.com","page":"/\xff"}' >"$run/bad-utf8.json"
send /collect "@$run/bad-utf8.json"
send /collect "$event" -H 'Transfer-Encoding: chunked'
send /collect "$view" -H 'Transfer-Encoding: chunked'
send /collect "$(printf '{"domain":"www.example.com","page":"/","note":"%s","event":"socialclick"}' "$(printf 'n%.0s' $(seq 1 1500))")" -H 'Transfer-Encoding: chunked'
send /collect "$event" -A 'Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)'
send /collect "$view" -A 'curl/8.0'
for origin in https://blog.example.org https://evil.example.net; do
    codes+=("OPTIONS $origin:$(curl -s -o /dev/null -w '%{http_code}' --max-time 30 -X OPTIONS \
        -H "Origin: $origin" -H 'Access-Control-Request-Method: POST' \
        "http://127.0.0.1:$port/collect")")
done
send /collect "$event" -H 'Origin: https://blog.example.org'
send /collect "$view" -H 'Origin: https://evil.example.net'
for i in 1 2; do
    codes+=("GET /collect:$(curl -s -o /dev/null -w '%{http_code}' --max-time 30 "http://127.0.0.1:$port/collect")")
done
etag=$(curl -s -D - -o /dev/null --max-time 30 "http://127.0.0.1:$port/agent.js" | tr -d '\r' | awk -F': ' 'tolower($1)=="etag"{print $2}')
for i in 1 2; do
    codes+=("agent 304:$(curl -s -o /dev/null -w '%{http_code}' --max-time 30 -H "If-None-Match: $etag" "http://127.0.0.1:$port/agent.js")")
done
# Reports (each statement answered with 2,000 series), refused report parameters and methods,
# the metrics in both formats, the dashboard page.
for q in "report=summary&domain=www.example.com" "report=pages&domain=www.example.com&limit=1000" \
    "report=pages&domain=www.example.com&format=csv" "report=timeseries&domain=www.example.com&period=24h" \
    "report=events&domain=www.example.com" "report=domains" "report=nope" "report=pages&domain=a%27b"; do
    codes+=("report $q:$(curl -s -o /dev/null -w '%{http_code}' --max-time 60 "http://127.0.0.1:$port/report?$q")")
done
codes+=("POST /report:$(curl -s -o /dev/null -w '%{http_code}' --max-time 30 -d x "http://127.0.0.1:$port/report?report=domains")")
for q in "" "?format=json"; do
    codes+=("metrics$q:$(curl -s -o /dev/null -w '%{http_code}' --max-time 30 "http://127.0.0.1:$port/metrics$q")")
done
codes+=("dashboard:$(curl -s -o /dev/null -w '%{http_code}' --max-time 30 "http://127.0.0.1:$port/dash/")")
# A client that disconnects mid-body, and one that stalls (client_body_timeout 2s).
python3 - "$port" <<'PY'
import socket, sys, time
port = int(sys.argv[1])
head = b"POST /collect HTTP/1.1\r\nHost: www.example.com\r\nContent-Length: 200\r\n\r\n"
for _ in range(2):
    s = socket.create_connection(("127.0.0.1", port)); s.sendall(head + b'{"domain":'); time.sleep(0.3); s.close()
    s = socket.create_connection(("127.0.0.1", port)); s.sendall(head + b'{"dom'); s.settimeout(30)
    try:
        s.recv(1000)
    except OSError:
        pass
    s.close()
PY
sleep 2
echo "    answers: ${codes[*]}"

echo "==> stopping nginx (SIGQUIT) and waiting for valgrind's leak check"
# valgrind's pid is nginx's pid (valgrind runs the program in its own process).
kill -QUIT "$vg_pid"
set +e
wait "$vg_pid"
vg_status=$?
set -e

echo "==> analysing $run/valgrind.log (valgrind exit status $vg_status)"
set +e
python3 - "$run/valgrind.log" <<'PY'
import re, sys
text = open(sys.argv[1], errors="replace").read()
lines = [re.sub(r"^==\d+== ?", "", l) for l in text.splitlines()]
records, current = [], []
for line in lines:
    if line.strip() == "":
        if current:
            records.append(current)
        current = []
    else:
        current.append(line)
if current:
    records.append(current)
kinds = re.compile(r"^(Invalid (read|write|free)|Mismatched free|Conditional jump|Use of uninitialised|"
                   r"Syscall param|Source and destination overlap|.*definitely lost)")
module = re.compile(r"ngx_http_analytics|libngx_http_analytics_module|ngx_analytics")
# A block allocated once for the life of the process by a OnceLock / lazy static in the module is
# reported as "definitely lost" only because nginx unloads (dlclose) the module at exit, taking
# the static that pointed to it along. Every path of the load runs at least twice, so a leak per
# request shows up as 2 or more blocks.
one_time = re.compile(r"OnceLock|get_or_init|Once::call|LazyLock")
mine, statics, theirs = [], [], []
for rec in records:
    if not kinds.search(rec[0]):
        continue
    if not any(module.search(l) for l in rec):
        theirs.append(rec)
    elif "definitely lost" in rec[0] and " in 1 blocks " in rec[0] and any(one_time.search(l) for l in rec):
        statics.append(rec)
    else:
        mine.append(rec)
summary = [l.strip() for l in lines if l.strip().startswith(("ERROR SUMMARY", "definitely lost", "indirectly lost",
                                             "possibly lost", "still reachable", "in use at exit"))]
print("\n".join("    " + l for l in summary))
print(f"    memory errors / definite leaks: {len(mine)} in the module, {len(statics)} one-time "
      f"static(s) of the module lost at unload, {len(theirs)} in nginx itself")
for title, recs in (("MODULE", mine), ("module one-time static (not per request)", statics),
                    ("nginx itself", theirs)):
    for rec in recs:
        frames = [l for l in rec[1:] if module.search(l)][:3] or rec[1:4]
        print(f"--- {title}: {rec[0]}\n      " + "\n      ".join(f.strip() for f in frames))
if mine:
    print("\n".join("\n".join(rec) for rec in mine))
sys.exit(1 if mine else 0)
PY
result=$?
set -e
if [ "$(grep -c 'analytics: write to' "$run/logs/error.log")" -eq 0 ]; then
    echo "note: no failed write was logged; the fault part of the load did not run" >&2
fi
case $result in
    0) echo "==> clean: no invalid read/write, no other memory error and no per-request leak in the module" ;;
    *) echo "==> FOUND memory errors or definite leaks in the module" >&2 ;;
esac
exit "$result"
