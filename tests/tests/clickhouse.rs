//! The fleet on ClickHouse (real `clickhouse-server` processes of the tests' own): the same
//! agents give the same answers as on SQLite; a 2-shard cluster behind two aggregators
//! answers the same on either; agents move to the other aggregator when one is killed, and
//! wait out a ClickHouse that is down, with every event stored exactly once.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tcpkit_aggregator::merge::Merged;
use tcpkit_aggregator::store::{self, CheckedBatch, CheckedSnapshot, Group};
use tcpkit_proto::v1;
use tcpkit_tests::*;

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}

/// A temp dir and a ClickHouse server of its own in it; None when there is none (skipped,
/// saying why, unless CI=true).
fn clickhouse() -> Option<(tempfile::TempDir, ClickHouse)> {
    if !clickhouse_available() {
        return None;
    }
    let dir = tempdir();
    let ch = ClickHouse::start(dir.path());
    Some((dir, ch))
}

/// The ClickHouse store of database `db` on `ch`.
fn clickhouse_store(ch: &ClickHouse, db: &str) -> store::Spec {
    store::Spec::parse(&format!("clickhouse://{}/{db}", ch.host())).expect("spec")
}

/// A session of agent `id`, said hello to on `writer`.
fn session(writer: &mut dyn store::Writer, id: &str, session: u64) -> store::SessionKey {
    let hello = v1::Hello {
        agent_id: id.into(),
        session,
        ..Default::default()
    };
    writer.hello(&hello, 1).expect("hello").0
}

/// A number ClickHouse answers.
fn count(ch: &ClickHouse, sql: &str) -> u64 {
    ch.query(sql)
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or_else(|| panic!("{sql}"))
}

/// The fleet of the first test: plain, slow, cluster and key-template traffic.
fn feed(url: &str) {
    replay("redis-benchmark-lo", "a1", url, &["-p", "26379", "-t", "1"]);
    replay("redis-slow", "a2", url, &["-p", "26379", "-t", "20"]);
    replay(
        "redis-cluster",
        "a3",
        url,
        &["-p", "27001,27002,27003", "--slots", "-t", "5"],
    );
    replay("redis-keys", "a4", url, &["-p", "26379", "-t", "1"]);
}

/// Every query of `tcpkit-query --json`, by its arguments.
const QUERIES: &[&[&str]] = &[
    &["hist"],
    &["hist", "--by", "agent"],
    &["hist", "--by", "command"],
    &["hist", "--by", "server"],
    &["hist", "--by", "port"],
    &["hist", "--own", "--by", "command"],
    &["hist", "--agent", "a2", "--command", "debug"],
    &["hist", "--port", "27002"],
    &["slow", "--limit", "100000"],
    &["slow", "--limit", "7", "--slowest"],
    &["slow", "--min-ms", "20", "--grep", "SLEEP 0.*"],
    &["slow", "--grep", "[Gg]ET *", "--limit", "50"],
    &["top", "--by", "slow"],
    &["top", "--of", "server", "--by", "p99"],
    &["top", "--of", "agent", "--by", "requests"],
    &["top", "--of", "port", "--by", "total"],
    &["top", "--by", "own-p99"],
    &["top", "--of", "slot", "--by", "requests", "--limit", "50"],
    &["top", "--of", "slot", "--by", "redirects"],
    &["keys", "--limit", "1000"],
    &["keys", "--by", "bytes"],
    &["keys", "--by", "p99"],
    &["agents"],
    &["heatmap", "--from", "2026-01-01", "--to", "2027-01-01"],
    &[
        "heatmap",
        "--from",
        "2026-11-01",
        "--to",
        "2026-12-01",
        "--by",
        "command",
        "--step",
        "10m",
    ],
    &[
        "heatmap",
        "--from",
        "2026-01-01",
        "--to",
        "2027-01-01",
        "--by",
        "agent",
        "--step",
        "1d",
    ],
];

/// The answers to [`QUERIES`]; of the agents, what a store keeps (not when they were seen,
/// nor whether they are connected now, nor how much their shippers held when they sent
/// their last batch: these differ from run to run).
fn answers(url: &str) -> BTreeMap<String, Value> {
    QUERIES
        .iter()
        .map(|q| {
            let mut v = query_json(&[], url, q);
            if q[0] == "heatmap" {
                assert!(
                    v["series"].as_array().is_some_and(|s| !s.is_empty()),
                    "{q:?}: no series"
                );
            }
            if q[0] == "agents" {
                for a in v.as_array_mut().expect("agents") {
                    let a = a.as_object_mut().expect("agent");
                    for k in [
                        "first_seen_us",
                        "last_seen_us",
                        "connected",
                        "shipper_buffered",
                    ] {
                        assert!(a.remove(k).is_some(), "{k}");
                    }
                }
            }
            (q.join(" "), v)
        })
        .collect()
}

fn assert_same(a: &BTreeMap<String, Value>, b: &BTreeMap<String, Value>, what: &str) {
    for (q, v) in a {
        assert_eq!(Some(v), b.get(q), "tcpkit-query {q}: {what}");
    }
}

#[test]
fn sqlite_and_clickhouse_answer_the_same() {
    let Some((dir, ch)) = clickhouse() else {
        return;
    };
    let sqlite_dir = dir.path().join("sqlite");
    std::fs::create_dir_all(&sqlite_dir).expect("dir");
    let sqlite = Aggregator::start(&sqlite_dir, free_port(), &[], &[]);
    let store = format!("clickhouse://{}/tcpkit", ch.host());
    let clickhouse = Aggregator::start(dir.path(), free_port(), &[], &["--store", &store]);
    feed(&sqlite.url());
    feed(&clickhouse.url());
    let expected = answers(&sqlite.url());
    // The fixtures are all there (the SQLite side is checked against them in fleet.rs).
    assert_eq!(expected["agents"].as_array().map(Vec::len), Some(4));
    assert!(expected["top --of slot --by redirects"]
        .as_array()
        .is_some_and(|r| !r.is_empty()));
    assert!(expected["keys --limit 1000"]
        .as_array()
        .is_some_and(|r| !r.is_empty()));
    assert_same(
        &expected,
        &answers(&clickhouse.url()),
        "ClickHouse differs from SQLite",
    );
    // The same agents again (new sessions): their batches are new, and counted.
    feed(&clickhouse.url());
    let twice = query_json(&[], &clickhouse.url(), &["hist"]);
    assert_eq!(
        twice["count"].as_u64(),
        expected["hist"]["count"].as_u64().map(|c| c * 2)
    );
    // An aggregator started on the same store later (stateless) answers the same.
    let another_dir = dir.path().join("another");
    std::fs::create_dir_all(&another_dir).expect("dir");
    let another = Aggregator::start(&another_dir, free_port(), &[], &["--store", &store]);
    assert_eq!(query_json(&[], &another.url(), &["hist"]), twice);
}

/// A TCP load balancer: each connection goes to the first backend that accepts it, bytes
/// copied both ways until either side closes.
struct Balancer {
    port: u16,
    stop: Arc<AtomicBool>,
}

impl Balancer {
    fn start(backends: Vec<u16>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        std::thread::spawn(move || {
            while !stopping.load(Ordering::Relaxed) {
                let Ok((client, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                let _ = client.set_nonblocking(false);
                let Some(server) = backends
                    .iter()
                    .find_map(|p| TcpStream::connect(("127.0.0.1", *p)).ok())
                else {
                    continue; // none up: the client sees its connection close
                };
                for (mut from, mut to) in [
                    (
                        client.try_clone().expect("clone"),
                        server.try_clone().expect("clone"),
                    ),
                    (server, client),
                ] {
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 16384];
                        while let Ok(n) = from.read(&mut buf) {
                            if n == 0 || to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Both);
                        let _ = from.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Balancer { port, stop }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Two aggregators on one ClickHouse behind a load balancer; the one the agents stream to
/// is killed (SIGKILL) again and again, and they go on through the other: each event once.
#[test]
fn agents_move_to_another_aggregator_and_nothing_counts_twice() {
    let Some((dir, ch)) = clickhouse() else {
        return;
    };
    let store = format!("clickhouse://{}/tcpkit", ch.host());
    let ports = [free_port(), free_port()];
    let dirs: Vec<_> = ports
        .iter()
        .map(|p| {
            let d = dir.path().join(p.to_string());
            std::fs::create_dir_all(&d).expect("dir");
            d
        })
        .collect();
    let start = |i: usize| Aggregator::start(&dirs[i], ports[i], &[], &["--store", &store]);
    let mut aggregators = [Some(start(0)), Some(start(1))];
    let balancer = Balancer::start(ports.to_vec());
    let url = balancer.url();
    let agents: Vec<_> = [("redis-benchmark-lo", "k1"), ("redis-pipelined-sll", "k2")]
        .into_iter()
        .map(|(f, id)| {
            let url = url.clone();
            std::thread::spawn(move || replay(f, id, &url, &["-p", "26379", "-t", "0"]))
        })
        .collect();
    for round in 0..4 {
        std::thread::sleep(Duration::from_millis(200 + 100 * round));
        // The first that answers gets the streams: kill it, the balancer moves on.
        let first = usize::from(aggregators[0].is_none());
        aggregators[first] = None;
        std::thread::sleep(Duration::from_millis(300));
        aggregators[first] = Some(start(first));
    }
    let mut expected_events = 0;
    for a in agents {
        let json = a.join().expect("agent");
        expected_events += json[0]["26379"]["slow_reqs"].as_u64().expect("slow_reqs");
    }
    let exchanges = Expected::of("redis-benchmark-lo").exchanges()
        + Expected::of("redis-pipelined-sll").exchanges();
    assert_eq!(
        expected_events, exchanges,
        "-t 0: every exchange is an event"
    );
    for agg in aggregators.iter().flatten() {
        let events = query_json(&[], &agg.url(), &["slow", "--limit", "1000000"]);
        assert_eq!(events.as_array().map(Vec::len), Some(exchanges as usize));
        assert_eq!(query_json(&[], &agg.url(), &["hist"])["count"], exchanges);
        let agents = query_json(&[], &agg.url(), &["agents"]);
        let stored: u64 = agents
            .as_array()
            .expect("agents")
            .iter()
            .map(|a| a["events"].as_u64().expect("events"))
            .sum();
        assert_eq!(stored, exchanges);
    }
}

fn snapshot(ts_us: u64, latencies: &[u64]) -> CheckedSnapshot {
    let mut merged = Merged::default();
    for &l in latencies {
        merged.fine.record(l);
        merged.seed[tcpkit_histogram::seed_bucket(l)] += 1;
        merged.count += 1;
        merged.sum_us += l;
    }
    CheckedSnapshot {
        ts_us,
        interval_us: 10_000_000,
        server: "10.0.0.2".into(),
        port: 6379,
        proto: "redis".into(),
        command: "GET".into(),
        merged,
    }
}

/// The same batch committed by two aggregators at the very same time (an agent re-sent it
/// to the second while the first was still committing): stored once in effect.
#[test]
fn one_batch_committed_by_two_aggregators_at_once_counts_once() {
    let Some((_dir, ch)) = clickhouse() else {
        return;
    };
    let spec = clickhouse_store(&ch, "tcpkit");
    let hello = v1::Hello {
        agent_id: "twice".into(),
        session: 7,
        ..Default::default()
    };
    let batch = Arc::new(CheckedBatch {
        seq: 1,
        events: (0..500)
            .map(|i| v1::Event {
                ts_us: 1_000_000 + i,
                latency_us: 20_000 + i,
                summary: format!("GET k{i}"),
                command: "GET".into(),
                proto: "redis".into(),
                server: "10.0.0.2".into(),
                port: 6379,
                ..Default::default()
            })
            .collect(),
        histograms: vec![snapshot(0, &[5, 50, 20_000]), snapshot(10_000_000, &[7])],
        counters: Some(v1::Counters {
            gaps: 3,
            ..Default::default()
        }),
        ..CheckedBatch::default()
    });
    let go = Arc::new(std::sync::Barrier::new(2));
    let stored = Arc::new(Mutex::new(Vec::new()));
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let (spec, hello, batch, go, stored) = (
                spec.clone(),
                hello.clone(),
                Arc::clone(&batch),
                Arc::clone(&go),
                Arc::clone(&stored),
            );
            std::thread::spawn(move || {
                let mut writer = spec.writer().expect("writer");
                let (key, last) = writer.hello(&hello, 1).expect("hello");
                assert_eq!(last, 0);
                go.wait();
                let r = writer.commit(&[(key, &*batch)], 2).expect("commit");
                stored.lock().expect("lock").extend(r);
            })
        })
        .collect();
    threads.into_iter().for_each(|t| t.join().expect("writer"));
    // Both may have stored it (neither saw the other's yet): the rows count once anyway.
    assert!(stored.lock().expect("lock").contains(&true));
    // When both wrote it, the later of the two saw the other's attempt: the batch is read
    // collapsed (most runs; else the second found it stored and wrote nothing).
    let both = stored.lock().expect("lock").iter().all(|&s| s);
    assert_eq!(
        count(&ch, "SELECT count() FROM tcpkit.attempts"),
        if both { 2 } else { 1 }
    );
    assert_eq!(count(&ch, "SELECT count() FROM tcpkit.suspects") > 0, both);
    let reader = spec.reader().expect("reader");
    let check = |reader: &dyn store::Reader| {
        // A page cut where duplicates may not have collapsed yet: still the 10 newest.
        let page = reader
            .slow(&v1::SlowRequest {
                limit: 10,
                ..Default::default()
            })
            .expect("slow");
        let times: Vec<u64> = page
            .iter()
            .map(|e| e.event.as_ref().expect("event").ts_us)
            .collect();
        assert_eq!(times, (1_000_490..1_000_500).rev().collect::<Vec<_>>());
        assert_eq!(
            reader
                .slow(&v1::SlowRequest::default())
                .expect("slow")
                .len(),
            500
        );
        let merged = reader
            .merged(&v1::Filter::default(), Group::None)
            .expect("merged");
        assert_eq!(merged[""].count, 4);
        assert_eq!(merged[""].fine.max_us(), 20_000);
        let agents = reader.agents().expect("agents");
        assert_eq!((agents[0].events, agents[0].sessions), (500, 1));
        assert_eq!(agents[0].counters.expect("counters").gaps, 3);
    };
    check(&*reader);
    // Once stored, a third aggregator says so at hello, and skips a re-send.
    let mut third = spec.writer().expect("writer");
    let (key, last) = third.hello(&hello, 3).expect("hello");
    assert_eq!(last, 1);
    assert_eq!(third.commit(&[(key, &*batch)], 4).expect("commit"), [false]);
    // And after ClickHouse merges its parts, the duplicates are gone for good.
    for t in ["events", "histograms", "batches"] {
        ch.query(&format!("OPTIMIZE TABLE tcpkit.{t} FINAL"))
            .expect("optimize");
    }
    assert_eq!(
        ch.query("SELECT count() FROM tcpkit.events")
            .as_deref()
            .map(str::trim),
        Some("500")
    );
    check(&*reader);
}

/// Two ClickHouse servers, one shard each, and two aggregators naming them in opposite
/// orders: agents split between the aggregators, the data spread over both shards, and
/// every query the same on either aggregator and the same as on SQLite.
#[test]
fn a_two_shard_cluster_behind_two_aggregators() {
    if !clickhouse_available() {
        return;
    }
    let dir = tempdir();
    let servers = ClickHouse::cluster(dir.path(), 2);
    let hosts = [
        format!("{},{}", servers[0].host(), servers[1].host()),
        format!("{},{}", servers[1].host(), servers[0].host()),
    ];
    let aggregators: Vec<Aggregator> = hosts
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let d = dir.path().join(format!("agg{i}"));
            std::fs::create_dir_all(&d).expect("dir");
            let store = format!("clickhouse://{h}/fleet");
            Aggregator::start(
                &d,
                free_port(),
                &[],
                &["--store", &store, "--clickhouse-cluster", "tcpkit"],
            )
        })
        .collect();
    let (a, b) = (aggregators[0].url(), aggregators[1].url());
    replay("redis-benchmark-lo", "a1", &a, &["-p", "26379", "-t", "1"]);
    replay("redis-slow", "a2", &b, &["-p", "26379", "-t", "20"]);
    replay(
        "redis-cluster",
        "a3",
        &a,
        &["-p", "27001,27002,27003", "--slots", "-t", "5"],
    );
    replay("redis-keys", "a4", &b, &["-p", "26379", "-t", "1"]);
    let on_a = answers(&a);
    assert_same(&on_a, &answers(&b), "the two aggregators differ");
    // The same agents on SQLite: the same answers.
    let sqlite_dir = dir.path().join("sqlite");
    std::fs::create_dir_all(&sqlite_dir).expect("dir");
    let sqlite = Aggregator::start(&sqlite_dir, free_port(), &[], &[]);
    feed(&sqlite.url());
    let on_sqlite = answers(&sqlite.url());
    assert_same(&on_sqlite, &on_a, "the cluster differs from SQLite");
    // Rolled up (as 15 minutes later): the same answers from the roll-ups.
    let mut spec = clickhouse_store(&servers[0], "fleet");
    if let store::Spec::ClickHouse(s) = &mut spec {
        s.hosts = vec![servers[0].host(), servers[1].host()];
        s.cluster = Some("tcpkit".into());
    }
    let now = tcpkit_aggregator::server::now_us();
    let rolled = spec
        .writer()
        .expect("writer")
        .roll_up(now + 15 * 60_000_000 + 1)
        .expect("roll up");
    assert!(rolled > 0);
    assert!(count(&servers[0], "SELECT count() FROM fleet.rollups") > 0);
    assert_same(&answers(&b), &on_sqlite, "the rolled-up cluster differs");
    // Sharded by agent: each server holds some of them, none all.
    let per_server: Vec<u64> = servers
        .iter()
        .map(|s| {
            s.query("SELECT uniqExact(agent) FROM fleet.hellos_local")
                .and_then(|t| t.trim().parse().ok())
                .expect("count")
        })
        .collect();
    assert_eq!(per_server.iter().sum::<u64>(), 4, "{per_server:?}");
    assert!(per_server.iter().all(|&n| n > 0), "{per_server:?}");
}

/// ClickHouse down for 20 s while agents ship: the aggregator keeps answering what it can
/// (the agents' queries fail with the reason, the metrics count refused commits), the agents
/// keep their batches, and once it is back every event is there once.
#[test]
fn clickhouse_down_for_20_seconds_loses_nothing() {
    let Some((dir, mut ch)) = clickhouse() else {
        return;
    };
    let store = format!("clickhouse://{}/tcpkit", ch.host());
    let metrics = free_port();
    let metrics_addr = format!("127.0.0.1:{metrics}");
    let agg = Aggregator::start(
        dir.path(),
        free_port(),
        &[],
        &["--store", &store, "--metrics-listen", &metrics_addr],
    );
    let url = agg.url();
    let before = replay("redis-slow", "early", &url, &["-p", "26379", "-t", "0"]);
    ch.kill();
    let during: Vec<_> = [("redis-benchmark-lo", "d1"), ("redis-pipelined-sll", "d2")]
        .into_iter()
        .map(|(f, id)| {
            let url = url.clone();
            std::thread::spawn(move || replay(f, id, &url, &["-p", "26379", "-t", "0"]))
        })
        .collect();
    std::thread::sleep(Duration::from_secs(5));
    // Down: queries say why, and the refused commits are counted.
    let out = std::process::Command::new(bin("tcpkit-query"))
        .args(["--aggregator", &url, "hist"])
        .output()
        .expect("tcpkit-query");
    assert!(!out.status.success());
    let why = String::from_utf8_lossy(&out.stderr);
    assert!(why.contains("clickhouse"), "{why}");
    let page = http_get(metrics, "/metrics");
    let failures = page
        .lines()
        .find_map(|l| l.strip_prefix("tcpkit_aggregator_store_failures_total "))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no store failures counted: {page}"));
    assert!(failures > 0);
    std::thread::sleep(Duration::from_secs(15));
    ch.resume();
    let mut events = before[0]["26379"]["slow_reqs"].as_u64().expect("slow_reqs");
    for a in during {
        events += a.join().expect("agent")[0]["26379"]["slow_reqs"]
            .as_u64()
            .expect("slow_reqs");
    }
    let stored = query_json(&[], &url, &["slow", "--limit", "1000000"]);
    assert_eq!(stored.as_array().map(Vec::len), Some(events as usize));
    assert_eq!(query_json(&[], &url, &["hist"])["count"], events);
}

/// ClickHouse over HTTPS (a CA and a server certificate made here) with the user's password
/// from a file: the fleet works; a wrong password stops the aggregator at start, saying so.
#[test]
fn clickhouse_over_https_with_a_password_from_a_file() {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    if !clickhouse_available() {
        return;
    }
    let dir = tempdir();
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "tcpkit test CA");
    let ca_pem = ca.self_signed(&ca_key).expect("CA").pem();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().expect("key");
    let mut leaf = CertificateParams::new(vec!["127.0.0.1".to_string()]).expect("params");
    leaf.distinguished_name
        .push(DnType::CommonName, "clickhouse");
    let cert = leaf.signed_by(&key, &issuer).expect("certificate");
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write");
        path
    };
    let ca_file = write("ca.crt", &ca_pem);
    let (cert_file, key_file) = (
        write("server.crt", &cert.pem()),
        write("server.key", &key.serialize_pem()),
    );
    let ch = ClickHouse::start_with(
        dir.path(),
        &ClickHouseOptions {
            password: "s3cret-pw".into(),
            tls: Some((cert_file, key_file)),
        },
    );
    let store = format!(
        "clickhouse+https://127.0.0.1:{}/tcpkit",
        ch.https_port.expect("https")
    );
    let password = write("password", "s3cret-pw\n");
    let ca_arg = ca_file.to_str().expect("utf-8");
    let password_arg = password.to_str().expect("utf-8");
    let agg = Aggregator::start(
        dir.path(),
        free_port(),
        &[],
        &[
            "--store",
            &store,
            "--store-ca",
            ca_arg,
            "--store-password-file",
            password_arg,
        ],
    );
    replay("redis-slow", "a2", &agg.url(), &["-p", "26379", "-t", "20"]);
    assert_eq!(
        query_json(&[], &agg.url(), &["hist"])["count"],
        Expected::of("redis-slow").exchanges()
    );
    // A wrong password: refused at start, with ClickHouse's reason.
    let wrong = write("wrong", "not-it\n");
    let out = std::process::Command::new(bin("tcpkit-aggregator"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--store",
            &store,
            "--store-ca",
            ca_arg,
        ])
        .arg("--store-password-file")
        .arg(&wrong)
        .output()
        .expect("tcpkit-aggregator");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.to_lowercase().contains("password"), "{stderr}");
    // And a certificate nobody vouches for: refused too.
    let out = std::process::Command::new(bin("tcpkit-aggregator"))
        .args(["--listen", "127.0.0.1:0", "--store", &store])
        .arg("--store-password-file")
        .arg(&password)
        .output()
        .expect("tcpkit-aggregator");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("certificate") || stderr.contains("UnknownIssuer"),
        "{stderr}"
    );
}

/// Retention drops whole days of capture time, on every table: by age, each day that ended
/// before the cutoff; by size, the oldest days while the parts on disk hold more.
#[test]
fn retention_drops_whole_days() {
    let Some((_dir, ch)) = clickhouse() else {
        return;
    };
    let spec = clickhouse_store(&ch, "tcpkit");
    let mut writer = spec.writer().expect("writer");
    let (key, _) = writer
        .hello(
            &v1::Hello {
                agent_id: "old".into(),
                session: 1,
                ..Default::default()
            },
            1,
        )
        .expect("hello");
    let day = 86_400_000_000u64;
    for (seq, d) in [(1, 1), (2, 5), (3, 9)] {
        let t = d * day + 3_600_000_000;
        let batch = CheckedBatch {
            seq,
            events: (0..2000)
                .map(|i| v1::Event {
                    ts_us: t + i,
                    latency_us: 20_000,
                    summary: format!("GET {}", "key ".repeat(20)),
                    command: "GET".into(),
                    ..Default::default()
                })
                .collect(),
            histograms: vec![snapshot(t, &[5])],
            ..CheckedBatch::default()
        };
        writer.commit(&[(key.clone(), &batch)], 0).expect("commit");
    }
    let reader = spec.reader().expect("reader");
    let left = || {
        reader
            .slow(&v1::SlowRequest::default())
            .expect("slow")
            .len()
    };
    assert_eq!(left(), 6000);
    // Kept 6 days at day 10.5: day 1 goes, day 5 (it ends after day 4.5) stays.
    let dropped = writer
        .enforce_retention(
            Some(Duration::from_secs(6 * 86_400)),
            None,
            10 * day + day / 2,
        )
        .expect("retention");
    assert_eq!((dropped, left()), (1, 4000));
    let count = |r: &dyn store::Reader| {
        r.merged(&v1::Filter::default(), Group::None)
            .expect("merged")[""]
            .count
    };
    assert_eq!(count(&*reader), 2);
    // By size: 1 byte is less than any day; the newest stays (it is being written).
    let dropped = writer
        .enforce_retention(None, Some(1), 10 * day)
        .expect("retention");
    assert_eq!((dropped, left()), (1, 2000));
    assert_eq!(count(&*reader), 1);
}

/// The store flags are checked before anything starts, each refusal saying what to do.
#[test]
fn store_flags_are_checked() {
    for (args, says) in [
        (
            &["--store", "mysql://h/db"][..],
            "sqlite:PATH or clickhouse://",
        ),
        (&["--store", "sqlite:"], "needs a file"),
        (
            &["--store", "clickhouse://127.0.0.1:8123"],
            "names no database",
        ),
        (
            &["--store", "clickhouse://u:pw@127.0.0.1:8123/db"],
            "--store-password-file",
        ),
        (
            &["--store", "clickhouse://a:1,b:2/db"],
            "each would hold a part",
        ),
        (
            &["--store", "clickhouse://a:1/db", "--store-ca", "ca.pem"],
            "clickhouse+https://",
        ),
        (&["--clickhouse-cluster", "c"], "for a ClickHouse --store"),
        (
            &["--store", "sqlite:x.db", "--db", "y.db"],
            "cannot be used with",
        ),
        (
            &[
                "--store",
                "clickhouse://a:1,b:2/db",
                "--clickhouse-cluster",
                "no good",
            ],
            "not a cluster name",
        ),
    ] {
        let out = std::process::Command::new(bin("tcpkit-aggregator"))
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .output()
            .expect("tcpkit-aggregator");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
}

/// A page of slow requests cut inside a run of equal times or latencies: both stores give
/// exactly the full sort's first rows (time or latency, then agent name, then the newest
/// stored), whatever the limit; also up to an end in the past (ClickHouse then looks for
/// the page's boundary in the hour before that end first).
#[test]
fn slow_pages_cut_inside_ties_are_exact_on_both_stores() {
    let Some((dir, ch)) = clickhouse() else {
        return;
    };
    let specs = [
        store::Spec::Sqlite(dir.path().join("ties.db")),
        clickhouse_store(&ch, "ties"),
    ];
    // Three agents, written in the order c, a, b; times and latencies repeat.
    const T0: u64 = 10 * 86_400_000_000;
    let mut all = Vec::new();
    for spec in &specs {
        let mut writer = spec.writer().expect("writer");
        for (k, agent) in ["c", "a", "b"].into_iter().enumerate() {
            let key = session(&mut *writer, agent, 1);
            let events: Vec<v1::Event> = (0..40u64)
                .map(|i| v1::Event {
                    ts_us: T0 + (i * 7 + k as u64) % 5,
                    latency_us: 10_000 + (i * 3) % 4,
                    summary: format!("GET {agent}{i}"),
                    command: "GET".into(),
                    ..Default::default()
                })
                .collect();
            if all.len() < 120 {
                all.extend(
                    events
                        .iter()
                        .enumerate()
                        .map(|(i, e)| (agent, i, e.clone())),
                );
            }
            let batch = CheckedBatch {
                seq: 1,
                events,
                ..CheckedBatch::default()
            };
            writer.commit(&[(key, &batch)], 2).expect("commit");
        }
    }
    for (slowest_first, to_us) in [(false, 0), (true, 0), (false, T0 + 3)] {
        let mut expected: Vec<_> = all
            .iter()
            .filter(|(_, _, e)| to_us == 0 || e.ts_us < to_us)
            .cloned()
            .collect();
        expected.sort_by(|(a1, i1, e1), (a2, i2, e2)| {
            let lead = if slowest_first {
                (e2.latency_us, e2.ts_us).cmp(&(e1.latency_us, e1.ts_us))
            } else {
                e2.ts_us.cmp(&e1.ts_us)
            };
            lead.then(a1.cmp(a2)).then(i2.cmp(i1))
        });
        for limit in [1, 2, 5, 17, 40, 41, 119, 120, 121] {
            let want: Vec<String> = expected
                .iter()
                .take(limit)
                .map(|(_, _, e)| e.summary.clone())
                .collect();
            for spec in &specs {
                let got: Vec<String> = spec
                    .reader()
                    .expect("reader")
                    .slow(&v1::SlowRequest {
                        limit: limit as u32,
                        slowest_first,
                        filter: Some(v1::Filter {
                            to_us,
                            ..Default::default()
                        }),
                        ..Default::default()
                    })
                    .expect("slow")
                    .into_iter()
                    .map(|e| e.event.expect("event").summary)
                    .collect();
                assert_eq!(
                    got, want,
                    "{spec}, limit {limit}, slowest first {slowest_first}, to {to_us}"
                );
            }
        }
    }
}

/// Two commands whose keys share the 40 hash bits the ClickHouse store groups buckets by
/// (found by asking ClickHouse): each keeps its own histogram, as on SQLite.
#[test]
fn groups_whose_hashes_collide_stay_apart() {
    let Some((dir, ch)) = clickhouse() else {
        return;
    };
    let collide = "SELECT bitAnd(cityHash64('redis\\x1fC224057'), 1099511627775) = \
                   bitAnd(cityHash64('redis\\x1fC798355'), 1099511627775)";
    assert_eq!(ch.query(collide).as_deref().map(str::trim), Some("1"));
    let specs = [
        store::Spec::Sqlite(dir.path().join("collide.db")),
        clickhouse_store(&ch, "collide"),
    ];
    let mut answers = Vec::new();
    for spec in &specs {
        let mut writer = spec.writer().expect("writer");
        let key = session(&mut *writer, "h", 1);
        let mut a = snapshot(0, &[10, 20, 30]);
        a.command = "C224057".into();
        let mut b = snapshot(0, &[5_000, 9_000]);
        b.command = "C798355".into();
        let batch = CheckedBatch {
            seq: 1,
            histograms: vec![a, b],
            ..CheckedBatch::default()
        };
        writer.commit(&[(key, &batch)], 2).expect("commit");
        let merged = spec
            .reader()
            .expect("reader")
            .merged(&v1::Filter::default(), Group::Command)
            .expect("merged");
        let figures: Vec<(String, u64, u64)> = merged
            .iter()
            .map(|(k, m)| (k.clone(), m.count, m.fine.quantile(0.5)))
            .collect();
        assert_eq!(figures.len(), 2, "{figures:?}");
        assert_eq!((figures[0].1, figures[1].1), (3, 2), "{figures:?}");
        answers.push(figures);
    }
    assert_eq!(answers[0], answers[1]);
}

/// An attempt that died half way (its attempt recorded, one event written, no more) and the
/// agent's re-send: the re-send finds the other attempt, the batch is a suspect, and its
/// events and histograms count once.
#[test]
fn a_half_written_batch_and_its_resend_count_once() {
    let Some((_dir, ch)) = clickhouse() else {
        return;
    };
    let spec = clickhouse_store(&ch, "tcpkit");
    let mut writer = spec.writer().expect("writer");
    let key = session(&mut *writer, "crash", 9);
    let event = |i: u64| v1::Event {
        ts_us: 1_000_000 + i,
        latency_us: 20_000,
        summary: format!("GET k{i}"),
        command: "GET".into(),
        ..Default::default()
    };
    // What the dead attempt left: its attempt, the batch's first event and histogram.
    for sql in [
        "INSERT INTO tcpkit.attempts (agent, session, seq, started_us) VALUES ('crash', 9, 1, 0)",
        "INSERT INTO tcpkit.events (agent, session, seq, n, ts_us, latency_us, summary, command) \
         VALUES ('crash', 9, 1, 0, 1000000, 20000, 'GET k0', 'GET')",
        "INSERT INTO tcpkit.histograms (agent, session, seq, n, ts_us, count, sum_us, max_us, \
         seed, fine_i, fine_c) VALUES ('crash', 9, 1, 0, 0, 1, 20000, 20000, \
         [0,0,0,0,0,0,0,0,0,1,0,0,0,0,0,0,0,0], [FINE], [1])",
    ] {
        let fine = tcpkit_histogram::fine_index(20_000).to_string();
        ch.query(&sql.replace("FINE", &fine))
            .unwrap_or_else(|| panic!("{sql}"));
    }
    let batch = CheckedBatch {
        seq: 1,
        events: (0..10).map(event).collect(),
        histograms: vec![snapshot(0, &[20_000])],
        ..CheckedBatch::default()
    };
    assert_eq!(writer.commit(&[(key, &batch)], 2).expect("commit"), [true]);
    assert_eq!(count(&ch, "SELECT count() FROM tcpkit.suspects"), 1);
    let reader = spec.reader().expect("reader");
    assert_eq!(
        reader
            .slow(&v1::SlowRequest::default())
            .expect("slow")
            .len(),
        10
    );
    let page = reader
        .slow(&v1::SlowRequest {
            limit: 10,
            ..Default::default()
        })
        .expect("slow");
    assert_eq!(page.len(), 10);
    for group in [Group::None, Group::Command, Group::Agent] {
        let merged = reader
            .merged(&v1::Filter::default(), group)
            .expect("merged");
        assert_eq!(
            merged.values().map(|m| m.count).sum::<u64>(),
            1,
            "{group:?}"
        );
    }
    let agents = reader.agents().expect("agents");
    assert_eq!(agents[0].events, 10);
}

/// Histograms read while batches are stored, as in a busy fleet: every answer adds up (its
/// buckets hold its count, its sums match), never a mix of two moments.
#[test]
fn histograms_read_while_batches_are_stored_add_up() {
    let Some((_dir, ch)) = clickhouse() else {
        return;
    };
    let spec = clickhouse_store(&ch, "busy");
    let mut writer = spec.writer().expect("writer");
    let done = Arc::new(AtomicBool::new(false));
    let storing = {
        let done = Arc::clone(&done);
        std::thread::spawn(move || {
            let key = session(&mut *writer, "busy", 1);
            let mut seq = 0;
            while !done.load(Ordering::Relaxed) {
                seq += 1;
                let batch = CheckedBatch {
                    seq,
                    histograms: vec![snapshot(seq * 10_000_000, &[10, 20, 30])],
                    ..CheckedBatch::default()
                };
                writer.commit(&[(key.clone(), &batch)], 2).expect("commit");
            }
            seq
        })
    };
    let reader = spec.reader().expect("reader");
    let deadline = std::time::Instant::now() + Duration::from_secs(4);
    let mut reads = 0;
    while std::time::Instant::now() < deadline {
        let merged = reader
            .merged(&v1::Filter::default(), Group::None)
            .expect("merged");
        if let Some(m) = merged.get("") {
            assert_eq!(m.fine.total(), m.count);
            assert_eq!(m.sum_us, 20 * m.count);
            assert_eq!(m.seed.iter().sum::<u64>(), m.count);
            reads += 1;
        }
    }
    done.store(true, Ordering::Relaxed);
    let batches = storing.join().expect("writer");
    assert!(reads > 3 && batches > 3, "{reads} reads, {batches} batches");
    let merged = reader
        .merged(&v1::Filter::default(), Group::None)
        .expect("merged");
    assert_eq!(merged[""].count, 3 * batches);
}

/// A snapshot of `server` and `command` at `ts_us`: `n` requests of latencies that vary
/// with both.
fn varied_snapshot(ts_us: u64, server: &str, command: &str, n: u64) -> CheckedSnapshot {
    let latencies: Vec<u64> = (0..n)
        .map(|i| 10 + (ts_us / 1_000_000 + i * 37) % 90_000)
        .collect();
    CheckedSnapshot {
        server: server.into(),
        command: command.into(),
        ..snapshot(ts_us, &latencies)
    }
}

/// Agent `agent` (of `keys`, one list per writer) stores snapshots every 5 minutes of
/// `[from, to)` at clock `now` on every writer, numbering its batches on from `seqs`.
fn store_both(
    writers: &mut [Box<dyn store::Writer>; 2],
    keys: &[Vec<store::SessionKey>],
    seqs: &mut [u64; 2],
    agent: usize,
    from: u64,
    to: u64,
    now: u64,
) {
    let mut ts = from;
    while ts < to {
        seqs[agent] += 1;
        let histograms: Vec<CheckedSnapshot> = (0..4)
            .map(|k| {
                varied_snapshot(
                    ts + k * 300_000_000,
                    ["10.0.0.2", "10.0.0.3"][k as usize % 2],
                    ["GET", "SET"][(k as usize / 2 + agent) % 2],
                    1 + (ts / 300_000_000 + k) % 7,
                )
            })
            .filter(|h| h.ts_us < to)
            .collect();
        let batch = CheckedBatch {
            seq: seqs[agent],
            histograms,
            ..CheckedBatch::default()
        };
        for (w, k) in writers.iter_mut().zip(keys) {
            assert_eq!(
                w.commit(&[(k[agent].clone(), &batch)], now)
                    .expect("commit"),
                [true]
            );
        }
        ts += 4 * 300_000_000;
    }
}

/// The roll-ups on ClickHouse answer what SQLite does, over whole and cut ranges, for every
/// grouping: before any roll-up, after one, with a late batch into a rolled-up bucket (read
/// from the snapshots, then rolled up again), and with re-sent batches whose first copy is
/// in a roll-up (a half-written attempt before it) or is not (a suspect before it).
#[test]
fn roll_ups_answer_what_the_snapshots_do() {
    let Some((dir, ch)) = clickhouse() else {
        return;
    };
    const HOUR: u64 = 3_600_000_000;
    const SETTLE: u64 = 15 * 60_000_000;
    let t0 = 100 * HOUR;
    let spec = clickhouse_store(&ch, "rolled");
    let sqlite = store::Spec::Sqlite(dir.path().join("rolled.db"));
    let mut writers = [
        spec.writer().expect("writer"),
        sqlite.writer().expect("writer"),
    ];
    let keys: Vec<Vec<store::SessionKey>> = writers
        .iter_mut()
        .map(|w| ["a", "b"].map(|id| session(&mut **w, id, 1)).to_vec())
        .collect();
    let mut seqs = [0u64; 2];
    let ranges = [
        (0, 0),
        (t0 + HOUR, t0 + 2 * HOUR),
        (t0 + 17 * 60_000_000, t0 + 2 * HOUR + 43 * 60_000_000),
        (t0 + 25 * 60_000_000, 0),
        (
            t0 + 2 * HOUR + 10 * 60_000_000,
            t0 + 2 * HOUR + 20 * 60_000_000,
        ),
    ];
    let readers = [
        spec.reader().expect("reader"),
        sqlite.reader().expect("reader"),
    ];
    let same = |stage: &str| {
        for (from_us, to_us) in ranges {
            for group in [
                Group::None,
                Group::Server,
                Group::Command,
                Group::Agent,
                Group::Port,
            ] {
                let filter = v1::Filter {
                    from_us,
                    to_us,
                    ..Default::default()
                };
                let [ch, lite] = [0, 1].map(|i| readers[i].merged(&filter, group).expect("merged"));
                assert!(!lite.is_empty(), "{stage}: nothing in [{from_us}, {to_us})");
                assert_eq!(ch, lite, "{stage}: [{from_us}, {to_us}) by {group:?}");
            }
            let filter = v1::Filter {
                from_us,
                to_us,
                server: "10.0.0.3".into(),
                command: "set".into(),
                ..Default::default()
            };
            let [ch, lite] =
                [0, 1].map(|i| readers[i].merged(&filter, Group::None).expect("merged"));
            assert_eq!(
                ch, lite,
                "{stage}: [{from_us}, {to_us}) of one server and command"
            );
        }
        // Series: steps finer than the roll-ups, equal to each, and coarser.
        for (from_us, to_us) in ranges {
            let (from_us, to_us) = (
                from_us.max(t0 - HOUR),
                if to_us == 0 { t0 + 4 * HOUR } else { to_us },
            );
            for step in [300_000_000, 600_000_000, 1_200_000_000, HOUR, 2 * HOUR] {
                for group in [Group::None, Group::Command, Group::Agent] {
                    let filter = v1::Filter {
                        from_us,
                        to_us,
                        ..Default::default()
                    };
                    let [ch, lite] =
                        [0, 1].map(|i| readers[i].series(&filter, group, step).expect("series"));
                    assert!(!lite.is_empty());
                    assert_eq!(
                        ch, lite,
                        "{stage}: series of [{from_us}, {to_us}) by {step} µs, {group:?}"
                    );
                }
            }
        }
    };
    let clock = t0 + 3 * HOUR;
    store_both(&mut writers, &keys, &mut seqs, 0, t0, t0 + 3 * HOUR, clock);
    store_both(&mut writers, &keys, &mut seqs, 1, t0, t0 + 3 * HOUR, clock);
    same("no roll-ups");
    // A batch that one attempt half wrote (its first snapshot), and another re-sent before
    // the roll-up: both read as one copy.
    let half = CheckedBatch {
        seq: seqs[0] + 1,
        histograms: vec![varied_snapshot(t0 + 65 * 60_000_000, "10.0.0.2", "GET", 3)],
        ..CheckedBatch::default()
    };
    let resent = CheckedBatch {
        seq: seqs[1] + 1,
        histograms: vec![varied_snapshot(t0 + 70 * 60_000_000, "10.0.0.3", "SET", 2)],
        ..CheckedBatch::default()
    };
    seqs[0] += 1;
    seqs[1] += 1;
    let row = |agent: &str, seq: u64, h: &CheckedSnapshot, inserted: u64| {
        let m = &h.merged;
        let (i, c): (Vec<u32>, Vec<u64>) = m.fine.nonzero().unzip();
        format!(
            "INSERT INTO rolled.histograms (agent, session, seq, n, ts_us, server, port, proto, \
             command, inserted_us, count, sum_us, max_us, seed, fine_i, fine_c) VALUES \
             ('{agent}', 1, {seq}, 0, {}, '{}', {}, '{}', '{}', {inserted}, {}, {}, {}, {:?}, {i:?}, {c:?})",
            h.ts_us, h.server, h.port, h.proto, h.command, m.count, m.sum_us, m.fine.max_us(), m.seed
        )
    };
    for sql in [
        format!(
            "INSERT INTO rolled.attempts VALUES ('a', 1, {}, {clock})",
            half.seq
        ),
        row("a", half.seq, &half.histograms[0], clock),
        format!(
            "INSERT INTO rolled.attempts VALUES ('b', 1, {}, {clock})",
            resent.seq
        ),
        row("b", resent.seq, &resent.histograms[0], clock),
    ] {
        ch.query(&sql).unwrap_or_else(|| panic!("{sql}"));
    }
    assert_eq!(
        writers[0]
            .commit(&[(keys[0][1].clone(), &resent)], clock)
            .expect("commit"),
        [true]
    );
    assert_eq!(
        writers[1]
            .commit(&[(keys[1][1].clone(), &resent)], clock)
            .expect("commit"),
        [true]
    );
    writers[1]
        .commit(&[(keys[1][0].clone(), &half)], clock)
        .expect("commit");
    assert_eq!(count(&ch, "SELECT count() FROM rolled.suspects"), 1);
    let rolled = writers[0].roll_up(clock + SETTLE + 1).expect("roll up");
    assert!(rolled >= 3 + 18, "{rolled} buckets rolled up");
    assert_eq!(
        writers[0].roll_up(clock + SETTLE + 2).expect("roll up"),
        0,
        "too soon"
    );
    assert!(count(&ch, "SELECT count() FROM rolled.rollups") > 0);
    // The half-written batch re-sent after the roll-up holds its first copy.
    let clock = clock + 2 * SETTLE;
    assert_eq!(
        writers[0]
            .commit(&[(keys[0][0].clone(), &half)], clock)
            .expect("commit"),
        [true]
    );
    assert_eq!(count(&ch, "SELECT count() FROM rolled.suspects"), 2);
    same("rolled up");
    // Late snapshots into rolled-up buckets, read from the snapshots, then rolled up.
    store_both(
        &mut writers,
        &keys,
        &mut seqs,
        1,
        t0 + 30 * 60_000_000,
        t0 + 50 * 60_000_000,
        clock,
    );
    same("late batches");
    let marks = count(&ch, "SELECT count() FROM rolled.rollup_marks");
    assert!(writers[0].roll_up(clock + SETTLE + 1).expect("roll up") >= 2);
    assert!(count(&ch, "SELECT count() FROM rolled.rollup_marks") > marks);
    same("rolled up again");
}

/// A store of schema version 2 (no `inserted_us`, no roll-ups) is brought up to date when
/// an aggregator starts on it: its snapshots read the same, and are rolled up.
#[test]
fn a_version_2_store_is_brought_up_to_date() {
    let Some((_dir, ch)) = clickhouse() else {
        return;
    };
    let spec = clickhouse_store(&ch, "old");
    let mut writer = spec.writer().expect("writer");
    let key = session(&mut *writer, "old", 1);
    let batch = CheckedBatch {
        seq: 1,
        histograms: (0..50)
            .map(|i| varied_snapshot(i * 60_000_000, "10.0.0.2", "GET", 1 + i % 3))
            .collect(),
        ..CheckedBatch::default()
    };
    writer.commit(&[(key, &batch)], 1).expect("commit");
    let before = spec
        .reader()
        .expect("reader")
        .merged(&v1::Filter::default(), Group::Command)
        .expect("merged");
    drop(writer);
    for sql in [
        "ALTER TABLE old.histograms DROP COLUMN inserted_us",
        "ALTER TABLE old.templates DROP COLUMN inserted_us",
        "DROP TABLE old.rollups",
        "DROP TABLE old.rollup_marks",
        "DROP TABLE old.compactions",
        "DROP TABLE old.schema_version",
        "CREATE TABLE old.schema_version (version UInt32, ts_us UInt64) ENGINE = MergeTree ORDER BY version",
        "INSERT INTO old.schema_version VALUES (2, 0)",
    ] {
        ch.query(sql).unwrap_or_else(|| panic!("{sql}"));
    }
    let mut writer = spec.writer().expect("writer");
    assert_eq!(count(&ch, "SELECT max(version) FROM old.schema_version"), 3);
    let reader = spec.reader().expect("reader");
    let merged = |reader: &dyn store::Reader| {
        reader
            .merged(&v1::Filter::default(), Group::Command)
            .expect("merged")
    };
    assert_eq!(merged(&*reader), before);
    assert!(writer.roll_up(2 * 60 * 60_000_000).expect("roll up") > 0);
    assert!(count(&ch, "SELECT count() FROM old.rollups") > 0);
    assert_eq!(merged(&*reader), before);
}
