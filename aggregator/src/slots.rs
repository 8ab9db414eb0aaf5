//! Redis Cluster hash slots across the fleet, pure: what agents ship per (server, port, slot)
//! and interval, checked ([`CheckedSlot`]), and its sums over agents, servers and time
//! ([`SlotSum`]): requests, latency sum, redirects, and the latencies in the 10 µs-doubling
//! buckets, which add up exactly.

use tcpkit_histogram::{prom_quantile_bound_us, PROM_BUCKETS};
use tcpkit_proto::v1;

/// Hash slots of a Redis Cluster.
pub const SLOTS: u32 = 16384;

/// A shipped slot snapshot that adds up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedSlot {
    /// Its interval's start, µs.
    pub ts_us: u64,
    /// Its interval's length, µs.
    pub interval_us: u64,
    /// Server address.
    pub server: String,
    /// Server port.
    pub port: u32,
    /// The slot.
    pub slot: u16,
    /// Its figures.
    pub sum: SlotSum,
}

/// The figures of a slot, summed over any number of snapshots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotSum {
    /// Exchanges whose first key is in the slot.
    pub count: u64,
    /// Sum of their latencies, µs.
    pub sum_us: u64,
    /// Answered `-MOVED`.
    pub moved: u64,
    /// Answered `-ASK`.
    pub ask: u64,
    /// Their latencies per 10 µs-doubling bucket.
    pub buckets: [u64; PROM_BUCKETS],
}

impl Default for SlotSum {
    fn default() -> Self {
        Self {
            count: 0,
            sum_us: 0,
            moved: 0,
            ask: 0,
            buckets: [0; PROM_BUCKETS],
        }
    }
}

impl SlotSum {
    /// A shipped snapshot's figures, checked to add up: its buckets hold its count, its
    /// redirects are some of its exchanges.
    pub fn from_snapshot(s: &v1::SlotSnapshot) -> Result<Self, String> {
        if s.slot >= SLOTS {
            return Err(format!("slot {} is not in 0..16384", s.slot));
        }
        let buckets: [u64; PROM_BUCKETS] = s.buckets.as_slice().try_into().map_err(|_| {
            format!(
                "{} slot latency buckets, expected {PROM_BUCKETS}",
                s.buckets.len()
            )
        })?;
        let held = buckets.iter().fold(0u64, |a, &b| a.saturating_add(b));
        if held != s.count {
            return Err(format!(
                "slot count {} but its buckets hold {held}",
                s.count
            ));
        }
        if s.moved.saturating_add(s.ask) > s.count {
            return Err(format!(
                "slot {}: {} redirects among {} exchanges",
                s.slot,
                s.moved.saturating_add(s.ask),
                s.count
            ));
        }
        Ok(Self {
            count: s.count,
            sum_us: s.sum_us,
            moved: s.moved,
            ask: s.ask,
            buckets,
        })
    }

    /// Adds another sum (saturating).
    pub fn merge(&mut self, other: &SlotSum) {
        self.count = self.count.saturating_add(other.count);
        self.sum_us = self.sum_us.saturating_add(other.sum_us);
        self.moved = self.moved.saturating_add(other.moved);
        self.ask = self.ask.saturating_add(other.ask);
        for (mine, theirs) in self.buckets.iter_mut().zip(other.buckets) {
            *mine = mine.saturating_add(theirs);
        }
    }

    /// The bound of the bucket holding the `q` quantile, µs: the quantile is below it, and
    /// at least half of it (0 when empty; for the last bucket, its lower bound).
    pub fn quantile_bound_us(&self, q: f64) -> u64 {
        prom_quantile_bound_us(self.buckets.iter().copied(), q)
    }

    /// The buckets as stored: 23 little-endian u64.
    pub fn buckets_blob(&self) -> Vec<u8> {
        self.buckets.iter().flat_map(|c| c.to_le_bytes()).collect()
    }

    /// Rebuilds a stored sum.
    pub fn from_stored(count: u64, sum_us: u64, moved: u64, ask: u64, blob: &[u8]) -> Option<Self> {
        if blob.len() != PROM_BUCKETS * 8 {
            return None;
        }
        let mut buckets = [0; PROM_BUCKETS];
        for (slot, chunk) in buckets.iter_mut().zip(blob.chunks_exact(8)) {
            *slot = u64::from_le_bytes(chunk.try_into().ok()?);
        }
        Some(Self {
            count,
            sum_us,
            moved,
            ask,
            buckets,
        })
    }

    /// The slot's row as the Query service returns it (`top --of slot`): its count, latency
    /// sum and redirects, and the bucket bounds of its median and p99 (`p50_le_us`,
    /// `p99_le_us`; the exact percentiles are not known per slot, and stay 0).
    pub fn to_proto(&self, slot: u16) -> v1::Histogram {
        v1::Histogram {
            key: slot.to_string(),
            count: self.count,
            sum_us: self.sum_us,
            moved: self.moved,
            ask: self.ask,
            p50_le_us: self.quantile_bound_us(0.5),
            p99_le_us: self.quantile_bound_us(0.99),
            proto: "redis".to_string(),
            ..v1::Histogram::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(latencies: &[u64], moved: u64) -> v1::SlotSnapshot {
        let mut buckets = vec![0; PROM_BUCKETS];
        latencies
            .iter()
            .for_each(|&l| buckets[tcpkit_histogram::prom_bucket(l)] += 1);
        v1::SlotSnapshot {
            slot: 12182,
            count: latencies.len() as u64,
            sum_us: latencies.iter().sum(),
            moved,
            buckets,
            ..Default::default()
        }
    }

    #[test]
    fn sums_add_up_and_bounds_hold_the_quantiles() {
        let a = SlotSum::from_snapshot(&snapshot(&[15, 15, 15, 900], 1)).unwrap();
        let b = SlotSum::from_snapshot(&snapshot(&[30_000], 0)).unwrap();
        let mut sum = a;
        sum.merge(&b);
        assert_eq!((sum.count, sum.sum_us, sum.moved), (5, 30_945, 1));
        // The median (15 µs) is in [10, 20): bound 20; the p99 (30 ms) in [20.48, 40.96) ms.
        assert_eq!(sum.quantile_bound_us(0.5), 20);
        assert_eq!(sum.quantile_bound_us(0.99), 40_960);
        let stored = SlotSum::from_stored(5, 30_945, 1, 0, &sum.buckets_blob()).unwrap();
        assert_eq!(stored, sum);
    }

    #[test]
    fn snapshots_that_do_not_add_up_are_refused() {
        let mut s = snapshot(&[10, 20], 0);
        s.count = 3;
        assert!(SlotSum::from_snapshot(&s).is_err());
        let mut s = snapshot(&[10], 2);
        assert!(SlotSum::from_snapshot(&s)
            .unwrap_err()
            .contains("redirects"));
        s.moved = 0;
        s.slot = SLOTS;
        assert!(SlotSum::from_snapshot(&s).is_err());
        let mut s = snapshot(&[10], 0);
        s.buckets.pop();
        assert!(SlotSum::from_snapshot(&s).is_err());
    }
}
