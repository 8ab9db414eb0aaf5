//! The fleet, end to end: real agents replaying real Redis fixtures stream to a real
//! aggregator (SQLite file in a temp dir), and `tcpkit-query` must answer exactly what the
//! fixtures contain — also when the aggregator is killed mid-stream, and when every process
//! sits on a host (network namespace) of its own.

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

use serde_json::Value;
use tcpkit_tests::*;

/// An agent replaying `fixture` to the aggregator at `url` as `id`, slow at `threshold_ms`.
fn start_agent(
    prefix: &[&str],
    fixture_name: &str,
    id: &str,
    threshold_ms: &str,
    url: &str,
) -> Child {
    let pcap = fixture(&format!("{fixture_name}.pcap"));
    let mut command = command_in(prefix, &tcpkit_bin());
    command
        .arg("-r")
        .arg(pcap)
        .args([
            "-p",
            "26379",
            "-m",
            "redis",
            "-t",
            threshold_ms,
            "--summary",
            "json",
        ])
        .args([
            "--aggregator",
            url,
            "--agent-id",
            id,
            "--ship-timeout",
            "60",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tcpkit")
}

/// What an agent printed: its slow-log lines, its stats JSON (port 26379), its stderr.
struct AgentOutput {
    slow_lines: Vec<String>,
    port: Value,
    stderr: String,
}

fn finish_agent(child: Child) -> AgentOutput {
    let out = child.wait_with_output().expect("wait for tcpkit");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "tcpkit failed: {stderr}");
    assert!(
        !stderr.contains('\x1b'),
        "colour codes on a pipe: {stderr:?}"
    );
    let stdout = String::from_utf8(out.stdout).expect("utf-8");
    let mut lines: Vec<String> = stdout.lines().map(str::to_string).collect();
    let json: Value =
        serde_json::from_str(&lines.pop().expect("summary line")).expect("JSON summary");
    AgentOutput {
        slow_lines: lines,
        port: json[0]["26379"].clone(),
        stderr,
    }
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("{v} is not a count"))
}

fn sum_buckets(a: &Value, b: &Value) -> Vec<u64> {
    (0..18)
        .map(|i| u(&a["latencies"][i]) + u(&b["latencies"][i]))
        .collect()
}

/// What one agent reading the fixtures `names` merged into one capture reports for port
/// 26379 (its stats JSON), with more arguments.
fn one_agent_over(dir: &Path, names: &[&str], extra: &[&str]) -> Value {
    let merged = merged_fixtures(dir, names);
    let mut args = vec![
        merged.to_str().expect("utf-8"),
        "-p",
        "26379",
        "-m",
        "redis",
    ];
    args.extend(["-t", "100000", "--summary", "json"]);
    args.extend_from_slice(extra);
    let out = run_tcpkit(&[&["-r"][..], &args].concat());
    let json: Value = serde_json::from_str(out.lines().last().expect("summary")).expect("JSON");
    json[0]["26379"].clone()
}

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}

/// Two agents, each replaying a different fixture: every query equals the fixtures.
#[test]
fn two_agents_queries_equal_the_fixtures() {
    let dir = tempdir();
    let agg = Aggregator::start(dir.path(), free_port(), &[], &[]);
    let url = agg.url();
    let a1 = start_agent(&[], "redis-benchmark-lo", "a1", "1", &url);
    let a2 = start_agent(&[], "redis-slow", "a2", "20", &url);
    let (a1, a2) = (finish_agent(a1), finish_agent(a2));
    for a in [&a1, &a2] {
        assert!(
            a.stderr.contains("0 batches (0 events) unacknowledged"),
            "{}",
            a.stderr
        );
    }
    check_fleet(&[], &url, &a1, &a2);
    // Its log is a file: plain text, no colour codes.
    let log = std::fs::read_to_string(dir.path().join("aggregator.log")).expect("log");
    assert!(!log.is_empty() && !log.contains('\x1b'), "{log:?}");

    // The merged histogram is the histogram of all requests: one agent reading both
    // captures at once has the very same percentiles.
    if requirement(have("mergecap"), "mergecap (wireshark-common)") {
        let one = &one_agent_over(dir.path(), &["redis-benchmark-lo", "redis-slow"], &[]);
        let hist = query_json(&[], &url, &["hist"]);
        for key in ["p50_us", "p90_us", "p99_us", "p999_us", "max_us"] {
            assert_eq!(hist[key], one[key], "{key}");
        }
        assert_eq!(hist["count"], one["total_reqs"]);
    }
    // The heatmap holds every request once, step by step, and its cells' buckets add up.
    let hist = query_json(&[], &url, &["hist"]);
    for (from, to, step) in [
        ("2026-11-01", "2026-12-02", "10m"),
        ("2026-01-01", "2027-01-01", "1d"),
    ] {
        let args = ["heatmap", "--from", from, "--to", to, "--step", step];
        let map = query_json(&[], &url, &args);
        let steps = map["series"][0]["steps"].as_array().expect("steps");
        let count: u64 = steps.iter().map(|s| u(&s["count"])).sum();
        assert_eq!(count, u(&hist["count"]), "{step}");
        for s in steps {
            let cells: u64 = s["fine_count"]
                .as_array()
                .expect("cells")
                .iter()
                .map(u)
                .sum();
            assert_eq!(cells, u(&s["count"]));
        }
        let text = query_text(&[], &url, &args);
        assert!(
            text.contains(&format!("{} requests", hist["count"])) && !text.contains('\x1b'),
            "{text}"
        );
    }
}

/// Own times and pipeline depths reach the fleet whole: each agent's figures come back from
/// the store (events and merged histograms), and rank `top --by own-p99`.
#[test]
fn own_times_and_depths_fleet_wide() {
    let dir = tempdir();
    let agg = Aggregator::start(dir.path(), free_port(), &[], &[]);
    let url = agg.url();
    let a1 = finish_agent(start_agent(&[], "redis-pipeline", "p1", "20", &url));
    let a2 = finish_agent(start_agent(&[], "redis-pipelined-sll", "p2", "1000", &url));
    let by_agent = query_json(&[], &url, &["hist", "--by", "agent"]);
    let groups = by_agent["groups"].as_array().expect("groups");
    assert_eq!(groups.len(), 2);
    for (group, agent) in groups.iter().zip([&a1, &a2]) {
        let p = &agent.port;
        assert_eq!(group["own_count"], p["total_reqs"]);
        assert_eq!(group["own_sum_us"], p["own_costs"]);
        for key in ["p50", "p90", "p99", "p999", "max"] {
            assert_eq!(
                group[format!("own_{key}_us")],
                p[format!("own_{key}_us")],
                "{key}"
            );
        }
        assert_eq!(group["pipelined"], p["pipelined_reqs"]);
        for key in ["depth_p50", "depth_p99", "depth_max"] {
            assert_eq!(group[key], p[key], "{key}");
        }
    }
    // Every slow event carries its own time and depth: those of p1 add up to its figures.
    let events = query_json(&[], &url, &["slow", "--agent", "p1", "--limit", "1000"]);
    let events = events.as_array().expect("array");
    assert_eq!(events.len() as u64, u(&a1.port["slow_reqs"]));
    let own: u64 = events.iter().map(|e| u(&e["own_us"])).sum();
    assert_eq!(own, u(&a1.port["own_costs"]));
    let mut depths = std::collections::BTreeMap::<String, u64>::new();
    for e in events {
        *depths.entry(e["depth"].to_string()).or_default() += 1;
    }
    assert_eq!(serde_json::json!(depths), a1.port["depths"]);
    // Ranked by own p99: the DEBUG SLEEP heads first, though the GETs behind them are as slow.
    let top = query_json(&[], &url, &["top", "--by", "own-p99"]);
    let keys: Vec<&str> = top
        .as_array()
        .expect("array")
        .iter()
        .map(|r| r["key"].as_str().expect("key"))
        .collect();
    assert_eq!(keys.first(), Some(&"DEBUG"), "{top}");
    let text = query_text(&[], &url, &["hist", "--own", "--by", "command"]);
    assert!(
        text.contains("queued ms") && text.contains("own time"),
        "{text}"
    );
    let get = text
        .lines()
        .find(|l| l.starts_with("redis GET "))
        .expect("a GET row");
    assert!(
        get.contains(&format!(
            " {} ",
            a1.port["commands"]["GET"]["pipelined_reqs"]
                .as_u64()
                .unwrap()
                + a2.port["commands"]["GET"]["pipelined_reqs"]
                    .as_u64()
                    .unwrap()
        )),
        "{text}"
    );
}

/// Redis Cluster slots across the fleet: two agents each see a part of a real 3-node
/// cluster's traffic (tests/fixtures/redis-cluster.pcap); `top --of slot` sums them into the
/// requests per slot the servers' own CLUSTER KEYSLOT counted, with every redirect.
#[test]
fn cluster_slots_fleet_wide() {
    let dir = tempdir();
    let agg = Aggregator::start(dir.path(), free_port(), &[], &[]);
    let url = agg.url();
    let pcap = fixture("redis-cluster.pcap");
    let agent = |ports: &str, id: &str| {
        let out = command_in(&[], &tcpkit_bin())
            .arg("-r")
            .arg(&pcap)
            .args([
                "-p",
                ports,
                "-m",
                "redis",
                "--slots",
                "-t",
                "100000",
                "--summary",
                "json",
            ])
            .args([
                "--aggregator",
                &url,
                "--agent-id",
                id,
                "--ship-timeout",
                "60",
            ])
            .output()
            .expect("run tcpkit");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let json: Value = serde_json::from_slice(out.stdout.trim_ascii_end()).expect("JSON");
        json
    };
    let mut ports = agent("27001", "c1").as_array().expect("array").clone();
    ports.extend(
        agent("27002,27003", "c2")
            .as_array()
            .expect("array")
            .iter()
            .cloned(),
    );
    let expected = Expected::of("redis-cluster").json["ports"].clone();
    let mut want = std::collections::BTreeMap::<String, (u64, u64, u64)>::new();
    for (port, figures) in expected.as_object().expect("ports") {
        for (slot, n) in figures["slots"].as_object().expect("slots") {
            want.entry(slot.clone()).or_default().0 += u(n);
        }
        // Every redirected slot is in the agent's JSON.
        let agent_port = ports.iter().find_map(|p| p.get(port)).expect("port");
        for (slot, f) in agent_port["slots"].as_object().expect("slots") {
            let w = want.entry(slot.clone()).or_default();
            w.1 += u(&f["moved"]);
            w.2 += u(&f["ask"]);
        }
    }
    let top = query_json(&[], &url, &["top", "--of", "slot", "--limit", "100000"]);
    let rows = top.as_array().expect("rows");
    assert_eq!(rows.len(), want.len(), "{top}");
    for row in rows {
        let slot = row["key"].as_str().expect("key");
        let (count, moved, ask) = want[slot];
        assert_eq!(
            (u(&row["count"]), u(&row["moved"]), u(&row["ask"])),
            (count, moved, ask),
            "slot {slot}"
        );
        assert!(
            u(&row["p99_le_us"]) >= u(&row["p50_le_us"]) && u(&row["p50_le_us"]) > 0,
            "{row}"
        );
    }
    // Ranked by requests: counts never grow down the list.
    let counts: Vec<u64> = rows.iter().map(|r| u(&r["count"])).collect();
    assert!(counts.windows(2).all(|w| w[0] >= w[1]), "{counts:?}");
    let by_redirects = query_json(
        &[],
        &url,
        &["top", "--of", "slot", "--by", "redirects", "--limit", "1"],
    );
    assert_eq!(u(&by_redirects[0]["ask"]), 5, "{by_redirects}");
    // Per agent, and as a table for people.
    let c1 = query_json(
        &[],
        &url,
        &["top", "--of", "slot", "--agent", "c2", "--limit", "100000"],
    );
    let c2_slots: u64 = ["27002", "27003"]
        .iter()
        .map(|p| {
            expected[p]["slots"]
                .as_object()
                .expect("slots")
                .values()
                .map(u)
                .sum::<u64>()
        })
        .sum();
    assert_eq!(
        c1.as_array()
            .expect("rows")
            .iter()
            .map(|r| u(&r["count"]))
            .sum::<u64>(),
        c2_slots
    );
    let text = query_text(&[], &url, &["top", "--of", "slot", "--by", "redirects"]);
    assert!(
        text.contains("p99 ≤ ms") && text.contains("moved"),
        "{text}"
    );
    // The redirects also reach the per-command histograms.
    let hist = query_json(&[], &url, &["hist", "--port", "27001"]);
    assert_eq!(hist["moved"], expected["27001"]["moved"]);
    let refused = command_in(&[], &bin("tcpkit-query"))
        .args([
            "--aggregator",
            &url,
            "top",
            "--of",
            "slot",
            "--command",
            "GET",
        ])
        .output()
        .expect("run tcpkit-query");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("not kept per command"));
}

/// Key templates across the fleet: two agents each replay a capture; `tcpkit-query keys`
/// merges their templates into what one agent reading both captures finds, figure for figure.
#[test]
fn key_templates_fleet_wide_equal_one_agent_over_both() {
    let dir = tempdir();
    let agg = Aggregator::start(dir.path(), free_port(), &[], &[]);
    let url = agg.url();
    let a1 = finish_agent(start_agent(&[], "redis-keys", "k1", "100000", &url));
    let a2 = finish_agent(start_agent(&[], "redis-benchmark-lo", "k2", "100000", &url));
    let keys = query_json(&[], &url, &["keys", "--limit", "100000"]);
    let rows = keys.as_array().expect("rows");
    let templates = |a: &AgentOutput| a.port["templates"].as_object().expect("templates").clone();
    let (t1, t2) = (templates(&a1), templates(&a2));
    assert_eq!(rows.len(), t1.len() + t2.len(), "{keys}");
    for row in rows {
        let name = row["key"].as_str().expect("key");
        assert_eq!(row["proto"], "redis");
        let count: u64 = [&t1, &t2]
            .iter()
            .filter_map(|t| t.get(name))
            .map(|t| u(&t["total_reqs"]))
            .sum();
        assert_eq!(u(&row["count"]), count, "{name}");
    }
    let counts: Vec<u64> = rows.iter().map(|r| u(&r["count"])).collect();
    assert!(counts.windows(2).all(|w| w[0] >= w[1]), "{counts:?}");
    // Ranked by bytes, and as a table.
    let by_bytes = query_json(&[], &url, &["keys", "--by", "bytes", "--limit", "1"]);
    let most = t1
        .iter()
        .chain(&t2)
        .map(|(_, t)| u(&t["req_bytes"]) + u(&t["rsp_bytes"]))
        .max();
    assert_eq!(
        Some(u(&by_bytes[0]["req_bytes"]) + u(&by_bytes[0]["rsp_bytes"])),
        most
    );
    let text = query_text(&[], &url, &["keys"]);
    assert!(
        text.contains("user:{id}:cart") && text.contains("multi-key"),
        "{text}"
    );
    // One agent over both captures at once: the same templates, the same figures.
    if requirement(have("mergecap"), "mergecap (wireshark-common)") {
        let one = one_agent_over(dir.path(), &["redis-keys", "redis-benchmark-lo"], &[]);
        let one = one["templates"].as_object().expect("templates").clone();
        assert_eq!(one.len(), rows.len());
        for row in rows {
            let t = &one[row["key"].as_str().expect("key")];
            for (fleet, agent) in [
                ("count", "total_reqs"),
                ("keys", "keys"),
                ("multi_key", "multi_key_reqs"),
                ("req_bytes", "req_bytes"),
                ("rsp_bytes", "rsp_bytes"),
                ("p50_us", "p50_us"),
                ("p99_us", "p99_us"),
                ("max_us", "max_us"),
            ] {
                assert_eq!(row[fleet], t[agent], "{} {fleet}", row["key"]);
            }
        }
    }
}

/// What the aggregator must answer after agents `a1` (redis-benchmark-lo, -t 1) and `a2`
/// (redis-slow, -t 20) have shipped.
fn check_fleet(prefix: &[&str], url: &str, a1: &AgentOutput, a2: &AgentOutput) {
    let exchanges =
        Expected::of("redis-benchmark-lo").exchanges() + Expected::of("redis-slow").exchanges();
    assert_eq!(
        u(&a1.port["total_reqs"]) + u(&a2.port["total_reqs"]),
        exchanges
    );

    // hist: the sum of both agents' histograms.
    let hist = query_json(prefix, url, &["hist"]);
    assert_eq!(u(&hist["count"]), exchanges);
    assert_eq!(
        u(&hist["sum_us"]),
        u(&a1.port["total_costs"]) + u(&a2.port["total_costs"])
    );
    let latencies: Vec<u64> = hist["latencies"]
        .as_array()
        .expect("array")
        .iter()
        .map(u)
        .collect();
    assert_eq!(latencies, sum_buckets(&a1.port, &a2.port));
    assert_eq!(
        u(&hist["max_us"]),
        u(&a1.port["max_us"]).max(u(&a2.port["max_us"]))
    );
    // --by agent: each agent's own histogram, and its percentiles.
    let by_agent = query_json(prefix, url, &["hist", "--by", "agent"]);
    let groups = by_agent["groups"].as_array().expect("groups");
    assert_eq!(groups.len(), 2);
    for (group, agent) in groups.iter().zip([a1, a2]) {
        for key in ["p50_us", "p90_us", "p99_us", "p999_us", "max_us"] {
            assert_eq!(group[key], agent.port[key], "{key} of {}", group["key"]);
        }
        assert_eq!(group["count"], agent.port["total_reqs"]);
        assert_eq!(group["latencies"], agent.port["latencies"]);
    }
    // --by command: the per-command figures of both agents, added.
    let by_command = query_json(prefix, url, &["hist", "--by", "command"]);
    for group in by_command["groups"].as_array().expect("groups") {
        let command = group["key"].as_str().expect("key");
        let count = |a: &AgentOutput| {
            a.port["commands"][command]["total_reqs"]
                .as_u64()
                .unwrap_or(0)
        };
        assert_eq!(u(&group["count"]), count(a1) + count(a2), "{command}");
    }

    // slow: every slow exchange once, and its line is the agent's own slow-log line.
    let slow = query_json(prefix, url, &["slow", "--limit", "100000"]);
    let slow = slow.as_array().expect("array");
    let slow_count = u(&a1.port["slow_reqs"]) + u(&a2.port["slow_reqs"]);
    assert_eq!(slow.len() as u64, slow_count);
    assert_eq!(a1.slow_lines.len() + a2.slow_lines.len(), slow.len());
    let sleeps = query_json(
        prefix,
        url,
        &[
            "slow",
            "--agent",
            "a2",
            "--min-ms",
            "20",
            "--grep",
            "SLEEP 0.*",
        ],
    );
    assert_eq!(
        sleeps.as_array().expect("array").len() as u64,
        Expected::of("redis-slow")
            .extra("slow_20ms")
            .expect("slow_20ms")
    );
    let lines = query_text(prefix, url, &["slow", "--limit", "100000"]);
    for (agent, output) in [("a1", a1), ("a2", a2)] {
        let tag = format!("[{agent}] ");
        let mut mine: Vec<&str> = lines.lines().filter_map(|l| l.strip_prefix(&tag)).collect();
        let mut expected: Vec<&str> = output.slow_lines.iter().map(String::as_str).collect();
        mine.sort_unstable();
        expected.sort_unstable();
        assert_eq!(mine, expected, "slow lines of {agent}");
    }

    // agents: both, their events, their ports, clean counters.
    let agents = query_json(prefix, url, &["agents"]);
    let agents = agents.as_array().expect("array");
    assert_eq!(agents.len(), 2);
    for (a, output) in agents.iter().zip([a1, a2]) {
        assert_eq!(a["events"], output.port["slow_reqs"]);
        assert_eq!(a["ports"][0]["port"], 26379);
        assert_eq!(a["ports"][0]["proto"], "redis");
        assert_eq!(a["sessions"], 1);
        for counter in [
            "kernel_drops",
            "gaps",
            "desyncs",
            "shipper_dropped_events",
            "shipper_dropped_histograms",
        ] {
            assert_eq!(a[counter], 0, "{counter} of {}", a["id"]);
        }
        // Clean captures: every exchange timed, and the shipped counters say so.
        for reason in [
            "request_lost",
            "reply_lost",
            "uncertain",
            "reply_before_request",
        ] {
            assert_eq!(a["untimed"][reason], 0, "{reason} of {}", a["id"]);
        }
        assert_eq!(a["clock_skew"], 0);
        assert!(u(&a["last_seen_us"]) > 0);
    }

    // top: commands by slow count, the largest first.
    let top = query_json(prefix, url, &["top", "--by", "slow"]);
    let slows: Vec<u64> = top
        .as_array()
        .expect("array")
        .iter()
        .map(|r| u(&r["slow"]))
        .collect();
    assert!(slows.windows(2).all(|w| w[0] >= w[1]), "{slows:?}");
    assert_eq!(slows.iter().sum::<u64>(), slow_count);
}

fn query_text(prefix: &[&str], url: &str, args: &[&str]) -> String {
    let mut command = command_in(prefix, &bin("tcpkit-query"));
    let out = command
        .args(["--aggregator", url])
        .args(args)
        .output()
        .expect("tcpkit-query");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

/// The aggregator is killed (SIGKILL) again and again while agents stream every exchange
/// as an event, and restarted on the same file: in the end each event is stored once.
#[test]
fn killed_aggregator_loses_and_duplicates_nothing() {
    let dir = tempdir();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    // The agents start first: they buffer and retry until the aggregator is up.
    let agents: Vec<(Child, &str)> = [("redis-benchmark-lo", "k1"), ("redis-pipelined-sll", "k2")]
        .into_iter()
        .map(|(f, id)| (start_agent(&[], f, id, "0", &url), f))
        .collect();
    for round in 0..4 {
        let agg = Aggregator::start(dir.path(), port, &[], &[]);
        std::thread::sleep(Duration::from_millis(150 + 100 * round));
        drop(agg); // SIGKILL
    }
    let agg = Aggregator::start(dir.path(), port, &[], &[]);
    let mut expected_events = 0;
    for (child, fixture_name) in agents {
        let out = finish_agent(child);
        assert!(
            out.stderr.contains("0 batches (0 events) unacknowledged"),
            "{}",
            out.stderr
        );
        assert_eq!(
            u(&out.port["total_reqs"]),
            Expected::of(fixture_name).exchanges()
        );
        expected_events += u(&out.port["slow_reqs"]);
    }
    let events = query_json(&[], &agg.url(), &["slow", "--limit", "1000000"]);
    assert_eq!(
        events.as_array().expect("array").len() as u64,
        expected_events
    );
    let hist = query_json(&[], &agg.url(), &["hist"]);
    assert_eq!(u(&hist["count"]), expected_events);
    let agents = query_json(&[], &agg.url(), &["agents"]);
    let stored: u64 = agents
        .as_array()
        .expect("array")
        .iter()
        .map(|a| u(&a["events"]))
        .sum();
    assert_eq!(stored, expected_events);
    assert!(Path::new(&agg.db).exists());
}

/// The same as the first test with every process on a host of its own: the aggregator in
/// one network namespace, each agent in another, linked by veth pairs.
#[test]
fn agents_on_other_hosts() {
    if !requirement(
        is_root() && have("ip"),
        "root and iproute2 (network namespaces)",
    ) {
        return;
    }
    let tag = std::process::id() % 10_000;
    let hub = Netns::new(&format!("tkagg{tag}"));
    let hosts: Vec<(Netns, String)> = (1..=2)
        .map(|i| {
            let ns = Netns::new(&format!("tkh{i}x{tag}"));
            let (a, b) = (format!("tka{i}x{tag}"), format!("tkb{i}x{tag}"));
            sh(&format!(
                "ip link add {a} type veth peer name {b} && \
                 ip link set {a} netns {hub} && ip link set {b} netns {host} && \
                 ip -n {hub} addr add 10.201.{i}.1/30 dev {a} && ip -n {hub} link set {a} up && \
                 ip -n {host} addr add 10.201.{i}.2/30 dev {b} && ip -n {host} link set {b} up",
                hub = hub.0,
                host = ns.0
            ));
            (ns, format!("10.201.{i}.1"))
        })
        .collect();
    let dir = tempdir();
    let port = 50_051;
    let agg = Aggregator::start(dir.path(), port, &hub.prefix(), &[]);
    let agents: Vec<Child> = hosts
        .iter()
        .zip([
            ("redis-benchmark-lo", "a1", "1"),
            ("redis-slow", "a2", "20"),
        ])
        .map(|((ns, ip), (f, id, t))| {
            start_agent(&ns.prefix(), f, id, t, &format!("http://{ip}:{port}"))
        })
        .collect();
    let mut outputs = agents.into_iter().map(finish_agent);
    let (a1, a2) = (outputs.next().expect("a1"), outputs.next().expect("a2"));
    check_fleet(&hub.prefix(), &agg.url(), &a1, &a2);
    drop(agg);
}

/// `tcpkit-query` refuses values out of range, says when nothing matches, matches commands in
/// any case, and prints JSON lines and the agents' state.
#[test]
fn the_query_cli_checks_its_input_and_says_when_nothing_matches() {
    let dir = tempdir();
    let agg = Aggregator::start(dir.path(), free_port(), &[], &[]);
    let url = agg.url();
    let a1 = finish_agent(start_agent(&[], "redis-benchmark-lo", "a1", "1", &url));
    let run = |args: &[&str]| {
        command_in(&[], &bin("tcpkit-query"))
            .args(["--aggregator", &url])
            .args(args)
            .output()
            .expect("tcpkit-query")
    };
    for (args, says) in [
        (
            &["slow", "--min-ms", "1e300"][..],
            "not between 0 and a year",
        ),
        (&["slow", "--min-ms=-1"][..], "not between 0 and a year"),
        (&["slow", "--min-ms", "NaN"][..], "not between 0 and a year"),
        (&["slow", "--limit", "0"][..], "0 is not in 1..=1000000"),
        (&["top", "--limit", "0"][..], "0 is not in 1..=100000"),
        (
            &["slow", "--from", "18446744073709551615"][..],
            "after the year 9999",
        ),
    ] {
        let out = run(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
    for args in [
        &["slow", "--agent", "nosuch"][..],
        &["hist", "--agent", "nosuch"][..],
        &["top", "--agent", "nosuch"][..],
    ] {
        let out = run(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{args:?}: {stderr}");
        assert!(
            stderr.contains("no data for these filters"),
            "{args:?}: {stderr}"
        );
    }
    let out = run(&["slow"]);
    assert!(!String::from_utf8_lossy(&out.stderr).contains("no data"));

    let all = a1.slow_lines.len();
    let upper = query_json(
        &[],
        &url,
        &["slow", "--command", "SET", "--limit", "1000000"],
    );
    let lower = query_json(
        &[],
        &url,
        &["slow", "--command", "set", "--limit", "1000000"],
    );
    assert_eq!(upper, lower);
    assert!(!upper.as_array().expect("array").is_empty());

    let lines = query_text(&[], &url, &["slow", "--json-lines", "--limit", "1000000"]);
    let objects: Vec<Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object a line"))
        .collect();
    assert_eq!(objects.len(), all);
    assert_eq!(
        Value::Array(objects),
        query_json(&[], &url, &["slow", "--limit", "1000000"])
    );

    let agents = query_text(&[], &url, &["agents"]);
    let row = agents.lines().nth(1).expect("a1's row");
    assert!(
        row.starts_with("a1 ") && row.contains(" stale "),
        "{agents}"
    );
    assert_eq!(query_json(&[], &url, &["agents"])[0]["connected"], false);
}

/// SIGHUP (logrotate's signal) does not stop the aggregator.
#[test]
fn the_aggregator_lives_through_sighup() {
    let dir = tempdir();
    let agg = Aggregator::start(dir.path(), free_port(), &[], &[]);
    // SAFETY: a signal to the child this test started.
    unsafe { libc::kill(agg.guard.0.id() as i32, libc::SIGHUP) };
    std::thread::sleep(Duration::from_millis(300));
    let agents = query_json(&[], &agg.url(), &["agents"]);
    assert!(agents.as_array().is_some());
}

/// Commands of several protocols that share a name stay apart, each with its protocol.
#[test]
fn commands_of_two_protocols_are_told_apart() {
    let dir = tempdir();
    let agg = Aggregator::start(dir.path(), free_port(), &[], &[]);
    let url = agg.url();
    finish_agent(start_agent(
        &[],
        "redis-benchmark-lo",
        "cache-a",
        "1000",
        &url,
    ));
    let memcached = Expected::of("memcached-text");
    let out = command_in(&[], &tcpkit_bin())
        .arg("-r")
        .arg(fixture("memcached-text.pcap"))
        .args([
            "-p",
            &memcached.port.to_string(),
            "-m",
            "memcached",
            "-t",
            "1000",
        ])
        .args([
            "--summary",
            "none",
            "--aggregator",
            &url,
            "--agent-id",
            "cache-b",
        ])
        .output()
        .expect("tcpkit");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let hist = query_json(&[], &url, &["hist", "--by", "command", "--command", "get"]);
    let groups: Vec<(String, String, u64)> = hist["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .map(|g| {
            (
                g["proto"].as_str().unwrap().to_owned(),
                g["key"].as_str().unwrap().to_owned(),
                u(&g["count"]),
            )
        })
        .collect();
    let redis_gets = Expected::of("redis-benchmark-lo").commands["GET"];
    assert_eq!(
        groups,
        [
            ("memcached".to_owned(), "get".to_owned(), 104),
            ("redis".to_owned(), "GET".to_owned(), redis_gets)
        ],
        "{hist}"
    );
    let top = query_text(
        &[],
        &url,
        &[
            "top",
            "--of",
            "command",
            "--by",
            "total",
            "--command",
            "get",
        ],
    );
    assert!(
        top.contains(" redis GET ") && top.contains(" memcached get "),
        "{top}"
    );
}

/// A batch the aggregator refuses as impossible (a capture from 1995) is dropped and counted
/// by the agent, not re-sent forever: the agent ends at once with exit status 3.
#[test]
fn a_refused_batch_is_dropped_and_counted_not_resent_forever() {
    if !requirement(have("editcap"), "editcap (wireshark-common)") {
        return;
    }
    let dir = tempdir();
    let old = dir.path().join("1995.pcap");
    let status = std::process::Command::new("editcap")
        .args(["-t", "-1000000000"])
        .arg(fixture("redis-multi.pcap"))
        .arg(&old)
        .status()
        .expect("editcap");
    assert!(status.success());
    let agg = Aggregator::start(dir.path(), free_port(), &[], &[]);
    let started = std::time::Instant::now();
    let out = command_in(&[], &tcpkit_bin())
        .arg("-r")
        .arg(&old)
        .args([
            "-p",
            "26379",
            "-m",
            "redis",
            "-t",
            "0",
            "--summary",
            "none",
            "-o",
            "/dev/null",
        ])
        .args(["--aggregator", &agg.url(), "--ship-timeout", "10"])
        .output()
        .expect("tcpkit");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(8), "{stderr}");
    assert!(stderr.contains("refused batch 1 (200 events"), "{stderr}");
    assert!(
        stderr.contains("0 batches (0 events) unacknowledged, 200 events"),
        "{stderr}"
    );
    let log = std::fs::read_to_string(dir.path().join("aggregator.log")).expect("log");
    assert_eq!(log.matches("bad batch").count(), 1, "{log}");
}
