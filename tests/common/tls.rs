//! Test certificates made with the `openssl` command: a private CA with a server
//! certificate for `localhost`, and a second, unrelated CA with its own server
//! certificate for the "untrusted" endpoints. EC P-256 keys, because they are generated
//! in milliseconds and every client used here (OpenSSL, Python, Perl, curl) accepts them.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

pub struct TlsFiles {
    /// Our CA: clients that trust this file must accept the servers.
    pub ca_cert: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// The other CA: clients that trust only `ca_cert` must reject its certificates.
    pub untrusted_ca_cert: PathBuf,
    pub untrusted_cert: PathBuf,
    pub untrusted_key: PathBuf,
}

/// Both server certificates carry the same names, so the only difference a client can
/// see is the issuing CA.
const SERVER_EXTENSIONS: &str = "\
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost, IP:127.0.0.1, IP:127.0.0.2
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
";

fn openssl(dir: &Path, args: &[&str]) -> Result<(), String> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .map_err(|e| format!("cannot run openssl: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "openssl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn new_key(dir: &Path, name: &str) -> Result<(), String> {
    openssl(
        dir,
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            name,
        ],
    )
}

fn new_ca(dir: &Path, name: &str, subject: &str) -> Result<(), String> {
    new_key(dir, &format!("{name}.key"))?;
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-new",
            "-key",
            &format!("{name}.key"),
            "-subj",
            subject,
            "-days",
            "3650",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-out",
            &format!("{name}.crt"),
        ],
    )
}

fn new_server_cert(dir: &Path, name: &str, ca: &str) -> Result<(), String> {
    new_key(dir, &format!("{name}.key"))?;
    openssl(
        dir,
        &[
            "req",
            "-new",
            "-key",
            &format!("{name}.key"),
            "-subj",
            "/CN=localhost",
            "-out",
            &format!("{name}.csr"),
        ],
    )?;
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.crt"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-days",
            "3650",
            "-extfile",
            "server.ext",
            "-out",
            &format!("{name}.crt"),
        ],
    )
}

/// Creates everything under `dir` (which must exist).
pub fn generate(dir: &Path) -> Result<TlsFiles, String> {
    fs::write(dir.join("server.ext"), SERVER_EXTENSIONS).map_err(|e| e.to_string())?;
    new_ca(dir, "ca", "/CN=legacy-mail-proxy test CA")?;
    new_server_cert(dir, "server", "ca")?;
    new_ca(dir, "untrusted-ca", "/CN=untrusted test CA")?;
    new_server_cert(dir, "untrusted", "untrusted-ca")?;
    Ok(TlsFiles {
        ca_cert: dir.join("ca.crt"),
        server_cert: dir.join("server.crt"),
        server_key: dir.join("server.key"),
        untrusted_ca_cert: dir.join("untrusted-ca.crt"),
        untrusted_cert: dir.join("untrusted.crt"),
        untrusted_key: dir.join("untrusted.key"),
    })
}
