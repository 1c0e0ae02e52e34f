#!/usr/bin/env bash
# Installs the Debian 12 packages the build, the tests, the demo and the benchmark need.
# Packages already present are not reinstalled; apt runs only when something is missing.
set -euo pipefail

packages=(
    build-essential pkg-config   # cc for nginx (vendored build) and the module
    libclang-dev                 # bindgen (nginx-sys) loads libclang
    libpcre2-dev libssl-dev zlib1g-dev  # nginx's own dependencies
    influxdb influxdb-client     # InfluxDB 1.x: the sink in end-to-end tests and the demo
    curl wrk                     # demo and benchmark clients
    openssl                      # the demo login (openssl passwd -apr1)
    nghttp2-client               # h2load: HTTP/2 test client
    chromium chromium-driver     # browser tests of the agent (headless Chromium + chromedriver)
    nginx nginx-dev              # Debian's nginx and its source + flags: `make deb`, tests/install
    dpkg-dev lintian             # dpkg-shlibdeps for `make deb`; lintian checks the .deb
)

missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$package")
done

if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi

sudo=""
if [ "$(id -u)" -ne 0 ]; then
    sudo="sudo"
fi
# The nginx and influxdb packages would start system services on their default ports (80, 8086);
# the tests, the demo and the benchmark start their own nginx and influxd on free loopback
# ports and need none. Unless the system has a policy already, deny service starts while apt
# runs (invoke-rc.d and deb-systemd-invoke obey /usr/sbin/policy-rc.d).
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# Written by ngx-analytics scripts/install-deps.sh for apt.\nexit 101\n' \
        | $sudo tee "$policy" > /dev/null
    $sudo chmod 755 "$policy"
    trap '$sudo rm -f "$policy"' EXIT
fi

echo "installing: ${missing[*]}" >&2
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
