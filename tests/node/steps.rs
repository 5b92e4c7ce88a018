//! Container steps on the real node: root and non-root images, the step's security context,
//! volumes, termination messages as outputs, `kubectl logs`, timeouts and cancel that stop the
//! real containers, image pull errors and OOM kills as clear failures.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use volt_operator::api::{RunPhase, StepPhase, WorkflowRun};
use volt_operator::naming;

use crate::cluster::{self, apply, finished, operator, processes_with_argv};
use crate::kit::{self, kubectl, step, wait_until};

const RUN_TIMEOUT: Duration = Duration::from_secs(120);

#[tokio::test]
async fn root_and_non_root_images_run_with_their_outputs_volumes_and_logs() {
    let node = cluster::shared();
    let cp = kit::shared();
    let client = cp.client().await;
    let ns = cp.namespace(&client, "node-images").await;
    let logs = kit::LogDir::new(&ns);
    let _op = operator(&ns, &logs).await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let cm: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "greeting"}, "data": {"greeting": "hello from a ConfigMap"}
    }))
    .unwrap();
    cms.create(&PostParams::default(), &cm).await.expect("ConfigMap");
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let secret: Secret =
        serde_json::from_value(json!({"metadata": {"name": "token"}, "stringData": {"token": "s3cret"}})).unwrap();
    secrets.create(&PostParams::default(), &secret).await.expect("Secret");

    let (busybox, nonroot) = (&node.images.busybox, &node.images.nonroot);
    apply(
        &ns,
        &format!(
            r#"
apiVersion: volt.dev/v1alpha1
kind: WorkflowRun
metadata: {{name: images}}
spec:
  workflow:
    steps:
    # busybox runs as root unless told otherwise: the operator names user 65532.
    - id: root-image
      container:
        image: {busybox}
        command: [sh, -c, 'echo "hello from the log"; echo "uid=$(id -u) gid=$(id -g)" > /dev/termination-log']
    - id: chosen-user
      container:
        image: {busybox}
        command: [sh, -c, 'id -u > /dev/termination-log']
        securityContext: {{runAsUser: 1001, runAsGroup: 1001}}
    # A non-root image whose user (1001) owns /home/app: the step names that user to write there.
    - id: nonroot-image
      container:
        image: {nonroot}
        command: [sh, -c, 'echo ok > /home/app/out && echo "$(id -u) wrote $(cat /home/app/out)" > /dev/termination-log']
        securityContext: {{runAsUser: 1001}}
    - id: nonroot-default
      container:
        image: {nonroot}
        command: [sh, -c, 'id -u > /dev/termination-log']
    # A build with a workspace: emptyDir, a ConfigMap and a Secret, on a read-only root.
    - id: workspace
      container:
        image: {busybox}
        workingDir: /work
        command: [sh, -c]
        args:
        - >-
          echo built > out && {{ cat out; echo "$(cat /config/greeting)"; echo "$(cat /secret/token)";
          if touch /not-here 2>/dev/null; then echo root-writable; else echo root-read-only; fi; }} > /dev/termination-log
        securityContext: {{readOnlyRootFilesystem: true}}
        volumes:
        - {{name: work, emptyDir: {{sizeLimit: 64Mi}}}}
        - {{name: config, configMap: {{name: greeting}}}}
        - {{name: secret, secret: {{secretName: token, defaultMode: 0444}}}}
        volumeMounts:
        - {{name: work, mountPath: /work}}
        - {{name: config, mountPath: /config, readOnly: true}}
        - {{name: secret, mountPath: /secret, readOnly: true}}
"#
        ),
    );
    let status = finished(&client, &ns, "images", RUN_TIMEOUT).await;
    assert_eq!(status.phase, RunPhase::Succeeded, "{status:#?}");
    let out = |key: &str| step(&status, key).output.clone().unwrap_or_default().trim().to_string();
    assert_eq!(out("root-image"), "uid=65532 gid=65532");
    assert_eq!(out("chosen-user"), "1001");
    assert_eq!(out("nonroot-image"), "1001 wrote ok");
    assert_eq!(out("nonroot-default"), "65532");
    assert_eq!(out("workspace"), "built\nhello from a ConfigMap\ns3cret\nroot-read-only");

    // The pods are what the kubelet ran: restricted, non-root, and their logs are there.
    let pod_name = naming::pod_name("images", "root-image", 1);
    let pod = Api::<Pod>::namespaced(client.clone(), &ns).get(&pod_name).await.expect("the step pod");
    let spec = pod.spec.expect("spec");
    let psc = spec.security_context.expect("pod security context");
    assert_eq!((psc.run_as_non_root, psc.run_as_user), (Some(true), Some(65532)));
    assert_eq!(spec.node_name.as_deref(), Some(cluster::NODE_NAME), "scheduled on the real node");
    let (ok, out, err) = kubectl(&["logs", "-n", &ns, &pod_name]).parts();
    assert!(ok && out.contains("hello from the log"), "kubectl logs: {err}{out}");
    // The plugin reads the same log through the API, under the step's name.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_kubectl-volt"))
        .args(["logs", "images", "root-image", "-n", &ns])
        .env("KUBECONFIG", kit::shared().kubeconfig_path())
        .output()
        .await
        .expect("kubectl-volt");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("==> root-image (Succeeded) <==") && text.contains("hello from the log"), "{text}");
}

/// The pids of the processes `sleep <marker>` (a container's, seen from the host).
fn sleeping(marker: &str) -> Vec<u32> {
    processes_with_argv(&["sleep", marker])
}

/// Waits until the container of run `run`'s step `sleepy` (its process `sleep <marker>`) has
/// stopped; on a timeout, says what its pod and the operator were doing.
async fn container_stops(client: &kube::Client, ns: &str, run: &str, marker: &str, op: &kit::OperatorProcess) {
    let deadline = Instant::now() + Duration::from_secs(45);
    while !sleeping(marker).is_empty() {
        if Instant::now() > deadline {
            let pod = Api::<Pod>::namespaced(client.clone(), ns).get_opt(&naming::pod_name(run, "sleepy", 1)).await;
            let pod =
                pod.ok().flatten().map(|p| (p.metadata.deletion_timestamp, p.status.map(|s| (s.phase, s.reason))));
            panic!(
                "the container of {run} still runs 45 s on; its pod (deletion, status): {pod:?}\n--- operator\n{}\n--- kubelet\n{}",
                op.log_tail(),
                cluster::shared().kubelet_log()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_timeout_and_a_cancel_stop_the_real_containers() {
    let node = cluster::shared();
    let cp = kit::shared();
    let client = cp.client().await;
    let ns = cp.namespace(&client, "node-stop").await;
    let logs = kit::LogDir::new(&ns);
    let op = operator(&ns, &logs).await;
    let busybox = &node.images.busybox;
    let (timed, cancelled) = (format!("{}", 100_000 + cluster::random()), format!("{}", 200_000 + cluster::random()));
    // The shell forwards SIGTERM, as a well-behaved step does: the container stops at once.
    let sleeper = |marker: &str| format!("trap 'exit 143' TERM; sleep {marker} & wait");
    apply(
        &ns,
        &format!(
            r#"
apiVersion: volt.dev/v1alpha1
kind: WorkflowRun
metadata: {{name: timed}}
spec:
  workflow:
    steps:
    - id: sleepy
      timeoutSeconds: 6
      container: {{image: {busybox}, command: [sh, -c, "{}"]}}
---
apiVersion: volt.dev/v1alpha1
kind: WorkflowRun
metadata: {{name: cancelled}}
spec:
  workflow:
    steps:
    - id: sleepy
      container: {{image: {busybox}, command: [sh, -c, "{}"]}}
"#,
            sleeper(&timed),
            sleeper(&cancelled)
        ),
    );
    // Both containers really run on this machine.
    wait_until("both containers to run", Duration::from_secs(60), || async {
        (!sleeping(&timed).is_empty() && !sleeping(&cancelled).is_empty()).then_some(())
    })
    .await;

    // Cancel one: the run is Cancelled, its pod deleted and its container gone.
    let runs: Api<WorkflowRun> = Api::namespaced(client.clone(), &ns);
    let cancel_at = Instant::now();
    runs.patch("cancelled", &PatchParams::default(), &Patch::Merge(json!({"spec": {"cancel": true}})))
        .await
        .expect("cancel");
    let status = finished(&client, &ns, "cancelled", RUN_TIMEOUT).await;
    assert_eq!(status.phase, RunPhase::Cancelled);
    container_stops(&client, &ns, "cancelled", &cancelled, &op).await;
    eprintln!("[node] cancel to container gone: {:.1}s", cancel_at.elapsed().as_secs_f64());

    // The other times out after 6 s: the step fails saying so, and its container is gone.
    let status = finished(&client, &ns, "timed", RUN_TIMEOUT).await;
    assert_eq!(status.phase, RunPhase::Failed);
    let row = step(&status, "sleepy");
    assert_eq!(row.phase, StepPhase::Failed);
    assert!(
        row.message.contains("timed out after 6s") || row.message.contains("DeadlineExceeded"),
        "a timeout, named: {}",
        row.message
    );
    container_stops(&client, &ns, "timed", &timed, &op).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    for name in [naming::pod_name("timed", "sleepy", 1), naming::pod_name("cancelled", "sleepy", 1)] {
        wait_until(&format!("pod {name} to be gone or finished"), Duration::from_secs(60), || async {
            match pods.get_opt(&name).await.ok()? {
                None => Some(()),
                Some(p) => {
                    let phase = p.status.and_then(|s| s.phase).unwrap_or_default();
                    (phase == "Failed" || phase == "Succeeded").then_some(())
                }
            }
        })
        .await;
    }
}

#[tokio::test]
async fn image_pull_errors_oom_kills_and_exit_codes_fail_the_step_naming_the_reason() {
    let node = cluster::shared();
    let cp = kit::shared();
    let client = cp.client().await;
    let ns = cp.namespace(&client, "node-faults").await;
    let logs = kit::LogDir::new(&ns);
    let _op = operator(&ns, &logs).await;
    let busybox = &node.images.busybox;
    apply(
        &ns,
        &format!(
            r#"
apiVersion: volt.dev/v1alpha1
kind: WorkflowRun
metadata: {{name: faults}}
spec:
  workflow:
    steps:
    - id: pull
      continueOnError: true
      container: {{image: "registry.invalid/volt/missing:1", command: ["true"]}}
    - id: oom
      continueOnError: true
      container:
        image: {busybox}
        command: [sh, -c, 'big=$(head -c 100000000 /dev/zero | tr "\0" x); echo survived > /dev/termination-log']
        resources: {{limits: {{memory: 16Mi}}}}
    - id: exit
      continueOnError: true
      container: {{image: {busybox}, command: [sh, -c, 'echo "tests: 3 failed" >&2; exit 3']}}
"#
        ),
    );
    let status = finished(&client, &ns, "faults", RUN_TIMEOUT).await;
    let message = |key: &str| {
        let row = step(&status, key);
        assert_eq!(row.phase, StepPhase::Failed, "{key}: {row:#?}");
        row.message.clone()
    };
    let pull = message("pull");
    assert!(
        pull.starts_with("the image \"registry.invalid/volt/missing:1\" cannot be pulled (ErrImagePull")
            || pull.starts_with("the image \"registry.invalid/volt/missing:1\" cannot be pulled (ImagePullBackOff"),
        "{pull}"
    );
    let oom = message("oom");
    assert!(
        oom.starts_with("the container ran out of memory and was killed (OOMKilled, exit code 137)")
            && oom.contains("resources.limits.memory"),
        "{oom}"
    );
    let exit = message("exit");
    assert_eq!(exit, "container exited with code 3 (Error): tests: 3 failed");
}
