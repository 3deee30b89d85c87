//! `legacy-mail-proxy smtp`: an SMTP server (RFC 5321 with RFC 1870, 2034, 2920, 4954,
//! 6152) on stdin/stdout that relays every message through a submission server.
//!
//! The relay is synchronous: MAIL and each RCPT go upstream one at a time and the client
//! gets the backend's own replies; the end of DATA is answered only with the backend's
//! answer to the message. Module map:
//!
//! - `command`: client command lines → typed commands; `reply`: replies and their wire form
//! - `session`: the protocol core over `BufRead + Write`
//! - `data`: end-of-data, dot-unstuffing and line-ending rules (SMTP smuggling)
//! - `spool`: bounded-memory holding of a message; `headers`: header block edits
//! - `handler`: message handlers, external programs run on each complete message
//! - `auth`: client authentication and allowed senders
//! - `relay`: the backend trait; `backend`: the real one, over `crate::submission`; `memory`: test double
//! - `accounts`: smtpproxy's per-sender accounts file, the router that relays each
//!   transaction through its sender's account, and POP-before-SMTP

pub mod accounts;
pub mod auth;
pub mod backend;
pub mod command;
pub mod data;
pub mod handler;
pub mod headers;
/// In-memory test double, for unit tests and the fuzz command (feature `testing`); not
/// in the release binary.
#[cfg(any(test, feature = "testing"))]
pub mod memory;
pub mod queue;
pub mod relay;
pub mod reply;
pub mod session;
pub mod spool;

#[cfg(test)]
mod fake_backend;
#[cfg(test)]
mod queue_transcript_tests;
#[cfg(test)]
mod transcript_tests;

use crate::client_tls::server::SetupError;
use crate::frontend::{Ending, exit_code, legacy};
use crate::net::TlsMode;
use crate::options::BackendOptions;
use accounts::Accounts;
use accounts::router::{self, AccountRouter};
use anyhow::{Context, bail};
use auth::{AllowedSenders, ClientAuth};
use backend::{Backend, SmtpRelay};
use headers::HeaderEdits;
use session::{Config, Session};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ClientAuthMode {
    /// No client authentication. Anyone who can reach the port can send mail through the
    /// backend account: an open relay for that network.
    None,
    /// Clients must AUTH with --client-user and its password.
    Local,
    /// The client's AUTH credentials log in to the backend, which decides.
    Passthrough,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Submission server host name (also BACKEND_SMTP_HOST).
    #[arg(long, env = "LMP_SMTP_HOST")]
    pub smtp_host: Option<String>,

    /// Submission server port [default: 465 for implicit TLS, 587 for STARTTLS, 25 for
    /// none] (also BACKEND_SMTP_PORT).
    #[arg(long, env = "LMP_SMTP_PORT")]
    pub smtp_port: Option<u16>,

    /// How the submission connection is secured [default: implicit] (also
    /// BACKEND_SMTP_USE_SSL and BACKEND_SMTP_USE_TLS, read as the README says).
    /// `none` sends the password and mail in clear text and must be chosen explicitly.
    #[arg(long, env = "LMP_SMTP_TLS", value_enum)]
    pub smtp_tls: Option<TlsMode>,

    #[command(flatten)]
    pub backend: BackendOptions,

    /// When each recipient is checked with the submission server [default: with-message;
    /// at-rcpt with --queue-dir]. `with-message`: a transaction's first RCPT is answered at
    /// once and goes upstream with the next RCPT or with the message (one backend round
    /// trip for a one-recipient message); if the server refuses it, the client hears that
    /// at DATA or at its final dot, and the message goes to no one. `at-rcpt`: each RCPT
    /// gets the server's own answer at once.
    #[arg(long, env = "LMP_RECIPIENT_CHECK", value_enum, value_name = "WHEN")]
    pub recipient_check: Option<backend::RecipientCheck>,

    /// User the proxy logs in to the submission server as (also BACKEND_SMTP_USER). Its
    /// password comes from --smtp-password-file, LMP_SMTP_PASSWORD, BACKEND_SMTP_PASS or the
    /// systemd credential `smtp-password`. Without it the proxy does not log in (unless
    /// --client-auth passthrough).
    #[arg(long, env = "LMP_SMTP_USER")]
    pub smtp_user: Option<String>,

    /// File holding the password for --smtp-user.
    #[arg(long, env = "LMP_SMTP_PASSWORD_FILE", value_name = "FILE")]
    pub smtp_password_file: Option<PathBuf>,

    /// The OAuth2 account (in --oauth2-dir) the proxy logs in to the submission server
    /// with (AUTH OAUTHBEARER or XOAUTH2), instead of --smtp-user. Authorize it first with
    /// `legacy-mail-proxy oauth2 authorize`.
    #[arg(
        long,
        env = "LMP_SMTP_OAUTH2_ACCOUNT",
        value_name = "NAME",
        conflicts_with = "smtp_user"
    )]
    pub smtp_oauth2_account: Option<String>,

    #[command(flatten)]
    pub oauth2: crate::options::OAuth2Options,

    /// How clients are authenticated [default: local when --client-user is set,
    /// passthrough when --smtp-user is not; otherwise it must be given].
    #[arg(long, env = "LMP_CLIENT_AUTH", value_enum)]
    pub client_auth: Option<ClientAuthMode>,

    /// The user name clients must give with --client-auth local. Its password comes from
    /// --client-password-file, LMP_CLIENT_PASSWORD or the systemd credential
    /// `client-password`.
    #[arg(long, env = "LMP_CLIENT_USER")]
    pub client_user: Option<String>,

    /// File holding the password clients must give with --client-auth local.
    #[arg(long, env = "LMP_CLIENT_PASSWORD_FILE", value_name = "FILE")]
    pub client_password_file: Option<PathBuf>,

    /// Envelope senders clients may use: addresses and `@domain`s, comma-separated. Any
    /// other MAIL FROM gets 550 5.7.1. Empty: any sender.
    #[arg(
        long,
        env = "LMP_ALLOWED_SENDERS",
        value_delimiter = ',',
        value_name = "LIST"
    )]
    pub allowed_senders: Vec<String>,

    /// Envelope sender (MAIL FROM) used upstream, whatever the client said.
    #[arg(long, env = "LMP_FORCE_SENDER", value_name = "ADDRESS")]
    pub force_sender: Option<String>,

    /// Domain added to a sender given without one (`MAIL FROM:<scanner>`, as scanners and
    /// printers send), making it `scanner@DOMAIN`. Without it such a sender is refused
    /// with a reply naming this option, unless --force-sender replaces it anyway.
    #[arg(long, env = "LMP_SENDER_DOMAIN", value_name = "DOMAIN")]
    pub sender_domain: Option<String>,

    /// Refuse MAIL until the client has said HELO or EHLO with a name (Postfix's
    /// smtpd_helo_required = yes). By default, as in Postfix, MAIL without HELO and a bare
    /// HELO are accepted: scanners and printers do both.
    #[arg(long, env = "LMP_REQUIRE_HELO", value_parser = clap::builder::FalseyValueParser::new(), default_value = "false")]
    pub require_helo: bool,

    /// Replace the address in each message's From: header (the display name is kept), or
    /// add From: when missing. For servers that refuse other senders (Office 365
    /// `554 5.2.252 SendAsDenied`).
    #[arg(long, env = "LMP_REWRITE_FROM", value_name = "ADDRESS")]
    pub rewrite_from: Option<String>,

    /// Set each message's Reply-To: header to this address (replacing any present).
    #[arg(long, env = "LMP_REPLY_TO", value_name = "ADDRESS")]
    pub reply_to: Option<String>,

    /// Largest message accepted, in bytes (advertised as SIZE).
    #[arg(
        long,
        env = "LMP_MAX_MESSAGE_SIZE",
        default_value = "36700160",
        value_name = "BYTES"
    )]
    pub max_message_size: u64,

    /// Most recipients per message; more get 452 4.5.3 and are sent in a new transaction.
    #[arg(long, env = "LMP_MAX_RECIPIENTS", default_value = "100")]
    pub max_recipients: usize,

    /// Our name in the greeting, in EHLO to the backend and in added Message-IDs
    /// [default: the system's host name].
    #[arg(long, env = "LMP_HOSTNAME")]
    pub hostname: Option<String>,

    /// Seconds a client may stay silent before the session is closed (RFC 5321 §4.5.3.2.7:
    /// at least 300).
    #[arg(
        long,
        env = "LMP_IDLE_TIMEOUT",
        default_value = "300",
        value_name = "SECONDS"
    )]
    pub idle_timeout: u64,

    /// Seconds between NOOPs that keep the submission connection alive while a client
    /// is slow to send a message (the backend drops silent clients, Postfix after 300
    /// seconds).
    #[arg(
        long,
        env = "LMP_SMTP_KEEPALIVE",
        default_value = "60",
        value_name = "SECONDS",
        value_parser = crate::options::seconds
    )]
    pub smtp_keepalive: f64,

    #[command(flatten)]
    pub login_limits: crate::options::LoginLimits,

    #[command(flatten)]
    pub client_tls: crate::options::ClientTlsOptions,

    /// Directory for the unlinked temporary file that holds messages larger than 256 KiB
    /// while they are received [default: $TMPDIR or /tmp].
    #[arg(long, env = "LMP_SPOOL_DIR", value_name = "DIR")]
    pub spool_dir: Option<PathBuf>,

    /// A program run on each complete message before it is relayed (repeat for several,
    /// run in order; accounts add their own with `handler=`): the message on stdin, the
    /// envelope in LMP_SENDER, LMP_RECIPIENTS, LMP_ACCOUNT, LMP_CLIENT…; exit 0 goes on
    /// (stdout, if any, replaces the message), 100 discards, 1-99 refuse. An absolute path,
    /// run without a shell.
    #[arg(
        long = "handler",
        env = "LMP_HANDLERS",
        value_delimiter = ',',
        value_name = "PROGRAM"
    )]
    pub handlers: Vec<PathBuf>,

    /// Seconds a handler may run before it is killed and the message deferred (451).
    #[arg(
        long,
        env = "LMP_HANDLER_TIMEOUT",
        default_value = "60",
        value_name = "SECONDS"
    )]
    pub handler_timeout: u64,

    #[command(flatten)]
    pub queue: crate::smtp::queue::admin::QueueOptions,

    #[command(flatten)]
    pub accounts: AccountsOptions,
}

/// Per-sender backend accounts from smtpproxy's accounts file (see `accounts`).
#[derive(Debug, Clone, clap::Args)]
pub struct AccountsOptions {
    /// smtpproxy's `smtpproxy.ini`, read as it is: each MAIL FROM (or, with --client-auth
    /// local, each AUTH user name) goes through its own section's submission server. A
    /// sender without a section goes to --smtp-host when one is given, else gets 550 5.7.1.
    #[arg(long = "accounts", env = "LMP_ACCOUNTS", value_name = "FILE")]
    pub file: Option<PathBuf>,

    /// Read --accounts even when group or others may read or write it. It holds
    /// passwords: prefer `chmod 600` and `smtppassword_file=`.
    #[arg(long = "accounts-insecure-permissions", env = "LMP_ACCOUNTS_INSECURE_PERMISSIONS", value_parser = clap::builder::FalseyValueParser::new(), default_value = "false")]
    pub insecure_permissions: bool,

    /// Check --accounts, print the accounts it resolves to (never a password) and exit:
    /// 0 when the file is good, 1 when not.
    #[arg(long, requires = "file")]
    pub check: bool,

    /// Directory of POP-before-SMTP's timestamps (one file per account), shared by every
    /// instance and writable by the service user only.
    #[arg(
        long,
        env = "LMP_POP_BEFORE_SMTP_DIR",
        default_value = "/var/lib/legacy-mail-proxy/pop-before-smtp",
        value_name = "DIR"
    )]
    pub pop_before_smtp_dir: PathBuf,
}

/// Idle time is counted in ticks of the stdin reader (shorter if --smtp-keepalive is).
const TICK: Duration = Duration::from_secs(1);

pub fn serve(args: Args) -> ExitCode {
    if args.accounts.check {
        return check_accounts(&args.accounts);
    }
    let client = crate::input::client_address();
    let client_tls = match args.client_tls.settings() {
        Ok(settings) => settings,
        Err(e) => {
            log::error!("client TLS configuration error: {e:#}");
            let _ = std::io::stdout()
                .write_all(b"421 4.3.5 Service not available: TLS configuration error\r\n");
            return exit_code(Ending::NotServed);
        }
    };
    let Settings {
        config,
        backend,
        routing,
    } = match settings(args, &client) {
        Ok(ok) => ok,
        Err(e) => {
            log::error!("smtp: configuration error: {e:#}");
            // The client is told to come back later rather than left without an answer.
            let reply: &[u8] = if e.downcast_ref::<accounts::FileError>().is_some() {
                b"421 4.3.0 Service not available: error in the accounts file\r\n"
            } else {
                b"421 4.3.5 Service not available: configuration error\r\n"
            };
            let mut out = std::io::stdout();
            let _ = out.write_all(reply);
            let _ = out.flush();
            return exit_code(Ending::NotServed);
        }
    };
    log::debug!("smtp: session from {client}");
    // A client that stops reading would otherwise block a reply forever.
    crate::input::tune_client_socket(config.idle_timeout);
    let mut relay = relay_for(backend, routing, Warm::Now);
    // The writer gives up at the first failed write: retrying a client that stopped
    // reading would cost a send timeout each time.
    let stream =
        crate::client_tls::server::stdio(client_tls, &client, config.tick, config.idle_timeout);
    let (tls, input, output) = match stream {
        Ok(stream) => stream,
        Err(SetupError::Config) => {
            // In clear text even on the implicit-TLS port: the client at least sees the
            // connection end at once instead of hanging.
            let mut out = std::io::stdout();
            let _ = out.write_all(b"421 4.3.5 Service not available: TLS configuration error\r\n");
            let _ = out.flush();
            return exit_code(Ending::NotServed);
        }
        Err(SetupError::Connection) => return exit_code(Ending::NotServed),
    };
    let tls = std::cell::RefCell::new(tls);
    let stats = Session::new(input, output, relay.as_mut(), &config)
        .with_tls(&tls)
        .on_client_done(|| {
            tls.borrow().close_notify();
            close_client_side()
        })
        .client_closed_check(client_has_closed)
        .run();
    exit_code(match stats.broken {
        true => Ending::Broken,
        false => Ending::Served,
    })
}

/// Ends the client's connection for writing once it has its last reply, so that it need
/// not wait while the backend answers our QUIT. On a pipe (tests, the demo) this does
/// nothing.
fn close_client_side() {
    use std::mem::ManuallyDrop;
    use std::os::fd::FromRawFd;
    // SAFETY: fd 1 stays open for the whole process and ManuallyDrop never closes it;
    // shutdown fails harmlessly with ENOTSOCK on a pipe. Every reply has been flushed.
    let socket = ManuallyDrop::new(unsafe { std::net::TcpStream::from_raw_fd(1) });
    let _ = socket.shutdown(std::net::Shutdown::Write);
}

/// Whether the client has closed its side of the connection (its FIN or RST has arrived,
/// with nothing left unread in the socket). Bytes it pipelined after its message are in the
/// session's buffer by then, not in the socket. On a pipe (tests, the demo) it says no.
///
/// It never waits: it is asked after every message, before the reply to the final dot, while
/// the client waits for that reply. (A peek with a short read timeout cost one timer tick per
/// message, 4 ms and more at HZ=250, on every message of every session.)
fn client_has_closed() -> bool {
    let mut byte = 0u8;
    // SAFETY: fd 0 stays open for the whole process; recv with MSG_PEEK | MSG_DONTWAIT
    // reads at most one byte into `byte`, consumes nothing and never blocks, whatever the
    // socket's own flags and timeouts. On a pipe it fails with ENOTSOCK.
    let n = unsafe {
        libc::recv(
            0,
            std::ptr::addr_of_mut!(byte).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    match n {
        0 => true,
        n if n > 0 => false,
        _ => {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::ENOTSOCK) => false,
                _ => !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                ),
            }
        }
    }
}

/// The relay a session (or `queue run`) talks to: the command-line backend, or with
/// `--accounts` the router that picks each sender's account (falling back to the
/// command-line backend when there is one).
/// Whether to open the command-line backend's connection at once (see
/// [`SmtpRelay::warm_up`]): a client session will need it; `queue run` may not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Warm {
    Now,
    AtFirstUse,
}

pub(crate) fn relay_for(
    backend: Option<Backend>,
    routing: Option<Routing>,
    warm: Warm,
) -> Box<dyn relay::Relay> {
    let mut default = backend.map(SmtpRelay::new);
    match routing {
        None => {
            let mut relay = default.take().expect("a backend without accounts");
            if warm == Warm::Now {
                relay.warm_up();
            }
            Box::new(relay)
        }
        Some(routing) => {
            if routing.accounts.debug {
                log::set_max_level(log::max_level().max(log::LevelFilter::Debug));
            }
            if !routing.accounts.ignored.is_empty() {
                // One line, not one per key: every connection is a process of its own.
                let keys: Vec<&str> = routing
                    .accounts
                    .ignored
                    .iter()
                    .filter_map(|note| note.split(':').next())
                    .collect();
                log::info!(
                    "smtp: accounts file: smtpproxy settings read and ignored (--check says \
                     why): {}",
                    keys.join(", ")
                );
            }
            let pop = accounts::pop::PopGate::new(
                routing.pop_dir,
                routing.defaults.pop_login(),
                std::thread::sleep,
            );
            Box::new(AccountRouter::new(
                routing.accounts,
                routing.defaults.connect(),
                default.map(|relay| Box::new(relay) as Box<dyn relay::Relay>),
                pop,
            ))
        }
    }
}

/// `smtp --accounts FILE --check`: for the admin at a terminal, so it prints to stdout.
fn check_accounts(options: &AccountsOptions) -> ExitCode {
    let path = options.file.as_deref().expect("clap requires --accounts");
    match Accounts::load(path, options.insecure_permissions) {
        Ok(accounts) => {
            print!("{}", accounts.describe());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// What `serve` runs on, found before the client is greeted.
pub(crate) struct Settings {
    pub(crate) config: Config,
    /// The command-line backend; `None` only with accounts and no --smtp-host.
    pub(crate) backend: Option<Backend>,
    pub(crate) routing: Option<Routing>,
}

/// The accounts file and what its backends take from the command line.
pub(crate) struct Routing {
    accounts: Accounts,
    defaults: router::Defaults,
    pop_dir: PathBuf,
}

/// Turns the options (and the legacy environment variables) into a session configuration
/// and a backend description. Every mistake is found here, before the client is greeted.
/// A bad accounts file is an [`accounts::FileError`].
pub(crate) fn settings(args: Args, client: &str) -> anyhow::Result<Settings> {
    let accounts = match &args.accounts.file {
        Some(path) => Some(Accounts::load(path, args.accounts.insecure_permissions)?),
        None => None,
    };
    let host = args
        .smtp_host
        .clone()
        .or_else(|| legacy::env("BACKEND_SMTP_HOST"));
    anyhow::ensure!(
        host.is_some() || accounts.is_some(),
        "no submission server: set --smtp-host (or LMP_SMTP_HOST)"
    );
    // The command-line backend: with --accounts, only for senders without an account.
    let target = match host {
        Some(host) => Some(smtp_target(&args, host)?),
        None => None,
    };

    let smtp_user = args
        .smtp_user
        .clone()
        .or_else(|| legacy::env("BACKEND_SMTP_USER"));
    let smtp_password = crate::secret::load(
        args.smtp_password_file.as_deref(),
        &["LMP_SMTP_PASSWORD", "BACKEND_SMTP_PASS"],
        "smtp-password",
    )?;
    let mode = match args.client_auth {
        Some(ClientAuthMode::Passthrough) if accounts.is_some() => bail!(
            "--client-auth passthrough does not go with --accounts: each account logs in \
             with its own smtpusername"
        ),
        Some(mode) => mode,
        None if args.client_user.is_some() => ClientAuthMode::Local,
        None if accounts.is_some() => bail!(
            "choose --client-auth: local (clients log in with their account's name) or \
             none (an open relay for anyone who can reach the port)"
        ),
        None if smtp_user.is_none() && args.smtp_oauth2_account.is_none() => {
            ClientAuthMode::Passthrough
        }
        None => bail!(
            "choose --client-auth: local (with --client-user), passthrough, or none (an \
             open relay for anyone who can reach the port)"
        ),
    };
    let oauth2 = match (&args.smtp_oauth2_account, mode) {
        (Some(_), ClientAuthMode::Passthrough) => bail!(
            "--smtp-oauth2-account is the proxy's own login: use it with --client-auth local \
             or none, not passthrough"
        ),
        (Some(_), _) if smtp_user.is_some() => bail!(
            "--smtp-oauth2-account and --smtp-user (or BACKEND_SMTP_USER) are two logins: \
             choose one"
        ),
        // Opened now; a failure is kept and told to each client as 454 at MAIL.
        (Some(name), _) => Some(crate::oauth2::login::Account::open(
            &args.oauth2.oauth2_dir,
            name,
            args.backend.tls(),
            args.backend.timeouts(),
        )),
        (None, _) => None,
    };
    let credentials = match (mode, smtp_user) {
        (ClientAuthMode::Passthrough, Some(_)) => {
            log::warn!("smtp: --smtp-user is ignored with --client-auth passthrough");
            None
        }
        (_, Some(user)) => {
            let password = smtp_password.with_context(|| {
                format!(
                    "--smtp-user {user} has no password: use --smtp-password-file, \
                     LMP_SMTP_PASSWORD or the systemd credential smtp-password"
                )
            })?;
            Some((user, password))
        }
        (_, None) => None,
    };
    let auth = match mode {
        ClientAuthMode::None => ClientAuth::None,
        ClientAuthMode::Passthrough => ClientAuth::Passthrough,
        ClientAuthMode::Local => {
            let password = crate::secret::load(
                args.client_password_file.as_deref(),
                &["LMP_CLIENT_PASSWORD"],
                "client-password",
            )?;
            match &accounts {
                Some(accounts) => account_users(accounts, args.client_user.clone(), password)?,
                None => {
                    let user = args
                        .client_user
                        .clone()
                        .context("--client-auth local needs --client-user")?;
                    let password = password.with_context(|| {
                        "--client-user has no password: use --client-password-file, \
                         LMP_CLIENT_PASSWORD or the systemd credential client-password"
                    })?;
                    ClientAuth::Local { user, password }
                }
            }
        }
    };
    if accounts.is_some() && args.force_sender.is_some() {
        // The sender chooses the account; each account has its own `returnpath`.
        bail!("--force-sender does not go with --accounts: use returnpath= in the accounts");
    }

    for (option, value) in [
        ("--force-sender", &args.force_sender),
        ("--rewrite-from", &args.rewrite_from),
        ("--reply-to", &args.reply_to),
        ("--queue-bounce-to", &args.queue.queue_bounce_to),
    ] {
        if let Some(address) = value {
            command::check_address(address, false)
                .map_err(|e| anyhow::anyhow!("{option} {address}: {}", e.reply().summary()))?;
        }
    }
    if let Some(domain) = &args.sender_domain {
        command::check_address(&format!("x@{domain}"), false)
            .ok()
            .filter(|_| !domain.contains('@'))
            .with_context(|| format!("--sender-domain {domain} is not a domain"))?;
    }
    for entry in &args.allowed_senders {
        let entry = entry.trim();
        let valid = match entry.strip_prefix('@') {
            Some(domain) => command::check_address(&format!("x@{domain}"), false).is_ok(),
            None => entry.is_empty() || command::check_address(entry, false).is_ok(),
        };
        anyhow::ensure!(
            valid,
            "--allowed-senders: {entry} is not an address or @domain"
        );
    }

    let hostname = match args.hostname {
        Some(h) => h,
        None => crate::submission::local_hostname(),
    };
    anyhow::ensure!(
        !hostname.is_empty() && hostname.bytes().all(|b| b.is_ascii_graphic()),
        "--hostname {hostname:?} is not a host name"
    );
    anyhow::ensure!(
        args.idle_timeout >= 1,
        "--idle-timeout must be at least 1 second"
    );
    if args.idle_timeout < 300 {
        log::warn!(
            "smtp: --idle-timeout {} is below RFC 5321's 300 seconds",
            args.idle_timeout
        );
    }
    let auth_failure_delay = args.login_limits.delay();
    let keepalive = Duration::try_from_secs_f64(args.smtp_keepalive)
        .ok()
        .filter(|d| !d.is_zero())
        .context("--smtp-keepalive must be a positive number of seconds")?;

    let mut config = Config::new(&hostname);
    config.client = client.to_string();
    config.max_message_size = args.max_message_size;
    config.max_recipients = args.max_recipients.max(1);
    config.auth = auth;
    config.allowed_senders = AllowedSenders::new(&args.allowed_senders);
    config.force_sender = args.force_sender;
    config.sender_domain = args.sender_domain;
    config.require_helo = args.require_helo;
    config.edits = HeaderEdits {
        rewrite_from: args.rewrite_from,
        reply_to: args.reply_to,
        id_domain: hostname.clone(),
    };
    config.idle_timeout = Duration::from_secs(args.idle_timeout);
    config.tick = TICK.min(keepalive);
    config.keepalive = keepalive;
    config.auth_failure_delay = auth_failure_delay;
    config.max_auth_failures = args.login_limits.max_failures();
    config.spool_dir = args.spool_dir.unwrap_or_else(std::env::temp_dir);
    for program in &args.handlers {
        handler::check_program(program).map_err(|e| anyhow::anyhow!("--handler {e}"))?;
    }
    anyhow::ensure!(
        (1..=86_400).contains(&args.handler_timeout),
        "--handler-timeout must be 1 to 86400 seconds"
    );
    config.handlers = handler::Handlers {
        all: args.handlers,
        per_account: accounts
            .iter()
            .flat_map(|a| &a.accounts)
            .filter(|a| !a.handlers.is_empty())
            .map(|a| (a.name.clone(), a.handlers.clone()))
            .collect(),
        timeout: Duration::from_secs(args.handler_timeout),
    };
    config.queue = args.queue.settings(&hostname);
    if config.queue.is_some() && mode == ClientAuthMode::Passthrough {
        // The queue delivers later, without the client: it would need the client's
        // password, which is never stored.
        bail!(
            "--queue-dir needs the proxy's own login (--smtp-user or --smtp-oauth2-account \
             with --client-auth local or none): passthrough credentials are never stored"
        );
    }

    // Queued messages are accepted by the queue whatever the backend says; the client
    // should still hear of a refused recipient at its RCPT, and a queue run must know
    // each recipient's fate to deliver to the others.
    let recipient_check = match (&config.queue, args.recipient_check) {
        (None, check) => check.unwrap_or(backend::RecipientCheck::WithMessage),
        (Some(_), Some(backend::RecipientCheck::WithMessage)) => {
            log::warn!(
                "smtp: --recipient-check with-message does not go with --queue-dir: at-rcpt"
            );
            backend::RecipientCheck::AtRcpt
        }
        (Some(_), _) => backend::RecipientCheck::AtRcpt,
    };
    let backend = match target {
        Some((host, port, tls, tls_connector)) => Some(Backend {
            host,
            port,
            tls,
            tls_connector,
            timeouts: args.backend.timeouts(),
            end_of_data_timeout: backend::END_OF_DATA_TIMEOUT,
            hello: hostname.clone(),
            credentials,
            oauth2,
            recipient_check,
        }),
        None => {
            anyhow::ensure!(
                credentials.is_none() && oauth2.is_none(),
                "--smtp-user and --smtp-oauth2-account log in to --smtp-host, which is not given"
            );
            None
        }
    };
    anyhow::ensure!(
        Backend::open_limit_of(args.backend.timeouts()).is_some(),
        "--connect-timeout {} and --backend-timeout {} are too large to add up",
        args.backend.connect_timeout,
        args.backend.backend_timeout
    );
    let routing = accounts.map(|accounts| Routing {
        accounts,
        defaults: router::Defaults {
            tls: args.backend.tls(),
            timeouts: args.backend.timeouts(),
            hello: hostname,
            oauth2_dir: args.oauth2.oauth2_dir.clone(),
            recipient_check,
        },
        pop_dir: args.accounts.pop_before_smtp_dir.clone(),
    });
    Ok(Settings {
        config,
        backend,
        routing,
    })
}

/// The command-line backend's host, port and TLS (`--smtp-host` and the legacy variables).
fn smtp_target(
    args: &Args,
    host: String,
) -> anyhow::Result<(String, u16, TlsMode, Option<native_tls::TlsConnector>)> {
    let tls = match args.smtp_tls {
        Some(mode) => mode,
        None => legacy::tls_mode("BACKEND_SMTP_USE_SSL", "BACKEND_SMTP_USE_TLS")?
            .unwrap_or(TlsMode::Implicit),
    };
    let port = match args.smtp_port {
        Some(port) => port,
        None => match legacy::env("BACKEND_SMTP_PORT") {
            Some(p) => p
                .parse()
                .with_context(|| format!("BACKEND_SMTP_PORT={p} is not a port"))?,
            None => match tls {
                TlsMode::Implicit => 465,
                TlsMode::Starttls => 587,
                TlsMode::None => 25,
            },
        },
    };
    if tls == TlsMode::None {
        log::warn!(
            "smtp: --smtp-tls none: the password and every message cross the network to \
             {host}:{port} unencrypted"
        );
    }
    let tls_connector = match tls {
        TlsMode::None => None,
        _ => Some(args.backend.tls().connector()?),
    };
    Ok((host, port, tls, tls_connector))
}

/// Who may log in with `--client-auth local` and accounts: each account and alias by its
/// section name, with its `clientpassword` or else the --client-password, and
/// --client-user (who may then send as any account).
fn account_users(
    accounts: &Accounts,
    client_user: Option<String>,
    client_password: Option<String>,
) -> anyhow::Result<ClientAuth> {
    let mut users = Vec::new();
    if let Some(user) = client_user {
        let password = client_password.clone().with_context(|| {
            "--client-user has no password: use --client-password-file, \
             LMP_CLIENT_PASSWORD or the systemd credential client-password"
        })?;
        users.push((user, password));
    }
    for account in &accounts.accounts {
        let own = account.client_password.as_ref().map(|p| p.value.clone());
        if let Some(password) = own.or(client_password.clone()) {
            users.push((account.name.clone(), password.clone()));
            for alias in accounts
                .aliases
                .iter()
                .filter(|a| a.account == account.name)
            {
                users.push((alias.name.clone(), password.clone()));
            }
        }
    }
    anyhow::ensure!(
        !users.is_empty(),
        "--client-auth local with --accounts: no client could log in; give the accounts \
         clientpassword= (or clientpassword_file=), or --client-password-file"
    );
    Ok(ClientAuth::Users(users))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// `smtp`'s options alone: the tests need not know the whole command line (`cli`).
    #[derive(clap::Parser)]
    struct Line {
        #[command(flatten)]
        args: Args,
    }

    fn settings_of(extra: &[&str]) -> anyhow::Result<(Config, Backend)> {
        let mut argv = vec!["smtp", "--smtp-host", "smtp.example"];
        argv.extend(extra);
        settings(Line::try_parse_from(argv)?.args, "192.0.2.1:1234")
            .map(|s| (s.config, s.backend.expect("--smtp-host is given")))
    }

    /// A password file that is removed when the test ends.
    struct PasswordFile(String);

    impl std::ops::Deref for PasswordFile {
        type Target = str;
        fn deref(&self) -> &str {
            &self.0
        }
    }

    impl Drop for PasswordFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn password_file(name: &str) -> PasswordFile {
        let path = std::env::temp_dir().join(format!("lmp-smtp-{}-{name}", std::process::id()));
        std::fs::write(&path, "secret\n").unwrap();
        PasswordFile(path.display().to_string())
    }

    #[test]
    fn defaults_are_implicit_tls_on_465_and_passthrough_without_an_smtp_user() {
        let (config, backend) = settings_of(&["--hostname", "gw.example"]).unwrap();
        assert_eq!((backend.tls, backend.port), (TlsMode::Implicit, 465));
        assert!(matches!(config.auth, ClientAuth::Passthrough));
        assert_eq!(config.max_message_size, 35 * 1024 * 1024);
        assert_eq!(config.max_recipients, 100);
        assert_eq!(config.idle_timeout, Duration::from_secs(300));
        assert_eq!(config.client, "192.0.2.1:1234");
        assert_eq!(backend.hello, "gw.example");
        assert!(backend.credentials.is_none());
        let (_, backend) = settings_of(&["--smtp-tls", "starttls"]).unwrap();
        assert_eq!(backend.port, 587);
    }

    #[test]
    fn an_open_relay_must_be_chosen_explicitly() {
        let pw = password_file("open");
        let err = settings_of(&["--smtp-user", "gw", "--smtp-password-file", &pw]).unwrap_err();
        assert!(err.to_string().contains("choose --client-auth"), "{err}");
        let (config, backend) = settings_of(&[
            "--smtp-user",
            "gw",
            "--smtp-password-file",
            &pw,
            "--client-auth",
            "none",
        ])
        .unwrap();
        assert!(matches!(config.auth, ClientAuth::None));
        assert_eq!(backend.credentials, Some(("gw".into(), "secret".into())));
    }

    #[test]
    fn an_oauth2_account_is_the_proxys_own_login_and_excludes_the_others() {
        let err = settings_of(&["--smtp-oauth2-account", "work"]).unwrap_err();
        assert!(err.to_string().contains("choose --client-auth"), "{err}");
        let (_, backend) =
            settings_of(&["--smtp-oauth2-account", "work", "--client-auth", "none"]).unwrap();
        assert_eq!(backend.oauth2.as_ref().map(|a| a.name()), Some("work"));
        assert!(backend.credentials.is_none());
        for extra in [
            &["--client-auth", "passthrough"][..],
            &["--client-auth", "none", "--smtp-user", "gw"],
        ] {
            let mut args = vec!["--smtp-oauth2-account", "work"];
            args.extend(extra);
            assert!(settings_of(&args).is_err(), "{extra:?}");
        }
    }

    #[test]
    fn recipients_are_checked_with_the_message_unless_asked_or_queueing() {
        use backend::RecipientCheck::{AtRcpt, WithMessage};
        let pw = password_file("rcpt-check");
        let own_login = ["--smtp-user", "gw", "--smtp-password-file", &pw];
        let check = |extra: &[&str]| {
            let mut args = own_login.to_vec();
            args.extend(["--client-auth", "none"]);
            args.extend(extra);
            settings_of(&args).unwrap().1.recipient_check
        };
        assert_eq!(check(&[]), WithMessage);
        assert_eq!(check(&["--recipient-check", "at-rcpt"]), AtRcpt);
        assert_eq!(check(&["--queue-dir", "/var/q"]), AtRcpt);
        // Overruled (with a warning): the queue must know each recipient's fate.
        let queued = ["--queue-dir", "/var/q", "--recipient-check", "with-message"];
        assert_eq!(check(&queued), AtRcpt);
    }

    #[test]
    fn the_queue_needs_the_proxys_own_login_and_defaults_to_five_days() {
        let err = settings_of(&["--queue-dir", "/var/q"]).unwrap_err();
        assert!(
            err.to_string()
                .contains("passthrough credentials are never stored"),
            "{err}"
        );
        let pw = password_file("queue");
        let (config, _) = settings_of(&[
            "--smtp-user",
            "gw",
            "--smtp-password-file",
            &pw,
            "--client-auth",
            "none",
            "--queue-dir",
            "/var/q",
            "--queue-max-size",
            "1000",
            "--queue-bounce-to",
            "admin@example.org",
        ])
        .unwrap();
        let mode = config.queue.expect("queue mode");
        assert_eq!(mode.queue.dir, PathBuf::from("/var/q"));
        assert_eq!(mode.queue.max_size, Some(1000));
        assert_eq!(mode.policy.lifetime, Duration::from_secs(5 * 86400));
        assert_eq!(mode.policy.bounce_to.as_deref(), Some("admin@example.org"));
        let (config, _) = settings_of(&["--hostname", "gw.example"]).unwrap();
        assert!(config.queue.is_none(), "off unless asked for");
        assert!(settings_of(&["--queue-lifetime", "5w"]).is_err());
        assert!(settings_of(&["--queue-bounce-to", "a b@c"]).is_err());
    }

    #[test]
    fn local_auth_needs_a_user_and_a_password() {
        let err = settings_of(&["--client-auth", "local"]).unwrap_err();
        assert!(err.to_string().contains("--client-user"), "{err}");
        let err = settings_of(&["--client-user", "dev"]).unwrap_err();
        assert!(err.to_string().contains("no password"), "{err}");
        let pw = password_file("local");
        let (config, _) =
            settings_of(&["--client-user", "dev", "--client-password-file", &pw]).unwrap();
        assert!(config.auth.check_local("dev", "secret"));
    }

    #[test]
    fn malformed_addresses_in_options_are_refused_at_startup() {
        for (option, value) in [
            ("--force-sender", "a b@c"),
            ("--rewrite-from", "nobody"),
            ("--reply-to", "x@y>"),
            ("--allowed-senders", "@"),
            ("--sender-domain", "a@b"),
            ("--sender-domain", "lan example"),
        ] {
            assert!(settings_of(&[option, value]).is_err(), "{option} {value}");
        }
        let (config, _) = settings_of(&["--allowed-senders", "a@b.example,@c.example"]).unwrap();
        assert!(config.allowed_senders.allows("x@c.example"));
        assert!(!config.allowed_senders.allows("x@b.example"));
        let (config, _) =
            settings_of(&["--sender-domain", "lan.example", "--require-helo"]).unwrap();
        assert_eq!(config.sender_domain.as_deref(), Some("lan.example"));
        assert!(config.require_helo);
    }

    #[test]
    fn accounts_choose_the_backend_and_the_client_logins() {
        let dir = std::env::temp_dir().join(format!("lmp-smtp-accounts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("smtpproxy.ini");
        std::fs::write(
            &file,
            "[a@x.example]\nsmtphost=h\nclientpassword=own\n[b@x.example]\nsmtphost=h\n\
             [c@x.example]\nuse=a@x.example\n",
        )
        .unwrap();
        std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let parse = |extra: &[&str]| {
            let mut argv = vec![
                "legacy-mail-proxy",
                "smtp",
                "--accounts",
                file.to_str().unwrap(),
            ];
            argv.extend(extra);
            match crate::cli::Cli::try_parse_from(argv).unwrap().command {
                crate::cli::Command::Smtp(args) => settings(*args, "192.0.2.1:1234"),
                _ => unreachable!(),
            }
        };
        let pw = password_file("accounts");
        // Without --smtp-host there is no command-line backend; passthrough cannot work.
        let s = parse(&["--client-auth", "none"]).unwrap();
        assert!(s.backend.is_none() && s.routing.is_some());
        for (extra, says) in [
            (&[][..], "choose --client-auth"),
            (
                &["--client-auth", "passthrough"],
                "passthrough does not go with --accounts",
            ),
            (
                &["--client-auth", "none", "--force-sender", "x@y.example"],
                "returnpath",
            ),
            (
                &[
                    "--client-auth",
                    "none",
                    "--smtp-user",
                    "u",
                    "--smtp-password-file",
                    &pw,
                ],
                "--smtp-host",
            ),
        ] {
            let err = parse(extra).err().unwrap();
            assert!(format!("{err:#}").contains(says), "{extra:?}: {err:#}");
        }
        // Each account (and alias) logs in by its name: its own password, else the shared one.
        let s = parse(&["--client-auth", "local", "--client-password-file", &pw]).unwrap();
        for (user, password, ok) in [
            ("a@x.example", "own", true),
            ("c@x.example", "own", true),
            ("a@x.example", "secret", false),
            ("b@x.example", "secret", true),
            ("b@x.example", "own", false),
        ] {
            assert_eq!(
                s.config.auth.check_local(user, password),
                ok,
                "{user} {password}"
            );
        }
        let s = parse(&["--client-auth", "local"]).unwrap();
        assert!(
            !s.config.auth.check_local("b@x.example", ""),
            "no password, no login"
        );
        std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .unwrap();
        let err = parse(&["--client-auth", "none"]).err().unwrap();
        assert!(
            err.downcast_ref::<accounts::FileError>().is_some(),
            "{err:#}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn out_of_range_durations_are_clear_errors_not_panics() {
        let huge = u64::MAX.to_string();
        for (args, expected) in [
            (["--auth-failure-delay", "1e30"], "--auth-failure-delay"),
            (["--auth-failure-delay", "61"], "--auth-failure-delay"),
            (["--smtp-keepalive", "0"], "--smtp-keepalive"),
            (["--smtp-keepalive", "1e30"], "--smtp-keepalive"),
            (["--backend-timeout", &huge], "too large"),
            (["--connect-timeout", &huge], "too large"),
        ] {
            let err = settings_of(&args).unwrap_err();
            assert!(format!("{err:#}").contains(expected), "{args:?}: {err:#}");
        }
        for bad in ["-1", "inf", "NaN", "x"] {
            assert!(
                settings_of(&["--auth-failure-delay", bad]).is_err(),
                "{bad}"
            );
        }
        let (config, backend) =
            settings_of(&["--auth-failure-delay", "0.5", "--smtp-keepalive", "0.25"]).unwrap();
        assert_eq!(config.auth_failure_delay, Duration::from_millis(500));
        assert_eq!(config.keepalive, Duration::from_millis(250));
        assert_eq!(config.tick, Duration::from_millis(250));
        assert_eq!(backend.end_of_data_timeout, Duration::from_secs(600));
    }
}
