//! A kubelet stand-in: the test control plane has no nodes, so tests play the kubelet's part by
//! writing pod status through the `status` subresource, as kwok does.
//!
//! - [`set_running`], [`set_succeeded`], [`set_failed`] and [`set_waiting`] write one status, shaped
//!   like a real kubelet's (phase, IPs, start time, the four pod conditions and a status for every
//!   container of the spec).
//! - [`Kubelet`] does it in the background for every new pod of a namespace, following a
//!   [`PodPlan`] per pod. While the apiserver cannot be reached (stopped by a test), it keeps
//!   trying, as a kubelet does.
//! - [`scripted`] is the plan for step pods of the tests' workflows, read from their container's
//!   environment ([`scripted_outcome`]: `OUTPUT`, `FAIL_ATTEMPTS`, `RUN_FOREVER`).
//!
//! Pods created by controllers (ReplicaSets, Jobs, the operator) have no `spec.nodeName` here,
//! since nothing schedules them; their status can be patched all the same. Note that the
//! apiserver deletes a pod without `nodeName` immediately (no graceful termination, no
//! `deletionTimestamp` phase), as it does a pod that has Succeeded or Failed; a test that wants a
//! pod to linger as "terminating" gives it a finalizer and removes the finalizer later.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
    runtime::{WatchStreamExt, watcher},
};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::task::{JoinHandle, JoinSet};

/// Marks the pod Running, with `ip` as its pod IP, every container running and, if `ready`,
/// Ready (else its containers are started but not ready, as while a readiness probe fails).
pub async fn set_running(client: &Client, namespace: &str, pod: &str, ip: &str, ready: bool) -> kube::Result<Pod> {
    let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let current = api.get(pod).await?;
    write_status(&api, &current, running_status(&current, ip, ready, &now())).await
}

/// Marks the pod Succeeded: every container terminated with exit code 0, reason `Completed` and
/// `termination_message` as its message (what `terminationMessagePath` would hold).
pub async fn set_succeeded(
    client: &Client,
    namespace: &str,
    pod: &str,
    termination_message: &str,
) -> kube::Result<Pod> {
    let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let current = api.get(pod).await?;
    write_status(&api, &current, terminated_status(&current, true, 0, termination_message, &now())).await
}

/// Marks the pod Failed: every container terminated with `exit_code`, reason `Error` and
/// `message`.
pub async fn set_failed(
    client: &Client,
    namespace: &str,
    pod: &str,
    message: &str,
    exit_code: i32,
) -> kube::Result<Pod> {
    let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let current = api.get(pod).await?;
    write_status(&api, &current, terminated_status(&current, false, exit_code, message, &now())).await
}

/// Marks every container waiting with `reason` (`CrashLoopBackOff`, `ImagePullBackOff`,
/// `CreateContainerConfigError`...) after `restart_count` restarts. The pod is Running once a
/// container has run (`restart_count > 0`, or `CrashLoopBackOff`), else Pending; a restarted
/// container's last state is a termination with exit code 1. The pod IP is left as it is.
pub async fn set_waiting(
    client: &Client,
    namespace: &str,
    pod: &str,
    reason: &str,
    restart_count: i32,
) -> kube::Result<Pod> {
    let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let current = api.get(pod).await?;
    write_status(&api, &current, waiting_status(&current, reason, restart_count, &now())).await
}

/// Merge-patches the status of `pod`, as read just before. The UID in the patch makes it fail
/// (422, the UID is immutable) rather than touch a new pod of the same name.
async fn write_status(api: &Api<Pod>, pod: &Pod, status: Value) -> kube::Result<Pod> {
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    let patch = json!({ "metadata": { "uid": pod.metadata.uid }, "status": status });
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(patch)).await
}

/// What the [`Kubelet`] does with one pod.
#[derive(Clone, Debug)]
pub struct PodPlan {
    /// Time between seeing the pod and marking it Running.
    pub start_delay: Duration,
    /// The pod IP reported once Running.
    pub pod_ip: String,
    /// Whether the pod becomes Ready when Running.
    pub ready: bool,
    /// Time between Running and the outcome (unused for [`Outcome::Run`]).
    pub run_for: Duration,
    /// What happens after `run_for`.
    pub outcome: Outcome,
}

/// How a planned pod ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Stays Running.
    Run,
    /// Succeeds, with this termination message.
    Succeed { message: String },
    /// Fails, with this message and exit code.
    Fail { message: String, exit_code: i32 },
}

impl PodPlan {
    /// Running and Ready at once with `pod_ip`, for good.
    pub fn run(pod_ip: impl Into<String>) -> Self {
        PodPlan {
            start_delay: Duration::ZERO,
            pod_ip: pod_ip.into(),
            ready: true,
            run_for: Duration::ZERO,
            outcome: Outcome::Run,
        }
    }

    /// Running at once, then Succeeded with `message`.
    pub fn succeed(pod_ip: impl Into<String>, message: impl Into<String>) -> Self {
        PodPlan { outcome: Outcome::Succeed { message: message.into() }, ..PodPlan::run(pod_ip) }
    }

    /// Running at once, then Failed with `message` and `exit_code`.
    pub fn fail(pod_ip: impl Into<String>, message: impl Into<String>, exit_code: i32) -> Self {
        PodPlan { outcome: Outcome::Fail { message: message.into(), exit_code }, ..PodPlan::run(pod_ip) }
    }

    /// Waits `delay` before marking the pod Running.
    pub fn after(mut self, delay: Duration) -> Self {
        self.start_delay = delay;
        self
    }

    /// Stays Running for `duration` before the outcome.
    pub fn run_for(mut self, duration: Duration) -> Self {
        self.run_for = duration;
        self
    }

    /// Running but never Ready.
    pub fn not_ready(mut self) -> Self {
        self.ready = false;
        self
    }
}

/// Decides the plan of each new pod.
pub type Behaviour = Arc<dyn Fn(&Pod) -> PodPlan + Send + Sync>;

/// Wraps a closure as a [`Behaviour`].
pub fn behaviour(f: impl Fn(&Pod) -> PodPlan + Send + Sync + 'static) -> Behaviour {
    Arc::new(f)
}

/// A behaviour giving every pod [`PodPlan::run`] with the next IP of `<prefix><n>`, n = 1, 2...
/// (for instance `sequential_ips("10.244.0.")`).
pub fn sequential_ips(prefix: &str) -> Behaviour {
    let prefix = prefix.to_string();
    let next = std::sync::atomic::AtomicU32::new(1);
    behaviour(move |_| {
        let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        PodPlan::run(format!("{prefix}{n}"))
    })
}

/// The value of the environment variable `name` of the pod's first container.
pub fn env_var(pod: &Pod, name: &str) -> Option<String> {
    pod.spec.as_ref()?.containers.first()?.env.as_ref()?.iter().find(|e| e.name == name)?.value.clone()
}

/// How a step pod of the tests ends, from its first container's environment: runs for good with
/// `RUN_FOREVER`; fails (exit code 3, "attempt N failed on purpose") when `FAIL_ATTEMPTS`
/// (`"1,2"`) lists its attempt (label `volt.dev/attempt`); else succeeds with `OUTPUT` as its
/// termination message.
pub fn scripted_outcome(pod: &Pod) -> Outcome {
    let attempt = pod.metadata.labels.as_ref().and_then(|l| l.get("volt.dev/attempt")).cloned().unwrap_or_default();
    let fail = env_var(pod, "FAIL_ATTEMPTS").is_some_and(|f| f.split(',').any(|a| a == attempt));
    if env_var(pod, "RUN_FOREVER").is_some() {
        Outcome::Run
    } else if fail {
        Outcome::Fail { message: format!("attempt {attempt} failed on purpose"), exit_code: 3 }
    } else {
        Outcome::Succeed { message: env_var(pod, "OUTPUT").unwrap_or_default() }
    }
}

/// The plan for step pods: Running (and Ready, at 127.0.0.1) at once, then after `run_for(pod)`
/// the [`scripted_outcome`].
pub fn scripted(run_for: impl Fn(&Pod) -> Duration + Send + Sync + 'static) -> Behaviour {
    behaviour(move |pod| PodPlan { run_for: run_for(pod), outcome: scripted_outcome(pod), ..PodPlan::run("127.0.0.1") })
}

/// Plays the kubelet for the pods of one namespace in the background: each new pod (by UID, once)
/// that is not being deleted follows the [`PodPlan`] the behaviour gives it. Stops when dropped.
pub struct Kubelet {
    task: JoinHandle<()>,
    handled: Arc<Mutex<Vec<String>>>,
}

impl Kubelet {
    /// Starts watching the pods of `namespace` (those matching `label_selector`, if given).
    /// Must be called inside a tokio runtime.
    pub fn start(client: Client, namespace: &str, label_selector: Option<String>, behaviour: Behaviour) -> Kubelet {
        let handled = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn(drive(client, namespace.to_string(), label_selector, behaviour, handled.clone()));
        Kubelet { task, handled }
    }

    /// Names of the pods given a plan so far, in order.
    pub fn handled(&self) -> Vec<String> {
        self.handled.lock().map(|h| h.clone()).unwrap_or_default()
    }

    /// Stops watching and abandons the plans under way.
    pub fn stop(self) {
        drop(self);
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        // Aborting the driver drops its JoinSet, which aborts every pod's task.
        self.task.abort();
    }
}

async fn drive(
    client: Client,
    namespace: String,
    label_selector: Option<String>,
    behaviour: Behaviour,
    handled: Arc<Mutex<Vec<String>>>,
) {
    let api: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let mut config = watcher::Config::default();
    if let Some(selector) = &label_selector {
        config = config.labels(selector);
    }
    let mut seen: HashSet<String> = HashSet::new();
    let mut tasks = JoinSet::new();
    // Quick to watch again after an outage, as a kubelet resyncs; the operator is what tests measure.
    let mut events = std::pin::pin!(watcher(api, config).backoff(volt_operator::kube_util::WatchBackoff::default()));
    while let Some(event) = events.next().await {
        while tasks.try_join_next().is_some() {}
        let pod = match event {
            Ok(watcher::Event::Apply(pod) | watcher::Event::InitApply(pod)) => pod,
            Ok(_) => continue,
            Err(e) => {
                eprintln!("[kubelet {namespace}] watch error: {e}");
                continue;
            }
        };
        let (Some(name), Some(uid)) = (pod.metadata.name.clone(), pod.metadata.uid.clone()) else {
            continue;
        };
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        if pod.metadata.deletion_timestamp.is_some()
            || matches!(phase, Some("Succeeded" | "Failed"))
            || !seen.insert(uid.clone())
        {
            continue;
        }
        let plan = behaviour(&pod);
        if let Ok(mut handled) = handled.lock() {
            handled.push(name.clone());
        }
        tasks.spawn(follow_plan(client.clone(), namespace.clone(), name, uid, plan));
    }
}

async fn follow_plan(client: Client, namespace: String, name: String, uid: String, plan: PodPlan) {
    let api: Api<Pod> = Api::namespaced(client, &namespace);
    let report = |what: &str, result: kube::Result<Pod>| match result {
        Ok(_) => {}
        // Deleted, or replaced by a pod of the same name, meanwhile.
        Err(kube::Error::Api(status)) if status.is_not_found() || status.code == 422 => {}
        Err(e) => eprintln!("[kubelet {namespace}] {what} {name}: {e}"),
    };
    tokio::time::sleep(plan.start_delay).await;
    let Some(pod) = still_there(&api, &name, &uid).await else { return };
    let running = |pod: &Pod| running_status(pod, &plan.pod_ip, plan.ready, &now());
    report("set running", persist(|| write_status(&api, &pod, running(&pod))).await);
    if plan.outcome == Outcome::Run {
        return;
    }
    tokio::time::sleep(plan.run_for).await;
    let Some(pod) = still_there(&api, &name, &uid).await else { return };
    let status = |pod: &Pod| match &plan.outcome {
        Outcome::Run => Value::Null,
        Outcome::Succeed { message } => terminated_status(pod, true, 0, message, &now()),
        Outcome::Fail { message, exit_code } => terminated_status(pod, false, *exit_code, message, &now()),
    };
    report("set terminated", persist(|| write_status(&api, &pod, status(&pod))).await);
}

/// How long the stand-in keeps trying while the apiserver cannot be reached (a real kubelet
/// keeps trying for ever).
const UNREACHABLE_FOR: Duration = Duration::from_secs(180);

/// Runs `request` again while the apiserver cannot be reached (connection refused or reset,
/// as while it is stopped), like a kubelet riding out an outage; an answer from the apiserver,
/// error or not, ends it.
async fn persist<T, F, Fut>(mut request: F) -> kube::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = kube::Result<T>>,
{
    let deadline = tokio::time::Instant::now() + UNREACHABLE_FOR;
    loop {
        match request().await {
            Err(e) if !matches!(e, kube::Error::Api(_)) && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            result => return result,
        }
    }
}

/// The pod, if it still exists (same UID) and is not being deleted.
async fn still_there(api: &Api<Pod>, name: &str, uid: &str) -> Option<Pod> {
    let pod = persist(|| api.get_opt(name)).await.ok()??;
    (pod.metadata.uid.as_deref() == Some(uid) && pod.metadata.deletion_timestamp.is_none()).then_some(pod)
}

// ---------------------------------------------------------------------------------------------
// Status documents (pure)

/// The current time as the API writes it (whole seconds, UTC).
fn now() -> String {
    jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn sha256_hex(parts: &[&str]) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update(part.as_bytes());
        hasher.update([0]);
    }
    hex::encode(hasher.finalize())
}

/// `(name, image)` of each container.
type Images = Vec<(String, String)>;

/// The init containers and the containers of the spec.
fn containers(pod: &Pod) -> (Images, Images) {
    let Some(spec) = &pod.spec else { return (Vec::new(), Vec::new()) };
    let list = |cs: &[k8s_openapi::api::core::v1::Container]| {
        cs.iter().map(|c| (c.name.clone(), c.image.clone().unwrap_or_default())).collect::<Vec<_>>()
    };
    (list(spec.init_containers.as_deref().unwrap_or_default()), list(&spec.containers))
}

/// `docker.io/library/busybox@sha256:...` style image ID.
fn image_id(image: &str) -> String {
    let repository = match image.rsplit_once(':') {
        Some((repo, tag)) if !tag.contains('/') => repo,
        _ => image,
    };
    let repository = repository.split('@').next().unwrap_or(repository);
    let repository = match repository.split('/').collect::<Vec<_>>().as_slice() {
        [name] => format!("docker.io/library/{name}"),
        [first, ..] if !first.contains('.') && !first.contains(':') && *first != "localhost" => {
            format!("docker.io/{repository}")
        }
        _ => repository.to_string(),
    };
    format!("{repository}@sha256:{}", sha256_hex(&[image]))
}

fn container_id(pod: &Pod, container: &str, restart_count: i32) -> String {
    let uid = pod.metadata.uid.as_deref().unwrap_or_default();
    format!("containerd://{}", sha256_hex(&[uid, container, &restart_count.to_string()]))
}

fn existing_started_at(pod: &Pod, container: &str) -> Option<String> {
    let status = pod.status.as_ref()?;
    let statuses = status.container_statuses.as_ref()?;
    let state = statuses.iter().find(|s| s.name == container)?.state.as_ref()?;
    if let Some(running) = &state.running {
        return running.started_at.as_ref().map(|t| t.0.strftime("%Y-%m-%dT%H:%M:%SZ").to_string());
    }
    None
}

fn existing_restart_count(pod: &Pod, container: &str) -> i32 {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|cs| cs.iter().find(|s| s.name == container))
        .map(|s| s.restart_count)
        .unwrap_or(0)
}

fn start_time(pod: &Pod, now: &str) -> String {
    pod.status
        .as_ref()
        .and_then(|s| s.start_time.as_ref())
        .map(|t| t.0.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_else(|| now.to_string())
}

/// A pod condition, keeping the last transition time when the status does not change.
fn condition(pod: &Pod, type_: &str, status: bool, reason: Option<&str>, message: Option<String>, now: &str) -> Value {
    let status = if status { "True" } else { "False" };
    let since = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == type_))
        .filter(|c| c.status == status)
        .and_then(|c| c.last_transition_time.as_ref())
        .map(|t| t.0.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_else(|| now.to_string());
    let mut value = json!({
        "type": type_,
        "status": status,
        "lastProbeTime": null,
        "lastTransitionTime": since,
    });
    if let Some(reason) = reason {
        value["reason"] = json!(reason);
    }
    if let Some(message) = message {
        value["message"] = json!(message);
    }
    value
}

/// `PodScheduled`, `Initialized`, `ContainersReady` and `Ready` the way the kubelet words them.
fn conditions(pod: &Pod, ready: bool, completed: bool, unready: &[String], now: &str) -> Value {
    let (reason, message) = if ready {
        (None, None)
    } else if completed {
        (Some("PodCompleted"), None)
    } else {
        (Some("ContainersNotReady"), Some(format!("containers with unready status: [{}]", unready.join(" "))))
    };
    json!([
        condition(pod, "Initialized", true, completed.then_some("PodCompleted"), None, now),
        condition(pod, "Ready", ready, reason, message.clone(), now),
        condition(pod, "ContainersReady", ready, reason, message, now),
        condition(pod, "PodScheduled", true, None, None, now),
    ])
}

/// Init containers as having completed (exit code 0).
fn init_container_statuses(pod: &Pod, now: &str) -> Value {
    let (init, _) = containers(pod);
    let started = start_time(pod, now);
    Value::Array(
        init.iter()
            .map(|(name, image)| {
                json!({
                    "name": name,
                    "image": image,
                    "imageID": image_id(image),
                    "containerID": container_id(pod, name, 0),
                    "ready": true,
                    "restartCount": 0,
                    "state": { "terminated": {
                        "exitCode": 0,
                        "reason": "Completed",
                        "startedAt": started,
                        "finishedAt": started,
                        "containerID": container_id(pod, name, 0),
                    }},
                })
            })
            .collect(),
    )
}

fn base_status(pod: &Pod, phase: &str, now: &str) -> Value {
    let mut status = json!({
        "phase": phase,
        "hostIP": "127.0.0.1",
        "startTime": start_time(pod, now),
    });
    let (init, _) = containers(pod);
    if !init.is_empty() {
        status["initContainerStatuses"] = init_container_statuses(pod, now);
    }
    status
}

fn running_status(pod: &Pod, ip: &str, ready: bool, now: &str) -> Value {
    let (_, main) = containers(pod);
    let unready: Vec<String> = if ready { Vec::new() } else { main.iter().map(|(n, _)| n.clone()).collect() };
    let mut status = base_status(pod, "Running", now);
    status["podIP"] = json!(ip);
    status["podIPs"] = json!([{ "ip": ip }]);
    status["conditions"] = conditions(pod, ready, false, &unready, now);
    status["containerStatuses"] = Value::Array(
        main.iter()
            .map(|(name, image)| {
                let restarts = existing_restart_count(pod, name);
                let id = container_id(pod, name, restarts);
                json!({
                    "name": name,
                    "image": image,
                    "imageID": image_id(image),
                    "containerID": id,
                    "ready": ready,
                    "started": true,
                    "restartCount": restarts,
                    "state": { "running": {
                        "startedAt": existing_started_at(pod, name).unwrap_or_else(|| now.to_string()),
                    }},
                })
            })
            .collect(),
    );
    status
}

fn terminated_status(pod: &Pod, succeeded: bool, exit_code: i32, message: &str, now: &str) -> Value {
    let (_, main) = containers(pod);
    let names: Vec<String> = main.iter().map(|(n, _)| n.clone()).collect();
    let mut status = base_status(pod, if succeeded { "Succeeded" } else { "Failed" }, now);
    status["conditions"] = conditions(pod, false, succeeded, &names, now);
    status["containerStatuses"] = Value::Array(
        main.iter()
            .map(|(name, image)| {
                let restarts = existing_restart_count(pod, name);
                let id = container_id(pod, name, restarts);
                let mut terminated = json!({
                    "exitCode": exit_code,
                    "reason": if succeeded { "Completed" } else { "Error" },
                    "startedAt": existing_started_at(pod, name).unwrap_or_else(|| start_time(pod, now)),
                    "finishedAt": now,
                    "containerID": id,
                });
                if !message.is_empty() {
                    terminated["message"] = json!(message);
                }
                json!({
                    "name": name,
                    "image": image,
                    "imageID": image_id(image),
                    "containerID": id,
                    "ready": false,
                    "started": false,
                    "restartCount": restarts,
                    "state": { "terminated": terminated },
                })
            })
            .collect(),
    );
    status
}

fn waiting_status(pod: &Pod, reason: &str, restart_count: i32, now: &str) -> Value {
    let (_, main) = containers(pod);
    let has_run = restart_count > 0 || reason == "CrashLoopBackOff";
    let names: Vec<String> = main.iter().map(|(n, _)| n.clone()).collect();
    let mut status = base_status(pod, if has_run { "Running" } else { "Pending" }, now);
    status["conditions"] = conditions(pod, false, false, &names, now);
    status["containerStatuses"] = Value::Array(
        main.iter()
            .map(|(name, image)| {
                let message = match reason {
                    "CrashLoopBackOff" => format!(
                        "back-off {}s restarting failed container={name} pod={}",
                        (10u64 << restart_count.clamp(0, 5)).min(300),
                        pod.metadata.name.as_deref().unwrap_or_default()
                    ),
                    _ => format!("{reason} ({image})"),
                };
                let mut container = json!({
                    "name": name,
                    "image": image,
                    "imageID": if has_run { image_id(image) } else { String::new() },
                    "ready": false,
                    "started": false,
                    "restartCount": restart_count,
                    "state": { "waiting": { "reason": reason, "message": message } },
                });
                if restart_count > 0 {
                    let id = container_id(pod, name, restart_count - 1);
                    container["containerID"] = json!(id);
                    container["lastState"] = json!({ "terminated": {
                        "exitCode": 1,
                        "reason": "Error",
                        "startedAt": existing_started_at(pod, name).unwrap_or_else(|| start_time(pod, now)),
                        "finishedAt": now,
                        "containerID": id,
                    }});
                }
                container
            })
            .collect(),
    );
    status
}
