//! `deploy/grafana/`: the dashboard and the alert rules name only metrics and labels the
//! binaries export (checked against real scrapes of a live agent capturing a real
//! `redis-server` and shipping to a real aggregator), their PromQL parses (`promtool`), and
//! the alerts fire on what they should (`promtool test rules`).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use tcpkit_tests::*;

fn grafana(file: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/grafana")
        .join(file)
}

/// What a scrape says exists: metric names (a histogram's `_bucket`, `_sum`, `_count` too)
/// and label names.
#[derive(Default)]
struct Exported {
    metrics: BTreeSet<String>,
    labels: BTreeSet<String>,
}

impl Exported {
    fn add(&mut self, page: &str) {
        for line in page.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut parts = rest.split_whitespace();
                let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                    continue;
                };
                self.metrics.insert(name.to_string());
                if kind == "histogram" {
                    for suffix in ["_bucket", "_sum", "_count"] {
                        self.metrics.insert(format!("{name}{suffix}"));
                    }
                }
            } else if let Some((_, labels)) = line.split_once('{') {
                for pair in labels.split(',') {
                    if let Some((name, _)) = pair.split_once('=') {
                        self.labels.insert(name.trim().to_string());
                    }
                }
            }
        }
    }
}

/// Grafana's variables as values PromQL takes.
fn substituted(expr: &str) -> String {
    expr.replace("$__rate_interval", "5m")
        .replace("$instance", ".*")
        .replace("$port", ".*")
        .replace("$command", ".*")
}

/// The identifiers of a PromQL expression outside strings (metric and label names,
/// functions, keywords), each with the text after it.
fn identifiers(expr: &str) -> Vec<(&str, &str)> {
    let mut out = Vec::new();
    let mut in_string = false;
    let mut start = None;
    let mut escaped = false;
    for (i, c) in expr.char_indices() {
        if in_string {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
            continue;
        }
        if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
            start.get_or_insert(i);
            continue;
        }
        if let Some(s) = start.take() {
            out.push((&expr[s..i], &expr[i..]));
        }
        in_string = c == '"';
    }
    if let Some(s) = start {
        out.push((&expr[s..], ""));
    }
    out
}

/// The metric names an expression reads, and the label names it groups or selects by.
fn names(expr: &str) -> (Vec<String>, Vec<String>) {
    let (mut metrics, mut labels) = (Vec::new(), Vec::new());
    // Words in `by (...)` / `without (...)`, and words a matcher follows, are labels.
    let mut grouping = false;
    for (word, rest) in identifiers(expr) {
        let rest = rest.trim_start();
        let matcher = ["=~", "!~", "!=", "="].iter().any(|op| {
            rest.strip_prefix(op)
                .is_some_and(|value| value.trim_start().starts_with('"'))
        });
        if word.starts_with(|c: char| c.is_ascii_digit()) {
            continue; // a number or a duration
        }
        if word == "by" || word == "without" {
            grouping = true;
        } else if grouping {
            grouping = !rest.starts_with(')');
            labels.push(word.to_string());
        } else if matcher {
            labels.push(word.to_string());
        } else if word.starts_with("tcpkit_") || word.starts_with("process_") || word == "up" {
            metrics.push(word.to_string());
        }
    }
    (metrics, labels)
}

/// Every PromQL expression of the dashboard: panels' targets and variables' queries.
fn dashboard_exprs(dashboard: &Value) -> Vec<String> {
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            exprs.push(target["expr"].as_str().expect("expr").to_string());
        }
    }
    for var in dashboard["templating"]["list"]
        .as_array()
        .expect("variables")
    {
        if let Some(q) = var["query"]["query"].as_str() {
            // label_values(SELECTOR, label): the selector is PromQL.
            let inner = q
                .strip_prefix("label_values(")
                .and_then(|r| r.rsplit_once(','))
                .map(|(selector, _)| selector.to_string())
                .unwrap_or_else(|| panic!("variable query {q}"));
            exprs.push(inner);
        }
    }
    exprs
}

/// The alert rules' expressions.
fn alert_exprs() -> Vec<String> {
    let text = std::fs::read_to_string(grafana("alerts.yaml")).expect("alerts.yaml");
    let rules: serde_yaml::Value = serde_yaml::from_str(&text).expect("alerts.yaml parses");
    rules["groups"]
        .as_sequence()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_sequence().expect("rules").clone())
        .map(|r| r["expr"].as_str().expect("expr").to_string())
        .collect()
}

fn promtool(args: &[&str]) {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(grafana(""))
        .output()
        .expect("promtool");
    assert!(
        out.status.success(),
        "promtool {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn promql_of_the_dashboard_is_read_the_right_way() {
    let (metrics, labels) = names(
        "histogram_quantile(0.99, sum by (le, command) (rate(tcpkit_request_duration_seconds_bucket{instance=~\".*\",port=~\"6379\"}[5m])))",
    );
    assert_eq!(metrics, ["tcpkit_request_duration_seconds_bucket"]);
    assert_eq!(labels, ["le", "command", "instance", "port"]);
    let (metrics, labels) = names("up{job=\"tcpkit-agent\"} == 0");
    assert_eq!(
        (metrics, labels),
        (vec!["up".to_string()], vec!["job".to_string()])
    );
}

/// The dashboard's and the alerts' metrics and labels, against what a live agent and an
/// aggregator serve; every expression through promtool's parser.
#[test]
fn the_dashboard_and_alerts_name_what_the_binaries_export() {
    if !requirement(is_root(), "root (live capture)")
        || !requirement(have("redis-server"), "redis-server")
        || !requirement(have("redis-benchmark"), "redis-benchmark (redis-tools)")
        || !requirement(have("promtool"), "promtool (Debian's prometheus)")
    {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let (_redis, redis_port) = start_redis();
    let (agent_metrics, aggregator_metrics) = (free_port(), free_port());
    let aggregator = Aggregator::start(
        dir.path(),
        free_port(),
        &[],
        &[
            "--metrics-listen",
            &format!("127.0.0.1:{aggregator_metrics}"),
        ],
    );
    let (_agent, _) = start_live_agent(|c| {
        // A threshold no request reaches: nothing fills the stdout pipe nobody reads.
        c.args([
            "-i",
            "lo",
            "-m",
            "redis",
            "-t",
            "1000",
            "-p",
            &redis_port.to_string(),
        ])
        .args(["--metrics-listen", &format!("127.0.0.1:{agent_metrics}")])
        .args(["--aggregator", &aggregator.url()])
    });
    let bench = Command::new("redis-benchmark")
        .args([
            "-p",
            &redis_port.to_string(),
            "-n",
            "2000",
            "-t",
            "get,set",
            "-q",
        ])
        .output()
        .expect("redis-benchmark");
    assert!(bench.status.success());
    // Until the fleet's latency reached the aggregator.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (agent_page, aggregator_page) = loop {
        let pages = (
            http_get(agent_metrics, "/metrics"),
            http_get(aggregator_metrics, "/metrics"),
        );
        let shipped = metric_sum(&pages.1, "tcpkit_fleet_request_duration_seconds_count", &[]);
        if shipped >= 4000.0 || Instant::now() > deadline {
            break pages;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let mut exported = Exported::default();
    exported.add(&agent_page);
    exported.add(&aggregator_page);
    assert!(
        exported.labels.contains("command"),
        "no request series scraped: {}",
        agent_page
            .lines()
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // Prometheus adds these to every series it scrapes; `up` is its own.
    exported.metrics.insert("up".into());
    exported
        .labels
        .extend(["instance", "job", "le"].map(String::from));

    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(grafana("tcpkit.json")).expect("tcpkit.json"),
    )
    .expect("tcpkit.json parses");
    let exprs: Vec<String> = dashboard_exprs(&dashboard)
        .into_iter()
        .chain(alert_exprs())
        .map(|e| substituted(&e))
        .collect();
    let mut read = BTreeSet::new();
    for expr in &exprs {
        let (metrics, labels) = names(expr);
        assert!(!metrics.is_empty(), "no metric in {expr}");
        for m in metrics {
            assert!(
                exported.metrics.contains(&m),
                "{m} is not exported ({expr})"
            );
            read.insert(m);
        }
        for l in labels {
            assert!(
                exported.labels.contains(&l),
                "no series has label {l} ({expr})"
            );
        }
    }
    // What the issue asks the dashboard to show.
    for m in [
        "tcpkit_request_duration_seconds_bucket",
        "tcpkit_request_errors_total",
        "tcpkit_request_timeouts_total",
        "tcpkit_kernel_dropped_packets_total",
        "tcpkit_desyncs_total",
        "tcpkit_tcp_gaps_total",
        "tcpkit_requests_untimed_total",
        "tcpkit_shipper_dropped_total",
        "tcpkit_shipper_connected",
        "tcpkit_aggregator_store_failures_total",
    ] {
        assert!(read.contains(m), "nothing reads {m}");
    }
    let heatmap = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .find(|p| p["type"] == "heatmap")
        .expect("a heatmap panel");
    assert_eq!(heatmap["targets"][0]["format"], "heatmap");
    assert!(heatmap["targets"][0]["expr"]
        .as_str()
        .is_some_and(|e| e.contains("tcpkit_request_duration_seconds_bucket")));

    // Every expression parses: as recording rules for promtool.
    let rules = dir.path().join("dashboard-rules.yaml");
    let list: Vec<serde_yaml::Value> = exprs
        .iter()
        .enumerate()
        .map(|(i, e)| {
            serde_yaml::to_value(std::collections::BTreeMap::from([
                ("record", format!("tcpkit:dashboard_{i}")),
                ("expr", e.clone()),
            ]))
            .expect("rule")
        })
        .collect();
    let doc = serde_yaml::to_string(&serde_json::json!({
        "groups": [{"name": "dashboard", "rules": list}]
    }))
    .expect("yaml");
    std::fs::write(&rules, doc).expect("rules file");
    promtool(&["check", "rules", rules.to_str().expect("path")]);
}

/// The alert rules and the example scrape config check, and every alert fires on the series
/// that should fire it and not on the others.
#[test]
fn the_alert_rules_check_and_fire_when_they_should() {
    if !requirement(have("promtool"), "promtool (Debian's prometheus)") {
        return;
    }
    promtool(&["check", "rules", "alerts.yaml"]);
    promtool(&["check", "config", "prometheus.yml"]);
    promtool(&["test", "rules", "alerts.test.yaml"]);
    // Each alert has a test.
    let tests = std::fs::read_to_string(grafana("alerts.test.yaml")).expect("tests");
    let text = std::fs::read_to_string(grafana("alerts.yaml")).expect("alerts.yaml");
    for alert in text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
    {
        assert!(
            tests.contains(&format!("alertname: {alert}")),
            "{alert} is not tested"
        );
    }
}
