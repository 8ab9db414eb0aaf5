//! A capture mangler: the faults a real capture has — packets lost, swapped with their
//! neighbour, captured ahead of where they belong, duplicated at once or re-sent later, cut by
//! a small snaplen — applied to a classic pcap file, seeded, every record keeping its own
//! timestamp. The clean capture's output is the oracle for the mangled one.

use std::path::Path;

/// One fault, applied to each record with probability `p` where it has one.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fault {
    /// A record is dropped.
    Drop(f64),
    /// A record and the next one trade places.
    SwapAdjacent(f64),
    /// A record is moved 2 to 8 places earlier.
    MoveAhead(f64),
    /// A record is repeated right after itself.
    Duplicate(f64),
    /// A copy of a record is inserted 20 to 200 places later.
    ResendLater(f64),
    /// Every record is cut to this many bytes (the captured length; the wire length stays).
    Snaplen(usize),
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fault::Drop(p) => write!(f, "drop {}%", p * 100.0),
            Fault::SwapAdjacent(p) => write!(f, "swap {}%", p * 100.0),
            Fault::MoveAhead(p) => write!(f, "move ahead {}%", p * 100.0),
            Fault::Duplicate(p) => write!(f, "duplicate {}%", p * 100.0),
            Fault::ResendLater(p) => write!(f, "re-send later {}%", p * 100.0),
            Fault::Snaplen(n) => write!(f, "snaplen {n}"),
        }
    }
}

/// A classic pcap file: its 24-byte header and its records (16-byte header, then the bytes).
#[derive(Debug, Clone)]
pub struct Pcap {
    header: Vec<u8>,
    records: Vec<Vec<u8>>,
}

impl Pcap {
    /// Reads a little-endian classic pcap file.
    pub fn read(path: &Path) -> Self {
        let bytes = std::fs::read(path).expect("read the capture");
        assert_eq!(
            &bytes[..4],
            &[0xd4, 0xc3, 0xb2, 0xa1],
            "a little-endian pcap"
        );
        let mut records = Vec::new();
        let mut at = 24;
        while at + 16 <= bytes.len() {
            let caplen = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap()) as usize;
            records.push(bytes[at..at + 16 + caplen].to_vec());
            at += 16 + caplen;
        }
        Self {
            header: bytes[..24].to_vec(),
            records,
        }
    }

    /// Writes the file.
    pub fn write(&self, path: &Path) {
        let mut out = self.header.clone();
        for r in &self.records {
            out.extend_from_slice(r);
        }
        std::fs::write(path, out).expect("write the capture");
    }

    /// Records in the file.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// True when the file has no record.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// The capture with `fault` applied, chosen by `seed`.
    pub fn mangled(&self, fault: Fault, seed: u64) -> Pcap {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let mut records = self.records.clone();
        match fault {
            Fault::Drop(p) => records.retain(|_| !rng.chance(p)),
            Fault::SwapAdjacent(p) => {
                let mut i = 0;
                while i + 1 < records.len() {
                    if rng.chance(p) {
                        records.swap(i, i + 1);
                        i += 1;
                    }
                    i += 1;
                }
            }
            Fault::MoveAhead(p) => {
                for i in 2..records.len() {
                    if rng.chance(p) {
                        let to = i.saturating_sub(2 + rng.below(7));
                        let r = records.remove(i);
                        records.insert(to, r);
                    }
                }
            }
            Fault::Duplicate(p) => {
                records = records
                    .into_iter()
                    .flat_map(|r| {
                        let copies = if rng.chance(p) { 2 } else { 1 };
                        std::iter::repeat_n(r, copies)
                    })
                    .collect();
            }
            Fault::ResendLater(p) => {
                let mut i = 0;
                while i < records.len() {
                    if rng.chance(p) {
                        let to = (i + 20 + rng.below(181)).min(records.len());
                        let copy = records[i].clone();
                        records.insert(to, copy);
                    }
                    i += 1;
                }
            }
            Fault::Snaplen(n) => {
                for r in &mut records {
                    let caplen = (r.len() - 16).min(n);
                    r.truncate(16 + caplen);
                    r[8..12].copy_from_slice(&(caplen as u32).to_le_bytes());
                }
            }
        }
        Pcap {
            header: self.header.clone(),
            records,
        }
    }
}

/// xorshift64*: small, seeded, the same on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn chance(&mut self, p: f64) -> bool {
        ((self.next() >> 11) as f64 / (1u64 << 53) as f64) < p
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// A slow-log line split into what identifies the exchange and its latency in µs (`None` for
/// a timeout line).
pub fn split_line(line: &str) -> Option<(String, Option<u64>)> {
    let mut parts = line.splitn(3, " | ");
    let (head, latency, summary) = (parts.next()?, parts.next()?, parts.next()?);
    let key = format!("{head} | {summary}");
    if latency == "timeout" {
        return Some((key, None));
    }
    let ms = latency.strip_suffix(" ms")?;
    let (whole, frac) = ms.split_once('.')?;
    let us = whole.parse::<u64>().ok()? * 1000 + frac.parse::<u64>().ok()?;
    Some((key, Some(us)))
}

/// How the lines printed from a mangled capture compare with the clean run's.
#[derive(Debug, Default, Clone, Copy)]
pub struct Comparison {
    /// Latency lines of the clean run.
    pub clean: usize,
    /// Latency lines of the mangled run that are lines of the clean run (same request, same
    /// latency within 5 µs).
    pub kept: usize,
    /// Latency lines of the mangled run that are not: wrong pairings.
    pub wrong: usize,
}

impl Comparison {
    /// Compares the latency lines of a mangled run (`lines`) with the clean run's.
    pub fn of(clean: &str, mangled: &str, wrong_lines: &mut Vec<String>) -> Self {
        let mut oracle: std::collections::HashMap<String, Vec<u64>> = Default::default();
        let mut c = Comparison::default();
        for (key, us) in clean.lines().filter_map(split_line) {
            if let Some(us) = us {
                oracle.entry(key).or_default().push(us);
                c.clean += 1;
            }
        }
        for line in mangled.lines() {
            let Some((key, Some(us))) = split_line(line) else {
                continue;
            };
            // The closest latency of the same request, so that near values do not steal
            // each other's match.
            let found = oracle.get_mut(&key).and_then(|l| {
                let closest = (0..l.len()).min_by_key(|&i| l[i].abs_diff(us))?;
                (l[closest].abs_diff(us) <= 5).then_some((l, closest))
            });
            match found {
                Some((l, i)) => {
                    l.swap_remove(i);
                    c.kept += 1;
                }
                None => {
                    c.wrong += 1;
                    wrong_lines.push(line.to_string());
                }
            }
        }
        c
    }

    /// Adds another comparison's counts.
    pub fn add(&mut self, other: Comparison) {
        self.clean += other.clean;
        self.kept += other.kept;
        self.wrong += other.wrong;
    }

    /// Lines kept of the clean run's.
    pub fn recall(&self) -> f64 {
        if self.clean == 0 {
            1.0
        } else {
            self.kept as f64 / self.clean as f64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_split_into_exchange_and_latency() {
        let line = "2018-11-16 18:38:36.873067 1.2.3.4:5 => 6.7.8.9:6379 | 11.204 ms | set foo bar";
        let (key, us) = split_line(line).unwrap();
        assert_eq!(us, Some(11_204));
        assert!(key.ends_with("| set foo bar"));
        let timeout = "2018-11-16 18:38:36.873067 1.2.3.4:5 => 6.7.8.9:53 | timeout | A x.";
        assert_eq!(split_line(timeout).unwrap().1, None);
    }

    #[test]
    fn a_line_with_another_latency_is_wrong() {
        let clean = "t a => b | 1.000 ms | GET k\nt a => b | 2.000 ms | GET k\n";
        let mut wrong = Vec::new();
        let same = Comparison::of(clean, "t a => b | 2.003 ms | GET k\n", &mut wrong);
        assert_eq!((same.kept, same.wrong), (1, 0));
        let off = Comparison::of(clean, "t a => b | 1.500 ms | GET k\n", &mut wrong);
        assert_eq!((off.kept, off.wrong), (0, 1));
        // Each clean line answers for one mangled line only.
        let twice = "t a => b | 1.000 ms | GET k\nt a => b | 1.000 ms | GET k\n";
        assert_eq!(Comparison::of(clean, twice, &mut wrong).wrong, 1);
    }
}
