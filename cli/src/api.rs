//! The dashboard's HTTP API: one table of routes (`ROUTES`) that the
//! server matches requests against and that the OpenAPI document
//! (`/api/openapi.json`) and `docs/api.md` are generated from, so what is
//! served and what is documented cannot drift apart. Every call that acts
//! goes through the daemon's own dispatch, as the CLI's do; the secret and
//! the cross-site header are checked by `gui.rs` before a route is looked
//! up.

use std::convert::Infallible;
use std::path::PathBuf;
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::body::{Bytes, Frame};
use hyper::{Method, Response, StatusCode};
use serde_json::{Value, json};

use super::Daemon;
use crate::protocol::{Call, ReloadTarget, VERSION};

pub type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// What a route does.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Op {
    Page,
    OpenApi,
    Metrics,
    Traffic,
    List,
    Info,
    Start,
    Stop,
    Restart,
    Remove,
    Signal,
    Reload,
    ReloadAll,
    Logs,
    LiveLogs,
    Io,
}

/// What a route answers with (its 200's media type).
#[derive(Clone, Copy, PartialEq)]
enum Answer {
    Html,
    Json,
    Text,
    Events,
}

impl Answer {
    fn media_type(self) -> &'static str {
        match self {
            Answer::Html => "text/html",
            Answer::Json => "application/json",
            Answer::Text => "text/plain",
            Answer::Events => "text/event-stream",
        }
    }
}

/// A query parameter (every path parameter is the worker's name).
struct Param {
    name: &'static str,
    /// Its JSON Schema type: `string`, `integer` or `boolean`.
    kind: &'static str,
    description: &'static str,
    /// For a string, the values it may take (any, when empty).
    values: &'static [&'static str],
}

pub struct Route {
    method: Method,
    /// The path, with `{name}` for a worker's name.
    path: &'static str,
    pub op: Op,
    summary: &'static str,
    description: &'static str,
    params: &'static [Param],
    answer: Answer,
}

impl Route {
    /// Whether it changes something, and so needs the `X-Apm-Gui` header.
    pub fn changes(&self) -> bool {
        self.method != Method::GET
    }
}

const FORCE: Param = Param {
    name: "force",
    kind: "boolean",
    description: "Every instance at once, whatever `rolling` says (restart); the plan's restarts even of unchanged workers (reload).",
    values: &[],
};
const DRY_RUN: Param = Param {
    name: "dry_run",
    kind: "boolean",
    description: "Only say what a reload would do.",
    values: &[],
};
const LINES: Param = Param {
    name: "lines",
    kind: "integer",
    description: "How many of the last lines (default 200, at most 10000).",
    values: &[],
};
const STREAM: Param = Param {
    name: "stream",
    kind: "string",
    description: "`out` (default) or `err`.",
    values: &["out", "err"],
};

const INSTANCE: Param = Param {
    name: "instance",
    kind: "integer",
    description: "Only this instance (its index); every instance without it.",
    values: &[],
};

/// Every route the dashboard answers.
pub static ROUTES: &[Route] = &[
    Route {
        method: Method::GET,
        path: "/",
        op: Op::Page,
        summary: "The dashboard",
        description: "The dashboard's page: instances, traffic, Vanguard, logs.",
        params: &[],
        answer: Answer::Html,
    },
    Route {
        method: Method::GET,
        path: "/api/openapi.json",
        op: Op::OpenApi,
        summary: "This document",
        description: "The OpenAPI 3.1 document of this API.",
        params: &[],
        answer: Answer::Json,
    },
    Route {
        method: Method::GET,
        path: "/metrics",
        op: Op::Metrics,
        summary: "Prometheus metrics",
        description: "Instances, listeners, Vanguard and the daemon in Prometheus' text format (0.0.4).",
        params: &[],
        answer: Answer::Text,
    },
    Route {
        method: Method::GET,
        path: "/api/traffic",
        op: Op::Traffic,
        summary: "Listeners' traffic",
        description: "Each listener's figures: answers by status class, the duration histogram and its p99, connections, bytes.",
        params: &[],
        answer: Answer::Json,
    },
    Route {
        method: Method::GET,
        path: "/api/workers",
        op: Op::List,
        summary: "List workers",
        description: "Every worker and its instances, and the daemon: what `apm list --json` prints.",
        params: &[],
        answer: Answer::Json,
    },
    Route {
        method: Method::GET,
        path: "/api/workers/{name}",
        op: Op::Info,
        summary: "A worker's details",
        description: "Its status, its effective config (as IR and as text): what `apm info --json` prints.",
        params: &[],
        answer: Answer::Json,
    },
    Route {
        method: Method::DELETE,
        path: "/api/workers/{name}",
        op: Op::Remove,
        summary: "Remove a worker",
        description: "Stops it and forgets it (`apm remove`).",
        params: &[],
        answer: Answer::Json,
    },
    Route {
        method: Method::POST,
        path: "/api/workers/{name}/start",
        op: Op::Start,
        summary: "Start a worker",
        description: "`apm start`, or `apm start NAME#I` with `instance`.",
        params: &[INSTANCE],
        answer: Answer::Json,
    },
    Route {
        method: Method::POST,
        path: "/api/workers/{name}/stop",
        op: Op::Stop,
        summary: "Stop a worker",
        description: "`apm stop`, or `apm stop NAME#I` with `instance`: the other instances keep serving.",
        params: &[INSTANCE],
        answer: Answer::Json,
    },
    Route {
        method: Method::POST,
        path: "/api/workers/{name}/restart",
        op: Op::Restart,
        summary: "Restart a worker",
        description: "`apm restart`, or `apm restart NAME#I` with `instance`.",
        params: &[FORCE, INSTANCE],
        answer: Answer::Json,
    },
    Route {
        method: Method::POST,
        path: "/api/workers/{name}/signal",
        op: Op::Signal,
        summary: "Signal a worker's processes",
        description: "`apm signal`: to every instance, or to one.",
        params: &[
            Param {
                name: "signal",
                kind: "string",
                description: "The signal, by name (`SIGUSR2`). Required.",
                values: &[],
            },
            INSTANCE,
        ],
        answer: Answer::Json,
    },
    Route {
        method: Method::POST,
        path: "/api/workers/{name}/reload",
        op: Op::Reload,
        summary: "Reload a worker's file",
        description: "`apm reload NAME`: the file the worker came from, compiled again, the plan applied to this worker.",
        params: &[FORCE, DRY_RUN],
        answer: Answer::Json,
    },
    Route {
        method: Method::POST,
        path: "/api/reload",
        op: Op::ReloadAll,
        summary: "Reload every loaded file",
        description: "`apm reload`: each file a worker came from, compiled again and its plan applied.",
        params: &[FORCE, DRY_RUN],
        answer: Answer::Json,
    },
    Route {
        method: Method::GET,
        path: "/api/workers/{name}/io",
        op: Op::Io,
        summary: "A worker's storage I/O",
        description: "Per running instance, the bytes its process has read from and written to storage (`read_bytes`, `write_bytes` of /proc/PID/io): what the dashboard's `ior` and `iow` panels show.",
        params: &[],
        answer: Answer::Json,
    },
    Route {
        method: Method::GET,
        path: "/api/workers/{name}/logs",
        op: Op::Logs,
        summary: "A worker's last log lines",
        description: "A JSON array of lines, oldest first (`apm log --lines N`).",
        params: &[LINES, STREAM],
        answer: Answer::Json,
    },
    Route {
        method: Method::GET,
        path: "/api/workers/{name}/logs/live",
        op: Op::LiveLogs,
        summary: "A worker's log, live",
        description: "Server-Sent Events: the last `lines` lines (default 0), then each line as it is written, one event each (`data:` the line); a comment every 15 s while quiet. Followed through rotations (`apm log --follow`).",
        params: &[LINES, STREAM],
        answer: Answer::Events,
    },
];

/// The most log lines one request may ask for.
const MAX_LINES: usize = 10_000;

/// Why a request matched no route.
#[derive(Debug, PartialEq)]
pub enum Unmatched {
    NotFound,
    /// The path is a route's, the method is not: the methods it takes.
    Method(Vec<Method>),
}

/// The route a request is for, and the worker's name its path carries.
pub fn route(method: &Method, path: &str) -> Result<(&'static Route, Option<String>), Unmatched> {
    let mut allowed = Vec::new();
    for route in ROUTES {
        let Some(name) = matches(route.path, path) else {
            continue;
        };
        if route.method == *method {
            return Ok((route, name));
        }
        allowed.push(route.method.clone());
    }
    if allowed.is_empty() {
        Err(Unmatched::NotFound)
    } else {
        Err(Unmatched::Method(allowed))
    }
}

/// Whether `path` is of the template, with the name it carries, if any.
fn matches(template: &str, path: &str) -> Option<Option<String>> {
    let (mut template, mut path) = (template.split('/'), path.split('/'));
    let mut name = None;
    loop {
        match (template.next(), path.next()) {
            (None, None) => return Some(name),
            (Some("{name}"), Some(segment)) if !segment.is_empty() => {
                name = Some(percent_decoded(segment)?);
            }
            (Some(a), Some(b)) if a == b => {}
            _ => return None,
        }
    }
}

/// `%XX` escapes decoded (and `+` kept); none for a broken escape or a
/// result that is not UTF-8.
fn percent_decoded(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// A request's query, checked against its route's parameters.
struct Query(Vec<(String, String)>);

impl Query {
    /// The fields of `query`; an error names one the route does not take
    /// (`token`, the secret, goes with any).
    fn parse(route: &Route, query: &str) -> Result<Query, String> {
        let mut fields = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = percent_decoded(&value.replace('+', " "))
                .ok_or_else(|| format!("`{key}` is not percent-encoded UTF-8"))?;
            if key == "token" {
                continue;
            }
            let Some(param) = route.params.iter().find(|p| p.name == key) else {
                let takes: Vec<&str> = route.params.iter().map(|p| p.name).collect();
                return Err(if takes.is_empty() {
                    format!("unknown parameter `{key}`: {} takes none", route.path)
                } else {
                    format!(
                        "unknown parameter `{key}`: {} takes {}",
                        route.path,
                        takes.join(", ")
                    )
                });
            };
            if !param.values.is_empty() && !param.values.contains(&value.as_str()) {
                return Err(format!(
                    "`{key}` is one of {}, not `{value}`",
                    param.values.join(", ")
                ));
            }
            fields.push((key.to_owned(), value));
        }
        Ok(Query(fields))
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn flag(&self, key: &str) -> Result<bool, String> {
        match self.get(key) {
            None | Some("0" | "false") => Ok(false),
            Some("" | "1" | "true") => Ok(true),
            Some(other) => Err(format!("`{key}` is true or false, not `{other}`")),
        }
    }

    fn number(&self, key: &str) -> Result<Option<usize>, String> {
        self.get(key)
            .map(|v| {
                v.parse()
                    .map_err(|_| format!("`{key}` is a whole number, not `{v}`"))
            })
            .transpose()
    }

    fn lines(&self, default: usize) -> Result<usize, String> {
        Ok(self.number("lines")?.unwrap_or(default).min(MAX_LINES))
    }

    fn err_stream(&self) -> bool {
        self.get("stream") == Some("err")
    }
}

pub fn reply(status: StatusCode, kind: &str, body: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(http_body_util::Full::new(body.into()).boxed());
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_str(kind).expect("a content type"),
    );
    // The page's address carries the token: it must not leave in a Referer.
    headers.insert(
        hyper::header::REFERRER_POLICY,
        hyper::header::HeaderValue::from_static("no-referrer"),
    );
    response
}

pub fn json(value: &impl serde::Serialize) -> Response<Body> {
    reply(
        StatusCode::OK,
        "application/json",
        serde_json::to_vec(value).unwrap_or_default(),
    )
}

pub fn refused(status: StatusCode, why: &str) -> Response<Body> {
    reply(status, "text/plain; charset=utf-8", format!("{why}\n"))
}

/// Answers a request for `route` (the secret and the cross-site header
/// already checked).
pub async fn answer(
    daemon: &Daemon,
    route: &Route,
    name: Option<String>,
    query: &str,
) -> Response<Body> {
    let query = match Query::parse(route, query) {
        Ok(query) => query,
        Err(why) => return refused(StatusCode::BAD_REQUEST, &why),
    };
    match perform(daemon, route, name.unwrap_or_default(), &query).await {
        Ok(response) | Err(response) => response,
    }
}

async fn perform(
    daemon: &Daemon,
    route: &Route,
    name: String,
    query: &Query,
) -> Result<Response<Body>, Response<Body>> {
    let bad = |why: String| refused(StatusCode::BAD_REQUEST, &why);
    let call = match route.op {
        Op::Page => {
            return Ok(reply(
                StatusCode::OK,
                "text/html; charset=utf-8",
                super::gui::PAGE,
            ));
        }
        Op::OpenApi => return Ok(json(&document())),
        Op::Metrics => return Ok(metrics(daemon).await),
        Op::Traffic => return Ok(json(&traffic())),
        Op::List => {
            let response = super::dispatch(daemon, Call::List).await;
            return Ok(json(&response.data));
        }
        Op::Info => {
            let response = super::dispatch(daemon, Call::Info { name }).await;
            if !response.ok {
                return Err(refused(
                    StatusCode::NOT_FOUND,
                    &response.error.unwrap_or_default(),
                ));
            }
            return Ok(json(&response.data));
        }
        Op::Logs => {
            let lines = query.lines(200).map_err(bad)?;
            let (path, only) = log_source(daemon, name, query.err_stream()).await?;
            let lines = tokio::task::spawn_blocking(move || {
                crate::commands::Followed::open(path, only, lines).1
            })
            .await
            .unwrap_or_default();
            return Ok(json(&lines));
        }
        Op::Io => {
            let response = super::dispatch(daemon, Call::Info { name }).await;
            if !response.ok {
                return Err(refused(
                    StatusCode::NOT_FOUND,
                    &response.error.unwrap_or_default(),
                ));
            }
            let pids: Vec<(u64, u64)> = response.data["status"]["instances"]
                .as_array()
                .map_or(&[][..], Vec::as_slice)
                .iter()
                .filter_map(|i| Some((i["index"].as_u64()?, i["pid"].as_u64()?)))
                .collect();
            let io = tokio::task::spawn_blocking(move || {
                pids.into_iter()
                    .filter_map(|(index, pid)| {
                        let (read, written) = apm_runtime::process::procfs::io(pid as u32)?;
                        Some(json!({"index": index, "pid": pid, "read_bytes": read, "write_bytes": written}))
                    })
                    .collect::<Vec<Value>>()
            })
            .await
            .unwrap_or_default();
            return Ok(json(&io));
        }
        Op::LiveLogs => {
            let lines = query.lines(0).map_err(bad)?;
            let (path, only) = log_source(daemon, name, query.err_stream()).await?;
            return Ok(live(path, only, lines));
        }
        Op::Start => Call::Start {
            name,
            index: query.number("instance").map_err(bad)?,
        },
        Op::Stop => Call::Stop {
            name,
            index: query.number("instance").map_err(bad)?,
        },
        Op::Restart => Call::Restart {
            name,
            index: query.number("instance").map_err(bad)?,
            force: query.flag("force").map_err(bad)?,
        },
        Op::Remove => Call::Remove { name },
        Op::Signal => Call::Signal {
            name,
            index: query.number("instance").map_err(bad)?,
            signal: query
                .get("signal")
                .ok_or_else(|| bad("name the signal: ?signal=SIGUSR2".to_owned()))?
                .to_owned(),
        },
        Op::Reload | Op::ReloadAll => Call::Reload {
            // A name only, never a path: the API reloads what is loaded.
            target: match route.op {
                Op::Reload => ReloadTarget::Named {
                    name,
                    path: PathBuf::new(),
                },
                _ => ReloadTarget::All,
            },
            force: query.flag("force").map_err(bad)?,
            dry_run: query.flag("dry_run").map_err(bad)?,
        },
    };
    let response = super::dispatch(daemon, call).await;
    let status = if response.ok {
        StatusCode::OK
    } else {
        StatusCode::UNPROCESSABLE_ENTITY
    };
    let mut answer = json(&response);
    *answer.status_mut() = status;
    Ok(answer)
}

/// Which file holds the stream of a worker's log, and the marker of its lines.
async fn log_source(
    daemon: &Daemon,
    name: String,
    err: bool,
) -> Result<(PathBuf, Option<&'static str>), Response<Body>> {
    let response = super::dispatch(daemon, Call::Info { name }).await;
    if !response.ok {
        return Err(refused(
            StatusCode::NOT_FOUND,
            &response.error.unwrap_or_default(),
        ));
    }
    let status = serde_json::from_value::<apm_runtime::process::supervisor::WorkerStatus>(
        response.data["status"].clone(),
    )
    .map_err(|_| {
        refused(
            StatusCode::INTERNAL_SERVER_ERROR,
            "unreadable worker status",
        )
    })?;
    Ok(crate::commands::log_source(&status, err))
}

/// `GET /metrics`: a Prometheus scrape.
async fn metrics(daemon: &Daemon) -> Response<Body> {
    let listing = super::dispatch(daemon, Call::List).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    let text = super::metrics::render(
        &listing.data,
        &apm_runtime::observe::traffic_stats::snapshot(),
        super::metrics::Own::now().as_ref(),
        now,
    );
    reply(
        StatusCode::OK,
        "text/plain; version=0.0.4; charset=utf-8",
        text,
    )
}

/// `GET /api/traffic`: each listener's figures, with the p99 the page shows.
fn traffic() -> Value {
    let listeners: Vec<Value> = apm_runtime::observe::traffic_stats::snapshot()
        .into_iter()
        .map(|s| {
            let p99 = s.quantile(0.99).filter(|q| q.is_finite());
            let mut value = serde_json::to_value(&s).unwrap_or_default();
            value["p99_seconds"] = json!(p99);
            value["answers"] = json!(s.answers());
            value
        })
        .collect();
    json!({
        "buckets": apm_runtime::observe::traffic_stats::BUCKETS,
        "listeners": listeners,
    })
}

/// Live log streams open at once; past it, new ones are refused (each
/// holds a task, a file and up to `LIVE_BATCH` bytes).
const LIVE_STREAMS: usize = 64;
static LIVE: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(LIVE_STREAMS);
/// How often a live log looks for new lines.
const LIVE_EVERY: Duration = Duration::from_millis(250);
/// The most one look passes on; the rest of a burst is skipped, and said so.
const LIVE_BATCH: usize = 256 * 1024;
/// A comment sent after this long without a line, so a client that left
/// is noticed and proxies in between keep the stream.
const LIVE_PING: Duration = Duration::from_secs(15);

/// A Server-Sent Events stream of the lines of a log as they are written.
fn live(path: PathBuf, only: Option<&'static str>, lines: usize) -> Response<Body> {
    let Ok(permit) = LIVE.try_acquire() else {
        return refused(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("{LIVE_STREAMS} live logs are open already: close one"),
        );
    };
    let (sender, receiver) = tokio::sync::mpsc::channel::<Bytes>(4);
    tokio::spawn(async move {
        let _permit = permit;
        let opened = tokio::task::spawn_blocking(move || {
            let (followed, last) = crate::commands::Followed::open(path, only, lines);
            let mut batch = Batch::default();
            last.iter().for_each(|line| batch.push(line));
            (followed, batch.done())
        })
        .await;
        let Ok((mut followed, first)) = opened else {
            return;
        };
        // The first bytes go out at once, so the client knows it is connected.
        let first = if first.is_empty() {
            Bytes::from_static(b": apm\n\n")
        } else {
            first
        };
        if sender.send(first).await.is_err() {
            return;
        }
        let mut quiet = Duration::ZERO;
        loop {
            tokio::time::sleep(LIVE_EVERY).await;
            let looked = tokio::task::spawn_blocking(move || {
                let mut batch = Batch::default();
                followed.read_new(|line| batch.push(line));
                (followed, batch.done())
            })
            .await;
            let Ok((again, events)) = looked else {
                return;
            };
            followed = again;
            quiet = if events.is_empty() {
                quiet + LIVE_EVERY
            } else {
                Duration::ZERO
            };
            let events = if quiet >= LIVE_PING {
                quiet = Duration::ZERO;
                Bytes::from_static(b": ping\n\n")
            } else {
                events
            };
            if !events.is_empty() && sender.send(events).await.is_err() {
                return;
            }
            if sender.is_closed() {
                return;
            }
        }
    });
    let mut response = Response::new(Events(receiver).boxed());
    let headers = response.headers_mut();
    for (name, value) in [
        (hyper::header::CONTENT_TYPE, "text/event-stream"),
        (hyper::header::CACHE_CONTROL, "no-store"),
        (hyper::header::REFERRER_POLICY, "no-referrer"),
    ] {
        headers.insert(name, hyper::header::HeaderValue::from_static(value));
    }
    response
}

/// Lines made events, up to `LIVE_BATCH` bytes.
#[derive(Default)]
struct Batch {
    text: String,
    skipped: usize,
}

impl Batch {
    fn push(&mut self, line: &str) {
        if self.text.len() + line.len() > LIVE_BATCH {
            self.skipped += 1;
            return;
        }
        self.event(line);
    }

    /// One event of one `data:` line: a carriage return would start another.
    fn event(&mut self, line: &str) {
        self.text.push_str("data: ");
        self.text.extend(line.chars().filter(|c| *c != '\r'));
        self.text.push_str("\n\n");
    }

    fn done(mut self) -> Bytes {
        if self.skipped > 0 {
            let note = format!(
                "[apm: {} lines skipped: too many at once to show live]",
                self.skipped
            );
            self.event(&note);
        }
        Bytes::from(self.text)
    }
}

/// A body of the events a task sends, until it stops.
struct Events(tokio::sync::mpsc::Receiver<Bytes>);

impl hyper::body::Body for Events {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.get_mut()
            .0
            .poll_recv(cx)
            .map(|event| event.map(|bytes| Ok(Frame::data(bytes))))
    }
}

/// The OpenAPI 3.1 document of `ROUTES`.
pub fn document() -> Value {
    let mut paths = serde_json::Map::new();
    for route in ROUTES {
        let mut parameters: Vec<Value> = Vec::new();
        if route.path.contains("{name}") {
            parameters.push(json!({
                "name": "name", "in": "path", "required": true,
                "description": "The worker's name.", "schema": {"type": "string"},
            }));
        }
        for param in route.params {
            let mut schema = json!({"type": param.kind});
            if !param.values.is_empty() {
                schema["enum"] = json!(param.values);
            }
            parameters.push(json!({
                "name": param.name, "in": "query", "required": false,
                "description": param.description, "schema": schema,
            }));
        }
        if route.changes() {
            parameters.push(json!({"$ref": "#/components/parameters/change"}));
        }
        let schema = match route.answer {
            Answer::Json if route.changes() => json!({"$ref": "#/components/schemas/outcome"}),
            Answer::Json => json!({}),
            _ => json!({"type": "string"}),
        };
        let mut responses = json!({
            "200": {
                "description": route.summary,
                "content": {route.answer.media_type(): {"schema": schema}},
            },
            "400": {"$ref": "#/components/responses/refused"},
            "401": {"$ref": "#/components/responses/refused"},
            "403": {"$ref": "#/components/responses/refused"},
            "429": {"$ref": "#/components/responses/refused"},
        });
        if route.path.contains("{name}") {
            responses["404"] = json!({"$ref": "#/components/responses/refused"});
        }
        if route.changes() {
            responses["422"] = json!({
                "description": "The daemon refused or failed the call: `error` says why.",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/outcome"}}},
            });
        }
        if route.answer == Answer::Events {
            responses["503"] = json!({"$ref": "#/components/responses/refused"});
        }
        let operation = json!({
            "operationId": format!("{:?}", route.op).to_lowercase(),
            "summary": route.summary,
            "description": route.description,
            "parameters": parameters,
            "responses": responses,
        });
        paths
            .entry(route.path)
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .expect("an object")
            .insert(route.method.as_str().to_lowercase(), operation);
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "apm dashboard API",
            "version": VERSION,
            "description": "The API of apm's dashboard (`daemon { gui_port; }`), on its address. \
                Every request carries the secret: the password (`gui_password`) as HTTP Basic with any \
                user name, or without one the token of `$APM_HOME/gui.token` in `X-Apm-Token` (or \
                `?token=`). A request that changes something also carries `X-Apm-Gui`, which a page \
                of another site cannot send. Without a password, the `Host` must be an address or \
                `localhost`. Five wrong secrets in a row lock a client out for a while (429).",
        },
        "security": [{"password": []}, {"token": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "password": {"type": "http", "scheme": "basic",
                    "description": "`gui_password`, with any user name."},
                "token": {"type": "apiKey", "in": "header", "name": "X-Apm-Token",
                    "description": "The token of `$APM_HOME/gui.token` (a dashboard without a password)."},
            },
            "parameters": {
                "change": {"name": "X-Apm-Gui", "in": "header", "required": true,
                    "description": "Any value: a page of another site cannot send it, so a browser that is logged in cannot be made to act for it.",
                    "schema": {"type": "string"}},
            },
            "schemas": {
                "outcome": {
                    "type": "object",
                    "required": ["ok"],
                    "properties": {
                        "ok": {"type": "boolean"},
                        "error": {"type": ["string", "null"], "description": "Why it failed, for people."},
                        "exit": {"type": ["integer", "null"], "description": "The exit code the CLI would end with."},
                        "data": {"description": "What the call answered, as the CLI's `--json` shows it."},
                        "notices": {"type": "array", "items": {"type": "string"}},
                    },
                },
            },
            "responses": {
                "refused": {
                    "description": "Refused: a bad parameter (400), no secret (401), a cross-site or \
                        misaddressed request (403), no such worker (404), too many failures (429), \
                        too many live logs (503). The body says why.",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                },
            },
        },
    })
}

/// `docs/api.md`: the document for people.
#[cfg(test)]
fn markdown(document: &Value) -> String {
    let mut out = String::new();
    out.push_str("# The dashboard's HTTP API\n\n");
    out.push_str("<!-- Generated from cli/src/api.rs (ROUTES): `BLESS=1 cargo test -p apm-cli api` rewrites it. -->\n\n");
    out.push_str(document["info"]["description"].as_str().unwrap_or_default());
    out.push_str(
        "\n\nThe OpenAPI 3.1 document is served at `/api/openapi.json`.\n\n\
         | Method | Path | What it does |\n|---|---|---|\n",
    );
    for route in ROUTES {
        out.push_str(&format!(
            "| `{}` | `{}` | {} |\n",
            route.method, route.path, route.summary
        ));
    }
    for route in ROUTES {
        out.push_str(&format!(
            "\n## `{} {}`\n\n{}\n\nAnswers `{}`.{}\n",
            route.method,
            route.path,
            route.description,
            route.answer.media_type(),
            if route.changes() {
                " Needs the `X-Apm-Gui` header."
            } else {
                ""
            }
        ));
        if !route.params.is_empty() {
            out.push_str("\n| Parameter | Type | Meaning |\n|---|---|---|\n");
            for param in route.params {
                out.push_str(&format!(
                    "| `{}` | {} | {} |\n",
                    param.name, param.kind, param.description
                ));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docs_api_md_matches_the_routes() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/api.md");
        let generated = markdown(&document());
        if std::env::var_os("BLESS").is_some() {
            std::fs::write(&path, &generated).unwrap();
        }
        let current = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            current == generated,
            "docs/api.md is stale: run `BLESS=1 cargo test -p apm-cli api`"
        );
    }

    #[test]
    fn every_route_is_documented_and_found_by_its_own_path() {
        let document = document();
        for each in ROUTES {
            let path = each.path.replace("{name}", "web%2D1");
            let (found, name) = route(&each.method, &path).unwrap();
            assert_eq!(found.op, each.op, "{path}");
            assert_eq!(name.is_some(), each.path.contains("{name}"));
            assert!(name.is_none_or(|n| n == "web-1"));
            let method = each.method.as_str().to_lowercase();
            assert!(document["paths"][each.path][&method].is_object(), "{path}");
        }
    }

    #[test]
    fn unknown_paths_methods_and_parameters_are_refused() {
        assert_eq!(
            route(&Method::GET, "/api/nothing").err(),
            Some(Unmatched::NotFound)
        );
        assert_eq!(
            route(&Method::GET, "/api/workers//logs").err(),
            Some(Unmatched::NotFound)
        );
        assert_eq!(
            route(&Method::GET, "/api/workers/a/b/c").err(),
            Some(Unmatched::NotFound)
        );
        assert_eq!(
            route(&Method::GET, "/api/workers/%ff").err(),
            Some(Unmatched::NotFound)
        );
        assert_eq!(
            route(&Method::GET, "/api/workers/web/start").err(),
            Some(Unmatched::Method(vec![Method::POST]))
        );
        let (logs, _) = route(&Method::GET, "/api/workers/web/logs").unwrap();
        assert!(Query::parse(logs, "lines=5&stream=err&token=x").is_ok());
        assert!(Query::parse(logs, "stream=both").is_err());
        assert!(Query::parse(logs, "path=/etc/passwd").is_err());
        let query = Query::parse(logs, "lines=99999").unwrap();
        assert_eq!(query.lines(200), Ok(MAX_LINES));
    }

    #[test]
    fn a_burst_too_large_to_show_live_is_cut_and_said_so() {
        let mut batch = Batch::default();
        batch.push("a\rb");
        let line = "x".repeat(1000);
        for _ in 0..1000 {
            batch.push(&line);
        }
        let text = String::from_utf8(batch.done().to_vec()).unwrap();
        assert!(text.starts_with("data: ab\n\n"));
        assert!(text.len() <= LIVE_BATCH + 200);
        assert!(
            text.ends_with("lines skipped: too many at once to show live]\n\n"),
            "{}",
            &text[text.len() - 100..]
        );
    }
}
