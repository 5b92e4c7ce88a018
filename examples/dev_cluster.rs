//! A throwaway local control plane (etcd, kube-apiserver, kube-controller-manager on loopback,
//! CRDs installed), the same one the end-to-end tests use. `hack/demo.sh` runs it.
//!
//! ```sh
//! cargo run --example dev_cluster -- /tmp/kubeconfig-path   # writes the kubeconfig's path there
//! ```
//! It stops, removing its data, on Ctrl-C or SIGTERM.

#[path = "../tests/kit/mod.rs"]
mod kit;

use kit::control_plane;

fn main() {
    let cp = control_plane::shared();
    let path = cp.kubeconfig_path().display().to_string();
    println!("control plane at {}; KUBECONFIG={path}", cp.server_url());
    if let Some(out) = std::env::args().nth(1)
        && let Err(e) = std::fs::write(&out, &path)
    {
        eprintln!("cannot write {out}: {e}");
    }
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start a runtime: {e}");
            cp.shutdown();
            return;
        }
    };
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending::<()>().await } } => {},
        }
    });
    cp.shutdown();
}
