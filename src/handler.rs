//! The beacon endpoint: method check, body reading, validation, and the answer.
//!
//! Flow, as in nginx's C content handlers: the content handler checks the method and the
//! declared length, starts reading the body and returns `NGX_DONE`; the body handler turns the
//! body into one line of line protocol (pure core) and either answers at once or hands the
//! line to the worker's batch for its write URI ([`crate::batch`]), which answers once the write
//! is done. Every path finalizes the request exactly once, and no panic can cross into nginx.

use std::borrow::Cow;
use std::ptr;

use ngx::ffi::{
    ngx_buf_t, ngx_chain_t, ngx_http_discard_request_body, ngx_http_finalize_request,
    ngx_http_read_client_request_body, ngx_http_request_t, ngx_int_t, ngx_process_slot,
    ngx_read_file, ngx_uint_t, NGX_HTTP_FORBIDDEN, NGX_HTTP_INTERNAL_SERVER_ERROR,
    NGX_HTTP_OPTIONS, NGX_HTTP_POST, NGX_HTTP_REQUEST_ENTITY_TOO_LARGE, NGX_HTTP_SPECIAL_RESPONSE,
    NGX_LOG_INFO,
};
use ngx::http::{HttpModule, HttpModuleLocationConf, Request};
use ngx::ngx_log_error;

use crate::batch::queue_line;
use crate::core::beacon::parse_beacon;
use crate::core::bots::is_bot;
use crate::core::line_protocol::encode_point;
use crate::core::policy::{check_policy, snippet, Refusal};
use crate::core::timestamp::{unix_now_ns, UniqueClock};
use crate::request::{
    metrics, no_panic, outcome, record, send_response, status, with_ctx, RequestCtx, NGX_DONE,
    NGX_ERROR, NGX_OK,
};
use crate::HttpAnalyticsModule;

/// Per-worker source of unique timestamps (see [`crate::core::timestamp`]).
static CLOCK: UniqueClock = UniqueClock::new();

const INTERNAL_ERROR: ngx_int_t = NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t;
const TOO_LARGE: ngx_int_t = NGX_HTTP_REQUEST_ENTITY_TOO_LARGE as ngx_int_t;
const FORBIDDEN: ngx_int_t = NGX_HTTP_FORBIDDEN as ngx_int_t;

/// Content handler of a location with `analytics;`.
pub unsafe extern "C" fn analytics_handler(r: *mut ngx_http_request_t) -> ngx_int_t {
    // SAFETY: nginx calls a content handler with a valid request.
    let request = unsafe { Request::from_ngx_http_request(r) };
    // SAFETY: as above.
    if unsafe { (*r).main } != r {
        // A subrequest (SSI include, mirror, njs): it shares its parent's body and connection
        // and is no beacon of its own; counting it would count the parent's beacon twice.
        ngx_log_error!(
            NGX_LOG_INFO,
            request.log(),
            "analytics: subrequest to the beacon endpoint refused (403)"
        );
        // An empty 403: an SSI include shows nothing, rather than nginx's error page.
        // SAFETY: as above; the subrequest has no body of its own to read.
        let rc = unsafe { ngx_http_discard_request_body(r) };
        if rc != NGX_OK {
            return rc;
        }
        return send_response(request, FORBIDDEN as usize, "");
    }
    no_panic(INTERNAL_ERROR, || handle_request(request))
}

fn handle_request(request: &mut Request) -> ngx_int_t {
    let Some(lcf) = HttpAnalyticsModule::location_conf(request) else {
        return INTERNAL_ERROR;
    };
    let ctx = request.pool().allocate(RequestCtx::default());
    if ctx.is_null() {
        return NGX_ERROR;
    }
    request.set_module_ctx(ctx.cast(), HttpAnalyticsModule::module());

    let r: *mut ngx_http_request_t = request.into();
    // SAFETY: `r` is the valid request nginx passed to the content handler.
    let (method, content_length) = unsafe { ((*r).method, (*r).headers_in.content_length_n) };

    // The Origin header is looked up only where CORS is configured.
    let cors_origin = match lcf.cors_origins {
        Some(_) => header_in(request, "origin").filter(|origin| lcf.cors_allows(origin)),
        None => None,
    };
    if let Some(origin) = &cors_origin {
        if add_cors_headers(request, origin).is_none() {
            return NGX_ERROR;
        }
    }

    if method != NGX_HTTP_POST as ngx_uint_t {
        // SAFETY: as above; discarding is how nginx answers without reading a body.
        let rc = unsafe { ngx_http_discard_request_body(r) };
        if rc != NGX_OK {
            return rc;
        }
        if method == NGX_HTTP_OPTIONS as ngx_uint_t && cors_origin.is_some() {
            record(request, outcome::PREFLIGHT, "");
            return answer_preflight(request);
        }
        if request.add_header_out("Allow", "POST").is_none() {
            return NGX_ERROR;
        }
        return refuse(
            request,
            status::METHOD_NOT_ALLOWED,
            outcome::METHOD_NOT_ALLOWED,
            "only POST is allowed".to_string(),
        );
    }

    if lcf.drop_bots() && is_bot(user_agent(request)) {
        // Same answer as an accepted beacon: a bot learns nothing.
        // SAFETY: as above.
        let rc = unsafe { ngx_http_discard_request_body(r) };
        if rc != NGX_OK {
            return rc;
        }
        record(request, outcome::BOT, "");
        return send_response(request, status::NO_CONTENT, "");
    }

    if usize::try_from(content_length).is_ok_and(|length| length > lcf.max_body_size()) {
        // SAFETY: as above; the body is drained (or the connection closed) by nginx.
        unsafe { ngx_http_discard_request_body(r) };
        return refuse_too_large(request);
    }

    // SAFETY: `r` is valid; nginx calls `body_read` once the whole body is in, and keeps the
    // request alive until then (it takes its own reference, released by our NGX_DONE).
    let rc = unsafe { ngx_http_read_client_request_body(r, Some(body_read)) };
    if rc >= NGX_HTTP_SPECIAL_RESPONSE as ngx_int_t {
        return rc;
    }
    NGX_DONE
}

/// Called by nginx when the request body has been read completely.
unsafe extern "C" fn body_read(r: *mut ngx_http_request_t) {
    // SAFETY: nginx calls the body handler with the valid request whose body it read.
    let request = unsafe { Request::from_ngx_http_request(r) };
    let rc = no_panic(INTERNAL_ERROR, || process_beacon(request));
    if rc != NGX_DONE {
        // SAFETY: the body handler owns one reference to the request: finalize it once.
        unsafe { ngx_http_finalize_request(r, rc) };
    }
}

/// Validates the beacon and answers or queues its line. Returns the code to finalize the
/// request with, or `NGX_DONE` when its batch will finish it.
fn process_beacon(request: &mut Request) -> ngx_int_t {
    let Some(lcf) = HttpAnalyticsModule::location_conf(request) else {
        return INTERNAL_ERROR;
    };
    let r: *mut ngx_http_request_t = request.into();
    // SAFETY: `r` is the request whose body nginx has read; `body` is dropped before this
    // function returns, while the request and its pool are alive.
    let body = match unsafe { read_body(r, lcf.max_body_size()) } {
        Ok(body) => body,
        Err(BodyError::TooLarge) => return refuse_too_large(request),
        Err(BodyError::Io) => {
            record(request, outcome::ERROR, "");
            return INTERNAL_ERROR;
        }
    };

    let beacon = match parse_beacon(&body) {
        Ok(beacon) => beacon,
        Err(err) => {
            return refuse(
                request,
                status::BAD_REQUEST,
                outcome::INVALID,
                err.to_string(),
            );
        }
    };
    if let Some(name) = beacon.event_name() {
        with_ctx(request, |ctx| ctx.event.set(&snippet(name)));
    }

    let host = request_host(request);
    let permitted = lcf.permitted_events();
    if let Err(refusal) = check_policy(&beacon, permitted, lcf.accepted_domains(), &host) {
        let token = match refusal {
            Refusal::EventNotPermitted(_) => {
                if let Some(counters) = metrics() {
                    counters.count_refused_event();
                }
                outcome::EVENT_NOT_PERMITTED
            }
            Refusal::DomainNotAccepted(_) => outcome::DOMAIN_NOT_ACCEPTED,
        };
        return refuse(request, status::UNPROCESSABLE, token, refusal.to_string());
    }
    if let (Some(name), Some(counters)) = (beacon.event_name(), metrics()) {
        counters.count_event(name);
    }

    let Some(uri) = lcf.write_uri() else {
        record(request, outcome::ACCEPTED, "");
        return send_response(request, status::NO_CONTENT, "");
    };

    // SAFETY: `ngx_process_slot` is written by the master before the worker starts and is only
    // read afterwards, on this worker's single thread.
    let slot = unsafe { ngx_process_slot };
    let timestamp = CLOCK.stamp(unix_now_ns(), u16::try_from(slot).unwrap_or(0));
    let mut line = Vec::with_capacity(256 + body.len());
    let session = lcf.session();
    encode_point(&beacon, lcf.measurements(), session, timestamp, &mut line);

    queue_line(request, lcf, uri, Cow::Borrowed(&line))
}

/// Refuses a beacon: records and logs the reason once at `info` (never the body) and answers
/// `status` with the reason as text.
fn refuse(request: &mut Request, status: usize, token: &'static str, reason: String) -> ngx_int_t {
    ngx_log_error!(
        NGX_LOG_INFO,
        request.log(),
        "analytics: beacon rejected ({status}): {reason}"
    );
    record(request, token, &reason);
    send_response(request, status, &format!("{reason}\n"))
}

/// Refuses a body over `analytics_max_body_size` with nginx's own 413 (which also closes the
/// connection rather than reading the rest).
fn refuse_too_large(request: &mut Request) -> ngx_int_t {
    let reason = "body larger than analytics_max_body_size";
    ngx_log_error!(
        NGX_LOG_INFO,
        request.log(),
        "analytics: beacon rejected (413): {reason}"
    );
    record(request, outcome::BODY_TOO_LARGE, reason);
    TOO_LARGE
}

/// The request's `User-Agent` (empty when absent), borrowed from the request: nginx has
/// already found it while parsing the headers.
fn user_agent(request: &Request) -> &[u8] {
    let r: &ngx_http_request_t = request.as_ref();
    // SAFETY: NULL or the header element nginx keeps for the request's User-Agent, alive as
    // long as the request.
    match unsafe { r.headers_in.user_agent.as_ref() } {
        Some(header) => header.value.as_bytes(),
        None => &[],
    }
}

/// The value of request header `name` (lowercase), if present and valid UTF-8.
fn header_in(request: &Request, name: &str) -> Option<String> {
    request
        .headers_in_iterator()
        .find(|(key, _)| key.as_bytes().eq_ignore_ascii_case(name.as_bytes()))
        .and_then(|(_, value)| value.to_str().ok().map(str::to_string))
}

/// Adds the CORS answer headers for an allowed `origin`.
fn add_cors_headers(request: &mut Request, origin: &str) -> Option<()> {
    request.add_header_out("Access-Control-Allow-Origin", origin)?;
    request.add_header_out("Vary", "Origin")
}

/// Answers an allowed CORS preflight.
fn answer_preflight(request: &mut Request) -> ngx_int_t {
    let headers = [
        ("Access-Control-Allow-Methods", "POST"),
        ("Access-Control-Allow-Headers", "Content-Type"),
        ("Access-Control-Max-Age", "86400"),
    ];
    for (name, value) in headers {
        if request.add_header_out(name, value).is_none() {
            return NGX_ERROR;
        }
    }
    send_response(request, status::NO_CONTENT, "")
}

/// The request's own host without port (`$host` minus the fallback to `server_name`).
fn request_host(request: &Request) -> Cow<'_, str> {
    let r: &ngx_http_request_t = request.as_ref();
    String::from_utf8_lossy(r.headers_in.server.as_bytes())
}

enum BodyError {
    TooLarge,
    Io,
}

/// The request body: borrowed where nginx read it when it is in one memory buffer (the usual
/// case for a beacon), otherwise collected from the memory buffers and, when nginx spilled it,
/// the temp file.
///
/// # Safety
/// `r` is a valid request whose body has been read completely; the result must not outlive it.
unsafe fn read_body<'a>(
    r: *const ngx_http_request_t,
    limit: usize,
) -> Result<Cow<'a, [u8]>, BodyError> {
    // SAFETY: `request_body` (if any) and its chain belong to the request pool and stay valid
    // while the request lives (the caller's promise).
    let first = match unsafe { (*r).request_body.as_ref() } {
        Some(rb) => rb.bufs,
        None => ptr::null_mut(),
    };
    // SAFETY: as above.
    if let Some(bytes) = unsafe { single_memory_buffer(first) } {
        if bytes.len() > limit {
            return Err(BodyError::TooLarge);
        }
        return Ok(Cow::Borrowed(bytes));
    }
    let mut body = Vec::new();
    let mut link = first;
    // SAFETY: each chain link and buffer of a read body is valid (see above).
    while let Some(cl) = unsafe { link.as_ref() } {
        // SAFETY: as above.
        if let Some(buf) = unsafe { cl.buf.as_ref() } {
            append_buf(&mut body, buf, limit)?;
        }
        link = cl.next;
    }
    Ok(Cow::Owned(body))
}

/// The content of a body chain whose data is all in one memory buffer (empty buffers, such as
/// the last one of a chunked body, aside); `None` when it is spread or in a file.
///
/// # Safety
/// `link` is NULL or the valid chain of a read body; the result must not outlive the request.
unsafe fn single_memory_buffer<'a>(mut link: *const ngx_chain_t) -> Option<&'a [u8]> {
    let mut found: Option<&'a [u8]> = None;
    // SAFETY: each chain link and buffer of a read body is valid (the caller's promise).
    while let Some(cl) = unsafe { link.as_ref() } {
        // SAFETY: as above.
        if let Some(buf) = unsafe { cl.buf.as_ref() } {
            if buf.in_file() != 0 {
                return None;
            }
            if !buf.pos.is_null() && buf.last > buf.pos {
                if found.is_some() {
                    return None;
                }
                // SAFETY: pos..last is the initialized content of an in-memory body buffer.
                let len = unsafe { buf.last.offset_from(buf.pos) } as usize;
                // SAFETY: as above; the buffer lives in the request pool.
                found = Some(unsafe { std::slice::from_raw_parts(buf.pos, len) });
            }
        }
        link = cl.next;
    }
    Some(found.unwrap_or_default())
}

fn append_buf(body: &mut Vec<u8>, buf: &ngx_buf_t, limit: usize) -> Result<(), BodyError> {
    if buf.in_file() != 0 {
        let start = usize::try_from(buf.file_pos).map_err(|_| BodyError::Io)?;
        let end = usize::try_from(buf.file_last).map_err(|_| BodyError::Io)?;
        let len = end.checked_sub(start).ok_or(BodyError::Io)?;
        if body.len() + len > limit {
            return Err(BodyError::TooLarge);
        }
        let old_len = body.len();
        body.resize(old_len + len, 0);
        let mut done = 0;
        while done < len {
            // SAFETY: `buf.file` is the open temp file nginx wrote the body to; the destination
            // is the zeroed, owned tail of `body`, `len - done` bytes long.
            let n = unsafe {
                ngx_read_file(
                    buf.file,
                    body.as_mut_ptr().add(old_len + done),
                    len - done,
                    buf.file_pos + done as i64,
                )
            };
            match usize::try_from(n) {
                Ok(n) if n > 0 => done += n,
                _ => return Err(BodyError::Io),
            }
        }
        return Ok(());
    }
    // A chunked body ends with an empty buffer whose pointers are NULL: skip empty buffers.
    if buf.pos.is_null() || buf.last <= buf.pos {
        return Ok(());
    }
    // SAFETY: pos..last is the initialized content of an in-memory body buffer.
    let len = unsafe { buf.last.offset_from(buf.pos) } as usize;
    if body.len() + len > limit {
        return Err(BodyError::TooLarge);
    }
    // SAFETY: as above.
    body.extend_from_slice(unsafe { std::slice::from_raw_parts(buf.pos, len) });
    Ok(())
}
