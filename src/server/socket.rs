//! A connection's socket as the layer sees it: which protocol its first bytes
//! speak, and every read and write reported to its [`Conn`] state.

use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

use super::{conn::Conn, limits::H2_PREFACE};

/// What a connection's first bytes say it speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Speaks {
    /// The bytes read so far are this many first bytes of the HTTP/2
    /// preface (0: nothing read yet).
    Undecided(usize),
    Http1,
    /// The whole client preface (`PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`), as
    /// hyper-util's builder detects it; never when `server.http2` is off.
    Http2,
}

impl Speaks {
    /// What a connection speaks from its start: undecided when h2c is served.
    pub(super) fn at_start(http2: bool) -> Self {
        if http2 {
            Self::Undecided(0)
        } else {
            Self::Http1
        }
    }

    /// What it speaks once `read` follows the bytes read so far. An HTTP/1
    /// request with method `PRI` (`PRI / HTTP/1.1`, `PRI * HTTP/1.1`) differs
    /// from the preface within its request line, so it stays HTTP/1 and its
    /// later heads stay timed.
    fn after(self, read: &[u8]) -> Self {
        let Self::Undecided(matched) = self else {
            return self;
        };
        let rest = H2_PREFACE.get(matched..).unwrap_or_default();
        let n = read.len().min(rest.len());
        if read.get(..n) != rest.get(..n) {
            Self::Http1
        } else if matched + n == H2_PREFACE.len() {
            Self::Http2
        } else {
            Self::Undecided(matched + n)
        }
    }
}

/// The socket, reporting reads so a new request head starts its timer, and
/// writes so an answer the client does not take is noticed.
pub(super) struct Watched {
    pub(super) stream: TcpStream,
    pub(super) conn: Arc<Conn>,
    pub(super) speaks: Speaks,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        let read = buf.filled().get(before..).unwrap_or_default();
        if !read.is_empty() {
            let speaks = self.speaks.after(read);
            self.speaks = speaks;
            // HTTP/2 sends frames between requests (PING, SETTINGS,
            // WINDOW_UPDATE) that begin no request: its silences are idle ones.
            if speaks != Speaks::Http2 {
                self.conn.on_read();
            }
        }
        polled
    }
}

impl Watched {
    /// Reports a write's outcome to the connection (`Pending`: blocked).
    fn wrote(&self, polled: &Poll<io::Result<usize>>) {
        match polled {
            Poll::Pending => self.conn.on_write(true),
            Poll::Ready(Ok(n)) if *n > 0 => self.conn.on_write(false),
            Poll::Ready(_) => {}
        }
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.wrote(&polled);
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.wrote(&polled);
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_whole_http2_preface_makes_a_connection_http2() {
        let h2c = Speaks::at_start(true);
        assert_eq!(h2c.after(H2_PREFACE), Speaks::Http2);
        // In pieces, and followed by the first frame in the same read.
        let (head, tail) = H2_PREFACE.split_at(4);
        assert_eq!(h2c.after(head), Speaks::Undecided(4));
        assert_eq!(h2c.after(head).after(tail), Speaks::Http2);
        assert_eq!(
            h2c.after(&[H2_PREFACE.as_slice(), b"\0\0\0\x04"].concat()),
            Speaks::Http2
        );
        // An HTTP/1 request with method PRI is HTTP/1, whatever its target.
        assert_eq!(h2c.after(b"PRI / HTTP/1.1\r\n"), Speaks::Http1);
        assert_eq!(h2c.after(b"PRI ").after(b"* HTTP/1.1\r\n"), Speaks::Http1);
        assert_eq!(h2c.after(b"GET / HTTP/1.1\r\n"), Speaks::Http1);
        // Without h2c, everything is HTTP/1 (hyper's parser refuses the preface).
        assert_eq!(Speaks::at_start(false).after(H2_PREFACE), Speaks::Http1);
    }
}
