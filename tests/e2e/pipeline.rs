//! The development pipeline of `manifests/examples/` (its Workflows and Agents, as shipped) run
//! to completion: OpenAI-compatible stub servers stand in for the models (the reviewer asks for
//! changes twice and approves in the third round), the child testing run's pods run on the
//! stand-in kubelet, a person signs off by patching the run, and the release webhook and health
//! check are local servers.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::routing::{get, post};
use serde_json::{Value, json};
use volt_operator::api::{RunPhase, StepPhase};

use crate::kit::openai::{Reply, Stub};
use crate::kit::{self, Env, Kubelet, Operator, kubectl, step, wait_for};

const LONG: Duration = Duration::from_secs(180);

fn docs(path: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR"))).expect("read the example");
    serde_saphyr::from_multiple(&text).expect("the example parses")
}

#[tokio::test]
async fn the_development_pipeline_loops_until_the_reviewer_approves_runs_its_tests_as_a_child_and_deploys_when_signed_off()
 {
    let e = Env::new("pipeline").await;
    let _op = Operator::start_with_chart_rights(&e.client, &e.ns).await;
    let _kubelet = Kubelet::start(
        e.client.clone(),
        &e.ns,
        Some("volt.dev/run".into()),
        kit::kubelet::scripted(|_| Duration::from_millis(200)),
    );

    // The example's Agents, each pointed at a stub model server instead of its endpoint,
    // replicas or Deployment.
    let mut stubs = Vec::new();
    for mut agent in docs("manifests/examples/agents.yaml") {
        let name = agent["metadata"]["name"].as_str().expect("a name").to_string();
        let stub = Stub::start(&name, Duration::from_millis(5)).await;
        let spec = agent["spec"].as_object_mut().expect("spec");
        for key in ["endpoint", "replicas", "deployment", "apiKeySecretRef"] {
            spec.remove(key);
        }
        spec.insert("endpoint".into(), json!({"baseUrl": stub.base_url()}));
        e.apply(agent).await;
        stubs.push((name, stub));
    }
    let stub = |name: &str| &stubs.iter().find(|(n, _)| n == name).expect("the example has this Agent").1;
    stub("planner").always(Reply::Content(
        r#"{"tasks": [{"id": "api", "title": "REST API", "priority": 2}, {"id": "auth", "title": "JWT", "priority": 1}]}"#
            .into(),
    ));
    stub("reviewer").script([
        Reply::Content("Missing tests.\nVERDICT: changes-requested: add tests for auth".into()),
        Reply::Content("Better.\nVERDICT: changes-requested: document the API".into()),
        Reply::Content("Looks good.\nVERDICT: approve".into()),
    ]);
    for wf in ["manifests/examples/testing.yaml", "manifests/examples/development-pipeline.yaml"] {
        for doc in docs(wf) {
            e.apply(doc).await;
        }
    }

    // The release webhook and the health check.
    let releases = Arc::new(Mutex::new(Vec::<Value>::new()));
    let seen = releases.clone();
    let app = axum::Router::new()
        .route(
            "/releases",
            post(move |axum::Json(body): axum::Json<Value>| {
                let seen = seen.clone();
                async move {
                    seen.lock().unwrap_or_else(|p| p.into_inner()).push(body);
                    (axum::http::StatusCode::CREATED, "released")
                }
            }),
        )
        .route("/healthz", get(|| async { axum::Json(json!({"healthy": true})) }));
    let addr = kit::serve(app).await;

    let mut run = docs("manifests/examples/runs/development-pipeline.yaml").remove(0);
    run["metadata"] = json!({"name": "dev-1"});
    run["spec"]["params"]["deployUrl"] = json!(format!("http://{addr}/releases"));
    run["spec"]["params"]["healthUrl"] = json!(format!("http://{addr}/healthz"));
    e.apply(run).await;

    let r = wait_for(&e.runs, "dev-1", LONG, |r| {
        r.status.as_ref().is_some_and(|s| {
            s.phase.is_finished() || s.steps.get("sign-off").is_some_and(|x| x.phase == StepPhase::Waiting)
        })
    })
    .await;
    let s = r.status.unwrap_or_default();
    assert_eq!(s.phase, RunPhase::Running, "{s:#?}");
    assert_eq!(step(&s, "code-review").iterations, Some(3), "approved in the third round");
    for round in 1..=3 {
        assert_eq!(step(&s, &format!("code-review.{round}.implement[1]")).phase, StepPhase::Succeeded);
    }
    assert!(step(&s, "code-review").output.as_deref().is_some_and(|o| o.ends_with("VERDICT: approve")));
    // The coder saw the reviewer's previous answer from the second round on.
    let coder_prompts: Vec<String> = stub("coder").seen().into_iter().map(|r| r.user).collect();
    assert_eq!(coder_prompts.len(), 6, "two tasks, three rounds: {coder_prompts:#?}");
    assert!(coder_prompts.iter().any(|p| p.contains("add tests for auth")), "{coder_prompts:#?}");
    assert!(coder_prompts.iter().any(|p| p.contains("document the API")), "{coder_prompts:#?}");
    // The tests ran as a child run, three toolchains as pods.
    assert_eq!(step(&s, "test").object.as_deref(), Some("WorkflowRun.v1alpha1.volt.dev/dev-1-test-1"));
    assert_eq!(step(&s, "test").output.as_deref(), Some("tests on 3 toolchains: Succeeded"));
    let child = e.finished("dev-1-test-1", LONG).await;
    assert_eq!(step(&child, "run[2]").phase, StepPhase::Succeeded);
    assert_eq!(step(&child, "explain").phase, StepPhase::Skipped);
    assert!(step(&s, "sign-off").message.contains("3 review round(s); tests on 3 toolchains"), "{s:#?}");
    assert!(releases.lock().unwrap_or_else(|p| p.into_inner()).is_empty(), "nothing deployed before the sign-off");

    let patch = r#"{"spec":{"decisions":{"sign-off":{"decision":"Approve","comment":"ship it","by":"ada"}}}}"#;
    let ran = kubectl(&["patch", "wfr", "dev-1", "-n", &e.ns, "--type", "merge", "-p", patch]);
    assert!(ran.ok, "{}", ran.stderr);
    let s = e.finished("dev-1", LONG).await;
    assert_eq!(s.phase, RunPhase::Succeeded, "{s:#?}");
    assert_eq!(
        s.output.as_deref(),
        Some("3 review round(s); tests on 3 toolchains: Succeeded; signed off: ship it; deployed: Succeeded")
    );
    let released = releases.lock().unwrap_or_else(|p| p.into_inner()).clone();
    assert_eq!(released, [json!({"run": "dev-1", "repository": "https://git.example/acme/service.git"})]);
    assert_eq!(step(&s, "report").output.as_deref(), Some("dev-1: Succeeded"));
}
