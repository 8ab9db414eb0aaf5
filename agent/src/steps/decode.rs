//! Link layer → IPv4/IPv6 → TCP/UDP, without copying.
//!
//! The link headers are parsed here by hand (etherparse's SLL parser rejects
//! `ARPHRD_LOOPBACK`, which `-i any` gives for `lo`, and it has no SLL2); the IP and
//! transport layers are handed to etherparse's zero-copy slices.
//!
//! Link headers accepted:
//! * Ethernet: `dst(6) src(6) type(2)`, with any number of 802.1Q / 802.1ad / QinQ tags
//!   `tpid(2) tci(2)` before the real ether type;
//! * Linux cooked v1 (SLL): `pkttype(2) arphrd(2) addrlen(2) addr(8) protocol(2)`;
//! * Linux cooked v2 (SLL2): `protocol(2) reserved(2) ifindex(4) arphrd(2) pkttype(1)
//!   addrlen(1) addr(8)`;
//! * raw IP (version taken from the first nibble), and the IPv4 / IPv6 link types;
//! * BSD NULL (address family in host byte order) and LOOP (network byte order).

use std::net::IpAddr;

use etherparse::{IpNumber, IpSlice, TcpSlice, UdpSlice};

/// The link layers tcpkit decodes, named after their pcap `DLT_` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkType {
    /// `DLT_EN10MB` (1).
    Ethernet,
    /// `DLT_LINUX_SLL` (113), what `tcpdump -i any -y LINUX_SLL` writes.
    LinuxSll,
    /// `DLT_LINUX_SLL2` (276), what `-i any` gives on current libpcap.
    LinuxSll2,
    /// `DLT_RAW` (12 or 14 on some systems, 101 in files): bare IPv4 or IPv6.
    Raw,
    /// `DLT_IPV4` (228).
    Ipv4,
    /// `DLT_IPV6` (229).
    Ipv6,
    /// `DLT_NULL` (0): BSD loopback, family in host byte order.
    Null,
    /// `DLT_LOOP` (108): OpenBSD loopback, family in network byte order.
    Loop,
}

impl LinkType {
    /// The link type for a pcap data link number, or `None` when tcpkit cannot decode it.
    pub fn from_dlt(dlt: i32) -> Option<Self> {
        Some(match dlt {
            0 => Self::Null,
            1 => Self::Ethernet,
            12 | 14 | 101 => Self::Raw,
            108 => Self::Loop,
            113 => Self::LinuxSll,
            228 => Self::Ipv4,
            229 => Self::Ipv6,
            276 => Self::LinuxSll2,
            _ => return None,
        })
    }
}

/// The transport header fields tcpkit uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// A TCP segment.
    Tcp {
        /// Sequence number.
        seq: u32,
        /// Acknowledgment number.
        ack: u32,
        /// The flag byte: FIN 1, SYN 2, RST 4, PSH 8, ACK 16, URG 32, ECE 64, CWR 128.
        flags: u8,
    },
    /// A UDP datagram.
    Udp,
}

/// TCP flag bits, as in the flag byte of [`Transport::Tcp`].
pub mod tcp_flags {
    /// No more data from sender.
    pub const FIN: u8 = 0x01;
    /// Synchronise sequence numbers.
    pub const SYN: u8 = 0x02;
    /// Reset the connection.
    pub const RST: u8 = 0x04;
    /// Push function.
    pub const PSH: u8 = 0x08;
    /// Acknowledgment field is significant.
    pub const ACK: u8 = 0x10;
}

/// One decoded TCP or UDP packet, borrowing its payload from the captured frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet<'a> {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// Source port.
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
    /// TCP or UDP, with the TCP fields.
    pub transport: Transport,
    /// The transport payload (may be empty).
    pub payload: &'a [u8],
}

/// Why a frame was not decoded into a [`Packet`]. Each is counted, never fatal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The frame ends before a header it announces.
    #[error("truncated frame")]
    Truncated,
    /// A header field holds an impossible value.
    #[error("malformed header")]
    Malformed,
    /// Not IPv4 or IPv6 (ARP, LLDP, …).
    #[error("not an IP packet")]
    NotIp,
    /// IP, but neither TCP nor UDP.
    #[error("not TCP or UDP")]
    NotTcpOrUdp,
    /// A fragment of an IP packet; tcpkit does not defragment.
    #[error("IP fragment")]
    Fragment,
}

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const ETHERTYPE_VLAN: u16 = 0x8100;
const ETHERTYPE_QINQ: u16 = 0x88a8;
const ETHERTYPE_QINQ_OLD: u16 = 0x9100;

/// Decodes one captured frame of the given link type. Inline, with the common case
/// ([`ipv4_plain`]), so that the packet is built where the caller keeps it.
#[inline(always)]
pub fn decode(link: LinkType, frame: &[u8]) -> Result<Packet<'_>, DecodeError> {
    let ip = ip_bytes(link, frame)?;
    decode_ip(ip)
}

/// Strips the link header and returns the IP packet it carries.
#[inline(always)]
fn ip_bytes(link: LinkType, frame: &[u8]) -> Result<&[u8], DecodeError> {
    match link {
        LinkType::Ethernet => {
            let mut offset = 12;
            loop {
                let ether_type = be16(frame, offset)?;
                offset += 2;
                match ether_type {
                    ETHERTYPE_VLAN | ETHERTYPE_QINQ | ETHERTYPE_QINQ_OLD => offset += 2,
                    other => return after_ether_type(other, frame, offset),
                }
            }
        }
        LinkType::LinuxSll => after_ether_type(be16(frame, 14)?, frame, 16),
        LinkType::LinuxSll2 => {
            let protocol = be16(frame, 0)?;
            if frame.len() < 20 {
                return Err(DecodeError::Truncated);
            }
            after_ether_type(protocol, frame, 20)
        }
        LinkType::Raw | LinkType::Ipv4 | LinkType::Ipv6 => Ok(frame),
        LinkType::Null | LinkType::Loop => {
            let raw: [u8; 4] = frame
                .get(..4)
                .and_then(|b| b.try_into().ok())
                .ok_or(DecodeError::Truncated)?;
            let family = if link == LinkType::Null {
                // Host byte order of the machine that wrote the capture: accept either.
                let le = u32::from_le_bytes(raw);
                if le <= 0xffff {
                    le
                } else {
                    u32::from_be_bytes(raw)
                }
            } else {
                u32::from_be_bytes(raw)
            };
            match family {
                // AF_INET, and AF_INET6 as BSDs, Darwin and Linux number it.
                2 | 24 | 28 | 30 | 10 => Ok(&frame[4..]),
                _ => Err(DecodeError::NotIp),
            }
        }
    }
}

fn after_ether_type(ether_type: u16, frame: &[u8], offset: usize) -> Result<&[u8], DecodeError> {
    match ether_type {
        ETHERTYPE_IPV4 | ETHERTYPE_IPV6 => frame.get(offset..).ok_or(DecodeError::Truncated),
        _ => Err(DecodeError::NotIp),
    }
}

fn be16(frame: &[u8], offset: usize) -> Result<u16, DecodeError> {
    frame
        .get(offset..offset + 2)
        .map(|b| u16::from_be_bytes([b[0], b[1]]))
        .ok_or(DecodeError::Truncated)
}

#[inline(always)]
fn decode_ip(bytes: &[u8]) -> Result<Packet<'_>, DecodeError> {
    match ipv4_plain(bytes) {
        Some(packet) => packet,
        None => decode_ip_any(bytes),
    }
}

/// The common case read by hand: IPv4 without options, not fragmented, its total length
/// within the bytes, carrying a TCP segment or UDP datagram whose lengths hold. `None` for
/// anything else, which [`decode_ip_any`] reads; where both read a packet they read the same
/// (a test compares them on mutated packets).
#[inline(always)]
fn ipv4_plain(bytes: &[u8]) -> Option<Result<Packet<'_>, DecodeError>> {
    let header: &[u8; 20] = bytes.get(..20)?.try_into().ok()?;
    let total = usize::from(u16::from_be_bytes([header[2], header[3]]));
    if header[0] != 0x45 || total < 20 || total > bytes.len() {
        return None;
    }
    // More fragments, or an offset.
    if u16::from_be_bytes([header[6], header[7]]) & 0x3fff != 0 {
        return Some(Err(DecodeError::Fragment));
    }
    let src = IpAddr::from([header[12], header[13], header[14], header[15]]);
    let dst = IpAddr::from([header[16], header[17], header[18], header[19]]);
    let payload = &bytes[20..total];
    let first: &[u8; 8] = payload.get(..8)?.try_into().ok()?;
    let be16 = |at: usize| u16::from_be_bytes([first[at], first[at + 1]]);
    match header[9] {
        6 => {
            let tcp: &[u8; 20] = payload.get(..20)?.try_into().ok()?;
            let be32 =
                |at: usize| u32::from_be_bytes([tcp[at], tcp[at + 1], tcp[at + 2], tcp[at + 3]]);
            let data_at = usize::from(tcp[12] >> 4) * 4;
            if data_at < 20 || data_at > payload.len() {
                return None;
            }
            Some(Ok(Packet {
                src,
                dst,
                sport: be16(0),
                dport: be16(2),
                transport: Transport::Tcp {
                    seq: be32(4),
                    ack: be32(8),
                    flags: tcp[13],
                },
                payload: &payload[data_at..],
            }))
        }
        17 => {
            let len = usize::from(be16(4));
            if len < 8 || len > payload.len() {
                return None;
            }
            Some(Ok(Packet {
                src,
                dst,
                sport: be16(0),
                dport: be16(2),
                transport: Transport::Udp,
                payload: &payload[8..len],
            }))
        }
        _ => None,
    }
}

/// Any IP packet, by etherparse.
#[inline(never)]
fn decode_ip_any(bytes: &[u8]) -> Result<Packet<'_>, DecodeError> {
    use etherparse::err::ip::SliceError;
    let ip = IpSlice::from_slice(bytes).map_err(|e| match e {
        SliceError::Len(_) => DecodeError::Truncated,
        SliceError::IpHeaders(_) => DecodeError::Malformed,
    })?;
    let payload = ip.payload();
    if payload.fragmented {
        return Err(DecodeError::Fragment);
    }
    let (src, dst) = (ip.source_addr(), ip.destination_addr());
    match payload.ip_number {
        IpNumber::TCP => {
            let tcp = TcpSlice::from_slice(payload.payload).map_err(|e| match e {
                etherparse::err::tcp::HeaderSliceError::Len(_) => DecodeError::Truncated,
                etherparse::err::tcp::HeaderSliceError::Content(_) => DecodeError::Malformed,
            })?;
            // The 13th byte of the TCP header holds CWR…FIN.
            let flags = tcp.header_slice()[13];
            Ok(Packet {
                src,
                dst,
                sport: tcp.source_port(),
                dport: tcp.destination_port(),
                transport: Transport::Tcp {
                    seq: tcp.sequence_number(),
                    ack: tcp.acknowledgment_number(),
                    flags,
                },
                payload: tcp.payload(),
            })
        }
        IpNumber::UDP => {
            let udp = UdpSlice::from_slice(payload.payload).map_err(|_| DecodeError::Truncated)?;
            Ok(Packet {
                src,
                dst,
                sport: udp.source_port(),
                dport: udp.destination_port(),
                transport: Transport::Udp,
                payload: udp.payload(),
            })
        }
        _ => Err(DecodeError::NotTcpOrUdp),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use etherparse::PacketBuilder;

    /// An IPv4 TCP packet 10.0.0.1:40000 → 10.0.0.2:6379 carrying `payload`.
    pub(crate) fn ipv4_tcp(payload: &[u8]) -> Vec<u8> {
        let builder = PacketBuilder::ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .tcp(40000, 6379, 1000, 65535)
            .ack(77)
            .psh();
        let mut out = Vec::new();
        builder.write(&mut out, payload).unwrap();
        out
    }

    fn ipv6_udp(payload: &[u8]) -> Vec<u8> {
        let builder = PacketBuilder::ipv6([1; 16], [2; 16], 64).udp(5353, 53);
        let mut out = Vec::new();
        builder.write(&mut out, payload).unwrap();
        out
    }

    fn ethernet(ether_type: &[u8], tags: &[[u8; 4]], ip: &[u8]) -> Vec<u8> {
        let mut f = vec![0xaa; 12];
        for tag in tags {
            f.extend_from_slice(tag);
        }
        f.extend_from_slice(ether_type);
        f.extend_from_slice(ip);
        f
    }

    fn assert_tcp_request(p: &Packet<'_>) {
        assert_eq!(p.src, "10.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(p.dst, "10.0.0.2".parse::<IpAddr>().unwrap());
        assert_eq!((p.sport, p.dport), (40000, 6379));
        assert_eq!(
            p.transport,
            Transport::Tcp {
                seq: 1000,
                ack: 77,
                flags: tcp_flags::ACK | tcp_flags::PSH
            }
        );
        assert_eq!(p.payload, b"PING\r\n");
    }

    #[test]
    fn the_plain_ipv4_path_reads_what_etherparse_reads() {
        // Packets of every kind the fast path takes, each byte of their headers then set to
        // values around every boundary: where the fast path reads a packet, etherparse reads
        // the same one (or the same error).
        let mut packets = vec![ipv4_tcp(b"PING\r\n"), ipv4_tcp(b""), {
            let mut out = Vec::new();
            PacketBuilder::ipv4([127, 0, 0, 1], [127, 0, 0, 2], 64)
                .udp(5353, 53)
                .write(&mut out, b"query")
                .unwrap();
            out
        }];
        // With Ethernet padding after it.
        let mut padded = ipv4_tcp(b"x");
        padded.extend_from_slice(&[0; 6]);
        packets.push(padded);
        let mut checked = 0;
        for packet in &packets {
            for at in 0..packet.len().min(48) {
                for value in [
                    0u8, 1, 4, 5, 6, 7, 8, 0x11, 0x20, 0x3f, 0x40, 0x45, 0x46, 0x50, 0x60, 0x80,
                    0xf0, 0xff,
                ] {
                    let mut bytes = packet.clone();
                    bytes[at] = value;
                    for cut in [bytes.len(), bytes.len().saturating_sub(3), 20, 28, 39] {
                        let bytes = &bytes[..cut.min(bytes.len())];
                        if let Some(fast) = ipv4_plain(bytes) {
                            assert_eq!(fast, decode_ip_any(bytes), "{bytes:02x?}");
                            checked += 1;
                        }
                    }
                }
            }
        }
        assert!(checked > 1000, "{checked}");
    }

    #[test]
    fn ethernet_ipv4_tcp() {
        let frame = ethernet(&[0x08, 0x00], &[], &ipv4_tcp(b"PING\r\n"));
        assert_tcp_request(&decode(LinkType::Ethernet, &frame).unwrap());
    }

    #[test]
    fn ethernet_padding_is_not_payload() {
        let mut frame = ethernet(&[0x08, 0x00], &[], &ipv4_tcp(b"PING\r\n"));
        frame.extend_from_slice(&[0; 6]);
        assert_tcp_request(&decode(LinkType::Ethernet, &frame).unwrap());
    }

    #[test]
    fn ethernet_vlan_and_qinq() {
        let ip = ipv4_tcp(b"PING\r\n");
        let one = ethernet(&[0x08, 0x00], &[[0x81, 0x00, 0x00, 0x0a]], &ip);
        assert_tcp_request(&decode(LinkType::Ethernet, &one).unwrap());
        let two = ethernet(
            &[0x08, 0x00],
            &[[0x88, 0xa8, 0x00, 0x64], [0x81, 0x00, 0x00, 0x0a]],
            &ip,
        );
        assert_tcp_request(&decode(LinkType::Ethernet, &two).unwrap());
    }

    #[test]
    fn ethernet_ipv6_udp() {
        let frame = ethernet(&[0x86, 0xdd], &[], &ipv6_udp(b"q"));
        let p = decode(LinkType::Ethernet, &frame).unwrap();
        assert!(p.src.is_ipv6());
        assert_eq!((p.sport, p.dport, p.transport), (5353, 53, Transport::Udp));
        assert_eq!(p.payload, b"q");
    }

    #[test]
    fn linux_sll_including_loopback_arphrd() {
        // pkttype 0, ARPHRD_LOOPBACK 772, addrlen 6, addr, protocol IPv4
        let mut frame = vec![0, 0, 0x03, 0x04, 0, 6, 0, 0, 0, 0, 0, 0, 0, 0, 0x08, 0x00];
        frame.extend_from_slice(&ipv4_tcp(b"PING\r\n"));
        assert_tcp_request(&decode(LinkType::LinuxSll, &frame).unwrap());
    }

    #[test]
    fn linux_sll2() {
        let mut frame = vec![0x08, 0x00, 0, 0, 0, 0, 0, 1, 0x03, 0x04, 0, 6];
        frame.extend_from_slice(&[0; 8]);
        frame.extend_from_slice(&ipv4_tcp(b"PING\r\n"));
        assert_tcp_request(&decode(LinkType::LinuxSll2, &frame).unwrap());
    }

    #[test]
    fn raw_ip_both_versions() {
        assert_tcp_request(&decode(LinkType::Raw, &ipv4_tcp(b"PING\r\n")).unwrap());
        assert!(decode(LinkType::Raw, &ipv6_udp(b"x"))
            .unwrap()
            .dst
            .is_ipv6());
    }

    #[test]
    fn bsd_null_and_loop() {
        let ip = ipv4_tcp(b"PING\r\n");
        let mut le = 2u32.to_le_bytes().to_vec();
        le.extend_from_slice(&ip);
        assert_tcp_request(&decode(LinkType::Null, &le).unwrap());
        let mut be = 2u32.to_be_bytes().to_vec();
        be.extend_from_slice(&ip);
        assert_tcp_request(&decode(LinkType::Null, &be).unwrap());
        assert_tcp_request(&decode(LinkType::Loop, &be).unwrap());
        let mut v6 = 30u32.to_le_bytes().to_vec();
        v6.extend_from_slice(&ipv6_udp(b""));
        assert!(decode(LinkType::Null, &v6).is_ok());
    }

    #[test]
    fn ipv4_with_options() {
        let mut ip = ipv4_tcp(b"PING\r\n");
        // Grow the header by one 4-byte option word (NOPs), fix IHL and total length.
        ip[0] = 0x46;
        let total = u16::from_be_bytes([ip[2], ip[3]]) + 4;
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        ip.splice(20..20, [1, 1, 1, 1]);
        assert_tcp_request(&decode(LinkType::Raw, &ip).unwrap());
    }

    #[test]
    fn every_truncation_is_an_error_never_a_panic() {
        let frames = [
            (
                LinkType::Ethernet,
                ethernet(&[0x08, 0x00], &[[0x81, 0, 0, 1]], &ipv4_tcp(b"x")),
            ),
            (LinkType::LinuxSll2, {
                let mut f = vec![0x86, 0xdd, 0, 0, 0, 0, 0, 1, 0x03, 0x04, 0, 6];
                f.extend_from_slice(&[0; 8]);
                f.extend_from_slice(&ipv6_udp(b"abc"));
                f
            }),
        ];
        for (link, frame) in frames {
            // The last byte is payload: cutting it leaves a shorter IP total length claim.
            for cut in 0..frame.len() {
                assert!(
                    decode(link, &frame[..cut]).is_err(),
                    "{link:?} cut at {cut}"
                );
            }
            assert!(decode(link, &frame).is_ok());
        }
    }

    #[test]
    fn non_ip_and_non_transport_are_classified() {
        let arp = ethernet(&[0x08, 0x06], &[], &[0; 28]);
        assert_eq!(decode(LinkType::Ethernet, &arp), Err(DecodeError::NotIp));
        let mut icmp = ipv4_tcp(b"");
        icmp[9] = 1; // protocol ICMP (checksum is not checked)
        assert_eq!(decode(LinkType::Raw, &icmp), Err(DecodeError::NotTcpOrUdp));
        assert_eq!(decode(LinkType::Raw, &[0x45]), Err(DecodeError::Truncated));
        assert_eq!(
            decode(LinkType::Raw, &[0x75; 40]),
            Err(DecodeError::Malformed)
        );
    }

    #[test]
    fn fragments_are_reported() {
        let mut ip = ipv4_tcp(b"PING\r\n");
        ip[6] = 0x20; // more fragments
        assert_eq!(decode(LinkType::Raw, &ip), Err(DecodeError::Fragment));
    }
}
