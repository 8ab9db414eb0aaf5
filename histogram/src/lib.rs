//! Latency histograms, in the two forms DESIGN.md defines.
//!
//! * [`SEED_BOUNDS_US`]: the C tool's 18 buckets, kept for the stats JSON; bucket `i` counts
//!   latencies in `(bound[i-1], bound[i]]`, the last one everything above 20 s.
//! * [`FineHistogram`]: log-linear buckets (64 per power of two, exact below 64 µs) whose
//!   midpoints are within 0.79% of every value they hold; two histograms merge exactly by
//!   adding counts, so per-host histograms sum to the fleet's and its percentiles stay
//!   within 1%.

/// Upper bounds of the seed buckets in µs; the 18th bucket is unbounded.
pub const SEED_BOUNDS_US: [u64; 17] = [
    100, 200, 500, 1_000, 5_000, 10_000, 20_000, 50_000, 100_000, 200_000, 500_000, 1_000_000,
    2_000_000, 3_000_000, 5_000_000, 10_000_000, 20_000_000,
];
/// Number of seed buckets.
pub const SEED_BUCKETS: usize = 18;

/// Labels of the seed buckets, as the C tool prints them.
pub const SEED_LABELS: [&str; SEED_BUCKETS] = [
    "0ms~0.1ms",
    "0.1ms~0.2ms",
    "0.2ms~0.5ms",
    "0.5ms~1ms",
    "1ms~5ms",
    "5ms~10ms",
    "10ms~20ms",
    "20ms~50ms",
    "50ms~100ms",
    "100ms~200ms",
    "200ms~500ms",
    "500ms~1s",
    "1s~2s",
    "2s~3s",
    "3s~5s",
    "5s~10s",
    "10s~20s",
    "20s~+inf",
];

/// The seed bucket of a latency.
pub fn seed_bucket(latency_us: u64) -> usize {
    // From the smallest bound up: latencies cluster in the first few buckets, so this is a
    // couple of well-predicted compares, cheaper than a binary search or counting them all.
    SEED_BOUNDS_US
        .iter()
        .position(|&bound| latency_us <= bound)
        .unwrap_or(SEED_BOUNDS_US.len())
}

/// Bounds of the Prometheus buckets in µs: 10 µs doubling to 20.97 s (22 bounds), fine
/// enough below a millisecond for Redis and memcached; a last bucket holds the rest.
///
/// Latencies are whole microseconds, and each bound is an edge of the fine histogram's
/// buckets, so the Prometheus buckets are read off a [`FineHistogram`] exactly
/// ([`FineHistogram::prometheus_buckets`]) at no cost per exchange: bucket `i` holds
/// `[bound[i-1], bound[i])`, the latencies under its bound (a latency of exactly a bound is
/// in the next bucket, which is within the microsecond the capture's clock can tell).
pub const PROM_BOUNDS_US: [u64; 22] = {
    let mut bounds = [0; 22];
    let mut i = 0;
    while i < bounds.len() {
        bounds[i] = 10 << i;
        i += 1;
    }
    bounds
};
/// Number of Prometheus buckets (the bounds and the one above them).
pub const PROM_BUCKETS: usize = PROM_BOUNDS_US.len() + 1;

/// The Prometheus bucket of a latency: the first whose bound is above it.
#[inline]
pub fn prom_bucket(latency_us: u64) -> usize {
    // L / 10 is in [2^(i-1), 2^i) exactly when L is in [10·2^(i-1), 10·2^i).
    ((u64::BITS - (latency_us / 10).leading_zeros()) as usize).min(PROM_BUCKETS - 1)
}

/// The bound of the Prometheus bucket ([`PROM_BOUNDS_US`]) holding the `q` quantile of
/// latencies counted in `counts` (one per bucket), µs: the quantile is below it and at least
/// half of it (0 when empty; for the last bucket, its lower bound).
pub fn prom_quantile_bound_us(counts: impl Iterator<Item = u64> + Clone, q: f64) -> u64 {
    let total = counts.clone().fold(0u64, u64::saturating_add);
    if total == 0 {
        return 0;
    }
    let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
    let mut seen = 0u64;
    for (i, n) in counts.enumerate() {
        seen = seen.saturating_add(n);
        if seen >= rank {
            return PROM_BOUNDS_US[i.min(PROM_BOUNDS_US.len() - 1)];
        }
    }
    PROM_BOUNDS_US[PROM_BOUNDS_US.len() - 1]
}

/// Sub-buckets per power of two (2^6).
const SUB_BITS: u32 = 6;
const SUB: u64 = 1 << SUB_BITS;
/// Latencies are clamped to 2^40 µs (12.7 days).
const MAX_EXPONENT: u32 = 40;

/// Number of fine buckets: every index [`fine_index`] can return is below it.
pub const FINE_BUCKETS: usize = (SUB + (MAX_EXPONENT + 1 - SUB_BITS) as u64 * SUB) as usize;

/// A fine bucket index out of range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadBucket(pub u32);

impl std::fmt::Display for BadBucket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "fine histogram bucket {} out of range", self.0)
    }
}

impl std::error::Error for BadBucket {}

/// The fine bucket index of a value.
#[inline]
pub fn fine_index(value: u64) -> usize {
    if value < SUB {
        return value as usize;
    }
    let value = value.min((1 << (MAX_EXPONENT + 1)) - 1);
    let exponent = 63 - value.leading_zeros(); // >= SUB_BITS
    let shift = exponent - SUB_BITS;
    let sub = (value >> shift) & (SUB - 1);
    (SUB + u64::from(shift) * SUB + sub) as usize
}

/// The smallest value of a fine bucket.
pub fn fine_lower(index: usize) -> u64 {
    let index = index as u64;
    if index < SUB {
        return index;
    }
    let shift = (index - SUB) / SUB;
    (SUB + (index - SUB) % SUB) << shift
}

/// The value a fine bucket stands for: its midpoint (exact below 64 µs).
pub fn fine_value(index: usize) -> u64 {
    let index = index as u64;
    if index < SUB {
        return index;
    }
    let shift = (index - SUB) / SUB;
    let sub = (index - SUB) % SUB;
    let lower = (SUB + sub) << shift;
    lower + ((1u64 << shift) >> 1)
}

/// A mergeable latency histogram with ≤ 1% relative error.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FineHistogram {
    /// Counts per fine bucket, grown on demand up to the highest bucket seen.
    counts: Vec<u64>,
    total: u64,
    max_us: u64,
}

impl FineHistogram {
    /// Counts one latency.
    #[inline]
    pub fn record(&mut self, latency_us: u64) {
        self.record_at(fine_index(latency_us), latency_us);
    }

    /// Counts one latency whose bucket is known: `index` is [`fine_index`]`(latency_us)`
    /// (for a latency counted in several histograms, its bucket found once).
    #[inline]
    pub fn record_at(&mut self, index: usize, latency_us: u64) {
        debug_assert_eq!(index, fine_index(latency_us));
        if index >= self.counts.len() {
            self.counts.resize(index + 1, 0);
        }
        self.counts[index] += 1;
        self.total += 1;
        self.max_us = self.max_us.max(latency_us);
    }

    /// Counts `n` of the same latency (saturating).
    pub fn record_n(&mut self, latency_us: u64, n: u64) {
        if n == 0 {
            return;
        }
        let i = fine_index(latency_us);
        if i >= self.counts.len() {
            self.counts.resize(i + 1, 0);
        }
        self.counts[i] = self.counts[i].saturating_add(n);
        self.total = self.total.saturating_add(n);
        self.max_us = self.max_us.max(latency_us);
    }

    /// Adds another histogram's counts to this one (saturating: a sum never wraps).
    pub fn merge(&mut self, other: &FineHistogram) {
        if other.counts.len() > self.counts.len() {
            self.counts.resize(other.counts.len(), 0);
        }
        for (mine, theirs) in self.counts.iter_mut().zip(&other.counts) {
            *mine = mine.saturating_add(*theirs);
        }
        self.total = self.total.saturating_add(other.total);
        self.max_us = self.max_us.max(other.max_us);
    }

    /// The counts of the Prometheus buckets ([`PROM_BOUNDS_US`]), exact: every fine bucket
    /// lies within one of them.
    pub fn prometheus_buckets(&self) -> [u64; PROM_BUCKETS] {
        let mut out = [0; PROM_BUCKETS];
        for (i, &count) in self.counts.iter().enumerate() {
            if count > 0 {
                out[prom_bucket(fine_lower(i))] += count;
            }
        }
        out
    }

    /// Counts per bound: `out[i]` holds the values above `bounds[i-1]` and at most
    /// `bounds[i]`, and a last count the values above them all. Exact for bounds below 128
    /// (where each fine bucket holds one value) and for any bound one below a power of two;
    /// elsewhere a bucket straddling a bound counts under the bound above it.
    pub fn counts_at_most(&self, bounds: &[u64]) -> Vec<u64> {
        let mut out = vec![0; bounds.len() + 1];
        for (i, &count) in self.counts.iter().enumerate() {
            if count > 0 {
                let largest = fine_lower(i + 1) - 1;
                let at = bounds.partition_point(|&b| b < largest);
                out[at] += count;
            }
        }
        out
    }

    /// The largest latency, µs (exact).
    pub fn max_us(&self) -> u64 {
        self.max_us
    }

    /// The number of latencies counted.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// The non-empty buckets as `(index, count)`, in index order: the form shipped over the
    /// wire and stored.
    pub fn nonzero(&self) -> impl Iterator<Item = (u32, u64)> + '_ {
        self.counts
            .iter()
            .enumerate()
            .filter(|(_, &c)| c > 0)
            .map(|(i, &c)| (i as u32, c))
    }

    /// Rebuilds a histogram from its non-empty buckets and its maximum; an index beyond the
    /// last bucket is an error (it cannot come from [`FineHistogram::nonzero`]).
    pub fn from_nonzero(
        buckets: impl IntoIterator<Item = (u32, u64)>,
        max_us: u64,
    ) -> Result<Self, BadBucket> {
        let mut h = FineHistogram::default();
        h.add_nonzero(buckets, max_us)?;
        Ok(h)
    }

    /// Adds the histogram [`FineHistogram::from_nonzero`] would read, without building it
    /// apart (the store sums thousands of rows so). On a bad bucket, what came before it is
    /// added.
    pub fn add_nonzero(
        &mut self,
        buckets: impl IntoIterator<Item = (u32, u64)>,
        max_us: u64,
    ) -> Result<(), BadBucket> {
        for (index, count) in buckets {
            let i = index as usize;
            if i >= FINE_BUCKETS {
                return Err(BadBucket(index));
            }
            if i >= self.counts.len() {
                self.counts.resize(i + 1, 0);
            }
            self.counts[i] = self.counts[i].saturating_add(count);
            self.total = self.total.saturating_add(count);
        }
        self.max_us = self.max_us.max(max_us);
        Ok(())
    }

    /// The `q` quantile (0 < q ≤ 1), within 1%; 0 when empty.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        if rank == self.total {
            return self.max_us; // the largest value is known exactly
        }
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return fine_value(i).min(self.max_us);
            }
        }
        self.max_us
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_buckets_hold_what_is_under_their_bound() {
        let edges = PROM_BOUNDS_US.iter().flat_map(|&b| [b - 1, b, b + 1]);
        let mut fine = FineHistogram::default();
        let mut direct = [0u64; PROM_BUCKETS];
        for latency in (0..=100_000u64).chain(edges) {
            let i = prom_bucket(latency);
            let above = i == 0 || latency >= PROM_BOUNDS_US[i - 1];
            let below = i == PROM_BOUNDS_US.len() || latency < PROM_BOUNDS_US[i];
            assert!(above && below, "{latency} µs in bucket {i}");
            fine.record(latency);
            direct[i] += 1;
        }
        // Read off the fine histogram, the buckets are exactly the direct counts.
        assert_eq!(fine.prometheus_buckets(), direct);
        for (latency, bucket) in [
            (0, 0),
            (9, 0),
            (10, 1),
            (19, 1),
            (20, 2),
            (20_971_519, 21),
            (20_971_520, 22),
            (u64::MAX, 22),
        ] {
            assert_eq!(prom_bucket(latency), bucket, "{latency}");
        }
    }

    #[test]
    fn counts_at_most_are_exact_where_the_doc_says() {
        let bounds = [1, 2, 4, 8, 16, 32, 64, 127, 255, 4095];
        let mut fine = FineHistogram::default();
        let mut direct = vec![0u64; bounds.len() + 1];
        for v in 0..10_000u64 {
            fine.record(v);
            direct[bounds.partition_point(|&b| b < v)] += 1;
        }
        assert_eq!(fine.counts_at_most(&bounds), direct);
        assert_eq!(fine.counts_at_most(&bounds)[..2], [2, 1]); // 0 and 1; then 2
    }

    use proptest::prelude::*;

    #[test]
    fn seed_buckets_are_upper_inclusive() {
        assert_eq!(seed_bucket(0), 0);
        assert_eq!(seed_bucket(100), 0);
        assert_eq!(seed_bucket(101), 1);
        assert_eq!(seed_bucket(1_000), 3);
        assert_eq!(seed_bucket(20_000_000), 16);
        assert_eq!(seed_bucket(20_000_001), 17);
        assert_eq!(seed_bucket(u64::MAX), 17);
        // Every bound and its neighbours land where a search of the bounds says.
        for bound in SEED_BOUNDS_US {
            for v in [bound - 1, bound, bound + 1] {
                assert_eq!(
                    seed_bucket(v),
                    SEED_BOUNDS_US.partition_point(|&b| b < v),
                    "{v}"
                );
            }
        }
    }

    #[test]
    fn every_index_is_below_fine_buckets() {
        assert_eq!(fine_index(u64::MAX), FINE_BUCKETS - 1);
        assert_eq!(
            FineHistogram::from_nonzero([(FINE_BUCKETS as u32, 1)], 0),
            Err(BadBucket(FINE_BUCKETS as u32))
        );
    }

    #[test]
    fn fine_buckets_are_monotonic_and_tight() {
        let mut last = 0;
        for v in (0..200_000u64).chain((1..2000).map(|i| i * 7_919_993)) {
            let i = fine_index(v);
            assert!(i >= last, "index goes down at {v}");
            last = i;
            let rep = fine_value(i);
            let err = rep.abs_diff(v) as f64 / v.max(1) as f64;
            assert!(err <= 0.008, "{v} → bucket {i} stands for {rep}");
        }
    }

    proptest! {
        #[test]
        fn percentiles_within_one_percent_and_merge_is_exact(
            a in proptest::collection::vec(1u64..5_000_000, 1..500),
            b in proptest::collection::vec(1u64..5_000_000, 1..500),
        ) {
            let (mut ha, mut hb, mut all) = (FineHistogram::default(), FineHistogram::default(), FineHistogram::default());
            a.iter().for_each(|&v| { ha.record(v); all.record(v) });
            b.iter().for_each(|&v| { hb.record(v); all.record(v) });
            ha.merge(&hb);
            prop_assert_eq!(&ha, &all);
            let rebuilt = FineHistogram::from_nonzero(all.nonzero(), all.max_us()).unwrap();
            prop_assert_eq!(&rebuilt, &all);
            let mut sorted: Vec<u64> = a.iter().chain(&b).copied().collect();
            sorted.sort_unstable();
            for q in [0.5, 0.9, 0.99, 0.999, 1.0] {
                let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
                let exact = sorted[rank - 1];
                let got = all.quantile(q);
                prop_assert!(got.abs_diff(exact) as f64 <= exact as f64 * 0.01, "q{} exact {} got {}", q, exact, got);
            }
        }
    }
}
