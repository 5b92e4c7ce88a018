//! The workflow engine: pure code with no Kubernetes I/O, driven by the WorkflowRun
//! controller and by local mode alike.
//!
//! - [`dag`]: validation of a Workflow spec and its dependency graph.
//! - [`template`]: the one template language (Jinja, strict about undefined names).
//! - [`scheduler`]: decides what to start, retry, time out, skip and finish.
//! - [`params`]: a run's parameters checked against the Workflow's.
//! - [`usage`]: a run's tokens and cost, summed over its step rows.

pub mod dag;
pub mod output_schema;
pub mod params;
pub mod scheduler;
pub mod template;
pub mod usage;

#[cfg(test)]
mod scheduler_tests;

pub use dag::{Dag, InvalidSpec, ValidationError, validate};
pub use scheduler::{
    Action, Decision, Event, Input, LlmWork, Phase, RunInfo, RunMeta, Settings, TaskInfo, TaskStart, Transition, Work,
    advance,
};
