//! Group commit, the nginx-free part: batch limits, the lines of one batch, and the bookkeeping
//! of which lines a (possibly split) write stored.
//!
//! A batch is a run of complete lines. It is written as one request body; when the sink answers
//! 413 the failed chunk is split in two halves (at a line boundary) and each half is written on
//! its own, down to single lines. Every line ends up either stored or failed, exactly once.

use std::collections::VecDeque;
use std::ops::Range;

/// Limits of one batch (`analytics_batch`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchLimits {
    /// Most lines in one write.
    pub max_lines: usize,
    /// A batch is written once it holds at least this many bytes.
    pub max_bytes: usize,
    /// Longest time (ms) a line waits for an earlier write before its batch is written anyway.
    pub delay_ms: u64,
}

impl BatchLimits {
    /// One write per beacon (`analytics_batch off`).
    pub const OFF: BatchLimits = BatchLimits {
        max_lines: 1,
        max_bytes: 1,
        delay_ms: 0,
    };

    /// Whether every line is written on its own.
    pub fn is_off(&self) -> bool {
        self.max_lines <= 1
    }
}

impl Default for BatchLimits {
    fn default() -> Self {
        BatchLimits {
            max_lines: 1000,
            max_bytes: 256 * 1024,
            delay_ms: 100,
        }
    }
}

/// Largest `lines=` value.
pub const MAX_BATCH_LINES: usize = 100_000;
/// Largest `bytes=` value.
pub const MAX_BATCH_BYTES: usize = 16 * 1024 * 1024;
/// Largest `delay=` value, in ms.
pub const MAX_BATCH_DELAY_MS: u64 = 60_000;

/// Parses the arguments of `analytics_batch`: `off`, or any of `lines=N`, `bytes=SIZE`,
/// `delay=TIME` (sizes as in nginx: `512`, `64k`, `1m`; times: `50ms`, `1s`, bare = ms).
/// Parameters not given keep their defaults.
pub fn parse_batch_args(args: &[&str]) -> Result<BatchLimits, String> {
    if args == ["off"] {
        return Ok(BatchLimits::OFF);
    }
    let mut limits = BatchLimits::default();
    for arg in args {
        let (key, value) = arg
            .split_once('=')
            .ok_or_else(|| format!("invalid parameter \"{arg}\""))?;
        let invalid = || format!("invalid value in \"{arg}\"");
        match key {
            "lines" => {
                limits.max_lines = value
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=MAX_BATCH_LINES).contains(n))
                    .ok_or_else(invalid)?
            }
            "bytes" => {
                limits.max_bytes = parse_size(value)
                    .filter(|n| (1..=MAX_BATCH_BYTES).contains(n))
                    .ok_or_else(invalid)?
            }
            "delay" => {
                limits.delay_ms = parse_msec(value)
                    .filter(|n| *n <= MAX_BATCH_DELAY_MS)
                    .ok_or_else(invalid)?
            }
            _ => return Err(format!("invalid parameter \"{arg}\"")),
        }
    }
    Ok(limits)
}

/// `512`, `64k`, `1m` (case-insensitive) in bytes.
fn parse_size(text: &str) -> Option<usize> {
    let (digits, scale) = match text.as_bytes().last()? {
        b'k' | b'K' => (&text[..text.len() - 1], 1024),
        b'm' | b'M' => (&text[..text.len() - 1], 1024 * 1024),
        _ => (text, 1),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse::<usize>().ok()?.checked_mul(scale)
}

/// `50ms`, `2s`, or a bare number of milliseconds.
fn parse_msec(text: &str) -> Option<u64> {
    let (digits, scale) = if let Some(ms) = text.strip_suffix("ms") {
        (ms, 1)
    } else if let Some(s) = text.strip_suffix('s') {
        (s, 1000)
    } else {
        (text, 1)
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse::<u64>().ok()?.checked_mul(scale)
}

/// The lines of one batch, in the order they were accepted.
#[derive(Debug, Default)]
pub struct LineBatch {
    bytes: Vec<u8>,
    /// End offset (exclusive) of each line in `bytes`.
    ends: Vec<usize>,
}

impl LineBatch {
    /// An empty batch.
    pub fn new() -> Self {
        LineBatch::default()
    }

    /// Appends one complete line (ending in `\n`) and returns its index.
    pub fn push(&mut self, line: &[u8]) -> usize {
        self.bytes.extend_from_slice(line);
        self.ends.push(self.bytes.len());
        self.ends.len() - 1
    }

    /// Number of lines.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// Whether the batch holds no line.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// Size of all lines in bytes.
    pub fn byte_len(&self) -> usize {
        self.bytes.len()
    }

    /// Whether the batch reached one of the limits and must be written now.
    pub fn is_full(&self, limits: &BatchLimits) -> bool {
        self.len() >= limits.max_lines || self.byte_len() >= limits.max_bytes
    }

    /// Line `index` (with its `\n`), or nothing when out of range.
    pub fn line(&self, index: usize) -> &[u8] {
        self.chunk(&(index..index + 1))
    }

    /// The bytes of the lines in `lines` (a range of line indices), for one write.
    pub fn chunk(&self, lines: &Range<usize>) -> &[u8] {
        let start = match lines.start {
            0 => 0,
            i => self.ends.get(i - 1).copied().unwrap_or(self.bytes.len()),
        };
        let end = match lines.end {
            0 => 0,
            i => self.ends.get(i - 1).copied().unwrap_or(self.bytes.len()),
        };
        self.bytes.get(start..end.max(start)).unwrap_or(&[])
    }
}

/// What the sink said about one chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunkOutcome {
    /// 2xx: every line of the chunk is stored.
    Stored,
    /// 413: the body was too large; split and retry.
    TooLarge,
    /// Anything else (other 4xx, 5xx, 429, timeout, connection error): the chunk failed.
    Failed,
}

impl ChunkOutcome {
    /// Classifies a finished write by the status line the sink answered with (0: no answer,
    /// such as a refused connection or a timeout). The status line decides: a 2xx means the
    /// sink stored the lines, even when reading the rest of its answer failed afterwards.
    pub fn from_status(status: usize) -> ChunkOutcome {
        match status {
            200..=299 => ChunkOutcome::Stored,
            413 => ChunkOutcome::TooLarge,
            _ => ChunkOutcome::Failed,
        }
    }
}

/// Which lines of a batch are written, pending or failed, across 413 splits.
#[derive(Debug)]
pub struct WritePlan {
    pending: VecDeque<Range<usize>>,
    stored: Vec<bool>,
    spooled: Vec<bool>,
    failed_lines: usize,
}

impl WritePlan {
    /// A plan that writes all `lines` lines in one chunk first.
    pub fn new(lines: usize) -> Self {
        let mut pending = VecDeque::new();
        if lines > 0 {
            pending.push_back(0..lines);
        }
        WritePlan {
            pending,
            stored: vec![false; lines],
            spooled: vec![false; lines],
            failed_lines: 0,
        }
    }

    /// The next chunk to write, if any.
    pub fn next_chunk(&mut self) -> Option<Range<usize>> {
        self.pending.pop_front()
    }

    /// Records the outcome of writing `chunk`. A 413 on more than one line splits the chunk
    /// in two halves that are written next; on one line it fails that line.
    pub fn record(&mut self, chunk: Range<usize>, outcome: ChunkOutcome) {
        match outcome {
            ChunkOutcome::Stored => {
                for stored in self.stored.get_mut(chunk.clone()).into_iter().flatten() {
                    *stored = true;
                }
            }
            ChunkOutcome::TooLarge if chunk.len() > 1 => {
                let middle = chunk.start + chunk.len() / 2;
                self.pending.push_front(middle..chunk.end);
                self.pending.push_front(chunk.start..middle);
            }
            ChunkOutcome::TooLarge | ChunkOutcome::Failed => self.failed_lines += chunk.len(),
        }
    }

    /// Records that the lines of `chunk`, whose write failed, were put in the disk spool (they
    /// will be written later).
    pub fn record_spooled(&mut self, chunk: Range<usize>) {
        for spooled in self.spooled.get_mut(chunk).into_iter().flatten() {
            *spooled = true;
        }
    }

    /// Whether line `index` went to the disk spool.
    pub fn is_spooled(&self, index: usize) -> bool {
        self.spooled.get(index).copied().unwrap_or(false)
    }

    /// Puts `chunk` back at the front, to be written again: its write ended without an answer
    /// that says what the sink did (the request that carried it went away). Writing a line twice
    /// stores one point, since every line has its own timestamp.
    pub fn retry(&mut self, chunk: Range<usize>) {
        if !chunk.is_empty() {
            self.pending.push_front(chunk);
        }
    }

    /// Indices of the lines still waiting to be written, in order.
    pub fn pending_lines(&self) -> impl Iterator<Item = usize> + '_ {
        self.pending.iter().flat_map(Clone::clone)
    }

    /// Whether line `index` was stored.
    pub fn is_stored(&self, index: usize) -> bool {
        self.stored.get(index).copied().unwrap_or(false)
    }

    /// Lines that will not be stored.
    pub fn failed_lines(&self) -> usize {
        self.failed_lines
    }

    /// Whether no chunk is left to write.
    pub fn is_done(&self) -> bool {
        self.pending.is_empty()
    }
}

/// A handle to one entry of a [`WaitQueue`], for removing it in O(1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ticket {
    slot: usize,
    generation: u64,
}

#[derive(Debug)]
struct Slot<T> {
    generation: u64,
    value: Option<T>,
}

/// A first-in, first-out queue whose entries can also be removed from anywhere in O(1)
/// (requests waiting for room in a batch leave it when they go away).
///
/// Removed entries leave a stale ticket behind in the order, skipped when popped; the order is
/// compacted once stale tickets outnumber live ones, so its size stays within twice the live
/// entries (plus a constant) and every operation is O(1) amortized.
#[derive(Debug)]
pub struct WaitQueue<T> {
    slots: Vec<Slot<T>>,
    free: Vec<usize>,
    order: VecDeque<Ticket>,
    len: usize,
    next_generation: u64,
}

impl<T> Default for WaitQueue<T> {
    fn default() -> Self {
        WaitQueue {
            slots: Vec::new(),
            free: Vec::new(),
            order: VecDeque::new(),
            len: 0,
            next_generation: 0,
        }
    }
}

impl<T> WaitQueue<T> {
    /// An empty queue.
    pub fn new() -> Self {
        WaitQueue::default()
    }

    /// Number of entries waiting.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn insert(&mut self, value: T) -> Ticket {
        self.next_generation += 1;
        let generation = self.next_generation;
        let slot = match self.free.pop() {
            Some(slot) => {
                self.slots[slot] = Slot {
                    generation,
                    value: Some(value),
                };
                slot
            }
            None => {
                self.slots.push(Slot {
                    generation,
                    value: Some(value),
                });
                self.slots.len() - 1
            }
        };
        self.len += 1;
        Ticket { slot, generation }
    }

    /// Adds `value` at the back (it waits longest).
    pub fn push_back(&mut self, value: T) -> Ticket {
        let ticket = self.insert(value);
        self.order.push_back(ticket);
        ticket
    }

    /// Adds `value` at the front (it is next), for an entry that was taken out and must wait
    /// again without losing its place.
    pub fn push_front(&mut self, value: T) -> Ticket {
        let ticket = self.insert(value);
        self.order.push_front(ticket);
        ticket
    }

    /// Removes the entry of `ticket`, if it is still waiting.
    pub fn remove(&mut self, ticket: Ticket) -> Option<T> {
        let slot = self.slots.get_mut(ticket.slot)?;
        if slot.generation != ticket.generation {
            return None;
        }
        let value = slot.value.take()?;
        self.free.push(ticket.slot);
        self.len -= 1;
        if self.order.len() > 2 * self.len + 16 {
            let slots = &self.slots;
            self.order.retain(|t| {
                slots[t.slot].generation == t.generation && slots[t.slot].value.is_some()
            });
        }
        Some(value)
    }

    /// Takes the entry that waited longest.
    pub fn pop_front(&mut self) -> Option<T> {
        while let Some(ticket) = self.order.pop_front() {
            if let Some(value) = self.remove(ticket) {
                return Some(value);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_directive_arguments() {
        let default = BatchLimits::default();
        let cases: [(&[&str], Result<BatchLimits, ()>); 9] = [
            (&["off"], Ok(BatchLimits::OFF)),
            (
                &["lines=10"],
                Ok(BatchLimits {
                    max_lines: 10,
                    ..default
                }),
            ),
            (
                &["bytes=64k", "delay=20ms"],
                Ok(BatchLimits {
                    max_bytes: 65536,
                    delay_ms: 20,
                    ..default
                }),
            ),
            (
                &["delay=2s", "bytes=1m"],
                Ok(BatchLimits {
                    delay_ms: 2000,
                    max_bytes: 1 << 20,
                    ..default
                }),
            ),
            (
                &["delay=15"],
                Ok(BatchLimits {
                    delay_ms: 15,
                    ..default
                }),
            ),
            (&["lines=0"], Err(())),
            (&["lines=ten"], Err(())),
            (&["size=10"], Err(())),
            (&["bytes=17m"], Err(())),
        ];
        for (args, expected) in cases {
            assert_eq!(parse_batch_args(args).map_err(|_| ()), expected, "{args:?}");
        }
        assert!(parse_batch_args(&["delay=61s"]).is_err());
        assert!(parse_batch_args(&["lines"]).is_err());
        assert!(parse_batch_args(&["off", "lines=2"]).is_err());
        assert!(BatchLimits::OFF.is_off() && !default.is_off());
    }

    #[test]
    fn a_batch_is_full_at_its_line_or_byte_limit() {
        let limits = BatchLimits {
            max_lines: 3,
            max_bytes: 10,
            delay_ms: 0,
        };
        let mut batch = LineBatch::new();
        assert_eq!(batch.push(b"a 1\n"), 0);
        assert!(!batch.is_full(&limits));
        batch.push(b"b 2\n");
        assert!(!batch.is_full(&limits), "8 bytes, 2 lines");
        batch.push(b"c\n");
        assert!(batch.is_full(&limits), "3 lines");
        let mut big = LineBatch::new();
        big.push(b"0123456789\n");
        assert!(big.is_full(&limits), "11 bytes");
        assert!(LineBatch::new().is_empty());
    }

    #[test]
    fn chunks_are_whole_lines() {
        let mut batch = LineBatch::new();
        for line in ["a\n", "bb\n", "ccc\n", "dddd\n"] {
            batch.push(line.as_bytes());
        }
        assert_eq!(batch.chunk(&(0..4)), b"a\nbb\nccc\ndddd\n");
        assert_eq!(batch.chunk(&(1..3)), b"bb\nccc\n");
        assert_eq!(batch.chunk(&(3..4)), b"dddd\n");
        assert_eq!(batch.chunk(&(2..2)), b"");
        assert_eq!(batch.chunk(&(3..9)), b"dddd\n", "out of range is clamped");
    }

    #[test]
    fn a_413_splits_the_chunk_until_single_lines_fail() {
        let mut plan = WritePlan::new(5);
        let first = plan.next_chunk().unwrap();
        assert_eq!(first, 0..5);
        plan.record(first, ChunkOutcome::TooLarge);
        let left = plan.next_chunk().unwrap();
        assert_eq!(left, 0..2);
        plan.record(left, ChunkOutcome::Stored);
        let right = plan.next_chunk().unwrap();
        assert_eq!(right, 2..5);
        plan.record(right, ChunkOutcome::TooLarge);
        let (a, b) = (plan.next_chunk().unwrap(), plan.next_chunk().unwrap());
        assert_eq!((a.clone(), b.clone()), (2..3, 3..5));
        plan.record(a, ChunkOutcome::TooLarge);
        plan.record(b, ChunkOutcome::Stored);
        assert!(plan.is_done());
        let stored: Vec<bool> = (0..5).map(|i| plan.is_stored(i)).collect();
        assert_eq!(stored, [true, true, false, true, true]);
        assert_eq!(
            plan.failed_lines(),
            1,
            "a single line that is too large fails"
        );
    }

    #[test]
    fn a_failed_chunk_fails_all_its_lines_and_nothing_is_retried() {
        let mut plan = WritePlan::new(3);
        let chunk = plan.next_chunk().unwrap();
        plan.record(chunk, ChunkOutcome::Failed);
        assert!(plan.is_done());
        assert_eq!(plan.failed_lines(), 3);
        assert!(!(0..3).any(|i| plan.is_stored(i)));
    }

    #[test]
    fn the_status_line_decides_the_outcome() {
        for (status, outcome) in [
            (204, ChunkOutcome::Stored),
            (200, ChunkOutcome::Stored),
            (413, ChunkOutcome::TooLarge),
            (400, ChunkOutcome::Failed),
            (429, ChunkOutcome::Failed),
            (500, ChunkOutcome::Failed),
            (502, ChunkOutcome::Failed),
            (0, ChunkOutcome::Failed),
        ] {
            assert_eq!(ChunkOutcome::from_status(status), outcome, "{status}");
        }
    }

    #[test]
    fn a_chunk_without_an_answer_is_written_again() {
        let mut plan = WritePlan::new(4);
        let chunk = plan.next_chunk().unwrap();
        plan.record(chunk, ChunkOutcome::TooLarge);
        let first = plan.next_chunk().unwrap();
        assert_eq!(first, 0..2);
        plan.retry(first);
        assert_eq!(plan.pending_lines().collect::<Vec<_>>(), [0, 1, 2, 3]);
        assert_eq!(
            plan.next_chunk(),
            Some(0..2),
            "the retried chunk goes first"
        );
        assert!(!plan.is_done());
    }

    #[test]
    fn a_line_is_read_back_whole() {
        let mut batch = LineBatch::new();
        batch.push(b"x\n");
        batch.push(b"bb\n");
        assert_eq!(batch.line(1), b"bb\n");
        assert_eq!(batch.line(2), b"", "out of range");
    }

    #[test]
    fn the_wait_queue_is_fifo_and_removes_anywhere() {
        let mut queue = WaitQueue::new();
        let tickets: Vec<Ticket> = (0..5).map(|i| queue.push_back(i)).collect();
        assert_eq!(queue.remove(tickets[2]), Some(2));
        assert_eq!(queue.remove(tickets[2]), None, "removed once");
        assert_eq!(queue.pop_front(), Some(0));
        assert_eq!(queue.remove(tickets[0]), None, "a popped ticket is stale");
        queue.push_front(9);
        assert_eq!(queue.len(), 4);
        let rest: Vec<i32> = std::iter::from_fn(|| queue.pop_front()).collect();
        assert_eq!(rest, [9, 1, 3, 4]);
        assert!(queue.is_empty());
    }

    #[test]
    fn a_reused_slot_does_not_answer_to_an_old_ticket() {
        let mut queue = WaitQueue::new();
        let old = queue.push_back("old");
        assert_eq!(queue.pop_front(), Some("old"));
        let new = queue.push_back("new");
        assert_eq!(queue.remove(old), None);
        assert_eq!(queue.remove(new), Some("new"));
    }

    #[test]
    fn removing_many_waiting_entries_keeps_the_order_small() {
        let mut queue = WaitQueue::new();
        let tickets: Vec<Ticket> = (0..10_000).map(|i| queue.push_back(i)).collect();
        for ticket in &tickets[..9_990] {
            assert!(queue.remove(*ticket).is_some());
        }
        assert_eq!(queue.len(), 10);
        assert!(
            queue.order.len() <= 2 * queue.len() + 16,
            "{}",
            queue.order.len()
        );
        let rest: Vec<i32> = std::iter::from_fn(|| queue.pop_front()).collect();
        assert_eq!(rest, (9_990..10_000).collect::<Vec<_>>());
    }
}
