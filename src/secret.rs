//! Where passwords come from. Never the command line: arguments show in `ps`.
//!
//! Sources, first match wins: a `--…-password-file` option, an environment variable (the
//! proxy's own name, then the Python legacy-email-proxy's), and a systemd credential
//! (`LoadCredential=` puts it in `$CREDENTIALS_DIRECTORY`).

use anyhow::Context;
use std::path::{Path, PathBuf};

/// Reads a secret, or `None` when no source has one.
pub fn load(
    file: Option<&Path>,
    env_names: &[&str],
    credential: &str,
) -> anyhow::Result<Option<String>> {
    if let Some(path) = file {
        return read_file(path).map(Some);
    }
    for name in env_names {
        if let Ok(value) = std::env::var(name) {
            return Ok(Some(value));
        }
    }
    if let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY") {
        let path = PathBuf::from(dir).join(credential);
        if path.exists() {
            return read_file(&path).map(Some);
        }
    }
    Ok(None)
}

/// A secret file holds the secret and at most one line ending, which editors add.
fn read_file(path: &Path) -> anyhow::Result<String> {
    let mut text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read secret file {}", path.display()))?;
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    Ok(text)
}

/// Compares two secrets without revealing through timing where they first differ.
pub fn equal(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for (i, x) in a.iter().enumerate() {
        diff |= usize::from(x ^ b.get(i % b.len().max(1)).copied().unwrap_or(0));
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_wins_and_loses_one_line_ending() {
        let dir = std::env::temp_dir().join(format!("lmp-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("pw");
        std::fs::write(&path, "p a:ss\"\\\r\n").unwrap();
        assert_eq!(
            load(Some(&path), &["PATH"], "x").unwrap().as_deref(),
            Some("p a:ss\"\\")
        );
        std::fs::write(&path, "two\n\n").unwrap();
        assert_eq!(
            load(Some(&path), &[], "x").unwrap().as_deref(),
            Some("two\n")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_file_is_an_error_not_an_empty_password() {
        assert!(load(Some(Path::new("/nonexistent/pw")), &[], "x").is_err());
    }

    #[test]
    fn equal_compares_whole_secrets() {
        assert!(equal(b"secret", b"secret"));
        assert!(!equal(b"secret", b"secreT"));
        assert!(!equal(b"secret", b"secret2"));
        assert!(!equal(b"", b"x"));
        assert!(equal(b"", b""));
    }
}
