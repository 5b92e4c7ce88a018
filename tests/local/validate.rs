//! `local validate` and what `local run` refuses: bad files, runs and parameters.

use super::*;

#[test]
fn invalid_files_exit_2_naming_file_object_step_and_field() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = write(
        tmp.path(),
        "bad.yaml",
        &format!(
            "{WORKFLOW}metadata: {{name: bad}}\nspec:\n  steps:\n  - {{id: a, template: x}}\n  \
             - {{id: b, dependsOn: [a, nope], template: why}}\n  - {{id: c, template: z, retry: {{limit: 1000}}}}\n  \
             - {{id: d, dependOn: [a], template: w}}\n"
        ),
    );
    for cmd in ["validate", "run"] {
        let run = volt(tmp.path(), &["local", cmd, &file]);
        assert_eq!(run.code, 2, "{cmd}: {}", run.stderr);
        let want = format!(
            "error: {file}: Workflow/bad: step \"c\": spec.steps[2].retry.limit: 1000 is more than the maximum 100"
        );
        assert!(run.stderr.contains(&want), "{cmd}: {}", run.stderr);
        let want = format!(
            "error: {file}: Workflow/bad: step \"d\": spec.steps[3].dependOn: unknown field; did you mean \"dependsOn\"?"
        );
        assert!(run.stderr.contains(&want), "{cmd}: {}", run.stderr);
    }
    // Once the schema is right, the controller's DAG checks speak.
    let file = write(
        tmp.path(),
        "dag.yaml",
        &format!(
            "{WORKFLOW}metadata: {{name: dag}}\nspec:\n  steps:\n  - {{id: a, template: x}}\n  - {{id: b, dependsOn: [a, nope], template: why}}\n"
        ),
    );
    let run = volt(tmp.path(), &["local", "validate", &file]);
    assert_eq!(run.code, 2);
    let want = format!("error: {file}: Workflow/dag: step \"b\": spec.steps[1].dependsOn: unknown step \"nope\"");
    assert!(run.stderr.contains(&want), "{}", run.stderr);
}

#[test]
fn validate_accepts_the_examples_and_checks_runs_and_params() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let run = volt(tmp.path(), &["local", "validate", "examples/local", "examples/spec"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stdout.starts_with("valid: 5 files: 3 Agents, 2 Workflows, 1 WorkflowRun (1 warning)"),
        "{}",
        run.stdout
    );
    // The schedule of examples/spec is checked against its type, and said to act in a cluster only.
    assert!(
        run.stderr.contains("WorkflowSchedule/nightly-pipeline: WorkflowSchedule is checked here"),
        "{}",
        run.stderr
    );

    let file = write(
        tmp.path(),
        "run.yaml",
        "apiVersion: volt.dev/v1alpha1\nkind: WorkflowRun\nmetadata: {generateName: dev-}\n\
         spec: {workflowRef: {name: development-pipeline}, params: {technology: Go}}\n",
    );
    let spec_wf = repo("examples/spec/workflow.yaml").display().to_string();
    let run = volt(tmp.path(), &["local", "validate", &spec_wf, &file]);
    assert_eq!(run.code, 2);
    let want = format!("error: {file}: WorkflowRun/dev-*: spec.params: required parameter \"requirements\" is missing");
    assert!(run.stderr.contains(&want), "{}", run.stderr);

    // Missing parameters on the command line are invalid input too.
    let run = volt(tmp.path(), &["local", "run", &spec_wf, "--param", "technology=Go"]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(run.stderr.contains("required parameter \"requirements\" is missing"), "{}", run.stderr);
}

#[test]
fn multi_document_files_with_a_run_and_json_params() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = write(
        tmp.path(),
        "all.yaml",
        &format!(
            "{WORKFLOW}metadata: {{name: fan}}\nspec:\n  params: [{{name: items, required: true}}]\n  steps:\n  \
             - id: each\n    forEach: '{{{{ params.items }}}}'\n    container: {{image: x, command: [sh, -c, 'printf %s $(( {{{{ item }}}} * 2 )) > $VOLT_TERMINATION_LOG']}}\n  \
             - {{id: sum, dependsOn: [each], template: \"{{{{ steps.each.json | map('int') | sum }}}}\"}}\n---\n\
             apiVersion: volt.dev/v1alpha1\nkind: WorkflowRun\nmetadata: {{name: fan-1, namespace: team}}\n\
             spec: {{workflowRef: {{name: fan}}, params: {{items: [1, 2]}}}}\n"
        ),
    );
    let run = volt(tmp.path(), &["local", "run", &file, "-o", "json"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(run.json()["steps"]["sum"]["output"], "6");
    let run = volt(tmp.path(), &["local", "run", &file, "-o", "json", "--param", "items:=[1,2,3,4]"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let status = run.json();
    assert_eq!(status["steps"]["sum"]["output"], "20");
    assert_eq!(status["steps"]["each"]["items"], 4);
    assert_eq!(status["workflowName"], "fan");
}
