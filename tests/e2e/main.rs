//! End-to-end tests against a real kube-apiserver, etcd and kube-controller-manager.
mod access;
mod agents;
mod cache;
mod children;
mod control_flow;
mod corpus;
mod cost;
mod event_log;
mod foundation;
mod harness;
#[path = "../kit/mod.rs"]
mod kit;
mod llm_faults;
mod llm_steps;
mod observability;
mod packaging;
mod pipeline;
mod plugin;
mod runs;
mod schedules;
mod security;
mod sharding;
mod traces;
mod web_view;
mod web_view_browser;
