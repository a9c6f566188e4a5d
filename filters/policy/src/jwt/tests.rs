//! Tests of JWT verification: every algorithm, the RFC 8725 attack classes, claim checks,
//! key handling (JWKS, PEM, HMAC, rotation), claim mapping and configuration validation.
//!
//! Keys are generated with jwt-simple; RSA keys once per test binary (`OnceLock`).

use std::sync::OnceLock;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use jwt_simple::prelude::{
    ECDSAP256KeyPairLike, ECDSAP256PublicKeyLike, ECDSAP384KeyPairLike, ECDSAP384PublicKeyLike,
    ES256KeyPair, ES384KeyPair, Ed25519KeyPair, EdDSAKeyPairLike, HS256Key, HS384Key, HS512Key,
    JWTClaims, KeyMetadata, MACLike, PS256KeyPair, PS384KeyPair, PS512KeyPair, RS256KeyPair,
    RS384KeyPair, RS512KeyPair, RSAKeyPairLike,
};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use super::*;
use crate::decision::DenyReason;

const NOW: u64 = 1_700_000_000;
const ISS: &str = "https://idp.example.org/realms/fiware";
const AUD: &str = "orion";
/// 64 bytes: enough for HS256, HS384 and HS512.
const SECRET: &[u8; 64] = b"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

// ---------------------------------------------------------------------------------------------
// Keys

fn rsa_key() -> &'static RS256KeyPair {
    static KEY: OnceLock<RS256KeyPair> = OnceLock::new();
    KEY.get_or_init(|| RS256KeyPair::generate(2048).unwrap().with_key_id("rsa-1"))
}

/// A second RSA key, for rotation.
fn rsa_key_2() -> &'static RS256KeyPair {
    static KEY: OnceLock<RS256KeyPair> = OnceLock::new();
    KEY.get_or_init(|| RS256KeyPair::generate(2048).unwrap().with_key_id("rsa-2"))
}

fn ec256_key() -> &'static ES256KeyPair {
    static KEY: OnceLock<ES256KeyPair> = OnceLock::new();
    KEY.get_or_init(|| ES256KeyPair::generate().with_key_id("ec-256"))
}

fn ec384_key() -> &'static ES384KeyPair {
    static KEY: OnceLock<ES384KeyPair> = OnceLock::new();
    KEY.get_or_init(|| ES384KeyPair::generate().with_key_id("ec-384"))
}

fn ed_key() -> &'static Ed25519KeyPair {
    static KEY: OnceLock<Ed25519KeyPair> = OnceLock::new();
    KEY.get_or_init(|| Ed25519KeyPair::generate().with_key_id("ed-1"))
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn rsa_jwk(key: &RS256KeyPair, kid: &str) -> Value {
    let components = key.public_key().to_components();
    json!({"kty": "RSA", "kid": kid, "use": "sig", "n": b64(&components.n), "e": b64(&components.e)})
}

fn ec256_jwk(key: &ES256KeyPair, kid: &str) -> Value {
    let point = key.public_key().public_key().to_bytes_uncompressed();
    json!({"kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256",
           "x": b64(&point[1..33]), "y": b64(&point[33..65])})
}

fn ec384_jwk(key: &ES384KeyPair, kid: &str) -> Value {
    let point = key.public_key().public_key().to_bytes_uncompressed();
    json!({"kty": "EC", "crv": "P-384", "kid": kid,
           "x": b64(&point[1..49]), "y": b64(&point[49..97])})
}

fn ed_jwk(key: &Ed25519KeyPair, kid: &str) -> Value {
    json!({"kty": "OKP", "crv": "Ed25519", "kid": kid, "x": b64(&key.public_key().to_bytes())})
}

fn jwks(keys: &[Value]) -> Value {
    json!({ "keys": keys })
}

// ---------------------------------------------------------------------------------------------
// Tokens

/// A valid payload at `NOW`.
fn payload() -> Value {
    json!({"iss": ISS, "sub": "alice", "aud": AUD, "iat": NOW - 10, "exp": NOW + 300})
}

fn with(mut value: Value, name: &str, member: Value) -> Value {
    value[name] = member;
    value
}

fn without(mut value: Value, name: &str) -> Value {
    value.as_object_mut().unwrap().remove(name);
    value
}

/// jwt-simple claims holding exactly `payload`.
fn jc(payload: Value) -> JWTClaims<Map<String, Value>> {
    serde_json::from_value(payload).unwrap()
}

fn hmac_sha256(key: &[u8], message: &[u8]) -> Vec<u8> {
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let ipad: Vec<u8> = block.iter().map(|b| b ^ 0x36).collect();
    let opad: Vec<u8> = block.iter().map(|b| b ^ 0x5c).collect();
    let inner = Sha256::new()
        .chain_update(&ipad)
        .chain_update(message)
        .finalize();
    Sha256::new()
        .chain_update(&opad)
        .chain_update(inner)
        .finalize()
        .to_vec()
}

fn signing_input(header: &Value, payload: &Value) -> String {
    format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(payload.to_string().as_bytes())
    )
}

/// A token with any header, authenticated with HMAC-SHA256 over `secret`.
fn raw_hs256(secret: &[u8], header: Value, payload: Value) -> String {
    let input = signing_input(&header, &payload);
    let tag = hmac_sha256(secret, input.as_bytes());
    format!("{input}.{}", b64(&tag))
}

/// A token with any header, signed with Ed25519.
fn raw_eddsa(key: &Ed25519KeyPair, header: Value, payload: Value) -> String {
    let input = signing_input(&header, &payload);
    let signature = key.key_pair().as_ref().sk.sign(input.as_bytes(), None);
    format!("{input}.{}", b64(&*signature))
}

/// A token with any header and no valid signature (for checks made before any key is used).
fn unsigned(header: Value, payload: Value, signature: &str) -> String {
    format!("{}.{signature}", signing_input(&header, &payload))
}

// ---------------------------------------------------------------------------------------------
// Providers

/// The tests here are about other things than audiences: a configuration that names none
/// opts out explicitly (audience tests set `audiences` themselves).
fn config(mut cfg: Value) -> JwtProviderConfig {
    if cfg.get("audiences").is_none() && cfg.get("allow_any_audience").is_none() {
        cfg["allow_any_audience"] = json!(true);
    }
    serde_json::from_value(cfg).unwrap()
}

fn provider(cfg: Value) -> JwtProvider {
    JwtProvider::new(&config(cfg)).unwrap()
}

fn config_error(cfg: Value) -> ConfigError {
    JwtProvider::new(&config(cfg)).unwrap_err()
}

/// A provider with every algorithm: RSA, EC and Ed25519 keys in an inline JWKS, plus a
/// 64-byte HMAC secret.
fn all_algorithms_provider() -> JwtProvider {
    provider(json!({
        "issuer": ISS,
        "audiences": [AUD],
        "algorithms": ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
                       "ES256", "ES384", "EdDSA", "HS256", "HS384", "HS512"],
        "jwks": jwks(&[
            rsa_jwk(rsa_key(), "rsa-1"),
            ec256_jwk(ec256_key(), "ec-256"),
            ec384_jwk(ec384_key(), "ec-384"),
            ed_jwk(ed_key(), "ed-1"),
        ]),
        "hmac_secret": STANDARD.encode(SECRET),
    }))
}

fn rsa_provider() -> JwtProvider {
    provider(json!({
        "issuer": ISS, "audiences": [AUD], "algorithms": ["RS256"],
        "jwks": jwks(&[rsa_jwk(rsa_key(), "rsa-1")]),
    }))
}

fn ed_provider(extra: Value) -> JwtProvider {
    let mut cfg = json!({
        "issuer": ISS, "audiences": [AUD], "algorithms": ["EdDSA"],
        "jwks": jwks(&[ed_jwk(ed_key(), "ed-1")]),
    });
    for (name, value) in extra.as_object().unwrap() {
        cfg[name] = value.clone();
    }
    provider(cfg)
}

fn hs_provider(extra: Value) -> JwtProvider {
    let mut cfg = json!({
        "issuer": ISS, "audiences": [AUD], "algorithms": ["HS256"],
        "hmac_secret": STANDARD.encode(SECRET),
    });
    for (name, value) in extra.as_object().unwrap() {
        cfg[name] = value.clone();
    }
    provider(cfg)
}

fn ed_token(payload: Value) -> String {
    ed_key().sign(jc(payload)).unwrap()
}

fn hs_token(payload: Value) -> String {
    HS256Key::from_bytes(SECRET)
        .authenticate(jc(payload))
        .unwrap()
}

fn assert_ok(result: Result<VerifiedToken, TokenError>) -> VerifiedToken {
    match result {
        Ok(verified) => verified,
        Err(err) => panic!("expected a verified token, got {err:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Valid tokens

#[test]
fn valid_token_for_every_algorithm() {
    let p = all_algorithms_provider();
    let rsa_der = rsa_key().to_der().unwrap();
    let tokens = [
        ("RS256", rsa_key().sign(jc(payload())).unwrap()),
        (
            "RS384",
            RS384KeyPair::from_der(&rsa_der)
                .unwrap()
                .with_key_id("rsa-1")
                .sign(jc(payload()))
                .unwrap(),
        ),
        (
            "RS512",
            RS512KeyPair::from_der(&rsa_der)
                .unwrap()
                .with_key_id("rsa-1")
                .sign(jc(payload()))
                .unwrap(),
        ),
        (
            "PS256",
            PS256KeyPair::from_der(&rsa_der)
                .unwrap()
                .with_key_id("rsa-1")
                .sign(jc(payload()))
                .unwrap(),
        ),
        (
            "PS384",
            PS384KeyPair::from_der(&rsa_der)
                .unwrap()
                .with_key_id("rsa-1")
                .sign(jc(payload()))
                .unwrap(),
        ),
        (
            "PS512",
            PS512KeyPair::from_der(&rsa_der)
                .unwrap()
                .with_key_id("rsa-1")
                .sign(jc(payload()))
                .unwrap(),
        ),
        ("ES256", ec256_key().sign(jc(payload())).unwrap()),
        ("ES384", ec384_key().sign(jc(payload())).unwrap()),
        ("EdDSA", ed_token(payload())),
        ("HS256", hs_token(payload())),
        (
            "HS384",
            HS384Key::from_bytes(SECRET)
                .authenticate(jc(payload()))
                .unwrap(),
        ),
        (
            "HS512",
            HS512Key::from_bytes(SECRET)
                .authenticate(jc(payload()))
                .unwrap(),
        ),
    ];
    for (alg, token) in tokens {
        let verified = p
            .verify(&token, NOW)
            .unwrap_or_else(|e| panic!("{alg}: {e:?}"));
        assert_eq!(verified.identity.subject, "alice", "{alg}");
        assert_eq!(verified.identity.kind, crate::IdentityKind::Jwt);
        assert_eq!(verified.expires_at, Some(NOW + 300), "{alg}");
        assert_eq!(verified.identity.expires_at, Some(NOW + 300), "{alg}");
        assert_eq!(verified.issuer, ISS);
    }
}

#[test]
fn tampered_payload_fails_the_signature() {
    let p = all_algorithms_provider();
    for token in [
        rsa_key().sign(jc(payload())).unwrap(),
        ec256_key().sign(jc(payload())).unwrap(),
        ed_token(payload()),
        hs_token(payload()),
    ] {
        let parts: Vec<&str> = token.split('.').collect();
        let forged_payload = b64(with(payload(), "sub", json!("admin"))
            .to_string()
            .as_bytes());
        let forged = format!("{}.{}.{}", parts[0], forged_payload, parts[2]);
        assert_eq!(p.verify(&forged, NOW), Err(TokenError::InvalidSignature));
        // A signature from another token does not fit either.
        let other = hs_token(with(payload(), "sub", json!("bob")));
        let other_sig = other.rsplit('.').next().unwrap();
        let spliced = format!("{}.{}.{}", parts[0], parts[1], other_sig);
        if !token.ends_with(other_sig) {
            assert!(p.verify(&spliced, NOW).is_err());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// RFC 8725 attack classes

#[test]
fn alg_none_is_refused_in_every_spelling() {
    for provider in [rsa_provider(), hs_provider(json!({}))] {
        for alg in ["none", "None", "NONE", "nOnE"] {
            let token = unsigned(json!({"alg": alg, "typ": "JWT"}), payload(), "");
            assert_eq!(
                provider.verify(&token, NOW),
                Err(TokenError::AlgorithmNotAllowed),
                "{alg}"
            );
            let with_kid = unsigned(json!({"alg": alg, "kid": "rsa-1"}), payload(), "");
            assert_eq!(
                provider.verify(&with_kid, NOW),
                Err(TokenError::AlgorithmNotAllowed)
            );
        }
    }
}

#[test]
fn algorithm_not_in_the_allow_list_is_refused() {
    // The provider trusts the key, but only for EdDSA... a token claiming HS256 or RS256 is
    // refused before any key is used.
    let p = ed_provider(json!({}));
    let hs = hs_token(payload());
    assert_eq!(p.verify(&hs, NOW), Err(TokenError::AlgorithmNotAllowed));
    let unknown = unsigned(json!({"alg": "ES512"}), payload(), "c2ln");
    assert_eq!(
        p.verify(&unknown, NOW),
        Err(TokenError::AlgorithmNotAllowed)
    );
    let missing = unsigned(json!({"typ": "JWT"}), payload(), "c2ln");
    assert!(matches!(
        p.verify(&missing, NOW),
        Err(TokenError::Malformed(_))
    ));
}

#[test]
fn hs256_signed_with_the_rsa_public_key_is_refused() {
    let public = rsa_key().public_key();
    let pem = public.to_pem().unwrap();
    let der = public.to_der().unwrap();
    let n = public.to_components().n;
    let header = json!({"alg": "HS256", "typ": "JWT"});
    let header_kid = json!({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"});

    // RS256-only provider: HS256 is not allowed at all.
    let rs_only = rsa_provider();
    for secret in [pem.as_bytes(), &der, &n] {
        let forged = raw_hs256(secret, header.clone(), payload());
        assert_eq!(
            rs_only.verify(&forged, NOW),
            Err(TokenError::AlgorithmNotAllowed)
        );
    }

    // A provider allowing both: the RSA key is never an HMAC key.
    let both = provider(json!({
        "issuer": ISS, "audiences": [AUD], "algorithms": ["RS256", "HS256"],
        "jwks": jwks(&[rsa_jwk(rsa_key(), "rsa-1")]),
        "hmac_secret": STANDARD.encode(SECRET),
    }));
    for secret in [pem.as_bytes(), &der, &n] {
        let forged = raw_hs256(secret, header.clone(), payload());
        assert_eq!(both.verify(&forged, NOW), Err(TokenError::InvalidSignature));
        let forged_kid = raw_hs256(secret, header_kid.clone(), payload());
        assert_eq!(
            both.verify(&forged_kid, NOW),
            Err(TokenError::KeyTypeMismatch)
        );
    }
    // The genuine tokens of both kinds pass.
    assert_ok(both.verify(&rsa_key().sign(jc(payload())).unwrap(), NOW));
    assert_ok(both.verify(&hs_token(payload()), NOW));

    // HS256 cannot be allowed with only an RSA key to verify it.
    let err = config_error(json!({
        "issuer": ISS, "algorithms": ["RS256", "HS256"],
        "jwks": jwks(&[rsa_jwk(rsa_key(), "rsa-1")]),
    }));
    assert_eq!(err.field, "algorithms[1]");
}

#[test]
fn rs_token_to_an_es_only_provider_is_refused() {
    let es_only = provider(json!({
        "issuer": ISS, "audiences": [AUD], "algorithms": ["ES256"],
        "jwks": jwks(&[ec256_jwk(ec256_key(), "ec-256")]),
    }));
    let rs = rsa_key().sign(jc(payload())).unwrap();
    assert_eq!(
        es_only.verify(&rs, NOW),
        Err(TokenError::AlgorithmNotAllowed)
    );
    assert_ok(es_only.verify(&ec256_key().sign(jc(payload())).unwrap(), NOW));

    // Both allowed, but the token's kid names a key of the other type.
    let both = all_algorithms_provider();
    let mismatched = ES256KeyPair::generate()
        .with_key_id("rsa-1")
        .sign(jc(payload()))
        .unwrap();
    assert_eq!(
        both.verify(&mismatched, NOW),
        Err(TokenError::KeyTypeMismatch)
    );
}

#[test]
fn jwk_alg_restricts_the_key() {
    // An RSA JWK marked PS256 does not verify RS256 tokens.
    let mut jwk = rsa_jwk(rsa_key(), "rsa-1");
    jwk["alg"] = json!("PS256");
    let p = provider(json!({
        "issuer": ISS, "algorithms": ["RS256", "PS256"], "jwks": jwks(&[jwk]),
    }));
    let rs = rsa_key().sign(jc(payload())).unwrap();
    assert_eq!(p.verify(&rs, NOW), Err(TokenError::KeyTypeMismatch));
    let ps = PS256KeyPair::from_der(&rsa_key().to_der().unwrap())
        .unwrap()
        .with_key_id("rsa-1")
        .sign(jc(payload()))
        .unwrap();
    assert_ok(p.verify(&ps, NOW));
}

#[test]
fn unknown_kid_is_its_own_error() {
    let p = ed_provider(json!({}));
    for kid in [
        "ed-2",
        "../../../../../../dev/null",
        "/etc/passwd",
        "' OR '1'='1' --",
        "x\"; DROP TABLE keys; --",
        "",
        "ed-1 ",
        "ED-1",
    ] {
        let token = ed_key()
            .clone()
            .with_key_id(kid)
            .sign(jc(payload()))
            .unwrap();
        let err = p.verify(&token, NOW).unwrap_err();
        assert_eq!(err, TokenError::UnknownKid, "kid {kid:?}");
        assert!(err.is_unknown_kid());
        assert_eq!(err.error_code(), "invalid_token");
    }
    // A non-string kid is malformed.
    let token = raw_eddsa(ed_key(), json!({"alg": "EdDSA", "kid": 1}), payload());
    assert!(matches!(
        p.verify(&token, NOW),
        Err(TokenError::Malformed(_))
    ));
}

#[test]
fn kid_selects_exactly_one_key() {
    let other = Ed25519KeyPair::generate().with_key_id("ed-2");
    let p = provider(json!({
        "issuer": ISS, "algorithms": ["EdDSA"],
        "jwks": jwks(&[ed_jwk(ed_key(), "ed-1"), ed_jwk(&other, "ed-2")]),
    }));
    assert_ok(p.verify(&ed_token(payload()), NOW));
    assert_ok(p.verify(&other.sign(jc(payload())).unwrap(), NOW));
    // Signed by ed-2 but claiming ed-1: only ed-1 is tried.
    let lying = other
        .clone()
        .with_key_id("ed-1")
        .sign(jc(payload()))
        .unwrap();
    assert_eq!(p.verify(&lying, NOW), Err(TokenError::InvalidSignature));
    // Without a kid, every key for the algorithm is tried.
    let no_kid = raw_eddsa(&other, json!({"alg": "EdDSA", "typ": "JWT"}), payload());
    assert_ok(p.verify(&no_kid, NOW));
}

#[test]
fn keys_embedded_in_the_header_are_never_used() {
    let p = ed_provider(json!({}));
    let attacker = Ed25519KeyPair::generate();
    let attacker_jwk = ed_jwk(&attacker, "ed-1");

    // Signed with its own key, which it carries as a jwk: refused.
    for header in [
        json!({"alg": "EdDSA", "jwk": attacker_jwk}),
        json!({"alg": "EdDSA", "kid": "ed-1", "jwk": attacker_jwk}),
        json!({"alg": "EdDSA", "jku": "https://attacker.example/jwks.json"}),
        json!({"alg": "EdDSA", "x5u": "https://attacker.example/cert.pem"}),
        json!({"alg": "EdDSA", "x5c": ["MIIBszCCAVmgAwIBAgIU"]}),
    ] {
        let token = raw_eddsa(&attacker, header.clone(), payload());
        assert_eq!(
            p.verify(&token, NOW),
            Err(TokenError::EmbeddedKey),
            "{header}"
        );
    }
    // jwt-simple's own way of attaching a public key to the header.
    let mut signer = attacker.clone().with_key_id("ed-1");
    signer
        .attach_metadata(KeyMetadata::default().with_public_key(attacker_jwk.to_string()))
        .unwrap();
    let token = signer.sign(jc(payload())).unwrap();
    assert_eq!(p.verify(&token, NOW), Err(TokenError::EmbeddedKey));
    // And the attacker key is not trusted in any case.
    let plain = raw_eddsa(&attacker, json!({"alg": "EdDSA"}), payload());
    assert_eq!(p.verify(&plain, NOW), Err(TokenError::InvalidSignature));
}

#[test]
fn crit_header_is_refused() {
    let p = hs_provider(json!({}));
    for crit in [json!(["exp"]), json!([]), json!(["b64"]), json!("exp")] {
        let token = raw_hs256(
            SECRET,
            json!({"alg": "HS256", "crit": crit, "exp": 1}),
            payload(),
        );
        assert_eq!(p.verify(&token, NOW), Err(TokenError::CriticalHeader));
    }
    // The same token without crit verifies: it is the crit that is refused.
    let token = raw_hs256(SECRET, json!({"alg": "HS256", "typ": "JWT"}), payload());
    assert_ok(p.verify(&token, NOW));
}

#[test]
fn typ_must_be_jwt_when_present() {
    let p = hs_provider(json!({}));
    for typ in ["JWT", "jwt", "at+jwt", "application/at+jwt"] {
        let token = raw_hs256(SECRET, json!({"alg": "HS256", "typ": typ}), payload());
        assert_ok(p.verify(&token, NOW));
    }
    let token = raw_hs256(
        SECRET,
        json!({"alg": "HS256", "typ": "JOSE+JSON"}),
        payload(),
    );
    assert_eq!(p.verify(&token, NOW), Err(TokenError::NotJwt));
}

// ---------------------------------------------------------------------------------------------
// Claims

#[test]
fn exp_is_required_unless_configured_otherwise() {
    let token = ed_token(without(payload(), "exp"));
    assert_eq!(
        ed_provider(json!({})).verify(&token, NOW),
        Err(TokenError::MissingExpiry)
    );
    let lenient = ed_provider(json!({"require_exp": false}));
    let verified = assert_ok(lenient.verify(&token, NOW));
    assert_eq!(verified.expires_at, None);
    assert_eq!(verified.identity.expires_at, None);
}

#[test]
fn expiry_is_checked_with_the_clock_skew() {
    let p = ed_provider(json!({}));
    let token = ed_token(with(payload(), "exp", json!(NOW)));
    assert_ok(p.verify(&token, NOW));
    assert_ok(p.verify(&token, NOW + 60));
    assert_eq!(p.verify(&token, NOW + 61), Err(TokenError::Expired));
    assert_eq!(p.verify(&token, NOW + 100_000), Err(TokenError::Expired));

    // Not jwt-simple's 15 minutes: a token 10 minutes past exp is refused.
    assert_eq!(p.verify(&token, NOW + 600), Err(TokenError::Expired));

    let strict = ed_provider(json!({"clock_skew_secs": 0}));
    assert_ok(strict.verify(&token, NOW));
    assert_eq!(strict.verify(&token, NOW + 1), Err(TokenError::Expired));

    let generous = ed_provider(json!({"clock_skew_secs": 300}));
    assert_ok(generous.verify(&token, NOW + 300));
    assert_eq!(generous.verify(&token, NOW + 301), Err(TokenError::Expired));
}

#[test]
fn nbf_and_iat_in_the_future_are_refused_beyond_the_skew() {
    let p = ed_provider(json!({}));
    let nbf_within = ed_token(with(payload(), "nbf", json!(NOW + 60)));
    assert_ok(p.verify(&nbf_within, NOW));
    let nbf_beyond = ed_token(with(payload(), "nbf", json!(NOW + 61)));
    assert_eq!(p.verify(&nbf_beyond, NOW), Err(TokenError::NotYetValid));
    assert_ok(p.verify(&nbf_beyond, NOW + 1));

    let iat_within = ed_token(with(payload(), "iat", json!(NOW + 60)));
    assert_ok(p.verify(&iat_within, NOW));
    let iat_beyond = ed_token(with(payload(), "iat", json!(NOW + 61)));
    assert_eq!(p.verify(&iat_beyond, NOW), Err(TokenError::IssuedInFuture));
}

#[test]
fn issuer_must_match() {
    let p = ed_provider(json!({}));
    let other = ed_token(with(
        payload(),
        "iss",
        json!("https://evil.example.org/realms/fiware"),
    ));
    assert_eq!(p.verify(&other, NOW), Err(TokenError::IssuerMismatch));
    // Not a prefix or case-insensitive match either.
    let suffixed = ed_token(with(payload(), "iss", json!(format!("{ISS}/"))));
    assert_eq!(p.verify(&suffixed, NOW), Err(TokenError::IssuerMismatch));
    let missing = ed_token(without(payload(), "iss"));
    assert_eq!(p.verify(&missing, NOW), Err(TokenError::MissingIssuer));
    let numeric = raw_eddsa(
        ed_key(),
        json!({"alg": "EdDSA", "kid": "ed-1"}),
        with(payload(), "iss", json!(42)),
    );
    assert!(matches!(
        p.verify(&numeric, NOW),
        Err(TokenError::MalformedClaims(_))
    ));

    let verifier = JwtVerifier::from_providers(vec![p]).unwrap();
    assert_eq!(verifier.verify(&other, NOW), Err(TokenError::UnknownIssuer));
    assert_eq!(
        verifier.verify(&missing, NOW),
        Err(TokenError::MissingIssuer)
    );
    assert_ok(verifier.verify(&ed_token(payload()), NOW));
}

#[test]
fn audience_must_intersect_the_configured_audiences() {
    let p = ed_provider(json!({"audiences": ["orion", "quantumleap"]}));
    assert_ok(p.verify(&ed_token(payload()), NOW));
    let wrong = ed_token(with(payload(), "aud", json!("account")));
    assert_eq!(p.verify(&wrong, NOW), Err(TokenError::AudienceMismatch));
    let array_match = ed_token(with(payload(), "aud", json!(["account", "quantumleap"])));
    assert_ok(p.verify(&array_match, NOW));
    let array_miss = ed_token(with(payload(), "aud", json!(["account", "broker"])));
    assert_eq!(
        p.verify(&array_miss, NOW),
        Err(TokenError::AudienceMismatch)
    );
    let empty = ed_token(with(payload(), "aud", json!([])));
    assert_eq!(p.verify(&empty, NOW), Err(TokenError::AudienceMismatch));
    let missing = ed_token(without(payload(), "aud"));
    assert_eq!(p.verify(&missing, NOW), Err(TokenError::AudienceMismatch));
    let object = raw_eddsa(
        ed_key(),
        json!({"alg": "EdDSA", "kid": "ed-1"}),
        with(payload(), "aud", json!({"orion": true})),
    );
    assert!(matches!(
        p.verify(&object, NOW),
        Err(TokenError::MalformedClaims(_))
    ));

    // Only an explicit opt-out accepts any aud (or none), and it is worth a warning.
    let any = ed_provider(json!({"audiences": [], "allow_any_audience": true}));
    assert_ok(any.verify(&wrong, NOW));
    assert_ok(any.verify(&missing, NOW));
    assert!(any.warnings()[0].contains("allow_any_audience"));
    assert!(p.warnings().is_empty());
}

#[test]
fn audiences_are_required_unless_explicitly_waived() {
    let base = json!({"issuer": ISS, "algorithms": ["EdDSA"],
                      "jwks": jwks(&[ed_jwk(ed_key(), "ed-1")])});
    let refused = |cfg: Value| {
        let cfg: JwtProviderConfig = serde_json::from_value(cfg).unwrap();
        JwtProvider::new(&cfg).unwrap_err()
    };
    let err = refused(base.clone());
    assert_eq!(err.field, "audiences");
    assert!(err.message.contains("allow_any_audience"), "{err}");
    assert_eq!(
        refused(with(base.clone(), "audiences", json!([]))).field,
        "audiences"
    );
    let both = with(
        with(base, "audiences", json!([AUD])),
        "allow_any_audience",
        json!(true),
    );
    assert_eq!(refused(both).field, "allow_any_audience");
}

#[test]
fn registered_claims_must_have_their_types() {
    let p = hs_provider(json!({}));
    for (name, value) in [
        ("exp", json!("1700000300")),
        ("exp", json!(-1)),
        ("nbf", json!(true)),
        ("iat", json!(null)),
        ("sub", json!(7)),
        ("jti", json!({})),
        ("aud", json!(["orion", 1])),
    ] {
        let token = raw_hs256(
            SECRET,
            json!({"alg": "HS256"}),
            with(payload(), name, value),
        );
        assert!(
            matches!(p.verify(&token, NOW), Err(TokenError::MalformedClaims(_))),
            "{name}"
        );
    }
    // NumericDates are integers in 0..=MAX_NUMERIC_DATE: no fractions, no absurd values
    // that saturate into "never expires".
    for (name, value) in [
        ("exp", json!(NOW as f64 + 300.5)),
        ("exp", json!(1e300)),
        ("exp", json!(1e20)),
        ("exp", json!(u64::MAX)),
        ("exp", json!(MAX_NUMERIC_DATE + 1)),
        ("nbf", json!(1.5)),
        ("iat", json!(1e19)),
    ] {
        let token = raw_hs256(
            SECRET,
            json!({"alg": "HS256"}),
            with(payload(), name, value.clone()),
        );
        let err = p.verify(&token, NOW).unwrap_err();
        assert!(
            matches!(err, TokenError::MalformedClaims(_)),
            "{name}={value}: {err:?}"
        );
        assert_eq!(err.deny_reason().status(), 401, "{name}={value}");
    }
    let latest = raw_hs256(
        SECRET,
        json!({"alg": "HS256"}),
        with(payload(), "exp", json!(MAX_NUMERIC_DATE)),
    );
    assert_eq!(
        assert_ok(p.verify(&latest, NOW)).expires_at,
        Some(MAX_NUMERIC_DATE)
    );
    // "now" is clamped: a token is never valid at absurd times either.
    assert!(p.verify(&latest, u64::MAX).is_err());
    assert!(p.verify(&hs_token(payload()), u64::MAX).is_err());
}

/// A token from raw header and payload text, signed with HMAC-SHA256 (for JSON that
/// serde_json would not produce, such as duplicate members).
fn raw_text_hs256(header: &str, payload: &str) -> String {
    let input = format!("{}.{}", b64(header.as_bytes()), b64(payload.as_bytes()));
    let tag = hmac_sha256(SECRET, input.as_bytes());
    format!("{input}.{}", b64(&tag))
}

#[test]
fn duplicate_members_anywhere_are_refused() {
    let p = hs_provider(json!({"claims": {"roles": ["realm_access.roles"], "tenant": "tenant"}}));
    let claims = |extra: &str| {
        format!(
            r#"{{"iss":"{ISS}","sub":"alice","aud":"{AUD}","iat":{},"exp":{}{extra}}}"#,
            NOW - 10,
            NOW + 300
        )
    };
    let header = r#"{"alg":"HS256","typ":"JWT"}"#;
    // The fixture itself verifies: the refusals below are the duplicates' doing.
    let ok = raw_text_hs256(
        header,
        &claims(r#","tenant":"a","realm_access":{"roles":["x"]}"#),
    );
    assert_eq!(
        assert_ok(p.verify(&ok, NOW)).identity.tenant.as_deref(),
        Some("a")
    );
    for (what, token) in [
        (
            "registered",
            raw_text_hs256(header, &claims(r#","sub":"admin""#)),
        ),
        (
            "custom",
            raw_text_hs256(header, &claims(r#","tenant":"a","tenant":"b""#)),
        ),
        (
            "nested",
            raw_text_hs256(
                header,
                &claims(r#","realm_access":{"roles":["x"],"roles":["city-admin"]}"#),
            ),
        ),
        (
            "in an array",
            raw_text_hs256(header, &claims(r#","groups":[{"g":1,"g":2}]"#)),
        ),
        (
            "header",
            raw_text_hs256(r#"{"alg":"HS256","kid":"a","kid":"b"}"#, &claims("")),
        ),
    ] {
        let err = p.verify(&token, NOW).unwrap_err();
        assert!(
            matches!(err, TokenError::DuplicateMember(_)),
            "{what}: {err:?}"
        );
        assert_eq!(err.deny_reason().status(), 401, "{what}");
    }
}

#[test]
fn maximum_lifetime() {
    let p = ed_provider(json!({"max_lifetime_secs": 3600}));
    assert_ok(p.verify(&ed_token(payload()), NOW));
    let long = ed_token(with(payload(), "exp", json!(NOW + 7200)));
    assert_eq!(p.verify(&long, NOW), Err(TokenError::LifetimeTooLong));
    // Without iat the remaining lifetime counts.
    let no_iat = ed_token(with(without(payload(), "iat"), "exp", json!(NOW + 3600)));
    assert_ok(p.verify(&no_iat, NOW));
    let no_iat_long = ed_token(with(without(payload(), "iat"), "exp", json!(NOW + 3601)));
    assert_eq!(
        p.verify(&no_iat_long, NOW),
        Err(TokenError::LifetimeTooLong)
    );
    // A maximum lifetime needs an exp even when exp is otherwise optional.
    let lenient = ed_provider(json!({"max_lifetime_secs": 3600, "require_exp": false}));
    let no_exp = ed_token(without(payload(), "exp"));
    assert_eq!(lenient.verify(&no_exp, NOW), Err(TokenError::MissingExpiry));
}

// ---------------------------------------------------------------------------------------------
// Size and form

#[test]
fn oversized_tokens_are_refused() {
    let big = with(payload(), "padding", json!("x".repeat(8 * 1024)));
    let token = ed_token(big);
    assert!(token.len() > DEFAULT_MAX_TOKEN_BYTES);
    let p = ed_provider(json!({}));
    let err = p.verify(&token, NOW).unwrap_err();
    assert_eq!(err, TokenError::TooLarge { limit: 8192 });
    assert_eq!(err.error_code(), "invalid_request");
    assert_eq!(err.deny_reason().status(), 400);

    let larger = ed_provider(json!({"max_token_bytes": 16384}));
    assert_ok(larger.verify(&token, NOW));

    let verifier = JwtVerifier::from_providers(vec![p]).unwrap();
    assert_eq!(
        verifier.verify(&token, NOW),
        Err(TokenError::TooLarge { limit: 8192 })
    );
    let huge = "a".repeat(MAX_MAX_TOKEN_BYTES + 1);
    assert!(matches!(
        peek_issuer(&huge),
        Err(TokenError::TooLarge { .. })
    ));

    // Exactly at the limit is fine.
    let small = ed_provider(json!({"max_token_bytes": 1024}));
    let base = ed_token(with(payload(), "padding", json!("")));
    let pad = 1024 - base.len();
    // 3 bytes of JSON become 4 base64 characters.
    let exact = ed_token(with(
        payload(),
        "padding",
        json!("x".repeat(pad.saturating_sub(4) / 4 * 3)),
    ));
    assert!(exact.len() <= 1024 && exact.len() > 1000, "{}", exact.len());
    assert_ok(small.verify(&exact, NOW));
}

#[test]
fn malformed_tokens_are_invalid_requests() {
    let p = hs_provider(json!({}));
    let good = hs_token(payload());
    let parts: Vec<&str> = good.split('.').collect();
    let not_json = b64(b"not json");
    let array = b64(b"[1,2]");
    let cases = vec![
        String::new(),
        "abc".to_string(),
        "a.b".to_string(),
        format!("{good}.extra"),
        format!("..{}", parts[2]),
        format!("@@@.{}.{}", parts[1], parts[2]),
        format!("{}.{}!.{}", parts[0], parts[1], parts[2]),
        format!("{}.{}.{}=", parts[0], parts[1], parts[2]),
        format!("{}=.{}.{}", parts[0], parts[1], parts[2]),
        format!("{not_json}.{}.{}", parts[1], parts[2]),
        format!("{}.{not_json}.{}", parts[0], parts[2]),
        format!("{array}.{}.{}", parts[1], parts[2]),
        format!("{}.{array}.{}", parts[0], parts[2]),
        format!(" {good}"),
        format!("Bearer {good}"),
    ];
    for token in cases {
        let err = p.verify(&token, NOW).unwrap_err();
        assert!(
            matches!(err, TokenError::Malformed(_)),
            "{token:?}: {err:?}"
        );
        assert_eq!(err.error_code(), "invalid_request");
        assert_eq!(err.description(), "malformed token");
        assert!(matches!(err.deny_reason(), DenyReason::BadRequest(_)));
    }
}

#[test]
fn peek_issuer_reads_iss_without_verifying() {
    assert_eq!(peek_issuer(&hs_token(payload())).unwrap(), ISS);
    // Unverified: any signature will do for routing.
    let forged = unsigned(json!({"alg": "RS256"}), payload(), "AAAA");
    assert_eq!(peek_issuer(&forged).unwrap(), ISS);
    assert_eq!(
        peek_issuer(&hs_token(without(payload(), "iss"))),
        Err(TokenError::MissingIssuer)
    );
    assert_eq!(
        peek_issuer(&hs_token(with(payload(), "iss", json!("")))),
        Err(TokenError::MissingIssuer)
    );
    assert!(matches!(peek_issuer("a.b"), Err(TokenError::Malformed(_))));
    let numeric = unsigned(
        json!({"alg": "HS256"}),
        with(payload(), "iss", json!(1)),
        "AAAA",
    );
    assert!(matches!(
        peek_issuer(&numeric),
        Err(TokenError::MalformedClaims(_))
    ));
}

// ---------------------------------------------------------------------------------------------
// Keys: rotation, remote sets, JWKS, PEM, HMAC

fn remote_provider() -> JwtProvider {
    provider(json!({
        "issuer": ISS, "audiences": [AUD], "algorithms": ["RS256"],
        "remote": {"cluster": "keycloak", "authority": "kc.example.org",
                   "path": "/realms/fiware/protocol/openid-connect/certs"},
    }))
}

#[test]
fn key_rotation_with_a_remote_jwks() {
    let mut p = remote_provider();
    assert!(!p.has_keys());
    assert_eq!(p.remote().unwrap().refresh_secs, DEFAULT_REFRESH_SECS);
    assert!(!p.remote().unwrap().discovery);

    let old_token = rsa_key().sign(jc(payload())).unwrap();
    let new_token = rsa_key_2().sign(jc(payload())).unwrap();

    // Nothing fetched yet: 503, not 401.
    let err = p.verify(&old_token, NOW).unwrap_err();
    assert_eq!(err, TokenError::KeysUnavailable);
    assert_eq!(err.deny_reason().status(), 503);

    let first = jwks(&[rsa_jwk(rsa_key(), "rsa-1")]).to_string();
    p.set_remote_keys(KeySet::from_jwks_json(&first).unwrap(), NOW)
        .unwrap();
    assert_ok(p.verify(&old_token, NOW));
    assert_eq!(p.verify(&new_token, NOW), Err(TokenError::UnknownKid));

    // Rotation overlap: both keys published.
    let both = jwks(&[rsa_jwk(rsa_key(), "rsa-1"), rsa_jwk(rsa_key_2(), "rsa-2")]).to_string();
    p.set_remote_keys(KeySet::from_jwks_json(&both).unwrap(), NOW)
        .unwrap();
    assert_ok(p.verify(&old_token, NOW));
    assert_ok(p.verify(&new_token, NOW));

    // The old key is withdrawn.
    let second = jwks(&[rsa_jwk(rsa_key_2(), "rsa-2")]).to_string();
    p.set_remote_keys(KeySet::from_jwks_json(&second).unwrap(), NOW)
        .unwrap();
    assert_ok(p.verify(&new_token, NOW));
    let err = p.verify(&old_token, NOW).unwrap_err();
    assert!(err.is_unknown_kid());

    // Through the verifier, after a lookup by issuer.
    let mut verifier = JwtVerifier::from_providers(vec![remote_provider()]).unwrap();
    assert_eq!(
        verifier.verify(&new_token, NOW),
        Err(TokenError::KeysUnavailable)
    );
    verifier
        .provider_mut(ISS)
        .unwrap()
        .set_remote_keys(KeySet::from_jwks_json(&second).unwrap(), NOW)
        .unwrap();
    assert_ok(verifier.verify(&new_token, NOW));
}

#[test]
fn an_ambiguous_or_oversized_jwks_is_refused_whole() {
    // Two keys under one kid: which one a token means is a guess. Refused, whatever the
    // keys are (same kty or not), and a provider keeps its last good set.
    let dup = jwks(&[rsa_jwk(rsa_key(), "k"), rsa_jwk(rsa_key_2(), "k")]).to_string();
    assert_eq!(
        KeySet::from_jwks_json(&dup).unwrap_err(),
        KeyError::DuplicateKid { kid: "k".into() }
    );
    let mixed = jwks(&[rsa_jwk(rsa_key(), "k"), ed_jwk(ed_key(), "k")]).to_string();
    assert!(matches!(
        KeySet::from_jwks_json(&mixed),
        Err(KeyError::DuplicateKid { .. })
    ));
    // Also inline, at configure time.
    let err = config_error(json!({"issuer": ISS, "algorithms": ["RS256"],
        "jwks": jwks(&[rsa_jwk(rsa_key(), "k"), rsa_jwk(rsa_key_2(), "k")])}));
    assert_eq!(err.field, "jwks");
    // A repeated member inside a key (two moduli) is no better.
    let one = rsa_jwk(rsa_key(), "k").to_string();
    let twice_n = one.replacen("\"n\":", "\"n\":\"AQAB\",\"n\":", 1);
    assert!(matches!(
        KeySet::from_jwks_json(&format!("{{\"keys\":[{twice_n}]}}")),
        Err(KeyError::InvalidJson(_))
    ));
    // Real sets are a few KiB: 64 KiB is the limit.
    assert_eq!(MAX_JWKS_BYTES, 64 * 1024);
    let padded = format!(
        "{{\"keys\":[{one}],\"pad\":\"{}\"}}",
        "x".repeat(MAX_JWKS_BYTES)
    );
    assert_eq!(
        KeySet::from_jwks_json(&padded).unwrap_err(),
        KeyError::TooLarge {
            limit: MAX_JWKS_BYTES
        }
    );
}

#[test]
fn fetched_keys_expire_after_max_stale_secs() {
    let mut p = provider(json!({
        "issuer": ISS, "audiences": [AUD], "algorithms": ["RS256"],
        "remote": {"cluster": "idp", "authority": "idp", "path": "/certs",
                   "refresh_secs": 600, "max_stale_secs": 3600},
    }));
    let token = rsa_key().sign(jc(payload())).unwrap();
    let fetched_at = NOW - 3600;
    p.set_remote_keys(
        KeySet::from_jwks_json(&jwks(&[rsa_jwk(rsa_key(), "rsa-1")]).to_string()).unwrap(),
        fetched_at,
    )
    .unwrap();
    assert_ok(p.verify(&token, NOW));
    assert!(!p.remote_keys_stale(NOW));
    assert!(p.remote_keys_stale(NOW + 1));
    let err = p.verify(&token, NOW + 1).unwrap_err();
    assert_eq!(err, TokenError::KeysStale);
    assert_eq!(err.deny_reason().status(), 503);
    // Fetching the same set again renews it.
    p.confirm_remote_keys(NOW + 1);
    assert_ok(p.verify(&token, NOW + 1));

    // Static keys never go stale; the default is 4 h, or two refresh periods if longer.
    let remote = |refresh: u64| -> RemoteJwksConfig {
        serde_json::from_value(json!({"cluster": "c", "authority": "a", "path": "/p",
                                      "refresh_secs": refresh}))
        .unwrap()
    };
    assert_eq!(
        remote(600).effective_max_stale_secs(),
        DEFAULT_MAX_STALE_SECS
    );
    assert_eq!(remote(86_400).effective_max_stale_secs(), 2 * 86_400);
    for bad in [599, MAX_MAX_STALE_SECS + 1] {
        let err = config_error(
            json!({"issuer": ISS, "audiences": [AUD], "algorithms": ["RS256"],
            "remote": {"cluster": "c", "authority": "a", "path": "/p", "refresh_secs": 600,
                       "max_stale_secs": bad}}),
        );
        assert_eq!(err.field, "remote.max_stale_secs", "{bad}");
    }
}

#[test]
fn fetched_jwks_never_supplies_hmac_keys() {
    let mut p = remote_provider();
    let oct = json!({"kty": "oct", "kid": "hs", "k": b64(SECRET)});
    let mixed = jwks(&[oct.clone(), rsa_jwk(rsa_key(), "rsa-1")]).to_string();
    p.set_remote_keys(KeySet::from_jwks_json(&mixed).unwrap(), NOW)
        .unwrap();
    assert!(!p.remote_keys().has_symmetric());
    assert_eq!(p.remote_keys().len(), 1);
    assert!(p.remote_keys().skipped().iter().any(|s| s.contains("oct")));

    // A set of only HMAC keys (or none for the allowed algorithms) is refused, and the
    // previous keys stay.
    let only_oct = KeySet::from_jwks_json(&jwks(&[oct]).to_string()).unwrap();
    assert!(matches!(
        p.set_remote_keys(only_oct, NOW),
        Err(KeyError::NoUsableKeys { .. })
    ));
    let only_ec = KeySet::from_jwks_json(&jwks(&[ec256_jwk(ec256_key(), "ec")]).to_string());
    assert!(p.set_remote_keys(only_ec.unwrap(), NOW).is_err());
    assert_ok(p.verify(&rsa_key().sign(jc(payload())).unwrap(), NOW));
}

#[test]
fn static_and_remote_keys_combine() {
    let mut p = provider(json!({
        "issuer": ISS, "algorithms": ["RS256", "EdDSA"],
        "jwks": jwks(&[ed_jwk(ed_key(), "ed-1")]),
        "remote": {"cluster": "idp", "authority": "idp", "path": "/certs", "refresh_secs": 60},
    }));
    // Static keys work before any fetch; an unknown kid asks for a refresh.
    assert_ok(p.verify(&ed_token(payload()), NOW));
    let rs = rsa_key().sign(jc(payload())).unwrap();
    assert_eq!(p.verify(&rs, NOW), Err(TokenError::UnknownKid));
    p.set_remote_keys(
        KeySet::from_jwks_json(&jwks(&[rsa_jwk(rsa_key(), "rsa-1")]).to_string()).unwrap(),
        NOW,
    )
    .unwrap();
    assert_ok(p.verify(&rs, NOW));
    assert_ok(p.verify(&ed_token(payload()), NOW));
}

#[test]
fn jwks_entries_that_cannot_be_used_are_skipped() {
    let good = ed_jwk(ed_key(), "ed-1");
    let mut enc = rsa_jwk(rsa_key(), "enc");
    enc["use"] = json!("enc");
    let mut oaep = rsa_jwk(rsa_key(), "oaep");
    oaep["alg"] = json!("RSA-OAEP");
    let mut rsa_as_es = rsa_jwk(rsa_key(), "rsa-es");
    rsa_as_es["alg"] = json!("ES256");
    let mut wrap_only = rsa_jwk(rsa_key(), "wrap");
    wrap_only["key_ops"] = json!(["wrapKey"]);
    let mut with_private = ec256_jwk(ec256_key(), "priv");
    with_private["d"] = json!(b64(&[7u8; 32]));
    let mut weak_rsa = rsa_jwk(rsa_key(), "weak");
    let mut n = vec![0xC1u8; 128];
    n[127] = 0x01;
    weak_rsa["n"] = json!(b64(&n));
    let mut bad_point = ec256_jwk(ec256_key(), "bad-point");
    bad_point["y"] = json!(b64(&[1u8; 32]));
    let mut short_x = ec256_jwk(ec256_key(), "short-x");
    short_x["x"] = json!(b64(&[1u8; 31]));
    let entries = vec![
        enc,
        oaep,
        rsa_as_es,
        wrap_only,
        with_private,
        weak_rsa,
        bad_point,
        short_x,
        json!({"kty": "foo", "kid": "foo"}),
        json!({"kty": "EC", "crv": "P-521", "x": "AA", "y": "AA"}),
        json!({"kty": "OKP", "crv": "X25519", "x": b64(&[9u8; 32])}),
        json!({"kty": "oct", "k": b64(&[1u8; 31])}),
        json!({"kty": "oct", "alg": "HS512", "k": b64(&[1u8; 48])}),
        json!({"kty": "RSA", "n": "!!!", "e": "AQAB"}),
        json!({"kty": "RSA", "n": "", "e": ""}),
        json!({"kid": "no-kty"}),
        json!("not an object"),
        good,
    ];
    let count = entries.len();
    let set = KeySet::from_jwks_json(&jwks(&entries).to_string()).unwrap();
    assert_eq!(set.len(), 1);
    assert_eq!(set.keys()[0].kid(), Some("ed-1"));
    assert_eq!(set.keys()[0].algorithms(), &[Algorithm::EdDsa]);
    assert_eq!(set.skipped().len(), count - 1, "{:#?}", set.skipped());
    let skipped = set.skipped().join("\n");
    for reason in [
        "use \"enc\"",
        "unsupported alg \"RSA-OAEP\"",
        "alg ES256 does not fit",
        "key_ops",
        "private key material",
        "invalid RSA key",
        "invalid P-256 point",
        "31 bytes, expected 32",
        "unsupported kty",
        "unsupported curve \"P-521\"",
        "unsupported curve \"X25519\"",
        "HMAC key is 31 bytes",
        "HMAC key is 48 bytes, at least 64",
        "not base64url",
        "`kty` is missing",
        "not a JSON object",
    ] {
        assert!(skipped.contains(reason), "missing {reason:?} in\n{skipped}");
    }

    // Nothing usable left: an error listing why.
    let unusable = jwks(&entries[..count - 1]).to_string();
    match KeySet::from_jwks_json(&unusable) {
        Err(err @ KeyError::NoUsableKeys { .. }) => {
            assert!(err.to_string().contains("use \"enc\""), "{err}")
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        KeySet::from_jwks_json(r#"{"keys": []}"#),
        Err(KeyError::NoUsableKeys { .. })
    ));
    assert!(matches!(
        KeySet::from_jwks_json("not json"),
        Err(KeyError::InvalidJson(_))
    ));
    assert!(matches!(
        KeySet::from_jwks_json(r#"{"keys": {}}"#),
        Err(KeyError::InvalidJson(_))
    ));
    assert!(matches!(
        KeySet::from_jwks_json("[]"),
        Err(KeyError::InvalidJson(_))
    ));
    let many: Vec<Value> = (0..=MAX_JWKS_KEYS).map(|_| ed_jwk(ed_key(), "k")).collect();
    assert!(matches!(
        KeySet::from_jwks_json(&jwks(&many).to_string()),
        Err(KeyError::TooManyKeys { .. })
    ));
    let huge = format!(
        "{{\"keys\": [], \"pad\": \"{}\"}}",
        "x".repeat(MAX_JWKS_BYTES)
    );
    assert!(matches!(
        KeySet::from_jwks_json(&huge),
        Err(KeyError::TooLarge { .. })
    ));
}

#[test]
fn jwks_forms_accepted() {
    // A single JWK, padded base64url, and extra members (x5c, x5t) as Keycloak publishes.
    let mut jwk = rsa_jwk(rsa_key(), "rsa-1");
    let n = jwk["n"].as_str().unwrap().to_string();
    let padding = "=".repeat((4 - n.len() % 4) % 4);
    jwk["n"] = json!(format!("{n}{padding}"));
    jwk["x5c"] = json!(["MIIC..."]);
    jwk["x5t"] = json!("abc");
    jwk["alg"] = json!("RS256");
    let set = KeySet::from_jwks_json(&jwk.to_string()).unwrap();
    assert_eq!(set.len(), 1);
    assert_eq!(set.keys()[0].kind(), KeyKind::Rsa);
    assert_eq!(set.keys()[0].algorithms(), &[Algorithm::Rs256]);

    // An RSA key without alg verifies every RSA algorithm; an oct key the HS algorithms its
    // length allows.
    let set = KeySet::from_jwks_json(
        &jwks(&[
            rsa_jwk(rsa_key(), "rsa-1"),
            json!({"kty": "oct", "kid": "hs", "k": b64(&SECRET[..48])}),
        ])
        .to_string(),
    )
    .unwrap();
    assert_eq!(set.keys()[0].algorithms(), &Algorithm::RSA);
    assert_eq!(
        set.keys()[1].algorithms(),
        &[Algorithm::Hs256, Algorithm::Hs384]
    );
    // Debug output never shows key material.
    let debug = format!("{set:?}");
    assert!(!debug.contains(&b64(&SECRET[..48])), "{debug}");

    // An inline JWKS given as a JSON string works like an object.
    let p = provider(json!({
        "issuer": ISS, "algorithms": ["HS384"],
        "jwks": jwks(&[json!({"kty": "oct", "kid": "hs", "k": b64(&SECRET[..48])})]).to_string(),
    }));
    let token = HS384Key::from_bytes(&SECRET[..48])
        .with_key_id("hs")
        .authenticate(jc(payload()))
        .unwrap();
    assert_ok(p.verify(&token, NOW));
}

#[test]
fn pem_public_keys() {
    let rsa_pem = rsa_key().public_key().to_pem().unwrap();
    let ec_pem = ec256_key().public_key().to_pem().unwrap();
    let ec384_pem = ec384_key().public_key().to_pem().unwrap();
    let ed_pem = ed_key().public_key().to_pem();
    let all = format!("{rsa_pem}\n{ec_pem}\n{ec384_pem}\n{ed_pem}");
    let set = KeySet::from_pem(&all).unwrap();
    let kinds: Vec<KeyKind> = set.keys().iter().map(VerificationKey::kind).collect();
    assert_eq!(
        kinds,
        [
            KeyKind::Rsa,
            KeyKind::EcP256,
            KeyKind::EcP384,
            KeyKind::Ed25519
        ]
    );
    assert!(set.keys().iter().all(|k| k.kid().is_none()));

    let p = provider(json!({
        "issuer": ISS, "algorithms": ["RS256", "ES256", "ES384", "EdDSA"], "pem": all,
    }));
    // The tokens carry kids; PEM keys have none and are tried for any kid.
    assert_ok(p.verify(&rsa_key().sign(jc(payload())).unwrap(), NOW));
    assert_ok(p.verify(&ec256_key().sign(jc(payload())).unwrap(), NOW));
    assert_ok(p.verify(&ec384_key().sign(jc(payload())).unwrap(), NOW));
    assert_ok(p.verify(&ed_token(payload()), NOW));
    // A token from an unknown key with a kid: no key has that kid, the kid-less keys fail,
    // so the kid is reported unknown.
    let stranger = Ed25519KeyPair::generate().with_key_id("x");
    assert_eq!(
        p.verify(&stranger.sign(jc(payload())).unwrap(), NOW),
        Err(TokenError::UnknownKid)
    );
    let anonymous = raw_eddsa(&stranger, json!({"alg": "EdDSA"}), payload());
    assert_eq!(p.verify(&anonymous, NOW), Err(TokenError::InvalidSignature));

    let private = ec256_key().to_pem().unwrap();
    let err = KeySet::from_pem(&private).unwrap_err();
    assert!(err.to_string().contains("private key"), "{err}");
    let cert = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
    assert!(KeySet::from_pem(cert)
        .unwrap_err()
        .to_string()
        .contains("certificate"));
    let garbage = "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n";
    assert!(matches!(
        KeySet::from_pem(garbage),
        Err(KeyError::InvalidPem(_))
    ));
    assert!(matches!(
        KeySet::from_pem("hello"),
        Err(KeyError::InvalidPem(_))
    ));
    let unterminated = "-----BEGIN PUBLIC KEY-----\nAAAA\n";
    assert!(matches!(
        KeySet::from_pem(unterminated),
        Err(KeyError::InvalidPem(_))
    ));
}

#[test]
fn hmac_secret_key_sets() {
    assert_eq!(
        KeySet::from_hmac_secret(&SECRET[..31]).unwrap_err(),
        KeyError::WeakHmacSecret { len: 31, min: 32 }
    );
    let set = KeySet::from_hmac_secret(&SECRET[..32]).unwrap();
    assert_eq!(set.keys()[0].algorithms(), &[Algorithm::Hs256]);
    assert!(set.has_symmetric());
    let set = KeySet::from_hmac_secret(SECRET).unwrap();
    assert_eq!(set.keys()[0].algorithms(), &Algorithm::HMAC);
    assert!(!format!("{set:?}").contains("0123456789abcdef"));

    // URL-safe base64 without padding is accepted too.
    let p = hs_provider(json!({"hmac_secret": URL_SAFE_NO_PAD.encode(SECRET)}));
    assert_ok(p.verify(&hs_token(payload()), NOW));
    // A token made with another secret fails.
    let other = HS256Key::from_bytes(&[9u8; 32])
        .authenticate(jc(payload()))
        .unwrap();
    assert_eq!(p.verify(&other, NOW), Err(TokenError::InvalidSignature));
}

// ---------------------------------------------------------------------------------------------
// Discovery

#[test]
fn oidc_discovery_documents() {
    let doc = json!({
        "issuer": ISS,
        "jwks_uri": "https://kc.example.org:8443/realms/fiware/protocol/openid-connect/certs?v=1",
        "authorization_endpoint": "https://kc.example.org/auth",
    })
    .to_string();
    assert_eq!(
        jwks_uri_from_discovery(&doc).unwrap(),
        "https://kc.example.org:8443/realms/fiware/protocol/openid-connect/certs?v=1"
    );
    assert_eq!(issuer_from_discovery(&doc).unwrap(), ISS);
    let discovery = remote_provider().check_discovery(&doc).unwrap();
    assert_eq!(
        discovery.jwks_location().unwrap(),
        UrlParts {
            scheme: "https".into(),
            authority: "kc.example.org:8443".into(),
            path: "/realms/fiware/protocol/openid-connect/certs?v=1".into(),
        }
    );
    assert_eq!(
        split_url("http://keycloak:8080/certs").unwrap().authority,
        "keycloak:8080"
    );
    assert_eq!(
        split_url("https://idp.example.org/certs")
            .unwrap()
            .authority,
        "idp.example.org"
    );

    let other_issuer = json!({"issuer": "https://evil.example.org", "jwks_uri": "https://e/c"});
    assert!(matches!(
        remote_provider().check_discovery(&other_issuer.to_string()),
        Err(KeyError::DiscoveryIssuerMismatch { .. })
    ));
    for bad in [
        json!({"issuer": ISS}),
        json!({"jwks_uri": "https://kc/certs"}),
        json!({"issuer": ISS, "jwks_uri": 5}),
        json!({"issuer": "", "jwks_uri": "https://kc/certs"}),
        json!({"issuer": ISS, "jwks_uri": "ftp://kc/certs"}),
        json!({"issuer": ISS, "jwks_uri": "https://user:pw@kc/certs"}),
        json!({"issuer": ISS, "jwks_uri": "/relative/certs"}),
        json!([ISS]),
    ] {
        assert!(OidcDiscovery::parse(&bad.to_string()).is_err(), "{bad}");
    }
    assert!(matches!(
        OidcDiscovery::parse("{"),
        Err(KeyError::InvalidJson(_))
    ));
}

// ---------------------------------------------------------------------------------------------
// Claim mapping

fn keycloak_payload() -> Value {
    json!({
        "exp": NOW + 300, "iat": NOW - 5, "auth_time": NOW - 5,
        "jti": "0d4c2e9a-5d6e-4f4c-8a43-0c3bb5f2b9a1",
        "iss": ISS,
        "aud": ["orion", "account"],
        "sub": "f:0b5e2d1c:alice",
        "typ": "Bearer",
        "azp": "dashboard",
        "session_state": "a3f1",
        "acr": "1",
        "realm_access": {"roles": ["offline_access", "uma_authorization", "city-admin"]},
        "resource_access": {
            "orion": {"roles": ["entity-writer", "city-admin"]},
            "account": {"roles": ["manage-account"]},
            "my.app": {"roles": ["dotted"]}
        },
        "scope": "openid profile email",
        "email_verified": true,
        "name": "Alice Liddell",
        "preferred_username": "alice",
        "given_name": "Alice",
        "family_name": "Liddell",
        "email": "alice@example.org",
        "groups": ["/city-of-a", "/city-of-a/operators"],
        "fiware_service": "smartcity"
    })
}

#[test]
fn keycloak_token_maps_onto_an_identity() {
    let p = provider(json!({
        "issuer": ISS, "audiences": ["orion"], "algorithms": ["RS256"],
        "jwks": jwks(&[rsa_jwk(rsa_key(), "rsa-1")]),
        "claims": {
            "roles": ["realm_access.roles", "resource_access.orion.roles"],
            "groups": ["groups"],
            "tenant": "fiware_service"
        }
    }));
    let token = rsa_key().sign(jc(keycloak_payload())).unwrap();
    let verified = assert_ok(p.verify(&token, NOW));
    let id = verified.identity;
    assert_eq!(id.subject, "f:0b5e2d1c:alice");
    assert_eq!(id.display_name.as_deref(), Some("Alice Liddell"));
    assert_eq!(
        id.roles,
        [
            "offline_access",
            "uma_authorization",
            "city-admin",
            "entity-writer"
        ]
    );
    assert!(
        !id.has_role("manage-account"),
        "another client's roles are not taken"
    );
    assert_eq!(id.groups, ["/city-of-a", "/city-of-a/operators"]);
    assert_eq!(id.tenant.as_deref(), Some("smartcity"));
    assert_eq!(id.expires_at, Some(NOW + 300));
    assert_eq!(verified.expires_at, Some(NOW + 300));

    // Another mapping: username as subject, scopes as roles, a quoted client id with a dot.
    let p = provider(json!({
        "issuer": ISS, "algorithms": ["RS256"],
        "jwks": jwks(&[rsa_jwk(rsa_key(), "rsa-1")]),
        "claims": {
            "subject": "preferred_username",
            "display_name": ["nickname", "email"],
            "roles": ["scope", "resource_access.\"my.app\".roles"],
        }
    }));
    let id = assert_ok(p.verify(&token, NOW)).identity;
    assert_eq!(id.subject, "alice");
    assert_eq!(id.display_name.as_deref(), Some("alice@example.org"));
    assert_eq!(id.roles, ["openid", "profile", "email", "dotted"]);
    assert!(id.groups.is_empty());
    assert_eq!(id.tenant, None);
}

#[test]
fn default_mapping_takes_sub_and_name_only() {
    let id = assert_ok(hs_provider(json!({})).verify(&hs_token(keycloak_payload()), NOW)).identity;
    assert_eq!(id.subject, "f:0b5e2d1c:alice");
    assert_eq!(id.display_name.as_deref(), Some("Alice Liddell"));
    assert!(id.roles.is_empty(), "roles only from configured claims");
    assert!(id.groups.is_empty());

    // Without `name`, the display name falls back to preferred_username.
    let token = hs_token(without(keycloak_payload(), "name"));
    let id = assert_ok(hs_provider(json!({})).verify(&token, NOW)).identity;
    assert_eq!(id.display_name.as_deref(), Some("alice"));
}

#[test]
fn wrongly_typed_or_missing_claims_yield_nothing() {
    let p = hs_provider(json!({"claims": {
        "roles": ["realm_access.roles", "roles", "missing.path", "scope"],
        "groups": ["groups", "org"],
        "tenant": "tenant",
        "display_name": ["name"]
    }}));
    let claims = json!({
        "iss": ISS, "sub": "bob", "aud": AUD, "exp": NOW + 60,
        "realm_access": "not-an-object",
        "roles": ["reader", 7, null, "reader", "", "bad\nrole", {"x": 1}, "writer"],
        "scope": 12,
        "groups": {"a": 1},
        "org": "Org With Spaces",
        "tenant": ["a", "b"],
        "name": 5
    });
    let id = assert_ok(p.verify(&hs_token(claims), NOW)).identity;
    assert_eq!(id.subject, "bob");
    assert_eq!(id.roles, ["reader", "writer"]);
    assert_eq!(id.groups, ["Org With Spaces"]);
    assert_eq!(id.tenant, None);
    assert_eq!(id.display_name, None);
}

#[test]
fn the_subject_is_required() {
    let p = hs_provider(json!({"claims": {"subject": "email"}}));
    assert_eq!(
        p.verify(&hs_token(payload()), NOW),
        Err(TokenError::MissingSubject)
    );
    let p = hs_provider(json!({}));
    for sub in [json!(""), json!("line\nbreak")] {
        let token = hs_token(with(payload(), "sub", sub));
        assert_eq!(p.verify(&token, NOW), Err(TokenError::MissingSubject));
    }
    assert_eq!(
        p.verify(&hs_token(without(payload(), "sub")), NOW),
        Err(TokenError::MissingSubject)
    );
    let nested = hs_provider(json!({"claims": {"subject": "user.id"}}));
    let token = hs_token(with(payload(), "user", json!({"id": "u-17"})));
    assert_eq!(
        assert_ok(nested.verify(&token, NOW)).identity.subject,
        "u-17"
    );
    let token = hs_token(with(payload(), "user", json!({"id": 17})));
    assert_eq!(nested.verify(&token, NOW), Err(TokenError::MissingSubject));
}

#[test]
fn claim_paths() {
    let segments = |text: &str| ClaimPath::parse(text).unwrap().segments().to_vec();
    assert_eq!(segments("a.b.c"), ["a", "b", "c"]);
    assert_eq!(
        segments("resource_access.\"my.app\".roles"),
        ["resource_access", "my.app", "roles"]
    );
    assert_eq!(
        segments("\"https://example.org/roles\""),
        ["https://example.org/roles"]
    );
    let too_deep = vec!["a"; 17].join(".");
    for bad in [
        "",
        ".",
        "a.",
        ".a",
        "a..b",
        "\"a",
        "\"a\"b",
        "\"\"",
        too_deep.as_str(),
    ] {
        assert!(ClaimPath::parse(bad).is_err(), "{bad:?}");
    }
    assert!(ClaimPath::parse(&vec!["a"; 16].join(".")).is_ok());
}

// ---------------------------------------------------------------------------------------------
// Configuration

#[test]
fn configuration_errors_name_the_field() {
    let rsa = jwks(&[rsa_jwk(rsa_key(), "rsa-1")]);
    let base = json!({"issuer": ISS, "algorithms": ["RS256"], "jwks": rsa});
    let secret31 = STANDARD.encode(&SECRET[..31]);
    let secret40 = STANDARD.encode(&SECRET[..40]);
    let cases: Vec<(Value, &str, &str)> = vec![
        (with(base.clone(), "issuer", json!("")), "issuer", "empty"),
        (
            with(base.clone(), "issuer", json!(" https://x")),
            "issuer",
            "whitespace",
        ),
        (
            with(base.clone(), "algorithms", json!([])),
            "algorithms",
            "at least one",
        ),
        (
            with(base.clone(), "algorithms", json!([""])),
            "algorithms[0]",
            "empty",
        ),
        (
            with(base.clone(), "algorithms", json!(["RS256", "RS257"])),
            "algorithms[1]",
            "unknown algorithm \"RS257\"",
        ),
        (
            with(base.clone(), "algorithms", json!(["none"])),
            "algorithms[0]",
            "never",
        ),
        (
            with(base.clone(), "algorithms", json!(["rs256"])),
            "algorithms[0]",
            "unknown",
        ),
        (
            json!({"issuer": ISS, "algorithms": ["HS256"], "hmac_secret": secret31}),
            "hmac_secret",
            "31 bytes; HS256 needs at least 32",
        ),
        (
            json!({"issuer": ISS, "algorithms": ["HS256", "HS384"], "hmac_secret": secret40}),
            "hmac_secret",
            "HS384 needs at least 48",
        ),
        (
            json!({"issuer": ISS, "algorithms": ["HS256"], "hmac_secret": "not base64!"}),
            "hmac_secret",
            "base64",
        ),
        (
            with(base.clone(), "clock_skew_secs", json!(301)),
            "clock_skew_secs",
            "300",
        ),
        (
            with(base.clone(), "max_token_bytes", json!(100)),
            "max_token_bytes",
            "outside",
        ),
        (
            with(base.clone(), "max_token_bytes", json!(1 << 20)),
            "max_token_bytes",
            "outside",
        ),
        (
            with(base.clone(), "max_lifetime_secs", json!(0)),
            "max_lifetime_secs",
            "positive",
        ),
        (
            with(base.clone(), "audiences", json!(["orion", ""])),
            "audiences[1]",
            "empty",
        ),
        (
            json!({"issuer": ISS, "algorithms": ["RS256"]}),
            "jwks",
            "no keys",
        ),
        (
            with(base.clone(), "algorithms", json!(["ES256"])),
            "algorithms",
            "no configured key",
        ),
        (
            with(base.clone(), "algorithms", json!(["RS256", "HS256"])),
            "algorithms[1]",
            "hmac_secret",
        ),
        (
            with(base.clone(), "jwks", json!("not json")),
            "jwks",
            "invalid JSON",
        ),
        (
            with(base.clone(), "jwks", json!({"keys": []})),
            "jwks",
            "no usable key",
        ),
        (
            without(with(base.clone(), "pem", json!("hello")), "jwks"),
            "pem",
            "no PEM block",
        ),
        (
            with(
                base.clone(),
                "claims",
                json!({"roles": ["realm_access..roles"]}),
            ),
            "claims.roles[0]",
            "empty segment",
        ),
        (
            with(base.clone(), "claims", json!({"subject": ""})),
            "claims.subject",
            "empty",
        ),
        (
            with(
                base.clone(),
                "remote",
                json!({"cluster": "kc", "authority": "kc", "path": "/c", "refresh_secs": 5}),
            ),
            "remote.refresh_secs",
            "outside",
        ),
    ];
    for (cfg, field, message) in cases {
        let err = config_error(cfg.clone());
        assert_eq!(err.field, field, "{cfg}: {err}");
        assert!(err.message.contains(message), "{cfg}: {err}");
        assert!(err.to_string().contains(field));
        assert_eq!(config(cfg).validate(), Err(err));
    }
    // The limits themselves are fine.
    provider(with(base.clone(), "clock_skew_secs", json!(300)));
    provider(with(
        base.clone(),
        "max_token_bytes",
        json!(MAX_MAX_TOKEN_BYTES),
    ));
    let secret32 = STANDARD.encode(&SECRET[..32]);
    provider(json!({"issuer": ISS, "algorithms": ["HS256"], "hmac_secret": secret32}));
}

#[test]
fn the_remote_endpoint_is_checked_as_it_is_read() {
    let base = json!({"issuer": ISS, "algorithms": ["RS256"], "audiences": ["orion"]});
    for (remote, field) in [
        (
            json!({"cluster": "kc", "authority": "kc", "path": "certs"}),
            "remote.path",
        ),
        (
            json!({"cluster": "", "authority": "kc", "path": "/c"}),
            "remote.cluster",
        ),
        (
            json!({"cluster": "kc", "authority": "kc/x", "path": "/c"}),
            "remote.authority",
        ),
        (
            json!({"cluster": "kc", "authority": "kc", "path": "/c", "timeout_ms": 0}),
            "remote.timeout_ms",
        ),
    ] {
        let cfg = with(base.clone(), "remote", remote);
        let refused = crate::config_error::parse::<JwtProviderConfig>(cfg.to_string().as_bytes())
            .unwrap_err();
        assert!(
            matches!(&refused, crate::config_error::ConfigError::At { path, .. } if path == field),
            "{cfg}: {refused}"
        );
    }
}

#[test]
fn unknown_fields_are_refused() {
    let base =
        json!({"issuer": ISS, "algorithms": ["RS256"], "jwks": jwks(&[rsa_jwk(rsa_key(), "k")])});
    for cfg in [
        with(base.clone(), "audience", json!("orion")),
        with(base.clone(), "claims", json!({"role": ["roles"]})),
        with(
            base.clone(),
            "remote",
            json!({"cluster": "kc", "authority": "kc", "path": "/c", "uri": "https://kc"}),
        ),
        without(base.clone(), "algorithms"),
        with(base.clone(), "jwks", json!(5)),
    ] {
        let err = serde_json::from_value::<JwtProviderConfig>(cfg.clone()).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("unknown field")
                || text.contains("missing field")
                || text.contains("JWKS object"),
            "{cfg}: {text}"
        );
    }
}

#[test]
fn hmac_secret_debug_is_redacted() {
    let cfg = config(
        json!({"issuer": ISS, "algorithms": ["HS256"], "hmac_secret": STANDARD.encode(SECRET)}),
    );
    let debug = format!("{cfg:?}");
    assert!(!debug.contains(&STANDARD.encode(SECRET)), "{debug}");
    assert!(debug.contains("redacted"));
    let provider_debug = format!("{:?}", JwtProvider::new(&cfg).unwrap());
    assert!(
        !provider_debug.contains("0123456789abcdef"),
        "{provider_debug}"
    );
}

#[test]
fn documented_example_config_is_valid() {
    let docs = include_str!("mod.rs");
    let start = docs.find("//! ```json").unwrap();
    let end = start + docs[start..].find("//! ```\n").unwrap();
    let json_text: String = docs[start..end]
        .lines()
        .skip(1)
        .map(|line| line.trim_start_matches("//!"))
        .collect::<Vec<_>>()
        .join("\n");
    let cfg: JwtProviderConfig = serde_json::from_str(&json_text).unwrap();
    cfg.validate().unwrap();
    let p = JwtProvider::new(&cfg).unwrap();
    let remote = p.remote().unwrap();
    assert!(remote.discovery);
    assert_eq!(remote.cluster.as_str(), "keycloak");
    assert_eq!(p.algorithms(), &[Algorithm::Rs256, Algorithm::Es256]);

    // With Keycloak's keys installed, a Keycloak token maps as documented.
    let mut p = p;
    let issuer = p.issuer().to_string();
    p.set_remote_keys(
        KeySet::from_jwks_json(&jwks(&[rsa_jwk(rsa_key(), "rsa-1")]).to_string()).unwrap(),
        NOW,
    )
    .unwrap();
    let token = rsa_key()
        .sign(jc(with(keycloak_payload(), "iss", json!(issuer))))
        .unwrap();
    let id = assert_ok(p.verify(&token, NOW)).identity;
    assert!(id.has_role("entity-writer"));
    assert!(id.in_group("/city-of-a"));
    assert_eq!(id.tenant.as_deref(), Some("smartcity"));
}

#[test]
fn verifier_routes_by_issuer_and_refuses_duplicates() {
    let keycloak = json!({
        "issuer": ISS, "audiences": [AUD], "algorithms": ["RS256"],
        "jwks": jwks(&[rsa_jwk(rsa_key(), "rsa-1")]),
    });
    let dev = json!({
        "issuer": "dev-issuer", "algorithms": ["HS256"], "hmac_secret": STANDARD.encode(SECRET),
    });
    let verifier = JwtVerifier::new(&[config(keycloak.clone()), config(dev.clone())]).unwrap();
    assert_eq!(verifier.providers().len(), 2);

    let kc_token = rsa_key().sign(jc(payload())).unwrap();
    assert_eq!(assert_ok(verifier.verify(&kc_token, NOW)).issuer, ISS);
    let dev_token = hs_token(with(payload(), "iss", json!("dev-issuer")));
    assert_eq!(
        assert_ok(verifier.verify(&dev_token, NOW)).issuer,
        "dev-issuer"
    );
    // The dev secret cannot mint tokens for the Keycloak issuer.
    assert_eq!(
        verifier.verify(&hs_token(payload()), NOW),
        Err(TokenError::AlgorithmNotAllowed)
    );
    assert!(verifier.provider("nobody").is_none());

    let err = JwtVerifier::new(&[config(dev.clone()), config(dev)]).unwrap_err();
    assert_eq!(err.field, "providers[1].issuer");
    assert_eq!(JwtVerifier::new(&[]).unwrap_err().field, "providers");
    let err =
        JwtVerifier::new(&[config(with(keycloak, "clock_skew_secs", json!(900)))]).unwrap_err();
    assert_eq!(err.field, "providers[0].clock_skew_secs");
}

// ---------------------------------------------------------------------------------------------
// Errors

#[test]
fn error_codes_descriptions_and_decisions() {
    let all = [
        TokenError::Malformed("x"),
        TokenError::TooLarge { limit: 1 },
        TokenError::MissingIssuer,
        TokenError::UnknownIssuer,
        TokenError::IssuerMismatch,
        TokenError::AlgorithmNotAllowed,
        TokenError::CriticalHeader,
        TokenError::EmbeddedKey,
        TokenError::UnknownKid,
        TokenError::KeyTypeMismatch,
        TokenError::KeysUnavailable,
        TokenError::InvalidSignature,
        TokenError::MalformedClaims("x"),
        TokenError::Expired,
        TokenError::NotYetValid,
        TokenError::IssuedInFuture,
        TokenError::MissingExpiry,
        TokenError::LifetimeTooLong,
        TokenError::AudienceMismatch,
        TokenError::MissingSubject,
        TokenError::NotJwt,
        TokenError::Rejected("x"),
    ];
    let mut labels = std::collections::HashSet::new();
    for err in &all {
        let code = err.error_code();
        let status = err.deny_reason().status();
        match err {
            TokenError::Malformed(_) | TokenError::TooLarge { .. } => {
                assert_eq!(code, "invalid_request");
                assert_eq!(status, 400);
            }
            TokenError::KeysUnavailable => {
                assert_eq!(code, "invalid_token");
                assert_eq!(status, 503);
            }
            _ => {
                assert_eq!(code, "invalid_token", "{err:?}");
                assert_eq!(status, 401, "{err:?}");
            }
        }
        assert_eq!(err.is_unknown_kid(), *err == TokenError::UnknownKid);
        assert!(
            labels.insert(err.label()),
            "duplicate label {}",
            err.label()
        );
        let description = err.description();
        assert!(!description.is_empty() && description.len() < 50);
        for internal in ["kid", "alg", "jwk", "crit", "HS256", "RSA", "signature"] {
            assert!(!description.contains(internal), "{description}");
        }
        assert_eq!(err.deny_reason().description(), description);
        assert!(!err.to_string().is_empty());
    }
    assert_eq!(TokenError::Expired.description(), "token expired");
    // Attack failures all look alike to the client.
    for err in [
        TokenError::AlgorithmNotAllowed,
        TokenError::EmbeddedKey,
        TokenError::UnknownKid,
        TokenError::InvalidSignature,
        TokenError::CriticalHeader,
    ] {
        assert_eq!(err.description(), "invalid token");
    }
}

#[test]
fn algorithm_names_round_trip() {
    for alg in Algorithm::ALL {
        assert_eq!(Algorithm::from_name(alg.name()), Some(alg));
        assert_eq!(alg.to_string(), alg.name());
    }
    assert_eq!(Algorithm::from_name("Ed25519"), Some(Algorithm::EdDsa));
    for name in ["none", "rs256", "ES512", "HS1", "", "RS256 "] {
        assert_eq!(Algorithm::from_name(name), None, "{name:?}");
    }
    assert_eq!(Algorithm::Hs384.min_secret_len(), 48);
    assert!(Algorithm::Hs512.is_hmac() && !Algorithm::Ps256.is_hmac());
}
