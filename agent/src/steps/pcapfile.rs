//! Classic pcap files read in blocks: the file is read with read(2) into a few reused 2 MiB
//! buffers, and each record's bytes are handed out in place, without a copy per record
//! (libpcap copies every record through stdio). The blocks are shared: other threads may
//! read the frames of a block while the next is filled. Mapping the file instead cost a TLB
//! miss every 4 KiB in every thread that touched it (about 10% more CPU time on a virtual
//! machine); a few reused buffers stay in the TLB. pcapng files, and anything this reader
//! does not know, go through libpcap instead.
//!
//! The format: a 24-byte header (magic a1b2c3d4 for µs or a1b23c4d for ns timestamps, in
//! either byte order; version; snaplen; link type), then records of a 16-byte header
//! (seconds, fraction, captured length, original length) and the captured bytes.

use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::sync::Arc;

/// Records longer than this are taken for corruption (libpcap's own bound is 256 KiB for
/// most link types; some allow more).
const MAX_RECORD: usize = 64 << 20;
/// Bytes read at once, and the size of a block.
const BLOCK_BYTES: usize = 2 << 20;

/// One record: where its bytes are in the current block, and its time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    /// Seconds since the epoch.
    pub ts_sec: i64,
    /// Microseconds within the second.
    pub ts_usec: u32,
    /// Where the captured bytes start in the block.
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
    /// Reading the file failed.
    #[error("read failed: {0}")]
    Io(String),
}

/// A buffer of file bytes, shared by the threads that read its records.
#[derive(Debug)]
pub struct Block {
    bytes: Box<[u8]>,
}

impl Block {
    fn new(len: usize) -> Self {
        Self {
            bytes: vec![0; len].into_boxed_slice(),
        }
    }
}

impl std::ops::Deref for Block {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.bytes
    }
}

/// A classic pcap file, read block by block.
#[derive(Debug)]
pub struct BlockPcap {
    file: File,
    swapped: bool,
    nanos: bool,
    block_bytes: usize,
    /// The block being read: `current[pos..end]` is not parsed yet.
    current: Arc<Block>,
    pos: usize,
    end: usize,
    /// The file has no more bytes.
    eof: bool,
    /// Earlier blocks, reused once no other thread holds them.
    spare: Vec<Arc<Block>>,
    /// Bytes of the file parsed so far.
    parsed: u64,
}

impl BlockPcap {
    /// Opens `path` when it is a classic pcap file; `None` for anything else (pcapng, or a
    /// file that cannot be read), which libpcap then reads.
    pub fn open(path: &Path) -> Option<Self> {
        Self::with_block_size(path, BLOCK_BYTES)
    }

    fn with_block_size(path: &Path, block_bytes: usize) -> Option<Self> {
        let mut file = File::open(path).ok()?;
        let mut header = [0u8; 24];
        file.read_exact(&mut header).ok()?;
        let (swapped, nanos) = match header[..4] {
            [0xd4, 0xc3, 0xb2, 0xa1] => (false, false),
            [0xa1, 0xb2, 0xc3, 0xd4] => (true, false),
            [0x4d, 0x3c, 0xb2, 0xa1] => (false, true),
            [0xa1, 0xb2, 0x3c, 0x4d] => (true, true),
            _ => return None,
        };
        Some(Self {
            file,
            swapped,
            nanos,
            block_bytes,
            current: Arc::new(Block::new(block_bytes)),
            pos: 0,
            end: 0,
            eof: false,
            spare: Vec::new(),
            parsed: 24,
        })
    }

    /// The block the last record is in, to be shared with other threads.
    pub fn block(&self) -> &Arc<Block> {
        &self.current
    }

    /// The captured bytes of the last record.
    pub fn data(&self, record: &Record) -> &[u8] {
        &self.current[record.start..record.start + record.len]
    }

    /// Bytes of the file read so far.
    pub fn position(&self) -> u64 {
        self.parsed
    }

    fn u32_at(&self, at: usize) -> u32 {
        let bytes: [u8; 4] = self.current[at..at + 4].try_into().expect("4 bytes");
        if self.swapped {
            u32::from_be_bytes(bytes)
        } else {
            u32::from_le_bytes(bytes)
        }
    }

    /// The next record, `None` at the end of the file.
    pub fn next_record(&mut self) -> Option<Result<Record, RecordError>> {
        if self.end - self.pos < 16 {
            if let Err(e) = self.refill(16) {
                return Some(Err(e));
            }
        }
        let left = self.end - self.pos;
        if left == 0 {
            return None;
        }
        if left < 16 {
            self.pos = self.end;
            return Some(Err(RecordError::Truncated {
                wanted: 16,
                got: left,
            }));
        }
        let len = self.u32_at(self.pos + 8) as usize;
        if len > MAX_RECORD {
            self.pos = self.end;
            return Some(Err(RecordError::TooLong(len)));
        }
        if left - 16 < len {
            if let Err(e) = self.refill(16 + len) {
                return Some(Err(e));
            }
            let left = self.end - self.pos;
            if left - 16 < len {
                self.pos = self.end;
                return Some(Err(RecordError::Truncated {
                    wanted: len,
                    got: left - 16,
                }));
            }
        }
        let at = self.pos;
        let (sec, frac) = (self.u32_at(at), self.u32_at(at + 4));
        let wire_len = self.u32_at(at + 12);
        self.pos = at + 16 + len;
        self.parsed += 16 + len as u64;
        let ts_usec = if self.nanos { frac / 1000 } else { frac };
        Some(Ok(Record {
            ts_sec: i64::from(sec),
            ts_usec: ts_usec.min(999_999),
            start: at + 16,
            len,
            wire_len,
        }))
    }

    /// Moves on to a block that starts with the bytes not parsed yet and holds at least
    /// `wanted` bytes, unless the file ends first. The old block stays valid for whoever
    /// holds it.
    fn refill(&mut self, wanted: usize) -> Result<(), RecordError> {
        if self.eof {
            return Ok(());
        }
        let size = self.block_bytes.max(wanted);
        let reusable = self
            .spare
            .iter()
            .position(|b| Arc::strong_count(b) == 1 && b.len() >= size);
        let mut next = match reusable {
            Some(i) => self.spare.swap_remove(i),
            None => Arc::new(Block::new(size)),
        };
        let block = &mut Arc::get_mut(&mut next).expect("no other holder").bytes;
        let carried = self.end - self.pos;
        block[..carried].copy_from_slice(&self.current[self.pos..self.end]);
        let mut end = carried;
        while end < block.len() {
            match self.file.read(&mut block[end..]) {
                Ok(0) => {
                    self.eof = true;
                    break;
                }
                Ok(n) => end += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(RecordError::Io(e.to_string())),
            }
        }
        let old = std::mem::replace(&mut self.current, next);
        // A block made bigger for one long record is not kept.
        if old.len() == self.block_bytes {
            self.spare.push(old);
        }
        self.pos = 0;
        self.end = end;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A temporary file holding `bytes`, removed when dropped.
    fn file(bytes: &[u8]) -> tempfile::TempPath {
        let mut f = tempfile::Builder::new()
            .prefix("tcpkit-pcapfile-")
            .suffix(".pcap")
            .tempfile()
            .unwrap();
        std::io::Write::write_all(&mut f, bytes).unwrap();
        f.into_temp_path()
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
        read_in_blocks(path, BLOCK_BYTES)
    }

    /// Reads every record with blocks of `block_bytes`, holding on to every block (as other
    /// threads would) and checking each record's bytes only at the end.
    fn read_in_blocks(path: &Path, block_bytes: usize) -> Vec<Read> {
        let mut m = BlockPcap::with_block_size(path, block_bytes).expect("a classic pcap");
        let mut held = Vec::new();
        std::iter::from_fn(|| {
            let r = m.next_record()?;
            held.push(Arc::clone(m.block()));
            Some(r)
        })
        .collect::<Vec<_>>()
        .into_iter()
        .zip(&held)
        .map(|(r, block)| {
            r.map(|r| {
                (
                    r.ts_sec,
                    r.ts_usec,
                    block[r.start..r.start + r.len].to_vec(),
                )
            })
        })
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
        assert!(BlockPcap::open(&file(b"\x0a\x0d\x0d\x0a pcapng")).is_none());
        assert!(BlockPcap::open(&file(b"")).is_none());
        assert!(BlockPcap::open(&file(&[0xd4, 0xc3, 0xb2, 0xa1, 0])).is_none());
    }

    #[test]
    fn records_across_blocks_read_the_same_with_any_block_size() {
        let payloads: Vec<Vec<u8>> = (0..40u8).map(|i| vec![i; usize::from(i) * 7]).collect();
        let records: Vec<(u32, u32, &[u8])> = payloads
            .iter()
            .enumerate()
            .map(|(i, p)| (i as u32, 0, p.as_slice()))
            .collect();
        let whole = pcap(0xa1b2_c3d4, false, &records);
        let path = file(&whole);
        let expected = read_in_blocks(&path, BLOCK_BYTES);
        assert_eq!(expected.len(), 40);
        // Blocks smaller than a record are grown for it; every cut of the file is met.
        for block_bytes in [1, 15, 16, 17, 64, 100, 273, 1000] {
            assert_eq!(
                read_in_blocks(&path, block_bytes),
                expected,
                "{block_bytes}"
            );
        }
        let cut = file(&whole[..whole.len() - 5]);
        let got = read_in_blocks(&cut, 64);
        assert_eq!(got[..39], expected[..39]);
        assert_eq!(
            got[39],
            Err(RecordError::Truncated {
                wanted: 273,
                got: 268
            })
        );
    }

    #[test]
    fn blocks_no_one_holds_are_reused() {
        let payload = [7u8; 100];
        let records: Vec<(u32, u32, &[u8])> = (0..100).map(|i| (i, 0, &payload[..])).collect();
        let path = file(&pcap(0xa1b2_c3d4, false, &records));
        let mut m = BlockPcap::with_block_size(&path, 1000).expect("a classic pcap");
        let mut n = 0;
        while let Some(r) = m.next_record() {
            assert_eq!(m.data(&r.unwrap()), payload);
            n += 1;
        }
        assert_eq!(n, 100);
        assert!(m.spare.len() <= 1, "{} spare blocks", m.spare.len());
    }
}
