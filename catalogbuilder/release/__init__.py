"""Release tables (allStar/allVisit FITS + Parquet) and the per-release summary."""
from catalogbuilder.release.tables import ReleaseTable, assemble_release, build_release, write_table

__all__ = ["ReleaseTable", "assemble_release", "build_release", "write_table"]
