#!/usr/bin/env bash
# Install test: the Debian package, installed next to Debian's own nginx package.
#
# Builds the .deb (scripts/build-deb.sh) into a temporary directory, runs lintian on it,
# installs it with apt-get, checks the layout and that it is enabled, runs `nginx -t` with
# Debian's own nginx.conf and with a site using the module on a free loopback port, starts
# /usr/sbin/nginx with that site, sends a beacon and reads the point back from a real
# InfluxDB, then removes (module disabled) and purges (no trace) the package and shows that
# nginx still starts without it.
#
# It changes the system: it needs root (or sudo) and Debian's nginx (make deps installs it),
# and it purges libnginx-mod-http-analytics if it was installed. No service is started or
# reloaded (a policy-rc.d denies it while the test runs, unless the system already has one);
# the nginx it starts uses its own main configuration, which includes Debian's
# /etc/nginx/modules-enabled, and is stopped at the end.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
suite=install_deb
# shellcheck source=tests/install/common.sh
. "$root/tests/install/common.sh"

package=libnginx-mod-http-analytics
enabled=/etc/nginx/modules-enabled/50-mod-http-analytics.conf
available=/usr/share/nginx/modules-available/mod-http-analytics.conf
module=/usr/lib/nginx/modules/ngx_http_analytics_module.so

sudo=""
[ "$(id -u)" -eq 0 ] || sudo=sudo
apt_get() {
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 -y -q "$@"
}
installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"
}

# No package script may start or reload a system nginx while the test runs.
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# Written by ngx-analytics tests/install/deb.sh while it runs.\nexit 101\n' \
        | $sudo tee "$policy" > /dev/null
    $sudo chmod 755 "$policy"
    remove_policy() { $sudo rm -f "$policy"; }
    cleanup_hooks+=(remove_policy)
fi
purge_package() {
    if installed "$package" || dpkg-query -W "$package" > /dev/null 2>&1; then
        apt_get purge "$package" > /dev/null 2>&1 || true
    fi
}
cleanup_hooks+=(purge_package)

# The nginx started here: /usr/sbin/nginx with a main configuration in $work that includes
# Debian's modules-enabled, as /etc/nginx/nginx.conf does, and the site in $work/sites.
nginx_port=$(free_port)
conf=$work/nginx/nginx.conf
mkdir -p "$work/nginx/sites"
cat > "$conf" <<CONF
user www-data;
worker_processes 1;
daemon off;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log info;
include /etc/nginx/modules-enabled/*.conf;
events {}
http {
    access_log $work/nginx/access.log;
    include $work/nginx/sites/*.conf;
}
CONF
nginx_pid=
start_debian_nginx() {
    /usr/sbin/nginx -c "$conf" &
    nginx_pid=$!
    pids+=("$nginx_pid")
    for _ in $(seq 1 100); do
        curl -s -o /dev/null "http://127.0.0.1:$nginx_port/" && return 0
        kill -0 "$nginx_pid" 2>/dev/null \
            || fail "nginx exited; $(tail -n 5 "$work/nginx/error.log")"
        sleep 0.1
    done
    fail "nginx did not answer on 127.0.0.1:$nginx_port"
}
stop_debian_nginx() {
    kill -TERM "$nginx_pid"
    wait "$nginx_pid" || true
    local pid rest=()
    for pid in "${pids[@]}"; do [ "$pid" = "$nginx_pid" ] || rest+=("$pid"); done
    pids=("${rest[@]}")
    port_is_closed "$nginx_port" || fail "port $nginx_port still taken after nginx stopped"
}

step build_deb
[ -x /usr/sbin/nginx ] || fail "Debian's nginx is not installed (make deps)"
dpkg-query -W -f='${Package} ${Version}\n' nginx nginx-dev
quiet env DEB_OUT_DIR="$work/debian" "$root/scripts/build-deb.sh"
deb=$(ls "$work"/debian/${package}_*.deb)
echo "built $deb"
dpkg-deb --field "$deb" Package Version Architecture Depends
dpkg-deb --field "$deb" Depends | grep -q 'nginx-abi-' || fail "Depends names no nginx ABI"

step lintian
# Errors and warnings fail; informational tags are printed.
rc=0
lintian --fail-on error,warning --display-info "$deb" > "$work/lintian.log" 2>&1 || rc=$?
grep -v 'root privileges' "$work/lintian.log" || true
[ "$rc" -eq 0 ] || fail "lintian found errors or warnings ($rc)"

step apt_install_enables_module
if dpkg-query -W "$package" > /dev/null 2>&1; then
    echo "purging an earlier $package first"
    apt_get purge "$package" > /dev/null
fi
quiet apt_get install --no-install-recommends "$deb"
installed "$package" || fail "$package is not installed"
for file in "$module" "$available" /usr/share/doc/$package/copyright \
    /usr/share/doc/$package/README.md.gz /usr/share/doc/$package/examples/nginx.conf; do
    [ -f "$file" ] || fail "$file is missing"
done
[ "$(cat "$available")" = "load_module modules/ngx_http_analytics_module.so;" ] \
    || fail "unexpected $available: $(cat "$available")"
[ "$(readlink "$enabled")" = "$available" ] || fail "$enabled does not link to $available"
ls -l "$enabled"

step nginx_t_debian_config
# Debian's own /etc/nginx/nginx.conf now loads the module (-t binds no port).
/usr/sbin/nginx -t 2>&1 | tee "$work/nginx-t.log"
grep -q "test is successful" "$work/nginx-t.log" || fail "nginx -t failed"

step beacon_through_debian_nginx
start_test_influxd
cat > "$work/nginx/sites/analytics.conf" <<CONF
server {
    listen 127.0.0.1:$nginx_port;
    server_name www.example.com;
$(analytics_locations "$influx_port")
}
CONF
/usr/sbin/nginx -t -c "$conf"
start_debian_nginx
page="/install/deb/$RANDOM$RANDOM"
status=$(send_beacon "$nginx_port" "$page")
echo "beacon for $page: $status"
[ "$status" = 204 ] || fail "beacon answered $status: $(cat "$work/answer")"
expect_point "$influx_port" "$page"
stop_debian_nginx

step apt_remove_disables_module
quiet apt_get remove "$package"
[ ! -e "$module" ] || fail "$module is still there"
[ ! -L "$enabled" ] || fail "$enabled is still there"
# Kept aside, so that a reinstall enables the module again.
[ -L "$enabled.removed" ] || fail "$enabled.removed is missing"
if /usr/sbin/nginx -t -c "$conf" > "$work/nginx-t.log" 2>&1; then
    fail "nginx -t accepted the analytics site without the module"
fi
cat "$work/nginx-t.log"
grep -q 'unknown directive "analytics' "$work/nginx-t.log" \
    || fail "nginx -t did not fail on the module's directive"

step apt_purge_leaves_no_trace
quiet apt_get purge "$package"
! dpkg-query -W "$package" > /dev/null 2>&1 || fail "$package is still known to dpkg"
for leftover in /etc/nginx/modules-enabled/*analytics*; do
    if [ -e "$leftover" ] || [ -L "$leftover" ]; then
        fail "left in /etc/nginx/modules-enabled: $leftover"
    fi
done

step nginx_starts_without_module
cat > "$work/nginx/sites/analytics.conf" <<CONF
server {
    listen 127.0.0.1:$nginx_port;
    location / { return 204; }
}
CONF
/usr/sbin/nginx -t -c "$conf"
/usr/sbin/nginx -t
start_debian_nginx
status=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$nginx_port/")
[ "$status" = 204 ] || fail "nginx without the module answered $status"
stop_debian_nginx

step leaves_nothing_running
stop_all
pids=()
for port in "$nginx_port" "$influx_port" "$influx_rpc_port"; do
    port_is_closed "$port" || fail "port $port is still taken"
done
! pgrep -f -- "-c $conf" > /dev/null || fail "an nginx with $conf is still running"
# (The [emerg] of the refused site after removal is expected and not looked for here.)
! grep -E '\[(alert|crit)\]' "$work/nginx/error.log" || fail "nginx logged alerts"
