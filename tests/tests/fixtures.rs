//! tcpkit on the golden captures: its counts must equal what tshark counted.

use tcpkit_tests::{fixture, run_on_fixture, tcpkit_bin, Expected, FIXTURES};

#[test]
fn summary_json_equals_the_independent_counts() {
    for name in FIXTURES {
        let e = Expected::of(name);
        let port = e.port.to_string();
        let out = run_on_fixture(name, &["--summary", "json"]);
        let json: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
        let stats = &json[0][&port];
        assert_eq!(stats["req_packets"], e.req_packets, "{name}");
        assert_eq!(stats["req_bytes"], e.req_bytes, "{name}");
        assert_eq!(stats["rsp_packets"], e.rsp_packets, "{name}");
        assert_eq!(stats["rsp_bytes"], e.rsp_bytes, "{name}");
    }
}

#[test]
fn raw_mode_prints_one_line_per_payload_packet() {
    for name in FIXTURES {
        let e = Expected::of(name);
        let out = run_on_fixture(name, &["--summary", "none"]);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len() as u64, e.payload_packets, "{name}");
        let marker = format!(":{}", e.port);
        for line in &lines {
            let fields: Vec<&str> = line.splitn(9, ' ').collect();
            assert!(
                fields[2].contains("=>") && fields[2].contains(&marker),
                "{line}"
            );
            assert!(fields[3] == "REQ" || fields[3] == "RSP", "{line}");
        }
    }
}

#[test]
fn text_summary_counts_packets_connections_and_no_gaps() {
    for name in FIXTURES {
        let e = Expected::of(name);
        let out = run_on_fixture(name, &["--summary", "text"]);
        assert!(
            out.contains(&format!("\n{} packets captured\n", e.packets)),
            "{name}: {out}"
        );
        assert!(
            out.contains(&format!("flows: {} created", e.connections)),
            "{name}: {out}"
        );
        assert!(out.contains(" 0 gaps (desyncs)"), "{name}: {out}");
        assert!(
            out.contains("decode: 0 truncated, 0 malformed"),
            "{name}: {out}"
        );
    }
}

#[test]
fn a_bpf_expression_narrows_the_capture() {
    let e = Expected::of("redis-pipelined-sll");
    let port = e.port.to_string();
    let out = run_on_fixture(
        "redis-pipelined-sll",
        &["--summary", "json", "dst", "port", &port],
    );
    let json: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    let stats = &json[0][e.port.to_string()];
    assert_eq!(stats["req_packets"], e.req_packets);
    assert_eq!(stats["rsp_packets"], 0);
}

/// A capture file spread over several pipelines prints what one pipeline prints: the same
/// slow-log lines in the same order, the same summary, for every fixture.
#[test]
fn sharded_runs_print_exactly_what_one_pipeline_prints() {
    let mut cases: Vec<(String, Vec<String>)> = FIXTURES
        .iter()
        .map(|name| {
            let e = Expected::of(name);
            let mode = name.split('-').next().unwrap().to_owned();
            (
                name.to_string(),
                vec!["-p".into(), e.port.to_string(), "-m".into(), mode],
            )
        })
        .collect();
    let dns_udp = Expected::of("dns-udp");
    cases.push((
        "dns-udp".into(),
        vec![
            "-p".into(),
            dns_udp.port.to_string(),
            "-u".into(),
            "-m".into(),
            "dns".into(),
        ],
    ));
    for (name, args) in cases {
        let pcap = fixture(&format!("{name}.pcap"));
        let run = |threads: &str, summary: &str| {
            let out = std::process::Command::new(tcpkit_bin())
                .arg("-r")
                .arg(&pcap)
                .args(&args)
                .args(["-t", "0", "--summary", summary, "--threads", threads])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let text = String::from_utf8(out.stdout).unwrap();
            // The peak RSS is the process' own.
            text.lines()
                .filter(|l| !l.starts_with("memory: peak RSS"))
                .map(|l| format!("{l}\n"))
                .collect::<String>()
        };
        for summary in ["json", "text"] {
            let one = run("1", summary);
            assert!(one.lines().count() > 1, "{name}: no exchanges?");
            for threads in ["2", "3", "4"] {
                assert!(
                    run(threads, summary) == one,
                    "{name} with {threads} threads, {summary} summary"
                );
            }
        }
    }
}
