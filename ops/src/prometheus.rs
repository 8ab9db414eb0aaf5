//! The Prometheus text exposition format (version 0.0.4) and a small HTTP endpoint serving it.
//!
//! Latency histograms are exported in seconds with the seed buckets of DESIGN.md as `le`
//! bounds: a seed bucket holds `(bound[i-1], bound[i]]`, exactly Prometheus' cumulative
//! `le` convention, so the exported buckets are exact, not estimated.

use std::fmt::Write as _;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tcpkit_histogram::{SEED_BOUNDS_US, SEED_BUCKETS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Label names and values of one series.
pub type Labels<'a> = &'a [(&'a str, &'a str)];

/// What a latency histogram series holds, in the seed buckets.
#[derive(Debug, Clone, Copy)]
pub struct SeedHistogram<'a> {
    /// Counts of the 18 seed buckets.
    pub seed: &'a [u64; SEED_BUCKETS],
    /// Sum of the latencies, µs.
    pub sum_us: u64,
}

/// A metrics page being written, family by family.
#[derive(Debug, Default)]
pub struct Exposition {
    text: String,
}

fn escape(value: &str, out: &mut String) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

impl Exposition {
    fn header(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {help}");
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: Labels<'_>, extra: Option<(&str, &str)>, value: &str) {
        self.text.push_str(name);
        let mut all = labels.iter().copied().chain(extra).peekable();
        if all.peek().is_some() {
            self.text.push('{');
            for (i, (key, value)) in all.enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                self.text.push_str(key);
                self.text.push_str("=\"");
                escape(value, &mut self.text);
                self.text.push('"');
            }
            self.text.push('}');
        }
        self.text.push(' ');
        self.text.push_str(value);
        self.text.push('\n');
    }

    /// A counter family (`name` should end in `_total`).
    pub fn counter<'a>(
        &mut self,
        name: &str,
        help: &str,
        series: impl IntoIterator<Item = (Labels<'a>, u64)>,
    ) {
        self.header(name, "counter", help);
        for (labels, value) in series {
            self.sample(name, labels, None, &value.to_string());
        }
    }

    /// A gauge family.
    pub fn gauge<'a>(
        &mut self,
        name: &str,
        help: &str,
        series: impl IntoIterator<Item = (Labels<'a>, f64)>,
    ) {
        self.header(name, "gauge", help);
        for (labels, value) in series {
            self.sample(name, labels, None, &value.to_string());
        }
    }

    /// A latency histogram family, in seconds.
    pub fn latency_histogram<'a>(
        &mut self,
        name: &str,
        help: &str,
        series: impl IntoIterator<Item = (Labels<'a>, SeedHistogram<'a>)>,
    ) {
        self.header(name, "histogram", help);
        let bucket = format!("{name}_bucket");
        for (labels, histogram) in series {
            let mut cumulative = 0;
            for (bound_us, count) in SEED_BOUNDS_US.iter().zip(histogram.seed) {
                cumulative += count;
                let le = (*bound_us as f64 / 1e6).to_string();
                self.sample(&bucket, labels, Some(("le", &le)), &cumulative.to_string());
            }
            let count: u64 = histogram.seed.iter().sum();
            self.sample(&bucket, labels, Some(("le", "+Inf")), &count.to_string());
            let sum = (histogram.sum_us as f64 / 1e6).to_string();
            self.sample(&format!("{name}_sum"), labels, None, &sum);
            self.sample(&format!("{name}_count"), labels, None, &count.to_string());
        }
    }

    /// The page.
    pub fn finish(self) -> String {
        self.text
    }
}

/// Renders the current page on each scrape.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// Scrapes served at once at most; others wait in the listen backlog.
const MAX_CLIENTS: usize = 16;
/// A scrape that does not send its request and take its page in this time is dropped.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest request head read.
const MAX_HEAD: usize = 8192;

/// Serves `GET /metrics` on `listener` until `shutdown` resolves; anything else gets 404,
/// 405 or 400, and a client that sends garbage or nothing is cut off, never waited on.
pub async fn serve(listener: TcpListener, render: Render, shutdown: impl Future<Output = ()>) {
    crate::listener::serve_clients(
        listener,
        MAX_CLIENTS,
        CLIENT_TIMEOUT,
        shutdown,
        |mut socket| {
            let render = Arc::clone(&render);
            async move {
                let _ = answer(&mut socket, &render).await;
            }
        },
    )
    .await
}

async fn answer(socket: &mut tokio::net::TcpStream, render: &Render) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        let n = socket.read(&mut chunk).await?;
        if n == 0 || head.len() + n > MAX_HEAD {
            return respond(socket, "400 Bad Request", "bad request\n").await;
        }
        head.extend_from_slice(&chunk[..n]);
    }
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let mut parts = line.split(|b| *b == b' ');
    let (method, path) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let path = path.split(|b| *b == b'?').next().unwrap_or_default();
    match (method, path) {
        (b"GET", b"/metrics") => {
            let page = render();
            respond(socket, "200 OK", &page).await
        }
        (b"GET", _) => respond(socket, "404 Not Found", "try /metrics\n").await,
        _ => respond(socket, "405 Method Not Allowed", "GET /metrics only\n").await,
    }
}

async fn respond(
    socket: &mut tokio::net::TcpStream,
    status: &str,
    body: &str,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    socket.write_all(head.as_bytes()).await?;
    socket.write_all(body.as_bytes()).await?;
    socket.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_in_seconds() {
        let mut seed = [0u64; SEED_BUCKETS];
        seed[0] = 3; // ≤ 100 µs
        seed[4] = 2; // (1 ms, 5 ms]
        seed[17] = 1; // > 20 s
        let mut page = Exposition::default();
        page.latency_histogram(
            "tcpkit_request_duration_seconds",
            "Latency.",
            [(
                &[("port", "6379"), ("command", "GET \"x\"")][..],
                SeedHistogram {
                    seed: &seed,
                    sum_us: 1_500_000,
                },
            )],
        );
        let page = page.finish();
        let labels = r#"port="6379",command="GET \"x\"""#;
        for expected in [
            "# TYPE tcpkit_request_duration_seconds histogram".to_owned(),
            format!("tcpkit_request_duration_seconds_bucket{{{labels},le=\"0.0001\"}} 3"),
            format!("tcpkit_request_duration_seconds_bucket{{{labels},le=\"0.001\"}} 3"),
            format!("tcpkit_request_duration_seconds_bucket{{{labels},le=\"0.005\"}} 5"),
            format!("tcpkit_request_duration_seconds_bucket{{{labels},le=\"20\"}} 5"),
            format!("tcpkit_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} 6"),
            format!("tcpkit_request_duration_seconds_sum{{{labels}}} 1.5"),
            format!("tcpkit_request_duration_seconds_count{{{labels}}} 6"),
        ] {
            assert!(page.lines().any(|l| l == expected), "{expected}\n{page}");
        }
    }

    #[test]
    fn endpoint_serves_metrics_and_refuses_garbage() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let render: Render = Arc::new(|| "up 1\n".to_owned());
            let server = tokio::spawn(serve(listener, render, async {
                let _ = stopped.await;
            }));
            let ask = |request: Vec<u8>| async move {
                let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
                client.write_all(&request).await.unwrap();
                client.shutdown().await.unwrap();
                let mut reply = String::new();
                client.read_to_string(&mut reply).await.unwrap();
                reply
            };
            let ok = ask(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()).await;
            assert!(
                ok.starts_with("HTTP/1.1 200 OK\r\n") && ok.ends_with("\r\n\r\nup 1\n"),
                "{ok}"
            );
            assert!(ask(b"GET / HTTP/1.0\r\n\r\n".to_vec())
                .await
                .starts_with("HTTP/1.1 404"));
            assert!(ask(b"POST /metrics HTTP/1.1\r\n\r\n".to_vec())
                .await
                .starts_with("HTTP/1.1 405"));
            let garbage: Vec<u8> = (0..6_000u32).map(|i| (i * 7919 % 251) as u8).collect();
            assert!(ask(garbage).await.starts_with("HTTP/1.1 400"));
            // After all of that, it still answers.
            let again = ask(b"GET /metrics?x=1 HTTP/1.1\r\n\r\n".to_vec()).await;
            assert!(again.starts_with("HTTP/1.1 200 OK"));
            stop.send(()).unwrap();
            server.await.unwrap();
        });
    }
}
