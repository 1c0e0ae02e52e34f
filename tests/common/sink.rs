//! A loopback HTTP/1.1 server standing in for InfluxDB that records the exact bytes of every
//! request it receives.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::client::{find_header, Conn};
use super::IO_TIMEOUT;

/// How often connection threads wake up to check whether the sink is stopping.
const POLL: Duration = Duration::from_millis(100);

/// One request as received by the [`FakeSink`].
#[derive(Debug, Clone)]
pub struct CapturedRequest {
    pub method: String,
    /// Request target as sent (path + query).
    pub target: String,
    /// e.g. `HTTP/1.1`.
    pub version: String,
    /// Header fields in order, names as sent, values with surrounding whitespace trimmed.
    pub headers: Vec<(String, String)>,
    /// The body; chunked transfer coding removed.
    pub body: Vec<u8>,
    /// Every byte received for this request (request line, headers, body as framed).
    pub raw: Vec<u8>,
    /// Index of the connection it arrived on (0-based, in accept order): equal ids mean the
    /// connection was kept alive and reused.
    pub conn_id: usize,
}

impl CapturedRequest {
    /// The first header field named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }

    /// The body as (lossy) UTF-8 text.
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

#[derive(Clone)]
struct Reply {
    status: u16,
    body: String,
}

struct State {
    requests: Vec<CapturedRequest>,
    default_reply: Reply,
    queued: VecDeque<Reply>,
    delay: Duration,
    /// `127.0.0.1:<port>` to relay requests to (see [`FakeSink::set_forward`]).
    forward: Option<String>,
}

struct Shared {
    state: Mutex<State>,
    cond: Condvar,
    stop: AtomicBool,
    connections: AtomicUsize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking connection thread must not take the whole sink down with it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A fake InfluxDB on `127.0.0.1:<free port>`: one thread per connection, keep-alive,
/// Content-Length and chunked request bodies; answers `204 No Content` unless told otherwise.
/// Dropping it stops it (bounded).
pub struct FakeSink {
    /// Set for sinks that receive arbitrary test traffic rather than the module's writes.
    skip_audit: std::sync::atomic::AtomicBool,
    /// Session ids that must never reach this sink (see [`FakeSink::forbid_sessions`]).
    forbidden_sessions: Mutex<Vec<String>>,
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept_thread: Option<JoinHandle<()>>,
    conn_threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl FakeSink {
    pub fn start() -> FakeSink {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the fake sink");
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                requests: Vec::new(),
                default_reply: Reply {
                    status: 204,
                    body: String::new(),
                },
                queued: VecDeque::new(),
                delay: Duration::ZERO,
                forward: None,
            }),
            cond: Condvar::new(),
            stop: AtomicBool::new(false),
            connections: AtomicUsize::new(0),
        });
        let conn_threads: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let accept_thread = {
            let shared = Arc::clone(&shared);
            let conn_threads = Arc::clone(&conn_threads);
            std::thread::Builder::new()
                .name(format!("fake-sink-{}", addr.port()))
                .spawn(move || accept_loop(listener, shared, conn_threads))
                .expect("spawning the fake sink")
        };
        FakeSink {
            skip_audit: std::sync::atomic::AtomicBool::new(false),
            forbidden_sessions: Mutex::new(Vec::new()),
            addr,
            shared,
            accept_thread: Some(accept_thread),
            conn_threads,
        }
    }

    /// Turns off the privacy audit at drop (for sinks that receive arbitrary test traffic
    /// rather than the module's writes).
    pub fn skip_privacy_audit(&self) {
        self.skip_audit.store(true, Ordering::SeqCst);
    }

    /// Adds session ids to the privacy audit at drop: for an endpoint with
    /// `analytics_session off`, none of them may reach the sink in any form, and no point may
    /// carry `sess` at all (see [`super::privacy::session_violations`]).
    pub fn forbid_sessions<I: IntoIterator<Item = String>>(&self, sess_ids: I) {
        self.forbidden_sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(sess_ids);
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Response for all later requests (after any queued with [`FakeSink::push_response`]).
    /// Status 0 means: close the connection without answering.
    pub fn set_response(&self, status: u16, body: &str) {
        self.shared.lock().default_reply = Reply {
            status,
            body: body.to_string(),
        };
    }

    /// Queues a one-time response, used (in order) before the default one.
    pub fn push_response(&self, status: u16, body: &str) {
        self.shared.lock().queued.push_back(Reply {
            status,
            body: body.to_string(),
        });
    }

    /// Forwarding mode: with `Some("127.0.0.1:<port>")`, each request (still recorded) is relayed
    /// there with the same method, target, Content-Type and body, and answered with the upstream's status and
    /// body, unless a one-time reply queued with [`FakeSink::push_response`] is pending (that one
    /// is answered instead and nothing is relayed). An unreachable upstream is answered with 503.
    /// `None` turns forwarding off.
    pub fn set_forward(&self, addr: Option<&str>) {
        self.shared.lock().forward = addr.map(str::to_string);
    }

    /// Delay between receiving a request (it is recorded at once) and answering it.
    pub fn set_delay(&self, d: Duration) {
        self.shared.lock().delay = d;
    }

    /// All requests received so far, in arrival order.
    pub fn requests(&self) -> Vec<CapturedRequest> {
        self.shared.lock().requests.clone()
    }

    /// Forgets the requests received so far.
    pub fn clear_requests(&self) {
        self.shared.lock().requests.clear();
    }

    /// Waits until at least `n` requests were received or `timeout` passes; returns all
    /// requests received so far (possibly fewer than `n`).
    pub fn wait_for_requests(&self, n: usize, timeout: Duration) -> Vec<CapturedRequest> {
        let deadline = Instant::now() + timeout;
        let mut state = self.shared.lock();
        while state.requests.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            state = self
                .shared
                .cond
                .wait_timeout(state, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        state.requests.clone()
    }

    /// Number of TCP connections accepted so far.
    pub fn connections_accepted(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }
}

impl Drop for FakeSink {
    fn drop(&mut self) {
        if !std::thread::panicking() && !self.skip_audit.load(Ordering::SeqCst) {
            let forbidden = self
                .forbidden_sessions
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            let requests = self.requests();
            let mut leaks: Vec<String> = requests
                .iter()
                .flat_map(super::privacy::violations)
                .collect();
            if !forbidden.is_empty() {
                leaks.extend(
                    requests
                        .iter()
                        .flat_map(|r| super::privacy::session_violations(r, &forbidden)),
                );
            }
            assert!(
                leaks.is_empty(),
                "visitor data reached the sink: {leaks:#?}"
            );
        }
        self.shared.stop.store(true, Ordering::SeqCst);
        // Unblock accept().
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.accept_thread.take() {
            let _ = t.join();
        }
        let threads =
            std::mem::take(&mut *self.conn_threads.lock().unwrap_or_else(|e| e.into_inner()));
        for t in threads {
            let _ = t.join();
        }
    }
}

fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    conn_threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
) {
    for stream in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        let Ok(stream) = stream else {
            continue;
        };
        let conn_id = shared.connections.fetch_add(1, Ordering::SeqCst);
        let shared = Arc::clone(&shared);
        let handle = std::thread::Builder::new()
            .name(format!("fake-sink-conn-{conn_id}"))
            .spawn(move || serve_connection(stream, conn_id, &shared))
            .expect("spawning a fake sink connection thread");
        conn_threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(handle);
    }
}

/// The result of trying to parse one request from the front of a buffer.
enum Parsed {
    Incomplete { expects_continue: bool },
    Complete(CapturedRequest, usize),
    Malformed(String),
}

fn parse_request(buf: &[u8], conn_id: usize) -> Parsed {
    let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Parsed::Incomplete {
            expects_continue: false,
        };
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or("");
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Parsed::Malformed(format!("bad request line {request_line:?}"));
    };
    let mut headers = Vec::new();
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Parsed::Malformed(format!("bad header line {line:?}"));
        };
        headers.push((name.to_string(), value.trim().to_string()));
    }
    let body_start = head_end + 4;
    let chunked = find_header(&headers, "transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().trim_end().ends_with("chunked"));
    let (body, end) = if chunked {
        match decode_chunked(&buf[body_start..]) {
            Ok(Some((body, used))) => (body, body_start + used),
            Ok(None) => {
                return Parsed::Incomplete {
                    expects_continue: expects_continue(&headers),
                }
            }
            Err(e) => return Parsed::Malformed(e),
        }
    } else if let Some(len) = find_header(&headers, "content-length") {
        let Ok(len) = len.parse::<usize>() else {
            return Parsed::Malformed(format!("bad Content-Length {len:?}"));
        };
        if buf.len() < body_start + len {
            return Parsed::Incomplete {
                expects_continue: expects_continue(&headers),
            };
        }
        (buf[body_start..body_start + len].to_vec(), body_start + len)
    } else {
        (Vec::new(), body_start)
    };
    let request = CapturedRequest {
        method: method.to_string(),
        target: target.to_string(),
        version: version.to_string(),
        headers,
        body,
        raw: buf[..end].to_vec(),
        conn_id,
    };
    Parsed::Complete(request, end)
}

fn expects_continue(headers: &[(String, String)]) -> bool {
    find_header(headers, "expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue"))
}

/// Decodes a chunked body at the start of `data`: `Ok(None)` if incomplete, else the body and
/// the number of bytes used (through the trailer section's final CRLF).
fn decode_chunked(data: &[u8]) -> Result<Option<(Vec<u8>, usize)>, String> {
    let mut body = Vec::new();
    let mut pos = 0;
    loop {
        let Some(eol) = data[pos..].windows(2).position(|w| w == b"\r\n") else {
            return Ok(None);
        };
        let line = String::from_utf8_lossy(&data[pos..pos + eol]).into_owned();
        let size_hex = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_hex, 16)
            .map_err(|_| format!("bad chunk size line {line:?}"))?;
        pos += eol + 2;
        if size == 0 {
            // Trailer fields, then an empty line.
            loop {
                let Some(eol) = data[pos..].windows(2).position(|w| w == b"\r\n") else {
                    return Ok(None);
                };
                pos += eol + 2;
                if eol == 0 {
                    return Ok(Some((body, pos)));
                }
            }
        }
        if data.len() < pos + size + 2 {
            return Ok(None);
        }
        body.extend_from_slice(&data[pos..pos + size]);
        if &data[pos + size..pos + size + 2] != b"\r\n" {
            return Err("chunk data not followed by CRLF".to_string());
        }
        pos += size + 2;
    }
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        408 => "Request Timeout",
        413 => "Request Entity Too Large",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Unknown",
    }
}

fn render_response(reply: &Reply, close: bool) -> Vec<u8> {
    let status = reply.status;
    let mut out = format!("HTTP/1.1 {status} {}\r\n", reason_phrase(status));
    // Like InfluxDB: no Content-Length (and no body) on 204/304/1xx; a body set for one of
    // those is sent anyway, as a misbehaving proxy in front of the sink might.
    let bodyless =
        (status == 204 || status == 304 || (100..200).contains(&status)) && reply.body.is_empty();
    if !bodyless {
        out.push_str(&format!("Content-Length: {}\r\n", reply.body.len()));
        if !reply.body.is_empty() {
            out.push_str("Content-Type: application/json\r\n");
        }
    }
    if close {
        out.push_str("Connection: close\r\n");
    }
    out.push_str("\r\n");
    if !bodyless {
        out.push_str(&reply.body);
    }
    out.into_bytes()
}

fn wants_close(req: &CapturedRequest) -> bool {
    let conn = req
        .header("connection")
        .map(str::to_ascii_lowercase)
        .unwrap_or_default();
    if req.version == "HTTP/1.0" {
        !conn.contains("keep-alive")
    } else {
        conn.contains("close")
    }
}

/// Sends `req` to `addr` (`127.0.0.1:<port>`) on a new connection; the upstream's answer, or 503
/// when it cannot be reached.
fn relay(addr: &str, req: &CapturedRequest) -> Reply {
    let port = addr
        .rsplit(':')
        .next()
        .and_then(|p| p.parse::<u16>().ok())
        .unwrap_or_else(|| panic!("fake sink: bad forward address {addr:?}"));
    let Ok(mut conn) = Conn::connect(port, IO_TIMEOUT) else {
        return Reply {
            status: 503,
            body: format!("{{\"error\":\"fake sink: cannot reach {addr}\"}}"),
        };
    };
    let content_type = req
        .header("content-type")
        .map(|t| format!("Content-Type: {t}\r\n"))
        .unwrap_or_default();
    let mut bytes = format!(
        "{} {} HTTP/1.1\r\nHost: {addr}\r\n{content_type}Content-Length: {}\r\n\
         Connection: close\r\n\r\n",
        req.method,
        req.target,
        req.body.len()
    )
    .into_bytes();
    bytes.extend_from_slice(&req.body);
    let response = conn.request(&bytes);
    Reply {
        status: response.status,
        body: response.body_text(),
    }
}

fn serve_connection(mut stream: TcpStream, conn_id: usize, shared: &Shared) {
    if stream.set_read_timeout(Some(POLL)).is_err()
        || stream.set_write_timeout(Some(IO_TIMEOUT)).is_err()
    {
        return;
    }
    let _ = stream.set_nodelay(true);
    let mut buf: Vec<u8> = Vec::new();
    let mut sent_continue = false;
    let mut tmp = [0u8; 16384];
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        match parse_request(&buf, conn_id) {
            Parsed::Complete(request, used) => {
                buf.drain(..used);
                sent_continue = false;
                let close = wants_close(&request);
                let (reply, delay, forward) = {
                    let mut state = shared.lock();
                    state.requests.push(request.clone());
                    shared.cond.notify_all();
                    match state.queued.pop_front() {
                        Some(reply) => (reply, state.delay, None),
                        None => (
                            state.default_reply.clone(),
                            state.delay,
                            state.forward.clone(),
                        ),
                    }
                };
                let reply = match forward {
                    Some(addr) => relay(&addr, &request),
                    None => reply,
                };
                let deadline = Instant::now() + delay;
                while Instant::now() < deadline {
                    if shared.stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let left = deadline.saturating_duration_since(Instant::now());
                    std::thread::sleep(left.min(Duration::from_millis(20)));
                }
                if reply.status == 0 {
                    let _ = stream.shutdown(Shutdown::Both);
                    return;
                }
                if stream.write_all(&render_response(&reply, close)).is_err() || close {
                    let _ = stream.shutdown(Shutdown::Both);
                    return;
                }
                continue;
            }
            Parsed::Malformed(why) => {
                let reply = Reply {
                    status: 400,
                    body: format!("{{\"error\":\"fake sink: {}\"}}", why.replace('"', "'")),
                };
                let _ = stream.write_all(&render_response(&reply, true));
                let _ = stream.shutdown(Shutdown::Both);
                return;
            }
            Parsed::Incomplete { expects_continue } => {
                if expects_continue && !sent_continue {
                    sent_continue = true;
                    if stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").is_err() {
                        return;
                    }
                }
            }
        }
        match stream.read(&mut tmp) {
            Ok(0) => return,
            Ok(n) => buf.extend_from_slice(&tmp[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(_) => return,
        }
    }
}
