//! Building the TLS client configuration shared by every backend connection.
//!
//! Certificates are always verified against the system roots, or only against `--ca-file`
//! when one is given (a private CA should not widen trust to every public CA, nor the
//! reverse). Turning verification off takes an option whose name says what it does.

use anyhow::Context;
use native_tls::{Certificate, TlsConnector};
use std::path::{Path, PathBuf};

/// Where OpenSSL finds the roots when no `--ca-file` is given: the system directory,
/// with one `<subject hash>.<n>` link per certificate (Debian's `update-ca-certificates`
/// keeps it in step with the bundle file).
const SYSTEM_CERT_DIR: &str = "/etc/ssl/certs";

/// The bundle `update-ca-certificates` writes next to the links (and OpenSSL's default file
/// on Debian, through /usr/lib/ssl/cert.pem).
const SYSTEM_CERT_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// What [`avoid_parsing_ca_bundles`] decided, for the debug log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefaultCaFile {
    /// `--ca-file` is the whole trust store; the default file is not read.
    Unused,
    /// The system's hashed directory serves the roots; the default file is not read.
    DirectoryInstead,
    /// Left to OpenSSL: `SSL_CERT_FILE` is the admin's, or no hashed directory exists.
    Kept,
}

/// Stops every process from parsing a CA bundle it does not need. Call it from `main` while
/// the process is still single-threaded (it may set `SSL_CERT_FILE`).
///
/// native-tls loads OpenSSL's default CA file twice whenever it builds a connector (OpenSSL's
/// default paths, then openssl-probe's result), even with `disable_built_in_roots`, which
/// then throws both away. On Debian that file holds about 140 certificates: 40–60 ms of CPU
/// per process, more than a whole POP3 login. Pointing `SSL_CERT_FILE` at an empty file
/// (`/dev/null`) skips both loads:
/// - with `--ca-file`, whose certificates [`TlsOptions::connector`] adds itself (trust is
///   unchanged: only they were trusted before, too);
/// - without it, when the system directory has hashed links: OpenSSL then reads, during the
///   handshake, only the root that the server's chain names. The same roots as the bundle
///   on Debian. An admin's own `SSL_CERT_FILE` is left alone, a system without hashed
///   links (Fedora's /etc/pki) keeps its bundle, and so does a bundle changed after the
///   links (a certificate appended by hand).
pub fn avoid_parsing_ca_bundles(ca_file: Option<&Path>) -> DefaultCaFile {
    let decision = match ca_file {
        Some(_) => DefaultCaFile::Unused,
        None if std::env::var_os("SSL_CERT_FILE").is_some_and(|f| !f.is_empty()) => {
            DefaultCaFile::Kept
        }
        None if has_hashed_links(Path::new(SYSTEM_CERT_DIR))
            && !changed_after(Path::new(SYSTEM_CERT_BUNDLE), Path::new(SYSTEM_CERT_DIR)) =>
        {
            DefaultCaFile::DirectoryInstead
        }
        None => DefaultCaFile::Kept,
    };
    if decision != DefaultCaFile::Kept {
        // SAFETY: called from `main` before any thread is spawned, so no other thread can be
        // reading the environment.
        unsafe { std::env::set_var("SSL_CERT_FILE", "/dev/null") };
    }
    decision
}

/// Whether `file` was modified after `dir`'s entries last changed: a certificate appended to
/// the bundle by hand, which the hashed links lack. `update-ca-certificates` renames the new
/// bundle into place, which changes the directory too, so its bundle never counts as newer.
fn changed_after(file: &Path, dir: &Path) -> bool {
    let modified = |path: &Path| std::fs::metadata(path).and_then(|m| m.modified()).ok();
    match (modified(file), modified(dir)) {
        (Some(file), Some(dir)) => file > dir,
        _ => false,
    }
}

/// Whether `dir` holds OpenSSL's `<8 hex digits>.<n>` certificate links (`openssl rehash`).
fn has_hashed_links(dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries
        .flatten()
        .any(|entry| is_hashed_name(&entry.file_name()))
}

fn is_hashed_name(name: &std::ffi::OsStr) -> bool {
    let name = name.as_encoded_bytes();
    name.len() > 9
        && name[..8].iter().all(u8::is_ascii_hexdigit)
        && name[8] == b'.'
        && name[9..].iter().all(u8::is_ascii_digit)
}

#[derive(Debug, Clone, Default)]
pub struct TlsOptions {
    /// PEM file with one or more CA certificates to trust instead of the system roots.
    pub ca_file: Option<PathBuf>,
    /// Accept any certificate and any host name. Only for lab use.
    pub danger_accept_invalid_certs: bool,
}

impl TlsOptions {
    pub fn connector(&self) -> anyhow::Result<TlsConnector> {
        let mut builder = TlsConnector::builder();
        if let Some(certs) = self.ca_certificates()? {
            for cert in certs {
                builder.add_root_certificate(cert);
            }
            builder.disable_built_in_roots(true);
        }
        if self.danger_accept_invalid_certs {
            builder.danger_accept_invalid_certs(true);
            builder.danger_accept_invalid_hostnames(true);
        }
        Ok(builder.build()?)
    }

    /// The certificates of `--ca-file`, or `None` when the system roots are used.
    pub fn ca_certificates(&self) -> anyhow::Result<Option<Vec<Certificate>>> {
        let Some(path) = &self.ca_file else {
            return Ok(None);
        };
        let pem = std::fs::read(path)
            .with_context(|| format!("cannot read CA file {}", path.display()))?;
        // `from_pem` would read only the first certificate of a bundle.
        let certs = Certificate::stack_from_pem(&pem)
            .with_context(|| format!("CA file {} is not PEM", path.display()))?;
        anyhow::ensure!(
            !certs.is_empty(),
            "CA file {} has no certificate",
            path.display()
        );
        Ok(Some(certs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    #[test]
    fn hashed_link_names_are_recognised() {
        for name in ["002c0b4f.0", "9d04f354.1", "ABCDEF01.12"] {
            assert!(is_hashed_name(OsStr::new(name)), "{name}");
        }
        for name in [
            "ca-certificates.crt",
            "002c0b4f.r0", // a CRL link: not a certificate
            "002c0b4f.",
            "002c0b4.0",
            "002c0b4fx0",
            "README",
        ] {
            assert!(!is_hashed_name(OsStr::new(name)), "{name}");
        }
    }

    #[test]
    fn a_directory_counts_only_with_hashed_links() {
        let dir = std::env::temp_dir().join(format!("lmp-tls-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("ca-bundle.crt"), "").unwrap();
        assert!(!has_hashed_links(&dir));
        std::fs::write(dir.join("5ad8a5d6.0"), "").unwrap();
        assert!(has_hashed_links(&dir));
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(!has_hashed_links(&dir), "a missing directory");
    }

    #[test]
    fn a_bundle_appended_to_after_the_links_counts_as_changed() {
        use std::time::{Duration, SystemTime};
        let dir = std::env::temp_dir().join(format!("lmp-tls-mtime-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bundle = dir.join("ca-certificates.crt");
        let file = std::fs::File::create(&bundle).unwrap();
        // As update-ca-certificates leaves it: the directory changed with the bundle.
        let then = SystemTime::now() - Duration::from_secs(60);
        file.set_modified(then).unwrap();
        std::fs::File::open(&dir)
            .unwrap()
            .set_modified(then)
            .unwrap();
        assert!(!changed_after(&bundle, &dir));
        // `cat extra.pem >> ca-certificates.crt`: only the bundle changes.
        file.set_modified(SystemTime::now()).unwrap();
        assert!(changed_after(&bundle, &dir));
        assert!(!changed_after(&dir.join("missing"), &dir));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
