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
}

impl TensorInfo {
    pub fn element_count(&self) -> u64 {
        self.dims.iter().product()
    }

    /// The shape in PyTorch order (outermost first).
    pub fn torch_shape(&self) -> Vec<i64> {
        self.dims.iter().rev().map(|&d| d as i64).collect()
    }
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

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| {
                ModelError::malformed(
                    self.path,
                    "GGUF header",
                    format!("truncated at byte {}", self.pos),
                )
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

    fn len(&mut self, what: &str) -> Result<usize> {
        let n = self.u64()?;
        // Nothing in a valid file is longer than the file itself; this stops absurd allocations.
        if n > self.bytes.len() as u64 {
            return Err(ModelError::malformed(
                self.path,
                "GGUF header",
                format!("{what} length {n} exceeds file size"),
            ));
        }
        Ok(n as usize)
    }

    fn string(&mut self) -> Result<String> {
        let n = self.len("string")?;
        let raw = self.take(n)?;
        String::from_utf8(raw.to_vec()).map_err(|_| {
            ModelError::malformed(
                self.path,
                "GGUF header",
                format!("string at byte {} is not UTF-8", self.pos),
            )
        })
    }

    fn value(&mut self, ty: u32) -> Result<Value> {
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
                let elem = self.u32()?;
                let n = self.len("array")?;
                let mut items = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    items.push(self.value(elem)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.array()?)),
            12 => Value::F64(f64::from_le_bytes(self.array()?)),
            other => {
                return Err(ModelError::malformed(
                    self.path,
                    "GGUF header",
                    format!("unknown metadata value type {other} at byte {}", self.pos),
                ));
            }
        })
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
        // SAFETY: the mapping is read-only and private to this process; a concurrent truncation of a model
        // file by another process is outside what we support (the same contract as llama.cpp and safetensors).
        #[allow(unsafe_code)]
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
        let mut cur = Cursor {
            bytes: &map,
            pos: 0,
            path,
        };
        if cur.take(4).ok() != Some(MAGIC.as_slice()) {
            return Err(ModelError::malformed(
                path,
                "GGUF file",
                "does not start with the GGUF magic",
            ));
        }
        let version = cur.u32()?;
        if !(2..=3).contains(&version) {
            return Err(ModelError::Unsupported(format!(
                "GGUF version {version} (only 2 and 3 are supported)"
            )));
        }
        let n_tensors = cur.len("tensor count")?;
        let n_kv = cur.len("metadata count")?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = cur.string()?;
            let ty = cur.u32()?;
            let value = cur.value(ty)?;
            metadata.insert(key, value);
        }
        let mut infos = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = cur.string()?;
            let n_dims = cur.u32()? as usize;
            if n_dims > 4 {
                return Err(ModelError::malformed(
                    path,
                    "GGUF tensor",
                    format!("{name} has {n_dims} dimensions"),
                ));
            }
            let dims = (0..n_dims).map(|_| cur.u64()).collect::<Result<Vec<_>>>()?;
            let raw_type = cur.u32()?;
            let ggml_type = GgmlType::from_u32(raw_type).ok_or_else(|| ModelError::Tensor {
                path: path.into(),
                name: name.clone(),
                detail: format!("unknown GGML tensor type {raw_type}"),
            })?;
            let offset = cur.u64()?;
            infos.push(TensorInfo {
                name,
                dims,
                ggml_type,
                offset,
            });
        }
        let alignment = metadata
            .get("general.alignment")
            .and_then(Value::as_u64)
            .unwrap_or(DEFAULT_ALIGNMENT)
            .max(1);
        let data_start = (cur.pos as u64).div_ceil(alignment) * alignment;
        for info in &mut infos {
            info.offset += data_start;
            let size = info
                .ggml_type
                .byte_size(info.element_count())
                .ok_or_else(|| ModelError::Tensor {
                    path: path.into(),
                    name: info.name.clone(),
                    detail: format!(
                        "{} elements are not a whole number of {:?} blocks",
                        info.element_count(),
                        info.ggml_type
                    ),
                })?;
            if info
                .offset
                .checked_add(size)
                .is_none_or(|end| end > map.len() as u64)
            {
                return Err(ModelError::Tensor {
                    path: path.into(),
                    name: info.name.clone(),
                    detail: "data runs past the end of the file (truncated download?)".into(),
                });
            }
        }
        Ok(GgufFile {
            path: path.to_path_buf(),
            map,
            version,
            metadata,
            tensors: infos,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// The raw bytes of one tensor (bounds were checked at open).
    pub fn tensor_bytes(&self, info: &TensorInfo) -> &[u8] {
        let size = info.ggml_type.byte_size(info.element_count()).unwrap_or(0) as usize;
        let start = info.offset as usize;
        &self.map[start..start + size]
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
