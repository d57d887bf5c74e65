//! A small YAML writer: block style, every string double-quoted through
//! `quote::yaml`, keys quoted unless plain identifiers.

use crate::quote;

pub enum Y {
    Str(String),
    Num(u64),
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

fn key(text: &str) -> String {
    let plain = !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'/'))
        && text.as_bytes()[0].is_ascii_alphabetic();
    if plain {
        text.to_owned()
    } else {
        quote::yaml(text)
    }
}

fn scalar(value: &Y) -> Option<String> {
    match value {
        Y::Str(text) => Some(quote::yaml(text)),
        Y::Num(n) => Some(n.to_string()),
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
    let pad = " ".repeat(indent);
    match value {
        Y::Map(entries) => {
            for (k, v) in entries {
                out.push_str(&pad);
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
                        write(v, indent + 2, out);
                    }
                }
            }
        }
        Y::List(items) => {
            for item in items {
                match scalar(item) {
                    Some(text) => {
                        out.push_str(&pad);
                        out.push_str("- ");
                        out.push_str(&text);
                        out.push('\n');
                    }
                    None => {
                        // The item's first line goes after the dash.
                        let mut nested = String::new();
                        write(item, indent + 2, &mut nested);
                        out.push_str(&pad);
                        out.push_str("- ");
                        out.push_str(&nested[indent + 2..]);
                    }
                }
            }
        }
        other => {
            out.push_str(&pad);
            out.push_str(&scalar(other).unwrap_or_default());
            out.push('\n');
        }
    }
}
