//! `legacy-mail-proxy pop3`: a POP3 server (RFC 1939, 2449, 3206, 5034) on stdin/stdout
//! whose maildrop is a mailbox on an IMAP server.

pub mod command;
pub mod encode;
pub mod maildrop;
pub mod memory;
pub mod reply;
pub mod session;

use crate::cli::BackendOptions;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AuthMode {
    /// The client's USER/PASS or AUTH PLAIN log in to IMAP; the IMAP server decides.
    Passthrough,
    /// The proxy logs in with --imap-user and its password; clients are checked against
    /// --client-user and its password.
    Fixed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeletePolicy {
    /// DELE never changes the server.
    Keep,
    /// Deleted messages get a keyword (--deleted-keyword) and are hidden from later sessions.
    Hide,
    /// Deleted messages are moved to --trash-mailbox.
    Trash,
    /// Deleted messages are flagged \Deleted and removed with UID EXPUNGE (RFC 4315).
    Expunge,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum NulBytes {
    /// Replace each NUL byte with 0x80, as Dovecot does; sizes stay the same.
    Replace,
    /// Pass NUL bytes through unchanged (some clients, Outlook among them, hang on them).
    Keep,
}

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

    /// How clients are authenticated [default: fixed when --imap-user is set, else
    /// passthrough].
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

    /// The user name clients must give with --auth fixed. Its password comes from
    /// --client-password-file, LMP_CLIENT_PASSWORD or the systemd credential
    /// `client-password`.
    #[arg(long, env = "LMP_CLIENT_USER")]
    pub client_user: Option<String>,

    /// File holding the password clients must give with --auth fixed.
    #[arg(long, env = "LMP_CLIENT_PASSWORD_FILE", value_name = "FILE")]
    pub client_password_file: Option<PathBuf>,

    /// With --auth fixed, accept any client user and password. Anyone who can reach the
    /// port can then read and delete the mailbox.
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

    /// Seconds to wait before answering a failed login (slows password guessing).
    #[arg(
        long,
        env = "LMP_AUTH_FAILURE_DELAY",
        default_value = "2",
        value_name = "SECONDS"
    )]
    pub auth_failure_delay: f64,

    /// Failed logins before the connection is closed.
    #[arg(long, env = "LMP_MAX_AUTH_FAILURES", default_value = "3")]
    pub max_auth_failures: u32,

    /// Advertise RFC 2449 EXPIRE with this value (days, or NEVER) when the IMAP server's
    /// retention policy is known. Not advertised by default.
    #[arg(long, env = "LMP_CAPA_EXPIRE", value_name = "DAYS|NEVER")]
    pub capa_expire: Option<String>,
}

pub fn serve(_args: Args) -> ExitCode {
    ExitCode::FAILURE
}
#[cfg(test)]
mod transcript_tests;
