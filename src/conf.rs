//! Directives of `ngx_http_analytics_module` and their location configuration.
//!
//! Every setting is `Option<T>` while unset, inherited from the enclosing level by [`Merge`], and
//! given its default in one place: the accessor methods of [`AnalyticsLocConf`].

use std::ffi::{c_char, c_void};
use std::ptr;
use std::sync::Arc;

use ngx::core::{NGX_CONF_ERROR, NGX_CONF_OK};
use ngx::ffi::{
    ngx_command_t, ngx_conf_t, ngx_http_request_t, ngx_int_t, ngx_parse_size, ngx_str_t,
    ngx_uint_t, NGX_CONF_1MORE, NGX_CONF_NOARGS, NGX_CONF_TAKE1, NGX_CONF_TAKE2, NGX_HTTP_LOC_CONF,
    NGX_HTTP_LOC_CONF_OFFSET, NGX_HTTP_MAIN_CONF, NGX_HTTP_SRV_CONF, NGX_LOG_EMERG,
};
use ngx::http::{
    HttpModuleLocationConf, HttpModuleMainConf, Merge, MergeConfigError, NgxHttpCoreModule,
};
use ngx::{ngx_conf_log_error, ngx_string};

use crate::core::batch::{parse_batch_args, BatchLimits};
use crate::core::line_protocol::SessionStorage;
use crate::core::policy::{
    push_event_names, validate_measurement_name, DomainPattern, Measurements,
};
use crate::core::spool::parse_spool_args;
use crate::metrics::{AnalyticsMainConf, ZoneSetting, MIN_ZONE_SIZE};
use crate::spool::{conf_from_settings, SpoolConf};
use crate::HttpAnalyticsModule;

/// Default URI of the internal location that receives the line protocol.
pub const DEFAULT_WRITE_URI: &str = "/_analytics/write";

/// Default URI of the internal location that proxies report queries to InfluxDB's `/query`.
pub const DEFAULT_QUERY_URI: &str = "/_analytics/query";

/// Default largest accepted beacon body, in bytes (`analytics_max_body_size`).
pub const DEFAULT_MAX_BODY_SIZE: usize = 8 * 1024;

/// Largest value `analytics_max_body_size` accepts: beacons are small, and bodies are held in
/// memory while they are parsed.
pub const MAX_MAX_BODY_SIZE: usize = 1024 * 1024;

/// Where accepted points go (`analytics_write`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WriteTarget {
    /// Validate and answer, write nothing (dry run).
    Off,
    /// URI of an internal location, written to with a POST subrequest.
    Uri(String),
}

/// When the client gets its answer relative to the write (`analytics_write_mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteMode {
    /// Answer after the write finished: 204 when the sink answered 2xx, 502 otherwise.
    Wait,
    /// Answer 204 at once; a failed write is only logged.
    Background,
}

/// Location configuration of the module. `None` means "not set at this level".
#[derive(Debug, Default)]
pub struct AnalyticsLocConf {
    /// `permitted_events`: lowercased event names accepted; unset = none.
    pub permitted_events: Option<Vec<String>>,
    /// `analytics_domains`: accepted beacon domains; unset = the request's own host.
    pub accepted_domains: Option<Vec<DomainPattern>>,
    /// `analytics_write`.
    pub write: Option<WriteTarget>,
    /// `analytics_write_mode`.
    pub write_mode: Option<WriteMode>,
    /// `analytics_measurements`.
    pub measurements: Option<Measurements>,
    /// `analytics_max_body_size`, in bytes.
    pub max_body_size: Option<usize>,
    /// `analytics_batch`.
    pub batch: Option<BatchLimits>,
    /// `analytics_cors_origins`: lowercased origins (or `*`) that may POST from another origin.
    pub cors_origins: Option<Vec<String>>,
    /// `analytics_drop_bots`.
    pub drop_bots: Option<bool>,
    /// `analytics_query`.
    pub query_uri: Option<String>,
    /// `analytics_dashboard`: the page this location serves.
    pub dashboard: Option<Arc<crate::dashboard::DashboardPage>>,
    /// `analytics_session`.
    pub session: Option<SessionStorage>,
    /// `analytics_spool`: `Some(None)` is `off`.
    pub spool: Option<Option<Arc<SpoolConf>>>,
    /// The location has `analytics;` (not inherited).
    pub endpoint: bool,
}

impl AnalyticsLocConf {
    /// Event names accepted here (empty: no event accepted).
    pub fn permitted_events(&self) -> &[String] {
        self.permitted_events.as_deref().unwrap_or(&[])
    }

    /// Accepted domains, or `None` for "the request's own host only".
    pub fn accepted_domains(&self) -> Option<&[DomainPattern]> {
        self.accepted_domains.as_deref()
    }

    /// URI to write to, or `None` when writing is off.
    pub fn write_uri(&self) -> Option<&str> {
        match &self.write {
            Some(WriteTarget::Off) => None,
            Some(WriteTarget::Uri(uri)) => Some(uri),
            None => Some(DEFAULT_WRITE_URI),
        }
    }

    /// Write mode (default `wait`).
    pub fn write_mode(&self) -> WriteMode {
        self.write_mode.unwrap_or(WriteMode::Wait)
    }

    /// Measurement names (default `pf_analytics`, `pf_analytics_event`).
    pub fn measurements(&self) -> &Measurements {
        static DEFAULT: std::sync::OnceLock<Measurements> = std::sync::OnceLock::new();
        match &self.measurements {
            Some(m) => m,
            None => DEFAULT.get_or_init(Measurements::default),
        }
    }

    /// Batch limits (default: on, see [`BatchLimits::default`]).
    pub fn batch_limits(&self) -> BatchLimits {
        self.batch.unwrap_or_default()
    }

    /// Whether `origin` may send beacons from another origin (default: no origin may).
    pub fn cors_allows(&self, origin: &str) -> bool {
        self.cors_origins
            .as_deref()
            .unwrap_or(&[])
            .iter()
            .any(|allowed| allowed == "*" || allowed.eq_ignore_ascii_case(origin))
    }

    /// Whether beacons from crawlers and automation are dropped (default on).
    pub fn drop_bots(&self) -> bool {
        self.drop_bots.unwrap_or(true)
    }

    /// URI of the internal location that proxies report queries to InfluxDB.
    pub fn query_uri(&self) -> &str {
        self.query_uri.as_deref().unwrap_or(DEFAULT_QUERY_URI)
    }

    /// Where `sess_id` goes in a point (default: a string field).
    pub fn session(&self) -> SessionStorage {
        self.session.unwrap_or_default()
    }

    /// Largest accepted body in bytes.
    pub fn max_body_size(&self) -> usize {
        self.max_body_size.unwrap_or(DEFAULT_MAX_BODY_SIZE)
    }

    /// The spool failed writes go to (default: none).
    pub fn spool(&self) -> Option<&Arc<SpoolConf>> {
        self.spool.as_ref().and_then(Option::as_ref)
    }
}

fn inherit<T: Clone>(value: &mut Option<T>, prev: &Option<T>) {
    if value.is_none() {
        value.clone_from(prev);
    }
}

impl Merge for AnalyticsLocConf {
    fn merge(&mut self, prev: &Self) -> Result<(), MergeConfigError> {
        inherit(&mut self.permitted_events, &prev.permitted_events);
        inherit(&mut self.accepted_domains, &prev.accepted_domains);
        inherit(&mut self.write, &prev.write);
        inherit(&mut self.write_mode, &prev.write_mode);
        inherit(&mut self.measurements, &prev.measurements);
        inherit(&mut self.max_body_size, &prev.max_body_size);
        inherit(&mut self.batch, &prev.batch);
        inherit(&mut self.cors_origins, &prev.cors_origins);
        inherit(&mut self.drop_bots, &prev.drop_bots);
        inherit(&mut self.query_uri, &prev.query_uri);
        // For `if` blocks inside a dashboard location, which keep its content handler.
        inherit(&mut self.dashboard, &prev.dashboard);
        inherit(&mut self.session, &prev.session);
        inherit(&mut self.spool, &prev.spool);
        Ok(())
    }
}

const ANY_LEVEL: u32 = NGX_HTTP_MAIN_CONF | NGX_HTTP_SRV_CONF | NGX_HTTP_LOC_CONF;

const fn command(
    name: ngx_str_t,
    type_: u32,
    set: unsafe extern "C" fn(*mut ngx_conf_t, *mut ngx_command_t, *mut c_void) -> *mut c_char,
) -> ngx_command_t {
    ngx_command_t {
        name,
        type_: type_ as ngx_uint_t,
        set: Some(set),
        conf: NGX_HTTP_LOC_CONF_OFFSET,
        offset: 0,
        post: ptr::null_mut(),
    }
}

/// The module's directive table (terminated by an empty command, as nginx expects).
pub static mut NGX_HTTP_ANALYTICS_COMMANDS: [ngx_command_t; 19] = [
    command(
        ngx_string!("analytics"),
        NGX_HTTP_LOC_CONF | NGX_CONF_NOARGS,
        cmd_analytics,
    ),
    command(
        ngx_string!("analytics_agent"),
        NGX_HTTP_LOC_CONF | NGX_CONF_NOARGS,
        cmd_agent,
    ),
    command(
        ngx_string!("analytics_dashboard"),
        NGX_HTTP_LOC_CONF | NGX_CONF_NOARGS | NGX_CONF_TAKE1,
        cmd_dashboard,
    ),
    command(
        ngx_string!("permitted_events"),
        ANY_LEVEL | NGX_CONF_1MORE,
        cmd_permitted_events,
    ),
    command(
        ngx_string!("analytics_domains"),
        ANY_LEVEL | NGX_CONF_1MORE,
        cmd_domains,
    ),
    command(
        ngx_string!("analytics_write"),
        ANY_LEVEL | NGX_CONF_TAKE1,
        cmd_write,
    ),
    command(
        ngx_string!("analytics_write_mode"),
        ANY_LEVEL | NGX_CONF_TAKE1,
        cmd_write_mode,
    ),
    command(
        ngx_string!("analytics_measurements"),
        ANY_LEVEL | NGX_CONF_TAKE2,
        cmd_measurements,
    ),
    command(
        ngx_string!("analytics_max_body_size"),
        ANY_LEVEL | NGX_CONF_TAKE1,
        cmd_max_body_size,
    ),
    command(
        ngx_string!("analytics_batch"),
        ANY_LEVEL | NGX_CONF_1MORE,
        cmd_batch,
    ),
    command(
        ngx_string!("analytics_cors_origins"),
        ANY_LEVEL | NGX_CONF_1MORE,
        cmd_cors_origins,
    ),
    command(
        ngx_string!("analytics_drop_bots"),
        ANY_LEVEL | NGX_CONF_TAKE1,
        cmd_drop_bots,
    ),
    command(
        ngx_string!("analytics_report"),
        NGX_HTTP_LOC_CONF | NGX_CONF_NOARGS,
        cmd_report,
    ),
    command(
        ngx_string!("analytics_query"),
        ANY_LEVEL | NGX_CONF_TAKE1,
        cmd_query,
    ),
    command(
        ngx_string!("analytics_session"),
        ANY_LEVEL | NGX_CONF_TAKE1,
        cmd_session,
    ),
    command(
        ngx_string!("analytics_spool"),
        ANY_LEVEL | NGX_CONF_1MORE,
        cmd_spool,
    ),
    command(
        ngx_string!("analytics_metrics"),
        NGX_HTTP_LOC_CONF | NGX_CONF_NOARGS,
        cmd_metrics,
    ),
    command(
        ngx_string!("analytics_metrics_zone"),
        NGX_HTTP_MAIN_CONF | NGX_CONF_TAKE1,
        cmd_metrics_zone,
    ),
    ngx_command_t::empty(),
];

/// What a directive handler needs: the directive's arguments and the configuration it sets.
struct Directive<'a> {
    cf: *mut ngx_conf_t,
    /// Arguments after the directive name.
    args: Vec<&'a str>,
    conf: &'a mut AnalyticsLocConf,
}

/// Runs a directive handler with its arguments as UTF-8 strings and turns its error text into an
/// `[emerg]` line naming the directive (nginx adds the file and line).
///
/// # Safety
/// `cf` and `conf` must be the pointers nginx passes to a directive handler of this module.
unsafe fn run_directive(
    cf: *mut ngx_conf_t,
    conf: *mut c_void,
    handler: fn(&mut Directive) -> Result<(), String>,
) -> *mut c_char {
    // SAFETY: nginx passes a valid configuration context; its `args` array holds `ngx_str_t`s
    // (the directive name first) that live in the configuration pool for the whole cycle.
    let raw_args: &[ngx_str_t] = match unsafe { (*cf).args.as_ref() } {
        // SAFETY: see above: the array's elements are `ngx_str_t`.
        Some(array) => unsafe { array.as_slice() },
        None => return NGX_CONF_ERROR,
    };
    let Some((name, rest)) = raw_args.split_first() else {
        return NGX_CONF_ERROR;
    };
    let name = String::from_utf8_lossy(name.as_bytes()).into_owned();
    let mut args = Vec::with_capacity(rest.len());
    for arg in rest {
        match arg.to_str() {
            Ok(arg) => args.push(arg),
            Err(_) => {
                ngx_conf_log_error!(NGX_LOG_EMERG, cf, "\"{name}\" directive: invalid UTF-8");
                return NGX_CONF_ERROR;
            }
        }
    }
    // SAFETY: `conf` is this module's location configuration (`conf: NGX_HTTP_LOC_CONF_OFFSET`
    // in every command), created by `create_loc_conf` as an `AnalyticsLocConf`.
    let Some(conf) = (unsafe { conf.cast::<AnalyticsLocConf>().as_mut() }) else {
        return NGX_CONF_ERROR;
    };
    let mut directive = Directive { cf, args, conf };
    // A panic must not unwind into nginx (it would abort the master on reload).
    let result = crate::request::no_panic(Err("failed (internal error)".to_string()), || {
        handler(&mut directive)
    });
    match result {
        Ok(()) => NGX_CONF_OK,
        Err(message) => {
            ngx_conf_log_error!(NGX_LOG_EMERG, cf, "\"{name}\" directive {message}");
            NGX_CONF_ERROR
        }
    }
}

/// Generates the `extern "C"` entry point nginx calls for one directive.
macro_rules! directive_handler {
    ($name:ident, $body:path) => {
        unsafe extern "C" fn $name(
            cf: *mut ngx_conf_t,
            _cmd: *mut ngx_command_t,
            conf: *mut c_void,
        ) -> *mut c_char {
            // SAFETY: called by nginx with the pointers of a directive of this module.
            unsafe { run_directive(cf, conf, $body) }
        }
    };
}

directive_handler!(cmd_analytics, set_analytics);
directive_handler!(cmd_agent, set_agent);
directive_handler!(cmd_dashboard, set_dashboard);
directive_handler!(cmd_batch, set_batch);
directive_handler!(cmd_cors_origins, set_cors_origins);
directive_handler!(cmd_drop_bots, set_drop_bots);
directive_handler!(cmd_session, set_session);
directive_handler!(cmd_permitted_events, set_permitted_events);
directive_handler!(cmd_domains, set_domains);
directive_handler!(cmd_write, set_write);
directive_handler!(cmd_write_mode, set_write_mode);
directive_handler!(cmd_measurements, set_measurements);
directive_handler!(cmd_max_body_size, set_max_body_size);
directive_handler!(cmd_report, set_report);
directive_handler!(cmd_metrics, set_metrics);
directive_handler!(cmd_metrics_zone, set_metrics_zone);
directive_handler!(cmd_query, set_query);
directive_handler!(cmd_spool, set_spool);

fn duplicate<T>(value: &Option<T>) -> Result<(), String> {
    match value {
        Some(_) => Err("is duplicate".to_string()),
        None => Ok(()),
    }
}

fn set_analytics(d: &mut Directive) -> Result<(), String> {
    // Compile the bot list now, in the master, so every worker inherits it ready to use.
    crate::core::bots::matcher()?;
    set_content_handler(d, crate::handler::analytics_handler)?;
    d.conf.endpoint = true;
    Ok(())
}

fn set_spool(d: &mut Directive) -> Result<(), String> {
    duplicate(&d.conf.spool)?;
    d.conf.spool = Some(match parse_spool_args(&d.args)? {
        None => None,
        // SAFETY: `d.cf` is the configuration context of this directive.
        Some(settings) => Some(Arc::new(unsafe { conf_from_settings(d.cf, &settings) }?)),
    });
    Ok(())
}

/// Makes this module's `handler` the content handler of the location being parsed.
fn set_content_handler(d: &mut Directive, handler: ContentHandler) -> Result<(), String> {
    // SAFETY: `d.cf` is the configuration context of the location being parsed.
    let clcf = NgxHttpCoreModule::location_conf_mut(unsafe { &*d.cf })
        .ok_or("has no core location configuration")?;
    if clcf.handler.is_some() {
        return Err("is duplicate, or the location already has a content handler".to_string());
    }
    clcf.handler = Some(handler);
    Ok(())
}

type ContentHandler = unsafe extern "C" fn(*mut ngx_http_request_t) -> ngx_int_t;

fn set_batch(d: &mut Directive) -> Result<(), String> {
    duplicate(&d.conf.batch)?;
    d.conf.batch = Some(parse_batch_args(&d.args)?);
    Ok(())
}

fn set_cors_origins(d: &mut Directive) -> Result<(), String> {
    duplicate(&d.conf.cors_origins)?;
    let mut origins = Vec::with_capacity(d.args.len());
    for arg in &d.args {
        let origin = arg.to_ascii_lowercase();
        let host = origin
            .strip_prefix("https://")
            .or_else(|| origin.strip_prefix("http://"));
        let valid = origin == "*"
            || host.is_some_and(|host| {
                !host.is_empty()
                    && host
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b))
            });
        if !valid {
            return Err(format!(
                "takes origins like \"https://www.example.com\" (scheme, host, optional port) \
                 or \"*\", not \"{arg}\""
            ));
        }
        origins.push(origin);
    }
    d.conf.cors_origins = Some(origins);
    Ok(())
}

fn set_drop_bots(d: &mut Directive) -> Result<(), String> {
    duplicate(&d.conf.drop_bots)?;
    d.conf.drop_bots = match d.args[..] {
        ["on"] => Some(true),
        ["off"] => Some(false),
        _ => return Err("takes \"on\" or \"off\"".to_string()),
    };
    Ok(())
}

fn set_report(d: &mut Directive) -> Result<(), String> {
    set_content_handler(d, crate::report::report_handler)
}

fn set_query(d: &mut Directive) -> Result<(), String> {
    duplicate(&d.conf.query_uri)?;
    match d.args[..] {
        [uri] if uri.starts_with('/') && !uri.bytes().any(|b| b.is_ascii_whitespace()) => {
            d.conf.query_uri = Some(uri.to_string());
            Ok(())
        }
        _ => Err("takes a URI starting with \"/\"".to_string()),
    }
}

fn set_session(d: &mut Directive) -> Result<(), String> {
    duplicate(&d.conf.session)?;
    let session = match d.args[..] {
        [arg] => SessionStorage::parse(arg),
        _ => None,
    };
    d.conf.session = Some(session.ok_or("takes \"field\", \"tag\" or \"off\"")?);
    Ok(())
}

fn set_agent(d: &mut Directive) -> Result<(), String> {
    set_content_handler(d, crate::agent::agent_handler)
}

fn set_dashboard(d: &mut Directive) -> Result<(), String> {
    let page = crate::dashboard::DashboardPage::new(d.args.first().copied())?;
    set_content_handler(d, crate::dashboard::dashboard_handler)?;
    d.conf.dashboard = Some(Arc::new(page));
    Ok(())
}

fn set_permitted_events(d: &mut Directive) -> Result<(), String> {
    duplicate(&d.conf.permitted_events)?;
    let mut names = Vec::new();
    for arg in &d.args {
        push_event_names(&mut names, arg)?;
    }
    // Every configured name is a label value of the event counters.
    let mcf = main_conf(d)?;
    for name in &names {
        if !mcf.event_names.contains(name) {
            mcf.event_names.push(name.clone());
        }
    }
    d.conf.permitted_events = Some(names);
    Ok(())
}

/// The module's main configuration of the `http` block being parsed.
fn main_conf<'a>(d: &Directive) -> Result<&'a mut AnalyticsMainConf, String> {
    // SAFETY: `d.cf` is the configuration context of a directive in an `http` block.
    HttpAnalyticsModule::main_conf_mut(unsafe { &*d.cf })
        .ok_or_else(|| "has no main configuration".to_string())
}

fn set_metrics(d: &mut Directive) -> Result<(), String> {
    set_content_handler(d, crate::metrics::metrics_handler)
}

fn set_metrics_zone(d: &mut Directive) -> Result<(), String> {
    let mcf = main_conf(d)?;
    if mcf.zone != ZoneSetting::Default {
        return Err("is duplicate".to_string());
    }
    mcf.zone = match d.args[..] {
        ["off"] => ZoneSetting::Off,
        [text] => {
            let mut value = ngx_str_t {
                len: text.len(),
                data: text.as_ptr().cast_mut(),
            };
            // SAFETY: `value` points at `text`, which outlives the call; only read.
            let size = unsafe { ngx_parse_size(&mut value) };
            match usize::try_from(size) {
                Ok(size) if size >= MIN_ZONE_SIZE => ZoneSetting::Size(size),
                _ => {
                    return Err(format!(
                        "takes \"off\" or a size of at least {}k, not \"{text}\"",
                        MIN_ZONE_SIZE / 1024
                    ))
                }
            }
        }
        _ => return Err("takes one size or \"off\"".to_string()),
    };
    Ok(())
}

fn set_domains(d: &mut Directive) -> Result<(), String> {
    duplicate(&d.conf.accepted_domains)?;
    let patterns = d
        .args
        .iter()
        .map(|arg| DomainPattern::parse(arg))
        .collect::<Result<_, _>>()?;
    d.conf.accepted_domains = Some(patterns);
    Ok(())
}

fn set_write(d: &mut Directive) -> Result<(), String> {
    duplicate(&d.conf.write)?;
    let target = match d.args[..] {
        ["off"] => WriteTarget::Off,
        [uri] if uri.starts_with('/') && !uri.bytes().any(|b| b.is_ascii_whitespace()) => {
            WriteTarget::Uri(uri.to_string())
        }
        _ => return Err("takes \"off\" or a URI starting with \"/\"".to_string()),
    };
    d.conf.write = Some(target);
    Ok(())
}

fn set_write_mode(d: &mut Directive) -> Result<(), String> {
    duplicate(&d.conf.write_mode)?;
    let mode = match d.args[..] {
        ["wait"] => WriteMode::Wait,
        ["background"] => WriteMode::Background,
        _ => return Err("takes \"wait\" or \"background\"".to_string()),
    };
    d.conf.write_mode = Some(mode);
    Ok(())
}

fn set_measurements(d: &mut Directive) -> Result<(), String> {
    duplicate(&d.conf.measurements)?;
    let [page_view, event] = d.args[..] else {
        return Err("takes two measurement names: page views, then events".to_string());
    };
    validate_measurement_name(page_view)?;
    validate_measurement_name(event)?;
    if page_view == event {
        return Err("needs two different measurement names".to_string());
    }
    d.conf.measurements = Some(Measurements {
        page_view: page_view.to_string(),
        event: event.to_string(),
    });
    Ok(())
}

fn set_max_body_size(d: &mut Directive) -> Result<(), String> {
    duplicate(&d.conf.max_body_size)?;
    let [text] = d.args[..] else {
        return Err("takes one size".to_string());
    };
    let mut value = ngx_str_t {
        len: text.len(),
        data: text.as_ptr().cast_mut(),
    };
    // SAFETY: `value` points at `text`, which outlives the call; ngx_parse_size only reads it.
    let size = unsafe { ngx_parse_size(&mut value) };
    match usize::try_from(size) {
        Ok(size) if (1..=MAX_MAX_BODY_SIZE).contains(&size) => {
            d.conf.max_body_size = Some(size);
            Ok(())
        }
        _ => Err(format!(
            "takes a size from 1 to {}k, not \"{text}\"",
            MAX_MAX_BODY_SIZE / 1024
        )),
    }
}
