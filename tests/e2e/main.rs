//! End-to-end tests against a real kube-apiserver, etcd and kube-controller-manager.
mod agents;
mod cache;
mod corpus;
mod foundation;
mod harness;
mod llm_faults;
mod observability;
mod operator;
mod packaging;
mod runs;
mod security;
mod support;
