# shellcheck shell=bash disable=SC2154  # root and suite are set by the sourcing script
# Shared by the install tests (tests/install/*.sh; source it after setting `root` and `suite`).
#
# A test script is a sequence of steps: `step NAME` ends the previous step as passed and starts
# the next one; the script runs with `set -e`, so the first failing command fails the current
# step and ends the script. Each step is reported like a cargo test and the script ends with a
# cargo-shaped `test result:` line, which .ci/run adds to its total. Processes go through
# scripts/lib.sh (`pids`), temporary files into `$work`; both are cleaned up on exit.

# shellcheck source=scripts/lib.sh
. "$root/scripts/lib.sh"

passed=0
failed=0
current_step=
step_started=0
suite_started=$(date +%s.%N)
work=$(mktemp -d "${TMPDIR:-/tmp}/ngx-analytics-$suite.XXXXXX")
# nginx workers run as an unprivileged user when the tests run as root: let them in.
chmod 755 "$work"
cleanup_hooks=()

elapsed_since() {
    awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'
}

# Ends the current step (if any) as passed.
end_step() {
    if [ -n "$current_step" ]; then
        echo "test $suite::$current_step ... ok ($(elapsed_since "$step_started") s)"
        passed=$((passed + 1))
        current_step=
    fi
}

# step NAME: ends the previous step as passed and starts NAME.
step() {
    end_step
    current_step=$1
    step_started=$(date +%s.%N)
    echo "--- $suite::$current_step"
}

# quiet CMD...: runs CMD with its output in $work/step.log; on failure prints its last 60 lines.
quiet() {
    local rc=0
    "$@" > "$work/step.log" 2>&1 || rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "command failed ($rc): $*" >&2
        tail -n 60 "$work/step.log" >&2
    fi
    return "$rc"
}

# fail MESSAGE: fails the current step.
fail() {
    echo "error: $*" >&2
    return 1
}

# free_port: a loopback TCP port nobody listens on (and not handed out before in this run).
handed_out=" "
free_port() {
    local port
    for _ in $(seq 1 200); do
        port=$((30000 + RANDOM % 30000))
        case "$handed_out" in *" $port "*) continue ;; esac
        if ! (exec 3<> "/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            handed_out="$handed_out$port "
            echo "$port"
            return 0
        fi
    done
    fail "no free loopback port found"
}

# start_test_influxd: InfluxDB on free loopback ports (influx_port, influx_rpc_port) with a
# database `analytics`; a port taken between free_port and influxd binding it means new ports.
start_test_influxd() {
    local attempt
    for attempt in 1 2 3; do
        influx_port=$(free_port)
        influx_rpc_port=$(free_port)
        if start_influxd "$work/influxdb-$attempt" "$influx_port" "$influx_rpc_port"; then
            influx_query "$influx_port" "CREATE DATABASE analytics" > /dev/null
            return 0
        fi
        # Stop this attempt's influxd if it is still starting.
        kill "${pids[-1]}" 2>/dev/null || true
        wait "${pids[-1]}" 2>/dev/null || true
        unset 'pids[-1]'
    done
    fail "InfluxDB did not start"
}

# port_is_closed PORT: nothing accepts connections on 127.0.0.1:PORT.
port_is_closed() {
    ! (exec 3<> "/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# send_beacon PORT PAGE: POSTs a page-view beacon for www.example.com; prints the HTTP status.
send_beacon() {
    curl -sS -o "$work/answer" -w '%{http_code}' -H 'Host: www.example.com' \
        -H 'Content-Type: text/plain;charset=UTF-8' \
        --data-binary "{\"domain\":\"www.example.com\",\"page\":\"$2\",\"timezone\":-60}" \
        "http://127.0.0.1:$1/analytics/collect"
}

# expect_point INFLUX_PORT PAGE: the page view for PAGE is stored in database `analytics`.
expect_point() {
    local answer
    answer=$(influx_query "$1" \
        "SELECT \"counter\", \"page\" FROM \"pf_analytics\" WHERE \"page\" = '$2'" analytics)
    echo "InfluxDB: $answer"
    case "$answer" in
        *"\"$2\""*) return 0 ;;
        *) fail "no point for page $2 in InfluxDB" ;;
    esac
}

# analytics_locations INFLUX_PORT: the server-block lines of a beacon endpoint writing to
# InfluxDB on INFLUX_PORT (database `analytics`).
analytics_locations() {
    cat <<CONF
        analytics_drop_bots off;   # the test client is curl

        location = /analytics/collect {
            analytics;
        }

        location = /_analytics/write {
            internal;
            proxy_pass http://127.0.0.1:$1/write?db=analytics&precision=ns;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_pass_request_headers off;
            proxy_ignore_client_abort on;
        }
CONF
}

finish() {
    local rc=$? verdict=ok
    set +e
    if [ "$rc" -ne 0 ] && [ -n "$current_step" ]; then
        echo "test $suite::$current_step ... FAILED ($(elapsed_since "$step_started") s)"
        failed=$((failed + 1))
        current_step=
    elif [ "$rc" -eq 0 ]; then
        end_step
    elif [ "$failed" -eq 0 ]; then
        failed=1
    fi
    local i
    for ((i = ${#cleanup_hooks[@]} - 1; i >= 0; i--)); do "${cleanup_hooks[$i]}"; done
    stop_all
    if [ -n "${KEEP_WORK:-}" ]; then
        echo "work directory kept: $work"
    else
        rm -rf "$work"
    fi
    [ "$failed" -eq 0 ] || verdict=FAILED
    echo
    echo "test result: $verdict. $passed passed; $failed failed; 0 ignored; 0 measured;" \
        "0 filtered out; finished in $(elapsed_since "$suite_started")s"
    echo
    [ "$failed" -eq 0 ] || exit 1
    exit 0
}
trap finish EXIT
