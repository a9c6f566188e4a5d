//! The only place that talks to proxy-wasm on behalf of our filters: configuration loading,
//! deny responses, metrics and the panic hook. Filter crates stay thin; policy stays pure.

pub mod filter_state;
pub mod remote_keys;

use policy::DenyReason;
use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, MetricType};

/// Logs panics through the host before the VM aborts, so the reason reaches Envoy's log. (Envoy
/// then answers 503 for the request; a panic is never an allow.)
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let _ = hostcalls::log(
            proxy_wasm::types::LogLevel::Critical,
            &format!("filter panicked: {info}"),
        );
    }));
}

/// Reads the plugin configuration (only available inside `on_configure`) and parses it. Every
/// failure is logged with a message that says what is wrong; the caller returns false so Envoy
/// rejects the configuration.
pub fn parse_plugin_config<T: serde::de::DeserializeOwned>(filter: &str) -> Option<T> {
    let bytes = parse_plugin_config_bytes(filter)?;
    match serde_json::from_slice(&bytes) {
        Ok(config) => Some(config),
        Err(e) => {
            log::error!("{filter}: configuration rejected: {e}");
            None
        }
    }
}

/// The raw plugin configuration (`{}` when there is none), for filters that parse and
/// validate it in `policy`. A failure to read it is logged.
pub fn parse_plugin_config_bytes(filter: &str) -> Option<Vec<u8>> {
    match hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX) {
        Ok(Some(bytes)) => Some(bytes),
        Ok(None) => Some(b"{}".to_vec()),
        Err(status) => {
            log::error!("{filter}: cannot read plugin configuration: {status:?}");
            None
        }
    }
}

/// Sends the one deny response every filter uses: the status of the reason, an NGSI error
/// body, and any extra headers (e.g. `WWW-Authenticate`).
pub fn send_deny(reason: &DenyReason, extra_headers: &[(&str, &str)]) {
    let body = reason.ngsi_body();
    let mut headers = vec![("content-type", "application/json")];
    headers.extend_from_slice(extra_headers);
    if let Err(status) =
        hostcalls::send_http_response(reason.status(), headers, Some(body.as_bytes()))
    {
        // Without a local reply the stream would hang paused; resetting it is the closed way.
        log::error!("cannot send deny response ({status:?}); resetting the stream");
        let _ = hostcalls::reset_http_request();
    }
}

/// A counter that never fails the request: if the host refuses, the metric is dropped and a
/// log line says so.
#[derive(Debug, Clone, Copy)]
pub struct Counter(Option<u32>);

impl Counter {
    pub fn define(name: &str) -> Self {
        match hostcalls::define_metric(MetricType::Counter, name) {
            Ok(id) => Counter(Some(id)),
            Err(status) => {
                log::warn!("cannot define metric {name}: {status:?}");
                Counter(None)
            }
        }
    }

    pub fn inc(&self) {
        self.add(1);
    }

    pub fn add(&self, n: u64) {
        if let (Some(id), Ok(n)) = (self.0, i64::try_from(n)) {
            if n > 0 {
                let _ = hostcalls::increment_metric(id, n);
            }
        }
    }
}

/// The host clock in whole seconds since the epoch, or None if the host can't say (callers
/// fail closed).
pub fn now_secs() -> Option<u64> {
    let now = hostcalls::get_current_time().ok()?;
    now.duration_since(std::time::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_secs())
}

/// A string property (e.g. `connection.subject_peer_certificate`); absent or unreadable → None.
pub fn string_property(path: &[&str]) -> Option<String> {
    match hostcalls::get_property(path.to_vec()) {
        Ok(Some(bytes)) => String::from_utf8(bytes).ok(),
        _ => None,
    }
}

/// A boolean property (Envoy encodes it as one byte).
pub fn bool_property(path: &[&str]) -> bool {
    matches!(hostcalls::get_property(path.to_vec()), Ok(Some(b)) if b.first() == Some(&1))
}

/// Every request header, names lowercase, in order (repeated names kept). Read it while the
/// request headers are available (Envoy drops them once the filter continued).
pub fn request_headers() -> Vec<(String, String)> {
    hostcalls::get_map(proxy_wasm::types::MapType::HttpRequestHeaders)
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v))
        .collect()
}

/// The first value of `name` (lowercase) in headers from [`request_headers`], or "".
pub fn first_header(headers: &[(String, String)], name: &str) -> String {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.clone())
        .unwrap_or_default()
}

/// The status and body of the callout answer being handled (status 0: the call was reset, no
/// headers).
pub fn callout_answer() -> (u32, Vec<u8>) {
    let headers =
        hostcalls::get_map(proxy_wasm::types::MapType::HttpCallResponseHeaders).unwrap_or_default();
    let status = headers
        .iter()
        .find(|(k, _)| k == ":status")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let body = hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, usize::MAX)
        .ok()
        .flatten()
        .unwrap_or_default();
    (status, body)
}

/// Reads a request header, returning every value (Envoy's single-value call hides repeats,
/// which an authorization filter must see).
pub fn request_header_values(name: &str) -> Vec<String> {
    match hostcalls::get_map(proxy_wasm::types::MapType::HttpRequestHeaders) {
        Ok(pairs) => pairs
            .into_iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// Counters by decision and reason, `<prefix>.allowed`, `<prefix>.denied.<reason>` and
/// `<prefix>.shadow.denied` (denials shadow mode let through).
#[derive(Debug, Clone, Copy)]
pub struct DecisionMetrics {
    allowed: Counter,
    bad_request: Counter,
    unauthenticated: Counter,
    forbidden: Counter,
    too_large: Counter,
    unavailable: Counter,
    shadow_denied: Counter,
}

impl DecisionMetrics {
    pub fn define(prefix: &str) -> Self {
        let c = |name: &str| Counter::define(&format!("{prefix}.{name}"));
        DecisionMetrics {
            allowed: c("allowed"),
            bad_request: c("denied.bad_request"),
            unauthenticated: c("denied.unauthenticated"),
            forbidden: c("denied.forbidden"),
            too_large: c("denied.too_large"),
            unavailable: c("denied.unavailable"),
            shadow_denied: c("shadow.denied"),
        }
    }

    /// Counts one decision (a denial in shadow mode also as `shadow.denied`).
    pub fn record(&self, decision: &policy::Decision, mode: policy::enforcement::Mode) {
        let reason = match decision {
            policy::Decision::Allow(_) => return self.allowed.inc(),
            policy::Decision::Deny(reason) => reason,
        };
        match reason {
            DenyReason::BadRequest(_) => self.bad_request.inc(),
            DenyReason::Unauthenticated(_) => self.unauthenticated.inc(),
            DenyReason::Forbidden(_) => self.forbidden.inc(),
            DenyReason::PayloadTooLarge(_) => self.too_large.inc(),
            DenyReason::Unavailable(_) => self.unavailable.inc(),
        }
        if mode == policy::enforcement::Mode::Shadow {
            self.shadow_denied.inc();
        }
    }
}

/// What a request's decision is about, for the decision line.
pub struct Decided<'a> {
    pub filter: &'a str,
    pub mode: policy::enforcement::Mode,
    pub identity: Option<&'a policy::Identity>,
    /// e.g. `ngsi-v2 GET /v2/entities/Room1`.
    pub operation: &'a str,
    /// [`policy::enforcement::summarize_accesses`] of what the request touches.
    pub entities: &'a str,
}

/// Applies a decision the same way in every policy filter: one decision log line, the
/// metrics, and for a denial in enforce mode the deny response (with the client-facing
/// reason). Returns true when the request may go on (allowed, or shadow mode).
pub fn apply_decision(
    about: &Decided,
    decision: &policy::Decision,
    metrics: &DecisionMetrics,
) -> bool {
    use policy::enforcement::{client_reason, decision_line, Mode};
    let line = decision_line(
        about.filter,
        about.mode,
        about.identity,
        about.operation,
        about.entities,
        decision,
    );
    metrics.record(decision, about.mode);
    match decision {
        policy::Decision::Allow(_) => {
            log::info!("{line}");
            true
        }
        policy::Decision::Deny(reason) => {
            log::warn!("{line}");
            if about.mode == Mode::Shadow {
                return true;
            }
            send_deny(&client_reason(reason), &[]);
            false
        }
    }
}
