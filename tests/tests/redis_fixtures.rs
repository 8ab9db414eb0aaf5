//! Redis mode on the golden captures: every request the server executed is paired exactly
//! once (its own INFO commandstats, taken by the generator, is the reference), per command;
//! the slow log has one line per exchange at or above `-t`.

use tcpkit_tests::{run_on_fixture, Expected, REDIS_FIXTURES};

/// tcpkit in redis mode on a fixture, with more arguments.
fn redis(name: &str, args: &[&str]) -> String {
    let mut all = vec!["-m", "redis"];
    all.extend_from_slice(args);
    run_on_fixture(name, &all)
}

fn redis_json(name: &str, threshold_ms: &str) -> (Expected, serde_json::Value) {
    let e = Expected::of(name);
    let port = e.port.to_string();
    let out = redis(name, &["-t", threshold_ms, "--summary", "json"]);
    let json: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    let stats = json[0][&port].clone();
    (e, stats)
}

#[test]
fn every_executed_command_is_paired_exactly_once() {
    for name in REDIS_FIXTURES {
        let (e, stats) = redis_json(name, "100000");
        assert_eq!(stats["total_reqs"], e.exchanges(), "{name}");
        assert_eq!(stats["timeouts"], 0, "{name}");
        assert_eq!(stats["dropped"], 0, "{name}");
        assert_eq!(stats["slow_reqs"], 0, "{name}");
        let buckets: u64 = stats["latencies"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_u64().unwrap())
            .sum();
        assert_eq!(buckets, e.exchanges(), "{name}: buckets sum to the total");
        if e.extra("noreply").unwrap_or(0) == 0 {
            for (command, calls) in &e.commands {
                assert_eq!(
                    stats["commands"][command]["total_reqs"], *calls,
                    "{name} {command}"
                );
            }
        }
        let p50 = stats["p50_us"].as_u64().unwrap();
        let p99 = stats["p99_us"].as_u64().unwrap();
        assert!(
            p50 <= p99 && p99 <= stats["max_us"].as_u64().unwrap(),
            "{name}"
        );
    }
}

#[test]
fn no_reply_requests_and_unsolicited_messages_are_counted() {
    for name in ["redis-client-reply", "redis-pubsub"] {
        let e = Expected::of(name);
        let out = redis(name, &["-t", "100000"]);
        let want = format!(
            "matching: 0 desyncs (0 bytes skipped), {} no-reply requests, {} unsolicited, 0 unmatched replies",
            e.extra("noreply").unwrap(),
            e.extra("unsolicited").unwrap()
        );
        assert!(out.contains(&want), "{name}: {out}");
    }
}

#[test]
fn slow_log_has_one_line_per_slow_exchange() {
    let name = "redis-slow";
    let e = Expected::of(name);
    let out = redis(name, &["-t", "20", "--summary", "none"]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len() as u64, e.extra("slow_20ms").unwrap(), "{out}");
    for line in lines {
        // 2026-11-24 22:24:42.651764 127.0.0.1:60046 => 127.0.0.1:26379 | 22.186 ms | DEBUG SLEEP 0.022
        let parts: Vec<&str> = line.split(" | ").collect();
        assert_eq!(parts.len(), 3, "{line}");
        let ms: f64 = parts[1].strip_suffix(" ms").unwrap().parse().unwrap();
        let slept: f64 = parts[2]
            .strip_prefix("DEBUG SLEEP ")
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            ms >= 20.0 && ms >= slept * 1000.0 && ms < slept * 1000.0 + 5.0,
            "{line}"
        );
        assert!(
            parts[0].contains(".") && parts[0].contains(" => 127.0.0.1:26379"),
            "{line}"
        );
    }
    // Without -t every exchange is printed.
    let all = redis(name, &["--summary", "none"]);
    assert_eq!(all.lines().count() as u64, e.exchanges());
}

#[test]
fn pipelined_requests_pair_exactly() {
    let (e, stats) = redis_json("redis-pipelined-sll", "100000");
    assert_eq!(stats["commands"]["SET"]["total_reqs"], e.commands["SET"]);
    assert_eq!(stats["commands"]["GET"]["total_reqs"], e.commands["GET"]);
}

/// Pipelines of 8 requests, a 20 ms DEBUG SLEEP at the head: every GET waits for it (its
/// latency is over 20 ms) but takes the server almost nothing. Sent in one write, the requests
/// of a pipeline share one capture time, so each one's own time is its latency less the one
/// before it, and a pipeline's own times sum to its last latency — checked per exchange, from
/// the Lua script's view, and in the stats JSON.
#[test]
fn own_time_and_depth_inside_pipelines_are_exact() {
    let name = "redis-pipeline";
    let e = Expected::of(name);
    let depth = e.extra("depth").unwrap() as usize;
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("each.lua");
    std::fs::write(
        &script,
        "function on_exchange(e) tcpkit.log(e.depth .. ' ' .. e.own_us .. ' ' .. e.latency_us .. ' ' .. e.command) end",
    )
    .unwrap();
    let out = redis(
        name,
        &[
            "-S",
            script.to_str().unwrap(),
            "-t",
            "100000",
            "--summary",
            "none",
        ],
    );
    let rows: Vec<(usize, u64, u64, String)> = out
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
                f[3].to_string(),
            )
        })
        .collect();
    assert_eq!(rows.len() as u64, e.exchanges(), "{out}");
    let mut own_sum = 0;
    for pipeline in rows.chunks(depth) {
        for (i, (d, own, latency, command)) in pipeline.iter().enumerate() {
            assert_eq!(*d, i + 1, "{pipeline:?}");
            assert!(*latency >= 20_000, "{pipeline:?}");
            if i == 0 {
                assert_eq!(command, "DEBUG");
                assert_eq!(own, latency, "nothing before the head: {pipeline:?}");
            } else {
                assert_eq!(*own, latency - pipeline[i - 1].2, "{pipeline:?}");
                assert!(
                    *own < 5_000,
                    "a GET behind the sleep is queued: {pipeline:?}"
                );
            }
        }
        own_sum += pipeline.last().unwrap().2;
    }
    let (_, stats) = redis_json(name, "20");
    assert_eq!(stats["own_costs"], own_sum);
    assert_eq!(
        stats["commands"]["DEBUG"]["own_costs"],
        stats["commands"]["DEBUG"]["total_costs"]
    );
    assert_eq!(stats["depths"], e.json["depths"]);
    assert_eq!(stats["depth_max"], depth);
    assert_eq!(
        stats["pipelined_reqs"],
        e.exchanges() - e.extra("pipelines").unwrap()
    );
    assert_eq!(stats["slow_reqs"], e.extra("slow_20ms").unwrap());
    assert!(stats["commands"]["GET"]["own_p99_us"].as_u64().unwrap() < 5_000);
    let text = redis(name, &["-t", "20", "--summary", "text"]);
    assert!(
        text.contains("  pipelined: 70 requests, depth p50 4, p99 8, max 8; own time p50 "),
        "{text}"
    );
}

/// redis-benchmark -P 16 writes 16 requests and reads their 16 replies: each depth from 1 to
/// 16 once per pipeline (3200 requests: 200 each), and its two CONFIG GETs at the start, sent
/// together, at depths 1 and 2.
#[test]
fn redis_benchmark_pipelines_have_every_depth_to_16() {
    let (e, stats) = redis_json("redis-pipelined-sll", "100000");
    let per_depth = (e.commands["SET"] + e.commands["GET"]) / 16;
    for d in 1..=16u64 {
        let config = u64::from(d <= 2);
        assert_eq!(
            stats["depths"][d.to_string()],
            per_depth + config,
            "depth {d}: {}",
            stats["depths"]
        );
    }
    assert_eq!(stats["depth_max"], 16);
    assert_eq!(
        stats["commands"]["CONFIG"]["depths"],
        serde_json::json!({"1": 1, "2": 1})
    );
    let own = stats["own_costs"].as_u64().unwrap();
    assert!(
        own > 0 && own < stats["total_costs"].as_u64().unwrap(),
        "{stats}"
    );
}

/// A 3-node Redis Cluster (tests/fixtures/redis_cluster.py): a client that asks every key
/// of the first node draws -MOVED for the keys the others own, and a slot in migration draws
/// -ASK. Redirects are counted per port and per slot, never as errors; every keyed request
/// is counted under the slot the servers' own CLUSTER KEYSLOT names.
#[test]
fn cluster_redirects_and_slots_are_counted_exactly() {
    let name = "redis-cluster";
    let e = Expected::of(name);
    let cluster = |args: &[&str]| {
        let pcap = tcpkit_tests::fixture(&format!("{name}.pcap"));
        let mut all = vec![
            "-r",
            pcap.to_str().unwrap(),
            "-p",
            "27001,27002,27003",
            "-m",
            "redis",
            "--slots",
        ];
        all.extend_from_slice(args);
        tcpkit_tests::run_tcpkit(&all)
    };
    let out = cluster(&["-t", "100000", "--summary", "json"]);
    let json: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    let expected = e.json["ports"].as_object().unwrap();
    assert_eq!(json.as_array().unwrap().len(), expected.len());
    for (i, (port, want)) in expected.iter().enumerate() {
        let got = &json[i][port];
        for key in ["moved", "ask"] {
            assert_eq!(got[key], want[key], "{port} {key}");
        }
        assert_eq!(got["total_reqs"], want["exchanges"], "{port}");
        assert_eq!(got["errors"], 0, "{port}: redirects are no errors");
        let slots = want["slots"].as_object().unwrap();
        assert_eq!(got["slots_seen"], slots.len(), "{port}");
        let shown = got["slots"].as_object().unwrap();
        assert!(shown.len() >= slots.len().min(32), "{port}: {shown:?}");
        for (slot, figures) in shown {
            assert_eq!(figures["reqs"], slots[slot], "{port} slot {slot}");
        }
    }
    // The moved requests are those of the first node's keys that live elsewhere: SET.
    assert_eq!(
        json[0]["27001"]["commands"]["SET"]["moved"],
        expected["27001"]["moved"]
    );
    // The slot asked 5 times on its owner, and 5 times (after ASKING) on the importing node.
    let asked = &json[2]["27003"]["slots"];
    let (slot, figures) = asked
        .as_object()
        .unwrap()
        .iter()
        .find(|(_, f)| f["ask"] != 0)
        .unwrap();
    assert_eq!(figures["ask"], 5);
    assert_eq!(json[0]["27001"]["slots"][slot]["reqs"], 5);
    let text = cluster(&["-t", "100000"]);
    assert!(
        text.contains("  redirects: 42 moved, 0 ask (Redis Cluster; not errors)"),
        "{text}"
    );
    // Without --slots the redirects are counted all the same, and no key is hashed.
    let pcap = tcpkit_tests::fixture(&format!("{name}.pcap"));
    let plain = tcpkit_tests::run_tcpkit(&[
        "-r",
        pcap.to_str().unwrap(),
        "-p",
        "27001,27002,27003",
        "-m",
        "redis",
        "--summary",
        "json",
    ]);
    let plain: serde_json::Value = serde_json::from_str(plain.lines().last().unwrap()).unwrap();
    assert_eq!(plain[0]["27001"]["moved"], expected["27001"]["moved"]);
    assert!(plain[0]["27001"].get("slots").is_none(), "{plain}");
}

/// Keys of known shapes (tests/fixtures/redis_scenarios.py keys): each folds into the template
/// the scenario names, with the keys its requests named (MGET of three: 3 a request); a
/// user's rule names its own template; past the cap the rest count under {other}; and
/// with --no-templates there are none.
#[test]
fn keys_fold_into_their_templates_exactly() {
    let name = "redis-keys";
    let e = Expected::of(name);
    let templates = |args: &[&str]| {
        let mut all = vec!["-t", "100000", "--summary", "json"];
        all.extend_from_slice(args);
        let out = redis(name, &all);
        let json: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
        json[0]["26379"]["templates"].clone()
    };
    let got = templates(&[]);
    let want = e.json["templates"].as_object().unwrap();
    assert_eq!(got.as_object().unwrap().len(), want.len(), "{got}");
    for (template, w) in want {
        let g = &got[template];
        assert_eq!(g["total_reqs"], w["reqs"], "{template}");
        assert_eq!(g["keys"], w["keys"], "{template}");
        assert_eq!(g["multi_key_reqs"], w["multi"], "{template}");
        assert!(g["req_bytes"].as_u64().unwrap() > 0 && g["p99_us"].as_u64().unwrap() > 0);
    }
    let ruled = templates(&["--key-templates", "session:*,obj:*"]);
    assert_eq!(
        ruled["session:*"]["total_reqs"],
        want["session:{id}"]["reqs"]
    );
    assert_eq!(ruled["obj:*"]["total_reqs"], want["obj:{id}"]["reqs"]);
    assert!(ruled.get("session:{id}").is_none(), "{ruled}");
    // A cap of 2: the two seen most keep their figures, the rest are {other}, none lost.
    let capped = templates(&["--max-key-templates", "2"]);
    let capped = capped.as_object().unwrap();
    assert_eq!(capped.len(), 3, "{capped:?}");
    let total: u64 = capped
        .values()
        .map(|t| t["total_reqs"].as_u64().unwrap())
        .sum();
    let keyed: u64 = want.values().map(|t| t["reqs"].as_u64().unwrap()).sum();
    assert_eq!(total, keyed);
    assert!(capped.contains_key("{other}") && capped.contains_key("user:{id}:cart"));
    assert!(
        templates(&["--no-templates"]).is_null(),
        "--no-templates: none"
    );
}

#[test]
fn text_summary_in_the_c_tools_words() {
    let out = redis("redis-slow", &["-t", "20", "--summary", "text"]);
    assert!(out.contains("port 26379: 10 requests, avg "), "{out}");
    assert!(out.contains("threshold 20.000 ms, 5 slow"), "{out}");
    assert!(
        out.contains("  20ms~50ms: 3\n") && out.contains("  100ms~200ms: 1\n"),
        "{out}"
    );
    assert!(out.contains("  p50 "), "{out}");
}

/// The metrics page's latency buckets (10 µs doubling) hold exactly the exchanges the slow
/// log prints with those latencies: the oracle is every line of `-t 0`.
#[test]
fn prometheus_buckets_count_the_slow_log_exactly() {
    use tcpkit::histogram::{prom_bucket, PROM_BOUNDS_US};
    use tcpkit::matcher::duplex::Duplex;
    use tcpkit::matcher::RedisPairing;

    let name = "redis-benchmark-lo";
    let e = Expected::of(name);
    let mut expected = [0u64; PROM_BOUNDS_US.len() + 1];
    for line in redis(name, &["-t", "0", "--summary", "none"]).lines() {
        let ms = line.split(" | ").nth(1).and_then(|f| f.strip_suffix(" ms"));
        let Some(ms) = ms else { continue };
        let (whole, frac) = ms.split_once('.').expect("ms.µµµ");
        let us = whole.parse::<u64>().unwrap() * 1000 + frac.parse::<u64>().unwrap();
        expected[prom_bucket(us)] += 1;
    }
    let page = tcpkit_tests::metrics_page::<Duplex<RedisPairing>>(name, tcpkit::modes::Mode::Redis);
    let mut cumulative = 0;
    for (i, bound) in PROM_BOUNDS_US.iter().enumerate() {
        cumulative += expected[i];
        let le = format!("le=\"{}\"", *bound as f64 / 1e6);
        let on_page =
            tcpkit_tests::metric_sum(&page, "tcpkit_request_duration_seconds_bucket", &[&le]);
        assert_eq!(on_page as u64, cumulative, "{le}");
    }
    let all = tcpkit_tests::metric_sum(
        &page,
        "tcpkit_request_duration_seconds_bucket",
        &["le=\"+Inf\""],
    );
    assert_eq!(all as u64, e.exchanges());
    assert!(
        page.contains("le=\"0.00001\"") && page.contains("le=\"20.97152\""),
        "{page}"
    );
    assert!(
        page.contains("\ntcpkit_build_info{program=\"tcpkit\",version=\""),
        "{page}"
    );
    assert!(page.contains("\nprocess_resident_memory_bytes "), "{page}");
}
