//! HTTP steps: one request, the response body as output. Which addresses a step may reach
//! is decided by an [`HttpStepPolicy`] (see [`super::http_policy`]).

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use crate::engine::Work;
use crate::telemetry::CallSpan;

use super::http_policy::{Denied, HttpStepPolicy, PolicyResolver};
use super::{Failure, Outcome, Output};

/// Largest response body kept as output.
pub const MAX_BODY: usize = 1024 * 1024;

/// Most redirects followed.
pub const MAX_REDIRECTS: usize = 5;

#[derive(Clone)]
pub struct HttpExecutor {
    client: reqwest::Client,
    /// For URLs naming a host on the operator's own port: its resolver drops loopback.
    own_port_client: reqwest::Client,
    policy: Arc<HttpStepPolicy>,
}

impl Default for HttpExecutor {
    fn default() -> Self {
        Self::new()
    }
}

impl HttpExecutor {
    /// An executor that may reach every address (local mode, tests).
    pub fn new() -> Self {
        Self::with_policy(HttpStepPolicy::allow_all())
    }

    /// An executor whose requests, redirects included, reach only what `policy` allows.
    pub fn with_policy(policy: HttpStepPolicy) -> Self {
        let policy = Arc::new(policy);
        let client = Self::client(&policy, None);
        let own_port_client = match policy.own_port() {
            Some(port) => Self::client(&policy, Some(port)),
            None => client.clone(),
        };
        Self { client, own_port_client, policy }
    }

    /// A client whose names resolve through `policy` (dropping loopback when `own_port` is set).
    fn client(policy: &Arc<HttpStepPolicy>, own_port: Option<u16>) -> reqwest::Client {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("volt-operator/", env!("CARGO_PKG_VERSION")));
        builder = if policy.is_unrestricted() {
            builder.redirect(reqwest::redirect::Policy::limited(MAX_REDIRECTS))
        } else {
            let redirects = policy.clone();
            builder
                // Names resolve through the policy, so only allowed addresses are connected to.
                .dns_resolver(Arc::new(PolicyResolver { policy: policy.clone(), own_port }))
                // A proxy would resolve the names itself, out of the policy's sight.
                .no_proxy()
                .redirect(reqwest::redirect::Policy::custom(move |attempt| {
                    if attempt.previous().len() >= MAX_REDIRECTS {
                        return attempt.error(format!("more than {MAX_REDIRECTS} redirects"));
                    }
                    // A literal address is connected to without resolving: check it here.
                    match redirects.check_redirect(attempt.url()) {
                        Ok(()) => attempt.follow(),
                        Err(mut denied) => {
                            denied.redirect = Some(attempt.url().to_string());
                            attempt.error(denied)
                        }
                    }
                }))
        };
        builder.build().unwrap_or_default()
    }

    pub async fn run(&self, work: &Work) -> Outcome {
        let Work::Http { method, url, headers, body, success_codes } = work else {
            return Err(Failure::permanent("not an http step"));
        };
        let method =
            reqwest::Method::from_bytes(method.as_str().as_bytes()).map_err(|e| Failure::permanent(e.to_string()))?;
        let parsed = reqwest::Url::parse(url).map_err(|e| Failure::permanent(format!("http.url {url:?}: {e}")))?;
        // Denied requests fail for good: retrying cannot change the policy.
        self.policy.check_url(&parsed).map_err(|d| Failure::permanent(d.step_message(url)))?;
        let mut span = CallSpan::http(method.as_str(), &parsed);
        let outcome = self.send(method, parsed, url, headers, body.as_ref(), success_codes, &mut span).await;
        if let Err(f) = &outcome {
            span.fail(if f.retryable { "retryable" } else { "permanent" }, &f.message);
        }
        outcome
    }

    #[allow(clippy::too_many_arguments)]
    async fn send(
        &self,
        method: reqwest::Method,
        parsed: reqwest::Url,
        url: &str,
        headers: &std::collections::BTreeMap<String, String>,
        body: Option<&String>,
        success_codes: &[u16],
        span: &mut CallSpan,
    ) -> Outcome {
        let host = parsed.host_str().map(str::to_string);
        let client = if self.policy.names_own_port(&parsed) { &self.own_port_client } else { &self.client };
        let mut req = client.request(method, parsed);
        for (k, v) in headers {
            req = req.header(k, v);
        }
        if let Some(tp) = span.traceparent() {
            req = req.header("traceparent", tp);
        }
        if let Some(b) = body {
            req = req.body(b.clone());
        }
        let resp = req.send().await.map_err(|e| match Denied::find(&e) {
            Some(denied) => {
                let mut denied = denied.clone();
                // A redirect to a host name is denied by the resolver, which does not know
                // that it follows a redirect: a host other than the URL's tells.
                if denied.redirect.is_none() && denied.host.as_deref().is_some_and(|h| Some(h) != host.as_deref()) {
                    denied.redirect = denied.host.clone();
                }
                Failure::permanent(denied.step_message(url))
            }
            None => Failure::retryable(format!("request to {url} failed: {}", error_chain(&e))),
        })?;
        let status = resp.status();
        span.set("http.response.status_code", i64::from(status.as_u16()));
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
    use std::net::{IpAddr, SocketAddr};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::executors::http_policy::CidrList;

    #[test]
    fn builds_with_the_ring_provider() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let _ = super::HttpExecutor::new();
    }

    /// A server on `ip` answering every request with `response`; counts connections.
    async fn server(ip: &str, response: String) -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind((ip.parse::<IpAddr>().expect("ip"), 0)).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(AtomicUsize::new(0));
        let count = seen.clone();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let response = response.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = conn.read(&mut buf).await;
                    let _ = conn.write_all(response.as_bytes()).await;
                    let _ = conn.shutdown().await;
                });
            }
        });
        (addr, seen)
    }

    fn ok(body: &str) -> String {
        format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())
    }

    fn redirect(to: &str) -> String {
        format!("HTTP/1.1 302 Found\r\nLocation: {to}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    }

    fn get(url: String) -> Work {
        Work::Http {
            method: crate::api::HttpMethod::Get,
            url,
            headers: Default::default(),
            body: None,
            success_codes: Vec::new(),
        }
    }

    fn executor(deny: &str) -> HttpExecutor {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let allow = CidrList::parse("0.0.0.0/0,::/0").expect("allow");
        let deny = CidrList::parse(deny).expect("deny");
        HttpExecutor::with_policy(HttpStepPolicy::new(&allow, &deny, []))
    }

    fn denied(outcome: Outcome) -> String {
        let f = outcome.expect_err("denied");
        assert!(!f.retryable, "a denied request is not retried: {f:?}");
        assert!(f.message.contains("is denied by the operator's HTTP step policy"), "{}", f.message);
        f.message
    }

    #[tokio::test]
    async fn literal_addresses_are_denied_without_a_connection() {
        let (addr, seen) = server("127.0.0.2", ok("secret")).await;
        let exec = executor("169.254.0.0/16,127.0.0.2/32");
        let url = format!("http://{addr}/x");
        let m = denied(exec.run(&get(url.clone())).await);
        assert!(m.starts_with(&format!("http step url {url} is denied")), "{m}");
        assert!(m.contains("127.0.0.2/32") && m.contains("--http-step-deny"), "{m}");
        let mapped = format!("http://[::ffff:127.0.0.2]:{}/x", addr.port());
        denied(exec.run(&get(mapped)).await);
        denied(exec.run(&get("http://169.254.169.254/latest/meta-data/".into())).await);
        assert_eq!(seen.load(Ordering::SeqCst), 0, "no connection to a denied address");
        // The same server is reachable when the policy allows it.
        let out = executor("169.254.0.0/16").run(&get(url)).await.expect("allowed");
        assert_eq!(out.text, "secret");
    }

    #[tokio::test]
    async fn names_are_judged_by_the_addresses_they_resolve_to() {
        let (addr, seen) = server("127.0.0.1", ok("local")).await;
        let exec = executor("127.0.0.0/8,::1/128");
        let m = denied(exec.run(&get(format!("http://localhost:{}/", addr.port()))).await);
        assert!(m.contains("localhost resolves to"), "{m}");
        assert_eq!(seen.load(Ordering::SeqCst), 0);
        let out = executor("169.254.0.0/16,::1/128")
            .run(&get(format!("http://localhost:{}/", addr.port())))
            .await
            .expect("localhost allowed");
        assert_eq!(out.text, "local");
    }

    #[tokio::test]
    async fn redirects_are_checked_like_the_first_request() {
        let (target, seen) = server("127.0.0.3", ok("inner")).await;
        let exec = executor("169.254.0.0/16,127.0.0.3/32,::1/128");
        for to in [
            format!("http://{target}/inner"),
            format!("http://[::ffff:127.0.0.3]:{}/inner", target.port()),
            "http://169.254.169.254/latest/meta-data/".to_string(),
        ] {
            let (front, _) = server("127.0.0.2", redirect(&to)).await;
            let url = format!("http://{front}/start");
            let m = denied(exec.run(&get(url.clone())).await);
            assert!(m.starts_with(&format!("http step url {url} is denied")), "{m}");
            assert!(m.contains("the response redirected to"), "{m}");
        }
        // A redirect to a name is caught by the resolver, and still says it was a redirect.
        let (front, _) = server("127.0.0.2", redirect(&format!("http://localhost:{}/inner", target.port()))).await;
        let _ = rustls::crypto::ring::default_provider().install_default();
        let only_front = HttpExecutor::with_policy(HttpStepPolicy::new(
            &CidrList::parse("127.0.0.2/32").expect("allow"),
            &CidrList::parse("").expect("deny"),
            [],
        ));
        let m = denied(only_front.run(&get(format!("http://{front}/start"))).await);
        assert!(m.contains("redirected to localhost, and localhost resolves to"), "{m}");
        assert_eq!(seen.load(Ordering::SeqCst), 0, "no connection to a denied redirect target");
        // An allowed redirect is followed.
        let (inner, _) = server("127.0.0.4", ok("followed")).await;
        let (front, _) = server("127.0.0.2", redirect(&format!("http://{inner}/"))).await;
        let out = executor("169.254.0.0/16").run(&get(format!("http://{front}/"))).await.expect("followed");
        assert_eq!(out.text, "followed");
    }
}
