//! Helpers of the end-to-end tests: the built binaries, fixtures and their expected figures,
//! real servers on free ports that are always stopped, and the rule for skipping.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub mod mangle;

/// The `tcpkit` binary of this build (`cargo build --workspace` makes it), or the one
/// `TCPKIT_BIN` names (to compare another build on the same tests).
pub fn tcpkit_bin() -> PathBuf {
    std::env::var_os("TCPKIT_BIN").map_or_else(|| bin("tcpkit"), PathBuf::from)
}

/// A binary of this build: `tcpkit`, `tcpkit-aggregator`, `tcpkit-query`.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join(name);
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --workspace` before the tests",
        bin.display()
    );
    bin
}

/// Runs tcpkit to completion, asserts it succeeded, and returns its standard output.
pub fn run_tcpkit(args: &[&str]) -> String {
    let out = Command::new(tcpkit_bin())
        .args(args)
        .output()
        .expect("run tcpkit");
    assert!(
        out.status.success(),
        "tcpkit {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// Runs tcpkit on the fixture `name` (`-r NAME.pcap -p PORT`) with more arguments; its
/// standard output.
pub fn run_on_fixture(name: &str, args: &[&str]) -> String {
    let pcap = fixture(&format!("{name}.pcap"));
    let port = Expected::of(name).port.to_string();
    let mut all = vec!["-r", pcap.to_str().expect("utf-8 path"), "-p", &port];
    all.extend_from_slice(args);
    run_tcpkit(&all)
}

/// A file of `tests/fixtures/`.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

/// The figures `fixtures/generate.sh` counted with tshark for one capture.
#[derive(Debug, Clone)]
pub struct Expected {
    /// The server port.
    pub port: u16,
    /// Frames in the file.
    pub packets: u64,
    /// Frames with a TCP payload.
    pub payload_packets: u64,
    /// Client → server packets and payload bytes.
    pub req_packets: u64,
    /// Client → server payload bytes.
    pub req_bytes: u64,
    /// Server → client packets.
    pub rsp_packets: u64,
    /// Server → client payload bytes.
    pub rsp_bytes: u64,
    /// TCP connections opened (SYN without ACK).
    pub connections: u64,
    /// Commands the server executed during the capture, by name (INFO commandstats).
    pub commands: std::collections::BTreeMap<String, u64>,
    /// The whole document, for the fields a scenario adds (`exchanges`, `noreply`, …).
    pub json: serde_json::Value,
}

impl Expected {
    /// A field a scenario added, if present.
    pub fn extra(&self, key: &str) -> Option<u64> {
        self.json[key].as_u64()
    }

    /// Request/reply pairs tcpkit must find: the scenario's count, or every command the
    /// server executed.
    pub fn exchanges(&self) -> u64 {
        self.extra("exchanges")
            .unwrap_or_else(|| self.commands.values().sum())
    }
}

impl Expected {
    /// Reads `NAME.expected.json` beside `NAME.pcap`.
    pub fn of(name: &str) -> Self {
        let path = fixture(&format!("{name}.expected.json"));
        let text = std::fs::read_to_string(&path).expect("expected figures");
        let v: serde_json::Value = serde_json::from_str(&text).expect("expected JSON");
        let n = |k: &str| {
            v[k].as_u64()
                .unwrap_or_else(|| panic!("{k} in {}", path.display()))
        };
        Self {
            port: n("port") as u16,
            packets: n("packets"),
            payload_packets: n("payload_packets"),
            req_packets: n("req_packets"),
            req_bytes: n("req_bytes"),
            rsp_packets: n("rsp_packets"),
            rsp_bytes: n("rsp_bytes"),
            connections: n("connections"),
            commands: v["commands"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, c)| (k.clone(), c.as_u64().unwrap_or(0)))
                        .collect()
                })
                .unwrap_or_default(),
            json: v.clone(),
        }
    }
}

/// The fixtures made by `fixtures/generate.sh`.
pub const FIXTURES: &[&str] = &[
    "redis-benchmark-lo",
    "redis-bigvalues-any",
    "redis-pipelined-sll",
    "redis-multi",
    "redis-client-reply",
    "redis-pubsub",
    "redis-slow",
    "redis-pipeline",
    "redis-keys",
    "memcached-text",
    "memcached-meta",
    "memcached-binary",
    "dns-tcp",
];

/// The fixtures of Redis traffic.
pub const REDIS_FIXTURES: &[&str] = &[
    "redis-benchmark-lo",
    "redis-bigvalues-any",
    "redis-pipelined-sll",
    "redis-pipeline",
];

/// Returns false (after saying why) when a test cannot run here; in CI (`CI=true`) a
/// missing requirement fails the test instead.
pub fn requirement(met: bool, what: &str) -> bool {
    if met {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CI=true and this test needs {what}");
    }
    eprintln!("SKIPPED: this test needs {what}");
    false
}

/// True when running as root (live capture, network namespaces).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// True when `program` is on the PATH.
pub fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// A child process that is killed and reaped when dropped, even when the test fails.
pub struct Guard(pub Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until something accepts TCP connections on 127.0.0.1:`port`.
pub fn wait_for_port(port: u16, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// A real `redis-server` on a free loopback port (127.0.0.1 and ::1), nothing saved to disk.
pub fn start_redis() -> (Guard, u16) {
    let port = free_port();
    let child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1 -::1", // IPv6 only where the machine has it
            "--save",
            "",
        ])
        .args(["--appendonly", "no", "--logfile", ""])
        .stdout(Stdio::null())
        .spawn()
        .expect("start redis-server");
    let guard = Guard(child);
    assert!(
        wait_for_port(port, Duration::from_secs(10)),
        "redis-server did not start"
    );
    (guard, port)
}

/// Sends SIGINT to a child.
pub fn interrupt(child: &Child) {
    // SAFETY: signalling a child we started and have not reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
}

/// Merges fixtures into one capture with mergecap (wireshark-common), in `dir`.
pub fn merged_fixtures(dir: &Path, names: &[&str]) -> PathBuf {
    let merged = dir.join("merged.pcap");
    let status = Command::new("mergecap")
        .args(["-F", "pcap", "-w"])
        .arg(&merged)
        .args(names.iter().map(|n| fixture(&format!("{n}.pcap"))))
        .status()
        .expect("run mergecap");
    assert!(status.success(), "mergecap failed");
    merged
}

/// A real `tcpkit-aggregator` on 127.0.0.1:`port` with its SQLite file in `dir`, stopped
/// (SIGKILL) when dropped. `prefix` runs it through another command (`ip netns exec NS`).
pub struct Aggregator {
    /// The process.
    pub guard: Guard,
    /// Its port.
    pub port: u16,
    /// Its database file.
    pub db: PathBuf,
}

impl Aggregator {
    /// Starts an aggregator on `port` (of 127.0.0.1, or of every address of the namespace
    /// `prefix` enters) with more arguments, and waits until it answers.
    pub fn start(dir: &Path, port: u16, prefix: &[&str], extra: &[&str]) -> Self {
        let db = dir.join("fleet.db");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("aggregator.log"))
            .expect("aggregator log");
        let listen = format!(
            "{}:{port}",
            if prefix.is_empty() {
                "127.0.0.1"
            } else {
                "0.0.0.0"
            }
        );
        let mut command = command_in(prefix, &bin("tcpkit-aggregator"));
        command.args(["--listen", &listen]);
        if !extra.contains(&"--store") {
            command.arg("--db").arg(&db);
        }
        let child = command
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start tcpkit-aggregator");
        let guard = Guard(child);
        let up = if prefix.is_empty() {
            wait_for_port(port, Duration::from_secs(10))
        } else {
            // In a namespace of its own: ask it, from there.
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let url = format!("http://127.0.0.1:{port}");
                let ok = command_in(prefix, &bin("tcpkit-query"))
                    .args(["--aggregator", &url, "agents"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success());
                if ok || Instant::now() > deadline {
                    break ok;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        };
        assert!(
            up,
            "tcpkit-aggregator did not start: see {}",
            dir.join("aggregator.log").display()
        );
        Self { guard, port, db }
    }

    /// Its address for agents and queries on this host.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

/// Where Debian puts the ClickHouse server.
pub const CLICKHOUSE_SERVER: &str = "/usr/sbin/clickhouse-server";

/// True when a ClickHouse server can be started (skips, with its reason, unless CI=true).
pub fn clickhouse_available() -> bool {
    requirement(
        Path::new(CLICKHOUSE_SERVER).exists(),
        "clickhouse-server (apt-get install clickhouse-server)",
    )
}

/// A real `clickhouse-server` of its own: config, data and log in a directory of its own,
/// free loopback ports, killed when dropped. Several make a cluster named `tcpkit`, one
/// shard each ([`ClickHouse::cluster`]).
pub struct ClickHouse {
    guard: Option<Guard>,
    dir: PathBuf,
    password: String,
    /// Its HTTP port.
    pub http_port: u16,
    /// Its HTTPS port, when started with a certificate.
    pub https_port: Option<u16>,
}

/// How to start a [`ClickHouse`]: the `default` user's password, an HTTPS certificate and
/// key (PEM files).
#[derive(Default)]
pub struct ClickHouseOptions {
    /// The password of the user `default` (none when empty).
    pub password: String,
    /// The server's certificate and key.
    pub tls: Option<(PathBuf, PathBuf)>,
}

impl ClickHouse {
    /// One server, no cluster.
    pub fn start(dir: &Path) -> Self {
        Self::start_with(dir, &ClickHouseOptions::default())
    }

    /// One server, with a password or HTTPS.
    pub fn start_with(dir: &Path, options: &ClickHouseOptions) -> Self {
        Self::launch(dir, 1, options).pop().expect("one server")
    }

    /// `n` servers, each one shard of the cluster `tcpkit`.
    pub fn cluster(dir: &Path, n: usize) -> Vec<Self> {
        Self::launch(dir, n, &ClickHouseOptions::default())
    }

    fn launch(dir: &Path, n: usize, options: &ClickHouseOptions) -> Vec<Self> {
        let ports: Vec<[u16; 3]> = (0..n)
            .map(|_| [free_port(), free_port(), free_port()])
            .collect();
        let shards: String = ports
            .iter()
            .map(|[_, tcp, _]| {
                format!(
                    "<shard><replica><host>127.0.0.1</host><port>{tcp}</port></replica></shard>"
                )
            })
            .collect();
        ports
            .iter()
            .enumerate()
            .map(|(i, &[http, tcp, interserver])| {
                let dir = dir.join(format!("clickhouse-{i}"));
                std::fs::create_dir_all(&dir).expect("clickhouse dir");
                let d = dir.display();
                let https_port = options.tls.as_ref().map(|_| free_port());
                let tls = match (&options.tls, https_port) {
                    (Some((cert, key)), Some(port)) => format!(
                        "<https_port>{port}</https_port><openSSL><server>\
                         <certificateFile>{}</certificateFile><privateKeyFile>{}</privateKeyFile>\
                         <verificationMode>none</verificationMode><loadDefaultCAFile>false</loadDefaultCAFile>\
                         <disableProtocols>sslv2,sslv3</disableProtocols></server></openSSL>",
                        cert.display(),
                        key.display()
                    ),
                    _ => String::new(),
                };
                let config = format!(
                    r#"<?xml version="1.0"?>
<yandex>
  <logger><level>warning</level><log>{d}/server.log</log><errorlog>{d}/error.log</errorlog><console>0</console></logger>
  <http_port>{http}</http_port>
  <tcp_port>{tcp}</tcp_port>
  <interserver_http_port>{interserver}</interserver_http_port>
  <listen_host>127.0.0.1</listen_host>
  <path>{d}/data/</path>
  <tmp_path>{d}/tmp/</tmp_path>
  <user_files_path>{d}/user_files/</user_files_path>
  <format_schema_path>{d}/format_schemas/</format_schema_path>
  <mark_cache_size>268435456</mark_cache_size>
  <uncompressed_cache_size>268435456</uncompressed_cache_size>
  <users_config>{d}/users.xml</users_config>
  <default_profile>default</default_profile>
  <default_database>default</default_database>
  <mlock_executable>false</mlock_executable>
  <remote_servers><tcpkit>{shards}</tcpkit></remote_servers>
  {tls}
</yandex>
"#
                );
                std::fs::write(dir.join("config.xml"), config).expect("clickhouse config");
                let users = format!(
                    r#"<?xml version="1.0"?>
<yandex>
  <profiles><default></default></profiles>
  <users><default><password>{}</password><networks><ip>127.0.0.1</ip></networks><profile>default</profile><quota>default</quota></default></users>
  <quotas><default></default></quotas>
</yandex>
"#,
                    options.password
                );
                std::fs::write(dir.join("users.xml"), users).expect("clickhouse users");
                let mut server = ClickHouse {
                    guard: None,
                    dir,
                    password: options.password.clone(),
                    http_port: http,
                    https_port,
                };
                server.resume();
                server
            })
            .collect()
    }

    /// Starts it (again, on the same data), and waits until it answers.
    pub fn resume(&mut self) {
        let log = std::fs::File::create(self.dir.join("stdout.log")).expect("clickhouse log");
        let child = Command::new(CLICKHOUSE_SERVER)
            .arg(format!(
                "--config-file={}",
                self.dir.join("config.xml").display()
            ))
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start clickhouse-server");
        self.guard = Some(Guard(child));
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.query("SELECT 1").is_none() {
            assert!(
                Instant::now() < deadline,
                "clickhouse-server did not start: see {}",
                self.dir.display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kills it (SIGKILL); [`ClickHouse::resume`] starts it again.
    pub fn kill(&mut self) {
        self.guard = None;
    }

    /// Its answer to `sql` over HTTP, or None when it cannot be reached or refuses.
    pub fn query(&self, sql: &str) -> Option<String> {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", self.http_port)).ok()?;
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .ok()?;
        write!(
            stream,
            "POST /?user=default&password={} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\n\r\n{sql}",
            self.password,
            sql.len()
        )
        .ok()?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).ok()?;
        let (head, body) = answer.split_once("\r\n\r\n")?;
        head.starts_with("HTTP/1.0 200")
            .then(|| body.to_string())
            .or_else(|| head.starts_with("HTTP/1.1 200").then(|| body.to_string()))
    }

    /// Its `host:port` for `--store`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.http_port)
    }
}

/// Runs `tcpkit-query --aggregator URL --json ARGS…` (through `prefix`) and parses its answer.
pub fn query_json(prefix: &[&str], url: &str, args: &[&str]) -> serde_json::Value {
    let mut command = command_in(prefix, &bin("tcpkit-query"));
    let out = command
        .args(["--aggregator", url, "--json"])
        .args(args)
        .output()
        .expect("run tcpkit-query");
    assert!(
        out.status.success(),
        "tcpkit-query {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("tcpkit-query prints JSON")
}

/// A network namespace of the test's own, deleted when dropped.
pub struct Netns(pub String);

impl Netns {
    /// Creates the namespace `name` with its loopback up.
    pub fn new(name: &str) -> Self {
        let _ = Command::new("ip")
            .args(["netns", "del", name])
            .stderr(Stdio::null())
            .status();
        sh(&format!(
            "ip netns add {name} && ip -n {name} link set lo up"
        ));
        Self(name.to_string())
    }

    /// The command prefix that runs a program inside it.
    pub fn prefix(&self) -> [&str; 4] {
        ["ip", "netns", "exec", &self.0]
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Runs a shell command, asserting that it succeeds.
pub fn sh(command: &str) {
    let status = Command::new("sh")
        .args(["-c", command])
        .status()
        .expect("run sh");
    assert!(status.success(), "`{command}` failed");
}

/// A command running `program`, through `prefix` when one is given (`ip netns exec NS`).
pub fn command_in(prefix: &[&str], program: &Path) -> Command {
    match prefix.split_first() {
        Some((wrapper, args)) => {
            let mut c = Command::new(wrapper);
            c.args(args).arg(program);
            c
        }
        None => Command::new(program),
    }
}

/// `GET path` from 127.0.0.1:`port`; the body, after checking for 200 OK.
pub fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut socket = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(socket, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").expect("request");
    let mut reply = String::new();
    socket.read_to_string(&mut reply).expect("reply");
    let (head, body) = reply.split_once("\r\n\r\n").expect("an HTTP reply");
    assert!(head.starts_with("HTTP/1.1 200 OK"), "GET {path}: {head}");
    body.to_owned()
}

/// The sum of every sample of the metric `name` whose labels contain all of `labels`
/// (`key="value"` pairs), on a Prometheus page.
pub fn metric_sum(page: &str, name: &str, labels: &[&str]) -> f64 {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let metric = series.split('{').next()?;
            (metric == name && labels.iter().all(|want| series.contains(want)))
                .then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// A live agent: `tcpkit` with the arguments `configure` adds and `-P <a free port>`,
/// stdout and stderr piped; returned once its stats port answers (the capture is running by
/// then), with that port. Killed when dropped.
pub fn start_live_agent(configure: impl FnOnce(&mut Command) -> &mut Command) -> (Guard, u16) {
    let stats_port = free_port();
    let mut command = Command::new(tcpkit_bin());
    configure(&mut command);
    let child = command
        .args(["-P", &stats_port.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tcpkit");
    let agent = Guard(child);
    assert!(
        wait_for_port(stats_port, Duration::from_secs(10)),
        "tcpkit did not start"
    );
    (agent, stats_port)
}

/// The agent's metrics page after one pipeline (connections of type `C`, every port of the
/// fixture in `mode`) has read the whole fixture `name`, in-process.
pub fn metrics_page<C: tcpkit::matcher::Connection>(
    name: &str,
    mode: tcpkit::modes::Mode,
) -> String {
    use tcpkit::pipeline::{Pipeline, PipelineConfig};
    use tcpkit::steps::capture::{Capture, CaptureConfig, Source};
    use tcpkit::steps::flow::{DirectionRule, FlowLimits};
    let e = Expected::of(name);
    let mut capture = Capture::open(&CaptureConfig {
        source: Source::File(fixture(&format!("{name}.pcap"))),
        filter: String::new(),
        prefilter: None,
        write_to: None,
        max_frames: None,
        max_duration: None,
    })
    .expect("the fixture opens");
    let mut pipeline = Pipeline::<C>::new(PipelineConfig {
        link: capture.link(),
        rule: DirectionRule::new(&[e.port], &[], &[]),
        ports: vec![(e.port, mode)],
        flow_limits: FlowLimits::default(),
        match_limits: Default::default(),
        threshold_ms: Some(1000.0),
    });
    while let Some(frame) = capture.next_frame().expect("the fixture reads") {
        pipeline.on_frame(&frame);
    }
    pipeline.finish();
    pipeline.metrics(None, None)
}

/// Replays `fixture` to the aggregator at `url` as `id` and waits until everything it
/// shipped is acknowledged; returns its stats JSON (port 26379 when it is the only one).
pub fn replay(fixture_name: &str, id: &str, url: &str, args: &[&str]) -> serde_json::Value {
    replay_file(&fixture(&format!("{fixture_name}.pcap")), id, url, args)
}

/// [`replay`] of any capture file.
pub fn replay_file(capture: &Path, id: &str, url: &str, args: &[&str]) -> serde_json::Value {
    let out = std::process::Command::new(tcpkit_bin())
        .arg("-r")
        .arg(capture)
        .args(["-m", "redis", "--summary", "json", "--aggregator", url])
        .args(["--agent-id", id, "--ship-timeout", "120"])
        .args(args)
        .output()
        .expect("run tcpkit");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "tcpkit failed: {stderr}");
    assert!(
        stderr.contains("0 batches (0 events) unacknowledged"),
        "{stderr}"
    );
    let stdout = String::from_utf8(out.stdout).expect("utf-8");
    serde_json::from_str(stdout.lines().last().expect("summary")).expect("JSON")
}
