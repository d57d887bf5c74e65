//! A validation pass the compiler cannot run, since it has no TLS library:
//! every worker with `tls` must have a certificate chain and a key that load
//! and go together, and a usable `tls_ca`. Failures become E0018 diagnostics
//! on the file that names them, so `apm check` and reloads catch them.

use apm_compiler::{Compilation, Diagnostic, codes};

pub fn check(compilation: &mut Compilation) {
    let mut found = Vec::new();
    for spec in compilation.config.workers.iter().filter(|w| w.tls.value) {
        let (Some(cert), Some(key)) = (&spec.tls_cert, &spec.tls_key) else {
            continue;
        };
        // Files that cannot be read are already reported by the compiler.
        let readable = |path: &std::path::Path| std::fs::metadata(path).is_ok();
        if !readable(&cert.value)
            || !readable(&key.value)
            || spec.tls_ca.as_ref().is_some_and(|ca| !readable(&ca.value))
        {
            continue;
        }
        if let Err(error) = apm_runtime::traffic::tls::acceptor(
            &cert.value,
            &key.value,
            spec.tls_ca.as_ref().map(|c| c.value.as_path()),
        ) && let Some(span) = cert.span
        {
            found.push(
                Diagnostic::new(&codes::TLS_UNUSABLE, span, format!("TLS cannot start: {error}"))
                    .label("certificate named here")
                    .help("tls_cert needs PEM certificates (the server's first), tls_key its PEM private key"),
            );
        }
    }
    compilation.diagnostics.extend(found);
}
