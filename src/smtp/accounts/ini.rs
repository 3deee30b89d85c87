//! A reader for the INI dialect of Python 2's `ConfigParser`, which smtpproxy reads its
//! `smtpproxy.ini` with, so that an existing file is read as smtpproxy reads it.
//!
//! What it accepts, as `ConfigParser` does: `[section]` headers (anything after the `]` is
//! ignored); `key=value` or `key: value` (split at the first `=` or `:`, both sides
//! trimmed); keys case-insensitive (kept lower-cased), section names case-sensitive;
//! whole-line comments starting with `#`, `;` or `rem`; blank lines. In a value, a `;`
//! after a space or tab starts a comment (Python 2's rule; `p;w` keeps its `;`), and `""`
//! is the empty value.
//!
//! What it refuses, each with its line number: a key before any section, a duplicate
//! section or key (Python 3's strict mode refuses them too), a line that is neither, and an
//! indented line after a key (a multi-line value: no key of ours takes one, so it is far
//! more likely a mistake than a value).
//!
//! Two more rules of `ConfigParser` are kept elsewhere (see [`interpolate`] and
//! `Accounts::parse`): a value holding `%(` has `%(name)s` replaced by the section's (or
//! `[DEFAULT]`'s) `name` and `%%` by `%`, and the keys of `[DEFAULT]` count in every
//! account section that lacks them.

use std::fmt;

/// One `key = value` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Lower-cased, as `configparser` stores keys.
    pub key: String,
    pub value: String,
    pub line: usize,
}

/// A `[name]` header and the entries under it, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    pub name: String,
    pub line: usize,
    pub entries: Vec<Entry>,
}

impl Section {
    pub fn get(&self, key: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.key == key)
    }
}

/// Why the file could not be read, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntaxError {
    pub line: usize,
    pub message: String,
}

impl fmt::Display for SyntaxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

pub fn parse(text: &str) -> Result<Vec<Section>, SyntaxError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut sections: Vec<Section> = Vec::new();
    let mut after_entry = false;
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let error = |message: String| SyntaxError { line, message };
        let trimmed = raw.trim();
        if trimmed.is_empty() {
            after_entry = false;
            continue;
        }
        if trimmed.starts_with('#') || trimmed.starts_with(';') || is_rem_comment(raw) {
            continue;
        }
        if raw.starts_with([' ', '\t']) && after_entry {
            return Err(error(
                "an indented line continues the value above over several lines; no \
                 setting takes such a value (remove the indentation or join the lines)"
                    .into(),
            ));
        }
        if let Some(rest) = trimmed.strip_prefix('[') {
            // Python's `\[(?P<header>[^]]+)\]`: the rest of the line is ignored.
            let Some((name, _)) = rest.split_once(']').filter(|(name, _)| !name.is_empty()) else {
                return Err(error(format!("{trimmed:?} is not a [section] header")));
            };
            if let Some(first) = sections.iter().find(|s| s.name == name) {
                return Err(error(format!(
                    "section [{name}] already began at line {}",
                    first.line
                )));
            }
            sections.push(Section {
                name: name.to_string(),
                line,
                entries: Vec::new(),
            });
            after_entry = false;
            continue;
        }
        let Some(split) = trimmed.find(['=', ':']) else {
            return Err(error(format!(
                "{:?} is neither a [section] header nor key=value",
                shorten(trimmed)
            )));
        };
        let key = trimmed[..split].trim().to_lowercase();
        let value = without_inline_comment(&trimmed[split + 1..]).trim();
        let value = if value == "\"\"" { "" } else { value }.to_string();
        if key.is_empty() {
            return Err(error("a value without a key".into()));
        }
        let Some(section) = sections.last_mut() else {
            return Err(error(format!(
                "key {key} comes before any [section] header"
            )));
        };
        if let Some(first) = section.get(&key) {
            return Err(error(format!(
                "key {key} is given twice in [{}] (first at line {})",
                section.name, first.line
            )));
        }
        section.entries.push(Entry { key, value, line });
        after_entry = true;
    }
    Ok(sections)
}

/// Python 2: a line whose first word is `rem` (from column 0) is a comment.
fn is_rem_comment(line: &str) -> bool {
    line.starts_with(['r', 'R'])
        && line
            .split_whitespace()
            .next()
            .is_some_and(|word| word.eq_ignore_ascii_case("rem"))
}

/// Python 2: in a value, `;` after white space starts a comment.
fn without_inline_comment(value: &str) -> &str {
    let bytes = value.as_bytes();
    match (1..bytes.len()).find(|&i| bytes[i] == b';' && bytes[i - 1].is_ascii_whitespace()) {
        Some(at) => &value[..at],
        None => value,
    }
}

/// How deep `%(name)s` may refer to values that refer to others (Python's limit).
const MAX_INTERPOLATION_DEPTH: usize = 10;

/// Python 2 `ConfigParser` interpolation: only a value holding `%(` is touched; then each
/// `%(name)s` becomes `lookup(name)` (the name lower-cased, itself interpolated) and `%%`
/// becomes `%`. Any other `%` is an error, as in Python.
pub fn interpolate<'a>(
    value: &str,
    lookup: &impl Fn(&str) -> Option<&'a str>,
) -> Result<String, String> {
    interpolate_at(value, lookup, 0)
}

fn interpolate_at<'a>(
    value: &str,
    lookup: &impl Fn(&str) -> Option<&'a str>,
    depth: usize,
) -> Result<String, String> {
    if !value.contains("%(") {
        return Ok(value.to_string());
    }
    if depth >= MAX_INTERPOLATION_DEPTH {
        return Err("%(...)s refers round in a loop (or deeper than 10)".into());
    }
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(at) = rest.find('%') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(more) = after.strip_prefix('%') {
            out.push('%');
            rest = more;
        } else if let Some(reference) = after.strip_prefix('(') {
            let Some((name, more)) = reference.split_once(")s") else {
                return Err("a %( without its closing )s".into());
            };
            let name = name.to_lowercase();
            let Some(referred) = lookup(&name) else {
                return Err(format!(
                    "%({name})s names no key of this section or [DEFAULT]"
                ));
            };
            out.push_str(&interpolate_at(referred, lookup, depth + 1)?);
            rest = more;
        } else {
            return Err(
                "a % that is neither %% nor %(name)s (write %% for a %, as smtpproxy needs too)"
                    .into(),
            );
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// A line quoted in an error: cut, because it may be a password on a line of its own.
fn shorten(line: &str) -> String {
    match line.char_indices().nth(12) {
        Some((at, _)) => format!("{}…", &line[..at]),
        None => line.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_smtpproxys_example_as_configparser_does() {
        let text = "\u{feff}# smtpproxy.ini\n[config]\nport=25\nsleeptime = 30\n\n\
                    ; accounts\n[Foo@Example.COM] ; the printer\nSMTPHost: smtp.example.com\n\
                    smtppassword=p=a:s;s #x\n  # an indented comment\nrem old\n\
                    popusername = u ; inline comment\nreplyto=\"\"\n";
        let sections = parse(text).unwrap();
        assert_eq!(sections.len(), 2);
        assert_eq!(sections[0].name, "config");
        assert_eq!(sections[0].get("sleeptime").unwrap().value, "30");
        let account = &sections[1];
        assert_eq!(
            (account.name.as_str(), account.line),
            ("Foo@Example.COM", 7)
        );
        let host = account.get("smtphost").unwrap();
        assert_eq!((host.value.as_str(), host.line), ("smtp.example.com", 8));
        assert_eq!(account.get("smtppassword").unwrap().value, "p=a:s;s #x");
        assert_eq!(account.get("popusername").unwrap().value, "u");
        assert_eq!(account.get("replyto").unwrap().value, "");
        assert!(account.get("rem old").is_none());
    }

    #[test]
    fn each_malformed_line_is_named_by_its_number() {
        for (text, line, says) in [
            ("smtphost=x\n", 1, "before any [section]"),
            ("[a]\n[b\n", 2, "not a [section] header"),
            ("[]\n", 1, "not a [section] header"),
            ("[a]\nx=1\n[a]\n", 3, "already began at line 1"),
            ("[a]\nx=1\nX = 2\n", 3, "given twice"),
            ("[a]\njust words\n", 2, "neither"),
            ("[a]\n=value\n", 2, "without a key"),
            ("[a]\nx=1\n  more\n", 3, "indented line"),
        ] {
            let err = parse(text).unwrap_err();
            assert_eq!(err.line, line, "{text:?}: {err}");
            assert!(err.message.contains(says), "{text:?}: {err}");
        }
    }

    #[test]
    fn percent_references_are_interpolated_as_python_2_does() {
        let keys = [
            ("host", "mail.example"),
            ("base", "%(host)s"),
            ("me", "%(me)s"),
        ];
        let lookup = |name: &str| keys.iter().find(|(k, _)| *k == name).map(|(_, v)| *v);
        let run = |value: &str| interpolate(value, &lookup);
        assert_eq!(
            run("smtp.%(HOST)s:%(base)s").unwrap(),
            "smtp.mail.example:mail.example"
        );
        assert_eq!(run("100%%(%(host)s)").unwrap(), "100%(mail.example)");
        // Without "%(" nothing is touched, %% included (Python 2 ConfigParser).
        assert_eq!(run("p%%w%d").unwrap(), "p%%w%d");
        for (bad, says) in [
            ("%(nope)s", "names no key"),
            ("%(me)s", "loop"),
            ("%(host)", "closing"),
            ("%(host)s %d", "neither"),
        ] {
            let err = run(bad).unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn an_error_never_quotes_a_whole_secret() {
        let err = parse("[a]\nmy-long-secret-password\n").unwrap_err();
        assert!(!err.message.contains("my-long-secret-password"), "{err}");
    }
}
