//! The SQLite store, the embedded default: agents and their sessions, slow-request events,
//! histogram snapshots and their roll-ups (per hour and per 10 minutes).
//!
//! One [`Store`] writes (the writer task owns it); [`Reader`]s answer queries on their own
//! connections. WAL mode lets them read while it writes. A batch is stored whole in one
//! transaction or not at all, and a batch already stored (same agent session, sequence
//! number not above the last stored) is skipped, so re-sent batches count once.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use rusqlite::{params, params_from_iter, Connection, OpenFlags, OptionalExtension};
use tcpkit_proto::v1;

use super::{
    CheckedBatch, CheckedSnapshot, Group, Result, Series, SessionKey, StoreError, HOUR_US,
    ROLLUP_SPANS_US,
};
use crate::merge::{Merged, SnapshotError, StoredColumns};
use crate::slots::SlotSum;

/// The schema, one step per version; `PRAGMA user_version` says how many have run.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE agents (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    hostname TEXT NOT NULL,
    version TEXT NOT NULL,
    ports TEXT NOT NULL,
    first_seen_us INTEGER NOT NULL,
    last_seen_us INTEGER NOT NULL
);
CREATE TABLE sessions (
    agent INTEGER NOT NULL REFERENCES agents(id),
    session INTEGER NOT NULL,
    started_us INTEGER NOT NULL,
    last_seq INTEGER NOT NULL DEFAULT 0,
    events INTEGER NOT NULL DEFAULT 0,
    kernel_drops INTEGER NOT NULL DEFAULT 0,
    interface_drops INTEGER NOT NULL DEFAULT 0,
    decode_errors INTEGER NOT NULL DEFAULT 0,
    gaps INTEGER NOT NULL DEFAULT 0,
    desyncs INTEGER NOT NULL DEFAULT 0,
    timeouts INTEGER NOT NULL DEFAULT 0,
    flows_evicted INTEGER NOT NULL DEFAULT 0,
    shipper_dropped_events INTEGER NOT NULL DEFAULT 0,
    shipper_dropped_histograms INTEGER NOT NULL DEFAULT 0,
    shipper_buffered INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (agent, session)
) WITHOUT ROWID;
CREATE TABLE events (
    id INTEGER PRIMARY KEY,
    ts_us INTEGER NOT NULL,
    req_done_us INTEGER NOT NULL,
    agent INTEGER NOT NULL,
    client TEXT NOT NULL,
    server TEXT NOT NULL,
    port INTEGER NOT NULL,
    proto TEXT NOT NULL,
    command TEXT NOT NULL,
    summary TEXT NOT NULL,
    latency_us INTEGER NOT NULL,
    req_bytes INTEGER NOT NULL,
    rsp_bytes INTEGER NOT NULL,
    status INTEGER NOT NULL
);
CREATE INDEX events_by_time ON events (ts_us);
CREATE INDEX events_by_latency ON events (latency_us);
CREATE INDEX events_by_server ON events (server, port, ts_us);
CREATE TABLE histograms (
    id INTEGER PRIMARY KEY,
    ts_us INTEGER NOT NULL,
    interval_us INTEGER NOT NULL,
    agent INTEGER NOT NULL,
    server TEXT NOT NULL,
    port INTEGER NOT NULL,
    proto TEXT NOT NULL,
    command TEXT NOT NULL,
    count INTEGER NOT NULL,
    sum_us INTEGER NOT NULL,
    max_us INTEGER NOT NULL,
    slow INTEGER NOT NULL,
    errors INTEGER NOT NULL,
    timeouts INTEGER NOT NULL,
    seed BLOB NOT NULL,
    fine BLOB NOT NULL
);
CREATE INDEX histograms_by_time ON histograms (ts_us);
CREATE TABLE rollups (
    span_us INTEGER NOT NULL,
    bucket_us INTEGER NOT NULL,
    agent INTEGER NOT NULL,
    server TEXT NOT NULL,
    port INTEGER NOT NULL,
    proto TEXT NOT NULL,
    command TEXT NOT NULL,
    count INTEGER NOT NULL,
    sum_us INTEGER NOT NULL,
    max_us INTEGER NOT NULL,
    slow INTEGER NOT NULL,
    errors INTEGER NOT NULL,
    timeouts INTEGER NOT NULL,
    seed BLOB NOT NULL,
    fine BLOB NOT NULL,
    PRIMARY KEY (span_us, bucket_us, agent, server, port, proto, command)
) WITHOUT ROWID;
"#,
    // Version 2: the agents' counts of exchanges not timed, by reason, and of clock skew.
    r#"
ALTER TABLE sessions ADD COLUMN request_lost INTEGER NOT NULL DEFAULT 0;
ALTER TABLE sessions ADD COLUMN reply_lost INTEGER NOT NULL DEFAULT 0;
ALTER TABLE sessions ADD COLUMN uncertain INTEGER NOT NULL DEFAULT 0;
ALTER TABLE sessions ADD COLUMN reply_before_request INTEGER NOT NULL DEFAULT 0;
ALTER TABLE sessions ADD COLUMN clock_skew INTEGER NOT NULL DEFAULT 0;
"#,
    // Version 3: time inside pipelines: each event's own time and depth, and the own times and
    // depths of the histograms (empty from older agents).
    r#"
ALTER TABLE events ADD COLUMN own_us INTEGER NOT NULL DEFAULT 0;
ALTER TABLE events ADD COLUMN depth INTEGER NOT NULL DEFAULT 0;
ALTER TABLE histograms ADD COLUMN own_sum_us INTEGER NOT NULL DEFAULT 0;
ALTER TABLE histograms ADD COLUMN own BLOB NOT NULL DEFAULT x'';
ALTER TABLE histograms ADD COLUMN depth BLOB NOT NULL DEFAULT x'';
ALTER TABLE rollups ADD COLUMN own_sum_us INTEGER NOT NULL DEFAULT 0;
ALTER TABLE rollups ADD COLUMN own BLOB NOT NULL DEFAULT x'';
ALTER TABLE rollups ADD COLUMN depth BLOB NOT NULL DEFAULT x'';
"#,
    // Version 4: Redis Cluster: the redirects among a histogram's exchanges, and per slot
    // snapshots.
    r#"
ALTER TABLE histograms ADD COLUMN moved INTEGER NOT NULL DEFAULT 0;
ALTER TABLE histograms ADD COLUMN ask INTEGER NOT NULL DEFAULT 0;
ALTER TABLE rollups ADD COLUMN moved INTEGER NOT NULL DEFAULT 0;
ALTER TABLE rollups ADD COLUMN ask INTEGER NOT NULL DEFAULT 0;
CREATE TABLE slots (
    id INTEGER PRIMARY KEY,
    ts_us INTEGER NOT NULL,
    interval_us INTEGER NOT NULL,
    agent INTEGER NOT NULL,
    server TEXT NOT NULL,
    port INTEGER NOT NULL,
    slot INTEGER NOT NULL,
    count INTEGER NOT NULL,
    sum_us INTEGER NOT NULL,
    moved INTEGER NOT NULL,
    ask INTEGER NOT NULL,
    buckets BLOB NOT NULL
);
CREATE INDEX slots_by_time ON slots (ts_us);
"#,
    // Version 5: key templates, as histograms named by template; the keys named and the bytes
    // of every histogram.
    r#"
ALTER TABLE histograms ADD COLUMN keys INTEGER NOT NULL DEFAULT 0;
ALTER TABLE histograms ADD COLUMN multi_key INTEGER NOT NULL DEFAULT 0;
ALTER TABLE histograms ADD COLUMN req_bytes INTEGER NOT NULL DEFAULT 0;
ALTER TABLE histograms ADD COLUMN rsp_bytes INTEGER NOT NULL DEFAULT 0;
ALTER TABLE rollups ADD COLUMN keys INTEGER NOT NULL DEFAULT 0;
ALTER TABLE rollups ADD COLUMN multi_key INTEGER NOT NULL DEFAULT 0;
ALTER TABLE rollups ADD COLUMN req_bytes INTEGER NOT NULL DEFAULT 0;
ALTER TABLE rollups ADD COLUMN rsp_bytes INTEGER NOT NULL DEFAULT 0;
CREATE TABLE templates (
    id INTEGER PRIMARY KEY,
    ts_us INTEGER NOT NULL,
    interval_us INTEGER NOT NULL,
    agent INTEGER NOT NULL,
    server TEXT NOT NULL,
    port INTEGER NOT NULL,
    proto TEXT NOT NULL,
    command TEXT NOT NULL,
    count INTEGER NOT NULL,
    sum_us INTEGER NOT NULL,
    max_us INTEGER NOT NULL,
    slow INTEGER NOT NULL,
    errors INTEGER NOT NULL,
    timeouts INTEGER NOT NULL,
    seed BLOB NOT NULL,
    fine BLOB NOT NULL,
    own_sum_us INTEGER NOT NULL,
    own BLOB NOT NULL,
    depth BLOB NOT NULL,
    moved INTEGER NOT NULL,
    ask INTEGER NOT NULL,
    keys INTEGER NOT NULL,
    multi_key INTEGER NOT NULL,
    req_bytes INTEGER NOT NULL,
    rsp_bytes INTEGER NOT NULL
);
CREATE INDEX templates_by_time ON templates (ts_us);
"#,
];

/// The columns a merged histogram is read from ([`merged_from_row`]), in order.
const MERGED_COLUMNS: &str =
    "count, sum_us, max_us, slow, errors, timeouts, seed, fine, own_sum_us, own, depth, moved, ask, \
     keys, multi_key, req_bytes, rsp_bytes";

/// Opens a connection with the settings every connection shares.
fn connect(path: &Path, flags: OpenFlags) -> Result<Connection> {
    let conn = Connection::open_with_flags(path, flags)?;
    conn.busy_timeout(Duration::from_secs(10))?;
    Ok(conn)
}

/// How much of the file a reader maps (`PRAGMA mmap_size`).
const READER_MMAP_BYTES: i64 = 1 << 30;

/// The writing side of the store.
pub struct Store {
    conn: Connection,
}

impl Store {
    /// Opens (creating it when missing) the database at `path` and migrates its schema.
    pub fn open(path: &Path) -> Result<Self> {
        let conn = connect(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE,
        )?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // Durable across a crash of the process; an OS crash may lose the last commits,
        // which the agents then re-send (they are not acknowledged until committed).
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        // 64 MiB of page cache: the indexes of a large store stay in memory while writing.
        conn.pragma_update(None, "cache_size", -65_536)?;
        let mut store = Self { conn };
        store.migrate()?;
        Ok(store)
    }

    fn migrate(&mut self) -> Result<()> {
        let version: i64 = self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))?;
        let known = MIGRATIONS.len() as i64;
        if version > known {
            return Err(StoreError::NewerSchema {
                found: version,
                known,
            });
        }
        for (i, step) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let tx = self.conn.transaction()?;
            tx.execute_batch(step)?;
            tx.pragma_update(None, "user_version", i as i64 + 1)?;
            tx.commit()?;
        }
        Ok(())
    }

    /// Bytes of the pages in use (the file keeps freed pages for reuse).
    pub fn live_bytes(&self) -> Result<u64> {
        let q =
            |p: &str| -> Result<i64> { Ok(self.conn.pragma_query_value(None, p, |r| r.get(0))?) };
        let pages = q("page_count")? - q("freelist_count")?;
        Ok(pages.max(0) as u64 * q("page_size")? as u64)
    }

    fn delete_before(&mut self, cutoff_us: u64) -> Result<u64> {
        let tx = self.conn.transaction()?;
        let cutoff = cutoff_us as i64;
        let mut n = tx.execute("DELETE FROM events WHERE ts_us < ?1", [cutoff])?;
        n += tx.execute("DELETE FROM histograms WHERE ts_us < ?1", [cutoff])?;
        n += tx.execute("DELETE FROM slots WHERE ts_us < ?1", [cutoff])?;
        n += tx.execute("DELETE FROM templates WHERE ts_us < ?1", [cutoff])?;
        // A roll-up goes with its last snapshot.
        n += tx.execute(
            "DELETE FROM rollups WHERE bucket_us + span_us <= ?1",
            [cutoff],
        )?;
        tx.commit()?;
        Ok(n as u64)
    }
}

impl super::Writer for Store {
    fn hello(&mut self, hello: &v1::Hello, now_us: u64) -> Result<(SessionKey, u64)> {
        let ports = super::ports_text(hello);
        let tx = self.conn.transaction()?;
        tx.execute(
            "INSERT INTO agents (name, hostname, version, ports, first_seen_us, last_seen_us)
             VALUES (?1, ?2, ?3, ?4, ?5, ?5)
             ON CONFLICT (name) DO UPDATE SET hostname = ?2, version = ?3, ports = ?4,
                 last_seen_us = ?5",
            params![
                hello.agent_id,
                hello.hostname,
                hello.version,
                ports,
                now_us as i64
            ],
        )?;
        let agent: i64 = tx.query_row(
            "SELECT id FROM agents WHERE name = ?1",
            [&hello.agent_id],
            |r| r.get(0),
        )?;
        tx.execute(
            "INSERT OR IGNORE INTO sessions (agent, session, started_us) VALUES (?1, ?2, ?3)",
            params![agent, hello.session as i64, now_us as i64],
        )?;
        let last_seq: i64 = tx.query_row(
            "SELECT last_seq FROM sessions WHERE agent = ?1 AND session = ?2",
            params![agent, hello.session as i64],
            |r| r.get(0),
        )?;
        tx.commit()?;
        Ok((
            SessionKey {
                agent,
                name: hello.agent_id.as_str().into(),
                session: hello.session,
            },
            last_seq as u64,
        ))
    }

    /// In one transaction: nothing is stored when this fails.
    fn commit(
        &mut self,
        batches: &[(SessionKey, &CheckedBatch)],
        now_us: u64,
    ) -> Result<Vec<bool>> {
        let tx = self.conn.transaction()?;
        let mut stored = Vec::with_capacity(batches.len());
        for (key, batch) in batches {
            stored.push(store_batch(&tx, key, batch, now_us)?);
        }
        tx.commit()?;
        Ok(stored)
    }

    /// Returns the rows deleted; by size, whole hours go, oldest first.
    fn enforce_retention(
        &mut self,
        max_age: Option<Duration>,
        max_bytes: Option<u64>,
        now_us: u64,
    ) -> Result<u64> {
        let mut deleted = 0;
        if let Some(age) = max_age {
            let cutoff = now_us.saturating_sub(age.as_micros() as u64);
            deleted += self.delete_before(cutoff)?;
        }
        if let Some(limit) = max_bytes {
            while self.live_bytes()? > limit {
                // The oldest hour still stored goes first.
                let oldest: Option<i64> = self.conn.query_row(
                    "SELECT min(t) FROM (SELECT min(ts_us) AS t FROM events
                     UNION ALL SELECT min(ts_us) FROM histograms
                     UNION ALL SELECT min(ts_us) FROM slots
                     UNION ALL SELECT min(ts_us) FROM templates
                     UNION ALL SELECT min(bucket_us) FROM rollups)",
                    [],
                    |r| r.get(0),
                )?;
                let Some(oldest) = oldest else { break };
                let n = self.delete_before((oldest as u64 / HOUR_US + 1) * HOUR_US)?;
                if n == 0 {
                    break;
                }
                deleted += n;
            }
        }
        Ok(deleted)
    }
}

fn store_batch(
    tx: &rusqlite::Transaction<'_>,
    key: &SessionKey,
    batch: &CheckedBatch,
    now_us: u64,
) -> Result<bool> {
    let session = key.session as i64;
    let last_seq: i64 = tx
        .prepare_cached("SELECT last_seq FROM sessions WHERE agent = ?1 AND session = ?2")?
        .query_row(params![key.agent, session], |r| r.get(0))
        .optional()?
        .unwrap_or(0);
    if batch.seq as i64 <= last_seq {
        return Ok(false);
    }
    let mut insert_event = tx.prepare_cached(
        "INSERT INTO events (ts_us, req_done_us, agent, client, server, port, proto, command,
             summary, latency_us, req_bytes, rsp_bytes, status, own_us, depth)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
    )?;
    for e in &batch.events {
        insert_event.execute(params![
            e.ts_us as i64,
            e.req_done_us as i64,
            key.agent,
            e.client,
            e.server,
            e.port,
            e.proto,
            e.command,
            e.summary,
            e.latency_us as i64,
            e.req_bytes as i64,
            e.rsp_bytes as i64,
            e.status,
            e.own_us as i64,
            e.depth,
        ])?;
    }
    for h in &batch.histograms {
        insert_histogram(tx, key.agent, h)?;
    }
    for t in &batch.templates {
        insert_snapshot(tx, "templates", key.agent, t)?;
    }
    let mut insert_slot = tx.prepare_cached(
        "INSERT INTO slots (ts_us, interval_us, agent, server, port, slot, count, sum_us, moved,
             ask, buckets)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
    )?;
    for s in &batch.slots {
        insert_slot.execute(params![
            s.ts_us as i64,
            s.interval_us as i64,
            key.agent,
            s.server,
            s.port,
            s.slot,
            s.sum.count as i64,
            s.sum.sum_us as i64,
            s.sum.moved as i64,
            s.sum.ask as i64,
            s.sum.buckets_blob(),
        ])?;
    }
    tx.prepare_cached(
        "UPDATE sessions SET last_seq = ?3, events = events + ?4 WHERE agent = ?1 AND session = ?2",
    )?
    .execute(params![
        key.agent,
        session,
        batch.seq as i64,
        batch.events.len() as i64
    ])?;
    // Counters are cumulative over the session: the latest replace the earlier.
    if let Some(c) = batch.counters {
        tx.prepare_cached(
            "UPDATE sessions SET kernel_drops = ?3, interface_drops = ?4, decode_errors = ?5,
                 gaps = ?6, desyncs = ?7, timeouts = ?8, flows_evicted = ?9,
                 shipper_dropped_events = ?10, shipper_dropped_histograms = ?11,
                 shipper_buffered = ?12, request_lost = ?13, reply_lost = ?14,
                 uncertain = ?15, reply_before_request = ?16, clock_skew = ?17
             WHERE agent = ?1 AND session = ?2",
        )?
        .execute(params![
            key.agent,
            session,
            c.kernel_drops as i64,
            c.interface_drops as i64,
            c.decode_errors as i64,
            c.gaps as i64,
            c.desyncs as i64,
            c.timeouts as i64,
            c.flows_evicted as i64,
            c.shipper_dropped_events as i64,
            c.shipper_dropped_histograms as i64,
            c.shipper_buffered as i64,
            c.request_lost as i64,
            c.reply_lost as i64,
            c.uncertain as i64,
            c.reply_before_request as i64,
            c.clock_skew as i64,
        ])?;
    }
    tx.prepare_cached("UPDATE agents SET last_seen_us = ?2 WHERE id = ?1")?
        .execute(params![key.agent, now_us as i64])?;
    Ok(true)
}

/// Stores a snapshot and adds it to its roll-ups.
fn insert_histogram(tx: &rusqlite::Transaction<'_>, agent: i64, h: &CheckedSnapshot) -> Result<()> {
    insert_snapshot(tx, "histograms", agent, h)?;
    add_to_rollups(tx, agent, h)
}

/// Stores a snapshot in `table` (histograms, templates).
fn insert_snapshot(
    tx: &rusqlite::Transaction<'_>,
    table: &str,
    agent: i64,
    h: &CheckedSnapshot,
) -> Result<()> {
    let m = &h.merged;
    tx.prepare_cached(&format!(
        "INSERT INTO {table} (ts_us, interval_us, agent, server, port, proto, command, count,
             sum_us, max_us, slow, errors, timeouts, seed, fine, own_sum_us, own, depth, moved, ask,
             keys, multi_key, req_bytes, rsp_bytes)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17,
             ?18, ?19, ?20, ?21, ?22, ?23, ?24)"
    ))?
    .execute(params![
        h.ts_us as i64,
        h.interval_us as i64,
        agent,
        h.server,
        h.port,
        h.proto,
        h.command,
        m.count as i64,
        m.sum_us as i64,
        m.fine.max_us() as i64,
        m.slow as i64,
        m.errors as i64,
        m.timeouts as i64,
        m.seed_blob(),
        m.fine_blob(),
        m.own_sum_us as i64,
        m.own_blob(),
        m.depth_blob(),
        m.moved as i64,
        m.ask as i64,
        m.keys as i64,
        m.multi_key as i64,
        m.req_bytes as i64,
        m.rsp_bytes as i64,
    ])?;
    Ok(())
}

/// Adds a histogram snapshot to its roll-ups.
fn add_to_rollups(tx: &rusqlite::Transaction<'_>, agent: i64, h: &CheckedSnapshot) -> Result<()> {
    let m = &h.merged;
    for span in ROLLUP_SPANS_US {
        let bucket = (h.ts_us - h.ts_us % span) as i64;
        let key = params![
            span as i64,
            bucket,
            agent,
            h.server,
            h.port,
            h.proto,
            h.command
        ];
        let mut sum = tx
            .prepare_cached(&format!(
                "SELECT {MERGED_COLUMNS} FROM rollups
                 WHERE span_us = ?1 AND bucket_us = ?2 AND agent = ?3 AND server = ?4
                     AND port = ?5 AND proto = ?6 AND command = ?7"
            ))?
            .query_row(key, |r| merged_from_row(r, 0))
            .optional()?
            .transpose()?
            .unwrap_or_default();
        sum.merge(m);
        tx.prepare_cached(
            "INSERT OR REPLACE INTO rollups (span_us, bucket_us, agent, server, port, proto,
                 command, count, sum_us, max_us, slow, errors, timeouts, seed, fine, own_sum_us,
                 own, depth, moved, ask, keys, multi_key, req_bytes, rsp_bytes)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17,
                 ?18, ?19, ?20, ?21, ?22, ?23, ?24)",
        )?
        .execute(params![
            span as i64,
            bucket,
            agent,
            h.server,
            h.port,
            h.proto,
            h.command,
            sum.count as i64,
            sum.sum_us as i64,
            sum.fine.max_us() as i64,
            sum.slow as i64,
            sum.errors as i64,
            sum.timeouts as i64,
            sum.seed_blob(),
            sum.fine_blob(),
            sum.own_sum_us as i64,
            sum.own_blob(),
            sum.depth_blob(),
            sum.moved as i64,
            sum.ask as i64,
            sum.keys as i64,
            sum.multi_key as i64,
            sum.req_bytes as i64,
            sum.rsp_bytes as i64,
        ])?;
    }
    Ok(())
}

/// Reads the [`MERGED_COLUMNS`] from `first` on.
fn merged_from_row(r: &rusqlite::Row<'_>, first: usize) -> rusqlite::Result<Result<Merged>> {
    Ok(Merged::from_stored(stored_columns(r, first)?).map_err(StoreError::from))
}

/// The [`MERGED_COLUMNS`] of a row from `first` on, as they are stored.
fn stored_columns<'r>(
    r: &'r rusqlite::Row<'_>,
    first: usize,
) -> rusqlite::Result<StoredColumns<'r>> {
    let int = |i: usize| -> rusqlite::Result<u64> { Ok(r.get::<_, i64>(first + i)? as u64) };
    Ok(StoredColumns {
        count: int(0)?,
        sum_us: int(1)?,
        max_us: int(2)?,
        slow: int(3)?,
        errors: int(4)?,
        timeouts: int(5)?,
        seed: r.get_ref(first + 6)?.as_blob()?,
        fine: r.get_ref(first + 7)?.as_blob()?,
        own_sum_us: int(8)?,
        own: r.get_ref(first + 9)?.as_blob()?,
        depth: r.get_ref(first + 10)?.as_blob()?,
        moved: int(11)?,
        ask: int(12)?,
        keys: int(13)?,
        multi_key: int(14)?,
        req_bytes: int(15)?,
        rsp_bytes: int(16)?,
    })
}

/// A read-only connection for queries.
pub struct Reader {
    conn: Connection,
}

/// The key of a group, as SQL.
fn group_column(group: Group) -> &'static str {
    match group {
        Group::None => "''",
        Group::Server => "server || ':' || port",
        Group::Agent => "(SELECT name FROM agents WHERE id = agent)",
        Group::Command => "proto || char(31) || command",
        Group::Port => "CAST(port AS TEXT)",
    }
}

/// A filter rendered as SQL conditions (on the columns events and histograms share).
struct Conditions {
    sql: Vec<String>,
    values: Vec<rusqlite::types::Value>,
}

impl Conditions {
    fn new(f: &v1::Filter) -> Self {
        use rusqlite::types::Value;
        let mut c = Conditions {
            sql: Vec::new(),
            values: Vec::new(),
        };
        // Names match in any case: GET, get and Get are the same command.
        let text = |column: &str, value: &str, c: &mut Conditions| {
            if !value.is_empty() {
                c.values.push(Value::Text(value.to_string()));
                c.sql
                    .push(format!("{column} = ?{} COLLATE NOCASE", c.values.len()));
            }
        };
        text("server", &f.server, &mut c);
        text("proto", &f.proto, &mut c);
        text("command", &f.command, &mut c);
        if !f.agent.is_empty() {
            c.values.push(Value::Text(f.agent.clone()));
            c.sql.push(format!(
                "agent = (SELECT id FROM agents WHERE name = ?{})",
                c.values.len()
            ));
        }
        if f.port != 0 {
            c.push("port = ?", Value::Integer(i64::from(f.port)));
        }
        c
    }

    fn push(&mut self, sql: &str, value: rusqlite::types::Value) {
        self.values.push(value);
        self.sql
            .push(sql.replace('?', &format!("?{}", self.values.len())));
    }

    fn time(&mut self, column: &str, from_us: u64, to_us: u64) {
        use rusqlite::types::Value;
        if from_us > 0 {
            self.push(&format!("{column} >= ?"), Value::Integer(from_us as i64));
        }
        if to_us > 0 {
            self.push(&format!("{column} < ?"), Value::Integer(to_us as i64));
        }
    }

    fn where_clause(&self) -> String {
        if self.sql.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", self.sql.join(" AND "))
        }
    }
}

impl Reader {
    /// Opens `path` for reading.
    pub fn open(path: &Path) -> Result<Self> {
        let conn = connect(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        // Pages read in place from the file's mapping rather than copied (a day's roll-ups
        // are tens of MB; a copy per page read was a quarter of a series' time).
        conn.pragma_update(None, "mmap_size", READER_MMAP_BYTES)?;
        Ok(Self { conn })
    }

    /// Merges `[from, to)` (`to` 0: no end): the whole spans of roll-up `level` inside it
    /// from that roll-up, the parts at its ends from the next finer level, and from the
    /// snapshots past the finest.
    fn merge_range(
        &self,
        filter: &v1::Filter,
        from: u64,
        to: u64,
        level: usize,
        group: Group,
        groups: &mut BTreeMap<String, Merged>,
    ) -> Result<()> {
        use rusqlite::types::Value;
        let Some(&span) = ROLLUP_SPANS_US.get(level) else {
            let mut c = Conditions::new(filter);
            c.time("ts_us", from, to);
            return self.merge_rows("histograms", &c, group, groups);
        };
        let first = from.div_ceil(span) * span;
        let end = if to == 0 { u64::MAX } else { to - to % span };
        if first >= end {
            return self.merge_range(filter, from, to, level + 1, group, groups);
        }
        let mut c = Conditions::new(filter);
        c.push("span_us = ?", Value::Integer(span as i64));
        c.time("bucket_us", first, if to == 0 { 0 } else { end });
        self.merge_rows("rollups", &c, group, groups)?;
        if from < first {
            self.merge_range(filter, from, first, level + 1, group, groups)?;
        }
        if to != 0 && end < to {
            self.merge_range(filter, end, to, level + 1, group, groups)?;
        }
        Ok(())
    }

    fn merge_rows(
        &self,
        table: &str,
        c: &Conditions,
        group: Group,
        groups: &mut BTreeMap<String, Merged>,
    ) -> Result<()> {
        let sql = format!(
            "SELECT {}, {MERGED_COLUMNS} FROM {table} {}",
            group_column(group),
            c.where_clause()
        );
        let mut stmt = self.conn.prepare(&sql)?;
        let mut rows = stmt.query(params_from_iter(c.values.iter()))?;
        while let Some(r) = rows.next()? {
            let key = r.get_ref(0)?.as_str().map_err(rusqlite::Error::from)?;
            let columns = stored_columns(r, 1)?;
            match groups.get_mut(key) {
                Some(g) => g.add_stored(columns)?,
                None => {
                    groups.insert(key.to_string(), Merged::from_stored(columns)?);
                }
            }
        }
        Ok(())
    }
}

impl super::Reader for Reader {
    fn slow(&self, req: &v1::SlowRequest) -> Result<Vec<v1::StoredEvent>> {
        use rusqlite::types::Value;
        let f = req.filter.clone().unwrap_or_default();
        let mut c = Conditions::new(&f);
        c.time("ts_us", f.from_us, f.to_us);
        if req.min_latency_us > 0 {
            c.push("latency_us >= ?", Value::Integer(req.min_latency_us as i64));
        }
        if !req.grep.is_empty() {
            c.push("summary GLOB ?", Value::Text(format!("*{}*", req.grep)));
        }
        // Ties in the agents' name order, then the newest stored first: as every store
        // orders them.
        let order = if req.slowest_first {
            "latency_us DESC, ts_us DESC, agent_name, id DESC"
        } else {
            "ts_us DESC, agent_name, id DESC"
        };
        let limit = if req.limit == 0 {
            -1
        } else {
            i64::from(req.limit)
        };
        // The tie order needs a sort no index gives: first the `limit`-th value of the
        // leading key, then sort only what is at or above it; both steps read the key's own
        // index (the planner may otherwise take one that matches the filter and sort every
        // match: 27 s over 10M events).
        let (key, index) = if req.slowest_first {
            ("latency_us", "events_by_latency")
        } else {
            ("ts_us", "events_by_time")
        };
        if limit > 0 {
            let boundary: Option<i64> = self
                .conn
                .prepare(&format!(
                    "SELECT {key} FROM events INDEXED BY {index} {} ORDER BY {key} DESC \
                     LIMIT 1 OFFSET {}",
                    c.where_clause(),
                    limit - 1
                ))?
                .query_row(params_from_iter(c.values.iter()), |r| r.get(0))
                .optional()?;
            if let Some(b) = boundary {
                c.push(&format!("{key} >= ?"), Value::Integer(b));
            }
        }
        let sql = format!(
            "SELECT (SELECT name FROM agents WHERE id = agent) AS agent_name, ts_us, req_done_us, client,
                 server, port, proto, command, summary, latency_us, req_bytes, rsp_bytes, status,
                 own_us, depth
             FROM events INDEXED BY {index} {} ORDER BY {order} LIMIT {limit}",
            c.where_clause()
        );
        let mut stmt = self.conn.prepare(&sql)?;
        let rows = stmt.query_map(params_from_iter(c.values.iter()), |r| {
            Ok(v1::StoredEvent {
                agent: r.get(0)?,
                event: Some(v1::Event {
                    ts_us: r.get::<_, i64>(1)? as u64,
                    req_done_us: r.get::<_, i64>(2)? as u64,
                    client: r.get(3)?,
                    server: r.get(4)?,
                    port: r.get(5)?,
                    proto: r.get(6)?,
                    command: r.get(7)?,
                    summary: r.get(8)?,
                    latency_us: r.get::<_, i64>(9)? as u64,
                    req_bytes: r.get::<_, i64>(10)? as u64,
                    rsp_bytes: r.get::<_, i64>(11)? as u64,
                    status: r.get(12)?,
                    own_us: r.get::<_, i64>(13)? as u64,
                    depth: r.get(14)?,
                }),
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn merged(&self, filter: &v1::Filter, group: Group) -> Result<BTreeMap<String, Merged>> {
        let mut groups = BTreeMap::new();
        self.merge_range(filter, filter.from_us, filter.to_us, 0, group, &mut groups)?;
        Ok(groups)
    }

    /// Step by step, each merged as [`Reader::merged`] merges a range.
    fn series(&self, filter: &v1::Filter, group: Group, step_us: u64) -> Result<Series> {
        let (from, to) = (filter.from_us, filter.to_us);
        let mut series = Series::new();
        let mut start = from - from % step_us;
        while start < to {
            let mut groups = BTreeMap::new();
            let (lo, hi) = (start.max(from), (start + step_us).min(to));
            self.merge_range(filter, lo, hi, 0, group, &mut groups)?;
            for (key, m) in groups {
                series
                    .entry(key)
                    .or_default()
                    .insert(start, m.latency_only());
            }
            start += step_us;
        }
        Ok(series)
    }

    /// Template snapshots are not rolled up.
    fn templates(&self, filter: &v1::Filter) -> Result<BTreeMap<String, Merged>> {
        let mut c = Conditions::new(filter);
        c.time("ts_us", filter.from_us, filter.to_us);
        let mut groups = BTreeMap::new();
        self.merge_rows("templates", &c, Group::Command, &mut groups)?;
        Ok(groups)
    }

    /// Slot snapshots are not rolled up: an agent ships only the slots it saw.
    fn slots(&self, filter: &v1::Filter) -> Result<BTreeMap<u16, SlotSum>> {
        let mut sums = BTreeMap::new();
        if !filter.proto.is_empty() && !filter.proto.eq_ignore_ascii_case("redis") {
            return Ok(sums);
        }
        let f = v1::Filter {
            proto: String::new(),
            command: String::new(),
            ..filter.clone()
        };
        let mut c = Conditions::new(&f);
        c.time("ts_us", f.from_us, f.to_us);
        let sql = format!(
            "SELECT slot, count, sum_us, moved, ask, buckets FROM slots {}",
            c.where_clause()
        );
        let mut stmt = self.conn.prepare(&sql)?;
        let mut rows = stmt.query(params_from_iter(c.values.iter()))?;
        while let Some(r) = rows.next()? {
            let int = |i: usize| -> rusqlite::Result<u64> { Ok(r.get::<_, i64>(i)? as u64) };
            let slot = r.get::<_, i64>(0)? as u16;
            let blob = r.get_ref(5)?.as_blob().map_err(rusqlite::Error::from)?;
            let sum = SlotSum::from_stored(int(1)?, int(2)?, int(3)?, int(4)?, blob)
                .ok_or(StoreError::Histogram(SnapshotError::FineLengths))?;
            sums.entry(slot)
                .or_insert_with(SlotSum::default)
                .merge(&sum);
        }
        Ok(sums)
    }

    fn agents(&self) -> Result<Vec<v1::AgentInfo>> {
        let mut stmt = self.conn.prepare(
            "SELECT a.name, a.hostname, a.version, a.ports, a.first_seen_us, a.last_seen_us,
                 count(s.session), sum(s.events), sum(s.kernel_drops), sum(s.interface_drops),
                 sum(s.decode_errors), sum(s.gaps), sum(s.desyncs), sum(s.timeouts),
                 sum(s.flows_evicted), sum(s.shipper_dropped_events),
                 sum(s.shipper_dropped_histograms), sum(s.shipper_buffered),
                 sum(s.request_lost), sum(s.reply_lost), sum(s.uncertain),
                 sum(s.reply_before_request), sum(s.clock_skew)
             FROM agents a LEFT JOIN sessions s ON s.agent = a.id
             GROUP BY a.id ORDER BY a.name",
        )?;
        let rows = stmt.query_map([], |r| {
            let n = |i: usize| -> rusqlite::Result<u64> {
                Ok(r.get::<_, Option<i64>>(i)?.unwrap_or(0) as u64)
            };
            let ports: String = r.get(3)?;
            Ok(v1::AgentInfo {
                id: r.get(0)?,
                hostname: r.get(1)?,
                version: r.get(2)?,
                first_seen_us: n(4)?,
                last_seen_us: n(5)?,
                ports: super::ports_from_text(&ports),
                sessions: n(6)?,
                events: n(7)?,
                // The store cannot know: the server that answers says.
                connected: false,
                counters: Some(v1::Counters {
                    kernel_drops: n(8)?,
                    interface_drops: n(9)?,
                    decode_errors: n(10)?,
                    gaps: n(11)?,
                    desyncs: n(12)?,
                    timeouts: n(13)?,
                    flows_evicted: n(14)?,
                    shipper_dropped_events: n(15)?,
                    shipper_dropped_histograms: n(16)?,
                    shipper_buffered: n(17)?,
                    request_lost: n(18)?,
                    reply_lost: n(19)?,
                    uncertain: n(20)?,
                    reply_before_request: n(21)?,
                    clock_skew: n(22)?,
                }),
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Reader as _, Writer as _, PROTO_COMMAND_SEPARATOR};
    use super::*;
    use tcpkit_histogram::{seed_bucket, FineHistogram, SEED_BUCKETS};

    fn snapshot(ts_us: u64, command: &str, latencies: &[u64]) -> CheckedSnapshot {
        let mut fine = FineHistogram::default();
        let mut seed = [0; SEED_BUCKETS];
        latencies.iter().for_each(|&l| {
            fine.record(l);
            seed[seed_bucket(l)] += 1;
        });
        CheckedSnapshot {
            ts_us,
            interval_us: 10_000_000,
            server: "10.0.0.2".into(),
            port: 6379,
            proto: "redis".into(),
            command: command.into(),
            merged: Merged {
                count: latencies.len() as u64,
                sum_us: latencies.iter().sum(),
                seed,
                fine,
                ..Merged::default()
            },
        }
    }

    fn event(ts_us: u64, latency_us: u64, summary: &str) -> v1::Event {
        v1::Event {
            ts_us,
            latency_us,
            summary: summary.into(),
            command: summary.split(' ').next().unwrap_or_default().into(),
            server: "10.0.0.2".into(),
            port: 6379,
            proto: "redis".into(),
            ..Default::default()
        }
    }

    fn hello(id: &str, session: u64) -> v1::Hello {
        v1::Hello {
            agent_id: id.into(),
            session,
            ..Default::default()
        }
    }

    #[test]
    fn batches_round_trip_once_and_resume_after_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let mut store = Store::open(&path).unwrap();
        let (key, last) = store.hello(&hello("a1", 7), 1).unwrap();
        assert_eq!(last, 0);
        let batch = CheckedBatch {
            seq: 1,
            events: vec![event(5, 12_000, "GET user:1"), event(6, 30_000, "SET x 1")],
            histograms: vec![snapshot(0, "GET", &[10, 20, 12_000])],
            slots: Vec::new(),
            templates: vec![snapshot(0, "user:{id}", &[10, 20])],
            counters: Some(v1::Counters {
                gaps: 2,
                ..Default::default()
            }),
        };
        assert_eq!(store.commit(&[(key.clone(), &batch)], 2).unwrap(), [true]);
        // Re-sent: skipped, in the same commit as a new batch, which is stored.
        let next = CheckedBatch {
            seq: 2,
            ..CheckedBatch::default()
        };
        assert_eq!(
            store
                .commit(&[(key.clone(), &batch), (key.clone(), &next)], 3)
                .unwrap(),
            [false, true]
        );
        drop(store);

        let mut store = Store::open(&path).unwrap();
        assert_eq!(store.hello(&hello("a1", 7), 4).unwrap().1, 2);
        assert_eq!(
            store.hello(&hello("a1", 8), 4).unwrap().1,
            0,
            "a new session"
        );
        let reader = Reader::open(&path).unwrap();
        let all = reader.slow(&v1::SlowRequest::default()).unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(
            all[0].event.as_ref().unwrap().summary,
            "SET x 1",
            "newest first"
        );
        let grep = reader
            .slow(&v1::SlowRequest {
                grep: "user:*".into(),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(grep.len(), 1);
        let agents = reader.agents().unwrap();
        assert_eq!(agents.len(), 1);
        assert_eq!((agents[0].sessions, agents[0].events), (2, 2));
        // The re-sent batch's template counted once, apart from the commands.
        let templates = reader.templates(&v1::Filter::default()).unwrap();
        assert_eq!(templates.len(), 1);
        assert_eq!(templates["redis\u{1f}user:{id}"].count, 2);
        let commands = reader
            .merged(&v1::Filter::default(), Group::Command)
            .unwrap();
        assert!(
            !commands.keys().any(|k| k.contains("user:")),
            "{commands:?}"
        );
        assert_eq!(agents[0].counters.unwrap().gaps, 2);
        let merged = reader.merged(&v1::Filter::default(), Group::None).unwrap();
        assert_eq!(merged[""].count, 3);
    }

    /// Whatever the range, roll-up and snapshots together give the sum of the snapshots in it.
    #[test]
    fn ranges_merge_whole_hours_and_edges_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let mut store = Store::open(&path).unwrap();
        let (key, _) = store.hello(&hello("a1", 1), 0).unwrap();
        let interval = 240_000_000; // 4 min: 15 per hour, over 5 hours
        let snapshots: Vec<CheckedSnapshot> = (0..75u64)
            .map(|i| {
                snapshot(
                    HOUR_US * 10 + i * interval,
                    if i % 2 == 0 { "GET" } else { "SET" },
                    &[i + 1, 1000 * (i + 1)],
                )
            })
            .collect();
        let batch = CheckedBatch {
            seq: 1,
            histograms: snapshots.clone(),
            ..CheckedBatch::default()
        };
        store.commit(&[(key, &batch)], 0).unwrap();
        let reader = Reader::open(&path).unwrap();
        let start = HOUR_US * 10;
        for (from, to) in [
            (0, 0),
            (start + 1, 0),
            (0, start + 2 * HOUR_US + 1),
            (start + interval, start + 4 * HOUR_US + 3 * interval),
            (start + HOUR_US, start + 2 * HOUR_US),
            (start + 5, start + 7),
            (
                start + 13 * 60_000_000,
                start + 3 * HOUR_US + 47 * 60_000_000,
            ),
            (start + 59 * 60_000_000, start + 61 * 60_000_000),
        ] {
            let filter = v1::Filter {
                from_us: from,
                to_us: to,
                ..Default::default()
            };
            let mut expected: BTreeMap<String, Merged> = BTreeMap::new();
            for s in &snapshots {
                if s.ts_us >= from && (to == 0 || s.ts_us < to) {
                    let key = format!("{}{PROTO_COMMAND_SEPARATOR}{}", s.proto, s.command);
                    expected.entry(key).or_default().merge(&s.merged);
                }
            }
            assert_eq!(
                reader.merged(&filter, Group::Command).unwrap(),
                expected,
                "{from}..{to}"
            );
        }
    }

    #[test]
    fn retention_deletes_by_age_and_by_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let mut store = Store::open(&path).unwrap();
        let (key, _) = store.hello(&hello("a1", 1), 0).unwrap();
        let day = 24 * HOUR_US;
        for (seq, t) in [(1, day), (2, 5 * day), (3, 9 * day)] {
            let batch = CheckedBatch {
                seq,
                events: (0..2000)
                    .map(|i| event(t + i, 20_000, &"GET key ".repeat(20)))
                    .collect(),
                histograms: vec![snapshot(t, "GET", &[5])],
                ..CheckedBatch::default()
            };
            store.commit(&[(key.clone(), &batch)], 0).unwrap();
        }
        store
            .enforce_retention(Some(Duration::from_secs(6 * 86_400)), None, 10 * day)
            .unwrap();
        let reader = Reader::open(&path).unwrap();
        let left = |r: &Reader| r.slow(&v1::SlowRequest::default()).unwrap().len();
        assert_eq!(left(&reader), 4000);
        assert_eq!(
            reader.merged(&v1::Filter::default(), Group::None).unwrap()[""].count,
            2
        );
        let size = store.live_bytes().unwrap();
        store
            .enforce_retention(None, Some(size * 2 / 3), 10 * day)
            .unwrap();
        assert_eq!(left(&reader), 2000, "the oldest day went first");
        assert!(store.live_bytes().unwrap() <= size * 2 / 3);
    }
}
