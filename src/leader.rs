//! Leader election with a `coordination.k8s.io/v1` Lease (through `kube-lease-manager`): of the
//! replicas that share a Lease, only the one holding it runs the controllers.
//!
//! - Every replica serves `/healthz`, `/readyz` and `/metrics`. Followers keep no caches: they
//!   start the controllers, and so list and watch, when they take over. So a follower is Ready
//!   while the API server answers it (it reads the Lease every [`FOLLOWER_CHECK`],
//!   [`Health::api_reachable`]), the leader once its caches have synced: a Deployment of two
//!   replicas finishes its rollouts. Leadership is in `/api/v1/stats` and `volt_leader`.
//! - The leader renews the Lease `grace` seconds before it expires. A follower takes an expired
//!   Lease, so a leader that dies is replaced within the lease duration (plus up to a second).
//! - When a renewal fails, the leader keeps trying and checks the Lease; if it has not renewed
//!   it within `grace` seconds it can no longer be sure it holds the Lease, and steps down.
//! - Losing the Lease (another holder, or that failed renewal) stops the controllers and ends
//!   [`run`] with [`LeaderError::Lost`]: the process exits and Kubernetes restarts it as a
//!   follower, so nothing of the old term (in-process tasks, queued writes) outlives it.
//! - On shutdown (SIGTERM) the leader stops its controllers and releases the Lease, so another
//!   replica takes over at once instead of after the lease duration.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::Timestamp;
use kube::{Api, Client};
use kube_lease_manager::{LeaseManager, LeaseManagerBuilder, LeaseManagerError, LeaseParams};
use prometheus::IntGauge;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::RunArgs;
use crate::controllers::Health;
use crate::metrics::Metrics;

/// How long the controllers get to stop once the leader steps down or shuts down.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long releasing the Lease on shutdown may take.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a leader whose renewal failed tries again and checks the Lease.
const RECHECK: Duration = Duration::from_millis(500);
/// Back-off between attempts after an API error, doubling up to this.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Attempts to read or create the Lease at startup before giving up.
const START_ATTEMPTS: u32 = 5;
/// How often a follower checks that the API server answers (its readiness).
pub const FOLLOWER_CHECK: Duration = Duration::from_secs(5);
/// How long that check may take.
const FOLLOWER_CHECK_TIMEOUT: Duration = Duration::from_secs(3);
/// The pod's namespace, when running in a pod.
const SERVICE_ACCOUNT_NAMESPACE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

/// Errors of leader election; each names the flag or the Lease it is about.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error(
        "--lease-duration ({duration}s) and --lease-grace ({grace}s) must be more than 0, \
         and the grace shorter than the duration"
    )]
    Durations { duration: u64, grace: u64 },
    #[error("--lease-name must not be empty")]
    EmptyName,
    #[error("leader-election Lease {namespace}/{name} (--lease-namespace, --lease-name): {source}")]
    Lease {
        namespace: String,
        name: String,
        #[source]
        source: LeaseManagerError,
    },
    #[error("lost the leader-election Lease {namespace}/{name}: {reason}; stopped reconciling")]
    Lost { namespace: String, name: String, reason: String },
}

/// What `/api/v1/stats` says about this replica's candidacy.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Candidate {
    /// `<namespace>/<name>` of the Lease.
    pub lease: String,
    /// This replica's holder identity.
    pub identity: String,
}

/// Where the Lease is and who this replica is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// `--lease-name`.
    pub lease_name: String,
    /// `--lease-namespace`, else the pod's namespace (`POD_NAMESPACE` or the service account's),
    /// else `default`.
    pub namespace: String,
    /// The holder identity: the pod name (`POD_NAME`, else the host name) and a random suffix,
    /// so a restarted process is a new candidate.
    pub identity: String,
    /// `--lease-duration`, seconds.
    pub duration: u64,
    /// `--lease-grace`, seconds.
    pub grace: u64,
}

impl Settings {
    /// The settings of `run`'s flags, checked.
    pub fn from_args(args: &RunArgs) -> Result<Self, LeaderError> {
        let (duration, grace) = (args.lease_duration, args.lease_grace);
        if duration == 0 || grace == 0 || grace >= duration {
            return Err(LeaderError::Durations { duration, grace });
        }
        if args.lease_name.trim().is_empty() {
            return Err(LeaderError::EmptyName);
        }
        Ok(Self {
            lease_name: args.lease_name.clone(),
            namespace: lease_namespace(args.lease_namespace.as_deref()),
            identity: identity(),
            duration,
            grace,
        })
    }

    fn lease_error(&self, source: LeaseManagerError) -> LeaderError {
        LeaderError::Lease { namespace: self.namespace.clone(), name: self.lease_name.clone(), source }
    }

    fn lost(&self, reason: String) -> LeaderError {
        LeaderError::Lost { namespace: self.namespace.clone(), name: self.lease_name.clone(), reason }
    }
}

fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok().map(|v| v.trim().to_string()).filter(|v| !v.is_empty())
}

fn lease_namespace(flag: Option<&str>) -> String {
    flag.map(str::trim)
        .filter(|ns| !ns.is_empty())
        .map(str::to_string)
        .or_else(|| env_var("POD_NAMESPACE"))
        .or_else(|| {
            std::fs::read_to_string(SERVICE_ACCOUNT_NAMESPACE)
                .ok()
                .map(|ns| ns.trim().to_string())
                .filter(|ns| !ns.is_empty())
        })
        .unwrap_or_else(|| "default".to_string())
}

fn identity() -> String {
    let base = env_var("POD_NAME")
        .or_else(|| env_var("HOSTNAME"))
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok().map(|h| h.trim().to_string()))
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "volt-operator".to_string());
    format!("{base}_{:08x}", rand::random::<u32>())
}

/// Campaigns for the Lease and runs `work` while this replica holds it; `work` gets a token
/// that is cancelled when the replica steps down or shuts down.
///
/// Returns `Ok` after `shutdown` (or when `work` ends by itself), having released the Lease if
/// it held it, and [`LeaderError::Lost`] when it lost the Lease: the controllers have stopped,
/// and the caller should exit so that the process comes back as a follower.
pub async fn run<Fut>(
    client: Client,
    settings: Settings,
    health: Arc<Health>,
    metrics: &Metrics,
    shutdown: CancellationToken,
    work: impl FnOnce(CancellationToken) -> Fut,
) -> Result<(), LeaderError>
where
    Fut: Future<Output = ()> + Send + 'static,
{
    health.leader.store(false, Ordering::Relaxed);
    let _ = health.election.set(Candidate {
        lease: format!("{}/{}", settings.namespace, settings.lease_name),
        identity: settings.identity.clone(),
    });
    let gauge = leader_gauge(metrics);
    let Some(manager) = start_manager(&client, &settings, &shutdown).await? else {
        return Ok(());
    };
    // The manager has read (or created) the Lease: the API server answers.
    health.api_reachable.store(true, Ordering::Relaxed);
    info!(
        lease = %settings.lease_name,
        namespace = %settings.namespace,
        identity = %settings.identity,
        duration_seconds = settings.duration,
        "campaigning for the leader-election Lease"
    );
    let leases: Api<Lease> = Api::namespaced(client, &settings.namespace);
    let grace = Duration::from_secs(settings.grace);
    let mut work = Some(work);
    let mut term: Option<Term> = None;
    let mut leader = false;
    // Set while a renewal has failed: when (monotonic), and when (wall clock, to compare with
    // the Lease's renewTime).
    let mut renewal_failed: Option<(Instant, Timestamp)> = None;
    let mut backoff = Backoff::default();

    let end = loop {
        let event = {
            let changed = manager.changed();
            tokio::pin!(changed);
            loop {
                let rechecking = renewal_failed.is_some();
                tokio::select! {
                    _ = shutdown.cancelled() => break Event::Shutdown,
                    result = &mut changed => break Event::Changed(result),
                    _ = finished(&mut term) => break Event::WorkEnded,
                    _ = follower_tick(leader) => check_api(&leases, &settings, &health).await,
                    _ = tick(rechecking) => {
                        if let Some((since, at)) = renewal_failed {
                            if renewed_since(&leases, &settings, at).await {
                                info!(lease = %settings.lease_name, "renewed the Lease again");
                                renewal_failed = None;
                            } else if since.elapsed() >= grace {
                                break Event::Lost(format!("no renewal within {}s of a failed one", settings.grace));
                            }
                        }
                    }
                }
            }
        };
        match event {
            Event::Shutdown => break End::Shutdown,
            Event::WorkEnded => {
                term = None;
                break End::WorkEnded;
            }
            Event::Lost(reason) => break End::Lost(reason),
            Event::Changed(Ok(true)) => {
                backoff = Backoff::default();
                renewal_failed = None;
                if let Some(work) = work.take() {
                    info!(lease = %settings.lease_name, identity = %settings.identity, "became the leader; starting the controllers");
                    leader = true;
                    health.leader.store(true, Ordering::Relaxed);
                    if let Some(g) = &gauge {
                        g.set(1);
                    }
                    let token = shutdown.child_token();
                    let handle = tokio::spawn(work(token.clone()));
                    term = Some(Term { token, handle });
                }
            }
            Event::Changed(Ok(false)) => {
                if leader {
                    break End::Lost("another replica holds it".to_string());
                }
            }
            Event::Changed(Err(e)) if leader => {
                let (since, _) = *renewal_failed.get_or_insert_with(|| (Instant::now(), Timestamp::now()));
                warn!(lease = %settings.lease_name, error = %e, "renewing the Lease failed");
                if since.elapsed() >= grace {
                    break End::Lost(format!("renewing it failed for {}s: {e}", settings.grace));
                }
                tokio::select! {
                    _ = shutdown.cancelled() => break End::Shutdown,
                    _ = tokio::time::sleep(RECHECK) => {}
                }
            }
            Event::Changed(Err(e)) => {
                health.api_reachable.store(false, Ordering::Relaxed);
                let wait = backoff.next();
                warn!(lease = %settings.lease_name, error = %e, retry_in = ?wait, "reading the Lease failed");
                tokio::select! {
                    _ = shutdown.cancelled() => break End::Shutdown,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    };

    health.leader.store(false, Ordering::Relaxed);
    if let Some(g) = &gauge {
        g.set(0);
    }
    if let Some(term) = term.take() {
        term.stop().await;
    }
    match end {
        End::Lost(reason) => {
            let err = settings.lost(reason);
            warn!(error = %err, "stepped down");
            Err(err)
        }
        End::Shutdown | End::WorkEnded => {
            if leader {
                match tokio::time::timeout(RELEASE_TIMEOUT, manager.release()).await {
                    Ok(Ok(())) => info!(lease = %settings.lease_name, "released the Lease"),
                    Ok(Err(e)) => warn!(lease = %settings.lease_name, error = %e, "releasing the Lease failed"),
                    Err(_) => warn!(lease = %settings.lease_name, "releasing the Lease timed out"),
                }
            }
            Ok(())
        }
    }
}

enum Event {
    Shutdown,
    WorkEnded,
    Lost(String),
    Changed(Result<bool, LeaseManagerError>),
}

enum End {
    Shutdown,
    WorkEnded,
    Lost(String),
}

/// The controllers of one term of leadership.
struct Term {
    token: CancellationToken,
    handle: JoinHandle<()>,
}

impl Term {
    async fn stop(mut self) {
        self.token.cancel();
        if tokio::time::timeout(STOP_TIMEOUT, &mut self.handle).await.is_err() {
            warn!("the controllers did not stop within {STOP_TIMEOUT:?}; aborting them");
            self.handle.abort();
        }
    }
}

/// Resolves when the term's controllers have ended; never without a term.
async fn finished(term: &mut Option<Term>) {
    match term {
        Some(term) => {
            let _ = (&mut term.handle).await;
        }
        None => std::future::pending().await,
    }
}

/// Resolves every [`FOLLOWER_CHECK`] while this replica follows; never on the leader.
async fn follower_tick(leader: bool) {
    if leader { std::future::pending().await } else { tokio::time::sleep(FOLLOWER_CHECK).await }
}

/// A follower's readiness: whether the API server answers a read of the Lease.
async fn check_api(leases: &Api<Lease>, settings: &Settings, health: &Health) {
    let answered =
        matches!(tokio::time::timeout(FOLLOWER_CHECK_TIMEOUT, leases.get_opt(&settings.lease_name)).await, Ok(Ok(_)));
    let before = health.api_reachable.swap(answered, Ordering::Relaxed);
    if before != answered {
        if answered {
            info!(lease = %settings.lease_name, "the API server answers again; Ready as a follower");
        } else {
            warn!(lease = %settings.lease_name, "the API server does not answer; not Ready until it does");
        }
    }
}

async fn tick(active: bool) {
    if active { tokio::time::sleep(RECHECK).await } else { std::future::pending().await }
}

/// Whether the Lease shows this replica as holder with a renewal at or after `at`.
async fn renewed_since(leases: &Api<Lease>, settings: &Settings, at: Timestamp) -> bool {
    let Ok(Ok(lease)) = tokio::time::timeout(RECHECK, leases.get(&settings.lease_name)).await else {
        return false;
    };
    let spec = lease.spec.unwrap_or_default();
    spec.holder_identity.as_deref() == Some(settings.identity.as_str())
        && spec.renew_time.is_some_and(|t| t.0.as_microsecond() >= at.as_microsecond())
}

/// Builds the manager, which reads the Lease or creates it; `None` on shutdown.
async fn start_manager(
    client: &Client,
    settings: &Settings,
    shutdown: &CancellationToken,
) -> Result<Option<LeaseManager>, LeaderError> {
    let mut backoff = Backoff::default();
    for attempt in 1..=START_ATTEMPTS {
        let built = LeaseManagerBuilder::new(client.clone(), &settings.lease_name)
            .with_namespace(&settings.namespace)
            .with_parameters(LeaseParams::new(&settings.identity, settings.duration, settings.grace))
            .build();
        let result = tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            result = built => result,
        };
        match result {
            Ok(manager) => return Ok(Some(manager)),
            Err(e) if attempt < START_ATTEMPTS && transient(&e) => {
                let wait = backoff.next();
                warn!(lease = %settings.lease_name, namespace = %settings.namespace, error = %e, retry_in = ?wait,
                      "reading or creating the Lease failed");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(None),
                    _ = tokio::time::sleep(wait) => {}
                }
            }
            Err(e) => return Err(settings.lease_error(e)),
        }
    }
    Err(settings.lease_error(LeaseManagerError::InconsistentState("no attempt was made".to_string())))
}

/// Whether trying again may help: not for a refusal (RBAC, a missing namespace, a bad name).
fn transient(e: &LeaseManagerError) -> bool {
    match e {
        LeaseManagerError::KubeError(kube::Error::Api(status)) => !matches!(status.code, 400 | 401 | 403 | 404 | 422),
        LeaseManagerError::KubeError(_) => true,
        _ => false,
    }
}

/// `volt_leader`: 1 while this replica holds the Lease. `None` when it cannot be registered
/// (already registered by an earlier run in this process).
fn leader_gauge(metrics: &Metrics) -> Option<IntGauge> {
    let gauge = IntGauge::new("volt_leader", "1 while this replica holds the leader-election Lease, else 0.").ok()?;
    metrics.registry.register(Box::new(gauge.clone())).ok()?;
    Some(gauge)
}

/// Doubling back-off from half a second up to [`MAX_BACKOFF`].
struct Backoff(Duration);

impl Default for Backoff {
    fn default() -> Self {
        Self(Duration::from_millis(500))
    }
}

impl Backoff {
    fn next(&mut self) -> Duration {
        let now = self.0;
        self.0 = (self.0 * 2).min(MAX_BACKOFF);
        now
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> RunArgs {
        let mut argv = vec!["volt-operator"];
        argv.extend_from_slice(extra);
        RunArgs::try_parse_from(argv).unwrap_or_else(|e| panic!("run flags parse: {e}"))
    }

    #[test]
    fn settings_come_from_the_flags() {
        let s = Settings::from_args(&args(&[
            "--lease-namespace",
            "ops",
            "--lease-name",
            "volt",
            "--lease-duration",
            "6",
            "--lease-grace",
            "2",
        ]))
        .expect("valid");
        assert_eq!((s.namespace.as_str(), s.lease_name.as_str(), s.duration, s.grace), ("ops", "volt", 6, 2));
        let other = Settings::from_args(&args(&["--lease-namespace", "ops"])).expect("valid");
        assert_eq!((other.lease_name.as_str(), other.duration, other.grace), ("volt-operator", 15, 5));
        assert_ne!(s.identity, other.identity, "every process is a new candidate");
    }

    #[test]
    fn bad_durations_name_the_flags() {
        for bad in [["--lease-duration", "5"], ["--lease-grace", "0"], ["--lease-grace", "20"]] {
            let err = Settings::from_args(&args(&bad)).expect_err("invalid");
            let text = err.to_string();
            assert!(text.contains("--lease-duration") && text.contains("--lease-grace"), "{text}");
        }
        let err = Settings::from_args(&args(&["--lease-name", " "])).expect_err("invalid");
        assert!(err.to_string().contains("--lease-name"), "{err}");
    }

    #[test]
    fn back_off_doubles_up_to_the_maximum() {
        let mut b = Backoff::default();
        let waits: Vec<u128> = (0..6).map(|_| b.next().as_millis()).collect();
        assert_eq!(waits, vec![500, 1000, 2000, 4000, 5000, 5000]);
    }
}
