//! Roll-ups of the histogram snapshots, per hour and per 10 minutes (as in SQLite), so that
//! a day of a fleet is a few thousand rows to sum, not hundreds of thousands.
//!
//! They stay exact though batches arrive late (an agent's spool), twice (a re-send while the
//! first commit was still running) or half (an aggregator killed mid-commit). A materialized
//! view cannot do that: 18.16 deduplicates inserts only on Replicated tables, so a re-sent
//! batch would be summed twice. Instead:
//!
//! * Every snapshot row carries `inserted_us`, its commit's start, and a commit inserts
//!   nothing after [`ABANDON`] (it fails, and the agent sends the batch again). A row whose
//!   `inserted_us` is more than [`SETTLE_US`] old is therefore in the store, and so is the
//!   suspect of its batch if it is a second copy (written before the copy's rows).
//! * A **roll-up** of a bucket (span, start) at watermark `w` sums the snapshots of the
//!   bucket whose first copy was inserted before `w`, each once: rows of other batches as they
//!   are, the suspects' rows collapsed to their first copy. A compaction (any aggregator, on
//!   its maintenance tick, at most every [`EVERY_US`]) takes `w` = now − [`SETTLE_US`] and
//!   rolls up again every closed bucket that gained rows since the last one. Its rows go
//!   first, then its **mark** (span, start, `w`): a roll-up without a mark (a compactor killed
//!   mid-way) is never read.
//! * A read of a time range takes, per bucket inside it, the roll-up of the newest mark,
//!   coarsest span first; then the snapshots the roll-ups do not hold: of the range, and in a
//!   rolled-up bucket only those whose first copy was inserted at or after its `w`
//!   ([`Plan::floor`]), read exactly once as any snapshot is (`Reader::exactly_once`).
//!
//! What the watermark assumes: the aggregators' clocks agree within [`SETTLE_US`] −
//! [`ABANDON`] (5 minutes), and ClickHouse finishes an insert within that time of the
//! request's deadline.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{batch_set, BatchKey, Client, Settings, MAX_SUSPECTS, SPLIT_SUMS, SUM_NAMES};
use crate::store::{Result, ROLLUP_SPANS_US};

/// A commit inserts nothing after this long.
pub const ABANDON: Duration = Duration::from_secs(600);

/// Rows are rolled up once their commit started this long ago: [`ABANDON`], and 5 minutes
/// for the aggregators' clocks to differ.
pub const SETTLE_US: u64 = 15 * 60 * 1_000_000;

/// A compaction runs at most this often.
const EVERY_US: u64 = 5 * 60 * 1_000_000;

/// Buckets rolled up by one statement at most (a day of hours).
const CHUNK: usize = 24;

/// The finest span: the unit of [`Plan::floor`].
const FINEST_US: u64 = ROLLUP_SPANS_US[ROLLUP_SPANS_US.len() - 1];

/// The columns of `rollups`: a bucket, its watermark, the group, the sums.
pub const ROLLUP_COLUMNS: &str = concat!(
    "span_us UInt64, bucket_us UInt64, w_us UInt64, agent String, server String, \
     port UInt32, proto String, command String, ",
    sum_columns!()
);

/// A roll-up that is complete: its bucket and watermark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mark {
    /// The bucket's span, µs.
    pub span_us: u64,
    /// The bucket's start, µs.
    pub bucket_us: u64,
    /// The watermark it was rolled up at.
    pub w_us: u64,
}

/// What a read of a time range takes from the roll-ups.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// The roll-ups to read.
    pub picks: Vec<Mark>,
    /// Per finest bucket (start / [`FINEST_US`]) inside a pick: the pick's watermark.
    floors: BTreeMap<u64, u64>,
}

impl Plan {
    /// Chooses, among the newest `marks` of each bucket, the roll-ups inside `[from, to)`
    /// (`to` 0: no end), coarsest first, none overlapping another.
    pub fn new(marks: &[Mark], from: u64, to: u64) -> Self {
        let end = if to == 0 { u64::MAX } else { to };
        let mut plan = Plan::default();
        for span in ROLLUP_SPANS_US {
            for m in marks.iter().filter(|m| m.span_us == span) {
                let inside = m.bucket_us >= from && m.bucket_us.saturating_add(span) <= end;
                let first = m.bucket_us / FINEST_US;
                let slots = first..first + span / FINEST_US;
                if !inside || slots.clone().any(|s| plan.floors.contains_key(&s)) {
                    continue;
                }
                plan.picks.push(*m);
                plan.floors.extend(slots.map(|s| (s, m.w_us)));
            }
        }
        plan
    }

    /// The condition that a row of the range is not in a roll-up picked: its bucket has
    /// none, or `inserted` (the row's first copy's `inserted_us`) is at or after its
    /// watermark. As time ranges (runs of buckets of one watermark), so that ClickHouse
    /// reads few columns to decide (`PREWHERE`). None when nothing is picked.
    pub fn floor(&self, inserted: &str) -> Option<String> {
        let mut runs: Vec<(u64, u64, u64)> = Vec::new();
        for (&slot, &w) in &self.floors {
            match runs.last_mut() {
                Some((_, end, last_w)) if *end == slot && *last_w == w => *end = slot + 1,
                _ => runs.push((slot, slot + 1, w)),
            }
        }
        if runs.is_empty() {
            return None;
        }
        Some(
            runs.iter()
                .map(|(first, end, w)| {
                    format!(
                        "(ts_us < {} OR ts_us >= {} OR {inserted} >= {w})",
                        first * FINEST_US,
                        end * FINEST_US
                    )
                })
                .collect::<Vec<_>>()
                .join(" AND "),
        )
    }

    /// The condition that a `rollups` row is of a pick: the range of each span first, for
    /// ClickHouse to read only those parts of its sorting key.
    pub fn picked(&self) -> String {
        let ranges = ROLLUP_SPANS_US
            .iter()
            .filter_map(|&span| {
                let starts = self.picks.iter().filter(|m| m.span_us == span);
                let first = starts.clone().map(|m| m.bucket_us).min()?;
                let last = starts.map(|m| m.bucket_us).max()?;
                Some(format!(
                    "(span_us = {span} AND bucket_us >= {first} AND bucket_us <= {last})"
                ))
            })
            .collect::<Vec<_>>();
        let set = self
            .picks
            .iter()
            .map(|m| format!("({}, {}, {})", m.span_us, m.bucket_us, m.w_us))
            .chain(["(0, 0, 0)".to_string()])
            .collect::<Vec<_>>()
            .join(", ");
        let ranges = if ranges.is_empty() {
            "0".to_string()
        } else {
            ranges.join(" OR ")
        };
        format!("({ranges}) AND (span_us, bucket_us, w_us) IN ({set})")
    }
}

/// The newest mark of every bucket that may lie inside `[from, to)`.
pub fn marks(client: &Client, s: &Settings, from: u64, to: u64) -> Result<Vec<Mark>> {
    let mut c = vec![format!("bucket_us >= {}", from - from % ROLLUP_SPANS_US[0])];
    if to > 0 {
        c.push(format!("bucket_us < {to}"));
    }
    client.rows(&format!(
        "SELECT span_us, bucket_us, max(w_us) AS w_us FROM {} WHERE {} \
         GROUP BY span_us, bucket_us",
        s.table("rollup_marks"),
        c.join(" AND ")
    ))
}

/// Rolls up, at watermark now − [`SETTLE_US`], every closed bucket that gained rows since
/// the last compaction (of any aggregator), unless that was less than [`EVERY_US`] ago.
/// Returns the buckets rolled up.
pub fn compact(
    client: &Client,
    s: &Settings,
    suspects: &BTreeSet<BatchKey>,
    now_us: u64,
) -> Result<u64> {
    #[derive(Deserialize)]
    struct Last {
        w_us: u64,
    }
    #[derive(Deserialize)]
    struct Bucket {
        b: u64,
    }
    #[derive(Serialize)]
    struct Done {
        w_us: u64,
        done_us: u64,
    }
    #[derive(Serialize)]
    struct MarkRow {
        #[serde(flatten)]
        mark: Mark,
        done_us: u64,
    }
    let w = now_us.saturating_sub(SETTLE_US);
    let last = client
        .rows::<Last>(&format!(
            "SELECT max(w_us) AS w_us FROM {}",
            s.table("compactions")
        ))?
        .first()
        .map_or(0, |l| l.w_us);
    if last > 0 && w < last + EVERY_US {
        return Ok(0);
    }
    let histograms = s.table("histograms");
    let mut rolled = 0;
    for span in ROLLUP_SPANS_US {
        // Gained rows since: inserted after the last watermark, or closed since (a bucket
        // still open then was left).
        let found: Vec<Bucket> = client.rows(&format!(
            "SELECT DISTINCT intDiv(ts_us, {span}) AS b FROM {histograms} \
             WHERE (inserted_us >= {last} AND inserted_us < {w}) \
             OR (ts_us >= {} AND ts_us < {w}) ORDER BY b",
            last.saturating_sub(span)
        ))?;
        let closed: Vec<u64> = found
            .into_iter()
            .map(|b| b.b)
            .filter(|b| (b + 1) * span <= w)
            .collect();
        for chunk in closed.chunks(CHUNK) {
            client.run(&roll_up_sql(s, span, chunk, w, suspects), b"")?;
            let marks: Vec<MarkRow> = chunk
                .iter()
                .map(|b| MarkRow {
                    mark: Mark {
                        span_us: span,
                        bucket_us: b * span,
                        w_us: w,
                    },
                    done_us: now_us,
                })
                .collect();
            client.insert(&s.table("rollup_marks"), &marks)?;
        }
        rolled += closed.len() as u64;
    }
    client.insert(
        &s.table("compactions"),
        &[Done {
            w_us: w,
            done_us: now_us,
        }],
    )?;
    Ok(rolled)
}

/// The snapshot columns a roll-up reads.
const RAW_COLUMNS: &str = concat!(
    "ts_us, agent, server, port, proto, command, inserted_us, ",
    sum_names!()
);

/// The statement that rolls up `buckets` (starts / `span`) at watermark `w`.
fn roll_up_sql(
    s: &Settings,
    span: u64,
    buckets: &[u64],
    w: u64,
    suspects: &BTreeSet<BatchKey>,
) -> String {
    let table = s.table("histograms");
    let (lo, hi) = (buckets[0] * span, (buckets[buckets.len() - 1] + 1) * span);
    let list = buckets
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    let range = format!("ts_us >= {lo} AND ts_us < {hi} AND intDiv(ts_us, {span}) IN ({list})");
    let collapsed = |which: &str| {
        format!(
            "SELECT {RAW_COLUMNS} FROM (SELECT * FROM {table} WHERE {range}{which} \
             ORDER BY inserted_us LIMIT 1 BY agent, session, seq, n) WHERE inserted_us < {w}"
        )
    };
    let source = if suspects.is_empty() {
        format!("SELECT {RAW_COLUMNS} FROM {table} WHERE {range} AND inserted_us < {w}")
    } else if suspects.len() > MAX_SUSPECTS {
        collapsed("")
    } else {
        let set = batch_set(suspects);
        format!(
            "SELECT {RAW_COLUMNS} FROM {table} WHERE {range} AND inserted_us < {w} \
             AND (agent, session, seq) NOT IN ({set}) UNION ALL {}",
            collapsed(&format!(" AND (agent, session, seq) IN ({set})"))
        )
    };
    format!(
        "INSERT INTO {} (span_us, bucket_us, w_us, agent, server, port, proto, command, \
         {SUM_NAMES}) \
         SELECT {span} AS span_us, bucket_us, {w} AS w_us, agent, server, port, proto, \
         command, {SPLIT_SUMS} FROM (SELECT intDiv(ts_us, {span}) * {span} AS bucket_us, \
         agent, server, port, proto, command, {} FROM ({source}) \
         GROUP BY bucket_us, agent, server, port, proto, command)",
        s.table("rollups"),
        super::ALL_SUMS
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::HOUR_US;

    const TEN: u64 = HOUR_US / 6;

    fn mark(span_us: u64, bucket_us: u64, w_us: u64) -> Mark {
        Mark {
            span_us,
            bucket_us,
            w_us,
        }
    }

    #[test]
    fn hours_first_then_ten_minutes_inside_the_range() {
        let marks = [
            mark(HOUR_US, 0, 7),
            mark(HOUR_US, HOUR_US, 8),
            mark(TEN, 0, 5),
            mark(TEN, HOUR_US + TEN, 8),
            mark(TEN, 2 * HOUR_US, 9),
            mark(TEN, 2 * HOUR_US + TEN, 9),
        ];
        // [10 min, 2 h 15 min): hour 0 is not inside, hour 1 is; the ten minutes at
        // 2 h is, the one at 2 h 10 min ends past the range.
        let plan = Plan::new(&marks, TEN, 2 * HOUR_US + 15 * 60_000_000);
        assert_eq!(
            plan.picks,
            [mark(HOUR_US, HOUR_US, 8), mark(TEN, 2 * HOUR_US, 9)]
        );
        assert_eq!(plan.floors.len(), 7);
        assert_eq!(plan.floors[&6], 8);
        assert_eq!(plan.floors[&12], 9);
        assert_eq!(
            plan.floor("inserted_us").expect("floor"),
            format!(
                "(ts_us < {HOUR_US} OR ts_us >= {} OR inserted_us >= 8) AND \
                 (ts_us < {} OR ts_us >= {} OR inserted_us >= 9)",
                2 * HOUR_US,
                2 * HOUR_US,
                2 * HOUR_US + TEN
            )
        );
        assert!(plan
            .picked()
            .contains(&format!("({HOUR_US}, {HOUR_US}, 8)")));
        assert!(plan
            .picked()
            .starts_with(&format!("((span_us = {HOUR_US} AND bucket_us >= {HOUR_US}")));
        // No end: every bucket past the start.
        let plan = Plan::new(&marks, 0, 0);
        assert_eq!(plan.picks.len(), 4);
        assert_eq!(
            Plan::new(&[], 0, 0).floor("inserted_us"),
            None,
            "nothing rolled up: no condition"
        );
    }

    #[test]
    fn a_ten_minute_roll_up_inside_a_picked_hour_is_not_read_twice() {
        let marks = [mark(TEN, HOUR_US + TEN, 3), mark(HOUR_US, HOUR_US, 4)];
        let plan = Plan::new(&marks, 0, 0);
        assert_eq!(plan.picks, [mark(HOUR_US, HOUR_US, 4)]);
    }
}
