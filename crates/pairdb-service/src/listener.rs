//! Limits every listener enforces before any request work: a cap on open connections (extra ones
//! are closed at once and counted), a deadline for a new connection's first byte (a connection that
//! says nothing cannot squat a slot of the cap), a cap on concurrent HTTP/2 streams per connection,
//! and a deadline for reading an HTTP request body (a client trickling a body cannot hold a handler
//! forever).

use std::future::Future;
use std::io::ErrorKind;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use futures::Stream;
use pairdb_proto::transport::StepAside;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::transport::server::{Connected, TcpConnectInfo, TcpIncoming};

/// The listener flags every service takes.
#[derive(Debug, Clone, clap::Args)]
pub struct ListenerArgs {
    /// Open connections this listener keeps; further connections are closed at once (metric
    /// pairdb_connections_refused_total).
    #[arg(long, env = "PAIRDB_MAX_CONNECTIONS", default_value_t = 4096)]
    pub max_connections: usize,
    /// A new connection that sends nothing for this long is closed (it would hold a slot of
    /// --max-connections).
    #[arg(long, env = "PAIRDB_FIRST_BYTE_TIMEOUT_MS", default_value_t = 10_000)]
    pub first_byte_timeout_ms: u64,
    /// Concurrent HTTP/2 streams (requests) per connection.
    #[arg(long, env = "PAIRDB_MAX_CONCURRENT_STREAMS", default_value_t = 1024)]
    pub max_concurrent_streams: u32,
    /// An HTTP request body must arrive completely within this long (HTTP 408 otherwise).
    #[arg(long, env = "PAIRDB_HTTP_BODY_TIMEOUT_MS", default_value_t = 10_000)]
    pub http_body_timeout_ms: u64,
}

impl Default for ListenerArgs {
    fn default() -> Self {
        Self {
            max_connections: 4096,
            first_byte_timeout_ms: 10_000,
            max_concurrent_streams: 1024,
            http_body_timeout_ms: 10_000,
        }
    }
}

/// A listener flag out of range; the message names the field.
#[derive(Debug, thiserror::Error)]
pub enum ListenerArgsError {
    #[error("max_connections: must be between 1 and 1000000")]
    MaxConnections,
    #[error("max_concurrent_streams: must be between 1 and 100000")]
    MaxConcurrentStreams,
    #[error("http_body_timeout_ms: must be between 100 and 600000")]
    HttpBodyTimeout,
    #[error("first_byte_timeout_ms: must be between 100 and 600000")]
    FirstByteTimeout,
}

impl ListenerArgs {
    pub fn validate(&self) -> Result<(), ListenerArgsError> {
        if !(1..=1_000_000).contains(&self.max_connections) {
            return Err(ListenerArgsError::MaxConnections);
        }
        if !(1..=100_000).contains(&self.max_concurrent_streams) {
            return Err(ListenerArgsError::MaxConcurrentStreams);
        }
        if !(100..=600_000).contains(&self.http_body_timeout_ms) {
            return Err(ListenerArgsError::HttpBodyTimeout);
        }
        if !(100..=600_000).contains(&self.first_byte_timeout_ms) {
            return Err(ListenerArgsError::FirstByteTimeout);
        }
        Ok(())
    }
}

/// Accepted connections, at most `max` open at once; the rest are closed as soon as accepted.
pub(crate) struct CappedIncoming {
    inner: TcpIncoming,
    permits: Arc<Semaphore>,
    first_byte_timeout: Duration,
    service: &'static str,
}

impl CappedIncoming {
    pub(crate) fn new(inner: TcpIncoming, limits: &ListenerArgs, service: &'static str) -> Self {
        metrics::counter!("pairdb_connections_refused_total", "service" => service).increment(0);
        metrics::counter!("pairdb_connections_silent_closed_total", "service" => service).increment(0);
        metrics::gauge!("pairdb_connections_open", "service" => service).set(0.0);
        Self {
            inner,
            permits: Arc::new(Semaphore::new(limits.max_connections)),
            first_byte_timeout: Duration::from_millis(limits.first_byte_timeout_ms),
            service,
        }
    }
}

impl Stream for CappedIncoming {
    type Item = std::io::Result<CappedStream>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            let stream = match Pin::new(&mut self.inner).poll_next(cx) {
                Poll::Ready(Some(Ok(stream))) => stream,
                Poll::Ready(Some(Err(error))) => return Poll::Ready(Some(Err(error))),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            };
            match self.permits.clone().try_acquire_owned() {
                Ok(permit) => {
                    metrics::gauge!("pairdb_connections_open", "service" => self.service).increment(1.0);
                    let silent_until = Some(Box::pin(tokio::time::sleep(self.first_byte_timeout)));
                    return Poll::Ready(Some(Ok(CappedStream {
                        stream: StepAside::new(stream),
                        _permit: permit,
                        silent_until,
                        service: self.service,
                        registry: crate::metrics::Registry::entered(),
                    })));
                }
                // Dropping the stream closes it: the client sees the connection end at once.
                Err(_) => {
                    metrics::counter!("pairdb_connections_refused_total", "service" => self.service)
                        .increment(1);
                    drop(stream);
                }
            }
        }
    }
}

/// An accepted connection holding one of the listener's connection slots until it closes.
pub(crate) struct CappedStream {
    /// Responses finishing together leave in one write ([`StepAside`]).
    stream: StepAside<TcpStream>,
    _permit: OwnedSemaphorePermit,
    /// Until the first byte arrives: when the connection is closed if it stays silent.
    silent_until: Option<Pin<Box<tokio::time::Sleep>>>,
    service: &'static str,
    /// The registry the listener counted the connection in (the connection ends in a task of the
    /// server's, outside it).
    registry: Option<crate::metrics::Registry>,
}

impl Drop for CappedStream {
    fn drop(&mut self) {
        crate::metrics::within(self.registry, || {
            metrics::gauge!("pairdb_connections_open", "service" => self.service).decrement(1.0);
        });
    }
}

impl Connected for CappedStream {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.get_ref().connect_info()
    }
}

impl AsyncRead for CappedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let filled = buf.filled().len();
        let read = Pin::new(&mut self.stream).poll_read(cx, buf);
        if self.silent_until.is_some() {
            if buf.filled().len() > filled {
                self.silent_until = None;
            } else if read.is_pending()
                && let Some(deadline) = self.silent_until.as_mut()
                && deadline.as_mut().poll(cx).is_ready()
            {
                crate::metrics::within(self.registry, || {
                    metrics::counter!("pairdb_connections_silent_closed_total", "service" => self.service)
                        .increment(1);
                });
                return Poll::Ready(Err(std::io::Error::new(
                    ErrorKind::TimedOut,
                    "connection sent nothing before the first-byte deadline",
                )));
            }
        }
        read
    }
}

impl AsyncWrite for CappedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// The error of a request body that did not arrive in time.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {0:?}")]
pub struct BodyTimeout(pub Duration);

/// A request body that fails with [`BodyTimeout`] once its deadline passes.
struct DeadlineBody {
    inner: Body,
    deadline: Pin<Box<tokio::time::Sleep>>,
    timeout: Duration,
}

impl http_body::Body for DeadlineBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame);
        }
        if self.deadline.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Some(Err(axum::Error::new(BodyTimeout(self.timeout)))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Middleware for the HTTP routes: the request body must be read within `timeout` of the request
/// reaching the handler.
pub async fn body_deadline(State(timeout): State<Duration>, request: Request, next: Next) -> Response {
    let request = request.map(|inner| {
        Body::new(DeadlineBody { inner, deadline: Box::pin(tokio::time::sleep(timeout)), timeout })
    });
    next.run(request).await
}

/// Whether reading a body failed because its deadline passed.
pub fn is_body_timeout(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(error);
    while let Some(error) = source {
        if error.is::<BodyTimeout>() {
            return true;
        }
        source = error.source();
    }
    false
}
