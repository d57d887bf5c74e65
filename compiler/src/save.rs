//! `apm saveconf`: writes live workers back into the files they came from,
//! the way toml_edit edits: the statements whose values changed are
//! rewritten in place, missing ones are inserted before the block's `}`,
//! dropped ones are deleted with their line, new workers are appended in the
//! canonical layout and removed ones are deleted with the comments above
//! them. Nested blocks (`vanguard`, `statsd`) are edited key by key the same
//! way; only a block that is new is printed whole. Every other byte of the
//! user's files stays as it was.
//!
//! Pure: it takes the compiled files and the live specs and returns the new
//! texts; the caller writes them.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use crate::Compilation;
use crate::ir::WorkerSpec;
use crate::schema::KeyDef;
use crate::source::{FileId, Span};
use crate::syntax::{self, Block, Item, Stmt};
use crate::values::{Kind, quote};

#[derive(Debug)]
struct Edit {
    start: usize,
    end: usize,
    text: String,
}

/// The keys of one block of a spec: every key's values (defaults included)
/// with where they were written, and the keys set explicitly.
struct Keys {
    keys: Vec<(&'static KeyDef, Vec<String>, Vec<Span>)>,
    settings: Vec<(&'static str, Vec<String>)>,
    written: Vec<&'static str>,
}

impl Keys {
    fn of(
        values: Vec<(&'static KeyDef, Vec<String>)>,
        spans: Vec<(&'static str, Vec<Span>)>,
        settings: Vec<(&'static str, Vec<String>)>,
    ) -> Keys {
        Keys {
            keys: values
                .into_iter()
                .zip(spans)
                .map(|((def, values), (_, spans))| (def, values, spans))
                .collect(),
            written: settings.iter().map(|(k, _)| *k).collect(),
            settings,
        }
    }
}

struct Saver<'a> {
    compilation: &'a Compilation,
    parsed: HashMap<FileId, Vec<Item>>,
    edits: BTreeMap<FileId, Vec<Edit>>,
}

/// New texts for the files that change, so that the workers of
/// `compilation` become `live`. With `remove_missing`, workers of the files
/// that are not live are deleted.
pub fn save(
    compilation: &Compilation,
    live: &[&WorkerSpec],
    remove_missing: bool,
) -> Vec<(PathBuf, String)> {
    let mut saver = Saver {
        compilation,
        parsed: HashMap::new(),
        edits: BTreeMap::new(),
    };
    let root = FileId(0);
    let mut appended = false;
    for spec in live {
        match compilation
            .config
            .workers
            .iter()
            .find(|w| w.name.value == spec.name.value)
        {
            Some(current) => saver.worker(current, spec),
            None => {
                let text = &compilation.sources.get(root).text;
                // One blank line between the last block and the new one.
                let separator = if appended {
                    "\n"
                } else if text.is_empty() || text.ends_with("\n\n") {
                    ""
                } else if text.ends_with('\n') {
                    "\n"
                } else {
                    "\n\n"
                };
                saver.edit(
                    root,
                    text.len(),
                    text.len(),
                    format!("{separator}{}", crate::print::worker(spec)),
                );
                appended = true;
            }
        }
    }
    if remove_missing {
        for current in &compilation.config.workers {
            if !live.iter().any(|l| l.name.value == current.name.value)
                && let Some((file, block)) = current.span.and_then(|span| saver.block(span))
            {
                let (start, mut end) = saver.lines_of(file, block.span, true);
                // Between two blank lines, one goes too: the blocks around
                // stay one blank line apart.
                let text = saver.text(file);
                if text[..start].ends_with("\n\n") && text[end..].starts_with('\n') {
                    end += 1;
                }
                saver.edit(file, start, end, String::new());
            }
        }
    }
    saver.finish()
}

fn stmts_in<'i>(items: &'i [Item], out: &mut Vec<&'i Stmt>) {
    for item in items {
        match item {
            Item::Stmt(stmt) => out.push(stmt),
            Item::Block(block) => stmts_in(&block.items, out),
        }
    }
}

fn contains(outer: Span, inner: Span) -> bool {
    outer.file == inner.file && outer.start <= inner.start && inner.end <= outer.end
}

impl Saver<'_> {
    fn text(&self, file: FileId) -> &str {
        &self.compilation.sources.get(file).text
    }

    fn items(&mut self, file: FileId) -> &[Item] {
        if !self.parsed.contains_key(&file) {
            let mut ignored = crate::diag::Diagnostics::default();
            let items = syntax::parse(file, &self.compilation.sources.get(file).text, &mut ignored);
            self.parsed.insert(file, items);
        }
        &self.parsed[&file]
    }

    /// The block opened by the keyword at `keyword`.
    fn block(&mut self, keyword: Span) -> Option<(FileId, Block)> {
        fn find(items: &[Item], keyword: Span) -> Option<&Block> {
            items.iter().find_map(|item| match item {
                Item::Block(block) if block.name.span == keyword => Some(block),
                Item::Block(block) => find(&block.items, keyword),
                Item::Stmt(_) => None,
            })
        }
        let block = find(self.items(keyword.file), keyword)?.clone();
        Some((keyword.file, block))
    }

    /// The statements holding these value spans, in order, without repeats.
    fn statements(&mut self, spans: &[Span]) -> Vec<Stmt> {
        let mut found: Vec<Stmt> = Vec::new();
        for span in spans {
            let mut all = Vec::new();
            stmts_in(self.items(span.file), &mut all);
            if let Some(stmt) = all.into_iter().find(|s| contains(s.span, *span))
                && !found.iter().any(|f| f.span == stmt.span)
            {
                found.push(stmt.clone());
            }
        }
        found
    }

    fn edit(&mut self, file: FileId, start: usize, end: usize, text: String) {
        self.edits
            .entry(file)
            .or_default()
            .push(Edit { start, end, text });
    }

    /// The byte range of whole lines covering `span` when nothing else
    /// shares them (a trailing comment goes with them; with `comments_above`,
    /// so do the comment lines right above); otherwise just the span.
    fn lines_of(&self, file: FileId, span: Span, comments_above: bool) -> (usize, usize) {
        let text = self.text(file);
        let (start, end) = (span.start as usize, span.end as usize);
        let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
        let line_end = text[end..].find('\n').map_or(text.len(), |i| end + i + 1);
        let before_alone = text[line_start..start].trim().is_empty();
        let after = text[end..line_end].trim();
        let after_alone = after.is_empty() || after.starts_with('#') || after.starts_with("//");
        if !(before_alone && after_alone) {
            let trailing = text[end..].len() - text[end..].trim_start_matches([' ', '\t']).len();
            return (start, end + trailing);
        }
        let mut first = line_start;
        while comments_above && first > 0 {
            let previous_start = text[..first - 1].rfind('\n').map_or(0, |i| i + 1);
            let previous = text[previous_start..first].trim();
            if previous.starts_with('#') || previous.starts_with("//") {
                first = previous_start;
            } else {
                break;
            }
        }
        (first, line_end)
    }

    /// Where a new statement goes in a block: before its `}`, indented like
    /// the block's statements.
    fn insert(&mut self, file: FileId, block: &Block, statement: String) {
        let text = self.text(file);
        let close = block.span.end as usize - 1;
        let line_start = text[..close].rfind('\n').map_or(0, |i| i + 1);
        if !text[line_start..close].trim().is_empty() || text.as_bytes().get(close) != Some(&b'}') {
            self.edit(file, close, close, format!("{statement} "));
            return;
        }
        let first = block.items.first().map(|item| match item {
            Item::Stmt(s) => s.span,
            Item::Block(b) => b.span,
        });
        let indent = match first.filter(|span| span.file == file) {
            Some(span)
                if text[..span.start as usize]
                    .rsplit('\n')
                    .next()
                    .is_some_and(|lead| lead.trim().is_empty()) =>
            {
                self.indent_of(file, span.start as usize)
            }
            _ => format!("{}    ", &text[line_start..close]),
        };
        self.edit(
            file,
            line_start,
            line_start,
            format!("{indent}{statement}\n"),
        );
    }

    fn worker(&mut self, current: &WorkerSpec, live: &WorkerSpec) {
        let Some((file, block)) = current.span.and_then(|span| self.block(span)) else {
            return;
        };
        self.keys(
            file,
            &block,
            Keys::of(current.values(), current.spans(), current.settings()),
            Keys::of(live.values(), live.spans(), live.settings()),
        );
        let vanguard = |spec: &WorkerSpec| {
            spec.vanguard
                .as_ref()
                .map(|v| Keys::of(v.values(), v.spans(), v.settings()))
        };
        let statsd = |spec: &WorkerSpec| {
            spec.statsd
                .as_ref()
                .map(|s| Keys::of(s.values(), s.spans(), s.settings()))
        };
        self.nested(file, &block, "vanguard", vanguard(current), vanguard(live));
        self.nested(file, &block, "statsd", statsd(current), statsd(live));
    }

    /// Edits the keys of one block whose keys are `current`, so that they
    /// become `live`: each changed value is rewritten where it is written.
    fn keys(&mut self, file: FileId, block: &Block, current: Keys, live: Keys) {
        for ((def, before, at), (_, after, _)) in current.keys.into_iter().zip(live.keys) {
            if same(def, &before, &after) {
                continue;
            }
            let written = live.written.contains(&def.name);
            self.key(file, block, def, &at, written.then_some(&after));
        }
    }

    /// Edits a nested block (`vanguard`, `statsd`) of the worker `block`: key
    /// by key when both sides have it, so the comments inside it stay.
    fn nested(
        &mut self,
        file: FileId,
        block: &Block,
        name: &str,
        current: Option<Keys>,
        live: Option<Keys>,
    ) {
        let written: Vec<Block> = block
            .items
            .iter()
            .filter_map(|item| match item {
                Item::Block(b) if b.name.text == name => Some(b.clone()),
                _ => None,
            })
            .collect();
        match (current, live) {
            // The values of several blocks of one kind are merged: their
            // statements are found by span, a new key goes into the first.
            (Some(current), Some(live)) => {
                if let Some(first) = written.first() {
                    self.keys(file, first, current, live);
                }
            }
            (Some(_), None) => {
                for old in written {
                    let (start, end) = self.lines_of(file, old.span, true);
                    self.edit(file, start, end, String::new());
                }
            }
            (None, Some(live)) => {
                let text = crate::print::nested(name, &live.settings);
                let indent = self.block_indent(file, block);
                let statement = indent_block(&text, &indent);
                self.insert(file, block, statement.trim_start().to_owned());
            }
            (None, None) => {}
        }
    }

    fn indent_of(&self, file: FileId, at: usize) -> String {
        let text = self.text(file);
        let line_start = text[..at].rfind('\n').map_or(0, |i| i + 1);
        text[line_start..at]
            .chars()
            .take_while(|c| c.is_whitespace())
            .collect()
    }

    fn block_indent(&self, file: FileId, block: &Block) -> String {
        format!("{}    ", self.indent_of(file, block.span.start as usize))
    }

    /// Rewrites one key of a worker block: `after` is `None` when the live
    /// worker leaves it at its default.
    fn key(
        &mut self,
        file: FileId,
        block: &Block,
        def: &KeyDef,
        at: &[Span],
        after: Option<&Vec<String>>,
    ) {
        let statements = self.statements(at);
        let values = after.map(|v| v.iter().map(|x| quote(x)).collect::<Vec<_>>().join(", "));
        match (statements.split_first(), values) {
            (None, Some(values)) => self.insert(file, block, format!("{} {values};", def.name)),
            (None, None) => {}
            (Some((first, rest)), values) => {
                let stmt_file = first.span.file;
                match values {
                    Some(values) => match (first.values.first(), first.values.last()) {
                        (Some(a), Some(b)) => self.edit(
                            stmt_file,
                            a.span.start as usize,
                            b.span.end as usize,
                            values,
                        ),
                        _ => self.edit(
                            stmt_file,
                            first.key.span.end as usize,
                            first.key.span.end as usize,
                            format!(" {values}"),
                        ),
                    },
                    None => {
                        let (start, end) = self.lines_of(stmt_file, first.span, false);
                        self.edit(stmt_file, start, end, String::new());
                    }
                }
                for other in rest {
                    let (start, end) = self.lines_of(other.span.file, other.span, false);
                    self.edit(other.span.file, start, end, String::new());
                }
            }
        }
    }

    fn finish(self) -> Vec<(PathBuf, String)> {
        self.edits
            .into_iter()
            .map(|(file, mut edits)| {
                let mut text = self.compilation.sources.get(file).text.clone();
                // From the end backwards, so earlier offsets stay true; of
                // edits at one place (workers appended), the later one first,
                // so they end up in the order they were made.
                let mut edits: Vec<(usize, Edit)> = edits.drain(..).enumerate().collect();
                edits.sort_by_key(|(i, e)| std::cmp::Reverse((e.start, e.end, *i)));
                for (_, edit) in edits {
                    text.replace_range(edit.start..edit.end, &edit.text);
                }
                // A block deleted at the end leaves no blank line behind.
                let original = &self.compilation.sources.get(file).text;
                while text.ends_with("\n\n") && !original.ends_with("\n\n") {
                    text.pop();
                }
                (self.compilation.sources.path(file).to_path_buf(), text)
            })
            .collect()
    }
}

/// Whether two value lists mean the same (list order only matters for free text).
fn same(def: &KeyDef, a: &[String], b: &[String]) -> bool {
    if def.many && def.kind != Kind::Text {
        let (mut a, mut b) = (a.to_vec(), b.to_vec());
        a.sort();
        b.sort();
        return a == b;
    }
    a == b
}

/// A printed block re-indented to sit at `indent`.
fn indent_block(text: &str, indent: &str) -> String {
    text.trim_end()
        .lines()
        .enumerate()
        .map(|(i, line)| {
            if i == 0 {
                line.to_owned()
            } else {
                format!("{indent}{line}")
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loader::MemLoader;
    use crate::schema::Setting;
    use std::path::Path;

    const ROOT: &str = "/p/apm.conf";

    fn compiled(files: &[(&str, &str)]) -> Compilation {
        let mut loader = MemLoader::new();
        for (path, text) in files {
            loader.add_file(*path, *text);
        }
        let compilation = crate::compile(Path::new(ROOT), &loader).unwrap();
        assert!(!compilation.has_errors(), "{:?}", compilation.diagnostics);
        compilation
    }

    /// What saving `live` (the workers of `live_text`) over `files` writes.
    fn save_over(
        files: &[(&str, &str)],
        live_text: &str,
        remove_missing: bool,
    ) -> Vec<(String, String)> {
        let current = compiled(files);
        let live = compiled(&[(ROOT, live_text)]);
        let live: Vec<&WorkerSpec> = live.config.workers.iter().collect();
        save(&current, &live, remove_missing)
            .into_iter()
            .map(|(path, text)| (path.display().to_string(), text))
            .collect()
    }

    fn saved_root(files: &[(&str, &str)], live_text: &str) -> String {
        let saved = save_over(files, live_text, true);
        assert_eq!(saved.len(), 1, "{saved:?}");
        assert_eq!(saved[0].0, ROOT);
        saved[0].1.clone()
    }

    const API: &str = "# the API\nworker {\n    name api;\n    exec node;\n    # slow disks here\n    restart_delay 5s;  # measured\n    instances 2; kill_timeout 3s;\n}\n";

    #[test]
    fn unchanged_workers_change_no_file() {
        assert_eq!(save_over(&[(ROOT, API)], API, true), vec![]);
        // Another spelling of the same values is the same.
        let respelled = API.replace("5s", "5000").replace("3s", "3000ms");
        assert_eq!(save_over(&[(ROOT, API)], &respelled, true), vec![]);
    }

    #[test]
    fn a_changed_value_changes_only_its_value() {
        let live = API.replace("restart_delay 5s", "restart_delay 7s");
        let text = saved_root(&[(ROOT, API)], &live);
        assert_eq!(text, API.replace("restart_delay 5s;", "restart_delay 7s;"));
    }

    #[test]
    fn a_key_back_at_its_default_goes_with_its_line_and_the_comment_above_stays() {
        let live = "worker { name api; exec node; instances 2; kill_timeout 3s; }";
        let text = saved_root(&[(ROOT, API)], live);
        assert_eq!(
            text,
            "# the API\nworker {\n    name api;\n    exec node;\n    # slow disks here\n    instances 2; kill_timeout 3s;\n}\n"
        );
    }

    #[test]
    fn a_key_sharing_its_line_goes_alone() {
        let live = "worker { name api; exec node; restart_delay 5s; instances 2; }";
        let text = saved_root(&[(ROOT, API)], live);
        assert_eq!(
            text,
            API.replace("    instances 2; kill_timeout 3s;\n", "    instances 2; \n")
        );
    }

    #[test]
    fn a_new_key_goes_before_the_closing_brace_indented_like_the_block() {
        let live = API.replace("instances 2;", "instances 2; rolling true;");
        let text = saved_root(&[(ROOT, API)], &live);
        assert_eq!(text, API.replace("3s;\n}", "3s;\n    rolling true;\n}"));
        // A block on one line gets it on that line.
        let one_line = "worker { name a; exec x; }\n";
        let text = saved_root(
            &[(ROOT, one_line)],
            "worker { name a; exec x; instances 3; }",
        );
        assert_eq!(text, "worker { name a; exec x; instances 3; }\n");
        // A block whose first statement shares the brace's line.
        let shared = "  worker { name a;\n    exec x;\n  }\n";
        let text = saved_root(&[(ROOT, shared)], "worker { name a; exec x; instances 3; }");
        assert_eq!(
            text,
            "  worker { name a;\n    exec x;\n      instances 3;\n  }\n"
        );
    }

    #[test]
    fn a_repeated_key_becomes_one_statement() {
        let file = "worker {\n    name w;\n    exec x;\n    watch a.js;\n    watch b.js;\n}\n";
        let text = saved_root(&[(ROOT, file)], "worker { name w; exec x; watch c.js; }");
        assert_eq!(
            text,
            "worker {\n    name w;\n    exec x;\n    watch c.js;\n}\n"
        );
    }

    #[test]
    fn the_order_of_a_set_does_not_matter_but_the_order_of_params_does() {
        let file = "worker { name w; exec x; env A=1, B=2; params one two; }\n";
        assert_eq!(
            save_over(
                &[(ROOT, file)],
                "worker { name w; exec x; env B=2, A=1; params one two; }",
                true
            ),
            vec![]
        );
        let text = saved_root(
            &[(ROOT, file)],
            "worker { name w; exec x; env A=1, B=2; params two one; }",
        );
        assert_eq!(
            text,
            "worker { name w; exec x; env A=1, B=2; params two, one; }\n"
        );
    }

    #[test]
    fn a_value_needing_quotes_is_quoted() {
        let file = "worker { name w; exec x; params a; }\n";
        let text = saved_root(
            &[(ROOT, file)],
            "worker { name w; exec x; params \"two words\"; }",
        );
        assert_eq!(text, "worker { name w; exec x; params \"two words\"; }\n");
    }

    #[test]
    fn removed_workers_go_with_the_comments_above_them_only_when_asked() {
        let file = "worker { name keep; exec x; }\n\n# about gone\n// and more\nworker {\n    name gone;\n    exec y;\n}\n";
        let text = saved_root(&[(ROOT, file)], "worker { name keep; exec x; }");
        assert_eq!(text, "worker { name keep; exec x; }\n");
        assert_eq!(
            save_over(&[(ROOT, file)], "worker { name keep; exec x; }", false),
            vec![]
        );
    }

    #[test]
    fn a_worker_removed_between_others_leaves_one_blank_line() {
        let file = "worker { name a; exec x; }\n\n# about b\n# more\nworker { name b; exec y; }\n\nworker { name c; exec z; }\n";
        let live = "worker { name a; exec x; }\nworker { name c; exec z; }";
        assert_eq!(
            saved_root(&[(ROOT, file)], live),
            "worker { name a; exec x; }\n\nworker { name c; exec z; }\n"
        );
        // The first worker of a file, with nothing above it.
        let live = "worker { name b; exec y; }\nworker { name c; exec z; }";
        assert_eq!(
            saved_root(&[(ROOT, file)], live),
            "\n# about b\n# more\nworker { name b; exec y; }\n\nworker { name c; exec z; }\n"
        );
    }

    #[test]
    fn a_statement_removed_from_a_shared_line_takes_its_spaces() {
        let file = "worker { name w; exec x; restart_delay 5s;  instances 2; }\n";
        let text = saved_root(&[(ROOT, file)], "worker { name w; exec x; instances 2; }");
        assert_eq!(text, "worker { name w; exec x; instances 2; }\n");
    }

    #[test]
    fn a_new_key_is_indented_like_the_statements_not_the_brace() {
        let file = "worker {\n  name a;\n  exec x;\n}\n";
        let text = saved_root(&[(ROOT, file)], "worker { name a; exec x; instances 3; }");
        assert_eq!(text, "worker {\n  name a;\n  exec x;\n  instances 3;\n}\n");
    }

    #[test]
    fn nested_vanguard_and_statsd_blocks_are_edited_in_place_added_and_removed() {
        let file = "worker {\n  name a;\n  exec x;\n  # the firewall\n  vanguard {\n    rate_limit 10;\n  }\n}\n";
        let changed = saved_root(
            &[(ROOT, file)],
            "worker { name a; exec x; vanguard { rate_limit 20; } }",
        );
        assert_eq!(changed, file.replace("rate_limit 10", "rate_limit 20"));
        let removed = saved_root(&[(ROOT, file)], "worker { name a; exec x; }");
        assert_eq!(removed, "worker {\n  name a;\n  exec x;\n}\n");
        let added = saved_root(
            &[(ROOT, file)],
            "worker { name a; exec x; vanguard { rate_limit 10; } statsd { host 127.0.0.1:8125; } }",
        );
        assert!(
            added.starts_with(file.trim_end_matches("}\n"))
                && added.contains("\n  statsd {\n")
                && added.ends_with("  }\n}\n"),
            "{added}"
        );
        assert_eq!(
            save_over(
                &[(ROOT, file)],
                "worker { name a; exec x; vanguard { rate_limit 10; } }",
                true
            ),
            vec![]
        );
    }

    #[test]
    fn hostile_values_written_back_keep_the_file_structure() {
        let file = "worker {\n    name a;\n    exec x;\n    params p;\n    vanguard {\n        ban_response no;  # body\n    }\n    statsd { prefix s; }\n}\n# end\n";
        let current = compiled(&[(ROOT, file)]);
        for hostile in [
            "a; } worker { name evil; exec sh; } #",
            "# comment",
            "// comment",
            "x # y // z",
            "line\nbreak\r\nand\ttab",
            "\"quoted\" 'single' `back`",
            "back\\slash\\",
            "{",
            "}",
            ";",
            ",",
            "",
            " ",
            "include /etc/passwd;",
            "\u{b}\u{c}\u{85}\u{2028}\u{2029}",
            "$HOME ${HOME} $$",
        ] {
            let mut live = current.config.workers[0].clone();
            let span = live.params[0].span;
            live.params = vec![Setting::new(hostile.to_owned(), span)];
            // A path's `$VAR` is expanded: a literal `$` must stay one.
            let path = format!("/srv/{}x", hostile.replace('/', "_"));
            live.log = Some(Setting::new(PathBuf::from(path), span));
            let vanguard = live.vanguard.as_mut().unwrap();
            vanguard.ban_response = Setting::new(hostile.to_owned(), vanguard.ban_response.span);
            let statsd = live.statsd.as_mut().unwrap();
            statsd.prefix = Setting::new(hostile.to_owned(), statsd.prefix.span);
            let saved = save(&current, &[&live], true);
            let text = &saved[0].1;
            let again = compiled(&[(ROOT, text)]);
            assert_eq!(again.config.workers.len(), 1, "{hostile:?}:\n{text}");
            let mut again = again.config.workers[0].clone();
            (again.span, live.span) = (None, None);
            assert_eq!(again, live, "{hostile:?}:\n{text}");
            assert!(text.contains("  # body\n    }\n"), "{hostile:?}:\n{text}");
            assert!(text.ends_with("}\n# end\n"), "{hostile:?}:\n{text}");
        }
    }

    #[test]
    fn new_workers_are_appended_one_blank_line_after_the_last() {
        for (before, separator) in [
            ("worker { name a; exec x; }", "\n\n"),
            ("worker { name a; exec x; }\n", "\n"),
            ("worker { name a; exec x; }\n\n", ""),
            ("", ""),
        ] {
            let live = "worker { name a; exec x; }\nworker { name b; exec y; }";
            let text = saved_root(&[(ROOT, before)], live);
            let live_b = compiled(&[(ROOT, live)]);
            let printed = crate::print::worker(&live_b.config.workers[1]);
            if before.is_empty() {
                // The file had no `a`: both are appended, in order.
                let printed_a = crate::print::worker(&live_b.config.workers[0]);
                assert_eq!(text, format!("{printed_a}\n{printed}"));
            } else {
                assert_eq!(text, format!("{before}{separator}{printed}"), "{before:?}");
            }
        }
        // Several new workers keep their order, a blank line apart.
        let live =
            "worker { name a; exec x; }\nworker { name b; exec y; }\nworker { name c; exec z; }";
        let text = saved_root(&[(ROOT, "worker { name a; exec x; }\n")], live);
        let b = text.find("name b").unwrap();
        assert!(b < text.find("name c").unwrap(), "{text}");
        assert!(text.contains("}\n\nworker {\n    name c"), "{text}");
    }

    #[test]
    fn a_worker_in_an_included_file_is_edited_there() {
        let root = "include conf.d/*.conf;\nworker { name a; exec x; }\n";
        let included = "worker {\n    name b;\n    exec y;\n    instances 2;\n}\n";
        let saved = save_over(
            &[(ROOT, root), ("/p/conf.d/b.conf", included)],
            "worker { name a; exec x; }\nworker { name b; exec y; instances 4; }",
            true,
        );
        assert_eq!(
            saved,
            vec![(
                "/p/conf.d/b.conf".to_owned(),
                included.replace("instances 2", "instances 4")
            )]
        );
    }
}
