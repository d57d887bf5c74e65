//! The parser: tokens to a syntax tree of statements and blocks, with error
//! recovery so that one run reports every independent error in a file.
//!
//! Grammar (trivia removed):
//! ```text
//! file  = item* EOF
//! item  = block | stmt | ";"
//! block = WORD "{" item* "}"
//! stmt  = WORD (value ","?)* ";"
//! value = WORD                   (a WORD directly followed by "{" starts a block instead)
//! ```
//! Common mistakes are parsed as if corrected and reported by name: a missing
//! `;` before `}`, before a block, at the end of the file or before a line
//! that starts with a known key; a missing `}` at the end of the file; a
//! block keyword with a name (`worker api {`).
//! Anything else unexpected skips to the next `;`.

use chumsky::input::ValueInput;
use chumsky::prelude::*;

use crate::codes;
use crate::diag::{Diagnostic, Diagnostics};
use crate::lexer::{self, Tok};
use crate::schema::Scope;
use crate::source::{FileId, SourceFile, Span};

#[derive(Clone, Debug, PartialEq)]
pub struct Word {
    pub text: String,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Value {
    pub text: String,
    pub span: Span,
    pub quoted: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Stmt {
    pub key: Word,
    pub values: Vec<Value>,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Block {
    pub name: Word,
    pub items: Vec<Item>,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Item {
    Stmt(Stmt),
    Block(Block),
}

/// What the grammar produces: spans only, turned into a tree with text by `Builder`.
#[derive(Clone, Debug)]
enum Raw {
    Stmt {
        key: SimpleSpan,
        values: Vec<(Tok, SimpleSpan)>,
        terminated: bool,
        span: SimpleSpan,
    },
    Block {
        name: SimpleSpan,
        open: SimpleSpan,
        items: Vec<Raw>,
        closed: bool,
        span: SimpleSpan,
    },
    StrayClose(SimpleSpan),
    Nothing,
}

fn grammar<'t, I>() -> impl Parser<'t, I, Vec<Raw>, extra::Err<Simple<'t, Tok>>>
where
    I: ValueInput<'t, Token = Tok, Span = SimpleSpan>,
{
    let word = just(Tok::Word).map_with(|_, e| e.span());
    let block_start = just(Tok::Word).then(just(Tok::LBrace)).ignored();
    let value = any()
        .filter(|t: &Tok| t.is_value())
        .and_is(block_start.not())
        .map_with(|t, e| (t, e.span()));
    let values = value
        .separated_by(just(Tok::Comma).or_not())
        .allow_leading()
        .allow_trailing()
        .collect::<Vec<_>>();
    let terminator =
        just(Tok::Semi)
            .to(true)
            .or(choice((just(Tok::RBrace).ignored(), end(), block_start))
                .rewind()
                .to(false));
    let stmt = word
        .then(values)
        .then(terminator)
        .map_with(|((key, values), terminated), e| Raw::Stmt {
            key,
            values,
            terminated,
            span: e.span(),
        });
    let close = just(Tok::RBrace).to(true).or(end().to(false));

    let item = recursive(|item| {
        let block = word
            .then(just(Tok::LBrace).map_with(|_, e| e.span()))
            .then(item.clone().repeated().collect::<Vec<_>>())
            .then(close)
            .map_with(|(((name, open), items), closed), e| Raw::Block {
                name,
                open,
                items,
                closed,
                span: e.span(),
            });
        choice((block, stmt, just(Tok::Semi).to(Raw::Nothing))).recover_with(skip_until(
            any().and_is(just(Tok::RBrace).not()).ignored(),
            just(Tok::Semi).ignored(),
            || Raw::Nothing,
        ))
    });
    item.or(just(Tok::RBrace).map_with(|_, e| Raw::StrayClose(e.span())))
        .repeated()
        .collect::<Vec<_>>()
        .then_ignore(end())
}

/// Parses one file. Never fails: problems become diagnostics and the tree
/// holds whatever could be recovered.
pub fn parse(file: FileId, text: &str, diags: &mut Diagnostics) -> Vec<Item> {
    let mut significant = Vec::with_capacity(text.len() / 8);
    for token in lexer::tokens(text) {
        if token.kind == Tok::Unterminated {
            diags.push(unterminated(file, text, token.range()));
        }
        if !token.kind.is_trivia() {
            significant.push((token.kind, SimpleSpan::from(token.range())));
        }
    }
    let builder = Builder {
        file,
        text,
        tokens: &significant,
    };
    let grammar = grammar();
    let mut items = Vec::new();
    let before = diags.total();
    let mut statements = 0;
    // Top-level items are parsed one at a time, so a file of millions of
    // mistakes can be given up on after the first many, before the parser
    // has built them all.
    for chunk in top_level_items(&significant) {
        let end = significant
            .get(chunk.end)
            .map_or(text.len(), |(_, s)| s.start);
        let eoi = SimpleSpan::from(end..end);
        let (raw, chunk_errors) = grammar
            .parse(significant[chunk.clone()].split_token_span(eoi))
            .into_output_errors();
        for error in chunk_errors {
            diags.push(builder.syntax_error(error.span().into_range(), error.found()));
        }
        builder.build(raw.unwrap_or_default(), &mut items, diags);
        statements += significant[chunk.clone()]
            .iter()
            .filter(|(tok, _)| *tok == Tok::Semi)
            .count();
        let too_many = if diags.total() - before > MAX_SYNTAX_ERRORS {
            Some(format!("more than {MAX_SYNTAX_ERRORS} syntax errors"))
        } else if statements > crate::include::MAX_STATEMENTS {
            Some(format!(
                "more than {} statements",
                crate::include::MAX_STATEMENTS
            ))
        } else {
            None
        };
        if let Some(too_many) = too_many
            && let Some((_, next)) = significant.get(chunk.end)
        {
            let at = Span::new(file, next.start..next.start);
            diags.push(
                Diagnostic::new(
                    &codes::SYNTAX,
                    at,
                    format!(
                        "the file has {too_many} before this point; the rest of it is not read"
                    ),
                )
                .label("reading stopped here")
                .help("fix the first errors and check again"),
            );
            break;
        }
    }
    items
}

/// Syntax errors of one file past which the rest of it is not read.
const MAX_SYNTAX_ERRORS: usize = 10_000;

/// The significant tokens cut into top-level items: after a `;` or a `}`
/// that closes a block at the top level, and around a stray `}`. The
/// grammar reads the same items from each piece as from the whole. A block
/// of more statements than a config may hold is cut after them, so the
/// parser never builds the rest.
fn top_level_items(
    tokens: &[(Tok, SimpleSpan)],
) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
    let mut start = 0;
    let mut depth = 0usize;
    std::iter::from_fn(move || {
        if start >= tokens.len() {
            return None;
        }
        let mut statements = 0;
        for (i, (tok, _)) in tokens.iter().enumerate().skip(start) {
            let end = match tok {
                Tok::LBrace => {
                    depth += 1;
                    continue;
                }
                // A stray `}` is a piece of its own, after what came before it.
                Tok::RBrace if depth == 0 => i.max(start + 1),
                Tok::RBrace => {
                    depth -= 1;
                    if depth > 0 {
                        continue;
                    }
                    i + 1
                }
                Tok::Semi if depth == 0 => i + 1,
                Tok::Semi => {
                    statements += 1;
                    if statements <= crate::include::MAX_STATEMENTS {
                        continue;
                    }
                    i + 1
                }
                _ => continue,
            };
            let piece = start..end;
            start = end;
            return Some(piece);
        }
        let piece = start..tokens.len();
        start = tokens.len();
        Some(piece)
    })
}

fn unterminated(file: FileId, text: &str, range: std::ops::Range<usize>) -> Diagnostic {
    let quote = range.start + lexer::unclosed_quote(&text[range]);
    let help = match text.as_bytes()[quote] {
        b'\'' => {
            "quotes close on the line they open; to use an apostrophe in a value, put the whole value in double quotes"
        }
        _ => {
            "quotes close on the line they open: add the closing quote; write `\\n` for a line break"
        }
    };
    Diagnostic::new(
        &codes::UNTERMINATED_STRING,
        Span::new(file, quote..quote + 1),
        "unterminated quoted string",
    )
    .label("this quote is not closed on its line")
    .help(help)
}

/// Whether a word is a key of some block, so that a line starting with it
/// begins a new statement even when the `;` before it is missing.
fn is_known_key(word: &str) -> bool {
    word == "include"
        || Scope::ALL
            .into_iter()
            .any(|scope| scope.key_index(word).is_some())
}

/// An unterminated quote at the end of a statement has been reported, and
/// it swallowed the statement's `;`.
fn swallows_semicolon(values: &[(Tok, SimpleSpan)]) -> bool {
    values
        .last()
        .is_some_and(|(tok, _)| *tok == Tok::Unterminated)
}

struct Builder<'a> {
    file: FileId,
    text: &'a str,
    tokens: &'a [(Tok, SimpleSpan)],
}

impl Builder<'_> {
    fn span(&self, s: SimpleSpan) -> Span {
        Span::new(self.file, s.into_range())
    }

    fn word(&self, s: SimpleSpan) -> Word {
        Word {
            text: self.text[s.into_range()].to_owned(),
            span: self.span(s),
        }
    }

    fn describe(&self, found: Option<&Tok>, range: std::ops::Range<usize>) -> String {
        match found {
            Some(Tok::Word) => format!("`{}`", &self.text[range]),
            Some(Tok::Unterminated) => "an unterminated string".to_owned(),
            Some(tok) => tok.to_string(),
            None => "the end of the file".to_owned(),
        }
    }

    fn syntax_error(&self, range: std::ops::Range<usize>, found: Option<&Tok>) -> Diagnostic {
        let found = self.describe(found, range.clone());
        // Tokens are in order: a binary search, as a file may hold millions of errors.
        let before = self.tokens.partition_point(|(_, s)| s.end <= range.start);
        let previous = before.checked_sub(1).map(|i| self.tokens[i].0);
        let message = match (previous, found.as_str()) {
            (_, "`{`") => "unexpected `{`: a block needs a name before it".to_owned(),
            (Some(Tok::RBrace | Tok::Semi | Tok::LBrace) | None, _) => {
                format!("{found} cannot start a statement")
            }
            _ => format!("unexpected {found}"),
        };
        Diagnostic::new(&codes::SYNTAX, self.span(SimpleSpan::from(range)), message)
            .label("unexpected here")
            .help("a statement is `key value;` and a block is `name { … }`; quote values that contain `{`, `}`, `;` or `,`")
    }

    fn build(&self, raws: Vec<Raw>, out: &mut Vec<Item>, diags: &mut Diagnostics) {
        let mut raws = raws.into_iter().peekable();
        while let Some(raw) = raws.next() {
            // `worker api { … }`: a block keyword, a word, then a block. Read it as
            // the `worker` block, so its contents are still checked.
            if let Raw::Stmt {
                key,
                values,
                terminated: false,
                ..
            } = &raw
                && values.is_empty()
                && Scope::for_block(&self.text[key.into_range()]).is_some()
                && let Some(Raw::Block {
                    name,
                    open,
                    items,
                    closed,
                    span,
                }) = raws.peek().cloned()
            {
                raws.next();
                let keyword = self.word(*key);
                let label = self.word(name);
                diags.push(
                    Diagnostic::new(
                        &codes::SYNTAX,
                        label.span,
                        format!("`{}` takes no name after the keyword", keyword.text),
                    )
                    .label("unexpected word before `{`")
                    .help(format!(
                        "write `{} {{` and put `name {};` inside the block",
                        keyword.text, label.text
                    )),
                );
                let block = Raw::Block {
                    name: *key,
                    open,
                    items,
                    closed,
                    span: SimpleSpan::from(key.start..span.end),
                };
                self.build(vec![block], out, diags);
                continue;
            }
            match raw {
                Raw::Stmt {
                    key,
                    values,
                    terminated,
                    span,
                } => self.stmt(key, values, terminated, span, out, diags),
                Raw::Block {
                    name,
                    open,
                    items,
                    closed,
                    span,
                } => {
                    if !closed {
                        diags.push(
                            Diagnostic::new(
                                &codes::UNCLOSED_BLOCK,
                                self.span(open),
                                "this block is never closed",
                            )
                            .label("opened here")
                            .help("add `}` where the block should end"),
                        );
                    }
                    let mut children = Vec::new();
                    self.build(items, &mut children, diags);
                    out.push(Item::Block(Block {
                        name: self.word(name),
                        items: children,
                        span: self.span(span),
                    }));
                }
                Raw::StrayClose(s) => diags.push(
                    Diagnostic::new(&codes::UNEXPECTED_CLOSE, self.span(s), "unexpected `}`")
                        .label("this closes no block")
                        .help("remove it, or look for a block above that is closed twice"),
                ),
                Raw::Nothing => {}
            }
        }
    }

    /// One statement; a value that starts a line with a known key begins
    /// the next statement, the `;` before it being reported as missing.
    fn stmt(
        &self,
        key: SimpleSpan,
        values: Vec<(Tok, SimpleSpan)>,
        terminated: bool,
        span: SimpleSpan,
        out: &mut Vec<Item>,
        diags: &mut Diagnostics,
    ) {
        let mut previous_end = key.end;
        let split = values.iter().position(|&(tok, s)| {
            let starts_line = self.text[previous_end..s.start].contains('\n');
            previous_end = s.end;
            tok == Tok::Word && starts_line && is_known_key(&self.text[s.into_range()])
        });
        if let Some(at) = split {
            let (head, tail) = values.split_at(at);
            let head_end = head.last().map_or(key.end, |(_, s)| s.end);
            if !swallows_semicolon(head) {
                diags.push(
                    self.missing_semicolon(SimpleSpan::from(head_end..head_end), Some(tail[0].1)),
                );
            }
            self.push_stmt(
                key,
                head.to_vec(),
                SimpleSpan::from(span.start..head_end),
                out,
                diags,
            );
            let (next_key, rest) = (tail[0].1, tail[1..].to_vec());
            return self.stmt(
                next_key,
                rest,
                terminated,
                SimpleSpan::from(next_key.start..span.end),
                out,
                diags,
            );
        }
        if !terminated && !swallows_semicolon(&values) {
            let end = values.last().map_or(key.end, |(_, s)| s.end);
            diags.push(self.missing_semicolon(SimpleSpan::from(end..end), None));
        }
        self.push_stmt(key, values, span, out, diags);
    }

    fn push_stmt(
        &self,
        key: SimpleSpan,
        values: Vec<(Tok, SimpleSpan)>,
        span: SimpleSpan,
        out: &mut Vec<Item>,
        diags: &mut Diagnostics,
    ) {
        let mut key = self.word(key);
        let mut values: Vec<Value> = values
            .into_iter()
            .map(|(_, s)| {
                let raw = &self.text[s.into_range()];
                Value {
                    text: lexer::unquote(raw),
                    span: self.span(s),
                    quoted: lexer::is_quoted(raw),
                }
            })
            .collect();
        if lexer::is_quoted(&key.text) {
            let unquoted = lexer::unquote(&key.text);
            diags.push(
                Diagnostic::new(&codes::SYNTAX, key.span, "keys are not quoted")
                    .label("quoted key")
                    .help(format!("write `{unquoted}` without quotes")),
            );
            key.text = unquoted;
        }
        // `key: value;`: the colon is optional, glued to the key or alone.
        if let Some(stripped) = key.text.strip_suffix(':') {
            key.text = stripped.to_owned();
        } else if values.first().is_some_and(|v| !v.quoted && v.text == ":") {
            values.remove(0);
        }
        out.push(Item::Stmt(Stmt {
            key,
            values,
            span: self.span(span),
        }));
    }

    fn missing_semicolon(&self, at: SimpleSpan, next_key: Option<SimpleSpan>) -> Diagnostic {
        let line = SourceFile::line_of(self.text, at.start);
        let diagnostic = Diagnostic::new(&codes::MISSING_SEMICOLON, self.span(at), "missing `;`")
            .label("expected `;` here")
            .help(format!("add `;` at the end of line {line}"));
        match next_key {
            Some(next) => diagnostic.secondary(self.span(next), "the next statement starts here"),
            None => diagnostic,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(text: &str) -> (Vec<Item>, Vec<(&'static str, usize)>) {
        let mut diags = Diagnostics::default();
        let items = parse(FileId(0), text, &mut diags);
        (
            items,
            diags
                .into_sorted()
                .0
                .iter()
                .map(|d| (d.code.id, d.primary.span.start as usize))
                .collect(),
        )
    }

    /// The parser never builds more statements than a config may hold, in
    /// one block or at the top level: it stops with an error saying so.
    #[test]
    fn a_block_of_too_many_statements_is_cut() {
        let max = crate::include::MAX_STATEMENTS;
        let text = format!("worker {{ {} }}\nlast;", "a; ".repeat(max + 10));
        let mut diags = Diagnostics::default();
        let items = parse(FileId(0), &text, &mut diags);
        let Some(Item::Block(block)) = items.first() else {
            panic!("no block: {items:?}")
        };
        assert_eq!(items.len(), 1);
        assert_eq!(block.items.len(), max + 1);
        let (diagnostics, _) = diags.into_sorted();
        assert!(
            diagnostics
                .iter()
                .any(|d| d.message.contains("the rest of it is not read")),
            "{diagnostics:?}"
        );
    }

    fn shape(items: &[Item]) -> String {
        items
            .iter()
            .map(|item| match item {
                Item::Stmt(s) => {
                    let values: Vec<&str> = s.values.iter().map(|v| v.text.as_str()).collect();
                    format!("{}=[{}]", s.key.text, values.join("|"))
                }
                Item::Block(b) => format!("{}{{{}}}", b.name.text, shape(&b.items)),
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn parses_statements_blocks_and_values() {
        let (items, errors) = parse_str(
            "daemon { gui_port: 6789; }\nworker {\n name : api;\n env A=1, B=\"x y\";\n vanguard { ban_ip 1.2.3.4; }\n}\n;",
        );
        assert_eq!(errors, vec![]);
        assert_eq!(
            shape(&items),
            "daemon{gui_port=[6789]} worker{name=[api] env=[A=1|B=x y] vanguard{ban_ip=[1.2.3.4]}}"
        );
    }

    #[test]
    fn missing_semicolon_before_close_and_block_is_reported_and_recovered() {
        let (items, errors) = parse_str("worker {\n name api\n vanguard { rate_limit 5 }\n}");
        assert_eq!(shape(&items), "worker{name=[api] vanguard{rate_limit=[5]}}");
        assert_eq!(errors, vec![("E0004", 18), ("E0004", 43)]);
    }

    #[test]
    fn a_named_block_header_is_one_error_and_keeps_the_block() {
        let (items, errors) = parse_str("worker api {\n exec node;\n}");
        assert_eq!(shape(&items), "worker{exec=[node]}");
        assert_eq!(errors, vec![("E0005", 7)]);
    }

    #[test]
    fn a_line_starting_with_a_known_key_starts_a_statement() {
        let (items, errors) =
            parse_str("worker {\n params server.js\n instances 4;\n name\n exec node;\n}");
        assert_eq!(
            shape(&items),
            "worker{params=[server.js] instances=[4] name=[] exec=[node]}"
        );
        assert_eq!(errors, vec![("E0004", 26), ("E0004", 46)]);
    }

    #[test]
    fn quoted_keys_and_unterminated_quotes_are_single_errors() {
        let (items, errors) = parse_str("\"name\" api;\nban_response Don't do that;\n}");
        assert_eq!(shape(&items), "name=[api] ban_response=[Dont do that;]");
        assert_eq!(
            errors.iter().map(|e| e.0).collect::<Vec<_>>(),
            vec!["E0005", "E0002", "E0007"]
        );
    }

    #[test]
    fn reports_every_independent_error() {
        let (items, errors) = parse_str("worker { { bad; name a; }\n}\nworker { exec x;");
        assert_eq!(
            errors.iter().map(|e| e.0).collect::<Vec<_>>(),
            vec!["E0005", "E0007", "E0006"]
        );
        assert_eq!(shape(&items), "worker{name=[a]} worker{exec=[x]}");
    }
}
