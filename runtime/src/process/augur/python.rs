//! Python: the interpreter a worker runs and where it finds packages
//! (`requirements.txt` against them), and the modules a source file
//! imports that it cannot find.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use super::{Program, read_text};

/// `sys.builtin_module_names` of Debian 12's CPython 3.11
/// (`/usr/bin/python3.11`), a superset of a default build's: modules
/// compiled into the interpreter, found in no directory.
const BUILTIN_MODULES: &[&str] = &[
    "__main__",
    "_abc",
    "_ast",
    "_bisect",
    "_blake2",
    "_codecs",
    "_collections",
    "_csv",
    "_datetime",
    "_elementtree",
    "_functools",
    "_heapq",
    "_imp",
    "_io",
    "_locale",
    "_md5",
    "_opcode",
    "_operator",
    "_pickle",
    "_posixsubprocess",
    "_random",
    "_sha1",
    "_sha256",
    "_sha3",
    "_sha512",
    "_signal",
    "_socket",
    "_sre",
    "_stat",
    "_statistics",
    "_string",
    "_struct",
    "_symtable",
    "_thread",
    "_tokenize",
    "_tracemalloc",
    "_warnings",
    "_weakref",
    "array",
    "atexit",
    "binascii",
    "builtins",
    "cmath",
    "errno",
    "faulthandler",
    "fcntl",
    "gc",
    "grp",
    "itertools",
    "marshal",
    "math",
    "posix",
    "pwd",
    "pyexpat",
    "select",
    "spwd",
    "sys",
    "syslog",
    "time",
    "unicodedata",
    "xxsubtype",
    "zlib",
];

/// How deep `-r` includes of requirements files are followed.
const INCLUDE_DEPTH: usize = 8;

/// A name as PEP 503 compares them: lower case, runs of `-`, `_` and `.`
/// as one `-`.
pub(super) fn normalise(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        if "-_.".contains(c) {
            if !out.ends_with('-') {
                out.push('-');
            }
        } else {
            out.push(c.to_ascii_lowercase());
        }
    }
    out
}

/// Where the worker's Python finds modules and packages.
#[derive(Debug, Default)]
pub(super) struct Environment {
    /// site-packages and dist-packages directories, with the directories
    /// their `.pth` files add, `PYTHONPATH`'s and the project's own.
    site: Vec<PathBuf>,
    /// The standard library's directories (`lib/python3.X` and its
    /// `lib-dynload`); empty when the interpreter was not found.
    stdlib: Vec<PathBuf>,
    /// The `version` of the interpreter (`3.11`), when known.
    version: Option<String>,
    /// The virtualenv it installs into: the project's, else the one the
    /// interpreter runs in.
    venv: Option<PathBuf>,
}

impl Environment {
    /// The environment of the interpreter the worker runs (its exec, the
    /// shebang of its exec, else `python3` through its PATH), with the
    /// project's virtualenvs and Debian's dist-packages.
    pub(super) fn of(program: &Program) -> Environment {
        let mut environment = Environment::default();
        if let Some(dir) = &program.dir {
            for venv in [".venv", "venv", "env"].map(|v| dir.join(v)) {
                if venv.join("pyvenv.cfg").is_file() {
                    environment.site.extend(site_packages(&venv));
                    environment.venv.get_or_insert(venv);
                }
            }
        }
        if let Some(python) = interpreter(program) {
            environment.add_interpreter(program, &python);
        }
        environment
            .site
            .push(PathBuf::from("/usr/lib/python3/dist-packages"));
        environment
            .site
            .extend(versioned_dirs(Path::new("/usr/local/lib"), "dist-packages"));
        if let Some(home) = program.var("HOME") {
            environment.site.extend(versioned_dirs(
                &Path::new(&home).join(".local/lib"),
                "site-packages",
            ));
        }
        environment.site.extend(pth_paths(&environment.site));
        let python_path = program.var("PYTHONPATH").unwrap_or_default();
        environment.site.extend(std::env::split_paths(&python_path));
        // `python -m` runs with the working directory first on the path.
        environment.site.extend(program.dir.clone());
        environment
    }

    /// The interpreter's own directories: a venv's site-packages (found
    /// by the `pyvenv.cfg` beside its `bin/`, before following the
    /// `bin/python` symlink to the base interpreter), then the base's
    /// standard library and, unless a venv hides them, site-packages.
    fn add_interpreter(&mut self, program: &Program, python: &Path) {
        let mut path = python.to_path_buf();
        let mut in_venv = false;
        let mut base_site = true;
        for _ in 0..40 {
            let venv = path.parent().and_then(Path::parent).map(Path::to_path_buf);
            if !in_venv
                && let Some(venv) = venv
                && let Some(config) = read_text(&venv.join("pyvenv.cfg"))
            {
                in_venv = true;
                self.site.extend(site_packages(&venv));
                self.venv.get_or_insert(venv);
                base_site = setting(&config, "include-system-site-packages")
                    .is_some_and(|v| v.eq_ignore_ascii_case("true"));
                self.version = setting(&config, "version")
                    .or_else(|| setting(&config, "version_info"))
                    .map(|v| minor_version(&v));
                // `home` is the base interpreter's directory, also for a
                // venv made with --copies.
                if let Some(home) = setting(&config, "home") {
                    path = Path::new(&home).join(path.file_name().unwrap_or_default());
                    continue;
                }
            }
            match std::fs::read_link(&path) {
                Ok(target) => path = path.parent().unwrap_or(Path::new("/")).join(target),
                Err(_) => match pyenv_shim(program, &path) {
                    Some(real) => path = real,
                    None => break,
                },
            }
        }
        let Some(prefix) = path.parent().and_then(Path::parent) else {
            return;
        };
        // `python3.11` names its version; `python3` does not.
        if let Some(version) = path
            .file_name()
            .and_then(|n| n.to_str()?.strip_prefix("python"))
            .filter(|v| v.contains('.'))
        {
            self.version.get_or_insert_with(|| version.to_owned());
        }
        let stdlib: Vec<PathBuf> = match &self.version {
            Some(version) => vec![prefix.join(format!("lib/python{version}"))],
            None => versioned_dirs(&prefix.join("lib"), ""),
        };
        for dir in stdlib.into_iter().filter(|d| d.join("os.py").is_file()) {
            if base_site {
                self.site.push(dir.join("site-packages"));
            }
            self.stdlib.push(dir.join("lib-dynload"));
            self.stdlib.push(dir);
        }
    }

    /// The pip that installs into it.
    pub(super) fn pip(&self) -> String {
        match &self.venv {
            Some(venv) => venv.join("bin/pip").display().to_string(),
            None => "pip".to_owned(),
        }
    }

    /// The requirements of a requirements file (and those it includes)
    /// that no site-packages directory has a distribution of.
    pub(super) fn missing_requirements(&self, file: &Path, project: &Path) -> Vec<String> {
        let mut declared = Vec::new();
        let root = project
            .canonicalize()
            .unwrap_or_else(|_| project.to_path_buf());
        let mut read = HashSet::new();
        requirements(file, &root, INCLUDE_DEPTH, &mut read, &mut declared);
        let markers = Markers {
            python_version: self.version.clone(),
        };
        let installed = self.distributions();
        let mut missing: Vec<String> = Vec::new();
        for (name, marker) in declared {
            // A requirement whose marker is false here, or unclear, is not claimed.
            if marker.is_some_and(|m| markers.evaluate(&m) != Some(true)) {
                continue;
            }
            let normal = normalise(&name);
            if !installed.contains(&normal) && !missing.iter().any(|m| normalise(m) == normal) {
                missing.push(name);
            }
        }
        missing
    }

    /// The PEP 503 names of the distributions installed in site-packages.
    fn distributions(&self) -> HashSet<String> {
        let mut names = HashSet::new();
        for entry in self.site.iter().flat_map(|dir| entries(dir)) {
            let Some(stem) = [".dist-info", ".egg-info", ".egg"]
                .iter()
                .find_map(|suffix| entry.strip_suffix(suffix))
            else {
                continue;
            };
            // `Name-1.0`, or `Name` for an egg-info without a version; a
            // name's own `-` is written `_` in these directory names.
            let name = stem.split('-').next().unwrap_or(stem);
            names.insert(normalise(name));
        }
        names
    }

    /// The top-level modules a Python source file imports at its top
    /// level (not indented: an import in a `try` or a function may be
    /// optional) that the interpreter cannot find; `None`, so that nothing
    /// is claimed, when its standard library was not found or the file
    /// changes its own path (`sys.path.insert(0, "lib")`).
    pub(super) fn missing_imports(&self, source: &str, entry: &Path) -> Option<Vec<String>> {
        if self.stdlib.is_empty() || source.contains("sys.path") || source.contains("addsitedir") {
            return None;
        }
        let mut dirs: Vec<PathBuf> = entry.parent().map(Path::to_path_buf).into_iter().collect();
        dirs.extend(self.stdlib.iter().cloned());
        dirs.extend(self.site.iter().cloned());
        let mut available: HashSet<String> = HashSet::new();
        for entry in dirs.iter().flat_map(|dir| entries(dir)) {
            let module = entry.split('.').next().unwrap_or(&entry);
            let is_module =
                !entry.contains('.') || [".py", ".pyc", ".so"].iter().any(|s| entry.ends_with(s));
            if is_module {
                available.insert(module.to_owned());
            }
        }
        // setuptools' editable installs map names to directories in a finder.
        let editable: String = self
            .site
            .iter()
            .flat_map(|dir| {
                entries(dir)
                    .into_iter()
                    .filter(|e| e.starts_with("__editable__") && e.ends_with("finder.py"))
                    .map(move |e| dir.join(e))
            })
            .filter_map(|finder| read_text(&finder))
            .collect();
        let found = |module: &str| {
            BUILTIN_MODULES.contains(&module)
                || available.contains(module)
                || editable.contains(&format!("'{module}'"))
        };
        let mut missing: Vec<String> = Vec::new();
        for module in imports(source) {
            if !found(&module) && !missing.contains(&module) {
                missing.push(module);
            }
        }
        Some(missing)
    }
}

/// The `lib/python3*/site-packages` directories of a venv.
fn site_packages(venv: &Path) -> Vec<PathBuf> {
    versioned_dirs(&venv.join("lib"), "site-packages")
}

/// `dir/python3*/under` for each `python3*` directory in `dir`.
fn versioned_dirs(dir: &Path, under: &str) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = entries(dir)
        .into_iter()
        .filter(|name| name.starts_with("python3"))
        .map(|name| dir.join(name).join(under))
        .filter(|path| path.is_dir())
        .collect();
    found.sort();
    found
}

/// The names in a directory (none when it cannot be read), at most
/// 100,000: a project's venv is its owner's to fill.
fn entries(dir: &Path) -> Vec<String> {
    const MOST: usize = 100_000;
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .take(MOST)
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect()
}

/// The directories `.pth` files add to the path (their lines that are
/// not comments or `import` statements), relative to their directory.
fn pth_paths(site: &[PathBuf]) -> Vec<PathBuf> {
    let mut added = Vec::new();
    for dir in site {
        for name in entries(dir).into_iter().filter(|n| n.ends_with(".pth")) {
            let Some(text) = read_text(&dir.join(&name)) else {
                continue;
            };
            added.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with("import"))
                    .map(|l| dir.join(l))
                    .filter(|p| p.is_dir()),
            );
        }
    }
    added
}

/// `key = value` of a `pyvenv.cfg`.
fn setting(config: &str, key: &str) -> Option<String> {
    config.lines().find_map(|line| {
        let (k, v) = line.split_once('=')?;
        (k.trim() == key).then(|| v.trim().to_owned())
    })
}

/// `3.11` of `3.11.7`.
fn minor_version(version: &str) -> String {
    version.split('.').take(2).collect::<Vec<_>>().join(".")
}

/// The Python the worker runs: its exec when that is a Python, else the
/// interpreter its exec's shebang names when that is one, else `python3`
/// through its PATH. Unresolved: a venv's `bin/python` is a symlink.
fn interpreter(program: &Program) -> Option<PathBuf> {
    let is_python = |path: &Path| {
        path.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("python"))
    };
    let exec = program.which(&program.exec);
    if let Some(exec) = exec.as_ref().filter(|e| is_python(e)) {
        return Some(exec.clone());
    }
    let shebang = exec.and_then(|exec| {
        let head = read_text(&exec)?;
        let line = head.strip_prefix("#!")?.lines().next()?;
        let mut words = line.split_whitespace();
        let first = words.next()?;
        let python = if first.ends_with("/env") {
            program.which(words.find(|w| !w.starts_with('-'))?)?
        } else {
            PathBuf::from(first)
        };
        is_python(&python).then_some(python)
    });
    shebang.or_else(|| program.which("python3"))
}

/// The interpreter a pyenv shim (`$PYENV_ROOT/shims/python3`, a script)
/// runs: the first version of `PYENV_VERSION`, else of the nearest
/// `.python-version` at or above the project, else of
/// `$PYENV_ROOT/version`, that has the program.
fn pyenv_shim(program: &Program, shim: &Path) -> Option<PathBuf> {
    let shims = shim.parent()?;
    let root = shims.parent()?;
    if shims.file_name()? != "shims" || !root.join("versions").is_dir() {
        return None;
    }
    let chosen = program
        .var("PYENV_VERSION")
        .map(|v| v.replace(':', " "))
        .filter(|v| !v.trim().is_empty())
        .or_else(|| {
            let dir = program.dir.as_deref()?;
            dir.ancestors()
                .find_map(|d| read_text(&d.join(".python-version")))
        })
        .or_else(|| read_text(&root.join("version")))?;
    chosen
        .split_whitespace()
        .filter(|v| !v.starts_with('#'))
        .map(|version| {
            root.join("versions")
                .join(version)
                .join("bin")
                .join(shim.file_name().unwrap_or_default())
        })
        .find(|path| path.is_file())
}

/// The requirements of a requirements file, with their markers, and of
/// the files it includes with `-r` that are inside the project. `-c`
/// constraint files are not followed: they pin versions of what others
/// require and require nothing themselves.
fn requirements(
    file: &Path,
    root: &Path,
    depth: usize,
    read: &mut HashSet<PathBuf>,
    out: &mut Vec<(String, Option<String>)>,
) {
    let Ok(file) = file.canonicalize() else {
        return;
    };
    if depth == 0 || !file.starts_with(root) || !read.insert(file.clone()) {
        return;
    }
    let Some(text) = read_text(&file) else {
        return;
    };
    let dir = file.parent().unwrap_or(root);
    for line in logical_lines(&text) {
        if let Some(option) = line.strip_prefix('-') {
            let included = ["r ", "r\t", "-requirement ", "-requirement="]
                .iter()
                .find_map(|prefix| option.strip_prefix(prefix))
                .or_else(|| option.strip_prefix('r').filter(|r| !r.starts_with('-')));
            if let Some(included) = included.map(str::trim).filter(|i| !i.is_empty()) {
                requirements(&dir.join(included), root, depth - 1, read, out);
            }
            continue;
        }
        out.extend(requirement(&line));
    }
}

/// The lines of a requirements file without comments (`#` at the start
/// or after a space) and blank lines, `\` continuations joined.
fn logical_lines(text: &str) -> Vec<String> {
    let mut lines = Vec::new();
    let mut pending = String::new();
    for raw in text.lines() {
        let code = match raw.find('#') {
            Some(0) => "",
            Some(at) if raw[..at].ends_with(char::is_whitespace) => &raw[..at],
            _ => raw,
        };
        match code.trim_end().strip_suffix('\\') {
            Some(head) => pending.push_str(head),
            None => {
                pending.push_str(code);
                let line = pending.trim().to_owned();
                pending.clear();
                if !line.is_empty() {
                    lines.push(line);
                }
            }
        }
    }
    lines
}

/// The name and marker of a PEP 508 requirement line: extras, version
/// specifiers and per-requirement options (`--hash`) dropped; a URL or
/// path by its `#egg=` name, else none.
fn requirement(line: &str) -> Option<(String, Option<String>)> {
    let name_end = line
        .find(|c: char| !(c.is_ascii_alphanumeric() || "._-".contains(c)))
        .unwrap_or(line.len());
    let name = &line[..name_end];
    let rest = &line[name_end..];
    let is_path = name.is_empty()
        || name.starts_with('.')
        || rest.starts_with("://")
        || rest.starts_with('+')
        || rest.starts_with(':')
        || [".whl", ".zip", ".tar.gz", ".tgz"]
            .iter()
            .any(|e| name.ends_with(e));
    if is_path {
        let egg = line.split_once("#egg=")?.1;
        let egg = egg.split(['&', ' ', '[']).next()?;
        let valid = !egg.is_empty()
            && egg
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
        return valid.then(|| (egg.to_owned(), None));
    }
    // `name @ url ; marker` needs a space before the `;`; others do not.
    let marker = if rest.trim_start().starts_with('@') {
        rest.split_once(" ;").map(|(_, m)| m)
    } else {
        rest.split_once(';').map(|(_, m)| m)
    };
    let marker = marker.map(|m| m.split(" --").next().unwrap_or(m).trim().to_owned());
    Some((name.to_owned(), marker.filter(|m| !m.is_empty())))
}

/// What PEP 508 markers compare, for this machine.
struct Markers {
    python_version: Option<String>,
}

impl Markers {
    /// A marker made of `variable op 'value'` comparisons joined by `and`
    /// and `or`; `None` when it holds anything else (parentheses, a
    /// variable not known here).
    fn evaluate(&self, marker: &str) -> Option<bool> {
        if marker.contains('(') {
            return None;
        }
        let mut any = false;
        for alternative in marker.split(" or ") {
            let mut all = true;
            for comparison in alternative.split(" and ") {
                all &= self.compare(comparison.trim())?;
            }
            any |= all;
        }
        Some(any)
    }

    fn compare(&self, comparison: &str) -> Option<bool> {
        const OPERATORS: &[&str] = &[
            "not in", "===", "==", "!=", "<=", ">=", "~=", "<", ">", "in",
        ];
        let (left, op, right) = OPERATORS.iter().find_map(|op| {
            let (l, r) = comparison.split_once(&format!(" {op} ")).or_else(|| {
                // Operators other than `in` may go without spaces.
                (!op.contains("in"))
                    .then(|| comparison.split_once(op))
                    .flatten()
            })?;
            Some((l.trim(), *op, r.trim()))
        })?;
        let literal = |s: &str| {
            let s = s.trim();
            (s.len() >= 2
                && (s.starts_with('"') && s.ends_with('"')
                    || s.starts_with('\'') && s.ends_with('\'')))
            .then(|| s[1..s.len() - 1].to_owned())
        };
        let value = |s: &str| literal(s).or_else(|| self.variable(s));
        let (left, right, version) = (value(left)?, value(right)?, is_version(comparison));
        if version {
            let (l, r) = (version_key(&left)?, version_key(&right)?);
            return match op {
                "==" | "===" => Some(l == r),
                "!=" => Some(l != r),
                "<" => Some(l < r),
                "<=" => Some(l <= r),
                ">" => Some(l > r),
                ">=" => Some(l >= r),
                _ => None,
            };
        }
        match op {
            "==" | "===" => Some(left == right),
            "!=" => Some(left != right),
            "in" => Some(right.contains(&left)),
            "not in" => Some(!right.contains(&left)),
            _ => None,
        }
    }

    fn variable(&self, name: &str) -> Option<String> {
        let arch = std::env::consts::ARCH;
        Some(match name {
            "os_name" => "posix".to_owned(),
            "sys_platform" => "linux".to_owned(),
            "platform_system" => "Linux".to_owned(),
            "platform_machine" => arch.to_owned(),
            "implementation_name" => "cpython".to_owned(),
            "platform_python_implementation" => "CPython".to_owned(),
            "python_version" => self.python_version.clone()?,
            _ => return None,
        })
    }
}

fn is_version(comparison: &str) -> bool {
    comparison.contains("python_version")
}

/// `3.11` as `[3, 11]`, for comparing.
fn version_key(version: &str) -> Option<Vec<u32>> {
    version.split('.').map(|p| p.parse().ok()).collect()
}

/// The top-level modules that a source file's top-level `import x.y` and
/// `from x import …` statements name (relative ones skipped), each once;
/// lines inside triple-quoted strings skipped.
fn imports(source: &str) -> Vec<String> {
    let mut modules: Vec<String> = Vec::new();
    let mut in_string: Option<&str> = None;
    for line in source.lines() {
        let starts_in_string = in_string.is_some();
        for quote in ["\"\"\"", "'''"] {
            let count = line.matches(quote).count();
            if count % 2 == 1 && in_string.is_none_or(|q| q == quote) {
                in_string = if in_string.is_some() {
                    None
                } else {
                    Some(quote)
                };
            }
        }
        if starts_in_string || line.starts_with(char::is_whitespace) {
            continue;
        }
        let code = line.split('#').next().unwrap_or(line);
        for statement in code.split(';').map(str::trim) {
            let names: Vec<&str> = if let Some(rest) = statement.strip_prefix("import ") {
                rest.split(',').collect()
            } else if let Some(rest) = statement.strip_prefix("from ") {
                vec![rest.split_whitespace().next().unwrap_or("")]
            } else {
                continue;
            };
            for name in names {
                let name = name.split_whitespace().next().unwrap_or("");
                let top = name.split('.').next().unwrap_or("");
                let valid = !top.is_empty()
                    && !top.starts_with(|c: char| c.is_ascii_digit())
                    && top.chars().all(|c| c.is_alphanumeric() || c == '_');
                if valid && !modules.iter().any(|m| m == top) {
                    modules.push(top.to_owned());
                }
            }
        }
    }
    modules
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::augur::tests::write;
    use std::os::unix::fs::{PermissionsExt, symlink};

    /// A fake interpreter installed under `prefix`: `bin/python3.11`, a
    /// standard library with `os.py`, and an empty site-packages.
    fn fake_python(prefix: &Path) -> PathBuf {
        let python = prefix.join("bin/python3.11");
        write(&python, "");
        std::fs::set_permissions(&python, std::fs::Permissions::from_mode(0o755)).unwrap();
        write(&prefix.join("lib/python3.11/os.py"), "");
        write(&prefix.join("lib/python3.11/json/__init__.py"), "");
        write(
            &prefix.join("lib/python3.11/lib-dynload/_ssl.cpython-311-x86_64-linux-gnu.so"),
            "",
        );
        std::fs::create_dir_all(prefix.join("lib/python3.11/site-packages")).unwrap();
        python
    }

    fn program(dir: &Path, exec: &Path) -> Program {
        Program {
            dir: Some(dir.to_path_buf()),
            exec: exec.display().to_string(),
            params: vec!["app.py".to_owned()],
            // Nothing of the machine's own Python.
            env: vec![
                ("PATH".to_owned(), String::new()),
                ("HOME".to_owned(), "/nonexistent".to_owned()),
            ],
        }
    }

    #[test]
    fn requirements_are_pep_508_names_with_includes_inside_the_project() {
        let dir = tempfile::tempdir().unwrap();
        let project = dir.path().join("app");
        write(
            &project.join("requirements.txt"),
            "# the web part\n\
             --index-url https://pypi.example/simple\n\
             -e .\n\
             Flask[async]>=2.0,<3 ; python_version >= \"3.8\"\n\
             requests==2.31.0 \\\n    --hash=sha256:abc\n\
             pywin32 ; sys_platform == 'win32'\n\
             uvloop; platform_system != \"Windows\" and implementation_name == 'cpython'\n\
             odd ; platform_release > '5'\n\
             mypkg @ https://example.com/mypkg-1.0.tar.gz ; os_name == 'posix'\n\
             git+https://github.com/example/dep.git#egg=git_dep\n\
             https://example.com/no-name.tar.gz\n\
             ./local/wheel-1.0-py3-none-any.whl\n\
             -r more/dev.txt\n\
             -c constraints.txt\n\
             -r ../outside.txt\n",
        );
        write(
            &project.join("more/dev.txt"),
            "pytest  # tests\n-r ../requirements.txt\n",
        );
        write(&project.join("constraints.txt"), "only-pinned==1.0\n");
        write(&dir.path().join("outside.txt"), "not-ours\n");
        let mut declared = Vec::new();
        requirements(
            &project.join("requirements.txt"),
            &project.canonicalize().unwrap(),
            INCLUDE_DEPTH,
            &mut HashSet::new(),
            &mut declared,
        );
        let names: Vec<&str> = declared.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "Flask", "requests", "pywin32", "uvloop", "odd", "mypkg", "git_dep", "pytest"
            ]
        );
        let markers = Markers {
            python_version: Some("3.11".to_owned()),
        };
        let evaluated: Vec<Option<bool>> = declared
            .iter()
            .filter_map(|(_, m)| m.as_deref())
            .map(|m| markers.evaluate(m))
            .collect();
        assert_eq!(
            evaluated,
            [Some(true), Some(false), Some(true), None, Some(true)]
        );
        assert_eq!(
            Markers {
                python_version: Some("3.7".to_owned())
            }
            .evaluate("python_version >= \"3.8\""),
            Some(false)
        );
    }

    #[test]
    fn a_requirement_is_installed_in_a_project_venv_or_the_interpreters_site_packages() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base");
        let python = fake_python(&base);
        write(
            &base.join("lib/python3.11/site-packages/Apm_Augur_Base_Only-6.0.dist-info/METADATA"),
            "",
        );
        let project = dir.path().join("app");
        write(
            &project.join("requirements.txt"),
            "flask\nrequests\napm-augur.base-only\ntyping-extensions\nZope.Interface\nabsent-package\n",
        );
        // A venv whose python links to the base interpreter.
        let venv = project.join(".venv");
        write(
            &venv.join("pyvenv.cfg"),
            &format!("home = {}\nversion = 3.11.7\n", base.join("bin").display()),
        );
        std::fs::create_dir_all(venv.join("bin")).unwrap();
        symlink(&python, venv.join("bin/python")).unwrap();
        let site = venv.join("lib/python3.11/site-packages");
        write(&site.join("Flask-3.0.0.dist-info/METADATA"), "");
        write(&site.join("requests.egg-info/PKG-INFO"), "");
        write(&site.join("typing_extensions-4.9.0.dist-info/METADATA"), "");
        write(&site.join("zope.interface-6.1.dist-info/METADATA"), "");

        // Run by the venv's python: its site-packages, not the base's
        // (include-system-site-packages is off).
        let by_venv = Environment::of(&program(&project, &venv.join("bin/python")));
        assert_eq!(
            by_venv.missing_requirements(&project.join("requirements.txt"), &project),
            ["apm-augur.base-only", "absent-package"]
        );
        assert_eq!(by_venv.pip(), venv.join("bin/pip").display().to_string());
        assert_eq!(by_venv.version.as_deref(), Some("3.11"));

        // Run by the base interpreter, without the venv in the project.
        std::fs::remove_dir_all(&venv).unwrap();
        let by_base = Environment::of(&program(&project, &python));
        assert_eq!(
            by_base.missing_requirements(&project.join("requirements.txt"), &project),
            [
                "flask",
                "requests",
                "typing-extensions",
                "Zope.Interface",
                "absent-package"
            ]
        );
        assert_eq!(by_base.pip(), "pip");
    }

    #[test]
    fn imports_are_found_in_the_project_the_stdlib_site_packages_and_builtins() {
        let dir = tempfile::tempdir().unwrap();
        let python = fake_python(&dir.path().join("prefix"));
        let site = dir.path().join("prefix/lib/python3.11/site-packages");
        write(&site.join("numpy/__init__.py"), "");
        write(
            &site.join("_cffi_backend.cpython-311-x86_64-linux-gnu.so"),
            "",
        );
        write(&site.join("six.py"), "");
        write(
            &site.join("extra.pth"),
            &format!(
                "# a comment\nimport sys\n{}\n",
                dir.path().join("added").display()
            ),
        );
        write(&dir.path().join("added/fromtheph/__init__.py"), "");
        let project = dir.path().join("app");
        write(&project.join("helpers.py"), "");
        std::fs::create_dir_all(project.join("models")).unwrap();
        let source = "\"\"\"Usage:\nimport not_code\n\"\"\"\n\
                      from __future__ import annotations\n\
                      import os, sys as system\n\
                      import json.decoder\n\
                      import _ssl, math, itertools\n\
                      from . import sibling\n\
                      from .models import User\n\
                      import helpers; import models\n\
                      import numpy as np\n\
                      import six, _cffi_backend, fromtheph\n\
                      from flask import Flask  # the web part\n\
                      try:\n    import ujson\nexcept ImportError:\n    pass\n\
                      import absent_one\n";
        write(&project.join("app.py"), source);
        write(&dir.path().join("prefix/lib/python3.11/__future__.py"), "");
        let environment = Environment::of(&program(&project, &python));
        assert_eq!(
            environment.missing_imports(source, &project.join("app.py")),
            Some(vec!["flask".to_owned(), "absent_one".to_owned()])
        );
        let changes_its_path = format!("import sys\nsys.path.insert(0, 'lib')\n{source}");
        assert_eq!(
            environment.missing_imports(&changes_its_path, &project.join("app.py")),
            None
        );
        // Without a standard library found, nothing is claimed.
        let lost = Environment::of(&program(&project, Path::new("/nonexistent/python3")));
        assert_eq!(lost.missing_imports(source, &project.join("app.py")), None);
    }

    #[test]
    fn the_machines_pythons_find_their_standard_library() {
        let dir = tempfile::tempdir().unwrap();
        let source = "import os\nimport sys\nimport json\nimport time\nimport itertools\n\
                      import collections\nimport asyncio\nimport apm_augur_surely_absent\n";
        write(&dir.path().join("app.py"), source);
        // The one in PATH (here a pyenv shim) and Debian's.
        let pythons: Vec<Program> = ["python3", "/usr/bin/python3"]
            .into_iter()
            .map(|exec| Program {
                dir: Some(dir.path().to_path_buf()),
                exec: exec.to_owned(),
                ..Program::default()
            })
            .filter(|program| program.which(&program.exec).is_some())
            .collect();
        if pythons.is_empty() {
            eprintln!("skipped: no python3 in PATH");
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("python3 is a prerequisite under CI");
            }
        }
        for program in pythons {
            let environment = Environment::of(&program);
            assert_eq!(
                environment.missing_imports(source, &dir.path().join("app.py")),
                Some(vec!["apm_augur_surely_absent".to_owned()]),
                "{}: {environment:?}",
                program.exec
            );
        }
    }

    #[test]
    fn a_pyenv_shim_runs_the_version_the_project_chooses() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("pyenv");
        write(
            &root.join("shims/python3"),
            "#!/usr/bin/env bash\nexec pyenv exec python3\n",
        );
        write(&root.join("version"), "3.12.1\n");
        for version in ["3.11.7", "3.12.1"] {
            let python = fake_python(&root.join("versions").join(version));
            symlink(&python, python.with_file_name("python3")).unwrap();
        }
        let project = dir.path().join("app");
        write(&project.join(".python-version"), "3.11.7\n");
        let mut program = Program {
            dir: Some(project.clone()),
            // Empty is unset, whatever the test's own environment says.
            env: vec![("PYENV_VERSION".to_owned(), String::new())],
            ..Program::default()
        };
        let shim = root.join("shims/python3");
        let real = pyenv_shim(&program, &shim).unwrap();
        assert_eq!(real, root.join("versions/3.11.7/bin/python3"));
        let mut environment = Environment::default();
        environment.add_interpreter(&program, &shim);
        assert_eq!(
            environment.stdlib[1],
            root.join("versions/3.11.7/lib/python3.11")
        );
        program
            .env
            .push(("PYENV_VERSION".to_owned(), "3.12.1".to_owned()));
        assert_eq!(
            pyenv_shim(&program, &shim).unwrap(),
            root.join("versions/3.12.1/bin/python3")
        );
    }
}
