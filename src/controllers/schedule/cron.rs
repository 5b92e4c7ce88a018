//! Cron expressions in a time zone (pure): parsing a schedule's `spec.schedule` and
//! `spec.timeZone`, and the slots they give. The expressions are croner's, read with 5 fields
//! (no seconds, no years) or an @macro; times are jiff's, with its time zone database.
//!
//! Daylight saving time follows croner (the Open Cron Pattern Specification): a fixed time that
//! a spring-forward gap skips runs once at the end of the gap, a fixed time that a fall-back
//! repeats runs once (the first time), and interval patterns (`*/15 * * * *`) run in both
//! copies of a repeated hour.

use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};
use jiff::Timestamp;
use jiff::tz::TimeZone;

/// Most slots counted between two times; a longer outage counts this many.
pub const MAX_COUNTED_SLOTS: u64 = 10_000;

/// Why a schedule's spec cannot be used, naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("spec.schedule: {expr:?} is not a 5-field cron expression or an @macro: {reason}")]
    Schedule { expr: String, reason: String },
    #[error("spec.schedule: {0:?} never matches a time")]
    NeverMatches(String),
    #[error(
        "spec.timeZone: unknown time zone {0:?}: give an IANA name such as Europe/Paris, or leave it unset for UTC"
    )]
    TimeZone(String),
    #[error("spec.startingDeadlineSeconds: must be 0 or more, not {0}")]
    Deadline(i64),
}

/// A parsed cron expression and the time zone it is read in.
#[derive(Debug, Clone)]
pub struct CronSchedule {
    cron: Cron,
    tz: TimeZone,
    tz_name: String,
}

impl CronSchedule {
    /// Parses `expr` (5 fields or an @macro) in time zone `tz` (IANA; UTC when `None`).
    pub fn parse(expr: &str, tz: Option<&str>) -> Result<Self, SpecError> {
        let (tz, tz_name) = match tz {
            None => (TimeZone::UTC, "UTC".to_string()),
            Some(name) => match TimeZone::get(name) {
                Ok(tz) => (tz, name.to_string()),
                Err(_) => return Err(SpecError::TimeZone(name.to_string())),
            },
        };
        let trimmed = expr.trim();
        let invalid = |reason: String| SpecError::Schedule { expr: expr.to_string(), reason };
        // croner also reads 6 or 7 fields (seconds, years); the contract is 5.
        if !trimmed.starts_with('@') && trimmed.split_whitespace().count() != 5 {
            return Err(invalid(format!("{} fields", trimmed.split_whitespace().count())));
        }
        let parser = CronParser::builder().seconds(Seconds::Disallowed).year(Year::Disallowed).build();
        let cron = parser.parse(trimmed).map_err(|e| invalid(e.to_string()))?;
        let schedule = Self { cron, tz, tz_name };
        if schedule.next_after(Timestamp::UNIX_EPOCH).is_none() {
            return Err(SpecError::NeverMatches(expr.to_string()));
        }
        Ok(schedule)
    }

    /// The time zone's name (`UTC` when unset).
    pub fn time_zone(&self) -> &str {
        &self.tz_name
    }

    /// The first slot strictly after `t`.
    pub fn next_after(&self, t: Timestamp) -> Option<Timestamp> {
        self.cron.find_next_occurrence(&t.to_zoned(self.tz.clone()), false).ok().map(|z| z.timestamp())
    }

    /// The latest slot at or before `t`.
    pub fn latest_until(&self, t: Timestamp) -> Option<Timestamp> {
        self.cron.find_previous_occurrence(&t.to_zoned(self.tz.clone()), true).ok().map(|z| z.timestamp())
    }

    /// The slots strictly after `after` and strictly before `before`, at most
    /// [`MAX_COUNTED_SLOTS`].
    pub fn count_between(&self, after: Timestamp, before: Timestamp) -> u64 {
        let mut n = 0;
        let mut t = after;
        while n < MAX_COUNTED_SLOTS {
            match self.next_after(t) {
                Some(next) if next < before => {
                    n += 1;
                    t = next;
                }
                _ => break,
            }
        }
        n
    }

    /// The slots strictly after `after`, in order, `n` of them at most.
    pub fn slots_after(&self, after: Timestamp, n: usize) -> Vec<Timestamp> {
        let mut out = Vec::with_capacity(n);
        let mut t = after;
        while out.len() < n {
            match self.next_after(t) {
                Some(next) => {
                    out.push(next);
                    t = next;
                }
                None => break,
            }
        }
        out
    }
}

/// Where the scheduling logic reads the time: the system clock in the operator, a clock the
/// test moves in unit tests.
pub trait Clock: Send + Sync {
    fn now(&self) -> Timestamp;
}

/// The system's clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }
}

/// A clock that stands still until it is set or advanced (for tests).
#[derive(Debug)]
pub struct ManualClock(std::sync::Mutex<Timestamp>);

impl ManualClock {
    pub fn new(t: Timestamp) -> Self {
        Self(std::sync::Mutex::new(t))
    }
    pub fn set(&self, t: Timestamp) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = t;
    }
    pub fn advance(&self, d: jiff::SignedDuration) {
        let mut t = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *t = t.checked_add(d).unwrap_or(*t);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().expect("a timestamp")
    }

    fn local(s: &CronSchedule, t: Timestamp) -> String {
        t.to_zoned(s.tz.clone()).strftime("%Y-%m-%dT%H:%M%:z").to_string()
    }

    #[test]
    fn five_fields_and_macros_parse_others_do_not() {
        for ok in
            ["*/15 * * * *", "0 3 * * MON-FRI", "@hourly", "@daily", "@weekly", "@monthly", "@yearly", "@annually"]
        {
            CronSchedule::parse(ok, None).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in ["", "* * * *", "0 * * * * *", "0 0 * * * * 2030", "61 * * * *", "* * * * MOO", "@reboot", "nope"] {
            let err = CronSchedule::parse(bad, None).expect_err(bad);
            assert!(err.to_string().starts_with("spec.schedule: "), "{bad}: {err}");
        }
        assert_eq!(
            CronSchedule::parse("0 0 30 2 *", None).expect_err("Feb 30"),
            SpecError::NeverMatches("0 0 30 2 *".into())
        );
        let err = CronSchedule::parse("@daily", Some("Mars/Olympus")).expect_err("unknown zone");
        assert!(err.to_string().starts_with("spec.timeZone: unknown time zone \"Mars/Olympus\""), "{err}");
    }

    #[test]
    fn macros_mean_what_cron_means() {
        let at = ts("2025-05-14T10:20:00Z"); // a Wednesday
        let next = |e: &str| CronSchedule::parse(e, None).expect(e).next_after(at).expect("a slot").to_string();
        assert_eq!(next("@hourly"), "2025-05-14T11:00:00Z");
        assert_eq!(next("@daily"), "2025-05-15T00:00:00Z");
        assert_eq!(next("@weekly"), "2025-05-18T00:00:00Z");
        assert_eq!(next("@monthly"), "2025-06-01T00:00:00Z");
        assert_eq!(next("@yearly"), "2026-01-01T00:00:00Z");
    }

    #[test]
    fn daily_in_paris_across_both_dst_changes() {
        let s = CronSchedule::parse("30 2 * * *", Some("Europe/Paris")).expect("valid");
        assert_eq!(s.time_zone(), "Europe/Paris");
        // Spring forward, 2025-03-30: 02:00 CET becomes 03:00 CEST, 02:30 does not exist.
        let slots: Vec<String> =
            s.slots_after(ts("2025-03-28T12:00:00Z"), 4).into_iter().map(|t| local(&s, t)).collect();
        assert_eq!(
            slots,
            ["2025-03-29T02:30+01:00", "2025-03-30T03:00+02:00", "2025-03-31T02:30+02:00", "2025-04-01T02:30+02:00"]
        );
        // Fall back, 2025-10-26: 03:00 CEST becomes 02:00 CET, 02:30 happens twice: once here.
        let slots: Vec<String> =
            s.slots_after(ts("2025-10-24T12:00:00Z"), 3).into_iter().map(|t| local(&s, t)).collect();
        assert_eq!(slots, ["2025-10-25T02:30+02:00", "2025-10-26T02:30+02:00", "2025-10-27T02:30+01:00"]);
    }

    #[test]
    fn an_interval_pattern_runs_in_both_copies_of_the_repeated_hour() {
        let s = CronSchedule::parse("*/30 * * * *", Some("Europe/Paris")).expect("valid");
        let slots: Vec<String> =
            s.slots_after(ts("2025-10-25T23:45:00Z"), 5).into_iter().map(|t| local(&s, t)).collect();
        assert_eq!(
            slots,
            [
                "2025-10-26T02:00+02:00",
                "2025-10-26T02:30+02:00",
                "2025-10-26T02:00+01:00",
                "2025-10-26T02:30+01:00",
                "2025-10-26T03:00+01:00"
            ]
        );
        // And none in the hour that spring-forward skips.
        let slots: Vec<String> =
            s.slots_after(ts("2025-03-30T00:15:00Z"), 3).into_iter().map(|t| local(&s, t)).collect();
        assert_eq!(slots, ["2025-03-30T01:30+01:00", "2025-03-30T03:00+02:00", "2025-03-30T03:30+02:00"]);
    }

    #[test]
    fn restricted_day_fields_match_either_as_in_vixie_cron() {
        // The 13th or a Friday: 2025-06-06 is a Friday, 2025-06-13 both, 2025-06-20 a Friday.
        let s = CronSchedule::parse("0 0 13 * FRI", None).expect("valid");
        let slots: Vec<String> = s.slots_after(ts("2025-06-01T00:00:00Z"), 3).iter().map(|t| t.to_string()).collect();
        assert_eq!(slots, ["2025-06-06T00:00:00Z", "2025-06-13T00:00:00Z", "2025-06-20T00:00:00Z"]);
        let s = CronSchedule::parse("0 0 1 * *", None).expect("valid");
        assert_eq!(s.next_after(ts("2025-06-01T00:00:00Z")), Some(ts("2025-07-01T00:00:00Z")));
    }

    #[test]
    fn latest_and_counts() {
        let s = CronSchedule::parse("*/15 * * * *", None).expect("valid");
        assert_eq!(s.latest_until(ts("2025-01-01T10:44:59Z")), Some(ts("2025-01-01T10:30:00Z")));
        assert_eq!(s.latest_until(ts("2025-01-01T10:45:00Z")), Some(ts("2025-01-01T10:45:00Z")));
        assert_eq!(s.count_between(ts("2025-01-01T10:00:00Z"), ts("2025-01-01T11:00:00Z")), 3);
        assert_eq!(s.count_between(ts("2025-01-01T10:00:00Z"), ts("2025-01-01T10:00:00Z")), 0);
        let every_minute = CronSchedule::parse("* * * * *", None).expect("valid");
        assert_eq!(
            every_minute.count_between(ts("2020-01-01T00:00:00Z"), ts("2025-01-01T00:00:00Z")),
            MAX_COUNTED_SLOTS
        );
    }

    #[test]
    fn a_manual_clock_moves_only_when_told() {
        let c = ManualClock::new(ts("2025-01-01T00:00:00Z"));
        assert_eq!(c.now(), ts("2025-01-01T00:00:00Z"));
        c.advance(jiff::SignedDuration::from_secs(90));
        assert_eq!(c.now(), ts("2025-01-01T00:01:30Z"));
        c.set(ts("2030-01-01T00:00:00Z"));
        assert_eq!(c.now(), ts("2030-01-01T00:00:00Z"));
        assert!(SystemClock.now() > ts("2024-01-01T00:00:00Z"));
    }
}
