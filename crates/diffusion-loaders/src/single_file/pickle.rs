//! A pickle reader that executes nothing.
//!
//! PyTorch checkpoints are pickles, and a pickle is a program: `REDUCE` calls any importable
//! Python function with arguments from the stream, which is how a malicious `.ckpt` runs
//! `os.system`. This reader interprets the opcodes a `torch.save` state dict uses and builds
//! plain [`Value`]s. A global may be *named* (a checkpoint may use a class as a dict key), but
//! only the few functions below may be *called*, and those calls are emulated here, never run:
//!
//! - `collections.OrderedDict` (an empty or pre-filled dict);
//! - `torch._utils._rebuild_tensor`, `_rebuild_tensor_v2` (a view of a storage);
//! - `torch._utils._rebuild_parameter`, `_rebuild_parameter_with_state` (a tensor);
//! - the typed storage classes (`torch.FloatStorage`, `torch.HalfStorage`, ...) appear only
//!   inside persistent ids, which name a storage file of the zip archive;
//! - the data-only helpers Lightning checkpoints use for metadata: `_codecs.encode` (how
//!   protocol 2 stores `bytes`), `numpy.dtype`, `numpy.core.multiarray.scalar` (read as an int
//!   or float) and `numpy.core.multiarray._reconstruct` (an array kept opaque), the same set
//!   the A1111 web UI's restricted unpickler admits.
//!
//! Any other call (`REDUCE`, `NEWOBJ`, `INST`, `OBJ`, extension codes, `BUILD` on an object)
//! stops parsing with [`Error::UnsafePickle`] naming the global.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use diffusion_core::{Error, Result};

/// Element type of a torch storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StorageDtype {
    /// `torch.FloatStorage`.
    F32,
    /// `torch.DoubleStorage`.
    F64,
    /// `torch.HalfStorage`.
    F16,
    /// `torch.BFloat16Storage`.
    BF16,
    /// `torch.LongStorage`.
    I64,
    /// `torch.IntStorage`.
    I32,
    /// `torch.ShortStorage`.
    I16,
    /// `torch.CharStorage`.
    I8,
    /// `torch.ByteStorage`.
    U8,
    /// `torch.BoolStorage`.
    Bool,
}

impl StorageDtype {
    fn from_class(name: &str) -> Option<Self> {
        Some(match name {
            "FloatStorage" => Self::F32,
            "DoubleStorage" => Self::F64,
            "HalfStorage" => Self::F16,
            "BFloat16Storage" => Self::BF16,
            "LongStorage" => Self::I64,
            "IntStorage" => Self::I32,
            "ShortStorage" => Self::I16,
            "CharStorage" => Self::I8,
            "ByteStorage" => Self::U8,
            "BoolStorage" => Self::Bool,
            _ => return None,
        })
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::F64 | Self::I64 => 8,
            Self::F32 | Self::I32 => 4,
            Self::F16 | Self::BF16 | Self::I16 => 2,
            Self::I8 | Self::U8 | Self::Bool => 1,
        }
    }

    /// The safetensors name of the type (`F16`, `I64`, ...), used in messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::F64 => "F64",
            Self::F16 => "F16",
            Self::BF16 => "BF16",
            Self::I64 => "I64",
            Self::I32 => "I32",
            Self::I16 => "I16",
            Self::I8 => "I8",
            Self::U8 => "U8",
            Self::Bool => "BOOL",
        }
    }
}

/// A tensor described by the pickle: a strided view into a storage file of the archive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorRef {
    /// Name of the storage file under the archive's `data/` folder.
    pub storage: String,
    /// Element type of the storage.
    pub dtype: StorageDtype,
    /// Elements in the storage.
    pub storage_len: usize,
    /// Offset of the first element, in elements.
    pub offset: usize,
    /// Shape.
    pub shape: Vec<usize>,
    /// Strides, in elements.
    pub stride: Vec<usize>,
}

/// A shared Python container (lists and dicts are references in Python; the memo hands the same
/// object out again). Dropping one takes its children apart on a heap work list, so a hostile
/// pickle nesting containers millions deep cannot overflow the stack.
#[derive(Debug, Default)]
pub struct Shared<T: Children>(Rc<T>);

impl<T: Children> Shared<T> {
    fn new(inner: T) -> Self {
        Self(Rc::new(inner))
    }
}

impl<T: Children> Clone for Shared<T> {
    fn clone(&self) -> Self {
        Self(Rc::clone(&self.0))
    }
}

impl<T: Children> std::ops::Deref for Shared<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T: Children> Drop for Shared<T> {
    fn drop(&mut self) {
        // Only the last owner takes the children; each child is then dropped with no children
        // of its own, so no drop recurses.
        let Some(inner) = Rc::get_mut(&mut self.0) else {
            return;
        };
        let mut work = Vec::new();
        inner.take_children(&mut work);
        while let Some(mut value) = work.pop() {
            match &mut value {
                Value::Tuple(s) => take(s, &mut work),
                Value::List(s) => take(s, &mut work),
                Value::Dict(s) => take(s, &mut work),
                _ => {}
            }
        }
    }
}

fn take<T: Children>(shared: &mut Shared<T>, work: &mut Vec<Value>) {
    if let Some(inner) = Rc::get_mut(&mut shared.0) {
        inner.take_children(work);
    }
}

/// Containers whose children [`Shared`] moves out before dropping them.
pub trait Children {
    /// Move every child value into `out`.
    fn take_children(&mut self, out: &mut Vec<Value>);
}

impl Children for Vec<Value> {
    fn take_children(&mut self, out: &mut Vec<Value>) {
        out.append(self);
    }
}

impl Children for RefCell<Vec<Value>> {
    fn take_children(&mut self, out: &mut Vec<Value>) {
        out.append(self.get_mut());
    }
}

impl Children for RefCell<Vec<(Value, Value)>> {
    fn take_children(&mut self, out: &mut Vec<Value>) {
        for (k, v) in self.get_mut().drain(..) {
            out.push(k);
            out.push(v);
        }
    }
}

/// A Python value as far as a tensor checkpoint needs one.
#[derive(Clone, Debug)]
pub enum Value {
    /// `None`.
    None,
    /// `True` / `False`.
    Bool(bool),
    /// An integer that fits in 64 bits.
    Int(i64),
    /// A float.
    Float(f64),
    /// A `str`.
    Str(String),
    /// `bytes`.
    Bytes(Vec<u8>),
    /// A tuple.
    Tuple(Shared<Vec<Value>>),
    /// A list (shared, as Python lists are references).
    List(Shared<RefCell<Vec<Value>>>),
    /// A dict or `OrderedDict`, insertion ordered (shared).
    Dict(Shared<RefCell<Vec<(Value, Value)>>>),
    /// A global that was named but never called (`module.name`).
    Global(String),
    /// A storage named by a persistent id.
    Storage {
        /// Storage file name.
        key: String,
        /// Element type.
        dtype: StorageDtype,
        /// Number of elements.
        len: usize,
    },
    /// A rebuilt tensor.
    Tensor(TensorRef),
    /// A `numpy.dtype` (its type string, `"i8"`, `"f4"`, ...).
    NumpyDtype(String),
    /// Data this reader keeps but does not interpret (a numpy array), by type name.
    Opaque(String),
}

impl Value {
    /// The entries of a dict value, `None` for anything else.
    pub fn dict_entries(&self) -> Option<Vec<(Value, Value)>> {
        match self {
            Self::Dict(d) => Some(d.borrow().clone()),
            _ => None,
        }
    }

    /// The value under string key `key` of a dict.
    pub fn get(&self, key: &str) -> Option<Value> {
        let Self::Dict(d) = self else { return None };
        d.borrow()
            .iter()
            .find(|(k, _)| matches!(k, Value::Str(s) if s == key))
            .map(|(_, v)| v.clone())
    }

    fn type_name(&self) -> &'static str {
        match self {
            Self::None => "None",
            Self::Bool(_) => "bool",
            Self::Int(_) => "int",
            Self::Float(_) => "float",
            Self::Str(_) => "str",
            Self::Bytes(_) => "bytes",
            Self::Tuple(_) => "tuple",
            Self::List(_) => "list",
            Self::Dict(_) => "dict",
            Self::Global(_) => "global",
            Self::Storage { .. } => "storage",
            Self::Tensor(_) => "tensor",
            Self::NumpyDtype(_) => "numpy.dtype",
            Self::Opaque(_) => "opaque",
        }
    }
}

/// The globals whose calls are emulated.
fn allowed_call(global: &str) -> bool {
    matches!(
        global,
        "collections.OrderedDict"
            | "torch._utils._rebuild_tensor"
            | "torch._utils._rebuild_tensor_v2"
            | "torch._utils._rebuild_parameter"
            | "torch._utils._rebuild_parameter_with_state"
            | "_codecs.encode"
            | "numpy.dtype"
            | "numpy.core.multiarray.scalar"
            | "numpy._core.multiarray.scalar"
            | "numpy.core.multiarray._reconstruct"
            | "numpy._core.multiarray._reconstruct"
    )
}

/// `numpy.core.multiarray.scalar(dtype, bytes)` for the numeric dtypes (little-endian).
fn numpy_scalar(dtype: &str, b: &[u8]) -> Option<Value> {
    let int = |n: usize, signed: bool| -> Option<Value> {
        if b.len() != n {
            return None;
        }
        let fill = if signed && b[n - 1] & 0x80 != 0 {
            0xff
        } else {
            0
        };
        let mut buf = [fill; 8];
        buf[..n].copy_from_slice(b);
        Some(Value::Int(i64::from_le_bytes(buf)))
    };
    match dtype.trim_start_matches(['<', '|', '=']) {
        "i1" => int(1, true),
        "i2" => int(2, true),
        "i4" => int(4, true),
        "i8" => int(8, true),
        "u1" => int(1, false),
        "u2" => int(2, false),
        "u4" => int(4, false),
        "b1" => b.first().map(|&x| Value::Bool(x != 0)),
        "f2" => {
            (b.len() == 2).then(|| Value::Float(half::f16::from_le_bytes([b[0], b[1]]).to_f64()))
        }
        "f4" => (b.len() == 4)
            .then(|| Value::Float(f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64)),
        "f8" => b
            .try_into()
            .ok()
            .map(|a| Value::Float(f64::from_le_bytes(a))),
        _ => None,
    }
}

/// The stack holds values and marks.
enum Item {
    Mark,
    Value(Value),
}

struct Machine<'a> {
    path: &'a Path,
    data: &'a [u8],
    pos: usize,
    stack: Vec<Item>,
    memo: HashMap<u32, Value>,
}

/// Parse a pickle, refusing any call outside the tensor-rebuild allow-list.
///
/// # Errors
/// [`Error::UnsafePickle`] naming the global when the pickle would call one outside the
/// allow-list; [`Error::Pickle`] naming `path` for truncated or malformed data and opcodes a
/// tensor checkpoint does not use.
pub fn parse(data: &[u8], path: &Path) -> Result<Value> {
    let mut m = Machine {
        path,
        data,
        pos: 0,
        stack: Vec::new(),
        memo: HashMap::new(),
    };
    m.run()
}

impl Machine<'_> {
    fn err(&self, message: impl Into<String>) -> Error {
        Error::Pickle {
            path: self.path.to_path_buf(),
            message: format!("{} (at byte {})", message.into(), self.pos),
        }
    }

    fn unsafe_global(&self, global: &str) -> Error {
        Error::UnsafePickle {
            path: PathBuf::from(self.path),
            global: global.to_string(),
        }
    }

    fn take(&mut self, n: usize) -> Result<&[u8]> {
        if n > self.data.len() - self.pos {
            return Err(self.err(format!(
                "truncated: needs {n} more bytes, {} left",
                self.data.len() - self.pos
            )));
        }
        let out = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    fn len_u64(&mut self) -> Result<usize> {
        let n = self.u64()?;
        usize::try_from(n).map_err(|_| self.err(format!("length {n} too large")))
    }

    fn line(&mut self) -> Result<String> {
        let rest = &self.data[self.pos..];
        let end = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| self.err("truncated: unterminated text argument"))?;
        let text = String::from_utf8(rest[..end].to_vec())
            .map_err(|_| self.err("text argument is not UTF-8"))?;
        self.pos += end + 1;
        Ok(text)
    }

    fn utf8(&mut self, n: usize) -> Result<Value> {
        let bytes = self.take(n)?.to_vec();
        String::from_utf8(bytes)
            .map(Value::Str)
            .map_err(|_| self.err("string is not UTF-8"))
    }

    fn push(&mut self, v: Value) {
        self.stack.push(Item::Value(v));
    }

    fn pop(&mut self) -> Result<Value> {
        match self.stack.pop() {
            Some(Item::Value(v)) => Ok(v),
            Some(Item::Mark) => Err(self.err("unexpected mark on the stack")),
            None => Err(self.err("stack underflow")),
        }
    }

    fn top(&mut self) -> Result<&mut Value> {
        match self.stack.last_mut() {
            Some(Item::Value(v)) => Ok(v),
            _ => Err(Error::Pickle {
                path: self.path.to_path_buf(),
                message: format!("stack underflow (at byte {})", self.pos),
            }),
        }
    }

    /// The values above the topmost mark, removing them and the mark.
    fn pop_mark(&mut self) -> Result<Vec<Value>> {
        let mark = self
            .stack
            .iter()
            .rposition(|i| matches!(i, Item::Mark))
            .ok_or_else(|| self.err("no mark on the stack"))?;
        let items = self.stack.split_off(mark + 1);
        self.stack.pop();
        Ok(items
            .into_iter()
            .map(|i| match i {
                Item::Value(v) => v,
                Item::Mark => Value::None,
            })
            .collect())
    }

    fn memo_put(&mut self, index: u32) -> Result<()> {
        let v = self.top()?.clone();
        self.memo.insert(index, v);
        Ok(())
    }

    fn memo_get(&mut self, index: u32) -> Result<()> {
        let v = self
            .memo
            .get(&index)
            .cloned()
            .ok_or_else(|| self.err(format!("memo entry {index} was never stored")))?;
        self.push(v);
        Ok(())
    }

    fn set_items(&mut self, items: Vec<Value>) -> Result<()> {
        if !items.len().is_multiple_of(2) {
            return Err(self.err("SETITEMS with an odd number of values"));
        }
        let target = self.top()?.clone();
        let Value::Dict(d) = target else {
            return Err(self.err(format!("SETITEM on a {}", target.type_name())));
        };
        let mut d = d.borrow_mut();
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            insert(&mut d, k, v);
        }
        Ok(())
    }

    fn append(&mut self, items: Vec<Value>) -> Result<()> {
        let target = self.top()?.clone();
        let Value::List(l) = target else {
            return Err(self.err(format!("APPEND on a {}", target.type_name())));
        };
        l.borrow_mut().extend(items);
        Ok(())
    }

    fn global(&mut self, module: &str, name: &str) -> Value {
        // Protocols < 3 write Python 2 module names; Python maps them back (`fix_imports`).
        let module = match module {
            "__builtin__" => "builtins",
            "copy_reg" => "copyreg",
            other => other,
        };
        Value::Global(format!("{module}.{name}"))
    }

    fn persistent_load(&mut self, pid: Value) -> Result<Value> {
        let Value::Tuple(parts) = &pid else {
            return Err(self.err("persistent id is not a tuple"));
        };
        match parts.as_slice() {
            [
                Value::Str(kind),
                Value::Global(class),
                Value::Str(key),
                _location,
                Value::Int(len),
            ] if kind == "storage" => {
                let dtype = class
                    .strip_prefix("torch.")
                    .and_then(StorageDtype::from_class)
                    .ok_or_else(|| self.err(format!("unknown storage type `{class}`")))?;
                let len = usize::try_from(*len)
                    .map_err(|_| self.err(format!("negative storage length {len}")))?;
                if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    return Err(self.err(format!("storage key `{key}` is not a plain name")));
                }
                Ok(Value::Storage {
                    key: key.clone(),
                    dtype,
                    len,
                })
            }
            _ => Err(self.err(
                "persistent id is not a torch storage ('storage', type, key, location, numel)",
            )),
        }
    }

    fn call(&mut self, func: Value, args: Value) -> Result<Value> {
        let name = match &func {
            Value::Global(name) => name.clone(),
            other => return Err(self.err(format!("REDUCE on a {}", other.type_name()))),
        };
        if !allowed_call(&name) {
            return Err(self.unsafe_global(&name));
        }
        let Value::Tuple(args) = args else {
            return Err(self.err(format!("arguments of `{name}` are not a tuple")));
        };
        match name.as_str() {
            "collections.OrderedDict" => {
                let mut entries = Vec::new();
                if let Some(Value::List(items)) = args.first() {
                    for item in items.borrow().iter() {
                        match item {
                            Value::Tuple(kv) if kv.len() == 2 => {
                                insert(&mut entries, kv[0].clone(), kv[1].clone())
                            }
                            _ => return Err(self.err("OrderedDict item is not a pair")),
                        }
                    }
                }
                Ok(Value::Dict(Shared::new(RefCell::new(entries))))
            }
            "_codecs.encode" => match args.as_slice() {
                [Value::Str(text), Value::Str(encoding)] => match encoding.as_str() {
                    "latin1" | "latin-1" | "iso-8859-1" => text
                        .chars()
                        .map(|c| u8::try_from(u32::from(c)).ok())
                        .collect::<Option<Vec<u8>>>()
                        .map(Value::Bytes)
                        .ok_or_else(|| self.err("latin1 text with a character above 255")),
                    "utf-8" | "utf8" => Ok(Value::Bytes(text.as_bytes().to_vec())),
                    other => Err(self.err(format!("`_codecs.encode` with encoding `{other}`"))),
                },
                _ => Err(self.err("unexpected arguments to `_codecs.encode`")),
            },
            "numpy.dtype" => match args.first() {
                Some(Value::Str(name)) => Ok(Value::NumpyDtype(name.clone())),
                _ => Err(self.err("unexpected arguments to `numpy.dtype`")),
            },
            "numpy.core.multiarray.scalar" | "numpy._core.multiarray.scalar" => {
                match args.as_slice() {
                    [Value::NumpyDtype(dtype), Value::Bytes(b)] => Ok(numpy_scalar(dtype, b)
                        .unwrap_or_else(|| Value::Opaque(format!("numpy.{dtype}")))),
                    _ => Ok(Value::Opaque("numpy scalar".into())),
                }
            }
            "numpy.core.multiarray._reconstruct" | "numpy._core.multiarray._reconstruct" => {
                Ok(Value::Opaque("numpy.ndarray".into()))
            }
            "torch._utils._rebuild_parameter" | "torch._utils._rebuild_parameter_with_state" => {
                match args.first() {
                    Some(t @ Value::Tensor(_)) => Ok(t.clone()),
                    _ => Err(self.err(format!("`{name}` without a tensor"))),
                }
            }
            _ => self.rebuild_tensor(&name, &args),
        }
    }

    fn rebuild_tensor(&self, name: &str, args: &[Value]) -> Result<Value> {
        let (Some(storage), Some(Value::Int(offset)), Some(Value::Tuple(size)), Some(stride)) =
            (args.first(), args.get(1), args.get(2), args.get(3))
        else {
            return Err(self.err(format!("unexpected arguments to `{name}`")));
        };
        let Value::Storage { key, dtype, len } = storage else {
            return Err(self.err(format!("`{name}` without a storage")));
        };
        let ints = |values: &[Value], what: &str| -> Result<Vec<usize>> {
            values
                .iter()
                .map(|v| match v {
                    Value::Int(i) if *i >= 0 => Ok(*i as usize),
                    _ => Err(self.err(format!("`{name}`: {what} is not a non-negative int"))),
                })
                .collect()
        };
        let shape = ints(size, "a size")?;
        let stride = match stride {
            Value::Tuple(s) => ints(s, "a stride")?,
            _ => return Err(self.err(format!("`{name}`: stride is not a tuple"))),
        };
        if stride.len() != shape.len() {
            return Err(self.err(format!(
                "`{name}`: {} sizes, {} strides",
                shape.len(),
                stride.len()
            )));
        }
        let offset = usize::try_from(*offset).map_err(|_| self.err("negative storage offset"))?;
        // A view with more elements than its storage (a broadcast) would let a tiny file ask
        // for an arbitrarily large tensor; state dicts never hold one.
        let count = shape
            .iter()
            .try_fold(1usize, |acc, &n| acc.checked_mul(n))
            .ok_or_else(|| self.err("tensor size overflows"))?;
        if count > *len {
            return Err(self.err(format!(
                "tensor of shape {shape:?} has more elements than its storage `{key}` ({len})"
            )));
        }
        // The last element reached must lie inside the storage.
        if !shape.contains(&0) {
            let last = shape
                .iter()
                .zip(&stride)
                .try_fold(offset, |acc, (n, s)| {
                    (n - 1).checked_mul(*s).and_then(|x| x.checked_add(acc))
                })
                .ok_or_else(|| self.err("tensor extent overflows"))?;
            if last >= *len {
                return Err(self.err(format!(
                    "tensor of shape {shape:?} reaches element {last} of storage `{key}`, which \
                     has {len}"
                )));
            }
        }
        Ok(Value::Tensor(TensorRef {
            storage: key.clone(),
            dtype: *dtype,
            storage_len: *len,
            offset,
            shape,
            stride,
        }))
    }

    fn build(&mut self) -> Result<()> {
        let state = self.pop()?;
        let target = self.top()?.clone();
        match (&target, state) {
            // OrderedDict state (`_metadata` of a module state dict), tensor attributes, a numpy
            // dtype's byte order and a numpy array's data are data only; they are dropped.
            (Value::Dict(_) | Value::Tensor(_) | Value::NumpyDtype(_) | Value::Opaque(_), _) => {
                Ok(())
            }
            (Value::Global(g), _) => Err(self.unsafe_global(g)),
            (other, _) => Err(self.err(format!("BUILD on a {}", other.type_name()))),
        }
    }

    fn run(&mut self) -> Result<Value> {
        loop {
            let op = self.u8()?;
            match op {
                0x80 => {
                    let proto = self.u8()?;
                    if proto > 5 {
                        return Err(self.err(format!("pickle protocol {proto} is not supported")));
                    }
                }
                0x95 => {
                    self.u64()?; // FRAME: a length hint only
                }
                b'.' => return self.pop(),
                b'(' => self.stack.push(Item::Mark),
                b'}' => self.push(Value::Dict(Shared::default())),
                b']' => self.push(Value::List(Shared::default())),
                b')' => self.push(Value::Tuple(Shared::default())),
                b't' => {
                    let items = self.pop_mark()?;
                    self.push(Value::Tuple(Shared::new(items)));
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    self.push(Value::List(Shared::new(RefCell::new(items))));
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    self.push(Value::Dict(Shared::default()));
                    self.set_items(items)?;
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    self.push(Value::Tuple(Shared::new(items)));
                }
                b'q' => {
                    let i = self.u8()? as u32;
                    self.memo_put(i)?;
                }
                b'r' => {
                    let i = self.u32()?;
                    self.memo_put(i)?;
                }
                0x94 => {
                    let i = self.memo.len() as u32;
                    self.memo_put(i)?;
                }
                b'p' => {
                    let line = self.line()?;
                    let i = line.trim().parse().map_err(|_| self.err("bad PUT index"))?;
                    self.memo_put(i)?;
                }
                b'h' => {
                    let i = self.u8()? as u32;
                    self.memo_get(i)?;
                }
                b'j' => {
                    let i = self.u32()?;
                    self.memo_get(i)?;
                }
                b'g' => {
                    let line = self.line()?;
                    let i = line.trim().parse().map_err(|_| self.err("bad GET index"))?;
                    self.memo_get(i)?;
                }
                b'J' => {
                    let b = self.take(4)?;
                    let v = i32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                    self.push(Value::Int(v as i64));
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(Value::Int(v as i64));
                }
                b'M' => {
                    let v = self.u16()?;
                    self.push(Value::Int(v as i64));
                }
                0x8a => {
                    let n = self.u8()? as usize;
                    let v = self.long(n)?;
                    self.push(v);
                }
                0x8b => {
                    let n = self.u32()? as usize;
                    let v = self.long(n)?;
                    self.push(v);
                }
                b'I' => {
                    let line = self.line()?;
                    let v = match line.trim() {
                        "01" => Value::Bool(true),
                        "00" => Value::Bool(false),
                        t => Value::Int(t.parse().map_err(|_| self.err("bad INT"))?),
                    };
                    self.push(v);
                }
                b'L' => {
                    let line = self.line()?;
                    let t = line.trim().trim_end_matches('L');
                    let v = t
                        .parse()
                        .map_err(|_| self.err("LONG does not fit in 64 bits"))?;
                    self.push(Value::Int(v));
                }
                b'G' => {
                    let b = self.take(8)?;
                    let mut a = [0u8; 8];
                    a.copy_from_slice(b);
                    self.push(Value::Float(f64::from_be_bytes(a)));
                }
                b'F' => {
                    let line = self.line()?;
                    let v = line.trim().parse().map_err(|_| self.err("bad FLOAT"))?;
                    self.push(Value::Float(v));
                }
                b'N' => self.push(Value::None),
                0x88 => self.push(Value::Bool(true)),
                0x89 => self.push(Value::Bool(false)),
                b'X' => {
                    let n = self.u32()? as usize;
                    let v = self.utf8(n)?;
                    self.push(v);
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let v = self.utf8(n)?;
                    self.push(v);
                }
                0x8d => {
                    let n = self.len_u64()?;
                    let v = self.utf8(n)?;
                    self.push(v);
                }
                b'T' => {
                    let n = self.u32()? as usize;
                    let v = self.take(n)?.to_vec();
                    self.push(Value::Bytes(v));
                }
                b'U' | b'C' => {
                    let n = self.u8()? as usize;
                    let v = self.take(n)?.to_vec();
                    self.push(Value::Bytes(v));
                }
                b'B' => {
                    let n = self.u32()? as usize;
                    let v = self.take(n)?.to_vec();
                    self.push(Value::Bytes(v));
                }
                0x8e => {
                    let n = self.len_u64()?;
                    let v = self.take(n)?.to_vec();
                    self.push(Value::Bytes(v));
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.set_items(vec![k, v])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    self.set_items(items)?;
                }
                b'a' => {
                    let v = self.pop()?;
                    self.append(vec![v])?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    self.append(items)?;
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    let v = self.global(&module, &name);
                    self.push(v);
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Value::Str(module), Value::Str(name)) = (module, name) else {
                        return Err(self.err("STACK_GLOBAL without two strings"));
                    };
                    let v = self.global(&module, &name);
                    self.push(v);
                }
                b'R' => {
                    let args = self.pop()?;
                    let func = self.pop()?;
                    let v = self.call(func, args)?;
                    self.push(v);
                }
                0x81 | 0x92 => {
                    // NEWOBJ / NEWOBJ_EX: `cls.__new__(cls, *args)`, never needed by tensors.
                    if op == 0x92 {
                        self.pop()?;
                    }
                    self.pop()?;
                    let cls = self.pop()?;
                    let name = match cls {
                        Value::Global(g) => g,
                        other => other.type_name().to_string(),
                    };
                    return Err(self.unsafe_global(&name));
                }
                b'i' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    return Err(self.unsafe_global(&format!("{module}.{name}")));
                }
                b'o' => {
                    let mut items = self.pop_mark()?;
                    let name = match items.drain(..).next() {
                        Some(Value::Global(g)) => g,
                        _ => "OBJ".to_string(),
                    };
                    return Err(self.unsafe_global(&name));
                }
                0x82..=0x84 => {
                    return Err(self.unsafe_global("copyreg extension registry"));
                }
                b'b' => self.build()?,
                b'Q' => {
                    let pid = self.pop()?;
                    let v = self.persistent_load(pid)?;
                    self.push(v);
                }
                b'0' => {
                    self.stack
                        .pop()
                        .ok_or_else(|| self.err("stack underflow"))?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.push(v);
                }
                other => {
                    return Err(self.err(format!(
                        "opcode 0x{other:02x} is not used by tensor checkpoints"
                    )));
                }
            }
        }
    }

    fn long(&mut self, n: usize) -> Result<Value> {
        let bytes = self.take(n)?.to_vec();
        if n > 8 {
            return Err(self.err("integer does not fit in 64 bits"));
        }
        if n == 0 {
            return Ok(Value::Int(0));
        }
        let negative = bytes[n - 1] & 0x80 != 0;
        let mut buf = [if negative { 0xff } else { 0 }; 8];
        buf[..n].copy_from_slice(&bytes);
        Ok(Value::Int(i64::from_le_bytes(buf)))
    }
}

/// Insert or replace `k` (dict semantics for the key types a checkpoint uses).
fn insert(entries: &mut Vec<(Value, Value)>, k: Value, v: Value) {
    let same = |a: &Value| match (a, &k) {
        (Value::Str(x), Value::Str(y)) => x == y,
        (Value::Int(x), Value::Int(y)) => x == y,
        (Value::Global(x), Value::Global(y)) => x == y,
        _ => false,
    };
    if let Some(slot) = entries.iter_mut().find(|(a, _)| same(a)) {
        slot.1 = v;
    } else {
        entries.push((k, v));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_ok(bytes: &[u8]) -> Value {
        parse(bytes, Path::new("t.pkl")).unwrap()
    }

    #[test]
    fn plain_values() {
        // pickle.dumps({"a": 1, "b": [1.5, None, True], "c": (300, -2)}, protocol=2)
        let mut p = vec![
            0x80, 2, b'}', b'q', 0, b'(', b'X', 1, 0, 0, 0, b'a', b'K', 1,
        ];
        p.extend([b'X', 1, 0, 0, 0, b'b', b']', b'(', b'G']);
        p.extend(1.5f64.to_be_bytes());
        p.extend([b'N', 0x88, b'e', b'X', 1, 0, 0, 0, b'c', b'M']);
        p.extend(300u16.to_le_bytes());
        p.extend([b'J']);
        p.extend((-2i32).to_le_bytes());
        p.extend([0x86, b'u', b'.']);
        let v = parse_ok(&p);
        assert!(matches!(v.get("a"), Some(Value::Int(1))));
        match v.get("b") {
            Some(Value::List(l)) => assert_eq!(l.borrow().len(), 3),
            other => panic!("{other:?}"),
        }
        match v.get("c") {
            Some(Value::Tuple(t)) => {
                assert!(matches!(t[..], [Value::Int(300), Value::Int(-2)]))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn calls_outside_the_allow_list_are_refused() {
        // cposix\nsystem\n(X...tR.
        let mut p = b"cposix\nsystem\n(X\x02\x00\x00\x00lst".to_vec();
        p.extend(b"R.");
        match parse(&p, Path::new("evil.pkl")) {
            Err(Error::UnsafePickle { global, .. }) => assert_eq!(global, "posix.system"),
            other => panic!("{other:?}"),
        }
        // A named but uncalled global is inert.
        let v = parse_ok(b"cbuiltins\nprint\n.");
        assert!(matches!(v, Value::Global(g) if g == "builtins.print"));
        // NEWOBJ and INST name their class.
        match parse(b"csubprocess\nPopen\n)\x81.", Path::new("x")) {
            Err(Error::UnsafePickle { global, .. }) => assert_eq!(global, "subprocess.Popen"),
            other => panic!("{other:?}"),
        }
        match parse(b"(ios\nsystem\n.", Path::new("x")) {
            Err(Error::UnsafePickle { global, .. }) => assert_eq!(global, "os.system"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn lightning_metadata_with_numpy_scalars() {
        // pickle.dumps({"global_step": numpy.int64(5), "score": numpy.float32(0.5),
        //               "arr": numpy.arange(3.0)}, protocol=2)
        let p: &[u8] = b"\x80\x02}q\x00(X\x0b\x00\x00\x00global_stepq\x01cnumpy._core.multiarray\nscalar\nq\x02cnumpy\ndtype\nq\x03X\x02\x00\x00\x00i8q\x04\x89\x88\x87q\x05Rq\x06(K\x03X\x01\x00\x00\x00<q\x07NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tq\x08bc_codecs\nencode\nq\tX\x08\x00\x00\x00\x05\x00\x00\x00\x00\x00\x00\x00q\nX\x06\x00\x00\x00latin1q\x0b\x86q\x0cRq\r\x86q\x0eRq\x0fX\x05\x00\x00\x00scoreq\x10h\x02h\x03X\x02\x00\x00\x00f4q\x11\x89\x88\x87q\x12Rq\x13(K\x03h\x07NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tq\x14bh\tX\x04\x00\x00\x00\x00\x00\x00?q\x15h\x0b\x86q\x16Rq\x17\x86q\x18Rq\x19X\x03\x00\x00\x00arrq\x1acnumpy._core.multiarray\n_reconstruct\nq\x1bcnumpy\nndarray\nq\x1cK\x00\x85q\x1dh\tX\x01\x00\x00\x00bq\x1eh\x0b\x86q\x1fRq \x87q!Rq\"(K\x01K\x03\x85q#h\x03X\x02\x00\x00\x00f8q$\x89\x88\x87q%Rq&(K\x03h\x07NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tq\'b\x89h\tX\x19\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\xc3\xb0?\x00\x00\x00\x00\x00\x00\x00@q(h\x0b\x86q)Rq*tq+bu.";
        let v = parse_ok(p);
        assert!(matches!(v.get("global_step"), Some(Value::Int(5))));
        assert!(matches!(v.get("score"), Some(Value::Float(x)) if x == 0.5));
        assert!(matches!(v.get("arr"), Some(Value::Opaque(_))));
    }

    #[test]
    fn deep_nesting_does_not_overflow_the_stack() {
        // A million nested tuples: `((((...()...))))`.
        let depth = 1_000_000;
        let mut p = vec![0x80, 2];
        p.extend(std::iter::repeat_n(b'(', depth));
        p.push(b')');
        p.extend(std::iter::repeat_n(b't', depth));
        p.push(b'.');
        let v = parse_ok(&p);
        assert!(matches!(v, Value::Tuple(_)));
        drop(v);
    }

    #[test]
    fn truncated_and_unknown_opcodes_are_errors() {
        assert!(matches!(
            parse(b"\x80\x02X\xff\x00\x00\x00ab", Path::new("x")),
            Err(Error::Pickle { .. })
        ));
        assert!(matches!(
            parse(b"\x80\x02", Path::new("x")),
            Err(Error::Pickle { .. })
        ));
        assert!(matches!(
            parse(b"\xff", Path::new("x")),
            Err(Error::Pickle { .. })
        ));
    }
}
