//! `legacy-mail-proxy pop3`: a POP3 server (RFC 1939, 2449, 3206, 5034) on stdin/stdout
//! whose maildrop is a mailbox on an IMAP server.

pub mod command;
pub mod encode;
#[cfg(test)]
mod fake_imap;
pub mod imap;
mod imap_oauth2;
pub mod maildrop;
/// In-memory test double, for unit tests and the fuzz command (feature `testing`); not
/// in the release binary.
#[cfg(any(test, feature = "testing"))]
pub mod memory;
pub mod reply;
pub mod session;
#[cfg(test)]
mod transcript_tests;

pub use encode::NulBytes;
pub use maildrop::DeletePolicy;

use crate::client_tls::server::SetupError;
use crate::frontend::{Ending, exit_code, legacy};
use crate::net::TlsMode;
use crate::oauth2::login::Account;
use crate::options::BackendOptions;
use crate::secret;
use anyhow::Context;
use imap::{ImapOpener, Login};
use maildrop::{Credentials, Maildrop, OpenError, Opener};
use session::Session;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AuthMode {
    /// The client's USER/PASS or AUTH PLAIN log in to IMAP; the IMAP server decides.
    Passthrough,
    /// The proxy logs in with --imap-user and its password; clients are checked against
    /// --client-user and its password.
    Fixed,
    /// The proxy logs in with the OAuth2 account --imap-oauth2-account (SASL OAUTHBEARER or
    /// XOAUTH2); clients are checked against --client-user and its password.
    #[value(name = "oauth2")]
    OAuth2,
}

/// What the lock key does with the domain of a user name; used only when the IMAP server
/// sends no MAILBOXID (RFC 8474), which identifies the mailbox itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LockUserDomain {
    /// `alice@a.example` and `alice@b.example` are different mailboxes.
    Keep,
    /// The server ignores the domain (Dovecot `auth_username_format = %Ln`): every
    /// spelling of it is the same mailbox.
    Strip,
}

impl From<LockUserDomain> for crate::lock::UserDomain {
    fn from(domain: LockUserDomain) -> Self {
        match domain {
            LockUserDomain::Keep => crate::lock::UserDomain::Keep,
            LockUserDomain::Strip => crate::lock::UserDomain::Strip,
        }
    }
}

// The cores' own enums, given to clap here so that the cores need not know it.
crate::options::value_enum!(DeletePolicy {
    DeletePolicy::Keep => "keep": "DELE never changes the server",
    DeletePolicy::Hide => "hide":
        "Deleted messages get a keyword (--deleted-keyword) and are hidden from later sessions",
    DeletePolicy::Trash => "trash": "Deleted messages are moved to --trash-mailbox",
    DeletePolicy::Expunge => "expunge":
        "Deleted messages are flagged \\Deleted and removed with UID EXPUNGE (RFC 4315)",
});

crate::options::value_enum!(NulBytes {
    NulBytes::Replace => "replace":
        "Replace each NUL byte with 0x80, as Dovecot does; sizes stay the same",
    NulBytes::Keep => "keep":
        "Pass NUL bytes through unchanged (some clients, Outlook among them, hang on them)",
});

#[derive(Debug, clap::Args)]
pub struct Args {
    /// IMAP server host name (also BACKEND_IMAP_HOST).
    #[arg(long, env = "LMP_IMAP_HOST")]
    pub imap_host: Option<String>,

    /// IMAP server port [default: 993 for implicit TLS, else 143] (also BACKEND_IMAP_PORT).
    #[arg(long, env = "LMP_IMAP_PORT")]
    pub imap_port: Option<u16>,

    /// How the IMAP connection is secured [default: implicit] (also BACKEND_IMAP_USE_SSL,
    /// BACKEND_IMAP_USE_STARTTLS).
    #[arg(long, env = "LMP_IMAP_TLS", value_enum)]
    pub imap_tls: Option<crate::net::TlsMode>,

    #[command(flatten)]
    pub backend: BackendOptions,

    /// IMAP mailbox that is the POP3 maildrop.
    #[arg(long, env = "LMP_MAILBOX", default_value = "INBOX")]
    pub mailbox: String,

    /// How clients are authenticated [default: oauth2 when --imap-oauth2-account is set,
    /// fixed when --imap-user is set, else passthrough].
    #[arg(long, env = "LMP_AUTH", value_enum)]
    pub auth: Option<AuthMode>,

    /// IMAP user for --auth fixed (also BACKEND_IMAP_USER). Its password comes from
    /// --imap-password-file, LMP_IMAP_PASSWORD, BACKEND_IMAP_PASS or the systemd credential
    /// `imap-password`.
    #[arg(long, env = "LMP_IMAP_USER")]
    pub imap_user: Option<String>,

    /// File holding the IMAP password for --auth fixed.
    #[arg(long, env = "LMP_IMAP_PASSWORD_FILE", value_name = "FILE")]
    pub imap_password_file: Option<PathBuf>,

    /// The OAuth2 account (in --oauth2-dir) the proxy logs in to IMAP with; implies
    /// --auth oauth2. Authorize it first with `legacy-mail-proxy oauth2 authorize`.
    #[arg(long, env = "LMP_IMAP_OAUTH2_ACCOUNT", value_name = "NAME")]
    pub imap_oauth2_account: Option<String>,

    #[command(flatten)]
    pub oauth2: crate::options::OAuth2Options,

    /// The user name clients must give with --auth fixed or oauth2. Its password comes from
    /// --client-password-file, LMP_CLIENT_PASSWORD or the systemd credential
    /// `client-password`.
    #[arg(long, env = "LMP_CLIENT_USER")]
    pub client_user: Option<String>,

    /// File holding the password clients must give with --auth fixed or oauth2.
    #[arg(long, env = "LMP_CLIENT_PASSWORD_FILE", value_name = "FILE")]
    pub client_password_file: Option<PathBuf>,

    /// With --auth fixed or oauth2, accept any client user and password. Anyone who can
    /// reach the port can then read and delete the mailbox.
    #[arg(long, env = "LMP_IGNORE_CLIENT_CREDENTIALS", value_parser = clap::builder::FalseyValueParser::new(), default_value = "false")]
    pub ignore_client_credentials: bool,

    /// What DELE followed by QUIT does on the server [default: hide] (BACKEND_MUTATE=true
    /// means expunge, false means keep).
    #[arg(long, env = "LMP_DELETE_POLICY", value_enum)]
    pub delete_policy: Option<DeletePolicy>,

    /// Keyword set on deleted messages by --delete-policy hide (Dovecot's
    /// pop3_deleted_flag uses the same idea).
    #[arg(long, env = "LMP_DELETED_KEYWORD", default_value = "$POP3Deleted")]
    pub deleted_keyword: String,

    /// Mailbox that --delete-policy trash moves messages to.
    #[arg(long, env = "LMP_TRASH_MAILBOX", default_value = "Trash")]
    pub trash_mailbox: String,

    /// Set \Seen on messages the client retrieved in full (RETR). Off by default: POP3
    /// downloads leave the IMAP state alone.
    #[arg(long, env = "LMP_MARK_SEEN", value_parser = clap::builder::FalseyValueParser::new(), default_value = "false")]
    pub mark_seen: bool,

    /// What to do with NUL bytes in messages.
    #[arg(long, env = "LMP_NUL_BYTES", value_enum, default_value = "replace")]
    pub nul_bytes: NulBytes,

    /// Directory for the per-mailbox lock files (RFC 1939 exclusive access). Must be
    /// shared by every instance and writable by the service user.
    #[arg(
        long,
        env = "LMP_LOCK_DIR",
        default_value = "/run/lock/legacy-mail-proxy"
    )]
    pub lock_dir: PathBuf,

    /// For servers without MAILBOXID (RFC 8474 OBJECTID): whether the lock key keeps the
    /// domain of the user name or strips it (set strip when the server ignores it).
    #[arg(long, env = "LMP_LOCK_USER_DOMAIN", value_enum, default_value = "keep")]
    pub lock_user_domain: LockUserDomain,

    /// Allow concurrent sessions on one mailbox (no lock).
    #[arg(long, env = "LMP_NO_LOCK", value_parser = clap::builder::FalseyValueParser::new(), default_value = "false")]
    pub no_lock: bool,

    /// Seconds a client may stay silent before it is logged out (RFC 1939: at least 600).
    #[arg(
        long,
        env = "LMP_IDLE_TIMEOUT",
        default_value = "600",
        value_name = "SECONDS"
    )]
    pub idle_timeout: u64,

    /// Seconds between IMAP NOOPs while the client is idle.
    #[arg(
        long,
        env = "LMP_KEEPALIVE",
        default_value = "120",
        value_name = "SECONDS"
    )]
    pub keepalive: u64,

    #[command(flatten)]
    pub login_limits: crate::options::LoginLimits,

    #[command(flatten)]
    pub client_tls: crate::options::ClientTlsOptions,

    /// Bytes of the next messages fetched ahead while a client reads one (RETR or TOP in
    /// order), so that its next command costs no round trip to the IMAP server. Takes a
    /// number of bytes or K, M, G (binary); 0 turns read-ahead off. A message larger than
    /// the window is fetched only when asked for.
    #[arg(
        long,
        env = "LMP_PREFETCH_WINDOW",
        default_value = "4M",
        value_name = "SIZE",
        value_parser = parse_size
    )]
    pub prefetch_window: u64,

    /// Advertise RFC 2449 EXPIRE with this value (days, or NEVER) when the IMAP server's
    /// retention policy is known. Not advertised by default.
    #[arg(long, env = "LMP_CAPA_EXPIRE", value_name = "DAYS|NEVER")]
    pub capa_expire: Option<String>,
}

/// Serves one client on stdin/stdout until it quits or the connection ends.
pub fn serve(args: Args) -> ExitCode {
    let client = crate::input::client_address();
    log::info!("pop3 connect from {client}");
    let started = std::time::Instant::now();
    let mut ending = Ending::Served;
    let mut opener: Box<dyn Opener> = match imap_opener(&args) {
        Ok(mut opener) => {
            opener.connect_early();
            Box::new(opener)
        }
        Err(e) => {
            ending = Ending::NotServed;
            // The client still gets a POP3 dialogue and a clear -ERR at login, and the
            // admin gets the reason in the log.
            log::error!("configuration error: {e:#}");
            Box::new(Misconfigured(format!("{e:#}")))
        }
    };
    let idle_timeout = Duration::from_secs(args.idle_timeout.max(1));
    let keepalive = Duration::from_secs(args.keepalive.max(1));
    let tick = keepalive.min(idle_timeout);
    let config = session::Config {
        idle_timeout,
        tick,
        keepalive,
        auth_failure_delay: args.login_limits.delay(),
        max_auth_failures: args.login_limits.max_failures(),
        nul_bytes: args.nul_bytes,
        capa_expire: args.capa_expire.clone(),
    };
    // A client that stops reading mid-RETR must not hold the process and its lock forever.
    crate::input::tune_client_socket(idle_timeout);
    let tls_settings = args.client_tls.settings().map_err(|e| {
        log::error!("client TLS configuration error: {e:#}");
    });
    let stream = tls_settings
        .map_err(|()| SetupError::Config)
        .and_then(|settings| {
            crate::client_tls::server::stdio(settings, &client, tick, idle_timeout)
        });
    let (mut tls, input, output) = match stream {
        Ok(stream) => stream,
        Err(SetupError::Config) => {
            // Told in clear text even on the implicit-TLS port: a client that cannot
            // decode it at least sees the connection end at once instead of hanging.
            let mut out = std::io::stdout();
            let _ = out.write_all(
                b"-ERR [SYS/TEMP] TLS is misconfigured on this server, try again later\r\n",
            );
            let _ = out.flush();
            return exit_code(Ending::NotServed);
        }
        Err(SetupError::Connection) => return exit_code(Ending::NotServed),
    };
    let summary = Session::new(input, output, opener.as_mut(), config)
        .with_tls(&mut tls)
        .run();
    tls.close_notify();
    log::info!(
        "pop3 session end: client={client} user={} listed={} retrieved={} deleted={} bytes={} duration={:.3}s end={}",
        summary.user.as_deref().unwrap_or("-").escape_debug(),
        summary.listed,
        summary.retrieved,
        summary.deleted,
        summary.bytes,
        started.elapsed().as_secs_f64(),
        summary.end
    );
    if summary.end.broke_off() {
        ending = Ending::Broken;
    }
    exit_code(ending)
}

/// A size in bytes: digits, optionally followed by K, M or G (powers of 1024; `KiB`,
/// `MB` and the like read the same).
fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    let (number, unit) = text.split_at(digits);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size (bytes, or a number with K, M or G)"))?;
    let shift = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        _ => return Err(format!("{text:?}: the unit must be K, M or G")),
    };
    number
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// Answers every login with `[SYS/PERM]` when the configuration is unusable.
struct Misconfigured(String);

impl Opener for Misconfigured {
    fn open(&mut self, _: &Credentials) -> Result<Box<dyn Maildrop>, OpenError> {
        Err(OpenError::Permanent(self.0.clone()))
    }
}

/// Builds the IMAP opener from options, environment, and secrets.
fn imap_opener(args: &Args) -> anyhow::Result<ImapOpener> {
    let host = args
        .imap_host
        .clone()
        .or_else(|| legacy::env("BACKEND_IMAP_HOST"))
        .context("no IMAP server: set --imap-host or LMP_IMAP_HOST")?;
    let tls = match args.imap_tls {
        Some(mode) => mode,
        None => legacy::tls_mode("BACKEND_IMAP_USE_SSL", "BACKEND_IMAP_USE_STARTTLS")?
            .unwrap_or(TlsMode::Implicit),
    };
    if tls == TlsMode::None {
        log::warn!(
            "IMAP connection to {host} is not encrypted: passwords and mail cross the network in clear text"
        );
    }
    let port = match args.imap_port {
        Some(port) => port,
        None => match legacy::env("BACKEND_IMAP_PORT") {
            Some(port) => port
                .parse()
                .context("BACKEND_IMAP_PORT is not a port number")?,
            None if tls == TlsMode::Implicit => 993,
            None => 143,
        },
    };
    let imap_user = args
        .imap_user
        .clone()
        .or_else(|| legacy::env("BACKEND_IMAP_USER"));
    let auth = args.auth.unwrap_or(if args.imap_oauth2_account.is_some() {
        AuthMode::OAuth2
    } else if imap_user.is_some() {
        AuthMode::Fixed
    } else {
        AuthMode::Passthrough
    });
    let mut oauth2 = None;
    let login = match auth {
        AuthMode::Passthrough => Login::Passthrough,
        AuthMode::Fixed => {
            let user = imap_user.context("--auth fixed needs --imap-user")?;
            let password = secret::load(
                args.imap_password_file.as_deref(),
                &["LMP_IMAP_PASSWORD", "BACKEND_IMAP_PASS"],
                "imap-password",
            )?
            .context("--auth fixed needs the IMAP password: --imap-password-file, LMP_IMAP_PASSWORD or the credential imap-password")?;
            Login::Fixed {
                client: client_credentials(args, "fixed", &user)?,
                user,
                password,
            }
        }
        AuthMode::OAuth2 => {
            let name = args
                .imap_oauth2_account
                .clone()
                .context("--auth oauth2 needs --imap-oauth2-account")?;
            let client = client_credentials(args, "oauth2", &format!("account {name}"))?;
            // Opened now; a failure is kept and told to each client as [SYS/TEMP].
            oauth2 = Some(std::rc::Rc::new(std::cell::RefCell::new(Account::open(
                &args.oauth2.oauth2_dir,
                &name,
                args.backend.tls(),
                args.backend.timeouts(),
            ))));
            Login::OAuth2 { client }
        }
    };
    let policy = match args.delete_policy {
        Some(policy) => policy,
        None => match legacy::flag("BACKEND_MUTATE")? {
            Some(true) => DeletePolicy::Expunge,
            Some(false) => DeletePolicy::Keep,
            None => DeletePolicy::Hide,
        },
    };
    anyhow::ensure!(
        !args.deleted_keyword.is_empty()
            && args
                .deleted_keyword
                .bytes()
                .all(|b| b.is_ascii_graphic() && !b"(){%*\"\\]".contains(&b)),
        "--deleted-keyword {:?} is not a valid IMAP keyword",
        args.deleted_keyword
    );
    for (option, mailbox) in [
        ("--mailbox", &args.mailbox),
        ("--trash-mailbox", &args.trash_mailbox),
    ] {
        anyhow::ensure!(
            !mailbox.is_empty() && !mailbox.contains(['\r', '\n', '\0']),
            "{option} {mailbox:?} is not a valid mailbox name"
        );
    }
    if args.backend.danger_accept_invalid_certs {
        log::warn!(
            "--danger-accept-invalid-certs: the IMAP server's certificate is not checked; anyone on the path can read passwords and mail"
        );
    }
    Ok(ImapOpener {
        oauth2,
        server: imap::Server {
            host,
            port,
            tls,
            // A plain backend needs no connector, and building one costs 2 ms of CPU.
            connector: match tls {
                TlsMode::None => Err("no TLS to the IMAP server".into()),
                _ => args.backend.tls().connector().map_err(|e| format!("{e:#}")),
            },
            timeouts: args.backend.timeouts(),
        },
        settings: imap::Settings {
            login,
            mailbox: args.mailbox.clone(),
            policy,
            deleted_keyword: args.deleted_keyword.clone(),
            trash_mailbox: args.trash_mailbox.clone(),
            mark_seen: args.mark_seen,
            lock_dir: (!args.no_lock).then(|| args.lock_dir.clone()),
            lock_user_domain: args.lock_user_domain.into(),
            prefetch_window: args.prefetch_window,
        },
        early: None,
    })
}

/// What clients must present when the proxy logs in with its own account (`--auth fixed`
/// or `oauth2`): --client-user and its password, or, knowingly, nothing.
fn client_credentials(
    args: &Args,
    mode: &str,
    whose: &str,
) -> anyhow::Result<Option<(String, String)>> {
    if args.ignore_client_credentials {
        log::warn!(
            "--ignore-client-credentials: anyone who reaches this port can read and delete {whose}'s mail"
        );
        return Ok(None);
    }
    let client_user = args.client_user.clone().with_context(|| {
        format!(
            "--auth {mode} needs --client-user and a client password (or, knowingly, --ignore-client-credentials)"
        )
    })?;
    let client_password = secret::load(
        args.client_password_file.as_deref(),
        &["LMP_CLIENT_PASSWORD"],
        "client-password",
    )?
    .with_context(|| format!("--auth {mode} needs the client password: --client-password-file, LMP_CLIENT_PASSWORD or the credential client-password"))?;
    Ok(Some((client_user, client_password)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// `pop3`'s options alone: the tests need not know the whole command line (`cli`).
    #[derive(clap::Parser)]
    struct Line {
        #[command(flatten)]
        args: Args,
    }

    fn args_of(extra: &[&str]) -> Result<Args, clap::Error> {
        let mut argv = vec!["pop3", "--imap-host", "imap.example"];
        argv.extend(extra);
        Line::try_parse_from(argv).map(|line| line.args)
    }

    fn opener_of(extra: &[&str]) -> anyhow::Result<ImapOpener> {
        imap_opener(&args_of(extra)?)
    }

    #[test]
    fn a_failure_delay_over_a_minute_is_a_bad_command_line() {
        let error = args_of(&["--auth-failure-delay", "61"]).err().unwrap();
        assert!(
            error.to_string().contains("more than 60 seconds"),
            "{error}"
        );
        let args = args_of(&["--auth-failure-delay", "60"]).unwrap();
        assert_eq!(args.login_limits.delay(), Duration::from_secs(60));
    }

    #[test]
    fn prefetch_window_sizes() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("4M"), Ok(4 << 20));
        assert_eq!(parse_size("512 KiB"), Ok(512 << 10));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("1000"), Ok(1000));
        for bad in ["", "M", "4X", "-1", "99999999999999999999G"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        let opener = opener_of(&[]).unwrap();
        assert_eq!(
            opener.settings.prefetch_window,
            imap::DEFAULT_PREFETCH_WINDOW
        );
        let opener = opener_of(&["--prefetch-window", "0"]).unwrap();
        assert_eq!(opener.settings.prefetch_window, 0);
    }

    #[test]
    fn an_oauth2_account_implies_oauth2_and_clients_must_still_be_checked() {
        let err = opener_of(&["--imap-oauth2-account", "work"]).err().unwrap();
        assert!(
            format!("{err:#}").contains("--auth oauth2 needs --client-user"),
            "{err:#}"
        );
        let err = opener_of(&["--auth", "oauth2"]).err().unwrap();
        assert!(
            format!("{err:#}").contains("--imap-oauth2-account"),
            "{err:#}"
        );
        let opener = opener_of(&[
            "--imap-oauth2-account",
            "work",
            "--ignore-client-credentials",
            "--oauth2-dir",
            "/srv/tokens",
        ])
        .unwrap();
        assert!(matches!(
            opener.settings.login,
            Login::OAuth2 { client: None }
        ));
        let account = opener.oauth2.as_ref().unwrap().borrow();
        assert_eq!(account.name(), "work");
        assert!(
            opener_of(&["--imap-user", "u", "--auth", "passthrough"])
                .unwrap()
                .oauth2
                .is_none()
        );
    }
}
