//! `cargo fuzz run gguf_header`: the GGUF parser on arbitrary bytes must return, never
//! panic, and every tensor it accepts must lie inside the input.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(g) = vllm_apple_model::gguf::parse(data) {
        for t in &g.tensors {
            assert!(g.data_offset + t.offset as usize + t.nbytes <= data.len());
        }
    }
});
