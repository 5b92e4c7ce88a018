//! The HTTP side of an agent call: the transport under async-openai, replies read up to a limit
//! and checked to be chat completions, error bodies and `Retry-After`.

use crate::text::clip;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::time::Duration;

use async_openai::error::OpenAIError;
use async_openai::middleware::HttpRequestFactory;
use async_openai::types::chat::CreateChatCompletionResponse;
use futures::future::BoxFuture;

/// An HTTP answer that was not a success, as the transport saw it (status, the delay the
/// server asked for, and its error message).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("HTTP {status}: {message}")]
pub(super) struct HttpStatusError {
    pub(super) status: u16,
    pub(super) retry_after: Option<Duration>,
    pub(super) message: String,
    pub(super) quota: bool,
}

/// Largest error body read from a replica.
const MAX_ERROR_BODY: usize = 8 * 1024;

/// Largest chat completion read from a replica, by default: far more than any model writes in
/// one answer, and about what a step's output can hold (a ConfigMap's 1 MiB).
pub const MAX_REPLY_BYTES: usize = 1024 * 1024;

/// A successful (2xx) answer that is not a usable chat completion.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub(super) enum ReplyError {
    #[error("reply larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("reply is not valid JSON: {0}")]
    NotJson(String),
    #[error("reply is not a chat completion: {0}")]
    NotChatCompletion(String),
}

/// How far the answer to one attempt has come, for the message when its time runs out.
#[derive(Debug, Default)]
pub(super) struct Progress {
    /// The HTTP status, once the headers came (0 before).
    status: AtomicU16,
    /// Body bytes received.
    body: AtomicUsize,
    /// Microseconds from sending the request to the end of a successful reply's body.
    pub(super) http_us: std::sync::atomic::AtomicU64,
}

impl Progress {
    /// Why an attempt cut after `timeout` failed.
    pub(super) fn timed_out(&self, timeout: Duration) -> String {
        let secs = timeout.as_secs_f64();
        match self.status.load(Ordering::Relaxed) {
            0 => format!("no answer within {secs:.1}s"),
            status => format!(
                "reply not complete within {secs:.1}s (HTTP {status}, {} bytes of the body received)",
                self.body.load(Ordering::Relaxed)
            ),
        }
    }
}

/// The HTTP transport under async-openai: one request per call, no retries of its own (the
/// caller retries, across replicas), error answers turned into [`HttpStatusError`] with the
/// headers async-openai would drop (`Retry-After`). It reads successful answers itself, at most
/// `max_reply` bytes, and checks they are chat completions: async-openai would read a body of
/// any size, and log the whole of one it cannot parse.
#[derive(Clone)]
pub(super) struct Transport {
    pub(super) client: reqwest::Client,
    pub(super) max_reply: usize,
    pub(super) progress: Arc<Progress>,
    /// The W3C `traceparent` of the call's span, when traces are on.
    pub(super) traceparent: Option<reqwest::header::HeaderValue>,
}

impl tower::Service<HttpRequestFactory> for Transport {
    type Response = reqwest::Response;
    type Error = OpenAIError;
    type Future = BoxFuture<'static, Result<reqwest::Response, OpenAIError>>;

    fn poll_ready(&mut self, _cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, factory: HttpRequestFactory) -> Self::Future {
        let Transport { client, max_reply, progress, traceparent } = self.clone();
        Box::pin(async move {
            let mut request = factory.build().await?;
            if let Some(value) = traceparent {
                request.headers_mut().insert("traceparent", value);
            }
            // No key: send no Authorization header rather than an empty bearer token.
            let empty_bearer = request
                .headers()
                .get(reqwest::header::AUTHORIZATION)
                .is_some_and(|v| v.as_bytes().trim_ascii() == b"Bearer");
            if empty_bearer {
                request.headers_mut().remove(reqwest::header::AUTHORIZATION);
            }
            // The key, to take out of error messages that echo it (before they are cut short,
            // which could leave part of it); and the header marked sensitive, so that HTTP
            // libraries never print it.
            let key = match request.headers_mut().get_mut(reqwest::header::AUTHORIZATION) {
                Some(value) => {
                    value.set_sensitive(true);
                    value.to_str().ok().and_then(|v| v.strip_prefix("Bearer ")).map(|k| k.trim().to_string())
                }
                None => None,
            };
            let sent = std::time::Instant::now();
            let response = client.execute(request).await.map_err(|e| OpenAIError::Reqwest(e.without_url()))?;
            let status = response.status();
            progress.status.store(status.as_u16(), Ordering::Relaxed);
            if status.is_success() {
                let reply = read_reply(response, max_reply, &progress).await;
                progress.http_us.store(sent.elapsed().as_micros() as u64, Ordering::Relaxed);
                return reply;
            }
            let retry_after = retry_after(response.headers(), jiff::Timestamp::now());
            let body = read_limited(response, MAX_ERROR_BODY).await;
            let (message, quota) = error_message(&body, key.as_deref());
            Err(OpenAIError::Boxed(Box::new(HttpStatusError { status: status.as_u16(), retry_after, message, quota })))
        })
    }
}

/// Reads a successful answer, at most `limit` bytes, checks it is a chat completion, and gives
/// it back as a response whose body is in memory.
async fn read_reply(
    mut response: reqwest::Response,
    limit: usize,
    progress: &Progress,
) -> Result<reqwest::Response, OpenAIError> {
    let too_large = || OpenAIError::Boxed(Box::new(ReplyError::TooLarge { limit }));
    if response.content_length().is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| OpenAIError::Reqwest(e.without_url()))? {
        if body.len() + chunk.len() > limit {
            // Dropping the response closes the connection: the rest is never read.
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
        progress.body.store(body.len(), Ordering::Relaxed);
    }
    check_reply(&body).map_err(|e| OpenAIError::Boxed(Box::new(e)))?;
    let mut out = http::Response::new(body);
    *out.status_mut() = response.status();
    *out.version_mut() = response.version();
    *out.headers_mut() = std::mem::take(response.headers_mut());
    Ok(reqwest::Response::from(out))
}

/// Whether `body` is a chat completion, with the parser's reason when it is not.
fn check_reply(body: &[u8]) -> Result<(), ReplyError> {
    use serde_json::error::Category;
    match serde_json::from_slice::<CreateChatCompletionResponse>(body) {
        Ok(_) => Ok(()),
        Err(e) if e.classify() == Category::Data => Err(ReplyError::NotChatCompletion(clip(&e.to_string(), 200))),
        Err(e) => Err(ReplyError::NotJson(clip(&e.to_string(), 200))),
    }
}

async fn read_limited(mut response: reqwest::Response, limit: usize) -> Vec<u8> {
    let mut body = Vec::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        body.extend_from_slice(&chunk);
        if body.len() >= limit {
            body.truncate(limit);
            break;
        }
    }
    body
}

/// The message of an OpenAI error body (`{"error": {"message": ...}}`), or the body's text,
/// with `key` (the API key sent) taken out; and whether it says the quota is exhausted (a 429
/// that waiting does not cure).
fn error_message(body: &[u8], key: Option<&str>) -> (String, bool) {
    let parsed: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    let error = parsed.as_ref().and_then(|v| v.get("error"));
    let message = error
        .and_then(|e| e.get("message").and_then(|m| m.as_str()).or_else(|| e.as_str()))
        .map(str::to_string)
        .unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_string());
    let quota = error
        .and_then(|e| e.get("type").or_else(|| e.get("code")))
        .and_then(|t| t.as_str())
        .is_some_and(|t| t == "insufficient_quota");
    // The code tells a context too long or a content filter apart (for fallbacks).
    let message = match error.and_then(|e| e.get("code")).and_then(|c| c.as_str()) {
        Some(code) if !code.is_empty() && !message.contains(code) => format!("{message} ({code})"),
        _ => message,
    };
    let message = match key.filter(|k| !k.is_empty()) {
        Some(key) => message.replace(key, "[redacted]"),
        None => message,
    };
    (clip(&message, 300), quota)
}

/// The delay a 429 or 503 asks for: `retry-after-ms` (OpenAI), else `Retry-After` in seconds
/// or as an HTTP date.
pub fn retry_after(headers: &reqwest::header::HeaderMap, now: jiff::Timestamp) -> Option<Duration> {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    if let Some(ms) = text("retry-after-ms").and_then(|v| v.parse::<f64>().ok()).filter(|v| v.is_finite() && *v >= 0.0)
    {
        return Some(Duration::from_secs_f64(ms / 1000.0));
    }
    let value = text("retry-after")?;
    if let Ok(secs) = value.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs));
    }
    let at = jiff::fmt::rfc2822::parse(value).ok()?.timestamp();
    let ms = at.as_millisecond() - now.as_millisecond();
    Some(Duration::from_millis(ms.max(0) as u64))
}

#[cfg(test)]
mod tests {
    use super::super::errors::{FailureKind, classify};
    use super::*;
    use reqwest::header::{HeaderMap, HeaderValue};

    #[test]
    fn retry_after_reads_milliseconds_seconds_and_dates() {
        let now: jiff::Timestamp = "2024-01-01T00:00:00Z".parse().expect("time");
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h, now), None);
        h.insert("retry-after", HeaderValue::from_static("2"));
        assert_eq!(retry_after(&h, now), Some(Duration::from_secs(2)));
        h.insert("retry-after", HeaderValue::from_static("Mon, 01 Jan 2024 00:00:05 GMT"));
        assert_eq!(retry_after(&h, now), Some(Duration::from_secs(5)));
        h.insert("retry-after-ms", HeaderValue::from_static("1500"));
        assert_eq!(retry_after(&h, now), Some(Duration::from_millis(1500)));
    }

    #[test]
    fn error_bodies_give_their_message() {
        let (m, quota) = error_message(br#"{"error":{"message":"Rate limit reached","type":"requests"}}"#, None);
        assert_eq!((m.as_str(), quota), ("Rate limit reached", false));
        let (_, quota) = error_message(br#"{"error":{"message":"quota","type":"insufficient_quota"}}"#, None);
        assert!(quota);
        assert_eq!(error_message(b"  upstream connect error  ", None).0, "upstream connect error");
    }

    #[test]
    fn echoed_keys_are_taken_out_before_messages_are_cut_short() {
        let key = "sk-0123456789abcdef0123456789abcdef";
        // The key straddles the 300-character cut: cutting first would leave part of it.
        let body = format!(r#"{{"error":{{"message":"{} {key} is not valid"}}}}"#, "x".repeat(280));
        let (m, _) = error_message(body.as_bytes(), Some(key));
        assert!(!m.contains("0123456789abcdef"), "{m}");
        assert!(m.contains("[redacted]"), "{m}");
        let (m, _) = error_message(format!("bad key {key}").as_bytes(), Some(key));
        assert_eq!(m, "bad key [redacted]");
        assert_eq!(error_message(b"no key here", Some("")).0, "no key here");
    }

    #[test]
    fn replies_that_are_not_chat_completions_are_named() {
        let good = br#"{"id":"c","object":"chat.completion","created":1,"model":"m",
            "choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}]}"#;
        assert_eq!(check_reply(good), Ok(()));
        let bad = check_reply(br#"{"id": "c", "choices": [{"#).expect_err("truncated");
        assert!(matches!(bad, ReplyError::NotJson(_)), "{bad:?}");
        assert!(bad.to_string().starts_with("reply is not valid JSON: EOF while parsing"), "{bad}");
        let bad = check_reply(b"<html>502 Bad Gateway</html>").expect_err("html");
        assert!(matches!(bad, ReplyError::NotJson(_)), "{bad:?}");
        let bad = check_reply(br#"{"result": "hi"}"#).expect_err("wrong shape");
        assert!(bad.to_string().starts_with("reply is not a chat completion: missing field"), "{bad}");
        let (message, kind) = classify(&OpenAIError::Boxed(Box::new(bad)));
        assert_eq!(kind, FailureKind::Transient);
        assert!(message.starts_with("reply is not a chat completion"), "{message}");
    }

    #[test]
    fn timeouts_say_how_far_the_reply_came() {
        let p = Progress::default();
        assert_eq!(p.timed_out(Duration::from_millis(1500)), "no answer within 1.5s");
        p.status.store(200, Ordering::Relaxed);
        p.body.store(42, Ordering::Relaxed);
        assert_eq!(
            p.timed_out(Duration::from_secs(2)),
            "reply not complete within 2.0s (HTTP 200, 42 bytes of the body received)"
        );
    }

    /// A server on loopback that answers 200 with a chunked body that never ends; returns its
    /// address and the bytes it managed to write.
    async fn endless_server() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let written = Arc::new(AtomicUsize::new(0));
        let count = written.clone();
        tokio::spawn(async move {
            let Ok((mut socket, _)) = listener.accept().await else { return };
            let mut request = [0u8; 4096];
            let _ = socket.read(&mut request).await;
            let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n";
            if socket.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            let chunk = format!("10000\r\n{}\r\n", "x".repeat(0x10000));
            while socket.write_all(chunk.as_bytes()).await.is_ok() {
                count.fetch_add(0x10000, Ordering::Relaxed);
            }
        });
        (addr, written)
    }

    #[tokio::test]
    async fn an_endless_reply_is_cut_at_the_limit() {
        let (addr, written) = endless_server().await;
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::new();
        let response = client.post(format!("http://{addr}/v1/chat/completions")).send().await.expect("headers");
        let progress = Progress::default();
        let limit = 256 * 1024;
        let read = tokio::time::timeout(Duration::from_secs(10), read_reply(response, limit, &progress)).await;
        let err = read.expect("an endless body must be cut, not read forever").expect_err("too large");
        assert_eq!(classify(&err), ("reply larger than 262144 bytes".to_string(), FailureKind::Transient));
        assert!(progress.body.load(Ordering::Relaxed) <= limit);
        // What the server could write is the limit plus what the socket buffers hold: far less
        // than a body read to its end (which here has none).
        let sent = written.load(Ordering::Relaxed);
        assert!(sent < 64 * 1024 * 1024, "{sent} bytes sent");
    }

    #[tokio::test]
    async fn a_declared_length_over_the_limit_fails_before_reading() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let Ok((mut socket, _)) = listener.accept().await else { return };
            let mut request = [0u8; 4096];
            let _ = socket.read(&mut request).await;
            let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 50000000\r\n\r\n{";
            let _ = socket.write_all(head.as_bytes()).await;
            // Never sends the rest.
            std::future::pending::<()>().await;
        });
        let _ = rustls::crypto::ring::default_provider().install_default();
        let response = reqwest::Client::new().get(format!("http://{addr}/")).send().await.expect("headers");
        let read = tokio::time::timeout(Duration::from_secs(5), read_reply(response, 1024, &Progress::default())).await;
        let err = read.expect("no wait for a body that is too large anyway").expect_err("too large");
        assert_eq!(classify(&err).0, "reply larger than 1024 bytes");
    }
}
