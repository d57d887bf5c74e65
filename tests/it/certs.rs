//! Test certificates made with openssl: self-signed ones, and a CA with the
//! certificates it signs. Each helper says whether openssl succeeded, so that
//! a test can skip on a machine without it.

use std::path::Path;

/// Runs `openssl ARGS` in `dir`.
pub fn openssl(dir: &Path, args: &[&str]) -> bool {
    std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .is_ok_and(|o| o.status.success())
}

const NEW_P256_KEY: [&str; 6] = [
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:P-256",
    "-nodes",
    "-keyout",
];

/// A self-signed certificate for `subject` in `cert`, its key in `key`.
pub fn self_signed(dir: &Path, key: &str, cert: &str, subject: &str) -> bool {
    let head = [&["req", "-x509"], &NEW_P256_KEY[..]].concat();
    let tail = [key, "-out", cert, "-days", "2", "-subj", subject];
    openssl(dir, &[&head[..], &tail[..]].concat())
}

/// A CA (`ca.pem`, `ca.key`) and a certificate for 127.0.0.1 it signed
/// (`site.pem`, `site.key`).
pub fn make_certificates(dir: &Path) -> bool {
    self_signed(dir, "ca.key", "ca.pem", "/CN=apm test CA")
        && signed_by_ca(
            dir,
            "site",
            "/CN=127.0.0.1",
            "basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1\n",
        )
}

/// A new key (`NAME.key`) and a certificate for `subject` (`NAME.pem`) that
/// the CA of `make_certificates` signed with the `extensions`.
pub fn signed_by_ca(dir: &Path, name: &str, subject: &str, extensions: &str) -> bool {
    std::fs::write(dir.join(format!("{name}.cnf")), extensions).unwrap();
    let (key, csr) = (format!("{name}.key"), format!("{name}.csr"));
    let request = [
        &["req"],
        &NEW_P256_KEY[..],
        &[&key, "-out", &csr, "-subj", subject],
    ]
    .concat();
    openssl(dir, &request) && sign(dir, name, 2)
}

/// Signs `NAME.csr` with the CA into `NAME.pem`, valid for `days`; signing
/// again makes a new certificate (new serial) for the same key.
pub fn sign(dir: &Path, name: &str, days: u32) -> bool {
    let (csr, pem, cnf) = (
        format!("{name}.csr"),
        format!("{name}.pem"),
        format!("{name}.cnf"),
    );
    let days = days.to_string();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &pem,
            "-days",
            &days,
            "-extfile",
            &cnf,
        ],
    )
}
