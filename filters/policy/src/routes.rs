//! Routes that need no credential (e.g. Orion's `/version`). A public route is an exception to
//! authentication, so it matches only a clean path: anything with dot segments, repeated
//! slashes, backslashes or encoded separators is never public (the request then needs a
//! credential like any other).

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublicRoute {
    /// Exact path (without query).
    pub path: Option<String>,
    /// Path prefix on segment boundaries: `/version` matches `/version` and `/version/x`,
    /// not `/versions`.
    pub path_prefix: Option<String>,
    /// Methods (uppercase); empty means GET and HEAD.
    #[serde(default)]
    pub methods: Vec<String>,
}

/// True if the path is in plain canonical form.
pub fn is_clean_path(path: &str) -> bool {
    let lower = path.to_ascii_lowercase();
    path.starts_with('/')
        && !path.contains("//")
        && !path.contains('\\')
        && !lower.contains("%2e")
        && !lower.contains("%2f")
        && !lower.contains("%5c")
        && !path
            .split('/')
            .any(|segment| segment == "." || segment == "..")
}

impl PublicRoute {
    pub fn validate(&self) -> Result<(), String> {
        let target = match (&self.path, &self.path_prefix) {
            (Some(p), None) | (None, Some(p)) => p,
            _ => return Err("a public route needs exactly one of path or path_prefix".into()),
        };
        if !is_clean_path(target) || target.contains('?') {
            return Err(format!(
                "public route {target:?} must be a clean absolute path"
            ));
        }
        if let Some(m) = self
            .methods
            .iter()
            .find(|m| m.is_empty() || !m.bytes().all(|b| b.is_ascii_uppercase()))
        {
            return Err(format!(
                "public route method {m:?} must be uppercase, e.g. GET"
            ));
        }
        Ok(())
    }

    /// `path` is the request's `:path`; its query is ignored.
    pub fn matches(&self, method: &str, path: &str) -> bool {
        let path = path.split(['?', '#']).next().unwrap_or_default();
        if !is_clean_path(path) {
            return false;
        }
        let method_ok = if self.methods.is_empty() {
            method == "GET" || method == "HEAD"
        } else {
            self.methods.iter().any(|m| m == method)
        };
        if !method_ok {
            return false;
        }
        match (&self.path, &self.path_prefix) {
            (Some(exact), _) => path == exact,
            (None, Some(prefix)) => {
                let prefix = prefix.trim_end_matches('/');
                path == prefix
                    || path
                        .strip_prefix(prefix)
                        .is_some_and(|rest| rest.starts_with('/'))
            }
            (None, None) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefix(p: &str) -> PublicRoute {
        PublicRoute {
            path: None,
            path_prefix: Some(p.into()),
            methods: vec![],
        }
    }

    #[test]
    fn prefix_matches_on_segments_only() {
        let r = prefix("/version");
        assert!(r.matches("GET", "/version"));
        assert!(r.matches("GET", "/version/"));
        assert!(r.matches("GET", "/version/x?y=1"));
        assert!(!r.matches("GET", "/versions"));
        assert!(!r.matches("GET", "/v2/entities"));
        assert!(
            !r.matches("POST", "/version"),
            "default methods are GET and HEAD"
        );
    }

    #[test]
    fn traversal_and_encoding_tricks_are_never_public() {
        let r = prefix("/version");
        for path in [
            "/version/../v2/entities",
            "/version/%2e%2e/v2/entities",
            "/version/%2E%2E/v2/entities",
            "/version%2f..%2fv2",
            "//version",
            "/version//x",
            "/version\\..\\v2",
            "/version/./x",
        ] {
            assert!(!r.matches("GET", path), "{path}");
        }
    }

    #[test]
    fn exact_paths_and_methods() {
        let r = PublicRoute {
            path: Some("/health".into()),
            path_prefix: None,
            methods: vec!["GET".into(), "OPTIONS".into()],
        };
        assert!(r.validate().is_ok());
        assert!(r.matches("OPTIONS", "/health"));
        assert!(!r.matches("GET", "/health/x"));
        assert!(!r.matches("DELETE", "/health"));
    }

    #[test]
    fn validation_messages() {
        let both = PublicRoute {
            path: Some("/a".into()),
            path_prefix: Some("/b".into()),
            methods: vec![],
        };
        assert!(both.validate().unwrap_err().contains("exactly one"));
        assert!(prefix("/a/../b").validate().is_err());
        assert!(prefix("version").validate().is_err());
        let lower = PublicRoute {
            methods: vec!["get".into()],
            ..prefix("/a")
        };
        assert!(lower.validate().unwrap_err().contains("uppercase"));
    }
}
