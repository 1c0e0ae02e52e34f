//! Crawler and automation detection by `User-Agent`, so their beacons can be dropped before any
//! write. The user agent is only looked at, never stored.

/// Case-insensitive fragments of user agents that are crawlers, link previewers, monitoring,
/// headless browsers or HTTP libraries rather than a person's browser.
const BOT_MARKERS: &[&str] = &[
    "bot",
    "crawl",
    "spider",
    "slurp",
    "mediapartners",
    "facebookexternalhit",
    "embedly",
    "preview",
    "headless",
    "phantomjs",
    "selenium",
    "webdriver",
    "puppeteer",
    "playwright",
    "lighthouse",
    "pagespeed",
    "pingdom",
    "uptime",
    "monitor",
    "curl/",
    "wget/",
    "python-",
    "python/",
    "aiohttp",
    "httpx",
    "go-http-client",
    "java/",
    "okhttp",
    "libwww",
    "node-fetch",
    "axios/",
    "scrapy",
];

/// Whether `user_agent` belongs to a crawler or an automated client. A missing or empty user
/// agent is not taken as a bot (it proves nothing either way).
pub fn is_bot(user_agent: &str) -> bool {
    let lowercase = user_agent.to_ascii_lowercase();
    BOT_MARKERS.iter().any(|marker| lowercase.contains(marker))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crawlers_headless_browsers_and_http_libraries_are_bots() {
        for ua in [
            "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
            "Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)",
            "Mozilla/5.0 (compatible; YandexBot/3.0)",
            "Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; GPTBot/1.0)",
            "facebookexternalhit/1.1 (+http://www.facebook.com/externalhit_uatext.php)",
            "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 HeadlessChrome/120.0.0.0 Safari/537.36",
            "Mozilla/5.0 (Linux) Chrome-Lighthouse",
            "curl/7.88.1",
            "Wget/1.21.3",
            "python-requests/2.31.0",
            "Go-http-client/1.1",
            "Scrapy/2.11 (+https://scrapy.org)",
        ] {
            assert!(is_bot(ua), "{ua}");
        }
    }

    #[test]
    fn browsers_and_missing_user_agents_are_not() {
        for ua in [
            "",
            "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36",
            "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:121.0) Gecko/20100101 Firefox/121.0",
            "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.1 Mobile/15E148 Safari/604.1",
            "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_1) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.1 Safari/605.1.15",
        ] {
            assert!(!is_bot(ua), "{ua}");
        }
    }
}
