//! Building the TLS client configuration shared by every backend connection.
//!
//! Certificates are always verified against the system roots, or only against `--ca-file`
//! when one is given (a private CA should not widen trust to every public CA, nor the
//! reverse). Turning verification off takes an option whose name says what it does.

use anyhow::Context;
use native_tls::{Certificate, TlsConnector};
use std::path::PathBuf;

/// Makes `ca_file` OpenSSL's default CA file for this process. Call it from `main` while the
/// process is still single-threaded.
///
/// native-tls parses the system CA bundle (about 140 certificates) twice whenever it builds
/// a connector: once for OpenSSL's default paths, once more from openssl-probe's result,
/// even with `disable_built_in_roots`, which then throws both away. Measured here: 40–60 ms
/// of CPU per process, more than the rest of a POP3 login. Both loads honour
/// `SSL_CERT_FILE`, so pointing it at `--ca-file` makes them read one small file (2 ms).
/// Trust is unchanged: with `--ca-file`, only its certificates are trusted either way.
pub fn use_ca_file_as_default(ca_file: &std::path::Path) {
    // SAFETY: called from `main` before any thread is spawned, so no other thread can be
    // reading the environment.
    unsafe { std::env::set_var("SSL_CERT_FILE", ca_file) };
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

    /// The same trust settings for lettre's SMTP client (which has its own TLS parameters
    /// type), verifying the certificate for `domain`.
    pub fn lettre_parameters(
        &self,
        domain: &str,
    ) -> anyhow::Result<lettre::transport::smtp::client::TlsParameters> {
        use lettre::transport::smtp::client::{self, CertificateStore, TlsParameters};
        let mut builder = TlsParameters::builder(domain.to_string());
        if let Some(certs) = self.ca_certificates()? {
            builder = builder.certificate_store(CertificateStore::None);
            for cert in certs {
                // lettre's `from_pem` also reads only one certificate: go through DER.
                builder =
                    builder.add_root_certificate(client::Certificate::from_der(cert.to_der()?)?);
            }
        }
        builder = builder
            .dangerous_accept_invalid_certs(self.danger_accept_invalid_certs)
            .dangerous_accept_invalid_hostnames(self.danger_accept_invalid_certs);
        Ok(builder.build_native()?)
    }
}
