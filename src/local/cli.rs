//! The `local` subcommands' flags.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use serde_json::Value as Json;

/// `volt-operator local ...`
#[derive(Debug, Subcommand)]
pub enum LocalCommand {
    /// Run a Workflow from YAML files on this machine, with no cluster.
    ///
    /// Template, http and agent steps run in-process as in the cluster; container steps run their
    /// `command` as local processes (the image is not used). Exit code: 0 when the run succeeded,
    /// 1 when it failed or was cancelled, 2 for invalid input.
    Run(LocalRunArgs),
    /// Check Agents, Workflows and WorkflowRuns in YAML files as the API server and the controller
    /// would.
    ///
    /// Schema (types, ranges, patterns, unknown fields), DAG and templates, parameters, agent
    /// references. Each problem names the file, object, step and field. Exit code: 0 when valid,
    /// 2 otherwise.
    Validate(LocalValidateArgs),
}

/// Output of `local run`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// A live view on stderr and a summary table on stdout.
    Text,
    /// The final WorkflowRun status as JSON on stdout (no live view unless stderr is a terminal).
    Json,
}

/// `local run` arguments.
#[derive(Debug, Clone, Args)]
pub struct LocalRunArgs {
    /// YAML files (several documents each), directories of them, or `-` for stdin: Agents, one
    /// Workflow (or several with --workflow) and at most one WorkflowRun.
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,

    /// A parameter: `name=text` (a string), or `name:=json` for any JSON value (a list, a
    /// number, true). Overrides the WorkflowRun's parameters. Repeatable.
    #[arg(short = 'p', long = "param", value_name = "NAME=VALUE", value_parser = parse_param)]
    pub params: Vec<(String, Json)>,

    /// The Workflow to run when the files hold several and no WorkflowRun names one.
    #[arg(long, value_name = "NAME")]
    pub workflow: Option<String>,

    /// Watch the run as a table of steps updated in place (on a terminal), as `argo submit
    /// --watch` does; without it a terminal shows a progress bar and one line per step result.
    #[arg(short, long)]
    pub watch: bool,

    /// Output format.
    #[arg(short, long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,

    /// Do not read or write the step cache.
    #[arg(long)]
    pub no_cache: bool,

    /// Directory of the step cache (default: $XDG_CACHE_HOME/volt-operator/local-cache, else
    /// ~/.cache/volt-operator/local-cache).
    #[arg(long, env = "VOLT_LOCAL_CACHE_DIR", value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,

    /// Timeout of the whole run, in seconds (default: the WorkflowRun's timeoutSeconds, else 3600).
    #[arg(long, value_name = "SECONDS", value_parser = parse_secs)]
    pub timeout: Option<Duration>,

    /// Most steps running at once (processes and in-process calls) across the whole run. By
    /// default (0) only the workflow's own limits apply: a forEach runs `maxParallel` items at
    /// once, as in the cluster. Set it to spare this machine.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub parallelism: usize,

    /// Approves an approval step (its status key, such as `sign-off` or `review.2.sign-off`),
    /// with an optional comment (`STEP=COMMENT`, the step's output). Repeatable.
    #[arg(long, value_name = "STEP[=COMMENT]")]
    pub approve: Vec<String>,

    /// Rejects an approval step, with an optional comment (`STEP=COMMENT`). Repeatable.
    #[arg(long, value_name = "STEP[=COMMENT]")]
    pub reject: Vec<String>,

    /// Write the transcript of each agent step (messages, tool calls and results, replica,
    /// latency, usage, repairs; secrets redacted) to DIR/<step key>.json.
    #[arg(long, value_name = "DIR")]
    pub transcripts: Option<PathBuf>,
}

/// `local validate` arguments.
#[derive(Debug, Clone, Args)]
pub struct LocalValidateArgs {
    /// YAML files (several documents each), directories of them, or `-` for stdin.
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
}

/// Parses `name=text` or `name:=json`.
pub fn parse_param(s: &str) -> Result<(String, Json), String> {
    let Some((name, value)) = s.split_once('=') else {
        return Err(format!("{s:?} is not NAME=VALUE (or NAME:=JSON)"));
    };
    let (name, json) = match name.strip_suffix(':') {
        Some(n) => (n, true),
        None => (name, false),
    };
    let valid = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        return Err(format!("{name:?} is not a parameter name (letters, digits and '_', not starting with a digit)"));
    }
    let value = if json {
        serde_json::from_str(value).map_err(|e| format!("the value of {name} after ':=' is not JSON: {e}"))?
    } else {
        Json::String(value.to_string())
    };
    Ok((name.to_string(), value))
}

/// Longest run timeout, as a WorkflowRun's `timeoutSeconds` allows.
const MAX_TIMEOUT: f64 = 2_592_000.0;

fn parse_secs(s: &str) -> Result<Duration, String> {
    let v: f64 = s.trim_end_matches('s').parse().map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !(v.is_finite() && v > 0.0 && v <= MAX_TIMEOUT) {
        return Err(format!("{s:?} must be a number of seconds from 0 to {MAX_TIMEOUT} (30 days)"));
    }
    Ok(Duration::from_secs_f64(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_are_strings_or_json() {
        assert_eq!(parse_param("who=a=b"), Ok(("who".into(), Json::from("a=b"))));
        assert_eq!(parse_param("version=1.10"), Ok(("version".into(), Json::from("1.10"))));
        assert_eq!(parse_param("items:=[1,2]"), Ok(("items".into(), serde_json::json!([1, 2]))));
        assert!(parse_param("novalue").is_err());
        assert!(parse_param("9x=1").unwrap_err().contains("not a parameter name"));
        assert!(parse_param("x:=[").unwrap_err().contains("not JSON"));
    }
}
