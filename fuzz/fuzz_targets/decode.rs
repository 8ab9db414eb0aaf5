//! Every link type's decoder on arbitrary frames: an error or a packet, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tcpkit::steps::decode::{decode, LinkType};

fuzz_target!(|data: &[u8]| {
    for link in [
        LinkType::Ethernet,
        LinkType::LinuxSll,
        LinkType::LinuxSll2,
        LinkType::Raw,
        LinkType::Null,
        LinkType::Loop,
    ] {
        if let Ok(p) = decode(link, data) {
            assert!(p.payload.len() <= data.len());
        }
    }
});
