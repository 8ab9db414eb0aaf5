//! `tcpkit-query heatmap`: a series (`Query.Series`) drawn in the terminal. Time goes
//! across, one column per step; latency goes up, one row per Prometheus bucket (10 µs
//! doubling, a log scale); a cell's shade (and colour on a terminal) is its count on a log
//! scale; `5` and `9` mark the bucket of each column's p50 and p99.

use std::fmt::Write as _;

use tcpkit_histogram::{fine_lower, prom_bucket, PROM_BOUNDS_US, PROM_BUCKETS};
use tcpkit_proto::v1;

use crate::units::format_local;

/// Shades from empty to the fullest cell.
const SHADES: [char; 5] = [' ', '░', '▒', '▓', '█'];

/// 256-colour foregrounds from few to many (dark blue to yellow).
const RAMP: [u8; 8] = [24, 25, 31, 37, 72, 107, 178, 226];

/// One group's counts per (latency bucket, step).
#[derive(Debug, PartialEq, Eq)]
pub struct Heatmap {
    /// The start of each column's step, µs.
    pub columns: Vec<u64>,
    /// `cells[bucket][column]`: requests.
    pub cells: Vec<Vec<u64>>,
    /// Per column, the buckets of its p50 and p99 (None when empty).
    pub marks: Vec<Option<(usize, usize)>>,
}

impl Heatmap {
    /// The heatmap of `series` over the reply's range and step.
    pub fn new(series: &v1::Series, step_us: u64, from_us: u64, to_us: u64) -> Self {
        let first = from_us - from_us % step_us.max(1);
        let columns: Vec<u64> = (first..to_us).step_by(step_us.max(1) as usize).collect();
        let mut cells = vec![vec![0u64; columns.len()]; PROM_BUCKETS];
        let mut marks = vec![None; columns.len()];
        for step in &series.steps {
            let Some(h) = &step.histogram else { continue };
            let Some(col) = columns.iter().position(|&c| c == step.ts_us) else {
                continue;
            };
            for (&i, &n) in h.fine_index.iter().zip(&h.fine_count) {
                let b = prom_bucket(fine_lower(i as usize));
                cells[b][col] = cells[b][col].saturating_add(n);
            }
            if h.count > 0 {
                marks[col] = Some((prom_bucket(h.p50_us), prom_bucket(h.p99_us)));
            }
        }
        Heatmap {
            columns,
            cells,
            marks,
        }
    }

    /// The requests in it.
    pub fn total(&self) -> u64 {
        self.cells.iter().flatten().sum()
    }

    /// The map as text: the rows from the slowest bucket with requests down to the fastest,
    /// each labelled with its bound, then the time axis and the legend. `color`: ANSI
    /// 256-colour shades (a terminal without NO_COLOR).
    pub fn render(&self, color: bool) -> String {
        let max = self.cells.iter().flatten().copied().max().unwrap_or(0);
        let used: Vec<usize> = (0..PROM_BUCKETS)
            .filter(|&b| self.cells[b].iter().any(|&n| n > 0))
            .collect();
        let mut out = String::new();
        let (Some(&low), Some(&high)) = (used.first(), used.last()) else {
            out.push_str("no requests in the range\n");
            return out;
        };
        for b in (low..=high).rev() {
            let _ = write!(out, "{:>9} │", bucket_label(b));
            for (col, &n) in self.cells[b].iter().enumerate() {
                let level = shade(n, max);
                let glyph = match self.marks[col] {
                    Some((_, p99)) if p99 == b => '9',
                    Some((p50, _)) if p50 == b => '5',
                    _ => SHADES[level],
                };
                if color && n > 0 {
                    let c = RAMP[((n as f64).ln_1p() / (max as f64).ln_1p()
                        * (RAMP.len() - 1) as f64)
                        .round() as usize];
                    let _ = write!(out, "\x1b[38;5;{c}m{glyph}\x1b[0m");
                } else {
                    out.push(glyph);
                }
            }
            out.push('\n');
        }
        let width = self.columns.len();
        let _ = writeln!(out, "{:>9} └{}", "", "─".repeat(width));
        if let (Some(first), Some(last)) = (self.columns.first(), self.columns.last()) {
            let _ = writeln!(
                out,
                "{:>9}  {} … {} ({} columns)",
                "",
                format_local(*first),
                format_local(*last),
                width
            );
        }
        let _ = writeln!(
            out,
            "{:>9}  {} requests; shades ░▒▓█ up to {max} in a cell (log scale); 5 = p50, 9 = p99 of the column",
            "",
            self.total()
        );
        out
    }
}

/// The shade of `n` out of `max`: 0 for none, else 1..=4 by the logarithm.
fn shade(n: u64, max: u64) -> usize {
    if n == 0 || max == 0 {
        return 0;
    }
    let share = (n as f64).ln_1p() / (max as f64).ln_1p();
    ((share * 4.0).ceil() as usize).clamp(1, 4)
}

/// A Prometheus bucket's upper bound, for the row labels ("<10µs", "<1.3ms", "≥21s").
fn bucket_label(b: usize) -> String {
    let Some(&bound) = PROM_BOUNDS_US.get(b) else {
        return format!("≥{}", micros(PROM_BOUNDS_US[PROM_BOUNDS_US.len() - 1]));
    };
    format!("<{}", micros(bound))
}

fn micros(us: u64) -> String {
    if us < 1_000 {
        format!("{us}µs")
    } else if us < 1_000_000 {
        format!("{:.3}", us as f64 / 1_000.0)
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_string()
            + "ms"
    } else {
        format!("{:.2}", us as f64 / 1_000_000.0)
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_string()
            + "s"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tcpkit_histogram::fine_index;

    fn step(ts_us: u64, latencies: &[(u64, u64)], p50: u64, p99: u64) -> v1::SeriesStep {
        v1::SeriesStep {
            ts_us,
            histogram: Some(v1::Histogram {
                count: latencies.iter().map(|l| l.1).sum(),
                p50_us: p50,
                p99_us: p99,
                fine_index: latencies.iter().map(|l| fine_index(l.0) as u32).collect(),
                fine_count: latencies.iter().map(|l| l.1).collect(),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn cells_add_up_and_columns_cover_the_range() {
        let series = v1::Series {
            steps: vec![
                step(60, &[(15, 100), (5_000, 3)], 15, 5_000),
                step(180, &[(250_000, 1)], 250_000, 250_000),
            ],
            ..Default::default()
        };
        let map = Heatmap::new(&series, 60, 70, 240);
        assert_eq!(map.columns, [60, 120, 180]);
        assert_eq!(map.total(), 104);
        assert_eq!(map.cells[prom_bucket(15)][0], 100);
        assert_eq!(map.cells[prom_bucket(5_000)][0], 3);
        assert_eq!(map.cells[prom_bucket(250_000)][2], 1);
        assert_eq!(map.marks[1], None);
        let text = map.render(false);
        let rows: Vec<&str> = text.lines().collect();
        // From <327.68ms (250 ms) down to <20µs (15 µs): 15 rows, then the axis lines.
        assert!(rows[0].starts_with("<327.68ms │"), "{text}");
        assert!(rows[0].ends_with("  9"), "{text}");
        assert!(rows[14].starts_with("    <20µs │5"), "{text}");
        assert!(text.contains("104 requests"));
        assert!(!text.contains('\x1b'));
        assert!(map.render(true).contains("\x1b[38;5;"));
    }

    #[test]
    fn an_empty_series_says_so() {
        let map = Heatmap::new(&v1::Series::default(), 10, 0, 100);
        assert_eq!(map.total(), 0);
        assert_eq!(map.render(false), "no requests in the range\n");
    }

    #[test]
    fn shades_are_logarithmic_and_never_hide_one_request() {
        assert_eq!(shade(0, 1000), 0);
        assert_eq!(shade(1, 1_000_000), 1);
        assert_eq!(shade(1000, 1000), 4);
        assert!(shade(30, 1000) >= 2);
    }
}
