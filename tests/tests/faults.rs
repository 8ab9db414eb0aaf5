//! Faults and bad input, end to end with the real binaries: the aggregator away for a minute
//! while an agent keeps capturing, an agent killed and restarted, the spool across restarts,
//! a full disk under SQLite, 100k concurrent unanswered connections, corrupt captures.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use etherparse::PacketBuilder;
use pcap::{Capture, Linktype, Packet, PacketHeader};
use serde_json::Value;
use tcpkit_tests::*;

/// The aggregator's view of one agent (`tcpkit-query agents`).
fn agent_row(url: &str, id: &str) -> Option<Value> {
    let agents = query_json(&[], url, &["agents"]);
    agents.as_array()?.iter().find(|a| a["id"] == id).cloned()
}

/// Exchanges the aggregator's histograms hold for one agent.
fn stored_exchanges(url: &str, id: &str) -> u64 {
    let hist = query_json(&[], url, &["hist", "--agent", id]);
    hist["count"].as_u64().unwrap_or(0)
}

/// Sends `n` SETs on one connection, each answered before the next.
fn drive_sets(port: u16, n: usize, pause: Duration) {
    let mut conn = TcpStream::connect(("127.0.0.1", port)).unwrap();
    conn.set_nodelay(true).unwrap();
    let mut reply = [0u8; 5];
    for i in 0..n {
        let key = format!("k{i:06}");
        let cmd = format!("*3\r\n$3\r\nSET\r\n${}\r\n{key}\r\n$1\r\nv\r\n", key.len());
        conn.write_all(cmd.as_bytes()).unwrap();
        conn.read_exact(&mut reply).unwrap();
        assert_eq!(&reply, b"+OK\r\n");
        if !pause.is_zero() {
            std::thread::sleep(pause);
        }
    }
}

/// A live agent on `lo` watching `redis_port` in redis mode, every exchange an event, its
/// log (slow lines, then the JSON summary) in `log`: a pipe nobody reads would stall it.
fn live_agent(log: &Path, redis_port: u16, url: &str, id: &str, extra: &[&str]) -> Guard {
    let (agent, _) = start_live_agent(|c| {
        c.args([
            "-i",
            "lo",
            "-p",
            &redis_port.to_string(),
            "-m",
            "redis",
            "-t",
            "0",
        ])
        .args(["--summary", "json", "-o"])
        .arg(log)
        .args([
            "--aggregator",
            url,
            "--agent-id",
            id,
            "--ship-interval",
            "1",
        ])
        .args(extra)
    });
    agent
}

/// Stops an agent with SIGINT and checks its exit status (0, or 3 when something it
/// should have shipped was not acknowledged); its stats JSON (last line of its log) and
/// stderr.
fn stop_agent(mut agent: Guard, log: &Path, status: i32) -> (Value, String) {
    interrupt(&agent.0);
    let child = std::mem::replace(&mut agent.0, Command::new("true").spawn().unwrap());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(status), "tcpkit: {stderr}");
    let log = std::fs::read_to_string(log).expect("the agent's log");
    let json = serde_json::from_str(log.lines().last().expect("summary")).expect("JSON summary");
    (json, stderr)
}

/// A number from the shipper's exit line, before `what` (e.g. "events and").
fn reported(stderr: &str, pattern: &str) -> u64 {
    let line = stderr
        .lines()
        .find(|l| l.contains("tcpkit: shipped"))
        .unwrap_or_else(|| panic!("no report: {stderr}"));
    let at = line
        .find(pattern)
        .unwrap_or_else(|| panic!("{pattern} not in {line}"));
    line[..at]
        .split_whitespace()
        .last()
        .and_then(|n| n.trim_start_matches('(').parse().ok())
        .unwrap_or_else(|| panic!("{line}"))
}

fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    done()
}

#[test]
fn aggregator_away_for_a_minute_while_the_agent_captures() {
    if !requirement(is_root(), "root (live capture)")
        || !requirement(have("redis-server"), "redis-server")
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_redis, redis_port) = start_redis();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    // A buffer that holds the histograms and some of the events of a minute, not all of them.
    let log = dir.path().join("agent.log");
    let agent = live_agent(
        &log,
        redis_port,
        &url,
        "patient",
        &["--ship-buffer", "300000", "--ship-timeout", "60"],
    );
    let started = Instant::now();
    let mut sent = 0;
    while started.elapsed() < Duration::from_secs(60) {
        drive_sets(redis_port, 100, Duration::from_millis(2));
        sent += 100;
    }
    let aggregator = Aggregator::start(dir.path(), port, &[], &[]);
    drive_sets(redis_port, 100, Duration::ZERO);
    sent += 100;
    // Everything after the return arrives; then the agent stops and reports.
    assert!(wait_until(Duration::from_secs(30), || agent_row(
        &url, "patient"
    )
    .is_some()));
    std::thread::sleep(Duration::from_secs(3));
    // Events were dropped to stay within the buffer: not everything was delivered.
    let (summary, stderr) = stop_agent(agent, &log, 3);
    let counted = summary[0][redis_port.to_string()]["total_reqs"]
        .as_u64()
        .unwrap();
    assert_eq!(counted, sent as u64, "the agent counted every SET");
    let dropped_events = reported(&stderr, "events and");
    let dropped_histograms = reported(&stderr, "histograms dropped");
    let unacked = stderr.contains(" 0 batches (0 events) unacknowledged");
    assert!(unacked, "{stderr}");
    assert!(
        dropped_events > 0,
        "the buffer was meant to overflow: {stderr}"
    );
    assert_eq!(
        dropped_histograms, 0,
        "events go before histograms: {stderr}"
    );
    // Exactly once: stored events plus dropped events are the exchanges; every histogram came.
    let row = agent_row(&url, "patient").unwrap();
    let stored_events = row["events"].as_u64().unwrap();
    assert_eq!(
        stored_events + dropped_events,
        sent as u64,
        "{row} {stderr}"
    );
    assert_eq!(
        row["shipper_dropped_events"].as_u64(),
        Some(dropped_events),
        "{row}"
    );
    assert_eq!(stored_exchanges(&url, "patient"), sent as u64);
    eprintln!(
        "aggregator away 60 s: {sent} exchanges, {stored_events} events stored, {dropped_events} dropped (buffer 300000 bytes), histograms complete"
    );
    drop(aggregator);
}

#[test]
fn agent_killed_and_restarted_is_a_new_session_without_duplicates() {
    if !requirement(is_root(), "root (live capture)")
        || !requirement(have("redis-server"), "redis-server")
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_redis, redis_port) = start_redis();
    let aggregator = Aggregator::start(dir.path(), free_port(), &[], &[]);
    let url = aggregator.url();
    let (first_log, second_log) = (dir.path().join("first.log"), dir.path().join("second.log"));
    let first = live_agent(&first_log, redis_port, &url, "phoenix", &[]);
    drive_sets(redis_port, 300, Duration::ZERO);
    assert!(wait_until(Duration::from_secs(20), || {
        agent_row(&url, "phoenix").is_some_and(|r| r["events"] == 300)
    }));
    let mut first = first;
    first.0.kill().unwrap(); // SIGKILL: no goodbye
    first.0.wait().unwrap();
    let second = live_agent(&second_log, redis_port, &url, "phoenix", &[]);
    drive_sets(redis_port, 200, Duration::ZERO);
    let (summary, stderr) = stop_agent(second, &second_log, 0);
    assert_eq!(
        summary[0][redis_port.to_string()]["total_reqs"],
        200,
        "{summary}"
    );
    assert!(
        stderr.contains(" 0 batches (0 events) unacknowledged"),
        "{stderr}"
    );
    let row = agent_row(&url, "phoenix").unwrap();
    assert_eq!(row["sessions"], 2, "{row}");
    assert_eq!(row["events"], 500, "{row}\n{stderr}");
    let slow = query_json(
        &[],
        &url,
        &["slow", "--agent", "phoenix", "--limit", "10000"],
    );
    let lines: Vec<String> = slow
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.to_string())
        .collect();
    let unique: std::collections::BTreeSet<&String> = lines.iter().collect();
    assert_eq!(
        (lines.len(), unique.len()),
        (500, 500),
        "no event stored twice"
    );
}

#[test]
fn the_spool_carries_batches_across_an_agent_restart() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let replay = |fixture_name: &str, id: &str, timeout: &str| -> Output {
        let expected = Expected::of(fixture_name);
        Command::new(tcpkit_bin())
            .arg("-r")
            .arg(fixture(&format!("{fixture_name}.pcap")))
            .args([
                "-p",
                &expected.port.to_string(),
                "-m",
                "redis",
                "-t",
                "0",
                "--summary",
                "none",
            ])
            .args([
                "--aggregator",
                &url,
                "--agent-id",
                id,
                "--ship-timeout",
                timeout,
            ])
            .arg("--spool-dir")
            .arg(&spool)
            .stdout(Stdio::null())
            .output()
            .expect("run tcpkit")
    };
    // No aggregator: the first run ends with everything unacknowledged, on disk.
    let first = replay("redis-slow", "first", "1");
    let stderr = String::from_utf8_lossy(&first.stderr).into_owned();
    assert_eq!(first.status.code(), Some(3), "unacknowledged: {stderr}");
    assert!(stderr.contains("shipped 0 batches"), "{stderr}");
    let expected_events = Expected::of("redis-slow").exchanges();
    assert!(
        stderr.contains(&format!("({expected_events} events) unacknowledged")),
        "{stderr}"
    );
    assert!(
        std::fs::read_dir(&spool).unwrap().count() > 1,
        "batches spooled"
    );

    let aggregator = Aggregator::start(dir.path(), port, &[], &[]);
    let second = replay("redis-benchmark-lo", "second", "30");
    let stderr = String::from_utf8_lossy(&second.stderr).into_owned();
    assert!(second.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "({expected_events} events) of earlier runs recovered from the spool"
        )),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_dir(&spool).unwrap().count(),
        0,
        "the spool is empty again"
    );
    let first_row = agent_row(&aggregator.url(), "first").expect("the first run's session arrived");
    assert_eq!(first_row["events"], expected_events, "{first_row}");
    assert_eq!(stored_exchanges(&url, "first"), expected_events);
    assert_eq!(
        stored_exchanges(&url, "second"),
        Expected::of("redis-benchmark-lo").exchanges()
    );
    // A third run finds nothing to recover: nothing is sent twice.
    let third = replay("redis-slow", "third", "30");
    assert!(!String::from_utf8_lossy(&third.stderr).contains("recovered"));
    assert_eq!(agent_row(&url, "first").unwrap()["events"], expected_events);
}

#[test]
fn a_full_disk_stops_acknowledgements_until_space_returns() {
    if !requirement(is_root(), "root (mount a small tmpfs)") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mount = dir.path().join("small");
    std::fs::create_dir(&mount).unwrap();
    sh(&format!(
        "mount -t tmpfs -o size=24m tcpkit-test {}",
        mount.display()
    ));
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mount.clone());
    let port = free_port();
    let aggregator = Aggregator::start(&mount, port, &[], &[]);
    let url = aggregator.url();
    // Fill the file system but for a few pages.
    let filler = mount.join("filler");
    {
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 64 << 10];
        while f.write_all(&block).is_ok() {}
        let _ = f.sync_all();
    }
    let fixture_name = "redis-benchmark-lo";
    let expected = Expected::of(fixture_name).exchanges();
    let agent = Command::new(tcpkit_bin())
        .arg("-r")
        .arg(fixture(&format!("{fixture_name}.pcap")))
        .args(["-p", "26379", "-m", "redis", "-t", "0", "--summary", "none"])
        .args([
            "--aggregator",
            &url,
            "--agent-id",
            "full",
            "--ship-timeout",
            "60",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let agent = Guard(agent);
    let log = mount.join("aggregator.log");
    let said_why = wait_until(Duration::from_secs(30), || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("cannot store"))
    });
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        said_why,
        "the aggregator never said it could not store: {log_text}"
    );
    assert!(log_text.contains("full"), "the reason is named: {log_text}");
    let before = agent_row(&url, "full").map_or(0, |r| r["events"].as_u64().unwrap_or(0));
    assert!(
        before < expected,
        "everything fit: the test did not fill the disk"
    );
    std::fs::remove_file(&filler).unwrap();
    let mut agent = agent;
    let child = std::mem::replace(&mut agent.0, Command::new("true").spawn().unwrap());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(" 0 batches (0 events) unacknowledged"),
        "{stderr}"
    );
    let row = agent_row(&url, "full").unwrap();
    assert_eq!(
        row["events"], expected,
        "nothing acknowledged was lost, nothing stored twice"
    );
    assert_eq!(stored_exchanges(&url, "full"), expected);
    eprintln!("disk full: {before} of {expected} events stored before space returned, all after");
}

/// A capture of `n` connections to 10.9.0.1:6379, each handshaken and sending one PING that
/// is never answered, all open at once.
fn unanswered_connections(path: &Path, n: u32) {
    let dead = Capture::dead(Linktype::ETHERNET).unwrap();
    let mut out = dead.savefile(path).unwrap();
    let mut packet_no = 0u64;
    let mut write = |frame: &[u8]| {
        let header = PacketHeader {
            ts: libc::timeval {
                tv_sec: 1_700_000_000 + (packet_no / 100_000) as i64,
                tv_usec: (packet_no % 100_000) as i64 * 10,
            },
            caplen: frame.len() as u32,
            len: frame.len() as u32,
        };
        out.write(&Packet::new(&header, frame));
        packet_no += 1;
    };
    let server = [10, 9, 0, 1];
    let ether = |ip: Vec<u8>| {
        let mut f = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00];
        f.extend_from_slice(&ip);
        f
    };
    for i in 0..n {
        let client = [10, 10 + (i >> 16) as u8, (i >> 8) as u8, i as u8];
        let sport = 10_000 + (i % 50_000) as u16;
        let mut ip = Vec::new();
        PacketBuilder::ipv4(client, server, 64)
            .tcp(sport, 6379, 1000, 65535)
            .syn()
            .write(&mut ip, &[])
            .unwrap();
        write(&ether(ip));
        let mut ip = Vec::new();
        PacketBuilder::ipv4(server, client, 64)
            .tcp(6379, sport, 5000, 65535)
            .syn()
            .ack(1001)
            .write(&mut ip, &[])
            .unwrap();
        write(&ether(ip));
        let ping = b"*1\r\n$4\r\nPING\r\n";
        let mut ip = Vec::new();
        PacketBuilder::ipv4(client, server, 64)
            .tcp(sport, 6379, 1001, 65535)
            .ack(5001)
            .psh()
            .write(&mut ip, ping)
            .unwrap();
        write(&ether(ip));
    }
    out.flush().unwrap();
}

#[test]
fn a_hundred_thousand_unanswered_connections_stay_within_the_caps() {
    let dir = tempfile::tempdir().unwrap();
    let pcap = dir.path().join("100k.pcap");
    const CONNECTIONS: u32 = 100_000;
    unanswered_connections(&pcap, CONNECTIONS);
    let out = Command::new(tcpkit_bin())
        .arg("-r")
        .arg(&pcap)
        .args([
            "-p",
            "6379",
            "-m",
            "redis",
            "-t",
            "1000",
            "--summary",
            "text",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let number_before = |suffix: &str| -> u64 {
        let at = stdout
            .find(suffix)
            .unwrap_or_else(|| panic!("{suffix} not in {stdout}"));
        stdout[..at]
            .split_whitespace()
            .last()
            .unwrap()
            .parse()
            .unwrap()
    };
    // The table holds 65,536 connections (--max-flows): the oldest others were evicted, and
    // every request was counted as a timeout, none lost.
    assert_eq!(
        number_before(" created"),
        u64::from(CONNECTIONS),
        "{stdout}"
    );
    // When full, the table evicts its oldest sixteenth (4,096) at once.
    let evicted = number_before(" cap-evicted");
    assert!(
        evicted >= u64::from(CONNECTIONS) - 65_536 && evicted % 4096 == 0,
        "{stdout}"
    );
    assert_eq!(
        number_before(" timeouts"),
        u64::from(CONNECTIONS),
        "{stdout}"
    );
    let rss_mib: f64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("memory: peak RSS "))
        .and_then(|l| l.strip_suffix(" MiB"))
        .and_then(|n| n.parse().ok())
        .expect("peak RSS line");
    assert!(rss_mib < 256.0, "peak RSS {rss_mib} MiB");
    eprintln!("100k unanswered connections: peak RSS {rss_mib} MiB");
}

#[test]
fn corrupt_and_truncated_captures_end_with_a_reason_never_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(fixture("redis-pipelined-sll.pcap")).unwrap();
    let mut cases: Vec<(String, Vec<u8>)> = Vec::new();
    for cut in [
        0,
        1,
        23,
        24,
        25,
        39,
        40,
        41,
        100,
        bytes.len() / 2,
        bytes.len() - 1,
    ] {
        cases.push((format!("cut at {cut}"), bytes[..cut].to_vec()));
    }
    // Record headers with absurd lengths, timestamps, and a flipped byte every 97.
    let mut absurd = bytes.clone();
    absurd[32..36].copy_from_slice(&u32::MAX.to_le_bytes()); // first record's caplen
    cases.push(("huge caplen".into(), absurd));
    let mut small = bytes.clone();
    small[36..40].copy_from_slice(&0u32.to_le_bytes()); // first record's original length
    cases.push(("zero length".into(), small));
    let mut flipped = bytes.clone();
    for i in (24..flipped.len()).step_by(97) {
        flipped[i] ^= 0x5a;
    }
    cases.push(("flipped bytes".into(), flipped));
    for (name, data) in cases {
        let path = dir.path().join("case.pcap");
        std::fs::write(&path, &data).unwrap();
        let out = Command::new(tcpkit_bin())
            .arg("-r")
            .arg(&path)
            .args(["-p", "26379", "-m", "redis", "-t", "0"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        match out.status.code() {
            Some(0) => {}
            Some(1) => assert!(stderr.starts_with("tcpkit: "), "{name}: {stderr}"),
            other => panic!("{name}: exit {other:?} (a signal?): {stderr}"),
        }
    }
}

/// A spooled batch the aggregator refuses (a capture from 1995) is dropped from the spool,
/// not re-sent by every later run.
#[test]
fn a_refused_spooled_batch_leaves_the_spool() {
    if !requirement(have("editcap"), "editcap (wireshark-common)") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let old = dir.path().join("1995.pcap");
    let edited = Command::new("editcap")
        .args(["-t", "-1000000000"])
        .arg(fixture("redis-multi.pcap"))
        .arg(&old)
        .status()
        .unwrap();
    assert!(edited.success());
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let replay = |pcap: &Path, timeout: &str| -> Output {
        Command::new(tcpkit_bin())
            .arg("-r")
            .arg(pcap)
            .args(["-p", "26379", "-m", "redis", "-t", "0", "--summary", "none"])
            .args(["--aggregator", &url, "--ship-timeout", timeout])
            .arg("--spool-dir")
            .arg(&spool)
            .stdout(Stdio::null())
            .output()
            .expect("run tcpkit")
    };
    // No aggregator: the old capture's batches wait in the spool.
    let first = replay(&old, "1");
    assert_eq!(first.status.code(), Some(3));
    assert!(
        std::fs::read_dir(&spool).unwrap().count() > 1,
        "batches spooled"
    );
    let _aggregator = Aggregator::start(dir.path(), port, &[], &[]);
    let second = replay(&fixture("redis-slow.pcap"), "20");
    let stderr = String::from_utf8_lossy(&second.stderr).into_owned();
    assert!(second.status.success(), "{stderr}");
    assert!(stderr.contains("batch 1 refused"), "{stderr}");
    assert_eq!(
        std::fs::read_dir(&spool).unwrap().count(),
        0,
        "the spool is empty again: {stderr}"
    );
}
