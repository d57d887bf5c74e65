//! `apm monitor` on a terminal: the interactive view, driven in tmux
//! (`send-keys`) and read back from its screen (`capture-pane`).

use std::process::Command;

use crate::harness::*;

/// A tmux server of the test's own, killed when dropped.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn run(&self, args: &[&str]) -> std::process::Output {
        run({
            let mut tmux = Command::new("tmux");
            tmux.args(["-L", &self.socket]).args(args);
            tmux
        })
    }

    fn screen(&self) -> String {
        stdout(&self.run(&["capture-pane", "-p", "-t", "monitor"]))
    }

    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", "monitor"];
        args.extend_from_slice(keys);
        assert!(self.run(&args).status.success());
    }

    /// The screen once `what` holds of it.
    fn wait_screen(&self, what: &str, holds: impl Fn(&str) -> bool) -> String {
        let mut last = String::new();
        wait_until(PATIENCE, what, || {
            last = self.screen();
            holds(&last)
        });
        last
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .output();
    }
}

/// The selected row (marked ▶) of a screen.
fn selected(screen: &str) -> Option<&str> {
    screen.lines().find(|line| line.contains('▶'))
}

#[test]
fn monitor_on_a_terminal_is_interactive() {
    if !Command::new("tmux")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return prerequisite_missing("tmux");
    }
    let d = Daemon::new("monitor_tui");
    d.run_sh(
        "alpha",
        "echo alpha-line; exec sleep 1031",
        &["-startup_grace", "100"],
    );
    d.run_sh(
        "beta",
        "echo beta-line; exec sleep 1032",
        &["-startup_grace", "100"],
    );
    let beta = pids(&d.wait_running("beta"))[0];
    d.wait_running("alpha");
    let tmux = Tmux {
        socket: format!("apm-test-{}", std::process::id()),
    };
    let command = format!(
        "env APM_HOME='{}' APM_SOCKET='{}' '{}' monitor --interval 200ms",
        d.home.display(),
        d.socket,
        env!("CARGO_BIN_EXE_apm")
    );
    let started = tmux.run(&[
        "new-session",
        "-d",
        "-s",
        "monitor",
        "-x",
        "140",
        "-y",
        "32",
        &command,
    ]);
    assert!(started.status.success(), "{}", describe(&started));

    // The list renders, the first worker selected, its log below.
    let screen = tmux.wait_screen("the workers listed", |s| {
        s.contains("alpha") && s.contains("beta") && s.contains("alpha-line")
    });
    assert!(
        selected(&screen).is_some_and(|row| row.contains("alpha")),
        "{screen}"
    );
    assert!(screen.contains(&beta.to_string()), "{screen}");

    // The arrow moves the selection, and the log follows it.
    tmux.keys(&["Down"]);
    tmux.wait_screen("beta selected with its log", |s| {
        selected(s).is_some_and(|row| row.contains("beta")) && s.contains("beta-line")
    });

    // `r` restarts the selected worker: a new pid.
    tmux.keys(&["r"]);
    let restarted = wait_for("beta restarted", || {
        let pid = pids(&d.wait_running("beta"))[0];
        (pid != beta).then_some(pid)
    });
    tmux.wait_screen("the new pid on screen", |s| {
        selected(s).is_some_and(|row| row.contains(&restarted.to_string()))
    });
    assert_eq!(pids(&d.wait_running("alpha")).len(), 1);

    // `/` filters the list; `q` quits.
    tmux.keys(&["/", "a", "l", "Enter"]);
    tmux.wait_screen("the list filtered", |s| {
        s.contains("matching")
            && !s
                .lines()
                .any(|l| l.contains("beta ") && l.contains("running"))
    });
    tmux.keys(&["q"]);
    wait_until(PATIENCE, "the monitor to quit", || {
        !tmux.run(&["has-session", "-t", "monitor"]).status.success()
    });
}
