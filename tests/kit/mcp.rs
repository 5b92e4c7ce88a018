//! An MCP server for the tests: the official MCP Python SDK (PyPI `mcp`, pinned in
//! `hack/mcp-peer.sh`, installed on first use into a cached virtualenv) running
//! `hack/mcp_server.py` over streamable HTTP on a fresh loopback address. Its tools:
//! `search_docs`, `add`, `fail`, `huge`, `hang`, `whoami` (see the script). [`McpPeer::calls`]
//! gives the calls it saw and whether each carried the required header.
#![allow(dead_code)]

use std::process::Stdio;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use super::openai::next_ip;
use super::tools::repo;

/// A running MCP server; killed when dropped.
pub struct McpPeer {
    child: Child,
    url: String,
    calls: Arc<Mutex<Vec<String>>>,
    traces: Arc<Mutex<Vec<String>>>,
}

/// Installs the SDK once per test process (the script itself is idempotent and locked).
fn python() -> &'static str {
    static PYTHON: OnceLock<String> = OnceLock::new();
    PYTHON.get_or_init(|| {
        let script = repo("hack/mcp-peer.sh");
        let status = std::process::Command::new("bash").arg(&script).arg("install").status().expect("run mcp-peer.sh");
        assert!(status.success(), "hack/mcp-peer.sh install failed");
        let out = std::process::Command::new("bash").arg(&script).arg("python").output().expect("mcp-peer.sh python");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    })
}

impl McpPeer {
    /// Starts the server; with `require_header` (`("Authorization", "Bearer x")`) tool calls
    /// without that header fail.
    pub async fn start(require_header: Option<(&str, &str)>) -> McpPeer {
        let python = tokio::task::spawn_blocking(python).await.expect("install");
        for _ in 0..20 {
            let ip = next_ip();
            let port = {
                let Ok(l) = std::net::TcpListener::bind((ip, 0)) else { continue };
                l.local_addr().expect("addr").port()
            };
            let mut cmd = Command::new(python);
            cmd.arg(repo("hack/mcp_server.py"))
                .args(["--host", &ip.to_string(), "--port", &port.to_string()])
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .kill_on_drop(true);
            if let Some((k, v)) = require_header {
                cmd.arg("--require-header").arg(format!("{k}={v}"));
            }
            let mut child = cmd.spawn().expect("start the MCP server");
            let calls = Arc::new(Mutex::new(Vec::new()));
            let traces = Arc::new(Mutex::new(Vec::new()));
            let stdout = child.stdout.take().expect("stdout");
            let (seen, traced) = (calls.clone(), traces.clone());
            tokio::spawn(async move {
                let mut lines = BufReader::new(stdout).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if let Some(call) = line.strip_prefix("CALL ") {
                        seen.lock().unwrap_or_else(|p| p.into_inner()).push(call.to_string());
                    } else if let Some(trace) = line.strip_prefix("TRACE ") {
                        traced.lock().unwrap_or_else(|p| p.into_inner()).push(trace.to_string());
                    }
                }
            });
            // Ready when it accepts connections.
            for _ in 0..1200 {
                if tokio::net::TcpStream::connect((ip, port)).await.is_ok() {
                    return McpPeer { child, url: format!("http://{ip}:{port}/mcp"), calls, traces };
                }
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let _ = child.kill().await;
        }
        panic!("the MCP server did not start");
    }

    /// `http://ip:port/mcp`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Calls seen, as `<tool> auth=<ok|missing>`.
    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl McpPeer {
    /// The trace context of each call, as `<tool> <traceparent from _meta, or ->`.
    pub fn traces(&self) -> Vec<String> {
        self.traces.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for McpPeer {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}
