//! The Prometheus text exposition format (version 0.0.4) and an HTTP endpoint serving it
//! (hyper).
//!
//! Latency histograms are exported in seconds, cumulative per `le` bound, from exact bucket
//! counts: the aggregator's seed buckets of DESIGN.md hold `(bound[i-1], bound[i]]`, as `le`
//! counts; the agent's 10 µs-doubling buckets are read off its fine histogram and hold the
//! whole-microsecond latencies under each bound (`tcpkit_histogram::PROM_BOUNDS_US`).

use std::fmt::Write as _;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use tcpkit_histogram::{SEED_BOUNDS_US, SEED_BUCKETS};
use tokio::net::TcpListener;

/// Label names and values of one series.
pub type Labels<'a> = &'a [(&'a str, &'a str)];

/// What a latency histogram series holds: counts of buckets with their upper bounds.
#[derive(Debug, Clone, Copy)]
pub struct BucketHistogram<'a> {
    /// Upper bounds of the buckets but the last, µs.
    pub bounds_us: &'a [u64],
    /// One count per bound, and the last for what is above them all.
    pub counts: &'a [u64],
    /// Sum of the latencies, µs.
    pub sum_us: u64,
}

impl<'a> BucketHistogram<'a> {
    /// The 18 seed buckets (DESIGN.md).
    pub fn seed(seed: &'a [u64; SEED_BUCKETS], sum_us: u64) -> Self {
        Self {
            bounds_us: &SEED_BOUNDS_US,
            counts: seed,
            sum_us,
        }
    }
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

    /// A latency histogram family, in seconds (its bounds and sum are µs).
    pub fn latency_histogram<'a>(
        &mut self,
        name: &str,
        help: &str,
        series: impl IntoIterator<Item = (Labels<'a>, BucketHistogram<'a>)>,
    ) {
        self.histogram(name, help, 1e6, series);
    }

    /// A histogram family of plain numbers (a pipeline depth): bounds and sum as they are.
    pub fn count_histogram<'a>(
        &mut self,
        name: &str,
        help: &str,
        series: impl IntoIterator<Item = (Labels<'a>, BucketHistogram<'a>)>,
    ) {
        self.histogram(name, help, 1.0, series);
    }

    /// A histogram family whose bounds and sums are divided by `unit`.
    fn histogram<'a>(
        &mut self,
        name: &str,
        help: &str,
        unit: f64,
        series: impl IntoIterator<Item = (Labels<'a>, BucketHistogram<'a>)>,
    ) {
        self.header(name, "histogram", help);
        let bucket = format!("{name}_bucket");
        for (labels, histogram) in series {
            let mut cumulative = 0u64;
            for (bound_us, count) in histogram.bounds_us.iter().zip(histogram.counts) {
                cumulative = cumulative.saturating_add(*count);
                let le = (*bound_us as f64 / unit).to_string();
                self.sample(&bucket, labels, Some(("le", &le)), &cumulative.to_string());
            }
            let count = histogram
                .counts
                .iter()
                .fold(0u64, |a, &b| a.saturating_add(b));
            self.sample(&bucket, labels, Some(("le", "+Inf")), &count.to_string());
            let sum = (histogram.sum_us as f64 / unit).to_string();
            self.sample(&format!("{name}_sum"), labels, None, &sum);
            self.sample(&format!("{name}_count"), labels, None, &count.to_string());
        }
    }

    /// `tcpkit_build_info{program, version} 1` and the process metrics of the Prometheus
    /// client libraries (`process_cpu_seconds_total`, `process_resident_memory_bytes`,
    /// `process_virtual_memory_bytes`, `process_open_fds`, `process_start_time_seconds`),
    /// read from `/proc/self`; a figure that cannot be read is left out.
    pub fn build_and_process(&mut self, program: &str, version: &str) {
        self.gauge(
            "tcpkit_build_info",
            "The running build: 1, with its program and version as labels.",
            [(&[("program", program), ("version", version)][..], 1.0)],
        );
        let process = ProcessFigures::read();
        let none: Labels<'_> = &[];
        if let Some(cpu) = process.cpu_seconds {
            self.counter_f64(
                "process_cpu_seconds_total",
                "User and system CPU time spent, seconds.",
                cpu,
            );
        }
        for (name, help, value) in [
            (
                "process_resident_memory_bytes",
                "Resident memory size, bytes.",
                process.resident_bytes,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size, bytes.",
                process.virtual_bytes,
            ),
            (
                "process_open_fds",
                "Open file descriptors.",
                process.open_fds,
            ),
            (
                "process_start_time_seconds",
                "Start time of the process since the Unix epoch, seconds.",
                process.start_time_seconds,
            ),
        ] {
            if let Some(value) = value {
                self.gauge(name, help, [(none, value)]);
            }
        }
    }

    fn counter_f64(&mut self, name: &str, help: &str, value: f64) {
        self.header(name, "counter", help);
        self.sample(name, &[], None, &value.to_string());
    }

    /// The page.
    pub fn finish(self) -> String {
        self.text
    }
}

/// What `/proc/self` says of this process.
#[derive(Debug, Default, Clone, Copy)]
struct ProcessFigures {
    cpu_seconds: Option<f64>,
    resident_bytes: Option<f64>,
    virtual_bytes: Option<f64>,
    open_fds: Option<f64>,
    start_time_seconds: Option<f64>,
}

impl ProcessFigures {
    fn read() -> Self {
        // SAFETY: sysconf only reads configuration values.
        let (ticks, page) = unsafe {
            (
                libc::sysconf(libc::_SC_CLK_TCK) as f64,
                libc::sysconf(libc::_SC_PAGESIZE) as f64,
            )
        };
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        // The fields after the command name, which is in parentheses and may hold spaces.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        // Numbered as in proc(5), from the state (field 3).
        let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<f64>().ok());
        let boot_time = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("btime "))
                .and_then(|v| v.trim().parse::<f64>().ok())
        });
        let valid = ticks > 0.0 && page > 0.0;
        Self {
            cpu_seconds: valid
                .then(|| Some((field(14)? + field(15)?) / ticks))
                .flatten(),
            virtual_bytes: field(23),
            resident_bytes: valid.then(|| field(24).map(|p| p * page)).flatten(),
            open_fds: std::fs::read_dir("/proc/self/fd")
                .ok()
                .map(|d| d.count() as f64),
            start_time_seconds: valid
                .then(|| Some(boot_time? + field(22)? / ticks))
                .flatten(),
        }
    }
}

/// Renders the current page on each scrape.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// Connections open at once at most; past it new ones are closed at once (not queued), so
/// that a scrape is refused and retried rather than left waiting.
const MAX_CLIENTS: usize = 512;
/// A client that has not sent its whole request head in this time is cut off.
const HEAD_TIMEOUT: Duration = Duration::from_secs(2);
/// A connection (kept alive between scrapes or not) lasts at most this long.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves `GET /metrics` (HTTP/1.1 by hyper, keep-alive included) on `listener` until
/// `shutdown` resolves; other paths get 404, other methods 405. Idle and slow clients are
/// cut off by [`HEAD_TIMEOUT`] and [`CONNECTION_TIMEOUT`] and cost a task each, so they
/// cannot delay a scrape.
pub async fn serve(listener: TcpListener, render: Render, shutdown: impl Future<Output = ()>) {
    serve_http(listener, MAX_CLIENTS, MAX_HEAD, shutdown, move |request| {
        let page = answer(&request, &render);
        async move { page }
    })
    .await
}

/// Serves HTTP/1.1 (hyper, keep-alive included) on `listener` until `shutdown` resolves,
/// each request answered by `handle`: at most `max_clients` connections at once (more are
/// closed), request heads up to `max_head` bytes, cut off by [`HEAD_TIMEOUT`] and
/// [`CONNECTION_TIMEOUT`].
pub async fn serve_http<H, F>(
    listener: TcpListener,
    max_clients: usize,
    max_head: usize,
    shutdown: impl Future<Output = ()>,
    handle: H,
) where
    H: Fn(hyper::Request<hyper::body::Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = hyper::Response<Full<Bytes>>> + Send + 'static,
{
    let plain = |socket| async move { Ok(socket) };
    serve_http_over(listener, max_clients, max_head, shutdown, plain, handle).await
}

/// [`serve_http`] over what `wrap` makes of each connection (TLS, say), within
/// [`HEAD_TIMEOUT`]; a connection it fails is closed.
pub async fn serve_http_over<H, F, W, WF, S>(
    listener: TcpListener,
    max_clients: usize,
    max_head: usize,
    shutdown: impl Future<Output = ()>,
    wrap: W,
    handle: H,
) where
    H: Fn(hyper::Request<hyper::body::Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = hyper::Response<Full<Bytes>>> + Send + 'static,
    W: Fn(tokio::net::TcpStream) -> WF + Clone + Send + Sync + 'static,
    WF: Future<Output = std::io::Result<S>> + Send,
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let permits = Arc::new(tokio::sync::Semaphore::new(max_clients));
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((socket, _)) = accepted else {
            // Out of descriptors, say: do not spin.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            drop(socket);
            continue;
        };
        let _ = socket.set_nodelay(true);
        let (handle, wrap) = (handle.clone(), wrap.clone());
        tokio::spawn(async move {
            let Ok(Ok(stream)) = tokio::time::timeout(HEAD_TIMEOUT, wrap(socket)).await else {
                return;
            };
            let service = hyper::service::service_fn(move |request| {
                let answer = handle(request);
                async move { Ok::<_, std::convert::Infallible>(answer.await) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .max_buf_size(max_head)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, connection).await;
            drop(permit);
        });
    }
}

/// The longest request head read.
const MAX_HEAD: usize = 8192;

fn answer<B>(request: &hyper::Request<B>, render: &Render) -> hyper::Response<Full<Bytes>> {
    use hyper::{Method, StatusCode};
    let (status, body) = match (request.method(), request.uri().path()) {
        (&Method::GET, "/metrics") => (StatusCode::OK, render()),
        (&Method::GET, _) => (StatusCode::NOT_FOUND, "try /metrics\n".to_owned()),
        _ => (
            StatusCode::METHOD_NOT_ALLOWED,
            "GET /metrics only\n".to_owned(),
        ),
    };
    let mut response = hyper::Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
                BucketHistogram::seed(&seed, 1_500_000),
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

    /// The endpoint on 127.0.0.1:0 serving `up 1`: its address, its stop, its task.
    async fn start_endpoint() -> (
        std::net::SocketAddr,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let render: Render = Arc::new(|| "up 1\n".to_owned());
        let server = tokio::spawn(serve(listener, render, async {
            let _ = stopped.await;
        }));
        (addr, stop, server)
    }

    #[test]
    fn endpoint_serves_metrics_and_refuses_garbage() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (addr, stop, server) = start_endpoint().await;
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
                .starts_with("HTTP/1.0 404"));
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

    #[test]
    fn idle_and_slow_clients_do_not_delay_a_scrape() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (addr, stop, server) = start_endpoint().await;
            // 64 clients that connect and say nothing, 8 that send half a head.
            let mut idle = Vec::new();
            for i in 0..72 {
                let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
                if i >= 64 {
                    c.write_all(b"GET /metrics HTTP/1.1\r\nHo").await.unwrap();
                }
                idle.push(c);
            }
            let scrape = async {
                let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
                client
                    .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    .await
                    .unwrap();
                let mut reply = String::new();
                client.read_to_string(&mut reply).await.unwrap();
                reply
            };
            let started = std::time::Instant::now();
            let reply = tokio::time::timeout(Duration::from_secs(1), scrape)
                .await
                .expect("a scrape among idle clients answers at once");
            assert!(
                reply.starts_with("HTTP/1.1 200 OK") && reply.ends_with("up 1\n"),
                "{reply}"
            );
            assert!(started.elapsed() < Duration::from_secs(1));
            // The idle ones are cut off after the head timeout.
            let mut cut = 0;
            for mut c in idle {
                let mut rest = Vec::new();
                let read = tokio::time::timeout(HEAD_TIMEOUT * 3, c.read_to_end(&mut rest)).await;
                if read.is_ok() {
                    cut += 1;
                }
            }
            assert_eq!(cut, 72);
            stop.send(()).unwrap();
            server.await.unwrap();
        });
    }

    #[test]
    fn build_info_and_the_process_figures() {
        let mut page = Exposition::default();
        page.build_and_process("tcpkit", "1.2.3");
        let page = page.finish();
        assert!(
            page.contains("tcpkit_build_info{program=\"tcpkit\",version=\"1.2.3\"} 1\n"),
            "{page}"
        );
        let value = |name: &str| -> f64 {
            page.lines()
                .find_map(|l| l.strip_prefix(&format!("{name} ")))
                .unwrap_or_else(|| panic!("{name} in {page}"))
                .parse()
                .unwrap()
        };
        assert!(value("process_resident_memory_bytes") > 1e5);
        assert!(value("process_virtual_memory_bytes") >= value("process_resident_memory_bytes"));
        assert!(value("process_open_fds") >= 3.0);
        assert!(value("process_cpu_seconds_total") >= 0.0);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let started = value("process_start_time_seconds");
        assert!(
            started <= now + 1.0 && started > now - 86_400.0,
            "{started} vs {now}"
        );
    }
}
