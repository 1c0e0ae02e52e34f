#!/usr/bin/env bash
# Builds target/debian/libnginx-mod-http-analytics_<version>_<arch>.deb for Debian's own nginx
# (`make deb`), laid out like Debian's libnginx-mod-* packages:
#
#   /usr/lib/nginx/modules/ngx_http_analytics_module.so
#   /usr/share/nginx/modules-available/mod-http-analytics.conf   (the load_module line)
#   /etc/nginx/modules-enabled/50-mod-http-analytics.conf        (link made by postinst)
#   /usr/share/doc/libnginx-mod-http-analytics/                  (README, example, copyright)
#
# The module is built the way Debian builds its own modules (dh_nginx): the nginx source from
# the nginx-dev package, configured with Debian's flags (conf_flags) and build flags
# (dpkg-buildflags), `--add-dynamic-module` of this repository, `make modules`. It depends on
# the nginx ABI that nginx-dev names (nginx-abi-1.22.1-7 on Debian 12), so apt refuses an
# nginx it would not load into. The package is assembled with dpkg-deb from packaging/deb.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
umask 022

package=libnginx-mod-http-analytics
out=${DEB_OUT_DIR:-$root/target/debian}
build=$out/build
nginx_dev=/usr/share/nginx/src
maintainer=${DEB_MAINTAINER:-"ngx-analytics maintainers \
<maintainers@users.noreply.r-seed-0f085166.example>"}

die() {
    echo "build-deb: $*" >&2
    exit 1
}
for tool in dpkg-deb dpkg-shlibdeps dpkg-buildflags cargo strip; do
    command -v "$tool" > /dev/null || die "$tool not found (make deps installs it)"
done
[ -f "$nginx_dev/conf_flags" ] || die "$nginx_dev not found: install nginx-dev"

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | sed -n 1p)
arch=$(dpkg --print-architecture)
abi=$(sed -n 's/^nginx:abi=//p' "$nginx_dev/debian/libnginx-mod.abisubstvars")
nginx_version=$(sed -n 's/^#define NGINX_VERSION *"\(.*\)"/\1/p' "$nginx_dev/src/core/nginx.h")
[ -n "$version" ] && [ -n "$abi" ] && [ -n "$nginx_version" ] \
    || die "cannot read the version, the nginx ABI or the nginx version"
deb=$out/${package}_${version}_${arch}.deb
echo "==> $package $version for nginx $nginx_version ($abi), $arch"

# 1. The module, through nginx's build system, with Debian's configure and compiler flags.
rm -rf "$build"
mkdir -p "$build"
cp -r "$nginx_dev" "$build/nginx-$nginx_version"
(
    cd "$build/nginx-$nginx_version"
    # shellcheck disable=SC1091
    . ./conf_flags
    export DEB_BUILD_MAINT_OPTIONS=hardening=+all
    ./configure \
        --with-cc-opt="$(dpkg-buildflags --get CFLAGS) $(dpkg-buildflags --get CPPFLAGS) -fPIC" \
        --with-ld-opt="$(dpkg-buildflags --get LDFLAGS) -fPIC" \
        "${NGX_CONF_FLAGS[@]}" \
        --add-dynamic-module="$root" > "$build/configure.log" 2>&1 \
        || { tail -n 40 "$build/configure.log" >&2; exit 1; }
    echo "==> make modules (cargo builds the module; log: $build/make.log)"
    # nginx-dev ships no top-level Makefile template: use objs/Makefile, as dh_nginx does.
    make -f objs/Makefile modules > "$build/make.log" 2>&1 \
        || { tail -n 60 "$build/make.log" >&2; exit 1; }
)
so=$build/nginx-$nginx_version/objs/ngx_http_analytics_module.so

# 2. The package tree.
pkg=$build/pkg
doc=$pkg/usr/share/doc/$package
install -d "$pkg/DEBIAN" "$pkg/usr/lib/nginx/modules" "$pkg/usr/share/nginx/modules-available" \
    "$doc/examples"
# As dh_strip does for shared libraries.
strip --remove-section=.comment --remove-section=.note --strip-unneeded \
    -o "$pkg/usr/lib/nginx/modules/ngx_http_analytics_module.so" "$so"
chmod 644 "$pkg/usr/lib/nginx/modules/ngx_http_analytics_module.so"
echo "load_module modules/ngx_http_analytics_module.so;" \
    > "$pkg/usr/share/nginx/modules-available/mod-http-analytics.conf"

# Documentation: compressed as dh_compress does (files over 4 KiB), the example as it is.
install -m 644 nginx-conf/nginx.conf "$doc/examples/nginx.conf"
gzip -9n < README.md > "$doc/README.md.gz"
gzip -9n < CHANGELOG.md > "$doc/changelog.gz"
# The statically linked crates and their licenses, for the copyright file; every license
# expression must allow Apache-2.0 or MIT, the two texts copyright.in carries.
crates=$(cargo tree --locked --no-default-features -e normal,no-proc-macro --prefix none \
    --format '{p} {l}' | sed -e 's/ (\*)$//' -e 's/ ([^)]*)//' | sort -u \
    | grep -v '^ngx-analytics ')
uncovered=$(echo "$crates" | grep -Ev '(Apache-2\.0|MIT)' || true)
[ -z "$uncovered" ] || die "licenses not covered by packaging/deb/copyright.in: $uncovered"
crates=$(echo "$crates" | sed -e 's/^/  /')
# Dates come from the history (or SOURCE_DATE_EPOCH), so a rebuild gives the same files.
epoch=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || stat -c %Y Cargo.toml)}
first_year=$(git log --reverse --format=%cd --date=format:%Y 2>/dev/null | sed -n 1p)
last_year=$(date -u -d "@$epoch" +%Y)
years=${first_year:-$last_year}
[ "$years" = "$last_year" ] || years="$years-$last_year"
awk -v crates="$crates" -v years="$years" \
    '{ sub(/@YEARS@/, years); if ($0 == "@CRATES@") print crates; else print }' \
    packaging/deb/copyright.in > "$doc/copyright"
# The project's CHANGELOG.md is changelog.gz; Debian's changelog names the package version.
date=$(date -R -u -d "@$epoch")
{
    echo "$package ($version) unstable; urgency=medium"
    echo
    echo "  * ngx-analytics $version; its changes are in changelog.gz."
    echo
    echo " -- $maintainer  $date"
} | gzip -9n > "$doc/changelog.Debian.gz"

# 3. Control files.
install -m 755 packaging/deb/postinst packaging/deb/prerm packaging/deb/postrm "$pkg/DEBIAN/"
# dpkg-shlibdeps wants a debian/control naming the package.
mkdir -p "$build/shlibs/debian"
printf 'Source: ngx-analytics\n\nPackage: %s\nArchitecture: any\n' "$package" \
    > "$build/shlibs/debian/control"
shlibs=$(cd "$build/shlibs" \
    && dpkg-shlibdeps -O "-e$pkg/usr/lib/nginx/modules/ngx_http_analytics_module.so" \
    | sed -n 's/^shlibs:Depends=//p')
installed_size=$(du -sk --exclude=DEBIAN "$pkg" | cut -f1)
sed -e "s|@VERSION@|$version|" -e "s|@ARCH@|$arch|" -e "s|@MAINTAINER@|$maintainer|" \
    -e "s|@INSTALLED_SIZE@|$installed_size|" -e "s|@DEPENDS@|$abi, $shlibs|" \
    packaging/deb/control.in > "$pkg/DEBIAN/control"
(cd "$pkg" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z \
    | xargs -0 md5sum) > "$pkg/DEBIAN/md5sums"
chmod 644 "$pkg/DEBIAN/control" "$pkg/DEBIAN/md5sums"

# 4. The archive.
dpkg-deb --root-owner-group -Zxz --build "$pkg" "$deb" > /dev/null
echo "==> $deb"
dpkg-deb --info "$deb" | sed -n '/Package:/,$p'
dpkg-deb --contents "$deb"
