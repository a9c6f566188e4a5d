//! Test tooling: makes the keys and tokens the token-auth scenarios use. Tokens are signed by
//! jwt-simple, the library the filter verifies with; attack tokens (alg none, HS256 signed
//! with an RSA public key) are built the way an attacker would build them.
//!
//!   cargo run -q -p policy --example mint_jwt -- keys DIR
//!       writes DIR/{rsa-1,rsa-2,ec-1}.pem (private), DIR/jwks.json (rsa-1, ec-1),
//!       DIR/jwks-rotated.json (rsa-2, ec-1) and DIR/rsa-1.pub.pem
//!   cargo run -q -p policy --example mint_jwt -- sign DIR KID ALG 'CLAIMS-JSON'
//!       KID is rsa-1, rsa-2 or ec-1; ALG RS256, PS256 or ES256
//!   cargo run -q -p policy --example mint_jwt -- none 'CLAIMS-JSON'
//!   cargo run -q -p policy --example mint_jwt -- hs-confusion PUBLIC-PEM-FILE 'CLAIMS-JSON'

// Test tooling run by hand: it should stop loudly on any problem.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jwt_simple::prelude::*;
use serde_json::{json, Map, Value};

type Custom = Map<String, Value>;

fn claims(text: &str) -> JWTClaims<Custom> {
    serde_json::from_str(text).expect("claims must be a JSON object")
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn rsa_jwk(kid: &str, key: &RS256KeyPair) -> Value {
    let c = key.public_key().to_components();
    json!({"kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256", "n": b64(&c.n), "e": b64(&c.e)})
}

fn ec_jwk(kid: &str, key: &ES256KeyPair) -> Value {
    let point = key.public_key().public_key().to_bytes_uncompressed();
    json!({"kty": "EC", "kid": kid, "use": "sig", "alg": "ES256", "crv": "P-256",
           "x": b64(&point[1..33]), "y": b64(&point[33..65])})
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| {
        args.get(i)
            .map(String::as_str)
            .expect("missing argument; see the file's doc comment")
    };
    match arg(0) {
        "keys" => {
            let dir = std::path::Path::new(arg(1));
            std::fs::create_dir_all(dir).unwrap();
            let rsa1 = RS256KeyPair::generate(2048).unwrap();
            let rsa2 = RS256KeyPair::generate(2048).unwrap();
            let ec1 = ES256KeyPair::generate();
            std::fs::write(dir.join("rsa-1.pem"), rsa1.to_pem().unwrap()).unwrap();
            std::fs::write(dir.join("rsa-2.pem"), rsa2.to_pem().unwrap()).unwrap();
            std::fs::write(dir.join("ec-1.pem"), ec1.to_pem().unwrap()).unwrap();
            std::fs::write(
                dir.join("rsa-1.pub.pem"),
                rsa1.public_key().to_pem().unwrap(),
            )
            .unwrap();
            let jwks = json!({"keys": [rsa_jwk("rsa-1", &rsa1), ec_jwk("ec-1", &ec1)]});
            let rotated = json!({"keys": [rsa_jwk("rsa-2", &rsa2), ec_jwk("ec-1", &ec1)]});
            std::fs::write(dir.join("jwks.json"), jwks.to_string()).unwrap();
            std::fs::write(dir.join("jwks-rotated.json"), rotated.to_string()).unwrap();
        }
        "sign" => {
            let dir = std::path::Path::new(arg(1));
            let kid = arg(2);
            let pem = std::fs::read_to_string(dir.join(format!("{kid}.pem"))).unwrap();
            let c = claims(arg(4));
            let token = match arg(3) {
                "RS256" => RS256KeyPair::from_pem(&pem)
                    .unwrap()
                    .with_key_id(kid)
                    .sign(c),
                "PS256" => PS256KeyPair::from_pem(&pem)
                    .unwrap()
                    .with_key_id(kid)
                    .sign(c),
                "ES256" => ES256KeyPair::from_pem(&pem)
                    .unwrap()
                    .with_key_id(kid)
                    .sign(c),
                other => panic!("unsupported algorithm {other}"),
            };
            println!("{}", token.unwrap());
        }
        "none" => {
            let header = b64(br#"{"alg":"none","typ":"JWT"}"#);
            let body: Value = serde_json::from_str(arg(1)).unwrap();
            println!("{header}.{}.", b64(body.to_string().as_bytes()));
        }
        "hs-confusion" => {
            let public_pem = std::fs::read(arg(1)).unwrap();
            let key = HS256Key::from_bytes(&public_pem).with_key_id("rsa-1");
            println!("{}", key.authenticate(claims(arg(2))).unwrap());
        }
        other => panic!("unknown command {other}"),
    }
}
