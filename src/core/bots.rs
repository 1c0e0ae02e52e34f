//! Crawler and automation detection by `User-Agent`, so their beacons can be dropped before any
//! write. The user agent is only looked at, never stored.
//!
//! The list is the one of the `isbot` crate ([`ISBOT_VERSION`], MIT licence, notice in
//! `bots/LICENSE-isbot`), kept as data in `bots/isbot-patterns.txt`, plus [`EXTRA_PATTERNS`]
//! for what sends beacons but is not in it (browser automation, HTTP libraries). All of it is
//! compiled once into one case-insensitive automaton over bytes ([`BotMatcher`]): a check
//! allocates nothing and never copies or lowercases the user agent.
//!
//! Running the automaton over a browser's user agent costs a few hundred nanoseconds, most of
//! it cache misses on its states, while the user agents of real traffic repeat a lot. So
//! [`is_bot`] first looks in a small per-thread table of verdicts for recently seen user agents
//! ([`VerdictCache`]: each slot holds the whole user agent and is used only on an exact match, so
//! it can never return another agent's verdict).

use std::cell::RefCell;
use std::sync::OnceLock;

use regex::bytes::{Regex, RegexBuilder};

/// Version of the `isbot` crate whose pattern list is in `bots/isbot-patterns.txt`.
pub const ISBOT_VERSION: &str = "0.1.3";

/// The `isbot` crate's `src/bot_regex_patterns.txt`, unchanged: one regular expression per
/// line, matched case-insensitively anywhere in the user agent.
const ISBOT_PATTERNS: &str = include_str!("bots/isbot-patterns.txt");

/// Patterns added to isbot's: headless browsers and automation frameworks (which look like a
/// browser apart from one token) and HTTP libraries and runtimes that isbot leaves out.
pub const EXTRA_PATTERNS: &[&str] = &[
    // Browser automation and headless browsers.
    "headless",
    "selenium",
    "webdriver",
    "puppeteer",
    "playwright",
    r"cypress/",
    r"jsdom/",
    "htmlunit",
    "slimerjs",
    "pagespeed",
    // HTTP libraries and runtimes (isbot has curl, wget, python-requests, go-http-client, ...).
    r"^python",
    r"^node$",
    r"^node-",
    "undici",
    r"^deno/",
    r"^bun/",
    r"^ruby",
    "libcurl",
    "powershell",
    r"reqwest/",
    r"^hyper/",
    r"dart:io",
];

/// One compiled automaton for every pattern.
#[derive(Debug)]
pub struct BotMatcher {
    regex: Regex,
}

impl BotMatcher {
    /// Compiles isbot's patterns and [`EXTRA_PATTERNS`] (a few milliseconds).
    pub fn new() -> Result<Self, String> {
        let patterns: Vec<&str> = ISBOT_PATTERNS
            .lines()
            .map(str::trim_end)
            .filter(|line| !line.is_empty())
            .chain(EXTRA_PATTERNS.iter().copied())
            .collect();
        let regex = RegexBuilder::new(&patterns.join("|"))
            .case_insensitive(true)
            // Bytes, not characters: a user agent need not be UTF-8 and is never decoded.
            .unicode(false)
            .build()
            .map_err(|err| format!("bot pattern list does not compile: {err}"))?;
        Ok(BotMatcher { regex })
    }

    /// Whether `user_agent` belongs to a crawler or an automated client. An empty user agent
    /// is not taken as a bot (it proves nothing either way).
    pub fn is_bot(&self, user_agent: &[u8]) -> bool {
        !user_agent.is_empty() && self.regex.is_match(user_agent)
    }
}

static MATCHER: OnceLock<Result<BotMatcher, String>> = OnceLock::new();

/// The process-wide matcher, compiled on first use. Call it at configuration time so the nginx
/// master compiles it once and every worker inherits it.
pub fn matcher() -> Result<&'static BotMatcher, &'static str> {
    MATCHER
        .get_or_init(BotMatcher::new)
        .as_ref()
        .map_err(String::as_str)
}

/// Whether `user_agent` is a bot, with the process-wide matcher and this thread's verdict
/// cache (false if the matcher failed to compile, which [`matcher`] reports at configuration
/// time).
pub fn is_bot(user_agent: &[u8]) -> bool {
    let Ok(matcher) = matcher() else {
        return false;
    };
    VERDICTS.with(|cache| {
        cache
            .borrow_mut()
            .verdict(user_agent, |ua| matcher.is_bot(ua))
    })
}

thread_local! {
    /// The verdict cache of this thread (an nginx worker has one thread).
    static VERDICTS: RefCell<VerdictCache> = const { RefCell::new(VerdictCache::new()) };
}

/// Number of slots of a [`VerdictCache`].
pub const CACHE_SLOTS: usize = 256;
/// Longest user agent a [`VerdictCache`] keeps, in bytes; longer ones are always matched.
pub const CACHE_MAX_LEN: usize = 254;

/// Verdicts for recently seen user agents: a direct-mapped table of [`CACHE_SLOTS`] slots, each
/// holding one user agent (whole) and its verdict. About 64 KiB, allocated on first use.
pub struct VerdictCache {
    slots: Vec<Slot>,
}

struct Slot {
    /// Length of `user_agent`; 0 for an empty slot (an empty user agent is never stored).
    len: u8,
    bot: bool,
    user_agent: [u8; CACHE_MAX_LEN],
}

impl Default for VerdictCache {
    fn default() -> Self {
        Self::new()
    }
}

impl VerdictCache {
    /// An empty cache (its table is allocated on first use).
    pub const fn new() -> Self {
        VerdictCache { slots: Vec::new() }
    }

    /// The verdict for `user_agent`: the cached one when its slot holds exactly these bytes,
    /// otherwise `compute(user_agent)`, then stored in the slot. Empty user agents are not bots.
    pub fn verdict(&mut self, user_agent: &[u8], compute: impl FnOnce(&[u8]) -> bool) -> bool {
        let len = user_agent.len();
        if len == 0 {
            return false;
        }
        if len > CACHE_MAX_LEN {
            return compute(user_agent);
        }
        if self.slots.is_empty() {
            self.slots = (0..CACHE_SLOTS)
                .map(|_| Slot {
                    len: 0,
                    bot: false,
                    user_agent: [0; CACHE_MAX_LEN],
                })
                .collect();
        }
        let index = slot_index(user_agent);
        let Some(slot) = self.slots.get_mut(index) else {
            return compute(user_agent);
        };
        if usize::from(slot.len) == len && slot.user_agent[..len] == *user_agent {
            return slot.bot;
        }
        let bot = compute(user_agent);
        slot.user_agent[..len].copy_from_slice(user_agent);
        // `len` is at most CACHE_MAX_LEN (254), so it fits.
        slot.len = len as u8;
        slot.bot = bot;
        bot
    }
}

/// The slot of `bytes`: the top bits of a multiplicative hash over 8-byte words.
fn slot_index(bytes: &[u8]) -> usize {
    const K: u64 = 0x517c_c1b7_2722_0a95;
    let mut hash = bytes.len() as u64;
    let mut words = bytes.chunks_exact(8);
    for word in &mut words {
        let mut w = [0u8; 8];
        w.copy_from_slice(word);
        hash = (hash.rotate_left(5) ^ u64::from_le_bytes(w)).wrapping_mul(K);
    }
    let mut tail = [0u8; 8];
    tail[..words.remainder().len()].copy_from_slice(words.remainder());
    hash = (hash.rotate_left(5) ^ u64::from_le_bytes(tail)).wrapping_mul(K);
    (hash >> (64 - CACHE_SLOTS.trailing_zeros())) as usize
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
            "WhatsApp/2.19.308 A",
            "HubSpot-Link-Resolver",
            "SeopultContentAnalyzer/1.0",
            "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 HeadlessChrome/120.0.0.0 Safari/537.36",
            "Mozilla/5.0 (Linux) Chrome-Lighthouse",
            "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36 Puppeteer",
            "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/119.0.0.0 Safari/537.36 Cypress/13.6.0",
            "Mozilla/5.0 (linux) AppleWebKit/537.36 (KHTML, like Gecko) jsdom/22.1.0",
            "curl/7.88.1",
            "Wget/1.21.3",
            "python-requests/2.31.0",
            "Python/3.11 aiohttp/3.9.1",
            "python-httpx/0.25.2",
            "Go-http-client/1.1",
            "Java/17.0.2",
            "okhttp/4.12.0",
            "axios/1.6.2",
            "node",
            "undici",
            "Deno/1.38.5",
            "Bun/1.0.14",
            "Ruby",
            "reqwest/0.11.22",
            "Mozilla/5.0 (Windows NT; Windows NT 10.0; en-US) WindowsPowerShell/5.1.22621.2506",
            "Dart/3.2 (dart:io)",
            "Scrapy/2.11 (+https://scrapy.org)",
        ] {
            assert!(is_bot(ua.as_bytes()), "{ua}");
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
            // Phones whose model names contain "bot" (wrongly dropped by a plain substring).
            "Mozilla/5.0 (Linux; Android 9; CUBOT KING KONG 3) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/116.0.0.0 Mobile Safari/537.36",
            "Dalvik/2.1.0 (Linux; U; Android 8.0.0; SM-G930F Build/R16NW)",
        ] {
            assert!(!is_bot(ua.as_bytes()), "{ua}");
        }
    }

    #[test]
    fn bytes_that_are_not_utf8_are_matched_not_refused() {
        assert!(is_bot(b"curl/8.0 \xff\xfe"));
        assert!(!is_bot(b"Mozilla/5.0 \xff\xfe (Windows NT 10.0)"));
    }

    #[test]
    fn cached_verdicts_are_the_matchers_verdicts() {
        let matcher = matcher().unwrap();
        let mut cache = VerdictCache::new();
        let long_bot = format!("Mozilla/5.0 {} Googlebot/2.1", "x".repeat(300));
        let long_browser = format!("Mozilla/5.0 {} Firefox/121.0", "x".repeat(300));
        let mut agents: Vec<String> = lines("bots.txt");
        agents.extend(lines("browsers-sample.txt").into_iter().take(3000));
        agents.extend([long_bot, long_browser, String::new()]);
        // Twice, so the second pass meets full slots: hits, and collisions of other agents.
        for pass in 0..2 {
            let mut computed = 0;
            for ua in &agents {
                let got = cache.verdict(ua.as_bytes(), |ua| {
                    computed += 1;
                    matcher.is_bot(ua)
                });
                assert_eq!(got, matcher.is_bot(ua.as_bytes()), "pass {pass}: {ua}");
            }
            assert!(
                computed > CACHE_SLOTS,
                "pass {pass}: only {computed} computed"
            );
        }
    }

    #[test]
    fn a_cached_agent_is_not_matched_again() {
        let mut cache = VerdictCache::new();
        let mut calls = 0;
        for expected in [true, true, true] {
            let got = cache.verdict(b"curl/8.5.0", |_| {
                calls += 1;
                true
            });
            assert_eq!(got, expected);
        }
        assert_eq!(calls, 1);
        // A prefix or an extension of a cached agent is its own entry.
        assert!(!cache.verdict(b"curl/8.5", |_| false));
        assert!(!cache.verdict(b"curl/8.5.0 x", |_| false));
        let others = [&b"curl/8.5"[..], &b"curl/8.5.0 x"[..]];
        if others
            .iter()
            .all(|o| slot_index(o) != slot_index(b"curl/8.5.0"))
        {
            assert!(cache.verdict(b"curl/8.5.0", |_| panic!("matched again")));
        }
    }

    #[test]
    fn every_pattern_compiles_on_its_own() {
        let lines = ISBOT_PATTERNS.lines().filter(|line| !line.is_empty());
        for pattern in lines.chain(EXTRA_PATTERNS.iter().copied()) {
            let built = RegexBuilder::new(pattern).unicode(false).build();
            assert!(built.is_ok(), "{pattern}: {built:?}");
        }
    }

    // The external corpus: the fixtures of the `isbot` crate (tests/fixtures/isbot/, see its
    // README.md), every known bot and crawler user agent and a deterministic sample of its real
    // browser user agents.

    /// The non-empty lines of a fixture file.
    fn lines(name: &str) -> Vec<String> {
        let path = format!("{}/tests/fixtures/isbot/{name}", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        text.lines()
            .filter(|line| !line.is_empty())
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn known_bots_are_caught() {
        let bots = lines("bots.txt");
        assert!(
            bots.len() > 4000,
            "bot corpus has only {} lines",
            bots.len()
        );
        let missed: Vec<&String> = bots.iter().filter(|ua| !is_bot(ua.as_bytes())).collect();
        let recall = 1.0 - missed.len() as f64 / bots.len() as f64;
        println!(
            "bots caught: {} of {} ({:.2}%)",
            bots.len() - missed.len(),
            bots.len(),
            recall * 100.0
        );
        assert!(
            recall >= 0.99,
            "recall {:.2}% < 99%; first missed: {:?}",
            recall * 100.0,
            &missed[..missed.len().min(10)]
        );
    }

    #[test]
    fn real_browsers_are_not_dropped() {
        let browsers = lines("browsers-sample.txt");
        assert!(
            browsers.len() > 20_000,
            "browser corpus has only {} lines",
            browsers.len()
        );
        let dropped: Vec<&String> = browsers.iter().filter(|ua| is_bot(ua.as_bytes())).collect();
        let rate = dropped.len() as f64 / browsers.len() as f64;
        println!(
            "browsers wrongly dropped: {} of {} ({:.4}%)",
            dropped.len(),
            browsers.len(),
            rate * 100.0
        );
        assert!(
            rate <= 0.0001,
            "{:.4}% of browsers dropped (> 0.01%): {:?}",
            rate * 100.0,
            &dropped[..dropped.len().min(10)]
        );
    }
}
