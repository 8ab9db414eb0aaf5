//! Merging histogram snapshots: a sum of counts, exact for both bucket forms (DESIGN.md,
//! "Aggregator storage"), and the figures read off the merged fine histogram.

use tcpkit_histogram::{fine_lower, BadBucket, FineHistogram, SEED_BUCKETS};
use tcpkit_proto::v1;

/// The sum of any number of histogram snapshots.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Merged {
    /// Exchanges.
    pub count: u64,
    /// Sum of their latencies, µs.
    pub sum_us: u64,
    /// Exchanges at or above the agent's slow threshold.
    pub slow: u64,
    /// Error replies.
    pub errors: u64,
    /// Requests never answered.
    pub timeouts: u64,
    /// The 18 seed buckets.
    pub seed: [u64; SEED_BUCKETS],
    /// The fine histogram (percentiles, the exact maximum).
    pub fine: FineHistogram,
    /// Sum of the own times (time not queued behind earlier requests), µs.
    pub own_sum_us: u64,
    /// The own times; it counts only the exchanges of agents that send them.
    pub own: FineHistogram,
    /// The pipeline depths, one fine bucket per depth below 128; as `own`.
    pub depth: FineHistogram,
    /// Redis Cluster `-MOVED` replies among the exchanges.
    pub moved: u64,
    /// `-ASK` replies.
    pub ask: u64,
    /// Keys the requests named (key templates).
    pub keys: u64,
    /// Requests naming more than one key.
    pub multi_key: u64,
    /// Request bytes.
    pub req_bytes: u64,
    /// Reply bytes.
    pub rsp_bytes: u64,
}

impl Merged {
    /// Adds another sum to this one (saturating: a sum never wraps).
    pub fn merge(&mut self, other: &Merged) {
        self.count = self.count.saturating_add(other.count);
        self.sum_us = self.sum_us.saturating_add(other.sum_us);
        self.slow = self.slow.saturating_add(other.slow);
        self.errors = self.errors.saturating_add(other.errors);
        self.timeouts = self.timeouts.saturating_add(other.timeouts);
        for (mine, theirs) in self.seed.iter_mut().zip(other.seed) {
            *mine = mine.saturating_add(theirs);
        }
        self.fine.merge(&other.fine);
        self.own_sum_us = self.own_sum_us.saturating_add(other.own_sum_us);
        self.own.merge(&other.own);
        self.depth.merge(&other.depth);
        self.moved = self.moved.saturating_add(other.moved);
        self.ask = self.ask.saturating_add(other.ask);
        self.keys = self.keys.saturating_add(other.keys);
        self.multi_key = self.multi_key.saturating_add(other.multi_key);
        self.req_bytes = self.req_bytes.saturating_add(other.req_bytes);
        self.rsp_bytes = self.rsp_bytes.saturating_add(other.rsp_bytes);
    }

    /// The same without own times and depths (what a series keeps: see
    /// [`crate::store::Reader::series`]).
    pub fn latency_only(self) -> Self {
        Merged {
            own_sum_us: 0,
            own: FineHistogram::default(),
            depth: FineHistogram::default(),
            ..self
        }
    }

    /// Exchanges sent while an earlier request of their connection was outstanding.
    pub fn pipelined(&self) -> u64 {
        let unpipelined = self
            .depth
            .nonzero()
            .find(|&(i, _)| i == 1)
            .map_or(0, |(_, n)| n);
        self.depth.total().saturating_sub(unpipelined)
    }

    /// A shipped snapshot as a sum of one; its buckets are checked.
    pub fn from_snapshot(s: &v1::HistogramSnapshot) -> Result<Self, SnapshotError> {
        if s.seed.len() != SEED_BUCKETS {
            return Err(SnapshotError::SeedBuckets(s.seed.len()));
        }
        if s.fine_index.len() != s.fine_count.len() {
            return Err(SnapshotError::FineLengths);
        }
        let fine = FineHistogram::from_nonzero(
            s.fine_index
                .iter()
                .copied()
                .zip(s.fine_count.iter().copied()),
            s.max_us,
        )?;
        let seed_total = s.seed.iter().fold(0u64, |a, &b| a.saturating_add(b));
        if fine.total() != s.count || seed_total != s.count {
            return Err(SnapshotError::Counts {
                count: s.count,
                seed: seed_total,
                fine: fine.total(),
            });
        }
        let mut seed = [0; SEED_BUCKETS];
        seed.copy_from_slice(&s.seed);
        let own = part(
            "own time",
            s.count,
            &s.own_fine_index,
            &s.own_fine_count,
            |_| s.own_max_us,
        )?;
        let depth = part("depth", s.count, &s.depth_index, &s.depth_count, |last| {
            fine_lower(last as usize)
        })?;
        Ok(Self {
            count: s.count,
            sum_us: s.sum_us,
            slow: s.slow,
            errors: s.errors,
            timeouts: s.timeouts,
            seed,
            fine,
            own_sum_us: s.own_sum_us,
            own,
            depth,
            moved: s.moved,
            ask: s.ask,
            keys: s.keys,
            multi_key: s.multi_key,
            req_bytes: s.req_bytes,
            rsp_bytes: s.rsp_bytes,
        })
    }

    /// The merged histogram as the Query service returns it, under `key`.
    pub fn to_proto(&self, key: String) -> v1::Histogram {
        let (fine_index, fine_count) = self.fine.nonzero().unzip();
        let (own_fine_index, own_fine_count) = self.own.nonzero().unzip();
        let (depth_index, depth_count) = self.depth.nonzero().unzip();
        v1::Histogram {
            key,
            count: self.count,
            sum_us: self.sum_us,
            max_us: self.fine.max_us(),
            slow: self.slow,
            errors: self.errors,
            timeouts: self.timeouts,
            p50_us: self.fine.quantile(0.5),
            p90_us: self.fine.quantile(0.9),
            p99_us: self.fine.quantile(0.99),
            p999_us: self.fine.quantile(0.999),
            seed: self.seed.to_vec(),
            fine_index,
            fine_count,
            proto: String::new(),
            own_count: self.own.total(),
            own_sum_us: self.own_sum_us,
            own_max_us: self.own.max_us(),
            own_p50_us: self.own.quantile(0.5),
            own_p90_us: self.own.quantile(0.9),
            own_p99_us: self.own.quantile(0.99),
            own_p999_us: self.own.quantile(0.999),
            own_fine_index,
            own_fine_count,
            pipelined: self.pipelined(),
            depth_p50: self.depth.quantile(0.5),
            depth_p99: self.depth.quantile(0.99),
            depth_max: self.depth.max_us(),
            depth_index,
            depth_count,
            moved: self.moved,
            ask: self.ask,
            p50_le_us: 0,
            p99_le_us: 0,
            keys: self.keys,
            multi_key: self.multi_key,
            req_bytes: self.req_bytes,
            rsp_bytes: self.rsp_bytes,
        }
    }

    /// The seed buckets as stored: 18 little-endian u64.
    pub fn seed_blob(&self) -> Vec<u8> {
        self.seed.iter().flat_map(|c| c.to_le_bytes()).collect()
    }

    /// The fine buckets as stored: (u32 index, u64 count) pairs, little-endian.
    pub fn fine_blob(&self) -> Vec<u8> {
        pairs_blob(&self.fine)
    }

    /// The own times as stored: their largest (u64), then their buckets as [`Merged::fine_blob`];
    /// empty when there are none.
    pub fn own_blob(&self) -> Vec<u8> {
        with_max_blob(&self.own)
    }

    /// The depths as stored, as [`Merged::own_blob`].
    pub fn depth_blob(&self) -> Vec<u8> {
        with_max_blob(&self.depth)
    }

    /// Rebuilds a stored sum from its columns.
    pub fn from_stored(columns: StoredColumns<'_>) -> Result<Self, SnapshotError> {
        let mut m = Merged::default();
        m.add_stored(columns)?;
        Ok(m)
    }

    /// Adds a stored sum, as [`Merged::from_stored`] reads it, without building it apart
    /// (a query sums thousands of rows). On an error, part of it may have been added.
    pub fn add_stored(&mut self, columns: StoredColumns<'_>) -> Result<(), SnapshotError> {
        let seed_bytes = columns.seed;
        if seed_bytes.len() != SEED_BUCKETS * 8 {
            return Err(SnapshotError::SeedBuckets(seed_bytes.len() / 8));
        }
        for (slot, chunk) in self.seed.iter_mut().zip(seed_bytes.chunks_exact(8)) {
            *slot = slot.saturating_add(u64::from_le_bytes(chunk.try_into().unwrap_or_default()));
        }
        self.count = self.count.saturating_add(columns.count);
        self.sum_us = self.sum_us.saturating_add(columns.sum_us);
        self.slow = self.slow.saturating_add(columns.slow);
        self.errors = self.errors.saturating_add(columns.errors);
        self.timeouts = self.timeouts.saturating_add(columns.timeouts);
        add_pairs_from_blob(&mut self.fine, columns.fine, columns.max_us)?;
        self.own_sum_us = self.own_sum_us.saturating_add(columns.own_sum_us);
        add_with_max_from_blob(&mut self.own, columns.own)?;
        add_with_max_from_blob(&mut self.depth, columns.depth)?;
        self.moved = self.moved.saturating_add(columns.moved);
        self.ask = self.ask.saturating_add(columns.ask);
        self.keys = self.keys.saturating_add(columns.keys);
        self.multi_key = self.multi_key.saturating_add(columns.multi_key);
        self.req_bytes = self.req_bytes.saturating_add(columns.req_bytes);
        self.rsp_bytes = self.rsp_bytes.saturating_add(columns.rsp_bytes);
        Ok(())
    }
}

/// One more histogram of a snapshot (own times, depths): none (an older agent), or one count
/// per exchange. `max_of` gives its largest value from its last bucket.
fn part(
    what: &'static str,
    count: u64,
    index: &[u32],
    counts: &[u64],
    max_of: impl Fn(u32) -> u64,
) -> Result<FineHistogram, SnapshotError> {
    if index.len() != counts.len() {
        return Err(SnapshotError::FineLengths);
    }
    let max = index.last().map_or(0, |&last| max_of(last));
    let h = FineHistogram::from_nonzero(index.iter().copied().zip(counts.iter().copied()), max)?;
    if h.total() != 0 && h.total() != count {
        return Err(SnapshotError::PartCounts {
            what,
            count,
            found: h.total(),
        });
    }
    Ok(h)
}

fn pairs_blob(h: &FineHistogram) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, c) in h.nonzero() {
        out.extend_from_slice(&i.to_le_bytes());
        out.extend_from_slice(&c.to_le_bytes());
    }
    out
}

/// Adds (index u32, count u64) little-endian pairs to `h`.
fn add_pairs_from_blob(
    h: &mut FineHistogram,
    bytes: &[u8],
    max_us: u64,
) -> Result<(), SnapshotError> {
    if bytes.len() % 12 != 0 {
        return Err(SnapshotError::FineLengths);
    }
    let buckets = bytes.chunks_exact(12).map(|pair| {
        let (i, c) = pair.split_at(4);
        (
            u32::from_le_bytes(i.try_into().unwrap_or_default()),
            u64::from_le_bytes(c.try_into().unwrap_or_default()),
        )
    });
    Ok(h.add_nonzero(buckets, max_us)?)
}

fn with_max_blob(h: &FineHistogram) -> Vec<u8> {
    if h.total() == 0 {
        return Vec::new();
    }
    let mut out = h.max_us().to_le_bytes().to_vec();
    out.extend(pairs_blob(h));
    out
}

/// Adds a largest value (u64) then pairs (see [`add_pairs_from_blob`]) to `h`; nothing
/// when empty.
fn add_with_max_from_blob(h: &mut FineHistogram, bytes: &[u8]) -> Result<(), SnapshotError> {
    if bytes.is_empty() {
        return Ok(());
    }
    let (max, pairs) = bytes
        .split_at_checked(8)
        .ok_or(SnapshotError::FineLengths)?;
    add_pairs_from_blob(
        h,
        pairs,
        u64::from_le_bytes(max.try_into().unwrap_or_default()),
    )
}

/// The columns a stored sum is kept in.
#[derive(Debug, Clone, Copy)]
pub struct StoredColumns<'a> {
    /// See [`Merged::count`].
    pub count: u64,
    /// See [`Merged::sum_us`].
    pub sum_us: u64,
    /// The largest latency.
    pub max_us: u64,
    /// See [`Merged::slow`].
    pub slow: u64,
    /// See [`Merged::errors`].
    pub errors: u64,
    /// See [`Merged::timeouts`].
    pub timeouts: u64,
    /// [`Merged::seed_blob`].
    pub seed: &'a [u8],
    /// [`Merged::fine_blob`].
    pub fine: &'a [u8],
    /// See [`Merged::own_sum_us`].
    pub own_sum_us: u64,
    /// [`Merged::own_blob`].
    pub own: &'a [u8],
    /// [`Merged::depth_blob`].
    pub depth: &'a [u8],
    /// See [`Merged::moved`].
    pub moved: u64,
    /// See [`Merged::ask`].
    pub ask: u64,
    /// See [`Merged::keys`].
    pub keys: u64,
    /// See [`Merged::multi_key`].
    pub multi_key: u64,
    /// See [`Merged::req_bytes`].
    pub req_bytes: u64,
    /// See [`Merged::rsp_bytes`].
    pub rsp_bytes: u64,
}

/// A histogram snapshot that does not add up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    /// Not 18 seed buckets.
    #[error("{0} seed buckets, expected 18")]
    SeedBuckets(usize),
    /// Fine indexes and counts differ in number.
    #[error("fine bucket indexes and counts differ in number")]
    FineLengths,
    /// A fine index out of range.
    #[error(transparent)]
    Bucket(#[from] BadBucket),
    /// The buckets do not sum to the count.
    #[error("count {count} but the seed buckets hold {seed} and the fine ones {fine}")]
    Counts {
        /// The snapshot's count.
        count: u64,
        /// The sum of its seed buckets.
        seed: u64,
        /// The sum of its fine buckets.
        fine: u64,
    },
    /// The own times or the depths are neither absent nor one per exchange.
    #[error("count {count} but the {what} buckets hold {found}")]
    PartCounts {
        /// Which.
        what: &'static str,
        /// The snapshot's count.
        count: u64,
        /// The sum of those buckets.
        found: u64,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tcpkit_histogram::seed_bucket;

    fn snapshot(latencies: &[u64]) -> v1::HistogramSnapshot {
        let mut fine = FineHistogram::default();
        let mut seed = vec![0; SEED_BUCKETS];
        let (mut own, mut depth) = (FineHistogram::default(), FineHistogram::default());
        for &l in latencies {
            fine.record(l);
            seed[seed_bucket(l)] += 1;
            own.record(l / 3);
            depth.record(1 + l % 70);
        }
        let (fine_index, fine_count) = fine.nonzero().unzip();
        let (own_fine_index, own_fine_count) = own.nonzero().unzip();
        let (depth_index, depth_count) = depth.nonzero().unzip();
        v1::HistogramSnapshot {
            count: latencies.len() as u64,
            sum_us: latencies.iter().sum(),
            max_us: fine.max_us(),
            seed,
            fine_index,
            fine_count,
            own_sum_us: latencies.iter().map(|l| l / 3).sum(),
            own_max_us: own.max_us(),
            own_fine_index,
            own_fine_count,
            depth_index,
            depth_count,
            ..Default::default()
        }
    }

    proptest! {
        /// Merging per-host histograms equals the histogram of all samples, and its
        /// percentiles are within 1% of the exact ones.
        #[test]
        fn merged_hosts_equal_all_samples(
            hosts in proptest::collection::vec(proptest::collection::vec(1u64..10_000_000, 1..300), 1..6)
        ) {
            let mut merged = Merged::default();
            for h in &hosts {
                let one = Merged::from_snapshot(&snapshot(h)).unwrap();
                let stored = Merged::from_stored(StoredColumns {
                    count: one.count, sum_us: one.sum_us, max_us: one.fine.max_us(), slow: 0,
                    errors: 0, timeouts: 0, seed: &one.seed_blob(), fine: &one.fine_blob(),
                    own_sum_us: one.own_sum_us, own: &one.own_blob(), depth: &one.depth_blob(),
                    moved: 0, ask: 0, keys: 0, multi_key: 0, req_bytes: 0, rsp_bytes: 0,
                }).unwrap();
                prop_assert_eq!(&stored, &one);
                merged.merge(&stored);
            }
            let all: Vec<u64> = hosts.concat();
            prop_assert_eq!(&merged, &Merged::from_snapshot(&snapshot(&all)).unwrap());
            let mut sorted = all.clone();
            sorted.sort_unstable();
            let p = merged.to_proto(String::new());
            for (q, got) in [(0.5, p.p50_us), (0.9, p.p90_us), (0.99, p.p99_us), (0.999, p.p999_us)] {
                let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
                let exact = sorted[rank - 1];
                prop_assert!(got.abs_diff(exact) as f64 <= exact as f64 * 0.01, "q{} exact {} got {}", q, exact, got);
            }
            prop_assert_eq!(p.max_us, *sorted.last().unwrap());
        }
    }

    #[test]
    fn inconsistent_snapshots_are_refused() {
        let mut s = snapshot(&[10, 20]);
        s.count = 3;
        assert!(matches!(
            Merged::from_snapshot(&s),
            Err(SnapshotError::Counts { .. })
        ));
        let mut s = snapshot(&[10]);
        s.seed.pop();
        assert_eq!(
            Merged::from_snapshot(&s),
            Err(SnapshotError::SeedBuckets(17))
        );
        let mut s = snapshot(&[10]);
        s.fine_index[0] = 1 << 30;
        assert!(matches!(
            Merged::from_snapshot(&s),
            Err(SnapshotError::Bucket(_))
        ));
        let mut s = snapshot(&[10]);
        s.fine_count.push(1);
        assert_eq!(Merged::from_snapshot(&s), Err(SnapshotError::FineLengths));
        // Own times and depths: none (an older agent), or one per exchange.
        let mut s = snapshot(&[10, 20]);
        (s.depth_index, s.depth_count) = (vec![], vec![]);
        assert_eq!(Merged::from_snapshot(&s).unwrap().depth.total(), 0);
        s.own_fine_count[0] += 1;
        assert!(matches!(
            Merged::from_snapshot(&s),
            Err(SnapshotError::PartCounts {
                what: "own time",
                ..
            })
        ));
    }
}
