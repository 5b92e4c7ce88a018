//! OpenAI-compatible stub servers (`POST /v1/chat/completions`, `GET /v1/models`) that tests
//! and the balancer benchmark start on loopback addresses. A stub answers like a real server:
//! a chat completion with token usage, after a configurable latency; scripted replies (429 with
//! `Retry-After`, 500...) come first; it counts what it sees (requests, answers, the most
//! calls in flight at once, the Authorization header, the messages).
//!
//! Agents of the `replicas` form reach pods at `podIP:port`, one port for every pod, so a
//! group of stubs shares one port on distinct addresses (`127.B.x.y`, B from the process id so
//! concurrent test processes do not collide). Linux routes all of 127.0.0.0/8 to loopback.
//!
//! [`Stub::kill`] makes the stub die like a crashed replica: it stops accepting, and every
//! open connection, in flight or idle, fails at once.
//!
//! Misbehaving servers, as [`Reply`]s: one that accepts and never answers ([`Reply::Hang`]), a
//! 200 whose body is not JSON ([`Reply::Malformed`]) or JSON of another API
//! ([`Reply::WrongShape`]), a 200 of megabytes ([`Reply::Huge`]), and a valid answer sent a few
//! bytes at a time ([`Reply::Drip`]). [`Stub::body_bytes_sent`] counts the body bytes of
//! streamed replies that went to the socket.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// What a stub answers to one request.
#[derive(Clone, Debug, PartialEq)]
pub enum Reply {
    /// A chat completion.
    Ok,
    /// An error status with an OpenAI error body.
    Status(u16),
    /// 429 with `Retry-After` (whole seconds, rounded up).
    RateLimited { retry_after: Duration },
    /// Reads the request and never answers (until the stub is killed or dropped).
    Hang,
    /// 200 with a JSON content type and a body cut short: not valid JSON.
    Malformed,
    /// 200 with valid JSON that is not a chat completion (Ollama's native `/api/chat` answer).
    WrongShape,
    /// 200 with a chat completion whose content is `bytes` long, streamed in 64 KiB chunks
    /// without a `Content-Length` (so only reading tells its size).
    Huge { bytes: usize },
    /// 200 with headers at once, then a valid chat completion 8 bytes at a time, spread evenly
    /// over `total`: every read gets data well within a second, the whole takes `total`.
    Drip { total: Duration },
    /// A chat completion whose content is this text (fenced, invalid or valid JSON...).
    Content(String),
    /// A chat completion asking for tool calls: (tool name, arguments).
    ToolCalls(Vec<(String, Value)>),
    /// A chat completion whose content is `tool said: ` and the content of the last tool
    /// message of the request (so a test sees the tool's result reached the model).
    EchoTool,
    /// Asks for tool `name` with `args` until the request holds `turns` tool results, then
    /// answers as [`Reply::EchoTool`]: a conversation of its own for each concurrent step.
    ToolLoop { name: String, args: Value, turns: usize },
    /// 400 with OpenAI's `context_length_exceeded` error.
    ContextTooLong,
}

/// One request a stub saw.
#[derive(Clone, Debug)]
pub struct Seen {
    pub at: Instant,
    pub model: String,
    pub system: Option<String>,
    pub user: String,
    pub authorization: Option<String>,
    /// The W3C `traceparent` header, if the call carried one.
    pub traceparent: Option<String>,
    pub status: u16,
    /// The whole request.
    pub body: Value,
}

struct Shared {
    name: String,
    latency: Mutex<Duration>,
    script: Mutex<VecDeque<Reply>>,
    always: Mutex<Option<Reply>>,
    requests: AtomicUsize,
    answered: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    body_sent: Arc<AtomicUsize>,
    seen: Mutex<Vec<Seen>>,
    kill: CancellationToken,
    /// A provider's limit: (requests per minute, bucket level, last refill), a token bucket
    /// holding a minute's worth, as OpenAI's limits replenish.
    rpm: Mutex<Option<(f64, f64, Instant)>>,
    rpm_cap: Mutex<Option<f64>>,
    rate_limited: AtomicUsize,
    /// Requests in flight by their user message (a step's own prompt), and the messages that
    /// were asked while an earlier request with the same one was still in flight.
    by_prompt: Mutex<std::collections::HashMap<String, usize>>,
    overlapping: Mutex<Vec<String>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A running stub; stops when dropped.
pub struct Stub {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl Drop for Stub {
    fn drop(&mut self) {
        self.shared.kill.cancel();
    }
}

static NEXT_IP: AtomicU32 = AtomicU32::new(0);

/// A loopback address no other stub of this process uses.
pub fn next_ip() -> Ipv4Addr {
    let n = NEXT_IP.fetch_add(1, Ordering::Relaxed);
    let block = (std::process::id() % 200 + 20) as u8;
    Ipv4Addr::new(127, block, (n / 250) as u8, (n % 250 + 2) as u8)
}

impl Stub {
    /// Starts one stub named `name` on a fresh loopback address and a free port.
    pub async fn start(name: &str, latency: Duration) -> Stub {
        Self::group(&[(name, latency)]).await.pop().expect("one stub")
    }

    /// Starts stubs on distinct loopback addresses sharing one port (as pods of a replica
    /// set share their container port).
    pub async fn group(specs: &[(&str, Duration)]) -> Vec<Stub> {
        for _ in 0..50 {
            let ips: Vec<Ipv4Addr> = specs.iter().map(|_| next_ip()).collect();
            let Some(first) = ips.first() else { return Vec::new() };
            let Ok(listener) = TcpListener::bind((*first, 0)).await else { continue };
            let Ok(port) = listener.local_addr().map(|a| a.port()) else { continue };
            let mut listeners = vec![listener];
            for ip in &ips[1..] {
                match TcpListener::bind((*ip, port)).await {
                    Ok(l) => listeners.push(l),
                    Err(_) => break,
                }
            }
            if listeners.len() != specs.len() {
                continue;
            }
            return listeners
                .into_iter()
                .zip(specs)
                .map(|(l, (name, latency))| Self::serve(l, name, *latency))
                .collect();
        }
        panic!("could not bind {} stub servers on one port", specs.len());
    }

    fn serve(listener: TcpListener, name: &str, latency: Duration) -> Stub {
        let addr = listener.local_addr().expect("bound address");
        let shared = Arc::new(Shared {
            name: name.to_string(),
            latency: Mutex::new(latency),
            script: Mutex::default(),
            always: Mutex::default(),
            requests: AtomicUsize::new(0),
            answered: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            body_sent: Arc::default(),
            seen: Mutex::default(),
            kill: CancellationToken::new(),
            rpm: Mutex::new(None),
            rpm_cap: Mutex::new(None),
            rate_limited: AtomicUsize::new(0),
            by_prompt: Mutex::default(),
            overlapping: Mutex::default(),
        });
        let router = Router::new()
            .route("/v1/chat/completions", post(chat))
            .route("/v1/models", get(models))
            .with_state(shared.clone());
        let kill = shared.kill.clone();
        let listener = KillableListener { inner: listener, kill: kill.clone() };
        tokio::spawn(async move {
            tokio::select! {
                _ = axum::serve(listener, router) => {}
                _ = kill.cancelled() => {}
            }
        });
        Stub { addr, shared }
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    pub fn ip(&self) -> IpAddr {
        self.addr.ip()
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `http://ip:port/v1`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn set_latency(&self, latency: Duration) {
        *lock(&self.shared.latency) = latency;
    }

    /// Replies given to the next requests, in order, before the usual ones.
    pub fn script(&self, replies: impl IntoIterator<Item = Reply>) {
        lock(&self.shared.script).extend(replies);
    }

    /// The reply to every request once the script is used up (default: [`Reply::Ok`]).
    pub fn always(&self, reply: Reply) {
        *lock(&self.shared.always) = Some(reply);
    }

    /// Limits the stub to `rpm` requests per minute, as a provider does: a bucket of a minute's
    /// worth, refilled continuously; a request that finds it empty gets 429 with `Retry-After`.
    pub fn limit_rpm(&self, rpm: u32) {
        *lock(&self.shared.rpm) = Some((f64::from(rpm), f64::from(rpm), Instant::now()));
    }

    /// Like [`Stub::limit_rpm`] with a bucket of `seconds` of the rate (at least 1 request)
    /// instead of a minute: a provider that refuses bursts.
    pub fn limit_rpm_burst(&self, rpm: u32, seconds: f64) {
        let cap = (f64::from(rpm) / 60.0 * seconds).max(1.0);
        *lock(&self.shared.rpm_cap) = Some(cap);
        *lock(&self.shared.rpm) = Some((f64::from(rpm), cap, Instant::now()));
    }

    /// Requests answered 429 by the [`Stub::limit_rpm`] limit.
    pub fn rate_limited(&self) -> usize {
        self.shared.rate_limited.load(Ordering::Relaxed)
    }

    /// Dies like a crashed replica: no new connections, open ones fail.
    pub fn kill(&self) {
        self.shared.kill.cancel();
    }

    /// Requests received (whatever their outcome).
    pub fn requests(&self) -> usize {
        self.shared.requests.load(Ordering::Relaxed)
    }

    /// Chat completions answered with 200.
    pub fn answered(&self) -> usize {
        self.shared.answered.load(Ordering::Relaxed)
    }

    /// User messages asked while a request with the same one was in flight: with one prompt
    /// per step, the same step called twice at once. A request ends when its answer is sent or
    /// its client goes away (the connection closed: the caller was killed or gave up).
    pub fn overlapping(&self) -> Vec<String> {
        lock(&self.shared.overlapping).clone()
    }

    /// The most requests in flight at once.
    pub fn max_in_flight(&self) -> usize {
        self.shared.max_in_flight.load(Ordering::Relaxed)
    }

    pub fn seen(&self) -> Vec<Seen> {
        lock(&self.shared.seen).clone()
    }

    /// Forgets the requests seen so far (each is kept whole), giving back how many there were:
    /// a benchmark that measures memory does not count the stub's log.
    pub fn forget_seen(&self) -> usize {
        std::mem::take(&mut *lock(&self.shared.seen)).len()
    }

    /// Body bytes of streamed replies ([`Reply::Huge`], [`Reply::Drip`]) handed to the
    /// connection so far.
    pub fn body_bytes_sent(&self) -> usize {
        self.shared.body_sent.load(Ordering::Relaxed)
    }
}

async fn models() -> impl IntoResponse {
    axum::Json(json!({"object": "list", "data": [{"id": "stub-model", "object": "model", "owned_by": "volt-tests"}]}))
}

fn words(s: &str) -> u64 {
    s.split_whitespace().count() as u64
}

fn content_of(messages: &[Value], role: &str) -> Option<String> {
    messages.iter().filter(|m| m["role"] == role).filter_map(|m| m["content"].as_str()).next_back().map(str::to_string)
}

fn error_body(status: u16, message: &str, type_: &str) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (code, axum::Json(json!({"error": {"message": message, "type": type_, "param": null, "code": null}})))
        .into_response()
}

struct InFlight<'a>(&'a Shared);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One request in flight with its user message.
struct PromptInFlight<'a>(&'a Shared, String);

impl<'a> PromptInFlight<'a> {
    fn start(s: &'a Shared, prompt: String) -> Self {
        let mut by_prompt = lock(&s.by_prompt);
        let n = by_prompt.entry(prompt.clone()).or_default();
        if *n > 0 {
            lock(&s.overlapping).push(prompt.clone());
        }
        *n += 1;
        Self(s, prompt)
    }
}

impl Drop for PromptInFlight<'_> {
    fn drop(&mut self) {
        if let Some(n) = lock(&self.0.by_prompt).get_mut(&self.1) {
            *n = n.saturating_sub(1);
        }
    }
}

async fn chat(State(s): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let at = Instant::now();
    s.requests.fetch_add(1, Ordering::Relaxed);
    let now = s.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
    s.max_in_flight.fetch_max(now, Ordering::Relaxed);
    let _guard = InFlight(&s);
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let messages = request["messages"].as_array().cloned().unwrap_or_default();
    let model = request["model"].as_str().unwrap_or_default().to_string();
    let user = content_of(&messages, "user").unwrap_or_default();
    let _prompt = PromptInFlight::start(&s, user.clone());
    let system = content_of(&messages, "system");
    let mut reply = lock(&s.script).pop_front().or_else(|| lock(&s.always).clone()).unwrap_or(Reply::Ok);
    if let Some((rpm, level, at)) = lock(&s.rpm).as_mut() {
        let now = Instant::now();
        let cap = lock(&s.rpm_cap).unwrap_or(*rpm);
        *level = (*level + now.duration_since(*at).as_secs_f64() * *rpm / 60.0).min(cap);
        *at = now;
        if *level >= 1.0 {
            *level -= 1.0;
        } else {
            s.rate_limited.fetch_add(1, Ordering::Relaxed);
            let wait = Duration::from_secs_f64((1.0 - *level) * 60.0 / *rpm);
            reply = Reply::RateLimited { retry_after: wait };
        }
    }
    let reply = match reply {
        Reply::ToolLoop { name, args, turns } => {
            if messages.iter().filter(|m| m["role"] == "tool").count() < turns {
                Reply::ToolCalls(vec![(name, args)])
            } else {
                Reply::EchoTool
            }
        }
        other => other,
    };
    let status = match &reply {
        Reply::Ok
        | Reply::Malformed
        | Reply::WrongShape
        | Reply::Huge { .. }
        | Reply::Drip { .. }
        | Reply::Content(_)
        | Reply::ToolCalls(_)
        | Reply::EchoTool
        | Reply::ToolLoop { .. } => 200,
        Reply::Status(code) => *code,
        Reply::ContextTooLong => 400,
        Reply::RateLimited { .. } => 429,
        Reply::Hang => 0,
    };
    lock(&s.seen).push(Seen {
        at,
        model: model.clone(),
        system,
        user: user.clone(),
        authorization: headers.get("authorization").and_then(|v| v.to_str().ok()).map(str::to_string),
        traceparent: headers.get("traceparent").and_then(|v| v.to_str().ok()).map(str::to_string),
        status,
        body: request.clone(),
    });
    if messages.is_empty() || model.is_empty() {
        return error_body(400, "'messages' and 'model' are required", "invalid_request_error");
    }
    let latency = *lock(&s.latency);
    tokio::select! {
        _ = tokio::time::sleep(latency) => {}
        // Killed: the connection fails as this answer is written.
        _ = s.kill.cancelled() => return error_body(500, "killed", "server_error"),
    }
    match reply {
        Reply::Status(code) => error_body(code, &format!("stub {} fails on purpose", s.name), "server_error"),
        Reply::ContextTooLong => {
            let body = json!({"error": {"message": "This model's maximum context length is 8 tokens.",
                "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}});
            (StatusCode::BAD_REQUEST, axum::Json(body)).into_response()
        }
        Reply::RateLimited { retry_after } => {
            let secs = retry_after.as_millis().div_ceil(1000).to_string();
            let mut response = error_body(429, "Rate limit reached for requests", "requests");
            if let Ok(v) = secs.parse() {
                response.headers_mut().insert("retry-after", v);
            }
            response
        }
        Reply::Ok => {
            let n = s.answered.fetch_add(1, Ordering::Relaxed) + 1;
            let content = format!("{}: {}", s.name, user);
            axum::Json(completion(&s.name, n, &model, &messages, &content)).into_response()
        }
        Reply::Content(content) => {
            let n = s.answered.fetch_add(1, Ordering::Relaxed) + 1;
            axum::Json(completion(&s.name, n, &model, &messages, &content)).into_response()
        }
        Reply::ToolLoop { .. } => unreachable!("resolved above"),
        Reply::EchoTool => {
            let n = s.answered.fetch_add(1, Ordering::Relaxed) + 1;
            let content = format!("tool said: {}", content_of(&messages, "tool").unwrap_or_default());
            axum::Json(completion(&s.name, n, &model, &messages, &content)).into_response()
        }
        Reply::ToolCalls(calls) => {
            let n = s.answered.fetch_add(1, Ordering::Relaxed) + 1;
            let mut body = completion(&s.name, n, &model, &messages, "");
            let calls: Vec<Value> = calls
                .iter()
                .enumerate()
                .map(|(i, (name, args))| {
                    json!({"id": format!("call_{n}_{i}"), "type": "function",
                           "function": {"name": name, "arguments": args.to_string()}})
                })
                .collect();
            body["choices"][0]["message"] = json!({"role": "assistant", "content": null, "tool_calls": calls});
            body["choices"][0]["finish_reason"] = json!("tool_calls");
            axum::Json(body).into_response()
        }
        Reply::Hang => {
            s.kill.cancelled().await;
            error_body(500, "killed", "server_error")
        }
        Reply::Malformed => {
            let body = format!(
                r#"{{"id": "chatcmpl-{}", "object": "chat.completion", "choices": [{{"index": 0, "message": {{"role": "assistant", "content": "cut sh"#,
                s.name
            );
            json_response(axum::body::Body::from(body))
        }
        Reply::WrongShape => {
            let body = json!({"model": model, "created_at": "2024-01-01T00:00:00Z",
                              "message": {"role": "assistant", "content": format!("{}: {}", s.name, user)}, "done": true});
            axum::Json(body).into_response()
        }
        Reply::Huge { bytes } => {
            let body = completion(&s.name, 0, &model, &messages, "@").to_string();
            let (head, tail) = body.split_once('@').expect("placeholder");
            const CHUNK: usize = 64 * 1024;
            let filler = Bytes::from(vec![b'x'; CHUNK]);
            let mut parts = vec![Bytes::from(head.to_string())];
            parts.extend((0..bytes / CHUNK).map(|_| filler.clone()));
            parts.push(filler.slice(..bytes % CHUNK));
            parts.push(Bytes::from(tail.to_string()));
            streamed(&s, parts, Duration::ZERO)
        }
        Reply::Drip { total } => {
            let content = format!("{}: {}", s.name, user);
            let body = Bytes::from(completion(&s.name, 0, &model, &messages, &content).to_string());
            let parts: Vec<Bytes> =
                (0..body.len()).step_by(8).map(|i| body.slice(i..(i + 8).min(body.len()))).collect();
            let pause = total / parts.len().max(1) as u32;
            streamed(&s, parts, pause)
        }
    }
}

/// A chat completion answering `messages` with `content`.
fn completion(name: &str, n: usize, model: &str, messages: &[Value], content: &str) -> Value {
    let prompt_tokens: u64 = messages.iter().filter_map(|m| m["content"].as_str()).map(words).sum();
    let completion_tokens = words(content);
    json!({
        "id": format!("chatcmpl-{name}-{n}"),
        "object": "chat.completion",
        "created": jiff::Timestamp::now().as_second(),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop", "logprobs": null}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens}
    })
}

fn json_response(body: axum::body::Body) -> Response {
    let mut response = Response::new(body);
    response.headers_mut().insert(axum::http::header::CONTENT_TYPE, "application/json".parse().expect("header"));
    response
}

/// A 200 whose body is `parts`, one after the other, `pause` before each but the first;
/// counted in `body_sent` as they go. The stream fails when the stub is killed.
fn streamed(s: &Arc<Shared>, parts: Vec<Bytes>, pause: Duration) -> Response {
    let (sent, kill) = (s.body_sent.clone(), s.kill.clone());
    let stream = futures::stream::unfold((parts.into_iter(), true), move |(mut parts, first)| {
        let (sent, kill) = (sent.clone(), kill.clone());
        async move {
            let part = parts.next()?;
            if !first && !pause.is_zero() {
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = kill.cancelled() => return Some((Err(killed()), (parts, false))),
                }
            }
            if kill.is_cancelled() {
                return Some((Err(killed()), (parts, false)));
            }
            sent.fetch_add(part.len(), Ordering::Relaxed);
            Some((Ok::<_, io::Error>(part), (parts, false)))
        }
    });
    json_response(axum::body::Body::from_stream(stream))
}

/// Accepts connections whose IO fails once the stub is killed.
struct KillableListener {
    inner: TcpListener,
    kill: CancellationToken,
}

impl axum::serve::Listener for KillableListener {
    type Io = KillableIo;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => {
                    let _ = stream.set_nodelay(true);
                    return (KillableIo::new(stream, self.kill.clone()), addr);
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

struct KillableIo {
    inner: TcpStream,
    kill: CancellationToken,
    killed: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl KillableIo {
    fn new(inner: TcpStream, kill: CancellationToken) -> Self {
        let killed = Box::pin(kill.clone().cancelled_owned());
        Self { inner, kill, killed }
    }

    fn dead(&mut self, cx: &mut Context<'_>) -> bool {
        self.kill.is_cancelled() || self.killed.as_mut().poll(cx).is_ready()
    }
}

fn killed() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionReset, "stub server killed")
}

impl AsyncRead for KillableIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.dead(cx) {
            return Poll::Ready(Err(killed()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for KillableIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.dead(cx) {
            return Poll::Ready(Err(killed()));
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.dead(cx) {
            return Poll::Ready(Err(killed()));
        }
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
