//! The test kit: everything the suites share, in one place. Each test crate includes it with
//! `#[path = "../kit/mod.rs"] mod kit;` (`tests/e2e/main.rs`, `tests/chaos/main.rs`,
//! `tests/local/main.rs`), and so do the examples (`#[path = "../tests/kit/mod.rs"]`): a
//! module tree, not a crate, so that it sees the crate's `CARGO_BIN_EXE_volt-operator` and
//! `CARGO_MANIFEST_DIR` and the Cargo manifest stays as it is. Not every crate uses every
//! part, hence the dead-code allowance.
//!
//! What is here:
//!
//! - [`control_plane`]: a real etcd, kube-apiserver and kube-controller-manager on loopback,
//!   one per test process ([`shared`]) or one of a test's own ([`ControlPlane::start`], which can
//!   stop and start its apiserver); admin and non-admin ([`OPERATOR_USER`]) kubeconfigs and
//!   clients, a fresh namespace per test ([`ControlPlane::namespace`]), kubeconfigs and configs
//!   for a token ([`ControlPlane::write_kubeconfig_with_token`],
//!   [`ControlPlane::config_with_token`]), [`kube_config`] and [`kube_client`] from any
//!   kubeconfig, and the directory of the installed binaries ([`control_plane::bin_dir`]).
//! - [`process`]: the operator binary as an OS process, [`OperatorProcess`] (built with
//!   [`OperatorProcess::builder`]: arguments, environment, kubeconfig and so identity, log file;
//!   then ready wait, `GET` of its port, metrics, SIGKILL, SIGTERM, exit code, log tail, panic
//!   check).
//! - [`in_process`]: the operator's controllers on a task of the test ([`Operator`]).
//! - [`kubelet`]: the kubelet stand-in (pod status by hand, or a background [`Kubelet`] following
//!   a plan per pod; [`kubelet::scripted`] for step pods driven by their environment).
//! - [`openai`]: OpenAI-compatible stub servers ([`Stub`]) with scripted faults, JSON and tool calls.
//! - [`browser`]: headless Chromium driven by Playwright for Python ([`browser::drive`]), or a
//!   skip when no Chromium is installed ([`browser::chromium`]).
//! - [`mcp`]: an MCP server of the official Python SDK on loopback ([`mcp::McpPeer`]).
//! - [`otlp`]: an OTLP/HTTP trace receiver that decodes the spans it gets ([`otlp::Receiver`]).
//! - [`cluster`]: server-side apply of volt objects ([`apply_as`], [`apply`]), a namespace with
//!   its APIs ([`Env`]), and identities for the operator: the chart's RBAC for the operator user
//!   ([`grant_operator`]), or the chart's ServiceAccount and a token ([`chart_identity`],
//!   [`service_account_token`]); users with a Role of their own ([`account_with_rules`]).
//! - [`objects`]: volt objects as JSON ([`run_obj`], [`endpoint_agent`], [`container`],
//!   [`container_failing`]) and a run's step rows ([`step`]).
//! - [`tied`]: [`tied::spawn_tied`], processes that die with the test process.
//! - [`wait`]: [`wait_until`] (any condition), [`wait_for`] (an object), [`run_finished`].
//! - [`net`]: [`free_port`], [`free_ports`], [`http_get`] (and [`http_get_as`], with a bearer
//!   token), and [`serve`]/[`serve_on`] for a
//!   router of a test.
//! - [`logs`]: [`LogDir`] (kept with `VOLT_TEST_KEEP=1`), [`logs::tail`],
//!   [`logs::assert_no_panic`], [`logs::strip_ansi`].
//! - [`metrics`]: [`metric_sum`], [`metric_sum_where`] and [`metric_by_label`] over a Prometheus
//!   exposition.
//! - [`tools`]: [`repo`] paths, the built [`operator_bin`], and programs: [`kubectl`] (blocking,
//!   against the shared control plane), [`helm`], [`helm_install`], [`helm_uninstall`], any
//!   other ([`tools::run`], [`tools::try_run`]).
#![allow(dead_code, unused_imports)]

pub mod browser;
pub mod cluster;
pub mod control_plane;
pub mod in_process;
pub mod kubelet;
pub mod logs;
pub mod mcp;
pub mod metrics;
pub mod net;
pub mod objects;
pub mod openai;
pub mod otlp;
pub mod process;
pub mod tied;
pub mod tools;
pub mod wait;

pub use cluster::{
    ChartIdentity, Env, account_with_rules, apply, apply_as, chart_identity, grant_operator, service_account_token,
};
pub use control_plane::{ControlPlane, OPERATOR_USER, kube_client, kube_config, shared};
pub use in_process::Operator;
pub use kubelet::Kubelet;
pub use logs::LogDir;
pub use metrics::{metric_by_label, metric_sum, metric_sum_where};
pub use net::{free_port, free_ports, http_get, http_get_as, serve, serve_on};
pub use objects::{container, container_failing, endpoint_agent, run_obj, step};
pub use openai::Stub;
pub use process::{OperatorBuilder, OperatorProcess};
pub use tools::{
    Ran, helm, helm_install, helm_install_for_operator_user, helm_uninstall, kubectl, kubectl_stdin, operator_bin, repo,
};
pub use wait::{run_finished, wait_for, wait_until};
