//! Container steps as pods: built here (pure), created by the WorkflowRun controller, and read
//! back from their status.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerStatus, EmptyDirVolumeSource, EnvVar, KeyToPath, Pod,
    PodSecurityContext, PodSpec, SeccompProfile, SecretVolumeSource, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

use crate::api::{DEFAULT_RUN_AS_USER, StepSecurityContext, StepVolume};
use crate::engine::{TaskStart, Work};
use crate::naming;

/// What a pod says about its attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum PodState {
    /// Not finished yet.
    Running,
    /// Exited 0; the termination message is the output.
    Succeeded { output: String },
    /// Failed, with why.
    Failed { message: String },
}

/// The one capability the restricted Pod Security Standard lets a container add back.
const ALLOWED_CAPABILITY: &str = "NET_BIND_SERVICE";

/// Builds the pod of an attempt. The pod meets the restricted Pod Security Standard whatever the
/// step asks (the CRD's schema rejects what the profile forbids; this holds even for objects
/// stored under an older schema): non-root, as [`DEFAULT_RUN_AS_USER`] unless the step names a
/// user, no privilege escalation, every capability dropped but NET_BIND_SERVICE if asked for, a
/// RuntimeDefault or Localhost seccomp profile, and volumes only from ConfigMaps, Secrets and
/// emptyDir. `activeDeadlineSeconds` backs the step timeout.
pub fn build_pod(run_name: &str, namespace: &str, owner: OwnerReference, task: &TaskStart) -> Option<Pod> {
    let Work::Container { image, command, args, env, resources, working_dir, service_account_name, pod } = &task.work
    else {
        return None;
    };
    let name = naming::pod_name(run_name, &task.key, task.attempt);
    let labels = naming::step_labels(run_name, &task.step_id, task.attempt);
    let annotations = BTreeMap::from([(naming::ANNOTATION_STEP_KEY.to_string(), task.key.clone())]);
    let sc = pod.security_context.clone().unwrap_or_default();
    let mounts: Vec<VolumeMount> = pod
        .volume_mounts
        .iter()
        .map(|m| VolumeMount {
            name: m.name.clone(),
            mount_path: m.mount_path.clone(),
            read_only: m.read_only,
            sub_path: m.sub_path.clone(),
            ..Default::default()
        })
        .collect();
    let container = Container {
        name: "step".into(),
        image: Some(image.clone()),
        command: (!command.is_empty()).then(|| command.clone()),
        args: (!args.is_empty()).then(|| args.clone()),
        env: Some(with_termination_log(env)),
        resources: resources.clone(),
        working_dir: working_dir.clone(),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        security_context: Some(container_security(&sc)),
        volume_mounts: (!mounts.is_empty()).then_some(mounts),
        ..Default::default()
    };
    let volumes: Vec<Volume> = pod.volumes.iter().filter_map(volume).collect();
    Some(Pod {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: Some(namespace.to_string()),
            labels: Some(labels),
            annotations: Some(annotations),
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        spec: Some(PodSpec {
            containers: vec![container],
            restart_policy: Some("Never".into()),
            active_deadline_seconds: task.timeout.map(|t| t.as_secs().max(1) as i64),
            service_account_name: service_account_name.clone(),
            automount_service_account_token: Some(false),
            security_context: Some(pod_security(&sc)),
            node_selector: (!pod.node_selector.is_empty()).then(|| pod.node_selector.clone()),
            tolerations: (!pod.tolerations.is_empty()).then(|| pod.tolerations.clone()),
            image_pull_secrets: (!pod.image_pull_secrets.is_empty()).then(|| pod.image_pull_secrets.clone()),
            volumes: (!volumes.is_empty()).then_some(volumes),
            ..Default::default()
        }),
        status: None,
    })
}

/// The pod's security context: non-root, as the step's user or [`DEFAULT_RUN_AS_USER`].
fn pod_security(sc: &StepSecurityContext) -> PodSecurityContext {
    // A user id of 0 cannot come through the schema (minimum 1); should one be stored anyway,
    // the default is used, and runAsNonRoot would refuse it regardless.
    let run_as_user = sc.run_as_user.filter(|&u| u > 0);
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(run_as_user.unwrap_or(DEFAULT_RUN_AS_USER)),
        run_as_group: sc.run_as_group.or(run_as_user.is_none().then_some(DEFAULT_RUN_AS_USER)),
        fs_group: sc.fs_group,
        supplemental_groups: (!sc.supplemental_groups.is_empty()).then(|| sc.supplemental_groups.clone()),
        seccomp_profile: Some(seccomp(sc)),
        ..Default::default()
    }
}

/// The container's security context, restricted whatever the step says.
fn container_security(sc: &StepSecurityContext) -> SecurityContext {
    let add: Vec<String> = sc
        .capabilities
        .iter()
        .flat_map(|c| c.add.iter())
        .filter(|c| c.as_str() == ALLOWED_CAPABILITY)
        .take(1)
        .cloned()
        .collect();
    SecurityContext {
        allow_privilege_escalation: Some(false),
        privileged: None,
        capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), add: (!add.is_empty()).then_some(add) }),
        run_as_non_root: Some(true),
        read_only_root_filesystem: sc.read_only_root_filesystem,
        seccomp_profile: Some(seccomp(sc)),
        ..Default::default()
    }
}

fn seccomp(sc: &StepSecurityContext) -> SeccompProfile {
    match &sc.seccomp_profile {
        Some(p) if p.type_ == "Localhost" => {
            SeccompProfile { type_: "Localhost".into(), localhost_profile: p.localhost_profile.clone() }
        }
        _ => SeccompProfile { type_: "RuntimeDefault".into(), localhost_profile: None },
    }
}

/// A step volume as a pod volume; `None` for one with no (allowed) source.
fn volume(v: &StepVolume) -> Option<Volume> {
    let items = |items: &[crate::api::KeyToPath]| {
        (!items.is_empty()).then(|| {
            items
                .iter()
                .map(|i| KeyToPath { key: i.key.clone(), path: i.path.clone(), mode: i.mode, ..Default::default() })
                .collect()
        })
    };
    let mut out = Volume { name: v.name.clone(), ..Default::default() };
    if let Some(c) = &v.config_map {
        out.config_map = Some(ConfigMapVolumeSource {
            name: c.name.clone(),
            items: items(&c.items),
            default_mode: c.default_mode,
            optional: c.optional,
            ..Default::default()
        });
    } else if let Some(s) = &v.secret {
        out.secret = Some(SecretVolumeSource {
            secret_name: Some(s.secret_name.clone()),
            items: items(&s.items),
            default_mode: s.default_mode,
            optional: s.optional,
            ..Default::default()
        });
    } else if let Some(e) = &v.empty_dir {
        out.empty_dir = Some(EmptyDirVolumeSource {
            medium: e.medium.clone().filter(|m| !m.is_empty()),
            size_limit: e.size_limit.clone(),
            ..Default::default()
        });
    } else {
        return None;
    }
    Some(out)
}

/// The step's env plus `VOLT_TERMINATION_LOG`, the file whose content becomes the output (local
/// mode sets the same variable to its own file, so scripts work in both).
fn with_termination_log(env: &[EnvVar]) -> Vec<EnvVar> {
    let mut out = env.to_vec();
    if !out.iter().any(|e| e.name == "VOLT_TERMINATION_LOG") {
        out.push(EnvVar {
            name: "VOLT_TERMINATION_LOG".into(),
            value: Some("/dev/termination-log".into()),
            value_from: None,
        });
    }
    out
}

/// Sets `name` in the step container's environment unless the step sets it itself.
pub fn add_env(pod: &mut Pod, name: &str, value: &str) {
    let Some(c) = pod.spec.as_mut().and_then(|s| s.containers.first_mut()) else { return };
    let env = c.env.get_or_insert_with(Vec::new);
    if !env.iter().any(|e| e.name == name) {
        env.push(EnvVar { name: name.into(), value: Some(value.into()), value_from: None });
    }
}

/// Waiting reasons of a container that will not start by itself: they fail the attempt.
const CANNOT_START: &[&str] = &[
    "ErrImagePull",
    "ImagePullBackOff",
    "ErrImageNeverPull",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
];

/// Reads a step pod's outcome from its status. Failures say why in words and name the
/// Kubernetes reason: an image that cannot be pulled, a container killed for memory
/// (OOMKilled), a pod stopped at its deadline (DeadlineExceeded) or evicted, an exit code.
pub fn pod_state(pod: &Pod) -> PodState {
    let status = pod.status.as_ref();
    let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("Pending");
    let container = status
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.name == "step").or_else(|| cs.first()));
    let terminated = container.and_then(|c| c.state.as_ref()).and_then(|s| s.terminated.as_ref());
    match phase {
        "Succeeded" => PodState::Succeeded { output: terminated_message(container).unwrap_or_default() },
        "Failed" => {
            let pod_reason = status.and_then(|s| s.reason.as_deref()).unwrap_or_default();
            let pod_message = status.and_then(|s| s.message.as_deref()).unwrap_or_default().trim();
            let mut message = match (pod_reason, terminated) {
                ("DeadlineExceeded", _) => {
                    // The controller's cache keeps no spec: the deadline is known only sometimes.
                    let deadline = pod.spec.as_ref().and_then(|s| s.active_deadline_seconds);
                    format!(
                        "the step ran longer than its timeout{} and the kubelet stopped it (DeadlineExceeded)",
                        deadline.map(|d| format!(" ({d}s)")).unwrap_or_default()
                    )
                }
                ("Evicted", _) => format!("the pod was evicted from its node (Evicted): {pod_message}"),
                (_, Some(t)) if t.reason.as_deref() == Some("OOMKilled") => format!(
                    "the container ran out of memory and was killed (OOMKilled, exit code {}); raise its \
                     resources.limits.memory{}",
                    t.exit_code,
                    memory_limit(pod).map(|l| format!(" (now {l})")).unwrap_or_default()
                ),
                (_, Some(t)) => {
                    let reason = t.reason.clone().unwrap_or_else(|| "Error".into());
                    format!("container exited with code {} ({reason})", t.exit_code)
                }
                (_, None) => {
                    let reason = if pod_reason.is_empty() { "Failed" } else { pod_reason };
                    format!("pod failed: {reason} {pod_message}").trim_end().to_string()
                }
            };
            if let Some(m) = terminated_message(container).filter(|m| !m.trim().is_empty()) {
                let m: String = m.chars().take(1024).collect();
                message.push_str(": ");
                message.push_str(m.trim());
            }
            PodState::Failed { message }
        }
        _ => {
            // A container that cannot start (bad image, bad config) fails the attempt.
            let waiting = container.and_then(|c| c.state.as_ref()).and_then(|s| s.waiting.as_ref());
            match waiting.and_then(|w| w.reason.as_deref()) {
                Some(r) if CANNOT_START.contains(&r) => {
                    let msg = waiting.and_then(|w| w.message.as_deref()).unwrap_or_default().trim();
                    let image = container.map(|c| c.image.as_str()).filter(|i| !i.is_empty()).map(str::to_string);
                    let image = image
                        .or_else(|| pod.spec.as_ref().and_then(|s| s.containers.first()).and_then(|c| c.image.clone()));
                    let image = image.unwrap_or_default();
                    let what = match r {
                        "ErrImagePull" | "ImagePullBackOff" => format!("the image {image:?} cannot be pulled ({r})"),
                        "ErrImageNeverPull" => {
                            format!("the image {image:?} is not on the node and may not be pulled ({r})")
                        }
                        "InvalidImageName" => format!("the image name {image:?} is not valid ({r})"),
                        _ => format!("the container cannot start ({r})"),
                    };
                    PodState::Failed { message: if msg.is_empty() { what } else { format!("{what}: {msg}") } }
                }
                _ => PodState::Running,
            }
        }
    }
}

/// The step container's memory limit, as written in the pod (such as `64Mi`).
fn memory_limit(pod: &Pod) -> Option<String> {
    let spec = pod.spec.as_ref()?;
    let c = spec.containers.iter().find(|c| c.name == "step").or_else(|| spec.containers.first())?;
    c.resources.as_ref()?.limits.as_ref()?.get("memory").map(|q| q.0.clone())
}

fn terminated_message(c: Option<&ContainerStatus>) -> Option<String> {
    c.and_then(|c| c.state.as_ref()).and_then(|s| s.terminated.as_ref()).and_then(|t| t.message.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::PodSettings;
    use k8s_openapi::api::core::v1::{ContainerState, ContainerStateTerminated, PodStatus};

    fn task() -> TaskStart {
        TaskStart {
            key: "build[2]".into(),
            step_id: "build".into(),
            index: Some(2),
            attempt: 3,
            work: Work::Container {
                image: "busybox".into(),
                command: vec!["sh".into()],
                args: vec![],
                env: vec![],
                resources: None,
                working_dir: None,
                service_account_name: None,
                pod: Box::default(),
            },
            timeout: Some(std::time::Duration::from_secs(30)),
            cache: None,
        }
    }

    #[test]
    fn pod_is_named_labelled_and_restricted() {
        let pod = build_pod("run", "ns", OwnerReference::default(), &task()).unwrap();
        assert_eq!(pod.metadata.name.as_deref(), Some("run-build-2-3"));
        let labels = pod.metadata.labels.clone().unwrap();
        assert_eq!(labels["volt.dev/run"], "run");
        assert_eq!(labels["volt.dev/step"], "build");
        assert_eq!(labels["volt.dev/attempt"], "3");
        assert_eq!(labels["app.kubernetes.io/managed-by"], "volt-operator");
        let spec = pod.spec.unwrap();
        assert_eq!(spec.active_deadline_seconds, Some(30));
        let sc = spec.containers[0].security_context.clone().unwrap();
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.capabilities.unwrap().drop.unwrap(), vec!["ALL"]);
        assert_eq!(spec.security_context.unwrap().run_as_non_root, Some(true));
    }

    fn with_settings(pod: PodSettings) -> TaskStart {
        let mut t = task();
        if let Work::Container { pod: p, .. } = &mut t.work {
            **p = pod;
        }
        t
    }

    #[test]
    fn runs_as_a_non_root_user_by_default() {
        let pod = build_pod("run", "ns", OwnerReference::default(), &task()).unwrap();
        let psc = pod.spec.as_ref().unwrap().security_context.clone().unwrap();
        assert_eq!((psc.run_as_non_root, psc.run_as_user, psc.run_as_group), (Some(true), Some(65532), Some(65532)));
        assert_eq!(psc.seccomp_profile.unwrap().type_, "RuntimeDefault");
        let csc = pod.spec.unwrap().containers[0].security_context.clone().unwrap();
        assert_eq!(csc.capabilities.unwrap().add, None);
        assert_eq!(csc.run_as_non_root, Some(true));
    }

    #[test]
    fn the_step_chooses_within_the_restricted_profile() {
        let settings: PodSettings = serde_json::from_value(serde_json::json!({
            "securityContext": {
                "runAsUser": 1000, "fsGroup": 2000, "readOnlyRootFilesystem": true,
                "capabilities": {"add": ["NET_BIND_SERVICE", "SYS_ADMIN"], "drop": ["NET_RAW"]},
                "seccompProfile": {"type": "Localhost", "localhostProfile": "profiles/step.json"},
                // Stored under an older schema, say: the pod stays restricted regardless.
                "privileged": true, "allowPrivilegeEscalation": true, "runAsNonRoot": false
            }
        }))
        .unwrap();
        let pod = build_pod("run", "ns", OwnerReference::default(), &with_settings(settings)).unwrap();
        let spec = pod.spec.unwrap();
        let psc = spec.security_context.unwrap();
        assert_eq!((psc.run_as_user, psc.run_as_group, psc.fs_group), (Some(1000), None, Some(2000)));
        assert_eq!(psc.run_as_non_root, Some(true));
        let csc = spec.containers[0].security_context.clone().unwrap();
        let caps = csc.capabilities.unwrap();
        assert_eq!((caps.add, caps.drop), (Some(vec!["NET_BIND_SERVICE".to_string()]), Some(vec!["ALL".to_string()])));
        assert_eq!(
            (csc.privileged, csc.allow_privilege_escalation, csc.run_as_non_root),
            (None, Some(false), Some(true))
        );
        assert_eq!(csc.read_only_root_filesystem, Some(true));
        let seccomp = csc.seccomp_profile.unwrap();
        assert_eq!(
            (seccomp.type_.as_str(), seccomp.localhost_profile.as_deref()),
            ("Localhost", Some("profiles/step.json"))
        );
    }

    #[test]
    fn scheduling_pull_secrets_and_volumes_reach_the_pod() {
        let settings: PodSettings = serde_json::from_value(serde_json::json!({
            "nodeSelector": {"disk": "ssd"},
            "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "imagePullSecrets": [{"name": "regcred"}],
            "volumes": [
                {"name": "work", "emptyDir": {"sizeLimit": "1Gi"}},
                {"name": "conf", "configMap": {"name": "settings", "items": [{"key": "a", "path": "a.toml"}]}},
                {"name": "key", "secret": {"secretName": "deploy-key", "defaultMode": 256}},
                {"name": "nothing"}
            ],
            "volumeMounts": [
                {"name": "work", "mountPath": "/work"},
                {"name": "conf", "mountPath": "/etc/app", "readOnly": true},
                {"name": "key", "mountPath": "/keys/id", "subPath": "id"}
            ]
        }))
        .unwrap();
        let pod = build_pod("run", "ns", OwnerReference::default(), &with_settings(settings)).unwrap();
        let spec = pod.spec.unwrap();
        assert_eq!(spec.node_selector.unwrap()["disk"], "ssd");
        assert_eq!(spec.tolerations.unwrap()[0].key.as_deref(), Some("gpu"));
        assert_eq!(spec.image_pull_secrets.unwrap()[0].name, "regcred");
        let volumes = spec.volumes.unwrap();
        let names: Vec<&str> = volumes.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names, vec!["work", "conf", "key"], "a volume with no source is left out");
        assert_eq!(volumes[0].empty_dir.as_ref().unwrap().size_limit.as_ref().unwrap().0, "1Gi");
        assert_eq!(volumes[1].config_map.as_ref().unwrap().items.as_ref().unwrap()[0].path, "a.toml");
        assert_eq!(volumes[2].secret.as_ref().unwrap().default_mode, Some(256));
        let mounts = spec.containers[0].volume_mounts.clone().unwrap();
        assert_eq!(mounts.len(), 3);
        assert_eq!((mounts[1].mount_path.as_str(), mounts[1].read_only), ("/etc/app", Some(true)));
        assert_eq!(mounts[2].sub_path.as_deref(), Some("id"));
    }

    fn failed(reason: Option<&str>, terminated: Option<ContainerStateTerminated>) -> Pod {
        Pod {
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "step".into(),
                    image: Some("busybox:1.35".into()),
                    resources: Some(k8s_openapi::api::core::v1::ResourceRequirements {
                        limits: Some(BTreeMap::from([(
                            "memory".to_string(),
                            k8s_openapi::apimachinery::pkg::api::resource::Quantity("16Mi".into()),
                        )])),
                        ..Default::default()
                    }),
                    ..Default::default()
                }],
                active_deadline_seconds: Some(3),
                ..Default::default()
            }),
            status: Some(PodStatus {
                phase: Some("Failed".into()),
                reason: reason.map(str::to_string),
                message: reason.map(|_| "Pod was active on the node longer than the specified deadline".into()),
                container_statuses: Some(vec![ContainerStatus {
                    name: "step".into(),
                    state: Some(ContainerState { terminated, ..Default::default() }),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn oom_again() -> ContainerStateTerminated {
        ContainerStateTerminated { exit_code: 137, reason: Some("OOMKilled".into()), ..Default::default() }
    }

    #[test]
    fn out_of_memory_and_deadlines_are_named() {
        let oom = ContainerStateTerminated { exit_code: 137, reason: Some("OOMKilled".into()), ..Default::default() };
        let PodState::Failed { message } = pod_state(&failed(None, Some(oom))) else { panic!("failed expected") };
        assert_eq!(
            message,
            "the container ran out of memory and was killed (OOMKilled, exit code 137); raise its \
             resources.limits.memory (now 16Mi)"
        );
        // The controller's cache drops pod specs.
        let mut slim = failed(None, Some(oom_again()));
        slim.spec = None;
        let PodState::Failed { message } = pod_state(&slim) else { panic!("failed expected") };
        assert!(message.ends_with("raise its resources.limits.memory"), "{message}");
        let killed = ContainerStateTerminated { exit_code: 137, reason: Some("Error".into()), ..Default::default() };
        let PodState::Failed { message } = pod_state(&failed(Some("DeadlineExceeded"), Some(killed))) else {
            panic!("failed expected")
        };
        assert!(message.contains("timeout (3s)") && message.contains("DeadlineExceeded"), "{message}");
    }

    #[test]
    fn an_image_that_cannot_be_pulled_is_named() {
        let mut pod = failed(None, None);
        let status = pod.status.as_mut().unwrap();
        status.phase = Some("Pending".into());
        status.container_statuses.as_mut().unwrap()[0].image = "registry.invalid/nope:1".into();
        status.container_statuses.as_mut().unwrap()[0].state = Some(ContainerState {
            waiting: Some(k8s_openapi::api::core::v1::ContainerStateWaiting {
                reason: Some("ErrImagePull".into()),
                message: Some("failed to resolve reference".into()),
            }),
            ..Default::default()
        });
        assert_eq!(
            pod_state(&pod),
            PodState::Failed {
                message:
                    "the image \"registry.invalid/nope:1\" cannot be pulled (ErrImagePull): failed to resolve reference"
                        .into()
            }
        );
        // Still being pulled: not a failure.
        status_waiting(&mut pod, "ContainerCreating");
        assert_eq!(pod_state(&pod), PodState::Running);
    }

    fn status_waiting(pod: &mut Pod, reason: &str) {
        let cs = &mut pod.status.as_mut().unwrap().container_statuses.as_mut().unwrap()[0];
        cs.state = Some(ContainerState {
            waiting: Some(k8s_openapi::api::core::v1::ContainerStateWaiting {
                reason: Some(reason.into()),
                message: None,
            }),
            ..Default::default()
        });
    }

    #[test]
    fn reads_outcomes() {
        let mut pod = Pod::default();
        assert_eq!(pod_state(&pod), PodState::Running);
        pod.status = Some(PodStatus {
            phase: Some("Failed".into()),
            container_statuses: Some(vec![ContainerStatus {
                name: "step".into(),
                state: Some(ContainerState {
                    terminated: Some(ContainerStateTerminated {
                        exit_code: 2,
                        message: Some("boom".into()),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }]),
            ..Default::default()
        });
        assert_eq!(pod_state(&pod), PodState::Failed { message: "container exited with code 2 (Error): boom".into() });
    }

    #[test]
    fn add_env_sets_a_variable_unless_the_step_sets_it() {
        let mut pod = build_pod("run", "ns", OwnerReference::default(), &task()).unwrap();
        add_env(&mut pod, "TRACEPARENT", "00-a-b-01");
        add_env(&mut pod, "TRACEPARENT", "00-c-d-01");
        let env = pod.spec.as_ref().unwrap().containers[0].env.clone().unwrap_or_default();
        let set: Vec<_> = env.iter().filter(|e| e.name == "TRACEPARENT").map(|e| e.value.clone()).collect();
        assert_eq!(set, [Some("00-a-b-01".to_string())]);
    }
}
