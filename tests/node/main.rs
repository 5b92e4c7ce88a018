//! End-to-end tests on a real node: a kubelet (with containerd, runc and the CNI bridge) and
//! kube-scheduler joined to the test control plane, so pods really run (`hack/node.sh`).
//!
//! `make node-test` runs them (`make test` does too): it installs the node, builds and imports
//! the images, and sets `VOLT_TEST_APISERVER_BIND=0.0.0.0` so pods reach the apiserver.
//! The fast suites keep the kubelet stand-in (tests/e2e/support/kubelet.rs).

// The shared fixture (control plane, helpers), until it moves to tests/kit.
#[path = "../e2e/support/mod.rs"]
#[allow(unused_imports)]
mod support;

mod agents;
mod cluster;
mod figures;
mod helm;
mod steps;
