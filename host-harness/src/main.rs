//! `host-harness run FILE...`: runs scenario files against the same .wasm Envoy loads, prints
//! one line per step and exits 0 only if every expectation held.
//! `host-harness validate FILTER.wasm CONFIG.json`: does the filter accept that configuration?

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use host_harness::scenario::{print_report, run_file, RunOptions};
use host_harness::validate::validate;
use host_harness::Runtime;

const USAGE: &str = "usage: host-harness run [--wasm-dir DIR] [--verbose] [--outcomes FILE] FILE...
       host-harness validate [--name NAME] [--root-id ID] [--cluster NAME]... FILTER.wasm CONFIG.json
       host-harness --version | --help

Runs Proxy-Wasm filters (the same .wasm Envoy loads) outside Envoy, with Envoy's semantics.
`host-harness run --help` and `host-harness validate --help` describe each command.";

const RUN_USAGE: &str =
    "usage: host-harness run [--wasm-dir DIR] [--verbose] [--outcomes FILE] FILE...

Runs scenario files (TOML, see tests/scenarios/README.md). Prints PASS or FAIL per step and,
on failure, what differed; exits 0 only if every expectation held (1 otherwise, 2 for a usage
error). A filter that refuses its configuration fails the scenario with its reason, and the
scenario's steps are not run.

  --wasm-dir DIR  where bare .wasm names are looked up
                  (default: $HOST_HARNESS_WASM_DIR or target/wasm32-wasip1/release)
  --verbose       echo the filters' log lines
  --outcomes FILE write what each step's request got (status, reached the upstream, NGSI
                  error) as JSON, for comparing with the same requests through Envoy";

const VALIDATE_USAGE: &str = "usage: host-harness validate [--name NAME] [--root-id ID] [--cluster NAME]... FILTER.wasm CONFIG.json

Starts FILTER.wasm as Envoy starts a plugin (proxy_on_vm_start, then proxy_on_configure with
the bytes of CONFIG.json as the plugin configuration) and says whether it accepted them. Exits
0 if accepted, 1 with the filter's reason if refused, 2 for a usage error or a module that
cannot load. Nothing is sent anywhere: run it before pushing a configuration to Envoy.

  --name NAME     the plugin name (and VM id) Envoy gives the filter (default: the .wasm's
                  file name without .wasm, '_' as '-'; envoy/render.py uses e.g. token-auth)
  --root-id ID    the plugin's root_id (default: empty, as render.py sets it)
  --cluster NAME  a cluster the filter may call while starting (repeatable)
  --env NAME=VALUE  a variable of the VM's environment, as Envoy's
                  vm_config.environment_variables gives it (repeatable; render.py passes a
                  placeholder value for each host_env_keys name: what is checked is the
                  configuration, not the environment Envoy will run with)";

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    match args.next().as_deref() {
        Some("run") => run(args.collect()),
        Some("validate") => validate_command(args.collect()),
        Some("-h") | Some("--help") | Some("help") => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        Some("-V") | Some("--version") => {
            println!("host-harness {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("{USAGE}");
            ExitCode::from(2)
        }
    }
}

fn usage_error(message: &str, usage: &str) -> ExitCode {
    eprintln!("{message}\n\n{usage}");
    ExitCode::from(2)
}

fn start_runtime() -> Result<Arc<Runtime>, ExitCode> {
    Runtime::new().map(Arc::new).map_err(|e| {
        eprintln!("cannot start the wasm runtime: {e:#}");
        ExitCode::from(2)
    })
}

fn run(args: Vec<String>) -> ExitCode {
    let mut wasm_dir = std::env::var_os("HOST_HARNESS_WASM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/wasm32-wasip1/release"));
    let mut echo_logs = false;
    let mut outcomes_file = None;
    let mut files = Vec::new();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "-h" | "--help" => {
                println!("{RUN_USAGE}");
                return ExitCode::SUCCESS;
            }
            "--wasm-dir" => match args.next() {
                Some(dir) => wasm_dir = PathBuf::from(dir),
                None => return usage_error("--wasm-dir needs a directory", RUN_USAGE),
            },
            "--verbose" | "-v" => echo_logs = true,
            "--outcomes" => match args.next() {
                Some(file) => outcomes_file = Some(PathBuf::from(file)),
                None => return usage_error("--outcomes needs a file", RUN_USAGE),
            },
            _ if arg.starts_with('-') => {
                return usage_error(&format!("unknown option {arg}"), RUN_USAGE)
            }
            _ => files.push(PathBuf::from(arg)),
        }
    }
    // Scenario directories may hold notes (README.md) beside the scenarios.
    files.retain(|f| f.extension().is_some_and(|e| e == "toml"));
    if files.is_empty() {
        return usage_error("no scenario files (*.toml) given", RUN_USAGE);
    }
    let runtime = match start_runtime() {
        Ok(r) => r,
        Err(code) => return code,
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

fn validate_command(args: Vec<String>) -> ExitCode {
    let mut name = None;
    let mut root_id = String::new();
    let mut clusters = HashSet::new();
    let mut vm_env = Vec::new();
    let mut positional = Vec::new();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let mut value = |what: &str| {
            args.next()
                .ok_or_else(|| usage_error(&format!("{arg} needs {what}"), VALIDATE_USAGE))
        };
        match arg.as_str() {
            "-h" | "--help" => {
                println!("{VALIDATE_USAGE}");
                return ExitCode::SUCCESS;
            }
            "--name" => match value("a name") {
                Ok(v) => name = Some(v),
                Err(code) => return code,
            },
            "--root-id" => match value("an id") {
                Ok(v) => root_id = v,
                Err(code) => return code,
            },
            "--cluster" => match value("a cluster name") {
                Ok(v) => {
                    clusters.insert(v);
                }
                Err(code) => return code,
            },
            "--env" => match value("NAME=VALUE") {
                Ok(v) => match v.split_once('=') {
                    Some((name, value)) if !name.is_empty() => {
                        vm_env.push((name.to_string(), value.to_string()));
                    }
                    _ => return usage_error("--env needs NAME=VALUE", VALIDATE_USAGE),
                },
                Err(code) => return code,
            },
            _ if arg.starts_with('-') => {
                return usage_error(&format!("unknown option {arg}"), VALIDATE_USAGE)
            }
            _ => positional.push(PathBuf::from(arg)),
        }
    }
    let [wasm, config_file] = positional.as_slice() else {
        return usage_error("give FILTER.wasm and CONFIG.json", VALIDATE_USAGE);
    };
    let name = name.unwrap_or_else(|| {
        wasm.file_stem()
            .map(|s| s.to_string_lossy().replace('_', "-"))
            .unwrap_or_default()
    });
    // The bytes as they are: Envoy hands the plugin its configuration string unchanged.
    let configuration = match std::fs::read(config_file) {
        Ok(bytes) => bytes,
        Err(e) => {
            eprintln!("cannot read {}: {e}", config_file.display());
            return ExitCode::from(2);
        }
    };
    let runtime = match start_runtime() {
        Ok(r) => r,
        Err(code) => return code,
    };
    let validation = match validate(
        &runtime,
        wasm.clone(),
        &name,
        &root_id,
        configuration,
        clusters,
        vm_env,
    ) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("cannot load {}: {e:#}", wasm.display());
            return ExitCode::from(2);
        }
    };
    let config = config_file.display();
    let verdict = match &validation.failure {
        None => format!("ACCEPTED {config} ({name}, {})", wasm.display()),
        Some(failure) => format!("REFUSED {config} ({name}, {}): {failure}", wasm.display()),
    };
    println!("{verdict}");
    // What the filter said while starting: the reason of a refusal, warnings of an acceptance.
    for line in &validation.logs {
        println!("  [{}] {}", line.level_name(), line.message);
    }
    if validation.accepted() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
