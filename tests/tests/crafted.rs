//! Captures crafted here, written with libpcap: VLAN and QinQ frames must pass the BPF
//! filter tcpkit builds and decode; pcapng files read like pcap files.

use std::path::Path;
use std::process::Command;

use etherparse::PacketBuilder;
use pcap::{Capture, Linktype, Packet, PacketHeader};
use tcpkit_tests::{fixture, have, requirement, tcpkit_bin, Expected};

/// An Ethernet frame carrying `payload` from 10.0.0.1:40000 to 10.0.0.2:6379, behind the
/// given 802.1Q/802.1ad tags.
fn frame(tags: &[u16], payload: &[u8]) -> Vec<u8> {
    let mut ip = Vec::new();
    PacketBuilder::ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
        .tcp(40000, 6379, 1, 1000)
        .ack(1)
        .write(&mut ip, payload)
        .unwrap();
    let mut f = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1];
    for (i, tag) in tags.iter().enumerate() {
        let tpid: u16 = if i + 1 < tags.len() { 0x88a8 } else { 0x8100 };
        f.extend_from_slice(&tpid.to_be_bytes());
        f.extend_from_slice(&tag.to_be_bytes());
    }
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    f.extend_from_slice(&ip);
    f
}

fn write_pcap(path: &Path, frames: &[Vec<u8>]) {
    let dead = Capture::dead(Linktype::ETHERNET).unwrap();
    let mut out = dead.savefile(path).unwrap();
    for (i, data) in frames.iter().enumerate() {
        let header = PacketHeader {
            ts: libc::timeval {
                tv_sec: 1_700_000_000 + i as i64,
                tv_usec: 0,
            },
            caplen: data.len() as u32,
            len: data.len() as u32,
        };
        out.write(&Packet::new(&header, data));
    }
    out.flush().unwrap();
}

fn summary_json(pcap: &Path, port: u16) -> serde_json::Value {
    let out = Command::new(tcpkit_bin())
        .args([
            "-r",
            pcap.to_str().unwrap(),
            "-p",
            &port.to_string(),
            "--summary",
            "json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    serde_json::from_str(text.lines().last().unwrap()).unwrap()
}

#[test]
fn vlan_and_qinq_frames_pass_the_filter_and_decode() {
    let dir = std::env::temp_dir().join(format!("tcpkit-crafted-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pcap = dir.join("vlan.pcap");
    write_pcap(
        &pcap,
        &[
            frame(&[], b"PING\r\n"),
            frame(&[10], b"PING\r\n"),
            frame(&[100, 10], b"PING\r\n"),
        ],
    );
    let json = summary_json(&pcap, 6379);
    assert_eq!(json[0]["6379"]["req_packets"], 3, "{json}");
    assert_eq!(json[0]["6379"]["req_bytes"], 18, "{json}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn pcapng_reads_like_pcap() {
    if !requirement(have("editcap"), "editcap (wireshark-common)") {
        return;
    }
    let name = "redis-pipelined-sll";
    let e = Expected::of(name);
    let dir = std::env::temp_dir().join(format!("tcpkit-pcapng-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ng = dir.join("capture.pcapng");
    let status = Command::new("editcap")
        .args(["-F", "pcapng"])
        .arg(fixture(&format!("{name}.pcap")))
        .arg(&ng)
        .status()
        .unwrap();
    assert!(status.success());
    let json = summary_json(&ng, e.port);
    let stats = &json[0][e.port.to_string()];
    assert_eq!(stats["req_packets"], e.req_packets);
    assert_eq!(stats["rsp_bytes"], e.rsp_bytes);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Copies a fixture without the frames `drop` selects.
fn copy_without(name: &str, to: &Path, drop: impl Fn(usize, &[u8]) -> bool) -> usize {
    let mut source = Capture::from_file(fixture(&format!("{name}.pcap"))).unwrap();
    let dead = Capture::dead(source.get_datalink()).unwrap();
    let mut out = dead.savefile(to).unwrap();
    let mut dropped = 0;
    let mut i = 0;
    while let Ok(packet) = source.next_packet() {
        if drop(i, packet.data) {
            dropped += 1;
        } else {
            out.write(&packet);
        }
        i += 1;
    }
    out.flush().unwrap();
    dropped
}

#[test]
fn a_lost_segment_in_redis_mode_is_counted_and_pairing_recovers() {
    let name = "redis-bigvalues-any";
    let e = Expected::of(name);
    let dir = std::env::temp_dir().join(format!("tcpkit-gap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pcap = dir.join("gap.pcap");
    // The 300th large frame: a segment in the middle of a 64 KiB SET value.
    let large = std::cell::Cell::new(0);
    let dropped = copy_without(name, &pcap, |_, data| {
        if data.len() > 1400 {
            large.set(large.get() + 1);
            return large.get() == 300;
        }
        false
    });
    assert_eq!(dropped, 1);
    let out = Command::new(tcpkit_bin())
        .args([
            "-r",
            pcap.to_str().unwrap(),
            "-p",
            &e.port.to_string(),
            "-m",
            "redis",
        ])
        .args(["-t", "100000", "--summary", "text"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("1 gaps (desyncs)"), "{text}");
    assert!(text.contains("matching: 1 desyncs"), "{text}");
    // The request with the hole is lost; every other one still pairs.
    let want = format!("port {}: {} requests", e.port, e.exchanges() - 1);
    assert!(text.contains(&want), "{want} in {text}");
    std::fs::remove_dir_all(&dir).unwrap();
}
