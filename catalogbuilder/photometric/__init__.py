"""The photometric stage: Teff, log g, [Fe/H] for sources with photometry but no spectrum (docs/other_models.md).

``table`` reads input tables (Parquet/FITS/CSV, canonical column names + aliases, positional parallax join),
``stage`` predicts over Dask row partitions and writes the release table, ``train`` trains the Survey-of-Surveys MLP
on APOKASC × Gaia DR2, ``cli`` adds ``catalogbuilder photometric`` and ``catalogbuilder photometric-train``.
"""
