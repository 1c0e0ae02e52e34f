//! Embedded variables for `log_format`:
//! - `$analytics_status`: `accepted`, or why a beacon was not stored (`invalid`,
//!   `event_not_permitted`, `domain_not_accepted`, `body_too_large`, `method_not_allowed`,
//!   `bot`, `write_failed`, `incomplete` when the body never arrived, `error`);
//! - `$analytics_reason`: the human-readable reason of a refusal (as in the 400/422 answer);
//! - `$analytics_event`: the event name a beacon carried (lowercased), accepted or not.
//!
//! Their state is created by the content handler before the body is read, so every request of
//! an `analytics` location has them. Requests of other locations have them "not found".

use ngx::ffi::{
    ngx_conf_t, ngx_http_add_variable, ngx_http_request_t, ngx_http_variable_t, ngx_int_t,
    ngx_uint_t, ngx_variable_value_t, NGX_HTTP_VAR_NOCACHEABLE,
};
use ngx::http::Request;
use ngx::ngx_string;

use crate::request::{no_panic, request_ctx_ptr, NGX_ERROR, NGX_OK};

/// Which value a variable reads (its `data`).
const STATUS: usize = 0;
const REASON: usize = 1;
const EVENT: usize = 2;

/// Registers the variables (called from the module's `preconfiguration`).
pub fn add_variables(cf: *mut ngx_conf_t) -> Result<(), ()> {
    let variables = [
        (ngx_string!("analytics_status"), STATUS),
        (ngx_string!("analytics_reason"), REASON),
        (ngx_string!("analytics_event"), EVENT),
    ];
    for (mut name, which) in variables {
        let flags = NGX_HTTP_VAR_NOCACHEABLE as ngx_uint_t;
        // SAFETY: `cf` is the configuration being parsed; nginx copies the name into its pool
        // and returns the variable to fill in, or NULL.
        let var = unsafe { ngx_http_add_variable(cf, &mut name, flags) };
        // SAFETY: non-NULL pointers from nginx point at a valid variable.
        let var: &mut ngx_http_variable_t = unsafe { var.as_mut() }.ok_or(())?;
        var.get_handler = Some(get_variable);
        var.data = which;
    }
    Ok(())
}

unsafe extern "C" fn get_variable(
    r: *mut ngx_http_request_t,
    v: *mut ngx_variable_value_t,
    data: usize,
) -> ngx_int_t {
    no_panic(NGX_ERROR, || {
        // SAFETY: nginx passes a valid request and an output value to fill in.
        let (request, value) = unsafe { (Request::from_ngx_http_request(r), &mut *v) };
        // SAFETY: NULL, or this module's ctx of the request, alive as long as the request.
        let ctx = unsafe { request_ctx_ptr(request).as_ref() };
        let text: &[u8] = match (ctx, data) {
            (Some(ctx), STATUS) => ctx.outcome.as_bytes(),
            (Some(ctx), REASON) => ctx.reason.as_bytes(),
            (Some(ctx), EVENT) => ctx.event.as_bytes(),
            _ => &[],
        };
        if text.is_empty() {
            value.set_not_found(1);
            value.set_valid(0);
            return NGX_OK;
        }
        value.set_valid(1);
        value.set_no_cacheable(1);
        value.set_not_found(0);
        value.set_escape(0);
        // `len` is a 28-bit field; every value here is far shorter.
        value.set_len(text.len().min((1 << 28) - 1) as u32);
        // The bytes live in the request's ctx (or are static) and nginx only reads them.
        value.data = text.as_ptr().cast_mut();
        NGX_OK
    })
}
