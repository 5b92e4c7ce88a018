//! Shard Leases: which replica holds which shard.
//!
//! - Each replica keeps a membership Lease (`<lease-name>-member-<identity>`) and renews it with
//!   the shard Leases it holds (`<lease-name>-shard-<i>`), every half grace period. All of them
//!   are read from one label-selected watch: deciding costs no request.
//! - Fair share: the live replicas, sorted by identity, split the `N` shards as evenly as can
//!   be. A replica under its share takes free shards (never held, released, or expired); one
//!   over it (another replica joined) releases its extra shards: it stops their controllers,
//!   lets the status writer flush their runs, then clears the holder, so the joiner takes them
//!   at once.
//! - Expiry is judged by observation, as client-go does: a Lease whose resourceVersion has not
//!   changed for its duration since this replica first saw it has expired. So clocks need not
//!   agree, and a replica that dies is replaced within the lease duration of its last renewal.
//! - The fence: a replica acts on a shard until `sent + duration - grace`, where `sent` is when
//!   it sent its latest successful renewal. Another replica takes the shard no sooner than
//!   `duration` after it observed that renewal, which is later: the two never act at once, with
//!   `grace` to spare for the clocks' rates. A replica that cannot renew stops acting when the
//!   deadline passes, and its shards' in-process tasks are aborted.
//! - Replicas that disagree on `--shards` (a rolling update that changes it) take no new
//!   shards until they agree again; what each holds it keeps. Leases of shards beyond `N` that
//!   are still held block new acquisitions too, so two slot mappings never overlap.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use prometheus::{IntCounterVec, IntGauge, Opts};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{MAX_SHARDS, Ownership};
use crate::api::FIELD_MANAGER;
use crate::config::RunArgs;
use crate::controllers::Health;
use crate::kube_util::WatchBackoff;
use crate::leader::LeaderError;
use crate::metrics::Metrics;
use crate::naming;

/// How often held Leases' deadlines and others' expiry are checked (no request).
const CHECK: Duration = Duration::from_millis(250);
/// How long a shard's controllers get to stop and its statuses to be written before release.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Membership Leases expired this long are deleted by shard 0's holder (replicas killed).
const MEMBER_GC_AFTER: Duration = Duration::from_secs(300);

/// Errors of sharding's settings and start; each names its flag.
#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    #[error("--shards ({0}) must be between 1 and {MAX_SHARDS}")]
    Count(u32),
    #[error("--shards {0} and --leader-elect are exclusive: with shards every replica is active")]
    WithLeaderElect(u32),
    #[error(transparent)]
    Lease(#[from] LeaderError),
    #[error("shard Leases in namespace {namespace} (--lease-namespace): {source}")]
    Api {
        namespace: String,
        #[source]
        source: kube::Error,
    },
}

/// Where the Leases are and who this replica is.
#[derive(Debug, Clone)]
pub struct Settings {
    pub shards: u32,
    /// `--lease-name`: the prefix of the shard and member Leases.
    pub prefix: String,
    pub namespace: String,
    pub identity: String,
    pub duration: Duration,
    pub grace: Duration,
}

impl Settings {
    /// `None` without sharding (`--shards 1`).
    pub fn from_args(args: &RunArgs) -> Result<Option<Self>, ShardError> {
        if args.shards == 0 || args.shards > MAX_SHARDS {
            return Err(ShardError::Count(args.shards));
        }
        if args.shards == 1 {
            return Ok(None);
        }
        if args.leader_elect {
            return Err(ShardError::WithLeaderElect(args.shards));
        }
        let lease = crate::leader::Settings::from_args(args)?;
        Ok(Some(Self {
            shards: args.shards,
            prefix: lease.lease_name,
            namespace: lease.namespace,
            identity: lease.identity,
            duration: Duration::from_secs(lease.duration),
            grace: Duration::from_secs(lease.grace),
        }))
    }

    fn renew_every(&self) -> Duration {
        (self.grace / 2).max(Duration::from_millis(500))
    }
}

/// A shard Lease this replica holds.
struct Held {
    /// The resourceVersion of this replica's latest write.
    rv: String,
    deadline: Instant,
}

struct Coordinator {
    api: Api<Lease>,
    store: Store<Lease>,
    settings: Settings,
    ownership: Arc<Ownership>,
    health: Arc<Health>,
    gauges: Option<(IntGauge, IntCounterVec)>,
    held: BTreeMap<u32, Held>,
    /// Shards being released: their controllers are stopping.
    releasing: HashMap<u32, Instant>,
    /// Lease name -> (resourceVersion, when this replica first saw it).
    observed: HashMap<String, (String, Instant)>,
    over_since: Option<Instant>,
    next_renew: Instant,
}

/// Holds this replica's share of the shard Leases until `shutdown`, then stops the shards'
/// controllers, releases the Leases and deletes the membership Lease.
pub async fn run(
    client: Client,
    settings: Settings,
    ownership: Arc<Ownership>,
    health: Arc<Health>,
    metrics: &Metrics,
    shutdown: CancellationToken,
) -> Result<(), ShardError> {
    let api: Api<Lease> = Api::namespaced(client, &settings.namespace);
    let (store, writer) = reflector::store();
    let selector = format!("{}={}", naming::LABEL_LEASE_OF, naming::label_value(&settings.prefix));
    let watch = watcher(api.clone(), watcher::Config::default().labels(&selector))
        .backoff(WatchBackoff::default())
        .reflect(writer)
        .touched_objects()
        .for_each(|_| async {});
    let watch = tokio::spawn(watch);
    let mut c = Coordinator {
        api,
        store,
        gauges: gauges(metrics),
        ownership,
        health,
        held: BTreeMap::new(),
        releasing: HashMap::new(),
        observed: HashMap::new(),
        over_since: None,
        next_renew: Instant::now(),
        settings,
    };
    info!(
        shards = c.settings.shards,
        namespace = %c.settings.namespace,
        identity = %c.settings.identity,
        "joining the shard Leases"
    );
    // The membership Lease first: a refusal (RBAC, no namespace) is an error at start.
    if let Err(e) = c.renew_member().await
        && matches!(&e, kube::Error::Api(s) if matches!(s.code, 401 | 403 | 404 | 422))
    {
        watch.abort();
        return Err(ShardError::Api { namespace: c.settings.namespace.clone(), source: e });
    }
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = c.store.wait_until_ready() => {}
    }
    let mut tick = tokio::time::interval(CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !shutdown.is_cancelled() {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => c.step().await,
        }
    }
    c.leave().await;
    watch.abort();
    Ok(())
}

impl Coordinator {
    fn me(&self) -> &str {
        &self.settings.identity
    }

    async fn step(&mut self) {
        let now = Instant::now();
        if now >= self.next_renew {
            self.next_renew = now + self.settings.renew_every();
            // The shards first: their deadlines are the fence.
            let shards: Vec<u32> = self.held.keys().copied().collect();
            for shard in shards {
                self.renew(shard).await;
            }
            let member = self.renew_member().await;
            self.health.api_reachable.store(member.is_ok(), Ordering::Relaxed);
            if let Err(e) = member {
                warn!(error = %e, "renewing the membership Lease failed");
            }
        }
        // A held shard past its deadline: renewals failed for too long.
        let late: Vec<u32> = self.held.iter().filter(|(_, h)| Instant::now() >= h.deadline).map(|(s, _)| *s).collect();
        for shard in late {
            self.lose(shard, "no renewal before its deadline");
        }
        // One view of the Leases for the whole step.
        let leases = self.store.state();
        self.observe(&leases);
        let members = self.members(&leases);
        self.ownership.set_members(members.clone());
        self.finish_releases().await;
        if self.agreed(&leases, &members) {
            self.balance(&leases, &members).await;
        }
        self.collect_members(&leases).await;
        if let Some((owned, _)) = &self.gauges {
            owned.set(self.held.len() as i64);
        }
    }

    /// Notes each Lease's resourceVersion and when it was first seen.
    fn observe(&mut self, leases: &[Arc<Lease>]) {
        let now = Instant::now();
        let mut seen = HashMap::new();
        for lease in leases {
            let name = lease.name_any();
            let rv = lease.resource_version().unwrap_or_default();
            let at = match self.observed.get(&name) {
                Some((old, at)) if *old == rv => *at,
                _ => now,
            };
            seen.insert(name, (rv, at));
        }
        self.observed = seen;
    }

    /// Whether a Lease has a holder who renewed it within its duration, as observed.
    fn live(&self, lease: &Lease) -> bool {
        let spec = lease.spec.as_ref();
        let holder = spec.and_then(|s| s.holder_identity.as_deref()).unwrap_or_default();
        if holder.is_empty() {
            return false;
        }
        if holder == self.me() {
            return true;
        }
        let duration = spec
            .and_then(|s| s.lease_duration_seconds)
            .map_or(self.settings.duration, |s| Duration::from_secs(u64::try_from(s).unwrap_or(0)));
        self.observed.get(&lease.name_any()).is_none_or(|(_, at)| at.elapsed() < duration)
    }

    fn role(lease: &Lease) -> Option<&str> {
        lease.labels().get(naming::LABEL_LEASE_ROLE).map(String::as_str)
    }

    /// Live replicas (this one included), sorted by identity, with the `--shards` each declares.
    fn members(&self, leases: &[Arc<Lease>]) -> Vec<String> {
        let mut members: Vec<String> = leases
            .iter()
            .filter(|l| Self::role(l) == Some("member") && self.live(l))
            .filter_map(|l| l.spec.as_ref().and_then(|s| s.holder_identity.clone()))
            .collect();
        if !members.iter().any(|m| m == self.me()) {
            members.push(self.me().to_string());
        }
        members.sort();
        members.dedup();
        members
    }

    /// Whether every live replica runs with this `--shards`, and no Lease of a shard beyond it
    /// is held.
    fn agreed(&self, leases: &[Arc<Lease>], members: &[String]) -> bool {
        let n = self.settings.shards.to_string();
        let disagree = leases.iter().filter(|l| self.live(l)).find(|l| {
            let declared = l.annotations().get(naming::ANNOTATION_SHARDS).map(String::as_str);
            let holder = l.spec.as_ref().and_then(|s| s.holder_identity.as_deref()).unwrap_or_default();
            let beyond = Self::role(l) == Some("shard")
                && l.annotations()
                    .get(naming::ANNOTATION_SHARD)
                    .and_then(|s| s.parse::<u32>().ok())
                    .is_some_and(|s| s >= self.settings.shards);
            members.iter().any(|m| m == holder) && (declared != Some(n.as_str()) || beyond)
        });
        match disagree {
            Some(l) => {
                tracing::debug!(lease = %l.name_any(), "replicas disagree on --shards; taking no new shards");
                false
            }
            None => true,
        }
    }

    /// Releases what is over this replica's share; takes free shards while under it.
    async fn balance(&mut self, leases: &[Arc<Lease>], members: &[String]) {
        let n = self.settings.shards as usize;
        let rank = members.iter().position(|m| m == self.me()).unwrap_or(0);
        let share = share(n, members.len(), rank);
        let owned = self.held.len() - self.releasing.len();
        if owned > share {
            let since = *self.over_since.get_or_insert_with(Instant::now);
            // Over the share for two renewals: not a passing view of the membership.
            if since.elapsed() >= self.settings.renew_every() * 2
                && let Some(shard) = self.held.keys().rev().copied().find(|s| !self.releasing.contains_key(s))
            {
                info!(shard, share, "another replica joined; handing a shard over");
                self.releasing.insert(shard, Instant::now());
                self.ownership.unassign(shard);
                self.over_since = None;
            }
            return;
        }
        self.over_since = None;
        if owned >= share || !self.releasing.is_empty() {
            return;
        }
        let leases: HashMap<String, &Arc<Lease>> = leases.iter().map(|l| (l.name_any(), l)).collect();
        let mut wanted = share - owned;
        // Start at a different shard per replica, so that they do not all race for the same one.
        for i in 0..n {
            if wanted == 0 {
                break;
            }
            let shard = ((rank + i) % n) as u32;
            if self.held.contains_key(&shard) {
                continue;
            }
            let name = naming::shard_lease(&self.settings.prefix, shard);
            let taken = match leases.get(&name) {
                None => self.create_shard(shard, &name).await,
                Some(l) if !self.live(l) => self.take(shard, (***l).clone()).await,
                Some(_) => false,
            };
            if taken {
                wanted -= 1;
            }
        }
    }

    fn shard_meta(&self, shard: u32, name: &str) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(self.settings.namespace.clone()),
            labels: Some(self.labels("shard")),
            annotations: Some(
                [
                    (naming::ANNOTATION_SHARDS.to_string(), self.settings.shards.to_string()),
                    (naming::ANNOTATION_SHARD.to_string(), shard.to_string()),
                ]
                .into(),
            ),
            ..Default::default()
        }
    }

    fn labels(&self, role: &str) -> BTreeMap<String, String> {
        [
            (naming::LABEL_MANAGED_BY.to_string(), naming::MANAGED_BY.to_string()),
            (naming::LABEL_LEASE_OF.to_string(), naming::label_value(&self.settings.prefix)),
            (naming::LABEL_LEASE_ROLE.to_string(), role.to_string()),
        ]
        .into()
    }

    fn spec(&self, transitions: i32) -> LeaseSpec {
        let now = MicroTime(Timestamp::now());
        LeaseSpec {
            holder_identity: Some(self.me().to_string()),
            lease_duration_seconds: Some(i32::try_from(self.settings.duration.as_secs()).unwrap_or(i32::MAX)),
            acquire_time: Some(now.clone()),
            renew_time: Some(now),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    async fn create_shard(&mut self, shard: u32, name: &str) -> bool {
        let lease = Lease { metadata: self.shard_meta(shard, name), spec: Some(self.spec(0)) };
        let sent = Instant::now();
        match self.api.create(&PostParams::default(), &lease).await {
            Ok(created) => {
                self.acquired(shard, created, sent, "new");
                true
            }
            Err(kube::Error::Api(e)) if e.code == 409 => false,
            Err(e) => {
                warn!(shard, error = %e, "creating the shard Lease failed");
                false
            }
        }
    }

    /// Takes a released or expired shard Lease; the resourceVersion makes it a compare-and-swap.
    async fn take(&mut self, shard: u32, mut lease: Lease) -> bool {
        let before = lease.spec.clone().unwrap_or_default();
        let how = if before.holder_identity.as_deref().unwrap_or_default().is_empty() { "released" } else { "expired" };
        let meta = self.shard_meta(shard, &lease.name_any());
        lease.metadata.labels = meta.labels;
        lease.metadata.annotations = meta.annotations;
        lease.spec = Some(self.spec(before.lease_transitions.unwrap_or(0).saturating_add(1)));
        let sent = Instant::now();
        match self.api.replace(&lease.name_any(), &PostParams::default(), &lease).await {
            Ok(taken) => {
                if how == "expired" {
                    warn!(shard, previous = ?before.holder_identity, "took over an expired shard Lease");
                }
                self.acquired(shard, taken, sent, how);
                true
            }
            Err(kube::Error::Api(e)) if e.code == 409 => false,
            Err(e) => {
                warn!(shard, error = %e, "taking the shard Lease failed");
                false
            }
        }
    }

    fn acquired(&mut self, shard: u32, lease: Lease, sent: Instant, how: &str) {
        let deadline = self.deadline(sent);
        self.held.insert(shard, Held { rv: lease.resource_version().unwrap_or_default(), deadline });
        self.ownership.extend(shard, deadline);
        self.ownership.assign(shard);
        self.count("acquired");
        info!(shard, how, "acquired a shard; starting its controllers");
    }

    /// A Lease's spec as the watch last showed it.
    fn stored_spec(&self, name: &str) -> Option<LeaseSpec> {
        self.store.get(&reflector::ObjectRef::new(name).within(&self.settings.namespace)).and_then(|l| l.spec.clone())
    }

    fn deadline(&self, sent: Instant) -> Instant {
        sent + self.settings.duration.saturating_sub(self.settings.grace)
    }

    async fn renew(&mut self, shard: u32) {
        let Some(rv) = self.held.get(&shard).map(|h| h.rv.clone()) else { return };
        let name = naming::shard_lease(&self.settings.prefix, shard);
        let mut lease = Lease { metadata: self.shard_meta(shard, &name), spec: None };
        lease.metadata.resource_version = Some(rv);
        let mut spec = self.stored_spec(&name).unwrap_or_else(|| self.spec(0));
        spec.holder_identity = Some(self.me().to_string());
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        spec.lease_duration_seconds = Some(i32::try_from(self.settings.duration.as_secs()).unwrap_or(i32::MAX));
        lease.spec = Some(spec);
        let sent = Instant::now();
        match self.api.replace(&name, &PostParams::default(), &lease).await {
            Ok(renewed) => {
                let deadline = self.deadline(sent);
                // The answer came after the fence's deadline: the shard was paused meanwhile.
                if self.held.get(&shard).is_some_and(|h| Instant::now() >= h.deadline) {
                    warn!(shard, "a shard renewal came back after its deadline; the shard's work paused until then");
                    self.count("paused");
                }
                if let Some(h) = self.held.get_mut(&shard) {
                    h.rv = renewed.resource_version().unwrap_or_default();
                    h.deadline = deadline;
                }
                self.ownership.extend(shard, deadline);
            }
            Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => {
                // Someone else wrote it, or our last write's answer was lost: read who holds it.
                match self.api.get_opt(&name).await {
                    Ok(Some(l)) if l.spec.as_ref().and_then(|s| s.holder_identity.as_deref()) == Some(self.me()) => {
                        if let Some(h) = self.held.get_mut(&shard) {
                            h.rv = l.resource_version().unwrap_or_default();
                        }
                    }
                    Ok(_) => self.lose(shard, "another replica holds it"),
                    Err(e) => warn!(shard, error = %e, "reading the shard Lease failed"),
                }
            }
            Err(e) => warn!(shard, error = %e, "renewing the shard Lease failed"),
        }
    }

    /// Stops acting on a shard at once: its controllers stop and its in-process tasks end.
    fn lose(&mut self, shard: u32, reason: &str) {
        warn!(shard, reason, "lost a shard; stopping its controllers");
        self.held.remove(&shard);
        self.releasing.remove(&shard);
        self.ownership.revoke(shard);
        self.count("lost");
    }

    /// Clears the holder of shards whose controllers have stopped (or did not in time).
    async fn finish_releases(&mut self) {
        let ready: Vec<u32> = self
            .releasing
            .iter()
            .filter(|(s, since)| !self.ownership.is_running(**s) || since.elapsed() >= STOP_TIMEOUT)
            .map(|(s, _)| *s)
            .collect();
        for shard in ready {
            self.release(shard).await;
        }
    }

    async fn release(&mut self, shard: u32) {
        self.releasing.remove(&shard);
        let Some(held) = self.held.remove(&shard) else { return };
        self.ownership.revoke(shard);
        let name = naming::shard_lease(&self.settings.prefix, shard);
        let mut lease = Lease { metadata: self.shard_meta(shard, &name), spec: None };
        lease.metadata.resource_version = Some(held.rv);
        let mut spec = self.stored_spec(&name).unwrap_or_default();
        spec.holder_identity = None;
        spec.renew_time = None;
        spec.acquire_time = None;
        lease.spec = Some(spec);
        match tokio::time::timeout(Duration::from_secs(5), self.api.replace(&name, &PostParams::default(), &lease))
            .await
        {
            Ok(Ok(_)) => info!(shard, "released a shard"),
            Ok(Err(e)) => warn!(shard, error = %e, "releasing the shard Lease failed; it expires instead"),
            Err(_) => warn!(shard, "releasing the shard Lease timed out; it expires instead"),
        }
        self.count("released");
    }

    async fn renew_member(&self) -> Result<(), kube::Error> {
        let name = naming::member_lease(&self.settings.prefix, self.me());
        let now = MicroTime(Timestamp::now());
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(self.settings.namespace.clone()),
                labels: Some(self.labels("member")),
                annotations: Some([(naming::ANNOTATION_SHARDS.to_string(), self.settings.shards.to_string())].into()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(self.me().to_string()),
                lease_duration_seconds: Some(i32::try_from(self.settings.duration.as_secs()).unwrap_or(i32::MAX)),
                renew_time: Some(now),
                ..Default::default()
            }),
        };
        let mut value = serde_json::to_value(&lease).map_err(kube::Error::SerdeError)?;
        value["apiVersion"] = "coordination.k8s.io/v1".into();
        value["kind"] = "Lease".into();
        self.api.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&value)).await.map(|_| ())
    }

    /// Shard 0's holder deletes membership Leases of replicas gone for long (killed ones).
    async fn collect_members(&self, leases: &[Arc<Lease>]) {
        if !self.held.contains_key(&0) {
            return;
        }
        for lease in leases {
            if Self::role(lease) != Some("member") || self.live(lease) {
                continue;
            }
            let gone = self.observed.get(&lease.name_any()).is_some_and(|(_, at)| at.elapsed() >= MEMBER_GC_AFTER);
            if gone {
                let _ = self.api.delete(&lease.name_any(), &DeleteParams::default()).await;
            }
        }
    }

    /// On shutdown: stop every shard's controllers, release the Leases, leave.
    async fn leave(&mut self) {
        let shards: Vec<u32> = self.held.keys().copied().collect();
        for shard in &shards {
            self.ownership.unassign(*shard);
        }
        let start = Instant::now();
        while shards.iter().any(|s| self.ownership.is_running(*s)) && start.elapsed() < STOP_TIMEOUT {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for shard in shards {
            self.release(shard).await;
        }
        let name = naming::member_lease(&self.settings.prefix, self.me());
        let _ = tokio::time::timeout(Duration::from_secs(5), self.api.delete(&name, &DeleteParams::default())).await;
        info!("left the shard Leases");
    }

    fn count(&self, change: &str) {
        if let Some((_, changes)) = &self.gauges {
            changes.with_label_values(&[change]).inc();
        }
    }
}

/// The shards the replica of `rank` among `members` live ones (sorted by identity) should hold:
/// as even a split as can be, the first ones taking the remainder.
fn share(shards: usize, members: usize, rank: usize) -> usize {
    let members = members.max(1);
    shards / members + usize::from(rank < shards % members)
}

/// `volt_shards_owned` and `volt_shard_changes_total{change}`; `None` when already registered
/// (an earlier run in this process).
fn gauges(metrics: &Metrics) -> Option<(IntGauge, IntCounterVec)> {
    let owned = IntGauge::new("volt_shards_owned", "Shards whose Lease this replica holds.").ok()?;
    let changes = IntCounterVec::new(
        Opts::new(
            "volt_shard_changes_total",
            "Shards this replica acquired, released or lost, and renewals that came back after the fence's deadline (paused).",
        ),
        &["change"],
    )
    .ok()?;
    metrics.registry.register(Box::new(owned.clone())).ok()?;
    metrics.registry.register(Box::new(changes.clone())).ok()?;
    Some((owned, changes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn args(extra: &[&str]) -> RunArgs {
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            run: RunArgs,
        }
        let mut argv = vec!["volt-operator"];
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv).unwrap_or_else(|e| panic!("run flags parse: {e}")).run
    }

    #[test]
    fn shares_split_every_shard_once() {
        for shards in 1..=12 {
            for members in 1..=5 {
                let shares: Vec<usize> = (0..members).map(|rank| share(shards, members, rank)).collect();
                assert_eq!(shares.iter().sum::<usize>(), shards, "{shards} shards over {members}: {shares:?}");
                let (min, max) = (shares.iter().min().copied(), shares.iter().max().copied());
                assert!(max.unwrap_or(0) - min.unwrap_or(0) <= 1, "uneven: {shares:?}");
            }
        }
        assert_eq!(share(3, 2, 0), 2);
        assert_eq!(share(3, 2, 1), 1);
        assert_eq!(share(3, 4, 3), 0, "more replicas than shards: the last waits");
    }

    #[test]
    fn settings_name_their_flags() {
        assert!(Settings::from_args(&args(&[])).expect("valid").is_none(), "one shard: no sharding");
        let s = Settings::from_args(&args(&["--shards", "3", "--lease-duration", "6", "--lease-grace", "2"]))
            .expect("valid")
            .expect("sharded");
        assert_eq!((s.shards, s.duration.as_secs(), s.renew_every()), (3, 6, Duration::from_secs(1)));
        for bad in [&["--shards", "0"][..], &["--shards", "65"]] {
            let err = Settings::from_args(&args(bad)).expect_err("invalid");
            assert!(err.to_string().contains("--shards"), "{err}");
        }
        let err = Settings::from_args(&args(&["--shards", "2", "--leader-elect"])).expect_err("exclusive");
        assert!(err.to_string().contains("--leader-elect"), "{err}");
        let err = Settings::from_args(&args(&["--shards", "2", "--lease-grace", "30"])).expect_err("bad grace");
        assert!(err.to_string().contains("--lease-grace"), "{err}");
    }
}
