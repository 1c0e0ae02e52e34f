//! The report API (`analytics_report;`): validates the parameters, runs the report's fixed
//! InfluxQL statements one after the other through the internal query location
//! (`analytics_query`), and answers JSON or CSV.
//!
//! Flow, as for beacons: the content handler reads (and ignores) any request body so that
//! nginx keeps the request's reference count balanced, then returns `NGX_DONE`; each statement
//! is a waited POST subrequest whose form body is `q=<statement>&epoch=ms` and whose answer is
//! kept in memory up to [`MAX_QUERY_ANSWER`] bytes by the module's capture filter; the
//! request's write handler runs when it finished and starts the next statement or answers.
//! A report that the daily rollups can answer (`rollups_apply`) first runs the rollup probe; its
//! answer decides whether the statements that follow read the rollups or the raw points.
//! InfluxDB's credentials live only in the query location; nothing from the client but the
//! validated parameters reaches a statement.

use std::ptr;

use ngx::ffi::{
    ngx_http_finalize_request, ngx_http_read_client_request_body, ngx_http_request_t, ngx_int_t,
    ngx_uint_t, NGX_HTTP_FORBIDDEN, NGX_HTTP_GET, NGX_HTTP_INTERNAL_SERVER_ERROR,
    NGX_HTTP_SPECIAL_RESPONSE, NGX_LOG_ERR,
};
use ngx::http::{HttpModule, HttpModuleLocationConf, Request};
use ngx::ngx_log_error;

use crate::core::line_protocol::SessionStorage;
use crate::core::report::{
    answer, error_body, parse_report_query, rollup_probe, rollups_apply, rollups_found, statements,
    Format, ReportQuery, Source,
};
use crate::core::timestamp::unix_now_ns;
use crate::request::{no_panic, request_ctx_ptr, send_typed, RequestCtx, NGX_DONE, NGX_ERROR};
use crate::subrequest::{start_post, Capture};
use crate::HttpAnalyticsModule;

/// Most bytes of one InfluxDB answer a report reads; a larger answer is a 502.
pub const MAX_QUERY_ANSWER: usize = 16 * 1024 * 1024;

const INTERNAL_ERROR: ngx_int_t = NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t;
const JSON: &[u8] = b"application/json";

/// A report request on its way: what was asked, the statements, and their answers so far.
pub struct ReportState {
    query: ReportQuery,
    visits: SessionStorage,
    /// Where the numbers come from; `None` while the rollup probe runs.
    source: Option<Source>,
    statements: Vec<String>,
    answers: Vec<Vec<u8>>,
    /// Where the running statement's answer is captured (NULL before the first).
    capture: *mut Capture,
}

/// Content handler of a location with `analytics_report;`.
pub unsafe extern "C" fn report_handler(r: *mut ngx_http_request_t) -> ngx_int_t {
    // SAFETY: nginx calls a content handler with a valid request.
    let request = unsafe { Request::from_ngx_http_request(r) };
    // SAFETY: as above.
    if unsafe { (*r).main } != r {
        return NGX_HTTP_FORBIDDEN as ngx_int_t;
    }
    no_panic(INTERNAL_ERROR, || handle_report(request))
}

fn handle_report(request: &mut Request) -> ngx_int_t {
    // `$analytics_status` is about beacons: empty for a report.
    let ctx = request.pool().allocate(RequestCtx {
        outcome: "",
        ..RequestCtx::default()
    });
    if ctx.is_null() {
        return NGX_ERROR;
    }
    request.set_module_ctx(ctx.cast(), HttpAnalyticsModule::module());
    let r: *mut ngx_http_request_t = request.into();
    // The body (a GET has none) is read before anything is answered, so that no body is ever
    // left on the connection to be taken for its next request. Reading it also takes the
    // reference the statements' subrequests run under, as for beacons: the body handler
    // finalizes the request once, when the report is answered.
    // SAFETY: `r` is valid; nginx calls `body_read` once the body is in (at once for a GET).
    let rc = unsafe { ngx_http_read_client_request_body(r, Some(body_read)) };
    if rc >= NGX_HTTP_SPECIAL_RESPONSE as ngx_int_t {
        return rc;
    }
    NGX_DONE
}

/// Body handler: checks the request and starts the first statement.
unsafe extern "C" fn body_read(r: *mut ngx_http_request_t) {
    let rc = no_panic(INTERNAL_ERROR, || start(r));
    if rc != NGX_DONE {
        // SAFETY: the body handler owns one reference to the request: finalize it once.
        unsafe { ngx_http_finalize_request(r, rc) };
    }
}

/// Validates the method and parameters, then runs the report's statements.
fn start(r: *mut ngx_http_request_t) -> ngx_int_t {
    // SAFETY: nginx passes the valid report request.
    let request = unsafe { Request::from_ngx_http_request(r) };
    // SAFETY: as above.
    let (method, args) = unsafe { ((*r).method, (*r).args) };
    if method != NGX_HTTP_GET as ngx_uint_t {
        if request.add_header_out("Allow", "GET").is_none() {
            return NGX_ERROR;
        }
        return json_error(request, 405, "only GET is allowed");
    }
    let Some(lcf) = HttpAnalyticsModule::location_conf(request) else {
        return INTERNAL_ERROR;
    };
    let now_ms = i64::try_from(unix_now_ns() / 1_000_000).unwrap_or(i64::MAX);
    let query = match parse_report_query(args.as_bytes(), now_ms) {
        Ok(query) => query,
        Err(err) => return json_error(request, 400, &err.to_string()),
    };
    if let (Some(domain), Some(patterns)) = (&query.domain, lcf.accepted_domains()) {
        if !patterns.iter().any(|p| p.matches(domain)) {
            return json_error(request, 403, "`domain` is not one this location reports on");
        }
    }
    let visits = lcf.session();
    // A report the daily rollups can answer first asks whether they exist (one cheap `SHOW
    // MEASUREMENTS`); its statements are made from the answer.
    let (source, statements) = if rollups_apply(&query) {
        (None, vec![rollup_probe(&query, lcf.measurements())])
    } else {
        let raw = statements(&query, lcf.measurements(), visits, Source::Raw);
        (Some(Source::Raw), raw)
    };
    let state = request.pool().allocate(ReportState {
        statements,
        source,
        query,
        visits,
        answers: Vec::new(),
        capture: ptr::null_mut(),
    });
    // SAFETY: NULL or the ctx `handle_report` created, in the request pool.
    let Some(ctx) = (unsafe { request_ctx_ptr(request).as_mut() }) else {
        return INTERNAL_ERROR;
    };
    if state.is_null() {
        return NGX_ERROR;
    }
    ctx.report = state.cast();
    step(r)
}

/// Write handler while a statement runs: nginx runs it when the subrequest finished (and may
/// run it at other times: then there is nothing to do yet).
unsafe extern "C" fn statement_done(r: *mut ngx_http_request_t) {
    let rc = no_panic(INTERNAL_ERROR, || step(r));
    if rc != NGX_DONE {
        // SAFETY: the report is answered here, once.
        unsafe { ngx_http_finalize_request(r, rc) };
    }
}

/// Takes the answer of the statement that finished (if any), then starts the next one, or
/// answers the report. Returns `NGX_DONE` while a statement runs.
fn step(r: *mut ngx_http_request_t) -> ngx_int_t {
    // SAFETY: nginx passes the valid report request.
    let request = unsafe { Request::from_ngx_http_request(r) };
    // SAFETY: NULL or the ctx `handle_report` created, in the request pool.
    let Some(state) = (unsafe { request_ctx_ptr(request).as_mut() })
        // SAFETY: NULL or the state `handle_report` created, in the request pool.
        .and_then(|ctx| unsafe { ctx.report.cast::<ReportState>().as_mut() })
    else {
        return INTERNAL_ERROR;
    };
    // SAFETY: NULL before the first statement, else the capture next to its subrequest.
    if let Some(capture) = unsafe { state.capture.as_mut() } {
        if !capture.done {
            return NGX_DONE; // not finished yet
        }
        state.capture = ptr::null_mut();
        let failure = match (capture.status, capture.body_truncated) {
            (0, _) => Some("InfluxDB did not answer (see the error log)".to_string()),
            (200, true) => Some(format!(
                "InfluxDB's answer is larger than {} MB",
                MAX_QUERY_ANSWER >> 20
            )),
            (200, false) => None,
            (status, _) => {
                let mut message = capture.message();
                if message.contains("missing required parameter") {
                    message.push_str(
                        " (the query location needs: proxy_set_header Content-Type \
                         application/x-www-form-urlencoded;)",
                    );
                }
                Some(format!("InfluxDB answered {status}: {message}"))
            }
        };
        let probing = state.source.is_none();
        if let (Some(message), false) = (&failure, probing && capture.status != 0) {
            ngx_log_error!(
                NGX_LOG_ERR,
                request.log(),
                "analytics: report query failed: {message}"
            );
            return json_error(request, 502, message);
        }
        let body = capture.take_body();
        if probing {
            let Some(lcf) = HttpAnalyticsModule::location_conf(request) else {
                return INTERNAL_ERROR;
            };
            // A probe InfluxDB answers but does not understand (an InfluxDB whose InfluxQL has
            // no `SHOW MEASUREMENTS ... WITH`): no rollups, the raw points answer.
            let found = match failure {
                Some(message) => Err(message),
                None => rollups_found(&state.query, lcf.measurements(), &body).map_err(|e| e.0),
            };
            let source = match found {
                Ok(true) => Source::Rollups,
                Ok(false) => Source::Raw,
                Err(message) => {
                    ngx_log_error!(
                        ngx::ffi::NGX_LOG_INFO,
                        request.log(),
                        "analytics: report rollup probe failed ({message}), the raw points answer"
                    );
                    Source::Raw
                }
            };
            state.source = Some(source);
            state.statements = statements(&state.query, lcf.measurements(), state.visits, source);
        } else {
            state.answers.push(body);
        }
    }

    if let Some(statement) = state.statements.get(state.answers.len()) {
        let Some(lcf) = HttpAnalyticsModule::location_conf(request) else {
            return INTERNAL_ERROR;
        };
        let form: String = form_urlencoded::Serializer::new(String::new())
            .append_pair("q", statement)
            .append_pair("epoch", "ms")
            .finish();
        return match start_post(request, lcf.query_uri(), form.as_bytes(), MAX_QUERY_ANSWER) {
            Ok(capture) => {
                state.capture = capture;
                // SAFETY: `r` is valid; nginx runs the parent's write handler once the waited
                // subrequest is done.
                unsafe { (*r).write_event_handler = Some(statement_done) };
                NGX_DONE
            }
            Err(_) => INTERNAL_ERROR,
        };
    }

    let Some(lcf) = HttpAnalyticsModule::location_conf(request) else {
        return INTERNAL_ERROR;
    };
    match answer(
        &state.query,
        state.visits,
        lcf.accepted_domains(),
        state.source.unwrap_or(Source::Raw),
        &state.answers,
    ) {
        Ok(answer) => {
            if request
                .add_header_out("Cache-Control", "no-store")
                .is_none()
            {
                return NGX_ERROR;
            }
            if state.query.format == Format::Csv {
                let disposition = "attachment; filename=\"report.csv\"";
                if request
                    .add_header_out("Content-Disposition", disposition)
                    .is_none()
                {
                    return NGX_ERROR;
                }
            }
            send_typed(request, 200, answer.content_type.as_bytes(), &answer.body)
        }
        Err(err) => {
            ngx_log_error!(
                NGX_LOG_ERR,
                request.log(),
                "analytics: report query failed: {}",
                err.0
            );
            json_error(request, 502, &err.0)
        }
    }
}

/// Answers `{"error": message}` with `status` (never cached).
fn json_error(request: &mut Request, status: usize, message: &str) -> ngx_int_t {
    if request
        .add_header_out("Cache-Control", "no-store")
        .is_none()
    {
        return NGX_ERROR;
    }
    send_typed(request, status, JSON, &error_body(message))
}
