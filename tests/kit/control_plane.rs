//! A real control plane on loopback: etcd, kube-apiserver and kube-controller-manager.
//!
//! [`shared`] starts one control plane per test process, the first time a test asks for it, and
//! every test of the process shares it. Tests run as threads, each with its own tokio runtime,
//! so what is shared is processes, files and the kubeconfig, never a [`kube::Client`]: each test
//! builds its own with [`ControlPlane::client`].
//!
//! - The binaries come from `hack/control-plane.sh install` (`${VOLT_CACHE_DIR:-~/.cache/volt-operator}/bin`).
//! - Everything listens on 127.0.0.1 only, on free ports; data, certificates and logs live in a
//!   temporary directory (under `/dev/shm` when there is one), removed when the test process exits
//!   (`VOLT_TEST_KEEP=1` keeps it).
//! - The processes cannot outlive the test process: they are spawned from a thread that lives as
//!   long as the process, with `PR_SET_PDEATHSIG=SIGKILL`, and they are killed at exit.
//! - The apiserver runs with RBAC, a static token file (admin in `system:masters`, and the
//!   non-admin user [`OPERATOR_USER`]), service-account tokens and the default admission plugins
//!   (ServiceAccount included, which is why [`ControlPlane::namespace`] waits for the `default`
//!   ServiceAccount and its token).
//! - The volt CRDs are server-side applied and Established before [`shared`] returns.
//! - [`ControlPlane::stop_apiserver`] and [`ControlPlane::start_apiserver`] stop the apiserver
//!   and start it again on the same port, certificates and etcd data, for outage tests; those
//!   start a control plane of their own ([`ControlPlane::start`]) rather than stop the shared one.
//!
//! With `VOLT_TEST_KUBECONFIG=/path/to/kubeconfig` the tests use that cluster instead (its
//! current context must be an admin); the operator identity is then impersonated.

use std::{
    collections::BTreeMap,
    env, fs, io,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Mutex, OnceLock,
        atomic::{AtomicUsize, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::core::v1::{Namespace, Secret, ServiceAccount},
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api, Client, Config,
    api::{ObjectMeta, Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
};

use super::logs::{keep_requested, tail};
use super::net::free_ports;
use super::tied::spawn_tied;

/// The non-admin user the operator runs as in the tests (group `system:authenticated`, no roles
/// until a test binds some).
pub const OPERATOR_USER: &str = "volt-operator";
/// The admin user (group `system:masters`).
pub const ADMIN_USER: &str = "admin";
/// Field manager of the CRD apply.
const FIELD_MANAGER: &str = "volt-operator";

/// How long startup may take before it is called a failure.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(120);
/// How long [`ControlPlane::namespace`] waits for the `default` ServiceAccount and its token.
const NAMESPACE_TIMEOUT: Duration = Duration::from_secs(60);
/// Lines of each component's log shown when startup fails.
const LOG_TAIL_LINES: usize = 40;

static SHARED: OnceLock<Result<ControlPlane, String>> = OnceLock::new();

/// The control plane of this test process, started on first use.
///
/// Blocks while it starts (a few seconds); safe to call from inside a tokio runtime. Panics, in
/// every test that asks, if it could not start.
pub fn shared() -> &'static ControlPlane {
    let started = SHARED.get_or_init(|| {
        // Startup runs its own tokio runtime, which cannot nest in the caller's: use a thread.
        let outcome = thread::Builder::new()
            .name("e2e-control-plane-start".into())
            .spawn(ControlPlane::start_or_connect)
            .map_err(|e| format!("cannot spawn the control plane start thread: {e}"))
            .and_then(|handle| {
                handle
                    .join()
                    .unwrap_or_else(|panic| Err(format!("control plane startup panicked: {}", panic_message(&panic))))
            });
        if outcome.is_ok() {
            // Statics are never dropped: kill the processes and remove the directory at exit.
            // SAFETY: registers a plain `extern "C" fn` with no arguments.
            unsafe {
                libc::atexit(shutdown_shared);
            }
        }
        outcome
    });
    match started {
        Ok(control_plane) => control_plane,
        Err(message) => panic!("{message}"),
    }
}

extern "C" fn shutdown_shared() {
    if let Some(Ok(control_plane)) = SHARED.get() {
        control_plane.shutdown();
    }
}

/// A running control plane (or an external cluster, with `VOLT_TEST_KUBECONFIG`).
pub struct ControlPlane {
    server: String,
    kubeconfig: PathBuf,
    operator_kubeconfig: PathBuf,
    admin_token: Option<String>,
    operator_token: Option<String>,
    /// Whether pods need a ServiceAccount token Secret (clusters before 1.24).
    token_secrets: bool,
    /// Set for a `VOLT_TEST_KUBECONFIG` cluster.
    external: bool,
    local: Local,
}

/// What this process made: its directory and processes (none for an external cluster).
struct Local {
    dir: Mutex<Option<tempfile::TempDir>>,
    dir_path: PathBuf,
    processes: Mutex<Vec<Component>>,
}

struct Component {
    name: &'static str,
    child: Child,
    log: PathBuf,
    /// How it was started, to start it again ([`ControlPlane::start_apiserver`]).
    binary: PathBuf,
    args: Vec<String>,
}

impl ControlPlane {
    /// Starts a control plane owned by the caller (killed on drop). Tests want [`shared`].
    pub fn start() -> Result<ControlPlane, String> {
        let bins = Binaries::find()?;
        let mut last_error = String::new();
        for attempt in 1..=3 {
            match start_local(&bins) {
                Ok(control_plane) => return Ok(control_plane),
                Err(Failure { message, port_clash }) => {
                    last_error = message;
                    if !port_clash {
                        break;
                    }
                    eprintln!("[e2e] control plane attempt {attempt}: a port was taken, retrying");
                }
            }
        }
        Err(last_error)
    }

    fn start_or_connect() -> Result<ControlPlane, String> {
        match env::var_os("VOLT_TEST_KUBECONFIG").filter(|v| !v.is_empty()) {
            Some(path) => connect_external(PathBuf::from(path)),
            None => ControlPlane::start(),
        }
    }

    /// The apiserver URL, `https://127.0.0.1:<port>` for a local control plane.
    pub fn server_url(&self) -> &str {
        &self.server
    }

    /// Admin kubeconfig, for `kubectl --kubeconfig` and for the operator under test.
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// Kubeconfig of the non-admin [`OPERATOR_USER`] (its token, or impersonation on an
    /// external cluster).
    pub fn operator_kubeconfig_path(&self) -> &Path {
        &self.operator_kubeconfig
    }

    /// The admin bearer token (`None` on an external cluster).
    pub fn admin_token(&self) -> Option<&str> {
        self.admin_token.as_deref()
    }

    /// The bearer token of [`OPERATOR_USER`] (`None` on an external cluster, where it is
    /// impersonated).
    pub fn operator_token(&self) -> Option<&str> {
        self.operator_token.as_deref()
    }

    /// Whether this is a cluster from `VOLT_TEST_KUBECONFIG` rather than one this process runs.
    pub fn is_external(&self) -> bool {
        self.external
    }

    /// Directory holding the kubeconfigs and, for a local control plane, its data,
    /// certificates and logs (`etcd.log`, `kube-apiserver.log`, `kube-controller-manager.log`).
    pub fn dir(&self) -> &Path {
        &self.local.dir_path
    }

    /// An admin client for the current tokio runtime.
    pub async fn client(&self) -> Client {
        kube_client(&self.kubeconfig).await
    }

    /// A client acting as the non-admin [`OPERATOR_USER`], for the current tokio runtime.
    pub async fn client_as_operator(&self) -> Client {
        kube_client(&self.operator_kubeconfig).await
    }

    /// A client for this cluster authenticating with `token` (say, a ServiceAccount's).
    pub async fn client_with_token(&self, token: &str) -> Client {
        let config = self.config_with_token(token).await;
        Client::try_from(config).expect("build a kube client from the e2e kubeconfig")
    }

    /// A client configuration for this cluster authenticating with `token`.
    pub async fn config_with_token(&self, token: &str) -> Config {
        let mut config = kube_config(&self.kubeconfig).await;
        config.auth_info = kube::config::AuthInfo { token: Some(token.to_string().into()), ..Default::default() };
        config
    }

    /// Writes `<dir>/<name>.kubeconfig`, the admin kubeconfig with `token` as every user's
    /// credentials (for an operator process with that identity); its path.
    pub fn write_kubeconfig_with_token(&self, name: &str, token: &str) -> PathBuf {
        let kubeconfig = Kubeconfig::read_from(&self.kubeconfig)
            .unwrap_or_else(|e| panic!("read kubeconfig {}: {e}", self.kubeconfig.display()));
        // As JSON (a kubeconfig may be JSON), with the token written out in clear.
        let mut doc = serde_json::to_value(&kubeconfig).expect("kubeconfig to json");
        if let Some(users) = doc.get_mut("users").and_then(serde_json::Value::as_array_mut) {
            for user in users {
                user["user"] = serde_json::json!({ "token": token });
            }
        }
        let path = self.dir().join(format!("{name}.kubeconfig"));
        fs::write(&path, doc.to_string()).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        path
    }

    /// Creates a fresh namespace named `<prefix>-<n>-<random>` and returns its name once its
    /// `default` ServiceAccount (and, before Kubernetes 1.24, its token Secret) exists, so pods
    /// can be created in it right away.
    pub async fn namespace(&self, client: &Client, prefix: &str) -> String {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = namespace_name(prefix, n, rand::random::<u16>());
        let namespaces: Api<Namespace> = Api::all(client.clone());
        let namespace = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some(BTreeMap::from([("volt.dev/e2e".to_string(), "true".to_string())])),
                ..Default::default()
            },
            ..Default::default()
        };
        namespaces
            .create(&PostParams::default(), &namespace)
            .await
            .unwrap_or_else(|e| panic!("create namespace {name}: {e}"));
        let deadline = Instant::now() + NAMESPACE_TIMEOUT;
        loop {
            if default_service_account_ready(client, &name, self.token_secrets).await {
                return name;
            }
            if Instant::now() > deadline {
                panic!(
                    "namespace {name}: no default ServiceAccount{} after {NAMESPACE_TIMEOUT:?}; \
                     is kube-controller-manager running?{}",
                    if self.token_secrets { " token" } else { "" },
                    self.log_hint()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log_hint(&self) -> String {
        if self.external {
            String::new()
        } else {
            let dir = self.dir().display();
            format!(" (logs in {dir}; VOLT_TEST_KEEP=1 keeps them)")
        }
    }

    /// Kills the processes and removes the directory (unless `VOLT_TEST_KEEP` is set).
    /// Idempotent; runs on drop and, for [`shared`], at process exit.
    pub fn shutdown(&self) {
        let local = &self.local;
        if let Ok(mut processes) = local.processes.lock() {
            // Controller manager, then apiserver, then etcd.
            for component in processes.iter_mut().rev() {
                let _ = component.child.kill();
                let _ = component.child.wait();
            }
            processes.clear();
        }
        if let Ok(mut dir) = local.dir.lock()
            && let Some(dir) = dir.take()
        {
            if keep_requested() {
                let path = dir.keep();
                eprintln!("[e2e] kept control plane directory {}", path.display());
            } else {
                drop(dir);
            }
        }
    }

    /// Stops kube-apiserver (SIGKILL, as a crash or a node loss would), leaving etcd, the
    /// controller manager, the data, the certificates and the port as they are. Clients see
    /// refused connections until [`ControlPlane::start_apiserver`]. Not on an external cluster.
    pub fn stop_apiserver(&self) -> Result<(), String> {
        if self.external {
            return Err("cannot stop the apiserver of an external cluster".into());
        }
        let mut processes = self.local.processes.lock().map_err(|_| "process list poisoned")?;
        let apiserver = processes
            .iter_mut()
            .find(|c| c.name == "kube-apiserver")
            .ok_or("this control plane has no kube-apiserver process")?;
        apiserver.child.kill().map_err(|e| format!("kill kube-apiserver: {e}"))?;
        apiserver.child.wait().map_err(|e| format!("wait for kube-apiserver: {e}"))?;
        Ok(())
    }

    /// Starts kube-apiserver again after [`ControlPlane::stop_apiserver`], with the same flags
    /// (same port, certificates, tokens and etcd, so clients and kubeconfigs keep working; its
    /// log goes on in `kube-apiserver.log`), and waits until its `/readyz` answers `ok`. Returns
    /// how long that took. A running apiserver is left alone.
    pub async fn start_apiserver(&self) -> Result<Duration, String> {
        if self.external {
            return Err("cannot start the apiserver of an external cluster".into());
        }
        let started = Instant::now();
        {
            let mut processes = self.local.processes.lock().map_err(|_| "process list poisoned")?;
            let apiserver = processes
                .iter_mut()
                .find(|c| c.name == "kube-apiserver")
                .ok_or("this control plane has no kube-apiserver process")?;
            if matches!(apiserver.child.try_wait(), Ok(None)) {
                return Ok(Duration::ZERO);
            }
            let log = fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(&apiserver.log)
                .map_err(|e| format!("open {}: {e}", apiserver.log.display()))?;
            apiserver.child = spawn_logging(&apiserver.binary, &apiserver.args, log, &self.local.dir_path)
                .map_err(|e| format!("start kube-apiserver again: {e}"))?;
        }
        let client = self.client().await;
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            self.check_alive().map_err(|e| format!("{e}{}", self.log_tails()))?;
            let request = http::Request::get("/readyz").body(Vec::new()).map_err(|e| e.to_string())?;
            let last = match client.request_text(request).await {
                Ok(body) if body.trim() == "ok" => return Ok(started.elapsed()),
                Ok(body) => body,
                Err(e) => e.to_string(),
            };
            if Instant::now() > deadline {
                return Err(format!("kube-apiserver not ready again after {STARTUP_TIMEOUT:?}; last /readyz: {last}"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Fails if a component has exited, with its log.
    fn check_alive(&self) -> Result<(), String> {
        let mut processes = self.local.processes.lock().map_err(|_| "process list poisoned")?;
        for component in processes.iter_mut() {
            if let Ok(Some(status)) = component.child.try_wait() {
                return Err(format!("{} exited ({status})", component.name));
            }
        }
        Ok(())
    }

    /// The tail of each component's log.
    fn log_tails(&self) -> String {
        let Ok(processes) = self.local.processes.lock() else {
            return String::new();
        };
        processes
            .iter()
            .map(|c| {
                format!(
                    "\n----- {} ({}), last {LOG_TAIL_LINES} lines -----\n{}",
                    c.name,
                    c.log.display(),
                    tail(&c.log, LOG_TAIL_LINES)
                )
            })
            .collect()
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// `<prefix>-<n>-<hex>`, a valid DNS-1123 label of at most 63 characters.
pub fn namespace_name(prefix: &str, n: usize, random: u16) -> String {
    let mut clean: String =
        prefix.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' }).collect();
    clean.truncate(63 - 16);
    let clean = clean.trim_matches('-');
    let clean = if clean.is_empty() { "e2e" } else { clean };
    format!("{clean}-{n}-{random:04x}")
}

async fn default_service_account_ready(client: &Client, namespace: &str, token_secrets: bool) -> bool {
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    let Ok(Some(account)) = accounts.get_opt("default").await else {
        return false;
    };
    if !token_secrets {
        return true;
    }
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    for reference in account.secrets.unwrap_or_default() {
        if let Some(name) = reference.name
            && let Ok(Some(_)) = secrets.get_opt(&name).await
        {
            return true;
        }
    }
    false
}

/// A client configuration from a kubeconfig file (installing the process-wide rustls crypto
/// provider kube needs, if there is none yet).
pub async fn kube_config(path: &Path) -> Config {
    // kube's rustls setup takes the process-wide crypto provider: make sure there is one.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let kubeconfig = Kubeconfig::read_from(path).unwrap_or_else(|e| panic!("read kubeconfig {}: {e}", path.display()));
    Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap_or_else(|e| panic!("load kubeconfig {}: {e}", path.display()))
}

/// A client from a kubeconfig file, for the current tokio runtime.
pub async fn kube_client(path: &Path) -> Client {
    let config = kube_config(path).await;
    Client::try_from(config).unwrap_or_else(|e| panic!("build a kube client from {}: {e}", path.display()))
}

// ---------------------------------------------------------------------------------------------
// Starting a local control plane

struct Failure {
    message: String,
    /// A component could not bind its port (another process took it): worth another attempt.
    port_clash: bool,
}

impl From<String> for Failure {
    fn from(message: String) -> Self {
        Failure { message, port_clash: false }
    }
}

struct Binaries {
    etcd: PathBuf,
    apiserver: PathBuf,
    controller_manager: PathBuf,
}

impl Binaries {
    fn find() -> Result<Binaries, String> {
        let dir = bin_dir()?;
        let bins = Binaries {
            etcd: dir.join("etcd"),
            apiserver: dir.join("kube-apiserver"),
            controller_manager: dir.join("kube-controller-manager"),
        };
        let missing: Vec<String> = [&bins.etcd, &bins.apiserver, &bins.controller_manager]
            .into_iter()
            .filter(|p| !is_executable(p))
            .map(|p| p.display().to_string())
            .collect();
        if missing.is_empty() {
            Ok(bins)
        } else {
            Err(format!(
                "the e2e control plane binaries are missing: {}.\n\
                 Run `hack/control-plane.sh install` first (it installs etcd and builds \
                 kube-apiserver and kube-controller-manager into {}), or set \
                 VOLT_TEST_KUBECONFIG to use an existing cluster.",
                missing.join(", "),
                dir.display()
            ))
        }
    }
}

/// Where `hack/control-plane.sh install` puts etcd, kube-apiserver, kube-controller-manager,
/// helm and promtool: the same directory as `hack/control-plane.sh bin-dir`.
pub fn bin_dir() -> Result<PathBuf, String> {
    let var = |name: &str| env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    let cache = match var("VOLT_CACHE_DIR") {
        Some(dir) => dir,
        None => var("XDG_CACHE_HOME")
            .or_else(|| var("HOME").map(|home| home.join(".cache")))
            .ok_or("neither VOLT_CACHE_DIR, XDG_CACHE_HOME nor HOME is set")?
            .join("volt-operator"),
    };
    Ok(cache.join("bin"))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Whether this etcd takes `--unsafe-no-fsync` (Debian's 3.4.23 does without listing it in
/// `--help`): an unknown flag makes `etcd --version` fail.
fn etcd_supports_no_fsync(etcd: &Path) -> bool {
    Command::new(etcd)
        .args(["--unsafe-no-fsync", "--version"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

fn start_local(bins: &Binaries) -> Result<ControlPlane, Failure> {
    let started = Instant::now();
    remove_stale_dirs();
    let dir = make_dir()?;
    let dir_path = dir.path().to_path_buf();
    let path = |name: &str| dir_path.join(name);

    let pki = Pki::generate(&dir_path)?;
    let admin_token = random_token();
    let operator_token = random_token();
    write(
        &path("tokens.csv"),
        &format!(
            "{admin_token},{ADMIN_USER},{ADMIN_USER},\"system:masters\"\n\
             {operator_token},{OPERATOR_USER},{OPERATOR_USER},\"system:authenticated\"\n"
        ),
    )?;

    let [etcd_client, etcd_peer, apiserver_port] = free_ports()?;
    let server = format!("https://127.0.0.1:{apiserver_port}");
    let kubeconfig = path("admin.kubeconfig");
    let operator_kubeconfig = path("operator.kubeconfig");
    write(&kubeconfig, &kubeconfig_yaml(&server, &pki.ca_cert, ADMIN_USER, &admin_token))?;
    write(&operator_kubeconfig, &kubeconfig_yaml(&server, &pki.ca_cert, OPERATOR_USER, &operator_token))?;

    let control_plane = ControlPlane {
        server: server.clone(),
        kubeconfig: kubeconfig.clone(),
        operator_kubeconfig,
        admin_token: Some(admin_token),
        operator_token: Some(operator_token),
        token_secrets: true,
        external: false,
        local: Local { dir: Mutex::new(Some(dir)), dir_path: dir_path.clone(), processes: Mutex::new(Vec::new()) },
    };
    let fail = |control_plane: &ControlPlane, message: String| {
        let tails = control_plane.log_tails();
        let port_clash = tails.contains("address already in use");
        control_plane.shutdown();
        let dir = dir_path.display();
        let kept =
            if keep_requested() { format!("kept {dir}") } else { format!("removed {dir}; VOLT_TEST_KEEP=1 keeps it") };
        Failure { message: format!("the e2e control plane did not start: {message}\n({kept}){tails}"), port_clash }
    };

    let etcd_client_url = format!("http://127.0.0.1:{etcd_client}");
    let etcd_peer_url = format!("http://127.0.0.1:{etcd_peer}");
    let mut etcd_args: Vec<String> = vec![
        "--name=volt-e2e".into(),
        format!("--data-dir={}", path("etcd").display()),
        format!("--listen-client-urls={etcd_client_url}"),
        format!("--advertise-client-urls={etcd_client_url}"),
        format!("--listen-peer-urls={etcd_peer_url}"),
        format!("--initial-advertise-peer-urls={etcd_peer_url}"),
        format!("--initial-cluster=volt-e2e={etcd_peer_url}"),
        "--initial-cluster-state=new".into(),
        "--logger=zap".into(),
        "--log-outputs=stderr".into(),
    ];
    if etcd_supports_no_fsync(&bins.etcd) {
        etcd_args.push("--unsafe-no-fsync".into());
    }

    let apiserver_args: Vec<String> = vec![
        format!("--etcd-servers={etcd_client_url}"),
        // Pods of a real node (tests/node, hack/node.sh) reach the apiserver beyond loopback:
        // VOLT_TEST_APISERVER_BIND=0.0.0.0 lets them; the stand-in needs nothing but loopback.
        format!("--bind-address={}", env::var("VOLT_TEST_APISERVER_BIND").unwrap_or_else(|_| "127.0.0.1".into())),
        // `kubectl logs` and `exec` dial a real node by its InternalIP (its name does not resolve).
        "--kubelet-preferred-address-types=InternalIP,Hostname".into(),
        "--advertise-address=127.0.0.1".into(),
        format!("--secure-port={apiserver_port}"),
        format!("--cert-dir={}", path("apiserver-certs").display()),
        format!("--tls-cert-file={}", pki.server_cert.display()),
        format!("--tls-private-key-file={}", pki.server_key.display()),
        format!("--client-ca-file={}", pki.ca_cert.display()),
        format!("--token-auth-file={}", path("tokens.csv").display()),
        "--authorization-mode=RBAC".into(),
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
        format!("--service-account-key-file={}", pki.sa_public.display()),
        format!("--service-account-signing-key-file={}", pki.sa_key.display()),
        "--service-cluster-ip-range=10.0.0.0/24".into(),
        // The `kubernetes` Endpoints would point at 127.0.0.1, which the API rejects.
        "--endpoint-reconciler-type=none".into(),
        "--allow-privileged=true".into(),
        "--profiling=false".into(),
    ];

    let controller_manager_args: Vec<String> = vec![
        format!("--kubeconfig={}", kubeconfig.display()),
        "--controllers=*".into(),
        "--leader-elect=false".into(),
        format!("--service-account-private-key-file={}", pki.sa_key.display()),
        format!("--root-ca-file={}", pki.ca_cert.display()),
        "--use-service-account-credentials=false".into(),
        "--bind-address=127.0.0.1".into(),
        // No insecure and no secure serving: nothing to bind, so nothing to clash.
        "--port=0".into(),
        "--secure-port=0".into(),
        "--profiling=false".into(),
    ];

    let start = |name: &'static str, binary: &PathBuf, args: Vec<String>| -> Result<(), String> {
        let log = path(&format!("{name}.log"));
        let child = spawn_component(binary, &args, &log, &dir_path)
            .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
        if let Ok(mut processes) = control_plane.local.processes.lock() {
            processes.push(Component { name, child, log, binary: binary.clone(), args });
        }
        Ok(())
    };
    for (name, binary, args) in [("etcd", &bins.etcd, etcd_args), ("kube-apiserver", &bins.apiserver, apiserver_args)] {
        if let Err(message) = start(name, binary, args) {
            return Err(fail(&control_plane, message));
        }
    }
    // The controller manager starts once the apiserver is ready: it gives up (exit 255) when
    // the apiserver is not healthy within 20 s, which a loaded machine can take.
    let start_controller_manager =
        || start("kube-controller-manager", &bins.controller_manager, controller_manager_args.clone());

    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => return Err(fail(&control_plane, format!("cannot build a tokio runtime: {e}"))),
    };
    let phases = match runtime.block_on(bring_up(&control_plane, started, start_controller_manager)) {
        Ok(phases) => phases,
        Err(message) => return Err(fail(&control_plane, message)),
    };
    eprintln!(
        "[e2e] control plane ready in {:.1}s ({phases}): {server}, kubeconfig {}",
        started.elapsed().as_secs_f64(),
        kubeconfig.display()
    );
    Ok(control_plane)
}

/// Waits for the apiserver, installs the CRDs and waits for the controller manager; says when
/// each was done.
async fn bring_up(
    control_plane: &ControlPlane,
    started: Instant,
    start_controller_manager: impl FnOnce() -> Result<(), String>,
) -> Result<String, String> {
    let at = || format!("{:.1}s", started.elapsed().as_secs_f64());
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    let config = kube_config(control_plane.kubeconfig_path()).await;
    let client = Client::try_from(config).map_err(|e| format!("cannot build a kube client: {e}"))?;

    // 1. /readyz, authenticated as admin.
    loop {
        control_plane.check_alive()?;
        let request =
            http::Request::get("/readyz").body(Vec::new()).map_err(|e| format!("build /readyz request: {e}"))?;
        let last = match client.request_text(request).await {
            Ok(body) if body.trim() == "ok" => break,
            Ok(body) => body,
            Err(e) => e.to_string(),
        };
        if Instant::now() > deadline {
            return Err(format!("kube-apiserver not ready after {STARTUP_TIMEOUT:?}; last /readyz: {last}"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let apiserver_ready = at();
    start_controller_manager()?;

    // 2. The volt CRDs.
    install_crds(&client, deadline).await?;
    let crds_established = at();

    // 3. The controller manager: the serviceaccount and token controllers give the `default`
    //    namespace its ServiceAccount and token.
    loop {
        control_plane.check_alive()?;
        if default_service_account_ready(&client, "default", true).await {
            return Ok(format!(
                "apiserver ready at {apiserver_ready}, CRDs established at {crds_established}, \
                 controller manager working at {}",
                at()
            ));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "kube-controller-manager did not create the default ServiceAccount token in \
                 {STARTUP_TIMEOUT:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Server-side applies `volt_operator::api::crds()` and waits until each is Established.
async fn install_crds(client: &Client, deadline: Instant) -> Result<(), String> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crds = volt_operator::api::crds();
    let params = PatchParams::apply(FIELD_MANAGER).force();
    for crd in &crds {
        let name = crd.metadata.name.clone().ok_or("a CRD without a name")?;
        api.patch(&name, &params, &Patch::Apply(crd)).await.map_err(|e| format!("apply CRD {name}: {e}"))?;
    }
    for crd in &crds {
        let name = crd.metadata.name.clone().unwrap_or_default();
        loop {
            let current = api.get(&name).await.map_err(|e| format!("get CRD {name}: {e}"))?;
            let conditions = current.status.and_then(|s| s.conditions).unwrap_or_default();
            if conditions.iter().any(|c| c.type_ == "Established" && c.status == "True") {
                break;
            }
            if Instant::now() > deadline {
                let conditions: Vec<String> = conditions
                    .iter()
                    .map(|c| format!("{}={} {}", c.type_, c.status, c.message.clone().unwrap_or_default()))
                    .collect();
                return Err(format!("CRD {name} not Established: {}", conditions.join("; ")));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}

fn connect_external(kubeconfig: PathBuf) -> Result<ControlPlane, String> {
    let started = Instant::now();
    let dir = tempfile::Builder::new()
        .prefix(&dir_prefix())
        .tempdir()
        .map_err(|e| format!("cannot create a temporary directory: {e}"))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot build a tokio runtime: {e}"))?;
    let operator_kubeconfig = dir.path().join("operator.kubeconfig");
    let (server, token_secrets) = runtime.block_on(async {
        // The operator kubeconfig: the admin's, impersonating the operator user.
        let mut doc = Kubeconfig::read_from(&kubeconfig)
            .map_err(|e| format!("read VOLT_TEST_KUBECONFIG {}: {e}", kubeconfig.display()))?;
        for auth in doc.auth_infos.iter_mut().filter_map(|a| a.auth_info.as_mut()) {
            auth.impersonate = Some(OPERATOR_USER.to_string());
            auth.impersonate_groups = Some(vec!["system:authenticated".to_string()]);
        }
        let json = serde_json::to_string_pretty(&doc).map_err(|e| format!("serialize the operator kubeconfig: {e}"))?;
        write(&operator_kubeconfig, &json)?;

        let config = Config::from_custom_kubeconfig(
            Kubeconfig::read_from(&kubeconfig).map_err(|e| e.to_string())?,
            &KubeConfigOptions::default(),
        )
        .await
        .map_err(|e| format!("load VOLT_TEST_KUBECONFIG {}: {e}", kubeconfig.display()))?;
        let server = config.cluster_url.to_string();
        let client = Client::try_from(config).map_err(|e| e.to_string())?;
        let version = client
            .apiserver_version()
            .await
            .map_err(|e| format!("cannot reach the cluster of VOLT_TEST_KUBECONFIG: {e}"))?;
        let minor: u32 = version.minor.trim_end_matches(|c: char| !c.is_ascii_digit()).parse().unwrap_or(99);
        install_crds(&client, Instant::now() + STARTUP_TIMEOUT).await?;
        Ok::<_, String>((server, version.major == "1" && minor < 24))
    })?;
    eprintln!(
        "[e2e] using the cluster of VOLT_TEST_KUBECONFIG ({server}), ready in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    Ok(ControlPlane {
        server,
        kubeconfig,
        operator_kubeconfig,
        admin_token: None,
        operator_token: None,
        token_secrets,
        external: true,
        local: Local {
            dir_path: dir.path().to_path_buf(),
            dir: Mutex::new(Some(dir)),
            processes: Mutex::new(Vec::new()),
        },
    })
}

// ---------------------------------------------------------------------------------------------
// Processes

fn spawn_component(binary: &Path, args: &[String], log: &Path, cwd: &Path) -> io::Result<Child> {
    spawn_logging(binary, args, fs::File::create(log)?, cwd)
}

fn spawn_logging(binary: &Path, args: &[String], out: fs::File, cwd: &Path) -> io::Result<Child> {
    let err = out.try_clone()?;
    let mut command = Command::new(binary);
    command.args(args).current_dir(cwd).stdin(Stdio::null()).stdout(out).stderr(err);
    spawn_tied(command)
}

// ---------------------------------------------------------------------------------------------
// Files

/// Where the directory goes: `/dev/shm` (memory, fast etcd) when writable, else the temp dir.
fn base_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    let shm = PathBuf::from("/dev/shm");
    if shm.is_dir() {
        dirs.push(shm);
    }
    dirs.push(env::temp_dir());
    dirs
}

fn dir_prefix() -> String {
    format!("volt-e2e-{}-", std::process::id())
}

fn make_dir() -> Result<tempfile::TempDir, String> {
    let mut errors = Vec::new();
    for base in base_dirs() {
        match tempfile::Builder::new().prefix(&dir_prefix()).tempdir_in(&base) {
            Ok(dir) => return Ok(dir),
            Err(e) => errors.push(format!("{}: {e}", base.display())),
        }
    }
    Err(format!("cannot create the control plane directory: {}", errors.join("; ")))
}

/// Removes directories left by test processes that were killed before they could clean up.
fn remove_stale_dirs() {
    if keep_requested() {
        return;
    }
    for base in base_dirs() {
        let Ok(entries) = fs::read_dir(&base) else { continue };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pid) = name
                .to_str()
                .and_then(|n| n.strip_prefix("volt-e2e-"))
                .and_then(|rest| rest.split('-').next())
                .and_then(|pid| pid.parse::<u32>().ok())
            else {
                continue;
            };
            if !Path::new("/proc").join(pid.to_string()).exists() {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }
}

fn write(path: &Path, contents: &str) -> Result<(), String> {
    fs::write(path, contents).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn random_token() -> String {
    format!("{:032x}", rand::random::<u128>())
}

fn kubeconfig_yaml(server: &str, ca: &Path, user: &str, token: &str) -> String {
    format!(
        "apiVersion: v1\n\
         kind: Config\n\
         clusters:\n\
         - name: volt-e2e\n  \
           cluster:\n    \
             server: {server}\n    \
             certificate-authority: {ca}\n\
         users:\n\
         - name: {user}\n  \
           user:\n    \
             token: {token}\n\
         contexts:\n\
         - name: volt-e2e\n  \
           context:\n    \
             cluster: volt-e2e\n    \
             user: {user}\n    \
             namespace: default\n\
         current-context: volt-e2e\n",
        ca = ca.display()
    )
}

/// The certificates and keys, made with the `openssl` CLI.
struct Pki {
    ca_cert: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    sa_key: PathBuf,
    sa_public: PathBuf,
}

impl Pki {
    fn generate(dir: &Path) -> Result<Pki, String> {
        let p = |name: &str| dir.join(name);
        let pki = Pki {
            ca_cert: p("ca.crt"),
            server_cert: p("apiserver.crt"),
            server_key: p("apiserver.key"),
            sa_key: p("sa.key"),
            sa_public: p("sa.pub"),
        };
        write(
            &p("apiserver.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost,IP:10.0.0.1,DNS:kubernetes,\
             DNS:kubernetes.default,DNS:kubernetes.default.svc,\
             DNS:kubernetes.default.svc.cluster.local\n\
             basicConstraints=critical,CA:FALSE\n\
             keyUsage=critical,digitalSignature,keyEncipherment\n\
             extendedKeyUsage=serverAuth\n",
        )?;
        // No argument has a space: each command is split on whitespace.
        let ec = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
        openssl(
            dir,
            &format!(
                "req -x509 {ec} -keyout ca.key -out ca.crt -days 3650 -subj /CN=volt-e2e-ca \
                 -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign"
            ),
        )?;
        openssl(dir, &format!("req -new {ec} -keyout apiserver.key -out apiserver.csr -subj /CN=kube-apiserver"))?;
        openssl(
            dir,
            "x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
             -extfile apiserver.ext -out apiserver.crt",
        )?;
        openssl(dir, "genrsa -out sa.key 2048")?;
        openssl(dir, "rsa -in sa.key -pubout -out sa.pub")?;
        Ok(pki)
    }
}

fn openssl(dir: &Path, args: &str) -> Result<(), String> {
    let args: Vec<&str> = args.split_whitespace().collect();
    let output = Command::new("openssl")
        .args(&args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run `openssl` (apt-get install openssl): {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`openssl {}` failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-string panic)".to_string()
    }
}
