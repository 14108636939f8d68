//! Kernel calls the sidecar makes, and the backends that execute them.
pub mod model;
