//! The command line: the global options and one subcommand per protocol. The option groups
//! the subcommands share are in `options`, so that they need not import this module.
//!
//! Every option also reads an environment variable (`LMP_…`), so xinetd `env =` lines and
//! systemd `EnvironmentFile=` work without long command lines. Passwords are never options.

use crate::logging::LogTarget;
use crate::options::BackendOptions;

/// `--version`: the release and the git commit it was built from (see build.rs).
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (git ",
    env!("LMP_GIT_COMMIT"),
    ")"
);

#[derive(Debug, clap::Parser)]
#[command(
    name = "legacy-mail-proxy",
    version = VERSION,
    about,
    propagate_version = true
)]
pub struct Cli {
    /// Where log lines go. stdout is the client's socket and never gets logs; under xinetd
    /// stderr is the socket too, so use `stderr` only under systemd or by hand.
    #[arg(
        long,
        global = true,
        env = "LMP_LOG",
        value_enum,
        default_value = "syslog"
    )]
    pub log: LogTarget,

    /// Least severe level logged: error, warn, info, debug or trace.
    #[arg(long, global = true, env = "LMP_LOG_LEVEL", default_value = "info")]
    pub log_level: log::LevelFilter,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Serve one POP3 client on stdin/stdout from a mailbox read over IMAP.
    Pop3(Box<crate::pop3::Args>),
    /// Serve one SMTP client on stdin/stdout, relaying through an SMTP submission server.
    Smtp(Box<crate::smtp::Args>),
    /// Join a plain-text client on stdin/stdout to a TLS server (implicit TLS or STARTTLS).
    Tunnel(crate::tunnel::Args),
    /// Manage the OAuth2 accounts the backends log in with (run by the admin).
    Oauth2(crate::oauth2::admin::Args),
    /// Deliver and manage the queue of `smtp --queue-dir` (run by a timer, cron or the admin).
    Queue(crate::smtp::queue::admin::Args),
    /// Write a self-signed certificate and key for --client-tls (for a lab).
    MakeCert(crate::client_tls::make_cert::Args),
}

impl Command {
    /// The backend options of whichever subcommand was chosen (`make-cert` has none).
    pub fn backend(&self) -> Option<&BackendOptions> {
        match self {
            Command::Pop3(args) => Some(&args.backend),
            Command::Smtp(args) => Some(&args.backend),
            Command::Tunnel(args) => Some(&args.backend),
            Command::Oauth2(args) => Some(args.backend()),
            Command::Queue(args) => Some(args.backend()),
            Command::MakeCert(_) => None,
        }
    }
}
