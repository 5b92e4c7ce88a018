//! The Budget controller: feeds the ledger ([`crate::agents::Budgets`]) from the Budget
//! objects, and writes each Budget's status from it: the window's usage and start, Ready
//! (whether every Workflow and Agent the selector names exists), Exceeded (a call was refused
//! in this window).
//!
//! Usage is written coalesced: a Budget whose usage changed is reconciled at most once per
//! `flush` interval, however many calls it counts; and at each window boundary. A restarted
//! operator reads the usage back from the status (see [`crate::agents::budget`]); what was
//! used in the last interval before a crash is not counted.
//!
//! With shards every replica writes the shares of the shards it holds (`status.shards`, one
//! field manager per shard, so that a share's writer changes with its shard's holder), and
//! shard 0's holder writes the rest: `used` is the sum of the shares. A shard handed over
//! writes its shares first ([`write_shares`]).

use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::agents::Budgets;
use crate::agents::budget::PendingShare;
use crate::api::{
    Agent, Budget, BudgetShare, BudgetStatus, BudgetUsed, Cond, EXCEEDED, FIELD_MANAGER, KState, Workflow,
    own_conditions, set_condition, set_kstatus,
};
use crate::kube_util::{WatchBackoff, api_for};
use crate::metrics::Metrics;

use super::{Error, drain, error_requeue};

struct Ctx {
    client: Client,
    metrics: Metrics,
    budgets: Arc<Budgets>,
    resync: Duration,
    /// Only the replica that leads writes Budget status.
    ownership: Arc<crate::shards::Ownership>,
}

/// What the selector names that does not exist, as a message naming the field.
async fn missing_selections(budget: &Budget, client: &Client) -> Result<Option<String>, kube::Error> {
    let ns = budget.namespace().unwrap_or_default();
    let sel = &budget.spec.selector;
    let mut missing = Vec::new();
    if !sel.workflows.is_empty() {
        let names: Vec<String> = Api::<Workflow>::namespaced(client.clone(), &ns)
            .list_metadata(&ListParams::default())
            .await?
            .items
            .iter()
            .map(|w| w.name_any())
            .collect();
        for (i, w) in sel.workflows.iter().enumerate() {
            if !names.contains(w) {
                missing.push(format!("spec.selector.workflows[{i}]: no Workflow {w:?} in namespace {ns:?}"));
            }
        }
    }
    if !sel.agents.is_empty() {
        let names: Vec<String> = Api::<Agent>::namespaced(client.clone(), &ns)
            .list_metadata(&ListParams::default())
            .await?
            .items
            .iter()
            .map(|a| a.name_any())
            .collect();
        for (i, a) in sel.agents.iter().enumerate() {
            if !names.contains(a) {
                missing.push(format!("spec.selector.agents[{i}]: no Agent {a:?} in namespace {ns:?}"));
            }
        }
    }
    Ok((!missing.is_empty()).then(|| missing.join("; ")))
}

/// The field manager of a shard's share: one per shard, so that whichever replica holds the
/// shard owns its share, and shard 0's holder's apply of the rest leaves it alone.
fn share_manager(shard: u32) -> String {
    format!("{FIELD_MANAGER}-shard-{shard}")
}

/// Writes the shares this replica counted for the shards it holds, of one Budget or all
/// (`budget`), of one shard or all (`shard`).
pub async fn write_shares(
    client: &Client,
    budgets: &Budgets,
    ownership: &crate::shards::Ownership,
    metrics: &Metrics,
    budget: Option<(&str, &str)>,
    shard: Option<u32>,
) -> Result<(), kube::Error> {
    let pending = budgets.pending_shares(budget);
    for p in pending.iter().filter(|p| shard.is_none_or(|s| s == p.shard) && ownership.holds(p.shard)) {
        let PendingShare { namespace, name, shard, share, window_start } = p;
        let api: Api<Budget> = Api::namespaced(client.clone(), namespace);
        let share = BudgetShare {
            tokens: share.used.tokens,
            cost: crate::engine::usage::round_cost(share.used.cost),
            window_start: Time(*window_start),
            refused: share.refused.clone(),
        };
        let patch = json!({"apiVersion": "volt.dev/v1alpha1", "kind": "Budget",
                           "status": {"shards": {shard.to_string(): share}}});
        let params = PatchParams::apply(&share_manager(*shard)).force();
        match api.patch_status(name, &params, &Patch::Apply(&patch)).await {
            Ok(_) => {
                budgets.share_written(p);
                metrics.status_writes.with_label_values(&["BudgetShare"]).inc();
            }
            // Deleted meanwhile: nothing to count in.
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Problems of a spec the schema cannot see.
pub fn check_spec(spec: &crate::api::BudgetSpec) -> Result<(), String> {
    if spec.max_tokens.is_none() && spec.max_cost.is_none() {
        return Err("spec: set maxTokens, maxCost or both".into());
    }
    if let Some(c) = spec.max_cost
        && !(c.is_finite() && c >= 0.0)
    {
        return Err(format!("spec.maxCost: {c} is not a cost"));
    }
    Ok(())
}

async fn reconcile(budget: Arc<Budget>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_timer("budget");
    let ns = budget.namespace().unwrap_or_default();
    let name = budget.name_any();
    let generation = budget.metadata.generation;
    let now = Timestamp::now();
    let old = budget.status.clone().unwrap_or_default();
    let mut status =
        BudgetStatus { conditions: old.conditions.clone(), observed_generation: generation, ..old.clone() };
    let created = budget.metadata.creation_timestamp.as_ref().map(|t| t.0).unwrap_or(now);
    // The watch feeds the ledger; a Budget reconciled before its event was seen is fed here.
    if ctx.budgets.snapshot(&ns, &name).is_none() {
        ctx.budgets.upsert(&ns, &name, &budget.spec, budget.status.as_ref(), created);
    }
    let snap = ctx.budgets.snapshot(&ns, &name);
    let problem = match check_spec(&budget.spec) {
        Err(m) => Some(m),
        Ok(()) => missing_selections(&budget, &ctx.client).await?,
    };
    if ctx.budgets.is_sharded() {
        write_shares(&ctx.client, &ctx.budgets, &ctx.ownership, &ctx.metrics, Some((&ns, &name)), None).await?;
    }
    let mut requeue = ctx.resync;
    if let Some(s) = &snap {
        status.used = BudgetUsed { tokens: s.used.tokens, cost: crate::engine::usage::round_cost(s.used.cost) };
        status.window_start = Some(Time(s.window_start));
        if let Some(end) = s.window_end {
            let until = end.as_millisecond() - now.as_millisecond();
            requeue = requeue.min(Duration::from_millis(until.max(0) as u64 + 1000));
        }
    }
    match &problem {
        Some(m) => set_kstatus(&mut status.conditions, KState::Stalled, "InvalidSpec", m, generation, now),
        None => {
            let mut parts = Vec::new();
            if let Some(m) = budget.spec.max_tokens {
                parts.push(format!("{} of {m} tokens", status.used.tokens));
            }
            if let Some(m) = budget.spec.max_cost {
                parts.push(format!("cost {} of {m}", status.used.cost));
            }
            let msg = format!("{:?} window: {} used", budget.spec.window, parts.join(", "));
            set_kstatus(&mut status.conditions, KState::Ready, "Counting", &msg, generation, now);
        }
    }
    let exceeded = match snap.as_ref().and_then(|s| s.refused.clone()) {
        Some(m) => Cond::new(EXCEEDED, true, "CallRefused", m),
        None => Cond::new(EXCEEDED, false, "WithinBudget", "no call refused in this window"),
    };
    set_condition(&mut status.conditions, exceeded, generation, now);
    if status != old && ctx.ownership.leads() {
        let api: Api<Budget> = Api::namespaced(ctx.client.clone(), &ns);
        // The shares are their holders' (see `write_shares`).
        let sent =
            BudgetStatus { conditions: own_conditions(&status.conditions), shards: Default::default(), ..status };
        let patch = json!({"apiVersion": "volt.dev/v1alpha1", "kind": "Budget", "status": sent});
        api.patch_status(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch)).await?;
        ctx.metrics.status_writes.with_label_values(&["Budget"]).inc();
    }
    Ok(Action::requeue(requeue))
}

fn error_policy(_b: Arc<Budget>, err: &Error, ctx: Arc<Ctx>) -> Action {
    ctx.metrics.reconcile_errors.with_label_values(&["budget", err.metric_label()]).inc();
    error_requeue()
}

/// The Budget controller of one scope.
pub async fn controller(
    client: Client,
    scope: Option<String>,
    metrics: Metrics,
    budgets: Arc<Budgets>,
    flush: Duration,
    ownership: Arc<crate::shards::Ownership>,
    shutdown: CancellationToken,
) {
    let scope_name = scope.clone().unwrap_or_default();
    let (store, writer) = reflector::store();
    let ledger = budgets.clone();
    let stream = watcher(api_for::<Budget>(&client, &scope), watcher::Config::default())
        .backoff(WatchBackoff::default())
        .reflect(writer)
        .inspect_ok(move |event| match event {
            watcher::Event::Apply(b) | watcher::Event::InitApply(b) => {
                let created = b.metadata.creation_timestamp.as_ref().map(|t| t.0).unwrap_or_else(Timestamp::now);
                ledger.upsert(&b.namespace().unwrap_or_default(), &b.name_any(), &b.spec, b.status.as_ref(), created);
            }
            watcher::Event::Delete(b) => ledger.remove(&b.namespace().unwrap_or_default(), &b.name_any()),
            watcher::Event::InitDone => ledger.scope_synced(&scope_name),
            watcher::Event::Init => {}
        })
        .touched_objects();
    // Budgets whose usage changed, at most once per `flush`.
    let dirty = {
        let (budgets, scope) = (budgets.clone(), scope.clone());
        futures::stream::unfold((), move |()| {
            let budgets = budgets.clone();
            async move {
                tokio::select! {
                    _ = budgets.changed() => {}
                    _ = tokio::time::sleep(Duration::from_secs(60)) => {}
                }
                tokio::time::sleep(flush).await;
                Some((budgets.dirty(), ()))
            }
        })
        .flat_map(futures::stream::iter)
        .filter(move |(ns, _)| std::future::ready(scope.as_ref().is_none_or(|s| s == ns)))
        .map(|(ns, name)| ObjectRef::<Budget>::new(&name).within(&ns))
    };
    let ctx = Arc::new(Ctx { client, metrics, budgets, resync: Duration::from_secs(300), ownership });
    let stream = Controller::for_stream(stream, store)
        .trigger_backoff(WatchBackoff::default())
        .reconcile_on(dirty)
        .graceful_shutdown_on(async move { shutdown.cancelled().await })
        .run(reconcile, error_policy, ctx);
    drain("budget", stream).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::BudgetSpec;

    #[test]
    fn a_budget_needs_a_limit() {
        let err = check_spec(&BudgetSpec::default()).expect_err("no limit");
        assert_eq!(err, "spec: set maxTokens, maxCost or both");
        assert!(check_spec(&BudgetSpec { max_cost: Some(f64::NAN), ..Default::default() }).is_err());
        assert!(check_spec(&BudgetSpec { max_tokens: Some(5), ..Default::default() }).is_ok());
    }
}
