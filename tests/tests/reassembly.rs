//! Reassembly of real captures: the streams rebuilt from the fixtures equal the payload
//! tshark counted, and stay identical when the segments are reordered and duplicated; a
//! segment taken away is a counted gap, and everything after it still arrives.

use std::collections::BTreeMap;

use tcpkit::steps::capture::{Capture, CaptureConfig, Source};
use tcpkit::steps::decode::{decode, Transport};
use tcpkit::steps::flow::{
    CloseReason, Direction, DirectionRule, FlowKey, FlowLimits, FlowTable, StreamEvent,
    StreamHandler,
};
use tcpkit_tests::{fixture, Expected, FIXTURES};

/// One TCP segment of a fixture, owned.
#[derive(Clone)]
struct Segment {
    key: FlowKey,
    dir: Direction,
    ts_us: u64,
    seq: u32,
    ack: u32,
    flags: u8,
    payload: Vec<u8>,
}

fn segments(name: &str) -> Vec<Segment> {
    let e = Expected::of(name);
    let mut capture = Capture::open(&CaptureConfig {
        source: Source::File(fixture(&format!("{name}.pcap"))),
        filter: String::new(),
        prefilter: None,
        write_to: None,
        max_frames: None,
        max_duration: None,
    })
    .unwrap();
    let rule = DirectionRule::new(&[e.port], &[], &[]);
    let link = capture.link();
    let mut out = Vec::new();
    while let Some(frame) = capture.next_frame().unwrap() {
        let p = decode(link, frame.data).unwrap();
        let dir = rule.classify(&p).unwrap();
        if let Transport::Tcp { seq, ack, flags } = p.transport {
            out.push(Segment {
                key: FlowKey::of(&p, dir),
                dir,
                ts_us: frame.ts_us(),
                seq,
                ack,
                flags,
                payload: p.payload.to_vec(),
            });
        }
    }
    out
}

/// The rebuilt stream of each (connection, direction), and the gaps seen.
#[derive(Default)]
struct Streams {
    bytes: BTreeMap<(String, bool), Vec<u8>>,
    gaps: usize,
}

impl StreamHandler<()> for Streams {
    fn on_event(
        &mut self,
        key: &FlowKey,
        _: &mut (),
        dir: Direction,
        _: u64,
        event: StreamEvent<'_>,
    ) {
        match event {
            StreamEvent::Data { piece, .. } => {
                let id = (format!("{key:?}"), dir == Direction::Request);
                self.bytes
                    .entry(id)
                    .or_default()
                    .extend_from_slice(piece.bytes);
            }
            StreamEvent::Gap { .. } => self.gaps += 1,
            StreamEvent::Start | StreamEvent::Ack { .. } => {}
        }
    }
    fn on_close(&mut self, _: &FlowKey, _: (), _: CloseReason, _: u64) {}
}

fn reassemble(segments: &[Segment]) -> Streams {
    let mut table = FlowTable::<()>::new(FlowLimits::default());
    let mut streams = Streams::default();
    for s in segments {
        table.tcp_segment(
            s.key,
            s.dir,
            s.ts_us,
            s.seq,
            s.ack,
            s.flags,
            &s.payload,
            &mut streams,
        );
    }
    table.close_all(u64::MAX, &mut streams);
    streams
}

fn total(streams: &Streams, request: bool) -> u64 {
    streams
        .bytes
        .iter()
        .filter(|((_, r), _)| *r == request)
        .map(|(_, b)| b.len() as u64)
        .sum()
}

#[test]
fn rebuilt_streams_carry_every_payload_byte() {
    for name in FIXTURES {
        let e = Expected::of(name);
        let streams = reassemble(&segments(name));
        assert_eq!(streams.gaps, 0, "{name}");
        assert_eq!(total(&streams, true), e.req_bytes, "{name}");
        assert_eq!(total(&streams, false), e.rsp_bytes, "{name}");
    }
}

/// Swaps data segments with the next data segment of their stream when only bare ACKs that
/// do not yet acknowledge them lie between (an order a real capture can show), and repeats
/// every fifth swapped one as a retransmission.
fn reorder_and_duplicate(original: &[Segment]) -> Vec<Segment> {
    let mut out: Vec<Segment> = original.to_vec();
    let mut duplicates = Vec::new();
    let mut i = 0;
    while i < out.len() {
        let a = &out[i];
        let partner = (i + 1..out.len().min(i + 5)).find(|&j| {
            let b = &out[j];
            b.key == a.key && b.dir == a.dir && !b.payload.is_empty()
        });
        let swappable = !a.payload.is_empty()
            && partner.is_some_and(|j| {
                out[i + 1..j]
                    .iter()
                    .all(|m| m.payload.is_empty() && (m.ack.wrapping_sub(a.seq) as i32) <= 0)
            });
        match partner {
            Some(j) if swappable => {
                if i % 5 == 0 {
                    duplicates.push((j + 1, out[i].clone()));
                }
                out.swap(i, j);
                i = j + 1;
            }
            _ => i += 1,
        }
    }
    for (at, segment) in duplicates.into_iter().rev() {
        out.insert(at, segment);
    }
    out
}

#[test]
fn reordering_and_duplicates_change_nothing() {
    let mut perturbed_fixtures = 0;
    for name in FIXTURES {
        let original = segments(name);
        let perturbed = reorder_and_duplicate(&original);
        // Small requests and replies alternate: such a capture has no neighbours to swap.
        if perturbed.len() > original.len()
            || perturbed.iter().zip(&original).any(|(p, o)| p.seq != o.seq)
        {
            perturbed_fixtures += 1;
        }
        let (want, got) = (reassemble(&original), reassemble(&perturbed));
        assert_eq!(got.gaps, 0, "{name}");
        assert!(
            want.bytes == got.bytes,
            "{name}: streams differ after reordering"
        );
    }
    assert!(
        perturbed_fixtures >= 1,
        "too few fixtures had segments to reorder"
    );
}

#[test]
fn a_lost_segment_is_a_gap_and_the_rest_still_arrives() {
    let name = "redis-bigvalues-any";
    let e = Expected::of(name);
    let mut segs = segments(name);
    // Take away one data segment from the middle of a large request.
    let victim = segs
        .iter()
        .enumerate()
        .filter(|(_, s)| s.dir == Direction::Request && s.payload.len() > 1000)
        .nth(100)
        .map(|(i, _)| i)
        .expect("a large request segment");
    let lost = segs.remove(victim).payload.len() as u64;
    let streams = reassemble(&segs);
    assert_eq!(streams.gaps, 1);
    assert_eq!(total(&streams, true), e.req_bytes - lost);
    assert_eq!(total(&streams, false), e.rsp_bytes);
}
