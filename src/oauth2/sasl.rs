//! The two SASL mechanisms that carry an OAuth 2.0 bearer token, as IMAP (RFC 3501
//! AUTHENTICATE) and SMTP (RFC 4954 AUTH) clients send them: OAUTHBEARER (RFC 7628 §3.1)
//! and Google's and Microsoft's XOAUTH2, which has the same shape without the GS2 header
//! (no RFC; described in Google's "OAuth 2.0 Mechanism" page and Microsoft's IMAP/SMTP
//! OAuth documentation).
//!
//! Both have one message from the client. A server that refuses the token sends one error
//! challenge first (RFC 7628 §3.2.2: base64 of a JSON object whose `status` says why), which
//! the client must answer (§3.2.3: OAUTHBEARER with a single %x01; XOAUTH2 with an empty
//! response) before the server sends its final failure. Messages here are raw bytes; the
//! protocols base64-encode them.

use super::AccessToken;
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    /// RFC 7628.
    OAuthBearer,
    /// Google's and Microsoft's mechanism.
    XOAuth2,
}

impl fmt::Display for Mechanism {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where the token is sent: OAUTHBEARER names the server, so that a token cannot be
/// replayed to another (RFC 7628 §3.1, `host` and `port`).
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    pub host: &'a str,
    pub port: u16,
}

/// Why an initial response cannot be built. Neither value is shown: the token is secret,
/// and the user name is the admin's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unsendable {
    /// The user name has a control character (the mechanisms separate fields with %x01).
    User,
    /// The token is not an RFC 6750 §2.1 `b64token`.
    Token,
}

impl fmt::Display for Unsendable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unsendable::User => f.write_str("the account's user name contains a control character"),
            Unsendable::Token => {
                f.write_str("the access token has characters a bearer token cannot have")
            }
        }
    }
}

impl Mechanism {
    /// The name in AUTHENTICATE / AUTH and in the capability lists.
    pub fn name(self) -> &'static str {
        match self {
            Mechanism::OAuthBearer => "OAUTHBEARER",
            Mechanism::XOAuth2 => "XOAUTH2",
        }
    }

    /// The mechanism to use among those the server offers (`offers` answers for a name
    /// such as `XOAUTH2`). OAUTHBEARER first: it is the standard one, its failure challenge
    /// is specified (RFC 7628 §3.2.2), and it binds the token to the server's host and
    /// port. Exchange Online offers only XOAUTH2, Gmail and Dovecot both.
    pub fn choose(offers: impl Fn(&str) -> bool) -> Option<Mechanism> {
        [Mechanism::OAuthBearer, Mechanism::XOAuth2]
            .into_iter()
            .find(|m| offers(m.name()))
    }

    /// The client's message (RFC 7628 §3.1; XOAUTH2: `user=U^Aauth=Bearer T^A^A`).
    pub fn initial_response(
        self,
        user: &str,
        token: &AccessToken,
        target: Target<'_>,
    ) -> Result<Vec<u8>, Unsendable> {
        if user.chars().any(char::is_control) {
            return Err(Unsendable::User);
        }
        let token = token.secret();
        if !is_b64token(token) {
            return Err(Unsendable::Token);
        }
        let message = match self {
            Mechanism::OAuthBearer => format!(
                "n,a={},\x01host={}\x01port={}\x01auth=Bearer {token}\x01\x01",
                saslname(user),
                target.host,
                target.port
            ),
            Mechanism::XOAuth2 => format!("user={user}\x01auth=Bearer {token}\x01\x01"),
        };
        Ok(message.into_bytes())
    }

    /// The answer to the server's error challenge: RFC 7628 §3.2.3's dummy %x01 for
    /// OAUTHBEARER; an empty response for XOAUTH2 (as Google documents). The server then
    /// sends its final failure.
    pub fn error_response(self) -> &'static [u8] {
        match self {
            Mechanism::OAuthBearer => b"\x01",
            Mechanism::XOAuth2 => b"",
        }
    }
}

/// RFC 6750 §2.1: `b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="`.
fn is_b64token(token: &str) -> bool {
    let body = token.trim_end_matches('=');
    !body.is_empty()
        && body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~+/".contains(&b))
}

/// RFC 5801 §4 `saslname`: `,` and `=` are written `=2C` and `=3D`.
fn saslname(user: &str) -> String {
    user.replace('=', "=3D").replace(',', "=2C")
}

/// What the server's error challenge says (RFC 7628 §3.2.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The token is expired, revoked or otherwise invalid (`invalid_token`, or HTTP-like
    /// `401` as Google and Dovecot send): a renewed token may work.
    TokenRejected,
    /// The token is valid but lacks a scope the server wants (`insufficient_scope`, `403`):
    /// renewing gives the same scopes; the account must be authorized with the right ones.
    InsufficientScope { scope: Option<String> },
    /// Anything else (`invalid_request`, `400`, an unreadable challenge): not the token.
    Other(String),
}

/// Reads an error challenge: the decoded bytes the server sent with its `+` / `334`.
pub fn judge_challenge(challenge: &[u8]) -> Verdict {
    let Some(members) = std::str::from_utf8(challenge)
        .ok()
        .and_then(flat_json_object)
    else {
        return Verdict::Other("an error challenge that is not a JSON object".into());
    };
    let get = |name: &str| {
        members
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.clone())
    };
    let status = get("status").unwrap_or_default();
    match status.as_str() {
        "401" | "invalid_token" => Verdict::TokenRejected,
        "403" | "insufficient_scope" => Verdict::InsufficientScope {
            scope: get("scope"),
        },
        "" => Verdict::Other("an error challenge without a status".into()),
        other => Verdict::Other(format!("error challenge status {}", other.escape_debug())),
    }
}

/// The members of a flat JSON object (RFC 8259) whose values are strings or numbers, as
/// the error challenge is: all this needs, and no JSON crate. `None` for anything else
/// (nested values are not expected; a challenge with them is read as unreadable).
fn flat_json_object(text: &str) -> Option<Vec<(String, String)>> {
    let mut rest = text.trim().strip_prefix('{')?.trim_start();
    let mut members = Vec::new();
    if let Some(after) = rest.strip_prefix('}') {
        return after.trim().is_empty().then_some(members);
    }
    loop {
        let (key, after) = json_string(rest)?;
        rest = after.trim_start().strip_prefix(':')?.trim_start();
        let (value, after) = match rest.strip_prefix('"') {
            Some(_) => json_string(rest)?,
            None => {
                let end = rest
                    .find(|c: char| !(c.is_ascii_alphanumeric() || "+-.".contains(c)))
                    .unwrap_or(rest.len());
                (rest[..end].to_string(), &rest[end..])
            }
        };
        members.push((key, value));
        rest = after.trim_start();
        if let Some(after) = rest.strip_prefix(',') {
            rest = after.trim_start();
        } else {
            return rest.strip_prefix('}')?.trim().is_empty().then_some(members);
        }
    }
}

/// A JSON string at the start of `text` and what follows it.
fn json_string(text: &str) -> Option<(String, &str)> {
    let mut chars = text.strip_prefix('"')?.char_indices();
    let mut value = String::new();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((value, &text[i + 2..])),
            '\\' => {
                let (_, escaped) = chars.next()?;
                value.push(match escaped {
                    'n' => '\n',
                    't' => '\t',
                    'r' => '\r',
                    'b' => '\u{8}',
                    'f' => '\u{c}',
                    'u' => {
                        let hex: String = (0..4)
                            .filter_map(|_| chars.next())
                            .map(|(_, c)| c)
                            .collect();
                        char::from_u32(u32::from_str_radix(&hex, 16).ok()?).unwrap_or('\u{fffd}')
                    }
                    other => other,
                });
            }
            c => value.push(c),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base64;

    fn token(value: &str) -> AccessToken {
        AccessToken::new(value.into())
    }

    #[test]
    fn oauthbearer_initial_response_is_rfc7628_section_4_1() {
        let message = Mechanism::OAuthBearer
            .initial_response(
                "user@example.com",
                &token("vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg=="),
                Target {
                    host: "server.example.com",
                    port: 143,
                },
            )
            .unwrap();
        assert_eq!(
            base64::encode(&message),
            "bixhPXVzZXJAZXhhbXBsZS5jb20sAWhvc3Q9c2VydmVyLmV4YW1wbGUuY29tAXBvcnQ9MTQzAWF1dGg9QmVhcmVyIHZGOWRmdDRxbVRjMk52YjNSbGNrQmhiSFJoZG1semRHRXVZMjl0Q2c9PQEB"
        );
    }

    #[test]
    fn xoauth2_initial_response_is_googles_example() {
        let message = Mechanism::XOAuth2
            .initial_response(
                "someuser@example.com",
                &token("ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg"),
                Target {
                    host: "imap.gmail.com",
                    port: 993,
                },
            )
            .unwrap();
        assert_eq!(
            base64::encode(&message),
            "dXNlcj1zb21ldXNlckBleGFtcGxlLmNvbQFhdXRoPUJlYXJlciB5YTI5LnZGOWRmdDRxbVRjMk52YjNSbGNrQmhkSFJoZG1semRHRXVZMjl0Q2cBAQ=="
        );
    }

    #[test]
    fn user_names_are_gs2_escaped_and_bad_values_are_refused() {
        let target = Target { host: "h", port: 1 };
        let message = Mechanism::OAuthBearer
            .initial_response("a,b=c", &token("t"), target)
            .unwrap();
        assert!(message.starts_with(b"n,a=a=2Cb=3Dc,\x01"));
        for bad in ["t\x01x", "t x", "", "===", "t\r\n"] {
            for mechanism in [Mechanism::OAuthBearer, Mechanism::XOAuth2] {
                assert_eq!(
                    mechanism.initial_response("u", &token(bad), target),
                    Err(Unsendable::Token),
                    "{bad:?}"
                );
            }
        }
        assert_eq!(
            Mechanism::XOAuth2.initial_response("u\x01", &token("t"), target),
            Err(Unsendable::User)
        );
    }

    #[test]
    fn error_challenges_of_rfc7628_google_and_others_are_judged() {
        let decode = |b64: &str| base64::decode(b64.as_bytes()).unwrap();
        // RFC 7628 §4.3 (IMAP) and §4.4 (SMTP).
        for challenge in [
            "eyJzdGF0dXMiOiJpbnZhbGlkX3Rva2VuIiwic2NvcGUiOiJleGFtcGxlX3Njb3BlIiwib3BlbmlkLWNvbmZpZ3VyYXRpb24iOiJodHRwczovL2V4YW1wbGUuY29tLy53ZWxsLWtub3duL29wZW5pZC1jb25maWd1cmF0aW9uIn0=",
            "eyJzdGF0dXMiOiJpbnZhbGlkX3Rva2VuIiwic2NoZW1lcyI6ImJlYXJlciBtYWMiLCJzY29wZSI6Imh0dHBzOi8vbWFpbC5leGFtcGxlLmNvbS8ifQ==",
            // Google's XOAUTH2 failure.
            "eyJzdGF0dXMiOiI0MDEiLCJzY2hlbWVzIjoiQmVhcmVyIiwic2NvcGUiOiJodHRwczovL21haWwuZ29vZ2xlLmNvbS8ifQ==",
        ] {
            assert_eq!(judge_challenge(&decode(challenge)), Verdict::TokenRejected);
        }
        assert_eq!(
            judge_challenge(br#" { "status" : 401 , "scope":"a\"b\u0041" } "#),
            Verdict::TokenRejected
        );
        assert_eq!(
            judge_challenge(br#"{"status":"insufficient_scope","scope":"mail\/imap"}"#),
            Verdict::InsufficientScope {
                scope: Some("mail/imap".into())
            }
        );
        for other in [
            &br#"{"status":"invalid_request"}"#[..],
            br#"{"schemes":"bearer"}"#,
            b"",
            b"not json",
            br#"{"status":"401""#,
            br#"{"status":{"x":1}}"#,
            br#"{"status":"401"} trailing"#,
        ] {
            assert!(
                matches!(judge_challenge(other), Verdict::Other(_)),
                "{}",
                String::from_utf8_lossy(other)
            );
        }
    }

    #[test]
    fn error_responses_are_rfc7628_3_2_3_and_googles() {
        assert_eq!(
            base64::encode(Mechanism::OAuthBearer.error_response()),
            "AQ=="
        );
        assert_eq!(Mechanism::XOAuth2.error_response(), b"");
    }

    #[test]
    fn oauthbearer_is_preferred_when_both_are_offered() {
        let offers = |names: &'static [&'static str]| move |m: &str| names.contains(&m);
        assert_eq!(
            Mechanism::choose(offers(&["PLAIN", "XOAUTH2", "OAUTHBEARER"])),
            Some(Mechanism::OAuthBearer)
        );
        assert_eq!(
            Mechanism::choose(offers(&["XOAUTH2"])),
            Some(Mechanism::XOAuth2)
        );
        assert_eq!(Mechanism::choose(offers(&["PLAIN", "LOGIN"])), None);
    }
}
