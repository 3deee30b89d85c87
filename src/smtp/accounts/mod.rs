//! Per-sender backend accounts (`smtp --accounts FILE`), read from smtpproxy's
//! `smtpproxy.ini` as it is.
//!
//! One section per sender address names the submission server and login that sender's
//! mail goes through (smtpproxy's keys: `localhostname`, `smtphost`, `smtpport`,
//! `smtpsecurity`, `smtpusername`, `smtppassword`, the `pop…` keys, `returnpath`,
//! `replyto`, `use`), plus keys of ours where the gateway goes further (`cafile`,
//! `oauth2account`, `allowedrecipients`, `rewritefrom`, `popsecurity`, `clientpassword`,
//! and `…password_file` for every password). `[config]` and `[logging]` are smtpproxy's
//! daemon settings: the few that mean something to a one-process-per-connection gateway
//! are mapped, the others are noted as ignored, never refused.
//!
//! The whole file is checked when the process starts; any mistake is a [`FileError`] that
//! names the file, the line and the key, and the client gets `421 4.3.0` before anything
//! is sent upstream. `ini` reads the syntax; `router` picks the account per transaction;
//! `pop` does POP-before-SMTP.

pub mod ini;
pub mod pop;
pub mod router;

use super::auth::AllowedSenders;
use super::command::check_address;
use crate::net::TlsMode;
use ini::{Entry, Section};
use std::fmt::{self, Write as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// smtpproxy's `waitafterpop` default: seconds between the POP login and the SMTP one.
const WAIT_AFTER_POP: Duration = Duration::from_secs(5);

/// smtpproxy's `popcheckdelay` default.
const POP_CHECK_DELAY: Duration = Duration::from_secs(60);

/// A mistake in the accounts file: where it is and what is wrong. Never holds a password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileError {
    pub path: PathBuf,
    pub line: Option<usize>,
    pub key: Option<String>,
    pub message: String,
}

impl fmt::Display for FileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "accounts file {}", self.path.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(key) = &self.key {
            write!(f, ": {key}")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for FileError {}

/// A password and where it came from (for `--check`, which never shows the password).
#[derive(Clone)]
pub struct Password {
    pub value: String,
    /// `None`: written in the accounts file itself.
    pub file: Option<PathBuf>,
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.file {
            Some(file) => write!(f, "Password(from {})", file.display()),
            None => f.write_str("Password(in the accounts file)"),
        }
    }
}

impl Password {
    fn describe(&self) -> String {
        match &self.file {
            Some(file) => format!("password from {}", file.display()),
            None => "password in the accounts file".into(),
        }
    }
}

/// POP-before-SMTP: log in to this POP3 server before relaying (an old way for a provider
/// to open its SMTP server to the address that just read its mail).
#[derive(Debug, Clone)]
pub struct PopBeforeSmtp {
    pub host: String,
    pub port: u16,
    pub tls: TlsMode,
    pub user: String,
    pub password: Password,
    /// A successful POP login is good for this long (smtpproxy's `popcheckdelay`).
    pub check_delay: Duration,
}

/// One sender's backend: a resolved section of the file (never a `use=` alias).
#[derive(Debug, Clone)]
pub struct Account {
    /// The section name: the sender address (smtpproxy's key for the account).
    pub name: String,
    pub line: usize,
    /// EHLO name (`localhostname`); the gateway's --hostname otherwise.
    pub hello: Option<String>,
    pub smtp_host: String,
    pub smtp_port: u16,
    pub smtp_tls: TlsMode,
    pub smtp_login: Option<(String, Password)>,
    /// `oauth2account`: the proxy's OAuth2 account (in --oauth2-dir) instead of a password.
    pub oauth2_account: Option<String>,
    /// `cafile`: trusted instead of --ca-file for this account's servers.
    pub ca_file: Option<PathBuf>,
    pub pop: Option<PopBeforeSmtp>,
    /// `returnpath`: the envelope sender used upstream.
    pub return_path: Option<String>,
    /// `replyto`: sets `Reply-To:`.
    pub reply_to: Option<String>,
    /// `rewritefrom`: replaces the address in `From:`.
    pub rewrite_from: Option<String>,
    /// `allowedrecipients`: addresses and `@domain`s; empty allows all.
    pub allowed_recipients: AllowedSenders,
    /// `clientpassword`: the password a client gives with this account's name as AUTH user
    /// (--client-auth local); without it, the --client-password.
    pub client_password: Option<Password>,
    /// `handler`: message handlers for this account's messages, after --handler's.
    pub handlers: Vec<PathBuf>,
}

/// An address that sends through another section's account (`use=`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alias {
    pub name: String,
    pub line: usize,
    /// The account finally used (`use=` chains are followed).
    pub account: String,
}

/// The whole file, checked.
#[derive(Debug, Clone)]
pub struct Accounts {
    pub path: PathBuf,
    pub accounts: Vec<Account>,
    pub aliases: Vec<Alias>,
    /// `[config] waitafterpop`.
    pub wait_after_pop: Duration,
    /// `[config] debuglevel` above 0: log at debug level.
    pub debug: bool,
    /// Settings read and ignored, each with why, for the log and `--check`.
    pub ignored: Vec<String>,
}

/// What an address is in the file.
#[derive(Debug, Clone, Copy)]
pub enum Found<'a> {
    Account(&'a Account),
    Alias(&'a Alias, &'a Account),
}

impl<'a> Found<'a> {
    pub fn account(self) -> &'a Account {
        match self {
            Found::Account(a) | Found::Alias(_, a) => a,
        }
    }
}

const ACCOUNT_KEYS: &[&str] = &[
    "localhostname",
    "smtphost",
    "smtpport",
    "smtpsecurity",
    "smtptls",
    "smtpusername",
    "smtppassword",
    "smtppassword_file",
    "popbeforesmtp",
    "pophost",
    "popport",
    "popssl",
    "popsecurity",
    "popusername",
    "poppassword",
    "poppassword_file",
    "popcheckdelay",
    "returnpath",
    "replyto",
    "use",
    "cafile",
    "oauth2account",
    "allowedrecipients",
    "rewritefrom",
    "clientpassword",
    "clientpassword_file",
    "handler",
];

impl Accounts {
    /// Reads and checks `path`. Refuses a file that group or others may read or write
    /// (it holds passwords) unless `insecure_permissions`.
    pub fn load(path: &Path, insecure_permissions: bool) -> Result<Accounts, FileError> {
        let fail = |message: String| FileError {
            path: path.to_path_buf(),
            line: None,
            key: None,
            message,
        };
        let text = std::fs::read(path).map_err(|e| fail(format!("cannot read it: {e}")))?;
        if !insecure_permissions {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(path)
                .map_err(|e| fail(format!("cannot read it: {e}")))?
                .permissions()
                .mode();
            if mode & 0o066 != 0 {
                return Err(fail(format!(
                    "group or others may read or write it (mode {:o}) and it holds \
                     passwords: chmod 600 it (owned by the service user), or start with \
                     --accounts-insecure-permissions",
                    mode & 0o777
                )));
            }
        }
        let text = String::from_utf8(text).map_err(|e| {
            let line = 1 + e.as_bytes()[..e.utf8_error().valid_up_to()]
                .iter()
                .filter(|&&b| b == b'\n')
                .count();
            FileError {
                line: Some(line),
                ..fail("not UTF-8 text".into())
            }
        })?;
        Self::parse(path, &text)
    }

    /// Checks the text of the file at `path` (password files are found relative to it).
    pub fn parse(path: &Path, text: &str) -> Result<Accounts, FileError> {
        let mut sections = ini::parse(text).map_err(|e| FileError {
            path: path.to_path_buf(),
            line: Some(e.line),
            key: None,
            message: e.message,
        })?;
        let reader = Reader { path };
        reader.python_semantics(&mut sections)?;
        let mut accounts = Accounts {
            path: path.to_path_buf(),
            accounts: Vec::new(),
            aliases: Vec::new(),
            wait_after_pop: WAIT_AFTER_POP,
            debug: false,
            ignored: Vec::new(),
        };
        let mut uses = Vec::new();
        for section in &sections {
            match section.name.as_str() {
                // Its keys are in the account sections now (python_semantics).
                "DEFAULT" => {}
                "config" => reader.config(section, &mut accounts)?,
                "logging" => {
                    for entry in &section.entries {
                        accounts.ignored.push(format!(
                            "[logging] {}: logs go where --log says (syslog by default)",
                            entry.key
                        ));
                    }
                }
                _ => match section.get("use") {
                    Some(target) => {
                        if let Some(other) = section.entries.iter().find(|e| e.key != "use") {
                            return Err(reader.error(
                                other,
                                format!(
                                    "[{}] has use={}, which must be its only key",
                                    section.name, target.value
                                ),
                            ));
                        }
                        uses.push((section, target));
                    }
                    None => accounts.accounts.push(reader.account(section)?),
                },
            }
        }
        for (section, target) in uses {
            let account =
                resolve(&sections, section, target).map_err(|m| reader.error(target, m))?;
            accounts.aliases.push(Alias {
                name: section.name.clone(),
                line: section.line,
                account,
            });
        }
        let mut seen: Vec<(String, &str)> = Vec::new();
        let names = accounts
            .accounts
            .iter()
            .map(|a| (a.name.as_str(), a.line))
            .chain(accounts.aliases.iter().map(|a| (a.name.as_str(), a.line)));
        for (name, line) in names {
            let key = address_key(name);
            if let Some((_, first)) = seen.iter().find(|(k, _)| *k == key) {
                return Err(FileError {
                    path: path.to_path_buf(),
                    line: Some(line),
                    key: None,
                    message: format!(
                        "[{name}] is the same sender as [{first}] (domains compare without case)"
                    ),
                });
            }
            seen.push((key, name));
        }
        Ok(accounts)
    }

    /// The account for a sender address: its own section or an alias. The domain is
    /// compared without case, the local part exactly (RFC 5321 §2.4).
    pub fn find(&self, address: &str) -> Option<Found<'_>> {
        let key = address_key(address);
        if let Some(account) = self.accounts.iter().find(|a| address_key(&a.name) == key) {
            return Some(Found::Account(account));
        }
        let alias = self.aliases.iter().find(|a| address_key(&a.name) == key)?;
        let account = self.accounts.iter().find(|a| a.name == alias.account)?;
        Some(Found::Alias(alias, account))
    }

    /// The resolved accounts as `--check` prints them: every setting, no password.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{}: {} account(s), {} alias(es); waitafterpop {} s{}",
            self.path.display(),
            self.accounts.len(),
            self.aliases.len(),
            self.wait_after_pop.as_secs(),
            if self.debug { "; debug logging" } else { "" }
        );
        for a in &self.accounts {
            let _ = writeln!(out, "\n[{}] (line {})", a.name, a.line);
            let tls = match a.smtp_tls {
                TlsMode::Implicit => "implicit TLS",
                TlsMode::Starttls => "STARTTLS",
                TlsMode::None => "NO ENCRYPTION",
            };
            let _ = writeln!(out, "  smtp: {}:{} ({tls})", a.smtp_host, a.smtp_port);
            let login = match (&a.smtp_login, &a.oauth2_account) {
                (Some((user, password)), _) => format!("{user}, {}", password.describe()),
                (None, Some(name)) => format!("OAuth2 account {name}"),
                (None, None) => "none".into(),
            };
            let _ = writeln!(out, "  login: {login}");
            if let Some(hello) = &a.hello {
                let _ = writeln!(out, "  ehlo: {hello}");
            }
            if let Some(ca) = &a.ca_file {
                let _ = writeln!(out, "  ca file: {}", ca.display());
            }
            if let Some(pop) = &a.pop {
                let tls = match pop.tls {
                    TlsMode::Implicit => "POP3S",
                    TlsMode::Starttls => "STLS",
                    TlsMode::None => "NO ENCRYPTION",
                };
                let _ = writeln!(
                    out,
                    "  pop-before-smtp: {}:{} ({tls}) as {}, {}; again after {} s",
                    pop.host,
                    pop.port,
                    pop.user,
                    pop.password.describe(),
                    pop.check_delay.as_secs()
                );
            }
            for (what, value) in [
                ("return path", &a.return_path),
                ("reply-to", &a.reply_to),
                ("rewrite from", &a.rewrite_from),
            ] {
                if let Some(value) = value {
                    let _ = writeln!(out, "  {what}: {value}");
                }
            }
            if !a.allowed_recipients.is_empty() {
                let _ = writeln!(out, "  allowed recipients: {:?}", a.allowed_recipients);
            }
            if let Some(password) = &a.client_password {
                let _ = writeln!(out, "  client AUTH: {}", password.describe());
            }
            for program in &a.handlers {
                let _ = writeln!(out, "  handler: {}", program.display());
            }
        }
        for alias in &self.aliases {
            let _ = writeln!(
                out,
                "\n[{}] (line {}) sends through [{}]",
                alias.name, alias.line, alias.account
            );
        }
        if !self.ignored.is_empty() {
            let _ = writeln!(out, "\nignored:");
            for note in &self.ignored {
                let _ = writeln!(out, "  {note}");
            }
        }
        out
    }
}

/// How addresses are compared: the local part exactly, the domain without case.
fn address_key(address: &str) -> String {
    match address.rsplit_once('@') {
        Some((local, domain)) => format!("{local}@{}", domain.to_ascii_lowercase()),
        None => address.to_string(),
    }
}

/// Follows `use=` from `section` to an account section.
fn resolve(sections: &[Section], section: &Section, target: &Entry) -> Result<String, String> {
    let mut chain = vec![section.name.as_str()];
    let mut name = target.value.as_str();
    loop {
        let Some(next) = sections
            .iter()
            .find(|s| s.name == name && !matches!(name, "config" | "logging"))
        else {
            return Err(format!(
                "[{}] uses [{name}], which is not a section of the file",
                section.name
            ));
        };
        if chain.contains(&name) {
            chain.push(name);
            return Err(format!("use= goes round in a loop: {}", chain.join(" -> ")));
        }
        chain.push(name);
        match next.get("use") {
            Some(entry) => name = entry.value.as_str(),
            None => return Ok(next.name.clone()),
        }
    }
}

/// Turns sections into settings, making errors that point at the file.
struct Reader<'a> {
    path: &'a Path,
}

impl Reader<'_> {
    /// What Python 2's `ConfigParser` (smtpproxy's reader) does beyond the syntax: the keys
    /// of `[DEFAULT]` count in each account section that lacks them (not in `use=`
    /// sections, which smtpproxy reads for `use` alone, nor `[config]`/`[logging]`), and
    /// `%(name)s` in a value is replaced (see [`ini::interpolate`]).
    fn python_semantics(&self, sections: &mut [Section]) -> Result<(), FileError> {
        let defaults = sections
            .iter()
            .find(|s| s.name == "DEFAULT")
            .map(|s| s.entries.clone())
            .unwrap_or_default();
        for section in sections.iter_mut() {
            let special = matches!(section.name.as_str(), "DEFAULT" | "config" | "logging");
            if !special && section.get("use").is_none() {
                for entry in &defaults {
                    if section.get(&entry.key).is_none() {
                        section.entries.push(entry.clone());
                    }
                }
            }
            let known = section.entries.clone();
            let lookup = |name: &str| {
                known
                    .iter()
                    .chain(&defaults)
                    .find(|e| e.key == name)
                    .map(|e| e.value.as_str())
            };
            for entry in &mut section.entries {
                entry.value = ini::interpolate(&entry.value, &lookup)
                    .map_err(|why| self.error(entry, why))?;
            }
        }
        Ok(())
    }

    fn error(&self, entry: &Entry, message: String) -> FileError {
        FileError {
            path: self.path.to_path_buf(),
            line: Some(entry.line),
            key: Some(entry.key.clone()),
            message,
        }
    }

    fn section_error(&self, section: &Section, key: &str, message: String) -> FileError {
        FileError {
            path: self.path.to_path_buf(),
            line: Some(section.line),
            key: Some(key.into()),
            message,
        }
    }

    fn config(&self, section: &Section, accounts: &mut Accounts) -> Result<(), FileError> {
        for entry in &section.entries {
            let why = match entry.key.as_str() {
                "waitafterpop" => {
                    accounts.wait_after_pop = self.seconds(entry)?;
                    continue;
                }
                "debuglevel" => {
                    accounts.debug = self.number(entry)? > 0;
                    continue;
                }
                "port" => "the port is the listener's (xinetd or the systemd socket)",
                "sleeptime" => {
                    "there is no relaying thread: each message goes upstream while the client waits"
                }
                "deleteonerror" => {
                    "nothing is spooled: a message the backend refuses is refused to the client, which keeps it"
                }
                "msgdir" => "nothing is spooled: each message goes upstream while the client waits",
                _ => "not a setting smtpproxy documents",
            };
            accounts
                .ignored
                .push(format!("[config] {}: {why}", entry.key));
        }
        Ok(())
    }

    fn account(&self, section: &Section) -> Result<Account, FileError> {
        for entry in &section.entries {
            if !ACCOUNT_KEYS.contains(&entry.key.as_str()) {
                return Err(self.error(
                    entry,
                    format!(
                        "unknown key in [{}] (known: {})",
                        section.name,
                        ACCOUNT_KEYS.join(", ")
                    ),
                ));
            }
        }
        let get = |key: &str| section.get(key);
        let Some(host) = get("smtphost").filter(|e| !e.value.is_empty()) else {
            return Err(self.section_error(
                section,
                "smtphost",
                format!("[{}] has no smtphost (the submission server)", section.name),
            ));
        };
        let smtp_tls = match (get("smtpsecurity"), get("smtptls")) {
            // smtpproxy before 1.5 said `smtptls=true` (its own example file still does);
            // 1.5 replaced it with smtpsecurity, and then ignored it, sending in clear.
            (None, Some(e)) if self.boolean(e)? => TlsMode::Starttls,
            (None, _) => TlsMode::None,
            (Some(e), _) => match e.value.to_ascii_lowercase().as_str() {
                "ssl" => TlsMode::Implicit,
                "tls" => TlsMode::Starttls,
                "none" => TlsMode::None,
                _ => return Err(self.error(e, format!("{:?} is not ssl, tls or none", e.value))),
            },
        };
        let smtp_port = match get("smtpport") {
            Some(e) => self.port(e)?,
            None if smtp_tls == TlsMode::Implicit => 465,
            None => 25,
        };
        let smtp_password = self.password(section, "smtppassword")?;
        let smtp_login = match (get("smtpusername"), smtp_password) {
            (Some(user), Some(password)) => Some((user.value.clone(), password)),
            (None, None) => None,
            (Some(user), None) => {
                return Err(self.error(user, "has no smtppassword (or smtppassword_file)".into()));
            }
            (None, Some(_)) => {
                let entry = get("smtppassword").or(get("smtppassword_file"));
                return Err(self.error(
                    entry.expect("a password key"),
                    "without smtpusername".into(),
                ));
            }
        };
        let oauth2_account = get("oauth2account").map(|e| e.value.clone());
        if let (Some(_), Some(e)) = (&smtp_login, get("oauth2account")) {
            return Err(self.error(
                e,
                "and smtpusername are two logins for one account: choose one".into(),
            ));
        }
        let ca_file = match get("cafile") {
            Some(e) => {
                let path = self.relative(&e.value);
                if !path.is_file() {
                    return Err(self.error(e, format!("{} is not a file", path.display())));
                }
                Some(path)
            }
            None => None,
        };
        let pop = match get("popbeforesmtp") {
            Some(e) if self.boolean(e)? => Some(self.pop(section)?),
            _ => None,
        };
        let mut addresses = [None, None, None];
        for (slot, key) in addresses
            .iter_mut()
            .zip(["returnpath", "replyto", "rewritefrom"])
        {
            if let Some(e) = get(key) {
                check_address(&e.value, false)
                    .map_err(|err| self.error(e, err.reply().summary()))?;
                *slot = Some(e.value.clone());
            }
        }
        let [return_path, reply_to, rewrite_from] = addresses;
        let allowed_recipients = match get("allowedrecipients") {
            Some(e) => {
                let list: Vec<&str> = e.value.split(',').map(str::trim).collect();
                for item in &list {
                    let address = match item.strip_prefix('@') {
                        Some(domain) => format!("x@{domain}"),
                        None => item.to_string(),
                    };
                    if item.is_empty() || check_address(&address, false).is_err() {
                        return Err(self.error(e, format!("{item:?} is not an address or @domain")));
                    }
                }
                AllowedSenders::new(&list)
            }
            None => AllowedSenders::default(),
        };
        let hello = match get("localhostname") {
            Some(e) if e.value.is_empty() || !e.value.bytes().all(|b| b.is_ascii_graphic()) => {
                return Err(self.error(e, format!("{:?} is not a host name", e.value)));
            }
            other => other.map(|e| e.value.clone()),
        };
        Ok(Account {
            name: section.name.clone(),
            line: section.line,
            hello,
            smtp_host: host.value.clone(),
            smtp_port,
            smtp_tls,
            smtp_login,
            oauth2_account,
            ca_file,
            pop,
            return_path,
            reply_to,
            rewrite_from,
            allowed_recipients,
            client_password: self.password(section, "clientpassword")?,
            handlers: match get("handler") {
                Some(e) => self.handlers(e)?,
                None => Vec::new(),
            },
        })
    }

    fn pop(&self, section: &Section) -> Result<PopBeforeSmtp, FileError> {
        let required = |key: &str| {
            section
                .get(key)
                .filter(|e| !e.value.is_empty())
                .ok_or_else(|| {
                    self.section_error(
                        section,
                        key,
                        format!("[{}] has popbeforesmtp=true but no {key}", section.name),
                    )
                })
        };
        let host = required("pophost")?.value.clone();
        let user = required("popusername")?.value.clone();
        let password = self.password(section, "poppassword")?.ok_or_else(|| {
            self.section_error(
                section,
                "poppassword",
                format!(
                    "[{}] has popbeforesmtp=true but no poppassword",
                    section.name
                ),
            )
        })?;
        // Our `popsecurity` (like smtpsecurity) wins over smtpproxy's `popssl`, which can
        // only say implicit TLS or none.
        let tls = match (section.get("popsecurity"), section.get("popssl")) {
            (Some(e), _) => match e.value.to_ascii_lowercase().as_str() {
                "ssl" => TlsMode::Implicit,
                "tls" => TlsMode::Starttls,
                "none" => TlsMode::None,
                _ => return Err(self.error(e, format!("{:?} is not ssl, tls or none", e.value))),
            },
            (None, Some(e)) if !self.boolean(e)? => TlsMode::None,
            (None, _) => TlsMode::Implicit,
        };
        let port = match section.get("popport") {
            Some(e) => self.port(e)?,
            None if tls == TlsMode::Implicit => 995,
            None => 110,
        };
        let check_delay = match section.get("popcheckdelay") {
            Some(e) => self.seconds(e)?,
            None => POP_CHECK_DELAY,
        };
        Ok(PopBeforeSmtp {
            host,
            port,
            tls,
            user,
            password,
            check_delay,
        })
    }

    /// `KEY` in the file, or `KEY_file` naming a file that holds it (relative to the
    /// accounts file's directory); not both.
    fn password(&self, section: &Section, key: &str) -> Result<Option<Password>, FileError> {
        let file_key = format!("{key}_file");
        match (section.get(key), section.get(&file_key)) {
            (Some(_), Some(e)) => {
                Err(self.error(e, format!("and {key} are both given: choose one")))
            }
            (Some(e), None) => Ok(Some(Password {
                value: e.value.clone(),
                file: None,
            })),
            (None, Some(e)) => {
                let path = self.relative(&e.value);
                let value = crate::secret::load(Some(&path), &[], "")
                    .map_err(|err| self.error(e, format!("{err:#}")))?
                    .expect("a file was given");
                Ok(Some(Password {
                    value,
                    file: Some(path),
                }))
            }
            (None, None) => Ok(None),
        }
    }

    /// `handler=/a, /b`: absolute paths of executable files (no shell, no `PATH` search).
    fn handlers(&self, entry: &Entry) -> Result<Vec<PathBuf>, FileError> {
        entry
            .value
            .split(',')
            .map(|program| {
                let program = PathBuf::from(program.trim());
                crate::smtp::handler::check_program(&program)
                    .map(|()| program)
                    .map_err(|why| self.error(entry, why))
            })
            .collect()
    }

    fn relative(&self, value: &str) -> PathBuf {
        match self.path.parent() {
            Some(dir) => dir.join(value),
            None => PathBuf::from(value),
        }
    }

    fn port(&self, entry: &Entry) -> Result<u16, FileError> {
        entry
            .value
            .parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| {
                self.error(
                    entry,
                    format!("{:?} is not a port (1 to 65535)", entry.value),
                )
            })
    }

    fn number(&self, entry: &Entry) -> Result<u64, FileError> {
        entry
            .value
            .parse::<u64>()
            .map_err(|_| self.error(entry, format!("{:?} is not a whole number", entry.value)))
    }

    fn seconds(&self, entry: &Entry) -> Result<Duration, FileError> {
        let seconds = self.number(entry)?;
        if seconds > 86_400 {
            return Err(self.error(entry, format!("{seconds} seconds is more than a day")));
        }
        Ok(Duration::from_secs(seconds))
    }

    /// Python's `getboolean`.
    fn boolean(&self, entry: &Entry) -> Result<bool, FileError> {
        match entry.value.to_ascii_lowercase().as_str() {
            "1" | "yes" | "true" | "on" => Ok(true),
            "0" | "no" | "false" | "off" => Ok(false),
            _ => Err(self.error(entry, format!("{:?} is not true or false", entry.value))),
        }
    }
}

#[cfg(test)]
mod tests;
