//! `analytics_dashboard [report_uri];`: serves the dashboard page (`dashboard/dashboard.html`,
//! embedded at compile time) from memory, like `analytics_agent` serves the agent.
//!
//! The page is assembled once per location when the configuration is read
//! ([`crate::core::dashboard`]: the report URI written into it, HTML-escaped) and answered with
//! its content-derived `ETag` (304 on `If-None-Match`), `Cache-Control: private, no-cache` and a
//! strict `Content-Security-Policy` whose hashes build.rs computed from the page's inline script
//! and style.

use std::borrow::Cow;
use std::fmt;

use ngx::ffi::{ngx_http_request_t, ngx_int_t, NGX_HTTP_INTERNAL_SERVER_ERROR};
use ngx::http::{HttpModuleLocationConf, Request};

use crate::core::dashboard::dashboard_page;
use crate::request::{fnv1a, no_panic, serve_from_memory, MemoryResponse};
use crate::HttpAnalyticsModule;

include!(concat!(env!("OUT_DIR"), "/dashboard_csp.rs"));

const CONTENT_TYPE: &[u8] = b"text/html; charset=utf-8";

/// The page may be cached but is revalidated on every use (cheap: 304 by ETag); never by a
/// shared cache, as it sits behind the site's access control.
const CACHE_CONTROL: &[u8] = b"private, no-cache";

/// Headers sent with the page besides `ETag` and `Cache-Control`.
static HEADERS: [(&[u8], &[u8]); 3] = [
    (b"Content-Security-Policy", DASHBOARD_CSP.as_bytes()),
    (b"X-Content-Type-Options", b"nosniff"),
    (b"Referrer-Policy", b"no-referrer"),
];

/// The page one `analytics_dashboard` location serves, and its ETag.
#[derive(Clone)]
pub struct DashboardPage {
    body: Cow<'static, str>,
    etag: String,
}

impl DashboardPage {
    /// The page fetching its reports from `report_uri` (`None`: `report`, next to the page).
    pub fn new(report_uri: Option<&str>) -> Result<DashboardPage, String> {
        let body = dashboard_page(report_uri)?;
        let etag = format!("\"{:016x}\"", fnv1a(body.as_bytes()));
        Ok(DashboardPage { body, etag })
    }

    /// The HTML served.
    pub fn body(&self) -> &str {
        &self.body
    }

    /// Its strong ETag (quoted), derived from the whole page, report URI included.
    pub fn etag(&self) -> &str {
        &self.etag
    }
}

impl fmt::Debug for DashboardPage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DashboardPage")
            .field("bytes", &self.body.len())
            .field("etag", &self.etag)
            .finish()
    }
}

/// Content handler of a location with `analytics_dashboard`.
pub unsafe extern "C" fn dashboard_handler(r: *mut ngx_http_request_t) -> ngx_int_t {
    // SAFETY: nginx calls a content handler with a valid main request.
    let request = unsafe { Request::from_ngx_http_request(r) };
    no_panic(NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t, || {
        let Some(page) =
            HttpAnalyticsModule::location_conf(request).and_then(|lcf| lcf.dashboard.as_deref())
        else {
            return NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t;
        };
        let response = MemoryResponse {
            content_type: CONTENT_TYPE,
            cache_control: CACHE_CONTROL,
            etag: page.etag.as_bytes(),
            body: page.body.as_bytes(),
            headers: &HEADERS,
        };
        // SAFETY: the page belongs to the location configuration, which lives until every
        // request of its configuration cycle has finished, and is never changed.
        unsafe { serve_from_memory(request, &response) }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use sha2::{Digest, Sha256};

    /// The content of every `<tag ...>...</tag>` element of `html`, with its opening tag.
    fn elements<'a>(html: &'a str, tag: &str) -> Vec<(&'a str, &'a str)> {
        let mut found = Vec::new();
        let mut rest = html;
        while let Some(at) = rest.find(&format!("<{tag}")) {
            let after = &rest[at..];
            let open_end = after.find('>').expect("opening tag ends") + 1;
            let close = format!("</{tag}>");
            let content_end = after[open_end..].find(&close).expect("element is closed");
            found.push((&after[..open_end], &after[open_end..open_end + content_end]));
            rest = &after[open_end + content_end + close.len()..];
        }
        found
    }

    /// Every tag of `markup` (no script or style content, no comments) with its attributes.
    fn tags(markup: &str) -> Vec<(String, Vec<(String, String)>)> {
        let mut tags = Vec::new();
        let mut rest = markup;
        while let Some(at) = rest.find('<') {
            let mut chars = rest[at + 1..].char_indices().peekable();
            let mut name = String::new();
            while let Some((_, c)) = chars.next_if(|&(_, c)| !c.is_whitespace() && c != '>') {
                name.push(c);
            }
            let mut attributes = Vec::new();
            let mut end = rest.len();
            loop {
                while chars.next_if(|&(_, c)| c.is_whitespace()).is_some() {}
                match chars.next() {
                    None => break,
                    Some((i, '>')) => {
                        end = at + 1 + i + 1;
                        break;
                    }
                    Some((_, first)) => {
                        let mut attribute = first.to_string();
                        while let Some((_, c)) =
                            chars.next_if(|&(_, c)| !c.is_whitespace() && c != '=' && c != '>')
                        {
                            attribute.push(c);
                        }
                        let mut value = String::new();
                        if chars.next_if(|&(_, c)| c == '=').is_some() {
                            let quote = chars.next_if(|&(_, c)| c == '"' || c == '\'');
                            while let Some((_, c)) = chars.next_if(|&(_, c)| match quote {
                                Some((_, q)) => c != q,
                                None => !c.is_whitespace() && c != '>',
                            }) {
                                value.push(c);
                            }
                            if quote.is_some() {
                                chars.next();
                            }
                        }
                        attributes.push((attribute.to_ascii_lowercase(), value));
                    }
                }
            }
            tags.push((name, attributes));
            rest = &rest[end..];
        }
        tags
    }

    /// The sources of one CSP directive.
    fn directive<'a>(csp: &'a str, name: &str) -> Vec<&'a str> {
        let matching: Vec<Vec<&str>> = csp
            .split(';')
            .map(|d| d.split_whitespace().collect::<Vec<_>>())
            .filter(|d| d.first() == Some(&name))
            .collect();
        assert_eq!(matching.len(), 1, "one {name} directive in {csp}");
        matching[0][1..].to_vec()
    }

    fn hash_source(text: &str) -> String {
        let digest = Sha256::digest(text.as_bytes());
        format!(
            "'sha256-{}'",
            base64::engine::general_purpose::STANDARD.encode(digest)
        )
    }

    #[test]
    fn the_csp_allows_exactly_the_inline_script_and_style_of_every_served_page() {
        for uri in [None, Some("/stats/report"), Some("/it's&more/report")] {
            let page = DashboardPage::new(uri).expect("page");
            for (tag, name) in [("script", "script-src"), ("style", "style-src")] {
                let found = elements(page.body(), tag);
                assert_eq!(found.len(), 1, "{uri:?}: one <{tag}>");
                let (open, content) = found[0];
                assert_eq!(
                    open,
                    format!("<{tag}>"),
                    "{uri:?}: no attribute (src, nonce...)"
                );
                assert_eq!(
                    directive(DASHBOARD_CSP, name),
                    [hash_source(content).as_str()],
                    "{uri:?}: {name} is the hash of the served {tag}"
                );
            }
        }
    }

    #[test]
    fn the_csp_is_strict() {
        assert_eq!(directive(DASHBOARD_CSP, "default-src"), ["'self'"]);
        assert_eq!(directive(DASHBOARD_CSP, "frame-ancestors"), ["'none'"]);
        assert_eq!(directive(DASHBOARD_CSP, "base-uri"), ["'none'"]);
        assert_eq!(directive(DASHBOARD_CSP, "form-action"), ["'none'"]);
        assert_eq!(directive(DASHBOARD_CSP, "img-src"), ["data:"]);
        for loose in ["unsafe", "*", "http:", "https:", "nonce-"] {
            assert!(!DASHBOARD_CSP.contains(loose), "{loose} in {DASHBOARD_CSP}");
        }
        assert!(
            !DASHBOARD_CSP.contains(['\r', '\n', '"']),
            "a valid header value"
        );
    }

    #[test]
    fn the_page_needs_nothing_the_csp_forbids() {
        let html = DashboardPage::new(None).expect("page").body().to_string();
        // The markup outside the script and style: every attribute of every tag.
        let mut markup = html.clone();
        for tag in ["script", "style"] {
            for (_, content) in elements(&html, tag) {
                markup = markup.replace(content, "");
            }
        }
        let tags = tags(&markup);
        let attributes = tags.iter().map(|(_, a)| a.len()).sum::<usize>();
        assert!(
            tags.len() > 100 && attributes > 100,
            "the scanner sees the markup"
        );
        for (tag, attributes) in tags {
            for (name, value) in attributes {
                assert!(
                    !name.starts_with("on") && name != "style" && name != "src",
                    "inline handler, style attribute or external resource in <{tag}>"
                );
                if name == "href" {
                    assert!(
                        value == "#" || value.starts_with("data:"),
                        "<{tag}> links elsewhere: {value}"
                    );
                }
            }
        }
        assert!(!html.contains("javascript:"), "no javascript: URL");
        assert!(
            !html.contains("innerHTML"),
            "data only ever goes in as text"
        );
    }

    #[test]
    fn the_etag_depends_on_the_report_uri() {
        let default = DashboardPage::new(None).expect("default");
        let same = DashboardPage::new(Some("report")).expect("report");
        let other = DashboardPage::new(Some("/stats/report")).expect("other");
        assert_eq!(default.etag(), same.etag());
        assert_ne!(default.etag(), other.etag());
        for page in [&default, &other] {
            assert_eq!(
                page.etag(),
                format!("\"{:016x}\"", fnv1a(page.body().as_bytes()))
            );
        }
    }

    #[test]
    fn a_refused_report_uri_is_an_error_naming_the_problem() {
        let err = DashboardPage::new(Some("https://evil.example/report")).expect_err("refused");
        assert!(err.contains("scheme"), "{err}");
    }
}
