"""PCam data: the official HDF5 layout, loaders, download, synthetic stand-in and device transforms."""
