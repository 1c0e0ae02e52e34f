//! A minimal raw HTTP/1.1 client over `TcpStream`, so tests can send exactly the bytes they want
//! and see exactly what came back.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use super::IO_TIMEOUT;

/// A parsed HTTP response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub reason: String,
    /// Header fields in the order received, names as sent.
    pub headers: Vec<(String, String)>,
    /// The body, with chunked transfer coding removed.
    pub body: Vec<u8>,
}

impl Response {
    /// The first header field named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }

    /// The body as (lossy) UTF-8 text.
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

pub(crate) fn find_header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// One client connection to `127.0.0.1:<port>`. Every read and write times out after 10 s.
pub struct Conn {
    stream: TcpStream,
    /// Bytes received but not yet consumed by a response.
    buf: Vec<u8>,
    /// Methods of requests sent whose responses were not read yet (to know when a response has
    /// no body, as for `HEAD`).
    pending_methods: VecDeque<String>,
    eof: bool,
}

impl Conn {
    /// Connects to `127.0.0.1:<port>`; panics if that fails within 10 s.
    pub fn open(port: u16) -> Conn {
        Conn::connect(port, IO_TIMEOUT)
            .unwrap_or_else(|e| panic!("cannot connect to 127.0.0.1:{port}: {e}"))
    }

    /// Connects to `127.0.0.1:<port>` within `timeout` (capped at 10 s).
    pub fn connect(port: u16, timeout: Duration) -> std::io::Result<Conn> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let stream = TcpStream::connect_timeout(&addr, timeout.min(IO_TIMEOUT))?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            stream,
            buf: Vec::new(),
            pending_methods: VecDeque::new(),
            eof: false,
        })
    }

    /// The underlying stream (e.g. to shut down the write side).
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// Writes all of `bytes`; panics on error. Request methods are sniffed from the bytes so
    /// that the response to a `HEAD` request is read without a body.
    pub fn send(&mut self, bytes: &[u8]) {
        self.note_methods(bytes);
        self.stream
            .write_all(bytes)
            .and_then(|_| self.stream.flush())
            .unwrap_or_else(|e| panic!("sending {} bytes failed: {e}", bytes.len()));
    }

    /// Like [`Conn::send`] but returns write errors (e.g. when the peer already closed).
    pub fn try_send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.note_methods(bytes);
        self.stream.write_all(bytes)?;
        self.stream.flush()
    }

    fn note_methods(&mut self, bytes: &[u8]) {
        // Good enough for tests: requests start at the beginning of a send() and follow each
        // other (pipelining) with Content-Length bodies; stop at anything else.
        let mut s = 0;
        while s < bytes.len() {
            let rest = &bytes[s..];
            let end = rest.iter().position(|&b| b == b' ').unwrap_or(0);
            let method = &rest[..end];
            if method.is_empty() || !method.iter().all(|b| b.is_ascii_uppercase()) {
                return;
            }
            self.pending_methods
                .push_back(String::from_utf8_lossy(method).into_owned());
            let Some(head_end) = rest.windows(4).position(|w| w == b"\r\n\r\n") else {
                return;
            };
            let head = String::from_utf8_lossy(&rest[..head_end]).to_ascii_lowercase();
            if head.contains("\r\ntransfer-encoding:") {
                return;
            }
            let body_len = head
                .split("\r\n")
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            s += head_end + 4 + body_len;
        }
    }

    fn fill(&mut self) -> bool {
        if self.eof {
            return false;
        }
        let mut tmp = [0u8; 16384];
        match self.stream.read(&mut tmp) {
            Ok(0) => {
                self.eof = true;
                false
            }
            Ok(n) => {
                self.buf.extend_from_slice(&tmp[..n]);
                true
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => true,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!(
                    "timed out ({IO_TIMEOUT:?}) reading a response; received so far: {:?}",
                    String::from_utf8_lossy(&self.buf)
                )
            }
            Err(e) => {
                // A reset counts as the end of the stream.
                self.eof = true;
                if e.kind() != ErrorKind::ConnectionReset {
                    panic!("reading a response failed: {e}");
                }
                false
            }
        }
    }

    fn read_line(&mut self) -> Option<Vec<u8>> {
        loop {
            if let Some(p) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = self.buf[..p].to_vec();
                self.buf.drain(..p + 2);
                return Some(line);
            }
            if !self.fill() {
                return None;
            }
        }
    }

    fn read_exact_n(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            if !self.fill() {
                panic!(
                    "connection closed after {} of {n} body bytes",
                    self.buf.len()
                );
            }
        }
        self.buf.drain(..n).collect()
    }

    /// Reads one response. Skips `1xx` interim responses. No body for `204`, `304`, `1xx` and
    /// responses to `HEAD`; otherwise the body is delimited by chunked coding, Content-Length,
    /// or the closing of the connection. Panics on a timeout or a malformed response.
    pub fn read_response(&mut self) -> Response {
        loop {
            let status_line = match self.read_line() {
                Some(l) => String::from_utf8_lossy(&l).into_owned(),
                None => panic!(
                    "connection closed before a response (received: {:?})",
                    String::from_utf8_lossy(&self.buf)
                ),
            };
            let mut parts = status_line.splitn(3, ' ');
            let version = parts.next().unwrap_or("");
            assert!(
                version.starts_with("HTTP/"),
                "bad status line {status_line:?}"
            );
            let status: u16 = parts
                .next()
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
            let reason = parts.next().unwrap_or("").to_string();
            let mut headers = Vec::new();
            loop {
                let line = self
                    .read_line()
                    .unwrap_or_else(|| panic!("connection closed inside response headers"));
                if line.is_empty() {
                    break;
                }
                let line = String::from_utf8_lossy(&line).into_owned();
                let (name, value) = line
                    .split_once(':')
                    .unwrap_or_else(|| panic!("bad header line {line:?}"));
                headers.push((name.trim().to_string(), value.trim().to_string()));
            }
            if (100..200).contains(&status) {
                continue;
            }
            let method = self.pending_methods.pop_front().unwrap_or_default();
            let no_body = status == 204 || status == 304 || method == "HEAD";
            let body = if no_body {
                Vec::new()
            } else if find_header(&headers, "transfer-encoding")
                .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
            {
                self.read_chunked()
            } else if let Some(len) = find_header(&headers, "content-length") {
                let len: usize = len
                    .parse()
                    .unwrap_or_else(|_| panic!("bad Content-Length {len:?}"));
                self.read_exact_n(len)
            } else {
                while self.fill() {}
                std::mem::take(&mut self.buf)
            };
            return Response {
                status,
                reason,
                headers,
                body,
            };
        }
    }

    fn read_chunked(&mut self) -> Vec<u8> {
        let mut body = Vec::new();
        loop {
            let line = self
                .read_line()
                .unwrap_or_else(|| panic!("connection closed inside a chunk size line"));
            let line = String::from_utf8_lossy(&line).into_owned();
            let size_hex = line.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size_hex, 16)
                .unwrap_or_else(|_| panic!("bad chunk size line {line:?}"));
            if size == 0 {
                // Trailer fields up to the blank line.
                while let Some(l) = self.read_line() {
                    if l.is_empty() {
                        break;
                    }
                }
                return body;
            }
            body.extend(self.read_exact_n(size));
            let crlf = self.read_exact_n(2);
            assert_eq!(crlf, b"\r\n", "chunk data not followed by CRLF");
        }
    }

    /// Sends `req` and reads one response.
    pub fn request(&mut self, req: &[u8]) -> Response {
        self.send(req);
        self.read_response()
    }

    /// Whether the peer closes (or resets) the connection within `wait`. Data that arrives
    /// instead is kept for the next `read_response`, and counts as "not closed".
    pub fn is_closed_by_peer(&mut self, wait: Duration) -> bool {
        if self.eof {
            return true;
        }
        let deadline = Instant::now() + wait.min(IO_TIMEOUT);
        let mut tmp = [0u8; 16384];
        let result = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break false;
            }
            self.stream.set_read_timeout(Some(left)).unwrap();
            match self.stream.read(&mut tmp) {
                Ok(0) => {
                    self.eof = true;
                    break true;
                }
                Ok(n) => {
                    self.buf.extend_from_slice(&tmp[..n]);
                    break false;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    break false;
                }
                Err(_) => {
                    self.eof = true;
                    break true;
                }
            }
        };
        self.stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        result
    }
}

/// `POST <path>` with `Host: www.example.com`, `Content-Type: text/plain;charset=UTF-8` (what
/// `navigator.sendBeacon` sends for a string), Content-Length and `Connection: close`.
pub fn post(port: u16, path: &str, body: &[u8]) -> Response {
    post_with_headers(port, path, "www.example.com", &[], body)
}

/// Like [`post`] with another Host and extra header fields (sent after the standard ones; an
/// extra `Content-Type` replaces the default one).
pub fn post_with_headers(
    port: u16,
    path: &str,
    host: &str,
    extra_headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    let mut req = format!("POST {path} HTTP/1.1\r\nHost: {host}\r\n");
    if !extra_headers
        .iter()
        .any(|(n, _)| n.eq_ignore_ascii_case("content-type"))
    {
        req.push_str("Content-Type: text/plain;charset=UTF-8\r\n");
    }
    for (name, value) in extra_headers {
        req.push_str(&format!("{name}: {value}\r\n"));
    }
    req.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    ));
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    Conn::open(port).request(&bytes)
}

/// Any method; Content-Length only when there is a body; `Connection: close`.
pub fn request(port: u16, method: &str, path: &str, host: &str, body: Option<&[u8]>) -> Response {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\n");
    if let Some(body) = body {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("Connection: close\r\n\r\n");
    let mut bytes = req.into_bytes();
    if let Some(body) = body {
        bytes.extend_from_slice(body);
    }
    Conn::open(port).request(&bytes)
}

/// `POST <path>` with `Transfer-Encoding: chunked`, one chunk per element of `chunks` (empty
/// elements are skipped, as a zero-size chunk would end the body), sent in separate writes.
pub fn post_chunked(port: u16, path: &str, chunks: &[&[u8]]) -> Response {
    let mut conn = Conn::open(port);
    conn.send(
        format!(
            "POST {path} HTTP/1.1\r\nHost: www.example.com\r\n\
             Content-Type: text/plain;charset=UTF-8\r\nTransfer-Encoding: chunked\r\n\
             Connection: close\r\n\r\n"
        )
        .as_bytes(),
    );
    for chunk in chunks.iter().filter(|c| !c.is_empty()) {
        let mut bytes = format!("{:x}\r\n", chunk.len()).into_bytes();
        bytes.extend_from_slice(chunk);
        bytes.extend_from_slice(b"\r\n");
        conn.stream.write_all(&bytes).expect("sending a chunk");
    }
    conn.stream
        .write_all(b"0\r\n\r\n")
        .expect("sending the last chunk");
    conn.read_response()
}

/// The outcome of one request sent by [`try_post`].
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Status(u16),
    /// The connection failed, was reset or closed without an answer (nginx restarting, a
    /// worker killed with the request on it).
    ConnError(String),
}

/// `POST <path>` of `body` on a fresh connection, without panicking on connection errors (for
/// clients that keep sending while nginx or a worker is disrupted).
pub fn try_post(port: u16, path: &str, body: &[u8]) -> Outcome {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
        Ok(s) => s,
        Err(e) => return Outcome::ConnError(format!("connect: {e}")),
    };
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nHost: www.example.com\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    if let Err(e) = stream.write_all(&req) {
        return Outcome::ConnError(format!("write: {e}"));
    }
    let mut answer = Vec::new();
    match stream.read_to_end(&mut answer) {
        Ok(_) => {}
        Err(e) if answer.is_empty() => return Outcome::ConnError(format!("read: {e}")),
        Err(_) => {}
    }
    let text = String::from_utf8_lossy(&answer);
    match text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|s| s.parse().ok())
    {
        Some(status) => Outcome::Status(status),
        None => Outcome::ConnError(format!("no answer ({} bytes)", answer.len())),
    }
}
