//! The least a hyper proxy does per request: each client connection gets
//! one upstream connection; no header is read or added. The proxy benchmark
//! measures it beside apm's upstream-port mode, as the floor hyper sets.
//! Listens on `127.0.0.1:$PORT`, forwards to `127.0.0.1:$UPSTREAM`.

use std::net::SocketAddr;

use hyper::Request;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

fn main() -> std::io::Result<()> {
    let port = |name: &str| -> u16 {
        std::env::var(name)
            .ok()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("{name} is not a port"))
    };
    let (listen, upstream) = (port("PORT"), port("UPSTREAM"));
    let upstream = SocketAddr::from(([127, 0, 0, 1], upstream));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", listen)).await?;
        loop {
            let (client, _) = listener.accept().await?;
            client.set_nodelay(true)?;
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                    return;
                };
                let _ = server.set_nodelay(true);
                let Ok((sender, connection)) = hyper::client::conn::http1::Builder::new()
                    .writev(false)
                    .handshake::<_, Incoming>(TokioIo::new(server))
                    .await
                else {
                    return;
                };
                tokio::spawn(connection);
                let sender = std::sync::Arc::new(tokio::sync::Mutex::new(sender));
                let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                    let sender = sender.clone();
                    async move {
                        let mut sender = sender.lock().await;
                        sender.ready().await?;
                        sender.send_request(request).await
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .writev(false)
                    .serve_connection(TokioIo::new(client), service)
                    .await;
            });
        }
    })
}
