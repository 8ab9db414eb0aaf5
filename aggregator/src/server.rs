//! The aggregator's services: Ingest (agents stream batches; each is acknowledged once
//! committed) and Query, over one writer thread that owns the store's [`Writer`] and a pool
//! of [`Reader`]s.
//!
//! The writer commits whatever batches are waiting in one transaction (group commit), so
//! several agents streaming at once share the cost of a commit. A batch that does not add up
//! gets `InvalidArgument` and ends its stream; a store that cannot commit (disk full) ends
//! the streams of the batches it refused with `Unavailable`, naming the cause, and the agents
//! re-send them when they reconnect.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::service::InterceptorLayer;
use tonic::{Request, Response, Status, Streaming};

use tcpkit_proto::v1::{self, agent_message::Body, ingest_server, query_server};

use crate::auth::{TlsFiles, TokenCheck};
pub use crate::check::Limits;
use crate::check::{check_batch, check_filter, check_hello};
use crate::merge::Merged;
use crate::metrics::Telemetry;
use crate::slots::SlotSum;
use crate::store::{
    self, split_command_key, CheckedBatch, Group, Reader, SessionKey, StoreError, Writer,
};

/// Batches committed together at most.
const GROUP_COMMIT: usize = 256;
/// How often retention and the roll-ups run.
const MAINTENANCE_EVERY: Duration = Duration::from_secs(60);

/// The aggregator's settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// The store.
    pub store: store::Spec,
    /// Data older than this (capture time) is deleted.
    pub retention: Option<Duration>,
    /// The oldest data is deleted while the store is larger.
    pub max_db_bytes: Option<u64>,
    /// Limits on incoming messages.
    pub limits: Limits,
    /// The shared token every call must carry, if any.
    pub token: Option<String>,
    /// TLS for the listener, if any.
    pub tls: Option<TlsFiles>,
}

/// Microseconds since the Unix epoch, now.
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Where the writer answers a job: its result, or why the store refused.
type Reply<T> = oneshot::Sender<Result<T, String>>;

enum Job {
    Hello(v1::Hello, Reply<(SessionKey, u64)>),
    Batch(SessionKey, CheckedBatch, Reply<bool>),
    /// Retention, roll-ups.
    Maintenance,
}

/// Runs the services on `listener` until `shutdown` completes, counting into `telemetry`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    config: Config,
    telemetry: Arc<Telemetry>,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    serve_with_web(listener, None, config, telemetry, shutdown).await
}

/// [`serve`], and the web page and its JSON API ([`crate::web`]) on `web` if given.
pub async fn serve_with_web(
    listener: tokio::net::TcpListener,
    web: Option<tokio::net::TcpListener>,
    config: Config,
    telemetry: Arc<Telemetry>,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    use anyhow::Context;
    let store = config
        .store
        .writer()
        .with_context(|| format!("cannot open the store {}", config.store))?;
    let (jobs, queue) = mpsc::channel::<Job>(1024);
    let writer = std::thread::Builder::new()
        .name("writer".into())
        .spawn({
            let config = config.clone();
            let telemetry = Arc::clone(&telemetry);
            move || write_loop(store, queue, &config, &telemetry)
        })
        .context("cannot start the writer thread")?;
    let maintenance_timer = tokio::spawn({
        let jobs = jobs.clone();
        async move {
            // The first a period after start: not in the rush of agents reconnecting.
            let mut tick = tokio::time::interval_at(
                tokio::time::Instant::now() + MAINTENANCE_EVERY,
                MAINTENANCE_EVERY,
            );
            loop {
                tick.tick().await;
                if jobs.send(Job::Maintenance).await.is_err() {
                    return;
                }
            }
        }
    });
    let ingest = IngestService {
        jobs,
        limits: config.limits,
        telemetry: Arc::clone(&telemetry),
    };
    let query = QueryService {
        store: config.store.clone(),
        readers: Arc::new(Mutex::new(Vec::new())),
        telemetry: Arc::clone(&telemetry),
    };
    let (stop_web, web_stopped) = oneshot::channel::<()>();
    if let Some(web) = web {
        let api = crate::web::Api {
            query: query.clone(),
            expected: config
                .token
                .as_deref()
                .map(|t| format!("Bearer {t}").into()),
        };
        let tls = config.tls.as_ref().map(TlsFiles::rustls).transpose()?;
        tokio::spawn(crate::web::serve(web, api, tls, async {
            let _ = web_stopped.await;
        }));
    }
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &config.tls {
        builder = builder
            .tls_config(tls.load()?)
            .context("bad TLS certificate or key")?;
    }
    let token_check = TokenCheck::new(config.token.as_deref(), Arc::clone(&telemetry.auth_refused));
    let result = builder
        .layer(InterceptorLayer::new(token_check))
        .add_service(
            ingest_server::IngestServer::new(ingest)
                .max_decoding_message_size(config.limits.max_message_bytes),
        )
        .add_service(
            query_server::QueryServer::new(query)
                .max_decoding_message_size(1 << 20)
                .max_encoding_message_size(config.limits.max_message_bytes.max(64 << 20)),
        )
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener)
                .with_nodelay(Some(true))
                .with_keepalive(Some(Duration::from_secs(60))),
            shutdown,
        )
        .await;
    let _ = stop_web.send(());
    maintenance_timer.abort();
    let _ = maintenance_timer.await;
    // The services are gone, and with them every sender: the writer finishes its queue.
    tokio::task::spawn_blocking(move || writer.join())
        .await
        .ok();
    result.context("the gRPC server failed")
}

/// The writer thread: hellos one by one, batches in groups, maintenance when asked.
fn write_loop(
    mut store: Box<dyn Writer>,
    mut queue: mpsc::Receiver<Job>,
    config: &Config,
    telemetry: &Telemetry,
) {
    let mut pending: Vec<(SessionKey, CheckedBatch, Reply<bool>)> = Vec::new();
    while let Some(job) = queue.blocking_recv() {
        let mut next = Some(job);
        while let Some(job) = next.take() {
            match job {
                Job::Hello(hello, reply) => {
                    let answer = store.hello(&hello, now_us()).map_err(|e| {
                        tracing::error!("cannot record the hello of {}: {e}", hello.agent_id);
                        telemetry.store_failures.fetch_add(1, Ordering::Relaxed);
                        e.to_string()
                    });
                    let _ = reply.send(answer);
                }
                Job::Batch(key, batch, reply) => pending.push((key, batch, reply)),
                Job::Maintenance => {
                    if config.retention.is_some() || config.max_db_bytes.is_some() {
                        match store.enforce_retention(
                            config.retention,
                            config.max_db_bytes,
                            now_us(),
                        ) {
                            Ok(0) => {}
                            Ok(n) => tracing::info!("retention deleted {n} rows"),
                            Err(e) => tracing::warn!("retention failed: {e}"),
                        }
                    }
                    match store.roll_up(now_us()) {
                        Ok(0) => {}
                        Ok(n) => tracing::debug!("rolled up {n} buckets"),
                        Err(e) => {
                            tracing::warn!("the roll-ups failed (reads sum snapshots): {e}");
                            telemetry.store_failures.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
            if pending.len() < GROUP_COMMIT {
                next = queue.try_recv().ok();
            }
        }
        if pending.is_empty() {
            continue;
        }
        let refs: Vec<(SessionKey, &CheckedBatch)> =
            pending.iter().map(|(k, b, _)| (k.clone(), b)).collect();
        match store.commit(&refs, now_us()) {
            Ok(stored) => {
                for ((key, batch, reply), stored) in pending.drain(..).zip(stored) {
                    if stored {
                        telemetry.stored(&key.name, &batch);
                    } else {
                        telemetry.duplicate_batches.fetch_add(1, Ordering::Relaxed);
                    }
                    let _ = reply.send(Ok(stored));
                }
            }
            Err(e) => {
                let why = e.to_string();
                tracing::error!("cannot store {} batches: {why}", pending.len());
                telemetry.store_failures.fetch_add(1, Ordering::Relaxed);
                for (_, _, reply) in pending.drain(..) {
                    let _ = reply.send(Err(why.clone()));
                }
            }
        }
    }
}

struct IngestService {
    jobs: mpsc::Sender<Job>,
    limits: Limits,
    telemetry: Arc<Telemetry>,
}

type AckStream = ReceiverStream<Result<v1::Ack, Status>>;

#[tonic::async_trait]
impl ingest_server::Ingest for IngestService {
    type StreamStream = AckStream;

    async fn stream(
        &self,
        request: Request<Streaming<v1::AgentMessage>>,
    ) -> Result<Response<AckStream>, Status> {
        let peer = request.remote_addr();
        let mut inbound = request.into_inner();
        let (acks, out) = mpsc::channel(256);
        let jobs = self.jobs.clone();
        let limits = self.limits;
        let telemetry = Arc::clone(&self.telemetry);
        tokio::spawn(async move {
            telemetry.streams.fetch_add(1, Ordering::Relaxed);
            let result = ingest(&mut inbound, &jobs, &acks, limits, &telemetry).await;
            telemetry.streams.fetch_sub(1, Ordering::Relaxed);
            if let Err(status) = result {
                tracing::warn!("agent stream from {peer:?} ended: {}", status.message());
                let _ = acks.send(Err(status)).await;
            }
        });
        Ok(Response::new(ReceiverStream::new(out)))
    }
}

/// One agent's stream: its hello, then batches, each acknowledged in order once durable.
async fn ingest(
    inbound: &mut Streaming<v1::AgentMessage>,
    jobs: &mpsc::Sender<Job>,
    acks: &mpsc::Sender<Result<v1::Ack, Status>>,
    limits: Limits,
    telemetry: &Telemetry,
) -> Result<(), Status> {
    let hello = match inbound.message().await? {
        Some(v1::AgentMessage {
            body: Some(Body::Hello(h)),
        }) => h,
        Some(_) => {
            return Err(Status::invalid_argument(
                "the first message must be a hello",
            ))
        }
        None => return Ok(()),
    };
    check_hello(&hello).map_err(|e| {
        telemetry.invalid_batches.fetch_add(1, Ordering::Relaxed);
        Status::invalid_argument(format!("bad hello: {e}"))
    })?;
    let _connection = telemetry.connected(&hello.agent_id);
    let session = hello.session;
    let (reply, answer) = oneshot::channel();
    jobs.send(Job::Hello(hello, reply))
        .await
        .map_err(|_| Status::unavailable("the aggregator is stopping"))?;
    let (key, last_seq) = answer
        .await
        .map_err(|_| Status::unavailable("the aggregator is stopping"))?
        .map_err(|e| Status::unavailable(format!("cannot store: {e}")))?;
    send_ack(acks, session, last_seq).await?;

    // Batches go to the writer as they come; their acknowledgements follow in order.
    let (committed_tx, mut committed) =
        mpsc::channel::<(u64, oneshot::Receiver<Result<bool, String>>)>(64);
    let ack_sender = {
        let acks = acks.clone();
        tokio::spawn(async move {
            while let Some((seq, done)) = committed.recv().await {
                match done.await {
                    Ok(Ok(_)) => send_ack(&acks, session, seq).await?,
                    Ok(Err(e)) => return Err(Status::unavailable(format!("cannot store: {e}"))),
                    Err(_) => return Err(Status::unavailable("the aggregator is stopping")),
                }
            }
            Ok::<(), Status>(())
        })
    };
    let mut last_sent = last_seq;
    let received = async {
        while let Some(message) = inbound.message().await? {
            let batch = match message.body {
                Some(Body::Batch(b)) => b,
                Some(Body::Hello(_)) => return Err(Status::invalid_argument("a second hello")),
                None => return Err(Status::invalid_argument("an empty message")),
            };
            let batch = check_batch(batch, &limits, now_us()).map_err(|e| {
                telemetry.invalid_batches.fetch_add(1, Ordering::Relaxed);
                Status::invalid_argument(format!("bad batch: {e}"))
            })?;
            if batch.seq <= last_sent {
                // Already stored, or sent twice on this stream: acknowledge without storing.
                telemetry.duplicate_batches.fetch_add(1, Ordering::Relaxed);
                let (reply, done) = oneshot::channel();
                let _ = reply.send(Ok(false));
                committed_tx.send((last_sent, done)).await.ok();
                continue;
            }
            last_sent = batch.seq;
            let (reply, done) = oneshot::channel();
            let seq = batch.seq;
            jobs.send(Job::Batch(key.clone(), batch, reply))
                .await
                .map_err(|_| Status::unavailable("the aggregator is stopping"))?;
            if committed_tx.send((seq, done)).await.is_err() {
                break; // the acknowledgements stopped: their task says why
            }
        }
        Ok(())
    };
    let received: Result<(), Status> = received.await;
    drop(committed_tx);
    let acked = ack_sender
        .await
        .unwrap_or_else(|e| Err(Status::internal(format!("acknowledgements failed: {e}"))));
    received.and(acked)
}

async fn send_ack(
    acks: &mpsc::Sender<Result<v1::Ack, Status>>,
    session: u64,
    seq: u64,
) -> Result<(), Status> {
    acks.send(Ok(v1::Ack { session, seq }))
        .await
        .map_err(|_| Status::cancelled("the agent went away"))
}

#[derive(Clone)]
struct QueryService {
    store: store::Spec,
    readers: Arc<Mutex<Vec<Box<dyn Reader>>>>,
    telemetry: Arc<Telemetry>,
}

impl QueryService {
    /// Runs `f` on a pooled reader on a blocking thread.
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Reader) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, Status> {
        let spec = self.store.clone();
        let readers = Arc::clone(&self.readers);
        tokio::task::spawn_blocking(move || {
            let pooled = readers.lock().ok().and_then(|mut r| r.pop());
            let reader = match pooled {
                Some(r) => r,
                None => spec
                    .reader()
                    .map_err(|e| Status::unavailable(e.to_string()))?,
            };
            let result = f(&*reader).map_err(|e| match e {
                e @ (StoreError::ClickHouse(_) | StoreError::Unreachable(_)) => {
                    Status::unavailable(e.to_string())
                }
                e => Status::internal(e.to_string()),
            });
            if let Ok(mut r) = readers.lock() {
                r.push(reader);
            }
            result
        })
        .await
        .map_err(|e| Status::internal(format!("query failed: {e}")))?
    }
}

fn group_of(by: i32) -> Result<Group, Status> {
    Ok(match v1::GroupBy::try_from(by) {
        Ok(v1::GroupBy::None) => Group::None,
        Ok(v1::GroupBy::Server) => Group::Server,
        Ok(v1::GroupBy::Agent) => Group::Agent,
        Ok(v1::GroupBy::Command) => Group::Command,
        Ok(v1::GroupBy::Port) => Group::Port,
        Ok(v1::GroupBy::Slot) => {
            return Err(Status::invalid_argument(
                "slots are kept apart from the histograms: ask top --of slot",
            ))
        }
        Ok(v1::GroupBy::Template) => {
            return Err(Status::invalid_argument(
                "key templates are kept apart from the histograms: ask tcpkit-query keys",
            ))
        }
        Err(_) => return Err(Status::invalid_argument(format!("unknown grouping {by}"))),
    })
}

/// A group's merged histogram under its key; a command's key also names its protocol.
fn histogram_of(group: Group, key: String, merged: &Merged) -> v1::Histogram {
    if group != Group::Command {
        return merged.to_proto(key);
    }
    let (proto, command) = split_command_key(&key);
    let mut h = merged.to_proto(command.to_string());
    h.proto = proto.to_string();
    h
}

impl QueryService {
    /// `top --of slot`: the Redis Cluster slots of the fleet, summed, ranked.
    async fn top_slots(
        &self,
        filter: v1::Filter,
        by: v1::TopBy,
        limit: usize,
    ) -> Result<Response<v1::TopReply>, Status> {
        if !filter.command.is_empty() {
            return Err(Status::invalid_argument(
                "slots are not kept per command: leave out --command",
            ));
        }
        let rank: fn(&SlotSum) -> u64 = match by {
            v1::TopBy::Requests | v1::TopBy::Slow => |s| s.count,
            v1::TopBy::Redirects => |s| s.moved.saturating_add(s.ask),
            v1::TopBy::P99 => |s| s.quantile_bound_us(0.99),
            v1::TopBy::Total => |s| s.sum_us,
            v1::TopBy::OwnP99 | v1::TopBy::Bytes => return Err(Status::invalid_argument(
                "own times and bytes are not kept per slot: rank slots by requests, redirects, p99 or total",
            )),
        };
        let sums = self.read(move |r| r.slots(&filter)).await?;
        let mut sums: Vec<(u16, SlotSum)> = sums.into_iter().collect();
        sums.sort_by_key(|(slot, s)| (std::cmp::Reverse(rank(s)), *slot));
        let rows = sums
            .into_iter()
            .take(limit)
            .map(|(slot, s)| s.to_proto(slot))
            .collect();
        Ok(Response::new(v1::TopReply { rows }))
    }
}

fn filter_ok(filter: Option<&v1::Filter>) -> Result<(), Status> {
    filter
        .map_or(Ok(()), check_filter)
        .map_err(|e| Status::invalid_argument(format!("bad filter: {e}")))
}

#[tonic::async_trait]
impl query_server::Query for QueryService {
    async fn slow(
        &self,
        request: Request<v1::SlowRequest>,
    ) -> Result<Response<v1::SlowReply>, Status> {
        let req = request.into_inner();
        filter_ok(req.filter.as_ref())?;
        if i64::try_from(req.min_latency_us).is_err() {
            return Err(Status::invalid_argument(format!(
                "min_latency_us {} is out of range",
                req.min_latency_us
            )));
        }
        let events = self.read(move |r| r.slow(&req)).await?;
        Ok(Response::new(v1::SlowReply { events }))
    }

    async fn hist(
        &self,
        request: Request<v1::HistRequest>,
    ) -> Result<Response<v1::HistReply>, Status> {
        let req = request.into_inner();
        let group = group_of(req.by)?;
        filter_ok(req.filter.as_ref())?;
        let filter = req.filter.unwrap_or_default();
        let groups = self.read(move |r| r.merged(&filter, group)).await?;
        let mut all = Merged::default();
        groups.values().for_each(|m| all.merge(m));
        let groups = if group == Group::None {
            Vec::new()
        } else {
            groups
                .into_iter()
                .map(|(k, m)| histogram_of(group, k, &m))
                .collect()
        };
        Ok(Response::new(v1::HistReply {
            all: Some(all.to_proto(String::new())),
            groups,
        }))
    }

    async fn top(
        &self,
        request: Request<v1::TopRequest>,
    ) -> Result<Response<v1::TopReply>, Status> {
        let req = request.into_inner();
        let by = v1::TopBy::try_from(req.by)
            .map_err(|_| Status::invalid_argument(format!("unknown ranking {}", req.by)))?;
        filter_ok(req.filter.as_ref())?;
        let limit = if req.limit == 0 {
            10
        } else {
            req.limit as usize
        };
        if req.of == v1::GroupBy::Slot as i32 {
            return self
                .top_slots(req.filter.unwrap_or_default(), by, limit)
                .await;
        }
        let templates = req.of == v1::GroupBy::Template as i32;
        let group = if templates {
            Group::Command
        } else {
            match group_of(req.of)? {
                Group::None => Group::Command,
                g => g,
            }
        };
        let filter = req.filter.unwrap_or_default();
        let groups = if templates {
            self.read(move |r| r.templates(&filter)).await?
        } else {
            self.read(move |r| r.merged(&filter, group)).await?
        };
        let mut rows: Vec<v1::Histogram> = groups
            .into_iter()
            .map(|(k, m)| histogram_of(group, k, &m))
            .collect();
        rows.sort_by_key(|h| {
            std::cmp::Reverse(match by {
                v1::TopBy::Slow => h.slow,
                v1::TopBy::P99 => h.p99_us,
                v1::TopBy::Total => h.sum_us,
                v1::TopBy::OwnP99 => h.own_p99_us,
                v1::TopBy::Requests => h.count,
                v1::TopBy::Redirects => h.moved.saturating_add(h.ask),
                v1::TopBy::Bytes => h.req_bytes.saturating_add(h.rsp_bytes),
            })
        });
        rows.truncate(limit);
        Ok(Response::new(v1::TopReply { rows }))
    }

    async fn series(
        &self,
        request: Request<v1::SeriesRequest>,
    ) -> Result<Response<v1::SeriesReply>, Status> {
        let req = request.into_inner();
        let group = group_of(req.by)?;
        filter_ok(req.filter.as_ref())?;
        let mut filter = req.filter.unwrap_or_default();
        if filter.from_us == 0 {
            return Err(Status::invalid_argument(
                "a series needs the start of its range (--since or --from)",
            ));
        }
        if filter.to_us == 0 {
            filter.to_us = now_us();
        }
        if filter.to_us <= filter.from_us {
            return Err(Status::invalid_argument(
                "the range of a series ends after it starts",
            ));
        }
        let step_us = match req.step_us {
            0 => crate::steps::step_for(filter.from_us, filter.to_us),
            s => s,
        };
        crate::steps::check_step(filter.from_us, filter.to_us, step_us)
            .map_err(Status::invalid_argument)?;
        let (from_us, to_us) = (filter.from_us, filter.to_us);
        let series = self
            .read(move |r| r.series(&filter, group, step_us))
            .await?;
        let series = series
            .into_iter()
            .map(|(key, steps)| {
                let steps: Vec<v1::SeriesStep> = steps
                    .into_iter()
                    .map(|(ts_us, m)| v1::SeriesStep {
                        ts_us,
                        histogram: Some(histogram_of(group, key.clone(), &m)),
                    })
                    .collect();
                let (proto, key) = match group {
                    Group::Command => {
                        let (proto, command) = split_command_key(&key);
                        (proto.to_string(), command.to_string())
                    }
                    _ => (String::new(), key),
                };
                v1::Series { key, proto, steps }
            })
            .collect();
        Ok(Response::new(v1::SeriesReply {
            step_us,
            from_us,
            to_us,
            series,
        }))
    }

    async fn agents(
        &self,
        _: Request<v1::AgentsRequest>,
    ) -> Result<Response<v1::AgentsReply>, Status> {
        let mut agents = self.read(|r| r.agents()).await?;
        let recent =
            now_us().saturating_sub(store::clickhouse::CONNECTED_WITHIN.as_micros() as u64);
        for a in &mut agents {
            // A shared store's agents may stream to another aggregator.
            a.connected = self.telemetry.is_connected(&a.id)
                || (self.store.shared() && a.last_seen_us >= recent);
        }
        Ok(Response::new(v1::AgentsReply { agents }))
    }
}
