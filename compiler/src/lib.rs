//! The apm config compiler: `apm.conf` and its includes in, a validated
//! typed IR and diagnostics out.
//!
//! Stages, each in its own module: `lexer` (lossless tokens) → `syntax`
//! (recovering parser) → `include` (expansion through a `SourceLoader`) →
//! `lower` (schema-checked, typed `ir`) → `validate` (named passes).
//! `render` turns the result into text, JSON or CI annotations.
//!
//! The compiler does no IO of its own: files, directory listings,
//! environment variables and users all come through the `SourceLoader`.

pub mod codes;
pub mod diag;
pub mod format;
pub mod include;
pub mod ir;
pub mod lexer;
pub mod loader;
pub mod lower;
pub mod plan;
pub mod print;
pub mod render;
pub mod save;
pub mod schema;
pub mod source;
pub mod syntax;
pub mod validate;
pub mod values;

use std::path::Path;

pub use diag::{Diagnostic, Severity};
pub use ir::Config;
pub use loader::{FsLoader, MemLoader, SourceLoader};
pub use source::SourceMap;

/// The result of compiling a config: its IR, what was wrong with it, and
/// the sources the diagnostics point into.
#[derive(Debug)]
pub struct Compilation {
    pub sources: SourceMap,
    /// The first `diag::MAX_KEPT` diagnostics, in source order.
    pub diagnostics: Vec<Diagnostic>,
    /// The ones past them, counted.
    pub omitted: diag::Omitted,
    /// The IR. With errors it holds what could be understood and must not be applied.
    pub config: Config,
}

impl Compilation {
    pub fn count(&self, severity: Severity) -> usize {
        self.diagnostics
            .iter()
            .filter(|d| d.severity() == severity)
            .count()
            + self.omitted.count(severity)
    }

    pub fn has_errors(&self) -> bool {
        self.count(Severity::Error) > 0
    }
}

/// Compiles the config at `path` with everything it includes. Only a root
/// file that cannot be read is an `Err`; every other problem is a diagnostic.
pub fn compile(path: &Path, loader: &dyn SourceLoader) -> std::io::Result<Compilation> {
    let mut sources = SourceMap::default();
    let mut diags = diag::Diagnostics::default();
    let mut lowerer = lower::Lowerer::new(loader);
    include::Expander::new(loader, &mut sources, &mut diags).expand_root(path, &mut lowerer)?;
    let config = lowerer.finish(&sources, &mut diags);
    validate::run(
        &config,
        &mut validate::PassCx {
            loader,
            diags: &mut diags,
        },
    );
    let (diagnostics, omitted) = diags.into_sorted();
    Ok(Compilation {
        sources,
        diagnostics,
        omitted,
        config,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        #[test]
        fn compiling_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let loader = MemLoader::new().file("apm.conf", bytes);
            let compilation = compile(Path::new("apm.conf"), &loader).unwrap();
            render::human(&compilation, false);
            render::json(&compilation);
        }

        #[test]
        fn compiling_config_like_text_never_panics(
            text in r#"(worker|daemon|vanguard|name|exec|server|include|instances|[a-z_]{1,9}|[{};,:]|"[^"]{0,5}"?|'|\$\{?[A-Z]{0,3}|[0-9]{1,6}|http://[0-9.:]{0,12}|\n| |#|//){0,60}"#
        ) {
            let loader = MemLoader::new().file("apm.conf", text.clone()).file("inc.conf", text);
            let compilation = compile(Path::new("apm.conf"), &loader).unwrap();
            render::human(&compilation, false);
            render::github(&compilation);
        }
    }

    #[test]
    fn every_default_in_the_schema_is_a_valid_value_of_its_key() {
        for def in schema::all_keys() {
            let Some(default) = def.default else { continue };
            let stmt = format!("{} \"{}\";", def.name, default);
            let text = match def.scope {
                schema::Scope::Top => stmt,
                schema::Scope::Daemon => format!("daemon {{ {stmt} }}"),
                schema::Scope::Worker => format!("worker {{ exec x; {stmt} }}"),
                schema::Scope::Vanguard => format!("worker {{ exec x; vanguard {{ {stmt} }} }}"),
                schema::Scope::Statsd => format!("worker {{ exec x; statsd {{ {stmt} }} }}"),
            };
            let compilation =
                compile(Path::new("a.conf"), &MemLoader::new().file("a.conf", text)).unwrap();
            assert_eq!(compilation.diagnostics, vec![], "default of {}", def.name);
        }
    }

    #[test]
    fn defaults_fill_unset_keys() {
        let loader = MemLoader::new().file(
            "a.conf",
            "worker { exec /usr/bin/node; vanguard { rate_limit 5; } statsd { } }",
        );
        let compilation = compile(Path::new("a.conf"), &loader).unwrap();
        assert_eq!(compilation.diagnostics, vec![]);
        let worker = &compilation.config.workers[0];
        assert_eq!(worker.name.value, "node");
        assert_eq!(worker.kill_timeout.value, values::Millis(2000));
        assert_eq!(worker.instances.value, 1);
        assert_eq!(worker.port_env.value, "PORT");
        assert_eq!(
            worker
                .vanguard
                .as_ref()
                .unwrap()
                .rate_burst
                .as_ref()
                .map(|b| b.value),
            Some(5)
        );
        assert_eq!(worker.statsd.as_ref().unwrap().host.value, "127.0.0.1:8125");
        assert_eq!(
            compilation.config.daemon.gui_bind.value.to_string(),
            "0.0.0.0"
        );
    }
}
