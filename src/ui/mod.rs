//! The web view of runs, at `/ui` on the operator's HTTP port (with `--ui`, `ui.enabled` in the
//! chart): the runs of the namespaces the caller may list, a run's DAG as a picture coloured
//! by phase and updated live (server-sent events), a step's output, transcript, pod log and
//! timings, and approve/reject buttons for waiting approvals.
//!
//! - [`store`]: the runs, from one shared watch per scope.
//! - [`graph`]: the picture's nodes and their states (pure).
//! - [`api`]: the JSON endpoints under `/ui/api`, each checked with [`crate::auth`].
//! - [`sse`]: the live stream of a run's node states.
//!
//! The page itself (`/ui`) and its assets hold no data and are served to anyone: without a
//! token the page is a login form. The assets are hand-written, embedded in the binary and
//! served under a versioned path (cached for good by browsers); nothing is fetched from the
//! network at run time.

pub mod api;
pub mod graph;
pub mod sse;
pub mod store;

use std::sync::{Arc, LazyLock};

use axum::Router;
use axum::http::header;
use axum::response::{Html, IntoResponse};
use axum::routing::{get, post};
use kube::Client;

use crate::controllers::Health;
pub use store::RunStore;

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");

/// The assets' version, in their paths: the crate version and a hash of their contents.
pub static ASSETS_VERSION: LazyLock<String> = LazyLock::new(|| {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest([INDEX_HTML, APP_JS, APP_CSS].concat().as_bytes());
    format!("{}-{}", env!("CARGO_PKG_VERSION"), hex::encode(&digest[..4]))
});

/// What the web view's handlers share.
#[derive(Clone)]
pub struct Ui {
    pub health: Arc<Health>,
    pub runs: Arc<RunStore>,
    /// The operator's client: step outputs, transcripts and logs are read with it (after a
    /// SubjectAccessReview of the caller), decisions written with it (recording the caller).
    pub client: Client,
}

/// The `/ui` routes.
pub fn router(ui: Ui) -> Router {
    Router::new()
        .route("/ui", get(index))
        .route("/ui/", get(index))
        .route("/ui/assets/{version}/{file}", get(asset))
        .route("/ui/api/whoami", get(api::whoami))
        .route("/ui/api/runs", get(api::runs))
        .route("/ui/api/runs/{namespace}/{name}", get(api::run))
        .route("/ui/api/runs/{namespace}/{name}/stream", get(sse::stream))
        .route("/ui/api/runs/{namespace}/{name}/steps/{key}", get(api::step))
        .route("/ui/api/runs/{namespace}/{name}/decisions", post(api::decide))
        .with_state(ui)
}

async fn index() -> impl IntoResponse {
    (
        [(header::CACHE_CONTROL, "no-cache"), (header::CONTENT_SECURITY_POLICY, CSP)],
        Html(INDEX_HTML.replace("{{VERSION}}", &ASSETS_VERSION)),
    )
}

/// Scripts and styles only from this origin; no frames.
const CSP: &str =
    "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

async fn asset(
    axum::extract::Path((version, file)): axum::extract::Path<(String, String)>,
) -> axum::response::Response {
    let (body, kind) = match file.as_str() {
        "app.js" => (APP_JS, "text/javascript; charset=utf-8"),
        "app.css" => (APP_CSS, "text/css; charset=utf-8"),
        _ => return axum::http::StatusCode::NOT_FOUND.into_response(),
    };
    // An old version's path still answers (a page loaded before an upgrade), but is not cached.
    let cache = if version == *ASSETS_VERSION { "public, max-age=31536000, immutable" } else { "no-cache" };
    ([(header::CONTENT_TYPE, kind), (header::CACHE_CONTROL, cache)], body).into_response()
}
