//! Server-Sent Events of a composition: its current state, then each progress event of its job,
//! until the job ends.

use super::find;
use crate::server::api::Status;
use crate::server::error::{ApiError, ApiResult};
use crate::server::jobs::JobEvent;
use crate::server::AppState;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures_util::stream::{self, Stream};
use std::convert::Infallible;

/// Event streams open at most.
pub const MAX_STREAMS: usize = 256;

/// Server-Sent Events: the composition's current state, then each progress event, until the
/// job ends (the last event has its final status) or the server shuts down (the stream just
/// ends: a client reconnects to another replica or to this one after its restart).
pub async fn events(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>> {
    let model = s.ready()?;
    // Every open stream is woken by every job's events: their number is bounded.
    let permit = s.streams.clone().try_acquire_owned().map_err(|_| {
        s.metrics
            .rejected
            .with_label_values(&["streams_full"])
            .inc();
        ApiError::busy(
            StatusCode::TOO_MANY_REQUESTS,
            format!("{MAX_STREAMS} event streams are open; retry later"),
            5,
        )
    })?;
    let rx = model.workers.events.subscribe();
    let c = find(&s, &id)?;
    let first = JobEvent {
        id: id.clone(),
        status: c.status,
        progress: c.progress,
    };
    let done = first.status.is_final();
    let stopping = s.stopping.subscribe();
    // The permit lives in the stream's state: it is given back when the stream ends.
    let state = (Some(first), rx, done, id, stopping, permit);
    let stream = stream::unfold(
        state,
        |(first, mut rx, done, id, mut stopping, permit)| async move {
            if let Some(e) = first {
                let ev = sse(&e);
                return Some((Ok(ev), (None, rx, done, id, stopping, permit)));
            }
            if done || *stopping.borrow() {
                return None;
            }
            loop {
                let next = tokio::select! {
                    next = rx.recv() => next,
                    _ = stopping.changed() => return None,
                };
                match next {
                    Ok(e) if e.id == id => {
                        let end = e.status.is_final();
                        return Some((Ok(sse(&e)), (None, rx, end, id, stopping, permit)));
                    }
                    Ok(_) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                }
            }
        },
    );
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

fn sse(e: &JobEvent) -> SseEvent {
    // "status" whenever the status is news (the first event, the end); "progress" in between.
    let name = if e.progress.is_some() && e.status == Status::Running {
        "progress"
    } else {
        "status"
    };
    SseEvent::default()
        .event(name)
        .json_data(e)
        .unwrap_or_else(|_| SseEvent::default().event(name))
}
