use anyhow::Result;
use vllm_apple_ops::{ContextOptions, GpuContext};

pub fn run(opts: &ContextOptions) -> Result<()> {
    let ctx = GpuContext::new(opts)?;
    println!("vllm-apple {}", env!("CARGO_PKG_VERSION"));
    let rows = ctx.describe();
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (k, v) in rows {
        println!("{k:<width$}  {v}");
    }
    Ok(())
}
