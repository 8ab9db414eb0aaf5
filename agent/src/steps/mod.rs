//! The steps of the packet path, in order: [`capture`] (libpcap; [`pcapfile`] reads classic
//! pcap files in place and [`prefilter`] answers their filter for common frames; live,
//! [`loopback`] keeps the loopback's outgoing copies out of the ring) → [`decode`]
//! (link, IP, transport) → [`flow`] (connections, which side is the server, the flow table)
//! with [`reassembly`] of each direction. The protocol parsers
//! ([`crate::l7`]) and the pairing ([`crate::matcher`]) follow.

pub mod capture;
pub mod decode;
pub mod flow;
pub mod loopback;
pub mod pcapfile;
pub mod prefilter;
pub mod reassembly;
