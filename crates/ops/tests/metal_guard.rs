//! The guard for the Metal path, which nothing here can execute: every kernel variant we
//! ship goes through naga's WGSL front end, its validator (with only the capabilities we
//! require), and its MSL writer, exactly as wgpu does on macOS; and through the SPIR-V
//! writer for the Vulkan path. Apple GPUs offer 8x8 simdgroup matrices, NVIDIA 16x16.

use naga::valid::{Capabilities, ShaderStages, SubgroupOperationSet, ValidationFlags, Validator};
use vllm_apple_ops::kernels::all_variants;
use vllm_apple_ops::Kernel;

fn validate(k: &Kernel) -> (naga::Module, naga::valid::ModuleInfo) {
    let src = k.render();
    let module = naga::front::wgsl::parse_str(&src)
        .unwrap_or_else(|e| panic!("{}: {}", k.key(), e.emit_to_string(&src)));
    // What wgpu grants for SHADER_F16 + SUBGROUP + IMMEDIATES and the downlevel flag
    // SHADER_F16_IN_F32 (pack/unpack2x16float), which Metal and Vulkan always have.
    let mut caps = Capabilities::IMMEDIATES
        | Capabilities::SUBGROUP
        | Capabilities::SUBGROUP_BARRIER
        | Capabilities::SHADER_FLOAT16
        | Capabilities::SHADER_FLOAT16_IN_FLOAT32;
    if k.coop {
        caps |= Capabilities::COOPERATIVE_MATRIX;
    }
    let info = Validator::new(ValidationFlags::all(), caps)
        .subgroup_stages(ShaderStages::COMPUTE)
        .subgroup_operations(SubgroupOperationSet::all())
        .validate(&module)
        .unwrap_or_else(|e| panic!("{}: {}", k.key(), e.emit_to_string(&src)));
    (module, info)
}

fn coop_size(k: &Kernel) -> Option<u32> {
    k.consts.iter().find_map(|(n, v)| match (n, v) {
        (&"S", vllm_apple_ops::pipeline::ConstVal::U32(s)) if k.coop => Some(*s),
        _ => None,
    })
}

#[test]
fn every_kernel_translates_to_msl() {
    let variants = all_variants(&[8]);
    assert!(variants.len() >= 15, "all kernel families listed");
    for k in &variants {
        let (module, info) = validate(k);
        let options = naga::back::msl::Options {
            lang_version: (2, 4),
            ..Default::default()
        };
        let pipeline = naga::back::msl::PipelineOptions {
            entry_point: Some((naga::ShaderStage::Compute, k.entry.to_string())),
            ..Default::default()
        };
        let (msl, _) = naga::back::msl::write_string(&module, &info, &options, &pipeline)
            .unwrap_or_else(|e| panic!("{}: MSL: {e:?}", k.key()));
        assert!(msl.contains("kernel void"), "{}: no kernel in MSL", k.key());
        if coop_size(k) == Some(8) {
            assert!(msl.contains("simdgroup_multiply_accumulate"), "{}", k.key());
        }
    }
}

#[test]
fn every_kernel_translates_to_spirv() {
    for k in &all_variants(&[8, 16]) {
        let (module, info) = validate(k);
        let opts = naga::back::spv::Options::default();
        let pipeline = naga::back::spv::PipelineOptions {
            shader_stage: naga::ShaderStage::Compute,
            entry_point: k.entry.to_string(),
        };
        let words = naga::back::spv::write_vec(&module, &info, &opts, Some(&pipeline))
            .unwrap_or_else(|e| panic!("{}: SPIR-V: {e:?}", k.key()));
        assert!(words.len() > 100, "{}", k.key());
    }
}
