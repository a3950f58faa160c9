//! The value the benchmarks cache: a row of a users table, about 1 KB of
//! JSON (`src/bin/bench.rs`, `src/bin/json_decoders.rs`).

use serde::{Deserialize, Serialize};

/// The cached row: about 1 KB as JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct User {
    /// The row's id.
    pub id: u64,
    /// A name.
    pub name: String,
    /// An email address.
    pub email: String,
    /// Most of the value's size.
    pub bio: String,
    /// A few short strings.
    pub tags: Vec<String>,
    /// Forty numbers.
    pub scores: Vec<u32>,
    /// A timestamp.
    pub created_at: u64,
    /// A flag.
    pub active: bool,
}

/// The row of `id`.
pub fn row(id: u64) -> User {
    User {
        id,
        name: format!("User Number {id}"),
        email: format!("user{id}@example.com"),
        bio: "Writes Rust services that put Redis in front of a slow database. ".repeat(10),
        tags: ["rust", "redis", "cache", "tokio", "serde"]
            .map(String::from)
            .to_vec(),
        scores: (0..40).map(|i| (i * 7919 + id as u32) % 1000).collect(),
        created_at: 1_700_000_000 + id,
        active: id.is_multiple_of(2),
    }
}
