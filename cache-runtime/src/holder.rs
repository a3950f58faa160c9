//! Which process took a lease: this process's identity, written into
//! every lease placeholder and logged when a cache connects, so that an
//! operator who finds a lease held can tell whose it is.

/// Who took a lease: the first half of its token is the taker's process
/// id and a random number drawn once per process (the *instance*, which
/// tells apart processes of one pid on different hosts and restarts of
/// one process). The cache logs both when it connects, so an operator who
/// finds a lease held (`cachectl get`) can tell whose it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Holder {
    /// The process id of the taker.
    pub pid: u32,
    /// A random number the taking process drew once.
    pub instance: u32,
}

impl Holder {
    /// This process's.
    pub fn this_process() -> Holder {
        // Made once: every miss writes it, and `getpid` is a system call.
        static THIS: std::sync::OnceLock<Holder> = std::sync::OnceLock::new();
        *THIS.get_or_init(|| Holder {
            pid: std::process::id(),
            instance: fastrand::u32(..),
        })
    }
}

impl std::fmt::Display for Holder {
    /// `pid 4242, instance 9a3c1f0e`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {}, instance {:08x}", self.pid, self.instance)
    }
}
