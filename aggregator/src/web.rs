//! `--http-listen`: the aggregator's web page and its JSON API.
//!
//! * `GET /` (and `/app.js`, `/app.css`): the page, embedded in the binary (no internet at
//!   run time, no build step): plain HTML, CSS and canvas, no library.
//! * `GET /api/v1/hist`, `/api/v1/slow`, `/api/v1/series`, `/api/v1/top`, `/api/v1/agents`: the Query
//!   service's answers as `tcpkit-query --json` prints them (the same [`crate::report`]
//!   functions), with the same filters as query parameters: `since` (90s, 1h), `from` and
//!   `to` (as `--from`/`--to`) or `from_us` and `to_us`, `server`, `port`, `proto`, `agent`,
//!   `command`, `by`; `slow` adds `grep`, `min_ms`, `limit`, `slowest`; `series` adds `step`;
//!   `top` takes `of` (command, server, agent, port, slot, template: `tcpkit-query keys`),
//!   `by` (slow, p99, own-p99, total, requests, redirects, bytes) and `limit`.
//! * With `--token-file`, the API asks for `Authorization: Bearer TOKEN` (401 without); the
//!   page asks for the token once and keeps it in the tab's session storage, never in a URL.
//! * With `--tls-cert`, HTTPS with the gRPC listener's certificate (and its client CA).

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{header, Method, Request, Response, StatusCode};
use serde_json::{json, Value};
use tcpkit_proto::v1::{self, query_server::Query};
use tokio::net::TcpListener;

use crate::report;
use crate::units::{parse_duration, parse_time};

const INDEX_HTML: &str = include_str!("../web/index.html");
const APP_JS: &str = include_str!("../web/app.js");
const APP_CSS: &str = include_str!("../web/app.css");

/// Clients served at once at most; more are closed.
const MAX_CLIENTS: usize = 64;
/// The longest request head read (a query string of filters fits).
const MAX_HEAD: usize = 16384;

/// What the API answers with.
#[derive(Clone)]
pub struct Api<Q> {
    /// The Query service.
    pub query: Q,
    /// `Bearer TOKEN`, when calls need a token.
    pub expected: Option<Arc<str>>,
}

/// Serves the page and the API on `listener` until `shutdown` resolves; over TLS with
/// `tls` (the gRPC listener's certificate, key and client CA).
pub async fn serve<Q: Query + Clone>(
    listener: TcpListener,
    api: Api<Q>,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: impl Future<Output = ()>,
) {
    use tcpkit_ops::prometheus::{serve_http, serve_http_over};
    let handle = move |request| {
        let api = api.clone();
        async move { answer(&api, request).await }
    };
    match tls {
        None => serve_http(listener, MAX_CLIENTS, MAX_HEAD, shutdown, handle).await,
        Some(config) => {
            let acceptor = tokio_rustls::TlsAcceptor::from(config);
            let wrap = move |socket| acceptor.clone().accept(socket);
            serve_http_over(listener, MAX_CLIENTS, MAX_HEAD, shutdown, wrap, handle).await
        }
    }
}

fn response(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    let headers = r.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    headers.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    headers.insert(
        "x-content-type-options",
        header::HeaderValue::from_static("nosniff"),
    );
    r
}

fn json_response(status: StatusCode, v: &Value) -> Response<Full<Bytes>> {
    response(status, "application/json", format!("{v:#}\n"))
}

fn error(status: StatusCode, why: impl std::fmt::Display) -> Response<Full<Bytes>> {
    json_response(status, &json!({ "error": why.to_string() }))
}

async fn answer<Q: Query, B>(api: &Api<Q>, request: Request<B>) -> Response<Full<Bytes>> {
    if request.method() != Method::GET {
        return error(StatusCode::METHOD_NOT_ALLOWED, "GET only");
    }
    let path = request.uri().path().to_string();
    match path.as_str() {
        "/" | "/index.html" => {
            return response(
                StatusCode::OK,
                "text/html; charset=utf-8",
                INDEX_HTML.into(),
            )
        }
        "/app.js" => {
            return response(
                StatusCode::OK,
                "text/javascript; charset=utf-8",
                APP_JS.into(),
            )
        }
        "/app.css" => return response(StatusCode::OK, "text/css; charset=utf-8", APP_CSS.into()),
        _ => {}
    }
    let Some(call) = path.strip_prefix("/api/v1/") else {
        return error(StatusCode::NOT_FOUND, format!("no page {path}"));
    };
    if let Some(expected) = &api.expected {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        if !crate::auth::same_bytes(given, expected.as_bytes()) {
            return error(
                StatusCode::UNAUTHORIZED,
                "this aggregator needs its token (--token-file)",
            );
        }
    }
    let params: HashMap<String, String> = request
        .uri()
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    match call_api(&api.query, call, &Params(params)).await {
        Ok(v) => json_response(StatusCode::OK, &v),
        Err(Failure::Bad(why)) => error(StatusCode::BAD_REQUEST, why),
        Err(Failure::Status(s)) => {
            let code = match s.code() {
                tonic::Code::InvalidArgument => StatusCode::BAD_REQUEST,
                tonic::Code::NotFound => StatusCode::NOT_FOUND,
                _ => StatusCode::SERVICE_UNAVAILABLE,
            };
            error(code, s.message())
        }
    }
}

/// Why a call failed: its parameters, or the service.
enum Failure {
    Bad(String),
    Status(tonic::Status),
}

impl From<tonic::Status> for Failure {
    fn from(s: tonic::Status) -> Self {
        Failure::Status(s)
    }
}

/// A call's query parameters.
struct Params(HashMap<String, String>);

impl Params {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .get(key)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    fn number<T: std::str::FromStr>(&self, key: &str) -> Result<Option<T>, Failure> {
        self.get(key)
            .map(|v| {
                v.parse()
                    .map_err(|_| Failure::Bad(format!("{key}={v}: not a number")))
            })
            .transpose()
    }

    fn flag(&self, key: &str) -> bool {
        matches!(self.get(key), Some("1" | "true" | "yes"))
    }

    /// The filter, as `tcpkit-query`'s flags make it.
    fn filter(&self) -> Result<v1::Filter, Failure> {
        let bad = Failure::Bad;
        let from_us = match (self.get("since"), self.get("from"), self.number("from_us")?) {
            (Some(d), _, _) => crate::server::now_us()
                .saturating_sub(parse_duration(d).map_err(bad)?.as_micros() as u64),
            (None, Some(t), _) => parse_time(t).map_err(bad)?,
            (None, None, Some(us)) => us,
            (None, None, None) => 0,
        };
        let to_us = match (self.get("to"), self.number("to_us")?) {
            (Some(t), _) => parse_time(t).map_err(Failure::Bad)?,
            (None, Some(us)) => us,
            (None, None) => 0,
        };
        if to_us != 0 && to_us <= from_us {
            return Err(Failure::Bad(
                "to must be after the start of the range".into(),
            ));
        }
        let text = |k: &str| self.get(k).unwrap_or_default().to_string();
        Ok(v1::Filter {
            from_us,
            to_us,
            server: text("server"),
            port: self.number::<u16>("port")?.map_or(0, u32::from),
            proto: text("proto"),
            agent: text("agent"),
            command: text("command"),
        })
    }

    /// `by`: none (absent), server, agent, command or port.
    fn by(&self) -> Result<Option<v1::GroupBy>, Failure> {
        self.choice(
            "by",
            &[
                ("server", v1::GroupBy::Server),
                ("agent", v1::GroupBy::Agent),
                ("command", v1::GroupBy::Command),
                ("port", v1::GroupBy::Port),
            ],
        )
    }

    /// Parameter `key`, one of `choices` (its name, as `tcpkit-query` spells it, and its
    /// value); `None` when absent.
    fn choice<T: Copy>(&self, key: &str, choices: &[(&str, T)]) -> Result<Option<T>, Failure> {
        let Some(given) = self.get(key) else {
            return Ok(None);
        };
        match choices.iter().find(|(name, _)| *name == given) {
            Some((_, value)) => Ok(Some(*value)),
            None => {
                let names: Vec<&str> = choices.iter().map(|(name, _)| *name).collect();
                Err(Failure::Bad(format!("{key}={given}: {}", names.join(", "))))
            }
        }
    }
}

async fn call_api<Q: Query>(query: &Q, call: &str, p: &Params) -> Result<Value, Failure> {
    use tonic::Request;
    Ok(match call {
        "hist" => {
            let by = p.by()?;
            let reply = query
                .hist(Request::new(v1::HistRequest {
                    filter: Some(p.filter()?),
                    by: by.unwrap_or(v1::GroupBy::None) as i32,
                }))
                .await?
                .into_inner();
            report::hist_json(&reply, by.is_some())
        }
        "slow" => {
            let min_ms: Option<f64> = p.number("min_ms")?;
            let min_latency_us = match min_ms {
                Some(ms) if ms.is_finite() && (0.0..=31_536_000_000.0).contains(&ms) => {
                    (ms * 1000.0).round() as u64
                }
                Some(ms) => return Err(Failure::Bad(format!("min_ms={ms}: 0 to a year"))),
                None => 0,
            };
            let limit: u32 = p.number("limit")?.unwrap_or(100);
            if !(1..=1_000_000).contains(&limit) {
                return Err(Failure::Bad("limit: 1 to 1000000".into()));
            }
            let reply = query
                .slow(Request::new(v1::SlowRequest {
                    filter: Some(p.filter()?),
                    grep: p.get("grep").unwrap_or_default().to_string(),
                    min_latency_us,
                    limit,
                    slowest_first: p.flag("slowest"),
                }))
                .await?
                .into_inner();
            report::slow_json(&reply.events)
        }
        "series" => {
            let mut filter = p.filter()?;
            if filter.from_us == 0 {
                filter.from_us = crate::server::now_us().saturating_sub(3_600_000_000);
            }
            let step_us = match p.get("step") {
                Some(s) => parse_duration(s).map_err(Failure::Bad)?.as_micros() as u64,
                None => 0,
            };
            let reply = query
                .series(Request::new(v1::SeriesRequest {
                    filter: Some(filter),
                    by: p.by()?.unwrap_or(v1::GroupBy::None) as i32,
                    step_us,
                }))
                .await?
                .into_inner();
            report::series_json(&reply)
        }
        "top" => {
            use v1::{GroupBy, TopBy};
            let of = p.choice(
                "of",
                &[
                    ("command", GroupBy::Command),
                    ("server", GroupBy::Server),
                    ("agent", GroupBy::Agent),
                    ("port", GroupBy::Port),
                    ("slot", GroupBy::Slot),
                    ("template", GroupBy::Template),
                ],
            )?;
            let by = p.choice(
                "by",
                &[
                    ("slow", TopBy::Slow),
                    ("p99", TopBy::P99),
                    ("own-p99", TopBy::OwnP99),
                    ("total", TopBy::Total),
                    ("requests", TopBy::Requests),
                    ("redirects", TopBy::Redirects),
                    ("bytes", TopBy::Bytes),
                ],
            )?;
            let limit: u32 = p.number("limit")?.unwrap_or(10);
            if !(1..=100_000).contains(&limit) {
                return Err(Failure::Bad("limit: 1 to 100000".into()));
            }
            let reply = query
                .top(Request::new(v1::TopRequest {
                    filter: Some(p.filter()?),
                    of: of.unwrap_or(GroupBy::Command) as i32,
                    by: by.unwrap_or(TopBy::Slow) as i32,
                    limit,
                }))
                .await?
                .into_inner();
            Value::Array(
                reply
                    .rows
                    .iter()
                    .map(|r| report::histogram_json(r, true))
                    .collect(),
            )
        }
        "agents" => {
            let reply = query
                .agents(Request::new(v1::AgentsRequest {}))
                .await?
                .into_inner();
            report::agents_json(&reply.agents)
        }
        other => {
            return Err(Failure::Bad(format!(
                "no call {other}: hist, slow, series or agents"
            )))
        }
    })
}
