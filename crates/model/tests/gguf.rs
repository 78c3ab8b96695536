//! The GGUF reader on files written here: every metadata type, tensors at aligned offsets,
//! and corrupt input (every truncation, random byte flips, absurd counts) that must give an
//! error, never a panic.

use vllm_apple_model::dequant::GgmlType;
use vllm_apple_model::gguf::{parse, GgufError, GgufFile, Value};

/// A minimal GGUF writer for tests.
struct Writer {
    kv: Vec<u8>,
    n_kv: u64,
    tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
    alignment: u64,
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

impl Writer {
    fn new() -> Writer {
        Writer {
            kv: Vec::new(),
            n_kv: 0,
            tensors: Vec::new(),
            alignment: 32,
        }
    }

    fn kv(&mut self, key: &str, ty: u32, value: &[u8]) -> &mut Self {
        put_str(&mut self.kv, key);
        self.kv.extend(ty.to_le_bytes());
        self.kv.extend(value);
        self.n_kv += 1;
        self
    }

    fn tensor(&mut self, name: &str, dims: &[u64], ty: u32, data: Vec<u8>) -> &mut Self {
        self.tensors.push((name.into(), dims.to_vec(), ty, data));
        self
    }

    fn build(&self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend(self.n_kv.to_le_bytes());
        out.extend(&self.kv);
        let mut offset = 0u64;
        let mut offsets = Vec::new();
        for (name, dims, ty, data) in &self.tensors {
            put_str(&mut out, name);
            out.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(ty.to_le_bytes());
            out.extend(offset.to_le_bytes());
            offsets.push(offset);
            offset = (offset + data.len() as u64).next_multiple_of(self.alignment);
        }
        out.resize(
            (out.len() as u64).next_multiple_of(self.alignment) as usize,
            0,
        );
        let base = out.len();
        for ((_, _, _, data), off) in self.tensors.iter().zip(offsets) {
            out.resize(base + off as usize, 0);
            out.extend(data);
        }
        out
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn sample() -> Vec<u8> {
    let mut w = Writer::new();
    let mut arr = Vec::new();
    arr.extend(8u32.to_le_bytes()); // array of strings
    arr.extend(3u64.to_le_bytes());
    for s in ["<s>", "hello", "wörld"] {
        put_str(&mut arr, s);
    }
    let mut ints = Vec::new();
    ints.extend(5u32.to_le_bytes()); // array of i32
    ints.extend(2u64.to_le_bytes());
    ints.extend((-7i32).to_le_bytes());
    ints.extend(9i32.to_le_bytes());
    let mut name = Vec::new();
    put_str(&mut name, "llama");
    w.kv("general.architecture", 8, &name)
        .kv("llama.block_count", 4, &30u32.to_le_bytes())
        .kv("llama.rope.freq_base", 6, &100000f32.to_le_bytes())
        .kv("u8", 0, &[200])
        .kv("i8", 1, &[0xff])
        .kv("u16", 2, &513u16.to_le_bytes())
        .kv("i16", 3, &(-2i16).to_le_bytes())
        .kv("i32", 5, &(-3i32).to_le_bytes())
        .kv("bool", 7, &[1])
        .kv("u64", 10, &(1u64 << 40).to_le_bytes())
        .kv("i64", 11, &(-5i64).to_le_bytes())
        .kv("f64", 12, &0.25f64.to_le_bytes())
        .kv("tokenizer.ggml.tokens", 9, &arr)
        .kv("ints", 9, &ints);
    let a: Vec<f32> = (0..12).map(|i| i as f32 * 0.5 - 2.0).collect();
    let h: Vec<u8> = (0..6)
        .flat_map(|i| half::f16::from_f32(i as f32).to_le_bytes())
        .collect();
    w.tensor("a", &[4, 3], 0, f32_bytes(&a))
        .tensor("h", &[6], 1, h);
    w.build()
}

#[test]
fn reads_every_metadata_type_and_tensor() {
    let g = parse(&sample()).unwrap();
    assert_eq!(g.version, 3);
    assert_eq!(g.architecture(), Some("llama"));
    assert_eq!(g.get("llama.block_count").and_then(Value::as_u64), Some(30));
    assert_eq!(
        g.get("llama.rope.freq_base").and_then(Value::as_f64),
        Some(100000.0)
    );
    assert_eq!(g.get("u8"), Some(&Value::U8(200)));
    assert_eq!(g.get("i8"), Some(&Value::I8(-1)));
    assert_eq!(g.get("u16"), Some(&Value::U16(513)));
    assert_eq!(g.get("i16"), Some(&Value::I16(-2)));
    assert_eq!(g.get("i32").and_then(Value::as_i64), Some(-3));
    assert_eq!(g.get("bool"), Some(&Value::Bool(true)));
    assert_eq!(g.get("u64").and_then(Value::as_u64), Some(1 << 40));
    assert_eq!(
        g.get("i64").and_then(Value::as_u64),
        None,
        "negative is not a u64"
    );
    assert_eq!(g.get("f64").and_then(Value::as_f64), Some(0.25));
    let toks = g
        .get("tokenizer.ggml.tokens")
        .and_then(Value::as_array)
        .unwrap();
    assert_eq!(
        toks.iter().filter_map(Value::as_str).collect::<Vec<_>>(),
        ["<s>", "hello", "wörld"]
    );
    assert_eq!(
        g.get("ints"),
        Some(&Value::Array(vec![Value::I32(-7), Value::I32(9)]))
    );
    assert_eq!(g.tensors.len(), 2);
    let a = g.tensor("a").unwrap();
    assert_eq!(
        (a.dims.clone(), a.ty, a.offset, a.nbytes),
        (vec![4, 3], GgmlType::F32, 0, 48)
    );
    let h = g.tensor("h").unwrap();
    assert_eq!((h.ty, h.offset, h.nbytes), (GgmlType::F16, 64, 12));
    assert_eq!(g.data_offset % 32, 0);
}

#[test]
fn file_tensors_decode() {
    let dir = std::env::temp_dir().join(format!("vllm-apple-gguf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("t.gguf");
    std::fs::write(&path, sample()).unwrap();
    let f = GgufFile::open(&path).unwrap();
    let a = f.tensor_f32("a").unwrap();
    assert_eq!(a, (0..12).map(|i| i as f32 * 0.5 - 2.0).collect::<Vec<_>>());
    assert_eq!(
        f.tensor_f32("h").unwrap(),
        vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    );
    let e = f.tensor_f32("nope").unwrap_err().to_string();
    assert!(
        e.contains("no tensor named 'nope'") && e.contains("t.gguf"),
        "{e}"
    );
    let e = GgufFile::open(dir.join("missing.gguf"))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("missing.gguf"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn every_truncation_is_an_error() {
    let full = sample();
    // The last tensor's data is the end of the file: any cut is detectable.
    for cut in 0..full.len() {
        assert!(
            parse(&full[..cut]).is_err(),
            "truncated at {cut} of {} parsed",
            full.len()
        );
    }
}

#[test]
fn corrupt_bytes_never_panic() {
    let full = sample();
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut errors = 0;
    for _ in 0..4000 {
        let mut b = full.clone();
        for _ in 0..1 + next() % 4 {
            let i = (next() as usize) % b.len();
            b[i] = next() as u8;
        }
        match parse(&b) {
            Ok(g) => {
                for t in &g.tensors {
                    assert!(g.data_offset + t.offset as usize + t.nbytes <= b.len());
                }
            }
            Err(_) => errors += 1,
        }
    }
    assert!(
        errors > 100,
        "corruption should usually be caught ({errors} errors)"
    );
}

#[test]
fn specific_errors_name_the_problem() {
    let mut b = sample();
    b[0] = b'X';
    assert!(matches!(parse(&b), Err(GgufError::BadMagic(_))));
    let mut b = sample();
    b[4..8].copy_from_slice(&9u32.to_le_bytes());
    assert!(matches!(parse(&b), Err(GgufError::UnsupportedVersion(9))));
    let mut b = sample();
    b[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(parse(&b), Err(GgufError::Implausible { .. })));
    let mut w = Writer::new();
    w.tensor("q", &[32], 99, vec![0; 64]);
    let e = parse(&w.build()).unwrap_err().to_string();
    assert!(e.contains("tensor 'q'") && e.contains("type 99"), "{e}");
    let mut w = Writer::new();
    w.tensor("x", &[4], 0, vec![0; 16])
        .tensor("x", &[4], 0, vec![0; 16]);
    assert!(matches!(
        parse(&w.build()),
        Err(GgufError::DuplicateTensor(_))
    ));
}
