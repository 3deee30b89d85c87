//! What the proxy needs from a SELECT or EXAMINE response (RFC 3501 §6.3.1, §7.1), and the
//! mailbox's own identity: RFC 8474 §4.1 `MAILBOXID` (servers with `OBJECTID`), or else
//! Dovecot's mailbox GUID, `STATUS mailbox (X-GUID)` (Dovecot 2.2 and 2.3, which have no
//! OBJECTID; unadvertised, and answered BAD by servers without it).
//!
//! Read with [`crate::imap_wire`]'s grammar, response by response as the answer comes off
//! a [`super::Connection`] ([`Selected::apply`]), so that no response code is lost
//! (`MAILBOXID` among them, which the `imap` crate used to drop).

use crate::imap_wire::{Code, KeepAll, MessageData, Reader, Response, Status, StatusKind, Value};

/// The selected mailbox.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Selected {
    /// `* n EXISTS`.
    pub exists: u32,
    /// `[UIDVALIDITY n]`; a mailbox without one cannot give stable UIDLs.
    pub uid_validity: Option<u32>,
    /// `[PERMANENTFLAGS (…)]`, as sent (`\*` included).
    pub permanent_flags: Vec<String>,
    /// `[READ-ONLY]` on the tagged OK.
    pub read_only: bool,
    /// `[MAILBOXID (id)]`: the server's name for this very mailbox, whatever user name or
    /// mailbox name led to it. Only a well-formed objectid (RFC 8474 §7) is kept.
    pub mailbox_id: Option<String>,
}

impl Selected {
    /// Parses the whole response, read by the IMAP grammar: untagged responses, then the
    /// tagged OK. A response that breaks the grammar ends the reading; what came before
    /// it counts.
    pub fn parse(response: &[u8]) -> Selected {
        let mut selected = Selected::default();
        let mut reader = Reader::new(response);
        while let Ok(response) = reader.next(&mut KeepAll) {
            selected.apply(&response);
        }
        selected
    }

    /// Takes in one response to SELECT or EXAMINE (the tagged one last), read as it comes
    /// off a connection where other commands' answers follow it.
    pub fn apply(&mut self, response: &Response) {
        match response {
            Response::Message {
                number,
                data: MessageData::Exists,
            } => self.exists = *number,
            Response::Condition(Status {
                kind: StatusKind::Ok,
                code: Some(code),
                ..
            }) => self.note(code),
            Response::Tagged { status, .. } => {
                self.read_only = status.has_code("READ-ONLY");
            }
            _ => {}
        }
    }

    /// What an untagged OK's response code says about the mailbox.
    fn note(&mut self, code: &Code) {
        match code.name.as_str() {
            "UIDVALIDITY" => self.uid_validity = code.arguments.parse().ok(),
            "PERMANENTFLAGS" => {
                self.permanent_flags = parenthesised(&code.arguments)
                    .unwrap_or("")
                    .split_ascii_whitespace()
                    .map(str::to_string)
                    .collect();
            }
            "MAILBOXID" => {
                self.mailbox_id = parenthesised(&code.arguments)
                    .filter(|id| is_objectid(id))
                    .map(str::to_string);
            }
            _ => {}
        }
    }

    /// Whether `keyword` may be stored: named in PERMANENTFLAGS, or `\*` (new keywords).
    pub fn allows_keyword(&self, keyword: &str) -> bool {
        self.permanent_flags
            .iter()
            .any(|flag| flag == "\\*" || flag.eq_ignore_ascii_case(keyword))
    }
}

/// The X-GUID in the values of a `* STATUS mailbox (…)` response, if well formed: Dovecot's
/// mailbox GUID.
pub fn status_guid(values: &[Value]) -> Option<String> {
    let [_mailbox, Value::List(items)] = values else {
        return None;
    };
    items.chunks(2).find_map(|pair| match pair {
        [name, Value::Atom(value)] if name.bytes()?.eq_ignore_ascii_case(b"X-GUID") => {
            let value = std::str::from_utf8(value).ok()?;
            is_objectid(value).then(|| value.to_string())
        }
        _ => None,
    })
}

/// "(x y)" → "x y".
fn parenthesised(value: &str) -> Option<&str> {
    value.trim().strip_prefix('(')?.strip_suffix(')')
}

/// RFC 8474 §7: objectid = 1*255(ALPHA / DIGIT / "_" / "-").
fn is_objectid(id: &str) -> bool {
    (1..=255).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::Selected;

    /// Dovecot 2.3's answer to SELECT INBOX, as seen on the wire.
    const DOVECOT: &str = "* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft)\r\n\
        * OK [PERMANENTFLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft \\*)] Flags permitted.\r\n\
        * 3 EXISTS\r\n\
        * 0 RECENT\r\n\
        * OK [UIDVALIDITY 1733216400] UIDs valid\r\n\
        * OK [UIDNEXT 4] Predicted next UID\r\n\
        * OK [MAILBOXID (F2212ea87-6097-4256-9d51-71338625)] Ok\r\n\
        * OK [HIGHESTMODSEQ 5] Highest\r\n\
        a3 OK [READ-WRITE] Select completed (0.001 + 0.000 secs).\r\n";

    #[test]
    fn dovecot_select_gives_count_validity_flags_and_mailbox_id() {
        let selected = Selected::parse(DOVECOT.as_bytes());
        assert_eq!(selected.exists, 3);
        assert_eq!(selected.uid_validity, Some(1733216400));
        assert!(!selected.read_only);
        assert_eq!(
            selected.mailbox_id.as_deref(),
            Some("F2212ea87-6097-4256-9d51-71338625")
        );
        assert!(selected.allows_keyword("$POP3Deleted"));
    }

    #[test]
    fn literals_and_unsolicited_responses_are_read_by_the_grammar() {
        // A literal whose text looks like responses, an ALERT ending in a brace, and a
        // flag change: none of it is taken for the mailbox's state.
        let response = "* FLAGS (\\Seen \\Deleted)\r\n\
            * 2 EXISTS\r\n\
            * 1 FETCH (BODY[HEADER] {41}\r\n\
            * 99 EXISTS\r\n* OK [UIDVALIDITY 666] x\r\n\r\n)\r\n\
            * OK [ALERT] Quota {5}\r\n\
            * 1 FETCH (FLAGS (\\Seen))\r\n\
            * OK [UIDVALIDITY 7] UIDs valid\r\n\
            * OK [PERMANENTFLAGS (\\Seen \\*)] Limited\r\n\
            a2 ok [read-only] EXAMINE completed\r\n";
        let selected = Selected::parse(response.as_bytes());
        assert_eq!(
            (selected.exists, selected.uid_validity, selected.read_only),
            (2, Some(7), true)
        );
        assert!(selected.allows_keyword("$POP3Deleted"));
    }

    #[test]
    fn without_objectid_there_is_no_mailbox_id() {
        let response = DOVECOT.replace(
            "* OK [MAILBOXID (F2212ea87-6097-4256-9d51-71338625)] Ok\r\n",
            "",
        );
        assert_eq!(Selected::parse(response.as_bytes()).mailbox_id, None);
    }

    #[test]
    fn an_id_that_is_not_an_objectid_is_ignored() {
        for bad in ["()", "(../x)", "(a b)", "(a/b)"] {
            let response = format!("* OK [MAILBOXID {bad}] Ok\r\na1 OK done\r\n");
            assert_eq!(
                Selected::parse(response.as_bytes()).mailbox_id,
                None,
                "{bad}"
            );
        }
        let long = format!("* OK [MAILBOXID ({})] Ok\r\na1 OK\r\n", "x".repeat(256));
        assert_eq!(Selected::parse(long.as_bytes()).mailbox_id, None);
    }

    #[test]
    fn dovecot_status_x_guid() {
        use crate::imap_wire::{KeepAll, Reader, Response};
        let status_guid = |line: &[u8]| match Reader::new(line).next(&mut KeepAll) {
            Ok(Response::Data { name, values }) if name == "STATUS" => super::status_guid(&values),
            _ => None,
        };
        assert_eq!(
            status_guid(b"* STATUS INBOX (X-GUID b61665115027116b6810000083ecc375)\r\n").as_deref(),
            Some("b61665115027116b6810000083ecc375")
        );
        assert_eq!(
            status_guid(b"* STATUS \"Deleted Items\" (MESSAGES 3 X-GUID ab12)\r\n").as_deref(),
            Some("ab12")
        );
        assert_eq!(status_guid(b"* STATUS INBOX (MESSAGES 3)\r\n"), None);
        assert_eq!(status_guid(b"* STATUS INBOX (X-GUID ../x)\r\n"), None);
        assert_eq!(status_guid(b"* OK (X-GUID ab12)\r\n"), None);
        assert_eq!(status_guid(b"a1 OK done\r\n"), None);
    }

    #[test]
    fn examine_is_read_only_and_keywords_need_permission() {
        let response = "* 0 EXISTS\r\n\
            * OK [PERMANENTFLAGS (\\Deleted \\Seen $POP3Deleted)] Limited\r\n\
            * OK [UIDVALIDITY 7] UIDs valid\r\n\
            a2 OK [READ-ONLY] Examine completed.\r\n";
        let selected = Selected::parse(response.as_bytes());
        assert!(selected.read_only);
        assert_eq!(selected.exists, 0);
        assert!(selected.allows_keyword("$pop3deleted"));
        assert!(!selected.allows_keyword("$Other"));
        let none = Selected::parse(b"* 2 EXISTS\r\na1 OK [READ-WRITE] ok\r\n");
        assert_eq!(none.uid_validity, None);
        assert!(!none.allows_keyword("$POP3Deleted"));
    }
}
