//! The parsed config with Python's data model (what PyYAML / `json.loads` give the original),
//! built from serde's events with ClusterRunner's merge-key and dict rules, depth and size bounds.
use super::{JobConfigError, MAX_CONFIG_BYTES, MAX_CONFIG_DEPTH, PY_NONE};
use serde::de::{self, DeserializeSeed, Deserializer, EnumAccess, MapAccess, SeqAccess, Visitor};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::fmt;
use std::io;

// ---------------------------------------------------------------------------------------
// Parsed value with Python's data model
// ---------------------------------------------------------------------------------------

/// The parsed config as Python would see it: mappings keep first-insertion order and the
/// last value of a duplicated key (PyYAML / `json.loads` semantics).
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Node {
    Null,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

impl Node {
    pub(super) fn as_str(&self) -> Option<&str> {
        match self {
            Self::Str(s) => Some(s),
            _ => None,
        }
    }

    /// Python class name of the value.
    pub(super) fn py_name(&self) -> &'static str {
        match self {
            Self::Null => "NoneType",
            Self::Bool(_) => "bool",
            Self::Int(_) => "int",
            Self::Float(_) => "float",
            Self::Str(_) => "str",
            Self::Seq(_) => "list",
            Self::Map(_) => "dict",
        }
    }

    /// `str(type(value))`.
    pub(super) fn py_type(&self) -> String {
        format!("<class '{}'>", self.py_name())
    }

    /// The original's rendering of a list section whose item is `self`.
    pub(super) fn py_list_type(&self) -> String {
        format!("(<class 'list'>, <class '{}'>)", self.py_name())
    }

    /// `str(value)` for scalars, which is how Python formats job and section names.
    pub(super) fn py_str(&self) -> String {
        match self {
            Self::Null => PY_NONE.to_owned(),
            Self::Bool(true) => "True".to_owned(),
            Self::Bool(false) => "False".to_owned(),
            Self::Int(n) => n.to_string(),
            Self::Float(f) => py_float(*f),
            Self::Str(s) => s.clone(),
            Self::Seq(_) | Self::Map(_) => format!("<{}>", self.py_name()),
        }
    }

    /// Dictionary identity; `None` for unhashable keys. Python treats `1`, `1.0` and `True`
    /// as the same key.
    pub(super) fn key_id(&self) -> Option<String> {
        Some(match self {
            Self::Null => "n".to_owned(),
            Self::Bool(b) => format!("i{}", i32::from(*b)),
            Self::Int(n) => format!("i{n}"),
            Self::Float(f) if f.is_finite() && f.fract() == 0.0 && f.abs() < 1e30 => {
                // Integral and in range (checked above), so the cast is exact.
                let n = *f as i128;
                format!("i{n}")
            }
            Self::Float(f) => format!("f{}", f.to_bits()),
            Self::Str(s) => format!("s{s}"),
            Self::Seq(_) | Self::Map(_) => return None,
        })
    }

    pub(super) fn kind(&self) -> &'static str {
        match self {
            Self::Seq(_) => "sequence",
            Self::Map(_) => "mapping",
            _ => "scalar",
        }
    }
}

pub(super) fn py_float(f: f64) -> String {
    if f.is_nan() {
        return "nan".to_owned();
    }
    if f.is_infinite() {
        return if f > 0.0 { "inf" } else { "-inf" }.to_owned();
    }
    let s = format!("{f:?}");
    match s.split_once('e') {
        Some((mantissa, exp)) if !exp.starts_with('-') => format!("{mantissa}e+{exp}"),
        _ => s,
    }
}

/// Applies YAML merge keys (`<<`) the way PyYAML's `flatten_mapping` does: merged entries
/// come first (for a list of mappings, later ones first), so the mapping's own keys win,
/// then earlier merge sources.
pub(super) fn flatten_merge(pairs: Vec<(Node, Node)>) -> Result<Vec<(Node, Node)>, String> {
    if !pairs.iter().any(|(k, _)| k.as_str() == Some("<<")) {
        return Ok(pairs);
    }
    let mut merged = Vec::new();
    let mut own = Vec::with_capacity(pairs.len());
    for (key, value) in pairs {
        if key.as_str() != Some("<<") {
            own.push((key, value));
            continue;
        }
        match value {
            Node::Map(entries) => merged.extend(entries),
            Node::Seq(items) => {
                let mut sources = Vec::with_capacity(items.len());
                for item in items {
                    match item {
                        Node::Map(entries) => sources.push(entries),
                        other => {
                            return Err(format!(
                                "expected a mapping for merging, but found {}",
                                other.kind()
                            ));
                        }
                    }
                }
                for entries in sources.into_iter().rev() {
                    merged.extend(entries);
                }
            }
            other => {
                return Err(format!(
                    "expected a mapping or list of mappings for merging, but found {}",
                    other.kind()
                ));
            }
        }
    }
    merged.extend(own);
    Ok(merged)
}

/// Builds a dict from pairs with Python semantics: first position, last value.
pub(super) fn build_dict(pairs: Vec<(Node, Node)>) -> Result<Vec<(Node, Node)>, String> {
    let mut out: Vec<(Node, Node)> = Vec::with_capacity(pairs.len());
    let mut index: HashMap<String, usize> = HashMap::with_capacity(pairs.len());
    for (key, value) in pairs {
        let id = key
            .key_id()
            .ok_or_else(|| "found unhashable key".to_owned())?;
        match index.get(&id) {
            Some(&i) => out[i].1 = value,
            None => {
                index.insert(id, out.len());
                out.push((key, value));
            }
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// Bounded deserialization (shared by YAML, JSON text and serde_json::Value)
// ---------------------------------------------------------------------------------------

/// State shared by all seeds of one parse. Limits are enforced while the value is built, so
/// an alias bomb is stopped before it allocates, and the exact [`JobConfigError`] survives
/// the trip through the deserializer's own error type.
#[derive(Debug)]
pub(super) struct Ctx {
    yaml: bool,
    budget: Cell<usize>,
    failure: RefCell<Option<JobConfigError>>,
}

impl Ctx {
    pub(super) fn new(yaml: bool) -> Self {
        Self {
            yaml,
            budget: Cell::new(MAX_CONFIG_BYTES),
            failure: RefCell::new(None),
        }
    }

    pub(super) fn fail<E: de::Error>(&self, error: JobConfigError) -> E {
        let e = E::custom(&error);
        *self.failure.borrow_mut() = Some(error);
        e
    }

    /// Each node costs one byte plus its text, roughly what it takes in the source; so
    /// the budget only bites on alias expansion or on values that are too large anyway.
    pub(super) fn charge<E: de::Error>(&self, bytes: usize) -> Result<(), E> {
        match self.budget.get().checked_sub(bytes.saturating_add(1)) {
            Some(rest) => {
                self.budget.set(rest);
                Ok(())
            }
            None => Err(self.fail(JobConfigError::TooLarge)),
        }
    }

    pub(super) fn finish<E>(
        &self,
        parsed: Result<Node, E>,
        syntax: impl FnOnce(E) -> JobConfigError,
    ) -> Result<Node, JobConfigError> {
        parsed.map_err(|e| {
            self.failure
                .borrow_mut()
                .take()
                .unwrap_or_else(|| syntax(e))
        })
    }
}

#[derive(Debug, Clone, Copy)]
pub(super) struct NodeSeed<'a> {
    ctx: &'a Ctx,
    /// Containers enclosing the value being read.
    depth: usize,
}

impl<'a> NodeSeed<'a> {
    pub(super) fn root(ctx: &'a Ctx) -> Self {
        Self { ctx, depth: 0 }
    }

    pub(super) fn enter<E: de::Error>(self) -> Result<Self, E> {
        if self.depth >= MAX_CONFIG_DEPTH {
            return Err(self.ctx.fail(JobConfigError::TooDeep));
        }
        self.ctx.charge(0)?;
        Ok(Self {
            ctx: self.ctx,
            depth: self.depth + 1,
        })
    }

    pub(super) fn scalar<E: de::Error>(self, node: Node) -> Result<Node, E> {
        let len = match &node {
            Node::Str(s) => s.len(),
            _ => 0,
        };
        self.ctx.charge(len)?;
        Ok(node)
    }
}

impl<'de> DeserializeSeed<'de> for NodeSeed<'_> {
    type Value = Node;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Node, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for NodeSeed<'_> {
    type Value = Node;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a YAML/JSON value")
    }

    fn visit_unit<E: de::Error>(self) -> Result<Node, E> {
        self.scalar(Node::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Node, E> {
        self.scalar(Node::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Node, D::Error> {
        self.deserialize(deserializer)
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Node, E> {
        self.scalar(Node::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Node, E> {
        self.scalar(Node::Int(i128::from(v)))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Node, E> {
        self.scalar(Node::Int(i128::from(v)))
    }

    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Node, E> {
        self.scalar(Node::Int(v))
    }

    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Node, E> {
        self.scalar(Node::Int(i128::try_from(v).unwrap_or(i128::MAX)))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Node, E> {
        self.scalar(Node::Float(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Node, E> {
        self.scalar(Node::Str(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Node, E> {
        self.scalar(Node::Str(v))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        let child = self.enter()?;
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(child)? {
            items.push(item);
        }
        Ok(Node::Seq(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        let child = self.enter()?;
        let mut pairs = Vec::new();
        while let Some(key) = map.next_key_seed(child)? {
            let value = map.next_value_seed(child)?;
            pairs.push((key, value));
        }
        if self.ctx.yaml {
            pairs = flatten_merge(pairs).map_err(de::Error::custom)?;
        }
        build_dict(pairs).map(Node::Map).map_err(de::Error::custom)
    }

    /// serde_norway reports values with a local tag (`!foo bar`) as enums; PyYAML's safe
    /// loader refuses them, so do we.
    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<Node, A::Error> {
        let (tag, _) = data.variant::<String>()?;
        Err(de::Error::custom(format!(
            "could not determine a constructor for the tag '!{tag}'"
        )))
    }
}

/// Measures serialized size, giving up as soon as the limit is passed.
#[derive(Debug)]
pub(super) struct ByteCounter(pub(super) usize);

impl io::Write for ByteCounter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 = self.0.saturating_add(buf.len());
        if self.0 > MAX_CONFIG_BYTES {
            return Err(io::Error::other("job config too large"));
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
