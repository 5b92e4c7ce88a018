//! Packaging: the Helm chart and the plain manifests (lint, drift, server dry run, install),
//! the operator running with nothing but the chart's RBAC, and leader election between
//! operator processes on a real Lease.

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::rbac::v1::{ClusterRole, Role};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use volt_operator::api::{Agent, RunPhase, WorkflowRun, WorkflowRunStatus};

use crate::kit::control_plane;
use crate::kit::kubelet::{self, Kubelet, PodPlan};
use crate::kit::openai::Stub;
use crate::kit::tools::{CHART, helm_binary};
use crate::kit::{
    self, LogDir, Operator, OperatorProcess, apply, chart_identity, helm, helm_install, helm_install_for_operator_user,
    helm_uninstall, kube_config, kubectl, metric_sum, repo, wait_for, wait_until,
};

const LONG: Duration = Duration::from_secs(90);
const INSTALL_YAML: &str = "manifests/install.yaml";
/// What `make manifests` renders into manifests/install.yaml (under a comment header).
const RENDER: &[&str] = &[
    "template",
    "volt-operator",
    CHART,
    "--namespace",
    "volt-system",
    "--include-crds",
    "--set",
    "namespace.create=true",
];

// ---------------------------------------------------------------------------------------------
// Tools

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

/// A release name no other test uses.
fn release(prefix: &str) -> String {
    format!("{prefix}-{:04x}", rand::random::<u16>())
}

/// Asserts that `result` is 403 Forbidden.
fn forbidden<T: std::fmt::Debug>(result: kube::Result<T>, what: &str) {
    match result {
        Err(kube::Error::Api(status)) if status.code == 403 => {}
        other => panic!("{what}: expected 403 Forbidden, got {other:?}"),
    }
}

/// The kubelet stand-in for run pods ([`kubelet::scripted`]): Succeeded at once, with the
/// container's `OUTPUT` env var as termination message.
fn run_pods(client: &Client, ns: &str) -> Kubelet {
    Kubelet::start(client.clone(), ns, Some("volt.dev/run".into()), kubelet::scripted(|_| Duration::ZERO))
}

async fn finished(runs: &Api<WorkflowRun>, name: &str) -> WorkflowRunStatus {
    kit::run_finished(runs, name, LONG).await
}

/// A run of a container step and a template.
fn small_run(name: &str) -> Value {
    json!({"apiVersion": "volt.dev/v1alpha1", "kind": "WorkflowRun", "metadata": {"name": name},
    "spec": {"workflow": {"steps": [
        {"id": "build", "container": {"image": "busybox", "command": ["sh", "-c", "true"],
                                      "env": [{"name": "OUTPUT", "value": "built"}]}},
        {"id": "report", "dependsOn": ["build"], "template": "{{ steps.build.output }}!"}
    ]}}})
}

// ---------------------------------------------------------------------------------------------
// The chart and the manifests, without a cluster

/// The web view is off by default and on with one value (`ui.enabled`), which also grants
/// `get pods/log`; the JSON API's reviews are always granted; the NetworkPolicy is opt-in.
#[tokio::test]
async fn the_chart_turns_the_web_view_on_with_one_value() {
    let off = helm(&["template", "x", CHART]).await;
    let on = helm(&["template", "x", CHART, "--set", "ui.enabled=true"]).await;
    let ui_env = |rendered: &str| {
        let at = rendered.find("name: VOLT_UI").map(|i| &rendered[i..]).unwrap_or_default();
        at.lines().nth(1).map(|l| l.trim().to_string()).unwrap_or_default()
    };
    assert_eq!(ui_env(&off), "value: \"false\"");
    assert_eq!(ui_env(&on), "value: \"true\"");
    assert!(!off.contains("pods/log") && on.contains("resources: [\"pods/log\"]"), "{on}");
    for rendered in [&off, &on] {
        assert!(rendered.contains("name: system:auth-delegator"), "TokenReview and SubjectAccessReview");
        assert!(rendered.contains("nonResourceURLs: [\"/volt.dev/stats\"]"), "the stats reader role");
        assert!(!rendered.contains("kind: NetworkPolicy"));
    }
    let policy = helm(&[
        "template",
        "x",
        CHART,
        "--set",
        "networkPolicy.enabled=true",
        "--set",
        "networkPolicy.from[0].namespaceSelector.matchLabels.team=ops",
    ])
    .await;
    assert!(
        policy.contains("kind: NetworkPolicy") && policy.contains("team: ops") && policy.contains("port: http"),
        "{policy}"
    );
}

#[tokio::test]
async fn the_chart_lints_clean() {
    let variants: [&[&str]; 4] = [
        &[],
        &["--set", "ui.enabled=true", "--set", "networkPolicy.enabled=true"],
        &[
            "--set",
            "watchNamespaces={team-a,team-b}",
            "--set",
            "serviceMonitor.enabled=true",
            "--set",
            "podDisruptionBudget.enabled=true",
        ],
        &["--set", "leaderElection.enabled=false", "--set", "rbac.aggregateToDefaultRoles=false"],
    ];
    for extra in variants {
        let mut args = vec!["lint", "--strict", CHART];
        args.extend_from_slice(extra);
        let out = helm(&args).await;
        assert!(out.contains("1 chart(s) linted, 0 chart(s) failed"), "{out}");
        assert!(!out.contains("[WARNING]") && !out.contains("[ERROR]"), "helm lint {extra:?}:\n{out}");
    }
    // The schema rejects what the operator would reject.
    let ran = kit::tools::run(helm_binary(), &["template", "x", CHART, "--set", "config.lbStrategy=fastest"]).await;
    assert!(!ran.ok && ran.stderr.contains("lbStrategy"), "{}", ran.stderr);
    let ran = kit::tools::run(helm_binary(), &["template", "x", CHART, "--set", "config.cacheTTL=3"]).await;
    assert!(!ran.ok && ran.stderr.contains("cacheTTL"), "{}", ran.stderr);
    let ran = kit::tools::run(helm_binary(), &["template", "x", CHART, "--set", "leaderElection.leaseGrace=30"]).await;
    assert!(!ran.ok && ran.stderr.contains("leaseGrace must be less than"), "{}", ran.stderr);
}

#[test]
fn the_chart_crds_are_the_repo_crds() {
    let names = |dir: &str| -> BTreeSet<String> {
        std::fs::read_dir(repo(dir))
            .unwrap_or_else(|e| panic!("read {dir}: {e}"))
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.ends_with(".yaml"))
            .collect()
    };
    let repo_crds = names("crds");
    assert_eq!(repo_crds, names("charts/volt-operator/crds"), "run `make manifests`");
    assert_eq!(repo_crds.len(), 5, "{repo_crds:?}");
    for name in &repo_crds {
        assert!(
            read(&format!("crds/{name}")) == read(&format!("charts/volt-operator/crds/{name}")),
            "charts/volt-operator/crds/{name} differs from crds/{name}: run `make manifests`"
        );
    }
}

#[tokio::test]
async fn install_yaml_is_the_rendered_chart() {
    let rendered = helm(RENDER).await;
    let committed = read(INSTALL_YAML);
    // The header is comment lines before the first document.
    let body_start = committed.find("\n---\n").map(|i| i + 1).expect("manifests/install.yaml has documents");
    assert!(committed[..body_start].lines().all(|l| l.starts_with('#')), "only comments before the first document");
    let body = &committed[body_start..];
    if body != rendered {
        let line = body.lines().zip(rendered.lines()).position(|(a, b)| a != b).unwrap_or(0);
        panic!(
            "manifests/install.yaml is not the rendered chart (run `make manifests`); first difference at line \
             {} of the body:\n  committed: {:?}\n  rendered:  {:?}",
            line + 1,
            body.lines().nth(line),
            rendered.lines().nth(line)
        );
    }
    // The image follows the crate's version, as the chart's appVersion does.
    let version = env!("CARGO_PKG_VERSION");
    assert!(read("charts/volt-operator/Chart.yaml").contains(&format!("appVersion: \"{version}\"")));
    assert!(body.contains(&format!("image: \"ghcr.io/volt-dev/volt-operator:{version}\"")), "image tag");
}

/// Every `run` flag's environment variable is set by the chart, and named in values.yaml.
#[tokio::test]
async fn every_run_flag_is_a_helm_value() {
    // The binary's own help names each flag's variable (`[env: VOLT_...=...]`), global flags included.
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_volt-operator"))
        .args(["run", "--help"])
        .output()
        .expect("volt-operator run --help");
    let flags: BTreeSet<String> = String::from_utf8_lossy(&help.stdout)
        .split("[env: ")
        .skip(1)
        .filter_map(|rest| rest.split(['=', ']']).next())
        .map(str::to_string)
        .collect();
    assert!(flags.len() >= 20, "{flags:?}");
    let rendered = helm(&[
        "template",
        "x",
        CHART,
        "--set",
        "config.cloudeventsUrl=http://sink.example",
        "--set",
        "watchNamespaces={a}",
    ])
    .await;
    let chart: BTreeSet<String> = rendered
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- name: "))
        .filter(|n| n.starts_with("VOLT_"))
        .map(str::to_string)
        .collect();
    let missing: Vec<_> = flags.difference(&chart).collect();
    let unknown: Vec<_> = chart.difference(&flags).collect();
    assert!(missing.is_empty(), "flags the chart does not set: {missing:?}");
    assert!(unknown.is_empty(), "variables the chart sets that are no flag: {unknown:?}");
    let values = read("charts/volt-operator/values.yaml");
    let undocumented: Vec<_> = flags.iter().filter(|f| !values.contains(f.as_str())).collect();
    assert!(undocumented.is_empty(), "values.yaml names no value for {undocumented:?}");
}

// ---------------------------------------------------------------------------------------------
// Against the control plane

#[tokio::test]
async fn install_yaml_applies_with_a_server_dry_run() {
    let cp = control_plane::shared();
    let client = cp.client().await;
    // A server dry run cannot put objects in a namespace that it only pretends to create.
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": "volt-system"}})).expect("namespace");
    match namespaces.create(&PostParams::default(), &ns).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => panic!("create namespace volt-system: {e}"),
    }
    let ran = kubectl(&["apply", "--dry-run=server", "-f", INSTALL_YAML]);
    assert!(ran.ok, "kubectl apply --dry-run=server -f {INSTALL_YAML}:\n{}\n{}", ran.stdout, ran.stderr);
    for object in [
        "customresourcedefinition.apiextensions.k8s.io/workflowruns.volt.dev",
        "namespace/volt-system",
        "serviceaccount/volt-operator",
        "clusterrole.rbac.authorization.k8s.io/volt-operator",
        "clusterrolebinding.rbac.authorization.k8s.io/volt-operator",
        "role.rbac.authorization.k8s.io/volt-operator-leader-election",
        "service/volt-operator-metrics",
        "deployment.apps/volt-operator",
    ] {
        assert!(ran.stdout.contains(object), "{object} missing from:\n{}", ran.stdout);
    }
    let objects = read(INSTALL_YAML).lines().filter(|l| l.starts_with("kind: ")).count();
    assert_eq!(ran.stdout.lines().filter(|l| l.ends_with("(server dry run)")).count(), objects, "{}", ran.stdout);
}

/// The example manifests pass `local validate` and a server dry run (Agents and Workflows with
/// `kubectl apply`, the runs, which use generateName, with `kubectl create`).
#[tokio::test]
async fn the_examples_are_valid() {
    let validate =
        kit::tools::run(kit::operator_bin(), &["local", "validate", "manifests/examples/", "manifests/examples/runs/"])
            .await;
    assert!(validate.ok, "local validate:\n{}{}", validate.stdout, validate.stderr);
    assert!(validate.stdout.contains("6 Agents, 3 Workflows, 3 WorkflowRuns"), "{}", validate.stdout);
    let cp = control_plane::shared();
    let client = cp.client().await;
    let ns = cp.namespace(&client, "pkg-examples").await;
    for (verb, path) in [("apply", "manifests/examples/"), ("create", "manifests/examples/runs/")] {
        let ran = kubectl(&["-n", &ns, verb, "--dry-run=server", "-f", path]);
        assert!(ran.ok, "kubectl {verb} --dry-run=server -f {path}:\n{}\n{}", ran.stdout, ran.stderr);
    }
}

/// The metrics table of docs/operations.md names every metric the code registers.
#[test]
fn the_docs_list_every_metric() {
    let mut names = BTreeSet::new();
    let mut dirs = vec![repo("src")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("read src").flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                for piece in text.split('"').skip(1).step_by(2) {
                    if piece.starts_with("volt_") && piece.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
                        names.insert(piece.to_string());
                    }
                }
            }
        }
    }
    assert!(names.len() >= 20, "{names:?}");
    let docs = read("docs/operations.md");
    let missing: Vec<_> = names.iter().filter(|n| !docs.contains(&format!("`{n}`"))).collect();
    assert!(missing.is_empty(), "metrics missing from docs/operations.md: {missing:?}");
}

#[tokio::test]
async fn helm_installs_upgrades_and_uninstalls() {
    let cp = control_plane::shared();
    let client = cp.client().await;
    let ns = cp.namespace(&client, "pkg-helm").await;
    let rel = release("vh");
    helm_install(&rel, &ns, &["replicaCount=2".into()]).await;
    let full = format!("{rel}-volt-operator");

    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let dep = deployments.get(&full).await.expect("the Deployment");
    let spec = &dep.spec;
    assert_eq!(spec.replicas, Some(2));
    assert_eq!(spec.strategy.as_ref().and_then(|s| s.type_.as_deref()), Some("RollingUpdate"));
    let pod = spec.template.spec.as_ref().expect("pod spec");
    assert_eq!(pod.service_account_name.as_deref(), Some(full.as_str()));
    let psc = pod.security_context.as_ref().expect("pod security context");
    assert_eq!((psc.run_as_non_root, psc.run_as_user), (Some(true), Some(65532)));
    let c = &pod.containers[0];
    assert_eq!(
        c.image.as_deref(),
        Some(format!("ghcr.io/volt-dev/volt-operator:{}", env!("CARGO_PKG_VERSION")).as_str())
    );
    assert_eq!(c.args.as_deref(), Some(&["run".to_string()][..]));
    let sc = c.security_context.as_ref().expect("container security context");
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.capabilities.as_ref().and_then(|c| c.drop.clone()), Some(vec!["ALL".to_string()]));
    assert_eq!(sc.seccomp_profile.as_ref().map(|p| p.type_.as_str()), Some("RuntimeDefault"));
    let path = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        p.as_ref().and_then(|p| p.http_get.as_ref()).and_then(|h| h.path.clone()).unwrap_or_default()
    };
    assert_eq!((path(&c.liveness_probe).as_str(), path(&c.readiness_probe).as_str()), ("/healthz", "/readyz"));
    assert!(c.resources.as_ref().and_then(|r| r.requests.as_ref()).is_some_and(|r| r.contains_key("memory")));
    let env = |name: &str| c.env.iter().flatten().find(|e| e.name == name).and_then(|e| e.value.clone());
    assert_eq!(env("VOLT_LEADER_ELECT").as_deref(), Some("true"));
    assert_eq!(env("VOLT_LEASE_NAMESPACE").as_deref(), Some(ns.as_str()));
    assert_eq!(env("VOLT_LEASE_NAME").as_deref(), Some(full.as_str()));

    let cluster_roles: Api<ClusterRole> = Api::all(client.clone());
    let role = cluster_roles.get(&full).await.expect("the operator's ClusterRole");
    let secrets_rule = role.rules.iter().flatten().find(|r| r.resources.iter().flatten().any(|x| x == "secrets"));
    assert_eq!(secrets_rule.map(|r| r.verbs.clone()), Some(vec!["get".to_string()]));
    let lease_role = Api::<Role>::namespaced(client.clone(), &ns).get(&format!("{full}-leader-election")).await;
    assert!(lease_role.is_ok(), "{lease_role:?}");
    let svc = Api::<Service>::namespaced(client.clone(), &ns).get(&format!("{full}-metrics")).await.expect("Service");
    assert_eq!(svc.spec.and_then(|s| s.publish_not_ready_addresses), Some(true));
    assert!(Api::<ServiceAccount>::namespaced(client.clone(), &ns).get(&full).await.is_ok());

    // An upgrade changes a setting in place.
    let kubeconfig = cp.kubeconfig_path().display().to_string();
    helm(&[
        "upgrade",
        &rel,
        CHART,
        "--namespace",
        &ns,
        "--kubeconfig",
        &kubeconfig,
        "--reuse-values",
        "--set",
        "config.logLevel=debug",
    ])
    .await;
    let dep = deployments.get(&full).await.expect("the Deployment");
    let level = dep.spec.template.spec.and_then(|p| {
        p.containers[0].env.iter().flatten().find(|e| e.name == "VOLT_LOG_LEVEL").and_then(|e| e.value.clone())
    });
    assert_eq!(level.as_deref(), Some("debug"));

    // Uninstalling removes what the chart made, and leaves the CRDs (and so every Agent,
    // Workflow and WorkflowRun) alone.
    helm_uninstall(&rel, &ns).await;
    wait_until("the release's objects to go", LONG, || async {
        let dep = deployments.get_opt(&full).await.ok()?;
        let role = cluster_roles.get_opt(&full).await.ok()?;
        (dep.is_none() && role.is_none()).then_some(())
    })
    .await;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    assert!(crds.get("workflowruns.volt.dev").await.is_ok(), "helm uninstall must not delete the CRDs");
}

/// Records every request the API server refuses with 403 (a tower layer on the client).
#[derive(Clone, Default)]
struct Refusals(Arc<Mutex<Vec<String>>>);

impl Refusals {
    fn seen(&self) -> Vec<String> {
        self.0.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

impl<S> tower::Layer<S> for Refusals {
    type Service = RefusalsService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RefusalsService { inner, seen: self.0.clone() }
    }
}

#[derive(Clone)]
struct RefusalsService<S> {
    inner: S,
    seen: Arc<Mutex<Vec<String>>>,
}

impl<S, B, R> tower::Service<http::Request<B>> for RefusalsService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let what = format!("{} {}", req.method(), req.uri());
        let seen = self.seen.clone();
        let response = self.inner.call(req);
        Box::pin(async move {
            let response = response.await?;
            if response.status() == http::StatusCode::FORBIDDEN
                && let Ok(mut seen) = seen.lock()
            {
                seen.push(what);
            }
            Ok(response)
        })
    }
}

/// The operator on a client with `config`'s identity, recording refusals.
async fn operator_as(ns: &str, config: &kube::Config, refusals: &Refusals) -> Operator {
    let metrics = volt_operator::metrics::Metrics::new();
    let counter = volt_operator::metrics::ApiCounterLayer { counter: Arc::new(metrics.api_requests.clone()) };
    let client = kube::client::ClientBuilder::try_from(config.clone())
        .expect("a client builder")
        .with_layer(&counter)
        .with_layer(refusals)
        .build();
    Operator::start_on(ns, client, metrics, |a| a.inline_output_limit = 64).await
}

fn reconcile_errors(op: &Operator) -> f64 {
    metric_sum(&op.metrics.render(), "volt_reconcile_errors_total")
}

/// The operator, with the identity and the RBAC of the chart's ServiceAccount (cluster-wide
/// mode), runs Workflows with pods, an agent with a Deployment and an API key, a ConfigMap
/// output, the step cache, Events and a TTL, across a restart, without one refused request;
/// and is refused what it does not need.
#[tokio::test]
async fn the_operator_runs_with_the_chart_rbac_and_nothing_more() {
    let cp = control_plane::shared();
    let client = cp.client().await;
    let ns = cp.namespace(&client, "pkg-rbac").await;
    let rel = release("vr");
    let identity = chart_identity(&client, &rel, &ns, &[]).await;
    let full = identity.service_account;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let config = cp.config_with_token(&identity.token).await;
    let sa = Client::try_from(config.clone()).expect("a client with the ServiceAccount token");

    // The agent: a Deployment the operator applies, whose pod the stand-in runs at a stub.
    let stub = Stub::start("coder-0", Duration::from_millis(10)).await;
    let stub_ip = stub.ip().to_string();
    let _agent_pods = Kubelet::start(
        client.clone(),
        &ns,
        Some("volt.dev/agent=coder".into()),
        kubelet::behaviour(move |_| PodPlan::run(stub_ip.clone())),
    );
    // Run pods succeed with their OUTPUT, after HOLD_SECONDS when set.
    let _run_pods = Kubelet::start(
        client.clone(),
        &ns,
        Some("volt.dev/run".into()),
        kubelet::scripted(|pod| {
            Duration::from_secs(kubelet::env_var(pod, "HOLD_SECONDS").and_then(|s| s.parse().ok()).unwrap_or(0))
        }),
    );
    let key: Secret =
        serde_json::from_value(json!({"metadata": {"name": "llm-key"}, "stringData": {"api-key": "sk-packaging"}}))
            .expect("secret");
    secrets.create(&PostParams::default(), &key).await.expect("create the API key Secret");

    let refusals = Refusals::default();
    let op = operator_as(&ns, &config, &refusals).await;
    apply(
        &client,
        &ns,
        json!({"apiVersion": "volt.dev/v1alpha1", "kind": "Agent", "metadata": {"name": "coder"},
               "spec": {"model": "stub-model", "capabilities": ["code"],
                        "apiKeySecretRef": {"name": "llm-key", "key": "api-key"},
                        "deployment": {"replicas": 1, "port": stub.port(), "path": "/v1",
                                       "template": {"spec": {"containers": [
                                           {"name": "server", "image": "vllm/vllm-openai:v0.6.0"}]}}}}}),
    )
    .await;
    let agents: Api<Agent> = Api::namespaced(client.clone(), &ns);
    wait_for(&agents, "coder", LONG, |a| a.status.as_ref().is_some_and(|s| s.replicas.healthy == 1)).await;

    // build (an output too long for the status) -> review (agent, cached) -> hold (a pod that
    // takes a while) -> report (reads build's output).
    let long_output = "x".repeat(200);
    apply(
        &client,
        &ns,
        json!({"apiVersion": "volt.dev/v1alpha1", "kind": "Workflow", "metadata": {"name": "review"},
        "spec": {"params": [{"name": "hold", "default": "0"}], "steps": [
            {"id": "build", "container": {"image": "busybox", "command": ["sh", "-c", "true"],
                                          "env": [{"name": "OUTPUT", "value": long_output}]}},
            {"id": "review", "dependsOn": ["build"], "cache": {"enabled": true},
             "agent": {"selector": {"capabilities": ["code"]},
                       "prompt": "Review {{ steps.build.output | length }} bytes"}},
            {"id": "hold", "dependsOn": ["review"],
             "container": {"image": "busybox", "command": ["sh", "-c", "true"],
                           "env": [{"name": "HOLD_SECONDS", "value": "{{ params.hold }}"},
                                   {"name": "OUTPUT", "value": "held"}]}},
            {"id": "report", "dependsOn": ["hold"],
             "template": "{{ steps.build.output | length }} {{ steps.hold.output }}"}
        ]}}),
    )
    .await;
    let run = |name: &str, hold: u32, ttl: Option<u32>| {
        let mut spec = json!({"workflowRef": {"name": "review"}, "params": {"hold": hold.to_string()}});
        if let Some(ttl) = ttl {
            spec["ttlSecondsAfterFinished"] = json!(ttl);
        }
        json!({"apiVersion": "volt.dev/v1alpha1", "kind": "WorkflowRun", "metadata": {"name": name}, "spec": spec})
    };
    let runs: Api<WorkflowRun> = Api::namespaced(client.clone(), &ns);
    apply(&client, &ns, run("first", 0, Some(3))).await;
    let s = finished(&runs, "first").await;
    assert_eq!(s.phase, RunPhase::Succeeded, "{s:#?}");
    assert_eq!(s.steps["report"].output.as_deref(), Some("200 held"));
    // The long output went to a ConfigMap owned by the run.
    let output_ref = s.steps["build"].output_ref.clone().expect("build's output is in a ConfigMap");
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let cm = configmaps.get(&output_ref.config_map).await.expect("the output ConfigMap");
    assert_eq!(cm.data.and_then(|d| d.get(&output_ref.key).cloned()), Some(long_output));
    // The agent was called with the key from the Secret.
    assert_eq!(stub.seen().first().and_then(|r| r.authorization.clone()).as_deref(), Some("Bearer sk-packaging"));
    // Events, published with events.k8s.io/v1.
    assert_eq!(reporters(&client, &ns, "first").await, BTreeSet::from(["volt-operator".to_string()]));
    // The step cache's persistent tier.
    let cache = configmaps.list(&ListParams::default().labels("volt.dev/cache=steps")).await.expect("list");
    assert!(!cache.items.is_empty(), "the cached review is in a ConfigMap");
    // ttlSecondsAfterFinished: the operator deletes the run.
    wait_until("the finished run to be deleted", LONG, || async {
        matches!(runs.get_opt("first").await, Ok(None)).then_some(())
    })
    .await;

    // A restart in the middle of a run: the new operator finds the running pod, reads build's
    // output back from its ConfigMap, and loads the step cache from its ConfigMaps.
    apply(&client, &ns, run("second", 3, None)).await;
    wait_for(&runs, "second", LONG, |r| {
        r.status
            .as_ref()
            .and_then(|s| s.steps.get("hold"))
            .is_some_and(|h| h.phase == volt_operator::api::StepPhase::Running)
    })
    .await;
    assert_eq!(reconcile_errors(&op), 0.0, "reconcile errors with the chart's RBAC:\n{}", op.metrics.render());
    op.stop().await;
    let op = operator_as(&ns, &config, &refusals).await;
    let s = finished(&runs, "second").await;
    assert_eq!(s.phase, RunPhase::Succeeded, "{s:#?}");
    assert_eq!(s.steps["report"].output.as_deref(), Some("200 held"));
    apply(&client, &ns, run("third", 0, None)).await;
    let s = finished(&runs, "third").await;
    assert_eq!(s.phase, RunPhase::Succeeded, "{s:#?}");
    assert!(s.steps["review"].cached, "the review comes from the cache after the restart: {s:#?}");
    assert_eq!(reconcile_errors(&op), 0.0, "reconcile errors with the chart's RBAC:\n{}", op.metrics.render());
    op.stop().await;
    assert_eq!(refusals.seen(), Vec::<String>::new(), "requests the chart's RBAC refused");

    // What it may not do.
    forbidden(Api::<Secret>::all(sa.clone()).list(&ListParams::default()).await, "list Secrets cluster-wide");
    forbidden(Api::<Secret>::namespaced(sa.clone(), &ns).list(&ListParams::default()).await, "list Secrets");
    assert!(Api::<Secret>::namespaced(sa.clone(), &ns).get("llm-key").await.is_ok(), "reading one key is allowed");
    forbidden(
        Api::<Deployment>::namespaced(sa.clone(), &ns).delete("coder-agent", &DeleteParams::default()).await,
        "delete a Deployment",
    );
    forbidden(
        Api::<ConfigMap>::namespaced(sa.clone(), &ns).delete(&output_ref.config_map, &DeleteParams::default()).await,
        "delete a ConfigMap",
    );
    let role: ClusterRole =
        serde_json::from_value(json!({"metadata": {"name": format!("{rel}-escalate")}, "rules": []})).expect("role");
    forbidden(Api::<ClusterRole>::all(sa.clone()).create(&PostParams::default(), &role).await, "create a ClusterRole");
    forbidden(
        Api::<Agent>::namespaced(sa.clone(), &ns).delete("coder", &DeleteParams::default()).await.map(|_| ()),
        "delete an Agent",
    );
    forbidden(
        Api::<Namespace>::all(sa.clone()).delete(&ns, &DeleteParams::default()).await.map(|_| ()),
        "delete a Namespace",
    );
    forbidden(Api::<Lease>::namespaced(sa.clone(), &ns).get("some-other-lease").await, "read another Lease");
    forbidden(Api::<Lease>::namespaced(sa, "default").get(&full).await, "read a Lease in another namespace");
    helm_uninstall(&rel, &ns).await;
}

// ---------------------------------------------------------------------------------------------
// Leader election between operator processes

/// An operator process (`volt-operator run --leader-elect`) as the operator user, identity
/// (`POD_NAME`) `name`, on Lease `lease` of `ns`; not yet ready.
fn candidate(name: &str, ns: &str, lease: &str, dir: &LogDir) -> OperatorProcess {
    OperatorProcess::builder(control_plane::shared().operator_kubeconfig_path(), dir.join(format!("{name}.log")))
        .name(name)
        .namespaces(&[ns])
        .args(["--leader-elect", "--lease-namespace", ns, "--lease-name", lease, "--lease-duration", "6"])
        .args(["--lease-grace", "2", "--health-check-interval", "1", "--log-format", "text", "--log-level", "info"])
        .env("POD_NAME", name)
        .spawn()
}

async fn holder(leases: &Api<Lease>, name: &str) -> Option<String> {
    leases.get(name).await.ok()?.spec?.holder_identity
}

/// Whether `p` leads (`leadership.leader` in `/api/v1/stats`, asked with the admin token) and
/// is Ready.
async fn leads(p: &OperatorProcess) -> bool {
    let token = control_plane::shared().admin_token().unwrap_or_default();
    let Some((200, body)) = p.get_as("/api/v1/stats", token).await else { return false };
    let stats: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    stats["leadership"]["leader"] == true && p.ready().await
}

/// Waits until exactly one of `processes` leads and every one is Ready (followers too, as
/// SPEC's readiness wants); the leader's index.
async fn the_leader(processes: &[&OperatorProcess], timeout: Duration) -> usize {
    let deadline = Instant::now() + timeout;
    loop {
        let mut leaders = Vec::new();
        let mut ready = 0;
        for (i, p) in processes.iter().enumerate() {
            if leads(p).await {
                leaders.push(i);
            }
            if p.ready().await {
                ready += 1;
            }
        }
        if leaders.len() == 1 && ready == processes.len() {
            return leaders[0];
        }
        assert!(leaders.len() <= 1, "two leaders at once: {leaders:?}");
        if Instant::now() > deadline {
            let logs: Vec<String> = processes.iter().map(|p| format!("--- {}\n{}", p.name(), p.log_tail())).collect();
            panic!("no single leader after {timeout:?}\n{}", logs.join("\n"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The reporting instances of the operator's Events about run `run`, once there are some
/// (they are published off the reconcile path).
async fn reporters(client: &Client, ns: &str, run: &str) -> BTreeSet<String> {
    let events: Api<Event> = Api::namespaced(client.clone(), ns);
    wait_until("Events about the run", LONG, || async {
        let list = events.list(&ListParams::default()).await.ok()?;
        let seen: BTreeSet<String> = list
            .items
            .iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(run))
            .filter_map(|e| e.reporting_instance.clone())
            .collect();
        (!seen.is_empty()).then_some(seen)
    })
    .await
}

/// Two, then three operator processes with the namespaced RBAC of the chart bound to the
/// operator user: only the leader reconciles; SIGKILL of the leader hands over within the lease
/// duration, SIGTERM releases the Lease; a leader that finds the Lease taken stops and exits.
#[tokio::test]
async fn leader_election_between_operator_processes() {
    const LEASE_DURATION: Duration = Duration::from_secs(6);
    let cp = control_plane::shared();
    let client = cp.client().await;
    let ns = cp.namespace(&client, "pkg-leader").await;
    let rel = release("vl");
    helm_install_for_operator_user(&rel, &ns, &[]).await;
    let lease = format!("{rel}-volt-operator");
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);

    // Namespaced RBAC: the operator user may work in `ns` and nowhere else.
    let user = cp.client_as_operator().await;
    assert!(Api::<Pod>::namespaced(user.clone(), &ns).list(&ListParams::default()).await.is_ok());
    forbidden(Api::<Pod>::all(user.clone()).list(&ListParams::default()).await, "list pods cluster-wide");
    forbidden(
        Api::<Pod>::namespaced(user.clone(), "default").list(&ListParams::default()).await,
        "list pods elsewhere",
    );
    forbidden(Api::<Secret>::namespaced(user.clone(), "default").get("any").await, "read a Secret elsewhere");
    forbidden(Api::<Agent>::all(user).list(&ListParams::default()).await, "list Agents cluster-wide");

    let dir = LogDir::new("packaging-leader");
    let _kubelet = run_pods(&client, &ns);
    let runs: Api<WorkflowRun> = Api::namespaced(client.clone(), &ns);
    let mut a = candidate("op-a", &ns, &lease, &dir);
    let mut b = candidate("op-b", &ns, &lease, &dir);
    let first = the_leader(&[&a, &b], Duration::from_secs(30)).await;
    let (leader, follower) = if first == 0 { (&mut a, &mut b) } else { (&mut b, &mut a) };
    let held = holder(&leases, &lease).await.unwrap_or_default();
    assert!(held.starts_with(&format!("{}_", leader.name())), "holder {held}, leader {}", leader.name());
    assert!(matches!(follower.get("/healthz").await, Some((200, _))), "a follower is alive");

    // Only the leader reconciles.
    apply(&client, &ns, small_run("before")).await;
    assert_eq!(finished(&runs, "before").await.phase, RunPhase::Succeeded);
    assert!(leader.metric("volt_reconciles_total").await > 0.0);
    assert_eq!(follower.metric("volt_reconciles_total").await, 0.0, "the follower reconciled");
    assert_eq!((leader.metric("volt_leader").await, follower.metric("volt_leader").await), (1.0, 0.0));
    let seen = reporters(&client, &ns, "before").await;
    assert_eq!(seen, BTreeSet::from([leader.name().to_string()]), "Events come from the leader only");

    // The leader dies: the follower takes over within the lease duration.
    let killed = Instant::now();
    leader.sigkill().await;
    wait_until("the follower to take over", LEASE_DURATION + Duration::from_secs(5), || async {
        leads(follower).await.then_some(())
    })
    .await;
    let takeover = killed.elapsed();
    eprintln!("[packaging] takeover after SIGKILL of the leader: {:.2}s", takeover.as_secs_f64());
    assert!(takeover <= LEASE_DURATION + Duration::from_secs(3), "took {takeover:?}");
    let held = holder(&leases, &lease).await.unwrap_or_default();
    assert!(held.starts_with(&format!("{}_", follower.name())), "holder {held}");
    apply(&client, &ns, small_run("after")).await;
    assert_eq!(finished(&runs, "after").await.phase, RunPhase::Succeeded);
    assert_eq!(reporters(&client, &ns, "after").await, BTreeSet::from([follower.name().to_string()]));

    // SIGTERM: the leader stops, releases the Lease and exits 0; the new replica takes over.
    let mut c = candidate("op-c", &ns, &lease, &dir);
    let second = the_leader(&[&*follower, &c], Duration::from_secs(30)).await;
    assert_eq!(second, 0, "the leader stays the leader");
    let stopped = Instant::now();
    follower.sigterm();
    assert_eq!(follower.exited(Duration::from_secs(15)).await, Some(0), "{}", follower.log_tail());
    let held = holder(&leases, &lease).await.unwrap_or_default();
    assert!(!held.starts_with(&format!("{}_", follower.name())), "the Lease was released, yet held by {held}");
    wait_until("the new replica to take over", LEASE_DURATION + Duration::from_secs(5), || async {
        leads(&c).await.then_some(())
    })
    .await;
    eprintln!("[packaging] takeover after SIGTERM of the leader: {:.2}s", stopped.elapsed().as_secs_f64());

    // Someone else holds the Lease now: the leader notices at its next renewal, stops
    // reconciling and exits with an error.
    let stolen = json!({"spec": {"holderIdentity": "intruder", "leaseDurationSeconds": 3600,
                                 "renewTime": k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
                                     k8s_openapi::jiff::Timestamp::now())}});
    leases.patch(&lease, &PatchParams::default(), &Patch::Merge(&stolen)).await.expect("take the Lease");
    let code = c.exited(LEASE_DURATION + Duration::from_secs(5)).await;
    assert_eq!(code, Some(1), "{}", c.log_tail());
    assert!(c.log_tail().contains("lost the leader-election Lease"), "{}", c.log_tail());
    helm_uninstall(&rel, &ns).await;
}

/// Breaks the Lease requests of a client on demand (they go to a path that does not exist).
#[derive(Clone, Default)]
struct LeaseFault(Arc<std::sync::atomic::AtomicBool>);

impl<S> tower::Layer<S> for LeaseFault {
    type Service = LeaseFaultService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        LeaseFaultService { inner, on: self.0.clone() }
    }
}

#[derive(Clone)]
struct LeaseFaultService<S> {
    inner: S,
    on: Arc<std::sync::atomic::AtomicBool>,
}

impl<S, B> tower::Service<http::Request<B>> for LeaseFaultService<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        if self.on.load(std::sync::atomic::Ordering::Relaxed) && req.uri().path().contains("/leases/") {
            let broken = req.uri().to_string().replace("/leases/", "/no-such-leases/");
            if let Ok(uri) = broken.parse() {
                *req.uri_mut() = uri;
            }
        }
        self.inner.call(req)
    }
}

/// In-process candidates (`leader::run`) on one Lease: a leader whose renewals fail steps down
/// within the grace period and stops its work, and the other candidate takes over.
#[tokio::test]
async fn a_leader_that_cannot_renew_steps_down() {
    use std::sync::atomic::Ordering;
    use volt_operator::controllers::Health;
    use volt_operator::leader;

    let cp = control_plane::shared();
    let client = cp.client().await;
    let ns = cp.namespace(&client, "pkg-renew").await;
    let config = kube_config(cp.kubeconfig_path()).await;
    struct Candidate {
        health: Arc<Health>,
        working: Arc<std::sync::atomic::AtomicBool>,
        fault: LeaseFault,
        task: tokio::task::JoinHandle<Result<(), leader::LeaderError>>,
        shutdown: tokio_util::sync::CancellationToken,
    }
    let start = |name: &str| {
        let fault = LeaseFault::default();
        let client =
            kube::client::ClientBuilder::try_from(config.clone()).expect("a client").with_layer(&fault).build();
        let settings = leader::Settings {
            lease_name: "renew-test".into(),
            namespace: ns.clone(),
            identity: name.to_string(),
            duration: 4,
            grace: 2,
        };
        let health = Arc::new(Health::default());
        let working = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let shutdown = tokio_util::sync::CancellationToken::new();
        let work = {
            let working = working.clone();
            move |term: tokio_util::sync::CancellationToken| async move {
                working.store(true, Ordering::Relaxed);
                term.cancelled().await;
                working.store(false, Ordering::Relaxed);
            }
        };
        let metrics = volt_operator::metrics::Metrics::new();
        let task = tokio::spawn({
            let (health, shutdown) = (health.clone(), shutdown.clone());
            async move { leader::run(client, settings, health, &metrics, shutdown, work).await }
        });
        Candidate { health, working, fault, task, shutdown }
    };
    let a = start("candidate-a");
    wait_until("candidate-a to lead", LONG, || async { a.health.leader.load(Ordering::Relaxed).then_some(()) }).await;
    let b = start("candidate-b");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(a.working.load(Ordering::Relaxed) && !b.health.leader.load(Ordering::Relaxed));

    // a's Lease requests fail from now on: it cannot renew, and steps down within its grace
    // after the next renewal (due within duration - grace).
    a.fault.0.store(true, Ordering::Relaxed);
    let broken = Instant::now();
    let result = tokio::time::timeout(Duration::from_secs(10), a.task).await.expect("a stepped down").expect("join");
    let stepped_down = broken.elapsed();
    match result {
        Err(leader::LeaderError::Lost { reason, .. }) => assert!(reason.contains("2s"), "{reason}"),
        other => panic!("expected Lost, got {other:?}"),
    }
    assert!(stepped_down <= Duration::from_secs(5), "{stepped_down:?}");
    assert!(!a.health.leader.load(Ordering::Relaxed) && !a.working.load(Ordering::Relaxed), "a stopped its work");
    // b takes the Lease once a's last renewal expires.
    wait_until("candidate-b to lead", Duration::from_secs(8), || async {
        b.health.leader.load(Ordering::Relaxed).then_some(())
    })
    .await;
    assert!(b.working.load(Ordering::Relaxed));
    eprintln!(
        "[packaging] a leader that cannot renew stepped down after {:.2}s; the other led {:.2}s after the fault",
        stepped_down.as_secs_f64(),
        broken.elapsed().as_secs_f64()
    );
    // Shutdown releases the Lease.
    b.shutdown.cancel();
    assert!(matches!(b.task.await, Ok(Ok(()))));
    assert!(!b.working.load(Ordering::Relaxed));
    let leases: Api<Lease> = Api::namespaced(client, &ns);
    assert_eq!(holder(&leases, "renew-test").await, None, "released on shutdown");
    a.shutdown.cancel();
}
