//! Diagnostics as data. The compiler only produces them; `render` turns them
//! into text for people, JSON for programs and annotations for CI.

use crate::codes::Code;
use crate::source::Span;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Label {
    pub span: Span,
    pub message: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Diagnostic {
    pub code: &'static Code,
    pub message: String,
    pub primary: Label,
    pub secondary: Vec<Label>,
    pub help: Option<String>,
}

impl Diagnostic {
    pub fn new(code: &'static Code, span: Span, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            code,
            message: message.into(),
            primary: Label {
                span,
                message: String::new(),
            },
            secondary: Vec::new(),
            help: None,
        }
    }

    pub fn severity(&self) -> Severity {
        self.code.severity
    }

    pub fn label(mut self, message: impl Into<String>) -> Diagnostic {
        self.primary.message = message.into();
        self
    }

    pub fn secondary(mut self, span: Span, message: impl Into<String>) -> Diagnostic {
        self.secondary.push(Label {
            span,
            message: message.into(),
        });
        self
    }

    pub fn help(mut self, help: impl Into<String>) -> Diagnostic {
        self.help = Some(help.into());
        self
    }

    pub fn maybe_help(mut self, help: Option<String>) -> Diagnostic {
        self.help = help;
        self
    }
}

/// How many diagnostics a compile keeps in detail. A file of millions of
/// mistakes (2.5 million took 48 s and 8.9 GB to report) gets the first
/// ones in detail and the number of the others: nobody reads past these.
pub const MAX_KEPT: usize = 100;

/// Diagnostics counted but not kept, past `MAX_KEPT`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Omitted {
    pub errors: usize,
    pub warnings: usize,
}

impl Omitted {
    pub fn count(&self, severity: Severity) -> usize {
        match severity {
            Severity::Error => self.errors,
            Severity::Warning => self.warnings,
        }
    }
}

/// Where passes put what they find; passes never stop at the first problem.
#[derive(Debug, Default)]
pub struct Diagnostics {
    items: Vec<Diagnostic>,
    omitted: Omitted,
}

impl Diagnostics {
    pub fn push(&mut self, diagnostic: Diagnostic) {
        self.push_with(diagnostic.severity(), || diagnostic);
    }

    /// Pushes what `make` builds, building it only while diagnostics are
    /// kept: past `MAX_KEPT` they are only counted, and the details (a
    /// did-you-mean for each of a million unknown keys) would be the cost.
    pub fn push_with(&mut self, severity: Severity, make: impl FnOnce() -> Diagnostic) {
        if self.items.len() < MAX_KEPT {
            let diagnostic = make();
            debug_assert_eq!(diagnostic.severity(), severity);
            self.items.push(diagnostic);
            return;
        }
        match severity {
            Severity::Error => self.omitted.errors += 1,
            Severity::Warning => self.omitted.warnings += 1,
        }
    }

    /// How many diagnostics were pushed, kept or not.
    pub fn total(&self) -> usize {
        self.items.len() + self.omitted.errors + self.omitted.warnings
    }

    pub fn has_errors(&self) -> bool {
        self.omitted.errors > 0 || self.items.iter().any(|d| d.severity() == Severity::Error)
    }

    /// The kept diagnostics in source order, and how many were only counted.
    pub fn into_sorted(mut self) -> (Vec<Diagnostic>, Omitted) {
        self.items
            .sort_by_key(|d| (d.primary.span.file, d.primary.span.start));
        // A file included in two places reports a problem of its own once.
        self.items.dedup();
        (self.items, self.omitted)
    }
}

/// "did you mean `x`?" for the closest candidate, if any is close enough.
pub fn did_you_mean<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<String> {
    candidates
        .into_iter()
        .map(|c| (strsim::damerau_levenshtein(word, c), c))
        .filter(|&(distance, c)| distance <= (c.len() / 4).max(1))
        .min_by_key(|&(distance, _)| distance)
        .map(|(_, c)| format!("did you mean `{c}`?"))
}

#[cfg(test)]
mod tests {
    use super::did_you_mean;

    #[test]
    fn suggests_close_names_only() {
        assert_eq!(
            did_you_mean("instnaces", ["instances", "name"]).as_deref(),
            Some("did you mean `instances`?")
        );
        assert_eq!(
            did_you_mean("wroker", ["worker", "daemon"]).as_deref(),
            Some("did you mean `worker`?")
        );
        assert_eq!(did_you_mean("zzz", ["worker", "daemon"]), None);
        assert_eq!(did_you_mean("autorestart", ["max_restarts"]), None);
        assert_eq!(did_you_mean("log_file", ["log_max_files"]), None);
    }
}
