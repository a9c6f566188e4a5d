//! Connections admitted on a device key the registry listed are re-checked before the answer
//! they run on expires (`device_keys.registry`): a key revoked in the registry stops working
//! within `cache.positive_ttl_s` for a connection that stays open, as it does for an HTTP
//! request.
//!
//! * A connection runs on one registry answer: the cache entry it was admitted on, valid
//!   until that entry expires (`valid_until`).
//! * From [`DeviceRegistry::recheck_lead_s`] before then (the call's timeout plus a second,
//!   at most half the positive TTL) the filter's tick asks again, through the same cache: a
//!   fresher entry (another connection's re-check, a CONNECT's lookup) is taken as it is;
//!   otherwise one call per device is made ([`RegistryRechecks`]), and its answer is cached
//!   and applied to every connection of that device.
//! * The key still listed: the connection runs on the new answer (its roles too). Not listed
//!   any more (another digest, an empty list, 404): closed (`closed.revoked`), as a connection
//!   whose token expired is.
//! * No usable answer: asked again at most once a second while the old answer is valid. When
//!   it expires without a fresh one, the connection is closed (`closed.unconfirmed`) at the
//!   next packet or tick: fail closed, no grace beyond the positive TTL.
//! * Packets meanwhile are decided on the old answer, which is valid until `valid_until`;
//!   from then on nothing passes without a fresh one. Nothing is held.

use std::collections::HashSet;

use super::{BackendAnswer, CloseReason, Env, Output, Session};
use crate::decision::{Decision, DenyReason};
use crate::device_keys::{key_digest, DeviceKeys, KeyCheck};
use crate::device_registry::{DeviceRegistry, LookupResult};
use crate::identity::IdentityKind;
use crate::mqtt::Connect;
use crate::upstream::HttpCall;

/// The registry answer a connection runs on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Standing {
    device_id: String,
    /// SHA-256 of the key the client authenticated with (the key itself is not kept).
    key_digest: [u8; 32],
    /// When the answer expires: no packet passes at or after it without a fresh one.
    valid_until: u64,
    /// From when a fresh answer is asked for.
    recheck_from: u64,
    /// A re-check of this connection is in flight.
    asking: bool,
    /// The second the last re-check was asked (retries at most once a second).
    last_asked: Option<u64>,
}

fn registry<'a>(env: &Env<'a>) -> Option<(&'a DeviceKeys, &'a DeviceRegistry)> {
    let keys = env.policy.device_keys.as_ref()?;
    Some((keys, keys.registry()?))
}

/// When to start asking again for an answer valid from `now` until `valid_until`.
fn recheck_from(registry: &DeviceRegistry, now: u64, valid_until: u64) -> u64 {
    let lead = registry
        .recheck_lead_s()
        .min(valid_until.saturating_sub(now) / 2);
    valid_until.saturating_sub(lead)
}

/// The standing of a connection just admitted, if a registry answer admitted it.
pub(super) fn admitted(connect: &Connect, session: &Session, env: &Env<'_>) -> Option<Standing> {
    let identity = session.identity.as_ref()?;
    let (keys, registry) = registry(env)?;
    if identity.kind != IdentityKind::DeviceKey || keys.knows(&identity.subject) {
        return None;
    }
    let key = std::str::from_utf8(connect.password.as_deref()?).ok()?;
    let now = env.now;
    let valid_until = registry.cached_until(&identity.subject, now).map_or(
        now.saturating_add(registry.positive_ttl_s()),
        |(_, until)| until,
    );
    Some(Standing {
        device_id: identity.subject.clone(),
        key_digest: key_digest(key),
        valid_until,
        recheck_from: recheck_from(registry, now, valid_until),
        asking: false,
        last_asked: None,
    })
}

impl Session {
    /// The device this connection's registry answer is about, if it runs on one.
    pub fn registry_device(&self) -> Option<&str> {
        self.registry.as_ref().map(|s| s.device_id.as_str())
    }

    /// When the registry answer this connection runs on expires.
    pub fn registry_valid_until(&self) -> Option<u64> {
        self.registry.as_ref().map(|s| s.valid_until)
    }

    /// The registry answer the connection runs on expired without a fresh one: in enforce
    /// mode it is closed (`closed.unconfirmed`); a fresher cached answer is taken first.
    pub fn check_registry_deadline(&mut self, env: &Env<'_>) -> Option<Output> {
        let standing = self.registry.as_ref()?;
        if env.now < standing.valid_until || self.is_closed() {
            return None;
        }
        if let Some(out) = self.take_cached_answer(env) {
            return Some(out);
        }
        self.end_standing(
            env,
            DenyReason::Unavailable(
                "the device registry did not confirm the device key before the answer the \
                 connection runs on expired"
                    .into(),
            ),
            CloseReason::Unconfirmed,
        )
    }

    /// A fresher answer in the cache than the one the connection runs on, applied; None if
    /// there is none.
    fn take_cached_answer(&mut self, env: &Env<'_>) -> Option<Output> {
        let standing = self.registry.as_ref()?;
        let (_, registry) = registry(env)?;
        let (result, until) = registry.cached_until(&standing.device_id, env.now)?;
        // A cached refusal (404) is news whenever it was cached; an allow only if it is
        // another answer than the one the connection runs on.
        if result.is_ok() && until <= standing.valid_until {
            return None;
        }
        self.on_registry_answer(&result, until, env)
    }

    /// What the registry (or its cache) says about the connection's device now: the key
    /// still listed, the connection runs on the answer until `valid_until`; not listed,
    /// closed; no usable answer, nothing changes (asked again later).
    pub fn on_registry_answer(
        &mut self,
        result: &LookupResult,
        valid_until: u64,
        env: &Env<'_>,
    ) -> Option<Output> {
        if self.is_closed() {
            return None;
        }
        let (keys, registry) = registry(env)?;
        let standing = self.registry.as_mut()?;
        standing.asking = false;
        match keys.check_record_digest(result, &standing.device_id, &standing.key_digest) {
            KeyCheck::Verified(renewed) => {
                if valid_until > standing.valid_until {
                    standing.valid_until = valid_until;
                    standing.recheck_from = recheck_from(registry, env.now, valid_until);
                }
                if let Some(identity) = self.identity.as_mut() {
                    identity.roles = renewed.roles;
                }
                let decision = Decision::Allow("device key still listed by the registry".into());
                let mut decided = self.decided(
                    env.policy.mode,
                    "mqtt session re-check",
                    "[]",
                    decision,
                    "connect",
                );
                decided.counters = vec!["registry.rechecked"];
                Some(Output {
                    decisions: vec![decided],
                    ..Output::default()
                })
            }
            KeyCheck::Refused(DenyReason::Unavailable(_)) | KeyCheck::Lookup { .. } => None,
            KeyCheck::Refused(_) => self.end_standing(
                env,
                DenyReason::Unauthenticated(
                    "the device registry no longer lists the key the connection \
                     authenticated with"
                        .into(),
                ),
                CloseReason::Revoked,
            ),
        }
    }

    /// The connection may no longer run on its key: closed in enforce mode (a decision line,
    /// counted by the close reason); in shadow mode logged once and no longer re-checked.
    fn end_standing(
        &mut self,
        env: &Env<'_>,
        reason: DenyReason,
        close: CloseReason,
    ) -> Option<Output> {
        let mode = env.policy.mode;
        let mut decided = self.decided(
            mode,
            "mqtt session re-check",
            "[]",
            Decision::Deny(reason),
            "connect",
        );
        decided.counters = Vec::new();
        self.registry = None;
        if mode == crate::enforcement::Mode::Shadow {
            decided.counters = vec!["shadow.denied"];
            return Some(Output {
                decisions: vec![decided],
                ..Output::default()
            });
        }
        self.phase = super::Phase::Closed;
        Some(Output {
            decisions: vec![decided],
            close: Some(close),
            ..Output::default()
        })
    }

    /// Whether the connection's answer is to be asked for again now (none in flight for it,
    /// the last try at least a second ago).
    fn recheck_wanted(&self, now: u64) -> bool {
        self.registry.as_ref().is_some_and(|s| {
            now >= s.recheck_from
                && now < s.valid_until
                && !s.asking
                && s.last_asked.is_none_or(|at| now > at)
        }) && !self.is_closed()
    }
}

/// A re-check call to make: ask `device_id` with `call`, hand the answer to
/// [`RegistryRechecks::answered`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecheckCall {
    pub device_id: String,
    pub call: HttpCall,
}

/// The re-checks of one VM: at most one call per device in flight, its answer shared by every
/// connection of the device. `K` names a connection (the filter's context id).
#[derive(Debug, Default)]
pub struct RegistryRechecks {
    asking: HashSet<String>,
}

impl RegistryRechecks {
    pub fn new() -> RegistryRechecks {
        RegistryRechecks::default()
    }

    /// Devices with a call in flight.
    pub fn in_flight(&self) -> usize {
        self.asking.len()
    }

    /// At a tick: each connection whose answer is due takes a fresher cached one, or waits for
    /// a call about its device (made once per device). Returns what was decided per
    /// connection and the calls to make.
    pub fn tick<'s, K>(
        &mut self,
        sessions: impl IntoIterator<Item = (K, &'s mut Session)>,
        env: &Env<'_>,
    ) -> (Vec<(K, Output)>, Vec<RecheckCall>) {
        let mut outputs = Vec::new();
        let mut calls = Vec::new();
        let Some((_, registry)) = registry(env) else {
            return (outputs, calls);
        };
        for (key, session) in sessions {
            if !session.recheck_wanted(env.now) {
                continue;
            }
            if let Some(out) = session.take_cached_answer(env) {
                outputs.push((key, out));
                continue;
            }
            let Some(standing) = session.registry.as_mut() else {
                continue;
            };
            standing.asking = true;
            standing.last_asked = Some(env.now);
            if self.asking.insert(standing.device_id.clone()) {
                calls.push(RecheckCall {
                    device_id: standing.device_id.clone(),
                    call: registry.call(&standing.device_id),
                });
            }
        }
        (outputs, calls)
    }

    /// The registry's answer about `device_id` (no answer: `BackendAnswer::none()`), cached
    /// and applied to every connection of the device.
    pub fn answered<'s, K>(
        &mut self,
        device_id: &str,
        answer: &BackendAnswer,
        sessions: impl IntoIterator<Item = (K, &'s mut Session)>,
        env: &Env<'_>,
    ) -> Vec<(K, Output)> {
        self.asking.remove(device_id);
        let Some((keys, registry)) = registry(env) else {
            return Vec::new();
        };
        let decided =
            keys.finish_lookup(device_id, answer.status.unwrap_or(0), &answer.body, env.now);
        let valid_until = registry.cached_until(device_id, env.now).map_or(
            env.now.saturating_add(registry.positive_ttl_s()),
            |(_, until)| until,
        );
        sessions
            .into_iter()
            .filter(|(_, s)| s.registry_device() == Some(device_id))
            .filter_map(|(key, session)| {
                session
                    .on_registry_answer(&decided.result, valid_until, env)
                    .map(|out| (key, out))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use sha2::{Digest, Sha256};

    use super::*;
    use crate::enforcement::Mode;
    use crate::mqtt::{encode, encode_connack, v3_connack, Packet, Properties, ProtocolVersion};
    use crate::mqtt::{Publish, QoS};
    use crate::mqtt_acl::{AskRequest, MqttAcl};

    const NOW: u64 = 1_767_225_600;
    const V3: ProtocolVersion = ProtocolVersion::V311;

    fn sha(key: &str) -> String {
        Sha256::digest(key.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// Positive TTL 60 s, timeout 2 s: re-checks start 3 s before an answer expires.
    fn policy_with(mode: &str) -> MqttAcl {
        let config = json!({"mode": mode,
            "acl": {"rules": [{"name": "lamps", "effect": "allow", "subjects": ["authenticated"],
                               "actions": ["*"], "mqtt": {"topic": "lamps/#"}}]},
            "device_keys": {"devices": {"lamp-static": {"key_sha256": [sha("ks")]}},
                            "registry": {"cluster": "iot-directory",
                                         "authority": "iotdirectory.example",
                                         "path": "/device-keys", "timeout_ms": 2000,
                                         "cache": {"positive_ttl_s": 60,
                                                   "negative_ttl_s": 10}}}});
        MqttAcl::from_json(config.to_string().as_bytes()).unwrap()
    }

    fn policy() -> MqttAcl {
        policy_with("enforce")
    }

    fn listed(device: &str, keys: &[&str]) -> BackendAnswer {
        let digests: Vec<String> = keys.iter().map(|k| sha(k)).collect();
        BackendAnswer {
            status: Some(200),
            body: json!({"id": device, "key_sha256": digests})
                .to_string()
                .into_bytes(),
        }
    }

    fn status(status: u32) -> BackendAnswer {
        BackendAnswer {
            status: (status != 0).then_some(status),
            body: Vec::new(),
        }
    }

    fn env(policy: &MqttAcl, now: u64) -> Env<'_> {
        Env { policy, now }
    }

    fn connect(device: &str, key: &str) -> Vec<u8> {
        encode(
            &Packet::Connect(Connect {
                version: V3,
                bridge: false,
                client_id: device.into(),
                clean_start: true,
                keep_alive: 60,
                username: Some(device.into()),
                password: Some(key.as_bytes().to_vec()),
                will: None,
                properties: Properties::new(),
            }),
            V3,
        )
        .unwrap()
    }

    fn publish(topic: &str) -> Vec<u8> {
        encode(
            &Packet::Publish(Publish {
                dup: false,
                qos: QoS::AtMostOnce,
                retain: false,
                topic: topic.into(),
                packet_id: None,
                properties: Properties::new(),
                payload: b"on".to_vec(),
            }),
            V3,
        )
        .unwrap()
    }

    /// A connection of `device` with `key`, admitted at `now` (the registry asked with
    /// `answer` if the cache has nothing).
    fn admit(
        policy: &MqttAcl,
        device: &str,
        key: &str,
        now: u64,
        answer: &BackendAnswer,
    ) -> Session {
        let mut session = Session::new(policy, None, 7);
        let env = env(policy, now);
        let mut out = session.on_client_bytes(&connect(device, key), &env);
        if let Some(ask) = out.asks.first() {
            assert!(matches!(ask.request, AskRequest::DeviceLookup { .. }));
            out = session.on_backend_answer(ask.id, answer, &env);
        }
        assert!(out.close.is_none() && !out.forward.is_empty(), "{out:?}");
        let connack = encode_connack(V3, v3_connack::ACCEPTED);
        assert_eq!(session.on_broker_bytes(&connack, &env).forward, connack);
        session
    }

    fn lines(out: &Output) -> String {
        out.decisions
            .iter()
            .map(|d| d.line.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn a_connection_runs_on_its_registry_answer_and_is_rechecked_before_it_expires() {
        let policy = policy();
        let answer = listed("lamp-07", &["k7"]);
        let mut a = admit(&policy, "lamp-07", "k7", NOW, &answer);
        // A second connection of the device, from the cache: the same answer, the same expiry.
        let mut b = admit(&policy, "lamp-07", "k7", NOW + 10, &answer);
        assert_eq!(a.registry_valid_until(), Some(NOW + 60));
        assert_eq!(b.registry_valid_until(), Some(NOW + 60));
        let mut rechecks = RegistryRechecks::new();
        // Nothing before the lead (timeout 2 s rounded up, plus 1 s).
        let (outputs, calls) = rechecks.tick([(1, &mut a), (2, &mut b)], &env(&policy, NOW + 56));
        assert!(outputs.is_empty() && calls.is_empty());
        // Then one call for the device, whatever the number of its connections.
        let (outputs, calls) = rechecks.tick([(1, &mut a), (2, &mut b)], &env(&policy, NOW + 57));
        assert!(outputs.is_empty());
        assert_eq!(calls.len(), 1, "{calls:?}");
        assert_eq!(calls[0].device_id, "lamp-07");
        assert_eq!(calls[0].call.path, "/device-keys?id=lamp-07");
        assert_eq!(rechecks.in_flight(), 1);
        // Not again while it is in flight.
        let (_, calls) = rechecks.tick([(1, &mut a), (2, &mut b)], &env(&policy, NOW + 58));
        assert!(calls.is_empty());
        // Still listed: both run on the new answer (asked at +57, valid 60 s more).
        let outputs = rechecks.answered(
            "lamp-07",
            &answer,
            [(1, &mut a), (2, &mut b)],
            &env(&policy, NOW + 57),
        );
        assert_eq!(outputs.len(), 2);
        for (_, out) in &outputs {
            assert!(out.close.is_none());
            assert_eq!(out.decisions[0].counters, vec!["registry.rechecked"]);
            assert!(lines(out).contains("decision=allow"), "{}", lines(out));
        }
        assert_eq!(rechecks.in_flight(), 0);
        assert_eq!(a.registry_valid_until(), Some(NOW + 117));
        // Past the first answer's expiry, packets pass.
        let out = a.on_client_bytes(&publish("lamps/lamp-07/state"), &env(&policy, NOW + 61));
        assert!(out.close.is_none() && !out.forward.is_empty(), "{out:?}");
        assert!(a
            .check_registry_deadline(&env(&policy, NOW + 116))
            .is_none());
    }

    #[test]
    fn a_key_the_registry_no_longer_lists_closes_its_connections_and_only_those() {
        for (revoked, k7b_kept) in [
            (listed("lamp-07", &["k7b"]), true),
            (listed("lamp-07", &[]), false),
            (status(404), false),
        ] {
            let policy = policy();
            let both = listed("lamp-07", &["k7", "k7b"]);
            let mut old = admit(&policy, "lamp-07", "k7", NOW, &both);
            let mut new = admit(&policy, "lamp-07", "k7b", NOW, &both);
            let mut rechecks = RegistryRechecks::new();
            let (_, calls) = rechecks.tick([(1, &mut old), (2, &mut new)], &env(&policy, NOW + 57));
            assert_eq!(calls.len(), 1);
            let outputs = rechecks.answered(
                "lamp-07",
                &revoked,
                [(1, &mut old), (2, &mut new)],
                &env(&policy, NOW + 57),
            );
            let (key, out) = &outputs[0];
            assert_eq!(*key, 1);
            assert_eq!(out.close, Some(CloseReason::Revoked));
            assert_eq!(
                out.close.as_ref().map(CloseReason::metric),
                Some("closed.revoked")
            );
            assert!(
                out.decisions[0].counters.is_empty(),
                "counted by the close reason"
            );
            let line = lines(out);
            assert!(
                line.contains("decision=deny") && line.contains("no longer lists"),
                "{line}"
            );
            assert!(old.is_closed());
            // Nothing the closed connection sends passes.
            let after =
                old.on_client_bytes(&publish("lamps/lamp-07/state"), &env(&policy, NOW + 58));
            assert!(after.forward.is_empty() && after.close.is_some());
            // The other key: kept while listed, closed like the first otherwise.
            let (_, out) = &outputs[1];
            if k7b_kept {
                assert!(out.close.is_none() && !new.is_closed());
            } else {
                assert_eq!(out.close, Some(CloseReason::Revoked));
            }
        }
    }

    #[test]
    fn a_registry_down_at_the_recheck_is_retried_and_the_connection_closed_when_its_answer_expires()
    {
        let policy = policy();
        let mut s = admit(&policy, "lamp-07", "k7", NOW, &listed("lamp-07", &["k7"]));
        let mut rechecks = RegistryRechecks::new();
        let (_, calls) = rechecks.tick([(1, &mut s)], &env(&policy, NOW + 57));
        assert_eq!(calls.len(), 1);
        for failed in [
            status(0),
            status(503),
            BackendAnswer {
                status: Some(200),
                body: b"junk".to_vec(),
            },
        ] {
            let outputs =
                rechecks.answered("lamp-07", &failed, [(1, &mut s)], &env(&policy, NOW + 57));
            assert!(outputs.is_empty(), "no usable answer changes nothing yet");
        }
        // Retried at most once a second while the old answer is valid.
        let (_, calls) = rechecks.tick([(1, &mut s)], &env(&policy, NOW + 57));
        assert!(calls.is_empty(), "asked this second already");
        let (_, calls) = rechecks.tick([(1, &mut s)], &env(&policy, NOW + 58));
        assert_eq!(calls.len(), 1);
        // Packets pass on the old answer until it expires...
        let out = s.on_client_bytes(&publish("lamps/lamp-07/state"), &env(&policy, NOW + 59));
        assert!(out.close.is_none() && !out.forward.is_empty());
        // ...not at its expiry, although a call is in flight: no grace.
        let out = s.on_client_bytes(&publish("lamps/lamp-07/state"), &env(&policy, NOW + 60));
        assert_eq!(out.close, Some(CloseReason::Unconfirmed));
        assert_eq!(
            out.close.as_ref().map(CloseReason::metric),
            Some("closed.unconfirmed")
        );
        assert!(out.forward.is_empty());
        assert!(lines(&out).contains("did not confirm"), "{}", lines(&out));
        // A late answer changes nothing for a closed connection.
        let late = rechecks.answered(
            "lamp-07",
            &listed("lamp-07", &["k7"]),
            [(1, &mut s)],
            &env(&policy, NOW + 61),
        );
        assert!(late.is_empty());
        // The tick closes an idle connection the same way.
        let mut idle = admit(&policy, "lamp-08", "k8", NOW, &listed("lamp-08", &["k8"]));
        assert!(idle
            .check_registry_deadline(&env(&policy, NOW + 59))
            .is_none());
        let out = idle
            .check_registry_deadline(&env(&policy, NOW + 60))
            .unwrap();
        assert_eq!(out.close, Some(CloseReason::Unconfirmed));
        // Deliveries from the broker are not passed either.
        let mut busy = admit(&policy, "lamp-09", "k9", NOW, &listed("lamp-09", &["k9"]));
        let out = busy.on_broker_bytes(&publish("lamps/lamp-09/set"), &env(&policy, NOW + 60));
        assert_eq!(out.close, Some(CloseReason::Unconfirmed));
        assert!(out.forward.is_empty());
    }

    #[test]
    fn a_fresher_answer_in_the_cache_is_taken_without_a_call() {
        let policy = policy();
        let answer = listed("lamp-07", &["k7"]);
        let mut a = admit(&policy, "lamp-07", "k7", NOW, &answer);
        let mut b = admit(&policy, "lamp-07", "k7", NOW, &answer);
        let mut rechecks = RegistryRechecks::new();
        // `a` is re-checked alone (b is another worker's... or not yet due in this tick).
        let (_, calls) = rechecks.tick([(1, &mut a)], &env(&policy, NOW + 57));
        assert_eq!(calls.len(), 1);
        rechecks.answered("lamp-07", &answer, [(1, &mut a)], &env(&policy, NOW + 57));
        // `b` finds the fresh entry in the cache.
        let (outputs, calls) = rechecks.tick([(2, &mut b)], &env(&policy, NOW + 58));
        assert!(calls.is_empty());
        assert_eq!(outputs.len(), 1);
        assert_eq!(b.registry_valid_until(), Some(NOW + 117));
        // And at a packet past the old expiry, before any tick, the cache is consulted too.
        let mut c = admit(&policy, "lamp-07", "k7", NOW + 1, &answer);
        c.registry.as_mut().unwrap().valid_until = NOW + 60;
        let out = c.on_client_bytes(&publish("lamps/lamp-07/state"), &env(&policy, NOW + 60));
        assert!(out.close.is_none() && !out.forward.is_empty(), "{out:?}");
    }

    #[test]
    fn shadow_mode_logs_a_revoked_key_once_and_keeps_the_connection() {
        let policy = policy_with("shadow");
        let mut s = admit(&policy, "lamp-07", "k7", NOW, &listed("lamp-07", &["k7"]));
        let mut rechecks = RegistryRechecks::new();
        rechecks.tick([(1, &mut s)], &env(&policy, NOW + 57));
        let outputs = rechecks.answered(
            "lamp-07",
            &listed("lamp-07", &[]),
            [(1, &mut s)],
            &env(&policy, NOW + 57),
        );
        let (_, out) = &outputs[0];
        assert!(out.close.is_none());
        assert_eq!(out.decisions[0].counters, vec!["shadow.denied"]);
        assert_eq!(s.registry_device(), None, "no longer re-checked");
        assert!(s
            .check_registry_deadline(&env(&policy, NOW + 600))
            .is_none());
        assert_eq!(policy.mode(), Mode::Shadow);
    }

    #[test]
    fn configured_keys_jwts_and_refused_connects_are_not_rechecked() {
        let policy = policy();
        let s = admit(&policy, "lamp-static", "ks", NOW, &status(0));
        assert_eq!(s.registry_device(), None);
        let mut refused = Session::new(&policy, None, 8);
        let env0 = env(&policy, NOW);
        let out = refused.on_client_bytes(&connect("lamp-07", "k7"), &env0);
        let id = out.asks[0].id;
        refused.on_backend_answer(id, &listed("lamp-07", &["other"]), &env0);
        assert_eq!(refused.registry_device(), None);
    }

    #[test]
    fn a_positive_ttl_too_short_to_recheck_is_refused() {
        for (ttl, ok) in [(0, false), (1, false), (2, true)] {
            let config = json!({"acl": {"rules": []},
                "device_keys": {"registry": {"cluster": "r", "authority": "r", "path": "/keys",
                                             "cache": {"positive_ttl_s": ttl}}}});
            let result = MqttAcl::from_json(config.to_string().as_bytes());
            match result {
                Ok(_) => assert!(ok, "{ttl}"),
                Err(e) => {
                    assert!(!ok, "{ttl}: {e}");
                    assert!(
                        e.contains("device_keys.registry.cache.positive_ttl_s"),
                        "{e}"
                    );
                }
            }
        }
        // With a short TTL the lead is at most half of it.
        let config = json!({"acl": {"rules": []},
            "device_keys": {"registry": {"cluster": "r", "authority": "r", "path": "/keys",
                                         "timeout_ms": 1000, "cache": {"positive_ttl_s": 4}}}});
        let policy = MqttAcl::from_json(config.to_string().as_bytes()).unwrap();
        let s = admit(&policy, "lamp-07", "k7", NOW, &listed("lamp-07", &["k7"]));
        assert_eq!(s.registry_valid_until(), Some(NOW + 4));
        assert_eq!(s.registry.as_ref().map(|r| r.recheck_from), Some(NOW + 2));
    }
}
