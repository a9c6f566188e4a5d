//! The example filter: a pass-through (the baseline every filter is measured against) and a
//! static-token check in the shape of the FogFlow/Wilma flow (`X-Auth-Token`, `fiware-service`),
//! used by the first harness scenarios until token-auth exists. Not a production filter: its
//! tokens are static strings in the configuration.

use std::collections::BTreeMap;
use std::rc::Rc;

use policy::DenyReason;
use proxy_glue::host;
use proxy_glue::{parse_plugin_config, send_deny, Counter};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MapType};
use serde::Deserialize;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_glue::install_panic_hook();
    proxy_wasm::set_root_context(|_| Box::new(ExampleRoot { config: None, metrics: None }));
}}

/// Headers that carry identity to the upstream; a client-sent copy is always removed.
const IDENTITY_HEADERS: [&str; 2] = ["x-nick-name", "x-roles"];

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case", tag = "mode")]
enum Config {
    /// Forward everything untouched.
    Passthrough,
    /// The least a filter that forwards identity does, deciding nothing: read the request
    /// headers once and the clock, remove the credential (`authorization`), set four identity
    /// headers to fixed values. Every request passes. load-bench's `floor` variant: what the
    /// Proxy-Wasm calls under token-auth cost with no compute at all (BENCHMARKS.md).
    IdentityFloor,
    /// Require a known `X-Auth-Token`.
    TokenList {
        tokens: BTreeMap<String, TokenUser>,
        #[serde(default)]
        public_paths: Vec<String>,
        /// Require exactly one `fiware-service` header (FogFlow's NGSI9 registrations).
        #[serde(default)]
        require_service_header: bool,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenUser {
    user: String,
    #[serde(default)]
    roles: Vec<String>,
}

#[derive(Debug, Clone, Copy)]
struct Metrics {
    allowed: Counter,
    denied: Counter,
}

struct ExampleRoot {
    config: Option<Rc<Config>>,
    metrics: Option<Metrics>,
}

impl Context for ExampleRoot {
    /// The plugin is going away: what the VM counted since its last tick reaches Envoy first.
    fn on_done(&mut self) -> bool {
        proxy_glue::flush_counters();
        true
    }
}

impl RootContext for ExampleRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        let Some(config) = parse_plugin_config::<Config>("example") else {
            return false;
        };
        if let Config::TokenList { tokens, .. } = &config {
            if let Some(empty) = tokens.keys().find(|t| t.trim().is_empty()) {
                log::error!("example: configuration rejected: empty token {empty:?}");
                return false;
            }
        }
        self.config = Some(Rc::new(config));
        self.metrics = Some(Metrics {
            allowed: Counter::define("example.allowed"),
            denied: Counter::define("example.denied"),
        });
        // The tick hands the counters to Envoy (`proxy_glue::counters`).
        self.set_tick_period(proxy_glue::counters::FLUSH_PERIOD);
        true
    }

    fn on_tick(&mut self) {
        proxy_glue::on_root_tick();
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(ExampleHttp {
            config: self.config.clone(),
            metrics: self.metrics,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct ExampleHttp {
    config: Option<Rc<Config>>,
    metrics: Option<Metrics>,
}

impl Context for ExampleHttp {}

impl HttpContext for ExampleHttp {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        let Some(config) = self.config.clone() else {
            // Unreachable in Envoy (a rejected config serves nothing), but never allow.
            send_deny(
                &DenyReason::Unavailable("filter not configured".into()),
                &[],
            );
            return Action::Pause;
        };
        match self.check(&config) {
            Ok(()) => {
                self.count(true);
                Action::Continue
            }
            Err(reason) => {
                log::info!("example: deny {reason}");
                self.count(false);
                let challenge = match reason {
                    DenyReason::Unauthenticated(_) => Some(("www-authenticate", "Bearer")),
                    _ => None,
                };
                send_deny(&reason, challenge.as_slice());
                Action::Pause
            }
        }
    }
}

/// The fixed identity [`Config::IdentityFloor`] forwards, under token-auth's header names.
const FLOOR_IDENTITY: [(&str, &str); 4] = [
    ("x-auth-subject", "floor-subject"),
    ("x-auth-kind", "jwt"),
    ("x-nick-name", "floor-subject"),
    ("x-roles", "reader"),
];

/// [`Config::IdentityFloor`]: token-auth's host calls on an allowed request, nothing else.
fn identity_floor() -> Result<(), DenyReason> {
    let unavailable = |what: &str| DenyReason::Unavailable(format!("identity floor: {what}"));
    let headers = host::header_map(MapType::HttpRequestHeaders)
        .map_err(|_| unavailable("cannot read the request headers"))?;
    if proxy_glue::now_secs().is_none() {
        return Err(unavailable("no clock"));
    }
    if headers.first("authorization").is_some() {
        host::set_header(MapType::HttpRequestHeaders, "authorization", None)
            .map_err(|_| unavailable("cannot remove the credential"))?;
    }
    for (name, value) in FLOOR_IDENTITY {
        host::set_header(MapType::HttpRequestHeaders, name, Some(value))
            .map_err(|_| unavailable("cannot set identity"))?;
    }
    Ok(())
}

/// The request headers the token list reads (they must be text; the rest pass untouched).
fn reads_header(name: &str) -> bool {
    policy::header_pairs::is_pseudo(name) || name == "fiware-service" || name == "x-auth-token"
}

impl ExampleHttp {
    fn check(&self, config: &Config) -> Result<(), DenyReason> {
        let (tokens, public_paths, require_service_header) = match config {
            Config::Passthrough => return Ok(()),
            Config::IdentityFloor => return identity_floor(),
            Config::TokenList {
                tokens,
                public_paths,
                require_service_header,
            } => (tokens, public_paths, require_service_header),
        };
        for name in IDENTITY_HEADERS {
            let _ = host::set_header(MapType::HttpRequestHeaders, name, None);
        }
        let headers = proxy_glue::request_text_headers("example", reads_header)?;
        let values = |name: &str| -> Vec<&str> {
            headers
                .iter()
                .filter(|(n, _)| n == name)
                .map(|(_, v)| v.as_str())
                .collect()
        };
        let path = values(":path").first().copied().unwrap_or_default();
        let url_path = path.split('?').next().unwrap_or_default();
        if public_paths.iter().any(|p| p == url_path) {
            return Ok(());
        }
        if *require_service_header && values("fiware-service").len() != 1 {
            return Err(DenyReason::BadRequest(
                "exactly one fiware-service header is required".into(),
            ));
        }
        let token = match values("x-auth-token").as_slice() {
            [] => return Err(DenyReason::Unauthenticated("missing X-Auth-Token".into())),
            [one] => one.to_string(),
            _ => return Err(DenyReason::BadRequest("more than one X-Auth-Token".into())),
        };
        let user = tokens
            .get(&token)
            .ok_or_else(|| DenyReason::Unauthenticated("invalid token".into()))?;
        let set = |name: &str, value: &str| {
            host::set_header(MapType::HttpRequestHeaders, name, Some(value))
                .map_err(|_| DenyReason::Unavailable("cannot set identity".into()))
        };
        set("x-nick-name", &user.user)?;
        set("x-roles", &user.roles.join(","))?;
        Ok(())
    }

    fn count(&self, allowed: bool) {
        if let Some(m) = self.metrics {
            if allowed {
                m.allowed.inc()
            } else {
                m.denied.inc()
            }
        }
    }
}
