//! A pickle reader that runs nothing: it interprets the opcodes of protocols 2 to 5 into
//! plain values, and the only "code" a pickle can name (a global) must be on a short list of
//! data-only constructors, which are recognised, never imported or called. Anything else is
//! refused before a single tensor is read, with the global's name.
//!
//! This is what PyTorch's `torch.save` writes into a checkpoint's `data.pkl`: nested dicts
//! (`collections.OrderedDict`), tensors rebuilt from storages
//! (`torch._utils._rebuild_tensor_v2`), and storages as persistent ids.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

/// The globals a checkpoint may name: data constructors whose meaning is known here.
/// Checkpoints saved by the original training code also carry a Lightning callback's state
/// and numpy scalars (A1111's loader accepts the same ones); they become opaque values.
const ALLOWED: &[&str] = &[
    "collections.OrderedDict",
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_parameter",
    "torch.FloatStorage",
    "torch.HalfStorage",
    "torch.BFloat16Storage",
    "torch.DoubleStorage",
    "torch.LongStorage",
    "torch.IntStorage",
    "torch.ShortStorage",
    "torch.CharStorage",
    "torch.ByteStorage",
    "torch.BoolStorage",
    "torch.device",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    "numpy.dtype",
    "_codecs.encode",
    "builtins.set",
    "__builtin__.set",
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
];

/// A pickled value.
#[derive(Clone)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Value>),
    List(Rc<RefCell<Vec<Value>>>),
    Dict(Rc<RefCell<Vec<(Value, Value)>>>),
    /// A global from the allowed list, not yet applied.
    Global(String),
    /// `('storage', type, key, location, numel)`, PyTorch's persistent id for a storage.
    Storage {
        dtype: String,
        key: String,
    },
    /// A tensor: its storage, and where in it the values are.
    Tensor(TensorRef),
    /// Any other allowed object (a numpy scalar, a callback's state): kept, never looked in.
    Opaque(String),
}

/// Shows the kind only: a pickle's dicts may contain themselves.
impl std::fmt::Debug for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.kind())
    }
}

impl Value {
    /// What kind of value it is, for errors (never the value: a pickle's dicts may contain
    /// themselves).
    pub fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "a bool",
            Value::Int(_) => "an int",
            Value::Float(_) => "a float",
            Value::Str(_) => "a string",
            Value::Bytes(_) => "bytes",
            Value::Tuple(_) => "a tuple",
            Value::List(_) => "a list",
            Value::Dict(_) => "a dict",
            Value::Global(_) => "a global",
            Value::Storage { .. } => "a storage",
            Value::Tensor(_) => "a tensor",
            Value::Opaque(_) => "an object",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct TensorRef {
    /// The storage type's name (`FloatStorage`, `HalfStorage`, ...).
    pub dtype: String,
    /// The storage's file under `data/` in the archive.
    pub key: String,
    /// In elements.
    pub offset: usize,
    pub shape: Vec<usize>,
    pub stride: Vec<usize>,
}

#[derive(Debug, PartialEq)]
pub struct PickleError(pub String);

impl std::fmt::Display for PickleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn err<T>(m: impl Into<String>) -> Result<T, PickleError> {
    Err(PickleError(m.into()))
}

/// Bounds on what a pickle may make us allocate: a hostile length field cannot ask for
/// gigabytes before the bytes are there (every length is also checked against the input).
const MAX_DEPTH: usize = 10_000;

struct Machine<'a> {
    input: &'a [u8],
    at: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u64, Value>,
}

/// Reads a pickle into its value, refusing any global that is not on the allowed list.
pub fn read(input: &[u8]) -> Result<Value, PickleError> {
    let mut m = Machine {
        input,
        at: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
    };
    m.run()
}

impl<'a> Machine<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], PickleError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.input.len());
        let Some(end) = end else {
            return err(format!(
                "the pickle ends early (wanted {n} bytes at {})",
                self.at
            ));
        };
        let bytes = &self.input[self.at..end];
        self.at = end;
        Ok(bytes)
    }

    fn u8(&mut self) -> Result<u8, PickleError> {
        Ok(self.take(1)?[0])
    }

    fn le<const N: usize>(&mut self) -> Result<[u8; N], PickleError> {
        Ok(self.take(N)?.try_into().expect("N bytes"))
    }

    fn line(&mut self) -> Result<&'a str, PickleError> {
        let rest = &self.input[self.at..];
        let Some(n) = rest.iter().position(|&b| b == b'\n') else {
            return err("the pickle ends inside a text line");
        };
        let line = std::str::from_utf8(&rest[..n])
            .map_err(|_| PickleError("a text line that is not UTF-8".into()))?;
        self.at += n + 1;
        Ok(line)
    }

    fn pop(&mut self) -> Result<Value, PickleError> {
        match self.stack.pop() {
            Some(v) => Ok(v),
            None => err("the pickle pops an empty stack"),
        }
    }

    /// The values since the last MARK.
    fn pop_mark(&mut self) -> Result<Vec<Value>, PickleError> {
        let Some(mark) = self.marks.pop() else {
            return err("the pickle has no MARK to pop to");
        };
        if mark > self.stack.len() {
            return err("the pickle's MARK is above the stack");
        }
        Ok(self.stack.split_off(mark))
    }

    fn push(&mut self, v: Value) -> Result<(), PickleError> {
        if self.stack.len() > 1 << 20 {
            return err("the pickle's stack grows without end");
        }
        self.stack.push(v);
        Ok(())
    }

    fn text(&mut self, n: usize) -> Result<String, PickleError> {
        let bytes = self.take(n)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| PickleError("a string that is not UTF-8".into()))
    }

    fn global(&mut self, module: &str, name: &str) -> Result<Value, PickleError> {
        let full = format!("{module}.{name}");
        if ALLOWED.contains(&full.as_str()) {
            Ok(Value::Global(full))
        } else {
            err(format!(
                "the pickle names `{full}`, which is not a known data type: refused (it could run code when loaded)"
            ))
        }
    }

    fn run(&mut self) -> Result<Value, PickleError> {
        loop {
            let op = self.u8()?;
            match op {
                0x80 => {
                    let proto = self.u8()?;
                    if !(2..=5).contains(&proto) {
                        return err(format!("pickle protocol {proto} (2 to 5 are read)"));
                    }
                }
                0x95 => {
                    self.le::<8>()?; // FRAME: a length hint only
                }
                b'.' => return self.pop(),
                b'(' => self.marks.push(self.stack.len()),
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let top = self
                        .stack
                        .last()
                        .cloned()
                        .ok_or(PickleError("DUP of nothing".into()))?;
                    self.push(top)?;
                }
                b'N' => self.push(Value::None)?,
                0x88 => self.push(Value::Bool(true))?,
                0x89 => self.push(Value::Bool(false))?,
                b'J' => {
                    let v = i32::from_le_bytes(self.le()?);
                    self.push(Value::Int(v.into()))?
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(Value::Int(v.into()))?
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.le()?);
                    self.push(Value::Int(v.into()))?
                }
                0x8a | 0x8b => {
                    let n = if op == 0x8a {
                        self.u8()? as usize
                    } else {
                        u32::from_le_bytes(self.le()?) as usize
                    };
                    let bytes = self.take(n)?;
                    if n > 8 {
                        return err(format!("an integer of {n} bytes"));
                    }
                    let mut buf = if bytes.last().is_some_and(|&b| b & 0x80 != 0) {
                        [0xff; 8]
                    } else {
                        [0; 8]
                    };
                    buf[..n].copy_from_slice(bytes);
                    self.push(Value::Int(i64::from_le_bytes(buf)))?
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.le()?);
                    self.push(Value::Float(v))?
                }
                b'X' => {
                    let n = u32::from_le_bytes(self.le()?) as usize;
                    let s = self.text(n)?;
                    self.push(Value::Str(s))?
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let s = self.text(n)?;
                    self.push(Value::Str(s))?
                }
                0x8d => {
                    let n = u64::from_le_bytes(self.le()?);
                    let s = self.text(
                        usize::try_from(n).map_err(|_| PickleError("a string too long".into()))?,
                    )?;
                    self.push(Value::Str(s))?
                }
                b'T' | b'U' => {
                    let n = if op == b'T' {
                        u32::from_le_bytes(self.le()?) as usize
                    } else {
                        self.u8()? as usize
                    };
                    let b = self.take(n)?.to_vec();
                    self.push(Value::Bytes(b))?
                }
                b'B' | b'C' | 0x8e => {
                    let n = match op {
                        b'B' => u32::from_le_bytes(self.le()?) as usize,
                        b'C' => self.u8()? as usize,
                        _ => usize::try_from(u64::from_le_bytes(self.le()?))
                            .map_err(|_| PickleError("bytes too long".into()))?,
                    };
                    let b = self.take(n)?.to_vec();
                    self.push(Value::Bytes(b))?
                }
                b')' => self.push(Value::Tuple(Vec::new()))?,
                b't' => {
                    let items = self.pop_mark()?;
                    self.push(Value::Tuple(items))?
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        return err("TUPLE of too few items");
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.push(Value::Tuple(items))?
                }
                b']' => self.push(Value::List(Rc::new(RefCell::new(Vec::new()))))?,
                b'l' => {
                    let items = self.pop_mark()?;
                    self.push(Value::List(Rc::new(RefCell::new(items))))?
                }
                b'}' => self.push(Value::Dict(Rc::new(RefCell::new(Vec::new()))))?,
                b'd' => {
                    let items = self.pop_mark()?;
                    let pairs = pairs(items)?;
                    self.push(Value::Dict(Rc::new(RefCell::new(pairs))))?
                }
                0x8f => self.push(Value::List(Rc::new(RefCell::new(Vec::new()))))?, // EMPTY_SET
                0x90 => {
                    // ADDITEMS (to a set, kept as a list)
                    let items = self.pop_mark()?;
                    match self.stack.last() {
                        Some(Value::List(l)) => l.borrow_mut().extend(items),
                        _ => return err("ADDITEMS to something that is not a set"),
                    }
                }
                0x91 => {
                    let items = self.pop_mark()?;
                    self.push(Value::List(Rc::new(RefCell::new(items))))?
                }
                b'a' => {
                    let v = self.pop()?;
                    match self.stack.last() {
                        Some(Value::List(l)) => l.borrow_mut().push(v),
                        _ => return err("APPEND to something that is not a list"),
                    }
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    match self.stack.last() {
                        Some(Value::List(l)) => l.borrow_mut().extend(items),
                        _ => return err("APPENDS to something that is not a list"),
                    }
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.set_items(vec![(k, v)])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let pairs = pairs(items)?;
                    self.set_items(pairs)?;
                }
                b'q' => {
                    let k = self.u8()?.into();
                    self.memoize(k)?
                }
                b'r' => {
                    let k = u32::from_le_bytes(self.le()?).into();
                    self.memoize(k)?
                }
                0x94 => {
                    let k = self.memo.len() as u64;
                    self.memoize(k)?
                }
                b'h' => {
                    let k = self.u8()?.into();
                    self.recall(k)?
                }
                b'j' => {
                    let k = u32::from_le_bytes(self.le()?).into();
                    self.recall(k)?
                }
                b'c' => {
                    let module = self.line()?.to_string();
                    let name = self.line()?.to_string();
                    let g = self.global(&module, &name)?;
                    self.push(g)?
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Value::Str(module), Value::Str(name)) = (module, name) else {
                        return err("STACK_GLOBAL of something that is not two strings");
                    };
                    let g = self.global(&module, &name)?;
                    self.push(g)?
                }
                b'R' => {
                    let args = self.pop()?;
                    let f = self.pop()?;
                    let v = apply(f, args)?;
                    self.push(v)?
                }
                0x81 => {
                    // NEWOBJ: cls.__new__(cls, *args)
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    let v = apply(cls, args)?;
                    self.push(v)?
                }
                b'b' => {
                    // BUILD: an object's state. Dicts (OrderedDict) may get items this way;
                    // opaque objects keep theirs to themselves.
                    let state = self.pop()?;
                    if let (Some(Value::Dict(d)), Value::Dict(s)) = (self.stack.last(), &state) {
                        let items = s.borrow().clone();
                        d.borrow_mut().extend(items);
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = persistent(pid)?;
                    self.push(v)?
                }
                other => return err(format!("pickle opcode 0x{other:02x} is not read")),
            }
            if self.marks.len() > MAX_DEPTH {
                return err("the pickle nests too deeply");
            }
        }
    }

    fn set_items(&mut self, items: Vec<(Value, Value)>) -> Result<(), PickleError> {
        match self.stack.last() {
            Some(Value::Dict(d)) => {
                d.borrow_mut().extend(items);
                Ok(())
            }
            // Items set on an opaque object's state are ignored with it.
            Some(Value::Opaque(_)) => Ok(()),
            _ => err("SETITEM on something that is not a dict"),
        }
    }

    fn memoize(&mut self, k: u64) -> Result<(), PickleError> {
        let top = self
            .stack
            .last()
            .cloned()
            .ok_or(PickleError("PUT of nothing".into()))?;
        self.memo.insert(k, top);
        Ok(())
    }

    fn recall(&mut self, k: u64) -> Result<(), PickleError> {
        let v = self
            .memo
            .get(&k)
            .cloned()
            .ok_or(PickleError(format!("GET of memo {k}, never put")))?;
        self.push(v)
    }
}

fn pairs(items: Vec<Value>) -> Result<Vec<(Value, Value)>, PickleError> {
    if !items.len().is_multiple_of(2) {
        return err("a dict of an odd number of items");
    }
    let mut it = items.into_iter();
    let mut out = Vec::new();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.push((k, v));
    }
    Ok(out)
}

fn int(v: &Value, what: &str) -> Result<usize, PickleError> {
    match v {
        Value::Int(i) if *i >= 0 => Ok(*i as usize),
        _ => err(format!("{what} is not a count but {}", v.kind())),
    }
}

fn ints(v: &Value, what: &str) -> Result<Vec<usize>, PickleError> {
    match v {
        Value::Tuple(items) => items.iter().map(|i| int(i, what)).collect(),
        _ => err(format!("{what} is not a tuple")),
    }
}

/// What calling an allowed global on `args` gives, worked out here.
fn apply(f: Value, args: Value) -> Result<Value, PickleError> {
    let Value::Global(name) = f else {
        return err(format!("a call of {}, not of an allowed global", f.kind()));
    };
    let Value::Tuple(args) = args else {
        return err(format!(
            "`{name}` called with arguments that are not a tuple"
        ));
    };
    match name.as_str() {
        "collections.OrderedDict" => Ok(Value::Dict(Rc::new(RefCell::new(Vec::new())))),
        "torch._utils._rebuild_tensor_v2" => {
            let [storage, offset, shape, stride, ..] = args.as_slice() else {
                return err("_rebuild_tensor_v2 with too few arguments");
            };
            let Value::Storage { dtype, key } = storage else {
                return err("_rebuild_tensor_v2 of something that is not a storage");
            };
            Ok(Value::Tensor(TensorRef {
                dtype: dtype.clone(),
                key: key.clone(),
                offset: int(offset, "a storage offset")?,
                shape: ints(shape, "a tensor shape")?,
                stride: ints(stride, "a tensor stride")?,
            }))
        }
        "torch._utils._rebuild_parameter" => match args.into_iter().next() {
            Some(t @ Value::Tensor(_)) => Ok(t),
            _ => err("_rebuild_parameter of something that is not a tensor"),
        },
        "_codecs.encode" => match args.first() {
            // str.encode('latin1'): the bytes of numpy scalars.
            Some(Value::Str(s)) => Ok(Value::Bytes(s.chars().map(|c| c as u32 as u8).collect())),
            _ => err("_codecs.encode of something that is not a string"),
        },
        other => Ok(Value::Opaque(other.to_string())),
    }
}

/// PyTorch's persistent ids: `('storage', <storage type>, key, location, numel)`.
fn persistent(pid: Value) -> Result<Value, PickleError> {
    let Value::Tuple(items) = pid else {
        return err("a persistent id that is not a tuple");
    };
    match items.as_slice() {
        [Value::Str(kind), Value::Global(class), Value::Str(key), _, _] if kind == "storage" => {
            let dtype = class.strip_prefix("torch.").unwrap_or(class).to_string();
            if !dtype.ends_with("Storage") {
                return err(format!("a storage of type `{class}`"));
            }
            Ok(Value::Storage {
                dtype,
                key: key.clone(),
            })
        }
        _ => err("a persistent id that is not a storage"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_globals_that_could_run_code() {
        // `cos\nsystem\n(S'touch /tmp/x'\ntR.` in protocol 2: os.system('...').
        let evil = b"\x80\x02cos\nsystem\nq\x00X\x08\x00\x00\x00touch xxq\x01\x85q\x02Rq\x03.";
        let e = read(evil).unwrap_err();
        assert!(e.0.contains("`os.system`"), "{e}");
        let builtins = b"\x80\x02cbuiltins\neval\n.";
        assert!(read(builtins).unwrap_err().0.contains("builtins.eval"));
    }

    #[test]
    fn truncated_and_malformed_input_are_errors_not_panics() {
        for bad in [
            &b""[..],
            b"\x80",
            b"\x80\x09",
            b"X\xff\xff\xff\xff",
            b"(((((t",
            b"s",
            b"h\x05",
            b"\x8b\xff\xff\xff\x7f",
        ] {
            assert!(read(bad).is_err(), "{bad:?}");
        }
        // A dict that contains itself reads (and is then walked with a depth limit).
        let cyclic = b"\x80\x02}q\x00X\x01\x00\x00\x00ah\x00s.";
        assert!(matches!(read(cyclic), Ok(Value::Dict(_))));
    }
}
