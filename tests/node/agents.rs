//! Agent replicas as real pods: a deployment-mode Agent whose replicas run the stub model server
//! image; the kubelet's readiness probes decide which replicas get calls.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use volt_operator::api::{Agent, RunPhase};

use crate::cluster::{self, apply, finished, http, operator};
use crate::kit::{self, wait_until};

const LONG: Duration = Duration::from_secs(120);

/// The replicas that served the `forEach` children of step `ask` in run `name`.
async fn served_by(client: &kube::Client, ns: &str, name: &str, calls: usize) -> Vec<String> {
    let status = finished(client, ns, name, LONG).await;
    assert_eq!(status.phase, RunPhase::Succeeded, "{status:#?}");
    let replicas: Vec<String> =
        (0..calls).map(|i| status.steps[&format!("ask[{i}]")].replica.clone().unwrap_or_default()).collect();
    for (i, replica) in replicas.iter().enumerate() {
        let output = status.steps[&format!("ask[{i}]")].output.clone().unwrap_or_default();
        assert!(output.starts_with(&format!("[stub {replica}] Say {i}")), "the stub's answer: {output}");
    }
    replicas
}

fn run_yaml(name: &str, agent: &str, calls: usize) -> String {
    format!(
        "apiVersion: volt.dev/v1alpha1\nkind: WorkflowRun\nmetadata: {{name: {name}}}\nspec:\n  workflow:\n    steps:\n    \
         - {{id: ask, forEach: '{list}', maxParallel: 2, agent: {{ref: {agent}, strategy: round_robin, prompt: 'Say {{{{ item }}}}'}}}}\n",
        list = serde_json::to_string(&(0..calls).collect::<Vec<_>>()).unwrap()
    )
}

/// Healthy replicas in the Agent's status.
async fn healthy(agents: &Api<Agent>, name: &str) -> Option<i32> {
    agents.get_opt(name).await.ok()??.status.map(|s| s.replicas.healthy)
}

#[tokio::test]
async fn agent_replicas_are_real_pods_whose_readiness_drives_balancing() {
    let node = cluster::shared();
    let cp = kit::shared();
    let client = cp.client().await;
    let ns = cp.namespace(&client, "node-agents").await;
    let logs = kit::LogDir::new(&ns);
    let _op = operator(&ns, &logs).await;
    apply(
        &ns,
        &format!(
            r#"
apiVersion: volt.dev/v1alpha1
kind: Agent
metadata: {{name: coder}}
spec:
  model: stub
  instructions: You are a stub.
  capabilities: [code]
  maxConcurrency: 4
  deployment:
    replicas: 2
    port: 8000
    path: /v1
    template:
      spec:
        containers:
        - name: model
          image: {stub}
          args: [--port, "8000"]
          env: [{{name: POD_NAME, valueFrom: {{fieldRef: {{fieldPath: metadata.name}}}}}}]
          ports: [{{containerPort: 8000}}]
          readinessProbe: {{httpGet: {{path: /health, port: 8000}}, periodSeconds: 1, failureThreshold: 1}}
"#,
            stub = node.images.stub
        ),
    );
    let agents: Api<Agent> = Api::namespaced(client.clone(), &ns);
    wait_until("2 healthy replicas", LONG, || async { (healthy(&agents, "coder").await == Some(2)).then_some(()) })
        .await;

    // Both replicas serve calls.
    apply(&ns, &run_yaml("both", "coder", 6));
    let used: BTreeSet<String> = served_by(&client, &ns, "both", 6).await.into_iter().collect();
    assert_eq!(used.len(), 2, "both replicas served: {used:?}");

    // One replica fails its readiness probe: the kubelet marks its pod not Ready, the operator
    // takes it out of rotation, and every call goes to the other.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let list = pods.list(&ListParams::default().labels("volt.dev/agent=coder")).await.expect("replica pods");
    assert_eq!(list.items.len(), 2);
    let pod = &list.items[1];
    let name = pod.metadata.name.clone().unwrap_or_default();
    let ip = pod.status.as_ref().and_then(|s| s.pod_ip.clone()).expect("a pod IP");
    let addr: SocketAddr = format!("{ip}:8000").parse().expect("an address");
    let answer = http(addr, "POST", "/admin/ready?value=false").await;
    assert_eq!(answer.map(|a| a.0), Some(200), "the stub on {addr}");
    wait_until("the replica's pod to be not Ready", Duration::from_secs(30), || async {
        let p = pods.get(&name).await.ok()?;
        let ready = p.status?.conditions?.into_iter().find(|c| c.type_ == "Ready")?.status;
        (ready == "False").then_some(())
    })
    .await;
    wait_until("1 healthy replica", Duration::from_secs(30), || async {
        (healthy(&agents, "coder").await == Some(1)).then_some(())
    })
    .await;
    let agent = agents.get("coder").await.expect("the Agent");
    let row = agent.status.unwrap_or_default().endpoints.into_iter().find(|e| e.pod == name).expect("its row");
    assert!(!row.healthy && row.reason.contains("NotReady"), "{row:?}");
    let requests_before = stub_requests(addr).await;
    apply(&ns, &run_yaml("one", "coder", 4));
    let used: BTreeSet<String> = served_by(&client, &ns, "one", 4).await.into_iter().collect();
    assert!(used.len() == 1 && !used.contains(&name), "only the Ready replica served: {used:?}");
    assert_eq!(stub_requests(addr).await, requests_before, "the unready replica got no call");

    // Ready again: back in rotation.
    assert_eq!(http(addr, "POST", "/admin/ready?value=true").await.map(|a| a.0), Some(200));
    wait_until("2 healthy replicas again", Duration::from_secs(30), || async {
        (healthy(&agents, "coder").await == Some(2)).then_some(())
    })
    .await;
    apply(&ns, &run_yaml("again", "coder", 4));
    let used: BTreeSet<String> = served_by(&client, &ns, "again", 4).await.into_iter().collect();
    assert!(used.contains(&name), "the replica serves again: {used:?}");
}

async fn stub_requests(addr: SocketAddr) -> u64 {
    let (_, body) = http(addr, "GET", "/admin/stats").await.expect("the stub's stats");
    let stats: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    stats["requests"].as_u64().unwrap_or_default()
}
