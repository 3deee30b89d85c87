//! `legacy-mail-proxy make-cert`: a self-signed certificate and key for client TLS in a lab
//! (the `openssl req -x509` line of the README, without needing to remember it).
//!
//! RSA 2048 rather than EC, because old devices often know only RSA; SHA-256 signature;
//! every `--host` becomes a subject alternative name (DNS, or IP for an address).

use anyhow::Context;
use openssl::asn1::Asn1Time;
use openssl::bn::{BigNum, MsbOption};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::PKey;
use openssl::rsa::Rsa;
use openssl::x509::extension::{ExtendedKeyUsage, SubjectAlternativeName};
use openssl::x509::{X509, X509NameBuilder};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A name clients connect to; repeat for more (an IP address becomes an IP name).
    #[arg(long, required = true, value_name = "NAME")]
    pub host: Vec<String>,

    /// Where the certificate goes (PEM; never overwritten).
    #[arg(long, default_value = "client-tls.pem", value_name = "FILE")]
    pub cert: PathBuf,

    /// Where the private key goes (PEM, mode 0600; never overwritten).
    #[arg(long, default_value = "client-tls.key", value_name = "FILE")]
    pub key: PathBuf,

    /// Days the certificate is valid.
    #[arg(long, default_value = "3650")]
    pub days: u32,
}

pub fn run(args: Args) -> ExitCode {
    match make(&args) {
        Ok(()) => {
            println!(
                "wrote {} and {} (self-signed for {})",
                args.cert.display(),
                args.key.display(),
                args.host.join(", ")
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("make-cert: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn make(args: &Args) -> anyhow::Result<()> {
    let (cert, key) = generate(&args.host, args.days)?;
    write_new(&args.key, &key, 0o600)?;
    write_new(&args.cert, &cert, 0o644)
}

/// The certificate and the key, both PEM.
fn generate(hosts: &[String], days: u32) -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
    let first = hosts.first().context("--host is needed")?;
    let key = PKey::from_rsa(Rsa::generate(2048)?)?;
    let mut name = X509NameBuilder::new()?;
    name.append_entry_by_nid(Nid::COMMONNAME, first)?;
    let name = name.build();
    let mut builder = X509::builder()?;
    builder.set_version(2)?;
    let mut serial = BigNum::new()?;
    serial.rand(127, MsbOption::MAYBE_ZERO, false)?;
    let serial = serial.to_asn1_integer()?;
    builder.set_serial_number(&serial)?;
    builder.set_subject_name(&name)?;
    builder.set_issuer_name(&name)?;
    builder.set_pubkey(&key)?;
    let (from, until) = (Asn1Time::days_from_now(0)?, Asn1Time::days_from_now(days)?);
    builder.set_not_before(&from)?;
    builder.set_not_after(&until)?;
    let mut names = SubjectAlternativeName::new();
    for host in hosts {
        match host.parse::<std::net::IpAddr>() {
            Ok(_) => names.ip(host),
            Err(_) => names.dns(host),
        };
    }
    let names = names.build(&builder.x509v3_context(None, None))?;
    builder.append_extension(names)?;
    builder.append_extension(ExtendedKeyUsage::new().server_auth().build()?)?;
    builder.sign(&key, MessageDigest::sha256())?;
    Ok((builder.build().to_pem()?, key.private_key_to_pem_pkcs8()?))
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(bytes)
        .with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client_tls::server::{MinVersion, Mode, Settings, acceptor};

    #[test]
    fn the_pair_loads_as_client_tls_and_names_every_host() {
        let dir = std::env::temp_dir().join(format!("lmp-make-cert-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let args = Args {
            host: vec!["mail.lan".into(), "192.0.2.7".into()],
            cert: dir.join("c.pem"),
            key: dir.join("k.pem"),
            days: 30,
        };
        make(&args).unwrap();
        let settings = Settings {
            mode: Mode::Implicit,
            cert: args.cert.clone(),
            key: args.key.clone(),
            required: false,
            min_version: MinVersion::Tls12,
            handshake_timeout: std::time::Duration::from_secs(1),
        };
        acceptor(&settings).unwrap();
        let cert = X509::from_pem(&std::fs::read(&args.cert).unwrap()).unwrap();
        let names = cert.subject_alt_names().unwrap();
        assert_eq!(
            names.iter().filter_map(|n| n.dnsname()).collect::<Vec<_>>(),
            ["mail.lan"]
        );
        assert_eq!(
            names
                .iter()
                .filter_map(|n| n.ipaddress())
                .collect::<Vec<_>>(),
            [&[192u8, 0, 2, 7][..]]
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&args.key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // Existing files are never overwritten.
        assert!(make(&args).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
