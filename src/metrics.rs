//! Live collector metrics across workers: the counters of [`crate::core::metrics::Metrics`] in
//! a shared memory zone (`analytics_metrics_zone`), and the `analytics_metrics;` location that
//! exposes them in the Prometheus text format or as JSON.
//!
//! The zone is added at configuration time with nginx's own `ngx_shared_memory_add`, so nginx
//! keeps it, and its counters, across `nginx -s reload` as long as its size stays the same (its
//! init callback finds the counters already in the zone's slab pool and reuses them); a restart
//! starts from zero. Counting is atomic adds, with no lock on the hot path.

use std::ffi::c_void;
use std::ptr;

use ngx::ffi::{
    ngx_conf_t, ngx_cycle_t, ngx_http_discard_request_body, ngx_http_request_t, ngx_int_t,
    ngx_shared_memory_add, ngx_shm_zone_t, ngx_slab_calloc, ngx_slab_pool_t, ngx_str_t, ngx_uint_t,
    NGX_HTTP_GET, NGX_HTTP_HEAD, NGX_HTTP_INTERNAL_SERVER_ERROR, NGX_LOG_EMERG, NGX_LOG_WARN,
};
use ngx::http::{HttpModuleMainConf, Request};
use ngx::{ngx_conf_log_error, ngx_log_error};

use crate::core::metrics::Metrics;
use crate::core::timestamp::unix_now_ns;
use crate::request::{metrics, no_panic, send_typed, set_metrics, NGX_ERROR, NGX_OK};
use crate::HttpAnalyticsModule;

/// Name of the shared memory zone.
const ZONE_NAME: &[u8] = b"ngx_http_analytics_metrics";

/// Default size of the zone (`analytics_metrics_zone`).
pub const DEFAULT_ZONE_SIZE: usize = 1024 * 1024;

/// Smallest zone that holds the counters and the slab pool's own bookkeeping.
pub const MIN_ZONE_SIZE: usize = 256 * 1024;

/// `analytics_metrics_zone`: unset (the default size), a size, or off.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ZoneSetting {
    /// Not set: [`DEFAULT_ZONE_SIZE`].
    #[default]
    Default,
    /// A size in bytes.
    Size(usize),
    /// No zone: nothing is counted, `analytics_metrics` answers 404.
    Off,
}

/// Main (http-level) configuration of the module.
#[derive(Debug)]
pub struct AnalyticsMainConf {
    /// `analytics_metrics_zone`.
    pub zone: ZoneSetting,
    /// Every event name of every `permitted_events`, the label values of the event counters.
    pub event_names: Vec<String>,
    /// This cycle's counters in the zone, once its init callback placed or found them.
    pub counters: *mut Metrics,
    /// Every sink with a spool (`analytics_spool` in an `analytics;` location).
    pub spool_sinks: Vec<crate::spool::SpoolSink>,
}

impl Default for AnalyticsMainConf {
    fn default() -> Self {
        AnalyticsMainConf {
            zone: ZoneSetting::Default,
            event_names: Vec::new(),
            counters: ptr::null_mut(),
            spool_sinks: Vec::new(),
        }
    }
}

/// Adds the metrics zone for this configuration (postconfiguration); its counters are set up
/// by [`zone_init`] once nginx has mapped it.
///
/// # Safety
/// `cf` must be the configuration context nginx passes to postconfiguration.
pub unsafe fn add_zone(cf: *mut ngx_conf_t) -> Result<(), ()> {
    // SAFETY: as the caller guarantees.
    let Some(mcf) = HttpAnalyticsModule::main_conf_mut(unsafe { &*cf }) else {
        return Err(());
    };
    let size = match mcf.zone {
        ZoneSetting::Off => return Ok(()),
        ZoneSetting::Default => DEFAULT_ZONE_SIZE,
        ZoneSetting::Size(size) => size,
    };
    let mut name = ngx_str_t {
        len: ZONE_NAME.len(),
        data: ZONE_NAME.as_ptr().cast_mut(),
    };
    let tag = ptr::addr_of!(crate::ngx_http_analytics_module)
        .cast_mut()
        .cast::<c_void>();
    // SAFETY: `cf` is valid; nginx copies nothing it does not own (the name is static).
    let zone = unsafe { ngx_shared_memory_add(cf, &mut name, size, tag) };
    // SAFETY: NULL or the zone nginx keeps in the cycle.
    let Some(zone) = (unsafe { zone.as_mut() }) else {
        ngx_conf_log_error!(NGX_LOG_EMERG, cf, "analytics: cannot add the metrics zone");
        return Err(());
    };
    zone.init = Some(zone_init);
    zone.data = ptr::from_mut(mcf).cast::<c_void>();
    Ok(())
}

/// Init callback of the zone (in the master, once it is mapped): finds the counters a zone
/// reused across a reload already holds, or places new ones in the zone; registers the
/// configured event names.
unsafe extern "C" fn zone_init(zone: *mut ngx_shm_zone_t, _old_data: *mut c_void) -> ngx_int_t {
    no_panic(NGX_ERROR, || {
        // SAFETY: nginx passes the zone it just mapped; its memory starts with the slab pool.
        let Some(zone) = (unsafe { zone.as_mut() }) else {
            return NGX_ERROR;
        };
        let pool = zone.shm.addr.cast::<ngx_slab_pool_t>();
        // SAFETY: a mapped zone's slab pool (set up by nginx before calling init).
        let existing = unsafe { (*pool).data }.cast::<Metrics>();
        let metrics = if existing.is_null() {
            // SAFETY: allocating zeroed memory from the zone's own pool (all zeroes is a valid,
            // empty `Metrics`); the pool's allocations are aligned to at least 8 bytes.
            let fresh = unsafe { ngx_slab_calloc(pool, size_of::<Metrics>()) }.cast::<Metrics>();
            if fresh.is_null() || fresh.align_offset(align_of::<Metrics>()) != 0 {
                return NGX_ERROR;
            }
            // SAFETY: as above; later cycles find the counters here.
            unsafe { (*pool).data = fresh.cast() };
            fresh
        } else {
            existing
        };
        // SAFETY: the zone's counters (just placed, or kept from the previous cycle).
        let counters = unsafe { &*metrics };
        counters.start(unix_now_ns() / 1_000_000_000);
        // SAFETY: `data` is this cycle's main configuration (set by `add_zone`).
        if let Some(mcf) = unsafe { zone.data.cast::<AnalyticsMainConf>().as_mut() } {
            // Published by `init_module` once the cycle can no longer fail.
            mcf.counters = metrics;
            let dropped = counters.register_events(mcf.event_names.iter().map(String::as_str));
            // SAFETY: the zone's log is the cycle's.
            if let (true, Some(log)) = (dropped > 0, unsafe { zone.shm.log.as_mut() }) {
                ngx_log_error!(
                    NGX_LOG_WARN,
                    log,
                    "analytics: {dropped} event name(s) beyond the metrics' capacity are counted \
                     as \"other\""
                );
            }
        }
        NGX_OK
    })
}

/// `init_module`: publishes this cycle's counters (or none) to the process. It runs after every
/// zone of the cycle was set up and when nothing can fail the cycle any more: a reload that fails
/// earlier (a port that cannot be bound) unmaps the new zone and keeps the old cycle, whose
/// counters must stay the ones counted into.
///
/// # Safety
/// Called by nginx with the cycle being initialized.
pub unsafe extern "C" fn init_module(cycle: *mut ngx_cycle_t) -> ngx_int_t {
    // SAFETY: nginx passes the valid new cycle.
    let counters = unsafe { cycle.as_ref() }
        .and_then(HttpAnalyticsModule::main_conf)
        .map_or(ptr::null_mut(), |mcf| mcf.counters);
    set_metrics(counters);
    NGX_OK
}

/// Content handler of a location with `analytics_metrics;`.
pub unsafe extern "C" fn metrics_handler(r: *mut ngx_http_request_t) -> ngx_int_t {
    // SAFETY: nginx calls a content handler with a valid request.
    let request = unsafe { Request::from_ngx_http_request(r) };
    no_panic(NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t, || {
        serve_metrics(request)
    })
}

fn serve_metrics(request: &mut Request) -> ngx_int_t {
    let r: *mut ngx_http_request_t = request.into();
    // SAFETY: the valid request of the content handler.
    let (method, args) = unsafe { ((*r).method, (*r).args) };
    // SAFETY: as above; discarding is how nginx answers without reading a body (a body left
    // unread would be taken for the connection's next request).
    let rc = unsafe { ngx_http_discard_request_body(r) };
    if rc != NGX_OK {
        return rc;
    }
    if method & (NGX_HTTP_GET | NGX_HTTP_HEAD) as ngx_uint_t == 0 {
        if request.add_header_out("Allow", "GET, HEAD").is_none() {
            return NGX_ERROR;
        }
        return send_typed(
            request,
            405,
            b"text/plain",
            b"only GET and HEAD are allowed\n",
        );
    }
    if request
        .add_header_out("Cache-Control", "no-store")
        .is_none()
    {
        return NGX_ERROR;
    }
    let Some(counters) = metrics() else {
        return send_typed(
            request,
            404,
            b"text/plain",
            b"no metrics: analytics_metrics_zone is off\n",
        );
    };
    let json = form_urlencoded::parse(args.as_bytes()).any(|(k, v)| k == "format" && v == "json");
    if json {
        let body = counters.to_json().to_string();
        send_typed(request, 200, b"application/json", body.as_bytes())
    } else {
        let body = counters.to_prometheus();
        send_typed(
            request,
            200,
            b"text/plain; version=0.0.4; charset=utf-8",
            body.as_bytes(),
        )
    }
}
