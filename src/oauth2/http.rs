//! HTTP to the identity provider: oauth2's `SyncHttpClient` over a ureq 3 agent on
//! native-tls, trusting exactly what the mail backends trust (`--ca-file`, or the system
//! roots; `--danger-accept-invalid-certs`), within the backend timeouts.
//!
//! oauth2's own `ureq` feature is written for ureq 2, whose TLS is rustls: a second TLS
//! stack with its own roots, which `--ca-file` would not reach. ureq 3 speaks the `http`
//! crate's types, which oauth2 5 uses too, so the adapter is a few lines.
//!
//! Redirects are never followed: a token endpoint answers, it does not redirect, and a
//! redirect could send a client secret or a refresh token somewhere else, perhaps in clear.

use crate::net::Timeouts;
use crate::tls::TlsOptions;
use oauth2::{HttpRequest, HttpResponse};
use std::sync::Arc;

/// Largest token endpoint answer read (tokens are a few kilobytes).
const MAX_RESPONSE: u64 = 1 << 20;

/// A blocking HTTP client for oauth2's grants. Built only when a grant is about to be made,
/// so a process whose token is still fresh builds no TLS connector.
pub struct Client {
    agent: ureq::Agent,
}

/// Why an HTTP exchange failed. The text names the endpoint's host, never a token: ureq's
/// errors do not carry request bodies.
#[derive(Debug)]
pub struct HttpError(pub String);

impl std::fmt::Display for HttpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for HttpError {}

impl Client {
    pub fn new(tls: &TlsOptions, timeouts: Timeouts) -> anyhow::Result<Client> {
        use ureq::tls::{Certificate, RootCerts, TlsConfig, TlsProvider};
        let roots = match tls.ca_certificates()? {
            Some(certs) => {
                let mut ders = Vec::new();
                for cert in certs {
                    ders.push(Certificate::from_der(&cert.to_der()?).to_owned());
                }
                RootCerts::Specific(Arc::new(ders))
            }
            // native-tls's own roots: the system's, as for IMAP and SMTP.
            None => RootCerts::PlatformVerifier,
        };
        let tls_config = TlsConfig::builder()
            .provider(TlsProvider::NativeTls)
            .root_certs(roots)
            .disable_verification(tls.danger_accept_invalid_certs)
            .build();
        let agent = ureq::Agent::config_builder()
            .tls_config(tls_config)
            .timeout_connect(Some(timeouts.connect))
            .timeout_resolve(Some(timeouts.connect))
            .timeout_per_read(Some(timeouts.io))
            .timeout_per_write(Some(timeouts.io))
            // A grant is a handful of round trips at most: bound the whole call too.
            .timeout_global(Some(timeouts.connect + timeouts.io))
            .max_redirects(0)
            // 4xx bodies are OAuth error responses (`invalid_grant`): oauth2 parses them.
            .http_status_as_error(false)
            .proxy(None)
            .user_agent(concat!("legacy-mail-proxy/", env!("CARGO_PKG_VERSION")))
            .build()
            .new_agent();
        Ok(Client { agent })
    }
}

impl oauth2::SyncHttpClient for Client {
    type Error = HttpError;

    fn call(&self, request: HttpRequest) -> Result<HttpResponse, HttpError> {
        let host = request.uri().host().unwrap_or("?").to_string();
        let response = self
            .agent
            .run(request)
            .map_err(|e| HttpError(format!("{host}: {e}")))?;
        let status = response.status();
        // A server error is an outage, not an answer about the grant: reported as such
        // instead of as an unparsable error body.
        if status.is_server_error() {
            return Err(HttpError(format!("{host} answered HTTP {status}")));
        }
        if status.is_redirection() {
            return Err(HttpError(format!(
                "{host} answered HTTP {status} (a redirect): check the endpoint URL"
            )));
        }
        let (parts, body) = response.into_parts();
        let body = body
            .into_with_config()
            .limit(MAX_RESPONSE)
            .read_to_vec()
            .map_err(|e| HttpError(format!("{host}: {e}")))?;
        Ok(HttpResponse::from_parts(parts, body))
    }
}
