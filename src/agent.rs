//! `analytics_agent;`: serves the browser agent (`agent/analytics.js`, embedded at compile time)
//! from memory, so installing the product is one `.so` and a few lines of configuration.
//!
//! The answer carries a content-derived `ETag` (nginx's not-modified filter then answers
//! `If-None-Match` with 304) and `Cache-Control`; nginx's gzip filter compresses it when
//! `gzip_types` lists `application/javascript`. [`serve_from_memory`] also serves the dashboard.

use std::ptr;

use ngx::ffi::{
    ngx_buf_t, ngx_chain_t, ngx_http_discard_request_body, ngx_http_output_filter,
    ngx_http_request_t, ngx_http_send_header, ngx_int_t, ngx_list_push, ngx_pcalloc, ngx_str_t,
    ngx_table_elt_t, ngx_uint_t, NGX_HTTP_GET, NGX_HTTP_HEAD, NGX_HTTP_INTERNAL_SERVER_ERROR,
};
use ngx::http::Request;

use crate::handler::{ngx_string_static, no_panic, send_response, NGX_ERROR, NGX_OK};

/// The agent's source, served byte for byte.
pub static AGENT_JS: &[u8] = include_bytes!("../agent/analytics.js");

/// `Cache-Control` of the agent: browsers revalidate hourly (cheap: 304 by ETag).
const CACHE_CONTROL: &[u8] = b"public, max-age=3600";

const CONTENT_TYPE: &[u8] = b"application/javascript; charset=utf-8";

/// FNV-1a, 64 bit: a stable fingerprint for an ETag (of the agent, of a dashboard page).
pub const fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325_u64;
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    hash
}

/// The agent's strong ETag: its fingerprint as 16 hex digits in quotes, built at compile time.
static ETAG: [u8; 18] = {
    let hash = fnv1a(AGENT_JS);
    let mut etag = [b'"'; 18];
    let mut i = 0;
    while i < 16 {
        let nibble = ((hash >> (60 - 4 * i)) & 0xf) as u8;
        etag[1 + i] = if nibble < 10 {
            b'0' + nibble
        } else {
            b'a' + nibble - 10
        };
        i += 1;
    }
    etag
};

/// The agent's strong ETag, derived from its content.
pub fn agent_etag() -> &'static [u8] {
    &ETAG
}

/// Content handler of a location with `analytics_agent;`.
pub unsafe extern "C" fn agent_handler(r: *mut ngx_http_request_t) -> ngx_int_t {
    // SAFETY: nginx calls a content handler with a valid main request.
    let request = unsafe { Request::from_ngx_http_request(r) };
    let response = MemoryResponse {
        content_type: CONTENT_TYPE,
        cache_control: CACHE_CONTROL,
        etag: agent_etag(),
        body: AGENT_JS,
        headers: &[],
    };
    no_panic(NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t, || {
        // SAFETY: every slice of `response` is static.
        unsafe { serve_from_memory(request, &response) }
    })
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_etag_is_a_quoted_fingerprint_of_the_agent() {
        let etag = std::str::from_utf8(agent_etag()).expect("ASCII");
        assert_eq!(etag, format!("\"{:016x}\"", fnv1a(AGENT_JS)));
        assert_ne!(fnv1a(b"a"), fnv1a(b"b"));
    }
}
