//! Verification keys: parsed from a JWKS (inline or fetched), from PEM public keys, or from an
//! HMAC secret. Each key carries the algorithms it may verify; a key never verifies an
//! algorithm of another key kind.

use std::fmt;

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine;
use jwt_simple::prelude::{
    ECDSAP256PublicKeyLike, ECDSAP384PublicKeyLike, ES256PublicKey, ES384PublicKey,
    Ed25519PublicKey, EdDSAPublicKeyLike, HS256Key, HS384Key, HS512Key, JWTClaims, MACLike,
    NoCustomClaims, PS256PublicKey, PS384PublicKey, PS512PublicKey, RS256PublicKey, RS384PublicKey,
    RS512PublicKey, RSAPublicKeyLike, VerificationOptions,
};
use serde_json::{Map, Value};

use super::algorithm::{Algorithm, KeyKind};
use super::error::KeyError;
use crate::strict_json;

/// Largest JWKS document accepted, in bytes. Real sets are a few KiB (Keycloak's, with two
/// RSA keys and their certificates, is about 3 KiB).
pub const MAX_JWKS_BYTES: usize = 64 * 1024;
/// Most keys a JWKS may hold (each kid-less key may cost one signature check per token).
pub const MAX_JWKS_KEYS: usize = 100;

/// base64url, padding optional (JWKS members are unpadded per RFC 7515, some servers pad).
pub(crate) const B64_URL_LENIENT: GeneralPurpose = GeneralPurpose::new(
    &alphabet::URL_SAFE,
    GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Standard base64, padding optional.
pub(crate) const B64_STD_LENIENT: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// A set of verification keys. Cheap to clone relative to a verification; replaced as a whole
/// when a JWKS is refreshed.
#[derive(Clone, Default)]
pub struct KeySet {
    keys: Vec<VerificationKey>,
    skipped: Vec<String>,
}

/// One verification key.
#[derive(Clone)]
pub struct VerificationKey {
    kid: Option<String>,
    algorithms: Vec<Algorithm>,
    material: KeyMaterial,
}

#[derive(Clone)]
enum KeyMaterial {
    /// Modulus and exponent, big-endian; checked (2048..=4096 bits, e = 65537) when parsed.
    Rsa {
        n: Vec<u8>,
        e: Vec<u8>,
    },
    P256(ES256PublicKey),
    P384(ES384PublicKey),
    Ed25519(Ed25519PublicKey),
    Hmac(Vec<u8>),
}

impl KeyMaterial {
    fn kind(&self) -> KeyKind {
        match self {
            KeyMaterial::Rsa { .. } => KeyKind::Rsa,
            KeyMaterial::P256(_) => KeyKind::EcP256,
            KeyMaterial::P384(_) => KeyKind::EcP384,
            KeyMaterial::Ed25519(_) => KeyKind::Ed25519,
            KeyMaterial::Hmac(_) => KeyKind::Hmac,
        }
    }
}

impl fmt::Debug for VerificationKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key material: an HMAC secret must not reach a log.
        f.debug_struct("VerificationKey")
            .field("kid", &self.kid)
            .field("kind", &self.kind().name())
            .field("algorithms", &self.algorithms)
            .finish()
    }
}

impl fmt::Debug for KeySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeySet")
            .field("keys", &self.keys)
            .field("skipped", &self.skipped)
            .finish()
    }
}

impl VerificationKey {
    pub fn kid(&self) -> Option<&str> {
        self.kid.as_deref()
    }

    /// The algorithms this key may verify (before the provider's allow-list applies).
    pub fn algorithms(&self) -> &[Algorithm] {
        &self.algorithms
    }

    pub fn kind(&self) -> KeyKind {
        self.material.kind()
    }

    pub fn is_symmetric(&self) -> bool {
        self.kind() == KeyKind::Hmac
    }

    pub fn can_verify(&self, alg: Algorithm) -> bool {
        self.algorithms.contains(&alg) && alg.key_kind() == self.kind()
    }

    /// Verifies `token` (signature, then the claims `options` asks for) with this key as
    /// `alg`. The key type is matched against `alg` here once more, so that no path can use a
    /// key for another kind of algorithm.
    pub(crate) fn verify(
        &self,
        alg: Algorithm,
        token: &str,
        options: VerificationOptions,
    ) -> Result<JWTClaims<NoCustomClaims>, jwt_simple::Error> {
        let options = Some(options);
        if !self.can_verify(alg) {
            return Err(jwt_simple::JWTError::AlgorithmMismatch.into());
        }
        match (&self.material, alg) {
            (KeyMaterial::Rsa { n, e }, Algorithm::Rs256) => {
                RS256PublicKey::from_components(n, e)?.verify_token(token, options)
            }
            (KeyMaterial::Rsa { n, e }, Algorithm::Rs384) => {
                RS384PublicKey::from_components(n, e)?.verify_token(token, options)
            }
            (KeyMaterial::Rsa { n, e }, Algorithm::Rs512) => {
                RS512PublicKey::from_components(n, e)?.verify_token(token, options)
            }
            (KeyMaterial::Rsa { n, e }, Algorithm::Ps256) => {
                PS256PublicKey::from_components(n, e)?.verify_token(token, options)
            }
            (KeyMaterial::Rsa { n, e }, Algorithm::Ps384) => {
                PS384PublicKey::from_components(n, e)?.verify_token(token, options)
            }
            (KeyMaterial::Rsa { n, e }, Algorithm::Ps512) => {
                PS512PublicKey::from_components(n, e)?.verify_token(token, options)
            }
            (KeyMaterial::P256(key), Algorithm::Es256) => key.verify_token(token, options),
            (KeyMaterial::P384(key), Algorithm::Es384) => key.verify_token(token, options),
            (KeyMaterial::Ed25519(key), Algorithm::EdDsa) => key.verify_token(token, options),
            (KeyMaterial::Hmac(secret), Algorithm::Hs256) => {
                HS256Key::from_bytes(secret).verify_token(token, options)
            }
            (KeyMaterial::Hmac(secret), Algorithm::Hs384) => {
                HS384Key::from_bytes(secret).verify_token(token, options)
            }
            (KeyMaterial::Hmac(secret), Algorithm::Hs512) => {
                HS512Key::from_bytes(secret).verify_token(token, options)
            }
            _ => Err(jwt_simple::JWTError::AlgorithmMismatch.into()),
        }
    }
}

impl KeySet {
    /// A set with no keys (a provider whose remote JWKS is not fetched yet).
    pub fn empty() -> KeySet {
        KeySet::default()
    }

    /// Parses a JWKS (`{"keys": [...]}`) or a single JWK object, as configured inline or as
    /// fetched from a `jwks_uri`.
    ///
    /// Entries are skipped, not fatal, when they are not for signatures (`use` other than
    /// `sig`, `key_ops` without `verify`), have an unsupported `kty`, `crv` or `alg`, an `alg`
    /// that does not fit their key type, private key material, or invalid/weak key values (RSA
    /// under 2048 bits, a point not on the curve, an HMAC key under 32 bytes). The reasons are
    /// kept in [`KeySet::skipped`] for the log. It fails if no usable key remains, if two
    /// entries share a `kid`, or if the document repeats a member anywhere.
    pub fn from_jwks_json(text: &str) -> Result<KeySet, KeyError> {
        if text.len() > MAX_JWKS_BYTES {
            return Err(KeyError::TooLarge {
                limit: MAX_JWKS_BYTES,
            });
        }
        let doc = strict_json::parse(text.as_bytes())
            .map_err(|e| KeyError::InvalidJson(e.to_string()))?;
        KeySet::from_jwks_value(&doc)
    }

    /// As [`KeySet::from_jwks_json`], from an already parsed JSON value.
    pub fn from_jwks_value(doc: &Value) -> Result<KeySet, KeyError> {
        let entries: Vec<&Value> = match doc {
            Value::Object(obj) if obj.contains_key("keys") => match obj.get("keys") {
                Some(Value::Array(keys)) => keys.iter().collect(),
                _ => {
                    return Err(KeyError::InvalidJson(
                        "the `keys` member is not an array".into(),
                    ))
                }
            },
            Value::Object(obj) if obj.contains_key("kty") => vec![doc],
            _ => {
                return Err(KeyError::InvalidJson(
                    "expected a JWKS object with a `keys` array, or a single JWK".into(),
                ))
            }
        };
        if entries.len() > MAX_JWKS_KEYS {
            return Err(KeyError::TooManyKeys {
                limit: MAX_JWKS_KEYS,
            });
        }
        // A kid names one key. Two entries with the same kid (whatever else they say) make
        // the set ambiguous: refused whole, never "try them all".
        let mut kids = std::collections::HashSet::new();
        for kid in entries
            .iter()
            .filter_map(|e| e.get("kid").and_then(Value::as_str))
        {
            if !kids.insert(kid) {
                return Err(KeyError::DuplicateKid {
                    kid: kid.chars().take(64).collect(),
                });
            }
        }
        let mut set = KeySet::default();
        for (index, entry) in entries.into_iter().enumerate() {
            match parse_jwk(entry) {
                Ok(key) => set.keys.push(key),
                Err(reason) => {
                    let kid = entry
                        .get("kid")
                        .and_then(Value::as_str)
                        .map(|kid| format!(" (kid {kid:?})"))
                        .unwrap_or_default();
                    set.skipped.push(format!("key {index}{kid}: {reason}"));
                }
            }
        }
        if set.keys.is_empty() {
            return Err(KeyError::NoUsableKeys {
                skipped: set.skipped,
            });
        }
        Ok(set)
    }

    /// Parses one or more PEM public keys (`PUBLIC KEY` SubjectPublicKeyInfo: RSA, EC P-256,
    /// EC P-384, Ed25519; or `RSA PUBLIC KEY` PKCS#1). The keys have no kid, so they are tried
    /// for any token whose kid matches no other key. Private keys and certificates are refused
    /// with a message saying so.
    pub fn from_pem(pem: &str) -> Result<KeySet, KeyError> {
        let blocks = pem_blocks(pem)?;
        if blocks.is_empty() {
            return Err(KeyError::InvalidPem("no PEM block found".into()));
        }
        let mut set = KeySet::default();
        for (index, (label, block)) in blocks.into_iter().enumerate() {
            let material = match label {
                "PUBLIC KEY" => parse_spki_pem(block).ok_or_else(|| {
                    KeyError::InvalidPem(format!(
                        "block {index}: not an RSA (2048-4096 bits, e=65537), EC P-256, \
                         EC P-384 or Ed25519 public key"
                    ))
                })?,
                "RSA PUBLIC KEY" => parse_rsa_pem(block).ok_or_else(|| {
                    KeyError::InvalidPem(format!(
                        "block {index}: not a usable RSA public key (2048-4096 bits, e=65537)"
                    ))
                })?,
                "CERTIFICATE" => {
                    return Err(KeyError::InvalidPem(format!(
                        "block {index} is a certificate; configure its public key instead \
                         (openssl x509 -pubkey -noout)"
                    )))
                }
                other if other.contains("PRIVATE") => {
                    return Err(KeyError::InvalidPem(format!(
                        "block {index} is a private key ({other}); configure the public key"
                    )))
                }
                other => {
                    return Err(KeyError::InvalidPem(format!(
                        "block {index} has unsupported type {other:?}"
                    )))
                }
            };
            set.keys.push(VerificationKey {
                kid: None,
                algorithms: algorithms_for(&material, None),
                material,
            });
        }
        Ok(set)
    }

    /// A set with one HMAC key (no kid). It verifies the HS algorithms whose hash size the
    /// secret reaches: HS256 from 32 bytes, HS384 from 48, HS512 from 64.
    pub fn from_hmac_secret(secret: &[u8]) -> Result<KeySet, KeyError> {
        let min = Algorithm::Hs256.min_secret_len();
        if secret.len() < min {
            return Err(KeyError::WeakHmacSecret {
                len: secret.len(),
                min,
            });
        }
        let material = KeyMaterial::Hmac(secret.to_vec());
        Ok(KeySet {
            keys: vec![VerificationKey {
                kid: None,
                algorithms: algorithms_for(&material, None),
                material,
            }],
            skipped: Vec::new(),
        })
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn keys(&self) -> &[VerificationKey] {
        &self.keys
    }

    /// Why JWKS entries were skipped, one line each (for the log).
    pub fn skipped(&self) -> &[String] {
        &self.skipped
    }

    /// True if some key may verify `alg`.
    pub fn supports(&self, alg: Algorithm) -> bool {
        self.keys.iter().any(|k| k.can_verify(alg))
    }

    pub fn has_symmetric(&self) -> bool {
        self.keys.iter().any(VerificationKey::is_symmetric)
    }

    /// The same set without HMAC keys. A JWKS fetched from a `jwks_uri` is public, so an HMAC
    /// secret in it is known to everyone and must not be used.
    pub fn without_symmetric(mut self) -> KeySet {
        let before = self.keys.len();
        self.keys.retain(|k| !k.is_symmetric());
        if self.keys.len() != before {
            self.skipped
                .push("oct (HMAC) keys are ignored in a fetched JWKS".to_string());
        }
        self
    }

    /// Adds the keys (and skip notes) of `other`.
    pub fn merge(&mut self, other: KeySet) {
        self.keys.extend(other.keys);
        self.skipped.extend(other.skipped);
    }
}

/// The algorithms a key may verify: the JWK's `alg` if given (already checked to fit), else
/// every algorithm of its kind (HMAC: those whose minimum secret length it reaches).
fn algorithms_for(material: &KeyMaterial, alg: Option<Algorithm>) -> Vec<Algorithm> {
    if let Some(alg) = alg {
        return vec![alg];
    }
    match material {
        KeyMaterial::Rsa { .. } => Algorithm::RSA.to_vec(),
        KeyMaterial::P256(_) => vec![Algorithm::Es256],
        KeyMaterial::P384(_) => vec![Algorithm::Es384],
        KeyMaterial::Ed25519(_) => vec![Algorithm::EdDsa],
        KeyMaterial::Hmac(secret) => Algorithm::HMAC
            .into_iter()
            .filter(|a| secret.len() >= a.min_secret_len())
            .collect(),
    }
}

fn opt_str<'a>(obj: &'a Map<String, Value>, name: &str) -> Result<Option<&'a str>, String> {
    match obj.get(name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(format!("`{name}` is not a string")),
    }
}

fn req_str<'a>(obj: &'a Map<String, Value>, name: &str) -> Result<&'a str, String> {
    opt_str(obj, name)?.ok_or_else(|| format!("`{name}` is missing"))
}

fn b64_member(obj: &Map<String, Value>, name: &str) -> Result<Vec<u8>, String> {
    let text = req_str(obj, name)?;
    B64_URL_LENIENT
        .decode(text)
        .map_err(|_| format!("`{name}` is not base64url"))
}

/// Decodes an EC coordinate, which must have exactly the curve's size (RFC 7518 §6.2.1.2).
fn b64_fixed(obj: &Map<String, Value>, name: &str, size: usize) -> Result<Vec<u8>, String> {
    let bytes = b64_member(obj, name)?;
    if bytes.len() != size {
        return Err(format!(
            "`{name}` is {} bytes, expected {size}",
            bytes.len()
        ));
    }
    Ok(bytes)
}

/// Parses one JWK, or says why it is skipped.
fn parse_jwk(entry: &Value) -> Result<VerificationKey, String> {
    let obj = entry.as_object().ok_or("not a JSON object")?;
    let kid = opt_str(obj, "kid")?.map(str::to_string);
    let kty = req_str(obj, "kty")?;
    if let Some(key_use) = opt_str(obj, "use")? {
        if key_use != "sig" {
            return Err(format!("use {key_use:?} is not \"sig\""));
        }
    }
    if let Some(ops) = obj.get("key_ops") {
        let ops = ops.as_array().ok_or("`key_ops` is not an array")?;
        if !ops.iter().any(|op| op.as_str() == Some("verify")) {
            return Err("key_ops does not include \"verify\"".into());
        }
    }
    let alg = match opt_str(obj, "alg")? {
        None => None,
        Some(name) => {
            Some(Algorithm::from_name(name).ok_or_else(|| format!("unsupported alg {name:?}"))?)
        }
    };
    if kty != "oct"
        && ["d", "p", "q", "dp", "dq", "qi", "k"]
            .iter()
            .any(|m| obj.contains_key(*m))
    {
        return Err("contains private key material; publish only the public key".into());
    }
    let material = match kty {
        "RSA" => {
            let n = b64_member(obj, "n")?;
            let e = b64_member(obj, "e")?;
            // Checks size (2048..=4096 bits), odd modulus and e = 65537.
            RS256PublicKey::from_components(&n, &e)
                .map_err(|err| format!("invalid RSA key: {err}"))?;
            KeyMaterial::Rsa { n, e }
        }
        "EC" => {
            let crv = req_str(obj, "crv")?;
            let size = match crv {
                "P-256" => 32,
                "P-384" => 48,
                other => return Err(format!("unsupported curve {other:?}")),
            };
            let mut point = Vec::with_capacity(1 + 2 * size);
            point.push(0x04);
            point.extend(b64_fixed(obj, "x", size)?);
            point.extend(b64_fixed(obj, "y", size)?);
            if size == 32 {
                KeyMaterial::P256(
                    ES256PublicKey::from_bytes(&point)
                        .map_err(|_| "invalid P-256 point".to_string())?,
                )
            } else {
                KeyMaterial::P384(
                    ES384PublicKey::from_bytes(&point)
                        .map_err(|_| "invalid P-384 point".to_string())?,
                )
            }
        }
        "OKP" => {
            let crv = req_str(obj, "crv")?;
            if crv != "Ed25519" {
                return Err(format!("unsupported curve {crv:?}"));
            }
            let x = b64_fixed(obj, "x", 32)?;
            KeyMaterial::Ed25519(
                Ed25519PublicKey::from_bytes(&x)
                    .map_err(|_| "invalid Ed25519 public key".to_string())?,
            )
        }
        "oct" => {
            let k = b64_member(obj, "k")?;
            let min = alg.map_or(Algorithm::Hs256.min_secret_len(), Algorithm::min_secret_len);
            if k.len() < min {
                return Err(format!(
                    "HMAC key is {} bytes, at least {min} are required",
                    k.len()
                ));
            }
            KeyMaterial::Hmac(k)
        }
        other => return Err(format!("unsupported kty {other:?}")),
    };
    if let Some(alg) = alg {
        if alg.key_kind() != material.kind() {
            return Err(format!(
                "alg {} does not fit a {} key",
                alg.name(),
                material.kind().name()
            ));
        }
    }
    Ok(VerificationKey {
        kid,
        algorithms: algorithms_for(&material, alg),
        material,
    })
}

/// Splits PEM text into (label, whole block) pairs.
fn pem_blocks(pem: &str) -> Result<Vec<(&str, &str)>, KeyError> {
    const BEGIN: &str = "-----BEGIN ";
    const DASHES: &str = "-----";
    let mut blocks = Vec::new();
    let mut rest = pem;
    while let Some(start) = rest.find(BEGIN) {
        let after_begin = &rest[start + BEGIN.len()..];
        let label_len = after_begin
            .find(DASHES)
            .ok_or_else(|| KeyError::InvalidPem("unterminated BEGIN line".into()))?;
        let label = &after_begin[..label_len];
        let end_marker = format!("-----END {label}-----");
        let end = rest[start..]
            .find(&end_marker)
            .ok_or_else(|| KeyError::InvalidPem(format!("no END line for {label:?}")))?;
        let block_end = start + end + end_marker.len();
        blocks.push((label, &rest[start..block_end]));
        rest = &rest[block_end..];
    }
    Ok(blocks)
}

fn rsa_material(key: &RS256PublicKey) -> KeyMaterial {
    let components = key.to_components();
    KeyMaterial::Rsa {
        n: components.n,
        e: components.e,
    }
}

fn parse_rsa_pem(block: &str) -> Option<KeyMaterial> {
    RS256PublicKey::from_pem(block)
        .ok()
        .map(|key| rsa_material(&key))
}

fn parse_spki_pem(block: &str) -> Option<KeyMaterial> {
    if let Ok(key) = Ed25519PublicKey::from_pem(block) {
        return Some(KeyMaterial::Ed25519(key));
    }
    if let Ok(key) = ES256PublicKey::from_pem(block) {
        return Some(KeyMaterial::P256(key));
    }
    if let Ok(key) = ES384PublicKey::from_pem(block) {
        return Some(KeyMaterial::P384(key));
    }
    parse_rsa_pem(block)
}
