//! OpenID Connect discovery documents (`/.well-known/openid-configuration`): the filter fetches
//! one when a provider's `remote.discovery` is true, and reads `issuer` and `jwks_uri` here.

use serde_json::Value;

use super::error::KeyError;

/// Largest discovery document accepted, in bytes.
pub const MAX_DISCOVERY_BYTES: usize = 256 * 1024;

/// The two members of a discovery document the filter needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OidcDiscovery {
    pub issuer: String,
    pub jwks_uri: String,
}

impl OidcDiscovery {
    /// Parses a discovery document. `issuer` and `jwks_uri` must be non-empty strings and
    /// `jwks_uri` an absolute http(s) URL without credentials.
    pub fn parse(json: &str) -> Result<OidcDiscovery, KeyError> {
        if json.len() > MAX_DISCOVERY_BYTES {
            return Err(KeyError::TooLarge {
                limit: MAX_DISCOVERY_BYTES,
            });
        }
        let doc: Value =
            serde_json::from_str(json).map_err(|e| KeyError::InvalidJson(e.to_string()))?;
        let obj = doc
            .as_object()
            .ok_or_else(|| KeyError::InvalidDiscovery("not a JSON object".into()))?;
        let member = |name: &str| -> Result<String, KeyError> {
            match obj.get(name) {
                Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
                Some(_) => Err(KeyError::InvalidDiscovery(format!(
                    "`{name}` is not a non-empty string"
                ))),
                None => Err(KeyError::InvalidDiscovery(format!("`{name}` is missing"))),
            }
        };
        let issuer = member("issuer")?;
        let jwks_uri = member("jwks_uri")?;
        split_url(&jwks_uri)?;
        Ok(OidcDiscovery { issuer, jwks_uri })
    }

    /// The `jwks_uri` as the `:authority` and `:path` of the fetch the filter makes.
    pub fn jwks_location(&self) -> Result<UrlParts, KeyError> {
        split_url(&self.jwks_uri)
    }
}

/// The `jwks_uri` of a discovery document.
pub fn jwks_uri_from_discovery(json: &str) -> Result<String, KeyError> {
    OidcDiscovery::parse(json).map(|d| d.jwks_uri)
}

/// The `issuer` of a discovery document.
pub fn issuer_from_discovery(json: &str) -> Result<String, KeyError> {
    OidcDiscovery::parse(json).map(|d| d.issuer)
}

/// An http(s) URL split into what an HTTP call from the filter needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrlParts {
    /// `http` or `https`.
    pub scheme: String,
    /// `host[:port]` (the port only when it is not the scheme's default).
    pub authority: String,
    /// Path and query, starting with `/`.
    pub path: String,
}

/// Splits an absolute http(s) URL. URLs with credentials or a fragment are refused.
pub fn split_url(uri: &str) -> Result<UrlParts, KeyError> {
    let url = url::Url::parse(uri).map_err(|e| KeyError::InvalidUrl(e.to_string()))?;
    let scheme = url.scheme();
    if scheme != "https" && scheme != "http" {
        return Err(KeyError::InvalidUrl(format!(
            "scheme {scheme:?} is not http or https"
        )));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(KeyError::InvalidUrl("URL carries credentials".into()));
    }
    if url.fragment().is_some() {
        return Err(KeyError::InvalidUrl("URL has a fragment".into()));
    }
    let host = url
        .host_str()
        .ok_or_else(|| KeyError::InvalidUrl("URL has no host".into()))?;
    let authority = match url.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_string(),
    };
    let mut path = url.path().to_string();
    if let Some(query) = url.query() {
        path.push('?');
        path.push_str(query);
    }
    Ok(UrlParts {
        scheme: scheme.to_string(),
        authority,
        path,
    })
}
