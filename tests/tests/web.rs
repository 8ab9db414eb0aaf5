//! The aggregator's web page in a real headless Chromium, against a real aggregator filled by
//! agents replaying fixtures; and its JSON API against `tcpkit-query --json`.

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;
use tcpkit_tests::*;

/// The range every fixture lies in.
const RANGE: [(&str, &str); 2] = [("from", "2026-01-01"), ("to", "2027-01-01")];

/// `GET path` on 127.0.0.1:`port`, with a bearer token if given: the status and the body.
fn get(port: u16, path: &str, token: Option<&str>) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n"
    )
    .expect("send");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read");
    let (head, body) = text.split_once("\r\n\r\n").expect("a response");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status");
    (status, body.to_string())
}

fn api(port: u16, call: &str, params: &[(&str, &str)]) -> Value {
    let query: Vec<String> = params
        .iter()
        .map(|(k, v)| format!("{k}={}", v.replace(' ', "%20")))
        .collect();
    let (status, body) = get(port, &format!("/api/v1/{call}?{}", query.join("&")), None);
    assert_eq!(status, 200, "{call}: {body}");
    serde_json::from_str(&body).expect("JSON")
}

fn chromium(args: &[&str]) -> String {
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
        ])
        .args(["--virtual-time-budget=10000", "--window-size=1200,1400"])
        .args(args)
        .output()
        .expect("chromium");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The page's address with the fixtures' range.
fn page(port: u16) -> String {
    format!("http://127.0.0.1:{port}/?from=2026-01-01&to=2027-01-01")
}

/// An attribute of the element with `id` in a dumped DOM.
fn attribute(dom: &str, id: &str, name: &str) -> Option<String> {
    let at = dom.find(&format!("id=\"{id}\""))?;
    let tag = &dom[dom[..at].rfind('<')?..at + dom[at..].find('>')?];
    let value = tag.split(&format!("{name}=\"")).nth(1)?;
    Some(value[..value.find('"')?].to_string())
}

/// The rows of the table with `id`, as the texts of their cells.
fn rows(dom: &str, id: &str) -> Vec<Vec<String>> {
    let Some(at) = dom.find(&format!("<table id=\"{id}\"")) else {
        return Vec::new();
    };
    let table = &dom[at..at + dom[at..].find("</table>").expect("a whole table")];
    table
        .split("<tr")
        .skip(2) // before the first row, the header
        .map(|row| {
            row.split("<td")
                .skip(1)
                .map(|cell| {
                    let text = &cell[cell.find('>').expect("cell") + 1..];
                    text[..text.find("</td>").expect("cell end")].to_string()
                })
                .collect()
        })
        .collect()
}

/// An aggregator serving its page on a port of its own, filled by four agents: a1
/// replaying redis-benchmark-lo (threshold 1 s: no slow event), a2 redis-slow (threshold
/// 20 ms), a3 redis-keys with key templates (threshold 1 s), a4 redis-cluster with slots
/// (threshold 1 s).
fn fleet_with_page() -> (tempfile::TempDir, Aggregator, u16) {
    let dir = tempfile::tempdir().expect("temp dir");
    let http = free_port();
    let aggregator = Aggregator::start(
        dir.path(),
        free_port(),
        &[],
        &["--http-listen", &format!("127.0.0.1:{http}")],
    );
    let url = aggregator.url();
    replay(
        "redis-benchmark-lo",
        "a1",
        &url,
        &["-p", "26379", "-t", "1000"],
    );
    replay("redis-slow", "a2", &url, &["-p", "26379", "-t", "20"]);
    replay("redis-keys", "a3", &url, &["-p", "26379", "-t", "1000"]);
    replay(
        "redis-cluster",
        "a4",
        &url,
        &["-p", "27001,27002,27003", "--slots", "-t", "1000"],
    );
    (dir, aggregator, http)
}

/// An API call (its query parameters) and the `tcpkit-query` arguments that ask the same.
type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a [&'a str]);

#[test]
fn the_page_shows_the_fleet_in_a_real_browser() {
    if !requirement(have("chromium"), "chromium (Debian's chromium)") {
        return;
    }
    let (dir, aggregator, http) = fleet_with_page();
    let url = aggregator.url();
    // And an agent that lost packets: its gaps are counted, and its row is marked.
    let lossy = dir.path().join("lossy.pcap");
    tcpkit_tests::mangle::Pcap::read(&fixture("redis-benchmark-lo.pcap"))
        .mangled(tcpkit_tests::mangle::Fault::Drop(0.02), 7)
        .write(&lossy);
    replay_file(&lossy, "a5", &url, &["-p", "26379", "-t", "1000"]);
    let dom = chromium(&["--dump-dom", &page(http)]);
    assert_eq!(
        attribute(&dom, "message", "hidden").as_deref(),
        Some(""),
        "{dom}"
    );

    // The heatmap's cells add up to every request of the fixtures, as hist counts them.
    let hist = query_json(
        &[],
        &url,
        &["hist", "--from", "2026-01-01", "--to", "2027-01-01"],
    );
    let total = hist["count"].as_u64().expect("count");
    assert!(total > 10_000, "{hist}");
    assert_eq!(
        attribute(&dom, "heatmap", "data-total"),
        Some(total.to_string())
    );
    assert_eq!(
        attribute(&dom, "histogram", "data-total"),
        Some(total.to_string())
    );
    assert_eq!(rows(&dom, "figures")[0][0], total.to_string());

    // The slowest requests: exactly the DEBUG SLEEPs of a2 at or above its 20 ms.
    let slow = query_json(&[], &url, &["slow", "--slowest", "--limit", "50"]);
    let slow = slow.as_array().expect("events");
    assert!(!slow.is_empty());
    let shown = rows(&dom, "slow");
    assert_eq!(shown.len(), slow.len(), "{dom}");
    for (row, event) in shown.iter().zip(slow) {
        assert_eq!(row[0], "a2");
        assert!(row[5].starts_with("DEBUG SLEEP"), "{row:?}");
        assert_eq!(Some(row[5].as_str()), event["summary"].as_str());
        assert!(event["latency_us"].as_u64().expect("latency") >= 20_000);
    }

    // Every agent, with its counters as `agents` says them; the one that lost packets marked.
    let listed = query_json(&[], &url, &["agents"]);
    let listed = listed.as_array().expect("agents");
    let shown = rows(&dom, "agents");
    let ids: Vec<&str> = shown.iter().map(|r| r[0].as_str()).collect();
    assert_eq!(ids, ["a1", "a2", "a3", "a4", "a5"]);
    for (row, agent) in shown.iter().zip(listed) {
        assert_eq!(row[5], agent["kernel_drops"].to_string(), "{row:?}");
        assert_eq!(row[6], agent["gaps"].to_string(), "{row:?}");
        assert_eq!(row[7], agent["desyncs"].to_string(), "{row:?}");
    }
    let gaps = listed[4]["gaps"].as_u64().expect("gaps");
    assert!(gaps > 0, "{}", listed[4]);
    assert!(
        dom.contains("<tr class=\"lossy\"><td class=\"text\">a5</td>"),
        "{dom}"
    );
    assert_eq!(dom.matches("class=\"lossy\"").count(), 1);

    // Commands by p99 and the hot key templates, as top and keys rank them.
    let top = query_json(&[], &url, &["top", "--by", "p99"]);
    let shown: Vec<String> = rows(&dom, "top")
        .into_iter()
        .map(|r| r[0].clone())
        .collect();
    let ranked: Vec<String> = top
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| {
            format!(
                "{} {}",
                r["proto"].as_str().expect("proto"),
                r["key"].as_str().expect("key")
            )
        })
        .collect();
    assert_eq!(shown, ranked);
    let keys = query_json(&[], &url, &["keys", "--limit", "10"]);
    let shown: Vec<String> = rows(&dom, "keys")
        .into_iter()
        .map(|r| r[1].clone())
        .collect();
    let counts: Vec<String> = keys
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| r["count"].to_string())
        .collect();
    assert!(!counts.is_empty());
    assert_eq!(shown, counts);

    // The busiest slots, as `top --of slot` ranks them: slot, requests and redirects.
    let slots = query_json(&[], &url, &["top", "--of", "slot", "--limit", "10"]);
    let ranked: Vec<Vec<String>> = slots
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| {
            ["count", "moved", "ask"].iter().fold(
                vec![r["key"].as_str().expect("slot").to_string()],
                |mut row, k| {
                    row.push(r[*k].to_string());
                    row
                },
            )
        })
        .collect();
    let shown: Vec<Vec<String>> = rows(&dom, "slots")
        .into_iter()
        .map(|r| r[..4].to_vec())
        .collect();
    assert_eq!(ranked.len(), 10, "{slots}");
    assert_eq!(shown, ranked);
    assert!(
        ranked.iter().any(|r| r[2] != "0"),
        "the busiest slots hold a redirected one: {slots}"
    );

    // A screenshot, not blank.
    let shots = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/web-screenshots");
    std::fs::create_dir_all(&shots).expect("screenshot dir");
    let shot = shots.join("page.png");
    let _ = std::fs::remove_file(&shot);
    chromium(&[&format!("--screenshot={}", shot.display()), &page(http)]);
    let png = std::fs::read(&shot).expect("a screenshot");
    assert!(png.starts_with(b"\x89PNG"));
    // A blank 1200x1400 page compresses to a few KB; this one has a heatmap and tables.
    assert!(png.len() > 30_000, "{} bytes", png.len());
}

#[test]
fn the_json_api_answers_what_tcpkit_query_does() {
    let (_dir, aggregator, http) = fleet_with_page();
    let url = aggregator.url();
    let cases: &[Case<'_>] = &[
        ("hist", &[], &["hist"]),
        ("hist", &[("by", "command")], &["hist", "--by", "command"]),
        (
            "hist",
            &[("agent", "a2"), ("command", "debug"), ("port", "26379")],
            &[
                "hist",
                "--agent",
                "a2",
                "--command",
                "debug",
                "--port",
                "26379",
            ],
        ),
        (
            "slow",
            &[
                ("min_ms", "30"),
                ("grep", "SLEEP*"),
                ("slowest", "1"),
                ("limit", "3"),
            ],
            &[
                "slow",
                "--min-ms",
                "30",
                "--grep",
                "SLEEP*",
                "--slowest",
                "--limit",
                "3",
            ],
        ),
        ("slow", &[], &["slow"]),
        (
            "series",
            &[RANGE[0], RANGE[1], ("by", "agent")],
            &[
                "heatmap", "--from", RANGE[0].1, "--to", RANGE[1].1, "--by", "agent",
            ],
        ),
        (
            "series",
            &[
                ("from", "2026-11-01"),
                ("to", "2026-12-02"),
                ("step", "10m"),
            ],
            &[
                "heatmap",
                "--from",
                "2026-11-01",
                "--to",
                "2026-12-02",
                "--step",
                "10m",
            ],
        ),
        ("agents", &[], &["agents"]),
        ("top", &[("by", "p99")], &["top", "--by", "p99"]),
        (
            "top",
            &[("of", "server"), ("by", "own-p99"), ("limit", "3")],
            &["top", "--of", "server", "--by", "own-p99", "--limit", "3"],
        ),
        (
            "top",
            &[("of", "template"), ("by", "bytes"), ("limit", "20")],
            &["keys", "--by", "bytes"],
        ),
        (
            "top",
            &[("of", "slot"), ("by", "redirects"), ("limit", "5")],
            &["top", "--of", "slot", "--by", "redirects", "--limit", "5"],
        ),
    ];
    for (call, params, args) in cases {
        assert_eq!(
            api(http, call, params),
            query_json(&[], &url, args),
            "{call} {params:?}"
        );
    }
    // Bad input: said, with the status.
    let (status, body) = get(http, "/api/v1/hist?by=slot", None);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("\"error\""));
    let (status, body) = get(http, "/api/v1/top?of=nothing", None);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("of=nothing: command, server"), "{body}");
    let (status, _) = get(http, "/api/v1/series?since=30d&step=1s", None);
    assert_eq!(status, 400);
    let (status, _) = get(http, "/api/v1/nothing", None);
    assert_eq!(status, 400);
    let (status, _) = get(http, "/elsewhere", None);
    assert_eq!(status, 404);
}

#[test]
fn without_the_token_the_api_refuses_and_the_page_says_so() {
    let dir = tempfile::tempdir().expect("temp dir");
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret-Token_42\n").expect("token");
    let http = free_port();
    let aggregator = Aggregator::start(
        dir.path(),
        free_port(),
        &[],
        &[
            "--token-file",
            token.to_str().expect("path"),
            "--http-listen",
            &format!("127.0.0.1:{http}"),
        ],
    );
    let _ = aggregator.url();
    for call in ["hist", "slow", "series", "agents"] {
        let (status, body) = get(http, &format!("/api/v1/{call}"), None);
        assert_eq!(status, 401, "{call}: {body}");
        let (status, _) = get(http, &format!("/api/v1/{call}"), Some("wrong"));
        assert_eq!(status, 401, "{call}");
        let (status, body) = get(http, &format!("/api/v1/{call}"), Some("s3cret-Token_42"));
        assert_eq!(status, 200, "{call}: {body}");
    }
    // The page itself needs no token (it holds no data), and asks for it.
    let (status, _) = get(http, "/", None);
    assert_eq!(status, 200);
    if !requirement(have("chromium"), "chromium (Debian's chromium)") {
        return;
    }
    let dom = chromium(&["--dump-dom", &page(http)]);
    assert!(dom.contains("This aggregator needs its token"), "{dom}");
    assert_eq!(attribute(&dom, "token-form", "hidden"), None, "{dom}");
}

/// A browser driven over WebDriver: its driver program and how the driver starts it.
struct Browser {
    driver: &'static str,
    /// The program the driver starts, for the skip message.
    program: &'static str,
    capabilities: fn() -> serde_json::Value,
}

const CHROMIUM: Browser = Browser {
    driver: "chromedriver",
    program: "chromium",
    capabilities: || {
        serde_json::json!({"goog:chromeOptions": {
            "args": ["--headless", "--no-sandbox", "--disable-gpu", "--window-size=1200,1400"]
        }})
    },
};

const FIREFOX: Browser = Browser {
    driver: "geckodriver",
    program: "firefox-esr",
    capabilities: || {
        serde_json::json!({"moz:firefoxOptions": {
            "binary": "/usr/bin/firefox-esr",
            "args": ["-headless", "--width=1200", "--height=1400"]
        }})
    },
};

/// In `browser`, driven over WebDriver: the page shows every request in its heatmap and
/// both agents, and a real click on the slowest cell of the heatmap lists the slow requests
/// in it, the slowest of the fleet among them.
async fn the_page_in(browser: &Browser) {
    use fantoccini::actions::{InputSource, MouseActions, PointerAction, MOUSE_BUTTON_LEFT};
    use fantoccini::Locator;
    if !requirement(have(browser.driver), browser.driver)
        || !requirement(have(browser.program), browser.program)
    {
        return;
    }
    let (_dir, aggregator, http) = fleet_with_page();
    let url = aggregator.url();
    let slowest = query_json(&[], &url, &["slow", "--slowest", "--limit", "1"]);
    let slowest = slowest[0]["summary"]
        .as_str()
        .expect("a slow request")
        .to_string();
    let total = query_json(
        &[],
        &url,
        &["hist", "--from", RANGE[0].1, "--to", RANGE[1].1],
    )["count"]
        .to_string();
    let driver_port = free_port();
    let _driver = Guard(
        Command::new(browser.driver)
            .arg(format!("--port={driver_port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("the WebDriver server"),
    );
    assert!(wait_for_port(
        driver_port,
        std::time::Duration::from_secs(10)
    ));
    let serde_json::Value::Object(caps) = (browser.capabilities)() else {
        unreachable!("capabilities are an object")
    };
    let client =
        fantoccini::ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{driver_port}"))
            .await
            .expect("a WebDriver session");
    let result = async {
        client.goto(&page(http)).await?;
        client
            .wait()
            .at_most(std::time::Duration::from_secs(30))
            .for_element(Locator::Css("body[data-loaded='yes']"))
            .await?;
        let canvas = client.find(Locator::Id("heatmap")).await?;
        let shown_total = canvas.attr("data-total").await?;
        let mut agents = Vec::new();
        for row in client
            .find_all(Locator::Css("#agents tr"))
            .await?
            .iter()
            .skip(1)
        {
            agents.push(row.find(Locator::Css("td")).await?.text().await?);
        }
        // Where the slowest cell is, from the page's own layout, relative to the canvas'
        // centre; and the latencies its row holds.
        let at = client
            .execute(
                "const c = document.getElementById('heatmap');
                 const d = c.dataset;
                 const r = c.getBoundingClientRect();
                 const scale = c.width / r.width;
                 const x = Number(d.left) + (Number(d.slowestCol) + 0.5) * Number(d.cellWidth);
                 const y = 0.5 * Number(d.cellHeight);
                 return [x / scale - r.width / 2, y / scale - r.height / 2,
                         Number(d.slowestLowUs), Number(d.slowestHighUs)];",
                vec![],
            )
            .await?;
        let at: Vec<f64> = serde_json::from_value(at).expect("coordinates");
        let click = MouseActions::new("mouse".into())
            .then(PointerAction::MoveToElement {
                element: canvas,
                duration: None,
                x: at[0].round(),
                y: at[1].round(),
            })
            .then(PointerAction::Down {
                button: MOUSE_BUTTON_LEFT,
            })
            .then(PointerAction::Up {
                button: MOUSE_BUTTON_LEFT,
            });
        client.perform_actions(click).await?;
        client
            .wait()
            .at_most(std::time::Duration::from_secs(20))
            .for_element(Locator::Css("#cell-slow tr"))
            .await?;
        let mut listed = Vec::new();
        for row in client
            .find_all(Locator::Css("#cell-slow tr"))
            .await?
            .iter()
            .skip(1)
        {
            let cells = row.find_all(Locator::Css("td")).await?;
            listed.push((cells[4].text().await?, cells[5].text().await?));
        }
        Ok::<_, fantoccini::error::CmdError>((shown_total, agents, listed, at[2], at[3]))
    }
    .await;
    let _ = client.close().await;
    let (shown_total, agents, listed, low_us, high_us) = result.expect("the page in WebDriver");
    assert_eq!(
        shown_total.as_deref(),
        Some(total.as_str()),
        "{}",
        browser.program
    );
    assert_eq!(agents, ["a1", "a2", "a3", "a4"]);
    assert!(!listed.is_empty(), "the cell lists nothing");
    assert!(
        listed.iter().any(|(_, request)| *request == slowest),
        "{listed:?}"
    );
    for (latency, request) in &listed {
        assert!(request.starts_with("DEBUG SLEEP"), "{request}");
        let us = latency.trim_end_matches(" ms").parse::<f64>().expect("ms") * 1000.0;
        // Shown to 0.1 ms.
        assert!(
            us >= low_us - 50.0 && us < high_us + 50.0,
            "{latency} outside [{low_us}, {high_us}) µs"
        );
    }
}

/// In Chromium, over chromedriver (Debian's chromium-driver).
#[tokio::test]
async fn the_page_in_chromium_over_webdriver() {
    the_page_in(&CHROMIUM).await;
}

/// In Firefox ESR, over geckodriver (built from crates.io by setup.sh).
#[tokio::test]
async fn the_page_in_firefox_over_webdriver() {
    the_page_in(&FIREFOX).await;
}
