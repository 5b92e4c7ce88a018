//! The one place that builds child objects' names and labels.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "volt-operator";
pub const LABEL_RUN: &str = "volt.dev/run";
pub const LABEL_STEP: &str = "volt.dev/step";
pub const LABEL_ATTEMPT: &str = "volt.dev/attempt";
pub const LABEL_AGENT: &str = "volt.dev/agent";
/// On a WorkflowRun whose end is written: its phase. The run controller's cache holds only
/// runs without it; finished runs are tracked by metadata alone.
pub const LABEL_FINISHED: &str = "volt.dev/finished";
/// On a finished WorkflowRun with `spec.ttlSecondsAfterFinished`: when it is deleted (RFC 3339).
pub const ANNOTATION_EXPIRES: &str = "volt.dev/expires-at";
/// Annotation on step pods, child runs and resource step objects: the status key of the step
/// (with the forEach index and loop iteration).
pub const ANNOTATION_STEP_KEY: &str = "volt.dev/step-key";
/// On a child WorkflowRun (a `workflow` step's): the name of the run that started it.
pub const LABEL_PARENT_RUN: &str = "volt.dev/parent-run";
/// On a child WorkflowRun: the Workflows of the runs above it, root first, joined by `/`.
pub const ANNOTATION_CHAIN: &str = "volt.dev/workflow-chain";

/// The W3C traceparent a run continues: set on child runs (the parent's step span), and by
/// users on runs submitted from a traced system. The run's spans join that trace.
pub const ANNOTATION_TRACEPARENT: &str = "volt.dev/traceparent";

/// On a WorkflowRun a WorkflowSchedule started: the schedule's name (as a label value).
pub const LABEL_SCHEDULE: &str = "volt.dev/schedule";
/// On a WorkflowRun a WorkflowSchedule started: the slot it is the run of (RFC 3339, UTC).
pub const ANNOTATION_SCHEDULED_AT: &str = "volt.dev/scheduled-at";

/// On a WorkflowRun (and its pods and child runs) with `--shards` > 1: its slot, a hash of the
/// run UID modulo [`crate::shards::SLOTS`], set once; slot `v` belongs to shard `v % N`.
pub const LABEL_SHARD: &str = "volt.dev/shard";
/// On the shard and member Leases: the `--lease-name` they belong to.
pub const LABEL_LEASE_OF: &str = "volt.dev/lease-of";
/// On the shard and member Leases: `shard` or `member`.
pub const LABEL_LEASE_ROLE: &str = "volt.dev/lease-role";
/// On the shard and member Leases: the `--shards` of the replica that wrote it.
pub const ANNOTATION_SHARDS: &str = "volt.dev/shards";
/// On a shard Lease: its shard number.
pub const ANNOTATION_SHARD: &str = "volt.dev/shard";

/// A shard's Lease.
pub fn shard_lease(prefix: &str, shard: u32) -> String {
    fit(&format!("{prefix}-shard-{shard}"), 253)
}

/// A replica's membership Lease: the prefix and the identity, made a valid name.
pub fn member_lease(prefix: &str, identity: &str) -> String {
    let id: String = identity
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '-' })
        .collect();
    fit(&format!("{prefix}-member-{}", id.trim_matches('-')), 253)
}
/// On the ConfigMap holding a run's event log: the run's UID, to find it by.
pub const LABEL_EVENTS_OF: &str = "volt.dev/events-of";

/// Longest DNS label (pod hostnames, label values).
pub const MAX_LABEL: usize = 63;

fn short_hash(s: &str) -> String {
    let digest = Sha256::digest(s.as_bytes());
    hex::encode(&digest[..4])
}

/// Makes `s` fit in `max` characters: unchanged when it fits, otherwise a prefix and a hash of
/// the whole, so distinct long names stay distinct.
pub fn fit(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let hash = short_hash(s);
    let mut prefix: String = s.chars().take(max - hash.len() - 1).collect();
    while prefix.ends_with(['-', '.']) {
        prefix.pop();
    }
    format!("{prefix}-{hash}")
}

/// The status key of item `index` of a forEach step: `id[index]`. Status keys are the keys of
/// `status.steps`: a step's id, or `id[index]` for each item of a fan-out.
pub fn child_key(step_id: &str, index: usize) -> String {
    format!("{step_id}[{index}]")
}

/// The status key of step `inner` (an inner status key: `code` or `code[2]`) in iteration
/// `iteration` (from 1) of loop `loop_key`: `loop.iteration.inner`, such as `review.2.code`.
/// Step ids are DNS labels, so the dots cannot be confused with an id.
pub fn loop_key(loop_key: &str, iteration: u32, inner: &str) -> String {
    format!("{}{inner}", loop_prefix(loop_key, iteration))
}

/// The prefix of the status keys of iteration `iteration` of a loop: `loop.iteration.`.
pub fn loop_prefix(loop_key: &str, iteration: u32) -> String {
    format!("{loop_key}.{iteration}.")
}

/// The loop, iteration and inner key of a key inside a loop (`review.2.code[1]` ->
/// `("review", 2, "code[1]")`); `None` for keys outside loops.
pub fn parse_loop_key(key: &str) -> Option<(&str, u32, &str)> {
    let (loop_id, rest) = key.split_once('.')?;
    let (iteration, inner) = rest.split_once('.')?;
    Some((loop_id, iteration.parse().ok()?, inner))
}

/// The step id and item index of a status key (`implement[3]` -> `("implement", Some(3))`).
/// For a key inside a loop, the id is the loop's.
pub fn parse_step_key(key: &str) -> (&str, Option<usize>) {
    if let Some((loop_id, _, _)) = parse_loop_key(key) {
        return (loop_id, None);
    }
    match key.split_once('[') {
        Some((id, rest)) => (id, rest.strip_suffix(']').and_then(|i| i.parse().ok())),
        None => (key, None),
    }
}

/// The step id of a status key.
pub fn step_id_of(key: &str) -> &str {
    parse_step_key(key).0
}

/// Turns a status key such as `implement[3]` or `review.2.code` into a DNS-label fragment
/// (`implement-3`, `review-2-code`).
pub fn key_fragment(key: &str) -> String {
    key.replace(['[', '.'], "-").replace(']', "")
}

/// Name of the pod of attempt `attempt` of step key `key` in run `run`: deterministic, a DNS
/// label (at most 63 characters) so it is also a valid hostname.
pub fn pod_name(run: &str, key: &str, attempt: u32) -> String {
    fit(&format!("{run}-{}-{attempt}", key_fragment(key)), MAX_LABEL)
}

/// Name of the child WorkflowRun of attempt `attempt` of `workflow` step key `key` in run
/// `run`: deterministic (a restart never starts it twice), and a label value, since the
/// child's own pods are labelled with it.
pub fn child_run_name(run: &str, key: &str, attempt: u32) -> String {
    fit(&format!("{run}-{}-{attempt}", key_fragment(key)), MAX_LABEL)
}

/// Name of the object a `resource` step creates: `prefix` (the manifest's `metadata.name`, or
/// the run's name) with the step key and attempt.
pub fn resource_name(prefix: &str, key: &str, attempt: u32) -> String {
    fit(&format!("{prefix}-{}-{attempt}", key_fragment(key)), MAX_LABEL)
}

/// Name of the WorkflowRun schedule `schedule` starts for the slot at `slot_unix_seconds`:
/// `<schedule>-<unix minute of the slot>`. Deterministic, so a restart or a second replica
/// creating it again gets a conflict instead of a second run.
pub fn schedule_run_name(schedule: &str, slot_unix_seconds: i64) -> String {
    fit(&format!("{schedule}-{}", slot_unix_seconds.div_euclid(60)), 253)
}

/// Labels of a run a schedule starts.
pub fn schedule_labels(schedule: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_MANAGED_BY.to_string(), MANAGED_BY.to_string()),
        (LABEL_SCHEDULE.to_string(), label_value(schedule)),
    ])
}

/// The chain of a child run's annotation, as a list.
pub fn parse_chain(annotation: &str) -> Vec<String> {
    annotation.split('/').filter(|s| !s.is_empty()).map(str::to_string).collect()
}

/// Name of the ConfigMap holding a step's output.
pub fn output_config_map(run: &str, key: &str) -> String {
    fit(&format!("{run}-out-{}", key_fragment(key)), 253)
}

/// Name of the ConfigMap holding an agent step's transcript.
pub fn transcript_config_map(run: &str, key: &str) -> String {
    fit(&format!("{run}-tr-{}", key_fragment(key)), 253)
}

/// Suffix of the name of a run's event log ConfigMap. Output and transcript ConfigMaps cannot
/// end with it: after their last dot comes `-out-`/`-tr-` and a key fragment (no dots), or a
/// hash when [`fit`] shortened them.
const EVENTS_SUFFIX: &str = ".events";

/// Longest object name (a DNS subdomain).
pub const MAX_NAME: usize = 253;

/// Name of the ConfigMap holding the event log of run `run`: `<run>.events`, the run's name
/// shortened (with a hash) when the whole would pass 253 characters.
pub fn events_config_map(run: &str) -> String {
    format!("{}{EVENTS_SUFFIX}", fit(run, MAX_NAME - EVENTS_SUFFIX.len()))
}

/// Labels of a run's event log ConfigMap: found by the run's UID.
pub fn events_labels(run: &str, uid: &str) -> BTreeMap<String, String> {
    let mut labels = run_labels(run);
    labels.insert(LABEL_EVENTS_OF.to_string(), label_value(uid));
    labels
}

/// Key of the events (a JSON array, oldest first) in a run's event log ConfigMap.
pub const EVENTS_KEY: &str = "events.json";
/// Key of the number of events dropped from a run's event log ConfigMap (the oldest, over its
/// bounds).
pub const EVENTS_TRUNCATED_KEY: &str = "truncated";

/// Whether `s` is a valid label value (at most 63 characters of `[A-Za-z0-9._-]`, starting and
/// ending with a letter or digit): run UIDs are.
pub fn is_label_value(s: &str) -> bool {
    s.len() <= MAX_LABEL
        && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// Whether `s` is a valid namespace name (an RFC 1123 label).
pub fn is_namespace(s: &str) -> bool {
    s.len() <= MAX_LABEL
        && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// Key of a transcript in its ConfigMap.
pub const TRANSCRIPT_KEY: &str = "transcript.json";

/// A label value (at most 63 characters) for a name that may be longer.
pub fn label_value(name: &str) -> String {
    fit(name, MAX_LABEL)
}

/// Labels of everything the operator creates for a run.
pub fn run_labels(run: &str) -> BTreeMap<String, String> {
    BTreeMap::from([(LABEL_MANAGED_BY.to_string(), MANAGED_BY.to_string()), (LABEL_RUN.to_string(), label_value(run))])
}

/// Labels of a step's pod.
pub fn step_labels(run: &str, step_id: &str, attempt: u32) -> BTreeMap<String, String> {
    let mut labels = run_labels(run);
    labels.insert(LABEL_STEP.to_string(), label_value(step_id));
    labels.insert(LABEL_ATTEMPT.to_string(), attempt.to_string());
    labels
}

/// Labels of an Agent's Deployment and its pods.
pub fn agent_labels(agent: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_MANAGED_BY.to_string(), MANAGED_BY.to_string()),
        (LABEL_AGENT.to_string(), label_value(agent)),
    ])
}

/// Name of the Deployment of a deployment-mode Agent.
pub fn agent_deployment(agent: &str) -> String {
    fit(&format!("{agent}-agent"), 253)
}

/// The resource (plural, lower case) of an event's object, `Kind/name` (`WorkflowRun/x` is
/// `workflowruns`): what a caller must be allowed to `list` to see the event.
pub fn resource_of_object(object: &str) -> String {
    let kind = object.split_once('/').map_or(object, |(kind, _)| kind);
    format!("{}s", kind.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_keys_round_trip() {
        assert_eq!(child_key("implement", 3), "implement[3]");
        assert_eq!(parse_step_key(&child_key("a-b", 12)), ("a-b", Some(12)));
        assert_eq!(parse_step_key("plain"), ("plain", None));
        assert_eq!(step_id_of("x[0]"), "x");
        assert_eq!(loop_key("review", 2, "code[1]"), "review.2.code[1]");
        assert_eq!(parse_loop_key("review.2.code[1]"), Some(("review", 2, "code[1]")));
        assert_eq!(parse_loop_key("review[1]"), None);
        assert_eq!(step_id_of("review.12.code"), "review");
        assert_eq!(pod_name("r", "review.2.code", 1), "r-review-2-code-1");
    }

    #[test]
    fn names_fit_and_stay_distinct() {
        assert_eq!(pod_name("run1", "build", 1), "run1-build-1");
        assert_eq!(pod_name("run1", "impl[3]", 2), "run1-impl-3-2");
        let long = "r".repeat(200);
        let a = pod_name(&long, "a", 1);
        let b = pod_name(&long, "b", 1);
        assert!(a.len() <= 63 && b.len() <= 63);
        assert_ne!(a, b);
        assert_eq!(a, pod_name(&long, "a", 1), "deterministic");
        assert!(label_value(&long).len() <= 63);
        assert!(!fit(&format!("{}-{}", "a".repeat(54), "b".repeat(20)), 63).contains("--"));
    }

    #[test]
    fn schedule_runs_are_named_for_their_minute() {
        // 2025-01-01T00:00:00Z is unix second 1735689600, minute 28928160.
        assert_eq!(schedule_run_name("nightly", 1_735_689_600), "nightly-28928160");
        assert_eq!(schedule_run_name("nightly", 1_735_689_659), "nightly-28928160");
        assert!(schedule_run_name(&"s".repeat(300), 0).len() <= 253);
        assert_eq!(schedule_labels("nightly")[LABEL_SCHEDULE], "nightly");
    }

    #[test]
    fn event_logs_are_named_for_their_run_and_never_as_outputs() {
        assert_eq!(events_config_map("build-1"), "build-1.events");
        let long = "r".repeat(253);
        let name = events_config_map(&long);
        assert_eq!(name.len(), 253);
        assert!(name.ends_with(".events"));
        assert_ne!(name, events_config_map(&format!("{long}x")), "distinct long runs stay distinct");
        // Dotted run names and step keys: outputs and transcripts never end in `.events`.
        for run in ["a", "a.events", "x.y", &long] {
            for key in ["events", "l.2.events", "e[1]"] {
                assert!(!output_config_map(run, key).ends_with(".events"), "{run} {key}");
                assert!(!transcript_config_map(run, key).ends_with(".events"), "{run} {key}");
            }
        }
        assert_ne!(events_config_map("a-out"), output_config_map("a", "events"));
        // A DNS subdomain (what the API server checks for names): at most 253 characters, and
        // every dot-separated part is lower-case letters, digits and dashes between a letter or
        // digit at each end.
        for run in ["a", "x.y", &long, &format!("{}.{}", "a".repeat(240), "b".repeat(12))] {
            let name = events_config_map(run);
            assert!(name.len() <= 253);
            let part_ok = |l: &str| {
                l.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                    && l.starts_with(|c: char| c.is_ascii_alphanumeric())
                    && l.ends_with(|c: char| c.is_ascii_alphanumeric())
            };
            assert!(name.split('.').all(part_ok), "{name}");
        }
        let labels = events_labels("r", "0b6e-uid");
        assert_eq!(labels[LABEL_EVENTS_OF], "0b6e-uid");
        assert_eq!(labels[LABEL_MANAGED_BY], MANAGED_BY);
    }

    #[test]
    fn label_values_and_namespaces_are_checked() {
        assert!(is_label_value("6f1c2d3e-0000-4000-8000-123456789abc"));
        assert!(!is_label_value("a,b=c"));
        assert!(!is_label_value(""));
        assert!(!is_label_value(&"a".repeat(64)));
        assert!(is_namespace("team-a"));
        assert!(!is_namespace("a/../b"));
        assert!(!is_namespace("A"));
        assert!(!is_namespace(""));
    }

    #[test]
    fn event_objects_name_their_resource() {
        assert_eq!(resource_of_object("WorkflowRun/x-1"), "workflowruns");
        assert_eq!(resource_of_object("Agent/coder"), "agents");
        assert_eq!(resource_of_object("WorkflowSchedule/n"), "workflowschedules");
    }
}
