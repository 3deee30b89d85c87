//! Client logins, the same in `pop3` and `smtp`: the configured client password is compared
//! in constant time, SASL PLAIN is decoded as RFC 4616 says (UTF-8), and every failed login
//! costs the same delay and counts toward the same limit.

use std::time::Duration;

/// Whether `user`/`password` are the configured client credentials. Both are compared,
/// always, without early exit: the time taken says nothing about which part was wrong or
/// how much of it was right.
pub fn client_matches(expected: (&str, &str), user: &str, password: &str) -> bool {
    let user_ok = crate::secret::equal(expected.0.as_bytes(), user.as_bytes());
    let password_ok = crate::secret::equal(expected.1.as_bytes(), password.as_bytes());
    user_ok & password_ok
}

/// Why a SASL PLAIN message was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlainError {
    /// Not `[authzid] NUL authcid NUL passwd`, or an empty user.
    Malformed,
    /// RFC 4616 §2: every part is UTF-8.
    NotUtf8,
    /// An authorization identity other than the user itself (acting for someone else) is
    /// not supported.
    OtherIdentity,
}

impl std::fmt::Display for PlainError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PlainError::Malformed => "malformed PLAIN message",
            PlainError::NotUtf8 => "PLAIN message is not UTF-8",
            PlainError::OtherIdentity => "authorization identity differs from the user",
        })
    }
}

/// Decodes a SASL PLAIN message (RFC 4616 §2): `[authzid] NUL authcid NUL passwd`, into
/// the user and the password.
pub fn decode_plain(message: &[u8]) -> Result<(String, String), PlainError> {
    let mut parts = message.split(|&b| b == 0);
    let (Some(authz), Some(user), Some(password), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(PlainError::Malformed);
    };
    if user.is_empty() {
        return Err(PlainError::Malformed);
    }
    let text = |bytes: &[u8]| String::from_utf8(bytes.to_vec()).map_err(|_| PlainError::NotUtf8);
    let (authz, user, password) = (text(authz)?, text(user)?, text(password)?);
    if !authz.is_empty() && authz != user {
        return Err(PlainError::OtherIdentity);
    }
    Ok((user, password))
}

/// The most `--auth-failure-delay` may be: more is a typo, not a policy, and is refused
/// as a bad command line by both servers.
pub const MAX_FAILURE_DELAY: Duration = Duration::from_secs(60);

/// What comes after a failed login.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterFailure {
    /// Answer the failure; the client may try again.
    TryAgain,
    /// Answer the failure, then close: the limit is reached.
    Close,
}

/// Failed logins of one session: each one waits `delay` before it is answered, so
/// guessing passwords costs time, and the `max`th closes the connection.
#[derive(Debug, Clone)]
pub struct FailedLogins {
    count: u32,
    delay: Duration,
    max: u32,
}

impl FailedLogins {
    /// At least one failure is always allowed; the delay is capped at
    /// [`MAX_FAILURE_DELAY`].
    pub fn new(delay: Duration, max: u32) -> Self {
        FailedLogins {
            count: 0,
            delay: delay.min(MAX_FAILURE_DELAY),
            max: max.max(1),
        }
    }

    /// Counts one failure and waits the delay. The caller answers afterwards (and should
    /// flush what it has already written first, so the delay is not also spent on that).
    pub fn record(&mut self) -> AfterFailure {
        self.count += 1;
        std::thread::sleep(self.delay);
        if self.count >= self.max {
            AfterFailure::Close
        } else {
            AfterFailure::TryAgain
        }
    }

    /// For log lines: "failed (count of max)".
    pub fn count(&self) -> u32 {
        self.count
    }

    pub fn max(&self) -> u32 {
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_is_utf8_with_an_optional_identical_identity() {
        let ok = |user: &str, password: &str| Ok((user.to_string(), password.to_string()));
        assert_eq!(decode_plain(b"\0alice\0p w\xc3\xa9"), ok("alice", "p wé"));
        assert_eq!(decode_plain(b"alice\0alice\0pw"), ok("alice", "pw"));
        assert_eq!(decode_plain(b"\0alice\0"), ok("alice", ""));
        assert_eq!(
            decode_plain(b"root\0alice\0pw"),
            Err(PlainError::OtherIdentity)
        );
        assert_eq!(decode_plain(b"\0alice"), Err(PlainError::Malformed));
        assert_eq!(decode_plain(b"\0\0pw"), Err(PlainError::Malformed));
        assert_eq!(decode_plain(b"\0a\0b\0c"), Err(PlainError::Malformed));
        assert_eq!(decode_plain(b""), Err(PlainError::Malformed));
        // Latin-1 "é" is not UTF-8: refused, in the password and in the user alike.
        assert_eq!(decode_plain(b"\0a\0\xe9"), Err(PlainError::NotUtf8));
        assert_eq!(decode_plain(b"\0\xe9\0pw"), Err(PlainError::NotUtf8));
    }

    #[test]
    fn client_credentials_must_match_in_both_parts() {
        let expected = ("scanner", "s3cret");
        assert!(client_matches(expected, "scanner", "s3cret"));
        assert!(!client_matches(expected, "scanner", "s3cre"));
        assert!(!client_matches(expected, "scanne", "s3cret"));
        assert!(!client_matches(expected, "", ""));
    }

    #[test]
    fn failures_close_at_the_limit_and_at_least_one_is_allowed() {
        let mut logins = FailedLogins::new(Duration::ZERO, 3);
        assert_eq!(logins.record(), AfterFailure::TryAgain);
        assert_eq!(logins.record(), AfterFailure::TryAgain);
        assert_eq!(logins.record(), AfterFailure::Close);
        assert_eq!((logins.count(), logins.max()), (3, 3));
        let mut strict = FailedLogins::new(Duration::ZERO, 0);
        assert_eq!(strict.record(), AfterFailure::Close);
        let capped = FailedLogins::new(Duration::from_secs(3600), 1);
        assert_eq!(capped.delay, MAX_FAILURE_DELAY);
    }

    #[test]
    fn each_failure_waits_the_delay() {
        let mut logins = FailedLogins::new(Duration::from_millis(30), 5);
        let started = std::time::Instant::now();
        logins.record();
        logins.record();
        assert!(started.elapsed() >= Duration::from_millis(60));
    }
}
