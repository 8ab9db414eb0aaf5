//! A capture file on several cores (`-r` with `--threads`): a reader thread hands each
//! connection's frames (both directions) to one of N shards — a pipeline each, on its own
//! thread; new connections are dealt in turn ([`Router`]) — and the calling thread writes
//! their output in the order one pipeline would have written it: by the number of the frame
//! whose processing produced it. A classic pcap file is read in blocks that the shards read
//! in place.
//!
//! Frames go in batches, and every shard gets a batch at the same points of the file (an
//! epoch), so the writer can merge epoch by epoch with bounded memory. Each shard's flow
//! table holds `--max-flows / N` connections. What differs from one pipeline: idle timeouts
//! and DNS timeouts run on each shard's own capture clock, and at the very end the shards'
//! remaining timeouts come shard by shard.

use std::io::{self, Write};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::matcher::Connection;
use crate::pipeline::{Pipeline, PipelineConfig, Totals};
use crate::steps::capture::{Capture, CaptureError, Frame};
use crate::steps::decode::{decode, LinkType};
use crate::steps::pcapfile::Block;
use rustc_hash::FxHashMap;

/// Frames per shard batch before every shard is handed its batch (an epoch).
const EPOCH_FRAMES: usize = 8192;
/// Bytes per shard batch before the epoch ends early.
const EPOCH_BYTES: usize = 4 << 20;
/// Batches waiting per shard, and outputs waiting per shard.
const QUEUE: usize = 4;

/// Where one frame of a batch is.
#[derive(Debug, Clone, Copy)]
struct FrameAt {
    seq: u64,
    ts_sec: i64,
    ts_usec: u32,
    start: usize,
    len: usize,
}

/// Frames for one shard: where each is — in `block`, one block of a file read in blocks, or
/// in `bytes`, where the reader copied them when libpcap reads the file.
#[derive(Debug, Default)]
struct Batch {
    block: Option<Arc<Block>>,
    bytes: Vec<u8>,
    frames: Vec<FrameAt>,
}

/// A shard's output for one batch: the bytes, and the frame after which each piece ends.
#[derive(Debug, Default)]
struct Output {
    bytes: Vec<u8>,
    /// (frame number, end of its piece in `bytes`), in frame order.
    marks: Vec<(u64, usize)>,
}

/// How a sharded run ended.
pub struct ShardedRun<C: Connection> {
    /// A pipeline holding every shard's counts (and no connections): summary and JSON.
    pub merged: Pipeline<C>,
    /// What reading the file ended with.
    pub capture: Result<(), CaptureError>,
    /// What writing the log ended with.
    pub written: io::Result<()>,
}

/// A connection, the same in both directions: its two endpoints, lower first.
type ConnectionKey = ((IpAddr, u16), (IpAddr, u16));

/// Which shard each connection's frames go to. New connections are dealt in turn, so that
/// every shard gets as many (a hash leaves them uneven when there are few); a connection
/// keeps its shard while it is among the connections seen lately: the router remembers two
/// generations of `generation` connections (twice what the flow tables hold, which evict
/// the least recently seen first). Frames that do not decode go to shard 0, which counts
/// them.
struct Router {
    shards: usize,
    next: usize,
    generation: usize,
    current: FxHashMap<ConnectionKey, usize>,
    previous: FxHashMap<ConnectionKey, usize>,
}

impl Router {
    fn new(shards: usize, generation: usize) -> Self {
        Self {
            shards,
            next: 0,
            generation: generation.max(1),
            current: FxHashMap::default(),
            previous: FxHashMap::default(),
        }
    }

    fn route(&mut self, link: LinkType, data: &[u8]) -> usize {
        let Ok(p) = decode(link, data) else {
            return 0;
        };
        let (a, b) = ((p.src, p.sport), (p.dst, p.dport));
        let key = if a <= b { (a, b) } else { (b, a) };
        if let Some(&shard) = self.current.get(&key) {
            return shard;
        }
        let shard = self.previous.remove(&key).unwrap_or_else(|| {
            let shard = self.next;
            self.next = (self.next + 1) % self.shards;
            shard
        });
        if self.current.len() >= self.generation {
            self.previous = std::mem::take(&mut self.current);
        }
        self.current.insert(key, shard);
        shard
    }
}

/// Reads the whole file (or until `stop`) through `shards` pipelines of `config`, writing
/// their output to `log`.
pub fn run<C: Connection>(
    config: &PipelineConfig,
    shards: usize,
    capture: &mut Capture,
    log: &mut dyn Write,
    stop: &AtomicBool,
    show_progress: bool,
) -> ShardedRun<C> {
    let mut shard_config = config.clone();
    shard_config.flow_limits.max_flows = (config.flow_limits.max_flows / shards).max(1);
    std::thread::scope(|scope| {
        // Spent batches come back to the reader, so that their memory is reused.
        let (spares_tx, spares) = std::sync::mpsc::channel::<Batch>();
        let mut inputs = Vec::with_capacity(shards);
        let mut outputs = Vec::with_capacity(shards);
        let mut workers = Vec::with_capacity(shards);
        for i in 0..shards {
            let (to_shard, batches) = sync_channel::<Batch>(QUEUE);
            let (to_writer, output) = sync_channel::<Output>(QUEUE);
            inputs.push(to_shard);
            outputs.push(output);
            let config = shard_config.clone();
            let spares = spares_tx.clone();
            let worker = std::thread::Builder::new()
                .name(format!("shard-{i}"))
                .spawn_scoped(scope, move || {
                    shard::<C>(config, &batches, &to_writer, &spares)
                })
                .expect("start a shard thread");
            workers.push(worker);
        }
        // Twice the connections all the shards' tables hold: a connection the router has
        // forgotten is one every table has evicted long before.
        let router = Router::new(shards, config.flow_limits.max_flows.saturating_mul(2));
        let reader = std::thread::Builder::new()
            .name("reader".into())
            .spawn_scoped(scope, move || {
                read(capture, router, inputs, &spares, stop, show_progress)
            })
            .expect("start the reader thread");
        let written = write_merged(&outputs, log);
        let capture_result = reader.join().expect("the reader thread panicked");
        let mut merged = Pipeline::<C>::new(config.clone());
        for worker in workers {
            merged.absorb(&worker.join().expect("a shard thread panicked"));
        }
        ShardedRun {
            merged,
            capture: capture_result,
            written,
        }
    })
}

/// The reader: frames into per-shard batches, every shard handed one at each epoch.
fn read(
    capture: &mut Capture,
    mut router: Router,
    inputs: Vec<SyncSender<Batch>>,
    spares: &Receiver<Batch>,
    stop: &AtomicBool,
    show_progress: bool,
) -> Result<(), CaptureError> {
    let shards = inputs.len();
    let link = capture.link();
    let in_blocks = capture.frame_block().is_some();
    let mut batches: Vec<Batch> = (0..shards).map(|_| Batch::default()).collect();
    let mut in_epoch = 0;
    let mut seq = 0u64;
    let mut next_progress = Instant::now();
    let flush = |batches: &mut Vec<Batch>| {
        for (input, batch) in inputs.iter().zip(batches.iter_mut()) {
            let spare = spares.try_recv().unwrap_or_default();
            // A shard that is gone has panicked; its join says so.
            let _ = input.send(std::mem::replace(batch, spare));
        }
    };
    let result = loop {
        if stop.load(Ordering::Relaxed) {
            break Ok(());
        }
        let frame = match capture.next_frame() {
            Ok(Some(frame)) => frame,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        };
        let shard = router.route(link, frame.data);
        let (ts_sec, ts_usec, len) = (frame.ts_sec, frame.ts_usec, frame.data.len());
        let start = if in_blocks {
            let block = capture.frame_block().expect("a file read in blocks");
            // Every batch of an epoch refers to one block: a new block starts a new epoch.
            let current = batches[0].block.as_ref();
            if current.is_some_and(|b| !Arc::ptr_eq(b, block)) {
                flush(&mut batches);
                in_epoch = 0;
            }
            if batches[0].block.is_none() {
                batches
                    .iter_mut()
                    .for_each(|b| b.block = Some(Arc::clone(block)));
            }
            capture.frame_offset()
        } else {
            let bytes = &mut batches[shard].bytes;
            bytes.extend_from_slice(frame.data);
            bytes.len() - len
        };
        let batch = &mut batches[shard];
        batch.frames.push(FrameAt {
            seq,
            ts_sec,
            ts_usec,
            start,
            len,
        });
        seq += 1;
        in_epoch += 1;
        if in_epoch >= EPOCH_FRAMES || batch.bytes.len() >= EPOCH_BYTES {
            flush(&mut batches);
            in_epoch = 0;
            if show_progress && Instant::now() >= next_progress {
                next_progress = Instant::now() + Duration::from_secs(1);
                let pct = capture.progress().unwrap_or(0.0) * 100.0;
                eprint!("\r{seq} packets, {pct:.0}% of the file");
            }
        }
    };
    flush(&mut batches);
    result
}

/// A shard: its pipeline over the batches it is given, then the end of every connection.
fn shard<C: Connection>(
    config: PipelineConfig,
    batches: &Receiver<Batch>,
    to_writer: &SyncSender<Output>,
    spares: &std::sync::mpsc::Sender<Batch>,
) -> Totals {
    let mut pipeline = Pipeline::<C>::new(config);
    for batch in batches {
        let mut marks = Vec::new();
        let mut written = pipeline.output().len();
        let source = batch.block.as_deref().map_or(&batch.bytes[..], |b| &b[..]);
        for f in &batch.frames {
            pipeline.on_frame(&Frame {
                ts_sec: f.ts_sec,
                ts_usec: f.ts_usec,
                data: &source[f.start..f.start + f.len],
            });
            let now = pipeline.output().len();
            if now > written {
                marks.push((f.seq, now));
                written = now;
            }
        }
        let mut batch = batch;
        batch.block = None; // the reader reuses a block no batch holds
        batch.bytes.clear();
        batch.frames.clear();
        let _ = spares.send(batch);
        let bytes = std::mem::take(pipeline.output());
        if to_writer.send(Output { bytes, marks }).is_err() {
            break; // the writer stopped: nothing more will be written
        }
    }
    pipeline.finish();
    let bytes = std::mem::take(pipeline.output());
    let marks = if bytes.is_empty() {
        Vec::new()
    } else {
        vec![(u64::MAX, bytes.len())]
    };
    let _ = to_writer.send(Output { bytes, marks });
    pipeline.totals()
}

/// Writes the shards' outputs epoch by epoch, each epoch's pieces in frame order. After a
/// write error it goes on taking outputs (so no shard waits forever) but writes nothing.
fn write_merged(outputs: &[Receiver<Output>], log: &mut dyn Write) -> io::Result<()> {
    let mut result = Ok(());
    loop {
        let epoch: Vec<Output> = outputs.iter().filter_map(|o| o.recv().ok()).collect();
        if epoch.is_empty() {
            return result.and_then(|_| log.flush());
        }
        if result.is_err() {
            continue;
        }
        // Each shard's pieces are in frame order: merge them by frame number.
        let mut next = vec![0usize; epoch.len()];
        let mut start = vec![0usize; epoch.len()];
        loop {
            let pick = (0..epoch.len())
                .filter(|&s| next[s] < epoch[s].marks.len())
                .min_by_key(|&s| epoch[s].marks[next[s]].0);
            let Some(s) = pick else { break };
            let end = epoch[s].marks[next[s]].1;
            if let Err(e) = log.write_all(&epoch[s].bytes[start[s]..end]) {
                result = Err(e);
                break;
            }
            start[s] = end;
            next[s] += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn output(pieces: &[(u64, &str)]) -> Output {
        let mut out = Output::default();
        for (seq, text) in pieces {
            out.bytes.extend_from_slice(text.as_bytes());
            out.marks.push((*seq, out.bytes.len()));
        }
        out
    }

    #[test]
    fn pieces_are_written_in_frame_order_epoch_by_epoch() {
        let (a_tx, a) = sync_channel(QUEUE);
        let (b_tx, b) = sync_channel(QUEUE);
        a_tx.send(output(&[(0, "a0\n"), (3, "a3\nA3\n")])).unwrap();
        b_tx.send(output(&[(1, "b1\n"), (2, "b2\n"), (5, "b5\n")]))
            .unwrap();
        a_tx.send(output(&[(7, "a7\n")])).unwrap();
        b_tx.send(output(&[])).unwrap();
        a_tx.send(output(&[(u64::MAX, "a-end\n")])).unwrap();
        b_tx.send(output(&[(u64::MAX, "b-end\n")])).unwrap();
        drop((a_tx, b_tx));
        let mut log = Vec::new();
        write_merged(&[a, b], &mut log).unwrap();
        assert_eq!(
            String::from_utf8(log).unwrap(),
            "a0\nb1\nb2\na3\nA3\nb5\na7\na-end\nb-end\n"
        );
    }

    #[test]
    fn a_connection_keeps_its_shard_and_shards_get_as_many() {
        use etherparse::PacketBuilder;
        let frame = |src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16| {
            let mut ip = Vec::new();
            PacketBuilder::ipv4(src, dst, 64)
                .tcp(sport, dport, 1, 1000)
                .write(&mut ip, b"x")
                .unwrap();
            ip
        };
        // Generations of 8: connections are remembered across one turnover.
        let mut router = Router::new(4, 8);
        let mut per_shard = [0; 4];
        let mut first = Vec::new();
        for i in 0..12u16 {
            let request = frame([10, 0, 0, 1], [10, 0, 0, 2], 40_000 + i, 6379);
            let reply = frame([10, 0, 0, 2], [10, 0, 0, 1], 6379, 40_000 + i);
            let shard = router.route(LinkType::Raw, &request);
            assert_eq!(shard, router.route(LinkType::Raw, &reply));
            per_shard[shard] += 1;
            first.push(shard);
        }
        assert_eq!(per_shard, [3; 4], "connections dealt in turn");
        // The last eight are still known (in one generation or the other): same shard.
        for (i, shard) in first.iter().enumerate().skip(4) {
            let reply = frame([10, 0, 0, 2], [10, 0, 0, 1], 6379, 40_000 + i as u16);
            assert_eq!(
                router.route(LinkType::Raw, &reply),
                *shard,
                "connection {i}"
            );
        }
        assert_eq!(router.route(LinkType::Raw, b"\x45garbage"), 0);
    }
}
