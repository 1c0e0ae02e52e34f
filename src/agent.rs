//! `analytics_agent;`: serves the browser agent (`agent/analytics.js`, embedded at compile time)
//! from memory, so installing the product is one `.so` and a few lines of configuration.
//!
//! The answer carries a content-derived `ETag` (nginx's not-modified filter then answers
//! `If-None-Match` with 304) and `Cache-Control`; nginx's gzip filter compresses it when
//! `gzip_types` lists `application/javascript`. The serving itself is [`crate::request::serve_from_memory`].

use ngx::ffi::{ngx_http_request_t, ngx_int_t, NGX_HTTP_INTERNAL_SERVER_ERROR};
use ngx::http::Request;

use crate::request::{fnv1a, no_panic, serve_from_memory, MemoryResponse};

/// The agent's source, served byte for byte.
pub static AGENT_JS: &[u8] = include_bytes!("../agent/analytics.js");

/// `Cache-Control` of the agent: browsers revalidate hourly (cheap: 304 by ETag).
const CACHE_CONTROL: &[u8] = b"public, max-age=3600";

const CONTENT_TYPE: &[u8] = b"application/javascript; charset=utf-8";

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
