//! Callouts shared by the connections of a VM that need the same answer ([`SharedAsks`]).
//!
//! Fifty devices that connect at once with the same opaque token, the same registry device
//! id, or the same question for the auth backend make one call, not fifty: the first
//! connection that needs the answer sends the call; the others join it and wait. When the
//! answer comes (to whichever context the host delivers it), every waiting connection is
//! decided on it: a failed call (reset, timeout, 5xx, unreadable) refuses them all, as a single
//! call would refuse its one connection.
//!
//! A connection that closes while it waits leaves the waiters. If it owned the call, Envoy
//! cancels the call with the context (`Context::~Context` cancels every pending
//! `http_request_`), so the call is no longer in flight: the filter sends it again from the
//! root context ([`SharedAsks::orphans`]) and the answer reaches the others there.
//!
//! Bounds: callouts in flight per endpoint (`max_in_flight` of `introspection`,
//! `device_keys.registry` and `http_backend`), and connections waiting for any callout
//! (`max_waiting_connections`). A connection over one is refused as "server busy".

use std::collections::HashMap;

use crate::cache::{token_digest, TokenDigest};
use crate::lookups::Lookups;

use super::AskRequest;

/// Whom a callout asks (each has its bound and counters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Whom {
    Backend,
    Introspection,
    DeviceRegistry,
}

impl Whom {
    pub fn of(request: &AskRequest) -> Whom {
        match request {
            AskRequest::Backend(_) => Whom::Backend,
            AskRequest::Introspect { .. } => Whom::Introspection,
            AskRequest::DeviceLookup { .. } => Whom::DeviceRegistry,
        }
    }

    /// Counter names (after `mqtt_acl.`): a call sent, a call that could not be sent or got
    /// no usable answer, a call refused by `max_in_flight`.
    pub fn counters(self) -> WhomCounters {
        match self {
            Whom::Backend => WhomCounters {
                asked: "backend.asked",
                unavailable: "backend.unavailable",
                shed: "backend.shed",
            },
            Whom::Introspection => WhomCounters {
                asked: "introspection.asked",
                unavailable: "introspection.unavailable",
                shed: "introspection.shed",
            },
            Whom::DeviceRegistry => WhomCounters {
                asked: "registry.asked",
                unavailable: "registry.unavailable",
                shed: "registry.shed",
            },
        }
    }

    /// For log lines.
    pub fn description(self) -> &'static str {
        match self {
            Whom::Backend => "the auth backend",
            Whom::Introspection => "the introspection endpoint",
            Whom::DeviceRegistry => "the device registry",
        }
    }
}

pub struct WhomCounters {
    pub asked: &'static str,
    pub unavailable: &'static str,
    pub shed: &'static str,
}

/// What a shared callout is about: one call per key at a time per VM.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum AskKey {
    /// The backend question (its path and body).
    Backend(String),
    /// The opaque token's digest (the key never holds the token).
    Introspection(TokenDigest),
    /// The registry's device id.
    Device(String),
}

impl AskKey {
    pub fn of(request: &AskRequest) -> AskKey {
        match request {
            AskRequest::Backend(request) => AskKey::Backend(request.key().to_string()),
            AskRequest::Introspect { token, .. } => AskKey::Introspection(token_digest(token)),
            AskRequest::DeviceLookup { device_id, .. } => AskKey::Device(device_id.clone()),
        }
    }

    pub fn whom(&self) -> Whom {
        match self {
            AskKey::Backend(_) => Whom::Backend,
            AskKey::Introspection(_) => Whom::Introspection,
            AskKey::Device(_) => Whom::DeviceRegistry,
        }
    }
}

/// The bounds (validated with the configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AskLimits {
    pub max_waiting_connections: usize,
    pub backend_in_flight: usize,
    pub introspection_in_flight: usize,
    pub registry_in_flight: usize,
}

impl AskLimits {
    fn in_flight(&self, whom: Whom) -> usize {
        match whom {
            Whom::Backend => self.backend_in_flight,
            Whom::Introspection => self.introspection_in_flight,
            Whom::DeviceRegistry => self.registry_in_flight,
        }
    }
}

/// Why a connection's ask was refused (its CONNECT is refused as "server busy").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shed {
    /// `max_waiting_connections` connections wait already.
    Waiting(usize),
    /// `max_in_flight` calls to this endpoint are in flight.
    InFlight(Whom, usize),
}

impl Shed {
    /// The counter (after `mqtt_acl.`).
    pub fn counter(self) -> &'static str {
        match self {
            Shed::Waiting(_) => "callout.waiting_shed",
            Shed::InFlight(whom, _) => whom.counters().shed,
        }
    }

    pub fn description(self) -> String {
        match self {
            Shed::Waiting(n) => {
                format!("{n} connections wait for callouts (max_waiting_connections); server busy")
            }
            Shed::InFlight(whom, n) => format!(
                "{n} calls to {} in flight (max_in_flight); server busy",
                whom.description()
            ),
        }
    }
}

/// What to do with a connection's ask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Joined {
    /// Nobody asks this yet: send the call, then report it with [`SharedAsks::sent`] (or
    /// [`SharedAsks::send_failed`]).
    Send,
    /// The call is in flight: its answer decides this connection too.
    Joined,
    /// Over a bound: decide the ask as shed.
    Shed(Shed),
}

/// A connection waiting for an answer, and the session's number for its ask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Waiter {
    pub connection: u32,
    pub ask: u32,
}

/// The VM's shared callouts. Sans-IO: the filter sends the calls and delivers the answers.
pub struct SharedAsks {
    limits: AskLimits,
    /// Per key: the waiting connections, the owner of the call, the request (to send it
    /// again when its owner goes away).
    lookups: Lookups<AskKey, AskRequest>,
    /// (connection, key) → the session's ask id.
    asks: HashMap<(u32, AskKey), u32>,
    /// Asks each waiting connection has out.
    waiting: HashMap<u32, usize>,
    /// Callout token → what it asks.
    calls: HashMap<u32, AskKey>,
}

impl SharedAsks {
    pub fn new(limits: AskLimits) -> SharedAsks {
        SharedAsks {
            limits,
            lookups: Lookups::default(),
            asks: HashMap::new(),
            waiting: HashMap::new(),
            calls: HashMap::new(),
        }
    }

    /// Connection `connection` needs the answer to its ask `ask` about `request`.
    pub fn ask(&mut self, connection: u32, ask: u32, request: &AskRequest) -> Joined {
        let key = AskKey::of(request);
        if self.asks.contains_key(&(connection, key.clone())) {
            // The session asks each key once; a repeat is the same wait.
            return Joined::Joined;
        }
        if !self.waiting.contains_key(&connection)
            && self.waiting.len() >= self.limits.max_waiting_connections
        {
            return Joined::Shed(Shed::Waiting(self.waiting.len()));
        }
        let in_flight = self.lookups.in_flight(&key);
        if !in_flight {
            let whom = key.whom();
            let sent = self.in_flight(whom);
            if sent >= self.limits.in_flight(whom) {
                return Joined::Shed(Shed::InFlight(whom, sent));
            }
        }
        self.lookups
            .join(key.clone(), connection, Some(request.clone()));
        self.asks.insert((connection, key), ask);
        *self.waiting.entry(connection).or_default() += 1;
        if in_flight {
            Joined::Joined
        } else {
            Joined::Send
        }
    }

    /// The call for `request` was sent as `token` by `owner` (None: the root context).
    pub fn sent(&mut self, request: &AskRequest, owner: Option<u32>, token: u32) {
        let key = AskKey::of(request);
        self.lookups.started(key.clone(), owner);
        self.calls.insert(token, key);
    }

    /// The call for `request` could not be sent: its waiters, to be decided on no answer.
    pub fn send_failed(&mut self, request: &AskRequest) -> Vec<Waiter> {
        self.finish(&AskKey::of(request))
    }

    /// Whether `token` is one of these calls.
    pub fn is_call(&self, token: u32) -> bool {
        self.calls.contains_key(&token)
    }

    /// The answer to call `token` came: whom it asked and every connection waiting for it
    /// (the call is over). None: not one of these calls (or cancelled).
    pub fn answered(&mut self, token: u32) -> Option<(Whom, Vec<Waiter>)> {
        let key = self.calls.remove(&token)?;
        Some((key.whom(), self.finish(&key)))
    }

    fn finish(&mut self, key: &AskKey) -> Vec<Waiter> {
        let mut waiters = Vec::new();
        for connection in self.lookups.finish(key) {
            if let Some(ask) = self.asks.remove(&(connection, key.clone())) {
                self.leave(connection);
                waiters.push(Waiter { connection, ask });
            }
        }
        waiters
    }

    fn leave(&mut self, connection: u32) {
        if let Some(n) = self.waiting.get_mut(&connection) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.waiting.remove(&connection);
            }
        }
    }

    /// Connection `connection` closed: it waits for nothing, and the calls it owned (which
    /// Envoy cancels with its context) are no longer in flight; those others still wait for
    /// are [`Self::orphans`].
    pub fn connection_closed(&mut self, connection: u32) {
        let orphaned = self.lookups.forget_stream(connection);
        self.calls.retain(|_, key| !orphaned.contains(key));
        self.asks.retain(|(c, _), _| *c != connection);
        self.waiting.remove(&connection);
    }

    /// Calls that connections wait for but nobody has in flight (their owner closed): the
    /// root context sends each again (then [`Self::sent`] with no owner), or, over
    /// `max_in_flight`, decides their waiters as shed ([`Self::shed_orphan`]).
    pub fn orphans(&self) -> Vec<(AskRequest, Result<(), Shed>)> {
        let mut in_flight: HashMap<Whom, usize> = HashMap::new();
        let mut out = Vec::new();
        for key in self.lookups.orphans() {
            let Some(request) = self.lookups.data(&key) else {
                continue;
            };
            let whom = key.whom();
            let sent = in_flight
                .entry(whom)
                .or_insert_with(|| self.in_flight(whom));
            let admitted = if *sent < self.limits.in_flight(whom) {
                *sent += 1;
                Ok(())
            } else {
                Err(Shed::InFlight(whom, *sent))
            };
            out.push((request.clone(), admitted));
        }
        out
    }

    /// An orphan that cannot be sent again: its waiters, to be decided as shed.
    pub fn shed_orphan(&mut self, request: &AskRequest) -> Vec<Waiter> {
        self.finish(&AskKey::of(request))
    }

    /// Calls in flight to `whom`.
    pub fn in_flight(&self, whom: Whom) -> usize {
        self.calls.values().filter(|k| k.whom() == whom).count()
    }

    /// Connections waiting for any call.
    pub fn waiting_connections(&self) -> usize {
        self.waiting.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::introspection::HttpCall;

    fn limits() -> AskLimits {
        AskLimits {
            max_waiting_connections: 1024,
            backend_in_flight: 64,
            introspection_in_flight: 64,
            registry_in_flight: 64,
        }
    }

    fn call() -> HttpCall {
        HttpCall {
            cluster: "c".into(),
            method: "GET",
            authority: "a".into(),
            path: "/".into(),
            headers: Vec::new(),
            body: Vec::new(),
            timeout_ms: 1000,
        }
    }

    fn device(id: &str) -> AskRequest {
        AskRequest::DeviceLookup {
            device_id: id.into(),
            call: call(),
        }
    }

    fn token(t: &str) -> AskRequest {
        AskRequest::Introspect {
            token: t.into(),
            call: call(),
        }
    }

    fn waiter(connection: u32, ask: u32) -> Waiter {
        Waiter { connection, ask }
    }

    #[test]
    fn connections_asking_the_same_join_one_call_and_all_get_its_answer() {
        let mut shared = SharedAsks::new(limits());
        assert_eq!(shared.ask(10, 1, &token("t")), Joined::Send);
        shared.sent(&token("t"), Some(10), 500);
        assert_eq!(shared.ask(11, 1, &token("t")), Joined::Joined);
        assert_eq!(shared.ask(12, 7, &token("t")), Joined::Joined);
        // Another token, another call.
        assert_eq!(shared.ask(13, 1, &token("u")), Joined::Send);
        assert_eq!(shared.in_flight(Whom::Introspection), 1);
        assert_eq!(shared.waiting_connections(), 4);
        let (whom, waiters) = shared.answered(500).expect("one of the calls");
        assert_eq!(whom, Whom::Introspection);
        assert_eq!(waiters, vec![waiter(10, 1), waiter(11, 1), waiter(12, 7)]);
        assert_eq!(shared.answered(500), None, "answered once");
        assert_eq!(shared.waiting_connections(), 1);
        // The next connection with that token starts a new call (the cache answers before
        // the session asks, when the answer was cacheable).
        assert_eq!(shared.ask(14, 1, &token("t")), Joined::Send);
    }

    #[test]
    fn a_call_that_cannot_be_sent_returns_its_waiters_to_be_refused() {
        let mut shared = SharedAsks::new(limits());
        assert_eq!(shared.ask(10, 3, &device("lamp-1")), Joined::Send);
        assert_eq!(shared.send_failed(&device("lamp-1")), vec![waiter(10, 3)]);
        assert_eq!(shared.waiting_connections(), 0);
        assert_eq!(shared.in_flight(Whom::DeviceRegistry), 0);
    }

    #[test]
    fn a_waiter_that_closes_leaves_the_waiters() {
        let mut shared = SharedAsks::new(limits());
        shared.ask(10, 1, &device("lamp-1"));
        shared.sent(&device("lamp-1"), Some(10), 1);
        shared.ask(11, 1, &device("lamp-1"));
        shared.ask(12, 1, &device("lamp-1"));
        shared.connection_closed(11);
        assert!(
            shared.orphans().is_empty(),
            "the owner's call is still in flight"
        );
        let (_, waiters) = shared.answered(1).expect("in flight");
        assert_eq!(waiters, vec![waiter(10, 1), waiter(12, 1)]);
    }

    #[test]
    fn when_the_owner_closes_its_call_is_sent_again_for_the_others() {
        let mut shared = SharedAsks::new(limits());
        shared.ask(10, 1, &device("lamp-1"));
        shared.sent(&device("lamp-1"), Some(10), 1);
        shared.ask(11, 2, &device("lamp-1"));
        shared.connection_closed(10);
        // Envoy cancelled the owner's call: its token is no longer one of ours.
        assert!(!shared.is_call(1));
        assert_eq!(shared.in_flight(Whom::DeviceRegistry), 0);
        assert_eq!(shared.orphans(), vec![(device("lamp-1"), Ok(()))]);
        // The root sends it again; a connection asking meanwhile joins that call.
        shared.sent(&device("lamp-1"), None, 2);
        assert!(shared.orphans().is_empty());
        assert_eq!(shared.ask(12, 1, &device("lamp-1")), Joined::Joined);
        let (_, waiters) = shared.answered(2).expect("the root's call");
        assert_eq!(waiters, vec![waiter(11, 2), waiter(12, 1)]);
    }

    #[test]
    fn an_orphan_over_max_in_flight_is_shed_for_its_waiters() {
        let mut shared = SharedAsks::new(AskLimits {
            registry_in_flight: 1,
            ..limits()
        });
        shared.ask(10, 1, &device("a"));
        shared.sent(&device("a"), Some(10), 1);
        shared.ask(11, 1, &device("a"));
        shared.connection_closed(10);
        shared.ask(12, 1, &device("b"));
        shared.sent(&device("b"), Some(12), 2);
        let shed = Shed::InFlight(Whom::DeviceRegistry, 1);
        assert_eq!(shared.orphans(), vec![(device("a"), Err(shed))]);
        assert_eq!(shared.shed_orphan(&device("a")), vec![waiter(11, 1)]);
        assert!(shared.orphans().is_empty());
    }

    #[test]
    fn calls_in_flight_are_bounded_per_endpoint() {
        let mut shared = SharedAsks::new(AskLimits {
            introspection_in_flight: 2,
            ..limits()
        });
        for (conn, t) in [(1, "a"), (2, "b")] {
            assert_eq!(shared.ask(conn, 1, &token(t)), Joined::Send);
            shared.sent(&token(t), Some(conn), conn);
        }
        let shed = Shed::InFlight(Whom::Introspection, 2);
        assert_eq!(shared.ask(3, 1, &token("c")), Joined::Shed(shed));
        assert_eq!(shed.counter(), "introspection.shed");
        // Joining a call in flight adds none: not shed.
        assert_eq!(shared.ask(4, 1, &token("a")), Joined::Joined);
        // Other endpoints have their own bound.
        assert_eq!(shared.ask(5, 1, &device("d")), Joined::Send);
        shared.answered(1);
        assert_eq!(shared.ask(3, 1, &token("c")), Joined::Send);
    }

    #[test]
    fn waiting_connections_are_bounded() {
        let mut shared = SharedAsks::new(AskLimits {
            max_waiting_connections: 2,
            ..limits()
        });
        shared.ask(1, 1, &token("a"));
        shared.sent(&token("a"), Some(1), 9);
        assert_eq!(shared.ask(2, 1, &token("a")), Joined::Joined);
        let shed = Shed::Waiting(2);
        assert_eq!(shared.ask(3, 1, &token("a")), Joined::Shed(shed));
        assert_eq!(shed.counter(), "callout.waiting_shed");
        // A connection already waiting may ask more (a backend CONNECT asks user, then acl).
        assert_eq!(shared.ask(2, 2, &device("d")), Joined::Send);
        shared.connection_closed(2);
        assert_eq!(shared.ask(3, 1, &token("a")), Joined::Joined);
    }
}
