//! `kubectl volt` against the real control plane, with the caller's kubeconfig: submit, get as
//! a tree (a loop, a fan-out, a child run), approve, logs (outputs and an agent transcript),
//! retry --from (fork and replay), submit --watch's exit code, kubectl's plugin discovery,
//! completions, lint, and a user whose RBAC forbids approving getting a clear error.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use volt_operator::api::{RunPhase, StepPhase};

use crate::kit::openai::{Reply, Stub};
use crate::kit::{self, Env, Operator, endpoint_agent, step, wait_for};

const LONG: Duration = Duration::from_secs(90);

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs the plugin without blocking the test's runtime (the operator under test runs on it).
async fn volt(kubeconfig: &Path, args: &[&str]) -> Out {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_kubectl-volt"))
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .env("NO_COLOR", "1")
        .output()
        .await
        .expect("run kubectl-volt");
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The name in `workflowrun.volt.dev/<name> created`.
fn created(out: &Out) -> String {
    out.stdout
        .lines()
        .find_map(|l| l.strip_prefix("workflowrun.volt.dev/").and_then(|r| r.strip_suffix(" created")))
        .unwrap_or_else(|| panic!("no run created: {}{}", out.stdout, out.stderr))
        .to_string()
}

#[tokio::test]
async fn kubectl_volt_submits_shows_decides_logs_and_retries_runs_with_the_callers_rights() {
    let e = Env::new("plugin").await;
    let _op = Operator::start(&e.ns).await;
    let admin: PathBuf = kit::shared().kubeconfig_path().to_path_buf();
    let stub = Stub::start("plugin-model", Duration::ZERO).await;
    stub.always(Reply::Content("a haiku about ada".into()));
    e.apply(endpoint_agent("poet", &stub.base_url(), json!({}))).await;
    e.apply(json!({"apiVersion": "volt.dev/v1alpha1", "kind": "Workflow", "metadata": {"name": "inner"},
        "spec": {"output": "inner done", "steps": [{"id": "x", "template": "x"}]}}))
        .await;
    e.apply(json!({"apiVersion": "volt.dev/v1alpha1", "kind": "Workflow", "metadata": {"name": "greet"},
    "spec": {"params": [{"name": "name"}], "steps": [
        {"id": "hello", "template": "hi {{ params.name }}"},
        {"id": "poem", "dependsOn": ["hello"], "agent": {"ref": "poet", "prompt": "a poem for {{ params.name }}"}},
        {"id": "rounds", "dependsOn": ["hello"], "loop": {"maxIterations": 2, "until": "loop.iteration == 2",
            "steps": [{"id": "draft", "template": "draft {{ loop.iteration }}"}]}},
        {"id": "fan", "dependsOn": ["hello"], "forEach": "[1, 2]", "template": "item {{ item }}"},
        {"id": "child", "dependsOn": ["hello"], "workflow": {"ref": "inner"}},
        {"id": "gate", "dependsOn": ["poem", "rounds", "fan", "child"], "approval": {"message": "publish?"}},
        {"id": "tail", "dependsOn": ["gate"], "template": "{{ steps.hello.output }} / {{ steps.gate.output }}"}
    ]}}))
    .await;

    let out = volt(&admin, &["submit", "greet", "-p", "name=ada", "-n", &e.ns]).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    let run = created(&out);
    wait_for(&e.runs, &run, LONG, |r| {
        r.status.as_ref().is_some_and(|s| s.steps.get("gate").is_some_and(|g| g.phase == StepPhase::Waiting))
    })
    .await;

    // get: a tree.
    let out = volt(&admin, &["get", &run, "-n", &e.ns]).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    let tree = out.stdout;
    assert!(tree.contains(&format!("Run {run}  Workflow greet  Phase Running")), "{tree}");
    assert!(tree.lines().any(|l| l.starts_with("gate") && l.contains("Waiting") && l.contains("publish?")), "{tree}");
    assert!(tree.contains("├─ iteration 1") && tree.contains("│  └─ draft"), "{tree}");
    assert!(tree.contains("├─ [0]") && tree.contains("└─ [1]"), "{tree}");
    assert!(tree.contains(&format!("└─ run {run}-child-1")) && tree.contains("   └─ x"), "{tree}");
    assert!(tree.lines().any(|l| l.starts_with("poem") && l.contains("Succeeded")), "{tree}");
    // -o json is data.
    let out = volt(&admin, &["get", &run, "-n", &e.ns, "-o", "json"]).await;
    let nodes: Value = serde_json::from_str(&out.stdout).expect("json");
    assert_eq!(nodes[0]["label"], "hello");
    assert_eq!(nodes[0]["info"], "output: hi ada");
    let out = volt(&admin, &["get", &run, "-n", &e.ns, "-o", "yaml"]).await;
    assert!(out.stdout.contains("label: hello"), "{}", out.stdout);

    // A user who may read runs but not patch them cannot approve, and is told why.
    let viewer = viewer_kubeconfig(&e).await;
    let out = volt(&viewer, &["get", &run, "-n", &e.ns]).await;
    assert_eq!(out.code, 0, "the viewer may read: {}", out.stderr);
    let out = volt(&viewer, &["approve", &run, "gate", "-n", &e.ns]).await;
    assert_ne!(out.code, 0);
    assert!(
        out.stderr.contains("forbidden:") && out.stderr.contains("cannot patch resource \"workflowruns\""),
        "{}",
        out.stderr
    );

    // Approving a step that does not wait says what does.
    let out = volt(&admin, &["approve", &run, "hello", "-n", &e.ns]).await;
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains("not waiting for a decision (waiting: gate)"), "{}", out.stderr);
    let out = volt(&admin, &["approve", &run, "gate", "-m", "lovely", "-n", &e.ns]).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    let s = e.finished(&run, LONG).await;
    assert_eq!(s.phase, RunPhase::Succeeded, "{s:#?}");
    assert_eq!(step(&s, "tail").output.as_deref(), Some("hi ada / lovely"));
    let r = e.runs.get(&run).await.expect("run");
    assert!(r.spec.decisions["gate"].by.as_deref().is_some_and(|b| !b.is_empty()), "by is the caller");

    // logs: outputs, and the agent's transcript.
    let out = volt(&admin, &["logs", &run, "-n", &e.ns]).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.contains("==> hello (Succeeded) <==\nhi ada"), "{}", out.stdout);
    assert!(
        out.stdout.contains("[user] a poem for ada") && out.stdout.contains("[assistant] a haiku about ada"),
        "{}",
        out.stdout
    );
    let out = volt(&admin, &["logs", &run, "rounds", "-n", &e.ns]).await;
    assert!(
        out.stdout.contains("==> rounds.2.draft (Succeeded) <==\ndraft 2") && !out.stdout.contains("hello"),
        "{}",
        out.stdout
    );

    // retry --from tail: the steps before it give their recorded outputs; only tail runs.
    let calls = stub.requests();
    let out = volt(&admin, &["retry", &run, "--from", "tail", "--watch", "-n", &e.ns]).await;
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    let again = created(&out);
    assert!(
        out.stdout.contains("reusing the recorded outputs of: hello, poem, rounds, fan, child, gate"),
        "{}",
        out.stdout
    );
    let s = e.finished(&again, LONG).await;
    assert_eq!(step(&s, "tail").output.as_deref(), Some("hi ada / lovely"));
    assert_eq!(stub.requests(), calls, "the agent step was not called again");
    let r = e.runs.get(&again).await.expect("the retry");
    assert_eq!(r.metadata.labels.unwrap_or_default().get("volt.dev/retry-of"), Some(&run));

    // submit --watch: the exit code is the run's.
    e.apply(json!({"apiVersion": "volt.dev/v1alpha1", "kind": "Workflow", "metadata": {"name": "broken"},
        "spec": {"steps": [{"id": "bad", "template": "{{ nope }}"}]}}))
        .await;
    let out = volt(&admin, &["submit", "broken", "--watch", "-n", &e.ns]).await;
    assert_eq!(out.code, 1, "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("Phase Failed"), "{}", out.stdout);

    // kubectl finds the plugin on the PATH.
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_kubectl-volt")).parent().expect("dir").to_path_buf();
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
    let out = tokio::process::Command::new("kubectl")
        .args(["volt", "get", &run, "-n", &e.ns])
        .env("PATH", path)
        .env("KUBECONFIG", &admin)
        .output()
        .await
        .expect("kubectl");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("Phase Succeeded"));

    let out = volt(&admin, &["completion", "bash"]).await;
    assert!(out.code == 0 && out.stdout.contains("kubectl-volt"), "{}", out.stderr);
    let out = volt(&admin, &["lint", "tests/corpus/bad-objects.yaml"]).await;
    assert_eq!(out.code, 2, "{}{}", out.stdout, out.stderr);
}

/// A kubeconfig of ServiceAccount `viewer`, which may get, list and watch runs in the namespace.
async fn viewer_kubeconfig(e: &Env) -> PathBuf {
    use k8s_openapi::api::core::v1::ServiceAccount;
    use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
    use kube::Api;
    use kube::api::{Patch, PatchParams};
    let params = PatchParams::apply("test").force();
    let sa = json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "viewer"}});
    Api::<ServiceAccount>::namespaced(e.client.clone(), &e.ns)
        .patch("viewer", &params, &Patch::Apply(&sa))
        .await
        .expect("sa");
    let role = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "viewer"},
        "rules": [{"apiGroups": ["volt.dev"], "resources": ["workflowruns"], "verbs": ["get", "list", "watch"]}]});
    Api::<Role>::namespaced(e.client.clone(), &e.ns)
        .patch("viewer", &params, &Patch::Apply(&role))
        .await
        .expect("role");
    let binding = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "viewer"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "viewer"},
        "subjects": [{"kind": "ServiceAccount", "name": "viewer", "namespace": e.ns}]});
    Api::<RoleBinding>::namespaced(e.client.clone(), &e.ns)
        .patch("viewer", &params, &Patch::Apply(&binding))
        .await
        .expect("binding");
    let token = kit::service_account_token(&e.client, &e.ns, "viewer").await;
    kit::shared().write_kubeconfig_with_token(&format!("viewer-{}", e.ns), &token)
}
