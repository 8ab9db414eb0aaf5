//! Packet capture: the only module that touches libpcap.
//!
//! Live (an interface, `any` included) and offline (a pcap or pcapng file) share one path:
//! [`Capture::next_frames`] hands frames with their timestamps, a batch at a time
//! ([`Capture::next_frame`] one by one, reading a file); `-w` copies every captured frame to
//! a pcap file as it goes.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use pcap::{Activated, BpfProgram, Capture as PcapCapture, Device, Packet, PacketHeader, Savefile};

use crate::steps::decode::LinkType;
use crate::steps::loopback;
use crate::steps::pcapfile::{Block, BlockPcap};
use crate::steps::prefilter::PortPrefilter;

/// Where packets come from.
#[derive(Debug, Clone)]
pub enum Source {
    /// A network interface (`any` for all of them).
    Live {
        /// Interface name.
        interface: String,
        /// The OS capture buffer, in KiB.
        buffer_kib: u32,
    },
    /// A pcap or pcapng file; `-` is standard input.
    File(PathBuf),
}

/// The name that stands for standard input (`-r -`, as tcpdump takes it).
pub const STDIN: &str = "-";

/// Everything needed to open a capture.
#[derive(Debug, Clone)]
pub struct CaptureConfig {
    /// Where packets come from.
    pub source: Source,
    /// The BPF filter, before VLAN wrapping (see [`vlan_aware`]).
    pub filter: String,
    /// The same filter's answer for common frames of a file read in blocks, when the filter
    /// is the ports alone ([`PortPrefilter::for_filter`]).
    pub prefilter: Option<PortPrefilter>,
    /// Copy every captured frame to this pcap file.
    pub write_to: Option<PathBuf>,
    /// The capture ends after this many frames (`-c`).
    pub max_frames: Option<u64>,
    /// The capture ends this long after it opened (`--duration`).
    pub max_duration: Option<std::time::Duration>,
}

/// Why a capture could not be opened or went wrong.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// Live capture needs privileges.
    #[error(
        "no permission to capture on {interface}: run as root or grant CAP_NET_RAW ({detail})"
    )]
    Permission {
        /// Interface name.
        interface: String,
        /// What libpcap said.
        detail: String,
    },
    /// The interface does not exist.
    #[error("no such interface: {name} (available: {available})")]
    NoSuchInterface {
        /// The name asked for.
        name: String,
        /// Interfaces that exist, comma separated.
        available: String,
    },
    /// The file could not be read as a capture.
    #[error("cannot read {path}: {detail}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        detail: String,
    },
    /// The filter does not compile.
    #[error("bad filter expression \"{filter}\": {detail}")]
    Filter {
        /// The expression.
        filter: String,
        /// What libpcap said.
        detail: String,
    },
    /// The capture's link type is not one tcpkit decodes.
    #[error("unsupported link type {0} (tcpkit decodes Ethernet, Linux cooked v1/v2, raw IP, BSD loopback)")]
    UnsupportedLink(i32),
    /// The `-w` file could not be created.
    #[error("cannot write {path}: {detail}")]
    Write {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        detail: String,
    },
    /// Any other libpcap failure.
    #[error("capture failed: {0}")]
    Pcap(String),
}

/// One captured frame.
#[derive(Debug)]
pub struct Frame<'a> {
    /// Capture time, seconds since the epoch.
    pub ts_sec: i64,
    /// Microseconds within the second.
    pub ts_usec: u32,
    /// The captured bytes (may be shorter than the frame on the wire).
    pub data: &'a [u8],
}

impl Frame<'_> {
    /// Capture time in microseconds since the epoch.
    pub fn ts_us(&self) -> u64 {
        (self.ts_sec.max(0) as u64) * 1_000_000 + u64::from(self.ts_usec)
    }
}

/// What [`Capture::next_frames`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Batch {
    /// It handed this many frames (at least one) to the caller.
    Frames(usize),
    /// Nothing arrived within the read timeout (live only): a moment to do periodic work.
    Idle,
    /// The end of the file, of `-c` or of `--duration`.
    End,
}

/// Counters libpcap keeps for a live capture.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct KernelStats {
    /// Packets that passed the filter (`ps_recv`).
    pub received: u64,
    /// Dropped for lack of buffer space (`ps_drop`).
    pub dropped: u64,
    /// Dropped by the interface or its driver (`ps_ifdrop`).
    pub if_dropped: u64,
}

impl KernelStats {
    /// The counters of two captures together.
    pub fn plus(&self, other: &KernelStats) -> KernelStats {
        KernelStats {
            received: self.received + other.received,
            dropped: self.dropped + other.dropped,
            if_dropped: self.if_dropped + other.if_dropped,
        }
    }
}

/// An open capture.
pub struct Capture {
    handle: PcapCapture<dyn Activated>,
    link: LinkType,
    live: bool,
    /// Live: the descriptor to wait on, and whether the last read found the buffer empty.
    selectable_fd: i32,
    drained: bool,
    /// The `-w` file, shared by the captures of one fanout group.
    dump: Option<Arc<Mutex<Savefile>>>,
    /// Bytes of the file consumed so far (offline), for progress.
    file_bytes_read: u64,
    file_size: Option<u64>,
    /// The file read (offline), to name it in errors.
    file: Option<PathBuf>,
    /// A classic pcap file, read in blocks rather than through libpcap; with its filter.
    blocks: Option<BlockPcap>,
    blocks_filter: Option<BpfProgram>,
    prefilter: Option<PortPrefilter>,
    /// Where the last frame read in blocks starts in its block.
    frame_offset: usize,
    /// Frames returned so far, and the count that ends the capture.
    frames: u64,
    max_frames: Option<u64>,
    /// When the capture ends.
    deadline: Option<std::time::Instant>,
}

/// Live reads return at least this often, so that the caller can do periodic work and
/// notice a stop request.
const READ_TIMEOUT_MS: i32 = 100;
const SNAPLEN: i32 = 262_144;

impl Capture {
    /// Opens the capture, installs the filter and creates the `-w` file.
    pub fn open(config: &CaptureConfig) -> Result<Self, CaptureError> {
        let (handle, live, file_size): (PcapCapture<dyn Activated>, bool, Option<u64>) =
            match &config.source {
                Source::Live {
                    interface,
                    buffer_kib,
                } => (open_live(interface, *buffer_kib)?.into(), true, None),
                Source::File(path) if path.as_os_str() == STDIN => {
                    // libpcap reads (and closes) a copy of the descriptor.
                    // SAFETY: dup returns a descriptor that only this handle owns, or -1.
                    let fd = unsafe { libc::dup(0) };
                    // SAFETY: `fd` is ours alone (checked not to be -1).
                    let handle = (fd >= 0)
                        .then(|| unsafe { PcapCapture::from_raw_fd(fd) })
                        .ok_or_else(|| std::io::Error::last_os_error().to_string())
                        .and_then(|r| r.map_err(describe_file_error))
                        .map_err(|detail| CaptureError::File {
                            path: path.clone(),
                            detail,
                        })?;
                    (handle.into(), false, None)
                }
                Source::File(path) => {
                    let size = std::fs::metadata(path)
                        .map_err(|e| CaptureError::File {
                            path: path.clone(),
                            detail: e.to_string(),
                        })?
                        .len();
                    let handle = PcapCapture::from_file(path).map_err(|e| CaptureError::File {
                        path: path.clone(),
                        detail: describe_file_error(e),
                    })?;
                    (handle.into(), false, Some(size))
                }
            };
        let dlt = handle.get_datalink().0;
        let link = LinkType::from_dlt(dlt).ok_or(CaptureError::UnsupportedLink(dlt))?;
        // SAFETY: the handle is open; libpcap returns -1 when there is no such descriptor.
        let selectable_fd = unsafe { pcap_get_selectable_fd(handle.as_ptr().cast()) };
        let mut capture = Self {
            handle,
            link,
            live,
            selectable_fd,
            drained: false,
            dump: None,
            file_bytes_read: 0,
            file_size,
            file: match &config.source {
                Source::File(path) => Some(path.clone()),
                Source::Live { .. } => None,
            },
            // libpcap has checked the file; a classic pcap is then read in blocks.
            blocks: match &config.source {
                Source::File(path) if path.as_os_str() != STDIN => BlockPcap::open(path),
                _ => None,
            },
            blocks_filter: None,
            prefilter: None,
            frame_offset: 0,
            frames: 0,
            max_frames: config.max_frames,
            deadline: config.max_duration.map(|d| std::time::Instant::now() + d),
        };
        if !config.filter.is_empty() {
            let filter = vlan_aware(&config.filter, link);
            let bad_filter = |e: pcap::Error| CaptureError::Filter {
                filter: config.filter.clone(),
                detail: e.to_string(),
            };
            capture.handle.filter(&filter, true).map_err(bad_filter)?;
            if capture.blocks.is_some() {
                capture.blocks_filter =
                    Some(capture.handle.compile(&filter, true).map_err(bad_filter)?);
                capture.prefilter = config.prefilter.clone();
            }
        }
        if capture.live && capture.selectable_fd >= 0 {
            // Best effort: where it fails, libpcap skips those copies itself, later.
            loopback::drop_outgoing_loopback_in_kernel(capture.selectable_fd);
        }
        if let Some(path) = &config.write_to {
            let file = capture
                .handle
                .savefile(path)
                .map_err(|e| CaptureError::Write {
                    path: path.clone(),
                    detail: e.to_string(),
                })?;
            capture.dump = Some(Arc::new(Mutex::new(file)));
        }
        Ok(capture)
    }

    /// `n` live captures of the interface of `config` that share its packets: the kernel
    /// hands each connection's packets, both directions, to one of them (`PACKET_FANOUT`
    /// with its flow hash, which is symmetric). Each has its own ring of the buffer's size;
    /// `-w` is one file that they all write.
    pub fn open_fanout(config: &CaptureConfig, n: usize) -> Result<Vec<Capture>, CaptureError> {
        let first = Capture::open(config)?;
        if !first.live || first.selectable_fd < 0 {
            return Err(CaptureError::Pcap(
                "several pipelines share a live capture only".into(),
            ));
        }
        let others = CaptureConfig {
            write_to: None,
            ..config.clone()
        };
        let mut captures = vec![first];
        for _ in 1..n {
            let mut capture = Capture::open(&others)?;
            capture.dump = captures[0].dump.clone();
            captures.push(capture);
        }
        let kind = libc::PACKET_FANOUT_HASH | libc::PACKET_FANOUT_FLAG_DEFRAG;
        // The kernel picks a group id no other socket uses, and the others join it.
        join_fanout(
            captures[0].selectable_fd,
            0,
            kind | libc::PACKET_FANOUT_FLAG_UNIQUEID,
        )?;
        let id = fanout_id(captures[0].selectable_fd)?;
        for capture in &captures[1..] {
            join_fanout(capture.selectable_fd, id, kind)?;
        }
        // Until its socket joined the group, each capture took every packet: what the rings
        // hold once the blocks of that moment are retired (the ring's block timeout is the
        // read timeout) is dropped, so that no packet is taken twice.
        std::thread::sleep(std::time::Duration::from_millis(2 * READ_TIMEOUT_MS as u64));
        captures.iter_mut().for_each(Capture::discard_queued);
        Ok(captures)
    }

    /// Drops what the ring holds now, without waiting (the capture is non-blocking).
    fn discard_queued(&mut self) {
        while self.handle.next_packet().is_ok() {}
    }

    /// The link type of the frames.
    pub fn link(&self) -> LinkType {
        self.link
    }

    /// True for a live capture.
    pub fn is_live(&self) -> bool {
        self.live
    }

    /// Hands `on_frame` the frames that are there now, at most `max`, or says why there are
    /// none. Frames that libpcap reads (live, pcapng, standard input) are handed where they lie,
    /// in the ring or libpcap's buffer: `pcap_next_ex` would copy each live one first.
    ///
    /// A live capture is non-blocking: once the ring is found empty, the next call waits
    /// for the descriptor at most [`READ_TIMEOUT_MS`] (less when a signal arrives), so the
    /// caller regains control even when no packet comes (libpcap's own timeout does not fire
    /// on an idle TPACKET_V3 ring).
    pub fn next_frames(
        &mut self,
        max: usize,
        mut on_frame: impl FnMut(&Frame<'_>),
    ) -> Result<Batch, CaptureError> {
        let max = match self.max_frames {
            Some(n) => max.min(usize::try_from(n.saturating_sub(self.frames)).unwrap_or(max)),
            None => max,
        };
        if max == 0
            || self
                .deadline
                .is_some_and(|d| std::time::Instant::now() >= d)
        {
            return Ok(Batch::End);
        }
        if self.blocks.is_some() {
            let mut handed = 0;
            while handed < max {
                match self.next_block_frame()? {
                    Some(frame) => on_frame(&frame),
                    None => break,
                }
                handed += 1;
            }
            return Ok(if handed == 0 {
                Batch::End
            } else {
                Batch::Frames(handed)
            });
        }
        if self.drained {
            self.drained = false;
            if !wait_readable(self.selectable_fd, READ_TIMEOUT_MS) {
                return Ok(Batch::Idle);
            }
        }
        let dump = self.dump.as_deref();
        let mut bytes = 0;
        let handed = self
            .handle
            .dispatch(Some(max), |packet| {
                bytes += record_bytes(&packet);
                on_frame(&written_frame(dump, &packet));
            })
            .map_err(|e| libpcap_error(self.file.as_ref(), e))?;
        self.file_bytes_read += bytes;
        self.frames += handed as u64;
        Ok(match handed {
            0 if self.live => {
                self.drained = self.selectable_fd >= 0;
                Batch::Idle
            }
            0 => Batch::End,
            n => Batch::Frames(n),
        })
    }

    /// The next frame of a file, or `None` at its end (or that of `-c`, `--duration`): for
    /// a reader that needs the capture between frames ([`Capture::frame_block`]). A live
    /// capture is read with [`Capture::next_frames`].
    pub fn next_frame(&mut self) -> Result<Option<Frame<'_>>, CaptureError> {
        debug_assert!(!self.live, "live frames are read in batches");
        if self.max_frames.is_some_and(|n| self.frames >= n)
            || self
                .deadline
                .is_some_and(|d| std::time::Instant::now() >= d)
        {
            return Ok(None);
        }
        if self.blocks.is_some() {
            return self.next_block_frame();
        }
        match self.handle.next_packet() {
            Ok(packet) => {
                self.file_bytes_read += record_bytes(&packet);
                self.frames += 1;
                Ok(Some(written_frame(self.dump.as_deref(), &packet)))
            }
            Err(pcap::Error::NoMorePackets) => Ok(None),
            Err(e) => Err(libpcap_error(self.file.as_ref(), e)),
        }
    }

    /// The next frame of a file read in blocks that passes the filter.
    fn next_block_frame(&mut self) -> Result<Option<Frame<'_>>, CaptureError> {
        let blocks = self.blocks.as_mut().expect("checked by the caller");
        let record = loop {
            match blocks.next_record() {
                None => return Ok(None),
                Some(Err(e)) => {
                    return Err(CaptureError::File {
                        path: self.file.clone().unwrap_or_default(),
                        detail: format!("libpcap error: {e}"),
                    })
                }
                Some(Ok(r)) => {
                    let data = blocks.data(&r);
                    let passes = match self.blocks_filter.as_ref() {
                        None => true,
                        Some(bpf) => match self.prefilter.as_ref() {
                            Some(p) => p.decides(self.link, data),
                            None => None,
                        }
                        .unwrap_or_else(|| bpf.filter(data)),
                    };
                    if passes {
                        break r;
                    }
                }
            }
        };
        self.file_bytes_read = blocks.position();
        self.frame_offset = record.start;
        self.frames += 1;
        let blocks = self.blocks.as_ref().expect("checked by the caller");
        let data = blocks.data(&record);
        if let Some(dump) = &self.dump {
            let header = PacketHeader {
                ts: libc::timeval {
                    tv_sec: record.ts_sec as libc::time_t,
                    tv_usec: record.ts_usec as libc::suseconds_t,
                },
                caplen: record.len as u32,
                len: record.wire_len,
            };
            lock(dump).write(&Packet::new(&header, data));
        }
        Ok(Some(Frame {
            ts_sec: record.ts_sec,
            ts_usec: record.ts_usec,
            data,
        }))
    }

    /// For a file read in blocks, the block that holds the last frame: other threads may
    /// read the frame there ([`Capture::frame_offset`]) while the capture reads on.
    pub fn frame_block(&self) -> Option<&std::sync::Arc<Block>> {
        self.blocks.as_ref().map(BlockPcap::block)
    }

    /// Where the last frame starts in its block ([`Capture::frame_block`]).
    pub fn frame_offset(&self) -> usize {
        self.frame_offset
    }

    /// libpcap's counters, for a live capture.
    pub fn kernel_stats(&mut self) -> Option<KernelStats> {
        if !self.live {
            return None;
        }
        self.handle.stats().ok().map(|s| KernelStats {
            received: u64::from(s.received),
            dropped: u64::from(s.dropped),
            if_dropped: u64::from(s.if_dropped),
        })
    }

    /// For an offline capture, the fraction of the file read so far.
    pub fn progress(&self) -> Option<f64> {
        self.file_size
            .filter(|size| *size > 0)
            .map(|size| (self.file_bytes_read as f64 / size as f64).min(1.0))
    }

    /// Writes what the `-w` file buffers to disk.
    pub fn flush(&mut self) -> Result<(), CaptureError> {
        match &self.dump {
            Some(dump) => lock(dump)
                .flush()
                .map_err(|e| CaptureError::Pcap(e.to_string())),
            None => Ok(()),
        }
    }
}

/// A libpcap failure, naming the file being read, if any.
fn libpcap_error(file: Option<&PathBuf>, e: pcap::Error) -> CaptureError {
    match file {
        Some(path) => CaptureError::File {
            path: path.clone(),
            detail: e.to_string(),
        },
        None => CaptureError::Pcap(e.to_string()),
    }
}

/// A frame libpcap read, once written to the `-w` file (when there is one).
fn written_frame<'a>(dump: Option<&Mutex<Savefile>>, packet: &Packet<'a>) -> Frame<'a> {
    if let Some(dump) = dump {
        lock(dump).write(packet);
    }
    Frame {
        ts_sec: packet.header.ts.tv_sec,
        ts_usec: packet.header.ts.tv_usec.clamp(0, 999_999) as u32,
        data: packet.data,
    }
}

/// The bytes a frame takes in a classic pcap file: its record header and data.
fn record_bytes(packet: &Packet<'_>) -> u64 {
    16 + u64::from(packet.header.caplen)
}

/// The `-w` file, whichever capture of a fanout group writes to it (a panic while writing
/// leaves the file usable: libpcap's writes are whole records).
fn lock(dump: &Mutex<Savefile>) -> std::sync::MutexGuard<'_, Savefile> {
    dump.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

extern "C" {
    /// From libpcap, which the pcap crate links.
    fn pcap_get_selectable_fd(p: *mut libc::c_void) -> libc::c_int;
}

/// Joins the packet socket `fd` to fanout group `id` of `kind` (type and flags).
fn join_fanout(fd: i32, id: u16, kind: libc::c_uint) -> Result<(), CaptureError> {
    let arg: libc::c_int = (u32::from(id) | (kind << 16)) as libc::c_int;
    // SAFETY: `arg` is a valid c_int for the length given.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_PACKET,
            libc::PACKET_FANOUT,
            (&arg as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(CaptureError::Pcap(format!(
            "cannot share the capture between pipelines (PACKET_FANOUT): {}",
            std::io::Error::last_os_error()
        )))
    }
}

/// The fanout group id of the packet socket `fd`.
fn fanout_id(fd: i32) -> Result<u16, CaptureError> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` and `len` are valid for writing, `len` is its size.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_PACKET,
            libc::PACKET_FANOUT,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok((value & 0xffff) as u16)
    } else {
        Err(CaptureError::Pcap(format!(
            "cannot read the fanout group (PACKET_FANOUT): {}",
            std::io::Error::last_os_error()
        )))
    }
}

/// Waits until `fd` is readable, at most `timeout_ms`; false on timeout or a signal.
fn wait_readable(fd: i32, timeout_ms: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut pfd, 1, timeout_ms) > 0 }
}

fn open_live(interface: &str, buffer_kib: u32) -> Result<PcapCapture<pcap::Active>, CaptureError> {
    if interface != "any" {
        check_interface_exists(interface)?;
    }
    let buffer_bytes = i32::try_from(u64::from(buffer_kib) * 1024).unwrap_or(i32::MAX);
    PcapCapture::from_device(interface)
        .and_then(|c| {
            c.promisc(false)
                .snaplen(SNAPLEN)
                .buffer_size(buffer_bytes)
                .timeout(READ_TIMEOUT_MS)
                .open()
                .and_then(|c| c.setnonblock())
        })
        .map_err(|e| {
            let detail = e.to_string();
            let lower = detail.to_lowercase();
            if lower.contains("permission") || lower.contains("not permitted") {
                CaptureError::Permission {
                    interface: interface.to_string(),
                    detail,
                }
            } else if lower.contains("no such device") {
                CaptureError::NoSuchInterface {
                    name: interface.to_string(),
                    available: available_interfaces(),
                }
            } else {
                CaptureError::Pcap(detail)
            }
        })
}

fn check_interface_exists(name: &str) -> Result<(), CaptureError> {
    match Device::list() {
        Ok(devices) if !devices.iter().any(|d| d.name == name) => {
            Err(CaptureError::NoSuchInterface {
                name: name.to_string(),
                available: available_interfaces(),
            })
        }
        _ => Ok(()),
    }
}

fn available_interfaces() -> String {
    Device::list()
        .map(|ds| {
            ds.into_iter()
                .map(|d| d.name)
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default()
}

fn describe_file_error(e: pcap::Error) -> String {
    let detail = e.to_string();
    if detail.contains("unknown file format") || detail.contains("bad dump file format") {
        format!("not a pcap or pcapng file ({detail})")
    } else {
        detail
    }
}

/// The addresses of this host's interfaces, for telling the server side when both ports
/// are equal.
pub fn local_addresses() -> Vec<std::net::IpAddr> {
    Device::list()
        .map(|ds| {
            ds.into_iter()
                .flat_map(|d| d.addresses.into_iter().map(|a| a.addr))
                .collect()
        })
        .unwrap_or_default()
}

/// Builds the BPF expression for monitored ports (each over TCP, or UDP when its flag is
/// set) and servers, ANDed with the user's own expression:
/// `tcp and (port 6379 or port 6380) and (host 10.0.0.2) and (<extra>)`, or
/// `((tcp and port 6379) or (udp and port 53))` when the transports differ.
pub fn build_filter(ports: &[(u16, bool)], servers: &[std::net::IpAddr], extra: &str) -> String {
    let transport = |udp: bool| if udp { "udp" } else { "tcp" };
    let mut parts = Vec::new();
    match ports.first() {
        Some(&(_, udp)) if ports.iter().all(|(_, u)| *u == udp) => {
            parts.push(transport(udp).to_string());
            let ports: Vec<String> = ports.iter().map(|(p, _)| format!("port {p}")).collect();
            parts.push(format!("({})", ports.join(" or ")));
        }
        Some(_) => {
            let each: Vec<String> = ports
                .iter()
                .map(|(p, udp)| format!("({} and port {p})", transport(*udp)))
                .collect();
            parts.push(format!("({})", each.join(" or ")));
        }
        None => parts.push("tcp".to_string()),
    }
    if !servers.is_empty() {
        let hosts: Vec<String> = servers.iter().map(|h| format!("host {h}")).collect();
        parts.push(format!("({})", hosts.join(" or ")));
    }
    if !extra.trim().is_empty() {
        parts.push(format!("({extra})"));
    }
    parts.join(" and ")
}

/// On Ethernet, also matches the filter inside one or two VLAN tags (libpcap's `vlan`
/// keyword shifts the offsets of what follows it).
pub fn vlan_aware(filter: &str, link: LinkType) -> String {
    match link {
        LinkType::Ethernet => {
            format!("({filter}) or (vlan and (({filter}) or (vlan and ({filter}))))")
        }
        _ => filter.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_are_built_from_ports_servers_and_extra() {
        assert_eq!(
            build_filter(&[(6379, false)], &[], ""),
            "tcp and (port 6379)"
        );
        assert_eq!(
            build_filter(
                &[(53, true), (5353, true)],
                &["10.0.0.1".parse().unwrap()],
                "not host 1.1.1.1"
            ),
            "udp and (port 53 or port 5353) and (host 10.0.0.1) and (not host 1.1.1.1)"
        );
        assert_eq!(
            build_filter(&[(6379, false), (53, true)], &[], ""),
            "((tcp and port 6379) or (udp and port 53))"
        );
    }

    #[test]
    fn vlan_wrapping_only_on_ethernet() {
        assert_eq!(vlan_aware("tcp", LinkType::LinuxSll2), "tcp");
        assert!(vlan_aware("tcp", LinkType::Ethernet).contains("vlan and"));
    }
}
