//! Benchmark helper for `bench/run.sh`: the **sink ceiling**, i.e. how many points per second
//! InfluxDB itself takes on this machine when nothing else is in the way.
//!
//! It builds `--lines` beacons like the benchmark's (an event with its own `sess_id` each),
//! turns them into line protocol with the module's own core (`parse_beacon`, `encode_point`,
//! unique timestamps), all before the clock starts, then writes them straight to InfluxDB's
//! `/write` in `--batch`-line requests over `--connections` keepalive connections and prints
//! one line of `key=value` figures: among them the CPU this process and the process `--watch`
//! (InfluxDB's pid) used during the writes, from `/proc/<pid>/stat`, and how busy the whole
//! machine was (`/proc/stat`), in % of one core. Plain std: no HTTP client crate.
//!
//! ```sh
//! cargo run --release --example sink_ceiling -- 127.0.0.1:8086 analytics \
//!     --lines 300000 --batch 1000 --connections 4 --session field
//! ```

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

// The nginx-free core, compiled straight from the module's sources (the module's rlib cannot be
// linked without nginx's symbols), as the fuzz target does.
#[path = "common/conn.rs"]
mod conn;
use conn::Conn;

#[path = "../src/core/mod.rs"]
#[allow(dead_code, unused_imports)]
mod core;

use crate::core::{
    encode_point, parse_beacon, unix_now_ns, Measurements, SessionStorage, UniqueClock,
};

const USAGE: &str = "usage: sink_ceiling HOST:PORT DATABASE [--lines N] [--batch N] \
                     [--connections N] [--session field|tag|off] [--watch PID]";

struct Options {
    addr: String,
    db: String,
    lines: usize,
    batch: usize,
    connections: usize,
    session: SessionStorage,
    watch: Option<u32>,
}

fn options() -> Result<Options, String> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().ok_or(USAGE)?;
    let db = args.next().ok_or(USAGE)?;
    let mut opts = Options {
        addr,
        db,
        lines: 300_000,
        batch: 1000,
        connections: 4,
        session: SessionStorage::Field,
        watch: None,
    };
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(USAGE)?;
        let number = || value.parse::<usize>().ok().filter(|n| *n > 0).ok_or(USAGE);
        match flag.as_str() {
            "--lines" => opts.lines = number()?,
            "--batch" => opts.batch = number()?,
            "--connections" => opts.connections = number()?,
            "--session" => opts.session = SessionStorage::parse(&value).ok_or(USAGE)?,
            "--watch" => opts.watch = Some(value.parse().map_err(|_| USAGE)?),
            _ => return Err(USAGE.to_string()),
        }
    }
    Ok(opts)
}

/// The write bodies: `lines` points in `batch`-line bodies (with their line counts), encoded by
/// the module's core.
fn encode_bodies(opts: &Options) -> Result<Vec<(usize, Vec<u8>)>, String> {
    let clock = UniqueClock::new();
    let measurements = Measurements::default();
    let mut bodies = Vec::new();
    let mut body = Vec::with_capacity(opts.batch * 256);
    for i in 0..opts.lines {
        let json = format!(
            r#"{{"domain":"www.example.com","page":"/posts/blog/general/share-buttons.html","timezone":-60,"platform":"Linux x86_64","sess_id":"ceiling-{i}","event":"socialclick","note":"mastodon"}}"#
        );
        let beacon = parse_beacon(json.as_bytes()).map_err(|e| e.to_string())?;
        let stamp = clock.stamp(unix_now_ns(), 0);
        encode_point(&beacon, &measurements, opts.session, stamp, &mut body);
        if (i + 1) % opts.batch == 0 || i + 1 == opts.lines {
            let lines = (i % opts.batch) + 1;
            let full = std::mem::replace(&mut body, Vec::with_capacity(opts.batch * 256));
            bodies.push((lines, full));
        }
    }
    Ok(bodies)
}

/// CPU time (user + system) of process `pid` (`self` for this one) so far, in clock ticks
/// (100 per second on Linux), from `/proc/<pid>/stat`; 0 when it cannot be read.
fn cpu_ticks(pid: &str) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // After the ")" that ends the command name: state is field 3, utime 14 and stime 15.
    let fields: Vec<&str> = stat
        .rsplit_once(") ")
        .map_or("", |(_, rest)| rest)
        .split(' ')
        .collect();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    field(11) + field(12)
}

/// Busy time of the whole machine so far (user, nice, system, irq, softirq and steal time of
/// all CPUs), in clock ticks, from `/proc/stat`; 0 when it cannot be read.
fn machine_busy_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(cpu) = stat.lines().find(|line| line.starts_with("cpu ")) else {
        return 0;
    };
    let ticks: Vec<u64> = cpu
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    [0, 1, 2, 5, 6, 7]
        .iter()
        .map(|&i| ticks.get(i).copied().unwrap_or(0))
        .sum()
}

fn main() {
    let opts = match options() {
        Ok(opts) => opts,
        Err(usage) => {
            eprintln!("{usage}");
            std::process::exit(2);
        }
    };
    let bodies = match encode_bodies(&opts) {
        Ok(bodies) => Arc::new(bodies),
        Err(e) => {
            eprintln!("sink_ceiling: encoding failed: {e}");
            std::process::exit(1);
        }
    };
    let path = format!("/write?db={}&precision=ns", opts.db);
    let start = Arc::new(Barrier::new(opts.connections + 1));
    let workers: Vec<_> = (0..opts.connections)
        .map(|n| {
            let (bodies, start) = (Arc::clone(&bodies), Arc::clone(&start));
            let (addr, path, connections) = (opts.addr.clone(), path.clone(), opts.connections);
            std::thread::spawn(move || -> std::io::Result<[usize; 3]> {
                let conn = addr
                    .parse()
                    .map_err(|_| std::io::Error::other(format!("bad address {addr}")))
                    .and_then(|a| Conn::open(a, Duration::from_secs(60)));
                start.wait();
                let mut conn = conn?;
                let [mut ok, mut failed, mut acked] = [0; 3];
                // Connection n writes bodies n, n + connections, ...
                for (lines, body) in bodies.iter().skip(n).step_by(connections) {
                    match conn.post(&addr, &path, body)? {
                        (200..=299, _) => {
                            ok += 1;
                            acked += lines;
                        }
                        (status, answer) => {
                            eprintln!(
                                "sink_ceiling: write answered {status}: {}",
                                answer.chars().take(300).collect::<String>()
                            );
                            failed += 1;
                        }
                    }
                }
                Ok([ok, failed, acked])
            })
        })
        .collect();
    let watched = opts.watch.map(|pid| pid.to_string());
    let cpu_before = (
        cpu_ticks("self"),
        watched.as_deref().map(cpu_ticks),
        machine_busy_ticks(),
    );
    start.wait();
    let began = Instant::now();
    let [mut ok, mut failed, mut acked] = [0; 3];
    for worker in workers {
        match worker.join() {
            Ok(Ok([o, f, a])) => {
                ok += o;
                failed += f;
                acked += a;
            }
            Ok(Err(e)) => {
                eprintln!("sink_ceiling: connection failed: {e}");
                std::process::exit(1);
            }
            Err(_) => std::process::exit(1),
        }
    }
    let seconds = began.elapsed().as_secs_f64();
    // % of one core over the writes (clock ticks are 1/100 s).
    let pct = |ticks: u64| format!("{:.0}%", ticks as f64 / seconds);
    let own_cpu = pct(cpu_ticks("self") - cpu_before.0);
    let busy = pct(machine_busy_ticks().saturating_sub(cpu_before.2));
    let watched_cpu = match (watched.as_deref(), cpu_before.1) {
        (Some(pid), Some(before)) => pct(cpu_ticks(pid).saturating_sub(before)),
        _ => "-".to_string(),
    };
    println!(
        "lines={} writes={} ok={ok} failed={failed} acked={acked} seconds={seconds:.3} \
         points_per_s={:.0} own_cpu={own_cpu} watched_cpu={watched_cpu} machine_busy={busy}",
        opts.lines,
        ok + failed,
        acked as f64 / seconds
    );
}
