//! Tests of the fixture itself: the control plane serves, the CRDs are installed, the controller
//! manager runs Deployments and garbage collection, RBAC holds for the operator user, the
//! kubelet stand-in writes believable pod status, and test namespaces get valid names.

use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::{
    api::{
        apps::v1::{Deployment, DeploymentSpec},
        authorization::v1::{ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec},
        core::v1::{ConfigMap, Container, Pod, PodSpec, PodTemplateSpec},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    apimachinery::pkg::apis::meta::v1::{LabelSelector, OwnerReference},
};
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams},
};

use crate::kit::{
    self,
    control_plane::{OPERATOR_USER, namespace_name},
    kubelet::{self, Kubelet, PodPlan},
    wait_until,
};

const TIMEOUT: Duration = Duration::from_secs(60);

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn pod(name: &str, label: &str, containers: &[&str]) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            labels: Some(labels(&[("test", label)])),
            ..Default::default()
        },
        spec: Some(PodSpec {
            containers: containers
                .iter()
                .map(|c| Container {
                    name: c.to_string(),
                    image: Some("busybox:1.36".to_string()),
                    ..Default::default()
                })
                .collect(),
            restart_policy: Some("Never".to_string()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn condition(pod: &Pod, type_: &str) -> Option<String> {
    pod.status.as_ref()?.conditions.as_ref()?.iter().find(|c| c.type_ == type_).map(|c| c.status.clone())
}

fn phase(pod: &Pod) -> Option<&str> {
    pod.status.as_ref()?.phase.as_deref()
}

#[tokio::test]
async fn control_plane_is_ready() {
    let control_plane = kit::shared();
    let client = control_plane.client().await;
    let readyz = client
        .request_text(http::Request::get("/readyz").body(Vec::new()).expect("a request"))
        .await
        .expect("GET /readyz");
    assert_eq!(readyz.trim(), "ok");
    if !control_plane.is_external() {
        let version = client.apiserver_version().await.expect("GET /version");
        assert_eq!((version.major.as_str(), version.minor.as_str()), ("1", "20"));
        assert!(control_plane.server_url().starts_with("https://127.0.0.1:"));
    }
    // The kubeconfig works for kubectl too, when there is one.
    if let Ok(ran) = kit::tools::try_kubectl(&["get", "--raw", "/readyz"], None) {
        assert!(ran.ok, "kubectl get --raw /readyz: {}", ran.stderr);
        assert_eq!(ran.stdout.trim(), "ok");
    }
}

#[tokio::test]
async fn volt_crds_are_established() {
    let client = kit::shared().client().await;
    let api: Api<CustomResourceDefinition> = Api::all(client);
    let crds = volt_operator::api::crds();
    assert_eq!(crds.len(), 5);
    for crd in crds {
        let name = crd.metadata.name.expect("a CRD name");
        let current = api.get(&name).await.expect("the CRD is installed");
        let established = current
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .into_iter()
            .any(|c| c.type_ == "Established" && c.status == "True");
        assert!(established, "CRD {name} is not Established");
    }
}

#[tokio::test]
async fn deployment_pods_run_and_become_available() {
    let control_plane = kit::shared();
    let client = control_plane.client().await;
    let ns = control_plane.namespace(&client, "harness-deploy").await;
    let kubelet =
        Kubelet::start(client.clone(), &ns, Some("app=web".to_string()), kubelet::sequential_ips("10.244.1."));

    let app = labels(&[("app", "web")]);
    let deployment = Deployment {
        metadata: ObjectMeta { name: Some("web".to_string()), ..Default::default() },
        spec: DeploymentSpec {
            replicas: Some(2),
            selector: LabelSelector { match_labels: Some(app.clone()), ..Default::default() },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta { labels: Some(app), ..Default::default() }),
                spec: Some(PodSpec {
                    containers: vec![Container {
                        name: "web".to_string(),
                        image: Some("nginx:1.25".to_string()),
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
            },
            ..Default::default()
        },
        ..Default::default()
    };
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    deployments.create(&PostParams::default(), &deployment).await.expect("create the Deployment");

    wait_until("the Deployment to have 2 available replicas", TIMEOUT, || async {
        let d = deployments.get("web").await.ok()?;
        (d.status?.available_replicas == Some(2)).then_some(())
    })
    .await;

    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let listed = pods.list(&ListParams::default().labels("app=web")).await.expect("list pods");
    assert_eq!(listed.items.len(), 2);
    let mut ips = Vec::new();
    for pod in &listed.items {
        assert_eq!(phase(pod), Some("Running"));
        assert_eq!(condition(pod, "Ready").as_deref(), Some("True"));
        assert_eq!(condition(pod, "ContainersReady").as_deref(), Some("True"));
        let owner = &pod.metadata.owner_references.as_ref().expect("owned by the ReplicaSet")[0];
        assert_eq!(owner.kind, "ReplicaSet");
        let status = pod.status.as_ref().expect("a status");
        let container = &status.container_statuses.as_ref().expect("container statuses")[0];
        assert!(container.ready);
        assert!(container.state.as_ref().and_then(|s| s.running.as_ref()).is_some());
        ips.push(status.pod_ip.clone().expect("a pod IP"));
    }
    ips.sort();
    assert_eq!(ips, ["10.244.1.1", "10.244.1.2"]);
    assert_eq!(kubelet.handled().len(), 2);
}

#[tokio::test]
async fn owner_reference_garbage_collection() {
    let control_plane = kit::shared();
    let client = control_plane.client().await;
    let ns = control_plane.namespace(&client, "harness-gc").await;
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let owner = config_maps
        .create(
            &PostParams::default(),
            &ConfigMap {
                metadata: ObjectMeta { name: Some("owner".to_string()), ..Default::default() },
                ..Default::default()
            },
        )
        .await
        .expect("create the owner");
    let owned = ConfigMap {
        metadata: ObjectMeta {
            name: Some("owned".to_string()),
            owner_references: Some(vec![OwnerReference {
                api_version: "v1".to_string(),
                kind: "ConfigMap".to_string(),
                name: "owner".to_string(),
                uid: owner.metadata.uid.expect("the owner's UID"),
                ..Default::default()
            }]),
            ..Default::default()
        },
        ..Default::default()
    };
    config_maps.create(&PostParams::default(), &owned).await.expect("create the owned ConfigMap");
    config_maps.delete("owner", &DeleteParams::default()).await.expect("delete the owner");
    wait_until("the garbage collector to delete the owned ConfigMap", TIMEOUT, || async {
        matches!(config_maps.get_opt("owned").await, Ok(None)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn operator_user_is_authenticated_but_not_admin() {
    let control_plane = kit::shared();
    let operator = control_plane.client_as_operator().await;

    // Authenticated: any signed-in user may ask what it may do.
    let reviews: Api<SelfSubjectAccessReview> = Api::all(operator.clone());
    let review = SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                verb: Some("list".to_string()),
                resource: Some("pods".to_string()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let answer = reviews.create(&PostParams::default(), &review).await.expect("the operator user is authenticated");
    assert!(!answer.status.expect("a review status").allowed);

    // Not authorized: listing pods cluster-wide is forbidden.
    let pods: Api<Pod> = Api::all(operator);
    match pods.list(&ListParams::default()).await {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 403, "{status:?}");
            assert!(status.message.contains(OPERATOR_USER), "{}", status.message);
        }
        other => panic!("expected 403 Forbidden, got {other:?}"),
    }

    // And a wrong token is not authenticated at all.
    if control_plane.operator_token().is_some() {
        let stranger: Client = control_plane.client_with_token("not-a-token").await;
        match Api::<Pod>::all(stranger).list(&ListParams::default()).await {
            Err(kube::Error::Api(status)) => assert_eq!(status.code, 401, "{status:?}"),
            other => panic!("expected 401 Unauthorized, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn kubelet_helpers_write_pod_status() {
    let control_plane = kit::shared();
    let client = control_plane.client().await;
    let ns = control_plane.namespace(&client, "harness-kubelet").await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    for name in ["ok", "bad"] {
        pods.create(&PostParams::default(), &pod(name, "manual", &["main", "sidecar"])).await.expect("create a pod");
    }

    // Running but not ready.
    let running = kubelet::set_running(&client, &ns, "ok", "10.244.2.7", false).await.expect("set running");
    assert_eq!(phase(&running), Some("Running"));
    assert_eq!(condition(&running, "Ready").as_deref(), Some("False"));
    assert_eq!(condition(&running, "PodScheduled").as_deref(), Some("True"));
    let status = running.status.as_ref().expect("a status");
    assert_eq!(status.pod_ip.as_deref(), Some("10.244.2.7"));
    assert!(status.start_time.is_some());
    let containers = status.container_statuses.as_ref().expect("container statuses");
    assert_eq!(containers.len(), 2);
    assert!(containers.iter().all(|c| !c.ready && c.started == Some(true)));

    // Ready.
    let ready = kubelet::set_running(&client, &ns, "ok", "10.244.2.7", true).await.expect("ready");
    assert_eq!(condition(&ready, "Ready").as_deref(), Some("True"));

    // Crash looping.
    let waiting = kubelet::set_waiting(&client, &ns, "ok", "CrashLoopBackOff", 3).await.expect("set waiting");
    let main = &waiting.status.as_ref().and_then(|s| s.container_statuses.clone()).expect("statuses")[0];
    assert_eq!(main.restart_count, 3);
    let reason = main.state.as_ref().and_then(|s| s.waiting.as_ref()).and_then(|w| w.reason.clone());
    assert_eq!(reason.as_deref(), Some("CrashLoopBackOff"));
    assert_eq!(condition(&waiting, "Ready").as_deref(), Some("False"));

    // Succeeded with a termination message.
    let done = kubelet::set_succeeded(&client, &ns, "ok", "{\"answer\":42}").await.expect("succeed");
    assert_eq!(phase(&done), Some("Succeeded"));
    let terminated = done.status.as_ref().and_then(|s| s.container_statuses.clone()).expect("statuses")[0]
        .state
        .clone()
        .and_then(|s| s.terminated)
        .expect("terminated");
    assert_eq!(terminated.exit_code, 0);
    assert_eq!(terminated.reason.as_deref(), Some("Completed"));
    assert_eq!(terminated.message.as_deref(), Some("{\"answer\":42}"));

    // Failed with an exit code.
    kubelet::set_running(&client, &ns, "bad", "10.244.2.8", true).await.expect("set running");
    let failed = kubelet::set_failed(&client, &ns, "bad", "boom", 2).await.expect("fail");
    assert_eq!(phase(&failed), Some("Failed"));
    let terminated = failed.status.as_ref().and_then(|s| s.container_statuses.clone()).expect("statuses")[0]
        .state
        .clone()
        .and_then(|s| s.terminated)
        .expect("terminated");
    assert_eq!((terminated.exit_code, terminated.reason.as_deref()), (2, Some("Error")));
    assert_eq!(terminated.message.as_deref(), Some("boom"));

    // The stand-in's patches carry the UID they were computed for, so they cannot land on a new
    // pod of the same name.
    let stale = serde_json::json!({ "metadata": { "uid": "00000000-0000-0000-0000-000000000000" },
                                    "status": { "phase": "Running" } });
    let refused = pods.patch_status("bad", &PatchParams::default(), &Patch::Merge(stale)).await;
    assert!(matches!(&refused, Err(kube::Error::Api(s)) if s.code == 422), "{refused:?}");
}

#[tokio::test]
async fn kubelet_driver_follows_plans() {
    let control_plane = kit::shared();
    let client = control_plane.client().await;
    let ns = control_plane.namespace(&client, "harness-plans").await;
    let _kubelet = Kubelet::start(
        client.clone(),
        &ns,
        Some("test=plans".to_string()),
        kubelet::behaviour(|pod| match pod.metadata.name.as_deref() {
            Some("fails") => PodPlan::fail("10.244.3.2", "exploded", 3).run_for(Duration::from_millis(200)),
            _ => PodPlan::succeed("10.244.3.1", "all good")
                .after(Duration::from_millis(100))
                .run_for(Duration::from_millis(200)),
        }),
    );
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    for name in ["succeeds", "fails"] {
        pods.create(&PostParams::default(), &pod(name, "plans", &["main"])).await.expect("create a pod");
    }
    // An unlabelled pod is left alone.
    pods.create(&PostParams::default(), &pod("ignored", "other", &["main"])).await.expect("create a pod");

    for (name, expected) in [("succeeds", "Succeeded"), ("fails", "Failed")] {
        wait_until(&format!("pod {name} to reach {expected}"), TIMEOUT, || async {
            let pod = pods.get(name).await.ok()?;
            (phase(&pod) == Some(expected)).then_some(())
        })
        .await;
    }
    let ignored = pods.get("ignored").await.expect("get the ignored pod");
    assert_eq!(phase(&ignored), Some("Pending"));
}

#[test]
fn namespace_names_are_dns_labels() {
    let name = namespace_name("My_Test::Deployments", 3, 0xbeef);
    assert_eq!(name, "my-test--deployments-3-beef");
    let long = namespace_name(&"x".repeat(100), 12345, 1);
    assert!(long.len() <= 63, "{long}");
    assert_eq!(namespace_name("--", 0, 0), "e2e-0-0000");
}
