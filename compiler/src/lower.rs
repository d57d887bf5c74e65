//! Lowering: the expanded syntax tree to the typed IR. Keys are checked
//! against the schema of the block they are in; values are parsed by kind.

use std::path::{Path, PathBuf};

use crate::codes;
use crate::diag::{Diagnostic, Diagnostics, Severity, did_you_mean};
use crate::include::Sink;
use crate::ir::{Config, DaemonConfig, StatsdConfig, VanguardRules, WorkerSpec};
use crate::loader::SourceLoader;
use crate::schema::{KeyDef, Scope, Setting};
use crate::source::{SourceMap, Span};
use crate::syntax::{Block, Item, Stmt, Value};

/// Every place one key was written in a block, merged: a many-value key
/// appends, a one-value key keeps the last.
#[derive(Debug)]
pub struct Occurrence {
    pub key: Span,
    pub values: Vec<Value>,
}

/// What lowering one item needs: the sources seen so far and where to
/// report. Built afresh for each item, as the expander adds files.
pub struct LowerCx<'a> {
    pub loader: &'a dyn SourceLoader,
    pub sources: &'a SourceMap,
    pub diags: &'a mut Diagnostics,
    /// Keys whose written values were rejected since the last worker was
    /// built, so passes do not also report them as missing.
    pub rejected: &'a mut Vec<&'static str>,
    /// The directory of each source file, by `FileId`.
    dirs: &'a [PathBuf],
}

impl LowerCx<'_> {
    /// The root file's directory, against which defaults are resolved.
    pub fn root_dir(&self) -> &Path {
        self.dirs.first().map_or(Path::new(""), PathBuf::as_path)
    }

    /// The directory of the file a span is in: relative paths start there.
    pub fn dir_of(&self, span: Span) -> &Path {
        &self.dirs[span.file.0 as usize]
    }

    /// Rule 4 of the config language: when the extra values start on a new
    /// line, the `;` at the end of the previous line is probably missing.
    pub fn too_many_values(
        &self,
        def: &KeyDef,
        occurrence: &Occurrence,
        first: Span,
        second: Span,
    ) -> Diagnostic {
        let count = occurrence.values.len();
        let first_line = self.sources.start(first).line;
        if second.file == first.file && self.sources.start(second).line > first_line {
            return Diagnostic::new(
                &codes::TOO_MANY_VALUES,
                first.end_point(),
                format!(
                    "`{}` takes one value, but the next line was read as more values",
                    def.name
                ),
            )
            .label("`;` is probably missing here")
            .secondary(second, "read as a value of the statement above")
            .help(format!("add `;` at the end of line {first_line}"));
        }
        Diagnostic::new(&codes::TOO_MANY_VALUES, second, format!("`{}` takes one value, but {count} were given", def.name))
            .label("extra value")
            .secondary(occurrence.key, "one-value key")
            .help(format!("values are separated by spaces and commas; quote a value that contains them: {} \"a b\";", def.name))
    }
}

/// The occurrences of the keys of one block, indexed like its `KEYS`.
struct Collector {
    scope: Scope,
    slots: Vec<Option<Occurrence>>,
}

impl Collector {
    fn new(scope: Scope) -> Collector {
        Collector {
            scope,
            slots: std::iter::repeat_with(|| None)
                .take(scope.keys().len())
                .collect(),
        }
    }

    fn stmt(&mut self, stmt: Stmt, cx: &mut LowerCx) {
        let Some(index) = self.scope.key_index(&stmt.key.text) else {
            // An unknown or misplaced key is a warning either way.
            cx.diags
                .push_with(Severity::Warning, || unknown_key(self.scope, &stmt));
            return;
        };
        let def = &self.scope.keys()[index];
        match &mut self.slots[index] {
            Some(occurrence) if def.many => occurrence.values.extend(stmt.values),
            slot => {
                if let Some(previous) = slot {
                    cx.diags.push(
                        Diagnostic::new(
                            &codes::DUPLICATE_KEY,
                            stmt.key.span,
                            format!("`{}` is set twice; this later value wins", def.name),
                        )
                        .label("set again here")
                        .secondary(previous.key, "first set here")
                        .help("remove one of them"),
                    );
                }
                *slot = Some(Occurrence {
                    key: stmt.key.span,
                    values: stmt.values,
                });
            }
        }
    }

    /// Collects a block that holds keys only; any nested block is reported.
    fn flat(&mut self, items: Vec<Item>, cx: &mut LowerCx) {
        for item in items {
            match item {
                Item::Stmt(stmt) => self.stmt(stmt, cx),
                Item::Block(block) => {
                    nested_scope(self.scope, &block, cx);
                }
            }
        }
    }
}

fn unknown_key(scope: Scope, stmt: &Stmt) -> Diagnostic {
    let name = stmt.key.text.as_str();
    if let Some(home) = Scope::ALL.into_iter().find(|s| s.key_index(name).is_some()) {
        return Diagnostic::new(
            &codes::MISPLACED_KEY,
            stmt.key.span,
            format!(
                "`{name}` belongs {}, not {}; it is ignored here",
                home.place(),
                scope.place()
            ),
        )
        .label("misplaced key")
        .help(format!("move `{name}` {}", home.destination()));
    }
    let candidates = scope.keys().iter().map(|k| k.name).chain(["include"]);
    Diagnostic::new(
        &codes::UNKNOWN_KEY,
        stmt.key.span,
        format!("unknown key `{name}` {}; it is ignored", scope.place()),
    )
    .label("unknown key")
    .maybe_help(did_you_mean(name, candidates))
}

/// The scope a block nested in `scope` opens, or `None` after reporting why
/// it cannot be there.
fn nested_scope(scope: Scope, block: &Block, cx: &mut LowerCx) -> Option<Scope> {
    let name = block.name.text.as_str();
    match Scope::for_block(name) {
        Some((parent, opened)) if parent == scope => Some(opened),
        Some((parent, _)) => {
            let home = match parent {
                Scope::Top => "at the top level".to_owned(),
                other => format!(
                    "inside a `{}` block",
                    other.block_name().unwrap_or_default()
                ),
            };
            cx.diags.push(
                Diagnostic::new(
                    &codes::MISPLACED_BLOCK,
                    block.name.span,
                    format!("`{name} {{ }}` cannot be {}", scope.place()),
                )
                .label("misplaced block")
                .help(format!("`{name} {{ }}` belongs {home}")),
            );
            None
        }
        None => {
            let here: Vec<&str> = ["daemon", "worker", "vanguard", "statsd"]
                .into_iter()
                .filter(|b| Scope::for_block(b).is_some_and(|(parent, _)| parent == scope))
                .collect();
            let allowed = if here.is_empty() {
                format!("no blocks are allowed {}", scope.place())
            } else {
                format!(
                    "blocks allowed {}: {}",
                    scope.place(),
                    here.iter()
                        .map(|b| format!("`{b}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            };
            let help = match did_you_mean(name, ["daemon", "worker", "vanguard", "statsd"]) {
                Some(suggestion) => format!("{suggestion} ({allowed})"),
                None => allowed,
            };
            cx.diags.push(
                Diagnostic::new(
                    &codes::UNKNOWN_BLOCK,
                    block.name.span,
                    format!("unknown block `{name}`"),
                )
                .label("unknown block; its contents are not used")
                .help(help),
            );
            None
        }
    }
}

/// Lowers the top-level items one by one as the include expander produces
/// them, so a file's syntax tree is dropped once lowered: a large config is
/// never held as a whole tree and a whole IR at once.
pub struct Lowerer<'l> {
    loader: &'l dyn SourceLoader,
    dirs: Vec<PathBuf>,
    rejected: Vec<&'static str>,
    top: Collector,
    daemon: Collector,
    workers: Vec<WorkerSpec>,
}

impl<'l> Lowerer<'l> {
    pub fn new(loader: &'l dyn SourceLoader) -> Self {
        Lowerer {
            loader,
            dirs: Vec::new(),
            rejected: Vec::new(),
            top: Collector::new(Scope::Top),
            daemon: Collector::new(Scope::Daemon),
            workers: Vec::new(),
        }
    }

    /// Splits the borrows of the lowerer into the state and a context.
    fn parts<'a>(
        &'a mut self,
        sources: &'a SourceMap,
        diags: &'a mut Diagnostics,
    ) -> (
        LowerCx<'a>,
        &'a mut Collector,
        &'a mut Collector,
        &'a mut Vec<WorkerSpec>,
    ) {
        let known = self.dirs.len();
        self.dirs.extend(
            sources
                .files()
                .skip(known)
                .map(|(_, f)| f.path.parent().map(Path::to_path_buf).unwrap_or_default()),
        );
        let cx = LowerCx {
            loader: self.loader,
            sources,
            diags,
            rejected: &mut self.rejected,
            dirs: &self.dirs,
        };
        (cx, &mut self.top, &mut self.daemon, &mut self.workers)
    }

    pub fn finish(mut self, sources: &SourceMap, diags: &mut Diagnostics) -> Config {
        let (mut cx, top, daemon, workers) = self.parts(sources, diags);
        let daemon = DaemonConfig::from_occurrences(&mut daemon.slots, &mut cx);
        let workers = std::mem::take(workers);
        Config::from_occurrences(&mut top.slots, &mut cx, daemon, workers)
    }
}

impl Sink for Lowerer<'_> {
    fn item(&mut self, item: Item, sources: &SourceMap, diags: &mut Diagnostics) {
        let (mut cx, top, daemon, workers) = self.parts(sources, diags);
        match item {
            Item::Stmt(stmt) => top.stmt(stmt, &mut cx),
            Item::Block(block) => match nested_scope(Scope::Top, &block, &mut cx) {
                Some(Scope::Daemon) => daemon.flat(block.items, &mut cx),
                Some(Scope::Worker) => workers.push(lower_worker(block, &mut cx)),
                _ => {}
            },
        }
    }
}

fn lower_worker(block: Block, cx: &mut LowerCx) -> WorkerSpec {
    cx.rejected.clear();
    let mut keys = Collector::new(Scope::Worker);
    let mut vanguard: Option<Collector> = None;
    let mut statsd: Option<Collector> = None;
    for item in block.items {
        match item {
            Item::Stmt(stmt) => keys.stmt(stmt, cx),
            Item::Block(nested) => match nested_scope(Scope::Worker, &nested, cx) {
                Some(Scope::Vanguard) => vanguard
                    .get_or_insert_with(|| Collector::new(Scope::Vanguard))
                    .flat(nested.items, cx),
                Some(Scope::Statsd) => statsd
                    .get_or_insert_with(|| Collector::new(Scope::Statsd))
                    .flat(nested.items, cx),
                _ => {}
            },
        }
    }
    let vanguard = vanguard.map(|mut collector| {
        let mut rules = VanguardRules::from_occurrences(&mut collector.slots, cx);
        if rules.rate_burst.is_none() {
            rules.rate_burst = rules
                .rate_limit
                .as_ref()
                .map(|limit| Setting::new(limit.value, None));
        }
        rules
    });
    let statsd =
        statsd.map(|mut collector| StatsdConfig::from_occurrences(&mut collector.slots, cx));
    let mut spec = WorkerSpec::from_occurrences(
        &mut keys.slots,
        cx,
        vanguard,
        statsd,
        Some(block.name.span),
        Vec::new(),
    );
    spec.rejected = std::mem::take(cx.rejected);
    // A name that was written but rejected is not replaced by the exec name,
    // which could clash with another worker and report a second, false error.
    if !spec.name.is_explicit() && !spec.rejected.contains(&"name") {
        spec.name.value = default_name(spec.exec_name());
    }
    spec
}

/// The exec's file name made into a valid worker name.
fn default_name(exec_name: &str) -> String {
    exec_name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                c
            } else {
                '_'
            }
        })
        .take(crate::values::MAX_WORKER_NAME)
        .collect()
}
