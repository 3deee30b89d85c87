//! IMAP `AUTHENTICATE OAUTHBEARER` / `XOAUTH2` (RFC 3501 §6.2.2, RFC 7628 §4.1/§4.3),
//! with the initial response on the command line when the server has SASL-IR (RFC 4959):
//! one round trip instead of two.
//!
//! Runs on [`crate::imap::Connection`]'s AUTHENTICATE: without SASL-IR the first (empty)
//! continuation request gets the initial response, and an error challenge gets the
//! mechanism's error response so that the server can send its tagged NO. After NO the
//! connection can take another AUTHENTICATE, so a retry can use it.
//! Generic over the stream, so byte transcripts test it.

use super::maildrop::OpenError;
use crate::imap::{Connection, capability_code};
use crate::imap_wire::{Status, StatusKind};
use crate::oauth2::AccessToken;
use crate::oauth2::login::Refusal;
use crate::oauth2::sasl::{self, Mechanism, Target, Verdict};
use std::io::{Read, Write};

/// RFC 7162 §4: servers should take command lines of 8192 octets, and clients keep to
/// that. A longer SASL-IR line (a large JWT) is sent as the continuation response instead,
/// which servers read with the SASL exchange's own, larger limit.
const MAX_COMMAND_LINE: usize = 8192;

/// What the server's capabilities allow (from its greeting's `[CAPABILITY …]` or a
/// CAPABILITY command).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Offers {
    pub mechanism: Option<Mechanism>,
    pub sasl_ir: bool,
}

impl Offers {
    /// From a list of capability names as the server spelled them.
    pub fn from_names<S: AsRef<str>>(names: &[S]) -> Offers {
        let has = |wanted: &str| {
            names
                .iter()
                .any(|n| n.as_ref().eq_ignore_ascii_case(wanted))
        };
        Offers {
            mechanism: Mechanism::choose(|m| has(&format!("AUTH={m}"))),
            sasl_ir: has("SASL-IR"),
        }
    }

    /// From the greeting's `[CAPABILITY …]` response code, if it has one (Dovecot's does;
    /// Exchange's and Gmail's do not, and then CAPABILITY is asked).
    pub fn from_greeting(greeting: &Status) -> Option<Offers> {
        Some(Offers::from_names(&capability_code(greeting)?))
    }
}

/// A failed attempt, and whether the connection can take another AUTHENTICATE.
pub type Failed = (Refusal<OpenError>, bool);

/// Authenticates with `token` for `user`. A rejected token is [`Refusal::Rejected`]; the
/// connection stays usable after every refusal the server answered with a tagged response.
pub fn authenticate<S: Read + Write>(
    connection: &mut Connection<S>,
    offers: &Offers,
    user: &str,
    token: &AccessToken,
    target: Target<'_>,
) -> Result<(), Failed> {
    let Some(mechanism) = offers.mechanism else {
        let why = format!(
            "{}:{} offers neither AUTH=OAUTHBEARER nor AUTH=XOAUTH2",
            target.host, target.port
        );
        return Err((Refusal::Failed(OpenError::Permanent(why)), true));
    };
    let initial = match mechanism.initial_response(user, token, target) {
        Ok(initial) => initial,
        Err(e) => {
            let why = OpenError::Temporary(format!("AUTHENTICATE {mechanism}: {e}"));
            return Err((Refusal::Failed(why), true));
        }
    };
    let encoded = crate::base64::encode(&initial);
    // "a1 AUTHENTICATE " and CRLF around the argument.
    let fits = encoded.len() + mechanism.name().len() + 32 <= MAX_COMMAND_LINE;
    let (arguments, mut unsent) = match offers.sasl_ir && fits {
        // RFC 4959 §3: the initial response, base64, after the mechanism name.
        true => (format!("{mechanism} {encoded}"), None),
        false => (mechanism.to_string(), Some(initial)),
    };
    let mut challenge = None;
    let result = connection.authenticate(&arguments, |sent| {
        if sent.is_empty()
            && let Some(initial) = unsent.take()
        {
            return initial;
        }
        challenge.get_or_insert(sent.to_vec());
        mechanism.error_response().to_vec()
    });
    let command = format!("AUTHENTICATE {mechanism}");
    let status = match result {
        Ok(status) if status.kind == StatusKind::Ok => return Ok(()),
        Ok(status) => status,
        // Not answered: a cut, a timeout or an unreadable response. Not the token, and the
        // connection is out of step.
        Err(e) => {
            return Err((
                Refusal::Failed(OpenError::Temporary(format!("{command}: {e}"))),
                false,
            ));
        }
    };
    Err((refusal(&command, &status, challenge.as_deref()), true))
}

/// Sorts a refused AUTHENTICATE: the error challenge says best whether the token was the
/// problem; without one, the tagged NO's response code does (RFC 5530).
fn refusal(command: &str, status: &Status, challenge: Option<&[u8]>) -> Refusal<OpenError> {
    if status.kind != StatusKind::No {
        return Refusal::Failed(OpenError::Permanent(format!(
            "{command}: the server did not understand it: {}",
            super::imap::said(status)
        )));
    }
    let said = format!("{command}: {}", super::imap::said(status));
    match challenge.map(sasl::judge_challenge) {
        Some(Verdict::TokenRejected) => Refusal::Rejected(said),
        Some(Verdict::InsufficientScope { scope }) => {
            Refusal::Failed(OpenError::Temporary(format!(
                "{said}: the token lacks the scope the server wants ({}); authorize the account \
             with the provider's IMAP scope",
                scope.as_deref().unwrap_or("not named").escape_debug()
            )))
        }
        Some(Verdict::Other(why)) => {
            Refusal::Failed(OpenError::Temporary(format!("{said} ({why})")))
        }
        // No challenge (Exchange sends none): the NO's code decides, as for LOGIN; an
        // expired "passphrase" (RFC 5530 EXPIRED) is an expired token here.
        None => {
            let expired = status.has_code("EXPIRED");
            match super::imap::refused(command, status) {
                OpenError::Auth(_) => Refusal::Rejected(said),
                OpenError::Permanent(_) if expired => Refusal::Rejected(said),
                OpenError::Permanent(_) => Refusal::Failed(OpenError::Permanent(said)),
                _ => Refusal::Failed(OpenError::Temporary(said)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base64;
    use std::cell::RefCell;
    use std::rc::Rc;

    use crate::imap::tests::Transcript;

    const TARGET: Target = Target {
        host: "server.example.com",
        port: 143,
    };
    const TOKEN: &str = "vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==";
    /// RFC 7628 §4.1's message.
    const IR: &str = "bixhPXVzZXJAZXhhbXBsZS5jb20sAWhvc3Q9c2VydmVyLmV4YW1wbGUuY29tAXBvcnQ9MTQzAWF1dGg9QmVhcmVyIHZGOWRmdDRxbVRjMk52YjNSbGNrQmhiSFJoZG1semRHRXVZMjl0Q2c9PQEB";
    /// RFC 7628 §4.3's error challenge.
    const CHALLENGE: &str = "eyJzdGF0dXMiOiJpbnZhbGlkX3Rva2VuIiwic2NvcGUiOiJleGFtcGxlX3Njb3BlIiwib3BlbmlkLWNvbmZpZ3VyYXRpb24iOiJodHRwczovL2V4YW1wbGUuY29tLy53ZWxsLWtub3duL29wZW5pZC1jb25maWd1cmF0aW9uIn0=";

    /// Runs one AUTHENTICATE against `server` at several read sizes; returns what the
    /// client wrote and the outcome (the same at every size).
    fn run(offers: &Offers, server: &str) -> (String, Result<(), String>) {
        let mut outcome = None;
        for chunk in [1, 2, 3, 5, 64, 4096] {
            let written = Rc::new(RefCell::new(Vec::new()));
            let stream = Transcript {
                server: server.as_bytes().to_vec(),
                read: 0,
                chunk,
                client: Rc::clone(&written),
            };
            let token = AccessToken::new(TOKEN.into());
            let mut connection = Connection::new(stream);
            let result = authenticate(&mut connection, offers, "user@example.com", &token, TARGET);
            let result = match result {
                Ok(()) => Ok(()),
                Err((refusal, usable)) => {
                    let kept = if usable { "kept" } else { "dropped" };
                    Err(format!("{refusal:?} {kept}"))
                }
            };
            let this = (String::from_utf8(written.take()).unwrap(), result);
            if let Some(first) = &outcome {
                assert_eq!(first, &this, "read size {chunk}");
            }
            outcome = Some(this);
        }
        outcome.unwrap()
    }

    fn offers(mechanism: Mechanism, sasl_ir: bool) -> Offers {
        Offers {
            mechanism: Some(mechanism),
            sasl_ir,
        }
    }

    #[test]
    fn with_sasl_ir_the_token_goes_on_the_command_line_rfc7628_4_1() {
        let (written, result) = run(
            &offers(Mechanism::OAuthBearer, true),
            "a1 OK SASL authentication succeeded\r\n",
        );
        assert_eq!(written, format!("a1 AUTHENTICATE OAUTHBEARER {IR}\r\n"));
        assert_eq!(result, Ok(()));
    }

    #[test]
    fn without_sasl_ir_the_token_answers_the_empty_continuation() {
        let (written, result) = run(
            &offers(Mechanism::OAuthBearer, false),
            "+ \r\na1 OK done\r\n",
        );
        assert_eq!(written, format!("a1 AUTHENTICATE OAUTHBEARER\r\n{IR}\r\n"));
        assert_eq!(result, Ok(()));
        // Some servers send a bare "+".
        let (written, _) = run(&offers(Mechanism::XOAuth2, false), "+\r\na1 OK done\r\n");
        let xoauth2 = base64::encode(
            format!("user=user@example.com\x01auth=Bearer {TOKEN}\x01\x01").as_bytes(),
        );
        assert_eq!(written, format!("a1 AUTHENTICATE XOAUTH2\r\n{xoauth2}\r\n"));
    }

    #[test]
    fn an_initial_response_too_long_for_a_command_line_follows_the_continuation() {
        let long = "x".repeat(7000);
        let written = Rc::new(RefCell::new(Vec::new()));
        let stream = Transcript {
            server: b"+ \r\na1 OK done\r\n".to_vec(),
            read: 0,
            chunk: 64,
            client: Rc::clone(&written),
        };
        let token = AccessToken::new(long.clone());
        let offers = offers(Mechanism::XOAuth2, true);
        let result = authenticate(&mut Connection::new(stream), &offers, "u", &token, TARGET);
        assert!(result.is_ok());
        let written = String::from_utf8(written.take()).unwrap();
        assert!(
            written.starts_with("a1 AUTHENTICATE XOAUTH2\r\n"),
            "{written:.40}"
        );
        assert!(written.len() > 9000);
    }

    #[test]
    fn an_error_challenge_gets_its_answer_and_the_token_is_rejected_rfc7628_4_3() {
        let server = format!("+ {CHALLENGE}\r\na1 NO SASL authentication failed\r\n");
        let (written, result) = run(&offers(Mechanism::OAuthBearer, true), &server);
        assert_eq!(
            written,
            format!("a1 AUTHENTICATE OAUTHBEARER {IR}\r\nAQ==\r\n")
        );
        let result = result.unwrap_err();
        assert!(
            result.starts_with("Rejected(") && result.ends_with("kept"),
            "{result}"
        );
        // XOAUTH2 answers with an empty response, as Google and Dovecot expect.
        let (written, result) = run(&offers(Mechanism::XOAuth2, true), &server);
        assert!(written.ends_with("\r\n\r\n"), "{written:?}");
        assert!(result.unwrap_err().starts_with("Rejected("));
    }

    #[test]
    fn refusals_that_are_not_the_token_are_not_retried() {
        for (server, expected) in [
            // Dovecot's code for a failed login without a challenge: the token.
            (
                "a1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n",
                "Rejected(",
            ),
            ("a1 NO [EXPIRED] token expired\r\n", "Rejected("),
            ("a1 NO [UNAVAILABLE] try later\r\n", "Failed(Temporary("),
            // The code decides, not a word in the text: no new token helps here.
            (
                "a1 NO [CONTACTADMIN] Account expired\r\n",
                "Failed(Permanent(",
            ),
            ("a1 BAD unknown mechanism\r\n", "Failed(Permanent("),
            (
                "+ eyJzdGF0dXMiOiJpbnN1ZmZpY2llbnRfc2NvcGUiLCJzY29wZSI6Im1haWwifQ==\r\na1 NO no\r\n",
                "Failed(Temporary(",
            ),
        ] {
            let (_, result) = run(&offers(Mechanism::OAuthBearer, true), server);
            let result = result.unwrap_err();
            assert!(result.starts_with(expected), "{server}: {result}");
            assert!(result.ends_with("kept"), "{server}: {result}");
        }
        // A connection that ends: not the token, and not usable again.
        let (_, result) = run(&offers(Mechanism::OAuthBearer, true), "");
        let result = result.unwrap_err();
        assert!(
            result.starts_with("Failed(Temporary(") && result.ends_with("dropped"),
            "{result}"
        );
        // No mechanism at all: a setup problem.
        let (written, result) = run(&Offers::default(), "");
        assert_eq!(written, "");
        assert!(result.unwrap_err().contains("offers neither"));
    }

    #[test]
    fn capabilities_come_from_the_greeting_when_it_has_them() {
        let greeting = |bytes: &[u8]| {
            let stream = Transcript {
                server: bytes.to_vec(),
                read: 0,
                chunk: 64,
                client: Rc::default(),
            };
            Connection::new(stream).greeting().unwrap()
        };
        let dovecot = b"* OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ AUTH=PLAIN AUTH=XOAUTH2 AUTH=OAUTHBEARER] Dovecot ready.\r\n";
        assert_eq!(
            Offers::from_greeting(&greeting(dovecot)),
            Some(offers(Mechanism::OAuthBearer, true))
        );
        assert_eq!(
            Offers::from_greeting(&greeting(
                b"* OK [capability IMAP4rev1 auth=xoauth2] hi\r\n"
            )),
            Some(offers(Mechanism::XOAuth2, false))
        );
        assert_eq!(
            Offers::from_greeting(&greeting(
                b"* OK The Microsoft Exchange IMAP4 service is ready.\r\n"
            )),
            None
        );
    }
}
