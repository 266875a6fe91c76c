"""catalogbuilder: FITS spectra -> Zarr store -> NN inference -> cross-match -> calibrated release tables."""

__version__ = "0.1.0"
