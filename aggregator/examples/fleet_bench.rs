//! The aggregator's benchmarks (the fleet issues' targets), against real servers on
//! 127.0.0.1 with a real SQLite file, or a real ClickHouse (`STORE=clickhouse://HOST:PORT`,
//! as `bench/fleet.sh` runs it):
//!
//! * ingest: events/s stored and acknowledged from 4 concurrent agent streams, each sending
//!   batches of 4096 events as the agent does (target ≥ 200k events/s); on ClickHouse with 1
//!   and with 2 aggregators (the streams split between them);
//! * queries over 10M events and 1M histogram snapshots: `slow --min-ms 10 --limit 100`
//!   and `hist --since 24h` (target ≤ 100 ms each), and the series (heatmap) of the last
//!   24 h (target ≤ 100 ms), median of RUNS.
//!
//! `cargo run --release -p tcpkit-aggregator --example fleet_bench [-- DIR]`; the query
//! store is built once (in DIR, default `bench-data/fleet`, or the ClickHouse database
//! `bench_query`) and reused. On ClickHouse the queries run before and after the roll-ups
//! (as they are 15 minutes after the last batch) when the store had none. `ONLY=ingest` or
//! `ONLY=queries` runs one half.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tcpkit_aggregator::merge::Merged;
use tcpkit_aggregator::server::{self, now_us, Config, Limits};
use tcpkit_aggregator::store::{self, CheckedBatch, CheckedSnapshot};
use tcpkit_histogram::{seed_bucket, FineHistogram, SEED_BUCKETS};
use tcpkit_proto::v1::{
    self, agent_message::Body, ingest_client::IngestClient, query_client::QueryClient,
};

const STREAMS: usize = 4;
const EVENTS_PER_STREAM: usize = 500_000;
const BATCH: usize = 4096;
const STORE_EVENTS: u64 = 10_000_000;
const STORE_SNAPSHOTS: u64 = 1_000_000;

/// A cheap deterministic pseudo-random sequence (xorshift).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

const COMMANDS: [&str; 10] = [
    "GET", "SET", "INCR", "LPUSH", "LPOP", "HGET", "HSET", "DEL", "MGET", "EXPIRE",
];

fn event(rng: &mut Rng, ts_us: u64) -> v1::Event {
    let r = rng.next();
    let command = COMMANDS[(r % 10) as usize];
    v1::Event {
        ts_us,
        req_done_us: ts_us + 20,
        client: format!("10.1.{}.{}:{}", r % 7, r % 251, 30_000 + r % 20_000),
        server: format!("10.0.0.{}", r % 10),
        port: 6379,
        proto: "redis".into(),
        command: command.into(),
        summary: format!("{command} user:{}:profile field{}", r % 1_000_000, r % 10),
        // Mostly 1 to 20 ms, a tail to 500 ms.
        latency_us: 1_000 + (r >> 8) % 19_000 + if r % 50 == 0 { (r >> 20) % 480_000 } else { 0 },
        req_bytes: 40,
        rsp_bytes: 90,
        status: 0,
        ..Default::default()
    }
}

fn snapshot(rng: &mut Rng, ts_us: u64, series: u64) -> CheckedSnapshot {
    let mut fine = FineHistogram::default();
    let mut seed = [0; SEED_BUCKETS];
    let mut sum = 0;
    for _ in 0..50 {
        let l = 50 + rng.next() % 2_000;
        fine.record(l);
        seed[seed_bucket(l)] += 1;
        sum += l;
    }
    CheckedSnapshot {
        ts_us,
        interval_us: 10_000_000,
        server: format!("10.0.0.{}", series / 10),
        port: 6379,
        proto: "redis".into(),
        command: COMMANDS[(series % 10) as usize].into(),
        merged: Merged {
            count: 50,
            sum_us: sum,
            seed,
            fine,
            ..Merged::default()
        },
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

async fn start_server(
    store: store::Spec,
) -> (
    String,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let config = Config {
        store,
        retention: None,
        max_db_bytes: None,
        limits: Limits::default(),
        token: None,
        tls: None,
    };
    let task = tokio::spawn(async move {
        server::serve(listener, config, Default::default(), async {
            let _ = stopped.await;
        })
        .await
        .expect("serve");
    });
    (url, stop, task)
}

/// The batches of one agent stream, made before the clock starts (agents run elsewhere).
fn make_batches(id: usize) -> Vec<v1::Batch> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ id as u64);
    let start = now_us();
    (0..EVENTS_PER_STREAM.div_ceil(BATCH))
        .map(|b| {
            let n = BATCH.min(EVENTS_PER_STREAM - b * BATCH);
            v1::Batch {
                seq: b as u64 + 1,
                events: (0..n)
                    .map(|i| event(&mut rng, start + (b * BATCH + i) as u64))
                    .collect(),
                ..Default::default()
            }
        })
        .collect()
}

/// One agent stream: a hello, then every batch; returns when all are acknowledged.
async fn agent_stream(url: String, id: usize, batches: Vec<v1::Batch>) {
    let mut client = IngestClient::connect(url).await.expect("connect");
    let (out, outbound) = tokio::sync::mpsc::channel(64);
    let session = now_us() + id as u64;
    let acks = client
        .stream(tokio_stream::wrappers::ReceiverStream::new(outbound))
        .await
        .expect("stream");
    let mut acks = acks.into_inner();
    let last_seq = batches.len() as u64;
    let sender = tokio::spawn(async move {
        out.send(v1::AgentMessage {
            body: Some(Body::Hello(v1::Hello {
                agent_id: format!("bench-{id}"),
                session,
                ..Default::default()
            })),
        })
        .await
        .expect("hello");
        for batch in batches {
            out.send(v1::AgentMessage {
                body: Some(Body::Batch(batch)),
            })
            .await
            .expect("send");
        }
        out
    });
    while let Some(ack) = acks.message().await.expect("ack") {
        if ack.seq == last_seq {
            break;
        }
    }
    drop(sender.await);
}

/// Where the benchmark stores: the SQLite file `file` in `dir`, or the database `database`
/// of the ClickHouse at `STORE`.
fn store_for(dir: &Path, file: &str, database: &str) -> store::Spec {
    match std::env::var("STORE") {
        Ok(host) => {
            let url = format!("{}/{database}", host.trim_end_matches('/'));
            store::Spec::parse(&url).expect("STORE is clickhouse://HOST:PORT")
        }
        Err(_) => store::Spec::Sqlite(dir.join(file)),
    }
}

async fn ingest(dir: &Path, aggregators: usize) {
    let spec = store_for(dir, "ingest.db", &format!("bench_ingest_{}", now_us()));
    if let store::Spec::Sqlite(db) = &spec {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
        }
    }
    let mut servers = Vec::new();
    for _ in 0..aggregators {
        servers.push(start_server(spec.clone()).await);
    }
    let batches: Vec<Vec<v1::Batch>> = (0..STREAMS).map(make_batches).collect();
    let started = Instant::now();
    let streams: Vec<_> = batches
        .into_iter()
        .enumerate()
        .map(|(i, b)| tokio::spawn(agent_stream(servers[i % aggregators].0.clone(), i, b)))
        .collect();
    for s in streams {
        s.await.expect("stream task");
    }
    let took = started.elapsed();
    let events = (STREAMS * EVENTS_PER_STREAM) as f64;
    println!(
        "ingest ({spec}, {aggregators} aggregator{}): {} events from {STREAMS} streams stored and acknowledged in {:.2} s = {:.0} events/s",
        if aggregators == 1 { "" } else { "s" },
        STREAMS * EVENTS_PER_STREAM,
        took.as_secs_f64(),
        events / took.as_secs_f64()
    );
    for (_, stop, task) in servers {
        let _ = stop.send(());
        let _ = task.await;
    }
}

/// The query store: 10M events over the last 7 days, 1M snapshots (100 series every 10 s,
/// the last 27.8 hours). A SQLite file is built aside and renamed; a ClickHouse database
/// is reused when its last batch is there.
fn build_query_store(spec: &store::Spec) {
    let (mut store, tmp) = match spec {
        store::Spec::Sqlite(db) => {
            if db.exists() {
                println!("query store: reusing {}", db.display());
                return;
            }
            let tmp = db.with_extension("building");
            let _ = std::fs::remove_file(&tmp);
            let writer = store::Spec::Sqlite(tmp.clone()).writer().expect("open");
            (writer, Some(tmp))
        }
        store::Spec::ClickHouse(_) => {
            let mut writer = spec.writer().expect("open");
            let hello = v1::Hello {
                agent_id: "bench".into(),
                session: 1,
                ..Default::default()
            };
            let (_, last) = writer.hello(&hello, now_us()).expect("hello");
            let batches = STORE_EVENTS / 100_000 + STORE_SNAPSHOTS / 100 / 100;
            if last == batches {
                println!("query store: reusing {spec}");
                return;
            }
            assert_eq!(
                last, 0,
                "a half-built query store in {spec}: drop its database"
            );
            (writer, None)
        }
    };
    let now = now_us();
    let (key, _) = store
        .hello(
            &v1::Hello {
                agent_id: "bench".into(),
                session: 1,
                ..Default::default()
            },
            now,
        )
        .expect("hello");
    let started = Instant::now();
    let mut rng = Rng(42);
    let week = 7 * 86_400_000_000u64;
    let chunk = 100_000;
    let mut seq = 0;
    for c in 0..STORE_EVENTS / chunk {
        let events = (0..chunk)
            .map(|i| {
                let n = c * chunk + i;
                event(&mut rng, now - week + n * (week / STORE_EVENTS))
            })
            .collect();
        seq += 1;
        let batch = CheckedBatch {
            seq,
            events,
            ..CheckedBatch::default()
        };
        store.commit(&[(key.clone(), &batch)], now).expect("commit");
    }
    let series = 100;
    let intervals = STORE_SNAPSHOTS / series;
    let first = now - intervals * 10_000_000;
    for c in 0..intervals / 100 {
        let histograms = (0..100)
            .flat_map(|i| {
                let t = first + (c * 100 + i) * 10_000_000;
                (0..series).map(move |s| (t, s))
            })
            .map(|(t, s)| snapshot(&mut rng, t, s))
            .collect();
        seq += 1;
        let batch = CheckedBatch {
            seq,
            histograms,
            ..CheckedBatch::default()
        };
        store.commit(&[(key.clone(), &batch)], now).expect("commit");
    }
    drop(store);
    if let (Some(tmp), store::Spec::Sqlite(db)) = (tmp, spec) {
        std::fs::rename(&tmp, db).expect("rename");
        for suffix in ["-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", tmp.display()));
        }
    }
    println!(
        "query store: {STORE_EVENTS} events and {STORE_SNAPSHOTS} snapshots built in {:.0} s",
        started.elapsed().as_secs_f64(),
    );
}

/// The medians of `runs` of `slow --min-ms 10 --limit 100`, `hist --since 24h` and the
/// series (`heatmap`) of the last 24 h.
async fn time_queries(
    client: &mut QueryClient<tonic::transport::Channel>,
    runs: usize,
) -> [Duration; 3] {
    let mut slow_times = Vec::new();
    let mut hist_times = Vec::new();
    let mut series_times = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        let slow = client
            .slow(v1::SlowRequest {
                min_latency_us: 10_000,
                limit: 100,
                ..Default::default()
            })
            .await
            .expect("slow")
            .into_inner();
        slow_times.push(t.elapsed());
        assert_eq!(slow.events.len(), 100);
        let t = Instant::now();
        let hist = client
            .hist(v1::HistRequest {
                filter: Some(v1::Filter {
                    from_us: now_us() - 24 * 3_600_000_000,
                    ..Default::default()
                }),
                by: 0,
            })
            .await
            .expect("hist")
            .into_inner();
        hist_times.push(t.elapsed());
        assert!(hist.all.is_some_and(|h| h.count > 0));
        let t = Instant::now();
        let series = client
            .series(v1::SeriesRequest {
                filter: Some(v1::Filter {
                    from_us: now_us() - 24 * 3_600_000_000,
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .expect("series")
            .into_inner();
        series_times.push(t.elapsed());
        assert!(series.series.first().is_some_and(|s| s.steps.len() > 1));
    }
    [median(slow_times), median(hist_times), median(series_times)]
}

async fn queries(dir: &Path, runs: usize) {
    let spec = store_for(dir, "query.db", "bench_query");
    tokio::task::spawn_blocking({
        let spec = spec.clone();
        move || build_query_store(&spec)
    })
    .await
    .expect("build");
    let (url, stop, task) = start_server(spec.clone()).await;
    let mut client = QueryClient::connect(url).await.expect("connect");
    println!("query store: {spec}");
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let report = |[slow, hist, series]: [Duration; 3], what: &str| {
        println!(
            "query: slow --min-ms 10 --limit 100: median {:.1} ms of {runs} (over {STORE_EVENTS} events{what})",
            ms(slow)
        );
        println!(
            "query: hist --since 24h: median {:.1} ms of {runs} (over {STORE_SNAPSHOTS} snapshots{what})",
            ms(hist)
        );
        println!(
            "query: series --since 24h (72 steps): median {:.1} ms of {runs} (over {STORE_SNAPSHOTS} snapshots{what})",
            ms(series)
        );
    };
    let times = time_queries(&mut client, runs).await;
    if matches!(spec, store::Spec::ClickHouse(_)) {
        // The roll-ups as they are 15 minutes after the last batch (SQLite rolls up as
        // it stores): side by side with the snapshots alone when they were not yet.
        let started = Instant::now();
        let rolled = tokio::task::spawn_blocking({
            let spec = spec.clone();
            move || {
                spec.writer()
                    .expect("open")
                    .roll_up(now_us() + store::clickhouse::ROLLUP_SETTLE_US)
                    .expect("roll up")
            }
        })
        .await
        .expect("roll up");
        if rolled > 0 {
            println!(
                "roll-ups: {rolled} buckets rolled up in {:.1} s",
                started.elapsed().as_secs_f64()
            );
            report(times, ", before the roll-ups");
            report(time_queries(&mut client, runs).await, ", with roll-ups");
        } else {
            report(times, ", with roll-ups");
        }
    } else {
        report(times, "");
    }
    let _ = stop.send(());
    let _ = task.await;
}

fn main() {
    let dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "bench-data/fleet".into()),
    );
    std::fs::create_dir_all(&dir).expect("bench dir");
    let runs = std::env::var("RUNS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(5);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let only = std::env::var("ONLY").unwrap_or_default();
    runtime.block_on(async {
        if only != "queries" {
            ingest(&dir, 1).await;
            if std::env::var("STORE").is_ok() {
                ingest(&dir, 2).await;
            }
        }
        if only != "ingest" {
            queries(&dir, runs).await;
        }
    });
}
