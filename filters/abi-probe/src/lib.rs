//! abi-probe: a test filter, never deployed. It drives every Proxy-Wasm host call the SDK
//! (proxy-wasm 0.2.5, ABI 0.2.1) offers, so the host-harness integration tests can check that
//! the harness answers each one as Envoy would, and it misbehaves on purpose (traps, spins,
//! grows its memory) so they can check that the harness contains a broken plugin as Envoy does.
//!
//! The plugin configuration picks a behaviour: `{"mode": "<mode>"}` (see [`Mode`]). An unknown
//! mode or invalid JSON is rejected in `on_configure`, which is itself a tested behaviour.
//!
//! How results are reported: a check is a host call made with an expected answer. Each verdict
//! becomes a header `x-probe-<check>: ok` or `x-probe-<check>: fail: got <answer>` — on the
//! request (seen by the upstream) for request-time checks, on the response (seen by the client)
//! for response-time ones — so a test asserts that every `x-probe-*` header says `ok`. Values
//! the test must compare with its own view (clock, plugin name, shared counter) are reported
//! as `x-info-<name>` headers instead. Background callbacks (ticks, queues, close events)
//! have no stream to report on; they count through metrics.

use std::cell::Cell;
use std::fmt::{Debug, Display};
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

use policy::DenyReason;
use proxy_glue::{parse_plugin_config, send_deny};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext, StreamContext};
use proxy_wasm::types::{
    Action, BufferType, ContextType, LogLevel, MapType, MetricType, PeerType, Status,
};
use serde::Deserialize;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_glue::install_panic_hook();
    proxy_wasm::set_root_context(|context_id| Box::new(ProbeRoot::new(context_id)));
}}

/// The cluster the tests' callout resolver answers for.
const BACKEND: &str = "backend";
/// A cluster no harness or Envoy configuration defines.
const UNKNOWN_CLUSTER: &str = "abi-probe-no-such-cluster";
const CALLOUT_TIMEOUT: Duration = Duration::from_secs(5);
/// The shared queue the root context registers and the request path feeds.
const QUEUE: &str = "abi_probe.queue";
/// Shared-data key counting the contract requests this VM id has seen.
const REQUESTS_SEEN: &str = "abi_probe.requests_seen";
/// A filter-state property; one path segment, because Envoy only resolves a single-segment
/// name back to what `proxy_set_property` stored.
const MARKER_PROPERTY: &str = "abi_probe_marker";

// ================= configuration =================

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Mode {
    /// Every host call, with its expected answer, on each HTTP request; a callout to
    /// `backend`; the response read and rewritten (header added, body prefixed).
    Contract,
    /// A network (TCP) filter: upstream-bound data is prefixed with `probe:`.
    Tcp,
    /// A local 403 reply from the request headers, answering Continue all the same: the host
    /// must still not forward the request.
    Deny,
    /// Two local replies (403, then 503) from the request headers: a contract breach the
    /// host harness must report (tests/scenarios-failing/second-local-response.toml).
    DenyTwice,
    /// Resets the stream (`proxy_close_stream`) from the request headers.
    Reset,
    /// A real Wasm trap (`unreachable`) in the request headers.
    Trap,
    /// An endless loop in the request headers; only the host's fuel limit stops it.
    Spin,
    /// Allocates and touches `grow_mib` MiB in the request headers.
    Grow,
    /// Asks `backend` before letting the request through: 2xx lets it go with
    /// `x-callout: ok`, another status is a 403, a failed call (no headers) a 503.
    Callout,
    /// Buffers the request body until its end (or its trailers) and reports the length it saw
    /// in the response header `x-body-len`.
    Buffer,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    mode: Mode,
    /// Tick period in milliseconds; 0 disables ticks.
    #[serde(default)]
    tick_ms: u64,
    /// Each tick also makes a callout to `backend` from the root context, which has no stream
    /// (the shape of a key-set refresh).
    #[serde(default)]
    tick_callout: bool,
    /// The VM configuration the test passed, checked against what `on_vm_start` read.
    #[serde(default)]
    expect_vm_configuration: Option<String>,
    /// How much "grow" mode allocates.
    #[serde(default = "default_grow_mib")]
    grow_mib: usize,
    /// Test-only trap on demand (recovery tests): a request whose header of this name is `1`
    /// traps the VM (`unreachable`) in any HTTP mode, so a test can kill a VM when it wants
    /// and watch the host's failure policy. Never give a real filter such a trigger. With it
    /// set, every response also carries `x-vm-stream`: how many streams this VM instance has
    /// seen, 1 for the first one after a (re)start.
    #[serde(default)]
    trap_header: Option<String>,
    /// The same for the TCP mode (test-only): downstream data starting with these bytes traps
    /// the VM.
    #[serde(default)]
    trap_data: Option<String>,
}

fn default_grow_mib() -> usize {
    64
}

// ================= reporting =================

/// Verdicts and values of one callback, turned into headers at the end of it.
#[derive(Debug, Default, Clone)]
struct Report(Vec<(String, String)>);

impl Report {
    /// Records a check; `got` is what the host answered, shown only when the check fails.
    fn check(&mut self, name: &str, passed: bool, got: impl Debug) {
        let verdict = if passed {
            "ok".to_string()
        } else {
            let got = header_safe(&format!("{got:?}"));
            log::warn!("abi-probe: check {name} failed: got {got}");
            format!("fail: got {got}")
        };
        self.0.push((format!("x-probe-{name}"), verdict));
    }

    /// Records a value for the test to compare with its own view of the host.
    fn info(&mut self, name: &str, value: impl Display) {
        self.0
            .push((format!("x-info-{name}"), header_safe(&value.to_string())));
    }

    fn extend(&mut self, other: &Report) {
        self.0.extend(other.0.iter().cloned());
    }

    /// Adds every verdict to a header map. A map the host refuses is a bug the missing
    /// headers will show; the SDK itself panics on that answer.
    fn add_to(&self, map: MapType) {
        for (name, value) in &self.0 {
            let _ = hostcalls::add_map_value(map, name, value);
        }
    }
}

/// Header values must be visible ASCII; a debug rendering of a host answer may not be.
fn header_safe(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .take(160)
        .collect()
}

// ================= metrics =================

/// Metric ids, defined once in `on_configure`. An id of 0 (definition refused) is never
/// valid, so later calls with it fail harmlessly and the test sees the metric missing.
#[derive(Debug, Clone, Copy, Default)]
struct Metrics {
    requests: u32,
    gauge: u32,
    histogram: u32,
    ticks: u32,
    tick_callouts: u32,
    queue_ready: u32,
    queue_items: u32,
    streams_logged: u32,
    tcp_connections: u32,
    tcp_closes: u32,
    tcp_upstream_bytes: u32,
}

impl Metrics {
    fn define() -> Self {
        Metrics {
            requests: define(MetricType::Counter, "abi_probe.requests"),
            gauge: define(MetricType::Gauge, "abi_probe.gauge"),
            histogram: define(MetricType::Histogram, "abi_probe.histogram"),
            ticks: define(MetricType::Counter, "abi_probe.ticks"),
            tick_callouts: define(MetricType::Counter, "abi_probe.tick_callouts"),
            queue_ready: define(MetricType::Counter, "abi_probe.queue_ready"),
            queue_items: define(MetricType::Counter, "abi_probe.queue_items"),
            streams_logged: define(MetricType::Counter, "abi_probe.streams_logged"),
            tcp_connections: define(MetricType::Counter, "abi_probe.tcp_connections"),
            tcp_closes: define(MetricType::Counter, "abi_probe.tcp_closes"),
            tcp_upstream_bytes: define(MetricType::Counter, "abi_probe.tcp_upstream_bytes"),
        }
    }

    fn all_defined(&self) -> bool {
        [
            self.requests,
            self.gauge,
            self.histogram,
            self.ticks,
            self.tick_callouts,
            self.queue_ready,
            self.queue_items,
            self.streams_logged,
            self.tcp_connections,
            self.tcp_closes,
            self.tcp_upstream_bytes,
        ]
        .iter()
        .all(|id| *id != 0)
    }
}

fn define(kind: MetricType, name: &str) -> u32 {
    hostcalls::define_metric(kind, name).unwrap_or_default()
}

/// Counts an event; background callbacks have nowhere else to report.
fn count(id: u32) {
    let _ = hostcalls::increment_metric(id, 1);
}

// ================= raw imports =================

/// `proxy_done` called through its import rather than `hostcalls::done()`, which panics on
/// any answer but Ok. Envoy answers Ok only to a root context whose `on_done` returned false
/// during shutdown, NotFound to anyone else; the probe checks that answer.
mod raw {
    use proxy_wasm::types::Status;

    #[link(wasm_import_module = "env")]
    extern "C" {
        fn proxy_done() -> Status;
    }

    pub fn done() -> Status {
        // SAFETY: the import takes no arguments and returns a status code; ABI 0.2.1 hosts
        // answer it with a code the Status enum has (Ok or NotFound).
        unsafe { proxy_done() }
    }
}

// ================= root context =================

struct ProbeRoot {
    context_id: u32,
    config: Option<Rc<Config>>,
    metrics: Metrics,
    queue: Option<u32>,
    /// What `on_vm_start` read, compared again from the request path.
    vm_configuration: Option<Vec<u8>>,
    /// Checks made while starting (vm_start, configure): no stream exists yet, so every
    /// contract request reports them again.
    startup: Rc<Report>,
    /// HTTP streams this VM instance has created (a fresh VM starts again from 0).
    streams: Rc<Cell<u64>>,
}

impl ProbeRoot {
    fn new(context_id: u32) -> Self {
        ProbeRoot {
            context_id,
            config: None,
            metrics: Metrics::default(),
            queue: None,
            vm_configuration: None,
            startup: Rc::new(Report::default()),
            streams: Rc::new(Cell::new(0)),
        }
    }

    fn mode(&self) -> Option<Mode> {
        self.config.as_ref().map(|c| c.mode)
    }
}

impl Context for ProbeRoot {
    /// Answers of callouts made by ticks (no stream): counted, body read.
    fn on_http_call_response(&mut self, _token: u32, headers: usize, body: usize, _: usize) {
        count(self.metrics.tick_callouts);
        let read = hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body);
        log::info!(
            "abi-probe: background callout answered: {headers} headers, {} body bytes",
            read.ok().flatten().map_or(0, |b| b.len())
        );
    }
}

impl RootContext for ProbeRoot {
    fn on_vm_start(&mut self, vm_configuration_size: usize) -> bool {
        let read = hostcalls::get_buffer(BufferType::VmConfiguration, 0, vm_configuration_size);
        let mut report = Report::default();
        report.check(
            "vm-configuration",
            matches!(&read, Ok(b) if b.as_ref().map_or(0, Vec::len) == vm_configuration_size),
            &read,
        );
        self.vm_configuration = read.ok().flatten();
        self.startup = Rc::new(report);
        true
    }

    fn on_configure(&mut self, plugin_configuration_size: usize) -> bool {
        let mut report = (*self.startup).clone();
        let read = hostcalls::get_buffer(
            BufferType::PluginConfiguration,
            0,
            plugin_configuration_size,
        );
        report.check(
            "plugin-configuration",
            matches!(&read, Ok(Some(b)) if b.len() == plugin_configuration_size),
            read.map(|b| b.map(|b| b.len())),
        );
        let Some(config) = parse_plugin_config::<Config>("abi-probe") else {
            return false;
        };
        if let Some(expected) = &config.expect_vm_configuration {
            report.check(
                "vm-configuration-expected",
                self.vm_configuration.as_deref() == Some(expected.as_bytes()),
                self.vm_configuration
                    .as_deref()
                    .map(String::from_utf8_lossy),
            );
        }

        self.metrics = Metrics::define();
        report.check("metric-define", self.metrics.all_defined(), self.metrics);
        let tick = hostcalls::set_tick_period(Duration::from_millis(config.tick_ms));
        report.check("tick-period", tick.is_ok(), tick);
        let queue = hostcalls::register_shared_queue(QUEUE);
        report.check("queue-register", matches!(queue, Ok(id) if id != 0), queue);
        self.queue = queue.ok();

        self.config = Some(Rc::new(config));
        self.startup = Rc::new(report);
        true
    }

    fn on_tick(&mut self) {
        count(self.metrics.ticks);
        if self.config.as_ref().is_some_and(|c| c.tick_callout) {
            let sent = hostcalls::dispatch_http_call(
                BACKEND,
                callout_headers("/tick"),
                None,
                vec![],
                CALLOUT_TIMEOUT,
            );
            if let Err(status) = sent {
                log::warn!("abi-probe: tick callout not sent: {status:?}");
            }
        }
    }

    /// Drains the queue: one notification may stand for several items, or for none left.
    fn on_queue_ready(&mut self, queue_id: u32) {
        count(self.metrics.queue_ready);
        while let Ok(Some(_item)) = hostcalls::dequeue_shared_queue(queue_id) {
            count(self.metrics.queue_items);
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        self.streams.set(self.streams.get().saturating_add(1));
        Some(Box::new(ProbeHttp {
            vm_stream: self.streams.get(),
            context_id,
            root_context_id: self.context_id,
            config: self.config.clone(),
            metrics: self.metrics,
            queue: self.queue,
            vm_configuration: self.vm_configuration.clone(),
            startup: self.startup.clone(),
            callout: None,
            resume_closed_request: None,
            body_callbacks: 0,
            body_size_arg: 0,
            body_len: None,
        }))
    }

    fn create_stream_context(&self, _context_id: u32) -> Option<Box<dyn StreamContext>> {
        Some(Box::new(ProbeTcp {
            metrics: self.metrics,
            trap_data: self.config.as_ref().and_then(|c| c.trap_data.clone()),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        match self.mode() {
            Some(Mode::Tcp) => Some(ContextType::StreamContext),
            _ => Some(ContextType::HttpContext),
        }
    }
}

/// Headers every callout needs: Envoy refuses a call without :method, :path or :authority.
fn callout_headers(path: &str) -> Vec<(&str, &str)> {
    vec![
        (":method", "GET"),
        (":path", path),
        (":authority", BACKEND),
        ("x-abi-probe", "callout"),
    ]
}

// ================= HTTP context =================

struct ProbeHttp {
    context_id: u32,
    root_context_id: u32,
    config: Option<Rc<Config>>,
    metrics: Metrics,
    queue: Option<u32>,
    vm_configuration: Option<Vec<u8>>,
    startup: Rc<Report>,
    /// Token of the callout this stream waits for.
    callout: Option<u32>,
    /// Whether the request headers were gone right after `resume_http_request` (contract).
    resume_closed_request: Option<bool>,
    body_callbacks: u32,
    body_size_arg: usize,
    /// Length of the whole request body as the last body or trailers callback saw it.
    body_len: Option<usize>,
    /// This stream's ordinal among the streams its VM instance created.
    vm_stream: u64,
}

impl Context for ProbeHttp {
    fn on_http_call_response(&mut self, token: u32, headers: usize, body: usize, trailers: usize) {
        match self.config.as_ref().map(|c| c.mode) {
            Some(Mode::Contract) => self.contract_callout_response(token, headers, body, trailers),
            Some(Mode::Callout) => self.callout_decision(token, headers),
            _ => log::warn!("abi-probe: unexpected callout answer {token}"),
        }
    }
}

impl HttpContext for ProbeHttp {
    fn on_http_request_headers(&mut self, num_headers: usize, _end_of_stream: bool) -> Action {
        let Some(config) = self.config.clone() else {
            // A rejected configuration serves no stream; never let one through regardless.
            send_deny(
                &DenyReason::Unavailable("abi-probe not configured".into()),
                &[],
            );
            return Action::Pause;
        };
        if let Some(name) = &config.trap_header {
            if self.get_http_request_header(name).as_deref() == Some("1") {
                log::warn!("abi-probe: {name}: 1, trapping the VM on purpose (test filter)");
                trap();
            }
        }
        match config.mode {
            Mode::Contract => self.contract_request(num_headers),
            Mode::Deny => {
                send_deny(
                    &DenyReason::Forbidden("abi-probe deny mode".into()),
                    &[("x-abi-probe", "deny")],
                );
                // Continue on purpose: the local reply must win all the same.
                Action::Continue
            }
            Mode::DenyTwice => {
                send_deny(
                    &DenyReason::Forbidden("abi-probe deny_twice mode".into()),
                    &[],
                );
                send_deny(
                    &DenyReason::Unavailable("abi-probe deny_twice mode, again".into()),
                    &[],
                );
                Action::Pause
            }
            Mode::Reset => {
                let _ = hostcalls::reset_http_request();
                Action::Pause
            }
            Mode::Trap => trap(),
            Mode::Spin => spin(),
            Mode::Grow => {
                let grown = grow(config.grow_mib);
                log::info!("abi-probe: grew by {grown} bytes");
                Action::Continue
            }
            Mode::Callout => self.callout_request(),
            Mode::Buffer | Mode::Tcp => Action::Continue,
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if self.mode() != Some(Mode::Buffer) {
            return Action::Continue;
        }
        self.body_callbacks += 1;
        self.body_size_arg = body_size;
        if !end_of_stream {
            // StopIterationAndBuffer: the host keeps the chunks and shows them all next time.
            return Action::Pause;
        }
        let body = self.get_http_request_body(0, body_size).unwrap_or_default();
        self.body_len = Some(body.len());
        log::info!(
            "abi-probe: buffered body of {} bytes in {} callbacks",
            body.len(),
            self.body_callbacks
        );
        Action::Continue
    }

    fn on_http_request_trailers(&mut self, num_trailers: usize) -> Action {
        if self.mode() != Some(Mode::Buffer) {
            return Action::Continue;
        }
        // The body callbacks all saw end_of_stream false and paused: the whole body is still
        // buffered, and readable from here.
        let body = self
            .get_http_request_body(0, usize::MAX)
            .unwrap_or_default();
        self.body_len = Some(body.len());
        log::info!(
            "abi-probe: {num_trailers} trailers arrived; buffered body is {} bytes",
            body.len()
        );
        self.add_http_request_trailer("x-abi-probe-trailer", "seen");
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if self
            .config
            .as_ref()
            .is_some_and(|c| c.trap_header.is_some())
        {
            self.add_http_response_header("x-vm-stream", &self.vm_stream.to_string());
        }
        match self.mode() {
            Some(Mode::Contract) => self.contract_response_headers(),
            Some(Mode::Buffer) => {
                if let Some(len) = self.body_len {
                    self.add_http_response_header("x-body-len", &len.to_string());
                }
                self.add_http_response_header("x-body-calls", &self.body_callbacks.to_string());
                self.add_http_response_header("x-body-size-arg", &self.body_size_arg.to_string());
            }
            _ => {}
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if self.mode() != Some(Mode::Contract) {
            return Action::Continue;
        }
        if !end_of_stream {
            return Action::Pause;
        }
        // The whole upstream body is visible; the client gets it prefixed, which shows both
        // the read and the write reached the host.
        let seen = self
            .get_http_response_body(0, body_size)
            .map_or(0, |b| b.len());
        if seen != body_size {
            log::warn!("abi-probe: response body callback said {body_size} bytes, read {seen}");
        }
        self.set_http_response_body(0, 0, b"probe:");
        Action::Continue
    }

    fn on_log(&mut self) {
        count(self.metrics.streams_logged);
    }
}

impl ProbeHttp {
    fn mode(&self) -> Option<Mode> {
        self.config.as_ref().map(|c| c.mode)
    }

    // ---------- contract mode ----------

    /// Makes every check, reports them all on the request, and pauses for the callout.
    fn contract_request(&mut self, num_headers: usize) -> Action {
        let _ = hostcalls::log(LogLevel::Info, "abi-probe: contract request");
        let mut report = Report::default();
        report.extend(&self.startup);
        check_environment(&mut report, self.vm_configuration.as_deref());
        check_request_header_map(&mut report, num_headers);
        check_properties(&mut report);
        check_shared_data(&mut report, self.context_id);
        check_queue(&mut report, self.queue);
        check_metrics(&mut report, &self.metrics);
        check_effective_context(&mut report, self.context_id, self.root_context_id);
        check_unsupported_calls(&mut report);

        let unknown = hostcalls::dispatch_http_call(
            UNKNOWN_CLUSTER,
            callout_headers("/"),
            None,
            vec![],
            CALLOUT_TIMEOUT,
        );
        report.check(
            "http-call-unknown-cluster",
            unknown == Err(Status::BadArgument),
            unknown,
        );
        let no_authority = hostcalls::dispatch_http_call(
            BACKEND,
            vec![(":method", "GET"), (":path", "/")],
            None,
            vec![],
            CALLOUT_TIMEOUT,
        );
        report.check(
            "http-call-missing-authority",
            no_authority == Err(Status::BadArgument),
            no_authority,
        );
        let sent = hostcalls::dispatch_http_call(
            BACKEND,
            callout_headers("/contract"),
            Some(b"ping"),
            vec![("x-abi-probe-trailer", "1")],
            CALLOUT_TIMEOUT,
        );
        report.check("http-call", sent.is_ok(), sent);
        self.callout = sent.ok();

        report.add_to(MapType::HttpRequestHeaders);
        if self.callout.is_some() {
            Action::Pause
        } else {
            Action::Continue
        }
    }

    /// Reads the callout's answer, reports it, and resumes the request.
    fn contract_callout_response(
        &mut self,
        token: u32,
        headers: usize,
        body: usize,
        trailers: usize,
    ) {
        let mut report = Report::default();
        report.check("callout-token", self.callout == Some(token), token);
        let response_headers = hostcalls::get_map(MapType::HttpCallResponseHeaders);
        report.check(
            "callout-headers",
            matches!(&response_headers, Ok(h) if h.len() == headers && h.iter().any(|(k, _)| k == ":status")),
            &response_headers,
        );
        let response_body = hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body);
        report.check(
            "callout-body",
            matches!(&response_body, Ok(b) if b.as_ref().map_or(0, Vec::len) == body),
            &response_body,
        );
        let response_trailers = hostcalls::get_map(MapType::HttpCallResponseTrailers);
        report.check(
            "callout-trailers",
            matches!(&response_trailers, Ok(t) if t.len() == trailers),
            &response_trailers,
        );
        let status = hostcalls::get_map_value(MapType::HttpCallResponseHeaders, ":status");
        report.info("callout-status", status.ok().flatten().unwrap_or_default());
        report.info(
            "callout-body",
            String::from_utf8_lossy(&response_body.ok().flatten().unwrap_or_default()),
        );
        // Headers go on before the resume: Envoy lets go of the request headers the moment
        // the filter asks to continue, not when the callback returns.
        report.add_to(MapType::HttpRequestHeaders);
        self.callout = None;
        let _ = hostcalls::resume_http_request();
        let after = hostcalls::get_map(MapType::HttpRequestHeaders);
        self.resume_closed_request = Some(matches!(after, Ok(h) if h.is_empty()));
    }

    /// Checks the response headers and the request-side maps the response path can't see.
    fn contract_response_headers(&mut self) {
        let mut report = Report::default();
        let status = hostcalls::get_map_value(MapType::HttpResponseHeaders, ":status");
        report.check("response-status", matches!(&status, Ok(Some(_))), &status);
        report.info("response-status", status.ok().flatten().unwrap_or_default());
        // Envoy drops its pointer to the request headers once they have been passed on.
        let request = hostcalls::get_map(MapType::HttpRequestHeaders);
        report.check(
            "response-request-headers-closed",
            matches!(&request, Ok(h) if h.is_empty()),
            request.map(|h| h.len()),
        );
        report.check(
            "resume-closes-request-headers",
            self.resume_closed_request == Some(true),
            self.resume_closed_request,
        );
        // The body is rewritten below, so the upstream's length no longer holds.
        let removed =
            hostcalls::set_map_value(MapType::HttpResponseHeaders, "content-length", None);
        let gone = hostcalls::get_map_value(MapType::HttpResponseHeaders, "content-length");
        report.check(
            "response-remove-content-length",
            removed.is_ok() && gone == Ok(None),
            (removed, gone),
        );
        report.add_to(MapType::HttpResponseHeaders);
    }

    // ---------- callout mode ----------

    fn callout_request(&mut self) -> Action {
        match hostcalls::dispatch_http_call(
            BACKEND,
            callout_headers("/authorize"),
            None,
            vec![],
            CALLOUT_TIMEOUT,
        ) {
            Ok(token) => self.callout = Some(token),
            Err(status) => send_deny(
                &DenyReason::Unavailable(format!("callout not sent: {status:?}")),
                &[],
            ),
        }
        Action::Pause
    }

    /// The callout decides: as an authorization filter would, a failure never lets the
    /// request through.
    fn callout_decision(&mut self, token: u32, num_headers: usize) {
        if self.callout != Some(token) {
            log::warn!("abi-probe: answer for unknown callout {token}");
            return;
        }
        self.callout = None;
        if num_headers == 0 {
            // A failed call (reset, timeout): the reason is in proxy_get_status.
            let (code, message) = hostcalls::get_grpc_status().unwrap_or_default();
            let message = message.unwrap_or_default();
            let code = code.to_string();
            send_deny(
                &DenyReason::Unavailable("authorization backend unreachable".into()),
                &[
                    ("x-callout-failure", message.as_str()),
                    ("x-callout-status-code", code.as_str()),
                ],
            );
            return;
        }
        let status = self
            .get_http_call_response_header(":status")
            .and_then(|s| s.parse::<u32>().ok())
            .unwrap_or_default();
        if (200..300).contains(&status) {
            self.add_http_request_header("x-callout", "ok");
            self.resume_http_request();
        } else {
            send_deny(
                &DenyReason::Forbidden(format!("backend answered {status}")),
                &[],
            );
        }
    }
}

// ---------- contract checks, one group per part of the ABI ----------

/// Logging, clock, and the configuration buffers outside their lifecycle calls.
fn check_environment(report: &mut Report, vm_configuration: Option<&[u8]>) {
    let logged = hostcalls::log(LogLevel::Debug, "abi-probe: below the host's level");
    report.check("log", logged.is_ok(), logged);
    let level = hostcalls::get_log_level();
    report.check("log-level", level.is_ok(), level);
    if let Ok(level) = level {
        report.info("log-level", level as u32);
    }
    let now = hostcalls::get_current_time();
    report.check("current-time", now.is_ok(), now);
    let nanos = now
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    report.info("time-nanos", nanos);

    // Envoy shows the plugin configuration only inside on_configure ...
    let plugin = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX);
    report.check(
        "plugin-configuration-outside-configure",
        plugin == Ok(None),
        plugin.map(|b| b.map(|b| b.len())),
    );
    // ... and the VM configuration at any time.
    let vm = hostcalls::get_buffer(BufferType::VmConfiguration, 0, usize::MAX);
    report.check(
        "vm-configuration-anytime",
        matches!(&vm, Ok(b) if b.as_deref() == vm_configuration),
        &vm,
    );
}

/// Every header-map call, on the request headers (writable while in their callback).
fn check_request_header_map(report: &mut Report, num_headers: usize) {
    let map = MapType::HttpRequestHeaders;
    let original = hostcalls::get_map(map);
    report.check(
        "get-map",
        matches!(&original, Ok(h) if h.len() == num_headers && h.iter().any(|(k, _)| k == ":path")),
        &original,
    );
    let original = original.unwrap_or_default();
    let original_bytes = hostcalls::get_map_bytes(map);
    report.check(
        "get-map-bytes",
        matches!(&original_bytes, Ok(h) if h.len() == original.len()),
        &original_bytes,
    );
    let method = hostcalls::get_map_value(map, ":method");
    report.check(
        "get-map-value",
        matches!(&method, Ok(Some(m)) if !m.is_empty()),
        &method,
    );
    let method_bytes = hostcalls::get_map_value_bytes(map, ":method");
    report.check(
        "get-map-value-bytes",
        method_bytes == method.map(|m| m.map(String::into_bytes)),
        &method_bytes,
    );
    let missing = hostcalls::get_map_value(map, "x-scratch-absent");
    report.check("get-map-value-missing", missing == Ok(None), &missing);

    // Single values: replace, add (a second value), read the first back, remove.
    let key = "x-scratch";
    let set = hostcalls::set_map_value(map, key, Some("one"));
    let read = hostcalls::get_map_value(map, key);
    report.check(
        "set-map-value",
        set.is_ok() && read == Ok(Some("one".into())),
        (set, read),
    );
    let set = hostcalls::set_map_value_bytes(map, key, Some(b"two"));
    let read = hostcalls::get_map_value(map, key);
    report.check(
        "set-map-value-bytes",
        set.is_ok() && read == Ok(Some("two".into())),
        (set, read),
    );
    let added = hostcalls::add_map_value(map, key, "three");
    let added_bytes = hostcalls::add_map_value_bytes(map, key, b"four");
    let values: Vec<String> = hostcalls::get_map(map)
        .unwrap_or_default()
        .into_iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v)
        .collect();
    report.check(
        "add-map-value",
        added.is_ok() && added_bytes.is_ok() && values == ["two", "three", "four"],
        (added, added_bytes, &values),
    );
    // Envoy answers a repeated header with its first value.
    let first = hostcalls::get_map_value(map, key);
    report.check(
        "get-map-value-first",
        first == Ok(Some("two".into())),
        &first,
    );
    let removed = hostcalls::remove_map_value(map, key);
    let read = hostcalls::get_map_value(map, key);
    report.check(
        "remove-map-value",
        removed.is_ok() && read == Ok(None),
        (removed, read),
    );
    let _ = hostcalls::add_map_value(map, key, "five");
    let unset = hostcalls::set_map_value(map, key, None);
    let read = hostcalls::get_map_value(map, key);
    report.check(
        "set-map-value-none",
        unset.is_ok() && read == Ok(None),
        (unset, read),
    );
    let _ = hostcalls::add_map_value(map, "X-Scratch-Case", "v");
    let read = hostcalls::get_map_value(map, "x-scratch-CASE");
    report.check("map-case-insensitive", read == Ok(Some("v".into())), &read);
    let _ = hostcalls::set_map_value(map, "x-scratch-case", None);

    // Whole maps: the original plus a marker, read back in order, then the marker removed.
    let mut with_marker: Vec<(&str, &str)> = original
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    with_marker.push(("x-scratch-set-map", "1"));
    let set = hostcalls::set_map(map, with_marker.clone());
    let read = hostcalls::get_map(map).unwrap_or_default();
    let same = read.len() == with_marker.len()
        && read
            .iter()
            .zip(&with_marker)
            .all(|((k, v), (k2, v2))| k == k2 && v == v2);
    report.check("set-map", set.is_ok() && same, (set, read.len()));
    let original_bytes = original_bytes.unwrap_or_default();
    let mut with_marker: Vec<(&str, &[u8])> = original_bytes
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_slice()))
        .collect();
    with_marker.push(("x-scratch-set-map-bytes", b"1"));
    let set = hostcalls::set_map_bytes(map, with_marker);
    let read = hostcalls::get_map_value(map, "x-scratch-set-map-bytes");
    let kept = hostcalls::get_map_value(map, "x-scratch-set-map");
    report.check(
        "set-map-bytes",
        set.is_ok() && read == Ok(Some("1".into())) && kept == Ok(None),
        (set, read, kept),
    );
    let _ = hostcalls::set_map_value(map, "x-scratch-set-map-bytes", None);
    let after = hostcalls::get_map(map).unwrap_or_default();
    report.check("map-restored", after == original, after.len());
}

fn check_properties(report: &mut Report) {
    let path = hostcalls::get_property(vec!["request", "path"]);
    let header = hostcalls::get_map_value(MapType::HttpRequestHeaders, ":path");
    report.check(
        "property-request-path",
        matches!((&path, &header), (Ok(Some(p)), Ok(Some(h))) if p == h.as_bytes()),
        &path,
    );
    for (check, info, name) in [
        ("property-plugin-name", "plugin-name", "plugin_name"),
        ("property-vm-id", "vm-id", "plugin_vm_id"),
        ("property-root-id", "root-id", "plugin_root_id"),
    ] {
        let value = hostcalls::get_property(vec![name]);
        report.check(check, matches!(&value, Ok(Some(_))), &value);
        report.info(
            info,
            String::from_utf8_lossy(&value.ok().flatten().unwrap_or_default()),
        );
    }
    let missing = hostcalls::get_property(vec!["abi_probe_no_such_property"]);
    report.check("property-missing", missing == Ok(None), &missing);
    let set = hostcalls::set_property(vec![MARKER_PROPERTY], Some(b"marked"));
    let read = hostcalls::get_property(vec![MARKER_PROPERTY]);
    report.check(
        "property-roundtrip",
        set.is_ok() && read == Ok(Some(b"marked".to_vec())),
        (set, read),
    );
}

/// Shared data with compare-and-swap, as a counter of contract requests would use it.
fn check_shared_data(report: &mut Report, context_id: u32) {
    let read = hostcalls::get_shared_data(REQUESTS_SEEN);
    let (value, cas) = read.clone().unwrap_or_default();
    let seen: u64 = value
        .and_then(|v| String::from_utf8(v).ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let next = (seen + 1).to_string();
    // Absent key: cas None (0) writes unconditionally; present: the cas just read must win.
    let set = hostcalls::set_shared_data(REQUESTS_SEEN, Some(next.as_bytes()), cas);
    report.check("shared-data-set", set.is_ok(), (&read, set));
    let reread = hostcalls::get_shared_data(REQUESTS_SEEN);
    let fresh_cas = match &reread {
        Ok((Some(v), Some(c))) if v.as_slice() == next.as_bytes() && Some(*c) != cas => Some(*c),
        _ => None,
    };
    report.check("shared-data-get", fresh_cas.is_some(), &reread);
    report.info("shared-count", &next);
    let rewrite = hostcalls::set_shared_data(REQUESTS_SEEN, Some(next.as_bytes()), fresh_cas);
    report.check(
        "shared-data-cas",
        fresh_cas.is_some() && rewrite.is_ok(),
        rewrite,
    );
    // fresh_cas was consumed by the write above: it is stale now and must lose.
    let stale = hostcalls::set_shared_data(REQUESTS_SEEN, Some(b"stale"), fresh_cas);
    report.check(
        "shared-data-stale-cas",
        stale == Err(Status::CasMismatch),
        stale,
    );
    // Envoy checks a cas only against an existing entry: a new key is written whatever cas.
    let new_key = format!("abi_probe.new.{context_id}.{next}");
    let created = hostcalls::set_shared_data(&new_key, Some(b"1"), Some(0x5eed));
    report.check("shared-data-cas-on-new-key", created.is_ok(), created);
}

/// The queue the root registered: resolve it by VM id, feed it, take one item back. The
/// second item stays for the root's on_queue_ready (counted in `abi_probe.queue_items`).
fn check_queue(report: &mut Report, registered: Option<u32>) {
    let vm_id = hostcalls::get_property(vec!["plugin_vm_id"])
        .ok()
        .flatten()
        .and_then(|v| String::from_utf8(v).ok())
        .unwrap_or_default();
    let resolved = hostcalls::resolve_shared_queue(&vm_id, QUEUE);
    report.check(
        "queue-resolve",
        registered.is_some() && resolved == Ok(registered),
        (&resolved, registered),
    );
    let missing = hostcalls::resolve_shared_queue(&vm_id, "abi_probe.no_such_queue");
    report.check("queue-resolve-missing", missing == Ok(None), missing);
    let Some(queue) = registered else {
        return;
    };
    let first = hostcalls::enqueue_shared_queue(queue, Some(b"first"));
    let second = hostcalls::enqueue_shared_queue(queue, Some(b"second"));
    report.check(
        "queue-enqueue",
        first.is_ok() && second.is_ok(),
        (first, second),
    );
    let taken = hostcalls::dequeue_shared_queue(queue);
    report.check(
        "queue-dequeue",
        taken == Ok(Some(b"first".to_vec())),
        &taken,
    );
    let unknown = hostcalls::dequeue_shared_queue(0x7fff_fff0);
    report.check(
        "queue-dequeue-unknown",
        unknown == Err(Status::NotFound),
        &unknown,
    );
    let unknown = hostcalls::enqueue_shared_queue(0x7fff_fff0, Some(b"x"));
    report.check(
        "queue-enqueue-unknown",
        unknown == Err(Status::NotFound),
        unknown,
    );
}

/// Envoy's metric rules: counters only go up, gauges are set or moved, histograms record
/// and can't be read.
fn check_metrics(report: &mut Report, metrics: &Metrics) {
    let before = hostcalls::get_metric(metrics.requests).unwrap_or_default();
    let inc = hostcalls::increment_metric(metrics.requests, 1);
    let after = hostcalls::get_metric(metrics.requests);
    report.check(
        "metric-counter",
        inc.is_ok() && after == Ok(before + 1),
        (inc, before, after),
    );
    let down = hostcalls::increment_metric(metrics.requests, -1);
    report.check(
        "metric-counter-negative",
        down == Err(Status::BadArgument),
        down,
    );
    let set = hostcalls::record_metric(metrics.gauge, 42);
    let moved = hostcalls::increment_metric(metrics.gauge, -2);
    let read = hostcalls::get_metric(metrics.gauge);
    report.check(
        "metric-gauge",
        set.is_ok() && moved.is_ok() && read == Ok(40),
        (set, moved, read),
    );
    let recorded = hostcalls::record_metric(metrics.histogram, 7);
    let read = hostcalls::get_metric(metrics.histogram);
    report.check(
        "metric-histogram",
        recorded.is_ok() && read == Err(Status::BadArgument),
        (recorded, read),
    );
    let unknown = hostcalls::get_metric(0x7fff_fff0);
    report.check("metric-unknown", unknown == Err(Status::NotFound), unknown);
}

/// Switching the effective context changes what stream-scoped calls act on.
fn check_effective_context(report: &mut Report, context_id: u32, root_context_id: u32) {
    let to_root = hostcalls::set_effective_context(root_context_id);
    let from_root = hostcalls::get_map(MapType::HttpRequestHeaders).map(|h| h.len());
    let back = hostcalls::set_effective_context(context_id);
    let from_self = hostcalls::get_map(MapType::HttpRequestHeaders).map(|h| h.len());
    report.check(
        "effective-context-root",
        to_root.is_ok() && from_root == Ok(0),
        (to_root, from_root),
    );
    report.check(
        "effective-context-self",
        back.is_ok() && matches!(from_self, Ok(n) if n > 0),
        (back, from_self),
    );
    let unknown = hostcalls::set_effective_context(0x7fff_fff0);
    report.check(
        "effective-context-unknown",
        unknown == Err(Status::BadArgument),
        unknown,
    );
}

/// Calls that have nothing to act on here (no gRPC service, no foreign function, no pending
/// shutdown): each must come back as an error status, never as a trap.
fn check_unsupported_calls(report: &mut Report) {
    let call = hostcalls::dispatch_grpc_call(
        UNKNOWN_CLUSTER,
        "abi.Probe",
        "Check",
        vec![],
        Some(b""),
        CALLOUT_TIMEOUT,
    );
    report.check("grpc-call", call.is_err(), call);
    let stream = hostcalls::open_grpc_stream(UNKNOWN_CLUSTER, "abi.Probe", "Watch", vec![]);
    report.check("grpc-stream", stream.is_err(), stream);
    let bogus = 0x7fff_fff0;
    let send = hostcalls::send_grpc_stream_message(bogus, Some(b"x"), false);
    report.check("grpc-send", send.is_err(), send);
    let cancel = hostcalls::cancel_grpc_call(bogus);
    report.check("grpc-cancel", cancel == Err(Status::NotFound), cancel);
    let cancel = hostcalls::cancel_grpc_stream(bogus);
    report.check(
        "grpc-cancel-stream",
        cancel == Err(Status::NotFound),
        cancel,
    );
    let close = hostcalls::close_grpc_stream(bogus);
    report.check("grpc-close", close == Err(Status::NotFound), close);
    let status = hostcalls::get_grpc_status();
    report.check("grpc-status", status.is_ok(), &status);
    let foreign = hostcalls::call_foreign_function("abi_probe_no_such_function", Some(b"x"));
    report.check(
        "foreign-function",
        foreign == Err(Status::NotFound),
        &foreign,
    );
    let done = raw::done();
    report.check("done-unsolicited", done == Status::NotFound, done);
}

// ================= misbehaviour =================

/// A genuine Wasm trap, not a Rust panic.
fn trap() -> ! {
    #[cfg(target_arch = "wasm32")]
    {
        core::arch::wasm32::unreachable()
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        std::process::abort()
    }
}

/// Never returns; `black_box` keeps the optimiser from proving the loop useless.
fn spin() -> ! {
    let mut turns: u64 = 0;
    loop {
        turns = std::hint::black_box(turns.wrapping_add(1));
    }
}

/// Allocates `mib` MiB and writes to all of it. Past the host's memory cap the allocation
/// fails, and Rust aborts (a trap) rather than return.
fn grow(mib: usize) -> usize {
    let len = mib.saturating_mul(1 << 20);
    let mut block: Vec<u8> = Vec::with_capacity(len);
    block.resize(len, 0xa5);
    std::hint::black_box(&block);
    block.len()
}

// ================= network (TCP) context =================

struct ProbeTcp {
    metrics: Metrics,
    trap_data: Option<String>,
}

impl Context for ProbeTcp {}

impl StreamContext for ProbeTcp {
    fn on_new_connection(&mut self) -> Action {
        count(self.metrics.tcp_connections);
        let id = hostcalls::get_property(vec!["connection", "id"]);
        log::info!("abi-probe: new connection, id property {id:?}");
        // Envoy runs this before the TLS handshake: the peer certificate is not known yet.
        let peer = hostcalls::get_property(vec!["connection", "subject_peer_certificate"]);
        log::info!("abi-probe: peer certificate at new connection: {peer:?}");
        Action::Continue
    }

    fn on_downstream_data(&mut self, data_size: usize, _end_of_stream: bool) -> Action {
        let peer = hostcalls::get_property(vec!["connection", "subject_peer_certificate"]);
        log::info!("abi-probe: peer certificate at data: {peer:?}");
        if data_size > 0 {
            let data = self.get_downstream_data(0, data_size).unwrap_or_default();
            if let Some(trigger) = &self.trap_data {
                if data.starts_with(trigger.as_bytes()) {
                    log::warn!("abi-probe: trap data received, trapping the VM (test filter)");
                    trap();
                }
            }
            let read = data.len();
            if read != data_size {
                log::warn!("abi-probe: downstream callback said {data_size} bytes, read {read}");
            }
            self.set_downstream_data(0, 0, b"probe:");
        }
        Action::Continue
    }

    fn on_upstream_data(&mut self, data_size: usize, _end_of_stream: bool) -> Action {
        let read = self.get_upstream_data(0, data_size).map_or(0, |d| d.len());
        // Recording on a counter adds to it.
        let _ = hostcalls::record_metric(self.metrics.tcp_upstream_bytes, read as u64);
        Action::Continue
    }

    fn on_downstream_close(&mut self, _peer_type: PeerType) {
        count(self.metrics.tcp_closes);
    }

    fn on_upstream_close(&mut self, _peer_type: PeerType) {
        count(self.metrics.tcp_closes);
    }

    fn on_log(&mut self) {
        count(self.metrics.streams_logged);
    }
}
