//! Control flow in local mode: loops, waits, approvals, the run's output, child runs.

use super::*;

const CONTROL_FLOW: &str = r#"apiVersion: volt.dev/v1alpha1
kind: Workflow
metadata: {name: flow}
spec:
  params:
  - {name: target, default: "3"}
  output: "{{ steps.rounds.output }} after {{ steps.rounds.iterations }} rounds, signed off: {{ steps['sign-off'].output }}"
  steps:
  - id: rounds
    loop:
      maxIterations: 5
      until: "steps.review.output == params.target"
      steps:
      - id: code
        container:
          image: alpine:3.20
          command: [sh, -c, "printf 'draft %s' {{ loop.iteration }} > /dev/termination-log"]
      - id: review
        dependsOn: [code]
        template: "{{ loop.iteration }}"
  - id: cool-down
    dependsOn: [rounds]
    wait: {seconds: 1}
  - id: sign-off
    dependsOn: [cool-down]
    approval: {message: "Ship {{ steps.rounds.output }}?", timeoutSeconds: 600}
"#;

#[test]
fn loops_waits_approvals_and_the_run_output_work_in_local_mode() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = write(tmp.path(), "flow.yaml", CONTROL_FLOW);
    let run = volt(tmp.path(), &["local", "run", &file, "--output", "json", "--approve", "sign-off=lgtm"]);
    assert_eq!(run.code, 0, "stderr:\n{}", run.stderr);
    let status = run.json();
    assert_eq!(status["phase"], "Succeeded", "{status:#}");
    let steps = &status["steps"];
    assert_eq!(steps["rounds"]["iterations"], 3);
    assert_eq!(steps["rounds.2.code"]["phase"], "Succeeded");
    assert_eq!(steps["rounds.3.review"]["output"], "3");
    assert_eq!(steps["sign-off"]["output"], "lgtm");
    assert_eq!(steps["sign-off"]["message"].as_str().map(|m| m.starts_with("approved by")), Some(true));
    assert_eq!(status["output"], "3 after 3 rounds, signed off: lgtm");
    assert!(run.took >= Duration::from_secs(1), "the wait waited");

    // Rejected on the command line: the run fails at the sign-off.
    let run = volt(tmp.path(), &["local", "run", &file, "--output", "json", "--reject", "sign-off=not now"]);
    assert_eq!(run.code, 1, "stderr:\n{}", run.stderr);
    let status = run.json();
    assert!(status["steps"]["sign-off"]["message"].as_str().is_some_and(|m| m.ends_with(": not now")), "{status:#}");

    // A decision for a step that is not an approval is refused before anything runs.
    let run = volt(tmp.path(), &["local", "run", &file, "--approve", "rounds"]);
    assert_eq!(run.code, 2, "stderr:\n{}", run.stderr);
    assert!(run.stderr.contains("--approve rounds") && run.stderr.contains("not an approval step"), "{}", run.stderr);
}

#[test]
fn local_validate_names_the_step_and_field_of_bad_control_flow() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let bad =
        CONTROL_FLOW.replace("until: \"steps.review.output == params.target\"", "until: \"steps.sign-off.output\"");
    let file = write(tmp.path(), "bad.yaml", &bad);
    let run = volt(tmp.path(), &["local", "validate", &file]);
    assert_eq!(run.code, 2, "stdout:\n{}\nstderr:\n{}", run.stdout, run.stderr);
    let all = format!("{}{}", run.stdout, run.stderr);
    assert!(all.contains("spec.steps[0].loop.until") && all.contains("not a step of the loop"), "{all}");
    let file = write(tmp.path(), "bad2.yaml", &CONTROL_FLOW.replace("      maxIterations: 5\n", ""));
    let run = volt(tmp.path(), &["local", "validate", &file]);
    let all = format!("{}{}", run.stdout, run.stderr);
    assert_eq!(run.code, 2, "{all}");
    assert!(all.contains("maxIterations"), "{all}");
}

const CHILDREN: &str = r#"
apiVersion: volt.dev/v1alpha1
kind: Workflow
metadata: {name: release}
spec:
  params: [{name: version}]
  output: "{{ steps.notes.output }} / {{ steps.each.output }}"
  steps:
  - id: build
    template: "build-{{ params.version }}"
  - id: notes
    dependsOn: [build]
    workflow: {ref: testing, params: {target: "{{ steps.build.output }}", rounds: 2}}
  - id: each
    forEach: '["a", "b"]'
    workflow: {ref: testing, params: {target: "{{ item }}"}}
---
apiVersion: volt.dev/v1alpha1
kind: Workflow
metadata: {name: testing}
spec:
  params: [{name: target}, {name: rounds, default: 1}]
  output: "tested {{ params.target }} x{{ params.rounds }}"
  steps:
  - id: test
    template: "ok"
---
apiVersion: volt.dev/v1alpha1
kind: Workflow
metadata: {name: ping}
spec:
  steps:
  - id: call
    workflow: {ref: pong}
---
apiVersion: volt.dev/v1alpha1
kind: Workflow
metadata: {name: pong}
spec:
  steps:
  - id: call
    workflow: {ref: ping}
---
apiVersion: volt.dev/v1alpha1
kind: Workflow
metadata: {name: lost}
spec:
  steps:
  - id: call
    workflow: {ref: nowhere}
"#;

#[test]
fn workflow_steps_run_child_runs_in_process_and_cycles_and_missing_workflows_fail_naming_the_chain() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = write(tmp.path(), "children.yaml", CHILDREN);
    let run =
        volt(tmp.path(), &["local", "run", &file, "--workflow", "release", "--param", "version=7", "--output", "json"]);
    assert_eq!(run.code, 0, "stderr:\n{}", run.stderr);
    let status = run.json();
    assert_eq!(status["phase"], "Succeeded", "{status:#}");
    assert_eq!(status["steps"]["notes"]["output"], "tested build-7 x2");
    assert_eq!(status["steps"]["each[1]"]["output"], "tested b x1");
    assert_eq!(
        status["output"], "tested build-7 x2 / [\"tested a x1\",\"tested b x1\"]",
        "a fan-out of child runs gathers their outputs"
    );

    // ping -> pong -> ping: the second ping is refused, naming the chain.
    let run = volt(tmp.path(), &["local", "run", &file, "--workflow", "ping", "--output", "json"]);
    assert_eq!(run.code, 1, "stderr:\n{}", run.stderr);
    let status = run.json();
    let message = status["steps"]["call"]["message"].as_str().unwrap_or_default().to_string();
    assert!(message.contains("cycle") && message.contains("ping -> pong -> ping"), "{status:#}");

    let run = volt(tmp.path(), &["local", "run", &file, "--workflow", "lost", "--output", "json"]);
    assert_eq!(run.code, 1, "stderr:\n{}", run.stderr);
    let message = run.json()["steps"]["call"]["message"].as_str().unwrap_or_default().to_string();
    assert!(
        message.contains("workflow.ref") && message.contains("\"nowhere\"") && message.contains("lost -> nowhere"),
        "{message}"
    );
}
