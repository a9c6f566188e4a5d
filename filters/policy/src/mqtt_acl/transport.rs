//! How a connection carries MQTT: raw (`"transport": "mqtt"`, the default) or inside a
//! WebSocket (`"transport": "websocket"`, MQTT over WebSockets as browsers and the npm `mqtt`
//! package speak it, in front of Mosquitto's `protocol websockets` listener).
//!
//! A [`Connection`] is the one [`Session`] of the connection plus, for WebSockets, the
//! [`crate::websocket`] codec around it: the session decides the MQTT bytes exactly as for raw
//! MQTT, and only the framing differs.
//!
//! WebSocket connection, in order:
//! 1. The client's upgrade request is read (at most 8 KiB) and checked
//!    ([`UpgradeRequest::parse`]: GET, Upgrade/Connection, Sec-WebSocket-Key, version 13,
//!    sub-protocol `mqtt`, no body, nothing sent after it). A good one goes on rebuilt (only
//!    those fields and Origin: no cookies, no credentials, no extension offers); that is when
//!    tcp_proxy connects to the broker. A bad one goes to `refusal_cluster` (the sidecar's
//!    echo stand-in; required with this transport) and its echo becomes `HTTP/1.1 400`, then
//!    the connection closes: the broker never hears of it.
//! 2. The broker's answer must be a 101 with the right Sec-WebSocket-Accept and the `mqtt`
//!    sub-protocol, no extension ([`check_upgrade_response`]); it is passed on unchanged. Any
//!    other answer becomes `HTTP/1.1 502` and the connection closes. Client bytes before the 101
//!    close the connection (RFC 6455 4.1: a client waits for it).
//! 3. Frames both ways ([`FrameDecoder`]): the payload of binary messages is the MQTT byte
//!    stream, fed to the session as it arrives; what the session forwards is framed again as
//!    one binary frame per read (MQTT 3.1.1 section 6: packets need not align with frames).
//!    Frames to the broker are masked with the masking key of the client's latest frame (the
//!    key the client chose at random, so no more predictable than the client made it; RFC 6455
//!    5.3); frames to the client are not masked. Ping, pong and close frames pass unchanged, in
//!    their place in the stream. Text frames, bad framing and messages over 4 x
//!    `max_packet_bytes` close the connection.
//! 4. What the session refuses is dropped as for raw MQTT. A refused CONNECT: the broker gets
//!    the session's harmless CONNECT (the WebSocket to the broker is already open, so
//!    `refusal_cluster` cannot take it) and its CONNACK becomes the refusing one, sent in a
//!    binary frame followed by a close frame (1008), then the connection closes. A close the
//!    session decides on the broker's side (a forbidden delivery, a broker protocol error) sends
//!    the client a close frame (1008 / 1002) before the TCP close; one decided on the client's
//!    side closes TCP (RFC 6455 7.1.7: failing the connection).

use serde::Deserialize;

use super::{
    BackendAnswer, CloseReason, Decided, Env, MqttAcl, MqttAclConfig, Output, Session, FILTER,
};
use crate::decision::{Decision, DenyReason};
use crate::decision_line::DecisionLine;
use crate::enforcement::Mode;
use crate::identity::Identity;
use crate::mtls::PeerCertificate;
use crate::websocket::{
    check_upgrade_response, close_code, encode_close, encode_frame, http_error_response,
    FrameDecoder, HeadReader, Opcode, Piece, Sender, UpgradeRequest,
};

#[cfg(test)]
mod tests;

/// The sub-protocol of MQTT over WebSockets (MQTT 3.1.1 section 6, 5.0 section 6).
pub const MQTT_SUBPROTOCOL: &str = "mqtt";
/// What goes to the refusal stand-in for a refused upgrade (its echo becomes the 400).
const REFUSED_UPGRADE_PROBE: &[u8] = b"mqtt-acl: refused WebSocket upgrade\r\n";
/// The masking key of frames to the broker before the client sent one (not reached: the
/// session forwards nothing before the client's first frame).
const FALLBACK_MASK: [u8; 4] = *b"mqtt";

/// How MQTT is carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    /// Raw MQTT over TCP (or TLS).
    #[default]
    Mqtt,
    /// MQTT over WebSockets (RFC 6455, sub-protocol `mqtt`).
    Websocket,
}

impl MqttAcl {
    /// How MQTT is carried.
    pub fn transport(&self) -> Transport {
        self.transport
    }
}

/// Combinations refused at configure time.
pub(super) fn check(config: &MqttAclConfig) -> Result<(), String> {
    if config.transport == Transport::Websocket && config.refusal_cluster.is_none() {
        return Err(
            "transport \"websocket\" needs a refusal_cluster: a bad upgrade request is answered \
             400 through it, before any broker connection"
                .into(),
        );
    }
    Ok(())
}

/// Where a WebSocket connection is.
#[derive(Debug)]
enum Phase {
    /// Reading the client's upgrade request.
    Request(HeadReader),
    /// A refused request went to the stand-in; its echo becomes this answer.
    Refused {
        answer: Vec<u8>,
    },
    /// The request went on; reading the broker's answer.
    Response {
        request: UpgradeRequest,
        reader: HeadReader,
    },
    Open(Box<Frames>),
    /// The last bytes handed over are to be written before the close.
    Closing(CloseReason),
    Closed,
}

/// Both directions' frames once the WebSocket is open.
#[derive(Debug)]
struct Frames {
    client: FrameDecoder,
    broker: FrameDecoder,
    /// Client bytes not read while the session waits for the auth backend.
    backlog: Vec<u8>,
}

/// One connection: the MQTT session and its transport ([module docs](self)).
#[derive(Debug)]
pub struct Connection {
    session: Session,
    /// None: raw MQTT.
    websocket: Option<Phase>,
    /// Decisions on this connection that were not allows (access-log fact `iot_denials`).
    denials: u32,
}

fn closing(reason: CloseReason) -> Output {
    Output {
        close: Some(reason),
        ..Output::default()
    }
}

/// Adds `more`'s decisions, asks and wishes to `out` (not its bytes).
fn absorb(out: &mut Output, more: Output) {
    out.decisions.extend(more.decisions);
    out.asks.extend(more.asks);
    if more.keys_wanted.is_some() {
        out.keys_wanted = more.keys_wanted;
    }
    if more.close.is_some() {
        out.close = more.close;
    }
    out.close_after_write |= more.close_after_write;
}

/// The close code a client is told for `reason`.
fn close_code_for(reason: &CloseReason) -> u16 {
    match reason {
        CloseReason::Malformed(_) => close_code::PROTOCOL_ERROR,
        CloseReason::Forbidden(_) | CloseReason::Refused => close_code::POLICY_VIOLATION,
        CloseReason::Expired | CloseReason::Revoked | CloseReason::Unconfirmed => {
            close_code::POLICY_VIOLATION
        }
    }
}

/// The close frame's reason text (no client data in it).
fn close_text(reason: &CloseReason) -> &'static str {
    match reason {
        CloseReason::Malformed(_) => "protocol error",
        CloseReason::Forbidden(_) => "forbidden",
        CloseReason::Expired => "credential expired",
        CloseReason::Revoked => "credential revoked",
        CloseReason::Unconfirmed => "credential not confirmed",
        CloseReason::Refused => "connection refused",
    }
}

impl Connection {
    /// As [`Session::new`]; the transport is the policy's.
    pub fn new(policy: &MqttAcl, peer: Option<PeerCertificate>, connection_id: u64) -> Connection {
        Connection {
            session: Session::new(policy, peer, connection_id),
            websocket: match policy.transport {
                Transport::Mqtt => None,
                Transport::Websocket => Some(Phase::Request(HeadReader::default())),
            },
            denials: 0,
        }
    }

    /// Adds `out`'s denials (shadow ones too) to the connection's count; the new count when
    /// there were any, so the caller exports it only when it changed.
    pub fn count_denials(&mut self, out: &Output) -> Option<u32> {
        let new = out.decisions.iter().filter(|d| !d.line.is_allow()).count();
        if new == 0 {
            return None;
        }
        let new = u32::try_from(new).unwrap_or(u32::MAX);
        self.denials = self.denials.saturating_add(new);
        Some(self.denials)
    }

    pub fn session(&self) -> &Session {
        &self.session
    }

    pub fn waiting_for_backend(&self) -> bool {
        self.session.waiting_for_backend()
    }

    /// Nothing may go upstream yet: for raw MQTT until the CONNECT is decided, for WebSockets
    /// until the upgrade request is (the client sends its CONNECT only after the broker's 101).
    pub fn awaiting_connect(&self) -> bool {
        match &self.websocket {
            None => self.session.awaiting_connect(),
            Some(phase) => matches!(phase, Phase::Request(_)),
        }
    }

    /// Why the connection is to be closed now that its last bytes were handed over.
    pub fn closing(&self) -> Option<&CloseReason> {
        match &self.websocket {
            Some(Phase::Closing(reason)) => Some(reason),
            _ => self.session.closing(),
        }
    }

    pub fn set_opened_at(&mut self, now: u64) {
        self.session.set_opened_at(now);
    }

    /// As [`Session::check_connect_timeout`]: the upgrade and the CONNECT within the timeout.
    pub fn check_connect_timeout(&mut self, env: &Env<'_>) -> Option<CloseReason> {
        let reason = self.session.check_connect_timeout(env)?;
        if self.websocket.is_some() {
            self.websocket = Some(Phase::Closed);
        }
        Some(reason)
    }

    pub fn check_expiry(&mut self, env: &Env<'_>) -> Option<Output> {
        self.session.check_expiry(env)
    }

    /// As [`Session::check_registry_deadline`].
    pub fn check_registry_deadline(&mut self, env: &Env<'_>) -> Option<Output> {
        self.session.check_registry_deadline(env)
    }

    /// The session, for the registry re-checks ([`super::RegistryRechecks`]).
    pub fn session_mut(&mut self) -> &mut Session {
        &mut self.session
    }

    pub fn set_peer(&mut self, peer: Option<PeerCertificate>) {
        self.session.set_peer(peer);
    }

    pub fn identity(&self) -> Option<&Identity> {
        self.session.identity()
    }

    pub fn client_id(&self) -> &str {
        self.session.client_id()
    }

    pub fn expires_at(&self) -> Option<u64> {
        self.session.expires_at()
    }

    pub fn is_closed(&self) -> bool {
        match &self.websocket {
            Some(Phase::Closed) => true,
            _ => self.session.is_closed(),
        }
    }

    /// Reads bytes from the client; the output's `forward` is what goes to the broker.
    pub fn on_client_bytes(&mut self, bytes: &[u8], env: &Env<'_>) -> Output {
        let Some(phase) = self.websocket.take() else {
            return self.session.on_client_bytes(bytes, env);
        };
        let (phase, out) = self.client_bytes(phase, bytes, env);
        self.websocket = Some(phase);
        out
    }

    /// Reads bytes from the broker; the output's `forward` is what goes to the client.
    pub fn on_broker_bytes(&mut self, bytes: &[u8], env: &Env<'_>) -> Output {
        let Some(phase) = self.websocket.take() else {
            return self.session.on_broker_bytes(bytes, env);
        };
        let (phase, out) = self.broker_bytes(phase, bytes, env);
        self.websocket = Some(phase);
        out
    }

    /// As [`Session::on_backend_answer`]; for WebSockets the client bytes read meanwhile are
    /// read next.
    pub fn on_backend_answer(&mut self, id: u32, answer: &BackendAnswer, env: &Env<'_>) -> Output {
        let out = self.session.on_backend_answer(id, answer, env);
        self.after_answer(out, env)
    }

    /// As [`Session::on_ask_shed`], then as [`Self::on_backend_answer`].
    pub fn on_ask_shed(&mut self, id: u32, why: &str, env: &Env<'_>) -> Output {
        let out = self.session.on_ask_shed(id, why, env);
        self.after_answer(out, env)
    }

    fn after_answer(&mut self, out: Output, env: &Env<'_>) -> Output {
        match self.websocket.take() {
            None => out,
            Some(Phase::Open(mut frames)) => {
                let (phase, out) = self.pump_client(&mut frames, out, env);
                self.websocket = Some(phase.unwrap_or(Phase::Open(frames)));
                out
            }
            Some(phase) => {
                self.websocket = Some(phase);
                out
            }
        }
    }

    fn client_bytes(&mut self, phase: Phase, bytes: &[u8], env: &Env<'_>) -> (Phase, Output) {
        match phase {
            Phase::Closed => (
                Phase::Closed,
                closing(CloseReason::Malformed("connection closed".into())),
            ),
            Phase::Closing(reason) => (Phase::Closed, closing(reason)),
            Phase::Request(mut reader) => {
                let request = match reader.feed(bytes) {
                    Ok(None) => return (Phase::Request(reader), Output::default()),
                    Ok(Some(head)) if !head.rest.is_empty() => {
                        Err("the client sent data before the server's handshake answer".to_string())
                    }
                    Ok(Some(head)) => UpgradeRequest::parse(&head.head, MQTT_SUBPROTOCOL)
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                match request {
                    Ok(request) => {
                        let out = Output {
                            forward: request.to_bytes(),
                            ..Output::default()
                        };
                        let reader = HeadReader::default();
                        (Phase::Response { request, reader }, out)
                    }
                    Err(why) => self.refuse_upgrade(env, why),
                }
            }
            // The refused client's further bytes go nowhere.
            phase @ Phase::Refused { .. } => (phase, Output::default()),
            Phase::Response { .. } if !bytes.is_empty() => (
                Phase::Closed,
                closing(CloseReason::Malformed(
                    "the client sent data before the server's handshake answer".into(),
                )),
            ),
            phase @ Phase::Response { .. } => (phase, Output::default()),
            Phase::Open(mut frames) => {
                let held_limit = env
                    .policy
                    .limits
                    .max_packet_bytes
                    .saturating_mul(2)
                    .saturating_add(4096);
                if frames.backlog.len().saturating_add(bytes.len()) > held_limit {
                    return (
                        Phase::Closed,
                        closing(CloseReason::Malformed(format!(
                            "more than {held_limit} bytes arrived while the auth backend was asked"
                        ))),
                    );
                }
                frames.backlog.extend_from_slice(bytes);
                let (phase, out) = self.pump_client(&mut frames, Output::default(), env);
                (phase.unwrap_or(Phase::Open(frames)), out)
            }
        }
    }

    /// A bad upgrade request: to the refusal stand-in, whose echo becomes the 400.
    fn refuse_upgrade(&mut self, env: &Env<'_>, why: String) -> (Phase, Output) {
        let decision = Decision::Deny(DenyReason::BadRequest(format!(
            "not a WebSocket upgrade to MQTT: {why}"
        )));
        // Refused in shadow mode too: what follows could not be read.
        let line = DecisionLine::new(FILTER, Mode::Enforce, &decision)
            .request(Some("GET"), None, None, None)
            .text("operation", "websocket upgrade");
        let out = Output {
            forward: REFUSED_UPGRADE_PROBE.to_vec(),
            decisions: vec![Decided {
                line,
                decision,
                counters: vec!["connect.refused"],
            }],
            refusal_cluster: env.policy.refusal_cluster.clone(),
            ..Output::default()
        };
        let answer = http_error_response(
            400,
            "Bad Request",
            "not a WebSocket upgrade to MQTT (sub-protocol \"mqtt\")\n",
        );
        (Phase::Refused { answer }, out)
    }

    /// Reads the client's frames in `frames.backlog` into the session until they run out or the
    /// session waits for the backend. `out` holds what the session said before (its bytes are
    /// MQTT, framed here). Some(phase): the connection leaves `Open`.
    fn pump_client(
        &mut self,
        frames: &mut Frames,
        mut out: Output,
        env: &Env<'_>,
    ) -> (Option<Phase>, Output) {
        if out.close.is_some() {
            return (Some(Phase::Closed), out);
        }
        let mut mqtt = std::mem::take(&mut out.forward);
        // A refused CONNECT's harmless one goes to the broker: tcp_proxy is connected already.
        out.refusal_cluster = None;
        let mut wire = Vec::new();
        let backlog = std::mem::take(&mut frames.backlog);
        let mut input = backlog.as_slice();
        let stopped = loop {
            if out.close_after_write || self.session.waiting_for_backend() {
                break None;
            }
            match frames.client.next_piece(&mut input) {
                Ok(None) => break None,
                Ok(Some(Piece::Data(bytes))) => {
                    let mut more = self.session.on_client_bytes(&bytes, env);
                    more.refusal_cluster = None;
                    let close = more.close.take();
                    mqtt.append(&mut more.forward);
                    absorb(&mut out, more);
                    if close.is_some() {
                        break close;
                    }
                }
                Ok(Some(Piece::Control(frame))) => {
                    frame_to_broker(&mut wire, &mut mqtt, frames);
                    wire.extend_from_slice(&frame.raw);
                }
                Err(error) => break Some(CloseReason::Malformed(format!("client sent {error}"))),
            }
        };
        frames.backlog = input.to_vec();
        frame_to_broker(&mut wire, &mut mqtt, frames);
        out.forward = wire;
        if let Some(reason) = stopped {
            // What this read allowed before the bad frame or packet still goes on.
            if out.forward.is_empty() {
                out.close = Some(reason);
                return (Some(Phase::Closed), out);
            }
            out.close_after_write = true;
            return (Some(Phase::Closing(reason)), out);
        }
        if out.close_after_write {
            // The session closes once what it allowed is written.
            let reason = self
                .session
                .closing()
                .cloned()
                .unwrap_or_else(|| CloseReason::Malformed("closing".into()));
            return (Some(Phase::Closing(reason)), out);
        }
        (None, out)
    }

    fn broker_bytes(&mut self, phase: Phase, bytes: &[u8], env: &Env<'_>) -> (Phase, Output) {
        match phase {
            Phase::Closed => (
                Phase::Closed,
                closing(CloseReason::Malformed("connection closed".into())),
            ),
            Phase::Closing(reason) => (Phase::Closed, closing(reason)),
            Phase::Request(_) => (
                Phase::Closed,
                closing(CloseReason::Malformed(
                    "the broker spoke before the client's upgrade request".into(),
                )),
            ),
            Phase::Refused { answer } => {
                if bytes.is_empty() {
                    return (Phase::Refused { answer }, Output::default());
                }
                let out = Output {
                    forward: answer,
                    close_after_write: true,
                    ..Output::default()
                };
                (Phase::Closing(CloseReason::Refused), out)
            }
            Phase::Response {
                request,
                mut reader,
            } => {
                let head = match reader.feed(bytes) {
                    Ok(None) => return (Phase::Response { request, reader }, Output::default()),
                    Ok(Some(head)) => head,
                    Err(e) => return bad_gateway(e.to_string()),
                };
                if let Err(e) = check_upgrade_response(&head.head, &request) {
                    return bad_gateway(e.to_string());
                }
                let max_message = env.policy.limits.max_packet_bytes.saturating_mul(4) as u64;
                let mut frames = Box::new(Frames {
                    client: FrameDecoder::new(Sender::Client, max_message),
                    broker: FrameDecoder::new(Sender::Server, max_message),
                    backlog: Vec::new(),
                });
                let (phase, mut out) = self.pump_broker(&mut frames, &head.rest, env);
                let mut forward = head.head;
                forward.append(&mut out.forward);
                out.forward = forward;
                (phase.unwrap_or(Phase::Open(frames)), out)
            }
            Phase::Open(mut frames) => {
                let (phase, out) = self.pump_broker(&mut frames, bytes, env);
                (phase.unwrap_or(Phase::Open(frames)), out)
            }
        }
    }

    /// Reads the broker's frames into the session. A close the session decides is turned into
    /// a close frame to the client, then the TCP close.
    fn pump_broker(
        &mut self,
        frames: &mut Frames,
        bytes: &[u8],
        env: &Env<'_>,
    ) -> (Option<Phase>, Output) {
        let mut out = Output::default();
        let mut mqtt = Vec::new();
        let mut wire = Vec::new();
        let mut input = bytes;
        let reason = loop {
            match frames.broker.next_piece(&mut input) {
                Ok(None) => break None,
                Ok(Some(Piece::Data(bytes))) => {
                    let mut more = self.session.on_broker_bytes(&bytes, env);
                    let close = more.close.take();
                    mqtt.append(&mut more.forward);
                    absorb(&mut out, more);
                    if let Some(reason) = close {
                        // What earlier pieces allowed still goes, then the close frame.
                        break Some(reason);
                    }
                    if out.close_after_write {
                        break self.session.closing().cloned();
                    }
                }
                Ok(Some(Piece::Control(frame))) => {
                    frame_to_client(&mut wire, &mut mqtt);
                    wire.extend_from_slice(&frame.raw);
                }
                Err(error) => {
                    frame_to_client(&mut wire, &mut mqtt);
                    wire.extend(encode_close(error.close_code(), "protocol error", None));
                    out.forward = wire;
                    out.close_after_write = true;
                    let reason = CloseReason::Malformed(format!("broker sent {error}"));
                    return (Some(Phase::Closing(reason)), out);
                }
            }
        };
        frame_to_client(&mut wire, &mut mqtt);
        match reason {
            None if out.close_after_write => {
                // Closing without a reason cannot happen (the session gives one); close anyway.
                let reason = CloseReason::Malformed("closing".into());
                wire.extend(encode_close(close_code::INTERNAL_ERROR, "closing", None));
                out.forward = wire;
                (Some(Phase::Closing(reason)), out)
            }
            None => {
                out.forward = wire;
                (None, out)
            }
            Some(reason) => {
                wire.extend(encode_close(
                    close_code_for(&reason),
                    close_text(&reason),
                    None,
                ));
                out.forward = wire;
                out.close_after_write = true;
                (Some(Phase::Closing(reason)), out)
            }
        }
    }
}

/// The broker's answer to the upgrade is not a good 101: the client gets a 502.
fn bad_gateway(why: String) -> (Phase, Output) {
    let out = Output {
        forward: http_error_response(502, "Bad Gateway", "the broker refused the upgrade\n"),
        close_after_write: true,
        ..Output::default()
    };
    let reason = CloseReason::Malformed(format!("the broker's upgrade answer: {why}"));
    (Phase::Closing(reason), out)
}

/// Frames the MQTT bytes `mqtt` (if any) as one binary frame to the broker, masked.
fn frame_to_broker(wire: &mut Vec<u8>, mqtt: &mut Vec<u8>, frames: &Frames) {
    if !mqtt.is_empty() {
        let mask = frames.client.last_mask().unwrap_or(FALLBACK_MASK);
        wire.extend(encode_frame(Opcode::Binary, mqtt, Some(mask)));
        mqtt.clear();
    }
}

/// Frames the MQTT bytes `mqtt` (if any) as one binary frame to the client.
fn frame_to_client(wire: &mut Vec<u8>, mqtt: &mut Vec<u8>) {
    if !mqtt.is_empty() {
        wire.extend(encode_frame(Opcode::Binary, mqtt, None));
        mqtt.clear();
    }
}
