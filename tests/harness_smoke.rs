//! Exercises the shared test harness itself (nginx with the module loaded but no analytics
//! directives, the fake sink, a real InfluxDB, the raw client).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;

#[test]
fn nginx_proxies_to_fake_sink() {
    let sink = FakeSink::start();
    sink.skip_privacy_audit(); // arbitrary test traffic, not the module's writes
    let port = free_port();
    let nginx = Nginx::start(&format!(
        r#"
    server {{
        listen 127.0.0.1:{port};
        location /w {{ proxy_pass http://{sink}/write?db=x; }}
        location /ok {{ return 204; }}
    }}"#,
        sink = sink.addr()
    ));

    let resp = request(port, "GET", "/ok", "www.example.com", None);
    assert_eq!(resp.status, 204);
    assert!(resp.body.is_empty());

    let resp = post(port, "/w", b"m,t=a v=1i 1\n");
    assert_eq!(resp.status, 204, "{}", nginx.error_log());
    let reqs = sink.wait_for_requests(1, Duration::from_secs(5));
    assert_eq!(reqs.len(), 1);
    let r = &reqs[0];
    assert_eq!(r.method, "POST");
    assert_eq!(r.target, "/write?db=x");
    assert_eq!(r.body, b"m,t=a v=1i 1\n");
    assert_eq!(r.header("content-length"), Some("13"));
    assert_eq!(r.header("CONTENT-TYPE"), Some("text/plain;charset=UTF-8"));
    assert!(r.raw.starts_with(b"POST /write?db=x HTTP/1.0\r\n"));
    assert!(r.raw.ends_with(b"\r\n\r\nm,t=a v=1i 1\n"));
    assert_eq!(sink.connections_accepted(), 1);

    // Error responses from the sink are passed through; bodies come back.
    sink.set_response(400, r#"{"error":"bad"}"#);
    let resp = post(port, "/w", b"x");
    assert_eq!(resp.status, 400);
    assert_eq!(resp.body_text(), r#"{"error":"bad"}"#);
    assert_eq!(resp.header("content-type"), Some("application/json"));

    // Chunked request bodies: nginx buffers and forwards them with Content-Length.
    sink.set_response(204, "");
    let resp = post_chunked(port, "/w", &[b"ab", b"", b"cd\n"]);
    assert_eq!(resp.status, 204);
    let reqs = sink.wait_for_requests(3, Duration::from_secs(5));
    assert_eq!(reqs[2].body, b"abcd\n");

    assert_eq!(nginx.worker_pids(), vec![nginx.pid()]);
    assert!(nginx.wait_for_log("using the \"epoll\" event method", Duration::from_secs(1)));
}

#[test]
fn fake_sink_keep_alive_chunked_and_delay() {
    let sink = FakeSink::start();
    sink.skip_privacy_audit(); // arbitrary test traffic, not the module's writes
    let mut conn = Conn::open(sink.port());
    // Two requests on one connection, the second chunked, sent in one write (pipelined).
    conn.send(
        b"POST /write?db=a&precision=ns HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc\
          POST /write?db=b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
          2\r\nde\r\n1;ext=1\r\nf\r\n0\r\n\r\n",
    );
    assert_eq!(conn.read_response().status, 204);
    assert_eq!(conn.read_response().status, 204);
    let reqs = sink.wait_for_requests(2, Duration::from_secs(5));
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[0].target, "/write?db=a&precision=ns");
    assert_eq!(reqs[0].body, b"abc");
    assert_eq!(reqs[1].body, b"def");
    assert!(reqs[1]
        .raw
        .ends_with(b"2\r\nde\r\n1;ext=1\r\nf\r\n0\r\n\r\n"));
    assert_eq!(reqs[0].conn_id, reqs[1].conn_id);
    assert_eq!(reqs[1].headers[0], ("Host".to_string(), "x".to_string()));

    sink.set_delay(Duration::from_millis(300));
    sink.push_response(500, "{\"error\":\"once\"}");
    let t = Instant::now();
    let resp = conn.request(b"POST /write HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n");
    assert!(t.elapsed() >= Duration::from_millis(300));
    assert_eq!(resp.status, 500);
    assert_eq!(resp.reason, "Internal Server Error");
    assert_eq!(resp.body_text(), "{\"error\":\"once\"}");
    sink.set_delay(Duration::ZERO);
    let resp = conn.request(b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert_eq!(resp.status, 204);
    assert!(conn.is_closed_by_peer(Duration::from_secs(2)));
    assert_eq!(sink.connections_accepted(), 1);

    // Status 0: the connection is closed without an answer.
    sink.set_response(0, "");
    let mut conn = Conn::open(sink.port());
    conn.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(conn.is_closed_by_peer(Duration::from_secs(2)));
    assert_eq!(sink.requests().len(), 5);
}

#[test]
fn influx_write_and_query() {
    let t = Instant::now();
    let influx = Influx::start();
    eprintln!("influxd started in {:?}", t.elapsed());
    influx.create_database("x");
    assert_eq!(influx.count_points("x", "m"), 0);

    let body = b"m,t=a v=1i 1\n";
    let mut s = TcpStream::connect(influx.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "POST /write?db=x HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(body).unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 204 "), "{answer}");

    assert_eq!(influx.count_points("x", "m"), 1);
    let rows = influx.rows("x", "SELECT * FROM m");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["t"], "a");
    assert_eq!(rows[0]["v"], 1);
    assert_eq!(rows[0]["time"], 1);

    let resp = influx.write_lines("x", "m,t=b v=2i 2\nm,t=b v=3i 3\n");
    assert_eq!(resp.status, 204, "{}", resp.body_text());
    let rows = influx.rows("x", "SELECT count(v) FROM m GROUP BY t");
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["t"], "a");
    assert_eq!(rows[0]["count"], 1);
    assert_eq!(rows[1]["t"], "b");
    assert_eq!(rows[1]["count"], 2);
    assert_eq!(influx.count_points("x", "m"), 3);
}

#[test]
fn influx_stop_makes_it_unreachable() {
    let mut influx = Influx::start();
    let port = influx.port();
    influx.stop();
    assert!(Conn::connect(port, Duration::from_secs(1)).is_err());
}

#[test]
fn config_test_reports_emerg_with_line() {
    let (ok, out) = nginx_test_config("server { listen 127.0.0.1:1; }");
    assert!(ok, "{out}");
    assert!(out.contains("test is successful"), "{out}");

    let (ok, out) = nginx_test_config("\n    no_such_directive on;\n");
    assert!(!ok);
    assert!(out.contains("[emerg]"), "{out}");
    let at = format!("nginx.conf:{}", HTTP_BLOCK_FIRST_LINE + 1);
    assert!(
        out.contains("unknown directive \"no_such_directive\" in ") && out.contains(&at),
        "{out}"
    );
}

#[test]
fn master_with_workers_and_reload() {
    let sink = FakeSink::start();
    sink.skip_privacy_audit(); // arbitrary test traffic, not the module's writes
    let port = free_port();
    let block = format!(
        r#"server {{
        listen 127.0.0.1:{port};
        location / {{ return 200 "one\n"; }}
        location /up {{ client_body_in_file_only clean; proxy_pass http://{sink}; }}
    }}"#,
        sink = sink.addr()
    );
    let opts = NginxOptions {
        master_process: true,
        worker_processes: 2,
        main_extra: "worker_shutdown_timeout 5s;".to_string(),
        ..NginxOptions::default()
    };
    let mut nginx = Nginx::start_with(opts, &block);
    let workers = nginx.worker_pids();
    assert_eq!(workers.len(), 2, "{}", nginx.error_log());
    assert!(!workers.contains(&nginx.pid()));
    for w in &workers {
        let status = std::fs::read_to_string(format!("/proc/{w}/status")).unwrap();
        let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
        assert_eq!(uid.split_whitespace().nth(1), Some("0"), "{uid}");
    }
    assert_eq!(request(port, "GET", "/", "h", None).body_text(), "one\n");

    // Workers must be able to write temp files in the prefix.
    let big = vec![b'x'; 64 * 1024];
    let resp = request(port, "POST", "/up", "h", Some(&big));
    assert_eq!(resp.status, 204, "{}", nginx.error_log());
    assert_eq!(
        sink.wait_for_requests(1, Duration::from_secs(5))[0].body,
        big
    );

    nginx.write_config(&block.replace("one", "two"));
    nginx.reload();
    let new_workers = nginx.worker_pids();
    assert_eq!(new_workers.len(), 2);
    assert!(new_workers.iter().all(|p| !workers.contains(p)));
    assert_eq!(request(port, "GET", "/", "h", None).body_text(), "two\n");

    nginx.quit();
    assert!(!nginx.is_running());
    assert!(nginx.error_log().contains("gracefully shutting down"));
}

#[test]
fn nginx_upstream_keepalive_reuses_sink_connection() {
    let sink = FakeSink::start();
    sink.skip_privacy_audit(); // arbitrary test traffic, not the module's writes
    let port = free_port();
    let _nginx = Nginx::start(&format!(
        r#"
    upstream sink {{ server {sink}; keepalive 2; }}
    server {{
        listen 127.0.0.1:{port};
        location /w {{
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_pass http://sink/write?db=x;
        }}
    }}"#,
        sink = sink.addr()
    ));
    for i in 0..3 {
        let resp = post(port, "/w", format!("m v={i}i").as_bytes());
        assert_eq!(resp.status, 204);
    }
    let reqs = sink.wait_for_requests(3, Duration::from_secs(5));
    assert_eq!(reqs.len(), 3);
    assert!(reqs
        .iter()
        .all(|r| r.version == "HTTP/1.1" && r.conn_id == 0));
    assert_eq!(sink.connections_accepted(), 1);
    // Dropping the sink while nginx still holds the idle connection must not hang.
    let t = Instant::now();
    drop(sink);
    assert!(t.elapsed() < Duration::from_secs(2));
}

#[test]
#[should_panic(expected = "nginx exited during start")]
fn nginx_start_panics_on_bad_config() {
    Nginx::start("this_is_not_a_directive;");
}
