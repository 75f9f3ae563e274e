//! The TCP connections of every PairDB gRPC peer (servers, internal channels, the client crate):
//! [`StepAside`] gathers what a connection's task writes in one turn and writes it at the task's
//! next turn, so concurrent responses (or requests) share one write; [`connect_stepping_aside`]
//! dials a channel's connection with it.
//!
//! HTTP/2 (`h2`) writes whatever frames are queued each time its connection task runs, and writes
//! every DATA frame of 256 bytes or more on its own: its encoder holds at most one such payload, so
//! ten 1 KiB responses ready at once still leave in ten `writev`s. On loopback TCP each `writev`
//! costs about as much CPU as the rest of a small request (the kernel runs the receiver's side of
//! TCP inside it and wakes the receiver). [`StepAside`] steps aside at the first write of a burst
//! (wakes the task and returns `Pending`: the task goes to the back of the runtime's run queue and
//! the handlers ready in that turn queue their frames), then takes every write into its own buffer,
//! and when the task flushes it wakes the task again and reports the flush done; the next turn
//! writes everything gathered, in one `write`, before it reads. A request's HEADERS, DATA and
//! END_STREAM frames leave together the same way.
//!
//! Invariants: no timer is involved, and gathered bytes never wait for anything but the task's next
//! turn — a deferred flush always wakes the task, and the next read, write past the bound, shutdown
//! or [`MAX_DEFERRED_FLUSHES`]-th flush writes them (HTTP/2 and HTTP/1 connection tasks read on every
//! turn). At most [`GATHER_LIMIT_BYTES`] are held; a larger write goes straight through.

use std::pin::Pin;
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// The most bytes a connection gathers before writing them.
pub const GATHER_LIMIT_BYTES: usize = 64 * 1024;
/// What a connection's buffer keeps between bursts (a larger burst's buffer is given back), so
/// idle connections hold at most this much each.
const IDLE_CAPACITY_BYTES: usize = 16 * 1024;
/// The most flushes reported done while bytes wait for the next turn; the next one writes them.
/// A bound against a writer that flushes repeatedly without ever reading (no PairDB peer does).
pub const MAX_DEFERRED_FLUSHES: u32 = 64;

/// Dials `uri`'s `host:port` with `TCP_NODELAY`, for a channel whose concurrent requests share
/// writes (a request's HEADERS and DATA frames too). Give it to
/// `Endpoint::connect_with_connector(_lazy)` through `tower::service_fn`: the endpoint still adds
/// TLS, the connect timeout and HTTP/2 keepalive on top.
pub async fn connect_stepping_aside(uri: http::Uri) -> std::io::Result<TokioIo<StepAside<TcpStream>>> {
    let (host, port) = host_and_port(&uri)?;
    let stream = TcpStream::connect((host, port)).await?;
    stream.set_nodelay(true)?;
    Ok(TokioIo::new(StepAside::new(stream)))
}

/// Where `uri` points: its host (an IPv6 literal without the brackets `http::Uri` keeps) and its
/// port, or the scheme's (80, or 443 for `https`) as tonic's own connector does.
fn host_and_port(uri: &http::Uri) -> std::io::Result<(&str, u16)> {
    let host = uri
        .host()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("no host in {uri}")))?;
    let default_port = if uri.scheme_str() == Some("https") { 443 } else { 80 };
    let port = uri.port_u16().unwrap_or(default_port);
    Ok((host.trim_start_matches('[').trim_end_matches(']'), port))
}

/// `inner` with its writes gathered until the task's next turn (see the module docs).
#[derive(Debug)]
pub struct StepAside<T> {
    inner: T,
    /// Bytes taken from the writer, not yet written to `inner` (the first `written` of them are).
    gathered: Vec<u8>,
    written: usize,
    /// Flushes reported done while `gathered` waits; 0 when nothing is deferred.
    deferred_flushes: u32,
    /// Whether writes are being gathered; when not, the next write steps aside first.
    gathering: bool,
}

impl<T> StepAside<T> {
    pub fn new(inner: T) -> Self {
        Self { inner, gathered: Vec::new(), written: 0, deferred_flushes: 0, gathering: false }
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    fn pending_bytes(&self) -> usize {
        self.gathered.len() - self.written
    }
}

impl<T: AsyncWrite + Unpin> StepAside<T> {
    /// Writes everything gathered to `inner`.
    fn poll_write_gathered(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while self.written < self.gathered.len() {
            let n =
                std::task::ready!(Pin::new(&mut self.inner).poll_write(cx, &self.gathered[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.gathered.clear();
        self.gathered.shrink_to(IDLE_CAPACITY_BYTES);
        self.written = 0;
        self.deferred_flushes = 0;
        Poll::Ready(Ok(()))
    }

    fn poll_gather(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        debug_assert!(self.gathering || self.pending_bytes() == 0, "bytes are held only while gathering");
        if !self.gathering {
            // The first write of a burst waits one turn, so the frames other tasks queue in that
            // turn join it (without this, it would leave alone at the next turn's read).
            self.gathering = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if self.pending_bytes() + total > GATHER_LIMIT_BYTES {
            std::task::ready!(self.poll_write_gathered(cx))?;
            if total > GATHER_LIMIT_BYTES {
                return Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
            }
        }
        for buf in bufs {
            self.gathered.extend_from_slice(buf);
        }
        debug_assert!(self.pending_bytes() <= GATHER_LIMIT_BYTES);
        Poll::Ready(Ok(total))
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for StepAside<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        // The task's next turn: what the last one gathered leaves first. A full socket buffer
        // (`Pending`) has registered the task for writability; reading goes on meanwhile.
        if self.pending_bytes() > 0 {
            match self.poll_write_gathered(cx) {
                Poll::Ready(Ok(())) => self.gathering = false,
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Pending => {}
            }
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for StepAside<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.poll_gather(cx, &[std::io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.poll_gather(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if self.pending_bytes() > 0 {
            if self.deferred_flushes < MAX_DEFERRED_FLUSHES {
                // Reported done, written at the next turn: the wake guarantees that turn comes.
                self.deferred_flushes += 1;
                cx.waker().wake_by_ref();
                return Poll::Ready(Ok(()));
            }
            std::task::ready!(self.poll_write_gathered(cx))?;
            self.gathering = false;
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        std::task::ready!(self.poll_write_gathered(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn buffered(far: &mut tokio::io::DuplexStream) -> Vec<u8> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut got = vec![0u8; 4096];
        let mut read = ReadBuf::new(&mut got);
        match Pin::new(far).poll_read(&mut cx, &mut read) {
            Poll::Ready(Ok(())) => read.filled().to_vec(),
            _ => Vec::new(),
        }
    }

    /// The first write of a burst steps aside (task woken); then writes are taken at once and a
    /// flush is reported done with the task woken, but nothing leaves until the task's next turn
    /// (its read); then everything leaves together, in order, and the next burst steps aside again.
    #[test]
    fn a_turns_writes_leave_together_at_the_next_read() {
        let (near, mut far) = tokio::io::duplex(1 << 20);
        let mut near = StepAside::new(near);
        let woken = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let waker = std::task::Waker::from(std::sync::Arc::new(Flag(woken.clone())));
        let mut cx = Context::from_waker(&waker);
        assert!(Pin::new(&mut near).poll_write(&mut cx, b"ab").is_pending());
        assert!(woken.swap(false, std::sync::atomic::Ordering::SeqCst), "stepping aside wakes the task");
        assert!(matches!(Pin::new(&mut near).poll_write(&mut cx, b"ab"), Poll::Ready(Ok(2))));
        let parts = [std::io::IoSlice::new(b"cd"), std::io::IoSlice::new(b"ef")];
        assert!(matches!(Pin::new(&mut near).poll_write_vectored(&mut cx, &parts), Poll::Ready(Ok(4))));
        assert!(Pin::new(&mut near).poll_flush(&mut cx).is_ready());
        assert!(woken.load(std::sync::atomic::Ordering::SeqCst), "a deferred flush wakes the task");
        assert!(buffered(&mut far).is_empty(), "nothing leaves before the next turn");
        let mut sink = [0u8; 8];
        let mut read = ReadBuf::new(&mut sink);
        assert!(Pin::new(&mut near).poll_read(&mut cx, &mut read).is_pending());
        assert_eq!(buffered(&mut far), b"abcdef");
        // Nothing gathered: a flush goes straight to the socket and wakes nobody.
        woken.store(false, std::sync::atomic::Ordering::SeqCst);
        assert!(Pin::new(&mut near).poll_flush(&mut cx).is_ready());
        assert!(!woken.load(std::sync::atomic::Ordering::SeqCst));
        assert!(Pin::new(&mut near).poll_write(&mut cx, b"gh").is_pending(), "a new burst steps aside");
    }

    struct Flag(std::sync::Arc<std::sync::atomic::AtomicBool>);
    impl std::task::Wake for Flag {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// Shutdown writes what is gathered first.
    #[tokio::test]
    async fn shutdown_writes_what_is_gathered() {
        let (near, mut far) = tokio::io::duplex(1 << 20);
        let mut near = StepAside::new(near);
        near.write_all(b"last words").await.expect("write");
        near.flush().await.expect("flush");
        near.shutdown().await.expect("shutdown");
        let mut got = Vec::new();
        far.read_to_end(&mut got).await.expect("read");
        assert_eq!(got, b"last words");
    }

    /// Past the bound, gathered bytes leave first and a larger write goes straight through, in order.
    #[tokio::test]
    async fn past_the_bound_bytes_leave_in_order() {
        let (near, mut far) = tokio::io::duplex(1 << 22);
        let mut near = StepAside::new(near);
        let small = vec![1u8; GATHER_LIMIT_BYTES - 10];
        let large = vec![2u8; GATHER_LIMIT_BYTES + 1];
        near.write_all(&small).await.expect("write");
        near.write_all(&large).await.expect("write");
        near.write_all(b"tail").await.expect("write");
        near.shutdown().await.expect("shutdown");
        let mut got = Vec::new();
        far.read_to_end(&mut got).await.expect("read");
        let expected: Vec<u8> = [small.as_slice(), large.as_slice(), b"tail".as_slice()].concat();
        assert!(got == expected, "{} bytes arrived, {} sent", got.len(), expected.len());
    }

    /// A writer that flushes and never reads still gets its bytes out after a bounded number of flushes.
    #[test]
    fn repeated_flushes_without_a_read_write_the_bytes() {
        let (near, mut far) = tokio::io::duplex(1 << 20);
        let mut near = StepAside::new(near);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(Pin::new(&mut near).poll_write(&mut cx, b"xyz").is_pending());
        assert!(matches!(Pin::new(&mut near).poll_write(&mut cx, b"xyz"), Poll::Ready(Ok(3))));
        for _ in 0..MAX_DEFERRED_FLUSHES {
            assert!(Pin::new(&mut near).poll_flush(&mut cx).is_ready());
            assert!(buffered(&mut far).is_empty());
        }
        assert!(Pin::new(&mut near).poll_flush(&mut cx).is_ready());
        assert_eq!(buffered(&mut far), b"xyz");
    }

    /// Host and port as tonic's own connector reads them: the scheme's port when none is given,
    /// IPv6 literals without brackets, and no host refused before dialling.
    #[test]
    fn host_and_port_default_by_scheme() {
        let of = |uri: &str| host_and_port(&uri.parse().expect("uri")).map(|(h, p)| (h.to_owned(), p));
        assert_eq!(of("http://db.example:7000").expect("ok"), ("db.example".to_owned(), 7000));
        assert_eq!(of("http://db.example").expect("ok"), ("db.example".to_owned(), 80));
        assert_eq!(of("https://db.example").expect("ok"), ("db.example".to_owned(), 443));
        assert_eq!(of("http://[::1]:5").expect("ok"), ("::1".to_owned(), 5));
        assert_eq!(of("/no/host").expect_err("no host").kind(), std::io::ErrorKind::InvalidInput);
    }

    /// The connector dials the URI's address and sets TCP_NODELAY.
    #[tokio::test]
    async fn dials_with_nodelay() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let uri = format!("http://127.0.0.1:{port}").parse().expect("uri");
        let io = connect_stepping_aside(uri).await.expect("connects");
        assert!(io.inner().get_ref().nodelay().expect("nodelay"));
    }
}
