//! The InfluxQL rollups in `nginx-conf/influxdb/` on a real InfluxDB 1.6.
//!
//! Every statement of every `.influxql` file is accepted: each file is installed with the
//! `influx` CLI exactly as the README says (twice: installing again is accepted), then each
//! statement is sent on its own. Each continuous query's `SELECT ... INTO` is then run once over
//! a generated data set (fixed seed, lines encoded by the module's own core, `sess` as a field
//! or as a tag), with a time range that covers the data (the README's backfill), and every
//! rolled-up row is compared with what the test computes from the data itself, and with the
//! same sums read from the raw points. The documented limits are checked too: visits summed
//! over buckets overcount, and GROUP BY a field does not group. The daily rollups by one tag
//! that the report API reads (and the daily median) are compared row by row as well.
//!
//! The module's rlib cannot be linked without nginx's symbols, so the nginx-free core is
//! compiled straight from its sources, as the fuzz target does. This target is built without
//! libtest (`harness = false` in Cargo.toml) so that cfg(test) is off and the core's own unit
//! tests, which the library's test binary runs, are not compiled in again; `main` runs the
//! tests below and prints the usual summary line.

mod common;

#[path = "../src/core/mod.rs"]
#[allow(dead_code, unused_imports)]
mod core;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

#[path = "common/cq_files.rs"]
mod cq_files;

use crate::core::line_protocol::SessionStorage;
use crate::core::{encode_point, parse_beacon, Beacon, Measurements};
use common::influx::quote_ident;
use common::{post_with_headers, urlencode, Influx};
use cq_files::{backfill, continuous_queries, statements, ContinuousQuery};

const SEC_NS: u64 = 1_000_000_000;
const BUCKET_NS: u64 = 15 * 60 * SEC_NS;
const DAY_NS: u64 = 86_400 * SEC_NS;
/// Days of generated traffic (whole UTC days, ending at the start of today).
const DAYS: u64 = 3;
const VISITS: usize = 400;
const SEED: u64 = 0x5eed_0009;

/// The database the files name; the test renames it for a second database, as the README
/// tells admins whose database has another name.
const FILE_DB: &str = "analytics";

/// The `influx` command-line client (Debian's `influxdb-client`).
const INFLUX_CLI: &str = "/usr/bin/influx";

/// Where the InfluxDB files live.
fn influxdb_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("nginx-conf/influxdb")
}

fn read_file(name: &str) -> String {
    let path = influxdb_dir().join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// `text` with every `"analytics"` (the database) replaced by `"<db>"`.
fn for_database(text: &str, db: &str) -> String {
    text.replace(&quote_ident(FILE_DB), &quote_ident(db))
}

// ---------------------------------------------------------------------------------------------
// Talking to InfluxDB.

/// `POST /query` (needed for `SELECT ... INTO` and `CREATE`); panics on any error.
fn post_query(influx: &Influx, db: &str, q: &str) -> Value {
    let body = format!("q={}", urlencode(q));
    let path = format!("/query?db={}&epoch=ns", urlencode(db));
    let resp = post_with_headers(
        influx.port(),
        &path,
        "127.0.0.1",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        body.as_bytes(),
    );
    assert_eq!(resp.status, 200, "{q}\nfailed: {}", resp.body_text());
    let json: Value = serde_json::from_slice(&resp.body)
        .unwrap_or_else(|e| panic!("{q}: bad JSON {:?}: {e}", resp.body_text()));
    assert!(json.get("error").is_none(), "{q}\nfailed: {json}");
    for result in json["results"].as_array().expect("results") {
        assert!(result.get("error").is_none(), "{q}\nfailed: {result}");
    }
    json
}

/// Pipes `text` into `influx -host 127.0.0.1 -port <port>`, as the README installs a file;
/// panics unless the CLI exits 0 without an error message.
fn install_with_cli(influx: &Influx, text: &str, what: &str) {
    let mut child = Command::new(INFLUX_CLI)
        .args(["-host", "127.0.0.1", "-port", &influx.port().to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run {INFLUX_CLI} (Debian package influxdb-client): {e}")
        });
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("writing to influx");
    let out = child.wait_with_output().expect("influx output");
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && !printed.contains("ERR"),
        "influx < {what} failed ({}): {printed}",
        out.status
    );
}

/// Installs `files` into `db` (renamed from "analytics") the way the README says, twice, then
/// sends every statement on its own; checks that the retention policy and exactly the files'
/// CQs exist. Returns the CQs.
fn install(influx: &Influx, db: &str, files: &[&str]) -> Vec<ContinuousQuery> {
    let mut cqs = Vec::new();
    for file in files {
        let text = for_database(&read_file(file), db);
        install_with_cli(influx, &text, file);
        install_with_cli(influx, &text, file);
        let stmts = statements(&text);
        assert!(!stmts.is_empty(), "{file} has no statement");
        for stmt in &stmts {
            assert!(
                stmt.starts_with("CREATE RETENTION POLICY ")
                    || stmt.starts_with("CREATE CONTINUOUS QUERY "),
                "{file}: unexpected statement {stmt}"
            );
            post_query(influx, db, stmt);
        }
        cqs.extend(continuous_queries(&stmts));
    }

    let policies = influx.rows(
        db,
        &format!("SHOW RETENTION POLICIES ON {}", quote_ident(db)),
    );
    let rollups = policies
        .iter()
        .find(|p| p["name"] == "rollups")
        .unwrap_or_else(|| panic!("no retention policy \"rollups\" in {policies:?}"));
    assert_eq!(rollups["duration"], "17520h0m0s", "730 days: {rollups:?}");
    assert_eq!(rollups["default"], false, "{rollups:?}");

    let json = influx.query(db, "SHOW CONTINUOUS QUERIES");
    let installed: BTreeSet<String> = json["results"][0]["series"]
        .as_array()
        .expect("series")
        .iter()
        .filter(|s| s["name"] == db)
        .flat_map(|s| s["values"].as_array().cloned().unwrap_or_default())
        .map(|v| v[0].as_str().expect("CQ name").to_string())
        .collect();
    let wanted: BTreeSet<String> = cqs.iter().map(|cq| cq.name.clone()).collect();
    assert_eq!(installed, wanted, "continuous queries in {db}");
    cqs
}

/// Runs every CQ's `SELECT ... INTO` once over `[from, to)`; each must write points.
fn run_backfill(influx: &Influx, db: &str, cqs: &[ContinuousQuery], from: u64, to: u64) {
    for cq in cqs {
        let q = backfill(&cq.select, from, to);
        let json = post_query(influx, db, &q);
        let written = json["results"][0]["series"][0]["values"][0][1]
            .as_i64()
            .unwrap_or_else(|| panic!("{}: no `written` count in {json}", cq.name));
        assert!(written > 0, "{}: {q} wrote nothing", cq.name);
    }
}

fn text(row: &Map<String, Value>, key: &str) -> Option<String> {
    match row.get(key) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(other) => panic!("{key} is not a string: {other} in {row:?}"),
    }
}

/// An integer field; absent or null is 0 (an aggregate over nothing writes no field).
fn int(row: &Map<String, Value>, key: &str) -> i64 {
    match row.get(key) {
        None | Some(Value::Null) => 0,
        Some(v) => v
            .as_i64()
            .unwrap_or_else(|| panic!("{key} is not an integer: {v} in {row:?}")),
    }
}

/// A float field; absent or null is 0.
fn float(row: &Map<String, Value>, key: &str) -> f64 {
    match row.get(key) {
        None | Some(Value::Null) => 0.0,
        Some(v) => v
            .as_f64()
            .unwrap_or_else(|| panic!("{key} is not a number: {v} in {row:?}")),
    }
}

fn time(row: &Map<String, Value>) -> u64 {
    row["time"].as_u64().expect("time in ns")
}

/// Every row of a rollup measurement in the "rollups" retention policy.
fn rollup(influx: &Influx, db: &str, measurement: &str) -> Vec<Map<String, Value>> {
    let rows = influx.rows(
        db,
        &format!("SELECT * FROM \"rollups\".{}", quote_ident(measurement)),
    );
    assert!(!rows.is_empty(), "rollups.{measurement} is empty");
    rows
}

/// Panics with the first differences (and their number) unless `got == want`.
fn assert_same<K: Ord + Debug, V: PartialEq + Debug>(
    what: &str,
    got: &BTreeMap<K, V>,
    want: &BTreeMap<K, V>,
) {
    let keys: BTreeSet<&K> = got.keys().chain(want.keys()).collect();
    let diffs: Vec<String> = keys
        .into_iter()
        .filter(|k| got.get(k) != want.get(k))
        .map(|k| format!("{k:?}: got {:?}, want {:?}", got.get(k), want.get(k)))
        .collect();
    assert!(
        diffs.is_empty(),
        "{what}: {} of {} rows differ, e.g.\n{}",
        diffs.len(),
        want.len(),
        diffs[..diffs.len().min(8)].join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// The generated data set.

/// splitmix64: a small deterministic generator, so the data set is the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// One generated beacon: its JSON body without `sess_id`, the beacon the module's core made of
/// it, the visit's session id and the point's timestamp.
struct Generated {
    body: Value,
    /// The body as sent (the beacon borrows its strings from it).
    json: String,
    sess: Option<String>,
    ts: u64,
}

impl Generated {
    /// The beacon the module's core makes of the body.
    fn beacon(&self) -> Beacon<'_> {
        parse_beacon(self.json.as_bytes()).expect("a generated beacon parses")
    }
}

/// Whole UTC days: `[start, start + DAYS days)`, ending at the start of today.
fn data_range() -> (u64, u64) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos() as u64;
    let end = now - now % DAY_NS;
    (end - DAYS * DAY_NS, end)
}

/// Visits of several page views (1 to 6, 20 s to 25 min apart, so many span buckets), some
/// followed by events; a tenth of the visits carry no session id (`data-no-session`).
fn generate(start: u64) -> Vec<Generated> {
    const DOMAINS: [&str; 3] = ["www.example.com", "blog.example.org", "shop.example.net"];
    const PAGES: [&str; 6] = [
        "/",
        "/posts/hello.html?utm_source=feed",
        "/posts/share-buttons.html#top",
        "/about",
        "/a b,c=d",
        "/café",
    ];
    const PLATFORMS: [Option<&str>; 4] =
        [None, Some("Linux x86_64"), Some("MacIntel"), Some("Win32")];
    const TIMEZONES: [Option<i32>; 4] = [None, Some(-60), Some(0), Some(330)];
    const REFERRERS: [Option<&str>; 4] = [
        None,
        Some("https://news.example.org/item?id=123"),
        Some("https://search.example.com/?q=analytics"),
        Some("https://social.example/@someone/1"),
    ];
    const SOCIAL_NOTES: [&str; 6] = [
        "mastodon",
        "bluesky",
        "email",
        "",
        "linkedin",
        "say \"hi\" \\",
    ];
    const SEARCH_NOTES: [&str; 3] = ["", "nginx analytics", "influxdb"];

    let mut rng = Rng(SEED);
    let mut out = Vec::new();
    let mut seq = 0u64;
    let mut stamp = |offset_ns: u64| {
        // Distinct for every point, as the module's timestamps are.
        seq += 1;
        start + offset_ns - offset_ns % SEC_NS + seq
    };
    let span = DAYS * DAY_NS - 4 * 3600 * SEC_NS;
    for visit in 0..VISITS {
        let domain = *rng.pick(&DOMAINS);
        let platform = *rng.pick(&PLATFORMS);
        let timezone = *rng.pick(&TIMEZONES);
        let sess = (!rng.chance(10)).then(|| format!("{:08x}-{visit}", rng.next() as u32));
        let mut at = rng.below(span);
        let pages = 1 + rng.below(6);
        for n in 0..pages {
            if n > 0 {
                at += (20 + rng.below(25 * 60 - 20)) * SEC_NS;
            }
            let mut body =
                json!({"domain": domain, "page": *rng.pick(&PAGES), "pages_viewed": n + 1});
            if let Some(p) = platform {
                body["platform"] = json!(p);
            }
            if let Some(tz) = timezone {
                body["timezone"] = json!(tz);
            }
            if n == 0 {
                if let Some(r) = *rng.pick(&REFERRERS) {
                    body["referrer"] = json!(r);
                }
            }
            if rng.chance(70) {
                // Whole or half milliseconds: every sum is exact in f64, in any order.
                body["load_time"] = json!((50 + rng.below(6000)) as f64 / 2.0);
            }
            out.push((body, sess.clone(), stamp(at)));

            if rng.chance(30) {
                let event_at = at + (1 + rng.below(90)) * SEC_NS;
                let (event, note) = match rng.below(3) {
                    0 | 1 => ("socialclick", *rng.pick(&SOCIAL_NOTES)),
                    _ => ("searchtermintercepted", *rng.pick(&SEARCH_NOTES)),
                };
                let mut body = json!({"domain": domain, "page": *rng.pick(&PAGES), "event": event});
                if !note.is_empty() || rng.chance(50) {
                    body["note"] = json!(note);
                }
                if rng.chance(60) {
                    // Quarters, negative ones too: exact sums again.
                    body["value"] = json!((rng.below(2000) as f64 - 400.0) / 4.0);
                }
                if let Some(p) = platform {
                    body["platform"] = json!(p);
                }
                if let Some(tz) = timezone {
                    body["timezone"] = json!(tz);
                }
                out.push((body, sess.clone(), stamp(event_at)));
            }
        }
    }
    out.into_iter()
        .map(|(body, sess, ts)| {
            assert!(ts < start + DAYS * DAY_NS, "generated point past the range");
            let json = body.to_string();
            if let Err(e) = parse_beacon(json.as_bytes()) {
                panic!("generated beacon {body} refused: {e:?}");
            }
            Generated {
                body,
                json,
                sess,
                ts,
            }
        })
        .collect()
}

/// Where a point's session id goes (`analytics_session field` or `tag`).
#[derive(Clone, Copy, Debug, PartialEq)]
enum SessAs {
    Field,
    Tag,
}

/// The point the module writes for `g`, encoded by the module's own core with `sess_id` as a
/// string field (`analytics_session field`, the default) or as a tag (`analytics_session tag`).
fn line(g: &Generated, sess_as: SessAs) -> Vec<u8> {
    let mut body = g.body.clone();
    if let Some(sess) = &g.sess {
        body["sess_id"] = json!(sess);
    }
    let json = body.to_string();
    let beacon = parse_beacon(json.as_bytes()).expect("beacon with sess_id");
    let session = match sess_as {
        SessAs::Field => SessionStorage::Field,
        SessAs::Tag => SessionStorage::Tag,
    };
    let mut out = Vec::new();
    encode_point(&beacon, &Measurements::default(), session, g.ts, &mut out);
    out
}

fn write_data(influx: &Influx, db: &str, data: &[Generated], sess_as: SessAs) {
    for chunk in data.chunks(500) {
        let body: Vec<u8> = chunk.iter().flat_map(|g| line(g, sess_as)).collect();
        let body = String::from_utf8(body).expect("UTF-8 lines");
        let resp = influx.write_lines(db, &body);
        assert_eq!(resp.status, 204, "write: {}", resp.body_text());
    }
}

// ---------------------------------------------------------------------------------------------
// What the rollups must hold, computed from the generated data.

/// Count, distinct sessions, and sum and count of an optional number (load time or value).
#[derive(Default, Debug)]
struct Agg {
    count: i64,
    sessions: BTreeSet<String>,
    sum: f64,
    n: i64,
}

impl Agg {
    fn add(&mut self, sess: &Option<String>, number: Option<f64>) {
        self.count += 1;
        if let Some(s) = sess {
            self.sessions.insert(s.clone());
        }
        if let Some(x) = number {
            self.sum += x;
            self.n += 1;
        }
    }

    /// (count, visits, sum, n): the fields of a rollup row.
    fn row(&self) -> (i64, i64, f64, i64) {
        (self.count, self.sessions.len() as i64, self.sum, self.n)
    }
}

/// Page-view rollup key: bucket, domain, page, referrer, platform, timezone.
type PageKey = (
    u64,
    String,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
);

#[derive(Default)]
struct Expected {
    pages_15m: BTreeMap<PageKey, Agg>,
    domain_15m: BTreeMap<(u64, String), Agg>,
    domain_1d: BTreeMap<(u64, String), Agg>,
    /// Load times per UTC day and domain (for the daily median).
    loads_1d: BTreeMap<(u64, String), Vec<f64>>,
    /// (tag, day, domain, tag value) -> page views: the daily rollups by one tag.
    tags_1d: BTreeMap<(&'static str, u64, String, Option<String>), Agg>,
    events_15m: BTreeMap<(u64, String, String), Agg>,
    events_1d: BTreeMap<(u64, String, String), Agg>,
    /// (time, domain, event) -> note, for every event with a note: the notes' copy.
    event_notes: BTreeMap<(u64, String, String), String>,
    /// (bucket, domain, event, note) -> events, for every note.
    notes_15m: BTreeMap<(u64, String, String, String), i64>,
    /// Distinct sessions per domain over the whole range.
    visits: BTreeMap<String, BTreeSet<String>>,
}

fn expected(data: &[Generated]) -> Expected {
    let mut e = Expected::default();
    for g in data {
        let bucket = g.ts - g.ts % BUCKET_NS;
        let beacon = g.beacon();
        let common = beacon.common();
        let domain = common.domain.to_string();
        match &beacon {
            Beacon::PageView(view) => {
                let key = (
                    bucket,
                    domain.clone(),
                    common.page.to_string(),
                    view.referrer_host.clone(),
                    common.platform.as_deref().map(str::to_string),
                    common.timezone.map(|tz| tz.to_string()),
                );
                e.pages_15m
                    .entry(key)
                    .or_default()
                    .add(&g.sess, view.load_time);
                e.domain_15m
                    .entry((bucket, domain.clone()))
                    .or_default()
                    .add(&g.sess, None);
                let day = g.ts - g.ts % DAY_NS;
                e.domain_1d
                    .entry((day, domain.clone()))
                    .or_default()
                    .add(&g.sess, None);
                e.loads_1d
                    .entry((day, domain.clone()))
                    .or_default()
                    .extend(view.load_time);
                for (tag, value) in [
                    ("page", Some(common.page.to_string())),
                    ("referrer", view.referrer_host.clone()),
                    ("platform", common.platform.as_deref().map(str::to_string)),
                    ("timezone", common.timezone.map(|tz| tz.to_string())),
                ] {
                    e.tags_1d
                        .entry((tag, day, domain.clone(), value))
                        .or_default()
                        .add(&g.sess, None);
                }
                let visits = e.visits.entry(domain).or_default();
                visits.extend(g.sess.clone());
            }
            Beacon::Event(event) => {
                if !event.note.is_empty() {
                    let key = (g.ts, domain.clone(), event.name.to_string());
                    e.event_notes.insert(key, event.note.to_string());
                }
                e.events_1d
                    .entry((g.ts - g.ts % DAY_NS, domain.clone(), event.name.to_string()))
                    .or_default()
                    .add(&g.sess, event.value);
                e.events_15m
                    .entry((bucket, domain.clone(), event.name.to_string()))
                    .or_default()
                    .add(&g.sess, event.value);
                *e.notes_15m
                    .entry((
                        bucket,
                        domain,
                        event.name.to_string(),
                        event.note.to_string(),
                    ))
                    .or_default() += 1;
            }
        }
    }
    e
}

/// The notes event-notes.influxql rolls up, read from its CQs (each must filter on one note
/// and write it to the field "note:<note>").
fn listed_notes(cqs: &[ContinuousQuery]) -> Vec<String> {
    cqs.iter()
        .map(|cq| {
            let at = cq
                .select
                .find("WHERE \"note\" = '")
                .expect("WHERE \"note\" = '...'");
            let rest = &cq.select[at + "WHERE \"note\" = '".len()..];
            let note = &rest[..rest.find('\'').expect("end of the note literal")];
            assert!(
                cq.select.contains(&format!("AS \"note:{note}\"")),
                "{}: field name does not match its note {note:?}",
                cq.name
            );
            note.to_string()
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Comparisons.

/// The median as InfluxDB's `median()` computes it (the mean of the two middle values of an
/// even number); `None` for no values.
fn median(values: &[f64]) -> Option<f64> {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        n if n % 2 == 1 => Some(v[n / 2]),
        n => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// Compares every rollup of rollups.influxql (or its sess-tag variant) in `db` with `e`.
fn check_rollups(influx: &Influx, db: &str, e: &Expected) {
    let got: BTreeMap<PageKey, _> = rollup(influx, db, "pf_analytics_15m")
        .iter()
        .map(|r| {
            let key = (
                time(r),
                text(r, "domain").expect("domain"),
                text(r, "page").expect("page"),
                text(r, "referrer"),
                text(r, "platform"),
                text(r, "timezone"),
            );
            let row = (
                int(r, "pageviews"),
                int(r, "visits"),
                float(r, "load_time_sum"),
                int(r, "load_time_count"),
            );
            (key, row)
        })
        .collect();
    let want = e
        .pages_15m
        .iter()
        .map(|(k, a)| (k.clone(), a.row()))
        .collect();
    assert_same(&format!("{db}: pf_analytics_15m"), &got, &want);

    for (measurement, want) in [
        ("pf_analytics_domain_15m", &e.domain_15m),
        ("pf_analytics_domain_1d", &e.domain_1d),
    ] {
        let got: BTreeMap<(u64, String), _> = rollup(influx, db, measurement)
            .iter()
            .map(|r| {
                let key = (time(r), text(r, "domain").expect("domain"));
                (key, (int(r, "pageviews"), int(r, "visits")))
            })
            .collect();
        let want = want
            .iter()
            .map(|(k, a)| (k.clone(), (a.count, a.sessions.len() as i64)))
            .collect();
        assert_same(&format!("{db}: {measurement}"), &got, &want);
    }

    let got: BTreeMap<(u64, String, String), _> = rollup(influx, db, "pf_analytics_event_15m")
        .iter()
        .map(|r| {
            let key = (
                time(r),
                text(r, "domain").expect("domain"),
                text(r, "event").expect("event"),
            );
            let row = (
                int(r, "events"),
                int(r, "visits"),
                float(r, "value_sum"),
                int(r, "value_count"),
            );
            (key, row)
        })
        .collect();
    let want = e
        .events_15m
        .iter()
        .map(|(k, a)| (k.clone(), a.row()))
        .collect();
    assert_same(&format!("{db}: pf_analytics_event_15m"), &got, &want);

    // The daily rollups the report API reads.
    let got: BTreeMap<(u64, String), _> = rollup(influx, db, "pf_analytics_domain_1d")
        .iter()
        .map(|r| {
            let median = r.get("load_time_median").and_then(Value::as_f64);
            let key = (time(r), text(r, "domain").expect("domain"));
            (key, (median, int(r, "load_time_count")))
        })
        .collect();
    let want = e
        .loads_1d
        .iter()
        .map(|(k, loads)| (k.clone(), (median(loads), loads.len() as i64)))
        .collect();
    assert_same(
        &format!("{db}: pf_analytics_domain_1d load times"),
        &got,
        &want,
    );
    for tag in ["page", "referrer", "platform", "timezone"] {
        let measurement = format!("pf_analytics_{tag}_1d");
        let got: BTreeMap<(u64, String, Option<String>), _> = rollup(influx, db, &measurement)
            .iter()
            .map(|r| {
                let key = (time(r), text(r, "domain").expect("domain"), text(r, tag));
                (key, (int(r, "pageviews"), int(r, "visits")))
            })
            .collect();
        let want = e
            .tags_1d
            .iter()
            .filter(|((t, ..), _)| *t == tag)
            .map(|((_, day, domain, value), a)| {
                let key = (*day, domain.clone(), value.clone());
                (key, (a.count, a.sessions.len() as i64))
            })
            .collect();
        assert_same(&format!("{db}: {measurement}"), &got, &want);
    }
    let got: BTreeMap<(u64, String, String), _> = rollup(influx, db, "pf_analytics_event_1d")
        .iter()
        .map(|r| {
            let key = (
                time(r),
                text(r, "domain").expect("domain"),
                text(r, "event").expect("event"),
            );
            (key, (int(r, "events"), float(r, "value_sum")))
        })
        .collect();
    let want = e
        .events_1d
        .iter()
        .map(|(k, a)| (k.clone(), (a.count, a.sum)))
        .collect();
    assert_same(&format!("{db}: pf_analytics_event_1d"), &got, &want);
    let got: BTreeMap<(u64, String, String), String> =
        rollup(influx, db, "pf_analytics_event_note")
            .iter()
            .map(|r| {
                let key = (
                    time(r),
                    text(r, "domain").expect("domain"),
                    text(r, "event").expect("event"),
                );
                (key, text(r, "note").expect("note"))
            })
            .collect();
    assert_same(
        &format!("{db}: pf_analytics_event_note"),
        &got,
        &e.event_notes,
    );

    // The rollups keep no visit id and no note: only the tags they group by.
    for (measurement, tags) in [
        (
            "pf_analytics_15m",
            &["domain", "page", "platform", "referrer", "timezone"][..],
        ),
        ("pf_analytics_domain_15m", &["domain"][..]),
        ("pf_analytics_domain_1d", &["domain"][..]),
        ("pf_analytics_event_15m", &["domain", "event"][..]),
        ("pf_analytics_page_1d", &["domain", "page"][..]),
        ("pf_analytics_referrer_1d", &["domain", "referrer"][..]),
        ("pf_analytics_platform_1d", &["domain", "platform"][..]),
        ("pf_analytics_timezone_1d", &["domain", "timezone"][..]),
        ("pf_analytics_event_1d", &["domain", "event"][..]),
        ("pf_analytics_event_note", &["domain", "event"][..]),
    ] {
        let keys: Vec<String> = influx
            .rows(
                db,
                &format!(
                    "SHOW TAG KEYS FROM \"rollups\".{}",
                    quote_ident(measurement)
                ),
            )
            .iter()
            .map(|r| r["tagKey"].as_str().expect("tagKey").to_string())
            .collect();
        assert_eq!(keys, tags, "{db}: tag keys of {measurement}");
    }
}

/// Sums over the rollups equal the test's totals and the same sums over the raw points; visits
/// summed over buckets overcount, as the files and the README say.
fn check_totals(influx: &Influx, db: &str, e: &Expected, sess_as: SessAs) {
    // Page views per domain and page.
    let mut want: BTreeMap<(String, String), i64> = BTreeMap::new();
    for ((_, domain, page, ..), agg) in &e.pages_15m {
        *want.entry((domain.clone(), page.clone())).or_default() += agg.count;
    }
    let mut from_rollup: BTreeMap<(String, String), i64> = BTreeMap::new();
    for r in rollup(influx, db, "pf_analytics_15m") {
        let key = (
            text(&r, "domain").expect("domain"),
            text(&r, "page").expect("page"),
        );
        *from_rollup.entry(key).or_default() += int(&r, "pageviews");
    }
    let from_raw: BTreeMap<(String, String), i64> = influx
        .rows(
            db,
            "SELECT sum(\"counter\") AS \"pageviews\" FROM \"pf_analytics\" GROUP BY \"domain\", \"page\"",
        )
        .iter()
        .map(|r| {
            let key = (text(r, "domain").expect("domain"), text(r, "page").expect("page"));
            (key, int(r, "pageviews"))
        })
        .collect();
    assert_same(
        &format!("{db}: page views per page, rollup"),
        &from_rollup,
        &want,
    );
    assert_same(&format!("{db}: page views per page, raw"), &from_raw, &want);

    // Events, value sums and value counts per domain and event.
    let mut want: BTreeMap<(String, String), (i64, f64, i64)> = BTreeMap::new();
    for ((_, domain, event), agg) in &e.events_15m {
        let w = want.entry((domain.clone(), event.clone())).or_default();
        w.0 += agg.count;
        w.1 += agg.sum;
        w.2 += agg.n;
    }
    let mut from_rollup: BTreeMap<(String, String), (i64, f64, i64)> = BTreeMap::new();
    for r in rollup(influx, db, "pf_analytics_event_15m") {
        let key = (
            text(&r, "domain").expect("domain"),
            text(&r, "event").expect("event"),
        );
        let w = from_rollup.entry(key).or_default();
        w.0 += int(&r, "events");
        w.1 += float(&r, "value_sum");
        w.2 += int(&r, "value_count");
    }
    let from_raw: BTreeMap<(String, String), (i64, f64, i64)> = influx
        .rows(
            db,
            "SELECT sum(\"counter\") AS \"events\", sum(\"value\") AS \"value_sum\", \
             count(\"value\") AS \"value_count\" FROM \"pf_analytics_event\" \
             GROUP BY \"domain\", \"event\"",
        )
        .iter()
        .map(|r| {
            let key = (
                text(r, "domain").expect("domain"),
                text(r, "event").expect("event"),
            );
            (
                key,
                (
                    int(r, "events"),
                    float(r, "value_sum"),
                    int(r, "value_count"),
                ),
            )
        })
        .collect();
    assert_same(
        &format!("{db}: events per event, rollup"),
        &from_rollup,
        &want,
    );
    assert_same(&format!("{db}: events per event, raw"), &from_raw, &want);

    // Visits: exact only over the raw points of the whole period.
    for (domain, sessions) in &e.visits {
        let true_visits = sessions.len() as i64;
        let points = format!("\"pf_analytics\" WHERE \"domain\" = '{domain}'");
        let from = match sess_as {
            SessAs::Field => points,
            SessAs::Tag => format!("(SELECT \"counter\", \"sess\" FROM {points})"),
        };
        let raw = influx.rows(
            db,
            &format!("SELECT count(distinct(\"sess\")) AS \"visits\" FROM {from}"),
        );
        assert_eq!(raw.len(), 1, "{raw:?}");
        assert_eq!(
            int(&raw[0], "visits"),
            true_visits,
            "{db}: raw visits of {domain}"
        );

        let sum_visits = |measurement: &str| -> i64 {
            rollup(influx, db, measurement)
                .iter()
                .filter(|r| text(r, "domain").as_deref() == Some(domain.as_str()))
                .map(|r| int(r, "visits"))
                .sum()
        };
        let per_15m = sum_visits("pf_analytics_domain_15m");
        let per_day = sum_visits("pf_analytics_domain_1d");
        let per_page = sum_visits("pf_analytics_15m");
        // The generated visits span buckets, so the sum of 15-minute visits must overcount.
        let want_15m: i64 = e
            .domain_15m
            .iter()
            .filter(|((_, d), _)| d == domain)
            .map(|(_, a)| a.sessions.len() as i64)
            .sum();
        assert!(
            want_15m > true_visits,
            "the data set has no visit spanning buckets"
        );
        assert_eq!(per_15m, want_15m, "{db}: 15-minute visits of {domain}");
        assert!(
            per_page >= per_15m && per_15m >= per_day && per_day >= true_visits,
            "{db}: {domain}: visits summed per page {per_page}, per 15 min {per_15m}, \
             per day {per_day}, true {true_visits}"
        );
        println!(
            "{db}: {domain}: visits {true_visits}; summed over rollup rows: per day \
             {per_day}, per 15 min {per_15m}, per page and 15 min {per_page}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Tests.

/// Every `.influxql` file is installed by one of the tests below.
fn every_influxql_file_is_covered() {
    let mut files: Vec<String> = std::fs::read_dir(influxdb_dir())
        .expect("nginx-conf/influxdb")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".influxql"))
        .collect();
    files.sort();
    assert_eq!(
        files,
        [
            "event-notes.influxql",
            "rollups-sess-tag.influxql",
            "rollups.influxql"
        ],
        "a new .influxql file needs a test here"
    );
}

fn field_sessions_rollups_match_the_data() {
    let influx = Influx::start();
    let db = FILE_DB;
    influx.create_database(db);
    let (note_cqs, cqs): (Vec<_>, Vec<_>) =
        install(&influx, db, &["rollups.influxql", "event-notes.influxql"])
            .into_iter()
            .partition(|cq| cq.name.starts_with("cq_pf_analytics_event_note_"));
    assert_eq!(cqs.len(), 10, "{cqs:?}");

    let (from, to) = data_range();
    let data = generate(from);
    write_data(&influx, db, &data, SessAs::Field);
    let e = expected(&data);
    println!(
        "{} page views and {} events over {DAYS} days; rollup rows: {} pages, {} events",
        e.domain_15m.values().map(|a| a.count).sum::<i64>(),
        e.events_15m.values().map(|a| a.count).sum::<i64>(),
        e.pages_15m.len(),
        e.events_15m.len()
    );
    assert_eq!(
        influx.count_points(db, "pf_analytics") + influx.count_points(db, "pf_analytics_event"),
        data.len(),
        "every generated point stored"
    );

    run_backfill(&influx, db, &cqs, from, to);
    run_backfill(&influx, db, &note_cqs, from, to);
    check_rollups(&influx, db, &e);
    check_totals(&influx, db, &e, SessAs::Field);

    // Events by note: one field per listed note, per site, event and bucket; unlisted notes
    // (free text) are in the raw points only.
    let notes = listed_notes(&note_cqs);
    assert_eq!(notes, ["mastodon", "bluesky", "email", ""]);
    let mut got: BTreeMap<(u64, String, String, String), i64> = BTreeMap::new();
    for r in rollup(&influx, db, "pf_analytics_event_notes_15m") {
        for (key, value) in &r {
            if let Some(note) = key.strip_prefix("note:") {
                if !value.is_null() {
                    let k = (
                        time(&r),
                        text(&r, "domain").expect("domain"),
                        text(&r, "event").expect("event"),
                        note.to_string(),
                    );
                    got.insert(k, int(&r, key));
                }
            }
        }
    }
    let want: BTreeMap<_, _> = e
        .notes_15m
        .iter()
        .filter(|((.., note), _)| notes.contains(note))
        .map(|(k, n)| (k.clone(), *n))
        .collect();
    assert!(
        e.notes_15m.len() > want.len(),
        "the data set has notes that are not listed"
    );
    assert_same("events per note", &got, &want);

    // The limitation behind event-notes.influxql: GROUP BY a field is silently ignored, so all
    // events come back as one group with an empty "note".
    let grouped = influx.rows(
        db,
        "SELECT count(\"counter\") AS \"events\" FROM \"pf_analytics_event\" GROUP BY \"note\"",
    );
    let all_events: i64 = e.events_15m.values().map(|a| a.count).sum();
    assert_eq!(
        grouped.len(),
        1,
        "GROUP BY a field made groups: {grouped:?}"
    );
    assert_eq!(text(&grouped[0], "note"), None, "{grouped:?}");
    assert_eq!(int(&grouped[0], "events"), all_events);
}

fn tag_sessions_rollups_match_the_data() {
    let influx = Influx::start();
    let db = "analytics_tag";
    influx.create_database(db);
    let cqs = install(&influx, db, &["rollups-sess-tag.influxql"]);
    assert_eq!(cqs.len(), 10, "{cqs:?}");

    let (from, to) = data_range();
    let data = generate(from);
    write_data(&influx, db, &data, SessAs::Tag);
    let keys: Vec<String> = influx
        .rows(db, "SHOW TAG KEYS FROM \"pf_analytics\"")
        .iter()
        .map(|r| r["tagKey"].as_str().expect("tagKey").to_string())
        .collect();
    assert!(
        keys.contains(&"sess".to_string()),
        "sess is a tag here: {keys:?}"
    );

    // COUNT(DISTINCT()) on a tag finds nothing: why this variant reads through subqueries.
    let direct = influx.rows(db, "SELECT count(distinct(\"sess\")) FROM \"pf_analytics\"");
    assert!(
        direct.is_empty(),
        "COUNT(DISTINCT(tag)) answered {direct:?}"
    );

    run_backfill(&influx, db, &cqs, from, to);
    let e = expected(&data);
    check_rollups(&influx, db, &e);
    check_totals(&influx, db, &e, SessAs::Tag);
}

/// Runs the tests (those whose name contains one of the command-line arguments, if any) and
/// prints one line per test and a libtest-style summary; exits 1 if one failed.
fn main() {
    let tests: [(&str, fn()); 3] = [
        (
            "every_influxql_file_is_covered",
            every_influxql_file_is_covered,
        ),
        (
            "field_sessions_rollups_match_the_data",
            field_sessions_rollups_match_the_data,
        ),
        (
            "tag_sessions_rollups_match_the_data",
            tag_sessions_rollups_match_the_data,
        ),
    ];
    common::run_tests(&tests);
}
