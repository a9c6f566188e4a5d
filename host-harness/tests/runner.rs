//! The `host-harness run` command as operators and CI use it: exit codes and the account of
//! what differed. Needs the filters built (`cargo wasm`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn run(args: &[&str]) -> (Output, String) {
    let root = workspace();
    let example = root.join("target/wasm32-wasip1/release/example.wasm");
    assert!(
        example.exists(),
        "{} is missing: build the filters first with `cargo wasm`",
        example.display()
    );
    let out = Command::new(env!("CARGO_BIN_EXE_host-harness"))
        .args(args)
        .current_dir(&root)
        .output()
        .expect("host-harness runs");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out, text)
}

fn scenario_files(dir: &str) -> Vec<String> {
    let mut files: Vec<String> = std::fs::read_dir(workspace().join(dir))
        .expect("scenario dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .map(|p| p.display().to_string())
        .collect();
    files.sort();
    files
}

#[test]
fn every_shipped_scenario_passes() {
    let files = scenario_files("tests/scenarios");
    assert!(
        files.len() >= 3,
        "expected the seed scenarios, found {files:?}"
    );
    let mut args = vec!["run"];
    args.extend(files.iter().map(String::as_str));
    let (out, text) = run(&args);
    assert!(out.status.success(), "scenarios failed:\n{text}");
    assert!(!text.contains("FAIL"), "{text}");
    assert!(text.trim_end().ends_with(" passed, 0 failed"), "{text}");
}

#[test]
fn a_wrong_expectation_fails_with_a_readable_difference() {
    let (out, text) = run(&["run", "tests/scenarios-failing/wrong-expectation.toml"]);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("FAIL expects a token-less request to be allowed"),
        "{text}"
    );
    assert!(text.contains("expected status 200, got 401"), "{text}");
    assert!(
        text.contains("expected the request to reach the upstream; it did not"),
        "{text}"
    );
    assert!(text.contains("1 passed, 1 failed"), "{text}");
}

#[test]
fn a_malformed_scenario_is_a_failure_that_names_the_problem() {
    let dir = std::env::temp_dir().join(format!("harness-runner-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("typo.toml");
    std::fs::write(
        &file,
        "name = \"typo\"\n[[step]]\nname = \"x\"\n[step.expect]\nstatuss = 200\n",
    )
    .unwrap();
    let (out, text) = run(&["run", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("unknown field `statuss`"), "{text}");

    let missing_wasm = dir.join("missing.toml");
    std::fs::write(
        &missing_wasm,
        "name = \"m\"\n[[filter]]\nname = \"f\"\nwasm = \"no-such-filter.wasm\"\n",
    )
    .unwrap();
    let (out, text) = run(&["run", missing_wasm.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("no-such-filter.wasm"), "{text}");
}

#[test]
fn usage_errors_exit_2() {
    let (out, text) = run(&[]);
    assert_eq!(out.status.code(), Some(2), "{text}");
    let (out, text) = run(&["run"]);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(text.contains("no scenario files"), "{text}");
}
