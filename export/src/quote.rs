//! Quoting for every output format. Every value that comes from the user's
//! config goes through one of these, so no value can end a string and add
//! keys, directives or documents of its own.

use std::fmt::Write as _;

/// `text` double-quoted with the escapes all three formats share (`"`,
/// `\`, newline, tab, carriage return); `special` writes what a format
/// escapes besides, given the next character, and says whether it did.
fn quoted(text: &str, special: impl Fn(char, Option<char>, &mut String) -> bool) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if special(c, chars.peek().copied(), &mut out) => {}
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A YAML double-quoted scalar: JSON's string escapes are a subset of
/// YAML's, and every control character is escaped.
pub fn yaml(text: &str) -> String {
    quoted(text, |c, _, out| {
        // YAML also breaks lines at NEL and the Unicode separators.
        let escape = c.is_control() || matches!(c, '\u{2028}' | '\u{2029}' | '\u{feff}');
        if escape {
            let _ = write!(out, "\\u{:04x}", c as u32);
        }
        escape
    })
}

/// An HCL2 quoted template: besides escapes, `${` and `%{` would start an
/// interpolation or directive and are doubled.
pub fn hcl(text: &str) -> String {
    quoted(text, |c, next, out| match c {
        '$' | '%' if next == Some('{') => {
            out.push(c);
            out.push(c);
            true
        }
        c if c.is_control() => {
            let _ = write!(out, "\\u{:04x}", c as u32);
            true
        }
        _ => false,
    })
}

/// One word of a systemd setting that splits on spaces (`ExecStart=`,
/// `Environment=`): double-quoted with C escapes, `%` doubled so no
/// specifier expands, and `$` doubled where systemd expands variables.
pub fn systemd(text: &str, dollars: bool) -> String {
    quoted(text, |c, _, out| match c {
        '%' => {
            out.push_str("%%");
            true
        }
        '$' if dollars => {
            out.push_str("$$");
            true
        }
        // C1 controls are written as the character, not as a byte.
        c if c.is_control() && c.is_ascii() => {
            let _ = write!(out, "\\x{:02x}", c as u32);
            true
        }
        c if c.is_control() => {
            let _ = write!(out, "\\u{:04x}", c as u32);
            true
        }
        _ => false,
    })
}

/// Kubernetes expands `$(VAR)` in commands, arguments and env values;
/// `$$` is its escape for one `$`.
pub fn kube_dollars(text: &str) -> String {
    text.replace('$', "$$")
}

/// Compose interpolates `$VAR` and `${VAR}` everywhere; `$$` is one `$`.
pub fn compose_dollars(text: &str) -> String {
    text.replace('$', "$$")
}

/// Text for a comment: on one line, whatever it holds.
pub fn comment(text: &str) -> String {
    text.chars()
        .flat_map(|c| {
            if c.is_control() || matches!(c, '\u{2028}' | '\u{2029}') {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
}

/// A name Kubernetes accepts for objects and labels (RFC 1123 label):
/// lowercase letters, digits and `-`, at most 63, alphanumeric at both ends.
pub fn dns_label(name: &str) -> String {
    let mapped: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    let trimmed: String = mapped.trim_matches('-').chars().take(50).collect();
    let trimmed = trimmed.trim_end_matches('-');
    if trimmed.is_empty() {
        "worker".to_owned()
    } else {
        trimmed.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn systemd_words_escape_quotes_newlines_specifiers_and_variables() {
        assert_eq!(systemd("a\"b\nc%d$e", true), r#""a\"b\nc%%d$$e""#);
        assert_eq!(systemd("$e", false), r#""$e""#);
    }

    #[test]
    fn hcl_doubles_template_openers_only() {
        assert_eq!(hcl("${x} %{y} $z 5%"), r#""$${x} %%{y} $z 5%""#);
    }

    #[test]
    fn dns_labels_are_lowercase_and_bounded() {
        assert_eq!(dns_label("My_App.v2"), "my-app-v2");
        assert_eq!(dns_label("__"), "worker");
        assert!(dns_label(&"a".repeat(200)).len() <= 50);
    }

    #[test]
    fn comments_stay_on_one_line() {
        assert_eq!(comment("a\nb\u{2028}"), "a\\nb\\u{2028}");
    }
}
