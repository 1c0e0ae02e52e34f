//! The write subrequest: the one audited place that calls raw `ngx_http_subrequest`.
//!
//! ngx 0.5's `Request::subrequest` always gives the subrequest an empty body, so it cannot
//! carry line protocol. Here the subrequest gets its own request body (a pool copy of the
//! lines), method POST and a matching Content-Length. The subrequest is "waited": when it is
//! done, nginx runs the parent's write handler.
//!
//! The sink's answer never reaches the client, and never costs the parent its life: this
//! module's own header and body filters (installed first in nginx's filter chains, as
//! lua-nginx-module does for `ngx.location.capture`) take the answer of every write subrequest
//! out of the chain. They keep its status line and at most [`CAPTURED_BODY_MAX`] bytes of its
//! body (for the error log) in a [`WriteCapture`], and throw the rest away. An in-memory
//! subrequest (`NGX_HTTP_SUBREQUEST_IN_MEMORY`) would fail with `NGX_ERROR`, and nginx would
//! terminate the parent, as soon as an answer is larger than `subrequest_output_buffer_size`
//! (a long InfluxDB error, a proxy's HTML error page).

use std::ffi::c_void;
use std::ptr;

use ngx::ffi::{
    ngx_chain_t, ngx_http_post_subrequest_t, ngx_http_request_body_t, ngx_http_request_t,
    ngx_http_subrequest, ngx_http_top_body_filter, ngx_http_top_header_filter, ngx_int_t,
    ngx_palloc, ngx_pcalloc, ngx_pool_t, ngx_str_t, ngx_uint_t, NGX_HTTP_CLIENT_CLOSED_REQUEST,
    NGX_HTTP_POST, NGX_HTTP_SUBREQUEST_WAITED,
};
use ngx::http::Request;

use crate::request::{body_chain, no_panic, NGX_ERROR, NGX_OK};

static POST_METHOD_NAME: &[u8] = b"POST";

/// Most bytes of a sink's answer body kept for the error log.
pub const CAPTURED_BODY_MAX: usize = 1024;

/// What the upstream answered to one of this module's subrequests, filled in by this module's
/// filters and its post-subrequest handler. It lives in the parent's pool, like the subrequest
/// itself, so it is valid for as long as the subrequest can report to it. It has nothing to drop
/// (its body is pool memory too): a batch leader's pool cleanup may still read it while the
/// pool is being destroyed, before any of the pool's memory is freed.
pub struct Capture {
    /// The subrequest has finished (its post-subrequest handler ran).
    pub done: bool,
    /// The status line the upstream answered with before the subrequest finished; 0 when none
    /// (connection refused, timeout: nginx's own error pages do not count).
    pub status: usize,
    /// The answer body was longer than `limit` (or could not be read or kept).
    pub body_truncated: bool,
    /// The code nginx finished the subrequest with (first report).
    rc: ngx_int_t,
    /// Most bytes of the body kept.
    limit: usize,
    /// The pool the body buffer comes from (the parent request's).
    pool: *mut ngx_pool_t,
    /// The kept body: `len` bytes at `buf`, in a pool buffer of `cap` bytes (NULL while empty).
    buf: *mut u8,
    cap: usize,
    len: usize,
}

/// The capture of a write to the sink.
pub type WriteCapture = Capture;

impl Capture {
    /// The kept start of the answer body.
    pub fn body(&self) -> &[u8] {
        if self.buf.is_null() {
            return &[];
        }
        // SAFETY: `buf` holds `len` initialized bytes of pool memory, alive with the pool.
        unsafe { std::slice::from_raw_parts(self.buf, self.len) }
    }

    /// The answer body as a short, single-line, printable message for the error log and error
    /// answers: control characters (line breaks included) become spaces, at most 300
    /// characters, `...` when cut short.
    pub fn message(&self) -> String {
        const MAX_CHARS: usize = 300;
        let text = String::from_utf8_lossy(self.body());
        let text = text.trim();
        let mut message: String = text
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .take(MAX_CHARS)
            .collect();
        if self.body_truncated || text.chars().count() > MAX_CHARS {
            message.push_str("...");
        }
        message
    }

    /// Whether the subrequest ended without saying what the upstream did: no status line, and
    /// it was cancelled (the client went away and the location does not ignore client aborts)
    /// or failed inside nginx. The request may or may not have reached the upstream.
    pub fn outcome_unknown(&self) -> bool {
        self.status == 0
            && (self.rc == NGX_HTTP_CLIENT_CLOSED_REQUEST as ngx_int_t || self.rc == NGX_ERROR)
    }

    /// A copy of the kept body.
    pub fn take_body(&mut self) -> Vec<u8> {
        self.body().to_vec()
    }

    /// Room for `more` bytes, as far as `limit` allows: grows the pool buffer (doubling; the old
    /// one stays in the pool until it is destroyed). Returns how many of `more` fit.
    fn reserve(&mut self, more: usize) -> usize {
        let want = more.min(self.limit.saturating_sub(self.len));
        if self.len + want <= self.cap {
            return want;
        }
        let cap = (self.cap * 2)
            .max(self.len + want)
            .max(4096)
            .min(self.limit);
        // SAFETY: the parent request's pool, alive as long as this capture.
        let buf = unsafe { ngx_palloc(self.pool, cap) }.cast::<u8>();
        if buf.is_null() {
            return 0;
        }
        if self.len > 0 {
            // SAFETY: both buffers are valid for `len` bytes and do not overlap.
            unsafe { ptr::copy_nonoverlapping(self.buf, buf, self.len) };
        }
        self.buf = buf;
        self.cap = cap;
        want
    }

    fn keep(&mut self, bytes: &[u8]) {
        let take = self.reserve(bytes.len());
        if take > 0 {
            // SAFETY: `reserve` made room for `take` bytes after `len`.
            unsafe { ptr::copy_nonoverlapping(bytes.as_ptr(), self.buf.add(self.len), take) };
            self.len += take;
        }
        if take < bytes.len() {
            self.body_truncated = true;
        }
    }
}

/// The subrequest could not be created (allocation failure or nginx refused it).
#[derive(Debug)]
pub struct SubrequestError;

/// Allocates a zeroed `T` from the request pool.
fn pool_calloc<T>(request: &Request) -> Result<*mut T, SubrequestError> {
    // SAFETY: the request pool is valid for the request's lifetime; NULL is checked below.
    let p = unsafe { ngx_pcalloc(request.pool().as_ptr(), size_of::<T>()) }.cast::<T>();
    if p.is_null() {
        Err(SubrequestError)
    } else {
        Ok(p)
    }
}

/// Starts a waited POST subrequest to `uri` whose body is `lines`, and returns where its
/// outcome will be recorded; nginx runs the parent's write handler once it finished
/// ([`Capture::done`]).
pub fn start_write(
    request: &mut Request,
    uri: &str,
    lines: &[u8],
) -> Result<*mut WriteCapture, SubrequestError> {
    start_post(request, uri, lines, CAPTURED_BODY_MAX)
}

/// Starts a waited POST subrequest to `uri` whose body is `body`; at most `limit` bytes of the
/// answer are kept. nginx runs the parent's write handler once it finished ([`Capture::done`]).
pub fn start_post(
    request: &mut Request,
    uri: &str,
    body: &[u8],
    limit: usize,
) -> Result<*mut Capture, SubrequestError> {
    // A pool copy of the body, as the one, last buffer of the subrequest's body.
    let chain = body_chain(request, body).ok_or(SubrequestError)?;
    let request_body = pool_calloc::<ngx_http_request_body_t>(request)?;
    // SAFETY: a zeroed request body (no temp file, no rest to read) holding our chain.
    unsafe { (*request_body).bufs = chain };

    // All zeroes is an empty capture; it is pool memory with nothing to drop.
    let capture = pool_calloc::<Capture>(request)?;
    // SAFETY: just allocated, zeroed.
    unsafe {
        (*capture).limit = limit;
        (*capture).pool = request.pool().as_ptr();
    }
    let post = pool_calloc::<ngx_http_post_subrequest_t>(request)?;
    // SAFETY: `post` is valid; `capture` lives in the same pool as the subrequest.
    unsafe {
        (*post).handler = Some(write_done);
        (*post).data = capture.cast::<c_void>();
    }

    // The URI string belongs to the location configuration, which outlives every request of
    // its cycle; nginx only reads it.
    let mut uri_str = ngx_str_t {
        len: uri.len(),
        data: uri.as_ptr().cast_mut(),
    };
    let mut sr: *mut ngx_http_request_t = ptr::null_mut();
    let r: *mut ngx_http_request_t = request.into();
    // SAFETY: `r` is the valid parent request; all pointers passed are valid for its lifetime.
    let rc = unsafe {
        ngx_http_subrequest(
            r,
            &mut uri_str,
            ptr::null_mut(),
            &mut sr,
            post,
            NGX_HTTP_SUBREQUEST_WAITED as ngx_uint_t,
        )
    };
    // SAFETY: on NGX_OK nginx returns the new subrequest in `sr`; NULL is checked.
    let Some(sr) = (unsafe { sr.as_mut() }).filter(|_| rc == NGX_OK) else {
        return Err(SubrequestError);
    };

    // The subrequest copied the parent's request line and headers: give it our body instead
    // of the client's, and make the length and method match it.
    sr.request_body = request_body;
    sr.method = NGX_HTTP_POST as ngx_uint_t;
    sr.method_name = ngx_str_t {
        len: POST_METHOD_NAME.len(),
        data: POST_METHOD_NAME.as_ptr().cast_mut(),
    };
    sr.headers_in.content_length_n = body.len() as i64;
    sr.headers_in.set_chunked(0);
    Ok(capture)
}

/// Post-subrequest handler: marks the capture done. nginx may call it twice for one
/// subrequest (an upstream error first reports 502, then 0 once its error page was "sent");
/// only the first call counts.
unsafe extern "C" fn write_done(
    sr: *mut ngx_http_request_t,
    data: *mut c_void,
    rc: ngx_int_t,
) -> ngx_int_t {
    // SAFETY: `data` is the capture `start_post` allocated next to this subrequest.
    let Some(capture) = (unsafe { data.cast::<Capture>().as_mut() }) else {
        return rc;
    };
    if !capture.done {
        capture.done = true;
        capture.rc = rc;
        if capture.status == 0 {
            // A status line the proxy received but did not pass on (`proxy_intercept_errors`).
            // SAFETY: `sr` is the finishing subrequest; `upstream` is NULL or its upstream.
            if let Some(u) = unsafe { (*sr).upstream.as_ref() } {
                capture.status = u.headers_in.status_n;
            }
        }
    }
    rc
}

/// The capture of `r` if it is one of this module's subrequests, recognized by its
/// post-subrequest handler (which, unlike a module ctx, survives an internal redirect such as an
/// `error_page` or `X-Accel-Redirect`; lua-nginx-module recognizes its captures the same way).
///
/// # Safety
/// `r` must be a valid request.
unsafe fn capture_of<'a>(r: *mut ngx_http_request_t) -> Option<&'a mut Capture> {
    // SAFETY: the caller guarantees `r`; `main` and `post_subrequest` of a valid request are
    // valid or NULL.
    let post = unsafe {
        if (*r).main == r {
            return None;
        }
        (*r).post_subrequest.as_ref()?
    };
    let ours = write_done as unsafe extern "C" fn(_, _, _) -> _;
    if post.handler.map(|h| h as *const ()) != Some(ours as *const ()) {
        return None;
    }
    // SAFETY: `start_post` set `data` to the capture, in the subrequest's pool.
    unsafe { post.data.cast::<Capture>().as_mut() }
}

static mut NEXT_HEADER_FILTER: ngx::ffi::ngx_http_output_header_filter_pt = None;
static mut NEXT_BODY_FILTER: ngx::ffi::ngx_http_output_body_filter_pt = None;

/// Puts this module's filters at the top of nginx's header and body filter chains.
///
/// # Safety
/// Call once per configuration cycle from `postconfiguration`, on nginx's configuration
/// thread (the chains are process globals that nginx rebuilds for every cycle).
pub unsafe fn install_filters() {
    // SAFETY: the caller guarantees the single-threaded configuration phase.
    unsafe {
        NEXT_HEADER_FILTER = ngx_http_top_header_filter;
        ngx_http_top_header_filter = Some(capture_header_filter);
        NEXT_BODY_FILTER = ngx_http_top_body_filter;
        ngx_http_top_body_filter = Some(capture_body_filter);
    }
}

/// Header filter: keeps the status line of a write subrequest's answer and sends nothing.
unsafe extern "C" fn capture_header_filter(r: *mut ngx_http_request_t) -> ngx_int_t {
    // SAFETY: nginx calls a header filter with a valid request.
    if let Some(capture) = unsafe { capture_of(r) } {
        if !capture.done && capture.status == 0 {
            // SAFETY: as above.
            capture.status = unsafe { (*r).headers_out.status };
        }
        return NGX_OK;
    }
    // SAFETY: the saved next filter of the chain, set before any request runs.
    match unsafe { NEXT_HEADER_FILTER } {
        // SAFETY: passing the request on down the chain, as every filter does.
        Some(next) => unsafe { next(r) },
        None => NGX_ERROR,
    }
}

/// Body filter: keeps the start of a write subrequest's answer body, marks every buffer as
/// sent and sends nothing.
unsafe extern "C" fn capture_body_filter(
    r: *mut ngx_http_request_t,
    chain: *mut ngx_chain_t,
) -> ngx_int_t {
    // SAFETY: nginx calls a body filter with a valid request.
    if let Some(capture) = unsafe { capture_of(r) } {
        no_panic((), || consume(capture, chain));
        return NGX_OK;
    }
    // SAFETY: the saved next filter of the chain, set before any request runs.
    match unsafe { NEXT_BODY_FILTER } {
        // SAFETY: passing the request and its chain on down the chain.
        Some(next) => unsafe { next(r, chain) },
        None => NGX_ERROR,
    }
}

/// Keeps the part of a temp-file buffer that fits in the capture.
fn keep_from_file(capture: &mut Capture, buf: &ngx::ffi::ngx_buf_t) {
    let len = usize::try_from(buf.file_last - buf.file_pos).unwrap_or(0);
    let want = capture.reserve(len);
    if want < len {
        capture.body_truncated = true;
    }
    let mut done = 0;
    while done < want {
        // SAFETY: `buf.file` is the open temp file the proxy wrote this buffer to; the
        // destination is the room `reserve` made after the kept bytes, `want - done` long.
        let n = unsafe {
            ngx::ffi::ngx_read_file(
                buf.file,
                capture.buf.add(capture.len + done),
                want - done,
                buf.file_pos + done as i64,
            )
        };
        match usize::try_from(n) {
            Ok(n) if n > 0 => done += n,
            _ => {
                capture.body_truncated = true;
                break;
            }
        }
    }
    capture.len += done;
}

fn consume(capture: &mut Capture, mut link: *mut ngx_chain_t) {
    // SAFETY: the chain nginx passed to the body filter: valid links and buffers.
    while let Some(cl) = unsafe { link.as_ref() } {
        // SAFETY: as above.
        if let Some(buf) = unsafe { cl.buf.as_mut() } {
            if !capture.done && buf.in_file() == 0 && !buf.pos.is_null() && buf.last > buf.pos {
                // SAFETY: pos..last is the initialized content of an in-memory buffer.
                let bytes = unsafe {
                    std::slice::from_raw_parts(buf.pos, buf.last.offset_from(buf.pos) as usize)
                };
                capture.keep(bytes);
            } else if !capture.done && buf.in_file() != 0 && buf.file_last > buf.file_pos {
                // Spilled to a temp file by the proxy: read back what is kept.
                keep_from_file(capture, buf);
            }
            // Consumed: the upstream may reuse the buffer.
            buf.pos = buf.last;
            buf.file_pos = buf.file_last;
        }
        link = cl.next;
    }
}
