//! API keys of agents, read from Secrets. The key is held as an [`ApiKey`], whose `Debug` and
//! `Display` never show it, and no error here carries it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};
use tokio::time::Instant;

use crate::api::SecretKeyRef;

/// An API key. Shown as `[redacted]` in logs and errors.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    pub fn new(key: impl Into<String>) -> Self {
        Self(key.into())
    }

    /// The key itself, for the request header only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey([redacted])")
    }
}

impl std::fmt::Display for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Why an API key could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("Secret {name:?} not found in namespace {namespace:?}")]
    NotFound { namespace: String, name: String },
    #[error("Secret {name:?} in namespace {namespace:?} has no key {key:?}")]
    KeyMissing { namespace: String, name: String, key: String },
    #[error("key {key:?} of Secret {name:?} in namespace {namespace:?} is not UTF-8 text")]
    NotText { namespace: String, name: String, key: String },
    #[error("key {key:?} of Secret {name:?} in namespace {namespace:?} is empty")]
    Empty { namespace: String, name: String, key: String },
    #[error("reading Secret {name:?} in namespace {namespace:?} is forbidden: {message}")]
    Forbidden { namespace: String, name: String, message: String },
    #[error("reading Secret {name:?} in namespace {namespace:?}: {message}")]
    Api { namespace: String, name: String, message: String },
}

impl SecretError {
    /// Whether trying again later may help (an API hiccup), as opposed to a configuration
    /// error that needs a change.
    pub fn retryable(&self) -> bool {
        matches!(self, SecretError::Api { .. })
    }
}

/// Where API keys come from.
pub trait SecretSource: Send + Sync {
    /// The API key of agent `agent` of `namespace`, whose spec names `secret` (its
    /// `apiKeySecretRef`, if any). `Ok(None)`: call without a key.
    fn api_key<'a>(
        &'a self,
        namespace: &'a str,
        agent: &'a str,
        secret: Option<&'a SecretKeyRef>,
    ) -> BoxFuture<'a, Result<Option<ApiKey>, SecretError>>;

    /// Every key of Secret `name` of `namespace` (MCP server headers), values held as
    /// [`ApiKey`]s so they never show.
    fn secret_data<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<BTreeMap<String, ApiKey>, SecretError>>;
}

/// Turns the bytes of a Secret's key into an API key (trailing newlines, a common accident of
/// `kubectl create secret --from-file`, are dropped).
pub fn key_from_bytes(namespace: &str, secret: &SecretKeyRef, bytes: &[u8]) -> Result<ApiKey, SecretError> {
    let text = std::str::from_utf8(bytes).map_err(|_| SecretError::NotText {
        namespace: namespace.into(),
        name: secret.name.clone(),
        key: secret.key.clone(),
    })?;
    let text = text.trim();
    if text.is_empty() {
        return Err(SecretError::Empty {
            namespace: namespace.into(),
            name: secret.name.clone(),
            key: secret.key.clone(),
        });
    }
    Ok(ApiKey::new(text))
}

type CacheKey = (String, String, String);

/// Reads keys from Kubernetes Secrets, caching each for a short while so that calls do not
/// each cost an API request (a rotated key is picked up within the TTL).
pub struct KubeSecrets {
    client: Client,
    ttl: Duration,
    cache: Mutex<HashMap<CacheKey, (ApiKey, Instant)>>,
}

impl KubeSecrets {
    pub const DEFAULT_TTL: Duration = Duration::from_secs(30);

    pub fn new(client: Client) -> Self {
        Self::with_ttl(client, Self::DEFAULT_TTL)
    }

    pub fn with_ttl(client: Client, ttl: Duration) -> Self {
        Self { client, ttl, cache: Mutex::default() }
    }

    fn cached(&self, key: &CacheKey) -> Option<ApiKey> {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.get(key).filter(|(_, at)| at.elapsed() < self.ttl).map(|(k, _)| k.clone())
    }

    async fn fetch(&self, namespace: &str, secret: &SecretKeyRef) -> Result<ApiKey, SecretError> {
        let cache_key = (namespace.to_string(), secret.name.clone(), secret.key.clone());
        if let Some(key) = self.cached(&cache_key) {
            return Ok(key);
        }
        let api: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        let found = api.get_opt(&secret.name).await.map_err(|e| match e {
            kube::Error::Api(s) if s.code == 403 => {
                SecretError::Forbidden { namespace: namespace.into(), name: secret.name.clone(), message: s.message }
            }
            other => {
                SecretError::Api { namespace: namespace.into(), name: secret.name.clone(), message: other.to_string() }
            }
        })?;
        let Some(found) = found else {
            return Err(SecretError::NotFound { namespace: namespace.into(), name: secret.name.clone() });
        };
        let bytes = found.data.as_ref().and_then(|d| d.get(&secret.key)).map(|b| b.0.clone()).ok_or_else(|| {
            SecretError::KeyMissing { namespace: namespace.into(), name: secret.name.clone(), key: secret.key.clone() }
        })?;
        let key = key_from_bytes(namespace, secret, &bytes)?;
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.retain(|_, (_, at)| at.elapsed() < self.ttl);
        cache.insert(cache_key, (key.clone(), Instant::now()));
        Ok(key)
    }
}

impl SecretSource for KubeSecrets {
    fn api_key<'a>(
        &'a self,
        namespace: &'a str,
        _agent: &'a str,
        secret: Option<&'a SecretKeyRef>,
    ) -> BoxFuture<'a, Result<Option<ApiKey>, SecretError>> {
        Box::pin(async move {
            match secret {
                Some(secret) => self.fetch(namespace, secret).await.map(Some),
                None => Ok(None),
            }
        })
    }

    fn secret_data<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<BTreeMap<String, ApiKey>, SecretError>> {
        Box::pin(async move {
            let api: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
            let found = api.get_opt(name).await.map_err(|e| match e {
                kube::Error::Api(s) if s.code == 403 => {
                    SecretError::Forbidden { namespace: namespace.into(), name: name.into(), message: s.message }
                }
                other => {
                    SecretError::Api { namespace: namespace.into(), name: name.into(), message: other.to_string() }
                }
            })?;
            let Some(found) = found else {
                return Err(SecretError::NotFound { namespace: namespace.into(), name: name.into() });
            };
            let mut out = BTreeMap::new();
            for (key, bytes) in found.data.unwrap_or_default() {
                let r = SecretKeyRef { name: name.into(), key: key.clone() };
                out.insert(key, key_from_bytes(namespace, &r, &bytes.0)?);
            }
            Ok(out)
        })
    }
}

/// Keys given up front (local mode, tests, benchmarks): by agent, or by Secret key as an
/// `apiKeySecretRef` names it. A key given for an agent wins over its `apiKeySecretRef`.
#[derive(Default)]
pub struct StaticSecrets {
    secrets: HashMap<CacheKey, ApiKey>,
    agents: HashMap<(String, String), ApiKey>,
}

impl StaticSecrets {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the value of `key` in Secret `name` of `namespace`.
    pub fn with(mut self, namespace: &str, name: &str, key: &str, value: impl Into<String>) -> Self {
        self.secrets.insert((namespace.into(), name.into(), key.into()), ApiKey::new(value));
        self
    }

    /// Adds the key of agent `agent` of `namespace`, whatever its `apiKeySecretRef`.
    pub fn with_agent(mut self, namespace: &str, agent: &str, value: impl Into<String>) -> Self {
        self.agents.insert((namespace.into(), agent.into()), ApiKey::new(value));
        self
    }
}

impl SecretSource for StaticSecrets {
    fn api_key<'a>(
        &'a self,
        namespace: &'a str,
        agent: &'a str,
        secret: Option<&'a SecretKeyRef>,
    ) -> BoxFuture<'a, Result<Option<ApiKey>, SecretError>> {
        let result = match (self.agents.get(&(namespace.to_string(), agent.to_string())), secret) {
            (Some(key), _) => Ok(Some(key.clone())),
            (None, None) => Ok(None),
            (None, Some(secret)) => {
                match self.secrets.get(&(namespace.to_string(), secret.name.clone(), secret.key.clone())) {
                    Some(key) => Ok(Some(key.clone())),
                    None if self.secrets.keys().any(|(ns, name, _)| ns == namespace && *name == secret.name) => {
                        Err(SecretError::KeyMissing {
                            namespace: namespace.into(),
                            name: secret.name.clone(),
                            key: secret.key.clone(),
                        })
                    }
                    None => Err(SecretError::NotFound { namespace: namespace.into(), name: secret.name.clone() }),
                }
            }
        };
        Box::pin(std::future::ready(result))
    }

    fn secret_data<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<BTreeMap<String, ApiKey>, SecretError>> {
        let out: BTreeMap<String, ApiKey> = self
            .secrets
            .iter()
            .filter(|((ns, n, _), _)| ns == namespace && n == name)
            .map(|((_, _, k), v)| (k.clone(), v.clone()))
            .collect();
        let result = if out.is_empty() {
            Err(SecretError::NotFound { namespace: namespace.into(), name: name.into() })
        } else {
            Ok(out)
        };
        Box::pin(std::future::ready(result))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(name: &str, key: &str) -> SecretKeyRef {
        SecretKeyRef { name: name.into(), key: key.into() }
    }

    #[test]
    fn keys_never_show() {
        let k = ApiKey::new("sk-very-secret");
        assert_eq!(format!("{k:?} {k}"), "ApiKey([redacted]) [redacted]");
        assert_eq!(k.expose(), "sk-very-secret");
    }

    #[test]
    fn bytes_become_a_trimmed_key_or_a_clear_error() {
        assert_eq!(key_from_bytes("ns", &r("s", "k"), b"sk-1\n").map(|k| k.expose().to_string()), Ok("sk-1".into()));
        let err = key_from_bytes("ns", &r("s", "k"), b"\xff\xfe").expect_err("binary");
        assert_eq!(err.to_string(), r#"key "k" of Secret "s" in namespace "ns" is not UTF-8 text"#);
        assert!(matches!(key_from_bytes("ns", &r("s", "k"), b" \n"), Err(SecretError::Empty { .. })));
    }

    #[tokio::test]
    async fn static_secrets_name_what_is_missing() {
        let s = StaticSecrets::new().with("ns", "openai", "api-key", "sk-1").with_agent("ns", "local", "sk-2");
        let exposed = |k: Option<ApiKey>| k.map(|k| k.expose().to_string());
        assert_eq!(s.api_key("ns", "a", Some(&r("openai", "api-key"))).await.map(exposed), Ok(Some("sk-1".into())));
        assert_eq!(s.api_key("ns", "local", Some(&r("nope", "x"))).await.map(exposed), Ok(Some("sk-2".into())));
        assert_eq!(s.api_key("ns", "a", None).await, Ok(None));
        let err = s.api_key("ns", "a", Some(&r("openai", "other"))).await.expect_err("no such key");
        assert_eq!(err.to_string(), r#"Secret "openai" in namespace "ns" has no key "other""#);
        assert!(!err.retryable());
        let err = s.api_key("ns", "a", Some(&r("nope", "api-key"))).await.expect_err("no such secret");
        assert_eq!(err.to_string(), r#"Secret "nope" not found in namespace "ns""#);
    }
}
