//! Who may talk to the aggregator: the shared token (checked on every call, refusals logged
//! and counted) and mutual TLS with certificates made here (rcgen), end to end with the real
//! binaries; and the Prometheus page of the aggregator after a real agent shipped to it.

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use tcpkit_tests::*;

/// Certificate and key files.
struct Pair {
    cert: PathBuf,
    key: PathBuf,
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by it;
/// and a client certificate from another CA.
struct Pki {
    ca: PathBuf,
    server: Pair,
    client: Pair,
    stranger: Pair,
}

fn ca(name: &str) -> (CertificateParams, KeyPair, String) {
    let key = KeyPair::generate().expect("CA key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let pem = params.self_signed(&key).expect("CA certificate").pem();
    (params, key, pem)
}

fn leaf(dir: &Path, name: &str, sans: &[&str], issuer: &Issuer<'_, KeyPair>) -> Pair {
    let key = KeyPair::generate().expect("key");
    let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
    let mut params = CertificateParams::new(sans).expect("params");
    params.distinguished_name.push(DnType::CommonName, name);
    let cert = params.signed_by(&key, issuer).expect("certificate");
    let pair = Pair {
        cert: dir.join(format!("{name}.crt")),
        key: dir.join(format!("{name}.key")),
    };
    std::fs::write(&pair.cert, cert.pem()).expect("write certificate");
    std::fs::write(&pair.key, key.serialize_pem()).expect("write key");
    pair
}

fn pki(dir: &Path) -> Pki {
    let (params, key, pem) = ca("tcpkit test CA");
    let ca_path = dir.join("ca.crt");
    std::fs::write(&ca_path, pem).expect("write CA");
    let issuer = Issuer::new(params, key);
    let (other_params, other_key, _) = ca("another CA");
    let other = Issuer::new(other_params, other_key);
    Pki {
        ca: ca_path,
        server: leaf(dir, "aggregator", &["127.0.0.1", "localhost"], &issuer),
        client: leaf(dir, "agent", &["agent.example"], &issuer),
        stranger: leaf(dir, "stranger", &["stranger.example"], &other),
    }
}

fn path(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

fn query(url: &str, security: &[&str], args: &[&str]) -> Output {
    std::process::Command::new(bin("tcpkit-query"))
        .args(["--aggregator", url, "--json"])
        .args(security)
        .args(args)
        .output()
        .expect("run tcpkit-query")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// An aggregator on `port` that wants the token in `token` and mutual TLS with `pki`'s
/// server certificate and CA, with more arguments.
fn secured_aggregator(
    dir: &Path,
    port: u16,
    pki: &Pki,
    token: &Path,
    extra: &[&str],
) -> Aggregator {
    let mut args = vec![
        "--token-file",
        path(token),
        "--tls-cert",
        path(&pki.server.cert),
        "--tls-key",
        path(&pki.server.key),
        "--tls-client-ca",
        path(&pki.ca),
    ];
    args.extend_from_slice(extra);
    Aggregator::start(dir, port, &[], &args)
}

#[test]
fn token_and_mutual_tls_guard_every_call() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = pki(dir.path());
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret-Token_42\n").expect("token");
    let wrong = dir.path().join("wrong-token");
    std::fs::write(&wrong, "s3cret-Token_43\n").expect("token");
    let (port, metrics_port) = (free_port(), free_port());
    let metrics_listen = format!("127.0.0.1:{metrics_port}");
    let aggregator = secured_aggregator(
        dir.path(),
        port,
        &pki,
        &token,
        &["--metrics-listen", &metrics_listen],
    );
    let url = format!("https://127.0.0.1:{port}");
    let tls = [
        "--tls-ca",
        path(&pki.ca),
        "--tls-cert",
        path(&pki.client.cert),
        "--tls-key",
        path(&pki.client.key),
    ];
    let good: Vec<&str> = [&["--token-file", path(&token)][..], &tls].concat();

    let ok = query(&url, &good, &["agents"]);
    assert!(ok.status.success(), "{}", stderr(&ok));

    // Refused by the token check: no token, a wrong token.
    let no_token = query(&url, &tls, &["agents"]);
    assert!(!no_token.status.success());
    assert!(
        stderr(&no_token).contains("refused: no token"),
        "{}",
        stderr(&no_token)
    );
    let wrong_token: Vec<&str> = [&["--token-file", path(&wrong)][..], &tls].concat();
    let refused = query(&url, &wrong_token, &["agents"]);
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("refused: a wrong token"),
        "{}",
        stderr(&refused)
    );

    // Refused by TLS: no client certificate, one from another CA, plain HTTP, no CA.
    let no_cert = query(
        &url,
        &["--token-file", path(&token), "--tls-ca", path(&pki.ca)],
        &["agents"],
    );
    assert!(
        !no_cert.status.success(),
        "a client without a certificate got in"
    );
    let stranger = query(
        &url,
        &[
            "--token-file",
            path(&token),
            "--tls-ca",
            path(&pki.ca),
            "--tls-cert",
            path(&pki.stranger.cert),
            "--tls-key",
            path(&pki.stranger.key),
        ],
        &["agents"],
    );
    assert!(
        !stranger.status.success(),
        "a certificate of another CA got in"
    );
    let plain = query(
        &aggregator.url(),
        &["--token-file", path(&token)],
        &["agents"],
    );
    assert!(
        !plain.status.success(),
        "plain HTTP/2 got an answer from a TLS port"
    );
    let no_ca = query(&url, &["--token-file", path(&token)], &["agents"]);
    assert!(
        stderr(&no_ca).contains("needs --tls-ca"),
        "{}",
        stderr(&no_ca)
    );

    // A real agent ships over mutual TLS with the token; one with a wrong token is refused.
    let fixture_name = "redis-benchmark-lo";
    let expected = Expected::of(fixture_name);
    let agent = |security: &[&str], id: &str| {
        std::process::Command::new(tcpkit_bin())
            .arg("-r")
            .arg(fixture(&format!("{fixture_name}.pcap")))
            .args([
                "-p",
                &expected.port.to_string(),
                "-m",
                "redis",
                "-t",
                "1000",
                "--summary",
                "none",
            ])
            .args([
                "--aggregator",
                &url,
                "--agent-id",
                id,
                "--ship-timeout",
                "3",
            ])
            .args(security)
            .stdout(Stdio::null())
            .output()
            .expect("run tcpkit")
    };
    let shipped = agent(&good, "trusted");
    assert!(shipped.status.success(), "{}", stderr(&shipped));
    assert!(
        stderr(&shipped).contains(" 0 batches (0 events) unacknowledged"),
        "{}",
        stderr(&shipped)
    );
    let intruder = agent(&wrong_token, "intruder");
    // Nothing it captured was accepted: the exit status says so.
    assert_eq!(intruder.status.code(), Some(3), "{}", stderr(&intruder));
    assert!(
        stderr(&intruder).contains("refused: a wrong token"),
        "{}",
        stderr(&intruder)
    );
    assert!(
        stderr(&intruder).contains("shipped 0 batches"),
        "{}",
        stderr(&intruder)
    );

    let agents = query(&url, &good, &["agents"]);
    let agents: serde_json::Value = serde_json::from_slice(&agents.stdout).expect("JSON");
    let ids: Vec<&str> = agents
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|a| a["id"].as_str())
        .collect();
    assert_eq!(ids, ["trusted"], "{agents}");

    // The refusals are logged and counted; the fleet view holds what the agent shipped.
    let log = std::fs::read_to_string(dir.path().join("aggregator.log")).expect("log");
    assert!(log.contains("refused a call from 127.0.0.1"), "{log}");
    let page = http_get(metrics_port, "/metrics");
    let refusals = metric_sum(&page, "tcpkit_aggregator_refused_calls_total", &[]);
    assert!(refusals >= 3.0, "{refusals} refusals counted\n{page}");
    let count = metric_sum(
        &page,
        "tcpkit_fleet_request_duration_seconds_count",
        &["proto=\"redis\""],
    );
    assert_eq!(count as u64, expected.exchanges(), "{page}");
    let le_inf = metric_sum(
        &page,
        "tcpkit_fleet_request_duration_seconds_bucket",
        &["le=\"+Inf\""],
    );
    assert_eq!(le_inf, count);
    // The agents' fine buckets: 10 µs doubling, as on an agent's own page.
    let under_10us = metric_sum(
        &page,
        "tcpkit_fleet_request_duration_seconds_bucket",
        &["le=\"0.00001\""],
    );
    assert!(
        under_10us <= count && page.contains("le=\"20.97152\""),
        "{page}"
    );
}

/// The web page and its API over the gRPC listener's mutual TLS, with the token: a client
/// of the CA with the token gets the API; without a client certificate, with one of another
/// CA, or over plain HTTP, nothing.
#[test]
fn the_web_page_takes_the_same_tls_and_token() {
    if !requirement(have("curl"), "curl") {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = pki(dir.path());
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret-Token_42\n").expect("token");
    let http = free_port();
    let _aggregator = secured_aggregator(
        dir.path(),
        free_port(),
        &pki,
        &token,
        &["--http-listen", &format!("127.0.0.1:{http}")],
    );
    let curl = |scheme: &str, client: Option<&Pair>, auth: bool| {
        let mut c = std::process::Command::new("curl");
        c.args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "10",
        ])
        .args(["--cacert", path(&pki.ca)]);
        if let Some(pair) = client {
            c.args(["--cert", path(&pair.cert), "--key", path(&pair.key)]);
        }
        if auth {
            c.args(["-H", "Authorization: Bearer s3cret-Token_42"]);
        }
        let out = c
            .arg(format!("{scheme}://127.0.0.1:{http}/api/v1/agents"))
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(curl("https", Some(&pki.client), true), "200");
    assert_eq!(curl("https", Some(&pki.client), false), "401");
    assert_eq!(
        curl("https", None, true),
        "000",
        "no client certificate got in"
    );
    assert_eq!(
        curl("https", Some(&pki.stranger), true),
        "000",
        "another CA got in"
    );
    assert_eq!(
        curl("http", Some(&pki.client), true),
        "000",
        "plain HTTP got in"
    );
}
