//! How `tcpkit-query` shows the aggregator's answers: aligned tables and bars for people,
//! JSON for scripts (the key names are a contract: see the fleet issue and README).

use std::borrow::Cow;
use std::fmt::Write as _;

use serde_json::{json, Value};
use tcpkit_histogram::SEED_LABELS;
use tcpkit_proto::v1;

use crate::units::format_local;

/// True for what must not reach a terminal as it is: control characters (C0, DEL, C1)
/// and the bidirectional overrides and isolates that reorder what is shown.
pub fn needs_escape(c: char) -> bool {
    c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `s` with what [`needs_escape`] written as `\xNN` or `\u{NNNN}`; every text this module
/// prints for people goes through it.
pub fn printable(s: &str) -> Cow<'_, str> {
    if !s.chars().any(needs_escape) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            c if !needs_escape(c) => out.push(c),
            c if (c as u32) < 0x100 => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => {
                let _ = write!(out, "\\u{{{:04x}}}", c as u32);
            }
        }
    }
    Cow::Owned(out)
}

/// Milliseconds with three decimals.
fn ms(us: u64) -> String {
    format!("{}.{:03}", us / 1000, us % 1000)
}

/// A slow event in the slow log's format, after the agent in brackets.
pub fn slow_line(e: &v1::StoredEvent) -> String {
    let ev = e.event.clone().unwrap_or_default();
    let latency = if ev.status == v1::Status::Timeout as i32 {
        "timeout".to_string()
    } else {
        format!("{} ms", ms(ev.latency_us))
    };
    let server = printable(&ev.server);
    let server = if ev.server.contains(':') {
        format!("[{server}]:{}", ev.port)
    } else {
        format!("{server}:{}", ev.port)
    };
    format!(
        "[{}] {} {} => {} | {} | {}",
        printable(&e.agent),
        format_local(ev.ts_us),
        printable(&ev.client),
        server,
        latency,
        printable(&ev.summary)
    )
}

/// The slow events as JSON.
pub fn slow_json(events: &[v1::StoredEvent]) -> Value {
    Value::Array(events.iter().map(slow_event_json).collect())
}

/// The slow events as JSON lines: one object (the same as in [`slow_json`]) per line.
pub fn slow_json_lines(events: &[v1::StoredEvent]) -> String {
    events
        .iter()
        .map(|e| slow_event_json(e).to_string() + "\n")
        .collect()
}

fn slow_event_json(e: &v1::StoredEvent) -> Value {
    let ev = e.event.clone().unwrap_or_default();
    let status = v1::Status::try_from(ev.status).map_or("unknown", |s| match s {
        v1::Status::Ok => "ok",
        v1::Status::Error => "error",
        v1::Status::Timeout => "timeout",
    });
    json!({
        "ts_us": ev.ts_us,
        "agent": e.agent,
        "client": ev.client,
        "server": ev.server,
        "port": ev.port,
        "proto": ev.proto,
        "command": ev.command,
        "summary": ev.summary,
        "latency_us": ev.latency_us,
        "own_us": ev.own_us,
        "depth": ev.depth,
        "req_bytes": ev.req_bytes,
        "rsp_bytes": ev.rsp_bytes,
        "status": status,
    })
}

/// A merged histogram as JSON.
pub fn histogram_json(h: &v1::Histogram, with_key: bool) -> Value {
    let mut v = json!({
        "count": h.count,
        "sum_us": h.sum_us,
        "avg_us": h.sum_us.checked_div(h.count).unwrap_or(0),
        "p50_us": h.p50_us,
        "p90_us": h.p90_us,
        "p99_us": h.p99_us,
        "p999_us": h.p999_us,
        "max_us": h.max_us,
        "slow": h.slow,
        "errors": h.errors,
        "timeouts": h.timeouts,
        "latencies": h.seed,
        "own_count": h.own_count,
        "own_sum_us": h.own_sum_us,
        "own_p50_us": h.own_p50_us,
        "own_p90_us": h.own_p90_us,
        "own_p99_us": h.own_p99_us,
        "own_p999_us": h.own_p999_us,
        "own_max_us": h.own_max_us,
        "pipelined": h.pipelined,
        "depth_p50": h.depth_p50,
        "depth_p99": h.depth_p99,
        "depth_max": h.depth_max,
        "moved": h.moved,
        "ask": h.ask,
        "keys": h.keys,
        "multi_key": h.multi_key,
        "req_bytes": h.req_bytes,
        "rsp_bytes": h.rsp_bytes,
    });
    if h.p99_le_us > 0 {
        // A slot's row: bounds of its percentiles, not the percentiles.
        v["p50_le_us"] = json!(h.p50_le_us);
        v["p99_le_us"] = json!(h.p99_le_us);
    }
    if with_key {
        v["key"] = json!(h.key);
        if !h.proto.is_empty() {
            v["proto"] = json!(h.proto);
        }
    }
    v
}

/// The `hist` answer as JSON: the merged histogram, and its groups with `--by`.
pub fn hist_json(reply: &v1::HistReply, grouped: bool) -> Value {
    let mut v = histogram_json(&reply.all.clone().unwrap_or_default(), false);
    if grouped {
        v["groups"] = Value::Array(
            reply
                .groups
                .iter()
                .map(|g| histogram_json(g, true))
                .collect(),
        );
    }
    v
}

/// The `heatmap` answer (a series) as JSON: the range and step, and per group its steps,
/// each a histogram as `hist --json` has it plus its fine buckets (`fine_index`,
/// `fine_count`: bucket indexes and counts, `tcpkit_histogram::fine_lower` of an index is
/// its lower bound in µs).
pub fn series_json(reply: &v1::SeriesReply) -> Value {
    let series: Vec<Value> = reply
        .series
        .iter()
        .map(|s| {
            let steps: Vec<Value> = s
                .steps
                .iter()
                .map(|step| {
                    let h = step.histogram.clone().unwrap_or_default();
                    let mut v = histogram_json(&h, false);
                    v["ts_us"] = json!(step.ts_us);
                    v["fine_index"] = json!(h.fine_index);
                    v["fine_count"] = json!(h.fine_count);
                    v
                })
                .collect();
            let mut v = json!({ "key": s.key, "steps": steps });
            if !s.proto.is_empty() {
                v["proto"] = json!(s.proto);
            }
            v
        })
        .collect();
    json!({
        "step_us": reply.step_us,
        "from_us": reply.from_us,
        "to_us": reply.to_us,
        "series": series,
    })
}

/// The `heatmap` answer for people: one map per series (titled with `--by`).
pub fn heatmap_text(reply: &v1::SeriesReply, grouped: bool, color: bool) -> String {
    let mut out = String::new();
    for s in &reply.series {
        if grouped {
            let name = if s.proto.is_empty() {
                s.key.clone()
            } else {
                format!("{} {}", s.proto, s.key)
            };
            out.push_str(&format!("{}\n", printable(&name)));
        }
        let map = crate::heatmap::Heatmap::new(s, reply.step_us, reply.from_us, reply.to_us);
        out.push_str(&map.render(color));
        out.push('\n');
    }
    out
}

/// Lays out rows as columns padded to their widest cell; the first row is the header.
/// Cells are made [`printable`].
pub fn table(rows: &[Vec<String>]) -> String {
    let rows: Vec<Vec<Cow<'_, str>>> = rows
        .iter()
        .map(|r| r.iter().map(|cell| printable(cell)).collect())
        .collect();
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in &rows {
        let cells: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(c, cell)| {
                // The first column (a name) to the left, figures to the right.
                if c == 0 {
                    format!("{cell:<w$}", w = widths[c])
                } else {
                    format!("{cell:>w$}", w = widths[c])
                }
            })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// A group's name for people: its key, after its protocol when it is a command.
fn group_name(h: &v1::Histogram) -> String {
    if h.proto.is_empty() {
        h.key.clone()
    } else {
        format!("{} {}", h.proto, h.key)
    }
}

fn figures_row(name: &str, h: &v1::Histogram) -> Vec<String> {
    vec![
        name.to_string(),
        h.count.to_string(),
        ms(h.sum_us.checked_div(h.count).unwrap_or(0)),
        ms(h.p50_us),
        ms(h.p90_us),
        ms(h.p99_us),
        ms(h.p999_us),
        ms(h.max_us),
        h.slow.to_string(),
        h.errors.to_string(),
        h.timeouts.to_string(),
    ]
}

const FIGURES_HEADER: [&str; 11] = [
    "", "count", "avg ms", "p50 ms", "p90 ms", "p99 ms", "p999 ms", "max ms", "slow", "errors",
    "timeouts",
];

/// The own-time figures of a group (`hist --own`): how many exchanges have one, their
/// percentiles, the time queued behind earlier requests, and the pipeline depths.
fn own_row(name: &str, h: &v1::Histogram) -> Vec<String> {
    let queued = if h.own_count == h.count {
        ms(h.sum_us.saturating_sub(h.own_sum_us))
    } else {
        // Some agents send no own times: the difference would count their latency as queued.
        "-".to_string()
    };
    vec![
        name.to_string(),
        h.own_count.to_string(),
        ms(h.own_sum_us.checked_div(h.own_count).unwrap_or(0)),
        ms(h.own_p50_us),
        ms(h.own_p90_us),
        ms(h.own_p99_us),
        ms(h.own_p999_us),
        ms(h.own_max_us),
        queued,
        h.pipelined.to_string(),
        h.depth_p99.to_string(),
        h.depth_max.to_string(),
    ]
}

const OWN_HEADER: [&str; 12] = [
    "",
    "count",
    "avg own ms",
    "p50 own",
    "p90 own",
    "p99 own",
    "p999 own",
    "max own",
    "queued ms",
    "pipelined",
    "depth p99",
    "max depth",
];

/// The seed buckets of a histogram's own times, from their fine buckets (each counted by the
/// value it stands for: within 1% of the bucket edges).
fn own_seed(h: &v1::Histogram) -> Vec<u64> {
    let mut seed = vec![0u64; SEED_LABELS.len()];
    for (&i, &n) in h.own_fine_index.iter().zip(&h.own_fine_count) {
        let bucket = tcpkit_histogram::seed_bucket(tcpkit_histogram::fine_value(i as usize));
        seed[bucket] = seed[bucket].saturating_add(n);
    }
    seed
}

/// Width of the longest bar; of each group's with `--by`.
const BAR: usize = 40;
const GROUP_BAR: usize = 16;

/// How bar lengths follow counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    /// By the logarithm of the count: one request at 100 ms stays visible beside 4,000 at
    /// 5 ms, and a bucket 10 times fuller is a step longer, not 10 times longer.
    Log,
    /// In proportion to the count.
    Linear,
}

/// The bar of `count` out of `max`, `width` long at most; any count above 0 gets one mark.
fn bar(count: u64, max: u64, width: usize, scale: Scale) -> String {
    if count == 0 || max == 0 {
        return " ".repeat(width);
    }
    let len = match scale {
        Scale::Linear => (count as u128 * width as u128).div_ceil(max as u128) as usize,
        Scale::Log => {
            let share = ((count as f64).ln_1p() / (max as f64).ln_1p()).min(1.0);
            ((share * width as f64).ceil() as usize).max(1)
        }
    };
    format!("{:<width$}", "#".repeat(len.min(width)))
}

/// The cells of one group's row of figures.
type RowOf = fn(&str, &v1::Histogram) -> Vec<String>;

/// The `hist` answer for people: the figures, then the seed buckets as bars (with `--by`, a
/// column of counts and bars per group before the fleet's), buckets empty everywhere left
/// out; with `own`, those of the own times.
pub fn hist_text(reply: &v1::HistReply, grouped: bool, own: bool, scale: Scale) -> String {
    let mut all = reply.all.clone().unwrap_or_default();
    let (header, row): (&[&str], RowOf) = if own {
        (&OWN_HEADER, own_row)
    } else {
        (&FIGURES_HEADER, figures_row)
    };
    let mut rows = vec![header.iter().map(|s| s.to_string()).collect()];
    if grouped {
        rows.extend(reply.groups.iter().map(|g| row(&group_name(g), g)));
    }
    rows.push(row("all", &all));
    let mut out = table(&rows);
    out.push('\n');
    let mut groups = if grouped {
        reply.groups.clone()
    } else {
        Vec::new()
    };
    if own {
        all.seed = own_seed(&all);
        groups.iter_mut().for_each(|g| g.seed = own_seed(g));
    }
    let count = |h: &v1::Histogram, i: usize| h.seed.get(i).copied().unwrap_or(0);
    let max = all.seed.iter().copied().max().unwrap_or(0);
    let group_max = groups
        .iter()
        .flat_map(|g| g.seed.iter().copied())
        .max()
        .unwrap_or(0);
    let mut buckets = vec![{
        let mut header = vec![if own { "own time" } else { "latency" }.to_string()];
        for g in &groups {
            header.push(group_name(g));
            header.push(String::new());
        }
        header.push("all".to_string());
        header.push(String::new());
        header
    }];
    for (i, label) in SEED_LABELS.iter().enumerate() {
        if count(&all, i) == 0 && groups.iter().all(|g| count(g, i) == 0) {
            continue;
        }
        let mut row = vec![label.to_string()];
        for g in &groups {
            row.push(count(g, i).to_string());
            row.push(bar(count(g, i), group_max, GROUP_BAR, scale));
        }
        row.push(count(&all, i).to_string());
        row.push(bar(count(&all, i), max, BAR, scale));
        buckets.push(row);
    }
    out.push_str(&table(&buckets));
    out
}

/// The `top` answer for people.
pub fn top_text(rows: &[v1::Histogram]) -> String {
    let header = ["key", "count", "slow", "p99 ms", "own p99 ms", "total ms"];
    ranked_table(&header, rows, |r| {
        vec![
            group_name(r),
            r.count.to_string(),
            r.slow.to_string(),
            ms(r.p99_us),
            ms(r.own_p99_us),
            ms(r.sum_us),
        ]
    })
}

/// Ranked rows as a table: a `#` column, then `header` and each row's `cells`.
fn ranked_table(
    header: &[&str],
    rows: &[v1::Histogram],
    cells: impl Fn(&v1::Histogram) -> Vec<String>,
) -> String {
    let mut t = vec![std::iter::once("#")
        .chain(header.iter().copied())
        .map(str::to_string)
        .collect::<Vec<_>>()];
    for (i, r) in rows.iter().enumerate() {
        let mut row = vec![(i + 1).to_string()];
        row.extend(cells(r));
        t.push(row);
    }
    table(&t)
}

/// The `keys` answer for people: per template its requests, the keys they named, bytes,
/// latency and own-time p99.
pub fn keys_text(rows: &[v1::Histogram]) -> String {
    let header = [
        "template",
        "count",
        "keys",
        "multi-key",
        "req bytes",
        "rsp bytes",
        "p50 ms",
        "p99 ms",
        "own p99 ms",
    ];
    ranked_table(&header, rows, |r| {
        vec![
            group_name(r),
            r.count.to_string(),
            r.keys.to_string(),
            r.multi_key.to_string(),
            r.req_bytes.to_string(),
            r.rsp_bytes.to_string(),
            ms(r.p50_us),
            ms(r.p99_us),
            ms(r.own_p99_us),
        ]
    })
}

/// The `top --of slot` answer for people: per slot its requests, redirects, the bounds of
/// its median and p99 (the slots' latencies are kept in 10 µs-doubling buckets) and its
/// total time.
pub fn top_slots_text(rows: &[v1::Histogram]) -> String {
    let header = [
        "slot",
        "count",
        "moved",
        "ask",
        "p50 ≤ ms",
        "p99 ≤ ms",
        "total ms",
    ];
    ranked_table(&header, rows, |r| {
        vec![
            r.key.clone(),
            r.count.to_string(),
            r.moved.to_string(),
            r.ask.to_string(),
            ms(r.p50_le_us),
            ms(r.p99_le_us),
            ms(r.sum_us),
        ]
    })
}

fn counters_json(c: &v1::Counters) -> Value {
    json!({
        "kernel_drops": c.kernel_drops,
        "interface_drops": c.interface_drops,
        "decode_errors": c.decode_errors,
        "gaps": c.gaps,
        "desyncs": c.desyncs,
        "timeouts": c.timeouts,
        "flows_evicted": c.flows_evicted,
        "shipper_dropped_events": c.shipper_dropped_events,
        "shipper_dropped_histograms": c.shipper_dropped_histograms,
        "shipper_buffered": c.shipper_buffered,
        "untimed": {
            "request_lost": c.request_lost,
            "reply_lost": c.reply_lost,
            "uncertain": c.uncertain,
            "reply_before_request": c.reply_before_request,
        },
        "clock_skew": c.clock_skew,
    })
}

fn ports_text(a: &v1::AgentInfo) -> String {
    a.ports
        .iter()
        .map(|p| format!("{}/{}", p.port, p.proto))
        .collect::<Vec<_>>()
        .join(",")
}

/// The agents as JSON.
pub fn agents_json(agents: &[v1::AgentInfo]) -> Value {
    Value::Array(
        agents
            .iter()
            .map(|a| {
                let mut v = json!({
                    "id": a.id,
                    "hostname": a.hostname,
                    "version": a.version,
                    "first_seen_us": a.first_seen_us,
                    "last_seen_us": a.last_seen_us,
                    "ports": a.ports.iter().map(|p| json!({"port": p.port, "proto": p.proto})).collect::<Vec<_>>(),
                    "sessions": a.sessions,
                    "events": a.events,
                    "connected": a.connected,
                });
                if let (Value::Object(m), Value::Object(c)) =
                    (&mut v, counters_json(&a.counters.unwrap_or_default()))
                {
                    m.extend(c);
                }
                v
            })
            .collect(),
    )
}

/// A span of seconds in its two largest units: `42s`, `3m12s`, `2h05m`, `3d04h`.
pub fn ago(secs: u64) -> String {
    let (m, h, d) = (secs / 60, secs / 3600, secs / 86_400);
    if d > 0 {
        format!("{d}d{:02}h", h % 24)
    } else if h > 0 {
        format!("{h}h{:02}m", m % 60)
    } else if m > 0 {
        format!("{m}m{:02}s", secs % 60)
    } else {
        format!("{secs}s")
    }
}

/// The agents for people (connected: a stream of it is open on the aggregator that
/// answered); `now_us` says how long ago each was last seen.
pub fn agents_text(agents: &[v1::AgentInfo], now_us: u64) -> String {
    let mut t = vec![[
        "agent",
        "state",
        "hostname",
        "version",
        "last seen",
        "ago",
        "ports",
        "sessions",
        "events",
        "kernel drops",
        "gaps",
        "desyncs",
        "timeouts",
        "not timed",
        "evicted",
        "shipper drops",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect::<Vec<_>>()];
    for a in agents {
        let c = a.counters.unwrap_or_default();
        t.push(vec![
            a.id.clone(),
            if a.connected { "connected" } else { "stale" }.to_string(),
            a.hostname.clone(),
            a.version.clone(),
            format_local(a.last_seen_us)[..19].to_string(),
            ago(now_us.saturating_sub(a.last_seen_us) / 1_000_000),
            ports_text(a),
            a.sessions.to_string(),
            a.events.to_string(),
            c.kernel_drops.saturating_add(c.interface_drops).to_string(),
            c.gaps.to_string(),
            c.desyncs.to_string(),
            c.timeouts.to_string(),
            [
                c.request_lost,
                c.reply_lost,
                c.uncertain,
                c.reply_before_request,
            ]
            .into_iter()
            .fold(0u64, u64::saturating_add)
            .to_string(),
            c.flows_evicted.to_string(),
            c.shipper_dropped_events
                .saturating_add(c.shipper_dropped_histograms)
                .to_string(),
        ]);
    }
    table(&t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_never_reach_the_terminal() {
        assert_eq!(printable("plain GET user:1"), "plain GET user:1");
        assert_eq!(printable("a\u{1b}[2Jb\nc\u{7f}"), "a\\x1b[2Jb\\x0ac\\x7f");
        assert_eq!(printable("x\u{202e}y\u{9b}"), "x\\u{202e}y\\x9b");
        let event = v1::StoredEvent {
            agent: "evil\u{1b}]0;title\u{7}".into(),
            event: Some(v1::Event {
                ts_us: 1_700_000_000_000_000,
                client: "1.2.3.4:5\r".into(),
                server: "10.0.0.2".into(),
                port: 6379,
                summary: "GET \u{1b}[31mred".into(),
                ..Default::default()
            }),
        };
        let line = slow_line(&event);
        assert!(!line.chars().any(needs_escape), "{line:?}");
        assert!(line.contains("[evil\\x1b]0;title\\x07]") && line.contains("GET \\x1b[31mred"));
        let agent = v1::AgentInfo {
            id: "a\u{1b}b".into(),
            hostname: "h\nx".into(),
            ..Default::default()
        };
        let text = agents_text(&[agent], 0);
        assert!(!text
            .trim_end()
            .chars()
            .any(|c| c != '\n' && needs_escape(c)));
        assert_eq!(text.lines().count(), 2, "{text}");
    }

    #[test]
    fn ago_in_two_units() {
        assert_eq!(ago(42), "42s");
        assert_eq!(ago(192), "3m12s");
        assert_eq!(ago(2 * 3600 + 5 * 60 + 9), "2h05m");
        assert_eq!(ago(3 * 86_400 + 4 * 3600), "3d04h");
    }

    #[test]
    fn tables_align_and_bars_scale() {
        let t = table(&[
            vec!["a".into(), "count".into()],
            vec!["longer".into(), "7".into()],
        ]);
        assert_eq!(t, "a       count\nlonger      7\n");
        let reply = v1::HistReply {
            all: Some(v1::Histogram {
                count: 3,
                sum_us: 3000,
                seed: {
                    let mut s = vec![0; 18];
                    s[0] = 2;
                    s[3] = 1;
                    s
                },
                ..Default::default()
            }),
            groups: vec![],
        };
        let text = hist_text(&reply, false, false, Scale::Linear);
        assert!(
            text.contains(&format!("0ms~0.1ms    2  {}", "#".repeat(40))),
            "{text}"
        );
        assert!(
            text.contains(&format!("0.5ms~1ms    1  {}", "#".repeat(20))),
            "{text}"
        );
        assert!(
            !text.contains("0.1ms~0.2ms"),
            "empty buckets left out: {text}"
        );
        let json = hist_json(&reply, false);
        assert_eq!(json["count"], 3);
        assert_eq!(json["latencies"][3], 1);
        assert!(json.get("groups").is_none());
    }

    /// On a log scale one request stays visible beside thousands, and a bucket ten times
    /// fuller is a step longer; with --by, each group has its bars.
    #[test]
    fn bars_are_logarithmic_and_drawn_per_group() {
        assert_eq!(bar(4000, 4000, 40, Scale::Log).trim_end().len(), 40);
        assert_eq!(bar(1, 4000, 40, Scale::Log).trim_end().len(), 4);
        assert_eq!(bar(1, 4000, 40, Scale::Linear).trim_end().len(), 1);
        assert_eq!(bar(400, 4000, 40, Scale::Log).trim_end().len(), 29);
        assert_eq!(bar(0, 4000, 40, Scale::Log).trim_end().len(), 0);
        let seed = |pairs: &[(usize, u64)]| {
            let mut s = vec![0; 18];
            pairs.iter().for_each(|&(i, n)| s[i] = n);
            s
        };
        let group = |key: &str, pairs: &[(usize, u64)]| v1::Histogram {
            key: key.into(),
            count: pairs.iter().map(|p| p.1).sum(),
            seed: seed(pairs),
            ..Default::default()
        };
        let reply = v1::HistReply {
            all: Some(group("", &[(2, 4000), (9, 1)])),
            groups: vec![group("GET", &[(2, 4000)]), group("DEBUG", &[(9, 1)])],
        };
        let text = hist_text(&reply, true, false, Scale::Log);
        let rows: Vec<&str> = text.lines().filter(|l| l.contains('#')).collect();
        assert_eq!(rows.len(), 2, "{text}");
        // GET's bar, then DEBUG's empty cell, then the fleet's full bar.
        assert!(
            rows[0].contains(&"#".repeat(16)) && rows[0].contains(&"#".repeat(40)),
            "{text}"
        );
        assert_eq!(rows[1].matches('#').count(), 2 + 4, "{text}");
    }

    #[test]
    fn slow_lines_follow_the_slow_log() {
        let e = v1::StoredEvent {
            agent: "a1".into(),
            event: Some(v1::Event {
                ts_us: 1_700_000_000_123_456,
                client: "10.0.0.1:5000".into(),
                server: "10.0.0.2".into(),
                port: 6379,
                latency_us: 11_204,
                summary: "set foo bar".into(),
                ..Default::default()
            }),
        };
        let line = slow_line(&e);
        assert!(line.starts_with("[a1] "), "{line}");
        assert!(
            line.ends_with(".123456 10.0.0.1:5000 => 10.0.0.2:6379 | 11.204 ms | set foo bar"),
            "{line}"
        );
    }
}
