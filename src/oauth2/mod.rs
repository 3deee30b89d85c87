//! OAuth 2.0 for the backends (Microsoft 365, Gmail and any standard provider): what a
//! backend login needs from it, behind one small trait.
//!
//! A login asks a [`TokenSource`] for the account's user name and a bearer token, sends them
//! with SASL XOAUTH2 or OAUTHBEARER (RFC 7628), and, if the server rejects the token, asks
//! once for a renewed one ([`TokenSource::renew`]) and retries once. Where tokens come from
//! (a token store shared by every process, refreshed under a lock) is behind the trait, so
//! the IMAP and SMTP clients are tested with an in-memory source as well as the real one.

use std::fmt;

/// A bearer token. Its `Debug` and `Display` never show the value: tokens must not reach
/// logs, error messages or `ps`.
#[derive(Clone, PartialEq, Eq)]
pub struct AccessToken(String);

impl AccessToken {
    pub fn new(value: String) -> Self {
        AccessToken(value)
    }

    /// The token itself, for the SASL message only.
    pub fn secret(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AccessToken(********)")
    }
}

/// Why no usable token could be had. Never the client's fault: a login that fails for one
/// of these reasons is answered `-ERR [SYS/TEMP]` / `454 4.7.0`, never `[AUTH]` / `535`.
/// The text never contains a token; it says what the admin should do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenError {
    /// The identity provider could not be reached or failed (network, 5xx, timeout): may
    /// pass by itself.
    Unavailable(String),
    /// The grant is gone (`invalid_grant`: refresh token revoked or expired, consent
    /// withdrawn), or the server rejected even a fresh token: the admin must authorize the
    /// account again (`legacy-mail-proxy oauth2 authorize …`).
    Revoked(String),
    /// The account cannot be used as configured: no such account, unreadable or corrupted
    /// token file, bad client secret file.
    Broken(String),
}

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenError::Unavailable(why) => write!(f, "OAuth2 provider unavailable: {why}"),
            TokenError::Revoked(why) => write!(f, "OAuth2 authorization lost: {why}"),
            TokenError::Broken(why) => write!(f, "OAuth2 account unusable: {why}"),
        }
    }
}

impl std::error::Error for TokenError {}

/// Where a backend login gets its OAuth2 identity and token.
pub trait TokenSource {
    /// The backend user name the token belongs to (XOAUTH2 `user=`, OAUTHBEARER `a=`):
    /// usually the mailbox's e-mail address.
    fn user(&self) -> &str;

    /// A token that is valid now. The real source refreshes ahead of expiry, once for all
    /// processes, and otherwise returns the stored token without any network traffic.
    fn token(&mut self) -> Result<AccessToken, TokenError>;

    /// The server rejected `rejected`: a newer token. If another process has already
    /// replaced `rejected`, that one is returned without a refresh; otherwise exactly one
    /// refresh is made. The caller retries its login once with the result, and reports a
    /// second rejection as [`TokenError::Revoked`].
    fn renew(&mut self, rejected: &AccessToken) -> Result<AccessToken, TokenError>;
}

pub mod admin;
pub mod grant;
pub mod http;
pub mod login;
pub mod provider;
pub mod sasl;
pub mod store;
