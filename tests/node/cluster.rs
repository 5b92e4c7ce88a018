//! The real node of this test process, and what the node tests share.
//!
//! [`shared`] starts it once per test process, after the shared control plane
//! (`kit::shared`): it refreshes the images (`hack/node.sh images`, which
//! re-imports the operator image only when the binary changed), runs `hack/node.sh kubelet` and
//! `hack/node.sh scheduler` as children that die with the test process (`PR_SET_PDEATHSIG`), and
//! waits until the node is Ready and untainted. At exit it deletes every workload and pod while
//! the kubelet still runs (`hack/node.sh drain`), so no container outlives the tests, then stops
//! the kubelet and the scheduler. Their logs are in the control plane's directory, under
//! `node/` (`VOLT_TEST_KEEP=1` keeps it).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node as KubeNode;
use kube::{Api, Client};
use volt_operator::api::{WorkflowRun, WorkflowRunStatus};

use crate::kit;
use crate::kit::tied::spawn_tied;

/// The node's name (hack/node.sh).
pub const NODE_NAME: &str = "volt-node";
/// How long the node may take to become Ready (about 15 s on a 2-core machine).
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// Lines of the kubelet's log shown when the node does not come up.
const LOG_TAIL_LINES: usize = 40;

/// Images the node has (names from `hack/node.sh env`).
#[derive(Debug, Clone)]
pub struct Images {
    /// busybox, which runs as root unless told otherwise.
    pub busybox: String,
    /// The same busybox with user 1001, who owns /home/app.
    pub nonroot: String,
    /// The stub OpenAI-compatible server (examples/openai_stub.rs).
    pub stub: String,
    /// The operator, with the chart's default name and tag.
    pub operator: String,
}

/// The running node.
pub struct Node {
    pub images: Images,
    kubeconfig: PathBuf,
    dir: PathBuf,
    children: Mutex<Vec<Child>>,
}

static NODE: OnceLock<Result<Node, String>> = OnceLock::new();

/// The node of this test process, started on first use; panics in every test if it cannot start.
pub fn shared() -> &'static Node {
    let started = NODE.get_or_init(|| {
        let outcome = thread::Builder::new()
            .name("node-start".into())
            .spawn(start)
            .map_err(|e| format!("cannot spawn the node start thread: {e}"))
            .and_then(|h| h.join().unwrap_or_else(|_| Err("the node startup panicked".into())));
        if outcome.is_ok() {
            // SAFETY: registers a plain `extern "C" fn` with no arguments. Registered after the
            // control plane's, so it runs before it (atexit runs in reverse order).
            unsafe {
                libc::atexit(stop_shared);
            }
        }
        outcome
    });
    match started {
        Ok(node) => node,
        Err(message) => panic!("{message}"),
    }
}

extern "C" fn stop_shared() {
    if let Some(Ok(node)) = NODE.get() {
        node.stop();
    }
}

fn node_sh() -> Command {
    let mut c = Command::new("bash");
    c.arg(kit::repo("hack/node.sh"));
    c
}

fn output(command: &mut Command, what: &str) -> Result<String, String> {
    let out = command.stdin(Stdio::null()).output().map_err(|e| format!("{what}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!("{what} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr)))
    }
}

fn start() -> Result<Node, String> {
    let started = Instant::now();
    if std::env::var_os("VOLT_TEST_APISERVER_BIND").is_none() {
        return Err("the node suite needs pods to reach the apiserver: run it with `make node-test`, or set \
                    VOLT_TEST_APISERVER_BIND=0.0.0.0 (after `hack/node.sh install`)"
            .into());
    }
    let cp = kit::shared();
    if cp.is_external() {
        return Err("the node suite runs its own control plane and node; unset VOLT_TEST_KUBECONFIG".into());
    }
    let settings: BTreeMap<String, String> = output(node_sh().arg("env"), "hack/node.sh env")?
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
        .collect();
    let setting = |k: &str| settings.get(k).cloned().ok_or(format!("hack/node.sh env does not say {k}"));
    let images = Images {
        busybox: setting("VOLT_NODE_BUSYBOX_IMAGE")?,
        nonroot: setting("VOLT_NODE_NONROOT_IMAGE")?,
        stub: setting("VOLT_NODE_STUB_IMAGE")?,
        operator: setting("VOLT_NODE_OPERATOR_IMAGE")?,
    };

    // The images, the operator's from the binary under test (imported again only if it changed).
    let operator = kit::operator_bin().to_path_buf();
    let stub = operator.parent().map(|d| d.join("examples/openai_stub")).unwrap_or_default();
    if !stub.is_file() {
        return Err(format!(
            "{} is missing: `cargo build --example openai_stub` (make node-test builds it)",
            stub.display()
        ));
    }
    let mut images_cmd = node_sh();
    images_cmd.args(["images", "--operator"]).arg(&operator).arg("--stub").arg(&stub);
    output(&mut images_cmd, "hack/node.sh images (run `make node-deps` first)")?;

    let dir = cp.dir().join("node");
    std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let kubeconfig = cp.kubeconfig_path().to_path_buf();
    let node = Node { images, kubeconfig: kubeconfig.clone(), dir: dir.clone(), children: Mutex::new(Vec::new()) };
    for (name, args) in [
        ("kubelet", vec!["kubelet".to_string(), kubeconfig.display().to_string(), dir.display().to_string()]),
        ("kube-scheduler", vec!["scheduler".to_string(), kubeconfig.display().to_string()]),
    ] {
        let log = std::fs::File::create(dir.join(format!("{name}.log"))).map_err(|e| format!("{name} log: {e}"))?;
        let err = log.try_clone().map_err(|e| e.to_string())?;
        let mut command = node_sh();
        command.args(&args).stdin(Stdio::null()).stdout(log).stderr(err);
        let child = spawn_tied(command).map_err(|e| format!("start hack/node.sh {name}: {e}"))?;
        node.children.lock().map_err(|_| "poisoned")?.push(child);
    }

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot build a runtime: {e}"))?;
    let ready = runtime.block_on(async {
        let client = cp.client().await;
        let nodes: Api<KubeNode> = Api::all(client);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(exited) = node.exited() {
                return Err(format!("{exited} exited"));
            }
            if let Ok(Some(n)) = nodes.get_opt(NODE_NAME).await {
                let ready = n
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
                let tainted = n.spec.as_ref().and_then(|s| s.taints.as_ref()).is_some_and(|t| !t.is_empty());
                if ready && !tainted {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(format!("node {NODE_NAME} not Ready and untainted after {READY_TIMEOUT:?}"));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    if let Err(e) = ready {
        let tail = kit::logs::tail(&dir.join("kubelet.log"), LOG_TAIL_LINES);
        node.stop();
        return Err(format!("the node did not start: {e}\n----- kubelet.log -----\n{tail}"));
    }
    eprintln!("[node] {NODE_NAME} Ready in {:.1}s (logs in {})", started.elapsed().as_secs_f64(), dir.display());
    Ok(node)
}

impl Node {
    /// Which child has exited, if one has.
    fn exited(&self) -> Option<String> {
        let mut children = self.children.lock().ok()?;
        children.iter_mut().enumerate().find_map(|(i, c)| {
            matches!(c.try_wait(), Ok(Some(_))).then(|| if i == 0 { "the kubelet" } else { "kube-scheduler" }.into())
        })
    }

    /// Deletes every workload and pod while the kubelet runs, then stops the kubelet and the
    /// scheduler. Idempotent.
    pub fn stop(&self) {
        let Ok(mut children) = self.children.lock() else { return };
        if children.is_empty() {
            return;
        }
        let started = Instant::now();
        let drained = node_sh().arg("drain").arg(&self.kubeconfig).stdin(Stdio::null()).status();
        if !drained.as_ref().is_ok_and(|s| s.success()) {
            eprintln!("[node] hack/node.sh drain: {drained:?}");
        }
        eprintln!("[node] pods deleted in {:.1}s; stopping the kubelet", started.elapsed().as_secs_f64());
        for child in children.iter_mut().rev() {
            let _ = child.kill();
            let _ = child.wait();
        }
        children.clear();
    }

    /// The kubelet's log.
    pub fn kubelet_log(&self) -> String {
        kit::logs::tail(&self.dir.join("kubelet.log"), LOG_TAIL_LINES)
    }
}

// ---------------------------------------------------------------------------------------------
// Objects and the operator

/// `kubectl apply -n NS -f -` of `yaml`; panics with kubectl's error.
pub fn apply(ns: &str, yaml: &str) {
    let ran = kit::kubectl_stdin(&["apply", "-n", ns, "-f", "-"], Some(yaml));
    assert!(ran.ok, "kubectl apply failed: {}\n{}\n{yaml}", ran.stderr, ran.stdout);
}

/// Waits until run `name` has finished; its status. On a timeout, the pods and the kubelet's
/// log tail say what the node did.
pub async fn finished(client: &Client, ns: &str, name: &str, timeout: Duration) -> WorkflowRunStatus {
    let runs: Api<WorkflowRun> = Api::namespaced(client.clone(), ns);
    let deadline = Instant::now() + timeout;
    loop {
        let status = runs.get_opt(name).await.ok().flatten().and_then(|r| r.status);
        if let Some(status) = status.as_ref().filter(|s| s.phase.is_finished()) {
            return status.clone();
        }
        if Instant::now() > deadline {
            let pods = kit::kubectl(&["get", "pods", "-n", ns, "-o", "wide"]).stdout;
            panic!(
                "run {ns}/{name} not finished after {timeout:?}: {status:#?}\npods:\n{pods}\n----- kubelet.log -----\n{}",
                shared().kubelet_log()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `volt-operator run` on the host for namespace `ns`, as admin (the helm test runs it as pods
/// with the chart's RBAC); its log goes to `logs`.
pub async fn operator(ns: &str, logs: &kit::LogDir) -> kit::OperatorProcess {
    let cp = kit::shared();
    kit::OperatorProcess::builder(cp.kubeconfig_path(), logs.join("operator.log"))
        .namespaces(&[ns])
        .args(["--log-format", "text", "--log-level", "info,volt_operator=debug", "--health-check-interval", "1"])
        .start(Duration::from_secs(60))
        .await
}

// ---------------------------------------------------------------------------------------------
// Small tools

/// Status and body of `METHOD path` on `addr` (a pod's address), or `None` if nothing answers.
pub async fn http(addr: SocketAddr, method: &str, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fetch = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        let request =
            format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await.ok()?;
        let code = response.split_whitespace().nth(1)?.parse().ok()?;
        let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        Some((code, body))
    };
    tokio::time::timeout(Duration::from_secs(5), fetch).await.ok().flatten()
}

/// Processes on this machine (containers' included) whose arguments are exactly `argv`.
pub fn processes_with_argv(argv: &[&str]) -> Vec<u32> {
    let want: Vec<u8> = argv.iter().flat_map(|a| a.bytes().chain(std::iter::once(0))).collect();
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .filter(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == want))
        .collect()
}

/// The `p`-th percentile (0..=100) of `values`, nearest rank.
pub fn percentile(values: &[f64], p: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
    v[rank.min(v.len()) - 1]
}

/// A random suffix for names and markers.
pub fn random() -> u32 {
    rand::random::<u32>() % 100_000
}
