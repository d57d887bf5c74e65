//! The dashboard in a real browser (`tests/browser/dashboard.py`: headless
//! Chromium driven by selenium), against the built binary.

use std::process::Command;

use crate::api::dashboard_python;
use crate::harness::*;

#[test]
fn the_dashboard_works_in_a_real_browser() {
    let Some(python) = dashboard_python() else {
        return prerequisite_missing("target/dashboard-venv with selenium (.ci/run makes it)");
    };
    for program in ["chromium", "chromedriver"] {
        let found = Command::new(program).arg("--version").output();
        if !found.is_ok_and(|o| o.status.success()) {
            return prerequisite_missing(&format!(
                "{program} (Debian's chromium and chromium-driver)"
            ));
        }
    }
    let checked = run({
        let mut script = Command::new(python);
        script
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/browser/dashboard.py"
            ))
            .args(["--apm", env!("CARGO_BIN_EXE_apm")]);
        script
    });
    assert!(
        checked.status.success() && stdout(&checked).contains("all checks passed"),
        "{}",
        describe(&checked)
    );
}
