use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use clap::{Args, Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};
use tracing_subscriber::EnvFilter;

use volt_operator::config::RunArgs;
use volt_operator::controllers::{self, Health};
use volt_operator::metrics::Metrics;
use volt_operator::shards::{self, Ownership};
use volt_operator::{api, http, kube_util, leader};

/// volt-operator: orchestrates AI-agent workflows on Kubernetes.
#[derive(Debug, Parser)]
#[command(name = "volt-operator", version, about, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub log: LogArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the controllers against the cluster from KUBECONFIG or the in-cluster service account.
    Run(Box<RunArgs>),
    /// Print every CustomResourceDefinition as YAML (or write one file per CRD with --out-dir).
    Crd(CrdArgs),
    /// Run or validate Workflows from YAML files on this machine, with no cluster.
    #[command(subcommand)]
    Local(volt_operator::local::LocalCommand),
}

/// Logging.
#[derive(Debug, Clone, Args)]
pub struct LogArgs {
    /// Log level or tracing filter (for example `info` or `volt_operator=debug,kube=info`).
    #[arg(long, env = "VOLT_LOG_LEVEL", default_value = "info", global = true)]
    pub log_level: String,
    /// Log format.
    #[arg(long, env = "VOLT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// `crd` arguments.
#[derive(Debug, Clone, Args)]
pub struct CrdArgs {
    /// Write one `<plural>.yaml` per CRD into this directory instead of printing.
    #[arg(long)]
    pub out_dir: Option<std::path::PathBuf>,
}

fn init_logging(log: &LogArgs) {
    let filter = EnvFilter::try_new(&log.log_level).unwrap_or_else(|e| {
        eprintln!("--log-level {:?} is not a valid filter ({e}); using info", log.log_level);
        EnvFilter::new("info")
    });
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match log.log_format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

fn print_crds(args: &CrdArgs) -> Result<(), String> {
    let crds = api::crds();
    match &args.out_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
            for crd in &crds {
                let path = dir.join(api::crd_file_name(crd));
                std::fs::write(&path, api::crd_yaml(crd)).map_err(|e| format!("writing {}: {e}", path.display()))?;
            }
        }
        None => {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            for crd in &crds {
                if let Err(e) = out.write_all(api::crd_yaml(crd).as_bytes()) {
                    if e.kind() == std::io::ErrorKind::BrokenPipe {
                        return Ok(());
                    }
                    return Err(format!("writing to stdout: {e}"));
                }
            }
        }
    }
    Ok(())
}

async fn run(mut args: RunArgs) -> Result<(), String> {
    let metrics = Metrics::new();
    let config = kube::Config::infer()
        .await
        .map_err(|e| format!("no Kubernetes configuration (KUBECONFIG or in-cluster): {e}"))?;
    // HTTP steps may not reach the cluster API.
    args.cluster_url = Some(config.cluster_url.clone());
    let client = kube_util::client_with_metrics(config, &metrics, args.api_bound())
        .await
        .map_err(|e| format!("building the Kubernetes client: {e}"))?;
    let health = Arc::new(Health::default());
    // The JSON API checks its callers with TokenReview and SubjectAccessReview.
    let _ = health.access.set(Arc::new(volt_operator::auth::Access::kube(client.clone())));
    // The event log answers on every replica (followers too): what is stored is in ConfigMaps.
    let _ = health.events.set(Arc::new(volt_operator::events::EventLog::with_store(
        controllers::EVENT_LOG_SIZE,
        client.clone(),
        controllers::scopes(&args),
        metrics.clone(),
    )));
    let sharding = shards::leases::Settings::from_args(&args).map_err(|e| e.to_string())?;
    let election =
        if args.leader_elect { Some(leader::Settings::from_args(&args).map_err(|e| e.to_string())?) } else { None };
    // A lone replica leads; with shards or an election, readiness follows the API server.
    health.leader.store(election.is_none() && sharding.is_none(), Ordering::Relaxed);
    let shutdown = CancellationToken::new();
    {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            shutdown_signal().await;
            info!("shutting down");
            shutdown.cancel();
        });
    }
    // The web view's runs come from one watch of its own, on every replica (followers too).
    let ui = args.ui.then(|| volt_operator::ui::Ui {
        health: health.clone(),
        runs: volt_operator::ui::RunStore::start(&client, &controllers::scopes(&args), shutdown.clone()),
        client: client.clone(),
    });
    let server = tokio::spawn(http::serve(args.http_addr, metrics.clone(), health.clone(), ui, shutdown.clone()));
    // With leader election only the Lease holder runs the controllers; losing the Lease ends
    // `run` with an error, so the process exits and comes back as a follower.
    // With shards every replica runs the controllers, each for the shards it holds.
    let elected = match (sharding, election) {
        (Some(settings), _) => {
            let ownership = Ownership::sharded(settings.shards, settings.identity.clone());
            let controllers = tokio::spawn(controllers::run(
                client.clone(),
                args,
                metrics.clone(),
                health.clone(),
                ownership.clone(),
                shutdown.clone(),
            ));
            let held = shards::leases::run(client, settings, ownership, health, &metrics, shutdown.clone()).await;
            shutdown.cancel();
            let _ = controllers.await;
            held.map_err(|e| e.to_string())
        }
        (None, Some(settings)) => {
            let work = {
                let (client, metrics, health) = (client.clone(), metrics.clone(), health.clone());
                let ownership = Ownership::single(Some(health.clone()));
                move |term| controllers::run(client, args, metrics, health, ownership, term)
            };
            leader::run(client, settings, health, &metrics, shutdown.clone(), work).await.map_err(|e| e.to_string())
        }
        (None, None) => {
            controllers::run(client, args, metrics, health, Ownership::single(None), shutdown.clone()).await;
            Ok(())
        }
    };
    shutdown.cancel();
    let served = match server.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("HTTP server: {e}")),
        Err(e) => Err(format!("HTTP server task: {e}")),
    };
    elected.and(served)
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let result = match cli.command {
        Command::Crd(args) => print_crds(&args),
        Command::Local(cmd) => {
            return volt_operator::local::main(cmd, &cli.log.log_level, cli.log.log_format == LogFormat::Json);
        }
        Command::Run(args) => {
            init_logging(&cli.log);
            // Set up outside the runtime: the exporter's HTTP client blocks, on its own thread;
            // dropping the guard after the runtime flushes the last spans.
            match volt_operator::telemetry::init(args.telemetry) {
                Ok(traces) => {
                    let result = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
                        Ok(rt) => rt.block_on(run(*args)),
                        Err(e) => Err(format!("starting the runtime: {e}")),
                    };
                    drop(traces);
                    result
                }
                Err(e) => Err(format!("traces (--telemetry, OTEL_EXPORTER_OTLP_*): {e}")),
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;
    use serde_json::Value as Json;
    use volt_operator::local::{LocalCommand, OutputFormat};

    #[test]
    fn the_subcommands_parse() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "volt-operator",
            "local",
            "run",
            "a.yaml",
            "dir",
            "-p",
            "who=x",
            "--param",
            "n:=3",
            "-w",
            "-o",
            "json",
        ])
        .expect("parses");
        let Command::Local(LocalCommand::Run(args)) = cli.command else { panic!("local run expected") };
        assert_eq!(args.files.len(), 2);
        assert_eq!(args.params, vec![("who".into(), Json::from("x")), ("n".into(), Json::from(3))]);
        assert!(args.watch && args.output == OutputFormat::Json);
        let err = Cli::try_parse_from(["volt-operator", "local", "run"]).expect_err("files are required");
        assert!(err.to_string().contains("<FILE>"), "{err}");
        let err = Cli::try_parse_from(["volt-operator", "local", "run", "f", "-p", "x"]).expect_err("bad param");
        assert!(err.to_string().contains("NAME=VALUE"), "{err}");
    }
}
