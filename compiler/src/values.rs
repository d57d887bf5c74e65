//! Typed values: how each kind of the schema is spelled and what it becomes.

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Serialize, Serializer};

use crate::codes;
use crate::diag::Diagnostic;
use crate::loader::SourceLoader;
use crate::source::Span;

/// The shape of a key's value, as listed in the schema table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Bool,
    /// Milliseconds when bare; `ms`, `s`, `m`, `h` suffixes accepted.
    Duration,
    /// Bytes when bare; `K`, `M`, `G`, `T` (and `KB`, `KiB`, …) are powers of 1024.
    Size,
    Int {
        min: u64,
        max: u64,
    },
    Text,
    /// Text that is never printed back: rendered as `********`.
    Secret,
    WorkerName,
    /// An environment variable name such as `APM_INDEX`.
    EnvName,
    /// A file or directory; `$VAR` is expanded and relative paths start at the config file's directory.
    Path,
    /// `SCHEME://HOST:PORT` or `SCHEME://unix:/path.sock`.
    Server,
    /// A URL with one of these schemes.
    Url {
        schemes: &'static [&'static str],
    },
    /// `on` (push mode) or an `http(s)://` URL (pull mode).
    HealthCheck,
    /// An IP address or CIDR range.
    Cidr,
    Glob,
    /// `*.ext`, `prefix*`, `*word*` or an exact path.
    PathPattern,
    /// `KEY=value`.
    EnvPair,
    /// `host:port`.
    HostPort,
    IpAddr,
    Enum(&'static [&'static str]),
    /// An OS user name; unknown users are an error.
    User,
    /// An OS group name.
    Group,
    /// An HTTP header name: a token of RFC 9110.
    HeaderName,
}

impl Kind {
    /// How a value of this kind is written, for messages and docs.
    pub fn describe(&self) -> String {
        match self {
            Kind::Bool => "a boolean (true/false, on/off, yes/no, 1/0)".into(),
            Kind::Duration => "a duration in milliseconds (500) or with a unit (2s, 5m, 1h)".into(),
            Kind::Size => "a size in bytes (1048576) or with a unit (512K, 10M, 1G)".into(),
            Kind::Int { min, max } if *max == u64::MAX => format!("a whole number from {min}"),
            Kind::Int { min, max } => format!("a whole number from {min} to {max}"),
            Kind::Text => "a string".into(),
            Kind::Secret => "a string (never printed)".into(),
            Kind::WorkerName => format!("a worker name of letters, digits, `_`, `.` and `-`, at most {MAX_WORKER_NAME} long"),
            Kind::EnvName => "an environment variable name".into(),
            Kind::Path => "a path ($VAR expanded, relative to the config file)".into(),
            Kind::Server => "a listener URL (http://0.0.0.0:3000, tcp://127.0.0.1:9000, http://unix:/run/app.sock)".into(),
            Kind::Url { schemes } => format!(
                "a URL starting with {}",
                schemes.iter().map(|s| format!("{s}://")).collect::<Vec<_>>().join(" or ")
            ),
            Kind::HealthCheck => "`on` or an http(s):// URL".into(),
            Kind::Cidr => "an IP address or CIDR range (10.0.0.0/8)".into(),
            Kind::Glob => "a glob pattern (*.js)".into(),
            Kind::PathPattern => "a path pattern (*.php, /admin*, *wp-*, /exact)".into(),
            Kind::EnvPair => "KEY=value".into(),
            Kind::HostPort => "host:port".into(),
            Kind::IpAddr => "an IP address".into(),
            Kind::Enum(variants) => format!("one of {}", variants.join(", ")),
            Kind::User => "an OS user name".into(),
            Kind::Group => "an OS group name".into(),
            Kind::HeaderName => "an HTTP header name (x-request-id)".into(),
        }
    }

    /// The error code of a bad value of this kind, for kinds whose bad values
    /// are errors because falling back to a default would be unsafe or
    /// surprising (decisions: the config language, rule 8).
    pub fn strict_code(&self) -> Option<&'static codes::Code> {
        match self {
            Kind::Cidr => Some(&codes::INVALID_CIDR),
            Kind::Server => Some(&codes::INVALID_SERVER),
            Kind::WorkerName => Some(&codes::INVALID_NAME),
            Kind::User => Some(&codes::UNKNOWN_USER),
            _ => None,
        }
    }
}

/// Why a value was rejected.
#[derive(Debug)]
pub struct Problem {
    pub message: String,
    pub help: Option<String>,
    /// A problem with its own code (an unset variable) rather than the key's.
    pub diagnostic: Option<Box<Diagnostic>>,
}

impl Problem {
    pub fn new(message: impl Into<String>) -> Problem {
        Problem {
            message: message.into(),
            help: None,
            diagnostic: None,
        }
    }

    pub fn help(mut self, help: impl Into<String>) -> Problem {
        self.help = Some(help.into());
        self
    }
}

/// What a value needs to know about where it was written.
pub struct ValueCx<'a> {
    pub loader: &'a dyn SourceLoader,
    /// The directory of the file the value is in.
    pub base_dir: &'a Path,
    pub span: Option<Span>,
}

pub trait FromValue: Sized {
    fn from_value(text: &str, kind: &Kind, cx: &ValueCx) -> Result<Self, Problem>;
}

fn kind_mismatch(kind: &Kind, ty: &str) -> Problem {
    Problem::new(format!("internal: schema kind {kind:?} is stored as {ty}"))
}

impl FromValue for bool {
    fn from_value(text: &str, kind: &Kind, _: &ValueCx) -> Result<Self, Problem> {
        if *kind != Kind::Bool {
            return Err(kind_mismatch(kind, "bool"));
        }
        const SPELLINGS: &[(&str, bool)] = &[
            ("true", true),
            ("on", true),
            ("yes", true),
            ("1", true),
            ("false", false),
            ("off", false),
            ("no", false),
            ("0", false),
        ];
        lookup(text, SPELLINGS).ok_or_else(|| {
            Problem::new(format!("`{text}` is not a boolean"))
                .help("use true or false (on/off, yes/no, 1/0)")
        })
    }
}

/// A duration kept in milliseconds, the unit users write.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Millis(pub u64);

impl Millis {
    pub fn as_duration(self) -> std::time::Duration {
        std::time::Duration::from_millis(self.0)
    }

    /// The duration in the largest unit that writes it exactly (`2s`, `2m`,
    /// `250ms`), as configs write durations; `0` stays `0`.
    pub fn with_unit(self) -> String {
        const UNITS: [(u64, &str); 3] = [(3_600_000, "h"), (60_000, "m"), (1_000, "s")];
        if self.0 == 0 {
            return "0".to_owned();
        }
        UNITS
            .iter()
            .find(|(size, _)| self.0.is_multiple_of(*size))
            .map_or_else(
                || format!("{}ms", self.0),
                |(size, unit)| format!("{}{unit}", self.0 / size),
            )
    }
}

impl Serialize for Millis {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

impl fmt::Display for Millis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}ms", self.0)
    }
}

/// The value of a case-insensitive spelling in a table, without allocating:
/// every worker parses many defaults.
fn lookup<T: Copy>(text: &str, table: &[(&str, T)]) -> Option<T> {
    table
        .iter()
        .find(|(spelling, _)| spelling.eq_ignore_ascii_case(text))
        .map(|&(_, value)| value)
}

/// Splits `12.5ms` into `12.5` and `ms`.
fn number_and_unit(text: &str) -> Option<(f64, &str)> {
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    if number.is_empty() || number.starts_with('.') || number.ends_with('.') {
        return None;
    }
    Some((number.parse().ok()?, unit))
}

/// A number with an optional unit from `units`, as a whole count of the
/// base unit (`1.5s` → 1500 ms).
fn scaled(
    text: &str,
    units: &[(&str, f64)],
    what: &str,
    base: &str,
    help: &str,
) -> Result<u64, Problem> {
    let bad = || Problem::new(format!("`{text}` is not {what}")).help(help);
    let (number, unit) = number_and_unit(text.trim()).ok_or_else(bad)?;
    let value = number * lookup(unit, units).ok_or_else(bad)?;
    if value.fract() != 0.0 || value > u64::MAX as f64 / 2.0 {
        return Err(Problem::new(format!(
            "`{text}` is not a whole number of {base}"
        )));
    }
    Ok(value as u64)
}

impl FromValue for Millis {
    fn from_value(text: &str, kind: &Kind, _: &ValueCx) -> Result<Self, Problem> {
        if *kind != Kind::Duration {
            return Err(kind_mismatch(kind, "Millis"));
        }
        const UNITS: &[(&str, f64)] = &[
            ("", 1.0),
            ("ms", 1.0),
            ("s", 1e3),
            ("m", 6e4),
            ("min", 6e4),
            ("h", 3.6e6),
        ];
        let help = "write milliseconds (500) or a number with ms, s, m or h (2s)";
        scaled(text, UNITS, "a duration", "milliseconds", help).map(Millis)
    }
}

/// A size in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

impl FromValue for ByteSize {
    fn from_value(text: &str, kind: &Kind, _: &ValueCx) -> Result<Self, Problem> {
        if *kind != Kind::Size {
            return Err(kind_mismatch(kind, "ByteSize"));
        }
        const K: f64 = 1024.0;
        const UNITS: &[(&str, f64)] = &[
            ("", 1.0),
            ("b", 1.0),
            ("k", K),
            ("kb", K),
            ("kib", K),
            ("m", K * K),
            ("mb", K * K),
            ("mib", K * K),
            ("g", K * K * K),
            ("gb", K * K * K),
            ("gib", K * K * K),
            ("t", K * K * K * K),
            ("tb", K * K * K * K),
            ("tib", K * K * K * K),
        ];
        let help = "write bytes (1048576) or a number with K, M or G (10M)";
        scaled(text, UNITS, "a size", "bytes", help).map(ByteSize)
    }
}

fn int_in_range(text: &str, kind: &Kind) -> Result<u64, Problem> {
    let Kind::Int { min, max } = *kind else {
        return Err(kind_mismatch(kind, "an integer"));
    };
    let range = || {
        if max == u64::MAX {
            format!("use a whole number from {min}")
        } else {
            format!("use a whole number from {min} to {max}")
        }
    };
    match text.parse::<u64>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        Ok(_) => Err(Problem::new(format!("{text} is out of range")).help(range())),
        Err(_) if text.starts_with('-') && text[1..].parse::<u64>().is_ok() => {
            Err(Problem::new(format!("{text} is out of range")).help(range()))
        }
        Err(_) => Err(Problem::new(format!("`{text}` is not a whole number")).help(range())),
    }
}

macro_rules! int_from_value {
    ($($t:ty),*) => {$(
        impl FromValue for $t {
            fn from_value(text: &str, kind: &Kind, _: &ValueCx) -> Result<Self, Problem> {
                let n = int_in_range(text, kind)?;
                <$t>::try_from(n).map_err(|_| kind_mismatch(kind, stringify!($t)))
            }
        }
    )*};
}
int_from_value!(u8, u16, u32, u64);

/// Log files are named after their worker (`NAME.out.log.N`), and Linux
/// allows file names of 255 bytes.
pub const MAX_WORKER_NAME: usize = 200;

/// Whether `text` may name a worker: in a config, and as the new name of
/// `apm rename` and `apm copy`.
pub fn check_worker_name(text: &str) -> Result<(), Problem> {
    if text.len() > MAX_WORKER_NAME {
        return Err(
            Problem::new(format!("the worker name is {} characters long", text.len())).help(
                format!("use at most {MAX_WORKER_NAME}: log files are named after the worker"),
            ),
        );
    }
    if is_worker_name(text) {
        return Ok(());
    }
    let hint = if text.contains('#') {
        "`#` is reserved: `name#N` addresses instance N on the CLI"
    } else {
        "use letters, digits, `_`, `.` and `-` only"
    };
    Err(Problem::new(format!("`{text}` is not a valid worker name")).help(hint))
}

fn is_worker_name(text: &str) -> bool {
    !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// A token (RFC 9110, 5.6.2): what a header name may be.
fn is_header_name(text: &str) -> bool {
    !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn is_env_name(text: &str) -> bool {
    let mut bytes = text.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

impl FromValue for String {
    fn from_value(text: &str, kind: &Kind, _: &ValueCx) -> Result<Self, Problem> {
        match kind {
            Kind::Text | Kind::Group => Ok(text.to_owned()),
            Kind::User if text.is_empty() => Err(Problem::new("the user name is empty")),
            Kind::User => Ok(text.to_owned()),
            Kind::WorkerName => check_worker_name(text).map(|()| text.to_owned()),
            Kind::HeaderName if is_header_name(text) => Ok(text.to_owned()),
            Kind::HeaderName => Err(Problem::new(format!("`{text}` is not an HTTP header name"))
                .help("use letters, digits and `-` (x-request-id); no spaces or `:`")),
            Kind::EnvName if is_env_name(text) => Ok(text.to_owned()),
            Kind::EnvName => Err(Problem::new(format!(
                "`{text}` is not an environment variable name"
            ))
            .help("use letters, digits and `_`, not starting with a digit")),
            Kind::Enum(variants) => variants
                .iter()
                .find(|v| v.eq_ignore_ascii_case(text))
                .map(|v| (*v).to_owned())
                .ok_or_else(|| {
                    Problem::new(format!("`{text}` is not one of {}", variants.join(", ")))
                }),
            Kind::Url { schemes } => {
                let (scheme, rest) = text.split_once("://").ok_or_else(|| {
                    Problem::new(format!("`{text}` is not a URL"))
                        .help(format!("write {}://host:port", schemes[0]))
                })?;
                if !schemes.contains(&scheme) {
                    return Err(Problem::new(format!("unsupported scheme `{scheme}://`"))
                        .help(kind.describe()));
                }
                parse_host_port(rest.split('/').next().unwrap_or(""), None)?;
                Ok(text.to_owned())
            }
            Kind::HostPort => {
                parse_host_port(text, None)?;
                Ok(text.to_owned())
            }
            Kind::Glob => {
                globset::Glob::new(text).map_err(|e| {
                    Problem::new(format!("`{text}` is not a valid glob: {}", e.kind()))
                })?;
                Ok(text.to_owned())
            }
            _ => Err(kind_mismatch(kind, "String")),
        }
    }
}

/// A string that is never shown: configs print it as `********`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(********)")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("********")
    }
}

impl FromValue for Secret {
    fn from_value(text: &str, kind: &Kind, _: &ValueCx) -> Result<Self, Problem> {
        match kind {
            Kind::Secret => Ok(Secret(text.to_owned())),
            _ => Err(kind_mismatch(kind, "Secret")),
        }
    }
}

/// Expands `$VAR` and `${VAR}`; `$$` is a literal `$`. An unset variable is
/// returned as the error.
pub fn expand_env(text: &str, loader: &dyn SourceLoader) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(dollar) = rest.find('$') {
        out.push_str(&rest[..dollar]);
        let after = &rest[dollar + 1..];
        if let Some(escaped) = after.strip_prefix('$') {
            out.push('$');
            rest = escaped;
            continue;
        }
        let (name, consumed) = if let Some(braced) = after.strip_prefix('{') {
            match braced.find('}') {
                Some(end) => (&braced[..end], end + 2),
                None => ("", 0),
            }
        } else {
            let end = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            (&after[..end], end)
        };
        if name.is_empty() || !is_env_name(name) {
            out.push('$');
            rest = after;
            continue;
        }
        out.push_str(&loader.env_var(name).ok_or_else(|| name.to_owned())?);
        rest = &after[consumed..];
    }
    out.push_str(rest);
    Ok(out)
}

pub fn unset_variable(span: Span, name: &str) -> Diagnostic {
    Diagnostic::new(
        &codes::UNSET_VARIABLE,
        span,
        format!("environment variable `{name}` is not set"),
    )
    .label("used here")
    .help(format!(
        "set {name} in the environment apm runs in, or write the path out"
    ))
}

impl FromValue for PathBuf {
    fn from_value(text: &str, kind: &Kind, cx: &ValueCx) -> Result<Self, Problem> {
        if *kind != Kind::Path {
            return Err(kind_mismatch(kind, "PathBuf"));
        }
        let expanded = expand_env(text, cx.loader).map_err(|name| Problem {
            message: format!("environment variable `{name}` is not set"),
            help: None,
            diagnostic: cx.span.map(|span| Box::new(unset_variable(span, &name))),
        })?;
        if expanded.is_empty() {
            return Err(Problem::new("the path is empty"));
        }
        Ok(crate::include::normalize(&cx.base_dir.join(expanded)))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheme {
    Http,
    Https,
    Ws,
    Wss,
    Tcp,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
            Scheme::Ws => "ws",
            Scheme::Wss => "wss",
            Scheme::Tcp => "tcp",
        }
    }

    pub fn is_tls(self) -> bool {
        matches!(self, Scheme::Https | Scheme::Wss)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(untagged)]
pub enum ListenAddr {
    Tcp { host: String, port: u16 },
    Unix { unix: PathBuf },
}

impl ListenAddr {
    /// Whether only this machine can connect. Unix sockets are local.
    pub fn is_loopback(&self) -> bool {
        match self {
            ListenAddr::Tcp { host, .. } => {
                host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
            }
            ListenAddr::Unix { .. } => true,
        }
    }

    /// Whether binding both would fail: the same socket, or the same port
    /// with a wildcard address on either side.
    pub fn overlaps(&self, other: &ListenAddr) -> bool {
        match (self, other) {
            (ListenAddr::Unix { unix: a }, ListenAddr::Unix { unix: b }) => a == b,
            (ListenAddr::Tcp { host: a, port: p }, ListenAddr::Tcp { host: b, port: q })
                if p == q =>
            {
                let ip = |h: &str| {
                    if h == "localhost" {
                        Some(IpAddr::from([127, 0, 0, 1]))
                    } else {
                        h.parse::<IpAddr>().ok()
                    }
                };
                match (ip(a), ip(b)) {
                    // `[::]` binds both families on Linux; `0.0.0.0` only IPv4.
                    (Some(x), Some(y)) => {
                        x == y
                            || (x.is_unspecified() && (x.is_ipv6() || y.is_ipv4()))
                            || (y.is_unspecified() && (y.is_ipv6() || x.is_ipv4()))
                    }
                    _ => a == b,
                }
            }
            _ => false,
        }
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            ListenAddr::Tcp { host, port } => write!(f, "{host}:{port}"),
            ListenAddr::Unix { unix } => write!(f, "unix:{}", unix.display()),
        }
    }
}

/// A listener of the built-in proxy.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct ServerUrl {
    pub scheme: Scheme,
    #[serde(flatten)]
    pub addr: ListenAddr,
}

impl fmt::Display for ServerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.scheme.as_str(), self.addr)
    }
}

fn parse_host_port(text: &str, scheme: Option<&str>) -> Result<(String, u16), Problem> {
    let example = scheme.map_or("host:port".to_owned(), |s| format!("{s}://0.0.0.0:3000"));
    let (host, port) = if let Some(v6) = text.strip_prefix('[') {
        let (host, rest) = v6
            .split_once(']')
            .ok_or_else(|| Problem::new(format!("`{text}`: unclosed `[` in an IPv6 address")))?;
        host.parse::<std::net::Ipv6Addr>()
            .map_err(|_| Problem::new(format!("`{host}` is not an IPv6 address")))?;
        (host, rest.strip_prefix(':').unwrap_or(""))
    } else {
        match text.rsplit_once(':') {
            Some((host, port)) => (host, port),
            None => (text, ""),
        }
    };
    if port.is_empty() {
        return Err(Problem::new(format!("`{text}` has no port"))
            .help(format!("add a port, as in {example}")));
    }
    let port = match port.parse::<u16>() {
        Ok(0) | Err(_) => {
            return Err(Problem::new(format!("`{port}` is not a port")).help("ports are 1-65535"));
        }
        Ok(port) => port,
    };
    let valid_host = !host.is_empty()
        && (host.parse::<IpAddr>().is_ok()
            || host.split('.').all(|label| {
                !label.is_empty()
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            }));
    if !valid_host {
        return Err(
            Problem::new(format!("`{host}` is not a host name or IP address"))
                .help(format!("write {example}")),
        );
    }
    Ok((host.to_owned(), port))
}

impl FromValue for ServerUrl {
    fn from_value(text: &str, kind: &Kind, _: &ValueCx) -> Result<Self, Problem> {
        if *kind != Kind::Server {
            return Err(kind_mismatch(kind, "ServerUrl"));
        }
        let (scheme_text, rest) = text.split_once("://").ok_or_else(|| {
            Problem::new(format!("`{text}` is not a listener URL"))
                .help("write SCHEME://HOST:PORT, as in http://0.0.0.0:3000")
        })?;
        const SCHEMES: &[(&str, Scheme)] = &[
            ("http", Scheme::Http),
            ("https", Scheme::Https),
            ("ws", Scheme::Ws),
            ("wss", Scheme::Wss),
            ("tcp", Scheme::Tcp),
        ];
        let scheme = match lookup(scheme_text, SCHEMES) {
            Some(scheme) => scheme,
            None => {
                return Err(
                    Problem::new(format!("unsupported scheme `{scheme_text}://`"))
                        .help("use http://, https://, ws://, wss:// or tcp://"),
                );
            }
        };
        if let Some(path) = rest.strip_prefix("unix:") {
            if !path.starts_with('/') {
                return Err(
                    Problem::new(format!("`{path}` is not an absolute socket path"))
                        .help(format!("write {scheme_text}://unix:/run/app.sock")),
                );
            }
            return Ok(ServerUrl {
                scheme,
                addr: ListenAddr::Unix {
                    unix: PathBuf::from(path),
                },
            });
        }
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.contains('/') {
            return Err(
                Problem::new(format!("`{text}` has a path; listeners take none"))
                    .help(format!("write {scheme_text}://HOST:PORT")),
            );
        }
        let (host, port) = parse_host_port(authority, Some(scheme_text))?;
        Ok(ServerUrl {
            scheme,
            addr: ListenAddr::Tcp { host, port },
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthCheck {
    /// The child calls `APM_HEALTH_URL` to check in.
    Push,
    /// apm sends HTTP GETs to this URL.
    Pull(String),
}

impl FromValue for HealthCheck {
    fn from_value(text: &str, kind: &Kind, cx: &ValueCx) -> Result<Self, Problem> {
        if *kind != Kind::HealthCheck {
            return Err(kind_mismatch(kind, "HealthCheck"));
        }
        if text.eq_ignore_ascii_case("on") {
            return Ok(HealthCheck::Push);
        }
        String::from_value(
            text,
            &Kind::Url {
                schemes: &["http", "https"],
            },
            cx,
        )
        .map(HealthCheck::Pull)
    }
}

impl FromValue for ipnet::IpNet {
    fn from_value(text: &str, kind: &Kind, _: &ValueCx) -> Result<Self, Problem> {
        if *kind != Kind::Cidr {
            return Err(kind_mismatch(kind, "IpNet"));
        }
        text.parse::<ipnet::IpNet>()
            .or_else(|_| text.parse::<IpAddr>().map(ipnet::IpNet::from))
            .map_err(|_| {
                Problem::new(format!("`{text}` is not an IP address or CIDR range"))
                    .help("write 10.0.0.0/8, 192.0.2.7 or 2001:db8::/32")
            })
    }
}

/// An IP address; the default is the unspecified IPv4 address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct Ip(pub IpAddr);

impl Default for Ip {
    fn default() -> Self {
        Ip(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED))
    }
}

impl fmt::Display for Ip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromValue for Ip {
    fn from_value(text: &str, kind: &Kind, _: &ValueCx) -> Result<Self, Problem> {
        if *kind != Kind::IpAddr {
            return Err(kind_mismatch(kind, "Ip"));
        }
        if text.eq_ignore_ascii_case("localhost") {
            return Ok(Ip(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)));
        }
        text.parse().map(Ip).map_err(|_| {
            Problem::new(format!("`{text}` is not an IP address"))
                .help("write 127.0.0.1, 0.0.0.0 or ::1")
        })
    }
}

/// A Vanguard `ban_path` pattern, matched against the normalised request path.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "match", content = "text", rename_all = "lowercase")]
pub enum PathPattern {
    /// `*.php`
    Suffix(String),
    /// `/.git*`
    Prefix(String),
    /// `*wp-*`
    Contains(String),
    /// `/admin`
    Exact(String),
}

impl PathPattern {
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathPattern::Suffix(s) => path.ends_with(s.as_str()),
            PathPattern::Prefix(s) => path.starts_with(s.as_str()),
            PathPattern::Contains(s) => path.contains(s.as_str()),
            PathPattern::Exact(s) => path == s,
        }
    }
}

impl FromValue for PathPattern {
    fn from_value(text: &str, kind: &Kind, _: &ValueCx) -> Result<Self, Problem> {
        if *kind != Kind::PathPattern {
            return Err(kind_mismatch(kind, "PathPattern"));
        }
        let inner_star = |s: &str| s.contains('*');
        let pattern = match (text.strip_prefix('*'), text.strip_suffix('*')) {
            (Some(_), Some(_)) if text.len() >= 3 => {
                PathPattern::Contains(text[1..text.len() - 1].to_owned())
            }
            (Some(rest), None) if !rest.is_empty() => PathPattern::Suffix(rest.to_owned()),
            (None, Some(rest)) if !rest.is_empty() => PathPattern::Prefix(rest.to_owned()),
            (None, None) if !text.is_empty() => PathPattern::Exact(text.to_owned()),
            _ => {
                return Err(Problem::new(format!("`{text}` matches nothing useful"))
                    .help(Kind::PathPattern.describe()));
            }
        };
        let (PathPattern::Suffix(s)
        | PathPattern::Prefix(s)
        | PathPattern::Contains(s)
        | PathPattern::Exact(s)) = &pattern;
        if inner_star(s) {
            return Err(
                Problem::new(format!("`{text}`: `*` may only start or end a pattern"))
                    .help(Kind::PathPattern.describe()),
            );
        }
        Ok(pattern)
    }
}

/// One `env` entry.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct EnvVar {
    pub key: String,
    pub value: String,
}

impl FromValue for EnvVar {
    fn from_value(text: &str, kind: &Kind, _: &ValueCx) -> Result<Self, Problem> {
        if *kind != Kind::EnvPair {
            return Err(kind_mismatch(kind, "EnvVar"));
        }
        match text.split_once('=') {
            Some((key, value)) if is_env_name(key) => Ok(EnvVar {
                key: key.to_owned(),
                value: value.to_owned(),
            }),
            Some((key, _)) => Err(Problem::new(format!(
                "`{key}` is not an environment variable name"
            ))),
            None => Err(Problem::new(format!("`{text}` has no `=`"))
                .help("write KEY=value; quote values with spaces: KEY=\"a b\"")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loader::MemLoader;

    #[test]
    fn durations_are_shown_in_the_largest_exact_unit() {
        for (ms, shown) in [
            (0, "0"),
            (1, "1ms"),
            (250, "250ms"),
            (1_500, "1500ms"),
            (2_000, "2s"),
            (90_000, "90s"),
            (120_000, "2m"),
            (7_200_000, "2h"),
        ] {
            assert_eq!(Millis(ms).with_unit(), shown);
        }
    }

    fn parse<T: FromValue>(text: &str, kind: Kind) -> Result<T, String> {
        let loader = MemLoader::new().env("HOME", "/home/u");
        let cx = ValueCx {
            loader: &loader,
            base_dir: Path::new("/etc/apm"),
            span: None,
        };
        T::from_value(text, &kind, &cx).map_err(|p| p.message)
    }

    #[test]
    fn durations_sizes_and_bools() {
        assert_eq!(parse::<Millis>("500", Kind::Duration), Ok(Millis(500)));
        assert_eq!(parse::<Millis>("2s", Kind::Duration), Ok(Millis(2000)));
        assert_eq!(parse::<Millis>("1.5m", Kind::Duration), Ok(Millis(90_000)));
        assert!(parse::<Millis>("2 days", Kind::Duration).is_err());
        assert!(parse::<Millis>("-1", Kind::Duration).is_err());
        assert_eq!(parse::<ByteSize>("10M", Kind::Size), Ok(ByteSize(10 << 20)));
        assert_eq!(parse::<ByteSize>("1GiB", Kind::Size), Ok(ByteSize(1 << 30)));
        assert_eq!(
            parse::<ByteSize>("512kb", Kind::Size),
            Ok(ByteSize(512 << 10))
        );
        assert!(parse::<ByteSize>("10X", Kind::Size).is_err());
        assert_eq!(parse::<bool>("Yes", Kind::Bool), Ok(true));
        assert_eq!(parse::<bool>("off", Kind::Bool), Ok(false));
        assert_eq!(
            parse::<u32>("0", Kind::Int { min: 1, max: 10 }),
            Err("0 is out of range".into())
        );
    }

    #[test]
    fn server_urls() {
        let url = parse::<ServerUrl>("http://0.0.0.0:3000", Kind::Server).unwrap();
        assert_eq!(
            url.addr,
            ListenAddr::Tcp {
                host: "0.0.0.0".into(),
                port: 3000
            }
        );
        assert_eq!(url.to_string(), "http://0.0.0.0:3000");
        let v6 = parse::<ServerUrl>("wss://[::1]:443", Kind::Server).unwrap();
        assert_eq!(v6.to_string(), "wss://[::1]:443");
        assert!(v6.addr.is_loopback());
        let unix = parse::<ServerUrl>("http://unix:/run/a.sock", Kind::Server).unwrap();
        assert_eq!(
            unix.addr,
            ListenAddr::Unix {
                unix: "/run/a.sock".into()
            }
        );
        assert_eq!(
            parse::<ServerUrl>("http://0.0.0.0", Kind::Server),
            Err("`0.0.0.0` has no port".into())
        );
        assert!(parse::<ServerUrl>("ftp://a:1", Kind::Server).is_err());
        assert!(parse::<ServerUrl>("http://a:70000", Kind::Server).is_err());
        let any = ListenAddr::Tcp {
            host: "0.0.0.0".into(),
            port: 80,
        };
        let local = ListenAddr::Tcp {
            host: "127.0.0.1".into(),
            port: 80,
        };
        assert!(any.overlaps(&local));
        assert!(!local.overlaps(&ListenAddr::Tcp {
            host: "127.0.0.2".into(),
            port: 80
        }));
    }

    #[test]
    fn paths_patterns_and_env() {
        assert_eq!(
            parse::<PathBuf>("$HOME/logs/../a.log", Kind::Path),
            Ok("/home/u/a.log".into())
        );
        assert_eq!(
            parse::<PathBuf>("logs/${HOME}x", Kind::Path),
            Ok("/etc/apm/logs/home/ux".into())
        );
        assert_eq!(
            parse::<PathBuf>("$NOPE/x", Kind::Path),
            Err("environment variable `NOPE` is not set".into())
        );
        assert_eq!(
            parse::<PathBuf>("cost$5", Kind::Path),
            Ok("/etc/apm/cost$5".into())
        );
        assert_eq!(
            parse::<PathPattern>("*.php", Kind::PathPattern),
            Ok(PathPattern::Suffix(".php".into()))
        );
        assert_eq!(
            parse::<PathPattern>("*wp-*", Kind::PathPattern),
            Ok(PathPattern::Contains("wp-".into()))
        );
        assert_eq!(
            parse::<PathPattern>("/.git*", Kind::PathPattern),
            Ok(PathPattern::Prefix("/.git".into()))
        );
        assert!(parse::<PathPattern>("/a*b", Kind::PathPattern).is_err());
        assert_eq!(
            parse::<EnvVar>("A=b=c", Kind::EnvPair),
            Ok(EnvVar {
                key: "A".into(),
                value: "b=c".into()
            })
        );
        assert!(parse::<EnvVar>("A", Kind::EnvPair).is_err());
        assert!(parse::<ipnet::IpNet>("10.0.0.0/33", Kind::Cidr).is_err());
        assert_eq!(
            parse::<ipnet::IpNet>("10.1.2.3", Kind::Cidr).map(|n| n.to_string()),
            Ok("10.1.2.3/32".into())
        );
    }
}

/// How a value is written in a config file, so that the IR can be printed
/// back as config text that compiles to the same value.
pub trait ConfigText {
    fn config_text(&self) -> String;
}

macro_rules! config_text_by_display {
    ($($t:ty),*) => {$(
        impl ConfigText for $t {
            fn config_text(&self) -> String {
                self.to_string()
            }
        }
    )*};
}
config_text_by_display!(bool, u8, u16, u32, u64, String, ServerUrl, ipnet::IpNet, Ip);

/// The largest unit that divides the value exactly, as people write it.
fn with_unit(value: u64, units: &[(&str, u64)]) -> String {
    units
        .iter()
        .find(|(_, size)| value >= *size && value.is_multiple_of(*size))
        .map_or_else(
            || value.to_string(),
            |(unit, size)| format!("{}{unit}", value / size),
        )
}

impl ConfigText for Millis {
    fn config_text(&self) -> String {
        with_unit(self.0, &[("h", 3_600_000), ("m", 60_000), ("s", 1_000)])
    }
}

impl ConfigText for ByteSize {
    fn config_text(&self) -> String {
        with_unit(
            self.0,
            &[
                ("T", 1 << 40),
                ("G", 1 << 30),
                ("M", 1 << 20),
                ("K", 1 << 10),
            ],
        )
    }
}

impl ConfigText for Secret {
    fn config_text(&self) -> String {
        self.0.clone()
    }
}

impl ConfigText for PathBuf {
    fn config_text(&self) -> String {
        // A `$` in a path is literal once expanded.
        self.display().to_string().replace('$', "$$")
    }
}

impl ConfigText for HealthCheck {
    fn config_text(&self) -> String {
        match self {
            HealthCheck::Push => "on".to_owned(),
            HealthCheck::Pull(url) => url.clone(),
        }
    }
}

impl ConfigText for PathPattern {
    fn config_text(&self) -> String {
        match self {
            PathPattern::Suffix(s) => format!("*{s}"),
            PathPattern::Prefix(s) => format!("{s}*"),
            PathPattern::Contains(s) => format!("*{s}*"),
            PathPattern::Exact(s) => s.clone(),
        }
    }
}

impl ConfigText for EnvVar {
    fn config_text(&self) -> String {
        format!("{}={}", self.key, self.value)
    }
}

/// A value as a config token: bare when it is a plain word, double-quoted
/// with escapes otherwise.
pub fn quote(text: &str) -> String {
    let plain = !text.is_empty()
        && text != ":"
        && !text.starts_with('#')
        && !text.starts_with("//")
        && !text.contains(|c: char| {
            c.is_whitespace() || matches!(c, ';' | ',' | '{' | '}' | '"' | '\'' | '`' | '\\')
        });
    if plain {
        return text.to_owned();
    }
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
