use std::collections::HashMap;

use cache_runtime::{cache_put, invalidates, redis_cached};

struct Db;

/// A tag may only name what the key names: `org_id` is skipped.
#[redis_cached(key = "member:<user_id>", ttl = 60, tags = ["org:<org_id>"], skip(db, org_id))]
async fn member(db: &Db, org_id: u64, user_id: u64) -> u64 {
    let _ = (db, org_id);
    user_id
}

/// A field the key does not name.
#[redis_cached(key = "user:<user.id>", ttl = 60, tags = ["org:<user.org_id>", "user:<user.id>"])]
async fn user(user: &User) -> u64 {
    user.id + user.org_id
}

struct User {
    id: u64,
    org_id: u64,
}

/// An unknown placeholder, with a suggestion; and a tag that is no string.
#[redis_cached(key = "team:<team_id>", ttl = 60, tags = ["team:<teamid>", 7])]
async fn team(team_id: u64) -> u64 {
    team_id
}

/// Not a list; an empty list.
#[redis_cached(key = "a:<id>", ttl = 60, tags = "a")]
async fn a(id: u64) -> u64 {
    id
}

#[redis_cached(key = "b:<id>", ttl = 60, tags = [])]
async fn b(id: u64) -> u64 {
    id
}

/// A batch's tag names what its key names too.
#[redis_cached(key = "c:<ids>", ttl = 60, tags = ["c:<ids>", "group:<group>"], batch, skip(group))]
async fn c(ids: &[u64], group: u64) -> HashMap<u64, u64> {
    ids.iter().map(|&id| (id, id + group)).collect()
}

/// A write's tag is checked against the writer's parameters.
#[invalidates(tag = "org:<org>")]
async fn delete_org(org_id: u64) {
    let _ = org_id;
}

/// `#[cache_put]` stores one entry; it does not invalidate a tag.
#[cache_put(team(team_id), tag = "team:<team_id>")]
async fn rename_team(team_id: u64) -> u64 {
    team_id
}

/// `tags_from` is a path to a function that takes the value and returns
/// strings.
#[redis_cached(key = "d:<id>", ttl = 60, tags_from = "tags_of")]
async fn d(id: u64) -> u64 {
    id
}

#[redis_cached(key = "g:<id>", ttl = 60, tags_from = numbers_of)]
async fn g(id: u64) -> Option<u64> {
    Some(id)
}

fn numbers_of(value: &u64) -> Vec<u64> {
    vec![*value]
}

fn main() {}
