//! The capture filter's answer for the frames that make up nearly all of a capture, without
//! running its BPF program.
//!
//! A capture file is filtered in user space: libpcap interprets the BPF program of
//! [`super::capture::build_filter`] for every record, and that interpreter was an eighth of
//! the cost of reading a file in a protocol mode. For the filter tcpkit builds from the ports
//! alone (no `-s`, no extra expression), [`PortPrefilter::decides`] gives the program's exact
//! answer for untagged IPv4 frames on Ethernet, read the way the compiled program reads them;
//! any other frame (VLAN tags, IPv6, other links, a frame too short for a field) gets `None`
//! and goes through BPF as before. The tests compare both answers on every fixture frame and
//! on frames mutated at every field the program looks at.

use crate::steps::decode::LinkType;

const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const ETHERTYPE_IPV4: u16 = 0x0800;
/// Ethernet header, then the IPv4 header.
const IP_AT: usize = 14;

/// The monitored ports, each with its transport, when they are the whole filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortPrefilter {
    /// (port, IP protocol number).
    ports: Vec<(u16, u8)>,
}

impl PortPrefilter {
    /// For the filter `build_filter(ports, servers, extra)`: `Some` when that filter says
    /// nothing but "these ports over these transports".
    pub fn for_filter(
        ports: &[(u16, bool)],
        servers: &[std::net::IpAddr],
        extra: &str,
    ) -> Option<Self> {
        if ports.is_empty() || !servers.is_empty() || !extra.trim().is_empty() {
            return None;
        }
        let ports = ports
            .iter()
            .map(|&(port, udp)| (port, if udp { IPPROTO_UDP } else { IPPROTO_TCP }))
            .collect();
        Some(Self { ports })
    }

    /// The filter's answer for `frame`, or `None` when the BPF program must decide.
    ///
    /// The program (libpcap's code for `tcp and (port P)`, `udp and …` or `((tcp and port P)
    /// or (udp and port Q))`, wrapped by [`super::capture::vlan_aware`]) accepts an IPv4 frame
    /// when its protocol is the port's transport, it is not a later fragment (offset bits 0),
    /// and its source or destination port (at the header length the IHL says, whatever it
    /// is) is that port. The VLAN alternatives cannot match an IPv4 ether type.
    #[inline]
    pub fn decides(&self, link: LinkType, frame: &[u8]) -> Option<bool> {
        if link != LinkType::Ethernet || frame.len() < IP_AT + 20 {
            return None;
        }
        if u16::from_be_bytes([frame[12], frame[13]]) != ETHERTYPE_IPV4 {
            return None;
        }
        let protocol = frame[IP_AT + 9];
        if protocol != IPPROTO_TCP && protocol != IPPROTO_UDP {
            return Some(false);
        }
        if !self.ports.iter().any(|&(_, p)| p == protocol) {
            return Some(false);
        }
        if u16::from_be_bytes([frame[IP_AT + 6], frame[IP_AT + 7]]) & 0x1fff != 0 {
            return Some(false);
        }
        let ports_at = IP_AT + 4 * usize::from(frame[IP_AT] & 0x0f);
        let ports = frame.get(ports_at..ports_at + 4)?;
        let source = u16::from_be_bytes([ports[0], ports[1]]);
        let destination = u16::from_be_bytes([ports[2], ports[3]]);
        Some(
            self.ports
                .iter()
                .any(|&(port, p)| p == protocol && (port == source || port == destination)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::steps::capture::{build_filter, vlan_aware};

    /// The BPF program libpcap compiles for these ports, as `Capture::open` installs it.
    fn program(ports: &[(u16, bool)]) -> pcap::BpfProgram {
        let filter = vlan_aware(&build_filter(ports, &[], ""), LinkType::Ethernet);
        pcap::Capture::dead(pcap::Linktype::ETHERNET)
            .unwrap()
            .compile(&filter, true)
            .unwrap()
    }

    /// A TCP or UDP over IPv4 Ethernet frame between the two ports.
    fn frame(protocol: u8, source: u16, destination: u16) -> Vec<u8> {
        let mut f = vec![0u8; 14 + 20 + 20 + 8];
        f[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        f[14] = 0x45;
        f[14 + 9] = protocol;
        f[34..36].copy_from_slice(&source.to_be_bytes());
        f[36..38].copy_from_slice(&destination.to_be_bytes());
        f
    }

    /// Every mutation of the fields the program reads, and every truncation.
    fn variants() -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for protocol in [IPPROTO_TCP, IPPROTO_UDP, 1, 132] {
            for (s, d) in [
                (6379, 40000),
                (40000, 6379),
                (53, 1000),
                (1000, 53),
                (1, 2),
                (6380, 6380),
            ] {
                let base = frame(protocol, s, d);
                for len in 0..=base.len() {
                    out.push(base[..len].to_vec());
                }
                for ether in [0x0800u16, 0x86dd, 0x8100, 0x0806] {
                    let mut f = base.clone();
                    f[12..14].copy_from_slice(&ether.to_be_bytes());
                    out.push(f);
                }
                for ihl in 0..16u8 {
                    let mut f = base.clone();
                    f[14] = 0x40 | ihl;
                    // The ports where that IHL puts them.
                    let at = 14 + 4 * usize::from(ihl);
                    if at + 4 <= f.len() {
                        f[at..at + 2].copy_from_slice(&s.to_be_bytes());
                        f[at + 2..at + 4].copy_from_slice(&d.to_be_bytes());
                    }
                    out.push(f);
                }
                for fragment in [
                    0x0000u16, 0x2000, 0x0001, 0x1000, 0x1fff, 0x4000, 0x6001, 0x8000,
                ] {
                    let mut f = base.clone();
                    f[20..22].copy_from_slice(&fragment.to_be_bytes());
                    out.push(f);
                }
            }
        }
        out
    }

    #[test]
    fn answers_as_the_bpf_program_does_or_not_at_all() {
        let port_sets: [&[(u16, bool)]; 4] = [
            &[(6379, false)],
            &[(53, true)],
            &[(6379, false), (6380, false)],
            &[(6379, false), (53, true)],
        ];
        let frames = variants();
        for ports in port_sets {
            let bpf = program(ports);
            let prefilter = PortPrefilter::for_filter(ports, &[], "").unwrap();
            let mut decided = 0;
            for f in &frames {
                if let Some(answer) = prefilter.decides(LinkType::Ethernet, f) {
                    decided += 1;
                    assert_eq!(answer, bpf.filter(f), "ports {ports:?}, frame {f:02x?}");
                }
            }
            assert!(
                decided > frames.len() / 2,
                "{decided} of {} decided",
                frames.len()
            );
        }
    }

    #[test]
    fn answers_as_the_bpf_program_does_on_every_fixture_frame() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures");
        let mut frames = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "pcap") {
                continue;
            }
            let mut capture = pcap::Capture::from_file(&path).unwrap();
            if capture.get_datalink() != pcap::Linktype::ETHERNET {
                continue;
            }
            let mut packets = Vec::new();
            while let Ok(p) = capture.next_packet() {
                packets.push(p.data.to_vec());
            }
            for ports in [&[(6379, false)][..], &[(11211, false), (53, true)][..]] {
                let bpf = program(ports);
                let prefilter = PortPrefilter::for_filter(ports, &[], "").unwrap();
                for p in &packets {
                    if let Some(answer) = prefilter.decides(LinkType::Ethernet, p) {
                        assert_eq!(answer, bpf.filter(p), "{}", path.display());
                    }
                }
            }
            frames += packets.len();
        }
        assert!(frames > 1000, "only {frames} fixture frames");
    }

    #[test]
    fn only_a_ports_only_filter_is_decided_here() {
        let server: std::net::IpAddr = "10.0.0.1".parse().unwrap();
        assert!(PortPrefilter::for_filter(&[(6379, false)], &[server], "").is_none());
        assert!(PortPrefilter::for_filter(&[(6379, false)], &[], "not host 1.1.1.1").is_none());
        assert!(PortPrefilter::for_filter(&[], &[], "").is_none());
        let p = PortPrefilter::for_filter(&[(6379, false)], &[], "").unwrap();
        assert_eq!(
            p.decides(LinkType::LinuxSll, &frame(IPPROTO_TCP, 6379, 1)),
            None
        );
    }
}
