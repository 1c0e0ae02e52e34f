//! Shared integration-test harness: a real nginx with the module loaded ([`Nginx`]), a fake
//! InfluxDB that records every request byte ([`FakeSink`]), a real InfluxDB 1.x ([`Influx`]) and a
//! raw HTTP/1.1 client ([`Conn`], [`post`], ...).
//!
//! Everything listens and connects on 127.0.0.1 only; every socket operation has a timeout of at
//! most 10 s and every wait loop is bounded. Missing prerequisites (nginx binary, module, influxd)
//! make tests panic with a clear message, never skip.
//!
//! Set `NGX_ANALYTICS_KEEP_TEST_DIRS=1` to keep the nginx prefixes and InfluxDB directories of
//! finished tests (their paths are printed).
#![allow(dead_code)]
#![allow(unused_imports)]

pub mod client;
pub mod influx;
pub mod nginx;
pub mod points;
pub mod privacy;
pub mod sink;
pub mod webdriver;

pub use client::{
    post, post_chunked, post_with_headers, request, try_post, Conn, Outcome, Response,
};
pub use influx::Influx;
pub use nginx::{
    module_path, nginx_binary, nginx_test_config, nginx_test_config_with, Nginx, NginxOptions,
    HTTP_BLOCK_FIRST_LINE,
};
pub use sink::{CapturedRequest, FakeSink};

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Upper bound for every socket read or write.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Environment variable: when set, test directories are kept (and their paths printed).
pub const KEEP_DIRS_ENV: &str = "NGX_ANALYTICS_KEEP_TEST_DIRS";

/// A currently free TCP port on 127.0.0.1 (bound to port 0, read back, released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding 127.0.0.1:0 to find a free port")
}

/// Percent-encodes everything except RFC 3986 unreserved characters (for query strings and
/// form bodies).
pub fn urlencode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A fresh directory under the system temp dir, removed on drop unless
/// `NGX_ANALYTICS_KEEP_TEST_DIRS` is set (then its path is printed).
pub struct TestDir {
    path: PathBuf,
}

impl TestDir {
    pub fn new(tag: &str) -> TestDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        for _ in 0..100 {
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0);
            let path = std::env::temp_dir().join(format!(
                "ngx-analytics-{tag}-{}-{}-{nanos:x}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed)
            ));
            match std::fs::create_dir(&path) {
                Ok(()) => return TestDir { path },
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => panic!("cannot create test directory {}: {e}", path.display()),
            }
        }
        panic!(
            "cannot create a unique test directory under {:?}",
            std::env::temp_dir()
        );
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::env::var_os(KEEP_DIRS_ENV).is_some() {
            eprintln!("keeping test directory {}", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

extern "C" {
    // From the C library std already links; avoids a `libc` dependency.
    #[link_name = "kill"]
    fn c_kill(pid: i32, sig: i32) -> i32;
    #[link_name = "geteuid"]
    fn c_geteuid() -> u32;
}

pub const SIGHUP: i32 = 1;
pub const SIGQUIT: i32 = 3;
pub const SIGKILL: i32 = 9;
pub const SIGUSR1: i32 = 10;
pub const SIGTERM: i32 = 15;

/// Sends `sig` to process `pid`; returns whether it was delivered.
pub fn send_signal(pid: u32, sig: i32) -> bool {
    let pid = i32::try_from(pid).expect("pid fits in pid_t");
    assert!(pid > 0, "refusing to signal pid {pid}");
    // SAFETY: kill(2) takes plain integers and has no memory-safety preconditions.
    unsafe { c_kill(pid, sig) == 0 }
}

/// Whether this process runs with effective uid 0.
pub fn is_root() -> bool {
    // SAFETY: geteuid(2) takes no arguments and always succeeds.
    unsafe { c_geteuid() == 0 }
}

/// Polls `f` every 20 ms until it returns true or `timeout` passes; returns the last result.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The internal location the module writes to, set up as in nginx-conf/nginx.conf: proxying to
/// `target` (URL with path and query), no client header forwarded, keepalive to the upstream,
/// and `read_timeout` for the sink's answer.
pub fn write_location(target: &str, read_timeout: &str) -> String {
    format!(
        r#"    location = /_analytics/write {{
        internal;
        proxy_pass {target};
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_pass_request_headers off;
        proxy_ignore_client_abort on;
        proxy_connect_timeout 2s;
        proxy_read_timeout {read_timeout};
    }}"#
    )
}

/// The internal location reports query through, set up as in nginx-conf/nginx.conf: InfluxDB's
/// `/query` at `target` (URL with path and query), the statement sent as a form body.
pub fn query_location(target: &str) -> String {
    format!(
        r#"    location = /_analytics/query {{
        internal;
        proxy_pass {target};
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_pass_request_headers off;
        proxy_set_header Content-Type application/x-www-form-urlencoded;
        proxy_connect_timeout 2s;
        proxy_read_timeout 10s;
    }}"#
    )
}

/// The test runner of the test targets built with `harness = false` (those that compile the
/// nginx-free core from its sources, since the module's library cannot be linked without
/// nginx): runs the tests whose names contain a command-line filter (all without one), each
/// catching its panic, and prints libtest's summary line; exits 1 when one failed.
pub fn run_tests(tests: &[(&str, fn())]) {
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let selected: Vec<_> = tests
        .iter()
        .filter(|(name, _)| filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str())))
        .collect();
    println!("\nrunning {} tests", selected.len());
    let (mut passed, mut failed) = (0, Vec::new());
    for (name, test) in &selected {
        let outcome = std::panic::catch_unwind(test);
        println!(
            "test {name} ... {}",
            if outcome.is_ok() { "ok" } else { "FAILED" }
        );
        match outcome {
            Ok(()) => passed += 1,
            Err(_) => failed.push(*name),
        }
    }
    if !failed.is_empty() {
        println!("\nfailures:\n    {}", failed.join("\n    "));
    }
    println!(
        "\ntest result: {}. {passed} passed; {} failed; 0 ignored; 0 measured; {} filtered out\n",
        if failed.is_empty() { "ok" } else { "FAILED" },
        failed.len(),
        tests.len() - selected.len()
    );
    if !failed.is_empty() {
        std::process::exit(1);
    }
}
