"""Everything that touches data: dataset readers, the Zarr feature store, the cached loader, training,
evaluation and result tables."""
