//! Running Workflows: the example pipeline and the cache, output formats, failures and
//! `finally`, fan-outs, Ctrl-C.

use super::*;

#[test]
fn the_example_pipeline_succeeds_and_a_second_run_hits_the_cache() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let example = repo("examples/local/pipeline.yaml").display().to_string();

    let first = volt(tmp.path(), &["local", "run", &example, "--output", "json"]);
    assert_eq!(first.code, 0, "stderr:\n{}", first.stderr);
    let status = first.json();
    assert_eq!(status["phase"], "Succeeded", "{status:#}");
    assert_eq!(status["progress"], "6/6");
    let steps = &status["steps"];
    assert_eq!(steps["plan"]["output"], r#"["api","engine","executors","local"]"#);
    assert_eq!(steps["build"]["items"], 4);
    assert_eq!(steps["test"]["output"], "4 artifacts tested");
    assert_eq!(steps["describe"]["phase"], "Skipped");
    assert_eq!(steps["report"]["output"], "run local-demo-local Succeeded");
    assert!(steps["build[0]"]["message"].as_str().is_some_and(|m| m.contains("image alpine:3.20 not used")));
    assert_eq!(steps["build"]["cached"], Json::Null, "nothing cached on the first run");
    assert!(
        status["conditions"]
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"))
    );
    let cache_dir = tmp.path().join("volt-operator/local-cache");
    let entries = std::fs::read_dir(&cache_dir).map(|d| d.count()).unwrap_or(0);
    assert_eq!(entries, 5, "four build items and the test step are cached in {}", cache_dir.display());

    let second = volt(tmp.path(), &["local", "run", &example, "--output", "json"]);
    assert_eq!(second.code, 0, "stderr:\n{}", second.stderr);
    let again = second.json();
    for key in ["build", "build[0]", "build[3]", "test"] {
        assert_eq!(again["steps"][key]["cached"], true, "{key} comes from the cache: {again:#}");
    }
    assert_eq!(again["steps"]["notes"]["output"], steps["notes"]["output"]);
    // The first run sleeps through its container steps (about 3 s); the second runs none.
    assert!(second.took < first.took, "second {:?} vs first {:?}", second.took, first.took);
    assert!(first.took >= Duration::from_secs(2), "the first run runs its steps: {:?}", first.took);
    eprintln!("example pipeline: first run {:?}, second run (cache hits) {:?}", first.took, second.took);
}

#[test]
fn text_output_has_a_summary_table_and_plain_lines_without_a_terminal() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = write(
        tmp.path(),
        "hello.yaml",
        &format!(
            "{WORKFLOW}metadata: {{name: hello}}\nspec:\n  params: [{{name: who, default: world}}]\n  steps:\n  \
             - {{id: greet, template: 'Hello, {{{{ params.who }}}}'}}\n  \
             - id: shout\n    dependsOn: [greet]\n    container: {{image: busybox, command: [sh, -c, 'echo \"{{{{ steps.greet.output }}}}!\" > /dev/termination-log']}}\n"
        ),
    );
    let run = volt(tmp.path(), &["local", "run", &file, "--param", "who=you"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stdout.starts_with("STEP"), "{}", run.stdout);
    assert!(run.stdout.lines().any(|l| l.starts_with("shout") && l.contains("Succeeded")), "{}", run.stdout);
    assert!(run.stdout.contains("output: Hello, you!"), "{}", run.stdout);
    assert!(run.stdout.contains("run hello-local Succeeded"), "{}", run.stdout);
    assert!(run.stdout.contains("container steps (shout) ran as local processes; their images were not used"));
    assert!(run.stderr.contains("greet") && run.stderr.contains("Succeeded"), "plain lines on stderr: {}", run.stderr);
}

#[test]
fn a_failing_step_fails_the_run_with_exit_code_1_and_finally_still_runs() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = write(
        tmp.path(),
        "fail.yaml",
        &format!(
            "{WORKFLOW}metadata: {{name: broken}}\nspec:\n  steps:\n  - id: flaky\n    retry: {{limit: 1, backoff: {{initialSeconds: 0.1}}}}\n    \
             container: {{image: busybox, command: [sh, -c, 'echo disk full >&2; exit 7']}}\n  \
             - {{id: after, dependsOn: [flaky], template: never}}\n  \
             - {{id: image-only, container: {{image: busybox}}, continueOnError: true}}\n  \
             finally:\n  - {{id: report, template: '{{{{ run.phase }}}}'}}\n"
        ),
    );
    let run = volt(tmp.path(), &["local", "run", &file, "-o", "json"]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    let status = run.json();
    assert_eq!(status["phase"], "Failed");
    let flaky = &status["steps"]["flaky"];
    assert_eq!(flaky["attempts"], 2);
    let msg = flaky["message"].as_str().unwrap_or_default();
    assert!(msg.contains("exited with code 7") && msg.contains("disk full"), "{msg}");
    assert_eq!(status["steps"]["after"]["phase"], "Skipped");
    let image_only = status["steps"]["image-only"]["message"].as_str().unwrap_or_default();
    assert!(image_only.contains("local mode cannot run images"), "{image_only}");
    assert_eq!(status["steps"]["report"]["output"], "Failed");
}

/// By default local mode runs a fan-out as wide as its `maxParallel`: twelve processes wait
/// for each other at a barrier, which a cap below twelve would never let them reach. A step id
/// with a hyphen is read as `steps['fan-out']`.
#[test]
fn a_fan_out_runs_max_parallel_items_at_once_and_hyphenated_ids_are_read_by_subscript() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let barrier = tmp.path().join("barrier");
    std::fs::create_dir_all(&barrier).expect("barrier dir");
    let wait = format!(
        "touch {dir}/$VOLT_STEP_KEY; for i in $(seq 150); do [ $(ls {dir} | wc -l) -ge 12 ] && \\
         {{ printf ok > /dev/termination-log; exit 0; }}; sleep 0.1; done; exit 1",
        dir = barrier.display()
    );
    let file = write(
        tmp.path(),
        "wide.yaml",
        &format!(
            "{WORKFLOW}metadata: {{name: wide}}\nspec:\n  steps:\n  - id: fan-out\n    forEach: '{{{{ range(12) | list }}}}'\n    \
             maxParallel: 12\n    container: {{image: busybox, command: [sh, -c, {wait:?}]}}\n  \
             - {{id: count, dependsOn: [fan-out], template: \"{{{{ steps['fan-out'].json | length }}}} {{{{ steps['fan-out'].phase }}}}\"}}\n"
        ),
    );
    let run = volt(tmp.path(), &["local", "run", &file, "-o", "json", "--no-cache"]);
    assert_eq!(run.code, 0, "{}\n{}", run.stderr, run.stdout);
    let status = run.json();
    assert_eq!(status["steps"]["count"]["output"], "12 Succeeded");
    assert_eq!(std::fs::read_dir(&barrier).expect("barrier").count(), 12);
}

#[cfg(unix)]
#[test]
fn ctrl_c_cancels_the_run_and_finally_steps_still_run() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let started = tmp.path().join("started");
    let marker = tmp.path().join("still-running");
    let file = write(
        tmp.path(),
        "slow.yaml",
        &format!(
            "{WORKFLOW}metadata: {{name: slow}}\nspec:\n  steps:\n  - id: wait\n    \
             container: {{image: x, command: [sh, -c, 'touch {}; sleep 2; touch {}; sleep 30']}}\n  \
             finally:\n  - {{id: report, template: '{{{{ run.phase }}}}'}}\n",
            started.display(),
            marker.display()
        ),
    );
    let child = Command::new(operator_bin())
        .args(["local", "run", &file, "-o", "json"])
        .env("XDG_CACHE_HOME", tmp.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starts");
    let waiting = Instant::now();
    while !started.exists() && waiting.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = i32::try_from(child.id()).expect("pid");
    // SAFETY: signals the child process this test started.
    unsafe {
        libc::kill(pid, libc::SIGINT);
    }
    let out = child.wait_with_output().expect("exits");
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let status: Json = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(status["phase"], "Cancelled");
    assert_eq!(status["steps"]["wait"]["phase"], "Cancelled");
    assert_eq!(status["steps"]["report"]["output"], "Cancelled");
    std::thread::sleep(Duration::from_millis(2000));
    assert!(!marker.exists(), "the step's process was killed");
}
