//! Synthetic traffic for the demo and the report benchmark: page views and events of one site
//! over the last days, encoded by the module's own core and written straight to InfluxDB.
//!
//! The traffic is meant to look like a real small site on the dashboard, and is the same for the
//! same `--seed`, `--pageviews` and `--days` (the times are relative to now):
//!
//! - visits of one to a dozen page views, 15 s to 4 min apart, each with one session id (as the
//!   browser agent makes them; 3 % of visits have none), one platform and one timezone;
//! - visits start by the visitor's local time of day (quiet at night, busy from 9 to 22) and by
//!   weekday (weekends about a third quieter), with a slight growth over the period;
//! - a handful of popular pages and a long tail of blog posts and docs pages (Zipf-like), one of
//!   the posts going viral for a day from a news site;
//! - a referrer host on about half of the visits' first page views (search engines, social sites,
//!   news sites and a long tail of blogs), a load time on 95 % of page views (log-normal, slower
//!   on phones), `pages_viewed` counting the visit's page views;
//! - events: `socialclick` with a note (the share button: mastodon, bluesky, ...) on about 2.5 %
//!   of page views, and `download` with the file name as note and its size in MB as value on
//!   docs and download pages.
//!
//! Every point is a beacon as the agent would send it, parsed and encoded by the module's core
//! (`parse_beacon`, `encode_point`, `analytics_session field`); timestamps come from the core's
//! `UniqueClock` in time order, so no two points share one. Bodies of `--batch` lines go to
//! InfluxDB's `/write` over `--connections` keepalive connections (failed writes are retried
//! twice). Only loopback addresses are accepted. Plain std: no HTTP client crate.
//!
//! ```sh
//! cargo run --release --example synthetic -- 127.0.0.1:8086 analytics \
//!     --domain demo.example.com --pageviews 20000 --days 14 --seed 1
//! ```

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::mpsc;
use std::time::{Duration, Instant};

// The nginx-free core, compiled straight from the module's sources (the module's rlib cannot be
// linked without nginx's symbols), as examples/sink_ceiling.rs does.
#[path = "common/conn.rs"]
mod conn;
use conn::Conn;

#[path = "../src/core/mod.rs"]
#[allow(dead_code, unused_imports)]
mod core;

use crate::core::report::format_rfc3339_utc;
use crate::core::UniqueClock;
use crate::core::{encode_point, parse_beacon, unix_now_ns, Measurements, SessionStorage};

const USAGE: &str = "usage: synthetic HOST:PORT DATABASE --domain HOST [--pageviews N] \
                     [--days N] [--seed N] [--batch N] [--connections N]";

const MINUTE_MS: i64 = 60_000;
const HOUR_MS: i64 = 60 * MINUTE_MS;
const DAY_MS: i64 = 24 * HOUR_MS;

struct Options {
    addr: SocketAddr,
    db: String,
    domain: String,
    pageviews: usize,
    days: i64,
    seed: u64,
    batch: usize,
    connections: usize,
}

fn options() -> Result<Options, String> {
    let mut args = std::env::args().skip(1);
    let addr_text = args.next().ok_or(USAGE)?;
    let addr = addr_text
        .to_socket_addrs()
        .map_err(|e| format!("{addr_text}: {e}"))?
        .next()
        .ok_or_else(|| format!("{addr_text}: no address"))?;
    if !addr.ip().is_loopback() {
        return Err(format!(
            "{addr_text}: only loopback addresses are written to"
        ));
    }
    let db = args.next().ok_or(USAGE)?;
    let mut opts = Options {
        addr,
        db,
        domain: String::new(),
        pageviews: 20_000,
        days: 14,
        seed: 1,
        batch: 5000,
        connections: 2,
    };
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(USAGE)?;
        let number = || value.parse::<u64>().ok().filter(|n| *n > 0).ok_or(USAGE);
        match flag.as_str() {
            "--domain" => opts.domain = value.clone(),
            "--pageviews" => opts.pageviews = number()? as usize,
            "--days" => opts.days = number()?.min(3650) as i64,
            "--seed" => opts.seed = value.parse().map_err(|_| USAGE)?,
            "--batch" => opts.batch = number()? as usize,
            "--connections" => opts.connections = number()?.min(16) as usize,
            _ => return Err(USAGE.to_string()),
        }
    }
    if opts.domain.is_empty() {
        return Err(USAGE.to_string());
    }
    Ok(opts)
}

/// A small deterministic generator (xorshift64*), so a seed always gives the same traffic.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        // Never zero (xorshift would stay at zero); spread small seeds.
        Rng((seed ^ 0x9E37_79B9_7F4A_7C15).wrapping_mul(0xBF58_476D_1CE4_E5B9) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }
    /// Standard normal (Box-Muller).
    fn normal(&mut self) -> f64 {
        let u = self.unit().max(1e-12);
        let v = self.unit();
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
}

/// Items with weights, drawn by binary search over the cumulative weights.
struct Weighted<T> {
    items: Vec<T>,
    cumulative: Vec<f64>,
}

impl<T: Copy> Weighted<T> {
    fn new(pairs: impl IntoIterator<Item = (T, f64)>) -> Weighted<T> {
        let mut items = Vec::new();
        let mut cumulative = Vec::new();
        let mut total = 0.0;
        for (item, weight) in pairs {
            total += weight;
            items.push(item);
            cumulative.push(total);
        }
        Weighted { items, cumulative }
    }
    fn pick(&self, rng: &mut Rng) -> T {
        let total = self.cumulative.last().copied().unwrap_or(0.0);
        let x = rng.unit() * total;
        let i = self.cumulative.partition_point(|c| *c <= x);
        self.items[i.min(self.items.len() - 1)]
    }
}

/// What one site looks like: its pages, where visitors come from, what they use.
struct Site {
    pages: Vec<String>,
    /// Page index by popularity (Zipf-like over `pages`).
    page: Weighted<usize>,
    /// Index of the post that goes viral.
    viral_page: usize,
    /// Referrer host (None: direct) of a visit's first page view.
    referrer: Weighted<Option<&'static str>>,
    platform: Weighted<Option<&'static str>>,
    /// `getTimezoneOffset()`: minutes, UTC+1 is -60.
    timezone: Weighted<i32>,
    share_note: Weighted<&'static str>,
}

/// Local hour of day → relative activity.
const DIURNAL: [f64; 24] = [
    0.18, 0.10, 0.06, 0.05, 0.05, 0.09, 0.22, 0.45, 0.75, 0.95, 1.0, 1.0, 0.92, 0.97, 1.0, 0.98,
    0.93, 0.88, 0.85, 0.9, 0.95, 0.85, 0.6, 0.33,
];

/// Day of week (0 = Monday) → relative activity.
const WEEKLY: [f64; 7] = [1.0, 1.04, 1.02, 0.98, 0.9, 0.6, 0.66];

/// Downloads on the site: file name (the note) and size in MB (the value).
const DOWNLOADS: [(&str, f64); 4] = [
    ("ngx-analytics_0.1.0_amd64.deb", 1.4),
    ("ngx-analytics-0.1.0.tar.gz", 0.6),
    ("privacy-whitepaper.pdf", 3.2),
    ("grafana-dashboard.json", 0.05),
];

impl Site {
    fn new(rng: &mut Rng) -> Site {
        let mut pages: Vec<String> = [
            "/",
            "/blog/",
            "/pricing",
            "/docs/",
            "/docs/getting-started",
            "/download",
            "/about",
            "/docs/configuration",
            "/blog/privacy-friendly-analytics",
            "/contact",
            "/docs/dashboard",
            "/changelog",
        ]
        .iter()
        .map(|p| p.to_string())
        .collect();
        let words = [
            "nginx",
            "rust",
            "influxdb",
            "privacy",
            "cookies",
            "metrics",
            "dashboards",
            "sessions",
            "beacons",
            "latency",
            "gdpr",
            "caching",
            "http2",
            "logging",
            "grafana",
            "retention",
        ];
        for n in 0..400u64 {
            let a = rng.below(16) as usize;
            let b = (a + 1 + rng.below(15) as usize) % 16; // another word
            pages.push(format!(
                "/blog/{}/{}-and-{}-{n}",
                2023 + n % 3,
                words[a],
                words[b]
            ));
        }
        for section in ["install", "reference", "guides", "faq"] {
            for n in 0..40 {
                pages.push(format!("/docs/{section}/{}-{n}", words[n % 16]));
            }
        }
        // Zipf-like: rank r has weight 1/r^1.05; the list order is the popularity order, apart
        // from a shuffle of the tail so that posts and docs interleave.
        let tail_start = 12;
        for i in (tail_start + 1..pages.len()).rev() {
            let j = tail_start + rng.below((i - tail_start + 1) as u64) as usize;
            pages.swap(i, j);
        }
        let page = Weighted::new((0..pages.len()).map(|i| (i, 1.0 / ((i + 1) as f64).powf(1.05))));
        // The viral post: a blog post from the tail (not among the 40 most popular pages).
        let viral_page = (40..pages.len())
            .cycle()
            .skip(rng.below(pages.len() as u64) as usize)
            .find(|&i| pages[i].starts_with("/blog/"))
            .unwrap_or(tail_start);
        let mut referrers: Vec<(Option<&'static str>, f64)> = vec![
            (None, 50.0),
            (Some("www.google.com"), 22.0),
            (Some("duckduckgo.com"), 6.0),
            (Some("www.bing.com"), 3.0),
            (Some("news.ycombinator.com"), 4.0),
            (Some("www.reddit.com"), 3.5),
            (Some("mastodon.social"), 3.0),
            (Some("github.com"), 2.5),
            (Some("lobste.rs"), 1.2),
            (Some("t.co"), 1.0),
            (Some("www.linkedin.com"), 0.8),
            (Some("search.brave.com"), 0.8),
            (Some("www.ecosia.org"), 0.5),
        ];
        // A long tail of blogs linking to the site.
        const BLOGS: [&str; 24] = [
            "blog.example.org",
            "notes.example.net",
            "devlog.example.io",
            "weekly.example.com",
            "planet.example.org",
            "til.example.dev",
            "ops.example.net",
            "journal.example.org",
            "rustacean.example.com",
            "sre.example.io",
            "homelab.example.net",
            "selfhosted.example.org",
            "fediverse.example.social",
            "tech.example.co.uk",
            "digest.example.com",
            "web.example.de",
            "privacy.example.fr",
            "news.example.nl",
            "linkblog.example.se",
            "forum.example.org",
            "wiki.example.org",
            "newsletter.example.com",
            "bookmarks.example.net",
            "static.example.site",
        ];
        for (i, blog) in BLOGS.iter().enumerate() {
            referrers.push((Some(*blog), 0.6 / (i + 1) as f64));
        }
        Site {
            pages,
            page,
            viral_page,
            referrer: Weighted::new(referrers),
            platform: Weighted::new([
                (Some("Win32"), 33.0),
                (Some("MacIntel"), 22.0),
                (Some("iPhone"), 16.0),
                (Some("Linux armv8l"), 11.0),
                (Some("Linux x86_64"), 10.0),
                (Some("iPad"), 2.5),
                (Some("Linux aarch64"), 2.0),
                (Some("FreeBSD amd64"), 0.5),
                (None, 3.0),
            ]),
            timezone: Weighted::new([
                (-60, 20.0),
                (-120, 9.0),
                (0, 7.0),
                (300, 11.0),
                (240, 8.0),
                (360, 5.0),
                (420, 2.0),
                (480, 6.0),
                (180, 3.0),
                (-330, 6.0),
                (-480, 4.0),
                (-540, 3.0),
                (-420, 1.5),
                (-180, 2.0),
                (-600, 2.0),
                (-780, 0.5),
            ]),
            share_note: Weighted::new([
                ("mastodon", 34.0),
                ("bluesky", 24.0),
                ("email", 15.0),
                ("linkedin", 10.0),
                ("reddit", 8.0),
                ("hackernews", 6.0),
                ("copy-link", 3.0),
            ]),
        }
    }

    fn is_mobile(platform: Option<&str>) -> bool {
        matches!(platform, Some("iPhone" | "Linux armv8l" | "iPad"))
    }
}

/// What happens on a page view besides the view itself.
#[derive(Clone, Copy)]
enum Action {
    Share(&'static str),
    Download(usize),
}

/// One generated beacon, compact (a million of them are held and sorted).
struct Hit {
    time_ns: u64,
    page: u32,
    visit: u32,
    /// Page view number in the visit, from 1; 0 for an event.
    nth: u16,
    referrer: Option<&'static str>,
    load_time: Option<u32>,
    action: Option<Action>,
}

/// One visitor session: shared by its page views and events.
struct Visit {
    sess: Option<String>,
    platform: Option<&'static str>,
    timezone: i32,
}

/// A visit's start: a local day and time drawn from the weekly and daily rhythm, within
/// `[from, to)`. `None` when the draw fell outside (the caller draws again).
fn visit_start(rng: &mut Rng, from: i64, to: i64, timezone: i32) -> Option<i64> {
    let days = (to - from) / DAY_MS + 2;
    let first_day = from.div_euclid(DAY_MS) - 1;
    let day = first_day + rng.below(days as u64) as i64;
    // 1970-01-01 was a Thursday (3 with Monday = 0).
    let weekday = (day + 3).rem_euclid(7) as usize;
    // Growth: the last day has about 20 % more visits than the first.
    let growth = 1.0 + 0.2 * ((day * DAY_MS - from) as f64 / (to - from) as f64).clamp(0.0, 1.0);
    let max_weight = 1.04 * 1.2;
    if rng.unit() * max_weight > WEEKLY[weekday] * growth {
        return None;
    }
    let hour = loop {
        let h = rng.below(24) as usize;
        if rng.unit() < DIURNAL[h] {
            break h as i64;
        }
    };
    let local = day * DAY_MS + hour * HOUR_MS + rng.below(HOUR_MS as u64) as i64;
    // getTimezoneOffset() is UTC minus local time, in minutes.
    let utc = local + i64::from(timezone) * MINUTE_MS;
    (from..to).contains(&utc).then_some(utc)
}

/// All beacons: `pageviews` page views and their events over `[from, to)`, sorted by time.
fn generate(opts: &Options, from: i64, to: i64) -> (Site, Vec<Visit>, Vec<Hit>) {
    let mut rng = Rng::new(opts.seed);
    let site = Site::new(&mut rng);
    let mut visits: Vec<Visit> = Vec::new();
    let mut hits: Vec<Hit> = Vec::with_capacity(opts.pageviews + opts.pageviews / 16);
    // The viral day: 60 % into the period, from a news site, decaying over about 8 hours.
    let viral_start = from + (to - from) * 3 / 5 + rng.below(12) as i64 * HOUR_MS;
    let mut views = 0;
    while views < opts.pageviews {
        let viral = rng.chance(0.06) && viral_start < to;
        let timezone = site.timezone.pick(&mut rng);
        let start = if viral {
            let decay = -(rng.unit().max(1e-9)).ln() * 4.0 * HOUR_MS as f64;
            let t = viral_start + decay as i64;
            if t >= to {
                continue;
            }
            t
        } else {
            match visit_start(&mut rng, from, to, timezone) {
                Some(t) => t,
                None => continue,
            }
        };
        let platform = site.platform.pick(&mut rng);
        let sess = rng
            .chance(0.97)
            .then(|| format!("{}-{}", rng.next() as u32, rng.next() as u32));
        let visit = visits.len() as u32;
        visits.push(Visit {
            sess,
            platform,
            timezone,
        });
        // Page views in this visit: 1 (45 %), 2 (20 %), 3 (13 %), 4 (8 %), up to 12.
        let length = match rng.unit() {
            x if x < 0.45 => 1,
            x if x < 0.65 => 2,
            x if x < 0.78 => 3,
            x if x < 0.86 => 4,
            _ => 5 + rng.below(8) as u16,
        };
        let mut t = start;
        let mut previous = usize::MAX;
        for nth in 1..=length {
            if views >= opts.pageviews || t >= to {
                break;
            }
            let page = if nth == 1 && viral {
                site.viral_page
            } else {
                let mut p = site.page.pick(&mut rng);
                if p == previous {
                    p = site.page.pick(&mut rng);
                }
                p
            };
            previous = page;
            let referrer = match (nth, viral) {
                (1, true) => Some("news.ycombinator.com"),
                (1, false) => site.referrer.pick(&mut rng),
                _ => None,
            };
            let load_time = rng.chance(0.95).then(|| {
                let median = if Site::is_mobile(platform) {
                    1300.0
                } else {
                    850.0
                };
                (median * (0.55 * rng.normal()).exp()).clamp(40.0, 60_000.0) as u32
            });
            let path = &site.pages[page];
            let action = if rng.chance(0.025) {
                Some(Action::Share(site.share_note.pick(&mut rng)))
            } else if (path.starts_with("/docs/") || path == "/download") && rng.chance(0.03) {
                Some(Action::Download(rng.below(DOWNLOADS.len() as u64) as usize))
            } else {
                None
            };
            let ns = rng.below(1_000_000);
            hits.push(Hit {
                time_ns: (t as u64) * 1_000_000 + ns,
                page: page as u32,
                visit,
                nth,
                referrer,
                load_time,
                action: None,
            });
            views += 1;
            if let Some(action) = action {
                let after = t + 2_000 + rng.below(60_000) as i64;
                if after < to {
                    hits.push(Hit {
                        time_ns: (after as u64) * 1_000_000 + ns,
                        page: page as u32,
                        visit,
                        nth: 0,
                        referrer: None,
                        load_time: None,
                        action: Some(action),
                    });
                }
            }
            // The next page: 15 s to 4 min later (log-uniform).
            t += (15_000.0 * (16f64).powf(rng.unit())) as i64;
        }
    }
    hits.sort_by_key(|h| h.time_ns);
    (site, visits, hits)
}

/// The beacon the browser agent would send for `hit`, as JSON.
fn beacon_json(domain: &str, site: &Site, visit: &Visit, hit: &Hit) -> String {
    let mut beacon = serde_json::json!({
        "domain": domain,
        "page": site.pages[hit.page as usize],
        "timezone": visit.timezone,
    });
    if let Some(platform) = visit.platform {
        beacon["platform"] = platform.into();
    }
    if let Some(sess) = &visit.sess {
        beacon["sess_id"] = sess.as_str().into();
    }
    match hit.action {
        None => {
            if let Some(referrer) = hit.referrer {
                beacon["referrer"] = format!("https://{referrer}/").into();
            }
            if let Some(load_time) = hit.load_time {
                beacon["load_time"] = load_time.into();
            }
            if visit.sess.is_some() {
                beacon["pages_viewed"] = hit.nth.into();
            }
        }
        Some(Action::Share(note)) => {
            beacon["event"] = "socialclick".into();
            beacon["note"] = note.into();
        }
        Some(Action::Download(i)) => {
            beacon["event"] = "download".into();
            beacon["note"] = DOWNLOADS[i].0.into();
            beacon["value"] = DOWNLOADS[i].1.into();
        }
    }
    beacon.to_string()
}

/// Writes one body, retrying twice (on a new connection) after a failure: the points have
/// fixed timestamps, so a body written twice is still stored once.
fn write_body(
    conn: &mut Option<Conn>,
    addr: SocketAddr,
    path: &str,
    body: &[u8],
) -> Result<(), String> {
    let host = addr.to_string();
    let mut last = String::new();
    for attempt in 0..3 {
        if attempt > 0 {
            std::thread::sleep(Duration::from_millis(500 * attempt));
        }
        let result = match conn {
            Some(c) => c.post(&host, path, body),
            None => Conn::open(addr, Duration::from_secs(120))
                .and_then(|c| conn.insert(c).post(&host, path, body)),
        };
        match result {
            Ok((200..=299, _)) => return Ok(()),
            Ok((status, answer)) => {
                last = format!("InfluxDB answered {status}: {}", answer.trim());
                if (400..500).contains(&status) {
                    break; // refused: retrying changes nothing
                }
            }
            Err(e) => {
                last = format!("write to {host} failed: {e}");
                *conn = None;
            }
        }
    }
    Err(last)
}

fn main() {
    let opts = match options() {
        Ok(opts) => opts,
        Err(usage) => {
            eprintln!("{usage}");
            std::process::exit(2);
        }
    };
    let now_ms = (unix_now_ns() / 1_000_000) as i64;
    let (from, to) = (now_ms - opts.days * DAY_MS, now_ms);
    let began = Instant::now();
    let (site, visits, hits) = generate(&opts, from, to);
    let generated = began.elapsed();

    // Writers: each takes bodies from the channel and writes them on its own connection.
    let path = format!(
        "/write?db={}&precision=ns",
        form_urlencoded::byte_serialize(opts.db.as_bytes()).collect::<String>()
    );
    let (send, receive) = mpsc::sync_channel::<Vec<u8>>(opts.connections * 2);
    let receive = std::sync::Arc::new(std::sync::Mutex::new(receive));
    let writers: Vec<_> = (0..opts.connections)
        .map(|_| {
            let (receive, path, addr) = (receive.clone(), path.clone(), opts.addr);
            std::thread::spawn(move || -> Result<(), String> {
                let mut conn = None;
                loop {
                    let body = match receive.lock() {
                        Ok(r) => r.recv(),
                        Err(_) => return Err("writer lock poisoned".to_string()),
                    };
                    let Ok(body) = body else { return Ok(()) };
                    write_body(&mut conn, addr, &path, &body)?;
                }
            })
        })
        .collect();

    let clock = UniqueClock::new();
    let measurements = Measurements::default();
    let mut body = Vec::with_capacity(opts.batch * 300);
    let (mut pageviews, mut events, mut lines_in_body) = (0usize, 0usize, 0usize);
    let mut failure = None;
    for hit in &hits {
        let json = beacon_json(&opts.domain, &site, &visits[hit.visit as usize], hit);
        let beacon = match parse_beacon(json.as_bytes()) {
            Ok(beacon) => beacon,
            Err(e) => {
                failure = Some(format!("the core refused a generated beacon ({e}): {json}"));
                break;
            }
        };
        // Slot 0, as one nginx worker; the clock keeps every timestamp unique.
        let stamp = clock.stamp(hit.time_ns, 0);
        encode_point(
            &beacon,
            &measurements,
            SessionStorage::Field,
            stamp,
            &mut body,
        );
        if hit.action.is_some() {
            events += 1;
        } else {
            pageviews += 1;
        }
        lines_in_body += 1;
        if lines_in_body == opts.batch {
            let full = std::mem::replace(&mut body, Vec::with_capacity(opts.batch * 300));
            lines_in_body = 0;
            if send.send(full).is_err() {
                break; // a writer failed; its error is reported below
            }
        }
    }
    if failure.is_none() && !body.is_empty() {
        let _ = send.send(body);
    }
    drop(send);
    for writer in writers {
        match writer.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failure = failure.or(Some(e)),
            Err(_) => failure = failure.or(Some("a writer panicked".to_string())),
        }
    }
    if let Some(e) = failure {
        eprintln!("synthetic: {e}");
        std::process::exit(1);
    }
    let sessions = visits.iter().filter(|v| v.sess.is_some()).count();
    println!(
        "synthetic: wrote {pageviews} page views and {events} events ({} visits, {sessions} with \
         a session id) for {} from {} to {} into database {} ({:.1} s generating, {:.1} s \
         encoding and writing)",
        visits.len(),
        opts.domain,
        format_rfc3339_utc(from),
        format_rfc3339_utc(to),
        opts.db,
        generated.as_secs_f64(),
        began.elapsed().as_secs_f64() - generated.as_secs_f64(),
    );
}
