//! A bounded copy of a body as it streams through the proxy, for `[[publish_on]]`. The body
//! is never held back: each frame goes on the moment it comes, and a copy of its bytes is
//! kept up to a limit. Over the limit the copy stops (and its bytes are let go): the
//! reader learns it was cut, not a prefix passed off as the whole.
//!
//! The proxy only copies and reports how a body ended; what the copy is for (a message on a
//! channel) is the caller's business, so the proxy never touches the hub.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use parking_lot::Mutex;

/// A body's copy, shared between the body that fills it and the one who reads it at the end.
/// parking_lot: each frame holds it for one `extend`, never across `.await`.
#[derive(Clone)]
pub struct Tee(Arc<Mutex<TeeState>>);

struct TeeState {
    buf: BytesMut,
    limit: usize,
    cut: bool,
    complete: bool,
}

/// What a body's copy holds once it is read.
pub struct Copied {
    pub bytes: Bytes,
    /// The body was longer than the limit: `bytes` is empty.
    pub cut: bool,
    /// The body ended cleanly (its last byte was read).
    pub complete: bool,
}

impl Tee {
    /// `complete` from the start for a body known to be empty.
    pub fn new(limit: usize, empty: bool) -> Tee {
        Tee(Arc::new(Mutex::new(TeeState {
            buf: BytesMut::new(),
            limit,
            cut: false,
            complete: empty,
        })))
    }

    pub(crate) fn data(&self, b: &[u8]) {
        let mut s = self.0.lock();
        if s.cut {
            return;
        }
        if s.buf.len() + b.len() > s.limit {
            s.cut = true;
            s.buf = BytesMut::new();
            return;
        }
        s.buf.extend_from_slice(b);
    }

    pub(crate) fn ended(&self) {
        self.0.lock().complete = true;
    }

    /// Takes the copy (later calls see it empty).
    pub fn take(&self) -> Copied {
        let mut s = self.0.lock();
        Copied {
            bytes: std::mem::take(&mut s.buf).freeze(),
            cut: s.cut,
            complete: s.complete,
        }
    }
}

/// Told once how a watched body ended: true when its last byte went out.
pub type OnEnd = Box<dyn FnOnce(bool) + Send>;

/// A response body on its way to the client, copied into `tee` (when given) and watched:
/// `on_end(true)` once its end was read (the last bytes are handed to the client
/// connection), `on_end(false)` when it failed (the upstream cut it) or was dropped before
/// its end (the client went away).
pub struct TeeBody<B> {
    inner: B,
    tee: Option<Tee>,
    on_end: Option<OnEnd>,
    /// Empty from the start: hyper may drop it unpolled, and that is its clean end.
    empty: bool,
}

impl<B: Body> TeeBody<B> {
    pub fn new(inner: B, tee: Option<Tee>, on_end: OnEnd) -> TeeBody<B> {
        TeeBody {
            empty: inner.is_end_stream(),
            inner,
            tee,
            on_end: Some(on_end),
        }
    }

    fn end(&mut self, ok: bool) {
        if let Some(f) = self.on_end.take() {
            if ok {
                if let Some(t) = &self.tee {
                    t.ended();
                }
            }
            f(ok);
        }
    }
}

impl<B> Body for TeeBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(d), Some(t)) = (frame.data_ref(), &self.tee) {
                    t.data(d);
                }
                // hyper stops polling a body that says it is over: this frame was its last.
                if self.inner.is_end_stream() {
                    self.end(true);
                }
            }
            Poll::Ready(Some(Err(_))) => self.end(false),
            Poll::Ready(None) => self.end(true),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for TeeBody<B> {
    fn drop(&mut self) {
        // A body hyper never polled because it was empty from the start ended cleanly; any
        // other body dropped before its end was cut short.
        if let Some(f) = self.on_end.take() {
            if self.empty {
                if let Some(t) = &self.tee {
                    t.ended();
                }
            }
            f(self.empty);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full, StreamBody};
    use std::sync::atomic::{AtomicU8, Ordering};

    fn watch() -> (Arc<AtomicU8>, OnEnd) {
        let seen = Arc::new(AtomicU8::new(0));
        let s = seen.clone();
        (
            seen,
            Box::new(move |ok| {
                s.store(if ok { 1 } else { 2 }, Ordering::SeqCst);
            }),
        )
    }

    #[tokio::test]
    async fn copies_up_to_the_limit_and_reports_the_end() {
        let tee = Tee::new(5, false);
        let (seen, on_end) = watch();
        let body = TeeBody::new(
            Full::new(Bytes::from_static(b"hello")),
            Some(tee.clone()),
            on_end,
        );
        let out = body.collect().await.expect("body").to_bytes();
        assert_eq!(&out[..], b"hello");
        assert_eq!(seen.load(Ordering::SeqCst), 1);
        let c = tee.take();
        assert!(c.complete && !c.cut);
        assert_eq!(&c.bytes[..], b"hello");

        let tee = Tee::new(4, false);
        let (_, on_end) = watch();
        let body = TeeBody::new(
            Full::new(Bytes::from_static(b"hello")),
            Some(tee.clone()),
            on_end,
        );
        let out = body.collect().await.expect("body").to_bytes();
        assert_eq!(&out[..], b"hello", "the client gets the whole body");
        let c = tee.take();
        assert!(c.cut && c.bytes.is_empty());
    }

    #[tokio::test]
    async fn a_failed_or_dropped_body_is_not_complete() {
        let frames: Vec<Result<Frame<Bytes>, std::io::Error>> = vec![
            Ok(Frame::data(Bytes::from_static(b"a"))),
            Err(std::io::Error::other("upstream cut")),
        ];
        let (seen, on_end) = watch();
        let body = TeeBody::new(
            StreamBody::new(futures_util::stream::iter(frames)),
            Some(Tee::new(10, false)),
            on_end,
        );
        assert!(body.collect().await.is_err());
        assert_eq!(seen.load(Ordering::SeqCst), 2);

        let (seen, on_end) = watch();
        let mut body = TeeBody::new(
            StreamBody::new(futures_util::stream::iter(vec![
                Ok::<_, std::io::Error>(Frame::data(Bytes::from_static(b"a"))),
                Ok(Frame::data(Bytes::from_static(b"b"))),
            ])),
            Some(Tee::new(10, false)),
            on_end,
        );
        let _ = body.frame().await;
        drop(body);
        assert_eq!(seen.load(Ordering::SeqCst), 2, "dropped mid-body");
    }
}
