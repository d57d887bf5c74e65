//! Health checks (`health_check`). Pull mode: apm GETs a URL of the
//! instance every `health_check_interval`, and a 2xx or 3xx answer within
//! `health_check_timeout` passes. Push mode (`health_check on`): the
//! instance calls its `APM_HEALTH_URL`, a loopback endpoint of the daemon
//! with a secret token per process, at least once an interval. Each check
//! runs for one process: `health_check_threshold` failed checks in a row
//! make it unhealthy, and the supervisor restarts it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::Empty;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode, Uri};

/// What a check found, for the supervisor.
#[derive(Debug)]
pub enum Verdict {
    /// The first passed check of the process.
    Passed,
    Unhealthy(String),
}

pub enum Mode {
    /// GETs to `uri`, with `host` as its `Host`. With `upstream port`,
    /// `listening` is whether the instance accepts on its port yet: until
    /// it does, it is starting, and checks wait.
    Pull {
        uri: Uri,
        host: String,
        listening: Option<Arc<AtomicBool>>,
    },
    /// Check-ins through the daemon's endpoint.
    Push(CheckIn),
}

/// How often a check waiting for its instance to listen looks again.
const LISTENING_POLL: Duration = Duration::from_millis(20);

/// A worker's check settings; a change reaches its running checks.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Settings {
    /// When the first check is, after the process starts (`startup_grace`).
    pub first: Duration,
    pub interval: Duration,
    pub timeout: Duration,
    pub threshold: u32,
}

/// A process's health check; it ends when dropped.
pub struct Check {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Check {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub fn start(
    mode: Mode,
    settings: tokio::sync::watch::Receiver<Settings>,
    report: impl Fn(Verdict) + Send + 'static,
) -> Check {
    Check {
        task: tokio::spawn(run(mode, settings, report)),
    }
}

async fn run(
    mode: Mode,
    current: tokio::sync::watch::Receiver<Settings>,
    report: impl Fn(Verdict) + Send,
) {
    let settings = *current.borrow();
    // A pushing process gets a whole interval for its first check-in.
    let first = match mode {
        Mode::Pull { .. } => settings.first,
        Mode::Push(_) => settings.first + settings.interval,
    };
    tokio::time::sleep(first).await;
    if let Mode::Pull {
        listening: Some(listening),
        ..
    } = &mode
    {
        while !listening.load(Ordering::Acquire) {
            tokio::time::sleep(LISTENING_POLL).await;
        }
    }
    let (mut failures, mut passed) = (0, false);
    loop {
        let settings = *current.borrow();
        let outcome = match &mode {
            Mode::Pull { uri, host, .. } => probe(uri, host, settings.timeout).await,
            Mode::Push(check_in) => {
                if check_in.seen.swap(false, Ordering::AcqRel) {
                    Ok(())
                } else {
                    Err(format!(
                        "no call to APM_HEALTH_URL in {} ms",
                        settings.interval.as_millis()
                    ))
                }
            }
        };
        match outcome {
            Ok(()) => {
                failures = 0;
                if !std::mem::replace(&mut passed, true) {
                    report(Verdict::Passed);
                }
            }
            Err(why) => {
                failures += 1;
                if failures >= settings.threshold {
                    report(Verdict::Unhealthy(format!(
                        "{failures} failed health check(s) in a row, the last: {why}"
                    )));
                    return;
                }
            }
        }
        tokio::time::sleep(settings.interval).await;
    }
}

async fn probe(uri: &Uri, host: &str, timeout: Duration) -> Result<(), String> {
    let exchange = async {
        let authority = uri.authority().ok_or("the URL has no host")?;
        let tls = uri.scheme_str() == Some("https");
        let port = authority.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let stream = tokio::net::TcpStream::connect((authority.host(), port))
            .await
            .map_err(|e| format!("cannot connect to {authority}: {e}"))?;
        if !tls {
            return get(stream, uri, host).await;
        }
        let name = rustls_pki_types::ServerName::try_from(authority.host().to_owned())
            .map_err(|e| e.to_string())?;
        let stream = tokio_rustls::TlsConnector::from(probe_tls())
            .connect(name, stream)
            .await
            .map_err(|e| format!("TLS handshake: {e}"))?;
        get(stream, uri, host).await
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| format!("no answer in {} ms", timeout.as_millis()))?
}

async fn get<S>(stream: S, uri: &Uri, host: &str) -> Result<(), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let request = Request::get(path)
        .header(hyper::header::HOST, host)
        .header(hyper::header::USER_AGENT, "apm-health-check")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let answer = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let status = answer.status();
    if status.is_success() || status.is_redirection() {
        Ok(())
    } else {
        Err(format!("answered {status}"))
    }
}

/// An `https://` probe checks that the instance answers, not who it is:
/// its certificate is not verified (an app's own, often self-signed, and
/// nothing secret is sent).
fn probe_tls() -> Arc<rustls::ClientConfig> {
    static CONFIG: std::sync::OnceLock<Arc<rustls::ClientConfig>> = std::sync::OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .expect("ring supports the default versions")
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
                .with_no_client_auth();
            Arc::new(config)
        })
        .clone()
}

#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &[rustls_pki_types::CertificateDer<'_>],
        _: &rustls_pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A process's check-in: its token in the endpoint's table, removed when
/// this is dropped.
pub struct CheckIn {
    seen: Arc<AtomicBool>,
    token: String,
    tokens: Tokens,
}

impl Drop for CheckIn {
    fn drop(&mut self) {
        crate::locked(&self.tokens).remove(&self.token);
    }
}

const CHECK_IN_CONNECTION: Duration = Duration::from_secs(30);

type Tokens = Arc<Mutex<HashMap<String, Arc<AtomicBool>>>>;

/// The daemon's check-in endpoint: `GET` or `POST /TOKEN` on a loopback
/// port, answered 204 for a token it gave out and 404 for any other.
pub struct Endpoint {
    port: u16,
    tokens: Tokens,
    _task: tokio::task::JoinHandle<()>,
}

impl Endpoint {
    pub fn start() -> std::io::Result<Endpoint> {
        let listener = std::net::TcpListener::bind(("127.0.0.1", 0))?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let tokens = Tokens::default();
        let task = tokio::spawn(serve(listener, tokens.clone()));
        Ok(Endpoint {
            port,
            tokens,
            _task: task,
        })
    }

    /// A new token, and the URL a process calls with it.
    pub fn check_in(&self) -> std::io::Result<(CheckIn, String)> {
        let token = crate::random_token()?;
        let seen = Arc::new(AtomicBool::new(false));
        crate::locked(&self.tokens).insert(token.clone(), seen.clone());
        let url = format!("http://127.0.0.1:{}/{token}", self.port);
        Ok((
            CheckIn {
                seen,
                token,
                tokens: self.tokens.clone(),
            },
            url,
        ))
    }
}

async fn serve(listener: tokio::net::TcpListener, tokens: Tokens) {
    let mut errors = crate::AcceptErrors::default();
    loop {
        let stream = errors.next(&listener, "the health check-in endpoint").await;
        let tokens = tokens.clone();
        let service = hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
            let known = crate::locked(&tokens)
                .get(request.uri().path().trim_start_matches('/'))
                .map(|seen| seen.store(true, Ordering::Release))
                .is_some();
            let status = if known {
                StatusCode::NO_CONTENT
            } else {
                StatusCode::NOT_FOUND
            };
            let mut answer = Response::new(Empty::<Bytes>::new());
            *answer.status_mut() = status;
            std::future::ready(Ok::<_, std::convert::Infallible>(answer))
        });
        // A check-in takes a moment: a connection held longer (a process
        // that opens one and sends nothing) is closed.
        tokio::spawn(tokio::time::timeout(
            CHECK_IN_CONNECTION,
            hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
        ));
    }
}
