//! volt-operator: a Kubernetes operator that orchestrates AI-agent workflows.
//!
//! - [`agents`]: agents at run time: replica registry, load balancer, LLM calls.
//! - [`api`]: the custom resources (Agent, Workflow, WorkflowRun).
//! - [`engine`]: the pure workflow engine: DAG validation, templating, scheduling decisions.
//! - [`controllers`]: thin reconcilers that read, decide with the engine, apply and write status.
//! - [`executors`]: how steps run (pods, HTTP, agent calls; templates run in the engine).
//! - [`http`]: health, readiness, metrics and the JSON API.
//! - [`leader`]: leader election with a Lease; only the leader runs the controllers.
//! - [`config`]: command line and environment.
//! - [`cache`]: step memoization (memory and ConfigMap tiers).
//! - [`events`]: the event dispatcher, event log and CloudEvents sink.
//! - [`local`]: local mode: run and validate Workflows from YAML files with no cluster.
//! - [`naming`]: names and labels of every child object.
//! - [`metrics`]: the Prometheus metrics.
//! - [`watcher`]: component health and the figures of `/api/v1/stats`.

pub mod agents;
pub mod api;
pub mod cache;
pub mod config;
pub mod controllers;
pub mod engine;
pub mod events;
pub mod executors;
pub mod http;
pub mod leader;
pub mod local;
pub mod metrics;
pub mod naming;
pub mod watcher;
