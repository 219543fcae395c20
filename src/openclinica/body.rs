//! The one shape every document comes in: an [`AsyncBufRead`] the caller
//! streams into the ODM reader, never a buffer holding the whole document.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use tokio::io::{AsyncBufRead, AsyncRead, ReadBuf};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Sleep;

use super::error::{OcError, Origin};

/// One ODM document being read: an HTTP response body or an extract file.
///
/// Reading may fail with an `io::Error` that wraps an [`OcError`]; use
/// [`is_transient_io`](super::is_transient_io) to tell a broken-off
/// download (retry the document) from anything else.
pub struct Body {
    reader: Pin<Box<dyn AsyncBufRead + Send>>,
    subject: Option<String>,
}

impl Body {
    pub(crate) fn new(reader: impl AsyncBufRead + Send + 'static, subject: Option<String>) -> Self {
        Self {
            reader: Box::pin(reader),
            subject,
        }
    }

    /// The subject this document was asked for, when it was asked for one
    /// subject (for [`Scope::Subjects`](super::Scope::Subjects), to tell
    /// the bodies apart).
    pub fn subject(&self) -> Option<&str> {
        self.subject.as_deref()
    }
}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Body")
            .field("subject", &self.subject)
            .finish_non_exhaustive()
    }
}

impl AsyncRead for Body {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.get_mut().reader.as_mut().poll_read(cx, buf)
    }
}

impl AsyncBufRead for Body {
    fn poll_fill_buf(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<&[u8]>> {
        self.get_mut().reader.as_mut().poll_fill_buf(cx)
    }

    fn consume(self: Pin<&mut Self>, amt: usize) {
        self.get_mut().reader.as_mut().consume(amt)
    }
}

/// An HTTP body as a stream of chunks that
/// - holds its server's concurrency permit until the body ends, fails or is
///   dropped, so a slow consumer counts against the server's limit;
/// - fails when the server stays silent for longer than `idle` while the
///   consumer is waiting for it. The clock runs only while a read is
///   pending: a consumer that takes its time between reads (a large batch
///   write) does not trip it, unlike reqwest's own read timeout;
/// - turns every failure into an `io::Error` wrapping [`OcError::Body`],
///   which is transient.
pub(crate) struct HttpChunks {
    inner: Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>,
    idle: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
    bytes: u64,
    server: Origin,
    path: String,
    permit: Option<OwnedSemaphorePermit>,
}

impl HttpChunks {
    pub(crate) fn new(
        response: reqwest::Response,
        permit: OwnedSemaphorePermit,
        idle: Duration,
        server: Origin,
        path: String,
    ) -> Self {
        Self {
            inner: Box::pin(response.bytes_stream()),
            idle,
            sleep: None,
            bytes: 0,
            server,
            path,
            permit: Some(permit),
        }
    }

    fn fail(
        &mut self,
        what: String,
        source: Option<reqwest::Error>,
        kind: io::ErrorKind,
    ) -> io::Error {
        // The body is over: let another request have the slot now.
        self.permit = None;
        let err = OcError::Body {
            server: self.server.clone(),
            path: self.path.clone(),
            bytes: self.bytes,
            what,
            source: source.map(reqwest::Error::without_url),
        };
        tracing::warn!(server = %self.server, path = %self.path, bytes = self.bytes, "response body broken off");
        io::Error::new(kind, err)
    }
}

impl Stream for HttpChunks {
    type Item = io::Result<Bytes>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.permit.is_none() {
            // Ended or failed before: stay ended.
            return Poll::Ready(None);
        }
        match this.inner.as_mut().poll_next(cx) {
            Poll::Ready(Some(Ok(chunk))) => {
                this.sleep = None;
                this.bytes += chunk.len() as u64;
                Poll::Ready(Some(Ok(chunk)))
            }
            Poll::Ready(Some(Err(e))) => {
                let what = if e.is_decode() {
                    "the compressed stream is corrupt or cut".to_owned()
                } else {
                    "the connection closed before the end of the body".to_owned()
                };
                Poll::Ready(Some(Err(this.fail(
                    what,
                    Some(e),
                    io::ErrorKind::UnexpectedEof,
                ))))
            }
            Poll::Ready(None) => {
                this.permit = None;
                Poll::Ready(None)
            }
            Poll::Pending => {
                let idle = this.idle;
                let sleep = this
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
                if sleep.as_mut().poll(cx).is_ready() {
                    let what = format!("no data for {} ms", idle.as_millis());
                    Poll::Ready(Some(Err(this.fail(what, None, io::ErrorKind::TimedOut))))
                } else {
                    Poll::Pending
                }
            }
        }
    }
}

/// Chunks of a body, pulled from the server by a task of their own up to
/// `budget` bytes ahead of the consumer. The idle timeout of the chunks
/// still runs only while that task waits on the server; it stops reading
/// (and the server's sending is held back by TCP) while the budget is
/// spent. Dropping the stream stops the task and drops the response.
pub(crate) struct ReadAhead {
    rx: tokio::sync::mpsc::UnboundedReceiver<(io::Result<Bytes>, OwnedSemaphorePermit)>,
    _pump: tokio_util::task::AbortOnDropHandle<()>,
}

impl ReadAhead {
    pub(crate) fn spawn(mut chunks: HttpChunks, budget: usize) -> Self {
        use futures::StreamExt;
        let budget = budget.clamp(1, tokio::sync::Semaphore::MAX_PERMITS);
        let room = std::sync::Arc::new(tokio::sync::Semaphore::new(budget));
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let pump = tokio::spawn(async move {
            while let Some(item) = chunks.next().await {
                let size = item.as_ref().map_or(0, Bytes::len).clamp(1, budget);
                let Ok(permit) = room.clone().acquire_many_owned(size as u32).await else {
                    return;
                };
                let failed = item.is_err();
                if tx.send((item, permit)).is_err() || failed {
                    return;
                }
            }
        });
        Self {
            rx,
            _pump: tokio_util::task::AbortOnDropHandle::new(pump),
        }
    }
}

impl Stream for ReadAhead {
    type Item = io::Result<Bytes>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        // The permit goes with the chunk's place in the queue.
        self.get_mut()
            .rx
            .poll_recv(cx)
            .map(|next| next.map(|(item, _permit)| item))
    }
}
