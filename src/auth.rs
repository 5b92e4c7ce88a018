//! Who calls the operator's HTTP API and what they may see, the Kubernetes way: the caller
//! presents a bearer token (`Authorization: Bearer ...`, a ServiceAccount token or any token
//! the cluster accepts), which a `TokenReview` turns into a user; every read or action is then
//! a `SubjectAccessReview` for that user, so a caller sees what `kubectl` would show them.
//!
//! Both answers are cached for a short while ([`TOKEN_TTL`], [`DECISION_TTL`]), so a page that
//! polls or a stream that reconnects costs no API request per call; tokens are kept only as
//! their SHA-256. The caches are `moka` caches of at most [`CACHE_CAP`] entries each (a full
//! one evicts the entries least likely to be asked for again), and callers asking the same
//! question at once share one review.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{
    NonResourceAttributes, ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::Client;
use kube::api::{Api, PostParams};
use moka::Expiry;
use moka::future::Cache;
use sha2::{Digest, Sha256};

/// How long a reviewed token is trusted before it is reviewed again.
pub const TOKEN_TTL: Duration = Duration::from_secs(60);
/// How long a rejected token is remembered (so a wrong token does not cost a review per call).
pub const REJECTED_TTL: Duration = Duration::from_secs(5);
/// How long an access decision is reused.
pub const DECISION_TTL: Duration = Duration::from_secs(10);
/// Entries kept per cache; a full cache evicts (moka's TinyLFU: a flood of new tokens does
/// not push out the callers that keep coming back).
pub const CACHE_CAP: u64 = 4096;

/// A caller the cluster authenticated.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Caller {
    pub user: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    pub groups: Vec<String>,
    #[serde(skip)]
    pub extra: BTreeMap<String, Vec<String>>,
}

/// What a caller wants to do: a verb on a resource (in a namespace, or cluster-wide when
/// `namespace` is empty), or a verb on a URL path of the operator (non-resource).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Attributes {
    Resource { verb: String, group: String, resource: String, subresource: String, namespace: String, name: String },
    NonResource { verb: String, path: String },
}

impl Attributes {
    /// `verb` on the volt.dev `resource` (plural) in `namespace`, any name.
    pub fn volt(verb: &str, resource: &str, namespace: &str) -> Self {
        Attributes::Resource {
            verb: verb.into(),
            group: crate::api::GROUP.into(),
            resource: resource.into(),
            subresource: String::new(),
            namespace: namespace.into(),
            name: String::new(),
        }
    }

    /// `verb` on the non-resource URL `path` (granted by a ClusterRole's `nonResourceURLs`).
    pub fn path(verb: &str, path: &str) -> Self {
        Attributes::NonResource { verb: verb.into(), path: path.into() }
    }
}

impl std::fmt::Display for Attributes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Attributes::Resource { verb, group, resource, subresource, namespace, name } => {
                write!(f, "{verb} {resource}")?;
                if !subresource.is_empty() {
                    write!(f, "/{subresource}")?;
                }
                if !group.is_empty() {
                    write!(f, ".{group}")?;
                }
                if !name.is_empty() {
                    write!(f, " {name:?}")?;
                }
                if namespace.is_empty() {
                    write!(f, " at the cluster scope")
                } else {
                    write!(f, " in namespace {namespace:?}")
                }
            }
            Attributes::NonResource { verb, path } => write!(f, "{verb} {path}"),
        }
    }
}

/// Why a request is not served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no bearer token: send `Authorization: Bearer <token>` (for example `kubectl create token NAME`)")]
    NoToken,
    #[error("the cluster does not accept this token{}", if .0.is_empty() { String::new() } else { format!(": {}", .0) })]
    InvalidToken(String),
    #[error("{user:?} may not {attributes}")]
    Forbidden { user: String, attributes: String },
    #[error("cannot check the caller with the cluster: {0}")]
    Unavailable(String),
}

/// The two reviews, against the cluster ([`KubeReviewer`]) or a stand-in in tests.
pub trait Reviewer: Send + Sync {
    /// The user a token belongs to; `Ok(Err(why))` when the cluster does not accept it.
    fn review_token<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Result<Caller, String>, AuthError>>;
    /// Whether `caller` may do `attributes`.
    fn review_access<'a>(
        &'a self,
        caller: &'a Caller,
        attributes: &'a Attributes,
    ) -> BoxFuture<'a, Result<bool, AuthError>>;
}

/// `TokenReview` and `SubjectAccessReview` with the operator's client (the chart binds
/// `system:auth-delegator` for them).
pub struct KubeReviewer {
    client: Client,
}

impl KubeReviewer {
    pub fn new(client: Client) -> Self {
        Self { client }
    }
}

impl Reviewer for KubeReviewer {
    fn review_token<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Result<Caller, String>, AuthError>> {
        Box::pin(async move {
            let review = TokenReview {
                spec: TokenReviewSpec { token: token.to_string(), audiences: None },
                ..Default::default()
            };
            let api: Api<TokenReview> = Api::all(self.client.clone());
            let reviewed = api
                .create(&PostParams::default(), &review)
                .await
                .map_err(|e| AuthError::Unavailable(format!("TokenReview: {e}")))?;
            let status = reviewed.status.unwrap_or_default();
            if status.authenticated != Some(true) {
                return Ok(Err(status.error.unwrap_or_default()));
            }
            let user = status.user.unwrap_or_default();
            match user.username {
                Some(name) if !name.is_empty() => Ok(Ok(Caller {
                    user: name,
                    uid: user.uid,
                    groups: user.groups.unwrap_or_default(),
                    extra: user.extra.unwrap_or_default(),
                })),
                _ => Ok(Err("the token names no user".into())),
            }
        })
    }

    fn review_access<'a>(
        &'a self,
        caller: &'a Caller,
        attributes: &'a Attributes,
    ) -> BoxFuture<'a, Result<bool, AuthError>> {
        Box::pin(async move {
            let mut spec = SubjectAccessReviewSpec {
                user: Some(caller.user.clone()),
                uid: caller.uid.clone(),
                groups: Some(caller.groups.clone()),
                extra: (!caller.extra.is_empty()).then(|| caller.extra.clone()),
                ..Default::default()
            };
            match attributes {
                Attributes::Resource { verb, group, resource, subresource, namespace, name } => {
                    let opt = |s: &String| (!s.is_empty()).then(|| s.clone());
                    spec.resource_attributes = Some(ResourceAttributes {
                        verb: Some(verb.clone()),
                        group: Some(group.clone()),
                        resource: Some(resource.clone()),
                        subresource: opt(subresource),
                        namespace: opt(namespace),
                        name: opt(name),
                        ..Default::default()
                    });
                }
                Attributes::NonResource { verb, path } => {
                    spec.non_resource_attributes =
                        Some(NonResourceAttributes { verb: Some(verb.clone()), path: Some(path.clone()) });
                }
            }
            let review = SubjectAccessReview { spec, ..Default::default() };
            let api: Api<SubjectAccessReview> = Api::all(self.client.clone());
            let reviewed = api
                .create(&PostParams::default(), &review)
                .await
                .map_err(|e| AuthError::Unavailable(format!("SubjectAccessReview: {e}")))?;
            Ok(reviewed.status.is_some_and(|s| s.allowed && s.denied != Some(true)))
        })
    }
}

/// How long the caches of [`Access`] keep answers, and how many they keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheLimits {
    /// A token the cluster accepted.
    pub token: Duration,
    /// A token the cluster rejected.
    pub rejected: Duration,
    /// An access decision.
    pub decision: Duration,
    /// Entries per cache.
    pub capacity: u64,
}

impl Default for CacheLimits {
    fn default() -> Self {
        Self { token: TOKEN_TTL, rejected: REJECTED_TTL, decision: DECISION_TTL, capacity: CACHE_CAP }
    }
}

/// A reviewed token lives [`CacheLimits::token`] when accepted, [`CacheLimits::rejected`] when not.
struct TokenExpiry {
    accepted: Duration,
    rejected: Duration,
}

impl Expiry<[u8; 32], Result<Caller, String>> for TokenExpiry {
    fn expire_after_create(
        &self,
        _key: &[u8; 32],
        answer: &Result<Caller, String>,
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(if answer.is_ok() { self.accepted } else { self.rejected })
    }
}

/// Authentication and authorization of HTTP callers, with the reviews' answers cached.
pub struct Access {
    reviewer: Arc<dyn Reviewer>,
    tokens: Cache<[u8; 32], Result<Caller, String>>,
    decisions: Cache<(String, Attributes), bool>,
    reviews: std::sync::atomic::AtomicU64,
}

impl Access {
    pub fn new(reviewer: Arc<dyn Reviewer>) -> Self {
        Self::with_limits(reviewer, CacheLimits::default())
    }

    /// With other cache lifetimes and sizes than the defaults (tests).
    pub fn with_limits(reviewer: Arc<dyn Reviewer>, limits: CacheLimits) -> Self {
        let tokens = Cache::builder()
            .max_capacity(limits.capacity)
            .expire_after(TokenExpiry { accepted: limits.token, rejected: limits.rejected })
            .build();
        let decisions = Cache::builder().max_capacity(limits.capacity).time_to_live(limits.decision).build();
        Self { reviewer, tokens, decisions, reviews: Default::default() }
    }

    /// Reviews with the operator's Kubernetes client.
    pub fn kube(client: Client) -> Self {
        Self::new(Arc::new(KubeReviewer::new(client)))
    }

    /// Reviews sent to the cluster so far (tests and figures: cached answers send none).
    pub fn reviews_sent(&self) -> u64 {
        self.reviews.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The caller whose `Authorization` header value is `authorization` (`Bearer <token>`).
    pub async fn authenticate(&self, authorization: Option<&str>) -> Result<Caller, AuthError> {
        let token = authorization.and_then(bearer_token).ok_or(AuthError::NoToken)?;
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let review = async {
            self.reviews.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.reviewer.review_token(token).await
        };
        // An unavailable cluster is not an answer: it is returned, not cached.
        let answer = self.tokens.try_get_with(key, review).await.map_err(|e| (*e).clone())?;
        answer.map_err(AuthError::InvalidToken)
    }

    /// Whether `caller` may do `attributes`.
    pub async fn allowed(&self, caller: &Caller, attributes: &Attributes) -> Result<bool, AuthError> {
        let key = (decision_key(caller), attributes.clone());
        let review = async {
            self.reviews.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.reviewer.review_access(caller, attributes).await
        };
        self.decisions.try_get_with(key, review).await.map_err(|e| (*e).clone())
    }

    /// `Ok` when `caller` may do `attributes`, else [`AuthError::Forbidden`] naming them.
    pub async fn require(&self, caller: &Caller, attributes: &Attributes) -> Result<(), AuthError> {
        if self.allowed(caller, attributes).await? {
            Ok(())
        } else {
            Err(AuthError::Forbidden { user: caller.user.clone(), attributes: attributes.to_string() })
        }
    }
}

/// The token of an `Authorization: Bearer <token>` value (the scheme in any case).
pub fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Decisions depend on the user and groups (and extra) the token stood for.
fn decision_key(caller: &Caller) -> String {
    format!("{}\u{0}{}\u{0}{:?}", caller.user, caller.groups.join(","), caller.extra)
}

#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// Tokens `t-<user>` are accepted; `<user>` may do what `rights` lists for them.
    pub struct Fake {
        pub rights: Vec<(String, Attributes)>,
        pub down: bool,
    }

    impl Reviewer for Fake {
        fn review_token<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Result<Caller, String>, AuthError>> {
            Box::pin(async move {
                if self.down {
                    return Err(AuthError::Unavailable("connection refused".into()));
                }
                Ok(match token.strip_prefix("t-") {
                    Some(user) => {
                        Ok(Caller { user: user.into(), uid: None, groups: vec![], extra: Default::default() })
                    }
                    None => Err("invalid bearer token".into()),
                })
            })
        }

        fn review_access<'a>(
            &'a self,
            caller: &'a Caller,
            attributes: &'a Attributes,
        ) -> BoxFuture<'a, Result<bool, AuthError>> {
            Box::pin(async move { Ok(self.rights.iter().any(|(u, a)| *u == caller.user && a == attributes)) })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::Fake;
    use super::*;

    fn access(rights: Vec<(String, Attributes)>) -> Access {
        Access::new(Arc::new(Fake { rights, down: false }))
    }

    #[test]
    fn bearer_tokens_are_read_from_the_header() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer  abc "), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer "), None);
        assert_eq!(bearer_token("abc"), None);
    }

    #[tokio::test]
    async fn tokens_are_reviewed_once_and_rejections_named() {
        let a = access(vec![]);
        assert_eq!(a.authenticate(None).await, Err(AuthError::NoToken));
        assert_eq!(a.authenticate(Some("Basic x")).await, Err(AuthError::NoToken));
        let alice = a.authenticate(Some("Bearer t-alice")).await.expect("alice");
        assert_eq!(alice.user, "alice");
        a.authenticate(Some("Bearer t-alice")).await.expect("alice again");
        assert_eq!(a.reviews_sent(), 1, "the second call comes from the cache");
        let err = a.authenticate(Some("Bearer nope")).await.expect_err("rejected");
        assert_eq!(err, AuthError::InvalidToken("invalid bearer token".into()));
        assert!(err.to_string().contains("does not accept this token"), "{err}");
        let _ = a.authenticate(Some("Bearer nope")).await;
        assert_eq!(a.reviews_sent(), 2, "rejections are cached too");
        let down = Access::new(Arc::new(Fake { rights: vec![], down: true }));
        assert!(matches!(down.authenticate(Some("Bearer t-x")).await, Err(AuthError::Unavailable(_))));
    }

    #[tokio::test]
    async fn decisions_follow_the_reviewer_and_are_cached() {
        let list_a = Attributes::volt("list", "workflowruns", "a");
        let a = access(vec![("alice".into(), list_a.clone())]);
        let alice = a.authenticate(Some("Bearer t-alice")).await.expect("alice");
        let bob = a.authenticate(Some("Bearer t-bob")).await.expect("bob");
        assert_eq!(a.require(&alice, &list_a).await, Ok(()));
        let err = a.require(&bob, &list_a).await.expect_err("bob may not");
        assert_eq!(err.to_string(), "\"bob\" may not list workflowruns.volt.dev in namespace \"a\"");
        assert!(!a.allowed(&alice, &Attributes::volt("list", "workflowruns", "b")).await.expect("answer"));
        let sent = a.reviews_sent();
        assert!(a.allowed(&alice, &list_a).await.expect("answer"));
        assert_eq!(a.reviews_sent(), sent, "cached");
        assert_eq!(Attributes::path("get", "/api/v1/stats").to_string(), "get /api/v1/stats");
    }

    fn limits(ttl: Duration, capacity: u64) -> CacheLimits {
        CacheLimits { token: ttl, rejected: ttl, decision: ttl, capacity }
    }

    #[tokio::test]
    async fn cached_answers_expire() {
        let list_a = Attributes::volt("list", "workflowruns", "a");
        let fake = Fake { rights: vec![("alice".into(), list_a.clone())], down: false };
        let a = Access::with_limits(Arc::new(fake), limits(Duration::from_millis(40), 16));
        let alice = a.authenticate(Some("Bearer t-alice")).await.expect("alice");
        let _ = a.authenticate(Some("Bearer nope")).await;
        assert!(a.allowed(&alice, &list_a).await.expect("answer"));
        // (That answers are reused within the TTL is the test above, with the real TTLs.)
        let sent = a.reviews_sent();
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(a.allowed(&alice, &list_a).await.expect("answer"));
        a.authenticate(Some("Bearer t-alice")).await.expect("alice");
        let _ = a.authenticate(Some("Bearer nope")).await;
        assert_eq!(a.reviews_sent(), sent + 3, "after the TTL each is reviewed again");
    }

    #[tokio::test]
    async fn a_full_cache_evicts_instead_of_emptying() {
        let a = Access::with_limits(Arc::new(Fake { rights: vec![], down: false }), limits(TOKEN_TTL, 2));
        let alice = a.authenticate(Some("Bearer t-alice")).await.expect("alice");
        let asked: Vec<Attributes> =
            ["a", "b", "c", "d", "e"].map(|ns| Attributes::volt("get", "workflowruns", ns)).into();
        for attributes in &asked {
            assert!(!a.allowed(&alice, attributes).await.expect("answer"));
            a.decisions.run_pending_tasks().await;
        }
        let kept = asked.iter().filter(|at| a.decisions.contains_key(&(decision_key(&alice), (*at).clone()))).count();
        assert_eq!(a.decisions.entry_count(), 2);
        assert_eq!(kept, 2, "two decisions are still cached: the cap evicts, it does not clear");
    }
}
