//! `vllm-apple bench ...`: measured on the GPU with timestamp queries where the adapter has
//! them (CPU wall time over a batch of repetitions otherwise), reported as medians.

mod attention;
mod decode;
mod kernels;
mod throughput;
mod timer;

use anyhow::Result;
use clap::Subcommand;
use vllm_apple_ops::ContextOptions;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Kernel bandwidth and throughput on Qwen3-30B-A3B's real shapes.
    Kernels(kernels::Args),
    /// Paged attention: decode bandwidth over batch x context, prefill throughput.
    Attention(attention::Args),
    /// Whole-model single-sequence prefill and decode speed against the roofline.
    Decode(decode::Args),
    /// Continuous-batching throughput at batch 1, 2, 4, ... 64 through the engine.
    Throughput(throughput::Args),
}

pub fn run(opts: &ContextOptions, cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Kernels(args) => kernels::run(opts, args),
        BenchCommand::Attention(args) => attention::run(opts, args),
        BenchCommand::Decode(args) => decode::run(opts, args),
        BenchCommand::Throughput(args) => throughput::run(opts, args),
    }
}
