//! A real service, cached by attributes alone: an axum HTTP API over a
//! SQLite database (sqlx), with the data access in a `UserRepo` trait,
//! written twice ([`plain`] before caching, [`cached`] with the attributes
//! added), and a load generator ([`load`]) that drives both over real HTTP.
//! `src/main.rs` runs it (`cargo run --release -p cache-service`);
//! `tests/service.rs` runs it short, with a naive arm beside it.

pub mod behind;
pub mod cached;
pub mod db;
pub mod http;
pub mod load;
pub mod observe;
pub mod plain;
