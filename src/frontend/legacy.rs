//! The environment names of the Python legacy-email-proxy (`BACKEND_*`), honoured when our
//! own option is not given, so that its xinetd and systemd set-ups keep working. Both
//! servers read them the same way; the README's configuration reference lists them next to
//! our options.

use crate::net::TlsMode;

/// A setting, when it is set and not empty.
pub fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// A boolean setting (`true`/`false`, `1`/`0`, `yes`/`no`, `on`/`off`, any case).
pub fn flag(name: &str) -> anyhow::Result<Option<bool>> {
    match env(name) {
        None => Ok(None),
        Some(v) => match v.to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => Ok(Some(true)),
            "0" | "false" | "no" | "off" => Ok(Some(false)),
            _ => anyhow::bail!("{name}={v} is not a boolean (use true or false)"),
        },
    }
}

/// The TLS mode from a pair of its flags, for IMAP `BACKEND_IMAP_USE_SSL` +
/// `BACKEND_IMAP_USE_STARTTLS` and for SMTP `BACKEND_SMTP_USE_SSL` + `BACKEND_SMTP_USE_TLS`.
/// One meaning for both: SSL true is implicit TLS; STARTTLS true is STARTTLS; SSL false
/// (and STARTTLS not true) is a plain connection, which is how the Python proxy was told
/// to use one; neither set is `None` (our default applies). Both true contradict each
/// other and are refused rather than one silently winning.
pub fn tls_mode(ssl_name: &str, starttls_name: &str) -> anyhow::Result<Option<TlsMode>> {
    Ok(match (flag(ssl_name)?, flag(starttls_name)?) {
        (Some(true), Some(true)) => {
            anyhow::bail!("{ssl_name} and {starttls_name} are both true: set only one")
        }
        (Some(true), _) => Some(TlsMode::Implicit),
        (_, Some(true)) => Some(TlsMode::Starttls),
        (Some(false), _) => Some(TlsMode::None),
        (None, _) => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `check` with the two variables set (or unset) as given. Each test uses its
    /// own names, so tests running in parallel threads do not see each other's.
    fn with(
        names: (&str, &str),
        values: (Option<&str>, Option<&str>),
    ) -> anyhow::Result<Option<TlsMode>> {
        for (name, value) in [(names.0, values.0), (names.1, values.1)] {
            // SAFETY: the names are unique to this test; nothing else reads them.
            match value {
                Some(v) => unsafe { std::env::set_var(name, v) },
                None => unsafe { std::env::remove_var(name) },
            }
        }
        tls_mode(names.0, names.1)
    }

    #[test]
    fn one_meaning_for_the_pair() {
        let names = ("LMP_TEST_LEGACY_SSL", "LMP_TEST_LEGACY_STARTTLS");
        assert_eq!(with(names, (None, None)).unwrap(), None);
        assert_eq!(with(names, (Some(""), None)).unwrap(), None);
        assert_eq!(
            with(names, (Some("true"), None)).unwrap(),
            Some(TlsMode::Implicit)
        );
        assert_eq!(
            with(names, (Some("1"), Some("no"))).unwrap(),
            Some(TlsMode::Implicit)
        );
        assert_eq!(
            with(names, (None, Some("yes"))).unwrap(),
            Some(TlsMode::Starttls)
        );
        assert_eq!(
            with(names, (Some("false"), Some("TRUE"))).unwrap(),
            Some(TlsMode::Starttls)
        );
        assert_eq!(
            with(names, (Some("false"), None)).unwrap(),
            Some(TlsMode::None)
        );
        assert_eq!(
            with(names, (Some("off"), Some("off"))).unwrap(),
            Some(TlsMode::None)
        );
        let both = with(names, (Some("true"), Some("true")))
            .unwrap_err()
            .to_string();
        assert!(both.contains("both true"), "{both}");
        let junk = with(names, (Some("maybe"), None)).unwrap_err().to_string();
        assert!(junk.contains("LMP_TEST_LEGACY_SSL=maybe"), "{junk}");
    }
}
