//! Lua scripts (`-S`) on the golden captures: the shipped example, and a C-era script that
//! uses `bit32` and `finish()`.

use std::process::Command;

use tcpkit_tests::{fixture, tcpkit_bin, Expected};

fn run_script(name: &str, script: &std::path::Path) -> (String, String) {
    run_script_in(name, &["-m", "raw"], script)
}

/// Runs `script` on a fixture in redis mode, pairing everything and printing no slow line.
fn run_redis_script(name: &str, script: &std::path::Path) -> String {
    run_script_in(name, &["-m", "redis", "-t", "100000"], script).0
}

/// Runs `script` on a fixture with the `mode` arguments: its stdout and stderr.
fn run_script_in(name: &str, mode: &[&str], script: &std::path::Path) -> (String, String) {
    let e = Expected::of(name);
    let out = Command::new(tcpkit_bin())
        .args(["-r", fixture(&format!("{name}.pcap")).to_str().unwrap()])
        .args(["-p", &e.port.to_string()])
        .args(mode)
        .args(["--summary", "none", "-S"])
        .arg(script)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

fn repo_file(path: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
}

#[test]
fn example_lua_prints_every_payload_packet() {
    let name = "redis-pipelined-sll";
    let (out, _) = run_script(name, &repo_file("scripts/example.lua"));
    assert_eq!(
        out.lines().count() as u64,
        Expected::of(name).payload_packets
    );
    assert!(out
        .lines()
        .all(|l| l.contains(" REQ ") || l.contains(" RSP ")));
}

#[test]
fn a_c_era_script_with_bit32_runs_unchanged() {
    let dir = std::env::temp_dir().join(format!("tcpkit-lua-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let script = dir.join("syns.lua");
    std::fs::write(
        &script,
        r#"
local syns, acks = 0, 0
function process(item)
    if item.flags == nil then return end
    if bit32.band(item.flags, 2) ~= 0 and bit32.band(item.flags, 16) == 0 then syns = syns + 1 end
    if bit32.rshift(bit32.band(item.flags, 0x10), 4) == 1 then acks = acks + 1 end
end
function finish()
    print("syn " .. syns .. " ack " .. acks .. " shifted " .. bit32.lshift(1, 4))
end
"#,
    )
    .unwrap();
    let name = "redis-multi";
    let e = Expected::of(name);
    let (out, _) = run_script(name, &script);
    let last = out.lines().last().unwrap();
    assert!(
        last.starts_with(&format!("syn {} ack ", e.connections)),
        "{last}"
    );
    assert!(last.ends_with(" shifted 16"), "{last}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_scripts_stop_before_capture_with_one_line() {
    let dir = std::env::temp_dir().join(format!("tcpkit-lua-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (file, source, needle) in [
        ("syntax.lua", "function process(p", "syntax.lua"),
        (
            "noprocess.lua",
            "x = 1",
            "defines no process(packet) function",
        ),
    ] {
        let path = dir.join(file);
        std::fs::write(&path, source).unwrap();
        let out = Command::new(tcpkit_bin())
            .args([
                "-r",
                fixture("redis-multi.pcap").to_str().unwrap(),
                "-p",
                "26379",
                "-S",
            ])
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains(needle) && stderr.lines().count() == 1,
            "{stderr}"
        );
        assert!(out.stdout.is_empty());
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_script_that_errors_on_every_packet_is_counted_not_fatal() {
    let dir = std::env::temp_dir().join(format!("tcpkit-lua-err-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("boom.lua");
    std::fs::write(&path, "function process(p) error('boom') end").unwrap();
    let name = "redis-multi";
    let out = Command::new(tcpkit_bin())
        .args([
            "-r",
            fixture(&format!("{name}.pcap")).to_str().unwrap(),
            "-p",
            "26379",
            "-S",
        ])
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let want = format!(
        "script: {} callback errors (0 over",
        Expected::of(name).packets
    );
    assert!(stdout.contains(&want), "{stdout}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("boom.lua:1: boom"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn dns_lua_records_latency_into_the_stats() {
    let name = "dns-udp";
    let e = Expected::of(name);
    let out = Command::new(tcpkit_bin())
        .args(["-r", fixture(&format!("{name}.pcap")).to_str().unwrap()])
        .args(["-p", &e.port.to_string(), "-u", "-m", "raw", "-t", "100000"])
        .args(["--summary", "json", "-S"])
        .arg(repo_file("scripts/dns.lua"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let json: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let stats = &json[0][e.port.to_string()];
    assert_eq!(
        stats["total_reqs"],
        e.extra("exchanges").unwrap(),
        "{stats}"
    );
    assert_eq!(
        stats["commands"]["QUERY"]["total_reqs"],
        e.extra("exchanges").unwrap()
    );
    let want = format!(
        "dns.lua: {} queries unanswered",
        e.extra("timeouts").unwrap()
    );
    assert!(stdout.contains(&want), "{stdout}");
}

#[test]
fn on_exchange_sees_every_paired_request() {
    let dir = std::env::temp_dir().join(format!("tcpkit-lua-ex-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let script = dir.join("exchanges.lua");
    std::fs::write(
        &script,
        r#"
local n, slow = 0, 0
function on_exchange(e)
    n = n + 1
    if e.latency_us >= 20000 and e.proto == "redis" and e.command == "DEBUG" then slow = slow + 1 end
end
function finish() tcpkit.log("exchanges", n, "slow", slow) end
"#,
    )
    .unwrap();
    let name = "redis-slow";
    let e = Expected::of(name);
    let stdout = run_redis_script(name, &script);
    let want = format!(
        "exchanges {} slow {}",
        e.exchanges(),
        e.extra("slow_20ms").unwrap()
    );
    assert!(stdout.contains(&want), "{stdout}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn tcp_connect_lua_times_every_connection() {
    let name = "redis-benchmark-lo";
    let e = Expected::of(name);
    let (out, _) = run_script(name, &repo_file("scripts/tcp-connect.lua"));
    let last = out.lines().last().unwrap();
    assert!(
        last.starts_with(&format!("connections {}, avg ", e.connections)),
        "{last}"
    );
    assert!(last.ends_with("SYN retransmissions 0"), "{last}");
    let per_connection = out.lines().filter(|l| l.contains(" connect ")).count() as u64;
    assert_eq!(per_connection, e.connections);
}

#[test]
fn top_keys_lua_ranks_keys_from_exchanges() {
    let name = "redis-benchmark-lo";
    let e = Expected::of(name);
    let stdout = run_redis_script(name, &repo_file("scripts/top-keys.lua"));
    // LPUSH and LPOP on one list, SET and GET on one key pattern: each 2 x 2000 requests.
    let list = e.commands["LPUSH"] + e.commands["LPOP"];
    assert!(stdout.contains(&format!("{list:>8}  mylist")), "{stdout}");
    assert!(stdout.starts_with("top keys by requests:"), "{stdout}");
}

#[test]
fn the_packet_table_on_a_crafted_capture_field_by_field() {
    use etherparse::PacketBuilder;
    use pcap::{Capture, Linktype, Packet, PacketHeader};
    let dir = std::env::temp_dir().join(format!("tcpkit-lua-fields-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pcap_path = dir.join("crafted.pcap");
    let mut tcp = Vec::new();
    PacketBuilder::ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
        .tcp(40000, 6379, 1000, 512)
        .ack(77)
        .psh()
        .write(&mut tcp, b"PING\r\n")
        .unwrap();
    let mut udp = Vec::new();
    PacketBuilder::ipv4([10, 0, 0, 2], [10, 0, 0, 1], 64)
        .udp(5300, 40001)
        .write(&mut udp, b"x\x00y")
        .unwrap();
    let dead = Capture::dead(Linktype(12)).unwrap(); // DLT_RAW: bare IP
    let mut out = dead.savefile(&pcap_path).unwrap();
    for (i, data) in [tcp, udp].iter().enumerate() {
        let header = PacketHeader {
            ts: libc::timeval {
                tv_sec: 1_700_000_000 + i as i64,
                tv_usec: 250_000,
            },
            caplen: data.len() as u32,
            len: data.len() as u32,
        };
        out.write(&Packet::new(&header, data));
    }
    out.flush().unwrap();
    drop(out);
    let script = dir.join("fields.lua");
    std::fs::write(
        &script,
        r#"
function process(p)
  print(p.tv_sec, p.tv_usec, p.sip, p.sport, p.dip, p.dport, tostring(p.seq), tostring(p.ack),
        tostring(p.flags), tostring(p.request),
        (p.payload:gsub(".", function(c) return string.format("%02x", c:byte()) end)), p.size)
end
"#,
    )
    .unwrap();
    let output = Command::new(tcpkit_bin())
        .args([
            "-r",
            pcap_path.to_str().unwrap(),
            "-p",
            "6379,5300/udp",
            "-m",
            "raw",
            "--summary",
            "none",
        ])
        .arg("-S")
        .arg(&script)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout).unwrap();
    let lines: Vec<Vec<&str>> = stdout.lines().map(|l| l.split('\t').collect()).collect();
    assert_eq!(
        lines[0],
        [
            "1700000000",
            "250000",
            "10.0.0.1",
            "40000",
            "10.0.0.2",
            "6379",
            "1000",
            "77",
            "24",
            "true",
            "50494e470d0a",
            "6"
        ]
    );
    assert_eq!(
        lines[1],
        [
            "1700000001",
            "250000",
            "10.0.0.2",
            "5300",
            "10.0.0.1",
            "40001",
            "nil",
            "nil",
            "nil",
            "false",
            "780079",
            "3"
        ]
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_script_past_its_memory_limit_stops_and_capture_goes_on() {
    let dir = std::env::temp_dir().join(format!("tcpkit-lua-mem-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let script = dir.join("hoard.lua");
    std::fs::write(
        &script,
        "kept = {}\nfunction process(p)\n  for i = 1, 1e9 do kept[#kept + 1] = p.payload .. i end\nend\n",
    )
    .unwrap();
    let name = "redis-multi";
    let e = Expected::of(name);
    let out = Command::new(tcpkit_bin())
        .args(["-r", fixture(&format!("{name}.pcap")).to_str().unwrap()])
        .args([
            "-p",
            &e.port.to_string(),
            "-m",
            "raw",
            "--script-memory",
            "8",
            "-S",
        ])
        .arg(&script)
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("hoard.lua stopped: memory limit of 8 MiB reached")
            && stderr.contains("capture goes on"),
        "{stderr}"
    );
    assert!(
        stdout.contains(&format!("{} packets captured", e.packets)),
        "{stdout}"
    );
    assert!(
        stdout.contains("script: 1 callback errors (0 over the instruction budget); stopped at its memory limit"),
        "{stdout}"
    );
}

#[test]
fn script_limits_are_checked_on_the_command_line() {
    for bad in ["0", "-1", "lots", "70000"] {
        let out = Command::new(tcpkit_bin())
            .args(["-r", "x.pcap", "-p", "6379", "-S", "x.lua"])
            .arg(format!("--script-memory={bad}"))
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "--script-memory {bad}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("--script-memory"));
    }
}
