//! Stable diagnostic codes. A code never changes meaning once released; its
//! explanation is what `apm explain CODE` prints. Retired numbers are not
//! reused (E0003 and E0026 were dropped before the first release; W0007,
//! "`trust_proxy` left at its default on a public listener", when forwarding
//! headers came to be believed from trusted proxies only).

use crate::diag::Severity;

#[derive(Debug, PartialEq, Eq)]
pub struct Code {
    pub id: &'static str,
    pub severity: Severity,
    pub title: &'static str,
    pub explanation: &'static str,
}

macro_rules! codes {
    ($($name:ident = $id:literal $sev:ident $title:literal $explanation:literal;)*) => {
        $(pub static $name: Code = Code {
            id: $id,
            severity: Severity::$sev,
            title: $title,
            explanation: $explanation,
        };)*

        /// Every code, in code order.
        pub static ALL: &[&Code] = &[$(&$name),*];
    };
}

codes! {
    INVALID_UTF8 = "E0001" Error "file is not valid UTF-8"
"apm.conf files must be UTF-8. The diagnostic points at the first byte that is not; \
the rest of that file is not read. Re-save the file as UTF-8 (for example with \
`iconv -f latin1 -t utf-8 old.conf > apm.conf`).";

    UNTERMINATED_STRING = "E0002" Error "unterminated quoted string"
"A value opened with `\"`, `'` or a backtick runs to the end of the file without its \
closing quote. Add the closing quote; inside double quotes, write `\\\"` for a literal quote.";

    MISSING_SEMICOLON = "E0004" Error "missing `;`"
"Every statement ends with `;`, as in `instances 4;`. Without it the next line is read as \
more values of this statement. Add `;` at the end of the line the diagnostic names.";

    SYNTAX = "E0005" Error "syntax error"
"The parser found a token where it cannot be. A statement is `key value…;` and a block is \
`name { … }`. The message says what was expected instead.";

    UNCLOSED_BLOCK = "E0006" Error "unclosed block"
"A block opened with `{` has no matching `}` before the end of the file. Add the `}`; the \
diagnostic shows where the block was opened.";

    UNEXPECTED_CLOSE = "E0007" Error "unexpected `}`"
"A `}` closes no block. Remove it, or look for a block above that was closed twice.";

    INCLUDE_NOT_FOUND = "E0008" Error "included file not found"
"`include` names a file that does not exist. Paths are relative to the file that contains \
the `include`. A glob (`conf.d/*.conf`) that matches nothing is not an error, a literal \
path that is missing is.";

    INCLUDE_CYCLE = "E0009" Error "include cycle"
"A file includes itself, directly or through other files. The message shows the chain; \
remove one of the `include` statements in it.";

    INCLUDE_FAILED = "E0010" Error "include could not be read"
"An included file or directory exists but could not be read (permissions, a directory \
where a file was expected, an invalid glob). The message carries the reason.";

    UNKNOWN_BLOCK = "E0011" Error "unknown block"
"Blocks are `daemon { }` and `worker { }` at the top level, and `vanguard { }` and \
`statsd { }` inside a worker. An unknown block is an error rather than a warning because \
ignoring it would silently drop a whole worker.";

    MISPLACED_BLOCK = "E0012" Error "block in the wrong place"
"A known block appears where it cannot, such as `vanguard { }` at the top level or a \
`worker { }` inside another worker. Move it where the help says.";

    TOO_MANY_VALUES = "E0013" Error "one-value key given several values"
"This key takes one value, but several were given. Values are separated by whitespace or \
commas, so a value with spaces must be quoted (`ban_response \"Access denied\";`). When the \
extra values start on the next line, the `;` at the end of the previous line is probably \
missing.";

    MISSING_EXEC = "E0014" Error "worker without `exec`"
"Every worker needs `exec`, the program to run (looked up in PATH). Add `exec node;` or \
similar to the worker block.";

    DUPLICATE_WORKER = "E0015" Error "duplicate worker name"
"Two workers have the same name; names address workers on the CLI, so they must be unique \
across a config and all its includes. A worker without `name` is named after its `exec`, so \
two workers running the same program each need a `name`.";

    INVALID_NAME = "E0016" Error "invalid worker name"
"Worker names may contain letters, digits, `_`, `.` and `-` only. `name#N` is how the CLI \
addresses instance N, so `#` cannot be part of a name.";

    INVALID_CIDR = "E0017" Error "invalid IP range"
"`allow_ip` and `ban_ip` take IP addresses or CIDR ranges such as `10.0.0.0/8` or \
`2001:db8::/32`. A wrong entry in a firewall list is an error, not a warning, because \
dropping it would let traffic through that the config meant to stop.";

    TLS_UNUSABLE = "E0018" Error "TLS without a usable certificate"
"`tls` is on but `tls_cert` or `tls_key` is missing or cannot be read. Set both to readable \
PEM files.";

    UNKNOWN_USER = "E0019" Error "unknown user"
"`user` names an account that does not exist on this machine, or is empty. Create the \
account or fix the name.";

    INVALID_SERVER = "E0020" Error "invalid server URL"
"A `server` value must be `SCHEME://HOST:PORT` with scheme `http`, `https`, `ws`, `wss` or \
`tcp`, or `SCHEME://unix:/path/to.sock` for a unix socket. Ports are 1-65535.";

    DUPLICATE_ADDRESS = "E0021" Error "address bound twice"
"Two listeners would bind the same address (a wildcard address such as `0.0.0.0` overlaps \
every address of its family on the same port). Give each listener its own port or socket.";

    DEPENDENCY_CYCLE = "E0022" Error "dependency cycle"
"Workers wait for each other through `depends_on` in a circle, so none of them could \
start. The message shows the cycle; remove one of its edges.";

    TLS_SCHEME_WITHOUT_TLS = "E0024" Error "TLS scheme without `tls`"
"A listener uses `https://` or `wss://` but the worker does not set `tls true;` with \
`tls_cert` and `tls_key`, so it would serve plain text. Turn `tls` on.";

    UNSET_VARIABLE = "E0025" Error "unset environment variable"
"A path refers to `$VAR` or `${VAR}`, and that variable is not set in the environment apm \
runs in. Set it, or write the path out.";

    CONFIG_TOO_LARGE = "E0026" Error "config too large after includes"
"With its includes expanded, the config holds more than 100,000 statements or 16 MiB of \
text (a file included twice at every level doubles it each time). Nothing past the limit is \
read. The message shows the chain of includes that crossed it: include each file once.";

    NUL_IN_VALUE = "E0027" Error "NUL byte in a value"
"A value holds a NUL byte (often pasted from a binary file, or written by a broken \
generator). No argument, environment variable, path or name can hold one: the worker could \
never start. Remove the byte; `cat -A FILE` shows it as `^@`.";

    UNKNOWN_KEY = "W0001" Warning "unknown key"
"The key is not an apm option and is ignored. Check its spelling against the suggestion; \
`apm info` and the reference list every key.";

    MISPLACED_KEY = "W0002" Warning "key in the wrong block"
"The key exists, but in another block (for example `telemetry` is a top-level key, not a \
`daemon { }` one). It is ignored where it is; move it where the message says.";

    INVALID_VALUE = "W0003" Warning "invalid value, default used"
"The value of an optional key could not be understood, so apm uses the key's default and \
goes on. Fix the value to get the behaviour you meant.";

    DUPLICATE_KEY = "W0004" Warning "key set twice"
"A one-value key is set twice in the same block; the later value wins. Remove one of them.";

    UNKNOWN_DEPENDENCY = "W0005" Warning "dependency on an unknown worker"
"`depends_on` names a worker that this config does not define. It may be started from \
another file or the CLI; if not, the worker waits `depends_timeout` and then starts anyway.";

    GUI_EXPOSED = "W0006" Warning "GUI on a public address without a password"
"`gui_bind` is not a loopback address and `gui_password` is not set. The GUI refuses to \
start like that: set `gui_password`, or bind `127.0.0.1`.";

    MISSING_VALUE = "W0008" Warning "key without a value"
"The key has no value and is not a boolean, so it is ignored. Give it a value or remove it.";

    TLS_ON_PLAIN_SCHEME = "W0009" Warning "`tls` on a plain-text scheme"
"`tls` turns TLS on for every listener of the worker, as the reference has it, so an \
`http://` or `ws://` listener serves HTTPS or WSS although its scheme says plain text. Write \
`https://` or `wss://` to say what it serves (`tcp://` carries TLS when `tls` is on). This \
was error E0023 before; reference configs that pair `tls true` with `http://` now load.";
}

pub fn lookup(id: &str) -> Option<&'static Code> {
    ALL.iter().copied().find(|c| c.id.eq_ignore_ascii_case(id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_ordered_and_prefixed_by_severity() {
        for pair in ALL.windows(2) {
            assert!(
                pair[0].id < pair[1].id,
                "{} before {}",
                pair[0].id,
                pair[1].id
            );
        }
        for code in ALL {
            let prefix = if code.severity == Severity::Error {
                'E'
            } else {
                'W'
            };
            assert!(code.id.starts_with(prefix), "{}", code.id);
        }
        assert_eq!(lookup("e0004").map(|c| c.id), Some("E0004"));
    }
}
