//! Option groups that several subcommands share (backend TLS and timeouts, login limits,
//! the OAuth2 store, client TLS), and the clap glue for the enums of lower modules.
//!
//! The subcommands import these; only `cli` imports the subcommands. So `net`, `starttls`
//! and the protocol cores stay free of clap, and nothing imports its way back up.

use crate::frontend::login::MAX_FAILURE_DELAY;
use crate::net::{Timeouts, TlsMode};
use crate::starttls::Protocol;
use crate::tls::TlsOptions;
use clap::builder::FalseyValueParser;
use std::path::PathBuf;
use std::time::Duration;

/// Backend TLS and timeout options, shared by every subcommand.
#[derive(Debug, Clone, clap::Args)]
pub struct BackendOptions {
    /// PEM file with the CA certificate(s) that signed the backend's certificate. When given,
    /// only these CAs are trusted (not the system's).
    #[arg(long, env = "LMP_CA_FILE", value_name = "PEM")]
    pub ca_file: Option<PathBuf>,

    /// Accept any backend certificate and host name. Anyone between the proxy and the
    /// backend can then read passwords and mail. For lab use only.
    #[arg(long, env = "LMP_DANGER_ACCEPT_INVALID_CERTS", value_parser = FalseyValueParser::new(), default_value = "false")]
    pub danger_accept_invalid_certs: bool,

    /// Seconds to wait for the backend's TCP connection.
    #[arg(
        long,
        env = "LMP_CONNECT_TIMEOUT",
        default_value = "15",
        value_name = "SECONDS"
    )]
    pub connect_timeout: u64,

    /// Seconds to wait for any single backend read or write.
    #[arg(
        long,
        env = "LMP_BACKEND_TIMEOUT",
        default_value = "120",
        value_name = "SECONDS"
    )]
    pub backend_timeout: u64,
}

impl BackendOptions {
    pub fn tls(&self) -> TlsOptions {
        TlsOptions {
            ca_file: self.ca_file.clone(),
            danger_accept_invalid_certs: self.danger_accept_invalid_certs,
        }
    }

    pub fn timeouts(&self) -> Timeouts {
        Timeouts {
            connect: Duration::from_secs(self.connect_timeout.max(1)),
            io: Duration::from_secs(self.backend_timeout.max(1)),
        }
    }
}

/// Limits on failed logins (POP3 USER/PASS and AUTH, SMTP AUTH), shared by the servers.
#[derive(Debug, Clone, clap::Args)]
pub struct LoginLimits {
    /// Seconds to wait before answering a failed login (slows password guessing; at most
    /// 60).
    #[arg(
        long,
        env = "LMP_AUTH_FAILURE_DELAY",
        default_value = "2",
        value_name = "SECONDS",
        value_parser = failure_delay
    )]
    pub auth_failure_delay: f64,

    /// Failed logins before the connection is closed.
    #[arg(long, env = "LMP_MAX_AUTH_FAILURES", default_value = "3")]
    pub max_auth_failures: u32,
}

impl LoginLimits {
    /// The delay (at most [`MAX_FAILURE_DELAY`]: the parser refuses more).
    pub fn delay(&self) -> Duration {
        Duration::from_secs_f64(self.auth_failure_delay)
    }

    /// At least one failure is always allowed.
    pub fn max_failures(&self) -> u32 {
        self.max_auth_failures.max(1)
    }
}

/// A number of seconds: finite and not negative (`from_secs_f64` panics otherwise).
pub fn seconds(value: &str) -> Result<f64, String> {
    match value.parse::<f64>() {
        Ok(seconds) if seconds.is_finite() && seconds >= 0.0 => Ok(seconds),
        _ => Err(format!("{value:?} is not a number of seconds")),
    }
}

/// Where OAuth2 accounts live: shared by the `oauth2` admin commands, `pop3` and `smtp`.
#[derive(Debug, Clone, clap::Args)]
pub struct OAuth2Options {
    /// Directory of the OAuth2 token store, one file per account. Shared by every instance
    /// (like the lock directory) and writable by the service user only.
    #[arg(
        long,
        env = "LMP_OAUTH2_DIR",
        default_value = "/var/lib/legacy-mail-proxy/oauth2",
        value_name = "DIR"
    )]
    pub oauth2_dir: PathBuf,
}

/// TLS toward the client (`pop3` and `smtp`), off by default.
#[derive(Debug, Clone, clap::Args)]
pub struct ClientTlsOptions {
    /// TLS toward clients: none; starttls (STLS/STARTTLS offered on the plain port); or
    /// implicit (TLS from the first byte: POP3S 995, SMTPS 465). Needs a certificate and key.
    #[arg(long, env = "LMP_CLIENT_TLS", value_enum, default_value = "none")]
    pub client_tls: ClientTlsMode,

    /// PEM certificate chain shown to clients [default: the systemd credential
    /// `client-tls-cert`].
    #[arg(long, env = "LMP_CLIENT_TLS_CERT", value_name = "PEM")]
    pub client_tls_cert: Option<PathBuf>,

    /// PEM private key of that certificate [default: the systemd credential
    /// `client-tls-key`].
    #[arg(long, env = "LMP_CLIENT_TLS_KEY", value_name = "PEM")]
    pub client_tls_key: Option<PathBuf>,

    /// Refuse logins (POP3 USER/PASS/AUTH, SMTP AUTH and MAIL) until the client has started
    /// TLS.
    #[arg(long, env = "LMP_CLIENT_TLS_REQUIRED", value_parser = FalseyValueParser::new(), default_value = "false")]
    pub client_tls_required: bool,

    /// Oldest TLS version accepted from clients: 1.0, 1.1, 1.2 or 1.3. Below 1.2 OpenSSL
    /// runs at security level 0 with its legacy ciphers, for old devices: see the README's
    /// security notes. The backend side always stays TLS 1.2+ and verified.
    #[arg(long, env = "LMP_CLIENT_TLS_MIN_VERSION", default_value = "1.2", value_name = "VERSION", value_parser = tls_version)]
    pub client_tls_min_version: crate::client_tls::server::MinVersion,

    /// Seconds a client may take for its TLS handshake.
    #[arg(
        long,
        env = "LMP_CLIENT_TLS_HANDSHAKE_TIMEOUT",
        default_value = "30",
        value_name = "SECONDS"
    )]
    pub client_tls_handshake_timeout: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ClientTlsMode {
    None,
    Starttls,
    Implicit,
}

fn tls_version(value: &str) -> Result<crate::client_tls::server::MinVersion, String> {
    use crate::client_tls::server::MinVersion;
    match value {
        "1.0" | "1" => Ok(MinVersion::Tls10),
        "1.1" => Ok(MinVersion::Tls11),
        "1.2" => Ok(MinVersion::Tls12),
        "1.3" => Ok(MinVersion::Tls13),
        _ => Err(format!("{value:?} is not 1.0, 1.1, 1.2 or 1.3")),
    }
}

impl ClientTlsOptions {
    /// The settings, or `None` without client TLS. A systemd credential stands in for a
    /// file option that is not given.
    pub fn settings(&self) -> anyhow::Result<Option<crate::client_tls::server::Settings>> {
        use crate::client_tls::server::{Mode, Settings};
        let mode = match self.client_tls {
            ClientTlsMode::None => {
                anyhow::ensure!(
                    !self.client_tls_required,
                    "--client-tls-required needs --client-tls starttls or implicit"
                );
                return Ok(None);
            }
            ClientTlsMode::Starttls => Mode::StartTls,
            ClientTlsMode::Implicit => Mode::Implicit,
        };
        let file = |given: &Option<PathBuf>, credential: &str, option: &str| {
            given
                .clone()
                .or_else(|| {
                    let dir = std::env::var_os("CREDENTIALS_DIRECTORY")?;
                    Some(PathBuf::from(dir).join(credential)).filter(|p| p.exists())
                })
                .ok_or_else(|| {
                    anyhow::anyhow!("--client-tls needs {option} (or the credential {credential})")
                })
        };
        Ok(Some(Settings {
            mode,
            cert: file(
                &self.client_tls_cert,
                "client-tls-cert",
                "--client-tls-cert",
            )?,
            key: file(&self.client_tls_key, "client-tls-key", "--client-tls-key")?,
            required: self.client_tls_required,
            min_version: self.client_tls_min_version,
            handshake_timeout: Duration::from_secs(self.client_tls_handshake_timeout.max(1)),
        }))
    }
}

/// `--auth-failure-delay`: seconds, at most [`MAX_FAILURE_DELAY`] (more is a typo, not a
/// policy). Refused as a bad command line, the same way by every server.
fn failure_delay(value: &str) -> Result<f64, String> {
    let seconds = seconds(value)?;
    if seconds > MAX_FAILURE_DELAY.as_secs_f64() {
        return Err(format!(
            "{value} is more than {} seconds",
            MAX_FAILURE_DELAY.as_secs()
        ));
    }
    Ok(seconds)
}

/// Gives clap an enum of a lower module (`net`, `starttls`, the protocol cores), so that
/// the module itself need not know clap: each variant with its value name and help line.
macro_rules! value_enum {
    ($type:ty { $($variant:path => $name:literal: $help:literal),+ $(,)? }) => {
        impl clap::ValueEnum for $type {
            fn value_variants<'a>() -> &'a [Self] {
                &[$($variant),+]
            }

            fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
                Some(match self {
                    $($variant => clap::builder::PossibleValue::new($name).help($help)),+
                })
            }
        }
    };
}
pub(crate) use value_enum;

value_enum!(TlsMode {
    TlsMode::Implicit => "implicit": "TLS from the first byte (IMAPS 993, SMTPS 465, POP3S 995)",
    TlsMode::Starttls => "starttls":
        "Plain greeting, then STARTTLS before anything else (IMAP 143, submission 587)",
    TlsMode::None => "none": "No encryption at all. Passwords cross the network in clear text",
});

value_enum!(Protocol {
    Protocol::Pop3 => "pop3": "POP3 `STLS` (RFC 2595 §4), usually port 110",
    Protocol::Imap => "imap": "IMAP `STARTTLS` (RFC 3501 §6.2.1), usually port 143",
    Protocol::Smtp => "smtp": "SMTP `EHLO` + `STARTTLS` (RFC 3207), usually port 587 or 25",
});
