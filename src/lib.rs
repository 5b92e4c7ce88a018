//! volt-operator: a Kubernetes operator that orchestrates AI-agent workflows.
//!
//! - [`agents`]: agents at run time: replica registry, load balancer, LLM calls.
//! - [`api`]: the custom resources (Agent, Workflow, WorkflowRun, Budget).
//! - [`engine`]: the pure workflow engine: DAG validation, templating, scheduling decisions.
//! - [`controllers`]: thin reconcilers that read, decide with the engine, apply and write status.
//! - [`executors`]: how steps run (pods, HTTP, agent calls; templates run in the engine).
//! - [`http`]: health, readiness, metrics and the JSON API.
//! - [`auth`]: who calls the HTTP API (TokenReview) and what they may see (SubjectAccessReview).
//! - [`leader`]: leader election with a Lease; only the leader runs the controllers.
//! - [`config`]: the `run` flags and their environment variables (the command line itself is the binary's).
//! - [`cache`]: step memoization (memory and ConfigMap tiers).
//! - [`events`]: the event dispatcher, event log and CloudEvents sink.
//! - [`local`]: local mode: run and validate Workflows from YAML files with no cluster.
//! - [`locks`]: [`locks::lock`], a mutex's guard even when poisoned.
//! - [`naming`]: names, labels and status keys of everything the operator makes.
//! - [`pass`]: one pass of a run over a [`pass::StepRuntime`], shared by the controller and local mode.
//! - [`api_timeout`]: the time bound on the operator's API requests (all but watches).
//! - [`kube_util`]: API handles, watch settings and metadata slimming for the controllers.
//! - [`metrics`]: the Prometheus metrics.
//! - [`telemetry`]: OpenTelemetry traces of runs, steps and their calls, exported over OTLP.
//! - [`watcher`]: component health and the figures of `/api/v1/stats`.
//! - [`ui`]: the web view of runs at `/ui`.

pub mod agents;
pub mod api;
pub mod api_timeout;
pub mod auth;
pub mod cache;
pub mod config;
pub mod controllers;
pub mod engine;
pub mod events;
pub mod executors;
pub mod http;
pub mod kube_util;
pub mod leader;
pub mod local;
pub mod locks;
pub mod metrics;
pub mod naming;
pub mod pass;
pub mod plugin;
pub mod shards;
pub mod telemetry;
pub mod text;
pub mod ui;
pub mod watcher;
