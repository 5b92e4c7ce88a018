//! Container steps as local processes. Local mode cannot run images: a step that gives a
//! `command` runs it on this machine (with its args and env, in the current directory), and a
//! step without one fails saying so.
//!
//! The output mirrors Kubernetes: it is the step's *termination message*, the file the
//! process writes at `$VOLT_TERMINATION_LOG` (local mode also rewrites the literal path
//! `/dev/termination-log` in the command, args and env values to that file, so a step written
//! for the cluster runs unchanged), at most 4 KiB. Standard output and error are not the
//! output; as with the cluster's `FallbackToLogsOnError`, their tail explains a failure.
//!
//! Each process runs in its own process group; a timeout or an abort kills the whole group,
//! and so does the end of the attempt (as a pod's containers end with it).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::engine::{TaskStart, Work};
use crate::executors::{ContainerRunner, Failure, Outcome, Output};

/// The path a container step writes its output to in a pod.
pub const TERMINATION_LOG: &str = "/dev/termination-log";
/// Longest termination message, as in Kubernetes.
pub const MAX_OUTPUT: usize = 4096;
/// Bytes of stdout and stderr kept to explain a failure.
const LOG_TAIL: usize = 2048;

/// Identity of the run, passed to processes as `VOLT_RUN` and `VOLT_NAMESPACE`.
#[derive(Debug, Clone)]
pub struct ProcessContext {
    pub run: String,
    pub namespace: String,
    /// Where termination-log files are made (one per attempt).
    pub dir: PathBuf,
}

impl ContainerRunner for ProcessContext {
    fn run<'a>(&'a self, task: &'a TaskStart) -> BoxFuture<'a, Outcome> {
        Box::pin(run(self, task))
    }
}

/// Why the image is not used, for step messages.
pub fn image_note(image: &str) -> String {
    format!("ran as a local process; image {image} not used")
}

/// Runs one attempt of a container step.
pub async fn run(ctx: &ProcessContext, task: &TaskStart) -> Outcome {
    let Work::Container { image, command, args, env, working_dir, .. } = &task.work else {
        return Err(Failure::permanent("not a container step"));
    };
    if command.is_empty() {
        return Err(Failure::permanent(format!(
            "container.command is not set: local mode cannot run images (image {image} was not used), only a \
             command as a local process; give container.command, or run this workflow in a cluster"
        )));
    }
    if let Some((j, e)) = env.iter().enumerate().find(|(_, e)| e.value_from.is_some()) {
        return Err(Failure::permanent(format!(
            "container.env[{j}] ({}): valueFrom (Secrets, ConfigMaps, fields) is not available in local mode; give a \
             value",
            e.name
        )));
    }
    let log_file = ctx.dir.join(format!("{}-{}.termination-log", file_safe(&task.key), task.attempt));
    if let Err(e) = std::fs::create_dir_all(&ctx.dir).and_then(|_| std::fs::write(&log_file, b"")) {
        return Err(Failure::permanent(format!("cannot create {}: {e}", log_file.display())));
    }
    let log_path = log_file.to_string_lossy().into_owned();
    let rewrite = |s: &str| s.replace(TERMINATION_LOG, &log_path);
    let mut cmd = tokio::process::Command::new(rewrite(&command[0]));
    cmd.args(command[1..].iter().map(|s| rewrite(s)))
        .args(args.iter().map(|s| rewrite(s)))
        .env("VOLT_TERMINATION_LOG", &log_path)
        .env("VOLT_RUN", &ctx.run)
        .env("VOLT_NAMESPACE", &ctx.namespace)
        .env("VOLT_STEP", &task.step_id)
        .env("VOLT_STEP_KEY", &task.key)
        .env("VOLT_ATTEMPT", task.attempt.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(index) = task.index {
        cmd.env("VOLT_ITEM_INDEX", index.to_string());
    }
    if let Some(tp) = crate::telemetry::current_step_traceparent() {
        cmd.env("TRACEPARENT", tp);
    }
    for e in env {
        cmd.env(&e.name, rewrite(e.value.as_deref().unwrap_or_default()));
    }
    if let Some(dir) = working_dir {
        if !Path::new(dir).is_dir() {
            let _ = std::fs::remove_file(&log_file);
            return Err(Failure::permanent(format!(
                "container.workingDir {dir:?} is not a directory on this machine ({})",
                image_note(image)
            )));
        }
        cmd.current_dir(dir);
    }
    #[cfg(unix)]
    cmd.process_group(0);
    let outcome = supervise(cmd, &command[0], image, task.timeout, &log_file).await;
    let _ = std::fs::remove_file(&log_file);
    outcome
}

async fn supervise(
    mut cmd: tokio::process::Command,
    program: &str,
    image: &str,
    timeout: Option<Duration>,
    log_file: &Path,
) -> Outcome {
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Failure::permanent(format!(
                "command {program:?} not found on this machine ({})",
                image_note(image)
            )));
        }
        Err(e) => return Err(Failure::permanent(format!("cannot start {program:?}: {e} ({})", image_note(image)))),
    };
    let group = Group::new(child.id());
    let stdout = child.stdout.take().map(|s| tokio::spawn(tail(s)));
    let stderr = child.stderr.take().map(|s| tokio::spawn(tail(s)));
    let waited = match timeout {
        Some(t) => tokio::time::timeout(t, child.wait()).await.ok(),
        None => Some(child.wait().await),
    };
    // The attempt is over: whatever it left running in its group ends with it.
    drop(group);
    let logs = async {
        let mut out = Vec::new();
        for h in [stdout, stderr].into_iter().flatten() {
            if let Ok(Ok(Ok(bytes))) = tokio::time::timeout(Duration::from_secs(2), h).await {
                out.extend(bytes);
            }
        }
        out
    };
    let status = match waited {
        None => {
            let _ = child.kill().await;
            let t = timeout.unwrap_or_default();
            return Err(Failure::retryable(format!(
                "timed out after {}s; the process was killed ({})",
                t.as_secs(),
                image_note(image)
            )));
        }
        Some(Err(e)) => return Err(Failure::retryable(format!("waiting for {program:?}: {e}"))),
        Some(Ok(status)) => status,
    };
    let message = read_message(log_file);
    if status.success() {
        return Ok(Output { text: message, info: Default::default() });
    }
    let how = match status.code() {
        Some(code) => format!("exited with code {code}"),
        None => exit_signal(&status),
    };
    let detail = if message.trim().is_empty() {
        let logs = logs.await;
        let text = String::from_utf8_lossy(&logs);
        last_lines(text.trim(), 20)
    } else {
        message.trim().to_string()
    };
    let detail = if detail.is_empty() { String::new() } else { format!(": {detail}") };
    Err(Failure::retryable(format!("{program} {how} ({}){detail}", image_note(image))))
}

#[cfg(unix)]
fn exit_signal(status: &std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status.signal() {
        Some(sig) => format!("was killed by signal {sig}"),
        None => "failed".into(),
    }
}

#[cfg(not(unix))]
fn exit_signal(_: &std::process::ExitStatus) -> String {
    "failed".into()
}

/// The termination message: the file's first [`MAX_OUTPUT`] bytes, as text.
fn read_message(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    let mut end = bytes.len().min(MAX_OUTPUT);
    // Cut on a character boundary.
    while end > 0 && end < bytes.len() && (bytes[end] & 0b1100_0000) == 0b1000_0000 {
        end -= 1;
    }
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// Reads a stream to its end, keeping its last [`LOG_TAIL`] bytes.
async fn tail(mut r: impl AsyncRead + Unpin) -> std::io::Result<Vec<u8>> {
    let mut kept = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Ok(kept);
        }
        kept.extend_from_slice(&buf[..n]);
        if kept.len() > 2 * LOG_TAIL {
            kept.drain(..kept.len() - LOG_TAIL);
        }
    }
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let mut s = lines[lines.len().saturating_sub(n)..].join("\n");
    if s.len() > LOG_TAIL {
        let mut start = s.len() - LOG_TAIL;
        while !s.is_char_boundary(start) {
            start += 1;
        }
        s = s[start..].to_string();
    }
    s
}

fn file_safe(key: &str) -> String {
    key.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect()
}

/// Process groups of running attempts, for [`kill_all`].
static LIVE: std::sync::Mutex<Vec<i32>> = std::sync::Mutex::new(Vec::new());

fn live() -> std::sync::MutexGuard<'static, Vec<i32>> {
    LIVE.lock().unwrap_or_else(|p| p.into_inner())
}

/// Kills every process group still running (before exiting at once on a second Ctrl-C: the
/// groups do not get the terminal's signals).
pub fn kill_all() {
    for pid in live().drain(..) {
        kill_group(pid);
    }
}

fn kill_group(pid: i32) {
    #[cfg(unix)]
    if pid > 0 {
        // SAFETY: kill(2) with a negative pid signals the process group the child leads (it
        // was started with process_group(0)); it touches no memory of ours.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
    }
}

/// A process group, killed when dropped (the attempt ended, timed out or was aborted).
struct Group(Option<i32>);

impl Group {
    fn new(pid: Option<u32>) -> Self {
        let pid = pid.and_then(|p| i32::try_from(p).ok()).filter(|p| *p > 0);
        if let Some(p) = pid {
            live().push(p);
        }
        Self(pid)
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            live().retain(|p| *p != pid);
            kill_group(pid);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::EnvVar;

    fn task(command: &[&str], env: Vec<EnvVar>, timeout: Option<Duration>) -> TaskStart {
        TaskStart {
            key: "s[0]".into(),
            step_id: "s".into(),
            index: Some(0),
            attempt: 1,
            work: Work::Container {
                image: "busybox".into(),
                command: command.iter().map(|s| s.to_string()).collect(),
                args: vec![],
                env,
                resources: None,
                working_dir: None,
                service_account_name: None,
                pod: Default::default(),
            },
            timeout,
            cache: None,
        }
    }

    fn ctx(dir: &Path) -> ProcessContext {
        ProcessContext { run: "r".into(), namespace: "default".into(), dir: dir.to_path_buf() }
    }

    #[tokio::test]
    async fn output_is_the_termination_message() {
        let dir = tempfile::tempdir().expect("tempdir");
        let env = vec![EnvVar { name: "WHO".into(), value: Some("world".into()), value_from: None }];
        let t = task(
            &["sh", "-c", "echo noise; printf 'hi %s %s' \"$WHO\" \"$VOLT_STEP_KEY\" > /dev/termination-log"],
            env,
            None,
        );
        let out = run(&ctx(dir.path()), &t).await.expect("succeeds");
        assert_eq!(out.text, "hi world s[0]");
        assert_eq!(std::fs::read_dir(dir.path()).map(|d| d.count()).unwrap_or(0), 0, "the log file is removed");
    }

    #[tokio::test]
    async fn failures_explain_themselves() {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = task(&["sh", "-c", "echo something broke >&2; exit 3"], vec![], None);
        let err = run(&ctx(dir.path()), &t).await.expect_err("fails");
        assert!(err.retryable);
        assert!(err.message.contains("exited with code 3"), "{}", err.message);
        assert!(err.message.contains("something broke"), "{}", err.message);
        assert!(err.message.contains("image busybox not used"), "{}", err.message);

        let err = run(&ctx(dir.path()), &task(&[], vec![], None)).await.expect_err("no command");
        assert!(!err.retryable);
        assert!(err.message.contains("local mode cannot run images"), "{}", err.message);

        let err = run(&ctx(dir.path()), &task(&["no-such-program-volt"], vec![], None)).await.expect_err("missing");
        assert!(err.message.contains("not found on this machine"), "{}", err.message);
    }

    #[tokio::test]
    async fn timeouts_kill_the_process_group() {
        let dir = tempfile::tempdir().expect("tempdir");
        let marker = dir.path().join("survived");
        let script = format!("(sleep 1; touch {}) & sleep 30", marker.display());
        let t = task(&["sh", "-c", &script], vec![], Some(Duration::from_millis(200)));
        let started = std::time::Instant::now();
        let err = run(&ctx(dir.path()), &t).await.expect_err("times out");
        assert!(err.message.contains("timed out"), "{}", err.message);
        assert!(started.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(!marker.exists(), "the background child was killed with its group");
    }

    #[test]
    fn long_messages_are_cut_like_kubernetes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("m");
        std::fs::write(&p, "é".repeat(3000)).expect("write");
        let m = read_message(&p);
        assert!(m.len() <= MAX_OUTPUT && m.chars().all(|c| c == 'é'));
    }
}
