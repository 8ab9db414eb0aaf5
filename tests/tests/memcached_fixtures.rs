//! Memcached mode on the golden captures of every text and meta command form: the pairs,
//! no-reply (and quiet) requests, hits, misses and errors the client itself counted.

use tcpkit_tests::{run_on_fixture, Expected};

#[test]
fn every_text_command_pairs_with_hits_and_misses() {
    let name = "memcached-text";
    let e = Expected::of(name);
    let out = run_on_fixture(
        name,
        &["-m", "memcached", "-t", "100000", "--summary", "json"],
    );
    let json: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    let stats = &json[0][e.port.to_string()];
    for (key, field) in [
        ("total_reqs", "exchanges"),
        ("hits", "hits"),
        ("misses", "misses"),
        ("errors", "errors"),
    ] {
        assert_eq!(stats[key], e.extra(field).unwrap(), "{key}: {stats}");
    }
    assert_eq!(stats["timeouts"], 0);
    assert_eq!(stats["dropped"], 0);
    assert_eq!(stats["commands"]["get"]["total_reqs"], 104);
    assert_eq!(stats["commands"]["get"]["hits"], 104 - 1 + 2);
    let text = run_on_fixture(name, &["-m", "memcached", "-t", "100000"]);
    let noreply = format!("{} no-reply requests", e.extra("noreply").unwrap());
    assert!(text.contains(&noreply), "{text}");
    // The hits and misses in the text summary and on the metrics page too.
    let (hits, misses) = (e.extra("hits").unwrap(), e.extra("misses").unwrap());
    assert!(
        text.contains(&format!("\n  {hits} hits, {misses} misses\n")),
        "{text}"
    );
    let page = tcpkit_tests::metrics_page::<
        tcpkit::matcher::duplex::Duplex<tcpkit::matcher::MemcachedPairing>,
    >(name, tcpkit::modes::Mode::Memcached);
    let lookups = |result: &str| {
        tcpkit_tests::metric_sum(
            &page,
            "tcpkit_cache_lookups_total",
            &[&format!("result=\"{result}\"")],
        ) as u64
    };
    assert_eq!((lookups("hit"), lookups("miss")), (hits, misses), "{page}");
}

#[test]
fn slow_log_summaries_are_command_and_keys() {
    let out = run_on_fixture("memcached-text", &["-m", "memcached", "--summary", "none"]);
    let summaries: Vec<&str> = out.lines().filter_map(|l| l.rsplit(" | ").next()).collect();
    assert_eq!(
        summaries.len() as u64,
        Expected::of("memcached-text").extra("exchanges").unwrap()
    );
    for want in [
        "get a b c x y",
        "gat 100 a b",
        "incr n 10",
        "set big",
        "bogus",
        "stats",
    ] {
        assert!(summaries.contains(&want), "{want} in {summaries:?}");
    }
}

#[test]
fn meta_commands_and_quiet_mode_pair_exactly() {
    for name in ["memcached-meta", "memcached-binary"] {
        quiet_scenario_pairs_exactly(name);
    }
}

/// A scenario with quiet requests: pairs, hits, misses, errors and no-reply requests exact.
fn quiet_scenario_pairs_exactly(name: &str) {
    let e = Expected::of(name);
    let out = run_on_fixture(
        name,
        &["-m", "memcached", "-t", "100000", "--summary", "json"],
    );
    let json: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    let stats = &json[0][e.port.to_string()];
    for (key, field) in [
        ("total_reqs", "exchanges"),
        ("hits", "hits"),
        ("misses", "misses"),
    ] {
        assert_eq!(stats[key], e.extra(field).unwrap(), "{key}: {stats}");
    }
    assert_eq!(stats["timeouts"], 0, "{stats}");
    let text = run_on_fixture(name, &["-m", "memcached", "-t", "100000"]);
    let quiet = format!("{} no-reply requests", e.extra("noreply").unwrap());
    assert!(text.contains(&quiet), "{text}");
}

#[test]
fn one_agent_watches_redis_and_memcached_ports() {
    if !tcpkit_tests::requirement(
        tcpkit_tests::have("mergecap"),
        "mergecap (wireshark-common)",
    ) {
        return;
    }
    let dir = std::env::temp_dir().join(format!("tcpkit-mixed-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mixed = tcpkit_tests::merged_fixtures(&dir, &["redis-multi", "memcached-text"]);
    let (redis, memcached) = (Expected::of("redis-multi"), Expected::of("memcached-text"));
    let ports = format!("{}:redis,{}:memcached", redis.port, memcached.port);
    let out = tcpkit_tests::run_tcpkit(&[
        "-r",
        mixed.to_str().unwrap(),
        "-p",
        &ports,
        "-t",
        "100000",
        "--summary",
        "json",
    ]);
    let json: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    let (r, m) = (
        &json[0][redis.port.to_string()],
        &json[1][memcached.port.to_string()],
    );
    assert_eq!(r["total_reqs"], redis.exchanges(), "{json}");
    assert_eq!(
        m["total_reqs"],
        memcached.extra("exchanges").unwrap(),
        "{json}"
    );
    assert_eq!(m["hits"], memcached.extra("hits").unwrap(), "{json}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Key templates over memcached's text protocol: every keyed request once under its first
/// key's template (the commands without keys under none), `get a b c` naming 3 keys.
#[test]
fn memcached_keys_fold_into_templates() {
    let name = "memcached-text";
    let out = run_on_fixture(
        name,
        &["-m", "memcached", "-t", "100000", "--summary", "json"],
    );
    let json: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    let port = &json[0][Expected::of(name).port.to_string()];
    let count = |v: &serde_json::Value| v["total_reqs"].as_u64().unwrap();
    let keyless = ["stats", "flush_all", "version", "verbosity", "UNKNOWN"];
    let keyed: u64 = port["commands"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(c, _)| !keyless.contains(&c.as_str()))
        .map(|(_, v)| count(v))
        .sum();
    let templates = port["templates"].as_object().unwrap();
    assert_eq!(
        templates.values().map(count).sum::<u64>(),
        keyed,
        "{templates:?}"
    );
    let keys: u64 = templates
        .values()
        .map(|t| t["keys"].as_u64().unwrap())
        .sum();
    assert!(
        keys > keyed,
        "multi-key gets name more keys than requests: {keys}"
    );
    assert!(
        templates
            .keys()
            .all(|t| !t.chars().any(|c| c.is_ascii_digit())),
        "{templates:?}"
    );
}

/// Key templates over memcached's binary protocol: each keyed request under its key's
/// template (a quiet get too; VERSION, NOOP and the unknown opcode under none).
#[test]
fn memcached_binary_keys_fold_into_templates() {
    let name = "memcached-binary";
    let out = run_on_fixture(
        name,
        &["-m", "memcached", "-t", "100000", "--summary", "json"],
    );
    let json: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    let templates = json[0][Expected::of(name).port.to_string()]["templates"]
        .as_object()
        .unwrap();
    let figures: Vec<(&str, u64, u64)> = templates
        .iter()
        .map(|(t, v)| {
            let n = |k: &str| v[k].as_u64().unwrap();
            (t.as_str(), n("total_reqs"), n("keys"))
        })
        .collect();
    // SET, GET, GETK, DELETE twice of bk1; SET and GETQ of bk2; the GET that missed.
    assert_eq!(figures, [("bk{id}", 7, 7), ("nope", 1, 1)], "{templates:?}");
}
