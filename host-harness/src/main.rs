//! `host-harness run FILE...`: runs scenario files against the same .wasm Envoy loads, prints
//! one line per step and exits 0 only if every expectation held.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use host_harness::scenario::{print_report, run_file, RunOptions};
use host_harness::Runtime;

const USAGE: &str = "usage: host-harness run [--wasm-dir DIR] [--verbose] FILE...

Runs scenario files (TOML, see tests/scenarios/README.md). Prints PASS or FAIL per step and,
on failure, what differed; exits 0 only if every expectation held.

  --wasm-dir DIR  where bare .wasm names are looked up
                  (default: $HOST_HARNESS_WASM_DIR or target/wasm32-wasip1/release)
  --verbose       echo the filters' log lines
  --outcomes FILE write what each step's request got (status, reached the upstream, NGSI
                  error) as JSON, for comparing with the same requests through Envoy";

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    match args.next().as_deref() {
        Some("run") => {}
        Some("-h") | Some("--help") => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    }
    let mut wasm_dir = std::env::var_os("HOST_HARNESS_WASM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/wasm32-wasip1/release"));
    let mut echo_logs = false;
    let mut outcomes_file = None;
    let mut files = Vec::new();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--wasm-dir" => match args.next() {
                Some(dir) => wasm_dir = PathBuf::from(dir),
                None => {
                    eprintln!("--wasm-dir needs a directory\n\n{USAGE}");
                    return ExitCode::from(2);
                }
            },
            "--verbose" | "-v" => echo_logs = true,
            "--outcomes" => match args.next() {
                Some(file) => outcomes_file = Some(PathBuf::from(file)),
                None => {
                    eprintln!("--outcomes needs a file\n\n{USAGE}");
                    return ExitCode::from(2);
                }
            },
            _ if arg.starts_with('-') => {
                eprintln!("unknown option {arg}\n\n{USAGE}");
                return ExitCode::from(2);
            }
            _ => files.push(PathBuf::from(arg)),
        }
    }
    // Scenario directories may hold notes (README.md) beside the scenarios.
    files.retain(|f| f.extension().is_some_and(|e| e == "toml"));
    if files.is_empty() {
        eprintln!("no scenario files (*.toml) given\n\n{USAGE}");
        return ExitCode::from(2);
    }
    let runtime = match Runtime::new() {
        Ok(r) => Arc::new(r),
        Err(e) => {
            eprintln!("cannot start the wasm runtime: {e:#}");
            return ExitCode::from(2);
        }
    };
    let options = RunOptions {
        wasm_dir,
        echo_logs,
    };
    let (mut passed, mut failed) = (0, 0);
    let mut out = std::io::stdout();
    let mut outcomes = Vec::new();
    for file in &files {
        let report = run_file(&runtime, file, &options);
        let (p, f) = print_report(&report, &mut out);
        passed += p;
        failed += f;
        for step in &report.steps {
            if let Some(request) = &step.request {
                outcomes.push(serde_json::json!({
                    "file": file.display().to_string(),
                    "step": step.name,
                    "outcome": request,
                }));
            }
        }
    }
    if let Some(path) = outcomes_file {
        let text = serde_json::to_string_pretty(&outcomes).unwrap_or_default();
        if let Err(e) = std::fs::write(&path, text) {
            eprintln!("cannot write {}: {e}", path.display());
            return ExitCode::from(2);
        }
    }
    println!("{passed} passed, {failed} failed");
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
