//! mqtt-acl: an Envoy network filter (before tcp_proxy) that authenticates MQTT CONNECTs and
//! checks every PUBLISH and SUBSCRIBE against topic ACLs and device ownership.
//!
//! The decisions and every byte written are `policy::mqtt_acl`'s ([`Connection`]: the MQTT
//! session, raw or inside a WebSocket, `"transport": "websocket"`); this crate
//! only moves bytes between Envoy's buffers and the session, writes the decision lines, counts,
//! and closes connections.
//!
//! Closing. Envoy loses the data a read/write callback hands on when the same callback closes
//! the connection (the close runs before the bytes reach the write buffer). So the refusing
//! CONNACK is written by one callback and the connection is closed by the next one, or by the
//! root context's tick (every 250 ms) through `proxy_set_effective_context`. The tick also
//! closes connections whose token expired, and re-checks connections admitted on a registry
//! device key (`RegistryRechecks`: its calls are the root context's, answered to it, one per
//! device; a connection whose key is no longer listed is closed like an expired one).
//!
//! Keys. A provider's remote JWKS are fetched by the root context with token-auth's code
//! (`proxy_glue::remote_keys`: discovery, refresh, shared data between workers, last good set
//! kept): at configure time, when their refresh is due, and (at most every 30 s) when a CONNECT
//! brought a token whose `kid` they lack; that CONNECT was refused as "server unavailable".
//!
//! HTTP backend. When the session asks the `http_backend` (mosquitto-go-auth's protocol) the
//! stream context sends the requests (`proxy_glue::send_call`, answered to the same context) and
//! holds the client's data back: it answers StopIteration, so Envoy keeps the read buffer
//! (and the filter's handle on it) and tcp_proxy gets nothing. The bytes already decided stay
//! at the front of that buffer (`held`); new client data lands behind them and is fed to the
//! session on its own. When the last answer is in, the decided bytes are written to the
//! buffer and `proxy_continue_stream(Downstream)` lets tcp_proxy forward it (Envoy's
//! `continueReading`; the first time, for a CONNECT, this also starts tcp_proxy).

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::time::Duration;

use policy::decision_line::{LogAllows, STATE_DENIALS};
use policy::log_text::bounded_debug;
use policy::mqtt_acl::{
    Ask, AskRequest, BackendAnswer, BackendVerdict, Connection, Env, MqttAcl, MqttAclConfig,
    Output, RecheckCall, RegistryRechecks,
};
use policy::mtls::PeerCertificate;
use proxy_glue::filter_state::TCP_PROXY_CLUSTER;
use proxy_glue::host;
use proxy_glue::remote_keys::{KeyMetrics, RemoteKeys};
use proxy_glue::{bool_property, now_secs, string_property, Counter};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, RootContext, StreamContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, PeerType};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_glue::install_panic_hook();
    proxy_wasm::set_root_context(|_| Box::new(Root { state: None }));
}}

const TICK: Duration = Duration::from_millis(250);

/// Every counter, `mqtt_acl.<name>`.
const COUNTERS: [&str; 32] = [
    "connections",
    "connect.allowed",
    "connect.refused",
    "publish.allowed",
    "publish.denied",
    "subscribe.allowed",
    "subscribe.denied",
    "deliver.denied",
    "shadow.denied",
    "closed.malformed",
    "closed.forbidden",
    "closed.expired",
    "closed.revoked",
    "closed.unconfirmed",
    "closed.refused",
    "closed.internal",
    "jwks.fetched",
    "jwks.failed",
    "callout.sent",
    "callout.failed",
    "backend.asked",
    "backend.allowed",
    "backend.denied",
    "backend.unavailable",
    "introspection.asked",
    "introspection.answered",
    "introspection.unavailable",
    "introspection.shed",
    "registry.asked",
    "registry.answered",
    "registry.unavailable",
    "registry.rechecked",
];
const SHARED_KEYS_PREFIX: &str = "mqtt_acl.jwks.";

struct Metrics(HashMap<&'static str, Counter>);

impl Metrics {
    fn define() -> Self {
        Metrics(
            COUNTERS
                .iter()
                .map(|name| (*name, Counter::define(&format!("mqtt_acl.{name}"))))
                .collect(),
        )
    }

    fn counter(&self, name: &str) -> Counter {
        self.0
            .get(name)
            .copied()
            .unwrap_or_else(|| Counter::define(&format!("mqtt_acl.{name}")))
    }

    fn inc(&self, name: &str) {
        if let Some(counter) = self.0.get(name) {
            counter.inc();
        }
    }
}

struct State {
    policy: MqttAcl,
    metrics: Metrics,
    /// Open connections by context id.
    sessions: HashMap<u32, Connection>,
    keys: RemoteKeys,
    /// Issuers a CONNECT needed keys of (fetched on the next tick).
    keys_wanted: HashSet<String>,
    /// Introspection callouts in flight (bounded by the endpoint's `max_in_flight`).
    introspections: usize,
    /// Re-checks of connections admitted on registry keys (one call per device).
    rechecks: RegistryRechecks,
    /// Re-check callouts in flight (made by the tick, answered to the root context): token →
    /// device id.
    recheck_calls: HashMap<u32, String>,
}

type Shared = Rc<RefCell<State>>;

struct Root {
    state: Option<Shared>,
}

impl Context for Root {
    fn on_http_call_response(&mut self, token: u32, _: usize, _: usize, _: usize) {
        if let Some(state) = &self.state {
            let recheck = state.borrow_mut().recheck_calls.remove(&token);
            if let Some(device_id) = recheck {
                let (status, body) = proxy_glue::callout_answer(policy::mqtt_acl::FILTER);
                let answer = BackendAnswer {
                    status: (status != 0).then_some(status),
                    body,
                };
                count_registry_answer(&state.borrow().metrics, &answer);
                let closes = match now_secs() {
                    Some(now) => recheck_answered(state, &device_id, &answer, now),
                    // No clock: the answer is dropped; the connections' deadline still holds.
                    None => Vec::new(),
                };
                for (id, why) in closes {
                    close_connection(id, &why);
                }
                return;
            }
            let mut guard = state.borrow_mut();
            let State { policy, keys, .. } = &mut *guard;
            if let Some(jwt) = policy.jwt_mut() {
                keys.on_response(jwt, token);
            }
        }
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        // The secrets the configuration names in the VM's environment are read once, here.
        let build = |mut config: MqttAclConfig| {
            config.read_environment(&proxy_glue::env_var);
            MqttAcl::new(config)
        };
        let Some(policy) = proxy_glue::load_config(policy::mqtt_acl::FILTER, build) else {
            return false;
        };
        if let Err(status) = hostcalls::set_tick_period(TICK) {
            log::error!(
                "mqtt-acl: configuration rejected: cannot set the tick period ({status:?})"
            );
            return false;
        }
        log::info!(
            "mqtt-acl: configured ({:?} mode, {:?} transport)",
            policy.mode(),
            policy.transport()
        );
        for warning in policy.jwt().map(|j| j.warnings()).unwrap_or_default() {
            log::warn!("mqtt-acl: {warning}");
        }
        let metrics = Metrics::define();
        let keys = RemoteKeys::new(
            "mqtt-acl",
            SHARED_KEYS_PREFIX,
            KeyMetrics {
                fetched: metrics.counter("jwks.fetched"),
                failed: metrics.counter("jwks.failed"),
                callouts: metrics.counter("callout.sent"),
                callout_failures: metrics.counter("callout.failed"),
            },
        );
        let state = Rc::new(RefCell::new(State {
            policy,
            metrics,
            sessions: HashMap::new(),
            keys,
            keys_wanted: HashSet::new(),
            introspections: 0,
            rechecks: RegistryRechecks::new(),
            recheck_calls: HashMap::new(),
        }));
        // Keys another worker already fetched, then the first fetch for issuers without keys.
        let now = now_secs().unwrap_or(0);
        {
            let mut guard = state.borrow_mut();
            let State { policy, keys, .. } = &mut *guard;
            if let Some(jwt) = policy.jwt_mut() {
                keys.sync_shared(jwt);
                for issuer in RemoteKeys::without_keys(jwt) {
                    keys.start(jwt, &issuer, now);
                }
            }
        }
        self.state = Some(state);
        true
    }

    fn on_tick(&mut self) {
        let Some(state) = &self.state else {
            return;
        };
        let now = now_secs();
        if let Some(now) = now {
            refresh_keys(state, now);
        }
        let mut to_close = Vec::new();
        {
            let mut guard = state.borrow_mut();
            let State {
                policy,
                metrics,
                sessions,
                ..
            } = &mut *guard;
            for (id, session) in sessions.iter_mut() {
                // Its last bytes were handed over: counted here (the expiry by record()).
                if let Some(reason) = session.closing() {
                    metrics.inc(reason.metric());
                    to_close.push((*id, reason.to_string()));
                    continue;
                }
                let Some(now) = now else {
                    continue;
                };
                let env = Env { policy, now };
                if let Some(reason) = session.check_connect_timeout(&env) {
                    metrics.inc(reason.metric());
                    to_close.push((*id, reason.to_string()));
                    continue;
                }
                for check in [
                    Connection::check_expiry,
                    Connection::check_registry_deadline,
                ] {
                    if let Some(out) = check(session, &env) {
                        record(metrics, policy.log_allows(), *id, session, &out);
                        if let Some(reason) = out.close {
                            to_close.push((*id, reason.to_string()));
                            break;
                        }
                    }
                }
            }
            for (id, _) in &to_close {
                sessions.remove(id);
            }
        }
        if let Some(now) = now {
            to_close.extend(start_rechecks(state, now));
        }
        for (id, why) in to_close {
            close_connection(id, &why);
        }
    }

    fn create_stream_context(&self, context_id: u32) -> Option<Box<dyn StreamContext>> {
        Some(Box::new(Stream {
            id: context_id,
            state: self.state.clone(),
            peer_read: false,
            asks: HashMap::new(),
            held: Vec::new(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::StreamContext)
    }
}

/// Loads keys other workers fetched, and fetches those due for a refresh or that a CONNECT
/// needed (an unknown kid: at most every 30 s per issuer).
fn refresh_keys(state: &Shared, now: u64) {
    let mut guard = state.borrow_mut();
    let State {
        policy,
        keys,
        keys_wanted,
        ..
    } = &mut *guard;
    let Some(jwt) = policy.jwt_mut() else {
        return;
    };
    keys.sync_shared(jwt);
    let mut issuers = keys.due(jwt, now);
    for issuer in keys_wanted.drain() {
        if !keys.in_flight(&issuer) && !keys.fetched_recently(&issuer, now) {
            issuers.push(issuer);
        }
    }
    issuers.sort();
    issuers.dedup();
    for issuer in issuers {
        keys.start(jwt, &issuer, now);
    }
}

/// Connections whose registry answer is due for a re-check: decided from the cache, or a
/// call per device (answered to the root context). Returns the connections to close.
fn start_rechecks(state: &Shared, now: u64) -> Vec<(u32, String)> {
    let (mut to_close, calls) = {
        let mut guard = state.borrow_mut();
        let State {
            policy,
            metrics,
            sessions,
            rechecks,
            ..
        } = &mut *guard;
        let env = Env { policy, now };
        let (outputs, calls) = rechecks.tick(
            sessions.iter_mut().map(|(id, c)| (*id, c.session_mut())),
            &env,
        );
        (
            apply_outputs(metrics, policy.log_allows(), sessions, outputs),
            calls,
        )
    };
    for RecheckCall { device_id, call } in calls {
        match proxy_glue::send_call(&call) {
            Ok(token) => {
                let mut s = state.borrow_mut();
                s.metrics.inc("registry.asked");
                s.recheck_calls.insert(token, device_id);
            }
            Err(status) => {
                log::warn!(
                    "mqtt-acl: cannot ask the device registry to re-check {} ({status:?})",
                    bounded_debug(&device_id)
                );
                state.borrow().metrics.inc("registry.unavailable");
                to_close.extend(recheck_answered(
                    state,
                    &device_id,
                    &BackendAnswer::none(),
                    now,
                ));
            }
        }
    }
    to_close
}

/// The registry's answer to a re-check, applied to every connection of the device. Returns
/// the connections to close.
fn recheck_answered(
    state: &Shared,
    device_id: &str,
    answer: &BackendAnswer,
    now: u64,
) -> Vec<(u32, String)> {
    let mut guard = state.borrow_mut();
    let State {
        policy,
        metrics,
        sessions,
        rechecks,
        ..
    } = &mut *guard;
    let env = Env { policy, now };
    let outputs = rechecks.answered(
        device_id,
        answer,
        sessions.iter_mut().map(|(id, c)| (*id, c.session_mut())),
        &env,
    );
    apply_outputs(metrics, policy.log_allows(), sessions, outputs)
}

/// Records what re-checks decided; the connections closed are forgotten and returned.
fn apply_outputs(
    metrics: &Metrics,
    log_allows: LogAllows,
    sessions: &mut HashMap<u32, Connection>,
    outputs: Vec<(u32, Output)>,
) -> Vec<(u32, String)> {
    let mut to_close = Vec::new();
    for (id, out) in outputs {
        let Some(session) = sessions.get_mut(&id) else {
            continue;
        };
        record(metrics, log_allows, id, session, &out);
        if let Some(reason) = out.close {
            sessions.remove(&id);
            to_close.push((id, reason.to_string()));
        }
    }
    to_close
}

/// Counts a device registry answer (a CONNECT's lookup or a re-check).
fn count_registry_answer(metrics: &Metrics, answer: &BackendAnswer) {
    metrics.inc(match answer.status {
        Some(status) if (200..300).contains(&status) || status == 404 => "registry.answered",
        _ => "registry.unavailable",
    });
}

/// Closes connection `id` from outside its callbacks.
fn close_connection(id: u32, why: &str) {
    log::info!("mqtt-acl: connection {id}: {why}");
    let closed = hostcalls::set_effective_context(id).and_then(|()| hostcalls::close_downstream());
    if let Err(status) = closed {
        log::warn!("mqtt-acl: connection {id}: cannot close ({status:?})");
    }
}

/// Writes the decision lines, counts what an output says, and exports the connection's
/// denial count for the access log (`iot_denials`; outside the connection's callbacks, as on
/// a tick, there is no filter state to set and the export is a no-op).
fn record(
    metrics: &Metrics,
    log_allows: LogAllows,
    id: u32,
    session: &mut Connection,
    out: &Output,
) {
    for decided in &out.decisions {
        proxy_glue::emit_decision(&decided.line, log_allows);
        for counter in &decided.counters {
            metrics.inc(counter);
        }
    }
    if let Some(denials) = session.count_denials(out) {
        let _ = host::set_property(STATE_DENIALS, denials.to_string().as_bytes());
    }
    if let Some(reason) = &out.close {
        metrics.inc(reason.metric());
        log::warn!(
            "mqtt-acl: connection {id} (client_id {}): {reason}",
            bounded_debug(session.client_id())
        );
    }
}

struct Stream {
    id: u32,
    state: Option<Shared>,
    /// The peer certificate was read (at the first client data: Envoy runs the new-connection
    /// callback before the TLS handshake, so the certificate is not known then).
    peer_read: bool,
    /// Callouts in flight: callout token → the session's ask id, and whom it asks.
    asks: HashMap<u32, (u32, Asked)>,
    /// While the session waits for the backend: the decided client bytes at the front of
    /// Envoy's read buffer, not yet handed to tcp_proxy.
    held: Vec<u8>,
}

/// Whom a callout asks (each has its counters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Asked {
    Backend,
    Introspection,
    DeviceRegistry,
}

impl Asked {
    fn of(request: &AskRequest) -> Asked {
        match request {
            AskRequest::Backend(_) => Asked::Backend,
            AskRequest::Introspect { .. } => Asked::Introspection,
            AskRequest::DeviceLookup { .. } => Asked::DeviceRegistry,
        }
    }

    /// The counters of a sent and an unsendable callout, and whom it asks (for log lines).
    fn names(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Asked::Backend => ("backend.asked", "backend.unavailable", "the auth backend"),
            Asked::Introspection => (
                "introspection.asked",
                "introspection.unavailable",
                "the introspection endpoint",
            ),
            Asked::DeviceRegistry => (
                "registry.asked",
                "registry.unavailable",
                "the device registry",
            ),
        }
    }
}

/// The verified client certificate of the current connection, if it has one.
fn peer_certificate() -> Option<PeerCertificate> {
    bool_property(&["connection", "mtls"]).then(|| PeerCertificate {
        subject: string_property(&["connection", "subject_peer_certificate"]),
        uri_san: string_property(&["connection", "uri_san_peer_certificate"]),
        dns_san: string_property(&["connection", "dns_san_peer_certificate"]),
    })
}

impl Context for Stream {
    fn on_http_call_response(&mut self, token: u32, _: usize, _: usize, _: usize) {
        let Some((ask_id, asked)) = self.asks.remove(&token) else {
            return;
        };
        let (status, body) = proxy_glue::callout_answer(policy::mqtt_acl::FILTER);
        let answer = BackendAnswer {
            status: (status != 0).then_some(status),
            body,
        };
        let Some(state) = self.state.clone() else {
            return;
        };
        match asked {
            Asked::Introspection => {
                let mut s = state.borrow_mut();
                s.introspections = s.introspections.saturating_sub(1);
                s.metrics.inc(match answer.status {
                    Some(status) if status < 500 => "introspection.answered",
                    _ => "introspection.unavailable",
                });
            }
            Asked::DeviceRegistry => count_registry_answer(&state.borrow().metrics, &answer),
            Asked::Backend => self.count_answer(&state, &answer),
        }
        let Some(now) = now_secs() else {
            self.close_now("the host clock is not available");
            return;
        };
        let Some(mut out) = self.with_session(&state, now, |session, env| {
            session.on_backend_answer(ask_id, &answer, env)
        }) else {
            return;
        };
        self.send_asks(&state, now, &mut out);
        let (waiting, _) = self.session_flags(&state);
        if out.close.is_some() {
            self.forget();
            let _ = hostcalls::close_downstream();
            return;
        }
        self.route_refusal(&out);
        let mut buffered = std::mem::take(&mut self.held);
        let in_buffer = buffered.len();
        buffered.extend_from_slice(&out.forward);
        if let Err(status) = host::write_buffer(BufferType::DownstreamData, 0, in_buffer, &buffered)
        {
            self.close_now(&format!("cannot write the decided data ({status:?})"));
            return;
        }
        if waiting {
            self.held = buffered;
            return;
        }
        if let Err(status) = host::resume_downstream() {
            self.close_now(&format!("cannot resume the client's data ({status})"));
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum From {
    Client,
    Broker,
}

impl Stream {
    /// Runs `f` on this connection's session and records what it decided; None if the
    /// session is gone (the connection was closed).
    fn with_session(
        &self,
        state: &Shared,
        now: u64,
        f: impl FnOnce(&mut Connection, &Env<'_>) -> Output,
    ) -> Option<Output> {
        let mut guard = state.borrow_mut();
        let State {
            policy,
            metrics,
            sessions,
            ..
        } = &mut *guard;
        let session = sessions.get_mut(&self.id)?;
        let env = Env { policy, now };
        let out = f(session, &env);
        record(metrics, policy.log_allows(), self.id, session, &out);
        if out.close.is_some() {
            sessions.remove(&self.id);
        }
        Some(out)
    }

    /// (waiting for the backend, CONNECT not decided yet).
    fn session_flags(&self, state: &Shared) -> (bool, bool) {
        state
            .borrow()
            .sessions
            .get(&self.id)
            .map_or((false, false), |s| {
                (s.waiting_for_backend(), s.awaiting_connect())
            })
    }

    fn count_answer(&self, state: &Shared, answer: &BackendAnswer) {
        let s = state.borrow();
        let verdict = match s.policy.backend() {
            Some(backend) if backend.allows(answer) => BackendVerdict::Allow,
            _ if answer.status.is_some_and(|st| st < 500) => BackendVerdict::Deny,
            _ => BackendVerdict::Unavailable,
        };
        s.metrics.inc(match verdict {
            BackendVerdict::Allow => "backend.allowed",
            BackendVerdict::Deny => "backend.denied",
            BackendVerdict::Unavailable => "backend.unavailable",
        });
    }

    /// Sends the output's backend requests. One that cannot be sent is answered "no answer"
    /// at once (fail closed); what that decides is merged into `out`.
    fn send_asks(&mut self, state: &Shared, now: u64, out: &mut Output) {
        let mut pending: Vec<Ask> = std::mem::take(&mut out.asks);
        // Each failed send decides at least one packet: bounded by the packets held.
        for _ in 0..10_000 {
            let Some(ask) = pending.pop() else {
                return;
            };
            let asked = Asked::of(&ask.request);
            let sent = {
                let mut s = state.borrow_mut();
                match &ask.request {
                    AskRequest::Backend(request) => match s.policy.backend() {
                        Some(backend) => proxy_glue::send_call(&backend.call(request))
                            .map_err(|status| format!("{status:?}")),
                        None => Err("no http_backend".into()),
                    },
                    AskRequest::Introspect { call, .. } => {
                        let admitted = s
                            .policy
                            .opaque_tokens()
                            .map(|o| o.config().admit(s.introspections));
                        match admitted {
                            Some(Ok(())) => {
                                let sent = proxy_glue::send_call(call)
                                    .map_err(|status| format!("{status:?}"));
                                if sent.is_ok() {
                                    s.introspections += 1;
                                }
                                sent
                            }
                            Some(Err(shed)) => {
                                s.metrics.inc("introspection.shed");
                                Err(shed.description().to_string())
                            }
                            None => Err("no introspection".into()),
                        }
                    }
                    // One lookup per CONNECT that misses the registry cache (no sharing
                    // between connections). Authenticated by mTLS on the registry's cluster:
                    // a filter-made token (`auth`) is refused at configure time.
                    AskRequest::DeviceLookup { call, .. } => {
                        proxy_glue::send_call(call).map_err(|status| format!("{status:?}"))
                    }
                }
            };
            let (asked_counter, unavailable, whom) = asked.names();
            match sent {
                Ok(token) => {
                    self.asks.insert(token, (ask.id, asked));
                    state.borrow().metrics.inc(asked_counter);
                }
                Err(why) => {
                    log::warn!(
                        "mqtt-acl: connection {}: cannot ask {whom} ({why}); denied",
                        self.id
                    );
                    state.borrow().metrics.inc(unavailable);
                    let answer = BackendAnswer::none();
                    let Some(more) = self.with_session(state, now, |session, env| {
                        session.on_backend_answer(ask.id, &answer, env)
                    }) else {
                        return;
                    };
                    out.forward.extend_from_slice(&more.forward);
                    pending.extend(more.asks);
                    out.decisions.extend(more.decisions);
                    if more.close.is_some() {
                        out.close = more.close;
                    }
                    out.close_after_write |= more.close_after_write;
                    if more.refusal_cluster.is_some() {
                        out.refusal_cluster = more.refusal_cluster;
                    }
                }
            }
        }
    }

    /// A refused CONNECT goes to the refusal stand-in (see `on_data`).
    fn route_refusal(&self, out: &Output) {
        if let Some(cluster) = &out.refusal_cluster {
            if let Err(status) = proxy_glue::filter_state::set(TCP_PROXY_CLUSTER, cluster) {
                log::warn!(
                    "mqtt-acl: connection {}: cannot send the refused client to cluster \
                     {cluster:?} ({status:?}); the broker answers a harmless CONNECT",
                    self.id
                );
            }
        }
    }

    fn close_now(&self, why: &str) -> Action {
        log::warn!("mqtt-acl: connection {}: {why}", self.id);
        if let Some(state) = &self.state {
            let mut s = state.borrow_mut();
            s.sessions.remove(&self.id);
            s.metrics.inc("closed.internal");
        }
        let _ = hostcalls::close_downstream();
        Action::Pause
    }

    fn on_data(&mut self, from: From, size: usize) -> Action {
        let buffer = match from {
            From::Client => BufferType::DownstreamData,
            From::Broker => BufferType::UpstreamData,
        };
        let Some(state) = self.state.clone() else {
            let _ = host::write_buffer(buffer, 0, size, &[]);
            return self.close_now("not configured");
        };
        let mut bytes = match host::read_buffer(buffer, 0, size) {
            Ok(bytes) => bytes.unwrap_or_default(),
            Err(status) => {
                let _ = host::write_buffer(buffer, 0, size, &[]);
                return self.close_now(&format!("cannot read the data ({status:?})"));
            }
        };
        // While the backend is asked, the front of the buffer is what was decided already.
        let held = if from == From::Client {
            std::mem::take(&mut self.held)
        } else {
            Vec::new()
        };
        if !held.is_empty() {
            if !bytes.starts_with(&held) {
                return self.close_now("the held client data changed in Envoy's buffer");
            }
            bytes.drain(..held.len());
        }
        let Some(now) = now_secs() else {
            let _ = host::write_buffer(buffer, 0, size, &[]);
            return self.close_now("the host clock is not available");
        };
        let out = {
            let mut guard = state.borrow_mut();
            let State {
                policy,
                metrics,
                sessions,
                keys_wanted,
                ..
            } = &mut *guard;
            let Some(session) = sessions.get_mut(&self.id) else {
                // Closed by the filter already (bytes still in flight): an ordinary end, not
                // an internal error.
                drop(guard);
                let _ = host::write_buffer(buffer, 0, size, &[]);
                let _ = hostcalls::close_downstream();
                return Action::Pause;
            };
            if from == From::Client && !self.peer_read {
                self.peer_read = true;
                session.set_peer(peer_certificate());
            }
            let env = Env { policy, now };
            let out = match from {
                From::Client => session.on_client_bytes(&bytes, &env),
                From::Broker => session.on_broker_bytes(&bytes, &env),
            };
            record(metrics, policy.log_allows(), self.id, session, &out);
            if let Some(issuer) = &out.keys_wanted {
                keys_wanted.insert(issuer.clone());
            }
            if out.close.is_some() {
                sessions.remove(&self.id);
            }
            out
        };
        let mut out = out;
        self.send_asks(&state, now, &mut out);
        let (waiting, undecided) = self.session_flags(&state);
        if out.close.is_some() {
            let _ = host::write_buffer(buffer, 0, size, &[]);
            let _ = hostcalls::close_downstream();
            return Action::Pause;
        }
        // tcp_proxy connects on the first data it gets (`upstream_connect_mode:
        // ON_DOWNSTREAM_DATA`), after this callback: the refused client reaches the
        // stand-in, never the broker. Without filter state the broker answers the
        // harmless CONNECT.
        self.route_refusal(&out);
        let mut forward = held;
        forward.extend_from_slice(&out.forward);
        if let Err(status) = host::write_buffer(buffer, 0, size, &forward) {
            return self.close_now(&format!("cannot replace the data ({status:?})"));
        }
        if from == From::Client && waiting {
            // Held back until the backend answers (on_http_call_response resumes).
            self.held = forward;
            return Action::Pause;
        }
        if from == From::Client && undecided {
            // The CONNECT is not complete: tcp_proxy must not start (it would pick its
            // cluster before the refusal could change it).
            return Action::Pause;
        }
        Action::Continue
    }

    fn awaiting_connect(&self) -> bool {
        self.state.as_ref().is_some_and(|state| {
            state
                .borrow()
                .sessions
                .get(&self.id)
                .is_some_and(Connection::awaiting_connect)
        })
    }

    fn forget(&self) {
        if let Some(state) = &self.state {
            state.borrow_mut().sessions.remove(&self.id);
        }
    }
}

impl StreamContext for Stream {
    fn on_new_connection(&mut self) -> Action {
        let Some(state) = &self.state else {
            return self.close_now("not configured");
        };
        let mut s = state.borrow_mut();
        // Envoy's connection id is unique in the process (context ids are per worker): it
        // names the CONNECT that stands in for a refused one, so two never take over each other.
        let connection_id = match host::property(&["connection", "id"]) {
            Ok(Some(bytes)) if bytes.len() == 8 => {
                let mut le = [0u8; 8];
                le.copy_from_slice(&bytes);
                u64::from_le_bytes(le)
            }
            _ => u64::from(self.id),
        };
        let mut session = Connection::new(&s.policy, None, connection_id);
        if let Some(now) = now_secs() {
            session.set_opened_at(now);
        }
        s.sessions.insert(self.id, session);
        s.metrics.inc("connections");
        // Hold tcp_proxy back until the CONNECT is decided: it picks its cluster (the broker,
        // or the refusal stand-in) when this filter first continues.
        Action::Pause
    }

    fn on_downstream_data(&mut self, data_size: usize, end_of_stream: bool) -> Action {
        let action = self.on_data(From::Client, data_size);
        if end_of_stream && action == Action::Pause && self.awaiting_connect() {
            // The client closed its side before a complete CONNECT: tcp_proxy (held back)
            // would never close it.
            self.forget();
            let _ = hostcalls::close_downstream();
        }
        action
    }

    fn on_upstream_data(&mut self, data_size: usize, _end_of_stream: bool) -> Action {
        self.on_data(From::Broker, data_size)
    }

    fn on_downstream_close(&mut self, _peer_type: PeerType) {
        self.forget();
    }

    fn on_upstream_close(&mut self, _peer_type: PeerType) {
        self.forget();
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.forget();
        // Introspections this connection still waits for: their answers will not come here.
        let pending = self
            .asks
            .values()
            .filter(|(_, asked)| *asked == Asked::Introspection)
            .count();
        if let (Some(state), true) = (&self.state, pending > 0) {
            let mut s = state.borrow_mut();
            s.introspections = s.introspections.saturating_sub(pending);
        }
    }
}
