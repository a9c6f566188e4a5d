//! Keeps the proxy-wasm 0.2.5 SDK calls that can trap the VM out of filter code. Each one
//! hides an `unwrap` or a `panic!` that input Envoy really sends can reach; in Envoy a trap
//! kills the worker's VM (every later request on it is a 503). `proxy_glue::host` has the safe
//! versions (raw ABI imports, bytes, statuses as `Result`).

use std::path::{Path, PathBuf};

/// (SDK function or context method, what it hides).
const BANNED: &[(&str, &str)] = &[
    (
        "get_map",
        "String::from_utf8(..).unwrap() on every header name and value",
    ),
    (
        "get_map_bytes",
        "String::from_utf8(..).unwrap() on every header name",
    ),
    (
        "get_map_value",
        "String::from_utf8(..).unwrap() on the value",
    ),
    (
        "get_map_value_bytes",
        "panic! on a status other than Ok/NotFound",
    ),
    (
        "set_map",
        "panic! on a status other than Ok (BadArgument once headers are gone)",
    ),
    ("set_map_bytes", "panic! on a status other than Ok"),
    (
        "set_map_value",
        "panic! on a status other than Ok (BadArgument once headers are gone)",
    ),
    ("set_map_value_bytes", "panic! on a status other than Ok"),
    ("add_map_value", "panic! on a status other than Ok"),
    ("add_map_value_bytes", "panic! on a status other than Ok"),
    ("remove_map_value", "panic! on a status other than Ok"),
    (
        "get_buffer",
        "panic! on a status other than Ok/NotFound (e.g. BadArgument)",
    ),
    (
        "set_buffer",
        "panic! on a status other than Ok (NotFound for a missing buffer)",
    ),
    (
        "get_property",
        "panic! on a status other than Ok/NotFound/Serialization/InternalFailure",
    ),
    ("resume_http_request", "panic! on a status other than Ok"),
    (
        "set_effective_context",
        "panic! on a status other than Ok/BadArgument",
    ),
    ("close_downstream", "panic! on a status other than Ok"),
    ("resume_http_response", "panic! on a status other than Ok"),
    ("send_http_response", "panic! on a status other than Ok"),
    // Context methods: the same hostcalls behind a trait.
    (
        "get_http_request_header",
        "get_map_value: unwraps the value as UTF-8",
    ),
    (
        "get_http_request_headers",
        "get_map: unwraps names and values as UTF-8",
    ),
    (
        "get_http_request_header_bytes",
        "get_map_value_bytes: panic! on a status",
    ),
    (
        "get_http_request_headers_bytes",
        "get_map_bytes: unwraps names as UTF-8",
    ),
    (
        "get_http_request_trailer",
        "get_map_value: unwraps the value as UTF-8",
    ),
    (
        "get_http_request_trailers",
        "get_map: unwraps names and values as UTF-8",
    ),
    (
        "get_http_response_header",
        "get_map_value: unwraps the value as UTF-8",
    ),
    (
        "get_http_response_headers",
        "get_map: unwraps names and values as UTF-8",
    ),
    (
        "get_http_response_trailer",
        "get_map_value: unwraps the value as UTF-8",
    ),
    (
        "get_http_response_trailers",
        "get_map: unwraps names and values as UTF-8",
    ),
    (
        "get_http_call_response_header",
        "get_map_value: unwraps the value as UTF-8",
    ),
    (
        "get_http_call_response_headers",
        "get_map: unwraps names and values as UTF-8",
    ),
    (
        "get_http_call_response_headers_bytes",
        "get_map_bytes: unwraps names as UTF-8",
    ),
    (
        "get_http_call_response_trailers",
        "get_map: unwraps names and values as UTF-8",
    ),
    (
        "get_http_call_response_body",
        "get_buffer: panic! on a status",
    ),
    (
        "set_http_request_header",
        "set_map_value: panic! on a status",
    ),
    ("set_http_request_headers", "set_map: panic! on a status"),
    (
        "add_http_request_header",
        "add_map_value: panic! on a status",
    ),
    (
        "set_http_response_header",
        "set_map_value: panic! on a status",
    ),
    ("set_http_response_headers", "set_map: panic! on a status"),
    (
        "add_http_response_header",
        "add_map_value: panic! on a status",
    ),
    ("get_http_request_body", "get_buffer: panic! on a status"),
    ("set_http_request_body", "set_buffer: panic! on a status"),
    ("get_http_response_body", "get_buffer: panic! on a status"),
    ("set_http_response_body", "set_buffer: panic! on a status"),
    ("get_downstream_data", "get_buffer: panic! on a status"),
    ("set_downstream_data", "set_buffer: panic! on a status"),
    ("get_upstream_data", "get_buffer: panic! on a status"),
    ("set_upstream_data", "set_buffer: panic! on a status"),
    ("get_plugin_configuration", "get_buffer: panic! on a status"),
    (
        "request_header_values",
        "the old proxy-glue helper over get_map",
    ),
];

/// The crates whose code runs inside Envoy (abi-probe is a test filter that calls every host
/// function on purpose).
const FILTER_CRATES: &[&str] = &[
    "token-auth",
    "entity-acl",
    "device-ownership",
    "example",
    "mqtt-acl",
    "proxy-glue",
    "http-stages",
    "ngsi-gateway",
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code before the first `#[cfg(test)]` (test modules sit at the end of our files).
fn non_test_code(source: &str) -> &str {
    source.split("#[cfg(test)]").next().unwrap_or(source)
}

/// Every call of a banned function in `code`: the name as a whole identifier followed by `(`
/// (comments are skipped line by line).
fn banned_calls(code: &str) -> Vec<(usize, &'static str, &'static str)> {
    let mut found = Vec::new();
    for (line_no, line) in code.lines().enumerate() {
        let line = line.split("//").next().unwrap_or("");
        for (name, why) in BANNED {
            let mut from = 0;
            while let Some(at) = line[from..].find(name) {
                let start = from + at;
                let end = start + name.len();
                let before = line[..start].chars().next_back();
                let after = line[end..].trim_start().chars().next();
                let ident = |c: char| c.is_alphanumeric() || c == '_';
                if !before.is_some_and(ident) && after == Some('(') {
                    found.push((line_no + 1, *name, *why));
                }
                from = end;
            }
        }
    }
    found
}

#[test]
fn filter_crates_use_no_sdk_call_that_can_trap() {
    let filters = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut offences = Vec::new();
    let mut scanned = 0;
    for krate in FILTER_CRATES {
        let mut files = Vec::new();
        rust_files(&filters.join(krate).join("src"), &mut files);
        assert!(!files.is_empty(), "no sources found for {krate}");
        for file in files {
            let source = std::fs::read_to_string(&file).unwrap();
            scanned += 1;
            for (line, name, why) in banned_calls(non_test_code(&source)) {
                offences.push(format!("{}:{line}: {name}() — {why}", file.display()));
            }
        }
    }
    assert!(scanned >= FILTER_CRATES.len());
    assert!(
        offences.is_empty(),
        "use proxy_glue::host instead of:\n{}",
        offences.join("\n")
    );
}

#[test]
fn the_scan_finds_banned_calls_and_only_them() {
    let code = "let h = hostcalls::get_map(MapType::HttpRequestHeaders);\n\
                let v = self.get_http_request_header (\":path\");\n\
                let ok = host::header_map(MapType::HttpRequestHeaders);\n\
                // hostcalls::get_buffer(..) in a comment\n\
                let b = host::read_buffer(t, 0, n); my_get_map(x);";
    let found: Vec<&str> = banned_calls(code).iter().map(|(_, n, _)| *n).collect();
    assert_eq!(found, vec!["get_map", "get_http_request_header"]);
    assert_eq!(non_test_code("a\n#[cfg(test)]\nget_map()"), "a\n");
}
