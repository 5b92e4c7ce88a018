//! A run's usage: the tokens and cost of its agent steps, summed over its status rows. Pure;
//! the run controller and local mode call [`totals`] when they stage a status.

use std::collections::BTreeMap;

use crate::api::{RunUsage, StepStatus};

/// The sum of the step rows' tokens and costs (each row counts every attempt): each step, `forEach`
/// child and each loop iteration's step. Rows served from the cache are left out (the call
/// was not made again). `None` when no row used tokens, so runs without agent steps keep a
/// compact status.
pub fn totals(steps: &BTreeMap<String, StepStatus>) -> Option<RunUsage> {
    let mut usage = RunUsage::default();
    let mut any = false;
    for row in steps.values().filter(|r| !r.cached) {
        let Some(t) = row.tokens else { continue };
        any = true;
        usage.input_tokens = usage.input_tokens.saturating_add(t.prompt);
        usage.output_tokens = usage.output_tokens.saturating_add(t.completion);
        if t.cost.is_finite() && t.cost > 0.0 {
            usage.cost += t.cost;
        }
    }
    any.then(|| RunUsage { cost: round_cost(usage.cost), ..usage })
}

/// A cost rounded to 1e-9 of its unit, so sums of many small prices print plainly.
pub fn round_cost(cost: f64) -> f64 {
    (cost * 1e9).round() / 1e9
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::TokenUsage;

    fn row(prompt: u64, completion: u64, cost: f64, cached: bool) -> StepStatus {
        StepStatus { tokens: Some(TokenUsage { prompt, completion, cost }), cached, ..Default::default() }
    }

    #[test]
    fn rows_are_summed_and_cache_hits_cost_nothing() {
        let steps = BTreeMap::from([
            ("a".to_string(), row(100, 20, 0.5, false)),
            ("b[0]".to_string(), row(10, 2, 0.25, false)),
            ("b[1]".to_string(), row(1000, 1000, 9.0, true)),
            ("loop.1.c".to_string(), row(5, 5, 0.0, false)),
            ("t".to_string(), StepStatus::default()),
        ]);
        let u = totals(&steps).expect("usage");
        assert_eq!((u.input_tokens, u.output_tokens), (115, 27));
        assert!((u.cost - 0.75).abs() < 1e-12, "{}", u.cost);
    }

    #[test]
    fn no_agent_rows_no_usage() {
        let steps = BTreeMap::from([("t".to_string(), StepStatus::default())]);
        assert_eq!(totals(&steps), None);
        assert_eq!(totals(&BTreeMap::new()), None);
    }

    #[test]
    fn bad_costs_are_ignored_and_sums_rounded() {
        let steps = BTreeMap::from([
            ("a".to_string(), row(1, 1, f64::NAN, false)),
            ("b".to_string(), row(1, 1, 0.1, false)),
            ("c".to_string(), row(1, 1, 0.2, false)),
        ]);
        assert_eq!(totals(&steps).expect("usage").cost, 0.3);
    }
}
