//! Local mode end to end: the built binary on example files, with no cluster.
//!
//! Each test uses its own cache directory (`XDG_CACHE_HOME` in a temporary directory).

#[path = "../kit/mod.rs"]
mod kit;

mod agents;
mod control_flow;
mod runs;
mod validate;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value as Json;

use kit::{operator_bin, repo};

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
    took: Duration,
}

impl Run {
    fn json(&self) -> Json {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{}\nstderr:\n{}", self.stdout, self.stderr))
    }
}

fn volt(cache: &Path, args: &[&str]) -> Run {
    volt_with(cache, args, &[])
}

/// [`volt`] with more environment variables.
fn volt_with(cache: &Path, args: &[&str], env: &[(&str, &str)]) -> Run {
    let started = Instant::now();
    let out: Output = Command::new(operator_bin())
        .args(args)
        .envs(env.iter().copied())
        .env("XDG_CACHE_HOME", cache)
        .env_remove("VOLT_LOCAL_CACHE_DIR")
        .env_remove("OPENAI_API_KEY")
        .current_dir(repo(""))
        .output()
        .expect("the binary runs");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        took: started.elapsed(),
    }
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write a test file");
    p.display().to_string()
}

const WORKFLOW: &str = "apiVersion: volt.dev/v1alpha1\nkind: Workflow\n";
