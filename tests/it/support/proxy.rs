//! A TCP proxy on loopback between the daemon and a cluster, for network faults: cut every
//! live connection with a reset, delay every forwarded chunk, or black-hole the link (bytes
//! and closes held, nothing answered) the way a silent partition does.
//!
//! It runs on its own thread and runtime so that a test blocking its own runtime (a `psql`
//! call) never stalls the link by accident. Dropping it closes everything.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

struct Control {
    delay_us: AtomicU64,
    /// Incremented by [`Proxy::cut`]; each connection ends when it changes.
    cuts: watch::Sender<u64>,
    /// While set nothing moves in either direction, and new connections are accepted but
    /// not forwarded.
    holes: watch::Sender<bool>,
    accepted: AtomicUsize,
    live: AtomicUsize,
    forwarded: AtomicU64,
}

pub struct Proxy {
    addr: SocketAddr,
    control: Arc<Control>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to 127.0.0.1:`upstream`.
    pub fn start(upstream: u16) -> Result<Proxy> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let control = Arc::new(Control {
            delay_us: AtomicU64::new(0),
            cuts: watch::channel(0).0,
            holes: watch::channel(false).0,
            accepted: AtomicUsize::new(0),
            live: AtomicUsize::new(0),
            forwarded: AtomicU64::new(0),
        });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let c = control.clone();
        let thread = std::thread::Builder::new()
            .name(format!("proxy-{}", addr.port()))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime for the proxy");
                rt.block_on(async move {
                    let listener = TcpListener::from_std(listener).expect("tokio listener");
                    tokio::select! {
                        _ = stopped => {}
                        _ = accept_loop(listener, upstream, c) => {}
                    }
                });
                // Dropping the runtime drops every connection task, closing its sockets.
            })?;
        Ok(Proxy {
            addr,
            control,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Resets every live connection (both sides see ECONNRESET or EOF at once).
    pub fn cut(&self) {
        self.control.cuts.send_modify(|n| *n += 1);
    }

    /// Each chunk waits this long before it is forwarded, in both directions.
    pub fn delay(&self, d: Duration) {
        self.control
            .delay_us
            .store(d.as_micros() as u64, Ordering::SeqCst);
    }

    /// Black-holes the link (true) or lets the held bytes and closes through (false).
    pub fn black_hole(&self, on: bool) {
        self.control.holes.send_replace(on);
    }

    /// Connections accepted since the start.
    pub fn accepted(&self) -> usize {
        self.control.accepted.load(Ordering::SeqCst)
    }

    /// Connections open now.
    pub fn live(&self) -> usize {
        self.control.live.load(Ordering::SeqCst)
    }

    /// Bytes forwarded in both directions.
    pub fn forwarded(&self) -> u64 {
        self.control.forwarded.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn accept_loop(listener: TcpListener, upstream: u16, control: Arc<Control>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        control.accepted.fetch_add(1, Ordering::SeqCst);
        let c = control.clone();
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                reset_on_drop(&client);
                return;
            };
            c.live.fetch_add(1, Ordering::SeqCst);
            connection(client, server, &c).await;
            c.live.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

/// Forwards both ways until both sides closed cleanly; a cut or an error resets both.
async fn connection(client: TcpStream, server: TcpStream, control: &Control) {
    // Linger 0: dropping a socket sends a reset, as a real cut does, not a FIN.
    for s in [&client, &server] {
        let _ = s.set_nodelay(true);
        reset_on_drop(s);
    }
    let mut cuts = control.cuts.subscribe();
    cuts.borrow_and_update();
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let up = pump(cr, sw, control);
    let down = pump(sr, cw, control);
    tokio::pin!(up, down);
    let (mut up_done, mut down_done) = (false, false);
    while !(up_done && down_done) {
        tokio::select! {
            _ = cuts.changed() => return,
            clean = &mut up, if !up_done => { if !clean { return } up_done = true; }
            clean = &mut down, if !down_done => { if !clean { return } down_done = true; }
        }
    }
}

/// Copies one direction until EOF (passed on as a FIN: true) or an error (false).
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, control: &Control) -> bool {
    let mut buf = vec![0u8; 64 * 1024];
    let mut holes = control.holes.subscribe();
    loop {
        let Ok(n) = from.read(&mut buf).await else {
            return false;
        };
        // Held while the link is a black hole: bytes and closes alike.
        while *holes.borrow_and_update() {
            if holes.changed().await.is_err() {
                return false;
            }
        }
        if n == 0 {
            return to.shutdown().await.is_ok();
        }
        let delay = control.delay_us.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_micros(delay)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return false;
        }
        control.forwarded.fetch_add(n as u64, Ordering::SeqCst);
    }
}

/// SO_LINGER 0: closing sends a reset. (tokio deprecates `set_linger` because a non-zero
/// linger blocks the thread on drop; a zero linger returns at once.)
#[allow(deprecated)]
fn reset_on_drop(s: &TcpStream) {
    let _ = s.set_linger(Some(Duration::ZERO));
}
