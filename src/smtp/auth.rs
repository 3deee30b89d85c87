//! Who may send: client authentication (RFC 4954 with SASL PLAIN, RFC 4616, and LOGIN,
//! draft-murchison-sasl-login) and the allowed-senders list.

use crate::frontend::login::client_matches;
use std::fmt;

/// How clients are authenticated.
#[derive(Clone)]
pub enum ClientAuth {
    /// No AUTH: anyone who can reach the port may send (an open relay for that network).
    None,
    /// AUTH is checked against one configured account; MAIL before AUTH gets `530`.
    Local { user: String, password: String },
    /// The client's AUTH credentials log in to the backend, which decides.
    Passthrough,
    /// Like `Local`, with several user names (`--accounts`: each account's name, and
    /// --client-user), each with its password.
    Users(Vec<(String, String)>),
}

/// Written by hand: the password must never reach a log line through `{:?}` (a derived
/// `Debug` would also print it inside `session::Config`).
impl fmt::Debug for ClientAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientAuth::None => f.write_str("None"),
            ClientAuth::Local { user, .. } => f
                .debug_struct("Local")
                .field("user", user)
                .finish_non_exhaustive(),
            ClientAuth::Passthrough => f.write_str("Passthrough"),
            ClientAuth::Users(users) => f
                .debug_tuple("Users")
                .field(&users.iter().map(|(user, _)| user).collect::<Vec<_>>())
                .finish(),
        }
    }
}

impl ClientAuth {
    pub fn enabled(&self) -> bool {
        !matches!(self, ClientAuth::None)
    }

    /// Checks credentials for `Local`, comparing without early exit.
    pub fn check_local(&self, user: &str, password: &str) -> bool {
        match self {
            ClientAuth::Local {
                user: u,
                password: p,
            } => client_matches((u, p), user, password),
            ClientAuth::Users(users) => {
                // Every entry is compared, so timing says nothing about which matched.
                users.iter().fold(false, |any, (u, p)| {
                    any | client_matches((u, p), user, password)
                })
            }
            _ => false,
        }
    }
}

/// The `--allowed-senders` list: addresses, or `@domain` for a whole domain.
#[derive(Debug, Clone, Default)]
pub struct AllowedSenders {
    entries: Vec<String>,
}

impl AllowedSenders {
    pub fn new<S: AsRef<str>>(entries: &[S]) -> Self {
        AllowedSenders {
            entries: entries
                .iter()
                .map(|e| e.as_ref().trim().to_ascii_lowercase())
                .filter(|e| !e.is_empty())
                .collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// An empty list allows everyone. Matching ignores ASCII case (local parts are
    /// case-sensitive in theory, never in practice). The null sender matches nothing.
    pub fn allows(&self, address: &str) -> bool {
        if self.entries.is_empty() {
            return true;
        }
        let address = address.to_ascii_lowercase();
        let domain = address.rsplit_once('@').map(|(_, d)| d);
        self.entries
            .iter()
            .any(|entry| match entry.strip_prefix('@') {
                Some(d) => domain == Some(d),
                None => *entry == address,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowed_senders_match_addresses_and_domains() {
        let list = AllowedSenders::new(&["Scanner@Lan.example", "@corp.example", " "]);
        assert!(list.allows("scanner@lan.example"));
        assert!(list.allows("anyone@CORP.example"));
        assert!(!list.allows("other@lan.example"));
        assert!(!list.allows("x@sub.corp.example"));
        assert!(!list.allows("corp.example@evil.example"));
        assert!(!list.allows(""));
        assert!(AllowedSenders::new::<&str>(&[]).allows(""));
    }

    #[test]
    fn local_check_needs_both_parts() {
        let auth = ClientAuth::Local {
            user: "dev".into(),
            password: "pw".into(),
        };
        assert!(auth.check_local("dev", "pw"));
        assert!(!auth.check_local("dev", "pW"));
        assert!(!auth.check_local("Dev", "pw"));
        assert!(!ClientAuth::Passthrough.check_local("dev", "pw"));
    }

    #[test]
    fn debug_output_never_shows_the_password() {
        let auth = ClientAuth::Local {
            user: "dev".into(),
            password: "hunter2".into(),
        };
        let mut config = crate::smtp::session::Config::new("mx.test");
        config.auth = auth.clone();
        for text in [format!("{auth:?}"), format!("{config:?}")] {
            assert!(text.contains("dev") && !text.contains("hunter2"), "{text}");
        }
    }
}
