//! The real node of this test process, and what the node tests share.
//!
//! [`shared`] starts it once per test process, after the shared control plane
//! (`support::control_plane::shared`): it refreshes the images (`hack/node.sh images`, which
//! re-imports the operator image only when the binary changed), runs `hack/node.sh kubelet` and
//! `hack/node.sh scheduler` as children that die with the test process (`PR_SET_PDEATHSIG`), and
//! waits until the node is Ready and untainted. At exit it deletes every workload and pod while
//! the kubelet still runs (`hack/node.sh drain`), so no container outlives the tests, then stops
//! the kubelet and the scheduler. Their logs are in the control plane's directory, under
//! `node/` (`VOLT_TEST_KEEP=1` keeps it).

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node as KubeNode;
use kube::{Api, Client};
use volt_operator::api::WorkflowRun;

use crate::support::control_plane;

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

/// The repository's root.
pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn node_sh() -> Command {
    let mut c = Command::new("bash");
    c.arg(repo().join("hack/node.sh"));
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
    let cp = control_plane::shared();
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
    let operator = PathBuf::from(env!("CARGO_BIN_EXE_volt-operator"));
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
        let tail = tail(&dir.join("kubelet.log"), LOG_TAIL_LINES);
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
        let mut drain = node_sh();
        drain.arg("drain").arg(&self.kubeconfig);
        if let Err(e) = output(&mut drain, "hack/node.sh drain") {
            eprintln!("[node] {e}");
        }
        for child in children.iter_mut().rev() {
            let _ = child.kill();
            let _ = child.wait();
        }
        children.clear();
    }

    /// The kubelet's log.
    pub fn kubelet_log(&self) -> String {
        tail(&self.dir.join("kubelet.log"), LOG_TAIL_LINES)
    }
}

// ---------------------------------------------------------------------------------------------
// Processes tied to the test process

type SpawnRequest = (Command, mpsc::Sender<io::Result<Child>>);

/// A thread that spawns the node's processes and lives as long as the test process:
/// `PR_SET_PDEATHSIG` fires when the forking *thread* exits.
fn spawner() -> &'static Mutex<mpsc::Sender<SpawnRequest>> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (requests, incoming) = mpsc::channel::<SpawnRequest>();
        thread::Builder::new()
            .name("node-process-parent".into())
            .spawn(move || {
                for (mut command, reply) in incoming {
                    let _ = reply.send(command.spawn());
                }
                loop {
                    thread::park();
                }
            })
            .expect("spawn the node process-parent thread");
        Mutex::new(requests)
    })
}

fn spawn_tied(mut command: Command) -> io::Result<Child> {
    // SAFETY: the hook only calls prctl, which is async-signal-safe, between fork and exec.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let (reply, response) = mpsc::channel();
    spawner()
        .lock()
        .map_err(|_| io::Error::other("poisoned"))?
        .send((command, reply))
        .map_err(|_| io::Error::other("the process-parent thread is gone"))?;
    response.recv().map_err(|_| io::Error::other("the process-parent thread did not answer"))?
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

// ---------------------------------------------------------------------------------------------
// kubectl, helm, runs

/// `kubectl --kubeconfig <admin> ARGS`, with `stdin`: (success, stdout, stderr).
pub fn kubectl_stdin(args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    let cp = control_plane::shared();
    let mut cmd = Command::new("kubectl");
    cmd.arg("--kubeconfig").arg(cp.kubeconfig_path()).args(args);
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("kubectl runs");
    if let Some(input) = stdin {
        child.stdin.take().expect("stdin").write_all(input.as_bytes()).expect("write stdin");
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().expect("kubectl finishes");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `kubectl ARGS`: (success, stdout, stderr).
pub fn kubectl(args: &[&str]) -> (bool, String, String) {
    kubectl_stdin(args, None)
}

/// `kubectl apply -n NS -f -` of `yaml`; panics with kubectl's error.
pub fn apply(ns: &str, yaml: &str) {
    let (ok, out, err) = kubectl_stdin(&["apply", "-n", ns, "-f", "-"], Some(yaml));
    assert!(ok, "kubectl apply failed: {err}\n{out}\n{yaml}");
}

/// Polls run `name` until it has finished (Succeeded, Failed or Cancelled).
pub async fn finished(client: &Client, ns: &str, name: &str, timeout: Duration) -> WorkflowRun {
    let runs: Api<WorkflowRun> = Api::namespaced(client.clone(), ns);
    let deadline = Instant::now() + timeout;
    loop {
        let run = runs.get_opt(name).await.ok().flatten();
        if let Some(run) = &run
            && run.status.as_ref().is_some_and(|s| s.phase.is_finished())
        {
            return run.clone();
        }
        if Instant::now() > deadline {
            let (_, pods, _) = kubectl(&["get", "pods", "-n", ns, "-o", "wide"]);
            panic!(
                "run {ns}/{name} not finished after {timeout:?}: {:#?}\npods:\n{pods}\n----- kubelet.log -----\n{}",
                run.and_then(|r| r.status),
                shared().kubelet_log()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The status row of step `key`, with its phase, output and message.
pub fn step(run: &WorkflowRun, key: &str) -> volt_operator::api::StepStatus {
    run.status
        .as_ref()
        .and_then(|s| s.steps.get(key).cloned())
        .unwrap_or_else(|| panic!("no step {key} in {:#?}", run.status))
}

/// Runs `helm ARGS` against the control plane; (success, stdout + stderr).
pub fn helm(args: &[&str]) -> (bool, String) {
    let cp = control_plane::shared();
    let helm = std::env::var_os("HELM").map(PathBuf::from).unwrap_or_else(|| {
        let out = Command::new("bash").arg(repo().join("hack/control-plane.sh")).arg("bin-dir").output();
        let dir = out.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default();
        PathBuf::from(dir).join("helm")
    });
    let out = Command::new(helm)
        .args(args)
        .arg("--kubeconfig")
        .arg(cp.kubeconfig_path())
        .current_dir(repo())
        .stdin(Stdio::null())
        .output()
        .expect("helm runs");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

// ---------------------------------------------------------------------------------------------
// The operator as a process on the host (the helm test runs it as pods)

/// `volt-operator run` for one namespace, with the admin kubeconfig; killed when dropped.
pub struct OperatorProcess {
    _child: tokio::process::Child,
    log: PathBuf,
}

impl OperatorProcess {
    pub async fn start(ns: &str) -> OperatorProcess {
        let cp = control_plane::shared();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let log = cp.dir().join(format!("operator-{ns}.log"));
        let file = std::fs::File::create(&log).expect("operator log");
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_volt-operator"))
            .args(["run", "--http-addr", &format!("127.0.0.1:{port}"), "--namespaces", ns])
            .args(["--log-format", "text", "--log-level", "info", "--health-check-interval", "1"])
            .env("KUBECONFIG", cp.kubeconfig_path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .expect("start volt-operator");
        let op = OperatorProcess { _child: child, log };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !matches!(crate::support::http_get(port, "/readyz", Duration::from_secs(2)).await, Some((200, _))) {
            assert!(Instant::now() < deadline, "the operator is not Ready after 60 s:\n{}", op.log_tail());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        op
    }

    pub fn log_tail(&self) -> String {
        tail(&self.log, 30)
    }
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
