//! HTTP steps: one request, the response body as output.

use std::time::Duration;

use futures::StreamExt;

use crate::engine::Work;

use super::{Failure, Outcome, Output};

/// Largest response body kept as output.
pub const MAX_BODY: usize = 1024 * 1024;

#[derive(Clone)]
pub struct HttpExecutor {
    client: reqwest::Client,
}

impl Default for HttpExecutor {
    fn default() -> Self {
        Self::new()
    }
}

impl HttpExecutor {
    pub fn new() -> Self {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::limited(5))
            .user_agent(concat!("volt-operator/", env!("CARGO_PKG_VERSION")))
            .build()
            .unwrap_or_default();
        Self { client }
    }

    pub async fn run(&self, work: &Work) -> Outcome {
        let Work::Http { method, url, headers, body, success_codes } = work else {
            return Err(Failure::permanent("not an http step"));
        };
        let method =
            reqwest::Method::from_bytes(method.as_str().as_bytes()).map_err(|e| Failure::permanent(e.to_string()))?;
        let parsed = reqwest::Url::parse(url).map_err(|e| Failure::permanent(format!("http.url {url:?}: {e}")))?;
        let mut req = self.client.request(method, parsed);
        for (k, v) in headers {
            req = req.header(k, v);
        }
        if let Some(b) = body {
            req = req.body(b.clone());
        }
        let resp = req
            .send()
            .await
            .map_err(|e| Failure::retryable(format!("request to {url} failed: {}", error_chain(&e))))?;
        let status = resp.status();
        let mut text = Vec::new();
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| Failure::retryable(format!("reading the response from {url}: {e}")))?;
            if text.len() + chunk.len() > MAX_BODY {
                return Err(Failure::permanent(format!("response from {url} is larger than {MAX_BODY} bytes")));
            }
            text.extend_from_slice(&chunk);
        }
        let text = String::from_utf8_lossy(&text).into_owned();
        let ok = if success_codes.is_empty() { status.is_success() } else { success_codes.contains(&status.as_u16()) };
        if ok {
            Ok(Output { text, info: Default::default() })
        } else {
            let snippet: String = text.chars().take(200).collect();
            Err(Failure::retryable(format!("{url} answered {status}: {snippet}")))
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn builds_with_the_ring_provider() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let _ = super::HttpExecutor::new();
    }
}
