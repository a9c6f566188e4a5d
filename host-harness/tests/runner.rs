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

#[test]
fn version_and_help_are_answers_not_errors() {
    let (out, text) = run(&["--version"]);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert_eq!(
        text.trim(),
        format!("host-harness {}", env!("CARGO_PKG_VERSION"))
    );
    let (out, text) = run(&["--help"]);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("host-harness validate"), "{text}");
    let (out, text) = run(&["run", "--help"]);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("--wasm-dir DIR"), "{text}");
    let (out, text) = run(&["validate", "--help"]);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("--root-id ID"), "{text}");
}

#[test]
fn a_second_local_response_fails_the_step_and_says_so() {
    let (out, text) = run(&["run", "tests/scenarios-failing/second-local-response.toml"]);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains(
            "filter abi-probe sent a second local response (503) after 403 on the same request"
        ),
        "{text}"
    );
    assert!(text.contains("1 passed, 1 failed"), "{text}");
}

#[test]
fn a_refused_configuration_shows_the_filters_reason_and_skips_the_steps() {
    let (out, text) = run(&["run", "tests/scenarios-failing/refused-configuration.toml"]);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("filter example did not start: configuration rejected by the plugin"),
        "{text}"
    );
    // The filter's own log line, without --verbose.
    assert!(
        text.contains("example said: example: configuration rejected: empty token"),
        "{text}"
    );
    assert!(text.contains("2 steps not run"), "{text}");
    assert!(!text.contains("would get the 503"), "{text}");
    assert!(text.contains("0 passed, 1 failed"), "{text}");
}

#[test]
fn a_body_held_back_from_a_paused_filter_names_allow_on_headers_stop_iteration() {
    let (out, text) = run(&["run", "tests/scenarios-failing/body-held-back.toml"]);
    assert_eq!(out.status.code(), Some(1), "{text}");
    // The filter's body timeout answers on its tick (it used to stall: the tick's answer did
    // not reach the stream); the hint names the cause either way.
    assert!(
        text.contains("the request body did not arrive in time"),
        "{text}"
    );
    assert!(
        text.contains(
            "hint: filter entity-acl paused in its request headers and Envoy held the body back"
        ),
        "{text}"
    );
    assert!(
        text.contains("needs allow_on_headers_stop_iteration = true"),
        "{text}"
    );
}

#[test]
fn validate_accepts_a_good_configuration_and_prints_the_reason_for_a_bad_one() {
    let dir = std::env::temp_dir().join(format!("harness-validate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.json");
    std::fs::write(
        &good,
        r#"{"mode": "token_list", "tokens": {"tok": {"user": "alice"}}}"#,
    )
    .unwrap();
    let bad = dir.join("bad.json");
    std::fs::write(
        &bad,
        r#"{"mode": "token_list", "tokens": {"": {"user": "x"}}}"#,
    )
    .unwrap();
    let wasm = "target/wasm32-wasip1/release/example.wasm";

    let (out, text) = run(&["validate", wasm, good.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.starts_with("ACCEPTED "), "{text}");
    assert!(
        text.contains("(example, "),
        "plugin name from the file: {text}"
    );

    let (out, text) = run(&[
        "validate",
        "--name",
        "my-example",
        wasm,
        bad.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.starts_with("REFUSED "), "{text}");
    assert!(text.contains("(my-example, "), "{text}");
    assert!(
        text.contains("configuration rejected by the plugin"),
        "{text}"
    );
    assert!(
        text.contains("[error] example: configuration rejected: empty token"),
        "{text}"
    );

    let (out, text) = run(&["validate", wasm]);
    assert_eq!(out.status.code(), Some(2), "{text}");
    let (out, text) = run(&["validate", "no-such.wasm", good.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(text.contains("cannot load no-such.wasm"), "{text}");
}

/// A one-request-at-a-time HTTP server on loopback that answers 200 and records the request
/// line, for live callouts.
fn serve_once(listener: std::net::TcpListener) -> std::thread::JoinHandle<String> {
    use std::io::{BufRead, BufReader, Write};
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().expect("a callout arrives");
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut request_line = String::new();
        reader.read_line(&mut request_line).unwrap();
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            if line == "\r\n" || line.is_empty() {
                break;
            }
        }
        let mut stream = stream;
        let body = r#"{"ok":true}"#;
        write!(
            stream,
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        request_line
    })
}

#[test]
fn live_callouts_reach_a_real_server_and_a_refused_connection_is_envoys_503() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = serve_once(listener);
    // A port nothing listens on: bind, note it, close.
    let closed_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let dir = std::env::temp_dir().join(format!("harness-live-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let scenario = |name: &str, port: u16, status: u32, callout_header: bool| {
        let file = dir.join(format!("{name}.toml"));
        let expect_header = if callout_header {
            "upstream_headers = { \"x-callout\" = \"ok\" }\n"
        } else {
            "upstream = false\n"
        };
        std::fs::write(
            &file,
            format!(
                "name = \"{name}\"\n[[filter]]\nname = \"probe\"\nwasm = \"abi_probe.wasm\"\n\
                 config = {{ mode = \"callout\" }}\n[cluster.backend]\nlive = \"http://127.0.0.1:{port}\"\n\
                 [[step]]\nname = \"{name}\"\n[step.request]\npath = \"/v2/entities\"\n\
                 [step.expect]\nstatus = {status}\ncallouts = 1\n{expect_header}"
            ),
        )
        .unwrap();
        file
    };
    let up = scenario("live-up", port, 200, true);
    let (out, text) = run(&["run", up.to_str().unwrap()]);
    assert!(out.status.success(), "{text}");
    let request_line = server.join().unwrap();
    assert!(request_line.starts_with("GET /"), "{request_line:?}");

    // The probe answers 403 to any non-2xx callout answer: Envoy's 503 for a refused
    // connection must arrive as such, not as a reset and never as an allow.
    let down = scenario("live-down", closed_port, 403, false);
    let (out, text) = run(&["run", down.to_str().unwrap()]);
    assert!(out.status.success(), "{text}");
}
