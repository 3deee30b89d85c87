//! The [`Relay`] used with an accounts file: each transaction goes through the backend of
//! its sender's account.
//!
//! At MAIL the sender (or, under `--client-auth local`, the AUTH user name) picks the
//! account; that account's relay is opened on first use and kept for the session's later
//! transactions, so one session may send through several backends. A sender without an
//! account goes to the command-line backend when `--smtp-host` also gives one, and is
//! refused with `550 5.7.1` otherwise. Every other call goes to the relay of the open
//! transaction.

use super::pop::PopGate;
use super::{Account, Accounts};
use crate::smtp::headers::HeaderEdits;
use crate::smtp::relay::{Relay, RelayError, RelayResult};
use crate::smtp::reply::{Enhanced, Reply};
use std::io::Read;

/// Opens the relay for an account (the real one builds an `SmtpRelay`; tests an in-memory
/// relay).
pub type Connect = Box<dyn FnMut(&Account) -> Result<Box<dyn Relay>, RelayError>>;

/// Which relay the open transaction uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    /// The command-line backend (no account).
    Default,
    /// `relays[i]`.
    Account(usize),
}

pub struct AccountRouter {
    accounts: Accounts,
    connect: Connect,
    /// The command-line backend, for senders without an account.
    default: Option<Box<dyn Relay>>,
    /// Relays opened in this session, by account name.
    relays: Vec<(String, Box<dyn Relay>)>,
    route: Option<Route>,
    /// The AUTH user name (--client-auth local).
    user: Option<String>,
    /// The account the last MAIL chose, kept when its backend failed or the transaction
    /// was reset (the queue stores it).
    chosen: Option<String>,
    /// Set by the queue ([`Relay::route_to`]): the next MAIL goes this way.
    forced: Option<Forced>,
    pop: PopGate,
}

/// Where `queue run` sends a queued message.
enum Forced {
    /// The command-line backend.
    Default,
    /// The named account, whatever the sender.
    Account(String),
}

impl AccountRouter {
    pub fn new(
        accounts: Accounts,
        connect: Connect,
        default: Option<Box<dyn Relay>>,
        pop: PopGate,
    ) -> Self {
        AccountRouter {
            accounts,
            connect,
            default,
            relays: Vec::new(),
            route: None,
            user: None,
            chosen: None,
            forced: None,
            pop,
        }
    }

    fn current(&mut self) -> Option<&mut Box<dyn Relay>> {
        match self.route? {
            Route::Default => self.default.as_mut(),
            Route::Account(i) => self.relays.get_mut(i).map(|(_, relay)| relay),
        }
    }

    fn current_ref(&self) -> Option<&dyn Relay> {
        match self.route? {
            Route::Default => self.default.as_deref(),
            Route::Account(i) => self.relays.get(i).map(|(_, relay)| relay.as_ref()),
        }
    }

    fn current_account(&self) -> Option<&Account> {
        let Some(Route::Account(i)) = self.route else {
            return None;
        };
        let name = &self.relays.get(i)?.0;
        self.accounts.accounts.iter().find(|a| &a.name == name)
    }

    /// The relay for `account`, opened now if this session has not used it yet.
    fn relay_for(&mut self, account: &Account) -> Result<usize, RelayError> {
        if let Some(i) = self.relays.iter().position(|(n, _)| *n == account.name) {
            return Ok(i);
        }
        let relay = (self.connect)(account)?;
        self.relays.push((account.name.clone(), relay));
        Ok(self.relays.len() - 1)
    }

    /// MAIL through the command-line backend (a sender without an account).
    fn mail_default(&mut self, from: &str) -> RelayResult {
        let Some(relay) = &mut self.default else {
            return Err(RelayError::Local(
                "no command-line backend (--smtp-host) for a message without an account".into(),
            ));
        };
        let reply = relay.mail(from)?;
        self.route = Some(Route::Default);
        Ok(reply)
    }

    /// MAIL through `account`: POP-before-SMTP when it asks for it, then its own backend,
    /// with its `returnpath` as the upstream sender (never for the null sender, which
    /// must stay null: it marks a bounce).
    fn mail_through(&mut self, account: &Account, from: &str) -> RelayResult {
        self.chosen = Some(account.name.clone());
        if let Err(e) = self.pop.before_smtp(account, self.accounts.wait_after_pop) {
            log::warn!(
                "smtp: account [{}]: POP-before-SMTP failed: {e}",
                account.name
            );
            return Ok(Reply::new(
                451,
                Enhanced::new(4, 7, 0),
                "POP-before-SMTP login failed; try again later",
            ));
        }
        let i = self
            .relay_for(account)
            .map_err(|e| in_account(&account.name, e))?;
        let upstream = match account.return_path.as_deref() {
            Some(path) if !from.is_empty() => path,
            _ => from,
        };
        let reply = self.relays[i]
            .1
            .mail(upstream)
            .map_err(|e| in_account(&account.name, e))?;
        log::debug!(
            "smtp: sender <{from}> goes through account [{}] as <{upstream}>",
            account.name
        );
        self.route = Some(Route::Account(i));
        Ok(reply)
    }

    /// Whether the authenticated user may send as `from`: any sender for a user who is not
    /// an account (--client-user), else only the user's account and its aliases.
    fn user_may_send_as(&self, from: &str) -> bool {
        let Some(user) = &self.user else {
            return true;
        };
        let Some(own) = self.accounts.find(user) else {
            return true;
        };
        self.accounts
            .find(from)
            .is_some_and(|found| found.account().name == own.account().name)
    }
}

fn not_allowed(text: String) -> Reply {
    Reply::new(550, Enhanced::new(5, 7, 1), text)
}

/// Names the account in an error, so the log says whose login or server failed.
fn in_account(name: &str, error: RelayError) -> RelayError {
    let named = |why: String| format!("account [{name}]: {why}");
    match error {
        RelayError::Unavailable(why) => RelayError::Unavailable(named(why)),
        RelayError::Lost(why) => RelayError::Lost(named(why)),
        RelayError::Protocol(why) => RelayError::Protocol(named(why)),
        RelayError::LoginRefused(why) => RelayError::LoginRefused(named(why)),
        RelayError::Local(why) => RelayError::Local(named(why)),
        RelayError::OAuth2(why) => RelayError::OAuth2(named(why)),
    }
}

impl Relay for AccountRouter {
    /// Passthrough logins have no account to go to; the command line refuses the
    /// combination, so this is only reached with a default backend.
    fn login(&mut self, user: &str, password: &str) -> RelayResult {
        match &mut self.default {
            Some(relay) => relay.login(user, password),
            None => Err(RelayError::Local(
                "--client-auth passthrough does not go with --accounts".into(),
            )),
        }
    }

    fn mail(&mut self, from: &str) -> RelayResult {
        self.route = None;
        self.chosen = None;
        match self.forced.take() {
            None => {}
            Some(Forced::Default) => return self.mail_default(from),
            Some(Forced::Account(name)) => {
                let Some(account) = self.accounts.accounts.iter().find(|a| a.name == name) else {
                    return Err(RelayError::Local(format!(
                        "account [{name}] is no longer in {}",
                        self.accounts.path.display()
                    )));
                };
                let account = account.clone();
                return self.mail_through(&account, from);
            }
        }
        if !self.user_may_send_as(from) {
            let user = self.user.as_deref().unwrap_or_default();
            log::warn!(
                "smtp: sender <{from}> refused: not the account {user} logged in as, nor one of its aliases"
            );
            return Ok(not_allowed(format!(
                "Sender address <{from}> not allowed for this login"
            )));
        }
        let Some(found) = self.accounts.find(from) else {
            if self.default.is_some() {
                log::debug!("smtp: sender <{from}> has no account: the command-line backend");
                return self.mail_default(from);
            }
            log::warn!(
                "smtp: sender <{from}> refused: no account for it in {}",
                self.accounts.path.display()
            );
            return Ok(not_allowed(format!(
                "Sender address <{from}> has no account on this gateway"
            )));
        };
        let account = found.account().clone();
        self.mail_through(&account, from)
    }

    fn rcpt(&mut self, to: &str) -> RelayResult {
        if let Some(account) = self.current_account()
            && !account.allowed_recipients.allows(to)
        {
            log::warn!(
                "smtp: recipient <{to}> refused: not in allowedrecipients of account [{}]",
                account.name
            );
            return Ok(not_allowed(format!(
                "Recipient <{to}> not allowed for this sender"
            )));
        }
        match self.current() {
            Some(relay) => relay.rcpt(to),
            None => Err(RelayError::Local("RCPT without a transaction".into())),
        }
    }

    fn data(&mut self, message: &mut dyn Read, len: u64) -> RelayResult {
        // The route stays until the next MAIL, so that the message's log line can still
        // name its account.
        match self.current() {
            Some(relay) => relay.data(message, len),
            None => Err(RelayError::Local("DATA without a transaction".into())),
        }
    }

    fn refusal_before_data(&self) -> Option<Reply> {
        self.current_ref()?.refusal_before_data()
    }

    fn keepalive(&mut self) -> Result<(), RelayError> {
        match self.current() {
            Some(relay) => relay.keepalive(),
            None => Ok(()),
        }
    }

    fn reset(&mut self) {
        if let Some(relay) = self.current() {
            relay.reset();
        }
        self.route = None;
    }

    fn quit(&mut self) {
        for (_, relay) in &mut self.relays {
            relay.quit();
        }
        if let Some(relay) = &mut self.default {
            relay.quit();
        }
    }

    fn authenticated(&mut self, user: &str) {
        self.user = Some(user.to_string());
    }

    fn header_edits(&self, base: &HeaderEdits) -> Option<HeaderEdits> {
        let account = self.current_account()?;
        if account.rewrite_from.is_none() && account.reply_to.is_none() {
            return None;
        }
        Some(HeaderEdits {
            rewrite_from: account.rewrite_from.clone().or(base.rewrite_from.clone()),
            reply_to: account.reply_to.clone().or(base.reply_to.clone()),
            id_domain: base.id_domain.clone(),
        })
    }

    fn account(&self) -> Option<&str> {
        self.chosen.as_deref()
    }

    fn route_to(&mut self, account: Option<&str>) {
        self.forced = Some(match account {
            Some(name) => Forced::Account(name.to_string()),
            None => Forced::Default,
        });
    }
}

/// What an account's backend takes from the command line when the file does not say.
#[derive(Debug, Clone)]
pub struct Defaults {
    /// --ca-file (an account's `cafile` replaces it) and --danger-accept-invalid-certs.
    pub tls: crate::tls::TlsOptions,
    pub timeouts: crate::net::Timeouts,
    /// --hostname, for EHLO when the account has no `localhostname`.
    pub hello: String,
    pub oauth2_dir: std::path::PathBuf,
    pub recipient_check: crate::smtp::backend::RecipientCheck,
}

impl Defaults {
    /// The submission server of `account`, as a [`Backend`](crate::smtp::backend::Backend).
    pub fn backend(&self, account: &Account) -> anyhow::Result<crate::smtp::backend::Backend> {
        use crate::net::TlsMode;
        let tls = crate::tls::TlsOptions {
            ca_file: account.ca_file.clone().or(self.tls.ca_file.clone()),
            ..self.tls.clone()
        };
        let tls_connector = match account.smtp_tls {
            TlsMode::None => {
                log::warn!(
                    "smtp: account [{}]: smtpsecurity none: the password and every message \
                     cross the network to {}:{} unencrypted",
                    account.name,
                    account.smtp_host,
                    account.smtp_port
                );
                None
            }
            _ => Some(tls.connector()?),
        };
        let oauth2 = account.oauth2_account.as_ref().map(|name| {
            crate::oauth2::login::Account::open(&self.oauth2_dir, name, tls.clone(), self.timeouts)
        });
        Ok(crate::smtp::backend::Backend {
            host: account.smtp_host.clone(),
            port: account.smtp_port,
            tls: account.smtp_tls,
            tls_connector,
            timeouts: self.timeouts,
            end_of_data_timeout: crate::smtp::backend::END_OF_DATA_TIMEOUT,
            hello: account.hello.clone().unwrap_or(self.hello.clone()),
            credentials: account
                .smtp_login
                .as_ref()
                .map(|(user, password)| (user.clone(), password.value.clone())),
            oauth2,
            recipient_check: self.recipient_check,
        })
    }

    /// Opens real `SmtpRelay`s.
    pub fn connect(self) -> Connect {
        Box::new(move |account| {
            let backend = self
                .backend(account)
                .map_err(|e| RelayError::Local(format!("{e:#}")))?;
            Ok(Box::new(crate::smtp::backend::SmtpRelay::new(backend)))
        })
    }

    /// Logs in to POP3 servers for real.
    pub fn pop_login(&self) -> super::pop::Login {
        let (tls, timeouts) = (self.tls.clone(), self.timeouts);
        Box::new(move |account, pop| super::pop::login(account, pop, &tls, timeouts))
    }
}

#[cfg(test)]
#[path = "router_tests.rs"]
mod tests;
