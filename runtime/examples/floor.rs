//! The least a hyper proxy does per request: each client connection gets
//! one upstream connection; no header is read or added. The proxy benchmark
//! measures it beside apm's upstream-port mode, as the floor hyper sets.
//! Listens on `127.0.0.1:$PORT`, forwards to `127.0.0.1:$UPSTREAM`, on
//! `$THREADS` threads (default 1), each a single-threaded runtime with a
//! `SO_REUSEPORT` listener of its own: what hyper does on as many threads
//! as `proxy_threads`, with no state shared between them.

use std::net::SocketAddr;

use hyper::Request;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

fn main() -> std::io::Result<()> {
    let number = |name: &str| -> Option<u16> { std::env::var(name).ok()?.parse().ok() };
    let port = |name: &str| number(name).unwrap_or_else(|| panic!("{name} is not a port"));
    let (listen, upstream) = (port("PORT"), port("UPSTREAM"));
    let upstream = SocketAddr::from(([127, 0, 0, 1], upstream));
    let listen = SocketAddr::from(([127, 0, 0, 1], listen));
    let others: Vec<_> = (1..number("THREADS").unwrap_or(1))
        .map(|_| std::thread::spawn(move || serve(listen, upstream)))
        .collect();
    let served = serve(listen, upstream);
    for other in others {
        other.join().expect("a serving thread panicked")?;
    }
    served
}

fn serve(listen: SocketAddr, upstream: SocketAddr) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.set_reuseport(true)?;
        socket.bind(listen)?;
        let listener = socket.listen(1024)?;
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
