#!/usr/bin/env bash
# Install test: nginx's own build system builds the module (`config`, `config.make`).
#
# Copies a fresh nginx source tree (by default the nginx 1.28 source bundled with the nginx-src
# crate; NGINX_SOURCE=/path/to/nginx-x.y.z for another one), configures it with
# `--with-compat --add-dynamic-module=<this repository>`, runs `make modules` and `make`, then
# loads objs/ngx_http_analytics_module.so into the nginx just built and sends a beacon that must
# land in a real InfluxDB. Everything runs on free loopback ports in a temporary directory.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
suite=install_dynamic_module
# shellcheck source=tests/install/common.sh
. "$root/tests/install/common.sh"

# The nginx source bundled with the nginx-src crate (what the vendored cargo build uses).
vendored_nginx_source() {
    local manifest
    manifest=$(cd "$root" && cargo metadata --format-version 1 --locked \
        | grep -o '"manifest_path":"[^"]*/nginx-src-[^"]*/Cargo.toml"' | sed -n 1p \
        | sed -e 's/^"manifest_path":"//' -e 's/"$//')
    [ -n "$manifest" ] || fail "nginx-src not found in cargo metadata"
    echo "$(dirname "$manifest")/nginx"
}

step copy_nginx_source
source_dir=${NGINX_SOURCE:-$(vendored_nginx_source)}
[ -f "$source_dir/src/core/nginx.h" ] || fail "$source_dir is not an nginx source tree"
cp -r "$source_dir" "$work/nginx"
cd "$work/nginx"
version=$(sed -n 's/^#define NGINX_VERSION *"\(.*\)"/\1/p' src/core/nginx.h)
echo "nginx $version from $source_dir"

step configure_add_dynamic_module
# Release tarballs have ./configure; the nginx repository layout has auto/configure.
configure=./configure
[ -x "$configure" ] || configure=auto/configure
quiet "$configure" --with-compat --add-dynamic-module="$root"
grep -E 'ngx_http_analytics_module|cargo' "$work/step.log"

step make_modules
quiet make modules
[ -f objs/ngx_http_analytics_module.so ] \
    || fail "make modules did not produce objs/ngx_http_analytics_module.so"
ls -l objs/ngx_http_analytics_module.so
# nginx's generated table names the module: the .so exports both.
for symbol in ngx_modules ngx_http_analytics_module; do
    nm -D --defined-only objs/ngx_http_analytics_module.so | grep -q " $symbol\$" \
        || fail "objs/ngx_http_analytics_module.so does not export $symbol"
done

step make_nginx
quiet make -j "$(nproc)"
./objs/nginx -V

step nginx_loads_module_and_answers_beacon
nginx_port=$(free_port)
start_test_influxd
mkdir -p "$work/prefix/logs"
cat > "$work/prefix/nginx.conf" <<CONF
load_module $work/nginx/objs/ngx_http_analytics_module.so;
daemon off;
master_process on;
worker_processes 1;
error_log logs/error.log info;
pid logs/nginx.pid;
events {}
http {
    access_log off;
    server {
        listen 127.0.0.1:$nginx_port;
        server_name www.example.com;
$(analytics_locations "$influx_port")
    }
}
CONF
./objs/nginx -t -p "$work/prefix/" -c "$work/prefix/nginx.conf"
start_nginx "$work/nginx/objs/nginx" "$work/prefix" "http://127.0.0.1:$nginx_port/"
page="/install/dynamic-module/$version/$RANDOM$RANDOM"
status=$(send_beacon "$nginx_port" "$page")
echo "beacon for $page: $status"
[ "$status" = 204 ] || fail "beacon answered $status: $(cat "$work/answer")"
expect_point "$influx_port" "$page"

step stops_cleanly
stop_all
pids=()
for port in "$nginx_port" "$influx_port" "$influx_rpc_port"; do
    port_is_closed "$port" || fail "port $port is still taken"
done
! grep -E '\[(alert|emerg|crit)\]' "$work/prefix/logs/error.log" \
    || fail "nginx logged alerts"
