//! token-auth through the harness, in one run: a cached token, and the first verification of
//! a token per algorithm (a cache of one entry and two alternating tokens, so every request
//! verifies a signature), beside the pass-through baseline.

mod common;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use criterion::{criterion_group, criterion_main, Criterion};
use host_harness::{Chain, HttpRequest, Runtime, UpstreamResponse};
use jwt_simple::prelude::*;
use serde_json::{json, Value};

const ISS: &str = "https://idp.example/realms/city";

fn request(token: &str) -> HttpRequest {
    let auth = format!("Bearer {token}");
    common::request(&[("authorization", auth.as_str())])
}

fn claims(sub: &str) -> JWTClaims<NoCustomClaims> {
    Claims::create(Duration::from_hours(1))
        .with_issuer(ISS)
        .with_audience("orion")
        .with_subject(sub)
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// A provider config for one algorithm, and two tokens of it.
fn algorithm_case(alg: &str) -> (Value, [String; 2]) {
    let sign = |f: &dyn Fn(&str) -> String| [f("alice"), f("bob")];
    match alg {
        "RS256" | "PS256" => {
            let key = RS256KeyPair::generate(2048).unwrap().with_key_id("k");
            let c = key.public_key().to_components();
            let jwk = json!({"kty": "RSA", "kid": "k", "n": b64(&c.n), "e": b64(&c.e)});
            let tokens = if alg == "RS256" {
                sign(&|s| key.sign(claims(s)).unwrap())
            } else {
                let ps = PS256KeyPair::from_pem(&key.to_pem().unwrap())
                    .unwrap()
                    .with_key_id("k");
                sign(&|s| ps.sign(claims(s)).unwrap())
            };
            (json!({"jwks": {"keys": [jwk]}}), tokens)
        }
        "ES256" => {
            let key = ES256KeyPair::generate().with_key_id("k");
            let p = key.public_key().public_key().to_bytes_uncompressed();
            let jwk = json!({"kty": "EC", "kid": "k", "crv": "P-256",
                             "x": b64(&p[1..33]), "y": b64(&p[33..65])});
            (
                json!({"jwks": {"keys": [jwk]}}),
                sign(&|s| key.sign(claims(s)).unwrap()),
            )
        }
        "EdDSA" => {
            let key = Ed25519KeyPair::generate().with_key_id("k");
            let jwk = json!({"kty": "OKP", "kid": "k", "crv": "Ed25519",
                             "x": b64(&key.public_key().to_bytes())});
            (
                json!({"jwks": {"keys": [jwk]}}),
                sign(&|s| key.sign(claims(s)).unwrap()),
            )
        }
        "HS256" => {
            let secret = b"an HMAC secret of at least 32 bytes for HS256 tokens";
            let key = HS256Key::from_bytes(secret);
            (
                json!({"hmac_secret": STANDARD.encode(secret)}),
                sign(&|s| key.authenticate(claims(s)).unwrap()),
            )
        }
        other => panic!("no case for {other}"),
    }
}

fn token_auth_config(alg: &str, keys: Value, capacity: usize) -> Value {
    let mut provider = json!({"issuer": ISS, "audiences": ["orion"], "algorithms": [alg],
                             "claims": {"subject": "sub"}});
    if let (Some(p), Some(k)) = (provider.as_object_mut(), keys.as_object()) {
        p.extend(k.clone());
    }
    json!({"jwt_providers": [provider], "cache": {"capacity": capacity}})
}

fn chain(runtime: &Arc<Runtime>, wasm: &str, config: &Value) -> Chain {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    common::chain(
        runtime,
        Some((wasm, &config.to_string())),
        now.as_nanos() as u64,
    )
}

fn bench(c: &mut Criterion) {
    let runtime = Arc::new(Runtime::new().expect("runtime"));
    let upstream = UpstreamResponse::default();
    let mut group = c.benchmark_group("token_auth");

    let mut passthrough = chain(&runtime, "example.wasm", &json!({"mode": "passthrough"}));
    group.bench_function("passthrough_baseline", |b| {
        b.iter(|| passthrough.http(request("x"), &upstream))
    });

    let (keys, tokens) = algorithm_case("RS256");
    let mut cached = chain(
        &runtime,
        "token_auth.wasm",
        &token_auth_config("RS256", keys, 1000),
    );
    assert_eq!(cached.http(request(&tokens[0]), &upstream).status, 200);
    group.bench_function("cached_token_rs256", |b| {
        b.iter(|| cached.http(request(&tokens[0]), &upstream))
    });

    for alg in ["RS256", "PS256", "ES256", "EdDSA", "HS256"] {
        let (keys, tokens) = algorithm_case(alg);
        let mut chain = chain(
            &runtime,
            "token_auth.wasm",
            &token_auth_config(alg, keys, 1),
        );
        for token in &tokens {
            let outcome = chain.http(request(token), &upstream);
            assert_eq!(
                outcome.status,
                200,
                "{alg}: {:?}",
                String::from_utf8_lossy(&outcome.body)
            );
        }
        let mut next = 0;
        group.bench_function(format!("first_verification_{alg}"), |b| {
            b.iter(|| {
                next ^= 1;
                chain.http(request(&tokens[next]), &upstream)
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
