//! What the attributes cost a build: a crate with 100
//! `#[redis_cached(single_flight)]` functions and 100 `#[invalidates]`
//! writers, all called from one binary, rebuilt in release with and
//! without the attributes (one feature switches them on with
//! `cfg_attr`; the functions, their types and their callers are the same).
//!
//! ```text
//! cargo run --release -p cache-bench --bin compile_cost
//! COMPILE_COST_FUNCTIONS=20 COMPILE_COST_ROUNDS=5 cargo run --release -p cache-bench --bin compile_cost
//! ```
//!
//! The crate is written to `target/compile-cost/` with a target directory
//! of its own; the first build (the dependencies, a few minutes cold) is
//! not timed. Then each round rebuilds the crate alone, plain and cached
//! in turn, and the medians and their ratio are printed.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

type Error = Box<dyn std::error::Error>;

fn main() -> Result<(), Error> {
    let functions = env_number("COMPILE_COST_FUNCTIONS", 100)?;
    let rounds = env_number("COMPILE_COST_ROUNDS", 3)?;
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or("the bench package is in the workspace")?;
    let dir = workspace.join("target/compile-cost");
    write_crate(&dir, &workspace.join("cache-runtime"), functions)?;
    println!(
        "{functions} cached functions and {functions} writers in {}",
        dir.display()
    );
    for cached in [false, true] {
        build(&dir, cached)?;
    }
    let (mut plain, mut cached) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        // Alternating which arm goes first, so that drift hits both alike.
        for arm in if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        } {
            touch(&dir)?;
            let took = build(&dir, arm)?;
            println!(
                "round {round}: {} {:.1} s",
                if arm { "cached" } else { "plain " },
                took.as_secs_f64()
            );
            if arm { &mut cached } else { &mut plain }.push(took);
        }
    }
    let (plain, cached) = (median(&mut plain), median(&mut cached));
    println!(
        "release rebuild, median of {rounds}: plain {:.1} s, with the attributes {:.1} s ({:.1}×)",
        plain.as_secs_f64(),
        cached.as_secs_f64(),
        cached.as_secs_f64() / plain.as_secs_f64()
    );
    Ok(())
}

fn env_number(name: &str, default: usize) -> Result<usize, Error> {
    match std::env::var(name) {
        Ok(value) => Ok(value.parse().map_err(|_| format!("{name}: not a number"))?),
        Err(_) => Ok(default),
    }
}

/// Builds the crate; how long it took.
fn build(dir: &Path, cached: bool) -> Result<Duration, Error> {
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    command
        .args(["build", "--release", "--quiet"])
        .current_dir(dir)
        .env("CARGO_TARGET_DIR", dir.join("target"));
    if cached {
        command.args(["--features", "cached"]);
    }
    let started = Instant::now();
    let status = command.status()?;
    if !status.success() {
        return Err(format!("cargo build in {} failed", dir.display()).into());
    }
    Ok(started.elapsed())
}

/// Makes the next build compile the crate again.
fn touch(dir: &Path) -> Result<(), Error> {
    let main = dir.join("src/main.rs");
    let text = std::fs::read_to_string(&main)?;
    std::fs::write(&main, text)?;
    Ok(())
}

fn median(values: &mut [Duration]) -> Duration {
    values.sort();
    values[values.len() / 2]
}

fn write_crate(dir: &Path, runtime: &Path, functions: usize) -> Result<(), Error> {
    std::fs::create_dir_all(dir.join("src"))?;
    let runtime: PathBuf = runtime.canonicalize()?;
    let manifest = format!(
        r#"[package]
name = "compile-cost"
version = "0.0.0"
edition = "2024"
publish = false

[features]
cached = []

[dependencies]
cache-runtime = {{ path = {runtime:?} }}
serde = {{ version = "1", features = ["derive"] }}
tokio = {{ version = "1", features = ["rt-multi-thread", "macros"] }}

[workspace]
"#
    );
    std::fs::write(dir.join("Cargo.toml"), manifest)?;
    let mut main = String::from(
        "#![allow(dead_code)]\nuse serde::{Deserialize, Serialize};\n\n\
         pub struct Db;\n#[derive(Debug)]\npub struct DbError;\n",
    );
    for i in 0..functions {
        write!(
            main,
            r#"
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row{i} {{ pub id: u64, pub name: String, pub n{i}: u32 }}

#[cfg_attr(feature = "cached", cache_runtime::redis_cached(key = "r{i}:<id>", ttl = 60, skip(db), single_flight))]
pub async fn get_{i}(db: &Db, id: u64) -> Result<Row{i}, DbError> {{
    let _ = db;
    tokio::task::yield_now().await;
    Ok(Row{i} {{ id, name: format!("row {{id}}"), n{i}: {i} }})
}}

#[cfg_attr(feature = "cached", cache_runtime::invalidates(get_{i}(id)))]
pub async fn set_{i}(db: &Db, id: u64, name: String) -> Result<(), DbError> {{
    let _ = (db, id, name);
    tokio::task::yield_now().await;
    Ok(())
}}
"#
        )?;
    }
    main.push_str(
        "\n#[tokio::main]\nasync fn main() {\n    let db = Db;\n    let mut total = 0;\n",
    );
    for i in 0..functions {
        writeln!(
            main,
            "    total += get_{i}(&db, {i}).await.map_or(0, |r| r.id);\n    \
             let _ = set_{i}(&db, {i}, String::new()).await;"
        )?;
    }
    main.push_str("    println!(\"{total}\");\n}\n");
    std::fs::write(dir.join("src/main.rs"), main)?;
    Ok(())
}
