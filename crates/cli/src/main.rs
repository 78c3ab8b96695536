//! `vllm-apple`: the command-line interface.

mod bench;
mod env;
mod generate;
mod serve;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "vllm-apple",
    version,
    about = "LLM inference and serving with our own GPU kernels, made first for Apple Silicon"
)]
struct Cli {
    /// GPU backend (metal, vulkan, dx12); defaults to WGPU_BACKEND or the platform's best.
    #[arg(long, global = true, env = "WGPU_BACKEND")]
    backend: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the GPU adapter, backend, driver, features and limits.
    Env,
    /// Generate text for one or more prompts.
    Generate(generate::Args),
    /// Serve the OpenAI-compatible API.
    Serve(serve::Args),
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        what: bench::BenchCommand,
    },
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VLLM_APPLE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let opts = vllm_apple_ops::ContextOptions {
        backend: cli.backend.clone(),
        ..Default::default()
    };
    let result = match cli.command {
        Command::Env => env::run(&opts),
        Command::Generate(args) => generate::run(&opts, args),
        Command::Serve(args) => serve::run(&opts, args),
        Command::Bench { what } => bench::run(&opts, what),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
