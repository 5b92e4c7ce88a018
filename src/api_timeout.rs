//! A time bound on the operator's API requests. kube's client has no read timeout, so a
//! request the API server accepts and never answers (an overloaded server, a connection gone
//! half-open) would hold the pass, the Lease renewal or the status write that sent it for good.
//! Every request but a watch (and a followed log) gets `timeout` for its response to begin and
//! the same again between any two parts of its body; a request past it fails, and its caller
//! retries as after any API error. Watches are bounded by the API server (`timeoutSeconds`)
//! and by kube's watcher.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http_body_util::Either;
use prometheus::IntCounterVec;
use tower::BoxError;
use tower_http::timeout::TimeoutBody;

/// What a request past its bound fails with.
#[derive(Debug, thiserror::Error)]
#[error("{method} {path}: the API server did not answer within {timeout:?}")]
pub struct ApiTimeout {
    pub method: http::Method,
    pub path: String,
    pub timeout: Duration,
}

/// The layer; a `timeout` of `None` leaves requests unbounded (kube's default).
#[derive(Clone, Debug)]
pub struct ApiTimeoutLayer {
    timeout: Option<Duration>,
    /// Requests past the bound, by verb (`volt_kube_api_timeouts_total`).
    timeouts: Option<IntCounterVec>,
}

impl ApiTimeoutLayer {
    pub fn new(timeout: Option<Duration>) -> Self {
        ApiTimeoutLayer { timeout, timeouts: None }
    }

    /// Counts the requests past the bound in `timeouts`, by verb.
    pub fn counting(mut self, timeouts: IntCounterVec) -> Self {
        self.timeouts = Some(timeouts);
        self
    }
}

impl<S> tower::Layer<S> for ApiTimeoutLayer {
    type Service = ApiTimeoutService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        ApiTimeoutService { inner, timeout: self.timeout, timeouts: self.timeouts.clone() }
    }
}

#[derive(Clone)]
pub struct ApiTimeoutService<S> {
    inner: S,
    timeout: Option<Duration>,
    timeouts: Option<IntCounterVec>,
}

/// True for requests that stay open by design: watches and followed logs.
fn long_running(uri: &http::Uri) -> bool {
    crate::metrics::query_flag(uri, "watch") || crate::metrics::query_flag(uri, "follow")
}

/// A response body: bounded between its parts, or as it came (a watch's).
pub type Body<B> = Either<TimeoutBody<B>, B>;

impl<S, Req, B> tower::Service<http::Request<Req>> for ApiTimeoutService<S>
where
    S: tower::Service<http::Request<Req>, Response = http::Response<B>>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<Body<B>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: http::Request<Req>) -> Self::Future {
        let Some(timeout) = self.timeout.filter(|_| !long_running(req.uri())) else {
            let response = self.inner.call(req);
            return Box::pin(async move { response.await.map(|r| r.map(Either::Right)).map_err(Into::into) });
        };
        // What a timeout reports: kept from the request, which the inner service takes.
        let (method, path) = (req.method().clone(), req.uri().path().to_string());
        let verb = crate::metrics::verb_of(&method, req.uri());
        let timeouts = self.timeouts.clone();
        let response = self.inner.call(req);
        Box::pin(async move {
            match tokio::time::timeout(timeout, response).await {
                Ok(Ok(r)) => Ok(r.map(|body| Either::Left(TimeoutBody::new(timeout, body)))),
                Ok(Err(e)) => Err(e.into()),
                Err(_) => {
                    if let Some(c) = timeouts {
                        c.with_label_values(&[verb]).inc();
                    }
                    Err(Box::new(ApiTimeout { method, path, timeout }) as BoxError)
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::{BodyExt, StreamBody};
    use std::convert::Infallible;
    use tower::{Layer, ServiceExt};

    type Frames = StreamBody<futures::stream::BoxStream<'static, Result<http_body::Frame<Bytes>, Infallible>>>;

    /// A server that answers after `headers`, then sends one part of the body after `body`.
    fn server(
        headers: Duration,
        body: Duration,
    ) -> impl tower::Service<
        http::Request<()>,
        Response = http::Response<Frames>,
        Error = Infallible,
        Future = impl Future<Output = Result<http::Response<Frames>, Infallible>> + Send + 'static,
    > + Clone {
        tower::service_fn(move |_req: http::Request<()>| async move {
            tokio::time::sleep(headers).await;
            let part = futures::stream::once(async move {
                tokio::time::sleep(body).await;
                Ok(http_body::Frame::data(Bytes::from_static(b"{}")))
            });
            Ok::<_, Infallible>(http::Response::new(StreamBody::new(futures::StreamExt::boxed(part))))
        })
    }

    fn get(uri: &str) -> http::Request<()> {
        http::Request::get(uri).body(()).expect("a request")
    }

    const BOUND: Option<Duration> = Some(Duration::from_secs(10));

    async fn read(
        svc: impl tower::Service<http::Request<()>, Response = http::Response<Body<Frames>>, Error = BoxError>,
        uri: &str,
    ) -> Result<Bytes, String> {
        let response = svc.oneshot(get(uri)).await.map_err(|e| e.to_string())?;
        let body = response.into_body().collect().await.map_err(|e| e.to_string())?;
        Ok(body.to_bytes())
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_with_no_answer_fails_naming_itself_and_is_counted() {
        let metrics = crate::metrics::Metrics::new();
        let layer = ApiTimeoutLayer::new(BOUND).counting(metrics.api_timeouts.clone());
        let svc = layer.layer(server(Duration::from_secs(3600), Duration::ZERO));
        let err = read(svc, "/apis/volt.dev/v1alpha1/namespaces/a/workflowruns/r").await.expect_err("no answer");
        assert_eq!(
            err,
            "GET /apis/volt.dev/v1alpha1/namespaces/a/workflowruns/r: the API server did not answer within 10s"
        );
        assert_eq!(metrics.api_timeouts.with_label_values(&["get_or_list"]).get(), 1);
        assert_eq!(metrics.api_timeouts.with_label_values(&["patch"]).get(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_stops_fails() {
        let svc = ApiTimeoutLayer::new(BOUND).layer(server(Duration::ZERO, Duration::from_secs(3600)));
        let err = read(svc, "/api/v1/namespaces/a/pods").await.expect_err("a stalled body");
        assert!(err.contains("timed out") || err.contains("timeout"), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn slow_answers_within_the_bound_and_watches_pass() {
        let slow = server(Duration::from_secs(9), Duration::from_secs(9));
        let svc = ApiTimeoutLayer::new(BOUND).layer(slow);
        assert_eq!(read(svc, "/api/v1/pods").await, Ok(Bytes::from_static(b"{}")));
        // A quiet watch (an hour to the first event) and a followed log are not cut.
        for uri in ["/api/v1/pods?watch=true&resourceVersion=1", "/api/v1/namespaces/a/pods/p/log?follow=true"] {
            let quiet = server(Duration::ZERO, Duration::from_secs(3600));
            let svc = ApiTimeoutLayer::new(BOUND).layer(quiet);
            assert_eq!(read(svc, uri).await, Ok(Bytes::from_static(b"{}")), "{uri}");
        }
        // Off: nothing is bounded.
        let svc = ApiTimeoutLayer::new(None).layer(server(Duration::from_secs(3600), Duration::ZERO));
        assert_eq!(read(svc, "/api/v1/pods").await, Ok(Bytes::from_static(b"{}")));
    }
}
