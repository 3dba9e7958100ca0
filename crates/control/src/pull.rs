//! Registry routes: `POST /v1/images/pull` answers with an NDJSON stream of
//! [`PullEvent`]s (progress, then `done` or `error`) so clients can draw progress
//! bars; `POST /v1/images/prune`; `POST /v1/registries/login`.

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use hearth_agent::Agent;
use hearth_api::{ApiError, PullEvent, PullImage, RegistryLogin, NDJSON};
use tokio::sync::mpsc;

use crate::{ApiResult, HttpError, Json};

fn line(ev: &PullEvent) -> Bytes {
    let mut v = serde_json::to_vec(ev).unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}

pub(crate) async fn pull_image(State(agent): State<Agent>, Json(req): Json<PullImage>) -> Response {
    // why: unbounded is fine, the puller throttles its progress events (one per
    // 256 KiB per layer); the pull goes on even if the client disconnects.
    let (tx, mut rx) = mpsc::unbounded_channel::<PullEvent>();
    tokio::spawn(async move {
        let progress_tx = tx.clone();
        let last = match agent
            .pull_image(&req.reference, move |ev| {
                let _ = progress_tx.send(ev);
            })
            .await
        {
            Ok(image) => PullEvent::Done { image },
            Err(e) => PullEvent::Error {
                error: ApiError::new(e.code(), e.to_string()),
            },
        };
        let _ = tx.send(last);
    });
    let stream = futures::stream::poll_fn(move |cx| {
        rx.poll_recv(cx)
            .map(|ev| ev.map(|ev| Ok::<_, std::io::Error>(line(&ev))))
    });
    let mut resp = Response::new(Body::from_stream(stream));
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(NDJSON));
    resp
}

pub(crate) async fn prune_images(
    State(agent): State<Agent>,
) -> ApiResult<Json<hearth_api::PruneReport>> {
    Ok(Json(agent.prune_images().await?))
}

pub(crate) async fn registry_login(
    State(agent): State<Agent>,
    Json(req): Json<RegistryLogin>,
) -> ApiResult<StatusCode> {
    agent
        .registry_login(&req.registry, &req.username, &req.password)
        .await
        .map_err(HttpError::from)?;
    Ok(StatusCode::NO_CONTENT)
}
