//! `cachectl`: see the package's README, or `cachectl --help`.

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    match cache_cli::run(std::env::args_os()).await {
        Ok(out) => {
            print!("{out}");
            std::process::ExitCode::SUCCESS
        }
        Err(cache_cli::Error::Usage(usage)) => usage.exit(),
        Err(error) => {
            eprintln!("cachectl: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}
