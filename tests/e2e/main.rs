//! End-to-end tests against a real kube-apiserver, etcd and kube-controller-manager.
mod cache;
mod corpus;
mod foundation;
mod harness;
mod observability;
mod operator;
mod runs;
mod support;
