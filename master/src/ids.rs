//! Typed ids for what crosses module borders: a build id cannot be passed where an attempt id
//! is wanted. The wire (proto) and the store keep plain integers; conversions happen at those
//! edges, with `.0` or `From`.
use std::fmt;

macro_rules! id {
    ($(#[$doc:meta])* $name:ident($inner:ty)) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub struct $name(pub $inner);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl From<$inner> for $name {
            fn from(v: $inner) -> Self {
                Self(v)
            }
        }

        impl From<$name> for $inner {
            fn from(v: $name) -> Self {
                v.0
            }
        }
    };
}

id!(
    /// A build, numbered from 1 by the store.
    BuildId(u64)
);
id!(
    /// A subjob within its build (0-based, in grouping order).
    SubjobId(u32)
);
id!(
    /// An atom within its subjob (0-based).
    AtomId(u32)
);
id!(
    /// One dispatch of a subjob (or a preparation) to a slave; unique across restarts.
    AttemptId(u64)
);
id!(
    /// A slave's session id on this master (a reconnect gets a new one).
    SlaveId(u64)
);

/// One atom of one build: what console reads and uploads address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AtomRef {
    /// The build.
    pub build: BuildId,
    /// The subjob.
    pub subjob: SubjobId,
    /// The atom within the subjob.
    pub atom: AtomId,
}

impl AtomRef {
    /// The atom from the wire's three integers.
    pub fn new(build: u64, subjob: u32, atom: u32) -> Self {
        Self {
            build: BuildId(build),
            subjob: SubjobId(subjob),
            atom: AtomId(atom),
        }
    }
}
