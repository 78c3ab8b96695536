// Shared helpers (no bindings). Weight dtype codes: 0 = f32, 1 = f16, 2 = bf16.
// Half-precision data is stored packed two per u32, low half first (little endian).

fn bf16x2_to_f32(v: u32) -> vec2<f32> {
    return vec2<f32>(bitcast<f32>(v << 16u), bitcast<f32>(v & 0xffff0000u));
}

fn half2_to_f32(v: u32, dtype: u32) -> vec2<f32> {
    if dtype == 2u {
        return bf16x2_to_f32(v);
    }
    return unpack2x16float(v);
}

// Element `e` of a packed table of the given dtype.
fn elem_f32(word: u32, e: u32, dtype: u32) -> f32 {
    if dtype == 0u {
        return bitcast<f32>(word);
    }
    let pair = half2_to_f32(word, dtype);
    return select(pair.x, pair.y, (e & 1u) == 1u);
}

fn word_index(e: u32, dtype: u32) -> u32 {
    return select(e >> 1u, e, dtype == 0u);
}

// Flattened workgroup index for 2-D grids (dispatch sizes above 65535 are split in y).
fn flat_group(wg: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wg.x + wg.y * nwg.x;
}

// Order-preserving u32 key of an f32 (NaN lowest, below -inf): keys compare as the
// values do, so thresholds on values can be searched over keys.
fn key(x: f32) -> u32 {
    let b = bitcast<u32>(x);
    // NaN by its bits: WGSL lets implementations assume x == x.
    if (b & 0x7f800000u) == 0x7f800000u && (b & 0x007fffffu) != 0u {
        return 0u;
    }
    return select(b | 0x80000000u, ~b, (b & 0x80000000u) != 0u);
}
