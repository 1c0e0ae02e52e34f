//! Disk spool, the nginx-free part: the directive's settings, the entry format of a spool file,
//! reading entries back in write-sized chunks, and the files' names.
//!
//! A spool file is text, one entry per line:
//!
//! ```text
//! <16 hex digits: FNV-1a 64 of the line protocol line, without its \n> <the line>\n
//! ```
//!
//! A line protocol line may hold a line feed inside a quoted string field (a note with a line
//! break); in the entry it is written as the byte 0x1E (record separator), which no encoded line
//! holds (string fields keep no control character but tab and line feed), so `\n` always ends an
//! entry and nothing a beacon sends can pose as the start of one. An entry whose hash does not
//! match its line, or a last entry without its `\n` (a torn tail left by a crash or a full disk
//! in the middle of an append), is skipped; reading goes on at the next `\n`. Garbage anywhere
//! in a file therefore costs only the entries it touched.

/// Default `max_size=`: 256 MiB.
pub const DEFAULT_MAX_SIZE: u64 = 256 * 1024 * 1024;
/// Default `retry=`: 5 s.
pub const DEFAULT_RETRY_MS: u64 = 5_000;
/// Smallest `retry=`: 100 ms.
pub const MIN_RETRY_MS: u64 = 100;
/// Largest `retry=`: 1 hour.
pub const MAX_RETRY_MS: u64 = 3_600_000;
/// Bytes an entry adds to its line: 16 hex digits and a space.
pub const ENTRY_OVERHEAD: usize = 17;
/// Longest entry read back; anything longer is garbage (beacon lines are a few hundred bytes,
/// bounded by `analytics_max_body_size`, at most 1 MiB).
pub const MAX_ENTRY: usize = 2 * 1024 * 1024 + ENTRY_OVERHEAD;
/// File name suffix of spool files.
pub const FILE_SUFFIX: &str = ".spool";

/// FNV-1a, 64 bits: spool entries' check sums, sink ids, and ETags. Not a defence against
/// anyone, only against accidents (torn writes, flipped bytes, garbage).
pub const fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325_u64;
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    hash
}

/// The settings of `analytics_spool path [max_size=size] [retry=time]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpoolSettings {
    /// The directory, as written (nginx resolves a relative one against its prefix).
    pub path: String,
    /// Most bytes the sink's spool files may hold together.
    pub max_size: u64,
    /// How often a spool that is not empty is replayed, in ms.
    pub retry_ms: u64,
}

/// Parses the arguments of `analytics_spool`: `off` (`Ok(None)`), or a path followed by any of
/// `max_size=SIZE` and `retry=TIME`.
pub fn parse_spool_args(args: &[&str]) -> Result<Option<SpoolSettings>, String> {
    let Some((path, rest)) = args.split_first() else {
        return Err("takes a path or \"off\"".to_string());
    };
    if *path == "off" {
        return match rest.is_empty() {
            true => Ok(None),
            false => Err("takes no parameters after \"off\"".to_string()),
        };
    }
    if path.is_empty() || path.contains('=') || path.bytes().any(|b| b.is_ascii_control()) {
        return Err(format!("invalid path \"{path}\""));
    }
    let mut settings = SpoolSettings {
        path: path.trim_end_matches('/').to_string(),
        max_size: DEFAULT_MAX_SIZE,
        retry_ms: DEFAULT_RETRY_MS,
    };
    if settings.path.is_empty() {
        settings.path = "/".to_string();
    }
    for arg in rest {
        let (key, value) = arg
            .split_once('=')
            .ok_or_else(|| format!("invalid parameter \"{arg}\""))?;
        let invalid = || format!("invalid value in \"{arg}\"");
        match key {
            "max_size" => {
                settings.max_size = parse_size(value)
                    .filter(|n| *n >= 1024)
                    .ok_or_else(invalid)?
            }
            "retry" => {
                settings.retry_ms = parse_time_ms(value)
                    .filter(|n| (MIN_RETRY_MS..=MAX_RETRY_MS).contains(n))
                    .ok_or_else(invalid)?
            }
            _ => return Err(format!("invalid parameter \"{arg}\"")),
        }
    }
    Ok(Some(settings))
}

/// `512`, `64k`, `1m`, `2g` (case-insensitive) in bytes.
fn parse_size(text: &str) -> Option<u64> {
    let (digits, scale) = match text.as_bytes().last()? {
        b'k' | b'K' => (&text[..text.len() - 1], 1 << 10),
        b'm' | b'M' => (&text[..text.len() - 1], 1 << 20),
        b'g' | b'G' => (&text[..text.len() - 1], 1 << 30),
        _ => (text, 1),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse::<u64>().ok()?.checked_mul(scale)
}

/// `500ms`, `5s`, `2m`, or a bare number of milliseconds.
fn parse_time_ms(text: &str) -> Option<u64> {
    let (digits, scale) = if let Some(ms) = text.strip_suffix("ms") {
        (ms, 1)
    } else if let Some(s) = text.strip_suffix('s') {
        (s, 1000)
    } else if let Some(m) = text.strip_suffix('m') {
        (m, 60_000)
    } else {
        (text, 1)
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse::<u64>().ok()?.checked_mul(scale)
}

/// The byte a line feed inside a line is written as in an entry.
const LINE_FEED_MARK: u8 = 0x1e;

/// A line the spool cannot hold: it contains the byte 0x1E, which the line protocol encoder
/// never produces.
#[derive(Debug, PartialEq, Eq)]
pub struct Unspoolable;

/// Appends the entry of one line-protocol `line` (with or without its final `\n`) to `out`.
pub fn encode_entry(line: &[u8], out: &mut Vec<u8>) -> Result<(), Unspoolable> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    if line.contains(&LINE_FEED_MARK) {
        return Err(Unspoolable);
    }
    out.extend_from_slice(format!("{:016x} ", fnv1a(line)).as_bytes());
    out.extend(
        line.iter()
            .map(|&b| if b == b'\n' { LINE_FEED_MARK } else { b }),
    );
    out.push(b'\n');
    Ok(())
}

/// One write's worth of lines read back from a spool file.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReadChunk {
    /// The lines, each with its `\n`, ready to be written.
    pub body: Vec<u8>,
    /// How many lines `body` holds.
    pub lines: usize,
    /// Bytes of the input the chunk used up (its entries and any skipped ones).
    pub consumed: usize,
    /// Offsets (in the input) of entries that were skipped as torn or corrupt.
    pub skipped_at: Vec<usize>,
}

/// Reads the next chunk of lines from `input`, the bytes of a spool file from an entry boundary
/// on, taking at most `max_lines` lines and, beyond the first line, at most `max_bytes` bytes.
/// `at_end` says that `input` reaches the end of the file, so that an entry without its `\n`
/// there is a torn tail; otherwise such an entry is left for the next read (unless it is longer
/// than [`MAX_ENTRY`], which makes it garbage).
pub fn read_chunk(input: &[u8], at_end: bool, max_lines: usize, max_bytes: usize) -> ReadChunk {
    let mut chunk = ReadChunk::default();
    let mut at = 0;
    while at < input.len() && chunk.lines < max_lines.max(1) {
        let rest = &input[at..];
        let Some(newline) = rest.iter().position(|&b| b == b'\n') else {
            if at_end || rest.len() > MAX_ENTRY {
                chunk.skipped_at.push(at);
                at = input.len();
            }
            break;
        };
        let entry = &rest[..newline];
        match decode_entry(entry) {
            Some(line) => {
                if chunk.lines > 0 && chunk.body.len() + line.len() + 1 > max_bytes {
                    break;
                }
                chunk.body.extend_from_slice(&line);
                chunk.body.push(b'\n');
                chunk.lines += 1;
            }
            None => chunk.skipped_at.push(at),
        }
        at += newline + 1;
    }
    chunk.consumed = at;
    chunk
}

/// The line of one entry (without its `\n`), if the entry is whole and its check sum matches.
fn decode_entry(entry: &[u8]) -> Option<Vec<u8>> {
    if entry.len() <= ENTRY_OVERHEAD || entry[ENTRY_OVERHEAD - 1] != b' ' {
        return None;
    }
    let hex = std::str::from_utf8(&entry[..ENTRY_OVERHEAD - 1]).ok()?;
    if !hex
        .bytes()
        .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    {
        return None;
    }
    let sum = u64::from_str_radix(hex, 16).ok()?;
    let line: Vec<u8> = entry[ENTRY_OVERHEAD..]
        .iter()
        .map(|&b| if b == LINE_FEED_MARK { b'\n' } else { b })
        .collect();
    (fnv1a(&line) == sum).then_some(line)
}

/// The id of a sink in spool file names: a hash of what identifies it across restarts (its
/// server block's names and listen addresses, and its write URI).
pub fn sink_id(identity: &str) -> u64 {
    fnv1a(identity.as_bytes())
}

/// The name of the spool file a worker (`pid`) starts at `millis` (ms since the epoch) for the
/// sink `id`.
pub fn file_name(id: u64, pid: u32, millis: u64) -> String {
    format!("{id:016x}.{pid}.{millis}{FILE_SUFFIX}")
}

/// The sink id, worker pid and start time of a spool file's name, if it is one.
pub fn parse_file_name(name: &str) -> Option<(u64, u32, u64)> {
    let stem = name.strip_suffix(FILE_SUFFIX)?;
    let mut parts = stem.split('.');
    let (id, pid, millis) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || id.len() != 16 {
        return None;
    }
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(pid) || !digits(millis) {
        return None;
    }
    Some((
        u64::from_str_radix(id, 16).ok()?,
        pid.parse().ok()?,
        millis.parse().ok()?,
    ))
}

/// A size for the error log: `512 bytes`, `12.5 KiB`, `3.0 MiB`.
pub fn human_size(bytes: u64) -> String {
    match bytes {
        0..=1023 => format!("{bytes} bytes"),
        1024..=1_048_575 => format!("{:.1} KiB", bytes as f64 / 1024.0),
        _ => format!("{:.1} MiB", bytes as f64 / 1_048_576.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(lines: &[&str]) -> Vec<u8> {
        let mut out = Vec::new();
        for line in lines {
            encode_entry(line.as_bytes(), &mut out).unwrap();
        }
        out
    }

    #[test]
    fn a_line_feed_inside_a_string_field_survives_and_cannot_pose_as_an_entry() {
        let fake = format!("{:016x} evil,tag=x f=1i 1", fnv1a(b"evil,tag=x f=1i 1"));
        let line = format!("m note=\"a\n{fake}\" 1");
        let input = entries(&[&line, "m a=2i 2"]);
        assert_eq!(input.iter().filter(|&&b| b == b'\n').count(), 2);
        let chunk = read_chunk(&input, true, 100, 1 << 20);
        assert_eq!(chunk.body, format!("{line}\nm a=2i 2\n").into_bytes());
        assert_eq!(chunk.lines, 2);

        // Corrupt the first entry: the fake entry inside it is not taken for one.
        let mut corrupt = input.clone();
        corrupt[ENTRY_OVERHEAD] = b'X';
        let chunk = read_chunk(&corrupt, true, 100, 1 << 20);
        assert_eq!(chunk.body, b"m a=2i 2\n");

        let mut out = Vec::new();
        assert_eq!(encode_entry(b"m s=\"\x1e\" 1", &mut out), Err(Unspoolable));
        assert!(out.is_empty());
    }

    #[test]
    fn the_directive_takes_a_path_and_optional_limits() {
        assert_eq!(parse_spool_args(&["off"]), Ok(None));
        let settings = parse_spool_args(&["/var/spool/analytics/"])
            .unwrap()
            .unwrap();
        assert_eq!(settings.path, "/var/spool/analytics");
        assert_eq!(settings.max_size, DEFAULT_MAX_SIZE);
        assert_eq!(settings.retry_ms, DEFAULT_RETRY_MS);
        let settings = parse_spool_args(&["spool", "max_size=64k", "retry=2s"])
            .unwrap()
            .unwrap();
        assert_eq!((settings.max_size, settings.retry_ms), (65_536, 2_000));
        let settings = parse_spool_args(&["s", "retry=250ms", "max_size=1g"])
            .unwrap()
            .unwrap();
        assert_eq!((settings.max_size, settings.retry_ms), (1 << 30, 250));
    }

    #[test]
    fn bad_directive_arguments_are_refused() {
        for args in [
            &[][..],
            &["s", "max_size=0"],
            &["s", "max_size=10"],
            &["s", "max_size=lots"],
            &["s", "retry=0"],
            &["s", "retry=2h"],
            &["s", "retry="],
            &["s", "size=1m"],
            &["s", "1m"],
            &["max_size=1m"],
            &["off", "retry=1s"],
        ] {
            assert!(parse_spool_args(args).is_err(), "{args:?} was accepted");
        }
    }

    #[test]
    fn entries_read_back_as_the_lines_written() {
        let input = entries(&["m a=1i 1\n", "m a=2i 2", "m a=3i 3\n"]);
        let chunk = read_chunk(&input, true, 100, 1 << 20);
        assert_eq!(chunk.body, b"m a=1i 1\nm a=2i 2\nm a=3i 3\n");
        assert_eq!(chunk.lines, 3);
        assert_eq!(chunk.consumed, input.len());
        assert!(chunk.skipped_at.is_empty());
    }

    #[test]
    fn chunks_respect_the_batch_limits() {
        let input = entries(&["m a=1i 1", "m a=2i 2", "m a=3i 3"]);
        let first = read_chunk(&input, true, 2, 1 << 20);
        assert_eq!(
            (first.lines, first.body.as_slice()),
            (2, &b"m a=1i 1\nm a=2i 2\n"[..])
        );
        let second = read_chunk(&input[first.consumed..], true, 2, 1 << 20);
        assert_eq!(
            (second.lines, second.body.as_slice()),
            (1, &b"m a=3i 3\n"[..])
        );
        assert_eq!(first.consumed + second.consumed, input.len());

        // Bytes: a chunk stops before the line that would pass the limit, but always takes one.
        let by_bytes = read_chunk(&input, true, 100, 12);
        assert_eq!(by_bytes.lines, 1);
        let tiny = read_chunk(&input, true, 100, 1);
        assert_eq!(tiny.lines, 1);
    }

    #[test]
    fn a_torn_tail_is_skipped_at_the_end_of_the_file_and_awaited_before_it() {
        let mut input = entries(&["m a=1i 1"]);
        let whole = input.len();
        input.extend_from_slice(b"0123456789abcdef m a=2i");
        let at_end = read_chunk(&input, true, 100, 1 << 20);
        assert_eq!(at_end.lines, 1);
        assert_eq!(at_end.skipped_at, vec![whole]);
        assert_eq!(at_end.consumed, input.len());

        let reading_on = read_chunk(&input, false, 100, 1 << 20);
        assert_eq!(reading_on.lines, 1);
        assert!(reading_on.skipped_at.is_empty());
        assert_eq!(reading_on.consumed, whole);
    }

    #[test]
    fn garbage_costs_only_the_entries_it_touched() {
        let good = entries(&["m a=1i 1", "m a=2i 2", "m a=3i 3"]);
        let first_len = entries(&["m a=1i 1"]).len();

        // Garbage between entries, ending with a newline: nothing lost.
        let mut between = good[..first_len].to_vec();
        between.extend_from_slice(b"\x00\xffgarbage\n");
        between.extend_from_slice(&good[first_len..]);
        let chunk = read_chunk(&between, true, 100, 1 << 20);
        assert_eq!(chunk.lines, 3);
        assert_eq!(chunk.skipped_at, vec![first_len]);

        // Garbage inside the second entry: that entry is lost, the others stay.
        let mut inside = good.clone();
        inside.splice(first_len + 20..first_len + 20, b"XX".iter().copied());
        let chunk = read_chunk(&inside, true, 100, 1 << 20);
        assert_eq!(chunk.body, b"m a=1i 1\nm a=3i 3\n");
        assert_eq!(chunk.skipped_at.len(), 1);

        // A flipped byte in a line fails its check sum.
        let mut flipped = good.clone();
        flipped[ENTRY_OVERHEAD + 2] ^= 0x01;
        assert_eq!(read_chunk(&flipped, true, 100, 1 << 20).lines, 2);

        // Upper-case hex, a missing space, an empty line: not entries.
        for bad in [
            b"CBF29CE484222325 x\n".to_vec(),
            b"cbf29ce484222325x\n".to_vec(),
            b"\n".to_vec(),
        ] {
            let chunk = read_chunk(&bad, true, 100, 1 << 20);
            assert_eq!((chunk.lines, chunk.skipped_at.len()), (0, 1), "{bad:?}");
        }
    }

    #[test]
    fn an_endless_line_is_garbage_even_before_the_end_of_the_file() {
        let input = vec![b'x'; MAX_ENTRY + 1];
        let chunk = read_chunk(&input, false, 100, 1 << 20);
        assert_eq!((chunk.lines, chunk.consumed), (0, input.len()));
        assert_eq!(chunk.skipped_at, vec![0]);
    }

    #[test]
    fn file_names_carry_sink_worker_and_start_time() {
        let id = sink_id("server_name=example.com listen=127.0.0.1:80 uri=/_analytics/write");
        let name = file_name(id, 4242, 1_764_608_964_123);
        assert!(name.ends_with(".4242.1764608964123.spool"), "{name}");
        assert_eq!(parse_file_name(&name), Some((id, 4242, 1_764_608_964_123)));
        for other in [
            "x.spool",
            "0123456789abcdef.12.spool",
            "0123456789abcdef.12.34.tmp",
            "0123456789abcdef.1x.34.spool",
            "0123456789abcdef.12.34.56.spool",
        ] {
            assert_eq!(parse_file_name(other), None, "{other}");
        }
        assert_ne!(sink_id("a"), sink_id("b"));
    }

    #[test]
    fn sizes_are_logged_readably() {
        assert_eq!(human_size(512), "512 bytes");
        assert_eq!(human_size(12_800), "12.5 KiB");
        assert_eq!(human_size(3 << 20), "3.0 MiB");
    }
}
