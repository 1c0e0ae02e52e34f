//! Unique nanosecond timestamps.
//!
//! InfluxDB treats points with the same measurement, tag set and timestamp as one point (the last
//! write wins), so no two accepted beacons may share a timestamp, across worker processes too.
//! The low [`SLOT_BITS`] bits of every timestamp hold the worker's process slot (unique among
//! live nginx processes, including old and new workers during a reload); the remaining bits are
//! a per-process tick of 1024 ns that strictly increases:
//! `tick = max(now_ns / 1024, last_tick + 1)`, `timestamp = tick * 1024 + slot`.
//!
//! A slot reused by a new process can only repeat an old timestamp if the previous holder's
//! tick ran ahead of the wall clock, i.e. after a sustained burst of more than one beacon per
//! 1024 ns in that worker.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Number of low timestamp bits that hold the process slot.
pub const SLOT_BITS: u32 = 10;

const SLOT_MASK: u64 = (1 << SLOT_BITS) - 1;
/// Largest tick that still fits in a `u64` timestamp.
const MAX_TICK: u64 = u64::MAX >> SLOT_BITS;

/// A per-process source of strictly increasing timestamps whose low bits hold the process slot.
#[derive(Debug)]
pub struct UniqueClock {
    last_tick: AtomicU64,
}

impl UniqueClock {
    /// A clock that has not issued any timestamp yet (usable in a `static`).
    pub const fn new() -> Self {
        UniqueClock {
            last_tick: AtomicU64::new(0),
        }
    }

    /// Returns a timestamp near `now_ns` that is greater than every one this clock returned
    /// before, with `slot` (masked to [`SLOT_BITS`] bits) in the low bits. Never panics; once the
    /// tick saturates (year 2554) it stops increasing.
    pub fn stamp(&self, now_ns: u64, slot: u16) -> u64 {
        let now_tick = now_ns >> SLOT_BITS;
        let next = |last: u64| now_tick.max(last.saturating_add(1)).min(MAX_TICK);
        let previous = self
            .last_tick
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |last| Some(next(last)))
            .unwrap_or_else(|last| last);
        (next(previous) << SLOT_BITS) | (u64::from(slot) & SLOT_MASK)
    }
}

impl Default for UniqueClock {
    fn default() -> Self {
        UniqueClock::new()
    }
}

/// Nanoseconds since the Unix epoch from the system clock; 0 if the clock is before 1970.
pub fn unix_now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    const NOW: u64 = 1_700_000_000_000_000_000;

    #[test]
    fn stamps_follow_the_clock_and_carry_the_slot() {
        let clock = UniqueClock::new();
        for (now, slot, expected) in [
            (NOW, 5, (NOW / 1024) * 1024 + 5),
            (NOW + 1024, 5, (NOW / 1024 + 1) * 1024 + 5),
            (
                NOW + 1_000_000,
                1023,
                ((NOW + 1_000_000) / 1024) * 1024 + 1023,
            ),
            // The slot is masked to 10 bits.
            (
                NOW + 2_000_000,
                1024 + 7,
                ((NOW + 2_000_000) / 1024) * 1024 + 7,
            ),
        ] {
            assert_eq!(clock.stamp(now, slot), expected, "{now} {slot}");
        }
    }

    #[test]
    fn same_now_gives_strictly_increasing_stamps() {
        let clock = UniqueClock::new();
        let stamps: Vec<u64> = (0..1000).map(|_| clock.stamp(NOW, 3)).collect();
        assert!(stamps.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(stamps.iter().collect::<HashSet<_>>().len(), 1000);
        assert!(stamps.iter().all(|s| s & SLOT_MASK == 3));
        assert!(stamps.iter().all(|s| s - NOW < 1024 * 1024 + 1024));
    }

    #[test]
    fn clock_going_backwards_still_increases() {
        let clock = UniqueClock::new();
        let mut last = clock.stamp(NOW, 9);
        for now in [NOW - 1, NOW - 5_000, NOW - 1_000_000_000, 0, NOW, NOW - 1] {
            let next = clock.stamp(now, 9);
            assert!(next > last, "{now}: {next} <= {last}");
            assert_eq!(next & SLOT_MASK, 9, "{now}");
            last = next;
        }
    }

    #[test]
    fn distinct_slots_never_collide() {
        // Several processes (one clock each) stamping bursts at the same instants.
        let clocks: Vec<UniqueClock> = (0..8).map(|_| UniqueClock::new()).collect();
        let mut seen = HashSet::new();
        for round in 0..200u64 {
            let now = NOW + round * 300;
            for (slot, clock) in clocks.iter().enumerate() {
                for _ in 0..5 {
                    assert!(seen.insert(clock.stamp(now, slot as u16)), "round {round}");
                }
            }
        }
        assert_eq!(seen.len(), 200 * 8 * 5);
    }

    #[test]
    fn concurrent_stamps_are_unique() {
        static CLOCK: UniqueClock = UniqueClock::new();
        let threads: Vec<_> = (0..4)
            .map(|_| {
                std::thread::spawn(|| (0..2000).map(|_| CLOCK.stamp(NOW, 1)).collect::<Vec<_>>())
            })
            .collect();
        let mut all = HashSet::new();
        for t in threads {
            for stamp in t.join().unwrap() {
                assert!(all.insert(stamp));
            }
        }
        assert_eq!(all.len(), 8000);
    }

    #[test]
    fn saturates_instead_of_panicking() {
        let clock = UniqueClock::new();
        let top = clock.stamp(u64::MAX, 1023);
        assert_eq!(top, u64::MAX);
        assert_eq!(clock.stamp(u64::MAX, 2), (MAX_TICK << SLOT_BITS) | 2);
        assert_eq!(clock.stamp(0, 0), MAX_TICK << SLOT_BITS);
    }

    #[test]
    fn system_clock_is_after_2020() {
        assert!(unix_now_ns() > 1_577_836_800_000_000_000);
    }
}
