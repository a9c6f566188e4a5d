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
//! Callouts. When the session asks the `http_backend` (mosquitto-go-auth's protocol), the
//! introspection endpoint or the device registry, the connection's client data is held back:
//! its callback answers StopIteration, so Envoy keeps the read buffer (and the filter's handle
//! on it) and tcp_proxy gets nothing. The bytes already decided stay at the front of that
//! buffer (`State::held`); new client data lands behind them and is fed to the session on its
//! own. When the last answer is in, the decided bytes are written to the buffer and
//! `proxy_continue_stream(Downstream)` lets tcp_proxy forward it (Envoy's `continueReading`;
//! the first time, for a CONNECT, this also starts tcp_proxy).
//!
//! Connections that need the same answer share one call (`policy::mqtt_acl::SharedAsks`): the
//! first sends it (`proxy_glue::send_call`), the others wait for it, and the answer, delivered
//! to whichever context the host gives it, decides every waiter. Waiters other than the
//! running context are acted on through `proxy_set_effective_context(id)`: their buffer is
//! written, their data resumed or their connection closed as their own callback would.
//! What Envoy does with that (source/extensions/common/wasm/context.cc, checked at 1.3x):
//! every host call works on `contextOrEffectiveContext()` (proxy-wasm-cpp-host's
//! `set_effective_context` only checks that the context exists in the VM); `Context::onData`
//! keeps `network_downstream_data_buffer_` while the filter answered StopIteration, so the
//! waiter's buffer is still there to write; `continueStream(Downstream)` queues
//! `network_read_filter_callbacks_->continueReading()` and `closeStream(Downstream)` queues
//! `connection().close(FlushWrite)` on *that* context, both run after the VM call returns;
//! `~Context` cancels the context's pending `http_request_`s, so a call dies with the
//! connection that made it: the waiters left are sent the call again by the root's tick
//! (`send_root_calls`), whose calls live as long as the VM. (Network filters have no
//! `injectData`: writing the paused read buffer is the only way to hand data on.)

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::time::Duration;

use policy::decision_line::{LogAllows, STATE_DENIALS};
use policy::log_text::bounded_debug;
use policy::mqtt_acl::{
    Ask, AskRequest, BackendAnswer, Connection, Env, Joined, MqttAcl, MqttAclConfig, Output,
    RecheckCall, RegistryRechecks, SharedAsks, Shed, Waiter, Whom,
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
    proxy_wasm::set_root_context(|id| Box::new(Root { id, state: None }));
}}

const TICK: Duration = Duration::from_millis(250);

/// Every counter, `mqtt_acl.<name>`.
const COUNTERS: [&str; 36] = [
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
    "callout.joined",
    "callout.waiting_shed",
    "backend.asked",
    "backend.allowed",
    "backend.denied",
    "backend.unavailable",
    "backend.shed",
    "introspection.asked",
    "introspection.answered",
    "introspection.unavailable",
    "introspection.shed",
    "registry.asked",
    "registry.answered",
    "registry.unavailable",
    "registry.shed",
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
    /// Callouts connections wait for, shared by those that need the same answer.
    shared: SharedAsks,
    /// Asks of waiting connections that the root's next tick sends ([`Sender`]).
    queued: Vec<(u32, Ask)>,
    /// While a connection waits for a callout: the decided client bytes at the front of
    /// Envoy's read buffer, not yet handed to tcp_proxy.
    held: HashMap<u32, Vec<u8>>,
    /// Re-checks of connections admitted on registry keys (one call per device).
    rechecks: RegistryRechecks,
    /// Re-check callouts in flight (made by the tick, answered to the root context): token →
    /// device id.
    recheck_calls: HashMap<u32, String>,
}

type Shared = Rc<RefCell<State>>;

struct Root {
    id: u32,
    state: Option<Shared>,
}

impl Context for Root {
    fn on_http_call_response(&mut self, token: u32, _: usize, _: usize, _: usize) {
        if let Some(state) = &self.state {
            let recheck = state.borrow_mut().recheck_calls.remove(&token);
            if let Some(device_id) = recheck {
                let answer = read_answer();
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
            if state.borrow().shared.is_call(token) {
                let answer = read_answer();
                shared_call_answered(state, token, &answer, self.id, Sender::Root);
                return;
            }
            let mut guard = state.borrow_mut();
            let State { policy, keys, .. } = &mut *guard;
            if let Some(jwt) = policy.jwt_mut() {
                keys.on_response(jwt, token);
            }
        }
    }

    /// The plugin is going away: what the VM counted since its last tick reaches Envoy first.
    fn on_done(&mut self) -> bool {
        proxy_glue::flush_counters();
        true
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
        let shared = SharedAsks::new(policy.ask_limits());
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
            shared,
            queued: Vec::new(),
            held: HashMap::new(),
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
        send_root_calls(state, self.id);
        for (id, why) in to_close {
            close_connection(id, &why);
        }
        proxy_glue::on_root_tick();
    }

    fn create_stream_context(&self, context_id: u32) -> Option<Box<dyn StreamContext>> {
        Some(Box::new(Stream {
            id: context_id,
            state: self.state.clone(),
            peer_read: false,
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
    let closed = host::enter_context(id).and_then(|()| host::close_client());
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
}

/// The verified client certificate of the current connection, if it has one.
fn peer_certificate() -> Option<PeerCertificate> {
    bool_property(&["connection", "mtls"]).then(|| PeerCertificate {
        subject: string_property(&["connection", "subject_peer_certificate"]),
        uri_san: string_property(&["connection", "uri_san_peer_certificate"]),
        dns_san: string_property(&["connection", "dns_san_peer_certificate"]),
    })
}

/// The answer the host delivered for the current callback's callout.
fn read_answer() -> BackendAnswer {
    let (status, body) = proxy_glue::callout_answer(policy::mqtt_acl::FILTER);
    BackendAnswer {
        status: (status != 0).then_some(status),
        body,
    }
}

impl Context for Stream {
    fn on_http_call_response(&mut self, token: u32, _: usize, _: usize, _: usize) {
        let Some(state) = self.state.clone() else {
            return;
        };
        if !state.borrow().shared.is_call(token) {
            return;
        }
        let answer = read_answer();
        shared_call_answered(&state, token, &answer, self.id, Sender::Stream(self.id));
    }
}

/// What an answer (or its absence) says to the connections waiting for it.
#[derive(Clone, Copy)]
enum Outcome<'a> {
    Answer(&'a BackendAnswer),
    /// Over a bound: not asked; a CONNECT is refused as "server busy".
    Shed(Shed),
}

/// Which callback runs, for sending a connection's callouts. The SDK (proxy-wasm 0.2.5)
/// routes an answer by its own token → context map, filled with the context whose callback
/// was *running* when the call was made, while Envoy keeps the call on the *effective*
/// context (and cancels it with that context). A call is therefore made only where the two
/// agree: in the connection's own callback (answered to it, cancelled with it), or by the
/// root for the root (answered to the root, which lives as long as the VM). Asks of another
/// connection decided in this callback are queued for the root's next tick
/// ([`State::queued`]).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Sender {
    Root,
    Stream(u32),
}

impl Sender {
    fn may_send_for(self, connection: u32) -> bool {
        self == Sender::Stream(connection)
    }
}

/// A shared call was answered (to `home`, the context whose callback runs): every
/// connection waiting for it is decided on the answer.
fn shared_call_answered(
    state: &Shared,
    token: u32,
    answer: &BackendAnswer,
    home: u32,
    sender: Sender,
) {
    let Some((whom, waiters)) = state.borrow_mut().shared.answered(token) else {
        return;
    };
    count_answer(state, whom, answer);
    decide_waiters(state, waiters, Outcome::Answer(answer), home, sender);
}

/// Decides each waiter's ask on `outcome`, acting on its connection's context (Envoy's
/// `proxy_set_effective_context`; see the crate doc), then makes `home` effective again.
fn decide_waiters(
    state: &Shared,
    waiters: Vec<Waiter>,
    outcome: Outcome<'_>,
    home: u32,
    sender: Sender,
) {
    if waiters.is_empty() {
        return;
    }
    let now = now_secs();
    for waiter in waiters {
        if let Err(status) = host::enter_context(waiter.connection) {
            log::warn!(
                "mqtt-acl: connection {}: gone from the host ({status:?})",
                waiter.connection
            );
            forget(state, waiter.connection);
            continue;
        }
        decide_ask(state, waiter, outcome, now, sender);
    }
    let _ = host::enter_context(home);
}

/// Decides one connection's ask (its context is the effective one) and hands on, or keeps
/// holding, its client data.
fn decide_ask(
    state: &Shared,
    waiter: Waiter,
    outcome: Outcome<'_>,
    now: Option<u64>,
    sender: Sender,
) {
    let conn = waiter.connection;
    let Some(now) = now else {
        close_now(state, conn, "the host clock is not available");
        return;
    };
    let Some(mut out) = with_session(state, conn, now, |session, env| match outcome {
        Outcome::Answer(answer) => session.on_backend_answer(waiter.ask, answer, env),
        Outcome::Shed(shed) => session.on_ask_shed(waiter.ask, &shed.description(), env),
    }) else {
        return;
    };
    send_asks(state, conn, now, &mut out, sender);
    let (waiting, _) = session_flags(state, conn);
    if out.close.is_some() {
        forget(state, conn);
        let _ = host::close_client();
        return;
    }
    route_refusal(conn, &out);
    let mut buffered = state.borrow_mut().held.remove(&conn).unwrap_or_default();
    let in_buffer = buffered.len();
    buffered.extend_from_slice(&out.forward);
    if let Err(status) = host::write_buffer(BufferType::DownstreamData, 0, in_buffer, &buffered) {
        close_now(
            state,
            conn,
            &format!("cannot write the decided data ({status:?})"),
        );
        return;
    }
    if waiting {
        state.borrow_mut().held.insert(conn, buffered);
        return;
    }
    if let Err(status) = host::resume_downstream() {
        close_now(
            state,
            conn,
            &format!("cannot resume the client's data ({status})"),
        );
    }
}

/// Counts a shared call's answer (once per call, however many connections it decides).
fn count_answer(state: &Shared, whom: Whom, answer: &BackendAnswer) {
    let s = state.borrow();
    let name = match whom {
        Whom::Introspection => match answer.status {
            Some(status) if status < 500 => "introspection.answered",
            _ => "introspection.unavailable",
        },
        Whom::DeviceRegistry => return count_registry_answer(&s.metrics, answer),
        Whom::Backend => match s.policy.backend() {
            Some(backend) if backend.allows(answer) => "backend.allowed",
            _ if answer.status.is_some_and(|st| st < 500) => "backend.denied",
            _ => "backend.unavailable",
        },
    };
    s.metrics.inc(name);
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum From {
    Client,
    Broker,
}

/// Runs `f` on connection `conn`'s session and records what it decided; None if the session
/// is gone (the connection was closed).
fn with_session(
    state: &Shared,
    conn: u32,
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
    let session = sessions.get_mut(&conn)?;
    let env = Env { policy, now };
    let out = f(session, &env);
    record(metrics, policy.log_allows(), conn, session, &out);
    if out.close.is_some() {
        sessions.remove(&conn);
    }
    Some(out)
}

/// (waiting for a callout, CONNECT not decided yet).
fn session_flags(state: &Shared, conn: u32) -> (bool, bool) {
    state
        .borrow()
        .sessions
        .get(&conn)
        .map_or((false, false), |s| {
            (s.waiting_for_backend(), s.awaiting_connect())
        })
}

/// Sends the call that asks `request` (from the effective context).
fn send_request(state: &Shared, request: &AskRequest) -> Result<u32, String> {
    let s = state.borrow();
    let call = match request {
        AskRequest::Backend(request) => match s.policy.backend() {
            Some(backend) => backend.call(request),
            None => return Err("no http_backend".into()),
        },
        // The registry's calls are authenticated by mTLS on its cluster: a filter-made
        // token (`auth`) is refused at configure time.
        AskRequest::Introspect { call, .. } | AskRequest::DeviceLookup { call, .. } => call.clone(),
    };
    drop(s);
    proxy_glue::send_call(&call).map_err(|status| format!("{status:?}"))
}

/// Sends, joins or sheds the output's asks for connection `conn` (its context is the
/// effective one). An ask that cannot be made is decided at once (fail closed: no answer, or
/// "server busy" over a bound); what that decides is merged into `out`. Asks the running
/// callback may not send for `conn` wait for the root's tick ([`Sender`]).
fn send_asks(state: &Shared, conn: u32, now: u64, out: &mut Output, sender: Sender) {
    let mut pending: Vec<Ask> = std::mem::take(&mut out.asks);
    if !sender.may_send_for(conn) {
        state
            .borrow_mut()
            .queued
            .extend(pending.into_iter().map(|ask| (conn, ask)));
        return;
    }
    // Each ask not made decides at least one packet: bounded by the packets held.
    for _ in 0..10_000 {
        let Some(ask) = pending.pop() else {
            return;
        };
        let whom = Whom::of(&ask.request);
        let joined = state.borrow_mut().shared.ask(conn, ask.id, &ask.request);
        let not_asked = match joined {
            Joined::Joined => {
                state.borrow().metrics.inc("callout.joined");
                None
            }
            Joined::Shed(shed) => {
                state.borrow().metrics.inc(shed.counter());
                Some((Outcome::Shed(shed), shed.description(), Vec::new()))
            }
            Joined::Send => match send_request(state, &ask.request) {
                Ok(token) => {
                    let mut s = state.borrow_mut();
                    s.shared.sent(&ask.request, Some(conn), token);
                    s.metrics.inc(whom.counters().asked);
                    None
                }
                Err(why) => {
                    let mut s = state.borrow_mut();
                    s.metrics.inc(whom.counters().unavailable);
                    // Connections that waited for the call before (its owner closed) are
                    // refused with this one.
                    let others = s
                        .shared
                        .send_failed(&ask.request)
                        .into_iter()
                        .filter(|w| w.connection != conn)
                        .collect();
                    Some((Outcome::Answer(&NO_ANSWER), why, others))
                }
            },
        };
        let Some((outcome, why, others)) = not_asked else {
            continue;
        };
        log::warn!(
            "mqtt-acl: connection {conn}: cannot ask {} ({why}); denied",
            whom.description()
        );
        decide_waiters(state, others, outcome, conn, sender);
        let Some(more) = with_session(state, conn, now, |session, env| match outcome {
            Outcome::Answer(answer) => session.on_backend_answer(ask.id, answer, env),
            Outcome::Shed(shed) => session.on_ask_shed(ask.id, &shed.description(), env),
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

static NO_ANSWER: BackendAnswer = BackendAnswer {
    status: None,
    body: Vec::new(),
};

/// Root tick: the calls whose owner closed while others wait (Envoy cancelled them with the
/// owner's context), and the asks queued for the root ([`Sender`]), are sent by the root
/// (for the root: answered to it). `root` is the effective context.
fn send_root_calls(state: &Shared, root: u32) {
    let orphans = state.borrow().shared.orphans();
    for (request, admitted) in orphans {
        let whom = Whom::of(&request);
        if let Err(shed) = admitted {
            state.borrow().metrics.inc(shed.counter());
            let waiters = state.borrow_mut().shared.shed_orphan(&request);
            decide_waiters(state, waiters, Outcome::Shed(shed), root, Sender::Root);
            continue;
        }
        send_for_waiters(state, &request, whom, root);
    }
    // What these decisions ask next is queued again: a few rounds, the rest next tick.
    for _ in 0..4 {
        let queued = std::mem::take(&mut state.borrow_mut().queued);
        if queued.is_empty() {
            return;
        }
        for (conn, ask) in queued {
            if !state.borrow().sessions.contains_key(&conn) {
                continue;
            }
            let whom = Whom::of(&ask.request);
            let joined = state.borrow_mut().shared.ask(conn, ask.id, &ask.request);
            match joined {
                Joined::Joined => state.borrow().metrics.inc("callout.joined"),
                Joined::Send => send_for_waiters(state, &ask.request, whom, root),
                Joined::Shed(shed) => {
                    state.borrow().metrics.inc(shed.counter());
                    log::warn!(
                        "mqtt-acl: connection {conn}: cannot ask {} ({}); denied",
                        whom.description(),
                        shed.description()
                    );
                    let waiter = Waiter {
                        connection: conn,
                        ask: ask.id,
                    };
                    decide_waiters(state, vec![waiter], Outcome::Shed(shed), root, Sender::Root);
                }
            }
        }
    }
}

/// The root sends `request` for the connections waiting for it; if it cannot, they are
/// decided on no answer.
fn send_for_waiters(state: &Shared, request: &AskRequest, whom: Whom, root: u32) {
    match send_request(state, request) {
        Ok(token) => {
            let mut s = state.borrow_mut();
            s.shared.sent(request, None, token);
            s.metrics.inc(whom.counters().asked);
        }
        Err(why) => {
            log::warn!(
                "mqtt-acl: cannot ask {} for the connections waiting ({why}); denied",
                whom.description()
            );
            let waiters = {
                let mut s = state.borrow_mut();
                s.metrics.inc(whom.counters().unavailable);
                s.shared.send_failed(request)
            };
            decide_waiters(
                state,
                waiters,
                Outcome::Answer(&NO_ANSWER),
                root,
                Sender::Root,
            );
        }
    }
}

/// A refused CONNECT goes to the refusal stand-in (see `on_data`).
fn route_refusal(conn: u32, out: &Output) {
    if let Some(cluster) = &out.refusal_cluster {
        if let Err(status) = proxy_glue::filter_state::set(TCP_PROXY_CLUSTER, cluster) {
            log::warn!(
                "mqtt-acl: connection {conn}: cannot send the refused client to cluster \
                 {cluster:?} ({status:?}); the broker answers a harmless CONNECT"
            );
        }
    }
}

/// Closes connection `conn` (the effective context) after an internal error.
fn close_now(state: &Shared, conn: u32, why: &str) {
    log::warn!("mqtt-acl: connection {conn}: {why}");
    forget(state, conn);
    state.borrow().metrics.inc("closed.internal");
    let _ = host::close_client();
}

/// Connection `conn` is gone (or going): its session, held data and waits.
fn forget(state: &Shared, conn: u32) {
    let mut s = state.borrow_mut();
    s.sessions.remove(&conn);
    s.held.remove(&conn);
    s.shared.connection_closed(conn);
}

impl Stream {
    fn close_now(&self, why: &str) -> Action {
        match &self.state {
            Some(state) => close_now(state, self.id, why),
            None => {
                log::warn!("mqtt-acl: connection {}: {why}", self.id);
                let _ = host::close_client();
            }
        }
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
        // While a callout is asked, the front of the buffer is what was decided already.
        let held = if from == From::Client {
            state.borrow_mut().held.remove(&self.id).unwrap_or_default()
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
                let _ = host::close_client();
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
        send_asks(&state, self.id, now, &mut out, Sender::Stream(self.id));
        let (waiting, undecided) = session_flags(&state, self.id);
        if out.close.is_some() {
            let _ = host::write_buffer(buffer, 0, size, &[]);
            let _ = host::close_client();
            return Action::Pause;
        }
        // tcp_proxy connects on the first data it gets (`upstream_connect_mode:
        // ON_DOWNSTREAM_DATA`), after this callback: the refused client reaches the
        // stand-in, never the broker. Without filter state the broker answers the
        // harmless CONNECT.
        route_refusal(self.id, &out);
        let mut forward = held;
        forward.extend_from_slice(&out.forward);
        if let Err(status) = host::write_buffer(buffer, 0, size, &forward) {
            return self.close_now(&format!("cannot replace the data ({status:?})"));
        }
        if from == From::Client && waiting {
            // Held back until the callout is answered (`decide_ask` resumes).
            state.borrow_mut().held.insert(self.id, forward);
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
            forget(state, self.id);
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
            let _ = host::close_client();
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
        // Its waits end; calls it owned are cancelled by Envoy and sent again by the root
        // for the connections still waiting.
        self.forget();
    }
}
