//! Refused configurations, named by where the bad value is.
//!
//! serde_json alone says `unknown variant "wrte" ... at line 1 column 213`, and Envoy hands the
//! filter its configuration minified, so the line and column point at nothing an operator
//! wrote. [`parse`] reports the JSON path instead (`acl.rules[2].effect`), through
//! `serde_path_to_error`, which tracks the path while serde deserializes.

use serde::de::DeserializeOwned;

/// Why a filter's configuration was refused. Its text starts `configuration refused`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The JSON is well formed but a value at `path` is wrong (unknown field or variant, wrong
    /// type, missing field).
    #[error("configuration refused at {path}: {message}")]
    At { path: String, message: String },
    /// The JSON itself is broken, or the problem is the document as a whole.
    #[error("configuration refused: {0}")]
    Document(String),
    /// The values parsed but do not make a valid configuration (the engine's check).
    #[error("configuration refused: {0}")]
    Invalid(String),
}

impl ConfigError {
    /// The refusal without its `configuration refused` prefix (`path: message`), for an
    /// engine's check whose error the loader prefixes again.
    pub fn detail(&self) -> String {
        match self {
            ConfigError::At { path, message } => format!("{path}: {message}"),
            ConfigError::Document(message) | ConfigError::Invalid(message) => message.clone(),
        }
    }
}

/// Parses a filter configuration; the error names the JSON path of the bad value.
pub fn parse<T: DeserializeOwned>(json: &[u8]) -> Result<T, ConfigError> {
    let mut deserializer = serde_json::Deserializer::from_slice(json);
    let config = serde_path_to_error::deserialize(&mut deserializer).map_err(|e| {
        let path = e.path().to_string();
        let error = e.into_inner();
        if error.is_syntax() || error.is_eof() {
            ConfigError::Document(error.to_string())
        } else if path == "." {
            ConfigError::Document(without_position(&error))
        } else {
            ConfigError::At {
                path,
                message: without_position(&error),
            }
        }
    })?;
    // Bytes after the document are an error too (serde_json::from_slice's rule).
    deserializer
        .end()
        .map_err(|e| ConfigError::Document(e.to_string()))?;
    Ok(config)
}

/// serde_json's message without its ` at line L column C` (meaningless in minified JSON).
fn without_position(error: &serde_json::Error) -> String {
    let text = error.to_string();
    let position = format!(" at line {} column {}", error.line(), error.column());
    text.strip_suffix(&position).unwrap_or(&text).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entity_acl::EntityAclConfig;

    fn refusal(json: &str) -> String {
        parse::<EntityAclConfig>(json.as_bytes())
            .map(|_| ())
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn names_the_path_of_an_unknown_variant() {
        // (Actions are checked by the ACL engine, which names the rule; effects by serde.)
        let message = refusal(
            r#"{"acl": {"rules": [
                {"name": "a", "effect": "allow", "subjects": ["anyone"], "actions": ["read"],
                 "ngsi": {"service": "*", "service_path": "/#"}},
                {"name": "b", "effect": "allow", "subjects": ["anyone"], "actions": ["read"],
                 "ngsi": {"service": "*", "service_path": "/#"}},
                {"name": "c", "effect": "alow", "subjects": ["anyone"], "actions": ["read"],
                 "ngsi": {"service": "*", "service_path": "/#"}}]}}"#,
        );
        assert!(
            message.starts_with(
                "configuration refused at acl.rules[2].effect: unknown variant `alow`, expected `allow` or `deny`"
            ),
            "{message}"
        );
        assert!(
            !message.contains("line 1") && !message.contains("column"),
            "{message}"
        );
    }

    #[test]
    fn names_unknown_fields_wrong_types_and_missing_fields() {
        assert_eq!(
            refusal(r#"{"max_body": 5, "acl": {"rules": []}}"#),
            "configuration refused at max_body: unknown field `max_body`, expected one of \
             `mode`, `log_allows`, `max_body_bytes`, `body_timeout_ms`, `identity_headers`, \
             `open_endpoints`, `broker`, `allow_local_notification_endpoints`, `acl`"
        );
        assert_eq!(
            refusal(r#"{"max_body_bytes": "big", "acl": {"rules": []}}"#),
            "configuration refused at max_body_bytes: invalid type: string \"big\", expected usize"
        );
        assert!(refusal(r#"{"log_allows": "loud", "acl": {"rules": []}}"#)
            .starts_with("configuration refused at log_allows: unknown variant `loud`"));
        assert_eq!(
            refusal(r#"{"mode": "enforce"}"#),
            "configuration refused: missing field `acl`"
        );
    }

    #[test]
    fn broken_json_is_a_document_error() {
        assert!(matches!(
            parse::<EntityAclConfig>(b"{\"acl\": "),
            Err(ConfigError::Document(_))
        ));
        assert!(matches!(
            parse::<EntityAclConfig>(br#"{"acl": {"rules": []}} x"#),
            Err(ConfigError::Document(_))
        ));
        assert!(parse::<EntityAclConfig>(br#"{"acl": {"rules": []}}"#).is_ok());
    }
}
