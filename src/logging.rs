//! Where log lines go: syslog (facility mail), stderr, or nowhere.
//!
//! stdout is the client's socket, and under xinetd so is stderr, so stderr is used only when
//! asked for (systemd sends it to the journal with `StandardError=journal`). When syslog is
//! unreachable the proxy stays silent rather than falling back to the socket.

use log::LevelFilter;

pub const IDENT: &str = "legacy-mail-proxy";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogTarget {
    Syslog,
    Stderr,
    Off,
}

pub fn init(target: LogTarget, level: LevelFilter) {
    match target {
        LogTarget::Off => {}
        LogTarget::Syslog => {
            let formatter = syslog::Formatter3164 {
                facility: syslog::Facility::LOG_MAIL,
                hostname: None,
                process: IDENT.into(),
                pid: std::process::id(),
            };
            // Only the local socket: `syslog::init` would fall back to the network.
            if let Ok(logger) = syslog::unix(formatter)
                && log::set_boxed_logger(Box::new(WithoutNoise(syslog::BasicLogger::new(logger))))
                    .is_ok()
            {
                log::set_max_level(level);
            }
        }
        LogTarget::Stderr => {
            // systemd sets JOURNAL_STREAM when stderr is connected to the journal; a
            // "<N>" prefix then gives each line its syslog priority (sd-daemon(3)).
            let journal = std::env::var_os("JOURNAL_STREAM").is_some();
            if log::set_boxed_logger(Box::new(WithoutNoise(StderrLogger { journal }))).is_ok() {
                log::set_max_level(level);
            }
        }
    }
}

/// Passes every record on except those that say nothing true about this process.
struct WithoutNoise<L>(L);

impl<L: log::Log> log::Log for WithoutNoise<L> {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        self.0.enabled(metadata)
    }
    fn log(&self, record: &log::Record) {
        if !is_noise(record) {
            self.0.log(record);
        }
    }
    fn flush(&self) {
        self.0.flush();
    }
}

/// native-tls logs `load_verify_locations cert file error … no certificate or crl found`
/// for every connector it builds when `SSL_CERT_FILE` holds no certificate. That reads
/// like a CA problem, but it is only `tls::avoid_parsing_ca_bundles` at work: it points
/// `SSL_CERT_FILE` at /dev/null on purpose, and the real roots (`--ca-file`, or the
/// system's hashed directory) are loaded elsewhere. The record is dropped only then; with
/// an admin's own `SSL_CERT_FILE` it means what it says and is kept.
fn is_noise(record: &log::Record) -> bool {
    record.target().starts_with("native_tls")
        && record
            .args()
            .to_string()
            .starts_with("load_verify_locations cert file error")
        && std::env::var_os("SSL_CERT_FILE").is_some_and(|file| file == "/dev/null")
}

struct StderrLogger {
    journal: bool,
}

/// The syslog priority of a level, for the journal's "<N>" line prefix.
fn priority(level: log::Level) -> u8 {
    match level {
        log::Level::Error => 3,
        log::Level::Warn => 4,
        log::Level::Info => 6,
        log::Level::Debug | log::Level::Trace => 7,
    }
}

impl log::Log for StderrLogger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::max_level()
    }
    fn log(&self, record: &log::Record) {
        use std::io::Write;
        if self.enabled(record.metadata()) {
            // One write per line so lines from concurrent processes do not interleave.
            let line = if self.journal {
                // The journal records ident and pid itself.
                format!("<{}>{}\n", priority(record.level()), record.args())
            } else {
                format!(
                    "{IDENT}[{}]: {}: {}\n",
                    std::process::id(),
                    record.level(),
                    record.args()
                )
            };
            let _ = std::io::stderr().write_all(line.as_bytes());
        }
    }
    fn flush(&self) {}
}
