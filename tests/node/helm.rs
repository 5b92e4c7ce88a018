//! The operator as a real Deployment: `helm install` of the chart with two replicas, running
//! the operator image on the node with the in-cluster configuration (its ServiceAccount, the
//! `kubernetes` Service), probed by the kubelet; `kubectl rollout status` finishes, the leader
//! hands over when its pod is deleted, and the chart NOTES' hello run works as written.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use volt_operator::api::RunPhase;

use crate::cluster::{self, finished, http};
use crate::kit::tools::CHART;
use crate::kit::{self, helm, kubectl, repo, step, wait_until};

/// The chart's lease settings for this test: a quick hand-over.
const LEASE_DURATION: Duration = Duration::from_secs(6);

struct Replica {
    name: String,
    addr: SocketAddr,
    ready: bool,
}

async fn replicas(pods: &Api<Pod>, rel: &str) -> Vec<Replica> {
    let selector = format!("app.kubernetes.io/name=volt-operator,app.kubernetes.io/instance={rel}");
    let list = pods.list(&ListParams::default().labels(&selector)).await.expect("operator pods");
    list.items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| {
            let status = p.status?;
            let ip = status.pod_ip?;
            let ready = status.conditions.unwrap_or_default().iter().any(|c| c.type_ == "Ready" && c.status == "True");
            Some(Replica { name: p.metadata.name?, addr: format!("{ip}:8080").parse().ok()?, ready })
        })
        .collect()
}

/// Whether the replica at `addr` says it leads (`volt_leader` on its open `/metrics`; the
/// JSON API wants a token).
async fn leads(addr: SocketAddr) -> Option<bool> {
    let (code, body) = http(addr, "GET", "/metrics").await?;
    (code == 200).then(|| kit::metric_sum(&body, "volt_leader") == 1.0)
}

/// Waits until there are two Ready replicas, one of them leading; (leader, follower) names.
async fn two_ready_one_leader(pods: &Api<Pod>, rel: &str, timeout: Duration) -> (String, String) {
    wait_until("two Ready replicas, one leader", timeout, || async {
        let rs = replicas(pods, rel).await;
        if rs.len() != 2 || !rs.iter().all(|r| r.ready) {
            return None;
        }
        let mut leaders = Vec::new();
        for r in &rs {
            if !matches!(http(r.addr, "GET", "/readyz").await, Some((200, _))) {
                return None;
            }
            if leads(r.addr).await? {
                leaders.push(r.name.clone());
            }
        }
        assert!(leaders.len() <= 1, "two leaders: {leaders:?}");
        let leader = leaders.pop()?;
        let follower = rs.iter().find(|r| r.name != leader)?.name.clone();
        Some((leader, follower))
    })
    .await
}

fn rollout_status(ns: &str, deployment: &str) -> Duration {
    let started = Instant::now();
    let (ok, out, err) =
        kubectl(&["-n", ns, "rollout", "status", &format!("deployment/{deployment}"), "--timeout=180s"]).parts();
    assert!(ok, "kubectl rollout status: {out}{err}");
    started.elapsed()
}

#[tokio::test]
async fn the_operator_runs_in_cluster_as_a_two_replica_deployment_and_hands_over() {
    let node = cluster::shared();
    let cp = kit::shared();
    let client = cp.client().await;
    let ns = cp.namespace(&client, "node-helm").await;
    let rel = format!("vn{}", cluster::random());
    let full = format!("{rel}-volt-operator");
    let installed = Instant::now();
    let kubeconfig = cp.kubeconfig_path().display().to_string();
    let out = helm(&[
        "install",
        &rel,
        CHART,
        "--namespace",
        &ns,
        "--kubeconfig",
        &kubeconfig,
        "--set",
        "replicaCount=2",
        "--set",
        &format!("watchNamespaces={{{ns}}}"),
        "--set",
        &format!("leaderElection.leaseDuration={}", LEASE_DURATION.as_secs()),
        "--set",
        "leaderElection.leaseGrace=2",
        "--set",
        "readinessProbe.periodSeconds=1",
    ])
    .await;
    assert!(out.contains("kubectl apply -f examples/demo/hello.yaml"), "the NOTES say how to run hello: {out}");

    // Both replicas become Ready (the follower too), so the rollout finishes.
    let took = rollout_status(&ns, &full);
    eprintln!("[node] helm install to rollout complete: {:.1}s", installed.elapsed().as_secs_f64());
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let (leader, follower) = two_ready_one_leader(&pods, &rel, Duration::from_secs(60)).await;
    eprintln!("[node] rollout status took {:.1}s; leader {leader}, standby {follower}", took.as_secs_f64());
    let pod = pods.get(&leader).await.expect("the leader's pod");
    let spec = pod.spec.expect("spec");
    let c = &spec.containers[0];
    assert_eq!(c.image.as_deref(), Some(node.images.operator.as_str()), "the chart's default image");
    let probe = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        p.as_ref().and_then(|p| p.http_get.as_ref()).and_then(|h| h.path.clone()).unwrap_or_default()
    };
    assert_eq!((probe(&c.liveness_probe).as_str(), probe(&c.readiness_probe).as_str()), ("/healthz", "/readyz"));
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let holder = leases.get(&full).await.ok().and_then(|l| l.spec?.holder_identity).unwrap_or_default();
    assert!(holder.starts_with(&format!("{leader}_")), "Lease holder {holder}, leader {leader}");

    // The NOTES' hello run, as written: a container step on the node, created by the operator
    // pod through its in-cluster configuration.
    let hello = repo("examples/demo/hello.yaml").display().to_string();
    let (ok, out, err) = kubectl(&["apply", "-n", &ns, "-f", &hello]).parts();
    assert!(ok, "kubectl apply -f examples/demo/hello.yaml: {out}{err}");
    let status = finished(&client, &ns, "hello-1", Duration::from_secs(120)).await;
    assert_eq!(status.phase, RunPhase::Succeeded, "{status:#?}");
    let summary = step(&status, "summary").output.clone().unwrap_or_default();
    assert_eq!(summary, "Hello, Ada! Hello, Grace! Hello, Linus! (from pod hello-1-pod-1, uid 65532)");
    let (ok, logs, err) = kubectl(&["-n", &ns, "logs", &format!("deployment/{full}"), "--tail=5"]).parts();
    assert!(ok && !logs.is_empty(), "kubectl logs deployment/{full}: {err}");

    // Delete the leader's pod: it releases the Lease on SIGTERM and another replica leads: the
    // standby when it next reads the Lease (within the lease duration), or, sooner, the pod the
    // Deployment starts in its place, whose first read finds the Lease free. The rollout is
    // complete again.
    let deleted = Instant::now();
    let (ok, _, err) = kubectl(&["-n", &ns, "delete", "pod", &leader, "--wait=false"]).parts();
    assert!(ok, "{err}");
    let new_leader = wait_until("another replica to lead", LEASE_DURATION * 2 + Duration::from_secs(10), || async {
        for r in replicas(&pods, &rel).await {
            if r.name != leader && leads(r.addr).await == Some(true) {
                return Some(r.name);
            }
        }
        None
    })
    .await;
    let takeover = deleted.elapsed();
    let who = if new_leader == follower { "the standby" } else { "the replacement pod" };
    eprintln!("[node] leader pod deleted to {who} leading: {:.1}s", takeover.as_secs_f64());
    assert!(takeover <= LEASE_DURATION + Duration::from_secs(5), "took {takeover:?}");
    let holder = leases.get(&full).await.ok().and_then(|l| l.spec?.holder_identity).unwrap_or_default();
    assert!(holder.starts_with(&format!("{new_leader}_")), "Lease holder {holder}, leader {new_leader}");
    rollout_status(&ns, &full);
    let (leading, other) = two_ready_one_leader(&pods, &rel, Duration::from_secs(90)).await;
    assert_eq!(leading, new_leader, "leadership stays put");
    assert!(leading != leader && other != leader, "the deleted pod was replaced");

    // The new leader runs workflows.
    let second = "apiVersion: volt.dev/v1alpha1\nkind: WorkflowRun\nmetadata: {name: hello-2}\nspec:\n  workflowRef: {name: hello}\n  params: {people: [Edsger]}\n";
    cluster::apply(&ns, second);
    let status = finished(&client, &ns, "hello-2", Duration::from_secs(120)).await;
    assert_eq!(
        step(&status, "summary").output.as_deref(),
        Some("Hello, Edsger! (from pod hello-2-pod-1, uid 65532)"),
        "{status:#?}"
    );

    helm(&["uninstall", &rel, "--namespace", &ns, "--kubeconfig", &kubeconfig, "--wait", "--timeout", "120s"]).await;
}
