# Shell helpers shared by scripts/demo.sh and the benchmarks (source it; needs `root` set to the
# repository root). Starts processes on loopback only and records their pids in `pids`.

pids=()

# Kills every process started through these helpers (install with `trap stop_all EXIT`).
stop_all() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
}

# The release module and the nginx it was built with (after `cargo build --release`).
module="$root/target/release/libngx_http_analytics_module.so"
release_nginx() {
    local bin
    bin=$(ls -t "$root"/target/release/build/nginx-sys-*/out/objs/nginx 2>/dev/null | head -n 1)
    [ -x "$bin" ] || { echo "nginx binary not found under target/release/build" >&2; return 1; }
    echo "$bin"
}

# start_influxd DIR HTTP_PORT RPC_PORT: InfluxDB 1.x with its data in DIR, on 127.0.0.1,
# waits (up to 60 s: a loaded machine can be slow) until it answers /ping; fails at once if
# influxd exits (a port taken, for example).
start_influxd() {
    local dir=$1 http_port=$2 rpc_port=$3
    mkdir -p "$dir"
    cat > "$dir/influxdb.conf" <<CONF
reporting-disabled = true
bind-address = "127.0.0.1:$rpc_port"
[meta]
  dir = "$dir/meta"
[data]
  dir = "$dir/data"
  wal-dir = "$dir/wal"
  query-log-enabled = false
  # max-values-per-tag stays at its default (100,000): with the default
  # "analytics_session field" a visit is no new tag value.
[http]
  bind-address = "127.0.0.1:$http_port"
  log-enabled = false
[monitor]
  store-enabled = false
CONF
    influxd -config "$dir/influxdb.conf" > "$dir/influxd.log" 2>&1 &
    local pid=$!
    pids+=("$pid")
    for _ in $(seq 1 300); do
        curl -fs "http://127.0.0.1:$http_port/ping" >/dev/null && return 0
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.2
    done
    echo "InfluxDB did not start; see $dir/influxd.log:" >&2
    tail -n 5 "$dir/influxd.log" >&2
    return 1
}

# influx_query PORT QUERY [DB]: runs an InfluxQL statement, prints the JSON answer.
influx_query() {
    curl -fsS -XPOST "http://127.0.0.1:$1/query" --data-urlencode "q=$2" \
        ${3:+--data-urlencode "db=$3"}
}

# start_nginx BIN PREFIX URL: nginx with PREFIX/nginx.conf, waits until URL answers.
start_nginx() {
    local bin=$1 prefix=$2 url=$3
    mkdir -p "$prefix/logs"
    "$bin" -p "$prefix/" -c "$prefix/nginx.conf" &
    pids+=($!)
    for _ in $(seq 1 100); do
        curl -s -o /dev/null "$url" && return 0
        sleep 0.1
    done
    echo "nginx did not start; see $prefix/logs/error.log" >&2
    return 1
}

# free_port: a loopback TCP port nothing uses now, below the ephemeral range (whose ports
# outgoing connections take): a random one from 20000-32767 that refuses a connection and that
# no socket has as its local port; pass ports already chosen to avoid them.
free_port() {
    local port taken
    for _ in $(seq 1 200); do
        port=$(( 20000 + RANDOM % 12768 ))
        for taken in "$@"; do [ "$port" = "$taken" ] && continue 2; done
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && continue
        if command -v ss >/dev/null && [ -n "$(ss -Htan "( sport = :$port )")" ]; then
            continue
        fi
        echo "$port"
        return 0
    done
    echo "no free loopback port found" >&2
    return 1
}

# wrk's latency figure in ms ("812.00us", "1.23ms", "1.01s").
to_ms() {
    awk -v v="$1" 'BEGIN {
        if (v ~ /us$/) { sub(/us$/, "", v); printf "%.2f", v / 1000 }
        else if (v ~ /ms$/) { sub(/ms$/, "", v); printf "%.2f", v }
        else if (v ~ /s$/) { sub(/s$/, "", v); printf "%.2f", v * 1000 }
        else { print v } }'
}
