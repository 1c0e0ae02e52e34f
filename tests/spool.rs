//! `analytics_spool` (issue 10): with a disk spool, an InfluxDB outage or restart loses nothing.
//!
//! Against the real nginx with the module and a real InfluxDB 1.x: InfluxDB is really stopped
//! (its process killed) and started again on the same port with the same data; beacons flow
//! from client threads, each with its own `sess_id`, so every stored point can be traced to the
//! answer its beacon got. The spool file format checked here is the one documented in the
//! contract: one entry per line, `<16 hex digits: FNV-1a 64 of the line> <line>\n`.
//!
//! The tmpfs and read-only mount cases need root (as in CI): they fail with a clear message
//! otherwise, never pass silently.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::json;

use common::points::Point;
use common::{
    free_port, is_root, nginx_test_config_with, send_signal, try_post, wait_until, write_location,
    FakeSink, Influx, Nginx, NginxOptions, Outcome, TestDir, SIGKILL,
};

/// How long InfluxDB stays down in the outage cases (issue 10: "stopped for 20 s").
const OUTAGE: Duration = Duration::from_secs(20);
/// Beacons flow this long (and at least `MIN_BEFORE` of them) before InfluxDB is stopped.
const BEFORE_OUTAGE: Duration = Duration::from_secs(1);
const MIN_BEFORE: usize = 20;
/// Client threads in the flowing cases, and the pause between two beacons of one thread.
const CLIENTS: usize = 3;
const PACE: Duration = Duration::from_millis(10);
/// `retry=` of the spool in the outage cases: the drain without beacons happens on this tick.
const RETRY: &str = "1s";
/// Bound for a spool to drain once InfluxDB (or the sink) is back.
const DRAIN_BOUND: Duration = Duration::from_secs(60);
/// How long the point count must stay unchanged before the stored points are final.
const STABLE: Duration = Duration::from_secs(3);
const LOG_WAIT: Duration = Duration::from_secs(10);

const DB: &str = "analytics";

/// An event whose note holds `note`, naming its own session.
fn event(sess: &str, note: &str) -> Vec<u8> {
    json!({"domain": "www.example.com", "page": "/spool", "sess_id": sess,
           "event": "socialclick", "note": note})
    .to_string()
    .into_bytes()
}

/// A page view naming its own session (stored as the string field `sess`).
fn beacon(sess: &str) -> Vec<u8> {
    json!({"domain": "www.example.com", "page": "/spool", "sess_id": sess})
        .to_string()
        .into_bytes()
}

fn master_on(workers: u32) -> NginxOptions {
    NginxOptions {
        master_process: true,
        worker_processes: workers,
        ..NginxOptions::default()
    }
}

/// One server on `port` with the beacon endpoint `/collect` (write `mode`, `spool` as the
/// parameters of `analytics_spool`), logging `$status $analytics_status` of every beacon to
/// logs/beacons.log, and the write location proxying to `upstream` (`host:port`).
fn server(port: u16, upstream: &str, mode: &str, spool: &str) -> String {
    format!(
        r#"
server {{
    listen 127.0.0.1:{port};
    server_name www.example.com;
    permitted_events socialclick;
    location = /collect {{
        analytics;
        analytics_write_mode {mode};
        analytics_spool {spool};
        access_log logs/beacons.log beacons;
    }}
{}
}}
"#,
        write_location(
            &format!("http://{upstream}/write?db={DB}&precision=ns"),
            "5s"
        )
    )
}

/// The http block: the log format, the `sink` upstream (keepalive) at `sink_port`, and
/// `servers`.
fn http_block(sink_port: u16, servers: &str) -> String {
    format!(
        r#"
log_format beacons '$status $analytics_status';
upstream sink {{
    server 127.0.0.1:{sink_port};
    keepalive 8;
}}
{servers}
"#
    )
}

// ---------------------------------------------------------------------------------------------
// Spool files, read the way the contract describes them.

/// FNV-1a, 64 bit.
fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Every `*.spool` file in `dir` with its size (none if `dir` does not exist).
fn spool_files(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut files: Vec<(PathBuf, u64)> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".spool"))
        .map(|e| {
            let len = e.metadata().map(|m| m.len()).unwrap_or(0);
            (e.path(), len)
        })
        .collect();
    files.sort();
    files
}

/// The `*.spool` files in `dir` that hold at least one byte.
fn nonempty_spool_files(dir: &Path) -> Vec<(PathBuf, u64)> {
    spool_files(dir)
        .into_iter()
        .filter(|(_, len)| *len > 0)
        .collect()
}

/// The number of complete entries (newlines) in the `*.spool` files of `dir`.
fn spool_lines(dir: &Path) -> usize {
    spool_files(dir)
        .iter()
        .map(|(p, _)| {
            fs::read(p)
                .map(|b| b.iter().filter(|&&c| c == b'\n').count())
                .unwrap_or(0)
        })
        .sum()
}

fn spool_bytes(dir: &Path) -> u64 {
    spool_files(dir).iter().map(|(_, len)| len).sum()
}

/// Waits (bounded) until no `*.spool` file in `dir` holds a byte; panics with what is left.
fn assert_spool_drains(dir: &Path, what: &str) {
    let drained = wait_until(DRAIN_BOUND, || nonempty_spool_files(dir).is_empty());
    assert!(
        drained,
        "{what}: the spool did not drain within {DRAIN_BOUND:?}: {:?}",
        nonempty_spool_files(dir)
    );
}

/// The line protocol lines of a spool file's entries. Panics on an entry that is not
/// `<16 hex digits: FNV-1a 64 of the line> <line, its line feeds written as 0x1E>` (a file
/// written by nginx must be well-formed).
fn spool_entries(path: &Path) -> Vec<String> {
    let bytes = fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    assert!(
        bytes.ends_with(b"\n"),
        "{}: a spool file written by nginx ends with a newline",
        path.display()
    );
    let text = String::from_utf8(bytes).expect("a spool file is UTF-8 line protocol");
    text.lines()
        .map(|entry| {
            let (hash, line) = entry
                .split_once(' ')
                .unwrap_or_else(|| panic!("{}: entry without a space: {entry:?}", path.display()));
            assert!(
                hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit()),
                "{}: entry does not start with 16 hex digits: {entry:?}",
                path.display()
            );
            // A line feed inside the line (in a string field) is written as 0x1E.
            let line = line.replace('\u{1e}', "\n");
            assert_eq!(
                u64::from_str_radix(hash, 16).ok(),
                Some(fnv1a64(line.as_bytes())),
                "{}: the hash is FNV-1a 64 of the line: {entry:?}",
                path.display()
            );
            line
        })
        .collect()
}

/// The session of a line protocol line.
fn line_sess(line: &str) -> String {
    Point::parse(line)
        .unwrap_or_else(|e| panic!("unreadable line {line:?}: {e}"))
        .sess()
        .unwrap_or_else(|| panic!("line without a session: {line:?}"))
        .to_string()
}

// ---------------------------------------------------------------------------------------------
// What InfluxDB stored.

/// How many points InfluxDB holds per session.
fn stored_sessions(influx: &Influx) -> HashMap<String, usize> {
    let mut stored = HashMap::new();
    for row in influx.rows(DB, "SELECT \"sess\" FROM \"pf_analytics\"") {
        let sess = row
            .get("sess")
            .and_then(|v| v.as_str())
            .unwrap_or_else(|| panic!("a point without a session: {row:?}"))
            .to_string();
        *stored.entry(sess).or_default() += 1;
    }
    stored
}

/// Waits (bounded by [`DRAIN_BOUND`]) until every session of `expected` is stored and the
/// number of points then stays the same for [`STABLE`]; returns what is stored.
fn wait_until_stored(influx: &Influx, expected: &BTreeSet<String>) -> HashMap<String, usize> {
    let deadline = Instant::now() + DRAIN_BOUND;
    loop {
        let stored = stored_sessions(influx);
        if expected.iter().all(|s| stored.contains_key(s)) || Instant::now() >= deadline {
            break;
        }
        thread::sleep(Duration::from_millis(250));
    }
    // Then until the count is stable (a late replay or a duplicate would show up here).
    let mut last = stored_sessions(influx);
    let mut stable_since = Instant::now();
    while stable_since.elapsed() < STABLE && Instant::now() < deadline + STABLE {
        thread::sleep(Duration::from_millis(250));
        let now = stored_sessions(influx);
        if now != last {
            last = now;
            stable_since = Instant::now();
        }
    }
    last
}

// ---------------------------------------------------------------------------------------------
// Clients.

/// `POST /collect` of a beacon for `sess`; the status (panics on a connection error).
fn send(port: u16, sess: &str) -> u16 {
    match try_post(port, "/collect", &beacon(sess)) {
        Outcome::Status(s) => s,
        Outcome::ConnError(e) => panic!("{sess}: {e}"),
    }
}

/// [`CLIENTS`] threads sending beacons to `/collect`, one fresh connection and one new session
/// each, every [`PACE`], until [`Flow::finish`].
struct Flow {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicUsize>,
    clients: Vec<JoinHandle<Vec<(String, Outcome)>>>,
}

impl Flow {
    fn start(port: u16, tag: &str) -> Flow {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicUsize::new(0));
        let clients = (0..CLIENTS)
            .map(|t| {
                let (stop, sent, tag) = (stop.clone(), sent.clone(), tag.to_string());
                thread::spawn(move || {
                    let mut outcomes = Vec::new();
                    let mut i = 0;
                    while !stop.load(Ordering::SeqCst) {
                        let sess = format!("{tag}-{t}-{i}");
                        let outcome = try_post(port, "/collect", &beacon(&sess));
                        outcomes.push((sess, outcome));
                        sent.fetch_add(1, Ordering::SeqCst);
                        i += 1;
                        thread::sleep(PACE);
                    }
                    outcomes
                })
            })
            .collect();
        Flow {
            stop,
            sent,
            clients,
        }
    }

    fn sent(&self) -> usize {
        self.sent.load(Ordering::SeqCst)
    }

    /// Stops the clients; every beacon's session and outcome.
    fn finish(self) -> Vec<(String, Outcome)> {
        self.stop.store(true, Ordering::SeqCst);
        self.clients
            .into_iter()
            .flat_map(|c| c.join().expect("client thread"))
            .collect()
    }
}

/// Asserts that the error log shows no crash, apart from lines naming `allowed` (the worker a
/// test killed itself).
fn assert_no_crash(nginx: &Nginx, allowed: &[String]) {
    let log = nginx.error_log();
    for line in log.lines() {
        if allowed.iter().any(|a| line.contains(a.as_str())) {
            continue;
        }
        for bad in [
            "[alert]",
            "[crit]",
            "[emerg]",
            "exited on signal",
            "panicked",
        ] {
            assert!(!line.contains(bad), "{bad} in the error log: {line}");
        }
    }
}

fn count_in_log(nginx: &Nginx, needles: &[&str]) -> usize {
    nginx
        .error_log()
        .lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .count()
}

// ---------------------------------------------------------------------------------------------
// 1 and 2: InfluxDB stopped while beacons flow, with and without nginx being disrupted.

#[derive(Debug, Clone, Copy, PartialEq)]
enum Disruption {
    None,
    /// A worker killed with SIGKILL in the middle of the outage.
    KillWorker,
    /// `nginx -s reload` in the middle of the outage.
    Reload,
    /// nginx stopped and started again (same prefix, same spool directory).
    Restart,
}

/// InfluxDB is stopped for [`OUTAGE`] while beacons flow to nginx (2 workers, `mode`), with
/// `disruption` half-way through; the clients stop before InfluxDB returns. Then every beacon
/// answered 204 is stored exactly once, without any new beacon, and the spool drains.
///
/// With `proxy`, nginx writes through a forwarding [`FakeSink`] (a proxy in front of InfluxDB
/// that answers 503 while InfluxDB is down) which records every write: once InfluxDB is back,
/// no line may reach it twice (InfluxDB itself would hide a second copy of a line: same
/// point), so no spool file is replayed twice, by one worker or by two.
fn outage(mode: &str, disruption: Disruption, proxy: bool) {
    let what = format!(
        "{mode} mode, {disruption:?}{}",
        if proxy { ", behind a proxy" } else { "" }
    );
    let mut influx = Influx::start();
    influx.create_database(DB);
    let audit = proxy.then(|| {
        let sink = FakeSink::start();
        sink.set_forward(Some(&influx.addr()));
        sink
    });
    let upstream_port = audit.as_ref().map_or(influx.port(), FakeSink::port);
    let port = free_port();
    let conf = http_block(
        upstream_port,
        &server(port, "sink", mode, &format!("spool retry={RETRY}")),
    );
    let mut nginx = Nginx::start_with(master_on(2), &conf);
    let spool_dir = nginx.prefix().join("spool");
    assert!(
        spool_dir.is_dir(),
        "{what}: nginx created the spool directory {}",
        spool_dir.display()
    );

    let flow = Flow::start(port, &format!("{mode}-{disruption:?}"));
    thread::sleep(BEFORE_OUTAGE);
    assert!(
        wait_until(Duration::from_secs(10), || flow.sent() >= MIN_BEFORE),
        "{what}: beacons are not flowing"
    );
    influx.stop();
    let outage_started = Instant::now();
    let sent_at_outage = flow.sent();

    thread::sleep(OUTAGE / 2);
    let mut killed = Vec::new();
    let mut adopted_from = None;
    match disruption {
        Disruption::None => {}
        Disruption::KillWorker => {
            let before = nginx.worker_pids();
            assert_eq!(before.len(), 2, "{what}: two workers");
            let victim = before[0];
            assert!(send_signal(victim, SIGKILL), "{what}: kill {victim}");
            assert!(
                wait_until(Duration::from_secs(10), || {
                    let now = nginx.worker_pids();
                    now.len() == 2 && !now.contains(&victim)
                }),
                "{what}: the master respawned the worker: {:?}",
                nginx.worker_pids()
            );
            killed.push(format!("worker process {victim} exited on signal 9"));
            adopted_from = Some(victim);
        }
        Disruption::Reload => {
            let before = nginx.worker_pids();
            nginx.write_config(&conf);
            nginx.reload();
            let after = nginx.worker_pids();
            assert!(
                after.len() == 2 && after.iter().all(|p| !before.contains(p)),
                "{what}: new workers after the reload: {before:?} -> {after:?}"
            );
        }
        Disruption::Restart => {
            nginx.stop();
            nginx.start_again();
        }
    }
    let rest = OUTAGE.saturating_sub(outage_started.elapsed());
    thread::sleep(rest);
    let outcomes = flow.finish();
    let sent_in_outage = outcomes.len() - sent_at_outage;
    // No beacon from here on: the spool must drain on its own.
    let workers = nginx.worker_pids();
    let spooled_before_return = spool_bytes(&spool_dir);
    influx.restart();
    if let Some(audit) = &audit {
        audit.clear_requests();
    }

    let answered: BTreeSet<String> = outcomes
        .iter()
        .filter(|(_, o)| *o == Outcome::Status(204))
        .map(|(s, _)| s.clone())
        .collect();
    let stored = wait_until_stored(&influx, &answered);

    let missing: Vec<&String> = answered
        .iter()
        .filter(|s| !stored.contains_key(*s))
        .collect();
    let twice: Vec<(&String, &usize)> = stored.iter().filter(|(_, &n)| n > 1).collect();
    let sent: BTreeSet<&String> = outcomes.iter().map(|(s, _)| s).collect();
    let unknown: Vec<&String> = stored.keys().filter(|s| !sent.contains(s)).collect();
    let other: Vec<&(String, Outcome)> = outcomes
        .iter()
        .filter(|(_, o)| matches!(o, Outcome::Status(s) if *s != 204))
        .collect();
    let conn_errors = outcomes
        .iter()
        .filter(|(_, o)| matches!(o, Outcome::ConnError(_)))
        .count();
    eprintln!(
        "{what}: {} beacons ({sent_in_outage} while InfluxDB was down), {} answered 204, {} \
         stored, {} missing, {} stored twice, {conn_errors} connection errors, {} other \
         answers; {spooled_before_return} spool bytes when InfluxDB returned",
        outcomes.len(),
        answered.len(),
        stored.len(),
        missing.len(),
        twice.len(),
        other.len()
    );
    assert!(
        sent_in_outage >= 100,
        "{what}: beacons flowed during the outage ({sent_in_outage})"
    );
    assert!(
        missing.is_empty(),
        "{what}: {} beacon(s) answered 204 but not stored, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    assert!(twice.is_empty(), "{what}: stored twice: {twice:?}");
    assert!(unknown.is_empty(), "{what}: unknown sessions: {unknown:?}");
    assert!(
        other.is_empty(),
        "{what}: with a working spool every beacon is answered 204: {:?}",
        &other[..other.len().min(10)]
    );
    match disruption {
        Disruption::None | Disruption::Reload => {
            assert_eq!(conn_errors, 0, "{what}: no beacon lost its connection")
        }
        // At most the one request in flight per client on the killed worker.
        Disruption::KillWorker => assert!(conn_errors <= CLIENTS, "{what}: {conn_errors}"),
        // The clients find nothing listening while nginx restarts.
        Disruption::Restart => {}
    }
    assert!(
        spooled_before_return > 0,
        "{what}: lines were in the spool when InfluxDB returned"
    );
    assert_spool_drains(&spool_dir, &what);
    if let Some(audit) = &audit {
        let mut sent_to_influx: HashMap<String, usize> = HashMap::new();
        for line in written_lines(audit) {
            *sent_to_influx.entry(line).or_default() += 1;
        }
        let replayed_twice: Vec<(&String, &usize)> =
            sent_to_influx.iter().filter(|(_, &n)| n > 1).collect();
        eprintln!(
            "{what}: {} lines written to InfluxDB after it returned, {} of them twice",
            sent_to_influx.len(),
            replayed_twice.len()
        );
        assert!(
            !sent_to_influx.is_empty(),
            "{what}: the spool was replayed through the proxy"
        );
        assert!(
            replayed_twice.is_empty(),
            "{what}: {} line(s) replayed more than once, e.g. {:?}",
            replayed_twice.len(),
            &replayed_twice[..replayed_twice.len().min(3)]
        );
    }

    // Files left by workers that are gone were adopted by the new ones (the killed worker's
    // file by name: `<sinkid>.<pid>.<ms>.spool`).
    if disruption != Disruption::None {
        let adopted = match adopted_from {
            Some(pid) => count_in_log(
                &nginx,
                &["analytics: spool", "adopted", &format!(".{pid}.")],
            ),
            None => count_in_log(&nginx, &["analytics: spool", "adopted"]),
        };
        assert!(
            adopted > 0,
            "{what}: the error log says a file left by an earlier worker{} was adopted\n{}",
            adopted_from.map(|p| format!(" ({p})")).unwrap_or_default(),
            nginx.error_log()
        );
    }

    // The error log tells the story.
    for needle in ["started filling", "waiting", "drained"] {
        assert!(
            count_in_log(&nginx, &["analytics: spool", needle]) > 0,
            "{what}: the error log says `analytics: spool ... {needle}`\n{}",
            nginx.error_log()
        );
    }
    if mode == "wait" {
        let beacons =
            fs::read_to_string(nginx.prefix().join("logs/beacons.log")).unwrap_or_default();
        assert!(
            beacons.lines().any(|l| l == "204 spooled"),
            "{what}: beacons answered from the spool have $analytics_status `spooled`"
        );
    }
    assert_eq!(
        nginx.worker_pids(),
        workers,
        "{what}: no worker was replaced while the spool drained"
    );
    assert_no_crash(&nginx, &killed);
}

#[test]
fn influxdb_down_20s_wait_mode_every_204_is_stored_once_and_the_spool_drains_alone() {
    outage("wait", Disruption::None, false);
}

#[test]
fn influxdb_down_20s_background_mode_every_204_is_stored_once_and_the_spool_drains_alone() {
    outage("background", Disruption::None, false);
}

#[test]
fn influxdb_down_behind_a_proxy_answering_503_each_spooled_line_is_replayed_once() {
    outage("background", Disruption::None, true);
}

#[test]
fn influxdb_down_with_a_worker_killed_wait_mode_loses_nothing() {
    outage("wait", Disruption::KillWorker, false);
}

#[test]
fn influxdb_down_with_a_worker_killed_background_mode_loses_nothing() {
    outage("background", Disruption::KillWorker, false);
}

#[test]
fn influxdb_down_with_a_reload_wait_mode_loses_nothing() {
    outage("wait", Disruption::Reload, false);
}

#[test]
fn influxdb_down_with_a_reload_background_mode_loses_nothing() {
    outage("background", Disruption::Reload, false);
}

#[test]
fn influxdb_down_with_an_nginx_restart_wait_mode_loses_nothing() {
    outage("wait", Disruption::Restart, false);
}

#[test]
fn influxdb_down_with_an_nginx_restart_background_mode_loses_nothing() {
    outage("background", Disruption::Restart, false);
}

// ---------------------------------------------------------------------------------------------
// 3: damaged spool files.

#[test]
fn a_torn_last_line_and_garbage_in_the_middle_lose_only_the_entries_they_touch() {
    let mut influx = Influx::start();
    influx.create_database(DB);
    influx.stop();
    // Two server blocks (two sinks, so two spool files) on their own ports.
    let (torn_port, garbage_port) = (free_port(), free_port());
    let spool = format!("spool retry={RETRY}");
    let conf = http_block(
        influx.port(),
        &format!(
            "{}{}",
            server(torn_port, "sink", "wait", &spool),
            server(garbage_port, "sink", "wait", &spool)
        ),
    );
    let mut nginx = Nginx::start_with(master_on(1), &conf);
    let spool_dir = nginx.prefix().join("spool");
    const N: usize = 10;
    for i in 0..N {
        for (port, tag) in [(torn_port, "torn"), (garbage_port, "garbage")] {
            let sess = format!("{tag}-{i}");
            assert_eq!(send(port, &sess), 204, "{sess}: answered from the spool");
        }
    }
    nginx.stop();

    // One file per sink, each entry as documented.
    let files = nonempty_spool_files(&spool_dir);
    let file_of = |tag: &str| -> PathBuf {
        let holding: Vec<&PathBuf> = files
            .iter()
            .map(|(p, _)| p)
            .filter(|p| {
                spool_entries(p)
                    .iter()
                    .any(|l| line_sess(l).starts_with(&format!("{tag}-")))
            })
            .collect();
        assert_eq!(
            holding.len(),
            1,
            "one spool file holds the {tag} lines: {files:?}"
        );
        holding[0].clone()
    };
    let (torn_file, garbage_file) = (file_of("torn"), file_of("garbage"));
    let sessions_in =
        |path: &Path| -> Vec<String> { spool_entries(path).iter().map(|l| line_sess(l)).collect() };
    let want = |tag: &str| -> Vec<String> { (0..N).map(|i| format!("{tag}-{i}")).collect() };
    assert_eq!(sessions_in(&torn_file), want("torn"), "oldest first");
    assert_eq!(sessions_in(&garbage_file), want("garbage"), "oldest first");

    // A crash mid-append: the last entry loses its end and its newline.
    let mut torn = fs::read(&torn_file).unwrap();
    torn.truncate(torn.len() - 15);
    fs::write(&torn_file, &torn).unwrap();

    // Garbage in the middle: one byte of garbage-3's line changed (its hash no longer
    // matches: a corrupted line must not be stored as a different point), a garbage line
    // between garbage-5 and garbage-6 (touches no entry), and bytes glued to the front of
    // garbage-8's entry.
    let text = fs::read_to_string(&garbage_file).unwrap();
    let mut entries: Vec<String> = text.lines().map(|l| format!("{l}\n")).collect();
    assert!(entries[3].contains("garbage-3"));
    entries[3] = entries[3].replace("garbage-3", "garbage-X");
    assert!(entries[8].contains("garbage-8"));
    entries[8] = format!("\u{1}zz{}", entries[8]);
    entries.insert(6, "this is not a spool entry\n".to_string());
    fs::write(&garbage_file, entries.concat()).unwrap();

    influx.restart();
    nginx.start_again();
    let workers = nginx.worker_pids();
    let expected: BTreeSet<String> = (0..N - 1)
        .map(|i| format!("torn-{i}"))
        .chain(
            (0..N)
                .filter(|i| *i != 3 && *i != 8)
                .map(|i| format!("garbage-{i}")),
        )
        .collect();
    let stored = wait_until_stored(&influx, &expected);
    let stored_set: BTreeSet<String> = stored.keys().cloned().collect();
    assert_eq!(
        stored_set, expected,
        "the untouched entries are stored, the touched ones are not"
    );
    assert!(stored.values().all(|&n| n == 1), "stored once: {stored:?}");
    assert_spool_drains(&spool_dir, "damaged files");
    assert_eq!(
        count_in_log(&nginx, &["spool file", "skipped"]),
        2,
        "one error line per damaged file\n{}",
        nginx.error_log()
    );
    assert_eq!(nginx.worker_pids(), workers, "no worker crashed");
    assert_no_crash(&nginx, &[]);
}

/// The sessions stored in database `db` (each with its number of points).
fn sessions_in(influx: &Influx, db: &str) -> BTreeMap<String, usize> {
    let mut stored = BTreeMap::new();
    for row in influx.rows(db, "SELECT \"sess\" FROM \"pf_analytics\"") {
        if let Some(sess) = row.get("sess").and_then(|v| v.as_str()) {
            *stored.entry(sess.to_string()).or_default() += 1;
        }
    }
    stored
}

#[test]
fn two_server_blocks_with_one_name_never_replay_into_each_others_database() {
    // An HTTP and an HTTPS block of one site, say: the same server_name and write URI, on two
    // ports, each writing to its own database. Their spools share a directory.
    let mut influx = Influx::start();
    influx.create_database(DB);
    influx.create_database("other");
    influx.stop();
    let (port_a, port_b) = (free_port(), free_port());
    let spool = format!("spool retry={RETRY}");
    let server_b =
        server(port_b, "sink", "wait", &spool).replace(&format!("db={DB}&"), "db=other&");
    let conf = http_block(
        influx.port(),
        &(server(port_a, "sink", "wait", &spool) + &server_b),
    );
    let mut nginx = Nginx::start_with(master_on(2), &conf);
    let a: BTreeSet<String> = (0..8).map(|i| format!("site-a-{i}")).collect();
    let b: BTreeSet<String> = (0..8).map(|i| format!("site-b-{i}")).collect();
    for sess in &a {
        assert_eq!(send(port_a, sess), 204, "{sess}: spooled");
    }
    for sess in &b {
        assert_eq!(send(port_b, sess), 204, "{sess}: spooled");
    }
    // A restart: the new workers adopt the files, and only the identity in their names says
    // which server block's write location they belong to.
    nginx.stop();
    nginx.start_again();
    influx.restart();
    let expected = a.len() + b.len();
    let deadline = Instant::now() + DRAIN_BOUND;
    while sessions_in(&influx, DB).len() + sessions_in(&influx, "other").len() < expected
        && Instant::now() < deadline
    {
        thread::sleep(Duration::from_millis(250));
    }
    // Then a little longer: a late replay into the wrong database would show up.
    thread::sleep(STABLE);
    let (in_a, in_b) = (sessions_in(&influx, DB), sessions_in(&influx, "other"));
    assert_eq!(
        in_a.keys().cloned().collect::<BTreeSet<_>>(),
        a,
        "{DB}: site A's only"
    );
    assert_eq!(
        in_b.keys().cloned().collect::<BTreeSet<_>>(),
        b,
        "other: site B's only"
    );
    assert!(in_a.values().chain(in_b.values()).all(|&n| n == 1));
    assert_spool_drains(&nginx.prefix().join("spool"), "two blocks");
    assert_no_crash(&nginx, &[]);
}

#[test]
fn a_note_with_a_line_break_goes_through_the_spool_unchanged() {
    let mut influx = Influx::start();
    influx.create_database(DB);
    let port = free_port();
    let conf = http_block(
        influx.port(),
        &server(port, "sink", "wait", &format!("spool retry={RETRY}")),
    );
    let nginx = Nginx::start_with(master_on(1), &conf);
    let spool_dir = nginx.prefix().join("spool");
    let notes = ["line one\nline two", "tab\there", "\n\nends\n"];
    let post_event = |sess: &str, note: &str| match try_post(port, "/collect", &event(sess, note)) {
        Outcome::Status(s) => s,
        Outcome::ConnError(e) => panic!("{sess}: {e}"),
    };
    // The same notes written the usual way, as a reference.
    for (i, note) in notes.iter().enumerate() {
        assert_eq!(post_event(&format!("direct-{i}"), note), 204);
    }
    influx.stop();
    for (i, note) in notes.iter().enumerate() {
        assert_eq!(post_event(&format!("spooled-{i}"), note), 204);
    }
    let entries: Vec<String> = nonempty_spool_files(&spool_dir)
        .iter()
        .flat_map(|(p, _)| spool_entries(p))
        .collect();
    assert_eq!(
        entries.len(),
        notes.len(),
        "one entry per beacon, whatever its note holds: {entries:?}"
    );
    assert!(
        entries.iter().any(|e| e.contains('\n')),
        "a line feed of a note is kept in its entry: {entries:?}"
    );
    influx.restart();
    assert_spool_drains(&spool_dir, "line breaks");
    let expected: BTreeSet<String> = (0..notes.len())
        .flat_map(|i| [format!("direct-{i}"), format!("spooled-{i}")])
        .collect();
    let deadline = Instant::now() + DRAIN_BOUND;
    let mut notes_by_sess: HashMap<String, String> = HashMap::new();
    while Instant::now() < deadline {
        notes_by_sess = influx
            .rows(DB, "SELECT \"sess\", \"note\" FROM \"pf_analytics_event\"")
            .iter()
            .map(|row| {
                let get = |k: &str| row[k].as_str().unwrap_or_default().to_string();
                (get("sess"), get("note"))
            })
            .collect();
        if expected.iter().all(|s| notes_by_sess.contains_key(s)) {
            break;
        }
        thread::sleep(Duration::from_millis(250));
    }
    for (i, note) in notes.iter().enumerate() {
        let direct = notes_by_sess.get(&format!("direct-{i}"));
        let spooled = notes_by_sess.get(&format!("spooled-{i}"));
        assert!(direct.is_some(), "direct-{i} stored: {notes_by_sess:?}");
        assert_eq!(
            spooled, direct,
            "the note {note:?} reads back the same through the spool as written directly"
        );
    }
    assert_no_crash(&nginx, &[]);
}

// ---------------------------------------------------------------------------------------------
// 4: limits: max_size, an unwritable directory, a full disk.

#[test]
fn past_max_size_wait_mode_answers_502_and_logs_it_and_every_204_is_stored() {
    let mut influx = Influx::start();
    influx.create_database(DB);
    influx.stop();
    let port = free_port();
    let conf = http_block(
        influx.port(),
        &server(
            port,
            "sink",
            "wait",
            &format!("spool max_size=4k retry={RETRY}"),
        ),
    );
    let nginx = Nginx::start_with(master_on(1), &conf);
    let spool_dir = nginx.prefix().join("spool");
    const N: usize = 60;
    let answers: Vec<(String, u16)> = (0..N)
        .map(|i| {
            let sess = format!("max-{i}");
            let status = send(port, &sess);
            (sess, status)
        })
        .collect();
    let statuses: Vec<u16> = answers.iter().map(|(_, s)| *s).collect();
    let first_502 = statuses
        .iter()
        .position(|&s| s == 502)
        .unwrap_or_else(|| panic!("60 beacons of ~200 bytes overflow 4k: {statuses:?}"));
    assert!(first_502 > 0, "the spool took lines until it was full");
    assert!(
        statuses[..first_502].iter().all(|&s| s == 204)
            && statuses[first_502..].iter().all(|&s| s == 502),
        "204 until the spool is full, then 502 (InfluxDB is still down): {statuses:?}"
    );
    assert!(
        spool_bytes(&spool_dir) <= 4096,
        "the spool stays within max_size: {:?}",
        spool_files(&spool_dir)
    );
    assert!(
        nginx.wait_for_log("full", LOG_WAIT)
            && count_in_log(&nginx, &["spool is full (max_size="]) > 0,
        "the error log says the spool is full\n{}",
        nginx.error_log()
    );
    assert!(
        count_in_log(&nginx, &["not stored"]) > 0,
        "the error log says how many points were not stored\n{}",
        nginx.error_log()
    );

    influx.restart();
    let answered: BTreeSet<String> = answers[..first_502]
        .iter()
        .map(|(s, _)| s.clone())
        .collect();
    let stored = wait_until_stored(&influx, &answered);
    let stored_set: BTreeSet<String> = stored.keys().cloned().collect();
    assert_eq!(
        stored_set, answered,
        "every 204 is stored, no 502 is (the agent retries those)"
    );
    assert!(stored.values().all(|&n| n == 1), "stored once: {stored:?}");
    assert_spool_drains(&spool_dir, "max_size");
    assert_no_crash(&nginx, &[]);
    // Each beacon answered 502 is one point not stored, counted once in the error log.
    assert_eq!(
        not_stored_count(&nginx),
        N - first_502,
        "{} beacons answered 502: the error log's counts of points not stored add up to \
         them\n{}",
        N - first_502,
        nginx.error_log()
    );
}

#[test]
fn past_max_size_background_mode_drops_and_counts_the_lines_it_cannot_spool() {
    let mut influx = Influx::start();
    influx.create_database(DB);
    influx.stop();
    let port = free_port();
    let conf = http_block(
        influx.port(),
        &server(
            port,
            "sink",
            "background",
            &format!("spool max_size=4k retry={RETRY}"),
        ),
    );
    let nginx = Nginx::start_with(master_on(1), &conf);
    let spool_dir = nginx.prefix().join("spool");
    const N: usize = 60;
    for i in 0..N {
        let sess = format!("bgmax-{i}");
        assert_eq!(send(port, &sess), 204, "{sess}: background answers at once");
    }
    assert!(
        nginx.wait_for_log("full", LOG_WAIT)
            && count_in_log(&nginx, &["spool is full (max_size="]) > 0,
        "the error log says the spool is full\n{}",
        nginx.error_log()
    );
    assert!(
        spool_bytes(&spool_dir) <= 4096,
        "the spool stays within max_size: {:?}",
        spool_files(&spool_dir)
    );
    let spooled: Vec<String> = nonempty_spool_files(&spool_dir)
        .iter()
        .flat_map(|(p, _)| spool_entries(p))
        .map(|l| line_sess(&l))
        .collect();
    influx.restart();
    let expected: BTreeSet<String> = spooled.iter().cloned().collect();
    let stored = wait_until_stored(&influx, &expected);
    let stored_set: BTreeSet<String> = stored.keys().cloned().collect();
    assert_eq!(
        stored_set, expected,
        "what was spooled is stored, nothing else"
    );
    assert_spool_drains(&spool_dir, "max_size background");
    assert_no_crash(&nginx, &[]);
    // The drops are counted once each: the error log's counts of points not stored add up
    // to the lines that are not in the spool (refusals not logged yet are logged at the next
    // retry tick, long past by now).
    let dropped = not_stored_count(&nginx);
    let drop_lines = count_in_log(&nginx, &["not stored"]);
    assert_eq!(
        dropped,
        N - spooled.len(),
        "{N} beacons, {} spooled: the error log counts {dropped} point(s) not stored in \
         {drop_lines} line(s)\n{}",
        spooled.len(),
        nginx.error_log()
    );
}

/// The sum of the counts the error log gives for points not stored (`<n> point(s) not
/// stored`).
fn not_stored_count(nginx: &Nginx) -> usize {
    nginx
        .error_log()
        .lines()
        .filter_map(|l| {
            let i = l.find(" point(s) not stored")?;
            let digits: String = l[..i]
                .chars()
                .rev()
                .take_while(char::is_ascii_digit)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            digits.parse::<usize>().ok()
        })
        .sum()
}

/// A filesystem mounted on a directory for one test; unmounted on drop (lazily if nginx still
/// holds a file on it).
struct Mount {
    path: PathBuf,
}

impl Mount {
    /// `mount -t tmpfs -o <options> tmpfs <path>`; panics (a clear failure, not a skip) unless
    /// running as root.
    fn tmpfs(path: &Path, options: &str) -> Mount {
        assert!(
            is_root(),
            "this test mounts a tmpfs and must run as root (as it does in CI); not skipping"
        );
        fs::create_dir_all(path).expect("creating the mount point");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs"])
            .arg(path)
            .status()
            .expect("running mount");
        assert!(
            status.success(),
            "mount -t tmpfs -o {options} on {}",
            path.display()
        );
        Mount {
            path: path.to_path_buf(),
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.path)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
    }
}

#[test]
fn nginx_t_fails_when_the_spool_directory_is_not_writable() {
    let dir = TestDir::new("spool-ro");
    let spool = dir.path().join("spool");
    let _mount = if is_root() {
        // Root writes through any mode bits: only a read-only filesystem stops it.
        Some(Mount::tmpfs(&spool, "ro,size=64k"))
    } else {
        fs::create_dir_all(&spool).unwrap();
        let status = Command::new("chmod")
            .arg("0555")
            .arg(&spool)
            .status()
            .unwrap();
        assert!(status.success());
        None
    };
    let conf = |path: &Path| {
        http_block(
            free_port(),
            &server(free_port(), "sink", "wait", &path.display().to_string()),
        )
    };
    let (ok, output) = nginx_test_config_with(master_on(1), &conf(&spool));
    assert!(!ok, "nginx -t must fail:\n{output}");
    assert!(
        output.contains("analytics_spool") && output.contains("not writable"),
        "nginx -t names the directive and says `not writable`:\n{output}"
    );
    // The same configuration with a writable directory passes.
    let writable = dir.path().join("writable");
    fs::create_dir_all(&writable).unwrap();
    let (ok, output) = nginx_test_config_with(master_on(1), &conf(&writable));
    assert!(ok, "nginx -t with a writable spool directory:\n{output}");
}

#[test]
fn a_tiny_tmpfs_that_fills_up_gives_502_and_error_lines_and_every_204_is_stored() {
    let dir = TestDir::new("spool-tmpfs");
    let spool = dir.path().join("spool");
    let _mount = Mount::tmpfs(&spool, "size=64k");
    let mut influx = Influx::start();
    influx.create_database(DB);
    influx.stop();
    let port = free_port();
    let conf = http_block(
        influx.port(),
        &server(
            port,
            "sink",
            "wait",
            &format!("{} retry={RETRY}", spool.display()),
        ),
    );
    let nginx = Nginx::start_with(master_on(1), &conf);
    let workers = nginx.worker_pids();
    // 64k hold about 300 entries of ~200 bytes.
    const N: usize = 600;
    let answers: Vec<(String, u16)> = (0..N)
        .map(|i| {
            let sess = format!("tmpfs-{i}");
            let status = send(port, &sess);
            (sess, status)
        })
        .collect();
    let ok: BTreeSet<String> = answers
        .iter()
        .filter(|(_, s)| *s == 204)
        .map(|(sess, _)| sess.clone())
        .collect();
    let refused: Vec<&String> = answers
        .iter()
        .filter(|(_, s)| *s == 502)
        .map(|(sess, _)| sess)
        .collect();
    let other: Vec<&(String, u16)> = answers
        .iter()
        .filter(|(_, s)| *s != 204 && *s != 502)
        .collect();
    eprintln!(
        "tmpfs: {} answered 204, {} answered 502, {} bytes spooled",
        ok.len(),
        refused.len(),
        spool_bytes(&spool)
    );
    assert!(other.is_empty(), "only 204 or 502: {other:?}");
    assert!(
        !ok.is_empty(),
        "the spool took lines until the disk was full"
    );
    assert!(!refused.is_empty(), "a full disk answers 502");
    assert!(
        count_in_log(&nginx, &["analytics: spool"]) > 0
            && count_in_log(&nginx, &["not stored"]) > 0,
        "error lines for the full disk\n{}",
        nginx.error_log()
    );
    assert_eq!(nginx.worker_pids(), workers, "no worker crashed");

    influx.restart();
    let stored = wait_until_stored(&influx, &ok);
    let missing: Vec<&String> = ok.iter().filter(|s| !stored.contains_key(*s)).collect();
    assert!(
        missing.is_empty(),
        "answered 204 but not stored: {missing:?}"
    );
    let stored_refused: Vec<&&String> = refused
        .iter()
        .filter(|s| stored.contains_key(**s))
        .collect();
    assert!(
        stored_refused.is_empty(),
        "answered 502 but stored: {stored_refused:?}"
    );
    assert!(stored.values().all(|&n| n == 1), "stored once");
    assert_spool_drains(&spool, "tmpfs");
    assert_eq!(nginx.worker_pids(), workers, "no worker crashed");
    assert_no_crash(&nginx, &[]);
}

// ---------------------------------------------------------------------------------------------
// 5: what the sink answers decides what is retried.

/// nginx (1 worker) in front of a fake sink: `/collect` in `mode` with `spool`.
fn sink_nginx(sink: &FakeSink, mode: &str, spool: &str) -> (Nginx, u16, PathBuf) {
    let port = free_port();
    let conf = http_block(sink.port(), &server(port, "sink", mode, spool));
    let nginx = Nginx::start_with(master_on(1), &conf);
    let dir = nginx.prefix().join("spool");
    (nginx, port, dir)
}

/// The lines of every write the sink received, in order.
fn written_lines(sink: &FakeSink) -> Vec<String> {
    sink.requests()
        .iter()
        .flat_map(|r| {
            r.body_text()
                .lines()
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn a_sink_answering_400_is_not_retried_nothing_is_spooled() {
    for mode in ["wait", "background"] {
        let sink = FakeSink::start();
        let (nginx, port, spool_dir) = sink_nginx(&sink, mode, &format!("spool retry={RETRY}"));
        sink.set_response(400, r#"{"error":"unable to parse"}"#);
        let sess = format!("bad-{mode}");
        let want = if mode == "wait" { 502 } else { 204 };
        assert_eq!(send(port, &sess), want, "{mode}: as without a spool");
        assert!(
            nginx.wait_for_log("sink answered 400", LOG_WAIT),
            "{mode}: the failed write is logged\n{}",
            nginx.error_log()
        );
        assert!(
            nonempty_spool_files(&spool_dir).is_empty(),
            "{mode}: a 400 is not spooled: {:?}",
            spool_files(&spool_dir)
        );
        // Healed: a later beacon is written, the refused line is not written again, also not
        // on a retry tick.
        sink.set_response(204, "");
        assert_eq!(send(port, &format!("good-{mode}")), 204);
        thread::sleep(Duration::from_millis(2500));
        let lines = written_lines(&sink);
        let bad = lines.iter().filter(|l| line_sess(l) == sess).count();
        assert_eq!(
            bad, 1,
            "{mode}: the refused line was written once, never replayed"
        );
        assert!(
            lines.iter().any(|l| line_sess(l) == format!("good-{mode}")),
            "{mode}: the next beacon was written"
        );
        assert!(
            nonempty_spool_files(&spool_dir).is_empty(),
            "{mode}: nothing spooled"
        );
        assert_eq!(
            count_in_log(&nginx, &["analytics: spool", "started filling"]),
            0,
            "{mode}: the spool never started filling\n{}",
            nginx.error_log()
        );
        assert_no_crash(&nginx, &[]);
    }
}

#[test]
fn a_sink_answering_503_or_429_is_spooled_then_replayed_with_the_original_lines() {
    // Wait mode with a retry far away: the replay starts because a later write succeeds.
    // Background mode: new lines go to the spool while it holds lines, so the retry tick
    // replays them.
    // 429 (too many requests) is retried like a 5xx.
    for (status, mode, retry) in [
        (503, "wait", "10m"),
        (429, "wait", "10m"),
        (503, "background", RETRY),
    ] {
        let sink = FakeSink::start();
        let (nginx, port, spool_dir) = sink_nginx(&sink, mode, &format!("spool retry={retry}"));
        sink.set_response(status, r#"{"error":"overloaded"}"#);
        const N: usize = 5;
        for i in 0..N {
            assert_eq!(
                send(port, &format!("{mode}-503-{i}")),
                204,
                "{mode}: spooled"
            );
        }
        assert!(
            wait_until(LOG_WAIT, || spool_lines(&spool_dir) == N),
            "{mode}: the {N} lines are in the spool: {:?}",
            spool_files(&spool_dir)
        );
        let spooled: Vec<String> = nonempty_spool_files(&spool_dir)
            .iter()
            .flat_map(|(p, _)| spool_entries(p))
            .collect();
        // The spool holds exactly the lines of the writes the sink refused (the first
        // write in background mode; later lines may have gone straight to the spool).
        let refused: BTreeSet<String> = written_lines(&sink).into_iter().collect();
        assert!(!refused.is_empty(), "{mode}: the sink was asked");
        for line in &refused {
            assert!(
                spooled.contains(line),
                "{mode}: refused line spooled: {line}"
            );
        }
        if mode == "wait" {
            // A request's access log line is written when nginx frees it, which may come
            // just after the client has its answer.
            let log_path = nginx.prefix().join("logs/beacons.log");
            let spooled_in_log = || {
                fs::read_to_string(&log_path)
                    .unwrap_or_default()
                    .lines()
                    .filter(|l| *l == "204 spooled")
                    .count()
            };
            wait_until(LOG_WAIT, || spooled_in_log() >= N);
            assert_eq!(
                spooled_in_log(),
                N,
                "wait: $analytics_status is `spooled`:\n{}",
                fs::read_to_string(&log_path).unwrap_or_default()
            );
        }

        let before = sink.requests().len();
        sink.set_response(204, "");
        if mode == "wait" {
            // Nothing is replayed before a write succeeds (the retry is 10 minutes away)...
            thread::sleep(Duration::from_millis(1500));
            assert_eq!(sink.requests().len(), before, "wait: no replay yet");
            // ...and a beacon's successful write starts the replay at once.
            assert_eq!(send(port, "wait-trigger"), 204);
        }
        assert!(
            wait_until(DRAIN_BOUND, || {
                let after: Vec<String> = sink.requests()[before..]
                    .iter()
                    .flat_map(|r| {
                        r.body_text()
                            .lines()
                            .map(str::to_string)
                            .collect::<Vec<_>>()
                    })
                    .collect();
                spooled.iter().all(|l| after.contains(l))
            }),
            "{mode}: the spooled lines were replayed"
        );
        assert_spool_drains(&spool_dir, mode);
        thread::sleep(Duration::from_millis(500));
        let after: Vec<String> = sink.requests()[before..]
            .iter()
            .flat_map(|r| {
                r.body_text()
                    .lines()
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .collect();
        for line in &spooled {
            assert_eq!(
                after.iter().filter(|l| *l == line).count(),
                1,
                "{mode}: replayed once, byte for byte (original timestamp): {line}"
            );
        }
        assert!(
            count_in_log(&nginx, &["analytics: spool", "drained"]) > 0,
            "{mode}: the drain is logged\n{}",
            nginx.error_log()
        );
        assert_no_crash(&nginx, &[]);
    }
}

#[test]
fn a_413_is_split_as_before_and_nothing_is_spooled() {
    let sink = FakeSink::start();
    let (nginx, port, spool_dir) = sink_nginx(&sink, "wait", &format!("spool retry={RETRY}"));
    // The first write is held, so the burst gathers in one batch, which gets the 413.
    sink.set_delay(Duration::from_millis(400));
    let first = thread::spawn(move || send(port, "first"));
    assert_eq!(sink.wait_for_requests(1, LOG_WAIT).len(), 1);
    sink.set_delay(Duration::ZERO);
    sink.push_response(413, r#"{"error":"Request Entity Too Large"}"#);
    let burst: Vec<_> = (0..16)
        .map(|i| thread::spawn(move || send(port, &format!("split-{i}"))))
        .collect();
    assert_eq!(first.join().unwrap(), 204);
    for (i, t) in burst.into_iter().enumerate() {
        assert_eq!(t.join().unwrap(), 204, "split-{i}: stored after the split");
    }
    let bodies: Vec<Vec<String>> = sink
        .requests()
        .iter()
        .map(|r| r.body_text().lines().map(line_sess).collect())
        .collect();
    assert!(
        bodies.iter().any(|b| b.len() > 1),
        "the burst was batched: {bodies:?}"
    );
    assert!(
        nonempty_spool_files(&spool_dir).is_empty(),
        "a split that succeeds spools nothing"
    );
    // A single line answered 413 cannot be split: dropped (502), not spooled.
    sink.set_response(413, r#"{"error":"Request Entity Too Large"}"#);
    assert_eq!(send(port, "single-413"), 502);
    thread::sleep(Duration::from_millis(2500));
    assert!(
        nonempty_spool_files(&spool_dir).is_empty(),
        "a 413 is never spooled: {:?}",
        spool_files(&spool_dir)
    );
    assert_eq!(
        count_in_log(&nginx, &["analytics: spool", "started filling"]),
        0,
        "{}",
        nginx.error_log()
    );
    let single = written_lines(&sink)
        .iter()
        .filter(|l| line_sess(l) == "single-413")
        .count();
    assert_eq!(single, 1, "the single line was not retried");
    assert_no_crash(&nginx, &[]);
}

#[test]
fn in_background_mode_a_beacon_finding_no_room_goes_to_the_spool_instead_of_waiting() {
    // Batches of 2 lines and a sink that holds every write for 4 s (less than the write
    // location's proxy_read_timeout, so no write times out): after 4 writes in flight
    // and a full open batch, a beacon would wait for room; with a spool it is answered at once
    // and its line is spooled, then replayed once the sink has answered.
    let sink = FakeSink::start();
    let hold = Duration::from_secs(4);
    sink.set_delay(hold);
    let port = free_port();
    let conf = http_block(
        sink.port(),
        &server(port, "sink", "background", &format!("spool retry={RETRY}")).replace(
            "analytics_write_mode background;",
            "analytics_write_mode background; analytics_batch lines=2 delay=10s;",
        ),
    );
    let nginx = Nginx::start_with(master_on(1), &conf);
    let spool_dir = nginx.prefix().join("spool");
    const N: usize = 20;
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    for i in 0..N {
        let t = Instant::now();
        // The answer, not the end of the connection: a batch's first request stays open
        // until its batch is written.
        let answer = common::post(port, "/collect", &beacon(&format!("room-{i}")));
        assert_eq!(answer.status, 204);
        slowest = slowest.max(t.elapsed());
    }
    let all_sent = started.elapsed();
    let spooled_meanwhile = spool_lines(&spool_dir);
    eprintln!(
        "overflow: {N} beacons answered in {all_sent:?} (slowest {slowest:?}) while the sink \
         held each write {hold:?}; {spooled_meanwhile} line(s) in the spool"
    );
    assert!(
        all_sent < hold,
        "no beacon waited for a write slot: {N} answered in {all_sent:?}, the sink holds \
         writes {hold:?}"
    );
    assert!(
        spooled_meanwhile > 0,
        "the beacons that found no room went to the spool"
    );
    // Everything reaches the sink, once.
    sink.set_delay(Duration::ZERO);
    assert_spool_drains(&spool_dir, "overflow");
    let sessions_written =
        || -> BTreeSet<String> { written_lines(&sink).iter().map(|l| line_sess(l)).collect() };
    wait_until(DRAIN_BOUND, || sessions_written().len() >= N);
    // Writes held when the delay was lifted are answered `hold` after they arrived.
    thread::sleep(hold);
    let mut written: HashMap<String, usize> = HashMap::new();
    for line in written_lines(&sink) {
        *written.entry(line_sess(&line)).or_default() += 1;
    }
    for i in 0..N {
        let sess = format!("room-{i}");
        assert_eq!(
            written.get(&sess),
            Some(&1),
            "{sess} written once: {written:?}"
        );
    }
    assert_no_crash(&nginx, &[]);
}

#[test]
fn analytics_spool_off_turns_an_inherited_spool_off() {
    let sink = FakeSink::start();
    let port = free_port();
    let conf = http_block(
        sink.port(),
        &format!(
            "analytics_spool spool retry={RETRY};\n{}",
            server(port, "sink", "wait", "off")
        ),
    );
    let nginx = Nginx::start_with(master_on(1), &conf);
    sink.set_response(503, r#"{"error":"overloaded"}"#);
    assert_eq!(send(port, "no-spool"), 502, "without a spool, as before");
    assert!(
        nonempty_spool_files(&nginx.prefix().join("spool")).is_empty(),
        "nothing spooled"
    );
    assert_no_crash(&nginx, &[]);
}

#[test]
fn bad_analytics_spool_parameters_are_refused_by_nginx_t() {
    for args in [
        "spool max_size=abc",
        "spool max_size=0",
        "spool retry=0",
        "spool retry=-1s",
        "spool retry=2h",
        "spool size=1m",
        "spool max_size=1m max_size=2m extra",
        "off retry=5s",
    ] {
        let conf = http_block(free_port(), &server(free_port(), "sink", "wait", args));
        let (ok, output) = nginx_test_config_with(master_on(1), &conf);
        assert!(!ok, "analytics_spool {args}: nginx -t must fail:\n{output}");
        assert!(
            output.contains("[emerg]") && output.contains("analytics_spool"),
            "analytics_spool {args}: the [emerg] names the directive:\n{output}"
        );
    }
    for args in [
        "spool",
        "spool max_size=64k retry=500ms",
        "spool retry=2m max_size=1g",
        "off",
    ] {
        let conf = http_block(free_port(), &server(free_port(), "sink", "wait", args));
        let (ok, output) = nginx_test_config_with(master_on(1), &conf);
        assert!(ok, "analytics_spool {args}: accepted:\n{output}");
    }
}
