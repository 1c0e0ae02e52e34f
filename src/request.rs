//! What every handler of the module needs, below all of them: the per-request state, answering
//! (`send_response`, `send_typed`, memory bodies), recording `$analytics_*`, and the guard that
//! keeps a panic from unwinding into nginx. The beacon endpoint (`handler`), group commit
//! (`batch`), the agent, the dashboard, the reports and the metrics depend on this module and
//! not on each other.

use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr;
use std::sync::atomic::{AtomicPtr, Ordering};

use ngx::core::{Buffer, Status};
use ngx::ffi::{
    ngx_buf_t, ngx_chain_t, ngx_event_t, ngx_http_discard_request_body, ngx_http_output_filter,
    ngx_http_request_t, ngx_http_send_header, ngx_int_t, ngx_list_push, ngx_pcalloc, ngx_str_t,
    ngx_table_elt_t, ngx_uint_t, NGX_HTTP_GET, NGX_HTTP_HEAD, NGX_HTTP_INTERNAL_SERVER_ERROR,
};
use ngx::http::{HttpModule, Request};

use crate::core::batch::Ticket;
use crate::core::beacon::MAX_EVENT_LEN;
use crate::core::metrics::Metrics;
use crate::HttpAnalyticsModule;

/// Per-request state of the beacon endpoint, allocated from the request pool before the body
/// is read (so the `$analytics_*` variables describe every request of the location).
pub struct RequestCtx {
    /// The request this state belongs to (set when it joins a batch).
    pub request: *mut ngx_http_request_t,
    /// The batch (a `crate::batch::Batch`, opaque here) this request waits on; NULL when none
    /// (or once the batch answered).
    pub batch: *mut c_void,
    /// Its index among that batch's members.
    pub member: usize,
    /// Wakes a parked request in its own context (posted), and times a leader's batch.
    pub wake: ngx_event_t,
    /// The write holding this request's line has finished.
    pub write_finished: bool,
    /// That write did not store the line.
    pub write_failed: bool,
    /// The line went to the disk spool instead (it is written later).
    pub spooled: bool,
    /// `background` mode leader: the code of the 204 already sent.
    pub early_answer: Option<ngx_int_t>,
    /// The line of a request waiting for room in a batch (empty otherwise).
    pub waiting_line: Vec<u8>,
    /// Where a request waiting for room waits: its sink's index and its place in the queue.
    pub waiting_in: Option<(usize, Ticket)>,
    /// A report request's state (a `crate::report::ReportState`, opaque here; NULL for
    /// beacons).
    pub report: *mut c_void,
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
            spooled: false,
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
    pub fn set(&mut self, text: &str) {
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
    /// The write failed, and the line is in the disk spool (answered 204).
    pub const SPOOLED: &str = "spooled";
    /// An internal error (allocation, I/O), or a subrequest sent to the endpoint.
    pub const ERROR: &str = "error";
}

pub(crate) const NGX_OK: ngx_int_t = Status::NGX_OK.0;
pub(crate) const NGX_ERROR: ngx_int_t = Status::NGX_ERROR.0;
pub(crate) const NGX_DONE: ngx_int_t = Status::NGX_DONE.0;
const INTERNAL_ERROR: ngx_int_t = NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t;

/// Status codes the endpoint answers with.
pub mod status {
    pub const NO_CONTENT: usize = 204;
    pub const BAD_REQUEST: usize = 400;
    pub const METHOD_NOT_ALLOWED: usize = 405;
    pub const UNPROCESSABLE: usize = 422;
    pub const BAD_GATEWAY: usize = 502;
}

/// The counters of this process's cycle (`crate::metrics`); NULL when the zone is off or not set
/// up yet. Set by the zone's init callback in the master (or `nginx -t`, or the single
/// process), and inherited by the workers it forks.
static METRICS: AtomicPtr<Metrics> = AtomicPtr::new(ptr::null_mut());

/// The collector's counters, when there is a metrics zone.
pub fn metrics() -> Option<&'static Metrics> {
    // SAFETY: NULL or the counters in the shared zone, which stays mapped for the life of the
    // cycle that set the pointer and of every worker forked from it.
    unsafe { METRICS.load(Ordering::Relaxed).as_ref() }
}

/// Sets the counters of this cycle (NULL: none).
pub fn set_metrics(counters: *mut Metrics) {
    METRICS.store(counters, Ordering::Relaxed);
}

/// Runs `f`, turning a panic into `fallback` so it never unwinds into nginx (which would abort
/// the worker).
pub fn no_panic<T>(fallback: T, f: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(fallback)
}

const WRITE_FAILED: &str = "analytics write failed\n";

/// Answers a request whose batch was written: 204 when its line was stored, 502 when not (in
/// `background` mode the 204 was sent already). Returns the code to finalize it with.
pub fn answer_write_outcome(request: &mut Request) -> ngx_int_t {
    let Some((failed, early_answer)) = with_ctx(request, |ctx| {
        // A `background` leader was answered (and recorded as accepted) before its write.
        if ctx.early_answer.is_none() {
            ctx.outcome = match (ctx.write_failed, ctx.spooled) {
                (true, _) => outcome::WRITE_FAILED,
                (false, true) => outcome::SPOOLED,
                (false, false) => outcome::ACCEPTED,
            };
            if let Some(counters) = metrics() {
                counters.count_outcome(ctx.outcome);
            }
        }
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
pub fn record(request: &Request, token: &'static str, reason: &str) {
    if let Some(counters) = metrics() {
        counters.count_outcome(token);
    }
    with_ctx(request, |ctx| {
        ctx.outcome = token;
        ctx.reason = reason.to_string();
    });
}

/// Runs `f` on this module's per-request state, if the content handler created it.
pub fn with_ctx<T>(request: &Request, f: impl FnOnce(&mut RequestCtx) -> T) -> Option<T> {
    // SAFETY: NULL or the pool-allocated ctx of this live request; nginx runs one handler at a
    // time on the worker's thread, and the reference does not outlive `f`.
    unsafe { request_ctx_ptr(request).as_mut() }.map(f)
}

/// Pointer to this module's per-request state (NULL before the content handler ran, and for
/// every subrequest: the handlers refuse subrequests, so only a main request has one).
pub fn request_ctx_ptr(request: &Request) -> *mut RequestCtx {
    let r: &ngx_http_request_t = request.as_ref();
    if !ptr::eq(r.main, r) {
        return ptr::null_mut();
    }
    let index = HttpAnalyticsModule::module().ctx_index;
    // SAFETY: `r.ctx` holds one pointer per HTTP module, `index` is this module's slot.
    unsafe { *r.ctx.add(index) }.cast::<RequestCtx>()
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
    let r: *mut ngx_http_request_t = request.into();
    // SAFETY: `r` is the valid main request, whose header has not been sent yet.
    unsafe {
        (*r).headers_out.status = status;
        if status == status::UNPROCESSABLE {
            // nginx has no reason phrase for 422.
            (*r).headers_out.status_line = ngx_string_static(b"422 Unprocessable Content");
        }
        if body.is_empty() {
            (*r).set_header_only(1);
            (*r).headers_out.content_length_n = 0;
        } else {
            (*r).headers_out.content_type = ngx_string_static(content_type);
            (*r).headers_out.content_type_len = (*r).headers_out.content_type.len;
            (*r).headers_out.content_length_n = body.len() as i64;
        }
    }
    // SAFETY: as above.
    let rc = unsafe { ngx_http_send_header(r) };
    // SAFETY: as above; `header_only` is also set by nginx for HEAD requests.
    if rc == NGX_ERROR || rc > NGX_OK || unsafe { (*r).header_only() } != 0 {
        return rc;
    }
    match body_chain(request, body) {
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

pub use crate::core::spool::fnv1a;

/// A complete answer held in memory: the agent (static), or the dashboard page (owned by the
/// location configuration, which outlives every request of its configuration cycle).
pub struct MemoryResponse<'a> {
    /// `Content-Type`.
    pub content_type: &'static [u8],
    /// `Cache-Control`.
    pub cache_control: &'static [u8],
    /// Strong `ETag`, quoted; nginx's not-modified filter answers `If-None-Match` with 304.
    pub etag: &'a [u8],
    /// The body, sent without a copy.
    pub body: &'a [u8],
    /// Further response headers, name and value.
    pub headers: &'a [(&'static [u8], &'static [u8])],
}

/// Answers `GET` and `HEAD` with `response` (200, or 304 by its ETag), anything else with 405.
///
/// # Safety
/// The slices of `response` must stay valid and unchanged until the request is finalized:
/// nginx keeps pointing at them while the body is being sent.
pub unsafe fn serve_from_memory(request: &mut Request, response: &MemoryResponse) -> ngx_int_t {
    let r: *mut ngx_http_request_t = request.into();
    // SAFETY: `r` is the valid request of this content handler; discarding is how nginx
    // answers without reading a body.
    let (method, rc) = unsafe { ((*r).method, ngx_http_discard_request_body(r)) };
    if rc != NGX_OK {
        return rc;
    }
    if method & (NGX_HTTP_GET | NGX_HTTP_HEAD) as ngx_uint_t == 0 {
        if request.add_header_out("Allow", "GET, HEAD").is_none() {
            return NGX_ERROR;
        }
        return send_response(request, 405, "only GET and HEAD are allowed\n");
    }

    // SAFETY: `r` is valid and its header is not sent yet; the caller guarantees that the
    // header values outlive the request.
    unsafe {
        let Some(etag_header) = push_header(r, b"ETag", response.etag) else {
            return NGX_ERROR;
        };
        (*r).headers_out.etag = etag_header;
        if push_header(r, b"Cache-Control", response.cache_control).is_none() {
            return NGX_ERROR;
        }
        for &(key, value) in response.headers {
            if push_header(r, key, value).is_none() {
                return NGX_ERROR;
            }
        }
        (*r).headers_out.status = 200;
        (*r).headers_out.content_type = ngx_string_static(response.content_type);
        (*r).headers_out.content_type_len = response.content_type.len();
        (*r).headers_out.content_length_n = response.body.len() as i64;
    }

    // SAFETY: as above.
    let rc = unsafe { ngx_http_send_header(r) };
    // SAFETY: as above; nginx sets `header_only` for HEAD and for a 304.
    if rc == NGX_ERROR || rc > NGX_OK || unsafe { (*r).header_only() } != 0 {
        return rc;
    }
    // SAFETY: as above; the caller guarantees that the body outlives the request.
    match unsafe { memory_body(r, response.body) } {
        // SAFETY: a chain from the request pool describing memory that outlives the request.
        Some(chain) => unsafe { ngx_http_output_filter(r, chain) },
        None => NGX_ERROR,
    }
}

/// Adds a response header.
///
/// # Safety
/// `r` must be a valid request whose header has not been sent; `value` must outlive it.
unsafe fn push_header(
    r: *mut ngx_http_request_t,
    key: &'static [u8],
    value: &[u8],
) -> Option<*mut ngx_table_elt_t> {
    // SAFETY: the caller guarantees `r`; nginx returns NULL on allocation failure.
    let header = unsafe { ngx_list_push(&mut (*r).headers_out.headers) }.cast::<ngx_table_elt_t>();
    if header.is_null() {
        return None;
    }
    // SAFETY: a fresh, exclusively ours element of the header list. Zeroing it first clears
    // every field, including `next` (nginx >= 1.23 only), so this builds against both.
    unsafe { ptr::write_bytes(header, 0, 1) };
    // SAFETY: as above, now initialized.
    let element = unsafe { &mut *header };
    element.hash = 1;
    element.key = ngx_string_static(key);
    // nginx only reads header values.
    element.value = ngx_str_t {
        len: value.len(),
        data: value.as_ptr().cast_mut(),
    };
    Some(header)
}

/// A one-buffer chain pointing at `body` (no copy), marked as the last buffer.
///
/// # Safety
/// `r` must be a valid request; `body` must outlive it.
unsafe fn memory_body(r: *mut ngx_http_request_t, body: &[u8]) -> Option<*mut ngx_chain_t> {
    // SAFETY: allocations from the valid request pool; NULL is checked by `as_mut`.
    let (buf, chain) = unsafe {
        (
            ngx_pcalloc((*r).pool, size_of::<ngx_buf_t>()).cast::<ngx_buf_t>(),
            ngx_pcalloc((*r).pool, size_of::<ngx_chain_t>()).cast::<ngx_chain_t>(),
        )
    };
    // SAFETY: zeroed, exclusively owned allocations (or NULL).
    let (buf_ref, chain_ref) = unsafe { (buf.as_mut()?, chain.as_mut()?) };
    let start = body.as_ptr().cast_mut();
    buf_ref.start = start;
    buf_ref.pos = start;
    // SAFETY: one past the end of `body`.
    buf_ref.last = unsafe { start.add(body.len()) };
    buf_ref.end = buf_ref.last;
    // `memory`: read-only memory that output filters must not change.
    buf_ref.set_memory(1);
    buf_ref.set_last_buf(1);
    buf_ref.set_last_in_chain(1);
    chain_ref.buf = buf;
    chain_ref.next = ptr::null_mut();
    Some(chain)
}
