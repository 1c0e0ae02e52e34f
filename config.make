# objs/Makefile rules for ngx_http_analytics_module (sourced by nginx's configure after
# `config`, whose ngx_analytics_* variables it uses).
#
# The static library is phony: make cannot see the Rust sources and dependencies, so cargo
# runs on every `make` and decides itself what to rebuild. nginx-sys builds its bindings from
# this tree (NGINX_SOURCE_DIR, NGINX_BUILD_DIR); --no-default-features turns off the vendored
# nginx and the Rust-side `ngx_modules` table, which nginx generates here.

ngx_analytics_manifest=`cd "$ngx_addon_dir" && pwd`/Cargo.toml
ngx_analytics_nginx_source=`pwd`
ngx_analytics_nginx_build=`cd "$NGX_OBJS" && pwd`

cat << END                                                    >> $NGX_MAKEFILE

.PHONY: $ngx_analytics_lib

$ngx_analytics_lib:
	NGINX_SOURCE_DIR="$ngx_analytics_nginx_source" \\
	NGINX_BUILD_DIR="$ngx_analytics_nginx_build" \\
	$NGX_CARGO rustc --lib --crate-type staticlib --locked \\
		--manifest-path "$ngx_analytics_manifest" \\
		--no-default-features \\
		--profile $ngx_analytics_profile \\
		--target-dir $ngx_analytics_target_dir \\
		$NGX_RUSTC_OPT

$NGX_OBJS${ngx_dirsep}ngx_http_analytics_module$ngx_modext:	$ngx_analytics_lib

END
