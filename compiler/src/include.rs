//! Include expansion: `include <path-or-glob>;` at any block level is
//! replaced by the statements of each file it names, in filename order.

use std::collections::HashMap;
use std::io;
use std::path::{Component, Path, PathBuf};

use crate::codes;
use crate::diag::{Diagnostic, Diagnostics};
use crate::loader::SourceLoader;
use crate::source::{FileId, SourceMap, Span};
use crate::syntax::{self, Item, Stmt};
use crate::values::expand_env;

/// Deeper than this is a symlink loop the lexical cycle check cannot see.
const MAX_DEPTH: usize = 64;
/// Statements and blocks a config may hold with its includes expanded:
/// 2,000 workers of 20 keys are 42,000. A file included twice at every
/// level doubles per level, and 30 levels never finished: past the bound
/// the expansion stops with the chain that crossed it.
pub const MAX_STATEMENTS: usize = 100_000;
/// Bytes of text a config may hold with its includes expanded, each
/// inclusion of a file counted; also the largest file `FsLoader` reads.
pub const MAX_BYTES: usize = 16 * 1024 * 1024;

/// Where expanded items go: a lowerer that consumes them as they come, or a
/// vector that collects a block's items.
pub trait Sink {
    fn item(&mut self, item: Item, sources: &SourceMap, diags: &mut Diagnostics);
}

impl Sink for Vec<Item> {
    fn item(&mut self, item: Item, _: &SourceMap, _: &mut Diagnostics) {
        self.push(item);
    }
}

pub struct Expander<'a> {
    loader: &'a dyn SourceLoader,
    sources: &'a mut SourceMap,
    diags: &'a mut Diagnostics,
    parsed: HashMap<FileId, Vec<Item>>,
    /// Files included more than once, parsed again for the copies.
    reparsed: HashMap<FileId, Vec<Item>>,
    /// The chain of files being expanded, root first, to detect cycles.
    stack: Vec<PathBuf>,
    /// Statements and bytes expanded so far, against `MAX_STATEMENTS` and
    /// `MAX_BYTES`; once over, nothing more is expanded.
    statements: usize,
    bytes: usize,
    over: bool,
}

impl<'a> Expander<'a> {
    pub fn new(
        loader: &'a dyn SourceLoader,
        sources: &'a mut SourceMap,
        diags: &'a mut Diagnostics,
    ) -> Self {
        Expander {
            loader,
            sources,
            diags,
            parsed: HashMap::new(),
            reparsed: HashMap::new(),
            stack: Vec::new(),
            statements: 0,
            bytes: 0,
            over: false,
        }
    }

    /// Reads, parses and expands the root file, handing each top-level item
    /// to `out` in order. Only a root that cannot be read is an `Err`;
    /// everything else becomes a diagnostic.
    pub fn expand_root(&mut self, path: &Path, out: &mut dyn Sink) -> io::Result<FileId> {
        let path = normalize(path);
        let bytes = self.loader.read(&path)?;
        let size = bytes.len();
        let file = self.add_file(path.clone(), bytes);
        self.stack.push(path);
        if self.spend(0, size, Span::new(file, 0..0)) {
            let items = self.parsed(file);
            self.expand(items, out);
        }
        self.stack.pop();
        Ok(file)
    }

    fn add_file(&mut self, path: PathBuf, bytes: Vec<u8>) -> FileId {
        match String::from_utf8(bytes) {
            Ok(text) => {
                let file = self.sources.add(path, text);
                let items = syntax::parse(file, &self.sources.get(file).text, self.diags);
                self.parsed.insert(file, items);
                file
            }
            Err(error) => {
                let bad = error.utf8_error().valid_up_to();
                let text = String::from_utf8_lossy(error.as_bytes()).into_owned();
                let replacement = text[bad..].chars().next().map_or(0, char::len_utf8);
                let file = self.sources.add(path, text);
                self.diags.push(
                    Diagnostic::new(
                        &codes::INVALID_UTF8,
                        Span::new(file, bad..bad + replacement),
                        "file is not valid UTF-8",
                    )
                    .label("first invalid byte")
                    .help("save the file as UTF-8; nothing in this file was read"),
                );
                self.parsed.insert(file, Vec::new());
                file
            }
        }
    }

    /// The items of a parsed file. The first use takes them, so the common
    /// case copies nothing; a file included again is parsed once more and
    /// kept, and later inclusions copy that (parsing costs far more than a
    /// copy when a file is included thousands of times). Its syntax errors
    /// were reported the first time.
    fn parsed(&mut self, file: FileId) -> Vec<Item> {
        if let Some(items) = self.parsed.remove(&file) {
            return items;
        }
        if let Some(items) = self.reparsed.get(&file) {
            return items.clone();
        }
        let mut ignored = Diagnostics::default();
        let items = syntax::parse(file, &self.sources.get(file).text, &mut ignored);
        self.reparsed.insert(file, items.clone());
        items
    }

    /// Counts what is about to be expanded; false (with one error naming
    /// the chain of includes) once the config is over a bound.
    fn spend(&mut self, statements: usize, bytes: usize, at: Span) -> bool {
        if self.over {
            return false;
        }
        self.statements += statements;
        self.bytes += bytes;
        let crossed = if self.statements > MAX_STATEMENTS {
            format!("more than {MAX_STATEMENTS} statements")
        } else if self.bytes > MAX_BYTES {
            format!("more than {} MiB of text", MAX_BYTES / (1024 * 1024))
        } else {
            return true;
        };
        self.over = true;
        let chain: Vec<String> = self.stack.iter().map(|p| self.display(p)).collect();
        self.diags.push(
            Diagnostic::new(
                &codes::CONFIG_TOO_LARGE,
                at,
                format!(
                    "the config holds {crossed} with its includes expanded; reading stopped in {}",
                    chain.join(" → ")
                ),
            )
            .label("the limit was crossed here")
            .help("a file included more than once at every level doubles the config each time: include each file once"),
        );
        false
    }

    fn expand(&mut self, items: Vec<Item>, out: &mut dyn Sink) {
        for item in items {
            let span = match &item {
                Item::Stmt(stmt) => stmt.span,
                Item::Block(block) => block.span,
            };
            if !self.spend(1, 0, span) {
                return;
            }
            match item {
                Item::Stmt(stmt) if stmt.key.text == "include" => self.include(&stmt, out),
                Item::Block(mut block) => {
                    let mut nested = Vec::with_capacity(block.items.len());
                    self.expand(std::mem::take(&mut block.items), &mut nested);
                    block.items = nested;
                    out.item(Item::Block(block), self.sources, self.diags);
                }
                item => out.item(item, self.sources, self.diags),
            }
        }
    }

    fn include(&mut self, stmt: &Stmt, out: &mut dyn Sink) {
        if stmt.values.is_empty() {
            self.diags.push(
                Diagnostic::new(
                    &codes::MISSING_VALUE,
                    stmt.key.span,
                    "`include` without a path",
                )
                .help("write `include path/to/file.conf;` or `include conf.d/*.conf;`"),
            );
        }
        let base = self
            .sources
            .path(stmt.span.file)
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        for value in &stmt.values {
            let pattern = match expand_env(&value.text, self.loader) {
                Ok(p) => p,
                Err(name) => {
                    self.diags
                        .push(crate::values::unset_variable(value.span, &name));
                    continue;
                }
            };
            let pattern = normalize(&base.join(pattern));
            let paths = if is_glob(&pattern) {
                match self.glob(&pattern) {
                    Ok(paths) => paths,
                    Err(message) => {
                        self.diags.push(
                            Diagnostic::new(&codes::INCLUDE_FAILED, value.span, message)
                                .label("in this pattern"),
                        );
                        continue;
                    }
                }
            } else {
                vec![pattern]
            };
            for path in paths {
                self.include_file(path, value.span, out);
            }
        }
    }

    fn include_file(&mut self, path: PathBuf, at: Span, out: &mut dyn Sink) {
        if let Some(start) = self.stack.iter().position(|p| *p == path) {
            let chain: Vec<String> = self.stack[start..]
                .iter()
                .chain([&path])
                .map(|p| self.display(p))
                .collect();
            self.diags.push(
                Diagnostic::new(
                    &codes::INCLUDE_CYCLE,
                    at,
                    format!("include cycle: {}", chain.join(" → ")),
                )
                .label("this include closes the cycle")
                .help("remove one of the includes in the chain"),
            );
            return;
        }
        if self.stack.len() >= MAX_DEPTH {
            self.diags.push(Diagnostic::new(
                &codes::INCLUDE_FAILED,
                at,
                format!(
                    "includes nested more than {MAX_DEPTH} deep at {}",
                    self.display(&path)
                ),
            ));
            return;
        }
        let file = match self.sources.find(&path) {
            Some(file) => file,
            None => match self.loader.read(&path) {
                Ok(bytes) => self.add_file(path.clone(), bytes),
                Err(error) if error.kind() == io::ErrorKind::NotFound => {
                    self.diags.push(
                        Diagnostic::new(
                            &codes::INCLUDE_NOT_FOUND,
                            at,
                            format!("included file `{}` not found", self.display(&path)),
                        )
                        .label("included here")
                        .help("paths are relative to the file that includes them; use a glob such as `conf.d/*.conf` when the files may be absent"),
                    );
                    return;
                }
                Err(error) => {
                    let help = match error.kind() {
                        io::ErrorKind::IsADirectory => {
                            format!(
                                "to include the files of a directory, use a glob: `{}/*.conf`",
                                self.display(&path)
                            )
                        }
                        _ => "check that apm may read the file".to_owned(),
                    };
                    self.diags.push(
                        Diagnostic::new(
                            &codes::INCLUDE_FAILED,
                            at,
                            format!(
                                "cannot read included file `{}`: {error}",
                                self.display(&path)
                            ),
                        )
                        .label("included here")
                        .help(help),
                    );
                    return;
                }
            },
        };
        let size = self.sources.get(file).text.len();
        if !self.spend(0, size, at) {
            return;
        }
        self.stack.push(path);
        let items = self.parsed(file);
        self.expand(items, out);
        self.stack.pop();
    }

    /// Files matching a pattern whose components may hold wildcards, sorted.
    /// A directory that does not exist matches nothing.
    fn glob(&self, pattern: &Path) -> Result<Vec<PathBuf>, String> {
        let components: Vec<Component> = pattern.components().collect();
        let mut current = vec![PathBuf::new()];
        let mut after_wildcard = false;
        // Literal components after a wildcard may not exist under every match.
        let mut unchecked = false;
        for (i, component) in components.iter().enumerate() {
            let last = i == components.len() - 1;
            let name = component.as_os_str().to_string_lossy();
            if !is_glob(Path::new(name.as_ref())) {
                current.iter_mut().for_each(|p| p.push(component));
                unchecked |= after_wildcard;
                continue;
            }
            after_wildcard = true;
            unchecked = false;
            let matcher = globset::GlobBuilder::new(&name)
                .literal_separator(true)
                .build()
                .map_err(|e| format!("invalid include pattern: {e}"))?
                .compile_matcher();
            let mut next = Vec::new();
            for dir in &current {
                let entries = match self.loader.list_dir(dir) {
                    Ok(entries) => entries,
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                        ) =>
                    {
                        continue;
                    }
                    Err(e) => return Err(format!("cannot list `{}`: {e}", self.display(dir))),
                };
                for (path, is_dir) in entries {
                    let Some(file_name) =
                        path.file_name().map(|n| n.to_string_lossy().into_owned())
                    else {
                        continue;
                    };
                    let hidden = file_name.starts_with('.') && !name.starts_with('.');
                    if !hidden && matcher.is_match(&file_name) && (is_dir != last) {
                        next.push(path);
                    }
                }
            }
            current = next;
        }
        if unchecked {
            current.retain(|path| {
                let parent = path.parent().unwrap_or(Path::new(""));
                self.loader
                    .list_dir(parent)
                    .is_ok_and(|entries| entries.iter().any(|(p, is_dir)| p == path && !is_dir))
            });
        }
        current.sort();
        Ok(current)
    }

    /// Paths in messages are shown relative to the root file's directory.
    fn display(&self, path: &Path) -> String {
        let root_dir = self.stack.first().and_then(|p| p.parent());
        match root_dir.and_then(|dir| path.strip_prefix(dir).ok()) {
            Some(relative) if !relative.as_os_str().is_empty() => relative.display().to_string(),
            _ => path.display().to_string(),
        }
    }
}

fn is_glob(path: &Path) -> bool {
    path.to_string_lossy().contains(['*', '?', '[', '{'])
}

/// Removes `.` and resolves `..` lexically, so that one file reached by two
/// spellings is recognised in the cycle check.
pub fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    out.push("..");
                }
            }
            other => out.push(other),
        }
    }
    if out.as_os_str().is_empty() {
        out.push(".");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loader::MemLoader;

    fn expand(loader: &MemLoader) -> (Vec<String>, Vec<String>) {
        let mut sources = SourceMap::default();
        let mut diags = Diagnostics::default();
        let mut items = Vec::new();
        Expander::new(loader, &mut sources, &mut diags)
            .expand_root(Path::new("/c/apm.conf"), &mut items)
            .unwrap();
        let keys = items
            .iter()
            .map(|i| match i {
                Item::Stmt(s) => s.key.text.clone(),
                Item::Block(b) => format!("{}{{{}}}", b.name.text, b.items.len()),
            })
            .collect();
        (
            keys,
            diags
                .into_sorted()
                .0
                .iter()
                .map(|d| format!("{} {}", d.code.id, d.message))
                .collect(),
        )
    }

    #[test]
    fn globs_expand_in_filename_order_and_may_match_nothing() {
        let loader = MemLoader::new()
            .file(
                "/c/apm.conf",
                "include d/*.conf;\ninclude none/*.conf;\nworker { include w.part; }",
            )
            .file("/c/d/b.conf", "b;")
            .file("/c/d/a.conf", "a;")
            .file("/c/d/.hidden.conf", "hidden;")
            .file("/c/d/c.txt", "c;")
            .file("/c/w.part", "x; y;");
        assert_eq!(
            expand(&loader),
            (vec!["a".into(), "b".into(), "worker{2}".into()], vec![])
        );
    }

    /// Each file includes the next one twice: 2^30 statements at the root.
    /// The expansion stops at the bound, fast, naming the chain.
    #[test]
    fn a_doubling_include_chain_stops_at_the_bound_with_the_chain() {
        let mut loader = MemLoader::new();
        for level in 0..30 {
            loader.add_file(
                format!("/c/l{level}.conf"),
                format!(
                    "include l{next}.conf;\ninclude l{next}.conf;",
                    next = level + 1
                ),
            );
        }
        loader.add_file("/c/l30.conf", "worker { exec /bin/true; }");
        loader.add_file("/c/apm.conf", "include l0.conf;");
        let started = std::time::Instant::now();
        let (items, diags) = expand(&loader);
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        assert!(items.len() <= MAX_STATEMENTS, "{}", items.len());
        assert_eq!(diags.len(), 1, "{diags:?}");
        assert!(
            diags[0].starts_with(&format!(
                "E0026 the config holds more than {MAX_STATEMENTS} statements with its includes expanded; reading stopped in apm.conf → l0.conf → l1.conf → l2.conf"
            )),
            "{diags:?}"
        );
    }

    #[test]
    fn included_text_is_bounded_in_bytes() {
        let big = format!("# {}\n", "x".repeat(MAX_BYTES / 3));
        let loader = MemLoader::new()
            .file(
                "/c/apm.conf",
                "include big.conf;\ninclude big.conf;\ninclude big.conf;\ninclude big.conf;",
            )
            .file("/c/big.conf", big);
        let (_, diags) = expand(&loader);
        assert_eq!(
            diags,
            vec![format!(
                "E0026 the config holds more than {} MiB of text with its includes expanded; reading stopped in apm.conf",
                MAX_BYTES / (1024 * 1024)
            )]
        );
    }

    #[test]
    fn cycles_show_the_chain_and_missing_literals_are_errors() {
        let loader = MemLoader::new()
            .file(
                "/c/apm.conf",
                "include ./sub/a.conf;\ninclude missing.conf;",
            )
            .file("/c/sub/a.conf", "include ../apm.conf;");
        let (_, diags) = expand(&loader);
        assert_eq!(
            diags,
            vec![
                "E0008 included file `missing.conf` not found",
                "E0009 include cycle: apm.conf → sub/a.conf → apm.conf",
            ]
        );
    }
}
