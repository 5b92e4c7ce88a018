//! Working in the test cluster: a namespace of one's own with its APIs ([`Env`]), server-side
//! apply of volt objects, and identities for the operator (the chart's RBAC as a Role for the
//! operator user, or the chart's ServiceAccount and its token).

use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::api::rbac::v1::{ClusterRoleBinding, Role, RoleBinding};
use kube::Client;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use volt_operator::api::{Agent, Workflow, WorkflowRun, WorkflowRunStatus};

use super::control_plane::{self, OPERATOR_USER};
use super::wait::{run_finished, wait_until};

/// Server-side applies a volt object (Agent, Workflow or WorkflowRun, by its `kind`) in `ns` as
/// field manager `manager`; panics naming the object if the API server refuses it.
pub async fn apply_as(client: &Client, ns: &str, obj: Value, manager: &str) {
    let kind = obj["kind"].as_str().unwrap_or_default().to_string();
    let name = obj["metadata"]["name"].as_str().unwrap_or_default().to_string();
    let ar = match kind.as_str() {
        "WorkflowRun" => ApiResource::erase::<WorkflowRun>(&()),
        "Workflow" => ApiResource::erase::<Workflow>(&()),
        "Agent" => ApiResource::erase::<Agent>(&()),
        "Budget" => ApiResource::erase::<volt_operator::api::Budget>(&()),
        other => panic!("unexpected kind {other}"),
    };
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &ar);
    api.patch(&name, &PatchParams::apply(manager).force(), &Patch::Apply(&obj))
        .await
        .unwrap_or_else(|err| panic!("apply {kind}/{name}: {err}"));
}

/// [`apply_as`] field manager `test`.
pub async fn apply(client: &Client, ns: &str, obj: Value) {
    apply_as(client, ns, obj, "test").await;
}

/// A fresh namespace of the shared control plane and admin APIs for it.
#[derive(Clone)]
pub struct Env {
    pub client: Client,
    pub ns: String,
    pub runs: Api<WorkflowRun>,
    pub pods: Api<Pod>,
    pub agents: Api<Agent>,
}

impl Env {
    /// A namespace named after `prefix` ([`ControlPlane::namespace`]).
    pub async fn new(prefix: &str) -> Env {
        let cp = control_plane::shared();
        let client = cp.client().await;
        let ns = cp.namespace(&client, prefix).await;
        Env {
            runs: Api::namespaced(client.clone(), &ns),
            pods: Api::namespaced(client.clone(), &ns),
            agents: Api::namespaced(client.clone(), &ns),
            client,
            ns,
        }
    }

    /// [`apply`]s `obj` in this namespace.
    pub async fn apply(&self, obj: Value) {
        apply(&self.client, &self.ns, obj).await;
    }

    /// Waits until run `name` has finished; its status.
    pub async fn finished(&self, name: &str, timeout: Duration) -> WorkflowRunStatus {
        run_finished(&self.runs, name, timeout).await
    }
}

/// The chart's ClusterRole rules (from `manifests/install.yaml`) as a Role in `ns`, and its
/// `system:auth-delegator` binding, for the operator user ([`OPERATOR_USER`], whose kubeconfig is
/// [`ControlPlane::operator_kubeconfig_path`]): the operator gets what the chart gives it in `ns`
/// and nothing more.
pub async fn grant_operator(client: &Client, ns: &str) {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/manifests/install.yaml"))
        .expect("read manifests/install.yaml");
    let docs: Vec<Value> = serde_saphyr::from_multiple(&text).expect("manifests/install.yaml parses");
    let rules = docs
        .iter()
        .find(|d| d["kind"] == "ClusterRole" && d["metadata"]["name"] == "volt-operator")
        .map(|d| d["rules"].clone())
        .expect("the chart's ClusterRole volt-operator");
    let params = PatchParams::apply("test").force();
    let role = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                      "metadata": {"name": "volt-operator", "namespace": ns}, "rules": rules});
    Api::<Role>::namespaced(client.clone(), ns)
        .patch("volt-operator", &params, &Patch::Apply(&role))
        .await
        .expect("apply the operator's Role");
    let binding = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                         "metadata": {"name": "volt-operator", "namespace": ns},
                         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "volt-operator"},
                         "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": OPERATOR_USER}]});
    Api::<RoleBinding>::namespaced(client.clone(), ns)
        .patch("volt-operator", &params, &Patch::Apply(&binding))
        .await
        .expect("apply the operator's RoleBinding");
    // As the chart does: TokenReview and SubjectAccessReview for the HTTP API's callers.
    let delegator = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                           "metadata": {"name": "volt-operator-auth-delegator"},
                           "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:auth-delegator"},
                           "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": OPERATOR_USER}]});
    Api::<ClusterRoleBinding>::all(client.clone())
        .patch("volt-operator-auth-delegator", &params, &Patch::Apply(&delegator))
        .await
        .expect("apply the operator's auth-delegator ClusterRoleBinding");
}

/// A token of ServiceAccount `account` in `ns`, from a token Secret `<account>-token` (any
/// Kubernetes version fills one in); panics if none comes within 90 s.
pub async fn service_account_token(client: &Client, ns: &str, account: &str) -> String {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let name = format!("{account}-token");
    let token_secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": name, "annotations": {"kubernetes.io/service-account.name": account}},
        "type": "kubernetes.io/service-account-token"
    }))
    .expect("secret");
    secrets.create(&PostParams::default(), &token_secret).await.expect("create the token Secret");
    wait_until("the ServiceAccount token", Duration::from_secs(90), || async {
        let s = secrets.get(&name).await.ok()?;
        let bytes = s.data?.get("token")?.0.clone();
        String::from_utf8(bytes).ok().filter(|t| !t.is_empty())
    })
    .await
}

/// A ServiceAccount `account` in `ns` with a Role of `rules` there (none when `rules` is an
/// empty array), and a token of it ([`service_account_token`]): a user of the operator's HTTP
/// API with exactly those rights.
pub async fn account_with_rules(client: &Client, ns: &str, account: &str, rules: Value) -> String {
    let params = PatchParams::apply("test").force();
    let sa = json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": account, "namespace": ns}});
    Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(client.clone(), ns)
        .patch(account, &params, &Patch::Apply(&sa))
        .await
        .expect("apply the ServiceAccount");
    if rules.as_array().is_some_and(|r| !r.is_empty()) {
        let role = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                          "metadata": {"name": account, "namespace": ns}, "rules": rules});
        Api::<Role>::namespaced(client.clone(), ns)
            .patch(account, &params, &Patch::Apply(&role))
            .await
            .expect("apply the account's Role");
        let binding = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                             "metadata": {"name": account, "namespace": ns},
                             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": account},
                             "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": ns}]});
        Api::<RoleBinding>::namespaced(client.clone(), ns)
            .patch(account, &params, &Patch::Apply(&binding))
            .await
            .expect("apply the account's RoleBinding");
    }
    service_account_token(client, ns, account).await
}

/// The operator's identity as the chart makes it: its ServiceAccount, a token of it, and a
/// kubeconfig with that token (for an operator process).
pub struct ChartIdentity {
    /// `<release>-volt-operator`.
    pub service_account: String,
    pub token: String,
    pub kubeconfig: PathBuf,
}

/// Installs the chart as `release` in `ns` of the shared control plane
/// ([`super::tools::helm_install`], with `sets`) for its ServiceAccount and RBAC, and returns
/// that identity; the kubeconfig is `<control plane dir>/<release>-operator.kubeconfig`.
pub async fn chart_identity(admin: &Client, release: &str, ns: &str, sets: &[String]) -> ChartIdentity {
    super::tools::helm_install(release, ns, sets).await;
    let cp = control_plane::shared();
    let service_account = format!("{release}-volt-operator");
    let token = service_account_token(admin, ns, &service_account).await;
    let kubeconfig = cp.write_kubeconfig_with_token(&format!("{release}-operator"), &token);
    ChartIdentity { service_account, token, kubeconfig }
}
