// macOS needs `-undefined dynamic_lookup` to link an extension module outside maturin.
fn main() {
    pyo3_build_config::add_extension_module_link_args();
}
