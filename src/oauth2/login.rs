//! A backend login with an OAuth2 account, shared by the IMAP (`pop3`) and SMTP clients:
//! one token, and if the server rejects it, one renewal and one retry (issue 10, item 4).
//! Also the one log line that tells the admin what to run when the account fails.

use super::{AccessToken, TokenError, TokenSource};
use std::path::{Path, PathBuf};

/// The default of `--oauth2-dir`, left out of the commands suggested to the admin.
const DEFAULT_DIR: &str = "/var/lib/legacy-mail-proxy/oauth2";

/// The account a backend logs in with, as configured (`--imap-oauth2-account`,
/// `--smtp-oauth2-account`), and its token source, or why it could not be opened. The
/// failure is kept rather than ending the process at startup: the client still gets a
/// protocol dialogue, and a temporary error at login (`[SYS/TEMP]`, `454`).
pub struct Account {
    name: String,
    dir: PathBuf,
    source: Result<Box<dyn TokenSource>, TokenError>,
}

/// How one login attempt with a token went, short of success.
#[derive(Debug)]
pub enum Refusal<E> {
    /// The server refused the token (an error challenge saying `invalid_token` / `401`, or
    /// a plain authentication failure): worth one renewal.
    Rejected(String),
    /// Any other failure, in the protocol's own terms; not retried.
    Failed(E),
}

/// Why a login with the account did not succeed.
#[derive(Debug)]
pub enum Failure<E> {
    /// No usable token, or the server refused a renewed one too ([`TokenError::Revoked`]).
    Token(TokenError),
    Failed(E),
}

impl Account {
    /// Opens `name` in the token store under `dir`.
    pub fn open(
        dir: &Path,
        name: &str,
        tls: crate::tls::TlsOptions,
        timeouts: crate::net::Timeouts,
    ) -> Account {
        Account::new(dir, name, open_stored(dir, name, tls, timeouts))
    }

    /// An account with a given source (tests use an in-memory one).
    pub fn new(
        dir: &Path,
        name: &str,
        source: Result<Box<dyn TokenSource>, TokenError>,
    ) -> Account {
        Account {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            source,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The backend user name, once the account could be opened.
    pub fn user(&self) -> Option<&str> {
        self.source.as_ref().ok().map(|source| source.user())
    }

    /// Runs `attempt` with the account's user and token. If the server rejects the token,
    /// asks the source for a renewed one (exactly one refresh for all processes, see
    /// [`TokenSource::renew`]) and runs `attempt` once more; a second rejection means the
    /// authorization is gone ([`TokenError::Revoked`]). `attempt` keeps or replaces its
    /// connection between the two calls itself.
    pub fn login<T, E>(
        &mut self,
        mut attempt: impl FnMut(&str, &AccessToken) -> Result<T, Refusal<E>>,
    ) -> Result<T, Failure<E>> {
        let source = match &mut self.source {
            Ok(source) => source,
            Err(e) => return Err(Failure::Token(e.clone())),
        };
        let user = source.user().to_string();
        let token = source.token().map_err(Failure::Token)?;
        let why = match attempt(&user, &token) {
            Ok(done) => return Ok(done),
            Err(Refusal::Failed(e)) => return Err(Failure::Failed(e)),
            Err(Refusal::Rejected(why)) => why,
        };
        // Debug only: a failure that follows gets the one line the admin needs.
        log::debug!(
            "oauth2 account {}: the server rejected the access token ({why}); renewing it once",
            self.name
        );
        let renewed = source.renew(&token).map_err(Failure::Token)?;
        match attempt(&user, &renewed) {
            Ok(done) => Ok(done),
            Err(Refusal::Failed(e)) => Err(Failure::Failed(e)),
            Err(Refusal::Rejected(why)) => Err(Failure::Token(TokenError::Revoked(format!(
                "the server rejected a renewed token too ({why})"
            )))),
        }
    }

    /// The one log line for a failed token: what happened, and what the admin should run.
    /// Never contains a token ([`TokenError`]'s text has none).
    pub fn advice(&self, error: &TokenError) -> String {
        let dir = match self.dir == Path::new(DEFAULT_DIR) {
            true => String::new(),
            false => format!(" --oauth2-dir {}", self.dir.display()),
        };
        let name = &self.name;
        let todo = match error {
            TokenError::Revoked(_) => format!(
                "the admin must authorize it again: legacy-mail-proxy oauth2 authorize{dir} \
                 {name} (details: legacy-mail-proxy oauth2 status{dir} {name})"
            ),
            TokenError::Unavailable(_) => format!(
                "retried at the next login; check the network and the provider, and \
                 legacy-mail-proxy oauth2 status{dir} {name}"
            ),
            TokenError::Broken(_) => {
                format!("check the account with: legacy-mail-proxy oauth2 status{dir} {name}")
            }
        };
        format!("oauth2 account {name}: {error}; {todo}")
    }
}

/// The account in the token store shared by every process (`store.rs`).
fn open_stored(
    dir: &Path,
    name: &str,
    tls: crate::tls::TlsOptions,
    timeouts: crate::net::Timeouts,
) -> Result<Box<dyn TokenSource>, TokenError> {
    let account = super::store::StoredAccount::open(dir, name, tls, timeouts)?;
    Ok(Box::new(account))
}

#[cfg(test)]
pub mod testing {
    //! An in-memory token source for the IMAP and SMTP tests.

    use super::*;
    use std::cell::RefCell;
    use std::rc::Rc;

    /// Hands out `tokens` in order: the first from `token()`, each later one from
    /// `renew()`. `renewals` counts the calls to `renew`, `fail` makes every call fail.
    #[derive(Clone, Default)]
    pub struct Tokens {
        user: String,
        pub state: Rc<RefCell<State>>,
    }

    #[derive(Default)]
    pub struct State {
        pub tokens: Vec<String>,
        pub current: usize,
        pub renewals: usize,
        pub fail: Option<TokenError>,
    }

    impl Tokens {
        pub fn new(user: &str, tokens: &[&str]) -> Tokens {
            let state = State {
                tokens: tokens.iter().map(|t| t.to_string()).collect(),
                ..State::default()
            };
            Tokens {
                user: user.into(),
                state: Rc::new(RefCell::new(state)),
            }
        }

        pub fn account(&self) -> Account {
            Account::new(Path::new(DEFAULT_DIR), "work", Ok(Box::new(self.clone())))
        }

        pub fn renewals(&self) -> usize {
            self.state.borrow().renewals
        }
    }

    impl TokenSource for Tokens {
        fn user(&self) -> &str {
            &self.user
        }

        fn token(&mut self) -> Result<AccessToken, TokenError> {
            let state = self.state.borrow();
            if let Some(e) = &state.fail {
                return Err(e.clone());
            }
            Ok(AccessToken::new(state.tokens[state.current].clone()))
        }

        fn renew(&mut self, rejected: &AccessToken) -> Result<AccessToken, TokenError> {
            let mut state = self.state.borrow_mut();
            state.renewals += 1;
            if let Some(e) = &state.fail {
                return Err(e.clone());
            }
            assert_eq!(rejected.secret(), state.tokens[state.current]);
            state.current = (state.current + 1).min(state.tokens.len() - 1);
            Ok(AccessToken::new(state.tokens[state.current].clone()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::Tokens;
    use super::*;

    #[test]
    fn a_rejected_token_is_renewed_once_and_a_second_rejection_is_revoked() {
        let tokens = Tokens::new("me@example.com", &["old", "new"]);
        let mut account = tokens.account();
        let mut seen = Vec::new();
        let result: Result<(), Failure<()>> = account.login(|user, token| {
            seen.push((user.to_string(), token.secret().to_string()));
            match token.secret() {
                "new" => Ok(()),
                _ => Err(Refusal::Rejected("expired".into())),
            }
        });
        assert!(result.is_ok());
        assert_eq!(
            seen,
            [
                ("me@example.com".into(), "old".into()),
                ("me@example.com".into(), "new".into())
            ]
        );
        assert_eq!(tokens.renewals(), 1);

        let result: Result<(), Failure<()>> =
            account.login(|_, _| Err(Refusal::Rejected("no".into())));
        assert!(
            matches!(&result, Err(Failure::Token(TokenError::Revoked(why))) if why.contains("renewed")),
            "{result:?}"
        );
        assert_eq!(tokens.renewals(), 2);
    }

    #[test]
    fn other_failures_and_token_errors_are_not_retried() {
        let tokens = Tokens::new("u", &["t"]);
        let mut account = tokens.account();
        let result: Result<(), Failure<&str>> = account.login(|_, _| Err(Refusal::Failed("down")));
        assert!(matches!(result, Err(Failure::Failed("down"))));
        tokens.state.borrow_mut().fail = Some(TokenError::Unavailable("idp down".into()));
        let mut calls = 0;
        let result: Result<(), Failure<()>> = account.login(|_, _| {
            calls += 1;
            Ok(())
        });
        assert!(matches!(
            result,
            Err(Failure::Token(TokenError::Unavailable(_)))
        ));
        assert_eq!((calls, tokens.renewals()), (0, 0));
    }

    #[test]
    fn advice_names_the_command_to_run() {
        let account = Account::new(
            Path::new("/srv/tokens"),
            "work",
            Err(TokenError::Broken("corrupted".into())),
        );
        let line = account.advice(&TokenError::Revoked("invalid_grant".into()));
        assert!(
            line.contains("legacy-mail-proxy oauth2 authorize --oauth2-dir /srv/tokens work"),
            "{line}"
        );
        let default = Tokens::new("u", &["t"]).account();
        let line = default.advice(&TokenError::Broken("corrupted".into()));
        assert!(
            line.ends_with("legacy-mail-proxy oauth2 status work"),
            "{line}"
        );
    }
}
