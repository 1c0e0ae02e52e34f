//! A real InfluxDB 1.x (`influxd`) in a temporary directory on free loopback ports.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Map, Value};

use super::client::{post_with_headers, request, Response};
use super::{free_port, urlencode, TestDir};

/// Where Debian installs InfluxDB 1.x; `NGX_ANALYTICS_INFLUXD` overrides it at run time.
pub const INFLUXD: &str = "/usr/bin/influxd";

const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A running `influxd`. Dropping it kills the process and removes its directory (unless
/// `NGX_ANALYTICS_KEEP_TEST_DIRS` is set).
pub struct Influx {
    child: Option<Child>,
    http_port: u16,
    // Declared last: removed after the process has been killed.
    dir: TestDir,
}

/// Quotes an InfluxQL identifier.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('\\', "\\\\").replace('"', "\\\""))
}

fn influxd_binary() -> PathBuf {
    let bin = std::env::var_os("NGX_ANALYTICS_INFLUXD")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(INFLUXD));
    assert!(
        bin.is_file(),
        "InfluxDB server {} is missing: install InfluxDB 1.x (Debian package `influxdb`) \
         or set NGX_ANALYTICS_INFLUXD",
        bin.display()
    );
    bin
}

fn config(dir: &Path, rpc_port: u16, http_port: u16, data_settings: &str) -> String {
    let d = dir.display();
    format!(
        r#"reporting-disabled = true
bind-address = "127.0.0.1:{rpc_port}"

[meta]
  dir = "{d}/meta"
  retention-autocreate = true
  logging-enabled = false

[data]
  dir = "{d}/data"
  wal-dir = "{d}/wal"
  wal-fsync-delay = "0s"
  index-version = "inmem"
  query-log-enabled = false
  trace-logging-enabled = false
{data_settings}

[coordinator]
  log-queries-after = "0s"

[retention]
  enabled = false

[shard-precreation]
  enabled = false

[monitor]
  store-enabled = false

[subscriber]
  enabled = false

[http]
  enabled = true
  bind-address = "127.0.0.1:{http_port}"
  auth-enabled = false
  log-enabled = false
  suppress-write-log = true
  pprof-enabled = false
  unix-socket-enabled = false

[ifql]
  enabled = false

[logging]
  level = "warn"
  suppress-logo = true

[continuous_queries]
  enabled = false
  log-enabled = false
"#
    )
}

/// `GET /ping` status, or None if nothing answers.
fn ping(port: u16) -> Option<u16> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.set_write_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"GET /ping HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut head = Vec::new();
    s.take(64 * 1024).read_to_end(&mut head).ok()?;
    let text = String::from_utf8_lossy(&head);
    text.split(' ').nth(1)?.parse().ok()
}

impl Influx {
    /// Starts `influxd` and waits (≤ 30 s) until `GET /ping` answers 204. Panics with the
    /// server's log if it is missing, exits, or does not come up.
    pub fn start() -> Influx {
        Influx::start_with("")
    }

    /// [`Influx::start`] with extra lines for the `[data]` section of its configuration, e.g.
    /// `max-values-per-tag = 1000`.
    pub fn start_with(data_settings: &str) -> Influx {
        let bin = influxd_binary();
        let deadline = Instant::now() + START_TIMEOUT;
        let mut attempt = 1;
        loop {
            match Influx::try_start(&bin, deadline, data_settings) {
                Ok(influx) => return influx,
                // A port was taken between free_port() and influxd binding it: retry.
                Err(e) if attempt < 3 && e.contains("address already in use") => attempt += 1,
                Err(e) => panic!("{e}"),
            }
        }
    }

    fn try_start(bin: &Path, deadline: Instant, data_settings: &str) -> Result<Influx, String> {
        let dir = TestDir::new("influx");
        let log_path = dir.path().join("influxd.log");
        let conf_path = dir.path().join("influxdb.conf");
        let rpc_port = free_port();
        let mut http_port = free_port();
        while http_port == rpc_port {
            http_port = free_port();
        }
        fs::write(
            &conf_path,
            config(dir.path(), rpc_port, http_port, data_settings),
        )
        .expect("writing influxdb.conf");
        let log = File::create(&log_path).expect("creating influxd.log");
        let log2 = log.try_clone().expect("dup influxd.log");
        let child = Command::new(bin)
            .arg("-config")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
        let mut influx = Influx {
            child: Some(child),
            http_port,
            dir,
        };
        loop {
            if ping(http_port) == Some(204) {
                return Ok(influx);
            }
            let exited = influx
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                influx.child = None;
                return Err(format!(
                    "influxd exited during start-up ({status}); its log:\n{}",
                    influx.log()
                ));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "influxd did not answer GET /ping with 204 within {START_TIMEOUT:?}; \
                     its log:\n{}",
                    influx.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The HTTP API port.
    pub fn port(&self) -> u16 {
        self.http_port
    }

    /// `127.0.0.1:<port>` of the HTTP API.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.http_port)
    }

    /// The temporary directory holding the configuration, data and `influxd.log`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server's combined stdout/stderr so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("influxd.log")).unwrap_or_default()
    }

    /// `POST /query` with `q=CREATE DATABASE "<db>"`; panics unless it succeeds.
    pub fn create_database(&self, db: &str) {
        let q = format!("CREATE DATABASE {}", quote_ident(db));
        let body = format!("q={}", urlencode(&q));
        let resp = post_with_headers(
            self.http_port,
            "/query",
            "127.0.0.1",
            &[("Content-Type", "application/x-www-form-urlencoded")],
            body.as_bytes(),
        );
        assert_eq!(resp.status, 200, "{q} failed: {}", resp.body_text());
        let json: Value = serde_json::from_slice(&resp.body)
            .unwrap_or_else(|e| panic!("{q}: bad JSON {:?}: {e}", resp.body_text()));
        assert!(
            json["results"][0].get("error").is_none(),
            "{q} failed: {json}"
        );
    }

    /// `POST /write?db=<db>` with line-protocol `lines` (nanosecond precision).
    pub fn write_lines(&self, db: &str, lines: &str) -> Response {
        let path = format!("/write?db={}", urlencode(db));
        post_with_headers(self.http_port, &path, "127.0.0.1", &[], lines.as_bytes())
    }

    /// `GET /query?db=<db>&q=<influxql>&epoch=ns`; the raw JSON. Panics unless the status is 200.
    pub fn query(&self, db: &str, influxql: &str) -> Value {
        let path = format!(
            "/query?db={}&q={}&epoch=ns",
            urlencode(db),
            urlencode(influxql)
        );
        let resp = request(self.http_port, "GET", &path, "127.0.0.1", None);
        assert_eq!(
            resp.status,
            200,
            "query {influxql:?} on {db:?} failed: {}",
            resp.body_text()
        );
        serde_json::from_slice(&resp.body)
            .unwrap_or_else(|e| panic!("query {influxql:?}: bad JSON {:?}: {e}", resp.body_text()))
    }

    /// The rows of the first statement's result, all series flattened: each row maps column
    /// name to value, plus the series' tags (from GROUP BY) as string values. Panics if the
    /// statement returned an error; empty if there are no series.
    pub fn rows(&self, db: &str, influxql: &str) -> Vec<Map<String, Value>> {
        let json = self.query(db, influxql);
        let result = &json["results"][0];
        if let Some(err) = result.get("error").or_else(|| json.get("error")) {
            panic!("query {influxql:?} on {db:?} failed: {err}");
        }
        let mut rows = Vec::new();
        for series in result["series"].as_array().into_iter().flatten() {
            let columns: Vec<&str> = series["columns"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|c| c.as_str().unwrap_or_default())
                .collect();
            let tags = series["tags"].as_object();
            for values in series["values"].as_array().into_iter().flatten() {
                let mut row = Map::new();
                if let Some(tags) = tags {
                    row.extend(tags.iter().map(|(k, v)| (k.clone(), v.clone())));
                }
                for (col, val) in columns.iter().zip(values.as_array().into_iter().flatten()) {
                    row.insert((*col).to_string(), val.clone());
                }
                rows.push(row);
            }
        }
        rows
    }

    /// Number of points in `measurement` (rows of `SELECT * FROM "<measurement>"`, so every
    /// point counts whatever its fields); 0 when it does not exist.
    pub fn count_points(&self, db: &str, measurement: &str) -> usize {
        self.rows(db, &format!("SELECT * FROM {}", quote_ident(measurement)))
            .len()
    }

    /// Starts `influxd` again after [`Influx::stop`] with the same configuration: the same
    /// loopback ports and the same data, WAL and meta directories (an outage and a return, not a
    /// new server); its output is appended to `influxd.log`. Waits (≤ 30 s) until `GET /ping`
    /// answers 204; panics with the server's log if it exits or does not come up. Panics if the
    /// server is still running.
    pub fn restart(&mut self) {
        assert!(
            self.child.is_none(),
            "Influx::restart: influxd is still running (call stop() first)"
        );
        let bin = influxd_binary();
        let log_path = self.dir.path().join("influxd.log");
        let conf_path = self.dir.path().join("influxdb.conf");
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let log_before = fs::metadata(&log_path).map(|m| m.len()).unwrap_or(0) as usize;
            let log = fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(&log_path)
                .expect("opening influxd.log");
            let log2 = log.try_clone().expect("dup influxd.log");
            let child = Command::new(&bin)
                .arg("-config")
                .arg(&conf_path)
                .stdin(Stdio::null())
                .stdout(log)
                .stderr(log2)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
            self.child = Some(child);
            let exited = loop {
                if ping(self.http_port) == Some(204) {
                    return;
                }
                if let Some(status) = self
                    .child
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten())
                {
                    self.child = None;
                    break status;
                }
                if Instant::now() >= deadline {
                    panic!(
                        "influxd did not answer GET /ping with 204 within {START_TIMEOUT:?} \
                         after a restart; its log:\n{}",
                        self.log()
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            // While it was down, another process may have taken one of its ports (as the
            // local port of an outgoing connection, for instance). The RPC port (backups) may
            // change; the HTTP port is the point of a restart, so wait for it to be free.
            let log = self.log();
            let new_output = log.get(log_before..).unwrap_or_default();
            if new_output.contains("address already in use") && Instant::now() < deadline {
                let conf = fs::read_to_string(&conf_path).expect("reading influxdb.conf");
                let rpc = conf
                    .lines()
                    .find_map(|l| l.strip_prefix("bind-address = \"127.0.0.1:"))
                    .and_then(|rest| rest.strip_suffix('"'))
                    .map(str::to_string);
                if let Some(rpc) = rpc.filter(|p| new_output.contains(&format!(":{p}:"))) {
                    let mut port = free_port();
                    while port == self.http_port {
                        port = free_port();
                    }
                    let conf = conf.replacen(
                        &format!("bind-address = \"127.0.0.1:{rpc}\""),
                        &format!("bind-address = \"127.0.0.1:{port}\""),
                        1,
                    );
                    fs::write(&conf_path, conf).expect("rewriting influxdb.conf");
                } else {
                    std::thread::sleep(Duration::from_millis(200));
                }
                continue;
            }
            panic!(
                "influxd exited while restarting on port {} ({exited}); its log:\n{log}",
                self.http_port
            );
        }
    }

    /// Whether the server process is running (started and not stopped).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Kills the server now (to test "InfluxDB down"); idempotent.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Influx {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            let log = self.log();
            if !log.is_empty() {
                eprintln!("--- influxd log ({}) ---\n{log}", self.dir.path().display());
            }
        }
    }
}
