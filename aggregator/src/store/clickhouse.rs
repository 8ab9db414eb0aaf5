//! The ClickHouse store, for fleets that outgrow one host: any number of stateless
//! aggregators on one ClickHouse server, or on a cluster's shards (`--clickhouse-cluster`).
//!
//! It speaks ClickHouse's HTTP interface (JSONEachRow both ways) and stays within what the
//! ClickHouse Debian ships (18.16) and current releases both accept.
//!
//! * **Exactly once without shared memory.** Every row carries its batch's key (agent,
//!   session, sequence number) and its index in the batch, and the data tables are
//!   `ReplacingMergeTree`s ordered by time then that key. A batch committed twice (re-sent to
//!   another aggregator while the first was still committing it) leaves identical rows that
//!   the engine collapses in time; duplicates share their capture time, so their partition.
//!   Until then, a commit records its attempt first and, finding another attempt at the same
//!   batch, records the batch as a suspect before it writes a row; reads sum other batches'
//!   rows as they are and collapse (`FINAL`) only the suspects' ([`Reader::exactly_once`]).
//! * **Acknowledged only when accepted.** A batch's rows go first, its row in `batches` last,
//!   each insert answered by ClickHouse before the next (`insert_distributed_sync` on a
//!   cluster); a hello reads the last stored sequence number from `batches`.
//! * **Merged inside ClickHouse.** Fine buckets are arrays of (index, count), summed per
//!   group and index through an `ARRAY JOIN`; seed and slot buckets by `sumForEach`.
//! * **Schema** created on start with `IF NOT EXISTS`, versioned in `schema_version` on every
//!   host: aggregators starting at once run the same statements. With a cluster, each table
//!   is a `*_local` MergeTree on every host named in `--store` and a `Distributed` table
//!   over them, sharded by agent.
//! * **Roll-ups** per hour and per 10 minutes, exact under re-sends and late batches by a
//!   watermark on each row's `inserted_us` ([`rollups`]).
//! * **Retention** drops whole days (`PARTITION BY` day of capture time).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tcpkit_histogram::{FineHistogram, PROM_BUCKETS, SEED_BUCKETS};
use tcpkit_proto::v1;

use super::{CheckedBatch, CheckedSnapshot, Group, Result, Series, SessionKey, StoreError};
use crate::merge::Merged;
use crate::slots::SlotSum;

/// A day, µs: the partition of the data tables.
const DAY_US: u64 = 86_400_000_000;

/// With a shared store, an agent counts as connected while it was seen this recently.
pub const CONNECTED_WITHIN: Duration = Duration::from_secs(60);

/// How long one request to ClickHouse may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// The schema's version (in `schema_version` on every host); its tables are [`TABLES`],
/// each created by [`create_table`] with statements safe to run again, so an older schema
/// is brought up to date by creating what it lacks (and [`ADDED_COLUMNS`]). 2: `attempts`
/// and `suspects`; 3: `inserted_us` and the roll-ups.
const VERSION: u32 = 3;

/// The columns added to existing tables since version 1: (version, table, column).
const ADDED_COLUMNS: &[(u32, &str, &str)] = &[
    (3, "histograms", "inserted_us UInt64"),
    (3, "templates", "inserted_us UInt64"),
];

/// A table: its columns, sorting key and partition.
struct Table {
    name: &'static str,
    columns: &'static str,
    order_by: &'static str,
    partition_by: Option<&'static str>,
    /// Rows with equal sorting keys are one (re-sent batches).
    replacing: bool,
    /// The shard of a row, on a cluster.
    shard_by: &'static str,
    /// Rows per mark of the sorting key (ClickHouse's default: 8192); fewer for fat rows.
    granularity: Option<u32>,
}

/// The columns of a merged histogram's sums (see [`Sums`]), with their types.
macro_rules! sum_columns {
    () => {
        "count UInt64, sum_us UInt64, max_us UInt64, slow UInt64, errors UInt64, \
         timeouts UInt64, seed Array(UInt64), fine_i Array(UInt32), fine_c Array(UInt64), \
         own_sum_us UInt64, own_max UInt64, own_i Array(UInt32), own_c Array(UInt64), \
         depth_max UInt64, depth_i Array(UInt32), depth_c Array(UInt64), moved UInt64, \
         ask UInt64, keys UInt64, multi_key UInt64, req_bytes UInt64, rsp_bytes UInt64"
    };
}

/// [`sum_columns`]' names.
macro_rules! sum_names {
    () => {
        "count, sum_us, max_us, slow, errors, timeouts, seed, fine_i, fine_c, own_sum_us, \
         own_max, own_i, own_c, depth_max, depth_i, depth_c, moved, ask, keys, multi_key, \
         req_bytes, rsp_bytes"
    };
}

/// The outer select list over [`ALL_SUMS`]: its maps split into [`sum_names`].
macro_rules! split_sums {
    () => {
        "count, sum_us, max_us, slow, errors, timeouts, seed, fine.1 AS fine_i, \
         fine.2 AS fine_c, own_sum_us, own_max, own.1 AS own_i, own.2 AS own_c, depth_max, \
         depth.1 AS depth_i, depth.2 AS depth_c, moved, ask, keys, multi_key, req_bytes, \
         rsp_bytes"
    };
}

mod rollups;

pub use rollups::SETTLE_US as ROLLUP_SETTLE_US;

const SUM_NAMES: &str = sum_names!();
const SPLIT_SUMS: &str = split_sums!();

/// The columns of a snapshot table. `inserted_us`: when its commit started (see
/// [`rollups`]).
const SNAPSHOT_COLUMNS: &str = concat!(
    "agent String, session UInt64, seq UInt64, n UInt32, ts_us UInt64, interval_us UInt64, \
     server String, port UInt32, proto String, command String, inserted_us UInt64, ",
    sum_columns!()
);

const BY_TIME: &str = "ts_us, agent, session, seq, n";
const DAY_OF_TS: &str = "intDiv(ts_us, 86400000000)";
const DAY_OF_BUCKET: &str = "intDiv(bucket_us, 86400000000)";
const BY_AGENT: &str = "cityHash64(agent)";

const TABLES: &[Table] = &[
    Table {
        name: "hellos",
        columns: "agent String, session UInt64, hostname String, version String, \
            ports String, ts_us UInt64",
        order_by: "agent, session, ts_us",
        partition_by: None,
        replacing: false,
        shard_by: BY_AGENT,
        granularity: None,
    },
    // One row per stored batch: its events and the agent's counters then. Not partitioned
    // (kept, as SQLite keeps sessions), so that a batch stored twice collapses whenever.
    Table {
        name: "batches",
        columns: "agent String, session UInt64, seq UInt64, committed_us UInt64, \
            events UInt64, has_counters UInt8, kernel_drops UInt64, interface_drops UInt64, \
            decode_errors UInt64, gaps UInt64, desyncs UInt64, timeouts UInt64, \
            flows_evicted UInt64, shipper_dropped_events UInt64, \
            shipper_dropped_histograms UInt64, shipper_buffered UInt64, request_lost UInt64, \
            reply_lost UInt64, uncertain UInt64, reply_before_request UInt64, clock_skew UInt64",
        order_by: "agent, session, seq",
        partition_by: None,
        replacing: true,
        shard_by: BY_AGENT,
        granularity: None,
    },
    // One row per attempt to commit a batch, written before any of its rows.
    Table {
        name: "attempts",
        columns: "agent String, session UInt64, seq UInt64, started_us UInt64",
        order_by: "agent, session, seq",
        partition_by: None,
        replacing: false,
        shard_by: BY_AGENT,
        granularity: None,
    },
    // The batches that more than one attempt may have written (duplicate rows possible),
    // written by an attempt that saw another before it writes any row.
    Table {
        name: "suspects",
        columns: "agent String, session UInt64, seq UInt64, found_us UInt64",
        order_by: "agent, session, seq",
        partition_by: None,
        replacing: true,
        shard_by: BY_AGENT,
        granularity: None,
    },
    Table {
        name: "events",
        columns: "agent String, session UInt64, seq UInt64, n UInt32, ts_us UInt64, \
            req_done_us UInt64, client String, server String, port UInt32, proto String, \
            command String, summary String, latency_us UInt64, req_bytes UInt64, \
            rsp_bytes UInt64, status Int32, own_us UInt64, depth UInt32",
        order_by: BY_TIME,
        partition_by: Some(DAY_OF_TS),
        replacing: true,
        shard_by: BY_AGENT,
        granularity: None,
    },
    Table {
        name: "histograms",
        columns: SNAPSHOT_COLUMNS,
        order_by: BY_TIME,
        partition_by: Some(DAY_OF_TS),
        replacing: true,
        shard_by: BY_AGENT,
        granularity: None,
    },
    Table {
        name: "templates",
        columns: SNAPSHOT_COLUMNS,
        order_by: BY_TIME,
        partition_by: Some(DAY_OF_TS),
        replacing: true,
        shard_by: BY_AGENT,
        granularity: None,
    },
    Table {
        name: "slots",
        columns: "agent String, session UInt64, seq UInt64, n UInt32, ts_us UInt64, \
            interval_us UInt64, server String, port UInt32, slot UInt16, count UInt64, \
            sum_us UInt64, moved UInt64, ask UInt64, buckets Array(UInt64)",
        order_by: BY_TIME,
        partition_by: Some(DAY_OF_TS),
        replacing: true,
        shard_by: BY_AGENT,
        granularity: None,
    },
    // Roll-ups of `histograms` (see [`rollups`]): a bucket's rows at one watermark, then
    // its mark once they are all in, then the compaction's.
    Table {
        name: "rollups",
        columns: rollups::ROLLUP_COLUMNS,
        order_by: "span_us, bucket_us, w_us, agent, server, port, proto, command",
        partition_by: Some(DAY_OF_BUCKET),
        replacing: false,
        shard_by: BY_AGENT,
        // Hundreds of buckets a row: a query reads a few hundred rows, not 8192.
        granularity: Some(256),
    },
    Table {
        name: "rollup_marks",
        columns: "span_us UInt64, bucket_us UInt64, w_us UInt64, done_us UInt64",
        order_by: "span_us, bucket_us, w_us",
        partition_by: Some(DAY_OF_BUCKET),
        replacing: false,
        shard_by: "cityHash64(bucket_us)",
        granularity: None,
    },
    Table {
        name: "compactions",
        columns: "w_us UInt64, done_us UInt64",
        order_by: "w_us",
        partition_by: None,
        replacing: false,
        shard_by: "cityHash64(w_us)",
        granularity: None,
    },
];

/// Where ClickHouse is and how to reach it.
#[derive(Clone)]
pub struct Settings {
    /// `host:port` of each server of the HTTP interface, tried in order.
    pub hosts: Vec<String>,
    /// The database (created when missing).
    pub database: String,
    /// The user.
    pub user: String,
    /// The user's password (from `--store-password-file`).
    pub password: Option<String>,
    /// HTTPS.
    pub tls: bool,
    /// The CA that signed the servers' certificates (PEM); the web's roots without it.
    pub ca: Option<PathBuf>,
    /// The cluster (`remote_servers`) to shard over: local tables plus `Distributed` ones.
    pub cluster: Option<String>,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self}")
    }
}

impl std::fmt::Display for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls {
            "clickhouse+https"
        } else {
            "clickhouse"
        };
        write!(
            f,
            "{scheme}://{}@{}/{}",
            self.user,
            self.hosts.join(","),
            self.database
        )?;
        if let Some(c) = &self.cluster {
            write!(f, " (cluster {c})")?;
        }
        Ok(())
    }
}

/// A user name: letters, digits, `_`, `-` and `.` (it only goes in a header).
fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

/// A database name as written unquoted in SQL: letters, digits and `_`, not a digit first.
fn is_identifier(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && !s.as_bytes()[0].is_ascii_digit()
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

impl Settings {
    /// Reads `clickhouse://[USER@]HOST:PORT[,HOST:PORT…]/DATABASE` (`clickhouse+https://`
    /// for TLS). A password in the URL is refused: it goes in a file, never in argv.
    pub fn parse(url: &str) -> Result<Self, String> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("clickhouse+https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("clickhouse://") {
            (false, r)
        } else {
            return Err(format!(
                "{url:?}: a ClickHouse store is clickhouse://HOST:PORT/DATABASE or clickhouse+https://…"
            ));
        };
        let (authority, database) = rest.split_once('/').ok_or_else(|| {
            format!(
                "{url:?} names no database: add /DATABASE, e.g. clickhouse://127.0.0.1:8123/tcpkit"
            )
        })?;
        if !is_identifier(database) {
            return Err(format!(
                "{database:?} is not a database name (letters, digits and _)"
            ));
        }
        let (user, hosts) = match authority.rsplit_once('@') {
            Some((user, hosts)) => {
                if user.contains(':') {
                    return Err(
                        "a password does not go in the store URL: use --store-password-file".into(),
                    );
                }
                if !is_name(user) {
                    return Err(format!("{user:?} is not a user name"));
                }
                (user.to_string(), hosts)
            }
            None => ("default".to_string(), authority),
        };
        let default_port = if tls { 8443 } else { 8123 };
        let hosts = hosts
            .split(',')
            .map(|h| {
                if h.is_empty() {
                    return Err(format!("{url:?}: an empty host"));
                }
                if h.contains(['/', '?', '#', ' ']) {
                    return Err(format!("{h:?} is not HOST:PORT"));
                }
                // [v6]:port, host:port, or a host alone.
                let has_port = match h.rfind(':') {
                    Some(i) => h[i + 1..].parse::<u16>().is_ok() && !h[..i].ends_with(':'),
                    None => false,
                };
                Ok(if has_port {
                    h.to_string()
                } else {
                    format!("{h}:{default_port}")
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Settings {
            hosts,
            database: database.to_string(),
            user,
            password: None,
            tls,
            ca: None,
            cluster: None,
        })
    }

    /// The name of a table as queried: the `Distributed` one on a cluster.
    fn table(&self, name: &str) -> String {
        format!("{}.{name}", self.database)
    }

    /// The name of a table's part on one host.
    fn local_table(&self, name: &str) -> String {
        match &self.cluster {
            Some(_) => format!("{}.{name}_local", self.database),
            None => self.table(name),
        }
    }
}

/// The condition that a row is of one batch.
fn batch_is(agent: &str, session: u64, seq: u64) -> String {
    format!(
        "(agent = {} AND session = {session} AND seq = {seq})",
        quote(agent)
    )
}

/// A ClickHouse string literal.
fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\'' => out.push_str("\\'"),
            '\0' => out.push_str("\\0"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// SQLite's `GLOB` as an RE2 pattern matching the whole text: `*` any run, `?` one
/// character, `[…]` a class (`[^…]` negated), every other character itself.
fn glob_to_regex(glob: &str) -> String {
    let mut out = String::from("(?s)^");
    let chars: Vec<char> = glob.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            '*' => out.push_str(".*"),
            '?' => out.push('.'),
            '[' => {
                // A class runs to the next `]` that is not its first character.
                let mut j = i + 1;
                if chars.get(j) == Some(&'^') {
                    j += 1;
                }
                if chars.get(j) == Some(&']') {
                    j += 1;
                }
                while j < chars.len() && chars[j] != ']' {
                    j += 1;
                }
                if j >= chars.len() {
                    // Unclosed: SQLite matches nothing.
                    return "(?s)^\\b\\B$".into();
                }
                out.push('[');
                let mut k = i + 1;
                if chars[k] == '^' {
                    out.push('^');
                    k += 1;
                }
                for &c in &chars[k..j] {
                    if matches!(c, '\\' | '[' | ']') {
                        out.push('\\');
                    }
                    out.push(c);
                }
                out.push(']');
                i = j;
            }
            c => {
                if "\\.+*?()|[]{}^$".contains(c) {
                    out.push('\\');
                }
                out.push(c);
            }
        }
        i += 1;
    }
    out.push('$');
    out
}

/// The HTTP side: one agent, the hosts in order, the one that answered last first.
struct Client {
    http: ureq::Agent,
    urls: Vec<String>,
    database: String,
    auth: String,
    /// Settings every request carries.
    params: Vec<(&'static str, &'static str)>,
    current: AtomicUsize,
}

impl Client {
    fn new(s: &Settings) -> Result<Self> {
        let mut http = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(5))
            .timeout(REQUEST_TIMEOUT);
        if s.tls {
            http = http.tls_config(Arc::new(tls_config(s.ca.as_deref())?));
        }
        let scheme = if s.tls { "https" } else { "http" };
        let credentials = format!("{}:{}", s.user, s.password.as_deref().unwrap_or(""));
        let mut params = vec![("output_format_json_quote_64bit_integers", "0")];
        if s.cluster.is_some() {
            // An insert into a Distributed table returns once every shard has it.
            params.push(("insert_distributed_sync", "1"));
        }
        Ok(Client {
            http: http.build(),
            urls: s.hosts.iter().map(|h| format!("{scheme}://{h}/")).collect(),
            database: s.database.clone(),
            auth: format!(
                "Basic {}",
                base64::Engine::encode(&base64::engine::general_purpose::STANDARD, credentials)
            ),
            params,
            current: AtomicUsize::new(0),
        })
    }

    /// Runs `sql` (with `body` as its data, for an insert) on the host that answered last,
    /// or the next ones when it cannot be reached.
    fn run(&self, sql: &str, body: &[u8]) -> Result<String> {
        self.run_until(sql, body, None)
    }

    /// [`Client::run`], given up at `deadline`: nothing is sent after it, and a request
    /// still running then is cut.
    fn run_until(&self, sql: &str, body: &[u8], deadline: Option<Instant>) -> Result<String> {
        let first = self.current.load(Ordering::Relaxed);
        let mut unreachable = Vec::new();
        for k in 0..self.urls.len() {
            let i = (first + k) % self.urls.len();
            let timeout = match deadline {
                None => REQUEST_TIMEOUT,
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => left.min(REQUEST_TIMEOUT),
                    _ => {
                        unreachable.push("the commit ran out of time".to_string());
                        break;
                    }
                },
            };
            match self.run_on(i, sql, body, true, timeout) {
                Ok(text) => {
                    self.current.store(i, Ordering::Relaxed);
                    return Ok(text);
                }
                Err(Unreached(why)) => unreachable.push(why),
                Err(Refused(why)) => return Err(StoreError::ClickHouse(why)),
            }
        }
        Err(StoreError::Unreachable(unreachable.join("; ")))
    }

    /// Runs `sql` on host `i` only; `with_db` false before the database exists.
    fn run_on(
        &self,
        i: usize,
        sql: &str,
        body: &[u8],
        with_db: bool,
        timeout: Duration,
    ) -> std::result::Result<String, Failure> {
        let url = &self.urls[i];
        let mut req = self
            .http
            .post(url)
            .timeout(timeout)
            .set("Authorization", &self.auth);
        if with_db {
            req = req.query("database", &self.database);
        }
        for (k, v) in &self.params {
            req = req.query(k, v);
        }
        let result = if body.is_empty() {
            req.send_string(sql)
        } else {
            req.query("query", sql).send_bytes(body)
        };
        match result {
            Ok(resp) => resp
                .into_string()
                .map_err(|e| Unreached(format!("{url}: {e}"))),
            Err(ureq::Error::Status(code, resp)) => {
                let text = resp.into_string().unwrap_or_default();
                let text = text.trim();
                Err(Refused(format!("{url} answered {code}: {text}")))
            }
            Err(ureq::Error::Transport(t)) => {
                // A certificate nobody vouches for is refused, not unreachable: trying again
                // will not help.
                if is_tls_failure(&t) {
                    Err(Refused(format!("TLS to {url} failed: {t}")))
                } else {
                    Err(Unreached(format!("cannot reach {url}: {t}")))
                }
            }
        }
    }

    /// A query's rows (`FORMAT JSONEachRow` is added).
    fn rows<T: serde::de::DeserializeOwned>(&self, sql: &str) -> Result<Vec<T>> {
        let text = self.run(&format!("{sql} FORMAT JSONEachRow"), b"")?;
        text.lines()
            .filter(|l| !l.is_empty())
            .map(|l| {
                serde_json::from_str(l)
                    .map_err(|e| StoreError::ClickHouse(format!("unexpected row {l:?}: {e}")))
            })
            .collect()
    }

    /// Inserts `rows` into `table` (nothing when there are none).
    fn insert<T: Serialize>(&self, table: &str, rows: &[T]) -> Result<()> {
        self.insert_until(table, rows, None)
    }

    /// [`Client::insert`], given up at `deadline`.
    fn insert_until<T: Serialize>(
        &self,
        table: &str,
        rows: &[T],
        deadline: Option<Instant>,
    ) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut body = Vec::with_capacity(rows.len() * 256);
        for r in rows {
            serde_json::to_writer(&mut body, r)
                .map_err(|e| StoreError::ClickHouse(format!("cannot encode a row: {e}")))?;
            body.push(b'\n');
        }
        self.run_until(
            &format!("INSERT INTO {table} FORMAT JSONEachRow"),
            &body,
            deadline,
        )?;
        Ok(())
    }
}

/// Why a request failed: the host could not be reached (try another), or it answered no.
enum Failure {
    Unreached(String),
    Refused(String),
}
use Failure::{Refused, Unreached};

impl Failure {
    fn into_error(self) -> StoreError {
        match self {
            Unreached(why) => StoreError::Unreachable(why),
            Refused(why) => StoreError::ClickHouse(why),
        }
    }
}

/// Whether rustls refused somewhere down the error's sources.
fn is_tls_failure(t: &ureq::Transport) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(t);
    while let Some(e) = source {
        if e.is::<rustls::Error>() {
            return true;
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if io
                .get_ref()
                .is_some_and(|inner| inner.is::<rustls::Error>())
            {
                return true;
            }
        }
        source = e.source();
    }
    false
}

fn tls_config(ca: Option<&std::path::Path>) -> Result<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|i| i.collect::<std::result::Result<Vec<_>, _>>())
                .map_err(|e| {
                    StoreError::ClickHouse(format!(
                        "cannot read --store-ca {}: {e}",
                        path.display()
                    ))
                })?;
            if certs.is_empty() {
                return Err(StoreError::ClickHouse(format!(
                    "--store-ca {} holds no certificate",
                    path.display()
                )));
            }
            for c in certs {
                roots.add(c).map_err(|e| {
                    StoreError::ClickHouse(format!("--store-ca {}: {e}", path.display()))
                })?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| StoreError::ClickHouse(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// The `CREATE` statements of a table on one host.
fn create_table(s: &Settings, t: &Table) -> Vec<String> {
    let engine = if t.replacing {
        "ReplacingMergeTree"
    } else {
        "MergeTree"
    };
    let partition = t
        .partition_by
        .map(|p| format!(" PARTITION BY {p}"))
        .unwrap_or_default();
    let local = s.local_table(t.name);
    let settings = t
        .granularity
        .map(|g| format!(" SETTINGS index_granularity = {g}"))
        .unwrap_or_default();
    let mut out = vec![format!(
        "CREATE TABLE IF NOT EXISTS {local} ({}) ENGINE = {engine}{partition} ORDER BY ({}){settings}",
        t.columns, t.order_by
    )];
    if let Some(cluster) = &s.cluster {
        out.push(format!(
            "CREATE TABLE IF NOT EXISTS {} AS {local} ENGINE = Distributed({}, {}, {}_local, {})",
            s.table(t.name),
            quote(cluster),
            s.database,
            t.name,
            t.shard_by
        ));
    }
    out
}

/// Creates (or checks) the schema on every host. Unreachable hosts are an error: a
/// cluster's tables must exist on each.
fn migrate(s: &Settings, client: &Client) -> Result<()> {
    for i in 0..client.urls.len() {
        let run = |sql: &str, with_db: bool| {
            client
                .run_on(i, sql, b"", with_db, REQUEST_TIMEOUT)
                .map_err(Failure::into_error)
        };
        run(
            &format!("CREATE DATABASE IF NOT EXISTS {}", s.database),
            false,
        )?;
        let versions = format!("{}.schema_version", s.database);
        run(
            &format!(
                "CREATE TABLE IF NOT EXISTS {versions} (version UInt32, ts_us UInt64) \
                 ENGINE = MergeTree ORDER BY version"
            ),
            true,
        )?;
        let found: u32 = run(&format!("SELECT max(version) FROM {versions}"), true)?
            .trim()
            .parse()
            .unwrap_or(0);
        if found > VERSION {
            return Err(StoreError::NewerSchema {
                found: i64::from(found),
                known: i64::from(VERSION),
            });
        }
        if found == VERSION {
            continue;
        }
        for t in TABLES {
            for sql in create_table(s, t) {
                run(&sql, true)?;
            }
        }
        for (_, table, column) in ADDED_COLUMNS.iter().filter(|(v, ..)| *v > found) {
            let mut tables = vec![s.local_table(table)];
            if s.cluster.is_some() {
                tables.push(s.table(table));
            }
            for t in tables {
                // No IF NOT EXISTS in 18.16: "column with this name already exists" (code
                // 44) when just created, or added by another aggregator starting too.
                match run(&format!("ALTER TABLE {t} ADD COLUMN {column}"), true) {
                    Err(StoreError::ClickHouse(why))
                        if why.contains("Code: 44,") || why.contains("Code: 44.") => {}
                    other => {
                        other?;
                    }
                }
            }
        }
        run(
            &format!(
                "INSERT INTO {versions} VALUES ({VERSION}, {})",
                crate::server::now_us()
            ),
            true,
        )?;
    }
    Ok(())
}

#[derive(Serialize)]
struct HelloRow<'a> {
    agent: &'a str,
    session: u64,
    hostname: &'a str,
    version: &'a str,
    ports: String,
    ts_us: u64,
}

#[derive(Serialize)]
struct BatchRow<'a> {
    agent: &'a str,
    session: u64,
    seq: u64,
    committed_us: u64,
    events: u64,
    has_counters: u8,
    #[serde(flatten)]
    counters: Counters,
}

/// An agent's counters as columns (of `batches`, and of the sums read back).
#[derive(Serialize, Deserialize, Default)]
struct Counters {
    kernel_drops: u64,
    interface_drops: u64,
    decode_errors: u64,
    gaps: u64,
    desyncs: u64,
    timeouts: u64,
    flows_evicted: u64,
    shipper_dropped_events: u64,
    shipper_dropped_histograms: u64,
    shipper_buffered: u64,
    request_lost: u64,
    reply_lost: u64,
    uncertain: u64,
    reply_before_request: u64,
    clock_skew: u64,
}

/// [`Counters`]' columns.
const COUNTERS: [&str; 15] = [
    "kernel_drops",
    "interface_drops",
    "decode_errors",
    "gaps",
    "desyncs",
    "timeouts",
    "flows_evicted",
    "shipper_dropped_events",
    "shipper_dropped_histograms",
    "shipper_buffered",
    "request_lost",
    "reply_lost",
    "uncertain",
    "reply_before_request",
    "clock_skew",
];

impl From<v1::Counters> for Counters {
    fn from(c: v1::Counters) -> Self {
        Counters {
            kernel_drops: c.kernel_drops,
            interface_drops: c.interface_drops,
            decode_errors: c.decode_errors,
            gaps: c.gaps,
            desyncs: c.desyncs,
            timeouts: c.timeouts,
            flows_evicted: c.flows_evicted,
            shipper_dropped_events: c.shipper_dropped_events,
            shipper_dropped_histograms: c.shipper_dropped_histograms,
            shipper_buffered: c.shipper_buffered,
            request_lost: c.request_lost,
            reply_lost: c.reply_lost,
            uncertain: c.uncertain,
            reply_before_request: c.reply_before_request,
            clock_skew: c.clock_skew,
        }
    }
}

impl From<Counters> for v1::Counters {
    fn from(c: Counters) -> Self {
        v1::Counters {
            kernel_drops: c.kernel_drops,
            interface_drops: c.interface_drops,
            decode_errors: c.decode_errors,
            gaps: c.gaps,
            desyncs: c.desyncs,
            timeouts: c.timeouts,
            flows_evicted: c.flows_evicted,
            shipper_dropped_events: c.shipper_dropped_events,
            shipper_dropped_histograms: c.shipper_dropped_histograms,
            shipper_buffered: c.shipper_buffered,
            request_lost: c.request_lost,
            reply_lost: c.reply_lost,
            uncertain: c.uncertain,
            reply_before_request: c.reply_before_request,
            clock_skew: c.clock_skew,
        }
    }
}

/// The key of a row: its batch and its place in it.
#[derive(Serialize, Clone, Copy)]
struct RowKey<'a> {
    agent: &'a str,
    session: u64,
    seq: u64,
    n: u32,
}

#[derive(Serialize)]
struct EventRow<'a> {
    #[serde(flatten)]
    key: RowKey<'a>,
    ts_us: u64,
    req_done_us: u64,
    client: &'a str,
    server: &'a str,
    port: u32,
    proto: &'a str,
    command: &'a str,
    summary: &'a str,
    latency_us: u64,
    req_bytes: u64,
    rsp_bytes: u64,
    status: i32,
    own_us: u64,
    depth: u32,
}

/// A fine histogram's non-empty buckets as two arrays.
fn buckets(h: &FineHistogram) -> (Vec<u32>, Vec<u64>) {
    h.nonzero().unzip()
}

#[derive(Serialize)]
struct SnapshotRow<'a> {
    #[serde(flatten)]
    key: RowKey<'a>,
    ts_us: u64,
    interval_us: u64,
    server: &'a str,
    port: u32,
    proto: &'a str,
    command: &'a str,
    inserted_us: u64,
    #[serde(flatten)]
    sums: Sums,
}

fn snapshot_row<'a>(key: RowKey<'a>, h: &'a CheckedSnapshot, inserted_us: u64) -> SnapshotRow<'a> {
    SnapshotRow {
        inserted_us,
        key,
        ts_us: h.ts_us,
        interval_us: h.interval_us,
        server: &h.server,
        port: h.port,
        proto: &h.proto,
        command: &h.command,
        sums: Sums::of(&h.merged),
    }
}

/// A merged histogram's columns, as written and as summed.
#[derive(Serialize, Deserialize, Default)]
#[serde(default)]
struct Sums {
    count: u64,
    sum_us: u64,
    max_us: u64,
    slow: u64,
    errors: u64,
    timeouts: u64,
    seed: Vec<u64>,
    fine_i: Vec<u32>,
    fine_c: Vec<u64>,
    own_sum_us: u64,
    own_max: u64,
    own_i: Vec<u32>,
    own_c: Vec<u64>,
    depth_max: u64,
    depth_i: Vec<u32>,
    depth_c: Vec<u64>,
    moved: u64,
    ask: u64,
    keys: u64,
    multi_key: u64,
    req_bytes: u64,
    rsp_bytes: u64,
}

impl Sums {
    fn of(m: &Merged) -> Self {
        let (fine_i, fine_c) = buckets(&m.fine);
        let (own_i, own_c) = buckets(&m.own);
        let (depth_i, depth_c) = buckets(&m.depth);
        Sums {
            count: m.count,
            sum_us: m.sum_us,
            max_us: m.fine.max_us(),
            slow: m.slow,
            errors: m.errors,
            timeouts: m.timeouts,
            seed: m.seed.to_vec(),
            fine_i,
            fine_c,
            own_sum_us: m.own_sum_us,
            own_max: m.own.max_us(),
            own_i,
            own_c,
            depth_max: m.depth.max_us(),
            depth_i,
            depth_c,
            moved: m.moved,
            ask: m.ask,
            keys: m.keys,
            multi_key: m.multi_key,
            req_bytes: m.req_bytes,
            rsp_bytes: m.rsp_bytes,
        }
    }

    fn into_merged(self) -> Result<Merged> {
        let fine = |i: Vec<u32>, c: Vec<u64>, max: u64| {
            FineHistogram::from_nonzero(i.into_iter().zip(c), max)
                .map_err(|e| StoreError::Histogram(e.into()))
        };
        let mut seed = [0; SEED_BUCKETS];
        if !self.seed.is_empty() {
            if self.seed.len() != SEED_BUCKETS {
                return Err(StoreError::Histogram(
                    crate::merge::SnapshotError::SeedBuckets(self.seed.len()),
                ));
            }
            seed.copy_from_slice(&self.seed);
        }
        Ok(Merged {
            count: self.count,
            sum_us: self.sum_us,
            slow: self.slow,
            errors: self.errors,
            timeouts: self.timeouts,
            seed,
            fine: fine(self.fine_i, self.fine_c, self.max_us)?,
            own_sum_us: self.own_sum_us,
            own: fine(self.own_i, self.own_c, self.own_max)?,
            depth: fine(self.depth_i, self.depth_c, self.depth_max)?,
            moved: self.moved,
            ask: self.ask,
            keys: self.keys,
            multi_key: self.multi_key,
            req_bytes: self.req_bytes,
            rsp_bytes: self.rsp_bytes,
        })
    }
}

/// The select list that sums a snapshot table's scalar columns into [`Sums`] (the fine
/// buckets are summed apart, see [`Reader::snapshot_sums`]).
const SCALAR_SUMS: &str = "sum(count) AS count, sum(sum_us) AS sum_us, max(max_us) AS max_us, \
    sum(slow) AS slow, sum(errors) AS errors, sum(timeouts) AS timeouts, \
    sumForEach(seed) AS seed, sum(own_sum_us) AS own_sum_us, max(own_max) AS own_max, \
    max(depth_max) AS depth_max, sum(moved) AS moved, sum(ask) AS ask, sum(keys) AS keys, \
    sum(multi_key) AS multi_key, sum(req_bytes) AS req_bytes, sum(rsp_bytes) AS rsp_bytes";

/// The select list that sums every column of a snapshot table in one query (`sumMap` for
/// the fine buckets: slower, but one read), split back into [`Sums`] by [`SPLIT_COLUMNS`].
const ALL_SUMS: &str = "sum(count) AS count, sum(sum_us) AS sum_us, max(max_us) AS max_us, \
    sum(slow) AS slow, sum(errors) AS errors, sum(timeouts) AS timeouts, \
    sumForEach(seed) AS seed, sumMap(fine_i, fine_c) AS fine, \
    sum(own_sum_us) AS own_sum_us, max(own_max) AS own_max, sumMap(own_i, own_c) AS own, \
    max(depth_max) AS depth_max, sumMap(depth_i, depth_c) AS depth, \
    sum(moved) AS moved, sum(ask) AS ask, sum(keys) AS keys, sum(multi_key) AS multi_key, \
    sum(req_bytes) AS req_bytes, sum(rsp_bytes) AS rsp_bytes";

/// The outer select list over [`ALL_SUMS`], with the group's key.
const SPLIT_COLUMNS: &str = concat!("k, ", split_sums!());

/// More suspect batches than this: every read collapses duplicates (`FINAL`) instead.
const MAX_SUSPECTS: usize = 1000;

#[derive(Serialize)]
struct SlotRow<'a> {
    #[serde(flatten)]
    key: RowKey<'a>,
    ts_us: u64,
    interval_us: u64,
    server: &'a str,
    port: u32,
    slot: u16,
    count: u64,
    sum_us: u64,
    moved: u64,
    ask: u64,
    buckets: Vec<u64>,
}

/// The writing side.
pub struct Store {
    settings: Settings,
    client: Client,
    /// The schema is in place on every host (else it is tried again before each use).
    migrated: bool,
}

impl Store {
    /// Connects and creates or checks the schema. ClickHouse unreachable is not an error
    /// here: the schema is tried again before each write, and the writes fail (agents keep
    /// their batches) until it is up. ClickHouse refusing (a wrong password, a newer
    /// schema) is.
    pub fn open(settings: &Settings) -> Result<Self> {
        let client = Client::new(settings)?;
        let mut store = Store {
            settings: settings.clone(),
            client,
            migrated: false,
        };
        match store.ready() {
            Ok(()) => {}
            Err(e @ StoreError::Unreachable(_)) => {
                tracing::warn!("{e}; trying again before each write")
            }
            Err(e) => return Err(e),
        }
        Ok(store)
    }

    fn ready(&mut self) -> Result<()> {
        if !self.migrated {
            migrate(&self.settings, &self.client)?;
            self.migrated = true;
        }
        Ok(())
    }

    /// The last sequence number stored of each session.
    fn last_seqs(&self, sessions: &[(&str, u64)]) -> Result<HashMap<(String, u64), u64>> {
        #[derive(Deserialize)]
        struct Row {
            agent: String,
            session: u64,
            seq: u64,
        }
        if sessions.is_empty() {
            return Ok(HashMap::new());
        }
        let any = sessions
            .iter()
            .map(|(a, s)| format!("(agent = {} AND session = {s})", quote(a)))
            .collect::<Vec<_>>()
            .join(" OR ");
        let rows: Vec<Row> = self.client.rows(&format!(
            "SELECT agent, session, max(seq) AS seq FROM {} WHERE {any} GROUP BY agent, session",
            self.settings.table("batches")
        ))?;
        Ok(rows
            .into_iter()
            .map(|r| ((r.agent, r.session), r.seq))
            .collect())
    }

    /// Records this attempt at `marks`' batches, and as suspects those another attempt
    /// may have written too: before any of their rows, so that a reader who sees a
    /// duplicate row sees its suspect after (see [`Reader::exactly_once`]).
    fn mark_attempts(&self, marks: &[BatchRow<'_>], now_us: u64) -> Result<()> {
        #[derive(Serialize, Deserialize)]
        struct Attempt {
            agent: String,
            session: u64,
            seq: u64,
        }
        if marks.is_empty() {
            return Ok(());
        }
        #[derive(Serialize)]
        struct Row<'a> {
            agent: &'a str,
            session: u64,
            seq: u64,
            started_us: u64,
        }
        let rows: Vec<Row<'_>> = marks
            .iter()
            .map(|m| Row {
                agent: m.agent,
                session: m.session,
                seq: m.seq,
                started_us: now_us,
            })
            .collect();
        self.client
            .insert(&self.settings.table("attempts"), &rows)?;
        let any = marks
            .iter()
            .map(|m| batch_is(m.agent, m.session, m.seq))
            .collect::<Vec<_>>()
            .join(" OR ");
        let twice: Vec<Attempt> = self.client.rows(&format!(
            "SELECT agent, session, seq FROM {} WHERE {any} GROUP BY agent, session, seq \
             HAVING count() > 1",
            self.settings.table("attempts")
        ))?;
        if twice.is_empty() {
            return Ok(());
        }
        tracing::info!(
            "{} batches were sent to more than one commit (a re-send after a disconnect): \
             read without their duplicates",
            twice.len()
        );
        #[derive(Serialize)]
        struct Suspect<'a> {
            agent: &'a str,
            session: u64,
            seq: u64,
            found_us: u64,
        }
        let suspects: Vec<Suspect<'_>> = twice
            .iter()
            .map(|a| Suspect {
                agent: &a.agent,
                session: a.session,
                seq: a.seq,
                found_us: now_us,
            })
            .collect();
        self.client
            .insert(&self.settings.table("suspects"), &suspects)
    }

    /// The data partitions (day, bytes) over every host, oldest first.
    fn partitions(&self) -> Result<BTreeMap<u64, u64>> {
        #[derive(Deserialize)]
        struct Row {
            partition: String,
            bytes: u64,
        }
        let suffix = if self.settings.cluster.is_some() {
            "_local"
        } else {
            ""
        };
        let names = TABLES
            .iter()
            .filter(|t| t.partition_by.is_some())
            .map(|t| quote(&format!("{}{suffix}", t.name)))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "SELECT partition, sum(bytes_on_disk) AS bytes FROM system.parts \
             WHERE active AND database = {} AND table IN ({names}) GROUP BY partition \
             FORMAT JSONEachRow",
            quote(&self.settings.database)
        );
        let mut days = BTreeMap::new();
        for i in 0..self.client.urls.len() {
            let text = self
                .client
                .run_on(i, &sql, b"", true, REQUEST_TIMEOUT)
                .map_err(Failure::into_error)?;
            for line in text.lines().filter(|l| !l.is_empty()) {
                let row: Row = serde_json::from_str(line)
                    .map_err(|e| StoreError::ClickHouse(format!("system.parts: {e}")))?;
                if let Ok(day) = row.partition.parse::<u64>() {
                    *days.entry(day).or_insert(0) += row.bytes;
                }
            }
        }
        Ok(days)
    }

    /// Drops one day of every data table on every host.
    fn drop_day(&self, day: u64) -> Result<()> {
        for i in 0..self.client.urls.len() {
            for t in TABLES.iter().filter(|t| t.partition_by.is_some()) {
                let sql = format!(
                    "ALTER TABLE {} DROP PARTITION {day}",
                    self.settings.local_table(t.name)
                );
                self.client
                    .run_on(i, &sql, b"", true, REQUEST_TIMEOUT)
                    .map_err(Failure::into_error)?;
            }
        }
        Ok(())
    }
}

impl super::Writer for Store {
    fn hello(&mut self, hello: &v1::Hello, now_us: u64) -> Result<(SessionKey, u64)> {
        self.ready()?;
        self.client.insert(
            &self.settings.table("hellos"),
            &[HelloRow {
                agent: &hello.agent_id,
                session: hello.session,
                hostname: &hello.hostname,
                version: &hello.version,
                ports: super::ports_text(hello),
                ts_us: now_us,
            }],
        )?;
        let last = self
            .last_seqs(&[(&hello.agent_id, hello.session)])?
            .into_values()
            .next()
            .unwrap_or(0);
        Ok((
            SessionKey {
                agent: 0,
                name: hello.agent_id.as_str().into(),
                session: hello.session,
            },
            last,
        ))
    }

    /// The rows of every new batch, table by table, then their rows in `batches`: a batch
    /// counts as stored once that last insert is accepted.
    fn commit(
        &mut self,
        batches: &[(SessionKey, &CheckedBatch)],
        now_us: u64,
    ) -> Result<Vec<bool>> {
        // Nothing is inserted after this: a roll-up takes every row inserted before its
        // watermark to be in (see [`rollups`]).
        let deadline = Instant::now() + rollups::ABANDON;
        self.ready()?;
        let mut sessions: Vec<(&str, u64)> =
            batches.iter().map(|(k, _)| (&*k.name, k.session)).collect();
        sessions.sort_unstable();
        sessions.dedup();
        let mut last = self.last_seqs(&sessions)?;
        let mut stored = Vec::with_capacity(batches.len());
        let (mut events, mut histograms, mut templates, mut slots, mut marks) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (key, batch) in batches {
            let seen = last.entry((key.name.to_string(), key.session)).or_insert(0);
            if batch.seq <= *seen {
                stored.push(false);
                continue;
            }
            *seen = batch.seq;
            stored.push(true);
            let row_key = |n: usize| RowKey {
                agent: &key.name,
                session: key.session,
                seq: batch.seq,
                n: n as u32,
            };
            events.extend(batch.events.iter().enumerate().map(|(n, e)| EventRow {
                key: row_key(n),
                ts_us: e.ts_us,
                req_done_us: e.req_done_us,
                client: &e.client,
                server: &e.server,
                port: e.port,
                proto: &e.proto,
                command: &e.command,
                summary: &e.summary,
                latency_us: e.latency_us,
                req_bytes: e.req_bytes,
                rsp_bytes: e.rsp_bytes,
                status: e.status,
                own_us: e.own_us,
                depth: e.depth,
            }));
            histograms.extend(
                batch
                    .histograms
                    .iter()
                    .enumerate()
                    .map(|(n, h)| snapshot_row(row_key(n), h, now_us)),
            );
            templates.extend(
                batch
                    .templates
                    .iter()
                    .enumerate()
                    .map(|(n, h)| snapshot_row(row_key(n), h, now_us)),
            );
            slots.extend(batch.slots.iter().enumerate().map(|(n, s)| SlotRow {
                key: row_key(n),
                ts_us: s.ts_us,
                interval_us: s.interval_us,
                server: &s.server,
                port: s.port,
                slot: s.slot,
                count: s.sum.count,
                sum_us: s.sum.sum_us,
                moved: s.sum.moved,
                ask: s.sum.ask,
                buckets: s.sum.buckets.to_vec(),
            }));
            marks.push(BatchRow {
                agent: &key.name,
                session: key.session,
                seq: batch.seq,
                committed_us: now_us,
                events: batch.events.len() as u64,
                has_counters: u8::from(batch.counters.is_some()),
                counters: batch.counters.unwrap_or_default().into(),
            });
        }
        let t = |name| self.settings.table(name);
        self.mark_attempts(&marks, now_us)?;
        let by = Some(deadline);
        self.client.insert_until(&t("events"), &events, by)?;
        self.client
            .insert_until(&t("histograms"), &histograms, by)?;
        self.client.insert_until(&t("templates"), &templates, by)?;
        self.client.insert_until(&t("slots"), &slots, by)?;
        self.client.insert_until(&t("batches"), &marks, by)?;
        Ok(stored)
    }

    fn roll_up(&mut self, now_us: u64) -> Result<u64> {
        self.ready()?;
        let suspects = suspects(&self.client, &self.settings)?;
        rollups::compact(&self.client, &self.settings, &suspects, now_us)
    }

    /// Whole days go: by age, each day that ends before the cutoff; by size, the oldest
    /// day while the parts on disk (over every host) hold more. Returns the days dropped.
    fn enforce_retention(
        &mut self,
        max_age: Option<Duration>,
        max_bytes: Option<u64>,
        now_us: u64,
    ) -> Result<u64> {
        self.ready()?;
        let mut dropped = 0;
        let mut days = self.partitions()?;
        if let Some(age) = max_age {
            let cutoff = now_us.saturating_sub(age.as_micros() as u64);
            let old: Vec<u64> = days
                .keys()
                .copied()
                .filter(|d| (d + 1) * DAY_US <= cutoff)
                .collect();
            for day in old {
                self.drop_day(day)?;
                days.remove(&day);
                dropped += 1;
            }
        }
        if let Some(limit) = max_bytes {
            // The newest day stays: it is being written.
            while days.values().sum::<u64>() > limit && days.len() > 1 {
                let Some((&day, _)) = days.iter().next() else {
                    break;
                };
                self.drop_day(day)?;
                days.remove(&day);
                dropped += 1;
            }
        }
        Ok(dropped)
    }
}

/// The reading side.
pub struct Reader {
    settings: Settings,
    client: Client,
}

impl Reader {
    /// A reader of the store; it connects when asked.
    pub fn new(settings: &Settings) -> Result<Self> {
        Ok(Reader {
            settings: settings.clone(),
            client: Client::new(settings)?,
        })
    }
}

/// A filter as ClickHouse conditions (on the columns events and snapshots share).
fn conditions(f: &v1::Filter) -> Vec<String> {
    let mut c = dimensions(f);
    if f.from_us > 0 {
        c.push(format!("ts_us >= {}", f.from_us));
    }
    if f.to_us > 0 {
        c.push(format!("ts_us < {}", f.to_us));
    }
    c
}

/// A filter's conditions but time (on the columns of roll-ups too).
fn dimensions(f: &v1::Filter) -> Vec<String> {
    let mut c = Vec::new();
    // Names match in any (ASCII) case, as in SQLite's NOCASE.
    for (column, value) in [
        ("server", &f.server),
        ("proto", &f.proto),
        ("command", &f.command),
    ] {
        if !value.is_empty() {
            c.push(format!("lower({column}) = lower({})", quote(value)));
        }
    }
    if !f.agent.is_empty() {
        c.push(format!("agent = {}", quote(&f.agent)));
    }
    if f.port != 0 {
        c.push(format!("port = {}", f.port));
    }
    c
}

fn where_clause(c: &[String]) -> String {
    if c.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", c.join(" AND "))
    }
}

/// `PREWHERE` and its condition, if any.
fn prewhere_clause(pre: Option<&str>) -> String {
    pre.map(|p| format!("PREWHERE {p}")).unwrap_or_default()
}

/// The key of a group, as ClickHouse SQL.
fn group_column(group: Group) -> &'static str {
    match group {
        // Empty, but computed: 18.16 refuses a constant key over a Distributed table
        // ("non constant in source stream but must be constant in result").
        Group::None => "substring(proto, 1, 0)",
        Group::Server => "concat(server, ':', toString(port))",
        Group::Agent => "agent",
        Group::Command => "concat(proto, '\\x1f', command)",
        Group::Port => "toString(port)",
    }
}

/// A batch: agent, session, sequence number.
type BatchKey = (String, u64, u64);

/// The suspect batches (there are few: each is a batch re-sent mid-commit).
fn suspects(client: &Client, s: &Settings) -> Result<BTreeSet<BatchKey>> {
    #[derive(Deserialize)]
    struct Row {
        agent: String,
        session: u64,
        seq: u64,
    }
    let rows: Vec<Row> = client.rows(&format!(
        "SELECT DISTINCT agent, session, seq FROM {}",
        s.table("suspects")
    ))?;
    Ok(rows
        .into_iter()
        .map(|r| (r.agent, r.session, r.seq))
        .collect())
}

/// Batches as a list for `(agent, session, seq) IN (…)`. An agent id is never empty: the
/// tuple it ends with makes a list of one batch.
fn batch_set(batches: &BTreeSet<BatchKey>) -> String {
    batches
        .iter()
        .map(|(a, session, seq)| format!("({}, {session}, {seq})", quote(a)))
        .chain(["('', 0, 0)".to_string()])
        .collect::<Vec<_>>()
        .join(", ")
}

impl Reader {
    /// Exactly once without collapsing every row: `run(conditions, collapsed)` sums the rows
    /// not of a suspect batch as they are, and those of suspect batches collapsed.
    /// A duplicate row is written after its batch's suspect (see [`Store::mark_attempts`]),
    /// so when the suspects read after the sums are those read before, no duplicate was
    /// among the rows summed as they are. Else again, and after three tries, every row
    /// collapsed.
    fn exactly_once<T>(
        &self,
        run: impl Fn(&[String], bool) -> Result<T>,
        combine: impl Fn(T, T) -> T,
    ) -> Result<T> {
        for _ in 0..3 {
            let before = suspects(&self.client, &self.settings)?;
            if before.len() > MAX_SUSPECTS {
                break;
            }
            let sums = if before.is_empty() {
                run(&[], false)?
            } else {
                let set = batch_set(&before);
                let plain = run(&[format!("(agent, session, seq) NOT IN ({set})")], false)?;
                let collapsed = run(&[format!("(agent, session, seq) IN ({set})")], true)?;
                combine(plain, collapsed)
            };
            if suspects(&self.client, &self.settings)?.is_subset(&before) {
                return Ok(sums);
            }
        }
        run(&[], true)
    }

    /// The snapshots of `from` (a table, or a query of one) matching `c`, summed per group:
    /// the scalar columns in one query, the fine buckets of the three histograms (an
    /// `ARRAY JOIN`, several times faster than `sumMap` on 18.16) in another.
    fn snapshot_sums(
        &self,
        from: &str,
        pre: Option<&str>,
        c: &[String],
        key: &str,
        parts: Parts,
    ) -> Result<BTreeMap<String, Merged>> {
        #[derive(Deserialize)]
        struct Scalars {
            k: String,
            h: u64,
            #[serde(flatten)]
            sums: Sums,
        }
        /// A bucket's sum: of the group whose key hashes to `hi >> 24`, index `hi & 0xffffff`;
        /// or of the group `k`, index `i`.
        #[derive(Deserialize)]
        struct Bucket {
            #[serde(default)]
            hi: u64,
            #[serde(default)]
            k: String,
            #[serde(default)]
            i: u32,
            f: u8,
            n: u64,
        }
        const _: () = assert!(tcpkit_histogram::FINE_BUCKETS < 1 << 24);
        let filter = format!("{} {}", prewhere_clause(pre), where_clause(c));
        let hash = |k: &str| format!("bitAnd(cityHash64({k}), 1099511627775)");
        // The buckets are grouped by one number, 40 bits of the key's hash then the index:
        // over tens of millions of buckets, a string key and an index cost twice as much.
        // Two keys of one hash (the scalars say): by the key itself.
        let part = |f: u8, h: &str, hashed: bool| {
            let (select, by) = if hashed {
                (
                    format!("bitOr(bitShiftLeft({}, 24), toUInt64(i)) AS hi", hash(key)),
                    "hi",
                )
            } else {
                (format!("{key} AS k, i"), "k, i")
            };
            format!(
                "SELECT {select}, toUInt8({f}) AS f, sum(c) AS n FROM {from} \
                 ARRAY JOIN {h}_i AS i, {h}_c AS c {filter} GROUP BY {by}"
            )
        };
        let buckets_of = |hashed: bool| -> Result<Vec<Bucket>> {
            self.client.rows(&match parts {
                Parts::All => format!(
                    "{} UNION ALL {} UNION ALL {}",
                    part(0, "fine", hashed),
                    part(1, "own", hashed),
                    part(2, "depth", hashed)
                ),
                Parts::Latency => part(0, "fine", hashed),
            })
        };
        // The two queries run at once, so that they see nearly the same moment: a batch
        // stored between their reads makes them not add up (checked below).
        let (scalars, buckets) = std::thread::scope(|scope| {
            let scalars = scope.spawn(|| {
                self.client.rows::<Scalars>(&format!(
                    "SELECT {key} AS k, {} AS h, {SCALAR_SUMS} FROM {from} {filter} GROUP BY k",
                    hash("k")
                ))
            });
            let buckets = buckets_of(true);
            let scalars = scalars
                .join()
                .unwrap_or_else(|e| std::panic::resume_unwind(e));
            (scalars, buckets)
        });
        let scalars = scalars?;
        let mut hashes = HashMap::new();
        let hashed = scalars
            .iter()
            .all(|r| hashes.insert(r.h, r.k.clone()).is_none());
        let buckets = if hashed { buckets? } else { buckets_of(false)? };
        let mut sums: BTreeMap<String, Sums> = scalars.into_iter().map(|r| (r.k, r.sums)).collect();
        for b in buckets {
            let (k, i) = if hashed {
                match hashes.get(&(b.hi >> 24)) {
                    Some(k) => (k.as_str(), (b.hi & 0xff_ffff) as u32),
                    None => continue,
                }
            } else {
                (b.k.as_str(), b.i)
            };
            let Some(s) = sums.get_mut(k) else {
                continue;
            };
            let (index, counts) = match b.f {
                0 => (&mut s.fine_i, &mut s.fine_c),
                1 => (&mut s.own_i, &mut s.own_c),
                _ => (&mut s.depth_i, &mut s.depth_c),
            };
            index.push(i);
            counts.push(b.n);
        }
        let merged: BTreeMap<String, Merged> = sums
            .into_iter()
            .map(|(k, s)| Ok((k, s.into_merged()?)))
            .collect::<Result<_>>()?;
        // Each snapshot's buckets hold its count: a difference is a batch stored between
        // the two queries (a busy fleet stores several a second). Then all in one query.
        if merged.values().any(|m| m.fine.total() != m.count) {
            return self.snapshot_sums_in_one(from, pre, c, key);
        }
        Ok(merged)
    }

    /// [`Reader::snapshot_sums`] in one query: one read of the rows, so consistent
    /// whatever is being stored meanwhile; `sumMap` makes it about twice as slow.
    fn snapshot_sums_in_one(
        &self,
        from: &str,
        pre: Option<&str>,
        c: &[String],
        key: &str,
    ) -> Result<BTreeMap<String, Merged>> {
        #[derive(Deserialize)]
        struct Row {
            k: String,
            #[serde(flatten)]
            sums: Sums,
        }
        let rows: Vec<Row> = self.client.rows(&format!(
            "SELECT {SPLIT_COLUMNS} FROM (SELECT {key} AS k, {ALL_SUMS} FROM {from} {} {} GROUP BY k)",
            prewhere_clause(pre),
            where_clause(c)
        ))?;
        let merged: BTreeMap<String, Merged> = rows
            .into_iter()
            .map(|r| Ok((r.k, r.sums.into_merged()?)))
            .collect::<Result<_>>()?;
        if merged.values().any(|m| m.fine.total() != m.count) {
            return Err(StoreError::ClickHouse(
                "the stored buckets do not add up to their counts".into(),
            ));
        }
        Ok(merged)
    }

    /// The snapshots of `table` matching `filter`, merged per group, each once; with a
    /// roll-up plan, only those it does not hold (see [`rollups::Plan::floor`]).
    fn merge_table(
        &self,
        table: &str,
        filter: &v1::Filter,
        key: &str,
        plan: Option<&rollups::Plan>,
        parts: Parts,
    ) -> Result<BTreeMap<String, Merged>> {
        let base = conditions(filter);
        let table = self.settings.table(table);
        // Decided on two small columns before the rest is read.
        let floor = plan.and_then(|p| p.floor("inserted_us"));
        self.exactly_once(
            |extra, collapsed| {
                let c: Vec<String> = base.iter().chain(extra).cloned().collect();
                if collapsed {
                    // Each row's first copy: the one a roll-up holds, if any does.
                    let from = format!(
                        "(SELECT * FROM {table} {} ORDER BY inserted_us \
                         LIMIT 1 BY agent, session, seq, n)",
                        where_clause(&c)
                    );
                    let floor: Vec<String> = floor.iter().cloned().collect();
                    self.snapshot_sums(&from, None, &floor, key, parts)
                } else {
                    self.snapshot_sums(&table, floor.as_deref(), &c, key, parts)
                }
            },
            |mut a, b| {
                add_groups(&mut a, b);
                a
            },
        )
    }

    /// The histograms matching `filter`, merged per `raw_key` (of snapshots) and
    /// `rolled_key` (of roll-ups): the newest roll-up of each bucket of `marks` inside the
    /// range, and the snapshots they do not hold, read at once.
    fn merge_histograms(
        &self,
        filter: &v1::Filter,
        marks: &[rollups::Mark],
        raw_key: &str,
        rolled_key: &str,
        parts: Parts,
    ) -> Result<BTreeMap<String, Merged>> {
        let plan = rollups::Plan::new(marks, filter.from_us, filter.to_us);
        let (rolled, rest) = std::thread::scope(|scope| {
            let rolled = (!plan.picks.is_empty()).then(|| {
                scope.spawn(|| {
                    let mut c = dimensions(filter);
                    c.push(plan.picked());
                    let rollups = self.settings.table("rollups");
                    self.snapshot_sums(&rollups, None, &c, rolled_key, parts)
                })
            });
            let rest = self.merge_table("histograms", filter, raw_key, Some(&plan), parts);
            let rolled = rolled.map(|t| t.join().unwrap_or_else(|e| std::panic::resume_unwind(e)));
            (rolled, rest)
        });
        let mut merged = rest?;
        if let Some(rolled) = rolled {
            add_groups(&mut merged, rolled?);
        }
        Ok(merged)
    }
}

/// The histograms a read sums: all three, or the latencies only (a series).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Parts {
    All,
    Latency,
}

/// Adds `b`'s groups to `a`'s.
fn add_groups(a: &mut BTreeMap<String, Merged>, b: BTreeMap<String, Merged>) {
    for (k, m) in b {
        a.entry(k).or_default().merge(&m);
    }
}

impl super::Reader for Reader {
    fn slow(&self, req: &v1::SlowRequest) -> Result<Vec<v1::StoredEvent>> {
        #[derive(Deserialize)]
        struct Row {
            agent: String,
            ts_us: u64,
            req_done_us: u64,
            client: String,
            server: String,
            port: u32,
            proto: String,
            command: String,
            summary: String,
            latency_us: u64,
            req_bytes: u64,
            rsp_bytes: u64,
            status: i32,
            own_us: u64,
            depth: u32,
        }
        let f = req.filter.clone().unwrap_or_default();
        let mut c = conditions(&f);
        if req.min_latency_us > 0 {
            c.push(format!("latency_us >= {}", req.min_latency_us));
        }
        if !req.grep.is_empty() {
            c.push(format!(
                "match(summary, {})",
                quote(&glob_to_regex(&format!("*{}*", req.grep)))
            ));
        }
        // As SQLite orders them: ties by agent name, then the newest stored first.
        let ties = "agent, session DESC, seq DESC, n DESC";
        let order = if req.slowest_first {
            format!("latency_us DESC, ts_us DESC, {ties}")
        } else {
            format!("ts_us DESC, {ties}")
        };
        let table = self.settings.table("events");
        let select = |c: &[String], limit: &str| -> Result<Vec<Row>> {
            self.client.rows(&format!(
                "SELECT agent, ts_us, req_done_us, client, server, port, proto, command, summary, \
                     latency_us, req_bytes, rsp_bytes, status, own_us, depth \
                 FROM {table} FINAL {} ORDER BY {order}{limit}",
                where_clause(c)
            ))
        };
        let rows = if req.limit == 0 {
            select(&c, "")?
        } else {
            // Sorting every match is slow: first the `limit`-th value of the leading key (a
            // narrow read), then only what is at or above it. Duplicates not yet collapsed
            // count in the first step; when they leave fewer than `limit`, look further.
            let limit = u64::from(req.limit);
            let key = if req.slowest_first {
                "latency_us"
            } else {
                "ts_us"
            };
            // Newest first, the boundary is looked for in the last hour, day, week first
            // (before the filter's end, when it has one in the past): a range of the
            // primary key, so each costs what it holds.
            let windows: &[u64] = if req.slowest_first {
                &[]
            } else {
                &[3_600_000_000, DAY_US, 7 * DAY_US]
            };
            let now = match crate::server::now_us() {
                now if f.to_us > 0 => now.min(f.to_us),
                now => now,
            };
            let mut offset = limit - 1;
            loop {
                let boundary_in = |since: Option<u64>| -> Result<Option<u64>> {
                    let mut c = c.clone();
                    if let Some(t) = since {
                        c.push(format!("ts_us >= {t}"));
                    }
                    Ok(self
                        .client
                        .run(
                            &format!(
                                "SELECT {key} FROM {table} {} ORDER BY {key} DESC LIMIT 1 OFFSET {offset}",
                                where_clause(&c)
                            ),
                            b"",
                        )?
                        .trim()
                        .parse()
                        .ok())
                };
                let mut boundary = None;
                for span in windows {
                    let since = now.saturating_sub(*span);
                    if since <= f.from_us {
                        break;
                    }
                    boundary = boundary_in(Some(since))?;
                    if boundary.is_some() {
                        break;
                    }
                }
                if boundary.is_none() {
                    boundary = boundary_in(None)?;
                }
                let mut bounded = c.clone();
                if let Some(b) = boundary {
                    bounded.push(format!("{key} >= {b}"));
                }
                let rows = select(&bounded, &format!(" LIMIT {limit}"))?;
                if boundary.is_none() || rows.len() as u64 == limit {
                    break rows;
                }
                offset = offset.saturating_mul(2).saturating_add(1);
            }
        };
        Ok(rows
            .into_iter()
            .map(|r| v1::StoredEvent {
                agent: r.agent,
                event: Some(v1::Event {
                    ts_us: r.ts_us,
                    req_done_us: r.req_done_us,
                    client: r.client,
                    server: r.server,
                    port: r.port,
                    proto: r.proto,
                    command: r.command,
                    summary: r.summary,
                    latency_us: r.latency_us,
                    req_bytes: r.req_bytes,
                    rsp_bytes: r.rsp_bytes,
                    status: r.status,
                    own_us: r.own_us,
                    depth: r.depth,
                }),
            })
            .collect())
    }

    /// The roll-ups inside the range, and the snapshots they do not hold (read at once).
    fn merged(&self, filter: &v1::Filter, group: Group) -> Result<BTreeMap<String, Merged>> {
        let marks = rollups::marks(&self.client, &self.settings, filter.from_us, filter.to_us)?;
        let key = group_column(group);
        self.merge_histograms(filter, &marks, key, key, Parts::All)
    }

    /// As [`Reader::merged`], grouped by step too (the roll-ups of spans that divide the
    /// step), then split.
    fn series(&self, filter: &v1::Filter, group: Group, step_us: u64) -> Result<Series> {
        let mut marks = rollups::marks(&self.client, &self.settings, filter.from_us, filter.to_us)?;
        marks.retain(|m| step_us % m.span_us == 0);
        let key = |time: &str| {
            format!(
                "concat({}, '\\x1e', toString(intDiv({time}, {step_us})))",
                group_column(group)
            )
        };
        let merged = self.merge_histograms(
            filter,
            &marks,
            &key("ts_us"),
            &key("bucket_us"),
            Parts::Latency,
        )?;
        let mut series = Series::new();
        for (k, m) in merged {
            let (group, step) = k
                .rsplit_once('\u{1e}')
                .and_then(|(g, n)| Some((g, n.parse::<u64>().ok()?)))
                .ok_or_else(|| StoreError::ClickHouse(format!("unexpected series key {k:?}")))?;
            series
                .entry(group.to_string())
                .or_default()
                .insert(step * step_us, m.latency_only());
        }
        Ok(series)
    }

    fn templates(&self, filter: &v1::Filter) -> Result<BTreeMap<String, Merged>> {
        self.merge_table(
            "templates",
            filter,
            group_column(Group::Command),
            None,
            Parts::All,
        )
    }

    fn slots(&self, filter: &v1::Filter) -> Result<BTreeMap<u16, SlotSum>> {
        #[derive(Deserialize)]
        struct Row {
            slot: u16,
            count: u64,
            sum_us: u64,
            moved: u64,
            ask: u64,
            buckets: Vec<u64>,
        }
        if !filter.proto.is_empty() && !filter.proto.eq_ignore_ascii_case("redis") {
            return Ok(BTreeMap::new());
        }
        let f = v1::Filter {
            proto: String::new(),
            command: String::new(),
            ..filter.clone()
        };
        let base = conditions(&f);
        let run = |extra: &[String], collapsed: bool| -> Result<BTreeMap<u16, SlotSum>> {
            let final_ = if collapsed { "FINAL" } else { "" };
            let c: Vec<String> = base.iter().chain(extra).cloned().collect();
            let rows: Vec<Row> = self.client.rows(&format!(
                "SELECT slot, sum(count) AS count, sum(sum_us) AS sum_us, sum(moved) AS moved, \
                     sum(ask) AS ask, sumForEach(buckets) AS buckets \
                 FROM {} {final_} {} GROUP BY slot",
                self.settings.table("slots"),
                where_clause(&c)
            ))?;
            rows.into_iter()
                .map(|r| {
                    let mut buckets = [0; PROM_BUCKETS];
                    if r.buckets.len() != PROM_BUCKETS {
                        return Err(StoreError::Histogram(
                            crate::merge::SnapshotError::FineLengths,
                        ));
                    }
                    buckets.copy_from_slice(&r.buckets);
                    Ok((
                        r.slot,
                        SlotSum {
                            count: r.count,
                            sum_us: r.sum_us,
                            moved: r.moved,
                            ask: r.ask,
                            buckets,
                        },
                    ))
                })
                .collect()
        };
        self.exactly_once(run, |mut a, b| {
            for (slot, sum) in b {
                a.entry(slot).or_default().merge(&sum);
            }
            a
        })
    }

    fn agents(&self) -> Result<Vec<v1::AgentInfo>> {
        #[derive(Deserialize)]
        struct Hello {
            agent: String,
            hostname: String,
            version: String,
            ports: String,
            first_seen_us: u64,
            last_seen_us: u64,
            sessions: u64,
        }
        #[derive(Deserialize)]
        struct Stored {
            agent: String,
            events: u64,
            last_seen_us: u64,
            #[serde(flatten)]
            counters: Counters,
        }
        let hellos: Vec<Hello> = self.client.rows(&format!(
            "SELECT agent, argMax(hostname, ts_us) AS hostname, argMax(version, ts_us) AS version, \
                 argMax(ports, ts_us) AS ports, min(ts_us) AS first_seen_us, \
                 max(ts_us) AS last_seen_us, uniqExact(session) AS sessions \
             FROM {} GROUP BY agent ORDER BY agent",
            self.settings.table("hellos")
        ))?;
        // Counters are cumulative over a session: its latest batch that carried them.
        let latest = COUNTERS
            .iter()
            .map(|c| format!("argMaxIf({c}, seq, has_counters = 1) AS {c}"))
            .collect::<Vec<_>>()
            .join(", ");
        let summed = COUNTERS
            .iter()
            .map(|c| format!("sum({c}) AS {c}"))
            .collect::<Vec<_>>()
            .join(", ");
        let stored: Vec<Stored> = self.client.rows(&format!(
            "SELECT agent, sum(events) AS events, max(last) AS last_seen_us, {summed} FROM \
                 (SELECT agent, session, sum(events) AS events, max(committed_us) AS last, {latest} \
                  FROM {} FINAL GROUP BY agent, session) \
             GROUP BY agent",
            self.settings.table("batches")
        ))?;
        let mut stored: HashMap<String, Stored> =
            stored.into_iter().map(|s| (s.agent.clone(), s)).collect();
        Ok(hellos
            .into_iter()
            .map(|h| {
                let s = stored.remove(&h.agent);
                v1::AgentInfo {
                    ports: super::ports_from_text(&h.ports),
                    id: h.agent,
                    hostname: h.hostname,
                    version: h.version,
                    first_seen_us: h.first_seen_us,
                    last_seen_us: h.last_seen_us.max(s.as_ref().map_or(0, |s| s.last_seen_us)),
                    sessions: h.sessions,
                    events: s.as_ref().map_or(0, |s| s.events),
                    connected: false,
                    counters: Some(s.map(|s| s.counters).unwrap_or_default().into()),
                }
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_refuse_passwords() {
        let s = Settings::parse("clickhouse://127.0.0.1:8123/tcpkit").unwrap();
        assert_eq!(
            (
                s.hosts.as_slice(),
                s.database.as_str(),
                s.user.as_str(),
                s.tls
            ),
            (
                &["127.0.0.1:8123".to_string()][..],
                "tcpkit",
                "default",
                false
            )
        );
        let s = Settings::parse("clickhouse+https://ops@a,b:9443,[::1]:8443/db_1").unwrap();
        assert_eq!(s.hosts, ["a:8443", "b:9443", "[::1]:8443"]);
        assert_eq!((s.user.as_str(), s.tls), ("ops", true));
        for bad in [
            "clickhouse://h:1",
            "clickhouse://h:1/",
            "clickhouse://u:pw@h:1/db",
            "clickhouse://h:1/db;drop",
            "clickhouse://,h/db",
            "clickhouse://h:1/my-db",
            "clickhouse://h:1/1db",
            "http://h/db",
        ] {
            assert!(Settings::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn literals_are_quoted() {
        assert_eq!(quote(r"a'b\c"), r"'a\'b\\c'");
    }

    #[test]
    fn globs_become_whole_text_patterns() {
        assert_eq!(glob_to_regex("*user:?*"), "(?s)^.*user:..*$");
        assert_eq!(glob_to_regex("a.b[^0-9]"), "(?s)^a\\.b[^0-9]$");
        assert_eq!(glob_to_regex("[]x]"), "(?s)^[\\]x]$");
        assert_eq!(glob_to_regex("(x)+{1}"), "(?s)^\\(x\\)\\+\\{1\\}$");
    }
}
