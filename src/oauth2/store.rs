//! The token store: one JSON file per account in the OAuth2 directory, shared by every
//! process, and the refresh protocol that keeps its tokens fresh once for all of them.
//!
//! - A file is written atomically: a temporary file in the same directory (mode 0600),
//!   fsync, rename over the old one, fsync of the directory. A reader without the lock
//!   sees the old file or the new one, never half of one.
//! - A refresh happens only under the account's `flock` lock (`ACCOUNT.lock`). Whoever gets
//!   it reads the file again and refreshes only if the token is still due; the others wait
//!   (bounded) and then find the new token. So a refresh token is used once, never by two
//!   processes at a time: Microsoft rotates refresh tokens, and a second use of an old one
//!   can revoke the whole grant. A rotated refresh token is on disk before the new access
//!   token is handed out.
//! - A token is due `refresh_margin` seconds before it expires, so that a login rarely waits
//!   for the provider. If the provider is down while the stored token is still valid, that
//!   token is used.
//!
//! Neither the file's tokens nor the client secret ever reach an error text or a log line.

use super::provider::{Endpoints, Flow};
use super::{AccessToken, TokenError, TokenSource};
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions, TryLockError};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Refresh this long before expiry unless the account says otherwise.
pub const DEFAULT_REFRESH_MARGIN: u64 = 300;

/// A token or refresh token as stored: `Debug` never shows it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("********")
    }
}

/// Where the client secret is read from each time it is needed. The secret itself is
/// never in the account file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SecretSource {
    /// A public client (device or code flow without a secret).
    None,
    /// A file readable by the service user.
    File(PathBuf),
    /// A systemd credential name (`LoadCredential=`), read from `$CREDENTIALS_DIRECTORY`.
    Credential(String),
}

/// How the client authenticates at the token endpoint (RFC 6749 §2.3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ClientAuth {
    /// HTTP Basic (`client_secret_basic`).
    #[default]
    Basic,
    /// In the form body (`client_secret_post`).
    Post,
}

/// One account's file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    pub provider: Endpoints,
    pub client_id: String,
    pub client_secret: SecretSource,
    #[serde(default)]
    pub client_auth: ClientAuth,
    pub scopes: Vec<String>,
    pub flow: Flow,
    /// The backend user name (XOAUTH2 `user=`), usually the mail address.
    pub user: String,
    #[serde(default = "default_margin")]
    pub refresh_margin: u64,
    #[serde(default)]
    pub refresh_token: Option<Secret>,
    #[serde(default)]
    pub access_token: Option<Secret>,
    /// Unix seconds. `None` when the provider gave no `expires_in`: then the token counts as
    /// due, and each process refreshes it (still one at a time, under the lock).
    #[serde(default)]
    pub expires_at: Option<u64>,
    #[serde(default)]
    pub last_refresh: Option<u64>,
    #[serde(default)]
    pub last_error: Option<String>,
    /// When `last_error` happened (Unix seconds).
    #[serde(default)]
    pub last_error_at: Option<u64>,
    /// The provider refused the grant (`invalid_grant`): no process tries the refresh
    /// token again, only `oauth2 refresh` or a new `oauth2 authorize` does.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub revoked: bool,
}

fn default_margin() -> u64 {
    DEFAULT_REFRESH_MARGIN
}

impl Account {
    /// The stored access token, if it is still valid `margin` seconds from `now`.
    fn token_valid_for(&self, now: u64, margin: u64) -> Option<AccessToken> {
        let token = self.access_token.as_ref()?;
        let expires = self.expires_at?;
        (now.saturating_add(margin) < expires).then(|| AccessToken::new(token.0.clone()))
    }

    /// The token if it is not yet due for a refresh: more than the refresh margin left, or
    /// more than half its lifetime when that is shorter. Without that cap, a token living
    /// less than the margin (a provider with short tokens, a large margin) would be due from
    /// the moment it arrives, and every process would refresh again, one after the other.
    fn fresh_token(&self, now: u64) -> Option<AccessToken> {
        let lifetime = match (self.last_refresh, self.expires_at) {
            (Some(issued), Some(expires)) => expires.saturating_sub(issued),
            _ => u64::MAX,
        };
        self.token_valid_for(now, self.refresh_margin.min(lifetime / 2))
    }

    /// The token if it has not expired (it may be inside the refresh margin).
    fn unexpired_token(&self, now: u64) -> Option<AccessToken> {
        self.token_valid_for(now, 0)
    }

    /// Takes a grant's result: a rotated refresh token replaces the old one, and a server
    /// that sends none keeps the old one valid (RFC 6749 §6).
    pub fn apply(&mut self, grant: Grant, now: u64) {
        self.access_token = Some(Secret(grant.access_token));
        self.expires_at = grant.expires_in.map(|d| now.saturating_add(d.as_secs()));
        if let Some(refresh) = grant.refresh_token {
            self.refresh_token = Some(Secret(refresh));
        }
        self.last_refresh = Some(now);
        self.last_error = None;
        self.last_error_at = None;
        self.revoked = false;
    }
}

/// What a token endpoint gave.
pub struct Grant {
    pub access_token: String,
    pub expires_in: Option<Duration>,
    pub refresh_token: Option<String>,
}

/// Gets a new access token for an account: the refresh grant, or client credentials again.
/// The real one speaks HTTP ([`super::grant::HttpEndpoint`]); tests count calls.
pub trait TokenEndpoint {
    fn renew(&self, name: &str, account: &Account) -> Result<Grant, TokenError>;
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// An account name is a file name: letters, digits, `.`, `_`, `-`, `@`, not starting with
/// a dot, so no name reaches outside the directory or hides as a temporary file.
pub fn check_name(account: &str) -> Result<(), TokenError> {
    let ok = !account.is_empty()
        && account.len() <= 128
        && !account.starts_with('.')
        && account
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-@".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(TokenError::Broken(format!(
            "{account:?} is not an account name (letters, digits, . _ - @)"
        )))
    }
}

/// The account files of one directory.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

/// Holds an account's refresh lock until dropped (the kernel drops it if the process dies).
pub struct RefreshLock {
    _file: File,
}

impl Store {
    pub fn new(dir: &Path) -> Store {
        Store {
            dir: dir.to_path_buf(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn path(&self, account: &str) -> PathBuf {
        self.dir.join(format!("{account}.json"))
    }

    fn lock_path(&self, account: &str) -> PathBuf {
        self.dir.join(format!("{account}.lock"))
    }

    /// The names of the accounts, sorted; none while the directory does not exist yet.
    pub fn list(&self) -> std::io::Result<Vec<String>> {
        let mut names = Vec::new();
        let entries = match std::fs::read_dir(&self.dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(names),
            other => other?,
        };
        for entry in entries {
            let name = entry?.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(account) = name.strip_suffix(".json")
                && check_name(account).is_ok()
            {
                names.push(account.to_string());
            }
        }
        names.sort();
        Ok(names)
    }

    pub fn read(&self, account: &str) -> Result<Account, TokenError> {
        check_name(account)?;
        let path = self.path(account);
        let text = match std::fs::read(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(TokenError::Broken(format!(
                    "no OAuth2 account {account:?} in {}: run `legacy-mail-proxy oauth2 authorize {account} …`",
                    self.dir.display()
                )));
            }
            Err(e) => {
                return Err(TokenError::Broken(format!(
                    "cannot read {}: {e}; it must be readable and writable by the service user (chown it, mode 0600)",
                    path.display()
                )));
            }
        };
        // serde_json's error names the position and the expected item, not the text
        // around it, so no token leaks through it.
        serde_json::from_slice(&text).map_err(|e| {
            TokenError::Broken(format!(
                "{} is corrupted ({e}): run `legacy-mail-proxy oauth2 authorize {account} …` again",
                path.display()
            ))
        })
    }

    /// Replaces the account's file atomically (see the module header).
    pub fn write(&self, account: &str, data: &Account) -> Result<(), TokenError> {
        check_name(account)?;
        let path = self.path(account);
        let broken = |what: &str, e: std::io::Error| {
            TokenError::Broken(format!(
                "cannot {what} in {}: {e}; the directory must be writable by the service user",
                self.dir.display()
            ))
        };
        self.create_dir()
            .map_err(|e| broken("create the directory", e))?;
        let json = serde_json::to_vec_pretty(data)
            .map_err(|e| TokenError::Broken(format!("cannot encode the account: {e}")))?;
        let temp = self
            .dir
            .join(format!(".{account}.json.{}.tmp", std::process::id()));
        let result = (|| {
            use std::os::unix::fs::OpenOptionsExt;
            let mut file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&temp)?;
            file.write_all(&json)?;
            file.write_all(b"\n")?;
            file.sync_all()?;
            std::fs::rename(&temp, &path)?;
            // The rename itself is durable only once the directory is synced.
            File::open(&self.dir)?.sync_all()
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&temp);
        }
        result.map_err(|e| broken("write the account file", e))
    }

    pub fn remove(&self, account: &str) -> Result<bool, TokenError> {
        check_name(account)?;
        let _ = std::fs::remove_file(self.lock_path(account));
        match std::fs::remove_file(self.path(account)) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(TokenError::Broken(format!(
                "cannot remove {}: {e}",
                self.path(account).display()
            ))),
        }
    }

    fn create_dir(&self) -> std::io::Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        if self.dir.is_dir() {
            return Ok(());
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
    }

    /// Takes the account's refresh lock, waiting at most `timeout`.
    pub fn lock(&self, account: &str, timeout: Duration) -> Result<RefreshLock, TokenError> {
        check_name(account)?;
        let path = self.lock_path(account);
        let broken = |e: std::io::Error| {
            TokenError::Broken(format!(
                "cannot open the lock file {}: {e}; the directory must be writable by the service user",
                path.display()
            ))
        };
        self.create_dir().map_err(broken)?;
        let file = crate::lock::open_lock_file(&path).map_err(broken)?;
        let deadline = Instant::now() + timeout;
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(RefreshLock { _file: file }),
                Err(TryLockError::Error(e)) => return Err(broken(e)),
                Err(TryLockError::WouldBlock) if Instant::now() >= deadline => {
                    return Err(TokenError::Unavailable(format!(
                        "another process has been refreshing account {account:?} for over {} s",
                        timeout.as_secs()
                    )));
                }
                // std has no flock with a timeout; a refresh takes a round trip to the
                // provider, so polling every 20 ms costs nothing noticeable.
                Err(TryLockError::WouldBlock) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// Under the lock: the stored token if it is still fresh (another process refreshed
    /// it) and not `rejected`, otherwise a new one from `endpoint`, persisted before it is
    /// returned. `force` refreshes even a fresh token (`oauth2 refresh`).
    pub fn refresh(
        &self,
        account: &str,
        endpoint: &dyn TokenEndpoint,
        rejected: Option<&AccessToken>,
        force: bool,
        lock_timeout: Duration,
    ) -> Result<(Account, AccessToken), TokenError> {
        let _lock = match self.lock(account, lock_timeout) {
            Ok(lock) => lock,
            Err(TokenError::Unavailable(why)) if rejected.is_none() && !force => {
                // The holder is slow, but a token that has not expired still works.
                let data = self.read(account)?;
                return match data.unexpired_token(now()) {
                    Some(token) => Ok((data, token)),
                    None => Err(TokenError::Unavailable(why)),
                };
            }
            Err(e) => return Err(e),
        };
        let mut data = self.read(account)?;
        let now = now();
        // Another process may have refreshed while this one waited for the lock. After a
        // rejection, any other unexpired token is worth one try before using the refresh
        // token; otherwise only a token outside the margin is kept.
        let current = match rejected {
            Some(_) => data.unexpired_token(now),
            None => data.fresh_token(now),
        };
        if !force
            && let Some(token) = current
            && Some(&token) != rejected
        {
            return Ok((data, token));
        }
        // Each connection would otherwise send the dead refresh token again and wait for
        // the same answer.
        if !force && data.revoked {
            return Err(TokenError::Revoked(data.last_error.clone().unwrap_or_else(
                || format!("run `legacy-mail-proxy oauth2 authorize {account} …` again"),
            )));
        }
        match endpoint.renew(account, &data) {
            Ok(grant) => {
                data.apply(grant, now);
                self.write(account, &data)?;
                let token = data
                    .access_token
                    .clone()
                    .map(|t| AccessToken::new(t.0))
                    .ok_or_else(|| TokenError::Broken("no access token after a grant".into()))?;
                Ok((data, token))
            }
            Err(error) => {
                data.last_error = Some(error.to_string());
                data.last_error_at = Some(now);
                data.revoked = matches!(error, TokenError::Revoked(_));
                // Recording the error is for `status`; failing to record it must not hide
                // the error itself.
                let _ = self.write(account, &data);
                match (&error, rejected, data.unexpired_token(now)) {
                    // The provider is down but the stored token has not expired: use it.
                    (TokenError::Unavailable(_), None, Some(token)) if !force => {
                        log::warn!(
                            "OAuth2 account {account}: {error}; the current token is used until it expires"
                        );
                        Ok((data, token))
                    }
                    _ => Err(error),
                }
            }
        }
    }
}

/// A stored account as a [`TokenSource`] for the backend logins.
pub struct StoredAccount {
    store: Store,
    name: String,
    user: String,
    tls: crate::tls::TlsOptions,
    timeouts: crate::net::Timeouts,
    endpoint: Option<Box<dyn TokenEndpoint>>,
}

impl StoredAccount {
    /// Opens `account` in `dir`. Reads the file (for the user name) but builds no HTTP
    /// client: that happens only when a refresh is due.
    pub fn open(
        dir: &Path,
        account: &str,
        tls: crate::tls::TlsOptions,
        timeouts: crate::net::Timeouts,
    ) -> Result<StoredAccount, TokenError> {
        let store = Store::new(dir);
        let data = store.read(account)?;
        Ok(StoredAccount {
            store,
            name: account.to_string(),
            user: data.user,
            tls,
            timeouts,
            endpoint: None,
        })
    }

    /// Uses `endpoint` instead of HTTP (tests).
    pub fn with_endpoint(mut self, endpoint: Box<dyn TokenEndpoint>) -> StoredAccount {
        self.endpoint = Some(endpoint);
        self
    }

    /// How long to wait for another process's refresh: a refresh is one HTTP exchange,
    /// bounded by the connect and I/O timeouts, plus room for reading the secret.
    fn lock_timeout(&self) -> Duration {
        self.timeouts.connect + self.timeouts.io + Duration::from_secs(5)
    }

    fn refresh(&mut self, rejected: Option<&AccessToken>) -> Result<AccessToken, TokenError> {
        if self.endpoint.is_none() {
            self.endpoint = Some(Box::new(super::grant::HttpEndpoint::new(
                self.tls.clone(),
                self.timeouts,
            )));
        }
        let endpoint = self.endpoint.as_deref().expect("set above");
        let (_, token) =
            self.store
                .refresh(&self.name, endpoint, rejected, false, self.lock_timeout())?;
        Ok(token)
    }
}

impl TokenSource for StoredAccount {
    fn user(&self) -> &str {
        &self.user
    }

    fn token(&mut self) -> Result<AccessToken, TokenError> {
        // The common case: a fresh token, read without the lock and without any network.
        let data = self.store.read(&self.name)?;
        if let Some(token) = data.fresh_token(now()) {
            return Ok(token);
        }
        self.refresh(None)
    }

    fn renew(&mut self, rejected: &AccessToken) -> Result<AccessToken, TokenError> {
        self.refresh(Some(rejected))
    }
}

#[cfg(test)]
#[path = "store_tests.rs"]
mod tests;
