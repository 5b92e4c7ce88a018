//! A call's room under its agent's rate limit and its budgets: the run the call belongs to
//! ([`CallRun`]) and the [`Hold`] taken before the call, settled with the tokens it used.

use std::time::Duration;

use tokio::time::Instant;

use crate::api::TokenUsage;
use crate::engine::TaskInfo;
use crate::executors::Failure;

use crate::agents::balancer::AgentKey;
use crate::agents::budget::{BudgetError, CallScope, Reservation, RunScope, Spend};
use crate::agents::limits::{Need, Permit};
use crate::agents::registry::AgentEntry;
use crate::agents::runs::{RunMeta, RunRef};
use crate::agents::transcript::Entry;

use super::conversation::{Conversation, worst_case};
use super::{LlmCaller, ms};

/// The run an agent step belongs to, as its calls need it (none outside a run: tests).
#[derive(Debug, Clone, Default)]
pub(super) struct CallRun {
    pub(super) run: Option<RunRef>,
}

/// The meta of no run.
static NO_RUN: RunMeta = RunMeta { workflow: None, priority: 0, budget: None, used: (0, 0.0) };

impl CallRun {
    pub(super) fn meta(&self) -> &RunMeta {
        self.run.as_ref().map_or(&NO_RUN, |r| &r.meta)
    }

    fn scope(&self, agent: &AgentKey) -> CallScope {
        CallScope {
            namespace: agent.namespace.clone(),
            workflow: self.meta().workflow.clone(),
            agent: agent.name.clone(),
            run: self.run.as_ref().map(|r| RunScope {
                uid: r.uid.clone(),
                budget: r.meta.budget.clone(),
                used_before: Spend { tokens: r.meta.used.0, cost: r.meta.used.1 },
            }),
            slot: self.run.as_ref().and_then(|r| r.slot),
        }
    }
}

/// A call's room under its agent's rate limit and its budgets, until it settles.
pub(super) struct Hold {
    permit: Option<Permit>,
    reservation: Reservation,
}

impl Hold {
    /// The call answered with `tokens` (the worst case stays spent when the reply says none).
    pub(super) fn settle(self, tokens: Option<TokenUsage>) {
        let Hold { permit, reservation } = self;
        match tokens {
            Some(t) => {
                if let Some(p) = permit {
                    p.settle(t.prompt + t.completion);
                }
                reservation.settle(Spend { tokens: t.prompt + t.completion, cost: t.cost });
            }
            None => {
                let need = reservation.need();
                if let Some(p) = permit {
                    p.settle(need.tokens);
                }
                reservation.settle(need);
            }
        }
    }
}

impl LlmCaller {
    /// Holds room for one call to `entry` under its rate limit and the budgets it counts
    /// against.
    pub(super) async fn hold(
        &self,
        entry: &AgentEntry,
        conv: &mut Conversation,
        deadline: Option<Instant>,
        run: &CallRun,
        info: &TaskInfo,
    ) -> Result<Hold, Failure> {
        let (tokens, cost) = worst_case(entry, conv);
        let limiter = self.limits.for_agent(&entry.key, entry.spec.rate_limit.as_ref());
        let scope = run.scope(&entry.key);
        let reservation = self
            .budgets
            .reserve(&scope, Spend { tokens, cost }, deadline, |e| {
                if let (Some(s), Some(r)) = (self.budgets.suspender(), &run.run) {
                    let (s, ns, name, why) = (s.clone(), r.namespace.clone(), r.name.clone(), e.to_string());
                    tokio::spawn(async move { s.suspend(&ns, &name, &why).await });
                }
            })
            .await;
        let reservation = match reservation {
            Ok(r) => r,
            Err(e) => {
                if let (Some(m), BudgetError::Exceeded { budget: Some((ns, name)), .. }) = (&self.metrics, &e) {
                    m.budget_refusals.with_label_values(&[ns, name]).inc();
                }
                let message = format!("agent {:?}: {e}", entry.key.name);
                return Err(Failure { message, retryable: false, info: info.clone() });
            }
        };
        let permit = match limiter {
            Some(l) => {
                let need = Need { requests: 1.0, tokens: tokens as f64 };
                match l.acquire(need, run.meta().priority, deadline).await {
                    Ok(p) => {
                        if let Some(m) = &self.metrics {
                            m.rate_limit_wait
                                .with_label_values(&[&entry.key.namespace, &entry.key.name])
                                .observe(p.waited.as_secs_f64());
                        }
                        if p.waited >= Duration::from_millis(1) {
                            conv.transcript
                                .push(Entry::RateLimitWait { agent: entry.key.name.clone(), waited_ms: ms(p.waited) });
                        }
                        Some(p)
                    }
                    Err(e) => return Err(Failure { message: e.to_string(), retryable: true, info: info.clone() }),
                }
            }
            None => None,
        };
        Ok(Hold { permit, reservation })
    }
}
