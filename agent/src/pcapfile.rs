//! Classic pcap files read in place: the file is mapped and each record's bytes are handed
//! out without a copy (libpcap's reader copies every record through stdio). pcapng files, and
//! anything this reader does not know, go through libpcap instead.
//!
//! The format: a 24-byte header (magic a1b2c3d4 for µs or a1b23c4d for ns timestamps, in
//! either byte order; version; snaplen; link type), then records of a 16-byte header
//! (seconds, fraction, captured length, original length) and the captured bytes.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use memmap2::Mmap;

/// Records longer than this are taken for corruption (libpcap's own bound is 256 KiB for
/// most link types; some allow more).
const MAX_RECORD: usize = 64 << 20;

/// One record: where its bytes are in the file, and its time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    /// Seconds since the epoch.
    pub ts_sec: i64,
    /// Microseconds within the second.
    pub ts_usec: u32,
    /// Where the captured bytes start in the file.
    pub start: usize,
    /// How many bytes were captured.
    pub len: usize,
    /// How long the frame was on the wire.
    pub wire_len: u32,
}

/// Why reading stopped early.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// The file ends inside a record.
    #[error("truncated dump file; tried to read {wanted} captured bytes, only got {got}")]
    Truncated {
        /// Bytes the record announced.
        wanted: usize,
        /// Bytes left in the file.
        got: usize,
    },
    /// A record header that cannot be right.
    #[error("invalid packet capture length {0}, bigger than the maximum of {MAX_RECORD}")]
    TooLong(usize),
}

/// A classic pcap file, mapped.
#[derive(Debug)]
pub struct MappedPcap {
    map: Arc<Mmap>,
    swapped: bool,
    nanos: bool,
    pos: usize,
}

impl MappedPcap {
    /// Maps `path` when it is a classic pcap file; `None` for anything else (pcapng, or a
    /// file that cannot be mapped), which libpcap then reads.
    pub fn open(path: &Path) -> Option<Self> {
        let file = File::open(path).ok()?;
        // SAFETY: the map is read-only; a file truncated by another process while mapped
        // would fault, as it would for any reader of a file being cut under it.
        let map = unsafe { Mmap::map(&file) }.ok()?;
        let magic: [u8; 4] = map.get(..4)?.try_into().ok()?;
        let (swapped, nanos) = match magic {
            [0xd4, 0xc3, 0xb2, 0xa1] => (false, false),
            [0xa1, 0xb2, 0xc3, 0xd4] => (true, false),
            [0x4d, 0x3c, 0xb2, 0xa1] => (false, true),
            [0xa1, 0xb2, 0x3c, 0x4d] => (true, true),
            _ => return None,
        };
        if map.len() < 24 {
            return None;
        }
        #[cfg(unix)]
        let _ = map.advise(memmap2::Advice::Sequential);
        Some(Self {
            map: Arc::new(map),
            swapped,
            nanos,
            pos: 24,
        })
    }

    /// The whole file, to be shared with other threads (records point into it).
    pub fn bytes(&self) -> Arc<Mmap> {
        Arc::clone(&self.map)
    }

    /// The captured bytes of a record.
    pub fn data(&self, record: &Record) -> &[u8] {
        &self.map[record.start..record.start + record.len]
    }

    /// Bytes read so far.
    pub fn position(&self) -> usize {
        self.pos
    }

    fn u32_at(&self, at: usize) -> u32 {
        let bytes: [u8; 4] = self.map[at..at + 4].try_into().expect("4 bytes");
        if self.swapped {
            u32::from_be_bytes(bytes)
        } else {
            u32::from_le_bytes(bytes)
        }
    }

    /// The next record, `None` at the end of the file.
    pub fn next_record(&mut self) -> Option<Result<Record, RecordError>> {
        let left = self.map.len() - self.pos;
        if left == 0 {
            return None;
        }
        if left < 16 {
            self.pos = self.map.len();
            return Some(Err(RecordError::Truncated {
                wanted: 16,
                got: left,
            }));
        }
        let at = self.pos;
        let (sec, frac) = (self.u32_at(at), self.u32_at(at + 4));
        let (len, wire_len) = (self.u32_at(at + 8) as usize, self.u32_at(at + 12));
        if len > MAX_RECORD {
            self.pos = self.map.len();
            return Some(Err(RecordError::TooLong(len)));
        }
        if left - 16 < len {
            self.pos = self.map.len();
            return Some(Err(RecordError::Truncated {
                wanted: len,
                got: left - 16,
            }));
        }
        self.pos = at + 16 + len;
        let ts_usec = if self.nanos { frac / 1000 } else { frac };
        Some(Ok(Record {
            ts_sec: i64::from(sec),
            ts_usec: ts_usec.min(999_999),
            start: at + 16,
            len,
            wire_len,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(bytes: &[u8]) -> std::path::PathBuf {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "tcpkit-pcapfile-{}-{}.pcap",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, bytes).unwrap();
        path
    }

    fn pcap(magic: u32, big_endian: bool, records: &[(u32, u32, &[u8])]) -> Vec<u8> {
        let w = |v: u32| {
            if big_endian {
                v.to_be_bytes()
            } else {
                v.to_le_bytes()
            }
        };
        let mut out = Vec::new();
        out.extend_from_slice(&w(magic));
        out.extend_from_slice(&[0; 16]); // version, zone, sigfigs, snaplen: not read
        out.extend_from_slice(&w(1));
        for (sec, frac, data) in records {
            for v in [*sec, *frac, data.len() as u32, data.len() as u32 + 4] {
                out.extend_from_slice(&w(v));
            }
            out.extend_from_slice(data);
        }
        out
    }

    /// A record as read back: seconds, microseconds, bytes.
    type Read = Result<(i64, u32, Vec<u8>), RecordError>;

    fn read_all(path: &Path) -> Vec<Read> {
        let mut m = MappedPcap::open(path).expect("a classic pcap");
        let map = m.bytes();
        std::iter::from_fn(|| m.next_record())
            .map(|r| r.map(|r| (r.ts_sec, r.ts_usec, map[r.start..r.start + r.len].to_vec())))
            .collect()
    }

    #[test]
    fn both_byte_orders_and_both_time_units() {
        let records: &[(u32, u32, &[u8])] = &[(10, 999_999, b"abc"), (11, 5, b"")];
        for big in [false, true] {
            let path = file(&pcap(0xa1b2_c3d4, big, records));
            assert_eq!(
                read_all(&path),
                [Ok((10, 999_999, b"abc".to_vec())), Ok((11, 5, Vec::new()))]
            );
            let path = file(&pcap(0xa1b2_3c4d, big, &[(10, 999_999_999, b"x")]));
            assert_eq!(read_all(&path), [Ok((10, 999_999, b"x".to_vec()))]);
        }
    }

    #[test]
    fn a_cut_file_ends_with_a_truncation_error() {
        let whole = pcap(0xa1b2_c3d4, false, &[(1, 0, b"hello"), (2, 0, b"world")]);
        let path = file(&whole[..whole.len() - 2]);
        let got = read_all(&path);
        assert_eq!(got[0], Ok((1, 0, b"hello".to_vec())));
        assert_eq!(got[1], Err(RecordError::Truncated { wanted: 5, got: 3 }));
        assert_eq!(got.len(), 2);
        let path = file(&whole[..24 + 21 + 7]);
        assert_eq!(
            read_all(&path)[1],
            Err(RecordError::Truncated { wanted: 16, got: 7 })
        );
        let mut huge = pcap(0xa1b2_c3d4, false, &[(1, 0, b"x")]);
        huge[32..36].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            read_all(&file(&huge))[0],
            Err(RecordError::TooLong(u32::MAX as usize))
        );
    }

    #[test]
    fn other_formats_are_left_to_libpcap() {
        assert!(MappedPcap::open(&file(b"\x0a\x0d\x0d\x0a pcapng")).is_none());
        assert!(MappedPcap::open(&file(b"")).is_none());
        assert!(MappedPcap::open(&file(&[0xd4, 0xc3, 0xb2, 0xa1, 0])).is_none());
    }
}
