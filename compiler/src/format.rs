//! `apm fmt`: the canonical layout of a config file, comments kept. It works
//! on the lossless tokens, so nothing but whitespace, separators, optional
//! colons and empty statements changes; a file with syntax errors is not
//! formatted.

use crate::lexer::{self, Tok};

/// One line of the output, before alignment.
#[derive(Debug)]
enum Line {
    Statement {
        depth: usize,
        key: String,
        values: String,
        comment: Option<String>,
    },
    Open {
        depth: usize,
        name: String,
        comment: Option<String>,
    },
    Close {
        depth: usize,
        comment: Option<String>,
    },
    /// `name { }` with nothing inside.
    Empty {
        depth: usize,
        name: String,
        comment: Option<String>,
    },
    Comment {
        depth: usize,
        text: String,
    },
    Blank,
}

const INDENT: &str = "    ";

/// The formatted text, or `None` when the file has syntax errors.
pub fn format(text: &str) -> Option<String> {
    let mut diags = crate::diag::Diagnostics::default();
    crate::syntax::parse(crate::source::FileId(0), text, &mut diags);
    if diags.has_errors() {
        return None;
    }
    Some(render(&lines(text)))
}

fn lines(text: &str) -> Vec<Line> {
    let tokens: Vec<lexer::Token> = lexer::lex(text);
    let mut lines = Vec::new();
    let mut depth = 0;
    // Newlines seen since the last significant token or comment.
    let mut newlines = 0;
    let mut i = 0;
    let slice = |t: &lexer::Token| &text[t.range()];
    while i < tokens.len() {
        let token = tokens[i];
        match token.kind {
            Tok::Whitespace => newlines += slice(&token).matches('\n').count(),
            Tok::Comment => {
                let comment = slice(&token).trim_end().to_owned();
                let trailing = newlines == 0
                    && !lines.is_empty()
                    && !matches!(lines.last(), Some(Line::Comment { .. } | Line::Blank));
                if trailing {
                    attach(&mut lines, comment);
                } else {
                    blank_line(&mut lines, newlines);
                    lines.push(Line::Comment {
                        depth,
                        text: comment,
                    });
                }
                newlines = 0;
            }
            Tok::Semi => newlines = 0,
            Tok::RBrace => {
                depth = depth.saturating_sub(1);
                match lines.last() {
                    Some(Line::Open { .. }) => {
                        if let Some(Line::Open {
                            depth,
                            name,
                            comment,
                        }) = lines.pop()
                        {
                            lines.push(Line::Empty {
                                depth,
                                name,
                                comment,
                            });
                        }
                    }
                    _ => lines.push(Line::Close {
                        depth,
                        comment: None,
                    }),
                }
                newlines = 0;
            }
            Tok::Word | Tok::Unterminated => {
                let next = tokens[i + 1..]
                    .iter()
                    .find(|t| !t.kind.is_trivia())
                    .map(|t| t.kind);
                blank_line(&mut lines, newlines);
                newlines = 0;
                if next == Some(Tok::LBrace) {
                    lines.push(Line::Open {
                        depth,
                        name: slice(&token).to_owned(),
                        comment: None,
                    });
                    depth += 1;
                    // Skip to the `{`.
                    i = tokens[i + 1..]
                        .iter()
                        .position(|t| t.kind == Tok::LBrace)
                        .map_or(tokens.len(), |p| i + 1 + p);
                } else {
                    let (statement, end) = statement(text, &tokens, i, depth);
                    lines.push(statement);
                    i = end;
                    continue;
                }
            }
            Tok::LBrace | Tok::Comma | Tok::Error => {}
        }
        i += 1;
    }
    lines
}

/// A statement from its key at `start` to its `;`; returns the index after it.
fn statement(text: &str, tokens: &[lexer::Token], start: usize, depth: usize) -> (Line, usize) {
    let mut key = text[tokens[start].range()].to_owned();
    let mut values = String::new();
    let mut comma = false;
    let mut i = start + 1;
    while i < tokens.len() {
        let token = tokens[i];
        match token.kind {
            Tok::Semi => {
                i += 1;
                break;
            }
            Tok::RBrace => break,
            Tok::Comma => comma = true,
            Tok::Word | Tok::Unterminated => {
                let value = &text[token.range()];
                if values.is_empty() && value == ":" {
                    // `key : value` — the optional colon goes.
                } else {
                    if !values.is_empty() {
                        values.push_str(if comma { ", " } else { " " });
                    }
                    values.push_str(value);
                }
                comma = false;
            }
            _ => {}
        }
        i += 1;
    }
    if let Some(stripped) = key.strip_suffix(':') {
        key = stripped.to_owned();
    }
    (
        Line::Statement {
            depth,
            key,
            values,
            comment: None,
        },
        i,
    )
}

fn attach(lines: &mut [Line], text: String) {
    if let Some(
        Line::Statement { comment, .. }
        | Line::Open { comment, .. }
        | Line::Close { comment, .. }
        | Line::Empty { comment, .. },
    ) = lines.last_mut()
    {
        *comment = Some(text);
    }
}

/// One blank line where the source had at least one, except right after `{`.
fn blank_line(lines: &mut Vec<Line>, newlines: usize) {
    if newlines >= 2 && !matches!(lines.last(), None | Some(Line::Open { .. } | Line::Blank)) {
        lines.push(Line::Blank);
    }
}

fn render(lines: &[Line]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < lines.len() {
        // Keys of the statements of one block, up to its next nested block, align.
        let run_end = (i..lines.len())
            .find(|&j| {
                !matches!(
                    lines[j],
                    Line::Statement { .. } | Line::Comment { .. } | Line::Blank
                )
            })
            .unwrap_or(lines.len());
        let width = lines[i..run_end]
            .iter()
            .filter_map(|l| match l {
                Line::Statement { key, values, .. } if !values.is_empty() => {
                    Some(key.chars().count())
                }
                _ => None,
            })
            .max()
            .unwrap_or(0);
        for line in &lines[i..run_end.max(i + 1)] {
            render_line(line, width, &mut out);
        }
        i = run_end.max(i + 1);
    }
    while out.ends_with("\n\n") {
        out.pop();
    }
    out
}

fn render_line(line: &Line, width: usize, out: &mut String) {
    let with_comment = |mut text: String, comment: &Option<String>| {
        if let Some(comment) = comment {
            text.push_str("  ");
            text.push_str(comment);
        }
        text
    };
    let text = match line {
        Line::Statement {
            depth,
            key,
            values,
            comment,
        } if values.is_empty() => with_comment(format!("{}{key};", INDENT.repeat(*depth)), comment),
        Line::Statement {
            depth,
            key,
            values,
            comment,
        } => with_comment(
            format!("{}{key:<width$} {values};", INDENT.repeat(*depth)),
            comment,
        ),
        Line::Open {
            depth,
            name,
            comment,
        } => with_comment(format!("{}{name} {{", INDENT.repeat(*depth)), comment),
        Line::Close { depth, comment } => {
            with_comment(format!("{}}}", INDENT.repeat(*depth)), comment)
        }
        Line::Empty {
            depth,
            name,
            comment,
        } => with_comment(format!("{}{name} {{ }}", INDENT.repeat(*depth)), comment),
        Line::Comment { depth, text } => format!("{}{text}", INDENT.repeat(*depth)),
        Line::Blank => String::new(),
    };
    out.push_str(&text);
    out.push('\n');
}

#[cfg(test)]
mod tests {
    use super::format;

    #[test]
    fn lays_out_blocks_aligns_keys_and_keeps_comments() {
        let source = "# head\ndaemon{gui_port: 6789;}\n\n\n\nworker {name api; exec   node ; # the runtime\n  params server.js --port 3000;env A=1,B=2;;\n  vanguard { }\n\n  // limits\n  statsd {host 127.0.0.1:8125;}\n}\n";
        let expected = "# head\ndaemon {\n    gui_port 6789;\n}\n\nworker {\n    name   api;\n    exec   node;  # the runtime\n    params server.js --port 3000;\n    env    A=1, B=2;\n    vanguard { }\n\n    // limits\n    statsd {\n        host 127.0.0.1:8125;\n    }\n}\n";
        assert_eq!(format(source).as_deref(), Some(expected));
        assert_eq!(format(expected).as_deref(), Some(expected), "idempotent");
        assert_eq!(
            format("worker { exec node }"),
            None,
            "syntax errors are not formatted"
        );
    }
}
