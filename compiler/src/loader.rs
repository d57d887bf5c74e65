//! The compiler's only door to the outside world. Everything the compiler
//! reads (files, directory listings for globs, environment variables, the
//! user database) goes through a `SourceLoader`, so tests compile in-memory
//! files and a daemon can compile with its own environment.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::path::{Path, PathBuf};

pub trait SourceLoader {
    fn read(&self, path: &Path) -> io::Result<Vec<u8>>;
    /// The entries of a directory, with whether each is a directory itself.
    fn list_dir(&self, dir: &Path) -> io::Result<Vec<(PathBuf, bool)>>;
    fn env_var(&self, name: &str) -> Option<String>;
    /// Whether an OS account exists; `None` when that cannot be told.
    fn user_exists(&self, name: &str) -> Option<bool>;
}

/// The real file system and process environment.
#[derive(Debug, Default, Clone, Copy)]
pub struct FsLoader;

impl SourceLoader for FsLoader {
    /// A file over `MAX_BYTES` is refused unread: the config could not
    /// hold it anyway, and reading it whole could take all memory.
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        use std::io::Read as _;
        let limit = crate::include::MAX_BYTES;
        let mut bytes = Vec::new();
        std::fs::File::open(path)?
            .take(limit as u64 + 1)
            .read_to_end(&mut bytes)?;
        if bytes.len() > limit {
            return Err(io::Error::new(
                io::ErrorKind::FileTooLarge,
                format!(
                    "the file is over {} MiB, more than a config may hold",
                    limit / (1024 * 1024)
                ),
            ));
        }
        Ok(bytes)
    }

    fn list_dir(&self, dir: &Path) -> io::Result<Vec<(PathBuf, bool)>> {
        std::fs::read_dir(dir)?
            .map(|entry| {
                let entry = entry?;
                // Follow symlinks, as `include` does when it reads the file.
                let is_dir = std::fs::metadata(entry.path())
                    .map(|m| m.is_dir())
                    .unwrap_or(false);
                Ok((entry.path(), is_dir))
            })
            .collect()
    }

    fn env_var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }

    fn user_exists(&self, name: &str) -> Option<bool> {
        match nix::unistd::User::from_name(name) {
            Ok(found) => Some(found.is_some()),
            Err(_) => None,
        }
    }
}

/// Files, environment and users held in memory, for tests and fuzzing.
#[derive(Debug, Default, Clone)]
pub struct MemLoader {
    files: BTreeMap<PathBuf, Vec<u8>>,
    env: HashMap<String, String>,
    users: BTreeSet<String>,
}

impl MemLoader {
    pub fn new() -> MemLoader {
        MemLoader::default()
    }

    pub fn file(mut self, path: impl Into<PathBuf>, contents: impl Into<Vec<u8>>) -> MemLoader {
        self.add_file(path, contents);
        self
    }

    pub fn add_file(&mut self, path: impl Into<PathBuf>, contents: impl Into<Vec<u8>>) {
        self.files.insert(path.into(), contents.into());
    }

    pub fn env(mut self, name: &str, value: &str) -> MemLoader {
        self.env.insert(name.to_owned(), value.to_owned());
        self
    }

    pub fn user(mut self, name: &str) -> MemLoader {
        self.users.insert(name.to_owned());
        self
    }
}

impl SourceLoader for MemLoader {
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        if let Some(contents) = self.files.get(path) {
            return Ok(contents.clone());
        }
        if self.files.keys().any(|p| p.starts_with(path)) {
            return Err(io::Error::new(
                io::ErrorKind::IsADirectory,
                "is a directory",
            ));
        }
        Err(io::Error::new(
            io::ErrorKind::NotFound,
            "No such file or directory (os error 2)",
        ))
    }

    fn list_dir(&self, dir: &Path) -> io::Result<Vec<(PathBuf, bool)>> {
        let mut entries = BTreeMap::new();
        for path in self.files.keys() {
            if let Ok(rest) = path.strip_prefix(dir) {
                let mut components = rest.components();
                if let Some(first) = components.next() {
                    entries.insert(dir.join(first), components.next().is_some());
                }
            }
        }
        if entries.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "No such file or directory (os error 2)",
            ));
        }
        Ok(entries.into_iter().collect())
    }

    fn env_var(&self, name: &str) -> Option<String> {
        self.env.get(name).cloned()
    }

    fn user_exists(&self, name: &str) -> Option<bool> {
        Some(self.users.contains(name))
    }
}

/// One file held in memory in front of another loader: how the CLI compiles
/// the `worker { }` block it builds from flags, while paths, users and the
/// environment are the real ones.
pub struct Overlay<'a> {
    pub path: PathBuf,
    pub contents: String,
    pub inner: &'a dyn SourceLoader,
}

impl SourceLoader for Overlay<'_> {
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        if path == self.path {
            Ok(self.contents.clone().into_bytes())
        } else {
            self.inner.read(path)
        }
    }

    fn list_dir(&self, dir: &Path) -> io::Result<Vec<(PathBuf, bool)>> {
        self.inner.list_dir(dir)
    }

    fn env_var(&self, name: &str) -> Option<String> {
        self.inner.env_var(name)
    }

    fn user_exists(&self, name: &str) -> Option<bool> {
        self.inner.user_exists(name)
    }
}
