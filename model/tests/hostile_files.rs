//! Hostile model files, written as the attacks: GGUF headers that recurse, wrap their size arithmetic, claim absurd
//! counts or stop short, and safetensors headers that lie about lengths, offsets and shapes. Each must fail with an
//! error naming the field and where, without a panic, a stack overflow or a huge allocation.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use camelid_model::gguf::{self, Value, read_header, writer};
use camelid_model::quant::GgmlType;
use camelid_model::weights::read_safetensors_header;
use camelid_model::{LoadOptions, ModelError};

/// A GGUF v3 header written field by field, so that a test can write what no honest writer would.
struct Raw(Vec<u8>);

impl Raw {
    fn gguf(n_tensors: u64, n_kv: u64) -> Self {
        let mut r = Raw(b"GGUF".to_vec());
        r.u32(3).u64(n_tensors).u64(n_kv);
        r
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn str(&mut self, s: &str) -> &mut Self {
        self.u64(s.len() as u64);
        self.0.extend_from_slice(s.as_bytes());
        self
    }
    /// A tensor directory entry: name, dims, type, offset.
    fn tensor(&mut self, name: &str, dims: &[u64], ty: u32, offset: u64) -> &mut Self {
        self.str(name).u32(dims.len() as u32);
        for &d in dims {
            self.u64(d);
        }
        self.u32(ty).u64(offset)
    }
    fn pad(&mut self, n: usize) -> &mut Self {
        self.0.resize(self.0.len() + n, 0);
        self
    }
}

fn err_text(r: Result<impl std::fmt::Debug, ModelError>) -> String {
    r.expect_err("a hostile file must be refused").to_string()
}

fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("camelid-hostile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// A small valid GGUF: metadata of several kinds, a nested array, two tensors.
fn valid_gguf() -> Vec<u8> {
    let metadata = vec![
        ("general.architecture".to_string(), Value::String("llama".into())),
        ("general.alignment".to_string(), Value::U32(32)),
        (
            "tokenizer.ggml.tokens".to_string(),
            Value::Array(vec![Value::String("a".into()), Value::String("b".into())]),
        ),
        (
            "nested".to_string(),
            Value::Array(vec![Value::Array(vec![Value::U8(1), Value::U8(2)])]),
        ),
    ];
    let tensors = vec![
        writer::RawTensor {
            name: "token_embd.weight".into(),
            dims: vec![4, 2],
            ggml_type: GgmlType::F32,
            data: vec![0; 32],
        },
        writer::RawTensor {
            name: "output_norm.weight".into(),
            dims: vec![32],
            ggml_type: GgmlType::Q8_0,
            data: vec![0; 34],
        },
    ];
    writer::to_bytes(&metadata, &tensors)
}

#[test]
fn a_valid_gguf_header_reads_with_checked_offsets() {
    let bytes = valid_gguf();
    let h = read_header(&bytes).unwrap();
    assert_eq!(h.version, 3);
    assert_eq!(h.tensors.len(), 2);
    assert_eq!(h.tensors[0].byte_size, 32);
    assert_eq!(h.tensors[1].byte_size, 34);
    assert_eq!(h.tensors[0].offset, h.data_start);
    assert!(h.tensors[1].offset + 34 <= bytes.len() as u64);
    assert_eq!(h.tensors[0].torch_shape(), [2, 4]);
}

#[test]
fn gguf_nested_arrays_stop_at_the_depth_limit_instead_of_overflowing_the_stack() {
    // The attack: 20,000 array headers (element type array, one element) in a row, a 240 KB file that made the
    // recursive reader abort the worker with a stack overflow.
    let mut r = Raw::gguf(0, 1);
    r.str("evil").u32(9);
    for _ in 0..20_000 {
        r.u32(9).u64(1);
    }
    assert!(r.0.len() > 200_000);
    let e = err_text(read_header(&r.0));
    assert!(e.contains("nested deeper than 8"), "{e}");
    assert!(e.contains("metadata[0] \"evil\""), "names the key: {e}");
    // Through the worker's own path: load() of a .gguf file.
    let path = temp_file("nested.gguf", &r.0);
    let e = err_text(camelid_model::load(&path, LoadOptions::default()));
    assert!(e.contains("nested deeper"), "{e}");
}

#[test]
fn gguf_tensor_sizes_that_wrap_are_refused() {
    // 2^62 F32 elements are 2^64 bytes: the unchecked product wrapped to 0 and passed the bounds check.
    let mut r = Raw::gguf(1, 0);
    r.tensor("wrap", &[1 << 62], 0, 0).pad(64);
    let e = err_text(read_header(&r.0));
    assert!(e.contains("tensor wrap") && e.contains("overflow"), "{e}");

    // Dimensions whose product overflows u64.
    let mut r = Raw::gguf(1, 0);
    r.tensor("dims", &[1 << 32, 1 << 32, 2], 0, 0).pad(64);
    let e = err_text(read_header(&r.0));
    assert!(e.contains("tensor dims") && e.contains("element count"), "{e}");

    // A zero dimension hides a huge one from the product; libtorch would get a negative size.
    let mut r = Raw::gguf(1, 0);
    r.tensor("zero", &[0, u64::MAX], 0, 0).pad(64);
    let e = err_text(read_header(&r.0));
    assert!(
        e.contains("tensor zero") && e.contains("does not fit an i64"),
        "{e}"
    );

    // An offset that wraps when the data section's start is added.
    let mut r = Raw::gguf(1, 0);
    r.tensor("far", &[4], 0, u64::MAX - 8).pad(64);
    let e = err_text(read_header(&r.0));
    assert!(e.contains("tensor far") && e.contains("overflows"), "{e}");

    // Honest arithmetic, data past the end.
    let mut r = Raw::gguf(1, 0);
    r.tensor("long", &[1 << 20], 0, 0).pad(64);
    let e = err_text(read_header(&r.0));
    assert!(
        e.contains("tensor long") && e.contains("runs past the end"),
        "{e}"
    );

    // More than four dimensions.
    let mut r = Raw::gguf(1, 0);
    r.tensor("rank", &[1, 1, 1, 1, 1], 0, 0).pad(64);
    assert!(err_text(read_header(&r.0)).contains("5 dimensions"));
}

#[test]
fn gguf_absurd_counts_are_refused_before_allocating() {
    let e = err_text(read_header(&Raw::gguf(u64::MAX, 0).0));
    assert!(e.contains("tensor count") && e.contains("cannot fit"), "{e}");
    let e = err_text(read_header(&Raw::gguf(0, 1 << 40).0));
    assert!(e.contains("metadata count") && e.contains("cannot fit"), "{e}");

    // An array claiming 2^40 strings in a tiny file.
    let mut r = Raw::gguf(0, 1);
    r.str("tokenizer.ggml.tokens").u32(9).u32(8).u64(1 << 40);
    let e = err_text(read_header(&r.0));
    assert!(e.contains("array length") && e.contains("metadata[0]"), "{e}");

    // A string claiming 2^63 bytes.
    let mut r = Raw::gguf(0, 1);
    r.str("k").u32(8).u64(1 << 63);
    assert!(err_text(read_header(&r.0)).contains("string length"));

    // An array of more values than the metadata limit, each of which would fit in the file.
    let mut r = Raw::gguf(0, 1);
    r.str("many").u32(9).u32(0).u64(gguf::MAX_METADATA_VALUES + 1);
    r.pad(gguf::MAX_METADATA_VALUES as usize + 1);
    let e = err_text(read_header(&r.0));
    assert!(e.contains("metadata values"), "{e}");

    // Unknown value and element types.
    let mut r = Raw::gguf(0, 1);
    r.str("k").u32(99);
    assert!(err_text(read_header(&r.0)).contains("unknown metadata value type 99"));
    let mut r = Raw::gguf(0, 1);
    r.str("k").u32(9).u32(77).u64(0);
    assert!(err_text(read_header(&r.0)).contains("unknown array element type 77"));
}

#[test]
fn gguf_alignment_duplicates_and_bad_strings_are_refused() {
    let mut r = Raw::gguf(0, 1);
    r.str("general.alignment").u32(4).u32(24);
    assert!(err_text(read_header(&r.0)).contains("not a power of two"));
    let mut r = Raw::gguf(0, 1);
    r.str("general.alignment").u32(10).u64(1 << 63);
    let e = err_text(read_header(&r.0));
    assert!(
        e.contains("general.alignment") && e.contains("past the end"),
        "{e}"
    );

    let mut r = Raw::gguf(0, 2);
    r.str("k").u32(4).u32(1).str("k").u32(4).u32(2);
    assert!(err_text(read_header(&r.0)).contains("duplicate key"));

    let mut r = Raw::gguf(2, 0);
    r.tensor("t", &[1], 0, 0).tensor("t", &[1], 0, 0).pad(64);
    assert!(err_text(read_header(&r.0)).contains("appears twice"));

    let mut r = Raw::gguf(0, 1);
    r.u64(2);
    r.0.extend_from_slice(&[0xff, 0xfe]);
    r.u32(4).u32(0);
    assert!(err_text(read_header(&r.0)).contains("not UTF-8"));
}

#[test]
fn every_truncation_of_a_gguf_file_is_an_error_naming_where() {
    let bytes = valid_gguf();
    let header = read_header(&bytes).unwrap();
    let header_end = header.data_start as usize;
    // The writer pads the file after the last tensor; cutting the padding leaves a valid file.
    let data_end = header
        .tensors
        .iter()
        .map(|t| t.offset + t.byte_size)
        .max()
        .unwrap() as usize;
    for len in 0..data_end {
        let e = err_text(read_header(&bytes[..len]));
        if len >= 4 && len < header_end {
            assert!(
                e.contains("truncated") || e.contains("cannot fit") || e.contains("past the end"),
                "at {len}: {e}"
            );
        }
    }
    let e = err_text(read_header(&bytes[..100]));
    assert!(e.contains("metadata[1] \"general.alignment\": truncated"), "{e}");
}

// ---- safetensors ----

fn safetensors(header: &str, data_len: usize) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.resize(out.len() + data_len, 0);
    out
}

#[test]
fn a_valid_safetensors_header_reads_with_absolute_ranges() {
    let header = r#"{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"b":{"dtype":"BF16","shape":[3],"data_offsets":[16,22]}}"#;
    let bytes = safetensors(header, 22);
    let entries = read_safetensors_header(&bytes).unwrap();
    let start = 8 + header.len();
    assert_eq!(entries.len(), 2);
    assert_eq!(entries[0].name, "a");
    assert_eq!(entries[0].shape, [2, 2]);
    assert_eq!(entries[0].data, start..start + 16);
    assert_eq!(entries[1].data, start + 16..start + 22);
}

#[test]
fn safetensors_header_lengths_that_lie_are_refused() {
    let e = err_text(read_safetensors_header(&u64::MAX.to_le_bytes()));
    assert!(e.contains("header length") && e.contains("limit"), "{e}");
    let mut bytes = 1000u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    let e = err_text(read_safetensors_header(&bytes));
    assert!(
        e.contains("header length 1000") && e.contains("past the end"),
        "{e}"
    );
    assert!(err_text(read_safetensors_header(b"abc")).contains("too short"));
    // Not JSON, JSON nested past serde's recursion limit.
    assert!(read_safetensors_header(&safetensors("{{{", 0)).is_err());
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    assert!(read_safetensors_header(&safetensors(&deep, 0)).is_err());
}

#[test]
fn safetensors_offsets_out_of_range_overlapping_or_wrong_sized_are_refused() {
    let cases = [
        // out of range: the data section holds 8 bytes
        (r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#, 8),
        // overlapping
        (
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
            12,
        ),
        // the size disagrees with dtype × shape
        (r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#, 8),
        // reversed
        (r#"{"a":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}}"#, 8),
        // huge offsets
        (
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[18446744073709551608,18446744073709551615]}}"#,
            8,
        ),
        // trailing bytes no tensor owns
        (r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#, 16),
    ];
    for (header, data_len) in cases {
        let e = err_text(read_safetensors_header(&safetensors(header, data_len)));
        assert!(e.contains("safetensors") || e.contains("tensor"), "{header}: {e}");
    }
}

#[test]
fn safetensors_shapes_that_overflow_or_libtorch_cannot_take_are_refused() {
    // dtype × shape overflows usize.
    let h = r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296,2],"data_offsets":[0,0]}}"#;
    assert!(read_safetensors_header(&safetensors(h, 0)).is_err());
    // A zero dimension hides one over i64::MAX, which libtorch would read as negative.
    let h = r#"{"a":{"dtype":"F32","shape":[0,9223372036854775809],"data_offsets":[0,0]}}"#;
    let e = err_text(read_safetensors_header(&safetensors(h, 0)));
    assert!(e.contains("tensor a") && e.contains("i64::MAX"), "{e}");
    let h = r#"{"a":{"dtype":"F32","shape":[1,1,1,1,1,1,1,1,1],"data_offsets":[0,4]}}"#;
    let e = err_text(read_safetensors_header(&safetensors(h, 4)));
    assert!(e.contains("9 dimensions"), "{e}");
    let h = r#"{"a":{"dtype":"U16","shape":[2],"data_offsets":[0,4]}}"#;
    let e = err_text(read_safetensors_header(&safetensors(h, 4)));
    assert!(e.contains("unsupported dtype"), "{e}");
}

#[test]
fn every_truncation_of_a_safetensors_file_is_an_error() {
    let header = r#"{"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"b":{"dtype":"I64","shape":[1],"data_offsets":[16,24]}}"#;
    let bytes = safetensors(header, 24);
    read_safetensors_header(&bytes).unwrap();
    for len in 0..bytes.len() {
        assert!(read_safetensors_header(&bytes[..len]).is_err(), "{len}");
    }
}

#[test]
fn a_shard_index_cannot_point_outside_the_model_directory() {
    let dir = std::env::temp_dir().join(format!("camelid-hostile-index-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for shard in ["/dev/zero", "../model.safetensors", "sub/x.safetensors", "..", ""] {
        let index = serde_json::json!({"weight_map": {"model.norm.weight": shard}});
        std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
        let e = err_text(camelid_model::weights::read_hf_dir(&dir, LoadOptions::default()));
        assert!(
            e.contains("weight_map[\"model.norm.weight\"]") && e.contains("not a file name"),
            "{shard}: {e}"
        );
    }
}
