//! `volt-operator run` as an OS process: the one launcher of the tests, the chaos suite and the
//! benchmark.
//!
//! ```ignore
//! let mut op = OperatorProcess::builder(cp.operator_kubeconfig_path(), dir.join("operator.log"))
//!     .namespaces(&[&ns])
//!     .args(["--health-check-interval", "1", "--log-level", "info"])
//!     .start(Duration::from_secs(60))
//!     .await;
//! assert!(op.metric("volt_reconciles_total").await > 0.0);
//! op.sigkill().await;
//! ```
//!
//! The process serves HTTP on `127.0.0.1` and a free port (`--http-addr`), reads its cluster from
//! `KUBECONFIG` (the kubeconfig given, which sets its identity: the control plane's operator user,
//! a ServiceAccount token...), and writes stdout and stderr to one log file. It is killed when
//! the [`OperatorProcess`] is dropped, and when the thread that started it exits (so also when the
//! test process dies: `PR_SET_PDEATHSIG`).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::logs;
use super::metrics;
use super::net::{free_port, http_get};
use super::tools::operator_bin;

/// Lines of the log [`OperatorProcess::log_tail`] shows.
const TAIL_LINES: usize = 40;

/// How to start an operator process; from [`OperatorProcess::builder`].
#[must_use]
pub struct OperatorBuilder {
    name: String,
    bin: Option<PathBuf>,
    kubeconfig: PathBuf,
    log: PathBuf,
    append: bool,
    args: Vec<String>,
    env: Vec<(OsString, OsString)>,
    env_remove: Vec<OsString>,
    http_timeout: Duration,
}

impl OperatorBuilder {
    /// A name for messages (default `operator`); it does not set the process's identity
    /// (`POD_NAME`, for leader election: [`OperatorBuilder::env`]).
    pub fn name(mut self, name: &str) -> Self {
        self.name = name.to_string();
        self
    }

    /// The binary (default: the one cargo built for this test crate, [`operator_bin`]).
    pub fn bin(mut self, bin: impl Into<PathBuf>) -> Self {
        self.bin = Some(bin.into());
        self
    }

    /// `--namespaces a,b`: the namespaces it watches (default: every namespace).
    pub fn namespaces(self, namespaces: &[&str]) -> Self {
        let list = namespaces.join(",");
        self.args(["--namespaces", list.as_str()])
    }

    /// More arguments of `volt-operator run`.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.args.extend(args.into_iter().map(|a| a.as_ref().to_string()));
        self
    }

    /// An environment variable of the process (it inherits the test's others).
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// An environment variable of the test the process must not inherit.
    pub fn env_remove(mut self, key: impl Into<OsString>) -> Self {
        self.env_remove.push(key.into());
        self
    }

    /// Appends to the log file rather than starting it afresh (several processes, one log).
    pub fn append_log(mut self) -> Self {
        self.append = true;
        self
    }

    /// How long [`OperatorProcess::get`] waits for an answer (default 2 s).
    pub fn http_timeout(mut self, timeout: Duration) -> Self {
        self.http_timeout = timeout;
        self
    }

    /// Starts the process, without waiting for it to be ready. Inside a tokio runtime.
    pub fn spawn(self) -> OperatorProcess {
        let port = free_port();
        let file = if self.append {
            std::fs::OpenOptions::new().create(true).append(true).open(&self.log)
        } else {
            std::fs::File::create(&self.log)
        }
        .unwrap_or_else(|e| panic!("operator log file {}: {e}", self.log.display()));
        let stdout = file.try_clone().unwrap_or_else(|e| panic!("operator log file {}: {e}", self.log.display()));
        let bin = self.bin.unwrap_or_else(|| operator_bin().to_path_buf());
        let mut command = tokio::process::Command::new(&bin);
        command
            .args(["run", "--http-addr", &format!("127.0.0.1:{port}")])
            .args(&self.args)
            .env("KUBECONFIG", &self.kubeconfig)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(file)
            .kill_on_drop(true);
        for key in &self.env_remove {
            command.env_remove(key);
        }
        // SAFETY: only prctl, which is async-signal-safe, runs between fork and exec.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let started = Instant::now();
        let child = command.spawn().unwrap_or_else(|e| panic!("start {} ({}): {e}", self.name, bin.display()));
        let pid = child.id().expect("a started process has a pid");
        OperatorProcess { name: self.name, child, pid, port, log: self.log, started, http_timeout: self.http_timeout }
    }

    /// Starts the process and waits until it is ready ([`OperatorProcess::wait_ready`]).
    pub async fn start(self, ready_within: Duration) -> OperatorProcess {
        let mut op = self.spawn();
        op.wait_ready(ready_within).await;
        op
    }
}

/// A running `volt-operator run`; killed when dropped.
pub struct OperatorProcess {
    name: String,
    child: tokio::process::Child,
    pid: u32,
    port: u16,
    log: PathBuf,
    started: Instant,
    http_timeout: Duration,
}

impl OperatorProcess {
    /// An operator process reading its cluster and identity from `kubeconfig`, logging to `log`.
    pub fn builder(kubeconfig: impl AsRef<Path>, log: impl Into<PathBuf>) -> OperatorBuilder {
        OperatorBuilder {
            name: "operator".into(),
            bin: None,
            kubeconfig: kubeconfig.as_ref().to_path_buf(),
            log: log.into(),
            append: false,
            args: Vec::new(),
            env: Vec::new(),
            env_remove: Vec::new(),
            http_timeout: Duration::from_secs(2),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The port of its HTTP server (probes, metrics, API) on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// When it was started.
    pub fn started(&self) -> Instant {
        self.started
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Status code and body of `GET path` on its HTTP port, or `None` when nothing answers in
    /// time.
    pub async fn get(&self, path: &str) -> Option<(u16, String)> {
        http_get(self.port, path, self.http_timeout).await
    }

    /// [`Self::get`] as the caller of bearer token `token` (the JSON API wants one).
    pub async fn get_as(&self, path: &str, token: &str) -> Option<(u16, String)> {
        super::net::http_get_as(self.port, path, Some(token), self.http_timeout).await
    }

    /// Whether `/readyz` answers 200.
    pub async fn ready(&self) -> bool {
        matches!(self.get("/readyz").await, Some((200, _)))
    }

    /// Waits until `/readyz` answers 200 (polling every 20 ms); how long after the start that
    /// was. Panics, with the log's tail, if the process exits or is not ready within `timeout`.
    pub async fn wait_ready(&mut self, timeout: Duration) -> Duration {
        let deadline = Instant::now() + timeout;
        loop {
            self.assert_alive("while starting");
            if self.ready().await {
                return self.started.elapsed();
            }
            assert!(Instant::now() < deadline, "{} not ready after {timeout:?}\n{}", self.name, self.log_tail());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Panics, with the log's tail, if the process has exited.
    pub fn assert_alive(&mut self, when: &str) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("{} exited on its own {when} ({status})\n{}", self.name, self.log_tail());
        }
    }

    /// `/metrics`, empty when nothing answers.
    pub async fn metrics_text(&self) -> String {
        self.get("/metrics").await.map(|(_, body)| body).unwrap_or_default()
    }

    /// The sum of the samples of `metric` on `/metrics`.
    pub async fn metric(&self, metric: &str) -> f64 {
        metrics::metric_sum(&self.metrics_text().await, metric)
    }

    /// The samples of `metric` on `/metrics`, summed by the value of their label `label`.
    pub async fn metric_by_label(&self, metric: &str, label: &str) -> std::collections::BTreeMap<String, f64> {
        metrics::metric_by_label(&self.metrics_text().await, metric, label)
    }

    /// Sends SIGKILL and waits (10 s at most) for the process to exit; how it ended.
    pub async fn sigkill(&mut self) -> ExitStatus {
        // An error only says it has exited already, which the status below shows.
        let _ = self.child.start_kill();
        self.exit_status(Duration::from_secs(10)).await
    }

    /// Sends SIGTERM (what Kubernetes sends), without waiting.
    pub fn sigterm(&self) {
        // SAFETY: kill(2) on the pid of a child this process started and has not reaped (it is
        // reaped only through `self.child`, which `&self` keeps from waiting).
        let sent = unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGTERM) };
        assert_eq!(sent, 0, "SIGTERM to {}: {}", self.name, std::io::Error::last_os_error());
    }

    /// SIGTERM, then SIGKILL if it has not exited after `grace`; how it ended.
    pub async fn stop(&mut self, grace: Duration) -> ExitStatus {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.sigterm();
        }
        match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(status) => status.unwrap_or_else(|e| panic!("wait for {}: {e}", self.name)),
            Err(_) => self.sigkill().await,
        }
    }

    /// Waits (`timeout` at most, else panics with the log's tail) for the process to exit; its
    /// exit code (`None` when a signal ended it).
    pub async fn exited(&mut self, timeout: Duration) -> Option<i32> {
        self.exit_status(timeout).await.code()
    }

    async fn exit_status(&mut self, timeout: Duration) -> ExitStatus {
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(status) => status.unwrap_or_else(|e| panic!("wait for {}: {e}", self.name)),
            Err(_) => panic!("{} still running after {timeout:?}\n{}", self.name, self.log_tail()),
        }
    }

    /// Everything it has logged.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_else(|e| panic!("read {}: {e}", self.log.display()))
    }

    /// The last 40 lines of its log, under a line naming the file.
    pub fn log_tail(&self) -> String {
        format!("----- {} (last {TAIL_LINES} lines) -----\n{}", self.log.display(), logs::tail(&self.log, TAIL_LINES))
    }

    /// Panics, with the lines, if its log shows a panic.
    pub fn assert_no_panic(&self) {
        logs::assert_no_panic(std::slice::from_ref(&self.log));
    }
}
