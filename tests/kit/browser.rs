//! A headless browser for the web view's tests: Debian's Chromium driven by Playwright for
//! Python (`hack/browser.sh`, installed on first use into a cached virtualenv; `make deps`
//! installs both). Tests skip, saying so, when no Chromium is installed.

use std::path::PathBuf;

use serde_json::Value;

use super::tools::repo;

/// The Chromium binary (`VOLT_CHROMIUM`, else Debian's), or `None` when none is installed.
pub fn chromium() -> Option<PathBuf> {
    let candidates = [
        std::env::var("VOLT_CHROMIUM").unwrap_or_default(),
        "/usr/bin/chromium".into(),
        "/usr/bin/chromium-browser".into(),
    ];
    candidates.into_iter().filter(|c| !c.is_empty()).map(PathBuf::from).find(|p| p.is_file())
}

/// The Python of the Playwright virtualenv, installed first if need be (without blocking the
/// test's runtime).
pub async fn python() -> PathBuf {
    let script = repo("hack/browser.sh");
    let status =
        tokio::process::Command::new("bash").arg(&script).arg("install").status().await.expect("run hack/browser.sh");
    assert!(status.success(), "hack/browser.sh install failed");
    let out =
        tokio::process::Command::new("bash").arg(&script).arg("python").output().await.expect("hack/browser.sh python");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Runs the Playwright script `script` (a path in the repository) with `config` as its one JSON
/// argument (`chromium` filled in); the JSON it prints. Panics with its stderr if it prints none.
pub async fn drive(script: &str, mut config: Value) -> Value {
    let chromium = chromium().expect("a Chromium binary");
    config["chromium"] = Value::String(chromium.display().to_string());
    let python = python().await;
    let out = tokio::process::Command::new(&python)
        .arg(repo(script))
        .arg(config.to_string())
        .output()
        .await
        .unwrap_or_else(|e| panic!("run {script}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stdout.lines().rev().find(|l| l.starts_with('{'));
    match line.and_then(|l| serde_json::from_str::<Value>(l).ok()) {
        Some(v) => v,
        None => panic!("{script} printed no JSON (exit {:?})\nstdout: {stdout}\nstderr: {stderr}", out.status.code()),
    }
}
