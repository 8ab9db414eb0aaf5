//! Every fixture replayed with the faults of real captures (`tcpkit_tests::mangle`): packets
//! lost, swapped, captured ahead of their place, duplicated, re-sent later. The clean run is
//! the oracle: every latency line printed from a mangled capture must be a line of the clean
//! run with the same latency (within 5 µs) — no wrong pairing, ever — and reordering and
//! duplication must keep at least 99.9% of the lines. Loss costs the exchanges it touches:
//! the recall is printed per fault, and at 1% loss must stay at least 96%. The same holds for
//! each exchange's own time and pipeline depth (printed by a Lua script).

use tcpkit_tests::mangle::{Comparison, Fault, Pcap};
use tcpkit_tests::{fixture, run_tcpkit, Expected, FIXTURES};

/// A fixture: its name, its server ports (`-p`), the arguments that pair it.
type Fixture = (&'static str, String, Vec<&'static str>);

/// The fixtures with the arguments that pair them.
fn fixtures() -> Vec<Fixture> {
    let port = |name: &str| Expected::of(name).port.to_string();
    let mut all: Vec<Fixture> = FIXTURES
        .iter()
        .map(|&name| {
            let mode = match name.split('-').next() {
                Some("redis") => "redis",
                Some("memcached") => "memcached",
                _ => "dns",
            };
            (name, port(name), vec!["-m", mode])
        })
        .collect();
    all.push(("dns-udp", port("dns-udp"), vec!["-m", "dns", "-u"]));
    // A 3-node Redis Cluster: redirects (MOVED, ASK) and ASKING among the exchanges.
    all.push((
        "redis-cluster",
        "27001,27002,27003".to_string(),
        vec!["-m", "redis"],
    ));
    all
}

/// The slow log of every exchange of a capture.
fn lines_of(pcap: &std::path::Path, ports: &str, args: &[&str]) -> String {
    let mut all = vec![
        "-r",
        pcap.to_str().unwrap(),
        "-p",
        ports,
        "--summary",
        "none",
    ];
    all.extend_from_slice(args);
    run_tcpkit(&all)
}

/// Seeds per fixture: small captures get more, so that each fault hits them often enough.
fn seeds(records: usize) -> u64 {
    (20_000 / records.max(1)).clamp(3, 40) as u64
}

/// Every exchange as a slow-log line whose summary ends with its own time and depth, from
/// `on_exchange` (the slow log itself is off).
const PIPELINE_LINES: &str = r#"
function on_exchange(e)
  tcpkit.log(string.format("%d %s => %s | %d.%03d ms | %s own=%d depth=%d", e.ts_us, e.client,
    e.server, e.latency_us // 1000, e.latency_us % 1000, e.summary, e.own_us, e.depth))
end
"#;

/// Replays every fixture with `fault`; returns the counts over all of them, and fails on
/// any wrong line.
fn replay(fault: Fault) -> Comparison {
    replay_with(fault, &fixtures(), lines_of)
}

/// Replays `fixtures` with `fault`, comparing the lines `lines` prints.
fn replay_with(
    fault: Fault,
    fixtures: &[Fixture],
    lines: impl Fn(&std::path::Path, &str, &[&str]) -> String,
) -> Comparison {
    let dir = tempfile::tempdir().unwrap();
    // TCPKIT_KEEP_MANGLED=DIR keeps every mangled capture there.
    let keep = std::env::var_os("TCPKIT_KEEP_MANGLED").map(std::path::PathBuf::from);
    let mut total = Comparison::default();
    let mut report = Vec::new();
    for (name, ports, args) in fixtures {
        let path = fixture(&format!("{name}.pcap"));
        let clean = lines(&path, ports, args);
        let pcap = Pcap::read(&path);
        let mut sum = Comparison::default();
        for seed in 0..seeds(pcap.len()) {
            let mangled_path = dir.path().join(format!("{name}-{seed}.pcap"));
            pcap.mangled(fault, seed).write(&mangled_path);
            if let Some(keep) = &keep {
                let name = format!("{name}-{}-{seed}.pcap", fault.to_string().replace(' ', "_"));
                let _ = std::fs::copy(&mangled_path, keep.join(name));
            }
            let mut wrong = Vec::new();
            let c = Comparison::of(&clean, &lines(&mangled_path, ports, args), &mut wrong);
            if !wrong.is_empty() && std::env::var_os("TCPKIT_MANGLE_REPORT_ONLY").is_none() {
                // Kept for whoever looks into it.
                let kept = std::env::temp_dir().join(format!("tcpkit-mangled-{name}-{seed}.pcap"));
                let _ = std::fs::copy(&mangled_path, &kept);
                panic!(
                    "{fault}, {name}, seed {seed}: {} wrong lines (capture kept as {}), e.g. {:?}",
                    wrong.len(),
                    kept.display(),
                    &wrong[..wrong.len().min(5)]
                );
            }
            sum.add(c);
        }
        report.push(format!("{name} {:.4}/{}", sum.recall(), sum.wrong));
        total.add(sum);
    }
    println!(
        "{fault}: recall {:.4} ({} of {} lines, {} wrong; {})",
        total.recall(),
        total.kept,
        total.clean,
        total.wrong,
        report.join(", ")
    );
    total
}

#[test]
fn loss_never_mispairs() {
    for p in [0.001, 0.01, 0.05] {
        let c = replay(Fault::Drop(p));
        if p == 0.01 {
            assert!(c.recall() >= 0.96, "recall at 1% loss: {:.4}", c.recall());
        }
    }
}

#[test]
fn reordering_never_mispairs_and_loses_nothing() {
    for fault in [
        Fault::SwapAdjacent(0.01),
        Fault::SwapAdjacent(0.05),
        Fault::MoveAhead(0.01),
    ] {
        let c = replay(fault);
        assert!(c.recall() >= 0.999, "{fault}: recall {:.4}", c.recall());
    }
}

#[test]
fn duplication_never_mispairs_and_loses_nothing() {
    for fault in [Fault::Duplicate(0.01), Fault::ResendLater(0.01)] {
        let c = replay(fault);
        assert!(c.recall() >= 0.999, "{fault}: recall {:.4}", c.recall());
    }
}

#[test]
fn own_times_and_depths_are_never_wrong_under_faults() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("pipeline.lua");
    std::fs::write(&script, PIPELINE_LINES).unwrap();
    let script = script.to_str().unwrap();
    // The captures with pipelines: their clean runs have depths above 1 and time queued.
    let pipelined: Vec<_> = fixtures()
        .into_iter()
        .filter(|(name, _, _)| name.starts_with("redis-pipeline") || name.starts_with("memcached"))
        .collect();
    let clean = lines_with_script(
        &fixture("redis-pipeline.pcap"),
        &Expected::of("redis-pipeline").port.to_string(),
        &["-m", "redis"],
        script,
    );
    assert!(
        clean.contains("depth=8") && clean.contains("own=0 "),
        "{clean}"
    );
    for fault in [
        Fault::Drop(0.01),
        Fault::SwapAdjacent(0.05),
        Fault::MoveAhead(0.01),
        Fault::Duplicate(0.01),
        Fault::ResendLater(0.01),
    ] {
        let c = replay_with(fault, &pipelined, |pcap, ports, args| {
            lines_with_script(pcap, ports, args, script)
        });
        if !matches!(fault, Fault::Drop(_)) {
            assert!(c.recall() >= 0.999, "{fault}: recall {:.4}", c.recall());
        }
    }
}

/// The lines of [`PIPELINE_LINES`] for every exchange of a capture.
fn lines_with_script(pcap: &std::path::Path, ports: &str, args: &[&str], script: &str) -> String {
    let mut all = args.to_vec();
    all.extend(["-S", script, "-t", "100000000"]);
    lines_of(pcap, ports, &all)
}

#[test]
fn frames_cut_by_the_snaplen_are_said_and_never_timed() {
    let name = "redis-benchmark-lo";
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cut.pcap");
    Pcap::read(&fixture(&format!("{name}.pcap")))
        .mangled(Fault::Snaplen(64), 0)
        .write(&path);
    let port = Expected::of(name).port.to_string();
    let out = run_tcpkit(&["-r", path.to_str().unwrap(), "-p", &port, "-m", "redis"]);
    assert!(
        out.contains("frames were cut short by the capture (its snaplen)"),
        "{out}"
    );
    assert!(!out.contains(" ms | "), "a latency from cut frames: {out}");
}

/// What is not timed shows in all four outputs: the stats JSON, the text summary, the
/// Prometheus page and the counters shipped to an aggregator.
#[test]
fn what_is_not_timed_is_counted_in_every_output() {
    use tcpkit::matcher::duplex::Duplex;
    use tcpkit::matcher::RedisPairing;
    use tcpkit::modes::Mode;
    use tcpkit::pipeline::{Pipeline, PipelineConfig};
    use tcpkit::steps::capture::{Capture, CaptureConfig, Source};
    use tcpkit::steps::flow::{DirectionRule, FlowLimits};

    let name = "redis-benchmark-lo";
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lossy.pcap");
    Pcap::read(&fixture(&format!("{name}.pcap")))
        .mangled(Fault::Drop(0.05), 0)
        .write(&path);
    let e = Expected::of(name);
    let port = e.port.to_string();
    let run = |summary: &str| {
        let args = [
            "-r",
            path.to_str().unwrap(),
            "-p",
            &port,
            "-m",
            "redis",
            "-t",
            "1000",
        ];
        let mut args = args.to_vec();
        args.extend(["--summary", summary]);
        run_tcpkit(&args)
    };
    // The stats JSON: per port and per command, by reason.
    let json: serde_json::Value =
        serde_json::from_str(run("json").lines().last().unwrap()).unwrap();
    let untimed = &json[0][&port]["untimed"];
    let total: u64 = [
        "request_lost",
        "reply_lost",
        "uncertain",
        "reply_before_request",
    ]
    .iter()
    .map(|k| untimed[k].as_u64().unwrap())
    .sum();
    assert!(total > 0, "{untimed}");
    assert!(json[0][&port]["commands"]["SET"]["untimed"]["uncertain"].is_u64());
    // The text summary says the same figures.
    let text = run("text");
    let said = format!(
        "not timed: {} request_lost, {} reply_lost, {} uncertain, {} reply_before_request",
        untimed["request_lost"],
        untimed["reply_lost"],
        untimed["uncertain"],
        untimed["reply_before_request"]
    );
    assert!(text.contains(&said), "{said} in {text}");
    // The metrics page and the shipped counters, from the same pipeline.
    let mut capture = Capture::open(&CaptureConfig {
        source: Source::File(path.clone()),
        filter: String::new(),
        prefilter: None,
        write_to: None,
        max_frames: None,
        max_duration: None,
    })
    .unwrap();
    let mut pipeline = Pipeline::<Duplex<RedisPairing>>::new(PipelineConfig {
        link: capture.link(),
        rule: DirectionRule::new(&[e.port], &[], &[]),
        ports: vec![(e.port, Mode::Redis)],
        flow_limits: FlowLimits::default(),
        match_limits: Default::default(),
        threshold_ms: Some(1000.0),
    });
    while let Some(frame) = capture.next_frame().unwrap() {
        pipeline.on_frame(&frame);
    }
    pipeline.finish();
    let page = pipeline.metrics(None, None);
    let on_page = tcpkit_tests::metric_sum(&page, "tcpkit_requests_untimed_total", &[]);
    assert_eq!(on_page as u64, total, "{page}");
    let c = pipeline.counters();
    let shipped = c.request_lost + c.reply_lost + c.uncertain + c.reply_before_request;
    assert_eq!(shipped, total);
}
