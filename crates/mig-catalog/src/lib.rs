//! The MIG geometry catalog: which layouts each NVIDIA GPU model accepts.
//!
//! Everything else in mig-autoscaler stands on this crate. It is pure: no I/O beyond the embedded
//! data file (`data/catalog.toml`, one row per SKU and profile with its source and confidence).
//!
//! ```
//! use mig_catalog::Catalog;
//! let catalog = Catalog::embedded();
//! let h100 = catalog.by_product_label("NVIDIA-H100-80GB-HBM3-MIG-1g.10gb").unwrap();
//! let layout = h100.parse_layout("3g.40gb@0,2g.20gb@4,1g.10gb@6").unwrap();
//! assert!(h100.validate(&layout).is_ok());
//! let bad = h100.parse_layout("4g.40gb@0,2g.20gb@2").unwrap();
//! assert_eq!(h100.validate(&bad).unwrap_err().violations[0].rule(), "overlap");
//! ```

mod enumerate;
pub mod error;
pub mod layout;
pub mod migparted;
pub mod model;
pub mod nvml;

pub use error::{ArrangeError, CatalogError, ConfigError, InvalidLayout, ParseLayoutError};
pub use layout::{Counts, Instance, Layout, NamedInstance, Violation};
pub use model::{Catalog, Confidence, GpuModel, ProductLabel, Profile, ProfileIdx, Sku};
