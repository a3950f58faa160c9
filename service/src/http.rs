//! The HTTP API, written against `Arc<dyn UserRepo>`: it does not know
//! whether the repository caches.
//!
//! - `GET /users/{id}`: the user, or 404;
//! - `GET /users?ids=1,2,3`: the users among the ids that exist, by id;
//! - `PUT /users/{id}` with `{"name": "..."}`: the row as written, or 404;
//! - `GET /metrics`: the cache's metrics, in Prometheus's text format.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;
use tokio::task::JoinHandle;

use crate::db::{RepoError, UserRepo};

type Repo = Arc<dyn UserRepo>;

/// The service's routes.
pub fn router(repo: Repo) -> Router {
    Router::new()
        .route("/users", get(users))
        .route("/users/{id}", get(user).put(rename))
        .route("/metrics", get(|| async { crate::observe::render() }))
        .with_state(repo)
}

/// Serves `router(repo)` on a free loopback port until the task is aborted.
pub async fn serve(repo: Repo) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let app = router(repo);
    let task = tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            eprintln!("server stopped: {error}");
        }
    });
    Ok((address, task))
}

impl IntoResponse for RepoError {
    fn into_response(self) -> Response {
        (StatusCode::INTERNAL_SERVER_ERROR, self.to_string()).into_response()
    }
}

async fn user(State(repo): State<Repo>, Path(id): Path<i64>) -> Result<Response, RepoError> {
    Ok(match repo.user(id).await? {
        Some(user) => Json(user).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    })
}

#[derive(Deserialize)]
struct Ids {
    /// Comma-separated.
    ids: String,
}

async fn users(State(repo): State<Repo>, Query(query): Query<Ids>) -> Result<Response, RepoError> {
    let ids: Result<Vec<i64>, _> = query.ids.split(',').map(str::parse).collect();
    let Ok(ids) = ids else {
        return Ok((StatusCode::BAD_REQUEST, "ids: comma-separated integers").into_response());
    };
    Ok(Json(repo.users(&ids).await?).into_response())
}

#[derive(Deserialize)]
struct Rename {
    name: String,
}

async fn rename(
    State(repo): State<Repo>,
    Path(id): Path<i64>,
    Json(body): Json<Rename>,
) -> Result<Response, RepoError> {
    Ok(match repo.rename(id, &body.name).await? {
        Some(user) => Json(user).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    })
}
