//! TCP reassembly of one direction of a connection, by sequence number.
//!
//! Bytes come out in order, each exactly once, as [`Chunk::Data`] pieces that keep what the
//! segment carrying them said: its capture time, its position in the stream and its
//! acknowledgment number. Retransmissions and overlaps are trimmed; segments that arrive
//! ahead of a hole are held (copied, with their capture time and ack) in a bounded buffer
//! until the hole fills. A hole that cannot fill becomes a [`Chunk::Gap`] — the consumer must
//! treat its stream as desynchronised — in two cases:
//! * the peer acknowledged bytes past the hole (the receiver has them; the capture lost them);
//! * holding more would exceed [`ReassemblyLimits`].
//!
//! Positions count the stream's bytes from 0: the first byte after the SYN, or the first
//! byte captured when the capture began mid-connection (then no [`Chunk::Start`] is given,
//! and nothing says that the first byte starts a message). A lost hole's bytes keep their
//! positions, so positions on both sides of a gap stay comparable with the peer's acks
//! ([`Reassembler::position_of`]).
//!
//! In-order segments, the common case, are passed through without a copy.

/// A piece of the reassembled stream, in stream order.
#[derive(Debug, PartialEq, Eq)]
pub enum Chunk<'a> {
    /// A SYN: the stream begins at position 0, at a message boundary.
    Start,
    /// The next bytes of the stream.
    Data(Piece<'a>),
    /// Bytes are missing up to `resume_pos`; what follows does not continue what came before.
    Gap {
        /// The position of the first byte after the hole.
        resume_pos: u64,
    },
}

/// The next bytes of a stream and what the segment that carried them said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece<'a> {
    /// The bytes.
    pub bytes: &'a [u8],
    /// The position of the first byte in the stream.
    pub pos: u64,
    /// Capture time of the segment that carried them, µs.
    pub ts_us: u64,
    /// The segment's acknowledgment number (a sequence number of the other direction), when
    /// its ACK flag was set.
    pub ack: Option<u32>,
}

impl Piece<'_> {
    /// The position just past the last byte.
    pub fn end(&self) -> u64 {
        self.pos + self.bytes.len() as u64
    }
}

/// Caps on what one direction may hold while waiting for a hole to fill.
#[derive(Debug, Clone, Copy)]
pub struct ReassemblyLimits {
    /// Out-of-order segments held at most.
    pub max_held_segments: usize,
    /// Out-of-order payload bytes held at most.
    pub max_held_bytes: usize,
}

impl Default for ReassemblyLimits {
    fn default() -> Self {
        Self {
            max_held_segments: 64,
            max_held_bytes: 256 * 1024,
        }
    }
}

/// What reassembly saw, summed over all streams.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReassemblyCounters {
    /// Segments whose every byte had been delivered already.
    pub retransmitted_segments: u64,
    /// Segments that repeated some delivered bytes and brought new ones (trimmed).
    pub overlapping_segments: u64,
    /// Segments that arrived ahead of a hole and were held.
    pub out_of_order_segments: u64,
    /// Holes that never filled: the stream was desynchronised.
    pub gaps: u64,
    /// Gaps forced because the held buffer reached its cap.
    pub held_overflows: u64,
}

impl ReassemblyCounters {
    /// Adds another set of counters.
    pub fn merge(&mut self, other: &ReassemblyCounters) {
        self.retransmitted_segments += other.retransmitted_segments;
        self.overlapping_segments += other.overlapping_segments;
        self.out_of_order_segments += other.out_of_order_segments;
        self.gaps += other.gaps;
        self.held_overflows += other.held_overflows;
    }
}

/// True when sequence number `a` comes before `b`, modulo 2^32.
fn seq_before(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

/// A segment held ahead of a hole, with what it carried.
#[derive(Debug)]
struct Held {
    seq: u32,
    ts_us: u64,
    ack: Option<u32>,
    bytes: Vec<u8>,
}

/// What a segment carries besides its bytes.
#[derive(Debug, Clone, Copy)]
pub struct SegmentMeta {
    /// Its sequence number.
    pub seq: u32,
    /// The TCP flag byte.
    pub flags: u8,
    /// Its acknowledgment number, when the ACK flag is set.
    pub ack: Option<u32>,
    /// Its capture time, µs.
    pub ts_us: u64,
}

/// One direction of a TCP connection.
#[derive(Debug, Default)]
pub struct Reassembler {
    /// The sequence number of the next byte to deliver; `None` before the first segment.
    next_seq: Option<u32>,
    /// The position of that byte.
    next_pos: u64,
    /// Segments ahead of `next_seq`, sorted by sequence number.
    held: Vec<Held>,
    held_bytes: usize,
    /// Sequence number just past the last byte, once a FIN was seen.
    fin_seq: Option<u32>,
    /// The sequence number of the SYN that began the stream.
    syn_seq: Option<u32>,
}

impl Reassembler {
    /// Gives back the memory held for out-of-order segments beyond what it holds now.
    pub fn shrink(&mut self) {
        self.held.shrink_to_fit();
    }

    /// Takes one segment of this direction.
    pub fn segment(
        &mut self,
        meta: SegmentMeta,
        payload: &[u8],
        limits: &ReassemblyLimits,
        counters: &mut ReassemblyCounters,
        out: &mut impl FnMut(Chunk<'_>),
    ) {
        let mut data_seq = meta.seq;
        if meta.flags & crate::steps::decode::tcp_flags::SYN != 0 {
            data_seq = meta.seq.wrapping_add(1);
            if self.syn_seq == Some(meta.seq) {
                // The same SYN again (retransmitted, or captured twice).
                counters.retransmitted_segments += 1;
            } else {
                // A (new) connection: data, if any, starts after the SYN.
                self.reset();
                self.syn_seq = Some(meta.seq);
                self.next_seq = Some(data_seq);
                out(Chunk::Start);
            }
        }
        if !payload.is_empty() {
            let meta = SegmentMeta {
                seq: data_seq,
                ..meta
            };
            self.data(meta, payload, limits, counters, out);
        }
        if meta.flags & crate::steps::decode::tcp_flags::FIN != 0 {
            self.fin_seq = Some(data_seq.wrapping_add(payload.len() as u32));
        }
    }

    /// Takes the acknowledgment number the other direction carries: bytes acknowledged but
    /// never captured are a hole that cannot fill.
    pub fn peer_ack(
        &mut self,
        ack: u32,
        counters: &mut ReassemblyCounters,
        out: &mut impl FnMut(Chunk<'_>),
    ) {
        // Only acted on when segments are held past a hole: then the hole is certain, and a
        // reordering of the capture between directions cannot fake one.
        let (Some(next), Some(first_held)) = (self.next_seq, self.held.first()) else {
            return;
        };
        if seq_before(next, ack) {
            let resume = first_held.seq;
            self.skip_hole(resume, counters, out);
        }
    }

    /// The stream position of sequence number `seq` (an acknowledgment number the peer
    /// sent): `None` before the first segment, or for a number before the stream's start. A
    /// FIN's own sequence number maps to the position just past the last byte.
    pub fn position_of(&self, seq: u32) -> Option<u64> {
        let next = self.next_seq?;
        let seq = match self.fin_seq {
            Some(fin) if seq_before(fin, seq) => fin,
            _ => seq,
        };
        let delta = i64::from(seq.wrapping_sub(next) as i32);
        u64::try_from(self.next_pos as i64 + delta).ok()
    }

    /// True when this direction may be replaced by a new connection's SYN with `seq`: it saw
    /// a different SYN, or bytes.
    pub fn is_reused_by(&self, seq: u32) -> bool {
        match self.syn_seq {
            Some(syn) => syn != seq,
            None => self.next_seq.is_some(),
        }
    }

    /// True once a FIN was seen and every byte before it delivered.
    pub fn finished(&self) -> bool {
        match self.fin_seq {
            Some(fin) => self.next_seq.is_none_or(|next| !seq_before(next, fin)),
            None => false,
        }
    }

    /// Payload bytes currently held out of order.
    pub fn held_bytes(&self) -> usize {
        self.held_bytes
    }

    fn reset(&mut self) {
        self.next_seq = None;
        self.next_pos = 0;
        self.held.clear();
        self.held_bytes = 0;
        self.fin_seq = None;
        self.syn_seq = None;
    }

    fn data(
        &mut self,
        meta: SegmentMeta,
        payload: &[u8],
        limits: &ReassemblyLimits,
        counters: &mut ReassemblyCounters,
        out: &mut impl FnMut(Chunk<'_>),
    ) {
        let seq = meta.seq;
        // A capture that starts mid-connection starts the stream at its first segment.
        let next = *self.next_seq.get_or_insert(seq);
        if !seq_before(next, seq) {
            self.deliver(seq, meta.ts_us, meta.ack, payload, counters, out);
            self.drain(counters, out);
            return;
        }
        if self.held.len() >= limits.max_held_segments
            || self.held_bytes + payload.len() > limits.max_held_bytes
        {
            // Holding more is not allowed: give the hole up and go on from the held data.
            counters.held_overflows += 1;
            let resume = match self.held.first() {
                Some(first) if seq_before(first.seq, seq) => first.seq,
                _ => seq,
            };
            self.skip_hole(resume, counters, out);
            self.data(meta, payload, limits, counters, out);
            return;
        }
        counters.out_of_order_segments += 1;
        let at = self.held.partition_point(|h| seq_before(h.seq, seq));
        match self.held.get(at) {
            Some(h) if h.seq == seq && h.bytes.len() >= payload.len() => {
                counters.retransmitted_segments += 1
            }
            _ => {
                self.held_bytes += payload.len();
                self.held.insert(
                    at,
                    Held {
                        seq,
                        ts_us: meta.ts_us,
                        ack: meta.ack,
                        bytes: payload.to_vec(),
                    },
                );
            }
        }
    }

    /// Delivers what of `payload` (starting at `seq`, not after `next_seq`) is new.
    fn deliver(
        &mut self,
        seq: u32,
        ts_us: u64,
        ack: Option<u32>,
        payload: &[u8],
        counters: &mut ReassemblyCounters,
        out: &mut impl FnMut(Chunk<'_>),
    ) {
        let Some(next) = self.next_seq else { return };
        let already = next.wrapping_sub(seq) as usize;
        if already >= payload.len() {
            counters.retransmitted_segments += 1;
            return;
        }
        if already > 0 {
            counters.overlapping_segments += 1;
        }
        let bytes = &payload[already..];
        out(Chunk::Data(Piece {
            bytes,
            pos: self.next_pos,
            ts_us,
            ack,
        }));
        self.next_seq = Some(seq.wrapping_add(payload.len() as u32));
        self.next_pos += bytes.len() as u64;
    }

    /// Delivers held segments that the stream has reached.
    fn drain(&mut self, counters: &mut ReassemblyCounters, out: &mut impl FnMut(Chunk<'_>)) {
        while let (Some(next), Some(first)) = (self.next_seq, self.held.first()) {
            if seq_before(next, first.seq) {
                break;
            }
            let h = self.held.remove(0);
            self.held_bytes -= h.bytes.len();
            self.deliver(h.seq, h.ts_us, h.ack, &h.bytes, counters, out);
        }
    }

    /// Declares the bytes before `resume` lost and continues the stream from there.
    fn skip_hole(
        &mut self,
        resume: u32,
        counters: &mut ReassemblyCounters,
        out: &mut impl FnMut(Chunk<'_>),
    ) {
        counters.gaps += 1;
        if let Some(next) = self.next_seq {
            self.next_pos += u64::from(resume.wrapping_sub(next));
        }
        out(Chunk::Gap {
            resume_pos: self.next_pos,
        });
        self.next_seq = Some(resume);
        self.drain(counters, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::steps::decode::tcp_flags::{ACK, FIN, SYN};

    fn meta(seq: u32, flags: u8) -> SegmentMeta {
        SegmentMeta {
            seq,
            flags,
            ack: None,
            ts_us: u64::from(seq),
        }
    }

    /// Reassembles the segments and renders the output, a gap as `|`.
    fn run(
        segments: &[(u32, u8, &[u8])],
        limits: ReassemblyLimits,
    ) -> (String, ReassemblyCounters) {
        let mut r = Reassembler::default();
        let mut counters = ReassemblyCounters::default();
        let mut text = String::new();
        for &(seq, flags, payload) in segments {
            r.segment(
                meta(seq, flags),
                payload,
                &limits,
                &mut counters,
                &mut |c| match c {
                    Chunk::Data(p) => text.push_str(std::str::from_utf8(p.bytes).unwrap()),
                    Chunk::Gap { .. } => text.push('|'),
                    Chunk::Start => {}
                },
            );
        }
        (text, counters)
    }

    const STREAM: &[u8] = b"*1\r\n$4\r\nPING\r\n*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nvalue\r\n";

    /// The stream from ISN 1000 cut at the given offsets into segments.
    fn cut(cuts: &[usize]) -> Vec<(u32, u8, &'static [u8])> {
        let mut bounds = vec![0];
        bounds.extend_from_slice(cuts);
        bounds.push(STREAM.len());
        let mut segs = vec![(1000u32, SYN, &b""[..])];
        for w in bounds.windows(2) {
            segs.push((1001 + w[0] as u32, ACK, &STREAM[w[0]..w[1]]));
        }
        segs
    }

    fn expect(segs: &[(u32, u8, &[u8])]) {
        let (text, c) = run(segs, ReassemblyLimits::default());
        assert_eq!(text.as_bytes(), STREAM, "segments {segs:?}");
        assert_eq!(c.gaps, 0);
    }

    #[test]
    fn in_order_whole_and_split_at_every_offset() {
        expect(&cut(&[]));
        for at in 1..STREAM.len() {
            expect(&cut(&[at]));
        }
        let every_byte: Vec<usize> = (1..STREAM.len()).collect();
        expect(&cut(&every_byte));
    }

    #[test]
    fn reordered_at_every_offset() {
        for at in 1..STREAM.len() {
            let mut segs = cut(&[at]);
            segs.swap(1, 2);
            expect(&segs);
        }
        // Fully reversed, one byte a segment.
        let every_byte: Vec<usize> = (1..STREAM.len()).collect();
        let mut segs = cut(&every_byte);
        segs[1..].reverse();
        expect(&segs);
    }

    #[test]
    fn duplicated_at_every_offset() {
        for at in 1..STREAM.len() {
            let mut segs = cut(&[at]);
            segs.insert(2, segs[1]);
            segs.push(segs[2]);
            let (text, c) = run(&segs, ReassemblyLimits::default());
            assert_eq!(text.as_bytes(), STREAM);
            assert_eq!(c.retransmitted_segments, 2);
        }
    }

    #[test]
    fn overlapping_segments_are_trimmed() {
        for at in 1..STREAM.len() - 1 {
            // [0, at+1) then [at, end): one byte repeated.
            let segs = vec![
                (1000, SYN, &b""[..]),
                (1001, ACK, &STREAM[..at + 1]),
                (1001 + at as u32, ACK, &STREAM[at..]),
            ];
            let (text, c) = run(&segs, ReassemblyLimits::default());
            assert_eq!(text.as_bytes(), STREAM);
            assert_eq!(c.overlapping_segments, 1);
        }
    }

    #[test]
    fn overlapping_held_segments_are_trimmed() {
        let segs = vec![
            (1000, SYN, &b""[..]),
            (1011, ACK, &STREAM[10..30]),
            (1006, ACK, &STREAM[5..20]),
            (1001, ACK, &STREAM[..8]),
            (1031, ACK, &STREAM[30..]),
        ];
        let (text, _) = run(&segs, ReassemblyLimits::default());
        assert_eq!(text.as_bytes(), STREAM);
    }

    #[test]
    fn sequence_numbers_wrap() {
        let isn = u32::MAX - 5;
        let segs = vec![
            (isn, SYN, &b""[..]),
            (isn.wrapping_add(11), ACK, &STREAM[10..]),
            (isn.wrapping_add(1), ACK, &STREAM[..10]),
        ];
        let (text, _) = run(&segs, ReassemblyLimits::default());
        assert_eq!(text.as_bytes(), STREAM);
    }

    #[test]
    fn capture_starting_mid_connection() {
        let segs = vec![(5000, ACK, &b"abc"[..]), (5003, ACK, &b"def"[..])];
        assert_eq!(run(&segs, ReassemblyLimits::default()).0, "abcdef");
    }

    #[test]
    fn a_gap_is_declared_when_the_held_cap_is_reached() {
        let limits = ReassemblyLimits {
            max_held_segments: 2,
            max_held_bytes: 1 << 20,
        };
        let segs = vec![
            (1000, SYN, &b""[..]),
            (1001, ACK, &b"ab"[..]),
            // "cd" at 1003 never comes.
            (1005, ACK, &b"ef"[..]),
            (1007, ACK, &b"gh"[..]),
            (1009, ACK, &b"ij"[..]),
        ];
        let (text, c) = run(&segs, limits);
        assert_eq!(text, "ab|efghij");
        assert_eq!((c.gaps, c.held_overflows), (1, 1));
    }

    #[test]
    fn the_byte_cap_bounds_what_is_held() {
        let limits = ReassemblyLimits {
            max_held_segments: 100,
            max_held_bytes: 4,
        };
        let mut r = Reassembler::default();
        let mut counters = ReassemblyCounters::default();
        r.segment(meta(1, SYN), b"", &limits, &mut counters, &mut |_| {});
        for i in 0..50u32 {
            r.segment(
                meta(10 + 3 * i, ACK),
                b"xyz",
                &limits,
                &mut counters,
                &mut |_| {},
            );
            assert!(r.held_bytes() <= 4);
        }
        assert!(counters.gaps > 0);
    }

    #[test]
    fn a_peer_ack_past_a_hole_declares_the_gap() {
        let limits = ReassemblyLimits::default();
        let mut r = Reassembler::default();
        let mut counters = ReassemblyCounters::default();
        let mut text = String::new();
        let mut sink = |c: Chunk<'_>| match c {
            Chunk::Data(p) => text.push_str(std::str::from_utf8(p.bytes).unwrap()),
            Chunk::Gap { .. } => text.push('|'),
            Chunk::Start => {}
        };
        r.segment(meta(1000, SYN), b"", &limits, &mut counters, &mut sink);
        r.segment(meta(1001, ACK), b"ab", &limits, &mut counters, &mut sink);
        // An ack with nothing held is not acted on.
        r.peer_ack(1010, &mut counters, &mut sink);
        r.segment(meta(1005, ACK), b"ef", &limits, &mut counters, &mut sink);
        r.peer_ack(1003, &mut counters, &mut sink); // not past the hole at 1003
        r.peer_ack(1007, &mut counters, &mut sink);
        r.segment(meta(1007, ACK), b"gh", &limits, &mut counters, &mut sink);
        assert_eq!(text, "ab|efgh");
        assert_eq!(counters.gaps, 1);
    }

    #[test]
    fn fin_finishes_once_everything_before_it_arrived() {
        let limits = ReassemblyLimits::default();
        let mut r = Reassembler::default();
        let mut c = ReassemblyCounters::default();
        r.segment(meta(1000, SYN), b"", &limits, &mut c, &mut |_| {});
        r.segment(meta(1004, ACK | FIN), b"def", &limits, &mut c, &mut |_| {});
        assert!(!r.finished());
        r.segment(meta(1001, ACK), b"abc", &limits, &mut c, &mut |_| {});
        assert!(r.finished());
    }

    #[test]
    fn a_new_syn_restarts_the_stream() {
        let segs = vec![
            (1000, SYN, &b""[..]),
            (1001, ACK, &b"old"[..]),
            (9000, SYN, &b""[..]),
            (9001, ACK, &b"new"[..]),
        ];
        assert_eq!(run(&segs, ReassemblyLimits::default()).0, "oldnew");
    }

    #[test]
    fn held_segments_keep_their_capture_time_ack_and_position() {
        let limits = ReassemblyLimits::default();
        let mut r = Reassembler::default();
        let mut c = ReassemblyCounters::default();
        let mut pieces = Vec::new();
        let mut sink = |ch: Chunk<'_>| match ch {
            Chunk::Data(p) => pieces.push((p.bytes.to_vec(), p.pos, p.ts_us, p.ack)),
            Chunk::Gap { resume_pos } => pieces.push((b"|".to_vec(), resume_pos, 0, None)),
            Chunk::Start => pieces.push((b"^".to_vec(), 0, 0, None)),
        };
        let seg = |seq, ts_us, ack| SegmentMeta {
            seq,
            flags: ACK,
            ack: Some(ack),
            ts_us,
        };
        r.segment(meta(1000, SYN), b"", &limits, &mut c, &mut sink);
        r.segment(seg(1004, 20, 7), b"def", &limits, &mut c, &mut sink);
        r.segment(seg(1001, 30, 5), b"abc", &limits, &mut c, &mut sink);
        // "ghi" at 1007 is lost; the peer acks past it once "jk" is held.
        r.segment(seg(1010, 40, 9), b"jk", &limits, &mut c, &mut sink);
        r.peer_ack(1012, &mut c, &mut sink);
        assert_eq!(
            pieces,
            vec![
                (b"^".to_vec(), 0, 0, None),
                (b"abc".to_vec(), 0, 30, Some(5)),
                (b"def".to_vec(), 3, 20, Some(7)),
                (b"|".to_vec(), 9, 0, None),
                (b"jk".to_vec(), 9, 40, Some(9)),
            ]
        );
        assert_eq!(r.position_of(1001), Some(0));
        assert_eq!(r.position_of(1012), Some(11));
        assert_eq!(r.position_of(900), None);
    }

    #[test]
    fn a_fin_maps_to_the_end_of_the_stream() {
        let limits = ReassemblyLimits::default();
        let mut r = Reassembler::default();
        let mut c = ReassemblyCounters::default();
        r.segment(meta(1000, SYN), b"", &limits, &mut c, &mut |_| {});
        r.segment(meta(1001, ACK | FIN), b"abc", &limits, &mut c, &mut |_| {});
        // The peer acknowledges the FIN's sequence number too: still the stream's end.
        assert_eq!(r.position_of(1005), Some(3));
        assert_eq!(r.position_of(1004), Some(3));
    }
}
