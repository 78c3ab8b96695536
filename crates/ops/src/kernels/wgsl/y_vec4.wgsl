// Output binding 2 as vec4<f32>, for a y whose rows all start on a 16-byte boundary (row
// stride and column offset multiples of 4): a quarter of the stores in the matrix GEMMs'
// epilogues (150-201 -> 163-205 TFLOP/s on the H100's prefill shapes;
// docs/performance.md). put4 takes o % 4 == 0.
@group(0) @binding(2) var<storage, read_write> y: array<vec4<f32>>;

fn put4(o: u32, v: vec4<f32>) {
    y[o / 4u] = v;
}

fn put1(o: u32, v: f32) {
    y[o / 4u][o % 4u] = v;
}
