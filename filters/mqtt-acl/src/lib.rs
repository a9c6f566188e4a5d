//! mqtt-acl: an Envoy network filter (before tcp_proxy) that authenticates MQTT CONNECTs and
//! checks every PUBLISH and SUBSCRIBE against topic ACLs and device ownership.
//!
//! The decisions and every byte written are `policy::mqtt_acl`'s ([`Session`]); this crate
//! only moves bytes between Envoy's buffers and the session, writes the decision lines, counts,
//! and closes connections.
//!
//! Closing. Envoy loses the data a read/write callback hands on when the same callback closes
//! the connection (the close runs before the bytes reach the write buffer). So the refusing
//! CONNACK is written by one callback and the connection is closed by the next one, or by the
//! root context's tick (every 250 ms) through `proxy_set_effective_context`. The tick also
//! closes connections whose token expired.
//!
//! Keys. A provider's remote JWKS are fetched by the root context with token-auth's code
//! (`proxy_glue::remote_keys`: discovery, refresh, shared data between workers, last good set
//! kept): at configure time, when their refresh is due, and (at most every 30 s) when a CONNECT
//! brought a token whose `kid` they lack; that CONNECT was refused as "server unavailable".

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::time::Duration;

use policy::decision_line::LogAllows;
use policy::log_text::bounded_debug;
use policy::mqtt_acl::{Env, MqttAcl, Output, Session};
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
const COUNTERS: [&str; 18] = [
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
    "closed.refused",
    "closed.internal",
    "jwks.fetched",
    "jwks.failed",
    "callout.sent",
    "callout.failed",
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
    sessions: HashMap<u32, Session>,
    keys: RemoteKeys,
    /// Issuers a CONNECT needed keys of (fetched on the next tick).
    keys_wanted: HashSet<String>,
}

type Shared = Rc<RefCell<State>>;

struct Root {
    state: Option<Shared>,
}

impl Context for Root {
    fn on_http_call_response(&mut self, token: u32, _: usize, _: usize, _: usize) {
        if let Some(state) = &self.state {
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
        let Some(policy) = proxy_glue::load_config(policy::mqtt_acl::FILTER, MqttAcl::new) else {
            return false;
        };
        if let Err(status) = hostcalls::set_tick_period(TICK) {
            log::error!(
                "mqtt-acl: configuration rejected: cannot set the tick period ({status:?})"
            );
            return false;
        }
        log::info!("mqtt-acl: configured ({:?} mode)", policy.mode());
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
                if let Some(out) = session.check_expiry(&env) {
                    record(metrics, policy.log_allows(), *id, session, &out);
                    if let Some(reason) = out.close {
                        to_close.push((*id, reason.to_string()));
                    }
                }
            }
            for (id, _) in &to_close {
                sessions.remove(id);
            }
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

/// Closes connection `id` from outside its callbacks.
fn close_connection(id: u32, why: &str) {
    log::info!("mqtt-acl: connection {id}: {why}");
    let closed = hostcalls::set_effective_context(id).and_then(|()| hostcalls::close_downstream());
    if let Err(status) = closed {
        log::warn!("mqtt-acl: connection {id}: cannot close ({status:?})");
    }
}

/// Writes the decision lines and counts what an output says.
fn record(metrics: &Metrics, log_allows: LogAllows, id: u32, session: &Session, out: &Output) {
    for decided in &out.decisions {
        proxy_glue::emit_decision(&decided.line, log_allows);
        for counter in &decided.counters {
            metrics.inc(counter);
        }
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

impl Context for Stream {}

#[derive(Clone, Copy, PartialEq, Eq)]
enum From {
    Client,
    Broker,
}

impl Stream {
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
        let bytes = match host::read_buffer(buffer, 0, size) {
            Ok(bytes) => bytes.unwrap_or_default(),
            Err(status) => {
                let _ = host::write_buffer(buffer, 0, size, &[]);
                return self.close_now(&format!("cannot read the data ({status:?})"));
            }
        };
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
            let undecided = session.awaiting_connect();
            if out.close.is_some() {
                sessions.remove(&self.id);
            }
            (out, undecided)
        };
        let (out, undecided) = out;
        if out.close.is_some() {
            let _ = host::write_buffer(buffer, 0, size, &[]);
            let _ = hostcalls::close_downstream();
            return Action::Pause;
        }
        if let Some(cluster) = &out.refusal_cluster {
            // tcp_proxy connects on the first data it gets (`upstream_connect_mode:
            // ON_DOWNSTREAM_DATA`), after this callback: the refused client reaches the
            // stand-in, never the broker. Without filter state the broker answers the
            // harmless CONNECT.
            if let Err(status) = proxy_glue::filter_state::set(TCP_PROXY_CLUSTER, cluster) {
                log::warn!(
                    "mqtt-acl: connection {}: cannot send the refused client to cluster \
                     {cluster:?} ({status:?}); the broker answers a harmless CONNECT",
                    self.id
                );
            }
        }
        if let Err(status) = host::write_buffer(buffer, 0, size, &out.forward) {
            return self.close_now(&format!("cannot replace the data ({status:?})"));
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
                .is_some_and(Session::awaiting_connect)
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
        let mut session = Session::new(&s.policy, None, connection_id);
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
    }
}
