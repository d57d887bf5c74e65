//! A small YAML writer: block style, every string double-quoted through
//! `quote::yaml`, keys quoted unless plain identifiers.

use crate::quote;

pub enum Y {
    Str(String),
    Num(u64),
    Bool(bool),
    Map(Vec<(String, Y)>),
    List(Vec<Y>),
}

pub fn s(text: impl Into<String>) -> Y {
    Y::Str(text.into())
}

/// A map from literal keys.
pub fn map(entries: Vec<(&str, Y)>) -> Y {
    Y::Map(
        entries
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect(),
    )
}

fn key(text: &str) -> std::borrow::Cow<'_, str> {
    let plain = !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'/'))
        && text.as_bytes()[0].is_ascii_alphabetic();
    if plain {
        text.into()
    } else {
        quote::yaml(text).into()
    }
}

fn scalar(value: &Y) -> Option<String> {
    match value {
        Y::Str(text) => Some(quote::yaml(text)),
        Y::Num(n) => Some(n.to_string()),
        Y::Bool(b) => Some(b.to_string()),
        Y::Map(entries) if entries.is_empty() => Some("{}".to_owned()),
        Y::List(items) if items.is_empty() => Some("[]".to_owned()),
        _ => None,
    }
}

/// A document whose top level is `value` (a map).
pub fn document(value: &Y) -> String {
    let mut out = String::new();
    write(value, 0, &mut out);
    out
}

fn write(value: &Y, indent: usize, out: &mut String) {
    write_at(value, indent, false, out);
}

/// `value` at `indent`; with `dashed`, the dash of its list item is
/// written already, in place of its first line's indentation.
fn write_at(value: &Y, indent: usize, mut dashed: bool, out: &mut String) {
    let pad = |out: &mut String, dashed: &mut bool| {
        if !std::mem::take(dashed) {
            out.extend(std::iter::repeat_n(' ', indent));
        }
    };
    match value {
        Y::Map(entries) => {
            for (k, v) in entries {
                pad(out, &mut dashed);
                out.push_str(&key(k));
                out.push(':');
                match scalar(v) {
                    Some(text) => {
                        out.push(' ');
                        out.push_str(&text);
                        out.push('\n');
                    }
                    None => {
                        out.push('\n');
                        write_at(v, indent + 2, false, out);
                    }
                }
            }
        }
        Y::List(items) => {
            for item in items {
                pad(out, &mut dashed);
                out.push_str("- ");
                match scalar(item) {
                    Some(text) => {
                        out.push_str(&text);
                        out.push('\n');
                    }
                    // The item's first line goes after the dash.
                    None => write_at(item, indent + 2, true, out),
                }
            }
        }
        other => {
            pad(out, &mut dashed);
            out.push_str(&scalar(other).unwrap_or_default());
            out.push('\n');
        }
    }
}
