//! The beacon endpoint: method check, body reading, validation, and the answer.
//!
//! Flow, as in nginx's C content handlers: the content handler checks the method and the
//! declared length, starts reading the body and returns `NGX_DONE`; the body handler turns the
//! body into one line of line protocol (pure core) and either answers at once or hands the
//! line to the worker's batch for its write URI ([`crate::batch`]), which answers once the write
//! is done. Every path finalizes the request exactly once, and no panic can cross into nginx.

use std::borrow::Cow;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr;

use ngx::core::{Buffer, Status};
use ngx::ffi::{
    ngx_buf_t, ngx_chain_t, ngx_event_t, ngx_http_discard_request_body, ngx_http_finalize_request,
    ngx_http_output_filter, ngx_http_read_client_request_body, ngx_http_request_t,
    ngx_http_send_header, ngx_int_t, ngx_pcalloc, ngx_process_slot, ngx_read_file, ngx_str_t,
    ngx_uint_t, NGX_HTTP_CLIENT_CLOSED_REQUEST, NGX_HTTP_FORBIDDEN, NGX_HTTP_INTERNAL_SERVER_ERROR,
    NGX_HTTP_OPTIONS, NGX_HTTP_POST, NGX_HTTP_REQUEST_ENTITY_TOO_LARGE, NGX_HTTP_SPECIAL_RESPONSE,
    NGX_LOG_INFO,
};
use ngx::http::{HttpModule, HttpModuleLocationConf, Request};
use ngx::ngx_log_error;

use crate::batch::{self, Batch, Submitted};
use crate::conf::AnalyticsLocConf;
use crate::core::batch::Ticket;
use crate::core::beacon::parse_beacon;
use crate::core::beacon::MAX_EVENT_LEN;
use crate::core::bots::is_bot;
use crate::core::line_protocol::encode_point;
use crate::core::policy::{check_policy, snippet, Refusal};
use crate::core::timestamp::{unix_now_ns, UniqueClock};
use crate::HttpAnalyticsModule;

/// Per-worker source of unique timestamps (see [`crate::core::timestamp`]).
static CLOCK: UniqueClock = UniqueClock::new();

/// Per-request state of the beacon endpoint, allocated from the request pool before the body
/// is read (so the `$analytics_*` variables describe every request of the location).
pub struct RequestCtx {
    /// The request this state belongs to (set when it joins a batch).
    pub request: *mut ngx_http_request_t,
    /// The batch this request waits on; NULL when none (or once the batch answered).
    pub batch: *mut Batch,
    /// Its index among that batch's members.
    pub member: usize,
    /// Wakes a parked request in its own context (posted), and times a leader's batch.
    pub wake: ngx_event_t,
    /// The write holding this request's line has finished.
    pub write_finished: bool,
    /// That write did not store the line.
    pub write_failed: bool,
    /// `background` mode leader: the code of the 204 already sent.
    pub early_answer: Option<ngx_int_t>,
    /// The line of a request waiting for room in a batch (empty otherwise).
    pub waiting_line: Vec<u8>,
    /// Where a request waiting for room waits: its sink's index and its place in the queue.
    pub waiting_in: Option<(usize, Ticket)>,
    /// A report request's state (NULL for beacons).
    pub report: *mut crate::report::ReportState,
    /// `$analytics_status`: one of the [`outcome`] tokens.
    pub outcome: &'static str,
    /// `$analytics_reason`: why the beacon was refused (empty when it was not).
    pub reason: String,
    /// `$analytics_event`: the beacon's event name, lowercased (empty for page views).
    pub event: InlineText,
}

impl Default for RequestCtx {
    fn default() -> Self {
        RequestCtx {
            request: ptr::null_mut(),
            batch: ptr::null_mut(),
            member: 0,
            // SAFETY: `ngx_event_t` is a C struct of integers, bit fields, pointers and
            // optional function pointers, for which all zeroes is the valid "unused" state
            // (nginx itself allocates events zeroed).
            wake: unsafe { std::mem::zeroed() },
            write_finished: false,
            write_failed: false,
            early_answer: None,
            waiting_line: Vec::new(),
            waiting_in: None,
            report: ptr::null_mut(),
            outcome: outcome::INCOMPLETE,
            reason: String::new(),
            event: InlineText::default(),
        }
    }
}

/// A short text (an event name) stored inside the per-request state itself, so recording it
/// allocates nothing.
pub struct InlineText {
    len: usize,
    bytes: [u8; MAX_EVENT_LEN],
}

impl Default for InlineText {
    fn default() -> Self {
        InlineText {
            len: 0,
            bytes: [0; MAX_EVENT_LEN],
        }
    }
}

impl InlineText {
    /// Stores `text`, cut at a character boundary to fit.
    fn set(&mut self, text: &str) {
        let mut len = text.len().min(self.bytes.len());
        while !text.is_char_boundary(len) {
            len -= 1;
        }
        self.bytes[..len].copy_from_slice(&text.as_bytes()[..len]);
        self.len = len;
    }

    /// The stored text.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// Values of `$analytics_status`.
pub mod outcome {
    /// The body never arrived completely (timeout, client gone).
    pub const INCOMPLETE: &str = "incomplete";
    /// Stored (wait mode), queued for writing (background mode) or validated (write off).
    pub const ACCEPTED: &str = "accepted";
    /// 400: not a valid beacon.
    pub const INVALID: &str = "invalid";
    /// 422: the event is not in `permitted_events`.
    pub const EVENT_NOT_PERMITTED: &str = "event_not_permitted";
    /// 422: the domain is not accepted.
    pub const DOMAIN_NOT_ACCEPTED: &str = "domain_not_accepted";
    /// 413.
    pub const BODY_TOO_LARGE: &str = "body_too_large";
    /// 405.
    pub const METHOD_NOT_ALLOWED: &str = "method_not_allowed";
    /// A CORS preflight that was answered.
    pub const PREFLIGHT: &str = "preflight";
    /// Dropped because the user agent is a crawler or automation (answered 204).
    pub const BOT: &str = "bot";
    /// The write failed or could not be queued.
    pub const WRITE_FAILED: &str = "write_failed";
    /// An internal error (allocation, I/O), or a subrequest sent to the endpoint.
    pub const ERROR: &str = "error";
}

pub(crate) const NGX_OK: ngx_int_t = Status::NGX_OK.0;
pub(crate) const NGX_ERROR: ngx_int_t = Status::NGX_ERROR.0;
pub(crate) const NGX_DONE: ngx_int_t = Status::NGX_DONE.0;
const INTERNAL_ERROR: ngx_int_t = NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t;
const TOO_LARGE: ngx_int_t = NGX_HTTP_REQUEST_ENTITY_TOO_LARGE as ngx_int_t;
const FORBIDDEN: ngx_int_t = NGX_HTTP_FORBIDDEN as ngx_int_t;

/// Status codes the endpoint answers with.
mod status {
    pub const NO_CONTENT: usize = 204;
    pub const BAD_REQUEST: usize = 400;
    pub const METHOD_NOT_ALLOWED: usize = 405;
    pub const UNPROCESSABLE: usize = 422;
    pub const BAD_GATEWAY: usize = 502;
}

/// Runs `f`, turning a panic into `fallback` so it never unwinds into nginx (which would abort
/// the worker).
pub fn no_panic<T>(fallback: T, f: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(fallback)
}

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
            Refusal::EventNotPermitted(_) => outcome::EVENT_NOT_PERMITTED,
            Refusal::DomainNotAccepted(_) => outcome::DOMAIN_NOT_ACCEPTED,
        };
        return refuse(request, status::UNPROCESSABLE, token, refusal.to_string());
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

/// Hands an encoded line to the batch for `uri`; returns the code to finalize the request with,
/// or `NGX_DONE` when its batch (or a wait for room) will finish it.
fn queue_line(
    request: &mut Request,
    lcf: &AnalyticsLocConf,
    uri: &str,
    line: Cow<[u8]>,
) -> ngx_int_t {
    match batch::submit(request, uri, line, lcf.write_mode(), lcf.batch_limits()) {
        Submitted::Parked => NGX_DONE,
        Submitted::Queued => {
            record(request, outcome::ACCEPTED, "");
            send_response(request, status::NO_CONTENT, "")
        }
        Submitted::Error => {
            record(request, outcome::ERROR, "");
            INTERNAL_ERROR
        }
        Submitted::ClientGone => {
            // Queued, with nobody left to answer.
            record(request, outcome::ACCEPTED, "");
            NGX_HTTP_CLIENT_CLOSED_REQUEST as ngx_int_t
        }
    }
}

/// Submits the line of a request that waited for room in a batch, again (the line moves; it is
/// not copied unless it has to wait once more).
pub fn resubmit(request: &mut Request, line: Vec<u8>) -> ngx_int_t {
    match HttpAnalyticsModule::location_conf(request) {
        Some(lcf) => match lcf.write_uri() {
            Some(uri) => queue_line(request, lcf, uri, Cow::Owned(line)),
            None => INTERNAL_ERROR,
        },
        None => INTERNAL_ERROR,
    }
}

const WRITE_FAILED: &str = "analytics write failed\n";

/// Answers a request whose batch was written: 204 when its line was stored, 502 when not (in
/// `background` mode the 204 was sent already). Returns the code to finalize it with.
pub fn answer_write_outcome(request: &mut Request) -> ngx_int_t {
    let Some((failed, early_answer)) = with_ctx(request, |ctx| {
        ctx.outcome = match ctx.write_failed {
            true => outcome::WRITE_FAILED,
            false => outcome::ACCEPTED,
        };
        (ctx.write_failed, ctx.early_answer)
    }) else {
        return INTERNAL_ERROR;
    };
    match early_answer {
        Some(NGX_ERROR) => NGX_ERROR,
        Some(_) => NGX_OK,
        None if failed => send_response(request, status::BAD_GATEWAY, WRITE_FAILED),
        None => send_response(request, status::NO_CONTENT, ""),
    }
}

/// Records the outcome (and reason) of the request for `$analytics_status` / `_reason`.
fn record(request: &Request, token: &'static str, reason: &str) {
    with_ctx(request, |ctx| {
        ctx.outcome = token;
        ctx.reason = reason.to_string();
    });
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

/// Runs `f` on this module's per-request state, if the content handler created it.
fn with_ctx<T>(request: &Request, f: impl FnOnce(&mut RequestCtx) -> T) -> Option<T> {
    // SAFETY: NULL or the pool-allocated ctx of this live request; nginx runs one handler at a
    // time on the worker's thread, and the reference does not outlive `f`.
    unsafe { request_ctx_ptr(request).as_mut() }.map(f)
}

/// Pointer to this module's per-request state (NULL before the content handler ran, and for
/// every subrequest: the endpoint refuses them, and a write subrequest's slot holds its
/// `WriteCapture`).
pub fn request_ctx_ptr(request: &Request) -> *mut RequestCtx {
    let r: &ngx_http_request_t = request.as_ref();
    if !ptr::eq(r.main, r) {
        return ptr::null_mut();
    }
    let index = HttpAnalyticsModule::module().ctx_index;
    // SAFETY: `r.ctx` holds one pointer per HTTP module, `index` is this module's slot.
    unsafe { *r.ctx.add(index) }.cast::<RequestCtx>()
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

/// Sends a complete response (status, optional `text/plain` body) and returns the code to
/// finalize the request with.
pub fn send_response(request: &mut Request, status: usize, text: &str) -> ngx_int_t {
    send_typed(request, status, b"text/plain", text.as_bytes())
}

/// Sends a complete response with a body of `content_type` (none when `body` is empty) and
/// returns the code to finalize the request with.
pub fn send_typed(
    request: &mut Request,
    status: usize,
    content_type: &'static [u8],
    body: &[u8],
) -> ngx_int_t {
    let text = body;
    let r: *mut ngx_http_request_t = request.into();
    // SAFETY: `r` is the valid main request, whose header has not been sent yet.
    unsafe {
        (*r).headers_out.status = status;
        if status == status::UNPROCESSABLE {
            // nginx has no reason phrase for 422.
            (*r).headers_out.status_line = ngx_string_static(b"422 Unprocessable Content");
        }
        if text.is_empty() {
            (*r).set_header_only(1);
            (*r).headers_out.content_length_n = 0;
        } else {
            (*r).headers_out.content_type = ngx_string_static(content_type);
            (*r).headers_out.content_type_len = (*r).headers_out.content_type.len;
            (*r).headers_out.content_length_n = text.len() as i64;
        }
    }
    // SAFETY: as above.
    let rc = unsafe { ngx_http_send_header(r) };
    // SAFETY: as above; `header_only` is also set by nginx for HEAD requests.
    if rc == NGX_ERROR || rc > NGX_OK || unsafe { (*r).header_only() } != 0 {
        return rc;
    }
    match body_chain(request, text) {
        // SAFETY: the chain and its buffer were just allocated from the request pool.
        Some(chain) => unsafe { ngx_http_output_filter(r, chain) },
        None => NGX_ERROR,
    }
}

/// A one-buffer chain holding a pool copy of `bytes`, marked as the last buffer.
pub fn body_chain(request: &Request, bytes: &[u8]) -> Option<*mut ngx_chain_t> {
    let pool = request.pool();
    let mut buf = pool.create_buffer(bytes.len())?;
    let raw = buf.as_ngx_buf_mut();
    // SAFETY: `create_buffer` made a writable buffer of `bytes.len()` bytes at `last`.
    unsafe {
        ptr::copy_nonoverlapping(bytes.as_ptr(), (*raw).last, bytes.len());
        (*raw).last = (*raw).last.add(bytes.len());
        (*raw).set_last_buf(1);
        (*raw).set_last_in_chain(1);
    }
    // SAFETY: allocating a zeroed chain link from the request pool.
    let chain =
        unsafe { ngx_pcalloc(pool.as_ptr(), size_of::<ngx_chain_t>()) }.cast::<ngx_chain_t>();
    // SAFETY: `chain` is checked for NULL and points at a zeroed `ngx_chain_t`.
    unsafe { chain.as_mut() }.map(|link| {
        link.buf = raw;
        link.next = ptr::null_mut();
        chain
    })
}

/// An `ngx_str_t` pointing at static bytes (nginx only reads header strings).
pub fn ngx_string_static(bytes: &'static [u8]) -> ngx_str_t {
    ngx_str_t {
        len: bytes.len(),
        data: bytes.as_ptr().cast_mut(),
    }
}
