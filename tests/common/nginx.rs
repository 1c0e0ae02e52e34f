//! Starting the nginx binary built with the crate, with the analytics module loaded, in a
//! private prefix directory.

use std::fmt::Write as _;
use std::fs::{self, File};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{is_root, send_signal, wait_until, TestDir, SIGHUP, SIGKILL, SIGQUIT, SIGTERM};

/// File name of the module built by `cargo build` / `cargo test`.
pub const MODULE_FILE_NAME: &str = "libngx_http_analytics_module.so";

/// 1-based line of the generated `nginx.conf` on which the `http_block` text starts: line `k`
/// (0-based) of `http_block` is line `HTTP_BLOCK_FIRST_LINE + k` of the file, so tests can
/// assert `nginx.conf:<line>` in `[emerg]` messages.
pub const HTTP_BLOCK_FIRST_LINE: usize = 16;

/// How long to wait for nginx to come up, for its ports to accept, and for it to exit.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Main-context settings of the generated configuration.
#[derive(Debug, Clone)]
pub struct NginxOptions {
    /// `master_process on|off;` (default off: a single process).
    pub master_process: bool,
    /// `worker_processes N;` (default 1; only meaningful with `master_process`).
    pub worker_processes: u32,
    /// Extra main-context lines. They are placed after the `http {}` block, so they cannot
    /// shift line numbers inside it (nginx accepts main directives anywhere in main context).
    pub main_extra: String,
    /// Whether to put `load_module <module_path()>;` on line 1 (default true).
    pub load_module: bool,
}

impl Default for NginxOptions {
    fn default() -> Self {
        NginxOptions {
            master_process: false,
            worker_processes: 1,
            main_extra: String::new(),
            load_module: true,
        }
    }
}

/// The nginx binary built alongside the module (`$NGX_ANALYTICS_NGINX_BUILD_DIR/nginx`, set by
/// build.rs at compile time; otherwise found under `target/<profile>/build/nginx-sys-*/out/objs`).
pub fn nginx_binary() -> PathBuf {
    if let Some(dir) = option_env!("NGX_ANALYTICS_NGINX_BUILD_DIR") {
        let bin = Path::new(dir).join("nginx");
        assert!(
            bin.is_file(),
            "nginx binary {} (from NGX_ANALYTICS_NGINX_BUILD_DIR at compile time) is missing; \
             run `cargo build` first",
            bin.display()
        );
        return bin;
    }
    // Fallback: <target>/<profile>/build/nginx-sys-*/out/objs/nginx, newest first.
    let profile_dir = deps_dir().parent().map(Path::to_path_buf);
    let mut found: Vec<(std::time::SystemTime, PathBuf)> = Vec::new();
    if let Some(build) = profile_dir.map(|d| d.join("build")) {
        for entry in fs::read_dir(&build).into_iter().flatten().flatten() {
            if !entry
                .file_name()
                .to_string_lossy()
                .starts_with("nginx-sys-")
            {
                continue;
            }
            let bin = entry.path().join("out/objs/nginx");
            if let Ok(meta) = fs::metadata(&bin) {
                if meta.is_file() {
                    found.push((meta.modified().unwrap_or(std::time::UNIX_EPOCH), bin));
                }
            }
        }
    }
    found.sort();
    match found.pop() {
        Some((_, bin)) => bin,
        None => panic!(
            "nginx binary not found: NGX_ANALYTICS_NGINX_BUILD_DIR was not set at compile time \
             and there is no target/<profile>/build/nginx-sys-*/out/objs/nginx; \
             run `cargo build` first"
        ),
    }
}

/// `target/<profile>/deps`, where the test binary lives.
fn deps_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent()
        .expect("test binary has a parent directory")
        .to_path_buf()
}

/// Absolute path of `libngx_http_analytics_module.so`: next to the test binary
/// (`target/<profile>/deps/`), else in its parent (`target/<profile>/`).
pub fn module_path() -> PathBuf {
    let deps = deps_dir();
    let mut candidates = vec![deps.join(MODULE_FILE_NAME)];
    if let Some(parent) = deps.parent() {
        candidates.push(parent.join(MODULE_FILE_NAME));
    }
    for c in &candidates {
        if c.is_file() {
            return fs::canonicalize(c).unwrap_or_else(|_| c.clone());
        }
    }
    panic!(
        "module {MODULE_FILE_NAME} not found (looked at {candidates:?}); `cargo test` should \
         build it (crate-type cdylib) — does the crate compile?"
    );
}

/// The complete nginx.conf text for `prefix` (which ends without a slash).
fn render_config(prefix: &Path, opts: &NginxOptions, http_block: &str) -> String {
    let p = prefix.display();
    let mut c = String::new();
    // Line 1.
    if opts.load_module {
        writeln!(c, "load_module {};", module_path().display()).unwrap();
    } else {
        c.push_str("# load_module: not loaded\n");
    }
    // Lines 2-8.
    c.push_str("daemon off;\n");
    let mp = if opts.master_process { "on" } else { "off" };
    writeln!(c, "master_process {mp};").unwrap();
    writeln!(c, "worker_processes {};", opts.worker_processes).unwrap();
    if opts.master_process && is_root() {
        // Workers keep running as root, so they can write anywhere in the prefix.
        c.push_str("user root;\n");
    } else {
        c.push_str("# user: default\n");
    }
    writeln!(c, "error_log {p}/logs/error.log info;").unwrap();
    writeln!(c, "pid {p}/logs/nginx.pid;").unwrap();
    c.push_str("events { worker_connections 1024; }\n");
    // Lines 9-15.
    c.push_str("http {\n");
    writeln!(c, "access_log {p}/logs/access.log;").unwrap();
    writeln!(c, "client_body_temp_path {p}/client_body_temp;").unwrap();
    writeln!(c, "proxy_temp_path {p}/proxy_temp;").unwrap();
    writeln!(c, "fastcgi_temp_path {p}/fastcgi_temp;").unwrap();
    writeln!(c, "uwsgi_temp_path {p}/uwsgi_temp;").unwrap();
    writeln!(c, "scgi_temp_path {p}/scgi_temp;").unwrap();
    debug_assert_eq!(c.lines().count() + 1, HTTP_BLOCK_FIRST_LINE);
    c.push_str(http_block);
    c.push_str("\n}\n");
    c.push_str(&opts.main_extra);
    c.push('\n');
    c
}

/// Ports of every `listen 127.0.0.1:<port>` in `conf`.
pub fn listen_ports(conf: &str) -> Vec<u16> {
    let mut ports = Vec::new();
    let mut rest = conf;
    while let Some(i) = rest.find("listen") {
        let after = &rest[i + "listen".len()..];
        let preceded_ok = match rest[..i].chars().next_back() {
            None => true,
            Some(ch) => ch.is_whitespace() || ch == '{' || ch == ';',
        };
        let trimmed = after.trim_start();
        if preceded_ok && trimmed.len() < after.len() {
            if let Some(port) = trimmed.strip_prefix("127.0.0.1:") {
                let digits: String = port.chars().take_while(char::is_ascii_digit).collect();
                if let Ok(p) = digits.parse::<u16>() {
                    if !ports.contains(&p) {
                        ports.push(p);
                    }
                }
            }
        }
        rest = after;
    }
    ports
}

fn port_accepts(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok()
}

fn read_lossy(path: &Path) -> String {
    fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// A running nginx (single process or master + workers) in a private prefix directory.
/// Dropping it stops nginx (SIGTERM, then SIGKILL after 10 s) and removes the prefix unless
/// `NGX_ANALYTICS_KEEP_TEST_DIRS` is set.
pub struct Nginx {
    child: Option<Child>,
    pid: u32,
    opts: NginxOptions,
    // Declared last: removed after the process has been stopped.
    dir: TestDir,
}

impl Nginx {
    /// Single-process nginx (`master_process off`) with `http_block` inside `http {}`.
    pub fn start(http_block: &str) -> Nginx {
        Nginx::start_with(NginxOptions::default(), http_block)
    }

    /// nginx with the given main-context options. Waits until the pid file exists and every
    /// `listen 127.0.0.1:<port>` of `http_block` accepts connections (and, with a master, until
    /// all workers are up); panics with the error log if nginx exits or times out first.
    pub fn start_with(opts: NginxOptions, http_block: &str) -> Nginx {
        let binary = nginx_binary();
        let dir = TestDir::new("nginx");
        let prefix = dir.path().to_path_buf();
        fs::create_dir_all(prefix.join("logs")).expect("creating <prefix>/logs");
        let conf_path = prefix.join("nginx.conf");
        fs::write(&conf_path, render_config(&prefix, &opts, http_block))
            .expect("writing nginx.conf");
        let out = File::create(prefix.join("logs/stderr.log")).expect("creating stderr.log");
        let err = out.try_clone().expect("dup stderr.log");
        let child = Command::new(&binary)
            .arg("-p")
            .arg(format!("{}/", prefix.display()))
            .arg("-c")
            .arg(&conf_path)
            .arg("-e")
            .arg(prefix.join("logs/error.log"))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", binary.display()));
        let mut nginx = Nginx {
            pid: child.id(),
            child: Some(child),
            opts,
            dir,
        };
        nginx.wait_ready(&listen_ports(http_block), "start");
        nginx
    }

    fn wait_ready(&mut self, ports: &[u16], what: &str) {
        let deadline = Instant::now() + START_TIMEOUT;
        let pid_file = self.prefix().join("logs/nginx.pid");
        let mut pending: Vec<u16> = ports.to_vec();
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                panic!(
                    "nginx exited during {what} ({status})\n{}",
                    self.diagnostics()
                );
            }
            let workers_ok = !self.opts.master_process
                || self.worker_pids().len() >= self.opts.worker_processes as usize;
            if pid_file.exists() && workers_ok {
                pending.retain(|&p| !port_accepts(p));
                if pending.is_empty() {
                    return;
                }
            }
            if Instant::now() >= deadline {
                panic!(
                    "nginx not ready after {START_TIMEOUT:?} during {what} (pid file exists: {}, \
                     ports not accepting: {pending:?})\n{}",
                    pid_file.exists(),
                    self.diagnostics()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn diagnostics(&self) -> String {
        format!(
            "--- nginx.conf ---\n{}\n--- stderr ---\n{}\n--- error.log ---\n{}",
            read_lossy(&self.prefix().join("nginx.conf")),
            read_lossy(&self.prefix().join("logs/stderr.log")),
            self.error_log()
        )
    }

    /// The prefix directory (holds nginx.conf and logs/).
    pub fn prefix(&self) -> &Path {
        self.dir.path()
    }

    /// The options nginx was started with.
    pub fn options(&self) -> &NginxOptions {
        &self.opts
    }

    /// Pid of the master (or of the single process).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Contents of `<prefix>/logs/error.log` (lossy UTF-8; empty if missing).
    pub fn error_log(&self) -> String {
        read_lossy(&self.prefix().join("logs/error.log"))
    }

    /// Contents of `<prefix>/logs/access.log`.
    pub fn access_log(&self) -> String {
        read_lossy(&self.prefix().join("logs/access.log"))
    }

    /// Asserts that the error log shows no crash: no `[alert]`, `[crit]`, `[emerg]`, worker
    /// exit on a signal, or Rust panic.
    pub fn assert_no_crash_in_log(&self) {
        let log = self.error_log();
        for bad in [
            "[alert]",
            "[crit]",
            "[emerg]",
            "exited on signal",
            "panicked",
        ] {
            assert!(!log.contains(bad), "{bad} in the error log:\n{log}");
        }
    }

    /// Polls the error log until it contains `needle` or `timeout` passes.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        wait_until(timeout, || self.error_log().contains(needle))
    }

    /// Worker pids: the master's children running "nginx: worker process" (not those "shutting
    /// down" after a reload), or the single process's pid when `master_process` is off.
    pub fn worker_pids(&self) -> Vec<u32> {
        if !self.opts.master_process {
            return vec![self.pid];
        }
        let mut pids = Vec::new();
        for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            // "pid (comm) state ppid ...": comm may contain spaces and parentheses.
            let Some(after_comm) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
                continue;
            };
            let ppid = after_comm
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok());
            if ppid != Some(self.pid) {
                continue;
            }
            let cmdline = fs::read(format!("/proc/{pid}/cmdline"))
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default();
            if cmdline.contains("worker process") && !cmdline.contains("shutting down") {
                pids.push(pid);
            }
        }
        pids.sort_unstable();
        pids
    }

    /// Rewrites nginx.conf with a new `http_block` (same options), e.g. before [`Nginx::reload`].
    pub fn write_config(&self, http_block: &str) {
        fs::write(
            self.prefix().join("nginx.conf"),
            render_config(self.prefix(), &self.opts, http_block),
        )
        .expect("rewriting nginx.conf");
    }

    /// Sends SIGHUP and waits (bounded) until nginx logged "reconfiguring" (panics if not
    /// within 10 s). With a master it then waits, without panicking, for the new workers (a
    /// configuration that fails to load leaves the old workers running; check the error log):
    /// until [`Nginx::worker_pids`] lists `worker_processes` pids, all new,
    /// and finally for the `listen 127.0.0.1:<port>`s of the current nginx.conf.
    pub fn reload(&self) {
        let count = |needle: &str| self.error_log().matches(needle).count();
        let reconf = count("reconfiguring");
        let started = count("start worker processes");
        let emerg = count("[emerg]");
        let old_workers = self.worker_pids();
        assert!(
            send_signal(self.pid, SIGHUP),
            "cannot send SIGHUP to nginx {}",
            self.pid
        );
        assert!(
            wait_until(START_TIMEOUT, || count("reconfiguring") > reconf),
            "nginx did not log \"reconfiguring\" within {START_TIMEOUT:?} after SIGHUP\n{}",
            self.error_log()
        );
        if self.opts.master_process {
            let ok = wait_until(START_TIMEOUT, || {
                count("start worker processes") > started || count("[emerg]") > emerg
            });
            if ok && count("[emerg]") == emerg {
                // New workers only count once they have set their title; old ones are excluded
                // once they are "shutting down" or gone.
                let n = self.opts.worker_processes as usize;
                wait_until(START_TIMEOUT, || {
                    let now = self.worker_pids();
                    now.len() == n && now.iter().all(|p| !old_workers.contains(p))
                });
            }
        }
        let conf = read_lossy(&self.prefix().join("nginx.conf"));
        let ports = listen_ports(&conf);
        wait_until(START_TIMEOUT, || ports.iter().all(|&p| port_accepts(p)));
    }

    /// Sends `sig` to the master (or single process).
    pub fn signal(&self, sig: i32) -> bool {
        send_signal(self.pid, sig)
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Starts nginx again in the same prefix with the current nginx.conf after [`Nginx::stop`]
    /// or [`Nginx::quit`] (a full restart: a new master and new workers; files the old ones
    /// left in the prefix stay). Output is appended to `logs/stderr.log`. Waits like
    /// [`Nginx::start_with`]; panics if nginx is still running or does not come up.
    pub fn start_again(&mut self) {
        assert!(
            !self.is_running(),
            "Nginx::start_again: nginx {} is still running (call stop() first)",
            self.pid
        );
        let binary = nginx_binary();
        let prefix = self.prefix().to_path_buf();
        let out = fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(prefix.join("logs/stderr.log"))
            .expect("opening stderr.log");
        let err = out.try_clone().expect("dup stderr.log");
        // The old pid file is removed by nginx at exit; a stale one would make wait_ready think
        // the new master is up before it is.
        let _ = fs::remove_file(prefix.join("logs/nginx.pid"));
        let child = Command::new(&binary)
            .arg("-p")
            .arg(format!("{}/", prefix.display()))
            .arg("-c")
            .arg(prefix.join("nginx.conf"))
            .arg("-e")
            .arg(prefix.join("logs/error.log"))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", binary.display()));
        self.pid = child.id();
        self.child = Some(child);
        let ports = listen_ports(&read_lossy(&prefix.join("nginx.conf")));
        self.wait_ready(&ports, "restart");
    }

    /// Fast shutdown: SIGTERM, wait ≤ 10 s, then SIGKILL (workers too). Idempotent.
    pub fn stop(&mut self) {
        self.terminate(SIGTERM);
    }

    /// Graceful shutdown: SIGQUIT (workers finish their requests), wait ≤ 10 s, then SIGKILL.
    pub fn quit(&mut self) {
        self.terminate(SIGQUIT);
    }

    fn terminate(&mut self, sig: i32) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        let workers = if self.opts.master_process {
            self.worker_pids()
        } else {
            vec![]
        };
        send_signal(self.pid, sig);
        let exited = wait_until(START_TIMEOUT, || matches!(child.try_wait(), Ok(Some(_))));
        if !exited {
            eprintln!(
                "nginx {} did not exit within {START_TIMEOUT:?}; killing it",
                self.pid
            );
            for w in workers {
                send_signal(w, SIGKILL);
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            let log = self.error_log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            eprintln!(
                "--- last lines of nginx error.log ({}) ---\n{}",
                self.prefix().display(),
                tail.join("\n")
            );
        }
    }
}

/// Writes a configuration like [`Nginx::start`] would (default options, module loaded) and runs
/// `nginx -t`; returns (success, stdout + stderr), e.g. `nginx: [emerg] ... in <path>:<line>`
/// (see [`HTTP_BLOCK_FIRST_LINE`]).
pub fn nginx_test_config(http_block: &str) -> (bool, String) {
    nginx_test_config_with(NginxOptions::default(), http_block)
}

/// [`nginx_test_config`] with options.
pub fn nginx_test_config_with(opts: NginxOptions, http_block: &str) -> (bool, String) {
    let binary = nginx_binary();
    let dir = TestDir::new("nginx-t");
    let prefix = dir.path();
    fs::create_dir_all(prefix.join("logs")).expect("creating <prefix>/logs");
    let conf_path = prefix.join("nginx.conf");
    fs::write(&conf_path, render_config(prefix, &opts, http_block)).expect("writing nginx.conf");
    let out_path = prefix.join("logs/stderr.log");
    let out = File::create(&out_path).expect("creating stderr.log");
    let err = out.try_clone().expect("dup stderr.log");
    let mut child = Command::new(&binary)
        .arg("-t")
        .arg("-p")
        .arg(format!("{}/", prefix.display()))
        .arg("-c")
        .arg(&conf_path)
        .arg("-e")
        .arg(prefix.join("logs/error.log"))
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", binary.display()));
    let timeout = Duration::from_secs(30);
    let mut status = None;
    wait_until(timeout, || {
        status = child.try_wait().expect("waiting for nginx -t");
        status.is_some()
    });
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("nginx -t did not finish within {timeout:?}");
    };
    (status.success(), read_lossy(&out_path))
}
