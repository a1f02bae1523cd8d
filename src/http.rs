//! HTTP plumbing shared by every handler: the response body type, JSON and error responses,
//! bounded body reading, and a body fed from a channel (for real streaming).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::Frame;
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full};
use hyper::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use hyper::{Response, StatusCode};
use serde_json::Value;
use tokio::sync::mpsc;

use crate::error::ApiError;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BoxError>;

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-routstr-request-id");

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed()
}

pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

pub fn json_response(status: StatusCode, value: &Value) -> Response<Body> {
    let bytes = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    let mut resp = Response::new(full(bytes));
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// The error envelope; for an error that returns an `X-Cashu` token, the change header too.
pub fn error_response(err: &ApiError, request_id: &str) -> Response<Body> {
    let mut resp = json_response(err.status(), &err.body(request_id));
    if let Some(change) = err.change() {
        if let Ok(v) = HeaderValue::from_str(&change.token) {
            resp.headers_mut().insert(crate::payment::X_CASHU, v);
        }
    }
    if let ApiError::RateLimited { retry_after_secs } = err {
        resp.headers_mut().insert(hyper::header::RETRY_AFTER, HeaderValue::from(*retry_after_secs));
    }
    resp
}

/// `tokio::time::timeout`, without setting a timer for a future that is ready when first polled
/// (a body already read with its head, the usual case): the timer costs more than such a read.
pub async fn timeout_unless_ready<F: std::future::Future>(
    limit: std::time::Duration,
    work: F,
) -> Result<F::Output, tokio::time::error::Elapsed> {
    let mut work = std::pin::pin!(work);
    let at_once = std::future::poll_fn(|cx| Poll::Ready(work.as_mut().poll(cx))).await;
    match at_once {
        Poll::Ready(output) => Ok(output),
        Poll::Pending => tokio::time::timeout(limit, work).await,
    }
}

/// Longest a client may take to send its request body.
pub const BODY_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Reads a whole body, refusing more than `limit` bytes (before reading them all) and a client
/// that sends it too slowly.
pub async fn read_limited<B>(body: B, limit: usize) -> Result<Bytes, ApiError>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    if body.size_hint().lower() > limit as u64 {
        return Err(ApiError::BodyTooLarge { limit });
    }
    let limited = http_body_util::Limited::new(body, limit);
    let collected =
        timeout_unless_ready(BODY_READ_TIMEOUT, limited.collect()).await.map_err(|_| ApiError::RequestTimeout)?;
    match collected {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
            Err(ApiError::BodyTooLarge { limit })
        }
        Err(e) => Err(ApiError::BadRequest(format!("could not read the request body: {e}"))),
    }
}

/// A response body fed by a task through a bounded channel: each chunk goes out as soon as it is
/// sent, and the sender notices (`closed()`) when the client goes away.
pub struct ChannelBody {
    rx: mpsc::Receiver<Bytes>,
}

impl ChannelBody {
    pub fn new(depth: usize) -> (mpsc::Sender<Bytes>, ChannelBody) {
        let (tx, rx) = mpsc::channel(depth);
        (tx, ChannelBody { rx })
    }
}

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.rx.poll_recv(cx).map(|chunk| chunk.map(|bytes| Ok(Frame::data(bytes))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_timeout_unless_ready_bounds_only_what_waits() {
        use std::time::Duration;
        assert_eq!(timeout_unless_ready(Duration::ZERO, async { 7 }).await.ok(), Some(7));
        let never = std::future::pending::<()>();
        assert!(timeout_unless_ready(Duration::from_millis(10), never).await.is_err());
        let later = async {
            tokio::task::yield_now().await;
            8
        };
        assert_eq!(timeout_unless_ready(Duration::from_secs(5), later).await.ok(), Some(8));
    }

    #[tokio::test]
    async fn limits_bodies() {
        let ok = read_limited(Full::new(Bytes::from_static(b"12345")), 5).await.unwrap();
        assert_eq!(&ok[..], b"12345");
        let err = read_limited(Full::new(Bytes::from_static(b"123456")), 5).await.unwrap_err();
        assert!(matches!(err, ApiError::BodyTooLarge { limit: 5 }));
    }

    #[tokio::test]
    async fn channel_body_streams() {
        let (tx, body) = ChannelBody::new(2);
        tx.send(Bytes::from_static(b"a")).await.unwrap();
        drop(tx);
        let collected = body.collect().await.unwrap().to_bytes();
        assert_eq!(&collected[..], b"a");
    }
}
