//! The TCP connections of every PairDB gRPC peer (servers, internal channels, the client crate):
//! [`StepAside`] lets a connection's task step aside once before each write, so concurrent
//! responses (or requests) share one `writev`; [`connect_stepping_aside`] dials a channel's
//! connection with it.
//!
//! HTTP/2 (`h2`) writes whatever frames are queued each time its connection task runs. Under load
//! the task is woken by the first of many handlers that finish in the same moment and flushes that
//! one frame on its own; on loopback TCP each `writev` costs about as much CPU as the rest of a
//! small request, because the kernel runs the receiver's side of TCP inside it. [`StepAside`] makes
//! the first write after each flush return `Pending` after waking the task again: the task goes to
//! the back of the runtime's run queue, the handlers ready in that turn queue their frames, and the
//! next attempt writes them all. A request's HEADERS, DATA and END_STREAM frames leave together the
//! same way.
//!
//! Invariant: no timer is involved. The task is woken before `Pending` is returned, so the write
//! is delayed by at most one turn of the run queue; with nothing else ready (low load) that is one
//! extra poll.

use std::pin::Pin;
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Dials `uri`'s `host:port` with `TCP_NODELAY`, for a channel whose concurrent requests share
/// `writev`s (a request's HEADERS and DATA frames too). Give it to
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

/// `inner` with one step aside before the first write after each flush.
#[derive(Debug)]
pub struct StepAside<T> {
    inner: T,
    stepped_aside: bool,
}

impl<T> StepAside<T> {
    pub fn new(inner: T) -> Self {
        Self { inner, stepped_aside: false }
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    /// `true` when the caller must return `Pending` (its task is already woken).
    fn step_aside(&mut self, cx: &mut Context<'_>) -> bool {
        if self.stepped_aside {
            return false;
        }
        self.stepped_aside = true;
        cx.waker().wake_by_ref();
        true
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for StepAside<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for StepAside<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.step_aside(cx) {
            return Poll::Pending;
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        if self.step_aside(cx) {
            return Poll::Pending;
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let flushed = Pin::new(&mut self.inner).poll_flush(cx);
        if flushed.is_ready() {
            self.stepped_aside = false;
        }
        flushed
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The first write after a flush is `Pending` with the task woken; the retry and further writes
    /// until the next flush go through; the bytes arrive whole.
    #[tokio::test]
    async fn steps_aside_once_per_flush_and_delivers_every_byte() {
        let (near, mut far) = tokio::io::duplex(1024);
        let mut near = StepAside::new(near);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(Pin::new(&mut near).poll_write(&mut cx, b"ab").is_pending());
        assert!(matches!(Pin::new(&mut near).poll_write(&mut cx, b"ab"), Poll::Ready(Ok(2))));
        assert!(matches!(Pin::new(&mut near).poll_write(&mut cx, b"cd"), Poll::Ready(Ok(2))));
        assert!(Pin::new(&mut near).poll_flush(&mut cx).is_ready());
        assert!(Pin::new(&mut near).poll_write(&mut cx, b"ef").is_pending());
        near.write_all(b"ef").await.expect("write");
        near.flush().await.expect("flush");
        let mut got = [0u8; 6];
        far.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"abcdef");
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
