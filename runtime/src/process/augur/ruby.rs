//! Ruby: the gems a `Gemfile` declares against the gem directories.

use std::path::{Path, PathBuf};

use super::read_text;

/// The gem directories of a system: `gem install` as root on Debian
/// (`/var/lib/gems/3.1.0`), the gems that come with Ruby
/// (`/usr/lib/ruby/gems/3.1.0`, its default gems in
/// `specifications/default`), a Ruby built from source (`/usr/local`),
/// and Debian's packaged gems (`ruby-rack` ships
/// `/usr/share/rubygems-integration/all/specifications/rack-2.2.22.gemspec`,
/// `ruby-nokogiri` the same under
/// `/usr/lib/x86_64-linux-gnu/rubygems-integration/3.1.0`).
const SYSTEM_GEM_HOMES: &[&str] = &[
    "/var/lib/gems/*",
    "/usr/lib/ruby/gems/*",
    "/usr/local/lib/ruby/gems/*",
    "/usr/share/rubygems-integration/all",
    "/usr/lib/*/rubygems-integration/*",
];

/// The gems of the `Gemfile` in `dir` that no gem directory has: at the
/// version its `Gemfile.lock` resolved, when there is one, else any.
pub(super) fn missing_gems(dir: &Path) -> Vec<String> {
    let Some(gemfile) = read_text(&dir.join("Gemfile")) else {
        return Vec::new();
    };
    let lock = read_text(&dir.join("Gemfile.lock")).unwrap_or_default();
    let locked = locked_versions(&lock);
    let mut homes: Vec<PathBuf> = bundle_paths(dir)
        .iter()
        .flat_map(|path| expand(&path.join("ruby/*")))
        .collect();
    homes.extend(
        SYSTEM_GEM_HOMES
            .iter()
            .flat_map(|home| expand(Path::new(home))),
    );
    let installed: Vec<String> = homes
        .iter()
        .flat_map(|home| {
            ["specifications", "specifications/default", "gems"].map(|sub| home.join(sub))
        })
        .flat_map(|dir| {
            std::fs::read_dir(dir)
                .into_iter()
                .flatten()
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
        })
        .collect();
    declared_gems(&gemfile)
        .into_iter()
        .filter(|gem| {
            let version = locked
                .iter()
                .find(|(name, _)| name == gem)
                .map(|(_, version)| version.as_str());
            !installed
                .iter()
                .any(|entry| is_installed(entry, gem, version))
        })
        .collect()
}

/// Whether a `specifications/` or `gems/` entry (`rack-2.2.22.gemspec`,
/// `nokogiri-1.15.0-x86_64-linux`) is gem `name`, at `version` if given.
fn is_installed(entry: &str, name: &str, version: Option<&str>) -> bool {
    let entry = entry.strip_suffix(".gemspec").unwrap_or(entry);
    let Some(installed) = entry
        .strip_prefix(name)
        .and_then(|rest| rest.strip_prefix('-'))
        // `rack-test-2.0` is not a version of `rack`.
        .filter(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
    else {
        return false;
    };
    version
        .is_none_or(|version| installed == version || installed.starts_with(&format!("{version}-")))
}

/// Where bundler installs the project's gems: `vendor/bundle`, and the
/// `BUNDLE_PATH` of its `.bundle/config`.
fn bundle_paths(dir: &Path) -> Vec<PathBuf> {
    let mut paths = vec![dir.join("vendor/bundle")];
    let config = read_text(&dir.join(".bundle/config")).unwrap_or_default();
    paths.extend(config.lines().find_map(|line| {
        let value = line.trim().strip_prefix("BUNDLE_PATH:")?;
        let value = value.trim().trim_matches(['"', '\'']);
        (!value.is_empty()).then(|| dir.join(value))
    }));
    paths
}

/// A path whose components may be `*`, as the directories it names.
fn expand(pattern: &Path) -> Vec<PathBuf> {
    let mut found = vec![PathBuf::from("/")];
    for component in pattern.components() {
        let part = component.as_os_str();
        found = if part == "*" {
            found
                .iter()
                .flat_map(|dir| std::fs::read_dir(dir).into_iter().flatten())
                .filter_map(|e| Some(e.ok()?.path()))
                .filter(|p| p.is_dir())
                .collect()
        } else {
            found
                .iter()
                .map(|dir| dir.join(part))
                .filter(|p| p.exists())
                .collect()
        };
    }
    found
}

/// The gems a Gemfile declares with `gem 'name'`, each once; not those
/// taken from a `path:` or a git repository (bundler keeps them elsewhere),
/// only for another platform (`platforms: :windows`, a `platforms :jruby
/// do` block) or under a condition (`install_if … do`).
fn declared_gems(gemfile: &str) -> Vec<String> {
    const OTHER_PLATFORMS: &[&str] = &[
        "mingw",
        "mswin",
        "windows",
        "jruby",
        "truffleruby",
        "x64_mingw",
    ];
    let elsewhere = |line: &str| {
        let other_platform =
            line.contains("platform") && OTHER_PLATFORMS.iter().any(|p| line.contains(p));
        other_platform
            || ["path:", "git:", "github:", ":path =>", ":git =>"]
                .iter()
                .any(|o| line.contains(o))
    };
    let mut names: Vec<String> = Vec::new();
    // The depth of `do … end` blocks, and the depth at which a block for
    // another platform began.
    let mut depth = 0usize;
    let mut skipping: Option<usize> = None;
    for line in gemfile.lines() {
        let line = line.split(" #").next().unwrap_or(line).trim();
        if line.starts_with('#') {
            continue;
        }
        if line == "end" {
            depth = depth.saturating_sub(1);
            if skipping == Some(depth) {
                skipping = None;
            }
            continue;
        }
        if line.ends_with(" do") || line.contains(" do |") {
            // `install_if` runs a condition augur cannot evaluate.
            let conditional =
                line.starts_with("install_if") || line.starts_with("platform") && elsewhere(line);
            if skipping.is_none() && conditional {
                skipping = Some(depth);
            }
            depth += 1;
            continue;
        }
        let Some(rest) = line
            .strip_prefix("gem ")
            .or_else(|| line.strip_prefix("gem("))
        else {
            continue;
        };
        if skipping.is_some() || elsewhere(rest) {
            continue;
        }
        let rest = rest.trim_start();
        let Some(quote) = rest.chars().next().filter(|c| *c == '\'' || *c == '"') else {
            continue;
        };
        let Some(name) = rest[1..].split(quote).next().filter(|n| {
            !n.is_empty()
                && n.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        }) else {
            continue;
        };
        if !names.iter().any(|n| n == name) {
            names.push(name.to_owned());
        }
    }
    names
}

/// The versions `Gemfile.lock` resolved from gem servers: its `GEM`
/// section's `specs:`, `    name (version)`, without the platform of a
/// build (`1.15.0-x86_64-linux`, beside other platforms' entries).
fn locked_versions(lock: &str) -> Vec<(String, String)> {
    let mut versions = Vec::new();
    let mut section = "";
    for line in lock.lines() {
        if !line.starts_with(' ') {
            section = line.trim();
            continue;
        }
        // Four spaces: a spec; six: one of its dependencies.
        if section != "GEM" || !line.starts_with("    ") || line.starts_with("     ") {
            continue;
        }
        let Some((name, version)) = line.trim().split_once(" (") else {
            continue;
        };
        let version = version.trim_end_matches(')');
        let version = version.split('-').next().unwrap_or(version);
        if !versions.iter().any(|(n, _): &(String, String)| n == name) {
            versions.push((name.to_owned(), version.to_owned()));
        }
    }
    versions
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::augur::tests::write;

    const GEMFILE: &str = r#"source 'https://rubygems.org'
ruby '3.1.2'

gem 'sinatra', '~> 3.0'
gem "rack", require: false   # the server interface
gem 'nokogiri'
# gem 'commented-out'
gem 'local_gem', path: 'vendor/local_gem'
gem 'from_git', git: 'https://github.com/example/from_git.git'
gem 'wdm', platforms: [:mingw, :x64_mingw]
gem 'puma'
gem 'sinatra'

group :development, :test do
  gem 'rspec'
end

platforms :jruby do
  gem 'jruby-openssl'
end

install_if -> { RUBY_PLATFORM =~ /darwin/ } do
  gem 'rb-fsevent'
end
gem 'after-blocks'
"#;

    const LOCK: &str = "GEM
  remote: https://rubygems.org/
  specs:
    mustermann (3.0.0)
      ruby2_keywords (~> 0.0.1)
    nokogiri (1.15.0-arm64-darwin)
    nokogiri (1.15.0-x86_64-linux)
    rack (2.2.8)
    rspec (3.12.0)
    sinatra (3.1.0)
      mustermann (~> 3.0)

PLATFORMS
  x86_64-linux

DEPENDENCIES
  rack
  sinatra (~> 3.0)
";

    #[test]
    fn a_gemfile_declares_the_gems_bundler_installs_here() {
        assert_eq!(
            declared_gems(GEMFILE),
            [
                "sinatra",
                "rack",
                "nokogiri",
                "puma",
                "rspec",
                "after-blocks"
            ]
        );
        assert_eq!(
            locked_versions(LOCK),
            [
                ("mustermann", "3.0.0"),
                ("nokogiri", "1.15.0"),
                ("rack", "2.2.8"),
                ("rspec", "3.12.0"),
                ("sinatra", "3.1.0"),
            ]
            .map(|(n, v)| (n.to_owned(), v.to_owned()))
        );
    }

    #[test]
    fn a_gem_is_installed_at_its_locked_version_in_a_bundle_path() {
        let dir = tempfile::tempdir().unwrap();
        let project = dir.path();
        write(&project.join("Gemfile"), GEMFILE);
        let vendored = project.join("vendor/bundle/ruby/3.1.0");
        write(&vendored.join("specifications/sinatra-3.1.0.gemspec"), "");
        write(
            &vendored.join("specifications/after-blocks-1.0.gemspec"),
            "",
        );
        // A gem whose name extends rack's.
        write(&vendored.join("specifications/rack-test-2.1.0.gemspec"), "");
        std::fs::create_dir_all(vendored.join("gems/nokogiri-1.15.0-x86_64-linux")).unwrap();
        // bundler's configured path.
        write(
            &project.join(".bundle/config"),
            "---\nBUNDLE_PATH: \"gems_here\"\n",
        );
        write(
            &project.join("gems_here/ruby/3.1.0/specifications/puma-6.4.0.gemspec"),
            "",
        );
        assert_eq!(missing_gems(project), ["rack", "rspec"]);
        // Without a lock, any version will do; with one, its version.
        write(&vendored.join("specifications/rack-2.2.7.gemspec"), "");
        assert_eq!(missing_gems(project), ["rspec"]);
        write(&project.join("Gemfile.lock"), LOCK);
        assert_eq!(missing_gems(project), ["rack", "rspec"]);
        write(&vendored.join("specifications/rack-2.2.8.gemspec"), "");
        assert_eq!(missing_gems(project), ["rspec"]);
    }
}
