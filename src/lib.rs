//! `ngx_http_analytics_module`: privacy-friendly web analytics inside nginx.
//!
//! A browser agent POSTs small JSON beacons (page views and named events) to a location marked
//! with `analytics;`. The module validates each beacon, encodes it as one InfluxDB line-protocol
//! point and writes it through a subrequest to an internal location that proxies to InfluxDB.
//!
//! This file only registers the module. The directives live in [`conf`], the request path in
//! `handler`, the one raw `ngx_http_subrequest` call in `subrequest`, and everything that can be
//! tested without nginx (payload schema, validation, line protocol, timestamps) in [`core`].

#![deny(clippy::undocumented_unsafe_blocks)]

use std::ffi::{c_char, c_void};
use std::ptr;

use ngx::core::{Pool, NGX_CONF_ERROR};
use ngx::ffi::{
    ngx_conf_t, ngx_cycle_t, ngx_http_module_t, ngx_int_t, ngx_module_t, ngx_uint_t,
    NGX_HTTP_MODULE,
};
use ngx::http::{HttpModule, HttpModuleLocationConf, HttpModuleMainConf, Merge};

use crate::request::no_panic;

mod agent;
mod batch;
pub mod conf;
pub mod core;
mod dashboard;
mod handler;
mod metrics;
mod report;
mod request;
mod spool;
mod subrequest;
mod variables;

/// Type that carries the module's nginx callbacks.
#[derive(Debug)]
pub struct HttpAnalyticsModule;

static NGX_HTTP_ANALYTICS_MODULE_CTX: ngx_http_module_t = ngx_http_module_t {
    preconfiguration: Some(HttpAnalyticsModule::preconfiguration),
    postconfiguration: Some(HttpAnalyticsModule::postconfiguration),
    create_main_conf: Some(create_main_conf),
    init_main_conf: None,
    create_srv_conf: None,
    merge_srv_conf: None,
    create_loc_conf: Some(create_loc_conf),
    merge_loc_conf: Some(merge_loc_conf),
};

// The exported `ngx_modules` table is what lets nginx `load_module` a cdylib built outside its
// build system. nginx's own build (`config`) generates that table in C instead, so it is left
// out there (feature `export-modules` off), and in unit-test builds, which do not link nginx.
#[cfg(all(not(test), feature = "export-modules"))]
ngx::ngx_modules!(ngx_http_analytics_module);

/// The nginx module definition (`ngx_http_analytics_module`). Exported under its own name for
/// the `ngx_modules` table that nginx's build generates.
#[cfg_attr(not(test), used, no_mangle)]
#[allow(non_upper_case_globals)]
pub static mut ngx_http_analytics_module: ngx_module_t = ngx_module_t {
    ctx: ptr::addr_of!(NGX_HTTP_ANALYTICS_MODULE_CTX)
        .cast_mut()
        .cast(),
    // SAFETY: only the address of the command table is taken; nginx reads it at configuration
    // time from the single configuration thread.
    commands: unsafe { ptr::addr_of_mut!(conf::NGX_HTTP_ANALYTICS_COMMANDS[0]) },
    type_: NGX_HTTP_MODULE as ngx_uint_t,
    init_module: Some(metrics::init_module),
    init_process: Some(init_process),
    exit_process: Some(exit_process),
    ..ngx_module_t::default()
};

impl HttpModule for HttpAnalyticsModule {
    fn module() -> &'static ngx_module_t {
        // SAFETY: nginx writes the module's indices while loading it, before any request or
        // configuration callback can call this; afterwards the static is only read.
        unsafe { &*ptr::addr_of!(ngx_http_analytics_module) }
    }

    unsafe extern "C" fn preconfiguration(cf: *mut ngx_conf_t) -> ngx_int_t {
        no_panic(NGX_ERROR, || match variables::add_variables(cf) {
            Ok(()) => NGX_OK,
            Err(()) => NGX_ERROR,
        })
    }

    unsafe extern "C" fn postconfiguration(cf: *mut ngx_conf_t) -> ngx_int_t {
        no_panic(NGX_ERROR, || {
            // SAFETY: nginx runs postconfiguration once per cycle on its configuration thread,
            // after every filter module has put its filters in the chains.
            unsafe { subrequest::install_filters() };
            // SAFETY: the configuration context nginx passed.
            if unsafe { metrics::add_zone(cf) }.is_err() {
                return NGX_ERROR;
            }
            // SAFETY: as above.
            let Some(mcf) = HttpAnalyticsModule::main_conf_mut(unsafe { &*cf }) else {
                return NGX_ERROR;
            };
            // SAFETY: as above.
            let checked = unsafe { spool::settle_identities(cf, &mut mcf.spool_sinks) }
                // SAFETY: as above.
                .and_then(|()| unsafe { spool::check_directories(cf, &mcf.spool_sinks) });
            match checked {
                Ok(()) => NGX_OK,
                Err(message) => {
                    ngx::ngx_conf_log_error!(ngx::ffi::NGX_LOG_EMERG, cf, "{message}");
                    NGX_ERROR
                }
            }
        })
    }
}

// The configuration callbacks are written here rather than taken from `HttpModule`'s defaults
// so that a panic becomes a configuration error: a panic cannot unwind out of an
// `extern "C"` function, and aborting would take the master process down on `nginx -s reload`.

/// Creates the main configuration (the default metrics zone, no event names yet).
unsafe extern "C" fn create_main_conf(cf: *mut ngx_conf_t) -> *mut c_void {
    no_panic(ptr::null_mut(), || {
        // SAFETY: nginx passes a valid configuration context with its pool.
        let pool = unsafe { Pool::from_ngx_pool((*cf).pool) };
        pool.allocate(metrics::AnalyticsMainConf::default())
            .cast::<c_void>()
    })
}

/// Creates the location configuration (all settings unset).
unsafe extern "C" fn create_loc_conf(cf: *mut ngx_conf_t) -> *mut c_void {
    no_panic(ptr::null_mut(), || {
        // SAFETY: nginx passes a valid configuration context with its pool.
        let pool = unsafe { Pool::from_ngx_pool((*cf).pool) };
        pool.allocate(conf::AnalyticsLocConf::default())
            .cast::<c_void>()
    })
}

/// Merges a location configuration with the one of the enclosing level, and registers the sink
/// of an `analytics;` location that has a spool.
unsafe extern "C" fn merge_loc_conf(
    cf: *mut ngx_conf_t,
    prev: *mut c_void,
    conf: *mut c_void,
) -> *mut c_char {
    no_panic(NGX_CONF_ERROR, || {
        // SAFETY: both pointers come from `create_loc_conf` above; nginx passes distinct ones.
        let (Some(prev), Some(conf)) = (unsafe {
            (
                prev.cast::<conf::AnalyticsLocConf>().as_ref(),
                conf.cast::<conf::AnalyticsLocConf>().as_mut(),
            )
        }) else {
            return NGX_CONF_ERROR;
        };
        if conf.merge(prev).is_err() {
            return NGX_CONF_ERROR;
        }
        if let (true, Some(spool), Some(uri)) = (conf.endpoint, conf.spool(), conf.write_uri()) {
            // SAFETY: nginx passes `merge_loc_conf` the context of the server block it merges.
            if let Err(message) = unsafe { spool::register(cf, uri, spool, conf.batch_limits()) } {
                ngx::ngx_conf_log_error!(ngx::ffi::NGX_LOG_EMERG, cf, "analytics_spool {message}");
                return NGX_CONF_ERROR;
            }
        }
        ptr::null_mut()
    })
}

/// `init_process`: sets up the worker's spools (and looks for files left by earlier workers).
unsafe extern "C" fn init_process(cycle: *mut ngx_cycle_t) -> ngx_int_t {
    no_panic(NGX_OK, || {
        // SAFETY: nginx passes the worker's valid cycle.
        if let Some(cycle) = unsafe { cycle.as_ref() } {
            spool::init_process(cycle);
        }
        NGX_OK
    })
}

/// `exit_process`: spools or logs the lines still waiting for a write, then closes the spools.
unsafe extern "C" fn exit_process(cycle: *mut ngx_cycle_t) {
    // SAFETY: nginx passes the exiting cycle.
    unsafe { batch::exit_process(cycle) };
    no_panic((), spool::exit_process);
}

const NGX_OK: ngx_int_t = ngx::core::Status::NGX_OK.0;
const NGX_ERROR: ngx_int_t = ngx::core::Status::NGX_ERROR.0;

// SAFETY: `create_loc_conf` allocates exactly `conf::AnalyticsLocConf` for this module.
unsafe impl HttpModuleLocationConf for HttpAnalyticsModule {
    type LocationConf = conf::AnalyticsLocConf;
}

// SAFETY: `create_main_conf` allocates exactly `metrics::AnalyticsMainConf` for this module.
unsafe impl ngx::http::HttpModuleMainConf for HttpAnalyticsModule {
    type MainConf = metrics::AnalyticsMainConf;
}
