//! Privacy for weft: record-level differential privacy for nodes' local training (the Rényi
//! accountant and DP-SGD's mechanism) and secure aggregation inside communities — the parts that
//! know nothing of models or networks.

pub mod accountant;
pub mod dpsgd;
pub mod secagg;

pub use accountant::{calibrate_noise, orders, AccountingError, RdpCurve, Spent, SubsampledGaussian};
pub use dpsgd::{records, ClippedSum, DpRule, DpSgd, DpSgdError, PrivateStream};
