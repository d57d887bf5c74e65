//! The parser: tokens to a syntax tree of statements and blocks, with error
//! recovery so that one run reports every independent error in a file.
//!
//! Grammar (trivia removed):
//! ```text
//! file  = item* EOF
//! item  = block | stmt | ";"
//! block = WORD "{" item* "}"
//! stmt  = WORD (value ","?)* ";"
//! value = WORD | STRING          (a WORD directly followed by "{" starts a block instead)
//! ```
//! A missing `;` before `}`, before a block or at the end of the file, and a
//! missing `}` at the end of the file, are parsed as if they were there and
//! reported by name; anything else unexpected skips to the next `;`.

use chumsky::input::ValueInput;
use chumsky::prelude::*;

use crate::codes;
use crate::diag::{Diagnostic, Diagnostics};
use crate::lexer::{self, Tok};
use crate::source::{FileId, Span};

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

/// What the grammar produces: spans only, turned into a tree with text by `build`.
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

fn grammar<'t, I>() -> impl Parser<'t, I, Vec<Raw>, extra::Err<Rich<'t, Tok>>>
where
    I: ValueInput<'t, Token = Tok, Span = SimpleSpan>,
{
    let word = just(Tok::Word).map_with(|_, e| e.span());
    let block_start = just(Tok::Word).then(just(Tok::LBrace)).ignored();
    let value = any()
        .filter(|t: &Tok| t.is_value())
        .and_is(block_start.clone().not())
        .map_with(|t, e| (t, e.span()));
    let values = value
        .separated_by(just(Tok::Comma).or_not())
        .allow_leading()
        .allow_trailing()
        .collect::<Vec<_>>();
    let terminator = just(Tok::Semi).to(true).or(choice((
        just(Tok::RBrace).ignored(),
        end(),
        block_start.clone(),
    ))
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

    let item = recursive(|item| {
        let block = word
            .then(just(Tok::LBrace).map_with(|_, e| e.span()))
            .then(item.repeated().collect::<Vec<_>>())
            .then(just(Tok::RBrace).to(true).or(end().to(false)))
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
    let tokens = lexer::lex(text);
    let mut significant = Vec::with_capacity(tokens.len() / 2);
    for token in &tokens {
        let span = Span::new(file, token.range());
        match token.kind {
            Tok::Unterminated => {
                let quote = token.start as usize + lexer::unclosed_quote(&text[token.range()]);
                diags.push(
                    Diagnostic::new(&codes::UNTERMINATED_STRING, Span::new(file, quote..quote + 1), "unterminated quoted string")
                        .label("this quote is never closed")
                        .help("add the closing quote; to use an apostrophe in a value, put the value in double quotes"),
                )
            }
            Tok::Error => diags.push(
                Diagnostic::new(
                    &codes::UNEXPECTED_CHAR,
                    span,
                    format!("unexpected character `{}`", &text[token.range()]),
                )
                .help("quote the value that contains it"),
            ),
            _ => {}
        }
        if !token.kind.is_trivia() {
            significant.push((token.kind, SimpleSpan::from(token.range())));
        }
    }

    let eoi = SimpleSpan::from(text.len()..text.len());
    let (raw, errors) = grammar()
        .parse(significant.as_slice().split_token_span(eoi))
        .into_output_errors();
    for error in errors {
        diags.push(syntax_error(file, text, &significant, &error));
    }
    let builder = Builder {
        file,
        text,
        tokens: &significant,
    };
    let mut items = Vec::new();
    builder.build(raw.unwrap_or_default(), &mut items, diags);
    items
}

fn syntax_error(
    file: FileId,
    text: &str,
    tokens: &[(Tok, SimpleSpan)],
    error: &Rich<'_, Tok>,
) -> Diagnostic {
    let span = Span::new(file, error.span().into_range());
    let found = match error.found() {
        Some(Tok::Word) => format!("`{}`", &text[span.range()]),
        Some(tok) => tok.to_string(),
        None => "the end of the file".to_owned(),
    };
    let mut expected: Vec<String> = error.expected().map(|p| p.to_string()).collect();
    expected.sort();
    expected.dedup();
    let after = tokens
        .iter()
        .rev()
        .find(|(_, s)| s.end <= span.start as usize);
    let message = match after {
        Some((Tok::RBrace | Tok::Semi, _)) | None => {
            format!("unexpected {found}, expected a key or a block")
        }
        Some(_) => format!("unexpected {found}"),
    };
    Diagnostic::new(&codes::SYNTAX, span, message)
        .label(if expected.is_empty() { String::new() } else { format!("expected {}", expected.join(" or ")) })
        .help("a statement is `key value;` and a block is `name { … }`; quote values that contain `{`, `}`, `;` or `,`")
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

    fn build(&self, raws: Vec<Raw>, out: &mut Vec<Item>, diags: &mut Diagnostics) {
        let mut raws = raws.into_iter().peekable();
        while let Some(raw) = raws.next() {
            // `worker api { … }`: a block keyword, a word, then a block. Read it as
            // the `worker` block, so its contents are still checked.
            if let Raw::Stmt { key, values, terminated: false, .. } = &raw
                && values.is_empty()
                && crate::schema::Scope::for_block(&self.text[key.into_range()]).is_some()
                && let Some(Raw::Block { name, open, items, closed, span }) = raws.peek().cloned()
            {
                raws.next();
                let keyword = self.word(*key);
                let label = self.word(name);
                diags.push(
                    Diagnostic::new(&codes::SYNTAX, label.span, format!("`{}` takes no name after the keyword", keyword.text))
                        .label("unexpected word before `{`")
                        .help(format!("write `{} {{` and put `name {};` inside the block", keyword.text, label.text)),
                );
                let block = Raw::Block { name: *key, open, items, closed, span: SimpleSpan::from(key.start..span.end) };
                self.build(vec![block], out, diags);
                continue;
            }
            match raw {
                Raw::Stmt {
                    key,
                    values,
                    terminated,
                    span,
                } => {
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
                    // `key: value;` — the colon is optional, glued to the key or alone.
                    if let Some(stripped) = key.text.strip_suffix(':') {
                        key.text = stripped.to_owned();
                    } else if values.first().is_some_and(|v| !v.quoted && v.text == ":") {
                        values.remove(0);
                    }
                    let span = self.span(span);
                    if !terminated {
                        diags.push(self.missing_semicolon(span));
                    }
                    out.push(Item::Stmt(Stmt { key, values, span }));
                }
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

    fn missing_semicolon(&self, stmt: Span) -> Diagnostic {
        let last = self
            .tokens
            .iter()
            .rev()
            .find(|(_, s)| s.end <= stmt.end as usize)
            .map_or(stmt, |(_, s)| self.span(*s));
        let at = last.end_point();
        let line = crate::source::SourceFile::line_of(self.text, at.start as usize);
        Diagnostic::new(&codes::MISSING_SEMICOLON, at, "missing `;`")
            .label("expected `;` here")
            .help(format!("add `;` at the end of line {line}"))
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
                .iter()
                .map(|d| (d.code.id, d.primary.span.start as usize))
                .collect(),
        )
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
    fn reports_every_independent_error() {
        let (items, errors) = parse_str("worker { { bad; name a; }\n}\nworker { exec x;");
        assert_eq!(
            errors.iter().map(|e| e.0).collect::<Vec<_>>(),
            vec!["E0005", "E0007", "E0006"]
        );
        assert_eq!(shape(&items), "worker{name=[a]} worker{exec=[x]}");
    }
}
