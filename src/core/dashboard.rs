//! The dashboard page (`dashboard/dashboard.html`) as `analytics_dashboard [report_uri];` serves
//! it: the report URI is checked, HTML-escaped and written into the page's
//! `<meta name="analytics-report-uri">`, which the page's script reads.
//!
//! Only that attribute changes: the inline script and style stay byte for byte what build.rs
//! hashed for the page's Content-Security-Policy.

use std::borrow::Cow;

/// The dashboard page, compiled in.
pub static DASHBOARD_HTML: &str = include_str!("../../dashboard/dashboard.html");

/// Report URI of the page as compiled in: `report`, relative to the page's own URL.
pub const DEFAULT_REPORT_URI: &str = "report";

/// The element of the page that carries the report URI (exactly once in the page).
const REPORT_URI_META: &str = "<meta name=\"analytics-report-uri\" content=\"report\">";

/// Longest accepted report URI.
pub const MAX_REPORT_URI_LEN: usize = 1024;

/// Checks the `report_uri` of `analytics_dashboard`: a path on the dashboard's own site,
/// absolute (`/analytics/report`) or relative to the page (`report`, `../report`), without
/// scheme, host, query or fragment (the page adds its own query; its Content-Security-Policy
/// lets it fetch only from its own origin). Only RFC 3986 path characters are accepted.
pub fn check_report_uri(uri: &str) -> Result<(), String> {
    let refuse = |why: &str| {
        Err(format!(
            "takes the URI of the report location, a path such as \"/analytics/report\" or \
             \"report\" (relative to the page), not \"{}\": {why}",
            uri.escape_debug()
        ))
    };
    if uri.is_empty() || uri.len() > MAX_REPORT_URI_LEN {
        return refuse(&format!("must be 1 to {MAX_REPORT_URI_LEN} bytes"));
    }
    if uri.starts_with("//") {
        return refuse("a host is not allowed");
    }
    let first_segment = uri.split('/').next().unwrap_or_default();
    if first_segment.contains(':') {
        return refuse("a scheme is not allowed");
    }
    let bytes = uri.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let hex = |j: usize| bytes.get(j).is_some_and(u8::is_ascii_hexdigit);
            if !(hex(i + 1) && hex(i + 2)) {
                return refuse("\"%\" must start a percent-encoded byte");
            }
            i += 3;
            continue;
        }
        if b == b'?' || b == b'#' {
            return refuse("a query or fragment is not allowed");
        }
        if !(b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/".contains(&b)) {
            return refuse("only URI path characters are allowed");
        }
        i += 1;
    }
    Ok(())
}

/// `text` escaped for an HTML attribute value in double quotes (and for element content).
pub fn escape_html(text: &str) -> Cow<'_, str> {
    if !text.contains(['&', '<', '>', '"', '\'']) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// `template` with its report URI set to `report_uri` (checked, then escaped); the template
/// itself when `report_uri` is `None` or the default.
pub fn assemble_page<'a>(
    template: &'a str,
    report_uri: Option<&str>,
) -> Result<Cow<'a, str>, String> {
    let Some(at) = template.find(REPORT_URI_META) else {
        return Err("the dashboard page has no report URI element".to_string());
    };
    if template[at + 1..].contains(REPORT_URI_META) {
        return Err("the dashboard page has two report URI elements".to_string());
    }
    let uri = match report_uri {
        None => return Ok(Cow::Borrowed(template)),
        Some(uri) => uri,
    };
    check_report_uri(uri)?;
    if uri == DEFAULT_REPORT_URI {
        return Ok(Cow::Borrowed(template));
    }
    let escaped = escape_html(uri);
    let mut page = String::with_capacity(template.len() + escaped.len());
    page.push_str(&template[..at]);
    page.push_str("<meta name=\"analytics-report-uri\" content=\"");
    page.push_str(&escaped);
    page.push_str("\">");
    page.push_str(&template[at + REPORT_URI_META.len()..]);
    Ok(Cow::Owned(page))
}

/// The dashboard page for `report_uri` (`None`: the default, `report`).
pub fn dashboard_page(report_uri: Option<&str>) -> Result<Cow<'static, str>, String> {
    assemble_page(DASHBOARD_HTML, report_uri)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The attribute value of the page's report URI element.
    fn report_uri_of(page: &str) -> &str {
        let start = page
            .find("<meta name=\"analytics-report-uri\" content=\"")
            .expect("report URI element")
            + "<meta name=\"analytics-report-uri\" content=\"".len();
        let end = start + page[start..].find('"').expect("closing quote");
        &page[start..end]
    }

    #[test]
    fn report_uris_on_the_same_site_are_accepted() {
        for uri in [
            "report",
            "/analytics/report",
            "../stats/report",
            "./report",
            "/a/b;v=1/report",
            "/r%C3%A9port",
            "/it's&more/report",
            "/~user/@report:1",
        ] {
            assert_eq!(check_report_uri(uri), Ok(()), "{uri}");
        }
    }

    #[test]
    fn report_uris_off_site_or_with_extra_parts_are_refused() {
        for (uri, why) in [
            ("", "1 to 1024 bytes"),
            ("https://evil.example/report", "scheme"),
            ("javascript:alert(1)", "scheme"),
            ("data:text/html,x", "scheme"),
            ("//evil.example/report", "host"),
            ("report?x=1", "query"),
            ("report#top", "fragment"),
            ("/a b", "path characters"),
            ("/a\"><script>alert(1)</script>", "path characters"),
            ("/a<b", "path characters"),
            ("/a\\b", "path characters"),
            ("/a\nb", "path characters"),
            ("/a\0b", "path characters"),
            ("/r\u{e9}port", "path characters"),
            ("/100%", "percent-encoded"),
            ("/%zz", "percent-encoded"),
        ] {
            let err = check_report_uri(uri).expect_err(uri);
            assert!(err.contains(why), "{uri:?}: {err}");
            assert!(
                err.starts_with("takes the URI of the report location"),
                "{err}"
            );
        }
        let long = format!("/{}", "a".repeat(MAX_REPORT_URI_LEN));
        assert!(check_report_uri(&long).is_err());
        assert!(check_report_uri(&long[..MAX_REPORT_URI_LEN]).is_ok());
    }

    #[test]
    fn html_escaping_covers_every_special_character() {
        for (text, escaped) in [
            ("plain/path", "plain/path"),
            ("a&b", "a&amp;b"),
            ("<x>", "&lt;x&gt;"),
            ("\"q\"", "&quot;q&quot;"),
            ("it's", "it&#39;s"),
            ("&amp;", "&amp;amp;"),
        ] {
            assert_eq!(escape_html(text), escaped, "{text}");
        }
        assert!(matches!(escape_html("no-specials"), Cow::Borrowed(_)));
    }

    #[test]
    fn the_default_page_is_the_file_itself() {
        for uri in [None, Some(DEFAULT_REPORT_URI)] {
            let page = dashboard_page(uri).expect("page");
            assert!(matches!(page, Cow::Borrowed(_)), "{uri:?}: no copy");
            assert_eq!(page, DASHBOARD_HTML);
            assert_eq!(report_uri_of(&page), "report");
        }
    }

    #[test]
    fn a_report_uri_changes_only_the_meta_element_and_is_escaped() {
        for (uri, attribute) in [
            ("/stats/report", "/stats/report"),
            ("/it's&more/report", "/it&#39;s&amp;more/report"),
        ] {
            let page = dashboard_page(Some(uri)).expect("page");
            assert_eq!(report_uri_of(&page), attribute, "{uri}");
            let default_meta = REPORT_URI_META;
            let new_meta = format!("<meta name=\"analytics-report-uri\" content=\"{attribute}\">");
            assert_eq!(
                page.replacen(&new_meta, default_meta, 1),
                DASHBOARD_HTML,
                "{uri}: nothing else changes"
            );
        }
    }

    #[test]
    fn a_refused_uri_gives_no_page() {
        let err = dashboard_page(Some("https://evil.example/")).expect_err("refused");
        assert!(err.contains("scheme"), "{err}");
    }

    #[test]
    fn a_template_without_exactly_one_report_uri_element_is_an_error() {
        assert!(assemble_page("<html></html>", Some("/r")).is_err());
        assert!(assemble_page("<html></html>", None).is_err());
        let twice = format!("{REPORT_URI_META}{REPORT_URI_META}");
        assert!(assemble_page(&twice, None).is_err());
        let once = format!("<head>{REPORT_URI_META}</head>");
        assert_eq!(
            assemble_page(&once, Some("/x")).as_deref(),
            Ok("<head><meta name=\"analytics-report-uri\" content=\"/x\"></head>")
        );
    }
}
