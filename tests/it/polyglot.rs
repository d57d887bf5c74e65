//! The PHP, Perl and Lua connectors: the protocol harness, the same test
//! app as the Python and Node ones behind a real daemon, and the
//! reference's PHP example as written.

use std::process::Command;

use crate::connectors::{App, pass_the_protocol_harness, serve_http_websocket_and_tcp_through_apm};
use crate::harness::*;

/// (worker name, interpreter, the test apps' file extension, the `lang` it
/// reports, an argument list that fails when the interpreter lacks what the
/// connector needs).
const LANGUAGES: [(&str, &str, &str, &str, &[&str]); 4] = [
    ("php", "php", "php", "php", &["-r", "json_encode(1);"]),
    ("perl", "perl", "pl", "perl", &["-MJSON::PP", "-e", "1"]),
    (
        "lua54",
        "lua5.4",
        "lua",
        "lua",
        &["-e", "require('cjson') require('luv')"],
    ),
    (
        "lua53",
        "lua5.3",
        "lua",
        "lua",
        &["-e", "require('cjson') require('luv')"],
    ),
];

/// Whether `exec` runs with what its connector needs.
fn runs(exec: &str, probe: &[&str]) -> bool {
    Command::new(exec)
        .args(probe)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The languages this machine can run, as (worker name, interpreter, file
/// extension, lang); the others are reported as missing prerequisites.
pub fn runnable() -> Vec<(&'static str, &'static str, &'static str, &'static str)> {
    let mut found = Vec::new();
    for (name, exec, ext, lang, probe) in LANGUAGES {
        if runs(exec, probe) {
            found.push((name, exec, ext, lang));
        } else {
            prerequisite_missing(&format!(
                "{exec} with its connector's libraries is not installed (see .ci/run): the {lang} connector is not tested"
            ));
        }
    }
    found
}

/// The echo test app of each language this machine can run.
fn apps() -> Vec<App> {
    runnable()
        .into_iter()
        .map(|(name, exec, ext, lang)| {
            (
                name,
                exec,
                repo(&format!("tests/apps/connector_echo.{ext}")),
                lang,
            )
        })
        .collect()
}

#[test]
fn the_php_perl_and_lua_connectors_pass_the_protocol_harness() {
    pass_the_protocol_harness(apps());
}

#[test]
fn the_perl_connector_passes_the_protocol_harness_with_json_pp_alone() {
    if !runs("perl", &["-MJSON::PP", "-e", "1"]) {
        prerequisite_missing("perl with JSON::PP is not installed");
        return;
    }
    // JSON::XS is taken when installed; an @INC hook hides it, as on a
    // system with core modules only.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("HideJsonXs.pm"),
        "package HideJsonXs; unshift @INC, sub { die \"hidden\\n\" if $_[1] =~ m{^(?:Cpanel/)?JSON/XS\\.pm$}; return }; 1;\n",
    )
    .unwrap();
    let output = Command::new("python3")
        .arg(repo("tests/connectors/conformance.py"))
        .arg("perl")
        .arg(format!("-I{}", dir.path().display()))
        .arg("-MHideJsonXs")
        .arg(repo("tests/apps/connector_echo.pl"))
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", describe(&output));
}

#[test]
fn php_perl_and_lua_apps_serve_http_websocket_and_tcp_through_apm() {
    serve_http_websocket_and_tcp_through_apm("polyglot", apps());
}

#[test]
fn the_reference_php_example_works_as_written() {
    if !runs("php", &["-r", "json_encode(1);"]) {
        prerequisite_missing("php is not installed");
        return;
    }
    let d = Daemon::new("polyglot_reference_php");
    // The reference's "PHP (7.4+)" example, with the connector beside it.
    std::fs::copy(repo("connectors/apm_module.php"), d.path("apm_module.php")).unwrap();
    let app = d.write(
        "app.php",
        "<?php\n\
         require_once __DIR__ . '/apm_module.php';\n\
         $apm = new ApmModule(function (ApmSession $s) {\n    \
             $s->write('Hello World', ['x-status' => '200', 'content-type' => 'text/plain']);\n    \
             $s->close();\n\
         });\n\
         $apm->run();\n",
    );
    let port = free_port();
    d.load(&format!(
        "worker {{ name hello; exec php; params {}; instances 2; startup_grace 200; server http://127.0.0.1:{port}; }}\n",
        app.display()
    ));
    d.wait_running("hello");
    for _ in 0..2 {
        let answer = http_raw(
            port,
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        );
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(
            answer
                .to_ascii_lowercase()
                .contains("content-type: text/plain"),
            "{answer}"
        );
        assert!(answer.ends_with("\r\n\r\nHello World"), "{answer}");
    }
}
