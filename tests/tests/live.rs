//! Live capture on `lo` of a real redis-server: known traffic, the stats port while running,
//! SIGINT, the summary, and the `-w` copy read back by tcpdump.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use tcpkit_tests::{
    free_port, have, interrupt, is_root, requirement, start_live_agent, start_redis, tcpkit_bin,
    wait_for_port, Guard,
};

const REQUESTS: usize = 100;

/// Sends `REQUESTS` SETs on one connection, each answered before the next; returns the
/// request bytes sent.
fn drive(port: u16) -> u64 {
    let mut sent = 0;
    let mut conn = TcpStream::connect(("127.0.0.1", port)).unwrap();
    conn.set_nodelay(true).unwrap();
    let mut reply = [0u8; 5];
    for i in 0..REQUESTS {
        let key = format!("key:{i:03}");
        let cmd = format!(
            "*3\r\n$3\r\nSET\r\n${}\r\n{key}\r\n$5\r\nvalue\r\n",
            key.len()
        );
        conn.write_all(cmd.as_bytes()).unwrap();
        sent += cmd.len() as u64;
        conn.read_exact(&mut reply).unwrap();
        assert_eq!(&reply, b"+OK\r\n");
    }
    sent
}

/// Stops a live agent with SIGINT: its stdout, once it has exited with status 0.
fn stop_agent(agent: &mut Guard) -> String {
    interrupt(&agent.0);
    let mut stdout = String::new();
    agent
        .0
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    let status = agent.0.wait().unwrap();
    assert!(status.success(), "tcpkit exit: {status}");
    stdout
}

fn stats_document(port: u16) -> serde_json::Value {
    let mut text = String::new();
    TcpStream::connect(("127.0.0.1", port))
        .unwrap()
        .read_to_string(&mut text)
        .unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn live_raw_capture_of_redis_on_lo() {
    if !requirement(is_root(), "root (live capture)")
        || !requirement(have("redis-server"), "redis-server")
        || !requirement(have("tcpdump"), "tcpdump")
    {
        return;
    }
    let (_redis, redis_port) = start_redis();
    let dir = std::env::temp_dir().join(format!("tcpkit-live-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let dump = dir.join("copy.pcap");
    // The stats port opens once the capture is running.
    let (mut agent, stats_port) = start_live_agent(|c| {
        c.args(["-i", "lo", "-m", "raw", "-p", &redis_port.to_string()])
            .args(["-w", dump.to_str().unwrap()])
    });
    let before = stats_document(stats_port);
    assert_eq!(before[0][redis_port.to_string()]["req_bytes"], 0);

    let sent = drive(redis_port);
    std::thread::sleep(Duration::from_millis(1500)); // one publication tick
    let during = stats_document(stats_port);
    let port_stats = &during[0][redis_port.to_string()];
    assert_eq!(port_stats["req_bytes"], sent);
    assert_eq!(port_stats["rsp_bytes"], 5 * REQUESTS as u64);

    let stdout = stop_agent(&mut agent);

    let requests = stdout.lines().filter(|l| l.contains(" REQ ")).count();
    let replies = stdout
        .lines()
        .filter(|l| l.contains(" RSP ") && l.ends_with("+OK\\r\\n"))
        .count();
    assert_eq!((requests, replies), (REQUESTS, REQUESTS), "{stdout}");
    assert!(
        stdout.contains("SET\\r\\n$7\\r\\nkey:042\\r\\n"),
        "payload escaped as in the C tool"
    );
    assert!(
        stdout.contains("\n0 packets dropped by kernel\n"),
        "{stdout}"
    );
    assert!(stdout.contains(" 0 gaps (desyncs)"), "{stdout}");

    let captured: u64 = stdout
        .lines()
        .find_map(|l| l.strip_suffix(" packets captured"))
        .and_then(|n| n.parse().ok())
        .expect("summary line");
    // Each packet crosses lo twice (out, then in): the kernel filter keeps one copy.
    assert!(
        stdout.contains(&format!("\n{captured} packets received by filter\n")),
        "{stdout}"
    );
    let read_back = Command::new("tcpdump")
        .args(["-n", "-r", dump.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        read_back.status.success(),
        "{}",
        String::from_utf8_lossy(&read_back.stderr)
    );
    let lines = String::from_utf8_lossy(&read_back.stdout).lines().count() as u64;
    assert_eq!(lines, captured, "tcpdump reads back every captured packet");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn daemonized_agent_stops_cleanly_on_sigterm() {
    if !requirement(is_root(), "root (live capture)") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("tcpkit-daemon-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (log, pid_file) = (dir.join("agent.log"), dir.join("agent.pid"));
    let stats_port = free_port();
    let status = Command::new(tcpkit_bin())
        .args([
            "-d",
            "-i",
            "lo",
            "-p",
            &free_port().to_string(),
            "-P",
            &stats_port.to_string(),
        ])
        .args([
            "-o",
            log.to_str().unwrap(),
            "--pid-file",
            pid_file.to_str().unwrap(),
        ])
        .status()
        .unwrap();
    assert!(status.success(), "the parent returns at once");
    assert!(
        wait_for_port(stats_port, Duration::from_secs(10)),
        "the daemon serves stats"
    );
    // The stats port listens from before the fork; the pid file comes just after it.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let pid: i32 = loop {
        match std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|t| t.trim().parse().ok())
        {
            Some(pid) => break pid,
            None if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            None => panic!("no pid file"),
        }
    };
    // SAFETY: signalling the daemon this test started, by the pid it wrote.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while unsafe { libc::kill(pid, 0) } == 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_ne!(unsafe { libc::kill(pid, 0) }, 0, "the daemon exited");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("packets captured"),
        "summary in the log: {text}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Calls of each command since the last `CONFIG RESETSTAT`, from the server itself.
fn server_calls(port: u16) -> std::collections::BTreeMap<String, u64> {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string(), "info", "commandstats"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("cmdstat_"))
        .filter_map(|l| {
            let (name, rest) = l.split_once(':')?;
            let calls: u64 = rest
                .strip_prefix("calls=")?
                .split(',')
                .next()?
                .parse()
                .ok()?;
            Some((name.split('|').next()?.to_uppercase(), calls))
        })
        .fold(
            Default::default(),
            |mut m: std::collections::BTreeMap<String, u64>, (k, v)| {
                *m.entry(k).or_default() += v;
                m
            },
        )
}

#[test]
fn live_redis_mode_counts_every_command_sent() {
    if !requirement(is_root(), "root (live capture)")
        || !requirement(have("redis-server"), "redis-server")
        || !requirement(have("redis-benchmark"), "redis-benchmark")
    {
        return;
    }
    // lo gives Ethernet frames, any gives Linux cooked v2.
    for interface in ["lo", "any"] {
        redis_benchmark_counted_on(interface);
    }
}

fn redis_benchmark_counted_on(interface: &str) {
    let (_redis, port) = start_redis();
    let (mut agent, _) = start_live_agent(|c| {
        c.args([
            "-i",
            interface,
            "-m",
            "redis",
            "-t",
            "100000",
            "-p",
            &port.to_string(),
        ])
        .args(["--summary", "json"])
    });
    let reset = Command::new("redis-cli")
        .args(["-p", &port.to_string(), "config", "resetstat"])
        .output()
        .unwrap();
    assert!(reset.status.success());
    for pipeline in ["1", "16"] {
        let bench = Command::new("redis-benchmark")
            .args([
                "-p",
                &port.to_string(),
                "-n",
                "20000",
                "-c",
                "10",
                "-t",
                "set,get",
                "-q",
            ])
            .args(["-P", pipeline])
            .output()
            .unwrap();
        assert!(bench.status.success());
    }
    let mut calls = server_calls(port);
    // Our own CONFIG RESETSTAT is counted by the server after it ran, and INFO is not.
    *calls.get_mut("CONFIG").unwrap() -= 1;
    calls.retain(|_, c| *c > 0);
    std::thread::sleep(Duration::from_millis(1500));
    let stdout = stop_agent(&mut agent);
    let json: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let stats = &json[0][port.to_string()];
    // The resetstat call itself was captured: one CONFIG more than the server now reports.
    let config_seen = stats["commands"]["CONFIG"]["total_reqs"]
        .as_u64()
        .unwrap_or(0);
    for (command, n) in &calls {
        let seen = stats["commands"][command]["total_reqs"]
            .as_u64()
            .unwrap_or(0);
        let seen = if command == "CONFIG" { seen - 1 } else { seen };
        assert_eq!(seen, *n, "{command}: {stats}");
    }
    assert_eq!(calls["SET"], 40_000);
    assert!(config_seen >= 1);
    assert_eq!(stats["timeouts"], 0, "{stats}");
    assert_eq!(stats["dropped"], 0, "{stats}");
}

#[test]
fn live_redis_mode_over_ipv6_prints_bracketed_addresses() {
    if !requirement(is_root(), "root (live capture)")
        || !requirement(have("redis-server"), "redis-server")
    {
        return;
    }
    let (_redis, port) = start_redis();
    if !requirement(
        TcpStream::connect(("::1", port)).is_ok(),
        "IPv6 on loopback",
    ) {
        return;
    }
    let (mut agent, _) = start_live_agent(|c| {
        c.args(["-i", "lo", "-m", "redis", "-p", &port.to_string()])
            .args(["--summary", "json"])
    });
    let mut conn = TcpStream::connect(("::1", port)).unwrap();
    let mut reply = [0u8; 7];
    for _ in 0..10 {
        conn.write_all(b"*1\r\n$4\r\nPING\r\n").unwrap();
        conn.read_exact(&mut reply).unwrap();
        assert_eq!(&reply, b"+PONG\r\n");
    }
    std::thread::sleep(Duration::from_millis(1500));
    let stdout = stop_agent(&mut agent);
    let lines: Vec<&str> = stdout.lines().filter(|l| l.ends_with("| PING")).collect();
    assert_eq!(lines.len(), 10, "{stdout}");
    assert!(
        lines[0].contains(&format!(" => [::1]:{port} | ")),
        "{}",
        lines[0]
    );
    let json: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(
        json[0][port.to_string()]["commands"]["PING"]["total_reqs"],
        10
    );
}

#[test]
fn live_memcached_mode_counts_hits_and_misses() {
    if !requirement(is_root(), "root (live capture)")
        || !requirement(have("memcached"), "memcached")
    {
        return;
    }
    let port = free_port();
    let server = Command::new("memcached")
        .args([
            "-u",
            "nobody",
            "-l",
            "127.0.0.1",
            "-U",
            "0",
            "-p",
            &port.to_string(),
        ])
        .spawn()
        .unwrap();
    let _server = Guard(server);
    assert!(
        wait_for_port(port, Duration::from_secs(10)),
        "memcached did not start"
    );
    let (mut agent, _) = start_live_agent(|c| {
        c.args([
            "-i",
            "lo",
            "-m",
            "memcached",
            "-t",
            "100000",
            "-p",
            &port.to_string(),
        ])
        .args(["--summary", "json"])
    });
    let mut conn = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut reader = std::io::BufReader::new(conn.try_clone().unwrap());
    let mut line = String::new();
    let mut read_until = |end: &str| loop {
        line.clear();
        std::io::BufRead::read_line(&mut reader, &mut line).unwrap();
        if line.starts_with(end) {
            break;
        }
    };
    for i in 0..50 {
        conn.write_all(format!("set k{i} 0 0 1\r\nx\r\n").as_bytes())
            .unwrap();
        read_until("STORED");
    }
    for i in 0..100 {
        // k0..k49 hit, k50..k99 miss
        conn.write_all(format!("get k{i}\r\n").as_bytes()).unwrap();
        read_until("END");
    }
    // Commands memcached does not know: one label for all of them.
    for i in 0..300 {
        conn.write_all(format!("junk{i} x\r\n").as_bytes()).unwrap();
        read_until("ERROR");
    }
    std::thread::sleep(Duration::from_millis(1500));
    let stdout = stop_agent(&mut agent);
    let json: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let stats = &json[0][port.to_string()];
    assert_eq!(stats["total_reqs"], 450, "{stats}");
    assert_eq!(
        (stats["hits"].as_u64(), stats["misses"].as_u64()),
        (Some(50), Some(50)),
        "{stats}"
    );
    assert_eq!(stats["commands"]["set"]["total_reqs"], 50);
    assert_eq!(stats["commands"]["UNKNOWN"]["total_reqs"], 300, "{stats}");
    assert_eq!(stats["commands"]["UNKNOWN"]["errors"], 300, "{stats}");
    assert_eq!(stats["commands"].as_object().unwrap().len(), 3, "{stats}");
}

/// Commands Redis does not know (`-ERR unknown command`) share one label, so junk cannot
/// fill the per-port cap and push real commands to OTHER.
#[test]
fn live_redis_junk_commands_share_one_label() {
    if !requirement(is_root(), "root (live capture)")
        || !requirement(have("redis-server"), "redis-server")
    {
        return;
    }
    let (_redis, port) = start_redis();
    let (mut agent, _) = start_live_agent(|c| {
        c.args([
            "-i",
            "lo",
            "-m",
            "redis",
            "-t",
            "100000",
            "-p",
            &port.to_string(),
        ])
        .args(["--summary", "json"])
    });
    let mut conn = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut reader = std::io::BufReader::new(conn.try_clone().unwrap());
    let mut line = String::new();
    for i in 0..300 {
        conn.write_all(format!("JUNK{i} a b\r\n").as_bytes())
            .unwrap();
        line.clear();
        std::io::BufRead::read_line(&mut reader, &mut line).unwrap();
        assert!(line.starts_with("-ERR unknown command"), "{line}");
    }
    let sent = drive(port);
    assert!(sent > 0);
    std::thread::sleep(Duration::from_millis(1500));
    let stdout = stop_agent(&mut agent);
    let json: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let commands = &json[0][port.to_string()]["commands"];
    assert_eq!(commands["UNKNOWN"]["total_reqs"], 300, "{commands}");
    assert_eq!(commands["SET"]["total_reqs"], REQUESTS as u64, "{commands}");
    assert_eq!(commands.as_object().unwrap().len(), 2, "{commands}");
}

/// A DNS query for `name` (type A) with the given id.
fn dns_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

#[test]
fn live_dns_mode_over_udp_with_timeouts() {
    if !requirement(is_root(), "root (live capture)") || !requirement(have("dnsmasq"), "dnsmasq") {
        return;
    }
    let port = free_port();
    let server = Command::new("dnsmasq")
        .args([
            "--keep-in-foreground",
            "--port",
            &port.to_string(),
            "--listen-address",
            "127.0.0.1",
        ])
        .args([
            "--bind-interfaces",
            "--no-resolv",
            "--no-hosts",
            "--local=/test/",
        ])
        .args([
            "--address=/example.test/10.1.2.3",
            "--user=root",
            "--pid-file=",
            "--log-facility=/dev/null",
        ])
        .spawn()
        .unwrap();
    let _server = Guard(server);
    // Wait until dnsmasq answers, before the capture starts.
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut buf = [0u8; 512];
    let up = (0..50).any(|_| {
        socket
            .send_to(&dns_query(9999, "probe.example.test"), ("127.0.0.1", port))
            .is_ok()
            && socket.recv_from(&mut buf).is_ok()
    });
    assert!(up, "dnsmasq did not answer");
    let (mut agent, _) = start_live_agent(|c| {
        c.args([
            "-i",
            "lo",
            "-m",
            "dns",
            "-u",
            "-t",
            "100000",
            "-p",
            &port.to_string(),
        ])
        .args(["--dns-timeout", "300", "--summary", "json"])
    });
    socket
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut answered = 0;
    for id in 0..40u16 {
        socket
            .send_to(&dns_query(id, "www.example.test"), ("127.0.0.1", port))
            .unwrap();
        if socket.recv_from(&mut buf).is_ok() {
            answered += 1;
        }
    }
    for id in 100..102u16 {
        socket
            .send_to(&dns_query(id, "www.example.test"), ("127.0.0.2", port))
            .unwrap();
    }
    std::thread::sleep(Duration::from_millis(1500));
    let stdout = stop_agent(&mut agent);
    let json: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let stats = &json[0][port.to_string()];
    assert!(answered == 40, "dnsmasq answered {answered} of 40");
    assert_eq!(stats["total_reqs"], answered, "{stats}");
    // Unanswered: the two sent where nothing listens, and any the server missed.
    assert_eq!(stats["timeouts"], 2 + 40 - answered, "{stats}");
    assert_eq!(stats["rcodes"]["NOERROR"], answered, "{stats}");
}

/// A field of `/proc/PID/status`, e.g. `Uid:`.
fn proc_status(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .unwrap_or_default()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn live_redis_as_nobody_with_metrics_and_a_config_file() {
    if !requirement(is_root(), "root (live capture, --user)")
        || !requirement(have("redis-server"), "redis-server")
    {
        return;
    }
    let (_redis, redis_port) = start_redis();
    let (stats_port, metrics_port) = (free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "mode = \"redis\"\nthreshold = 1000\nmetrics-listen = \"127.0.0.1:{metrics_port}\"\nuser = \"nobody\"\nstats-port = 1\n"
        ),
    )
    .unwrap();
    let agent = Command::new(tcpkit_bin())
        .args(["--config", config.to_str().unwrap()])
        .args(["-i", "lo", "-p", &redis_port.to_string()])
        .args(["-P", &stats_port.to_string()]) // overrides the file's stats-port
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut agent = Guard(agent);
    assert!(
        wait_for_port(metrics_port, Duration::from_secs(10))
            && wait_for_port(stats_port, Duration::from_secs(10)),
        "tcpkit did not start"
    );
    // Root is gone: every id is nobody's, no capability is left.
    let nobody = Command::new("id").args(["-u", "nobody"]).output().unwrap();
    let nobody = String::from_utf8_lossy(&nobody.stdout).trim().to_owned();
    let pid = agent.0.id();
    assert_eq!(proc_status(pid, "Uid:"), [nobody.as_str(); 4].join(" "));
    assert_eq!(proc_status(pid, "CapEff:"), "0000000000000000");
    assert_eq!(proc_status(pid, "NoNewPrivs:"), "1");

    // Garbage on the stats port and the metrics port changes nothing.
    for port in [stats_port, metrics_port] {
        let mut junk = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let _ = junk.write_all(&[0xff, 0x00, 0x13, 0x37, b'\n', b'\n', 0xfe]);
        let mut ignored = Vec::new();
        let _ = junk.read_to_end(&mut ignored);
    }

    drive(redis_port);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let page = loop {
        let page = tcpkit_tests::http_get(metrics_port, "/metrics");
        let count = tcpkit_tests::metric_sum(
            &page,
            "tcpkit_request_duration_seconds_count",
            &["command=\"SET\""],
        );
        if count as usize == REQUESTS || std::time::Instant::now() > deadline {
            break page;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let port_label = format!("port=\"{redis_port}\"");
    let sum = |name: &str| tcpkit_tests::metric_sum(&page, name, &[&port_label, "command=\"SET\""]);
    assert_eq!(
        sum("tcpkit_request_duration_seconds_count") as usize,
        REQUESTS,
        "{page}"
    );
    // Cumulative buckets: the +Inf one alone holds every request.
    assert!(sum("tcpkit_request_duration_seconds_bucket") as usize > REQUESTS);
    assert_eq!(sum("tcpkit_request_errors_total"), 0.0);
    assert_eq!(
        tcpkit_tests::metric_sum(&page, "tcpkit_kernel_dropped_packets_total", &[]),
        0.0
    );
    assert!(page.contains("proto=\"redis\""), "{page}");
    let stats = stats_document(stats_port);
    assert_eq!(
        stats[0][redis_port.to_string()]["total_reqs"],
        REQUESTS as u64
    );

    interrupt(&agent.0);
    let status = agent.0.wait().unwrap();
    assert!(status.success(), "tcpkit exit: {status}");
}

/// logrotate's way: the `-o` file is renamed, SIGHUP; the agent writes on into a new file of
/// the old name, and SIGHUP never stops it.
#[test]
fn sighup_reopens_the_log_file() {
    if !requirement(is_root(), "root (live capture)")
        || !requirement(have("redis-server"), "redis-server")
    {
        return;
    }
    let (_redis, redis_port) = start_redis();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("tcpkit.log");
    let rotated = dir.path().join("tcpkit.log.1");
    let (mut agent, _) = start_live_agent(|c| {
        c.args(["-i", "lo", "-m", "raw", "-p", &redis_port.to_string()])
            .args(["-o", log.to_str().unwrap()])
    });
    drive(redis_port);
    std::thread::sleep(Duration::from_millis(1500)); // a tick writes the lines out
    std::fs::rename(&log, &rotated).unwrap();
    // SAFETY: a signal to the child this test started.
    unsafe { libc::kill(agent.0.id() as i32, libc::SIGHUP) };
    std::thread::sleep(Duration::from_millis(1500));
    drive(redis_port);
    std::thread::sleep(Duration::from_millis(1500));
    interrupt(&agent.0);
    let status = agent.0.wait().unwrap();
    assert!(status.success(), "tcpkit exit after SIGHUP: {status}");
    let requests = |text: &str| text.lines().filter(|l| l.contains(" REQ ")).count();
    let old = std::fs::read_to_string(&rotated).unwrap();
    let new = std::fs::read_to_string(&log).expect("a new log file after SIGHUP");
    assert_eq!(requests(&old), REQUESTS, "{old}");
    assert_eq!(requests(&new), REQUESTS, "{new}");
    assert!(new.contains(" packets captured\n") && !old.contains(" packets captured\n"));
}

/// The summary JSON (the last line) of a log, and its other lines.
fn log_and_summary(path: &std::path::Path) -> (Vec<String>, serde_json::Value) {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let summary = serde_json::from_str(&lines.pop().expect("a summary")).unwrap();
    (lines, summary)
}

/// Two pipelines sharing the capture (`--threads 2`, PACKET_FANOUT) count what one pipeline
/// counts on the same traffic, and what the server executed; their slow-log lines are whole
/// (every request is one, -t 0), and `-w` holds every packet once.
#[test]
fn live_redis_on_two_pipelines_counts_what_one_does() {
    if !requirement(is_root(), "root (live capture)")
        || !requirement(have("redis-server"), "redis-server")
        || !requirement(have("redis-benchmark"), "redis-benchmark")
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_redis, port) = start_redis();
    let copy = dir.path().join("two.pcap");
    let agent = |threads: &str, log: &str, copy: Option<&std::path::Path>| {
        let port = port.to_string();
        let log = dir.path().join(log);
        start_live_agent(|c| {
            c.args(["-i", "lo", "-m", "redis", "-t", "0", "-p", &port])
                .args(["--threads", threads, "--summary", "json", "-o"])
                .arg(log);
            if let Some(copy) = copy {
                c.arg("-w").arg(copy);
            }
            c
        })
    };
    let (mut one, _) = agent("1", "one.log", None);
    let (mut two, two_stats) = agent("2", "two.log", Some(&copy));
    // The merged document is served from the start.
    assert_eq!(
        stats_document(two_stats)[0][port.to_string()]["total_reqs"],
        0
    );
    let reset = Command::new("redis-cli")
        .args(["-p", &port.to_string(), "config", "resetstat"])
        .output()
        .unwrap();
    assert!(reset.status.success());
    for pipeline in ["1", "16"] {
        let bench = Command::new("redis-benchmark")
            .args(["-p", &port.to_string(), "-n", "20000", "-c", "20"])
            .args(["-r", "100000", "-t", "set,get", "-q", "-P", pipeline])
            .output()
            .unwrap();
        assert!(bench.status.success());
    }
    let calls = server_calls(port);
    std::thread::sleep(Duration::from_millis(1500));
    // While running, the stats port serves the merge of both pipelines.
    let running = stats_document(two_stats);
    for command in ["SET", "GET"] {
        let seen = &running[0][port.to_string()]["commands"][command]["total_reqs"];
        assert_eq!(
            seen.as_u64(),
            Some(calls[command]),
            "{command} while running"
        );
    }
    for agent in [&mut one, &mut two] {
        interrupt(&agent.0);
        assert!(agent.0.wait().unwrap().success());
    }
    let (one_lines, one_summary) = log_and_summary(&dir.path().join("one.log"));
    let (two_lines, two_summary) = log_and_summary(&dir.path().join("two.log"));
    let (one_port, two_port) = (
        &one_summary[0][port.to_string()],
        &two_summary[0][port.to_string()],
    );
    assert_eq!(two_port["commands"]["SET"]["total_reqs"], 40_000);
    for command in ["SET", "GET"] {
        assert_eq!(
            two_port["commands"][command]["total_reqs"].as_u64(),
            Some(calls[command]),
            "{command}: the server's count"
        );
    }
    // Every count; the latencies within 1%: each capture's socket stamps a packet itself,
    // so two agents' timestamps differ by a microsecond here and there.
    let counts = |port: &serde_json::Value| {
        let pick = |v: &serde_json::Value, keys: &[&str]| -> Vec<serde_json::Value> {
            keys.iter().map(|k| v[*k].clone()).collect()
        };
        let each = [
            "total_reqs",
            "req_bytes",
            "rsp_bytes",
            "depths",
            "errors",
            "timeouts",
        ];
        let commands = port["commands"].as_object().unwrap();
        let mut all: Vec<_> = commands.values().map(|c| pick(c, &each)).collect();
        all.push(pick(
            port,
            &["req_packets", "rsp_packets", "pipelined_reqs"],
        ));
        all
    };
    assert_eq!(counts(one_port), counts(two_port), "one pipeline and two");
    let (one_cost, two_cost) = (
        one_port["total_costs"].as_f64().unwrap(),
        two_port["total_costs"].as_f64().unwrap(),
    );
    assert!(
        (one_cost - two_cost).abs() <= one_cost / 100.0,
        "{one_cost} {two_cost}"
    );
    assert_eq!(two_port["timeouts"], 0);
    assert_eq!(two_port["untimed"]["reply_lost"], 0);
    // Whole lines: each one of the slow-log's shape, and the same lines as one pipeline's.
    let server = format!("127.0.0.1:{port}");
    for line in &two_lines {
        let fields: Vec<&str> = line.splitn(6, ' ').collect();
        let whole = fields.len() == 6
            && fields[0].len() == 10
            && fields[1].len() == 15
            && fields[2].starts_with("127.0.0.1:")
            && fields[3] == "=>"
            && fields[4] == server
            && fields[5].starts_with("| ")
            && fields[5]
                .split_once(" ms | ")
                .is_some_and(|(latency, command)| {
                    latency[2..].parse::<f64>().is_ok()
                        && command.starts_with(|c: char| c.is_ascii_alphabetic())
                });
        assert!(whole, "not a whole line: {line:?}");
    }
    let sorted = |mut lines: Vec<String>| {
        lines.sort();
        lines
    };
    assert_eq!(
        two_lines.len() as u64,
        two_port["total_reqs"].as_u64().unwrap()
    );
    // The same requests as one pipeline's lines, but for their timestamps and latencies.
    let requests = |lines: &[String]| {
        sorted(
            lines
                .iter()
                .map(|l| {
                    let fields: Vec<&str> = l.splitn(6, ' ').collect();
                    let command = fields[5].split_once(" ms | ").unwrap().1;
                    format!("{} {command}", fields[2])
                })
                .collect(),
        )
    };
    assert!(
        requests(&one_lines) == requests(&two_lines),
        "the same requests"
    );
    let two_lines = sorted(two_lines);
    // The -w copy: every packet once, so read back it gives the same lines and counts.
    let reread = Command::new(tcpkit_tests::tcpkit_bin())
        .arg("-r")
        .arg(&copy)
        .args(["-m", "redis", "-t", "0", "-p", &port.to_string()])
        .args(["--threads", "1", "--summary", "json"])
        .output()
        .unwrap();
    assert!(reread.status.success());
    let text = String::from_utf8(reread.stdout).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let summary: serde_json::Value = serde_json::from_str(&lines.pop().unwrap()).unwrap();
    let file_port = &summary[0][port.to_string()];
    for key in [
        "req_packets",
        "rsp_packets",
        "req_bytes",
        "rsp_bytes",
        "total_reqs",
    ] {
        assert_eq!(file_port[key], two_port[key], "{key} in the -w copy");
    }
    // With the very timestamps: the same lines exactly.
    assert!(sorted(lines) == two_lines, "the -w copy's lines");
}
