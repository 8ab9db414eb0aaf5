//! DNS mode on captures of real queries to dnsmasq over UDP and TCP: exchanges per response
//! code and unanswered queries exactly as the client saw them; timeouts in the slow log.

use tcpkit_tests::{run_on_fixture, Expected};

#[test]
fn queries_pair_by_id_and_unanswered_ones_time_out() {
    let name = "dns-udp";
    let e = Expected::of(name);
    let out = run_on_fixture(
        name,
        &["-m", "dns", "-u", "-t", "100000", "--summary", "json"],
    );
    let json: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    let stats = &json[0][e.port.to_string()];
    assert_eq!(
        stats["total_reqs"],
        e.extra("exchanges").unwrap(),
        "{stats}"
    );
    assert_eq!(stats["timeouts"], e.extra("timeouts").unwrap(), "{stats}");
    assert_eq!(
        stats["rcodes"]["NOERROR"],
        e.extra("noerror").unwrap(),
        "{stats}"
    );
    assert_eq!(
        stats["rcodes"]["NXDOMAIN"],
        e.extra("nxdomain").unwrap(),
        "{stats}"
    );
    assert_eq!(
        stats["commands"]["A"]["timeouts"],
        e.extra("timeouts").unwrap(),
        "{stats}"
    );
    // The response codes in the text summary and on the metrics page too.
    let (noerror, nxdomain) = (e.extra("noerror").unwrap(), e.extra("nxdomain").unwrap());
    let text = run_on_fixture(name, &["-m", "dns", "-u", "-t", "100000"]);
    let said = format!("\n  responses: {noerror} NOERROR, {nxdomain} NXDOMAIN\n");
    assert!(text.contains(&said), "{text}");
    let page = tcpkit_tests::metrics_page::<()>(name, tcpkit::modes::Mode::Dns);
    let responses = |rcode: &str| {
        tcpkit_tests::metric_sum(
            &page,
            "tcpkit_dns_responses_total",
            &[&format!("rcode=\"{rcode}\"")],
        ) as u64
    };
    assert_eq!(
        (responses("NOERROR"), responses("NXDOMAIN")),
        (noerror, nxdomain),
        "{page}"
    );
}

#[test]
fn slow_log_names_type_name_and_rcode_and_prints_timeouts() {
    let name = "dns-udp";
    let e = Expected::of(name);
    let out = run_on_fixture(name, &["-m", "dns", "-u", "--summary", "none"]);
    let lines: Vec<&str> = out.lines().collect();
    let timeouts = lines
        .iter()
        .filter(|l| l.contains(" | timeout | A www.example.test."))
        .count();
    assert_eq!(timeouts as u64, e.extra("timeouts").unwrap(), "{out}");
    assert!(
        lines
            .iter()
            .any(|l| l.ends_with(" ms | A nope.test. NXDOMAIN")),
        "{out}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.ends_with(" ms | A www.example.test. NOERROR")),
        "{out}"
    );
    let answered = lines.iter().filter(|l| l.contains(" ms | ")).count() as u64;
    assert_eq!(answered, e.extra("exchanges").unwrap());
}

#[test]
fn dns_over_tcp_pairs_length_prefixed_messages_pipelined_or_not() {
    let name = "dns-tcp";
    let e = Expected::of(name);
    let out = run_on_fixture(name, &["-m", "dns", "-t", "100000", "--summary", "json"]);
    let json: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    let stats = &json[0][e.port.to_string()];
    assert_eq!(
        stats["total_reqs"],
        e.extra("exchanges").unwrap(),
        "{stats}"
    );
    assert_eq!(
        stats["rcodes"]["NOERROR"],
        e.extra("noerror").unwrap(),
        "{stats}"
    );
    assert_eq!(
        stats["rcodes"]["NXDOMAIN"],
        e.extra("nxdomain").unwrap(),
        "{stats}"
    );
    assert_eq!(stats["timeouts"], 0, "{stats}");
}

#[test]
fn redis_over_tcp_and_dns_over_udp_in_one_agent() {
    if !tcpkit_tests::requirement(
        tcpkit_tests::have("mergecap"),
        "mergecap (wireshark-common)",
    ) {
        return;
    }
    let dir = std::env::temp_dir().join(format!("tcpkit-tcp-udp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mixed = tcpkit_tests::merged_fixtures(&dir, &["redis-multi", "dns-udp"]);
    let (redis, dns) = (Expected::of("redis-multi"), Expected::of("dns-udp"));
    let ports = format!("{}:redis,{}:dns/udp", redis.port, dns.port);
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
    assert_eq!(
        json[0][redis.port.to_string()]["total_reqs"],
        redis.exchanges(),
        "{json}"
    );
    assert_eq!(
        json[1][dns.port.to_string()]["total_reqs"],
        dns.extra("exchanges").unwrap(),
        "{json}"
    );
    assert_eq!(
        json[1][dns.port.to_string()]["timeouts"],
        dns.extra("timeouts").unwrap(),
        "{json}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// DNS names as key templates: below a zone the user names, every name is one template
/// (`*.example.test.`); every answered query counts under exactly one template.
#[test]
fn names_below_a_zone_fold_into_one_template() {
    let name = "dns-udp";
    let e = tcpkit_tests::Expected::of(name);
    let port = e.port.to_string();
    let pcap = tcpkit_tests::fixture(&format!("{name}.pcap"));
    let run = |extra: &[&str]| {
        let mut args = vec!["-r", pcap.to_str().unwrap(), "-p", &port, "-u", "-m", "dns"];
        args.extend_from_slice(&["-t", "100000", "--summary", "json"]);
        args.extend_from_slice(extra);
        let out = tcpkit_tests::run_tcpkit(&args);
        let json: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
        json[0][&port].clone()
    };
    let stats = run(&["--dns-zones", "example.test"]);
    let templates = stats["templates"].as_object().expect("templates");
    let count = |v: &serde_json::Value| v["total_reqs"].as_u64().unwrap();
    assert_eq!(templates.values().map(count).sum::<u64>(), count(&stats));
    assert!(count(&templates["*.example.test."]) > 0, "{templates:?}");
    assert!(
        !templates
            .keys()
            .any(|t| t.ends_with(".example.test.") && t != "*.example.test."),
        "{templates:?}"
    );
    assert!(run(&["--no-templates"]).get("templates").is_none());
}
