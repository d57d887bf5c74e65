//! Rendering compilations: ariadne snippets and a summary for people, one
//! JSON object for programs, workflow commands for GitHub Actions.

use std::fmt::Write as _;

use serde_json::{Value as Json, json};

use crate::Compilation;
use crate::diag::{Diagnostic, Label, Severity};
use crate::ir::WorkerSpec;
use crate::source::{SourceMap, Span};

/// How many workers the human summary lists before it says "and N more".
const SUMMARY_WORKERS: usize = 20;

fn file_name(sources: &SourceMap, span: Span) -> String {
    sources.path(span.file).display().to_string()
}

/// The span as a byte range on character boundaries, which ariadne needs.
fn ariadne_span(sources: &SourceMap, span: Span) -> (String, std::ops::Range<usize>) {
    let text = &sources.get(span.file).text;
    let snap = |mut i: usize| {
        i = i.min(text.len());
        while !text.is_char_boundary(i) {
            i += 1;
        }
        i
    };
    (
        file_name(sources, span),
        snap(span.start as usize)..snap(span.end as usize),
    )
}

fn render_diagnostic(
    sources: &SourceMap,
    diagnostic: &Diagnostic,
    color: bool,
    cache: &mut impl ariadne::Cache<String>,
    out: &mut Vec<u8>,
) {
    use ariadne::{Color, Config, IndexType, Label as AriadneLabel, Report, ReportKind};
    let (kind, accent) = match diagnostic.severity() {
        Severity::Error => (ReportKind::Error, Color::Red),
        Severity::Warning => (ReportKind::Warning, Color::Yellow),
    };
    let label = |label: &Label, color: Color| {
        let ariadne_label = AriadneLabel::new(ariadne_span(sources, label.span)).with_color(color);
        if label.message.is_empty() {
            ariadne_label
        } else {
            ariadne_label.with_message(&label.message)
        }
    };
    let mut report = Report::build(kind, ariadne_span(sources, diagnostic.primary.span))
        .with_config(
            Config::default()
                .with_color(color)
                .with_index_type(IndexType::Byte),
        )
        .with_code(diagnostic.code.id)
        .with_message(&diagnostic.message)
        .with_label(label(&diagnostic.primary, accent))
        .with_labels(diagnostic.secondary.iter().map(|l| label(l, Color::Blue)));
    if let Some(help) = &diagnostic.help {
        report = report.with_help(help);
    }
    // Writing into a Vec cannot fail.
    let _ = report.finish().write(cache, &mut *out);
}

/// The human rendering: every diagnostic as a source snippet, then a
/// one-screen summary of what the config defines.
pub fn human(compilation: &Compilation, color: bool) -> String {
    let sources = &compilation.sources;
    let mut cited: Vec<_> = compilation
        .diagnostics
        .iter()
        .flat_map(|d| {
            std::iter::once(&d.primary)
                .chain(&d.secondary)
                .map(|l| l.span.file)
        })
        .collect();
    cited.sort();
    cited.dedup();
    let mut cache = ariadne::sources(cited.into_iter().map(|file| {
        (
            file_name(sources, Span::new(file, 0..0)),
            sources.get(file).text.clone(),
        )
    }));
    let mut bytes = Vec::new();
    for diagnostic in &compilation.diagnostics {
        render_diagnostic(sources, diagnostic, color, &mut cache, &mut bytes);
    }
    let mut out = String::from_utf8_lossy(&bytes).into_owned();
    if let Some(more) = not_shown(compilation) {
        let _ = writeln!(out, "{more}");
    }
    out.push_str(&summary(compilation));
    out
}

/// "… and N more errors and M more warnings" past the kept diagnostics.
fn not_shown(compilation: &Compilation) -> Option<String> {
    let omitted = compilation.omitted;
    let parts: Vec<String> = [(omitted.errors, "error"), (omitted.warnings, "warning")]
        .into_iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, word)| {
            format!(
                "{} more {word}{}",
                thousands(n),
                if n == 1 { "" } else { "s" }
            )
        })
        .collect();
    (!parts.is_empty()).then(|| {
        format!(
            "… and {}, not shown (only the first {} are): fix these and check again",
            parts.join(" and "),
            crate::diag::MAX_KEPT
        )
    })
}

/// 2499900 as 2,499,900.
fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn plural(n: usize, word: &str) -> String {
    format!("{n} {word}{}", if n == 1 { "" } else { "s" })
}

fn summary(compilation: &Compilation) -> String {
    let root = compilation
        .sources
        .files()
        .next()
        .map(|(_, f)| f.path.display().to_string())
        .unwrap_or_default();
    let errors = compilation.count(Severity::Error);
    let warnings = compilation.count(Severity::Warning);
    let workers = &compilation.config.workers;
    let mut out = String::new();
    if errors > 0 {
        let _ = writeln!(
            out,
            "✗ {root}: {}, {}; nothing can be applied",
            plural(errors, "error"),
            plural(warnings, "warning")
        );
        return out;
    }
    let _ = writeln!(
        out,
        "✓ {root}: {}, {}",
        plural(workers.len(), "worker"),
        plural(warnings, "warning")
    );
    let daemon = &compilation.config.daemon;
    if daemon.gui_port.value != 0 {
        let _ = writeln!(
            out,
            "  daemon: GUI on {}",
            std::net::SocketAddr::new(daemon.gui_bind.value.0, daemon.gui_port.value)
        );
    }
    let rows: Vec<[String; 3]> = workers
        .iter()
        .take(SUMMARY_WORKERS)
        .map(summary_row)
        .collect();
    let widths: [usize; 2] =
        [0, 1].map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0));
    for [name, command, listeners] in &rows {
        let line = format!(
            "  {name:<w0$}  {command:<w1$}  {listeners}",
            w0 = widths[0],
            w1 = widths[1]
        );
        let _ = writeln!(out, "{}", line.trim_end());
    }
    if workers.len() > SUMMARY_WORKERS {
        let _ = writeln!(out, "  … and {} more", workers.len() - SUMMARY_WORKERS);
    }
    out
}

fn summary_row(spec: &WorkerSpec) -> [String; 3] {
    let mut command = format!("{} × {}", spec.instances.value, spec.exec.value);
    for param in &spec.params {
        command.push(' ');
        command.push_str(&param.value);
    }
    const MAX_COMMAND: usize = 40;
    if command.chars().count() > MAX_COMMAND {
        command = command.chars().take(MAX_COMMAND - 1).collect::<String>() + "…";
    }
    let listeners: Vec<String> = spec.server.iter().map(|s| s.value.to_string()).collect();
    [spec.name.value.clone(), command, listeners.join(", ")]
}

fn position(sources: &SourceMap, label: &Label) -> Json {
    let start = sources.start(label.span);
    json!({
        "file": file_name(sources, label.span),
        "line": start.line,
        "column": start.column,
        "message": label.message,
    })
}

/// The JSON rendering documented for `apm check --format json`.
pub fn json(compilation: &Compilation) -> Json {
    let sources = &compilation.sources;
    let diagnostics: Vec<Json> = compilation
        .diagnostics
        .iter()
        .map(|d| {
            let span = d.primary.span;
            let (start, end) = (sources.start(span), sources.end(span));
            json!({
                "severity": d.severity(),
                "code": d.code.id,
                "message": d.message,
                "file": file_name(sources, span),
                "line": start.line,
                "column": start.column,
                "end_line": end.line,
                "end_column": end.column,
                "labels": std::iter::once(&d.primary).chain(&d.secondary).map(|l| position(sources, l)).collect::<Vec<_>>(),
                "help": d.help,
            })
        })
        .collect();
    let errors = compilation.count(Severity::Error);
    json!({
        "ok": errors == 0,
        "errors": errors,
        "warnings": compilation.count(Severity::Warning),
        "diagnostics": diagnostics,
        "not_shown": compilation.omitted,
        "config": if errors == 0 { serde_json::to_value(&compilation.config).unwrap_or(Json::Null) } else { Json::Null },
    })
}

/// Escapes for workflow command data and properties (per the runner's rules).
fn escape_data(s: &str) -> String {
    s.replace('%', "%25")
        .replace('\r', "%0D")
        .replace('\n', "%0A")
}

fn escape_property(s: &str) -> String {
    escape_data(s).replace(':', "%3A").replace(',', "%2C")
}

/// One GitHub Actions workflow command per diagnostic.
pub fn github(compilation: &Compilation) -> String {
    let sources = &compilation.sources;
    let mut out = String::new();
    for d in &compilation.diagnostics {
        let span = d.primary.span;
        let (start, end) = (sources.start(span), sources.end(span));
        let command = match d.severity() {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        let mut message = d.message.clone();
        if let Some(help) = &d.help {
            message.push_str("\nhelp: ");
            message.push_str(help);
        }
        let _ = writeln!(
            out,
            "::{command} file={},line={},col={},endLine={},endColumn={},title={}::{}",
            escape_property(&file_name(sources, span)),
            start.line,
            start.column,
            end.line,
            end.column,
            d.code.id,
            escape_data(&message),
        );
    }
    if let Some(more) = not_shown(compilation) {
        let _ = writeln!(out, "::notice::{}", escape_data(&more));
    }
    out
}

/// The key reference in Markdown, generated from the schema table so the
/// docs cannot drift from the code (`docs/keys.md`; a test keeps it current).
pub fn key_reference() -> String {
    use crate::schema::Scope;
    let mut out = String::from(
        "# Config keys\n\n<!-- Generated from the schema table in compiler/src/ir.rs; `BLESS=1 cargo test --test it docs` regenerates it. -->\n",
    );
    for scope in Scope::ALL {
        let title = match scope.block_name() {
            None => "Top level".to_owned(),
            Some(block) => format!("`{block} {{ }}`"),
        };
        let _ = write!(
            out,
            "\n## {title}\n\n| key | value | many | default | since | on reload | description |\n|---|---|---|---|---|---|---|\n"
        );
        for key in scope.keys() {
            let _ = writeln!(
                out,
                "| `{}` | {} | {} | {} | {} | {} | {} |",
                key.name,
                key.kind.describe().replace('|', "\\|"),
                if key.many { "yes" } else { "" },
                key.default_shown()
                    .map(|d| format!("`{d}`"))
                    .unwrap_or_default(),
                key.since,
                match key.reload {
                    crate::schema::Reload::Hot => "applied live",
                    crate::schema::Reload::Restart => "restarts",
                },
                key.doc.replace('|', "\\|"),
            );
        }
        for (_, rules) in KEY_RULES.iter().filter(|(of, _)| *of == scope) {
            let _ = write!(out, "\n{rules}");
        }
    }
    out
}

/// What a table row cannot say: the rules some keys follow, printed after
/// their block's table.
const KEY_RULES: &[(crate::schema::Scope, &str)] = &[
    (
        crate::schema::Scope::Worker,
        "### Whose address Vanguard judges (`trust_proxy`, `trusted_proxies`)

Vanguard judges the address a connection comes from, unless that peer is a
trusted proxy: one in `trusted_proxies` (unset: loopback, `127.0.0.0/8` and
`::1`) with `trust_proxy` on, the default. Setting `trusted_proxies`
replaces loopback (list `127.0.0.1, ::1` too to keep it); a unix-socket
client counts as trusted when loopback is listed. A client that connects
directly is judged by its own address, whatever headers it sends.

From a trusted proxy, `X-Forwarded-For` (all its fields, in order, as one
list) is read from the right, as each proxy appends the address it saw: an
entry that is itself a trusted proxy is skipped, and the first one that is
not is the client. An entry that is not an address (an address with a port
is one) ends the walk at the last address read; when every entry is
trusted, the left-most is the client. Without `X-Forwarded-For`, the last
`X-Real-IP` names the client.

The instance hears the same client: `X-Forwarded-For` lists the hops from
that client on, then the peer (what a client wrote in front of its own
address, or anything an untrusted peer wrote, is not passed on), and
`X-Real-IP` is that client when a trusted proxy named one and absent
otherwise. A connector's session `remote_ip` and `trace_header` lines show it
too. `apm check` says whom each worker with Vanguard rules trusts.
",
    ),
    (
        crate::schema::Scope::Vanguard,
        "### How `ban_path` matches

A deny list errs towards refusing. The request path (query and fragment
dropped) is brought to what a server might make of it:

1. Percent-escapes are decoded again until none is left (`%252e` is `.`);
   a path still encoded after four rounds is refused.
2. `\\` separates segments as `/` does.
3. Each segment loses its path parameters (from `;`, as in
   `;jsessionid=…`) and anything after a NUL, then its trailing dots and
   spaces (`admin.`, `admin%20`).
4. Empty segments (`//`) and `.` are dropped; `..` removes the segment
   before it, so `/x/..;/admin` is `/admin`.
5. Case is ignored (`/Admin` is `/admin`), beyond ASCII too.

A path with `;` or a NUL is judged once more with its parameters kept, as
servers that do not strip them see it; either match refuses. Then:

- A pattern without `/` names a file or directory and is matched against
  each segment: `*.php` refuses a segment ending in `.php` anywhere,
  including `/index.php/extra` (PATH_INFO); `.env` a segment named `.env`;
  `wp-*` a segment starting with `wp-`; `*wp-*` one containing `wp-`.
- A pattern with `/` is matched against the whole path: `/admin` refuses
  `/admin`, `/admin/` and everything under it (`/admin/users`), not
  `/administrator`; `/.git*` any path that starts with `/.git`;
  `*/config.php` a path that ends with it or goes on under it; `*/x/*` a
  path that contains `/x/`.
- A trailing `/` changes nothing, in a path or a pattern, but `ban_path /;`
  refuses the root only, not every path.
",
    ),
];
