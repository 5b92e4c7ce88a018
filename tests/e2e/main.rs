//! End-to-end tests against a real kube-apiserver, etcd and kube-controller-manager.
mod foundation;
mod harness;
mod operator;
mod runs;
mod support;
