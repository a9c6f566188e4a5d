//! What the driver knows of one request: its headers as read once, the body once it is
//! complete, and the caller as an earlier stage authenticated it.

use policy::header_pairs::HeaderPairs;
use policy::{DenyReason, Identity};
use proxy_glue::host::{self, HostStatus};
use proxy_wasm::types::{BufferType, MapType};

/// Who the caller is, as far as this module knows.
#[derive(Debug, Clone, Default)]
pub enum Caller {
    /// No stage of this module authenticated the request: a later stage reads the identity
    /// headers an earlier filter (token-auth) set.
    #[default]
    FromHeaders,
    /// A stage of this module authenticated it (None: a public route, no caller).
    Known(Option<Identity>),
}

/// One request as the stages see it. Headers are read from the host once; a stage that
/// changes a header does it through [`Request::set_header`], which changes the host's map and
/// this copy alike, so later stages see what the upstream will see.
pub struct Request {
    /// The stream's context id.
    pub ctx: u32,
    headers: HeaderPairs,
    /// The whole request body, once a stage asked for it and it arrived (empty before).
    pub body: Vec<u8>,
    pub caller: Caller,
}

impl Request {
    pub(crate) fn new(ctx: u32, headers: HeaderPairs) -> Self {
        Request {
            ctx,
            headers,
            body: Vec::new(),
            caller: Caller::FromHeaders,
        }
    }

    /// The request headers as bytes (lowercase names, repeats kept).
    pub fn headers(&self) -> &HeaderPairs {
        &self.headers
    }

    /// The request's text headers, once every header `reads` names is text; one that is not
    /// UTF-8 is refused (400) with the log line and counter of `proxy_glue::refuse_not_text`.
    /// The pairs are the request's own (no copy; changed by [`Request::set_header`]), shared
    /// by every stage; they include headers `reads` does not name, which the stage's engine
    /// never looks up (see `HeaderPairs::text_pairs`).
    pub fn text_headers(
        &self,
        filter: &str,
        reads: impl Fn(&str) -> bool,
    ) -> Result<&[(String, String)], DenyReason> {
        self.headers
            .text_pairs(reads)
            .map_err(|e| proxy_glue::refuse_not_text(filter, &e))
    }

    /// Sets (Some) or removes (None) a request header, upstream and in this copy.
    pub fn set_header(&mut self, name: &str, value: Option<&str>) -> Result<(), HostStatus> {
        let done = host::set_header(MapType::HttpRequestHeaders, name, value);
        match value {
            Some(v) => self.headers.set(name, v.as_bytes()),
            None => self.headers.remove(name),
        }
        done
    }

    /// [`Request::set_header`] of a text value, which this copy keeps without copying it.
    pub fn set_header_text(&mut self, name: String, value: String) -> Result<(), HostStatus> {
        let done = host::set_header(MapType::HttpRequestHeaders, &name, Some(&value));
        self.headers.set_text(name, value);
        done
    }

    /// Replaces the whole request body (after `NeedBody`, while the driver holds it), upstream
    /// and in this copy; a `content-length` the request carries is set to the new length.
    pub fn replace_body(&mut self, body: Vec<u8>) -> Result<(), HostStatus> {
        host::write_buffer(BufferType::HttpRequestBody, 0, self.body.len(), &body)?;
        if self.headers.first("content-length").is_some() {
            self.set_header("content-length", Some(&body.len().to_string()))?;
        }
        self.body = body;
        Ok(())
    }
}
