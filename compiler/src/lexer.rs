//! The lexer. It is lossless: whitespace and comments are tokens too, so the
//! tokens of a file, concatenated, give back the file byte for byte.

use logos::Logos;

#[derive(Logos, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Tok {
    /// A byte-order mark counts as whitespace, so files saved by editors
    /// that write one read like any other.
    #[regex(r"\s+")]
    #[token("\u{feff}")]
    Whitespace,
    /// `#` and `//` start a comment only where a token starts, so `api#2` and
    /// `http://host` stay words (the longer word match wins inside a word).
    #[regex(r"(#|//)[^\n]*", priority = 10, allow_greedy = true)]
    Comment,
    /// A value: plain characters and quoted parts, glued together as in a
    /// shell (`B="x y"` is the one value `B=x y`). Outside quotes a word ends
    /// at whitespace, `;`, `,`, `{` or `}`; `${VAR}` is part of a word. Quotes
    /// close on the line they open, so a stray apostrophe cannot swallow the
    /// rest of the file.
    #[regex(
        r#"([^\s;,{}"'`\u{FEFF}]|\$\{[A-Za-z0-9_]*\}|"([^"\\\n]|\\[^\n])*"|'[^'\n]*'|`[^`\n]*`)+"#
    )]
    Word,
    /// A word whose last quote is not closed on its line.
    #[regex(r#"([^\s;,{}"'`\u{FEFF}]|\$\{[A-Za-z0-9_]*\}|"([^"\\\n]|\\[^\n])*"|'[^'\n]*'|`[^`\n]*`)*("([^"\\\n]|\\[^\n])*\\?|'[^'\n]*|`[^`\n]*)"#)]
    Unterminated,
    #[token(";")]
    Semi,
    #[token(",")]
    Comma,
    #[token("{")]
    LBrace,
    #[token("}")]
    RBrace,
    Error,
}

impl Tok {
    pub fn is_trivia(self) -> bool {
        matches!(self, Tok::Whitespace | Tok::Comment)
    }

    pub fn is_value(self) -> bool {
        matches!(self, Tok::Word | Tok::Unterminated)
    }
}

impl std::fmt::Display for Tok {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Tok::Whitespace => "whitespace",
            Tok::Comment => "a comment",
            Tok::Word => "a value",
            Tok::Unterminated => "an unterminated string",
            Tok::Semi => "`;`",
            Tok::Comma => "`,`",
            Tok::LBrace => "`{`",
            Tok::RBrace => "`}`",
            Tok::Error => "an invalid character",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Token {
    pub kind: Tok,
    pub start: u32,
    pub end: u32,
}

impl Token {
    pub fn range(&self) -> std::ops::Range<usize> {
        self.start as usize..self.end as usize
    }
}

/// The tokens of a text, trivia included.
pub fn tokens(text: &str) -> impl Iterator<Item = Token> + '_ {
    Tok::lexer(text).spanned().map(|(result, span)| Token {
        kind: result.unwrap_or(Tok::Error),
        start: span.start as u32,
        end: span.end as u32,
    })
}

pub fn lex(text: &str) -> Vec<Token> {
    tokens(text).collect()
}

/// The value a word stands for: quotes stripped, escapes applied inside
/// double quotes. Unknown escapes are kept as written, so `"C:\dir"` survives.
pub fn unquote(raw: &str) -> String {
    if !is_quoted(raw) {
        return raw.to_owned();
    }
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' => match chars.next() {
                            Some('n') => out.push('\n'),
                            Some('t') => out.push('\t'),
                            Some('r') => out.push('\r'),
                            Some(c @ ('"' | '\\' | '\'' | '`' | '$')) => out.push(c),
                            Some(other) => {
                                out.push('\\');
                                out.push(other);
                            }
                            None => out.push('\\'),
                        },
                        c => out.push(c),
                    }
                }
            }
            '\'' | '`' => out.extend(chars.by_ref().take_while(|&x| x != c)),
            c => out.push(c),
        }
    }
    out
}

/// Whether any part of the word was quoted.
pub fn is_quoted(raw: &str) -> bool {
    raw.contains(['"', '\'', '`'])
}

/// Byte offset of the quote that an unterminated word never closes.
pub fn unclosed_quote(raw: &str) -> usize {
    let mut open: Option<(usize, char)> = None;
    let mut escaped = false;
    for (i, c) in raw.char_indices() {
        match open {
            None if matches!(c, '"' | '\'' | '`') => open = Some((i, c)),
            None => {}
            Some((_, '"')) if escaped => escaped = false,
            Some((_, '"')) if c == '\\' => escaped = true,
            Some((_, q)) if c == q => open = None,
            Some(_) => {}
        }
    }
    open.map_or(0, |(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn kinds(text: &str) -> Vec<(Tok, &str)> {
        lex(text)
            .iter()
            .filter(|t| !t.kind.is_trivia())
            .map(|t| (t.kind, &text[t.range()]))
            .collect()
    }

    #[test]
    fn comments_start_only_at_token_start() {
        assert_eq!(
            kinds("server http://0.0.0.0:3000; # trailing\n// whole line\nname api#2;"),
            vec![
                (Tok::Word, "server"),
                (Tok::Word, "http://0.0.0.0:3000"),
                (Tok::Semi, ";"),
                (Tok::Word, "name"),
                (Tok::Word, "api#2"),
                (Tok::Semi, ";"),
            ]
        );
        assert_eq!(kinds("a;#c\n"), vec![(Tok::Word, "a"), (Tok::Semi, ";")]);
    }

    #[test]
    fn words_end_at_delimiters_and_may_contain_quoted_parts() {
        assert_eq!(
            kinds(r#"env A=1,B="x y;" 'q r' `b`{}"#),
            vec![
                (Tok::Word, "env"),
                (Tok::Word, "A=1"),
                (Tok::Comma, ","),
                (Tok::Word, "B=\"x y;\""),
                (Tok::Word, "'q r'"),
                (Tok::Word, "`b`"),
                (Tok::LBrace, "{"),
                (Tok::RBrace, "}"),
            ]
        );
    }

    #[test]
    fn unterminated_quotes_end_at_the_end_of_their_line() {
        assert_eq!(
            kinds("a x\"b;\n c;"),
            vec![
                (Tok::Word, "a"),
                (Tok::Unterminated, "x\"b;"),
                (Tok::Word, "c"),
                (Tok::Semi, ";")
            ]
        );
        assert_eq!(
            kinds("p Don't do;\n"),
            vec![(Tok::Word, "p"), (Tok::Unterminated, "Don't do;")]
        );
        assert_eq!(
            kinds("log ${HOME}/x;"),
            vec![
                (Tok::Word, "log"),
                (Tok::Word, "${HOME}/x"),
                (Tok::Semi, ";")
            ]
        );
        assert_eq!(
            kinds("\u{feff}a;"),
            vec![(Tok::Word, "a"), (Tok::Semi, ";")]
        );
        assert_eq!(unclosed_quote("x\"b;"), 1);
        assert_eq!(unclosed_quote("'a'\"b\\\"c"), 3);
    }

    #[test]
    fn unquote_applies_escapes_in_double_quotes_only() {
        assert_eq!(unquote(r#""a\"b\n\q""#), "a\"b\n\\q");
        assert_eq!(unquote(r"'a\n'"), r"a\n");
        assert_eq!(unquote(r#"B="x y"z"#), "B=x yz");
        assert_eq!(unquote("plain"), "plain");
    }

    proptest! {
        #[test]
        fn lexing_is_lossless(text in any::<String>()) {
            let rebuilt: String = lex(&text).iter().map(|t| &text[t.range()]).collect();
            prop_assert_eq!(rebuilt, text);
        }

        #[test]
        fn lexing_is_lossless_on_config_like_text(text in "[a-z#/;,{}\"'` \n\\\\:=*.]{0,80}") {
            let tokens = lex(&text);
            let rebuilt: String = tokens.iter().map(|t| &text[t.range()]).collect();
            prop_assert_eq!(rebuilt, text);
            for pair in tokens.windows(2) {
                prop_assert_eq!(pair[0].end, pair[1].start);
            }
        }
    }
}
