//! Container steps as pods: built here (pure), created by the WorkflowRun controller, and read
//! back from their status.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerStatus, EnvVar, Pod, PodSecurityContext, PodSpec, SeccompProfile, SecurityContext,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

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

/// Builds the pod of an attempt. The pod runs as non-root with the restricted Pod Security
/// Standard's settings; `activeDeadlineSeconds` backs the step timeout.
pub fn build_pod(run_name: &str, namespace: &str, owner: OwnerReference, task: &TaskStart) -> Option<Pod> {
    let Work::Container { image, command, args, env, resources, working_dir, service_account_name } = &task.work else {
        return None;
    };
    let name = naming::pod_name(run_name, &task.key, task.attempt);
    let labels = naming::step_labels(run_name, &task.step_id, task.attempt);
    let annotations = BTreeMap::from([(naming::ANNOTATION_STEP_KEY.to_string(), task.key.clone())]);
    let container = Container {
        name: "step".into(),
        image: Some(image.clone()),
        command: (!command.is_empty()).then(|| command.clone()),
        args: (!args.is_empty()).then(|| args.clone()),
        env: Some(with_termination_log(env)),
        resources: resources.clone(),
        working_dir: working_dir.clone(),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), add: None }),
            run_as_non_root: Some(true),
            seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), localhost_profile: None }),
            ..Default::default()
        }),
        ..Default::default()
    };
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
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), localhost_profile: None }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        status: None,
    })
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

/// Reads a step pod's outcome from its status.
pub fn pod_state(pod: &Pod) -> PodState {
    let status = pod.status.as_ref();
    let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("Pending");
    let container = status
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.name == "step").or_else(|| cs.first()));
    match phase {
        "Succeeded" => PodState::Succeeded { output: terminated_message(container).unwrap_or_default() },
        "Failed" => {
            let mut message = match container.and_then(|c| c.state.as_ref()).and_then(|s| s.terminated.as_ref()) {
                Some(t) => {
                    let reason = t.reason.clone().unwrap_or_else(|| "Error".into());
                    format!("container exited with code {} ({reason})", t.exit_code)
                }
                None => {
                    let reason = status.and_then(|s| s.reason.clone()).unwrap_or_else(|| "Failed".into());
                    let msg = status.and_then(|s| s.message.clone()).unwrap_or_default();
                    format!("pod failed: {reason} {msg}").trim_end().to_string()
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
                Some(
                    r @ ("ErrImagePull"
                    | "ImagePullBackOff"
                    | "InvalidImageName"
                    | "CreateContainerConfigError"
                    | "CreateContainerError"),
                ) => {
                    let msg = waiting.and_then(|w| w.message.clone()).unwrap_or_default();
                    PodState::Failed { message: format!("container cannot start: {r} {msg}").trim_end().to_string() }
                }
                _ => PodState::Running,
            }
        }
    }
}

fn terminated_message(c: Option<&ContainerStatus>) -> Option<String> {
    c.and_then(|c| c.state.as_ref()).and_then(|s| s.terminated.as_ref()).and_then(|t| t.message.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
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
}
