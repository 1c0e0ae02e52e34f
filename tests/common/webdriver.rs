//! A minimal W3C WebDriver client for Debian's headless Chromium, driven through `chromedriver`
//! over plain HTTP on loopback (no extra crates: [`super::client`] + `serde_json`).
//!
//! [`Browser::start`] runs `/usr/bin/chromedriver` on a free port, opens a session with
//! `/usr/bin/chromium` in a private profile, and dropping the [`Browser`] deletes the session and
//! ends chromedriver and every browser process of that profile (by pid). A missing chromium or
//! chromedriver makes the test panic, never skip.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::client::{post_with_headers, request, Conn, Response};
use super::{free_port, send_signal, wait_until, TestDir, SIGKILL};

pub const CHROMIUM: &str = "/usr/bin/chromium";
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// W3C key of an element reference.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

const START_TIMEOUT: Duration = Duration::from_secs(20);

/// How the browser is started.
#[derive(Debug, Clone, Default)]
pub struct BrowserOptions {
    /// Host names resolved to 127.0.0.1 (`--host-resolver-rules=MAP <name> 127.0.0.1`).
    pub hosts: Vec<String>,
    /// Chromium preferences (`goog:chromeOptions.prefs`), e.g. `{"enable_do_not_track": true}`.
    pub prefs: Option<Value>,
    /// Extra command-line switches.
    pub extra_args: Vec<String>,
    /// Extra environment of chromedriver and the browser, e.g. `TZ`.
    pub env: Vec<(String, String)>,
}

/// One browser log entry (`goog:loggingPrefs` `browser: ALL`).
#[derive(Debug, Clone)]
pub struct LogEntry {
    /// `SEVERE`, `WARNING`, `INFO`, ...
    pub level: String,
    /// `javascript`, `console-api`, `network`, ...
    pub source: String,
    pub message: String,
}

/// A chromedriver process with one Chromium session.
pub struct Browser {
    driver: Option<Child>,
    port: u16,
    session: Option<String>,
    profile: PathBuf,
    // Declared last: removed after the processes have ended.
    dir: TestDir,
}

fn require_file(path: &str, package: &str) {
    assert!(
        Path::new(path).is_file(),
        "{path} is missing: the browser tests need Debian's `{package}` package \
         (apt-get install chromium chromium-driver, or `make deps`)"
    );
}

/// Parses a WebDriver answer: its `value`, or a panic with the WebDriver error.
fn value_of(what: &str, response: &Response) -> Value {
    let json: Value = serde_json::from_slice(&response.body).unwrap_or_else(|e| {
        panic!(
            "WebDriver {what}: status {} with a body that is not JSON ({e}): {}",
            response.status,
            response.body_text()
        )
    });
    let value = json.get("value").cloned().unwrap_or(Value::Null);
    if response.status != 200 {
        panic!(
            "WebDriver {what} failed with {}: {} {}",
            response.status,
            value["error"].as_str().unwrap_or("?"),
            value["message"].as_str().unwrap_or_default()
        );
    }
    value
}

impl Browser {
    /// Starts chromedriver and a headless Chromium session; panics (with chromedriver's log)
    /// if either is missing or does not come up within 20 s.
    pub fn start(opts: BrowserOptions) -> Browser {
        require_file(CHROMIUM, "chromium");
        require_file(CHROMEDRIVER, "chromium-driver");
        let dir = TestDir::new("browser");
        let profile = dir.path().join("profile");
        fs::create_dir_all(&profile).expect("creating the browser profile directory");
        let port = free_port();
        let log_path = dir.path().join("chromedriver.log");
        let out = File::create(dir.path().join("chromedriver.out")).expect("chromedriver.out");
        let err = out.try_clone().expect("dup chromedriver.out");
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .arg(format!("--log-path={}", log_path.display()))
            .envs(opts.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {CHROMEDRIVER}: {e}"));
        let mut browser = Browser {
            driver: Some(driver),
            port,
            session: None,
            profile,
            dir,
        };
        browser.wait_for_driver();
        browser.new_session(&opts);
        browser
    }

    fn wait_for_driver(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self
                .driver
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.driver = None;
                panic!(
                    "chromedriver exited during start-up ({status}):\n{}",
                    self.driver_log()
                );
            }
            if let Ok(mut conn) = Conn::connect(self.port, Duration::from_millis(500)) {
                let resp = conn.request(
                    b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
                );
                let ready = serde_json::from_slice::<Value>(&resp.body)
                    .ok()
                    .and_then(|v| v["value"]["ready"].as_bool());
                if ready == Some(true) {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "chromedriver did not report ready on /status within {START_TIMEOUT:?}:\n{}",
                self.driver_log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn new_session(&mut self, opts: &BrowserOptions) {
        let mut args: Vec<String> = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-quic",
            "--no-first-run",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--no-proxy-server",
            "--disable-features=HttpsUpgrades,Translate,MediaRouter",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.push(format!("--user-data-dir={}", self.profile.display()));
        if !opts.hosts.is_empty() {
            let rules: Vec<String> = opts
                .hosts
                .iter()
                .map(|h| format!("MAP {h} 127.0.0.1"))
                .collect();
            args.push(format!("--host-resolver-rules={}", rules.join(", ")));
        }
        args.extend(opts.extra_args.iter().cloned());
        let mut chrome_options = json!({ "binary": CHROMIUM, "args": args });
        if let Some(prefs) = &opts.prefs {
            chrome_options["prefs"] = prefs.clone();
        }
        let caps = json!({
            "capabilities": {
                "alwaysMatch": {
                    "browserName": "chrome",
                    "pageLoadStrategy": "normal",
                    "goog:chromeOptions": chrome_options,
                    "goog:loggingPrefs": { "browser": "ALL" },
                    "timeouts": { "pageLoad": 15000, "script": 10000, "implicit": 0 }
                }
            }
        });
        let resp = post_with_headers(
            self.port,
            "/session",
            "127.0.0.1",
            &[("Content-Type", "application/json")],
            caps.to_string().as_bytes(),
        );
        let json: Value = serde_json::from_slice(&resp.body).unwrap_or(Value::Null);
        match json["value"]["sessionId"].as_str() {
            Some(id) if resp.status == 200 => self.session = Some(id.to_string()),
            _ => panic!(
                "cannot start {CHROMIUM} through chromedriver ({}): {}\n{}",
                resp.status,
                resp.body_text(),
                self.driver_log()
            ),
        }
    }

    fn driver_log(&self) -> String {
        let mut text =
            fs::read_to_string(self.dir.path().join("chromedriver.out")).unwrap_or_default();
        let log = fs::read_to_string(self.dir.path().join("chromedriver.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        text.push_str(&lines[lines.len().saturating_sub(40)..].join("\n"));
        text
    }

    fn session_path(&self, tail: &str) -> String {
        let id = self.session.as_deref().expect("no WebDriver session");
        format!("/session/{id}{tail}")
    }

    /// `POST /session/{id}<tail>` with a JSON body; the answer's `value`.
    pub fn post(&self, tail: &str, body: Value) -> Value {
        let path = self.session_path(tail);
        let resp = post_with_headers(
            self.port,
            &path,
            "127.0.0.1",
            &[("Content-Type", "application/json")],
            body.to_string().as_bytes(),
        );
        value_of(&format!("POST {tail}"), &resp)
    }

    /// `GET /session/{id}<tail>`; the answer's `value`.
    pub fn get(&self, tail: &str) -> Value {
        let resp = request(
            self.port,
            "GET",
            &self.session_path(tail),
            "127.0.0.1",
            None,
        );
        value_of(&format!("GET {tail}"), &resp)
    }

    /// Navigates and waits for the page's load event (page load strategy `normal`).
    pub fn goto(&self, url: &str) {
        self.post("/url", json!({ "url": url }));
    }

    /// The current top-level URL.
    pub fn url(&self) -> String {
        self.get("/url").as_str().unwrap_or_default().to_string()
    }

    /// Runs `script` (a function body; `arguments` holds `args`) in the page; its return value.
    pub fn execute(&self, script: &str, args: Value) -> Value {
        self.post("/execute/sync", json!({ "script": script, "args": args }))
    }

    /// Runs `script` in the page and waits (bounded by the script timeout, 10 s) until it calls
    /// its last argument (`arguments[arguments.length - 1]`) with the result.
    pub fn execute_async(&self, script: &str, args: Value) -> Value {
        self.post("/execute/async", json!({ "script": script, "args": args }))
    }

    /// The element matching the CSS selector (panics if none).
    pub fn find(&self, css: &str) -> String {
        let value = self.post("/element", json!({ "using": "css selector", "value": css }));
        value[ELEMENT_KEY]
            .as_str()
            .unwrap_or_else(|| panic!("no element id for {css:?}: {value}"))
            .to_string()
    }

    /// Clicks the element matching the CSS selector, as a user would.
    pub fn click(&self, css: &str) {
        let id = self.find(css);
        self.post(&format!("/element/{id}/click"), json!({}));
    }

    /// Waits (≤ `timeout`) until the top-level document's URL starts with `prefix` and it has
    /// finished loading; panics otherwise.
    pub fn wait_for_page(&self, prefix: &str, timeout: Duration) {
        let mut last = String::new();
        let ok = wait_until(timeout, || {
            // A navigation in progress can make a script fail; just try again.
            let resp = post_with_headers(
                self.port,
                &self.session_path("/execute/sync"),
                "127.0.0.1",
                &[("Content-Type", "application/json")],
                json!({
                    "script": "return [location.href, document.readyState]",
                    "args": []
                })
                .to_string()
                .as_bytes(),
            );
            let json: Value = serde_json::from_slice(&resp.body).unwrap_or(Value::Null);
            last = json["value"].to_string();
            resp.status == 200
                && json["value"][0]
                    .as_str()
                    .is_some_and(|u| u.starts_with(prefix))
                && json["value"][1] == "complete"
        });
        assert!(
            ok,
            "the page {prefix} was not loaded within {timeout:?} (last seen: {last})"
        );
    }

    /// Sets the window's outer size in CSS pixels (in headless mode, the viewport's size).
    pub fn set_window_size(&self, width: u32, height: u32) {
        self.post("/window/rect", json!({ "width": width, "height": height }));
    }

    /// A PNG screenshot of the viewport.
    pub fn screenshot_png(&self) -> Vec<u8> {
        use base64::Engine;
        let data = self.get("/screenshot");
        base64::engine::general_purpose::STANDARD
            .decode(data.as_str().expect("base64 screenshot data"))
            .expect("the screenshot is base64")
    }

    /// Runs Chrome DevTools Protocol command `cmd` (chromedriver's `goog/cdp/execute`), e.g.
    /// `Emulation.setEmulatedMedia`; its result.
    pub fn cdp(&self, cmd: &str, params: Value) -> Value {
        self.post("/goog/cdp/execute", json!({ "cmd": cmd, "params": params }))
    }

    /// The browser log entries since the last call (chromedriver clears them when read).
    pub fn log(&self) -> Vec<LogEntry> {
        let path = self.session_path("/se/log");
        let resp = post_with_headers(
            self.port,
            &path,
            "127.0.0.1",
            &[("Content-Type", "application/json")],
            br#"{"type":"browser"}"#,
        );
        let value = value_of("POST /se/log", &resp);
        value
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| LogEntry {
                level: e["level"].as_str().unwrap_or_default().to_string(),
                source: e["source"].as_str().unwrap_or_default().to_string(),
                message: e["message"].as_str().unwrap_or_default().to_string(),
            })
            .collect()
    }

    /// Ends the session, chromedriver and every process using this browser's profile.
    pub fn quit(&mut self) {
        if let Some(id) = self.session.take() {
            if let Ok(mut conn) = Conn::connect(self.port, Duration::from_secs(1)) {
                let _ = conn.try_send(
                    format!(
                        "DELETE /session/{id} HTTP/1.1\r\nHost: 127.0.0.1\r\n\
                         Connection: close\r\n\r\n"
                    )
                    .as_bytes(),
                );
                // Chromedriver answers once the browser has exited.
                let _ = conn.is_closed_by_peer(Duration::from_secs(10));
            }
        }
        if let Some(mut driver) = self.driver.take() {
            let _ = driver.kill();
            let _ = driver.wait();
        }
        // Leftover browser processes of this profile (started by this chromedriver).
        let marker = format!("--user-data-dir={}", self.profile.display());
        let mut leftovers = profile_processes(&marker);
        for &pid in &leftovers {
            send_signal(pid, SIGKILL);
        }
        wait_until(Duration::from_secs(5), || {
            leftovers.retain(|pid| Path::new(&format!("/proc/{pid}")).exists() && !is_zombie(*pid));
            leftovers.is_empty()
        });
    }
}

/// Pids of the processes whose command line contains `marker`.
fn profile_processes(marker: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let cmdline = fs::read(format!("/proc/{pid}/cmdline"))
            .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
            .unwrap_or_default();
        if cmdline.contains(marker) {
            pids.push(pid);
        }
    }
    pids
}

fn is_zombie(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rfind(')')
                .map(|i| s[i + 1..].trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

impl Drop for Browser {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- chromedriver log ({}) ---\n{}",
                self.dir.path().display(),
                self.driver_log()
            );
        }
        self.quit();
    }
}
