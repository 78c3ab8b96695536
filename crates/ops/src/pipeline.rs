//! Kernel variants and the pipeline cache. A variant is a WGSL source plus a prelude of
//! `const` declarations (tile sizes, dtypes, batch sizes), so one source serves every shape
//! family and drivers fold the constants; pipelines are compiled once and reused.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use crate::error::{OpsError, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConstVal {
    U32(u32),
    Bool(bool),
}

impl ConstVal {
    fn wgsl(self) -> (&'static str, String) {
        match self {
            ConstVal::U32(v) => ("u32", format!("{v}u")),
            ConstVal::Bool(v) => ("bool", v.to_string()),
        }
    }
}

/// One compilable kernel variant. Equality and hashing go by name, entry point and prelude
/// (a name stands for one source), so the pipeline cache looks a variant up without
/// building a key.
#[derive(Clone, Debug)]
pub struct Kernel {
    /// Source file name, for messages and cache keys.
    pub name: &'static str,
    pub source: &'static str,
    pub entry: &'static str,
    pub consts: Vec<(&'static str, ConstVal)>,
    /// `alias NAME = TYPE;` lines (types that depend on the variant, e.g. coop_mat sizes).
    pub aliases: Vec<(&'static str, String)>,
    /// Needs `enable wgpu_cooperative_matrix;`.
    pub coop: bool,
}

impl Kernel {
    pub fn new(name: &'static str, source: &'static str, entry: &'static str) -> Self {
        Kernel {
            name,
            source,
            entry,
            consts: Vec::new(),
            aliases: Vec::new(),
            coop: false,
        }
    }

    pub fn u32(mut self, name: &'static str, v: u32) -> Self {
        self.consts.push((name, ConstVal::U32(v)));
        self
    }

    pub fn bool(mut self, name: &'static str, v: bool) -> Self {
        self.consts.push((name, ConstVal::Bool(v)));
        self
    }

    pub fn alias(mut self, name: &'static str, ty: String) -> Self {
        self.aliases.push((name, ty));
        self
    }

    pub fn coop(mut self) -> Self {
        self.coop = true;
        self
    }

    pub fn key(&self) -> String {
        let mut k = format!("{}:{}", self.name, self.entry);
        for (n, v) in &self.consts {
            let _ = write!(k, ":{n}={v:?}");
        }
        for (n, t) in &self.aliases {
            let _ = write!(k, ":{n}={t}");
        }
        k
    }

    /// The full WGSL text: enables, the constant prelude, then the source.
    pub fn render(&self) -> String {
        let mut s = String::from("enable f16;\n");
        if self.coop {
            s.push_str("enable wgpu_cooperative_matrix;\n");
        }
        for (n, v) in &self.consts {
            let (ty, val) = v.wgsl();
            let _ = writeln!(s, "const {n}: {ty} = {val};");
        }
        for (n, t) in &self.aliases {
            let _ = writeln!(s, "alias {n} = {t};");
        }
        s.push_str(self.source);
        s
    }
}

impl PartialEq for Kernel {
    fn eq(&self, o: &Self) -> bool {
        self.name == o.name
            && self.entry == o.entry
            && self.consts == o.consts
            && self.aliases == o.aliases
            && self.coop == o.coop
    }
}

impl Eq for Kernel {}

impl std::hash::Hash for Kernel {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.name.hash(h);
        self.entry.hash(h);
        self.consts.hash(h);
        self.aliases.hash(h);
        self.coop.hash(h);
    }
}

#[derive(Default)]
pub(crate) struct PipelineCache {
    map: Mutex<HashMap<Kernel, Arc<wgpu::ComputePipeline>>>,
}

impl PipelineCache {
    pub(crate) fn get_or_create(
        &self,
        device: &wgpu::Device,
        kernel: &Kernel,
        full_checks: bool,
    ) -> Result<Arc<wgpu::ComputePipeline>> {
        let mut map = self
            .map
            .lock()
            .map_err(|_| OpsError::Gpu("pipeline cache lock poisoned".into()))?;
        if let Some(p) = map.get(kernel) {
            return Ok(p.clone());
        }
        let key = kernel.key();
        let source = kernel.render();
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let desc = wgpu::ShaderModuleDescriptor {
            label: Some(kernel.name),
            source: wgpu::ShaderSource::Wgsl(source.into()),
        };
        let module = if full_checks {
            device.create_shader_module(desc)
        } else {
            // SAFETY: buffer bounds checks stay on (memory safety does not depend on our
            // kernels being right). Dropped: the iteration cap naga adds to every loop, which
            // keeps drivers from unrolling ours (every loop of our kernels has a bound), and
            // the guards on integer division (every divisor is a shape the launchers check
            // to be non-zero).
            let mut checks = wgpu::ShaderRuntimeChecks::checked();
            checks.force_loop_bounding = false;
            checks.int_div_checks = false;
            unsafe { device.create_shader_module_trusted(desc, checks) }
        };
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(&key),
            layout: None,
            module: &module,
            entry_point: Some(kernel.entry),
            compilation_options: wgpu::PipelineCompilationOptions {
                constants: &[],
                // Every kernel writes the workgroup memory it reads; skip the zeroing pass.
                zero_initialize_workgroup_memory: false,
            },
            cache: None,
        });
        if let Some(err) = pollster::block_on(scope.pop()) {
            return Err(OpsError::Shader {
                kernel: key,
                message: err.to_string(),
            });
        }
        let pipeline = Arc::new(pipeline);
        map.insert(kernel.clone(), pipeline.clone());
        Ok(pipeline)
    }
}
