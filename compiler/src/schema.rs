//! The schema: what every key is. The key list itself lives in one place,
//! the `schema_block!` invocations in `ir.rs`, which generate both the typed
//! IR structs and the `KeyDef` rows that validation, the CLI and docs read.

use serde::{Serialize, Serializer};

use crate::codes;
use crate::diag::Diagnostic;
use crate::lower::{LowerCx, Occurrence};
use crate::source::Span;
use crate::values::{ConfigText, FromValue, Kind, Problem, ValueCx};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Top,
    Daemon,
    Worker,
    Vanguard,
    Statsd,
}

impl Scope {
    pub const ALL: [Scope; 5] = [
        Scope::Top,
        Scope::Daemon,
        Scope::Worker,
        Scope::Vanguard,
        Scope::Statsd,
    ];

    /// Where keys of this scope are written, for messages.
    pub fn place(self) -> &'static str {
        match self {
            Scope::Top => "at the top level",
            Scope::Daemon => "in `daemon { }`",
            Scope::Worker => "in `worker { }`",
            Scope::Vanguard => "in `vanguard { }` inside a worker",
            Scope::Statsd => "in `statsd { }` inside a worker",
        }
    }

    /// Where to move a key of this scope, for help texts.
    pub fn destination(self) -> &'static str {
        match self {
            Scope::Top => "to the top level",
            Scope::Daemon => "into `daemon { }`",
            Scope::Worker => "into the `worker { }` block",
            Scope::Vanguard => "into a `vanguard { }` block inside the worker",
            Scope::Statsd => "into a `statsd { }` block inside the worker",
        }
    }

    /// The block that opens this scope; `None` for the top level.
    pub fn block_name(self) -> Option<&'static str> {
        match self {
            Scope::Top => None,
            Scope::Daemon => Some("daemon"),
            Scope::Worker => Some("worker"),
            Scope::Vanguard => Some("vanguard"),
            Scope::Statsd => Some("statsd"),
        }
    }

    /// The scope a block of this name may appear in, and the scope it opens.
    pub fn for_block(name: &str) -> Option<(Scope, Scope)> {
        match name {
            "daemon" => Some((Scope::Top, Scope::Daemon)),
            "worker" => Some((Scope::Top, Scope::Worker)),
            "vanguard" => Some((Scope::Worker, Scope::Vanguard)),
            "statsd" => Some((Scope::Worker, Scope::Statsd)),
            _ => None,
        }
    }

    pub fn keys(self) -> &'static [KeyDef] {
        use crate::ir::{Config, DaemonConfig, StatsdConfig, VanguardRules, WorkerSpec};
        match self {
            Scope::Top => Config::KEYS,
            Scope::Daemon => DaemonConfig::KEYS,
            Scope::Worker => WorkerSpec::KEYS,
            Scope::Vanguard => VanguardRules::KEYS,
            Scope::Statsd => StatsdConfig::KEYS,
        }
    }

    /// The index of a key in `keys()`.
    pub fn key_index(self, name: &str) -> Option<usize> {
        static INDEX: std::sync::OnceLock<rustc_hash::FxHashMap<(Scope, &'static str), usize>> =
            std::sync::OnceLock::new();
        let index = INDEX.get_or_init(|| {
            Scope::ALL
                .into_iter()
                .flat_map(|scope| {
                    scope
                        .keys()
                        .iter()
                        .enumerate()
                        .map(move |(i, k)| ((scope, k.name), i))
                })
                .collect()
        });
        index.get(&(self, name)).copied()
    }
}

/// How a change of a key reaches a running worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Reload {
    /// Applied to the running instances (or only to added/removed ones).
    Hot,
    /// The worker's instances restart with the new value.
    Restart,
}

/// One row of the schema table.
#[derive(Debug)]
pub struct KeyDef {
    pub name: &'static str,
    pub scope: Scope,
    pub kind: Kind,
    /// Whether the key takes several values (repeating it appends).
    pub many: bool,
    /// The default as a user would write it; `None` when unset means "none".
    pub default: Option<&'static str>,
    /// The release the key came in.
    pub since: &'static str,
    /// Whether a running worker takes a change of this key without a restart.
    pub reload: Reload,
    pub doc: &'static str,
}

impl KeyDef {
    /// The default as help, docs and messages show it: a duration with its
    /// unit (`2s`, not the table's `2000`), as a user would write it.
    pub fn default_shown(&self) -> Option<String> {
        let default = self.default?;
        Some(match (self.kind, default.parse::<u64>()) {
            (Kind::Duration, Ok(ms)) => crate::values::Millis(ms).with_unit(),
            _ => default.to_owned(),
        })
    }
}

/// Every key of every scope, in table order.
pub fn all_keys() -> impl Iterator<Item = &'static KeyDef> {
    Scope::ALL.into_iter().flat_map(|scope| scope.keys())
}

/// A value and where it was written; `span` is `None` for defaults.
/// Equality ignores the span, so two configs compare by meaning.
#[derive(Clone, Debug, Default)]
pub struct Setting<T> {
    pub value: T,
    pub span: Option<Span>,
}

impl<T> Setting<T> {
    pub fn new(value: T, span: Option<Span>) -> Self {
        Setting { value, span }
    }

    /// Whether the user wrote this value rather than taking the default.
    pub fn is_explicit(&self) -> bool {
        self.span.is_some()
    }
}

impl<T: PartialEq> PartialEq for Setting<T> {
    fn eq(&self, other: &Self) -> bool {
        self.value == other.value
    }
}

impl<T> std::ops::Deref for Setting<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.value
    }
}

impl<T: Serialize> Serialize for Setting<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.value.serialize(s)
    }
}

/// How a field of an IR struct is filled from the occurrences of its key.
pub trait Slot: Sized {
    const MANY: bool;
    fn build(def: &'static KeyDef, occurrence: Option<Occurrence>, cx: &mut LowerCx) -> Self;
    /// The field's values as config text, when they were set explicitly.
    fn texts(&self) -> Option<Vec<String>>;
    /// The field's values as config text, defaults included.
    fn all_texts(&self) -> Vec<String>;
    /// Where the field's values were written.
    fn spans(&self) -> Vec<Span>;
}

fn parse_one<T: FromValue>(
    def: &'static KeyDef,
    text: &str,
    span: Option<Span>,
    cx: &mut LowerCx,
) -> Option<T> {
    if let Some(span) = span
        && text.contains('\0')
    {
        // Refused for every key: the default would hide that the value is broken.
        cx.diags.push(
            Diagnostic::new(
                &crate::codes::NUL_IN_VALUE,
                span,
                format!("`{}` has a NUL byte in its value", def.name),
            )
            .label("this value holds a NUL byte")
            .help("remove the byte: no argument, environment variable or path can hold one"),
        );
        cx.rejected.push(def.name);
        return None;
    }
    let parsed = {
        let base_dir = span.map_or(cx.root_dir(), |s| cx.dir_of(s));
        T::from_value(
            text,
            &def.kind,
            &ValueCx {
                loader: cx.loader,
                base_dir,
                span,
            },
        )
    };
    match (parsed, span) {
        (Ok(value), _) => Some(value),
        (Err(problem), Some(span)) => {
            cx.diags.push(bad_value(def, span, problem));
            cx.rejected.push(def.name);
            None
        }
        // Defaults are checked by a test over the whole table.
        (Err(_), None) => None,
    }
}

fn bad_value(def: &KeyDef, span: Span, problem: Problem) -> Diagnostic {
    if let Some(diagnostic) = problem.diagnostic {
        return *diagnostic;
    }
    let help = problem
        .help
        .unwrap_or_else(|| format!("`{}` takes {}", def.name, def.kind.describe()));
    if let Some(code) = def.kind.strict_code() {
        return Diagnostic::new(
            code,
            span,
            format!("invalid `{}`: {}", def.name, problem.message),
        )
        .label(format!("invalid {}", def.name))
        .help(help);
    }
    let fallback = match def.default_shown() {
        Some(default) => format!("the default ({default}) is used"),
        None => "it is ignored".to_owned(),
    };
    Diagnostic::new(
        &codes::INVALID_VALUE,
        span,
        format!("invalid `{}`: {}; {fallback}", def.name, problem.message),
    )
    .label(format!("invalid {}", def.name))
    .help(help)
}

fn missing_value(def: &KeyDef, key: Span, many: bool) -> Diagnostic {
    let count = if many { ", one or more" } else { "" };
    Diagnostic::new(
        &codes::MISSING_VALUE,
        key,
        format!("`{}` has no value and is ignored", def.name),
    )
    .label("key without a value")
    .help(format!(
        "`{}` takes {}{count}",
        def.name,
        def.kind.describe()
    ))
}

/// The single value of a one-value key, after reporting extra or missing values.
fn single<'o>(
    def: &'static KeyDef,
    occurrence: &'o Occurrence,
    cx: &mut LowerCx,
) -> Option<(&'o str, Span)> {
    match occurrence.values.as_slice() {
        [] if def.kind == Kind::Bool => Some(("true", occurrence.key)),
        [] => {
            cx.diags.push(missing_value(def, occurrence.key, false));
            cx.rejected.push(def.name);
            None
        }
        [one] => Some((one.text.as_str(), one.span)),
        [first, second, ..] => {
            cx.diags
                .push(cx.too_many_values(def, occurrence, first.span, second.span));
            cx.rejected.push(def.name);
            None
        }
    }
}

impl<T: FromValue + ConfigText + Default> Slot for Setting<T> {
    const MANY: bool = false;
    fn texts(&self) -> Option<Vec<String>> {
        self.is_explicit().then(|| vec![self.value.config_text()])
    }
    fn all_texts(&self) -> Vec<String> {
        vec![self.value.config_text()]
    }
    fn spans(&self) -> Vec<Span> {
        self.span.into_iter().collect()
    }
    fn build(def: &'static KeyDef, occurrence: Option<Occurrence>, cx: &mut LowerCx) -> Self {
        if let Some(occurrence) = &occurrence
            && let Some((text, span)) = single(def, occurrence, cx)
            && let Some(value) = parse_one(def, text, Some(span), cx)
        {
            return Setting::new(value, Some(span));
        }
        let value = def
            .default
            .and_then(|d| parse_one(def, d, None, cx))
            .unwrap_or_default();
        Setting::new(value, None)
    }
}

impl<T: FromValue + ConfigText> Slot for Option<Setting<T>> {
    const MANY: bool = false;
    fn texts(&self) -> Option<Vec<String>> {
        self.as_ref()
            .filter(|s| s.is_explicit())
            .map(|s| vec![s.value.config_text()])
    }
    fn all_texts(&self) -> Vec<String> {
        self.iter().map(|s| s.value.config_text()).collect()
    }
    fn spans(&self) -> Vec<Span> {
        self.iter().filter_map(|s| s.span).collect()
    }
    fn build(def: &'static KeyDef, occurrence: Option<Occurrence>, cx: &mut LowerCx) -> Self {
        let occurrence = occurrence?;
        let (text, span) = single(def, &occurrence, cx)?;
        parse_one(def, text, Some(span), cx).map(|value| Setting::new(value, Some(span)))
    }
}

impl<T: FromValue + ConfigText> Slot for Vec<Setting<T>> {
    const MANY: bool = true;
    fn texts(&self) -> Option<Vec<String>> {
        (!self.is_empty()).then(|| self.all_texts())
    }
    fn all_texts(&self) -> Vec<String> {
        self.iter().map(|s| s.value.config_text()).collect()
    }
    fn spans(&self) -> Vec<Span> {
        self.iter().filter_map(|s| s.span).collect()
    }
    fn build(def: &'static KeyDef, occurrence: Option<Occurrence>, cx: &mut LowerCx) -> Self {
        let Some(occurrence) = occurrence else {
            return Vec::new();
        };
        if occurrence.values.is_empty() {
            cx.diags.push(missing_value(def, occurrence.key, true));
        }
        occurrence
            .values
            .iter()
            .filter_map(|v| {
                parse_one(def, &v.text, Some(v.span), cx)
                    .map(|value| Setting::new(value, Some(v.span)))
            })
            .collect()
    }
}

/// Declares an IR struct and its rows of the schema table together, so the
/// key list is written once.
macro_rules! schema_block {
    (
        $(#[$meta:meta])*
        pub struct $name:ident in $scope:ident {
            $( $field:ident : $ty:ty = $kind:expr, default $default:expr, since $since:literal, reload $reload:ident, $doc:literal; )*
        }
        $( extra { $( $(#[$xmeta:meta])* $xfield:ident : $xty:ty ),* $(,)? } )?
    ) => {
        $(#[$meta])*
        #[derive(Clone, Debug, PartialEq, serde::Serialize)]
        pub struct $name {
            $( #[doc = $doc] pub $field: $ty, )*
            $($( $(#[$xmeta])* pub $xfield: $xty, )*)?
        }

        impl $name {
            pub const KEYS: &'static [$crate::schema::KeyDef] = &[$(
                $crate::schema::KeyDef {
                    name: stringify!($field),
                    scope: $crate::schema::Scope::$scope,
                    kind: $kind,
                    many: <$ty as $crate::schema::Slot>::MANY,
                    default: $default,
                    since: $since,
                    reload: $crate::schema::Reload::$reload,
                    doc: $doc,
                },
            )*];

            /// The keys that were set explicitly, with their values as config
            /// text, in table order.
            pub fn settings(&self) -> Vec<(&'static str, Vec<String>)> {
                let mut out = Vec::new();
                $( if let Some(texts) = $crate::schema::Slot::texts(&self.$field) {
                    out.push((stringify!($field), texts));
                } )*
                out
            }

            /// Whether every key has the same value in both (spans aside).
            pub fn same_settings(&self, other: &Self) -> bool {
                true $( && self.$field == other.$field )*
            }

            /// Where each key's values were written (empty for defaults).
            pub fn spans(&self) -> Vec<(&'static str, Vec<$crate::source::Span>)> {
                vec![$( (stringify!($field), $crate::schema::Slot::spans(&self.$field)), )*]
            }

            /// Every key with its values as config text, defaults included, in
            /// table order: what plans compare.
            pub fn values(&self) -> Vec<(&'static $crate::schema::KeyDef, Vec<String>)> {
                let mut defs = Self::KEYS.iter();
                vec![$( (defs.next().expect("one def per field"), $crate::schema::Slot::all_texts(&self.$field)), )*]
            }

            /// Builds the struct from the occurrences collected for its keys,
            /// indexed like `KEYS`.
            pub(crate) fn from_occurrences(
                occurrences: &mut [Option<$crate::lower::Occurrence>],
                cx: &mut $crate::lower::LowerCx,
                $($( $xfield: $xty, )*)?
            ) -> Self {
                let mut defs = Self::KEYS.iter();
                let mut slots = occurrences.iter_mut();
                let mut next = || (defs.next().expect("one def per field"), slots.next().expect("one slot per field").take());
                $name {
                    $( $field: {
                        let (def, occurrence) = next();
                        <$ty as $crate::schema::Slot>::build(def, occurrence, cx)
                    }, )*
                    $($( $xfield, )*)?
                }
            }
        }
    };
}
pub(crate) use schema_block;
