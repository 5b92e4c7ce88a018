use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// `Ready`: the object is in its desired state (Agent serving, Workflow valid, run Succeeded).
pub const READY: &str = "Ready";
/// `Reconciling`: work is in progress.
pub const RECONCILING: &str = "Reconciling";
/// `Stalled`: no progress is possible without a change (invalid spec, run failed).
pub const STALLED: &str = "Stalled";
/// `Degraded` (Agents): some replicas are unhealthy or failing calls.
pub const DEGRADED: &str = "Degraded";
/// `Exceeded` (Budgets): a call was refused because it would go over the budget.
pub const EXCEEDED: &str = "Exceeded";

/// The condition types the operator writes. Status is written with server-side apply, which
/// makes the writer an owner of every field it sends: sending back every condition read from the
/// object would take over the conditions other writers keep there (a policy engine's, say) and,
/// from a stale read, undo their updates. So a status apply sends only these.
pub const OWN_CONDITIONS: [&str; 5] = [READY, RECONCILING, STALLED, DEGRADED, EXCEEDED];

/// The conditions of `conditions` the operator writes (see [`OWN_CONDITIONS`]), for a status
/// apply.
pub fn own_conditions(conditions: &[Condition]) -> Vec<Condition> {
    conditions.iter().filter(|c| OWN_CONDITIONS.contains(&c.type_.as_str())).cloned().collect()
}

/// Schema for `status.conditions`: a list map keyed by `type`, as kstatus expects.
pub(crate) fn conditions_schema(g: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let item = g.subschema_for::<Condition>();
    schemars::json_schema!({
        "type": "array",
        "description": "kstatus-compatible conditions: Ready, Reconciling, Stalled (and Degraded on Agents).",
        "items": item,
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["type"]
    })
}

/// A condition to merge into a list with [`set_condition`].
#[derive(Clone, Debug, PartialEq)]
pub struct Cond {
    pub type_: &'static str,
    pub status: bool,
    pub reason: String,
    pub message: String,
}

impl Cond {
    pub fn new(type_: &'static str, status: bool, reason: impl Into<String>, message: impl Into<String>) -> Self {
        Self { type_, status, reason: reason.into(), message: message.into() }
    }
}

/// Merges `c` into `conditions`, keeping `lastTransitionTime` unless the status flips.
pub fn set_condition(conditions: &mut Vec<Condition>, mut c: Cond, generation: Option<i64>, now: Timestamp) {
    let status = if c.status { "True" } else { "False" }.to_string();
    // The 1.20 API server's server-side apply turns an empty string into null, which the
    // schema then rejects: never send an empty message.
    if c.message.is_empty() {
        c.message = c.reason.clone();
    }
    match conditions.iter_mut().find(|x| x.type_ == c.type_) {
        Some(existing) => {
            if existing.status != status {
                existing.last_transition_time = Time(now);
            }
            existing.status = status;
            existing.reason = c.reason;
            existing.message = c.message;
            existing.observed_generation = generation;
        }
        None => conditions.push(Condition {
            type_: c.type_.to_string(),
            status,
            reason: c.reason,
            message: c.message,
            last_transition_time: Time(now),
            observed_generation: generation,
        }),
    }
}

/// The status of condition `type_`, if present.
pub fn condition_status<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Replaces the whole set of kstatus conditions (Ready, Reconciling, Stalled) in one go.
pub fn set_kstatus(
    conditions: &mut Vec<Condition>,
    state: KState,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: Timestamp,
) {
    let (ready, reconciling, stalled) = match state {
        KState::Ready => (true, false, false),
        KState::Reconciling => (false, true, false),
        KState::Stalled => (false, false, true),
    };
    set_condition(conditions, Cond::new(READY, ready, reason, message), generation, now);
    set_condition(
        conditions,
        Cond::new(RECONCILING, reconciling, reason, if reconciling { message } else { "" }),
        generation,
        now,
    );
    set_condition(conditions, Cond::new(STALLED, stalled, reason, if stalled { message } else { "" }), generation, now);
}

/// The three kstatus states an object can be in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KState {
    Ready,
    Reconciling,
    Stalled,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_apply_sends_only_the_operators_conditions() {
        let now = Timestamp::now();
        let mut conditions = vec![Condition {
            type_: "Audited".into(),
            status: "True".into(),
            reason: "Tick".into(),
            message: "by another writer".into(),
            last_transition_time: Time(now),
            observed_generation: None,
        }];
        set_kstatus(&mut conditions, KState::Reconciling, "Running", "run running", Some(1), now);
        set_condition(&mut conditions, Cond::new(DEGRADED, false, "Healthy", ""), Some(1), now);
        let sent: Vec<String> = own_conditions(&conditions).into_iter().map(|c| c.type_).collect();
        assert_eq!(sent, [READY, RECONCILING, STALLED, DEGRADED]);
    }
}
