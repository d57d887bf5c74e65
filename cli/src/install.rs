//! `apm install` and `apm uninstall`: the binary in place, the service
//! registered with the init system, `/etc/apm/apm.conf`, the daemon log, the
//! Cloudflare address lists, and a manifest of what was created so that
//! uninstalling removes exactly that (docs/cli.md, decisions 86-90).
//!
//! Every path is written under a root (`--root`, default `/`) without
//! following a symbolic link on the way: a link planted at a target path or
//! at a directory above it is refused, never written through.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use crate::exit;

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Init {
    Systemd,
    Openrc,
    Sysv,
}

pub struct Options {
    pub user: bool,
    pub root: Option<PathBuf>,
    pub init: Option<Init>,
    pub refresh_ips: bool,
}

/// The date of the Cloudflare lists compiled in, as published at
/// https://www.cloudflare.com/ips-v4 and /ips-v6.
const SHIPPED_IPS_DATE: &str = "2025-06";
const CLOUDFLARE_V4: &str = "173.245.48.0/20 103.21.244.0/22 103.22.200.0/22 103.31.4.0/22 \
141.101.64.0/18 108.162.192.0/18 190.93.240.0/20 188.114.96.0/20 197.234.240.0/22 198.41.128.0/17 \
162.158.0.0/15 104.16.0.0/13 104.24.0.0/14 172.64.0.0/13 131.0.72.0/22";
const CLOUDFLARE_V6: &str = "2400:cb00::/32 2606:4700::/32 2803:f800::/32 2405:b500::/32 \
2405:8100::/32 2a06:98c0::/29 2c0f:f248::/32";

/// What the manifest records of each path, and so what uninstall does.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Removed by uninstall.
    File,
    /// Removed by uninstall when empty.
    Dir,
    /// The user's to edit: removed only with `--purge`.
    Config,
    /// A directory of the user's configs or of the daemon's state: removed,
    /// with what it holds, only with `--purge`.
    DataDir,
}

impl Kind {
    fn word(self) -> &'static str {
        match self {
            Kind::File => "file",
            Kind::Dir => "dir",
            Kind::Config => "config",
            Kind::DataDir => "data",
        }
    }

    fn from_word(word: &str) -> Option<Kind> {
        [Kind::File, Kind::Dir, Kind::Config, Kind::DataDir]
            .into_iter()
            .find(|kind| kind.word() == word)
    }
}

/// Where things go, relative to the root.
struct Layout {
    binary: String,
    home: String,
    manifest: String,
    config: String,
    config_dir: String,
    log: String,
    /// The daemon's directories, outermost first, before `home`.
    parents: Vec<String>,
}

impl Layout {
    fn system() -> Layout {
        Layout {
            binary: "usr/sbin/apm".into(),
            home: "var/lib/apm".into(),
            manifest: "var/lib/apm/install.manifest".into(),
            config: "etc/apm/apm.conf".into(),
            config_dir: "etc/apm/apm.conf.d".into(),
            log: "var/log/apm.log".into(),
            parents: vec![],
        }
    }

    /// A user's install lives in their home: the daemon's own directory is
    /// `~/.apm`, which it loads `config.conf` from already.
    fn user(home: &str) -> Layout {
        let home = home.trim_start_matches('/');
        Layout {
            binary: format!("{home}/.local/bin/apm"),
            home: format!("{home}/.apm"),
            manifest: format!("{home}/.apm/install.manifest"),
            config: format!("{home}/.apm/config.conf"),
            config_dir: format!("{home}/.apm/apm.conf.d"),
            log: format!("{home}/.apm/apm.log"),
            parents: vec![format!("{home}/.local"), format!("{home}/.local/bin")],
        }
    }
}

/// The tree under the root, written without following links, and what was
/// created in it.
struct Tree {
    root: PathBuf,
    created: Vec<(Kind, String)>,
    /// What changed, one line each.
    said: Vec<String>,
    /// What the user should know that changed nothing.
    notes: Vec<String>,
}

impl Tree {
    fn path(&self, relative: &str) -> PathBuf {
        self.root.join(relative)
    }

    /// Refuses a relative path that climbs, and any symbolic link between
    /// the root and the path itself included.
    fn no_links(&self, relative: &str) -> Result<PathBuf, String> {
        let mut at = self.root.clone();
        for component in Path::new(relative).components() {
            let Component::Normal(part) = component else {
                return Err(format!(
                    "refusing the path `{relative}`: it must stay under the root"
                ));
            };
            at.push(part);
            match std::fs::symlink_metadata(&at) {
                Ok(meta) if meta.file_type().is_symlink() => {
                    return Err(format!(
                        "refusing to write through {}: it is a symbolic link (remove it, or install elsewhere)",
                        at.display()
                    ));
                }
                _ => {}
            }
        }
        Ok(at)
    }

    fn record(&mut self, kind: Kind, relative: &str) {
        if !self.created.iter().any(|(_, path)| path == relative) {
            self.created.push((kind, relative.to_owned()));
        }
    }

    /// A directory and those above it that are missing; the ones made here
    /// are recorded as `kind`.
    fn dir(&mut self, relative: &str, mode: u32, kind: Kind) -> Result<(), String> {
        let mut so_far = String::new();
        for part in relative.split('/').filter(|p| !p.is_empty()) {
            if !so_far.is_empty() {
                so_far.push('/');
            }
            so_far.push_str(part);
            let at = self.no_links(&so_far)?;
            if at.is_dir() {
                continue;
            }
            let is_last = so_far.len() == relative.trim_matches('/').len();
            std::fs::DirBuilder::new()
                .mode(if is_last { mode } else { 0o755 })
                .create(&at)
                .map_err(|e| format!("cannot create {}: {e}", at.display()))?;
            // The umask must not loosen or tighten what was asked for.
            let _ = std::fs::set_permissions(
                &at,
                std::fs::Permissions::from_mode(if is_last { mode } else { 0o755 }),
            );
            self.record(if is_last { kind } else { Kind::Dir }, &so_far);
            self.said.push(format!("created {}/", at.display()));
        }
        Ok(())
    }

    /// Writes a file unless it holds `content` with `mode` already; an
    /// existing config (`Kind::Config`) is the user's and is never replaced.
    fn file(
        &mut self,
        relative: &str,
        content: &[u8],
        mode: u32,
        kind: Kind,
    ) -> Result<(), String> {
        if let Some(parent) = Path::new(relative).parent() {
            self.dir(&parent.to_string_lossy(), 0o755, Kind::Dir)?;
        }
        let at = self.no_links(relative)?;
        let existing = std::fs::symlink_metadata(&at).ok();
        if let Some(meta) = &existing {
            if !meta.is_file() {
                return Err(format!(
                    "refusing to replace {}: it is not a regular file",
                    at.display()
                ));
            }
            if kind == Kind::Config {
                if !self.created.iter().any(|(_, path)| path == relative) {
                    self.notes.push(format!("kept {} (yours)", at.display()));
                }
                return Ok(());
            }
            let same = meta.permissions().mode() & 0o7777 == mode
                && meta.len() == content.len() as u64
                && std::fs::read(&at).is_ok_and(|old| old == content);
            if same {
                return Ok(());
            }
        }
        write_new(&at, content, mode).map_err(|e| format!("cannot write {}: {e}", at.display()))?;
        self.record(kind, relative);
        self.said.push(format!(
            "{} {}",
            if existing.is_some() {
                "updated"
            } else {
                "wrote"
            },
            at.display()
        ));
        Ok(())
    }

    /// A symbolic link that enables the service, as `systemctl enable`,
    /// `rc-update add` and `update-rc.d` make them.
    fn link(&mut self, relative: &str, points_to: &str) -> Result<(), String> {
        if let Some(parent) = Path::new(relative).parent() {
            self.dir(&parent.to_string_lossy(), 0o755, Kind::Dir)?;
        }
        let parent = self.no_links(
            &Path::new(relative)
                .parent()
                .unwrap_or(Path::new(""))
                .to_string_lossy(),
        )?;
        let at = parent.join(Path::new(relative).file_name().unwrap_or_default());
        match std::fs::symlink_metadata(&at) {
            Ok(meta) if meta.file_type().is_symlink() => {
                if std::fs::read_link(&at).is_ok_and(|target| target == Path::new(points_to)) {
                    return Ok(());
                }
                return Err(format!(
                    "refusing to replace {}: a link elsewhere is there already",
                    at.display()
                ));
            }
            Ok(_) => {
                return Err(format!(
                    "refusing to replace {}: it is not a link",
                    at.display()
                ));
            }
            Err(_) => {}
        }
        std::os::unix::fs::symlink(points_to, &at)
            .map_err(|e| format!("cannot link {}: {e}", at.display()))?;
        self.record(Kind::File, relative);
        self.said
            .push(format!("linked {} -> {points_to}", at.display()));
        Ok(())
    }
}

/// A new file beside `at`, created exclusively and without following a
/// link, filled, synced and renamed over `at` (a rename replaces a link
/// itself, never what it points to).
fn write_new(at: &Path, content: &[u8], mode: u32) -> std::io::Result<()> {
    let name = at.file_name().unwrap_or_default().to_string_lossy();
    let temp = at.with_file_name(format!(".{name}.apm-install-{}", std::process::id()));
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&temp)?;
        file.write_all(content)?;
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        file.sync_all()?;
        std::fs::rename(&temp, at)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result
}

fn detect(root: &Path) -> Init {
    if root.join("run/systemd/system").is_dir() {
        Init::Systemd
    } else if root.join("run/openrc").is_dir() || root.join("sbin/openrc-run").exists() {
        Init::Openrc
    } else {
        Init::Sysv
    }
}

fn read_manifest(tree: &Tree, layout: &Layout) -> Result<Vec<(Kind, String)>, String> {
    let at = tree.no_links(&layout.manifest)?;
    let Ok(text) = std::fs::read_to_string(&at) else {
        return Ok(Vec::new());
    };
    let mut entries = Vec::new();
    for (number, line) in text.lines().enumerate() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let entry = line
            .split_once(' ')
            .and_then(|(word, path)| Some((Kind::from_word(word)?, path.to_owned())))
            .filter(|(_, path)| {
                Path::new(path)
                    .components()
                    .all(|c| matches!(c, Component::Normal(_)))
            })
            .ok_or_else(|| {
                format!(
                    "{}:{}: not a manifest line (`KIND PATH`, a relative path); fix or remove it",
                    at.display(),
                    number + 1
                )
            })?;
        entries.push(entry);
    }
    Ok(entries)
}

fn manifest_text(entries: &[(Kind, String)]) -> String {
    let mut text = String::from(
        "# What `apm install` created, relative to its root; `apm uninstall` removes it.\n",
    );
    for (kind, path) in entries {
        text.push_str(&format!("{} {path}\n", kind.word()));
    }
    text
}

fn cidr_lines(key: &str, list: &str, date: &str, source: &str) -> String {
    let mut text = format!(
        "# Cloudflare's addresses ({source}, {date}), written by `apm install`.\n\
         # Include it where `{key}` may be set; `apm install --refresh-ips` refreshes it.\n"
    );
    for range in list.split_whitespace() {
        text.push_str(&format!("{key} {range};\n"));
    }
    text
}

/// A CIDR range or address, as the config's `Cidr` values take them.
fn is_cidr(text: &str) -> bool {
    let (address, prefix) = text.split_once('/').unwrap_or((text, "0"));
    match address.parse::<std::net::IpAddr>() {
        Ok(ip) => prefix
            .parse::<u8>()
            .is_ok_and(|p| p <= if ip.is_ipv4() { 32 } else { 128 }),
        Err(_) => false,
    }
}

/// Fresh lists from Cloudflare with `curl`, or why not.
fn fetch_ips() -> Result<(String, String), String> {
    let fetch = |url: &str| -> Result<String, String> {
        let output = std::process::Command::new("curl")
            .args(["-fsS", "--max-time", "10", "--max-filesize", "65536", url])
            .output()
            .map_err(|e| format!("cannot run curl: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "{url}: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        let ranges: Vec<&str> = text.split_whitespace().collect();
        if ranges.is_empty() || !ranges.iter().all(|r| is_cidr(r)) {
            return Err(format!("{url} did not answer a list of address ranges"));
        }
        Ok(ranges.join(" "))
    };
    Ok((
        fetch("https://www.cloudflare.com/ips-v4")?,
        fetch("https://www.cloudflare.com/ips-v6")?,
    ))
}

fn config_text(user: bool) -> String {
    let group = if user {
        "    # allow_group apm;    # members of this group may control the workers\n"
    } else {
        "    allow_group apm;      # members of the `apm` group may control the workers\n"
    };
    format!(
        "# apm's config, loaded when the daemon starts (written by `apm install`;\n\
         # yours to edit: `apm uninstall` keeps it unless --purge).\n\
         # Check it with `apm check {{this file}}`; apply changes with `apm reload --all`.\n\
         \n\
         daemon {{\n\
         {group}\
         }}\n\
         \n\
         # One worker per file, loaded in filename order. Write one with\n\
         # `apm saveconf NAME apm.conf.d/NAME.conf`, or by hand:\n\
         #\n\
         #   worker {{\n\
         #       name    web;\n\
         #       exec    node;\n\
         #       params  /srv/web/server.js;\n\
         #       server  http://0.0.0.0:80;\n\
         #       # Behind Cloudflare: believe its forwarding headers only.\n\
         #       # include /etc/apm/ips/trusted-cloudflare-v4.part;\n\
         #   }}\n\
         include apm.conf.d/*.conf;\n"
    )
}

fn systemd_unit(layout: &Layout, user: bool) -> String {
    let (environment, output, wanted_by) = if user {
        (String::new(), String::new(), "default.target")
    } else {
        (
            format!(
                "Environment=APM_HOME=/{} APM_CONFIG=/{} APM_LOG=/{}\n",
                layout.home, layout.config, layout.log
            ),
            format!(
                "StandardOutput=append:/{log}\nStandardError=append:/{log}\n",
                log = layout.log
            ),
            "multi-user.target",
        )
    };
    let exec = if user {
        "%h/.local/bin/apm".to_owned()
    } else {
        format!("/{}", layout.binary)
    };
    format!(
        "# Written by `apm install`; `apm uninstall` removes it.\n\
         [Unit]\n\
         Description=apm process manager and load balancer\n\
         Documentation=man:apm(1)\n\
         After=network-online.target\n\
         Wants=network-online.target\n\
         \n\
         [Service]\n\
         Type=notify\n\
         NotifyAccess=main\n\
         {environment}\
         ExecStart={exec} daemon --foreground\n\
         ExecReload=/bin/kill -HUP $MAINPID\n\
         {output}\
         # The daemon stops its workers itself on SIGTERM, each with its own\n\
         # kill_timeout; what is left after TimeoutStopSec gets SIGKILL.\n\
         KillMode=mixed\n\
         TimeoutStopSec=90\n\
         WatchdogSec=60\n\
         Restart=on-failure\n\
         RestartSec=1\n\
         \n\
         [Install]\n\
         WantedBy={wanted_by}\n"
    )
}

/// The hard limit of open files that systemd (240 and later) gives every
/// service, which the SysV and OpenRC scripts raise the daemon's to: each
/// proxied client holds two descriptors, so about 260,000 clients. An
/// init script otherwise passes on the kernel's 4,096, about 2,000.
pub(crate) const SERVICE_OPEN_FILES: u64 = 524_288;

/// Shell lines, for a script run as root, that raise the hard limit of
/// open files to `SERVICE_OPEN_FILES` and never lower it. The daemon takes
/// its hard limit as it starts and logs what that allows; its workers get
/// the soft limit the script had.
fn raise_open_files() -> String {
    format!(
        "\t# Each proxied client holds two open files: the daemon takes the hard limit\n\
         \t# (its workers keep the soft one), raised where lower to systemd's for services.\n\
         \topen_files=$(ulimit -H -n)\n\
         \t[ \"$open_files\" = unlimited ] || [ \"$open_files\" -ge {SERVICE_OPEN_FILES} ] ||\n\
         \t\tulimit -H -n {SERVICE_OPEN_FILES} 2>/dev/null\n"
    )
}

fn shell_environment(layout: &Layout) -> String {
    format!(
        "export APM_HOME=/{} APM_CONFIG=/{} APM_LOG=/{}\n",
        layout.home, layout.config, layout.log
    )
}

fn openrc_script(layout: &Layout) -> String {
    format!(
        "#!/sbin/openrc-run\n\
         # apm's service, written by `apm install`; `apm uninstall` removes it.\n\
         description=\"apm process manager and load balancer\"\n\
         command=/{binary}\n\
         command_args=\"daemon --foreground\"\n\
         command_background=true\n\
         pidfile=/run/apm.pid\n\
         output_log=/{log}\n\
         error_log=/{log}\n\
         # SIGTERM: the daemon stops its workers, each within its kill_timeout.\n\
         retry=\"TERM/90/KILL/5\"\n\
         extra_started_commands=\"reload\"\n\
         {environment}\
         \n\
         depend() {{\n\
         \tneed localmount\n\
         \tafter net\n\
         }}\n\
         \n\
         start_pre() {{\n\
         {raise_open_files}\
         \treturn 0\n\
         }}\n\
         \n\
         reload() {{\n\
         \tebegin \"Reloading apm's config files\"\n\
         \tstart-stop-daemon --signal HUP --pidfile \"$pidfile\"\n\
         \teend $?\n\
         }}\n",
        binary = layout.binary,
        log = layout.log,
        environment = shell_environment(layout),
        raise_open_files = raise_open_files(),
    )
}

fn sysv_script(layout: &Layout) -> String {
    format!(
        "#!/bin/sh\n\
         ### BEGIN INIT INFO\n\
         # Provides:          apm\n\
         # Required-Start:    $remote_fs $network $syslog\n\
         # Required-Stop:     $remote_fs $network $syslog\n\
         # Default-Start:     2 3 4 5\n\
         # Default-Stop:      0 1 6\n\
         # Short-Description: apm process manager and load balancer\n\
         # Description:       Starts the apm daemon, which loads /{config}.\n\
         ### END INIT INFO\n\
         # Written by `apm install`; `apm uninstall` removes it.\n\
         \n\
         DAEMON=/{binary}\n\
         LOG=/{log}\n\
         {environment}\
         PIDFILE=\"$APM_HOME/apm.pid\"\n\
         \n\
         running() {{\n\
         \t[ -s \"$PIDFILE\" ] && kill -0 \"$(cat \"$PIDFILE\")\" 2>/dev/null\n\
         }}\n\
         \n\
         case \"$1\" in\n\
         start)\n\
         \trunning && exit 0\n\
         {raise_open_files}\
         \t\"$DAEMON\" daemon --foreground --detach >>\"$LOG\" 2>&1 </dev/null &\n\
         \t;;\n\
         stop)\n\
         \trunning || exit 0\n\
         \t# SIGTERM: the daemon stops its workers, each within its kill_timeout.\n\
         \tkill -TERM \"$(cat \"$PIDFILE\")\"\n\
         \ttries=0\n\
         \twhile running && [ \"$tries\" -lt 90 ]; do sleep 1; tries=$((tries + 1)); done\n\
         \trunning && kill -KILL \"$(cat \"$PIDFILE\")\"\n\
         \texit 0\n\
         \t;;\n\
         restart|force-reload)\n\
         \t\"$0\" stop && \"$0\" start\n\
         \t;;\n\
         reload)\n\
         \trunning && kill -HUP \"$(cat \"$PIDFILE\")\"\n\
         \t;;\n\
         status)\n\
         \tif running; then echo \"apm is running\"; exit 0; fi\n\
         \techo \"apm is not running\"; exit 3\n\
         \t;;\n\
         *)\n\
         \techo \"Usage: $0 {{start|stop|restart|reload|force-reload|status}}\" >&2\n\
         \texit 3\n\
         \t;;\n\
         esac\n",
        binary = layout.binary,
        config = layout.config,
        log = layout.log,
        environment = shell_environment(layout),
        raise_open_files = raise_open_files(),
    )
}

fn target_root(root: Option<&Path>) -> Result<PathBuf, String> {
    let root = root.unwrap_or(Path::new("/"));
    std::path::absolute(root)
        .map_err(|e| format!("--root {}: {e}", root.display()))
        .and_then(|root| {
            if root.is_dir() {
                Ok(root)
            } else {
                Err(format!("--root {}: not a directory", root.display()))
            }
        })
}

fn user_home() -> Result<String, String> {
    std::env::var("HOME")
        .ok()
        .filter(|home| home.starts_with('/'))
        .ok_or_else(|| "--user: HOME must be set to an absolute path".to_owned())
}

pub fn install(options: &Options) -> u8 {
    match install_inner(options) {
        Ok(()) => exit::OK,
        Err(message) => {
            eprintln!("apm install: {message}");
            exit::FAILED
        }
    }
}

fn install_inner(options: &Options) -> Result<(), String> {
    let root = target_root(options.root.as_deref())?;
    let on_this_system = root == Path::new("/");
    let init = match options.init {
        Some(init) => init,
        None => detect(&root),
    };
    if options.user && init != Init::Systemd {
        return Err("--user registers a systemd --user unit: it needs --init systemd".into());
    }
    let home = if options.user {
        user_home()?
    } else {
        String::new()
    };
    let layout = if options.user {
        Layout::user(&home)
    } else {
        Layout::system()
    };
    let mut tree = Tree {
        root: root.clone(),
        created: Vec::new(),
        said: Vec::new(),
        notes: Vec::new(),
    };
    tree.created = read_manifest(&tree, &layout)?;

    let binary = std::env::current_exe()
        .and_then(std::fs::read)
        .map_err(|e| format!("cannot read this apm's own binary: {e}"))?;
    for parent in layout.parents.clone() {
        tree.dir(&parent, 0o755, Kind::Dir)?;
    }
    tree.file(&layout.binary, &binary, 0o755, Kind::File)?;
    tree.dir(&layout.home, 0o700, Kind::DataDir)?;
    let config_parent = Path::new(&layout.config)
        .parent()
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    if !options.user {
        tree.dir(&config_parent, 0o755, Kind::DataDir)?;
    }
    tree.file(
        &layout.config,
        config_text(options.user).as_bytes(),
        0o644,
        Kind::Config,
    )?;
    tree.dir(&layout.config_dir, 0o755, Kind::DataDir)?;
    let group = if options.user {
        None
    } else {
        apm_group(&mut tree, on_this_system)
    };
    if !options.user {
        log_file(&mut tree, &layout, group)?;
        ips(&mut tree, options.refresh_ips)?;
        help_files(&mut tree)?;
    }

    let next = register(&mut tree, &layout, init, options.user, &home)?;
    tree.record(Kind::File, &layout.manifest);
    let manifest = manifest_text(&tree.created);
    tree.file(&layout.manifest, manifest.as_bytes(), 0o600, Kind::File)?;

    if tree.said.is_empty() {
        println!(
            "apm is installed already under {}: nothing changed",
            root.display()
        );
    }
    for line in tree.said.iter().chain(&tree.notes) {
        println!("  {line}");
    }
    println!(
        "Uninstall with `apm uninstall{}{}` (configs are kept unless --purge).",
        if options.user { " --user" } else { "" },
        root_flag(options.root.as_deref())
    );
    println!("Next: {next}");
    Ok(())
}

fn root_flag(root: Option<&Path>) -> String {
    root.map(|r| format!(" --root {}", r.display()))
        .unwrap_or_default()
}

/// The `apm` group the config's `allow_group` names and the daemon log is
/// readable by: created on this system when missing (recorded, so that
/// uninstall deletes it); under another root the groups are that system's.
fn apm_group(tree: &mut Tree, on_this_system: bool) -> Option<nix::unistd::Gid> {
    if let Ok(Some(group)) = nix::unistd::Group::from_name("apm") {
        return on_this_system.then_some(group.gid);
    }
    if !on_this_system {
        tree.notes.push(
            "group apm not created: --root is another system (create it there: `groupadd --system apm`)"
                .into(),
        );
        return None;
    }
    match std::process::Command::new("groupadd")
        .args(["--system", "apm"])
        .status()
    {
        Ok(status) if status.success() => {
            tree.said.push("created the group apm".into());
            tree.record(Kind::File, "group:apm");
            nix::unistd::Group::from_name("apm")
                .ok()
                .flatten()
                .map(|g| g.gid)
        }
        Ok(status) => {
            tree.notes.push(format!(
                "groupadd --system apm failed ({status}): allow_group apm names no group yet"
            ));
            None
        }
        Err(e) => {
            tree.notes.push(format!(
                "cannot run groupadd ({e}): allow_group apm names no group yet"
            ));
            None
        }
    }
}

/// The daemon log: root's to write, the `apm` group's to read.
fn log_file(
    tree: &mut Tree,
    layout: &Layout,
    group: Option<nix::unistd::Gid>,
) -> Result<(), String> {
    let at = tree.no_links(&layout.log)?;
    if std::fs::symlink_metadata(&at).is_err() {
        tree.file(&layout.log, b"", 0o640, Kind::Config)?;
    }
    if let Some(gid) = group {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&at)
            .map_err(|e| format!("cannot open {}: {e}", at.display()))?;
        std::os::unix::fs::fchown(&file, None, Some(gid.as_raw()))
            .map_err(|e| format!("cannot give {} to the group apm: {e}", at.display()))?;
    }
    Ok(())
}

/// The Cloudflare lists, one `.part` per key and family, fresh when asked
/// and reachable, else the copy compiled in; says which.
fn ips(tree: &mut Tree, refresh: bool) -> Result<(), String> {
    let shipped = || (CLOUDFLARE_V4.to_owned(), CLOUDFLARE_V6.to_owned());
    let (v4, v6, source, date) = if refresh {
        match fetch_ips() {
            Ok((v4, v6)) => {
                tree.notes
                    .push("Cloudflare lists fetched from cloudflare.com".into());
                let today = today();
                (v4, v6, "fetched from cloudflare.com", today)
            }
            Err(why) => {
                tree.notes.push(format!(
                    "Cloudflare lists: kept the copy shipped with apm ({SHIPPED_IPS_DATE}): {why}"
                ));
                let (v4, v6) = shipped();
                (v4, v6, "shipped with apm", SHIPPED_IPS_DATE.to_owned())
            }
        }
    } else {
        let (v4, v6) = shipped();
        (v4, v6, "shipped with apm", SHIPPED_IPS_DATE.to_owned())
    };
    tree.dir("etc/apm/ips", 0o755, Kind::Dir)?;
    for (name, key, list) in [
        ("cloudflare-v4", "allow_ip", &v4),
        ("cloudflare-v6", "allow_ip", &v6),
        ("trusted-cloudflare-v4", "trusted_proxies", &v4),
        ("trusted-cloudflare-v6", "trusted_proxies", &v6),
    ] {
        let text = cidr_lines(key, list, &date, source);
        tree.file(
            &format!("etc/apm/ips/{name}.part"),
            text.as_bytes(),
            0o644,
            Kind::File,
        )?;
    }
    Ok(())
}

/// The manual page and the bash completions, from the command line's
/// definitions, where man and bash-completion look for them.
fn help_files(tree: &mut Tree) -> Result<(), String> {
    let mut page = Vec::new();
    clap_mangen::Man::new(crate::cli_command())
        .render(&mut page)
        .map_err(|e| format!("cannot render the manual page: {e}"))?;
    tree.file("usr/share/man/man1/apm.1", &page, 0o644, Kind::File)?;
    let mut completions = Vec::new();
    clap_complete::generate(
        clap_complete::Shell::Bash,
        &mut crate::cli_command(),
        "apm",
        &mut completions,
    );
    tree.file(
        "usr/share/bash-completion/completions/apm",
        &completions,
        0o644,
        Kind::File,
    )
}

fn today() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| "today".into())
}

/// The service's script or unit and the links that start it at boot;
/// returns the command that starts it now.
fn register(
    tree: &mut Tree,
    layout: &Layout,
    init: Init,
    user: bool,
    home: &str,
) -> Result<String, String> {
    match init {
        Init::Systemd if user => {
            let home = home.trim_start_matches('/');
            let unit = format!("{home}/.config/systemd/user/apm.service");
            tree.file(
                &unit,
                systemd_unit(layout, true).as_bytes(),
                0o644,
                Kind::File,
            )?;
            tree.link(
                &format!("{home}/.config/systemd/user/default.target.wants/apm.service"),
                &format!("/{unit}"),
            )?;
            Ok("systemctl --user daemon-reload && systemctl --user start apm (and `loginctl enable-linger $USER` to run it without a login)".into())
        }
        Init::Systemd => {
            tree.file(
                "etc/systemd/system/apm.service",
                systemd_unit(layout, false).as_bytes(),
                0o644,
                Kind::File,
            )?;
            tree.link(
                "etc/systemd/system/multi-user.target.wants/apm.service",
                "/etc/systemd/system/apm.service",
            )?;
            Ok("systemctl daemon-reload && systemctl start apm && systemctl status apm".into())
        }
        Init::Openrc => {
            tree.file(
                "etc/init.d/apm",
                openrc_script(layout).as_bytes(),
                0o755,
                Kind::File,
            )?;
            tree.link("etc/runlevels/default/apm", "/etc/init.d/apm")?;
            Ok("rc-service apm start".into())
        }
        Init::Sysv => {
            tree.file(
                "etc/init.d/apm",
                sysv_script(layout).as_bytes(),
                0o755,
                Kind::File,
            )?;
            for level in ["2", "3", "4", "5"] {
                tree.link(&format!("etc/rc{level}.d/S02apm"), "../init.d/apm")?;
            }
            for level in ["0", "1", "6"] {
                tree.link(&format!("etc/rc{level}.d/K01apm"), "../init.d/apm")?;
            }
            Ok("/etc/init.d/apm start".into())
        }
    }
}

pub fn uninstall(user: bool, root: Option<&Path>, purge: bool) -> u8 {
    match uninstall_inner(user, root, purge) {
        Ok(()) => exit::OK,
        Err(message) => {
            eprintln!("apm uninstall: {message}");
            exit::FAILED
        }
    }
}

fn uninstall_inner(user: bool, root: Option<&Path>, purge: bool) -> Result<(), String> {
    let root = target_root(root)?;
    let home = if user { user_home()? } else { String::new() };
    let layout = if user {
        Layout::user(&home)
    } else {
        Layout::system()
    };
    let tree = Tree {
        root: root.clone(),
        created: Vec::new(),
        said: Vec::new(),
        notes: Vec::new(),
    };
    let entries = read_manifest(&tree, &layout)?;
    if entries.is_empty() {
        println!(
            "nothing to uninstall: no manifest at {}",
            tree.path(&layout.manifest).display()
        );
        return Ok(());
    }
    let mut kept = Vec::new();
    // Deepest first: what a directory holds goes before the directory.
    for (kind, relative) in entries.iter().rev() {
        if relative == "group:apm" {
            if root == Path::new("/") {
                match std::process::Command::new("groupdel").arg("apm").status() {
                    Ok(status) if status.success() => println!("  deleted the group apm"),
                    _ => println!("  could not delete the group apm (`groupdel apm`)"),
                }
            }
            continue;
        }
        let at = tree
            .no_links(
                &Path::new(relative)
                    .parent()
                    .unwrap_or(Path::new(""))
                    .to_string_lossy(),
            )?
            .join(Path::new(relative).file_name().unwrap_or_default());
        let Ok(meta) = std::fs::symlink_metadata(&at) else {
            continue;
        };
        let removed = match kind {
            Kind::File => std::fs::remove_file(&at).is_ok(),
            Kind::Config if purge => std::fs::remove_file(&at).is_ok(),
            Kind::DataDir if purge && meta.is_dir() => std::fs::remove_dir_all(&at).is_ok(),
            Kind::Dir | Kind::DataDir if meta.is_dir() => std::fs::remove_dir(&at).is_ok(),
            _ => false,
        };
        if removed {
            println!("  removed {}", at.display());
        } else if *kind == Kind::Config || *kind == Kind::DataDir {
            kept.push(at);
        }
    }
    if !kept.is_empty() {
        println!("Kept (yours; `apm uninstall --purge` removes them):");
        for at in kept {
            println!("  {}", at.display());
        }
    }
    Ok(())
}
