//! The repository, the built operator binary, and the command-line tools the tests drive:
//! kubectl and helm (against the shared control plane), and any other program.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use super::control_plane;

/// `path` in the repository (the crate's directory; `repo("")` is the directory itself).
pub fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// The `volt-operator` binary cargo built for this test crate. Examples, which cargo gives no
/// such path, name one themselves ([`super::OperatorBuilder::bin`]).
pub fn operator_bin() -> &'static Path {
    match option_env!("CARGO_BIN_EXE_volt-operator") {
        Some(bin) => Path::new(bin),
        None => panic!("no volt-operator binary known to this crate: name one (OperatorBuilder::bin)"),
    }
}

/// What a program did: whether it exited 0, its stdout and its stderr.
#[derive(Debug)]
pub struct Ran {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Ran {
    fn of(out: std::process::Output) -> Ran {
        Ran {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// `(ok, stdout, stderr)`.
    pub fn parts(self) -> (bool, String, String) {
        (self.ok, self.stdout, self.stderr)
    }
}

/// Runs `program` with `args` in the repository, `stdin` as its input, and waits for it
/// (blocking the thread); an error if it cannot be started.
pub fn try_run(program: &Path, args: &[&str], stdin: Option<&str>) -> std::io::Result<Ran> {
    let mut child = Command::new(program)
        .args(args)
        .current_dir(repo(""))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut input = child.stdin.take().expect("stdin");
    if let Some(text) = stdin {
        input.write_all(text.as_bytes())?;
    }
    drop(input);
    Ok(Ran::of(child.wait_with_output()?))
}

/// Runs `program` with `args` in the repository, with no input, on the tokio runtime; panics
/// if it cannot be started.
pub async fn run(program: &Path, args: &[&str]) -> Ran {
    let out = tokio::process::Command::new(program)
        .args(args)
        .current_dir(repo(""))
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap_or_else(|e| panic!("run {}: {e}", program.display()));
    Ran::of(out)
}

/// `kubectl --kubeconfig <admin of the shared control plane> <args>`, blocking; an error when
/// there is no kubectl.
pub fn try_kubectl(args: &[&str], stdin: Option<&str>) -> std::io::Result<Ran> {
    let kubeconfig = control_plane::shared().kubeconfig_path().display().to_string();
    let mut all = vec!["--kubeconfig", kubeconfig.as_str()];
    all.extend_from_slice(args);
    try_run(Path::new("kubectl"), &all, stdin)
}

/// [`try_kubectl`] with no input; panics when there is no kubectl.
pub fn kubectl(args: &[&str]) -> Ran {
    kubectl_stdin(args, None)
}

/// [`try_kubectl`]; panics when there is no kubectl.
pub fn kubectl_stdin(args: &[&str], stdin: Option<&str>) -> Ran {
    try_kubectl(args, stdin).expect("kubectl runs")
}

/// The helm binary `hack/control-plane.sh install` (make deps) puts in its bin-dir.
pub fn helm_binary() -> &'static Path {
    static HELM: OnceLock<PathBuf> = OnceLock::new();
    HELM.get_or_init(|| {
        let helm = control_plane::bin_dir().unwrap_or_else(|e| panic!("{e}")).join("helm");
        assert!(helm.is_file(), "no helm at {}: run `hack/control-plane.sh install` (make deps)", helm.display());
        helm
    })
}

/// Runs helm in the repository and returns its stdout; panics with its output when it fails.
pub async fn helm(args: &[&str]) -> String {
    let ran = run(helm_binary(), args).await;
    assert!(ran.ok, "helm {} failed:\n{}\n{}", args.join(" "), ran.stdout, ran.stderr);
    ran.stdout
}

/// The chart, relative to the repository.
pub const CHART: &str = "charts/volt-operator";

/// Installs the chart as `release` in `ns` (created if need be) on the shared control plane,
/// with `--set` values `sets`; not the CRDs, which the control plane has already.
pub async fn helm_install(release: &str, ns: &str, sets: &[String]) {
    let kubeconfig = control_plane::shared().kubeconfig_path().display().to_string();
    let mut args = vec!["install", release, CHART, "--namespace", ns, "--create-namespace"];
    args.extend(["--kubeconfig", &kubeconfig, "--skip-crds"]);
    for set in sets {
        args.extend(["--set", set.as_str()]);
    }
    helm(&args).await;
}

/// Installs the chart as [`helm_install`] does, for an operator process run by the tests as
/// the control plane's operator user: the chart's rights go to that user too, and the chart
/// watches `ns` only.
pub async fn helm_install_for_operator_user(release: &str, ns: &str, sets: &[String]) {
    let mut all = vec![
        format!("watchNamespaces={{{ns}}}"),
        "rbac.extraSubjects[0].kind=User".into(),
        format!("rbac.extraSubjects[0].name={}", control_plane::OPERATOR_USER),
        "rbac.extraSubjects[0].apiGroup=rbac.authorization.k8s.io".into(),
    ];
    all.extend_from_slice(sets);
    helm_install(release, ns, &all).await;
}

/// Uninstalls `release` from `ns` on the shared control plane.
pub async fn helm_uninstall(release: &str, ns: &str) {
    let kubeconfig = control_plane::shared().kubeconfig_path().display().to_string();
    helm(&["uninstall", release, "--namespace", ns, "--kubeconfig", &kubeconfig]).await;
}
