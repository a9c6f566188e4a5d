//! The only place that talks to proxy-wasm on behalf of our filters: configuration loading,
//! deny responses, metrics and the panic hook. Filter crates stay thin; policy stays pure.

pub mod counters;
pub mod filter_state;
pub mod host;
pub mod remote_keys;

use std::cell::RefCell;
use std::collections::HashMap;

use policy::config_error::ConfigError;
use policy::decision_line::{DecisionKind, DecisionLine, LogAllows, Reason};
use policy::header_pairs::{HeaderPairs, NotText};
use policy::log_text::{bounded, bounded_debug};
use policy::DenyReason;
use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, MapType, MetricType};

/// Logs panics through the host before the VM aborts, so the reason reaches Envoy's log. (Envoy
/// then answers 503 for the request; a panic is never an allow.)
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        // What this VM counted is handed over before it goes.
        counters::flush();
        let _ = hostcalls::log(
            proxy_wasm::types::LogLevel::Critical,
            &format!("filter panicked: {}", bounded(&info.to_string())),
        );
    }));
}

/// Reads the plugin configuration (only available inside `on_configure`), parses it and builds
/// the filter's engine from it (`build`, e.g. `EntityAcl::new`). Every failure is logged with
/// the JSON path of the bad value when there is one (`entity-acl: configuration refused at
/// acl.rules[2].actions[0]: unknown variant ...`); the caller then returns false so Envoy
/// rejects the configuration.
pub fn load_config<C, T>(filter: &str, build: impl FnOnce(C) -> Result<T, String>) -> Option<T>
where
    C: serde::de::DeserializeOwned,
{
    let bytes = parse_plugin_config_bytes(filter)?;
    let built = policy::config_error::parse::<C>(&bytes)
        .and_then(|config| build(config).map_err(ConfigError::Invalid));
    match built {
        Ok(engine) => Some(engine),
        Err(e) => {
            log::error!("{filter}: {e}");
            None
        }
    }
}

/// A variable of the VM's environment (WASI `environ`: in Envoy, what
/// `vm_config.environment_variables` exposes; in host-harness, a filter's `vm_env`), or None
/// when it is unset or not text. Read at configure time only: a VM's environment does not
/// change, and request paths must not depend on it.
pub fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// [`load_config`] for a configuration that needs no further building.
pub fn parse_plugin_config<T: serde::de::DeserializeOwned>(filter: &str) -> Option<T> {
    load_config(filter, Ok::<T, String>)
}

/// The raw plugin configuration (`{}` when there is none), for filters that parse and
/// validate it in `policy`. A failure to read it is logged.
pub fn parse_plugin_config_bytes(filter: &str) -> Option<Vec<u8>> {
    match host::read_buffer(BufferType::PluginConfiguration, 0, usize::MAX) {
        Ok(Some(bytes)) if !bytes.is_empty() => Some(bytes),
        Ok(_) => Some(b"{}".to_vec()),
        Err(status) => {
            log::error!("{filter}: cannot read plugin configuration: {status}");
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
    if let Err(status) = host::send_local_response(reason.status(), &headers, body.as_bytes()) {
        // Without a local reply the stream would hang paused; resetting it is the closed way.
        log::error!("cannot send deny response ({status}); resetting the stream");
        let _ = hostcalls::reset_http_request();
    }
}

/// Sends `call` to its cluster: the one place every filter's callouts leave through. Err: the
/// host refused it (e.g. an unknown cluster). This stays the SDK's `dispatch_http_call`: it
/// registers the token with the SDK's dispatcher, which traps on an answer to a token it does
/// not know (a raw-ABI call was tried and every callout answer trapped). Its panic arm is for
/// statuses Envoy's httpCall is not known to return (Ok, BadArgument, InternalFailure).
pub fn send_call(call: &policy::upstream::HttpCall) -> Result<u32, proxy_wasm::types::Status> {
    hostcalls::dispatch_http_call(
        &call.cluster,
        call.envoy_headers(),
        call.body(),
        vec![],
        call.timeout(),
    )
}

/// [`send_call`], counted as sent or failed; None when the host refused it (logged).
pub fn dispatch_call(
    filter: &str,
    call: &policy::upstream::HttpCall,
    sent: Counter,
    failed: Counter,
) -> Option<u32> {
    match send_call(call) {
        Ok(token) => {
            sent.inc();
            Some(token)
        }
        Err(status) => {
            failed.inc();
            log::error!("{filter}: cannot call cluster {}: {status:?}", call.cluster);
            None
        }
    }
}

/// A counter that never fails the request: if the host refuses to define it, nothing is
/// counted and a log line says so. Increments are counted in guest memory and reach Envoy in
/// batches ([`counters`]: on the root's tick, at most [`counters::FLUSH_PERIOD`] late), so
/// counting costs a request no host call.
#[derive(Debug, Clone, Copy)]
pub struct Counter(Option<usize>);

impl Counter {
    /// The counter `name`, defined with the host once per VM (a second `define` of the same
    /// name is the same counter).
    pub fn define(name: &str) -> Self {
        Counter(counters::slot(name, || {
            match hostcalls::define_metric(MetricType::Counter, name) {
                Ok(id) => Some(id),
                Err(status) => {
                    log::warn!("cannot define metric {name}: {status:?}");
                    None
                }
            }
        }))
    }

    pub fn inc(&self) {
        self.add(1);
    }

    pub fn add(&self, n: u64) {
        if let Some(slot) = self.0 {
            if n > 0 {
                counters::add(slot, n);
            }
        }
    }
}

/// Hands the counts this VM holds to the host now. Every root context calls it on its tick and
/// when it is done; see [`counters`].
pub fn flush_counters() {
    counters::flush();
}

/// The host clock in whole seconds since the epoch, or None if the host can't say (callers
/// fail closed).
pub fn now_secs() -> Option<u64> {
    now_since_epoch().map(|d| d.as_secs())
}

/// The host clock in milliseconds since the epoch (None: the host can't say).
pub fn now_millis() -> Option<u64> {
    now_since_epoch().and_then(|d| u64::try_from(d.as_millis()).ok())
}

/// The host clock, read once per [`one_stream_callback`] (every stage of one callback sees
/// the same instant; outside one, read each time).
fn now_since_epoch() -> Option<std::time::Duration> {
    let read = || {
        hostcalls::get_current_time()
            .ok()?
            .duration_since(std::time::UNIX_EPOCH)
            .ok()
    };
    HELD.with(|held| match held.borrow_mut().as_mut() {
        Some(held) => *held.now.get_or_insert_with(read),
        None => read(),
    })
}

thread_local! {
    /// What one callback on one stream holds back until it ends ([`one_stream_callback`]).
    static HELD: RefCell<Option<Held>> = const { RefCell::new(None) };
}

/// Host reads and writes a callback makes once however many stages decide in it.
#[derive(Default)]
struct Held {
    /// The filter state of the callback's last decision line (a later line replaces an
    /// earlier one in Envoy's filter state anyway: the access log shows the deciding stage).
    filter_state: Option<DecisionLine>,
    /// The host clock.
    now: Option<Option<std::time::Duration>>,
}

/// Runs `work`, one callback's work on the current stream (the effective context), holding
/// back the decision lines' filter state to write it once when `work` ends, and reading the
/// host's clock at most once. Every stage of a gateway decides in the same
/// callback, so a request exports its facts in 6 host calls instead of 6 per stage. Callers
/// must not switch the effective context inside `work` without a nested call of their own.
pub fn one_stream_callback<R>(work: impl FnOnce() -> R) -> R {
    let outer = HELD.with(|held| held.replace(Some(Held::default())));
    let result = work();
    let ours = HELD.with(|held| held.replace(outer));
    if let Some(line) = ours.and_then(|held| held.filter_state) {
        export_filter_state(&line);
    }
    result
}

fn export_filter_state(line: &DecisionLine) {
    // Outside a stream (none is current) there is no filter state to set: nothing to export.
    for (name, value) in line.filter_state() {
        let _ = host::set_property(name, value.as_bytes());
    }
}

thread_local! {
    /// The host's log level as last read (None inside: the host did not say), read on first
    /// use and again on every root tick ([`on_root_tick`]), not on every request.
    static LOG_LEVEL: std::cell::Cell<Option<Option<u32>>> = const { std::cell::Cell::new(None) };
}

/// Whether the host logs at `level`, by the level read at the last root tick (or on first
/// use): a change of Envoy's log level at run time (`/logging`) applies within one tick.
fn logs_at(level: host::Level) -> bool {
    LOG_LEVEL.with(|cached| {
        let host_level = cached.get().unwrap_or_else(|| {
            let read = host::log_level();
            cached.set(Some(read));
            read
        });
        host_level.is_some_and(|host_level| host_level <= level as u32)
    })
}

/// What every root context does on its tick, for the glue: hands the counters to the host
/// ([`counters`]) and reads the host's log level again (decision lines follow a change of it
/// within one tick).
pub fn on_root_tick() {
    counters::flush();
    LOG_LEVEL.with(|cached| cached.set(Some(host::log_level())));
}

/// A string property (e.g. `connection.subject_peer_certificate`); absent, unreadable or not
/// text → None.
pub fn string_property(path: &[&str]) -> Option<String> {
    match host::property(path) {
        Ok(Some(bytes)) => String::from_utf8(bytes).ok(),
        _ => None,
    }
}

/// A boolean property (Envoy encodes it as one byte).
pub fn bool_property(path: &[&str]) -> bool {
    matches!(host::property(path), Ok(Some(b)) if b.first() == Some(&1))
}

/// Every request header as bytes, names lowercase, in order (repeated names kept). Read it
/// while the request headers are available (Envoy drops them once the filter continued).
/// A map the host can't give is logged and answered 503 by the caller.
pub fn request_header_pairs(filter: &str) -> Result<HeaderPairs, DenyReason> {
    host::header_map(MapType::HttpRequestHeaders).map_err(|e| {
        log::error!("{filter}: cannot read the request headers: {e}");
        DenyReason::Unavailable("the request headers could not be read".into())
    })
}

/// The request headers the filter's engine reads (`reads`), as text. A header it reads that is
/// not UTF-8 (legal obs-text in HTTP/1.1, e.g. `caf\xE9`) is refused with 400, a log line and
/// the counter `<filter>.denied.header_not_text`; headers it does not read are not
/// looked at and go upstream untouched.
pub fn request_text_headers(
    filter: &str,
    reads: impl Fn(&str) -> bool,
) -> Result<Vec<(String, String)>, DenyReason> {
    let pairs = request_header_pairs(filter)?;
    pairs
        .text_view(reads)
        .map_err(|e| refuse_not_text(filter, &e))
}

/// A filter's metric prefix: its name with `_` for `-` (`token-auth` → `token_auth`).
fn metric_prefix(filter: &str) -> String {
    filter.replace('-', "_")
}

/// Logs and counts a needed header that is not text; the 400 to answer.
pub fn refuse_not_text(filter: &str, e: &NotText) -> DenyReason {
    let metric_prefix = metric_prefix(filter);
    // The decision line follows (reason bad_request); this line names the header.
    log::warn!(
        "{filter}: refusing reason=header_not_text header={}",
        bounded_debug(&e.name)
    );
    Counter::define(&format!("{metric_prefix}.denied.header_not_text")).inc();
    e.deny_reason()
}

/// The first value of `name` (lowercase) in text headers, or "".
pub fn first_header(headers: &[(String, String)], name: &str) -> String {
    header_text(headers, name).to_string()
}

/// The first value of `name` (lowercase) in text headers, borrowed, or "".
pub fn header_text<'a>(headers: &'a [(String, String)], name: &str) -> &'a str {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map_or("", |(_, v)| v.as_str())
}

/// The status and body of the callout answer being handled. Status 0 means the call failed:
/// reset (no headers), or an answer we can't trust as text — a `:status` that is not three
/// digits, or a body that is not UTF-8 (every dependency we call answers JSON). Such an answer
/// is logged and counted as `<filter>.callout.malformed`; the caller fails closed (503).
pub fn callout_answer(filter: &str) -> (u32, Vec<u8>) {
    let metric_prefix = metric_prefix(filter);
    let headers = match host::header_map(MapType::HttpCallResponseHeaders) {
        Ok(headers) => headers,
        Err(e) => {
            log::warn!("{filter}: cannot read a callout answer's headers: {e}");
            Counter::define(&format!("{metric_prefix}.callout.malformed")).inc();
            return (0, Vec::new());
        }
    };
    if headers.is_empty() {
        return (0, Vec::new());
    }
    let body = match host::read_buffer(BufferType::HttpCallResponseBody, 0, usize::MAX) {
        Ok(body) => body.unwrap_or_default(),
        Err(status) => {
            log::warn!("{filter}: cannot read a callout answer's body: {status}");
            return (0, Vec::new());
        }
    };
    match policy::header_pairs::answer_status(&headers, &body) {
        Ok(status) => (status, body),
        Err(why) => {
            log::warn!(
                "{filter}: callout answer refused: {why} (status bytes {})",
                bounded(&String::from_utf8_lossy(
                    headers.first(":status").unwrap_or_default()
                ))
            );
            Counter::define(&format!("{metric_prefix}.callout.malformed")).inc();
            (0, Vec::new())
        }
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
    pub filter: &'static str,
    pub mode: policy::enforcement::Mode,
    pub log_allows: LogAllows,
    pub identity: Option<&'a policy::Identity>,
    /// e.g. `ngsi-v2 GET /v2/entities/Room1`.
    pub operation: &'a str,
    /// What the request touches.
    pub entities: Entities<'a>,
    /// The request headers as the filter read them, for the decision line's request facts.
    pub request_headers: &'a policy::header_pairs::HeaderPairs,
}

/// What a request touches, for the logged decision line only (summarised when it is logged).
#[derive(Debug, Clone, Copy)]
pub enum Entities<'a> {
    /// Already summarised ([`policy::enforcement::summarize_accesses`]).
    Summary(&'a str),
    /// The request's accesses.
    Of(&'a [policy::access::Access]),
}

impl<'a> Entities<'a> {
    fn summary(self) -> std::borrow::Cow<'a, str> {
        match self {
            Entities::Summary(s) => std::borrow::Cow::Borrowed(s),
            Entities::Of(accesses) => {
                std::borrow::Cow::Owned(policy::enforcement::summarize_accesses(accesses))
            }
        }
    }
}

/// Applies a decision the same way in every NGSI policy filter: the decision line (logged,
/// exported, counted), the filter's metrics, and for a denial in enforce mode the deny
/// response (with the client-facing reason). Returns true when the request may go on
/// (allowed, or shadow mode).
pub fn apply_decision(
    about: &Decided,
    decision: &policy::Decision,
    metrics: &DecisionMetrics,
) -> bool {
    match record_decision(about, decision, metrics) {
        Ok(()) => true,
        Err(reason) => {
            send_deny(&reason, &[]);
            false
        }
    }
}

/// [`apply_decision`] without the response: logs, exports and counts the decision, and
/// returns the client-facing reason to answer with when the request must stop (a denial in
/// enforce mode), for a caller that sends the one local response itself.
pub fn record_decision(
    about: &Decided,
    decision: &policy::Decision,
    metrics: &DecisionMetrics,
) -> Result<(), DenyReason> {
    use policy::enforcement::{client_reason, Mode};
    let line = DecisionLine::new(about.filter, about.mode, decision)
        .subject(about.identity.map(|i| i.subject.as_str()));
    metrics.record(decision, about.mode);
    emit_decision_from(line, about.request_headers, about.log_allows, |line| {
        line.text("operation", about.operation)
            .literal("entities", &about.entities.summary())
    });
    match decision {
        policy::Decision::Allow(_) => Ok(()),
        policy::Decision::Deny(_) if about.mode == Mode::Shadow => Ok(()),
        policy::Decision::Deny(reason) => Err(client_reason(reason)),
    }
}

/// `line` with the method, path, tenant (`fiware-service`, else `ngsild-tenant`) and
/// `x-request-id` of the request, from the headers the filter read (kept up to date by its
/// own changes): no host call.
pub fn with_facts_from(
    line: DecisionLine,
    headers: &policy::header_pairs::HeaderPairs,
) -> DecisionLine {
    let get = |name: &str| headers.first(name).map(String::from_utf8_lossy);
    let tenant = get("fiware-service").or_else(|| get("ngsild-tenant"));
    line.request(
        get(":method").as_deref(),
        get(":path").as_deref(),
        tenant.as_deref(),
        get("x-request-id").as_deref(),
    )
}

/// The one place every filter's decisions go through: the decision line is logged (denials at
/// warning, allows as `log_allows` says), its facts are set as filter state for Envoy's access
/// log (`wasm.iot_filter`, `wasm.iot_decision`, ...; inside [`one_stream_callback`] when it
/// ends), and the labelled counter
/// `iot_decisions.filter.<f>.decision.<d>.reason.<r>` is incremented.
pub fn emit_decision(line: &DecisionLine, log_allows: LogAllows) {
    if let Some(level) = log_level_of(line, log_allows) {
        let _ = host::log(level, &line.to_string());
    }
    export_and_count(line.clone());
}

/// [`emit_decision`] of `line` with the request facts of `headers` ([`with_facts_from`]) and
/// the filter's own fields (`details`: operation, entities, ...). Both appear only in the
/// logged line (not in the filter state or the counters), so they are read and rendered only
/// when the host logs it: an allow at the default `log_allows` (debug) costs no header
/// lookups, no summaries and no copies.
pub fn emit_decision_from(
    line: DecisionLine,
    headers: &policy::header_pairs::HeaderPairs,
    log_allows: LogAllows,
    details: impl FnOnce(DecisionLine) -> DecisionLine,
) {
    match log_level_of(&line, log_allows) {
        Some(level) => {
            let line = details(with_facts_from(line, headers));
            let _ = host::log(level, &line.to_string());
            export_and_count(line);
        }
        None => export_and_count(line),
    }
}

/// The level `line` is logged at, None when the host would drop it.
fn log_level_of(line: &DecisionLine, log_allows: LogAllows) -> Option<host::Level> {
    use host::Level;
    let level = match (line.is_allow(), log_allows) {
        (false, _) => Some(Level::Warn),
        (true, LogAllows::Info) => Some(Level::Info),
        (true, LogAllows::Debug) => Some(Level::Debug),
        (true, LogAllows::Off) => None,
    };
    level.filter(|l| logs_at(*l))
}

/// The filter state and the counters of a decision line. Inside [`one_stream_callback`] the
/// line is held (its filter state rendered once, for the callback's last line).
fn export_and_count(line: DecisionLine) {
    labelled_counter(&line).inc();
    for rule in line.metric_rules() {
        rule_counter(&line, rule).inc();
    }
    let unheld = HELD.with(|held| match held.borrow_mut().as_mut() {
        Some(held) => {
            held.filter_state = Some(line);
            None
        }
        None => Some(line),
    });
    if let Some(line) = unheld {
        export_filter_state(&line);
    }
}

thread_local! {
    /// The labelled counter of each (filter, decision, reason) seen, found without building
    /// its name: every part is from a closed set, so the list stays short (a linear search
    /// over a few entries beats hashing the ~60-byte name on every request).
    static LABELLED_COUNTERS: RefCell<Vec<(LabelledKey, Counter)>> =
        const { RefCell::new(Vec::new()) };
}

/// What names a labelled decision counter: (filter, decision, reason).
type LabelledKey = (&'static str, DecisionKind, Reason);

/// `line`'s `iot_decisions.filter.<f>.decision.<d>.reason.<r>` counter, defined on first use.
fn labelled_counter(line: &DecisionLine) -> Counter {
    let key = (line.filter, line.kind, line.reason);
    LABELLED_COUNTERS.with(|counters| {
        let mut counters = counters.borrow_mut();
        if let Some((_, counter)) = counters.iter().find(|(k, _)| *k == key) {
            return *counter;
        }
        let counter = decision_counter(&line.metric_name());
        counters.push((key, counter));
        counter
    })
}

thread_local! {
    /// The per-rule counter of each (filter, decision, rule) seen, found without building its
    /// name (and hashing it) on every request: the rules are the configuration's, so a short
    /// list holds the ones that decide; past [`REMEMBERED_RULE_COUNTERS`] the others are found
    /// by name.
    static RULE_COUNTERS: RefCell<Vec<(RuleKey, Counter)>> = const { RefCell::new(Vec::new()) };
}

/// What names a per-rule decision counter: (filter, decision, rule).
type RuleKey = (&'static str, DecisionKind, String);

/// Per-rule counters found by their key; a policy with more rules finds the rest by name.
const REMEMBERED_RULE_COUNTERS: usize = 64;

/// `line`'s per-rule counter of `rule`, defined on first use.
fn rule_counter(line: &DecisionLine, rule: &str) -> Counter {
    RULE_COUNTERS.with(|counters| {
        let mut counters = counters.borrow_mut();
        let known = counters.iter().find(|((filter, kind, r), _)| {
            *filter == line.filter && *kind == line.kind && r == rule
        });
        if let Some((_, counter)) = known {
            return *counter;
        }
        let counter = decision_counter(&line.rule_metric_name(rule));
        if counters.len() < REMEMBERED_RULE_COUNTERS {
            counters.push(((line.filter, line.kind, rule.to_string()), counter));
        }
        counter
    })
}

thread_local! {
    /// Labelled decision counters, defined once per VM (Envoy allocates a new metric id on
    /// every define). The names come from closed sets and the configured rule names, so the
    /// map stays small; [`MAX_DECISION_COUNTERS`] bounds it whatever happens.
    static DECISION_COUNTERS: RefCell<HashMap<String, Counter>> = RefCell::new(HashMap::new());
}

/// At most this many labelled counters per VM (the closed-set ones number under a hundred;
/// the rest are per-rule ones). Beyond it a new name is not counted: stats must not grow
/// without bound even if a policy names thousands of rules.
const MAX_DECISION_COUNTERS: usize = 4096;

fn decision_counter(name: &str) -> Counter {
    DECISION_COUNTERS.with(|counters| {
        let mut counters = counters.borrow_mut();
        if let Some(counter) = counters.get(name) {
            return *counter;
        }
        if counters.len() >= MAX_DECISION_COUNTERS {
            return Counter(None);
        }
        *counters
            .entry(name.to_string())
            .or_insert_with(|| Counter::define(name))
    })
}
