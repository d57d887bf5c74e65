//! Augur through a daemon: what `apm run` prints when a start fails for a
//! missing Python package or a port another process holds.

use crate::harness::*;

/// A Python project whose `requirements.txt` names packages that are not
/// installed: the hint names the one the traceback shows, augur the rest,
/// with the command that installs the file.
#[test]
fn augur_lists_the_requirements_a_python_project_has_not_installed() {
    let d = Daemon::new("augur_requirements");
    let project = d.dir().join("api");
    std::fs::create_dir_all(project.join("more")).unwrap();
    std::fs::write(
        project.join("requirements.txt"),
        "--index-url https://pypi.org/simple\n\
         apm-augur-absent[extra]>=1.0 ; python_version >= \"3\"\n\
         -r more/dev.txt\n\
         pywin32 ; sys_platform == \"win32\"\n",
    )
    .unwrap();
    std::fs::write(
        project.join("more/dev.txt"),
        "Apm_Augur.Second==2.0  # tests\n",
    )
    .unwrap();
    std::fs::write(
        project.join("app.py"),
        "import json\nimport apm_augur_absent\n",
    )
    .unwrap();
    let path = project.display().to_string();
    let failed = d.apm(&["run", "python3", "app.py", "-name", "api", "-path", &path]);
    assert_eq!(failed.status.code(), Some(1), "{}", describe(&failed));
    let out = stdout(&failed);
    assert!(
        out.contains("  → missing Python module apm_augur_absent — pip install it"),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "  → augur — also missing (1): Apm_Augur.Second   → cd {path} && pip install -r requirements.txt\n"
        )),
        "{out}"
    );

    // With augur_full_scan the worker is not started at all.
    let preflight = d.apm(&[
        "run",
        "python3",
        "-c",
        "print('started'); import time; time.sleep(1033)",
        "-name",
        "checked",
        "-path",
        &path,
        "-augur_full_scan",
    ]);
    assert_eq!(preflight.status.code(), Some(1), "{}", describe(&preflight));
    assert!(
        stdout(&preflight)
            .contains("augur_full_scan: 2 declared dependencies are not installed (not started)"),
        "{}",
        describe(&preflight)
    );
    assert!(!d.log("checked", false).contains("started"));
}

/// Without a manifest, the entry file's imports: the standard library's
/// are found where the daemon's python3 keeps them, the absent ones listed.
#[test]
fn augur_reads_the_imports_of_a_python_entry_file_without_a_manifest() {
    let d = Daemon::new("augur_imports");
    let project = d.dir().join("script");
    std::fs::create_dir_all(&project).unwrap();
    std::fs::write(
        project.join("main.py"),
        "import os, sys, json, time, itertools, collections, asyncio\n\
         from helpers import greet\n\
         import apm_augur_first_absent\n\
         import apm_augur_second_absent\n",
    )
    .unwrap();
    std::fs::write(project.join("helpers.py"), "def greet(): pass\n").unwrap();
    let path = project.display().to_string();
    let failed = d.apm(&[
        "run", "python3", "-u", "main.py", "-name", "script", "-path", &path,
    ]);
    assert_eq!(failed.status.code(), Some(1), "{}", describe(&failed));
    let out = stdout(&failed);
    assert!(
        out.contains("  → missing Python module apm_augur_first_absent")
            && out.contains(&format!(
                "  → augur — also missing (1): apm_augur_second_absent   → cd {path} && pip install apm_augur_second_absent\n"
            )),
        "{out}"
    );
}

/// A worker that cannot bind its port: the hint names the port and the
/// process that holds it, here this test.
#[test]
fn augur_names_the_process_that_holds_a_port() {
    let d = Daemon::new("augur_port");
    let held = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = held.local_addr().unwrap().port();
    // The port is in the traceback's source line, not in the error's.
    let app = d.write(
        "server.py",
        &format!(
            "from http.server import HTTPServer, SimpleHTTPRequestHandler\n\
             server = HTTPServer((\"0.0.0.0\", {port}), SimpleHTTPRequestHandler)\n\
             server.serve_forever()\n"
        ),
    );
    let failed = d.apm(&["run", "python3", app.to_str().unwrap(), "-name", "web"]);
    assert_eq!(failed.status.code(), Some(1), "{}", describe(&failed));
    let out = stdout(&failed);
    assert!(
        out.contains("OSError: [Errno 98] Address already in use"),
        "{out}"
    );
    let me = std::process::id();
    assert!(
        out.contains(&format!("  → port {port} is already in use by pid {me} (")),
        "{out}"
    );

    // Node names the port on the error's line.
    if !have_node() {
        prerequisite_missing("node is not installed");
        return;
    }
    let listen = format!("require('http').createServer().listen({port})");
    let failed = d.apm(&["run", "node", "-e", &listen, "-name", "node-web"]);
    let out = stdout(&failed);
    assert!(out.contains("EADDRINUSE"), "{}", describe(&failed));
    assert!(
        out.contains(&format!("  → port {port} is already in use by pid {me} (")),
        "{out}"
    );
    drop(held);
}

/// A daemon that is not root cannot see which process of another user
/// holds a port: the hint names the owner's uid and how to learn more.
#[test]
fn augur_names_the_uid_of_a_holder_a_non_root_daemon_cannot_see() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    if !nix::unistd::geteuid().is_root() {
        prerequisite_missing("starting a daemon as uid 65534 needs root");
        return;
    }
    let d = Daemon::new("augur_hidden");
    // A daemon of uid 65534 keeps its state in the test's directory.
    std::fs::set_permissions(d.dir(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::create_dir_all(&d.home).unwrap();
    std::os::unix::fs::chown(&d.home, Some(65534), Some(65534)).unwrap();
    let held = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = held.local_addr().unwrap().port();
    let go = format!("echo 'listen tcp :{port}: bind: address already in use' >&2; exit 1");
    let mut command = d.command(&["run", "sh", "-c", &go, "-name", "web", "-path", "/"]);
    command.uid(65534).gid(65534);
    let failed = run(command);
    assert_eq!(failed.status.code(), Some(1), "{}", describe(&failed));
    assert!(
        stdout(&failed).contains(&format!(
            "  → port {port} is already in use by a process of uid 0 that the daemon cannot see (`ss -ltnp` as root names it)\n"
        )),
        "{}",
        describe(&failed)
    );
    drop(held);
}
