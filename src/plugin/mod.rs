//! `kubectl volt`: the plugin for runs (`kubectl-volt` on the PATH). It talks to the API server
//! with the caller's kubeconfig and rights, never the operator's: what RBAC forbids the caller,
//! it cannot do, and says so.
//!
//! `get` draws a run as a tree ([`tree`]); `watch` redraws it; `logs` prints pod logs,
//! agent transcripts and outputs ([`logs`]); `submit`, `retry` make runs and `approve`,
//! `reject`, `cancel`, `suspend`, `resume` patch them ([`act`]); `lint` checks files as
//! `volt-operator local validate` does.

mod act;
pub(crate) mod logs;
mod runs;
pub mod tree;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use kube::Client;

/// What went wrong, in the caller's terms.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Usage(String),
    #[error("forbidden: {0}")]
    Forbidden(String),
    #[error("{kind} {name:?} not found in namespace {namespace:?}")]
    NotFound { kind: &'static str, name: String, namespace: String },
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    /// An API error as the caller should read it: a refusal by RBAC says so plainly.
    fn from_api(e: kube::Error) -> Self {
        match e {
            kube::Error::Api(s) if s.code == 403 => Error::Forbidden(s.message.clone()),
            other => Error::Kube(other),
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// Output format of commands that print data.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Format {
    #[default]
    Text,
    Json,
    Yaml,
}

#[derive(Parser, Debug)]
#[command(name = "kubectl-volt", version, about = "Runs of volt-operator workflows: see, follow, decide, retry")]
pub struct Cli {
    /// Namespace (default: the kubeconfig context's, else `default`).
    #[arg(short = 'n', long, global = true)]
    pub namespace: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// A run's steps as a tree: loops, fan-outs and child runs nested.
    Get {
        run: String,
        #[arg(short = 'o', long, value_enum, default_value_t)]
        output: Format,
    },
    /// The tree, redrawn as the run changes, until it ends (exit code from the run).
    Watch { run: String },
    /// Pod logs, agent transcripts and outputs of a run's steps (all, or STEP's).
    Logs {
        run: String,
        step: Option<String>,
        /// Follow a running step's pod, or print each step as it ends.
        #[arg(short = 'f', long)]
        follow: bool,
    },
    /// Starts a run of a Workflow.
    Submit {
        workflow: String,
        /// A parameter: NAME=text, or NAME:=JSON.
        #[arg(short = 'p', long = "param", value_parser = crate::local::cli::parse_param)]
        params: Vec<(String, serde_json::Value)>,
        /// Follow it to its end (exit code from the run).
        #[arg(short = 'w', long)]
        watch: bool,
    },
    /// A new run of the same workflow; with --from, the steps before STEP give their recorded
    /// outputs instead of running again.
    Retry {
        run: String,
        #[arg(long)]
        from: Option<String>,
        #[arg(short = 'w', long)]
        watch: bool,
    },
    /// Approves a waiting step (an approval, or a tool call: STEP/TOOL).
    Approve {
        run: String,
        step: String,
        #[arg(short = 'm', long)]
        message: Option<String>,
    },
    /// Rejects a waiting step.
    Reject {
        run: String,
        step: String,
        #[arg(short = 'm', long)]
        message: Option<String>,
    },
    /// Cancels a run (running steps stop, finally steps run).
    Cancel { run: String },
    /// Suspends a run (no new steps start).
    Suspend { run: String },
    /// Resumes a suspended run.
    Resume { run: String },
    /// Checks Workflow, Agent and WorkflowRun files without a cluster.
    Lint {
        #[arg(required = true)]
        files: Vec<std::path::PathBuf>,
    },
    /// Shell completions.
    Completion { shell: clap_complete::Shell },
}

/// What a command needs: a client with the caller's kubeconfig, and the namespace.
pub struct Ctx {
    pub client: Client,
    pub namespace: String,
    /// Who the kubeconfig says the caller is (recorded in decisions' `by`).
    pub user: String,
    /// Paint phases (stdout is a terminal and NO_COLOR is not set).
    pub colour: bool,
}

impl Ctx {
    async fn new(namespace: Option<String>) -> Result<Ctx> {
        let kubeconfig = kube::config::Kubeconfig::read().ok();
        let context = kubeconfig.as_ref().and_then(|k| {
            let name = k.current_context.clone()?;
            k.contexts.iter().find(|c| c.name == name).and_then(|c| c.context.clone())
        });
        let user = context.as_ref().and_then(|c| c.user.clone()).unwrap_or_else(|| "unknown".into());
        let config = kube::Config::infer().await.map_err(|e| Error::Usage(format!("no cluster to talk to: {e}")))?;
        let namespace = namespace.unwrap_or_else(|| config.default_namespace.clone());
        let client = Client::try_from(config)?;
        let colour = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
        Ok(Ctx { client, namespace, user, colour })
    }
}

/// Runs the plugin; the process's exit code.
pub fn main() -> ExitCode {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    if let Command::Completion { shell } = &cli.command {
        use clap::CommandFactory;
        clap_complete::generate(*shell, &mut Cli::command(), "kubectl-volt", &mut std::io::stdout());
        return ExitCode::SUCCESS;
    }
    if let Command::Lint { files } = &cli.command {
        return ExitCode::from(crate::local::validate(&crate::local::cli::LocalValidateArgs { files: files.clone() }));
    }
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs a command; 0 on success, 1 when the run it followed did not succeed.
pub async fn run(cli: Cli) -> Result<u8> {
    let ctx = Ctx::new(cli.namespace).await?;
    match cli.command {
        Command::Get { run, output } => runs::get(&ctx, &run, output).await,
        Command::Watch { run } => runs::watch(&ctx, &run).await,
        Command::Logs { run, step, follow } => logs::logs(&ctx, &run, step.as_deref(), follow).await,
        Command::Submit { workflow, params, watch } => runs::submit(&ctx, &workflow, params, watch).await,
        Command::Retry { run, from, watch } => runs::retry(&ctx, &run, from.as_deref(), watch).await,
        Command::Approve { run, step, message } => act::decide(&ctx, &run, &step, true, message).await,
        Command::Reject { run, step, message } => act::decide(&ctx, &run, &step, false, message).await,
        Command::Cancel { run } => act::set(&ctx, &run, "cancel", true).await,
        Command::Suspend { run } => act::set(&ctx, &run, "suspend", true).await,
        Command::Resume { run } => act::set(&ctx, &run, "suspend", false).await,
        Command::Lint { .. } | Command::Completion { .. } => Ok(0),
    }
}
