//! End-to-end tests on a real node: a kubelet (with containerd, runc and the CNI bridge) and
//! kube-scheduler joined to the test control plane, so pods really run (`hack/node.sh`).
//!
//! `make node-test` runs them (`make test` does too): it installs the node, builds and imports
//! the images, and sets `VOLT_TEST_APISERVER_BIND=0.0.0.0` so pods reach the apiserver.
//! The fast suites keep the kubelet stand-in (tests/e2e/support/kubelet.rs).

#[path = "../kit/mod.rs"]
mod kit;

mod agents;
mod cluster;
mod figures;
mod helm;
mod steps;
