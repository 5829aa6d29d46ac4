//! A reader for GGUF files (llama.cpp's format): metadata, tensor directory and raw tensor bytes.
//!
//! The file is memory-mapped; tensors are dequantized one at a time by [`crate::quant`], so loading never holds
//! more than the file plus one tensor in f32.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::{ModelError, Result};
use crate::quant::GgmlType;

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// Where one tensor lives in the file.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// GGML order: `dims[0]` is the innermost (row length).
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Absolute byte offset in the file.
    pub offset: u64,
    /// Bytes of data, checked against the file when it was read.
    pub byte_size: u64,
}

impl TensorInfo {
    /// The number of elements; the product was checked not to overflow when the header was read.
    pub fn element_count(&self) -> u64 {
        self.dims
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(d))
            .unwrap_or(0)
    }

    /// The shape in PyTorch order (outermost first); each dim was checked to fit an i64 when the header was read.
    pub fn torch_shape(&self) -> Vec<i64> {
        self.dims
            .iter()
            .rev()
            .map(|&d| i64::try_from(d).unwrap_or(i64::MAX))
            .collect()
    }
}

/// A GGUF header read from bytes: metadata, the tensor directory with absolute offsets, all checked against the
/// length of the bytes it was read from.
#[derive(Debug, Clone)]
pub struct GgufHeader {
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    /// Where tensor data begins (the end of the header, aligned).
    pub data_start: u64,
}

/// An opened GGUF file.
pub struct GgufFile {
    path: PathBuf,
    map: memmap2::Mmap,
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

/// Arrays of arrays deeper than this are refused: the reader recurses once per level, and a hostile file of nested
/// array headers (12 bytes each) would otherwise overflow the stack. Real files nest at most once.
pub const MAX_ARRAY_DEPTH: usize = 8;
/// Metadata values (array elements included) in one file. Each costs a 32-byte [`Value`] however few bytes it
/// takes in the file; the largest real vocabularies hold about a million (tokens, merges, scores, types).
pub const MAX_METADATA_VALUES: u64 = 1 << 24;
/// GGML_MAX_DIMS.
pub const MAX_TENSOR_DIMS: u32 = 4;

/// The fewest bytes a metadata value of type `ty` takes in the file (for bounding counts before allocating).
fn min_value_size(ty: u32) -> u64 {
    match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 | 10..=12 => 8,
        9 => 12,
        _ => 1,
    }
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a Path,
    /// What is being read, for errors: `metadata[3] "general.name"`, `tensor[7] "blk.0.attn_q.weight"`.
    field: String,
    values: u64,
}

impl<'a> Cursor<'a> {
    fn err(&self, detail: impl std::fmt::Display) -> ModelError {
        ModelError::malformed(
            self.path,
            "GGUF header",
            format!("{}: {detail} (byte {})", self.field, self.pos),
        )
    }

    fn remaining(&self) -> u64 {
        (self.bytes.len() - self.pos.min(self.bytes.len())) as u64
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| {
                self.err(format!(
                    "truncated: needs {n} more bytes, file has {}",
                    self.remaining()
                ))
            })?;
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// A count of items that each take at least `min_size` bytes: no valid file holds more than its remaining bytes
    /// allow, so a larger count is refused before anything is allocated for it.
    fn count(&mut self, what: &str, min_size: u64) -> Result<usize> {
        let n = self.u64()?;
        let fits = self.remaining() / min_size.max(1);
        if n > fits {
            return Err(self.err(format!(
                "{what} {n} cannot fit in the {} bytes left in the file",
                self.remaining()
            )));
        }
        usize::try_from(n).map_err(|_| self.err(format!("{what} {n} is too large")))
    }

    fn string(&mut self) -> Result<String> {
        let n = self.count("string length", 1)?;
        let start = self.pos;
        let raw = self.take(n)?;
        String::from_utf8(raw.to_vec()).map_err(|_| {
            self.pos = start;
            self.err("string is not UTF-8")
        })
    }

    fn value(&mut self, ty: u32, depth: usize) -> Result<Value> {
        self.values += 1;
        if self.values > MAX_METADATA_VALUES {
            return Err(self.err(format!("more than {MAX_METADATA_VALUES} metadata values")));
        }
        Ok(match ty {
            0 => Value::U8(self.array::<1>()?[0]),
            1 => Value::I8(self.array::<1>()?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array()?)),
            3 => Value::I16(i16::from_le_bytes(self.array()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.array()?)),
            6 => Value::F32(f32::from_le_bytes(self.array()?)),
            7 => Value::Bool(self.array::<1>()?[0] != 0),
            8 => Value::String(self.string()?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.err(format!("arrays nested deeper than {MAX_ARRAY_DEPTH} levels")));
                }
                let elem = self.u32()?;
                if elem > 12 {
                    return Err(self.err(format!("unknown array element type {elem}")));
                }
                let n = self.count("array length", min_value_size(elem))?;
                if self.values.saturating_add(n as u64) > MAX_METADATA_VALUES {
                    return Err(self.err(format!(
                        "array of {n} values: more than {MAX_METADATA_VALUES} metadata values in all"
                    )));
                }
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(elem, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.array()?)),
            12 => Value::F64(f64::from_le_bytes(self.array()?)),
            other => return Err(self.err(format!("unknown metadata value type {other}"))),
        })
    }
}

/// Reads and checks a GGUF header from the whole file's bytes; touches no file, so it is the fuzzing entry point of
/// the GGUF reader. Every count is bounded by the bytes left before anything is allocated for it, nested arrays by
/// [`MAX_ARRAY_DEPTH`], all size arithmetic is checked, and every tensor's data must lie inside `bytes`.
pub fn read_header(bytes: &[u8]) -> Result<GgufHeader> {
    parse(bytes, Path::new("<memory>"))
}

fn tensor_err(path: &Path, name: &str, detail: impl Into<String>) -> ModelError {
    ModelError::Tensor {
        path: path.into(),
        name: name.into(),
        detail: detail.into(),
    }
}

fn parse(bytes: &[u8], path: &Path) -> Result<GgufHeader> {
    let mut cur = Cursor {
        bytes,
        pos: 0,
        path,
        field: "magic".into(),
        values: 0,
    };
    if cur.take(4).ok() != Some(MAGIC.as_slice()) {
        return Err(ModelError::malformed(
            path,
            "GGUF file",
            "does not start with the GGUF magic",
        ));
    }
    cur.field = "version".into();
    let version = cur.u32()?;
    if !(2..=3).contains(&version) {
        return Err(ModelError::Unsupported(format!(
            "GGUF version {version} (only 2 and 3 are supported)"
        )));
    }
    cur.field = "tensor count".into();
    // name length, dimension count, type, offset
    let n_tensors = cur.count("tensor count", 8 + 4 + 4 + 8)?;
    cur.field = "metadata count".into();
    let n_kv = cur.count("metadata count", 8 + 4 + 1)?;
    let mut metadata = BTreeMap::new();
    for i in 0..n_kv {
        cur.field = format!("metadata[{i}]");
        let key = cur.string()?;
        cur.field = format!("metadata[{i}] {key:?}");
        let ty = cur.u32()?;
        let value = cur.value(ty, 0)?;
        if metadata.insert(key, value).is_some() {
            return Err(cur.err("duplicate key"));
        }
    }
    let mut infos: Vec<TensorInfo> = Vec::with_capacity(n_tensors);
    let mut names = std::collections::HashSet::with_capacity(n_tensors);
    for i in 0..n_tensors {
        cur.field = format!("tensor[{i}]");
        let name = cur.string()?;
        cur.field = format!("tensor[{i}] {name:?}");
        let n_dims = cur.u32()?;
        if n_dims > MAX_TENSOR_DIMS {
            return Err(tensor_err(
                path,
                &name,
                format!("has {n_dims} dimensions (at most {MAX_TENSOR_DIMS})"),
            ));
        }
        let dims = (0..n_dims).map(|_| cur.u64()).collect::<Result<Vec<_>>>()?;
        if let Some(d) = dims.iter().find(|&&d| i64::try_from(d).is_err()) {
            return Err(tensor_err(
                path,
                &name,
                format!("dimension {d} does not fit an i64"),
            ));
        }
        let raw_type = cur.u32()?;
        let ggml_type = GgmlType::from_u32(raw_type)
            .ok_or_else(|| tensor_err(path, &name, format!("unknown GGML tensor type {raw_type}")))?;
        let offset = cur.u64()?;
        if !names.insert(name.clone()) {
            return Err(tensor_err(path, &name, "appears twice in the tensor directory"));
        }
        infos.push(TensorInfo {
            name,
            dims,
            ggml_type,
            offset,
            byte_size: 0,
        });
    }
    cur.field = "general.alignment".into();
    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => v
            .as_u64()
            .filter(|a| a.is_power_of_two())
            .ok_or_else(|| cur.err(format!("{v:?} is not a power of two")))?,
    };
    let data_start = (cur.pos as u64)
        .checked_next_multiple_of(alignment)
        .filter(|&s| s <= bytes.len() as u64)
        .ok_or_else(|| {
            cur.err(format!(
                "data start aligned to {alignment} lies past the end of the file"
            ))
        })?;
    for info in &mut infos {
        let elements = info
            .dims
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(d))
            .ok_or_else(|| {
                tensor_err(
                    path,
                    &info.name,
                    format!("element count of {:?} overflows", info.dims),
                )
            })?;
        let (per_block, block_bytes) = info.ggml_type.block();
        if !elements.is_multiple_of(per_block) {
            return Err(tensor_err(
                path,
                &info.name,
                format!(
                    "{elements} elements are not a whole number of {:?} blocks",
                    info.ggml_type
                ),
            ));
        }
        info.byte_size = (elements / per_block).checked_mul(block_bytes).ok_or_else(|| {
            tensor_err(
                path,
                &info.name,
                format!("{elements} {:?} elements overflow a byte size", info.ggml_type),
            )
        })?;
        let relative = info.offset;
        info.offset = data_start
            .checked_add(relative)
            .ok_or_else(|| tensor_err(path, &info.name, format!("offset {relative} overflows")))?;
        if info
            .offset
            .checked_add(info.byte_size)
            .is_none_or(|end| end > bytes.len() as u64)
        {
            return Err(tensor_err(
                path,
                &info.name,
                format!(
                    "data ({} bytes at offset {}) runs past the end of the file ({} bytes; truncated download?)",
                    info.byte_size,
                    info.offset,
                    bytes.len()
                ),
            ));
        }
    }
    Ok(GgufHeader {
        version,
        metadata,
        tensors: infos,
        data_start,
    })
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
        // SAFETY: the mapping is read-only and private to this process; a concurrent truncation of a model
        // file by another process is outside what we support (the same contract as llama.cpp and safetensors).
        #[allow(unsafe_code)]
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
        let header = parse(&map, path)?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            map,
            version: header.version,
            metadata: header.metadata,
            tensors: header.tensors,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// The raw bytes of one tensor (bounds were checked at open; a `TensorInfo` from elsewhere that does not fit
    /// gives no bytes, which dequantization refuses).
    pub fn tensor_bytes(&self, info: &TensorInfo) -> &[u8] {
        let range = usize::try_from(info.offset).ok().and_then(|start| {
            let end = start.checked_add(usize::try_from(info.byte_size).ok()?)?;
            Some(start..end)
        });
        range.and_then(|r| self.map.get(r)).unwrap_or(&[])
    }

    /// The tensor dequantized to f32, in GGML element order.
    pub fn dequantize(&self, info: &TensorInfo) -> Result<Vec<f32>> {
        crate::quant::dequantize(info.ggml_type, self.tensor_bytes(info)).map_err(|detail| {
            ModelError::Tensor {
                path: self.path.clone(),
                name: info.name.clone(),
                detail,
            }
        })
    }
}

/// Writes GGUF files; used by tests to build small models and by tools that export GGUF.
pub mod writer {
    use super::Value;
    use crate::quant::GgmlType;

    /// One tensor to write: GGML dims (innermost first) and already-encoded bytes.
    #[derive(Debug)]
    pub struct RawTensor {
        pub name: String,
        pub dims: Vec<u64>,
        pub ggml_type: GgmlType,
        pub data: Vec<u8>,
    }

    fn put_string(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }

    fn type_id(v: &Value) -> u32 {
        match v {
            Value::U8(_) => 0,
            Value::I8(_) => 1,
            Value::U16(_) => 2,
            Value::I16(_) => 3,
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::String(_) => 8,
            Value::Array(_) => 9,
            Value::U64(_) => 10,
            Value::I64(_) => 11,
            Value::F64(_) => 12,
        }
    }

    fn put_value(out: &mut Vec<u8>, v: &Value) {
        match v {
            Value::U8(x) => out.push(*x),
            Value::I8(x) => out.push(*x as u8),
            Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::Bool(x) => out.push(u8::from(*x)),
            Value::String(s) => put_string(out, s),
            Value::Array(items) => {
                let elem = items.first().map(type_id).unwrap_or(4);
                out.extend_from_slice(&elem.to_le_bytes());
                out.extend_from_slice(&(items.len() as u64).to_le_bytes());
                for item in items {
                    put_value(out, item);
                }
            }
            Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        }
    }

    /// Serializes a GGUF v3 file with 32-byte alignment.
    pub fn to_bytes(metadata: &[(String, Value)], tensors: &[RawTensor]) -> Vec<u8> {
        const ALIGN: usize = 32;
        let mut out = Vec::new();
        out.extend_from_slice(super::MAGIC);
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
        for (k, v) in metadata {
            put_string(&mut out, k);
            out.extend_from_slice(&type_id(v).to_le_bytes());
            put_value(&mut out, v);
        }
        let mut offset = 0usize;
        for t in tensors {
            put_string(&mut out, &t.name);
            out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&(t.ggml_type as u32).to_le_bytes());
            out.extend_from_slice(&(offset as u64).to_le_bytes());
            offset += t.data.len().div_ceil(ALIGN) * ALIGN;
        }
        out.resize(out.len().div_ceil(ALIGN) * ALIGN, 0);
        for t in tensors {
            out.extend_from_slice(&t.data);
            out.resize(out.len().div_ceil(ALIGN) * ALIGN, 0);
        }
        out
    }
}
