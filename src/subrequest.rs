//! The write subrequest: the one audited place that calls raw `ngx_http_subrequest`.
//!
//! ngx 0.5's `Request::subrequest` always gives the subrequest an empty body, so it cannot
//! carry line protocol. Here the subrequest gets its own request body (a pool copy of the
//! lines), method POST and a matching Content-Length. It runs "in memory": the sink's answer
//! never reaches the client; its body (up to `subrequest_output_buffer_size`) is kept for
//! [`response_body`], so an error message from InfluxDB can be logged. The subrequest is
//! "waited": when it is done, nginx runs the parent's write handler. The caller's
//! post-subrequest handler records the outcome; nginx may call it twice for one subrequest (an
//! upstream error first reports 502, then 0).

use std::ffi::c_void;
use std::ptr;

use ngx::ffi::{
    ngx_http_post_subrequest_pt, ngx_http_post_subrequest_t, ngx_http_request_body_t,
    ngx_http_request_t, ngx_http_subrequest, ngx_pcalloc, ngx_str_t, ngx_uint_t, NGX_HTTP_POST,
    NGX_HTTP_SUBREQUEST_IN_MEMORY, NGX_HTTP_SUBREQUEST_WAITED,
};
use ngx::http::Request;

use crate::handler::body_chain;

static POST_METHOD_NAME: &[u8] = b"POST";

/// A post-subrequest handler (`ngx_http_post_subrequest_pt`).
pub type PostSubrequestHandler = ngx_http_post_subrequest_pt;

/// The subrequest could not be created (allocation failure or nginx refused it).
#[derive(Debug)]
pub struct SubrequestError;

/// Allocates `size` bytes from the request pool, zeroed, as a `T`.
fn pool_calloc<T>(request: &Request) -> Result<*mut T, SubrequestError> {
    // SAFETY: the request pool is valid for the request's lifetime; NULL is checked below.
    let p = unsafe { ngx_pcalloc(request.pool().as_ptr(), size_of::<T>()) }.cast::<T>();
    if p.is_null() {
        Err(SubrequestError)
    } else {
        Ok(p)
    }
}

/// Starts a waited POST subrequest to `uri` whose body is `lines`; nginx calls `on_done` with
/// `data` when it finished, then the parent's write handler.
pub fn start_write(
    request: &mut Request,
    uri: &str,
    lines: &[u8],
    on_done: PostSubrequestHandler,
    data: *mut c_void,
) -> Result<(), SubrequestError> {
    // A pool copy of the lines, as the one, last buffer of the subrequest's body.
    let chain = body_chain(request, lines).ok_or(SubrequestError)?;
    let request_body = pool_calloc::<ngx_http_request_body_t>(request)?;
    // SAFETY: a zeroed request body (no temp file, no rest to read) holding our chain.
    unsafe { (*request_body).bufs = chain };

    let post = pool_calloc::<ngx_http_post_subrequest_t>(request)?;
    // SAFETY: `post` is valid; the caller keeps `data` alive until `on_done` ran.
    unsafe {
        (*post).handler = on_done;
        (*post).data = data;
    }

    // The URI string belongs to the location configuration, which outlives every request of
    // its cycle; nginx only reads it.
    let mut uri_str = ngx_str_t {
        len: uri.len(),
        data: uri.as_ptr().cast_mut(),
    };
    let flags = NGX_HTTP_SUBREQUEST_WAITED | NGX_HTTP_SUBREQUEST_IN_MEMORY;
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
            flags as ngx_uint_t,
        )
    };
    // SAFETY: on NGX_OK nginx returns the new subrequest in `sr`; NULL is checked.
    let Some(sr) = (unsafe { sr.as_mut() }).filter(|_| rc == 0) else {
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
    sr.headers_in.content_length_n = lines.len() as i64;
    sr.headers_in.set_chunked(0);
    Ok(())
}

/// The body of a finished in-memory subrequest's answer (empty when it had none).
///
/// # Safety
/// `sr` must be a valid subrequest started by [`start_write`].
pub unsafe fn response_body<'a>(sr: *const ngx_http_request_t) -> &'a [u8] {
    // SAFETY: the caller guarantees `sr`; `out` is NULL or the in-memory chain whose single
    // buffer nginx filled with the answer, in the request pool.
    let Some(buf) = (unsafe { (*sr).out.as_ref().and_then(|out| out.buf.as_ref()) }) else {
        return &[];
    };
    if buf.pos.is_null() || buf.last <= buf.pos {
        return &[];
    }
    // SAFETY: pos..last is the initialized content of that buffer.
    unsafe { std::slice::from_raw_parts(buf.pos, buf.last.offset_from(buf.pos) as usize) }
}
