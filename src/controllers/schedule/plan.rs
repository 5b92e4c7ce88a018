//! What a schedule does now (pure): which slot is due, whether its run starts or the slot is
//! skipped (too late, or forbidden by an active run), which active runs a replacement cancels,
//! how many slots were missed, when the next slot is; and which finished runs the history
//! limits delete. The reconciler reads the time from its [`super::cron::Clock`] and passes it
//! in, so every decision here is a function of its inputs.

use jiff::{SignedDuration, Timestamp};

use crate::api::ScheduleConcurrencyPolicy;

use super::cron::CronSchedule;

/// What the schedule's status and runs look like now.
#[derive(Debug, Clone)]
pub struct Observed<'a> {
    pub now: Timestamp,
    /// When the schedule was created: slots before it are not due.
    pub created: Timestamp,
    /// `status.lastScheduleTime`: slots up to it were dealt with.
    pub last_schedule: Option<Timestamp>,
    pub starting_deadline_seconds: Option<i64>,
    pub suspend: bool,
    pub policy: ScheduleConcurrencyPolicy,
    /// Names of the schedule's runs that have not finished.
    pub active: &'a [String],
    /// The schedule's name, which names the run of each slot.
    pub schedule: &'a str,
}

/// What to do with the due slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotAction {
    /// No slot is due (none passed since the last one, or the schedule is suspended).
    Nothing,
    /// Start the slot's run (named `run`), after cancelling `cancel` (policy Replace).
    Start { slot: Timestamp, run: String, cancel: Vec<String> },
    /// The slot is later than `startingDeadlineSeconds` allows: skipped, counted as missed.
    TooLate { slot: Timestamp, late: SignedDuration },
    /// Policy Forbid and runs are active: skipped, counted as missed.
    Forbidden { slot: Timestamp },
}

impl SlotAction {
    /// The slot dealt with, which becomes `status.lastScheduleTime`.
    pub fn slot(&self) -> Option<Timestamp> {
        match self {
            SlotAction::Nothing => None,
            SlotAction::Start { slot, .. } | SlotAction::TooLate { slot, .. } | SlotAction::Forbidden { slot } => {
                Some(*slot)
            }
        }
    }
}

/// The decision of one pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub action: SlotAction,
    /// Slots before the due one that passed unstarted (the operator was down or the schedule
    /// suspended): only the latest slot ever starts.
    pub older_missed: u64,
    /// Slots newly missed in all: `older_missed`, plus the due slot when it is skipped.
    pub missed: u64,
    /// The next slot after now (none while suspended).
    pub next: Option<Timestamp>,
}

/// Decides what the schedule does at `o.now`.
pub fn plan(schedule: &CronSchedule, o: &Observed<'_>) -> Plan {
    if o.suspend {
        return Plan { action: SlotAction::Nothing, older_missed: 0, missed: 0, next: None };
    }
    let next = schedule.next_after(o.now);
    let earliest = o.last_schedule.unwrap_or(o.created);
    let Some(due) = schedule.latest_until(o.now).filter(|t| *t > earliest) else {
        return Plan { action: SlotAction::Nothing, older_missed: 0, missed: 0, next };
    };
    let older_missed = schedule.count_between(earliest, due);
    let run = crate::naming::schedule_run_name(o.schedule, due.as_second());
    // The due slot's own run may exist already (started by a pass whose status write was
    // lost, or by another replica): it is not "another" active run.
    let others: Vec<String> = o.active.iter().filter(|r| **r != run).cloned().collect();
    let late = o.now.duration_since(due);
    let too_late = o.starting_deadline_seconds.is_some_and(|d| late > SignedDuration::from_secs(d.max(0)));
    let action = if too_late {
        SlotAction::TooLate { slot: due, late }
    } else if o.policy == ScheduleConcurrencyPolicy::Forbid && !others.is_empty() {
        SlotAction::Forbidden { slot: due }
    } else {
        let cancel = if o.policy == ScheduleConcurrencyPolicy::Replace { others } else { Vec::new() };
        SlotAction::Start { slot: due, run, cancel }
    };
    let missed = older_missed + u64::from(!matches!(action, SlotAction::Start { .. }));
    Plan { action, older_missed, missed, next }
}

/// A finished run of the schedule, for the history limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FinishedRun {
    pub name: String,
    pub created: Timestamp,
    pub succeeded: bool,
}

/// The finished runs to delete: the oldest beyond `successful` succeeded runs and beyond
/// `failed` failed or cancelled runs.
pub fn prune(finished: &[FinishedRun], successful: u32, failed: u32) -> Vec<String> {
    let mut out = Vec::new();
    for (ok, keep) in [(true, successful), (false, failed)] {
        let mut runs: Vec<&FinishedRun> = finished.iter().filter(|r| r.succeeded == ok).collect();
        runs.sort_by(|a, b| (a.created, &a.name).cmp(&(b.created, &b.name)));
        let extra = runs.len().saturating_sub(keep as usize);
        out.extend(runs.into_iter().take(extra).map(|r| r.name.clone()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::cron::{Clock, ManualClock};
    use super::*;
    use crate::naming::schedule_run_name;

    fn ts(s: &str) -> Timestamp {
        s.parse().expect("a timestamp")
    }

    fn name(t: Timestamp) -> String {
        schedule_run_name("s", t.as_second())
    }

    /// A schedule's status as the reconciler keeps it, moved by [`Sim::pass`].
    struct Sim {
        schedule: CronSchedule,
        clock: ManualClock,
        created: Timestamp,
        last: Option<Timestamp>,
        deadline: Option<i64>,
        policy: ScheduleConcurrencyPolicy,
        suspend: bool,
        active: Vec<String>,
        started: Vec<String>,
        missed: u64,
    }

    impl Sim {
        fn new(expr: &str, tz: Option<&str>, created: &str) -> Self {
            Self {
                schedule: CronSchedule::parse(expr, tz).expect("valid"),
                clock: ManualClock::new(ts(created)),
                created: ts(created),
                last: None,
                deadline: None,
                policy: ScheduleConcurrencyPolicy::Allow,
                suspend: false,
                active: Vec::new(),
                started: Vec::new(),
                missed: 0,
            }
        }

        /// One reconcile at the clock's time; applies the plan as the reconciler does.
        fn pass(&mut self) -> Plan {
            let o = Observed {
                now: self.clock.now(),
                created: self.created,
                last_schedule: self.last,
                starting_deadline_seconds: self.deadline,
                suspend: self.suspend,
                policy: self.policy,
                active: &self.active,
                schedule: "s",
            };
            let p = plan(&self.schedule, &o);
            if let SlotAction::Start { run, cancel, .. } = &p.action {
                self.active.retain(|r| !cancel.contains(r));
                if !self.active.contains(run) {
                    self.active.push(run.clone());
                }
                self.started.push(run.clone());
            }
            self.last = p.action.slot().or(self.last);
            self.missed += p.missed;
            p
        }

        /// Passes at each requeue (the next slot) until `until`.
        fn follow_requeues(&mut self, until: Timestamp) {
            loop {
                let p = self.pass();
                match p.next {
                    Some(next) if next <= until => self.clock.set(next),
                    _ => return,
                }
            }
        }
    }

    #[test]
    fn nothing_is_due_before_the_first_slot_and_the_requeue_is_the_slot() {
        let mut sim = Sim::new("*/15 * * * *", None, "2025-01-01T10:03:10Z");
        let p = sim.pass();
        assert_eq!(p.action, SlotAction::Nothing);
        assert_eq!(p.next, Some(ts("2025-01-01T10:15:00Z")));
        // The slot of 10:00 is before the schedule was created: never due.
        sim.clock.set(ts("2025-01-01T10:15:00Z"));
        let p = sim.pass();
        let slot = ts("2025-01-01T10:15:00Z");
        assert_eq!(p.action, SlotAction::Start { slot, run: name(slot), cancel: vec![] });
        assert_eq!(name(slot), "s-28928775");
        assert_eq!(p.next, Some(ts("2025-01-01T10:30:00Z")));
        // A second pass in the same slot (a run event) starts nothing more.
        sim.clock.advance(SignedDuration::from_secs(20));
        assert_eq!(sim.pass().action, SlotAction::Nothing);
    }

    #[test]
    fn following_requeues_starts_every_slot_once() {
        let mut sim = Sim::new("*/15 * * * *", None, "2025-01-01T10:03:10Z");
        sim.follow_requeues(ts("2025-01-01T12:00:00Z"));
        assert_eq!(sim.started.len(), 8, "10:15 to 12:00: {:?}", sim.started);
        assert_eq!(sim.missed, 0);
        let mut unique = sim.started.clone();
        unique.dedup();
        assert_eq!(unique, sim.started);
    }

    #[test]
    fn after_downtime_only_the_latest_slot_starts_and_the_others_are_missed() {
        let mut sim = Sim::new("*/15 * * * *", None, "2025-01-01T10:00:00Z");
        sim.last = Some(ts("2025-01-01T10:00:00Z"));
        // Down from 10:05 to 11:20: slots 10:15, 10:30, 10:45, 11:00, 11:15 passed.
        sim.clock.set(ts("2025-01-01T11:20:00Z"));
        let p = sim.pass();
        let slot = ts("2025-01-01T11:15:00Z");
        assert_eq!(p.action, SlotAction::Start { slot, run: name(slot), cancel: vec![] });
        assert_eq!((p.older_missed, p.missed), (4, 4));
        assert_eq!(sim.last, Some(slot));
        assert_eq!(sim.pass().missed, 0, "counted once");
    }

    #[test]
    fn a_deadline_skips_a_late_slot_and_counts_it() {
        let mut sim = Sim::new("0 * * * *", None, "2025-01-01T09:30:00Z");
        sim.deadline = Some(300);
        sim.last = Some(ts("2025-01-01T10:00:00Z"));
        // Back at 12:04: 12:00 is 4 minutes late, within 5: it starts; 11:00 is missed.
        sim.clock.set(ts("2025-01-01T12:04:00Z"));
        let p = sim.pass();
        assert!(matches!(p.action, SlotAction::Start { .. }), "{p:?}");
        assert_eq!(p.missed, 1);
        // Back at 14:06 instead: 14:00 is 6 minutes late, skipped; 13:00 missed too.
        sim.clock.set(ts("2025-01-01T14:06:00Z"));
        let p = sim.pass();
        assert_eq!(
            p.action,
            SlotAction::TooLate { slot: ts("2025-01-01T14:00:00Z"), late: SignedDuration::from_secs(360) }
        );
        assert_eq!((p.older_missed, p.missed), (1, 2));
        assert_eq!(sim.missed, 3);
        assert_eq!(sim.last, Some(ts("2025-01-01T14:00:00Z")));
        assert_eq!(sim.pass().action, SlotAction::Nothing, "a skipped slot is not noticed again");
    }

    #[test]
    fn forbid_skips_while_a_run_is_active_replace_cancels_it() {
        let mut sim = Sim::new("* * * * *", None, "2025-01-01T10:00:30Z");
        sim.policy = ScheduleConcurrencyPolicy::Forbid;
        sim.clock.set(ts("2025-01-01T10:01:00Z"));
        assert!(matches!(sim.pass().action, SlotAction::Start { .. }));
        sim.clock.set(ts("2025-01-01T10:02:00Z"));
        let p = sim.pass();
        assert_eq!(p.action, SlotAction::Forbidden { slot: ts("2025-01-01T10:02:00Z") });
        assert_eq!(p.missed, 1);
        // The due slot's own run is not "another" run: a lost status write does not skip it.
        sim.active = vec![name(ts("2025-01-01T10:03:00Z"))];
        sim.clock.set(ts("2025-01-01T10:03:00Z"));
        assert!(matches!(sim.pass().action, SlotAction::Start { .. }));

        sim.policy = ScheduleConcurrencyPolicy::Replace;
        sim.clock.set(ts("2025-01-01T10:04:00Z"));
        let p = sim.pass();
        let slot = ts("2025-01-01T10:04:00Z");
        assert_eq!(
            p.action,
            SlotAction::Start { slot, run: name(slot), cancel: vec![name(ts("2025-01-01T10:03:00Z"))] }
        );
        assert_eq!(sim.active, [name(slot)]);
    }

    #[test]
    fn suspend_starts_nothing_and_resuming_starts_the_latest_slot() {
        let mut sim = Sim::new("@hourly", None, "2025-01-01T09:30:00Z");
        sim.suspend = true;
        sim.clock.set(ts("2025-01-01T12:30:00Z"));
        let p = sim.pass();
        assert_eq!(p, Plan { action: SlotAction::Nothing, older_missed: 0, missed: 0, next: None });
        sim.suspend = false;
        let p = sim.pass();
        assert!(matches!(p.action, SlotAction::Start { slot, .. } if slot == ts("2025-01-01T12:00:00Z")));
        assert_eq!(p.missed, 2, "10:00 and 11:00");
        // With a deadline, a resume long after the slot starts nothing.
        let mut sim = Sim::new("@daily", None, "2025-01-01T09:30:00Z");
        sim.deadline = Some(60);
        sim.clock.set(ts("2025-01-02T08:00:00Z"));
        assert!(matches!(sim.pass().action, SlotAction::TooLate { .. }));
    }

    #[test]
    fn paris_slots_across_dst_follow_the_wall_clock() {
        let mut sim = Sim::new("30 2 * * *", Some("Europe/Paris"), "2025-03-28T12:00:00Z");
        sim.follow_requeues(ts("2025-04-01T12:00:00Z"));
        // 2025-03-29 02:30 CET, 2025-03-30 03:00 CEST (02:30 does not exist), then 02:30 CEST.
        let expected: Vec<String> =
            ["2025-03-29T01:30:00Z", "2025-03-30T01:00:00Z", "2025-03-31T00:30:00Z", "2025-04-01T00:30:00Z"]
                .into_iter()
                .map(|t| name(ts(t)))
                .collect();
        assert_eq!(sim.started, expected);
        assert_eq!(sim.missed, 0);

        let mut sim = Sim::new("30 2 * * *", Some("Europe/Paris"), "2025-10-25T12:00:00Z");
        sim.follow_requeues(ts("2025-10-27T12:00:00Z"));
        // 02:30 happens twice on 2025-10-26: one run, at the first.
        let expected: Vec<String> =
            ["2025-10-26T00:30:00Z", "2025-10-27T01:30:00Z"].into_iter().map(|t| name(ts(t))).collect();
        assert_eq!(sim.started, expected);
    }

    #[test]
    fn an_interval_in_paris_starts_both_copies_of_the_repeated_hour_once_each() {
        let mut sim = Sim::new("*/30 * * * *", Some("Europe/Paris"), "2025-10-25T23:45:00Z");
        sim.follow_requeues(ts("2025-10-26T02:00:00Z"));
        // 02:00 and 02:30 CEST, 02:00 and 02:30 CET, 03:00 CET: five runs, half an hour apart in UTC.
        let expected: Vec<String> = [
            "2025-10-26T00:00:00Z",
            "2025-10-26T00:30:00Z",
            "2025-10-26T01:00:00Z",
            "2025-10-26T01:30:00Z",
            "2025-10-26T02:00:00Z",
        ]
        .into_iter()
        .map(|t| name(ts(t)))
        .collect();
        assert_eq!(sim.started, expected);
        assert_eq!(sim.missed, 0);
        // Down across the repeated hour: the latest slot starts, the four before it are missed.
        let mut sim = Sim::new("*/30 * * * *", Some("Europe/Paris"), "2025-10-25T23:45:00Z");
        sim.clock.set(ts("2025-10-26T02:10:00Z"));
        let p = sim.pass();
        assert!(matches!(p.action, SlotAction::Start { slot, .. } if slot == ts("2025-10-26T02:00:00Z")), "{p:?}");
        assert_eq!(p.missed, 4);
    }

    #[test]
    fn history_limits_delete_the_oldest_beyond_each_limit() {
        let run = |name: &str, minute: i64, succeeded: bool| FinishedRun {
            name: name.into(),
            created: Timestamp::from_second(minute * 60).expect("time"),
            succeeded,
        };
        let finished = vec![
            run("s-4", 4, true),
            run("s-1", 1, true),
            run("s-3", 3, false),
            run("s-2", 2, true),
            run("s-5", 5, false),
            run("s-6", 6, true),
        ];
        assert_eq!(prune(&finished, 3, 1), ["s-1", "s-3"]);
        assert_eq!(prune(&finished, 0, 0), ["s-1", "s-2", "s-4", "s-6", "s-3", "s-5"]);
        assert!(prune(&finished, 10, 10).is_empty());
        // Same creation second: by name.
        let same = vec![run("b", 1, true), run("a", 1, true)];
        assert_eq!(prune(&same, 1, 1), ["a"]);
    }
}
