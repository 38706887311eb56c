//! A TCP relay in front of a real server whose replies can be made late:
//! every chunk the server sends waits the current delay before the client
//! gets it, while requests pass at once (so the server applies them on time
//! and only the answers are late — a slow network or an overloaded Redis as
//! a client sees it). The delay is switched at run time. Connections open
//! so far can also be stalled for good ([`SlowRelay::stall_existing`]).

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::JoinSet,
};

/// A relay to `127.0.0.1:<target>`; stops (with its connections) on drop.
pub struct SlowRelay {
    pub port: u16,
    delay_ms: Arc<AtomicU64>,
    /// Connections numbered below this pass nothing more, either way.
    stalled_below: Arc<AtomicU64>,
    accepted: Arc<AtomicU64>,
    tasks: JoinSet<()>,
}

impl SlowRelay {
    /// Relays connections on a free port to `127.0.0.1:<target>`, fast at first.
    pub async fn start(target: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let delay_ms = Arc::new(AtomicU64::new(0));
        let stalled_below = Arc::new(AtomicU64::new(0));
        let accepted = Arc::new(AtomicU64::new(0));
        let mut tasks = JoinSet::new();
        let (delay, stalled, count) = (
            Arc::clone(&delay_ms),
            Arc::clone(&stalled_below),
            Arc::clone(&accepted),
        );
        tasks.spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)).await else {
                    continue;
                };
                let number = count.fetch_add(1, Ordering::Relaxed);
                let stall = Stall {
                    number,
                    below: Arc::clone(&stalled),
                };
                connections.spawn(relay(client, server, Arc::clone(&delay), stall));
            }
        });
        Self {
            port,
            delay_ms,
            stalled_below,
            accepted,
            tasks,
        }
    }

    /// `redis://127.0.0.1:<port>`: the relayed Redis.
    pub fn redis_url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Every reply chunk from now on waits `delay` (zero: none).
    pub fn set_delay(&self, delay: Duration) {
        let millis = u64::try_from(delay.as_millis()).unwrap();
        self.delay_ms.store(millis, Ordering::Relaxed);
    }
}

impl SlowRelay {
    /// Every connection open now stops passing anything, without a reset
    /// (a dropped NAT entry, a peer gone without a word); new ones work.
    pub fn stall_existing(&self) {
        let accepted = self.accepted.load(Ordering::Relaxed);
        self.stalled_below.store(accepted, Ordering::Relaxed);
    }
}

/// Whether a connection is stalled: numbered below the mark.
struct Stall {
    number: u64,
    below: Arc<AtomicU64>,
}

impl Stall {
    /// Never returns once the connection is stalled.
    async fn check(&self) {
        if self.number < self.below.load(Ordering::Relaxed) {
            std::future::pending::<()>().await;
        }
    }
}

impl Drop for SlowRelay {
    fn drop(&mut self) {
        self.tasks.abort_all();
    }
}

/// Copies both ways until either side closes (or for ever once stalled);
/// server → client waits the delay.
async fn relay(client: TcpStream, server: TcpStream, delay_ms: Arc<AtomicU64>, stall: Stall) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let requests = async {
        let mut buf = vec![0u8; 16 * 1024];
        while let Ok(n @ 1..) = client_read.read(&mut buf).await {
            stall.check().await;
            if server_write.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
    };
    let replies = async {
        let mut buf = vec![0u8; 16 * 1024];
        while let Ok(n @ 1..) = server_read.read(&mut buf).await {
            let delay = delay_ms.load(Ordering::Relaxed);
            if delay > 0 {
                // The simulated latency itself, not a wait for a signal.
                tokio::time::sleep(Duration::from_millis(delay)).await;
            }
            stall.check().await;
            if client_write.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
    };
    tokio::select! {
        () = requests => {}
        () = replies => {}
    }
}
