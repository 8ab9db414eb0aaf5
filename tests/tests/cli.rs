//! Bad input: one clear line on stderr and a non-zero exit, before anything else happens.

use std::process::{Command, Output};

use tcpkit_tests::{have, is_root, requirement, tcpkit_bin};

fn tcpkit(args: &[&str]) -> Output {
    Command::new(tcpkit_bin())
        .args(args)
        .output()
        .expect("run tcpkit")
}

/// Asserts exit `code` and a single stderr line that contains `needle`.
fn refused(args: &[&str], code: i32, needle: &str) {
    let out = tcpkit(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{args:?}: {stderr}");
    assert_eq!(
        stderr.lines().count(),
        1,
        "{args:?}: one line expected, got {stderr}"
    );
    assert!(stderr.starts_with("tcpkit: "), "{args:?}: {stderr}");
    assert!(
        stderr.contains(needle),
        "{args:?}: {stderr:?} lacks {needle:?}"
    );
    assert!(
        out.stdout.is_empty(),
        "{args:?}: nothing on stdout expected"
    );
}

#[test]
fn argument_errors_exit_2() {
    refused(&[], 2, "--ports");
    refused(&["-p", "0"], 2, "0 is not a port in 1..=65535");
    refused(&["-p", "70000"], 2, "70000");
    refused(&["-p", "6379,x"], 2, "'x'");
    refused(
        &["-p", "6379", "-m", "http"],
        2,
        "possible values: raw, redis, memcached, dns",
    );
    refused(&["-p", "6379", "-s", "not-an-ip"], 2, "not-an-ip");
    refused(&["-p", "6379", "--bogus"], 2, "--bogus");
    refused(
        &["-p", "6379,6380", "-p", "6379"],
        2,
        "port 6379 is given twice",
    );
}

#[test]
fn unreadable_or_foreign_files_exit_1() {
    refused(
        &["-p", "6379", "-r", "/nonexistent/file.pcap"],
        1,
        "cannot read /nonexistent/file.pcap",
    );
    let dir = std::env::temp_dir().join(format!("tcpkit-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let text = dir.join("notes.txt");
    std::fs::write(&text, "this is not a capture\n").unwrap();
    refused(
        &["-p", "6379", "-r", text.to_str().unwrap()],
        1,
        "not a pcap or pcapng file",
    );
    // A capture cut in the middle of a record: what was read is reported, then the error.
    let fixture = tcpkit_tests::fixture("redis-pipelined-sll.pcap");
    let bytes = std::fs::read(fixture).unwrap();
    let cut = dir.join("cut.pcap");
    std::fs::write(&cut, &bytes[..bytes.len() - 10]).unwrap();
    let out = tcpkit(&[
        "-r",
        cut.to_str().unwrap(),
        "-p",
        "26379",
        "--summary",
        "text",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot read") && stderr.contains("truncated"),
        "{stderr}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("packets captured"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_filter_and_unwritable_outputs_exit_1() {
    let pcap = tcpkit_tests::fixture("redis-pipelined-sll.pcap");
    let pcap = pcap.to_str().unwrap();
    refused(
        &["-p", "6379", "-r", pcap, "port", "and", "and"],
        1,
        "bad filter expression",
    );
    refused(
        &["-p", "6379", "-r", pcap, "-w", "/nonexistent/dir/out.pcap"],
        1,
        "cannot write /nonexistent/dir/out.pcap",
    );
    refused(
        &["-p", "6379", "-r", pcap, "-o", "/nonexistent/dir/log"],
        1,
        "cannot open log file",
    );
}

#[test]
fn scripts_that_cannot_run_say_so() {
    let pcap = tcpkit_tests::fixture("redis-pipelined-sll.pcap");
    let pcap = pcap.to_str().unwrap();
    refused(
        &["-p", "6379", "-r", pcap, "-S", "/nonexistent/x.lua"],
        1,
        "cannot read script /nonexistent/x.lua",
    );
}

#[test]
fn live_capture_errors() {
    if !requirement(is_root(), "root (live capture)") {
        return;
    }
    refused(
        &["-p", "6379", "-i", "nosuch0", "-P", "0"],
        1,
        "no such interface: nosuch0",
    );
    if !requirement(have("setpriv"), "setpriv (util-linux) to drop privileges") {
        return;
    }
    // Without privileges: the same binary as user nobody.
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(tcpkit_bin())
        .args(["-p", "6379", "-i", "lo", "-P", "0"])
        .output()
        .expect("setpriv");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("run as root or grant CAP_NET_RAW"),
        "{stderr}"
    );
}

#[test]
fn help_and_version() {
    let help = tcpkit(&["--help"]);
    assert!(help.status.success());
    let text = String::from_utf8_lossy(&help.stdout);
    for flag in [
        "-s,", "-p,", "-P,", "-i,", "-d,", "-r,", "-t,", "-m,", "-w,", "-S,", "-B,", "-o,", "-u,",
        "-v,", "-h,",
    ] {
        assert!(text.contains(flag), "--help lacks {flag}");
    }
    let version = tcpkit(&["-v"]);
    assert!(version.status.success());
    assert!(String::from_utf8_lossy(&version.stdout).starts_with("tcpkit "));
}

#[test]
fn fleet_and_metrics_addresses_are_checked_at_start() {
    let pcap = tcpkit_tests::fixture("redis-multi.pcap");
    let pcap = pcap.to_str().expect("utf-8");
    for address in [
        "127.0.0.1:50051",
        "localhost",
        "ftp://127.0.0.1:50051",
        "http://127.0.0.1",
    ] {
        refused(
            &[
                "-r",
                pcap,
                "-p",
                "26379",
                "-m",
                "redis",
                "--aggregator",
                address,
            ],
            1,
            "like http://127.0.0.1:50051",
        );
    }
    for address in ["localhost:9100", ":9100", "9100"] {
        refused(
            &["-r", pcap, "-p", "26379", "--metrics-listen", address],
            2,
            "give an address like 127.0.0.1:33334",
        );
    }
    refused(
        &["-r", pcap, "-p", "26379", "--agent-id", "web\u{1b}[2J"],
        2,
        "no control characters",
    );
}

#[test]
fn an_agent_whose_batches_are_not_acknowledged_exits_3() {
    // Nothing listens there: every batch stays unacknowledged.
    let url = format!("http://127.0.0.1:{}", tcpkit_tests::free_port());
    let pcap = tcpkit_tests::fixture("redis-multi.pcap");
    let out = tcpkit(&[
        "-r",
        pcap.to_str().expect("utf-8"),
        "-p",
        "26379",
        "-m",
        "redis",
        "--summary",
        "none",
        "--aggregator",
        &url,
        "--ship-timeout",
        "1",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("not everything was acknowledged"),
        "{stderr}"
    );
}

#[test]
fn a_threshold_in_raw_mode_is_said_to_do_nothing() {
    let pcap = tcpkit_tests::fixture("redis-multi.pcap");
    let out = tcpkit(&[
        "-r",
        pcap.to_str().expect("utf-8"),
        "-p",
        "26379",
        "-t",
        "5",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("-t has no effect in raw mode"), "{stderr}");
}

#[test]
fn a_capture_from_stdin_or_cut_by_count_and_duration() {
    let pcap = tcpkit_tests::fixture("redis-multi.pcap");
    let args = ["-p", "26379", "-m", "redis", "--summary", "json"];
    let from_file = tcpkit(&[&["-r", pcap.to_str().expect("utf-8")][..], &args].concat());
    let from_stdin = Command::new(tcpkit_bin())
        .args(["-r", "-"])
        .args(args)
        .stdin(std::fs::File::open(&pcap).expect("fixture"))
        .output()
        .expect("run tcpkit");
    assert!(
        from_stdin.status.success(),
        "{}",
        String::from_utf8_lossy(&from_stdin.stderr)
    );
    assert_eq!(from_stdin.stdout, from_file.stdout);

    let counted = tcpkit(&[
        "-r",
        pcap.to_str().expect("utf-8"),
        "-p",
        "26379",
        "-c",
        "5",
    ]);
    let out = String::from_utf8_lossy(&counted.stdout);
    assert!(out.contains("\n5 packets captured\n"), "{out}");
    // Standard input is read by libpcap, in batches: the count still ends it exactly.
    let counted_stdin = Command::new(tcpkit_bin())
        .args(["-r", "-", "-p", "26379", "-c", "5"])
        .stdin(std::fs::File::open(&pcap).expect("fixture"))
        .output()
        .expect("run tcpkit");
    let out = String::from_utf8_lossy(&counted_stdin.stdout);
    assert!(out.contains("\n5 packets captured\n"), "{out}");
    refused(&["-r", "x.pcap", "-p", "26379", "-c", "0"], 2, "--count");

    if requirement(is_root(), "root (live capture on lo)") {
        let started = std::time::Instant::now();
        let port = tcpkit_tests::free_port().to_string();
        let live = tcpkit(&["-i", "lo", "-p", &port, "-P", "0", "--duration", "1"]);
        let stderr = String::from_utf8_lossy(&live.stderr);
        assert!(live.status.success(), "{stderr}");
        let took = started.elapsed();
        assert!(took >= std::time::Duration::from_secs(1), "{took:?}");
        assert!(took < std::time::Duration::from_secs(10), "{took:?}");
        assert!(String::from_utf8_lossy(&live.stdout).contains("packets captured"));
    }
}
