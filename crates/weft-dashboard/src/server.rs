//! The HTTP server: GET-only pages over the latest [`Snapshot`], `/metrics`, and `/events`
//! (server-sent events) announcing each committed step.
//!
//! A watcher thread polls the journal's ledger length and reads a new snapshot when it grows;
//! requests render from the snapshot in hand. Nothing here holds the round engine's lock or
//! writes anything: the storage is opened read-only, and a page is a pure function of it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use axum::extract::{Path as UrlPath, RawQuery, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio_stream::StreamExt;
use weft_coordinator::{unix_ms, SqliteJournal};
use weft_core::NodeId;
use weft_ledger::ContributionProof;

use crate::format::esc;
use crate::pages::{self, LedgerFilter, Links, EVENT_KINDS};
use crate::report::STYLESHEET;
use crate::snapshot::Snapshot;
use crate::{Verification, Verifier, VerifyOutcome};

const SCRIPT: &str = include_str!("assets/weft.js");
/// The shortest access token accepted: guessing one must be hopeless.
pub const MIN_TOKEN_LEN: usize = 16;
const COOKIE: &str = "weft_dashboard";

#[derive(Debug, thiserror::Error)]
pub enum DashboardError {
    #[error("dashboard address {address}: {detail}")]
    Address { address: String, detail: String },
    #[error(
        "the dashboard would listen on {0}, which is reachable from other machines: give it an access token (--token of `weft dashboard`, --dashboard-token of `coordinator serve`, or WEFT_DASHBOARD_TOKEN), or listen on 127.0.0.1"
    )]
    NeedsToken(SocketAddr),
    #[error("the dashboard's access token is {0} characters long; it needs at least {MIN_TOKEN_LEN}")]
    ShortToken(usize),
    #[error("the dashboard's access token may hold only printable ASCII without spaces, quotes, ';' or ','")]
    TokenCharacters,
    #[error("serving the dashboard: {0}")]
    Serve(std::io::Error),
}

/// What to show and who may see it.
#[derive(Clone)]
pub struct DashboardOptions {
    /// The coordinator's storage directory.
    pub dir: PathBuf,
    /// When set, every request must carry it (cookie, bearer header or `?token=`).
    pub token: Option<String>,
    /// Runs `weft ledger verify` on each new ledger length; `None`: never.
    pub verifier: Option<Verifier>,
    /// How often the storage is polled for a new step.
    pub poll: Duration,
}

/// Resolves and binds `address`. Refuses an address other machines can reach unless a token
/// is given, and a token too short or unfit for a cookie.
pub async fn bind(address: &str, token: Option<&str>) -> Result<tokio::net::TcpListener, DashboardError> {
    if let Some(token) = token {
        check_token(token)?;
    }
    let error = |detail: String| DashboardError::Address { address: address.to_string(), detail };
    let addr = tokio::net::lookup_host(address)
        .await
        .map_err(|e| error(e.to_string()))?
        .next()
        .ok_or_else(|| error("resolves to nothing".into()))?;
    if !addr.ip().is_loopback() && token.is_none() {
        return Err(DashboardError::NeedsToken(addr));
    }
    tokio::net::TcpListener::bind(addr).await.map_err(|e| error(e.to_string()))
}

fn check_token(token: &str) -> Result<(), DashboardError> {
    if token.len() < MIN_TOKEN_LEN {
        return Err(DashboardError::ShortToken(token.len()));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic() && !matches!(b, b'"' | b';' | b',' | b'\\')) {
        return Err(DashboardError::TokenCharacters);
    }
    Ok(())
}

/// What `/events` announces: the state a page should show.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Announcement {
    /// Bumped on every new snapshot or verification result.
    version: u64,
    entries: u64,
    round: u64,
    open: Option<u64>,
}

struct Shared {
    options: DashboardOptions,
    current: RwLock<Current>,
    verification: Mutex<Verification>,
    version: AtomicU64,
    announce: tokio::sync::watch::Sender<Announcement>,
}

#[derive(Default)]
struct Current {
    snapshot: Option<Arc<Snapshot>>,
    /// Why the storage could not be read at the last try.
    error: Option<String>,
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|e| e.into_inner())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn snapshot(&self) -> Result<Arc<Snapshot>, String> {
        let current = read(&self.current);
        match (&current.snapshot, &current.error) {
            (Some(s), _) => Ok(s.clone()),
            (None, Some(e)) => Err(e.clone()),
            (None, None) => Err("the coordinator's state has not been read yet; try again in a moment".into()),
        }
    }

    fn verification(&self) -> Verification {
        lock(&self.verification).clone()
    }

    /// Tells every open page that the state changed.
    fn bump(&self) {
        let version = self.version.fetch_add(1, Ordering::SeqCst) + 1;
        let current = read(&self.current);
        let announcement =
            current.snapshot.as_ref().map_or(Announcement { version, ..Default::default() }, |s| Announcement {
                version,
                entries: s.entries.len() as u64,
                round: s.head.round,
                open: s.open.as_ref().map(|o| o.round),
            });
        self.announce.send_replace(announcement);
    }
}

/// Serves the dashboard on `listener` until the process ends (or the listener fails).
pub async fn serve(listener: tokio::net::TcpListener, options: DashboardOptions) -> Result<(), DashboardError> {
    let (announce, _) = tokio::sync::watch::channel(Announcement::default());
    let shared = Arc::new(Shared {
        options,
        current: RwLock::new(Current::default()),
        verification: Mutex::new(Verification::default()),
        version: AtomicU64::new(0),
        announce,
    });
    // The first reading before the first request: a page never finds nothing read yet.
    let first = shared.clone();
    let seen = tokio::task::spawn_blocking(move || {
        let mut seen = None;
        refresh(&first, &mut seen);
        seen
    })
    .await
    .unwrap_or(None);
    let watcher = Arc::downgrade(&shared);
    std::thread::Builder::new()
        .name("weft-dashboard-watch".into())
        .spawn(move || watch_storage(watcher, seen))
        .map_err(DashboardError::Serve)?;
    axum::serve(listener, router(shared)).await.map_err(DashboardError::Serve)
}

/// Polls the storage; reads a snapshot whenever the ledger grew, and starts a verification
/// when one is due. Stops when the server is gone.
fn watch_storage(shared: Weak<Shared>, mut seen: Option<u64>) {
    loop {
        let Some(s) = shared.upgrade() else { return };
        let poll = s.options.poll;
        drop(s);
        std::thread::sleep(poll);
        let Some(s) = shared.upgrade() else { return };
        refresh(&s, &mut seen);
    }
}

/// Reads a new snapshot if the ledger's length is not `seen` (or nothing was read yet), then
/// starts a verification if one is due.
fn refresh(s: &Arc<Shared>, seen: &mut Option<u64>) {
    let dir = &s.options.dir;
    match SqliteJournal::read(dir).and_then(|j| j.ledger_len()) {
        Ok(rows) if Some(rows) != *seen => match Snapshot::read(dir) {
            Ok(snapshot) => {
                *seen = Some(snapshot.ledger_rows);
                tracing::debug!(entries = snapshot.ledger_rows, "dashboard: new state");
                *s.current.write().unwrap_or_else(|e| e.into_inner()) =
                    Current { snapshot: Some(Arc::new(snapshot)), error: None };
                s.bump();
            }
            Err(e) => note_error(s, e.to_string()),
        },
        Ok(_) => {}
        Err(e) => note_error(s, e.to_string()),
    }
    let state = read(&s.current).snapshot.as_ref().map(|snap| (snap.ledger_rows, snap.head.round, snap.open.is_some()));
    if let Some((rows, round, open)) = state {
        maybe_verify(s, rows, round, open);
    }
}

fn note_error(s: &Shared, error: String) {
    let mut current = s.current.write().unwrap_or_else(|e| e.into_inner());
    if current.error.as_deref() != Some(&error) {
        tracing::warn!("dashboard: reading the coordinator's state: {error}");
    }
    current.error = Some(error);
}

/// Starts a verification of the ledger (`rows` entries, `round` the last closed) unless one
/// runs, or this state was checked. A replay costs as much as the rounds it replays: while a
/// round is open, the ledger is verified once per closed round, not once per contribution.
fn maybe_verify(s: &Arc<Shared>, rows: u64, round: u64, open: bool) {
    let Some(verifier) = s.options.verifier.clone() else { return };
    {
        let mut v = lock(&s.verification);
        // A passed check holds for the open round's contributions; a failed one is retried at
        // the next step.
        let checked =
            v.last.as_ref().is_some_and(|l| l.ledger_rows == rows || (open && l.round == round && l.result.is_ok()));
        if v.running.is_some() || checked {
            return;
        }
        v.running = Some(rows);
    }
    s.bump();
    let weak = Arc::downgrade(s);
    let dir = s.options.dir.clone();
    let spawned = std::thread::Builder::new().name("weft-dashboard-verify".into()).spawn(move || {
        let started = Instant::now();
        let result = verifier(&dir);
        let Some(s) = weak.upgrade() else { return };
        if let Err(e) = &result {
            tracing::warn!("dashboard: ledger verification failed: {e}");
        }
        *lock(&s.verification) = Verification {
            last: Some(VerifyOutcome {
                ledger_rows: rows,
                round,
                result,
                finished_unix_ms: unix_ms(std::time::SystemTime::now()),
                seconds: started.elapsed().as_secs_f64(),
            }),
            running: None,
        };
        s.bump();
    });
    if let Err(e) = spawned {
        tracing::warn!("dashboard: cannot start a verification: {e}");
        lock(&s.verification).running = None;
    }
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/", get(overview))
        .route("/rounds", get(rounds))
        .route("/rounds/{round}", get(round))
        .route("/nodes/{node}", get(node))
        .route("/nodes/{node}/proof", get(proof))
        .route("/reputation", get(reputation))
        .route("/privacy", get(privacy))
        .route("/ledger", get(ledger))
        .route("/ledger/{seq}", get(entry))
        .route("/metrics", get(metrics))
        .route("/events", get(events))
        .route("/static/weft.css", get(|| async { asset("text/css; charset=utf-8", STYLESHEET) }))
        .route("/static/weft.js", get(|| async { asset("text/javascript; charset=utf-8", SCRIPT) }))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(shared.clone(), authorize))
        .layer(middleware::map_response(secure_headers))
        .with_state(shared)
}

/// A request refused or failed: its status and what to say.
#[derive(Debug, PartialEq)]
struct Problem {
    status: StatusCode,
    message: String,
}

impl Problem {
    fn bad(message: impl Into<String>) -> Self {
        Problem { status: StatusCode::BAD_REQUEST, message: message.into() }
    }

    fn not_found(message: impl Into<String>) -> Self {
        Problem { status: StatusCode::NOT_FOUND, message: message.into() }
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let text =
            format!("{} {}: {}\n", self.status.as_u16(), self.status.canonical_reason().unwrap_or(""), self.message);
        (self.status, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response()
    }
}

type Page = Result<Response, Problem>;

/// The query's parameters, each at most once and each one this page takes.
fn query(raw: Option<&str>, allowed: &[&str]) -> Result<BTreeMap<String, String>, Problem> {
    let mut params = BTreeMap::new();
    for pair in raw.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let key = percent_decode(key).map_err(|e| Problem::bad(format!("query parameter name: {e}")))?;
        let value = percent_decode(value).map_err(|e| Problem::bad(format!("query parameter '{key}': {e}")))?;
        if !allowed.contains(&key.as_str()) {
            let takes = if allowed.is_empty() { "no parameters".to_string() } else { allowed.join(", ") };
            return Err(Problem::bad(format!("unknown query parameter '{key}' (this page takes {takes})")));
        }
        if params.insert(key.clone(), value).is_some() {
            return Err(Problem::bad(format!("query parameter '{key}' given twice")));
        }
    }
    Ok(params)
}

fn percent_decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
                let byte =
                    hex.and_then(|h| u8::from_str_radix(h, 16).ok()).ok_or("a '%' not followed by two hex digits")?;
                out.push(byte);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| "not UTF-8 once decoded".into())
}

/// A whole number in `min..=max`, named in the error.
fn number(name: &str, value: &str, min: u64, max: u64) -> Result<u64, Problem> {
    let range = if max == u64::MAX { format!("of at least {min}") } else { format!("from {min} to {max}") };
    value
        .parse::<u64>()
        .ok()
        .filter(|n| (min..=max).contains(n))
        .ok_or_else(|| Problem::bad(format!("{name} must be a whole number {range}, not '{value}'")))
}

fn snapshot(shared: &Shared) -> Result<Arc<Snapshot>, Problem> {
    shared.snapshot().map_err(|e| Problem {
        status: StatusCode::SERVICE_UNAVAILABLE,
        message: format!("the coordinator's state cannot be read: {e}"),
    })
}

/// A page: the header, the navigation, `body` in `<main>`, and the live-update script.
fn html(shared: &Shared, s: &Snapshot, title: &str, body: &str) -> Response {
    let version = shared.version.load(Ordering::SeqCst);
    let name = esc(&s.name());
    let page = format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title} · {name} · weft</title><link rel="stylesheet" href="/static/weft.css"></head>
<body><header><a class="brand" href="/">weft</a><span class="name">{name}</span><nav><a href="/">overview</a><a href="/rounds">rounds</a><a href="/reputation">reputation</a><a href="/privacy">privacy</a><a href="/ledger">ledger</a><a href="/metrics">metrics</a></nav><span id="live" class="live">static</span></header>
<main id="main" data-version="{version}">{body}</main>
<footer>Read-only view of {dir}: committed state only; nothing here changes it.</footer>
<script src="/static/weft.js"></script></body></html>
"#,
        title = esc(title),
        dir = esc(&s.dir.display().to_string()),
    );
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], page).into_response()
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "max-age=300")], body).into_response()
}

async fn overview(State(shared): State<Arc<Shared>>, RawQuery(raw): RawQuery) -> Page {
    query(raw.as_deref(), &[])?;
    let s = snapshot(&shared)?;
    let mut body = pages::overview(&s, &shared.verification(), Links::Live);
    body.push_str(&pages::chart_section(&s));
    Ok(html(&shared, &s, "overview", &body))
}

async fn rounds(State(shared): State<Arc<Shared>>, RawQuery(raw): RawQuery) -> Page {
    query(raw.as_deref(), &[])?;
    let s = snapshot(&shared)?;
    let body = pages::chart_section(&s) + &pages::timeline(&s, Links::Live);
    Ok(html(&shared, &s, "rounds", &body))
}

async fn round(State(shared): State<Arc<Shared>>, UrlPath(round): UrlPath<String>, RawQuery(raw): RawQuery) -> Page {
    query(raw.as_deref(), &[])?;
    let round = number("the round", &round, 1, u64::MAX)?;
    let s = snapshot(&shared)?;
    let body = pages::round_page(&s, round, Links::Live).ok_or_else(|| {
        Problem::not_found(format!("round {round} has not been opened (the last closed round is {})", s.head.round))
    })?;
    Ok(html(&shared, &s, &format!("round {round}"), &body))
}

fn node_id(text: &str) -> Result<NodeId, Problem> {
    NodeId::new(text).map_err(|e| Problem::bad(format!("not a node id: {e}")))
}

async fn node(State(shared): State<Arc<Shared>>, UrlPath(node): UrlPath<String>, RawQuery(raw): RawQuery) -> Page {
    query(raw.as_deref(), &[])?;
    let node = node_id(&node)?;
    let s = snapshot(&shared)?;
    let body = pages::node_page(&s, node.as_str(), Links::Live)
        .ok_or_else(|| Problem::not_found(format!("no node {node} in the roster or the rounds")))?;
    Ok(html(&shared, &s, node.as_str(), &body))
}

/// The inclusion proof of a node's contribution to a round, as `weft ledger prove` writes it.
async fn proof(State(shared): State<Arc<Shared>>, UrlPath(node): UrlPath<String>, RawQuery(raw): RawQuery) -> Page {
    let params = query(raw.as_deref(), &["round"])?;
    let node = node_id(&node)?;
    let round = params.get("round").ok_or_else(|| Problem::bad("a proof needs ?round=N"))?;
    let round = number("round", round, 1, u64::MAX)?;
    let s = snapshot(&shared)?;
    let proof =
        ContributionProof::build(&s.entries, node.as_str(), round).map_err(|e| Problem::not_found(e.to_string()))?;
    let body = serde_json::to_string_pretty(&proof).map_err(|e| Problem {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        message: format!("writing the proof: {e}"),
    })?;
    let disposition = format!("attachment; filename=\"proof-{node}-round-{round}.json\"");
    Ok((
        [
            (header::CONTENT_TYPE, HeaderValue::from_static("application/json")),
            (
                header::CONTENT_DISPOSITION,
                HeaderValue::from_str(&disposition).unwrap_or(HeaderValue::from_static("attachment")),
            ),
        ],
        body,
    )
        .into_response())
}

async fn reputation(State(shared): State<Arc<Shared>>, RawQuery(raw): RawQuery) -> Page {
    query(raw.as_deref(), &[])?;
    let s = snapshot(&shared)?;
    Ok(html(&shared, &s, "reputation", &pages::reputation(&s, Links::Live)))
}

async fn privacy(State(shared): State<Arc<Shared>>, RawQuery(raw): RawQuery) -> Page {
    query(raw.as_deref(), &[])?;
    let s = snapshot(&shared)?;
    Ok(html(&shared, &s, "privacy budgets", &pages::privacy(&s, Links::Live)))
}

/// `?from=&limit=&kind=&round=&node=`, each checked.
fn ledger_filter(raw: Option<&str>) -> Result<LedgerFilter, Problem> {
    let params = query(raw, &["from", "limit", "kind", "round", "node"])?;
    let mut filter = LedgerFilter { limit: LedgerFilter::DEFAULT_LIMIT, ..LedgerFilter::default() };
    if let Some(from) = params.get("from") {
        filter.from = number("from", from, 0, u64::MAX)?;
    }
    if let Some(limit) = params.get("limit") {
        filter.limit = number("limit", limit, 1, LedgerFilter::MAX_LIMIT)?;
    }
    if let Some(kind) = params.get("kind") {
        if !EVENT_KINDS.contains(&kind.as_str()) {
            return Err(Problem::bad(format!(
                "kind '{kind}' is not a ledger event (one of {})",
                EVENT_KINDS.join(", ")
            )));
        }
        filter.kind = Some(kind.clone());
    }
    if let Some(round) = params.get("round") {
        filter.round = Some(number("round", round, 0, u64::MAX)?);
    }
    if let Some(node) = params.get("node") {
        filter.node = Some(node_id(node)?.to_string());
    }
    Ok(filter)
}

async fn ledger(State(shared): State<Arc<Shared>>, RawQuery(raw): RawQuery) -> Page {
    let filter = ledger_filter(raw.as_deref())?;
    let s = snapshot(&shared)?;
    Ok(html(&shared, &s, "ledger", &pages::ledger(&s, &filter)))
}

async fn entry(State(shared): State<Arc<Shared>>, UrlPath(seq): UrlPath<String>, RawQuery(raw): RawQuery) -> Page {
    query(raw.as_deref(), &[])?;
    let seq = number("the entry number", &seq, 0, u64::MAX)?;
    let s = snapshot(&shared)?;
    let body = pages::entry_page(&s, seq)
        .ok_or_else(|| Problem::not_found(format!("no entry #{seq}: the ledger has {} entries", s.entries.len())))?;
    Ok(html(&shared, &s, &format!("ledger #{seq}"), &body))
}

async fn metrics(State(shared): State<Arc<Shared>>, RawQuery(raw): RawQuery) -> Page {
    query(raw.as_deref(), &[])?;
    let s = snapshot(&shared)?;
    let text = crate::metrics::render(&s, &shared.verification());
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response())
}

async fn events(State(shared): State<Arc<Shared>>, RawQuery(raw): RawQuery) -> Page {
    query(raw.as_deref(), &[])?;
    let updates = tokio_stream::wrappers::WatchStream::new(shared.announce.subscribe()).map(|a| {
        let data = serde_json::json!({ "version": a.version, "entries": a.entries, "round": a.round, "open": a.open });
        Ok::<_, std::convert::Infallible>(SseEvent::default().event("state").data(data.to_string()))
    });
    Ok(Sse::new(updates).keep_alive(KeepAlive::default()).into_response())
}

async fn not_found(request: Request) -> Problem {
    Problem::not_found(format!("no page at {} (try /, /rounds, /ledger, /metrics)", request.uri().path()))
}

/// Equal in constant time for tokens of equal length (an attacker learns only the length).
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// With a token: a request passes with the token's cookie or bearer header; `?token=` sets the
/// cookie and redirects to the same page without it (so it stays out of history and logs).
async fn authorize(State(shared): State<Arc<Shared>>, request: Request, next: Next) -> Response {
    let Some(token) = shared.options.token.as_deref() else { return next.run(request).await };
    let headers: &HeaderMap = request.headers();
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| same(t.trim(), token));
    let cookie = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .any(|(k, v)| k == COOKIE && same(v, token));
    if bearer || cookie {
        return next.run(request).await;
    }
    let uri = request.uri();
    let mut rest = Vec::new();
    let mut given = None;
    for pair in uri.query().unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("token", value)) => given = percent_decode(value).ok(),
            _ => rest.push(pair),
        }
    }
    if given.as_deref().is_some_and(|t| same(t, token)) {
        let location =
            if rest.is_empty() { uri.path().to_string() } else { format!("{}?{}", uri.path(), rest.join("&")) };
        let cookie = format!("{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict");
        return (
            StatusCode::SEE_OTHER,
            [
                (header::LOCATION, HeaderValue::from_str(&location).unwrap_or(HeaderValue::from_static("/"))),
                (header::SET_COOKIE, HeaderValue::from_str(&cookie).unwrap_or(HeaderValue::from_static(""))),
            ],
        )
            .into_response();
    }
    Problem {
        status: StatusCode::UNAUTHORIZED,
        message: "this dashboard needs its access token: open it once as /?token=… (a cookie keeps it), or send Authorization: Bearer …".into(),
    }
    .into_response()
}

/// Every response: no caching of state, no sniffing, no framing, scripts only from here.
async fn secure_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        ),
    );
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.entry(header::CACHE_CONTROL).or_insert(HeaderValue::from_static("no-store"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_take_only_the_page_s_parameters_once() {
        let q = query(Some("from=3&limit=10"), &["from", "limit"]).unwrap();
        assert_eq!(q.get("from").map(String::as_str), Some("3"));
        assert_eq!(query(Some("x=1"), &["from"]).unwrap_err().status, StatusCode::BAD_REQUEST);
        assert_eq!(query(Some("from=1&from=2"), &["from"]).unwrap_err().status, StatusCode::BAD_REQUEST);
        assert!(query(Some("from=%zz"), &["from"]).is_err());
        assert!(query(None, &[]).unwrap().is_empty());
    }

    #[test]
    fn ledger_filters_are_checked_by_name() {
        let f = ledger_filter(Some("kind=decision&round=2&node=node-de&limit=5")).unwrap();
        assert_eq!(
            (f.kind.as_deref(), f.round, f.node.as_deref(), f.limit),
            (Some("decision"), Some(2), Some("node-de"), 5)
        );
        for (bad, says) in [
            ("limit=0", "limit must be"),
            ("limit=99999", "limit must be"),
            ("from=-1", "from must be"),
            ("kind=nonsense", "is not a ledger event"),
            ("node=%3Cscript%3E", "not a node id"),
            ("round=two", "round must be"),
        ] {
            let problem = ledger_filter(Some(bad)).unwrap_err();
            assert_eq!(problem.status, StatusCode::BAD_REQUEST, "{bad}");
            assert!(problem.message.contains(says), "{bad}: {}", problem.message);
        }
    }

    #[test]
    fn percent_decoding_handles_plus_and_escapes() {
        assert_eq!(percent_decode("a+b%2Fc").unwrap(), "a b/c");
        assert!(percent_decode("%4").is_err());
        assert!(percent_decode("%ff").is_err());
    }

    #[test]
    fn tokens_must_be_long_and_cookie_safe() {
        assert!(matches!(check_token("short"), Err(DashboardError::ShortToken(5))));
        assert!(matches!(check_token("0123456789abcdef;x"), Err(DashboardError::TokenCharacters)));
        assert!(check_token("0123456789abcdef").is_ok());
        assert!(same("abc", "abc") && !same("abc", "abd") && !same("abc", "abcd"));
    }

    #[tokio::test]
    async fn a_reachable_address_needs_a_token() {
        let refused = bind("0.0.0.0:0", None).await.unwrap_err();
        assert!(matches!(refused, DashboardError::NeedsToken(_)), "{refused}");
        assert!(bind("127.0.0.1:0", None).await.is_ok());
        assert!(bind("0.0.0.0:0", Some("0123456789abcdef")).await.is_ok());
        assert!(matches!(bind("nowhere.invalid:1", None).await, Err(DashboardError::Address { .. })));
    }
}
