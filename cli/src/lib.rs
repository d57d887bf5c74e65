//! The `apm` command: command-line parsing and wiring of the library
//! crates. The binary's crate is `main` and the global allocator only; this
//! crate is built for size (docs/cli.md, decision 118).

mod check;
mod client;
mod commands;
mod container;
mod convert;
mod daemon;
mod export;
mod files;
mod flags;
mod install;
mod monitor;
mod notify;
mod protocol;
mod tls_check;
mod watch;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

use client::Place;
use protocol::Call;

/// Exit codes shared by every command (decisions: the CLI, rule 4).
pub mod exit {
    pub const OK: u8 = 0;
    /// The operation failed: a config has errors, a worker failed to start.
    pub const FAILED: u8 = 1;
    /// Bad flags, an unknown worker or code, a file that cannot be read.
    pub const USAGE: u8 = 2;
    /// The daemon cannot be reached, or refused us.
    pub const UNREACHABLE: u8 = 3;
}

#[derive(Parser)]
#[command(
    name = "apm",
    version,
    about = "Process manager and L4/L7 load balancer",
    after_help = "Signals: `apm SIGUSR1 <worker>` or `apm SIGHUP <worker>#<index>`.\n`apm help COMMAND` explains one command; `apm -h --full` lists every command with its flags."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create and start a worker: apm run <exec> [params…] [-flag value…]; every worker option is a flag.
    Run {
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            required = true,
            value_name = "EXEC [PARAMS|FLAGS]..."
        )]
        args: Vec<String>,
    },
    /// Start a stopped worker, or one instance of it as NAME#I.
    Start { worker: String },
    /// Stop a worker (or one instance, NAME#I): SIGTERM to its process groups, SIGKILL after kill_timeout.
    Stop { worker: String },
    /// Stop every worker; the daemon keeps running.
    Stopall,
    /// Restart a worker (or one instance, NAME#I); --force restarts every instance at once, ignoring rolling, and without a worker restarts them all.
    Restart {
        worker: Option<String>,
        /// Restart every instance at once, ignoring `rolling`; without a worker, restart them all.
        #[arg(long)]
        force: bool,
    },
    /// Stop and unregister a worker.
    #[command(visible_alias = "rm")]
    Remove { worker: String },
    /// Change a running worker's options with the flags of `run`; -no-restart applies without restarting.
    Update {
        worker: String,
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "FLAGS"
        )]
        args: Vec<String>,
    },
    /// Rename a worker.
    Rename { worker: String, new: String },
    /// Copy a worker under a new name and start the copy.
    Copy { worker: String, new: String },
    /// Wait until every instance of a worker runs.
    Wait {
        worker: String,
        #[arg(long, default_value = "30s")]
        timeout: String,
    },
    /// `apm exit daemon`: stop every worker and the daemon.
    Exit {
        #[arg(value_parser = ["daemon"])]
        what: String,
    },
    /// List workers: status, pid, instances, uptime, restarts, CPU and memory.
    #[command(visible_alias = "ls")]
    List {
        #[arg(long)]
        json: bool,
    },
    /// Start the web dashboard and print its URL; `apm gui stop` stops it.
    Gui {
        #[arg(value_parser = ["stop"])]
        stop: Option<String>,
    },
    /// A live view of every instance's status, CPU and memory.
    Monitor {
        /// How often it redraws.
        #[arg(long, default_value = "1s")]
        interval: String,
        /// Stop after this many frames (for scripts).
        #[arg(long)]
        count: Option<u64>,
    },
    /// A worker's configuration and live state.
    Info {
        worker: String,
        #[arg(long)]
        json: bool,
    },
    /// A worker's environment (the running process's, when it runs).
    Env {
        worker: String,
        #[arg(long)]
        json: bool,
    },
    /// Show a worker's stdout log, or stderr with --err.
    Log {
        worker: String,
        /// Show the stderr log instead of stdout.
        #[arg(long)]
        err: bool,
        /// Keep printing lines as they are written, until interrupted.
        #[arg(short = 'f', long)]
        follow: bool,
        /// How many of the last lines to print first.
        #[arg(long, default_value_t = 20)]
        lines: usize,
    },
    /// Search worker logs for a text.
    Grep {
        pattern: String,
        worker: Option<String>,
    },
    /// The CLI's and the daemon's versions.
    Version {
        #[arg(long)]
        json: bool,
    },
    /// Load a config file and start its workers (running ones are skipped).
    Load { file: PathBuf },
    /// Apply a config file's changes (or one worker's, or --all files'): start new workers, restart or update changed ones, stop removed ones.
    Reload {
        /// A loaded worker, or a config file.
        target: Option<String>,
        /// Reload every file a loaded worker came from.
        #[arg(long, conflicts_with = "target")]
        all: bool,
        /// Restart unchanged workers too.
        #[arg(long)]
        force: bool,
        /// Print the plan; apply nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
    /// Write live workers back to the files they came from (comments and layout kept), or to FILE.
    #[command(visible_alias = "save")]
    Saveconf {
        worker: Option<String>,
        file: Option<PathBuf>,
    },
    /// Load the system config (`APM_CONFIG`, default /etc/apm/apm.conf), as the startup service does.
    Boot,
    /// Stop and remove the workers that came from a config file.
    Unload { file: PathBuf },
    /// Run the daemon (started automatically by other commands).
    Daemon {
        /// Stay in the foreground, for service managers and containers.
        #[arg(long)]
        foreground: bool,
        #[arg(long, hide = true)]
        detach: bool,
    },
    /// Validate a config file and its includes; applies nothing and needs no daemon.
    Check(check::CheckArgs),
    /// Explain a diagnostic code such as E0004; without a code, list them all.
    Explain { code: Option<String> },
    /// Convert a PM2 ecosystem file to apm config, to stdout or OUTPUT.
    Convert {
        file: PathBuf,
        output: Option<PathBuf>,
        /// Evaluate the file with the local node (for files that require packages).
        #[arg(long)]
        node: bool,
        /// Merge `env_NAME` over `env`, like `pm2 start --env NAME`.
        #[arg(long, value_name = "NAME")]
        env: Option<String>,
        /// Overwrite OUTPUT if it exists.
        #[arg(long)]
        force: bool,
        /// How long evaluating the file may take.
        #[arg(long, value_name = "DURATION", default_value = "10s")]
        timeout: String,
        /// Evaluate FILE here and print its value as JSON: the limited
        /// child process `apm convert` runs the embedded engine in.
        #[arg(long, hide = true)]
        evaluate_only: bool,
    },
    /// Rewrite a config file in the canonical layout, comments kept.
    Fmt {
        file: PathBuf,
        /// Change nothing; exit 1 when the file is not formatted.
        #[arg(long)]
        check: bool,
        /// Print what would change as a unified diff; change nothing.
        #[arg(long)]
        diff: bool,
    },
    /// Install apm as a service: the binary, the init system's unit or script, /etc/apm/apm.conf, the daemon log, the Cloudflare lists (root; --user for yours).
    Install {
        /// Install for this user: ~/.local/bin/apm and a systemd --user unit.
        #[arg(long)]
        user: bool,
        /// Install into this directory as if it were / (images, tests).
        #[arg(long, value_name = "DIR")]
        root: Option<PathBuf>,
        /// The init system to register with; detected when absent.
        #[arg(long, value_enum)]
        init: Option<install::Init>,
        /// Fetch Cloudflare's current address lists instead of the copy shipped with apm.
        #[arg(long)]
        refresh_ips: bool,
    },
    /// Remove what `apm install` created, as its manifest lists; configs and the log stay unless --purge.
    Uninstall {
        #[arg(long)]
        user: bool,
        #[arg(long, value_name = "DIR")]
        root: Option<PathBuf>,
        /// Remove the configs, the daemon's state and the log too.
        #[arg(long)]
        purge: bool,
    },
    /// Print a shell completion script: apm completions bash|zsh|fish.
    Completions { shell: clap_complete::Shell },
    /// Print the manual page (roff), or write one per command into DIR.
    Man {
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// Export a config's workers to Kubernetes, Nomad, Docker Compose or systemd (no daemon needed).
    Export(export::ExportArgs),
    /// Send a JSON message to every worker process listening on CHANNEL (IPC).
    Send {
        channel: String,
        /// The message, as JSON (quote strings: '"hi"').
        data: String,
        /// Print how many processes took it as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Send a JSON request on CHANNEL and print the first reply; exit 1 when none came.
    Request {
        channel: String,
        /// The request, as JSON (quote strings: '"hi"').
        data: String,
        /// How long to wait for a reply.
        #[arg(long, default_value = "500ms")]
        timeout: String,
        /// Print the reply and why it is null, if it is, as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run FILE's workers in the foreground as a container's PID 1: reaps orphans, stops them on SIGTERM/SIGINT.
    Container {
        file: PathBuf,
        /// Also listen on the control socket, for `apm list`, `apm log` and the rest inside the container.
        #[arg(long)]
        socket: bool,
    },
}

/// The worker flags of `run` and `update`, one line each: the schema
/// table is the flag list (decisions: the CLI, rule 1).
fn worker_flags_help() -> String {
    let mut text = String::from(
        "Worker flags (-key value, --key value or --key=value; -no-KEY sets a boolean false):\n",
    );
    for key in apm_compiler::ir::WorkerSpec::KEYS {
        let default = key
            .default_shown()
            .map(|d| format!(" [default: {d}]"))
            .unwrap_or_default();
        let unbuilt = apm_runtime::unbuilt::not_built(key.name)
            .map(|feature| format!(" (not built yet: {feature})"))
            .unwrap_or_default();
        text.push_str(&format!(
            "  -{:<24} {}{default}{unbuilt}\n",
            key.name, key.doc
        ));
    }
    text.push_str("\n`apm -h --full` lists every command with its flags.");
    text
}

/// The command line's definition, with the worker flags in the help of the
/// commands that take them.
pub(crate) fn cli_command() -> clap::Command {
    let flags = worker_flags_help();
    Cli::command()
        .mut_subcommand("run", |run| run.after_help(flags.clone()))
        .mut_subcommand("update", |update| update.after_help(flags.clone()))
}

fn full_help() -> u8 {
    let mut command = Cli::command();
    let _ = command.print_help();
    for sub in command.get_subcommands_mut() {
        println!("\n──── apm {} ────", sub.get_name());
        let _ = sub.print_long_help();
    }
    println!("\n──── apm run / apm update ────\n{}", worker_flags_help());
    exit::OK
}

/// The whole of `apm`: what the binary's `main` runs.
pub fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).is_none_or(|command| command != "daemon") {
        apm_runtime::sys::default_sigpipe();
    }
    let place = Place::from_env();
    let first = args.get(1).map(String::as_str);
    if first.is_some_and(|a| a.starts_with("SIG")) {
        let Some(target) = args.get(2) else {
            eprintln!("apm: usage: apm {} <worker>[#index]", args[1]);
            return ExitCode::from(exit::USAGE);
        };
        return ExitCode::from(commands::signal(&place, &args[1], target));
    }
    if first == Some("-v") {
        return ExitCode::from(commands::version(&place, false));
    }
    if args.iter().any(|a| a == "--full") && args.iter().any(|a| a == "-h" || a == "--help") {
        return ExitCode::from(full_help());
    }
    let cli = match cli_command()
        .try_get_matches()
        .and_then(|matches| Cli::from_arg_matches(&matches))
    {
        Ok(cli) => cli,
        Err(error) => {
            let _ = error.print();
            return ExitCode::from(if error.use_stderr() {
                exit::USAGE
            } else {
                exit::OK
            });
        }
    };
    ExitCode::from(match cli.command {
        Command::Run { args } => commands::run(&place, &args),
        Command::Start { worker } => match commands::instance_target(&worker) {
            Ok((name, index)) => commands::start_like(&place, Call::Start { name, index }),
            Err(code) => code,
        },
        Command::Stop { worker } => match commands::instance_target(&worker) {
            Ok((name, index)) => commands::simple(
                &place,
                Call::Stop { name, index },
                &format!("■ {worker} stopped"),
            ),
            Err(code) => code,
        },
        Command::Stopall => commands::simple(&place, Call::StopAll, "■ every worker stopped"),
        Command::Restart {
            worker: Some(worker),
            force,
        } => match commands::instance_target(&worker) {
            Ok((name, index)) => commands::start_like(&place, Call::Restart { name, index, force }),
            Err(code) => code,
        },
        Command::Restart {
            worker: None,
            force: true,
        } => commands::restart_all(&place),
        Command::Restart {
            worker: None,
            force: false,
        } => {
            eprintln!(
                "apm: name the worker to restart, or use `apm restart --force` to restart them all"
            );
            exit::USAGE
        }
        Command::Remove { worker } => commands::simple(
            &place,
            Call::Remove {
                name: worker.clone(),
            },
            &format!("- {worker} removed"),
        ),
        Command::Update { worker, args } => commands::update(&place, &worker, &args),
        Command::Rename { worker, new } => commands::simple(
            &place,
            Call::Rename {
                name: worker.clone(),
                new: new.clone(),
            },
            &format!("{worker} is now {new}"),
        ),
        Command::Copy { worker, new } => commands::start_like_optional(
            &place,
            Call::Copy {
                name: worker,
                new,
                environment: apm_runtime::process::state::Environment::of_this_process(),
            },
        ),
        Command::Wait { worker, timeout } => match commands::parse_duration(&timeout) {
            Ok(timeout) => {
                let name = worker.clone();
                commands::simple(
                    &place,
                    Call::Wait {
                        name,
                        timeout_ms: timeout.as_millis() as u64,
                    },
                    &format!("{worker} is running"),
                )
            }
            Err(e) => {
                eprintln!("apm: --timeout: {e}");
                exit::USAGE
            }
        },
        Command::Exit { .. } => commands::exit_daemon(&place),
        Command::List { json } => commands::list(&place, json),
        Command::Gui { stop } => commands::gui(&place, stop.is_some()),
        Command::Monitor { interval, count } => match commands::parse_duration(&interval) {
            Ok(interval) if !interval.is_zero() => commands::monitor(&place, interval, count),
            Ok(_) => {
                eprintln!("apm: --interval must be more than 0");
                exit::USAGE
            }
            Err(e) => {
                eprintln!("apm: --interval: {e}");
                exit::USAGE
            }
        },
        Command::Info { worker, json } => commands::info(&place, &worker, json),
        Command::Env { worker, json } => commands::env(&place, &worker, json),
        Command::Log {
            worker,
            err,
            follow,
            lines,
        } => commands::log(&place, &worker, err, follow, lines),
        Command::Grep { pattern, worker } => commands::grep(&place, &pattern, worker.as_deref()),
        Command::Version { json } => commands::version(&place, json),
        Command::Load { file } => commands::load(&place, &file),
        Command::Reload {
            target,
            all,
            force,
            dry_run,
            json,
        } => commands::reload(&place, target, all, force, dry_run, json),
        Command::Saveconf { worker, file } => {
            commands::saveconf(&place, worker.as_deref(), file.as_deref())
        }
        Command::Boot => {
            let file = std::env::var_os("APM_CONFIG")
                .map_or_else(|| PathBuf::from("/etc/apm/apm.conf"), PathBuf::from);
            commands::load(&place, &file)
        }
        Command::Unload { file } => commands::unload(&place, &file),
        Command::Daemon {
            foreground: true,
            detach,
        } => daemon::run(place, detach),
        Command::Daemon {
            foreground: false, ..
        } => commands::start_daemon_background(&place),
        Command::Check(args) => check::run(&args),
        Command::Explain { code } => check::explain(code.as_deref()),
        Command::Fmt { file, check, diff } => check::fmt(&file, check, diff),
        Command::Export(args) => export::run(&args),
        Command::Send {
            channel,
            data,
            json,
        } => commands::send(&place, channel, &data, json),
        Command::Request {
            channel,
            data,
            timeout,
            json,
        } => match commands::parse_duration(&timeout) {
            Ok(timeout) => commands::ipc_request(&place, channel, &data, timeout, json),
            Err(e) => {
                eprintln!("apm: --timeout: {e}");
                exit::USAGE
            }
        },
        Command::Container { file, socket } => container::run(place, file, socket),
        Command::Convert {
            file,
            output,
            node,
            env,
            force,
            timeout,
            evaluate_only,
        } => match commands::parse_duration(&timeout) {
            Ok(timeout) if evaluate_only => convert::evaluate_only(&file, timeout),
            Ok(timeout) if !timeout.is_zero() => convert::run(
                &file,
                output.as_deref(),
                &convert::How { node, env, timeout },
                force,
            ),
            Ok(_) => {
                eprintln!("apm: --timeout must be more than 0");
                exit::USAGE
            }
            Err(e) => {
                eprintln!("apm: --timeout: {e}");
                exit::USAGE
            }
        },
        Command::Install {
            user,
            root,
            init,
            refresh_ips,
        } => install::install(&install::Options {
            user,
            root,
            init,
            refresh_ips,
        }),
        Command::Uninstall { user, root, purge } => {
            install::uninstall(user, root.as_deref(), purge)
        }
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut cli_command(), "apm", &mut std::io::stdout());
            exit::OK
        }
        Command::Man { dir } => manual(dir.as_deref()),
    })
}

/// The manual pages, from the same definitions as `--help`.
fn manual(dir: Option<&std::path::Path>) -> u8 {
    let written = match dir {
        Some(dir) => clap_mangen::generate_to(cli_command(), dir),
        None => clap_mangen::Man::new(cli_command()).render(&mut std::io::stdout()),
    };
    match written {
        Ok(()) => exit::OK,
        Err(e) => {
            eprintln!("apm man: {e}");
            exit::FAILED
        }
    }
}

/// Has mimalloc give freed memory back to the system at once, not 10 ms
/// later: a command that builds and drops large structures in a fraction
/// of a second (`apm check` of the largest config allowed, 33,000
/// workers) otherwise peaks with what it has already freed (223 MB against
/// 143 MB, for 5-17 % more time spent in the purges).
pub(crate) fn free_memory_at_once() {
    // `mi_option_purge_delay` of mimalloc.h (v2 and v3), which
    // libmimalloc-sys names no constant for.
    const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: mi_option_set takes two integers; mimalloc reads the option
    // at each purge, so setting it while allocating is allowed.
    unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, 0) }
}

/// Returns memory the calling thread freed to the system. mimalloc does so
/// only as that thread goes on allocating, so a daemon gone quiet after a
/// burst (4,000 WebSockets closed) kept it all resident. Forced, so that
/// what other threads freed of this thread's blocks is collected too: a
/// connection's first task is made on the thread that accepted it and
/// ends on another, and unforced, each idle client left about 0.6 KB
/// resident with two proxy threads (`bench/idle.py`, 8,000 clients:
/// 863 → 262 bytes per client; decision 123). Forced, a collection took
/// 5-500 µs with 8,000 idle clients and wrk saturating the proxy.
pub(crate) fn give_back_freed_memory() {
    // SAFETY: mi_collect takes no pointers and may be called at any time
    // from any thread; it acts on the calling thread's heap.
    unsafe { libmimalloc_sys::mi_collect(true) }
}
