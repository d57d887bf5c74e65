#!/usr/bin/env python3
"""sslyze scans of apm's TLS listeners against Mozilla's "intermediate"
configuration: an `https://` listener, and an mTLS one (`tls_ca`) scanned with
a client certificate. The run's CA is given to sslyze so that path validation
is part of the check. Prints sslyze's compliance verdict per listener and
exits non-zero when one is not compliant. Needs openssl and sslyze (PyPI;
installed into a venv under target/ on first run).

Usage: cargo build --release --examples -p apm-runtime && cargo build --release && python3 bench/tls_scan.py
"""

import os
import shutil
import subprocess
import sys
import tempfile

from common import apm_env, free_port, wait_port
from proxy import make_certificate

VENV = os.path.abspath("target/sslyze-venv")


def sslyze():
    binary = os.path.join(VENV, "bin", "sslyze")
    if not os.path.exists(binary):
        subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
        subprocess.run([os.path.join(VENV, "bin", "pip"), "install", "-q", "sslyze"], check=True)
    return binary


def main():
    scanner = sslyze()
    hello = os.path.abspath("target/release/examples/hello")
    apm = os.path.abspath("target/release/apm")
    root = tempfile.mkdtemp(prefix="apm-bench-tls-")
    env = apm_env(root, "tls")
    try:
        cert, key = make_certificate(root)
        client_cert, client_key = make_certificate(root, "client", "clientAuth", "/CN=scanner")
        ca = os.path.join(root, "ca.pem")
        https, mtls = free_port(), free_port()
        conf = os.path.join(root, "apm.conf")
        with open(conf, "w") as f:
            for name, port, extra in [("https", https, ""), ("mtls", mtls, f"tls_ca {ca};")]:
                f.write(f"worker {{ name {name}; exec {hello}; upstream port; server https://127.0.0.1:{port}; tls on; tls_cert {cert}; tls_key {key}; {extra} }}\n")
        subprocess.run([apm, "load", conf], env=env, check=True, capture_output=True)
        wait_port(https)
        wait_port(mtls)
        compliant = True
        for name, port, args in [("https", https, []), ("mtls (with a client certificate)", mtls, ["--cert", client_cert, "--key", client_key])]:
            out = subprocess.run([scanner, "--mozilla_config=intermediate", f"--certinfo_ca_file={ca}", *args, f"127.0.0.1:{port}"], capture_output=True, text=True).stdout
            verdict = out[out.index("COMPLIANCE AGAINST"):] if "COMPLIANCE AGAINST" in out else out[-2000:]
            lines = [line.strip() for line in verdict.splitlines() if line.strip().startswith(("127.0.0.1", "*"))]
            print(f"{name}: " + " / ".join(lines))
            compliant &= any("OK - Compliant" in line for line in lines)
        print("Mozilla intermediate: " + ("passed" if compliant else "FAILED"))
        sys.exit(0 if compliant else 1)
    finally:
        subprocess.run([apm, "exit", "daemon"], env=env, capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
